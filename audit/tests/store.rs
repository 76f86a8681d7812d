//! The append-only store: appends, reads, reopening, repair and several
//! writers, through the public API.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{assert_clean, edit_line, entry, lines, log_with, to_hex};
use sluice_audit::{
    AuditKey, AuditLog, Entry, Head, KEY_FILE, LOG_FILE, Notice, NoticeLevel, PUBLIC_KEY_FILE,
    Problem, Receipt, SignedRecord, StoreError, ZERO_HASH, canonical_hash, read_public_key,
    receipt_matches, verify_file,
};

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

fn problem_at(path: &Path, dir: &Path) -> Problem {
    let public = read_public_key(&dir.join(PUBLIC_KEY_FILE)).expect("pem");
    verify_file(path, &public, None)
        .expect("verify")
        .problem
        .expect("a problem")
}

/// Collects notices, for the tests that check them.
fn recorder() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn(&Notice) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let record = move |notice: &Notice| {
        let level = notice.level();
        sink.lock()
            .expect("notices")
            .push(format!("{level:?}: {notice}"));
    };
    (seen, record)
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
    let (notices, sink) = recorder();
    let log = AuditLog::open_with_notices(dir.path(), sink).expect("reopen repairs");
    assert!(fs::read(&path).expect("read").ends_with(b"\n"));
    assert_eq!(log.head().records, 3);
    log.append(entry(3)).expect("append");
    assert_clean(&log, 4);
    let notices = notices.lock().expect("notices").clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].starts_with("Warning: removing an incomplete last line (22 bytes)"),
        "{notices:?}"
    );
    assert!(notices[0].contains(LOG_FILE), "{notices:?}");
}

#[test]
fn a_new_key_is_a_notice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (notices, sink) = recorder();
    AuditLog::open_with_notices(dir.path(), sink).expect("open");
    let notices = notices.lock().expect("notices").clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].starts_with("Info: created a new audit signing key")
            && notices[0].contains(KEY_FILE),
        "{notices:?}"
    );
    let (notices, sink) = recorder();
    AuditLog::open_with_notices(dir.path(), sink).expect("reopen");
    assert!(notices.lock().expect("notices").is_empty());
    let (notices, sink) = recorder();
    let other = tempfile::tempdir().expect("tempdir");
    AuditKey::load_or_create_with_notices(other.path(), &sink).expect("key");
    assert_eq!(notices.lock().expect("notices").len(), 1);
    assert_eq!(
        NoticeLevel::Info.max(NoticeLevel::Warning),
        NoticeLevel::Warning
    );
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

/// A writer that crashed mid-line leaves an unfinished line; the next
/// writer catches up, cuts it off and continues the chain.
#[test]
fn another_writers_unfinished_line_is_cut_off() {
    let (dir, _first, _) = log_with(2);
    let (notices, sink) = recorder();
    let second = AuditLog::open_with_notices(dir.path(), sink).expect("second handle");
    let path = second.path().to_path_buf();
    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(br#"{"record":{"seq":2"#).expect("garbage");
    drop(file);
    let receipt = second.append(entry(2)).expect("append");
    assert_eq!(receipt.seq, 2);
    assert_clean(&second, 3);
    let notices = notices.lock().expect("notices").clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].starts_with("Warning: removing an unfinished line (18 bytes)"),
        "{notices:?}"
    );
}

