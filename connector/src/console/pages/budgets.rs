//! Budgets and quotas for admins: per organization and dataset, ε and δ
//! spent in the current period as charts over time with the limit drawn,
//! and queries and rows per day.
//!
//! The totals and limits are the ledger's. The steps over time come from
//! the audit log's release records (each carries the ε and δ it spent), as
//! do queries and rows per day for every organization; the quota store
//! counts only grants with quotas. A connector without an audit log shows
//! totals only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::response::Response;
use sluice_audit::SignedRecord;
use sluice_privacy::ledger::{self, Balance};

use crate::console::chart::{number, spent_over_time};
use crate::console::html::{esc, table, td};
use crate::console::{Admin, Console, ConsoleError};

/// Audit records one page view reads at most for the charts.
const MAX_SCANNED: u64 = 50_000;
/// Days of quota use shown.
const QUOTA_DAYS: u64 = 14;

pub async fn page(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
) -> Result<Response, ConsoleError> {
    let now = chrono::Utc::now();
    let ledger = console.engine.privacy().ledger().clone();
    let balances = crate::blocking::blocking(|| ledger.balances(None, now)).map_err(|e| {
        tracing::error!(error = %e, "reading the privacy ledger failed");
        ConsoleError::Status(tonic::Status::internal(
            "reading the privacy ledger failed (see the connector log)",
        ))
    })?;
    let mut cache = console.activity.0.lock().await;
    let unread = catch_up(&console, &mut cache)?;
    let activity = &cache.0;
    let accounts: String = balances
        .iter()
        .enumerate()
        .map(|(i, b)| account(i, b, &activity.charges))
        .collect();
    let accounts = match accounts.is_empty() {
        true => "<p class=\"empty\">No privacy budget has been charged in the current periods.</p>"
            .to_string(),
        false => accounts,
    };
    let body = format!(
        "{unread}<h2>Privacy budget in the current period</h2>{accounts}<h2>Queries and rows per day</h2>\
         <p>Every organization's results released and rows delivered, from the audit log:</p>{}\
         <h3>Counted against quotas</h3><p>Only grants with quotas are counted (the quota store):</p>{}{}",
        daily_table(&activity.daily),
        quota_table(&console)?,
        quota_limits(&console),
        unread = match unread {
            0 => String::new(),
            n => format!(
                "<p class=\"note\">{n} newer audit records are not read yet: reload to read more.</p>"
            ),
        },
    );
    Ok(user.page("Budgets and quotas", &body))
}

/// (time, ε, δ) of each release record with a privacy cost, per
/// (organization, dataset), oldest first.
type Releases = BTreeMap<(String, String), Vec<(String, f64, f64)>>;

/// Per (day, organization): results released and rows they delivered.
type Daily = BTreeMap<(String, String), (u64, u64)>;

/// What the audit log says about use: DP charges over time, and queries
/// and rows per day for every organization (whether or not its grant has
/// quotas).
#[derive(Default)]
struct Activity {
    charges: Releases,
    daily: Daily,
}

/// [`Activity`] kept between page views: each view reads only the records
/// appended since the last (at most [`MAX_SCANNED`] of them).
#[derive(Default)]
pub struct ActivityCache(tokio::sync::Mutex<(Activity, u64)>);

/// Reads the audit records after the cache's last up to the head (at most
/// [`MAX_SCANNED`]); how many are left unread.
fn catch_up(console: &Console, cache: &mut (Activity, u64)) -> Result<u64, ConsoleError> {
    let Some(log) = console.engine.audit().log() else {
        return Ok(0);
    };
    let count = log.head().records;
    let stop = count.min(cache.1.saturating_add(MAX_SCANNED));
    let counted = |r: &SignedRecord| {
        r.record.seq < stop && matches!(r.record.entry.event.as_str(), "release" | "completion")
    };
    while cache.1 < stop {
        let from = cache.1;
        let (found, next) = crate::blocking::blocking(|| log.scan(from, usize::MAX, counted))
            .map_err(|e| {
                tracing::error!(error = %e, "reading the audit log failed");
                ConsoleError::Status(tonic::Status::internal(
                    "reading the audit log failed (see the connector log)",
                ))
            })?;
        for r in &found {
            cache.0.add(r);
        }
        cache.1 = next.unwrap_or(count).min(stop);
    }
    Ok(count - cache.1)
}

