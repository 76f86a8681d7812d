//! Differential privacy through the real daemon over Flight SQL and mTLS:
//! noisy answers with their metadata, the budget ledger (exact under
//! concurrency, never under-recording across SIGKILL), the answer cache, and
//! the attacks the budget exists for.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use common::{Daemon, fetch, floats, query, rows, spent, status};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use tonic::Code;
use tonic::transport::Channel;

/// 40 people in three cities: 14, 13 and 13 (a fourth public key, Dublin,
/// has nobody).
fn people_csv() -> String {
    let mut csv = String::from("id,city,score\n");
    for i in 0..40 {
        csv.push_str(&format!(
            "{i},{},{}\n",
            ["Aarhus", "Bergen", "Cork"][i % 3],
            i * 7
        ));
    }
    csv
}

const POLICY: &str = r#"
version: 1
datasets:
  people:
    privacy_unit: id
consumers:
  - name: planning
    match: { organization: City Planning Agency }
    grants:
      people:
        columns: { city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum, avg, min] }
        comparisons: ["=", "<>", in, and]
        dp:
          epsilon_per_query: 1.0
          default_epsilon: 0.5
          delta_per_query: 1.0e-7
          budget: { epsilon: 3.0, delta: 1.0e-5, period: month }
          max_groups: 1
          max_rows: 1
          columns: { score: { bounds: [0, 300] } }
          public_keys: { city: [Aarhus, Bergen, Cork, Dublin] }
"#;

/// A deployment serving `people` under `policy` in its own state directory.
fn deployment(policy: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    common::people_deployment(&people_csv(), policy)
}

const BY_CITY: &str = "SELECT city, count(*) AS n, sum(score) AS total, avg(score) AS mean FROM people GROUP BY city ORDER BY city";

fn meta<'a>(schema: &'a SchemaRef, key: &str) -> &'a str {
    schema
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("schema metadata {key} missing: {:?}", schema.metadata()))
}

