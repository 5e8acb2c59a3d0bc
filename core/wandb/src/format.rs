//! Reading `.wandb` run files back: the records sipt writes, decoded, and every other
//! record type reported by its field number.
//!
//! Used for resuming (to find where the previous segment of a run stopped) and by the
//! tests; also handy to inspect a run file, whoever wrote it (the official SDK's files
//! read too).

use std::path::Path;

use crate::log::LogReader;
use crate::proto::{field, fields, Value};
use crate::Error;

/// One `key`/`value_json` pair of a history row, a summary or a config update.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The key: `[key]`, or the parts of `nested_key` when the writer used that form.
    pub key: Vec<String>,
    /// The value as JSON text.
    pub value_json: String,
}

impl Item {
    /// The key parts joined with `.`.
    pub fn key_string(&self) -> String {
        self.key.join(".")
    }

    /// The value parsed as JSON; `NaN`, `Infinity` and `-Infinity`, which JSON lacks, come
    /// back as strings.
    pub fn value(&self) -> Result<serde_json::Value, Error> {
        match self.value_json.as_str() {
            "NaN" | "Infinity" | "-Infinity" => {
                Ok(serde_json::Value::String(self.value_json.clone()))
            }
            text => serde_json::from_str(text)
                .map_err(|e| Error::Format(format!("value_json {text:?} of {:?}: {e}", self.key))),
        }
    }

    /// The value as a number, if it is one (including `NaN` and the infinities).
    pub fn as_f64(&self) -> Option<f64> {
        match self.value_json.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            text => serde_json::from_str::<f64>(text).ok(),
        }
    }
}

/// The fields of a `RunRecord` that sipt writes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunInfo {
    pub run_id: String,
    pub entity: String,
    pub project: String,
    pub display_name: String,
    pub tags: Vec<String>,
    pub config: Vec<Item>,
    pub host: String,
    /// `start_time` as (seconds, nanos) since the Unix epoch.
    pub start_time: Option<(i64, i32)>,
    pub resume: bool,
}

/// The payload of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordKind {
    Header,
    Run(RunInfo),
    History {
        step: Option<i64>,
        items: Vec<Item>,
    },
    Summary {
        update: Vec<Item>,
    },
    Config {
        update: Vec<Item>,
    },
    Exit {
        exit_code: i32,
        runtime: i32,
    },
    /// A record type sipt does not write (telemetry, stats, environment, files, ...),
    /// by its field number in `Record`.
    Other(u32),
}

/// One decoded `Record`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's `num` (0 when absent).
    pub num: i64,
    pub kind: RecordKind,
}

/// Reads every record of a `.wandb` file. Any framing or decoding error is an error,
/// including a file that ends inside a record.
pub fn read_run_file(path: &Path) -> Result<Vec<Record>, Error> {
    let data =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut out = Vec::new();
    for raw in LogReader::new(&data)? {
        out.push(decode_record(&raw?)?);
    }
    Ok(out)
}

/// Reads the records of a file up to its end or its first damaged record, whichever
/// comes first (a run that crashed mid-write still yields what it wrote before).
pub(crate) fn read_prefix(data: &[u8]) -> Vec<Record> {
    let Ok(reader) = LogReader::new(data) else {
        return Vec::new();
    };
    reader
        .map_while(|r| r.ok())
        .map_while(|raw| decode_record(&raw).ok())
        .collect()
}

fn int(v: &Value) -> Result<i64, Error> {
    v.as_u64()
        .map(|u| u as i64)
        .ok_or_else(|| Error::Format("expected a varint field".into()))
}

fn sub<'a>(v: &Value<'a>) -> Result<Vec<(u32, Value<'a>)>, Error> {
    fields(
        v.as_bytes()
            .ok_or_else(|| Error::Format("expected an embedded message".into()))?,
    )
}

