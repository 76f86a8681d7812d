//! Distributed execution (step 6, execution, on several machines): the
//! coordinator's side of datafusion-distributed, and the worker.
//!
//! Identity, planning, the policy decision and rewrite, quotas, the DP
//! statistics plan, noise, the ledger and the audit log stay on the
//! coordinator. After physical planning, [`Cluster::distribute`] moves the
//! plan's leaf stages (scans, filters, projections, partial aggregations:
//! [`cut`]) to the workers, which stream partial results back; the rest of
//! the plan runs here as on a single node. [`report`] shows the stages to
//! consumers (`EXPLAIN POLICY`) and logs what each worker did.

pub mod channels;
pub mod cut;
pub mod report;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::{
    DistributedExt, DistributedLeafExec, NetworkBoundaryExt, RouteTasksEvent,
    RouteTasksEventResponse, RouteTasksHandler, ScaleUpLeafNodeEvent, ScaleUpLeafNodeEventResponse,
    SessionStateBuilderExt,
};
use url::Url;

use crate::config::ClusterConfig;
use crate::state::StateDir;
use channels::{Channels, Routing, Workers};

/// Why the cluster cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{}: {reason}; make the certificates with `sluice certs coordinator` / `sluice certs worker`", file.display())]
    Tls { file: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("the worker stopped: {0}")]
    Runtime(String),
    #[error("{}: {reason}", file.display())]
    Role { file: PathBuf, reason: String },
    #[error(
        "[cluster] has workers and [tls] is set, but cluster.cert, cluster.key and cluster.worker_ca are not: set them (the development PKI is for the demo only)"
    )]
    NoCoordinatorCertificate,
}

/// The coordinator's view of its workers.
pub struct Cluster {
    workers: Arc<Workers>,
    channels: Channels,
    functions: cut::Functions,
    probe_interval: std::time::Duration,
}

/// A plan whose leaf stages run on workers, and the session (with the
/// routing and channels) to execute it with.
pub struct Distributed {
    pub plan: Arc<dyn ExecutionPlan>,
    pub state: SessionState,
    pub workers: Vec<Url>,
}

