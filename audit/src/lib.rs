//! Sluice's audit trail: the signed, hash-chained record format, the
//! append-only store (`<dir>/audit.jsonl`) and the offline verifier.
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
//!   Record 0 chains to [`ZERO_HASH`].
//! * **Signatures.** The hash is signed with the directory's Ed25519 key
//!   ([`AuditKey`], `signing-key.p8`) over [`SIGNING_DOMAIN`] followed by
//!   the 32 hash bytes; `key_id` is [`key_id_of`] the public key, which is
//!   published as `public-key.pem`.
//! * **Receipt ids.** `r` + the seq zero-padded to at least 8 digits + `-` +
//!   8 random lowercase hex digits ([`seq_of_receipt`]): a receipt id names
//!   its record, and cannot be guessed from another one.
//! * **Exact numbers.** `epsilon` and `delta` are written as JSON *strings*
//!   holding the shortest decimal that reads back to the same `f64`.
//!   serde_json's default float parser can be off by one unit in the last
//!   place (for about one value in ten with 17 digits), which would make an
//!   untouched record fail verification; Rust's `str::parse::<f64>` is exact.
//!
//! # What the crate guarantees
//!
//! * **Durability.** [`AuditLog::append`] writes the line in one call and
//!   `fsync`s it before returning its [`Receipt`], so a caller that releases
//!   data only after `append` returned can never release unaudited data. A
//!   line cut short by a crash was never acknowledged, and [`AuditLog::open`]
//!   removes it. A failed write is cut back; if that fails too, the log
//!   refuses appends until it is reopened.
//! * **One chain.** Several processes may append to one log (two connectors
//!   on one state directory): an exclusive file lock orders appends, and each
//!   writer first catches up with the records others wrote.
//! * **Only this key's log is continued.** [`AuditLog::open`] refuses a log
//!   whose last record does not verify with the directory's key.
//! * **Offline verification.** [`verify_file`] needs only the file and the
//!   public key ([`read_public_key`]); it streams the file and stops at the
//!   first [`Problem`] with a reason an operator can act on.
//!   [`verify_record`], [`verify_receipt`] and [`receipt_matches`] check a
//!   single record or receipt. The `sluice-audit-verify` binary of this crate
//!   does both from the command line.
//!
//! # Errors
//!
//! One type per kind of failure:
//!
//! | type | returned by | means |
//! |---|---|---|
//! | [`StoreError`] | [`AuditLog`], [`verify_file`] | the log cannot be opened, read or appended to, or is not what this key wrote |
//! | [`KeyError`] | [`AuditKey::load_or_create`], [`read_public_key`] | a key file cannot be created, read or parsed |
//! | [`PublicKeyError`] | [`parse_public_key`] | text that is not an Ed25519 public key |
//! | [`VerifyError`] | [`verify_record`], [`verify_receipt`] | a record or receipt does not verify |
//! | [`ReceiptParseError`] | [`Receipt::from_header`] | text that is not a receipt |
//!
//! The `Display` of each is the whole message, path and underlying cause
//! included, and says what to do next where there is something to do, so
//! printing `{e}` is enough. So that error-chain printers (anyhow's `{:#}`)
//! do not repeat it, an underlying `io::Error` or `serde_json::Error` is a
//! `cause` field, not [`std::error::Error::source`]. A damaged log is not an
//! error of [`verify_file`] but a [`VerifyReport`] with a [`Problem`].
//!
//! Things worth logging that are not failures (a new key, a repaired torn
//! line) are [`Notice`]s, handed to the callback of
//! [`AuditLog::open_with_notices`]; the crate itself logs nothing.

mod encoding;
mod error;
mod files;
mod key;
mod notice;
mod record;
mod store;
mod verify;

pub use error::{KeyError, PublicKeyError, ReceiptParseError, StoreError, VerifyError};
pub use key::{
    AuditKey, ED25519_SPKI_PREFIX, KEY_FILE, PUBLIC_KEY_FILE, SIGNING_DOMAIN, key_id_of,
    parse_public_key, read_public_key, verify_hash_signature,
};
pub use notice::{Notice, NoticeLevel};
pub use record::{
    Entry, Head, Receipt, Record, SignedRecord, ZERO_HASH, canonical_hash, seq_of_receipt,
    sign_record,
};
pub use store::{AuditLog, LOG_FILE, SCAN_WINDOW};
pub use verify::{
    Problem, VerifyReport, receipt_matches, verify_file, verify_receipt, verify_record,
};
