//! Datasets in PostgreSQL: a relation read over the database's own wire
//! protocol, as a DataFusion table.
//!
//! ```text
//! startup:  connect ─▶ describe the relation (pg_catalog) ─▶ Arrow schema (types::arrow_type)
//! query:    approved plan ─▶ scan(projection, filters) ─▶ SELECT <needed columns> FROM <relation> WHERE <pushable filters>
//!           ─▶ REPEATABLE READ, READ ONLY transaction ─▶ snapshot noted ─▶ portal fetched in batches
//! ```
//!
//! What reaches the database is derived from the plan the policy approved
//! and rewrote: only the columns the plan needs, and only the filters
//! [`pushdown::filter_sql`] accepts (comparisons of columns with constants;
//! never a function call, so never the keyed masking function or its key).
//! Pushed filters are applied again in Sluice. Aggregates, joins, sorts
//! and limits run in Sluice.
//!
//! Every failure names the dataset, never the host, the database, the
//! driver's message or a value ([`SourceError`]); the driver's message is
//! logged. Connections are pooled per `[[databases]]` entry and bounded by
//! its `max_connections`; each statement runs under the database's own
//! `statement_timeout`, and a query that ends early (its deadline, a client
//! that went away) cancels its statement on the server.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{CancelToken, IsolationLevel};

use super::source::{SourceError, SourceFault};
use crate::config::{DatabaseConfig, Secret};

pub mod pool;
pub mod pushdown;
pub mod tls;
pub mod types;

pub use pool::Database;
use types::{ColumnBuilder, PgColumn};

/// Why a database relation cannot be served, at startup.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    /// The database could not be reached or refused the login; the cause
    /// is the driver's (it never holds the password).
    #[error("database `{database}` could not be reached or refused the login: {cause}")]
    Unreachable { database: String, cause: String },
    #[error(
        "relation `{relation}` does not exist in database `{database}` (or the user may not read it)"
    )]
    NoRelation { database: String, relation: String },
    #[error("relation `{relation}` is not a table or view")]
    NotATable { relation: String },
    #[error("column `{column}` {reason}")]
    Column {
        column: String,
        reason: types::UnsupportedType,
    },
}

/// A served relation: its name as SQL, and its columns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relation {
    /// Schema-qualified and quoted, as PostgreSQL names it.
    pub sql_name: String,
    pub columns: Vec<PgColumn>,
}

impl Relation {
    /// The Arrow schema it is served with.
    pub fn schema(&self) -> Result<SchemaRef, DescribeError> {
        let fields = self
            .columns
            .iter()
            .map(|c| {
                let data_type = types::arrow_type(c).map_err(|reason| DescribeError::Column {
                    column: c.name.clone(),
                    reason,
                })?;
                Ok(Field::new(&c.name, data_type, !c.not_null))
            })
            .collect::<Result<Vec<_>, DescribeError>>()?;
        Ok(Arc::new(Schema::new(fields)))
    }
}

/// Reads `relation`'s description from the database's catalog.
pub async fn describe(db: &Database, relation: &str) -> Result<Relation, DescribeError> {
    let unreachable = |e: &(dyn std::error::Error + 'static)| DescribeError::Unreachable {
        database: db.name().to_string(),
        cause: driver_message(e),
    };
    let client = db.connect().await.map_err(|e| unreachable(&e))?;
    let found = client
        .query_opt(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = pg_catalog.to_regclass($1)",
            &[&relation],
        )
        .await
        .map_err(|e| unreachable(&e))?;
    let Some(found) = found else {
        return Err(DescribeError::NoRelation {
            database: db.name().to_string(),
            relation: relation.to_string(),
        });
    };
    let sql_name: String = found.get(0);
    let kind: String = found.get(1);
    // Tables, views, materialized views, partitioned and foreign tables.
    if !matches!(kind.as_str(), "r" | "v" | "m" | "p" | "f") {
        return Err(DescribeError::NotATable {
            relation: relation.to_string(),
        });
    }
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, t.oid, a.atttypmod, a.attnotnull \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&relation],
        )
        .await
        .map_err(|e| unreachable(&e))?;
    let columns = rows
        .iter()
        .map(|r| PgColumn {
            name: r.get(0),
            type_name: r.get(1),
            type_oid: r.get(2),
            typmod: r.get(3),
            not_null: r.get(4),
        })
        .collect();
    let relation = Relation { sql_name, columns };
    relation.schema()?;
    Ok(relation)
}

