//! Execution slots and the query runtime are shared fairly between
//! organizations: while one floods the connector with heavy queries,
//! another's small query still answers within a second. (Its own test
//! binary, so that no other test's daemon competes for the CPU.)

mod common;

use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use common::{Daemon, query, rows};

const POLICY: &str = r#"
version: 1
datasets:
  people: {}
consumers:
  - name: planning
    match: { organization: City Planning Agency }
    grants:
      people:
        columns: { n: raw, city: raw }
        allow: [self_join]
        joins:
          - { dataset: people, on: [[city, city]] }
  - name: suppliers
    match: { organization: Axle Supplier Consortium }
    grants:
      people:
        columns: { n: raw, city: raw }
"#;

fn deployment(limits: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = common::temp_dir();
    let d = dir.path();
    let mut csv = String::from("n,city\n");
    for i in 0..60 {
        csv.push_str(&format!("{i},{}\n", ["Aarhus", "Bergen", "Cork"][i % 3]));
    }
    std::fs::write(d.join("people.csv"), csv).unwrap();
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

#[tokio::test]
async fn another_organizations_small_query_answers_while_one_floods_the_slots() {
    let (_dir, config, state) = deployment(
        "max_concurrent_queries = 4\nmax_concurrent_queries_per_organization = 2\nquery_timeout = \"20s\"",
    );
    let daemon = Daemon::start_isolated(&config, &state);
    // The suppliers connect first: a TLS handshake is not what is measured.
    let mut supplier = daemon.client("supplier").await;
    query(&mut supplier, "SELECT n FROM people WHERE n = 2")
        .await
        .unwrap();
    // Planning sends eight heavy queries at once (a self-join that runs
    // until its deadline); they take at most 2 of the 4 slots.
    let heavy = "SELECT count(*) FROM people a JOIN people b ON a.city = b.city \
                 JOIN people c ON b.city = c.city JOIN people d ON c.city = d.city \
                 JOIN people e ON d.city = e.city JOIN people f ON e.city = f.city \
                 JOIN people g ON f.city = g.city JOIN people h ON g.city = h.city";
    let mut floods = Vec::new();
    for _ in 0..8 {
        let channel = daemon.channel("planning").await;
        floods.push(tokio::spawn(async move {
            let mut client = FlightSqlServiceClient::new(channel);
            let _ = query(&mut client, heavy).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The suppliers' small query does not wait behind them.
    for _ in 0..5 {
        let started = Instant::now();
        let (_, batches) = query(&mut supplier, "SELECT n FROM people WHERE n = 1")
            .await
            .unwrap();
        assert_eq!(rows(&batches), 1);
        eprintln!("the other organization's query: {:?}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?} behind another organization's queries",
            started.elapsed()
        );
    }
    for flood in floods {
        flood.abort();
    }
}
