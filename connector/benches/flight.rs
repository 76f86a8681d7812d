//! `cargo bench -p sluice --bench flight`: Sluice over Flight SQL with mTLS
//! next to plain DataFusion in-process, measured side by side in one run on
//! the demo data.
//!
//! (a) Streaming throughput of `SELECT * FROM trips` (1,000,000 rows): the
//!     real `sluice` binary, a real mTLS connection, the client decoding
//!     every batch; against DataFusion executing the same query on the same
//!     Parquet file in this process. Runs alternate so both see the same
//!     machine conditions; medians are reported.
//! (b) End-to-end latency of a small aggregate (GetFlightInfo + DoGet on an
//!     open mTLS channel), p50/p99 over many runs, with DataFusion's
//!     in-process latency for the same query beside it.
//!     Sluice keeps the demo datasets decoded in memory (`limits.table_cache`;
//!     the benchmark waits until they are), so (a) and (b) run DataFusion
//!     both over the files and over the same data decoded in memory
//!     (`MemTable`s partitioned as the file scans give them).
//! (c) The usage policy: the time `PolicyGate::decide` takes (check and
//!     rewrite, in process, p50/p99), and the end-to-end latency of a small
//!     aggregate under the demo policy next to the same query with
//!     enforcement off, both through an in-process server over mTLS. "Off"
//!     is a pass-through gate handed to `server::serve_with` by this
//!     benchmark; no CLI flag or config setting can turn enforcement off.
//!
//! (d) Differential privacy: a DP `GROUP BY` with COUNT/SUM/AVG over
//!     Flight SQL with mTLS (the demo research identity, ε = 0.5, the
//!     published zone keys, answer cache off, the files read from disk:
//!     `limits.table_cache` 0) next to the same query without privacy in
//!     DataFusion in-process over the same files, on the demo trips (1M
//!     rows) and on a 10M-row version (ten copies of the demo file, so each
//!     card has ten times the trips), and beside them the floor under any
//!     answer bounded per card: DataFusion grouping the same rows by (card,
//!     zone), the bounded plan's first step, as a plain query; then the
//!     median relative error of each aggregate at ε = 0.1 and ε = 1 against
//!     the exact answer. Where
//!     `SLUICE_BENCH_SMARTNOISE=1`, SmartNoise SQL answers the same query on
//!     the same files in the same run (`tests/bench/smartnoise.sh`, its own
//!     virtualenv) with the same per-card bound (`max_ids` = max_groups ×
//!     max_rows) and the same total ε (each of its four releases gets ε/4),
//!     and the ratio of its time to Sluice's is printed.
//! (e) The audit log: the supplier's small aggregate end to end with the
//!     signed, fsynced audit records (decision, release, completion) next to
//!     the same server with the audit log switched off (a `ServeHooks`
//!     switch that only embedding code like this benchmark can reach),
//!     p50/p99; then the sustained rate of audited queries with 8 clients.
//! (f) Federation: the regional mobility data space of `examples/broker`
//!     (its `setup.sh`, 1,000,000 trips per operator), as three real
//!     processes: the north and south operators' `sluice serve` and the
//!     `sluice broker`. The planning agency's `GROUP BY mode` aggregate
//!     (GetFlightInfo + DoGet on open mTLS channels, p50/p99) through the
//!     broker, which sends one partial query to each operator and merges,
//!     next to the same query sent directly to each operator, in interleaved
//!     runs; then federated p50 over the slowest operator's p50 (the broker
//!     overhead ratio) and the difference in ms. All three share this
//!     machine, and the broker asks both operators at once, so with few
//!     cores the two partial queries compete for them: the ratio then
//!     measures that as well as the broker. A fourth measurement sends the
//!     query to both operators at once directly, and federated p50 over it
//!     is the broker's own cost (decomposition, relay, merge). The example's policy is
//!     differentially private with a budget and an answer cache, so repeated
//!     queries would be served from the cache and distinct ones would run
//!     out of budget; the benchmark replaces each operator's policy with the
//!     same grants, aggregate-only with k = 10 and without differential
//!     privacy. The broker's answer is checked once against the operators'
//!     (trips per mode add up).
//!
//! (a) and (b) measure the transport, so the daemon runs them under the open
//! test policy (`connector/tests/policies/open.yaml`).
//!
//! Set `SLUICE_BENCH_RUNS` / `SLUICE_BENCH_LATENCY_RUNS` to change the counts,
//! `SLUICE_BENCH_SECTIONS` (default `abcdef`) to run only some sections.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use futures::{StreamExt, TryStreamExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const SCAN: &str = "SELECT * FROM trips";
const SMALL_AGGREGATE: &str = "SELECT site, count(*) AS events, avg(energy_kwh) AS kwh FROM machine_events WHERE event_type = 'fault' GROUP BY site";

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let runs = env_usize("SLUICE_BENCH_RUNS", 5);
    let latency_runs = env_usize("SLUICE_BENCH_LATENCY_RUNS", 300);
    let state_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sluice-bench-state");
    let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["init", "--state-dir"])
        .arg(&state_dir)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "sluice init failed");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let sections = std::env::var("SLUICE_BENCH_SECTIONS").unwrap_or_else(|_| "abcdef".into());
    if sections.contains('a') || sections.contains('b') {
        let server = Server::start(&state_dir)?;
        let result = runtime.block_on(run(&server, &state_dir, runs, latency_runs));
        drop(server);
        result?;
    }
    if sections.contains('c') {
        runtime.block_on(policy::run(&state_dir, latency_runs))?;
    }
    if sections.contains('e') {
        runtime.block_on(policy::audit_cost(
            &state_dir,
            latency_runs,
            Duration::from_secs(env_usize("SLUICE_BENCH_QPS_SECONDS", 10) as u64),
        ))?;
    }
    if sections.contains('d') {
        runtime.block_on(privacy::run(
            &state_dir,
            env_usize("SLUICE_BENCH_DP_RUNS", 5),
        ))?;
    }
    if sections.contains('f') {
        federation::run(&runtime, latency_runs)?;
    }
    Ok(())
}

