//! Step 7: the privacy release. The bounded per-group statistics of a
//! [`DpQuery`] get OpenDP noise (on a blocking thread: OpenDP measurements
//! are not `Send`), and the noisy statistics become the aggregate's rows,
//! each noisy column described by Arrow field metadata.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, Float64Array, RecordBatch,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, Float64Type, Int64Type, Schema, SchemaRef,
};
use datafusion::arrow::error::ArrowError;
use datafusion::common::ScalarValue;
use sluice_policy::document::NoiseKind;
use sluice_policy::dp::grid_positions::add_counts;
use sluice_policy::dp::{
    BiasKind, BiasStatistic, Chosen, ColumnBounds, DpQuery, Groups, OutputKind, Statistic,
    StatisticKind, zcdp,
};

use crate::noise::{self, NoiseError, NoiseFamily, ReleaseInfo};

use sluice_proto::wire::dp::{
    BIAS, BIAS_CLAMPED, BIAS_EPSILON, BIAS_OVER_MAX_GROUPS, BIAS_OVER_MAX_ROWS, CI95, DELTA,
    EPSILON, MECHANISM, NOTE, RHO, SCALE,
};

const CI_NOTE: &str = "95% half-width of the added noise only; excludes bias from clamping to the declared bounds and from capping each unit's rows and groups";

/// The exact per-group statistics the bounded plan computed.
#[derive(Debug, Clone, Default)]
pub struct ExactStatistics {
    pub keys: Vec<Vec<ScalarValue>>,
    /// One vector per statistic, one entry per group (fixed-point units);
    /// empty for quantile statistics.
    pub totals: Vec<Vec<i64>>,
    /// For quantile statistics: the values of each group, each unit capped.
    pub values: Vec<Vec<Vec<f64>>>,
    /// One vector per bias statistic, one entry per group.
    pub bias: Vec<Vec<i64>>,
}

/// Reads the statistics plan's output.
pub fn exact_statistics(
    query: &DpQuery,
    batches: &[RecordBatch],
) -> Result<ExactStatistics, ReleaseError> {
    let mut out = ExactStatistics {
        totals: vec![vec![]; query.statistics.len()],
        values: vec![vec![]; query.statistics.len()],
        bias: vec![vec![]; query.bias.len()],
        ..Default::default()
    };
    for batch in batches {
        for row in 0..batch.num_rows() {
            let key = (0..query.key_count)
                .map(|i| ScalarValue::try_from_array(batch.column(i), row))
                .collect::<Result<Vec<_>, _>>()?;
            out.keys.push(key);
        }
        for (i, statistic) in query.statistics.iter().enumerate() {
            let column = batch
                .column_by_name(&statistic.column)
                .ok_or_else(|| ReleaseError::MissingColumn(statistic.column.clone()))?;
            if let StatisticKind::Quantile { .. } = statistic.kind {
                for row in 0..batch.num_rows() {
                    out.values[i].push(group_values(column, row, query.max_rows));
                }
            } else {
                out.totals[i].extend(totals(column)?);
            }
        }
        for (i, statistic) in query.bias.iter().enumerate() {
            let column = batch
                .column_by_name(&statistic.column)
                .ok_or_else(|| ReleaseError::MissingColumn(statistic.column.clone()))?;
            out.bias[i].extend(totals(column)?);
        }
    }
    Ok(out)
}

/// Largest magnitude a fixed-point total keeps (2^62, half of `i64`): the
/// noise added to it stays within `i64` (see [`MAX_NOISE_SCALE`]).
const TOTAL_LIMIT: i128 = 1 << 62;

/// A statistics column's per-group totals: counts (`Int64`) as they are,
/// fixed-point sums (`Decimal128(38, 0)`, which no group can overflow)
/// clamped to ±[`TOTAL_LIMIT`]. Clamping cannot fail, and it never moves
/// two totals further apart, so it keeps each total's sensitivity: a group
/// too large for 64 bits gets a clamped, still private, answer rather than
/// an error that would tell how large it is. NULL (no values) is 0.
fn totals(column: &ArrayRef) -> Result<Vec<i64>, ReleaseError> {
    let clamp = |v: i128| v.clamp(-TOTAL_LIMIT, TOTAL_LIMIT) as i64;
    match column.data_type() {
        DataType::Decimal128(..) => Ok(column
            .as_primitive::<Decimal128Type>()
            .iter()
            .map(|v| v.map_or(0, clamp))
            .collect()),
        DataType::Int64 => Ok(column
            .as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map_or(0, |v| clamp(i128::from(v))))
            .collect()),
        other => Err(ReleaseError::UnexpectedType(other.clone())),
    }
}

