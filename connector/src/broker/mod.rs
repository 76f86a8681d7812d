//! Broker mode: a Sluice that serves Flight SQL to consumers and answers
//! queries over *federated tables* (one name for same-schema datasets at
//! several providers) by asking every provider for partial aggregates.
//!
//! The path of a federated query:
//!
//! 1. **Identity.** The consumer's client certificate (mTLS), checked
//!    against `access.consumers` ([`service`]).
//! 2. **Decomposition.** The SQL is split into one partial aggregate query
//!    per provider and one merge query ([`decompose`]).
//! 3. **Fan-out.** Each provider gets its partial query over the broker's
//!    own mTLS connection, with the consumer's identity in a signed
//!    on-behalf-of assertion ([`crate::relay`]), the consumer's purpose and
//!    ε, and a timeout ([`upstream`]). Each provider decides it under its own
//!    policy, noises it, charges its own budget and audits it.
//! 4. **Merge.** DataFusion runs the merge query over the partial answers;
//!    noise variances combine into the reported confidence half-widths, and
//!    the result names the providers, their receipts and ε ([`merge`]).
//!
//! The broker keeps no data, no budget and no audit log of its own: the
//! providers' receipts are the record. See docs/federation.md.

pub mod config;
pub mod decompose;
pub mod merge;
pub mod service;
pub mod upstream;

use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;
use tonic::service::InterceptorLayer;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

pub use config::BrokerConfig;
pub use service::Broker;

/// Serves until SIGTERM/SIGINT. Once listening, hands `on_listening` the
/// banner for a person (the CLI prints it); its first line is stable for
/// scripts: `Sluice broker … listening on grpc+tls://ADDR`.
pub async fn serve(config: BrokerConfig, on_listening: impl FnOnce(String)) -> Result<()> {
    config.check_paths()?;
    let tls = crate::server::server_tls(&config.tls)?;
    let config = Arc::new(config);
    let broker = Broker::new(config.clone())?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FlightServiceServer<Broker>>().await;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {} (server.listen / --listen)", config.listen))?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .layer(InterceptorLayer::new(crate::identity::authenticate))
        .add_service(health_service)
        .add_service(broker.into_service())
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });

    let tables: Vec<String> = config
        .federated
        .iter()
        .map(|t| {
            let sources: Vec<String> = t.sources.iter().map(|(p, d)| format!("{p}:{d}")).collect();
            format!("{} ({})", t.name, sources.join(", "))
        })
        .collect();
    on_listening(format!(
        "Sluice broker {} listening on grpc+tls://{addr} (mTLS: client certificates required)\n  config:    {}\n  federated: {}\n  providers: {}\n",
        env!("CARGO_PKG_VERSION"),
        config.source,
        tables.join("; "),
        config
            .providers
            .iter()
            .map(|p| format!("{} at {}", p.name, p.endpoint))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    tracing::info!(%addr, providers = config.providers.len(), "broker serving Flight SQL over mTLS");

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.context("the gRPC server stopped")?,
        signal = crate::server::shutdown_signal() => {
            tracing::info!(signal, "broker shutting down");
            health.set_not_serving::<FlightServiceServer<Broker>>().await;
            let _ = stop.send(());
            if tokio::time::timeout(config.shutdown_grace, &mut server).await.is_err() {
                tracing::warn!("shutdown grace period over; closing the remaining streams");
            }
        }
    }
    Ok(())
}
