//! A receipt file → what `sluice receipt verify FILE --public-key KEY
//! [--record RECORD]` runs (`cli/control.rs::verify_receipt`, replayed here
//! step by step with the same library calls, since the CLI lives in the
//! binary): trim; a signed audit record (`verify_record`, then its receipt)
//! or else a receipt header (`Receipt::from_header`); `verify_receipt`; with
//! a record, `verify_record` and `receipt_matches`. Also the public key file
//! (`parse_public_key`: PEM or hex).
//!
//! Signatures cannot be forged, so in the re-signing modes whatever parses
//! is signed again with the test key first (a record: hash and signature; a
//! receipt: a signature over its hash, if that is 64 hex digits), so the
//! checks after the signature run too.
//!
//! Input: byte 0: mode (0 raw, 1 re-signed, 2 raw with the file also as
//! `--record`, 3 re-signed record with its own receipt as `--record`,
//! 4 public key text); the rest is the file.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_audit::{
    AuditKey, Receipt, SignedRecord, parse_public_key, receipt_matches, sign_record,
    verify_receipt, verify_record,
};

fn key() -> &'static AuditKey {
    static KEY: OnceLock<AuditKey> = OnceLock::new();
    KEY.get_or_init(|| {
        AuditKey::load_or_create(&sluice_fuzz::scratch().join("receipt-key")).expect("a test key")
    })
}

/// Signs again whatever parses: a record, or a receipt's hash.
fn resign(text: &str) -> String {
    let text = text.trim();
    if let Ok(signed) = serde_json::from_str::<SignedRecord>(text) {
        return serde_json::to_string(&sign_record(signed.record, key())).expect("serializes");
    }
    if let Ok(mut receipt) = serde_json::from_str::<Receipt>(text) {
        if let Some(hash) = hex32(&receipt.hash) {
            receipt.key_id = key().key_id();
            receipt.signature = sluice_fuzz::to_hex(&key().sign_hash(&hash));
        }
        return receipt.to_header();
    }
    text.to_string()
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// `sluice receipt verify`: Ok when the CLI would print "verifies".
fn verify(file: &str, record: Option<&str>, public: &[u8; 32]) -> Result<Receipt, String> {
    let text = file.trim();
    let receipt = match serde_json::from_str::<SignedRecord>(text) {
        Ok(signed) => {
            verify_record(&signed, public).map_err(|e| e.to_string())?;
            signed.receipt()
        }
        Err(_) => Receipt::from_header(text).map_err(|e| e.to_string())?,
    };
    verify_receipt(&receipt, public).map_err(|e| e.to_string())?;
    if let Some(record) = record {
        let signed: SignedRecord =
            serde_json::from_str(record.trim()).map_err(|e| e.to_string())?;
        verify_record(&signed, public).map_err(|e| e.to_string())?;
        if !receipt_matches(&receipt, &signed) {
            return Err("not the record of this receipt".into());
        }
    }
    Ok(receipt)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    // The CLI reads the file with `read_to_string`: UTF-8 or an error.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let public = key().public_key();
    match mode % 5 {
        0 => {
            let _ = verify(text, None, &public);
        }
        1 => {
            let _ = verify(&resign(text), None, &public);
        }
        2 => {
            let _ = verify(text, Some(text), &public);
        }
        3 => {
            let signed = resign(text);
            if let Ok(receipt) = verify(&signed, Some(&signed), &public) {
                // A record verified with its own receipt: the receipt is
                // that record's.
                let record: SignedRecord = serde_json::from_str(&signed).expect("verified");
                assert_eq!(receipt, record.receipt());
            }
        }
        _ => {
            if let Ok(key) = parse_public_key(text) {
                let _ = verify(&resign(text), None, &key);
            }
        }
    }
});
