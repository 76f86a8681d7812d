//! Query and row quotas per organization and UTC day, kept in the same
//! SQLite database as the privacy ledger (`privacy-ledger.sqlite`, table
//! `quota_usage`).
//!
//! A query **holds** one of the day's queries when its ticket is issued
//! (GetFlightInfo), and the hold is **settled** (counted, durably) when the
//! ticket is redeemed. A hold that is dropped unsettled (the issue failed
//! after it, the ticket expired, was evicted or withdrawn) gives the query
//! back by construction. Holds live in memory: a crash forgets them, which
//! is exactly "given back". The check counts settled queries and holds
//! together under one lock, so concurrent requests cannot race past the
//! limit; settling checks the stored count again, so two processes on one
//! state directory cannot either.
//!
//! Rows are taken as they are sent: before each batch leaves,
//! [`QuotaStore::take_rows`] grants at most what is left of the day in one
//! transaction, so concurrent streams never receive more rows together than
//! the day allows, and a query holds no rows it has not sent.
//!
//! Durability: every change commits before the query or rows it counts go
//! on (so it survives a crash of the process), but is not fsynced: the
//! counters are a usage limit, not a privacy guarantee, and a power failure
//! may forget the last moments of use. This keeps fsyncs off the path of
//! every query; the privacy budget in the same file keeps `synchronous=FULL`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use sluice_policy::{Denial, QuotaCharge};

/// How long a write waits for another connection holding the database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Days of usage kept; older rows are removed when the store opens.
const KEEP_DAYS: u64 = 35;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS quota_usage (
    organization TEXT    NOT NULL,
    day          INTEGER NOT NULL,
    queries      INTEGER NOT NULL DEFAULT 0 CHECK (queries >= 0),
    rows         INTEGER NOT NULL DEFAULT 0 CHECK (rows >= 0),
    PRIMARY KEY (organization, day)
);
";

/// Why the quota store failed or refused.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The day's queries or rows are used up.
    #[error("{0}")]
    Exceeded(Denial),
    #[error(
        "cannot open the quota counters in {} (does the state directory exist and is it writable?): {source}",
        .path.display()
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("quota counters in {}: {source}", .path.display())]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "{}: the old quota usage file is corrupt ({reason}); fix or remove it deliberately",
        .path.display()
    )]
    CorruptLegacyFile { path: PathBuf, reason: String },
}

/// What an organization used on one day.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub queries: u64,
    pub rows: u64,
}

pub struct QuotaStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Queries held by issued, unredeemed tickets, per (organization, day).
    held: Mutex<HashMap<(String, u64), u64>>,
}

