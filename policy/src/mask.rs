//! Masks, applied at the scan so that no later operator sees the raw value.

use std::fmt;
use std::sync::Arc;

use datafusion_common::arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use datafusion_common::arrow::datatypes::DataType;
use datafusion_common::{Result, ScalarValue, TableReference};
use datafusion_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, cast,
    col, lit,
};
use ring::hmac;

use crate::document::Mask;

/// Name of the keyed-hash function in plans (`EXPLAIN POLICY` shows it; the
/// key is never shown).
pub const MASK_HASH: &str = "sluice_mask_hash";

/// HMAC-SHA256 of the value's text under a key per consumer, as 32 hex
/// digits. NULL stays NULL.
#[derive(Clone)]
pub struct MaskHash {
    key: [u8; 32],
    signature: Signature,
}

impl MaskHash {
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key,
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
        }
    }

    fn hash(&self, key: &hmac::Key, text: &str) -> String {
        let tag = hmac::sign(key, text.as_bytes());
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for MaskHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskHash { key: <secret> }")
    }
}

impl PartialEq for MaskHash {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for MaskHash {}

impl std::hash::Hash for MaskHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        MASK_HASH.hash(state);
    }
}

impl ScalarUDFImpl for MaskHash {
    fn name(&self) -> &str {
        MASK_HASH
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.key);
        let [input] = args.args.as_slice() else {
            return datafusion_common::exec_err!("{MASK_HASH} takes one argument");
        };
        match input {
            ColumnarValue::Scalar(ScalarValue::Utf8(value)) => Ok(ColumnarValue::Scalar(
                ScalarValue::Utf8(value.as_deref().map(|v| self.hash(&key, v))),
            )),
            ColumnarValue::Scalar(other) => {
                datafusion_common::exec_err!("{MASK_HASH} expects text, got {}", other.data_type())
            }
            ColumnarValue::Array(array) => {
                let strings = array.as_string::<i32>();
                let mut out = StringBuilder::with_capacity(strings.len(), strings.len() * 32);
                for value in strings.iter() {
                    out.append_option(value.map(|v| self.hash(&key, v)));
                }
                Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef))
            }
        }
    }
}

/// The masked form of `column` (of `data_type`) of the scan named `table`,
/// aliased back to the column's own qualified name.
pub fn masked_column(
    table: &TableReference,
    column: &str,
    data_type: &DataType,
    mask: &Mask,
    hash_key: [u8; 32],
) -> Result<Expr> {
    let value = col(datafusion_common::Column::new(Some(table.clone()), column));
    let masked = match mask {
        Mask::Hash => {
            let udf = ScalarUDF::new_from_impl(MaskHash::new(hash_key));
            udf.call(vec![cast(value, DataType::Utf8)])
        }
        Mask::Redact => lit(ScalarValue::try_from(data_type)?),
        Mask::Truncate(unit) => {
            let truncated =
                datafusion_functions::datetime::expr_fn::date_trunc(lit(unit.as_str()), value);
            cast(truncated, data_type.clone())
        }
        Mask::Bucket(width) => {
            let scaled = cast(value, DataType::Float64) / lit(*width);
            let floored = datafusion_functions::math::expr_fn::floor(scaled) * lit(*width);
            cast(floored, data_type.clone())
        }
    };
    Ok(masked.alias_qualified(Some(table.clone()), column))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_common::arrow::array::StringArray;
    use datafusion_common::arrow::datatypes::Field;
    use datafusion_common::config::ConfigOptions;

    fn run(udf: &MaskHash, values: Vec<Option<&str>>) -> Vec<Option<String>> {
        let array: ArrayRef = Arc::new(StringArray::from(values));
        let n = array.len();
        let out = udf
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(array)],
                arg_fields: vec![Arc::new(Field::new("v", DataType::Utf8, true))],
                number_rows: n,
                return_field: Arc::new(Field::new("out", DataType::Utf8, true)),
                config_options: Arc::new(ConfigOptions::default()),
            })
            .unwrap();
        let ColumnarValue::Array(out) = out else {
            panic!("array expected")
        };
        out.as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    #[test]
    fn hashes_are_stable_per_key_and_differ_across_keys() {
        let a = MaskHash::new([1; 32]);
        let b = MaskHash::new([2; 32]);
        let first = run(&a, vec![Some("C-1"), None, Some("C-1")]);
        assert_eq!(first[0], first[2]);
        assert_eq!(first[1], None);
        assert_eq!(first[0].as_ref().unwrap().len(), 32);
        assert_ne!(first[0], run(&b, vec![Some("C-1")])[0]);
        assert!(
            !format!("{a:?}").contains('1'),
            "the key must not be printed"
        );
    }
}
