//! Helpers shared by the integration tests (each test file uses some).
#![allow(dead_code)]

use std::fs;
use std::path::Path;

use sluice_audit::{AuditLog, Entry, Problem, Receipt, verify_file};

/// Lowercase hex, as the log writes hashes and signatures.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn entry(i: u64) -> Entry {
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
pub fn log_with(n: u64) -> (tempfile::TempDir, AuditLog, Vec<Receipt>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = AuditLog::open(dir.path()).expect("open");
    let receipts = (0..n)
        .map(|i| log.append(entry(i)).expect("append"))
        .collect();
    (dir, log, receipts)
}

pub fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(path, text).expect("write");
}

pub fn edit_line(path: &Path, index: usize, edit: impl FnOnce(&str) -> String) {
    let mut all = lines(path);
    let edited = edit(&all[index]);
    assert_ne!(edited, all[index], "the edit must change the line");
    all[index] = edited;
    write_lines(path, &all);
}

pub fn problem(log: &AuditLog, from_seq: Option<u64>) -> Problem {
    let report = verify_file(log.path(), &log.key().public_key(), from_seq).expect("verify");
    report.problem.expect("a problem")
}

pub fn assert_clean(log: &AuditLog, records: u64) {
    let report = verify_file(log.path(), &log.key().public_key(), None).expect("verify");
    assert_eq!(report.problem, None, "{report}");
    assert_eq!(report.checked, records);
    assert_eq!(report.head, Some(log.head()));
}
