//! Assembles and runs the daemon: mTLS listener, Flight SQL, Sluice's own
//! services, health, reflection, metrics, and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arrow_flight::flight_service_server::FlightServiceServer;
use sluice_proto::v1::agreement_service_server::AgreementServiceServer;
use sluice_proto::v1::audit_service_server::AuditServiceServer;
use sluice_proto::v1::budget_service_server::BudgetServiceServer;
use sluice_proto::v1::catalog_service_server::CatalogServiceServer;
use sluice_proto::v1::connector_service_server::ConnectorServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::InterceptorLayer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::agreements::Agreements;
use crate::audit::Audit;
use crate::catalog::Catalog;
use crate::config::{Config, Source, TlsConfig};
use crate::connections::OpenConnections;
use crate::control::{AgreementDesk, AuditReceipts, Budgets, CatalogDirectory, ConnectorInfo};
use crate::dev::DEFAULT_IDENTITY;
use crate::flight::FlightSql;
use crate::identity;
use crate::metrics::{self, Metrics};
use crate::query::execute::Executor;
use crate::query::{Books, QueryEngine};
use crate::quota::QuotaStore;
use crate::state::StateDir;
use crate::usage_policy::PolicyHandle;
use sluice_privacy::Privacy;
use sluice_privacy::ledger::Ledger;

/// TLS handshakes that take longer are dropped: a peer that connects and
/// never finishes its handshake holds a socket for at most this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Peers that vanish without closing (a crashed client, a dropped NAT
/// entry) are found by keepalive probes: TCP after a minute idle, HTTP/2
/// PING every 30 s with 20 s to answer. Their streams are then cancelled
/// and whatever they held (an execution slot, memory) comes back.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves until SIGTERM/SIGINT, then drains in-flight streams for up to
/// `server.shutdown_grace`. Queries execute on `query_runtime`.
pub async fn serve(config: Config, query_runtime: tokio::runtime::Handle) -> Result<()> {
    serve_with(config, query_runtime, ServeHooks::default()).await
}

/// For benchmarks and embedding, never reachable from the CLI or a config
/// file: a gate that replaces the configured policy, a channel that
/// receives the bound address, and a switch that turns the audit log off.
#[derive(Default)]
pub struct ServeHooks {
    pub gate: Option<Arc<dyn sluice_policy::PlanGate>>,
    pub bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    /// Run without an audit log, to measure what auditing costs.
    pub audit_off: bool,
}

/// [`serve`] with [`ServeHooks`]: build, listen, serve, drain.
pub async fn serve_with(
    config: Config,
    query_runtime: tokio::runtime::Handle,
    mut hooks: ServeHooks,
) -> Result<()> {
    let bound = hooks.bound.take();
    let app = App::build(config, query_runtime, hooks).await?;
    let listening = app.listen().await?;
    if let Some(bound) = bound {
        let _ = bound.send(listening.addr());
    }
    listening.serve().await
}

/// Everything the daemon serves with, built (and checked) before it
/// listens: TLS, the catalog, the policy, the books (ledger, quota
/// counters, agreements, audit log) and the query engine.
pub struct App {
    config: Config,
    state: StateDir,
    tls: ServerTlsConfig,
    tls_files: TlsConfig,
    metrics: Arc<Metrics>,
    policy: Arc<PolicyHandle>,
    engine: Arc<QueryEngine>,
}

