//! `sluice dsp`: the consumer side of the Dataspace Protocol against any
//! DSP 2025-1 provider (another Sluice, or a connector that offers Flight
//! SQL pull): read the catalog, negotiate for an offer, start and end a
//! transfer. Each command runs the callback endpoint it needs while it
//! runs; `transfer` ends with the Flight SQL address and token that
//! `sluice query --token` (or ADBC) uses.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use sluice::dsp::consumer::Consumer;
use sluice::dsp::https::TlsFiles;
use sluice::dsp::wire::Message;

use super::conn::ConnArgs;

#[derive(Subcommand)]
pub enum DspCommand {
    /// Show the datasets and offers a provider's DSP catalog holds for you.
    Catalog {
        #[command(flatten)]
        side: Side,
        /// The provider's DSP root URL, e.g. https://127.0.0.1:8443.
        url: String,
        /// Print the catalog as the provider sent it (JSON-LD).
        #[arg(long)]
        json: bool,
    },
    /// Negotiate an agreement for an offer; prints the agreement id.
    Negotiate {
        #[command(flatten)]
        side: Side,
        url: String,
        /// The offer's @id, as the catalog lists it (e.g. trips/city-research).
        offer: String,
        /// The purpose of use, where the offer lists several (or none).
        #[arg(long, short = 'p')]
        purpose: Option<String>,
        /// How long to wait for each answer: a manual offer waits for the provider's administrator.
        #[arg(long, default_value = "60s", value_parser = sluice::config::parse_duration)]
        wait: Duration,
    },
    /// Start a Flight SQL pull transfer under an agreement; prints the endpoint and access token.
    Transfer {
        #[command(flatten)]
        side: Side,
        url: String,
        /// The agreement id the negotiation printed.
        agreement: String,
        #[arg(long, default_value = "60s", value_parser = sluice::config::parse_duration)]
        wait: Duration,
    },
    /// End a transfer: its access token stops working at once.
    End {
        #[command(flatten)]
        side: Side,
        url: String,
        /// The transfer's providerPid, as `transfer` printed it.
        transfer: String,
        /// Terminate (default), complete, or suspend (a suspended transfer can be started again).
        #[arg(long, value_enum, default_value = "terminate")]
        how: Ending,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Ending {
    Terminate,
    Complete,
    Suspend,
}

/// This consumer: its certificate and its callback endpoint.
#[derive(Args)]
pub struct Side {
    #[command(flatten)]
    conn: ConnArgs,
    /// Where the callback endpoint listens while the command runs.
    #[arg(long, default_value = "127.0.0.1:0")]
    callback_listen: SocketAddr,
    /// The callback URL the provider is given (default https://<bound address>/callback).
    #[arg(long)]
    callback_url: Option<String>,
}

impl Side {
    async fn consumer(&self) -> Result<Consumer> {
        let files = self.conn.tls_files();
        let files = TlsFiles {
            cert: files.cert,
            key: files.key,
            ca: files.ca,
        };
        Consumer::start(files, self.callback_listen, self.callback_url.clone())
            .await
            .context("starting the DSP consumer")
    }
}

pub async fn run(command: DspCommand) -> Result<()> {
    match command {
        DspCommand::Catalog { side, url, json } => {
            let catalog = side.consumer().await?.catalog(&url).await?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&catalog)?),
                false => print_catalog(&catalog),
            }
        }
        DspCommand::Negotiate {
            side,
            url,
            offer,
            purpose,
            wait,
        } => {
            let mut consumer = side.consumer().await?;
            let agreed = consumer
                .negotiate(&url, &offer, purpose.as_deref(), wait)
                .await?;
            let id = agreed.agreement["@id"].as_str().unwrap_or_default();
            eprintln!(
                "negotiation {} FINALIZED: agreement for `{}`",
                agreed.provider_pid,
                agreed.agreement["target"].as_str().unwrap_or_default()
            );
            println!("agreement: {id}");
            eprintln!("next: sluice dsp transfer {url} {id}");
        }
        DspCommand::Transfer {
            side,
            url,
            agreement,
            wait,
        } => {
            let mut consumer = side.consumer().await?;
            let started = consumer.transfer(&url, &agreement, wait).await?;
            println!("transfer: {}", started.provider_pid);
            println!("endpoint: {}", started.endpoint);
            println!("token: {}", started.token);
            if let Some(expires) = &started.expires_at {
                println!("expires: {expires}");
            }
            eprintln!(
                "query with: sluice query --endpoint {} --token <token> \"SELECT …\"\n\
                 (ADBC: db_kwargs[\"adbc.flight.sql.authorization_header\"] = \"Bearer <token>\")\n\
                 end with:   sluice dsp end {url} {}",
                started.endpoint, started.provider_pid
            );
        }
        DspCommand::End {
            side,
            url,
            transfer,
            how,
            reason,
        } => {
            let kind = match how {
                Ending::Terminate => Message::TransferTerminationMessage,
                Ending::Complete => Message::TransferCompletionMessage,
                Ending::Suspend => Message::TransferSuspensionMessage,
            };
            side.consumer()
                .await?
                .end_transfer(&url, &transfer, kind, reason.as_deref())
                .await?;
            println!("transfer {transfer}: {}", kind.name());
        }
    }
    Ok(())
}

fn print_catalog(catalog: &serde_json::Value) {
    println!(
        "participant: {}",
        catalog["participantId"].as_str().unwrap_or_default()
    );
    for dataset in catalog["dataset"].as_array().into_iter().flatten() {
        println!("dataset {}", dataset["@id"].as_str().unwrap_or_default());
        if let Some(title) = dataset["title"].as_str() {
            println!("  {title}");
        }
        for offer in dataset["hasPolicy"].as_array().into_iter().flatten() {
            println!("  offer {}", offer["@id"].as_str().unwrap_or_default());
            for rule in offer["permission"].as_array().into_iter().flatten() {
                for c in rule["constraint"].as_array().into_iter().flatten() {
                    let left = c["leftOperand"].as_str().unwrap_or_default();
                    let left = left.rsplit('/').next().unwrap_or(left);
                    println!(
                        "    {left} {} {}",
                        c["operator"].as_str().unwrap_or_default(),
                        match &c["rightOperand"] {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        }
                    );
                }
            }
        }
        for d in dataset["distribution"].as_array().into_iter().flatten() {
            println!(
                "  distribution {} at {}",
                d["format"].as_str().unwrap_or_default(),
                d["accessService"]["endpointURL"]
                    .as_str()
                    .unwrap_or_default()
            );
        }
    }
}
