//! Step 6: running an approved plan under the query's limits.
//!
//! Execution happens on a dedicated runtime, apart from the one serving
//! gRPC, so a heavy scan cannot starve handshakes, health checks or other
//! clients' small queries. Each query gets its own memory pool (sorts and
//! aggregations spill to disk beyond it, within `limits.spill_space`), a deadline covering the whole stream, and a bounded channel to
//! the client: a slow reader slows the scan instead of buffering the result.
//!
//! Optimisation (which folds constant expressions) and physical planning
//! happen here too, under the same limits: the query's own session state
//! carries a [`QueryGuard`] that every function call sees, so a constant
//! that would be too large, or take too long, is refused while it is
//! folded, and the optimizer runs without holding a runtime worker
//! ([`guard::blocking`]). A panic anywhere in the query ends the query with
//! an error instead of a silently truncated stream.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::execute_stream;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::QueryError;
use super::slots::Slot;
use crate::catalog::file_table::ScanShapes;
use crate::catalog::{self, Catalog, DataReads, ProcessMemory};
use crate::cluster::Cluster;
use crate::cluster::report::WorkerMetrics;
use crate::cluster::worker::StageLimits;
use crate::guard::deadline::{is_deadline, with_deadline};
use crate::guard::{self, QueryGuard};

/// Batches in flight between execution and the client stream.
const CHANNEL_DEPTH: usize = 2;

/// Spawns query executions on the query runtime.
#[derive(Clone)]
pub struct Executor {
    runtime: tokio::runtime::Handle,
    /// The memory all executions share (`limits.total_query_memory`).
    memory: ProcessMemory,
    /// The workers leaf stages run on (`[cluster]`), if any.
    cluster: Option<Arc<Cluster>>,
}

/// Limits one execution runs under.
#[derive(Debug, Clone, Copy)]
pub struct ExecutionLimits {
    pub memory: usize,
    pub deadline: Instant,
    /// The configured timeout, for the error message.
    pub timeout: Duration,
}

impl Executor {
    pub fn new(
        runtime: tokio::runtime::Handle,
        total_memory: usize,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            runtime,
            memory: ProcessMemory::new(total_memory),
            cluster,
        }
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// What [`Executor::start`] would do before reading data, done now:
    /// the DP path calls it before it reserves any budget, so that a query
    /// that fails whatever the data fails before anything is charged.
    pub fn check_before_data(
        &self,
        catalog: &Catalog,
        plan: &LogicalPlan,
        limits: ExecutionLimits,
    ) -> Result<(), QueryError> {
        prepare(catalog, plan, limits, &self.memory).map(|_| ())
    }

