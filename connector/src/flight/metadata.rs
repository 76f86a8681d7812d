//! Flight SQL metadata: catalogs, schemas, tables, table types, SqlInfo and
//! XDBC type info, as BI tools and drivers (ADBC, JDBC) ask for them.

use std::sync::LazyLock;

use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetTableTypes, CommandGetTables, Nullable,
    Searchable, SqlInfo, SqlNullOrdering, SqlSupportedCaseSensitivity, SqlSupportedTransaction,
    XdbcDataType,
};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;

use crate::catalog::{CATALOG, Catalog, SCHEMA, TABLE_TYPE};
use crate::query::QueryError;

/// What GetSqlInfo reports. Static facts about Sluice's SQL surface.
pub static SQL_INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Sluice");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, crate::ARROW_VERSION);
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(
        SqlInfo::SqlIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
    );
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(
        SqlInfo::SqlQuotedIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityCaseInsensitive as i32,
    );
    b.append(SqlInfo::SqlAllTablesAreSelectable, true);
    b.append(
        SqlInfo::SqlNullOrdering,
        SqlNullOrdering::SqlNullsSortedHigh as i32,
    );
    b.append(SqlInfo::SqlSearchStringEscape, "\\");
    b.append(SqlInfo::SqlSupportsColumnAliasing, true);
    b.append(SqlInfo::SqlNullPlusNullIsNull, true);
    b.append(SqlInfo::SqlSupportsTableCorrelationNames, true);
    b.append(SqlInfo::SqlSupportsExpressionsInOrderBy, true);
    b.append(SqlInfo::SqlSupportsOrderByUnrelated, true);
    b.append(SqlInfo::SqlSupportsLikeEscapeClause, true);
    b.append(SqlInfo::SqlSupportsNonNullableColumns, true);
    b.append(SqlInfo::SqlSchemaTerm, "schema");
    b.append(SqlInfo::SqlCatalogTerm, "catalog");
    b.append(SqlInfo::SqlCatalogAtStart, true);
    b.append(SqlInfo::SqlSelectForUpdateSupported, false);
    b.append(SqlInfo::SqlStoredProceduresSupported, false);
    b.append(SqlInfo::SqlCorrelatedSubqueriesSupported, true);
    b.append(SqlInfo::SqlTransactionsSupported, false);
    b.append(SqlInfo::SqlBatchUpdatesSupported, false);
    b.append(SqlInfo::SqlSavepointsSupported, false);
    b.append(SqlInfo::SqlNamedParametersSupported, false);
    b.append(
        SqlInfo::SqlNumericFunctions,
        &[
            "abs", "ceil", "floor", "round", "trunc", "sqrt", "ln", "log10", "power", "exp",
        ][..],
    );
    b.append(
        SqlInfo::SqlStringFunctions,
        &[
            "lower", "upper", "trim", "ltrim", "rtrim", "substr", "concat", "length", "replace",
            "strpos",
        ][..],
    );
    b.append(
        SqlInfo::SqlDatetimeFunctions,
        &[
            "now",
            "date_trunc",
            "date_part",
            "extract",
            "to_timestamp",
            "to_date",
        ][..],
    );
    b.build().expect("static SqlInfo is well-formed")
});

/// One XDBC type: name, data type, column size, literal prefix, case sensitive.
type XdbcRow = (
    &'static str,
    XdbcDataType,
    Option<i32>,
    Option<&'static str>,
    bool,
);

