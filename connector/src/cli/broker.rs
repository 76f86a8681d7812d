//! `sluice broker`: federated queries across several connectors.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sluice::config::{self, LogFormat};

#[derive(Args)]
pub struct BrokerArgs {
    /// Broker configuration file (TOML; see docs/federation.md).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Address to listen on. Overrides server.listen.
    #[arg(long)]
    pub listen: Option<String>,
    /// Log format. Overrides log.format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info`. Overrides log.level; RUST_LOG overrides both.
    #[arg(long)]
    pub log_level: Option<String>,
}

pub fn broker(args: BrokerArgs) -> Result<()> {
    let mut cfg = sluice::broker::BrokerConfig::load(&args.config)?;
    if let Some(listen) = &args.listen {
        cfg.listen = config::parse_addr(listen).map_err(|r| anyhow::anyhow!("--listen: {r}"))?;
    }
    if let Some(format) = args.log_format {
        cfg.log.format = format;
    }
    if let Some(level) = &args.log_level {
        cfg.log.level = level.clone();
    }
    sluice::telemetry::init(cfg.log.format, &cfg.log.level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("sluice-broker")
        // Dropping a statement near the nesting limit recurses as deeply as
        // parsing it did; the serving runtime has the same margin.
        .thread_stack_size(256 << 20)
        .enable_all()
        .build()?;
    let result = runtime.block_on(sluice::broker::serve(cfg, |banner| {
        print!("{banner}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