impl Activity {
    fn add(&mut self, r: &SignedRecord) {
        let e = &r.record.entry;
        let organization = e.organization.clone().unwrap_or_default();
        let day = r.record.time.get(..10).unwrap_or("").to_string();
        let today = self.daily.entry((day, organization.clone())).or_default();
        if e.event == "completion" {
            today.1 += e.rows.unwrap_or(0);
            return;
        }
        today.0 += 1;
        let Some(epsilon) = e.epsilon.filter(|eps| *eps > 0.0) else {
            return;
        };
        for dataset in &e.datasets {
            self.charges
                .entry((organization.clone(), dataset.clone()))
                .or_default()
                .push((r.record.time.clone(), epsilon, e.delta.unwrap_or(0.0)));
        }
    }
}

/// Whether a record's time falls in the period a ledger key names: a day
/// (`2026-12-05`), month (`2026-12`), year (`2026`), window
/// (`2026-12-01..2026-12-30`) or anything else (the whole time).
fn in_period(time: &str, key: &str) -> bool {
    if let Some((first, last)) = key.split_once("..") {
        return time
            .get(..10)
            .is_some_and(|day| day >= first && day <= last);
    }
    match key.chars().next() {
        Some(c) if c.is_ascii_digit() => time.starts_with(key),
        _ => true,
    }
}

fn account(index: usize, b: &Balance, releases: &Releases) -> String {
    let unlimited = b.limit_epsilon == i64::MAX;
    let eps_limit = (!unlimited).then(|| ledger::epsilon_from_units(b.limit_epsilon));
    let delta_limit = (!unlimited).then(|| ledger::delta_from_units(b.limit_delta));
    let spent_eps = match b.total_epsilon() {
        i64::MAX => f64::INFINITY,
        units => ledger::epsilon_from_units(units),
    };
    let spent_delta = ledger::delta_from_units(b.total_delta());
    let charges: Vec<&(String, f64, f64)> = releases
        .get(&(b.organization.clone(), b.dataset.clone()))
        .map(|all| {
            all.iter()
                .filter(|r| in_period(&r.0, &b.period_key))
                .collect()
        })
        .unwrap_or_default();
    let start = charges.first().map(|c| seconds(&c.0)).unwrap_or(0.0);
    let mut eps_points = Vec::new();
    let mut delta_points = Vec::new();
    let (mut eps, mut delta) = (0.0, 0.0);
    for (time, e, d) in &charges {
        eps += e;
        delta += d;
        let t = seconds(time) - start;
        eps_points.push((t, eps));
        delta_points.push((t, delta));
    }
    let title = format!("{} · {} · {}", b.organization, b.dataset, b.period_key);
    format!(
        "<section class=\"account\" data-organization=\"{org}\" data-dataset=\"{dataset}\"><h3>{title}</h3>\
         <p>ε spent {eps_spent} of {eps_limit} ({queries} queries; {reserved} ε reserved by queries in flight); δ spent {delta_spent} of {delta_limit}.</p>\
         {eps_chart}{delta_chart}<p class=\"note\">Steps: the audit log's release records in this period ({n}); totals: the ledger.</p></section>",
        org = esc(&b.organization),
        dataset = esc(&b.dataset),
        title = esc(&title),
        eps_spent = number(spent_eps),
        eps_limit = eps_limit.map(number).unwrap_or_else(|| "unlimited".into()),
        queries = b.queries,
        reserved = number(ledger::epsilon_from_units(b.reserved_epsilon)),
        delta_spent = number(spent_delta),
        delta_limit = delta_limit
            .map(number)
            .unwrap_or_else(|| "unlimited".into()),
        eps_chart = spent_over_time(
            &format!("epsilon-{index}"),
            "ε spent",
            &eps_points,
            eps_limit
        ),
        delta_chart = spent_over_time(
            &format!("delta-{index}"),
            "δ spent",
            &delta_points,
            delta_limit
        ),
        n = charges.len(),
    )
}

