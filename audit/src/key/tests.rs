//! Tests that need the key's private parts; the rest are in `tests/key.rs`.

use super::*;

#[test]
fn rejects_bad_public_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = AuditKey::load_or_create(dir.path()).expect("create");
    let pem = key.public_key_pem();
    // An RSA-style OID in place of Ed25519's.
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der[8] = 0x71;
    der.extend_from_slice(&key.public_key());
    let wrong_oid = format!("{PEM_BEGIN}\n{}\n{PEM_END}\n", base64_encode(&der));
    let truncated = pem.replace("-----END PUBLIC KEY-----", "");
    for bad in [
        wrong_oid.as_str(),
        truncated.as_str(),
        "abc",
        &"g".repeat(64),
    ] {
        assert!(parse_public_key(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_public_key(&wrong_oid),
        Err(PublicKeyError::NotEd25519)
    );
    assert_eq!(
        parse_public_key(&truncated),
        Err(PublicKeyError::UnterminatedPem)
    );
    assert_eq!(parse_public_key("abc"), Err(PublicKeyError::Unrecognized));
    let missing = read_public_key(&dir.path().join("absent.pem")).expect_err("missing");
    assert!(format!("{missing:#}").contains("absent.pem"));
    assert!(missing.to_string().contains("absent.pem"), "{missing}");
}

#[test]
fn signatures_are_domain_separated_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = AuditKey::load_or_create(dir.path()).expect("create");
    let hash = [7u8; 32];
    let signature = key.sign_hash(&hash);
    let public = key.public_key();
    assert!(verify_hash_signature(&public, &hash, &signature));
    assert!(!verify_hash_signature(&public, &[8u8; 32], &signature));
    assert!(!verify_hash_signature(&public, &hash, &signature[..63]));
    // A plain signature over the hash alone (no domain) must not verify.
    let plain = key.pair.sign(&hash);
    assert!(!verify_hash_signature(&public, &hash, plain.as_ref()));
    let other = tempfile::tempdir().expect("tempdir");
    let other = AuditKey::load_or_create(other.path()).expect("create");
    assert!(!verify_hash_signature(
        &other.public_key(),
        &hash,
        &signature
    ));
    assert_ne!(key_id_of(&other.public_key()), key.key_id());
}
