//! Turns an allowed aggregate query over a DP dataset into a [`DpQuery`]:
//! a bounded statistics plan, the statistics to noise, and the plan that
//! finishes the answer from the noisy aggregate.
//!
//! The statistics plan bounds each privacy unit's contribution before any
//! group total is formed:
//!
//! ```text
//! input (row filter, masks, WHERE, joins with public data)
//!  └ per row:  unit, group keys, clamp(value) and its fixed-point form
//!  └ per (unit, group): rows, non-NULL count, fixed-point sum and sum of squares, values
//!  └ keep each unit's `max_groups` largest groups ([`top_groups`], one hash
//!    aggregation by unit; it also notes the rows of the groups dropped)
//!  └ cap each (unit, group) at `max_rows` rows: counts capped, sums rescaled
//!    to at most `max_rows` rows' worth of the unit's own mean, still clamped
//!  └ per group: totals, and the number of units
//! ```
//!
//! Removing one unit therefore changes at most `max_groups` groups, each
//! statistic by at most its [`Statistic::sensitivity`]: a fact of the plan,
//! never of the data.
//!
//! The same plan counts what the bounds removed ([`BiasStatistic`]): rows
//! beyond `max_rows`, rows of groups beyond `max_groups`, values clamped.
//! Each is a sum over all reported groups with its own bounded per-unit
//! contribution, released once from a share of the query's ε, so the
//! answer can say how much of the data it left out.
//!
//! [`top_groups`]: super::top_groups

use std::sync::Arc;

use datafusion_common::arrow::datatypes::DataType;
use datafusion_common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion_common::{Column, DFSchemaRef, Result, ScalarValue, plan_err};
use datafusion_expr::expr::AggregateFunction;
use datafusion_expr::logical_plan::{Aggregate, LogicalPlan, Projection};
use datafusion_expr::{AggregateUDF, Expr, LogicalPlanBuilder, TableSource, cast, col, lit, when};
use datafusion_functions_aggregate::array_agg::array_agg;
use datafusion_functions_aggregate::count::count;
use datafusion_functions_aggregate::min_max::{max, min};
use datafusion_functions_aggregate::sum::sum;

use super::auto::{
    self, AutoBounds, AutoChoice, AutoKind, AutoSettings, Chosen, ChosenBounds, Rebuild,
};
use super::grid_positions::{Grid, GridPositions};
use super::settings::{Accounting, Budget, ColumnBounds, DpGrant, evenly_spaced};
use super::top_groups::{DROPPED, TopGroups};
use super::zcdp;
use crate::document::NoiseKind;
use crate::internal::INTERNAL_PREFIX;
use datafusion_common::arrow::row::{RowConverter, SortField};

/// Largest fixed-point magnitude of one clamped value (2^20): with at most
/// 2^16 contributions per unit, sensitivities stay below 2^36 and noisy
/// totals far from `i64` overflow.
const FIXED_POINT_RANGE: f64 = (1u64 << 20) as f64;
/// Most groups a public key set may produce.
const MAX_PUBLIC_GROUPS: usize = 100_000;

/// What a DP query needs at execution: approved together with its plan.
#[derive(Debug, Clone)]
pub struct DpQuery {
    /// Per-group bounded statistics: the key columns (`key_count`), then one
    /// column per [`StatisticColumn`].
    pub stats_plan: LogicalPlan,
    pub key_count: usize,
    /// The statistics to release, each with its share of ε.
    pub statistics: Vec<Statistic>,
    /// How each aggregate expression is computed, in the aggregate's order
    /// (names and types are the aggregate schema's).
    pub outputs: Vec<OutputKind>,
    /// The schema of the aggregate the noisy table stands in for.
    pub aggregate_schema: DFSchemaRef,
    /// The approved plan; the aggregate node is replaced by the noisy table
    /// ([`DpQuery::finish_plan`]) so HAVING, ORDER BY and LIMIT apply after
    /// noise.
    pub plan: LogicalPlan,
    pub groups: Groups,
    /// Estimates of what the bounds left out, from `bias_epsilon`.
    pub bias: Vec<BiasStatistic>,
    /// The share of `epsilon` the bias estimates spend (0 without them).
    pub bias_epsilon: f64,
    /// Bounds to choose from the data before the statistics plan runs
    /// (`auto` in the grant); `stats_plan` is then the worst case.
    pub auto: Option<AutoBounds>,
    /// The bounds chosen, once [`DpQuery::with_chosen`] planned the query.
    pub chosen: Option<ChosenBounds>,
    /// The share of `epsilon` (and of ρ under zCDP) spent choosing bounds.
    pub auto_epsilon: f64,
    pub auto_rho: f64,
    /// ε and δ this query spends in total: under `accounting: zcdp`, the
    /// guarantee the query gives on its own (its cost is `zcdp`).
    pub epsilon: f64,
    pub delta: f64,
    /// What the query costs when its budget composes in zCDP.
    pub zcdp: Option<ZcdpCost>,
    pub max_groups: u64,
    pub max_rows: u64,
    pub noise: NoiseKind,
    /// The DP dataset (the budget is kept per organization and dataset).
    pub dataset: String,
    pub budget: Option<Budget>,
    pub cache: bool,
    /// The version of the data the answer is computed from, as far as the
    /// caller knows it before reading (the connector fills it in): part of
    /// the answer cache's key, so that a cached answer is never served for
    /// data that changed since.
    pub data_version: String,
}

/// What a query charged to a zCDP budget costs: ρ, and the δ of a private
/// selection of groups (a threshold is not zCDP: its δ adds up on its own).
#[derive(Debug, Clone, PartialEq)]
pub struct ZcdpCost {
    pub rho: f64,
    pub delta: f64,
}

/// Which groups the answer reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Groups {
    /// No GROUP BY: one group, always reported.
    Single,
    /// Every combination of the provider's published keys, and no other.
    Public(Vec<Vec<ScalarValue>>),
    /// Groups chosen by a noisy threshold on the row counts (costs δ); the
    /// row-count statistic carries the selection's share of ε.
    Private,
}

/// One noisy release over all groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistic {
    pub kind: StatisticKind,
    /// The statistics-plan column it reads.
    pub column: String,
    /// Its share of the query's ε (and δ, for Gaussian noise and selection).
    pub epsilon: f64,
    pub delta: f64,
    /// Under zCDP accounting, its share of the query's ρ: the noise is
    /// calibrated to it instead of to ε (0 otherwise).
    pub rho: f64,
    /// Fixed-point units per value unit (1 for counts).
    pub scale_factor: f64,
    /// Most one unit changes this statistic in one group, fixed-point units.
    pub sensitivity: u64,
}

