//! Prometheus metrics, served over plain HTTP on a separate (by default
//! loopback) port, together with `/healthz` for orchestrators that probe
//! without a client certificate.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_queries_total` | counter | `outcome` (ok, invalid, not_found, denied, ticket_rejected, resource_exhausted, timeout, data_error, internal, cancelled) |
//! | `sluice_query_duration_seconds` | histogram | end-to-end DoGet time |
//! | `sluice_plan_duration_seconds` | histogram | GetFlightInfo planning time |
//! | `sluice_result_rows_total` | counter | |
//! | `sluice_result_bytes_total` | counter | encoded Flight bytes sent |
//! | `sluice_active_queries` | gauge | |
//! | `sluice_rpc_errors_total` | counter | `method`, `code` |

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcErrorLabel {
    pub method: String,
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    pub queries: Family<OutcomeLabel, Counter>,
    pub query_duration: Histogram,
    pub plan_duration: Histogram,
    pub result_rows: Counter,
    pub result_bytes: Counter,
    pub active_queries: Gauge,
    pub rpc_errors: Family<RpcErrorLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let queries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "queries",
            "Queries executed (DoGet), by outcome",
            queries.clone(),
        );
        // 0.5 ms … ~70 s
        let query_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        registry.register(
            "query_duration_seconds",
            "End-to-end execution and streaming time of a query (DoGet)",
            query_duration.clone(),
        );
        let plan_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "plan_duration_seconds",
            "Planning and policy decision time (GetFlightInfo)",
            plan_duration.clone(),
        );
        let result_rows = Counter::default();
        registry.register(
            "result_rows",
            "Rows released to clients",
            result_rows.clone(),
        );
        let result_bytes = Counter::default();
        registry.register(
            "result_bytes",
            "Encoded Flight bytes released to clients",
            result_bytes.clone(),
        );
        let active_queries = Gauge::default();
        registry.register(
            "active_queries",
            "Queries currently streaming",
            active_queries.clone(),
        );
        let rpc_errors = Family::<RpcErrorLabel, Counter>::default();
        registry.register(
            "rpc_errors",
            "Failed RPCs by method and gRPC status code",
            rpc_errors.clone(),
        );
        Self {
            registry,
            queries,
            query_duration,
            plan_duration,
            result_rows,
            result_bytes,
            active_queries,
            rpc_errors,
        }
    }

    pub fn count_query(&self, outcome: &str) {
        self.queries
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn count_rpc_error(&self, method: &str, code: tonic::Code) {
        self.rpc_errors
            .get_or_create(&RpcErrorLabel {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address is in use or not this host's: change metrics.listen (or
    /// `off`).
    #[error("binding the metrics endpoint on {addr} (metrics.listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket has no local address (an OS failure).
    #[error(transparent)]
    LocalAddress(std::io::Error),
}

/// Binds the metrics endpoint and serves it until `shutdown` resolves.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(MetricsError::LocalAddress)?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(|| async { (StatusCode::OK, "ok\n").into_response() }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.count_query("ok");
        m.count_query("ok");
        m.result_rows.inc_by(5);
        let text = m.render();
        assert!(
            text.contains("sluice_queries_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("sluice_result_rows_total 5"), "{text}");
    }
}
