//! Every way a pending query can end, and what it holds afterwards: one of
//! the day's queries (the quota) and, for a differentially private query,
//! its (ε, δ) in the ledger. Redeemed, both are settled; failed after the
//! quota was held, expired, evicted, withdrawn or cancelled, both come
//! back. The engine is built in-process exactly as `sluice serve` builds it
//! (`server::App`), on real SQLite stores and a real audit log, so the
//! counters can be read directly.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use sluice::config::Config;
use sluice::query::{QueryEngine, QueryError};
use sluice::server::{App, ServeHooks};
use sluice_policy::{Principal, QueryContext};
use sluice_privacy::ledger::{self, Account, Period};
use tonic::Code;

const ORGANIZATION: &str = "Analysts";

fn people_csv() -> String {
    let mut csv = String::from("id,city,score\n");
    for i in 0..30 {
        csv.push_str(&format!("{i},{},{}\n", ["Aarhus", "Bergen"][i % 2], i));
    }
    csv
}

/// Two queries a day; DP on `people` with a budget of 1 ε (0.4 per query,
/// so the third reservation is refused).
const POLICY: &str = r#"
version: 1
datasets:
  people:
    privacy_unit: id
consumers:
  - name: analysts
    match: { organization: Analysts }
    quotas: { queries_per_day: 2 }
    grants:
      people:
        columns: { city: group_by_only, score: aggregate_only }
        functions: { aggregate: [count, sum] }
        dp:
          epsilon_per_query: 0.4
          budget: { epsilon: 1.0, period: total }
          max_groups: 1
          max_rows: 1
          columns: { score: { bounds: [0, 100] } }
          public_keys: { city: [Aarhus, Bergen] }
          cache: false
"#;

const QUERY: &str = "SELECT city, count(*) AS n FROM people GROUP BY city";

struct Deployment {
    _dir: tempfile::TempDir,
    state: std::path::PathBuf,
    engine: Arc<QueryEngine>,
    /// The query runtime (`sluice serve` has one beside its I/O runtime).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The engine of a deployment serving `people` under [`POLICY`], with
/// `limits` (TOML lines) added to its configuration.
async fn deployment(limits: &str) -> Deployment {
    let (dir, config_file, state) = common::people_deployment(&people_csv(), POLICY);
    let text = format!(
        "{}\n[server]\nstate_dir = \"{}\"\n\n[limits]\n{limits}\n",
        std::fs::read_to_string(&config_file).unwrap(),
        state.display()
    );
    std::fs::write(&config_file, &text).unwrap();
    let config = Config::load(&config_file).unwrap();
    sluice::dev::prepare(&sluice::state::StateDir::new(&state), false).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = App::build(config, runtime.handle().clone(), ServeHooks::default())
        .await
        .unwrap();
    Deployment {
        engine: app.engine().clone(),
        _dir: dir,
        state,
        runtime: Some(runtime),
    }
}

fn request() -> QueryContext {
    let mut principal = Principal::new("spiffe://test/analysts/a");
    principal.organization = Some(ORGANIZATION.into());
    QueryContext::new(principal)
}

/// Queries of the day: settled, and held by unredeemed tickets.
fn queries(engine: &QueryEngine) -> (u64, u64) {
    let now = SystemTime::now();
    let used = engine.quotas().used(ORGANIZATION, now).unwrap().queries;
    (used, engine.quotas().held(ORGANIZATION, now))
}

/// ε spent on `people` (committed and reserved), once every queued refund
/// is in the ledger.
fn epsilon_spent(engine: &QueryEngine) -> f64 {
    engine.privacy().settled();
    let account = Account {
        organization: ORGANIZATION.into(),
        dataset: "people".into(),
        period: Period::Total,
        limit_epsilon: ledger::epsilon_limit_units(1.0).unwrap(),
        limit_delta: 0,
    };
    let balance = engine
        .privacy()
        .ledger()
        .balance(&account, chrono::Utc::now())
        .unwrap();
    ledger::epsilon_from_units(balance.spent_epsilon)
}

async fn issue(engine: &Arc<QueryEngine>) -> Result<sluice::query::IssuedTicket, QueryError> {
    engine.issue_statement(request(), QUERY.into()).await
}

async fn redeem_all(engine: &Arc<QueryEngine>, ticket: &[u8]) -> Result<usize, QueryError> {
    let run = engine.redeem(&request().principal, ticket).await?;
    let batches: Vec<_> = run.batches.collect().await;
    let mut rows = 0;
    for batch in batches {
        rows += batch?.num_rows();
    }
    Ok(rows)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeemed_query_counts_and_spends() {
    let d = deployment("").await;
    let issued = issue(&d.engine).await.unwrap();
    assert_eq!(queries(&d.engine), (0, 1), "held, not yet counted");
    assert!(close(epsilon_spent(&d.engine), 0.4), "reserved at issue");
    assert_eq!(redeem_all(&d.engine, &issued.ticket).await.unwrap(), 2);
    assert_eq!(queries(&d.engine), (1, 0));
    assert!(close(epsilon_spent(&d.engine), 0.4));
    // The ticket is single-use: nothing more is counted or spent.
    let again = redeem_all(&d.engine, &issued.ticket).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert_eq!(queries(&d.engine), (1, 0));
    assert!(close(epsilon_spent(&d.engine), 0.4));
}

/// A budget refused after the quota was held: the quota hold comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusal_after_the_quota_hold_returns_it() {
    let d = deployment("").await;
    // 0.8 of the 1 ε already spent (directly in the ledger, so that the
    // day's queries are all left): the query's 0.4 does not fit.
    let account = Account {
        organization: ORGANIZATION.into(),
        dataset: "people".into(),
        period: Period::Total,
        limit_epsilon: ledger::epsilon_limit_units(1.0).unwrap(),
        limit_delta: ledger::delta_limit_units(0.0).unwrap(),
    };
    let charge = ledger::Charge {
        epsilon: ledger::epsilon_units(0.8).unwrap(),
        delta: 0,
        rho: 0,
    };
    let spent = d
        .engine
        .privacy()
        .ledger()
        .reserve(&account, charge, chrono::Utc::now())
        .unwrap();
    d.engine.privacy().ledger().start(&spent.id).unwrap();
    d.engine.privacy().ledger().commit(&spent.id).unwrap();
    let refused = issue(&d.engine).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.to_string().contains("privacy budget exhausted"),
        "{refused}"
    );
    assert_eq!(queries(&d.engine), (0, 0), "the held query came back");
    assert!(close(epsilon_spent(&d.engine), 0.8));
}

