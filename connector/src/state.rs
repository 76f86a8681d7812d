//! The state directory (default `./.sluice/`): what a connector creates for
//! itself on first start and keeps across restarts.
//!
//! ```text
//! .sluice/
//! ├── pki/      ca.pem ca.key  server.pem server.key  {planning,supplier,research,admin}.{pem,key}
//! ├── data/     trips.parquet  machine_events.csv  zones.json
//! ├── secrets/  mask.key (keys the per-consumer hashes of masked columns)
//! ├── audit/    audit.jsonl (signed, hash-chained records)  signing-key.p8  public-key.pem
//! ├── agreements.sqlite
//! ├── privacy-ledger.sqlite (the privacy budget, the answer cache, and the queries and rows used per organization today)
//! └── policy.yaml (the demo usage policy; edit it, Sluice reloads it)
//! ```
//!
//! The development PKI and the demo data are created by [`crate::dev`]
//! (`sluice init`, and `serve` on the embedded default); a deployment brings
//! its own certificates and datasets, and only the masking key, the stores
//! and the audit log are created here.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::pki;

/// Bytes of a masking key this connector makes; a shorter one is refused.
pub const MASK_KEY_BYTES: usize = 32;

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.pki_dir().join("ca.pem")
    }
    /// `(NAME.pem, NAME.key)` in `pki/`.
    pub fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        pki::pair_paths(&self.pki_dir(), name)
    }

    /// The secret behind `masked: hash` columns: generated once, kept so that
    /// hashed values stay stable across restarts.
    pub fn mask_key(&self) -> PathBuf {
        self.root.join("secrets").join("mask.key")
    }

    /// Creates the state directory (owner only) if it is missing, and takes
    /// its exclusive lock (`.lock`), held until the returned file is dropped.
    pub fn lock(&self) -> Result<fs::File> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating state directory {}", self.root.display()))?;
        restrict_to_owner(&self.root)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))
            .with_context(|| format!("opening {}", self.root.join(".lock").display()))?;
        lock.lock().context("locking the state directory")?;
        Ok(lock)
    }

    /// Creates the masking key if it is missing, and checks the one that
    /// is there. Every hashed value consumers have seen depends on it, so
    /// a key cut short is refused, and a missing key is made anew only in
    /// a state directory that has not served yet.
    pub fn ensure_mask_key(&self) -> Result<Vec<String>> {
        let path = self.mask_key();
        match fs::symlink_metadata(&path) {
            Ok(_) => {
                let key = fs::read(&path)
                    .with_context(|| format!("reading the masking key {}", path.display()))?;
                if key.len() < MASK_KEY_BYTES {
                    bail!(
                        "the masking key {} is damaged: it has {} bytes, fewer than {MASK_KEY_BYTES}. \
                         Every hashed column depends on it: restore it from a backup, and start again",
                        path.display(),
                        key.len()
                    );
                }
                return Ok(vec![]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the masking key {}", path.display()));
            }
        }
        if let Some(evidence) = self.served_before() {
            bail!(
                "the masking key {} is missing, but this state directory has served before ({} \
                 exists): every hashed value consumers have seen depends on that key. Restore it \
                 from a backup, and start again; to start with a new key deliberately (every hashed \
                 value changes), create one: head -c 32 /dev/urandom > {}",
                path.display(),
                evidence.display(),
                path.display()
            );
        }
        let dir = self.root.join("secrets");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict_to_owner(&dir)?;
        let mut key = [0u8; MASK_KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        write_atomically(&path, &key)?;
        Ok(vec![format!("masking key           {}", path.display())])
    }

    /// A file that only a connector that has served leaves behind (its
    /// ledger, its agreement store, an audit log with records), if any.
    pub fn served_before(&self) -> Option<PathBuf> {
        let log = self.audit_dir().join(sluice_audit::LOG_FILE);
        if fs::metadata(&log).is_ok_and(|m| m.len() > 0) {
            return Some(log);
        }
        [self.ledger_file(), self.agreements_file()]
            .into_iter()
            .find(|p| p.exists())
    }

    /// Refuses to start on books that were lost: a privacy ledger missing
    /// where the audit log shows the connector has served would be
    /// recreated empty, silently resetting every budget. (An empty file in
    /// its place is the operator's way of saying "start anew".) Call it
    /// before the books are opened.
    pub fn check_books(&self) -> Result<()> {
        let ledger = self.ledger_file();
        let log = self.audit_dir().join(sluice_audit::LOG_FILE);
        let served = fs::metadata(&log).is_ok_and(|m| m.len() > 0);
        if served && fs::symlink_metadata(&ledger).is_err() {
            bail!(
                "the privacy ledger {} is missing, but the audit log {} shows that this connector has \
                 served: a new, empty ledger would reset every privacy budget. Restore it from a \
                 backup, and start again; to start with empty budgets deliberately, create an empty \
                 file there (touch {})",
                ledger.display(),
                log.display(),
                ledger.display()
            );
        }
        Ok(())
    }

    /// Where quota usage was kept before it moved into the ledger's
    /// database; read once to carry today's counts over.
    pub fn legacy_quota_file(&self) -> PathBuf {
        self.root.join("quota.json")
    }

    /// The privacy-budget ledger and the daily quota counters (SQLite).
    pub fn ledger_file(&self) -> PathBuf {
        self.root.join("privacy-ledger.sqlite")
    }

    /// Agreements between this provider and its consumers (SQLite).
    pub fn agreements_file(&self) -> PathBuf {
        self.root.join("agreements.sqlite")
    }

    /// The provider's DSP negotiations and transfer processes.
    pub fn dsp_file(&self) -> PathBuf {
        self.root.join("dsp.sqlite")
    }

    /// The audit log (`audit.jsonl`), its signing key (`signing-key.p8`)
    /// and the public key to verify it (`public-key.pem`).
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
    }
}

#[cfg(unix)]
pub(crate) fn restrict_to_owner(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))
}

#[cfg(not(unix))]
pub(crate) fn restrict_to_owner(_dir: &Path) -> Result<()> {
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename, readable
/// by the owner only.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let mut options = fs::OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_ledger_is_not_recreated_once_the_connector_has_served() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state.check_books().unwrap();
        fs::create_dir_all(state.audit_dir()).unwrap();
        fs::write(state.audit_dir().join(sluice_audit::LOG_FILE), "{}\n").unwrap();
        let refused = state.check_books().unwrap_err().to_string();
        assert!(refused.contains("privacy-ledger.sqlite"), "{refused}");
        assert!(refused.contains("Restore it from a backup"), "{refused}");
        // An empty file there: the operator starts anew deliberately.
        fs::write(state.ledger_file(), "").unwrap();
        state.check_books().unwrap();
    }

    #[test]
    fn a_masking_key_is_checked_and_made_only_for_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(state.ensure_mask_key().unwrap().len(), 1);
        assert_eq!(fs::read(state.mask_key()).unwrap().len(), MASK_KEY_BYTES);
        assert!(state.ensure_mask_key().unwrap().is_empty());
        fs::write(state.mask_key(), "abc").unwrap();
        let short = state.ensure_mask_key().unwrap_err().to_string();
        assert!(short.contains("3 bytes"), "{short}");
        fs::remove_file(state.mask_key()).unwrap();
        fs::write(state.agreements_file(), "").unwrap();
        let lost = state.ensure_mask_key().unwrap_err().to_string();
        assert!(lost.contains("agreements.sqlite exists"), "{lost}");
        assert!(!state.mask_key().exists(), "no new key over a lost one");
    }
}
