//! Query and row quotas per organization and UTC day, kept across restarts.
//!
//! A query is counted when its ticket is issued (GetFlightInfo): the check
//! and the increment happen under one lock, so concurrent queries cannot race
//! past the limit. Rows are taken as they are sent: before each batch leaves,
//! [`QuotaStore::take_rows`] grants at most what is left of the day, under
//! the same lock, so concurrent streams never receive more rows together than
//! the day allows, and a query holds no rows it has not sent (an earlier
//! design reserved every row left at issue, so one organization could not
//! run two such queries at once, and rows of a ticket that was never
//! redeemed stayed charged). Usage is written to `<state_dir>/quota.json`
//! (atomically) before the rows it counts leave.

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

    /// Counts one query against `charge`, or refuses when the day's queries
    /// or rows are used up.
    pub fn admit(&self, charge: &QuotaCharge, now: SystemTime) -> Result<(), Denial> {
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
        if let Some(limit) = charge.quotas.rows_per_day
            && usage.rows >= limit
        {
            return Err(rows_used_up(&charge.key, limit));
        }
        usage.queries += 1;
        self.persist(&ledger);
        Ok(())
    }

    /// Takes up to `wanted` rows of today's allowance for `charge` (all of
    /// them when rows are not limited) and records them before they are
    /// sent. Returns how many were granted.
    pub fn take_rows(&self, charge: &QuotaCharge, wanted: u64, now: SystemTime) -> u64 {
        let Some(limit) = charge.quotas.rows_per_day else {
            return wanted;
        };
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        roll_over(&mut ledger, now);
        let usage = ledger.usage.entry(charge.key.clone()).or_default();
        let granted = wanted.min(limit.saturating_sub(usage.rows));
        if granted > 0 {
            usage.rows += granted;
            self.persist(&ledger);
        }
        granted
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

/// The refusal once a day's rows are used up.
pub fn rows_used_up(key: &str, limit: u64) -> Denial {
    Denial::quota(
        "quotas.rows_per_day",
        format!("`{key}` has received its {limit} rows for today (UTC)"),
    )
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
    fn concurrent_admissions_never_exceed_the_limit_and_survive_restart() {
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
                            .filter(|_| store.admit(&charge(100, None), now).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, 100);
        let reopened = QuotaStore::open(file).unwrap();
        let denial = reopened.admit(&charge(100, None), now).unwrap_err();
        assert_eq!(denial.rule, "quotas.queries_per_day");
    }

    #[test]
    fn rows_are_taken_as_sent_and_never_past_the_day() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.json");
        let store = Arc::new(QuotaStore::open(file.clone()).unwrap());
        let now = SystemTime::now();
        let quota = charge(1000, Some(100));
        // Two streams at once: both admitted, rows granted as they go.
        store.admit(&quota, now).unwrap();
        store.admit(&quota, now).unwrap();
        assert_eq!(store.take_rows(&quota, 60, now), 60);
        assert_eq!(store.take_rows(&quota, 60, now), 40);
        assert_eq!(store.take_rows(&quota, 1, now), 0);
        let denial = store.admit(&quota, now).unwrap_err();
        assert_eq!(denial.rule, "quotas.rows_per_day");
        // Many threads taking rows: exactly the day's allowance in all.
        let quota = charge(1000, Some(10_000));
        let tomorrow = now + std::time::Duration::from_secs(86_400);
        let taken: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (store, quota) = (store.clone(), quota.clone());
                    s.spawn(move || {
                        (0..500)
                            .map(|_| store.take_rows(&quota, 7, tomorrow))
                            .sum::<u64>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 10_000);
        // What was taken is on disk.
        let reopened = QuotaStore::open(file).unwrap();
        assert_eq!(reopened.take_rows(&quota, 5, tomorrow), 0);
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