#[tokio::test]
async fn answers_are_noisy_described_charged_and_cached() {
    let (_dir, config, state) = deployment(POLICY);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;

    let (schema, batches) = query(&mut client, BY_CITY).await.unwrap();
    // Public keys: every listed city, the empty one too, and no other.
    assert_eq!(rows(&batches), 4);
    let cities: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column(0), &DataType::Utf8).unwrap();
            c.as_string::<i32>()
                .iter()
                .map(|v| v.unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(cities, ["Aarhus", "Bergen", "Cork", "Dublin"]);
    for (i, name) in ["n", "total", "mean"].iter().enumerate() {
        let field = schema.field(i + 1);
        assert_eq!(field.name(), name);
        let m = field.metadata();
        assert!(
            m["sluice.dp.mechanism"].contains("discrete_laplace"),
            "{m:?}"
        );
        assert!(m["sluice.dp.scale"].parse::<f64>().unwrap() > 0.0, "{m:?}");
        assert!(
            m["sluice.dp.ci95_half_width"].parse::<f64>().unwrap() > 0.0,
            "{m:?}"
        );
        assert!(
            m["sluice.dp.note"].contains("excludes bias from clamping"),
            "{m:?}"
        );
    }
    // count: one statistic of four (count, sum, count(score) for avg…) gets its share.
    let n_eps: f64 = schema.field(1).metadata()["sluice.dp.epsilon"]
        .parse()
        .unwrap();
    let mean_eps: f64 = schema.field(3).metadata()["sluice.dp.epsilon"]
        .parse()
        .unwrap();
    // 10% of the ε goes to the bias estimates (the default `bias_share`).
    let main = 0.5 * 0.9;
    assert!(
        (mean_eps - 2.0 * main / 3.0).abs() < 1e-12,
        "AVG pays for sum and count: {mean_eps}"
    );
    assert!((n_eps - main / 3.0).abs() < 1e-12, "{n_eps}");
    assert!(meta(&schema, "sluice.dp.budget_split").contains("sum(score)"));
    assert_eq!(meta(&schema, "sluice.dp.query_epsilon"), "0.5");
    assert_eq!(meta(&schema, "sluice.dp.remaining_epsilon"), "2.5");
    assert_eq!(meta(&schema, "sluice.dp.cached"), "false");
    // Noise: the exact counts (14, 13, 13, 0) are not all reproduced
    // (each is, with probability 0.083 at scale 6: false alarm 5e-5).
    let counts = floats(&batches, 1);
    assert_ne!(counts, vec![14.0, 13.0, 13.0, 0.0], "no noise added");
    let means = floats(&batches, 3);
    assert!(means.iter().all(|m| (0.0..=300.0).contains(m)), "{means:?}");

    // An identical repeat is the cached answer, at no cost: averaging gains nothing.
    for _ in 0..5 {
        let (again_schema, again) = query(&mut client, BY_CITY).await.unwrap();
        for column in 1..4 {
            assert_eq!(floats(&again, column), floats(&batches, column));
        }
        assert_eq!(meta(&again_schema, "sluice.dp.cached"), "true");
    }
    assert!((spent(daemon.channel("planning").await, "people").await - 0.5).abs() < 1e-9);

    // A chosen ε is a different query: charged anew.
    client.set_header("x-sluice-epsilon", "1");
    let (schema, _) = query(&mut client, BY_CITY).await.unwrap();
    assert_eq!(meta(&schema, "sluice.dp.remaining_epsilon"), "1.5");

    // Above the cap: refused, nothing charged.
    client.set_header("x-sluice-epsilon", "1.5");
    let err = status(client.execute(BY_CITY.into(), None).await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("above the 1 allowed per query"),
        "{}",
        err.message()
    );
    client.set_header("x-sluice-epsilon", "abc");
    let err = status(client.execute(BY_CITY.into(), None).await.unwrap_err());
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Unsupported under DP: says what is supported.
    client.set_header("x-sluice-epsilon", "0.5");
    let err = status(
        client
            .execute("SELECT min(score) FROM people".into(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("supported: COUNT(*)"),
        "{}",
        err.message()
    );
    let err = status(
        client
            .execute("SELECT score FROM people".into(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Differencing: two queries whose filters differ by one person each pay.
    client.set_header("x-sluice-epsilon", "0.75");
    query(
        &mut client,
        "SELECT count(*) FROM people WHERE city <> 'Cork'",
    )
    .await
    .unwrap();
    let (schema, _) = query(
        &mut client,
        "SELECT count(*) FROM people WHERE city IN ('Aarhus', 'Bergen')",
    )
    .await
    .unwrap();
    assert_eq!(meta(&schema, "sluice.dp.remaining_epsilon"), "0");

    // Over budget: RESOURCE_EXHAUSTED naming what remains; a cached repeat still answers.
    let err = status(
        client
            .execute(
                "SELECT count(*) FROM people WHERE city = 'Cork'".into(),
                None,
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("0 ε") && err.message().contains("remain"),
        "{}",
        err.message()
    );
    client.set_header("x-sluice-epsilon", "0.5");
    let (schema, _) = query(&mut client, BY_CITY).await.unwrap();
    assert_eq!(meta(&schema, "sluice.dp.cached"), "true");
    assert!((spent(daemon.channel("planning").await, "people").await - 3.0).abs() < 1e-9);

    // The CLI shows the same ledger.
    let out = common::sluice()
        .args(["budget", "--endpoint", &daemon.endpoint(), "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("privacy budget of City Planning Agency"),
        "{text}"
    );
    assert!(
        text.contains("people (") && text.contains("spent 3 ε"),
        "{text}"
    );
    assert!(
        text.contains("remaining 0 ε") && text.contains("limit 3 ε"),
        "{text}"
    );
}

#[tokio::test]
async fn small_groups_stay_hidden_whatever_the_having_clause() {
    // No public keys: groups are chosen by a noisy threshold. `Solo` has
    // one person; at δ = 1e-7 per query it survives with probability
    // below 1e-7 per query (false-alarm rate of this test: < 1e-5).
    let policy = POLICY
        .replace(
            "public_keys: { city: [Aarhus, Bergen, Cork, Dublin] }",
            "cache: false",
        )
        .replace("epsilon: 3.0", "epsilon: 100.0");
    let (dir, config, state) = deployment(&policy);
    let mut csv = people_csv();
    csv.push_str("1000,Solo,5\n");
    std::fs::write(dir.path().join("people.csv"), csv).unwrap();
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    for sql in [
        "SELECT city, count(*) AS n FROM people GROUP BY city",
        "SELECT city, count(*) AS n FROM people GROUP BY city HAVING count(*) > 0",
        "SELECT city, count(*) AS n FROM people GROUP BY city HAVING count(*) >= 1 ORDER BY n LIMIT 1",
        "SELECT city, sum(score) AS s FROM people WHERE city = 'Solo' GROUP BY city",
    ] {
        for _ in 0..20 {
            let (_, batches) = query(&mut client, sql).await.unwrap();
            for b in &batches {
                let c = cast(b.column(0), &DataType::Utf8).unwrap();
                assert!(
                    c.as_string::<i32>().iter().all(|v| v != Some("Solo")),
                    "{sql}: a one-person group was released"
                );
            }
        }
    }
    drop(dir);
}

#[tokio::test]
async fn a_thousand_concurrent_charges_give_exactly_the_budget() {
    let policy = POLICY
        .replace("epsilon_per_query: 1.0", "epsilon_per_query: 0.01")
        .replace("default_epsilon: 0.5", "default_epsilon: 0.01")
        .replace(
            "budget: { epsilon: 3.0, delta: 1.0e-5, period: month }",
            "budget: { epsilon: 1.0, period: total }\n          cache: false",
        );
    let (_dir, config, state) = deployment(&policy);
    // Every one of the thousand must reach the ledger: a queue long enough
    // that none is shed as busy (tests/overload.rs tests the shedding).
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[limits]\nmax_queued_queries = 1000\nmax_queued_queries_per_organization = 1000\nqueue_timeout = \"5m\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start_isolated(&config, &state);
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(daemon.client("planning").await);
    }
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let sql = "SELECT count(*) FROM people";
            match client.execute(sql.into(), None).await {
                Ok(info) => fetch(&mut client, &info)
                    .await
                    .map(|_| true)
                    .map_err(status),
                Err(e) => Err(status(e)),
            }
        }));
    }
    let mut answered = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => answered += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("budget"), "{s:?}");
            }
        }
    }
    assert_eq!(answered, 100, "1.0 / 0.01 answers, exactly");
    assert!((spent(daemon.channel("planning").await, "people").await - 1.0).abs() < 1e-12);
}

