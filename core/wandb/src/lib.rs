//! Weights & Biases support for sipt, without a W&B SDK for Rust.
//!
//! sipt writes W&B's own *offline run* format and lets the official `wandb` CLI (PyPI
//! `wandb`) upload it: `wandb sync DIR` after (or during) training, or
//! `wandb beta sync --live DIR` to stream it while it grows ([`spawn_live_sync`]). The
//! CLI does authentication, retries and heartbeats.
//!
//! An offline run is a folder `<root>/wandb/offline-run-YYYYMMDD_HHMMSS-<id>/` (UTC time)
//! holding `run-<id>.wandb` plus the `files/` and `logs/` folders the CLI expects. The
//! `.wandb` file is a 7-byte header and a LevelDB-style log of protobuf `Record`s from
//! W&B's `wandb_internal.proto` (layout notes in `src/log.rs` and `src/proto.rs`).
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use sipt_wandb::{OfflineRun, RunOptions};
//!
//! let mut run = OfflineRun::create(
//!     "runs/exp1".as_ref(),
//!     RunOptions {
//!         project: "sipt".into(),
//!         run_id: sipt_wandb::new_run_id(),
//!         config: serde_json::json!({"lr": 3e-4, "model": {"layers": 12}}),
//!         ..Default::default()
//!     },
//! )?;
//! for step in 0..100u64 {
//!     let loss = 1.0 / (step + 1) as f64;
//!     run.log(step, &BTreeMap::from([("train/loss".to_string(), loss)]))?;
//! }
//! run.finish(0)?;
//! // Then: `wandb sync runs/exp1/wandb/offline-run-...` (run.dir()).
//! # Ok::<(), sipt_wandb::Error>(())
//! ```
//!
//! Every record is written to the file as soon as it is logged, so a run whose process
//! dies still syncs; without the exit record that [`OfflineRun::finish`] writes, W&B
//! marks it as crashed (exit code 1).
#![forbid(unsafe_code)]

pub mod format;
mod live;
mod log;
mod proto;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use live::{find_wandb_cli, spawn_live_sync, LiveSync};

use crate::format::RecordKind;
use crate::log::LogWriter;
use crate::proto::{field, Msg};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid W&B run options: {0}")]
    InvalidOptions(String),
    #[error("invalid W&B metric key {0:?}: keys must be non-empty and not one of _step, _runtime, _timestamp, _wandb")]
    InvalidKey(String),
    #[error("W&B step {step} does not follow step {previous}: the steps of one run must increase")]
    StepNotIncreasing { previous: u64, step: u64 },
    #[error("the W&B run was already finished")]
    Finished,
    #[error("malformed W&B run file: {0}")]
    Format(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// What a W&B run is called and configured with.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// W&B project (required).
    pub project: String,
    /// W&B entity (user or team); `None` uses the API key's default entity.
    pub entity: Option<String>,
    /// Run id: letters, digits, `-` and `_` ([`new_run_id`] makes one). Keep it with the
    /// training checkpoint to resume the same W&B run later.
    pub run_id: String,
    /// Display name shown in the W&B UI; `None` lets W&B pick one.
    pub display_name: Option<String>,
    pub tags: Vec<String>,
    /// The run's config: a JSON object (nested objects are fine) or `null` for none.
    pub config: serde_json::Value,
    /// Continue an existing W&B run with the same id instead of starting a new one: the
    /// run record carries W&B's `resume` flag, so `wandb sync` appends this segment's
    /// history to what the server already has.
    pub resume: bool,
}

/// An offline W&B run being written.
///
/// Dropping it without [`finish`](OfflineRun::finish) leaves a file without an exit
/// record, which W&B shows as crashed (exit code 1) once synced.
pub struct OfflineRun {
    dir: PathBuf,
    file_path: PathBuf,
    run_id: String,
    writer: LogWriter<File>,
    next_num: i64,
    started: Instant,
    /// `_runtime` already spent by earlier segments of a resumed run.
    runtime_offset: f64,
    /// The last step that earlier local segments of a resumed run logged.
    resumed_after_step: Option<u64>,
    last_step: Option<u64>,
    finished: bool,
}