/// A differentially private estimate of how much of the data the bounds
/// left out: one total over all reported groups, released once.
#[derive(Debug, Clone, PartialEq)]
pub struct BiasStatistic {
    pub kind: BiasKind,
    /// The statistics-plan column summed over the reported groups.
    pub column: String,
    pub epsilon: f64,
    /// Under zCDP accounting, its share of the query's ρ (0 otherwise).
    pub rho: f64,
    /// Most one unit changes the total over all groups (L1).
    pub sensitivity: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BiasKind {
    /// Rows counted after the caps (the denominator).
    Counted,
    /// Rows beyond `max_rows` in the groups a unit kept, at most `max_rows`
    /// more per (unit, group): a lower bound where units exceed the cap by
    /// more than that.
    OverMaxRows,
    /// Rows in the groups beyond a unit's `max_groups`, at most
    /// `max_groups × max_rows` per unit (again a lower bound).
    OverMaxGroups,
    /// Counted values of a column that were clamped to its bounds (rows
    /// beyond `max_rows` weighted as the rescaled sum weighs them).
    Clamped {
        column: String,
        bounds: ColumnBounds,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum StatisticKind {
    /// Rows per group (also drives private group selection).
    Rows,
    /// Distinct privacy units per group.
    Units,
    /// Non-NULL values of a column.
    Count(String),
    Sum(String),
    SumOfSquares(String),
    /// One quantile of a column over its declared candidates.
    Quantile {
        column: String,
        q: f64,
        bounds: ColumnBounds,
    },
}

impl BiasKind {
    /// What the estimate counts, e.g. `rows over max_rows`.
    pub fn describe(&self) -> String {
        match self {
            BiasKind::Counted => "rows counted".into(),
            BiasKind::OverMaxRows => "rows over max_rows".into(),
            BiasKind::OverMaxGroups => "rows over max_groups".into(),
            BiasKind::Clamped { column, .. } => format!("{column} clamped"),
        }
    }
}

/// How one aggregate expression is computed from noisy statistics
/// (indices into [`DpQuery::statistics`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    Count(usize),
    Sum {
        sum: usize,
    },
    Avg {
        sum: usize,
        count: usize,
        bounds: ColumnBounds,
    },
    Variance {
        sum: usize,
        count: usize,
        squares: usize,
        bounds: ColumnBounds,
        sample: bool,
        root: bool,
    },
    Quantile(usize),
}

impl OutputKind {
    /// The statistics this output reads.
    pub fn statistics(&self) -> Vec<usize> {
        match self {
            OutputKind::Count(i) | OutputKind::Sum { sum: i } | OutputKind::Quantile(i) => {
                vec![*i]
            }
            OutputKind::Avg { sum, count, .. } => vec![*sum, *count],
            OutputKind::Variance {
                sum,
                count,
                squares,
                ..
            } => vec![*sum, *count, *squares],
        }
    }
}

/// The aggregates a DP query may use, for error messages.
pub const SUPPORTED: &str = "COUNT(*), COUNT(column), COUNT(DISTINCT <privacy unit>), SUM, AVG, VAR/VAR_POP, STDDEV/STDDEV_POP, MEDIAN and APPROX_PERCENTILE_CONT over columns with declared bounds, with WHERE, GROUP BY, HAVING, ORDER BY and LIMIT, and inner joins with public datasets";

/// The settings a DP plan is built with.
pub struct DpRequest<'a> {
    pub dataset: &'a str,
    /// The privacy unit as the aggregate's (rebuilt) input exposes it.
    pub unit: Column,
    /// The dataset's privacy-unit column, as the policy names it.
    pub privacy_unit: &'a str,
    pub grant: &'a DpGrant,
    pub epsilon: f64,
}

impl DpQuery {
    /// Builds the DP query for `plan` (already rewritten with row filters
    /// and masks); `aggregate_input` is the aggregate's input with the
    /// privacy unit exposed as `request.unit`.
    pub fn build(
        plan: LogicalPlan,
        aggregate: &Aggregate,
        aggregate_input: LogicalPlan,
        request: DpRequest<'_>,
    ) -> Result<Self> {
        Self::build_with(plan, aggregate, aggregate_input, request, None)
    }

    /// [`DpQuery::build`], or with `chosen` the same query planned again
    /// with the bounds its first step chose (its grant has no `auto` left).
    fn build_with(
        plan: LogicalPlan,
        aggregate: &Aggregate,
        aggregate_input: LogicalPlan,
        request: DpRequest<'_>,
        chosen: Option<ChosenBounds>,
    ) -> Result<Self> {
        let grant = request.grant;
        let keys = group_keys(aggregate)?;
        let source = SourceColumns {
            input: &aggregate.input,
            dataset: request.dataset,
        };
        let mut builder = StatsBuilder::new(grant, &request.unit, &source, request.privacy_unit);
        let outputs = aggregate
            .aggr_expr
            .iter()
            .map(|expr| builder.output(expr))
            .collect::<Result<Vec<_>>>()?;
        let groups = groups(&keys, aggregate, grant, &source);
        if groups == Groups::Private {
            builder.require(StatisticKind::Rows);
        }
        let needs_delta = groups == Groups::Private || grant.noise == NoiseKind::Gaussian;
        let delta = if needs_delta {
            grant.delta_per_query
        } else {
            0.0
        };
        let mut statistics = builder.statistics();
        // Choosing `auto` bounds takes its share first, then the bias
        // estimates theirs; each `x - rest` is exact (Sterbenz, shares are
        // at most one half), so the shares add up to the query's ε.
        let choices = builder.auto_choices(&groups);
        let auto_share = if chosen.is_some() || !choices.is_empty() {
            grant.auto.share
        } else {
            0.0
        };
        let rest = request.epsilon * (1.0 - auto_share);
        let auto_epsilon = request.epsilon - rest;
        let main_epsilon = rest * (1.0 - grant.bias_share);
        let bias_epsilon = rest - main_epsilon;
        split_budget(&mut statistics, main_epsilon, delta, grant.noise, &groups);
        // A unit changes at most as many reported groups as there are: with
        // few public keys, that (not max_groups) bounds it, so the noise is
        // smaller and no unit needs its groups capped.
        let max_groups = match &groups {
            Groups::Single => 1,
            Groups::Public(keys) => grant.max_groups.min(keys.len() as u64),
            Groups::Private => grant.max_groups,
        };
        let cap_groups = match &groups {
            Groups::Single => false,
            Groups::Public(keys) => keys.len() as u64 > grant.max_groups,
            Groups::Private => true,
        };
        let bias = builder.bias_statistics(max_groups, cap_groups, bias_epsilon);
        let bias_epsilon = if bias.is_empty() { 0.0 } else { bias_epsilon };
        let stats_plan = builder.plan(
            aggregate_input.clone(),
            &keys,
            &groups,
            cap_groups,
            !bias.is_empty(),
        )?;
        let auto = if choices.is_empty() {
            None
        } else {
            Some(AutoBounds {
                plan: builder.auto_plan(aggregate_input.clone(), &keys, &groups, &choices)?,
                choices,
                rebuild: Arc::new(Rebuild {
                    aggregate: aggregate.clone(),
                    aggregate_input,
                    unit: request.unit.clone(),
                    privacy_unit: request.privacy_unit.to_string(),
                    grant: grant.clone(),
                }),
            })
        };
        let mut query = DpQuery {
            stats_plan,
            key_count: keys.len(),
            statistics,
            bias,
            bias_epsilon,
            auto,
            chosen,
            auto_epsilon,
            auto_rho: 0.0,
            outputs,
            aggregate_schema: aggregate.schema.clone(),
            plan,
            groups,
            epsilon: request.epsilon,
            delta,
            zcdp: None,
            max_groups,
            max_rows: grant.max_rows,
            noise: grant.noise,
            dataset: request.dataset.to_string(),
            budget: grant.budget.clone(),
            cache: grant.cache,
            data_version: String::new(),
        };
        if grant
            .budget
            .as_ref()
            .is_some_and(|b| b.accounting == Accounting::Zcdp)
        {
            query.price_in_rho();
        }
        Ok(query)
    }

    /// Re-prices the query for a zCDP budget. Its ε at δ (δ less the
    /// threshold's half under private selection) becomes ρ, shared as ε
    /// was; the threshold keeps its δ. The query alone is then still
    /// (ε, δ)-DP, and its ρ composes with the budget's other queries.
    fn price_in_rho(&mut self) {
        let private = self.groups == Groups::Private;
        let threshold_delta = if private { self.delta / 2.0 } else { 0.0 };
        let rho = zcdp::rho_for_epsilon(self.epsilon, self.delta - threshold_delta);
        let per_epsilon = rho / self.epsilon;
        for statistic in &mut self.statistics {
            statistic.rho = statistic.epsilon * per_epsilon;
            let selects = private && statistic.kind == StatisticKind::Rows;
            statistic.delta = if selects { threshold_delta } else { 0.0 };
        }
        for bias in &mut self.bias {
            bias.rho = bias.epsilon * per_epsilon;
        }
        self.auto_rho = self.auto_epsilon * per_epsilon;
        if let Some(chosen) = &mut self.chosen {
            chosen.rho = self.auto_rho;
        }
        // The sum of the parts, which rounding may put an ulp above `rho`:
        // the charge is what the noise is calibrated to.
        let charged = self.statistics.iter().map(|s| s.rho).sum::<f64>()
            + self.bias.iter().map(|b| b.rho).sum::<f64>()
            + self.auto_rho;
        self.zcdp = Some(ZcdpCost {
            rho: charged,
            delta: threshold_delta,
        });
    }