async fn run(
    server: &Server,
    state_dir: &Path,
    runs: usize,
    latency_runs: usize,
) -> anyhow::Result<()> {
    let mut client = FlightSqlServiceClient::new(server.channel(&state_dir.join("pki")).await?);
    let ctx = in_process(state_dir).await?;
    println!(
        "Sluice benchmark on the demo data ({} cores)",
        std::thread::available_parallelism()?.get()
    );

    // Sluice keeps the demo datasets decoded (limits.table_cache), so
    // DataFusion runs both over the files and over the same data decoded
    // in memory.
    let memory = in_memory(&ctx).await?;

    // (a) throughput
    let (_, warm_flight_rows) = flight_scan(&mut client, SCAN).await?;
    let warm_df_rows = datafusion_scan(&ctx, SCAN).await?;
    anyhow::ensure!(
        warm_flight_rows == warm_df_rows,
        "row counts differ: {warm_flight_rows} vs {warm_df_rows}"
    );
    let mut flight_times = Vec::new();
    let mut df_times = Vec::new();
    let mut memory_times = Vec::new();
    let mut wire_bytes = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let (bytes, _) = flight_scan(&mut client, SCAN).await?;
        flight_times.push(started.elapsed());
        wire_bytes = bytes;
        let started = Instant::now();
        datafusion_scan(&ctx, SCAN).await?;
        df_times.push(started.elapsed());
        let started = Instant::now();
        datafusion_scan(&memory, SCAN).await?;
        memory_times.push(started.elapsed());
    }
    let flight = median(&mut flight_times);
    let df = median(&mut df_times);
    let in_memory = median(&mut memory_times);
    let mb = wire_bytes as f64 / 1e6;
    println!(
        "\n(a) {SCAN}: {warm_flight_rows} rows, {mb:.1} MB of Arrow IPC on the wire, median of {runs} alternating runs"
    );
    for (side, time) in [
        ("Sluice, Flight SQL over mTLS ", flight),
        ("DataFusion in-process, files ", df),
        ("DataFusion in-process, memory", in_memory),
    ] {
        println!(
            "    {side} : {:>8.1} MB/s  ({:>7.1} ms)",
            mb / time.as_secs_f64(),
            ms(time)
        );
    }
    println!(
        "    ratio Sluice / DataFusion    : {:>8.2} (files)  {:.2} (memory)",
        df.as_secs_f64() / flight.as_secs_f64(),
        in_memory.as_secs_f64() / flight.as_secs_f64()
    );

    // (b) latency
    for _ in 0..20 {
        flight_scan(&mut client, SMALL_AGGREGATE).await?;
        datafusion_scan(&ctx, SMALL_AGGREGATE).await?;
        datafusion_scan(&memory, SMALL_AGGREGATE).await?;
    }
    let mut flight_latency = Vec::with_capacity(latency_runs);
    let mut df_latency = Vec::with_capacity(latency_runs);
    let mut memory_latency = Vec::with_capacity(latency_runs);
    for _ in 0..latency_runs {
        let started = Instant::now();
        flight_scan(&mut client, SMALL_AGGREGATE).await?;
        flight_latency.push(started.elapsed());
        let started = Instant::now();
        datafusion_scan(&ctx, SMALL_AGGREGATE).await?;
        df_latency.push(started.elapsed());
        let started = Instant::now();
        datafusion_scan(&memory, SMALL_AGGREGATE).await?;
        memory_latency.push(started.elapsed());
    }
    println!("\n(b) small aggregate over machine_events (50,000 CSV rows), {latency_runs} runs:");
    println!("    {SMALL_AGGREGATE}");
    let p50 = |l: &mut Vec<Duration>| ms(percentile(l, 50.0));
    let p99 = |l: &mut Vec<Duration>| ms(percentile(l, 99.0));
    let (sluice, files, decoded) = (
        p50(&mut flight_latency),
        p50(&mut df_latency),
        p50(&mut memory_latency),
    );
    for (side, latency) in [
        (
            "Sluice, GetFlightInfo + DoGet over mTLS",
            &mut flight_latency,
        ),
        ("DataFusion in-process, files          ", &mut df_latency),
        (
            "DataFusion in-process, memory         ",
            &mut memory_latency,
        ),
    ] {
        println!(
            "    {side} : p50 {:>6.2} ms  p99 {:>6.2} ms",
            p50(latency),
            p99(latency)
        );
    }
    println!(
        "    Sluice overhead at p50                  : {:>+6.2} ms (files)  {:+.2} ms (memory)",
        sluice - files,
        sluice - decoded
    );
    Ok(())
}

/// The tables of `ctx` decoded into memory, partitioned as a scan of their
/// files gives them: what Sluice's `limits.table_cache` holds.
async fn in_memory(ctx: &SessionContext) -> anyhow::Result<SessionContext> {
    let memory = SessionContext::new_with_config(ctx.copied_config());
    for name in ["trips", "machine_events"] {
        let table = ctx.table(name).await?;
        let schema = std::sync::Arc::new(table.schema().as_arrow().clone());
        let partitions = table.collect_partitioned().await?;
        let decoded = datafusion::datasource::MemTable::try_new(schema, partitions)?;
        memory.register_table(name, std::sync::Arc::new(decoded))?;
    }
    Ok(memory)
}

/// GetFlightInfo + DoGet, decoding every batch; returns (bytes on the wire, rows).
async fn flight_scan(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> anyhow::Result<(usize, usize)> {
    let info = client.execute(sql.to_string(), None).await?;
    let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
    let response = client.inner_mut().do_get(ticket).await?.into_inner();
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = bytes.clone();
    let counted = response
        .map_ok(move |data| {
            counter.fetch_add(
                data.data_header.len() + data.data_body.len(),
                std::sync::atomic::Ordering::Relaxed,
            );
            data
        })
        .map_err(FlightError::from);
    let mut batches = FlightRecordBatchStream::new_from_flight_data(counted);
    let mut rows = 0;
    while let Some(batch) = batches.try_next().await? {
        rows += batch.num_rows();
    }
    Ok((bytes.load(std::sync::atomic::Ordering::Relaxed), rows))
}

async fn datafusion_scan(ctx: &SessionContext, sql: &str) -> anyhow::Result<usize> {
    let mut stream = ctx.sql(sql).await?.execute_stream().await?;
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        rows += batch?.num_rows();
    }
    Ok(rows)
}

