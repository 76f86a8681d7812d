//! What a development or demo connector needs that a deployment brings
//! itself: a development PKI (a CA, a server certificate and the demo
//! organizations' client certificates) and the demo datasets with their
//! usage policy. Used by `sluice init`, by `sluice serve` on its embedded
//! default, and by the tests; nothing on the serving path depends on it.
//!
//! Preparation is idempotent and safe to run from several processes at once:
//! it holds the state directory's exclusive lock and writes every file
//! atomically, so a half-written certificate or dataset is never visible.

pub mod demo;

use std::fs;
use std::net::IpAddr;

use anyhow::{Context, Result};

use crate::pki::{self, Authority, ClientIdentity, Role, Validity};
use crate::state::{StateDir, restrict_to_owner, write_atomically};

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

/// Creates whatever is missing in `state`: the development PKI, the
/// masking key and, when `demo_data`, the demo datasets and policy.
/// Returns a line per item created.
pub fn prepare(state: &StateDir, demo_data: bool) -> Result<Vec<String>> {
    let lock = state.lock()?;
    let mut created = ensure_dev_pki(state)?;
    created.extend(state.ensure_mask_key()?);
    if demo_data {
        created.extend(ensure_demo_data(state)?);
    }
    lock.unlock().ok();
    Ok(created)
}

fn ensure_dev_pki(state: &StateDir) -> Result<Vec<String>> {
    let dir = state.pki_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    restrict_to_owner(&dir)?;
    let mut created = Vec::new();
    let (ca_cert, ca_key) = state.pair("ca");
    if !ca_cert.exists() {
        let ca = pki::create_ca(
            "Sluice development CA",
            Some("Sluice demo"),
            Validity::days_from_now(3650),
        )?;
        pki::write_pair(&dir, "ca", &ca, true)?;
        created.push(format!("development CA        {}", ca_cert.display()));
    }
    let unusable = || {
        format!(
            "the development PKI in {} is not usable: restore the file, or remove the directory \
             to have a new PKI made (clients then need their new certificates)",
            dir.display()
        )
    };
    let authority = Authority::load(&ca_cert, &ca_key).with_context(unusable)?;
    if !state.pair("server").0.exists() {
        let ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
        let server =
            authority.issue_server(&["localhost".into()], &ips, Validity::days_from_now(825))?;
        pki::write_pair(&dir, "server", &server, true)?;
        created.push(format!(
            "server certificate    {}",
            state.pair("server").0.display()
        ));
    }
    let (server_cert, server_key) = state.pair("server");
    pki::check_pair(&server_cert, &server_key).with_context(unusable)?;
    created.extend(ensure_cluster_pairs(state, &authority)?);
    for client in &DEMO_CLIENTS {
        if state.pair(client.name).0.exists() {
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
            state.pair(client.name).0.display(),
            client.organization
        ));
    }
    Ok(created)
}

/// A coordinator certificate for the connector and a worker certificate
/// for `sluice worker` on this machine (docs/deploy.md, "Distributed
/// execution").
fn ensure_cluster_pairs(state: &StateDir, authority: &Authority) -> Result<Vec<String>> {
    let dir = state.pki_dir();
    let mut created = Vec::new();
    if !state.pair("coordinator").0.exists() {
        let issued = authority.issue_coordinator("coordinator", Validity::days_from_now(825))?;
        pki::write_pair(&dir, "coordinator", &issued, true)?;
        created.push(format!(
            "coordinator cert      {}",
            state.pair("coordinator").0.display()
        ));
    }
    if !state.pair("worker").0.exists() {
        let ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
        let issued = authority.issue_server_with_role(
            &["localhost".into()],
            &ips,
            Some(Role::Worker),
            Validity::days_from_now(825),
        )?;
        pki::write_pair(&dir, "worker", &issued, true)?;
        created.push(format!(
            "worker certificate    {}",
            state.pair("worker").0.display()
        ));
    }
    Ok(created)
}

fn ensure_demo_data(state: &StateDir) -> Result<Vec<String>> {
    let dir = state.data_dir();
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
    let policy = state.root().join("policy.yaml");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepares_the_pki_once_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let first = prepare(&state, false).unwrap();
        // CA, server, coordinator and worker certificates, the clients'
        // certificates, the masking key.
        assert_eq!(first.len(), 5 + DEMO_CLIENTS.len());
        let ca_before = fs::read(state.ca_cert()).unwrap();
        assert!(prepare(&state, false).unwrap().is_empty());
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