/// Runs queries in a loop until the daemon dies; counts released answers.
async fn storm(
    mut client: FlightSqlServiceClient<Channel>,
    answers: Arc<AtomicUsize>,
    seed: usize,
) {
    for i in 0.. {
        let sql = format!("SELECT count(*) FROM people WHERE city <> 'X{seed}-{i}'");
        let info = match client.execute(sql, None).await {
            Ok(info) => info,
            Err(e) => {
                let s = status(e);
                assert!(
                    matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ),
                    "only the crash may stop the storm: {s:?}"
                );
                return;
            }
        };
        match fetch(&mut client, &info).await {
            Ok(_) => {
                answers.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => return,
        }
    }
}

#[tokio::test]
async fn sigkill_never_leaves_recorded_spend_below_released_answers() {
    let policy = POLICY
        .replace("epsilon_per_query: 1.0", "epsilon_per_query: 0.01")
        .replace("default_epsilon: 0.5", "default_epsilon: 0.01")
        .replace(
            "budget: { epsilon: 3.0, delta: 1.0e-5, period: month }",
            "budget: { epsilon: 1000.0, period: total }\n          cache: false",
        );
    let (_dir, config, state) = deployment(&policy);
    let mut released = 0;
    for (round, after_ms) in [700u64, 1300, 2100].into_iter().enumerate() {
        let mut daemon = Daemon::start_isolated(&config, &state);
        let answers = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for seed in 0..4 {
            let client = daemon.client("planning").await;
            tasks.push(tokio::spawn(storm(
                client,
                answers.clone(),
                round * 10 + seed,
            )));
        }
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        daemon.kill_hard();
        for task in tasks {
            task.await.unwrap();
        }
        released += answers.load(Ordering::SeqCst);
        let daemon = Daemon::start_isolated(&config, &state);
        let recorded = spent(daemon.channel("planning").await, "people").await;
        assert!(
            recorded + 1e-9 >= released as f64 * 0.01,
            "round {round}: {released} answers released but only {recorded} ε recorded"
        );
        assert!(
            answers.load(Ordering::SeqCst) > 0,
            "round {round}: the storm answered nothing"
        );
    }
}