/// A PostgreSQL relation as a DataFusion table.
#[derive(Debug)]
pub struct PgTable {
    dataset: String,
    db: Arc<Database>,
    relation: Relation,
    schema: SchemaRef,
}

impl PgTable {
    pub fn new(
        dataset: &str,
        db: Arc<Database>,
        relation: Relation,
    ) -> Result<Self, DescribeError> {
        let schema = relation.schema()?;
        Ok(Self {
            dataset: dataset.to_string(),
            db,
            relation,
            schema,
        })
    }

    /// The statement for the columns at `projection`, filtered by what may
    /// be pushed of `filters`.
    fn statement(&self, projection: &[usize], filters: &[Expr], limit: Option<usize>) -> String {
        let columns: Vec<String> = projection
            .iter()
            .map(|&i| pushdown::quote_identifier(&self.relation.columns[i].name))
            .collect();
        // A query that needs no column (COUNT(*)) selects none: PostgreSQL
        // returns rows of zero columns.
        let mut sql = format!(
            "SELECT {} FROM {}",
            columns.join(", "),
            self.relation.sql_name
        );
        let pushed: Vec<String> = filters
            .iter()
            .filter(|_| self.db.config().pushdown)
            .filter_map(|f| pushdown::filter_sql(f, &self.schema))
            .collect();
        if !pushed.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&pushed.join(" AND "));
        }
        if let Some(limit) = limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        sql
    }
}

#[tonic::async_trait]
impl TableProvider for PgTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let enabled = self.db.config().pushdown;
        Ok(filters
            .iter()
            .map(|f| match pushdown::filter_sql(f, &self.schema) {
                Some(_) if enabled => TableProviderFilterPushDown::Inexact,
                _ => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&projection)?);
        let columns = projection
            .iter()
            .map(|&i| self.relation.columns[i].clone())
            .collect();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(PgScanExec {
            scan: Arc::new(Scan {
                dataset: self.dataset.clone(),
                db: self.db.clone(),
                sql: self.statement(&projection, filters, limit),
                schema,
                columns,
            }),
            properties: Arc::new(properties),
            read: Arc::new(Mutex::new(None)),
        }))
    }
}

/// What one scan sends and expects back.
#[derive(Debug)]
struct Scan {
    dataset: String,
    db: Arc<Database>,
    sql: String,
    schema: SchemaRef,
    columns: Vec<PgColumn>,
}

/// The data version one scan read: the database's transaction snapshot
/// (`pg_current_snapshot()`) and the server's time, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadVersion {
    pub dataset: String,
    pub snapshot: String,
    pub read_at: String,
}

impl fmt::Display for ReadVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: postgres snapshot {} read at {}",
            self.dataset, self.snapshot, self.read_at
        )
    }
}

/// Reads a relation (one partition), in one read-only transaction.
#[derive(Debug)]
pub struct PgScanExec {
    scan: Arc<Scan>,
    properties: Arc<PlanProperties>,
    read: Arc<Mutex<Option<ReadVersion>>>,
}

impl PgScanExec {
    /// The snapshot this scan read, once it has begun.
    pub fn read_version(&self) -> Option<ReadVersion> {
        self.read.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The statement sent to the database (for EXPLAIN and tests).
    pub fn sql(&self) -> &str {
        &self.scan.sql
    }
}

impl DisplayAs for PgScanExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "PgScanExec: dataset={}, sql={}",
            self.scan.dataset, self.scan.sql
        )
    }
}

impl ExecutionPlan for PgScanExec {
    fn name(&self) -> &str {
        "PgScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !children.is_empty() {
            return Err(DataFusionError::Internal("PgScanExec has no inputs".into()));
        }
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "PgScanExec has one partition, not {partition}"
            )));
        }
        // Two batches in flight: the database is read while Sluice works on
        // the previous batch, and no further.
        let (tx, rx) = mpsc::channel(2);
        let scan = self.scan.clone();
        let read = self.read.clone();
        let reads = context.session_config().get_extension::<super::DataReads>();
        let memory = MemoryConsumer::new("PgScanExec").register(context.memory_pool());
        tokio::spawn(run(scan, read, reads, memory, tx));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.scan.schema.clone(),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

type Batches = mpsc::Sender<Result<RecordBatch>>;

