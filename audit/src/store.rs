//! The append-only store: `<dir>/audit.jsonl`, one signed record a line.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{SecondsFormat, Utc};
use ring::rand::{SecureRandom, SystemRandom};

use crate::encoding::to_hex;
use crate::error::StoreError;
use crate::files::{create_private_dir, sync_parent};
use crate::key::{AuditKey, KEY_FILE};
use crate::notice::{self, Notice};
use crate::record::{
    Entry, Head, Receipt, Record, SignedRecord, ZERO_HASH, canonical_hash, seq_of_receipt,
    sign_record,
};
use crate::verify::verify_record;

/// File name of the log inside the audit directory.
pub const LOG_FILE: &str = "audit.jsonl";

/// The most records one [`AuditLog::scan`] call reads, so that a caller
/// with few records in a long log gets pages (possibly empty ones with a
/// continuation) instead of a scan of the whole file per call.
pub const SCAN_WINDOW: u64 = 10_000;

/// The append-only log. `Send + Sync`: share it with an `Arc`.
pub struct AuditLog {
    path: PathBuf,
    key: AuditKey,
    rng: SystemRandom,
    writer: Mutex<Writer>,
    notify: Box<dyn Fn(&Notice) + Send + Sync>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("key", &self.key)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// Everything an append needs, behind one lock so seqs and hashes chain.
#[derive(Debug)]
struct Writer {
    /// Opened in append mode: every write lands at the end.
    file: File,
    /// Byte offset where each record's line starts; the index is the seq.
    offsets: Vec<u64>,
    /// End of the last complete line (= file length when healthy).
    len: u64,
    /// Hash of the last record, or [`ZERO_HASH`].
    last_hash: String,
    /// Time of the last record.
    last_time: Option<String>,
    /// Why appends are refused: a failed write could not be undone, so the
    /// file may end in a partial line that only a reopen repairs.
    broken: Option<String>,
}

/// What one pass over the file found.
#[derive(Default)]
struct LineIndex {
    offsets: Vec<u64>,
    complete_len: u64,
    file_len: u64,
    last_line: Vec<u8>,
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, with the signing key in the same
    /// directory. One pass over the file: repairs a torn last line, indexes
    /// line offsets and checks that the last record is this key's.
    ///
    /// [`Notice`]s (a new key, a repaired line) are dropped; use
    /// [`AuditLog::open_with_notices`] to log them.
    pub fn open(dir: &Path) -> Result<AuditLog, StoreError> {
        Self::open_with_notices(dir, notice::ignore)
    }

    /// [`AuditLog::open`], handing every [`Notice`] of this log's lifetime
    /// (from opening on) to `on_notice`.
    pub fn open_with_notices(
        dir: &Path,
        on_notice: impl Fn(&Notice) + Send + Sync + 'static,
    ) -> Result<AuditLog, StoreError> {
        let path = dir.join(LOG_FILE);
        let key = open_key_and_log(dir, &path, &on_notice)?;
        let file = open_for_append(&path, &on_notice)?;
        // Under the file lock: another process may be mid-append, and its
        // unfinished line is not a torn tail.
        file.lock().map_err(|cause| StoreError::Lock {
            path: path.clone(),
            cause,
        })?;
        let opened = index_lines(&file, &path).and_then(|index| {
            if index.file_len > index.complete_len {
                repair_torn_tail(&file, &path, &index, &on_notice)?;
            }
            let resume = resume_point(&index, &key, &path)?;
            Ok((index, resume))
        });
        let _ = file.unlock();
        let (index, (last_hash, last_time)) = opened?;
        let writer = Writer {
            file,
            offsets: index.offsets,
            len: index.complete_len,
            last_hash,
            last_time,
            broken: None,
        };
        Ok(AuditLog {
            path,
            key,
            rng: SystemRandom::new(),
            writer: Mutex::new(writer),
            notify: Box::new(on_notice),
        })
    }

    /// Appends an entry and returns its receipt once the line is on disk.
    pub fn append(&self, entry: Entry) -> Result<Receipt, StoreError> {
        check_finite(&entry)?;
        let mut writer = self.lock();
        if let Some(reason) = &writer.broken {
            return Err(StoreError::Refused {
                path: self.path.clone(),
                reason: reason.clone(),
            });
        }
        // Another connector process on the same state directory may append
        // too: the file lock orders all writers, and each first catches up
        // with what the others wrote, so the chain stays one chain.
        writer.file.lock().map_err(|cause| self.lock_error(cause))?;
        let appended = self.append_locked(entry, &mut writer);
        let _ = writer.file.unlock();
        appended
    }

