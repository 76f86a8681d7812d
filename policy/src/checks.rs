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
use datafusion_expr::expr::{AggregateFunction, Case, Cast};
use datafusion_expr::logical_plan::{Aggregate, Distinct, Join, JoinType, Sort};
use datafusion_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};

use crate::Denial;
pub use crate::casts::is_lossless_cast;
use crate::compile::{DatasetGrant, PolicySet};
use crate::document::{Construct, JoinKind, Visibility};
use crate::lineage::{CountOrder, Level, Lineage, NodeLineage, Source, strip_plain};

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

/// Aggregates whose value grows with the rows (or distinct values) of a
/// group: bounding one from above selects small groups. `sum` counts too:
/// `sum(1)` is `count(*)`, and a sum of a column that is always 1 (or any
/// positive value) grows with the rows just the same.
pub const COUNT_LIKE_AGGREGATES: &[&str] = &["count", "sum", "approx_distinct", "regr_count"];

/// Aggregates whose value grows with the group in another form (the length
/// of a list): a filter on anything computed from them may select small
/// groups (`array_length(array_agg(x)) < 3`), and no bound on them is a
/// plain lower bound on a count.
const GROWING_AGGREGATES: &[&str] = &["array_agg", "string_agg"];

/// Which outcome of a condition a query selects on. A comparison under
/// `NOT` selects the rows where it is false, so it means its complement:
/// `NOT (x = 'a')` is `x <> 'a'`, whatever the spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polarity {
    /// The rows where the condition holds (`WHERE x = 'a'`).
    Positive,
    /// The rows where it does not: under `NOT`, `IS NOT TRUE`, `IS FALSE`,
    /// `= false`, `<> true`, or a later `CASE` branch or `ELSE`.
    Negative,
    /// Both outcomes show: the condition is used as a value (a cast, a
    /// function argument, a `CASE` result or condition inside a value, a
    /// group key, an output column, a comparison with another condition,
    /// `IS [NOT] UNKNOWN`, `IS [NOT] NULL`).
    Both,
}

impl Polarity {
    fn flip(self) -> Self {
        match self {
            Polarity::Positive => Polarity::Negative,
            Polarity::Negative => Polarity::Positive,
            Polarity::Both => Polarity::Both,
        }
    }

    /// Flipped when the SQL spells a negation (`<>`, `NOT IN`, …).
    fn negated_if(self, negated: bool) -> Self {
        if negated { self.flip() } else { self }
    }
}

/// What a comparison means where it selects the rows it does not match,
/// by De Morgan for `and` and `or`; `between` has no named complement
/// (only `not`).
fn complement(comparison: &str) -> Option<&'static str> {
    Some(match comparison {
        "=" => "<>",
        "<" => ">=",
        "<=" => ">",
        ">" => "<=",
        ">=" => "<",
        "in" => "not_in",
        "like" => "not_like",
        "is_null" => "is_null",
        "regex" => "regex",
        "and" => "or",
        "or" => "and",
        _ => return None,
    })
}

