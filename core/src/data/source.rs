//! Documents streamed out of the files researchers' corpora come in, one at a time, never a
//! whole file in memory (but for a plain-text file, which is one document): JSON Lines (also
//! gzip- or zstd-compressed, as Dolma and RedPajama ship them), Parquet with a text column (as
//! FineWeb and DCLM ship them), plain text and Markdown.
//!
//! Corruption (a truncated stream, a line that is not JSON, a Parquet file that does not parse,
//! a missing column or field) is an error naming the file and the line or row. A document that
//! is not UTF-8 text, or a null text, is skipped and counted: one bad document in a crawl should
//! not stop a run, and the count is reported.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The formats of a file, from `data.format` and the file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The whole file is one document.
    Text,
    /// One JSON object per line; the document is one string field of it.
    JsonLines,
    /// A Parquet file; each row's string column is a document.
    Parquet,
}

/// A file's extension for its contents: `x.jsonl.gz` → `jsonl`, with the compression if any
/// (gzip and zstd are read through).
pub fn kind_of(path: &Path) -> (Option<&str>, Option<&'static str>) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (inner, compression) = if let Some(rest) = name.strip_suffix(".gz") {
        (rest, Some("gzip"))
    } else if let Some(rest) = name.strip_suffix(".zst") {
        (rest, Some("zstd"))
    } else {
        (name, None)
    };
    (
        Path::new(inner).extension().and_then(|e| e.to_str()),
        compression,
    )
}

/// Whether a folder walk takes this file as training data.
pub fn is_corpus_file(path: &Path) -> bool {
    matches!(
        kind_of(path),
        (Some("txt" | "md" | "jsonl" | "json"), _) | (Some("parquet"), None)
    )
}

impl Format {
    /// The format of `file` under `data.format` (`auto` goes by the file's name).
    pub fn of(file: &Path, format: &str) -> Format {
        match format {
            "jsonl" => Format::JsonLines,
            "text" => Format::Text,
            "parquet" => Format::Parquet,
            _ => match kind_of(file).0 {
                Some("jsonl" | "json") => Format::JsonLines,
                Some("parquet") => Format::Parquet,
                _ => Format::Text,
            },
        }
    }
}

/// What reading a file skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Documents that are not valid UTF-8.
    pub not_utf8: u64,
    /// Null texts (Parquet) and empty or blank documents.
    pub empty: u64,
}

impl Skipped {
    pub fn total(&self) -> u64 {
        self.not_utf8 + self.empty
    }
}

/// Report a skipped document (the first few of a file by name and place, then only counts).
fn warn_skip(file: &Path, place: &str, why: &str, count: u64) {
    if count <= 3 {
        tracing::warn!("{}{place}: skipping a document: {why}", file.display());
    }
}

/// A reader that counts the bytes read through it (the progress of a build).
struct Counting<R> {
    inner: R,
    count: Option<Arc<AtomicU64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = &self.count {
            c.fetch_add(n as u64, Relaxed);
        }
        Ok(n)
    }
}

/// The file, decompressed as its name says; the bytes read from the disk counted into `count`.
fn open(file: &Path, count: Option<&Arc<AtomicU64>>) -> Result<Box<dyn Read>> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let f = Counting {
        inner: f,
        count: count.cloned(),
    };
    Ok(match kind_of(file).1 {
        None => Box::new(f),
        Some("gzip") => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f))),
        Some(_) => Box::new(
            zstd::stream::read::Decoder::new(f)
                .with_context(|| format!("cannot read {} as zstd", file.display()))?,
        ),
    })
}

fn compression_name(file: &Path) -> &'static str {
    kind_of(file).1.unwrap_or("plain")
}

/// A file's whole contents, decompressed as its name says.
fn read_all(file: &Path, count: Option<&Arc<AtomicU64>>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(file, count)?
        .read_to_end(&mut bytes)
        .with_context(|| {
            format!(
                "cannot read {} as {} text (truncated or corrupt?)",
                file.display(),
                compression_name(file)
            )
        })?;
    Ok(bytes)
}

