//! Reading the sizes of function arguments and results without copying
//! them: what the guards need to know before and after a call.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::ColumnarValue;

/// The string or binary values of one argument (or result), row by row.
pub(super) enum Bytes<'a> {
    /// A constant: the same value, or NULL, on every row.
    Constant(Option<&'a [u8]>),
    /// `Utf8` / `Binary`: values addressed by 32-bit offsets.
    Offsets32 {
        offsets: &'a [i32],
        data: &'a [u8],
        nulls: Option<&'a NullBuffer>,
    },
    /// `LargeUtf8` / `LargeBinary`.
    Offsets64 {
        offsets: &'a [i64],
        data: &'a [u8],
        nulls: Option<&'a NullBuffer>,
    },
    /// `Utf8View` / `BinaryView`.
    Views(&'a dyn Array),
    /// Not a string or binary value (a number, a date, a list…).
    Other,
}

impl<'a> Bytes<'a> {
    pub(super) fn of(value: &'a ColumnarValue) -> Self {
        match value {
            ColumnarValue::Scalar(scalar) => match scalar_bytes(scalar) {
                Some(bytes) => Bytes::Constant(bytes),
                None => Bytes::Other,
            },
            ColumnarValue::Array(array) => Self::of_array(array.as_ref()),
        }
    }

    fn of_array(array: &'a dyn Array) -> Self {
        match array.data_type() {
            DataType::Utf8 => {
                let a = array.as_string::<i32>();
                Bytes::Offsets32 {
                    offsets: a.value_offsets(),
                    data: a.value_data(),
                    nulls: a.nulls(),
                }
            }
            DataType::Binary => {
                let a = array.as_binary::<i32>();
                Bytes::Offsets32 {
                    offsets: a.value_offsets(),
                    data: a.value_data(),
                    nulls: a.nulls(),
                }
            }
            DataType::LargeUtf8 => {
                let a = array.as_string::<i64>();
                Bytes::Offsets64 {
                    offsets: a.value_offsets(),
                    data: a.value_data(),
                    nulls: a.nulls(),
                }
            }
            DataType::LargeBinary => {
                let a = array.as_binary::<i64>();
                Bytes::Offsets64 {
                    offsets: a.value_offsets(),
                    data: a.value_data(),
                    nulls: a.nulls(),
                }
            }
            DataType::Utf8View | DataType::BinaryView => Bytes::Views(array),
            _ => Bytes::Other,
        }
    }

    pub(super) fn is_bytes(&self) -> bool {
        !matches!(self, Bytes::Other)
    }

    pub(super) fn is_constant(&self) -> bool {
        matches!(self, Bytes::Constant(_))
    }

    /// The value at `row`; `None` for NULL (and for non-byte values).
    pub(super) fn at(&self, row: usize) -> Option<&'a [u8]> {
        match self {
            Bytes::Constant(value) => *value,
            Bytes::Offsets32 {
                offsets,
                data,
                nulls,
            } => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    return None;
                }
                let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
                Some(&data[start..end])
            }
            Bytes::Offsets64 {
                offsets,
                data,
                nulls,
            } => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    return None;
                }
                let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
                Some(&data[start..end])
            }
            Bytes::Views(array) => {
                if array.is_null(row) {
                    return None;
                }
                match array.data_type() {
                    DataType::Utf8View => Some(array.as_string_view().value(row).as_bytes()),
                    _ => Some(array.as_binary_view().value(row)),
                }
            }
            Bytes::Other => None,
        }
    }

    /// The length of the value at `row` (0 for NULL).
    pub(super) fn len_at(&self, row: usize) -> usize {
        match self {
            Bytes::Constant(value) => value.map_or(0, <[u8]>::len),
            Bytes::Offsets32 { offsets, nulls, .. } => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    0
                } else {
                    (offsets[row + 1] - offsets[row]) as usize
                }
            }
            Bytes::Offsets64 { offsets, nulls, .. } => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    0
                } else {
                    (offsets[row + 1] - offsets[row]) as usize
                }
            }
            Bytes::Views(array) => {
                if array.is_null(row) {
                    0
                } else {
                    view_len(*array, row)
                }
            }
            Bytes::Other => 0,
        }
    }

    pub(super) fn is_null_at(&self, row: usize) -> bool {
        match self {
            Bytes::Constant(value) => value.is_none(),
            Bytes::Offsets32 { nulls, .. } | Bytes::Offsets64 { nulls, .. } => {
                nulls.is_some_and(|n| n.is_null(row))
            }
            Bytes::Views(array) => array.is_null(row),
            Bytes::Other => true,
        }
    }

    /// Bytes a kernel that copies the whole value buffer allocates for
    /// this argument over `rows` rows: the buffer of an array (NULL slots
    /// and all), a constant once per row.
    pub(super) fn buffer_bytes(&self, rows: usize) -> u128 {
        match self {
            Bytes::Constant(value) => value.map_or(0, <[u8]>::len) as u128 * rows as u128,
            Bytes::Offsets32 { data, .. } | Bytes::Offsets64 { data, .. } => data.len() as u128,
            Bytes::Views(array) => (0..array.len()).map(|i| view_len(*array, i) as u128).sum(),
            Bytes::Other => 0,
        }
    }
}

