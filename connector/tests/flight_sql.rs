//! The Flight SQL data plane, through arrow-flight's `FlightSqlServiceClient`
//! over mTLS against the real `sluice` binary.

mod common;

use std::sync::Arc;

use arrow_flight::Ticket;
use arrow_flight::sql::{
    CommandGetDbSchemas, CommandGetTables, CommandGetXdbcTypeInfo, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::utils::flight_data_to_arrow_batch;
use common::{Daemon, datafusion_answer, fetch, query, render, rows, status};
use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::arrow::ipc::reader::StreamReader;
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn statement_results_match_in_process_datafusion() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    for sql in [
        "SELECT mode, count(*) AS trips, round(sum(fare_eur), 2) AS fares, min(start_time) AS first FROM trips GROUP BY mode ORDER BY mode",
        "SELECT start_zone, end_zone, count(*) AS n FROM trips WHERE distance_km > 5 GROUP BY start_zone, end_zone ORDER BY n DESC, start_zone, end_zone LIMIT 20",
        "SELECT trip_id, card_id, age_band FROM trips WHERE trip_id < 50 ORDER BY trip_id",
        "SELECT count(*) AS n, count(age_band) AS with_age FROM trips",
    ] {
        let (_, got) = query(&mut client, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let want = datafusion_answer(&daemon.state_dir, sql).await;
        assert_eq!(render(&got), render(&want), "{sql}");
    }
}

#[tokio::test]
async fn flight_info_schema_equals_do_get_schema() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    for sql in [
        "SELECT * FROM trips LIMIT 3",
        "SELECT * FROM machine_events WHERE false",
        "SELECT mode, avg(distance_km) AS d, count(age_band) AS with_age FROM trips GROUP BY mode",
        "SELECT arrow_cast('x', 'Dictionary(Int32, Utf8)') AS dict, 1 AS one",
    ] {
        let info = client.execute(sql.to_string(), None).await.unwrap();
        let advertised = info.clone().try_decode_schema().unwrap();
        let (streamed, _) = fetch(&mut client, &info).await.unwrap();
        assert_eq!(&advertised, streamed.as_ref(), "{sql}");
    }
}

#[tokio::test]
async fn the_whole_trips_table_streams_in_many_batches() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    let info = client
        .execute("SELECT * FROM trips".into(), None)
        .await
        .unwrap();
    let (schema, batches) = fetch(&mut client, &info).await.unwrap();
    assert_eq!(rows(&batches), 1_000_000);
    assert!(
        batches.len() > 10,
        "streamed batch by batch, got {} batches",
        batches.len()
    );
    assert_eq!(schema.fields().len(), 10);
}

#[tokio::test]
async fn prepared_statement_binds_parameters() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    let mut prepared = client
        .prepare(
            "SELECT count(*) AS n FROM trips WHERE mode = ? AND distance_km > ?".into(),
            None,
        )
        .await
        .unwrap();
    let params = prepared.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 2);
    assert_eq!(params.field(0).data_type(), &DataType::Utf8);
    assert_eq!(params.field(1).data_type(), &DataType::Float64);
    assert_eq!(prepared.dataset_schema().unwrap().field(0).name(), "n");

    for (mode, km) in [("bus", 3.0), ("tram", 10.0), ("nonexistent", 0.0)] {
        let batch = RecordBatch::try_new(
            Arc::new(params.clone()),
            vec![
                Arc::new(StringArray::from(vec![mode])),
                Arc::new(datafusion::arrow::array::Float64Array::from(vec![km])),
            ],
        )
        .unwrap();
        prepared.set_parameters(batch).unwrap();
        let info = prepared.execute().await.unwrap();
        let (_, got) = fetch(&mut client, &info).await.unwrap();
        let want = datafusion_answer(
            &daemon.state_dir,
            &format!(
                "SELECT count(*) AS n FROM trips WHERE mode = '{mode}' AND distance_km > {km:.1}"
            ),
        )
        .await;
        assert_eq!(render(&got), render(&want), "mode={mode} km={km}");
    }
    prepared.close().await.unwrap();
}

