//! Distributed execution: a coordinator (`sluice serve --worker …`) and
//! `sluice worker`s, all real processes on loopback over mTLS.
//!
//! The policy suite on three workers is in `policy_suite.rs`. Here: who a
//! worker serves, differential privacy over units whose rows are spread over
//! every file (per-unit bounds hold over the whole dataset, not per worker),
//! the neighbouring-datasets test against a distributed deployment, and a
//! worker that dies or stalls during a query.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Worker, fetch, floats, query, spent, status};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Files each dataset is split into: every person has a row in each.
const FILES: usize = 4;

/// DP on `people` (and its neighbour `people_plus`) for `planning`: one row
/// and one group per person, ε as given; plain aggregates for `supplier`.
fn policy(epsilon: &str, budget: &str) -> String {
    let grant = format!(
        r#"
        columns: {{ city: group_by_only, score: aggregate_only }}
        functions: {{ aggregate: [count, sum, avg] }}
        dp:
          epsilon_per_query: {epsilon}
          default_epsilon: {epsilon}
          delta_per_query: 1.0e-7
          budget: {budget}
          cache: false
          max_groups: 1
          max_rows: 1
          columns: {{ score: {{ bounds: [0, 300] }} }}
          public_keys: {{ city: [Aarhus, Bergen, Cork] }}"#
    );
    format!(
        r#"
version: 1
datasets:
  people:
    privacy_unit: id
  people_plus:
    privacy_unit: id
consumers:
  - name: planning
    match: {{ organization: City Planning Agency }}
    grants:
      people:{grant}
      people_plus:{grant}
  - name: supplier
    match: {{ organization: Axle Supplier Consortium }}
    grants:
      people:
        columns: {{ city: group_by_only, score: aggregate_only }}
        functions: {{ aggregate: [count, sum] }}
        aggregation: {{ min_group_size: 2 }}
"#
    )
}

/// `people` rows for persons `0..n`, split over [`FILES`] CSV files in
/// `dir`: person `i` lives in one city and has a row in every file.
fn write_people(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..FILES {
        let mut csv = String::from("id,city,score\n");
        for i in 0..n {
            let city = ["Aarhus", "Bergen", "Cork"][i % 3];
            csv.push_str(&format!("{i},{city},{}\n", (i * 7 + f * 13) % 280));
        }
        std::fs::write(dir.join(format!("part-{f}.csv")), csv).unwrap();
    }
}

/// A deployment serving `people` (`n` persons) and `people_plus` (one more,
/// whose rows are also in every file), with the shared PKI so that the
/// same workers serve it.
fn deployment(policy: &str, n: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = common::temp_dir();
    let d = dir.path();
    write_people(&d.join("people"), n);
    write_people(&d.join("people_plus"), n + 1);
    std::fs::write(d.join("policy.yaml"), policy).unwrap();
    let config = d.join("sluice.toml");
    std::fs::write(
        &config,
        "[policy]\nfile = \"policy.yaml\"\n\n\
         [[datasets]]\nname = \"people\"\nformat = \"csv\"\npath = \"people\"\n\n\
         [[datasets]]\nname = \"people_plus\"\nformat = \"csv\"\npath = \"people_plus\"\n",
    )
    .unwrap();
    let state = d.join("state");
    common::share_pki(&state);
    (dir, config, state)
}

fn prepend(config: &Path, text: &str) {
    let rest = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, format!("{text}\n{rest}")).unwrap();
}

fn start(config: &Path, state: &Path, workers: &[Worker]) -> Daemon {
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--state-dir".to_string(),
        state.display().to_string(),
    ];
    args.extend(Worker::args(workers));
    Daemon::start_args(&args, state.to_path_buf())
}

const BY_CITY: &str =
    "SELECT city, count(*) AS n, sum(score) AS total FROM people GROUP BY city ORDER BY city";

#[tokio::test]
async fn a_worker_serves_its_coordinators_only() {
    let workers = Worker::start_many(1);
    let worker = &workers[0];
    let pki = common::shared_state_dir().join("pki");
    // A consumer's certificate from the same CA: past TLS, refused by role.
    for consumer in ["planning", "research", "admin"] {
        let mut health = HealthClient::new(worker.channel_as(&pki, consumer).await);
        let refused = health
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("serves only its coordinators"),
            "{}",
            refused.message()
        );
    }
    // The coordinator's certificate passes the role check (the worker then
    // has no health service: UNIMPLEMENTED, not a refusal).
    let mut health = HealthClient::new(worker.channel_as(&pki, "coordinator").await);
    let answered = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(answered.code(), Code::Unimplemented, "{answered:?}");
}

