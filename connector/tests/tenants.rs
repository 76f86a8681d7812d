//! One tenant cannot lock out the others: capacity that all consumers share
//! (outstanding tickets, prepared statements, execution slots, the daily
//! row quota of an organization, the privacy budget) is capped per
//! principal and per organization as well as in all, a refusal that costs
//! nothing takes nothing, and whatever a query reserved comes back on every
//! path that does not use it. Through the real binary over mTLS.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use common::{Daemon, fetch, query, rows, status};
use sluice_proto::v1::GetBudgetRequest;
use sluice_proto::v1::budget_service_client::BudgetServiceClient;
use tonic::Code;
use tonic::transport::Channel;

/// 60 people in three cities; `n` numbers the rows (the privacy unit
/// `id` is not for any consumer to read).
fn people_csv() -> String {
    let mut csv = String::from("id,n,city,score\n");
    for i in 0..60 {
        csv.push_str(&format!(
            "p{i},{i},{},{i}\n",
            ["Aarhus", "Bergen", "Cork"][i % 3]
        ));
    }
    csv
}

/// Planning and the suppliers read rows (the suppliers at most 10 a day);
/// research gets DP answers. The admin certificate matches no consumer.
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
        columns: { n: raw, city: raw, score: raw }
        allow: [self_join]
        joins:
          - { dataset: people, on: [[city, city]] }
  - name: suppliers
    match: { organization: Axle Supplier Consortium }
    quotas: { rows_per_day: 10 }
    grants:
      people:
        columns: { n: raw, city: raw, score: raw }
  - name: research
    match: { organization: City Research Institute }
    grants:
      people:
        columns: { city: group_by_only, score: aggregate_only }
        dp:
          epsilon_per_query: 1.0
          default_epsilon: 0.25
          budget: { epsilon: 5.0, delta: 1.0e-5, period: month }
          max_groups: 1
          max_rows: 1
          columns: { score: { bounds: [0, 100] } }
          public_keys: { city: [Aarhus, Bergen, Cork] }
"#;

/// A deployment of `people` under [`POLICY`] with these `[limits]`.
fn deployment(limits: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = common::temp_dir();
    let d = dir.path();
    std::fs::write(d.join("people.csv"), people_csv()).unwrap();
    std::fs::write(d.join("policy.yaml"), POLICY).unwrap();
    let config = d.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\n{limits}\n\n[policy]\nfile = \"policy.yaml\"\n\n\
             [[datasets]]\nname = \"people\"\nformat = \"csv\"\npath = \"people.csv\"\n"
        ),
    )
    .unwrap();
    let state = d.join("state");
    (dir, config, state)
}

const EXPLAIN: &str = "EXPLAIN POLICY SELECT city, score FROM people";

/// GetFlightInfo until the first refusal; returns how many were granted and
/// the refusal.
async fn flood(client: &mut FlightSqlServiceClient<Channel>, n: usize) -> (usize, tonic::Status) {
    for granted in 0..n {
        if let Err(e) = client.execute(EXPLAIN.to_string(), None).await {
            return (granted, status(e));
        }
    }
    panic!("{n} tickets granted without a refusal");
}