#[tokio::test]
async fn prepared_statement_parameters_are_converted_or_refused() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    let mut prepared = client
        .prepare(
            "SELECT count(*) AS n FROM trips WHERE trip_id < $1".into(),
            None,
        )
        .await
        .unwrap();
    // An Int32 where Int64 is expected is converted.
    let int32 = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("$1", DataType::Int32, false)])),
        vec![Arc::new(datafusion::arrow::array::Int32Array::from(vec![
            10,
        ]))],
    )
    .unwrap();
    prepared.set_parameters(int32).unwrap();
    let info = prepared.execute().await.unwrap();
    let (_, got) = fetch(&mut client, &info).await.unwrap();
    let want = datafusion_answer(
        &daemon.state_dir,
        "SELECT count(*) AS n FROM trips WHERE trip_id < 10",
    )
    .await;
    assert_eq!(render(&got), render(&want));
    assert!(got[0].column(0).as_primitive::<Int64Type>().value(0) > 0);

    // Two values for one parameter are refused with a clear message.
    let two = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("$1", DataType::Int64, false),
            Field::new("$2", DataType::Int64, false),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![1])),
            Arc::new(Int64Array::from(vec![2])),
        ],
    )
    .unwrap();
    prepared.set_parameters(two).unwrap();
    let err = status(prepared.execute().await.unwrap_err());
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("takes 1 parameter"),
        "{}",
        err.message()
    );
    prepared.close().await.unwrap();
}

#[tokio::test]
async fn catalog_metadata_endpoints() {
    let daemon = Daemon::start();
    let mut client = daemon.client("supplier").await;

    let info = client.get_catalogs().await.unwrap();
    let (_, batches) = fetch(&mut client, &info).await.unwrap();
    assert_eq!(strings(&batches, "catalog_name"), ["sluice"]);

    let info = client
        .get_db_schemas(CommandGetDbSchemas::default())
        .await
        .unwrap();
    let (_, batches) = fetch(&mut client, &info).await.unwrap();
    assert_eq!(strings(&batches, "db_schema_name"), ["public"]);

    let info = client.get_table_types().await.unwrap();
    let (_, batches) = fetch(&mut client, &info).await.unwrap();
    assert_eq!(strings(&batches, "table_type"), ["TABLE"]);

    let request = CommandGetTables {
        include_schema: true,
        ..Default::default()
    };
    let info = client.get_tables(request).await.unwrap();
    let (_, batches) = fetch(&mut client, &info).await.unwrap();
    assert_eq!(
        strings(&batches, "table_name"),
        ["machine_events", "trips", "zones"]
    );
    let schemas = batches[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_binary::<i32>();
    let trips = StreamReader::try_new(std::io::Cursor::new(schemas.value(1)), None)
        .unwrap()
        .schema();
    assert_eq!(trips.field(0).name(), "trip_id");
    assert_eq!(trips.fields().len(), 10);

    // Without include_schema there is no schema column; a name filter applies.
    let request = CommandGetTables {
        table_name_filter_pattern: Some("mach%".into()),
        ..Default::default()
    };
    let info = client.get_tables(request).await.unwrap();
    let (schema, batches) = fetch(&mut client, &info).await.unwrap();
    assert!(schema.field_with_name("table_schema").is_err());
    assert_eq!(strings(&batches, "table_name"), ["machine_events"]);
}

#[tokio::test]
async fn sql_info_and_xdbc_type_info() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    let info = client
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .unwrap();
    let (_, batches) = fetch(&mut client, &info).await.unwrap();
    assert_eq!(rows(&batches), 2);
    let names: Vec<u32> = batches[0]
        .column_by_name("info_name")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::UInt32Type>()
        .values()
        .to_vec();
    assert!(names.contains(&(SqlInfo::FlightSqlServerName as u32)));

    let info = client
        .get_xdbc_type_info(CommandGetXdbcTypeInfo { data_type: None })
        .await
        .unwrap();
    let (_, batches) = fetch(&mut client, &info).await.unwrap();
    let types = strings(&batches, "type_name");
    assert!(types.iter().any(|t| t == "BIGINT"), "{types:?}");
    assert!(types.iter().any(|t| t == "VARCHAR"), "{types:?}");
}

