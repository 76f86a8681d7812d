//! `sluice worker`: runs plan fragments for the coordinators of its
//! deployment (docs/deploy.md, "Distributed execution").

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sluice::cluster::worker::{ListeningWorker, WorkerOptions};
use sluice::config::{self, LogFormat};
use sluice::state::StateDir;

#[derive(Args)]
pub struct WorkerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: String,
    /// State directory whose development PKI has the worker's certificate
    /// (pki/worker.pem, made by `sluice init` or a first `sluice serve`).
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The worker's certificate (`sluice certs worker`); default: the state directory's.
    #[arg(long, requires_all = ["key", "coordinator_ca"])]
    pub cert: Option<PathBuf>,
    /// The worker's private key.
    #[arg(long, requires_all = ["cert", "coordinator_ca"])]
    pub key: Option<PathBuf>,
    /// The CA that issued the coordinators' certificates.
    #[arg(long, requires_all = ["cert", "key"])]
    pub coordinator_ca: Option<PathBuf>,
    /// Memory all fragments on this worker share, e.g. 4GiB.
    #[arg(long, default_value = "2GiB")]
    pub memory: String,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`; RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    sluice::telemetry::init(args.log_format, &args.log_level);
    let listen = config::parse_addr(&args.listen).map_err(|r| anyhow::anyhow!("--listen: {r}"))?;
    let memory = config::parse_size(&args.memory).map_err(|r| anyhow::anyhow!("--memory: {r}"))?;
    let state = StateDir::new(config::absolute(&args.state_dir));
    let (cert, key, coordinator_ca) = match (args.cert, args.key, args.coordinator_ca) {
        (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
        _ => {
            let (cert, key) = state.pair("worker");
            (cert, key, state.ca_cert())
        }
    };
    let options = WorkerOptions {
        listen,
        cert,
        key,
        coordinator_ca,
        memory,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("sluice-worker")
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let worker = ListeningWorker::bind(options)
            .await
            .context("starting the worker")?;
        println!("sluice worker listening on https://{}", worker.addr());
        std::io::Write::flush(&mut std::io::stdout())?;
        worker
            .serve(async {
                let signal = sluice::server::shutdown_signal().await;
                tracing::info!(signal, "worker shutting down");
            })
            .await
            .context("serving plan fragments")
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
