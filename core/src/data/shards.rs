//! Token shards: each source file of a corpus tokenized once into a memory-mapped file on disk,
//! reused by every run and sweep trial with the same tokenizer and text settings.
//!
//! A shard holds a 64-byte header, the tokens (u16 where the vocabulary fits, else u32; each
//! document followed by the end-of-document token when the tokenizer has one) and the table of
//! document boundaries. It is built as a stream — documents read, tokenized in batches (in
//! parallel inside the tokenizers crate) and written as they come, the boundary table spooled
//! to a side file — so building needs memory for a batch, not for the corpus. It is written
//! under a name of its own process and renamed into place complete, so two processes that
//! build the same shard at once both succeed and a killed build leaves no shard behind.
//!
//! Training maps the shards and reads the windows and cuts it draws straight from the map:
//! the pages are the kernel's page cache, not the process's memory.

use super::source::{self, Format, Skipped};
use super::Segment;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"SIPTTOKS";
const VERSION: u32 = 1;
const HEADER: usize = 64;
/// Documents are tokenized in batches of about this many bytes of text (a batch's encodings
/// take about a hundred times its size while they last).
const BATCH_BYTES: usize = 1 << 20;

/// What a shard's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardInfo {
    /// Bytes per token: 2 or 4.
    pub width: usize,
    pub tokens: u64,
    pub documents: u64,
    /// Documents skipped while reading the source (not UTF-8, empty).
    pub skipped: u64,
    /// Bytes of document text tokenized.
    pub text_bytes: u64,
}

/// One mapped shard.
pub struct Shard {
    map: Mmap,
    pub info: ShardInfo,
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Shard {
    /// Map a shard, checking that it is complete and consistent; `Ok(None)` when it is not a
    /// shard of this version (it is then built again).
    pub fn open(path: &Path) -> Result<Option<Shard>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        // SAFETY: shards are written once under a temporary name and renamed into place; no
        // process writes to a shard's path after that, so the map never changes under us.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Ok(None);
        }
        let version = u32::from_le_bytes([map[8], map[9], map[10], map[11]]);
        let width = u32::from_le_bytes([map[12], map[13], map[14], map[15]]) as usize;
        let info = ShardInfo {
            width,
            tokens: u64_at(&map, 16),
            documents: u64_at(&map, 24),
            skipped: u64_at(&map, 40),
            text_bytes: u64_at(&map, 48),
        };
        let docs_at = u64_at(&map, 32) as usize;
        let expected = docs_at as u64 + info.documents * 16;
        if version != VERSION
            || !(width == 2 || width == 4)
            || docs_at < HEADER + info.tokens as usize * width
            || map.len() as u64 != expected
        {
            return Ok(None);
        }
        Ok(Some(Shard { map, info }))
    }

    pub fn len(&self) -> usize {
        self.info.tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.info.tokens == 0
    }

    /// The documents' token spans, offset by `offset`.
    pub fn documents(&self, offset: usize) -> Vec<Segment> {
        let at = u64_at(&self.map, 32) as usize;
        (0..self.info.documents as usize)
            .map(|i| Segment {
                start: offset + u64_at(&self.map, at + i * 16) as usize,
                end: offset + u64_at(&self.map, at + i * 16 + 8) as usize,
            })
            .collect()
    }

    /// Tokens `start..end` of this shard, appended to `out`.
    fn extend(&self, start: usize, end: usize, out: &mut Vec<u32>) {
        let w = self.info.width;
        let bytes = &self.map[HEADER + start * w..HEADER + end * w];
        if w == 2 {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            );
        } else {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
    }
}

/// The tokens of a corpus: mapped shards (and in-memory parts) one after the other, addressed
/// by one global index.
#[derive(Default)]
pub struct Tokens {
    parts: Vec<Part>,
    /// Global index of each part's first token.
    starts: Vec<usize>,
    len: usize,
}

enum Part {
    Mapped(Shard),
    Owned(Vec<u32>),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Mapped(s) => s.len(),
            Part::Owned(v) => v.len(),
        }
    }
}

