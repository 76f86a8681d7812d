//! Step 7: the privacy release. The bounded per-group statistics of a
//! [`DpQuery`] get OpenDP noise (on a blocking thread: OpenDP measurements
//! are not `Send`), and the noisy statistics become the aggregate's rows,
//! each noisy column described by Arrow field metadata.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use sluice_policy::document::NoiseKind;
use sluice_policy::dp::{ColumnBounds, DpQuery, Groups, OutputKind, Statistic, StatisticKind};
use sluice_policy::rewrite::INTERNAL_PREFIX;

use super::noise::{self, NoiseFamily, ReleaseInfo};

/// Field metadata keys on every noisy column.
pub const MECHANISM: &str = "sluice.dp.mechanism";
pub const SCALE: &str = "sluice.dp.scale";
pub const EPSILON: &str = "sluice.dp.epsilon";
pub const DELTA: &str = "sluice.dp.delta";
pub const CI95: &str = "sluice.dp.ci95_half_width";
pub const NOTE: &str = "sluice.dp.note";
/// Schema metadata keys of a DP result.
pub const BUDGET_SPLIT: &str = "sluice.dp.budget_split";
pub const QUERY_EPSILON: &str = "sluice.dp.query_epsilon";
pub const QUERY_DELTA: &str = "sluice.dp.query_delta";

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
}

/// Reads the statistics plan's output.
pub fn exact_statistics(
    query: &DpQuery,
    batches: &[RecordBatch],
) -> Result<ExactStatistics, String> {
    let mut out = ExactStatistics {
        totals: vec![vec![]; query.statistics.len()],
        values: vec![vec![]; query.statistics.len()],
        ..Default::default()
    };
    for batch in batches {
        check_no_overflow(query, batch)?;
        for row in 0..batch.num_rows() {
            let key = (0..query.key_count)
                .map(|i| ScalarValue::try_from_array(batch.column(i), row))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            out.keys.push(key);
        }
        for (i, statistic) in query.statistics.iter().enumerate() {
            let column = batch
                .column_by_name(&statistic.column)
                .ok_or_else(|| format!("statistics column {} missing", statistic.column))?;
            if let StatisticKind::Quantile { .. } = statistic.kind {
                for row in 0..batch.num_rows() {
                    out.values[i].push(group_values(column, row, query.max_rows));
                }
            } else {
                let column = cast(column, &DataType::Int64).map_err(|e| e.to_string())?;
                let column = column.as_primitive::<Int64Type>();
                out.totals[i].extend((0..column.len()).map(|r| {
                    if column.is_null(r) {
                        0
                    } else {
                        column.value(r)
                    }
                }));
            }
        }
    }
    Ok(out)
}

/// Largest magnitude a fixed-point total may reach (2^62, half of `i64`).
const TOTAL_LIMIT: u128 = 1 << 62;

/// Each unit adds at most `sensitivity` to a group's total, so a group of
/// `units` units stays within `units × sensitivity`: below 2^62, the `i64`
/// sums in the plan cannot have overflowed. Refuse otherwise.
fn check_no_overflow(query: &DpQuery, batch: &RecordBatch) -> Result<(), String> {
    let Some(units) = batch.column_by_name(&format!("{INTERNAL_PREFIX}units")) else {
        return Err("statistics column units missing".into());
    };
    let units = cast(units, &DataType::Int64).map_err(|e| e.to_string())?;
    let units = units.as_primitive::<Int64Type>();
    let widest = query
        .statistics
        .iter()
        .map(|s| u128::from(s.sensitivity))
        .max()
        .unwrap_or(1);
    for n in units.iter().flatten() {
        if n as u128 * widest >= TOTAL_LIMIT {
            // The message gives no count: it would be a data value.
            return Err("a group holds too many privacy units for exact fixed-point sums at these bounds (reduce max_rows or the bounds)".into());
        }
    }
    Ok(())
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

/// The noisy aggregate: rows in the aggregate's schema, with metadata.
#[derive(Debug, Clone)]
pub struct NoisyAggregate {
    pub batch: RecordBatch,
    /// How ε was divided, e.g. `count(*) ε 0.25; sum(fare_eur) ε 0.25`.
    pub split: String,
}

/// Adds noise to `exact` as `query` prescribes. Blocking: call it on a
/// blocking thread.
pub fn add_noise(query: &DpQuery, exact: ExactStatistics) -> Result<NoisyAggregate, String> {
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
    let batch = aggregate_batch(query, &keys, &noisy, &infos)?;
    Ok(NoisyAggregate {
        batch,
        split: query.split_summary(),
    })
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
) -> Result<Selection, String> {
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
                .ok_or("private selection without row counts")?;
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
) -> Result<(Vec<f64>, ReleaseInfo), String> {
    // A unit touches at most max_groups groups: each group's release gets
    // that share of the statistic's ε.
    let per_group = statistic.epsilon / query.max_groups as f64;
    let mut out = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows {
        let group = row.map(|r| values[r].clone()).unwrap_or_default();
        let (value, info) =
            noise::release_quantile(group, &bounds.candidates, q, query.max_rows, per_group)
                .map_err(|e| e.to_string())?;
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
    });
    info.epsilon = statistic.epsilon;
    Ok((out, info))
}

