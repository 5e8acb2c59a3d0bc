//! TensorBoard event files: every metrics row as scalar summaries in
//! `<run>/tensorboard/events.out.tfevents.<seconds>.<host>.<pid>.sipt`, which `tensorboard
//! --logdir <run>` (or any reader of TensorBoard's format) shows.
//!
//! The format is TensorFlow's: a file of TFRecords (length, masked CRC-32C of the length, the
//! bytes, their masked CRC-32C) each holding one `Event` protocol buffer; the first event names
//! the file version, the next ones carry `Summary` values. The messages are declared here with
//! the field numbers of TensorFlow's `event.proto` and `summary.proto` (only the fields sipt
//! writes) and encoded by `prost`.
//!
//! A resumed run opens a new file whose first event after the version is a `SessionLog` START
//! at the first step it logs: TensorBoard then drops the earlier files' events from that step
//! on, which the resumed run logs again, so every step is shown once.

use crate::metrics::{Row, Sink};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder of a run's event files.
pub const DIR: &str = "tensorboard";

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, tag = "2")]
    simple_value: f32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// TFRecord's checksum: CRC-32C, rotated and offset.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord holding `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A TensorBoard event file of one process of a run.
pub struct EventFile {
    file: std::fs::File,
    path: PathBuf,
}

impl EventFile {
    /// A new event file under `<run_dir>/tensorboard/`; `resume_step`: the step a resumed run
    /// continues after (earlier files' later events are then dropped by readers).
    pub fn create(run_dir: &Path, resume_step: Option<u64>) -> Result<EventFile> {
        let dir = run_dir.join(DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        // Readers order a folder's files by name, that is by this timestamp: a resumed run's
        // file must sort after the earlier ones, even within the same second.
        let latest = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("events.out.tfevents.")?
                    .split('.')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let stamp = (now() as u64).max(latest.map_or(0, |t| t + 1));
        let path = dir.join(format!(
            "events.out.tfevents.{stamp:010}.{host}.{}.sipt",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut events = EventFile { file, path };
        events.write(Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        if let Some(step) = resume_step {
            // Readers drop the events at and after a START's step: the steps logged again.
            events.write(Event {
                wall_time: now(),
                step: step as i64 + 1,
                what: Some(What::SessionLog(SessionLog { status: 1 })),
            })?;
        }
        Ok(events)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: Event) -> Result<()> {
        let bytes = prost::Message::encode_to_vec(&event);
        self.file
            .write_all(&record(&bytes))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

impl Sink for EventFile {
    fn log(&mut self, row: &Row) -> Result<()> {
        let value = row
            .values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| Value {
                tag: tag.clone(),
                simple_value: *v as f32,
            })
            .collect();
        self.write(Event {
            wall_time: now(),
            step: row.step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    fn finish(&mut self, _success: bool) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of a file, decoded record by record with their checksums checked.
    fn read(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(<Event as prost::Message>::decode(data).unwrap());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn crc32c_matches_its_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn rows_become_scalar_events_after_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = EventFile::create(dir.path(), Some(4)).unwrap();
        let mut row = Row::new(5);
        row.set("loss/dpo", 0.25).set("nan", f64::NAN);
        f.log(&row).unwrap();
        f.finish(true).unwrap();
        let events = read(f.path());
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(
            events[1].what,
            Some(What::SessionLog(SessionLog { status: 1 }))
        );
        assert_eq!(events[1].step, 5, "the first step the resumed run logs");
        let Some(What::Summary(s)) = &events[2].what else {
            panic!("{:?}", events[2])
        };
        assert_eq!(events[2].step, 5);
        assert_eq!(s.value.len(), 1, "non-finite values are left out");
        assert_eq!(
            (s.value[0].tag.as_str(), s.value[0].simple_value),
            ("loss/dpo", 0.25)
        );
    }
}