#[tokio::test]
async fn a_coordinator_certificate_cannot_query_the_connector() {
    let daemon = Daemon::start();
    let mut client = daemon.client("coordinator").await;
    let refused = status(
        client
            .execute("SELECT 1".to_string(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("urn:sluice:role:coordinator"),
        "{}",
        refused.message()
    );
}

/// With ε so large that the noise rounds to zero (the count's discrete
/// Laplace scale is below 0.004: a non-zero draw has probability below
/// 1e-100), the answers are the bounded statistics themselves. Every person
/// has a row in each of the four files, which the workers read in different
/// tasks: a bound applied per partition or per worker would count each
/// person up to four times.
#[tokio::test]
async fn per_unit_bounds_hold_over_every_file_and_the_sensitivity_is_kept() {
    let workers = Worker::start_many(3);
    let policy = policy("1000.0", "{ epsilon: 1.0e9, period: total }");
    for n in [7, 40, 301] {
        let (_dir, config, state) = deployment(&policy, n);
        let single_state = state.with_file_name("state-single");
        common::share_pki(&single_state);
        let distributed = start(&config, &state, &workers);
        let single = start(&config, &single_state, &[]);
        let expected: Vec<f64> = (0..3)
            .map(|c| (0..n).filter(|i| i % 3 == c).count() as f64)
            .collect();
        let mut answers = Vec::new();
        for dataset in ["people", "people_plus"] {
            let sql = BY_CITY.replace("FROM people", &format!("FROM {dataset}"));
            let mut client = distributed.client("planning").await;
            let (_, got) = query(&mut client, &sql)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", distributed.logs()));
            let mut client = single.client("planning").await;
            let (_, one_node) = query(&mut client, &sql).await.unwrap();
            let counts = floats(&got, 1);
            assert_eq!(counts, floats(&one_node, 1), "n = {n}, {dataset}");
            let totals = floats(&got, 2);
            for (total, count) in totals.iter().zip(&counts) {
                assert!(
                    *total <= 300.0 * count + 1.0,
                    "n = {n}: sum {total} over {count} persons exceeds one row each"
                );
            }
            answers.push(counts);
        }
        assert_eq!(answers[0], expected, "n = {n}: one row per person");
        // Neighbours: one more person changes one group by one, no more
        // (max_groups 1, max_rows 1: the count's sensitivity is 1).
        let changed: f64 = answers[0]
            .iter()
            .zip(&answers[1])
            .map(|(a, b)| (a - b).abs())
            .sum();
        assert_eq!(changed, 1.0, "n = {n}: {answers:?}");
        assert!(
            distributed.logs().contains("leaf stages sent to workers"),
            "{}",
            distributed.logs()
        );
    }
}

/// The neighbouring-datasets test (as `privacy.rs`) against a distributed
/// deployment: `people` and `people_plus` (one more person, with a row in
/// every file), ε = ln 3, 1,000 answers each, six bins. By Weissman's
/// inequality the estimated δ stays within t·(1 + e^ε) of the true one but
/// for a false-alarm rate of 2e-7; an answer without noise fails it.
#[tokio::test]
async fn neighbouring_datasets_on_three_workers_stay_within_ln3() {
    let workers = Worker::start_many(3);
    let policy = policy("1.0986122886681098", "{ epsilon: 100000.0, period: total }");
    let (_dir, config, state) = deployment(&policy, 40);
    let daemon = start(&config, &state, &workers);
    let n = 1000;
    let counts = |dataset: &'static str| {
        let daemon = &daemon;
        async move {
            let mut client = daemon.client("planning").await;
            let sql = format!("SELECT count(*) AS n FROM {dataset}");
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let (_, batches) = query(&mut client, &sql).await.unwrap();
                out.push(floats(&batches, 0)[0] as i64);
            }
            out
        }
    };
    let (a, b) = tokio::join!(counts("people"), counts("people_plus"));
    common::assert_within_ln3(&a, &b, 37);
    assert!(daemon.logs().contains("leaf stages sent to workers"));
}

