//! PostgreSQL column types and the Arrow types Sluice serves them as, and
//! decoding of PostgreSQL's binary wire format into Arrow arrays.
//!
//! The mapping is explicit: a type not listed here is refused when the
//! connector starts, naming the dataset, the column and the type, so that a
//! column is never served in a shape nobody chose.
//!
//! | PostgreSQL | Arrow |
//! |---|---|
//! | `bool` | Boolean |
//! | `int2`, `int4`, `int8` | Int16, Int32, Int64 |
//! | `float4`, `float8` | Float32, Float64 |
//! | `numeric(p, s)`, p ≤ 38 | Decimal128(p, s) |
//! | `text`, `varchar`, `bpchar`, `name` | Utf8 |
//! | `date` | Date32 |
//! | `timestamp` | Timestamp(µs) |
//! | `timestamptz` | Timestamp(µs, "UTC") |
//! | `uuid` | Utf8 (canonical lowercase form) |
//! | `json`, `jsonb` | Utf8 (the JSON text) |

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use serde::{Deserialize, Serialize};

/// A column as PostgreSQL's catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgColumn {
    pub name: String,
    /// `pg_type.typname`, e.g. `int4`, `numeric`, `timestamptz`.
    pub type_name: String,
    /// The type's OID, checked against what each query's statement returns.
    pub type_oid: u32,
    /// `pg_attribute.atttypmod`: precision and scale of a numeric.
    pub typmod: i32,
    pub not_null: bool,
}

/// Why a column cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsupportedType {
    #[error(
        "has PostgreSQL type `{0}`, which Sluice does not serve; leave the column out with a view, or cast it in a view to one of: bool, int2, int4, int8, float4, float8, numeric(p,s), text, varchar, date, timestamp, timestamptz, uuid, json, jsonb"
    )]
    Type(String),
    #[error(
        "is `numeric` without a precision and scale (or with a precision over 38); cast it in a view to numeric(p, s) with p ≤ 38, or to float8"
    )]
    UnboundedNumeric,
}

/// The Arrow type column `column` is served as.
pub fn arrow_type(column: &PgColumn) -> Result<DataType, UnsupportedType> {
    Ok(match column.type_name.as_str() {
        "bool" => DataType::Boolean,
        "int2" => DataType::Int16,
        "int4" => DataType::Int32,
        "int8" => DataType::Int64,
        "float4" => DataType::Float32,
        "float8" => DataType::Float64,
        "numeric" => {
            let (precision, scale) =
                numeric_typmod(column.typmod).ok_or(UnsupportedType::UnboundedNumeric)?;
            DataType::Decimal128(precision, scale)
        }
        "text" | "varchar" | "bpchar" | "name" | "uuid" | "json" | "jsonb" => DataType::Utf8,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        other => return Err(UnsupportedType::Type(other.to_string())),
    })
}

/// Precision and scale of `numeric(p, s)` from its type modifier.
fn numeric_typmod(typmod: i32) -> Option<(u8, i8)> {
    if typmod < 4 {
        return None;
    }
    let packed = typmod - 4;
    let precision = (packed >> 16) & 0xffff;
    let scale = packed & 0xffff;
    // Negative scales (PostgreSQL 15+) are not served.
    if !(1..=38).contains(&precision) || scale > precision || scale > 0x7ff {
        return None;
    }
    Some((precision as u8, scale as i8))
}

/// A value that cannot become the column's Arrow value (an infinite date,
/// a number past the column's precision, text that is not UTF-8). The value
/// itself is never part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column `{column}`: {what}")]
pub struct BadValue {
    pub column: String,
    pub what: &'static str,
}

/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Builds one column's Arrow array from binary-format values.
pub enum ColumnBuilder {
    Boolean(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Text(StringBuilder, TextKind),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, Option<Arc<str>>),
}

#[derive(Debug, Clone, Copy)]
pub enum TextKind {
    Text,
    Uuid,
    Json,
    Jsonb,
}

