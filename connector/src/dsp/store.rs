//! The provider's DSP processes, kept in embedded SQLite
//! (`<state_dir>/dsp.sqlite`, WAL, `synchronous=FULL`): contract
//! negotiations and transfer processes with their state, the consumer they
//! belong to and its callback address. The agreements and access tokens
//! they lead to live in the agreement store (`crate::agreements`).
//!
//! Every state change is a compare-and-set (`UPDATE … WHERE state IN
//! (…)`): two messages racing for one process cannot both move it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// The store itself failed, not the request.
#[derive(Debug, thiserror::Error)]
pub enum DspStoreError {
    #[error(
        "cannot open the DSP process store {}: {cause}. Check that it is a file this connector may read and write",
        path.display()
    )]
    Open {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("DSP process store {}: {error}", path.display())]
    Database {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("the system's random source failed")]
    Random,
}

/// A contract negotiation as the provider keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Negotiation {
    pub provider_pid: String,
    pub consumer_pid: String,
    /// The principal id of the consumer's certificate: only it may send
    /// messages for this negotiation, and its callback must present it.
    pub principal: String,
    pub callback: String,
    pub offer_id: String,
    pub dataset: String,
    pub purpose: String,
    /// The wire state: REQUESTED, AGREED, VERIFIED, FINALIZED, TERMINATED.
    pub state: String,
    pub agreement_id: String,
}

/// A transfer process as the provider keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    pub provider_pid: String,
    pub consumer_pid: String,
    pub principal: String,
    pub callback: String,
    pub agreement_id: String,
    pub format: String,
    /// REQUESTED, STARTED, SUSPENDED, COMPLETED, TERMINATED.
    pub state: String,
}