const RESERVED_KEYS: [&str; 4] = ["_step", "_runtime", "_timestamp", "_wandb"];

impl OfflineRun {
    /// Creates `<root>/wandb/offline-run-YYYYMMDD_HHMMSS-<id>/run-<id>.wandb` (with
    /// `files/` and `logs/` beside it) and writes the header and run records (the run
    /// record carries the config).
    ///
    /// The time in the folder name is UTC. When a folder of that name already exists (a
    /// resumed segment started within the same second), the next free second is used.
    /// With `resume`, earlier offline segments of the same id under `<root>/wandb` are
    /// read so that `_runtime` continues from where they stopped.
    pub fn create(root: &Path, options: RunOptions) -> Result<OfflineRun, Error> {
        validate_run_id(&options.run_id)?;
        if options.project.trim().is_empty() {
            return Err(Error::InvalidOptions(
                "the project must not be empty".into(),
            ));
        }
        if options.project.contains('/')
            || options.entity.as_deref().is_some_and(|e| e.contains('/'))
        {
            return Err(Error::InvalidOptions(
                "project and entity must not contain '/'".into(),
            ));
        }
        let config = config_items(&options.config)?;
        let id = options.run_id.as_str();

        let wandb_dir = root.join("wandb");
        fs::create_dir_all(&wandb_dir)
            .map_err(|e| Error::io(format!("creating {}", wandb_dir.display()), e))?;
        let previous = if options.resume {
            previous_segments(&wandb_dir, id)?
        } else {
            Previous::default()
        };

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let dir = create_run_dir(&wandb_dir, now.as_secs(), id)?;
        for sub in ["files", "logs"] {
            let p = dir.join(sub);
            fs::create_dir(&p).map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
        }
        let file_path = dir.join(format!("run-{id}.wandb"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file_path)
            .map_err(|e| Error::io(format!("creating {}", file_path.display()), e))?;
        let writer = LogWriter::new(file)
            .map_err(|e| Error::io(format!("writing {}", file_path.display()), e))?;

        let mut run = OfflineRun {
            dir,
            file_path,
            run_id: id.to_string(),
            writer,
            next_num: 1,
            started: Instant::now(),
            runtime_offset: previous.runtime,
            resumed_after_step: previous.last_step,
            last_step: None,
            finished: false,
        };

        run.append(field::RECORD_HEADER, &Msg::new())?;

        let mut config_msg = Msg::new();
        for (key, value_json) in &config {
            config_msg.message(field::ITEMS, &proto::item(key, value_json));
        }
        let mut rec = Msg::new();
        rec.string(field::RUN_ID, id)
            .string(field::RUN_ENTITY, options.entity.as_deref().unwrap_or(""))
            .string(field::RUN_PROJECT, &options.project)
            .message(field::RUN_CONFIG, &config_msg)
            .string(
                field::RUN_DISPLAY_NAME,
                options.display_name.as_deref().unwrap_or(""),
            );
        for tag in &options.tags {
            rec.repeated_string(field::RUN_TAGS, tag);
        }
        rec.string(field::RUN_HOST, &host_name())
            .message(
                field::RUN_START_TIME,
                &proto::timestamp(now.as_secs() as i64, now.subsec_nanos() as i32),
            )
            .bool(field::RUN_RESUME, options.resume);
        run.append(field::RECORD_RUN, &rec)?;

        // `wandb sync` builds the run's summary from this file's summary records only:
        // carry over what earlier segments logged last, so their keys stay in it.
        if !previous.summary.is_empty() {
            let mut summary = Msg::new();
            for (key, value_json) in &previous.summary {
                summary.message(field::ITEMS, &proto::item_path(key, value_json));
            }
            run.append(field::RECORD_SUMMARY, &summary)?;
        }
        Ok(run)
    }

    /// The offline-run folder: what `wandb sync` and `wandb beta sync --live` take.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `.wandb` file inside [`dir`](OfflineRun::dir).
    pub fn file_path(&self) -> &Path {
        &self.file_path
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Logs one history row at `step`, adding `_step`, `_runtime` (seconds since the run
    /// started, continued across resumed segments) and `_timestamp` (Unix seconds), and
    /// updates the summary with the same values.
    ///
    /// Steps must increase from call to call: put all values of a step in one call.
    /// Values may be NaN or infinite (written as W&B's `NaN`, `Infinity`, `-Infinity`).
    ///
    /// Returns `Ok(false)`, writing nothing, for a step that earlier segments of a
    /// resumed run (found under the same root) already logged: a run resumed from a
    /// checkpoint older than its last logged step replays those steps, and W&B keeps the
    /// steps of a run increasing (the online SDK drops such rows; `wandb sync` of a
    /// resumed run would move them past the last step instead). `Ok(true)` otherwise.
    pub fn log(&mut self, step: u64, values: &BTreeMap<String, f64>) -> Result<bool, Error> {
        if self.finished {
            return Err(Error::Finished);
        }
        if let Some(key) = values
            .keys()
            .find(|k| k.is_empty() || RESERVED_KEYS.contains(&k.as_str()))
        {
            return Err(Error::InvalidKey(key.clone()));
        }
        if let Some(previous) = self.last_step.filter(|&p| step <= p) {
            return Err(Error::StepNotIncreasing { previous, step });
        }
        if self.resumed_after_step.is_some_and(|p| step <= p) {
            return Ok(false);
        }
        let step_i64 = i64::try_from(step)
            .map_err(|_| Error::InvalidOptions(format!("step {step} does not fit in an int64")))?;
        let runtime = self.runtime();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();

        let mut items: Vec<(&str, String)> = values
            .iter()
            .map(|(k, v)| (k.as_str(), json_f64(*v)))
            .collect();
        items.push(("_step", step.to_string()));
        items.push(("_runtime", json_f64(runtime)));
        items.push(("_timestamp", json_f64(timestamp)));

        let mut history = Msg::new();
        let mut summary = Msg::new();
        for (key, value_json) in &items {
            let item = proto::item(key, value_json);
            history.message(field::ITEMS, &item);
            summary.message(field::ITEMS, &item);
        }
        let mut step_msg = Msg::new();
        step_msg.int(field::STEP_NUM, step_i64);
        history.message(field::HISTORY_STEP, &step_msg);

        self.append(field::RECORD_HISTORY, &history)?;
        self.append(field::RECORD_SUMMARY, &summary)?;
        self.last_step = Some(step);
        Ok(true)
    }

    /// Writes the exit record with `exit_code` (0 for success) and syncs the file to
    /// disk. Logging afterwards, or finishing twice, is [`Error::Finished`].
    pub fn finish(&mut self, exit_code: i32) -> Result<(), Error> {
        if self.finished {
            return Err(Error::Finished);
        }
        let mut exit = Msg::new();
        exit.int(field::EXIT_CODE, exit_code as i64).int(
            field::EXIT_RUNTIME,
            self.runtime().round().min(i32::MAX as f64) as i64,
        );
        self.append(field::RECORD_EXIT, &exit)?;
        self.finished = true;
        self.writer
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.file_path.display()), e))
    }

