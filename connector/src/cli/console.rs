//! `sluice console`: a one-time sign-in link for the web console, asked
//! for over mTLS with the caller's own certificate.

use anyhow::{Context, Result};
use clap::Args;
use sluice::config;
use sluice_proto::v1::CreateLoginLinkRequest;
use sluice_proto::v1::console_service_client::ConsoleServiceClient;

use super::conn::ConnArgs;

#[derive(Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// How long the link works, e.g. `2m` (default and maximum: the
    /// connector's console.login_link_ttl, 5m unless configured).
    #[arg(long)]
    ttl: Option<String>,
    /// Also open the link in the desktop's browser (xdg-open).
    #[arg(long)]
    open: bool,
}

pub async fn console(args: ConsoleArgs) -> Result<()> {
    let ttl_seconds = match &args.ttl {
        None => 0,
        Some(text) => {
            let ttl =
                config::parse_duration(text).map_err(|e| anyhow::anyhow!("--ttl: {e}, e.g. 2m"))?;
            u32::try_from(ttl.as_secs().max(1)).context("--ttl is too long")?
        }
    };
    let connection = args.conn.connect().await?;
    let link = ConsoleServiceClient::new(connection.channel())
        .create_login_link(CreateLoginLinkRequest { ttl_seconds })
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    eprintln!(
        "Open this link in your browser to sign in to the console as {}. It works once, until {}:",
        link.principal_id, link.expires_at
    );
    println!("{}", link.url);
    if args.open {
        // Best effort: a machine without a desktop still has the printed link.
        if let Err(e) = std::process::Command::new("xdg-open")
            .arg(&link.url)
            .status()
        {
            eprintln!("could not open a browser ({e}); open the link above yourself");
        }
    }
    Ok(())
}
