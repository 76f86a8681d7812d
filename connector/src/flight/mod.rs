//! The Arrow Flight SQL data plane: translates Flight SQL requests into
//! [`QueryEngine`] calls and results back into Flight data.
//!
//! * Statements and prepared statements: GetFlightInfo plans, decides and
//!   returns a signed single-use ticket; DoGet redeems it.
//! * Metadata (catalogs, schemas, tables, table types, SqlInfo, XDBC types):
//!   the ticket is the command itself, answered for whoever presents it.
//! * Anything that writes (updates, ingestion, transactions) is refused:
//!   Sluice is read-only.

mod metadata;
mod prepared;
mod stream;

use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginTransactionRequest, ActionBeginTransactionResult,
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandStatementIngest, CommandStatementQuery,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket,
    decode::FlightRecordBatchStream, flight_service_server::FlightService,
};
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use futures::TryStreamExt;
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::identity;
use crate::metrics::Metrics;
use crate::query::ticket::holder_id;
use crate::query::{IssuedTicket, QueryEngine, QueryError};
use prepared::PreparedStatements;

/// The Flight SQL service.
pub struct FlightSql {
    engine: Arc<QueryEngine>,
    prepared: PreparedStatements,
    metrics: Arc<Metrics>,
}

type DoGetResult = Result<Response<<FlightSql as FlightService>::DoGetStream>, Status>;

impl FlightSql {
    pub fn new(engine: Arc<QueryEngine>, metrics: Arc<Metrics>) -> Self {
        Self {
            prepared: PreparedStatements::new(engine.limits().prepared_statements),
            engine,
            metrics,
        }
    }