/// A group's values for a quantile: one list per unit, each capped at
/// `max_rows` values spread evenly over the unit's sorted values.
fn group_values(column: &ArrayRef, row: usize, max_rows: u64) -> Vec<f64> {
    let Some(units) = column.as_list_opt::<i32>() else {
        return vec![];
    };
    if units.is_null(row) {
        return vec![];
    }
    let units = units.value(row);
    let units = units.as_list::<i32>();
    let mut out = Vec::new();
    for u in 0..units.len() {
        if units.is_null(u) {
            continue;
        }
        let list = units.value(u);
        let list = list.as_primitive::<Float64Type>();
        let mut values: Vec<f64> = list.iter().flatten().filter(|v| !v.is_nan()).collect();
        values.sort_by(f64::total_cmp);
        let stride = values.len().div_ceil(max_rows as usize).max(1);
        out.extend(values.into_iter().step_by(stride).take(max_rows as usize));
    }
    out
}

/// The bounds a query with `auto` bounds runs with: one DP quantile per
/// choice over its column of the auto plan's counts per grid position
/// (`batches`: one row; units' values counted, never held here), each
/// from [`DpQuery::auto_epsilon_per_release`] at symmetric distance 1 (one
/// row per unit). Blocking: call it on a blocking thread.
pub fn choose_bounds(
    query: &DpQuery,
    batches: &[RecordBatch],
) -> Result<Vec<Chosen>, ReleaseError> {
    let Some(bounds) = &query.auto else {
        return Ok(Vec::new());
    };
    let epsilon = query.auto_epsilon_per_release();
    let mut chosen = Vec::with_capacity(bounds.choices.len());
    for choice in &bounds.choices {
        // Summed over batches and rows (one row, but a plan may split it).
        let mut counts = vec![0u64; 2 * choice.candidates.len() + 1];
        for batch in batches {
            let column = batch
                .column_by_name(&choice.column)
                .ok_or_else(|| ReleaseError::MissingColumn(choice.column.clone()))?;
            add_counts(&mut counts, column.as_ref())?;
        }
        let mechanism = noise::BoundMechanism::new(&choice.candidates, choice.quantile, epsilon)?;
        let (value, _) = mechanism.release_counts(&counts)?;
        chosen.push(Chosen {
            value,
            quantile: choice.quantile,
        });
    }
    Ok(chosen)
}

/// The noisy aggregate: rows in the aggregate's schema, with metadata.
#[derive(Debug, Clone)]
pub struct NoisyAggregate {
    pub batch: RecordBatch,
    /// How ε was divided, e.g. `count(*) ε 0.25; sum(fare_eur) ε 0.25`.
    pub split: String,
}

/// Adds noise to `exact` as `query` prescribes. Blocking: call it on a
/// blocking thread.
pub fn add_noise(query: &DpQuery, exact: ExactStatistics) -> Result<NoisyAggregate, ReleaseError> {
    let family = family(query.noise);
    let (keys, rows_kept, mut noisy, mut infos) = select_groups(query, &exact, family)?;
    for (i, statistic) in query.statistics.iter().enumerate() {
        if noisy[i].is_some() {
            continue;
        }
        let (values, info) = match &statistic.kind {
            StatisticKind::Quantile { bounds, q, .. } => {
                quantiles(query, statistic, bounds, *q, &rows_kept, &exact.values[i])?
            }
            _ => {
                let exact_values: Vec<i64> = rows_kept
                    .iter()
                    .map(|r| r.map_or(0, |r| exact.totals[i][r]))
                    .collect();
                let (values, info) = noisy_integers(query, statistic, family, &exact_values)?;
                (values.into_iter().map(|v| v as f64).collect(), info)
            }
        };
        noisy[i] = Some(values);
        infos[i] = Some(info);
    }
    let noisy: Vec<Vec<f64>> = noisy.into_iter().map(Option::unwrap_or_default).collect();
    let infos: Vec<ReleaseInfo> = infos
        .into_iter()
        .map(|i| i.expect("every statistic released"))
        .collect();
    let bias = bias_estimates(query, &exact, &rows_kept)?;
    let batch = aggregate_batch(query, &keys, &noisy, &infos, bias.as_ref())?;
    Ok(NoisyAggregate {
        batch,
        split: query.split_summary(),
    })
}