    /// Runs other CPU-bound work (planning) on the query runtime.
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(work)
    }

    /// Starts executing `plan`; batches (or the error that ended the query)
    /// arrive on the returned channel. Dropping the receiver cancels the
    /// query. The execution slot (if any) is held until execution ends.
    pub fn start(
        &self,
        catalog: Arc<Catalog>,
        plan: LogicalPlan,
        limits: ExecutionLimits,
        slot: Option<Slot>,
        reads: Arc<DataReads>,
    ) -> mpsc::Receiver<Result<RecordBatch, QueryError>> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let memory = self.memory.clone();
        let cluster = self.cluster.clone();
        // The query's span (flight/stream.rs) follows it onto the query
        // runtime: what workers report is logged in it.
        let span = tracing::Span::current();
        let execution = async move {
            let run = tokio::time::timeout_at(
                limits.deadline,
                produce(
                    &catalog,
                    plan,
                    limits,
                    &memory,
                    &reads,
                    cluster.as_deref(),
                    &tx,
                ),
            );
            let (failure, workers) = match run.await {
                Ok(Ok(workers)) => (None, workers),
                Ok(Err(e)) => (Some(e), None),
                Err(_) => (Some(timeout_error(limits.timeout)), None),
            };
            if let Some(metrics) = workers {
                // The answer is complete: the client's stream ends now.
                // What the workers did arrives as their channels close;
                // the plan, and the slot, are kept until it is logged.
                drop(tx);
                metrics.log().await;
                return;
            }
            // Execution is over and its plan dropped: the slot goes back
            // now. A client that stopped reading has a full channel, and
            // the error below waits for it (a result must never end
            // without its error, or it would read as complete), holding
            // only this task and the error until the client reads or goes.
            drop(slot);
            if let Some(e) = failure {
                let _ = tx.send(Err(e)).await;
            }
        };
        self.runtime.spawn(execution.instrument(span));
        rx
    }

    /// The stages `plan` would run in, for `EXPLAIN POLICY`, planned as
    /// [`Executor::start`] plans it (the same guards and limits) but not
    /// run. `None` without workers: the whole plan runs here. `slot` is
    /// held until planning ends, even past the deadline (planning cannot
    /// be interrupted), as an execution holds its slot.
    pub async fn stages(
        &self,
        catalog: Arc<Catalog>,
        plan: LogicalPlan,
        limits: ExecutionLimits,
        slot: Slot,
    ) -> Result<Option<String>, QueryError> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(None);
        };
        let memory = self.memory.clone();
        let planning = async move {
            let _slot = slot;
            // Nothing is read: what scans note goes nowhere.
            let reads = DataReads::new();
            let (physical, _) = plan_physical(
                &catalog,
                &plan,
                limits,
                &memory,
                &reads,
                Planning::DataIndependent(ScanShapes::WithoutListing),
            )
            .await?;
            let staged = cluster
                .stages(physical)
                .map_err(|e| execution_error(&e, limits))?;
            Ok(Some(match staged {
                Some(plan) => crate::cluster::report::describe_stages(&plan),
                None => NOT_DISTRIBUTED.to_string(),
            }))
        };
        // As in `produce`: a panic is the connector's, and its message is
        // for the provider's log.
        let planning = std::panic::AssertUnwindSafe(planning)
            .catch_unwind()
            .map(|outcome| {
                outcome.unwrap_or_else(|_| {
                    tracing::error!("planning the stages of a query panicked");
                    Err(QueryError::Internal(
                        "planning the stages failed (see the connector log)".into(),
                    ))
                })
            });
        match tokio::time::timeout_at(limits.deadline, self.runtime.spawn(planning)).await {
            Ok(Ok(described)) => described,
            Ok(Err(_)) => Err(QueryError::Internal(
                "planning the stages failed (see the connector log)".into(),
            )),
            Err(_) => Err(timeout_error(limits.timeout)),
        }
    }
}

/// `EXPLAIN POLICY` for a plan with no stage a worker can run.
const NOT_DISTRIBUTED: &str = "stage 0, on this connector: the whole plan (no part of it can run on the workers: see docs/deploy.md)";

/// What physical planning may look at besides the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planning {
    /// What DataFusion knows of the files (statistics, sizes), as usual.
    Informed,
    /// The query and the deployment only: with workers, where the stages
    /// are an output ([`super::independent`]).
    DataIndependent(ScanShapes),
}

/// Optimisation and physical planning, as every execution starts: the
/// query's guarded session, then DataFusion's planner (off the runtime's
/// workers) and the one DP-specific physical rewrite.
async fn plan_physical(
    catalog: &Catalog,
    plan: &LogicalPlan,
    limits: ExecutionLimits,
    memory: &ProcessMemory,
    reads: &Arc<DataReads>,
    planning: Planning,
) -> Result<(Arc<dyn ExecutionPlan>, Prepared), QueryError> {
    let failed = |e: DataFusionError| execution_error(&e, limits);
    let mut prepared = prepare(catalog, plan, limits, memory)?;
    // Scans note the data version they read in it while they are planned.
    prepared.state.config_mut().set_extension(reads.clone());
    if let Planning::DataIndependent(shapes) = planning {
        prepared.state = super::independent::data_independent(prepared.state, shapes);
    }
    // Physical planning is long synchronous work for a wide join (join
    // selection, distribution and sort rules walk the plan many times): it
    // must not hold a runtime worker that other tenants' queries need.
    let physical = guard::blocking_async(
        prepared
            .state
            .query_planner()
            .create_physical_plan(&prepared.optimized, &prepared.state),
    )
    .await
    .map_err(failed)?;
    // A DP plan's per-(unit, group) and per-unit aggregations share one
    // shuffle by unit (unit_shuffle.rs): the same answer, computed once.
    let physical = super::unit_shuffle::shuffle_once_by_unit(physical).map_err(failed)?;
    Ok((physical, prepared))
}

