//! The signed, hash-chained, append-only audit log (`<dir>/audit.jsonl`).
//!
//! Every decision, release and completion is appended as one JSON line:
//!
//! ```text
//! {"record":{"seq":3,"time":"…","receipt_id":"r00000003-1a2b3c4d","prev_hash":"<hash of record 2>","entry":{…}},
//!  "hash":"<SHA-256 of the record's canonical JSON>","key_id":"ed25519:…","signature":"<Ed25519 over the hash>"}
//! ```
//!
//! * **Canonical form.** The hashed bytes are `serde_json::to_vec(&record)`:
//!   compact, fields in declaration order. Because `prev_hash` is inside the
//!   record, each hash covers the whole history before it: changing, removing,
//!   inserting or reordering any record breaks the chain at that point.
//! * **Exact numbers.** `epsilon` and `delta` are written as JSON *strings*
//!   holding the shortest decimal that reads back to the same `f64`.
//!   serde_json's default float parser can be off by one unit in the last
//!   place (for about one value in ten with 17 digits), which would make an
//!   untouched record fail verification; Rust's `str::parse::<f64>` is exact.
//! * **Durability.** [`AuditLog::append`] writes the line in one call and
//!   `fsync`s it before returning its [`Receipt`], so a caller that releases
//!   data only after `append` returned can never release unaudited data. A
//!   line cut short by a crash was never acknowledged, and [`AuditLog::open`]
//!   removes it.
//! * **Offline verification.** [`verify_file`] needs only the file and the
//!   public key (`public-key.pem`); it streams the file and stops at the first
//!   problem with a reason an operator can act on.
//!
//! Several processes may append to one log (two connectors on one state
//! directory): an exclusive file lock orders appends, and each writer first
//! catches up with the records others wrote, so the chain stays one chain.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{SecondsFormat, Utc};
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::audit::key::{
    AuditKey, from_hex, key_id_of, sync_parent, to_hex, verify_hash_signature,
};

/// File name of the log inside the audit directory.
pub const LOG_FILE: &str = "audit.jsonl";
/// `prev_hash` of record 0, and the head hash of an empty log.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the caller records: one decision, release or completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Kind of event: `"decision"`, `"release"` or `"completion"` (the log
    /// treats it as free text).
    pub event: String,
    /// What happened, e.g. `"allowed"`, `"denied"`, `"released"`,
    /// `"completed"`, `"aborted"`.
    pub outcome: String,
    /// The authenticated principal (from the client certificate).
    pub principal: String,
    /// The principal's organization, when known.
    #[serde(default)]
    pub organization: Option<String>,
    /// The broker that relayed the request for `principal` (its own
    /// certificate's principal), for relayed queries only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Who receives the data (organizations or principals).
    pub consumers: Vec<String>,
    /// Datasets the query reads.
    pub datasets: Vec<String>,
    /// Declared purpose of use, when given.
    #[serde(default)]
    pub purpose: Option<String>,
    /// Ids of the agreements the decision relied on.
    pub agreements: Vec<String>,
    /// Hash of the analyzed plan, tying the record to exactly what ran.
    #[serde(default)]
    pub plan_hash: Option<String>,
    /// Version of the usage policy that decided.
    pub policy_version: String,
    /// gRPC status code name of a refusal, e.g. `"PERMISSION_DENIED"`.
    #[serde(default)]
    pub code: Option<String>,
    /// Policy rule that decided, when one did.
    #[serde(default)]
    pub rule: Option<String>,
    /// Human-readable explanation (for refusals: what the caller was told).
    #[serde(default)]
    pub message: Option<String>,
    /// Id of the query (ticket) this record is about.
    #[serde(default)]
    pub query_id: Option<String>,
    /// Receipt id of an earlier record this one completes (a completion
    /// refers to its decision).
    #[serde(default)]
    pub refers_to: Option<String>,
    /// Rows released.
    #[serde(default)]
    pub rows: Option<u64>,
    /// Bytes released.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Differential-privacy ε charged; must be finite. Written as an exact
    /// decimal string (see the module documentation).
    #[serde(default, with = "exact_f64")]
    pub epsilon: Option<f64>,
    /// Differential-privacy δ charged; must be finite. Written as an exact
    /// decimal string (see the module documentation).
    #[serde(default, with = "exact_f64")]
    pub delta: Option<f64>,
}

/// One record as hashed: the entry plus its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// When it was appended: RFC 3339, UTC, milliseconds, `Z`.
    pub time: String,
    /// `r<seq, 8+ digits>-<8 random hex>`; the random part makes receipt ids
    /// unguessable, so knowing one seq does not let a client fetch others.
    pub receipt_id: String,
    /// Hex hash of the previous record ([`ZERO_HASH`] for record 0).
    pub prev_hash: String,
    /// What was recorded.
    pub entry: Entry,
}

/// A record with its hash and signature: one line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRecord {
    /// The hashed content.
    pub record: Record,
    /// Lowercase hex SHA-256 of the record's canonical JSON.
    pub hash: String,
    /// Id of the signing key ([`key_id_of`]).
    pub key_id: String,
    /// Lowercase hex Ed25519 signature over the hash (128 characters).
    pub signature: String,
}

/// What a caller gets back from [`AuditLog::append`]: enough to prove later
/// that the connector recorded the event, and to fetch the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Id of the record.
    pub receipt_id: String,
    /// Seq of the record.
    pub seq: u64,
    /// Hex hash of the record.
    pub hash: String,
    /// Id of the signing key.
    pub key_id: String,
    /// Hex signature over the hash.
    pub signature: String,
}

/// The end of the chain: what an auditor compares against to detect a log
/// that was cut short.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// Number of records, which is also the next seq.
    pub records: u64,
    /// Hash of the last record, or [`ZERO_HASH`] when empty.
    pub hash: String,
    /// Time of the last record, if any.
    pub time: Option<String>,
}

impl SignedRecord {
    /// The receipt for this record.
    pub fn receipt(&self) -> Receipt {
        Receipt {
            receipt_id: self.record.receipt_id.clone(),
            seq: self.record.seq,
            hash: self.hash.clone(),
            key_id: self.key_id.clone(),
            signature: self.signature.clone(),
        }
    }
}

