//! The audit trail for admins: a filtered timeline of decisions, releases,
//! completions and agreement changes, newest first; each record in full
//! with its receipt; whether the chain verifies, its head, and the command
//! that checks it offline; export as JSON lines. Consumers see their own
//! organization's records through the same timeline (`/receipts`).
//!
//! Who may read which record is `AuditReceipts::readable`, the gRPC
//! service's rule.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_audit::{AuditLog, SignedRecord};
use sluice_proto::v1 as pb;
use sluice_proto::v1::audit_service_server::AuditService;

use super::short_time;
use crate::console::calls::request;
use crate::console::chart::number;
use crate::console::html::{esc, table, td, url_part};
use crate::console::{Admin, Console, ConsoleError, User};
use crate::control::AuditReceipts;
use crate::control::audit::message;

/// Records a timeline page shows.
const SHOWN: usize = 200;
/// Records one page view reads at most, newest first, as one
/// `ListReceipts` call does: a filter that matches little cannot make a
/// page read the whole log (*Older records* goes on).
const MAX_SCANNED: u64 = sluice_audit::SCAN_WINDOW;
/// Records an export reads at most, newest first (`before=` goes on).
const MAX_EXPORTED: usize = 50_000;
/// Records read per step backwards: what one `scan` reads at most, so a
/// step reads exactly the records below where the last one started.
const STEP: u64 = sluice_audit::SCAN_WINDOW;

/// The timeline's filters (GET parameters); empty means any.
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    organization: String,
    #[serde(default)]
    dataset: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    outcome: String,
    /// A part of the rule's name.
    #[serde(default)]
    rule: String,
    /// RFC 3339, or a date (the whole day).
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    /// Only records before this seq (the next older page).
    before: Option<u64>,
}

impl Filters {
    fn matches(&self, record: &SignedRecord) -> bool {
        let e = &record.record.entry;
        let time = record.record.time.as_str();
        let exact = |want: &str, have: &str| want.is_empty() || want == have;
        exact(&self.organization, e.organization.as_deref().unwrap_or(""))
            && (self.dataset.is_empty() || e.datasets.iter().any(|d| d == &self.dataset))
            && exact(&self.event, &e.event)
            && exact(&self.outcome, &e.outcome)
            && (self.rule.is_empty() || e.rule.as_deref().is_some_and(|r| r.contains(&self.rule)))
            && (self.from.is_empty() || time >= self.from.as_str())
            && (self.to.is_empty() || until(time, &self.to))
    }

