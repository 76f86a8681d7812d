//! Which filters of an approved plan are also sent to PostgreSQL, and their
//! SQL.
//!
//! A filter is pushed only when it is a comparison of a column with
//! constants that PostgreSQL evaluates exactly as DataFusion does, joined
//! by AND, OR and NOT. Pushed filters are *inexact*: DataFusion applies
//! them again to what the database returns, so a row filter of the policy
//! always applies in Sluice, and the database only saves reading rows that
//! would be dropped anyway. Everything else (any function call, the keyed
//! masking function above all, casts, arithmetic, string ordering, which
//! depends on the database's collation, floating-point constants) is
//! evaluated in Sluice only, and never reaches the database's query log.

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

/// `name` as a quoted PostgreSQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL of `filter` for PostgreSQL, if it may be pushed.
pub fn filter_sql(filter: &Expr, schema: &Schema) -> Option<String> {
    match filter {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And | Operator::Or => {
                let keyword = if *op == Operator::And { "AND" } else { "OR" };
                Some(format!(
                    "({} {keyword} {})",
                    filter_sql(left, schema)?,
                    filter_sql(right, schema)?
                ))
            }
            _ => comparison(left, *op, right, schema),
        },
        Expr::Not(inner) => Some(format!("(NOT {})", filter_sql(inner, schema)?)),
        Expr::IsNull(inner) => Some(format!("({} IS NULL)", column(inner, schema)?.0)),
        Expr::IsNotNull(inner) => Some(format!("({} IS NOT NULL)", column(inner, schema)?.0)),
        Expr::InList(list) => {
            let (name, data_type) = column(&list.expr, schema)?;
            let values = list
                .list
                .iter()
                .map(|v| literal(v, data_type))
                .collect::<Option<Vec<_>>>()?;
            if values.is_empty() {
                return None;
            }
            let not = if list.negated { "NOT " } else { "" };
            Some(format!("({name} {not}IN ({}))", values.join(", ")))
        }
        Expr::Column(_) => {
            let (name, data_type) = column(filter, schema)?;
            (*data_type == DataType::Boolean).then_some(name)
        }
        _ => None,
    }
}

/// `column op constant` (either way round).
fn comparison(left: &Expr, op: Operator, right: &Expr, schema: &Schema) -> Option<String> {
    let (column_side, constant, op) = match (column(left, schema), column(right, schema)) {
        (Some(c), None) => (c, right, op),
        (None, Some(c)) => (c, left, op.swap()?),
        _ => return None,
    };
    let (name, data_type) = column_side;
    let sql_op = match op {
        Operator::Eq => "=",
        Operator::NotEq => "<>",
        Operator::Lt => "<",
        Operator::LtEq => "<=",
        Operator::Gt => ">",
        Operator::GtEq => ">=",
        _ => return None,
    };
    let ordering = !matches!(op, Operator::Eq | Operator::NotEq);
    if ordering && !is_ordered_alike(data_type) {
        return None;
    }
    Some(format!(
        "({name} {sql_op} {})",
        literal(constant, data_type)?
    ))
}

/// Types whose order PostgreSQL and DataFusion agree on (no collations,
/// no NaN).
fn is_ordered_alike(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Decimal128(..)
            | DataType::Date32
    )
}

fn column<'a>(expr: &Expr, schema: &'a Schema) -> Option<(String, &'a DataType)> {
    let Expr::Column(c) = expr else {
        return None;
    };
    let field = schema.field_with_name(&c.name).ok()?;
    Some((quote_identifier(field.name()), field.data_type()))
}

/// A constant of the column's own type, as PostgreSQL literal text.
fn literal(expr: &Expr, column_type: &DataType) -> Option<String> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    if value.data_type() != *column_type {
        return None;
    }
    match value {
        ScalarValue::Boolean(Some(b)) => Some(b.to_string().to_uppercase()),
        ScalarValue::Int16(Some(v)) => Some(v.to_string()),
        ScalarValue::Int32(Some(v)) => Some(v.to_string()),
        ScalarValue::Int64(Some(v)) => Some(v.to_string()),
        ScalarValue::Decimal128(Some(_), _, _) => Some(value.to_string()),
        ScalarValue::Date32(Some(_)) => Some(format!("DATE '{value}'")),
        ScalarValue::Utf8(Some(s)) => string(s),
        _ => None,
    }
}

/// A standard-conforming string literal (the connection sets
/// `standard_conforming_strings = on`, so a backslash is just a
/// backslash). NUL cannot be in PostgreSQL text: such a filter stays in
/// Sluice.
fn string(s: &str) -> Option<String> {
    if s.contains('\0') {
        return None;
    }
    Some(format!("'{}'", s.replace('\'', "''")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;
    use datafusion::logical_expr::{ScalarUDF, col, lit};
    use datafusion::prelude::{cast, in_list};

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("zone", DataType::Int32, true),
            Field::new("line", DataType::Utf8, true),
            Field::new("fare", DataType::Float64, true),
            Field::new("night", DataType::Boolean, true),
            Field::new("Odd \"name\"", DataType::Int64, true),
        ])
    }

    #[test]
    fn comparisons_with_constants_are_pushed() {
        let s = schema();
        let f = col("zone").gt(lit(3i32)).and(col("line").eq(lit("it's")));
        assert_eq!(
            filter_sql(&f, &s).unwrap(),
            r#"(("zone" > 3) AND ("line" = 'it''s'))"#
        );
        let f = lit(3i32).lt(col("zone"));
        assert_eq!(filter_sql(&f, &s).unwrap(), r#"("zone" > 3)"#);
        let f = in_list(col("line"), vec![lit("a"), lit("b\\")], true);
        assert_eq!(
            filter_sql(&f, &s).unwrap(),
            r#"("line" NOT IN ('a', 'b\'))"#
        );
        let f = col("Odd \"name\"").is_null().or(col("night"));
        assert_eq!(
            filter_sql(&f, &s).unwrap(),
            r#"(("Odd ""name""" IS NULL) OR "night")"#
        );
    }

    #[test]
    fn what_could_differ_or_reveal_stays_in_sluice() {
        let s = schema();
        let mask = ScalarUDF::new_from_impl(datafusion::functions::string::lower::LowerFunc::new());
        let refused = [
            // A function call: the masking function is one.
            mask.call(vec![col("line")]).eq(lit("x")),
            // String order depends on the database's collation.
            col("line").lt(lit("m")),
            // Floating point constants and NaN order.
            col("fare").gt(lit(1.5f64)),
            // A constant of another type, a cast, arithmetic.
            col("zone").eq(lit(3i64)),
            cast(col("zone"), DataType::Int64).eq(lit(3i64)),
            (col("zone") + lit(1i32)).eq(lit(3i32)),
            // Column against column, NUL in text, NULL constants.
            col("zone").eq(col("zone")),
            col("line").eq(lit("a\0b")),
            col("zone").eq(lit(ScalarValue::Int32(None))),
            // One unpushable side makes the whole OR unpushable.
            col("zone").eq(lit(1i32)).or(col("fare").gt(lit(1.0f64))),
        ];
        for f in refused {
            assert_eq!(filter_sql(&f, &s), None, "{f}");
        }
    }
}
