//! Merging the providers' partial answers into one result: DataFusion runs
//! the merge query over them, the providers' noise is combined into the
//! reported confidence half-widths, and the result says where it came from.
//!
//! Field metadata of a merged noisy column (an aggregate output unchanged):
//! `sluice.dp.ci95_half_width` is the root-sum-square of the contributing
//! providers' half-widths for SUM and COUNT: noise variances add, and the
//! half-width is proportional to the standard deviation (exactly for
//! Gaussian noise, approximately for Laplace). For AVG it is the widest over
//! the result's groups of `(h_sum + |avg| · h_count) / count`, first-order
//! error propagation from the merged sum and count.
//!
//! Schema metadata: `sluice.federation.providers` (JSON: provider, dataset,
//! rows, receipt, the ε and δ of its answer, and under zCDP accounting the
//! ρ and δ its provider charged instead, cached), `sluice.federation.missing`
//! (JSON: provider, gRPC code, message) and `sluice.federation.partial`.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use serde_json::json;

use super::decompose::{Federated, Merge, PARTIALS};
use super::upstream::{PartialAnswer, ProviderFailure};
use sluice_proto::wire::dp::{
    CACHED, CI95, MECHANISM, NOTE, QUERY_CHARGED_DELTA, QUERY_DELTA, QUERY_EPSILON, QUERY_RHO,
};
use sluice_proto::wire::federation::{MISSING, PARTIAL, PROVIDERS};

/// Why partial answers could not be merged. [`precheck`]'s errors are the
/// consumer's (a query that cannot be merged); [`merge`]'s are faults of a
/// provider or of the broker.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The in-memory session for the merge could not be set up.
    #[error("{0}")]
    Session(DataFusionError),
    /// The merge query refers to something the partials do not carry (an
    /// output neither grouped nor aggregated).
    #[error(
        "the query cannot be merged across providers: {}",
        .0.find_root().strip_backtrace()
    )]
    NotMergeable(DataFusionError),
    #[error(
        "provider `{provider}` answered with {columns} columns where {expected} were asked for"
    )]
    WrongWidth {
        provider: String,
        columns: usize,
        expected: usize,
    },
    #[error("no provider answered")]
    NoAnswer,
    #[error(
        "group key {key} is {first_type} at `{first}` but {other_type} at `{other}`; the datasets do not have one schema"
    )]
    KeyTypesDiffer {
        /// 1-based.
        key: usize,
        first: String,
        first_type: DataType,
        other: String,
        other_type: DataType,
    },
    /// A provider's column does not convert to the merged type.
    #[error("provider `{provider}` answered with other types: {column}: {error}")]
    ColumnType {
        provider: String,
        column: String,
        error: ArrowError,
    },
    /// A provider's columns do not form a batch of the merged schema.
    #[error("provider `{provider}` answered with other types: {error}")]
    BatchShape { provider: String, error: ArrowError },
    #[error("the merge failed: {}", .0.strip_backtrace())]
    Failed(DataFusionError),
    #[error("the merge took longer than {MERGE_TIMEOUT:?}")]
    Timeout,
    /// Describing the merged result (noise half-widths) failed.
    #[error("{0}")]
    Describe(ArrowError),
}

