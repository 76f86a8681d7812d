//! Distributed execution (step 6, execution, on several machines): the
//! coordinator's side of datafusion-distributed, and the worker.
//!
//! Identity, planning, the policy decision and rewrite, quotas, the DP
//! statistics plan, noise, the ledger and the audit log stay on the
//! coordinator. After physical planning, [`Cluster::distribute`] moves the
//! plan's leaf stages (scans, filters, projections, partial aggregations:
//! [`cut`]) to the workers, which stream partial results back; the rest of
//! the plan runs here as on a single node.

pub mod channels;
pub mod cut;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNode;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::{DistributedExt, NetworkBoundaryExt, SessionStateBuilderExt};
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
}

/// The coordinator's view of its workers.
pub struct Cluster {
    workers: Arc<Workers>,
    channels: Channels,
    functions: cut::Functions,
}

/// A plan whose leaf stages run on workers, and the session (with the
/// routing and channels) to execute it with.
pub struct Distributed {
    pub plan: Arc<dyn ExecutionPlan>,
    pub state: SessionState,
    pub workers: Vec<Url>,
}

impl Cluster {
    /// `None` when no worker is configured: every query runs here.
    pub fn new(config: &ClusterConfig, state: &StateDir) -> Result<Option<Self>, ClusterError> {
        if config.workers.is_empty() {
            return Ok(None);
        }
        let channels = match &config.tls {
            Some(tls) => Channels::new(&tls.cert, &tls.key, &tls.worker_ca)?,
            None => {
                let (cert, key) = state.pair("coordinator");
                Channels::new(&cert, &key, &state.ca_cert())?
            }
        };
        let worker_state = worker::worker_session(SessionStateBuilder::new()).build();
        Ok(Some(Self {
            workers: Arc::new(Workers::new(config.workers.clone())),
            channels,
            functions: cut::Functions::of(&worker_state),
        }))
    }

    pub fn workers(&self) -> &Arc<Workers> {
        &self.workers
    }

    /// Probes the workers every [`channels::PROBE_INTERVAL`] until
    /// `stopped`.
    pub fn spawn_probes(&self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let workers = Arc::clone(&self.workers);
        tokio::spawn(async move {
            loop {
                workers.probe().await;
                tokio::select! {
                    _ = tokio::time::sleep(channels::PROBE_INTERVAL) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// `physical` with its leaf stages on the live workers, or `None` to
    /// run it here (no stage can move, or no worker answers).
    pub async fn distribute(
        &self,
        physical: Arc<dyn ExecutionPlan>,
        logical: &LogicalPlan,
        state: &SessionState,
    ) -> Result<Option<Distributed>> {
        let live = self.workers.live();
        if live.is_empty() {
            tracing::warn!("no worker answers: the query runs on the coordinator");
            return Ok(None);
        }
        let Some(cut) = cut::place_stages(physical, live.len(), &self.functions)? else {
            return Ok(None);
        };
        let state = SessionStateBuilder::new_from_existing(state.clone())
            .with_query_planner(Arc::new(AlreadyPlanned(cut)))
            .with_distributed_planner()
            .with_distributed_worker_resolver(Routing(live.clone()))
            .with_distributed_channel_resolver(self.channels.clone())
            .build();
        // datafusion-distributed's planner takes the stages as cut, numbers
        // them and splits each scan's files between its tasks.
        let plan = state
            .query_planner()
            .create_physical_plan(logical, &state)
            .await?;
        // It drops a boundary whose stage has one task (one worker): that
        // stage would run here anyway.
        if !plan.exists(|node| Ok(node.is_network_boundary()))? {
            return Ok(None);
        }
        Ok(Some(Distributed {
            plan,
            state,
            workers: live,
        }))
    }

    /// After a failed query: the workers that do not answer now (they are
    /// left out of new queries until they do).
    pub async fn unreachable_now(&self) -> Vec<Url> {
        self.workers.probe().await
    }
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