/// A file's whole text, decompressed when it ends in `.gz` or `.zst`.
pub fn read_text(file: &Path) -> Result<String> {
    String::from_utf8(read_all(file, None)?).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Call `emit` with every document of `file`, in order; returns what was skipped. The bytes
/// read from the disk are counted into `count` when given (Parquet files are not counted
/// while read).
pub fn for_each_document(
    file: &Path,
    format: Format,
    field: &str,
    count: Option<&Arc<AtomicU64>>,
    emit: &mut dyn FnMut(String) -> Result<()>,
) -> Result<Skipped> {
    match format {
        Format::Text => text_document(file, count, emit),
        Format::JsonLines => json_lines(file, field, count, emit),
        Format::Parquet => parquet_rows(file, field, emit),
    }
}

fn text_document(
    file: &Path,
    count: Option<&Arc<AtomicU64>>,
    emit: &mut dyn FnMut(String) -> Result<()>,
) -> Result<Skipped> {
    let mut skipped = Skipped::default();
    match String::from_utf8(read_all(file, count)?) {
        Ok(text) if text.trim().is_empty() => skipped.empty += 1,
        Ok(text) => emit(text)?,
        Err(e) => {
            skipped.not_utf8 += 1;
            warn_skip(
                file,
                "",
                &format!(
                    "not UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
                1,
            );
        }
    }
    Ok(skipped)
}

fn json_lines(
    file: &Path,
    field: &str,
    count: Option<&Arc<AtomicU64>>,
    emit: &mut dyn FnMut(String) -> Result<()>,
) -> Result<Skipped> {
    let mut reader = BufReader::with_capacity(1 << 20, open(file, count)?);
    let mut line = Vec::new();
    let mut skipped = Skipped::default();
    for number in 1.. {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).with_context(|| {
            format!(
                "{}:{number}: cannot read the {} stream (truncated or corrupt?)",
                file.display(),
                compression_name(file)
            )
        })?;
        if n == 0 {
            break;
        }
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t,
            Err(e) => {
                skipped.not_utf8 += 1;
                warn_skip(
                    file,
                    &format!(":{number}"),
                    &format!("not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1),
                    skipped.not_utf8,
                );
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text).with_context(|| {
            format!(
                "{}:{number}: not a JSON object (a truncated file?)",
                file.display()
            )
        })?;
        match value.get(field) {
            Some(serde_json::Value::String(doc)) => {
                if doc.trim().is_empty() {
                    skipped.empty += 1;
                } else {
                    emit(doc.clone())?;
                }
            }
            Some(serde_json::Value::Null) => skipped.empty += 1,
            _ => bail!(
                "{}:{number}: no string field '{field}' (set data.text_field)",
                file.display()
            ),
        }
    }
    Ok(skipped)
}

/// Rows are read this many at a time from each row group.
const PARQUET_BATCH: usize = 1024;

fn parquet_rows(
    file: &Path,
    column: &str,
    emit: &mut dyn FnMut(String) -> Result<()>,
) -> Result<Skipped> {
    use parquet::basic::Type as Physical;
    use parquet::column::reader::ColumnReader;
    use parquet::data_type::ByteArray;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let reader = SerializedFileReader::new(f)
        .with_context(|| format!("{}: not a readable Parquet file", file.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let index = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().parts() == [column.to_string()])
        .with_context(|| {
            let names: Vec<String> = (0..schema.num_columns())
                .map(|i| schema.column(i).path().string())
                .collect();
            format!(
                "{}: no column '{column}' (it has: {}; set data.text_field)",
                file.display(),
                names.join(", ")
            )
        })?;
    let descr = schema.column(index);
    if descr.physical_type() != Physical::BYTE_ARRAY {
        bail!(
            "{}: column '{column}' holds {:?} values, expected strings",
            file.display(),
            descr.physical_type()
        );
    }
    let max_def = descr.max_def_level();
    let mut skipped = Skipped::default();
    let mut row = 0u64;
    for g in 0..reader.num_row_groups() {
        let group = reader
            .get_row_group(g)
            .with_context(|| format!("{}: row group {g} is unreadable", file.display()))?;
        let mut values: Vec<ByteArray> = Vec::with_capacity(PARQUET_BATCH);
        let mut defs: Vec<i16> = Vec::with_capacity(PARQUET_BATCH);
        let mut col = match group
            .get_column_reader(index)
            .with_context(|| format!("{}: row group {g} is unreadable", file.display()))?
        {
            ColumnReader::ByteArrayColumnReader(r) => r,
            _ => bail!(
                "{}: column '{column}' is not a string column",
                file.display()
            ),
        };
        loop {
            values.clear();
            defs.clear();
            let (records, _, _) = col
                .read_records(
                    PARQUET_BATCH,
                    (max_def > 0).then_some(&mut defs),
                    None,
                    &mut values,
                )
                .with_context(|| {
                    format!(
                        "{}: row group {g} near row {} is corrupt",
                        file.display(),
                        row + 1
                    )
                })?;
            if records == 0 {
                break;
            }
            let mut next_value = values.drain(..);
            for r in 0..records {
                row += 1;
                let present = max_def == 0 || defs.get(r).copied() == Some(max_def);
                if !present {
                    skipped.empty += 1;
                    continue;
                }
                let Some(bytes) = next_value.next() else {
                    bail!("{}: row {row}: missing value", file.display());
                };
                match String::from_utf8(bytes.data().to_vec()) {
                    Ok(doc) if doc.trim().is_empty() => skipped.empty += 1,
                    Ok(doc) => emit(doc)?,
                    Err(e) => {
                        skipped.not_utf8 += 1;
                        warn_skip(
                            file,
                            &format!(" row {row}"),
                            &format!(
                                "not UTF-8 (invalid byte at offset {})",
                                e.utf8_error().valid_up_to()
                            ),
                            skipped.not_utf8,
                        );
                    }
                }
            }
        }
    }
    Ok(skipped)
}
