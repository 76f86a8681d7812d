//! Offline verification: tampering is found at the right line with the
//! right reason; receipts verify and match their records.

mod common;

use std::fs;

use common::{edit_line, lines, log_with, problem, to_hex, write_lines};
use ring::rand::{SecureRandom, SystemRandom};
use sluice_audit::{
    AuditKey, AuditLog, Receipt, SignedRecord, VerifyError, canonical_hash, receipt_matches,
    seq_of_receipt, sign_record, verify_file, verify_receipt, verify_record,
};

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

/// The reasons are matched by the CLI's callers: keep their wording.
#[test]
fn verify_errors_keep_their_wording() {
    let (_dir, log, receipts) = log_with(3);
    let public = log.key().public_key();
    let key_id = log.key().key_id();
    let mut record = log
        .get(&receipts[1].receipt_id)
        .expect("get")
        .expect("found");
    assert_eq!(verify_record(&record, &public), Ok(()));

    let mut wrong_seq = receipts[1].clone();
    wrong_seq.seq = 2;
    let err = verify_receipt(&wrong_seq, &public).expect_err("wrong seq");
    assert_eq!(
        err.to_string(),
        format!("receipt id {} does not name record 2", wrong_seq.receipt_id)
    );
    let mut upper = receipts[1].clone();
    upper.hash = upper.hash.to_uppercase();
    assert_eq!(
        verify_receipt(&upper, &public),
        Err(VerifyError::MalformedHash)
    );
    assert_eq!(
        VerifyError::MalformedHash.to_string(),
        "the receipt's hash is not 64 lowercase hex characters"
    );
    let mut other_key = receipts[1].clone();
    other_key.key_id = "ed25519:0000000000000000\n".into();
    assert_eq!(
        verify_receipt(&other_key, &public)
            .expect_err("other key")
            .to_string(),
        format!(
            "signature does not verify with key {key_id}: it names key ed25519:0000000000000000\\n"
        )
    );
    let mut bad_signature = receipts[1].clone();
    bad_signature.signature = "00".repeat(64);
    assert_eq!(
        verify_receipt(&bad_signature, &public)
            .expect_err("bad signature")
            .to_string(),
        format!("signature does not verify with key {key_id}")
    );

    record.record.entry.rows = Some(7);
    let err = verify_record(&record, &public).expect_err("changed");
    assert_eq!(err, VerifyError::ContentChanged);
    assert_eq!(
        err.to_string(),
        "content changed after it was written (its hash does not match)"
    );
    let err = Receipt::from_header("nope").expect_err("not json");
    assert!(
        err.to_string()
            .starts_with("not a valid audit receipt (expected its JSON form): "),
        "{err}"
    );
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
fn a_missing_log_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = AuditKey::load_or_create(dir.path()).expect("key");
    let path = dir.path().join("absent.jsonl");
    let err = verify_file(&path, &key.public_key(), None).expect_err("missing");
    let text = err.to_string();
    assert!(
        text.starts_with("cannot open the audit log ") && text.contains("absent.jsonl"),
        "{text}"
    );
}
