//! One error type for the library. Every message is a single line that names the file and, where it
//! applies, the tensor (in backticks) or the byte offset.

use std::path::{Path, PathBuf};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, always with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error while reading or writing `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The content of `path` is not what its format requires.
    #[error("{}: {what}", path.display())]
    Invalid {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, naming the tensor or byte offset.
        what: String,
    },
    /// The request cannot be carried out as given (bad rule, bad dtype, output exists, ...).
    #[error("{0}")]
    Usage(String),
    /// A cast would damage values and the policy says to stop.
    #[error("{0}")]
    Refused(String),
    /// The caller asked to stop (Ctrl-C); nothing was written.
    #[error("interrupted: no output was written")]
    Interrupted,
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Invalid content in `path`.
    pub fn invalid(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    /// A usage error.
    pub fn usage(what: impl Into<String>) -> Self {
        Error::Usage(what.into())
    }

    /// True when the error comes from how the tool was called rather than from the data.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}

/// Up to `shown` of `items` (already formatted), comma-separated, then how many more: the
/// lists in messages and reports.
pub fn listed(items: &[String], shown: usize) -> String {
    let mut s = items
        .iter()
        .take(shown)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > shown {
        s.push_str(&format!(" and {} more", items.len() - shown));
    }
    s
}

/// Up to five names in backticks, then how many more.
pub fn names(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    listed(&quoted, 5)
}

/// A message on one line: control characters (a newline in a tensor or zip entry name read
/// from the file, an escape sequence) are written escaped, as `\u{1c}`.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Who asked: messages name an option as the caller wrote it (`--max-underflow` on the
/// command line, `max_underflow=` in Python).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Caller {
    /// The `weightcast` command.
    #[default]
    Cli,
    /// The Python package.
    Python,
}

impl Caller {
    /// Option `name` (written with dashes) as this caller writes it.
    pub fn flag(self, name: &str) -> String {
        match self {
            Caller::Cli => format!("--{name}"),
            Caller::Python => format!("{}=", name.replace('-', "_")),
        }
    }

    /// Option `name` given the number `value`, as this caller writes it (`--auto 30`,
    /// `auto=30`).
    pub fn number(self, name: &str, value: impl std::fmt::Display) -> String {
        match self {
            Caller::Cli => format!("--{name} {value}"),
            Caller::Python => format!("{}={value}", name.replace('-', "_")),
        }
    }

    /// Option `name` given the text `value`, as this caller writes it (`--to f16`,
    /// `to="f16"`).
    pub fn given(self, name: &str, value: &str) -> String {
        match self {
            Caller::Cli => format!("--{name} {value}"),
            Caller::Python => format!("{}=\"{value}\"", name.replace('-', "_")),
        }
    }
}