fn seconds(rfc3339: &str) -> f64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.timestamp() as f64)
        .unwrap_or(0.0)
}

/// The last [`QUOTA_DAYS`] days of `daily`, newest first.
fn daily_table(daily: &Daily) -> String {
    let since = (chrono::Utc::now() - chrono::Duration::days(QUOTA_DAYS as i64 - 1))
        .format("%Y-%m-%d")
        .to_string();
    let rows: Vec<String> = daily
        .iter()
        .rev()
        .filter(|((day, _), _)| *day >= since)
        .map(|((day, organization), (queries, rows))| {
            format!(
                "<tr>{}{}{}{}</tr>",
                td(day),
                td(organization),
                td(&queries.to_string()),
                td(&rows.to_string())
            )
        })
        .collect();
    table(
        "daily",
        &[
            "day (UTC)",
            "organization",
            "results released",
            "rows delivered",
        ],
        &rows,
    )
}

fn quota_table(console: &Console) -> Result<String, ConsoleError> {
    let quotas = console.engine.quotas().clone();
    let used = crate::blocking::blocking(|| quotas.recent(QUOTA_DAYS, SystemTime::now())).map_err(
        |e| {
            tracing::error!(error = %e, "reading the quota counters failed");
            ConsoleError::Status(tonic::Status::internal(
                "reading the quota counters failed (see the connector log)",
            ))
        },
    )?;
    let rows: Vec<String> = used
        .iter()
        .rev()
        .map(|(organization, day, usage)| {
            let date = chrono::DateTime::<chrono::Utc>::from(
                SystemTime::UNIX_EPOCH + Duration::from_secs(day * 86_400),
            )
            .format("%Y-%m-%d")
            .to_string();
            format!(
                "<tr>{}{}{}{}</tr>",
                td(&date),
                td(organization),
                td(&usage.queries.to_string()),
                td(&usage.rows.to_string())
            )
        })
        .collect();
    Ok(table(
        "quotas",
        &["day (UTC)", "organization", "queries", "rows"],
        &rows,
    ))
}

/// The daily limits each consumer entry of the policy sets.
fn quota_limits(console: &Console) -> String {
    let gate = console.engine.policy().current();
    let Some(policy) = gate.policy_set() else {
        return String::new();
    };
    let rows: Vec<String> = policy
        .consumers()
        .iter()
        .map(|c| {
            let limit = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or("none".into());
            let q = c.quotas.as_ref();
            format!(
                "<tr>{}{}{}</tr>",
                td(&c.name),
                td(&limit(q.and_then(|q| q.queries_per_day))),
                td(&limit(q.and_then(|q| q.rows_per_day)))
            )
        })
        .collect();
    format!(
        "<h3>Daily limits in the policy</h3>{}",
        table(
            "quota-limits",
            &["consumer", "queries per day", "rows per day"],
            &rows
        )
    )
}

#[cfg(test)]
mod tests {
    use super::in_period;

    #[test]
    fn periods_are_read_from_ledger_keys() {
        let t = "2026-12-05T10:00:00Z";
        assert!(in_period(t, "2026-12-05") && in_period(t, "2026-12") && in_period(t, "2026"));
        assert!(!in_period(t, "2026-11"));
        assert!(in_period(t, "2026-12-01..2026-12-30"));
        assert!(!in_period(t, "2026-11-01..2026-11-30"));
        assert!(in_period(t, "total"));
    }
}