/// The exact bias totals: each bias column summed over the groups the
/// answer is built from (`rows_kept` for published keys, every group
/// otherwise), clamped to ±2^62 like every total.
pub fn bias_totals(
    query: &DpQuery,
    exact: &ExactStatistics,
    rows_kept: &[Option<usize>],
) -> Vec<i64> {
    (0..query.bias.len())
        .map(|i| {
            let total: i128 = match query.groups {
                Groups::Public(_) => rows_kept
                    .iter()
                    .flatten()
                    .map(|r| i128::from(exact.bias[i][*r]))
                    .sum(),
                Groups::Single | Groups::Private => {
                    exact.bias[i].iter().map(|v| i128::from(*v)).sum()
                }
            };
            total.clamp(-TOTAL_LIMIT, TOTAL_LIMIT) as i64
        })
        .collect()
}

/// Each bias total with discrete Laplace noise from its share of ε, at its
/// sensitivity over all groups; `copies` independent draws of each (the
/// answer uses one; the neighbouring-datasets test many), with the 95%
/// half-width of the noise.
pub fn noisy_bias_totals(
    query: &DpQuery,
    totals: &[i64],
    copies: usize,
) -> Result<Vec<(Vec<i64>, f64)>, ReleaseError> {
    query
        .bias
        .iter()
        .zip(totals)
        .map(|(statistic, total)| {
            let (values, info) = noise::release_integers(
                &vec![*total; copies],
                statistic.sensitivity,
                1,
                NoiseFamily::Laplace,
                bias_epsilon(statistic),
                0.0,
            )?;
            Ok((values, info.ci95_half_width))
        })
        .collect()
}

/// The ε of a bias estimate's discrete Laplace noise: its share of the
/// query's ε, or, paid in ρ, the ε whose zCDP cost (ε²/2) is its ρ.
pub fn bias_epsilon(statistic: &BiasStatistic) -> f64 {
    match statistic.rho {
        rho if rho > 0.0 => zcdp::pure_epsilon(rho, 1),
        _ => statistic.epsilon,
    }
}

/// The ε each group's quantile release gets. A unit touches at most
/// `max_groups` groups, so each gets that share of the statistic's ε; paid
/// in ρ, k releases of ε/k cost k·(ε/k)²/2, which is the statistic's ρ when
/// each gets √(2ρ/k).
pub fn quantile_epsilon_per_group(query: &DpQuery, statistic: &Statistic) -> f64 {
    match statistic.rho {
        rho if rho > 0.0 => zcdp::pure_epsilon(rho, query.max_groups),
        _ => statistic.epsilon / query.max_groups as f64,
    }
}

/// What the bounds left out, estimated privately (see [`BiasKind`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BiasEstimate {
    /// Fractions of all rows (counted and left out).
    pub over_max_rows: Fraction,
    pub over_max_groups: Option<Fraction>,
    /// Per column: the fraction of counted values clamped.
    pub clamped: Vec<(String, ColumnBounds, Fraction)>,
    pub epsilon: f64,
    pub query_epsilon: f64,
    pub max_rows: u64,
    pub max_groups: u64,
}