#[tokio::test]
async fn a_stranger_takes_no_tickets_and_a_flooding_consumer_only_its_own_share() {
    let (_dir, config, state) = deployment(
        "max_outstanding_tickets = 30\nmax_outstanding_tickets_per_organization = 20\nmax_outstanding_tickets_per_principal = 20",
    );
    let daemon = Daemon::start_isolated(&config, &state);
    // The admin certificate matches no consumer: every request is refused
    // at once, and none holds a ticket.
    let mut stranger = daemon.client("admin").await;
    for _ in 0..200 {
        let refused = status(
            stranger
                .execute(EXPLAIN.to_string(), None)
                .await
                .unwrap_err(),
        );
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("deny-by-default"), "{refused:?}");
    }
    // A consumer that floods gets its own 20 and no more…
    let mut supplier = daemon.client("supplier").await;
    let (granted, refused) = flood(&mut supplier, 100).await;
    assert_eq!(granted, 20);
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("limits.max_outstanding_tickets_per_principal"),
        "{refused:?}"
    );
    // …and the other tenants still get theirs: 10 left in all.
    let mut planning = daemon.client("planning").await;
    let (granted, refused) = flood(&mut planning, 100).await;
    assert_eq!(granted, 10);
    assert!(
        refused
            .message()
            .contains("limits.max_outstanding_tickets)"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn rows_are_charged_as_they_leave_and_never_past_the_day() {
    let (_dir, config, state) = deployment("");
    let daemon = Daemon::start_isolated(&config, &state);
    let mut supplier = daemon.client("supplier").await;
    let six = "SELECT n, city FROM people WHERE n < 6 ORDER BY n";
    // A ticket that is never redeemed holds no rows…
    let unredeemed = supplier.execute(six.to_string(), None).await.unwrap();
    // …so another query of the organization gets all its rows…
    let (_, batches) = query(&mut supplier, six).await.unwrap();
    assert_eq!(rows(&batches), 6);
    // …and one that wants more than the 4 left gets 4, then the refusal.
    let info = supplier.execute(six.to_string(), None).await.unwrap();
    let mut stream = supplier.do_get(common::ticket(&info)).await.unwrap();
    let mut received = 0;
    let error = loop {
        use futures::TryStreamExt;
        match stream.try_next().await {
            Ok(Some(batch)) => received += batch.num_rows(),
            Ok(None) => panic!("the stream ended without the quota's refusal"),
            Err(e) => break status(e),
        }
    };
    assert_eq!(received, 4);
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("quotas.rows_per_day")
            && error.message().contains("cut off after 4 rows"),
        "{error:?}"
    );
    // The day is used up: the unredeemed ticket gets nothing either, and a
    // new query is refused at once.
    let late = status(fetch(&mut supplier, &unredeemed).await.unwrap_err());
    assert_eq!(late.code(), Code::ResourceExhausted, "{late:?}");
    let refused = status(supplier.execute(six.to_string(), None).await.unwrap_err());
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Restarted, the connector remembers: rows are on disk before they leave.
    drop(supplier);
    drop(daemon);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut supplier = daemon.client("supplier").await;
    let refused = status(supplier.execute(six.to_string(), None).await.unwrap_err());
    assert!(
        refused.message().contains("10 rows for today"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn concurrent_analysts_of_one_organization_all_get_their_small_answers() {
    let (_dir, config, state) = deployment("");
    let daemon = Daemon::start_isolated(&config, &state);
    // Ten rows a day, and 8 analysts at once each asking for one: each gets
    // its row (an earlier design reserved the whole day's rows for the
    // first query in flight and refused the rest).
    let mut tasks = Vec::new();
    for i in 0..8 {
        let channel = daemon.channel("supplier").await;
        tasks.push(tokio::spawn(async move {
            let mut client = FlightSqlServiceClient::new(channel);
            let sql = format!("SELECT n FROM people WHERE n = {i}");
            query(&mut client, &sql).await.map(|(_, b)| rows(&b))
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().expect("every analyst is answered"), 1);
    }
}

async fn epsilon_spent(daemon: &Daemon) -> f64 {
    let mut budget = BudgetServiceClient::new(daemon.channel("research").await);
    let response = budget
        .get_budget(GetBudgetRequest {
            dataset: "people".into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.budgets.first().map_or(0.0, |b| b.epsilon_spent)
}

#[tokio::test]
async fn a_budget_reservation_comes_back_on_every_path_that_reads_nothing() {
    let (_dir, config, state) =
        deployment("ticket_ttl = \"2s\"\nmax_outstanding_tickets_per_principal = 2");
    let daemon = Daemon::start_isolated(&config, &state);
    let mut research = daemon.client("research").await;
    let sql = |city: &str| format!("SELECT count(*) FROM people WHERE city = '{city}'");
    // Two tickets held: 0.5 ε reserved.
    research.execute(sql("Aarhus"), None).await.unwrap();
    research.execute(sql("Bergen"), None).await.unwrap();
    assert!((epsilon_spent(&daemon).await - 0.5).abs() < 1e-9);
    // A third cannot be held: refused before anything is reserved.
    let refused = status(research.execute(sql("Cork"), None).await.unwrap_err());
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!((epsilon_spent(&daemon).await - 0.5).abs() < 1e-9);
    // Once the two expire unredeemed, their reservations come back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let info = research.execute(sql("Cork"), None).await.unwrap();
    assert!(
        (epsilon_spent(&daemon).await - 0.25).abs() < 1e-9,
        "{}",
        epsilon_spent(&daemon).await
    );
    // Redeemed, the charge stands.
    fetch(&mut research, &info).await.unwrap();
    assert!((epsilon_spent(&daemon).await - 0.25).abs() < 1e-9);
}

#[tokio::test]
async fn prepared_statements_are_capped_per_principal() {
    let (_dir, config, state) = deployment("max_prepared_statements = 3");
    let daemon = Daemon::start_isolated(&config, &state);
    let mut supplier = daemon.client("supplier").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            supplier
                .prepare("SELECT n FROM people WHERE n = ?".into(), None)
                .await
                .unwrap(),
        );
    }
    let refused = status(
        supplier
            .prepare("SELECT n FROM people WHERE n = ?".into(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limits.max_prepared_statements"),
        "{refused:?}"
    );
    // Another principal prepares as usual.
    let mut planning = daemon.client("planning").await;
    planning
        .prepare("SELECT n FROM people WHERE n = ?".into(), None)
        .await
        .unwrap();
}
