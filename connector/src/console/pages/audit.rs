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
/// Records one page view reads at most, newest first: a filter that
/// matches little cannot make a page read the whole log.
const MAX_SCANNED: u64 = 100_000;
/// Records an export holds at most.
const MAX_EXPORTED: usize = 100_000;
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
/// `limit`, and the seq to continue before when older ones may match.
fn newest(
    console: &Console,
    user: &User,
    filters: &Filters,
    limit: usize,
) -> Result<(Vec<SignedRecord>, Option<u64>), ConsoleError> {
    let log = log(console)?;
    let readable = AuditReceipts::new(console.engine.clone()).readable(user.principal());
    let mut end = filters.before.unwrap_or(u64::MAX).min(log.head().records);
    let floor = end.saturating_sub(MAX_SCANNED);
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
    let (records, older) = newest(console, user, filters, SHOWN)?;
    let shown: Vec<pb::AuditRecord> = records.iter().map(message).collect();
    let more = match older {
        Some(seq) => format!(
            "<p><a id=\"older\" href=\"{base}?{query}&amp;before={seq}\">Older records</a></p>",
            query = esc(&filters.query()),
        ),
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
    let (mut records, older) = newest(&console, &user, &filters, MAX_EXPORTED)?;
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
    if older.is_some() {
        // Not every matching record fits: say so rather than pass for whole.
        headers.insert("x-sluice-truncated", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Whether the whole chain verifies, checked at most once per
/// [`RECHECK`] and again only when the log grew.
#[derive(Default)]
pub struct ChainStatus {
    last: Mutex<Option<Checked>>,
}

struct Checked {
    records: u64,
    at: Instant,
    report: String,
    ok: bool,
}

const RECHECK: Duration = Duration::from_secs(30);

impl ChainStatus {
    /// `#chain`: verified or not, the head, and the offline command.
    fn describe(&self, log: &AuditLog) -> String {
        let head = log.head();
        let (ok, report) = self.check(log, head.records);
        let dir = log.path().parent().unwrap_or(log.path());
        let command = format!(
            "sluice audit verify --log {} --public-key {} --head {}",
            log.path().display(),
            dir.join(sluice_audit::PUBLIC_KEY_FILE).display(),
            head.hash
        );
        format!(
            "<section id=\"chain\" class=\"{class}\"><p><strong>{verdict}</strong>: {report}</p>\
             <p>Head: {records} records, last hash <code id=\"head\">{hash}</code>, signed with key <code>{key}</code>.</p>\
             <p>Verify it offline (the chain, every signature, and that this head is still in it):</p>\
             <pre><code id=\"verify-command\">{command}</code></pre></section>",
            class = if ok { "ok" } else { "broken" },
            verdict = if ok {
                "Chain verified"
            } else {
                "Chain does NOT verify"
            },
            report = esc(&report),
            records = head.records,
            hash = esc(&head.hash),
            key = esc(&log.key().key_id()),
            command = esc(&command),
        )
    }

    fn check(&self, log: &AuditLog, records: u64) -> (bool, String) {
        let mut last = self.last.lock().expect("chain status lock");
        if let Some(c) = last.as_ref()
            && c.records == records
            && c.at.elapsed() < RECHECK
        {
            return (c.ok, c.report.clone());
        }
        let key = log.key().public_key();
        let (ok, report) =
            match crate::blocking::blocking(|| sluice_audit::verify_file(log.path(), &key, None)) {
                Ok(report) => (report.problem.is_none(), report.to_string()),
                Err(e) => (false, format!("the log cannot be read: {e}")),
            };
        *last = Some(Checked {
            records,
            at: Instant::now(),
            report: report.clone(),
            ok,
        });
        (ok, report)
    }
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