/// Releases each bias total once ([`bias_totals`], [`noisy_bias_totals`]):
/// summed over every group for a private selection (a unit touches at most
/// `max_groups` of them, whichever are kept), over the published ones for
/// public keys (only they are bounded by the public key count).
fn bias_estimates(
    query: &DpQuery,
    exact: &ExactStatistics,
    rows_kept: &[Option<usize>],
) -> Result<Option<BiasEstimate>, ReleaseError> {
    if query.bias.is_empty() {
        return Ok(None);
    }
    let totals = bias_totals(query, exact, rows_kept);
    let noisy: Vec<(f64, f64)> = noisy_bias_totals(query, &totals, 1)?
        .into_iter()
        .map(|(draws, ci95)| ((draws[0] as f64).max(0.0), ci95))
        .collect();
    let of = |kind: &BiasKind| {
        query
            .bias
            .iter()
            .position(|b| b.kind == *kind)
            .map(|i| noisy[i])
    };
    let (counted, _) = of(&BiasKind::Counted).unwrap_or_default();
    let over_rows = of(&BiasKind::OverMaxRows).unwrap_or_default();
    let over_groups = of(&BiasKind::OverMaxGroups);
    let all = (counted + over_rows.0 + over_groups.map_or(0.0, |g| g.0)).max(1.0);
    // A fraction and its 95% half-width (the numerator's noise over the
    // noisy denominator; post-processing).
    let fraction = |(x, ci): (f64, f64), of: f64| Fraction {
        value: (x / of.max(1.0)).clamp(0.0, 1.0),
        ci95: ci / of.max(1.0),
    };
    let clamped = query
        .bias
        .iter()
        .zip(&noisy)
        .filter_map(|(b, value)| match &b.kind {
            BiasKind::Clamped { column, bounds } => {
                Some((column.clone(), bounds.clone(), fraction(*value, counted)))
            }
            _ => None,
        })
        .collect();
    Ok(Some(BiasEstimate {
        over_max_rows: fraction(over_rows, all),
        over_max_groups: over_groups.map(|g| fraction(g, all)),
        clamped,
        epsilon: query.bias_epsilon,
        query_epsilon: query.epsilon,
        max_rows: query.max_rows,
        max_groups: query.max_groups,
    }))
}

/// A noisy fraction from 0 to 1 and the 95% half-width of its noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction {
    pub value: f64,
    pub ci95: f64,
}

impl Fraction {
    fn percent(&self) -> String {
        format!("{:.1}% (± {:.1}%)", self.value * 100.0, self.ci95 * 100.0)
    }
}

/// A share of ε for people: at most six significant digits.
fn short(epsilon: f64) -> String {
    format!("{}", (epsilon * 1e6).round() / 1e6)
}

impl BiasEstimate {
    /// One sentence for people, e.g. "≈ 21% of rows were not counted: …".
    /// `column`: only that column's clamping (all columns without).
    pub fn sentence(&self, column: Option<&str>) -> String {
        let left_out = self.over_max_rows.value + self.over_max_groups.map_or(0.0, |g| g.value);
        let mut text = format!(
            "≈ {:.1}% of rows were not counted: {} beyond max_rows = {} per unit and group",
            left_out * 100.0,
            self.over_max_rows.percent(),
            self.max_rows
        );
        if let Some(groups) = self.over_max_groups {
            text.push_str(&format!(
                ", {} in groups beyond max_groups = {} per unit",
                groups.percent(),
                self.max_groups
            ));
        }
        for (name, bounds, f) in &self.clamped {
            if column.is_none_or(|c| c == name) {
                text.push_str(&format!(
                    "; ≈ {} of {name} values were clamped to [{}, {}]",
                    f.percent(),
                    bounds.lower,
                    bounds.upper
                ));
            }
        }
        text.push_str(&format!(
            ". Differentially private estimates from ε {} of this query's {} (± is their noise's 95% range); lower bounds where units exceed a cap by more than the cap itself.",
            short(self.epsilon),
            short(self.query_epsilon)
        ));
        text
    }

    /// Field metadata for an output reading `column` (if any).
    fn metadata(&self, column: Option<&str>) -> HashMap<String, String> {
        let mut out = HashMap::from([
            (
                BIAS_OVER_MAX_ROWS.to_string(),
                format!("{}", self.over_max_rows.value),
            ),
            (BIAS_EPSILON.to_string(), format!("{}", self.epsilon)),
            (BIAS.to_string(), self.sentence(column)),
        ]);
        if let Some(groups) = self.over_max_groups {
            out.insert(
                BIAS_OVER_MAX_GROUPS.to_string(),
                format!("{}", groups.value),
            );
        }
        if let Some((_, _, f)) = self.clamped.iter().find(|c| Some(c.0.as_str()) == column) {
            out.insert(BIAS_CLAMPED.to_string(), format!("{}", f.value));
        }
        out
    }
}

type Selection = (
    Vec<Vec<ScalarValue>>,
    Vec<Option<usize>>,
    Vec<Option<Vec<f64>>>,
    Vec<Option<ReleaseInfo>>,
);