/// A merged result, ready to stream.
#[derive(Debug, Clone)]
pub struct Merged {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Merged {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Plans the merge query over stand-in partials, so that a query whose
/// merge cannot work (an output that is neither grouped nor aggregated) is
/// refused before any provider spends budget on it.
pub async fn precheck(federated: &Federated) -> Result<(), MergeError> {
    let mut fields: Vec<Field> = (0..federated.keys)
        .map(|i| Field::new(format!("__k{i}"), DataType::Utf8, true))
        .collect();
    fields.extend(
        (0..federated.partial_count)
            .map(|i| Field::new(format!("__p{i}"), DataType::Float64, true)),
    );
    let ctx = context(Arc::new(Schema::new(fields)), Vec::new())?;
    match ctx.sql(&federated.merge_sql).await {
        // Type errors may be artefacts of the stand-in types; only a missing
        // column is certain.
        // The planner wraps it (with a diagnostic), so look at the root.
        Err(e) if matches!(e.find_root(), DataFusionError::SchemaError(..)) => {
            Err(MergeError::NotMergeable(e))
        }
        _ => Ok(()),
    }
}

/// Runs the merge query over `answers` and describes the result.
pub async fn merge(
    federated: &Federated,
    answers: &[PartialAnswer],
    missing: &[ProviderFailure],
) -> Result<Merged, MergeError> {
    let schema = partials_schema(federated, answers)?;
    let mut batches = Vec::new();
    for answer in answers {
        for batch in &answer.batches {
            batches.push(conform(batch, &schema, &answer.provider)?);
        }
    }
    let ctx = context(schema, batches)?;
    let frame = ctx
        .sql(&federated.merge_sql)
        .await
        .map_err(MergeError::Failed)?;
    let merged_schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let out = tokio::time::timeout(MERGE_TIMEOUT, frame.collect())
        .await
        .map_err(|_| MergeError::Timeout)?
        .map_err(MergeError::Failed)?;
    describe(federated, answers, missing, merged_schema, out)
}

/// Memory the merge of one query may use, and how long it may take: the
/// consumer chose the expressions it computes.
const MERGE_MEMORY: usize = 256 << 20;
const MERGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn context(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<SessionContext, MergeError> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(MERGE_MEMORY, 1.0)
        .build_arc()
        .map_err(MergeError::Session)?;
    let ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
    let table = MemTable::try_new(schema, vec![batches]).map_err(MergeError::Session)?;
    ctx.register_table(PARTIALS, Arc::new(table))
        .map_err(MergeError::Session)?;
    Ok(ctx)
}

/// `__k0…, __p0…`, all nullable. Group keys must have one type at every
/// provider (else groups could not meet); partial aggregates of different
/// numeric types meet as Float64.
fn partials_schema(
    federated: &Federated,
    answers: &[PartialAnswer],
) -> Result<SchemaRef, MergeError> {
    let width = federated.keys + federated.partial_count;
    for answer in answers {
        if answer.schema.fields().len() != width {
            return Err(MergeError::WrongWidth {
                provider: answer.provider.clone(),
                columns: answer.schema.fields().len(),
                expected: width,
            });
        }
    }
    let first = answers.first().ok_or(MergeError::NoAnswer)?;
    let mut fields = Vec::with_capacity(width);
    for i in 0..width {
        let wanted = first.schema.field(i).data_type();
        let differs = answers
            .iter()
            .find(|a| a.schema.field(i).data_type() != wanted);
        let (name, data_type) = match (i.checked_sub(federated.keys), differs) {
            (None, None) => (format!("__k{i}"), wanted.clone()),
            (None, Some(other)) => {
                return Err(MergeError::KeyTypesDiffer {
                    key: i + 1,
                    first: first.provider.clone(),
                    first_type: wanted.clone(),
                    other: other.provider.clone(),
                    other_type: other.schema.field(i).data_type().clone(),
                });
            }
            (Some(p), None) => (format!("__p{p}"), wanted.clone()),
            (Some(p), Some(_)) => (format!("__p{p}"), DataType::Float64),
        };
        fields.push(Field::new(name, data_type, true));
    }
    Ok(Arc::new(Schema::new(fields)))
}

fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
    provider: &str,
) -> Result<RecordBatch, MergeError> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            // Never silently NULL or truncate a value that does not fit.
            let strict = datafusion::arrow::compute::CastOptions {
                safe: false,
                ..Default::default()
            };
            datafusion::arrow::compute::cast_with_options(c, f.data_type(), &strict).map_err(
                |error| MergeError::ColumnType {
                    provider: provider.to_string(),
                    column: f.name().clone(),
                    error,
                },
            )
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|error| MergeError::BatchShape {
        provider: provider.to_string(),
        error,
    })
}

/// A provider's 95% half-width for partial `p`, if it noised it.
fn half_width(answer: &PartialAnswer, keys: usize, p: usize) -> Option<f64> {
    answer
        .schema
        .fields()
        .get(keys + p)?
        .metadata()
        .get(CI95)?
        .parse()
        .ok()
}

fn mechanisms(answers: &[PartialAnswer], keys: usize, p: usize) -> String {
    let mut names: Vec<&str> = answers
        .iter()
        .filter_map(|a| a.schema.fields().get(keys + p)?.metadata().get(MECHANISM))
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names.dedup();
    names.join("+")
}

/// Root-sum-square of every provider's half-width for partial `p`; `None`
/// unless every provider noised it.
fn combined(answers: &[PartialAnswer], keys: usize, p: usize) -> Option<f64> {
    let widths: Option<Vec<f64>> = answers.iter().map(|a| half_width(a, keys, p)).collect();
    Some(widths?.iter().map(|h| h * h).sum::<f64>().sqrt())
}

