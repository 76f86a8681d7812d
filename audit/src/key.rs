//! The Ed25519 audit signing key.
//!
//! Every audit record is hashed and the hash signed with this key, so that
//! anyone holding only the public key can check offline that a log (or a
//! single receipt) was written by this connector and not changed since.
//!
//! On disk, in the audit directory:
//!
//! | file | content | mode |
//! |---|---|---|
//! | `signing-key.p8` | PKCS#8 v2 (DER) as made by ring | 0600 |
//! | `public-key.pem` | SubjectPublicKeyInfo PEM, readable by `openssl pkey -pubin` | 0644 |
//!
//! Signatures are over [`SIGNING_DOMAIN`] followed by the 32 hash bytes, so a
//! signature made for the audit log can never be replayed as a signature over
//! anything else this key might sign.

use std::fmt;
use std::fs;
use std::path::Path;

use ring::digest::{SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::encoding::{base64_decode, base64_encode, from_hex, to_hex};
use crate::error::{KeyError, PublicKeyError};
use crate::files::{create_exclusively, create_private_dir, write_atomically};
use crate::notice::{self, Notice};

/// File name of the private key (PKCS#8) inside the audit directory.
pub const KEY_FILE: &str = "signing-key.p8";
/// File name of the public key (PEM) inside the audit directory.
pub const PUBLIC_KEY_FILE: &str = "public-key.pem";
/// Prefix of every signed message (domain separation).
pub const SIGNING_DOMAIN: &[u8] = b"sluice-audit-v1\n";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (33 bytes, 0 unused bits) }.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

const PEM_BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
const PEM_END: &str = "-----END PUBLIC KEY-----";

/// The connector's audit signing key pair.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    public: [u8; 32],
}

impl fmt::Debug for AuditKey {
    /// Shows only the key id: the private half must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// Loads the key from `dir`, creating the directory (0700) and a fresh
    /// key (0600) on first use, and (re)writes `public-key.pem` so operators
    /// can always hand the current public key to auditors.
    pub fn load_or_create(dir: &Path) -> Result<AuditKey, KeyError> {
        Self::load_or_create_with_notices(dir, &notice::ignore)
    }

    /// [`AuditKey::load_or_create`], reporting a newly created key and a
    /// failed directory `fsync` to `on_notice`.
    pub fn load_or_create_with_notices(
        dir: &Path,
        on_notice: &dyn Fn(&Notice),
    ) -> Result<AuditKey, KeyError> {
        create_private_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| KeyError::Generate)?;
            if create_exclusively(&key_path, pkcs8.as_ref(), 0o600, on_notice)? {
                on_notice(&Notice::KeyCreated {
                    path: key_path.clone(),
                });
            }
        }
        let key = Self::load(&key_path)?;
        key.write_public_pem(&dir.join(PUBLIC_KEY_FILE), on_notice)?;
        Ok(key)
    }

    /// Reads and parses a PKCS#8 key file.
    fn load(path: &Path) -> Result<AuditKey, KeyError> {
        let bytes = fs::read(path).map_err(|cause| KeyError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|err| KeyError::Invalid {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(AuditKey { pair, public })
    }

    /// Writes the PEM only when it differs, so a read-only deployment whose
    /// PEM is already right still starts.
    fn write_public_pem(&self, path: &Path, notify: &dyn Fn(&Notice)) -> Result<(), KeyError> {
        let pem = self.public_key_pem();
        if fs::read_to_string(path).is_ok_and(|old| old == pem) {
            return Ok(());
        }
        write_atomically(path, pem.as_bytes(), 0o644, notify)
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Short, stable name of the key, written into every record so a
    /// verifier can tell "wrong key" from "damaged record".
    pub fn key_id(&self) -> String {
        key_id_of(&self.public)
    }

    /// The public key as SubjectPublicKeyInfo PEM (64-character lines).
    pub fn public_key_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.public);
        let body = base64_encode(&der);
        let mut pem = format!("{PEM_BEGIN}\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        pem
    }

    /// Signs `SIGNING_DOMAIN || hash`.
    pub fn sign_hash(&self, hash: &[u8; 32]) -> [u8; 64] {
        let signature = self.pair.sign(&signed_message(hash));
        let mut out = [0u8; 64];
        out.copy_from_slice(signature.as_ref());
        out
    }
}

/// Reads a public key file: the PEM written next to the signing key, or a
/// file holding the key as 64 hex characters.
pub fn read_public_key(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = fs::read_to_string(path).map_err(|cause| KeyError::ReadPublic {
        path: path.to_path_buf(),
        cause,
    })?;
    parse_public_key(&text).map_err(|cause| KeyError::UnusablePublic {
        path: path.to_path_buf(),
        cause,
    })
}

/// Parses a public key given as SubjectPublicKeyInfo PEM or as 64 hex
/// characters (surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], PublicKeyError> {
    let text = text.trim();
    if text.contains(PEM_BEGIN) {
        return parse_pem(text);
    }
    if text.len() == 64
        && let Some(bytes) = from_hex(text)
    {
        return to_array(&bytes);
    }
    Err(PublicKeyError::Unrecognized)
}

/// Extracts and checks the DER inside a `PUBLIC KEY` PEM block.
fn parse_pem(text: &str) -> Result<[u8; 32], PublicKeyError> {
    let start = text.find(PEM_BEGIN).map(|i| i + PEM_BEGIN.len());
    let body = start
        .and_then(|start| Some(&text[start..start + text[start..].find(PEM_END)?]))
        .ok_or(PublicKeyError::UnterminatedPem)?;
    let der = base64_decode(body).ok_or(PublicKeyError::Base64)?;
    let key = der
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .filter(|key| key.len() == 32)
        .ok_or(PublicKeyError::NotEd25519)?;
    to_array(key)
}

fn to_array(bytes: &[u8]) -> Result<[u8; 32], PublicKeyError> {
    bytes
        .try_into()
        .map_err(|_| PublicKeyError::Length(bytes.len()))
}

/// `"ed25519:"` + the first 16 hex characters of SHA-256(public key).
pub fn key_id_of(public: &[u8; 32]) -> String {
    let hash = digest(&SHA256, public);
    format!("ed25519:{}", to_hex(&hash.as_ref()[..8]))
}

/// Checks a signature made by [`AuditKey::sign_hash`].
pub fn verify_hash_signature(public: &[u8; 32], hash: &[u8; 32], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&signed_message(hash), signature)
        .is_ok()
}

/// The exact bytes that are signed for a record hash.
fn signed_message(hash: &[u8; 32]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_DOMAIN.len() + hash.len());
    message.extend_from_slice(SIGNING_DOMAIN);
    message.extend_from_slice(hash);
    message
}

#[cfg(test)]
mod tests;
