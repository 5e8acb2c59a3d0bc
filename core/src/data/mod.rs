//! Documents in, token batches out: reading corpora (files, folders, globs; text, JSON Lines
//! and Parquet, compressed or not) as streams, tokenizing them into memory-mapped token shards
//! cached on disk, a deterministic train/validation split, shuffled next-token windows with a
//! resumable position, and the prefix/suffix cutter of SIP.

mod prepare;
pub mod shards;
pub mod source;

pub use prepare::{
    prepare_corpus, prepare_data, prepare_tokenizer, shard_dir, tokenizer_source, train_files,
    Prepared,
};
pub use shards::Tokens;
pub use source::{kind_of, read_text, Format};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sipt_experiment::rng::SplitMix;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Expand files, folders (recursively: .txt, .md, .jsonl, .json, each also gzip- or
/// zstd-compressed: .jsonl.gz, .jsonl.zst, ...; and .parquet) and globs, sorted, deduplicated.
pub fn list_files(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for pattern in patterns {
        let path = Path::new(pattern);
        if path.is_dir() {
            walk(path, &mut files)?;
        } else if path.is_file() {
            files.push(path.to_path_buf());
        } else if pattern.contains(['*', '?', '[']) {
            let matches = glob::glob(pattern)
                .with_context(|| format!("bad glob pattern '{pattern}'"))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect::<Vec<_>>();
            if matches.is_empty() {
                bail!("no files match '{pattern}'");
            }
            files.extend(matches);
        } else {
            bail!("no such file or folder: {pattern}");
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if source::is_corpus_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Read documents into memory (small corpora and held-out sets; training data is streamed
/// into shards instead): a text file is one document, a JSON-lines file holds one per line, a
/// Parquet file one per row. Stops after about `max_bytes` of text.
pub fn read_documents_up_to(
    files: &[PathBuf],
    format: &str,
    field: &str,
    max_bytes: usize,
) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    let mut bytes = 0;
    for file in files {
        if bytes >= max_bytes {
            break;
        }
        source::for_each_document(file, Format::of(file, format), field, None, &mut |doc| {
            if bytes < max_bytes {
                bytes += doc.len();
                docs.push(doc);
            }
            Ok(())
        })?;
    }
    Ok(docs)
}

/// Every document of `files` in memory (see [`read_documents_up_to`]).
pub fn read_documents(files: &[PathBuf], format: &str, field: &str) -> Result<Vec<String>> {
    read_documents_up_to(files, format, field, usize::MAX)
}

/// A contiguous run of one document's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub start: usize,
    pub end: usize,
}

impl Segment {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A tokenized corpus: all tokens (mapped from the shards), and the segments of each split.
pub struct Corpus {
    pub tokens: Tokens,
    pub train: Vec<Segment>,
    pub validation: Vec<Segment>,
}

/// Blocks this long are assigned to train or validation as a whole.
const SPLIT_BLOCK: usize = 2048;

impl Corpus {
    /// Split documents into train and validation by blocks, deterministically from `seed`.
    /// A separate validation source, when given, is used whole instead.
    pub fn split(tokens: Tokens, docs: &[Segment], validation_fraction: f64, seed: u64) -> Corpus {
        let mut train = Vec::new();
        let mut validation = Vec::new();
        let threshold = (validation_fraction * u32::MAX as f64) as u64;
        for (d, doc) in docs.iter().enumerate() {
            let mut start = doc.start;
            let mut block = 0u64;
            while start < doc.end {
                let end = (start + SPLIT_BLOCK).min(doc.end);
                let draw = SplitMix::new(seed ^ 0x5eed_5711 ^ ((d as u64) << 20) ^ block)
                    .next_u64()
                    & u32::MAX as u64;
                let seg = Segment { start, end };
                if draw < threshold {
                    validation.push(seg);
                } else {
                    train.push(seg);
                }
                start = end;
                block += 1;
            }
        }
        merge_adjacent(&mut train);
        merge_adjacent(&mut validation);
        Corpus {
            tokens,
            train,
            validation,
        }
    }

    pub fn train_tokens(&self) -> usize {
        self.train.iter().map(Segment::len).sum()
    }

    pub fn validation_tokens(&self) -> usize {
        self.validation.iter().map(Segment::len).sum()
    }
}

fn merge_adjacent(segments: &mut Vec<Segment>) {
    let mut merged: Vec<Segment> = Vec::with_capacity(segments.len());
    for s in segments.drain(..) {
        match merged.last_mut() {
            Some(last) if last.end == s.start => last.end = s.end,
            _ => merged.push(s),
        }
    }
    *segments = merged;
}

/// Where a [`Windows`] stream is; saved in checkpoints so a resumed run sees the same data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct StreamPosition {
    pub epoch: u64,
    pub index: u64,
}

/// Shuffled windows of `len` tokens from segments, for next-token training: every epoch
/// visits every window once, in an order drawn from the seed and the epoch. Nothing per window
/// is kept in memory: the order is a keyed permutation of the window indices, and a window's
/// start is found from its index by the segments' cumulative window counts.
pub struct Windows {
    segments: Vec<Segment>,
    /// Windows in segments `..=i`.
    cumulative: Vec<u64>,
    count: u64,
    len: usize,
    seed: u64,
    shuffle: bool,
    order: Permutation,
    pub position: StreamPosition,
}

impl Windows {
    pub fn new(segments: &[Segment], len: usize, seed: u64, shuffle: bool) -> Result<Windows> {
        let step = len.saturating_sub(1).max(1); // consecutive windows share one token: target of one, input of the next
        let mut kept = Vec::new();
        let mut cumulative = Vec::new();
        let mut count = 0u64;
        for s in segments {
            if s.len() >= len {
                count += ((s.len() - len) / step + 1) as u64;
                kept.push(*s);
                cumulative.push(count);
            }
        }
        if count == 0 {
            bail!(
                "the data holds no window of {len} tokens; use more data or a smaller data.seq_len"
            );
        }
        let mut w = Windows {
            segments: kept,
            cumulative,
            count,
            len,
            seed,
            shuffle,
            order: Permutation::new(count, 0),
            position: StreamPosition::default(),
        };
        w.reorder();
        Ok(w)
    }

    pub fn count(&self) -> usize {
        self.count as usize
    }

    fn reorder(&mut self) {
        self.order = Permutation::new(
            self.count,
            self.seed ^ self.position.epoch.wrapping_mul(0x9e37_79b9),
        );
    }

    /// The start of window `i` (in segment order).
    fn start_of(&self, i: u64) -> usize {
        let s = self.cumulative.partition_point(|&c| c <= i);
        let before = if s == 0 { 0 } else { self.cumulative[s - 1] };
        self.segments[s].start + (i - before) as usize * self.len.saturating_sub(1).max(1)
    }

    /// Jump to a saved position.
    pub fn seek(&mut self, position: StreamPosition) {
        let epoch_changed = position.epoch != self.position.epoch;
        self.position = position;
        if epoch_changed {
            self.reorder();
        }
    }

    /// The next window's start offset.
    pub fn next_start(&mut self) -> usize {
        if self.position.index >= self.count {
            self.position = StreamPosition {
                epoch: self.position.epoch + 1,
                index: 0,
            };
            self.reorder();
        }
        let i = if self.shuffle {
            self.order.at(self.position.index)
        } else {
            self.position.index
        };
        self.position.index += 1;
        self.start_of(i)
    }

    pub fn window_len(&self) -> usize {
        self.len
    }
}

/// A keyed permutation of `0..n`, evaluated one index at a time: a four-round Feistel network
/// on the smallest even number of bits that covers `n`, walking the cycle until the value
/// falls inside `0..n` (fewer than four steps on average, since the domain is under 4n).
struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    fn new(n: u64, key: u64) -> Permutation {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let mut rng = SplitMix::new(key ^ 0x7065_726d_7574_6531);
        Permutation {
            n,
            half_bits,
            keys: [
                rng.next_u64(),
                rng.next_u64(),
                rng.next_u64(),
                rng.next_u64(),
            ],
        }
    }

    fn round(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = SplitMix::new(right ^ k).next_u64() & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }

    fn at(&self, i: u64) -> u64 {
        let mut x = self.round(i);
        while x >= self.n {
            x = self.round(x);
        }
        x
    }
}

/// Cuts a random point of a random document into a prefix and a suffix of `suffix` tokens.
pub struct Cutter {
    segments: Vec<Segment>,
    cumulative: Vec<usize>,
    prefix_min: usize,
    prefix_max: usize,
    suffix: usize,
}

/// One cut: context and the document's true continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
}

impl Cutter {
    pub fn new(
        segments: &[Segment],
        prefix_min: usize,
        prefix_max: usize,
        suffix: usize,
    ) -> Result<Cutter> {
        let prefix_min = prefix_min.max(1);
        let usable: Vec<Segment> = segments
            .iter()
            .copied()
            .filter(|s| s.len() >= prefix_min + suffix)
            .collect();
        if usable.is_empty() {
            bail!(
                "no document is long enough for a prefix of {prefix_min} and a suffix of {suffix} tokens"
            );
        }
        let mut cumulative = Vec::with_capacity(usable.len());
        let mut total = 0;
        for s in &usable {
            total += s.len() - prefix_min - suffix + 1;
            cumulative.push(total);
        }
        Ok(Cutter {
            segments: usable,
            cumulative,
            prefix_min,
            prefix_max: prefix_max.max(prefix_min),
            suffix,
        })
    }

    /// A cut drawn uniformly over all valid cut points.
    pub fn cut(&self, tokens: &Tokens, rng: &mut SplitMix) -> Cut {
        let total = *self.cumulative.last().unwrap_or(&1);
        let draw = (rng.next_u64() % total as u64) as usize;
        let i = self.cumulative.partition_point(|&c| c <= draw);
        let before = if i == 0 { 0 } else { self.cumulative[i - 1] };
        let s = self.segments[i];
        let cut = s.start + self.prefix_min + (draw - before);
        let prefix_start = cut.saturating_sub(self.prefix_max).max(s.start);
        Cut {
            prefix: tokens.span(prefix_start, cut),
            suffix: tokens.span(cut, cut + self.suffix),
        }
    }
}

/// A batch of windows as a `(B, len)` tensor.
pub fn window_batch(tokens: &Tokens, starts: &[usize], len: usize, device: Device) -> Tensor {
    let mut ids = Vec::with_capacity(starts.len() * len);
    let mut window = Vec::with_capacity(len);
    for &s in starts {
        window.clear();
        tokens.extend(s, s + len, &mut window);
        ids.extend(window.iter().map(|&t| t as i64));
    }
    Tensor::from_slice(&ids)
        .view([starts.len() as i64, len as i64])
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_start_once_per_epoch_and_resume() {
        let segs = [
            Segment { start: 0, end: 100 },
            Segment {
                start: 120,
                end: 150,
            },
        ];
        let mut w = Windows::new(&segs, 11, 7, true).unwrap();
        let n = w.count();
        let first: Vec<usize> = (0..n).map(|_| w.next_start()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), n);
        assert!(first
            .iter()
            .all(|&s| s + 11 <= 100 || (120..=139).contains(&s)));
        // Seeking reproduces the stream.
        let saved = w.position;
        let next: Vec<usize> = (0..5).map(|_| w.next_start()).collect();
        let mut again = Windows::new(&segs, 11, 7, true).unwrap();
        again.seek(saved);
        assert_eq!((0..5).map(|_| again.next_start()).collect::<Vec<_>>(), next);
    }

    #[test]
    fn the_window_order_is_a_permutation_of_every_size() {
        for n in [1u64, 2, 3, 4, 5, 17, 1000, 4097] {
            for key in [0, 1, 99] {
                let p = Permutation::new(n, key);
                let mut seen: Vec<u64> = (0..n).map(|i| p.at(i)).collect();
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}, key = {key}");
            }
        }
        // Different epochs, different orders.
        let (a, b) = (Permutation::new(1000, 1), Permutation::new(1000, 2));
        assert!((0..1000).filter(|&i| a.at(i) != b.at(i)).count() > 900);
    }

    #[test]
    fn cuts_stay_inside_documents() {
        let tokens = Tokens::from_vec((0..1000).collect());
        let segs = [
            Segment { start: 0, end: 300 },
            Segment {
                start: 300,
                end: 320,
            },
            Segment {
                start: 400,
                end: 1000,
            },
        ];
        let cutter = Cutter::new(&segs, 8, 64, 16).unwrap();
        let mut rng = SplitMix::new(1);
        for _ in 0..500 {
            let c = cutter.cut(&tokens, &mut rng);
            assert_eq!(c.suffix.len(), 16);
            assert!((8..=64).contains(&c.prefix.len()));
            let first = c.prefix[0] as usize;
            let last = *c.suffix.last().unwrap() as usize;
            let doc = segs
                .iter()
                .find(|s| s.start <= first && first < s.end)
                .unwrap();
            assert!(last < doc.end, "cut crosses a document boundary");
            assert_eq!(*c.prefix.last().unwrap() + 1, c.suffix[0]);
        }
    }

    #[test]
    fn split_is_deterministic_and_roughly_proportional() {
        let docs: Vec<Segment> = (0..50)
            .map(|i| Segment {
                start: i * 10_000,
                end: (i + 1) * 10_000,
            })
            .collect();
        let a = Corpus::split(Tokens::from_vec(vec![0; 500_000]), &docs, 0.1, 3);
        let b = Corpus::split(Tokens::from_vec(vec![0; 500_000]), &docs, 0.1, 3);
        assert_eq!(a.validation, b.validation);
        let share = a.validation_tokens() as f64 / 500_000.0;
        assert!((0.04..0.2).contains(&share), "{share}");
        assert_eq!(a.train_tokens() + a.validation_tokens(), 500_000);
    }

    #[test]
    fn reads_text_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello world").unwrap();
        std::fs::write(
            dir.path().join("b.jsonl"),
            "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("c.bin"), "ignored").unwrap();
        let files = list_files(&[dir.path().display().to_string()]).unwrap();
        assert_eq!(files.len(), 2);
        let docs = read_documents(&files, "auto", "text").unwrap();
        assert_eq!(docs, vec!["hello world", "one", "two"]);
        std::fs::write(dir.path().join("d.jsonl"), "{\"body\": 1}\n").unwrap();
        let err = read_documents(&[dir.path().join("d.jsonl")], "auto", "text").unwrap_err();
        assert!(err.to_string().contains("d.jsonl:1"), "{err}");
        assert!(list_files(&["/no/such/*.txt".into()]).is_err());
    }

    #[test]
    fn reads_gzip_and_zstd_compressed_shards() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let lines = "{\"text\": \"one\"}\n{\"text\": \"two\"}\n";
        // Two gzip members in one file, as concatenated shards are.
        let mut gz = Vec::new();
        for part in lines.split_inclusive('\n') {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part.as_bytes()).unwrap();
            gz.extend(e.finish().unwrap());
        }
        std::fs::write(dir.path().join("a.jsonl.gz"), gz).unwrap();
        let zst = zstd::stream::encode_all("a whole document".as_bytes(), 3).unwrap();
        std::fs::write(dir.path().join("b.txt.zst"), zst).unwrap();
        std::fs::write(dir.path().join("c.bin.gz"), "ignored").unwrap();
        let files = list_files(&[dir.path().display().to_string()]).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        let docs = read_documents(&files, "auto", "text").unwrap();
        assert_eq!(docs, vec!["one", "two", "a whole document"]);
        // A file that is not what its name says: an error naming it.
        std::fs::write(dir.path().join("d.jsonl.zst"), "not zstd").unwrap();
        let err = read_documents(&[dir.path().join("d.jsonl.zst")], "auto", "text").unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("d.jsonl.zst") && err.contains("zstd"), "{err}");
    }
}