/// A worker stalls (SIGSTOP) while a query's stage waits on it, then is
/// killed. A plain aggregate fails with UNAVAILABLE naming the worker. A DP
/// query fails as any DP query that fails after its ticket was redeemed:
/// its ε is charged (once, no more) and why is withheld, since a failure's
/// cause could depend on the data. The coordinator keeps serving, on the
/// workers left.
#[tokio::test]
async fn a_worker_killed_during_a_query_fails_it_and_the_next_is_served() {
    let mut workers = Worker::start_many(4);
    let policy = policy("0.5", "{ epsilon: 100.0, period: total }");
    let (_dir, config, state) = deployment(&policy, 40);
    // Probed at start and after a failure only: the stalled worker is not
    // found out before the query reaches it.
    prepend(&config, "[cluster]\nprobe_interval = \"1h\"\n");
    let daemon = start(&config, &state, &workers);
    let mut plain = daemon.client("supplier").await;
    let (_, expected) = query(&mut plain, BY_CITY).await.unwrap();
    let mut private = daemon.client("planning").await;
    query(&mut private, BY_CITY).await.unwrap();

    for (victim, dp) in [(1, false), (2, true)] {
        let before = spent(daemon.channel("planning").await, "people").await;
        workers[victim].pause();
        let url = workers[victim].url.clone();
        let client = if dp { &mut private } else { &mut plain };
        let info = client.execute(BY_CITY.to_string(), None).await.unwrap();
        let killer = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            workers[victim].kill();
        };
        let (outcome, ()) = tokio::join!(fetch(client, &info), killer);
        let failed = status(outcome.unwrap_err());
        let after = spent(daemon.channel("planning").await, "people").await;
        if dp {
            assert_eq!(failed.code(), Code::ResourceExhausted, "{failed:?}");
            assert!(failed.message().contains("its ε was charged"), "{failed:?}");
            assert!((after - before - 0.5).abs() < 1e-9, "{before} → {after}");
        } else {
            assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
            // Named as configured, not by its address.
            let name = format!("cluster.workers[{victim}]");
            assert!(failed.message().contains(&name), "{}", failed.message());
            assert!(!failed.message().contains(&url), "{}", failed.message());
            assert_eq!(after, before);
        }
        // The next queries are served, with the same answer.
        for _ in 0..3 {
            let (_, got) = query(&mut plain, BY_CITY)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", daemon.logs()));
            assert_eq!(floats(&got, 1), floats(&expected, 1));
            assert_eq!(floats(&got, 2), floats(&expected, 2));
            let (_, noisy) = query(&mut private, BY_CITY)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", daemon.logs()));
            assert_eq!(floats(&noisy, 1).len(), 3);
        }
    }
    assert!(daemon.logs().contains("worker does not answer"));
}

