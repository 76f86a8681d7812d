//! Constant expressions the optimiser could not fold fail before any data
//! is read.
//!
//! The optimiser folds every expression over constants that it can
//! evaluate. One whose evaluation fails (`to_timestamp('abc')`,
//! `abs(-9223372036854775808)`, `to_date('zz')`) is left in the plan as it
//! is and fails again when it is evaluated, and a filter, projection, sort,
//! join or grouping evaluates it only when a row reaches it. Its failure
//! would then tell whether any row did: without noise under differential
//! privacy, and for groups smaller than k under k-anonymity. The total
//! expressions ([`super::total`]) cannot help there: a constant has no row
//! to blame.
//!
//! So every such expression is evaluated once, on one row of no columns,
//! after optimisation and before execution; the query fails there if it
//! fails, whatever the data. Volatile functions (`random()`), which have a
//! new value for each row and cannot be evaluated ahead, are refused when
//! the statement is planned ([`super::plan::refuse_volatile_functions`]).
//! The DP path runs the same check before
//! it reserves any budget ([`super::execute::check_before_data`]).

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, Result};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};

use super::plan::is_constant;

/// Evaluates each constant expression left in an optimised `plan` and
/// returns the first failure.
pub fn refuse_failing_constants(plan: &LogicalPlan, state: &SessionState) -> Result<()> {
    let mut failure = None;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if !is_unfolded_constant(e) {
                    return Ok(TreeNodeRecursion::Continue);
                }
                match evaluate_once(e, state) {
                    Ok(()) => Ok(TreeNodeRecursion::Jump),
                    Err(err) => {
                        failure = Some(err);
                        Ok(TreeNodeRecursion::Stop)
                    }
                }
            })
        })
    })?;
    failure.map_or(Ok(()), Err)
}

/// A constant expression that is not already a value: nothing in it
/// varies by row, and nothing in it is bound later.
fn is_unfolded_constant(expr: &Expr) -> bool {
    !matches!(
        expr,
        Expr::Literal(..) | Expr::Alias(_) | Expr::Placeholder(_)
    ) && is_constant(expr)
        && !expr
            .exists(|e| Ok(matches!(e, Expr::Placeholder(_))))
            .unwrap_or(true)
}

/// Evaluates `expr` on one row of no columns. An expression that cannot
/// be turned into a physical one here (there are constant forms only
/// some operators evaluate) is left to execution.
fn evaluate_once(expr: &Expr, state: &SessionState) -> Result<()> {
    let Ok(physical) = state.create_physical_expr(expr.clone(), &DFSchema::empty()) else {
        return Ok(());
    };
    let one_row = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )?;
    physical.evaluate(&one_row).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn check(sql: &str) -> Result<()> {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE t (x BIGINT, s VARCHAR) AS VALUES (1, 'a')")
            .await?
            .collect()
            .await?;
        let state = ctx.state();
        let plan = state.create_logical_plan(sql).await?;
        let optimized = state.optimize(&plan)?;
        refuse_failing_constants(&optimized, &state)
    }

    #[tokio::test]
    async fn constants_that_fail_are_found_wherever_they_are() {
        for sql in [
            "SELECT to_timestamp('abc') AS g, count(*) FROM t GROUP BY 1",
            "SELECT x FROM t WHERE x > 0 AND to_date('zz') IS NULL",
            "SELECT x FROM t ORDER BY abs(-9223372036854775808)",
            "SELECT CASE WHEN x > 5 THEN to_timestamp('abc') END AS c FROM t",
            "SELECT count(*) FROM (SELECT to_timestamp('abc') AS c, x FROM t) s GROUP BY c",
        ] {
            assert!(check(sql).await.is_err(), "{sql}");
        }
    }

    #[tokio::test]
    async fn constants_that_evaluate_and_volatile_ones_pass() {
        for sql in [
            "SELECT to_timestamp('2026-01-01T00:00:00Z') AS g, count(*) FROM t GROUP BY 1",
            "SELECT x, random() AS r FROM t WHERE x > abs(-5)",
            "SELECT x FROM t WHERE now() > to_timestamp('2020-01-01T00:00:00Z')",
            "SELECT upper(s) FROM t WHERE s LIKE concat('a', '%')",
        ] {
            check(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
