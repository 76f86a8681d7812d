//! On-behalf-of assertions: how a broker tells a provider whom it relays a
//! query for.
//!
//! A broker connects to providers with its own client certificate and adds
//! the `x-sluice-on-behalf-of` header to each request: the end consumer's
//! identity (as the broker verified it from that consumer's certificate),
//! when the assertion was made and until when it holds, signed with the
//! private key of the broker's own client certificate. The provider verifies
//! the signature against the certificate the broker presented in the mTLS
//! handshake, so an assertion is only usable on a connection the broker
//! itself authenticated; a copied header is worthless to anyone else. The
//! usage policy then decides whether that broker is trusted at all and what
//! the end consumer may learn through it (`brokers:` in docs/policy.md).
//!
//! Token format: `v1.<payload>.<signature>`, both parts base64url without
//! padding; the payload is the JSON of [`Assertion`], the signature covers
//! `sluice-on-behalf-of-v1\n<payload part>`.
//!
//! ```
//! # use sluice::relay::{Assertion, RelaySigner};
//! # use sluice_policy::Principal;
//! let key = rcgen::KeyPair::generate().unwrap();
//! let cert = rcgen::CertificateParams::new(vec!["broker".into()])
//!     .unwrap()
//!     .self_signed(&key)
//!     .unwrap();
//! let signer = RelaySigner::from_pem(&key.serialize_pem()).unwrap();
//! let mut consumer = Principal::new("spiffe://city.example/org/planning");
//! consumer.organization = Some("City Planning".into());
//! let token = signer.sign(&consumer).unwrap();
//! let assertion = Assertion::verify(&token, cert.der()).unwrap();
//! assert_eq!(assertion.subject().id, consumer.id);
//! assert!(Assertion::verify(&token.replace("v1.", "v1.x"), cert.der()).is_err());
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use serde::{Deserialize, Serialize};
use sluice_policy::Principal;
use x509_parser::error::{PEMError, X509Error};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long an assertion holds. It is made per upstream query and used for
/// its GetFlightInfo and DoGet, so a few minutes cover any query that the
/// broker's own timeouts let run.
pub const ASSERTION_LIFETIME_SECS: i64 = 300;
/// Clock difference tolerated between broker and provider.
const CLOCK_SKEW_SECS: i64 = 60;
const CONTEXT: &[u8] = b"sluice-on-behalf-of-v1\n";
const PREFIX: &str = "v1.";

/// Why a provider refuses an on-behalf-of assertion. The messages complete
/// "the x-sluice-on-behalf-of header is not valid: …".
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("it is not a v1 assertion (`v1.<payload>.<signature>`)")]
    NotV1,
    #[error("it is not of the form `v1.<payload>.<signature>`")]
    Malformed,
    #[error("the signature is not base64url")]
    SignatureNotBase64,
    #[error("the client certificate cannot be parsed: {0}")]
    UnparsableCertificate(x509_parser::nom::Err<X509Error>),
    /// The broker's certificate has a key of a type providers cannot verify.
    #[error(
        "the client certificate's key type ({oid}) cannot sign assertions; use ECDSA P-256/P-384, Ed25519 or RSA"
    )]
    UnsupportedKeyType { oid: String },
    #[error("the signature does not verify against the key of the client certificate")]
    BadSignature,
    #[error("the payload is not base64url")]
    PayloadNotBase64,
    #[error("the payload is not a valid assertion: {0}")]
    InvalidPayload(serde_json::Error),
    #[error("it claims a lifetime over {ASSERTION_LIFETIME_SECS} s")]
    LifetimeTooLong,
    #[error("it has expired")]
    Expired,
    #[error("it was issued in the future (check the broker's clock)")]
    IssuedInFuture,
    #[error("the assertion names no consumer")]
    NoConsumer,
}

