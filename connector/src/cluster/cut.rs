//! Where a physical plan is cut between the workers and the coordinator.
//!
//! Workers run *leaf stages* only: a chain of per-partition operators over
//! one scan of local files, ending at a hash shuffle or at the point where
//! all partitions are gathered. Everything above the cut (final
//! aggregations, joins, sorts, limits, the DP statistics plan's per-unit
//! bounding, masks) stays on the coordinator.
//!
//! Why this is the same answer as a single node: every operator allowed in
//! a worker stage ([`Stage::allows`]) works on each partition by itself (a
//! filter, a projection, a *partial* aggregation, a repartition). Splitting
//! a scan's files between tasks changes which task reads a row, never
//! whether a row is read once, and the boundary above gathers every task's
//! partitions (a hash shuffle sends each key to one coordinator partition;
//! a coalesce gathers them all). So the coordinator's operators see the
//! same rows, in other partitions, as they would on one node; per-unit
//! contribution bounding, which runs there, bounds each unit over the
//! whole dataset.
//!
//! Why a worker can run what it is sent: a stage is cut only if
//! datafusion-proto can encode every node of it and every function in it
//! is one the worker's own session has, identical (`Functions`); Sluice's
//! keyed or parameterised functions (masks, the per-unit DP aggregates)
//! are neither, so they never leave the coordinator, and neither does the
//! masking key.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::memory::DataSourceExec;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::error::Result;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF};
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    ReplaceChildrenOptions,
};
use datafusion_distributed::{NetworkCoalesceExec, NetworkShuffleExec};

use crate::catalog::SourceExec;

/// The functions a worker resolves by name, as its session has them.
#[derive(Debug)]
pub struct Functions {
    scalar: HashMap<String, Arc<ScalarUDF>>,
    aggregate: HashMap<String, Arc<AggregateUDF>>,
}

impl Functions {
    /// What a worker built from `worker_state` knows.
    pub fn of(worker_state: &SessionState) -> Self {
        Self {
            scalar: worker_state.scalar_functions().clone(),
            aggregate: worker_state.aggregate_functions().clone(),
        }
    }

    /// The functions' names, hashed: part of the build a worker reports.
    pub fn fingerprint(&self) -> String {
        let mut names: Vec<&str> = self
            .scalar
            .keys()
            .chain(self.aggregate.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        let digest = ring::digest::digest(&ring::digest::SHA256, names.join(",").as_bytes());
        hex::encode(&digest.as_ref()[..8])
    }

    fn knows_scalar(&self, f: &ScalarUDF) -> bool {
        self.scalar.get(f.name()).is_some_and(|w| **w == *f)
    }

    fn knows_aggregate(&self, f: &AggregateUDF) -> bool {
        self.aggregate.get(f.name()).is_some_and(|w| **w == *f)
    }
}

/// `plan` with its leaf stages moved to `tasks` worker tasks each, or
/// `None` when no part of it can run on a worker.
pub fn place_stages(
    plan: Arc<dyn ExecutionPlan>,
    tasks: usize,
    functions: &Functions,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let stage = Stage { functions };
    // A plan that is one leaf stage with several partitions (a filtered
    // scan) is gathered from the workers; DataFusion would gather its
    // partitions on the coordinator anyway.
    let plan = if plan.output_partitioning().partition_count() > 1 && stage.runs_on_worker(&plan) {
        Arc::new(CoalescePartitionsExec::new(plan)) as Arc<dyn ExecutionPlan>
    } else {
        plan
    };
    let placed = cut(plan, tasks, &stage)?;
    if !placed.transformed {
        return Ok(None);
    }
    // The coordinator's part runs as one task (datafusion-distributed's
    // `DistributedExec` has one output partition): gathered as DataFusion
    // would gather the partitions of any result.
    let plan = placed.data;
    if plan.output_partitioning().partition_count() > 1 {
        return Ok(Some(Arc::new(CoalescePartitionsExec::new(plan))));
    }
    Ok(Some(plan))
}

fn cut(
    node: Arc<dyn ExecutionPlan>,
    tasks: usize,
    stage: &Stage,
) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    if is_hash_shuffle(&node) && stage.runs_on_worker(&node) {
        let remote = NetworkShuffleExec::try_new(without_source_wrappers(node)?, tasks)?;
        return Ok(Transformed::yes(Arc::new(remote)));
    }
    if exactly::<CoalescePartitionsExec>(&node) {
        let child = Arc::clone(node.children()[0]);
        // A stage ending in a repartition that is not a hash shuffle would
        // lose it (datafusion-distributed replaces a stage's top
        // repartition by its own): such a stage stays here.
        if stage.runs_on_worker(&child) && !exactly::<RepartitionExec>(&child) {
            let remote = NetworkCoalesceExec::try_new(without_source_wrappers(child)?, tasks, 1)?;
            let gathered = node.replace_children(
                vec![Arc::new(remote)],
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
            )?;
            return Ok(Transformed::yes(gathered));
        }
    }
    let children: Vec<Arc<dyn ExecutionPlan>> = node.children().into_iter().cloned().collect();
    let mut changed = false;
    let mut placed = Vec::with_capacity(children.len());
    for child in children {
        let t = cut(child, tasks, stage)?;
        changed |= t.transformed;
        placed.push(t.data);
    }
    if !changed {
        return Ok(Transformed::no(node));
    }
    let node = node.replace_children(
        placed,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )?;
    Ok(Transformed::yes(node))
}