    /// How ε (and δ) is divided, e.g. `count(*) ε 0.25; sum(fare_eur) ε 0.25`.
    pub fn split_summary(&self) -> String {
        let mut parts: Vec<String> = self
            .statistics
            .iter()
            .map(|s| {
                let what = self.describe_statistic(s);
                let cost = match s.rho {
                    rho if rho > 0.0 => format!("ρ {rho}"),
                    _ => format!("ε {}", s.epsilon),
                };
                match s.delta {
                    d if d > 0.0 => format!("{what} {cost} δ {d}"),
                    _ => format!("{what} {cost}"),
                }
            })
            .collect();
        if !self.bias.is_empty() {
            let what: Vec<String> = self.bias.iter().map(|b| b.kind.describe()).collect();
            let cost = match self.zcdp {
                Some(_) => format!("ρ {}", self.bias.iter().map(|b| b.rho).sum::<f64>()),
                None => format!("ε {}", self.bias_epsilon),
            };
            parts.push(format!("bias estimates ({}) {cost}", what.join(", ")));
        }
        if self.auto_epsilon > 0.0 {
            let what = match (&self.auto, &self.chosen) {
                (Some(auto), _) => auto
                    .choices
                    .iter()
                    .map(|c| c.kind.describe())
                    .collect::<Vec<_>>()
                    .join(", "),
                (None, Some(chosen)) => chosen.choices.join(", "),
                (None, None) => String::new(),
            };
            let cost = match self.zcdp {
                Some(_) => format!("ρ {}", self.auto_rho),
                None => format!("ε {}", self.auto_epsilon),
            };
            parts.push(format!("choosing bounds ({what}) {cost}"));
        }
        parts.join("; ")
    }

    /// The contribution limits as EXPLAIN POLICY and the audit record show
    /// them, e.g. `max_groups = 4, max_rows = auto (the 0.99-quantile …)`.
    pub fn limits_summary(&self) -> String {
        let choices = self
            .auto
            .as_ref()
            .map(|a| a.choices.as_slice())
            .unwrap_or_default();
        let chooses = |kind: AutoKind| choices.iter().find(|c| c.kind == kind);
        let limit = |name: &str, kind: AutoKind, fixed: u64| match chooses(kind) {
            Some(c) => format!(
                "{name} = auto (the {}-quantile of units' {}, chosen per query among 1 to {})",
                c.quantile,
                if name == "max_groups" {
                    "group counts"
                } else {
                    "largest group"
                },
                auto::CONTRIBUTION_CEILING
            ),
            None => format!("{name} = {fixed}"),
        };
        let mut parts = vec![
            limit("max_groups", AutoKind::MaxGroups, self.max_groups),
            limit("max_rows", AutoKind::MaxRows, self.max_rows),
        ];
        for choice in choices {
            if let AutoKind::Upper(column) = &choice.kind {
                parts.push(format!(
                    "{column} bounds = auto (the {}-quantiles of units' largest and smallest values)",
                    choice.quantile
                ));
            }
        }
        parts.join(", ")
    }

    /// The ε each quantile of the `auto` step may spend: an equal share, or
    /// under zCDP the pure ε its share of ρ pays for.
    pub fn auto_epsilon_per_release(&self) -> f64 {
        let releases = self.auto.as_ref().map_or(1, |a| a.choices.len().max(1));
        if self.auto_rho > 0.0 {
            zcdp::pure_epsilon(self.auto_rho, releases as u64)
        } else {
            self.auto_epsilon / releases as f64
        }
    }

    /// The query planned again with the bounds its `auto` step chose, one
    /// per [`AutoBounds::choices`] (each one of its candidates). The result
    /// charges what this query charges, split the same way.
    pub fn with_chosen(&self, values: &[Chosen]) -> Result<DpQuery> {
        let Some(auto) = &self.auto else {
            return plan_err!("the query has no bounds to choose");
        };
        if values.len() != auto.choices.len() {
            return plan_err!(
                "{} bounds chosen for {} choices",
                values.len(),
                auto.choices.len()
            );
        }
        let rebuild = &auto.rebuild;
        let mut grant = rebuild.grant.clone();
        let mut chosen = ChosenBounds {
            choices: auto.choices.iter().map(|c| c.kind.describe()).collect(),
            epsilon: self.auto_epsilon,
            rho: self.auto_rho,
            ..ChosenBounds::default()
        };
        let mut ranges: std::collections::BTreeMap<String, ([f64; 2], f64)> = Default::default();
        for (choice, &Chosen { value, quantile }) in auto.choices.iter().zip(values) {
            if !choice.candidates.contains(&value) {
                return plan_err!("{value} is not a candidate for {}", choice.kind.describe());
            }
            match &choice.kind {
                AutoKind::MaxGroups => {
                    grant.max_groups = value as u64;
                    chosen.max_groups = Some((grant.max_groups, quantile));
                }
                AutoKind::MaxRows => {
                    grant.max_rows = value as u64;
                    chosen.max_rows = Some((grant.max_rows, quantile));
                }
                AutoKind::Upper(column) => {
                    let range = ranges.entry(column.clone()).or_default();
                    range.0[1] = value;
                    range.1 = quantile;
                }
                // A magnitude: 0 stays 0 (not -0, which would print as such).
                AutoKind::Lower(column) => {
                    ranges.entry(column.clone()).or_default().0[0] = 0.0 - value
                }
            }
        }
        for (column, ([lower, upper], quantile)) in ranges {
            // Both at 0 (every unit's values are 0): the smallest range.
            let upper = if upper > lower {
                upper
            } else {
                auto::magnitude_candidates()[1]
            };
            let count = grant.auto.columns.get(&column).copied().unwrap_or(2);
            grant.columns.insert(
                column.clone(),
                ColumnBounds {
                    lower,
                    upper,
                    candidates: evenly_spaced(lower, upper, count.max(2)),
                },
            );
            chosen.columns.insert(column, ([lower, upper], quantile));
        }
        grant.auto = AutoSettings {
            share: grant.auto.share,
            ..AutoSettings::default()
        };
        let mut query = Self::build_with(
            self.plan.clone(),
            &rebuild.aggregate,
            rebuild.aggregate_input.clone(),
            DpRequest {
                dataset: &self.dataset,
                unit: rebuild.unit.clone(),
                privacy_unit: &rebuild.privacy_unit,
                grant: &grant,
                epsilon: self.epsilon,
            },
            Some(chosen),
        )?;
        query.cache = self.cache;
        query.data_version = self.data_version.clone();
        Ok(query)
    }

    /// The query planned with every `auto` bound at its smallest candidate:
    /// with the worst case (this query) the two extremes of what
    /// [`Self::with_chosen`] builds, so that both are checked before any
    /// data is read (only the tightest caps keep a unit's top groups among
    /// published keys, say).
    pub fn with_tightest(&self) -> Result<Option<DpQuery>> {
        let Some(auto) = &self.auto else {
            return Ok(None);
        };
        let smallest: Vec<Chosen> = auto
            .choices
            .iter()
            .map(|choice| Chosen {
                value: choice.candidates[0],
                quantile: choice.quantile,
            })
            .collect();
        self.with_chosen(&smallest).map(Some)
    }