impl Receipt {
    /// Compact JSON, for a response header (ASCII only: ids are ASCII).
    pub fn to_header(&self) -> String {
        serde_json::to_string(self).expect("a receipt of strings and a u64 always serializes")
    }

    /// Parses [`Receipt::to_header`] output.
    pub fn from_header(text: &str) -> Result<Receipt> {
        serde_json::from_str(text).context("not a valid audit receipt (expected its JSON form)")
    }
}

/// SHA-256 of the record's canonical bytes (`serde_json::to_vec`).
pub fn canonical_hash(record: &Record) -> [u8; 32] {
    let bytes = serde_json::to_vec(record).expect("an audit record always serializes to JSON");
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest(&SHA256, &bytes).as_ref());
    hash
}

/// Hashes and signs a record.
pub fn sign_record(record: Record, key: &AuditKey) -> SignedRecord {
    let hash = canonical_hash(&record);
    SignedRecord {
        record,
        hash: to_hex(&hash),
        key_id: key.key_id(),
        signature: to_hex(&key.sign_hash(&hash)),
    }
}

/// The seq encoded in a receipt id, if the id is well formed
/// (`r` + seq zero-padded to at least 8 digits + `-` + 8 lowercase hex).
pub fn seq_of_receipt(id: &str) -> Option<u64> {
    let (digits, nonce) = id.strip_prefix('r')?.split_once('-')?;
    let nonce_ok = nonce.len() == 8 && nonce.bytes().all(is_lower_hex);
    if !nonce_ok || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (format!("{seq:08}") == digits).then_some(seq)
}

fn is_lower_hex(byte: u8) -> bool {
    matches!(byte, b'0'..=b'9' | b'a'..=b'f')
}

/// Decodes hex written by this module (lowercase only, exact length), so a
/// re-cased copy of a hash is not silently accepted as the same value.
fn decode_lower_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(is_lower_hex) {
        return None;
    }
    from_hex(text)?.try_into().ok()
}

/// Checks one record on its own: the hash matches the content, and the
/// signature over it verifies with `public_key`.
pub fn verify_record(record: &SignedRecord, public_key: &[u8; 32]) -> Result<(), String> {
    let computed = canonical_hash(&record.record);
    if to_hex(&computed) != record.hash {
        return Err("content changed after it was written (its hash does not match)".into());
    }
    check_signature(&record.key_id, &computed, &record.signature, public_key)
}

/// Checks a receipt on its own: well formed, and signed by `public_key`.
/// Use [`receipt_matches`] to tie it to a record.
pub fn verify_receipt(receipt: &Receipt, public_key: &[u8; 32]) -> Result<(), String> {
    if seq_of_receipt(&receipt.receipt_id) != Some(receipt.seq) {
        return Err(format!(
            "receipt id {} does not name record {}",
            shown(&receipt.receipt_id),
            receipt.seq
        ));
    }
    let hash = decode_lower_hex::<32>(&receipt.hash)
        .ok_or("the receipt's hash is not 64 lowercase hex characters")?;
    check_signature(&receipt.key_id, &hash, &receipt.signature, public_key)
}

/// The key id must name `public_key` and the signature must verify over
/// `hash`; both failures read "signature does not verify with key …".
fn check_signature(
    key_id: &str,
    hash: &[u8; 32],
    signature: &str,
    public_key: &[u8; 32],
) -> Result<(), String> {
    let expected = key_id_of(public_key);
    if key_id != expected {
        return Err(format!(
            "signature does not verify with key {expected}: it names key {}",
            shown(key_id)
        ));
    }
    let valid = decode_lower_hex::<64>(signature)
        .is_some_and(|signature| verify_hash_signature(public_key, hash, &signature));
    if valid {
        Ok(())
    } else {
        Err(format!("signature does not verify with key {expected}"))
    }
}

/// True when the receipt is exactly this record's and the record's hash
/// still matches its content (which binds the receipt id and seq too).
pub fn receipt_matches(receipt: &Receipt, record: &SignedRecord) -> bool {
    receipt == &record.receipt() && to_hex(&canonical_hash(&record.record)) == record.hash
}

/// A value taken from a file, made safe and short for a message.
fn shown(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(48)
        .collect::<String>()
        .escape_debug()
        .collect();
    if text.chars().nth(48).is_some() {
        out.push('…');
    }
    out
}

/// The most records one [`AuditLog::scan`] call reads, so that a caller
/// with few records in a long log gets pages (possibly empty ones with a
/// continuation) instead of a scan of the whole file per call.
pub const SCAN_WINDOW: u64 = 10_000;