/// The groups to report: each with the index of its exact row (`None`:
/// an empty public group). Private selection also releases the row counts.
fn select_groups(
    query: &DpQuery,
    exact: &ExactStatistics,
    family: NoiseFamily,
) -> Result<Selection, ReleaseError> {
    let n = query.statistics.len();
    let mut noisy = vec![None; n];
    let mut infos = vec![None; n];
    let (keys, rows) = match &query.groups {
        Groups::Single => (vec![vec![]], vec![(!exact.keys.is_empty()).then_some(0)]),
        Groups::Public(public) => {
            let index: HashMap<&Vec<ScalarValue>, usize> =
                exact.keys.iter().enumerate().map(|(i, k)| (k, i)).collect();
            let rows = public.iter().map(|k| index.get(k).copied()).collect();
            (public.clone(), rows)
        }
        Groups::Private => {
            let i = query
                .statistics
                .iter()
                .position(|s| s.kind == StatisticKind::Rows)
                .ok_or(ReleaseError::NoRowCounts)?;
            let statistic = &query.statistics[i];
            let counts = exact.totals[i]
                .iter()
                .enumerate()
                .map(|(row, count)| (row.to_string(), *count))
                .collect();
            let (kept, info) = selected_groups(query, statistic, family, counts)?;
            let mut rows: Vec<(usize, i64)> = kept
                .into_iter()
                .map(|(key, count)| (key.parse::<usize>().expect("row index keys"), count))
                .collect();
            rows.sort_unstable();
            noisy[i] = Some(rows.iter().map(|(_, c)| *c as f64).collect());
            infos[i] = Some(info);
            (
                rows.iter().map(|(r, _)| exact.keys[*r].clone()).collect(),
                rows.iter().map(|(r, _)| Some(*r)).collect(),
            )
        }
    };
    Ok((keys, rows, noisy, infos))
}

fn quantiles(
    query: &DpQuery,
    statistic: &Statistic,
    bounds: &ColumnBounds,
    q: f64,
    rows: &[Option<usize>],
    values: &[Vec<f64>],
) -> Result<(Vec<f64>, ReleaseInfo), ReleaseError> {
    let per_group = quantile_epsilon_per_group(query, statistic);
    let mut out = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows {
        let group = row.map(|r| values[r].clone()).unwrap_or_default();
        let (value, info) =
            noise::release_quantile(group, &bounds.candidates, q, query.max_rows, per_group)?;
        out.push(value);
        last = Some(info);
    }
    let mut info = last.unwrap_or(ReleaseInfo {
        mechanism: "private_quantile",
        scale: 0.0,
        epsilon: 0.0,
        delta: 0.0,
        ci95_half_width: 0.0,
        threshold: None,
        rho: 0.0,
    });
    info.epsilon = statistic.epsilon;
    info.rho = statistic.rho;
    Ok((out, info))
}

/// Builds the aggregate's rows from the noisy statistics.
fn aggregate_batch(
    query: &DpQuery,
    keys: &[Vec<ScalarValue>],
    noisy: &[Vec<f64>],
    infos: &[ReleaseInfo],
    bias: Option<&BiasEstimate>,
) -> Result<RecordBatch, ReleaseError> {
    let schema = query.aggregate_schema.as_arrow();
    let mut columns: Vec<ArrayRef> = Vec::new();
    let mut fields: Vec<Field> = Vec::new();
    for k in 0..query.key_count {
        let field = schema.field(k);
        let values = keys.iter().map(|row| row[k].clone());
        let array = if keys.is_empty() {
            datafusion::arrow::array::new_empty_array(field.data_type())
        } else {
            ScalarValue::iter_to_array(values)?
        };
        columns.push(cast(&array, field.data_type())?);
        fields.push(field.as_ref().clone().with_nullable(true));
    }
    for (o, output) in query.outputs.iter().enumerate() {
        let field = schema.field(query.key_count + o);
        let values: Vec<f64> = (0..keys.len())
            .map(|g| finish(output, query, noisy, g))
            .collect();
        columns.push(output_array(&values, field.data_type())?);
        let mut metadata = describe(output, query, Some(noisy), infos);
        if let Some(bias) = bias {
            metadata.extend(bias.metadata(output_column(output, query)));
        }
        fields.push(
            field
                .as_ref()
                .clone()
                .with_nullable(true)
                .with_metadata(metadata),
        );
    }
    let mut schema = Schema::new(fields);
    if let Some(bias) = bias {
        schema = schema.with_metadata(HashMap::from([(BIAS.to_string(), bias.sentence(None))]));
    }
    let schema: SchemaRef = Arc::new(schema);
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The column whose values an output sums, averages or ranks.
fn output_column<'a>(output: &OutputKind, query: &'a DpQuery) -> Option<&'a str> {
    let statistic = match output {
        OutputKind::Sum { sum }
        | OutputKind::Avg { sum, .. }
        | OutputKind::Variance { sum, .. } => &query.statistics[*sum],
        OutputKind::Quantile(i) => &query.statistics[*i],
        OutputKind::Count(_) => return None,
    };
    match &statistic.kind {
        StatisticKind::Sum(c) | StatisticKind::Quantile { column: c, .. } => Some(c),
        _ => None,
    }
}