/// Plain DataFusion with the same schema settings Sluice uses (no view types).
async fn in_process(state_dir: &Path) -> anyhow::Result<SessionContext> {
    let mut config = SessionConfig::new();
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    config.options_mut().sql_parser.map_string_types_to_utf8view = false;
    let ctx = SessionContext::new_with_config(config);
    let data = state_dir.join("data");
    ctx.register_parquet(
        "trips",
        path(&data.join("trips.parquet")),
        ParquetReadOptions::default(),
    )
    .await?;
    ctx.register_csv(
        "machine_events",
        path(&data.join("machine_events.csv")),
        CsvReadOptions::new(),
    )
    .await?;
    Ok(ctx)
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(state_dir: &Path) -> anyhow::Result<Server> {
        let mut command = daemon_command();
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--log-level",
                "warn,sluice::catalog::decoded=info",
                "--policy",
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/policies/open.yaml"),
                "--state-dir",
            ])
            .arg(state_dir)
            .stderr(Stdio::piped());
        let mut server = Server::spawn(command)?;
        server.await_decoded(3)?;
        Ok(server)
    }

    /// Waits until the daemon has decoded `datasets` datasets into memory
    /// (`limits.table_cache`, begun at start), so that no measured query
    /// reads files that later ones would not.
    fn await_decoded(&mut self, datasets: usize) -> anyhow::Result<()> {
        let stderr = self.child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("dataset decoded into memory") {
                    let _ = tx.send(());
                } else {
                    eprintln!("{line}");
                }
            }
        });
        for _ in 0..datasets {
            rx.recv_timeout(Duration::from_secs(120))
                .map_err(|_| anyhow::anyhow!("the daemon did not decode the demo datasets"))?;
        }
        Ok(())
    }

    /// Runs a `sluice` daemon (`serve` or `broker`) and waits for its
    /// `listening on grpc+tls://ADDR` line.
    fn spawn(mut command: Command) -> anyhow::Result<Server> {
        let mut child = command.stdout(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                anyhow::bail!("{command:?} exited before listening");
            };
            if let Some(rest) = line?.split("listening on grpc+tls://").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Server { child, addr })
    }

    /// An mTLS channel as the planning agency of `pki` (`planning.pem`).
    async fn channel(&self, pki: &Path) -> anyhow::Result<Channel> {
        let read = |name: &str| std::fs::read(pki.join(name));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(
                read("planning.pem")?,
                read("planning.key")?,
            ))
            .domain_name("localhost");
        Ok(Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls)?
            .connect()
            .await?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(times: &mut [Duration]) -> Duration {
    percentile(times, 50.0)
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort();
    let rank = ((p / 100.0) * times.len() as f64).ceil() as usize;
    times[rank.clamp(1, times.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (c): what enforcing the usage policy costs.
mod policy {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use arrow_flight::sql::client::FlightSqlServiceClient;
    use datafusion::logical_expr::LogicalPlan;
    use sluice::catalog::Catalog;
    use sluice::config::Config;
    use sluice::server::{ServeHooks, serve_with};
    use sluice_policy::{
        Approval, Denial, PlanGate, PlanningContext, PolicyGate, PolicySet, Principal, QueryContext,
    };
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    use super::{flight_scan, ms, percentile};

    /// The supplier's small aggregate: row filter, masks, allowed functions.
    const SUPPLIER_AGGREGATE: &str = "SELECT site, count(*) AS events, avg(energy_kwh) AS kwh FROM machine_events WHERE event_type = 'fault' GROUP BY site";
    /// The planning agency's join: k suppression, row filter, join grant.
    const PLANNING_JOIN: &str = "SELECT z.district, count(*) AS n, avg(t.fare_eur) AS fare FROM trips t JOIN zones z ON t.start_zone = z.zone_id WHERE t.mode = 'tram' GROUP BY z.district";

    /// Enforcement off: approves every plan unchanged. Exists only here.
    struct PassThrough;

    impl PlanGate for PassThrough {
        fn version(&self) -> &str {
            "enforcement-off"
        }
        fn decide(&self, _: &QueryContext, plan: LogicalPlan) -> Result<Approval, Denial> {
            Ok(Approval {
                plan,
                record: sluice_policy::DecisionRecord::explain("enforcement-off"),
                dp: None,
            })
        }
        fn visible_columns(
            &self,
            _: &Principal,
            _: &str,
        ) -> Option<Vec<datafusion::arrow::datatypes::Field>> {
            None
        }
    }

    pub async fn run(state_dir: &Path, runs: usize) -> anyhow::Result<()> {
        let mut config = Config::embedded_default(state_dir);
        // Servers run side by side here: no DSP endpoint on its fixed port.
        config.dsp.listen = None;
        config.console.listen = None;
        // The source tree's demo policy: the state directory keeps the copy it
        // was created with, which may be older.
        config.policy =
            Some(concat!(env!("CARGO_MANIFEST_DIR"), "/src/dev/demo_policy.yaml").into());
        // The supplier's daily query quota would run out over repeated runs.
        let _ = std::fs::remove_file(state_dir.join("quota.json"));
        let catalog = Catalog::open(&config, &sluice::catalog::Spill::Off).await?;
        let gate = demo_gate(&catalog, &config, state_dir)?;

        println!("\n(c) the usage policy (demo policy), {runs} runs each:");
        for (who, sql) in [
            ("supplier", SUPPLIER_AGGREGATE),
            ("planning", PLANNING_JOIN),
        ] {
            let (p50, p99) = decision_time(&catalog, &gate, who, sql, runs * 10).await?;
            println!(
                "    decide + rewrite, {who:<8} : p50 {:>7.1} µs  p99 {:>7.1} µs   {sql}",
                p50 * 1e6,
                p99 * 1e6
            );
        }

        // Both without the audit log, so that only the policy differs; (e)
        // measures the audit log.
        let enforced = start(config.clone(), None, true).await?;
        let off = start(config, Some(Arc::new(PassThrough)), true).await?;
        let mut with_policy = client(enforced, state_dir).await?;
        let mut without = client(off, state_dir).await?;
        for _ in 0..20 {
            flight_scan(&mut with_policy, SUPPLIER_AGGREGATE).await?;
            flight_scan(&mut without, SUPPLIER_AGGREGATE).await?;
        }
        let (mut on_times, mut off_times) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for _ in 0..runs {
            let started = Instant::now();
            flight_scan(&mut with_policy, SUPPLIER_AGGREGATE).await?;
            on_times.push(started.elapsed());
            let started = Instant::now();
            flight_scan(&mut without, SUPPLIER_AGGREGATE).await?;
            off_times.push(started.elapsed());
        }
        let (on50, on99) = (
            percentile(&mut on_times, 50.0),
            percentile(&mut on_times, 99.0),
        );
        let (off50, off99) = (
            percentile(&mut off_times, 50.0),
            percentile(&mut off_times, 99.0),
        );
        println!("    end to end over mTLS, supplier aggregate:");
        println!(
            "      policy enforced : p50 {:>6.2} ms  p99 {:>6.2} ms",
            ms(on50),
            ms(on99)
        );
        println!(
            "      enforcement off : p50 {:>6.2} ms  p99 {:>6.2} ms",
            ms(off50),
            ms(off99)
        );
        println!(
            "      ratio enforced / off at p50 : {:.3}",
            on50.as_secs_f64() / off50.as_secs_f64()
        );
        Ok(())
    }

    /// (e): the audit log on vs off, then the sustained audited rate.
    pub async fn audit_cost(state_dir: &Path, runs: usize, window: Duration) -> anyhow::Result<()> {
        let mut config = Config::embedded_default(state_dir);
        // Servers run side by side here: no DSP endpoint on its fixed port.
        config.dsp.listen = None;
        config.console.listen = None;
        // The demo policy without the supplier's daily quota, which the
        // sustained run would exhaust.
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/dev/demo_policy.yaml"
        ))?;
        let quota = "quotas: { queries_per_day: 2000, rows_per_day: 500000 }";
        anyhow::ensure!(
            text.contains(quota),
            "the demo policy's supplier quota changed"
        );
        let policy = state_dir.join("bench-audit-policy.yaml");
        std::fs::write(&policy, text.replace(quota, ""))?;
        config.policy = Some(policy);
        let audited = start(config.clone(), None, false).await?;
        let unaudited = start(config, None, true).await?;
        let mut on = client(audited, state_dir).await?;
        let mut off = client(unaudited, state_dir).await?;
        for _ in 0..20 {
            flight_scan(&mut on, SUPPLIER_AGGREGATE).await?;
            flight_scan(&mut off, SUPPLIER_AGGREGATE).await?;
        }
        let (mut on_times, mut off_times) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for _ in 0..runs {
            let started = Instant::now();
            flight_scan(&mut on, SUPPLIER_AGGREGATE).await?;
            on_times.push(started.elapsed());
            let started = Instant::now();
            flight_scan(&mut off, SUPPLIER_AGGREGATE).await?;
            off_times.push(started.elapsed());
        }
        let p = |times: &mut Vec<Duration>, q| percentile(times, q);
        let (on50, on99, off50, off99) = (
            p(&mut on_times, 50.0),
            p(&mut on_times, 99.0),
            p(&mut off_times, 50.0),
            p(&mut off_times, 99.0),
        );
        println!("\n(e) the audit log (supplier aggregate, demo policy), {runs} runs each:");
        let (append50, append99) = append_time(state_dir, runs * 3)?;
        println!(
            "      one append (sign + write + fsync), in process : p50 {:>6.1} µs  p99 {:>6.1} µs",
            append50 * 1e6,
            append99 * 1e6
        );
        println!(
            "      audit on  (3 signed, fsynced records per query) : p50 {:>6.2} ms  p99 {:>6.2} ms",
            ms(on50),
            ms(on99)
        );
        println!(
            "      audit off                                       : p50 {:>6.2} ms  p99 {:>6.2} ms",
            ms(off50),
            ms(off99)
        );
        println!(
            "      ratio on / off: p50 {:.3}  p99 {:.3}",
            on50.as_secs_f64() / off50.as_secs_f64(),
            on99.as_secs_f64() / off99.as_secs_f64()
        );
        for (label, addr) in [("audited  ", audited), ("unaudited", unaudited)] {
            let qps = sustained(addr, state_dir, 8, window).await?;
            println!(
                "      sustained, 8 clients for {} s, {label}: {qps:>7.1} queries/s",
                window.as_secs()
            );
        }
        Ok(())
    }

    /// p50/p99 seconds of one audit append on the state directory's disk.
    fn append_time(state_dir: &Path, appends: usize) -> anyhow::Result<(f64, f64)> {
        let dir = state_dir.join("bench-audit-log");
        let _ = std::fs::remove_dir_all(&dir);
        let log = sluice::audit::AuditLog::open(&dir)?;
        let mut times = Vec::with_capacity(appends);
        for i in 0..appends {
            let entry = sluice::audit::Entry {
                event: "decision".into(),
                outcome: "allowed".into(),
                principal: format!("spiffe://bench/{i}"),
                datasets: vec!["machine_events".into()],
                ..Default::default()
            };
            let started = Instant::now();
            log.append(entry)?;
            times.push(started.elapsed());
        }
        Ok((
            percentile(&mut times, 50.0).as_secs_f64(),
            percentile(&mut times, 99.0).as_secs_f64(),
        ))
    }

    /// Queries per second that `clients` concurrent connections complete.
    async fn sustained(
        addr: std::net::SocketAddr,
        state_dir: &Path,
        clients: usize,
        window: Duration,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + window;
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let mut client = client(addr, state_dir).await?;
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    flight_scan(&mut client, SUPPLIER_AGGREGATE).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            }));
        }
        let started = Instant::now();
        let mut total = 0;
        for task in tasks {
            total += task.await??;
        }
        Ok(total as f64 / started.elapsed().as_secs_f64())
    }

    fn demo_gate(
        catalog: &Catalog,
        config: &Config,
        state_dir: &Path,
    ) -> anyhow::Result<PolicyGate> {
        struct Context<'a>(&'a Catalog);
        impl PlanningContext for Context<'_> {
            fn dataset_schema(
                &self,
                name: &str,
            ) -> Option<datafusion::arrow::datatypes::SchemaRef> {
                self.0.dataset(name).map(|d| d.schema.clone())
            }
            fn parse_predicate(
                &self,
                sql: &str,
                schema: &datafusion::common::DFSchema,
            ) -> datafusion::error::Result<datafusion::logical_expr::Expr> {
                self.0.session().state().create_logical_expr(sql, schema)
            }
        }
        let file = config
            .policy
            .clone()
            .unwrap_or_else(|| state_dir.join("policy.yaml"));
        let text = std::fs::read_to_string(&file)?;
        let policy = PolicySet::compile(
            &file.display().to_string(),
            &text,
            &Context(catalog),
            b"bench",
        )?;
        Ok(PolicyGate::new(policy))
    }

    async fn decision_time(
        catalog: &Catalog,
        gate: &PolicyGate,
        who: &str,
        sql: &str,
        runs: usize,
    ) -> anyhow::Result<(f64, f64)> {
        let state = catalog.session().state();
        let plan = state.create_logical_plan(sql).await?;
        let analyzed =
            state
                .analyzer()
                .execute_and_check(plan, state.config_options(), |_, _| {})?;
        let request = QueryContext::new(principal(who)).with_purpose("research");
        gate.decide(&request, analyzed.clone())
            .map_err(|d| anyhow::anyhow!("{d}"))?;
        let mut times: Vec<Duration> = Vec::with_capacity(runs);
        for _ in 0..runs {
            let plan = analyzed.clone();
            let started = Instant::now();
            let approval = gate.decide(&request, plan);
            times.push(started.elapsed());
            std::hint::black_box(approval).map_err(|d| anyhow::anyhow!("{d}"))?;
        }
        Ok((
            percentile(&mut times, 50.0).as_secs_f64(),
            percentile(&mut times, 99.0).as_secs_f64(),
        ))
    }

    fn principal(who: &str) -> Principal {
        let client = sluice::dev::DEMO_CLIENTS
            .iter()
            .find(|c| c.name == who)
            .expect("a demo client");
        let mut principal = Principal::new(client.uri);
        principal.organization = Some(client.organization.into());
        principal.common_name = Some(client.common_name.into());
        principal.san_uris = vec![client.uri.into()];
        principal
    }

    async fn start(
        mut config: Config,
        gate: Option<Arc<dyn PlanGate>>,
        audit_off: bool,
    ) -> anyhow::Result<std::net::SocketAddr> {
        config.server.listen = "127.0.0.1:0".parse()?;
        config.metrics.listen = None;
        let (bound, address) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Handle::current();
        tokio::spawn(serve_with(
            config,
            runtime,
            ServeHooks {
                gate,
                bound: Some(bound),
                audit_off,
            },
        ));
        Ok(address.await?)
    }

    async fn client(
        addr: std::net::SocketAddr,
        state_dir: &Path,
    ) -> anyhow::Result<FlightSqlServiceClient<tonic::transport::Channel>> {
        let pki = state_dir.join("pki");
        let read = |name: &str| std::fs::read(pki.join(name));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(
                read("supplier.pem")?,
                read("supplier.key")?,
            ))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(FlightSqlServiceClient::new(channel))
    }
}

