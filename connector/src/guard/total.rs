//! Expressions over data that cannot fail on a value.
//!
//! An error raised by one row's value is an answer to a question about the
//! data: `abs(x)` fails only if some `x` is `i64::MIN`, `x / -1` likewise,
//! `ceil(d)` on a decimal at its maximum, a parse on malformed text. Under
//! differential privacy that answer has no noise, and under k-anonymity it
//! singles out a row. The policy refuses the casts and divisions it can see
//! failing, but cannot know every function's failure modes, so execution
//! closes the class: every expression a filter, a projection or a grouping
//! evaluates over columns is wrapped in a [`TotalExpr`], which evaluates as
//! before and, when a batch fails, evaluates it again row by row and gives
//! each failing row NULL (or the type's zero where the expression cannot be
//! NULL). A row's failure then changes only that row's value, like any other
//! row-level function, which is what the DP sensitivity analysis and k
//! suppression already account for.
//!
//! Not caught: the query's deadline, its memory pool and the function
//! guards' limits on a whole call (a limit reached is not one value's doing;
//! the DP path reports those without their cause), and expressions over
//! constants only: whether one is evaluated at all depends on whether a
//! row reaches it, so one that fails is refused before execution reads
//! anything (`query::constants`). A guard's limit on one value (a value too large to build, too
//! much work for one value) is that value's failure: the row gets NULL.
//! Evaluated row by row, a batch may not build more in all than one guarded
//! call may ([`guard::MAX_CALL_BYTES`]), so the fallback cannot undo what
//! the guards bound.

use std::any::Any;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, new_null_array};
use datafusion::arrow::compute::concat;
use datafusion::arrow::datatypes::{DataType, FieldRef, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_expr::{PhysicalExpr, PhysicalExprRef};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, PhysicalGroupBy};
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion_distributed::NetworkBoundaryExt;

use crate::guard;
use crate::guard::deadline::is_deadline;

/// Wraps the expressions of every filter, projection and grouping in
/// `plan` that read columns.
///
/// A distributed plan's stages below a network boundary are left as they
/// are: they are sent to workers encoded, which a [`TotalExpr`] cannot be,
/// and every worker applies this same rewrite to each stage it receives
/// (`cluster::worker`), so they hold there exactly as here.
pub fn total_expressions(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_down(|node| {
        if node.is_network_boundary() {
            return Ok(Transformed::new(node, false, TreeNodeRecursion::Jump));
        }
        if let Some(filter) = node.downcast_ref::<FilterExec>() {
            return total_filter(filter);
        }
        if let Some(projection) = node.downcast_ref::<ProjectionExec>() {
            return total_projection(projection);
        }
        if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
            return total_grouping(aggregate);
        }
        Ok(Transformed::no(node))
    })
    .map(|t| t.data)
}

fn total_filter(filter: &FilterExec) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let Some(predicate) = total(filter.predicate()) else {
        return Ok(Transformed::no(Arc::new(filter.clone())));
    };
    let rebuilt = FilterExecBuilder::from(filter)
        .with_predicate(predicate)
        .build()?;
    Ok(Transformed::yes(Arc::new(rebuilt)))
}

fn total_projection(projection: &ProjectionExec) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let mut changed = false;
    let exprs: Vec<ProjectionExpr> = projection
        .expr()
        .iter()
        .map(|e| match total(&e.expr) {
            Some(expr) => {
                changed = true;
                ProjectionExpr {
                    expr,
                    alias: e.alias.clone(),
                }
            }
            None => e.clone(),
        })
        .collect();
    if !changed {
        return Ok(Transformed::no(Arc::new(projection.clone())));
    }
    let rebuilt = ProjectionExec::try_new_with_schema_metadata(
        exprs,
        projection.input().clone(),
        &projection.schema(),
    )?;
    Ok(Transformed::yes(Arc::new(rebuilt)))
}

fn total_grouping(aggregate: &AggregateExec) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let group_by = aggregate.group_expr();
    if group_by.expr().iter().all(|(e, _)| total(e).is_none()) {
        return Ok(Transformed::no(Arc::new(aggregate.clone())));
    }
    let exprs = group_by
        .expr()
        .iter()
        .map(|(e, name)| (total(e).unwrap_or_else(|| e.clone()), name.clone()))
        .collect();
    let group_by = PhysicalGroupBy::new(
        exprs,
        group_by.null_expr().to_vec(),
        group_by.groups().to_vec(),
        group_by.has_grouping_set(),
    );
    let aggr_expr: Vec<Arc<AggregateFunctionExpr>> = aggregate.aggr_expr().to_vec();
    let rebuilt = AggregateExec::try_new(
        *aggregate.mode(),
        group_by,
        aggr_expr,
        aggregate.filter_expr().to_vec(),
        aggregate.input().clone(),
        aggregate.input_schema(),
    )?
    .with_limit_options(aggregate.limit_options());
    Ok(Transformed::yes(Arc::new(rebuilt)))
}

/// `expr` wrapped, if it evaluates something over columns (plain columns
/// and constants cannot fail, and neither can a wrapper).
fn total(expr: &PhysicalExprRef) -> Option<PhysicalExprRef> {
    let any = expr.as_ref() as &dyn Any;
    if any.is::<Column>() || any.is::<TotalExpr>() || !reads_columns(expr) {
        return None;
    }
    Some(Arc::new(TotalExpr {
        inner: expr.clone(),
    }))
}