fn view_len(array: &dyn Array, row: usize) -> usize {
    let views = match array.data_type() {
        DataType::Utf8View => array.as_string_view().views(),
        _ => array.as_binary_view().views(),
    };
    // The low 32 bits of a view hold the value's length.
    (views[row] as u32) as usize
}

/// The bytes of a string or binary constant; `None` if the constant is not
/// one (`Some(None)` for a NULL string).
pub(super) fn scalar_bytes(scalar: &ScalarValue) -> Option<Option<&[u8]>> {
    match scalar {
        ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) | ScalarValue::Utf8View(v) => {
            Some(v.as_deref().map(str::as_bytes))
        }
        ScalarValue::Binary(v)
        | ScalarValue::LargeBinary(v)
        | ScalarValue::BinaryView(v)
        | ScalarValue::FixedSizeBinary(_, v) => Some(v.as_deref()),
        ScalarValue::Dictionary(_, inner) => scalar_bytes(inner),
        _ => None,
    }
}

/// An integer argument (a count or a length), row by row.
pub(super) enum Ints {
    Constant(Option<i64>),
    Array(Arc<Int64Array>),
    Other,
}

impl Ints {
    pub(super) fn of(value: &ColumnarValue) -> Self {
        match value {
            ColumnarValue::Scalar(scalar) => {
                if !scalar.data_type().is_integer() && !scalar.is_null() {
                    return Ints::Other;
                }
                match scalar.cast_to(&DataType::Int64) {
                    Ok(ScalarValue::Int64(v)) => Ints::Constant(v),
                    _ => Ints::Other,
                }
            }
            ColumnarValue::Array(array) if array.data_type().is_integer() => {
                match cast(array, &DataType::Int64) {
                    Ok(a) => Ints::Array(Arc::new(a.as_primitive::<Int64Type>().clone())),
                    Err(_) => Ints::Other,
                }
            }
            ColumnarValue::Array(_) => Ints::Other,
        }
    }

    pub(super) fn at(&self, row: usize) -> Option<i64> {
        match self {
            Ints::Constant(v) => *v,
            Ints::Array(a) => (!a.is_null(row)).then(|| a.value(row)),
            Ints::Other => None,
        }
    }

    pub(super) fn any_negative(&self) -> bool {
        match self {
            Ints::Constant(v) => v.is_some_and(|v| v < 0),
            Ints::Array(a) => a.iter().flatten().any(|v| v < 0),
            Ints::Other => false,
        }
    }
}

/// The largest value and the total bytes of a string or binary result;
/// `None` for any other kind of result. A constant result counts once.
pub(super) fn measure(result: &ColumnarValue) -> Option<(u128, u128)> {
    let rows = match result {
        ColumnarValue::Scalar(_) => 1,
        ColumnarValue::Array(a) => a.len(),
    };
    let bytes = Bytes::of(result);
    if !bytes.is_bytes() {
        return None;
    }
    if let Bytes::Offsets32 { data, .. } | Bytes::Offsets64 { data, .. } = &bytes {
        // The whole buffer is what the result holds on to.
        let largest = (0..rows).map(|i| bytes.len_at(i)).max().unwrap_or(0);
        return Some((largest as u128, data.len() as u128));
    }
    let mut largest = 0u128;
    let mut total = 0u128;
    for i in 0..rows {
        let n = bytes.len_at(i) as u128;
        largest = largest.max(n);
        total += n;
    }
    Some((largest, total))
}

/// `value` sliced to rows `start..start + len` (a constant stays as is).
pub(super) fn slice(value: &ColumnarValue, start: usize, len: usize) -> ColumnarValue {
    match value {
        ColumnarValue::Scalar(s) => ColumnarValue::Scalar(s.clone()),
        ColumnarValue::Array(a) => ColumnarValue::Array(a.slice(start, len)),
    }
}

/// `value` as an array of `rows` rows.
pub(super) fn to_array(value: ColumnarValue, rows: usize) -> datafusion::common::Result<ArrayRef> {
    value.into_array(rows)
}