impl QuotaStore {
    /// Opens the counters in the database at `path` (the privacy ledger's,
    /// opened first so that the ledger recognises its file). A `legacy`
    /// usage file from before the move (`quota.json`) is carried over once
    /// and then removed.
    pub fn open(path: &Path, legacy: Option<&Path>) -> Result<Self, QuotaError> {
        let open_failed = |source| QuotaError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_failed)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_failed)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .map_err(open_failed)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_failed)?;
        conn.execute_batch(SCHEMA).map_err(open_failed)?;
        let store = Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            held: Mutex::new(HashMap::new()),
        };
        store.forget_before(day(SystemTime::now()).saturating_sub(KEEP_DAYS))?;
        if let Some(legacy) = legacy {
            store.import_legacy(legacy)?;
        }
        Ok(store)
    }

    /// Holds one of today's queries for `charge`, or refuses when the day's
    /// queries or rows are used up. The hold is given back when dropped
    /// unsettled.
    pub fn hold(
        self: &Arc<Self>,
        charge: &QuotaCharge,
        now: SystemTime,
    ) -> Result<QuotaHold, QuotaError> {
        let today = day(now);
        let key = (charge.key.clone(), today);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let usage = self.usage(&charge.key, today)?;
        let holding = held.get(&key).copied().unwrap_or_default();
        check(charge, usage.queries + holding, usage.rows)?;
        *held.entry(key.clone()).or_default() += 1;
        Ok(QuotaHold {
            store: self.clone(),
            key: Some(key),
        })
    }

    /// Takes up to `wanted` rows of today's allowance for `charge` (all of
    /// them when rows are not limited) and records them before they are
    /// sent. Returns how many were granted.
    pub fn take_rows(
        &self,
        charge: &QuotaCharge,
        wanted: u64,
        now: SystemTime,
    ) -> Result<u64, QuotaError> {
        let Some(limit) = charge.quotas.rows_per_day else {
            return Ok(wanted);
        };
        let today = day(now);
        self.write(|tx| {
            let used = read_usage(tx, &charge.key, today)?.rows;
            let granted = wanted.min(limit.saturating_sub(used));
            if granted > 0 {
                add(tx, &charge.key, today, 0, granted)?;
            }
            Ok(granted)
        })
    }

    /// What `organization` used on the day of `at`, settled queries only.
    pub fn used(&self, organization: &str, at: SystemTime) -> Result<Usage, QuotaError> {
        self.usage(organization, day(at))
    }

    /// Queries held by issued, unredeemed tickets of `organization` today.
    pub fn held(&self, organization: &str, at: SystemTime) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&(organization.to_string(), day(at)))
            .copied()
            .unwrap_or_default()
    }

    /// Every organization's settled use on each of the `days` days up to
    /// the day of `at`, oldest first: (organization, day as Unix days,
    /// usage). For the web console's quota table.
    pub fn recent(
        &self,
        days: u64,
        at: SystemTime,
    ) -> Result<Vec<(String, u64, Usage)>, QuotaError> {
        let since = day(at).saturating_sub(days.saturating_sub(1));
        let conn = self.conn();
        let read = || -> rusqlite::Result<Vec<(String, u64, Usage)>> {
            let mut stmt = conn.prepare(
                "SELECT organization, day, queries, rows FROM quota_usage
                 WHERE day >= ?1 ORDER BY day, organization",
            )?;
            let rows = stmt.query_map([since as i64], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)? as u64,
                    Usage {
                        queries: row.get::<_, i64>(2)? as u64,
                        rows: row.get::<_, i64>(3)? as u64,
                    },
                ))
            })?;
            rows.collect()
        };
        read().map_err(|e| self.failed(e))
    }

    fn usage(&self, organization: &str, today: u64) -> Result<Usage, QuotaError> {
        let conn = self.conn();
        read_usage(&conn, organization, today).map_err(|e| self.failed(e))
    }

    /// Counts a held query for good. Refused (and the hold dropped) when
    /// another process on the same database used the day up meanwhile.
    fn settle(&self, key: &(String, u64), charge: &QuotaCharge) -> Result<(), QuotaError> {
        let (organization, today) = key;
        let refused = self.write(|tx| {
            let usage = read_usage(tx, organization, *today)?;
            if let Err(denial) = check(charge, usage.queries, usage.rows) {
                return Ok(Some(denial));
            }
            add(tx, organization, *today, 1, 0)?;
            Ok(None)
        })?;
        match refused {
            Some(denial) => Err(denial),
            None => Ok(()),
        }
    }

    fn release(&self, key: &(String, u64)) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(key);
            }
        }
    }

    /// Runs `change` in one immediate transaction and commits it.
    fn write<T>(
        &self,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, QuotaError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.failed(e))?;
        let value = change(&tx).map_err(|e| self.failed(e))?;
        tx.commit().map_err(|e| self.failed(e))?;
        Ok(value)
    }

    fn forget_before(&self, first_kept: u64) -> Result<(), QuotaError> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM quota_usage WHERE day < ?1",
                [first_kept as i64],
            )
            .map(drop)
        })
    }

    /// Carries today's counts of a `quota.json` from before the move over,
    /// then removes the file (so a restart does not count them twice).
    fn import_legacy(&self, file: &Path) -> Result<(), QuotaError> {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(QuotaError::CorruptLegacyFile {
                    path: file.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        let legacy: LegacyUsage =
            serde_json::from_slice(&bytes).map_err(|e| QuotaError::CorruptLegacyFile {
                path: file.to_path_buf(),
                reason: e.to_string(),
            })?;
        if legacy.day == day(SystemTime::now()) {
            self.write(|tx| {
                for (organization, usage) in &legacy.usage {
                    add(tx, organization, legacy.day, usage.queries, usage.rows)?;
                }
                Ok(())
            })?;
        }
        std::fs::remove_file(file).map_err(|e| QuotaError::CorruptLegacyFile {
            path: file.to_path_buf(),
            reason: format!("it could not be removed after import: {e}"),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, source: rusqlite::Error) -> QuotaError {
        QuotaError::Database {
            path: self.path.clone(),
            source,
        }
    }
}

/// One of the day's queries, held by an issued ticket until it is redeemed
/// ([`QuotaHold::settle`]) or dropped (given back).
pub struct QuotaHold {
    store: Arc<QuotaStore>,
    key: Option<(String, u64)>,
}

impl QuotaHold {
    /// The ticket is redeemed: the query counts for good.
    pub fn settle(mut self, charge: &QuotaCharge) -> Result<(), QuotaError> {
        let key = self.key.take().expect("a hold is settled once");
        let settled = self.store.settle(&key, charge);
        // Settled or refused, the hold itself is over.
        self.store.release(&key);
        settled
    }
}

impl Drop for QuotaHold {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.store.release(&key);
        }
    }
}

impl std::fmt::Debug for QuotaHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaHold").field("key", &self.key).finish()
    }
}

