//! Bounds chosen from the data: `max_groups: auto`, `max_rows: auto` and
//! `bounds: auto` for a column.
//!
//! A query over such a grant runs in two steps. First a small plan computes
//! one value per privacy unit and choice (its groups, its largest group's
//! rows, and the largest and smallest value of each auto column) and counts
//! them per position on a fixed grid of candidates, inside DataFusion
//! ([`super::grid_positions`]); a differentially private quantile over each
//! grid, paid from a stated share of the query's own ε, picks each bound. Then the query is planned
//! again with the chosen bounds ([`super::DpQuery::with_chosen`]) and
//! answered from the rest of its ε.
//!
//! Each unit is one row of the first plan, so adding or removing a unit
//! moves each quantile's input by one value: every release has symmetric
//! distance 1. The quantile is an exponential mechanism that prefers the
//! smaller of two equally good candidates (`sluice_privacy::noise::
//! release_bound`), so a grid that runs far beyond the data costs nothing.
//! The bounds are a DP release themselves, so the second step (and
//! whatever it does with them, a failure included) is post-processing.
//!
//! The worst case, every bound at its grid's top, is what the query is
//! planned, checked and announced with at GetFlightInfo.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion_common::Column;
use datafusion_expr::LogicalPlan;
use datafusion_expr::logical_plan::Aggregate;

use super::grid_positions::Grid;
use super::settings::DpGrant;

/// Share of a query's ε spent on choosing its `auto` bounds when the policy
/// does not say.
pub const DEFAULT_AUTO_SHARE: f64 = 0.1;
/// Largest `max_groups` or `max_rows` an `auto` bound may choose: beyond
/// it the noise of a sum would swamp any answer at the smallest ε.
pub const CONTRIBUTION_CEILING: u64 = 4096;
/// Largest magnitude an `auto` value bound may choose (about 1.6e9).
pub const VALUE_CEILING: f64 = 1_610_612_736.0;
/// Smallest positive magnitude on the value grid (2^-10).
const VALUE_FLOOR: f64 = 1.0 / 1024.0;

/// Quantile of units' group counts that `max_groups: auto` aims at: a unit
/// beyond it loses its smallest groups, which hold few of its rows.
pub const GROUPS_QUANTILE: f64 = 0.9;
/// Quantile of units' largest group that `max_rows: auto` aims at: rows
/// beyond the cap are the heavy units' rows, so the cap sits high.
pub const ROWS_QUANTILE: f64 = 0.99;
/// Quantile of units' largest (and smallest) values that `bounds: auto`
/// aims at.
pub const VALUES_QUANTILE: f64 = 0.99;
/// Which bounds of a grant are `auto`, and what choosing them costs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AutoSettings {
    pub max_groups: bool,
    pub max_rows: bool,
    /// Auto columns and their number of evenly spaced quantile candidates.
    pub columns: BTreeMap<String, u32>,
    /// Share of each query's ε spent choosing (when a query uses one).
    pub share: f64,
}

impl AutoSettings {
    pub fn any(&self) -> bool {
        self.max_groups || self.max_rows || !self.columns.is_empty()
    }

    /// Auto only where both are (a fixed bound is the stricter one).
    pub fn restrict(&self, other: &AutoSettings) -> AutoSettings {
        AutoSettings {
            max_groups: self.max_groups && other.max_groups,
            max_rows: self.max_rows && other.max_rows,
            columns: self
                .columns
                .iter()
                .filter_map(|(name, n)| Some((name.clone(), (*n).min(*other.columns.get(name)?))))
                .collect(),
            share: self.share.min(other.share),
        }
    }
}

/// `max_groups` and `max_rows` candidates: 1, 2, 3, 4, 6, 8, 12, … up to
/// [`CONTRIBUTION_CEILING`] (steps of at most 1.5×).
pub fn contribution_candidates() -> Vec<f64> {
    let mut out = vec![1.0];
    let mut power = 2u64;
    while power <= CONTRIBUTION_CEILING {
        out.push(power as f64);
        let between = power + power / 2;
        if between <= CONTRIBUTION_CEILING {
            out.push(between as f64);
        }
        power *= 2;
    }
    out
}

/// Magnitude candidates of a value bound: 0, then 2^-10, 1.5 × 2^-10, … up
/// to [`VALUE_CEILING`].
pub fn magnitude_candidates() -> Vec<f64> {
    let mut out = vec![0.0];
    let mut power = VALUE_FLOOR;
    while power <= VALUE_CEILING {
        out.push(power);
        if power * 1.5 <= VALUE_CEILING {
            out.push(power * 1.5);
        }
        power *= 2.0;
    }
    out
}