    fn append_locked(&self, entry: Entry, writer: &mut Writer) -> Result<Receipt, StoreError> {
        self.catch_up(writer)?;
        let signed = self.seal(entry, writer)?;
        let mut line =
            serde_json::to_vec(&signed).map_err(|cause| StoreError::Serialize { cause })?;
        line.push(b'\n');
        writer
            .write_line(&line, &self.path, &*self.notify)
            .map_err(|cause| StoreError::Append {
                seq: signed.record.seq,
                path: self.path.clone(),
                cause,
            })?;
        writer.last_hash.clone_from(&signed.hash);
        writer.last_time = Some(signed.record.time.clone());
        Ok(signed.receipt())
    }

    /// Indexes records other processes appended since this one last looked,
    /// and cuts off a line a crashed writer left unfinished (it never got
    /// its fsync, so nobody holds a receipt for it). Call with the file lock.
    fn catch_up(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let file_len = writer
            .file
            .metadata()
            .map_err(|cause| self.read_error(cause))?
            .len();
        if file_len == writer.len {
            return Ok(());
        }
        if file_len < writer.len {
            writer.broken = Some(format!(
                "the file shrank from {} to {file_len} bytes under the running connector",
                writer.len
            ));
            return Err(StoreError::Shrank {
                path: self.path.clone(),
                from: writer.len,
                to: file_len,
            });
        }
        let mut reader = self.reader_at(writer.len, file_len)?;
        let mut line = Vec::new();
        let mut last = None;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|cause| self.read_error(cause))?;
            if read == 0 || !line.ends_with(b"\n") {
                break;
            }
            let seq = writer.offsets.len() as u64;
            let record = self.parse_indexed(&line, seq)?;
            writer.offsets.push(writer.len);
            writer.len += read as u64;
            last = Some(record);
        }
        if let Some(record) = last {
            verify_record(&record, &self.key.public_key()).map_err(|reason| {
                StoreError::ForeignAppend {
                    seq: record.record.seq,
                    path: self.path.clone(),
                    reason,
                }
            })?;
            writer.last_hash = record.hash;
            writer.last_time = Some(record.record.time);
        }
        if writer.len < file_len {
            (self.notify)(&Notice::UnfinishedLineRemoved {
                path: self.path.clone(),
                bytes: file_len - writer.len,
            });
            writer
                .file
                .set_len(writer.len)
                .and_then(|()| writer.file.sync_data())
                .map_err(|cause| StoreError::Truncate {
                    path: self.path.clone(),
                    cause,
                })?;
        }
        Ok(())
    }

    /// [`Self::catch_up`] under the file lock, for readers.
    fn refresh(&self, writer: &mut Writer) -> Result<(), StoreError> {
        writer.file.lock().map_err(|cause| self.lock_error(cause))?;
        let caught_up = self.catch_up(writer);
        let _ = writer.file.unlock();
        caught_up
    }

    /// Builds and signs the next record after the writer's current head.
    fn seal(&self, entry: Entry, writer: &Writer) -> Result<SignedRecord, StoreError> {
        let seq = writer.offsets.len() as u64;
        let mut nonce = [0u8; 4];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Random)?;
        let record = Record {
            seq,
            time: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            receipt_id: format!("r{seq:08}-{}", to_hex(&nonce)),
            prev_hash: writer.last_hash.clone(),
            entry,
        };
        Ok(sign_record(record, &self.key))
    }

    /// The current end of the chain. If records other processes appended
    /// cannot be read, a [`Notice::CatchUpFailed`] is given and the head
    /// this process knew is returned.
    pub fn head(&self) -> Head {
        let mut writer = self.lock();
        if let Err(error) = self.refresh(&mut writer) {
            (self.notify)(&Notice::CatchUpFailed { error });
        }
        Head {
            records: writer.offsets.len() as u64,
            hash: writer.last_hash.clone(),
            time: writer.last_time.clone(),
        }
    }

    /// The signing key (to publish its public half).
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// Path of `audit.jsonl`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record with exactly this receipt id, if there is one. Reads with
    /// its own handle, so appends are not held up by readers.
    pub fn get(&self, receipt_id: &str) -> Result<Option<SignedRecord>, StoreError> {
        let Some(seq) = seq_of_receipt(receipt_id) else {
            return Ok(None);
        };
        let span = {
            let mut writer = self.lock();
            self.refresh(&mut writer)?;
            writer.span(seq)
        };
        let Some((start, end)) = span else {
            return Ok(None);
        };
        let mut reader = self.reader_at(start, end)?;
        let mut line = Vec::new();
        reader
            .read_to_end(&mut line)
            .map_err(|cause| self.read_record_error(seq, cause))?;
        let record = self.parse_indexed(&line, seq)?;
        Ok((record.record.receipt_id == receipt_id).then_some(record))
    }

    /// Records with seq ≥ `from_seq` that pass `filter`, in order, at most
    /// `limit`; the second value is where to continue when more records
    /// follow. Only records present when the call started are read, and at
    /// most [`SCAN_WINDOW`] of them per call.
    pub fn scan(
        &self,
        from_seq: u64,
        limit: usize,
        filter: impl Fn(&SignedRecord) -> bool,
    ) -> Result<(Vec<SignedRecord>, Option<u64>), StoreError> {
        let (start, end, count) = {
            let mut writer = self.lock();
            self.refresh(&mut writer)?;
            let start = usize::try_from(from_seq)
                .ok()
                .and_then(|i| writer.offsets.get(i).copied());
            (start, writer.len, writer.offsets.len() as u64)
        };
        let Some(start) = start else {
            return Ok((Vec::new(), None));
        };
        let mut reader = self.reader_at(start, end)?;
        let (mut found, mut seq, mut line) = (Vec::new(), from_seq, Vec::new());
        let window_end = from_seq.saturating_add(SCAN_WINDOW).min(count);
        while seq < window_end && found.len() < limit {
            line.clear();
            reader
                .read_until(b'\n', &mut line)
                .map_err(|cause| self.read_record_error(seq, cause))?;
            let record = self.parse_indexed(&line, seq)?;
            seq += 1;
            if filter(&record) {
                found.push(record);
            }
        }
        Ok((found, (seq < count).then_some(seq)))
    }

    /// A buffered reader over bytes `start..end` of the log, on a fresh
    /// handle (the writer's handle is append-only and behind the lock).
    fn reader_at(&self, start: u64, end: u64) -> Result<BufReader<io::Take<File>>, StoreError> {
        let mut file = File::open(&self.path).map_err(|cause| StoreError::Open {
            path: self.path.clone(),
            cause,
        })?;
        file.seek(SeekFrom::Start(start))
            .map_err(|cause| StoreError::Seek {
                path: self.path.clone(),
                cause,
            })?;
        Ok(BufReader::new(file.take(end - start)))
    }

    /// Parses the line the index says holds record `seq`, and checks that it
    /// does (a mismatch means the file changed under the running connector).
    fn parse_indexed(&self, line: &[u8], seq: u64) -> Result<SignedRecord, StoreError> {
        let record: SignedRecord =
            serde_json::from_slice(line).map_err(|cause| StoreError::UnreadableRecord {
                seq,
                path: self.path.clone(),
                cause,
            })?;
        if record.record.seq != seq {
            return Err(StoreError::MisplacedRecord {
                seq,
                found: record.record.seq,
                path: self.path.clone(),
            });
        }
        Ok(record)
    }

    fn lock_error(&self, cause: io::Error) -> StoreError {
        StoreError::Lock {
            path: self.path.clone(),
            cause,
        }
    }

    fn read_error(&self, cause: io::Error) -> StoreError {
        StoreError::Read {
            path: self.path.clone(),
            cause,
        }
    }

    fn read_record_error(&self, seq: u64, cause: io::Error) -> StoreError {
        StoreError::ReadRecord {
            seq,
            path: self.path.clone(),
            cause,
        }
    }

    /// The writer state; a panic elsewhere cannot leave it half-updated
    /// (it changes only after a successful write), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Writer {
    /// Byte range of record `seq`'s line, if it exists.
    fn span(&self, seq: u64) -> Option<(u64, u64)> {
        let index = usize::try_from(seq).ok()?;
        let start = *self.offsets.get(index)?;
        let end = self.offsets.get(index + 1).copied().unwrap_or(self.len);
        Some((start, end))
    }

    /// Writes one line in a single call and flushes it to disk. On failure
    /// the file is cut back so the next record still chains to the last one.
    fn write_line(&mut self, line: &[u8], path: &Path, notify: &dyn Fn(&Notice)) -> io::Result<()> {
        let result = self
            .file
            .write_all(line)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.offsets.push(self.len);
                self.len += line.len() as u64;
                Ok(())
            }
            Err(err) => {
                self.undo_partial_write(&err, path, notify);
                Err(err)
            }
        }
    }

    fn undo_partial_write(&mut self, cause: &io::Error, path: &Path, notify: &dyn Fn(&Notice)) {
        let undone = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(err) = undone {
            self.broken = Some(format!(
                "a write failed ({cause}) and could not be undone ({err}); restart to repair the file"
            ));
            notify(&Notice::UndoFailed {
                path: path.to_path_buf(),
                cause: io::Error::new(cause.kind(), cause.to_string()),
                error: err,
            });
        }
    }
}

