//! The `sluice` command line as a newcomer and an operator use it: the query
//! client's formats, config files with every dataset kind, and config errors
//! that name the file, the field and the problem.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use common::{Daemon, query, render, sluice};

fn client(daemon: &Daemon, args: &[&str]) -> Output {
    sluice()
        .args(args)
        .args(["--endpoint", &daemon.endpoint(), "--state-dir"])
        .arg(&daemon.state_dir)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test]
async fn first_start_creates_the_pki_and_demo_data_and_explains_itself() {
    let dir = common::temp_dir();
    let state = dir.path().join("fresh-state");
    let daemon = Daemon::start_fresh(&state);
    for file in [
        "pki/ca.pem",
        "pki/ca.key",
        "pki/server.pem",
        "pki/server.key",
        "pki/planning.pem",
        "pki/planning.key",
        "pki/supplier.pem",
        "pki/supplier.key",
        "data/trips.parquet",
        "data/machine_events.csv",
    ] {
        assert!(state.join(file).is_file(), "{file} missing");
    }
    // The banner is complete once the Python snippet's last line is out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !daemon.banner().contains("fetch_arrow_table") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let banner = daemon.banner();
    assert!(
        banner.contains(&format!("--endpoint {}", daemon.endpoint())),
        "{banner}"
    );
    assert!(banner.contains("query --state-dir"), "{banner}");
    assert!(banner.contains("adbc_driver_flightsql"), "{banner}");
    // The demo data is there and identical to the shared, separately created copy.
    // Under the demo policy: aggregates only, ferries filtered out, k = 10.
    let mut client = daemon.client("planning").await;
    client.set_header("x-sluice-purpose", "research");
    let (_, got) = query(
        &mut client,
        "SELECT mode, count(*) AS n, round(sum(fare_eur), 2) AS fares FROM trips GROUP BY mode ORDER BY mode",
    )
    .await
    .unwrap();
    let want = common::datafusion_answer(
        &common::shared_state_dir(),
        "SELECT mode, count(*) AS n, round(sum(fare_eur), 2) AS fares FROM trips WHERE mode <> 'ferry' GROUP BY mode HAVING count(DISTINCT card_id) >= 10 ORDER BY mode",
    )
    .await;
    assert_eq!(render(&got), render(&want));
    assert!(
        state.join("policy.yaml").is_file(),
        "the demo policy is written"
    );
}

#[test]
fn query_prints_table_csv_json_and_arrow() {
    let daemon = Daemon::start();
    let sql = "SELECT mode, count(*) AS n FROM trips GROUP BY mode ORDER BY mode";

    let table = stdout(&client(&daemon, &["query", sql]));
    assert!(table.contains("| mode"), "{table}");
    assert!(table.contains("| bus"), "{table}");
    assert!(table.trim_end().ends_with("row(s)"), "{table}");

    let csv = stdout(&client(&daemon, &["query", "--format", "csv", sql]));
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("mode,n"));
    let total: u64 = lines
        .map(|l| l.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 1_000_000);

    let json = stdout(&client(&daemon, &["query", "-f", "json", sql]));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert!(
        rows.iter()
            .all(|r| r["mode"].is_string() && r["n"].is_u64()),
        "{json}"
    );

    let arrow = client(&daemon, &["query", "-f", "arrow", sql]);
    assert!(arrow.status.success());
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
        std::io::Cursor::new(arrow.stdout),
        None,
    )
    .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    assert_eq!(common::rows(&batches), rows.len());
}

