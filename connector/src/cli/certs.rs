//! `sluice certs`: a certificate authority, server and client
//! certificates for a deployment.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sluice::pki::{self, Authority, ClientIdentity, Role, Validity};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a certificate authority: DIR/ca.pem and DIR/ca.key.
    Ca {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "Sluice CA")]
        name: String,
        /// Organization of the CA.
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        validity: ValidityArgs,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a server certificate signed by DIR/ca.pem: DIR/NAME.pem and DIR/NAME.key.
    Server {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[arg(long, default_value = "server")]
        name: String,
        /// DNS names the server answers to (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP addresses the server answers on (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[command(flatten)]
        validity: ValidityArgs,
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate signed by DIR/ca.pem: DIR/NAME.pem and DIR/NAME.key.
    Client {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// File stem of the certificate and key.
        #[arg(long)]
        name: String,
        /// Subject common name (default: NAME).
        #[arg(long)]
        cn: Option<String>,
        /// Subject organization: the organization budgets and quotas are kept for.
        #[arg(long)]
        org: Option<String>,
        /// SAN URI identifying the principal, e.g. spiffe://city.example/org/planning (repeatable; the first is the principal id).
        #[arg(long = "uri")]
        uris: Vec<String>,
        #[command(flatten)]
        validity: ValidityArgs,
        #[arg(long)]
        force: bool,
    },
    /// Issue a coordinator's client certificate (role coordinator): the
    /// connector presents it to its workers. DIR/NAME.pem and DIR/NAME.key.
    Coordinator {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[arg(long, default_value = "coordinator")]
        name: String,
        #[command(flatten)]
        validity: ValidityArgs,
        #[arg(long)]
        force: bool,
    },
    /// Issue a worker's server certificate (role worker) for the given DNS
    /// names and IPs. DIR/NAME.pem and DIR/NAME.key.
    Worker {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[arg(long, default_value = "worker")]
        name: String,
        /// DNS names the worker answers to (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP addresses the worker answers on (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[command(flatten)]
        validity: ValidityArgs,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct ValidityArgs {
    /// Validity in days from now.
    #[arg(long)]
    days: Option<i64>,
    /// Start of validity (YYYY-MM-DD, UTC); overrides --days.
    #[arg(long)]
    not_before: Option<String>,
    /// End of validity (YYYY-MM-DD, UTC); overrides --days.
    #[arg(long)]
    not_after: Option<String>,
}

impl ValidityArgs {
    fn resolve(&self, default_days: i64) -> Result<Validity> {
        let mut v = Validity::days_from_now(self.days.unwrap_or(default_days));
        if let Some(d) = &self.not_before {
            v.not_before = parse_date(d).context("--not-before")?;
        }
        if let Some(d) = &self.not_after {
            v.not_after = parse_date(d).context("--not-after")?;
        }
        if v.not_after <= v.not_before {
            bail!("the certificate would end before it starts");
        }
        Ok(v)
    }
}

fn parse_date(s: &str) -> Result<time::OffsetDateTime> {
    let parts: Vec<&str> = s.split('-').collect();
    let bad = || anyhow::anyhow!("`{s}` is not a date: write YYYY-MM-DD");
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let month = time::Month::try_from(m.parse::<u8>().map_err(|_| bad())?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(
        y.parse().map_err(|_| bad())?,
        month,
        d.parse().map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    Ok(date.midnight().assume_utc())
}

pub fn certs(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Ca {
            dir,
            name,
            org,
            validity,
            force,
        } => {
            let ca = pki::create_ca(&name, org.as_deref(), validity.resolve(3650)?)?;
            let (cert, key) = pki::write_pair(&dir, "ca", &ca, force)?;
            println!(
                "CA certificate: {}\nCA key:         {} (keep it offline)",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Server {
            dir,
            name,
            dns,
            ips,
            validity,
            force,
        } => {
            let authority = load_authority(&dir)?;
            let issued = authority.issue_server(&dns, &ips, validity.resolve(397)?)?;
            let (cert, key) = pki::write_pair(&dir, &name, &issued, force)?;
            println!(
                "server certificate: {}\nserver key:         {}",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Client {
            dir,
            name,
            cn,
            org,
            uris,
            validity,
            force,
        } => {
            let authority = load_authority(&dir)?;
            let who = ClientIdentity {
                common_name: cn.unwrap_or_else(|| name.clone()),
                organization: org,
                uris,
            };
            let issued = authority.issue_client(&who, validity.resolve(397)?)?;
            let (cert, key) = pki::write_pair(&dir, &name, &issued, force)?;
            println!(
                "client certificate: {}\nclient key:         {}",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Coordinator {
            dir,
            name,
            validity,
            force,
        } => {
            let authority = load_authority(&dir)?;
            let issued = authority.issue_coordinator(&name, validity.resolve(397)?)?;
            let (cert, key) = pki::write_pair(&dir, &name, &issued, force)?;
            println!(
                "coordinator certificate: {}\ncoordinator key:         {}",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Worker {
            dir,
            name,
            dns,
            ips,
            validity,
            force,
        } => {
            let authority = load_authority(&dir)?;
            let issued = authority.issue_server_with_role(
                &dns,
                &ips,
                Some(Role::Worker),
                validity.resolve(397)?,
            )?;
            let (cert, key) = pki::write_pair(&dir, &name, &issued, force)?;
            println!(
                "worker certificate: {}\nworker key:         {}",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

fn load_authority(dir: &Path) -> Result<Authority> {
    Authority::load(&dir.join("ca.pem"), &dir.join("ca.key")).with_context(|| {
        format!(
            "loading the CA from {} (create one with `sluice certs ca --dir {}`)",
            dir.display(),
            dir.display()
        )
    })
}
