//! Errors, one type per kind of failure (see the crate documentation).
//!
//! The `Display` of every error is the whole message, path and underlying
//! cause included. So that error-chain printers (such as anyhow's `{:#}`) do
//! not repeat it, an underlying `io::Error` or `serde_json::Error` is kept in
//! a `cause` field rather than returned by [`std::error::Error::source`];
//! errors of this crate nested in another (a [`KeyError`] inside a
//! [`StoreError`]) are transparent.

use std::io;
use std::path::PathBuf;

use crate::encoding::shown;

/// The audit log cannot be opened, read or appended to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The signing key next to the log cannot be loaded or created.
    #[error(transparent)]
    Key(#[from] KeyError),

    /// `open(2)` of the log failed.
    #[error("cannot open the audit log {}: {cause}", .path.display())]
    Open { path: PathBuf, cause: io::Error },

    /// Taking the exclusive file lock failed.
    #[error("cannot lock the audit log {}: {cause}", .path.display())]
    Lock { path: PathBuf, cause: io::Error },

    /// Reading (or reading the metadata of) the log failed.
    #[error("cannot read the audit log {}: {cause}", .path.display())]
    Read { path: PathBuf, cause: io::Error },

    /// Seeking to a record failed.
    #[error("cannot seek in the audit log {}: {cause}", .path.display())]
    Seek { path: PathBuf, cause: io::Error },

    /// Reading one record's line failed.
    #[error("cannot read record {seq} of {}: {cause}", .path.display())]
    ReadRecord {
        seq: u64,
        path: PathBuf,
        cause: io::Error,
    },

    /// Reading one line of the file failed during [`verify_file`](crate::verify_file).
    #[error("cannot read line {line} of {}: {cause}", .path.display())]
    ReadLine {
        line: usize,
        path: PathBuf,
        cause: io::Error,
    },

    /// Cutting off the incomplete last line found at open failed.
    #[error("cannot truncate the incomplete last line of {}: {cause}", .path.display())]
    RepairTornTail { path: PathBuf, cause: io::Error },

    /// Cutting off an unfinished line another process left failed.
    #[error("cannot truncate {}: {cause}", .path.display())]
    Truncate { path: PathBuf, cause: io::Error },

    /// The line the index names for record `seq` is not a signed record.
    #[error(
        "record {seq} of the audit log {} cannot be read; run `sluice audit verify`: {cause}",
        .path.display()
    )]
    UnreadableRecord {
        seq: u64,
        path: PathBuf,
        cause: serde_json::Error,
    },

    /// The line the index names for record `seq` holds another record: the
    /// file changed under the running connector.
    #[error(
        "line {} of the audit log {} holds record {found}, not {seq}; run `sluice audit verify`",
        .seq + 1,
        .path.display()
    )]
    MisplacedRecord { seq: u64, found: u64, path: PathBuf },

    /// At open, a complete line of the log is not the next record of the
    /// chain: unreadable, out of order, not chained to the one before, or
    /// changed since it was written.
    #[error(
        "the audit log {} is damaged at line {line}: {reason}. The connector does not append to a \
         damaged chain: run `sluice audit verify` to see it, restore it from a backup (or move it \
         aside, keeping it as evidence, to start a new log), and start again",
        .path.display()
    )]
    DamagedRecord {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    /// At open, the signing key is missing but the log has records.
    #[error(
        "the audit signing key {} is missing, but the audit log {} has records signed with it: \
         restore it from a backup, and start again (a new key could not continue the chain, so \
         the connector does not make one)",
        .key.display(),
        .path.display()
    )]
    KeyMissing { key: PathBuf, path: PathBuf },

    /// At open, the log is missing but its signing key is there.
    #[error(
        "the audit log {} is missing, but its signing key {} is there: the log was deleted or \
         moved. Restore it from a backup, and start again; to start a new log deliberately (its \
         records begin again at 0), create an empty file there",
        .path.display(),
        .key.display()
    )]
    LogMissing { path: PathBuf, key: PathBuf },

    /// At open, the last line is not a signed record.
    #[error(
        "the last record of the audit log {} (line {line}) cannot be read; run `sluice audit verify`: {cause}",
        .path.display()
    )]
    UnreadableLastRecord {
        path: PathBuf,
        line: usize,
        cause: serde_json::Error,
    },

    /// At open, the last record's seq does not match the number of lines.
    #[error(
        "the audit log {} has {lines} lines but its last record is record {last_seq}: records are missing \
         or duplicated; run `sluice audit verify`",
        .path.display()
    )]
    MissingRecords {
        path: PathBuf,
        lines: usize,
        last_seq: u64,
    },

    /// At open, the last record does not verify with the key in the
    /// directory: the log was signed by another key or is damaged.
    #[error(
        "the last record of the audit log {} (record {seq}) does not verify with this connector's \
         audit key {key_id}: {reason}. The log was signed by another key or is damaged; run `sluice audit verify`",
        .path.display()
    )]
    ForeignLastRecord {
        path: PathBuf,
        seq: u64,
        key_id: String,
        reason: VerifyError,
    },

    /// A record another process appended does not verify with this key.
    #[error(
        "record {seq} of the audit log {}, appended by another process, does not verify: {reason}",
        .path.display()
    )]
    ForeignAppend {
        seq: u64,
        path: PathBuf,
        reason: VerifyError,
    },

    /// An entry's ε or δ is NaN or infinite, which the canonical form
    /// cannot hold. Nothing was written.
    #[error("an audit entry's {field} must be a finite number, not {value:?}")]
    NonFinite {
        field: &'static str,
        value: Option<f64>,
    },

    /// The log refuses appends until it is reopened (a failed write could
    /// not be undone, or the file shrank under the running connector).
    #[error("the audit log {} refuses appends: {reason}", .path.display())]
    Refused { path: PathBuf, reason: String },

    /// The file is shorter than what this process already indexed.
    #[error(
        "the audit log {} refuses appends: the file shrank from {from} to {to} bytes under the running \
         connector; run `sluice audit verify`",
        .path.display()
    )]
    Shrank { path: PathBuf, from: u64, to: u64 },

    /// A record could not be serialized (cannot happen for finite values).
    #[error("cannot serialize an audit record: {cause}")]
    Serialize { cause: serde_json::Error },

    /// Writing or `fsync`ing the record failed; the file was cut back.
    #[error("cannot append record {seq} to the audit log {}: {cause}", .path.display())]
    Append {
        seq: u64,
        path: PathBuf,
        cause: io::Error,
    },

    /// The system random source failed (for the receipt id's nonce).
    #[error("the system random source failed")]
    Random,
}