fn reads_columns(expr: &PhysicalExprRef) -> bool {
    let mut found = false;
    let _ = expr.apply(|e| {
        if (e.as_ref() as &dyn Any).is::<Column>() {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// An expression whose failure on a row gives that row NULL (or, where the
/// expression cannot be NULL, its type's zero). See the module docs.
#[derive(Debug)]
pub struct TotalExpr {
    inner: PhysicalExprRef,
}

impl Hash for TotalExpr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

impl PartialEq for TotalExpr {
    fn eq(&self, other: &Self) -> bool {
        self.inner.as_ref().dyn_eq(other.inner.as_ref() as &dyn Any)
    }
}

impl Eq for TotalExpr {}

impl fmt::Display for TotalExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "total({})", self.inner)
    }
}

impl PhysicalExpr for TotalExpr {
    fn return_field(&self, input_schema: &Schema) -> Result<FieldRef> {
        self.inner.return_field(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        match self.inner.evaluate(batch) {
            Ok(value) => Ok(value),
            Err(e) if is_limit(&e) => Err(e),
            Err(_) => self.row_by_row(batch).map(ColumnarValue::Array),
        }
    }

    fn children(&self) -> Vec<&PhysicalExprRef> {
        vec![&self.inner]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<PhysicalExprRef>,
    ) -> Result<PhysicalExprRef> {
        Ok(Arc::new(TotalExpr {
            inner: children.swap_remove(0),
        }))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_sql(f)
    }
}

impl TotalExpr {
    /// Evaluates each row on its own; a row that fails gets the fallback.
    fn row_by_row(&self, batch: &RecordBatch) -> Result<ArrayRef> {
        let field = self.inner.return_field(&batch.schema())?;
        let mut parts: Vec<ArrayRef> = Vec::with_capacity(batch.num_rows());
        let mut built = 0;
        for row in 0..batch.num_rows() {
            let one = batch.slice(row, 1);
            let value = match self.inner.evaluate(&one) {
                Ok(value) => value.into_array(1)?,
                Err(e) if is_limit(&e) => return Err(e),
                Err(_) => fallback(field.data_type(), field.is_nullable())?,
            };
            built += value.get_array_memory_size();
            if built > guard::MAX_CALL_BYTES {
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "an expression built more than {} MiB for one batch",
                    guard::MAX_CALL_BYTES >> 20
                )));
            }
            parts.push(value);
        }
        let parts: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        if parts.is_empty() {
            return Ok(new_null_array(field.data_type(), 0));
        }
        Ok(concat(&parts)?)
    }
}

/// NULL, or the type's zero where the expression is declared non-null.
fn fallback(data_type: &DataType, nullable: bool) -> Result<ArrayRef> {
    if nullable {
        return Ok(new_null_array(data_type, 1));
    }
    ScalarValue::new_default(data_type)?.to_array_of_size(1)
}

/// A limit of the query (its deadline, its memory pool, a guard's limit on
/// a whole call or on its constants), not one value's failure.
fn is_limit(e: &DataFusionError) -> bool {
    is_deadline(e)
        || matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
        || guard::find_error(e).is_some_and(|g| !g.is_about_one_value())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::Field;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    fn session() -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, i64::MIN, -3, 4])),
                Arc::new(StringArray::from(vec![
                    Some("2026-01-01"),
                    Some("not a date"),
                    None,
                    Some("2026-02-03"),
                ])),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    async fn run(sql: &str, wrapped: bool) -> Result<Vec<RecordBatch>> {
        let ctx = session();
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        let plan = if wrapped {
            total_expressions(plan)?
        } else {
            plan
        };
        datafusion::physical_plan::collect(plan, ctx.task_ctx()).await
    }

    fn render(batches: &[RecordBatch]) -> String {
        datafusion::arrow::util::pretty::pretty_format_batches(batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn a_failing_row_gets_null_and_the_others_their_values() {
        for sql in [
            "SELECT abs(x) AS a FROM t",
            "SELECT x / -1 AS a FROM t",
            "SELECT to_date(s) AS a FROM t",
        ] {
            assert!(run(sql, false).await.is_err(), "{sql} fails unwrapped");
            let got = render(&run(sql, true).await.unwrap());
            assert_eq!(
                got.lines().filter(|l| l.starts_with("|")).count(),
                5,
                "{sql}\n{got}"
            );
        }
        let got = render(&run("SELECT abs(x) AS a FROM t", true).await.unwrap());
        assert!(
            got.contains("| 1 ") && got.contains("| 3 ") && got.contains("| 4 "),
            "{got}"
        );
    }

    #[tokio::test]
    async fn filters_and_groups_over_failing_values_drop_or_null_only_those_rows() {
        let filtered = run("SELECT count(*) AS n FROM t WHERE abs(x) > 2", true)
            .await
            .unwrap();
        assert!(render(&filtered).contains("| 2 "), "{}", render(&filtered));
        let grouped = run(
            "SELECT to_date(s) AS d, count(*) AS n FROM t GROUP BY to_date(s) ORDER BY d",
            true,
        )
        .await
        .unwrap();
        assert_eq!(grouped.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    }

    #[tokio::test]
    async fn constant_expressions_still_report_their_errors() {
        assert!(
            run(
                "SELECT abs(CAST(-9223372036854775808 AS BIGINT)) AS a FROM t",
                true
            )
            .await
            .is_err()
        );
    }
}