/// One bound to choose.
#[derive(Debug, Clone, PartialEq)]
pub enum AutoKind {
    MaxGroups,
    MaxRows,
    /// The upper bound of a column: a quantile of units' largest value
    /// (counted as 0 when below 0).
    Upper(String),
    /// The lower bound of a column, as a magnitude: a quantile of units'
    /// smallest value negated (counted as 0 when above 0).
    Lower(String),
}

impl AutoKind {
    pub fn describe(&self) -> String {
        match self {
            AutoKind::MaxGroups => "max_groups".into(),
            AutoKind::MaxRows => "max_rows".into(),
            AutoKind::Upper(c) => format!("upper bound of {c}"),
            AutoKind::Lower(c) => format!("lower bound of {c}"),
        }
    }
}

/// One DP quantile of units' values over a fixed grid: the per-unit
/// plan's `column` holds the counts per grid position
/// ([`super::grid_positions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoChoice {
    pub kind: AutoKind,
    pub column: String,
    pub quantile: f64,
    pub grid: Grid,
    /// `grid`'s candidates, ascending.
    pub candidates: Vec<f64>,
}

impl AutoChoice {
    pub fn new(kind: AutoKind, column: String, quantile: f64, grid: Grid) -> Self {
        Self {
            kind,
            column,
            quantile,
            grid,
            candidates: grid.candidates(),
        }
    }
}

/// What a query with `auto` bounds chooses before it is answered (its
/// cost is [`super::DpQuery::auto_epsilon`]).
#[derive(Debug, Clone)]
pub struct AutoBounds {
    /// One row: per choice, a column of counts per grid position (over
    /// one value per privacy unit).
    pub plan: LogicalPlan,
    pub choices: Vec<AutoChoice>,
    pub(super) rebuild: Arc<Rebuild>,
}

/// What planning the query again needs.
#[derive(Debug)]
pub(super) struct Rebuild {
    pub aggregate: Aggregate,
    pub aggregate_input: LogicalPlan,
    pub unit: Column,
    pub privacy_unit: String,
    pub grant: DpGrant,
}

/// What one choice chose: a candidate, and the quantile it aimed at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chosen {
    pub value: f64,
    pub quantile: f64,
}

/// The bounds a query chose, as the answer describes them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChosenBounds {
    /// With the quantile each was chosen at.
    pub max_groups: Option<(u64, f64)>,
    pub max_rows: Option<(u64, f64)>,
    /// Per column: `[lower, upper]` and the quantile of the upper bound.
    pub columns: BTreeMap<String, ([f64; 2], f64)>,
    /// What was chosen, as [`AutoKind::describe`] says it.
    pub choices: Vec<String>,
    pub epsilon: f64,
    pub rho: f64,
}

impl ChosenBounds {
    /// The bounds chosen, their quantiles and cost, for the answer's
    /// metadata and the CLI, e.g. `max_rows = 48, fare_eur in [0, 6] …`.
    pub fn sentence(&self) -> String {
        // At a grid's top the quantile may lie beyond it: say so.
        let aim = |at: f64, of: &str, top: bool| match top {
            true => format!("the grid's top: the {at:.3}-quantile of {of} may lie beyond it"),
            false => format!("≈ the {at:.3}-quantile of {of}"),
        };
        let ceiling = CONTRIBUTION_CEILING;
        let mut parts = Vec::new();
        if let Some((g, at)) = self.max_groups {
            let why = aim(at, "units' group counts", g >= ceiling);
            parts.push(format!("max_groups = {g} ({why})"));
        }
        if let Some((r, at)) = self.max_rows {
            let why = aim(at, "units' largest group", r >= ceiling);
            parts.push(format!("max_rows = {r} ({why})"));
        }
        for (column, ([lower, upper], at)) in self.columns.iter().map(|(c, v)| (c, *v)) {
            let top = upper >= VALUE_CEILING || lower <= -VALUE_CEILING;
            let why = aim(at, "units' extreme values", top);
            parts.push(format!("{column} in [{lower}, {upper}] ({why})"));
        }
        let cost = if self.rho > 0.0 {
            format!("ρ {:.4}", self.rho)
        } else {
            format!("ε {:.4}", self.epsilon)
        };
        format!(
            "{}; chosen from the data with differential privacy for {cost} of this query's budget",
            parts.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grids_grow_by_at_most_half_a_step_and_stop_at_the_ceiling() {
        let rows = contribution_candidates();
        assert_eq!(&rows[..8], &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]);
        assert_eq!(*rows.last().unwrap(), CONTRIBUTION_CEILING as f64);
        let values = magnitude_candidates();
        assert_eq!(values[0], 0.0);
        assert_eq!(values[1], VALUE_FLOOR);
        assert_eq!(*values.last().unwrap(), VALUE_CEILING);
        for grid in [&rows, &values[1..].to_vec()] {
            for w in grid.windows(2) {
                assert!(w[0] < w[1] && w[1] <= 2.0 * w[0], "{w:?}");
            }
        }
    }
}
