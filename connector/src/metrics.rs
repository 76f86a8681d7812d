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
//! | `sluice_table_cache_bytes` | gauge | decoded copies of local datasets held (`limits.table_cache`) |
//! | `sluice_rpc_errors_total` | counter | `method`, `code` |
//! | `sluice_open_connections` | gauge | client connections open (TLS handshakes included) |
//! | `sluice_process_resident_memory_bytes` | gauge | the daemon's RSS, read at scrape time |
//! | `sluice_process_open_fds` | gauge | open file descriptors, read at scrape time |
//! | `sluice_process_threads` | gauge | OS threads, read at scrape time |

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

use crate::connections::OpenConnections;

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
    /// Bytes of decoded dataset copies held; the catalog's keeper sets it.
    pub table_cache_bytes: Gauge,
    pub rpc_errors: Family<RpcErrorLabel, Counter>,
    /// Counts accepted sockets until they close; the server tracks its
    /// connections with it.
    pub connections: OpenConnections,
    process: ProcessGauges,
}

/// What the process holds, read from `/proc/self` at each scrape.
#[derive(Default)]
struct ProcessGauges {
    open_connections: Gauge,
    resident_memory: Gauge,
    open_fds: Gauge,
    threads: Gauge,
}

impl ProcessGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "open_connections",
            "Client connections open, TLS handshakes in progress included",
            self.open_connections.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the daemon",
            self.resident_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors of the daemon",
            self.open_fds.clone(),
        );
        registry.register(
            "process_threads",
            "OS threads of the daemon",
            self.threads.clone(),
        );
    }

    /// Reads the gauges afresh. On a system without `/proc` they stay 0.
    fn refresh(&self, connections: &OpenConnections) {
        self.open_connections.set(connections.count() as i64);
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<i64>().ok())
            };
            if let Some(kib) = field("VmRSS:") {
                self.resident_memory.set(kib * 1024);
            }
            if let Some(n) = field("Threads:") {
                self.threads.set(n);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
    }
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
        let table_cache_bytes = Gauge::default();
        registry.register(
            "table_cache_bytes",
            "Decoded copies of datasets on the connector's disk held in memory (limits.table_cache)",
            table_cache_bytes.clone(),
        );
        let rpc_errors = Family::<RpcErrorLabel, Counter>::default();
        registry.register(
            "rpc_errors",
            "Failed RPCs by method and gRPC status code",
            rpc_errors.clone(),
        );
        let process = ProcessGauges::default();
        process.register(&mut registry);
        Self {
            registry,
            queries,
            query_duration,
            plan_duration,
            result_rows,
            result_bytes,
            active_queries,
            table_cache_bytes,
            rpc_errors,
            connections: OpenConnections::default(),
            process,
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
        self.process.refresh(&self.connections);
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

    #[test]
    fn process_gauges_are_read_at_scrape_time() {
        let m = Metrics::new();
        let text = m.render();
        let value = |name: &str| -> i64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
        };
        assert!(value("sluice_process_resident_memory_bytes") > 1 << 20);
        assert!(value("sluice_process_open_fds") >= 3);
        assert!(value("sluice_process_threads") >= 1);
        assert_eq!(value("sluice_open_connections"), 0);
    }
}