/// (d): what differential privacy costs in time, and its accuracy.
mod privacy {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use arrow_flight::sql::client::FlightSqlServiceClient;
    use datafusion::arrow::array::{AsArray, RecordBatch};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{DataType, Float64Type};
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    use futures::TryStreamExt;
    use sluice::config::Config;
    use sluice::server::{ServeHooks, serve_with};
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

    use super::{median, ms};

    /// The research institute's DP query over the 40 published zones.
    const DP_QUERY: &str = "SELECT start_zone, count(*) AS n, sum(fare_eur) AS fares, avg(distance_km) AS km FROM trips GROUP BY start_zone";
    /// The floor under any DP answer bounded per card: the same rows and
    /// sums grouped by (card, zone), the first step of the bounded plan,
    /// as a plain DataFusion query.
    const PER_CARD: &str = "SELECT card_id, start_zone, count(*) AS n, sum(fare_eur) AS fares, sum(distance_km) AS km, count(distance_km) AS km_n FROM trips WHERE mode <> 'ferry' GROUP BY card_id, start_zone";
    /// The exact answer, as the policy's row filter defines the data.
    const EXACT: &str = "SELECT start_zone, count(*) AS n, sum(fare_eur) AS fares, avg(distance_km) AS km FROM trips WHERE mode <> 'ferry' GROUP BY start_zone";

