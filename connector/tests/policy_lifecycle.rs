//! The policy as an operator lives with it: quotas that hold under
//! concurrency and across restarts, reloads that revoke outstanding tickets,
//! broken edits that are refused while the old policy stays in force, and
//! validity windows.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, fetch, query, rows, status};
use tonic::Code;

const POLICY: &str = r#"
version: 1
datasets:
  people:
    privacy_unit: id
consumers:
  - name: planning
    match: { organization: City Planning Agency }
    quotas: { queries_per_day: 12 }
    grants:
      people:
        columns: { city: raw, score: aggregate_only }
        aggregation: { min_group_size: 2 }
"#;

/// A config serving one small CSV dataset under `policy`, in its own
/// state directory.
fn deployment(policy: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let mut csv = String::from("id,city,score\n");
    for i in 0..30 {
        csv.push_str(&format!(
            "{i},{},{}\n",
            ["Aarhus", "Bergen", "Cork"][i % 3],
            i * 10
        ));
    }
    common::people_deployment(&csv, policy)
}

const SQL: &str =
    "SELECT city, count(*) AS n, sum(score) AS s FROM people GROUP BY city ORDER BY city";

#[tokio::test]
async fn concurrent_queries_cannot_race_past_the_quota_and_it_survives_a_restart() {
    let (_dir, config, state) = deployment(POLICY);
    let mut daemon = Daemon::start_isolated(&config, &state);
    let mut tasks = Vec::new();
    // Each query is issued (GetFlightInfo holds one of the day's queries)
    // and redeemed (DoGet counts it for good).
    for _ in 0..30 {
        let mut client = daemon.client("planning").await;
        tasks.push(tokio::spawn(async move {
            let info = client.execute(SQL.into(), None).await.map_err(status)?;
            fetch(&mut client, &info).await.map_err(status)
        }));
    }
    let mut granted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => granted += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("12 queries"), "{}", s.message());
            }
        }
    }
    assert_eq!(granted, 12, "exactly the quota is granted");

    daemon.terminate();
    daemon
        .wait(Duration::from_secs(20))
        .expect("the daemon stops");
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let err = status(client.execute(SQL.into(), None).await.unwrap_err());
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "the count is kept across restarts: {err:?}"
    );
}

#[tokio::test]
async fn a_reload_revokes_outstanding_tickets_and_a_broken_edit_keeps_the_old_policy() {
    let (dir, config, state) =
        deployment(&POLICY.replace("queries_per_day: 12", "queries_per_day: 1000"));
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let (_, got) = query(&mut client, SQL).await.unwrap();
    assert_eq!(rows(&got), 3);

    // A ticket issued under the old policy…
    let info = client.execute(SQL.into(), None).await.unwrap();
    // …is refused once a new policy is in force.
    let stricter = POLICY
        .replace("queries_per_day: 12", "queries_per_day: 1000")
        .replace("score: aggregate_only", "score: hidden");
    write_policy(dir.path(), &stricter);
    daemon.hangup();
    wait_for_log(&daemon, "usage policy reloaded").await;
    let err = status(fetch(&mut client, &info).await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("policy changed"),
        "{}",
        err.message()
    );
    // The new rules apply: the hidden column no longer exists for the
    // caller.
    let err = status(client.execute(SQL.into(), None).await.unwrap_err());
    assert!(
        err.message().contains("No field named score"),
        "the new rules apply: {}",
        err.message()
    );

    // A broken file is refused, with its line; the policy in force stays.
    write_policy(
        dir.path(),
        "version: 1\nconsumers:\n  - name: x\n    match: {}\n",
    );
    daemon.hangup();
    wait_for_log(&daemon, "was refused").await;
    assert!(daemon.logs().contains("policy.yaml:4"), "{}", daemon.logs());
    let (_, got) = query(
        &mut client,
        "SELECT city, count(*) AS n FROM people GROUP BY city",
    )
    .await
    .unwrap();
    assert_eq!(rows(&got), 3, "the previous policy still answers");
}

#[tokio::test]
async fn outside_the_validity_window_is_a_failed_precondition() {
    let expired = POLICY.replace(
        "aggregation: { min_group_size: 2 }",
        "aggregation: { min_group_size: 2 }\n        valid_until: \"2020-01-01T00:00:00Z\"",
    );
    let (_dir, config, state) = deployment(&expired);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let err = status(client.execute(SQL.into(), None).await.unwrap_err());
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("expired at 2020-01-01"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_principal_no_consumer_matches_is_refused() {
    let (_dir, config, state) = deployment(POLICY);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("supplier").await;
    let err = status(client.execute(SQL.into(), None).await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("no consumer in the usage policy matches"),
        "{}",
        err.message()
    );
}

#[test]
fn a_broken_policy_stops_the_start_naming_file_line_and_field() {
    let (_dir, config, state) =
        deployment(&POLICY.replace("score: aggregate_only", "score: aggregated"));
    let out = common::sluice()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--config",
        ])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("policy.yaml"), "{stderr}");
    assert!(stderr.contains("aggregated"), "{stderr}");
    assert!(
        stderr.contains("policy.yaml:12"),
        "the line is named: {stderr}"
    );
}

fn write_policy(dir: &Path, text: &str) {
    let tmp = dir.join("policy.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("policy.yaml")).unwrap();
}

async fn wait_for_log(daemon: &Daemon, text: &str) {
    for _ in 0..100 {
        if daemon.logs().contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the daemon never logged {text:?}:\n{}", daemon.logs());
}

#[tokio::test]
async fn without_a_policy_every_query_is_refused() {
    let (dir, _, state) = deployment(POLICY);
    let config = dir.path().join("no-policy.toml");
    std::fs::write(
        &config,
        "[[datasets]]\nname = \"people\"\nformat = \"csv\"\npath = \"people.csv\"\n",
    )
    .unwrap();
    let daemon = Daemon::start_isolated(&config, &state);
    let mut client = daemon.client("planning").await;
    let err = status(client.execute("SELECT 1".into(), None).await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("no usage policy is configured"),
        "{}",
        err.message()
    );
    assert!(
        daemon.banner().contains("every query is refused"),
        "{}",
        daemon.banner()
    );
}
