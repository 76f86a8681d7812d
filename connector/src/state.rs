//! The state directory (default `./.sluice/`): what a connector creates for
//! itself on first start and keeps across restarts.
//!
//! ```text
//! .sluice/
//! ├── pki/      ca.pem ca.key  server.pem server.key  {planning,supplier,research,admin}.{pem,key}
//! ├── data/     trips.parquet  machine_events.csv  zones.json
//! ├── secrets/  mask.key (keys the per-consumer hashes of masked columns)
//! ├── audit/    audit.jsonl (signed, hash-chained records)  signing-key.p8  public-key.pem
//! ├── agreements.sqlite  privacy-ledger.sqlite
//! ├── quota.json  (queries and rows used per organization today)
//! └── policy.yaml (the demo usage policy; edit it, Sluice reloads it)
//! ```
//!
//! Preparation is idempotent and safe to run from several processes at once:
//! it holds an exclusive lock on `.lock` and writes every file atomically, so
//! a half-written certificate or dataset is never visible.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::demo;
use crate::pki::{self, Authority, ClientIdentity, Validity};

/// A demo organization with a client certificate in the development PKI.
pub struct DemoClient {
    /// File stem in `pki/`, and the `--identity` name in the CLI.
    pub name: &'static str,
    pub common_name: &'static str,
    pub organization: &'static str,
    pub uri: &'static str,
}

/// The demo organizations: a city planning agency (aggregates of the
/// transport agency's trips), a supplier consortium (machine telemetry), a
/// research institute (differentially private answers on trips, under an
/// agreement) and the provider's own administrator (approves agreements,
/// reads the whole audit log).
pub const DEMO_CLIENTS: [DemoClient; 4] = [
    DemoClient {
        name: "planning",
        common_name: "planning-analyst",
        organization: "City Planning Agency",
        uri: "spiffe://sluice.demo/org/city-planning",
    },
    DemoClient {
        name: "supplier",
        common_name: "supplier-analyst",
        organization: "Axle Supplier Consortium",
        uri: "spiffe://sluice.demo/org/axle-suppliers",
    },
    DemoClient {
        name: "research",
        common_name: "research-analyst",
        organization: "City Research Institute",
        uri: "spiffe://sluice.demo/org/city-research",
    },
    DemoClient {
        name: "admin",
        common_name: "transport-admin",
        organization: "City Transport Agency",
        uri: "spiffe://sluice.demo/org/transport-agency/admin",
    },
];

/// The identity the CLI uses when none is given.
pub const DEFAULT_IDENTITY: &str = "planning";

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

    /// Creates whatever is missing: the development PKI and, when `demo_data`,
    /// the demo datasets. Returns a line per item created.
    pub fn prepare(&self, demo_data: bool) -> Result<Vec<String>> {
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
        let mut created = self.ensure_dev_pki()?;
        created.extend(self.ensure_mask_key()?);
        if demo_data {
            created.extend(self.ensure_demo_data()?);
        }
        lock.unlock().ok();
        Ok(created)
    }

    fn ensure_dev_pki(&self) -> Result<Vec<String>> {
        let dir = self.pki_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict_to_owner(&dir)?;
        let mut created = Vec::new();
        let (ca_cert, ca_key) = self.pair("ca");
        if !ca_cert.exists() {
            let ca = pki::create_ca(
                "Sluice development CA",
                Some("Sluice demo"),
                Validity::days_from_now(3650),
            )?;
            pki::write_pair(&dir, "ca", &ca, true)?;
            created.push(format!("development CA        {}", ca_cert.display()));
        }
        let authority = Authority::load(&ca_cert, &ca_key)?;
        if !self.pair("server").0.exists() {
            let ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
            let server = authority.issue_server(
                &["localhost".into()],
                &ips,
                Validity::days_from_now(825),
            )?;
            pki::write_pair(&dir, "server", &server, true)?;
            created.push(format!(
                "server certificate    {}",
                self.pair("server").0.display()
            ));
        }
        for client in &DEMO_CLIENTS {
            if self.pair(client.name).0.exists() {
                continue;
            }
            let issued = authority.issue_client(
                &ClientIdentity {
                    common_name: client.common_name.into(),
                    organization: Some(client.organization.into()),
                    uris: vec![client.uri.into()],
                },
                Validity::days_from_now(825),
            )?;
            pki::write_pair(&dir, client.name, &issued, true)?;
            created.push(format!(
                "client certificate    {} ({})",
                self.pair(client.name).0.display(),
                client.organization
            ));
        }
        Ok(created)
    }

    /// The secret behind `masked: hash` columns: generated once, kept so that
    /// hashed values stay stable across restarts.
    pub fn mask_key(&self) -> PathBuf {
        self.root.join("secrets").join("mask.key")
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

    /// Where quota usage is kept across restarts.
    pub fn quota_file(&self) -> PathBuf {
        self.root.join("quota.json")
    }

    /// The privacy-budget ledger (SQLite).
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

    fn ensure_demo_data(&self) -> Result<Vec<String>> {
        let dir = self.data_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut created = Vec::new();
        let trips = dir.join("trips.parquet");
        if !trips.exists() {
            demo::write_trips(&trips, demo::TRIPS_SEED, demo::TRIPS_ROWS)?;
            created.push(format!(
                "demo dataset trips    {} ({} rows)",
                trips.display(),
                demo::TRIPS_ROWS
            ));
        }
        let zones = dir.join("zones.json");
        if !zones.exists() {
            demo::write_zones(&zones)?;
            created.push(format!("demo dataset zones    {}", zones.display()));
        }
        let policy = self.root.join("policy.yaml");
        if !policy.exists() {
            write_atomically(&policy, demo::DEMO_POLICY.as_bytes())?;
            created.push(format!("demo usage policy     {}", policy.display()));
        }
        let events = dir.join("machine_events.csv");
        if !events.exists() {
            demo::write_machine_events(
                &events,
                demo::MACHINE_EVENTS_SEED,
                demo::MACHINE_EVENTS_ROWS,
                &demo::MANUFACTURERS,
            )?;
            created.push(format!(
                "demo dataset machine_events {} ({} rows)",
                events.display(),
                demo::MACHINE_EVENTS_ROWS
            ));
        }
        Ok(created)
    }
}

#[cfg(unix)]
fn restrict_to_owner(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))
}

#[cfg(not(unix))]
fn restrict_to_owner(_dir: &Path) -> Result<()> {
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
    fn prepares_the_pki_once_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let first = state.prepare(false).unwrap();
        // CA, server certificate, the clients' certificates, the masking key.
        assert_eq!(first.len(), 3 + DEMO_CLIENTS.len());
        let ca_before = fs::read(state.ca_cert()).unwrap();
        assert!(state.prepare(false).unwrap().is_empty());
        assert_eq!(fs::read(state.ca_cert()).unwrap(), ca_before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(state.pair("server").1)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "private keys are readable by the owner only"
            );
        }
    }
}