fn decode_item(v: &Value) -> Result<Item, Error> {
    let mut key = Vec::new();
    let mut nested = Vec::new();
    let mut value_json = String::new();
    for (f, v) in sub(v)? {
        match f {
            field::ITEM_KEY => key.push(v.as_str()?.to_string()),
            field::ITEM_NESTED_KEY => nested.push(v.as_str()?.to_string()),
            field::ITEM_VALUE_JSON => value_json = v.as_str()?.to_string(),
            _ => {}
        }
    }
    Ok(Item {
        key: if key.is_empty() { nested } else { key },
        value_json,
    })
}

fn decode_items(v: &Value) -> Result<Vec<Item>, Error> {
    sub(v)?
        .iter()
        .filter(|(f, _)| *f == field::ITEMS)
        .map(|(_, v)| decode_item(v))
        .collect()
}

fn decode_run(v: &Value) -> Result<RunInfo, Error> {
    let mut run = RunInfo::default();
    for (f, v) in sub(v)? {
        match f {
            field::RUN_ID => run.run_id = v.as_str()?.to_string(),
            field::RUN_ENTITY => run.entity = v.as_str()?.to_string(),
            field::RUN_PROJECT => run.project = v.as_str()?.to_string(),
            field::RUN_CONFIG => run.config = decode_items(&v)?,
            field::RUN_DISPLAY_NAME => run.display_name = v.as_str()?.to_string(),
            field::RUN_TAGS => run.tags.push(v.as_str()?.to_string()),
            field::RUN_HOST => run.host = v.as_str()?.to_string(),
            field::RUN_START_TIME => {
                let (mut s, mut n) = (0, 0);
                for (f, v) in sub(&v)? {
                    match f {
                        field::TIMESTAMP_SECONDS => s = int(&v)?,
                        field::TIMESTAMP_NANOS => n = int(&v)? as i32,
                        _ => {}
                    }
                }
                run.start_time = Some((s, n));
            }
            field::RUN_RESUME => run.resume = int(&v)? != 0,
            _ => {}
        }
    }
    Ok(run)
}

/// Decodes one `Record` message.
pub(crate) fn decode_record(raw: &[u8]) -> Result<Record, Error> {
    let mut num = 0;
    let mut kind = None;
    for (f, v) in fields(raw)? {
        let decoded = match f {
            field::RECORD_NUM => {
                num = int(&v)?;
                continue;
            }
            field::RECORD_HEADER => RecordKind::Header,
            field::RECORD_RUN => RecordKind::Run(decode_run(&v)?),
            field::RECORD_HISTORY => {
                let mut items = Vec::new();
                let mut step = None;
                for (f, v) in sub(&v)? {
                    match f {
                        field::ITEMS => items.push(decode_item(&v)?),
                        field::HISTORY_STEP => {
                            let mut n = 0;
                            for (f, v) in sub(&v)? {
                                if f == field::STEP_NUM {
                                    n = int(&v)?;
                                }
                            }
                            step = Some(n);
                        }
                        _ => {}
                    }
                }
                RecordKind::History { step, items }
            }
            field::RECORD_SUMMARY => RecordKind::Summary {
                update: decode_items(&v)?,
            },
            field::RECORD_CONFIG => RecordKind::Config {
                update: decode_items(&v)?,
            },
            field::RECORD_EXIT => {
                let (mut exit_code, mut runtime) = (0, 0);
                for (f, v) in sub(&v)? {
                    match f {
                        field::EXIT_CODE => exit_code = int(&v)? as i32,
                        field::EXIT_RUNTIME => runtime = int(&v)? as i32,
                        _ => {}
                    }
                }
                RecordKind::Exit { exit_code, runtime }
            }
            // control (16), uuid (19) and _info (200) accompany the record type.
            16 | 19 | 200 => continue,
            other => RecordKind::Other(other),
        };
        if kind.is_some() {
            return Err(Error::Format(
                "record with more than one record type".into(),
            ));
        }
        kind = Some(decoded);
    }
    let kind = kind.ok_or_else(|| Error::Format("record without a record type".into()))?;
    Ok(Record { num, kind })
}
