//! Flight SQL requests → the connector's Flight service (`flight::FlightSql`
//! behind arrow-flight's `FlightService` dispatch, exactly as tonic calls
//! it after the certificate interceptor): the protobuf `Any` in a
//! FlightDescriptor's `cmd` (GetFlightInfo, GetSchema, PollFlightInfo), in a
//! Ticket (DoGet), in an Action's body (DoAction: prepared statements,
//! transactions, cancel), and the FlightData stream of DoPut (the command in
//! the first message's descriptor; for a prepared statement, the bound
//! parameters as Arrow IPC, read by the connector's `read_parameters`).
//!
//! Statements are planned and decided but never executed: a ticket for a
//! statement is not redeemed (its holds are given back at once), only the
//! tickets of metadata commands are (catalogs, schemas, tables, SqlInfo,
//! XDBC types: answered from memory).
//!
//! Input: byte 0: bits 0–2 RPC (0 GetFlightInfo, 1 DoGet, 2 DoAction,
//! 3 GetSchema, 4 PollFlightInfo, 5 DoPut, 6 GetFlightInfo then DoGet of its
//! metadata tickets, 7 DoPut after creating a prepared statement, the first
//! message's descriptor naming it); bits 3–5 principal; bit 6 the purpose
//! header `research`. For DoAction byte 1 picks the action type. For DoPut
//! the rest is FlightData messages, each as a 2-byte little-endian length
//! and its protobuf bytes.

#![no_main]

use std::sync::{Arc, OnceLock};

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::{
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandPreparedStatementQuery, ProstMessageExt, TicketStatementQuery,
};
use arrow_flight::{Action, FlightData, FlightDescriptor, Ticket};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use prost::Message;

use sluice::flight::FlightSql;
use sluice::identity::Caller;
use sluice::metrics::Metrics;
use sluice_policy::Principal;
use tonic::Request;

const ACTIONS: [&str; 11] = [
    "CreatePreparedStatement",
    "ClosePreparedStatement",
    "CreatePreparedSubstraitPlan",
    "BeginTransaction",
    "EndTransaction",
    "BeginSavepoint",
    "EndSavepoint",
    "CancelQuery",
    "CancelFlightInfo",
    "RenewFlightEndpoint",
    "",
];

/// The statement DoPut binds parameters to (mode 7).
const PREPARED: &str =
    "SELECT mode, count(*) FROM trips WHERE fare_eur > ? AND start_zone <> ? GROUP BY mode";

/// At most this many stream items are read from a response.
const MAX_ITEMS: usize = 64;

fn metrics() -> Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(|| Arc::new(Metrics::new())).clone()
}

/// A request as the interceptor leaves it: the caller in the extensions,
/// the purpose header when asked for.
fn request<T>(message: T, principal: &Principal, purpose: bool) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Arc::new(Caller {
        principal: principal.clone(),
        certificate_sha256: "00".repeat(32),
        not_after: 4_102_444_800,
    }));
    if purpose {
        request.metadata_mut().insert(
            sluice_proto::wire::header::PURPOSE,
            tonic::metadata::MetadataValue::from_static("research"),
        );
    }
    request
}

/// Splits `bytes` into FlightData messages (2-byte length, protobuf).
fn messages(mut bytes: &[u8]) -> Vec<FlightData> {
    let mut out = Vec::new();
    while bytes.len() >= 2 && out.len() < 16 {
        let len = usize::from(u16::from_le_bytes([bytes[0], bytes[1]]));
        let end = (2 + len).min(bytes.len());
        match FlightData::decode(&bytes[2..end]) {
            Ok(data) => out.push(data),
            Err(_) => return out,
        }
        bytes = &bytes[end..];
    }
    out
}

/// DoPut's request: the messages gRPC-framed in a body, decoded by tonic.
fn put_stream(messages: &[FlightData]) -> tonic::Streaming<FlightData> {
    let mut body = BytesMut::new();
    for message in messages {
        let encoded = message.encode_to_vec();
        body.put_u8(0);
        body.put_u32(encoded.len() as u32);
        body.put_slice(&encoded);
    }
    let body = tonic::body::Body::new(http_body_util::Full::new(Bytes::from(body)));
    tonic::Streaming::new_request(
        tonic_prost::ProstDecoder::<FlightData>::default(),
        body,
        None,
        Some(64 << 20),
    )
}

/// Reads up to [`MAX_ITEMS`] items of a response stream.
async fn drain<S, T>(stream: S)
where
    S: futures::Stream<Item = Result<T, tonic::Status>> + Send,
{
    let mut stream = std::pin::pin!(stream.take(MAX_ITEMS));
    while let Some(item) = stream.next().await {
        if item.is_err() {
            break;
        }
    }
}