    pub async fn run(state_dir: &Path, runs: usize) -> anyhow::Result<()> {
        let policy = bench_policy(state_dir)?;
        let big = ten_million(state_dir)?;
        let many_cards = million_cards(state_dir, &big).await?;
        println!(
            "\n(d) differential privacy (research identity, Laplace, published zone keys, cache off), {runs} runs each:"
        );
        println!("    {DP_QUERY}");
        let smartnoise = std::env::var("SLUICE_BENCH_SMARTNOISE").is_ok_and(|v| v == "1");
        for (label, trips) in [
            ("1M rows ", state_dir.join("data/trips.parquet")),
            ("10M rows", big),
            ("10M rows, 1M cards", many_cards),
        ] {
            let (client, ctx) = setup(state_dir, &policy, &trips).await?;
            let sluice = time_one(label, client, &ctx, runs).await?;
            if smartnoise {
                // SmartNoise loads 10M rows into SQLite in minutes: fewer runs.
                let sn_runs = if label.starts_with("10M") {
                    1
                } else {
                    runs.min(3)
                };
                let (seconds, line) = smartnoise_run(&trips, 1.0, sn_runs)?;
                println!(
                    "    {label}: SmartNoise SQL {:>8.1} ms   SmartNoise ÷ Sluice {:.1}   ({line})",
                    seconds * 1e3,
                    seconds / sluice.as_secs_f64()
                );
            }
        }
        let (mut client, ctx) =
            setup(state_dir, &policy, &state_dir.join("data/trips.parquet")).await?;
        let exact = answers(&collect(&ctx, EXACT).await?);
        println!("    median relative error over groups and {runs} answers (1M rows):");
        for epsilon in ["0.1", "1"] {
            client.set_header("x-sluice-epsilon", epsilon);
            let mut errors: [Vec<f64>; 3] = Default::default();
            for _ in 0..runs {
                let noisy = answers(&flight(&mut client, DP_QUERY).await?);
                for (zone, values) in &noisy {
                    let Some(truth) = exact.get(zone) else {
                        continue;
                    };
                    for i in 0..3 {
                        errors[i].push((values[i] - truth[i]).abs() / truth[i].abs().max(1e-9));
                    }
                }
            }
            let [n, fares, km] = errors.map(|mut e| {
                e.sort_by(f64::total_cmp);
                e.get(e.len() / 2).copied().unwrap_or(f64::NAN)
            });
            println!(
                "      ε = {epsilon:<3}: count {:>8.5}  sum(fare_eur) {:>8.5}  avg(distance_km) {:>8.5}",
                n, fares, km
            );
            if smartnoise {
                let (_, line) = smartnoise_run(
                    &state_dir.join("data/trips.parquet"),
                    epsilon.parse()?,
                    runs,
                )?;
                println!("      ε = {epsilon:<3}: SmartNoise SQL {line}");
            }
        }
        Ok(())
    }

