//! `sluice config`: the embedded demo configuration, and checking a file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use sluice::config::Config;

use super::client_runtime;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the embedded demo configuration (a starting point for your own).
    Example,
    /// Validate a configuration file, including that its paths exist.
    Check { file: PathBuf },
}

pub fn run(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Example => {
            print!("{}", Config::embedded_default_text());
            Ok(())
        }
        ConfigCommand::Check { file } => {
            let cfg = Config::load(&file)?;
            cfg.check_paths()?;
            let policy = match &cfg.policy {
                Some(policy_file) => {
                    let version = client_runtime()?
                        .block_on(sluice::usage_policy::check(&cfg, policy_file))?;
                    format!("policy {} {version}", policy_file.display())
                }
                None => "no policy: every query would be refused".into(),
            };
            println!(
                "{}: valid ({} dataset(s), listen {}, {policy})",
                file.display(),
                cfg.datasets.len(),
                cfg.server.listen
            );
            Ok(())
        }
    }
}