pub struct DspStore {
    db: Mutex<Connection>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS negotiations (
    provider_pid TEXT PRIMARY KEY,
    consumer_pid TEXT NOT NULL,
    principal TEXT NOT NULL,
    callback TEXT NOT NULL,
    offer_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    purpose TEXT NOT NULL,
    state TEXT NOT NULL,
    agreement_id TEXT NOT NULL,
    changed_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS negotiations_by_agreement ON negotiations (agreement_id);
CREATE TABLE IF NOT EXISTS transfers (
    provider_pid TEXT PRIMARY KEY,
    consumer_pid TEXT NOT NULL,
    principal TEXT NOT NULL,
    callback TEXT NOT NULL,
    agreement_id TEXT NOT NULL,
    format TEXT NOT NULL,
    state TEXT NOT NULL,
    changed_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_by_agreement ON transfers (agreement_id);
CREATE UNIQUE INDEX IF NOT EXISTS transfers_one_per_consumer_pid ON transfers (principal, consumer_pid);
";

/// Process states that are not terminal.
const OPEN_NEGOTIATION: &str = "('REQUESTED', 'AGREED', 'VERIFIED')";
const OPEN_TRANSFER: &str = "('REQUESTED', 'STARTED', 'SUSPENDED')";

impl DspStore {
    pub fn open(path: &Path) -> Result<Self, DspStoreError> {
        let open = || -> rusqlite::Result<Connection> {
            let db = Connection::open(path)?;
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "FULL")?;
            db.busy_timeout(Duration::from_secs(10))?;
            db.execute_batch(SCHEMA)?;
            Ok(db)
        };
        let db = open().map_err(|cause| DspStoreError::Open {
            path: path.to_path_buf(),
            cause,
        })?;
        Ok(Self {
            db: Mutex::new(db),
            path: path.to_path_buf(),
        })
    }

    pub fn insert_negotiation(&self, n: &Negotiation) -> Result<(), DspStoreError> {
        self.lock()
            .execute(
                "INSERT INTO negotiations VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    n.provider_pid,
                    n.consumer_pid,
                    n.principal,
                    n.callback,
                    n.offer_id,
                    n.dataset,
                    n.purpose,
                    n.state,
                    n.agreement_id,
                    now_ms()
                ],
            )
            .map(drop)
            .map_err(|e| self.error(e))
    }

    pub fn negotiation(&self, provider_pid: &str) -> Result<Option<Negotiation>, DspStoreError> {
        self.lock()
            .query_row(
                "SELECT * FROM negotiations WHERE provider_pid = ?1",
                [provider_pid],
                read_negotiation,
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// The negotiation that made agreement `agreement_id`.
    pub fn negotiation_of(&self, agreement_id: &str) -> Result<Option<Negotiation>, DspStoreError> {
        self.lock()
            .query_row(
                "SELECT * FROM negotiations WHERE agreement_id = ?1",
                [agreement_id],
                read_negotiation,
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// Moves a negotiation to `to` if it is in one of `from`; false if it
    /// was not (another message moved it first).
    pub fn move_negotiation(
        &self,
        provider_pid: &str,
        from: &[&str],
        to: &str,
    ) -> Result<bool, DspStoreError> {
        self.compare_and_set("negotiations", provider_pid, from, to)
    }

    /// Inserts a transfer; false if `principal` already has one with this
    /// `consumer_pid` (a concurrent repeat of the same request).
    pub fn insert_transfer(&self, t: &Transfer) -> Result<bool, DspStoreError> {
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO transfers VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    t.provider_pid,
                    t.consumer_pid,
                    t.principal,
                    t.callback,
                    t.agreement_id,
                    t.format,
                    t.state,
                    now_ms()
                ],
            )
            .map(|inserted| inserted == 1)
            .map_err(|e| self.error(e))
    }

    /// How many negotiations and transfers of `principal` are not yet over.
    pub fn open_processes(&self, principal: &str) -> Result<(usize, usize), DspStoreError> {
        let db = self.lock();
        let count = |table: &str, open: &str| {
            db.query_row(
                &format!("SELECT count(*) FROM {table} WHERE principal = ?1 AND state IN {open}"),
                [principal],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n as usize)
        };
        let negotiations = count("negotiations", OPEN_NEGOTIATION).map_err(|e| self.error(e))?;
        let transfers = count("transfers", OPEN_TRANSFER).map_err(|e| self.error(e))?;
        Ok((negotiations, transfers))
    }

    /// Every negotiation not yet over (to reconcile with the agreements).
    pub fn open_negotiations(&self) -> Result<Vec<Negotiation>, DspStoreError> {
        let db = self.lock();
        let mut statement = db
            .prepare(&format!(
                "SELECT * FROM negotiations WHERE state IN {OPEN_NEGOTIATION}"
            ))
            .map_err(|e| self.error(e))?;
        statement
            .query_map([], read_negotiation)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(e))
    }

    /// Every transfer not yet over.
    pub fn all_open_transfers(&self) -> Result<Vec<Transfer>, DspStoreError> {
        let db = self.lock();
        let mut statement = db
            .prepare(&format!(
                "SELECT * FROM transfers WHERE state IN {OPEN_TRANSFER}"
            ))
            .map_err(|e| self.error(e))?;
        statement
            .query_map([], read_transfer)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(e))
    }

    pub fn transfer(&self, provider_pid: &str) -> Result<Option<Transfer>, DspStoreError> {
        self.lock()
            .query_row(
                "SELECT * FROM transfers WHERE provider_pid = ?1",
                [provider_pid],
                read_transfer,
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// The transfer `principal` already requested with `consumer_pid`
    /// (a repeated request is answered with it, not a second one).
    pub fn transfer_by_consumer(
        &self,
        principal: &str,
        consumer_pid: &str,
    ) -> Result<Option<Transfer>, DspStoreError> {
        self.lock()
            .query_row(
                "SELECT * FROM transfers WHERE principal = ?1 AND consumer_pid = ?2",
                [principal, consumer_pid],
                read_transfer,
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// The transfers under agreement `agreement_id` not yet ended.
    pub fn open_transfers(&self, agreement_id: &str) -> Result<Vec<Transfer>, DspStoreError> {
        let db = self.lock();
        let mut statement = db
            .prepare(&format!(
                "SELECT * FROM transfers WHERE agreement_id = ?1 AND state IN {OPEN_TRANSFER}"
            ))
            .map_err(|e| self.error(e))?;
        statement
            .query_map([agreement_id], read_transfer)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(e))
    }

    pub fn move_transfer(
        &self,
        provider_pid: &str,
        from: &[&str],
        to: &str,
    ) -> Result<bool, DspStoreError> {
        self.compare_and_set("transfers", provider_pid, from, to)
    }

    fn compare_and_set(
        &self,
        table: &str,
        provider_pid: &str,
        from: &[&str],
        to: &str,
    ) -> Result<bool, DspStoreError> {
        let from = serde_json::to_string(from).unwrap_or_default();
        self.lock()
            .execute(
                &format!(
                    "UPDATE {table} SET state = ?2, changed_at_ms = ?4 WHERE provider_pid = ?1
                     AND state IN (SELECT value FROM json_each(?3))"
                ),
                params![provider_pid, to, from, now_ms()],
            )
            .map(|changed| changed == 1)
            .map_err(|e| self.error(e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, error: rusqlite::Error) -> DspStoreError {
        DspStoreError::Database {
            path: self.path.clone(),
            error,
        }
    }
}

/// A fresh process id: `urn:uuid:` and a random (version 4) UUID.
pub fn new_pid() -> Result<String, DspStoreError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| DspStoreError::Random)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex::encode(b);
    Ok(format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

fn read_negotiation(row: &Row<'_>) -> rusqlite::Result<Negotiation> {
    Ok(Negotiation {
        provider_pid: row.get(0)?,
        consumer_pid: row.get(1)?,
        principal: row.get(2)?,
        callback: row.get(3)?,
        offer_id: row.get(4)?,
        dataset: row.get(5)?,
        purpose: row.get(6)?,
        state: row.get(7)?,
        agreement_id: row.get(8)?,
    })
}

fn read_transfer(row: &Row<'_>) -> rusqlite::Result<Transfer> {
    Ok(Transfer {
        provider_pid: row.get(0)?,
        consumer_pid: row.get(1)?,
        principal: row.get(2)?,
        callback: row.get(3)?,
        agreement_id: row.get(4)?,
        format: row.get(5)?,
        state: row.get(6)?,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_moves_only_from_the_states_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = DspStore::open(&dir.path().join("dsp.sqlite")).unwrap();
        let pid = new_pid().unwrap();
        assert!(pid.starts_with("urn:uuid:") && pid.len() == 45, "{pid}");
        store
            .insert_negotiation(&Negotiation {
                provider_pid: pid.clone(),
                consumer_pid: "c".into(),
                principal: "p".into(),
                callback: "https://x".into(),
                offer_id: "trips/a".into(),
                dataset: "trips".into(),
                purpose: "research".into(),
                state: "REQUESTED".into(),
                agreement_id: "agr-1".into(),
            })
            .unwrap();
        assert!(
            !store
                .move_negotiation(&pid, &["AGREED"], "VERIFIED")
                .unwrap()
        );
        assert!(
            store
                .move_negotiation(&pid, &["REQUESTED"], "AGREED")
                .unwrap()
        );
        assert!(
            !store
                .move_negotiation(&pid, &["REQUESTED"], "AGREED")
                .unwrap()
        );
        assert_eq!(store.negotiation(&pid).unwrap().unwrap().state, "AGREED");
        assert_eq!(
            store.negotiation_of("agr-1").unwrap().unwrap().provider_pid,
            pid
        );
    }
}