    /// The filters as a query string (without `before`).
    fn query(&self) -> String {
        [
            ("organization", &self.organization),
            ("dataset", &self.dataset),
            ("event", &self.event),
            ("outcome", &self.outcome),
            ("rule", &self.rule),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", url_part(v)))
        .collect::<Vec<_>>()
        .join("&")
    }

    fn form(&self, action: &str) -> String {
        let field = |name: &str, label: &str, value: &str, hint: &str| {
            format!(
                "<label>{label} <input name=\"{name}\" value=\"{}\" placeholder=\"{hint}\"></label> ",
                esc(value)
            )
        };
        format!(
            "<form id=\"filters\" method=\"get\" action=\"{action}\">{}{}{}{}{}{}{}<button type=\"submit\">Filter</button></form>",
            field("organization", "Organization", &self.organization, "any"),
            field("dataset", "Dataset", &self.dataset, "any"),
            field(
                "event",
                "Event",
                &self.event,
                "decision, release, completion, agreement"
            ),
            field(
                "outcome",
                "Outcome",
                &self.outcome,
                "allowed, denied, approved…"
            ),
            field("rule", "Rule", &self.rule, "part of a rule"),
            field("from", "From", &self.from, "2026-12-01"),
            field("to", "To", &self.to, "2026-12-31"),
        )
    }
}

/// Whether `time` is at or before `to` (a date includes its whole day).
fn until(time: &str, to: &str) -> bool {
    match to.len() {
        10 => time.get(..10).is_some_and(|day| day <= to),
        _ => time <= to,
    }
}

fn log(console: &Console) -> Result<&AuditLog, ConsoleError> {
    console.engine.audit().log().ok_or_else(|| {
        ConsoleError::Status(tonic::Status::unavailable(
            "this connector runs without an audit log",
        ))
    })
}

/// The newest records `user` may read that pass `filters`, at most
/// `limit` of the newest `scanned`, and the seq to continue before when
/// older ones may match.
fn newest(
    console: &Console,
    user: &User,
    filters: &Filters,
    (limit, scanned): (usize, u64),
) -> Result<(Vec<SignedRecord>, Option<u64>), ConsoleError> {
    let log = log(console)?;
    let readable = AuditReceipts::new(console.engine.clone()).readable(user.principal());
    let mut end = filters.before.unwrap_or(u64::MAX).min(log.head().records);
    let floor = end.saturating_sub(scanned);
    let mut found = Vec::new();
    while end > floor && found.len() < limit {
        let start = end.saturating_sub(STEP).max(floor);
        let (window, _) = crate::blocking::blocking(|| {
            log.scan(start, usize::MAX, |r| {
                r.record.seq < end && readable(r) && filters.matches(r)
            })
        })
        .map_err(read_failed)?;
        for record in window.into_iter().rev() {
            if found.len() == limit {
                return Ok((found, Some(end)));
            }
            end = record.record.seq;
            found.push(record);
        }
        end = end.min(start);
    }
    Ok((found, (end > 0).then_some(end)))
}

fn read_failed(e: sluice_audit::StoreError) -> ConsoleError {
    tracing::error!(error = %e, "reading the audit log failed");
    ConsoleError::Status(tonic::Status::internal(
        "reading the audit log failed (see the connector log)",
    ))
}

/// The admin's timeline: whether the chain verifies, the filters, the
/// export of what they choose, and the records.
pub async fn timeline(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
    Query(filters): Query<Filters>,
) -> Result<Response, ConsoleError> {
    let body = format!(
        "{chain}<p><a id=\"export\" href=\"/admin/audit/export?{query}\">Export these records (JSON lines)</a></p>{listing}",
        chain = console.chain.describe(log(&console)?),
        query = esc(&filters.query()),
        listing = listing(&console, &user, &filters, "/admin/audit")?,
    );
    Ok(user.page("Audit trail", &body))
}

/// The filter form, the newest matching records `user` may read (each
/// linking to `<base>/<receipt id>`) and a link to older ones.
pub fn listing(
    console: &Console,
    user: &User,
    filters: &Filters,
    base: &str,
) -> Result<String, ConsoleError> {
    let (records, older) = newest(console, user, filters, (SHOWN, MAX_SCANNED))?;
    let shown: Vec<pb::AuditRecord> = records.iter().map(message).collect();
    let more = match older {
        Some(seq) => {
            let query = match filters.query() {
                q if q.is_empty() => format!("before={seq}"),
                q => format!("{q}&before={seq}"),
            };
            format!(
                "<p><a id=\"older\" href=\"{base}?{}\">Older records</a></p>",
                esc(&query)
            )
        }
        None => String::new(),
    };
    Ok(format!(
        "{form}{table}{more}",
        form = filters.form(base),
        table = records_table(&shown, base),
    ))
}

/// Records as timeline rows, each linking to `<base>/<receipt id>`.
pub fn records_table(records: &[pb::AuditRecord], base: &str) -> String {
    let rows: Vec<String> = records
        .iter()
        .map(|r| {
            let spent = match r.epsilon {
                Some(eps) => format!("ε {}", number(eps)),
                None => String::new(),
            };
            format!(
                "<tr class=\"record\" data-event=\"{event}\" data-outcome=\"{outcome}\" data-receipt=\"{id}\">\
                 {seq}{time}{event_td}{outcome_td}{principal}{org}{datasets}{rule}{rows}{spent}\
                 <td><a class=\"open\" href=\"{base}/{id_url}\">open</a></td></tr>",
                event = esc(&r.event),
                outcome = esc(&r.outcome),
                id = esc(&r.receipt_id),
                id_url = url_part(&r.receipt_id),
                seq = td(&r.seq.to_string()),
                time = td(&short_time(&r.time)),
                event_td = td(&r.event),
                outcome_td = td(&r.outcome),
                principal = td(&r.principal),
                org = td(&r.organization),
                datasets = td(&r.datasets.join(", ")),
                rule = td(&r.rule),
                rows = td(&r.rows.map(|n| n.to_string()).unwrap_or_default()),
                spent = td(&spent),
            )
        })
        .collect();
    table(
        "timeline",
        &[
            "seq",
            "time",
            "event",
            "outcome",
            "principal",
            "organization",
            "datasets",
            "rule",
            "rows",
            "privacy",
            "",
        ],
        &rows,
    )
}

/// One record of the admin's timeline.
pub async fn record(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    record_page(&console, &user, id, "Audit record").await
}

/// One record as GetReceipt answers `user` (NOT_FOUND for another
/// organization's, unless an admin asks).
pub async fn record_page(
    console: &Console,
    user: &User,
    id: String,
    title: &str,
) -> Result<Response, ConsoleError> {
    let record = AuditReceipts::new(console.engine.clone())
        .get_receipt(request(
            &user.session,
            pb::GetReceiptRequest { receipt_id: id },
        ))
        .await?
        .into_inner();
    Ok(user.page(title, &record_detail(&record)))
}

/// A record's full content (`pre#record`) and its receipt (`#receipt`).
pub fn record_detail(r: &pb::AuditRecord) -> String {
    let content = serde_json::from_str::<serde_json::Value>(&r.record_json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| r.record_json.clone());
    format!(
        "<h2>Record {seq}</h2><pre id=\"record\">{content}</pre>\
         <h2>Receipt</h2><dl id=\"receipt\"><dt>receipt id</dt><dd>{id}</dd><dt>hash</dt><dd><code>{hash}</code></dd>\
         <dt>previous hash</dt><dd><code>{prev}</code></dd><dt>signed by key</dt><dd><code>{key}</code></dd>\
         <dt>signature</dt><dd><code class=\"wrap\">{signature}</code></dd></dl>\
         <p>Check it offline against the provider's public key:</p>\
         <pre><code>sluice receipt get {id} &gt; record.json\nsluice receipt verify record.json --public-key provider-public-key.pem</code></pre>",
        seq = r.seq,
        content = esc(&content),
        id = esc(&r.receipt_id),
        hash = esc(&r.hash),
        prev = esc(&r.prev_hash),
        key = esc(&r.key_id),
        signature = esc(&r.signature),
    )
}

/// The filtered records as JSON lines, each with its hash and signature:
/// what `sluice audit export` prints, for the records chosen.
pub async fn export(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
    Query(filters): Query<Filters>,
) -> Result<Response, ConsoleError> {
    let (mut records, older) = newest(
        &console,
        &user,
        &filters,
        (MAX_EXPORTED, MAX_EXPORTED as u64),
    )?;
    records.reverse();
    let mut out = String::new();
    for record in &records {
        let line = serde_json::to_string(record).map_err(|e| {
            ConsoleError::Status(tonic::Status::internal(format!(
                "a record cannot be written as JSON: {e}"
            )))
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    let mut response = (StatusCode::OK, out).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"sluice-audit.jsonl\""),
    );
    if let Some(before) = older {
        // Not every matching record fits: say so rather than pass for whole,
        // and where the next export (`before=`) starts.
        headers.insert("x-sluice-truncated", HeaderValue::from_static("true"));
        headers.insert("x-sluice-continue-before", HeaderValue::from(before));
    }
    Ok(response)
}

/// Whether the chain verifies, as a background task last found it: the
/// whole log when the console starts, every [`FULL_RECHECK`] and when it
/// shrank, the records added since every [`RECHECK`] (or when a page
/// asks). A failure stands for [`RETRY_FAILED`]. Never in a request:
/// checking every signature of a large log takes minutes.
#[derive(Default)]
pub struct ChainStatus {
    last: Mutex<Option<Checked>>,
    /// A page view with unchecked records asks for a check now.
    wanted: tokio::sync::Notify,
}

#[derive(Clone)]
struct Checked {
    /// Records verified (the next seq to check).
    records: u64,
    /// The hash of the last record verified.
    hash: String,
    ok: bool,
    report: String,
    at: chrono::DateTime<chrono::Utc>,
    full_at: Instant,
}

const RECHECK: Duration = Duration::from_secs(30);
const FULL_RECHECK: Duration = Duration::from_secs(6 * 3600);
const RETRY_FAILED: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

impl ChainStatus {
    /// Checks until `stopped` turns true.
    pub async fn watch(
        self: Arc<Self>,
        engine: Arc<crate::query::QueryEngine>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let (me, engine) = (self.clone(), engine.clone());
            let _ = tokio::task::spawn_blocking(move || me.check(&engine)).await;
            tokio::select! {
                _ = tokio::time::sleep(RECHECK) => {}
                _ = self.wanted.notified() => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    }

    fn check(&self, engine: &crate::query::QueryEngine) {
        let Some(log) = engine.audit().log() else {
            return;
        };
        let records = log.head().records;
        let previous = self.last.lock().expect("chain status lock").clone();
        let checked = match previous {
            // Records verified before are checked again in full, however
            // quiet the log: an edit below the last check's end shows then.
            Some(p) if p.full_at.elapsed() >= FULL_RECHECK => Self::verify_from(log, records, None),
            // A failure stands a while: re-reading the whole log every few
            // seconds would not change it (an unreadable file may heal).
            Some(p) if !p.ok && chrono::Utc::now() - p.at < RETRY_FAILED => return,
            Some(p) if !p.ok => Self::verify_from(log, records, None),
            Some(p) if p.records == records => return,
            Some(p) if p.records < records => Self::verify_from(log, records, Some(p)),
            // Fewer records than verified: the log was cut.
            _ => Self::verify_from(log, records, None),
        };
        *self.last.lock().expect("chain status lock") = Some(checked);
    }

    /// Verifies the log from `after`'s end (all of it without `after`).
    /// `records` is the head when the check began: a record appended
    /// meanwhile may be half written, and a problem there is not one yet.
    fn verify_from(log: &AuditLog, records: u64, after: Option<Checked>) -> Checked {
        let key = log.key().public_key();
        let from = after.as_ref().map(|a| a.records);
        let report = sluice_audit::verify_file(log.path(), &key, from);
        let at = chrono::Utc::now();
        let full_at = match &after {
            Some(a) => a.full_at,
            None => Instant::now(),
        };
        let broken = |report: String| Checked {
            records,
            hash: String::new(),
            ok: false,
            report,
            at,
            full_at,
        };
        let report = match report {
            Ok(report) => report,
            Err(e) => return broken(format!("the log cannot be read: {e}")),
        };
        if let Some(problem) = &report.problem
            && problem.line as u64 <= records
        {
            return broken(report.to_string());
        }
        // The first new record must chain to the last one verified before.
        if let (Some(a), Some(from)) = (&after, from) {
            let first = log
                .scan(from, 1, |_| true)
                .ok()
                .and_then(|(r, _)| r.into_iter().next());
            if first.is_some_and(|r| r.record.prev_hash != a.hash) {
                return broken(format!(
                    "record {from} does not chain to record {}, which verified before: the log was rewritten",
                    from - 1
                ));
            }
        }
        let (verified, hash) = match &report.head {
            Some(head) => (head.records, head.hash.clone()),
            None => after
                .as_ref()
                .map(|a| (a.records, a.hash.clone()))
                .unwrap_or((0, sluice_audit::ZERO_HASH.to_string())),
        };
        Checked {
            records: verified,
            report: format!(
                "records 0 to {} verified, the last with hash {}…",
                verified.saturating_sub(1),
                short(&hash)
            ),
            hash,
            ok: true,
            at,
            full_at,
        }
    }

    /// `#chain`: what the last check found and when, the head, and the
    /// offline command.
    fn describe(&self, log: &AuditLog) -> String {
        let head = log.head();
        let last = self.last.lock().expect("chain status lock").clone();
        let (class, verdict) = match &last {
            None => ("pending", "Checking the chain".to_string()),
            Some(c) if c.ok => (
                "ok",
                format!(
                    "Chain verified</strong> (checked {}): {}",
                    c.at.format("%Y-%m-%d %H:%M:%S UTC"),
                    esc(&c.report)
                ),
            ),
            Some(c) => (
                "broken",
                format!(
                    "Chain does NOT verify</strong> (checked {}): {}",
                    c.at.format("%Y-%m-%d %H:%M:%S UTC"),
                    esc(&c.report)
                ),
            ),
        };
        let verdict = match verdict.contains("</strong>") {
            true => verdict,
            false => format!("{verdict}</strong>: the first check runs in the background."),
        };
        let unchecked = match &last {
            Some(c) if c.ok && head.records != c.records => {
                self.wanted.notify_one();
                format!(
                    " The log now holds {} records; they are being checked: reload to see.",
                    head.records
                )
            }
            _ => String::new(),
        };
        let dir = log.path().parent().unwrap_or(log.path());
        let command = format!(
            "sluice audit verify --log {} --public-key {} --head {}",
            log.path().display(),
            dir.join(sluice_audit::PUBLIC_KEY_FILE).display(),
            head.hash
        );
        format!(
            "<section id=\"chain\" class=\"{class}\"><p><strong>{verdict}{unchecked}</p>\
             <p>Head: {records} records, last hash <code id=\"head\">{hash}</code>, signed with key <code>{key}</code>.</p>\
             <p>Verify it offline (the chain, every signature, and that this head is still in it):</p>\
             <pre><code id=\"verify-command\">{command}</code></pre></section>",
            records = head.records,
            hash = esc(&head.hash),
            key = esc(&log.key().key_id()),
            command = esc(&command),
        )
    }
}

fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_date_includes_its_whole_day() {
        assert!(until("2026-12-05T23:59:59Z", "2026-12-05"));
        assert!(!until("2026-12-06T00:00:00Z", "2026-12-05"));
        assert!(until("2026-12-05T10:00:00Z", "2026-12-05T10:00:00Z"));
    }

    #[test]
    fn the_query_string_keeps_only_set_filters() {
        let f = Filters {
            dataset: "trips".into(),
            rule: "a b".into(),
            ..Filters::default()
        };
        assert_eq!(f.query(), "dataset=trips&rule=a+b");
    }
}