    /// SmartNoise SQL on the same files at the same total ε and per-card
    /// bound: its median seconds and its output line.
    fn smartnoise_run(data: &Path, epsilon: f64, runs: usize) -> anyhow::Result<(f64, String)> {
        // The demo grant's bound on one card: max_groups × max_rows.
        const MAX_IDS: u64 = 10 * 50;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/bench/smartnoise.sh");
        let output = std::process::Command::new("bash")
            .arg(script)
            .arg("--data")
            .arg(data)
            .args(["--epsilon", &format!("{}", epsilon / 4.0)])
            .args(["--runs", &runs.to_string()])
            .args(["--max-ids", &MAX_IDS.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(output.status.success(), "smartnoise.sh failed");
        let line = String::from_utf8(output.stdout)?
            .lines()
            .find(|l| l.starts_with("SMARTNOISE"))
            .ok_or_else(|| anyhow::anyhow!("smartnoise.sh printed no result line"))?
            .to_string();
        let seconds = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("seconds="))
            .ok_or_else(|| anyhow::anyhow!("no seconds= in {line}"))?
            .parse()?;
        Ok((seconds, line))
    }

    async fn time_one(
        label: &str,
        mut client: FlightSqlServiceClient<Channel>,
        ctx: &SessionContext,
        runs: usize,
    ) -> anyhow::Result<Duration> {
        flight(&mut client, DP_QUERY).await?;
        collect(ctx, DP_QUERY).await?;
        collect(ctx, PER_CARD).await?;
        let (mut dp, mut plain, mut per_card) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let started = Instant::now();
            flight(&mut client, DP_QUERY).await?;
            dp.push(started.elapsed());
            let started = Instant::now();
            collect(ctx, DP_QUERY).await?;
            plain.push(started.elapsed());
            let started = Instant::now();
            collect(ctx, PER_CARD).await?;
            per_card.push(started.elapsed());
        }
        let [dp, plain, per_card] = [dp, plain, per_card].map(|mut runs| median(&mut runs));
        println!(
            "    {label}: DP over Flight SQL + mTLS {:>8.1} ms   non-private DataFusion in-process {:>7.1} ms   ratio {:.2}",
            ms(dp),
            ms(plain),
            dp.as_secs_f64() / plain.as_secs_f64()
        );
        println!(
            "    {label}: DataFusion GROUP BY card_id, start_zone alone {:>7.1} ms ({:.1}× the plain query)   DP ÷ that {:.2}",
            ms(per_card),
            per_card.as_secs_f64() / plain.as_secs_f64(),
            dp.as_secs_f64() / per_card.as_secs_f64()
        );
        Ok(dp)
    }

    /// The demo policy with an unlimited budget and the answer cache off, so
    /// every run pays for fresh noise.
    fn bench_policy(state_dir: &Path) -> anyhow::Result<PathBuf> {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/dev/demo_policy.yaml"
        ))?;
        let limited = "budget: { epsilon: 10.0, delta: 1.0e-6, period: month }";
        anyhow::ensure!(
            text.contains(limited),
            "the demo policy's DP budget changed"
        );
        let text = text.replace(
            limited,
            "budget: { epsilon: 1.0e9, delta: 1.0e-4, period: total }\n          cache: false",
        );
        // (d) measures privacy, not contracts: no agreement needed here.
        let text = text.replace("agreement: { approval: manual, valid_for_days: 30 }", "");
        let path = state_dir.join("bench-policy.yaml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Ten copies of the demo trips file in one dataset directory.
    fn ten_million(state_dir: &Path) -> anyhow::Result<PathBuf> {
        let dir = state_dir.join("trips-10m");
        std::fs::create_dir_all(&dir)?;
        for i in 0..10 {
            let copy = dir.join(format!("part-{i}.parquet"));
            if !copy.exists() {
                std::fs::copy(state_dir.join("data/trips.parquet"), copy)?;
            }
        }
        Ok(dir)
    }

    /// The ten copies with the cards renumbered so that 1,000,000 cards take
    /// ten trips each (copy `i` gives trip `t` to card `(10·t + i) mod 10⁶`):
    /// the per-unit tables of the DP plan are then 17 times as large as in
    /// the ten plain copies, past the default 1 GiB of query memory.
    async fn million_cards(state_dir: &Path, copies: &Path) -> anyhow::Result<PathBuf> {
        let dir = state_dir.join("trips-10m-1m-cards");
        let done = dir.join(".complete");
        if done.exists() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir)?;
        let ctx = SessionContext::new();
        for i in 0..10 {
            let part = copies.join(format!("part-{i}.parquet"));
            ctx.register_parquet(
                "part",
                part.to_str().unwrap(),
                ParquetReadOptions::default(),
            )
            .await?;
            let out = dir.join(format!("part-{i}.parquet"));
            let sql = format!(
                "COPY (SELECT trip_id, concat('K', CAST((trip_id * 10 + {i}) % 1000000 AS VARCHAR)) AS card_id, \
                 start_time, end_time, start_zone, end_zone, mode, distance_km, fare_eur, age_band FROM part) \
                 TO '{}' STORED AS PARQUET",
                out.display()
            );
            ctx.sql(&sql).await?.collect().await?;
            ctx.deregister_table("part")?;
        }
        std::fs::write(&done, b"")?;
        Ok(dir)
    }

    async fn setup(
        state_dir: &Path,
        policy: &Path,
        trips: &Path,
    ) -> anyhow::Result<(FlightSqlServiceClient<Channel>, SessionContext)> {
        let mut config = Config::embedded_default(state_dir);
        // Servers run side by side here: no DSP endpoint on its fixed port.
        config.dsp.listen = None;
        config.console.listen = None;
        config.policy = Some(policy.to_path_buf());
        for dataset in &mut config.datasets {
            if dataset.name == "trips" {
                dataset.location = sluice::config::Location::Local(trips.to_path_buf());
            }
        }
        // Empty budgets on purpose: an empty ledger file is the documented
        // way (a missing one is refused once the audit log shows service).
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(state_dir.join(format!("privacy-ledger.sqlite{suffix}")));
        }
        std::fs::write(state_dir.join("privacy-ledger.sqlite"), b"")?;
        config.server.listen = "127.0.0.1:0".parse()?;
        config.metrics.listen = None;
        // Both sides read the Parquet files: no decoded copies.
        config.limits.table_cache = 0;
        let (bound, address) = tokio::sync::oneshot::channel();
        tokio::spawn(serve_with(
            config,
            tokio::runtime::Handle::current(),
            ServeHooks {
                gate: None,
                bound: Some(bound),
                audit_off: false,
            },
        ));
        let addr = address.await?;
        let pki = state_dir.join("pki");
        let read = |name: &str| std::fs::read(pki.join(name));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(
                read("research.pem")?,
                read("research.key")?,
            ))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        let mut client = FlightSqlServiceClient::new(channel);
        client.set_header("x-sluice-purpose", "research");
        client.set_header("x-sluice-epsilon", "0.5");
        let ctx = SessionContext::new();
        ctx.register_parquet(
            "trips",
            trips.to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await?;
        Ok((client, ctx))
    }

    async fn flight(
        client: &mut FlightSqlServiceClient<Channel>,
        sql: &str,
    ) -> anyhow::Result<Vec<RecordBatch>> {
        let info = client.execute(sql.to_string(), None).await?;
        let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
        Ok(client.do_get(ticket).await?.try_collect().await?)
    }

    async fn collect(ctx: &SessionContext, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
        Ok(ctx.sql(sql).await?.collect().await?)
    }

    /// Zone → (count, sum, avg).
    fn answers(batches: &[RecordBatch]) -> HashMap<String, [f64; 3]> {
        let mut out = HashMap::new();
        for batch in batches {
            let zones = cast(batch.column(0), &DataType::Utf8).unwrap();
            let zones = zones.as_string::<i32>();
            let numbers: Vec<_> = (1..4)
                .map(|i| cast(batch.column(i), &DataType::Float64).unwrap())
                .collect();
            for row in 0..batch.num_rows() {
                let value = |i: usize| numbers[i].as_primitive::<Float64Type>().value(row);
                out.insert(zones.value(row).to_string(), [value(0), value(1), value(2)]);
            }
        }
        out
    }
}

