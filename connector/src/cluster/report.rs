//! What a distributed plan looks like and what each worker did: the stages
//! for `EXPLAIN POLICY`, and per-worker rows, bytes and CPU time as events
//! in the query's span once it has run.
//!
//! Both read a plan's network boundaries and their input stages; neither
//! changes the plan.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::memory::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion_distributed::{
    DISTRIBUTED_DATAFUSION_TASK_ID_LABEL, DistributedLeafExec, DistributedMetricsFormat,
    NetworkBoundaryExt, NetworkCoalesceExec, NetworkShuffleExec, Stage,
    rewrite_distributed_plan_with_metrics,
};
use url::Url;

use super::channels::Workers;
use super::cut::{exact_ref, exactly, is_hash_shuffle};
use crate::catalog::SourceExec;

/// How long a finished query waits for its workers' metrics: they are sent
/// when the coordinator closes each task's channel, at the end of the query.
const METRICS_WAIT: Duration = Duration::from_secs(5);

/// The stages of `plan` as [`super::cut`] placed them, for a consumer:
/// each stage's operators (DataFusion's names, with an aggregation's mode),
/// where it runs, and how its output reaches the stage that reads it.
/// Nothing else: no expressions (the `plan` column of `EXPLAIN POLICY` has
/// those, with hidden columns hidden), no files, no worker addresses (the
/// provider's own), and none of the operators that only move rows between
/// partitions or compute columns (`is_plumbing`).
///
/// Stages are numbered here, in the order they are read; datafusion-
/// distributed numbers them its own way when the query runs.
pub fn describe_stages(plan: &Arc<dyn ExecutionPlan>) -> String {
    let mut text = String::from("stage 0, on this connector:\n");
    let mut numbered = 0;
    let mut below = Vec::new();
    describe_operators(plan, 1, &mut text, &mut numbered, &mut below);
    let mut next = 0;
    while let Some((number, node)) = below.get(next).cloned() {
        next += 1;
        let Some(boundary) = node.as_network_boundary() else {
            continue;
        };
        let stage = boundary.input_stage();
        let _ = writeln!(
            text,
            "stage {number}, on the workers ({} tasks, one per worker), {}:",
            stage.task_count(),
            delivery(&node)
        );
        if let Some(stage_plan) = stage.local_plan() {
            describe_operators(stage_plan, 1, &mut text, &mut numbered, &mut below);
        }
    }
    text.truncate(text.trim_end().len());
    text
}

/// How a stage's output reaches the stage that reads it.
fn delivery(boundary: &Arc<dyn ExecutionPlan>) -> &'static str {
    if boundary.is::<NetworkShuffleExec>() {
        "its rows shuffled by hash to the stage that reads it"
    } else if boundary.is::<NetworkCoalesceExec>() {
        "its partitions gathered by the stage that reads it"
    } else {
        "its output sent to every task of the stage that reads it"
    }
}

/// One line per operator, indented by depth, down to the network
/// boundaries (numbered from `numbered`, and collected in `below`).
fn describe_operators(
    node: &Arc<dyn ExecutionPlan>,
    depth: usize,
    text: &mut String,
    numbered: &mut usize,
    below: &mut Vec<(usize, Arc<dyn ExecutionPlan>)>,
) {
    if is_plumbing(node) {
        for child in node.children() {
            describe_operators(child, depth, text, numbered, below);
        }
        return;
    }
    let indent = "  ".repeat(depth);
    if node.is_network_boundary() {
        *numbered += 1;
        let _ = writeln!(text, "{indent}{} (reads stage {numbered})", node.name());
        below.push((*numbered, Arc::clone(node)));
        return;
    }
    let _ = writeln!(text, "{indent}{}", operator(node));
    for child in node.children() {
        describe_operators(child, depth + 1, text, numbered, below);
    }
}

/// Operators left out of the description: those that only move rows
/// between a stage's partitions (how many partitions there are follows
/// the coordinator's cores), projections (the `plan` column shows what
/// they compute) and the wrapper that names a dataset in errors.
fn is_plumbing(node: &Arc<dyn ExecutionPlan>) -> bool {
    (exactly::<RepartitionExec>(node) && !is_hash_shuffle(node))
        || exactly::<CoalescePartitionsExec>(node)
        || exactly::<SortPreservingMergeExec>(node)
        || exactly::<ProjectionExec>(node)
        || exactly::<SourceExec>(node)
}

/// An operator as a consumer reads it in `EXPLAIN POLICY`.
fn operator(node: &Arc<dyn ExecutionPlan>) -> String {
    if let Some(aggregate) = exact_ref::<AggregateExec>(node) {
        return format!("AggregateExec ({:?})", aggregate.mode());
    }
    if exactly::<RepartitionExec>(node) {
        return "RepartitionExec (hash)".into();
    }
    if exactly::<DataSourceExec>(node) || exactly::<DistributedLeafExec>(node) {
        return "DataSourceExec (a scan)".into();
    }
    node.name().to_string()
}

