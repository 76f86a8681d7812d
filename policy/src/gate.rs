use datafusion_common::tree_node::TreeNodeRecursion;
use datafusion_expr::LogicalPlan;

use crate::{Approval, DecisionRecord, Denial, Principal};

/// The extension point every query passes between planning and execution.
///
/// Implementations inspect the analyzed plan (types coerced, wildcards
/// expanded) and either approve it, possibly rewritten, or deny it. They must
/// decide on the plan alone, never on data, so a decision can be made (and
/// explained) before anything is read.
pub trait PlanGate: Send + Sync {
    /// Content hash of the rules in force; recorded with every decision.
    fn version(&self) -> &str;

    /// Approve (and possibly rewrite) `plan` for `principal`, or deny it.
    fn decide(&self, principal: &Principal, plan: LogicalPlan) -> Result<Approval, Denial>;
}

/// The gate used while no usage policy is configured: any authenticated
/// principal may run any read-only query over the served datasets.
///
/// It still denies by default at the level of plan nodes: only relational
/// query operators are allowed; statements that write, create objects, copy
/// files, change session settings or call unknown extension nodes are refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOnlyGate;

/// The rule name reported by [`ReadOnlyGate`].
pub const READ_ONLY_RULE: &str = "read-only";

impl PlanGate for ReadOnlyGate {
    fn version(&self) -> &str {
        "none"
    }

    fn decide(&self, _principal: &Principal, plan: LogicalPlan) -> Result<Approval, Denial> {
        let mut refusal = None;
        // Walk every node, including subquery plans inside expressions.
        plan.apply_with_subqueries(|node| match refused_node_kind(node) {
            Some(kind) => {
                refusal = Some(Denial::forbidden(
                    READ_ONLY_RULE,
                    format!("{kind} is not accepted: Sluice answers read-only queries"),
                ));
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        })
        .map_err(|e| Denial::forbidden(READ_ONLY_RULE, format!("plan inspection failed: {e}")))?;
        if let Some(denial) = refusal {
            return Err(denial);
        }
        Ok(Approval {
            plan,
            record: DecisionRecord {
                policy_version: self.version().to_string(),
                rules: vec![READ_ONLY_RULE.to_string()],
            },
        })
    }
}

/// Names the node kinds a read-only gate refuses; `None` for allowed nodes.
/// The match is exhaustive on purpose: a new DataFusion node kind fails to
/// compile here until someone decides whether it is a read-only operator.
fn refused_node_kind(node: &LogicalPlan) -> Option<&'static str> {
    match node {
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::Window(_)
        | LogicalPlan::Aggregate(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Join(_)
        | LogicalPlan::Repartition(_)
        | LogicalPlan::Union(_)
        | LogicalPlan::TableScan(_)
        | LogicalPlan::EmptyRelation(_)
        | LogicalPlan::Subquery(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Values(_)
        | LogicalPlan::Explain(_)
        | LogicalPlan::Analyze(_)
        | LogicalPlan::Distinct(_)
        | LogicalPlan::Unnest(_)
        | LogicalPlan::RecursiveQuery(_) => None,
        LogicalPlan::Statement(_) => Some("a session or transaction statement"),
        LogicalPlan::Dml(_) => Some("a data-modifying statement (INSERT/UPDATE/DELETE)"),
        LogicalPlan::Ddl(_) => Some("a DDL statement (CREATE/DROP)"),
        LogicalPlan::Copy(_) => Some("COPY"),
        LogicalPlan::DescribeTable(_) => Some("DESCRIBE"),
        LogicalPlan::Extension(_) => Some("an extension plan node"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_common::arrow::datatypes::{DataType, Field, Schema};
    use datafusion_expr::logical_plan::builder::LogicalTableSource;
    use datafusion_expr::logical_plan::{DmlStatement, WriteOp, table_scan};
    use datafusion_expr::{LogicalPlanBuilder, col, lit};
    use std::sync::Arc;

    fn scan() -> LogicalPlanBuilder {
        let schema = Schema::new(vec![
            Field::new("zone", DataType::Utf8, true),
            Field::new("fare", DataType::Float64, true),
        ]);
        table_scan(Some("trips"), &schema, None).unwrap()
    }

    #[test]
    fn approves_a_query_and_records_the_rule() {
        let plan = scan()
            .filter(col("fare").gt(lit(2.0)))
            .unwrap()
            .build()
            .unwrap();
        let approval = ReadOnlyGate
            .decide(&Principal::new("p"), plan.clone())
            .unwrap();
        assert_eq!(approval.plan, plan);
        assert_eq!(approval.record.rules, vec!["read-only".to_string()]);
    }

    #[test]
    fn refuses_dml_naming_the_rule() {
        let input = scan().build().unwrap();
        let dml = LogicalPlan::Dml(DmlStatement::new(
            "trips".into(),
            Arc::new(LogicalTableSource::new(Arc::new(
                input.schema().as_arrow().clone(),
            ))),
            WriteOp::Delete,
            Arc::new(input),
        ));
        let denial = ReadOnlyGate.decide(&Principal::new("p"), dml).unwrap_err();
        assert_eq!(denial.rule, "read-only");
        assert!(denial.message.contains("data-modifying"), "{denial}");
    }
}