impl App {
    pub async fn build(
        config: Config,
        query_runtime: tokio::runtime::Handle,
        mut hooks: ServeHooks,
    ) -> Result<App> {
        let state = StateDir::new(&config.server.state_dir);
        let tls_files = tls_files(&config, &state);
        config.check_paths()?;
        let tls = server_tls(&tls_files)?;
        let spill = crate::catalog::Spill::prepare(
            &config.server.state_dir,
            config.limits.spill_space,
            config.limits.query_memory,
        )?;
        let catalog = Arc::new(Catalog::open(&config, &spill).await?);
        let metrics = Arc::new(Metrics::new());
        // Decoding is query work: it runs where queries run.
        query_runtime.spawn(crate::catalog::keep_decoded(
            Arc::downgrade(&catalog),
            metrics.table_cache_bytes.clone(),
        ));
        let policy = Arc::new(match hooks.gate.take() {
            Some(gate) => PolicyHandle::fixed(gate),
            None => {
                state.ensure_mask_key()?;
                let mask_key = std::fs::read(state.mask_key()).with_context(|| {
                    format!("reading the masking key {}", state.mask_key().display())
                })?;
                PolicyHandle::load(config.policy.as_deref(), mask_key, catalog.clone())?
            }
        });
        log_policy(&policy);
        let books = open_books(&state, hooks.audit_off)?;
        let cluster = crate::cluster::Cluster::new(&config.cluster, &state, config.tls.is_some())?
            .map(Arc::new);
        let engine = Arc::new(QueryEngine::new(
            catalog,
            policy.clone(),
            books,
            config.limits.clone(),
            Executor::new(query_runtime, config.limits.total_query_memory, cluster),
        ));
        Ok(App {
            config,
            state,
            tls,
            tls_files,
            metrics,
            policy,
            engine,
        })
    }

    pub fn engine(&self) -> &Arc<QueryEngine> {
        &self.engine
    }

    /// Binds the gRPC listener and the metrics endpoint.
    pub async fn listen(self) -> Result<Listening> {
        let listen = self.config.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen} (server.listen / --listen)"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let metrics_addr = match self.config.metrics.listen {
            Some(listen) => {
                Some(metrics::serve(listen, self.metrics.clone(), wait(stopped.clone())).await?)
            }
            None => None,
        };
        let dsp = match self.config.dsp.listen {
            Some(listen) => Some(self.dsp_endpoint(listen, addr).await?),
            None => None,
        };
        let console = match self.config.console.listen {
            Some(listen) => Some(self.console_endpoint(listen).await?),
            None => None,
        };
        Ok(Listening {
            app: self,
            listener,
            addr,
            metrics_addr,
            dsp,
            console,
            stop,
            stopped,
        })
    }

    /// Binds the web console and builds it.
    async fn console_endpoint(&self, listen: SocketAddr) -> Result<ConsoleEndpoint> {
        use crate::console::{Console, ConsoleSettings, session::Lifetimes};
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen} (console.listen / --console-listen)"))?;
        let bound = listener.local_addr()?;
        let settings = &self.config.console;
        let root = match &settings.public_url {
            Some(url) => url.as_str().trim_end_matches('/').to_string(),
            None => format!("https://{bound}"),
        };
        let tls = crate::https::server_config(&crate::https::TlsFiles {
            cert: self.tls_files.cert.clone(),
            key: self.tls_files.key.clone(),
            ca: self.tls_files.client_ca.clone(),
        })?;
        let console = Console::new(
            self.engine.clone(),
            self.metrics.clone(),
            ConsoleSettings {
                root: root.clone(),
                lifetimes: Lifetimes {
                    link: settings.login_link_ttl,
                    session: settings.session_ttl,
                    idle: settings.session_idle,
                },
            },
        );
        Ok(ConsoleEndpoint {
            listener,
            root,
            tls,
            console: Arc::new(console),
        })
    }

    /// Binds the DSP endpoint and builds its provider, now that the Flight
    /// SQL address its data addresses name is known.
    async fn dsp_endpoint(&self, listen: SocketAddr, flight: SocketAddr) -> Result<DspEndpoint> {
        use crate::dsp::{auth, https, provider, store};
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen} (dsp.listen / --dsp-listen)"))?;
        let bound = listener.local_addr()?;
        let dsp = &self.config.dsp;
        let root = match &dsp.public_url {
            Some(url) => url.as_str().trim_end_matches('/').to_string(),
            None => format!("https://{bound}"),
        };
        let files = https::TlsFiles {
            cert: self.tls_files.cert.clone(),
            key: self.tls_files.key.clone(),
            ca: self.tls_files.client_ca.clone(),
        };
        let participant = match &dsp.participant_id {
            Some(id) => id.clone(),
            None => https::principal_of(&files.cert)?,
        };
        let tls = https::server_config(&files)?;
        let provider = provider::Provider::new(
            self.engine.clone(),
            store::DspStore::open(&self.state.dsp_file())?,
            https::Outbound::new(files)?,
            Arc::new(auth::ClientCertificates),
            provider::ProviderSettings {
                dsp_url: format!("{root}{}", provider::BASE_PATH),
                flight_sql: dsp
                    .flight_endpoint
                    .clone()
                    .unwrap_or_else(|| format!("grpc+tls://{flight}")),
                participant,
                token_ttl: dsp.token_ttl,
            },
        );
        Ok(DspEndpoint {
            listener,
            root,
            tls,
            provider: Arc::new(provider),
        })
    }
}