/// Rejects values the canonical form cannot hold exactly.
fn check_finite(entry: &Entry) -> Result<(), StoreError> {
    for (field, value) in [
        ("epsilon", entry.epsilon),
        ("delta", entry.delta),
        ("rho", entry.rho),
        ("charged_delta", entry.charged_delta),
    ] {
        if value.is_some_and(|v| !v.is_finite()) {
            return Err(StoreError::NonFinite { field, value });
        }
    }
    Ok(())
}

/// Loads the signing key, creating it with the log on first use. A key
/// is never created for a log that has records (they could not chain on
/// to it), and a log is never created anew beside its key (its records
/// would be lost without a trace): both mean a file was lost, and are
/// refused. On a new directory the log comes first, so that a crash
/// between the two leaves an empty log, which a later start completes.
fn open_key_and_log(
    dir: &Path,
    path: &Path,
    on_notice: &dyn Fn(&Notice),
) -> Result<AuditKey, StoreError> {
    let key_path = dir.join(KEY_FILE);
    create_private_dir(dir)?;
    let had_key = key_path.symlink_metadata().is_ok();
    match path.symlink_metadata() {
        Ok(log) if !had_key && log.is_file() && log.len() > 0 => {
            return Err(StoreError::KeyMissing {
                key: key_path,
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && had_key => {
            // A damaged key is reported as such first.
            AuditKey::load_or_create_with_notices(dir, on_notice)?;
            return Err(StoreError::LogMissing {
                path: path.to_path_buf(),
                key: key_path,
            });
        }
        _ => {}
    }
    if !had_key {
        drop(open_for_append(path, on_notice)?);
    }
    Ok(AuditKey::load_or_create_with_notices(dir, on_notice)?)
}

/// Opens the log for appending (and reading, for the index), 0600 if new.
fn open_for_append(path: &Path, notify: &dyn Fn(&Notice)) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(|cause| StoreError::Open {
        path: path.to_path_buf(),
        cause,
    })?;
    sync_parent(path, notify);
    Ok(file)
}

/// One pass over the file: line offsets and the last complete line, and
/// the chain checked on the way: every complete line must be the next
/// record, chained to the one before, with the hash of its own content
/// (signatures are not checked here: the last record's is, by
/// [`resume_point`], and through the chain of hashes it vouches for every
/// record before it). A damaged record anywhere is
/// [`StoreError::DamagedRecord`]: nothing is appended to a broken chain.
fn index_lines(file: &File, path: &Path) -> Result<LineIndex, StoreError> {
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut index = LineIndex::default();
    let mut line = Vec::new();
    let mut previous = ZERO_HASH.to_string();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|cause| StoreError::Read {
                path: path.to_path_buf(),
                cause,
            })?;
        index.file_len += read as u64;
        if read == 0 || !line.ends_with(b"\n") {
            return Ok(index);
        }
        let seq = index.offsets.len() as u64;
        previous = chained(&line[..line.len() - 1], seq, &previous).map_err(|reason| {
            StoreError::DamagedRecord {
                path: path.to_path_buf(),
                line: index.offsets.len() + 1,
                reason: reason.to_string(),
            }
        })?;
        index.offsets.push(index.complete_len);
        index.complete_len += read as u64;
        std::mem::swap(&mut index.last_line, &mut line);
    }
}