/// Whether `allowed` admits `comparison` under `polarity`: where it is
/// negated, its complement or `not` (with the comparison itself) must be
/// allowed; used as a value, both the comparison and its negation.
fn comparison_allowed(allowed: &BTreeSet<String>, comparison: &str, polarity: Polarity) -> bool {
    let has = |name: &str| allowed.contains(name);
    let negation = || complement(comparison).is_some_and(has) || has("not");
    match polarity {
        Polarity::Positive => has(comparison),
        Polarity::Negative => {
            complement(comparison).is_some_and(has) || (has("not") && has(comparison))
        }
        Polarity::Both => has(comparison) && negation(),
    }
}

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
                let mut input = self.node(&filter.input)?;
                self.condition(&filter.predicate, &filter.input, &input)?;
                if input.aggregated {
                    self.refuse_count_upper_bounds(&filter.predicate, &filter.input, &input)?;
                }
                let reads = row_reads(&filter.predicate, &filter.input, &input);
                input.condition_reads.extend(reads);
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
                input.count_order = self.count_order(sort, &input)?;
                if sort.fetch.is_some() {
                    refuse_limit_by_count(input.count_order.as_ref(), None)?;
                }
                Ok(input)
            }
            LogicalPlan::Limit(limit) => {
                let mut input = self.node(&limit.input)?;
                refuse_limit_by_count(input.count_order.as_ref(), limit.skip.as_deref())?;
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
                    merged.row_level.extend(branch.row_level);
                    merged.condition_reads.extend(branch.condition_reads);
                }
                merged.count_order = None;
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
        self.refuse_conditions_beside_rows(lineage)
    }

    /// Where rows leave, a condition on a column that may not leave would
    /// show its value row by row (which rows come back): a `filter_only` or
    /// `group_by_only` column may narrow aggregates only. This holds across
    /// datasets: a condition on one dataset's column while another
    /// dataset's rows leave singles out rows just the same.
    fn refuse_conditions_beside_rows(&self, lineage: &NodeLineage) -> Checked<()> {
        if lineage.row_level.is_empty() {
            return Ok(());
        }
        for source in &lineage.condition_reads {
            let grant = &self.grants[&source.dataset];
            let visibility = grant.visibility(&source.column);
            if Use::Output.admits(&visibility) {
                continue;
            }
            let rows: Vec<String> = lineage.row_level.iter().map(|d| format!("`{d}`")).collect();
            return Err(Denial::forbidden(
                format!("{}.columns.{}", grant.rule, source.column),
                format!(
                    "column `{source}` is `{visibility}` for you: a condition on it may narrow aggregates, but this query returns rows of {} one by one, and which rows come back would show its value row by row; aggregate the result (GROUP BY with count/sum/avg) or drop the condition",
                    rows.join(", ")
                ),
            ));
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
            lineage.unaggregated.insert(dataset.clone());
        }
        lineage.row_level.insert(dataset);
        let scan_plan = LogicalPlan::TableScan(scan.clone());
        for filter in &scan.filters {
            self.condition(filter, &scan_plan, &lineage)?;
            let reads = row_reads(filter, &scan_plan, &lineage);
            lineage.condition_reads.extend(reads);
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
        // Groups of at least k ≥ 2 units (or noisy ones) stand for no single
        // row; without such a dataset in the aggregate, its groups can be
        // single rows, which still leave one by one.
        let protected = input.row_level.iter().any(|d| self.aggregates_protect(d));
        Ok(NodeLineage {
            columns,
            scans: input.scans,
            aggregated: true,
            row_level: if protected {
                BTreeSet::new()
            } else {
                input.row_level
            },
            condition_reads: input.condition_reads,
            ..NodeLineage::default()
        })
    }

    /// Whether an aggregate over `dataset` keeps single rows from leaving:
    /// every group holds at least 2 privacy units, or the result is noisy.
    fn aggregates_protect(&self, dataset: &str) -> bool {
        let grant = &self.grants[dataset];
        grant.dp.is_some() || grant.min_group_size.is_some_and(|k| k >= 2)
    }

    /// Whether the plan reads a dataset under differential privacy (then
    /// every released value is noisy, and ordering it is post-processing).
    fn is_private(&self, scans: &[String]) -> bool {
        scans.iter().any(|d| self.grants[d].dp.is_some())
    }

    /// How `sort` orders aggregated rows by a count-like key, if it does.
    fn count_order(&self, sort: &Sort, input: &NodeLineage) -> Checked<Option<CountOrder>> {
        if !input.aggregated || self.is_private(&input.scans) {
            return Ok(None);
        }
        let mut order: Option<CountOrder> = None;
        for key in &sort.expr {
            let lineage = self.value(&key.expr, &sort.input, input)?;
            if !lineage.count_derived {
                continue;
            }
            let largest_first = !key.asc && is_plain_count(&key.expr, &sort.input, input);
            if order
                .as_ref()
                .is_none_or(|o| o.largest_first && !largest_first)
            {
                order = Some(CountOrder {
                    largest_first,
                    key: key.expr.to_string(),
                });
            }
        }
        Ok(order)
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
        let count_like = COUNT_LIKE_AGGREGATES.contains(&name.as_str());
        // `sum(-1)` shrinks as the group grows: a lower bound on it is an
        // upper bound on the count.
        let shrinks = name == "sum" && params.args.iter().any(|a| !grows(a, input_plan.schema()));
        let mut lineage = Lineage {
            level: Level::Aggregated,
            is_count: count_like && !shrinks,
            count_derived: count_like || GROWING_AGGREGATES.contains(&name.as_str()),
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
        // A join key is an equality condition on both sides.
        let mut reads = BTreeSet::new();
        let keys = join.on.iter().flat_map(|(l, r)| [l, r]);
        for key in keys.chain(join.filter.iter()) {
            reads.extend(row_reads(key, &join.left, &left));
            reads.extend(row_reads(key, &join.right, &right));
        }
        let mut out = NodeLineage {
            columns: left.columns,
            scans: left.scans,
            unaggregated: left.unaggregated,
            position_selected: left.position_selected,
            aggregated: left.aggregated || right.aggregated,
            row_level: left.row_level,
            condition_reads: left.condition_reads,
            count_order: None,
        };
        out.columns.extend(right.columns);
        out.scans.extend(right.scans);
        out.unaggregated.extend(right.unaggregated);
        out.position_selected.extend(right.position_selected);
        out.row_level.extend(right.row_level);
        out.condition_reads.extend(right.condition_reads);
        out.condition_reads.extend(reads);
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
                if inner.level == Level::Constant {
                    // A cast of a constant cannot fail on data. (A count
                    // has no source columns but is data all the same.)
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
                let lossless = is_lossless_cast(cast, plan.schema());
                let plain = inner.plain.clone().filter(|_| lossless);
                self.no_masked_transform(
                    &inner,
                    &format!("CAST to {}", cast.field.data_type()),
                    plain.is_some(),
                )?;
                // A count cast to text no longer orders like a count.
                Ok(Lineage {
                    plain,
                    is_count: inner.is_count && lossless,
                    ..inner
                })
            }
            Expr::TryCast(cast) => {
                let inner = self.value(&cast.expr, plan, input)?;
                self.no_masked_transform(&inner, "TRY_CAST", false)?;
                Ok(Lineage {
                    plain: None,
                    is_count: false,
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
                if name == "nullif" {
                    // `nullif(a, b)` is NULL where a = b: an equality whose
                    // both outcomes show (`nullif(x, 'a') IS NOT NULL`
                    // selects x <> 'a').
                    self.require_comparison(&lineage, "=", Polarity::Both, expr)?;
                }
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
                // As a value, a CASE shows which branch each row took: every
                // condition is seen both where it holds and where it fails.
                let mut parts = Vec::new();
                for (when, then) in &case.when_then_expr {
                    let condition = case_condition(case, when);
                    parts.push(self.condition_at(&condition, Polarity::Both, plan, input)?);
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
            | Expr::InList(_) => self.condition_at(expr, Polarity::Both, plan, input),
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

    /// A boolean condition used in WHERE, HAVING or a scan filter: the rows
    /// where it holds are selected.
    fn condition(&self, predicate: &Expr, plan: &LogicalPlan, input: &NodeLineage) -> Checked<()> {
        self.condition_at(predicate, Polarity::Positive, plan, input)
            .map(|_| ())
    }

    /// Checks a condition of which the query selects the `polarity`
    /// outcome: every column it reads must admit `Use::Filter`, every
    /// comparison must be allowed for what it means there (under a negation
    /// its complement), and the privacy unit is never compared with a value.
    /// Returns the lineage of everything the condition reads.
    fn condition_at(
        &self,
        expr: &Expr,
        polarity: Polarity,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let at = |e: &Expr, p: Polarity| self.condition_at(e, p, plan, input);
        let compare = |name: &str, p: Polarity, operands: &[&Expr]| {
            self.comparison(name, p, expr, operands, plan, input)
        };
        let lineage = match expr {
            Expr::Alias(alias) => return at(&alias.expr, polarity),
            Expr::Literal(..) => return Ok(Lineage::default()),
            Expr::Not(inner) => at(inner, polarity.flip())?,
            Expr::IsTrue(inner) | Expr::IsNotFalse(inner) => at(inner, polarity)?,
            Expr::IsFalse(inner) | Expr::IsNotTrue(inner) => at(inner, polarity.flip())?,
            // A null test of a condition shows both of its outcomes:
            // `(x = 'a' OR NULL) IS UNKNOWN` selects x <> 'a'.
            Expr::IsNull(inner) | Expr::IsUnknown(inner) => compare("is_null", polarity, &[inner])?,
            Expr::IsNotNull(inner) | Expr::IsNotUnknown(inner) => {
                compare("is_null", polarity.flip(), &[inner])?
            }
            Expr::BinaryExpr(b) if is_logical(b.op) => {
                let lineage = Lineage::derived([&at(&b.left, polarity)?, &at(&b.right, polarity)?]);
                let name = if b.op == Operator::And { "and" } else { "or" };
                self.require_comparison(&lineage, name, polarity, expr)?;
                lineage
            }
            Expr::BinaryExpr(b) if is_null_test(b) => {
                // `x IS DISTINCT FROM NULL` is `x IS NOT NULL`.
                let operand = if is_null_literal(&b.left) {
                    &b.right
                } else {
                    &b.left
                };
                let negated = b.op == Operator::IsDistinctFrom;
                compare("is_null", polarity.negated_if(negated), &[operand])?
            }
            Expr::BinaryExpr(b) => match comparison_of(b.op) {
                Some((name, negated)) => {
                    let polarity = polarity.negated_if(negated);
                    match truth_comparison(b, name) {
                        // `c = true`, `c IS DISTINCT FROM false`: c itself.
                        Some((condition, true)) => at(condition, polarity)?,
                        // `c = false`, `c <> true`: NOT c.
                        Some((condition, false)) => at(condition, polarity.flip())?,
                        None => compare(name, polarity, &[&b.left, &b.right])?,
                    }
                }
                None => return self.boolean_value(expr, polarity, plan, input),
            },
            Expr::Like(like) => compare(
                "like",
                polarity.negated_if(like.negated),
                &[&like.expr, &like.pattern],
            )?,
            Expr::SimilarTo(_) => return Err(refused("SIMILAR TO")),
            Expr::Between(between) => compare(
                "between",
                polarity.negated_if(between.negated),
                &[&between.expr, &between.low, &between.high],
            )?,
            Expr::InList(in_list) => {
                let mut operands = vec![in_list.expr.as_ref()];
                operands.extend(in_list.list.iter());
                compare("in", polarity.negated_if(in_list.negated), &operands)?
            }
            Expr::Case(case) if polarity != Polarity::Both => {
                self.case_selection(case, polarity, plan, input)?
            }
            other => return self.boolean_value(other, polarity, plan, input),
        };
        Ok(Lineage {
            plain: None,
            is_count: false,
            ..lineage
        })
    }

    /// A comparison of values (`x = 'a'`, `x IN (…)`, `x IS NULL`): its
    /// operands are values (a condition among them shows both outcomes),
    /// the comparison must be allowed under `polarity`.
    fn comparison(
        &self,
        name: &str,
        polarity: Polarity,
        expr: &Expr,
        operands: &[&Expr],
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let mut parts = Vec::new();
        for operand in operands {
            let lineage = self.value(operand, plan, input)?;
            if lineage.level == Level::Row || lineage.level == Level::GroupKey {
                self.require_use(&lineage, Use::Filter, "condition")?;
            }
            parts.push(lineage);
        }
        let lineage = Lineage::derived(&parts);
        self.require_comparison(&lineage, name, polarity, expr)?;
        self.refuse_unit_comparison(&parts)?;
        Ok(lineage)
    }

    /// A CASE whose outcome (true or false, per `polarity`) the query
    /// selects on. Branch i is taken where conditions 1…i-1 are false and
    /// condition i is true: a condition is seen positively where its own
    /// result can give the selected outcome, and negatively where a later
    /// result or the ELSE can; seen both ways, it shows both outcomes.
    fn case_selection(
        &self,
        case: &Case,
        polarity: Polarity,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let selected = polarity == Polarity::Positive;
        let selects = |result: &Expr| match literal_truth(result) {
            Some(Some(value)) => value == selected,
            Some(None) => false,
            None => true,
        };
        let else_selects = case.else_expr.as_deref().is_some_and(selects);
        let branches = &case.when_then_expr;
        let mut parts = Vec::new();
        for (i, (when, then)) in branches.iter().enumerate() {
            let later = else_selects || branches[i + 1..].iter().any(|(_, t)| selects(t));
            let condition_polarity = match (selects(then), later) {
                (_, false) => Polarity::Positive,
                (false, true) => Polarity::Negative,
                (true, true) => Polarity::Both,
            };
            let condition = case_condition(case, when);
            parts.push(self.condition_at(&condition, condition_polarity, plan, input)?);
            parts.push(self.condition_at(then, polarity, plan, input)?);
        }
        if let Some(otherwise) = &case.else_expr {
            parts.push(self.condition_at(otherwise, polarity, plan, input)?);
        }
        Ok(Lineage::derived(&parts))
    }

    /// A value used as a condition: a boolean column (`WHERE flag`, `NOT
    /// flag` means `flag = false`) or a computed boolean, whose negation
    /// needs `not` (there is no named complement for a function).
    fn boolean_value(
        &self,
        expr: &Expr,
        polarity: Polarity,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        let lineage = self.value(expr, plan, input)?;
        if lineage.level == Level::Row || lineage.level == Level::GroupKey {
            self.require_use(&lineage, Use::Filter, "condition")?;
        }
        if polarity != Polarity::Positive && lineage.plain.is_none() {
            self.require_comparison(&lineage, "not", Polarity::Positive, expr)?;
        }
        Ok(lineage)
    }

    fn binary(
        &self,
        binary: &BinaryExpr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<Lineage> {
        if is_logical(binary.op) || comparison_of(binary.op).is_some() {
            // A condition used as a value: both of its outcomes show.
            let expr = Expr::BinaryExpr(binary.clone());
            return self.condition_at(&expr, Polarity::Both, plan, input);
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

    /// `comparison` must be allowed, for what it means under `polarity`, by
    /// the grant of every dataset whose columns flow into it.
    fn require_comparison(
        &self,
        lineage: &Lineage,
        comparison: &str,
        polarity: Polarity,
        expr: &Expr,
    ) -> Checked<()> {
        for dataset in datasets_of(lineage) {
            let grant = &self.grants[dataset];
            if !comparison_allowed(&grant.comparisons, comparison, polarity) {
                return Err(Denial::forbidden(
                    format!("{}.comparisons", grant.rule),
                    format!(
                        "{} not allowed on dataset `{dataset}` (allowed: {}); in `{}`",
                        describe_comparison(comparison, polarity, &grant.comparisons),
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

    /// Above an aggregate, a filter that reads a count-like value (see
    /// [`COUNT_LIKE_AGGREGATES`]) may only bound it from below, with a
    /// constant, under AND and OR: `count(*) > c`, `count(*) >= c`, `c <
    /// count(*)`, `c <= count(*)`. Anything else (an upper bound, `=`,
    /// `<>`, IN, BETWEEN, NOT, arithmetic or a function over the count, a
    /// CASE) could select groups because they are small, and is refused:
    /// an allow-list, since the spellings of an upper bound are endless.
    fn refuse_count_upper_bounds(
        &self,
        predicate: &Expr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> Checked<()> {
        match strip_alias(predicate) {
            Expr::BinaryExpr(b) if is_logical(b.op) => {
                self.refuse_count_upper_bounds(&b.left, plan, input)?;
                self.refuse_count_upper_bounds(&b.right, plan, input)
            }
            expr if !reads_count(expr, plan, input) => Ok(()),
            Expr::BinaryExpr(b) if self.is_count_lower_bound(b, plan, input) => Ok(()),
            expr => Err(Denial::forbidden(
                DENY_BY_DEFAULT,
                format!(
                    "`{expr}`: HAVING (or any filter over aggregated rows) may bound a count only from below (`count(*) > c`, `count(*) >= c`, combined with AND/OR); an upper bound, =, <>, IN, BETWEEN, NOT, arithmetic or a function over a count can single out small groups"
                ),
            )),
        }
    }

    /// `count > c`, `count >= c`, `c < count` or `c <= count`, with the
    /// count passed through unchanged and `c` a constant.
    fn is_count_lower_bound(
        &self,
        b: &BinaryExpr,
        plan: &LogicalPlan,
        input: &NodeLineage,
    ) -> bool {
        let constant = |e: &Expr| {
            self.value(e, plan, input)
                .is_ok_and(|l| l.level == Level::Constant && l.sources.is_empty())
        };
        match b.op {
            Operator::Gt | Operator::GtEq => {
                is_plain_count(&b.left, plan, input) && constant(&b.right)
            }
            Operator::Lt | Operator::LtEq => {
                constant(&b.left) && is_plain_count(&b.right, plan, input)
            }
            _ => false,
        }
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

/// A comparison operator as the policy names it, and whether the SQL spells
/// its negation (`<>` is a negated `=`, `!~` a negated `regex`).
fn comparison_of(op: Operator) -> Option<(&'static str, bool)> {
    Some(match op {
        Operator::Eq | Operator::IsNotDistinctFrom => ("=", false),
        Operator::NotEq | Operator::IsDistinctFrom => ("=", true),
        Operator::Lt => ("<", false),
        Operator::LtEq => ("<=", false),
        Operator::Gt => (">", false),
        Operator::GtEq => (">=", false),
        Operator::RegexMatch | Operator::RegexIMatch => ("regex", false),
        Operator::RegexNotMatch | Operator::RegexNotIMatch => ("regex", true),
        Operator::LikeMatch | Operator::ILikeMatch => ("like", false),
        Operator::NotLikeMatch | Operator::NotILikeMatch => ("like", true),
        _ => return None,
    })
}

fn is_logical(op: Operator) -> bool {
    matches!(op, Operator::And | Operator::Or)
}

/// How a refused comparison reads for what it means where it is used.
fn describe_comparison(comparison: &str, polarity: Polarity, allowed: &BTreeSet<String>) -> String {
    let negation = match complement(comparison) {
        Some(other) => format!("`{other}`"),
        None => format!("`not` with `{comparison}`"),
    };
    match polarity {
        Polarity::Both if allowed.contains(comparison) => format!(
            "comparison `{comparison}` is used as a value, so rows where it fails show too; that needs its negation, {negation} or `not`, which is"
        ),
        Polarity::Positive | Polarity::Both => format!("comparison `{comparison}` is"),
        Polarity::Negative => format!("comparison {negation} (a negated `{comparison}`) is"),
    }
}

/// An expression that is itself a condition (true, false or unknown).
fn is_condition(expr: &Expr) -> bool {
    match expr {
        Expr::Alias(alias) => is_condition(&alias.expr),
        Expr::BinaryExpr(b) => is_logical(b.op) || comparison_of(b.op).is_some(),
        Expr::Like(_)
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
        | Expr::InList(_) => true,
        _ => false,
    }
}

/// `c = true`, `c = false` (and `<>`, `IS [NOT] DISTINCT FROM` folded into
/// `name` = "=" with the polarity) for a condition `c`: the condition, and
/// the literal it is compared with.
fn truth_comparison<'e>(b: &'e BinaryExpr, name: &str) -> Option<(&'e Expr, bool)> {
    if name != "=" {
        return None;
    }
    let pick = |condition: &'e Expr, literal: &Expr| match literal_truth(literal) {
        Some(Some(value)) if is_condition(condition) => Some((condition, value)),
        _ => None,
    };
    pick(&b.left, &b.right).or_else(|| pick(&b.right, &b.left))
}

/// `x IS [NOT] DISTINCT FROM NULL`: a null test, not a comparison.
fn is_null_test(b: &BinaryExpr) -> bool {
    matches!(b.op, Operator::IsDistinctFrom | Operator::IsNotDistinctFrom)
        && (is_null_literal(&b.left) || is_null_literal(&b.right))
}

fn is_null_literal(expr: &Expr) -> bool {
    literal_truth(expr) == Some(None)
}

/// `Some(Some(b))` for a boolean literal, `Some(None)` for a NULL, `None`
/// for anything else (casts of literals seen through).
fn literal_truth(expr: &Expr) -> Option<Option<bool>> {
    match expr {
        Expr::Alias(alias) => literal_truth(&alias.expr),
        Expr::Cast(cast) => literal_truth(&cast.expr),
        Expr::TryCast(cast) => literal_truth(&cast.expr),
        Expr::Literal(ScalarValue::Boolean(value), _) => Some(*value),
        Expr::Literal(value, _) if value.is_null() => Some(None),
        _ => None,
    }
}

/// The condition of one CASE branch: `CASE x WHEN v` compares `x = v`.
fn case_condition(case: &Case, when: &Expr) -> Expr {
    match &case.expr {
        Some(base) => base.as_ref().clone().eq(when.clone()),
        None => when.clone(),
    }
}

/// The dataset columns `expr` reads row by row (not through an aggregate,
/// not as a group key, whose value may leave as such).
fn row_reads(expr: &Expr, plan: &LogicalPlan, input: &NodeLineage) -> BTreeSet<Source> {
    expr.column_refs()
        .into_iter()
        .filter_map(|column| input.column(plan, column))
        .filter(|lineage| lineage.level == Level::Row)
        .flat_map(|lineage| lineage.sources.iter().cloned())
        .collect()
}

/// Whether `expr` reads a value computed from a count-like aggregate.
fn reads_count(expr: &Expr, plan: &LogicalPlan, input: &NodeLineage) -> bool {
    expr.column_refs()
        .into_iter()
        .filter_map(|column| input.column(plan, column))
        .any(|lineage| lineage.count_derived)
}

/// A count-like aggregate passed through unchanged (aliases, lossless casts).
fn is_plain_count(expr: &Expr, plan: &LogicalPlan, input: &NodeLineage) -> bool {
    matches!(strip_plain(expr, plan.schema()), Expr::Column(column)
        if input.column(plan, column).is_some_and(|l| l.is_count))
}

/// Whether a `sum` argument grows the sum with every row: a column (as
/// far as the policy can tell; see docs/policy.md) or a positive literal.
fn grows(argument: &Expr, schema: &DFSchema) -> bool {
    match strip_plain(argument, schema) {
        Expr::Literal(value, _) => ScalarValue::new_zero(&value.data_type())
            .ok()
            .and_then(|zero| value.partial_cmp(&zero))
            .is_some_and(|o| o == std::cmp::Ordering::Greater),
        Expr::Cast(cast) => grows(&cast.expr, schema),
        _ => true,
    }
}

/// Refuses a LIMIT or OFFSET over rows ordered by a count-like key, unless
/// the order is a plain count, largest first, and nothing is skipped: the
/// tail of a count order is its smallest groups.
fn refuse_limit_by_count(order: Option<&CountOrder>, skip: Option<&Expr>) -> Checked<()> {
    let Some(order) = order else { return Ok(()) };
    let skips = skip.is_some_and(|s| !matches!(strip_alias(s), Expr::Literal(v, _) if is_zero(v)));
    if order.largest_first && !skips {
        return Ok(());
    }
    Err(Denial::forbidden(
        DENY_BY_DEFAULT,
        format!(
            "`ORDER BY {}` with LIMIT or OFFSET picks groups by their size: only a plain count in descending order (largest groups first) may be limited, and without OFFSET",
            order.key
        ),
    ))
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