#[tokio::test]
async fn writes_and_transactions_are_refused() {
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    for sql in [
        "INSERT INTO trips VALUES (1)",
        "CREATE TABLE t AS SELECT 1",
        "DROP TABLE trips",
        "COPY trips TO '/tmp/x.parquet'",
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let err = status(client.execute(sql.into(), None).await.unwrap_err());
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
        assert!(
            err.message().contains("read-only"),
            "{sql}: {}",
            err.message()
        );
    }
    let err = status(
        client
            .execute_update("DELETE FROM trips".into(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = status(client.begin_transaction().await.unwrap_err());
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test]
async fn tickets_are_bound_to_principal_integrity_and_single_use() {
    let daemon = Daemon::start();
    let mut planning = daemon.client("planning").await;
    let mut supplier = daemon.client("supplier").await;
    let sql = "SELECT count(*) FROM machine_events";

    // Another principal cannot redeem it.
    let info = planning.execute(sql.into(), None).await.unwrap();
    let err = status(fetch(&mut supplier, &info).await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("different principal"),
        "{}",
        err.message()
    );
    // ... and that attempt did not burn the owner's ticket.
    fetch(&mut planning, &info).await.unwrap();
    // Once redeemed, it is spent.
    let err = status(fetch(&mut planning, &info).await.unwrap_err());
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Any altered byte of the signed handle is refused.
    let info = planning.execute(sql.into(), None).await.unwrap();
    let ticket = common::ticket(&info);
    let envelope = prost_types::Any::decode(ticket.ticket.clone()).unwrap();
    let handle = TicketStatementQuery::decode(envelope.value.as_slice())
        .unwrap()
        .statement_handle;
    for position in [0, handle.len() / 3, handle.len() / 2, handle.len() - 1] {
        let mut altered = handle.to_vec();
        altered[position] ^= 0x01;
        let altered = TicketStatementQuery {
            statement_handle: altered.into(),
        }
        .as_any()
        .encode_to_vec();
        let err = status(
            planning
                .do_get(Ticket::new(altered))
                .await
                .map(|_| ())
                .unwrap_err(),
        );
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "byte {position}: {err:?}"
        );
        assert!(
            err.message().contains("ticket rejected"),
            "{}",
            err.message()
        );
    }
    // A damaged envelope is refused too.
    let mut damaged = ticket.ticket.to_vec();
    damaged[0] ^= 0x01;
    let err = status(
        planning
            .do_get(Ticket::new(damaged))
            .await
            .map(|_| ())
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The unaltered ticket still works.
    fetch(&mut planning, &info).await.unwrap();
}

#[tokio::test]
async fn tickets_expire() {
    let dir = common::temp_dir();
    let config = dir.path().join("sluice.toml");
    let data = daemon_data_dir();
    std::fs::write(
        &config,
        format!(
            "[limits]\nticket_ttl = \"1s\"\n\n[[datasets]]\nname = \"trips\"\nformat = \"parquet\"\npath = \"{}\"\n",
            data.join("trips.parquet").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start_config(&config);
    let mut client = daemon.client("planning").await;
    let info = client.execute("SELECT 1".into(), None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let err = status(fetch(&mut client, &info).await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn flight_data_decodes_with_the_generic_helpers() {
    // A client that uses only the low-level Flight API (no Flight SQL
    // helpers) can still decode the stream with the advertised schema.
    let daemon = Daemon::start();
    let mut client = daemon.client("planning").await;
    let info = client
        .execute(
            "SELECT mode FROM trips ORDER BY trip_id LIMIT 2".into(),
            None,
        )
        .await
        .unwrap();
    let schema = Arc::new(info.clone().try_decode_schema().unwrap());
    let mut raw = client
        .inner_mut()
        .do_get(common::ticket(&info))
        .await
        .unwrap()
        .into_inner();
    let mut decoded = 0;
    let dictionaries = std::collections::HashMap::new();
    while let Some(data) = raw.message().await.unwrap() {
        if data.data_body.is_empty() {
            continue; // the schema message
        }
        let batch = flight_data_to_arrow_batch(&data, schema.clone(), &dictionaries).unwrap();
        decoded += batch.num_rows();
    }
    assert_eq!(decoded, 2);
}

fn daemon_data_dir() -> std::path::PathBuf {
    common::shared_state_dir().join("data")
}

fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
    let mut out = Vec::new();
    for batch in batches {
        let col = batch.column_by_name(column).unwrap();
        let col = datafusion::arrow::compute::cast(col, &DataType::Utf8).unwrap();
        let col = col.as_string::<i32>();
        out.extend((0..col.len()).map(|i| col.value(i).to_string()));
    }
    out
}