/// The decision cannot be recorded (the audit log refuses appends): the
/// ticket is withdrawn, and both holds come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_decision_returns_both_holds() {
    let d = deployment("").await;
    // A log that shrank under the connector refuses every append.
    let log = d.state.join("audit").join("audit.jsonl");
    let first = issue(&d.engine).await.unwrap();
    drop(first);
    d.engine.withdraw_all();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    let refused = issue(&d.engine).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert!(refused.to_string().contains("audit log"), "{refused}");
    assert_eq!(d.engine.outstanding_tickets(), 0);
    assert_eq!(queries(&d.engine), (0, 0));
    assert!(close(epsilon_spent(&d.engine), 0.0));
}

/// The ticket expires unredeemed: swept (or evicted by the next issue), it
/// gives both back; redeeming it later is refused and counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_evicted_tickets_return_both_holds() {
    let d = deployment("ticket_ttl = \"1s\"").await;
    let swept = issue(&d.engine).await.unwrap();
    assert_eq!(queries(&d.engine), (0, 1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    d.engine.purge_expired();
    assert_eq!(queries(&d.engine), (0, 0));
    assert!(close(epsilon_spent(&d.engine), 0.0));
    let late = redeem_all(&d.engine, &swept.ticket).await.unwrap_err();
    assert_eq!(late.code(), Code::PermissionDenied, "{late}");

    // Evicted: the next issue drops the expired entry on its way in.
    let _evicted = issue(&d.engine).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = issue(&d.engine).await.unwrap();
    assert_eq!(queries(&d.engine), (0, 1), "only the fresh ticket holds");
    assert!(close(epsilon_spent(&d.engine), 0.4));
    redeem_all(&d.engine, &fresh.ticket).await.unwrap();
    assert_eq!(queries(&d.engine), (1, 0));
    assert!(close(epsilon_spent(&d.engine), 0.4));
}

/// DoGet refuses the ticket before reading (the policy changed since it was
/// issued): both holds come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_refused_at_doget_returns_both_holds() {
    let d = deployment("").await;
    let issued = issue(&d.engine).await.unwrap();
    let policy = d.state.parent().unwrap().join("policy.yaml");
    let changed = POLICY.replace("queries_per_day: 2", "queries_per_day: 3");
    std::fs::write(&policy, changed).unwrap();
    d.engine.policy().reload().unwrap();
    let refused = redeem_all(&d.engine, &issued.ticket).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.to_string().contains("policy changed"), "{refused}");
    assert_eq!(queries(&d.engine), (0, 0));
    assert!(close(epsilon_spent(&d.engine), 0.0));
}

/// The quota admits no third query while two are counted or held, and the
/// refusal holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_refusal_holds_nothing() {
    let d = deployment("").await;
    let a = issue(&d.engine).await.unwrap();
    redeem_all(&d.engine, &a.ticket).await.unwrap();
    let _pending = issue(&d.engine).await.unwrap();
    assert_eq!(queries(&d.engine), (1, 1));
    assert!(close(epsilon_spent(&d.engine), 0.8));
    let refused = issue(&d.engine).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.to_string().contains("quotas.queries_per_day"),
        "{refused}"
    );
    assert_eq!(queries(&d.engine), (1, 1));
    assert!(close(epsilon_spent(&d.engine), 0.8));
}

/// Withdrawn at shutdown: what unredeemed tickets held comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_withdrawn_at_shutdown_return_both_holds() {
    let d = deployment("").await;
    let _a = issue(&d.engine).await.unwrap();
    let _b = issue(&d.engine).await.unwrap();
    assert_eq!(queries(&d.engine), (0, 2));
    assert!(close(epsilon_spent(&d.engine), 0.8));
    d.engine.withdraw_all();
    assert_eq!(queries(&d.engine), (0, 0));
    assert!(close(epsilon_spent(&d.engine), 0.0));
}