/// The test for "this subtree may run as a worker stage".
struct Stage<'a> {
    functions: &'a Functions,
}

impl Stage<'_> {
    /// A chain of allowed operators down to one scan of local files, all
    /// of it encodable and with functions the worker has.
    fn runs_on_worker(&self, top: &Arc<dyn ExecutionPlan>) -> bool {
        let mut node = top;
        loop {
            if !self.allows(node) {
                return false;
            }
            match node.children().as_slice() {
                [] => break,
                [child] => node = child,
                _ => return false,
            }
        }
        is_local_file_scan(node) && encodable(top)
    }

    /// Operators that work on each partition by itself (see the module
    /// documentation), with functions the worker has.
    fn allows(&self, node: &Arc<dyn ExecutionPlan>) -> bool {
        let operator = if let Some(agg) = exact_ref::<AggregateExec>(node) {
            *agg.mode() == AggregateMode::Partial
                && agg
                    .aggr_expr()
                    .iter()
                    .all(|a| self.functions.knows_aggregate(a.fun()))
        } else {
            exactly::<FilterExec>(node)
                || exactly::<ProjectionExec>(node)
                || exactly::<RepartitionExec>(node)
                || exactly::<SourceExec>(node)
                || exactly::<DataSourceExec>(node)
        };
        operator && self.scalar_functions_known(node)
    }

    fn scalar_functions_known(&self, node: &Arc<dyn ExecutionPlan>) -> bool {
        let mut known = true;
        let walked = node.apply_expressions(&mut |root| {
            root.apply(|e| {
                if let Some(call) = e.downcast_ref::<ScalarFunctionExpr>()
                    && !self.functions.knows_scalar(call.fun())
                {
                    known = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
        known && walked.is_ok()
    }
}

pub(super) fn is_hash_shuffle(node: &Arc<dyn ExecutionPlan>) -> bool {
    exact_ref::<RepartitionExec>(node)
        .is_some_and(|r| matches!(r.partitioning(), Partitioning::Hash(..)))
}

/// A scan of files on the local file system (a path every worker sees).
/// Object stores and databases are read by the coordinator. (A scan that
/// found no file is a scan of no file here, not an `EmptyExec`:
/// `catalog/file_table.rs`.)
fn is_local_file_scan(node: &Arc<dyn ExecutionPlan>) -> bool {
    exact_ref::<DataSourceExec>(node)
        .and_then(|scan| scan.data_source().downcast_ref::<FileScanConfig>())
        .is_some_and(|files| files.object_store_url.as_str().starts_with("file://"))
}

/// datafusion-proto can write it (a custom node or expression cannot).
fn encodable(stage: &Arc<dyn ExecutionPlan>) -> bool {
    without_source_wrappers(Arc::clone(stage))
        .and_then(datafusion_proto::bytes::physical_plan_to_bytes)
        .is_ok()
}

/// The stage without [`SourceExec`], which only names the dataset in the
/// coordinator's errors: a worker's failures reach the client as a kind,
/// never with a path.
fn without_source_wrappers(stage: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    stage
        .transform_up(|node| {
            if exactly::<SourceExec>(&node) {
                Ok(Transformed::yes(Arc::clone(node.children()[0])))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|t| t.data)
}

/// The node's own type, not a type it delegates downcasts to.
pub(super) fn exactly<T: ExecutionPlan>(node: &Arc<dyn ExecutionPlan>) -> bool {
    exact_ref::<T>(node).is_some()
}

pub(super) fn exact_ref<T: ExecutionPlan>(node: &Arc<dyn ExecutionPlan>) -> Option<&T> {
    (node.as_ref() as &dyn Any).downcast_ref::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::DataType;
    use datafusion::logical_expr::{
        ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
    };
    use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
    use datafusion_distributed::NetworkBoundaryExt;

    async fn planned(sql: &str, ctx: &SessionContext) -> Arc<dyn ExecutionPlan> {
        ctx.sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap()
    }

    async fn context(dir: &std::path::Path) -> SessionContext {
        let csv: String = std::iter::once("unit,city,score\n".to_string())
            .chain((0..600).map(|i| format!("{},{},{}\n", i % 50, ["a", "b", "c"][i % 3], i)))
            .collect();
        std::fs::write(dir.join("t.csv"), csv).unwrap();
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
        ctx.register_csv(
            "t",
            dir.join("t.csv").to_str().unwrap(),
            CsvReadOptions::new(),
        )
        .await
        .unwrap();
        ctx
    }

    fn functions() -> Functions {
        Functions::of(&super::super::worker::worker_session(SessionStateBuilder::new()).build())
    }

    /// Every worker stage: one scan, per-partition operators only.
    fn worker_stages(plan: &Arc<dyn ExecutionPlan>) -> Vec<Arc<dyn ExecutionPlan>> {
        let mut stages = Vec::new();
        plan.apply(|node| {
            if node.is_network_boundary() {
                stages.push(Arc::clone(node.children()[0]));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        stages
    }

    use datafusion::execution::SessionStateBuilder;

    /// The description `EXPLAIN POLICY` shows: each input of a shuffled
    /// join is a stage of its own, numbered in the order it is read; no
    /// path, no partition plumbing, no projection.
    #[tokio::test]
    async fn the_stages_are_described_without_files_or_plumbing() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        ctx.sql("SET datafusion.optimizer.hash_join_single_partition_threshold = 0")
            .await
            .unwrap();
        ctx.sql("SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0")
            .await
            .unwrap();
        let plan = planned(
            "SELECT a.city, count(*) FROM t a JOIN t b ON a.unit = b.unit GROUP BY a.city",
            &ctx,
        )
        .await;
        let cut = place_stages(plan, 3, &functions())
            .unwrap()
            .expect("stages move");
        let text = super::super::report::describe_stages(&cut);
        assert!(text.starts_with("stage 0, on this connector:\n"), "{text}");
        for stage in [1, 2] {
            assert!(text.contains(&format!("(reads stage {stage})")), "{text}");
            assert!(
                text.contains(&format!(
                    "stage {stage}, on the workers (3 tasks, one per worker), its rows shuffled by hash"
                )),
                "{text}"
            );
        }
        assert!(text.contains("HashJoinExec"), "{text}");
        for hidden in [
            "t.csv",
            "/",
            "ProjectionExec",
            "CoalescePartitionsExec",
            "round robin",
        ] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
    }

    #[tokio::test]
    async fn a_group_by_sends_only_the_partial_aggregation() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        let plan = planned(
            "SELECT city, count(*), sum(score) FROM t WHERE score > 10 GROUP BY city",
            &ctx,
        )
        .await;
        let cut = place_stages(plan, 3, &functions())
            .unwrap()
            .expect("a stage moves");
        let stages = worker_stages(&cut);
        assert_eq!(stages.len(), 1);
        let mut kinds = Vec::new();
        stages[0]
            .apply(|n| {
                kinds.push(n.name().to_string());
                if let Some(agg) = exact_ref::<AggregateExec>(n) {
                    assert_eq!(*agg.mode(), AggregateMode::Partial);
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
        assert!(kinds.contains(&"AggregateExec".to_string()), "{kinds:?}");
        assert!(kinds.contains(&"DataSourceExec".to_string()), "{kinds:?}");
        // The final aggregation stays here.
        let mut final_here = false;
        cut.apply(|n| {
            if n.is_network_boundary() {
                return Ok(TreeNodeRecursion::Jump);
            }
            if let Some(agg) = exact_ref::<AggregateExec>(n) {
                final_here |= *agg.mode() != AggregateMode::Partial;
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        assert!(final_here);
    }

    /// A function the worker does not have, identical, never leaves.
    #[derive(Debug, PartialEq, Eq, Hash)]
    struct Keyed {
        signature: Signature,
    }

    impl ScalarUDFImpl for Keyed {
        fn name(&self) -> &str {
            "keyed"
        }
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
            Ok(DataType::Int64)
        }
        fn invoke_with_args(
            &self,
            args: ScalarFunctionArgs,
        ) -> datafusion::error::Result<ColumnarValue> {
            Ok(args.args[0].clone())
        }
    }

    #[tokio::test]
    async fn stages_with_functions_the_worker_lacks_stay_here() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        ctx.register_udf(ScalarUDF::new_from_impl(Keyed {
            signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
        }));
        let plan = planned(
            "SELECT keyed(score) AS k, count(*) FROM t GROUP BY keyed(score)",
            &ctx,
        )
        .await;
        let cut = place_stages(plan, 3, &functions()).unwrap();
        if let Some(cut) = cut {
            for stage in worker_stages(&cut) {
                stage
                    .apply(|n| {
                        assert!(
                            Stage {
                                functions: &functions()
                            }
                            .scalar_functions_known(n),
                            "{}",
                            n.name()
                        );
                        Ok(TreeNodeRecursion::Continue)
                    })
                    .unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_plan_without_a_local_file_scan_stays_here() {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
        let plan = planned(
            "SELECT x, count(*) FROM (VALUES (1), (2), (2)) AS v(x) GROUP BY x",
            &ctx,
        )
        .await;
        assert!(place_stages(plan, 3, &functions()).unwrap().is_none());
    }
}