/// A worker that stalls cannot hold a query past its deadline.
#[tokio::test]
async fn a_stalled_worker_cannot_hold_a_query_past_its_deadline() {
    let workers = Worker::start_many(2);
    let policy = policy("0.5", "{ epsilon: 100.0, period: total }");
    let (_dir, config, state) = deployment(&policy, 40);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("[limits]\nquery_timeout = \"3s\"\n\n{text}"),
    )
    .unwrap();
    let daemon = start(&config, &state, &workers);
    let mut client = daemon.client("supplier").await;
    query(&mut client, BY_CITY).await.unwrap();
    workers[0].pause();
    workers[1].pause();
    let started = Instant::now();
    let failed = status(query(&mut client, BY_CITY).await.unwrap_err());
    let took = started.elapsed();
    assert_eq!(failed.code(), Code::DeadlineExceeded, "{failed:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// Misconfigured clusters are refused at start, naming what to fix: a
/// coordinator certificate without the role, a production `[tls]` without
/// the cluster's own certificates, a worker address that is not mTLS.
#[test]
fn a_misconfigured_cluster_is_refused_at_start() {
    let policy = policy("0.5", "{ epsilon: 100.0, period: total }");
    let (_dir, config, state) = deployment(&policy, 7);
    let pki = state.join("pki");
    let base = std::fs::read_to_string(&config).unwrap();
    let cases = [
        (
            format!(
                "[cluster]\nworkers = [\"https://127.0.0.1:1\"]\ncert = \"{0}/planning.pem\"\nkey = \"{0}/planning.key\"\nworker_ca = \"{0}/ca.pem\"\n",
                pki.display()
            ),
            "has no coordinator role",
        ),
        (
            format!(
                "[tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nclient_ca = \"{0}/ca.pem\"\n\n[cluster]\nworkers = [\"https://127.0.0.1:1\"]\n",
                pki.display()
            ),
            "cluster.cert, cluster.key and cluster.worker_ca are not",
        ),
        (
            "[cluster]\nworkers = [\"http://127.0.0.1:1\"]\n".to_string(),
            "cluster.workers[0]",
        ),
    ];
    for (section, expected) in cases {
        std::fs::write(&config, format!("{section}\n{base}")).unwrap();
        let refused = common::serve_refused(&config, &state);
        assert!(!refused.status.success());
        assert!(
            refused.stderr.contains(expected),
            "expected {expected:?}: {}",
            refused.stderr
        );
    }
}

/// The `stages` column of `EXPLAIN POLICY <sql>` for `consumer`.
async fn explained_stages(daemon: &Daemon, consumer: &str, sql: &str) -> String {
    use datafusion::arrow::array::AsArray;
    let mut client = daemon.client(consumer).await;
    let (schema, batches) = query(&mut client, &format!("EXPLAIN POLICY {sql}"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.logs()));
    let (column, _) = schema.column_with_name("stages").expect("a stages column");
    batches[0]
        .column(column)
        .as_string::<i32>()
        .value(0)
        .to_string()
}

/// The `worker stage finished` events of the JSON log, each in the span of
/// its query: (query id, stage, task, worker, rows read).
fn worker_reports(logs: &str) -> Vec<(String, u64, u64, String, u64)> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["fields"]["message"] == "worker stage finished")
        .map(|event| {
            let fields = &event["fields"];
            assert_eq!(event["span"]["name"], "query", "{event}");
            for metric in ["rows", "bytes", "cpu_ms"] {
                assert!(fields[metric].is_number(), "{metric} in {event}");
            }
            (
                event["span"]["query_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                fields["stage"].as_u64().unwrap(),
                fields["task"].as_u64().unwrap(),
                fields["worker"].as_str().unwrap().to_string(),
                fields["rows_read"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `EXPLAIN POLICY` shows where an allowed query would run: the leaf stage
/// on the workers, the rest on the coordinator; never a file or a worker's
/// address. Once a distributed query has run, each worker's rows, bytes
/// and CPU time for each stage are in the query's span: together the
/// workers read every row once.
#[tokio::test]
async fn explain_shows_the_stages_and_each_worker_reports_in_the_query_span() {
    let workers = Worker::start_many(3);
    let n = 40;
    let (dir, config, state) = deployment(&policy("1.0", "{ epsilon: 100.0, period: total }"), n);
    prepend(&config, "[log]\nformat = \"json\"\nlevel = \"info\"\n");
    let single_state = state.with_file_name("state-single");
    common::share_pki(&single_state);
    let daemon = start(&config, &state, &workers);
    let single = start(&config, &single_state, &[]);

    let stages = explained_stages(&daemon, "supplier", BY_CITY).await;
    assert!(
        stages.starts_with("stage 0, on this connector:"),
        "{stages}"
    );
    assert!(
        stages.contains(
            "stage 1, on the workers (3 tasks, one per worker), its rows shuffled by hash"
        ),
        "{stages}"
    );
    assert!(
        stages.contains("AggregateExec (FinalPartitioned)"),
        "{stages}"
    );
    assert!(stages.contains("AggregateExec (Partial)"), "{stages}");
    assert!(stages.contains("DataSourceExec (a scan)"), "{stages}");
    let data_dir = dir.path().display().to_string();
    for secret in [data_dir.as_str(), "part-", "127.0.0.1", "https://", ".csv"] {
        assert!(!stages.contains(secret), "{secret} in {stages}");
    }
    // The DP statistics plan: scans on the workers, per-unit bounding here.
    let private = explained_stages(&daemon, "planning", BY_CITY).await;
    assert!(private.contains("stage 1, on the workers"), "{private}");
    let above_workers = private.split("stage 1,").next().unwrap();
    assert!(above_workers.contains("AggregateExec"), "{private}");
    // A query with nothing to scan has no stage to send.
    let constant = explained_stages(&daemon, "supplier", "SELECT 1 AS one").await;
    assert!(
        constant.starts_with("stage 0, on this connector: the whole plan"),
        "{constant}"
    );
    assert_eq!(
        explained_stages(&single, "supplier", BY_CITY).await,
        "stage 0, on this connector: the whole plan (no workers are configured)"
    );

    let mut client = daemon.client("supplier").await;
    query(&mut client, BY_CITY)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.logs()));
    // Metrics arrive after the answer: the workers send them when their
    // channels close.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reports = loop {
        let reports = worker_reports(&daemon.logs());
        if reports.len() >= 3 || Instant::now() > deadline {
            break reports;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reports.len(), 3, "one report per worker: {reports:?}");
    let query_id = &reports[0].0;
    assert!(!query_id.is_empty(), "{reports:?}");
    let mut named: Vec<&str> = reports.iter().map(|r| r.3.as_str()).collect();
    named.sort_unstable();
    assert_eq!(
        named,
        [
            "cluster.workers[0]",
            "cluster.workers[1]",
            "cluster.workers[2]"
        ],
        "{reports:?}"
    );
    for (id, stage, _, _, _) in &reports {
        assert_eq!((id, *stage), (query_id, reports[0].1), "{reports:?}");
    }
    let read: u64 = reports.iter().map(|r| r.4).sum();
    assert_eq!(read, (FILES * n) as u64, "every row read once: {reports:?}");
}

/// `people` as [`FILES`] Parquet files (which carry row counts and column
/// minimums and maximums DataFusion could plan with), person `i` (id and
/// privacy unit `i`) in every file with a score of `i * scale`.
fn write_people_parquet(dir: &Path, n: usize, scale: i64) {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::parquet::arrow::ArrowWriter;
    use std::sync::Arc;
    std::fs::create_dir_all(dir).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("person", DataType::Int64, false),
        Field::new("city", DataType::Utf8, false),
        Field::new("score", DataType::Int64, false),
    ]));
    for f in 0..FILES {
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| ["Aarhus", "Bergen", "Cork"][i % 3]),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (0..n as i64).map(|i| i * scale),
                )),
            ],
        )
        .unwrap();
        let file = std::fs::File::create(dir.join(format!("part-{f}.parquet"))).unwrap();
        let mut writer = ArrowWriter::try_new(file, schema.clone(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }
}

