//! Private files written so that a crash leaves the old file or the whole
//! new one, never half of it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::KeyError;
use crate::notice::Notice;

/// Creates `dir` and missing parents with mode 0700 (an existing directory
/// keeps its mode: the operator may have chosen it).
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|cause| KeyError::CreateDir {
        dir: dir.to_path_buf(),
        cause,
    })
}

/// Writes `path` via a temporary file and a rename, so a crash leaves
/// either the old file or the complete new one, never half a key.
pub(crate) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    notify: &dyn Fn(&Notice),
) -> Result<(), KeyError> {
    let tmp = temp_path(path);
    let result = write_new_file(&tmp, bytes, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|cause| KeyError::Rename {
            from: tmp.clone(),
            to: path.to_path_buf(),
            cause,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path, notify);
    Ok(())
}

/// Writes `bytes` to `path` only if nothing is there yet, atomically: a
/// complete temporary file is hard-linked into place, which fails if another
/// process got there first (two connectors starting on one new state
/// directory then share the first key rather than fork the log). Returns
/// whether this call created the file.
pub(crate) fn create_exclusively(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    notify: &dyn Fn(&Notice),
) -> Result<bool, KeyError> {
    let tmp = temp_path(path);
    write_new_file(&tmp, bytes, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path, notify);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(cause) => Err(KeyError::Create {
            path: path.to_path_buf(),
            cause,
        }),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Creates a file with `mode` (unix), writes it and flushes it to disk.
fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|cause| KeyError::Create {
        path: path.to_path_buf(),
        cause,
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|cause| KeyError::Write {
            path: path.to_path_buf(),
            cause,
        })
}

/// Makes a rename durable. Best effort: not every platform can open a
/// directory, and the file itself is already complete.
pub(crate) fn sync_parent(path: &Path, notify: &dyn Fn(&Notice)) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Err(cause) = fs::File::open(parent).and_then(|dir| dir.sync_all()) {
            notify(&Notice::DirectorySyncFailed {
                dir: parent.to_path_buf(),
                cause,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, notify);
}