    /// The step of the last row logged by this segment.
    pub fn last_step(&self) -> Option<u64> {
        self.last_step
    }

    fn runtime(&self) -> f64 {
        self.runtime_offset + self.started.elapsed().as_secs_f64()
    }

    fn append(&mut self, kind: u32, body: &Msg) -> Result<(), Error> {
        let rec = proto::record(self.next_num, kind, body);
        self.writer
            .append(&rec)
            .map_err(|e| Error::io(format!("writing {}", self.file_path.display()), e))?;
        self.next_num += 1;
        Ok(())
    }
}

/// A new random run id: 8 characters from `a-z0-9`, like W&B's own.
pub fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    // RandomState carries per-process random keys (from the OS); hashing a counter, the
    // time and the process id with them gives unpredictable, distinct values.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    let mut x = hasher.finish();
    (0..8)
        .map(|_| {
            let c = ALPHABET[(x % 36) as usize] as char;
            x /= 36;
            c
        })
        .collect()
}

fn validate_run_id(id: &str) -> Result<(), Error> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::InvalidOptions(format!(
            "run id {id:?} must be 1 to 128 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

/// The config's top-level keys with their values as JSON text.
fn config_items(config: &serde_json::Value) -> Result<Vec<(String, String)>, Error> {
    match config {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k == "_wandb" {
                    return Err(Error::InvalidOptions(format!(
                        "config key {k:?} is not allowed"
                    )));
                }
                Ok((
                    k.clone(),
                    serde_json::to_string(v).expect("JSON values serialize"),
                ))
            })
            .collect(),
        other => Err(Error::InvalidOptions(format!(
            "the config must be a JSON object, not {other}"
        ))),
    }
}