    /// A statistic as the consumer would write it, e.g. `sum(fare_eur)`.
    pub fn describe_statistic(&self, statistic: &Statistic) -> String {
        match &statistic.kind {
            StatisticKind::Rows if self.groups == Groups::Private => {
                "count(*) with group selection".to_string()
            }
            StatisticKind::Rows => "count(*)".to_string(),
            StatisticKind::Units => "count(DISTINCT unit)".to_string(),
            StatisticKind::Count(c) => format!("count({c})"),
            StatisticKind::Sum(c) => format!("sum({c})"),
            StatisticKind::SumOfSquares(c) => format!("sum({c}²)"),
            StatisticKind::Quantile { column, q, .. } => format!("quantile({column}, {q})"),
        }
    }

    /// The approved plan with its aggregate replaced by a scan of `noisy`,
    /// a table with exactly the aggregate's columns.
    pub fn finish_plan(&self, noisy: Arc<dyn TableSource>) -> Result<LogicalPlan> {
        let scan =
            LogicalPlanBuilder::scan(format!("{INTERNAL_PREFIX}noisy"), noisy, None)?.build()?;
        let scan_schema = scan.schema().clone();
        let exprs = self
            .aggregate_schema
            .iter()
            .zip(scan_schema.columns())
            .map(|((qualifier, field), column)| {
                col(column).alias_qualified(qualifier.cloned(), field.name())
            })
            .collect::<Vec<_>>();
        let replacement = LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(scan))?);
        let mut replaced = false;
        let plan = self
            .plan
            .clone()
            .transform_up(|node| match node {
                LogicalPlan::Aggregate(_) if !replaced => {
                    replaced = true;
                    Ok(Transformed::new(
                        replacement.clone(),
                        true,
                        TreeNodeRecursion::Jump,
                    ))
                }
                other => other.recompute_schema().map(Transformed::yes),
            })?
            .data;
        if !replaced {
            return plan_err!("the approved plan has no aggregate to replace");
        }
        Ok(plan)
    }
}

/// The group keys of a plain GROUP BY (grouping sets are refused).
fn group_keys(aggregate: &Aggregate) -> Result<Vec<Expr>> {
    aggregate
        .group_expr
        .iter()
        .map(|e| match e {
            Expr::GroupingSet(_) => {
                plan_err!("GROUPING SETS / ROLLUP / CUBE are not supported under differential privacy; supported: {SUPPORTED}")
            }
            other => Ok(other.clone()),
        })
        .collect()
}

/// Public keys when every key is a dataset column with published keys (read
/// through renames, and through casts only where they keep every published
/// key apart); else private selection.
///
/// Whatever the spelling, the released key set must be fixed before any
/// data is read, and each released group distinct: a key set with repeats
/// would release one group once per repeat, each with the full noise
/// budget (a `GROUP BY CAST(ts AS DATE)` over hourly keys released every
/// date 24 times).
fn groups(keys: &[Expr], aggregate: &Aggregate, grant: &DpGrant, source: &SourceColumns) -> Groups {
    if keys.is_empty() {
        return Groups::Single;
    }
    let mut lists = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let output_type = aggregate.schema.field(i).data_type();
        match published_keys(key, output_type, grant, source) {
            Some(list) => lists.push(list),
            None => return Groups::Private,
        }
    }
    let mut rows: Vec<Vec<ScalarValue>> = vec![vec![]];
    for list in lists {
        if rows.len().saturating_mul(list.len()) > MAX_PUBLIC_GROUPS {
            // Too many combinations to report each: choose groups privately.
            return Groups::Private;
        }
        rows = rows
            .into_iter()
            .flat_map(|row| {
                list.iter().map(move |v| {
                    let mut next = row.clone();
                    next.push(v.clone());
                    next
                })
            })
            .collect();
    }
    Groups::Public(rows)
}

/// The published keys of one GROUP BY key, as values of the key's type:
/// `None` unless the key is a column of the dp dataset with published keys
/// and any cast on the way maps them one-to-one (each casts back to itself
/// and no two become equal).
fn published_keys(
    key: &Expr,
    output_type: &DataType,
    grant: &DpGrant,
    source: &SourceColumns,
) -> Option<Vec<ScalarValue>> {
    let column = match strip_alias(key) {
        Expr::Column(c) => c,
        Expr::Cast(c) => match strip_alias(&c.expr) {
            Expr::Column(c) => c,
            _ => return None,
        },
        _ => return None,
    };
    let name = source.dataset_column(column)?;
    let published = grant.public_keys.get(&name)?;
    let mut distinct = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(published.len());
    for value in published {
        let cast = value.cast_to(output_type).ok()?;
        let back = cast.cast_to(&value.data_type()).ok()?;
        if back != *value || !distinct.insert(cast.clone()) {
            return None;
        }
        out.push(cast);
    }
    Some(out)
}

/// Resolves columns of the aggregate's input to the dp dataset's own
/// columns, through renames (aliases, CTEs, subquery aliases), filters and
/// joins, but not through any computation (a mask, a function, a cast).
struct SourceColumns<'a> {
    input: &'a LogicalPlan,
    dataset: &'a str,
}

impl SourceColumns<'_> {
    /// The dp dataset's column that `column` passes through unchanged.
    fn dataset_column(&self, column: &Column) -> Option<String> {
        let (table, name) = scanned_column(self.input, column)?;
        (table == self.dataset).then_some(name)
    }

    fn data_type(&self, column: &Column) -> Option<DataType> {
        self.input
            .schema()
            .qualified_field_from_column(column)
            .ok()
            .map(|(_, f)| f.data_type().clone())
    }
}

/// The (table, column) of the scan that `column` of `plan` passes through
/// unchanged, if any.
fn scanned_column(plan: &LogicalPlan, column: &Column) -> Option<(String, String)> {
    let index = plan.schema().index_of_column(column).ok()?;
    match plan {
        LogicalPlan::TableScan(scan) => Some((
            scan.table_name.table().to_string(),
            scan.projected_schema.field(index).name().clone(),
        )),
        LogicalPlan::Projection(projection) => match strip_alias(&projection.expr[index]) {
            Expr::Column(inner) => scanned_column(&projection.input, inner),
            _ => None,
        },
        LogicalPlan::SubqueryAlias(alias) => {
            let (qualifier, field) = alias.input.schema().qualified_field(index);
            scanned_column(&alias.input, &Column::new(qualifier.cloned(), field.name()))
        }
        LogicalPlan::Filter(_) | LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => {
            scanned_column(plan.inputs()[0], column)
        }
        LogicalPlan::Join(join) => {
            let left = join.left.schema().fields().len();
            let (side, index) = if index < left {
                (&join.left, index)
            } else {
                (&join.right, index - left)
            };
            let (qualifier, field) = side.schema().qualified_field(index);
            scanned_column(side, &Column::new(qualifier.cloned(), field.name()))
        }
        _ => None,
    }
}

/// Splits ε equally over the statistics and δ over those that need it.
/// Private selection runs on the row counts, so the `Rows` statistic takes
/// the selection's δ.
fn split_budget(
    statistics: &mut [Statistic],
    epsilon: f64,
    delta: f64,
    noise: NoiseKind,
    groups: &Groups,
) {
    let share = epsilon / statistics.len() as f64;
    let takes_delta = |s: &Statistic| {
        noise == NoiseKind::Gaussian && !matches!(s.kind, StatisticKind::Quantile { .. })
            || (*groups == Groups::Private && s.kind == StatisticKind::Rows)
    };
    let with_delta = statistics.iter().filter(|s| takes_delta(s)).count().max(1);
    for statistic in statistics.iter_mut() {
        statistic.epsilon = share;
        statistic.delta = if takes_delta(statistic) {
            delta / with_delta as f64
        } else {
            0.0
        };
    }
}