/// Why a complete line of the log is not the next record of the chain.
#[derive(Debug, thiserror::Error)]
enum Damage {
    #[error("the record there cannot be read ({0})")]
    Unreadable(serde_json::Error),
    #[error(
        "it holds record {found} where record {seq} belongs: a record is missing or out of order"
    )]
    OutOfOrder { found: u64, seq: u64 },
    #[error(
        "record {seq} does not chain to the record before it (its prev_hash is not that record's hash)"
    )]
    Unchained { seq: u64 },
    #[error("record {seq}'s content changed after it was written (its hash does not match)")]
    ContentChanged { seq: u64 },
}

/// Checks that `line` holds record `seq`, chained to `previous` (a hash),
/// with the hash of its own content; returns that hash. A line as the
/// store writes it is checked on its bytes: the record's canonical JSON
/// is the text between `{"record":` and `,"hash":"`, so no parsing is
/// needed. Anything else is parsed and checked in full (as `audit
/// verify` does), and only what fails that is damage.
fn chained(line: &[u8], seq: u64, previous: &str) -> Result<String, Damage> {
    if let Some(hash) = chained_as_written(line, seq, previous) {
        return Ok(hash);
    }
    let signed: SignedRecord = serde_json::from_slice(line).map_err(Damage::Unreadable)?;
    let record = &signed.record;
    if record.seq != seq {
        return Err(Damage::OutOfOrder {
            found: record.seq,
            seq,
        });
    }
    if record.prev_hash != previous {
        return Err(Damage::Unchained { seq });
    }
    if to_hex(&canonical_hash(record)) != signed.hash {
        return Err(Damage::ContentChanged { seq });
    }
    Ok(signed.hash)
}