/// The DSP endpoint, bound and built.
struct DspEndpoint {
    listener: TcpListener,
    /// `https://HOST:PORT`, where `/.well-known/dspace-version` is.
    root: String,
    tls: Arc<rustls::ServerConfig>,
    provider: Arc<crate::dsp::provider::Provider>,
}

/// The web console, bound and built.
struct ConsoleEndpoint {
    listener: TcpListener,
    /// `https://HOST:PORT`, or the configured public URL.
    root: String,
    tls: Arc<rustls::ServerConfig>,
    console: Arc<crate::console::Console>,
}

/// A bound daemon, ready to serve.
pub struct Listening {
    app: App,
    listener: TcpListener,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    dsp: Option<DspEndpoint>,
    console: Option<ConsoleEndpoint>,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
}

impl Listening {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Tells a newcomer what is running and how to reach it (the CLI
    /// prints it). The first line is stable: scripts and tests wait for
    /// `listening on grpc+tls://ADDR`.
    pub fn banner(&self) -> String {
        let policy = match self.app.policy.file() {
            Some(file) => format!("{} ({})", file.display(), self.app.policy.version()),
            None => "none: every query is refused until [policy] file is set".into(),
        };
        banner(
            &self.app.config,
            &self.app.state,
            (self.addr, self.metrics_addr),
            (
                self.dsp.as_ref().map(|d| d.root.as_str()),
                self.console.as_ref().map(|c| c.root.as_str()),
            ),
            &self.app.tls_files,
            &policy,
        )
    }

    /// Serves until SIGTERM/SIGINT, then drains: stops taking connections,
    /// lets in-flight streams finish for up to `server.shutdown_grace`, and
    /// returns what unredeemed tickets held.
    pub async fn serve(self) -> Result<()> {
        let Listening {
            app,
            listener,
            addr,
            metrics_addr,
            dsp,
            console,
            stop,
            stopped,
        } = self;
        let engine = app.engine.clone();
        let console = console.map(|c| {
            let router = crate::console::router(c.console.clone());
            tokio::spawn(crate::https::serve(
                "web console",
                c.listener,
                c.tls,
                router,
                stopped.clone(),
            ));
            tokio::spawn(
                c.console
                    .chain
                    .clone()
                    .watch(engine.clone(), stopped.clone()),
            );
            tracing::info!(url = %c.root, "serving the web console over HTTPS");
            c.console
        });
        if let Some(dsp) = dsp {
            let router = crate::dsp::provider::router(dsp.provider.clone());
            tokio::spawn(crate::https::serve(
                "DSP endpoint",
                dsp.listener,
                dsp.tls,
                router,
                stopped.clone(),
            ));
            tokio::spawn(dsp.provider.follow_agreements(stopped.clone()));
            tracing::info!(url = %dsp.root, "serving the Dataspace Protocol (2025-1) over HTTPS with mTLS");
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        report_serving(&health).await;
        spawn_background(&app, stopped.clone());
        if let Some(cluster) = engine.executor().cluster() {
            cluster.spawn_probes(stopped.clone());
            tracing::info!(workers = ?cluster.workers().all().iter().map(|u| u.as_str()).collect::<Vec<_>>(), "coordinating workers: leaf stages of each query run on them");
        }
        let (reflection_v1, reflection_v1alpha) = reflection()?;
        let open = app.metrics.connections.clone();
        let tracker = open.clone();
        let incoming = futures::StreamExt::map(
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(TCP_KEEPALIVE)),
            move |accepted| accepted.map(|socket| tracker.track(socket)),
        );
        let server = Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .tls_config(app.tls.clone())
            .context("configuring TLS")?
            .layer(InterceptorLayer::new(identity::authenticate))
            .layer(tower::util::MapResponseLayer::new(
                undecodable_requests_are_invalid_arguments,
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(FlightSql::new(engine.clone(), app.metrics.clone()).into_service())
            .add_service(Budgets::new(engine.privacy().clone()).into_service())
            .add_service(ConnectorInfo::new(engine.clone()).into_service())
            .add_service(CatalogDirectory::new(engine.clone()).into_service())
            .add_service(AgreementDesk::new(engine.clone()).into_service())
            .add_service(AuditReceipts::new(engine.clone()).into_service())
            .add_service(crate::console::grpc::ConsoleLinks::new(console).into_service())
            .serve_with_incoming_shutdown(incoming, wait(stopped));
        tracing::info!(%addr, metrics = ?metrics_addr, datasets = app.config.datasets.len(), "serving Flight SQL over mTLS");
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => result.context("the gRPC server stopped")?,
            signal = shutdown_signal() => {
                let grace = app.config.server.shutdown_grace;
                tracing::info!(signal, grace_s = grace.as_secs_f64(), "shutting down: refusing new connections, finishing in-flight queries");
                health.set_not_serving::<FlightServiceServer<FlightSql>>().await;
                let _ = stop.send(true);
                drain(&mut server, &open, grace).await?;
            }
        }
        // Tickets never redeemed read nothing: their holds come back.
        engine.withdraw_all();
        let settled = engine.clone();
        let _ = tokio::task::spawn_blocking(move || settled.privacy().settled()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Waits for in-flight streams, then for every connection to close, both
/// until `grace` is over.
async fn drain<F>(
    server: &mut std::pin::Pin<&mut F>,
    open: &OpenConnections,
    grace: Duration,
) -> Result<()>
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    let deadline = tokio::time::Instant::now() + grace;
    match tokio::time::timeout_at(deadline, server.as_mut()).await {
        Ok(result) => result.context("the gRPC server stopped")?,
        Err(_) => tracing::warn!("shutdown grace period over; closing the remaining streams"),
    }
    // Streams are done, but their last frames may still wait for the
    // client's flow-control window: let every connection close.
    let left = open
        .drained(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "shutdown grace period over; closing open connections"
        );
    }
    Ok(())
}

fn log_policy(policy: &PolicyHandle) {
    match policy.file() {
        Some(file) => {
            tracing::info!(file = %file.display(), version = %policy.version(), "usage policy loaded")
        }
        None => tracing::warn!(
            "no usage policy configured ([policy] file): every query will be refused"
        ),
    }
}

/// The ledger, the quota counters, the agreements and the audit log.
fn open_books(state: &StateDir, audit_off: bool) -> Result<Books> {
    // A lost ledger is never silently replaced by an empty one.
    state.check_books()?;
    // The ledger first: the quota counters share its database.
    let ledger = Arc::new(Ledger::open(&state.ledger_file())?);
    Ok(Books {
        privacy: Arc::new(Privacy::new(ledger)),
        quotas: Arc::new(QuotaStore::open(
            &state.ledger_file(),
            Some(&state.legacy_quota_file()),
        )?),
        agreements: Arc::new(Agreements::open(&state.agreements_file())?),
        audit: Arc::new(match audit_off {
            true => {
                tracing::warn!("audit log switched off by an embedding hook (benchmarks only)");
                Audit::disabled()
            }
            false => Audit::open(&state.audit_dir())?,
        }),
    })
}

/// Reports every service as serving.
async fn report_serving(health: &tonic_health::server::HealthReporter) {
    health.set_serving::<FlightServiceServer<FlightSql>>().await;
    health
        .set_serving::<ConnectorServiceServer<ConnectorInfo>>()
        .await;
    health.set_serving::<BudgetServiceServer<Budgets>>().await;
    health
        .set_serving::<CatalogServiceServer<CatalogDirectory>>()
        .await;
    health
        .set_serving::<AgreementServiceServer<AgreementDesk>>()
        .await;
    health
        .set_serving::<AuditServiceServer<AuditReceipts>>()
        .await;
}

/// The policy file watcher, and the sweep that returns what expired
/// tickets held.
fn spawn_background(app: &App, stopped: watch::Receiver<bool>) {
    let engine = app.engine.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(30));
        loop {
            every.tick().await;
            let expiring = engine.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // Unredeemed tickets return their holds as they go; the
                // ledger sweep catches any a crash left behind.
                expiring.purge_expired();
                expiring.privacy().expire(std::time::SystemTime::now())
            })
            .await;
        }
    });
    tokio::spawn(crate::usage_policy::watch_for_changes(
        app.policy.clone(),
        stopped,
    ));
}