impl Distributed {
    /// How many stages run on the workers.
    pub fn stages(&self) -> usize {
        let mut stages = 0;
        let _ = self.plan.apply(|node| {
            stages += usize::from(node.is_network_boundary());
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        stages
    }
}

impl Cluster {
    /// `None` when no worker is configured: every query runs here.
    /// `production_tls`: the connector has its own `[tls]`, so the
    /// development PKI must not stand in for the cluster's certificates.
    pub fn new(
        config: &ClusterConfig,
        state: &StateDir,
        production_tls: bool,
    ) -> Result<Option<Self>, ClusterError> {
        if config.workers.is_empty() {
            return Ok(None);
        }
        let (cert, key, ca) = match &config.tls {
            Some(tls) => (tls.cert.clone(), tls.key.clone(), tls.worker_ca.clone()),
            None if production_tls => return Err(ClusterError::NoCoordinatorCertificate),
            None => {
                let (cert, key) = state.pair("coordinator");
                (cert, key, state.ca_cert())
            }
        };
        check_coordinator_role(&cert)?;
        let channels = Channels::new(&cert, &key, &ca)?;
        let worker_state = worker::worker_session(SessionStateBuilder::new()).build();
        let functions = cut::Functions::of(&worker_state);
        let version = channels::build_fingerprint(&functions);
        Ok(Some(Self {
            workers: Arc::new(Workers::new(
                config.workers.clone(),
                channels.clone(),
                version,
            )),
            channels,
            functions,
            probe_interval: config.probe_interval,
        }))
    }

    pub fn workers(&self) -> &Arc<Workers> {
        &self.workers
    }

    /// Probes the workers every `cluster.probe_interval` until `stopped`.
    pub fn spawn_probes(&self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let workers = Arc::clone(&self.workers);
        let interval = self.probe_interval;
        tokio::spawn(async move {
            loop {
                workers.probe().await;
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// `physical` with its leaf stages on the live workers, or `None` to
    /// run it here (no stage can move, or no worker answers). `limits`
    /// travel with the stages: each worker guards its part of the query as
    /// this connector guards the whole ([`worker::StageLimits`]).
    pub async fn distribute(
        &self,
        physical: Arc<dyn ExecutionPlan>,
        logical: &LogicalPlan,
        state: &SessionState,
        limits: worker::StageLimits,
    ) -> Result<Option<Distributed>> {
        let live = self.workers.live();
        if live.is_empty() {
            tracing::warn!("no worker answers: the query runs on the coordinator");
            return Ok(None);
        }
        let Some((plan, state)) = self
            .place(physical, logical, state, &live, limits.to_headers())
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(Distributed {
            plan,
            state,
            workers: live,
        }))
    }

    /// The stages `physical` would run in with every configured worker
    /// answering, as [`cut`] places them, for `EXPLAIN POLICY`: nothing is
    /// sent. `None`: the plan runs on the coordinator whatever the workers
    /// (no stage can move, or one worker, whose stages datafusion-
    /// distributed runs here).
    pub fn stages(
        &self,
        physical: Arc<dyn ExecutionPlan>,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let workers = self.workers.all().len();
        if workers < 2 {
            return Ok(None);
        }
        cut::place_stages(physical, workers, &self.functions)
    }

    /// Cuts `physical` for `workers` and lets datafusion-distributed's
    /// planner number the stages and split each scan's files between the
    /// tasks; `None` if no stage is left to send.
    async fn place(
        &self,
        physical: Arc<dyn ExecutionPlan>,
        logical: &LogicalPlan,
        state: &SessionState,
        workers: &[Url],
        headers: tonic::codegen::http::HeaderMap,
    ) -> Result<Option<(Arc<dyn ExecutionPlan>, SessionState)>> {
        let Some(cut) = cut::place_stages(physical, workers.len(), &self.functions)? else {
            return Ok(None);
        };
        let state = SessionStateBuilder::new_from_existing(state.clone())
            .with_query_planner(Arc::new(AlreadyPlanned(cut)))
            .with_distributed_planner()
            .with_distributed_worker_resolver(Routing(workers.to_vec()))
            .with_distributed_route_tasks_handler(RoundRobin(workers.to_vec()))
            .with_distributed_scale_up_leaf_node_handler(scan_of_no_file)
            .with_distributed_channel_resolver(self.channels.clone())
            .with_distributed_passthrough_headers(headers)?
            .build();
        let plan = state
            .query_planner()
            .create_physical_plan(logical, &state)
            .await?;
        // It drops a boundary whose stage has one task (one worker): that
        // stage would run here anyway.
        if !plan.exists(|node| Ok(node.is_network_boundary()))? {
            return Ok(None);
        }
        Ok(Some((plan, state)))
    }

    /// After a failed query: the workers that do not answer now (they are
    /// left out of new queries until they do).
    pub async fn unreachable_now(&self) -> Vec<Url> {
        self.workers.probe().await
    }
}

/// The coordinator's certificate must carry the coordinator role, or every
/// worker would refuse it: said at start, not at the first query.
fn check_coordinator_role(cert: &std::path::Path) -> Result<(), ClusterError> {
    let role = |reason: String| ClusterError::Role {
        file: cert.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(cert).map_err(|e| ClusterError::Tls {
        file: cert.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| role(format!("not a PEM certificate: {e}")))?;
    let principal =
        crate::identity::principal_from_der(&parsed.contents).map_err(|e| role(e.to_string()))?;
    if principal
        .san_uris
        .iter()
        .any(|u| u == crate::pki::Role::Coordinator.uri())
    {
        Ok(())
    } else {
        Err(role(format!(
            "this certificate has no coordinator role ({}), so workers would refuse it: issue one with `sluice certs coordinator`",
            crate::pki::Role::Coordinator.uri()
        )))
    }
}

/// Task `i` of every stage runs on `workers[i]` (modulo their number),
/// so that what a task did can be told of its worker
/// ([`report::WorkerMetrics`]).
struct RoundRobin(Vec<Url>);

impl RouteTasksHandler for RoundRobin {
    fn handle(&self, ev: RouteTasksEvent) -> Option<Result<RouteTasksEventResponse>> {
        if self.0.is_empty() {
            return None;
        }
        let urls = (0..ev.task_count)
            .map(|i| self.0[i % self.0.len()].clone())
            .collect();
        Some(Ok(RouteTasksEventResponse::new(urls)))
    }
}

/// A scan that found no file (`catalog/file_table.rs` plans it as a scan
/// of empty partitions, so that it has the shape of any other) runs as
/// every task's share of nothing: datafusion-distributed would split its
/// partitions between the tasks, and cannot when there are fewer than
/// tasks.
fn scan_of_no_file(ev: ScaleUpLeafNodeEvent) -> Option<Result<ScaleUpLeafNodeEventResponse>> {
    let scan = ev.plan.downcast_ref::<DataSourceExec>()?;
    let files = scan.data_source().downcast_ref::<FileScanConfig>()?;
    if files.file_groups.iter().any(|group| !group.is_empty()) {
        return None;
    }
    let tasks = (0..ev.task_count.max(1)).map(|_| Arc::clone(ev.plan));
    Some(
        DistributedLeafExec::try_new(Arc::clone(ev.plan), tasks)
            .map(|leaf| ScaleUpLeafNodeEventResponse::new(Arc::new(leaf))),
    )
}

/// Hands datafusion-distributed's planner the plan already built (and cut):
/// its own stage planning is replaced by [`cut`].
#[derive(Debug)]
struct AlreadyPlanned(Arc<dyn ExecutionPlan>);

#[async_trait]
impl QueryPlanner for AlreadyPlanned {
    async fn create_physical_plan(
        &self,
        _: &LogicalPlan,
        _: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        Ok(Arc::clone(&self.0))
    }
}