/// What one worker did for one stage of a query.
#[derive(Debug, Default, Clone, PartialEq)]
struct TaskReport {
    /// Rows the stage sent to the coordinator.
    rows: usize,
    /// Their size in memory (Arrow buffers), before they were encoded.
    bytes: usize,
    /// Rows the stage's scans produced.
    rows_read: usize,
    /// CPU time of the stage's operators, all partitions together.
    cpu: Duration,
}

/// A distributed query that has run, whose workers' metrics are still to
/// be logged ([`WorkerMetrics::log`]).
pub struct WorkerMetrics {
    plan: Arc<dyn ExecutionPlan>,
    /// The workers of the query: `workers[i]` ran every stage's task `i`
    /// ([`super::Cluster`]'s routing).
    workers: Vec<Url>,
    names: Arc<Workers>,
}

impl WorkerMetrics {
    pub fn new(plan: Arc<dyn ExecutionPlan>, workers: Vec<Url>, names: Arc<Workers>) -> Self {
        Self {
            plan,
            workers,
            names,
        }
    }

    /// Waits (at most `METRICS_WAIT`, 5 s) for the workers' metrics and logs,
    /// as events in the current span, what each worker did for each stage.
    /// The log is the provider's: exact counts of the data are in it, as in
    /// DataFusion's own metrics.
    pub async fn log(self) {
        let with_metrics = tokio::time::timeout(
            METRICS_WAIT,
            rewrite_distributed_plan_with_metrics(self.plan, DistributedMetricsFormat::PerTask),
        )
        .await;
        let plan = match with_metrics {
            Ok(Ok(plan)) => plan,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the workers' metrics could not be read");
                return;
            }
            Err(_) => {
                tracing::debug!("the workers' metrics did not arrive within {METRICS_WAIT:?}");
                return;
            }
        };
        for (stage, tasks) in task_reports(&plan) {
            for (task, report) in tasks {
                let Some(url) = self.workers.get(task % self.workers.len().max(1)) else {
                    continue;
                };
                tracing::info!(
                    stage,
                    task,
                    worker = %self.names.name(url),
                    rows = report.rows,
                    bytes = report.bytes,
                    rows_read = report.rows_read,
                    cpu_ms = report.cpu.as_secs_f64() * 1e3,
                    "worker stage finished"
                );
            }
        }
    }
}

/// Stage number → task number → what that task did, from a plan rewritten
/// with per-task metrics.
fn task_reports(plan: &Arc<dyn ExecutionPlan>) -> BTreeMap<usize, BTreeMap<usize, TaskReport>> {
    let mut stages = BTreeMap::new();
    let _ = plan.apply(|node| {
        if let Some(boundary) = node.as_network_boundary()
            && let Stage::Local(stage) = boundary.input_stage()
        {
            stages.insert(stage.num, stage_reports(&stage.plan));
        }
        Ok(TreeNodeRecursion::Continue)
    });
    stages
}

fn stage_reports(root: &Arc<dyn ExecutionPlan>) -> BTreeMap<usize, TaskReport> {
    let mut tasks: BTreeMap<usize, TaskReport> = BTreeMap::new();
    let mut at_root = true;
    let _ = root.apply(|node| {
        let metrics = node.metrics().unwrap_or_default();
        let leaf = node.children().is_empty();
        for (task, name, value) in per_task(&metrics) {
            let report = tasks.entry(task).or_default();
            match name {
                "output_rows" => {
                    if at_root {
                        report.rows += value;
                    }
                    if leaf {
                        report.rows_read += value;
                    }
                }
                "output_bytes" if at_root => report.bytes += value,
                "elapsed_compute" => report.cpu += Duration::from_nanos(value as u64),
                _ => {}
            }
        }
        at_root = false;
        // A nested boundary's stage is reported as its own stage.
        Ok(if node.is_network_boundary() {
            TreeNodeRecursion::Jump
        } else {
            TreeNodeRecursion::Continue
        })
    });
    tasks
}

/// Each metric with the task it was measured in.
fn per_task(metrics: &MetricsSet) -> Vec<(usize, &str, usize)> {
    metrics
        .iter()
        .filter_map(|metric| {
            let task = metric
                .labels()
                .iter()
                .find(|l| l.name() == DISTRIBUTED_DATAFUSION_TASK_ID_LABEL)?
                .value()
                .parse()
                .ok()?;
            Some((task, metric.value().name(), metric.value().as_usize()))
        })
        .collect()
}