/// (f): what the broker adds to a federated aggregate.
mod federation {
    use std::collections::{BTreeSet, HashMap};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use arrow_flight::sql::client::FlightSqlServiceClient;
    use datafusion::arrow::array::{AsArray, RecordBatch};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    use futures::TryStreamExt;
    use tonic::transport::Channel;

    use super::{Server, flight_scan, ms, percentile};

    const FEDERATED_AGGREGATE: &str = "SELECT mode, count(*) AS trips, sum(distance_km) AS km, avg(fare_eur) AS fare FROM trips GROUP BY mode";
    const TRIPS_PER_OPERATOR: usize = 1_000_000;
    const PURPOSE: &str = "urban-planning";
    /// The example's consumers and broker with the example's grants, but
    /// aggregate-only with k = 10 instead of differentially private: no
    /// budget to run out, no answer cache, so every run does the work.
    const OPERATOR_POLICY: &str = r#"# Written by connector/benches/flight.rs, section (f).
version: 1

datasets:
  trips:
    privacy_unit: card_id
    columns:
      card_id: { class: important, tags: [personal] }
      start_zone: { tags: [personal] }
      distance_km: { tags: [personal] }
      fare_eur: { tags: [personal] }

brokers:
  - name: regional-broker
    match: { san_uri: "spiffe://mobility.example/org/regional-broker" }
    relays_for: [{ san_uri: "spiffe://mobility.example/org/city-planning" }]
    require_own_grant: true

consumers:
  - name: city-planning
    match:
      san_uri: "spiffe://mobility.example/org/city-planning"
      organization: City Planning Agency
    grants:
      trips: &aggregates
        columns:
          mode: group_by_only
          start_zone: group_by_only
          distance_km: aggregate_only
          fare_eur: aggregate_only
        aggregation: { min_group_size: 10 }
        purposes: [urban-planning]

  - name: regional-broker
    match: { san_uri: "spiffe://mobility.example/org/regional-broker" }
    grants:
      trips: *aggregates
"#;

    /// The three daemons of the data space; killed when dropped.
    struct DataSpace {
        broker: Server,
        north: Server,
        south: Server,
    }

    pub fn run(runtime: &tokio::runtime::Runtime, runs: usize) -> anyhow::Result<()> {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sluice-bench-broker");
        let started = Instant::now();
        setup(&out)?;
        let space = DataSpace {
            north: operator(&out, "north")?,
            south: operator(&out, "south")?,
            broker: daemon(["broker", "--config"], &out.join("broker.toml"))?,
        };
        let setup_time = started.elapsed();
        runtime.block_on(measure(&space, &out.join("pki"), runs, setup_time))
    }

