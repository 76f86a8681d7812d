//! Planning that looks at the query and the deployment only, not at the
//! data: how a connector with workers plans (step 6).
//!
//! DataFusion chooses parts of a physical plan from what it knows of the
//! data: the files' statistics (which join input to gather or build a hash
//! table from, an aggregate answered from row counts), the files' sizes (a
//! small file is read as one partition, and one partition needs no
//! shuffle) and whether a scan found any file at all (one that found none
//! is a one-partition `EmptyExec`). On a connector with workers the plan's
//! stages are an output (`EXPLAIN POLICY` shows them, and they decide what
//! runs where and how long it takes), so there these choices are made as
//! if nothing were known: the same query on the same deployment gets the
//! same stages whatever the data.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;

/// `state`, planning without statistics, splitting every file into as
/// many ranges as there are partitions, and giving an empty scan as many
/// partitions as a scan that found files.
pub fn data_independent(state: SessionState) -> SessionState {
    let mut rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> =
        vec![Arc::new(EmptyScansPartitioned)];
    rules.extend(state.physical_optimizers().iter().cloned());
    let mut state = SessionStateBuilder::new_from_existing(state)
        .with_physical_optimizer_rules(rules)
        .build();
    let options = state.config_mut().options_mut();
    options.execution.collect_statistics = false;
    options.optimizer.repartition_file_min_size = 0;
    state
}

/// The first physical optimizer rule: an `EmptyExec` gets a partition per
/// core, as a scan of files has, before the rules that follow the number
/// of partitions (distribution, the partial and final aggregations) run.
#[derive(Debug)]
struct EmptyScansPartitioned;

impl PhysicalOptimizerRule for EmptyScansPartitioned {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let partitions = config.execution.target_partitions.max(1);
        plan.transform_up(|node| match node.downcast_ref::<EmptyExec>() {
            Some(empty) if empty.properties().partitioning.partition_count() < partitions => {
                let spread = EmptyExec::new(empty.schema()).with_partitions(partitions);
                Ok(Transformed::yes(Arc::new(spread) as Arc<dyn ExecutionPlan>))
            }
            _ => Ok(Transformed::no(node)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "empty_scans_partitioned"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
