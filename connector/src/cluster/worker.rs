//! `sluice worker`: executes plan fragments for its coordinators, nothing
//! else. It never sees a consumer, the policy document, the ledger, the
//! audit log or the masking key (the stages it runs do carry what the
//! policy's rewrite put in them: row filters and their literals): it
//! answers only mTLS clients whose certificate carries the coordinator role
//! ([`Role::Coordinator`]), and runs what they send with DataFusion's
//! operators and the connector's own guarded functions, under the limits
//! of the query each stage belongs to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion_distributed::{
    DistributedExt, Worker, WorkerPlanRewriteEvent, WorkerPlanRewriteEventResponse,
    WorkerQueryContext, WorkerSessionBuilder,
};
use tonic::codegen::http::{HeaderMap, HeaderValue};
use tonic::service::InterceptorLayer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use super::ClusterError;
use crate::guard::total::total_expressions;
use crate::guard::{self, QueryGuard};
use crate::pki::Role;

/// What a worker needs to serve.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub listen: SocketAddr,
    /// The worker's server certificate and key (`sluice certs worker`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA its coordinators' certificates are issued by.
    pub coordinator_ca: PathBuf,
    /// Memory all fragments running on this worker share; beyond it a
    /// fragment fails with RESOURCE_EXHAUSTED (workers do not spill).
    pub memory: usize,
}

/// The session a worker runs fragments in: DataFusion's functions with the
/// connector's guards, exactly as the coordinator's session has them, so a
/// function sent by name means the same thing on both sides (the cut
/// checks it: `cut::Functions`).
pub fn worker_session(builder: SessionStateBuilder) -> SessionStateBuilder {
    let mut builder = builder.with_default_features();
    let defaults = builder.scalar_functions().take().unwrap_or_default();
    builder.with_scalar_functions(guard::session_functions(defaults))
}

#[derive(Clone)]
struct Sessions;

/// The coordinator's [`total_expressions`] rewrite, applied here to every
/// stage received: a row's failing value gives that row NULL instead of
/// failing (and so describing) the query. The coordinator cannot send the
/// wrapped expressions (datafusion-proto does not encode custom
/// expressions through datafusion-distributed's codec), so every worker
/// applies it itself, whatever it is sent.
fn total_on_worker(
    ev: WorkerPlanRewriteEvent<'_>,
) -> Result<WorkerPlanRewriteEventResponse, DataFusionError> {
    total_expressions(ev.plan).map(WorkerPlanRewriteEventResponse::new)
}

/// The query's limits, sent with each stage (as headers), so that a
/// worker's function calls are bounded as the coordinator's are: by the
/// query's deadline, and by its memory shared between its call sites.
#[derive(Debug, Clone, Copy)]
pub struct StageLimits {
    /// Time left until the query's deadline.
    pub remaining: Duration,
    /// `limits.query_memory`.
    pub memory: usize,
    /// Calls in the query that build values (`guard::call_sites`).
    pub call_sites: usize,
}

const DEADLINE_HEADER: &str = "x-sluice-deadline-ms";
const MEMORY_HEADER: &str = "x-sluice-query-memory";
const SITES_HEADER: &str = "x-sluice-call-sites";

impl StageLimits {
    pub fn to_headers(self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: u128| {
            headers.insert(name, HeaderValue::from(value.min(u64::MAX as u128) as u64));
        };
        put(DEADLINE_HEADER, self.remaining.as_millis());
        put(MEMORY_HEADER, self.memory as u128);
        put(SITES_HEADER, self.call_sites as u128);
        headers
    }

    /// The limits a stage came with; a stage without them (not sent by a
    /// Sluice coordinator) gets the strictest: no time, no memory.
    fn from_headers(headers: &HeaderMap) -> Self {
        let read = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Self {
            remaining: Duration::from_millis(read(DEADLINE_HEADER).unwrap_or(0)),
            memory: read(MEMORY_HEADER).unwrap_or(0) as usize,
            call_sites: read(SITES_HEADER).unwrap_or(1) as usize,
        }
    }
}

#[async_trait]
impl WorkerSessionBuilder for Sessions {
    async fn build_session_state(
        &self,
        ctx: WorkerQueryContext,
    ) -> Result<SessionState, DataFusionError> {
        let limits = StageLimits::from_headers(&ctx.headers);
        let state = worker_session(ctx.builder)
            .with_distributed_worker_plan_rewrite_handler(total_on_worker)
            .build();
        // The worker's pool is shared by every stage it runs; the guard
        // reserves each call's estimate there, and refuses calls past the
        // query's deadline or beyond its share of the query's memory.
        let pool = Arc::clone(&state.runtime_env().memory_pool);
        let guard = QueryGuard::new(
            Some(std::time::Instant::now() + limits.remaining),
            limits.memory,
            Some(pool),
        );
        guard.share_memory(limits.call_sites);
        Ok(guard::for_query(state, Arc::new(guard)))
    }
}

/// A bound worker, ready to serve.
pub struct ListeningWorker {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    tls: ServerTlsConfig,
    options: WorkerOptions,
}

impl ListeningWorker {
    /// Reads the certificates and binds the address; nothing is served yet.
    pub async fn bind(options: WorkerOptions) -> Result<Self, ClusterError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| ClusterError::Tls {
                file: path.clone(),
                reason: e.to_string(),
            })
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&options.cert)?,
                read(&options.key)?,
            ))
            .client_ca_root(Certificate::from_pem(read(&options.coordinator_ca)?))
            .client_auth_optional(false);
        Server::builder()
            .tls_config(tls.clone())
            .map_err(|e| ClusterError::Tls {
                file: options.cert.clone(),
                reason: format!("the certificate, its key or the CA cannot be used: {e}"),
            })?;
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|e| ClusterError::Listen {
                addr: options.listen,
                reason: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| ClusterError::Listen {
            addr: options.listen,
            reason: e.to_string(),
        })?;
        Ok(Self {
            listener,
            addr,
            tls,
            options,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves fragments until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ClusterError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.options.memory, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| ClusterError::Runtime(e.to_string()))?;
        let own = worker_session(SessionStateBuilder::new()).build();
        let version = super::channels::build_fingerprint(&super::cut::Functions::of(&own));
        let worker = Worker::from_session_builder(Sessions)
            .with_runtime_env(runtime)
            .with_version(version);
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        Server::builder()
            .tls_config(self.tls)
            .map_err(|e| ClusterError::Runtime(e.to_string()))?
            .layer(InterceptorLayer::new(coordinators_only))
            .add_service(worker.into_worker_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ClusterError::Runtime(e.to_string()))
    }
}

/// Every call must come from a coordinator of this deployment: TLS has
/// checked the chain; this checks the role. A consumer's certificate from
/// the same CA is refused here.
pub fn coordinators_only(request: Request<()>) -> Result<Request<()>, Status> {
    let Some(leaf) = request.peer_certs().and_then(|c| c.first().cloned()) else {
        return Err(Status::unauthenticated(
            "a worker needs the coordinator's client certificate (mTLS)",
        ));
    };
    let principal = crate::identity::principal_from_der(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("client certificate not usable: {e}")))?;
    if principal
        .san_uris
        .iter()
        .any(|u| u == Role::Coordinator.uri())
    {
        return Ok(request);
    }
    Err(Status::permission_denied(format!(
        "this is a Sluice worker: it serves only its coordinators, and `{}` has no coordinator role (issue one with `sluice certs coordinator`); consumers query the connector",
        principal.id
    )))
}