impl Tokens {
    /// Tokens held in memory (tests, small corpora).
    pub fn from_vec(tokens: Vec<u32>) -> Tokens {
        let mut t = Tokens::default();
        t.push(Part::Owned(tokens));
        t
    }

    fn push(&mut self, part: Part) -> usize {
        let offset = self.len;
        self.starts.push(offset);
        self.len += part.len();
        self.parts.push(part);
        offset
    }

    /// Append a shard; returns the global index of its first token.
    pub fn push_shard(&mut self, shard: Shard) -> usize {
        self.push(Part::Mapped(shard))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens `start..end` (global indices).
    pub fn span(&self, start: usize, end: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        self.extend(start, end, &mut out);
        out
    }

    /// Tokens `start..end` appended to `out`.
    pub fn extend(&self, start: usize, end: usize, out: &mut Vec<u32>) {
        assert!(
            start <= end && end <= self.len,
            "token span {start}..{end} outside 0..{}",
            self.len
        );
        let mut at = start;
        while at < end {
            let p = self.starts.partition_point(|&s| s <= at) - 1;
            let base = self.starts[p];
            let stop = end.min(base + self.parts[p].len());
            match &self.parts[p] {
                Part::Mapped(s) => s.extend(at - base, stop - base, out),
                Part::Owned(v) => out.extend_from_slice(&v[at - base..stop - base]),
            }
            at = stop;
        }
    }
}

/// The shard file of `source` under `dir` for a tokenizer and text settings (`key`).
pub fn shard_path(dir: &Path, source: &Path, key: &str) -> PathBuf {
    let id = sipt_experiment::paths::fingerprint(&[source.to_path_buf()], key);
    let stem = source
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("shard")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(48)
        .collect::<String>();
    dir.join(format!("{stem}-{id:016x}.tok"))
}

/// Progress of a build: bytes of the sources read so far, shared with a reporter.
#[derive(Clone, Default)]
pub struct Progress {
    pub source_bytes: Arc<AtomicU64>,
    pub documents: Arc<AtomicU64>,
    pub tokens: Arc<AtomicU64>,
}

/// A documents batch, or the error that ended reading.
type Batch = Result<Vec<String>>;

/// Tokenize `source` into the shard at `path` (built under a temporary name, then renamed).
pub fn build(
    source_file: &Path,
    format: Format,
    field: &str,
    tokenizer: &Tokenizer,
    path: &Path,
    progress: &Progress,
) -> Result<ShardInfo> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A name of this process's own: builders of the same shard never share a file.
    static BUILDS: AtomicU64 = AtomicU64::new(0);
    let unique = format!("{}.{}", std::process::id(), BUILDS.fetch_add(1, Relaxed));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("shard");
    let tmp = dir.join(format!(".{name}.{unique}.tmp"));
    let docs_tmp = dir.join(format!(".{name}.{unique}.docs.tmp"));
    let result = write_shard(
        source_file,
        format,
        field,
        tokenizer,
        &tmp,
        &docs_tmp,
        progress,
    );
    let _ = std::fs::remove_file(&docs_tmp);
    match result {
        Ok(info) => {
            if info.skipped > 0 {
                tracing::warn!(
                    "{}: skipped {} document(s) that are not UTF-8 text, empty or null",
                    source_file.display(),
                    info.skipped
                );
            }
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot move the shard into {}", path.display()))?;
            Ok(info)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_shard(
    source_file: &Path,
    format: Format,
    field: &str,
    tokenizer: &Tokenizer,
    tmp: &Path,
    docs_tmp: &Path,
    progress: &Progress,
) -> Result<ShardInfo> {
    let width = if tokenizer.vocab_size() <= u16::MAX as usize + 1 {
        2
    } else {
        4
    };
    let create = |p: &Path| {
        std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))
    };
    let mut out = BufWriter::with_capacity(1 << 20, create(tmp)?);
    out.write_all(&[0u8; HEADER])?;
    let mut docs = BufWriter::with_capacity(1 << 16, create(docs_tmp)?);

    // Read on one thread, tokenize and write on this one (the tokenizer's own threads do the
    // batch in parallel); a bounded channel keeps at most a few batches in memory.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
    let source_file = source_file.to_path_buf();
    let field = field.to_string();
    let read_bytes = progress.source_bytes.clone();
    let reader = std::thread::Builder::new()
        .name("sipt-data-read".into())
        .spawn(move || -> Result<Skipped> {
            let mut batch = Vec::new();
            let mut bytes = 0;
            let before = read_bytes.load(Relaxed);
            let skipped = source::for_each_document(
                &source_file,
                format,
                &field,
                Some(&read_bytes),
                &mut |doc| {
                    bytes += doc.len();
                    batch.push(doc);
                    if bytes >= BATCH_BYTES {
                        bytes = 0;
                        if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                            bail!("the tokenizing side stopped");
                        }
                    }
                    Ok(())
                },
            );
            let skipped = match skipped {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(Skipped::default());
                }
            };
            if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                bail!("the tokenizing side stopped");
            }
            // Sources read without counting (Parquet): their whole size once done.
            let size = std::fs::metadata(&source_file)
                .map(|m| m.len())
                .unwrap_or(0);
            let counted = read_bytes.load(Relaxed) - before;
            if counted < size {
                read_bytes.fetch_add(size - counted, Relaxed);
            }
            Ok(skipped)
        })
        .context("cannot start the reading thread")?;

    let mut tokens: u64 = 0;
    let mut documents: u64 = 0;
    let mut text_bytes: u64 = 0;
    let mut encoded = Vec::new();
    let put = |encoded: &mut Vec<u8>, id: u32| {
        if width == 2 {
            encoded.extend_from_slice(&(id as u16).to_le_bytes());
        } else {
            encoded.extend_from_slice(&id.to_le_bytes());
        }
    };
    let mut failure = None;
    for batch in rx {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        text_bytes += batch.iter().map(|d| d.len() as u64).sum::<u64>();
        for ids in tokenizer.encode_batch_owned(batch)? {
            let start = tokens;
            encoded.clear();
            for &id in &ids {
                put(&mut encoded, id);
            }
            tokens += ids.len() as u64;
            docs.write_all(&start.to_le_bytes())?;
            docs.write_all(&tokens.to_le_bytes())?;
            if let Some(eos) = tokenizer.eos {
                put(&mut encoded, eos);
                tokens += 1;
            }
            out.write_all(&encoded)?;
            documents += 1;
            progress.documents.fetch_add(1, Relaxed);
            progress
                .tokens
                .fetch_add(ids.len() as u64 + tokenizer.eos.is_some() as u64, Relaxed);
        }
    }
    let skipped = match reader.join() {
        Ok(r) => r?,
        Err(_) => bail!("the reading thread panicked"),
    };
    if let Some(e) = failure {
        return Err(e);
    }

    // The boundary table after the tokens, then the header.
    let docs_at = HEADER as u64 + tokens * width as u64;
    docs.flush()?;
    drop(docs);
    let mut side = std::fs::File::open(docs_tmp)?;
    std::io::copy(&mut side, &mut out)?;
    let mut file = out.into_inner().map_err(|e| e.into_error())?;
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(width as u32).to_le_bytes());
    header.extend_from_slice(&tokens.to_le_bytes());
    header.extend_from_slice(&documents.to_le_bytes());
    header.extend_from_slice(&docs_at.to_le_bytes());
    header.extend_from_slice(&skipped.total().to_le_bytes());
    header.extend_from_slice(&text_bytes.to_le_bytes());
    header.resize(HEADER, 0);
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    Ok(ShardInfo {
        width,
        tokens,
        documents,
        skipped: skipped.total(),
        text_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer of `size` words `w0..`, the end-of-document token first.
    fn word_tokenizer(dir: &Path, size: usize) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        vocab.insert(crate::tokenizer::EOS_TOKEN.into(), 0.into());
        vocab.insert("<unk>".into(), 1.into());
        for i in 2..size {
            vocab.insert(format!("w{i}"), i.into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": crate::tokenizer::EOS_TOKEN, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        let path = dir.join(format!("words-{size}.json"));
        std::fs::write(&path, json.to_string()).unwrap();
        Tokenizer::load(&path).unwrap()
    }

    /// [`build`] of a JSON-lines source with the `text` field.
    fn build_jsonl(source: &Path, tok: &Tokenizer, path: &Path) -> Result<ShardInfo> {
        build(
            source,
            Format::JsonLines,
            "text",
            tok,
            path,
            &Progress::default(),
        )
    }

    fn gzip_lines(path: &Path, docs: &[String]) {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for d in docs {
            writeln!(e, "{}", serde_json::json!({ "text": d })).unwrap();
        }
        std::fs::write(path, e.finish().unwrap()).unwrap();
    }

    #[test]
    fn shards_hold_every_document_in_16_or_32_bit_tokens() {
        let dir = tempfile::tempdir().unwrap();
        for (size, width) in [(1000, 2), (70_000, 4)] {
            let tok = word_tokenizer(dir.path(), size);
            let docs: Vec<String> = (0..50)
                .map(|d| {
                    (0..(d % 7 + 1))
                        .map(|i| format!("w{}", 2 + (d * 977 + i * 31) % (size - 2)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            let source = dir.path().join(format!("docs-{size}.jsonl.gz"));
            gzip_lines(&source, &docs);
            let path = shard_path(&dir.path().join("shards"), &source, "k");
            let info = build_jsonl(&source, &tok, &path).unwrap();
            assert_eq!(info.width, width);
            assert_eq!(info.documents, 50);
            let shard = Shard::open(&path).unwrap().expect("a complete shard");
            assert_eq!(shard.info, info);
            let mut tokens = Tokens::from_vec(vec![7; 10]);
            let offset = tokens.push_shard(shard);
            assert_eq!(offset, 10);
            let spans = Shard::open(&path).unwrap().unwrap().documents(offset);
            for (doc, span) in docs.iter().zip(&spans) {
                assert_eq!(tokens.span(span.start, span.end), tok.encode(doc).unwrap());
                // The end-of-document token follows each document.
                assert_eq!(tokens.span(span.end, span.end + 1), vec![0]);
            }
            // A span across the in-memory part and the shard.
            assert_eq!(tokens.span(8, 11)[..2], [7, 7]);
        }
    }

    #[test]
    fn two_builders_of_one_shard_both_succeed_and_a_failed_build_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tok = word_tokenizer(dir.path(), 500);
        let docs: Vec<String> = (0..2000)
            .map(|i| format!("w{} w{}", 2 + i % 400, 3 + i % 300))
            .collect();
        let source = dir.path().join("docs.jsonl.gz");
        gzip_lines(&source, &docs);
        let shards = dir.path().join("shards");
        let path = shard_path(&shards, &source, "k");
        std::thread::scope(|s| {
            let a = s.spawn(|| build_jsonl(&source, &tok, &path));
            let b = s.spawn(|| build_jsonl(&source, &tok, &path));
            let (a, b) = (a.join().unwrap().unwrap(), b.join().unwrap().unwrap());
            assert_eq!(a, b);
        });
        assert_eq!(Shard::open(&path).unwrap().unwrap().info.documents, 2000);
        let names: Vec<_> = std::fs::read_dir(&shards)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");

        // A truncated stream: an error naming the file, and no shard or temporary file.
        let bytes = std::fs::read(&source).unwrap();
        let cut = dir.path().join("cut.jsonl.gz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let cut_path = shard_path(&shards, &cut, "k");
        let err = build_jsonl(&cut, &tok, &cut_path).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("cut.jsonl.gz") && err.contains("gzip"),
            "{err}"
        );
        let names: Vec<_> = std::fs::read_dir(&shards)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A shard cut short on disk is not taken for a shard.
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&cut_path, &whole[..whole.len() - 8]).unwrap();
        assert!(Shard::open(&cut_path).unwrap().is_none());
    }
}
