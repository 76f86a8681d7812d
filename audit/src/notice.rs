//! Things worth logging that are not errors.
//!
//! The crate has no logging dependency. Where the connector used to log
//! (a new key, a repaired torn tail, a failed best-effort `fsync` of a
//! directory…), the crate hands a [`Notice`] to the callback given to
//! [`AuditLog::open_with_notices`](crate::AuditLog::open_with_notices) or
//! [`AuditKey::load_or_create_with_notices`](crate::AuditKey::load_or_create_with_notices);
//! the plain `open` and `load_or_create` drop them.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::error::StoreError;

/// How much a [`Notice`] matters, for mapping it to a log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NoticeLevel {
    /// Normal but worth recording.
    Info,
    /// Something was repaired or skipped; the log is still sound.
    Warning,
    /// Appends are refused until the log is reopened.
    Error,
}

/// Something the crate did or could not do, short of failing.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notice {
    /// A fresh signing key was created (first use of the directory).
    KeyCreated { path: PathBuf },
    /// At open, an incomplete last line was cut off: the append that wrote
    /// it was interrupted before it was acknowledged.
    TornTailRemoved { path: PathBuf, bytes: u64 },
    /// Catching up, an unfinished line another process left was cut off.
    UnfinishedLineRemoved { path: PathBuf, bytes: u64 },
    /// A failed write could not be undone; appends are refused from now on.
    UndoFailed {
        path: PathBuf,
        cause: io::Error,
        error: io::Error,
    },
    /// [`AuditLog::head`](crate::AuditLog::head) could not catch up with
    /// records other processes appended, and reports the head it knew.
    CatchUpFailed { error: StoreError },
    /// A directory could not be `fsync`ed after a file in it was created
    /// (best effort: the file itself is complete).
    DirectorySyncFailed { dir: PathBuf, cause: io::Error },
}

impl Notice {
    /// The level the connector logged this at.
    pub fn level(&self) -> NoticeLevel {
        match self {
            Notice::KeyCreated { .. } => NoticeLevel::Info,
            Notice::UndoFailed { .. } => NoticeLevel::Error,
            Notice::TornTailRemoved { .. }
            | Notice::UnfinishedLineRemoved { .. }
            | Notice::CatchUpFailed { .. }
            | Notice::DirectorySyncFailed { .. } => NoticeLevel::Warning,
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::KeyCreated { path } => {
                write!(f, "created a new audit signing key {}", path.display())
            }
            Notice::TornTailRemoved { path, bytes } => write!(
                f,
                "removing an incomplete last line ({bytes} bytes) from the audit log {} (an append \
                 interrupted before it was acknowledged)",
                path.display()
            ),
            Notice::UnfinishedLineRemoved { path, bytes } => write!(
                f,
                "removing an unfinished line ({bytes} bytes) another process left in the audit log {}",
                path.display()
            ),
            Notice::UndoFailed { path, cause, error } => write!(
                f,
                "cannot undo a failed audit write to {} ({cause}): {error}; restart to repair the file",
                path.display()
            ),
            Notice::CatchUpFailed { error } => {
                write!(f, "cannot catch up with the audit log: {error}")
            }
            Notice::DirectorySyncFailed { dir, cause } => {
                write!(f, "cannot sync directory {}: {cause}", dir.display())
            }
        }
    }
}

/// A sink that drops every notice.
pub(crate) fn ignore(_: &Notice) {}