#[test]
fn query_reads_sql_from_stdin_and_reports_errors_by_status() {
    let daemon = Daemon::start();
    let mut child = sluice()
        .args([
            "query",
            "--format",
            "csv",
            "--endpoint",
            &daemon.endpoint(),
            "--state-dir",
        ])
        .arg(&daemon.state_dir)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT 40 + 2 AS answer")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "answer\n42\n");

    let out = client(&daemon, &["query", "SELECT * FROM nowhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NOT_FOUND") || err.contains("NotFound"),
        "{err}"
    );
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn tables_and_whoami() {
    let daemon = Daemon::start();
    let tables = stdout(&client(&daemon, &["tables"]));
    assert!(tables.contains("machine_events"), "{tables}");
    assert!(tables.contains("trips"), "{tables}");
    assert!(tables.contains("fare_eur"), "{tables}");

    let me = stdout(&client(&daemon, &["whoami", "--identity", "supplier"]));
    assert!(
        me.contains("spiffe://sluice.demo/org/axle-suppliers"),
        "{me}"
    );
    assert!(me.contains("Axle Supplier Consortium"), "{me}");
}

#[test]
fn the_client_explains_a_missing_server() {
    let out = sluice()
        .args([
            "query",
            "--endpoint",
            "grpc+tls://127.0.0.1:1",
            "--state-dir",
        ])
        .arg(common::shared_state_dir())
        .arg("SELECT 1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Writes `text` to `dir/sluice.toml` and runs `sluice config check` on it.
fn check(dir: &Path, text: &str) -> Output {
    let file = dir.join("sluice.toml");
    std::fs::write(&file, text).unwrap();
    sluice()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap()
}

#[test]
fn bad_config_names_the_file_the_field_and_the_problem() {
    let dir = common::temp_dir();
    let parquet = common::shared_state_dir().join("data/trips.parquet");
    let dataset = format!(
        "[[datasets]]\nname = \"trips\"\nformat = \"parquet\"\npath = \"{}\"\n",
        parquet.display()
    );
    let cases = [
        (
            "[server]\nlisten = \"localhost\"\n",
            "server.listen",
            "IP:PORT",
        ),
        ("[server]\nlsten = \"127.0.0.1:1\"\n", "server", "lsten"),
        (
            "[limits]\nquery_timeout = \"soon\"\n",
            "limits.query_timeout",
            "soon",
        ),
        (
            "[limits]\nquery_memory = \"12 parsecs\"\n",
            "limits.query_memory",
            "parsecs",
        ),
        (
            "[limits]\nmax_concurrent_queries = 0\n",
            "limits.max_concurrent_queries",
            "at least 1",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format", "xml"),
        (
            "[[datasets]]\nname = \"Trips!\"\nformat = \"parquet\"\npath = \"x\"\n",
            "datasets[0].name",
            "not a valid table name",
        ),
        (
            "[[datasets]]\nname = \"t\"\nformat = \"avro\"\npath = \"x\"\n",
            "datasets[0].format",
            "avro",
        ),
        (
            "[[datasets]]\nname = \"t\"\nformat = \"csv\"\npath = \"/nonexistent/t.csv\"\n",
            "datasets[0].path",
            "/nonexistent/t.csv",
        ),
        (
            "[[datasets]]\nname = \"t\"\nformat = \"csv\"\npath = \"x\"\nschema = [{ name = \"a\", type = \"Integer\" }]\n",
            "datasets[0].schema[0].type",
            "not an Arrow type",
        ),
        (
            &format!("{dataset}\n{dataset}"),
            "datasets[1].name",
            "defined twice",
        ),
        (
            "[tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_ca = \"ca.pem\"\n",
            "tls.cert",
            "no such file",
        ),
        ("this is not toml", "", "sluice.toml"),
    ];
    let mut wrong = Vec::new();
    for (text, field, reason) in cases {
        let out = check(dir.path(), text);
        let err = String::from_utf8_lossy(&out.stderr);
        let ok = !out.status.success()
            && err.contains("sluice.toml")
            && err.contains(field)
            && err.contains(reason)
            && !err.contains("panicked");
        if !ok {
            wrong.push(format!(
                "{text:?}: wanted `{field}` and `{reason}`, got: {err}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // `serve` refuses the same file with the same message and a failure exit.
    std::fs::write(
        dir.path().join("sluice.toml"),
        "[limits]\nquery_timeout = \"soon\"\n",
    )
    .unwrap();
    let out = sluice()
        .args(["serve", "--config"])
        .arg(dir.path().join("sluice.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.query_timeout"), "{err}");
}

#[tokio::test]
async fn datasets_from_csv_json_parquet_files_and_directories() {
    let dir = common::temp_dir();
    let d = dir.path();
    std::fs::create_dir(d.join("readings")).unwrap();
    std::fs::write(
        d.join("readings/a.json"),
        "{\"sensor\":\"s1\",\"value\":1.5}\n{\"sensor\":\"s2\",\"value\":2.5}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("readings/b.json"),
        "{\"sensor\":\"s1\",\"value\":4.0}\n",
    )
    .unwrap();
    std::fs::write(d.join("readings/ignored.txt"), "not json").unwrap();
    std::fs::write(d.join("stations.tsv"), "id\tname\n1\tNorth\n2\tSouth\n").unwrap();
    std::fs::create_dir(d.join("trips")).unwrap();
    std::fs::copy(
        common::shared_state_dir().join("data/trips.parquet"),
        d.join("trips/part-0.parquet"),
    )
    .unwrap();
    std::fs::write(
        d.join("sluice.toml"),
        "[[datasets]]\nname = \"readings\"\nformat = \"json\"\npath = \"readings\"\n\n\
         [[datasets]]\nname = \"stations\"\nformat = \"csv\"\npath = \"stations.tsv\"\ncsv = { delimiter = \"\\t\" }\n\
         schema = [{ name = \"id\", type = \"Int32\", nullable = false }, { name = \"name\", type = \"Utf8\" }]\n\n\
         [[datasets]]\nname = \"trips\"\nformat = \"parquet\"\npath = \"trips\"\n\n\
         [policy]\nfile = \"policy.yaml\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("policy.yaml"),
        "version: 1\ndatasets:\n  readings: {}\n  stations: {}\n  trips: {}\n\
         consumers:\n  - name: planning\n    match: { organization: City Planning Agency }\n    grants:\n\
         \x20     readings: { columns: { sensor: raw, value: raw } }\n\
         \x20     stations: { columns: { id: raw, name: raw } }\n\
         \x20     trips: { columns: { mode: raw } }\n",
    )
    .unwrap();
    let daemon = Daemon::start_config(&d.join("sluice.toml"));
    let mut client = daemon.client("planning").await;

    let (_, got) = query(
        &mut client,
        "SELECT sensor, sum(value) AS total FROM readings GROUP BY sensor ORDER BY sensor",
    )
    .await
    .unwrap();
    assert_eq!(
        render(&got),
        "+--------+-------+\n| sensor | total |\n+--------+-------+\n| s1     | 5.5   |\n| s2     | 2.5   |\n+--------+-------+"
    );
    let (schema, got) = query(&mut client, "SELECT * FROM stations ORDER BY id")
        .await
        .unwrap();
    assert_eq!(
        schema.field(0).data_type(),
        &datafusion::arrow::datatypes::DataType::Int32
    );
    assert!(!schema.field(0).is_nullable());
    assert_eq!(common::rows(&got), 2);
    let (_, got) = query(&mut client, "SELECT count(*) AS n FROM trips")
        .await
        .unwrap();
    assert_eq!(
        render(&got),
        "+---------+\n| n       |\n+---------+\n| 1000000 |\n+---------+"
    );
}

#[test]
fn config_check_compiles_the_policy_too() {
    let dir = common::temp_dir();
    let parquet = common::shared_state_dir().join("data/trips.parquet");
    let config = format!(
        "[policy]\nfile = \"policy.yaml\"\n\n[[datasets]]\nname = \"trips\"\nformat = \"parquet\"\npath = \"{}\"\n",
        parquet.display()
    );
    let good = "version: 1\ndatasets:\n  trips: {}\nconsumers:\n  - name: a\n    match: { organization: A }\n    grants:\n      trips: { columns: { mode: raw } }\n";
    std::fs::write(dir.path().join("policy.yaml"), good).unwrap();
    let out = check(dir.path(), &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("policy.yaml sha256:"), "{stdout}");

    let bad = good.replace("mode: raw", "mode: raw, colour: raw");
    std::fs::write(dir.path().join("policy.yaml"), bad).unwrap();
    let out = check(dir.path(), &config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("policy.yaml:8"), "{err}");
    assert!(
        err.contains("consumers[0].grants.trips.columns.colour"),
        "{err}"
    );
    assert!(err.contains("no column `colour`"), "{err}");
}