async fn produce(
    catalog: &Catalog,
    plan: LogicalPlan,
    limits: ExecutionLimits,
    memory: &ProcessMemory,
    reads: &Arc<DataReads>,
    cluster: Option<&Cluster>,
    tx: &mpsc::Sender<Result<RecordBatch, QueryError>>,
) -> Result<Option<WorkerMetrics>, QueryError> {
    // Guards and DataFusion turn the failures they foresee into errors;
    // this catches the rest (a panic in DataFusion is re-raised in the
    // task that polls its stream, this one), so that the client gets an
    // error rather than a stream that just ends early.
    match std::panic::AssertUnwindSafe(run(catalog, plan, limits, memory, reads, cluster, tx))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::error!("query execution panicked");
            Err(QueryError::Internal(
                "query execution failed (see the connector log)".into(),
            ))
        }
    }
}

async fn run(
    catalog: &Catalog,
    plan: LogicalPlan,
    limits: ExecutionLimits,
    memory: &ProcessMemory,
    reads: &Arc<DataReads>,
    cluster: Option<&Cluster>,
    tx: &mpsc::Sender<Result<RecordBatch, QueryError>>,
) -> Result<Option<WorkerMetrics>, QueryError> {
    let failed = |e: DataFusionError| execution_error(&e, limits);
    let (
        physical,
        Prepared {
            state,
            optimized,
            pool,
        },
    ) = plan_physical(
        catalog,
        &plan,
        limits,
        memory,
        reads,
        match cluster {
            Some(_) => Planning::DataIndependent(ScanShapes::Fixed),
            None => Planning::Informed,
        },
    )
    .await?;
    catalog.note_files(&physical, reads);
    // With workers: the leaf stages go to them (cluster/cut.rs); the rest,
    // and everything after execution, stays here.
    let (physical, state, workers) = match cluster {
        None => (physical, state, Vec::new()),
        Some(cluster) => {
            let limits = StageLimits {
                remaining: limits.deadline.saturating_duration_since(Instant::now()),
                memory: limits.memory,
                call_sites: guard::call_sites(&optimized),
            };
            match cluster
                .distribute(Arc::clone(&physical), &optimized, &state, limits)
                .await
            {
                Ok(Some(d)) => {
                    tracing::info!(
                        workers = d.workers.len(),
                        stages = d.stages(),
                        "leaf stages sent to workers"
                    );
                    // The provider's log only: plan text can hold the
                    // policy's literals, and worker addresses are the
                    // provider's own.
                    tracing::debug!(stages = %datafusion_distributed::display_plan_ascii(d.plan.as_ref(), false), "distributed plan");
                    (d.plan, d.state, d.workers)
                }
                Ok(None) => (physical, state, Vec::new()),
                // Nothing has run yet: the plan as built runs here.
                Err(e) => {
                    tracing::warn!(error = %e, "the plan could not be distributed: it runs on the coordinator");
                    (physical, state, Vec::new())
                }
            }
        }
    };
    // Workers apply the same rewrite to their stages (cluster/worker.rs).
    let physical = guard::total::total_expressions(physical).map_err(failed)?;
    let physical = with_deadline(physical, limits.deadline.into_std()).map_err(failed)?;
    let distributed = !workers.is_empty();
    let failed_here = |e: DataFusionError| async move {
        match cluster.filter(|_| distributed && !is_deadline(&e)) {
            Some(cluster) => worker_failure(cluster, &e)
                .await
                .unwrap_or_else(|| execution_error(&e, limits)),
            None => execution_error(&e, limits),
        }
    };
    // Kept to read what the workers report once the query is over.
    let executed = Arc::clone(&physical);
    let mut stream = match execute_stream(physical, Catalog::task_context_with(&state, pool)) {
        Ok(stream) => stream,
        Err(e) => return Err(failed_here(e).await),
    };
    while let Some(batch) = stream.next().await {
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => return Err(failed_here(e).await),
        };
        if batch.num_rows() == 0 {
            continue;
        }
        if tx.send(Ok(batch)).await.is_err() {
            // The client went away: dropping the stream cancels the plan.
            return Ok(None);
        }
    }
    drop(stream);
    Ok(cluster
        .filter(|_| distributed)
        .map(|cluster| WorkerMetrics::new(executed, workers, Arc::clone(cluster.workers()))))
}

