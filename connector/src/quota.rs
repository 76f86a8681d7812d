//! Query and row quotas per organization and UTC day, kept across restarts.
//!
//! A query is counted when its ticket is issued (GetFlightInfo): the check
//! and the increment happen under one lock, so concurrent queries cannot race
//! past the limit. Rows work the same way: the issue reserves the query's
//! cap (its `max_rows`, or every row left today) and charges it at once; when
//! the stream ends the rows not sent are returned. Concurrent queries thus
//! never receive more rows together than the day allows. Usage is written to
//! `<state_dir>/quota.json` (atomically) at every reservation and at the end
//! of every stream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sluice_policy::{Denial, QuotaCharge};

use crate::state::write_atomically;

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Usage {
    queries: u64,
    rows: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    /// Days since the Unix epoch (UTC) the counts are for.
    day: u64,
    usage: BTreeMap<String, Usage>,
}

pub struct QuotaStore {
    file: PathBuf,
    ledger: Mutex<Ledger>,
}

/// What a reservation allows: the rows this query may return (reserved and
/// charged already), if rows are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub rows: Option<u64>,
}

impl QuotaStore {
    /// Opens (or starts) the usage file. A corrupt file is an error, not a
    /// fresh allowance.
    pub fn open(file: PathBuf) -> anyhow::Result<Self> {
        let ledger = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: the quota usage file is corrupt ({e}); fix or remove it deliberately",
                    file.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", file.display())),
        };
        Ok(Self {
            file,
            ledger: Mutex::new(ledger),
        })
    }

    /// Counts one query against `charge` and reserves up to `max_rows` rows
    /// (all rows left when `None`), or refuses when the day's queries or rows
    /// are used up.
    pub fn reserve(
        &self,
        charge: &QuotaCharge,
        max_rows: Option<u64>,
        now: SystemTime,
    ) -> Result<Reservation, Denial> {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        roll_over(&mut ledger, now);
        let usage = ledger.usage.entry(charge.key.clone()).or_default();
        if let Some(limit) = charge.quotas.queries_per_day
            && usage.queries >= limit
        {
            return Err(Denial::quota(
                "quotas.queries_per_day",
                format!(
                    "`{}` has used its {limit} queries for today (UTC)",
                    charge.key
                ),
            ));
        }
        let rows_left = charge
            .quotas
            .rows_per_day
            .map(|limit| limit.saturating_sub(usage.rows));
        if rows_left == Some(0) {
            return Err(Denial::quota(
                "quotas.rows_per_day",
                format!(
                    "`{}` has received its {} rows for today (UTC)",
                    charge.key,
                    charge.quotas.rows_per_day.unwrap_or_default()
                ),
            ));
        }
        let rows = rows_left.map(|left| max_rows.map_or(left, |cap| cap.min(left)));
        usage.queries += 1;
        usage.rows += rows.unwrap_or(0);
        self.persist(&ledger);
        Ok(Reservation { rows })
    }

    /// Returns the rows of a reservation that were not sent. (A query
    /// reserved on an earlier day returns nothing to today's allowance.)
    pub fn settle(
        &self,
        key: &str,
        reserved: u64,
        sent: u64,
        reserved_on: SystemTime,
        now: SystemTime,
    ) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        roll_over(&mut ledger, now);
        if day(reserved_on) != ledger.day {
            return;
        }
        let usage = ledger.usage.entry(key.to_string()).or_default();
        usage.rows = usage.rows.saturating_sub(reserved.saturating_sub(sent));
    }

    /// Writes the current usage to disk.
    pub fn flush(&self) {
        let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        self.persist(&ledger);
    }

    fn persist(&self, ledger: &Ledger) {
        let result = serde_json::to_vec_pretty(ledger)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| write_atomically(&self.file, &bytes));
        if let Err(e) = result {
            tracing::error!(file = %self.file.display(), "writing quota usage failed: {e:#}");
        }
    }
}

fn roll_over(ledger: &mut Ledger, now: SystemTime) {
    let today = day(now);
    if ledger.day != today {
        ledger.day = today;
        ledger.usage.clear();
    }
}

/// Days since the Unix epoch, UTC.
fn day(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::document::Quotas;
    use std::sync::Arc;

    fn charge(queries: u64, rows: Option<u64>) -> QuotaCharge {
        QuotaCharge {
            key: "Org".into(),
            quotas: Quotas {
                queries_per_day: Some(queries),
                rows_per_day: rows,
            },
        }
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("quota.json");
        let store = Arc::new(QuotaStore::open(file.clone()).unwrap());
        let now = SystemTime::now();
        let granted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    s.spawn(move || {
                        (0..50)
                            .filter(|_| store.reserve(&charge(100, None), None, now).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, 100);
        let reopened = QuotaStore::open(file).unwrap();
        let denial = reopened.reserve(&charge(100, None), None, now).unwrap_err();
        assert_eq!(denial.rule, "quotas.queries_per_day");
    }

    #[test]
    fn rows_are_reserved_at_issue_and_unused_rows_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = QuotaStore::open(dir.path().join("q.json")).unwrap();
        let now = SystemTime::now();
        let quota = charge(10, Some(100));
        // Two concurrent queries capped at 60: the second gets the 40 left.
        assert_eq!(store.reserve(&quota, Some(60), now).unwrap().rows, Some(60));
        assert_eq!(store.reserve(&quota, Some(60), now).unwrap().rows, Some(40));
        let denial = store.reserve(&quota, Some(60), now).unwrap_err();
        assert_eq!(denial.rule, "quotas.rows_per_day");
        // The first sent only 10 rows: 50 come back.
        store.settle("Org", 60, 10, now, now);
        assert_eq!(store.reserve(&quota, None, now).unwrap().rows, Some(50));
        let tomorrow = now + std::time::Duration::from_secs(86_400);
        assert_eq!(
            store.reserve(&quota, None, tomorrow).unwrap().rows,
            Some(100)
        );
    }

    #[test]
    fn a_corrupt_usage_file_is_an_error_not_a_fresh_allowance() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.json");
        std::fs::write(&file, b"{not json").unwrap();
        let err = QuotaStore::open(file).err().unwrap().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
