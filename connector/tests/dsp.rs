//! The Dataspace Protocol (DSP 2025-1) end to end, as real processes over
//! HTTPS with mTLS: one Sluice as the provider, the `sluice dsp` CLI as the
//! consumer (its callback endpoint included). Catalog → negotiation
//! (automatic and manual offers) → transfer → Flight SQL query with the
//! transfer's token → termination → the query is refused. And the errors
//! the specification prescribes for messages its state machines forbid.
//!
//! Every message the consumer receives is checked against the 2025-1
//! structure by the CLI before it is used, and every message the provider
//! receives by the provider: a test that passes has exchanged only valid
//! messages. The raw answers checked here are checked again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Daemon, fetch, status};
use serde_json::{Value, json};
use sluice::dsp::https::{Outbound, TlsFiles};
use sluice::dsp::wire::{CONTEXT, Message};
use tonic::Code;

/// The demo policy, with the research institute's `zones` grant behind an
/// automatic agreement (its `trips` grant already needs a manual one).
fn policy(dir: &Path) -> PathBuf {
    let demo = std::fs::read_to_string(common::demo_policy()).unwrap();
    let zones = "      zones:\n        columns: { zone_id: raw, district: raw, population: raw, area_km2: raw }\n";
    assert!(demo.contains(zones), "the demo policy changed");
    let text = demo.replace(
        zones,
        &format!("{zones}        agreement: {{ approval: automatic }}\n"),
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Provider {
    daemon: Daemon,
    url: String,
    _dir: tempfile::TempDir,
}

fn provider() -> Provider {
    let dir = common::temp_dir();
    let state = dir.path().join("state");
    let args = vec![
        "--state-dir".to_string(),
        state.display().to_string(),
        "--policy".to_string(),
        policy(dir.path()).display().to_string(),
    ];
    let daemon = Daemon::start_args(&args, state);
    let url = daemon.dsp_url();
    Provider {
        daemon,
        url,
        _dir: dir,
    }
}

impl Provider {
    /// `sluice ARGS` as demo identity `identity` of the provider's PKI.
    fn cli(&self, identity: &str, args: &[&str]) -> Output {
        common::sluice()
            .args(args)
            .args(["--state-dir"])
            .arg(&self.daemon.state_dir)
            .args(["--identity", identity])
            .output()
            .unwrap()
    }

    fn dsp(&self, identity: &str, args: &[&str]) -> String {
        let out = self.cli(identity, args);
        assert!(
            out.status.success(),
            "sluice {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `sluice query` as `identity`, with `token` if given.
    fn query(&self, identity: &str, token: Option<&str>, sql: &str) -> Output {
        let endpoint = self.daemon.endpoint();
        let mut args = vec!["query", "--endpoint", &endpoint, "-f", "csv"];
        if let Some(token) = token {
            args.extend(["--token", token]);
        }
        args.push(sql);
        self.cli(identity, &args)
    }

    fn client(&self, identity: &str) -> reqwest::Client {
        let pki = self.daemon.pki();
        Outbound::new(TlsFiles {
            cert: pki.join(format!("{identity}.pem")),
            key: pki.join(format!("{identity}.key")),
            ca: pki.join("ca.pem"),
        })
        .unwrap()
        .by_host_name()
        .unwrap()
    }

    fn base(&self) -> String {
        format!("{}/dsp/2025-1", self.url)
    }
}

/// `name: value` from the CLI's output.
fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no `{name}:` in {out}"))
        .trim()
        .to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn audit_records(provider: &Provider, agreement: &str) -> Vec<String> {
    let log = std::fs::read_to_string(provider.daemon.state_dir.join("audit/audit.jsonl")).unwrap();
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["record"]["entry"]["agreements"] == json!([agreement]))
        .map(|r| {
            r["record"]["entry"]["outcome"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_negotiates_transfers_queries_and_ends_its_use_over_dsp() {
    let p = provider();
    let url = p.url.as_str();

    // The catalog: the research institute's grants, as offers.
    let catalog: Value =
        serde_json::from_str(&p.dsp("research", &["dsp", "catalog", url, "--json"])).unwrap();
    Message::Catalog.check(&catalog).unwrap();
    let offers: Vec<&str> = catalog["dataset"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["hasPolicy"].as_array().unwrap())
        .map(|o| o["@id"].as_str().unwrap())
        .collect();
    assert_eq!(offers, ["trips/city-research", "zones/city-research"]);
    let trips = &catalog["dataset"][0];
    let constraints = trips["hasPolicy"][0]["permission"][0]["constraint"].to_string();
    assert!(
        constraints.contains(
            r#""leftOperand":"purpose","operator":"isAnyOf","rightOperand":["research"]"#
        ),
        "{constraints}"
    );
    assert!(constraints.contains("epsilonPerQuery"), "{constraints}");
    assert_eq!(trips["distribution"][0]["format"], "ArrowFlightSQL-PULL");
    assert_eq!(
        trips["distribution"][0]["accessService"]["endpointURL"],
        p.daemon.endpoint().as_str()
    );
    // Another consumer's catalog holds its own grants only.
    let supplier: Value =
        serde_json::from_str(&p.dsp("supplier", &["dsp", "catalog", url, "--json"])).unwrap();
    assert!(
        !supplier.to_string().contains("city-research"),
        "{supplier}"
    );

    // An automatic offer: agreed at once; usable only with a transfer's
    // token. It lists no purpose, so the consumer states one.
    let unstated = p.cli(
        "research",
        &["dsp", "negotiate", url, "zones/city-research"],
    );
    assert!(
        stderr(&unstated).contains("state the purpose"),
        "{}",
        stderr(&unstated)
    );
    let negotiated = p.dsp(
        "research",
        &[
            "dsp",
            "negotiate",
            url,
            "zones/city-research",
            "--purpose",
            "research",
        ],
    );
    let agreement = field(&negotiated, "agreement");
    let zones = "SELECT count(*) AS n FROM zones";
    let without = p.query("research", None, zones);
    assert!(!without.status.success());
    assert!(
        stderr(&without).contains("FAILED_PRECONDITION"),
        "{}",
        stderr(&without)
    );
    let started = p.dsp("research", &["dsp", "transfer", url, &agreement]);
    let (transfer, token) = (field(&started, "transfer"), field(&started, "token"));
    assert_eq!(field(&started, "endpoint"), p.daemon.endpoint());
    let with = p.query("research", Some(&token), zones);
    assert!(with.status.success(), "{}", stderr(&with));
    assert_eq!(String::from_utf8_lossy(&with.stdout), "n\n40\n");
    // The token is bound to the consumer: another certificate cannot use it.
    let foreign = p.query("planning", Some(&token), zones);
    assert!(
        stderr(&foreign).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&foreign)
    );
    assert!(
        !stderr(&foreign).contains(&token),
        "a token never appears in an error"
    );

    // A ticket issued before the transfer ends is refused after it.
    let mut client = p.daemon.client("research").await;
    client.set_header("authorization", format!("Bearer {token}"));
    let info = client.execute(zones.to_string(), None).await.unwrap();
    p.dsp("research", &["dsp", "end", url, &transfer]);
    let refused = status(fetch(&mut client, &info).await.unwrap_err());
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("transfer ended"), "{refused:?}");
    let after = p.query("research", Some(&token), zones);
    assert!(
        stderr(&after).contains("access token"),
        "{}",
        stderr(&after)
    );
    // The transfer's GET says how it ended.
    let process: Value = p
        .client("research")
        .get(format!("{}/transfers/{transfer}", p.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Message::TransferProcess.check(&process).unwrap();
    assert_eq!(process["state"], "TERMINATED");

    // A manual offer waits for the provider's administrator.
    let negotiating = common::sluice()
        .args([
            "dsp",
            "negotiate",
            url,
            "trips/city-research",
            "--wait",
            "60s",
        ])
        .arg("--state-dir")
        .arg(&p.daemon.state_dir)
        .args(["--identity", "research"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let endpoint = p.daemon.endpoint();
    let admin = [
        "admin",
        "agreements",
        "list",
        "--state",
        "pending",
        "--endpoint",
        &endpoint,
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        let listed = p.dsp("admin", &admin);
        if let Some(line) = listed.lines().find(|l| l.contains("trips/city-research")) {
            break line.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no pending agreement");
        std::thread::sleep(Duration::from_millis(200));
    };
    p.dsp(
        "admin",
        &[
            "admin",
            "agreements",
            "approve",
            &pending,
            "--reason",
            "DUA signed",
            "--endpoint",
            &endpoint,
        ],
    );
    let negotiated = negotiating.wait_with_output().unwrap();
    assert!(negotiated.status.success(), "{}", stderr(&negotiated));
    assert_eq!(
        field(&String::from_utf8_lossy(&negotiated.stdout), "agreement"),
        pending
    );
    let started = p.dsp("research", &["dsp", "transfer", url, &pending]);
    let token = field(&started, "token");
    let dp = p.query(
        "research",
        Some(&token),
        "SELECT count(*) AS trips FROM trips",
    );
    assert!(dp.status.success(), "{}", stderr(&dp));
    // Recorded as any agreement is: requested, approved.
    assert_eq!(audit_records(&p, &pending)[..2], ["requested", "approved"]);

    // Revoking the agreement ends its transfers: the token stops working.
    p.dsp(
        "admin",
        &[
            "admin",
            "agreements",
            "revoke",
            &pending,
            "--reason",
            "project ended",
            "--endpoint",
            &endpoint,
        ],
    );
    let revoked = p.query(
        "research",
        Some(&token),
        "SELECT count(*) AS trips FROM trips",
    );
    assert!(!revoked.status.success());
    let why = stderr(&revoked);
    assert!(
        why.contains("access token") || why.contains("request one for offer"),
        "{why}"
    );
    // And no new transfer starts under it.
    let again = p.cli("research", &["dsp", "transfer", url, &pending]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("no longer active") || stderr(&again).contains("TERMINATED"),
        "{}",
        stderr(&again)
    );
}

async fn post(client: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn request(offer: &str, target: &str) -> Value {
    json!({
        "@context": [CONTEXT],
        "@type": "ContractRequestMessage",
        "consumerPid": "urn:uuid:00000000-0000-4000-8000-000000000001",
        "callbackAddress": "https://127.0.0.1:9/callback",
        "offer": {"@type": "Offer", "@id": offer, "target": target, "permission": [{"action": "use"}]},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_the_state_machines_forbid_get_the_specifications_errors() {
    let p = provider();
    let research = p.client("research");
    let planning = p.client("planning");
    let base = p.base();
    let negotiation_error = |(status, body): (u16, Value), expected: u16, code: &str| {
        assert_eq!(status, expected, "{body}");
        Message::ContractNegotiationError.check(&body).unwrap();
        assert_eq!(body["code"], code, "{body}");
    };

    // An offer that is not made to the caller, or does not exist.
    for offer in ["trips/city-planning", "nothing/here"] {
        let answer = post(
            &research,
            format!("{base}/negotiations/request"),
            &request(offer, "trips"),
        )
        .await;
        negotiation_error(answer, 400, "unknown-offer");
    }
    // Not DSP 2025-1: a bare-string context; a prefixed type.
    let mut bare = request("trips/city-research", "trips");
    bare["@context"] = json!(CONTEXT);
    let (status, body) = post(&research, format!("{base}/negotiations/request"), &bare).await;
    assert_eq!(status, 400);
    assert!(
        body["reason"][0].as_str().unwrap().contains("@context"),
        "{body}"
    );
    // A manual offer: REQUESTED until an admin decides.
    let (status, ack) = post(
        &research,
        format!("{base}/negotiations/request"),
        &request("trips/city-research", "trips"),
    )
    .await;
    assert_eq!(status, 201, "{ack}");
    Message::ContractNegotiation.check(&ack).unwrap();
    assert_eq!(ack["state"], "REQUESTED");
    let pid = ack["providerPid"].as_str().unwrap().to_string();
    let consumer_pid = ack["consumerPid"].as_str().unwrap();
    let pids = json!({"providerPid": pid, "consumerPid": consumer_pid});
    let message = |kind: &str| {
        let mut m = json!({"@context": [CONTEXT], "@type": kind});
        m.as_object_mut()
            .unwrap()
            .extend(pids.as_object().unwrap().clone());
        m
    };
    // A verification before the agreement.
    let verify = message("ContractAgreementVerificationMessage");
    let answer = post(
        &research,
        format!("{base}/negotiations/{pid}/agreement/verification"),
        &verify,
    )
    .await;
    negotiation_error(answer, 400, "invalid-state");
    // Another consumer's negotiation: not found, as if it did not exist.
    let seen = planning
        .get(format!("{base}/negotiations/{pid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status().as_u16(), 404);
    let answer = post(
        &planning,
        format!("{base}/negotiations/{pid}/termination"),
        &message("ContractNegotiationTerminationMessage"),
    )
    .await;
    negotiation_error(answer, 404, "not-found");
    // A consumer's FINALIZED event: the provider's to send.
    let mut event = message("ContractNegotiationEventMessage");
    event["eventType"] = json!("FINALIZED");
    let answer = post(
        &research,
        format!("{base}/negotiations/{pid}/events"),
        &event,
    )
    .await;
    negotiation_error(answer, 400, "invalid-state");
    // The consumer terminates: the pending agreement is rejected.
    let (status, _) = post(
        &research,
        format!("{base}/negotiations/{pid}/termination"),
        &message("ContractNegotiationTerminationMessage"),
    )
    .await;
    assert_eq!(status, 200);
    let state: Value = research
        .get(format!("{base}/negotiations/{pid}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["state"], "TERMINATED");
    let answer = post(
        &research,
        format!("{base}/negotiations/{pid}/termination"),
        &message("ContractNegotiationTerminationMessage"),
    )
    .await;
    negotiation_error(answer, 400, "invalid-state");
    let listed = p.dsp(
        "admin",
        &[
            "admin",
            "agreements",
            "list",
            "--endpoint",
            &p.daemon.endpoint(),
        ],
    );
    assert!(
        listed
            .lines()
            .any(|l| l.contains("rejected") && l.contains("trips/city-research")),
        "{listed}"
    );

    // A transfer under that (terminated) negotiation's agreement.
    let agreement = listed
        .lines()
        .find(|l| l.contains("rejected"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let transfer = json!({
        "@context": [CONTEXT], "@type": "TransferRequestMessage",
        "consumerPid": "urn:uuid:00000000-0000-4000-8000-000000000002",
        "agreementId": agreement, "format": "ArrowFlightSQL-PULL",
        "callbackAddress": "https://127.0.0.1:9/callback",
    });
    let (status, body) = post(&research, format!("{base}/transfers/request"), &transfer).await;
    assert_eq!(status, 400, "{body}");
    Message::TransferError.check(&body).unwrap();
    assert_eq!(body["code"], "invalid-state", "{body}");
    // Another consumer asking for a transfer under it: not its agreement.
    let (status, body) = post(&planning, format!("{base}/transfers/request"), &transfer).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("unknown-agreement")),
        "{body}"
    );
    // A transfer process that does not exist.
    let missing = research
        .get(format!("{base}/transfers/urn:uuid:nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    // The catalog refuses filters it cannot apply, and names no dataset it hides.
    let filtered =
        json!({"@context": [CONTEXT], "@type": "CatalogRequestMessage", "filter": [{"x": 1}]});
    let (status, body) = post(&research, format!("{base}/catalog/request"), &filtered).await;
    assert_eq!(status, 400);
    Message::CatalogError.check(&body).unwrap();
    for dataset in ["machine_events", "no_such_dataset"] {
        let hidden = research
            .get(format!("{base}/catalog/datasets/{dataset}"))
            .send()
            .await
            .unwrap();
        assert_eq!(hidden.status().as_u16(), 404);
        let body: Value = hidden.json().await.unwrap();
        assert_eq!(
            body["reason"][0],
            format!("no dataset `{dataset}` is offered to you")
        );
    }
    let dataset: Value = research
        .get(format!("{base}/catalog/datasets/trips"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Message::Dataset.check(&dataset).unwrap();

    // An offer that needs no agreement is used directly: nothing to negotiate.
    let answer = post(
        &planning,
        format!("{base}/negotiations/request"),
        &request("trips/city-planning", "trips"),
    )
    .await;
    negotiation_error(answer, 400, "no-agreement-needed");

    // One consumer holds at most 16 open negotiations (each may hold a
    // delivery to its callback); the 17th is refused until some end.
    let mut refused = None;
    for i in 0..17 {
        let mut asked = request("trips/city-research", "trips");
        asked["consumerPid"] = json!(format!("urn:uuid:00000000-0000-4000-8000-{i:012}"));
        let (status, body) = post(&research, format!("{base}/negotiations/request"), &asked).await;
        if status != 201 {
            refused = Some((i, body));
            break;
        }
    }
    let (at, body) = refused.expect("a cap on open negotiations");
    assert_eq!(
        (at, body["code"].as_str()),
        (16, Some("too-many-processes")),
        "{body}"
    );

    // An agreement requested over sluice.v1 is never a DSP negotiation's
    // (that one is its negotiator's alone, usable only with its tokens).
    let endpoint = p.daemon.endpoint();
    let requested = p.dsp(
        "research",
        &[
            "agreements",
            "request",
            "trips/city-research",
            "--purpose",
            "research",
            "--endpoint",
            &endpoint,
        ],
    );
    assert!(requested.contains("pending"), "{requested}");
    let pending = p.dsp(
        "admin",
        &[
            "admin",
            "agreements",
            "list",
            "--state",
            "pending",
            "--endpoint",
            &endpoint,
        ],
    );
    assert_eq!(
        pending.lines().count(),
        17,
        "16 negotiations and one request: {pending}"
    );
}