/// An optimised plan with the session state and memory pool it runs with.
struct Prepared {
    state: datafusion::execution::SessionState,
    optimized: LogicalPlan,
    pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
}

/// Everything before execution reads data: the query's own guarded
/// session, optimisation (constant folding included), and the checks on
/// what folding left: constants too large to broadcast, patterns too
/// large to compile, constants that fail to evaluate.
fn prepare(
    catalog: &Catalog,
    plan: &LogicalPlan,
    limits: ExecutionLimits,
    memory: &ProcessMemory,
) -> Result<Prepared, QueryError> {
    let failed = |e: DataFusionError| execution_error(&e, limits);
    let spilling = catalog
        .session()
        .runtime_env()
        .disk_manager
        .tmp_files_enabled();
    let pool = catalog::query_pool(limits.memory, memory, spilling);
    let query_guard = Arc::new(QueryGuard::new(
        Some(limits.deadline.into_std()),
        limits.memory,
        Some(pool.clone()),
    ));
    let state = guard::for_query(catalog.session().state(), query_guard.clone());
    // Folding constants cannot be interrupted: the guards bound it, and it
    // runs without holding a runtime worker.
    let optimized = guard::blocking(|| state.optimize(plan)).map_err(failed)?;
    guard::check_constants(&optimized).map_err(|e| failed(e.into()))?;
    super::plan::check_patterns(&optimized)?;
    guard::blocking(|| super::constants::refuse_failing_constants(&optimized, &state))
        .map_err(failed)?;
    query_guard.share_memory(guard::call_sites(&optimized));
    Ok(Prepared {
        state,
        optimized,
        pool,
    })
}

/// A distributed query failed: if a worker does not answer any more, the
/// client learns which (and that new queries avoid it), not an internal
/// error. `None`: every worker answers, so the failure is the query's own.
async fn worker_failure(cluster: &Cluster, e: &DataFusionError) -> Option<QueryError> {
    let gone = cluster.unreachable_now().await;
    if gone.is_empty() {
        return None;
    }
    tracing::warn!(error = %e, workers = ?gone.iter().map(|u| u.as_str()).collect::<Vec<_>>(), "a worker failed during the query");
    // Named as configured, not by address: addresses are the provider's.
    let names: Vec<String> = gone.iter().map(|u| cluster.workers().name(u)).collect();
    Some(QueryError::Unavailable(format!(
        "worker {} stopped answering during the query, which was stopped; new queries run without it until it answers again: retry",
        names.join(", ")
    )))
}

/// The full error stays in the provider's log; the client gets its kind.
fn execution_error(e: &DataFusionError, limits: ExecutionLimits) -> QueryError {
    if is_deadline(e) {
        return timeout_error(limits.timeout);
    }
    tracing::warn!(error = %e, "query execution failed");
    QueryError::from_execution(e, limits.memory)
}

fn timeout_error(timeout: Duration) -> QueryError {
    QueryError::Timeout(format!(
        "the query ran longer than its limit of {} (limits.query_timeout)",
        human_duration(timeout)
    ))
}

pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}