    /// `examples/broker/setup.sh` on free loopback ports, then the
    /// benchmark's policy at both operators.
    fn setup(out: &Path) -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(out);
        let [north, south, broker] = free_ports()?;
        let status = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/broker/setup.sh"
        ))
        .arg(out)
        .env("SLUICE", env!("CARGO_BIN_EXE_sluice"))
        .env("NORTH_PORT", north.to_string())
        .env("SOUTH_PORT", south.to_string())
        .env("BROKER_PORT", broker.to_string())
        .env("TRIPS_ROWS", TRIPS_PER_OPERATOR.to_string())
        .stdout(Stdio::null())
        .status()?;
        anyhow::ensure!(status.success(), "examples/broker/setup.sh failed");
        for operator in ["north", "south"] {
            std::fs::write(out.join(operator).join("policy.yaml"), OPERATOR_POLICY)?;
        }
        Ok(())
    }

    /// Three distinct ports free right now (held together, then released).
    fn free_ports() -> anyhow::Result<[u16; 3]> {
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let mut ports = [0; 3];
        for (port, listener) in ports.iter_mut().zip(&listeners) {
            *port = listener.local_addr()?.port();
        }
        Ok(ports)
    }

    fn operator(out: &Path, name: &str) -> anyhow::Result<Server> {
        daemon(["serve", "--config"], &out.join(name).join("sluice.toml"))
    }

    fn daemon(args: [&str; 2], config: &Path) -> anyhow::Result<Server> {
        let mut command = crate::daemon_command();
        command.args(args).arg(config).args(["--log-level", "warn"]);
        Server::spawn(command)
    }

    async fn measure(
        space: &DataSpace,
        pki: &Path,
        runs: usize,
        setup_time: Duration,
    ) -> anyhow::Result<()> {
        let mut broker = client(&space.broker, pki).await?;
        let mut north = client(&space.north, pki).await?;
        let mut south = client(&space.south, pki).await?;
        check_sums(&mut broker, &mut north, &mut south).await?;
        for _ in 0..20 {
            for client in [&mut broker, &mut north, &mut south] {
                flight_scan(client, FEDERATED_AGGREGATE).await?;
            }
        }
        let mut times: [Vec<Duration>; 4] = Default::default();
        for _ in 0..runs {
            for (client, times) in [&mut broker, &mut north, &mut south]
                .into_iter()
                .zip(&mut times)
            {
                let started = Instant::now();
                flight_scan(client, FEDERATED_AGGREGATE).await?;
                times.push(started.elapsed());
            }
            // What the broker itself waits for: both providers at once. On
            // a machine with few cores they compete for them, so this, not
            // the slowest single provider alone, isolates the broker's cost.
            let started = Instant::now();
            let (a, b) = tokio::join!(
                flight_scan(&mut north, FEDERATED_AGGREGATE),
                flight_scan(&mut south, FEDERATED_AGGREGATE)
            );
            a?;
            b?;
            times[3].push(started.elapsed());
        }
        report(times, runs, setup_time);
        Ok(())
    }

    async fn client(
        server: &Server,
        pki: &Path,
    ) -> anyhow::Result<FlightSqlServiceClient<Channel>> {
        let mut client = FlightSqlServiceClient::new(server.channel(pki).await?);
        client.set_header("x-sluice-purpose", PURPOSE);
        Ok(client)
    }

    fn report(times: [Vec<Duration>; 4], runs: usize, setup_time: Duration) {
        let [federated, north, south, both] =
            times.map(|mut t| (percentile(&mut t, 50.0), percentile(&mut t, 99.0)));
        let (slowest, slowest_p50) = if north.0 >= south.0 {
            ("north", north.0)
        } else {
            ("south", south.0)
        };
        println!(
            "\n(f) federation (examples/broker, {TRIPS_PER_OPERATOR} trips per operator, aggregate-only policy with k = 10, no DP), {runs} interleaved runs each:"
        );
        println!("    {FEDERATED_AGGREGATE}");
        println!(
            "    setup.sh and three daemons started in {:.1} s",
            setup_time.as_secs_f64()
        );
        for (label, (p50, p99)) in [
            ("through the broker (north + south)", federated),
            ("directly at north", north),
            ("directly at south", south),
            ("directly at both at once", both),
        ] {
            println!(
                "    {label:<34} : p50 {:>7.2} ms  p99 {:>7.2} ms",
                ms(p50),
                ms(p99)
            );
        }
        let label = format!("slowest single provider ({slowest})");
        println!("    {label:<34} : p50 {:>7.2} ms", ms(slowest_p50));
        println!(
            "    broker overhead ratio, federated p50 / slowest single-provider p50 : {:.3}",
            federated.0.as_secs_f64() / slowest_p50.as_secs_f64()
        );
        println!(
            "    broker overhead at p50                                              : {:>+7.2} ms",
            ms(federated.0) - ms(slowest_p50)
        );
        println!(
            "    broker's own cost, federated p50 / both providers at once p50      : {:.3} ({:+.2} ms)",
            federated.0.as_secs_f64() / both.0.as_secs_f64(),
            ms(federated.0) - ms(both.0)
        );
    }

    /// The broker's trips per mode must be north's plus south's.
    async fn check_sums(
        broker: &mut FlightSqlServiceClient<Channel>,
        north: &mut FlightSqlServiceClient<Channel>,
        south: &mut FlightSqlServiceClient<Channel>,
    ) -> anyhow::Result<()> {
        let federated = trips_per_mode(broker).await?;
        let north = trips_per_mode(north).await?;
        let south = trips_per_mode(south).await?;
        anyhow::ensure!(!federated.is_empty(), "the broker returned no groups");
        let modes: BTreeSet<&String> = federated
            .keys()
            .chain(north.keys())
            .chain(south.keys())
            .collect();
        for mode in modes {
            let trips = |answer: &HashMap<String, i64>| answer.get(mode).copied().unwrap_or(0);
            anyhow::ensure!(
                trips(&federated) == trips(&north) + trips(&south),
                "trips for {mode}: broker {}, north {} + south {}",
                trips(&federated),
                trips(&north),
                trips(&south)
            );
        }
        Ok(())
    }

    /// Mode → trips, from one answer to the query.
    async fn trips_per_mode(
        client: &mut FlightSqlServiceClient<Channel>,
    ) -> anyhow::Result<HashMap<String, i64>> {
        let info = client
            .execute(FEDERATED_AGGREGATE.to_string(), None)
            .await?;
        let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
        let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
        let mut out = HashMap::new();
        for batch in &batches {
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| anyhow::anyhow!("no column {name} in the answer"))
            };
            let modes = cast(column("mode")?, &DataType::Utf8)?;
            let trips = cast(column("trips")?, &DataType::Int64)?;
            let (modes, trips) = (modes.as_string::<i32>(), trips.as_primitive::<Int64Type>());
            for row in 0..batch.num_rows() {
                out.insert(modes.value(row).to_string(), trips.value(row));
            }
        }
        Ok(out)
    }
}

/// The `sluice` binary for a daemon the benchmark starts: `setpriv` (from
/// util-linux) sets the parent-death signal and executes it, so the server
/// dies with the benchmark even if the benchmark is killed.
fn daemon_command() -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .arg(env!("CARGO_BIN_EXE_sluice"));
    command
}
