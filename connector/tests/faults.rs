//! Faults injected around the real daemon, over real mTLS:
//!
//! - a full disk under the state directory (a small tmpfs mounted by the
//!   test, filled until ENOSPC): nothing leaves without its records, every
//!   query gets a clear UNAVAILABLE, and the daemon recovers when space
//!   returns, with a chain that verifies and a ledger that holds what was
//!   released; agreement requests and decisions are UNAVAILABLE too, and
//!   one the store could not write changed nothing;
//! - damaged or unreadable state files at start (ledger, quota counters,
//!   agreements, audit log, policy, keys): the daemon refuses to start,
//!   naming the file and what to do, and changes nothing;
//! - a wall clock that jumps (libfaketime, monotonic clock untouched, as an
//!   NTP step does) across a budget period and past a ticket's expiry;
//! - a data file deleted or truncated between GetFlightInfo and DoGet, or
//!   while a result streams.
//!
//! The full-disk test mounts a tmpfs and needs root (`mount -t tmpfs`); the
//! clock tests need Debian's `faketime` package (`tests/run.sh` installs
//! it). Either missing fails the test, saying so.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arrow_flight::FlightInfo;
use arrow_flight::sql::client::FlightSqlServiceClient;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use common::{Daemon, status};
use futures::TryStreamExt;
use sluice_proto::v1::GetBudgetRequest;
use sluice_proto::v1::budget_service_client::BudgetServiceClient;
use tonic::Code;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------
// A deployment: `people` (40 people, DP for the planning agency, rows for
// the supplier) and `events` (a large CSV the supplier reads row by row).
// ---------------------------------------------------------------------------

const CITIES: [&str; 3] = ["Aarhus", "Bergen", "Cork"];

fn people_csv() -> String {
    let mut csv = String::from("id,city,score\n");
    for i in 0..40 {
        csv.push_str(&format!("{i},{},{}\n", CITIES[i % 3], i * 7));
    }
    csv
}

const EVENTS: usize = 200_000;

fn events_csv() -> String {
    let mut csv = String::from("seq,kind,reading\n");
    for i in 0..EVENTS {
        csv.push_str(&format!(
            "{i},{},{}\n",
            ["start", "stop"][i % 2],
            1000 + i % 97
        ));
    }
    csv
}

/// ε per DP query, and the month's budget (two queries fit, a third not).
const EPSILON: f64 = 0.4;

const POLICY: &str = r#"
version: 1
datasets:
  people:
    privacy_unit: id