/// Collects the statistics the outputs need and builds the plan computing
/// them.
struct StatsBuilder<'a> {
    grant: &'a DpGrant,
    unit: &'a Column,
    source: &'a SourceColumns<'a>,
    /// The dataset's privacy-unit column, for COUNT(DISTINCT unit).
    privacy_unit: &'a str,
    /// Value columns in first-use order.
    values: Vec<ValueColumn>,
    statistics: Vec<StatisticKind>,
}

/// A column an aggregate reads.
struct ValueColumn {
    column: Column,
    bounds: ColumnBounds,
    /// Numeric columns are clamped and summed; others are only counted, so
    /// the plan only asks whether each value is NULL. (Casting text to a
    /// number would fail on some values, and that failure would tell
    /// whether such a value exists.)
    numeric: bool,
}

impl<'a> StatsBuilder<'a> {
    fn new(
        grant: &'a DpGrant,
        unit: &'a Column,
        source: &'a SourceColumns<'a>,
        privacy_unit: &'a str,
    ) -> Self {
        Self {
            grant,
            unit,
            source,
            privacy_unit,
            values: Vec::new(),
            statistics: Vec::new(),
        }
    }

    fn require(&mut self, kind: StatisticKind) -> usize {
        if let Some(i) = self.statistics.iter().position(|s| *s == kind) {
            return i;
        }
        self.statistics.push(kind);
        self.statistics.len() - 1
    }

    /// The statistics, with their columns and sensitivities (ε set later).
    fn statistics(&self) -> Vec<Statistic> {
        self.statistics
            .iter()
            .map(|kind| {
                let (column, scale_factor, per_row) = match kind {
                    StatisticKind::Rows => ("rows".to_string(), 1.0, 1),
                    StatisticKind::Units => ("units".to_string(), 1.0, 0),
                    StatisticKind::Count(c) => (format!("n{}", self.value_index(c)), 1.0, 1),
                    StatisticKind::Sum(c) => {
                        let (scale, max) = fixed_point(self.bounds(c).max_abs());
                        (format!("sum{}", self.value_index(c)), scale, max)
                    }
                    StatisticKind::SumOfSquares(c) => {
                        let (scale, max) = fixed_point(self.bounds(c).max_abs().powi(2));
                        (format!("sq{}", self.value_index(c)), scale, max)
                    }
                    StatisticKind::Quantile { column, .. } => {
                        (format!("vals{}", self.value_index(column)), 1.0, 1)
                    }
                };
                let sensitivity = match kind {
                    // A unit adds or removes itself once per group.
                    StatisticKind::Units => 1,
                    _ => self.grant.max_rows * per_row,
                };
                Statistic {
                    kind: kind.clone(),
                    column: format!("{INTERNAL_PREFIX}{column}"),
                    epsilon: 0.0,
                    delta: 0.0,
                    rho: 0.0,
                    scale_factor,
                    sensitivity,
                }
            })
            .collect()
    }

    fn value_index(&self, name: &str) -> usize {
        self.values
            .iter()
            .position(|v| v.column.name == name)
            .expect("statistics name only registered value columns")
    }

    fn bounds(&self, name: &str) -> &ColumnBounds {
        &self.values[self.value_index(name)].bounds
    }

    /// Registers what `expr` (one aggregate expression) needs.
    fn output(&mut self, expr: &Expr) -> Result<OutputKind> {
        let function = match expr {
            Expr::Alias(a) => return self.output(&a.expr),
            Expr::AggregateFunction(f) => f,
            other => {
                return plan_err!(
                    "`{other}` is not supported under differential privacy; supported: {SUPPORTED}"
                );
            }
        };
        let AggregateFunction { func, params } = function;
        let name = func.name().to_ascii_lowercase();
        if params.filter.is_some() || !params.order_by.is_empty() {
            return plan_err!(
                "`{name}` with FILTER or ORDER BY is not supported under differential privacy; supported: {SUPPORTED}"
            );
        }
        let column = match params.args.first().map(strip_cast) {
            Some(Expr::Column(c)) => Some(c.clone()),
            Some(Expr::Literal(..)) | None => None,
            Some(other) => {
                return plan_err!(
                    "`{name}({other})`: aggregates under differential privacy take a plain column; supported: {SUPPORTED}"
                );
            }
        };
        if params.distinct {
            return match (name.as_str(), &column) {
                ("count", Some(c)) if self.is_privacy_unit(c) => {
                    Ok(OutputKind::Count(self.require(StatisticKind::Units)))
                }
                _ => plan_err!(
                    "`{name}(DISTINCT …)` is supported only as COUNT(DISTINCT <privacy unit>) under differential privacy"
                ),
            };
        }
        match (name.as_str(), column) {
            ("count", None) => Ok(OutputKind::Count(self.require(StatisticKind::Rows))),
            ("count", Some(c)) => {
                self.value(&c, false)?;
                Ok(OutputKind::Count(
                    self.require(StatisticKind::Count(c.name)),
                ))
            }
            ("sum", Some(c)) => {
                self.value(&c, true)?;
                Ok(OutputKind::Sum {
                    sum: self.require(StatisticKind::Sum(c.name)),
                })
            }
            ("avg" | "mean", Some(c)) => {
                let bounds = self.value(&c, true)?;
                Ok(OutputKind::Avg {
                    sum: self.require(StatisticKind::Sum(c.name.clone())),
                    count: self.require(StatisticKind::Count(c.name)),
                    bounds,
                })
            }
            (
                "var" | "var_samp" | "var_pop" | "variance" | "stddev" | "stddev_samp"
                | "stddev_pop",
                Some(c),
            ) => {
                let bounds = self.value(&c, true)?;
                Ok(OutputKind::Variance {
                    sum: self.require(StatisticKind::Sum(c.name.clone())),
                    count: self.require(StatisticKind::Count(c.name.clone())),
                    squares: self.require(StatisticKind::SumOfSquares(c.name)),
                    bounds,
                    sample: !name.ends_with("_pop"),
                    root: name.starts_with("stddev"),
                })
            }
            ("median" | "approx_percentile_cont", Some(c)) => {
                let q = match name.as_str() {
                    "median" => 0.5,
                    _ => quantile_argument(&params.args)?,
                };
                let bounds = self.value(&c, true)?;
                Ok(OutputKind::Quantile(self.require(
                    StatisticKind::Quantile {
                        column: c.name,
                        q,
                        bounds,
                    },
                )))
            }
            (other, _) => plan_err!(
                "`{other}` is not supported under differential privacy; supported: {SUPPORTED}"
            ),
        }
    }

    /// Whether `column` is the dataset's privacy unit, whatever it is
    /// called on the way (the rewrite may have renamed it).
    fn is_privacy_unit(&self, column: &Column) -> bool {
        column.name == self.unit.name
            || self.source.dataset_column(column).as_deref() == Some(self.privacy_unit)
    }

    /// Registers a value column; `needs_bounds`: it is summed or ranked.
    /// What a column's type allows is decided here, before any data is
    /// read, never by a value failing later.
    fn value(&mut self, column: &Column, needs_bounds: bool) -> Result<ColumnBounds> {
        let Some(data_type) = self.source.data_type(column) else {
            return plan_err!(
                "column `{}` cannot be traced to the aggregate's input",
                column.name
            );
        };
        let numeric = is_number(&data_type);
        if needs_bounds && !numeric {
            return plan_err!(
                "column `{}` is {data_type}, not a number: under differential privacy it can be counted but not summed, averaged or ranked",
                column.name
            );
        }
        let bounds = match self.grant.columns.get(&column.name) {
            Some(b) => b.clone(),
            None if !needs_bounds => ColumnBounds {
                lower: 0.0,
                upper: 1.0,
                candidates: vec![],
            },
            None => {
                return plan_err!(
                    "column `{}` has no bounds in the policy's dp block, so it can be counted but not summed, averaged or ranked",
                    column.name
                );
            }
        };
        if !self.values.iter().any(|v| v.column.name == column.name) {
            self.values.push(ValueColumn {
                column: column.clone(),
                bounds: bounds.clone(),
                numeric,
            });
        }
        Ok(bounds)
    }