/// Refuses when `queries` or `rows` reach the charge's daily limits.
fn check(charge: &QuotaCharge, queries: u64, rows: u64) -> Result<(), QuotaError> {
    if let Some(limit) = charge.quotas.queries_per_day
        && queries >= limit
    {
        return Err(QuotaError::Exceeded(Denial::quota(
            "quotas.queries_per_day",
            format!(
                "`{}` has used its {limit} queries for today (UTC)",
                charge.key
            ),
        )));
    }
    if let Some(limit) = charge.quotas.rows_per_day
        && rows >= limit
    {
        return Err(QuotaError::Exceeded(rows_used_up(&charge.key, limit)));
    }
    Ok(())
}

/// The refusal once a day's rows are used up.
pub fn rows_used_up(key: &str, limit: u64) -> Denial {
    Denial::quota(
        "quotas.rows_per_day",
        format!("`{key}` has received its {limit} rows for today (UTC)"),
    )
}

fn read_usage(conn: &Connection, organization: &str, today: u64) -> rusqlite::Result<Usage> {
    let row = conn
        .query_row(
            "SELECT queries, rows FROM quota_usage WHERE organization = ?1 AND day = ?2",
            rusqlite::params![organization, today as i64],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
        )
        .optional()?;
    Ok(row.map_or_else(Usage::default, |(queries, rows)| Usage {
        queries: queries as u64,
        rows: rows as u64,
    }))
}

fn add(
    tx: &rusqlite::Transaction<'_>,
    organization: &str,
    today: u64,
    queries: u64,
    rows: u64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO quota_usage (organization, day, queries, rows) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (organization, day)
         DO UPDATE SET queries = queries + excluded.queries, rows = rows + excluded.rows",
        rusqlite::params![organization, today as i64, queries as i64, rows as i64],
    )
    .map(drop)
}

/// `quota.json` as written before the counters moved into SQLite.
#[derive(serde::Deserialize)]
struct LegacyUsage {
    day: u64,
    usage: std::collections::BTreeMap<String, LegacyCounts>,
}

#[derive(serde::Deserialize)]
struct LegacyCounts {
    queries: u64,
    rows: u64,
}

/// Days since the Unix epoch, UTC.
fn day(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
