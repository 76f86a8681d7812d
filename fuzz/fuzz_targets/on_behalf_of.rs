//! The broker's `x-sluice-on-behalf-of` header → what the certificate
//! interceptor (`identity::authenticate` → `relayed`) runs on it:
//! `MetadataValue::to_str`, then `relay::Assertion::verify(token,
//! broker_cert_der)` (split, base64url, the broker certificate's key,
//! signature, JSON payload, clock, subject), then `Assertion::subject` and
//! `Principal::relayed_by`.
//!
//! A signature cannot be forged, so raw tokens stop at the signature check.
//! Behind it lies the payload parser: mode 1 signs the fuzz bytes as the
//! payload with the broker's Ed25519 key (the documented token format:
//! `v1.<payload>.<signature>`, the signature over
//! `sluice-on-behalf-of-v1\n<payload part>`), so the JSON and the checks
//! after it are fuzzed too. Mode 2 parses the fuzz bytes as the client
//! certificate (`identity::principal_from_der`, which every request's
//! certificate goes through, and `Assertion::verify` against it).
//!
//! Input: byte 0 = mode (0 raw token, 1 signed payload, 2 certificate);
//! the rest = token, payload JSON or DER.

#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sluice::identity::principal_from_der;
use sluice::relay::{Assertion, RelaySigner};

struct Broker {
    key: Ed25519KeyPair,
    cert_der: Vec<u8>,
    token: String,
}

/// PKCS#8 (v1) of the Ed25519 key with seed [7; 32]: the broker's key is
/// fixed, so that seeds holding its tokens keep their valid signatures.
fn broker_pkcs8() -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&[7; 32]);
    der
}

/// A broker with an Ed25519 client certificate (deterministic signatures,
/// fast), and a valid token it made, as the broker's `RelaySigner` makes
/// them.
fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| {
        let key = rcgen::KeyPair::try_from(broker_pkcs8().as_slice()).expect("the broker key");
        let mut params =
            rcgen::CertificateParams::new(vec!["broker.example".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Broker");
        let cert = params.self_signed(&key).expect("a self-signed certificate");
        let pem = key.serialize_pem();
        let signer = RelaySigner::from_pem(&pem).expect("the broker key signs");
        let token = signer.sign(&sluice_fuzz::principal(0)).expect("a token");
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key.serialize_der())
            .expect("ring reads the key");
        assert_eq!(pair.public_key().as_ref().len(), 32);
        Broker {
            key: pair,
            cert_der: cert.der().to_vec(),
            token,
        }
    })
}

/// What the interceptor does with the header value and the leaf.
fn relayed(token: &[u8], leaf: &[u8]) {
    // Header values reach `relayed` as tonic metadata: only visible ASCII
    // (and tab, space) passes `to_str`.
    let Ok(value) = tonic::metadata::MetadataValue::try_from(token) else {
        return;
    };
    let Ok(token) = value.to_str() else {
        return;
    };
    if let Ok(assertion) = Assertion::verify(token, leaf) {
        assert!(!assertion.sub.is_empty());
        let consumer = assertion.subject().relayed_by(sluice_fuzz::principal(4));
        let _ = consumer.to_string();
    }
}

/// A client certificate as `sluice certs` issues them: SAN URI, O, CN.
fn client_cert(
    uri: Option<&str>,
    organization: Option<&str>,
    common_name: Option<&str>,
) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(o) = organization {
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, o);
    }
    if let Some(cn) = common_name {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    if let Some(uri) = uri {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().expect("an IA5 URI")));
    }
    params
        .self_signed(&key)
        .expect("a certificate")
        .der()
        .to_vec()
}

/// Tokens, payloads and certificates (`tests/fuzz.sh --seeds`).
fn write_seeds() {
    let Some(dir) = sluice_fuzz::seed_dir() else {
        return;
    };
    let broker = broker();
    let write = |selector: u8, bytes: &[u8]| {
        sluice_fuzz::write_seed(&dir, &sluice_fuzz::with_selector(selector, bytes))
    };
    write(0, broker.token.as_bytes());
    let payload = broker
        .token
        .split('.')
        .nth(1)
        .expect("v1.payload.signature");
    let json = URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    write(1, &json);
    let relative = |iat: i64, exp: i64, sub: &str| {
        serde_json::json!({
            "sub": sub,
            "organization": "City Planning Agency",
            "common_name": "planning-analyst",
            "san_uris": [sub],
            "iat": iat,
            "exp": exp,
            "nonce": "000102030405060708090a0b",
        })
        .to_string()
    };
    let planning = "spiffe://sluice.demo/org/city-planning";
    write(3, relative(0, 300, planning).as_bytes());
    write(3, relative(-400, -100, planning).as_bytes());
    write(3, relative(200, 400, planning).as_bytes());
    write(3, relative(0, 301, planning).as_bytes());
    write(3, relative(0, 300, "").as_bytes());
    write(2, &broker.cert_der);
    write(
        2,
        &client_cert(
            Some(planning),
            Some("City Planning Agency"),
            Some("planning-analyst"),
        ),
    );
    write(
        2,
        &client_cert(
            None,
            Some("Axle Supplier Consortium"),
            Some("supplier-analyst"),
        ),
    );
    write(2, &client_cert(None, None, Some("cn-only")));
    write(2, &client_cert(None, None, None));
}

fuzz_target!(init: write_seeds(), |data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let broker = broker();
    match mode % 4 {
        0 => relayed(bytes, &broker.cert_der),
        1 => signed(bytes, broker),
        3 => {
            // Times relative to now: the payload's `iat` and `exp`, when
            // integers, are offsets from the clock, so the checks after
            // the clock's (lifetime, skew, subject) are reachable.
            let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(bytes) else {
                return;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            for field in ["iat", "exp"] {
                if let Some(offset) = map.get(field).and_then(serde_json::Value::as_i64) {
                    map.insert(field.into(), now.saturating_add(offset).into());
                }
            }
            let json = serde_json::to_vec(&serde_json::Value::Object(map)).expect("JSON");
            signed(&json, broker);
        }
        _ => {
            if let Ok(principal) = principal_from_der(bytes) {
                assert!(!principal.id.is_empty());
            }
            relayed(broker.token.as_bytes(), bytes);
        }
    }
});

/// A token whose payload is `json` exactly, signed by the broker.
fn signed(json: &[u8], broker: &Broker) {
    let payload = URL_SAFE_NO_PAD.encode(json);
    let message = [b"sluice-on-behalf-of-v1\n".as_slice(), payload.as_bytes()].concat();
    let signature = URL_SAFE_NO_PAD.encode(broker.key.sign(&message));
    let token = format!("v1.{payload}.{signature}");
    relayed(token.as_bytes(), &broker.cert_der);
}