impl ColumnBuilder {
    /// A builder for `column` (whose type [`arrow_type`] accepted).
    pub fn new(column: &PgColumn, data_type: &DataType, capacity: usize) -> Self {
        match data_type {
            DataType::Boolean => Self::Boolean(BooleanBuilder::with_capacity(capacity)),
            DataType::Int16 => Self::Int16(Int16Builder::with_capacity(capacity)),
            DataType::Int32 => Self::Int32(Int32Builder::with_capacity(capacity)),
            DataType::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            DataType::Float32 => Self::Float32(Float32Builder::with_capacity(capacity)),
            DataType::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            DataType::Decimal128(p, s) => Self::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_data_type(DataType::Decimal128(*p, *s)),
                *p,
                *s,
            ),
            DataType::Date32 => Self::Date(Date32Builder::with_capacity(capacity)),
            DataType::Timestamp(_, tz) => Self::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone_opt(tz.clone()),
                tz.clone(),
            ),
            _ => Self::Text(
                StringBuilder::with_capacity(capacity, capacity * 16),
                match column.type_name.as_str() {
                    "uuid" => TextKind::Uuid,
                    "json" => TextKind::Json,
                    "jsonb" => TextKind::Jsonb,
                    _ => TextKind::Text,
                },
            ),
        }
    }

    /// Appends one value (`None`: SQL NULL) in PostgreSQL's binary format.
    pub fn append(&mut self, value: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(raw) = value else {
            self.append_null();
            return Ok(());
        };
        match self {
            Self::Boolean(b) => b.append_value(fixed::<1>(raw)?[0] != 0),
            Self::Int16(b) => b.append_value(i16::from_be_bytes(fixed(raw)?)),
            Self::Int32(b) => b.append_value(i32::from_be_bytes(fixed(raw)?)),
            Self::Int64(b) => b.append_value(i64::from_be_bytes(fixed(raw)?)),
            Self::Float32(b) => b.append_value(f32::from_be_bytes(fixed(raw)?)),
            Self::Float64(b) => b.append_value(f64::from_be_bytes(fixed(raw)?)),
            Self::Decimal(b, precision, scale) => {
                b.append_value(decode_numeric(raw, *precision, *scale)?)
            }
            Self::Date(b) => {
                let days = i32::from_be_bytes(fixed(raw)?);
                if days == i32::MAX || days == i32::MIN {
                    return Err("an infinite date, which Arrow cannot hold");
                }
                b.append_value(
                    days.checked_add(PG_EPOCH_DAYS)
                        .ok_or("a date out of range")?,
                )
            }
            Self::Timestamp(b, _) => {
                let micros = i64::from_be_bytes(fixed(raw)?);
                if micros == i64::MAX || micros == i64::MIN {
                    return Err("an infinite timestamp, which Arrow cannot hold");
                }
                b.append_value(
                    micros
                        .checked_add(PG_EPOCH_MICROS)
                        .ok_or("a timestamp out of range")?,
                )
            }
            Self::Text(b, kind) => match kind {
                TextKind::Uuid => b.append_value(format_uuid(fixed(raw)?)),
                TextKind::Jsonb => match raw.split_first() {
                    Some((1, text)) => b.append_value(utf8(text)?),
                    _ => return Err("a jsonb value in an unknown binary format version"),
                },
                TextKind::Text | TextKind::Json => b.append_value(utf8(raw)?),
            },
        }
        Ok(())
    }

    fn append_null(&mut self) {
        match self {
            Self::Boolean(b) => b.append_null(),
            Self::Int16(b) => b.append_null(),
            Self::Int32(b) => b.append_null(),
            Self::Int64(b) => b.append_null(),
            Self::Float32(b) => b.append_null(),
            Self::Float64(b) => b.append_null(),
            Self::Decimal(b, ..) => b.append_null(),
            Self::Text(b, _) => b.append_null(),
            Self::Date(b) => b.append_null(),
            Self::Timestamp(b, _) => b.append_null(),
        }
    }

    pub fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Boolean(b) => Arc::new(b.finish()),
            Self::Int16(b) => Arc::new(b.finish()),
            Self::Int32(b) => Arc::new(b.finish()),
            Self::Int64(b) => Arc::new(b.finish()),
            Self::Float32(b) => Arc::new(b.finish()),
            Self::Float64(b) => Arc::new(b.finish()),
            Self::Decimal(b, ..) => Arc::new(b.finish()),
            Self::Text(b, _) => Arc::new(b.finish()),
            Self::Date(b) => Arc::new(b.finish()),
            Self::Timestamp(b, _) => Arc::new(b.finish()),
        }
    }
}

fn fixed<const N: usize>(raw: &[u8]) -> Result<[u8; N], &'static str> {
    raw.try_into()
        .map_err(|_| "a value of another size than its type (did the column's type change?)")
}

fn utf8(raw: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(raw).map_err(|_| "text that is not UTF-8")
}