    /// The tonic service, with message limits sized for query results.
    pub fn into_service(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A refused metadata or write request: logged, counted, and on the
    /// audit log (event `request`, with the method in its message) like a
    /// refused query.
    fn refused_on_record(
        &self,
        method: &'static str,
        principal: &sluice_policy::Principal,
        err: QueryError,
    ) -> Status {
        let err = self.engine.refused_on_record(method, principal, err);
        self.refuse(method, Some(&principal.id), err)
    }

    /// Records and converts a failed request.
    fn refuse(&self, method: &'static str, principal: Option<&str>, err: QueryError) -> Status {
        self.metrics.count_rpc_error(method, err.code());
        if method == "GetFlightInfo" {
            self.metrics.count_query(err.outcome());
        }
        tracing::info!(
            method,
            principal = principal.unwrap_or("-"),
            outcome = err.outcome(),
            code = ?err.code(),
            reason = %err,
            "request refused"
        );
        err.into()
    }

    fn flight_info(
        &self,
        issued: IssuedTicket,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let ticket = TicketStatementQuery {
            statement_handle: issued.ticket.into(),
        };
        let expires = issued
            .expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let endpoint = FlightEndpoint::new()
            .with_ticket(Ticket::new(ticket.as_any().encode_to_vec()))
            .with_expiration_time(prost_types::Timestamp {
                seconds: expires.as_secs() as i64,
                nanos: expires.subsec_nanos() as i32,
            });
        Ok(FlightInfo::new()
            .try_with_schema(&issued.schema)
            .map_err(|e| Status::internal(format!("encoding the result schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor)
            .with_ordered(issued.ordered))
    }

    /// FlightInfo for a metadata command: the ticket is the command itself.
    fn metadata_info(
        &self,
        command: impl ProstMessageExt,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(command.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encoding the metadata schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// Plans and approves, for GetFlightInfo, logging the decision.
    fn issued_info(
        &self,
        principal: &sluice_policy::Principal,
        started: Instant,
        issued: Result<IssuedTicket, QueryError>,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metrics
            .plan_duration
            .observe(started.elapsed().as_secs_f64());
        let issued = issued.map_err(|e| self.refuse("GetFlightInfo", Some(&principal.id), e))?;
        tracing::info!(
            query_id = %issued.query_id,
            principal = %principal,
            policy_version = %issued.decision.policy_version,
            consumers = ?issued.decision.consumers,
            purpose = issued.decision.purpose.as_deref().unwrap_or("-"),
            output_class = %issued.decision.output_class,
            rules = ?issued.decision.rules,
            plan_ms = started.elapsed().as_secs_f64() * 1e3,
            "query approved"
        );
        Ok(Response::new(self.flight_info(issued, descriptor)?))
    }
}

fn read_only(what: &str) -> QueryError {
    QueryError::Denied(sluice_policy::Denial::forbidden(
        "read-only",
        format!("{what} is not accepted: Sluice answers read-only queries"),
    ))
}

fn ipc_schema(schema: &Schema) -> Result<Vec<u8>, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: datafusion::arrow::error::ArrowError| {
            Status::internal(format!("encoding a schema: {e}"))
        })?;
    Ok(bytes.to_vec())
}

/// Reads the parameter row a client bound with DoPut. The stream is read
/// as it is: its first message, which the framework already peeked at to
/// route the call, carries the parameter schema.
async fn read_parameters(stream: PeekableFlightDataStream) -> Result<Vec<ScalarValue>, QueryError> {
    let batches: Vec<RecordBatch> =
        FlightRecordBatchStream::new_from_flight_data(stream.map_err(FlightError::from))
            .try_collect()
            .await
            .map_err(|e| {
                QueryError::InvalidRequest(format!(
                    "the parameter stream is not valid Arrow data: {e}"
                ))
            })?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows != 1 {
        return Err(QueryError::InvalidRequest(format!(
            "bind exactly one row of parameters to a query (got {rows})"
        )));
    }
    let batch = batches
        .iter()
        .find(|b| b.num_rows() == 1)
        .expect("one batch holds the single row");
    batch
        .columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            ScalarValue::try_from_array(column, 0).map_err(|_| {
                QueryError::InvalidRequest(format!(
                    "parameter ${} has an unsupported type {}",
                    i + 1,
                    column.data_type()
                ))
            })
        })
        .collect()
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let context = identity::query_context(&request)?;
        let principal = context.principal.clone();
        let started = Instant::now();
        let issued = self.engine.issue_statement(context, query.query).await;
        self.issued_info(&principal, started, issued, request.into_inner())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let context = identity::query_context(&request)?;
        let principal = context.principal.clone();
        let started = Instant::now();
        let issued = match self
            .prepared
            .get(&cmd.prepared_statement_handle, &holder_id(&principal))
        {
            Ok(stmt) => {
                let params = stmt.params.or_else(|| {
                    // A statement without placeholders needs no DoPut.
                    stmt.parameter_schema.fields().is_empty().then(Vec::new)
                });
                self.engine.issue_prepared(context, stmt.plan, params).await
            }
            Err(e) => Err(e),
        };
        self.issued_info(&principal, started, issued, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        let started = Instant::now();
        let principal = identity::principal(&request)?;
        let span = stream::query_span(&principal);
        let run = self
            .engine
            .redeem(&principal, &ticket.statement_handle)
            .instrument(span.clone())
            .await
            .map_err(|e| self.refuse("DoGet", Some(&principal.id), e))?;
        let receipt = run.receipt.as_ref().map(|r| r.to_header());
        let mut response = Response::new(stream::encode_query(
            run,
            span,
            self.metrics.clone(),
            started,
        ));
        if let Some(value) = receipt.and_then(|r| r.parse().ok()) {
            response
                .metadata_mut()
                .insert(sluice_proto::wire::header::RECEIPT, value);
        }
        Ok(response)
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let context = identity::query_context(&request)?;
        let principal = context.principal.clone();
        let refuse = |e| self.refuse("CreatePreparedStatement", Some(&principal.id), e);
        let (plan, parameter_schema, dataset_schema) = self
            .engine
            .prepare(context, query.query)
            .await
            .map_err(refuse)?;
        let result = ActionCreatePreparedStatementResult {
            dataset_schema: ipc_schema(&dataset_schema)?.into(),
            parameter_schema: ipc_schema(&parameter_schema)?.into(),
            prepared_statement_handle: Vec::new().into(),
        };
        let handle = self
            .prepared
            .create(
                &holder_id(&principal),
                &crate::audit::organization_key(&principal),
                plan,
                parameter_schema.as_ref().clone(),
            )
            .map_err(refuse)?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            ..result
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let principal = identity::principal(&request)?;
        let refuse = |e| self.refuse("DoPut", Some(&principal.id), e);
        let stmt = self
            .prepared
            .get(&query.prepared_statement_handle, &holder_id(&principal))
            .map_err(refuse)?;
        let values = read_parameters(request.into_inner())
            .await
            .map_err(refuse)?;
        if values.len() != stmt.parameter_schema.fields().len() {
            return Err(refuse(QueryError::InvalidRequest(format!(
                "the statement takes {} parameter(s) but {} were bound",
                stmt.parameter_schema.fields().len(),
                values.len()
            ))));
        }
        self.prepared
            .bind(
                &query.prepared_statement_handle,
                &holder_id(&principal),
                values,
            )
            .map_err(refuse)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let principal = identity::principal(&request)?;
        self.prepared
            .close(&query.prepared_statement_handle, &holder_id(&principal))
            .map_err(|e| self.refuse("ClosePreparedStatement", Some(&principal.id), e))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        identity::principal(&request)?;
        let schema = query.into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        let principal = identity::principal(&request)?;
        let schema = query.into_builder().schema();
        let batch = metadata::catalogs(query)
            .map_err(|e| self.refused_on_record("GetCatalogs", &principal, e))?;
        Ok(Response::new(stream::encode_batch(schema, batch)))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        identity::principal(&request)?;
        let schema = query.clone().into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        let principal = identity::principal(&request)?;
        let schema = query.clone().into_builder().schema();
        let batch = metadata::db_schemas(query)
            .map_err(|e| self.refused_on_record("GetDbSchemas", &principal, e))?;
        Ok(Response::new(stream::encode_batch(schema, batch)))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        identity::principal(&request)?;
        let schema = query.clone().into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        let principal = identity::principal(&request)?;
        let schema = query.clone().into_builder().schema();
        let batch = metadata::tables(query, self.engine.catalog(), |dataset| {
            self.engine.visible_columns(&principal, dataset)
        })
        .map_err(|e| self.refused_on_record("GetTables", &principal, e))?;
        Ok(Response::new(stream::encode_batch(schema, batch)))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        identity::principal(&request)?;
        let schema = query.into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        let principal = identity::principal(&request)?;
        let schema = query.into_builder().schema();
        let batch = metadata::table_types(query)
            .map_err(|e| self.refused_on_record("GetTableTypes", &principal, e))?;
        Ok(Response::new(stream::encode_batch(schema, batch)))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        identity::principal(&request)?;
        let schema = query.clone().into_builder(&metadata::SQL_INFO).schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        identity::principal(&request)?;
        let builder = query.into_builder(&metadata::SQL_INFO);
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|e| Status::internal(format!("building SqlInfo: {e}")))?;
        Ok(Response::new(stream::encode_batch(schema, batch)))
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        identity::principal(&request)?;
        let schema = query.into_builder(&metadata::XDBC_TYPES).schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<arrow_flight::Ticket>,
    ) -> DoGetResult {
        identity::principal(&request)?;
        let builder = query.into_builder(&metadata::XDBC_TYPES);
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|e| Status::internal(format!("building XDBC type info: {e}")))?;
        Ok(Response::new(stream::encode_batch(schema, batch)))
    }

    async fn do_put_statement_update(
        &self,
        _query: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let principal = identity::principal(&request)?;
        Err(self.refused_on_record("DoPut", &principal, read_only("an update statement")))
    }

    async fn do_put_statement_ingest(
        &self,
        _query: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let principal = identity::principal(&request)?;
        Err(self.refused_on_record("DoPut", &principal, read_only("bulk ingestion")))
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        Err(Status::unimplemented(
            "transactions are not supported: Sluice is read-only (SqlInfo FLIGHT_SQL_SERVER_TRANSACTION = none)",
        ))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
