//! Which casts keep every value, so that lineage (and with it what the
//! policy allows on a column) passes through them unchanged.

use datafusion_common::DFSchema;
use datafusion_common::arrow::datatypes::DataType;
use datafusion_expr::ExprSchemable;
use datafusion_expr::expr::Cast;

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