fn format_uuid(b: [u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A binary-format `numeric` as the unscaled integer of Decimal128(p, s).
///
/// The format is: digit count, weight (of the first base-10000 digit),
/// sign, display scale, then the base-10000 digits.
fn decode_numeric(raw: &[u8], precision: u8, scale: i8) -> Result<i128, &'static str> {
    const MALFORMED: &str = "a numeric in an unknown binary format";
    const TOO_LARGE: &str = "a numeric larger than the column's precision";
    let word = |i: usize| -> Result<i16, &'static str> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or(MALFORMED)
    };
    let ndigits = usize::try_from(word(0)?).map_err(|_| MALFORMED)?;
    let weight = i32::from(word(1)?);
    let sign = word(2)? as u16;
    if raw.len() != 8 + ndigits * 2 {
        return Err(MALFORMED);
    }
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        0xC000 => return Err("a numeric NaN, which a decimal cannot hold"),
        _ => return Err("an infinite numeric, which a decimal cannot hold"),
    };
    let mut value: i128 = 0;
    for i in 0..ndigits {
        let digit = i128::from(word(4 + i)?);
        if !(0..10_000).contains(&digit) {
            return Err(MALFORMED);
        }
        // The digit's power of ten in the unscaled value.
        let exponent = 4 * (weight - i as i32) + i32::from(scale);
        let scaled = if exponent >= 0 {
            let factor = 10i128.checked_pow(exponent as u32).ok_or(TOO_LARGE)?;
            digit.checked_mul(factor).ok_or(TOO_LARGE)?
        } else {
            let divisor = 10i128.pow((-exponent).min(38) as u32);
            if digit % divisor != 0 {
                return Err("a numeric with more decimal places than the column's scale");
            }
            digit / divisor
        };
        value = value.checked_add(scaled).ok_or(TOO_LARGE)?;
    }
    if value >= 10i128.pow(u32::from(precision)) {
        return Err(TOO_LARGE);
    }
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(type_name: &str, typmod: i32) -> PgColumn {
        PgColumn {
            name: "c".into(),
            type_name: type_name.into(),
            type_oid: 0,
            typmod,
            not_null: false,
        }
    }

    fn numeric(ndigits: i16, weight: i16, sign: u16, scale: u16, digits: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [ndigits, weight, sign as i16, scale as i16] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out
    }

    #[test]
    fn the_mapping_is_explicit_and_refuses_the_rest() {
        assert_eq!(
            arrow_type(&column("numeric", ((12 << 16) | 2) + 4)).unwrap(),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(
            arrow_type(&column("numeric", -1)).unwrap_err(),
            UnsupportedType::UnboundedNumeric
        );
        assert_eq!(
            arrow_type(&column("timestamptz", -1)).unwrap(),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        for refused in [
            "bytea", "int4[]", "_int4", "interval", "point", "money", "xml",
        ] {
            assert!(
                matches!(arrow_type(&column(refused, -1)), Err(UnsupportedType::Type(t)) if t == refused)
            );
        }
    }

    #[test]
    fn numerics_decode_to_the_columns_scale() {
        // 1234.5 as numeric(8,2): digits [1234, 5000], weight 0.
        let raw = numeric(2, 0, 0, 1, &[1234, 5000]);
        assert_eq!(decode_numeric(&raw, 8, 2), Ok(123_450));
        // -0.07: digits [700], weight -1.
        let raw = numeric(1, -1, 0x4000, 2, &[700]);
        assert_eq!(decode_numeric(&raw, 8, 2), Ok(-7));
        // 12345678901 in numeric(12,0): digits [123, 4567, 8901], weight 2.
        let raw = numeric(3, 2, 0, 0, &[123, 4567, 8901]);
        assert_eq!(decode_numeric(&raw, 12, 0), Ok(12_345_678_901));
        // Past the precision, more places than the scale, NaN: refused.
        assert!(decode_numeric(&numeric(3, 2, 0, 0, &[123, 4567, 8901]), 10, 0).is_err());
        assert!(decode_numeric(&numeric(1, -1, 0, 4, &[1234]), 8, 2).is_err());
        assert!(decode_numeric(&numeric(0, 0, 0xC000, 0, &[]), 8, 2).is_err());
        assert!(decode_numeric(&[0, 1], 8, 2).is_err());
        // Zero has no digits.
        assert_eq!(decode_numeric(&numeric(0, 0, 0, 0, &[]), 8, 2), Ok(0));
    }

    #[test]
    fn dates_timestamps_and_uuids() {
        let mut date = ColumnBuilder::new(&column("date", -1), &DataType::Date32, 2);
        date.append(Some(&0i32.to_be_bytes())).unwrap();
        assert!(date.append(Some(&i32::MAX.to_be_bytes())).is_err());
        let array = date.finish();
        let dates = array
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Date32Array>()
            .unwrap();
        assert_eq!(dates.value(0), PG_EPOCH_DAYS);
        let uuid: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(format_uuid(uuid), "00010203-0405-0607-0809-0a0b0c0d0e0f");
        let mut text = ColumnBuilder::new(&column("int4", -1), &DataType::Int32, 1);
        assert!(text.append(Some(b"abc")).is_err(), "a 3-byte int4");
    }
}