/// Whether a DoGet ticket names a metadata command (answered from memory)
/// rather than a statement (which would execute).
fn is_metadata_ticket(ticket: &[u8]) -> bool {
    match Any::decode(ticket) {
        Ok(any) => {
            any.type_url != TicketStatementQuery::type_url()
                && any.type_url != CommandPreparedStatementQuery::type_url()
        }
        Err(_) => false,
    }
}

async fn create_prepared(service: &FlightSql, principal: &Principal) -> Option<Bytes> {
    let body = ActionCreatePreparedStatementRequest {
        query: PREPARED.into(),
        transaction_id: None,
    }
    .as_any()
    .encode_to_vec();
    let action = Action::new("CreatePreparedStatement", body);
    let response = service
        .do_action(request(action, principal, true))
        .await
        .ok()?;
    let mut stream = response.into_inner();
    let result = stream.next().await?.ok()?;
    let any = Any::decode(result.body).ok()?;
    let created: ActionCreatePreparedStatementResult = any.unpack().ok()??;
    Some(created.prepared_statement_handle)
}

async fn one(service: FlightSql, selector: u8, bytes: Vec<u8>) {
    let principal = sluice_fuzz::principal((selector >> 3) & 7);
    let purpose = selector & 0x40 != 0;
    let bytes = Bytes::from(bytes);
    match selector & 7 {
        0 | 6 => {
            let descriptor = FlightDescriptor::new_cmd(bytes);
            let Ok(info) = service
                .get_flight_info(request(descriptor, &principal, purpose))
                .await
            else {
                return;
            };
            if selector & 7 == 6 {
                for endpoint in info.into_inner().endpoint {
                    let Some(ticket) = endpoint.ticket else {
                        continue;
                    };
                    if !is_metadata_ticket(&ticket.ticket) {
                        continue;
                    }
                    if let Ok(response) = service.do_get(request(ticket, &principal, purpose)).await
                    {
                        drain(response.into_inner()).await;
                    }
                }
            }
        }
        1 => {
            // A statement's ticket made up here is verified and refused (it
            // cannot be one this connector signed): nothing executes.
            let ticket = Ticket::new(bytes);
            if let Ok(response) = service.do_get(request(ticket, &principal, purpose)).await {
                drain(response.into_inner()).await;
            }
        }
        2 => {
            let Some((&kind, body)) = bytes.split_first() else {
                return;
            };
            let action = Action::new(ACTIONS[usize::from(kind) % ACTIONS.len()], body.to_vec());
            if let Ok(response) = service
                .do_action(request(action, &principal, purpose))
                .await
            {
                drain(response.into_inner()).await;
            }
        }
        3 => {
            let descriptor = FlightDescriptor::new_cmd(bytes);
            let _ = service
                .get_schema(request(descriptor, &principal, purpose))
                .await;
        }
        4 => {
            let descriptor = FlightDescriptor::new_cmd(bytes);
            let _ = service
                .poll_flight_info(request(descriptor, &principal, purpose))
                .await;
        }
        mode => {
            let mut messages = messages(&bytes);
            if mode == 7 {
                let Some(handle) = create_prepared(&service, &principal).await else {
                    return;
                };
                let command = CommandPreparedStatementQuery {
                    prepared_statement_handle: handle,
                };
                let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
                match messages.first_mut() {
                    Some(first) => first.flight_descriptor = Some(descriptor),
                    None => messages.push(FlightData::new().with_descriptor(descriptor)),
                }
            }
            if messages.is_empty() {
                return;
            }
            let stream = put_stream(&messages);
            if let Ok(response) = service.do_put(request(stream, &principal, purpose)).await {
                drain(response.into_inner()).await;
            }
        }
    }
}