/// The append-only log. `Send + Sync`: share it with an `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    key: AuditKey,
    rng: SystemRandom,
    writer: Mutex<Writer>,
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
    pub fn open(dir: &Path) -> Result<AuditLog> {
        let key = AuditKey::load_or_create(dir)?;
        let path = dir.join(LOG_FILE);
        let file = open_for_append(&path)?;
        // Under the file lock: another process may be mid-append, and its
        // unfinished line is not a torn tail.
        file.lock()
            .with_context(|| format!("cannot lock the audit log {}", path.display()))?;
        let opened = index_lines(&file, &path).and_then(|index| {
            if index.file_len > index.complete_len {
                repair_torn_tail(&file, &path, &index)?;
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
        })
    }

    /// Appends an entry and returns its receipt once the line is on disk.
    pub fn append(&self, entry: Entry) -> Result<Receipt> {
        check_finite(&entry)?;
        let mut writer = self.lock();
        if let Some(reason) = &writer.broken {
            bail!(
                "the audit log {} refuses appends: {reason}",
                self.path.display()
            );
        }
        // Another connector process on the same state directory may append
        // too: the file lock orders all writers, and each first catches up
        // with what the others wrote, so the chain stays one chain.
        writer
            .file
            .lock()
            .with_context(|| format!("cannot lock the audit log {}", self.path.display()))?;
        let appended = self.append_locked(entry, &mut writer);
        let _ = writer.file.unlock();
        appended
    }

    fn append_locked(&self, entry: Entry, writer: &mut Writer) -> Result<Receipt> {
        self.catch_up(writer)?;
        let signed = self.seal(entry, writer)?;
        let mut line = serde_json::to_vec(&signed).context("cannot serialize an audit record")?;
        line.push(b'\n');
        writer.write_line(&line).with_context(|| {
            format!(
                "cannot append record {} to the audit log {}",
                signed.record.seq,
                self.path.display()
            )
        })?;
        writer.last_hash.clone_from(&signed.hash);
        writer.last_time = Some(signed.record.time.clone());
        Ok(signed.receipt())
    }

    /// Indexes records other processes appended since this one last looked,
    /// and cuts off a line a crashed writer left unfinished (it never got
    /// its fsync, so nobody holds a receipt for it). Call with the file lock.
    fn catch_up(&self, writer: &mut Writer) -> Result<()> {
        let file_len = writer
            .file
            .metadata()
            .with_context(|| format!("cannot read the audit log {}", self.path.display()))?
            .len();
        if file_len == writer.len {
            return Ok(());
        }
        if file_len < writer.len {
            let reason = format!(
                "the file shrank from {} to {file_len} bytes under the running connector",
                writer.len
            );
            writer.broken = Some(reason.clone());
            bail!(
                "the audit log {} refuses appends: {reason}; run `sluice audit verify`",
                self.path.display()
            );
        }
        let mut reader = self.reader_at(writer.len, file_len)?;
        let mut line = Vec::new();
        let mut last = None;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read the audit log {}", self.path.display()))?;
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
                anyhow!(
                    "record {} of the audit log {}, appended by another process, does not verify: {reason}",
                    record.record.seq,
                    self.path.display()
                )
            })?;
            writer.last_hash = record.hash;
            writer.last_time = Some(record.record.time);
        }
        if writer.len < file_len {
            tracing::warn!(path = %self.path.display(), "removing an unfinished line another process left in the audit log");
            writer
                .file
                .set_len(writer.len)
                .and_then(|()| writer.file.sync_data())
                .with_context(|| format!("cannot truncate {}", self.path.display()))?;
        }
        Ok(())
    }

    /// [`Self::catch_up`] under the file lock, for readers.
    fn refresh(&self, writer: &mut Writer) -> Result<()> {
        writer
            .file
            .lock()
            .with_context(|| format!("cannot lock the audit log {}", self.path.display()))?;
        let caught_up = self.catch_up(writer);
        let _ = writer.file.unlock();
        caught_up
    }

    /// Builds and signs the next record after the writer's current head.
    fn seal(&self, entry: Entry, writer: &Writer) -> Result<SignedRecord> {
        let seq = writer.offsets.len() as u64;
        let mut nonce = [0u8; 4];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| anyhow!("the system random source failed"))?;
        let record = Record {
            seq,
            time: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            receipt_id: format!("r{seq:08}-{}", to_hex(&nonce)),
            prev_hash: writer.last_hash.clone(),
            entry,
        };
        Ok(sign_record(record, &self.key))
    }

    /// The current end of the chain.
    pub fn head(&self) -> Head {
        let mut writer = self.lock();
        if let Err(e) = self.refresh(&mut writer) {
            tracing::warn!(error = %format!("{e:#}"), "cannot catch up with the audit log");
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
    pub fn get(&self, receipt_id: &str) -> Result<Option<SignedRecord>> {
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
            .with_context(|| format!("cannot read record {seq} of {}", self.path.display()))?;
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
    ) -> Result<(Vec<SignedRecord>, Option<u64>)> {
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
                .with_context(|| format!("cannot read record {seq} of {}", self.path.display()))?;
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
    fn reader_at(&self, start: u64, end: u64) -> Result<BufReader<io::Take<File>>> {
        let mut file = File::open(&self.path)
            .with_context(|| format!("cannot open the audit log {}", self.path.display()))?;
        file.seek(SeekFrom::Start(start))
            .with_context(|| format!("cannot seek in the audit log {}", self.path.display()))?;
        Ok(BufReader::new(file.take(end - start)))
    }

    /// Parses the line the index says holds record `seq`, and checks that it
    /// does (a mismatch means the file changed under the running connector).
    fn parse_indexed(&self, line: &[u8], seq: u64) -> Result<SignedRecord> {
        let record: SignedRecord = serde_json::from_slice(line).with_context(|| {
            format!(
                "record {seq} of the audit log {} cannot be read; run `sluice audit verify`",
                self.path.display()
            )
        })?;
        if record.record.seq != seq {
            bail!(
                "line {} of the audit log {} holds record {}, not {seq}; run `sluice audit verify`",
                seq + 1,
                self.path.display(),
                record.record.seq
            );
        }
        Ok(record)
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
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
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
                self.undo_partial_write(&err);
                Err(err)
            }
        }
    }

    fn undo_partial_write(&mut self, cause: &io::Error) {
        let undone = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(err) = undone {
            tracing::error!(%cause, %err, "cannot undo a failed audit write");
            self.broken = Some(format!(
                "a write failed ({cause}) and could not be undone ({err}); restart to repair the file"
            ));
        }
    }
}

/// Rejects values the canonical form cannot hold exactly.
fn check_finite(entry: &Entry) -> Result<()> {
    for (name, value) in [("epsilon", entry.epsilon), ("delta", entry.delta)] {
        if value.is_some_and(|v| !v.is_finite()) {
            bail!("an audit entry's {name} must be a finite number, not {value:?}");
        }
    }
    Ok(())
}

/// Opens the log for appending (and reading, for the index), 0600 if new.
fn open_for_append(path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(path)
        .with_context(|| format!("cannot open the audit log {}", path.display()))?;
    sync_parent(path);
    Ok(file)
}

/// One pass over the file: line offsets, and the last complete line.
fn index_lines(file: &File, path: &Path) -> Result<LineIndex> {
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut index = LineIndex::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read the audit log {}", path.display()))?;
        index.file_len += read as u64;
        if read == 0 || !line.ends_with(b"\n") {
            return Ok(index);
        }
        index.offsets.push(index.complete_len);
        index.complete_len += read as u64;
        std::mem::swap(&mut index.last_line, &mut line);
    }
}