/// Why the broker's client key cannot sign assertions.
#[derive(Debug, thiserror::Error)]
pub enum RelayKeyError {
    #[error("the key file is not PEM: {0}")]
    NotPem(PEMError),
    #[error("the key file holds no `PRIVATE KEY` (PKCS#8) block")]
    NoPrivateKey,
    #[error("the key is not a PKCS#8 ECDSA P-256/P-384, Ed25519 or RSA private key")]
    UnsupportedKey,
}

/// Why the broker could not make an assertion (a fault on the broker's
/// host, not in the request).
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("no randomness available")]
    NoRandomness,
    #[error("{0}")]
    Encoding(serde_json::Error),
    #[error("signing failed")]
    Failed,
}

/// What a broker asserts: the end consumer, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// The end consumer's principal id.
    pub sub: String,
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub common_name: Option<String>,
    #[serde(default)]
    pub san_uris: Vec<String>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Random, so that two assertions are never equal (for the logs).
    pub nonce: String,
}

impl Assertion {
    /// The end consumer as the policy sees it (without the broker).
    pub fn subject(&self) -> Principal {
        Principal {
            id: self.sub.clone(),
            organization: self.organization.clone(),
            common_name: self.common_name.clone(),
            san_uris: self.san_uris.clone(),
            via: None,
        }
    }

    /// Checks `token` against the broker's certificate (DER, the leaf it
    /// presented in the handshake) and the clock.
    pub fn verify(token: &str, broker_cert_der: &[u8]) -> Result<Assertion, AssertionError> {
        let rest = token.strip_prefix(PREFIX).ok_or(AssertionError::NotV1)?;
        let (payload, sig) = rest.split_once('.').ok_or(AssertionError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| AssertionError::SignatureNotBase64)?;
        let (_, cert) = X509Certificate::from_der(broker_cert_der)
            .map_err(AssertionError::UnparsableCertificate)?;
        let spki = cert.public_key();
        let algorithm = verification_algorithm(spki)?;
        let key = signature::UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data);
        key.verify(&signed_message(payload), &sig)
            .map_err(|_| AssertionError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AssertionError::PayloadNotBase64)?;
        let assertion: Assertion =
            serde_json::from_slice(&json).map_err(AssertionError::InvalidPayload)?;
        assertion.check_time(unix_now())?;
        if assertion.sub.is_empty() {
            return Err(AssertionError::NoConsumer);
        }
        Ok(assertion)
    }

    fn check_time(&self, now: i64) -> Result<(), AssertionError> {
        // `iat` and `exp` are whatever the payload says, any i64: computed
        // in i128 they cannot overflow (in i64, `exp - iat` panicked in a
        // debug build, and in a release build wrapped to a negative
        // lifetime that passed, admitting an assertion that never expires;
        // found by fuzz/fuzz_targets/on_behalf_of.rs).
        let (iat, exp, now) = (i128::from(self.iat), i128::from(self.exp), i128::from(now));
        if exp - iat > i128::from(ASSERTION_LIFETIME_SECS) {
            return Err(AssertionError::LifetimeTooLong);
        }
        if now > exp + i128::from(CLOCK_SKEW_SECS) {
            return Err(AssertionError::Expired);
        }
        if iat > now + i128::from(CLOCK_SKEW_SECS) {
            return Err(AssertionError::IssuedInFuture);
        }
        Ok(())
    }
}

fn signed_message(payload_part: &str) -> Vec<u8> {
    [CONTEXT, payload_part.as_bytes()].concat()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

fn verification_algorithm(
    spki: &x509_parser::x509::SubjectPublicKeyInfo,
) -> Result<&'static dyn signature::VerificationAlgorithm, AssertionError> {
    let oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (oid.as_str(), curve.as_deref()) {
        (OID_EC, Some(OID_P256)) => Ok(&signature::ECDSA_P256_SHA256_ASN1),
        (OID_EC, Some(OID_P384)) => Ok(&signature::ECDSA_P384_SHA384_ASN1),
        (OID_ED25519, _) => Ok(&signature::ED25519),
        (OID_RSA, _) => Ok(&signature::RSA_PKCS1_2048_8192_SHA256),
        _ => Err(AssertionError::UnsupportedKeyType { oid }),
    }
}