/// Noisy values as an array of the aggregate's type. Noise can carry a
/// value past what the type holds (a count near `i64::MAX`, a sum past a
/// decimal's precision), and a failed or NULL conversion would be an
/// outcome that depends on the data: each value is clamped into the type's
/// range first (post-processing, no privacy cost).
fn output_array(values: &[f64], target: &DataType) -> Result<ArrayRef, ArrowError> {
    let finite = values.iter().map(|v| if v.is_nan() { 0.0 } else { *v });
    match target {
        DataType::Decimal128(precision, scale) => {
            let limit = 10i128.pow(u32::from(*precision)) - 1;
            let factor = 10f64.powi(i32::from(*scale));
            // `as` saturates at i128's range; the clamp brings it into the
            // precision's.
            let units = finite.map(|v| ((v * factor).round() as i128).clamp(-limit, limit));
            let array = Decimal128Array::from_iter_values(units)
                .with_precision_and_scale(*precision, *scale)?;
            Ok(Arc::new(array))
        }
        target if target.is_integer() => {
            let (low, high) = integer_range(target);
            let rounded =
                Float64Array::from_iter_values(finite.map(|v| v.round().clamp(low, high)));
            cast(&rounded, target)
        }
        DataType::Float32 => {
            let max = f64::from(f32::MAX);
            cast(
                &Float64Array::from_iter_values(finite.map(|v| v.clamp(-max, max))),
                target,
            )
        }
        other => cast(&Float64Array::from_iter_values(finite), other),
    }
}

/// The range of an integer type as floats that convert back exactly (the
/// 64-bit types stop at ±2^62: no noisy count or sum legitimately gets
/// near, and 2^63 itself does not fit).
fn integer_range(data_type: &DataType) -> (f64, f64) {
    const LIMIT: f64 = (1u64 << 62) as f64;
    match data_type {
        DataType::Int8 => (f64::from(i8::MIN), f64::from(i8::MAX)),
        DataType::Int16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
        DataType::Int32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        DataType::UInt8 => (0.0, f64::from(u8::MAX)),
        DataType::UInt16 => (0.0, f64::from(u16::MAX)),
        DataType::UInt32 => (0.0, f64::from(u32::MAX)),
        DataType::UInt64 => (0.0, LIMIT),
        _ => (-LIMIT, LIMIT),
    }
}

/// One output value of group `g`, from noisy statistics (post-processing:
/// no further privacy cost).
fn finish(kind: &OutputKind, query: &DpQuery, noisy: &[Vec<f64>], g: usize) -> f64 {
    let value = |i: usize| noisy[i][g] / query.statistics[i].scale_factor;
    match kind {
        OutputKind::Count(i) => value(*i).max(0.0),
        OutputKind::Sum { sum } => value(*sum),
        OutputKind::Quantile(i) => noisy[*i][g],
        OutputKind::Avg { sum, count, bounds } => {
            (value(*sum) / value(*count).max(1.0)).clamp(bounds.lower, bounds.upper)
        }
        OutputKind::Variance {
            sum,
            count,
            squares,
            bounds,
            sample,
            root,
        } => {
            let n = value(*count).max(1.0);
            let mean = (value(*sum) / n).clamp(bounds.lower, bounds.upper);
            let widest = ((bounds.upper - bounds.lower) / 2.0).powi(2);
            let mut variance = (value(*squares) / n - mean * mean).clamp(0.0, widest);
            if *sample && n > 1.0 {
                variance *= n / (n - 1.0);
            }
            if *root { variance.sqrt() } else { variance }
        }
    }
}

