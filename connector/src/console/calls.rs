//! The console's operations are the gRPC services' own: each call builds
//! the `tonic::Request` an mTLS connection would have produced (the
//! signed-in principal in its extensions, as `identity::authenticate`
//! leaves it) and calls the service implementation in process. What a CLI
//! user may do, refused with which words, and what the audit log records
//! are therefore the same in both places.

use std::sync::Arc;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::{FlightDescriptor, Ticket};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::Request;
use tonic::metadata::MetadataValue;

use super::Console;
use super::session::Session;
use crate::identity::Caller;
use sluice_proto::wire::header;

/// `message` as a request from the session's principal.
pub fn request<T>(session: &Session, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .extensions_mut()
        .insert::<Arc<Caller>>(session.caller.clone());
    request
}

/// A query's answer as the workbench shows it.
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// Rows kept: at most the `max_rows` asked for.
    pub rows: usize,
    /// Whether reading stopped before the answer ended (rows or bytes).
    pub truncated: bool,
}

/// How much of an answer the console holds: a Flight client streams it,
/// the console keeps it in memory to draw it.
#[derive(Clone, Copy)]
pub struct Room {
    pub rows: usize,
    /// Arrow memory of the batches kept.
    pub bytes: usize,
}

/// Runs `sql` the way a Flight SQL client does: GetFlightInfo with the
/// declared purpose, then DoGet of its ticket, decoded from the same
/// encoded stream a client receives. Stops reading when `room` is full (the
/// query's completion record then says it was cancelled).
pub async fn query(
    console: &Console,
    session: &Session,
    sql: &str,
    purpose: Option<&str>,
    room: Room,
) -> Result<Answer, tonic::Status> {
    let command = CommandStatementQuery {
        query: sql.to_string(),
        transaction_id: None,
    };
    let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    let mut ask = request(session, descriptor);
    if let Some(purpose) = purpose.filter(|p| !p.trim().is_empty()) {
        let value = MetadataValue::try_from(purpose.trim()).map_err(|_| {
            tonic::Status::invalid_argument("the purpose must be printable ASCII text")
        })?;
        ask.metadata_mut().insert(header::PURPOSE, value);
    }
    let info = console.flight.get_flight_info(ask).await?.into_inner();
    let ticket: Ticket = info
        .endpoint
        .first()
        .and_then(|e| e.ticket.clone())
        .ok_or_else(|| tonic::Status::internal("the answer named no ticket"))?;
    let stream = console
        .flight
        .do_get(request(session, ticket))
        .await?
        .into_inner();
    let mut decoded =
        FlightRecordBatchStream::new_from_flight_data(stream.map_err(FlightError::from));
    let (mut batches, mut rows, mut bytes, mut truncated) = (Vec::new(), 0usize, 0usize, false);
    while let Some(batch) = decoded.next().await {
        let batch = batch.map_err(flight_status)?;
        let keep = batch.num_rows().min(room.rows - rows);
        let batch = batch.slice(0, keep);
        rows += keep;
        bytes += batch.get_array_memory_size();
        batches.push(batch);
        if rows >= room.rows || bytes >= room.bytes {
            truncated = true;
            break;
        }
    }
    let schema = decoded
        .schema()
        .cloned()
        .or_else(|| batches.first().map(|b| b.schema()))
        .ok_or_else(|| tonic::Status::internal("the answer carried no schema"))?;
    Ok(Answer {
        schema,
        batches,
        rows,
        truncated,
    })
}

fn flight_status(e: FlightError) -> tonic::Status {
    match e {
        FlightError::Tonic(status) => *status,
        other => tonic::Status::internal(format!("decoding the answer failed: {other}")),
    }
}