/// Makes assertions with the private key of the broker's client
/// certificate.
pub struct RelaySigner {
    key: SigningKey,
    rng: SystemRandom,
}

enum SigningKey {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

impl RelaySigner {
    /// From a PKCS#8 PEM private key (what `sluice certs` writes).
    pub fn from_pem(pem: &str) -> Result<Self, RelayKeyError> {
        let der = pkcs8_der(pem)?;
        let rng = SystemRandom::new();
        let key = if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
        {
            SigningKey::Ecdsa(k)
        } else if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, &der, &rng)
        {
            SigningKey::Ecdsa(k)
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
            SigningKey::Ed25519(k)
        } else if let Ok(k) = RsaKeyPair::from_pkcs8(&der) {
            SigningKey::Rsa(k)
        } else {
            return Err(RelayKeyError::UnsupportedKey);
        };
        Ok(Self { key, rng })
    }

    /// An assertion that `consumer` asks, valid for
    /// [`ASSERTION_LIFETIME_SECS`].
    pub fn sign(&self, consumer: &Principal) -> Result<String, SigningError> {
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SigningError::NoRandomness)?;
        let iat = unix_now();
        let assertion = Assertion {
            sub: consumer.id.clone(),
            organization: consumer.organization.clone(),
            common_name: consumer.common_name.clone(),
            san_uris: consumer.san_uris.clone(),
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
            nonce: hex::encode(nonce),
        };
        let json = serde_json::to_vec(&assertion).map_err(SigningError::Encoding)?;
        let payload = URL_SAFE_NO_PAD.encode(json);
        let message = signed_message(&payload);
        let sig = match &self.key {
            SigningKey::Ecdsa(k) => k
                .sign(&self.rng, &message)
                .map_err(|_| SigningError::Failed)?
                .as_ref()
                .to_vec(),
            SigningKey::Ed25519(k) => k.sign(&message).as_ref().to_vec(),
            SigningKey::Rsa(k) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &self.rng, &message, &mut out)
                    .map_err(|_| SigningError::Failed)?;
                out
            }
        };
        Ok(format!("{PREFIX}{payload}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

fn pkcs8_der(pem: &str) -> Result<Vec<u8>, RelayKeyError> {
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(RelayKeyError::NotPem)?;
        if block.label == "PRIVATE KEY" {
            return Ok(block.contents);
        }
    }
    Err(RelayKeyError::NoPrivateKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> (RelaySigner, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["broker".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (
            RelaySigner::from_pem(&key.serialize_pem()).unwrap(),
            cert.der().to_vec(),
        )
    }

    fn consumer() -> Principal {
        let mut p = Principal::new("spiffe://city.example/org/planning");
        p.organization = Some("Städtische Planung".into());
        p.san_uris = vec![p.id.clone()];
        p
    }

    #[test]
    fn round_trip_keeps_every_attribute() {
        let (signer, cert) = broker();
        let token = signer.sign(&consumer()).unwrap();
        assert!(token.is_ascii(), "a header value must be ASCII");
        let got = Assertion::verify(&token, &cert).unwrap();
        assert_eq!(got.subject(), consumer());
    }

    #[test]
    fn every_supported_key_type_signs_and_verifies() {
        for algorithm in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["broker".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let signer = RelaySigner::from_pem(&key.serialize_pem()).unwrap();
            let token = signer.sign(&consumer()).unwrap();
            let got = Assertion::verify(&token, cert.der()).unwrap();
            assert_eq!(got.subject(), consumer(), "{algorithm:?}");
        }
    }

    #[test]
    fn another_certificate_does_not_verify() {
        let (signer, _) = broker();
        let (_, other) = broker();
        let token = signer.sign(&consumer()).unwrap();
        let err = Assertion::verify(&token, &other).unwrap_err();
        assert!(matches!(err, AssertionError::BadSignature), "{err}");
    }

    #[test]
    fn a_changed_payload_does_not_verify() {
        let (signer, cert) = broker();
        let token = signer.sign(&consumer()).unwrap();
        let (_, rest) = token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let mut forged = Assertion::verify(&token, &cert).unwrap();
        forged.sub = "spiffe://city.example/org/admin".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let err = Assertion::verify(&format!("v1.{payload}.{sig}"), &cert).unwrap_err();
        assert!(matches!(err, AssertionError::BadSignature), "{err}");
    }

    #[test]
    fn time_checks() {
        let now = 1_800_000_000;
        let base = Assertion {
            sub: "x".into(),
            organization: None,
            common_name: None,
            san_uris: vec![],
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
            nonce: "00".into(),
        };
        assert!(base.check_time(now).is_ok());
        assert!(base.check_time(now + ASSERTION_LIFETIME_SECS + 61).is_err());
        assert!(base.check_time(now - 61).is_err());
        let long = Assertion {
            exp: now + 10 * ASSERTION_LIFETIME_SECS,
            ..base
        };
        assert!(
            long.check_time(now)
                .unwrap_err()
                .to_string()
                .contains("lifetime")
        );
    }

    /// Regression (fuzz/fuzz_targets/on_behalf_of.rs): times at the ends of
    /// i64 overflowed `exp - iat` and `exp + skew`: a panic in a debug
    /// build, and in a release build a lifetime that wrapped negative and
    /// passed, so that an assertion claiming `exp` near i64::MAX never
    /// expired.
    #[test]
    fn extreme_times_are_refused_without_overflow() {
        let now = 1_800_000_000;
        let at = |iat: i64, exp: i64| Assertion {
            sub: "x".into(),
            organization: None,
            common_name: None,
            san_uris: vec![],
            iat,
            exp,
            nonce: "00".into(),
        };
        for (iat, exp) in [
            (i64::MIN, i64::MAX),
            (-200, i64::MAX - 100),
            (i64::MIN, now),
            (-1, i64::MAX),
        ] {
            let err = at(iat, exp).check_time(now).unwrap_err();
            assert!(
                matches!(err, AssertionError::LifetimeTooLong),
                "{iat} {exp}: {err}"
            );
        }
        let err = at(i64::MAX - 10, i64::MAX).check_time(now).unwrap_err();
        assert!(matches!(err, AssertionError::IssuedInFuture), "{err}");
        let err = at(i64::MIN, i64::MIN + 10).check_time(now).unwrap_err();
        assert!(matches!(err, AssertionError::Expired), "{err}");
        let err = at(now, now).check_time(i64::MAX).unwrap_err();
        assert!(matches!(err, AssertionError::Expired), "{err}");
        let err = at(now, now).check_time(i64::MIN).unwrap_err();
        assert!(matches!(err, AssertionError::IssuedInFuture), "{err}");
    }

    /// The same through `verify`, with a payload the broker's key signed.
    #[test]
    fn a_signed_assertion_that_never_expires_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["broker".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key.serialize_der()).unwrap();
        let payload = URL_SAFE_NO_PAD.encode(
            br#"{"sub":"spiffe://city.example/org/planning","iat":-200,"exp":9223372036854775707,"nonce":"00"}"#,
        );
        let sig = URL_SAFE_NO_PAD.encode(pair.sign(&signed_message(&payload)));
        let err = Assertion::verify(&format!("v1.{payload}.{sig}"), cert.der()).unwrap_err();
        assert!(matches!(err, AssertionError::LifetimeTooLong), "{err}");
    }

    #[test]
    fn malformed_tokens_give_reasons() {
        let (_, cert) = broker();
        for (token, want) in [("", "v1"), ("v1.abc", "form"), ("v1.abc.!!", "base64url")] {
            let err = Assertion::verify(token, &cert).unwrap_err();
            assert!(err.to_string().contains(want), "{token}: {err}");
        }
    }
}