/// Rows of the first fetch of a scan, before their width is known.
const FIRST_FETCH_ROWS: usize = 256;
/// About how large one fetch (one Arrow batch) is, once rows are measured.
const BATCH_BYTES: usize = 8 << 20;
/// Batches a scan may hold at once: the two in its channel and the one
/// being built.
const IN_FLIGHT: usize = 3;

/// Runs `scan` until it is read to the end, fails, or its reader goes away
/// (the query's deadline, a cancelled stream): then the statement is
/// cancelled on the server, and its connection closed.
async fn run(
    scan: Arc<Scan>,
    read: Arc<Mutex<Option<ReadVersion>>>,
    reads: Option<Arc<super::DataReads>>,
    mut memory: MemoryReservation,
    tx: Batches,
) {
    let cancel: Arc<Mutex<Option<CancelToken>>> = Arc::default();
    let result = tokio::select! {
        result = read_all(&scan, &read, reads.as_deref(), &cancel, &mut memory, &tx) => result,
        () = tx.closed() => {
            let token = cancel.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(token) = token {
                scan.db.cancel(token).await;
            }
            return;
        }
    };
    if let Err(fault) = result {
        let _ = tx
            .send(Err(DataFusionError::External(Box::new(SourceError {
                dataset: scan.dataset.clone(),
                fault,
            }))))
            .await;
    }
}

async fn read_all(
    scan: &Scan,
    read: &Mutex<Option<ReadVersion>>,
    reads: Option<&super::DataReads>,
    cancel: &Mutex<Option<CancelToken>>,
    memory: &mut MemoryReservation,
    tx: &Batches,
) -> Result<(), SourceFault> {
    let mut client = scan.db.checkout().await.map_err(|e| {
        tracing::warn!(dataset = %scan.dataset, error = %driver_message(&e), "connecting to the dataset's database failed");
        e.fault()
    })?;
    *cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.cancel_token());
    let failed = |e: tokio_postgres::Error| {
        let fault = classify(&e);
        tracing::warn!(dataset = %scan.dataset, error = %driver_message(&e), ?fault, "reading the dataset's database failed");
        fault
    };
    let transaction = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(failed)?;
    // The first statement of a REPEATABLE READ transaction fixes its
    // snapshot: every row read below is of this version of the data.
    let version = transaction
        .query_one(
            "SELECT pg_catalog.pg_current_snapshot()::text, \
             to_char(pg_catalog.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .map_err(failed)?;
    let version = ReadVersion {
        dataset: scan.dataset.clone(),
        snapshot: version.get(0),
        read_at: version.get(1),
    };
    if let Some(reads) = reads {
        reads.note(
            &scan.dataset,
            format!(
                "postgres snapshot {} read at {}",
                version.snapshot, version.read_at
            ),
        );
    }
    *read.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
    let statement = transaction.prepare(&scan.sql).await.map_err(failed)?;
    check_types(scan, statement.columns())?;
    let portal = transaction.bind(&statement, &[]).await.map_err(failed)?;
    // Rows are fetched in round trips of at most `fetch_rows`, and of about
    // BATCH_BYTES once a first small fetch has shown how wide they are: a
    // table of wide rows (long text, JSON) cannot make one fetch hold
    // gigabytes.
    let most = scan.db.config().fetch_rows.max(1);
    let mut fetch = most.min(FIRST_FETCH_ROWS);
    loop {
        let asked = i32::try_from(fetch).unwrap_or(i32::MAX);
        let rows = transaction
            .query_portal(&portal, asked)
            .await
            .map_err(failed)?;
        let done = rows.len() < fetch;
        if !rows.is_empty() {
            let batch = to_batch(scan, &rows)?;
            let bytes = batch.get_array_memory_size();
            fetch = (BATCH_BYTES / (bytes / rows.len()).max(1)).clamp(1, most);
            // The batches in flight count against the query's memory.
            if let Err(e) = memory.try_resize(bytes * IN_FLIGHT) {
                let _ = tx.send(Err(e)).await;
                return Ok(());
            }
            if tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
        if done {
            break;
        }
    }
    transaction.commit().await.map_err(failed)?;
    client.release();
    Ok(())
}

/// Refuses to read a relation whose columns changed type since startup:
/// their bytes would be decoded as the old type.
fn check_types(scan: &Scan, returned: &[tokio_postgres::Column]) -> Result<(), SourceFault> {
    let changed = returned.len() != scan.columns.len()
        || returned
            .iter()
            .zip(&scan.columns)
            .find(|(now, then)| now.type_().oid() != then.type_oid)
            .map(|(now, then)| {
                tracing::warn!(
                    dataset = %scan.dataset,
                    column = %then.name,
                    was = %then.type_name,
                    now = %now.type_().name(),
                    "a column of the dataset's relation changed type since the connector started; restart it to serve the new type"
                );
            })
            .is_some();
    if changed {
        return Err(SourceFault::Changed);
    }
    Ok(())
}

/// Any value in PostgreSQL's binary format, undecoded.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn to_batch(scan: &Scan, rows: &[tokio_postgres::Row]) -> Result<RecordBatch, SourceFault> {
    let mut builders: Vec<ColumnBuilder> = scan
        .columns
        .iter()
        .zip(scan.schema.fields())
        .map(|(c, f)| ColumnBuilder::new(c, f.data_type(), rows.len()))
        .collect();
    for row in rows {
        for (i, builder) in builders.iter_mut().enumerate() {
            let value: Option<Raw> = row.try_get(i).map_err(|_| SourceFault::Malformed)?;
            builder.append(value.map(|r| r.0)).map_err(|what| {
                tracing::warn!(dataset = %scan.dataset, column = %scan.columns[i].name, what, "a value of the dataset cannot be served");
                SourceFault::Malformed
            })?;
        }
    }
    let columns = builders.iter_mut().map(ColumnBuilder::finish).collect();
    RecordBatch::try_new_with_options(
        scan.schema.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows.len())),
    )
    .map_err(|e| {
        tracing::warn!(dataset = %scan.dataset, error = %e, "a batch of the dataset does not fit its schema");
        SourceFault::Malformed
    })
}