/// Builds the aggregate's rows from the noisy statistics.
fn aggregate_batch(
    query: &DpQuery,
    keys: &[Vec<ScalarValue>],
    noisy: &[Vec<f64>],
    infos: &[ReleaseInfo],
) -> Result<RecordBatch, String> {
    let schema = query.aggregate_schema.as_arrow();
    let mut columns: Vec<ArrayRef> = Vec::new();
    let mut fields: Vec<Field> = Vec::new();
    for k in 0..query.key_count {
        let field = schema.field(k);
        let values = keys.iter().map(|row| row[k].clone());
        let array = if keys.is_empty() {
            datafusion::arrow::array::new_empty_array(field.data_type())
        } else {
            ScalarValue::iter_to_array(values).map_err(|e| e.to_string())?
        };
        columns.push(cast(&array, field.data_type()).map_err(|e| e.to_string())?);
        fields.push(field.as_ref().clone().with_nullable(true));
    }
    for (o, output) in query.outputs.iter().enumerate() {
        let field = schema.field(query.key_count + o);
        let values: Vec<f64> = (0..keys.len())
            .map(|g| finish(output, query, noisy, g))
            .collect();
        let array: ArrayRef = Arc::new(Float64Array::from(values.clone()));
        let target = field.data_type();
        let array = if target.is_integer() {
            let rounded: ArrayRef = Arc::new(Float64Array::from(
                values.iter().map(|v| v.round()).collect::<Vec<_>>(),
            ));
            cast(&rounded, target)
        } else {
            cast(&array, target)
        }
        .map_err(|e| e.to_string())?;
        columns.push(array);
        let metadata = describe(output, query, Some(noisy), infos);
        fields.push(
            field
                .as_ref()
                .clone()
                .with_nullable(true)
                .with_metadata(metadata),
        );
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    RecordBatch::try_new(schema, columns).map_err(|e| e.to_string())
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
    metadata
}

/// The aggregate's schema with the noise each output will get, known before
/// any data is read (for the schema announced at GetFlightInfo), and the
/// budget split.
pub fn announced(query: &DpQuery) -> Result<(SchemaRef, String), String> {
    let family = family(query.noise);
    let infos = query
        .statistics
        .iter()
        .map(|s| planned_release(query, s, family))
        .collect::<Result<Vec<_>, _>>()?;
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
) -> Result<ReleaseInfo, String> {
    let s = statistic;
    match s.kind {
        StatisticKind::Quantile { .. } => Ok(ReleaseInfo {
            mechanism: "private_quantile",
            scale: 0.0,
            epsilon: s.epsilon,
            delta: 0.0,
            ci95_half_width: 0.0,
            threshold: None,
        }),
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
) -> Result<(Vec<i64>, ReleaseInfo), String> {
    noise::release_integers(
        values,
        s.sensitivity,
        query.max_groups,
        family,
        s.epsilon,
        s.delta,
    )
    .map_err(|e| e.to_string())
}

/// The groups a noisy threshold on their row counts keeps.
fn selected_groups(
    query: &DpQuery,
    s: &Statistic,
    family: NoiseFamily,
    counts: Vec<(String, i64)>,
) -> Result<(Vec<(String, i64)>, ReleaseInfo), String> {
    noise::select_partitions(
        counts,
        s.sensitivity,
        query.max_groups,
        family,
        s.epsilon,
        s.delta,
    )
    .map_err(|e| e.to_string())
}

fn family(noise: NoiseKind) -> NoiseFamily {
    match noise {
        NoiseKind::Laplace => NoiseFamily::Laplace,
        NoiseKind::Gaussian => NoiseFamily::Gaussian,
    }
}