/// What GetXdbcTypeInfo reports: the SQL types queries can produce.
pub static XDBC_TYPES: LazyLock<XdbcTypeInfoData> = LazyLock::new(|| {
    let mut b = XdbcTypeInfoDataBuilder::new();
    let types: [XdbcRow; 12] = [
        ("BOOLEAN", XdbcDataType::XdbcBit, Some(1), None, false),
        ("TINYINT", XdbcDataType::XdbcTinyint, Some(3), None, false),
        ("SMALLINT", XdbcDataType::XdbcSmallint, Some(5), None, false),
        ("INTEGER", XdbcDataType::XdbcInteger, Some(10), None, false),
        ("BIGINT", XdbcDataType::XdbcBigint, Some(19), None, false),
        ("REAL", XdbcDataType::XdbcReal, Some(7), None, false),
        ("DOUBLE", XdbcDataType::XdbcDouble, Some(15), None, false),
        ("DECIMAL", XdbcDataType::XdbcDecimal, Some(38), None, false),
        ("VARCHAR", XdbcDataType::XdbcVarchar, None, Some("'"), true),
        ("VARBINARY", XdbcDataType::XdbcVarbinary, None, None, false),
        (
            "DATE",
            XdbcDataType::XdbcDate,
            Some(10),
            Some("DATE '"),
            false,
        ),
        (
            "TIMESTAMP",
            XdbcDataType::XdbcTimestamp,
            Some(29),
            Some("TIMESTAMP '"),
            false,
        ),
    ];
    for (name, data_type, size, prefix, case_sensitive) in types {
        let numeric = matches!(
            data_type,
            XdbcDataType::XdbcTinyint
                | XdbcDataType::XdbcSmallint
                | XdbcDataType::XdbcInteger
                | XdbcDataType::XdbcBigint
                | XdbcDataType::XdbcReal
                | XdbcDataType::XdbcDouble
                | XdbcDataType::XdbcDecimal
        );
        b.append(XdbcTypeInfo {
            type_name: name.into(),
            data_type,
            column_size: size,
            literal_prefix: prefix.map(Into::into),
            literal_suffix: prefix.map(|_| "'".into()),
            create_params: (data_type == XdbcDataType::XdbcDecimal)
                .then(|| vec!["precision".into(), "scale".into()]),
            nullable: Nullable::NullabilityNullable,
            case_sensitive,
            searchable: Searchable::Full,
            unsigned_attribute: numeric.then_some(false),
            fixed_prec_scale: data_type == XdbcDataType::XdbcDecimal,
            auto_increment: numeric.then_some(false),
            local_type_name: Some(name.into()),
            minimum_scale: (data_type == XdbcDataType::XdbcDecimal).then_some(0),
            maximum_scale: (data_type == XdbcDataType::XdbcDecimal).then_some(38),
            sql_data_type: data_type,
            datetime_subcode: None,
            num_prec_radix: numeric.then_some(10),
            interval_precision: None,
        });
    }
    b.build().expect("static XDBC type info is well-formed")
});

pub fn catalogs(cmd: CommandGetCatalogs) -> Result<RecordBatch, QueryError> {
    let mut b = cmd.into_builder();
    b.append(CATALOG);
    b.build().map_err(internal)
}

pub fn db_schemas(cmd: CommandGetDbSchemas) -> Result<RecordBatch, QueryError> {
    let mut b = cmd.into_builder();
    b.append(CATALOG, SCHEMA);
    b.build().map_err(internal)
}

pub fn table_types(cmd: CommandGetTableTypes) -> Result<RecordBatch, QueryError> {
    let mut b = cmd.into_builder();
    b.append(TABLE_TYPE);
    b.build().map_err(internal)
}

/// GetTables, honouring the catalog/schema/table filters, the table types and
/// `include_schema` (each table's Arrow schema, IPC-encoded). Only the
/// datasets `visible` names columns for are listed, with those columns only:
/// a consumer never learns the name of a dataset or column it may not use.
pub fn tables(
    cmd: CommandGetTables,
    catalog: &Catalog,
    visible: impl Fn(&str) -> Option<Vec<Field>>,
) -> Result<RecordBatch, QueryError> {
    let mut b = cmd.into_builder();
    for ds in catalog.datasets() {
        let Some(fields) = visible(&ds.name) else {
            continue;
        };
        let schema = Schema::new(fields);
        b.append(CATALOG, SCHEMA, &ds.name, TABLE_TYPE, &schema)
            .map_err(internal)?;
    }
    b.build().map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(format!("building metadata failed: {e}"))
}