fn describe(
    federated: &Federated,
    answers: &[PartialAnswer],
    missing: &[ProviderFailure],
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<Merged, MergeError> {
    let hidden = federated.hidden_counts.len();
    let visible = schema.fields().len() - hidden;
    // Merged counts of the AVG aggregates, per row.
    let mut counts: HashMap<usize, Vec<f64>> = HashMap::new();
    for (h, call) in federated.hidden_counts.iter().enumerate() {
        let values = counts.entry(*call).or_default();
        for batch in &batches {
            values.extend(f64_values(batch.column(visible + h))?);
        }
    }
    let keys = federated.keys;
    // One provider's bias estimates describe its own data, not the merged
    // answer: none is carried over (each provider's partial answer has its
    // own).
    let mut fields: Vec<Field> = schema.fields()[..visible]
        .iter()
        .map(|f| {
            let mut metadata = f.metadata().clone();
            metadata.retain(|key, _| !key.starts_with(sluice_proto::wire::dp::BIAS));
            f.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    for (output, call) in &federated.plain_outputs {
        let (width, mechanism) = match federated.merges[*call] {
            Merge::Add(p) => (combined(answers, keys, p), mechanisms(answers, keys, p)),
            Merge::Ratio { sum, count } => {
                let (Some(h_sum), Some(h_count)) =
                    (combined(answers, keys, sum), combined(answers, keys, count))
                else {
                    continue;
                };
                let mut averages = Vec::new();
                for batch in &batches {
                    averages.extend(f64_values(batch.column(*output))?);
                }
                let widest = averages
                    .iter()
                    .zip(&counts[call])
                    .map(|(avg, n)| (h_sum + avg.abs() * h_count) / n.max(1.0))
                    .filter(|w| w.is_finite())
                    .fold(None, |acc: Option<f64>, w| {
                        Some(acc.map_or(w, |a| a.max(w)))
                    });
                let names = [
                    mechanisms(answers, keys, sum),
                    mechanisms(answers, keys, count),
                ];
                (widest, names.join("/"))
            }
            Merge::Min(_) | Merge::Max(_) => continue,
        };
        let Some(width) = width else { continue };
        let field = &fields[*output];
        let mut metadata = field.metadata().clone();
        metadata.insert(MECHANISM.into(), mechanism);
        metadata.insert(CI95.into(), width.to_string());
        metadata.insert(
            NOTE.into(),
            format!(
                "95% half-width of the combined noise of {} providers (variances add); excludes clamping bias",
                answers.len()
            ),
        );
        fields[*output] = field.clone().with_metadata(metadata);
    }
    let metadata = HashMap::from([
        (PROVIDERS.to_string(), provenance(answers).to_string()),
        (MISSING.to_string(), missing_json(missing).to_string()),
        (PARTIAL.to_string(), (!missing.is_empty()).to_string()),
    ]);
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let batches = batches
        .into_iter()
        .map(|b| {
            RecordBatch::try_new(schema.clone(), b.columns()[..visible].to_vec())
                .map_err(MergeError::Describe)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Merged { schema, batches })
}

fn f64_values(column: &ArrayRef) -> Result<Vec<f64>, MergeError> {
    let column = cast(column, &DataType::Float64).map_err(MergeError::Describe)?;
    let column = column.as_primitive::<Float64Type>();
    Ok((0..column.len())
        .map(|i| {
            if column.is_null(i) {
                f64::NAN
            } else {
                column.value(i)
            }
        })
        .collect())
}

fn provenance(answers: &[PartialAnswer]) -> serde_json::Value {
    let number = |a: &PartialAnswer, key: &str| {
        a.schema
            .metadata()
            .get(key)
            .and_then(|v| v.parse::<f64>().ok())
    };
    serde_json::Value::Array(
        answers
            .iter()
            .map(|a| {
                json!({
                    "provider": a.provider,
                    "dataset": a.dataset,
                    "rows": a.rows(),
                    "receipt": a.receipt,
                    "epsilon": number(a, QUERY_EPSILON),
                    "delta": number(a, QUERY_DELTA),
                    "rho": number(a, QUERY_RHO),
                    "charged_delta": number(a, QUERY_CHARGED_DELTA),
                    "cached": a.schema.metadata().get(CACHED).map(|v| v == "true"),
                    // The bounds this provider chose from its own data.
                    "auto_bounds": a.schema.metadata().get(sluice_proto::wire::dp::AUTO_BOUNDS),
                })
            })
            .collect(),
    )
}

fn missing_json(missing: &[ProviderFailure]) -> serde_json::Value {
    serde_json::Value::Array(
        missing
            .iter()
            .map(|m| {
                json!({
                    "provider": m.provider,
                    "code": sluice_proto::wire::code_name(m.code),
                    "message": m.message,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};

    use super::*;
    use crate::broker::decompose::decompose;

    const QUERY: &str =
        "SELECT mode, count(*) AS n, avg(x) AS a FROM trips GROUP BY mode ORDER BY mode";

    /// One provider's answer: per mode, count (p0), sum of x (p1) and count
    /// of x (p2), each noised with the given 95% half-width.
    fn answer(
        provider: &str,
        rows: &[(&str, i64, f64)],
        count_type: DataType,
        ci: f64,
    ) -> PartialAnswer {
        let noisy = |name: &str, t: DataType| {
            Field::new(name, t, true).with_metadata(HashMap::from([
                (CI95.to_string(), ci.to_string()),
                (MECHANISM.to_string(), "discrete_laplace".to_string()),
            ]))
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("mode", DataType::Utf8, true),
            noisy("p0", count_type.clone()),
            noisy("p1", DataType::Float64),
            noisy("p2", DataType::Int64),
        ]));
        let counts: ArrayRef = Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1)));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                cast(&counts, &count_type).unwrap(),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
                counts,
            ],
        )
        .unwrap();
        PartialAnswer {
            provider: provider.into(),
            dataset: "trips".into(),
            schema,
            batches: vec![batch],
            receipt: Some("{}".into()),
        }
    }

    #[tokio::test]
    async fn partials_add_up_and_noise_half_widths_combine() {
        let federated = decompose(QUERY, &crate::broker::config::example()).unwrap();
        let north = answer(
            "north",
            &[("bus", 10, 50.0), ("tram", 4, 8.0)],
            DataType::Int64,
            3.0,
        );
        // South's counts arrive as floats: they meet north's as Float64.
        let south = answer("south", &[("bus", 30, 70.0)], DataType::Float64, 4.0);
        let merged = merge(&federated, &[north, south], &[]).await.unwrap();
        let batch = &merged.batches[0];
        let n = cast(batch.column(1), &DataType::Float64).unwrap();
        let n = n.as_primitive::<Float64Type>();
        let a = batch.column(2).as_primitive::<Float64Type>();
        assert_eq!((n.value(0), n.value(1)), (40.0, 4.0));
        assert_eq!((a.value(0), a.value(1)), (120.0 / 40.0, 2.0));
        let width = |i: usize| -> f64 { merged.schema.field(i).metadata()[CI95].parse().unwrap() };
        assert!((width(1) - 5.0).abs() < 1e-12, "sqrt(3² + 4²)");
        // AVG: the widest group is tram, (5 + 2·5) / 4.
        assert!((width(2) - 3.75).abs() < 1e-12, "{}", width(2));
        assert_eq!(merged.schema.metadata()[PARTIAL], "false");
        assert_eq!(
            merged.schema.fields().len(),
            3,
            "the helper count column is removed"
        );
    }

    #[tokio::test]
    async fn an_output_neither_grouped_nor_aggregated_is_refused_before_any_provider_is_asked() {
        let config = crate::broker::config::example();
        let ok = decompose(QUERY, &config).unwrap();
        assert!(precheck(&ok).await.is_ok());
        let stray = decompose("SELECT x, count(*) AS n FROM trips GROUP BY mode", &config).unwrap();
        let e = precheck(&stray).await.unwrap_err().to_string();
        assert!(
            e.contains("cannot be merged across providers") && e.contains('x'),
            "{e}"
        );
    }

    #[tokio::test]
    async fn group_keys_of_different_types_do_not_meet() {
        let federated = decompose(QUERY, &crate::broker::config::example()).unwrap();
        let north = answer("north", &[("bus", 1, 1.0)], DataType::Int64, 1.0);
        let mut south = answer("south", &[("bus", 1, 1.0)], DataType::Int64, 1.0);
        let mut fields: Vec<Field> = south
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[0] = Field::new("mode", DataType::LargeUtf8, true);
        south.schema = Arc::new(Schema::new(fields));
        let e = merge(&federated, &[north, south], &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("group key 1 is Utf8 at `north` but LargeUtf8 at `south`"),
            "{e}"
        );
    }
}