/// Field metadata of one noisy output.
/// `noisy`: the released statistics, or `None` before release (AVG's
/// half-width depends on the noisy count and is left out then).
fn describe(
    kind: &OutputKind,
    query: &DpQuery,
    noisy: Option<&[Vec<f64>]>,
    infos: &[ReleaseInfo],
) -> HashMap<String, String> {
    let used = kind.statistics();
    let epsilon: f64 = used.iter().map(|i| query.statistics[*i].epsilon).sum();
    let delta: f64 = used.iter().map(|i| infos[*i].delta).sum();
    let rho: f64 = used.iter().map(|i| query.statistics[*i].rho).sum();
    let mechanisms: Vec<&str> = used.iter().map(|i| infos[*i].mechanism).collect();
    let scale = |i: usize| infos[i].scale / query.statistics[i].scale_factor;
    let ci = |i: usize| infos[i].ci95_half_width / query.statistics[i].scale_factor;
    let (scale, ci95) = match kind {
        OutputKind::Count(i) | OutputKind::Sum { sum: i } => (scale(*i), Some(ci(*i))),
        OutputKind::Avg { sum, count, bounds } => {
            // Widest over groups: the smallest noisy count.
            let n = noisy.map(|noisy| {
                noisy[*count]
                    .iter()
                    .map(|c| c / query.statistics[*count].scale_factor)
                    .fold(f64::INFINITY, f64::min)
                    .max(1.0)
            });
            (
                scale(*sum),
                n.map(|n| (ci(*sum) + bounds.max_abs() * ci(*count)) / n),
            )
        }
        OutputKind::Variance { squares, .. } => (scale(*squares), None),
        OutputKind::Quantile(_) => (0.0, None),
    };
    let mut metadata = HashMap::from([
        (MECHANISM.to_string(), mechanisms.join("+")),
        (SCALE.to_string(), format!("{scale}")),
        (EPSILON.to_string(), format!("{epsilon}")),
        (DELTA.to_string(), format!("{delta}")),
        (NOTE.to_string(), CI_NOTE.to_string()),
    ]);
    if let Some(ci95) = ci95.filter(|c| c.is_finite()) {
        metadata.insert(CI95.to_string(), format!("{ci95}"));
    }
    if rho > 0.0 {
        metadata.insert(RHO.to_string(), format!("{rho}"));
    }
    metadata
}

/// Why the noisy answer could not be built from the exact statistics.
/// None of these can depend on a data value: the statistics plan's types
/// and columns are fixed at GetFlightInfo, and every mechanism was built
/// then too. Messages never carry values or keys.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("the statistics plan has no column `{0}`")]
    MissingColumn(String),
    #[error("a statistics column of type {0}, where counts or fixed-point sums were expected")]
    UnexpectedType(DataType),
    #[error("a private selection of groups without row counts")]
    NoRowCounts,
    #[error("building the noisy answer failed: {0}")]
    Arrow(#[from] ArrowError),
    #[error("reading the statistics failed: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// Why a DP query's noise cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanNoiseError {
    /// The query's ε (with its bounds) calls for more noise than 64-bit
    /// integers hold: a property of the query, refused before any budget is
    /// reserved.
    #[error(
        "ε = {epsilon} is too small for this query: `{statistic}` would need noise of scale {scale:.3e} (fixed-point units), more than 64-bit sums can carry; ask for ε ≥ {needed:.3e} or ask the provider for tighter bounds"
    )]
    EpsilonTooSmall {
        epsilon: f64,
        statistic: String,
        scale: f64,
        needed: f64,
    },
    /// OpenDP could not build the mechanism (a bug or an impossible
    /// setting, never data).
    #[error("the noise for this query cannot be built: {0}")]
    Mechanism(#[from] NoiseError),
}

/// The largest noise scale (fixed-point units) a statistic may get. Totals
/// are clamped to ±2^62 and OpenDP saturates at `i64`, so with this scale
/// noise that reaches past 2^63 has a probability below e^-64.
pub const MAX_NOISE_SCALE: f64 = (1u64 << 56) as f64;

