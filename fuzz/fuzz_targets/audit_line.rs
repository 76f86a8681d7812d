//! An audit log file → `sluice_audit::verify_file` (what `sluice audit
//! verify` and `sluice-audit-verify` run: line by line, JSON, hash,
//! signature, chain, receipt ids, incomplete last line), from the start or
//! from a seq (`--from`).
//!
//! Signatures cannot be forged, so raw lines stop at the signature check of
//! their first record. Behind it lies the chain logic: in the re-signing
//! modes every line that parses as a signed record (or as a bare record) is
//! hashed and signed again with the test key, and optionally renumbered and
//! chained (seq, receipt id, prev_hash), as a log the connector wrote would
//! be; lines that do not parse stay as they are.
//!
//! Input: byte 0: bits 0–1 mode (0 raw, 1 re-signed, 2 re-signed and
//! chained, 3 raw from a seq); bits 2–7 the seq for `--from` in mode 3 (in
//! modes 1 and 2 bit 2 also verifies from seq 1). The rest is the file.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_audit::{AuditKey, Record, SignedRecord, ZERO_HASH, sign_record, verify_file};

fn key() -> &'static AuditKey {
    static KEY: OnceLock<AuditKey> = OnceLock::new();
    KEY.get_or_init(|| {
        AuditKey::load_or_create(&sluice_fuzz::scratch().join("audit-key")).expect("a test key")
    })
}

fn parse_record(line: &[u8]) -> Option<Record> {
    if let Ok(signed) = serde_json::from_slice::<SignedRecord>(line) {
        return Some(signed.record);
    }
    serde_json::from_slice::<Record>(line).ok()
}

/// Re-signs every line that parses; with `chain`, numbers records in order
/// and links each to the previous one's hash.
fn resign(file: &[u8], chain: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(file.len() * 2);
    let mut previous = ZERO_HASH.to_string();
    let mut seq = 0u64;
    for piece in file.split_inclusive(|&b| b == b'\n') {
        let (line, newline) = match piece.strip_suffix(b"\n") {
            Some(line) => (line, true),
            None => (piece, false),
        };
        match parse_record(line) {
            Some(mut record) => {
                if chain {
                    record.seq = seq;
                    let nonce = record
                        .receipt_id
                        .rsplit_once('-')
                        .map(|(_, n)| n.to_string())
                        .unwrap_or_default();
                    record.receipt_id = format!("r{seq:08}-{nonce}");
                    record.prev_hash = previous.clone();
                }
                let signed = sign_record(record, key());
                previous = signed.hash.clone();
                seq += 1;
                out.extend(serde_json::to_vec(&signed).expect("a record serializes"));
            }
            None => out.extend_from_slice(line),
        }
        if newline {
            out.push(b'\n');
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    let public = key().public_key();
    let (content, from) = match selector & 3 {
        0 => (file.to_vec(), None),
        3 => (file.to_vec(), Some(u64::from(selector >> 2))),
        mode => (resign(file, mode == 2), (selector & 4 != 0).then_some(1)),
    };
    let path = sluice_fuzz::scratch().join("audit.log");
    std::fs::write(&path, &content).expect("writing the log");
    let report = verify_file(&path, &public, from).expect("the file can be read");
    let lines = content.split_inclusive(|&b| b == b'\n').count() as u64;
    assert!(report.checked <= lines, "{report:?} from {lines} lines");
    if let Some(problem) = &report.problem {
        assert!(
            problem.line as u64 <= lines,
            "{problem:?} beyond {lines} lines"
        );
    }
    let _ = report.to_string();
});
