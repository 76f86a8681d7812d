//! The `sluice` command line, one file per subcommand: the daemon
//! ([`serve`], [`broker`]), a client ([`query`], [`tables`] and `whoami`,
//! [`budget`]), the control plane ([`control`]: `catalog`, `agreements`,
//! `admin`, `receipt`, `audit`), and tools (`init`, [`certs`],
//! [`generate`], [`config_cmd`]). Everything printed for a person is
//! printed here, never by the library.

mod broker;
mod budget;
mod certs;
mod config_cmd;
mod conn;
mod console;
mod control;
mod dsp;
mod generate;
mod query;
mod serve;
mod tables;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use sluice::config;
use sluice::dev;
use sluice::state::StateDir;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A privacy-preserving data-space connector: partners query your data over Arrow Flight SQL with mTLS; the data never leaves.",
    after_help = "Start the demo with `sluice serve`, then in another terminal: sluice query \"SELECT count(*) FROM trips\""
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the connector (the demo when no --config is given).
    Serve(serve::ServeArgs),
    /// Run a worker: executes plan fragments for its coordinators only (docs/deploy.md).
    Worker(worker::WorkerArgs),
    /// Run a broker: federated queries across several connectors (docs/federation.md).
    Broker(broker::BrokerArgs),
    /// Create the state directory (development PKI and demo datasets) and exit.
    Init {
        /// State directory to prepare.
        #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Run a SQL query against a connector and print the result.
    Query(query::QueryArgs),
    /// List the tables a connector serves, with their columns.
    Tables(conn::ConnArgs),
    /// Show the principal a connector derives from your client certificate.
    Whoami(conn::ConnArgs),
    /// Show your organization's differential-privacy budget: spent and remaining per dataset.
    Budget(budget::BudgetArgs),
    /// Datasets offered to you: metadata, columns as you may use them, offers.
    Catalog(control::CatalogArgs),
    /// Request and read agreements for offers.
    #[command(subcommand)]
    Agreements(control::AgreementsCommand),
    /// Provider administration: decide agreement requests.
    #[command(subcommand)]
    Admin(control::AdminCommand),
    /// Audit receipts: list and fetch yours, verify one against the provider's key.
    #[command(subcommand)]
    Receipt(control::ReceiptCommand),
    /// The audit log: verify the chain offline, export it, show its head.
    #[command(subcommand)]
    Audit(control::AuditCommand),
    /// The Dataspace Protocol (DSP 2025-1) as a consumer: catalog, negotiate, transfer, end.
    #[command(subcommand)]
    Dsp(dsp::DspCommand),
    /// A one-time link that signs a browser in to the web console as you (docs/console.md).
    Console(console::ConsoleArgs),
    /// Create a certificate authority and issue server and client certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Write synthetic datasets (trips, machine events, zones) for examples and tests.
    #[command(subcommand)]
    Generate(generate::GenerateCommand),
    /// Print or check configuration files.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
}

/// Entry point of the `sluice` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve::serve(args),
        Command::Worker(args) => worker::worker(args),
        Command::Broker(args) => broker::broker(args),
        Command::Init { state_dir } => {
            let state = StateDir::new(config::absolute(&state_dir));
            report_created(&dev::prepare(&state, true)?);
            println!("state directory ready: {}", state.root().display());
            Ok(())
        }
        Command::Query(args) => client_runtime()?.block_on(query::query(args)),
        Command::Tables(args) => client_runtime()?.block_on(tables::tables(args)),
        Command::Whoami(args) => client_runtime()?.block_on(tables::whoami(args)),
        Command::Budget(args) => client_runtime()?.block_on(budget::budget(args)),
        Command::Catalog(args) => client_runtime()?.block_on(control::catalog(args)),
        Command::Agreements(cmd) => client_runtime()?.block_on(control::agreements(cmd)),
        Command::Admin(cmd) => client_runtime()?.block_on(control::admin(cmd)),
        Command::Receipt(cmd) => client_runtime()?.block_on(control::receipt(cmd)),
        Command::Audit(cmd) => client_runtime()?.block_on(control::audit(cmd)),
        Command::Dsp(cmd) => client_runtime()?.block_on(dsp::run(cmd)),
        Command::Console(args) => client_runtime()?.block_on(console::console(args)),
        Command::Certs(cmd) => certs::certs(cmd),
        Command::Generate(cmd) => generate::run(cmd),
        Command::Config(cmd) => config_cmd::run(cmd),
    }
}

pub(crate) fn report_created(created: &[String]) {
    if created.is_empty() {
        return;
    }
    eprintln!("first start: created");
    for line in created {
        eprintln!("  {line}");
    }
}

pub(crate) fn client_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