/// A signing or public key cannot be created, read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The audit directory cannot be created.
    #[error("cannot create the audit directory {}: {cause}", .dir.display())]
    CreateDir { dir: PathBuf, cause: io::Error },

    /// ring could not generate a key pair.
    #[error("cannot generate an Ed25519 audit signing key")]
    Generate,

    /// The private key file cannot be read.
    #[error("cannot read the audit signing key {}: {cause}", .path.display())]
    Read { path: PathBuf, cause: io::Error },

    /// The private key file is not an Ed25519 PKCS#8 key.
    #[error(
        "the audit signing key {} is not a valid Ed25519 PKCS#8 key ({reason}): restore it from a \
         backup (a new key could not continue the log's chain)",
        .path.display()
    )]
    Invalid { path: PathBuf, reason: String },

    /// A key file cannot be created.
    #[error("cannot create {}: {cause}", .path.display())]
    Create { path: PathBuf, cause: io::Error },

    /// A key file cannot be written or flushed.
    #[error("cannot write {}: {cause}", .path.display())]
    Write { path: PathBuf, cause: io::Error },

    /// The temporary file cannot be renamed into place.
    #[error("cannot rename {} to {}: {cause}", .from.display(), .to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        cause: io::Error,
    },

    /// The public key file cannot be read.
    #[error("cannot read the public key file {}: {cause}", .path.display())]
    ReadPublic { path: PathBuf, cause: io::Error },

    /// The public key file does not hold an Ed25519 public key.
    #[error("the public key file {} is not usable: {cause}", .path.display())]
    UnusablePublic {
        path: PathBuf,
        cause: PublicKeyError,
    },
}

/// Text that is not an Ed25519 public key (PEM or 64 hex characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicKeyError {
    /// Neither a PEM block nor 64 hex characters.
    #[error(
        "expected an Ed25519 public key as PEM (\"-----BEGIN PUBLIC KEY-----\") or as 64 hex characters"
    )]
    Unrecognized,
    /// A PEM block without its end line.
    #[error("the PEM block has no \"-----END PUBLIC KEY-----\" line")]
    UnterminatedPem,
    /// The PEM body is not base64.
    #[error("the PEM body is not valid base64")]
    Base64,
    /// The PEM holds another kind of key.
    #[error("the PEM public key is not an Ed25519 key")]
    NotEd25519,
    /// Key bytes of the wrong length.
    #[error("an Ed25519 public key has 32 bytes, not {0}")]
    Length(usize),
}

/// Why a record or receipt does not verify. The `Display` is the reason an
/// operator reads (also used as [`Problem::reason`](crate::Problem::reason)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The record's hash does not match its content.
    #[error("content changed after it was written (its hash does not match)")]
    ContentChanged,
    /// The receipt's id does not encode its seq.
    #[error("receipt id {} does not name record {seq}", shown(.receipt_id))]
    ReceiptIdMismatch { receipt_id: String, seq: u64 },
    /// The receipt's hash is not a lowercase hex SHA-256.
    #[error("the receipt's hash is not 64 lowercase hex characters")]
    MalformedHash,
    /// The record or receipt names another key than the one given.
    #[error("signature does not verify with key {expected}: it names key {}", shown(.named))]
    WrongKey { expected: String, named: String },
    /// The signature is malformed or does not verify with the key.
    #[error("signature does not verify with key {expected}")]
    BadSignature { expected: String },
}

/// Text that is not a receipt's JSON form ([`Receipt::to_header`](crate::Receipt::to_header)).
#[derive(Debug, thiserror::Error)]
#[error("not a valid audit receipt (expected its JSON form): {cause}")]
pub struct ReceiptParseError {
    /// What serde_json found wrong.
    pub cause: serde_json::Error,
}
