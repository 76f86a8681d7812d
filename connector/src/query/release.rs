//! Step 7: what leaves the connector.
//!
//! The release step fixes the result schema when a query is approved (it is
//! advertised in FlightInfo) and makes every streamed batch conform to it
//! exactly, nullability and metadata included: ADBC and other strict clients
//! reject a DoGet stream whose schema differs from the advertised one. This
//! is also where differentially private noise will be added to released
//! aggregates.

use sluice_proto::wire::schema;
use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::logical_expr::LogicalPlan;
use sluice_policy::DecisionRecord;

use super::QueryError;

/// The schema a plan's results are released with: the plan's output schema
/// with dictionary-encoded columns hydrated to their value type (Flight
/// encodes them hydrated; advertising the same type keeps the promise).
pub fn advertised_schema(plan: &LogicalPlan) -> SchemaRef {
    let schema = plan.schema().as_arrow();
    Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(hydrate_field)
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

/// `schema` with the output classification and policy version in its
/// metadata, so every client sees what class of data it received.
pub fn with_classification(schema: SchemaRef, decision: &DecisionRecord) -> SchemaRef {
    let mut metadata = schema.metadata().clone();
    metadata.insert(
        schema::CLASSIFICATION.into(),
        decision.output_class.to_string(),
    );
    let tags: Vec<String> = decision.output_tags.iter().map(|t| t.to_string()).collect();
    metadata.insert(schema::TAGS.into(), tags.join(","));
    metadata.insert(
        schema::POLICY_VERSION.into(),
        decision.policy_version.clone(),
    );
    Arc::new(Schema::new_with_metadata(schema.fields().clone(), metadata))
}

/// Adds what a differentially private answer costs and what budget is left.
pub fn with_privacy(
    schema: SchemaRef,
    charge: &sluice_policy::PrivacyCharge,
    ticket: Option<&sluice_privacy::PrivacyTicket>,
) -> SchemaRef {
    use sluice_proto::wire::dp;
    let mut metadata = schema.metadata().clone();
    let cached = ticket.is_some_and(|t| t.cached.is_some());
    let (epsilon, delta) = if cached {
        (0.0, 0.0)
    } else {
        (charge.epsilon, charge.delta)
    };
    metadata.insert(dp::QUERY_EPSILON.into(), epsilon.to_string());
    metadata.insert(dp::QUERY_DELTA.into(), delta.to_string());
    if let Some(cost) = &charge.zcdp {
        let (rho, charged_delta) = if cached {
            (0.0, 0.0)
        } else {
            (cost.rho, cost.delta)
        };
        metadata.insert(dp::QUERY_RHO.into(), rho.to_string());
        metadata.insert(dp::QUERY_CHARGED_DELTA.into(), charged_delta.to_string());
    }
    metadata.insert(dp::CACHED.into(), cached.to_string());
    if let Some((eps, delta)) = ticket.and_then(|t| t.remaining) {
        metadata.insert(dp::REMAINING_EPSILON.into(), eps.to_string());
        metadata.insert(dp::REMAINING_DELTA.into(), delta.to_string());
    }
    Arc::new(Schema::new_with_metadata(schema.fields().clone(), metadata))
}

/// Whether the result order is meaningful: the plan sorts at the top
/// (possibly under a row cap).
pub fn is_ordered(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Sort(_) => true,
        LogicalPlan::Limit(limit) => is_ordered(&limit.input),
        _ => false,
    }
}

fn hydrate_field(field: &FieldRef) -> Field {
    let data_type = match field.data_type() {
        DataType::Dictionary(_, value) => value.as_ref().clone(),
        other => other.clone(),
    };
    Field::new(field.name(), data_type, field.is_nullable()).with_metadata(field.metadata().clone())
}

/// Makes `batch` carry exactly `schema`: same columns in the same order,
/// values cast where the executed type differs from the advertised one.
pub fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, QueryError> {
    if batch.schema_ref() == schema {
        return Ok(batch);
    }
    if batch.num_columns() != schema.fields().len() {
        return Err(QueryError::Internal(format!(
            "the executed plan produced {} columns but {} were advertised",
            batch.num_columns(),
            schema.fields().len()
        )));
    }
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                cast(column, field.data_type()).map_err(|_| {
                    QueryError::Internal(format!(
                        "column `{}` was executed as {} but advertised as {}",
                        field.name(),
                        column.data_type(),
                        field.data_type()
                    ))
                })
            }
        })
        .collect::<Result<_, _>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(schema.clone(), columns, &options).map_err(|e| {
        QueryError::Internal(format!(
            "the result does not fit its advertised schema: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{DictionaryArray, Int32Array, StringArray};
    use datafusion::arrow::datatypes::Int32Type;

    #[test]
    fn conforms_types_nullability_and_metadata() {
        let executed = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int32, true),
            Field::new(
                "s",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
        ]));
        let advertised = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int32, false)
                .with_metadata([("k".to_string(), "v".to_string())].into()),
            Field::new("s", DataType::Utf8, true),
        ]));
        let dict: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
        let batch = RecordBatch::try_new(
            executed,
            vec![Arc::new(Int32Array::from(vec![1, 2, 3])), Arc::new(dict)],
        )
        .unwrap();
        let out = conform(batch, &advertised).unwrap();
        assert_eq!(out.schema(), advertised);
        let s = out
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(s.value(2), "a");
    }

    #[test]
    fn refuses_nulls_in_a_non_nullable_advertised_column() {
        let executed = Arc::new(Schema::new(vec![Field::new("n", DataType::Int32, true)]));
        let advertised = Arc::new(Schema::new(vec![Field::new("n", DataType::Int32, false)]));
        let batch = RecordBatch::try_new(
            executed,
            vec![Arc::new(Int32Array::from(vec![Some(1), None]))],
        )
        .unwrap();
        assert!(matches!(
            conform(batch, &advertised),
            Err(QueryError::Internal(_))
        ));
    }
}