/// `supplier` may join `people` and `people_plus` on `id` and aggregate.
const JOIN_POLICY: &str = r#"
version: 1
datasets:
  people: { privacy_unit: person }
  people_plus: { privacy_unit: person }
consumers:
  - name: supplier
    match: { organization: Axle Supplier Consortium }
    grants:
      people:
        columns: { id: group_by_only, city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        aggregation: { min_group_size: 2 }
        joins: [ { dataset: people_plus, on: [[id, id]] } ]
      people_plus:
        columns: { id: group_by_only, city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        aggregation: { min_group_size: 2 }
        joins: [ { dataset: people, on: [[id, id]] } ]
"#;

/// The stages `EXPLAIN POLICY` shows follow the query and the deployment,
/// never the data: with the two datasets' sizes swapped, a join has the
/// same stages. (With the files' statistics, DataFusion would build the
/// join's hash table from the smaller input, and the stages would tell
/// which dataset has more rows; a filter's estimate from the columns'
/// minimums and maximums would tell more.)
#[tokio::test]
async fn the_stages_do_not_depend_on_the_data() {
    let workers = Worker::start_many(3);
    let queries = [
        BY_CITY,
        "SELECT p.city, count(*) AS n, sum(q.score) AS total FROM people p \
         JOIN people_plus q ON p.id = q.id GROUP BY p.city",
    ];
    let mut seen = Vec::new();
    for (small, large) in [("people", "people_plus"), ("people_plus", "people")] {
        let (_dir, config, state) = deployment(JOIN_POLICY, 1);
        for (dataset, n) in [(small, 30), (large, 3000)] {
            let dir = config.with_file_name(dataset);
            std::fs::remove_dir_all(&dir).unwrap();
            write_people_parquet(&dir, n, if n == 30 { 1 } else { 7 });
        }
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("format = \"csv\"", "format = \"parquet\"");
        std::fs::write(&config, text).unwrap();
        let daemon = start(&config, &state, &workers);
        let mut stages = Vec::new();
        for sql in queries {
            stages.push(explained_stages(&daemon, "supplier", sql).await);
        }
        // And the join runs as shown: both inputs shuffled on the workers.
        // (With statistics it would gather the smaller one instead, and
        // read the other on the coordinator: one stage.)
        let mut client = daemon.client("supplier").await;
        let (_, joined) = query(&mut client, queries[1])
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.logs()));
        assert!(
            daemon
                .logs()
                .contains("leaf stages sent to workers workers=3 stages=2"),
            "{}",
            daemon.logs()
        );
        let matched: f64 = floats(&joined, 1).iter().sum();
        assert_eq!(matched, (FILES * FILES * 30) as f64, "{stages:?}");
        assert!(
            stages[1].contains("stage 2, on the workers"),
            "{}",
            stages[1]
        );
        seen.push(stages);
    }
    assert_eq!(seen[0], seen[1]);
}

