//! A persistent, content-addressed cache of LLM answers, shared by runs and processes.
//!
//! One file per answer, named by the SHA-256 of everything the answer depends on (model name,
//! API kind, templates, rendered messages, sampling settings, sample index; not the endpoint
//! URL, so load-balanced replicas share entries). Writers write a uniquely named temporary file
//! in the same folder and rename it into place; a rename is atomic, so a reader sees either
//! no entry or a whole one, and when several processes answer the same key at once the last
//! rename wins with an equally valid answer. No lock, no daemon, no native library, and a cache
//! folder can be copied, merged (`cp -n`) or pruned with ordinary tools. A file that does not
//! parse (say, after a crash on a file system that reorders writes) is a miss and is rewritten.

use super::parse::TokenLogprobs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bumped when the meaning of a cached answer changes.
const VERSION: &str = "sipt-llm-cache-v1";

/// One cached answer: what the server generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The cache key of some key material (any JSON value).
pub fn key(material: &serde_json::Value) -> String {
    let mut text = String::from(VERSION);
    text.push('\n');
    canonical(material, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compact JSON with object keys sorted at every level, whatever order the map keeps (serde_json
/// keeps insertion order when any crate in the build enables its `preserve_order` feature).
fn canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

impl Cache {
    /// A cache in `dir`, created if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Cache, String> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create the cache folder {} ({e})", dir.display()))?;
        Ok(Cache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// The entry for `key`, if present and whole.
    pub fn get(&self, key: &str) -> Option<Entry> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Store `entry` under `key` (atomically replacing any entry there).
    pub fn put(&self, key: &str, entry: &Entry) -> std::io::Result<()> {
        let path = self.path(key);
        let folder = path.parent().expect("cache paths have a folder");
        std::fs::create_dir_all(folder)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let temp = folder.join(format!(
            ".{key}.{}.{nanos}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
            file.flush()?;
            drop(file);
            std::fs::rename(&temp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sipt-llm-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn keys_depend_on_every_field_and_not_on_key_order() {
        let a = serde_json::json!({"model": "m", "sample": 0, "prompt": "p"});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"prompt": "p", "sample": 0, "model": "m"}"#).unwrap();
        assert_eq!(key(&a), key(&b));
        assert_ne!(
            key(&a),
            key(&serde_json::json!({"model": "m", "sample": 1, "prompt": "p"}))
        );
        assert_eq!(key(&a).len(), 64);
    }

    #[test]
    fn round_trip_and_corrupt_files_are_misses() {
        let dir = temp_dir("rt");
        let cache = Cache::open(&dir).unwrap();
        let k = key(&serde_json::json!("x"));
        assert_eq!(cache.get(&k), None);
        let entry = Entry {
            text: "FINAL DECISION: YES".into(),
            logprobs: Some(vec![TokenLogprobs {
                token: "YES".into(),
                top: vec![("YES".into(), -0.1)],
            }]),
        };
        cache.put(&k, &entry).unwrap();
        assert_eq!(cache.get(&k), Some(entry.clone()));
        std::fs::write(cache.path(&k), b"{\"text\": \"trunc").unwrap();
        assert_eq!(cache.get(&k), None);
        cache.put(&k, &entry).unwrap();
        assert_eq!(cache.get(&k), Some(entry));
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(cache.path(&k).parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_writers_never_expose_partial_entries() {
        let dir = temp_dir("race");
        let k = key(&serde_json::json!("race"));
        let big = "y".repeat(200_000);
        std::thread::scope(|s| {
            for w in 0..4 {
                let (dir, k, big) = (dir.clone(), k.clone(), big.clone());
                s.spawn(move || {
                    let cache = Cache::open(&dir).unwrap();
                    for i in 0..25 {
                        let text = format!("{w}-{i}-{big}");
                        cache
                            .put(
                                &k,
                                &Entry {
                                    text,
                                    logprobs: None,
                                },
                            )
                            .unwrap();
                    }
                });
            }
            let reader = Cache::open(&dir).unwrap();
            s.spawn(move || {
                for _ in 0..200 {
                    if let Some(e) = reader.get(&k) {
                        assert!(e.text.len() > 200_000 && e.text.ends_with('y'));
                    }
                }
            });
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
