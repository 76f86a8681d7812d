//! One shuffle by privacy unit for a DP plan's two per-unit aggregations.
//!
//! The bounded statistics plan (`sluice_policy::dp`) aggregates per
//! (unit, group) and then per unit, keeping each unit's largest groups
//! (`sluice_top_groups`). DataFusion plans each aggregation on its own:
//!
//! ```text
//! Final(unit: top_groups)                      Single(unit: top_groups)
//!  └ Repartition(hash(unit))                    └ Projection(unit, cell)
//!     └ Partial(unit: top_groups)                  └ Final(unit, group)
//!        └ Projection(unit, cell)         ⇒          └ Repartition(hash(unit))
//!           └ Final(unit, group)                          └ Partial(unit, group)
//!              └ Repartition(hash(unit, group))
//!                 └ Partial(unit, group)
//! ```
//!
//! Rows hashed by (unit, group) spread one unit's cells over every
//! partition, so the per-unit aggregation shuffles them again and merges
//! partial lists of cells: more than half of a DP query's CPU at 1M rows.
//! Hashing by the unit alone puts all of a unit's rows, hence all of its
//! (unit, group) cells, in one partition. The per-(unit, group) aggregation
//! is still complete in each partition, and the per-unit one can run in one
//! step where it is (`SinglePartitioned`).
//!
//! The rewrite changes where rows are computed, never what: the logical
//! plan, hence the sensitivity argument, is the policy crate's. It applies
//! only to exactly the shape above (checked node by node) and keeps the
//! output schema; any other plan is left as DataFusion built it.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use sluice_policy::dp::top_groups::NAME as TOP_GROUPS;

/// Rewrites every per-unit `top_groups` aggregation in `plan` that has the
/// shape in the module docs.
pub fn shuffle_once_by_unit(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        Ok(match rewrite(&node)? {
            Some(rewritten) => Transformed::yes(rewritten),
            None => Transformed::no(node),
        })
    })
    .map(|t| t.data)
}

/// The nodes of the shape, top to bottom.
struct Shape<'a> {
    per_unit_partial: &'a AggregateExec,
    cells: &'a ProjectionExec,
    per_cell_final: &'a AggregateExec,
    per_cell_shuffle: &'a RepartitionExec,
    /// The unit as the per-cell aggregation reads it from its input: the
    /// one column to hash by.
    unit: &'a Arc<dyn PhysicalExpr>,
    /// Partitions of the per-cell shuffle, kept by the new one.
    partitions: usize,
}

fn rewrite(node: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(shape) = match_shape(node) else {
        return Ok(None);
    };
    // Hash the per-cell partial states by the unit's column alone.
    let shuffle = RepartitionExec::try_new(
        Arc::clone(shape.per_cell_shuffle.input()),
        Partitioning::Hash(vec![Arc::clone(shape.unit)], shape.partitions),
    )?;
    // New partitioning below: the parents' properties are recomputed.
    let recompute = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
    let per_cell = Arc::new(shape.per_cell_final.clone())
        .replace_children(vec![Arc::new(shuffle)], recompute)?;
    let cells = Arc::new(shape.cells.clone()).replace_children(vec![per_cell], recompute)?;
    let partial = shape.per_unit_partial;
    let per_unit = AggregateExec::try_new(
        AggregateMode::SinglePartitioned,
        partial.group_expr().clone(),
        partial.aggr_expr().to_vec(),
        partial.filter_expr().to_vec(),
        Arc::clone(&cells),
        cells.schema(),
    )?;
    // The invariant that lets the rest of the plan stand: same columns.
    if per_unit.schema() != node.schema() {
        return Ok(None);
    }
    Ok(Some(Arc::new(per_unit)))
}

fn match_shape(node: &Arc<dyn ExecutionPlan>) -> Option<Shape<'_>> {
    let per_unit_final = aggregate(node, AggregateMode::FinalPartitioned)?;
    if !is_top_groups(per_unit_final) {
        return None;
    }
    let per_unit_shuffle = per_unit_final.input().downcast_ref::<RepartitionExec>()?;
    let per_unit_partial = aggregate(per_unit_shuffle.input(), AggregateMode::Partial)?;
    if !is_top_groups(per_unit_partial) || per_unit_shuffle.preserve_order() {
        return None;
    }
    let cells = per_unit_partial.input().downcast_ref::<ProjectionExec>()?;
    let per_cell_final = aggregate(cells.input(), AggregateMode::FinalPartitioned)?;
    let per_cell_shuffle = per_cell_final.input().downcast_ref::<RepartitionExec>()?;
    // The shuffle DataFusion adds for the per-cell aggregation: by exactly
    // its keys, in order, not preserving any order.
    let Partitioning::Hash(hashed, partitions) = per_cell_shuffle.partitioning() else {
        return None;
    };
    let keys = per_cell_final.group_expr().expr();
    let by_keys = hashed.len() == keys.len() && hashed.iter().zip(keys).all(|(h, (k, _))| h == k);
    if !by_keys || per_cell_shuffle.preserve_order() {
        return None;
    }
    // The unit: the per-unit aggregation's one key, a column the projection
    // passes through from one of the per-cell aggregation's keys.
    let [(unit, _)] = per_unit_partial.group_expr().expr() else {
        return None;
    };
    let unit = unit.downcast_ref::<Column>()?;
    let source = &cells.expr().get(unit.index())?.expr;
    let source = source.downcast_ref::<Column>()?;
    let (unit, _) = keys.get(source.index())?;
    Some(Shape {
        per_unit_partial,
        cells,
        per_cell_final,
        per_cell_shuffle,
        unit,
        partitions: *partitions,
    })
}