/// Cuts off a last line without its newline: the write that made it never
/// finished its `fsync`, so no caller was given a receipt for it.
fn repair_torn_tail(file: &File, path: &Path, index: &LineIndex) -> Result<()> {
    tracing::warn!(
        path = %path.display(),
        bytes = index.file_len - index.complete_len,
        "removing an incomplete last line from the audit log (an append interrupted before it was acknowledged)"
    );
    file.set_len(index.complete_len)
        .and_then(|()| file.sync_all())
        .with_context(|| {
            format!(
                "cannot truncate the incomplete last line of {}",
                path.display()
            )
        })
}

/// Head hash and time from the last record, after checking it is this
/// key's and sits where the line count says.
fn resume_point(
    index: &LineIndex,
    key: &AuditKey,
    path: &Path,
) -> Result<(String, Option<String>)> {
    let Some(lines) = index.offsets.len().checked_sub(1) else {
        return Ok((ZERO_HASH.to_string(), None));
    };
    let last: SignedRecord = serde_json::from_slice(&index.last_line).with_context(|| {
        format!(
            "the last record of the audit log {} (line {}) cannot be read; run `sluice audit verify`",
            path.display(),
            lines + 1
        )
    })?;
    if last.record.seq != lines as u64 {
        bail!(
            "the audit log {} has {} lines but its last record is record {}: records are missing \
             or duplicated; run `sluice audit verify`",
            path.display(),
            lines + 1,
            last.record.seq
        );
    }
    if let Err(reason) = verify_record(&last, &key.public_key()) {
        bail!(
            "the last record of the audit log {} (record {}) does not verify with this connector's \
             audit key {}: {reason}. The log was signed by another key or is damaged; run `sluice audit verify`",
            path.display(),
            last.record.seq,
            key.key_id()
        );
    }
    Ok((last.hash, Some(last.record.time)))
}

/// Result of [`verify_file`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyReport {
    /// Records that passed every check.
    pub checked: u64,
    /// Seq of the first record checked.
    pub first: Option<u64>,
    /// Where the verified part of the chain ends: after a problem, the last
    /// record that passed. `None` when nothing was verified from a
    /// `from_seq` (for a whole file, an empty log has an empty head).
    pub head: Option<Head>,
    /// The first problem found; `None` means the checked range is intact.
    pub problem: Option<Problem>,
}

/// The first thing wrong in a log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Problem {
    /// 1-based line number in the file.
    pub line: usize,
    /// The record's seq as read from the line; for a line that cannot be
    /// read at all, the seq expected there (when known).
    pub seq: Option<u64>,
    /// The record's receipt id, when it could be read.
    pub receipt_id: Option<String>,
    /// What is wrong, for a human.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.seq, &self.receipt_id) {
            (Some(seq), Some(id)) => {
                write!(
                    f,
                    "record {seq} (line {}, receipt {}): {}",
                    self.line,
                    shown(id),
                    self.reason
                )
            }
            (Some(seq), None) => write!(f, "record {seq} (line {}): {}", self.line, self.reason),
            (None, _) => write!(f, "line {}: {}", self.line, self.reason),
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(problem) = &self.problem {
            return write!(f, "{problem} ({} records before it verified)", self.checked);
        }
        match (&self.head, self.first) {
            (Some(head), Some(first)) => write!(
                f,
                "{} records verified (records {first} to {}); head {} at {}",
                self.checked,
                head.records.saturating_sub(1),
                head.hash,
                head.time.as_deref().unwrap_or("?")
            ),
            _ => write!(f, "no records to verify"),
        }
    }
}

/// Checks a log file offline against `public_key`, streaming it line by
/// line and stopping at the first problem. With `from_seq`, earlier records
/// are only read for their seq, and record `from_seq`'s `prev_hash` is
/// trusted as the anchor (for incremental checks against a known head).
pub fn verify_file(
    path: &Path,
    public_key: &[u8; 32],
    from_seq: Option<u64>,
) -> Result<VerifyReport> {
    let file = File::open(path)
        .with_context(|| format!("cannot open the audit log {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut verifier = Verifier::new(public_key, from_seq);
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read line {number} of {}", path.display()))?;
        if read == 0 {
            break;
        }
        if let Err(problem) = verifier.check_line(number, &line) {
            return Ok(verifier.report(Some(problem)));
        }
    }
    Ok(verifier.report(None))
}

/// The last record that passed every check.
struct Verified {
    seq: u64,
    hash: String,
    time: String,
}

/// State of [`verify_file`] between lines.
struct Verifier<'a> {
    public_key: &'a [u8; 32],
    from_seq: Option<u64>,
    checked: u64,
    first: Option<u64>,
    last: Option<Verified>,
}

/// The few fields read from a line that is skipped or cannot be parsed in
/// full (unknown fields ignored).
#[derive(Deserialize)]
struct Peek {
    record: PeekRecord,
}

#[derive(Deserialize)]
struct PeekRecord {
    seq: u64,
    receipt_id: Option<String>,
}

impl<'a> Verifier<'a> {
    fn new(public_key: &'a [u8; 32], from_seq: Option<u64>) -> Self {
        Verifier {
            public_key,
            from_seq,
            checked: 0,
            first: None,
            last: None,
        }
    }

    /// All checks for one line, in order; the first failure is the problem.
    fn check_line(&mut self, number: usize, line: &[u8]) -> Result<(), Problem> {
        let Some(body) = line.strip_suffix(b"\n") else {
            let peek = serde_json::from_slice::<Peek>(line).ok();
            return Err(Problem {
                line: number,
                seq: peek.as_ref().map(|p| p.record.seq).or(self.expected_seq()),
                receipt_id: peek.and_then(|p| p.record.receipt_id),
                reason: "incomplete last line: the file does not end in a newline (an append was \
                         interrupted, or the file was cut)"
                    .into(),
            });
        };
        if self.skips(number, body)? {
            return Ok(());
        }
        let record: SignedRecord =
            serde_json::from_slice(body).map_err(|err| self.unreadable(number, body, &err))?;
        self.check_record(&record).map_err(|reason| Problem {
            line: number,
            seq: Some(record.record.seq),
            receipt_id: Some(record.record.receipt_id.clone()),
            reason,
        })?;
        self.accept(&record);
        Ok(())
    }

