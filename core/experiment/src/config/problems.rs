//! Problems found in an experiment file, written for the person at the terminal.

use std::fmt;
use std::path::{Path, PathBuf};

/// The layer a value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Default,
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    Set,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Set => f.write_str("--set"),
        }
    }
}

/// One problem: where, which key, the value found, and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub origin: Origin,
    pub line: Option<usize>,
    /// Dotted key path; empty for problems with a whole file.
    pub key: String,
    pub value: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn file(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Problem {
            origin: Origin::File(path.to_path_buf()),
            line,
            key: String::new(),
            value: None,
            message: message.into(),
        }
    }
}

fn relative(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.origin, self.line) {
            (Origin::File(p), Some(line)) => write!(f, "{}:{line}", relative(p))?,
            (Origin::File(p), None) => write!(f, "{}", relative(p))?,
            (other, _) => write!(f, "{other}")?,
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
            if let Some(v) = &self.value {
                write!(f, " = {v}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found.
#[derive(Debug, Clone, PartialEq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Files first (each in line order), then environment variables, then `--set`.
    pub fn sorted(mut problems: Vec<Problem>) -> Problems {
        problems.sort_by(|a, b| {
            let rank = |p: &Problem| match &p.origin {
                Origin::File(f) => (0, f.clone(), p.line.unwrap_or(0)),
                Origin::Env(_) => (1, PathBuf::new(), 0),
                Origin::Set => (2, PathBuf::new(), 0),
                Origin::Default => (3, PathBuf::new(), 0),
            };
            rank(a).cmp(&rank(b))
        });
        Problems(problems)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            writeln!(f, "error: {p}")?;
        }
        let n = self.0.len();
        write!(f, "{n} problem{} found", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Problems {}