    /// The bias estimates a query gets from `epsilon` (none at 0): rows
    /// counted, rows over each cap, and values clamped per bounded column,
    /// each with its L1 sensitivity over all reported groups.
    fn bias_statistics(
        &self,
        max_groups: u64,
        cap_groups: bool,
        epsilon: f64,
    ) -> Vec<BiasStatistic> {
        if epsilon <= 0.0 {
            return Vec::new();
        }
        // A unit adds at most `max_rows` to each of its `max_groups` groups'
        // counted rows, rows over the cap and clamped values; its dropped
        // groups' rows are clipped at `max_groups × max_rows` in the plan.
        let per_groups = max_groups * self.grant.max_rows;
        let mut kinds = vec![
            (BiasKind::Counted, "rows".to_string(), per_groups),
            (BiasKind::OverMaxRows, "over_rows".to_string(), per_groups),
        ];
        if cap_groups {
            let clip = self.grant.max_groups * self.grant.max_rows;
            kinds.push((BiasKind::OverMaxGroups, "dropped".to_string(), clip));
        }
        for (j, value) in self.values.iter().enumerate() {
            if self.clamps(j) {
                let kind = BiasKind::Clamped {
                    column: value.column.name.clone(),
                    bounds: value.bounds.clone(),
                };
                kinds.push((kind, format!("cl{j}"), per_groups));
            }
        }
        let share = epsilon / kinds.len() as f64;
        kinds
            .into_iter()
            .map(|(kind, column, sensitivity)| BiasStatistic {
                kind,
                column: format!("{INTERNAL_PREFIX}{column}"),
                epsilon: share,
                rho: 0.0,
                sensitivity,
            })
            .collect()
    }

    /// The bounded per-group statistics plan (see the module docs); with
    /// `bias`, it also counts what the bounds leave out.
    fn plan(
        &self,
        input: LogicalPlan,
        keys: &[Expr],
        groups: &Groups,
        cap_groups: bool,
        bias: bool,
    ) -> Result<LogicalPlan> {
        let p = |name: &str| format!("{INTERNAL_PREFIX}{name}");
        let c = |name: &str| col(Column::new_unqualified(p(name)));
        let key_names: Vec<String> = (0..keys.len()).map(|i| p(&format!("k{i}"))).collect();
        let key_cols = || key_names.iter().map(|k| col(Column::new_unqualified(k)));
        let unit = c("unit");

        // Per row: keys, unit, clamped values and their fixed-point forms
        // (and, for the bias estimates, whether each value was clamped).
        let mut row_exprs = self.keys_and_unit(keys, &key_names);
        for (j, value) in self.values.iter().enumerate() {
            let (column, bounds) = (&value.column, &value.bounds);
            if !value.numeric {
                row_exprs.push(presence(col(column.clone()))?.alias(p(&format!("v{j}"))));
                continue;
            }
            let clamped = clamp_value(col(column.clone()), bounds)?;
            let (scale, _) = fixed_point(bounds.max_abs());
            let (square_scale, _) = fixed_point(bounds.max_abs().powi(2));
            row_exprs.push(clamped.clone().alias(p(&format!("v{j}"))));
            if self.sums_of(j) {
                row_exprs.push(to_fixed(clamped.clone() * lit(scale)).alias(p(&format!("s{j}"))));
            }
            if self.squares_of(j) {
                row_exprs.push(
                    to_fixed(clamped.clone() * clamped * lit(square_scale))
                        .alias(p(&format!("q{j}"))),
                );
            }
            if bias && self.clamps(j) {
                row_exprs
                    .push(out_of_bounds(col(column.clone()), bounds)?.alias(p(&format!("c{j}"))));
            }
        }
        let mut rows = LogicalPlanBuilder::from(input).project(row_exprs)?;
        // With published keys only they are reported: rows of any other key
        // (a NULL, a value not listed) are left out before units choose
        // their groups, so they neither take a unit's place in a published
        // group nor count in the bias estimates. The list is public, so
        // filtering by it is a per-row step like any WHERE.
        if let Groups::Public(published) = groups {
            rows = rows.filter(published_filter(&key_names, published))?;
        }

        // Per (unit, group).
        let mut per_unit = vec![count(lit(1)).alias(p("rows"))];
        for j in 0..self.values.len() {
            let v = c(&format!("v{j}"));
            per_unit.push(count(v.clone()).alias(p(&format!("n{j}"))));
            if self.sums_of(j) {
                per_unit.push(sum(c(&format!("s{j}"))).alias(p(&format!("sum{j}"))));
            }
            if self.squares_of(j) {
                per_unit.push(sum(c(&format!("q{j}"))).alias(p(&format!("sq{j}"))));
            }
            if self.quantiles_of(j) {
                per_unit.push(array_agg(v).alias(p(&format!("vals{j}"))));
            }
            if bias && self.clamps(j) {
                per_unit.push(sum(c(&format!("c{j}"))).alias(p(&format!("cl{j}"))));
            }
        }
        let cell_names: Vec<String> = key_names
            .iter()
            .cloned()
            .chain(per_unit.iter().map(|e| e.schema_name().to_string()))
            .collect();
        let mut by_unit = vec![unit.clone()];
        by_unit.extend(key_cols());
        let mut plan = rows.aggregate(by_unit, per_unit)?;

        // Each unit keeps the `max_groups` groups it has most rows in (ties
        // by key): a choice that depends on the unit's own rows only, and
        // keeps as much of its data as the limit allows.
        if cap_groups {
            plan = keep_top_groups(plan, &cell_names, keys.len(), self.grant.max_groups)?;
        }

        // Each (unit, group) counts at most `max_rows` rows.
        let r = self.grant.max_rows as i64;
        let cap = |e: Expr| when(e.clone().gt(lit(r)), lit(r)).otherwise(e);
        let rows_col = c("rows");
        let mut bounded: Vec<Expr> = key_cols().collect();
        bounded.push(cap(rows_col.clone())?.alias(p("rows")));
        for (j, ValueColumn { bounds, .. }) in self.values.iter().enumerate() {
            let n = c(&format!("n{j}"));
            bounded.push(cap(n.clone())?.alias(p(&format!("n{j}"))));
            let (_, max) = fixed_point(bounds.max_abs());
            let (_, max_sq) = fixed_point(bounds.max_abs().powi(2));
            let totals = [
                (format!("sum{j}"), max, self.sums_of(j)),
                (format!("sq{j}"), max_sq, self.squares_of(j)),
            ];
            for (name, max, _) in totals.into_iter().filter(|t| t.2) {
                bounded.push(rescale(c(&name), n.clone(), r, max as i64 * r)?.alias(p(&name)));
            }
            if self.quantiles_of(j) {
                bounded.push(c(&format!("vals{j}")));
            }
            if bias && self.clamps(j) {
                let clamped = c(&format!("cl{j}"));
                bounded
                    .push(counted_share(clamped, rows_col.clone(), r)?.alias(p(&format!("cl{j}"))));
            }
        }
        if bias {
            // Rows over the cap, at most `max_rows` more per (unit, group).
            let over = when(
                rows_col.clone().gt(lit(r)),
                least(rows_col.clone() - lit(r), lit(r)),
            )
            .otherwise(lit(0i64))?;
            bounded.push(over.alias(p("over_rows")));
            if cap_groups {
                let clip = (self.grant.max_groups * self.grant.max_rows) as i64;
                bounded.push(least(c("dropped"), lit(clip)).alias(p("dropped")));
            }
        }
        let plan = plan.project(bounded)?;

        // Per group.
        let mut totals = vec![
            sum(c("rows")).alias(p("rows")),
            count(lit(1)).alias(p("units")),
        ];
        for j in 0..self.values.len() {
            let names = [
                (format!("n{j}"), true),
                (format!("sum{j}"), self.sums_of(j)),
                (format!("sq{j}"), self.squares_of(j)),
                (format!("cl{j}"), bias && self.clamps(j)),
            ];
            for (name, _) in names.into_iter().filter(|n| n.1) {
                let column = c(&name);
                // Fixed-point totals add up in 128 bits: no group can
                // overflow them, so no group size makes the plan fail.
                let column = if name.starts_with("sum") || name.starts_with("sq") {
                    cast(column, DataType::Decimal128(38, 0))
                } else {
                    column
                };
                totals.push(sum(column).alias(p(&name)));
            }
            if self.quantiles_of(j) {
                let name = p(&format!("vals{j}"));
                totals.push(array_agg(col(Column::new_unqualified(&name))).alias(name));
            }
        }
        if bias {
            totals.push(sum(c("over_rows")).alias(p("over_rows")));
            if cap_groups {
                totals.push(sum(c("dropped")).alias(p("dropped")));
            }
        }
        plan.aggregate(key_cols(), totals)?.build()
    }

