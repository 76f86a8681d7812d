//! What every client subcommand shares: the endpoint and the client
//! certificate (by default the demo identities of a state directory).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sluice::client::{Connection, TlsFiles};
use sluice::config;
use sluice::dev::DEFAULT_IDENTITY;

#[derive(Args, Clone)]
pub struct ConnArgs {
    /// Connector endpoint.
    #[arg(
        long,
        env = "SLUICE_ENDPOINT",
        default_value = "grpc+tls://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// State directory whose development PKI supplies --ca/--cert/--key by default.
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Demo identity in <state-dir>/pki to use: `planning`, `supplier`, `research` or `admin`.
    #[arg(long, default_value = DEFAULT_IDENTITY)]
    pub identity: String,
    /// CA certificate that signed the server's certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Server name to verify the server certificate against (default: the endpoint's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
}

impl ConnArgs {
    pub fn tls_files(&self) -> TlsFiles {
        let demo = TlsFiles::from_state_dir(&self.state_dir, &self.identity);
        TlsFiles {
            ca: self.ca.clone().unwrap_or(demo.ca),
            cert: self.cert.clone().unwrap_or(demo.cert),
            key: self.key.clone().unwrap_or(demo.key),
            domain: self.tls_domain.clone(),
        }
    }

    pub async fn connect(&self) -> Result<Connection> {
        Connection::connect(&self.endpoint, &self.tls_files()).await
    }
}