/// The noise as a Flight client receives it follows the distribution the
/// answer's metadata declares: 300 fresh answers (cache off) to a count of
/// 40 people, Kolmogorov–Smirnov against the discrete Laplace of the
/// declared scale, α = 1e-6 (critical D = √(ln(2/α) / 2n) ≈ 0.155). The
/// in-process tests cover power and the full 100,000-answer versions.
#[tokio::test]
async fn noise_received_over_flight_fits_the_declared_distribution() {
    let policy = POLICY
        .replace("default_epsilon: 0.5", "default_epsilon: 0.1")
        .replace(
            "budget: { epsilon: 3.0, delta: 1.0e-5, period: month }",
            "budget: { epsilon: 1000.0, period: total }\n          cache: false",
        );
    let (_dir, config, state) = deployment(&policy);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let n = 300;
    let mut noise = Vec::with_capacity(n);
    let mut scale = 0.0;
    for _ in 0..n {
        let (schema, batches) = query(&mut client, "SELECT count(*) AS n FROM people")
            .await
            .unwrap();
        scale = schema.field(0).metadata()["sluice.dp.scale"]
            .parse::<f64>()
            .unwrap();
        noise.push(floats(&batches, 0)[0] - 40.0);
    }
    // The count gets 90% of ε 0.1; the bias estimates the rest.
    assert!(
        (scale - 1.0 / 0.09).abs() < 1e-6,
        "scale = sensitivity 1 / ε 0.09: {scale}"
    );
    noise.sort_by(f64::total_cmp);
    // Discrete Laplace: P(k) ∝ exp(-|k| / scale). Counts are clamped at 0,
    // so values at -40 stand for "≤ -40" (probability ≈ 0.01).
    let pmf = |k: i64| (-(k.abs() as f64) / scale).exp();
    let total: f64 = (-2000..=2000).map(pmf).sum();
    let cdf = |k: i64| (-2000..=k).map(pmf).sum::<f64>() / total;
    let mut d: f64 = 0.0;
    for k in -40..=200i64 {
        let below = noise.partition_point(|&x| x < k as f64) as f64 / n as f64;
        let at_or_below = noise.partition_point(|&x| x <= k as f64) as f64 / n as f64;
        let model_below = cdf(k - 1);
        let model = cdf(k);
        d = d
            .max((at_or_below - model).abs())
            .max((below - model_below).abs());
    }
    let critical = ((2.0f64 / 1e-6).ln() / (2.0 * n as f64)).sqrt();
    assert!(d < critical, "KS D = {d} ≥ {critical}");
}

/// 1,000 answers through Flight.
async fn counts_over_flight(daemon: &Daemon, n: usize) -> Vec<i64> {
    let mut client = daemon.client("planning").await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, batches) = query(&mut client, "SELECT count(*) AS n FROM people")
            .await
            .unwrap();
        out.push(floats(&batches, 0)[0] as i64);
    }
    out
}