fn reflection() -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building gRPC reflection")?;
    Ok((v1, v1alpha))
}

/// The configured TLS files, or the state directory's development PKI.
fn tls_files(config: &Config, state: &StateDir) -> TlsConfig {
    config.tls.clone().unwrap_or_else(|| {
        let (cert, key) = state.pair("server");
        TlsConfig {
            cert,
            key,
            client_ca: state.ca_cert(),
        }
    })
}

pub(crate) fn server_tls(files: &TlsConfig) -> Result<ServerTlsConfig> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
    };
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&files.cert, "server certificate")?,
            read(&files.key, "server key")?,
        ))
        .client_ca_root(Certificate::from_pem(read(&files.client_ca, "client CA")?))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT);
    // Parsed now, so that a damaged key or certificate is reported by file
    // name before anything listens, not after the banner.
    Server::builder().tls_config(config.clone()).with_context(|| {
        format!(
            "the server certificate {}, its key {} or the client CA {} cannot be used: they must be PEM (a certificate chain; a PKCS#8, PKCS#1 or SEC1 private key that belongs to it; CA certificates). Restore them, or make new ones with `sluice certs`",
            files.cert.display(),
            files.key.display(),
            files.client_ca.display()
        )
    })?;
    Ok(config)
}

async fn wait(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// What is running and how to reach it.
fn banner(
    config: &Config,
    state: &StateDir,
    (addr, metrics): (SocketAddr, Option<SocketAddr>),
    (dsp, console): (Option<&str>, Option<&str>),
    tls: &TlsConfig,
    policy: &str,
) -> String {
    let endpoint = format!("grpc+tls://{addr}");
    let mut out = String::new();
    out.push_str(&format!(
        "Sluice {} listening on {endpoint} (mTLS: client certificates required)\n",
        env!("CARGO_PKG_VERSION")
    ));
    if let Some(m) = metrics {
        out.push_str(&format!("  metrics on http://{m}/metrics\n"));
    }
    if let Some(root) = dsp {
        out.push_str(&format!(
            "  DSP 2025-1 on {root}{} (mTLS; versions at {root}/.well-known/dspace-version)\n",
            crate::dsp::provider::BASE_PATH
        ));
    }
    if let Some(root) = console {
        out.push_str(&format!(
            "  web console on {root}/ (sign in: sluice console --identity admin)\n"
        ));
    }
    out.push_str(&format!("  config:    {}\n", config.source));
    out.push_str(&format!("  state dir: {}\n", state.root().display()));
    let names: Vec<&str> = config.datasets.iter().map(|d| d.name.as_str()).collect();
    out.push_str(&format!("  datasets:  {}\n", names.join(", ")));
    out.push_str(&format!("  policy:    {policy}\n"));
    if matches!(config.source, Source::Embedded) {
        let (cert, key) = state.pair(DEFAULT_IDENTITY);
        let state_arg = if state.root() == crate::config::absolute(std::path::Path::new(".sluice"))
        {
            String::new()
        } else {
            format!(" --state-dir {}", state.root().display())
        };
        out.push_str(&format!(
            "\nTry it (demo identity `{DEFAULT_IDENTITY}`, whose policy releases trips only as aggregates, for a declared purpose):\n  \
             cargo run --release -- query{state_arg} -p research \"SELECT mode, count(*) AS trips, round(avg(fare_eur), 2) AS avg_fare FROM trips GROUP BY mode ORDER BY trips DESC\"\n  \
             cargo run --release -- query{state_arg} -p research \"EXPLAIN POLICY SELECT fare_eur FROM trips\"\n  \
             cargo run --release -- query{state_arg} --identity supplier \"SELECT event_id, machine_serial, event_time FROM machine_events LIMIT 5\"\n  \
             sluice query --endpoint {endpoint} --ca {ca} --cert {cert} --key {key} \"SELECT district, count(*) FROM zones GROUP BY district\"\n",
            ca = tls.client_ca.display(),
            cert = cert.display(),
            key = key.display(),
        ));
        out.push_str(&format!(
            "\nPython (pip install adbc-driver-flightsql pyarrow):\n\
             \x20 import adbc_driver_flightsql.dbapi as flightsql\n\
             \x20 read = lambda p: open(p).read()\n\
             \x20 conn = flightsql.connect(\"{endpoint}\", db_kwargs={{\n\
             \x20     \"adbc.flight.sql.client_option.tls_root_certs\": read(\"{ca}\"),\n\
             \x20     \"adbc.flight.sql.client_option.mtls_cert_chain\": read(\"{cert}\"),\n\
             \x20     \"adbc.flight.sql.client_option.mtls_private_key\": read(\"{key}\"),\n\
             \x20     \"adbc.flight.sql.rpc.call_header.x-sluice-purpose\": \"research\",\n\
             \x20 }})\n\
             \x20 cur = conn.cursor()\n\
             \x20 cur.execute(\"SELECT start_zone, count(*) AS trips FROM trips GROUP BY start_zone ORDER BY trips DESC LIMIT 5\")\n\
             \x20 print(cur.fetch_arrow_table())\n",
            ca = tls.client_ca.display(),
            cert = cert.display(),
            key = key.display(),
        ));
    }
    out
}

/// A request whose protobuf does not decode is bad input, not a fault of
/// the connector: INVALID_ARGUMENT rather than the INTERNAL that tonic's
/// codec ("failed to decode Protobuf message: …") and arrow-flight's
/// command decoding (`ParseError(…)`) report it as. Applied to every
/// response in one place, since neither can be told otherwise.
fn undecodable_requests_are_invalid_arguments<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    use tonic::codegen::http::HeaderValue;
    let headers = response.headers_mut();
    let internal = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"13");
    let undecodable = headers.get("grpc-message").is_some_and(|message| {
        let message = message.as_bytes();
        message.starts_with(b"failed%20to%20decode%20Protobuf%20message")
            || message.starts_with(b"failed to decode Protobuf message")
            || message.starts_with(b"ParseError(")
    });
    if internal && undecodable {
        headers.insert("grpc-status", HeaderValue::from_static("3"));
    }
    response
}