    /// Before the first checked record of a `from_seq` run, records below
    /// `from_seq` are skipped; they must still show their seq.
    fn skips(&self, number: usize, body: &[u8]) -> Result<bool, Problem> {
        let Some(from) = self.from_seq.filter(|_| self.first.is_none()) else {
            return Ok(false);
        };
        match serde_json::from_slice::<Peek>(body) {
            Ok(peek) => Ok(peek.record.seq < from),
            Err(err) => Err(self.unreadable(number, body, &err)),
        }
    }

    /// Position, chain, hash, signature and receipt id of a parsed record.
    fn check_record(&self, signed: &SignedRecord) -> Result<(), String> {
        let record = &signed.record;
        let expected = self.expected_seq().unwrap_or(record.seq);
        if record.seq != expected {
            return Err(format!(
                "expected record {expected}, found record {}: a record is missing or out of order",
                record.seq
            ));
        }
        match &self.last {
            Some(last) if record.prev_hash != last.hash => {
                return Err(format!(
                    "does not chain to record {}: its prev_hash is not that record's hash",
                    last.seq
                ));
            }
            None if record.seq == 0 && record.prev_hash != ZERO_HASH => {
                return Err(
                    "record 0 must have a prev_hash of 64 zeros: the start of the log was altered"
                        .into(),
                );
            }
            _ => {}
        }
        verify_record(signed, self.public_key)?;
        if seq_of_receipt(&record.receipt_id) != Some(record.seq) {
            return Err(format!(
                "receipt id {} does not name this record",
                shown(&record.receipt_id)
            ));
        }
        Ok(())
    }

    /// The seq the next checked record must have, when known: 0 for a whole
    /// file, `from_seq` until the first, then one after the last.
    fn expected_seq(&self) -> Option<u64> {
        match (&self.last, self.from_seq) {
            (Some(last), _) => Some(last.seq + 1),
            (None, None) => Some(0),
            (None, Some(from)) => Some(from),
        }
    }

    /// A line that is not a signed record. serde's message names the field
    /// or syntax at fault; its "line 1" is dropped as the file line is given.
    fn unreadable(&self, number: usize, body: &[u8], err: &serde_json::Error) -> Problem {
        let text = err.to_string();
        let message = text
            .rsplit_once(" at line ")
            .map_or(text.as_str(), |(m, _)| m);
        let peek = serde_json::from_slice::<Peek>(body).ok();
        let skipping = self.from_seq.is_some() && self.first.is_none();
        let expected = if skipping { None } else { self.expected_seq() };
        Problem {
            line: number,
            seq: peek.as_ref().map(|p| p.record.seq).or(expected),
            receipt_id: peek.and_then(|p| p.record.receipt_id),
            reason: format!(
                "not a valid signed record: {message} (at column {})",
                err.column()
            ),
        }
    }

    fn accept(&mut self, signed: &SignedRecord) {
        self.checked += 1;
        self.first.get_or_insert(signed.record.seq);
        self.last = Some(Verified {
            seq: signed.record.seq,
            hash: signed.hash.clone(),
            time: signed.record.time.clone(),
        });
    }

    fn report(self, problem: Option<Problem>) -> VerifyReport {
        let head = match (self.last, self.from_seq) {
            (Some(last), _) => Some(Head {
                records: last.seq + 1,
                hash: last.hash,
                time: Some(last.time),
            }),
            (None, None) => Some(Head {
                records: 0,
                hash: ZERO_HASH.to_string(),
                time: None,
            }),
            (None, Some(_)) => None,
        };
        VerifyReport {
            checked: self.checked,
            first: self.first,
            head,
            problem,
        }
    }
}

/// `Option<f64>` as an exact decimal string: serde_json's shortest
/// round-trip text for the value, read back with Rust's exact parser.
/// Non-finite values (refused by `append`) serialize as `null`, like
/// serde_json does for numbers, so hashing never fails.
mod exact_f64 {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::{Error as _, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) if v.is_finite() => {
                let text = serde_json::to_string(v).map_err(S::Error::custom)?;
                serializer.serialize_some(&text)
            }
            _ => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<f64>, D::Error> {
        deserializer.deserialize_option(OptionVisitor)
    }

