//! Overload and stalled clients against the real daemon: excess queries are
//! shed at once with RESOURCE_EXHAUSTED while health checks answer; a
//! client that never reads gives its execution slot back at the query's
//! deadline; connections that never finish their TLS handshake are closed
//! and lock nobody out.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use common::{Daemon, fetch, query, status, ticket};
use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// A configuration on the demo data (open test policy) with these limits.
fn config_with(limits: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = common::temp_dir();
    let data = common::shared_state_dir().join("data");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nshutdown_grace = \"1s\"\n\n[limits]\n{limits}\n\n\
             [[datasets]]\nname = \"trips\"\nformat = \"parquet\"\npath = \"{}\"\n",
            data.join("trips.parquet").display(),
        ),
    )
    .unwrap();
    (dir, config)
}

/// Every trip: far more than the HTTP/2 windows and the execution channel
/// hold, so a client that stops reading stops the query.
const EVERYTHING: &str = "SELECT * FROM trips";

/// Starts `sql`, reads its first batch and then stops reading (the stream
/// is returned, unread, so the connection stays open).
async fn stalled_reader(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> arrow_flight::decode::FlightRecordBatchStream {
    let info = client.execute(sql.into(), None).await.unwrap();
    let mut stream = client.do_get(ticket(&info)).await.unwrap();
    let first = stream.next().await.expect("a first batch").unwrap();
    assert!(first.num_rows() > 0);
    stream
}

async fn health_answers_quickly(channel: Channel) -> Duration {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let started = Instant::now();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the health service answers");
    started.elapsed()
}

/// DoGet on a fresh ticket for `sql`; the status it ends with, and when.
async fn refused_doget(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> (tonic::Status, Duration) {
    let info = client.execute(sql.into(), None).await.unwrap();
    let started = Instant::now();
    let err = fetch(client, &info).await.map(|_| ()).unwrap_err();
    (status(err), started.elapsed())
}

#[tokio::test]
async fn a_full_queue_sheds_at_once_and_health_checks_still_answer() {
    let (_dir, config) = config_with(
        "max_concurrent_queries = 1\nmax_concurrent_queries_per_organization = 1\n\
         max_queued_queries = 1\nmax_queued_queries_per_organization = 1\n\
         queue_timeout = \"2s\"\nquery_timeout = \"60s\"",
    );
    let daemon = Daemon::start_config(&config);
    // The only execution slot, held by a client that stopped reading.
    let mut holder = daemon.client("planning").await;
    let _held = stalled_reader(&mut holder, EVERYTHING).await;

    // The next query waits in the one-place queue, then gives up.
    let mut waiting = daemon.client("planning").await;
    let queued = tokio::spawn(async move { refused_doget(&mut waiting, "SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Beyond the queue: refused at once, saying which limit and what to do.
    let mut late = daemon.client("supplier").await;
    let (err, took) = refused_doget(&mut late, "SELECT 2").await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.max_queued_queries")
            && err.message().contains("retry after a pause"),
        "{}",
        err.message()
    );
    assert!(took < Duration::from_millis(500), "shed after {took:?}");

    // Health checks answer throughout.
    let health = health_answers_quickly(daemon.channel("admin").await).await;
    assert!(
        health < Duration::from_millis(500),
        "health took {health:?}"
    );

    let (err, took) = queued.await.unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.queue_timeout"),
        "{}",
        err.message()
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "gave up after {took:?}; the queue timeout is 2 s"
    );
    // The refusals name no other tenant's load.
    assert!(
        !err.message().contains("queries are running"),
        "{}",
        err.message()
    );

    // Planning is not blocked by the stalled execution.
    let info = late.execute("SELECT 3".into(), None).await;
    assert!(info.is_ok(), "{info:?}");
}

#[tokio::test]
async fn a_client_that_never_reads_gives_its_slot_back_at_the_deadline() {
    let (_dir, config) = config_with(
        "max_concurrent_queries = 1\nmax_concurrent_queries_per_organization = 1\n\
         query_timeout = \"2s\"\nqueue_timeout = \"20s\"",
    );
    let daemon = Daemon::start_config(&config);
    let mut holder = daemon.client("planning").await;
    let started = Instant::now();
    let mut stalled = stalled_reader(&mut holder, EVERYTHING).await;

    // Another organization's small query waits for the slot: it must get it
    // when the stalled query's 2 s are over, not when its client goes.
    let mut other = daemon.client("supplier").await;
    let answer = query(&mut other, "SELECT 42 AS answer").await;
    assert!(answer.is_ok(), "{answer:?}");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the slot came back after {waited:?}; the query timeout is 2 s"
    );

    // The stalled result, read at last, ends with the deadline's error: it
    // never reads as complete.
    let mut end = None;
    while let Some(item) = stalled.next().await {
        if let Err(e) = item {
            end = Some(status(e));
            break;
        }
    }
    let end = end.expect("the stalled stream ends with an error, not silently");
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
}

/// A gauge from the daemon's Prometheus endpoint.
fn gauge(daemon: &Daemon, name: &str) -> i64 {
    let (_, body) = daemon.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{body}"))
}

/// Reads until the server closes the socket (or `limit` passes): whether
/// it closed.
fn closed_by_server(socket: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ))
            .unwrap();
        match socket.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test]
async fn stalled_tls_handshakes_are_closed_and_lock_nobody_out() {
    let (_dir, config) = config_with("");
    let daemon = Daemon::start_config(&config);
    let fds_before = gauge(&daemon, "sluice_process_open_fds");

    // 150 peers that connect and never finish a handshake: half send
    // nothing, half the start of a ClientHello that never ends.
    let mut stalled = Vec::new();
    for i in 0..150 {
        let mut socket = TcpStream::connect(daemon.addr).unwrap();
        if i % 2 == 1 {
            // A handshake record announcing 512 bytes, with 4 of them sent.
            socket
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
                .unwrap();
        }
        stalled.push(socket);
    }
    // A real client is served at once.
    let started = Instant::now();
    let mut client = daemon.client("planning").await;
    query(&mut client, "SELECT count(*) FROM trips")
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "served after {took:?}");
    assert!(
        gauge(&daemon, "sluice_open_connections") >= 150,
        "the stalled peers count as open connections"
    );

    // The handshake timeout (10 s) closes every one of them.
    let handshake_timeout = Duration::from_secs(10);
    let waited = Instant::now();
    for (i, socket) in stalled.iter_mut().enumerate() {
        let left = (handshake_timeout + Duration::from_secs(8)).saturating_sub(waited.elapsed());
        assert!(
            closed_by_server(socket, left),
            "stalled connection {i} still open after {:?}",
            waited.elapsed()
        );
    }
    drop(stalled);
    // Their descriptors are released (the daemon lingers at most 5 s for a
    // peer's FIN).
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut fds = gauge(&daemon, "sluice_process_open_fds");
    while fds > fds_before + 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fds = gauge(&daemon, "sluice_process_open_fds");
    }
    assert!(
        fds <= fds_before + 10,
        "{fds} descriptors open, {fds_before} before the stalled peers"
    );
    query(&mut client, "SELECT 1").await.unwrap();
}
