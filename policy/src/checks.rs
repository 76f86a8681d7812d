//! Step 3: the decision. Walks the analyzed plan bottom-up, computing column
//! lineage, and refuses the first thing no rule allows.
//!
//! Deny by default: every plan node and expression kind is matched
//! explicitly; anything not listed is refused with its name. Checks happen
//! where a column is *used*: in a filter, a GROUP BY key, an aggregate
//! argument, a join key, a sort key, or the final output. Passing a column
//! through a projection is not a use.

use std::collections::{BTreeMap, BTreeSet};

use datafusion_common::arrow::datatypes::DataType;
use datafusion_common::{Column, DFSchema, ScalarValue};
use datafusion_expr::expr::{AggregateFunction, Cast};
use datafusion_expr::logical_plan::{Aggregate, Distinct, Join, JoinType};
use datafusion_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};

use crate::Denial;
use crate::compile::{DatasetGrant, PolicySet};
use crate::document::{Construct, JoinKind, Visibility};
use crate::lineage::{Level, Lineage, NodeLineage, Source, strip_plain};

/// Rule name for refusals that no single grant line states: the engine's
/// deny-by-default stance.
pub const DENY_BY_DEFAULT: &str = "deny-by-default";

/// Aggregates whose result is one input value (or all of them).
pub const VALUE_REVEALING_AGGREGATES: &[&str] = &[
    "min",
    "max",
    "first_value",
    "last_value",
    "nth_value",
    "array_agg",
    "string_agg",
    "median",
    "approx_median",
    "approx_percentile_cont",
    "percentile_cont",
    "mode",
    "any_value",
    "bit_and",
    "bit_or",
    "bool_and",
    "bool_or",
];

/// Where a column is used; each use admits certain visibilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Leaves in the result, row by row.
    Output,
    /// A GROUP BY key (and so an output value per group).
    GroupKey,
    /// In a WHERE / HAVING / CASE condition.
    Filter,
    /// The argument of an aggregate function.
    AggregateArgument,
}

impl Use {
    fn admits(self, visibility: &Visibility) -> bool {
        use Visibility::*;
        match self {
            Use::Output => matches!(visibility, Raw | Masked(_)),
            Use::GroupKey => matches!(visibility, Raw | Masked(_) | GroupByOnly),
            Use::Filter => matches!(visibility, Raw | Masked(_) | GroupByOnly | FilterOnly),
            Use::AggregateArgument => matches!(visibility, Raw | Masked(_) | AggregateOnly),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Use::Output => "returned row by row",
            Use::GroupKey => "used as a GROUP BY key",
            Use::Filter => "used in a condition",
            Use::AggregateArgument => "aggregated",
        }
    }
}

/// The plan walker for one decision.
pub struct Checker<'a> {
    pub policy: &'a PolicySet,
    /// This principal's effective grant per dataset.
    pub grants: &'a BTreeMap<String, DatasetGrant>,
}

type Checked<T> = Result<T, Denial>;