/// A float as W&B's JSON: numbers as JSON, plus `NaN`, `Infinity` and `-Infinity`.
fn json_f64(v: f64) -> String {
    match serde_json::Number::from_f64(v) {
        Some(n) => n.to_string(),
        None if v.is_nan() => "NaN".into(),
        None if v > 0.0 => "Infinity".into(),
        None => "-Infinity".into(),
    }
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// What earlier segments of a resumed run left behind.
#[derive(Default, Debug)]
struct Previous {
    /// The largest `_runtime` logged.
    runtime: f64,
    /// The largest `_step` logged.
    last_step: Option<u64>,
    /// The summary: the last value of each key, in the order of the segments' start.
    summary: BTreeMap<Vec<String>, String>,
}

/// Scans `<wandb_dir>/*-<id>/run-<id>.wandb` (offline and online run folders) of earlier
/// segments. Damaged tails are ignored: what precedes them counts.
fn previous_segments(wandb_dir: &Path, id: &str) -> Result<Previous, Error> {
    let mut previous = Previous::default();
    let suffix = format!("-{id}");
    let listing_error = |e| Error::io(format!("listing {}", wandb_dir.display()), e);
    let mut segments = Vec::new();
    for entry in fs::read_dir(wandb_dir).map_err(listing_error)? {
        let entry = entry.map_err(listing_error)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.starts_with("offline-run-") || name.starts_with("run-")) && name.ends_with(&suffix)
        {
            segments.push(entry.path().join(format!("run-{id}.wandb")));
        }
    }
    let mut runs = Vec::new();
    for path in segments {
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let records = format::read_prefix(&data);
        let start = records.iter().find_map(|r| match &r.kind {
            RecordKind::Run(info) => info.start_time,
            _ => None,
        });
        runs.push((start, records));
    }
    runs.sort_by_key(|(start, _)| *start);
    for (_, records) in runs {
        for record in records {
            match record.kind {
                RecordKind::History { items, step } => {
                    for item in &items {
                        match item.key_string().as_str() {
                            "_runtime" => {
                                if let Some(r) = item.as_f64().filter(|r| r.is_finite()) {
                                    previous.runtime = previous.runtime.max(r);
                                }
                            }
                            "_step" => {
                                let s = item
                                    .value_json
                                    .parse::<u64>()
                                    .ok()
                                    .or(step.map(|s| s as u64));
                                previous.last_step = previous.last_step.max(s);
                            }
                            _ => {}
                        }
                    }
                }
                RecordKind::Summary { update } => {
                    for item in update
                        .into_iter()
                        .filter(|i| i.key.first().is_some_and(|k| k != "_wandb"))
                    {
                        previous.summary.insert(item.key, item.value_json);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(previous)
}

/// Creates `offline-run-<UTC time>-<id>` in `wandb_dir`, moving on to the next second
/// while the name is taken.
fn create_run_dir(wandb_dir: &Path, unix_secs: u64, id: &str) -> Result<PathBuf, Error> {
    for bump in 0..3600 {
        let dir = wandb_dir.join(format!("offline-run-{}-{id}", utc_stamp(unix_secs + bump)));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
    }
    Err(Error::InvalidOptions(format!(
        "an offline-run folder for run id {id} exists for each second of the next hour"
    )))
}

/// `YYYYMMDD_HHMMSS` of a Unix time, in UTC.
fn utc_stamp(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}_{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests;
