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

use anyhow::{Context, Result};

use crate::pki;

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

    /// Creates the masking key if it is missing.
    pub fn ensure_mask_key(&self) -> Result<Vec<String>> {
        let path = self.mask_key();
        if path.exists() {
            return Ok(vec![]);
        }
        let dir = self.root.join("secrets");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict_to_owner(&dir)?;
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        write_atomically(&path, &key)?;
        Ok(vec![format!("masking key           {}", path.display())])
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