    /// The bounds this query chooses from the data: those of its grant
    /// written `auto` that the query uses.
    fn auto_choices(&self, groups: &Groups) -> Vec<AutoChoice> {
        let auto = &self.grant.auto;
        let mut choices = Vec::new();
        let several_groups = match groups {
            Groups::Single => false,
            Groups::Public(keys) => keys.len() > 1,
            Groups::Private => true,
        };
        if auto.max_groups && several_groups {
            choices.push(AutoChoice::new(
                AutoKind::MaxGroups,
                format!("{INTERNAL_PREFIX}groups"),
                auto::GROUPS_QUANTILE,
                Grid::Contributions,
            ));
        }
        if auto.max_rows {
            choices.push(AutoChoice::new(
                AutoKind::MaxRows,
                format!("{INTERNAL_PREFIX}max_rows"),
                auto::ROWS_QUANTILE,
                Grid::Contributions,
            ));
        }
        for (j, value) in self.values.iter().enumerate() {
            let name = &value.column.name;
            if !(self.clamps(j) && auto.columns.contains_key(name)) {
                continue;
            }
            for (kind, column) in [
                (
                    AutoKind::Upper(name.clone()),
                    format!("{INTERNAL_PREFIX}hi{j}"),
                ),
                (
                    AutoKind::Lower(name.clone()),
                    format!("{INTERNAL_PREFIX}lo{j}"),
                ),
            ] {
                choices.push(AutoChoice::new(
                    kind,
                    column,
                    auto::VALUES_QUANTILE,
                    Grid::Magnitudes,
                ));
            }
        }
        choices
    }

    /// The plan the `auto` choices read: per privacy unit its number of
    /// groups, its largest group's rows, and for each auto column its
    /// largest value (0 if below 0) and its smallest negated (0 if above
    /// 0; NULL, so not counted, if it has none), from the rows the
    /// statistics plan would read; then, per choice,
    /// those values counted per position on the choice's grid (one row).
    fn auto_plan(
        &self,
        input: LogicalPlan,
        keys: &[Expr],
        groups: &Groups,
        choices: &[AutoChoice],
    ) -> Result<LogicalPlan> {
        let p = |name: &str| format!("{INTERNAL_PREFIX}{name}");
        let c = |name: &str| col(Column::new_unqualified(p(name)));
        let key_names: Vec<String> = (0..keys.len()).map(|i| p(&format!("k{i}"))).collect();
        let columns: Vec<usize> = (0..self.values.len())
            .filter(|&j| choices.iter().any(|ch| ch.column == p(&format!("hi{j}"))))
            .collect();
        let mut row_exprs = self.keys_and_unit(keys, &key_names);
        for &j in &columns {
            let value = &self.values[j];
            row_exprs.push(
                clamp_value(col(value.column.clone()), &value.bounds)?.alias(p(&format!("v{j}"))),
            );
        }
        let mut rows = LogicalPlanBuilder::from(input).project(row_exprs)?;
        if let Groups::Public(published) = groups {
            rows = rows.filter(published_filter(&key_names, published))?;
        }
        let mut by_cell = vec![count(lit(1)).alias(p("rows"))];
        for &j in &columns {
            let v = c(&format!("v{j}"));
            by_cell.push(max(v.clone()).alias(p(&format!("hi{j}"))));
            by_cell.push(min(v).alias(p(&format!("lo{j}"))));
        }
        let mut by_unit_keys = vec![c("unit")];
        by_unit_keys.extend(key_names.iter().map(|k| col(Column::new_unqualified(k))));
        let mut per_unit = vec![
            count(lit(1)).alias(p("groups")),
            max(c("rows")).alias(p("max_rows")),
        ];
        for &j in &columns {
            per_unit.push(max(c(&format!("hi{j}"))).alias(p(&format!("hi{j}"))));
            per_unit.push(min(c(&format!("lo{j}"))).alias(p(&format!("lo{j}"))));
        }
        let mut out = vec![
            cast(c("groups"), DataType::Float64).alias(p("groups")),
            cast(c("max_rows"), DataType::Float64).alias(p("max_rows")),
        ];
        // A unit without a value in the column (all NULL or NaN) stays
        // NULL: not counted, rather than counted as 0 and pulling the
        // bound of a sparse column towards nothing.
        let none = || lit(ScalarValue::Float64(None));
        for &j in &columns {
            let (hi, lo) = (c(&format!("hi{j}")), c(&format!("lo{j}")));
            out.push(
                when(hi.clone().is_null(), none())
                    .when(hi.clone().gt(lit(0.0)), hi)
                    .otherwise(lit(0.0))?
                    .alias(p(&format!("hi{j}"))),
            );
            out.push(
                when(lo.clone().is_null(), none())
                    .when(lo.clone().lt(lit(0.0)), -lo)
                    .otherwise(lit(0.0))?
                    .alias(p(&format!("lo{j}"))),
            );
        }
        // One row: the units' values counted per grid position, so nothing
        // per unit is held outside DataFusion's pool.
        let positions: Vec<Expr> = choices
            .iter()
            .map(|choice| {
                AggregateUDF::from(GridPositions::new(choice.grid))
                    .call(vec![col(Column::new_unqualified(&choice.column))])
                    .alias(&choice.column)
            })
            .collect();
        rows.aggregate(by_unit_keys, by_cell)?
            .aggregate(vec![c("unit")], per_unit)?
            .project(out)?
            .aggregate(Vec::<Expr>::new(), positions)?
            .build()
    }

    /// A row's group keys (named `key_names`) and its privacy unit, the
    /// first columns of every per-row projection.
    fn keys_and_unit(&self, keys: &[Expr], key_names: &[String]) -> Vec<Expr> {
        let mut exprs: Vec<Expr> = keys
            .iter()
            .zip(key_names)
            .map(|(k, name)| strip_alias(k).clone().alias(name))
            .collect();
        exprs.push(col(self.unit.clone()).alias(format!("{INTERNAL_PREFIX}unit")));
        exprs
    }

    /// Whether column `j` is clamped (summed, squared or ranked).
    fn clamps(&self, j: usize) -> bool {
        self.values[j].numeric && (self.sums_of(j) || self.squares_of(j) || self.quantiles_of(j))
    }

    fn sums_of(&self, j: usize) -> bool {
        let name = &self.values[j].column.name;
        self.statistics
            .iter()
            .any(|s| matches!(s, StatisticKind::Sum(c) if c == name))
    }

    fn squares_of(&self, j: usize) -> bool {
        let name = &self.values[j].column.name;
        self.statistics
            .iter()
            .any(|s| matches!(s, StatisticKind::SumOfSquares(c) if c == name))
    }