/// A scan that finds no file (here: no partition directory for the region
/// asked about) has the shape of one that finds files: the stages do not
/// tell whether the data has such a region, whatever the query (grouped,
/// a global count DataFusion could answer from "no rows", a join it could
/// plan around an empty side, a limit), and the query runs on the workers
/// either way.
#[tokio::test]
async fn a_scan_that_finds_no_file_has_the_same_stages() {
    let workers = Worker::start_many(3);
    let (dir, config, state) = deployment(JOIN_POLICY, 12);
    let visits = dir.path().join("visits");
    for region in ["north", "east"] {
        write_people(&visits.join(format!("region={region}")), 12);
    }
    std::fs::write(
        dir.path().join("policy.yaml"),
        r#"
version: 1
datasets:
  visits: { privacy_unit: id }
  people: { privacy_unit: id }
consumers:
  - name: supplier
    match: { organization: Axle Supplier Consortium }
    grants:
      visits:
        columns: { region: group_by_only, city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        aggregation: { min_group_size: 2 }
        joins: [ { dataset: people, on: [[city, city]] } ]
      people:
        columns: { city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        aggregation: { min_group_size: 2 }
        joins: [ { dataset: visits, on: [[city, city]] } ]
"#,
    )
    .unwrap();
    std::fs::write(
        &config,
        "[policy]\nfile = \"policy.yaml\"\n\n\
         [[datasets]]\nname = \"people\"\nformat = \"csv\"\npath = \"people\"\n\n\
         [[datasets]]\nname = \"visits\"\nformat = \"csv\"\npath = \"visits\"\n\
         [[datasets.partitions]]\nname = \"region\"\ntype = \"Utf8\"\n",
    )
    .unwrap();
    let daemon = start(&config, &state, &workers);
    let queries = [
        "SELECT city, count(*) AS n FROM visits WHERE region = 'R' GROUP BY city ORDER BY city",
        "SELECT count(*) AS n FROM visits WHERE region = 'R'",
        "SELECT v.city, count(*) AS n, sum(p.score) AS total FROM visits v \
         JOIN people p ON v.city = p.city WHERE v.region = 'R' GROUP BY v.city",
        "SELECT city, count(*) AS n FROM visits WHERE region = 'R' GROUP BY city \
         ORDER BY n DESC LIMIT 2",
    ];
    let mut client = daemon.client("supplier").await;
    for sql in queries {
        let found = explained_stages(&daemon, "supplier", &sql.replace("'R'", "'north'")).await;
        let not_found = explained_stages(&daemon, "supplier", &sql.replace("'R'", "'south'")).await;
        assert!(found.contains("stage 1, on the workers"), "{sql}: {found}");
        assert_eq!(found, not_found, "{sql}");
        // Run, both go to the workers.
        for region in ["north", "south"] {
            let before = daemon.logs().matches("leaf stages sent to workers").count();
            query(&mut client, &sql.replace("'R'", &format!("'{region}'")))
                .await
                .unwrap_or_else(|e| panic!("{sql} ({region}): {e}\n{}", daemon.logs()));
            let after = daemon.logs().matches("leaf stages sent to workers").count();
            assert_eq!(
                after,
                before + 1,
                "{sql} ({region}) did not run on the workers"
            );
        }
    }
    let (_, north) = query(&mut client, &queries[0].replace("'R'", "'north'"))
        .await
        .unwrap();
    assert_eq!(floats(&north, 1), [16.0, 16.0, 16.0]);
    let (_, south) = query(&mut client, &queries[0].replace("'R'", "'south'"))
        .await
        .unwrap();
    assert_eq!(common::rows(&south), 0);
}
