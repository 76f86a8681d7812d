//! The `sluice-audit-verify` binary, on logs written by `AuditLog`.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{edit_line, log_with};
use sluice_audit::{KEY_FILE, LOG_FILE, PUBLIC_KEY_FILE};

fn verify(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-audit-verify"))
        .args(args)
        .output()
        .expect("run sluice-audit-verify")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// Copies an audit directory for an auditor: the log and the public key,
/// not the signing key.
fn auditor_copy(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    for name in [LOG_FILE, PUBLIC_KEY_FILE] {
        fs::copy(dir.join(name), copy.path().join(name)).expect("copy");
    }
    assert!(!copy.path().join(KEY_FILE).exists());
    copy
}

#[test]
fn verifies_a_log_and_finds_tampering_in_a_copy() {
    let (dir, log, receipts) = log_with(5);
    let copy = auditor_copy(dir.path());

    let out = verify(&[arg(copy.path())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("5 records verified (records 0 to 4); head ")
            && stdout.contains(&receipts[4].hash),
        "{stdout}"
    );

    let out = verify(&[arg(copy.path()), "--from", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("2 records verified (records 3 to 4)"),
        "{}",
        text(&out.stdout)
    );

    edit_line(&copy.path().join(LOG_FILE), 2, |l| {
        l.replace(r#""rows":1002"#, r#""rows":1007"#)
    });
    let out = verify(&[arg(copy.path())]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "record 2 (line 3, receipt {}): content changed after it was written",
            receipts[2].receipt_id
        )) && stdout.contains("(2 records before it verified)"),
        "{stdout}"
    );
    assert_eq!(text(&out.stderr), "error: the audit log does not verify\n");

    // The original, untouched, still verifies.
    assert!(verify(&[arg(dir.path())]).status.success());
    drop(log);
}

#[test]
fn verifies_receipts_alone_and_against_their_records() {
    let (dir, log, receipts) = log_with(3);
    let work = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join(PUBLIC_KEY_FILE);
    let receipt_file = work.path().join("receipt.json");
    fs::write(&receipt_file, receipts[1].to_header()).expect("write");
    let record = log
        .get(&receipts[1].receipt_id)
        .expect("get")
        .expect("found");
    let record_file = work.path().join("record.json");
    fs::write(&record_file, serde_json::to_string(&record).expect("json")).expect("write");
    let success = format!(
        "receipt {} (record 1) verifies: signed by {}\n",
        receipts[1].receipt_id,
        log.key().key_id()
    );

    let out = verify(&["--receipt", arg(&receipt_file), "--public-key", arg(&pem)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), success);

    let out = verify(&[
        "--receipt",
        arg(&receipt_file),
        "--public-key",
        arg(&pem),
        "--record",
        arg(&record_file),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), success);

    // A signed record serves as its own receipt, also on standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-audit-verify"))
        .args(["--receipt", "-", "--public-key", arg(&pem)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&fs::read(&record_file).expect("read"))
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), success);

    // Another record than the receipt's.
    let other = log
        .get(&receipts[2].receipt_id)
        .expect("get")
        .expect("found");
    let other_file = work.path().join("other.json");
    fs::write(&other_file, serde_json::to_string(&other).expect("json")).expect("write");
    let out = verify(&[
        "--receipt",
        arg(&receipt_file),
        "--public-key",
        arg(&pem),
        "--record",
        arg(&other_file),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: record {} is not the one receipt {} was issued for (id or hash differ)\n",
            receipts[2].receipt_id, receipts[1].receipt_id
        )
    );

    // A receipt with a changed seq.
    let mut altered = receipts[1].clone();
    altered.seq = 2;
    fs::write(&receipt_file, altered.to_header()).expect("write");
    let out = verify(&["--receipt", arg(&receipt_file), "--public-key", arg(&pem)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: receipt {0}: receipt id {0} does not name record 2\n",
            receipts[1].receipt_id
        )
    );

    // Neither a receipt nor a record.
    fs::write(&receipt_file, "hello").expect("write");
    let out = verify(&["--receipt", arg(&receipt_file), "--public-key", arg(&pem)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with(&format!(
            "error: {} holds neither a receipt nor a signed audit record: not a valid audit receipt",
            receipt_file.display()
        )),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2_and_missing_files_exit_1() {
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("usage: sluice-audit-verify"));
    let out = verify(&["--receipt", "r.json"]);
    assert_eq!(out.status.code(), Some(2));
    let out = verify(&["dir", "--from", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = verify(&["--help"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("usage: sluice-audit-verify"));

    let empty = tempfile::tempdir().expect("tempdir");
    let out = verify(&[arg(empty.path())]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot read the public key file ")
            && stderr.contains(PUBLIC_KEY_FILE),
        "{stderr}"
    );
}