/// The aggregate's schema with the noise each output will get, known before
/// any data is read (for the schema announced at GetFlightInfo), and the
/// budget split. Building every mechanism here, before the budget is
/// reserved and before any data is read, is what makes a failure of the
/// noise step at DoGet impossible for anything but the data.
pub fn announced(query: &DpQuery) -> Result<(SchemaRef, String), PlanNoiseError> {
    let family = family(query.noise);
    if let Some(bounds) = &query.auto {
        let epsilon = query.auto_epsilon_per_release();
        for choice in &bounds.choices {
            noise::BoundMechanism::new(&choice.candidates, choice.quantile, epsilon)?;
        }
    }
    let infos = query
        .statistics
        .iter()
        .map(|s| planned_release(query, s, family))
        .collect::<Result<Vec<_>, _>>()?;
    let bias_infos = query
        .bias
        .iter()
        .map(|b| {
            noise::release_integers(
                &[],
                b.sensitivity,
                1,
                NoiseFamily::Laplace,
                bias_epsilon(b),
                0.0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (statistic, (_, info)) in query.bias.iter().zip(&bias_infos) {
        if info.scale > MAX_NOISE_SCALE {
            return Err(PlanNoiseError::EpsilonTooSmall {
                epsilon: query.epsilon,
                statistic: format!("bias estimate of {}", statistic.kind.describe()),
                scale: info.scale,
                needed: query.epsilon * info.scale / MAX_NOISE_SCALE,
            });
        }
    }
    for (statistic, info) in query.statistics.iter().zip(&infos) {
        if info.scale > MAX_NOISE_SCALE {
            return Err(PlanNoiseError::EpsilonTooSmall {
                epsilon: query.epsilon,
                statistic: query.describe_statistic(statistic),
                scale: info.scale,
                needed: query.epsilon * info.scale / MAX_NOISE_SCALE,
            });
        }
    }
    let schema = query.aggregate_schema.as_arrow();
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let field = field.as_ref().clone().with_nullable(true);
            match i.checked_sub(query.key_count) {
                None => field,
                Some(o) => field.with_metadata(describe(&query.outputs[o], query, None, &infos)),
            }
        })
        .collect();
    Ok((Arc::new(Schema::new(fields)), query.split_summary()))
}

/// Scale and cost of a statistic's release, computed without data.
fn planned_release(
    query: &DpQuery,
    statistic: &Statistic,
    family: NoiseFamily,
) -> Result<ReleaseInfo, NoiseError> {
    let s = statistic;
    match &s.kind {
        StatisticKind::Quantile { bounds, q, .. } => {
            // Calibrated now on no values, so that it cannot fail later.
            let per_group = quantile_epsilon_per_group(query, s);
            noise::release_quantile(vec![], &bounds.candidates, *q, query.max_rows, per_group)?;
            Ok(ReleaseInfo {
                mechanism: "private_quantile",
                scale: 0.0,
                epsilon: s.epsilon,
                delta: 0.0,
                ci95_half_width: 0.0,
                threshold: None,
                rho: s.rho,
            })
        }
        StatisticKind::Rows if query.groups == Groups::Private => {
            selected_groups(query, s, family, vec![]).map(|(_, info)| info)
        }
        _ => noisy_integers(query, s, family, &[]).map(|(_, info)| info),
    }
}

/// One statistic's values with noise, as the query's bounds prescribe.
fn noisy_integers(
    query: &DpQuery,
    s: &Statistic,
    family: NoiseFamily,
    values: &[i64],
) -> Result<(Vec<i64>, ReleaseInfo), NoiseError> {
    if s.rho > 0.0 {
        return noise::release_integers_zcdp(values, s.sensitivity, query.max_groups, s.rho);
    }
    noise::release_integers(
        values,
        s.sensitivity,
        query.max_groups,
        family,
        s.epsilon,
        s.delta,
    )
}

/// The groups a noisy threshold on their row counts keeps.
fn selected_groups(
    query: &DpQuery,
    s: &Statistic,
    family: NoiseFamily,
    counts: Vec<(String, i64)>,
) -> Result<(Vec<(String, i64)>, ReleaseInfo), NoiseError> {
    if s.rho > 0.0 {
        return noise::select_partitions_zcdp(
            counts,
            s.sensitivity,
            query.max_groups,
            s.rho,
            s.delta,
        );
    }
    noise::select_partitions(
        counts,
        s.sensitivity,
        query.max_groups,
        family,
        s.epsilon,
        s.delta,
    )
}

fn family(noise: NoiseKind) -> NoiseFamily {
    match noise {
        NoiseKind::Laplace => NoiseFamily::Laplace,
        NoiseKind::Gaussian => NoiseFamily::Gaussian,
    }
}