/// A driver error with its causes, for the log: the driver's own display
/// is only "db error" for whatever the server said. (The server's messages
/// never carry the password.)
pub fn driver_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = match c.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => c.to_string(),
        };
        // Wrappers often repeat their cause's text.
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

/// What a driver error means for the dataset.
fn classify(e: &tokio_postgres::Error) -> SourceFault {
    let Some(code) = e.code() else {
        return SourceFault::Unreachable;
    };
    match *code {
        SqlState::UNDEFINED_TABLE => SourceFault::Missing,
        SqlState::UNDEFINED_COLUMN | SqlState::DATATYPE_MISMATCH => SourceFault::Changed,
        SqlState::QUERY_CANCELED => SourceFault::TimedOut,
        SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            SourceFault::Refused
        }
        SqlState::INSUFFICIENT_PRIVILEGE => SourceFault::Refused,
        SqlState::ADMIN_SHUTDOWN | SqlState::CRASH_SHUTDOWN | SqlState::CANNOT_CONNECT_NOW => {
            SourceFault::Unreachable
        }
        _ => SourceFault::Unreadable,
    }
}

/// The snapshot versions of the PostgreSQL scans in `plan` that have begun.
pub fn read_versions(plan: &Arc<dyn ExecutionPlan>) -> Vec<ReadVersion> {
    let mut found = Vec::new();
    let mut stack = vec![plan.clone()];
    while let Some(node) = stack.pop() {
        if let Some(scan) = node.downcast_ref::<PgScanExec>()
            && let Some(version) = scan.read_version()
        {
            found.push(version);
        }
        stack.extend(node.children().into_iter().cloned());
    }
    found
}

/// The time now, for records that name when data was read.
pub fn now_utc() -> String {
    chrono::DateTime::<chrono::Utc>::from(SystemTime::now())
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The password of `config`, read now from where the config says.
fn password(config: &DatabaseConfig) -> std::result::Result<Option<Vec<u8>>, pool::ConnectError> {
    match &config.password {
        Secret::None => Ok(None),
        Secret::File(path) => std::fs::read(path)
            .map(|mut bytes| {
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                Some(bytes)
            })
            .map_err(|e| {
                pool::ConnectError::Password(format!("password_file {}: {e}", path.display()))
            }),
        Secret::Env(var) => std::env::var_os(var)
            .map(|v| Some(v.into_encoded_bytes()))
            .ok_or_else(|| {
                pool::ConnectError::Password(format!("environment variable {var} is not set"))
            }),
    }
}
