//! The control plane through the real daemon over mTLS: the catalog as each
//! consumer sees it, agreements gating queries (and revocation reaching
//! tickets already issued), the signed audit log with its offline
//! verification (tampering named at the first bad record), and receipts
//! surviving SIGKILL.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, fetch, query, status};
use sluice::client::{Connection, TlsFiles};
use sluice_proto::v1 as pb;
use sluice_proto::v1::agreement_service_client::AgreementServiceClient;
use sluice_proto::v1::audit_service_client::AuditServiceClient;
use sluice_proto::v1::catalog_service_client::CatalogServiceClient;
use tonic::Code;
use tonic::transport::Channel;

async fn catalog(daemon: &Daemon, identity: &str) -> Vec<pb::Dataset> {
    let mut client = CatalogServiceClient::new(daemon.channel(identity).await);
    client
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("ListDatasets")
        .into_inner()
        .datasets
}

fn names(datasets: &[pb::Dataset]) -> Vec<&str> {
    datasets.iter().map(|d| d.name.as_str()).collect()
}

fn columns(dataset: &pb::Dataset) -> Vec<&str> {
    dataset.columns.iter().map(|c| c.name.as_str()).collect()
}

#[tokio::test]
async fn the_catalog_shows_each_consumer_only_what_its_policy_allows() {
    let daemon = Daemon::start_demo_policy_with(&[]);

    let planning = catalog(&daemon, "planning").await;
    assert_eq!(names(&planning), ["trips", "zones"]);
    let trips = &planning[0];
    for hidden in ["card_id", "trip_id"] {
        assert!(
            !columns(trips).contains(&hidden),
            "{hidden} is hidden from planning"
        );
    }
    let start_time = trips
        .columns
        .iter()
        .find(|c| c.name == "start_time")
        .unwrap();
    assert_eq!(start_time.visibility, "masked");
    assert_eq!(start_time.mask, "truncated to hour");
    let fare = trips.columns.iter().find(|c| c.name == "fare_eur").unwrap();
    assert_eq!(fare.visibility, "aggregate_only");
    assert_eq!(fare.tags, ["personal"]);
    assert_eq!(trips.offers.len(), 1);
    assert_eq!(trips.offers[0].id, "trips/city-planning");
    assert_eq!(trips.offers[0].mode, "aggregate");
    assert_eq!(trips.offers[0].min_group_size, 10);
    assert_eq!(trips.offers[0].agreement, "none");
    assert_eq!(trips.publisher, "City Transport Agency");
    assert!(!trips.modified.is_empty());

    let supplier = catalog(&daemon, "supplier").await;
    assert_eq!(names(&supplier), ["machine_events", "zones"]);
    let mut zone_columns = columns(&supplier[1]);
    zone_columns.sort();
    assert_eq!(
        zone_columns,
        ["district", "zone_id"],
        "population is hidden"
    );
    let serial = supplier[0]
        .columns
        .iter()
        .find(|c| c.name == "machine_serial")
        .unwrap();
    assert_eq!(
        (serial.data_type.as_str(), serial.mask.as_str()),
        ("Utf8", "keyed hash")
    );
    assert_eq!(supplier[0].offers[0].mode, "raw");

    let research = catalog(&daemon, "research").await;
    let offer = &research[0].offers[0];
    assert_eq!(offer.id, "trips/city-research");
    assert_eq!(
        (offer.mode.as_str(), offer.agreement.as_str()),
        ("dp", "manual")
    );
    let dp = offer.dp.as_ref().unwrap();
    assert_eq!((dp.epsilon_per_query, dp.budget_epsilon), (1.0, 10.0));
    assert_eq!(dp.budget_period, "month");
    assert_eq!(offer.agreement_duration_seconds, 30 * 86_400);
    let fare = research[0]
        .columns
        .iter()
        .find(|c| c.name == "fare_eur")
        .unwrap();
    assert_eq!(fare.dp_bounds, [0.0, 10.0]);
    assert!(!columns(&research[0]).contains(&"age_band"));

    // The provider's admin is no consumer: nothing is offered to it.
    assert!(catalog(&daemon, "admin").await.is_empty());

    // A hidden dataset and a missing one are refused alike.
    let mut client = CatalogServiceClient::new(daemon.channel("supplier").await);
    let hidden = client
        .get_dataset(pb::GetDatasetRequest {
            name: "trips".into(),
        })
        .await
        .unwrap_err();
    let missing = client
        .get_dataset(pb::GetDatasetRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (hidden.code(), missing.code()),
        (Code::NotFound, Code::NotFound)
    );
    assert_eq!(
        hidden.message().replace("trips", "X"),
        missing.message().replace("nope", "X")
    );

    // Pages of one walk the whole list; filters narrow it.
    let mut client = CatalogServiceClient::new(daemon.channel("planning").await);
    let (mut token, mut walked) = (String::new(), Vec::new());
    loop {
        let page = client
            .list_datasets(pb::ListDatasetsRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total, 2);
        walked.extend(page.datasets.into_iter().map(|d| d.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(walked, ["trips", "zones"]);
    let mobility = client
        .list_datasets(pb::ListDatasetsRequest {
            keyword: "MOBILITY".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&mobility.datasets), ["trips"]);
    let bad = client
        .list_datasets(pb::ListDatasetsRequest {
            classification: "secret".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

const PEOPLE: &str = "id,city,score\n1,Aarhus,10\n2,Bergen,20\n3,Cork,30\n";

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
        columns: { city: raw, score: raw }
        purposes: [research, planning]
        agreement: { approval: manual }
  - name: suppliers
    match: { organization: Axle Supplier Consortium }
    grants:
      people:
        columns: { city: raw }
        agreement: { approval: automatic, valid_for_days: 1 }
"#;

async fn agreements(daemon: &Daemon, identity: &str) -> AgreementServiceClient<Channel> {
    AgreementServiceClient::new(daemon.channel(identity).await)
}

fn decide(id: &str) -> pb::DecideAgreementRequest {
    pb::DecideAgreementRequest {
        id: id.to_string(),
        reason: "test".into(),
    }
}

#[tokio::test]
async fn agreements_gate_queries_and_revocation_reaches_issued_tickets() {
    let (_dir, config, state) = common::people_deployment(PEOPLE, AGREEMENT_POLICY);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut planning = daemon.client("planning").await;
    planning.set_header("x-sluice-purpose", "research");
    let sql = "SELECT city, score FROM people";

    let refused = status(query(&mut planning, sql).await.unwrap_err());
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("offer `people/analysts`"),
        "{refused:?}"
    );
    assert!(refused.message().contains("audit receipt r"), "{refused:?}");

    let mut as_planning = agreements(&daemon, "planning").await;
    let request = |purpose: &str| pb::RequestAgreementRequest {
        offer_id: "people/analysts".into(),
        purpose: purpose.into(),
    };
    let bad = as_planning
        .request_agreement(request("marketing"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let pending = as_planning
        .request_agreement(request("research"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.state(), pb::AgreementState::Pending);
    assert_eq!(pending.organization, "City Planning Agency");
    // Pending is not enough.
    let refused = status(query(&mut planning, sql).await.unwrap_err());
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Only an admin decides.
    let denied = as_planning
        .approve_agreement(decide(&pending.id))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut as_admin = agreements(&daemon, "admin").await;
    let active = as_admin
        .approve_agreement(decide(&pending.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.state(), pb::AgreementState::Active);
    assert_eq!(active.expires_at, "", "no valid_for_days: no expiry");

    let (_, batches) = query(&mut planning, sql)
        .await
        .expect("allowed under the agreement");
    assert_eq!(common::rows(&batches), 3);
    // The agreement fixes the purpose when the query declares none, and a
    // different declared purpose is refused.
    let mut undeclared = daemon.client("planning").await;
    query(&mut undeclared, sql)
        .await
        .expect("the agreement's purpose applies");
    let mut other = daemon.client("planning").await;
    other.set_header("x-sluice-purpose", "planning");
    let wrong = status(query(&mut other, sql).await.unwrap_err());
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert!(
        wrong.message().contains("covers purpose `research`"),
        "{wrong:?}"
    );

    // A ticket issued before the revocation is refused after it.
    let info = planning.execute(sql.to_string(), None).await.unwrap();
    as_admin
        .revoke_agreement(decide(&pending.id))
        .await
        .unwrap();
    let stale = status(fetch(&mut planning, &info).await.unwrap_err());
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("no longer active"), "{stale:?}");
    let refused = status(query(&mut planning, sql).await.unwrap_err());
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Consumers see their own agreements; admins see all; state filters.
    let mut as_supplier = agreements(&daemon, "supplier").await;
    let automatic = as_supplier
        .request_agreement(pb::RequestAgreementRequest {
            offer_id: "people/suppliers".into(),
            purpose: "quality".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(automatic.state(), pb::AgreementState::Active);
    assert!(!automatic.expires_at.is_empty(), "valid_for_days: 1");
    let mut supplier = daemon.client("supplier").await;
    query(&mut supplier, "SELECT city FROM people")
        .await
        .expect("automatic approval");
    let hidden = as_supplier
        .get_agreement(pb::GetAgreementRequest {
            id: pending.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    let own = as_supplier
        .list_agreements(pb::ListAgreementsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agreements;
    assert_eq!(own.len(), 1);
    let all = as_admin
        .list_agreements(pb::ListAgreementsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agreements;
    assert_eq!(all.len(), 2);
    let revoked = as_admin
        .list_agreements(pb::ListAgreementsRequest {
            state: pb::AgreementState::Revoked as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agreements;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].id, pending.id);
    // A supplier may not ask for the analysts' offer.
    let foreign = as_supplier
        .request_agreement(request("research"))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
}

/// `sluice <args>`; returns (success, stdout + stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = common::sluice()
        .args(args)
        .output()
        .expect("running sluice");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn verify(log: &Path, key: &Path) -> (bool, String) {
    verify_with(log, key, &[])
}

/// `sluice audit verify --log LOG --public-key KEY EXTRA…`.
fn verify_with(log: &Path, key: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "audit",
        "verify",
        "--log",
        log.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cli(&args)
}

/// A finished audit log of a few real queries: (its state dir, guard).
async fn audited_deployment() -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let policy = AGREEMENT_POLICY.replace("agreement: { approval: manual }", "");
    let (dir, config, state) = common::people_deployment(PEOPLE, &policy);
    let mut daemon = Daemon::start_isolated(&config, &state);
    let tls = TlsFiles::from_state_dir(&state, "planning");
    let mut conn = Connection::connect(&daemon.endpoint(), &tls).await.unwrap();
    conn.set_purpose("research").unwrap();
    for sql in [
        "SELECT city FROM people",
        "SELECT count(*) FROM people",
        "SELECT nope FROM people",
        "SELECT score FROM people",
    ] {
        let _ = conn.query(sql).await;
    }
    let receipts = conn.receipts().to_vec();
    // Completion records are written as streams end; let them land, and let
    // the client's connection close (its task runs on this runtime).
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.terminate();
    assert!(
        daemon.wait(Duration::from_secs(30)).is_some(),
        "the daemon stops: {}",
        daemon.logs()
    );
    (dir, state, receipts)
}

#[tokio::test]
async fn audit_verify_names_the_first_bad_record_of_a_tampered_log() {
    let (dir, state, receipts) = audited_deployment().await;
    let log = state.join("audit/audit.jsonl");
    let key = state.join("audit/public-key.pem");
    let (ok, report) = verify(&log, &key);
    assert!(ok, "{report}");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert!(
        lines.len() >= 8,
        "decisions, releases and completions: {}",
        lines.len()
    );
    assert_eq!(receipts.len(), 3, "one receipt per answered query");

    // Each receipt the client got verifies against the provider's key and
    // matches its record.
    let verify_receipt = |receipt: &Path, record: Option<&Path>| {
        let mut args = vec![
            "receipt",
            "verify",
            receipt.to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
        ];
        if let Some(record) = record {
            args.extend(["--record", record.to_str().unwrap()]);
        }
        cli(&args)
    };
    for (i, receipt) in receipts.iter().enumerate() {
        let file = dir.path().join(format!("receipt-{i}.json"));
        std::fs::write(&file, receipt).unwrap();
        let (ok, out) = verify_receipt(&file, None);
        assert!(ok, "{out}");
        let id: serde_json::Value = serde_json::from_str(receipt).unwrap();
        let seq = id["seq"].as_u64().unwrap() as usize;
        let record = dir.path().join(format!("record-{i}.json"));
        std::fs::write(&record, &lines[seq]).unwrap();
        let (ok, out) = verify_receipt(&file, Some(&record));
        assert!(ok, "{out}");
        let previous = dir
            .path()
            .join(format!("record-{}.json", i.saturating_sub(1)));
        let (ok, out) = verify_receipt(&file, Some(&previous));
        assert_eq!(ok, i == 0, "a receipt matches only its own record: {out}");
    }

    let tampered = |name: &str, lines: Vec<String>| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        verify(&path, &key)
    };
    // One byte of record 3 changed.
    let mut edited = lines.clone();
    let target = edited[3].find("\"principal\":\"").unwrap() + 14;
    let mut bytes = edited[3].clone().into_bytes();
    bytes[target] ^= 0x01;
    edited[3] = String::from_utf8(bytes).unwrap();
    let (ok, out) = tampered("byte.jsonl", edited);
    assert!(
        !ok && out.contains("record 3") && out.contains("changed"),
        "{out}"
    );

    // Record 2 deleted: the record after it is the first bad one.
    let mut deleted = lines.clone();
    deleted.remove(2);
    let (ok, out) = tampered("deleted.jsonl", deleted);
    assert!(
        !ok && out.contains("expected record 2, found record 3"),
        "{out}"
    );

    // Records 4 and 5 swapped.
    let mut swapped = lines.clone();
    swapped.swap(4, 5);
    let (ok, out) = tampered("swapped.jsonl", swapped);
    assert!(!ok && out.contains("line 5"), "{out}");

    // Record 1's content rewritten with a correct hash but a signature
    // taken from another record: a forgery.
    let mut forged = lines.clone();
    let other: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let mut record: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    record["signature"] = other["signature"].clone();
    forged[1] = record.to_string();
    let (ok, out) = tampered("forged.jsonl", forged);
    assert!(
        !ok && out.contains("record 1") && out.contains("signature"),
        "{out}"
    );

    // Verifying from record 4 on skips a problem before it.
    let mut early = lines.clone();
    early.remove(2);
    let path = dir.path().join("early.jsonl");
    std::fs::write(&path, early.join("\n") + "\n").unwrap();
    let (ok, out) = verify_with(&path, &key, &["--from", "4"]);
    assert!(ok, "{out}");

    // A head published earlier must still be in the log: cutting the log
    // before it is detected even though the rest still chains.
    let published: serde_json::Value = serde_json::from_str(&lines[5]).unwrap();
    let published = published["hash"].as_str().unwrap();
    let truncated = dir.path().join("truncated.jsonl");
    std::fs::write(&truncated, lines[..5].join("\n") + "\n").unwrap();
    for (log, expected) in [(&log, true), (&truncated, false)] {
        let (ok, out) = verify_with(log, &key, &["--head", published]);
        assert_eq!(ok, expected, "{out}");
        if !expected {
            assert!(out.contains("not in the log"), "{out}");
        }
    }

    // Export is the log, line for line.
    let (ok, out) = cli(&[
        "audit",
        "export",
        "--log",
        log.to_str().unwrap(),
        "--from",
        "2",
    ]);
    assert!(ok);
    assert_eq!(out.lines().collect::<Vec<_>>(), lines[2..]);
}

#[tokio::test]
async fn receipts_are_readable_by_their_organization_and_admins_only() {
    let daemon = Daemon::start_demo_policy_with(&[]);
    let tls = TlsFiles::from_state_dir(&daemon.state_dir, "planning");
    let mut conn = Connection::connect(&daemon.endpoint(), &tls).await.unwrap();
    conn.set_purpose("research").unwrap();
    conn.query("SELECT mode, count(*) FROM trips GROUP BY mode")
        .await
        .unwrap();
    let receipt = sluice::audit::Receipt::from_header(&conn.receipts()[0]).unwrap();
    let get = |id: &str| pb::GetReceiptRequest {
        receipt_id: id.to_string(),
    };
    let mut as_planning = AuditServiceClient::new(daemon.channel("planning").await);
    let record = as_planning
        .get_receipt(get(&receipt.receipt_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (record.event.as_str(), record.outcome.as_str()),
        ("release", "released")
    );
    assert_eq!(record.hash, receipt.hash);
    assert_eq!(record.datasets, ["trips"]);
    assert_eq!(record.organization, "City Planning Agency");
    assert_eq!(record.purpose, "research");
    assert!(!record.plan_hash.is_empty() && record.policy_version.starts_with("sha256:"));
    let mut as_supplier = AuditServiceClient::new(daemon.channel("supplier").await);
    let foreign = as_supplier
        .get_receipt(get(&receipt.receipt_id))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    let mut as_admin = AuditServiceClient::new(daemon.channel("admin").await);
    as_admin
        .get_receipt(get(&receipt.receipt_id))
        .await
        .unwrap();
    let head = as_admin
        .get_chain_head(pb::GetChainHeadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(head.records > record.seq);
    assert!(
        head.public_key_pem
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    // Listing: planning sees only its organization's records.
    let mut token = String::new();
    let mut seen = false;
    loop {
        let page = as_planning
            .list_receipts(pb::ListReceiptsRequest {
                page_size: 500,
                page_token: token,
                event: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        for r in &page.records {
            assert_eq!(r.organization, "City Planning Agency");
            seen |= r.receipt_id == receipt.receipt_id;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(seen, "the receipt is among planning's records");
}

/// Queries in a loop until the daemon dies, keeping every receipt received.
async fn storm(mut conn: Connection, receipts: Arc<Mutex<Vec<String>>>, seed: usize) {
    for i in 0.. {
        let sql = format!("SELECT city, score FROM people WHERE score > -{seed}{i}");
        let ok = conn.query(&sql).await.is_ok();
        // A receipt arrives with the DoGet headers, before the data: keep it
        // even when the stream then broke.
        *receipts.lock().unwrap() = conn.receipts().to_vec();
        if !ok {
            return;
        }
    }
}

#[tokio::test]
async fn after_sigkill_the_chain_verifies_and_holds_every_receipt_a_client_got() {
    let policy = AGREEMENT_POLICY.replace("agreement: { approval: manual }", "");
    let (_dir, config, state) = common::people_deployment(PEOPLE, &policy);
    let mut received: Vec<String> = Vec::new();
    for (round, after_ms) in [600u64, 1100, 1700].into_iter().enumerate() {
        let mut daemon = Daemon::start_isolated(&config, &state);
        let per_client: Vec<Arc<Mutex<Vec<String>>>> =
            (0..4).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
        let mut tasks = Vec::new();
        for (seed, sink) in per_client.iter().enumerate() {
            let tls = TlsFiles::from_state_dir(&state, "planning");
            let mut conn = Connection::connect(&daemon.endpoint(), &tls).await.unwrap();
            conn.set_purpose("research").unwrap();
            tasks.push(tokio::spawn(storm(conn, sink.clone(), round * 10 + seed)));
        }
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        daemon.kill_hard();
        for task in tasks {
            task.await.unwrap();
        }
        let this_round: Vec<String> = per_client
            .iter()
            .flat_map(|sink| sink.lock().unwrap().clone())
            .collect();
        assert!(!this_round.is_empty(), "round {round}: no receipt received");
        received.extend(this_round);

        // Restart (repairs a torn tail, if any), then check offline.
        let daemon = Daemon::start_isolated(&config, &state);
        drop(daemon);
        let (ok, report) = verify(
            &state.join("audit/audit.jsonl"),
            &state.join("audit/public-key.pem"),
        );
        assert!(ok, "round {round}: {report}");
        let logged: HashMap<String, String> =
            std::fs::read_to_string(state.join("audit/audit.jsonl"))
                .unwrap()
                .lines()
                .map(|line| {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    (
                        v["record"]["receipt_id"].as_str().unwrap().to_string(),
                        v["hash"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
        for header in &received {
            let receipt = sluice::audit::Receipt::from_header(header).unwrap();
            assert_eq!(
                logged.get(&receipt.receipt_id),
                Some(&receipt.hash),
                "round {round}: receipt {} was handed out but is not in the log",
                receipt.receipt_id
            );
        }
    }
}

/// A ticket refused at DoGet (here: its agreement was revoked) read
/// nothing: the rows it reserved against the daily quota come back.
#[tokio::test]
async fn a_refused_ticket_gives_its_reserved_rows_back() {
    let policy = AGREEMENT_POLICY
        .replace(
            "    grants:\n      people:\n        columns: { city: raw, score: raw }",
            "    quotas: { rows_per_day: 3 }\n    grants:\n      people:\n        columns: { city: raw, score: raw }",
        )
        .replace("approval: manual", "approval: automatic");
    assert!(policy.contains("rows_per_day: 3"));
    let (_dir, config, state) = common::people_deployment(PEOPLE, &policy);
    let daemon = Daemon::start_isolated(&config, &state);
    let mut planning = daemon.client("planning").await;
    planning.set_header("x-sluice-purpose", "research");
    let mut as_planning = agreements(&daemon, "planning").await;
    let mut as_admin = agreements(&daemon, "admin").await;
    let request = pb::RequestAgreementRequest {
        offer_id: "people/analysts".into(),
        purpose: "research".into(),
    };
    let first = as_planning
        .request_agreement(request.clone())
        .await
        .unwrap()
        .into_inner();
    let sql = "SELECT city, score FROM people";
    // The ticket holds all 3 rows of the day.
    let info = planning.execute(sql.to_string(), None).await.unwrap();
    as_admin.revoke_agreement(decide(&first.id)).await.unwrap();
    let refused = status(fetch(&mut planning, &info).await.unwrap_err());
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    as_planning.request_agreement(request).await.unwrap();
    let (_, batches) = query(&mut planning, sql).await.expect("the rows came back");
    assert_eq!(common::rows(&batches), 3);
}

/// The CLI's agreement commands: a consumer requests, an admin approves.
#[tokio::test]
async fn the_cli_requests_and_an_admin_approves_an_agreement() {
    let (_dir, config, state) = common::people_deployment(PEOPLE, AGREEMENT_POLICY);
    let daemon = Daemon::start_isolated(&config, &state);
    let endpoint = daemon.endpoint();
    let state_dir = state.to_str().unwrap();
    let as_identity = |identity: &'static str, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--endpoint",
            endpoint.as_str(),
            "--state-dir",
            state_dir,
            "--identity",
            identity,
        ]);
        cli(&all)
    };
    let (ok, out) = as_identity(
        "planning",
        &[
            "agreements",
            "request",
            "people/analysts",
            "--purpose",
            "research",
        ],
    );
    assert!(ok && out.contains(": pending"), "{out}");
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("agr-"))
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let (ok, out) = as_identity("planning", &["admin", "agreements", "approve", &id]);
    assert!(!ok && out.contains("PERMISSION_DENIED"), "{out}");
    let (ok, out) = as_identity(
        "admin",
        &["admin", "agreements", "approve", &id, "--reason", "signed"],
    );
    assert!(
        ok && out.contains(": active") && out.contains("signed"),
        "{out}"
    );
    let (ok, out) = as_identity("planning", &["agreements", "list"]);
    assert!(ok && out.contains(&id) && out.contains("active"), "{out}");
}
