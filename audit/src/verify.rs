//! Offline verification: a whole log file, one record, or one receipt,
//! with nothing but the public key.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::encoding::{decode_lower_hex, shown, to_hex};
use crate::error::{StoreError, VerifyError};
use crate::key::{key_id_of, verify_hash_signature};
use crate::record::{Head, Receipt, SignedRecord, ZERO_HASH, canonical_hash, seq_of_receipt};

/// Checks one record on its own: the hash matches the content, and the
/// signature over it verifies with `public_key`.
pub fn verify_record(record: &SignedRecord, public_key: &[u8; 32]) -> Result<(), VerifyError> {
    let computed = canonical_hash(&record.record);
    if to_hex(&computed) != record.hash {
        return Err(VerifyError::ContentChanged);
    }
    check_signature(&record.key_id, &computed, &record.signature, public_key)
}

/// Checks a receipt on its own: well formed, and signed by `public_key`.
/// Use [`receipt_matches`] to tie it to a record.
pub fn verify_receipt(receipt: &Receipt, public_key: &[u8; 32]) -> Result<(), VerifyError> {
    if seq_of_receipt(&receipt.receipt_id) != Some(receipt.seq) {
        return Err(VerifyError::ReceiptIdMismatch {
            receipt_id: receipt.receipt_id.clone(),
            seq: receipt.seq,
        });
    }
    let hash = decode_lower_hex::<32>(&receipt.hash).ok_or(VerifyError::MalformedHash)?;
    check_signature(&receipt.key_id, &hash, &receipt.signature, public_key)
}

/// The key id must name `public_key` and the signature must verify over
/// `hash`; both failures read "signature does not verify with key …".
fn check_signature(
    key_id: &str,
    hash: &[u8; 32],
    signature: &str,
    public_key: &[u8; 32],
) -> Result<(), VerifyError> {
    let expected = key_id_of(public_key);
    if key_id != expected {
        return Err(VerifyError::WrongKey {
            expected,
            named: key_id.to_owned(),
        });
    }
    let valid = decode_lower_hex::<64>(signature)
        .is_some_and(|signature| verify_hash_signature(public_key, hash, &signature));
    if valid {
        Ok(())
    } else {
        Err(VerifyError::BadSignature { expected })
    }
}

/// True when the receipt is exactly this record's and the record's hash
/// still matches its content (which binds the receipt id and seq too).
pub fn receipt_matches(receipt: &Receipt, record: &SignedRecord) -> bool {
    receipt == &record.receipt() && to_hex(&canonical_hash(&record.record)) == record.hash
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
///
/// A damaged log is not an error: it is a report with a [`Problem`]. The
/// error is for a file that cannot be opened or read at all.
pub fn verify_file(
    path: &Path,
    public_key: &[u8; 32],
    from_seq: Option<u64>,
) -> Result<VerifyReport, StoreError> {
    let file = File::open(path).map_err(|cause| StoreError::Open {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut verifier = Verifier::new(public_key, from_seq);
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|cause| StoreError::ReadLine {
                line: number,
                path: path.to_path_buf(),
                cause,
            })?;
        if read == 0 {
            break;
        }
        if let Err(problem) = verifier.check_line(number, &line) {
            return Ok(verifier.report(Some(problem)));
        }
    }
    Ok(verifier.report(None))
}

/// Why a parsed record does not belong where it is; the `Display` is the
/// [`Problem::reason`].
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error(
        "expected record {expected}, found record {found}: a record is missing or out of order"
    )]
    OutOfOrder { expected: u64, found: u64 },
    #[error("does not chain to record {previous}: its prev_hash is not that record's hash")]
    Unchained { previous: u64 },
    #[error("record 0 must have a prev_hash of 64 zeros: the start of the log was altered")]
    BadStart,
    #[error(transparent)]
    Record(#[from] VerifyError),
    #[error("receipt id {} does not name this record", shown(.receipt_id))]
    ReceiptId { receipt_id: String },
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
            reason: reason.to_string(),
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
    fn check_record(&self, signed: &SignedRecord) -> Result<(), ChainError> {
        let record = &signed.record;
        let expected = self.expected_seq().unwrap_or(record.seq);
        if record.seq != expected {
            return Err(ChainError::OutOfOrder {
                expected,
                found: record.seq,
            });
        }
        match &self.last {
            Some(last) if record.prev_hash != last.hash => {
                return Err(ChainError::Unchained { previous: last.seq });
            }
            None if record.seq == 0 && record.prev_hash != ZERO_HASH => {
                return Err(ChainError::BadStart);
            }
            _ => {}
        }
        verify_record(signed, self.public_key)?;
        if seq_of_receipt(&record.receipt_id) != Some(record.seq) {
            return Err(ChainError::ReceiptId {
                receipt_id: record.receipt_id.clone(),
            });
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
