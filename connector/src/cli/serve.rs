//! `sluice serve`: the connector daemon. Builds the configuration from the
//! file (or the embedded demo) and the flags, prepares the development PKI
//! and demo data where the configuration relies on them, then runs the
//! server on its two runtimes: build, listen, print the banner, serve,
//! drain.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use sluice::config::{self, Config, LogFormat};
use sluice::dev;
use sluice::state::StateDir;

use super::report_created;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it, the embedded demo configuration is used.
    #[arg(long, short = 'c', env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051 (port 0 picks a free port). Overrides server.listen.
    #[arg(long)]
    pub listen: Option<String>,
    /// State directory (development PKI, demo data). Overrides server.state_dir.
    #[arg(long, env = "SLUICE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Usage policy file (YAML, see docs/policy.md). Overrides policy.file.
    #[arg(long, env = "SLUICE_POLICY")]
    pub policy: Option<PathBuf>,
    /// Prometheus endpoint address, or `off`. Overrides metrics.listen.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// DSP 2025-1 endpoint address (HTTPS, mTLS), or `off`. Overrides dsp.listen.
    #[arg(long)]
    pub dsp_listen: Option<String>,
    /// Web console address (HTTPS), or `off`. Overrides console.listen.
    #[arg(long)]
    pub console_listen: Option<String>,
    /// Log format. Overrides log.format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `sluice=debug`. Overrides log.level; RUST_LOG overrides both.
    #[arg(long)]
    pub log_level: Option<String>,
    /// A worker to run leaf stages on, https://HOST:PORT (repeatable). Overrides cluster.workers.
    #[arg(long = "worker")]
    pub workers: Vec<String>,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(
            args.state_dir
                .as_deref()
                .unwrap_or(Path::new(config::DEFAULT_STATE_DIR)),
        ),
    };
    if let Some(dir) = &args.state_dir {
        cfg.server.state_dir = config::absolute(dir);
    }
    if let Some(listen) = &args.listen {
        cfg.server.listen =
            config::parse_addr(listen).map_err(|r| anyhow::anyhow!("--listen: {r}"))?;
    }
    if let Some(policy) = &args.policy {
        cfg.policy = Some(config::absolute(policy));
    }
    if let Some(m) = &args.metrics_listen {
        cfg.metrics.listen = match m.as_str() {
            "off" => None,
            addr => Some(
                config::parse_addr(addr).map_err(|r| anyhow::anyhow!("--metrics-listen: {r}"))?,
            ),
        };
    }
    if let Some(d) = &args.dsp_listen {
        cfg.dsp.listen = match d.as_str() {
            "off" => None,
            addr => {
                Some(config::parse_addr(addr).map_err(|r| anyhow::anyhow!("--dsp-listen: {r}"))?)
            }
        };
    }
    if let Some(c) = &args.console_listen {
        cfg.console.listen = match c.as_str() {
            "off" => None,
            addr => Some(
                config::parse_addr(addr).map_err(|r| anyhow::anyhow!("--console-listen: {r}"))?,
            ),
        };
    }
    if let Some(format) = args.log_format {
        cfg.log.format = format;
    }
    if let Some(level) = &args.log_level {
        cfg.log.level = level.clone();
    }
    if !args.workers.is_empty() {
        cfg.cluster.workers = args
            .workers
            .iter()
            .map(|w| config::parse_worker_url(w).map_err(|r| anyhow::anyhow!("--worker: {r}")))
            .collect::<Result<_>>()?;
    }
    sluice::telemetry::init(cfg.log.format, &cfg.log.level);
    if !cfg.cluster.workers.is_empty() && cfg.limits.table_cache > 0 {
        // Workers read the files; a decoded copy here would keep scans on
        // the coordinator.
        tracing::info!("limits.table_cache is off: with workers, scans run on them");
        cfg.limits.table_cache = 0;
    }

    let demo = matches!(cfg.source, config::Source::Embedded);
    // Demo only: with its own [tls], a deployment must name the cluster's
    // certificates too (the cluster refuses to start otherwise).
    let dev_cluster_pki = !cfg.cluster.workers.is_empty() && cfg.cluster.tls.is_none() && demo;
    if demo || cfg.tls.is_none() || dev_cluster_pki {
        let state = StateDir::new(&cfg.server.state_dir);
        report_created(&dev::prepare(&state, demo)?);
    }

    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Parsing, planning and execution run on these threads (and on the
    // threads `block_in_place` hands a worker's tasks to, which tokio
    // creates with the same stack size). SQL parsing and DataFusion
    // planning are iterative or heap-grown for deep inputs, but dropping a
    // deep syntax tree recurses natively: the parser builds chains of
    // operators and `::` casts in a loop, so the default 256 KiB of
    // `limits.max_sql_bytes` hold a chain 130,000 levels deep, which
    // `query::plan` refuses and then drops (measured: within 16 MiB; 8 MiB
    // overflowed planning a 2,000-cast chain before the syntax limits).
    // 256 MiB leaves room for larger `max_sql_bytes`; it is virtual memory,
    // committed only as far as it is used.
    //
    // Some of DataFusion's work happens inside one poll of an operator that
    // nothing can interrupt (building a hash join's table concatenates its
    // whole input): such a poll holds its worker for as long as it takes
    // (up to seconds in a debug build). One organization runs at most
    // `max_concurrent_queries_per_organization` queries, so with that many
    // workers beyond the cores, another organization's query always finds
    // a worker, and the operating system shares the cores between them.
    let workers = threads + cfg.limits.max_concurrent_queries_per_organization;
    let query_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("sluice-query")
        .thread_stack_size(256 << 20)
        .enable_all()
        .build()?;
    // Connections, handshakes and health checks. Planning used to run here
    // and needed the large stack; it no longer does, but the margin costs
    // nothing (it is committed only as far as it is used).
    let io_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(2))
        .thread_name("sluice-io")
        .thread_stack_size(256 << 20)
        .enable_all()
        .build()?;
    let result = io_runtime.block_on(async {
        let app = sluice::server::App::build(
            cfg,
            query_runtime.handle().clone(),
            sluice::server::ServeHooks::default(),
        )
        .await?;
        let listening = app.listen().await?;
        print!("{}", listening.banner());
        std::io::Write::flush(&mut std::io::stdout())?;
        listening.serve().await
    });
    query_runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    io_runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
