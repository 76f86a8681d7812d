//! Putting every call behind its guard before anything is evaluated, and
//! the checks on the optimised plan.

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, Result};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan, Operator};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

use super::functions::{StringConcat, builds, guarded, string_concat};
use super::sizes::scalar_bytes;
use super::{GuardError, MAX_BROADCAST_CONSTANT_BYTES};

/// The first optimizer rule: replaces every call of an unguarded built-in
/// (planned from syntax such as `OVERLAY(… PLACING …)` or `POSITION(… IN
/// …)`, which picks the built-in without the registry) by its guarded
/// form, and every `||` on strings or binaries by the guarded
/// [`StringConcat`]. It runs before `SimplifyExpressions`, so no constant
/// is folded unguarded. It is an optimizer rule, not an analyzer rule, so
/// that the usage policy, which decides on the analyzed plan, still sees
/// the `||` operator the consumer wrote.
#[derive(Debug, Default)]
pub struct GuardCalls;

impl OptimizerRule for GuardCalls {
    fn name(&self) -> &str {
        "sluice_guard_calls"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let schema = expression_schema(&plan)?;
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|expr| {
            let name = names.save(&expr);
            let rewritten = guard_expr(expr, &schema)?;
            Ok(if rewritten.transformed {
                rewritten.update_data(|e| name.restore(e))
            } else {
                rewritten
            })
        })
    }
}

/// The schema a node's expressions are resolved against: its inputs'
/// (and, for a scan's filters, the table's).
fn expression_schema(plan: &LogicalPlan) -> Result<DFSchema> {
    let mut schema = merge_schema(&plan.inputs());
    if let LogicalPlan::TableScan(scan) = plan {
        let table =
            DFSchema::try_from_qualified_schema(scan.table_name.clone(), &scan.source.schema())?;
        schema.merge(&table);
    }
    Ok(schema)
}

/// `expr` with its built-in calls and `||` guarded.
pub(super) fn guard_expr(expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    expr.transform_up(|e| match e {
        Expr::ScalarFunction(mut call) => match guarded(&call.func) {
            Some(func) => {
                call.func = func;
                Ok(Transformed::yes(Expr::ScalarFunction(call)))
            }
            None => Ok(Transformed::no(Expr::ScalarFunction(call))),
        },
        Expr::BinaryExpr(binary) if binary.op == Operator::StringConcat => {
            match (binary.left.get_type(schema), binary.right.get_type(schema)) {
                (Ok(left), Ok(right)) if StringConcat::supports(&left, &right) => Ok(
                    Transformed::yes(string_concat().call(vec![*binary.left, *binary.right])),
                ),
                _ => Ok(Transformed::no(Expr::BinaryExpr(binary))),
            }
        }
        e => Ok(Transformed::no(e)),
    })
}

/// Refuses an optimised plan that reads a table and holds a string or
/// binary constant larger than [`MAX_BROADCAST_CONSTANT_BYTES`]: operators
/// copy constants into every row of a batch (a projection of a constant,
/// a CASE branch, a function argument), outside the memory pool. A plan
/// that reads no table has one row per VALUES row or none, and its
/// constants are bounded by the constant budget instead.
pub fn check_constants(plan: &LogicalPlan) -> std::result::Result<(), GuardError> {
    let mut reads_table = false;
    let mut largest = 0usize;
    let _ = plan.apply_with_subqueries(|node| {
        reads_table |= matches!(node, LogicalPlan::TableScan(_));
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::Literal(value, _) = e
                    && let Some(Some(bytes)) = scalar_bytes(value)
                {
                    largest = largest.max(bytes.len());
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    if reads_table && largest > MAX_BROADCAST_CONSTANT_BYTES {
        return Err(GuardError::BroadcastConstant { size: largest });
    }
    Ok(())
}

/// Calls in an optimised plan that build values, which share the query's
/// memory.
pub fn call_sites(plan: &LogicalPlan) -> usize {
    let mut sites = 0;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::ScalarFunction(call) = e
                    && builds(&call.func)
                {
                    sites += 1;
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    sites
}