/// [`chained`] on the bytes of a line in the store's own layout; `None`
/// when the line is laid out otherwise or any check fails.
fn chained_as_written(line: &[u8], seq: u64, previous: &str) -> Option<String> {
    const HASH: &[u8] = br#","hash":""#;
    const PREV: &[u8] = br#","prev_hash":""#;
    let rest = line.strip_prefix(br#"{"record":"#)?;
    let split = rest.windows(HASH.len()).rposition(|w| w == HASH)?;
    let record = &rest[..split];
    let hash = rest.get(split + HASH.len()..split + HASH.len() + 64)?;
    if rest.get(split + HASH.len() + 64) != Some(&b'"')
        || !hash.iter().all(|b| crate::encoding::is_lower_hex(*b))
    {
        return None;
    }
    if !record.starts_with(format!(r#"{{"seq":{seq},"#).as_bytes()) {
        return None;
    }
    let at = record.windows(PREV.len()).position(|w| w == PREV)? + PREV.len();
    if record.get(at..at + 64)? != previous.as_bytes() || record.get(at + 64) != Some(&b'"') {
        return None;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, record);
    let hash = std::str::from_utf8(hash).ok()?;
    (to_hex(digest.as_ref()) == hash).then(|| hash.to_string())
}

/// Cuts off a last line without its newline: the write that made it never
/// finished its `fsync`, so no caller was given a receipt for it.
fn repair_torn_tail(
    file: &File,
    path: &Path,
    index: &LineIndex,
    notify: &dyn Fn(&Notice),
) -> Result<(), StoreError> {
    notify(&Notice::TornTailRemoved {
        path: path.to_path_buf(),
        bytes: index.file_len - index.complete_len,
    });
    file.set_len(index.complete_len)
        .and_then(|()| file.sync_all())
        .map_err(|cause| StoreError::RepairTornTail {
            path: path.to_path_buf(),
            cause,
        })
}

/// Head hash and time from the last record, after checking it is this
/// key's and sits where the line count says.
fn resume_point(
    index: &LineIndex,
    key: &AuditKey,
    path: &Path,
) -> Result<(String, Option<String>), StoreError> {
    let Some(lines) = index.offsets.len().checked_sub(1) else {
        return Ok((ZERO_HASH.to_string(), None));
    };
    let last: SignedRecord = serde_json::from_slice(&index.last_line).map_err(|cause| {
        StoreError::UnreadableLastRecord {
            path: path.to_path_buf(),
            line: lines + 1,
            cause,
        }
    })?;
    if last.record.seq != lines as u64 {
        return Err(StoreError::MissingRecords {
            path: path.to_path_buf(),
            lines: lines + 1,
            last_seq: last.record.seq,
        });
    }
    if let Err(reason) = verify_record(&last, &key.public_key()) {
        return Err(StoreError::ForeignLastRecord {
            path: path.to_path_buf(),
            seq: last.record.seq,
            key_id: key.key_id(),
            reason,
        });
    }
    Ok((last.hash, Some(last.record.time)))
}