EVENTS_DATASET
consumers:
  - name: planning
    match: { organization: City Planning Agency }
    quotas: { queries_per_day: 100000, rows_per_day: 100000000 }
    grants:
      people:
        columns: { city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        dp:
          epsilon_per_query: 0.4
          default_epsilon: 0.4
          budget: { epsilon: BUDGET, period: month }
          max_groups: 1
          max_rows: 1
          columns: { score: { bounds: [0, 300] } }
          public_keys: { city: [Aarhus, Bergen, Cork] }
          cache: false
  - name: supplier
    match: { organization: Axle Supplier Consortium }
    quotas: { queries_per_day: 100000, rows_per_day: 100000000 }
    grants:
      people:
        columns: { city: raw, score: raw }
EVENTS_GRANT
"#;

const DP_SQL: &str = "SELECT city, count(*) AS n FROM people GROUP BY city";
const ROWS_SQL: &str = "SELECT city, score FROM people WHERE score < 50";
const EVENTS_SQL: &str = "SELECT seq, kind, reading FROM events";

struct Deployment {
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
}

impl Deployment {
    /// `budget`: ε per month for the planning agency; `limits`: lines for
    /// the config's `[limits]` table; `events`: whether to serve `events`.
    fn new(budget: f64, limits: &str, events: bool) -> Self {
        let dir = common::temp_dir();
        let d = dir.path();
        std::fs::write(d.join("people.csv"), people_csv()).unwrap();
        let mut datasets = String::from(
            "[[datasets]]\nname = \"people\"\nformat = \"csv\"\npath = \"people.csv\"\n",
        );
        if events {
            std::fs::write(d.join("events.csv"), events_csv()).unwrap();
            datasets.push_str(
                "\n[[datasets]]\nname = \"events\"\nformat = \"csv\"\npath = \"events.csv\"\n",
            );
        }
        let (dataset, grant) = match events {
            true => (
                "  events:\n    title: Machine events\n",
                "      events:\n        columns: { seq: raw, kind: raw, reading: raw }\n",
            ),
            false => ("", ""),
        };
        std::fs::write(
            d.join("policy.yaml"),
            POLICY
                .replace("BUDGET", &format!("{budget:.1}"))
                .replace("EVENTS_DATASET\n", dataset)
                .replace("EVENTS_GRANT\n", grant),
        )
        .unwrap();
        let config = d.join("sluice.toml");
        std::fs::write(
            &config,
            // Files are read from disk here, not from decoded copies: these
            // tests break files under running queries (the copies' own
            // behaviour is in tests/python/test_table_cache.py).
            format!(
                "[policy]\nfile = \"policy.yaml\"\n\n[limits]\ntable_cache = \"0\"\n{limits}\n\n{datasets}"
            ),
        )
        .unwrap();
        let state = d.join("state");
        Deployment { dir, config, state }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// DoGet on a FlightInfo: rows received and the release's receipt, or the
/// status that ended it (with the rows received before).
async fn redeem(
    client: &mut FlightSqlServiceClient<Channel>,
    info: &FlightInfo,
) -> Result<(usize, Option<String>), (tonic::Status, usize)> {
    let mut stream = client
        .do_get(common::ticket(info))
        .await
        .map_err(|e| (status(e), 0))?;
    let receipt = stream
        .headers()
        .get(sluice_proto::wire::header::RECEIPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut rows = 0;
    loop {
        match stream.try_next().await {
            Ok(Some(batch)) => rows += batch.num_rows(),
            Ok(None) => return Ok((rows, receipt)),
            Err(e) => return Err((status(e), rows)),
        }
    }
}

/// GetFlightInfo + DoGet. `Err((status, issued))`: `issued` tells whether
/// the ticket was issued (the failure was at DoGet).
async fn ask(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> Result<(usize, Option<String>), (tonic::Status, bool)> {
    let info = client
        .execute(sql.to_string(), None)
        .await
        .map_err(|e| (status(e), false))?;
    redeem(client, &info).await.map_err(|(s, _)| (s, true))
}

/// ε spent (committed and reserved) by the planning agency on `people` in
/// the window current on the daemon's clock, and that window's key.
async fn budget(channel: Channel) -> (f64, String) {
    let response = BudgetServiceClient::new(channel)
        .get_budget(GetBudgetRequest {
            dataset: "people".into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.budgets.first().map_or((0.0, String::new()), |b| {
        (b.epsilon_spent, b.period.clone())
    })
}

/// A message may name what failed, but never where the files are or a
/// value from the data.
fn assert_discreet(message: &str, dir: &Path) {
    assert!(
        !message.contains(&dir.display().to_string()) && !message.contains("/tmp"),
        "the message shows a path: {message}"
    );
    for city in CITIES {
        assert!(
            !message.contains(city),
            "the message shows a value: {message}"
        );
    }
}

/// `sluice audit verify` on the state directory's log.
fn audit_verifies(state: &Path) -> (bool, String) {
    let out = common::sluice()
        .args(["audit", "verify", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The records of the audit log, as JSON values.
fn audit_records(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Queries and rows counted today for `organization` (the quota counters,
/// read directly from the ledger's database).
fn quota_used(state: &Path, organization: &str) -> (i64, i64) {
    let conn = rusqlite::Connection::open_with_flags(
        state.join("privacy-ledger.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let day = Utc::now().timestamp() / 86_400;
    conn.query_row(
        "SELECT queries, rows FROM quota_usage WHERE organization = ?1 AND day = ?2",
        rusqlite::params![organization, day],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .unwrap_or((0, 0))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

// ---------------------------------------------------------------------------
// 1. A full disk.
// ---------------------------------------------------------------------------

/// A tmpfs mounted over a directory for as long as it lives.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Tmpfs {
                dir: dir.to_path_buf(),
            },
            Ok(out) => panic!(
                "this test makes a full disk by mounting a {size} tmpfs at {} and could not: {} \
                 (it needs root, or CAP_SYS_ADMIN, and mount(8))",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("this test needs mount(8) to make a full disk: {e}"),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon that did not die yet must not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Bytes still free on the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the free bytes")
}

/// Writes `dir/filler` until the file system is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for size in [1 << 20, 4096, 1] {
        loop {
            match file.write(&zeros[..size]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    assert_eq!(free_bytes(dir), 0, "the file system is full");
    path
}

/// The refusal of a request that could not be recorded for lack of space.
fn assert_full_disk_refusal(status: &tonic::Status, dir: &Path) {
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "a full disk is UNAVAILABLE: {status:?}"
    );
    let m = status.message();
    assert!(
        m.contains("cannot write its") && m.contains("the disk is full"),
        "the message says what could not be written, and why: {m}"
    );
    assert!(
        m.contains("Try again later") && m.contains("free space"),
        "the message says what to do: {m}"
    );
    assert_discreet(m, dir);
}

/// Receipts and ε of the answers a client received.
#[derive(Default)]
struct Released {
    receipts: Vec<String>,
    dp_answers: usize,
    /// DP tickets whose DoGet failed: charged at most once each.
    dp_failed_at_doget: usize,
}

impl Released {
    fn answer(&mut self, dp: bool, receipt: Option<String>) {
        self.receipts
            .push(receipt.expect("every answer carries the receipt of its release record"));
        self.dp_answers += usize::from(dp);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_releases_nothing_unrecorded_refuses_clearly_and_recovers() {
    let started = Instant::now();
    let d = Deployment::new(1000.0, "ticket_ttl = \"5m\"", false);
    let tmpfs = Tmpfs::mount(&d.state, "16m");
    let mut daemon = Daemon::start_isolated(&d.config, &d.state);
    let mut planning = daemon.client("planning").await;
    let mut supplier = daemon.client("supplier").await;
    let mut released = Released::default();

    let (rows, receipt) = ask(&mut supplier, ROWS_SQL).await.unwrap();
    assert_eq!(rows, 8);
    released.answer(false, receipt);
    let (_, receipt) = ask(&mut planning, DP_SQL).await.unwrap();
    released.answer(true, receipt);
    // Tickets issued while there is room, redeemed once there is none.
    let rows_ticket = supplier.execute(ROWS_SQL.into(), None).await.unwrap();
    let dp_ticket = planning.execute(DP_SQL.into(), None).await.unwrap();

    let filler = fill(&d.state);
    // tmpfs allocates whole pages and SQLite reuses its write-ahead log, so
    // a few records may still fit at the ends of the files: ask until every
    // kind of query is refused, a bounded number of times.
    let (mut rows_refused, mut dp_refused) = (0, 0);
    for _ in 0..100 {
        if rows_refused >= 3 && dp_refused >= 3 {
            break;
        }
        match ask(&mut supplier, ROWS_SQL).await {
            Ok((_, receipt)) => {
                released.answer(false, receipt);
                rows_refused = 0;
            }
            Err((status, _)) => {
                assert_full_disk_refusal(&status, &d.state);
                rows_refused += 1;
            }
        }
        match ask(&mut planning, DP_SQL).await {
            Ok((_, receipt)) => {
                released.answer(true, receipt);
                dp_refused = 0;
            }
            Err((status, issued)) => {
                assert_full_disk_refusal(&status, &d.state);
                released.dp_failed_at_doget += usize::from(issued);
                dp_refused += 1;
            }
        }
    }
    assert!(
        rows_refused >= 3 && dp_refused >= 3,
        "within 100 tries every query was refused ({rows_refused} row and {dp_refused} DP refusals in a row)"
    );
    // The tickets issued before: refused at DoGet, nothing streamed.
    let (refused, rows) = redeem(&mut supplier, &rows_ticket).await.unwrap_err();
    assert_full_disk_refusal(&refused, &d.state);
    assert_eq!(rows, 0);
    let (refused, rows) = redeem(&mut planning, &dp_ticket).await.unwrap_err();
    assert_full_disk_refusal(&refused, &d.state);
    assert_eq!(rows, 0);
    released.dp_failed_at_doget += 1;
    // A refusal the policy decides is still answered as such (it cannot be
    // recorded: it carries no receipt).
    let denied = status(
        planning
            .execute("SELECT city, score FROM people".into(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(!denied.message().contains("audit receipt"), "{denied:?}");
    // Reading the budget needs no write.
    let (spent, _) = budget(daemon.channel("planning").await).await;
    assert!(spent >= EPSILON * released.dp_answers as f64 - 1e-9);
    assert!(
        daemon.is_running(),
        "the daemon is alive: {}",
        daemon.logs()
    );

    // Space comes back: the next queries are answered, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (rows, receipt) = ask(&mut supplier, ROWS_SQL).await.unwrap();
    assert_eq!(rows, 8);
    released.answer(false, receipt);
    let (_, receipt) = ask(&mut planning, DP_SQL).await.unwrap();
    released.answer(true, receipt);

    drop(planning);
    drop(supplier);
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.terminate();
    assert!(daemon.wait(Duration::from_secs(30)).is_some());
    let logs = daemon.logs();
    assert!(!logs.contains("panicked"), "no panic: {logs}");
    drop(daemon);

    // The chain verifies, and holds every receipt a client was given.
    let (ok, report) = audit_verifies(&d.state);
    assert!(ok, "the audit log verifies after the full disk: {report}");
    let logged: Vec<serde_json::Value> = audit_records(&d.state);
    for header in &released.receipts {
        let receipt = sluice::audit::Receipt::from_header(header).unwrap();
        let record = logged
            .iter()
            .find(|r| r["record"]["receipt_id"] == receipt.receipt_id.as_str())
            .unwrap_or_else(|| panic!("receipt {} is not in the log", receipt.receipt_id));
        assert_eq!(record["hash"], receipt.hash.as_str());
        assert_eq!(record["record"]["entry"]["event"], "release");
    }
    // Every DP answer released is charged; a DoGet that failed after its
    // charge may have cost its ε (the documented rule), nothing else did.
    let ledger =
        sluice_privacy::ledger::Ledger::open(&d.state.join("privacy-ledger.sqlite")).unwrap();
    ledger.verify().unwrap();
    let balance = ledger
        .balances(Some("City Planning Agency"), Utc::now())
        .unwrap()
        .into_iter()
        .find(|b| b.dataset == "people")
        .unwrap();
    let committed = sluice_privacy::ledger::epsilon_from_units(
        balance.spent_epsilon - balance.reserved_epsilon,
    );
    let answered = EPSILON * released.dp_answers as f64;
    let at_most = EPSILON * (released.dp_answers + released.dp_failed_at_doget) as f64;
    assert!(
        committed + 1e-9 >= answered && committed <= at_most + 1e-9,
        "the ledger committed {committed} ε for {} answers released ({answered} ε) and {} DoGets that failed",
        released.dp_answers,
        released.dp_failed_at_doget
    );
    let release_epsilon: f64 = logged
        .iter()
        .filter(|r| {
            r["record"]["entry"]["event"] == "release"
                && r["record"]["entry"]["outcome"] == "released"
        })
        .filter_map(|r| {
            r["record"]["entry"]["epsilon"]
                .as_str()?
                .parse::<f64>()
                .ok()
        })
        .sum();
    // A release record is written before the answer leaves; rows can
    // still be refused after it (their quota cannot be counted).
    assert!(
        release_epsilon + 1e-9 >= answered && release_epsilon <= committed + 1e-9,
        "the release records charge {release_epsilon} ε, the answers {answered} ε, the ledger {committed} ε"
    );
    drop(tmpfs);
    eprintln!("full disk: {:?}", started.elapsed());
}

/// A policy whose grant to the planning agency needs an agreement an
/// admin approves.
const AGREEMENT_POLICY: &str = r#"
version: 1
admins:
  - organization: City Transport Agency
datasets:
  people: { title: People }
consumers:
  - name: analysts
    match: { organization: City Planning Agency }
    grants:
      people:
        columns: { city: raw }
        purposes: [research]
        agreement: { approval: manual }
"#;

/// Requests and decisions on agreements while the disk is full: each one
/// that cannot be written is UNAVAILABLE, saying the disk is full and
/// without a path; one the store could not keep changed nothing, one whose
/// audit record could not be written stands and says so; when space comes
/// back the next change goes through and the log verifies.
#[tokio::test]
async fn agreement_changes_on_a_full_disk_are_unavailable_and_recover() {
    use sluice_proto::v1::agreement_service_client::AgreementServiceClient;
    use sluice_proto::v1::{
        Agreement, AgreementState, DecideAgreementRequest, ListAgreementsRequest,
        RequestAgreementRequest,
    };
    let (dir, config, state) = common::people_deployment(&people_csv(), AGREEMENT_POLICY);
    let tmpfs = Tmpfs::mount(&state, "16m");
    let mut daemon = Daemon::start_isolated(&config, &state);
    let mut as_planning = AgreementServiceClient::new(daemon.channel("planning").await);
    let mut as_admin = AgreementServiceClient::new(daemon.channel("admin").await);
    let request = RequestAgreementRequest {
        offer_id: "people/analysts".into(),
        purpose: "research".into(),
    };
    let decide = |id: &str| DecideAgreementRequest {
        id: id.to_string(),
        reason: "test".into(),
    };
    let mut current: Agreement = as_planning
        .request_agreement(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.state(), AgreementState::Pending);
    // The newest agreement of the planning agency, as the store has it.
    let newest = async |client: &mut AgreementServiceClient<Channel>| -> Agreement {
        let listed = client
            .list_agreements(ListAgreementsRequest::default())
            .await
            .unwrap()
            .into_inner();
        listed.agreements.into_iter().next().expect("an agreement")
    };

    let filler = fill(&state);
    // Request, approve, revoke, request anew, …: every step a write. Pages
    // left at the ends of the files may take a few: a bounded number.
    let mut unavailable = 0;
    for _ in 0..100 {
        if unavailable >= 3 {
            break;
        }
        let step = match current.state() {
            AgreementState::Pending => as_admin.approve_agreement(decide(&current.id)).await,
            AgreementState::Active => as_admin.revoke_agreement(decide(&current.id)).await,
            _ => as_planning.request_agreement(request.clone()).await,
        };
        match step {
            Ok(changed) => {
                current = changed.into_inner();
                unavailable = 0;
            }
            Err(refused) => {
                assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
                let m = refused.message();
                assert!(m.contains("the disk is full"), "{m}");
                assert_discreet(m, dir.path());
                let now = newest(&mut as_planning).await;
                if m.contains("but the audit log cannot be written") {
                    // Stored, not recorded: the change stands.
                    assert!(now.id != current.id || now.state != current.state, "{m}");
                    current = now;
                } else {
                    assert!(m.contains("agreement store"), "{m}");
                    assert_eq!(
                        (&now.id, now.state()),
                        (&current.id, current.state()),
                        "a change the store refused changed nothing: {m}"
                    );
                }
                eprintln!("refused: {m}");
                unavailable += 1;
            }
        }
    }
    assert!(
        unavailable >= 3,
        "within 100 steps the agreement store refused three in a row"
    );
    assert!(daemon.is_running(), "{}", daemon.logs());

    // Space comes back: the next change goes through, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let step = match current.state() {
        AgreementState::Pending => as_admin.approve_agreement(decide(&current.id)).await,
        AgreementState::Active => as_admin.revoke_agreement(decide(&current.id)).await,
        _ => as_planning.request_agreement(request.clone()).await,
    };
    step.expect("with space again, the change goes through");
    drop(daemon);
    let (verified, out) = audit_verifies(&state);
    assert!(verified, "{out}");
    drop(tmpfs);
}

// ---------------------------------------------------------------------------
// 2. Damaged or unreadable state files at start.
// ---------------------------------------------------------------------------

/// A deployment that has served: an audit log, a ledger with a DP charge
/// and quota counters, an agreement store, keys. Stopped cleanly and its
/// databases checkpointed, so that the main files hold everything.
fn served_deployment() -> tempfile::TempDir {
    {
        let d = Deployment::new(10.0, "", false);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut daemon = Daemon::start_isolated(&d.config, &d.state);
            let mut planning = daemon.client("planning").await;
            ask(&mut planning, DP_SQL).await.unwrap();
            let mut supplier = daemon.client("supplier").await;
            ask(&mut supplier, ROWS_SQL).await.unwrap();
            drop((planning, supplier));
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.terminate();
            assert!(daemon.wait(Duration::from_secs(30)).is_some());
        });
        for db in ["privacy-ledger.sqlite", "agreements.sqlite"] {
            let conn = rusqlite::Connection::open(d.state.join(db)).unwrap();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        assert!(audit_records(&d.state).len() >= 6);
        d.dir
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// SHA-256 of every file under `dir`, by path (SQLite's transient `-wal`
/// and `-shm` files and the state directory's lock aside).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n != ".lock" && !n.ends_with("-wal") && !n.ends_with("-shm")
            }) {
                let bytes = std::fs::read(&path).unwrap();
                let hash = ring::digest::digest(&ring::digest::SHA256, &bytes);
                files.push((path, hash.as_ref().to_vec()));
            }
        }
    }
    files.sort();
    files
}

/// One damaged start: `damage` breaks the copy of a served deployment
/// (given its directory); the daemon must refuse to start, non-zero, with
/// an error naming `named` (relative to the deployment) and containing
/// every one of `says`, and leave every file as it found it.
fn refuses_to_start(
    served: &Path,
    case: &str,
    damage: impl FnOnce(&Path),
    named: &str,
    says: &[&str],
) {
    let copy = common::temp_dir();
    copy_dir(served, copy.path());
    let dir = copy.path();
    damage(dir);
    let before = snapshot(dir);
    let refused = common::serve_refused(&dir.join("sluice.toml"), &dir.join("state"));
    let err = refused.stderr;
    assert!(
        !refused.status.success(),
        "{case}: exit status {}",
        refused.status
    );
    let file = dir.join(named);
    assert!(
        err.contains(&file.display().to_string()),
        "{case}: the error names {}:\n{err}",
        file.display()
    );
    for phrase in says {
        assert!(
            err.to_lowercase().contains(&phrase.to_lowercase()),
            "{case}: the error says `{phrase}`:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "{case}: no panic:\n{err}");
    assert_eq!(
        snapshot(dir),
        before,
        "{case}: a refused start changes no file (no budget is reset, no key replaced)"
    );
}

fn overwrite(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn garbage(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(7))
        .collect()
}

fn replace_with_dir(path: &Path) {
    std::fs::remove_file(path).unwrap();
    std::fs::create_dir(path).unwrap();
}

/// Overwrites part of the page holding the root of `table` in an SQLite file.
fn damage_table(db: &Path, table: &str) {
    let root: i64 = rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = ?1",
            [table],
            |row| row.get(0),
        )
        .unwrap();
    let mut bytes = std::fs::read(db).unwrap();
    let page = 4096 * (root as usize - 1);
    bytes[page..page + 64].fill(0xa5);
    overwrite(db, &bytes);
}

const LEDGER: &str = "state/privacy-ledger.sqlite";

#[test]
fn a_damaged_ledger_or_quota_store_stops_the_start() {
    let served = &served_deployment();
    let served = served.path();
    let restore = [
        "restore it from a backup",
        "never creates a new ledger over it",
    ];
    refuses_to_start(
        served,
        "ledger: garbage",
        |d| overwrite(&d.join(LEDGER), &garbage(8192)),
        LEDGER,
        &restore,
    );
    refuses_to_start(
        served,
        "ledger: a directory in its place",
        |d| replace_with_dir(&d.join(LEDGER)),
        LEDGER,
        &["cannot open"],
    );
    refuses_to_start(
        served,
        "ledger: cut to 50 bytes",
        |d| {
            let bytes = std::fs::read(d.join(LEDGER)).unwrap();
            overwrite(&d.join(LEDGER), &bytes[..50]);
        },
        LEDGER,
        &restore,
    );
    refuses_to_start(
        served,
        "ledger: its accounts table damaged",
        |d| damage_table(&d.join(LEDGER), "accounts"),
        LEDGER,
        &restore,
    );
    refuses_to_start(
        served,
        "quota counters: their table damaged",
        |d| damage_table(&d.join(LEDGER), "quota_usage"),
        LEDGER,
        &restore,
    );
}

#[test]
fn damaged_agreements_or_policy_stop_the_start() {
    let served = &served_deployment();
    let served = served.path();
    const AGREEMENTS: &str = "state/agreements.sqlite";
    let restore = ["restore it from a backup"];
    refuses_to_start(
        served,
        "agreements: garbage",
        |d| overwrite(&d.join(AGREEMENTS), &garbage(8192)),
        AGREEMENTS,
        &restore,
    );
    refuses_to_start(
        served,
        "agreements: a directory in its place",
        |d| replace_with_dir(&d.join(AGREEMENTS)),
        AGREEMENTS,
        &["cannot open"],
    );
    refuses_to_start(
        served,
        "agreements: their table damaged",
        |d| damage_table(&d.join(AGREEMENTS), "agreements"),
        AGREEMENTS,
        &restore,
    );
    refuses_to_start(
        served,
        "policy: not text",
        |d| overwrite(&d.join("policy.yaml"), &[0xff, 0xfe, 0x00, 0x81]),
        "policy.yaml",
        &["usage policy"],
    );
    refuses_to_start(
        served,
        "policy: not YAML",
        |d| overwrite(&d.join("policy.yaml"), b"version: 1\nconsumers: [\n  - {\n"),
        "policy.yaml",
        &[],
    );
    refuses_to_start(
        served,
        "policy: a directory in its place",
        |d| replace_with_dir(&d.join("policy.yaml")),
        "policy.yaml",
        &["usage policy"],
    );
}

#[test]
fn a_damaged_audit_log_or_signing_key_stops_the_start() {
    let served = &served_deployment();
    let served = served.path();
    const LOG: &str = "state/audit/audit.jsonl";
    const KEY: &str = "state/audit/signing-key.p8";
    let edit_line = |d: &Path, line: usize, edit: &dyn Fn(&str) -> String| {
        let text = std::fs::read_to_string(d.join(LOG)).unwrap();
        let lines: Vec<String> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i + 1 == line {
                    edit(l)
                } else {
                    l.to_string()
                }
            })
            .collect();
        overwrite(&d.join(LOG), format!("{}\n", lines.join("\n")).as_bytes());
    };
    let damaged = ["line 2", "sluice audit verify", "restore it from a backup"];
    refuses_to_start(
        served,
        "audit log: a changed record in the middle",
        |d| {
            edit_line(d, 2, &|l| {
                l.replacen("\"outcome\":\"", "\"outcome\":\"x", 1)
            })
        },
        LOG,
        &damaged,
    );
    refuses_to_start(
        served,
        "audit log: garbage in the middle",
        |d| edit_line(d, 2, &|l| format!("{}\u{1}garbage", &l[..l.len() / 2])),
        LOG,
        &damaged,
    );
    refuses_to_start(
        served,
        "audit log: a record in the middle removed",
        |d| edit_line(d, 2, &|_| String::new()),
        LOG,
        &damaged,
    );
    refuses_to_start(
        served,
        "audit log: a directory in its place",
        |d| replace_with_dir(&d.join(LOG)),
        LOG,
        &["cannot open"],
    );
    refuses_to_start(
        served,
        "audit log: missing, its key still there",
        |d| std::fs::remove_file(d.join(LOG)).unwrap(),
        LOG,
        &["restore it from a backup"],
    );
    refuses_to_start(
        served,
        "audit signing key: missing, the log still there",
        |d| std::fs::remove_file(d.join(KEY)).unwrap(),
        KEY,
        &["restore it from a backup"],
    );
    refuses_to_start(
        served,
        "audit signing key: garbage",
        |d| overwrite(&d.join(KEY), &garbage(83)),
        KEY,
        &["restore it from a backup"],
    );
    refuses_to_start(
        served,
        "audit signing key: a directory in its place",
        |d| replace_with_dir(&d.join(KEY)),
        KEY,
        &["cannot read"],
    );
}

#[test]
fn damaged_tls_or_masking_keys_stop_the_start() {
    let served = &served_deployment();
    let served = served.path();
    for (name, what) in [
        ("server.key", "private key"),
        ("server.pem", "certificate"),
        ("ca.key", "private key"),
        ("ca.pem", "certificate"),
    ] {
        let path = format!("state/pki/{name}");
        refuses_to_start(
            served,
            &format!("dev PKI: {name} garbage"),
            |d| overwrite(&d.join(&path), b"-----BEGIN NOTHING-----\nAAAA\n"),
            &path,
            &[what],
        );
    }
    refuses_to_start(
        served,
        "dev PKI: the server key is another key",
        |d| {
            let other = std::fs::read(d.join("state/pki/supplier.key")).unwrap();
            overwrite(&d.join("state/pki/server.key"), &other);
        },
        "state/pki/server.key",
        &["does not belong to"],
    );
    refuses_to_start(
        served,
        "dev PKI: a directory in place of the server key",
        |d| replace_with_dir(&d.join("state/pki/server.key")),
        "state/pki/server.key",
        &[],
    );
    const MASK: &str = "state/secrets/mask.key";
    refuses_to_start(
        served,
        "masking key: cut short",
        |d| overwrite(&d.join(MASK), b"abc"),
        MASK,
        &["restore it from a backup"],
    );
    refuses_to_start(
        served,
        "masking key: missing in a state directory that has served",
        |d| std::fs::remove_file(d.join(MASK)).unwrap(),
        MASK,
        &["restore it from a backup"],
    );
    refuses_to_start(
        served,
        "masking key: a directory in its place",
        |d| replace_with_dir(&d.join(MASK)),
        MASK,
        &[],
    );
}

// ---------------------------------------------------------------------------
// 3. A wall clock that jumps.
// ---------------------------------------------------------------------------

/// The daemon's wall clock, moved through libfaketime: the offset from the
/// real clock lives in a file the library reads on every call; the
/// monotonic clock is left alone, as an NTP step leaves it.
struct FakeClock {
    file: PathBuf,
    library: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> FakeClock {
        let library = [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/faketime/libfaketimeMT.so.1",
            "/usr/local/lib/faketime/libfaketimeMT.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "this test moves the daemon's clock with libfaketime: install Debian's `faketime` \
             package (tests/run.sh does)",
        );
        let clock = FakeClock {
            file: dir.join("faketime.rc"),
            library,
        };
        clock.write("+0");
        clock
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.display().to_string(),
            ),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_DONT_RESET".into(), "1".into()),
        ]
    }

    /// Sets the daemon's wall clock to `at` (it runs on from there).
    fn set(&self, at: DateTime<Utc>) {
        let offset = (at - Utc::now()).num_seconds();
        self.write(&format!("{offset:+}"));
    }

    fn write(&self, text: &str) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{text}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }
}

/// The first instant of the month after the next, unless the next month
/// starts in more than two hours: a boundary ahead of the real clock (the
/// daemon's certificates are valid from an hour ago).
fn next_month_boundary() -> DateTime<Utc> {
    let now = Utc::now();
    let first_after = |at: DateTime<Utc>| {
        let (y, m) = if at.month() == 12 {
            (at.year() + 1, 1)
        } else {
            (at.year(), at.month() + 1)
        };
        Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap()
    };
    let next = first_after(now);
    if next - now > chrono::TimeDelta::hours(2) {
        next
    } else {
        first_after(next)
    }
}

fn month_key(at: DateTime<Utc>) -> String {
    at.format("%Y-%m").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_stays_in_its_month_whichever_way_the_clock_jumps() {
    let started = Instant::now();
    // 1 ε a month, 0.4 a query: two queries a month.
    let d = Deployment::new(1.0, "", false);
    let clock = FakeClock::new(d.dir.path());
    let boundary = next_month_boundary();
    let before = boundary - chrono::TimeDelta::minutes(5);
    let after = boundary + chrono::TimeDelta::minutes(5);
    let (old, new) = (month_key(before), month_key(after));
    // Started on the real clock: the development PKI it makes is valid
    // from an hour ago, for the client too.
    let mut daemon = Daemon::start_isolated_with_env(&d.config, &d.state, &clock.env());
    let mut planning = daemon.client("planning").await;
    let channel = daemon.channel("planning").await;
    clock.set(before);
    let exhausted = |status: &tonic::Status, period: &str| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("privacy budget exhausted")
                && status.message().contains(&format!("({period})")),
            "the refusal names period {period}: {status:?}"
        );
    };

    for _ in 0..2 {
        ask(&mut planning, DP_SQL).await.unwrap();
    }
    let (refused, _) = ask(&mut planning, DP_SQL).await.unwrap_err();
    exhausted(&refused, &old);
    let (spent, period) = budget(channel.clone()).await;
    assert!(
        close(spent, 0.8) && period.contains(&old),
        "{spent} {period}"
    );

    // Forward into the next month: its own budget, per the documented
    // calendar-month semantics.
    clock.set(after);
    let (spent, _) = budget(channel.clone()).await;
    assert!(close(spent, 0.0), "a new month starts with nothing spent");
    ask(&mut planning, DP_SQL).await.unwrap();
    let (spent, period) = budget(channel.clone()).await;
    assert!(
        close(spent, 0.4) && period.contains(&new),
        "{spent} {period}"
    );

    // Back into the old month: its spend is still there.
    clock.set(before + chrono::TimeDelta::minutes(1));
    let (spent, period) = budget(channel.clone()).await;
    assert!(
        close(spent, 0.8) && period.contains(&old),
        "{spent} {period}"
    );
    let (refused, _) = ask(&mut planning, DP_SQL).await.unwrap_err();
    exhausted(&refused, &old);

    // Forward again: the new month's spend is still there too.
    clock.set(after + chrono::TimeDelta::minutes(1));
    ask(&mut planning, DP_SQL).await.unwrap();
    let (refused, _) = ask(&mut planning, DP_SQL).await.unwrap_err();
    exhausted(&refused, &new);
    let (spent, period) = budget(channel.clone()).await;
    assert!(
        close(spent, 0.8) && period.contains(&new),
        "{spent} {period}"
    );

    drop((planning, channel));
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.terminate();
    assert!(daemon.wait(Duration::from_secs(30)).is_some());
    drop(daemon);

    // The log's times went backwards with the clock, and it verifies.
    let times: Vec<String> = audit_records(&d.state)
        .iter()
        .map(|r| r["record"]["time"].as_str().unwrap().to_string())
        .collect();
    assert!(
        times.windows(2).any(|w| w[1] < w[0]),
        "the records' times went back with the clock: {times:?}"
    );
    assert!(times.iter().any(|t| t.starts_with(&new)), "{times:?}");
    let (ok, report) = audit_verifies(&d.state);
    assert!(ok, "a log whose times go backwards verifies: {report}");
    eprintln!("clock and budget: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_lives_no_longer_than_its_ttl_on_either_clock() {
    let started = Instant::now();
    let d = Deployment::new(10.0, "ticket_ttl = \"2s\"", false);
    let clock = FakeClock::new(d.dir.path());
    let daemon = Daemon::start_isolated_with_env(&d.config, &d.state, &clock.env());
    let mut planning = daemon.client("planning").await;
    let channel = daemon.channel("planning").await;
    let expired = |status: &tonic::Status| {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status
                .message()
                .contains("ticket rejected: it has expired; call GetFlightInfo again"),
            "{status:?}"
        );
    };
    let now = Utc::now();

    // The wall clock jumps forward past the expiry.
    clock.set(now + chrono::TimeDelta::days(2));
    let info = planning.execute(DP_SQL.into(), None).await.unwrap();
    let (held, _) = budget(channel.clone()).await;
    assert!(close(held, 0.4), "the ticket holds its ε: {held}");
    clock.set(now + chrono::TimeDelta::days(2) + chrono::TimeDelta::minutes(10));
    let (refused, rows) = redeem(&mut planning, &info).await.unwrap_err();
    expired(&refused);
    assert_eq!(rows, 0);

    // The wall clock jumps back a day: by the wall clock the ticket would
    // live another day, but only its TTL passes in real time.
    clock.set(now + chrono::TimeDelta::days(2));
    let info = planning.execute(DP_SQL.into(), None).await.unwrap();
    clock.set(now + chrono::TimeDelta::days(1));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (refused, rows) = redeem(&mut planning, &info).await.unwrap_err();
    expired(&refused);
    assert_eq!(rows, 0);

    // A ticket redeemed within its TTL still works across a small jump.
    clock.set(now + chrono::TimeDelta::days(2));
    let info = planning.execute(DP_SQL.into(), None).await.unwrap();
    clock.set(now + chrono::TimeDelta::days(2) - chrono::TimeDelta::hours(1));
    let (rows, _) = redeem(&mut planning, &info).await.unwrap();
    assert_eq!(rows, 3);

    // The expired tickets read nothing: their ε came back (the one refused
    // by the wall clock once it is swept: issuing a ticket sweeps).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        clock.set(now + chrono::TimeDelta::days(2));
        let (spent, _) = budget(channel.clone()).await;
        if close(spent, EPSILON) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only the answered query's ε stays spent: {spent} spent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(daemon);
    eprintln!("clock and tickets: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 4. A data source that fails under a query.
// ---------------------------------------------------------------------------

/// The refusal of a query whose data file went away or changed under it.
fn assert_source_failure(status: &tonic::Status, dataset: &str, dir: &Path) {
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "a data file that changed or went away is UNAVAILABLE: {status:?}"
    );
    let m = status.message();
    assert!(
        m.contains(&format!("dataset `{dataset}`")),
        "the message names the dataset: {m}"
    );
    assert!(m.contains("try again"), "the message says what to do: {m}");
    assert!(!m.contains(".csv"), "the message shows no file name: {m}");
    assert_discreet(m, dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_deleted_or_truncated_under_a_query_is_named() {
    let started = Instant::now();
    let d = Deployment::new(10.0, "", true);
    let daemon = Daemon::start_isolated(&d.config, &d.state);
    let mut supplier = daemon.client("supplier").await;
    let mut planning = daemon.client("planning").await;
    let events = d.file("events.csv");
    let original = std::fs::read(&events).unwrap();
    let organization = "Axle Supplier Consortium";
    let mut received = 0;

    // Deleted between GetFlightInfo and DoGet.
    let info = supplier.execute(EVENTS_SQL.into(), None).await.unwrap();
    std::fs::rename(&events, d.file("events.away")).unwrap();
    let (refused, rows) = redeem(&mut supplier, &info).await.unwrap_err();
    assert_source_failure(&refused, "events", d.dir.path());
    assert_eq!(rows, 0);
    // Other datasets are served meanwhile.
    let (rows, _) = ask(&mut supplier, ROWS_SQL).await.unwrap();
    received += rows;
    std::fs::rename(d.file("events.away"), &events).unwrap();
    let (rows, _) = ask(&mut supplier, EVENTS_SQL).await.unwrap();
    assert_eq!(rows, EVENTS);
    received += rows;

    // Truncated while the result streams to a slow reader.
    let info = supplier.execute(EVENTS_SQL.into(), None).await.unwrap();
    let mut stream = supplier.do_get(common::ticket(&info)).await.unwrap();
    let first = stream.try_next().await.unwrap().unwrap();
    let mut rows = first.num_rows();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&events)
        .unwrap()
        .set_len(original.len() as u64 / 3)
        .unwrap();
    let refused = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match stream.try_next().await {
            Ok(Some(batch)) => rows += batch.num_rows(),
            Ok(None) => panic!("the truncated result ended as if complete, after {rows} rows"),
            Err(e) => break status(e),
        }
    };
    assert_source_failure(&refused, "events", d.dir.path());
    assert!(rows < EVENTS, "{rows}");
    received += rows;

    // Truncated in the middle of a line between GetFlightInfo and DoGet:
    // what is left is not a CSV file of the dataset's shape.
    std::fs::write(&events, &original).unwrap();
    let info = supplier.execute(EVENTS_SQL.into(), None).await.unwrap();
    // After the first field of a line: a row of one field, not three.
    let half = original.len() / 2;
    let line = half + original[half..].iter().position(|b| *b == b'\n').unwrap() + 1;
    let cut = line + original[line..].iter().position(|b| *b == b',').unwrap() + 1;
    std::fs::write(&events, &original[..cut]).unwrap();
    match redeem(&mut supplier, &info).await {
        Err((refused, rows)) => {
            assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
            let m = refused.message();
            assert!(m.contains("dataset `events`"), "{m}");
            assert_discreet(m, d.dir.path());
            received += rows;
        }
        Ok((rows, _)) => panic!("a cut line was read as a complete result of {rows} rows"),
    }

    // A DP query whose file went away after its ticket: the answer is
    // withheld and its ε stays charged (the charge stands once DoGet
    // starts), the same refusal as any failure after that point.
    let (before, _) = budget(daemon.channel("planning").await).await;
    let info = planning.execute(DP_SQL.into(), None).await.unwrap();
    std::fs::rename(d.file("people.csv"), d.file("people.away")).unwrap();
    let (withheld, _) = redeem(&mut planning, &info).await.unwrap_err();
    assert_eq!(withheld.code(), Code::ResourceExhausted, "{withheld:?}");
    assert!(withheld.message().contains("ε was charged"), "{withheld:?}");
    std::fs::rename(d.file("people.away"), d.file("people.csv")).unwrap();
    let (after, _) = budget(daemon.channel("planning").await).await;
    assert!(close(after - before, EPSILON), "{before} → {after}");

    // Restored, everything is served again; every query counted once, and
    // only the rows that left were taken from the day's allowance.
    std::fs::write(&events, &original).unwrap();
    let (rows, _) = ask(&mut supplier, EVENTS_SQL).await.unwrap();
    assert_eq!(rows, EVENTS);
    received += rows;
    let (queries, rows_counted) = quota_used(&d.state, organization);
    assert_eq!(queries, 6, "each redeemed ticket counts once");
    assert_eq!(
        rows_counted, received as i64,
        "the rows taken are the rows that left"
    );
    assert!(!daemon.logs().contains("panicked"));
    eprintln!("data source: {:?}", started.elapsed());
}