/// `node` as a plain hash aggregation (no grouping sets, no filters, no
/// limit) in `mode`.
fn aggregate(node: &Arc<dyn ExecutionPlan>, mode: AggregateMode) -> Option<&AggregateExec> {
    let aggregate = node.downcast_ref::<AggregateExec>()?;
    let plain = *aggregate.mode() == mode
        && !aggregate.group_expr().has_grouping_set()
        && aggregate.filter_expr().iter().all(Option::is_none)
        && aggregate.limit_options().is_none();
    plain.then_some(aggregate)
}

fn is_top_groups(aggregate: &AggregateExec) -> bool {
    let exprs = aggregate.aggr_expr();
    !exprs.is_empty() && exprs.iter().all(|e| e.fun().name() == TOP_GROUPS)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::logical_expr::AggregateUDF;
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{SessionConfig, SessionContext};
    use sluice_policy::dp::top_groups::TopGroups;

    use super::*;

    /// Each unit keeps its 2 largest of up to 9 groups, as the DP plan does.
    const PER_UNIT: &str = "SELECT u, sluice_top_groups(named_struct('k', k, 'rows', rows, 's', s)) AS cells \
        FROM (SELECT u, k, count(*) AS rows, sum(v) AS s FROM t GROUP BY u, k) GROUP BY u";

    /// Rows of 400 units over 9 groups and NULL, in 4 input partitions
    /// planned into 3, from a fixed seed.
    fn context() -> SessionContext {
        let config = SessionConfig::new().with_target_partitions(3);
        let ctx = SessionContext::new_with_config(config);
        ctx.register_udaf(AggregateUDF::from(TopGroups::new(2, 1, 1)));
        let schema = Arc::new(Schema::new(vec![
            Field::new("u", DataType::Utf8, false),
            Field::new("k", DataType::Utf8, true),
            Field::new("v", DataType::Int64, false),
        ]));
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let partitions = (0..4)
            .map(|_| {
                let rows: Vec<(String, Option<String>, i64)> = (0..3_000)
                    .map(|_| {
                        let unit = format!("card-{}", next() % 400);
                        let key = match next() % 10 {
                            9 => None,
                            k => Some(format!("z{k}")),
                        };
                        (unit, key, (next() % 100) as i64)
                    })
                    .collect();
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
                    Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1.as_deref()))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
                ];
                vec![RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch")]
            })
            .collect();
        let table = MemTable::try_new(schema, partitions).expect("table");
        ctx.register_table("t", Arc::new(table)).expect("register");
        ctx
    }

    async fn plan(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        let frame = ctx.sql(sql).await.expect("sql");
        frame.create_physical_plan().await.expect("physical plan")
    }

    /// The answer's lines, sorted: partitions emit units in any order.
    async fn answer(ctx: &SessionContext, plan: Arc<dyn ExecutionPlan>) -> Vec<String> {
        let batches = collect(plan, ctx.task_ctx()).await.expect("execute");
        let text = pretty_format_batches(&batches).expect("format").to_string();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }

    fn shuffles(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
        displayable(plan.as_ref())
            .indent(false)
            .to_string()
            .lines()
            .filter(|l| l.contains("RepartitionExec: partitioning=Hash"))
            .map(|l| l.trim().to_string())
            .collect()
    }

    #[tokio::test]
    async fn one_shuffle_by_the_outer_key_gives_the_same_answer() {
        let ctx = context();
        // The DP shape, and the same shape keyed by the group: hashing by
        // whichever per-cell key the outer aggregation groups by is right.
        let by_group = "SELECT k, sluice_top_groups(named_struct('u', u, 'rows', rows)) AS cells \
             FROM (SELECT u, k, count(*) AS rows FROM t GROUP BY u, k) GROUP BY k";
        for (sql, key, groups) in [(PER_UNIT, "u@0", 400), (by_group, "k@1", 10)] {
            let before = plan(&ctx, sql).await;
            assert_eq!(
                shuffles(&before).len(),
                2,
                "{}",
                displayable(before.as_ref()).indent(false)
            );
            let after = shuffle_once_by_unit(Arc::clone(&before)).expect("rewrite");
            let text = displayable(after.as_ref()).indent(false).to_string();
            let after_shuffles = shuffles(&after);
            assert_eq!(after_shuffles.len(), 1, "{text}");
            assert!(
                after_shuffles[0].contains(&format!("Hash([{key}], 3)")),
                "{text}"
            );
            assert!(text.contains("mode=SinglePartitioned"), "{text}");
            assert_eq!(after.schema(), before.schema());
            let expected = answer(&ctx, before).await;
            assert!(expected.len() > groups, "every group answers");
            assert_eq!(answer(&ctx, after).await, expected, "{sql}");
        }
    }

    #[tokio::test]
    async fn other_plans_are_left_as_built() {
        let ctx = context();
        for sql in [
            "SELECT u, k, count(*) AS rows FROM t GROUP BY u, k",
            "SELECT u, count(*) FROM (SELECT u, k, count(*) AS rows FROM t GROUP BY u, k) GROUP BY u",
            // Keyed by an aggregate, not a key: no shuffle below can serve it.
            "SELECT rows, sluice_top_groups(named_struct('u', u, 'rows', rows)) AS cells \
             FROM (SELECT u, k, count(*) AS rows FROM t GROUP BY u, k) GROUP BY rows",
        ] {
            let before = plan(&ctx, sql).await;
            let after = shuffle_once_by_unit(Arc::clone(&before)).expect("rewrite");
            assert_eq!(
                displayable(after.as_ref()).indent(false).to_string(),
                displayable(before.as_ref()).indent(false).to_string(),
                "{sql}"
            );
        }
    }

    /// The policy's DP grant over `t`: more groups than `max_groups`, so
    /// each unit's groups are capped by `top_groups`.
    const POLICY: &str = r#"