/// Requests as Flight SQL clients send them (`tests/fuzz.sh --seeds`).
fn write_seeds() {
    use arrow_flight::sql::{
        ActionBeginTransactionRequest, ActionCancelQueryRequest,
        ActionClosePreparedStatementRequest, CommandGetCatalogs, CommandGetDbSchemas,
        CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
        CommandGetXdbcTypeInfo, CommandStatementIngest, CommandStatementQuery,
        CommandStatementUpdate,
    };
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;

    let Some(dir) = sluice_fuzz::seed_dir() else {
        return;
    };
    let write = |selector: u8, bytes: &[u8]| {
        sluice_fuzz::write_seed(&dir, &sluice_fuzz::with_selector(selector, bytes))
    };
    const PURPOSE: u8 = 0x40;
    const SUPPLIER: u8 = 1 << 3;
    let statement = |sql: &str| {
        CommandStatementQuery {
            query: sql.into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec()
    };
    let metadata: Vec<Vec<u8>> = vec![
        CommandGetCatalogs {}.as_any().encode_to_vec(),
        CommandGetDbSchemas {
            catalog: Some("sluice".into()),
            db_schema_filter_pattern: Some("pub%".into()),
        }
        .as_any()
        .encode_to_vec(),
        CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: Some("tr_p%".into()),
            table_types: vec!["TABLE".into()],
            include_schema: true,
        }
        .as_any()
        .encode_to_vec(),
        CommandGetTableTypes {}.as_any().encode_to_vec(),
        CommandGetSqlInfo {
            info: vec![0, 1, 2, 3, 500, 504, 576],
        }
        .as_any()
        .encode_to_vec(),
        CommandGetXdbcTypeInfo { data_type: Some(4) }
            .as_any()
            .encode_to_vec(),
        CommandGetPrimaryKeys {
            catalog: None,
            db_schema: None,
            table: "trips".into(),
        }
        .as_any()
        .encode_to_vec(),
    ];
    // GetFlightInfo: statements, metadata, writes.
    write(
        PURPOSE,
        &statement("SELECT mode, count(*) AS trips FROM trips GROUP BY mode"),
    );
    write(
        SUPPLIER,
        &statement("SELECT event_id, machine_serial, event_time FROM machine_events LIMIT 5"),
    );
    write(
        2 << 3 | PURPOSE,
        &statement("SELECT mode, count(*) FROM trips GROUP BY mode"),
    );
    write(
        PURPOSE,
        &CommandStatementQuery {
            query: "SELECT 1".into(),
            transaction_id: Some(Bytes::from_static(b"tx")),
        }
        .as_any()
        .encode_to_vec(),
    );
    write(
        0,
        &CommandStatementUpdate {
            query: "DELETE FROM trips".into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec(),
    );
    for command in &metadata {
        write(0, command);
        write(6, command);
        write(6 | SUPPLIER, command);
        write(1, command);
        write(3, command);
    }
    write(4, &metadata[0]);
    // DoGet of a statement ticket (the connector's format, another key).
    write(
        1,
        &TicketStatementQuery {
            statement_handle: Bytes::from_static(
                b"\x0a\x02\x08\x01\x12\x20not-a-real-tag-not-a-real-tag-xx",
            ),
        }
        .as_any()
        .encode_to_vec(),
    );
    write(
        1,
        &CommandPreparedStatementQuery {
            prepared_statement_handle: Bytes::from_static(b"handle"),
        }
        .as_any()
        .encode_to_vec(),
    );
    // DoAction.
    let action = |kind: u8, body: Vec<u8>| [vec![kind], body].concat();
    write(
        2 | PURPOSE,
        &action(
            0,
            ActionCreatePreparedStatementRequest {
                query: "SELECT mode, count(*) FROM trips WHERE fare_eur > ? GROUP BY mode".into(),
                transaction_id: None,
            }
            .as_any()
            .encode_to_vec(),
        ),
    );
    write(
        2,
        &action(
            1,
            ActionClosePreparedStatementRequest {
                prepared_statement_handle: Bytes::from_static(b"handle"),
            }
            .as_any()
            .encode_to_vec(),
        ),
    );
    write(
        2,
        &action(3, ActionBeginTransactionRequest {}.as_any().encode_to_vec()),
    );
    write(
        2,
        &action(
            7,
            ActionCancelQueryRequest {
                info: Bytes::from_static(b"info"),
            }
            .as_any()
            .encode_to_vec(),
        ),
    );
    write(2, &action(10, b"x".to_vec()));
    // DoPut: writes (refused) and bound parameters.
    let framed = |messages: &[FlightData]| {
        let mut out = Vec::new();
        for m in messages {
            let bytes = m.encode_to_vec();
            out.extend((bytes.len() as u16).to_le_bytes());
            out.extend(bytes);
        }
        out
    };
    for command in [
        CommandStatementUpdate {
            query: "DELETE FROM trips".into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec(),
        CommandStatementIngest {
            table_definition_options: None,
            table: "trips".into(),
            schema: None,
            catalog: None,
            temporary: false,
            transaction_id: None,
            options: Default::default(),
        }
        .as_any()
        .encode_to_vec(),
    ] {
        let first = FlightData::new().with_descriptor(FlightDescriptor::new_cmd(command));
        write(5, &framed(&[first]));
    }
    let schema = Schema::new(vec![
        Field::new("$1", DataType::Float64, true),
        Field::new("$2", DataType::Utf8, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![
            Arc::new(Float64Array::from(vec![2.5])),
            Arc::new(StringArray::from(vec!["Z01"])),
        ],
    )
    .expect("a parameter batch");
    let params =
        arrow_flight::utils::batches_to_flight_data(&schema, vec![batch]).expect("Flight data");
    write(7 | PURPOSE, &framed(&params));
    write(7, &framed(&params));
}

fuzz_target!(init: write_seeds(), |data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let demo = sluice_fuzz::demo();
    // A fresh service per input: prepared statements do not pile up.
    let service = FlightSql::new(demo.engine.clone(), metrics());
    let engine = demo.engine.clone();
    let bytes = bytes.to_vec();
    sluice_fuzz::run(async move {
        one(service, selector, bytes).await;
        engine.withdraw_all();
    });
});
