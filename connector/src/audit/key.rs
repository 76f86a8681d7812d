//! The connector's Ed25519 audit signing key.
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
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ring::digest::{SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

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
const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

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
    pub fn load_or_create(dir: &Path) -> Result<AuditKey> {
        create_private_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| anyhow!("cannot generate an Ed25519 audit signing key"))?;
            if create_exclusively(&key_path, pkcs8.as_ref(), 0o600)? {
                tracing::info!(path = %key_path.display(), "created a new audit signing key");
            }
        }
        let key = Self::load(&key_path)?;
        key.write_public_pem(&dir.join(PUBLIC_KEY_FILE))?;
        Ok(key)
    }

    /// Reads and parses a PKCS#8 key file.
    fn load(path: &Path) -> Result<AuditKey> {
        let bytes = fs::read(path)
            .with_context(|| format!("cannot read the audit signing key {}", path.display()))?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|err| {
            anyhow!(
                "the audit signing key {} is not a valid Ed25519 PKCS#8 key ({err})",
                path.display()
            )
        })?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(AuditKey { pair, public })
    }

    /// Writes the PEM only when it differs, so a read-only deployment whose
    /// PEM is already right still starts.
    fn write_public_pem(&self, path: &Path) -> Result<()> {
        let pem = self.public_key_pem();
        if fs::read_to_string(path).is_ok_and(|old| old == pem) {
            return Ok(());
        }
        write_atomically(path, pem.as_bytes(), 0o644)
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
pub fn read_public_key(path: &Path) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read the public key file {}", path.display()))?;
    parse_public_key(&text)
        .with_context(|| format!("the public key file {} is not usable", path.display()))
}

/// Parses a public key given as SubjectPublicKeyInfo PEM or as 64 hex
/// characters (surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Result<[u8; 32]> {
    let text = text.trim();
    if text.contains(PEM_BEGIN) {
        return parse_pem(text);
    }
    if text.len() == 64
        && let Some(bytes) = from_hex(text)
    {
        return to_array(&bytes);
    }
    bail!("expected an Ed25519 public key as PEM (\"{PEM_BEGIN}\") or as 64 hex characters")
}

/// Extracts and checks the DER inside a `PUBLIC KEY` PEM block.
fn parse_pem(text: &str) -> Result<[u8; 32]> {
    let start = text.find(PEM_BEGIN).map(|i| i + PEM_BEGIN.len());
    let body = start
        .and_then(|start| Some(&text[start..start + text[start..].find(PEM_END)?]))
        .ok_or_else(|| anyhow!("the PEM block has no \"{PEM_END}\" line"))?;
    let der = base64_decode(body).ok_or_else(|| anyhow!("the PEM body is not valid base64"))?;
    let key = der
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .filter(|key| key.len() == 32)
        .ok_or_else(|| anyhow!("the PEM public key is not an Ed25519 key"))?;
    to_array(key)
}

fn to_array(bytes: &[u8]) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| anyhow!("an Ed25519 public key has 32 bytes, not {}", bytes.len()))
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

/// Creates `dir` and missing parents with mode 0700 (an existing directory
/// keeps its mode: the operator may have chosen it).
fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create the audit directory {}", dir.display()))
}

/// Writes `path` via a temporary file and a rename, so a crash leaves
/// either the old file or the complete new one, never half a key.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = temp_path(path);
    let result = write_new_file(&tmp, bytes, mode).and_then(|()| {
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path);
    Ok(())
}

/// Writes `bytes` to `path` only if nothing is there yet, atomically: a
/// complete temporary file is hard-linked into place, which fails if another
/// process got there first (two connectors starting on one new state
/// directory then share the first key rather than fork the log). Returns
/// whether this call created the file.
fn create_exclusively(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    let tmp = temp_path(path);
    write_new_file(&tmp, bytes, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Creates a file with `mode` (unix), writes it and flushes it to disk.
fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Makes a rename durable. Best effort: not every platform can open a
/// directory, and the file itself is already complete.
pub(crate) fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Err(err) = fs::File::open(parent).and_then(|dir| dir.sync_all()) {
            tracing::warn!(dir = %parent.display(), %err, "cannot sync directory");
        }
    }
}

/// Lowercase hex.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 15)]));
    }
    out
}

/// Parses hex (either case); `None` on odd length or a non-hex character.
pub(crate) fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let high = char::from(pair[0]).to_digit(16)?;
            let low = char::from(pair[1]).to_digit(16)?;
            u8::try_from(high << 4 | low).ok()
        })
        .collect()
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let mut block = [0u8; 4];
        block[1..=chunk.len()].copy_from_slice(chunk);
        let n = u32::from_be_bytes(block);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (n >> (18 - 6 * i)) & 63;
                out.push(char::from(BASE64_ALPHABET[sextet as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64, ignoring ASCII whitespace (PEM line breaks).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let symbols: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !symbols.len().is_multiple_of(4) {
        return None;
    }
    let quads = symbols.len() / 4;
    let mut out = Vec::with_capacity(quads * 3);
    for (index, quad) in symbols.chunks(4).enumerate() {
        let padding = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if padding > 2 || (padding > 0 && index + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &symbol in &quad[..4 - padding] {
            n = n << 6 | base64_value(symbol)?;
        }
        n <<= 6 * padding;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - padding]);
    }
    Some(out)
}

fn base64_value(symbol: u8) -> Option<u32> {
    let index = BASE64_ALPHABET.iter().position(|&b| b == symbol)?;
    u32::try_from(index).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Z!==", "A=BC"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn hex_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)), Some(all));
        assert_eq!(from_hex("0A"), Some(vec![10]));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }

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
        let missing = read_public_key(&dir.path().join("absent.pem")).expect_err("missing");
        assert!(format!("{missing:#}").contains("absent.pem"));
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(KEY_FILE), b"not a key").expect("write");
        let err = AuditKey::load_or_create(dir.path()).expect_err("corrupt");
        let text = format!("{err:#}");
        assert!(text.contains("is not a valid Ed25519 PKCS#8 key"), "{text}");
        assert!(text.contains(KEY_FILE), "{text}");
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
}