version: 1
datasets:
  t:
    privacy_unit: u
consumers:
  - name: analyst
    match: { organization: Analysts }
    grants:
      t:
        columns:
          k: group_by_only
          v: aggregate_only
        functions:
          aggregate: [count, sum, avg]
        dp:
          epsilon_per_query: 1.0
          max_groups: 2
          max_rows: 3
          columns:
            v: { bounds: [0, 50] }
"#;

    struct Planning(SessionContext);

    impl sluice_policy::PlanningContext for Planning {
        fn dataset_schema(&self, name: &str) -> Option<datafusion::arrow::datatypes::SchemaRef> {
            let table = futures::executor::block_on(self.0.table_provider(name)).ok()?;
            Some(table.schema())
        }

        fn parse_predicate(
            &self,
            sql: &str,
            schema: &datafusion::common::DFSchema,
        ) -> Result<datafusion::logical_expr::Expr> {
            self.0.state().create_logical_expr(sql, schema)
        }
    }

    /// The statistics plan the policy builds for a DP GROUP BY, as the
    /// connector analyzes it.
    async fn statistics_plan(
        ctx: &SessionContext,
        sql: &str,
    ) -> datafusion::logical_expr::LogicalPlan {
        use sluice_policy::{PlanGate, PolicyGate, PolicySet, Principal, QueryContext};
        let policy = PolicySet::compile("dp.yaml", POLICY, &Planning(ctx.clone()), b"secret")
            .expect("the policy compiles");
        let mut principal = Principal::new("spiffe://test/analyst");
        principal.organization = Some("Analysts".into());
        let state = ctx.state();
        let plan = state.create_logical_plan(sql).await.expect("plans");
        let plan = crate::query::plan::analyze(&state, plan).expect("analyzes");
        let approval = PolicyGate::new(policy)
            .decide(&QueryContext::new(principal), plan)
            .expect("allowed");
        let stats = approval.dp.expect("a DP query").stats_plan;
        crate::query::plan::analyze(&state, stats).expect("analyzes")
    }

    #[tokio::test]
    async fn the_policy_statistics_plan_shares_one_shuffle_and_keeps_its_statistics() {
        let ctx = context();
        let plan = statistics_plan(
            &ctx,
            "SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k",
        )
        .await;
        let before = ctx
            .state()
            .create_physical_plan(&plan)
            .await
            .expect("physical plan");
        let after = shuffle_once_by_unit(Arc::clone(&before)).expect("rewrite");
        let text = displayable(after.as_ref()).indent(false).to_string();
        let after_shuffles = shuffles(&after);
        assert!(
            after_shuffles
                .iter()
                .any(|s| s.contains("Hash([__sluice_unit@")),
            "{text}"
        );
        assert_eq!(after_shuffles.len(), shuffles(&before).len() - 1, "{text}");
        assert!(text.contains("mode=SinglePartitioned"), "{text}");
        let expected = answer(&ctx, before).await;
        assert!(expected.len() > 10, "every group answers");
        assert_eq!(answer(&ctx, after).await, expected);
    }
}