    fn quantiles_of(&self, j: usize) -> bool {
        let name = &self.values[j].column.name;
        self.statistics
            .iter()
            .any(|s| matches!(s, StatisticKind::Quantile { column, .. } if column == name))
    }
}

/// Fixed-point scale (a power of two) and the largest scaled magnitude for
/// values of at most `max_abs`.
pub fn fixed_point(max_abs: f64) -> (f64, u64) {
    if max_abs <= 0.0 {
        return (1.0, 0);
    }
    let exponent = (FIXED_POINT_RANGE / max_abs).log2().floor() as i32;
    let scale = 2f64.powi(exponent);
    (scale, (max_abs * scale).round() as u64)
}

/// Numbers of every width cast to Float64 without fail (others would not).
fn is_number(data_type: &DataType) -> bool {
    data_type.is_numeric() || *data_type == DataType::Null
}

/// 1.0 where the value is present, NULL where it is NULL: all that COUNT
/// needs of a column that is not a number, and it cannot fail.
fn presence(value: Expr) -> Result<Expr> {
    when(value.is_null(), lit(ScalarValue::Float64(None))).otherwise(lit(1.0))
}

/// Whether a Float64 value is NULL or NaN: skipped, never clamped.
fn null_or_nan(value: &Expr) -> Expr {
    value
        .clone()
        .is_null()
        .or(datafusion_functions::math::expr_fn::isnan(value.clone()))
}

/// NULL for NULL and NaN; otherwise the value clamped into the bounds.
/// Only called on numeric columns: their casts to Float64 cannot fail.
fn clamp_value(value: Expr, bounds: &ColumnBounds) -> Result<Expr> {
    let value = cast(value, DataType::Float64);
    when(null_or_nan(&value), lit(ScalarValue::Float64(None)))
        .when(value.clone().lt(lit(bounds.lower)), lit(bounds.lower))
        .when(value.clone().gt(lit(bounds.upper)), lit(bounds.upper))
        .otherwise(value)
}

fn to_fixed(value: Expr) -> Expr {
    cast(
        datafusion_functions::math::expr_fn::round(vec![value]),
        DataType::Int64,
    )
}

/// A (unit, group) total over `n` values, rescaled to at most `max_rows`
/// values' worth (the unit's own mean times `max_rows`) and clamped to
/// `±limit`. NULL sums (no values) count as 0.
fn rescale(total: Expr, n: Expr, max_rows: i64, limit: i64) -> Result<Expr> {
    let total = datafusion_functions::core::expr_fn::coalesce(vec![total, lit(0i64)]);
    let scaled = to_fixed(
        cast(total.clone(), DataType::Float64) * lit(max_rows as f64)
            / cast(n.clone(), DataType::Float64),
    );
    let rescaled = when(n.gt(lit(max_rows)), scaled).otherwise(total)?;
    when(rescaled.clone().gt(lit(limit)), lit(limit))
        .when(rescaled.clone().lt(lit(-limit)), lit(-limit))
        .otherwise(rescaled)
}

fn strip_cast(expr: &Expr) -> &Expr {
    match expr {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        Expr::Alias(a) => strip_cast(&a.expr),
        other => other,
    }
}

fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

fn quantile_argument(args: &[Expr]) -> Result<f64> {
    match args.get(1).map(strip_cast) {
        Some(Expr::Literal(value, _)) => match value.cast_to(&DataType::Float64)? {
            ScalarValue::Float64(Some(q)) if (0.0..=1.0).contains(&q) => Ok(q),
            _ => plan_err!("the quantile must be a number from 0 to 1"),
        },
        _ => plan_err!("the quantile must be a literal number from 0 to 1"),
    }
}

/// `k0 IN (…) AND k1 IN (…) …`: each key among its published values (the
/// published combinations are every combination of those).
fn published_filter(key_names: &[String], published: &[Vec<ScalarValue>]) -> Expr {
    let mut filter = lit(true);
    for (i, name) in key_names.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        let values: Vec<ScalarValue> = published
            .iter()
            .map(|row| row[i].clone())
            .filter(|v| seen.insert(v.clone()))
            .collect();
        let list = values.into_iter().map(lit).collect();
        filter = filter.and(col(Column::new_unqualified(name)).in_list(list, false));
    }
    filter
}

/// The smaller of two integers.
fn least(a: Expr, b: Expr) -> Expr {
    when(a.clone().gt(b.clone()), b)
        .otherwise(a)
        .expect("a CASE with one branch and an ELSE")
}

/// 1 where a number lies outside the bounds (and would be clamped), else 0
/// (NULL and NaN too, which are skipped, not clamped).
fn out_of_bounds(value: Expr, bounds: &ColumnBounds) -> Result<Expr> {
    let value = cast(value, DataType::Float64);
    when(null_or_nan(&value), lit(0i64))
        .when(
            value
                .clone()
                .lt(lit(bounds.lower))
                .or(value.gt(lit(bounds.upper))),
            lit(1i64),
        )
        .otherwise(lit(0i64))
}

/// A (unit, group)'s clamped values weighted as its counted rows are:
/// `clamped × max_rows / rows` when the rows were capped (at most
/// `max_rows`), else `clamped`.
fn counted_share(clamped: Expr, rows: Expr, max_rows: i64) -> Result<Expr> {
    let clamped = datafusion_functions::core::expr_fn::coalesce(vec![clamped, lit(0i64)]);
    let scaled = to_fixed(
        cast(clamped.clone(), DataType::Float64) * lit(max_rows as f64)
            / cast(rows.clone(), DataType::Float64),
    );
    when(rows.gt(lit(max_rows)), scaled).otherwise(clamped)
}

/// Keeps each unit's `k` largest (unit, group) cells of `plan` (columns
/// `unit` and `cells`) with [`TopGroups`] in one aggregation by unit, and
/// adds `dropped`: the rows of the unit's other cells, on one kept cell.
fn keep_top_groups(
    plan: LogicalPlanBuilder,
    cells: &[String],
    key_count: usize,
    k: u64,
) -> Result<LogicalPlanBuilder> {
    use datafusion_functions::core::expr_fn::{get_field, named_struct};
    let p = |name: &str| format!("{INTERNAL_PREFIX}{name}");
    let c = |name: &str| col(Column::new_unqualified(p(name)));
    let fields = cells
        .iter()
        .flat_map(|name| [lit(name.clone()), col(Column::new_unqualified(name))])
        .collect();
    // The order among a unit's groups compares keys in Arrow's row format;
    // a key type it cannot compare is refused now, before any budget is
    // reserved, not at DoGet.
    let sort_fields = cells[..key_count]
        .iter()
        .map(|name| {
            let field = plan.schema().field_with_unqualified_name(name)?;
            Ok(SortField::new(field.data_type().clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    if !RowConverter::supports_fields(&sort_fields) {
        return plan_err!(
            "a GROUP BY key of this type cannot be used under differential privacy with more groups than max_groups"
        );
    }
    let cell = named_struct(fields).alias(p("cell"));
    // The cell's row count directly follows its keys.
    let top = AggregateUDF::from(TopGroups::new(
        usize::try_from(k).unwrap_or(usize::MAX),
        key_count,
        key_count,
    ));
    let mut unpacked: Vec<Expr> = cells
        .iter()
        .map(|name| get_field(c("cells"), name.clone()).alias(name))
        .collect();
    unpacked.push(get_field(c("cells"), DROPPED.to_string()).alias(p("dropped")));
    plan.project(vec![c("unit"), cell])?
        .aggregate(
            vec![c("unit")],
            vec![top.call(vec![c("cell")]).alias(p("cells"))],
        )?
        .unnest_column(Column::new_unqualified(p("cells")))?
        .project(unpacked)
}
