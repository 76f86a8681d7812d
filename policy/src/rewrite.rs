//! Step 4: the rewrite of an allowed plan.
//!
//! 1. Every scan gets the consumer's row filter, then its masks, so nothing
//!    above the scan sees a filtered-out row or an unmasked value.
//! 2. Every aggregate over an aggregation-only dataset counts the distinct
//!    privacy units of each group (after all filters and joins) and drops
//!    groups below k; the count itself is projected away.
//! 3. The output is capped at the grant's `max_rows`.
//!
//! Column types may change (a hashed id becomes text), so each rebuilt node
//! recomputes its schema.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion_common::tree_node::{Transformed, TreeNode};
use datafusion_common::{Column, Result, ScalarValue, TableReference, plan_err};
use datafusion_expr::logical_plan::{
    Aggregate, Filter, LogicalPlan, Projection, SubqueryAlias, TableScan, TableScanBuilder,
};
use datafusion_expr::{Expr, LogicalPlanBuilder, col, lit};

use crate::compile::{DatasetGrant, PolicySet};
use crate::document::Visibility;
use crate::mask::masked_column;

pub use crate::internal::INTERNAL_PREFIX;

pub struct Rewriter<'a> {
    pub policy: &'a PolicySet,
    pub grants: &'a BTreeMap<String, DatasetGrant>,
    /// Values for `$name` placeholders in row filters.
    pub attributes: &'a BTreeMap<String, String>,
    pub hash_key: [u8; 32],
    /// Numbers the internal columns so that names never collide.
    pub next_column: std::cell::Cell<usize>,
}

impl Rewriter<'_> {
    fn next_id(&self) -> usize {
        let id = self.next_column.get();
        self.next_column.set(id + 1);
        id
    }

    pub fn rewrite(&self, plan: LogicalPlan, max_rows: Option<u64>) -> Result<LogicalPlan> {
        let plan = self.guard_scans(plan)?;
        let plan = self.enforce_group_size(plan)?;
        cap_rows(plan, max_rows)
    }

    /// Row filters, masks and the row cap, without minimum group sizes:
    /// the rewrite of a differentially private query, whose groups are
    /// protected by noise instead.
    pub fn rewrite_scans(&self, plan: LogicalPlan, max_rows: Option<u64>) -> Result<LogicalPlan> {
        cap_rows(self.guard_scans(plan)?, max_rows)
    }

    fn guard_scans(&self, plan: LogicalPlan) -> Result<LogicalPlan> {
        Ok(plan
            .transform_up(|node| match node {
                LogicalPlan::TableScan(scan) => self.guard_scan(scan).map(Transformed::yes),
                other => other.recompute_schema().map(Transformed::yes),
            })?
            .data)
    }
}

fn cap_rows(plan: LogicalPlan, max_rows: Option<u64>) -> Result<LogicalPlan> {
    {
        match max_rows {
            Some(n) => LogicalPlanBuilder::from(plan)
                .limit(0, Some(n as usize))?
                .build(),
            None => Ok(plan),
        }
    }
}

