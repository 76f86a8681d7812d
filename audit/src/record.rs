//! The record format: what is hashed, signed and written as one line.

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::encoding::{is_lower_hex, to_hex};
use crate::error::ReceiptParseError;
use crate::key::AuditKey;

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
    /// decimal string (see the crate documentation).
    #[serde(default, with = "exact_f64")]
    pub epsilon: Option<f64>,
    /// Differential-privacy δ charged; must be finite. Written as an exact
    /// decimal string (see the crate documentation).
    #[serde(default, with = "exact_f64")]
    pub delta: Option<f64>,
    /// zCDP ρ charged, for a budget with `accounting: zcdp` (`epsilon` and
    /// `delta` are then the query's own guarantee). Written like them;
    /// absent for every other query, so older records hash as before.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "exact_f64")]
    pub rho: Option<f64>,
    /// The δ charged alongside `rho` (a private selection's threshold; 0
    /// without one). Absent for every other query.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "exact_f64")]
    pub charged_delta: Option<f64>,
    /// The versions of the data that answered, one per dataset read: file
    /// sizes and modification times, object ETags, a database's
    /// transaction snapshot and read time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_versions: Vec<String>,
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
    /// Id of the signing key ([`key_id_of`](crate::key_id_of)).
    pub key_id: String,
    /// Lowercase hex Ed25519 signature over the hash (128 characters).
    pub signature: String,
}

/// What a caller gets back from [`AuditLog::append`](crate::AuditLog::append):
/// enough to prove later that the connector recorded the event, and to
/// fetch the record.
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
    pub fn from_header(text: &str) -> Result<Receipt, ReceiptParseError> {
        serde_json::from_str(text).map_err(|cause| ReceiptParseError { cause })
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
