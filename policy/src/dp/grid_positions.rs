//! `sluice_grid_positions(value)`: how many values fall at each position
//! of a fixed grid of bound candidates, counted inside DataFusion.
//!
//! An `auto` bound is a DP quantile over one value per privacy unit, and
//! its score for a candidate needs only how many values lie strictly below
//! and strictly above it. Those counts come from a histogram over the
//! grid's positions, so the query never holds the per-unit values: the
//! per-unit aggregation runs under the query's memory pool and deadline
//! like any other, and this aggregate keeps `2 × candidates + 1` counters
//! (a few hundred bytes) however many units there are.
//!
//! Positions on a grid `c[0] < … < c[m-1]`: `2i` is strictly between
//! `c[i-1]` and `c[i]` (`0` is below `c[0]`), `2i + 1` is exactly `c[i]`,
//! `2m` is above `c[m-1]`. NULL and NaN have no position and are not
//! counted (a unit without a value is the same for every candidate).

use std::sync::Arc;

use datafusion_common::arrow::array::{Array, ArrayRef, AsArray, UInt64Array};
use datafusion_common::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, UInt64Type};
use datafusion_common::utils::SingleRowListArrayBuilder;
use datafusion_common::{Result, ScalarValue, exec_err};
use datafusion_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion_expr::utils::format_state_name;
use datafusion_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

use super::auto::{contribution_candidates, magnitude_candidates};

/// The fixed grids an `auto` bound is chosen from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grid {
    /// `max_groups` and `max_rows`: [`contribution_candidates`].
    Contributions,
    /// A value bound's magnitude: [`magnitude_candidates`].
    Magnitudes,
}

impl Grid {
    pub fn candidates(self) -> Vec<f64> {
        match self {
            Grid::Contributions => contribution_candidates(),
            Grid::Magnitudes => magnitude_candidates(),
        }
    }
}

/// Where `value` falls on the ascending `grid` (see the module docs);
/// `None` for NaN.
pub fn grid_position(grid: &[f64], value: f64) -> Option<usize> {
    if value.is_nan() {
        return None;
    }
    let below = grid.partition_point(|c| *c < value);
    let on = grid.get(below).is_some_and(|c| *c == value);
    Some(2 * below + usize::from(on))
}

/// Adds each of `values` at its position on `grid` to `counts` (`2m + 1`
/// of them for `m` candidates); NaN is not counted.
pub fn count_positions(grid: &[f64], counts: &mut [u64], values: impl IntoIterator<Item = f64>) {
    for at in values.into_iter().filter_map(|v| grid_position(grid, v)) {
        counts[at] += 1;
    }
}

/// Adds every list of counts in `lists` (this aggregate's output or state,
/// `List<UInt64>`; NULL lists skipped) to `totals`, position by position.
pub fn add_counts(totals: &mut [u64], lists: &dyn Array) -> Result<()> {
    let Some(lists) = lists.as_list_opt::<i32>() else {
        return exec_err!("grid positions come as lists, not {}", lists.data_type());
    };
    for partial in lists.iter().flatten() {
        let Some(partial) = partial.as_primitive_opt::<UInt64Type>() else {
            return exec_err!("grid positions are UInt64 counts");
        };
        if partial.len() != totals.len() {
            return exec_err!(
                "{} counts per grid position where the grid has {} positions",
                partial.len(),
                totals.len()
            );
        }
        for (total, n) in totals.iter_mut().zip(partial.values()) {
            *total += n;
        }
    }
    Ok(())
}

/// For each candidate of a grid with `counts.len() = 2m + 1` positions:
/// the values strictly below it and strictly above it.
pub fn below_and_above(counts: &[u64]) -> Vec<(u64, u64)> {
    let total: u64 = counts.iter().sum();
    let candidates = counts.len() / 2;
    let mut below = 0u64;
    let mut out = Vec::with_capacity(candidates);
    for i in 0..candidates {
        below += counts[2 * i];
        let at_or_below = below + counts[2 * i + 1];
        out.push((below, total - at_or_below));
        below = at_or_below;
    }
    out
}

/// The aggregate (see the module docs): `Float64` in, the counts per
/// position out as a non-null `List<UInt64>`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct GridPositions {
    signature: Signature,
    grid: Grid,
}

impl GridPositions {
    pub fn new(grid: Grid) -> Self {
        Self {
            signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
            grid,
        }
    }
}

fn counts_type() -> DataType {
    DataType::new_list(DataType::UInt64, false)
}

impl AggregateUDFImpl for GridPositions {
    fn name(&self) -> &str {
        match self.grid {
            Grid::Contributions => "sluice_contribution_positions",
            Grid::Magnitudes => "sluice_magnitude_positions",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(counts_type())
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let grid = self.grid.candidates();
        let counts = vec![0; 2 * grid.len() + 1];
        Ok(Box::new(PositionCounts { grid, counts }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "counts"),
            counts_type(),
            false,
        ))])
    }
}

#[derive(Debug)]
struct PositionCounts {
    grid: Vec<f64>,
    counts: Vec<u64>,
}

impl PositionCounts {
    fn as_scalar(&self) -> ScalarValue {
        let counts: ArrayRef = Arc::new(UInt64Array::from(self.counts.clone()));
        SingleRowListArrayBuilder::new(counts)
            .with_nullable(false)
            .build_list_scalar()
    }
}

impl Accumulator for PositionCounts {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return exec_err!("grid positions take one Float64 column");
        };
        let Some(values) = values.as_primitive_opt::<Float64Type>() else {
            return exec_err!("grid positions take Float64, not {}", values.data_type());
        };
        count_positions(&self.grid, &mut self.counts, values.iter().flatten());
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(states) = states.first() else {
            return exec_err!("grid positions merge one list of counts");
        };
        add_counts(&mut self.counts, states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.as_scalar()])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.as_scalar())
    }

    fn size(&self) -> usize {
        size_of_val(self) + 8 * (self.grid.capacity() + self.counts.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts give, for every candidate, exactly what comparing each
    /// value with it gives.
    #[test]
    fn positions_count_what_lies_below_and_above_each_candidate() {
        let grid = [0.0, 1.0, 2.0, 4.0];
        let values = [
            -3.0,
            0.0,
            0.5,
            1.0,
            1.0,
            3.0,
            4.0,
            9.0,
            f64::NAN,
            -0.0,
            f64::INFINITY,
        ];
        let mut counts = vec![0u64; 2 * grid.len() + 1];
        count_positions(&grid, &mut counts, values);
        let expected: Vec<(u64, u64)> = grid
            .iter()
            .map(|c| {
                let kept = values.iter().filter(|v| !v.is_nan());
                let below = kept.clone().filter(|v| *v < c).count() as u64;
                let above = kept.filter(|v| *v > c).count() as u64;
                (below, above)
            })
            .collect();
        assert_eq!(below_and_above(&counts), expected);
        assert_eq!(grid_position(&grid, f64::NAN), None);
        assert_eq!(grid_position(&grid, -0.0), Some(1), "-0 is 0");
    }
}