impl Checker<'_> {
    /// Lineage of `plan`'s output, or the first refusal.
    pub fn node(&self, plan: &LogicalPlan) -> Checked<NodeLineage> {
        match plan {
            LogicalPlan::TableScan(scan) => self.scan(scan),
            LogicalPlan::Projection(projection) => {
                let input = self.node(&projection.input)?;
                let columns = projection
                    .expr
                    .iter()
                    .map(|e| self.value(e, &projection.input, &input))
                    .collect::<Checked<Vec<_>>>()?;
                Ok(NodeLineage { columns, ..input })
            }
            LogicalPlan::Filter(filter) => {
                let input = self.node(&filter.input)?;
                self.condition(&filter.predicate, &filter.input, &input)?;
                if input.aggregated {
                    self.refuse_small_count_filter(&filter.predicate, &filter.input, &input)?;
                }
                Ok(input)
            }
            LogicalPlan::Aggregate(aggregate) => self.aggregate(aggregate),
            LogicalPlan::Sort(sort) => {
                let mut input = self.node(&sort.input)?;
                if sort.fetch.is_some() {
                    input
                        .position_selected
                        .extend(input.unaggregated.iter().cloned());
                }
                for key in &sort.expr {
                    let lineage = self.value(&key.expr, &sort.input, &input)?;
                    self.require_released(&lineage, "ORDER BY key")?;
                }
                Ok(input)
            }
            LogicalPlan::Limit(limit) => {
                let mut input = self.node(&limit.input)?;
                input
                    .position_selected
                    .extend(input.unaggregated.iter().cloned());
                // LIMIT and OFFSET are constants; checked like any value.
                for bound in limit.skip.iter().chain(limit.fetch.iter()) {
                    let lineage = self.value(bound, &limit.input, &input)?;
                    if !lineage.sources.is_empty() {
                        return Err(refused("a LIMIT computed from data"));
                    }
                }
                Ok(input)
            }
            LogicalPlan::SubqueryAlias(alias) => self.node(&alias.input),
            LogicalPlan::Join(join) => self.join(join),
            LogicalPlan::Union(union) => {
                let mut branches = union.inputs.iter().map(|i| self.node(i));
                let mut merged = branches.next().transpose()?.unwrap_or_default();
                for branch in branches {
                    let branch = branch?;
                    merged.columns = merged
                        .columns
                        .iter()
                        .zip(&branch.columns)
                        .map(|(a, b)| a.union(b))
                        .collect();
                    merged.scans.extend(branch.scans);
                    merged.unaggregated.extend(branch.unaggregated);
                    merged.position_selected.extend(branch.position_selected);
                    merged.aggregated |= branch.aggregated;
                }
                self.require_construct(&merged.scans, Construct::Union, "UNION")?;
                Ok(merged)
            }
            LogicalPlan::Distinct(Distinct::All(input)) => {
                // DISTINCT groups by every column: each is a key.
                let lineage = self.node(input)?;
                for column in &lineage.columns {
                    if column.level == Level::Row {
                        self.require_use(column, Use::GroupKey, "SELECT DISTINCT")?;
                    }
                }
                Ok(lineage)
            }
            LogicalPlan::Distinct(Distinct::On(_)) => Err(refused("DISTINCT ON")),
            LogicalPlan::Window(window) => {
                let mut input = self.node(&window.input)?;
                self.require_construct(&input.scans, Construct::Window, "window functions")?;
                for expr in &window.window_expr {
                    let lineage = self.window_value(expr, &window.input, &input)?;
                    input.columns.push(lineage);
                }
                Ok(input)
            }
            LogicalPlan::Values(values) => {
                // Constants only; checked so that no subquery hides in a row.
                let empty = NodeLineage::default();
                for expr in values.values.iter().flatten() {
                    self.value(expr, plan, &empty)?;
                }
                Ok(NodeLineage {
                    columns: vec![Lineage::default(); values.schema.fields().len()],
                    ..NodeLineage::default()
                })
            }
            LogicalPlan::EmptyRelation(empty) => Ok(NodeLineage {
                columns: vec![Lineage::default(); empty.schema.fields().len()],
                ..NodeLineage::default()
            }),
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                "EXPLAIN and EXPLAIN ANALYZE are refused: plans and row counts show what the policy hides; use EXPLAIN POLICY <query>",
            )),
            LogicalPlan::Subquery(_) => Err(refused("a subquery expression")),
            LogicalPlan::RecursiveQuery(_) => Err(refused("a recursive CTE")),
            LogicalPlan::Unnest(_) => Err(refused("UNNEST")),
            LogicalPlan::Repartition(_) => Err(refused("a repartition node")),
            LogicalPlan::Statement(_) => Err(refused("a session or transaction statement")),
            LogicalPlan::Dml(_) => {
                Err(refused("a data-modifying statement (INSERT/UPDATE/DELETE)"))
            }
            LogicalPlan::Ddl(_) => Err(refused("a DDL statement (CREATE/DROP)")),
            LogicalPlan::Copy(_) => Err(refused("COPY")),
            LogicalPlan::DescribeTable(_) => Err(refused("DESCRIBE")),
            LogicalPlan::Extension(_) => Err(refused("an extension plan node")),
        }
    }

    /// The final output: every row-level column must be releasable, and no
    /// aggregation-only dataset may leave row by row.
    pub fn output(&self, plan: &LogicalPlan, lineage: &NodeLineage) -> Checked<()> {
        let rows_forbidden = lineage
            .unaggregated
            .iter()
            .find(|d| !self.grants[*d].rows_allowed);
        if let Some(dataset) = rows_forbidden {
            let grant = &self.grants[dataset];
            return Err(Denial::forbidden(
                format!("{}.aggregation", grant.rule),
                format!(
                    "dataset `{dataset}` releases only aggregates over groups of at least {} distinct privacy units; this query returns its rows one by one (use GROUP BY with count/sum/avg)",
                    grant.min_group_size.unwrap_or_default()
                ),
            ));
        }
        for (field, column) in plan.schema().fields().iter().zip(&lineage.columns) {
            self.require_released(column, &format!("output column `{}`", field.name()))?;
        }
        Ok(())
    }

    /// A value that leaves (or orders what leaves): row-level values need
    /// output visibility, group keys group-by visibility; aggregates and
    /// constants have passed their checks already.
    fn require_released(&self, lineage: &Lineage, what: &str) -> Checked<()> {
        match lineage.level {
            Level::Row => self.require_use(lineage, Use::Output, what),
            Level::GroupKey => self.require_use(lineage, Use::GroupKey, what),
            Level::Aggregated | Level::Constant => Ok(()),
        }
    }

    fn scan(&self, scan: &datafusion_expr::logical_plan::TableScan) -> Checked<NodeLineage> {
        let dataset = scan.table_name.table().to_string();
        if !self.policy.datasets.contains_key(&dataset) {
            return Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                format!(
                    "table `{}` is not published in the usage policy",
                    scan.table_name
                ),
            ));
        }
        let Some(grant) = self.grants.get(&dataset) else {
            return Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                format!("no grant gives you dataset `{dataset}`"),
            ));
        };
        let columns = scan
            .projected_schema
            .fields()
            .iter()
            .map(|f| {
                Lineage::of_source(Source {
                    dataset: dataset.clone(),
                    column: f.name().clone(),
                })
            })
            .collect();
        let mut lineage = NodeLineage {
            columns,
            scans: vec![dataset.clone()],
            ..NodeLineage::default()
        };
        if grant.min_group_size.is_some() {
            lineage.unaggregated.insert(dataset);
        }
        let scan_plan = LogicalPlan::TableScan(scan.clone());
        for filter in &scan.filters {
            self.condition(filter, &scan_plan, &lineage)?;
        }
        Ok(lineage)
    }

    fn aggregate(&self, aggregate: &Aggregate) -> Checked<NodeLineage> {
        let input = self.node(&aggregate.input)?;
        self.refuse_position_selected(&input)?;
        if input.aggregated {
            return Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                "an aggregate over the result of another aggregate is refused",
            ));
        }
        let mut columns = Vec::new();
        for group in &aggregate.group_expr {
            if let Expr::GroupingSet(set) = group {
                self.require_construct(
                    &input.scans,
                    Construct::GroupingSets,
                    "GROUPING SETS / ROLLUP / CUBE",
                )?;
                for expr in set.distinct_expr() {
                    columns.push(self.group_key(expr, &aggregate.input, &input)?);
                }
            } else {
                columns.push(self.group_key(group, &aggregate.input, &input)?);
            }
        }
        // Grouping sets add an internal grouping id after the keys.
        let keys_in_schema = aggregate.schema.fields().len() - aggregate.aggr_expr.len();
        columns.resize(keys_in_schema.max(columns.len()), Lineage::default());
        for expr in &aggregate.aggr_expr {
            columns.push(self.aggregate_value(expr, &aggregate.input, &input)?);
        }
        Ok(NodeLineage {
            columns,
            scans: input.scans,
            aggregated: true,
            ..NodeLineage::default()
        })
    }

    fn group_key(
        &self,
        expr: &Expr,
        input_plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let mut lineage = self.value(expr, input_plan, input)?;
        self.require_use(&lineage, Use::GroupKey, "GROUP BY key")?;
        if lineage.level == Level::Row {
            lineage.level = Level::GroupKey;
        }
        Ok(lineage)
    }

    fn aggregate_value(
        &self,
        expr: &Expr,
        input_plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let function = match expr {
            Expr::Alias(alias) => return self.aggregate_value(&alias.expr, input_plan, input),
            Expr::AggregateFunction(function) => function,
            other => {
                return Err(refused(&format!(
                    "the expression `{other}` in an aggregate position"
                )));
            }
        };
        let AggregateFunction { func, params } = function;
        let name = func.name().to_ascii_lowercase();
        if params.filter.is_some() {
            return Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                format!(
                    "`{name}(…) FILTER (WHERE …)` is a conditional aggregate; aggregates run over plain columns only"
                ),
            ));
        }
        if !params.order_by.is_empty() {
            return Err(refused(&format!("ORDER BY inside `{name}`")));
        }
        let mut lineage = Lineage {
            level: Level::Aggregated,
            is_count: name == "count",
            ..Lineage::default()
        };
        let schema = input_plan.schema();
        for argument in &params.args {
            match strip_plain(argument, schema) {
                Expr::Literal(..) => {}
                Expr::Column(column) => {
                    let source = self.lineage_of(column, input_plan, input)?;
                    if source.level != Level::Row || source.plain.is_none() {
                        return Err(Denial::forbidden(
                            DENY_BY_DEFAULT,
                            format!(
                                "`{name}` must aggregate a plain dataset column; `{column}` is computed"
                            ),
                        ));
                    }
                    // Under dp only noisy statistics leave (median and
                    // quantiles from declared candidates); min/max are
                    // refused by the DP planner.
                    let private = source
                        .sources
                        .iter()
                        .all(|c| self.grants[&c.dataset].dp.is_some());
                    if VALUE_REVEALING_AGGREGATES.contains(&name.as_str()) && !private {
                        self.require_value_revealing(source, &name)?;
                    }
                    // Under dp, counting distinct privacy units is the
                    // canonical noisy statistic, even of a hidden unit.
                    let counts_units =
                        name == "count" && params.distinct && self.is_private_unit(source);
                    if !counts_units {
                        self.require_use(
                            source,
                            Use::AggregateArgument,
                            &format!("argument of `{name}`"),
                        )?;
                    }
                    lineage.sources.extend(source.sources.iter().cloned());
                }
                other => {
                    return Err(Denial::forbidden(
                        DENY_BY_DEFAULT,
                        format!(
                            "aggregates run over plain columns only; `{name}({other})` aggregates an expression (conditional sums like SUM(CASE …) single out rows)"
                        ),
                    ));
                }
            }
        }
        // count(*) reads no column: every scanned dataset must allow it.
        let datasets = if lineage.sources.is_empty() {
            input.scans.iter().collect()
        } else {
            datasets_of(&lineage)
        };
        for dataset in datasets {
            let grant = &self.grants[dataset];
            if !grant.aggregates.contains(&name) {
                return Err(Denial::forbidden(
                    format!("{}.functions.aggregate", grant.rule),
                    format!(
                        "aggregate function `{name}` is not allowed on dataset `{dataset}` (allowed: {})",
                        list(&grant.aggregates)
                    ),
                ));
            }
        }
        Ok(lineage)
    }

    /// Whether `source` is the privacy unit of a dataset granted under dp.
    fn is_private_unit(&self, source: &Lineage) -> bool {
        source.plain.as_ref().is_some_and(|plain| {
            self.grants[&plain.dataset].dp.is_some()
                && self.policy.datasets[&plain.dataset].privacy_unit.as_deref()
                    == Some(plain.column.as_str())
        })
    }

    /// Picking rows by position before they are aggregated isolates single
    /// rows of a dataset whose aggregates are protected by k (the sum over
    /// rows 1–11 minus the sum over rows 1–10 is row 11's value).
    fn refuse_position_selected(&self, input: &NodeLineage) -> Checked<()> {
        if let Some(dataset) = input.position_selected.iter().next() {
            let grant = &self.grants[dataset];
            return Err(Denial::forbidden(
                format!("{}.aggregation", grant.rule),
                format!(
                    "LIMIT / OFFSET on rows of dataset `{dataset}` before they are aggregated picks individual rows; apply it to the aggregated result"
                ),
            ));
        }
        Ok(())
    }

    /// MIN, MAX and friends return one row's value: allowed only where that
    /// value could leave anyway (raw or masked, no aggregation requirement).
    fn require_value_revealing(&self, source: &Lineage, name: &str) -> Checked<()> {
        for column in &source.sources {
            let grant = &self.grants[&column.dataset];
            let visibility = grant.visibility(&column.column);
            let rows_withheld = grant.min_group_size.is_some() && !grant.rows_allowed;
            if rows_withheld || !Use::Output.admits(&visibility) {
                return Err(Denial::forbidden(
                    format!("{}.columns.{}", grant.rule, column.column),
                    format!(
                        "`{name}` returns a single row's value, and column `{column}` (`{visibility}` for you) may not leave row by row"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn join(&self, join: &Join) -> Checked<NodeLineage> {
        let left = self.node(&join.left)?;
        let right = self.node(&join.right)?;
        if left.scans.is_empty() || right.scans.is_empty() {
            return Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                "a join with an inline table (VALUES or a constant subquery) is refused: it is a membership test",
            ));
        }
        let kind = match join.join_type {
            JoinType::Inner => JoinKind::Inner,
            JoinType::Left => JoinKind::Left,
            JoinType::Right => JoinKind::Right,
            JoinType::Full => JoinKind::Full,
            other => {
                return Err(Denial::forbidden(
                    DENY_BY_DEFAULT,
                    format!(
                        "{other} joins are refused: semi and anti joins (EXISTS, IN, EXCEPT, INTERSECT) act as membership oracles"
                    ),
                ));
            }
        };
        let shared: Vec<&String> = left
            .scans
            .iter()
            .filter(|d| right.scans.contains(d))
            .collect();
        if let Some(dataset) = shared.first() {
            let grant = &self.grants[*dataset];
            if !grant.allow.contains(&Construct::SelfJoin) {
                return Err(Denial::forbidden(
                    format!("{}.allow", grant.rule),
                    format!(
                        "a join of dataset `{dataset}` with itself is refused unless the grant allows `self_join`"
                    ),
                ));
            }
        }
        let pairs = self.join_keys(join, &left, &right)?;
        if pairs.is_empty() {
            return Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                "a join without equality keys (a cross join) is refused; join with ON a.key = b.key",
            ));
        }
        for (l, r) in &pairs {
            self.require_join_grant(l, r, kind)?;
        }
        let mut out = NodeLineage {
            columns: left.columns,
            scans: left.scans,
            unaggregated: left.unaggregated,
            position_selected: left.position_selected,
            aggregated: left.aggregated || right.aggregated,
        };
        out.columns.extend(right.columns);
        out.scans.extend(right.scans);
        out.unaggregated.extend(right.unaggregated);
        out.position_selected.extend(right.position_selected);
        Ok(out)
    }

    /// The equality key pairs of a join, whether planned into `on` or still
    /// in the join filter; anything else in the condition is refused.
    fn join_keys(
        &self,
        join: &Join,
        left: &NodeLineage,
        right: &NodeLineage,
    ) -> Checked<Vec<(Source, Source)>> {
        let mut pairs = Vec::new();
        for (l, r) in &join.on {
            pairs.push(self.key_pair(l, r, join, left, right)?);
        }
        if let Some(filter) = &join.filter {
            for conjunct in split_conjunction(filter) {
                let Expr::BinaryExpr(BinaryExpr {
                    left: l,
                    op: Operator::Eq,
                    right: r,
                }) = conjunct
                else {
                    return Err(Denial::forbidden(
                        DENY_BY_DEFAULT,
                        format!(
                            "join conditions must be equalities of plain columns; `{conjunct}` is not"
                        ),
                    ));
                };
                pairs.push(self.key_pair(l, r, join, left, right)?);
            }
        }
        Ok(pairs)
    }

    fn key_pair(
        &self,
        l: &Expr,
        r: &Expr,
        join: &Join,
        left: &NodeLineage,
        right: &NodeLineage,
    ) -> Checked<(Source, Source)> {
        let plain = |expr: &Expr, plan: &LogicalPlan, lineage: &NodeLineage| -> Option<Source> {
            let Expr::Column(column) = strip_plain(expr, plan.schema()) else {
                return None;
            };
            lineage.column(plan, column)?.plain.clone()
        };
        let direct = plain(l, &join.left, left).zip(plain(r, &join.right, right));
        let swapped = || plain(r, &join.left, left).zip(plain(l, &join.right, right));
        direct.or_else(swapped).ok_or_else(|| {
            Denial::forbidden(
                DENY_BY_DEFAULT,
                format!("join keys must be plain dataset columns; `{l} = {r}` computes a key (arithmetic join conditions are refused)"),
            )
        })
    }

    fn require_join_grant(&self, l: &Source, r: &Source, kind: JoinKind) -> Checked<()> {
        let listed = |from: &Source, to: &Source| {
            self.grants[&from.dataset].joins.iter().any(|j| {
                j.dataset == to.dataset
                    && j.types.contains(&kind)
                    && j.on
                        .iter()
                        .any(|[a, b]| *a == from.column && *b == to.column)
            })
        };
        let ok_left =
            listed(l, r) || (self.grants[&l.dataset].min_group_size.is_none() && listed(r, l));
        let ok_right =
            listed(r, l) || (self.grants[&r.dataset].min_group_size.is_none() && listed(l, r));
        if ok_left && ok_right {
            return Ok(());
        }
        let grant = if ok_left {
            &self.grants[&r.dataset]
        } else {
            &self.grants[&l.dataset]
        };
        Err(Denial::forbidden(
            format!("{}.joins", grant.rule),
            format!("a {kind:?} join of `{l}` with `{r}` is not allowed by any join grant")
                .to_lowercase(),
        ))
    }

    /// Checks a value expression and returns its lineage; how the value is
    /// used (output, key, condition) is checked by the caller.
    fn value(&self, expr: &Expr, plan: &LogicalPlan, input: &NodeLineage) -> Checked<Lineage> {
        match expr {
            Expr::Column(column) => self.lineage_of(column, plan, input).cloned(),
            Expr::Alias(alias) => self.value(&alias.expr, plan, input),
            Expr::Literal(..) => Ok(Lineage::default()),
            Expr::Cast(cast) => {
                // Checked first: the operand may hide a subquery.
                let inner = self.value(&cast.expr, plan, input)?;
                if inner.sources.is_empty() {
                    // A cast of a constant cannot fail on data.
                    return Ok(inner);
                }
                if !is_lossless_cast(cast, plan.schema()) && !cannot_fail(cast, plan.schema()) {
                    return Err(Denial::forbidden(
                        DENY_BY_DEFAULT,
                        format!(
                            "`{expr}` can fail on some values, and a data-dependent error is a side channel; use TRY_CAST"
                        ),
                    ));
                }
                let plain = inner
                    .plain
                    .clone()
                    .filter(|_| is_lossless_cast(cast, plan.schema()));
                self.no_masked_transform(
                    &inner,
                    &format!("CAST to {}", cast.field.data_type()),
                    plain.is_some(),
                )?;
                Ok(Lineage { plain, ..inner })
            }
            Expr::TryCast(cast) => {
                let inner = self.value(&cast.expr, plan, input)?;
                self.no_masked_transform(&inner, "TRY_CAST", false)?;
                Ok(Lineage {
                    plain: None,
                    ..inner
                })
            }
            Expr::ScalarFunction(function) => {
                let name = function.name().to_ascii_lowercase();
                let args = function
                    .args
                    .iter()
                    .map(|a| self.value(a, plan, input))
                    .collect::<Checked<Vec<_>>>()?;
                let lineage = Lineage::derived(&args);
                for arg in &args {
                    self.no_masked_transform(arg, &format!("function `{name}`"), false)?;
                }
                self.require_function(&lineage, &name)?;
                Ok(lineage)
            }
            Expr::BinaryExpr(binary) => self.binary(binary, plan, input),
            Expr::Negative(inner) => {
                let lineage = self.value(inner, plan, input)?;
                Ok(Lineage {
                    plain: None,
                    is_count: false,
                    ..lineage
                })
            }
            Expr::Case(case) => {
                let mut parts = Vec::new();
                for (when, then) in &case.when_then_expr {
                    // `CASE x WHEN v` compares x = v.
                    let condition = match &case.expr {
                        Some(base) => base.as_ref().clone().eq(when.as_ref().clone()),
                        None => when.as_ref().clone(),
                    };
                    parts.push(self.condition_value(&condition, plan, input)?);
                    parts.push(self.value(then, plan, input)?);
                }
                if let Some(otherwise) = &case.else_expr {
                    parts.push(self.value(otherwise, plan, input)?);
                }
                Ok(Lineage::derived(&parts))
            }
            Expr::Like(_)
            | Expr::SimilarTo(_)
            | Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Between(_)
            | Expr::InList(_) => self.condition_value(expr, plan, input),
            Expr::AggregateFunction(_) => {
                Err(refused(&format!("the aggregate `{expr}` outside GROUP BY")))
            }
            Expr::WindowFunction(_) => Err(refused("a window function outside a window")),
            Expr::Exists(_)
            | Expr::InSubquery(_)
            | Expr::SetComparison(_)
            | Expr::ScalarSubquery(_) => Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                "subquery expressions (EXISTS, IN (SELECT …), scalar subqueries) are refused: they act as membership oracles; use a JOIN that a grant allows",
            )),
            Expr::Placeholder(p) => Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                format!("parameter `{}` has no value", p.id),
            )),
            Expr::GroupingSet(_) => Err(refused("GROUPING SETS")),
            Expr::ScalarVariable(..) => Err(refused("session variables")),
            Expr::OuterReferenceColumn(..) => Err(refused("a correlated column reference")),
            Expr::Unnest(_) => Err(refused("UNNEST")),
            #[allow(unreachable_patterns)]
            other => Err(refused(&format!("the expression kind of `{other}`"))),
        }
    }

    /// A boolean condition used in WHERE, HAVING, CASE WHEN or a join.
    fn condition(&self, predicate: &Expr, plan: &LogicalPlan, input: &NodeLineage) -> Checked<()> {
        self.condition_value(predicate, plan, input).map(|_| ())
    }

    /// Checks a condition: every column it reads must admit `Use::Filter`,
    /// every comparison must be allowed, and the privacy unit is never
    /// compared with a value.
    fn condition_value(
        &self,
        expr: &Expr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let (operator, operands): (&str, Vec<&Expr>) = match expr {
            Expr::BinaryExpr(b) if comparison_name(b.op).is_some() => (
                comparison_name(b.op).unwrap_or_default(),
                vec![&b.left, &b.right],
            ),
            Expr::Like(like) => (
                if like.negated { "not_like" } else { "like" },
                vec![&like.expr, &like.pattern],
            ),
            Expr::SimilarTo(_) => return Err(refused("SIMILAR TO")),
            Expr::Not(inner) => ("not", vec![inner]),
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => ("is_null", vec![inner]),
            Expr::IsTrue(inner)
            | Expr::IsFalse(inner)
            | Expr::IsNotTrue(inner)
            | Expr::IsNotFalse(inner)
            | Expr::IsUnknown(inner)
            | Expr::IsNotUnknown(inner) => ("=", vec![inner]),
            Expr::Between(between) => {
                let op = if between.negated { "not" } else { "between" };
                (op, vec![&between.expr, &between.low, &between.high])
            }
            Expr::InList(in_list) => {
                let op = if in_list.negated { "not_in" } else { "in" };
                let mut operands = vec![in_list.expr.as_ref()];
                operands.extend(in_list.list.iter());
                (op, operands)
            }
            other => {
                // A value used as a condition (a boolean column, a function).
                let lineage = self.value(other, plan, input)?;
                self.require_use(&lineage, Use::Filter, "condition")?;
                return Ok(lineage);
            }
        };
        let mut parts = Vec::new();
        for operand in &operands {
            let lineage = if is_condition(operand) {
                self.condition_value(operand, plan, input)?
            } else {
                self.value(operand, plan, input)?
            };
            if lineage.level == Level::Row || lineage.level == Level::GroupKey {
                self.require_use(&lineage, Use::Filter, "condition")?;
            }
            parts.push(lineage);
        }
        let lineage = Lineage::derived(&parts);
        self.require_comparison(&lineage, operator, expr)?;
        if !matches!(operator, "and" | "or" | "not") {
            self.refuse_unit_comparison(&parts)?;
        }
        Ok(Lineage {
            plain: None,
            is_count: false,
            ..lineage
        })
    }

    fn binary(
        &self,
        binary: &BinaryExpr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        if comparison_name(binary.op).is_some() {
            return self.condition_value(&Expr::BinaryExpr(binary.clone()), plan, input);
        }
        let left = self.value(&binary.left, plan, input)?;
        let right = self.value(&binary.right, plan, input)?;
        match binary.op {
            Operator::Plus | Operator::Minus | Operator::Multiply => {}
            Operator::Divide | Operator::Modulo => {
                let schema = plan.schema();
                let float = matches!(
                    Expr::BinaryExpr(binary.clone()).get_type(schema),
                    Ok(DataType::Float16 | DataType::Float32 | DataType::Float64)
                );
                if !float && !is_nonzero_literal(&binary.right) {
                    return Err(Denial::forbidden(
                        DENY_BY_DEFAULT,
                        format!(
                            "`{binary}` divides integers by a column: a division by zero would be a data-dependent error (a side channel); divide by a non-zero literal or cast to DOUBLE"
                        ),
                    ));
                }
            }
            Operator::StringConcat => {
                self.require_function(&Lineage::derived([&left, &right]), "concat")?;
            }
            other => return Err(refused(&format!("the operator `{other}`"))),
        }
        for side in [&left, &right] {
            self.no_masked_transform(side, &format!("operator `{}`", binary.op), false)?;
        }
        Ok(Lineage {
            plain: None,
            is_count: false,
            ..Lineage::derived([&left, &right])
        })
    }

    fn window_value(
        &self,
        expr: &Expr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let Expr::WindowFunction(window) = strip_alias(expr) else {
            return Err(refused(&format!("`{expr}` in a window")));
        };
        if window.params.filter.is_some() {
            return Err(refused("FILTER (WHERE …) in a window function"));
        }
        let mut parts = Vec::new();
        for arg in &window.params.args {
            parts.push(self.value(arg, plan, input)?);
        }
        for key in &window.params.partition_by {
            parts.push(self.value(key, plan, input)?);
        }
        for key in &window.params.order_by {
            parts.push(self.value(&key.expr, plan, input)?);
        }
        let mut lineage = Lineage::derived(&parts);
        lineage.level = lineage.level.max(Level::Row);
        Ok(lineage)
    }

    fn lineage_of<'n>(
        &self,
        column: &Column,
        plan: &LogicalPlan,
        input: &'n NodeLineage,
    ) -> Checked<&'n Lineage> {
        input.column(plan, column).ok_or_else(|| {
            Denial::forbidden(
                DENY_BY_DEFAULT,
                format!("column `{column}` cannot be traced to a dataset column"),
            )
        })
    }

    /// Every dataset column behind `lineage` must admit `usage`.
    fn require_use(&self, lineage: &Lineage, usage: Use, what: &str) -> Checked<()> {
        for source in &lineage.sources {
            let grant = &self.grants[&source.dataset];
            let visibility = grant.visibility(&source.column);
            if !usage.admits(&visibility) {
                return Err(Denial::forbidden(
                    format!("{}.columns.{}", grant.rule, source.column),
                    format!(
                        "column `{source}` is `{visibility}` for you and cannot be {} ({what})",
                        usage.describe()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Masked values may be grouped, counted and compared, but not taken
    /// apart: a function over a masked column could undo the mask.
    fn no_masked_transform(&self, lineage: &Lineage, what: &str, lossless: bool) -> Checked<()> {
        if lossless {
            return Ok(());
        }
        for source in &lineage.sources {
            let grant = &self.grants[&source.dataset];
            match grant.visibility(&source.column) {
                Visibility::Masked(_) | Visibility::Hidden => {
                    return Err(Denial::forbidden(
                        format!("{}.columns.{}", grant.rule, source.column),
                        format!(
                            "{what} is not allowed on column `{source}`, which is `{}` for you",
                            grant.visibility(&source.column)
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn require_function(&self, lineage: &Lineage, name: &str) -> Checked<()> {
        for dataset in datasets_of(lineage) {
            let grant = &self.grants[dataset];
            if !grant.scalars.contains(name) {
                return Err(Denial::forbidden(
                    format!("{}.functions.scalar", grant.rule),
                    format!(
                        "function `{name}` is not allowed on dataset `{dataset}` (allowed: {})",
                        list(&grant.scalars)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn require_comparison(&self, lineage: &Lineage, operator: &str, expr: &Expr) -> Checked<()> {
        for dataset in datasets_of(lineage) {
            let grant = &self.grants[dataset];
            if !grant.comparisons.contains(operator) {
                return Err(Denial::forbidden(
                    format!("{}.comparisons", grant.rule),
                    format!(
                        "comparison `{operator}` is not allowed on dataset `{dataset}` (allowed: {}); in `{}`",
                        list(&grant.comparisons),
                        describe_columns(expr)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Literal comparisons on the privacy unit single out one person.
    fn refuse_unit_comparison(&self, operands: &[Lineage]) -> Checked<()> {
        // An aggregate of the unit (count of distinct cards) is not the unit.
        for operand in operands.iter().filter(|o| o.level != Level::Aggregated) {
            for source in &operand.sources {
                let unit = self.policy.datasets[&source.dataset]
                    .privacy_unit
                    .as_deref();
                if unit == Some(source.column.as_str()) {
                    return Err(Denial::forbidden(
                        format!("datasets.{}.privacy_unit", source.dataset),
                        format!(
                            "column `{source}` is the privacy unit: comparing it with a value singles out one unit and is always refused"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// HAVING count < n, count <= n or count = n selects small groups; k
    /// suppression already hides groups below k, and bounding counts from
    /// above is refused so that suppression is not probed.
    fn refuse_small_count_filter(
        &self,
        predicate: &Expr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<()> {
        for conjunct in split_any(predicate) {
            let Expr::BinaryExpr(b) = conjunct else {
                continue;
            };
            let is_count = |e: &Expr| match strip_plain(e, plan.schema()) {
                Expr::Column(c) => input.column(plan, c).is_some_and(|l| l.is_count),
                _ => false,
            };
            let upper_bound = matches!(
                (is_count(&b.left), b.op, is_count(&b.right)),
                (true, Operator::Lt | Operator::LtEq | Operator::Eq, _)
                    | (_, Operator::Gt | Operator::GtEq | Operator::Eq, true)
            );
            if upper_bound {
                return Err(Denial::forbidden(
                    DENY_BY_DEFAULT,
                    format!(
                        "`{conjunct}`: HAVING may not bound a count from above (it singles out small groups)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn require_construct(
        &self,
        datasets: &[String],
        construct: Construct,
        what: &str,
    ) -> Checked<()> {
        if datasets.is_empty() {
            return Ok(());
        }
        for dataset in datasets {
            let grant = &self.grants[dataset];
            if !grant.allow.contains(&construct) {
                return Err(Denial::forbidden(
                    format!("{}.allow", grant.rule),
                    format!(
                        "{what} on dataset `{dataset}` is refused unless the grant allows `{construct}`"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The datasets whose columns flow into a value, each once.
fn datasets_of(lineage: &Lineage) -> BTreeSet<&String> {
    lineage.sources.iter().map(|s| &s.dataset).collect()
}

fn refused(what: &str) -> Denial {
    Denial::forbidden(
        DENY_BY_DEFAULT,
        format!("{what} is not allowed by any rule"),
    )
}

fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => strip_alias(&alias.expr),
        other => other,
    }
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// The column names an expression reads, for messages (never values).
fn describe_columns(expr: &Expr) -> String {
    let names: BTreeSet<String> = expr.column_refs().iter().map(|c| c.name.clone()).collect();
    format!(
        "a condition on {}",
        names.into_iter().collect::<Vec<_>>().join(", ")
    )
}

fn comparison_name(op: Operator) -> Option<&'static str> {
    Some(match op {
        Operator::Eq | Operator::IsNotDistinctFrom => "=",
        Operator::NotEq | Operator::IsDistinctFrom => "<>",
        Operator::Lt => "<",
        Operator::LtEq => "<=",
        Operator::Gt => ">",
        Operator::GtEq => ">=",
        Operator::And => "and",
        Operator::Or => "or",
        Operator::RegexMatch
        | Operator::RegexIMatch
        | Operator::RegexNotMatch
        | Operator::RegexNotIMatch => "regex",
        Operator::LikeMatch | Operator::ILikeMatch => "like",
        Operator::NotLikeMatch | Operator::NotILikeMatch => "not_like",
        _ => return None,
    })
}

fn is_condition(expr: &Expr) -> bool {
    match expr {
        Expr::BinaryExpr(b) => comparison_name(b.op).is_some(),
        Expr::Like(_)
        | Expr::Not(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::Between(_)
        | Expr::InList(_) => true,
        _ => false,
    }
}

fn split_conjunction(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut out = split_conjunction(left);
            out.extend(split_conjunction(right));
            out
        }
        other => vec![other],
    }
}

/// Every comparison under AND/OR/NOT.
fn split_any(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And | Operator::Or,
            right,
        }) => {
            let mut out = split_any(left);
            out.extend(split_any(right));
            out
        }
        Expr::Not(inner) => split_any(inner),
        other => vec![other],
    }
}

fn is_nonzero_literal(expr: &Expr) -> bool {
    match strip_alias(expr) {
        Expr::Literal(value, _) => !value.is_null() && !is_zero(value),
        Expr::Cast(cast) => is_nonzero_literal(&cast.expr),
        _ => false,
    }
}

fn is_zero(value: &ScalarValue) -> bool {
    ScalarValue::new_zero(&value.data_type()).is_ok_and(|zero| zero == *value)
}

/// A cast that keeps every value: same type, integer widening, integer to
/// float64, float widening, any string view to another string type.
pub fn is_lossless_cast(cast: &Cast, schema: &DFSchema) -> bool {
    use DataType::*;
    let Ok(from) = cast.expr.get_type(schema) else {
        return false;
    };
    let to = cast.field.data_type();
    if from == *to {
        return true;
    }
    let rank = |t: &DataType| match t {
        Int8 => Some((0, 1)),
        Int16 => Some((0, 2)),
        Int32 => Some((0, 3)),
        Int64 => Some((0, 4)),
        UInt8 => Some((1, 1)),
        UInt16 => Some((1, 2)),
        UInt32 => Some((1, 3)),
        UInt64 => Some((1, 4)),
        Float32 => Some((2, 3)),
        Float64 => Some((2, 4)),
        _ => None,
    };
    match (rank(&from), rank(to)) {
        (Some((a, x)), Some((b, y))) if a == b => y >= x,
        (Some((0 | 1, _)), Some((2, 4))) => true,
        (Some((1, x)), Some((0, y))) => y > x,
        _ => {
            matches!(
                (&from, to),
                (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View)
                    | (Date32, Date64 | Timestamp(..))
                    | (Null, _)
            ) || finer_timestamp(&from, to)
        }
    }
}

/// A timestamp to a finer unit in the same time zone: what type coercion
/// inserts to compare a column with a literal. (Only instants past the year
/// 2262 overflow nanoseconds.)
fn finer_timestamp(from: &DataType, to: &DataType) -> bool {
    let rank = |unit: &datafusion_common::arrow::datatypes::TimeUnit| {
        use datafusion_common::arrow::datatypes::TimeUnit::*;
        match unit {
            Second => 0,
            Millisecond => 1,
            Microsecond => 2,
            Nanosecond => 3,
        }
    };
    matches!((from, to), (DataType::Timestamp(a, tz_a), DataType::Timestamp(b, tz_b)) if tz_a == tz_b && rank(b) >= rank(a))
}

/// A cast that may lose precision but never errors: anything to a string,
/// numbers to Float64.
fn cannot_fail(cast: &Cast, schema: &DFSchema) -> bool {
    let to = cast.field.data_type();
    let Ok(from) = cast.expr.get_type(schema) else {
        return false;
    };
    let binary = matches!(
        from,
        DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
    );
    (!binary
        && matches!(
            to,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ))
        || (from.is_numeric() && matches!(to, DataType::Float64 | DataType::Float32))
        || (matches!(from, DataType::Timestamp(..))
            && matches!(to, DataType::Timestamp(..) | DataType::Date32))
}
