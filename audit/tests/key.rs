//! The signing key on disk, through the public API (tests needing private
//! parts are in `src/key/tests.rs`).

mod common;

use std::fs;
use std::path::Path;

use common::to_hex;
use sluice_audit::{AuditKey, KEY_FILE, KeyError, PUBLIC_KEY_FILE, read_public_key};

#[test]
fn creates_loads_and_keeps_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("nested/audit");
    let first = AuditKey::load_or_create(&audit).expect("create");
    let again = AuditKey::load_or_create(&audit).expect("load");
    assert_eq!(first.public_key(), again.public_key());
    assert_eq!(first.key_id(), again.key_id());
    assert!(first.key_id().starts_with("ed25519:"));
    assert_eq!(first.key_id().len(), "ed25519:".len() + 16);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&audit.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&audit), 0o700);
    }
    let debug = format!("{first:?}");
    assert_eq!(
        debug,
        format!("AuditKey {{ key_id: {:?}, .. }}", first.key_id())
    );
}

#[test]
fn public_pem_is_spki_and_parses_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = AuditKey::load_or_create(dir.path()).expect("create");
    let pem_path = dir.path().join(PUBLIC_KEY_FILE);
    let pem = fs::read_to_string(&pem_path).expect("pem");
    assert_eq!(pem, key.public_key_pem());
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
    assert!(pem.ends_with("-----END PUBLIC KEY-----\n"));
    assert_eq!(read_public_key(&pem_path).expect("read"), key.public_key());
    let hex_path = dir.path().join("key.hex");
    fs::write(&hex_path, format!("  {}\n", to_hex(&key.public_key()))).expect("write");
    assert_eq!(
        read_public_key(&hex_path).expect("read hex"),
        key.public_key()
    );
}

#[test]
fn corrupt_key_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join(KEY_FILE), b"not a key").expect("write");
    let err = AuditKey::load_or_create(dir.path()).expect_err("corrupt");
    assert!(matches!(err, KeyError::Invalid { .. }), "{err:?}");
    let text = format!("{err}");
    assert!(text.contains("is not a valid Ed25519 PKCS#8 key"), "{text}");
    assert!(text.contains(KEY_FILE), "{text}");
}

#[test]
fn an_unusable_public_key_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.pem");
    fs::write(&path, "abc").expect("write");
    let err = read_public_key(&path).expect_err("bad");
    assert_eq!(
        err.to_string(),
        format!(
            "the public key file {} is not usable: expected an Ed25519 public key as PEM \
             (\"-----BEGIN PUBLIC KEY-----\") or as 64 hex characters",
            path.display()
        )
    );
}