#[test]
fn a_file_that_shrank_refuses_appends() {
    let (_dir, log, _) = log_with(3);
    let text = lines(log.path());
    common::write_lines(log.path(), &text[..2]);
    let err = log.append(entry(3)).expect_err("shrank");
    assert!(matches!(err, StoreError::Shrank { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("refuses appends: the file shrank from")
            && text.contains("sluice audit verify")
            && text.contains(LOG_FILE),
        "{text}"
    );
    let err = log.append(entry(3)).expect_err("still refused");
    assert!(matches!(err, StoreError::Refused { .. }), "{err:?}");
    assert!(
        err.to_string().contains("refuses appends: the file shrank"),
        "{err}"
    );
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
    assert!(
        matches!(err, StoreError::ForeignLastRecord { .. }),
        "{err:?}"
    );
    // The Display alone carries the whole message.
    let text = format!("{err}");
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
    let text = format!("{}", AuditLog::open(dir.path()).expect_err("must refuse"));
    assert!(text.contains("content changed"), "{text}");
    let (dir, log, _) = log_with(3);
    edit_line(log.path(), 2, |l| l.replacen('{', "[", 1));
    drop(log);
    let text = format!("{}", AuditLog::open(dir.path()).expect_err("must refuse"));
    assert!(
        text.contains("cannot be read") && text.contains("line 3"),
        "{text}"
    );
}

#[test]
fn open_fails_clearly_on_a_corrupt_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join(KEY_FILE), b"not a key").expect("write");
    let err = AuditLog::open(dir.path()).expect_err("corrupt");
    assert!(matches!(err, StoreError::Key(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("is not a valid Ed25519 PKCS#8 key"), "{text}");
    assert!(text.contains(KEY_FILE), "{text}");
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
    assert_eq!(
        err.to_string(),
        "an audit entry's delta must be a finite number, not Some(NaN)"
    );
    assert_eq!(log.head().records, 1);
    assert_clean(&log, 1);
}

#[test]
fn open_refuses_a_damaged_record_anywhere_in_the_chain() {
    let (dir, log, _) = log_with(5);
    let path = log.path().to_path_buf();
    drop(log);
    let damaged = |edit: &dyn Fn(&str) -> String| {
        let original = fs::read(&path).expect("read");
        edit_line(&path, 1, edit);
        let err = AuditLog::open(dir.path()).expect_err("must refuse");
        fs::write(&path, original).expect("restore");
        assert!(
            matches!(err, StoreError::DamagedRecord { line: 2, .. }),
            "{err:?}"
        );
        err.to_string()
    };
    let text = damaged(&|l| l.replace(r#""rows":1001"#, r#""rows":1009"#));
    assert!(text.contains("record 1's content changed"), "{text}");
    assert!(text.contains("sluice audit verify"), "{text}");
    assert!(text.contains("restore it from a backup"), "{text}");
    let text = damaged(&|l| l[..l.len() / 2].to_string());
    assert!(text.contains("cannot be read"), "{text}");
    let text = damaged(&|l| l.replace(r#""seq":1,"#, r#""seq":7,"#));
    assert!(
        text.contains("holds record 7 where record 1 belongs"),
        "{text}"
    );
    // The same record laid out differently (as a hand-edited log may be)
    // is still the same record: checked in full, not refused.
    edit_line(&path, 1, |l| {
        let value: serde_json::Value = serde_json::from_str(l).expect("json");
        serde_json::to_string_pretty(&value)
            .expect("json")
            .replace('\n', " ")
    });
    let log = AuditLog::open(dir.path()).expect("a re-laid-out record still chains");
    log.append(entry(5)).expect("append");
    assert_eq!(log.head().records, 6);
}

#[test]
fn open_refuses_a_lost_key_or_a_lost_log() {
    let (dir, log, _) = log_with(2);
    drop(log);
    let key = dir.path().join(KEY_FILE);
    let saved = fs::read(&key).expect("key");
    fs::remove_file(&key).expect("remove key");
    let err = AuditLog::open(dir.path()).expect_err("no new key over a log with records");
    assert!(matches!(err, StoreError::KeyMissing { .. }), "{err:?}");
    assert!(!key.exists(), "no key was made");
    fs::write(&key, saved).expect("restore key");
    let log_file = dir.path().join(LOG_FILE);
    fs::rename(&log_file, dir.path().join("moved.jsonl")).expect("move log");
    let err = AuditLog::open(dir.path()).expect_err("no new log beside its key");
    assert!(matches!(err, StoreError::LogMissing { .. }), "{err:?}");
    assert!(!log_file.exists(), "no log was made");
    // An empty file is the operator starting a new log on purpose.
    fs::write(&log_file, "").expect("empty log");
    let log = AuditLog::open(dir.path()).expect("a new log, deliberately");
    assert_eq!(log.head().records, 0);
}