impl Rewriter<'_> {
    /// Scan → row filter → masks.
    fn guard_scan(&self, scan: TableScan) -> Result<LogicalPlan> {
        let dataset = scan.table_name.table().to_string();
        let Some(grant) = self.grants.get(&dataset) else {
            return plan_err!("no grant for dataset {dataset}");
        };
        let table = scan.table_name.clone();
        let schema = scan.projected_schema.clone();
        // A scan planned against the caller's view of the dataset reads only
        // the columns the caller may name; the row filter may need others
        // (and DP and k need the privacy unit), so it reads every column and
        // the columns the query saw are selected again above the filter.
        let narrowed = scan.projection.is_some();
        let mut plan = match narrowed {
            true => {
                LogicalPlan::TableScan(TableScanBuilder::from(scan).with_projection(None).build()?)
            }
            false => LogicalPlan::TableScan(scan),
        };
        if let Some(filter) = &grant.row_filter {
            let predicate = self.bind_row_filter(filter.clone(), &table)?;
            plan = LogicalPlan::Filter(Filter::try_new(predicate, Arc::new(plan))?);
        }
        let masks: Vec<_> = schema
            .fields()
            .iter()
            .filter_map(|f| match grant.visibility(f.name()) {
                Visibility::Masked(mask) => Some((f.name().clone(), mask)),
                _ => None,
            })
            .collect();
        if masks.is_empty() && !narrowed {
            return Ok(plan);
        }
        let exprs = schema
            .fields()
            .iter()
            .map(
                |field| match masks.iter().find(|(name, _)| name == field.name()) {
                    Some((_, mask)) => {
                        masked_column(&table, field.name(), field.data_type(), mask, self.hash_key)
                    }
                    None => Ok(col(Column::new(Some(table.clone()), field.name()))),
                },
            )
            .collect::<Result<Vec<_>>>()?;
        Ok(LogicalPlan::Projection(Projection::try_new(
            exprs,
            Arc::new(plan),
        )?))
    }

    /// Qualifies the filter's columns with the scan's name and replaces
    /// `$name` placeholders by the principal's attribute values (NULL when
    /// the principal has no such attribute: the filter then admits nothing).
    fn bind_row_filter(&self, filter: Expr, table: &TableReference) -> Result<Expr> {
        filter
            .transform_up(|e| match e {
                Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new(
                    Some(table.clone()),
                    c.name,
                )))),
                Expr::Placeholder(p) => {
                    let name = p.id.trim_start_matches('$');
                    let value = self.attributes.get(name).cloned();
                    Ok(Transformed::yes(lit(ScalarValue::Utf8(value))))
                }
                other => Ok(Transformed::no(other)),
            })
            .map(|t| t.data)
    }

    fn enforce_group_size(&self, plan: LogicalPlan) -> Result<LogicalPlan> {
        if let LogicalPlan::Aggregate(aggregate) = &plan {
            let (input, units) =
                self.expose_units(Arc::unwrap_or_clone(aggregate.input.clone()))?;
            if !units.is_empty() {
                return suppress_small_groups(aggregate, input, units);
            }
            return Ok(plan);
        }
        let inputs: Vec<LogicalPlan> = plan.inputs().into_iter().cloned().collect();
        if inputs.is_empty() {
            return Ok(plan);
        }
        let inputs = inputs
            .into_iter()
            .map(|i| self.enforce_group_size(i))
            .collect::<Result<Vec<_>>>()?;
        plan.with_new_exprs(plan.expressions(), inputs)
    }

    /// Rebuilds `plan` so that its output also carries the privacy unit of
    /// every aggregation-only dataset below it; returns the unit columns
    /// (as seen at the output) with their k.
    pub(crate) fn expose_units(
        &self,
        plan: LogicalPlan,
    ) -> Result<(LogicalPlan, Vec<(Column, u64)>)> {
        match plan {
            LogicalPlan::TableScan(ref scan) => {
                let dataset = scan.table_name.table();
                let k = self.grants.get(dataset).and_then(|g| g.min_group_size);
                let unit = self
                    .policy
                    .datasets
                    .get(dataset)
                    .and_then(|d| d.privacy_unit.clone());
                let units = match (k, unit) {
                    (Some(k), Some(unit)) => {
                        vec![(Column::new(Some(scan.table_name.clone()), unit), k)]
                    }
                    _ => vec![],
                };
                Ok((plan, units))
            }
            LogicalPlan::Projection(projection) => {
                let (input, units) = self.expose_units(Arc::unwrap_or_clone(projection.input))?;
                let mut exprs = projection.expr;
                let mut out = Vec::new();
                for (unit, k) in units {
                    let name = format!("{INTERNAL_PREFIX}unit_{}", self.next_id());
                    exprs.push(col(unit).alias(&name));
                    out.push((Column::new_unqualified(name), k));
                }
                Ok((
                    LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(input))?),
                    out,
                ))
            }
            LogicalPlan::SubqueryAlias(alias) => {
                let (input, units) = self.expose_units(Arc::unwrap_or_clone(alias.input))?;
                let rebuilt = SubqueryAlias::try_new(Arc::new(input), alias.alias.clone())?;
                let units = units
                    .into_iter()
                    .map(|(c, k)| (Column::new(Some(alias.alias.clone()), c.name), k))
                    .collect();
                Ok((LogicalPlan::SubqueryAlias(rebuilt), units))
            }
            LogicalPlan::Filter(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Sort(_) => {
                let mut units = Vec::new();
                let mut inputs = Vec::new();
                for input in plan.inputs() {
                    let (input, found) = self.expose_units(input.clone())?;
                    units.extend(found);
                    inputs.push(input);
                }
                let rebuilt = plan.with_new_exprs(plan.expressions(), inputs)?;
                Ok((rebuilt, units))
            }
            other => {
                if self.scans_aggregation_only(&other) {
                    return plan_err!(
                        "{} below an aggregate over an aggregation-only dataset is not supported",
                        other.display()
                    );
                }
                Ok((other, vec![]))
            }
        }
    }

    fn scans_aggregation_only(&self, plan: &LogicalPlan) -> bool {
        let mut found = false;
        let _ = plan.apply(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && self
                    .grants
                    .get(scan.table_name.table())
                    .is_some_and(|g| g.min_group_size.is_some())
            {
                found = true;
            }
            Ok(datafusion_common::tree_node::TreeNodeRecursion::Continue)
        });
        found
    }
}

/// Aggregate + count(DISTINCT unit) per unit → keep groups with count ≥ k →
/// project the original columns.
fn suppress_small_groups(
    aggregate: &Aggregate,
    input: LogicalPlan,
    units: Vec<(Column, u64)>,
) -> Result<LogicalPlan> {
    let mut aggr_expr = aggregate.aggr_expr.clone();
    let mut keep: Option<Expr> = None;
    for (i, (unit, k)) in units.into_iter().enumerate() {
        let name = format!("{INTERNAL_PREFIX}units_{i}");
        aggr_expr
            .push(datafusion_functions_aggregate::count::count_distinct(col(unit)).alias(&name));
        let condition = col(Column::new_unqualified(name)).gt_eq(lit(k as i64));
        keep = Some(match keep {
            Some(previous) => previous.and(condition),
            None => condition,
        });
    }
    let counted = Aggregate::try_new(Arc::new(input), aggregate.group_expr.clone(), aggr_expr)?;
    let mut plan = LogicalPlan::Aggregate(counted);
    if let Some(keep) = keep {
        plan = LogicalPlan::Filter(Filter::try_new(keep, Arc::new(plan))?);
    }
    let original = aggregate
        .schema
        .iter()
        .map(|(qualifier, field)| col(Column::new(qualifier.cloned(), field.name())))
        .collect();
    Ok(LogicalPlan::Projection(Projection::try_new(
        original,
        Arc::new(plan),
    )?))
}