    struct OptionVisitor;

    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<f64>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("null or a finite number (as a decimal string)")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(NumberVisitor).map(Some)
        }
    }

    /// Accepts the canonical string, and plain JSON numbers for hand-written
    /// entries (which then re-serialize as strings).
    struct NumberVisitor;

    impl Visitor<'_> for NumberVisitor {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a finite number (as a decimal string)")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<f64, E> {
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(E::invalid_value(de::Unexpected::Str(text), &self)),
            }
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::Arc;

    use super::*;
    use crate::audit::key::KEY_FILE;

    fn entry(i: u64) -> Entry {
        Entry {
            event: "release".into(),
            outcome: "released".into(),
            principal: "CN=alice,O=Acme".into(),
            organization: Some("Acme".into()),
            consumers: vec!["Acme".into()],
            datasets: vec!["sales".into()],
            policy_version: "v1".into(),
            query_id: Some(format!("q{i}")),
            rows: Some(1000 + i),
            epsilon: Some(0.5),
            ..Entry::default()
        }
    }

    /// A log in a fresh directory with `n` records appended.
    fn log_with(n: u64) -> (tempfile::TempDir, AuditLog, Vec<Receipt>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        let receipts = (0..n)
            .map(|i| log.append(entry(i)).expect("append"))
            .collect();
        (dir, log, receipts)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        fs::write(path, text).expect("write");
    }

    fn edit_line(path: &Path, index: usize, edit: impl FnOnce(&str) -> String) {
        let mut all = lines(path);
        let edited = edit(&all[index]);
        assert_ne!(edited, all[index], "the edit must change the line");
        all[index] = edited;
        write_lines(path, &all);
    }

    fn problem(log: &AuditLog, from_seq: Option<u64>) -> Problem {
        let report = verify_file(log.path(), &log.key().public_key(), from_seq).expect("verify");
        report.problem.expect("a problem")
    }

    fn assert_clean(log: &AuditLog, records: u64) {
        let report = verify_file(log.path(), &log.key().public_key(), None).expect("verify");
        assert_eq!(report.problem, None, "{report}");
        assert_eq!(report.checked, records);
        assert_eq!(report.head, Some(log.head()));
    }

    #[test]
    fn appended_records_verify() {
        let (_dir, log, receipts) = log_with(6);
        assert_clean(&log, 6);
        let head = log.head();
        assert_eq!(head.records, 6);
        assert_eq!(head.hash, receipts[5].hash);
        let report = verify_file(log.path(), &log.key().public_key(), None).expect("verify");
        assert_eq!(report.first, Some(0));
        assert!(
            report.to_string().starts_with("6 records verified"),
            "{report}"
        );
        let record = log
            .get(&receipts[0].receipt_id)
            .expect("get")
            .expect("found");
        assert_eq!(record.record.prev_hash, ZERO_HASH);
        assert_eq!(
            log.get(&receipts[1].receipt_id)
                .expect("get")
                .expect("found")
                .record
                .prev_hash,
            receipts[0].hash
        );
    }

    #[test]
    fn empty_log_verifies_with_an_empty_head() {
        let (_dir, log, _) = log_with(0);
        assert_clean(&log, 0);
        assert_eq!(
            log.head(),
            Head {
                records: 0,
                hash: ZERO_HASH.into(),
                time: None
            }
        );
    }

    #[test]
    fn records_have_the_documented_shape() {
        let (_dir, log, receipts) = log_with(1);
        let line = &lines(log.path())[0];
        assert!(line.starts_with(r#"{"record":{"seq":0,"time":""#), "{line}");
        assert!(line.contains(r#""epsilon":"0.5","delta":null}"#), "{line}");
        let record = log
            .get(&receipts[0].receipt_id)
            .expect("get")
            .expect("found");
        let time = &record.record.time;
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
        assert!(
            time.ends_with('Z') && time.len() == "2025-01-01T00:00:00.000Z".len(),
            "{time}"
        );
        assert_eq!(record.signature.len(), 128);
        assert_eq!(to_hex(&canonical_hash(&record.record)), record.hash);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(log.path())
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn changed_value_is_content_changed_at_that_record() {
        let (_dir, log, _) = log_with(6);
        edit_line(log.path(), 3, |l| {
            l.replace(r#""rows":1003"#, r#""rows":1009"#)
        });
        let found = problem(&log, None);
        assert_eq!((found.line, found.seq), (4, Some(3)));
        assert!(
            found
                .reason
                .contains("content changed after it was written"),
            "{found}"
        );
        assert!(
            found
                .to_string()
                .starts_with("record 3 (line 4, receipt r00000003-"),
            "{found}"
        );
    }

    #[test]
    fn broken_json_is_not_a_valid_record() {
        let (_dir, log, _) = log_with(6);
        edit_line(log.path(), 3, |l| l.replacen(r#""rows":"#, r#""rows:"#, 1));
        let found = problem(&log, None);
        assert_eq!((found.line, found.seq), (4, Some(3)));
        assert!(
            found.reason.starts_with("not a valid signed record"),
            "{found}"
        );
        let report = verify_file(log.path(), &log.key().public_key(), None).expect("verify");
        assert_eq!(report.checked, 3);
        assert_eq!(report.head.map(|h| h.records), Some(3));
    }

    #[test]
    fn deleted_record_is_reported_at_the_next_one() {
        let (_dir, log, _) = log_with(6);
        let mut all = lines(log.path());
        all.remove(2);
        write_lines(log.path(), &all);
        let found = problem(&log, None);
        assert_eq!((found.line, found.seq), (3, Some(3)));
        assert!(
            found.reason.contains("expected record 2, found record 3"),
            "{found}"
        );
    }

    #[test]
    fn swapped_records_are_reported_at_the_first_swapped_line() {
        let (_dir, log, _) = log_with(6);
        let mut all = lines(log.path());
        all.swap(2, 3);
        write_lines(log.path(), &all);
        let found = problem(&log, None);
        assert_eq!(found.line, 3);
        assert_eq!(found.seq, Some(3));
        assert!(found.reason.contains("out of order"), "{found}");
    }

    #[test]
    fn record_zero_must_start_from_zeros() {
        let (_dir, log, _) = log_with(2);
        // Even correctly signed, record 0 must anchor the chain at zeros.
        let mut all = lines(log.path());
        let mut first: SignedRecord = serde_json::from_str(&all[0]).expect("parse");
        first.record.prev_hash = "11".repeat(32);
        all[0] = serde_json::to_string(&sign_record(first.record, log.key())).expect("json");
        write_lines(log.path(), &all);
        let found = problem(&log, None);
        assert_eq!((found.line, found.seq), (1, Some(0)));
        assert!(found.reason.contains("64 zeros"), "{found}");
    }

    #[test]
    fn record_resigned_with_the_right_key_breaks_the_chain_after_it() {
        let (_dir, log, _) = log_with(6);
        edit_line(log.path(), 2, |line| {
            let mut signed: SignedRecord = serde_json::from_str(line).expect("parse");
            signed.record.entry.rows = Some(1);
            serde_json::to_string(&sign_record(signed.record, log.key())).expect("json")
        });
        let found = problem(&log, None);
        assert_eq!((found.line, found.seq), (4, Some(3)));
        assert!(
            found.reason.starts_with("does not chain to record 2"),
            "{found}"
        );
    }

    /// Replaces record 4's entry, re-hashes it correctly and signs it with
    /// `forge`, which must not pass as the log's key.
    fn forge_record_4(log: &AuditLog, forge: impl FnOnce(&mut SignedRecord)) {
        edit_line(log.path(), 4, |line| {
            let mut signed: SignedRecord = serde_json::from_str(line).expect("parse");
            signed.record.entry.rows = Some(1);
            signed.hash = to_hex(&canonical_hash(&signed.record));
            forge(&mut signed);
            serde_json::to_string(&signed).expect("json")
        });
    }

    fn assert_signature_problem_at_4(log: &AuditLog) {
        let found = problem(log, None);
        assert_eq!((found.line, found.seq), (5, Some(4)));
        let expected = format!("signature does not verify with key {}", log.key().key_id());
        assert!(found.reason.starts_with(&expected), "{found}");
    }

    #[test]
    fn forged_record_signed_by_another_key_is_a_signature_problem() {
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = AuditKey::load_or_create(other_dir.path()).expect("key");
        // The forger's own key id...
        let (_dir, log, _) = log_with(6);
        forge_record_4(&log, |s| *s = sign_record(s.record.clone(), &other));
        assert_signature_problem_at_4(&log);
        // ...or the log's key id with the forger's signature.
        let (_dir, log, _) = log_with(6);
        let key_id = log.key().key_id();
        forge_record_4(&log, |s| {
            s.signature = to_hex(&other.sign_hash(&canonical_hash(&s.record)));
            s.key_id = key_id;
        });
        assert_signature_problem_at_4(&log);
    }

    #[test]
    fn random_signature_bytes_are_a_signature_problem() {
        let (_dir, log, _) = log_with(6);
        let mut noise = [0u8; 64];
        SystemRandom::new().fill(&mut noise).expect("random");
        forge_record_4(&log, |s| s.signature = to_hex(&noise));
        assert_signature_problem_at_4(&log);
    }

    #[test]
    fn from_seq_skips_earlier_tampering_but_not_later() {
        let (_dir, log, _) = log_with(6);
        edit_line(log.path(), 1, |l| {
            l.replace(r#""rows":1001"#, r#""rows":1002"#)
        });
        assert_eq!(problem(&log, None).seq, Some(1));
        let report = verify_file(log.path(), &log.key().public_key(), Some(3)).expect("verify");
        assert_eq!(report.problem, None, "{report}");
        assert_eq!((report.checked, report.first), (3, Some(3)));
        assert_eq!(report.head, Some(log.head()));
        edit_line(log.path(), 4, |l| {
            l.replace(r#""rows":1004"#, r#""rows":1005"#)
        });
        let found = problem(&log, Some(3));
        assert_eq!((found.line, found.seq), (5, Some(4)));
        assert!(found.reason.contains("content changed"), "{found}");
    }

    #[test]
    fn from_seq_still_needs_readable_earlier_lines_and_the_start_record() {
        let (_dir, log, _) = log_with(6);
        edit_line(log.path(), 1, |l| l.replacen('{', "[", 1));
        let found = problem(&log, Some(3));
        assert_eq!((found.line, found.seq), (2, None));
        let (_dir, log, _) = log_with(6);
        let mut all = lines(log.path());
        all.remove(3);
        write_lines(log.path(), &all);
        let found = problem(&log, Some(3));
        assert!(
            found.reason.contains("expected record 3, found record 4"),
            "{found}"
        );
    }

    #[test]
    fn incomplete_last_line_is_reported() {
        let (_dir, log, _) = log_with(3);
        let text = fs::read_to_string(log.path()).expect("read");
        fs::write(log.path(), text.trim_end_matches('\n')).expect("write");
        let found = problem(&log, None);
        assert_eq!((found.line, found.seq), (3, Some(2)));
        assert!(found.reason.starts_with("incomplete last line"), "{found}");
    }

    #[test]
    fn receipts_verify_and_match_their_records() {
        let (_dir, log, receipts) = log_with(5);
        let public = log.key().public_key();
        for receipt in &receipts {
            assert_eq!(verify_receipt(receipt, &public), Ok(()));
            let record = log.get(&receipt.receipt_id).expect("get").expect("found");
            assert!(receipt_matches(receipt, &record));
            assert_eq!(
                Receipt::from_header(&receipt.to_header()).expect("header"),
                *receipt
            );
        }
        let mut altered = receipts[2].clone();
        let flipped = if altered.hash.starts_with('0') {
            "1"
        } else {
            "0"
        };
        altered.hash.replace_range(0..1, flipped);
        assert!(verify_receipt(&altered, &public).is_err());
        let record = log
            .get(&receipts[2].receipt_id)
            .expect("get")
            .expect("found");
        assert!(!receipt_matches(&altered, &record));
        assert!(!receipt_matches(&receipts[1], &record));
        let mut wrong_seq = receipts[2].clone();
        wrong_seq.seq = 3;
        assert!(verify_receipt(&wrong_seq, &public).is_err());
        assert!(Receipt::from_header("{\"receipt_id\":1}").is_err());
    }

    #[test]
    fn get_needs_the_exact_receipt_id() {
        let (_dir, log, receipts) = log_with(3);
        let id = &receipts[1].receipt_id;
        let guessed = format!("{}00000000", &id[..id.len() - 8]);
        assert_ne!(&guessed, id);
        assert_eq!(log.get(&guessed).expect("get"), None);
        assert_eq!(log.get("r00000009-00000000").expect("get"), None);
        assert_eq!(log.get("nonsense").expect("get"), None);
        assert!(log.get(id).expect("get").is_some());
    }

    #[test]
    fn receipt_ids_encode_the_seq() {
        assert_eq!(seq_of_receipt("r00000005-0a1b2c3d"), Some(5));
        assert_eq!(seq_of_receipt("r123456789-0a1b2c3d"), Some(123_456_789));
        for bad in [
            "r5-0a1b2c3d",
            "r00000005-0A1B2C3D",
            "r00000005-0a1b2c3",
            "x00000005-0a1b2c3d",
            "r+0000005-0a1b2c3d",
            "r000000005-0a1b2c3d",
        ] {
            assert_eq!(seq_of_receipt(bad), None, "{bad}");
        }
    }

    #[test]
    fn reopened_log_continues_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        for i in 0..3 {
            log.append(entry(i)).expect("append");
        }
        let head = log.head();
        drop(log);
        let log = AuditLog::open(dir.path()).expect("reopen");
        assert_eq!(log.head(), head);
        let receipt = log.append(entry(3)).expect("append");
        assert_eq!(receipt.seq, 3);
        log.append(entry(4)).expect("append");
        assert_clean(&log, 5);
    }

    #[test]
    fn torn_tail_is_repaired_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        for i in 0..3 {
            log.append(entry(i)).expect("append");
        }
        let path = log.path().to_path_buf();
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(br#"{"record":{"seq":3,"ti"#)
            .expect("garbage");
        drop(file);
        assert_eq!(problem_at(&path, dir.path()).line, 4);
        let log = AuditLog::open(dir.path()).expect("reopen repairs");
        assert!(fs::read(&path).expect("read").ends_with(b"\n"));
        assert_eq!(log.head().records, 3);
        log.append(entry(3)).expect("append");
        assert_clean(&log, 4);
    }

    fn problem_at(path: &Path, dir: &Path) -> Problem {
        let public =
            crate::audit::key::read_public_key(&dir.join(crate::audit::key::PUBLIC_KEY_FILE))
                .expect("pem");
        verify_file(path, &public, None)
            .expect("verify")
            .problem
            .expect("a problem")
    }

    /// Two handles on one directory stand for two connector processes on
    /// one state directory: their appends interleave into one chain.
    #[test]
    fn two_writers_on_one_file_form_one_chain() {
        let (dir, first, _) = log_with(3);
        let second = Arc::new(AuditLog::open(dir.path()).expect("second handle"));
        let first = Arc::new(first);
        let threads: Vec<_> = [first.clone(), second.clone()]
            .into_iter()
            .enumerate()
            .map(|(t, log)| {
                std::thread::spawn(move || {
                    (0..100)
                        .map(|i| log.append(entry(t as u64 * 1000 + i)).expect("append"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let receipts: Vec<Receipt> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        let report = verify_file(first.path(), &first.key().public_key(), None).expect("verify");
        assert!(report.problem.is_none(), "{report}");
        assert_eq!(report.checked, 203);
        assert_eq!(first.head(), second.head());
        for receipt in &receipts {
            let record = second
                .get(&receipt.receipt_id)
                .expect("get")
                .expect("found");
            assert!(receipt_matches(receipt, &record));
        }
    }

    #[test]
    fn concurrent_appends_form_one_chain() {
        let (_dir, log, _) = log_with(0);
        let log = Arc::new(log);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| log.append(entry(t * 100 + i)).expect("append"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let receipts: Vec<Receipt> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(receipts.len(), 400);
        assert_clean(&log, 400);
        let mut seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..400).collect::<Vec<_>>());
        for receipt in &receipts {
            let record = log.get(&receipt.receipt_id).expect("get").expect("found");
            assert!(receipt_matches(receipt, &record));
        }
    }

    #[test]
    fn open_fails_clearly_when_the_key_was_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        log.append(entry(0)).expect("append");
        drop(log);
        let other = tempfile::tempdir().expect("tempdir");
        AuditKey::load_or_create(other.path()).expect("key");
        fs::copy(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).expect("replace key");
        let err = AuditLog::open(dir.path()).expect_err("must refuse");
        let text = format!("{err:#}");
        assert!(
            text.contains("does not verify with this connector's audit key"),
            "{text}"
        );
        assert!(text.contains("sluice audit verify"), "{text}");
        assert!(text.contains(LOG_FILE), "{text}");
    }

    #[test]
    fn open_fails_clearly_when_the_last_record_is_damaged() {
        let (dir, log, _) = log_with(3);
        edit_line(log.path(), 2, |l| {
            l.replace(r#""rows":1002"#, r#""rows":1003"#)
        });
        drop(log);
        let text = format!("{:#}", AuditLog::open(dir.path()).expect_err("must refuse"));
        assert!(text.contains("content changed"), "{text}");
        let (dir, log, _) = log_with(3);
        edit_line(log.path(), 2, |l| l.replacen('{', "[", 1));
        drop(log);
        let text = format!("{:#}", AuditLog::open(dir.path()).expect_err("must refuse"));
        assert!(
            text.contains("cannot be read") && text.contains("line 3"),
            "{text}"
        );
    }

    #[test]
    fn scan_pages_through_matching_records() {
        let (_dir, log, _) = log_with(25);
        let even = |r: &SignedRecord| r.record.entry.rows.is_some_and(|rows| rows % 2 == 0);
        let seqs = |page: &[SignedRecord]| page.iter().map(|r| r.record.seq).collect::<Vec<_>>();
        let (page, next) = log.scan(0, 10, even).expect("scan");
        assert_eq!(seqs(&page), (0..20).step_by(2).collect::<Vec<_>>());
        assert_eq!(next, Some(19));
        let (page, next) = log.scan(19, 10, even).expect("scan");
        assert_eq!(seqs(&page), vec![20, 22, 24]);
        assert_eq!(next, None);
        let all = |_: &SignedRecord| true;
        let (page, next) = log.scan(0, 10, all).expect("scan");
        assert_eq!((seqs(&page), next), ((0..10).collect(), Some(10)));
        let (page, next) = log.scan(15, 10, all).expect("scan");
        assert_eq!((seqs(&page), next), ((15..25).collect(), None));
        assert_eq!(log.scan(25, 10, all).expect("scan"), (Vec::new(), None));
    }

    #[test]
    fn floats_survive_the_file_exactly() {
        // Values serde_json's default parser reads back one ulp off.
        let tricky = [
            0.1 + 0.2,
            4.871_314_133_432_336e-8,
            1e-9 / 3.0,
            7.296_267_179_458_751e-246,
            1.0,
        ];
        let (_dir, log, _) = log_with(0);
        let mut receipts = Vec::new();
        for (i, &value) in tricky.iter().enumerate() {
            let entry = Entry {
                epsilon: Some(value),
                delta: Some(value / 7.0),
                ..entry(i as u64)
            };
            receipts.push((log.append(entry.clone()).expect("append"), entry));
        }
        assert_clean(&log, tricky.len() as u64);
        for (receipt, entry) in receipts {
            let record = log.get(&receipt.receipt_id).expect("get").expect("found");
            assert_eq!(record.record.entry, entry);
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = f64::from_bits(state);
            let entry = Entry {
                epsilon: value.is_finite().then_some(value),
                ..Entry::default()
            };
            let json = serde_json::to_string(&entry).expect("json");
            assert_eq!(
                serde_json::from_str::<Entry>(&json).expect("parse"),
                entry,
                "{json}"
            );
        }
    }

    #[test]
    fn non_finite_values_are_refused() {
        let (_dir, log, _) = log_with(1);
        let entry = Entry {
            delta: Some(f64::NAN),
            ..entry(1)
        };
        let err = log.append(entry).expect_err("NaN");
        assert!(format!("{err}").contains("delta"), "{err}");
        assert_eq!(log.head().records, 1);
        assert_clean(&log, 1);
    }
}