/// The neighbouring-datasets test, smaller and through Flight: two daemons,
/// 40 and 41 people (one more privacy unit), ε = ln 3, 1,000 answers each,
/// six bins. The in-process test (`dp_neighbours.rs`) has the 100,000-answer
/// version; at this size the estimate's own error must be bounded: by
/// Weissman's inequality, ‖p̂ − p‖₁ ≥ t with probability at most
/// (2^k − 2)·e^(−n t²/2), so with t for a false-alarm rate of 1e-7 per sample,
/// δ̂ ≤ δ + t·(1 + e^ε) always holds but for 2e-7. An answer without noise
/// (δ̂ = 1) fails it.
#[tokio::test]
async fn neighbouring_datasets_over_flight_stay_within_ln3() {
    let policy = POLICY
        .replace("epsilon_per_query: 1.0", "epsilon_per_query: 2.0")
        .replace(
            "default_epsilon: 0.5",
            "default_epsilon: 1.0986122886681098",
        )
        .replace(
            "budget: { epsilon: 3.0, delta: 1.0e-5, period: month }",
            "budget: { epsilon: 100000.0, period: total }\n          cache: false",
        );
    let (_dir_a, config_a, state_a) = deployment(&policy);
    let (dir_b, config_b, state_b) = deployment(&policy);
    let mut csv = people_csv();
    csv.push_str("999,Aarhus,70\n");
    std::fs::write(dir_b.path().join("people.csv"), csv).unwrap();
    let without = Daemon::start_isolated(&config_a, &state_a);
    let with = Daemon::start_isolated(&config_b, &state_b);
    let n = 1000;
    let (a, b) = tokio::join!(
        counts_over_flight(&without, n),
        counts_over_flight(&with, n)
    );
    // Bins: ≤ 37, 38, 39, 40, 41, ≥ 42 (true counts 40 and 41).
    common::assert_within_ln3(&a, &b, 37);
}

/// 600,000 visits by 200,000 people (three each, to three sites) to 500
/// sites of 1,200 visits each.
fn visits_csv() -> String {
    let mut csv = String::with_capacity(600_000 * 20);
    csv.push_str("id,city,score\n");
    for i in 0..600_000u64 {
        let (person, visit) = (i % 200_000, i / 200_000);
        let site = (person * 7 + visit) % 500;
        csv.push_str(&format!("{person},s{site},{}\n", i % 300));
    }
    csv
}

/// Private selection of `city` (no public keys), three groups per person.
const VISITS_POLICY: &str = r#"
version: 1
datasets:
  people:
    privacy_unit: id
consumers:
  - name: planning
    match: { organization: City Planning Agency }
    grants:
      people:
        columns: { city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        dp:
          epsilon_per_query: 1.0
          delta_per_query: 1.0e-7
          max_groups: 3
          max_rows: 2
          cache: false
          columns: { score: { bounds: [0, 300] } }
"#;

/// The visits deployment with `limits` in its configuration.
fn visits_deployment(limits: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, config, state) = common::people_deployment(&visits_csv(), VISITS_POLICY);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("[limits]\n{limits}\n\n{text}")).unwrap();
    (dir, config, state)
}

const BY_SITE: &str = "SELECT city, count(*) AS n, sum(score) AS total FROM people GROUP BY city";

/// The statistics plan of a DP GROUP BY holds every (person, site) cell and
/// every person's kept groups: more than a small `query_memory`. Without
/// spilling the answer is withheld (its budget charged); with it, the
/// aggregations spill to `<state_dir>/spill` and the answer arrives.
#[tokio::test]
async fn a_private_group_by_larger_than_its_memory_spills_to_disk() {
    let limits = "query_memory = \"24MiB\"\ntotal_query_memory = \"64MiB\"";
    let (_off, config, state) = visits_deployment(&format!("{limits}\nspill_space = \"0\""));
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let err = status(query(&mut client, BY_SITE).await.unwrap_err());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("could not be computed"),
        "{}",
        err.message()
    );
    drop(daemon);

    let (_on, config, state) = visits_deployment(&format!("{limits}\nspill_space = \"1GiB\""));
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let (schema, batches) = match query(&mut client, BY_SITE).await {
        Ok(answer) => answer,
        Err(e) => panic!("{e:?}\n{}", daemon.logs()),
    };
    // 500 sites of 1,200 visits each: all pass the threshold (about 220).
    assert_eq!(rows(&batches), 500);
    assert!(
        schema
            .field(1)
            .metadata()
            .contains_key("sluice.dp.ci95_half_width")
    );
    // The daemon's own spill directory, `spill/p<pid>`.
    let own: Vec<_> = std::fs::read_dir(state.join("spill"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(own.len() == 1 && own[0].starts_with('p'), "{own:?}");
}
