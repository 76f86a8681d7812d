//! Step 8: the durable differential-privacy budget ledger, in embedded
//! SQLite (`<state_dir>/privacy-ledger.sqlite`).
//!
//! # Accounting model (pre-charging)
//!
//! A query *reserves* its (ε, δ) before any data is read. The reservation is
//! committed to disk (WAL, `synchronous=FULL`) before [`Ledger::reserve`]
//! returns, so the caller never holds a ticket whose spend could vanish in a
//! crash. Its life cycle is:
//!
//! ```text
//! reserved ──start──▶ started ──commit──▶ committed
//!    │                   │
//!    └──refund/expire──▶ refunded ◀──refund (only if no data was read)
//! ```
//!
//! Spend is `committed + reserved`: a reservation counts as spent until it is
//! refunded. Refunds are only legitimate when the query failed before reading
//! data, so after any crash the recorded spend is at least the spend of every
//! answer that was released.
//!
//! # Exact amounts
//!
//! ε is stored in nano-units (1e-9), δ in atto-units (1e-18) and ρ in
//! pico-units (1e-12), all `i64`, so that thousands of small charges add up
//! exactly. See [`epsilon_units`], [`delta_units`] and [`rho_units`].
//!
//! # Two kinds of charge
//!
//! A query under basic accounting charges ε and δ, which add up. A query
//! under `accounting: zcdp` charges ρ (and the δ of a private selection of
//! groups, which adds up with the other δ). An account's spend is
//!
//! ```text
//! ε: spent ε + ε_zcdp(spent ρ, δ_limit / 2)      δ: spent δ + δ_limit / 2 (once any ρ is spent)
//! ```
//!
//! where `ε_zcdp(ρ, δ) = ρ + 2·√(ρ·ln(1/δ))` is the zCDP → (ε, δ) bound
//! ([`sluice_policy::dp::zcdp`]). The stored amounts stay exact sums of
//! integers; only the comparison with the limit converts.
//!
//! One period of one account holds one kind of charge: the first charge
//! (not refunded) opens it as basic (ε) or zCDP (ρ), and a charge of the
//! other kind is refused until the next period
//! ([`LedgerError::AccountingChanged`]). The conversion above is a valid
//! bound for ρ spent adaptively up to a fixed ceiling; letting an
//! adaptively chosen ε spend lower that ceiling midway has no such proof.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, Transaction, TransactionBehavior};
use sluice_policy::dp::zcdp;
pub use sluice_policy::dp::{MAX_WINDOW_DAYS, Period};

/// Nano-units of ε per 1.0 ε.
pub const EPSILON_SCALE: f64 = 1e9;
/// Atto-units of δ per 1.0 δ.
pub const DELTA_SCALE: f64 = 1e18;
/// Pico-units of ρ per 1.0 ρ (a query of ε 0.01 at δ 1e-7 costs ρ ≈ 1.5e-6).
pub const RHO_SCALE: f64 = 1e12;
/// Schema version written by (and the newest understood by) this build.
pub const SCHEMA_VERSION: i64 = 3;
/// How long a reservation made by [`Ledger::reserve`] may stay unstarted
/// before [`Ledger::expire_unstarted`] may refund it.
pub const DEFAULT_TICKET_TTL: TimeDelta = TimeDelta::minutes(15);
/// How long a write waits for another connection (or process) holding the
/// write lock before giving up with [`LedgerError::Busy`].
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the ledger. Database errors always name the file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The charge does not fit in the remaining budget. Amounts are in units
    /// (nano-ε, atto-δ); the message shows them as plain ε and δ.
    #[error(
        "privacy budget exhausted for {organization} on {dataset} ({period_key}): \
         {} ε and {} δ remain, this query needs {} ε and {} δ",
        epsilon_from_units(*.remaining_epsilon),
        delta_from_units(*.remaining_delta),
        epsilon_from_units(*.needed_epsilon),
        delta_from_units(*.needed_delta)
    )]
    Exhausted {
        organization: String,
        dataset: String,
        period_key: String,
        remaining_epsilon: i64,
        remaining_delta: i64,
        needed_epsilon: i64,
        needed_delta: i64,
    },
    /// The file could not be opened or created at all.
    #[error(
        "cannot open the privacy ledger {}: {cause}. Check that it is a file this connector may \
         read and write (not a directory) and that its directory exists",
        .path.display()
    )]
    Open {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The file exists but is not a readable SQLite database.
    #[error(
        "the privacy ledger {} is damaged or not an SQLite database ({cause}). It records every \
         privacy budget spent: restore it from a backup, and start again (the connector never \
         creates a new ledger over it: that would reset every budget)",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// SQLite's integrity check found damage when the ledger was opened.
    #[error(
        "the privacy ledger {} is damaged: SQLite's integrity check reports {detail}. It records \
         every privacy budget spent: restore it from a backup, and start again (the connector \
         never creates a new ledger over it: that would reset every budget)",
        .path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    /// The file is a valid SQLite database that belongs to something else.
    #[error("{} is an SQLite database but not a privacy ledger (it has unrelated tables)", .path.display())]
    NotALedger { path: PathBuf },
    /// The file was written by a newer build.
    #[error(
        "ledger database {} has schema version {found}; this build understands up to {supported}",
        .path.display()
    )]
    UnsupportedSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// WAL could not be enabled (e.g. `:memory:` or a filesystem without
    /// shared memory); we refuse to run without crash-safe commits.
    #[error(
        "ledger database {} could not switch to write-ahead logging (journal mode is {mode:?})",
        .path.display()
    )]
    NoWal { path: PathBuf, mode: String },
    /// Another writer held the lock for longer than [`BUSY_TIMEOUT`].
    #[error(
        "ledger database {} stayed locked by another writer for more than {:?}: {cause}",
        .path.display(),
        BUSY_TIMEOUT
    )]
    Busy {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The disk holding the ledger is full: nothing was changed.
    #[error("the privacy ledger {} cannot be written: the disk is full ({cause})", .path.display())]
    Full {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// Any other SQLite failure.
    #[error("ledger database {}: {cause}", .path.display())]
    Database {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The stored totals disagree with the reservation rows.
    #[error("ledger database {} is inconsistent: {detail}", .path.display())]
    Inconsistent { path: PathBuf, detail: String },
    /// No reservation has this id.
    #[error("unknown privacy-budget reservation {id}")]
    UnknownReservation { id: String },
    /// A refunded reservation cannot be committed: its spend was returned.
    #[error("privacy-budget reservation {id} was refunded and can no longer be committed")]
    Refunded { id: String },
    /// The period was opened under the other accounting (the policy's
    /// `budget.accounting` changed, or two grants of the organization
    /// disagree): its charges cannot be mixed.
    #[error(
        "the privacy budget of {organization} on {dataset} ({period_key}) was opened under \
         {opened} accounting, and this query is charged under {asked} accounting: the two cannot \
         be mixed in one period, so the policy's change of `budget.accounting` takes effect in \
         the next period (ask the provider if the grants disagree)"
    )]
    AccountingChanged {
        organization: String,
        dataset: String,
        period_key: String,
        opened: &'static str,
        asked: &'static str,
    },
    /// A float amount that cannot be converted to units.
    #[error("invalid {what} {value}: must be finite, non-negative and not absurdly large")]
    InvalidAmount { what: &'static str, value: f64 },
    /// An N-day window outside 1 to [`MAX_WINDOW_DAYS`] days.
    #[error("invalid budget period {period}: an N-day window must be 1 to {MAX_WINDOW_DAYS} days")]
    InvalidPeriod { period: String },
    /// A negative amount in units.
    #[error("invalid {what} {units} units: must not be negative")]
    NegativeUnits { what: &'static str, units: i64 },
}

/// Which direction to round a float amount that is not a whole number of units.
#[derive(Clone, Copy)]
enum Rounding {
    Up,
    Down,
}

/// Converts a float amount to whole units.
///
/// Decimal inputs such as 0.01 are not exact in binary, so `value * scale`
/// lands a few ulps off the integer the user meant (and `0.1 + 0.2` lands
/// above 3e8). Within a tiny tolerance we snap to that integer; otherwise we
/// round in the direction that is safe for privacy.
fn to_units(
    what: &'static str,
    value: f64,
    scale: f64,
    rounding: Rounding,
) -> Result<i64, LedgerError> {
    let invalid = || LedgerError::InvalidAmount { what, value };
    if !value.is_finite() || value < 0.0 {
        return Err(invalid());
    }
    let scaled = value * scale;
    let nearest = scaled.round();
    let tolerance = (scaled * 4.0 * f64::EPSILON).max(1e-6);
    let mut units = if (scaled - nearest).abs() <= tolerance {
        nearest
    } else {
        match rounding {
            Rounding::Up => scaled.ceil(),
            Rounding::Down => scaled.floor(),
        }
    };
    // A positive charge must never become free.
    if matches!(rounding, Rounding::Up) && value > 0.0 && units == 0.0 {
        units = 1.0;
    }
    // `i64::MAX as f64` is 2^63, which itself does not fit.
    if units >= i64::MAX as f64 {
        return Err(invalid());
    }
    Ok(units as i64)
}

/// ε as nano-units for a *charge*, rounding up (never under-charges).
/// `0.01` → `10_000_000`, `1.0` → `1_000_000_000`.
pub fn epsilon_units(eps: f64) -> Result<i64, LedgerError> {
    to_units("epsilon", eps, EPSILON_SCALE, Rounding::Up)
}

/// δ as atto-units for a *charge*, rounding up. `1e-5` → `10_000_000_000_000`.
pub fn delta_units(delta: f64) -> Result<i64, LedgerError> {
    to_units("delta", delta, DELTA_SCALE, Rounding::Up)
}

/// ρ as pico-units for a *charge*: rounded up, plus one unit. ρ is never
/// typed by a person (it is computed from ε, δ and shares in floating
/// point), so there is no decimal to snap to, and the extra unit (1e-12)
/// covers any rounding in the computation.
pub fn rho_units(rho: f64) -> Result<i64, LedgerError> {
    let invalid = || LedgerError::InvalidAmount {
        what: "rho",
        value: rho,
    };
    if !rho.is_finite() || rho < 0.0 {
        return Err(invalid());
    }
    if rho == 0.0 {
        return Ok(0);
    }
    let units = (rho * RHO_SCALE).ceil() + 1.0;
    if units >= i64::MAX as f64 {
        return Err(invalid());
    }
    Ok(units as i64)
}

/// Pico-units back to ρ.
pub fn rho_from_units(units: i64) -> f64 {
    units as f64 / RHO_SCALE
}

/// The nano-ε that `rho` pico-ρ cost once converted at `delta` atto-δ,
/// rounded up; `i64::MAX` when the conversion has no finite answer (no δ).
pub fn zcdp_epsilon_units(rho: i64, delta: i64) -> i64 {
    if rho <= 0 {
        return 0;
    }
    let epsilon = zcdp::epsilon_for_rho(rho_from_units(rho), delta_from_units(delta));
    epsilon_units(epsilon).unwrap_or(i64::MAX)
}

/// ε as nano-units for a *limit*, rounding down (never over-grants).
pub fn epsilon_limit_units(eps: f64) -> Result<i64, LedgerError> {
    to_units("epsilon limit", eps, EPSILON_SCALE, Rounding::Down)
}

/// δ as atto-units for a *limit*, rounding down.
pub fn delta_limit_units(delta: f64) -> Result<i64, LedgerError> {
    to_units("delta limit", delta, DELTA_SCALE, Rounding::Down)
}

/// Nano-units back to ε, for display only.
pub fn epsilon_from_units(units: i64) -> f64 {
    units as f64 / EPSILON_SCALE
}

/// Atto-units back to δ, for display only.
pub fn delta_from_units(units: i64) -> f64 {
    units as f64 / DELTA_SCALE
}

/// A budget: who spends, on what, over which window, and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub organization: String,
    pub dataset: String,
    pub period: Period,
    /// Nano-ε per period.
    pub limit_epsilon: i64,
    /// Atto-δ per period.
    pub limit_delta: i64,
}

/// What one query costs, in units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// Nano-ε.
    pub epsilon: i64,
    /// Atto-δ.
    pub delta: i64,
    /// Pico-ρ (zCDP accounting; 0 under basic accounting).
    pub rho: i64,
}

/// A durable reservation: the caller's ticket to run one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub period_key: String,
    pub expires_at: DateTime<Utc>,
    /// The account balance right after this reservation.
    pub remaining: Balance,
}

/// Where a reservation is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Budget held, no data read yet.
    Reserved,
    /// Data reading has begun; can no longer expire.
    Started,
    /// Answer released; final.
    Committed,
    /// Budget returned; final.
    Refunded,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Started => "started",
            Self::Committed => "committed",
            Self::Refunded => "refunded",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::Reserved,
            Self::Started,
            Self::Committed,
            Self::Refunded,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

impl ToSql for State {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for State {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        State::parse(s)
            .ok_or_else(|| FromSqlError::Other(format!("unknown reservation state {s:?}").into()))
    }
}

/// One reservation row, kept forever for audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRecord {
    pub id: String,
    pub organization: String,
    pub dataset: String,
    pub period_key: String,
    pub epsilon: i64,
    pub delta: i64,
    pub rho: i64,
    pub state: State,
    /// RFC 3339 UTC timestamps with microseconds.
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: String,
}

/// An account's standing in one period. `spent_*` includes `reserved_*`.
/// `spent_epsilon` and `spent_delta` are what basic-accounting queries
/// charged (and the δ of zCDP queries' selections); `spent_rho` is what
/// zCDP queries charged. [`Balance::total_epsilon`] and
/// [`Balance::total_delta`] combine them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub organization: String,
    pub dataset: String,
    pub period_key: String,
    pub limit_epsilon: i64,
    pub spent_epsilon: i64,
    pub limit_delta: i64,
    pub spent_delta: i64,
    pub spent_rho: i64,
    /// The part of `spent_epsilon` that could still be refunded.
    pub reserved_epsilon: i64,
    /// The part of `spent_delta` that could still be refunded.
    pub reserved_delta: i64,
    /// The part of `spent_rho` that could still be refunded.
    pub reserved_rho: i64,
    /// Queries counted against this period (refunded ones excluded).
    pub queries: i64,
}

impl Balance {
    /// The δ at which spent ρ is converted to ε: half the limit.
    pub fn conversion_delta(&self) -> i64 {
        self.limit_delta / 2
    }

    /// Nano-ε spent in all: the basic part plus the converted ρ.
    pub fn total_epsilon(&self) -> i64 {
        self.total_epsilon_with(self.spent_epsilon, self.spent_rho)
            .unwrap_or(i64::MAX)
    }

    /// Atto-δ spent in all: the basic part, plus the conversion's δ once
    /// any ρ is spent.
    pub fn total_delta(&self) -> i64 {
        self.total_delta_with(self.spent_delta, self.spent_rho)
            .unwrap_or(i64::MAX)
    }

    fn total_epsilon_with(&self, epsilon: i64, rho: i64) -> Option<i64> {
        let converted = zcdp_epsilon_units(rho, self.conversion_delta());
        (converted < i64::MAX).then_some(())?;
        epsilon.checked_add(converted)
    }

    fn total_delta_with(&self, delta: i64, rho: i64) -> Option<i64> {
        let conversion = if rho > 0 { self.conversion_delta() } else { 0 };
        delta.checked_add(conversion)
    }

    /// Nano-ε still available (0 if the limit was lowered below the spend).
    pub fn remaining_epsilon(&self) -> i64 {
        self.limit_epsilon
            .saturating_sub(self.total_epsilon())
            .max(0)
    }

    /// Atto-δ still available.
    pub fn remaining_delta(&self) -> i64 {
        self.limit_delta.saturating_sub(self.total_delta()).max(0)
    }

    fn empty(account: &Account, period_key: &str) -> Self {
        Self {
            organization: account.organization.clone(),
            dataset: account.dataset.clone(),
            period_key: period_key.to_string(),
            limit_epsilon: account.limit_epsilon,
            spent_epsilon: 0,
            limit_delta: account.limit_delta,
            spent_delta: 0,
            spent_rho: 0,
            reserved_epsilon: 0,
            reserved_delta: 0,
            reserved_rho: 0,
            queries: 0,
        }
    }

    /// The totals after `charge`, if no sum overflows.
    fn totals_after(&self, charge: Charge) -> Option<(i64, i64)> {
        let epsilon = self.spent_epsilon.checked_add(charge.epsilon)?;
        let delta = self.spent_delta.checked_add(charge.delta)?;
        let rho = self.spent_rho.checked_add(charge.rho)?;
        Some((
            self.total_epsilon_with(epsilon, rho)?,
            self.total_delta_with(delta, rho)?,
        ))
    }

    /// The kind of charge the period was opened with, if any.
    fn accounting(&self) -> Option<&'static str> {
        match (self.spent_epsilon > 0, self.spent_rho > 0) {
            (true, _) => Some("basic"),
            (false, true) => Some("zcdp"),
            (false, false) => None,
        }
    }

    /// Refuses a charge of the other kind than the period's.
    fn same_accounting(&self, charge: Charge) -> Result<(), LedgerError> {
        let asked = match (charge.epsilon > 0, charge.rho > 0) {
            (true, false) => "basic",
            (false, true) => "zcdp",
            // Neither (a zero charge) fits either period.
            (false, false) => return Ok(()),
            (true, true) => {
                return Err(LedgerError::InvalidAmount {
                    what: "charge of both ε and ρ",
                    value: 0.0,
                });
            }
        };
        match self.accounting() {
            Some(opened) if opened != asked => Err(LedgerError::AccountingChanged {
                organization: self.organization.clone(),
                dataset: self.dataset.clone(),
                period_key: self.period_key.clone(),
                opened,
                asked,
            }),
            _ => Ok(()),
        }
    }

    /// Whether `charge` fits; overflow counts as not fitting.
    fn fits(&self, charge: Charge) -> bool {
        self.totals_after(charge).is_some_and(|(epsilon, delta)| {
            epsilon <= self.limit_epsilon && delta <= self.limit_delta
        })
    }

    /// What the charge adds to the totals (for a ρ charge, the growth of
    /// the converted ε, and the conversion's δ if it is the first).
    fn increase(&self, charge: Charge) -> (i64, i64) {
        match self.totals_after(charge) {
            Some((epsilon, delta)) => (
                epsilon.saturating_sub(self.total_epsilon()),
                delta.saturating_sub(self.total_delta()),
            ),
            None => (i64::MAX, i64::MAX),
        }
    }

    fn exhausted(&self, charge: Charge) -> LedgerError {
        let (needed_epsilon, needed_delta) = self.increase(charge);
        LedgerError::Exhausted {
            organization: self.organization.clone(),
            dataset: self.dataset.clone(),
            period_key: self.period_key.clone(),
            remaining_epsilon: self.remaining_epsilon(),
            remaining_delta: self.remaining_delta(),
            needed_epsilon,
            needed_delta,
        }
    }

    fn with_reserved(mut self, charge: Charge) -> Self {
        self.spent_epsilon += charge.epsilon;
        self.spent_delta += charge.delta;
        self.spent_rho += charge.rho;
        self.reserved_epsilon += charge.epsilon;
        self.reserved_delta += charge.delta;
        self.reserved_rho += charge.rho;
        self.queries += 1;
        self
    }
}

/// The version 2 schema, for a new file, which [`migrate`] then upgrades
/// like any other (so that a new and an upgraded ledger have the very same
/// schema). Version 2 differs from version 1 only in the `accounts.period`
/// CHECK, which also admits N-day windows (`1d` to `3660d`, see
/// [`MAX_WINDOW_DAYS`]); [`MIGRATE_V1_TO_V2`] upgrades a version 1 file.
/// Version 3 adds the ρ columns of zCDP accounting ([`MIGRATE_V2_TO_V3`]).
const SCHEMA: &str = "
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE accounts (
    organization      TEXT    NOT NULL,
    dataset           TEXT    NOT NULL,
    period_key        TEXT    NOT NULL,
    period            TEXT    NOT NULL CHECK (period IN ('day', 'month', 'year', 'total')
        OR ((period GLOB '[1-9]d' OR period GLOB '[1-9][0-9]d' OR period GLOB '[1-9][0-9][0-9]d'
             OR period GLOB '[1-9][0-9][0-9][0-9]d')
            AND CAST(substr(period, 1, length(period) - 1) AS INTEGER) <= 3660)),
    limit_epsilon     INTEGER NOT NULL CHECK (limit_epsilon >= 0),
    limit_delta       INTEGER NOT NULL CHECK (limit_delta >= 0),
    committed_epsilon INTEGER NOT NULL DEFAULT 0 CHECK (committed_epsilon >= 0),
    committed_delta   INTEGER NOT NULL DEFAULT 0 CHECK (committed_delta >= 0),
    reserved_epsilon  INTEGER NOT NULL DEFAULT 0 CHECK (reserved_epsilon >= 0),
    reserved_delta    INTEGER NOT NULL DEFAULT 0 CHECK (reserved_delta >= 0),
    queries           INTEGER NOT NULL DEFAULT 0 CHECK (queries >= 0),
    updated_at        TEXT    NOT NULL,
    PRIMARY KEY (organization, dataset, period_key)
);
CREATE TABLE reservations (
    id           TEXT    PRIMARY KEY,
    organization TEXT    NOT NULL,
    dataset      TEXT    NOT NULL,
    period_key   TEXT    NOT NULL,
    epsilon      INTEGER NOT NULL CHECK (epsilon >= 0),
    delta        INTEGER NOT NULL CHECK (delta >= 0),
    state        TEXT    NOT NULL CHECK (state IN ('reserved', 'started', 'committed', 'refunded')),
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    expires_at   TEXT    NOT NULL,
    FOREIGN KEY (organization, dataset, period_key)
        REFERENCES accounts (organization, dataset, period_key)
);
CREATE INDEX reservations_by_expiry ON reservations (state, expires_at);
CREATE INDEX reservations_by_account ON reservations (organization, dataset, period_key);
CREATE TABLE answer_cache (
    organization TEXT NOT NULL,
    cache_key    TEXT NOT NULL,
    period_key   TEXT NOT NULL,
    answer       BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (organization, cache_key, period_key)
);
";

/// Upgrades a version 1 file to version 2: rebuilds `accounts` with the
/// CHECK that admits N-day windows, keeping every row. This is SQLite's
/// documented way to change a constraint (create the new table, copy, drop
/// the old, rename the new); [`migrate`] runs it with foreign keys off and
/// inside one transaction together with the version bump, and checks the
/// foreign keys before committing. `reservations` and `answer_cache` do not
/// store the period and are untouched. Frozen: later schema versions add
/// their own steps after this one.
const MIGRATE_V1_TO_V2: &str = "
CREATE TABLE accounts_v2 (
    organization      TEXT    NOT NULL,
    dataset           TEXT    NOT NULL,
    period_key        TEXT    NOT NULL,
    period            TEXT    NOT NULL CHECK (period IN ('day', 'month', 'year', 'total')
        OR ((period GLOB '[1-9]d' OR period GLOB '[1-9][0-9]d' OR period GLOB '[1-9][0-9][0-9]d'
             OR period GLOB '[1-9][0-9][0-9][0-9]d')
            AND CAST(substr(period, 1, length(period) - 1) AS INTEGER) <= 3660)),
    limit_epsilon     INTEGER NOT NULL CHECK (limit_epsilon >= 0),
    limit_delta       INTEGER NOT NULL CHECK (limit_delta >= 0),
    committed_epsilon INTEGER NOT NULL DEFAULT 0 CHECK (committed_epsilon >= 0),
    committed_delta   INTEGER NOT NULL DEFAULT 0 CHECK (committed_delta >= 0),
    reserved_epsilon  INTEGER NOT NULL DEFAULT 0 CHECK (reserved_epsilon >= 0),
    reserved_delta    INTEGER NOT NULL DEFAULT 0 CHECK (reserved_delta >= 0),
    queries           INTEGER NOT NULL DEFAULT 0 CHECK (queries >= 0),
    updated_at        TEXT    NOT NULL,
    PRIMARY KEY (organization, dataset, period_key)
);
INSERT INTO accounts_v2 (organization, dataset, period_key, period, limit_epsilon, limit_delta,
        committed_epsilon, committed_delta, reserved_epsilon, reserved_delta, queries, updated_at)
    SELECT organization, dataset, period_key, period, limit_epsilon, limit_delta,
        committed_epsilon, committed_delta, reserved_epsilon, reserved_delta, queries, updated_at
    FROM accounts;
DROP TABLE accounts;
ALTER TABLE accounts_v2 RENAME TO accounts;
UPDATE schema_version SET version = 2;
";

/// Upgrades a version 2 file to version 3: adds the ρ columns (0 for
/// every existing row, which spent no ρ). Frozen like the step before.
const MIGRATE_V2_TO_V3: &str = "
ALTER TABLE accounts ADD COLUMN committed_rho INTEGER NOT NULL DEFAULT 0 CHECK (committed_rho >= 0);
ALTER TABLE accounts ADD COLUMN reserved_rho INTEGER NOT NULL DEFAULT 0 CHECK (reserved_rho >= 0);
ALTER TABLE reservations ADD COLUMN rho INTEGER NOT NULL DEFAULT 0 CHECK (rho >= 0);
UPDATE schema_version SET version = 3;
";

const BALANCE_COLUMNS: &str = "organization, dataset, period_key, limit_epsilon, limit_delta, \
     committed_epsilon, committed_delta, reserved_epsilon, reserved_delta, queries, \
     committed_rho, reserved_rho";

const RESERVATION_COLUMNS: &str = "id, organization, dataset, period_key, epsilon, delta, state, created_at, updated_at, expires_at, rho";

fn balance_from_row(row: &Row<'_>) -> rusqlite::Result<Balance> {
    let committed_epsilon: i64 = row.get(5)?;
    let committed_delta: i64 = row.get(6)?;
    let reserved_epsilon: i64 = row.get(7)?;
    let reserved_delta: i64 = row.get(8)?;
    let committed_rho: i64 = row.get(10)?;
    let reserved_rho: i64 = row.get(11)?;
    Ok(Balance {
        organization: row.get(0)?,
        dataset: row.get(1)?,
        period_key: row.get(2)?,
        limit_epsilon: row.get(3)?,
        limit_delta: row.get(4)?,
        spent_epsilon: committed_epsilon + reserved_epsilon,
        spent_delta: committed_delta + reserved_delta,
        spent_rho: committed_rho + reserved_rho,
        reserved_epsilon,
        reserved_delta,
        reserved_rho,
        queries: row.get(9)?,
    })
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<ReservationRecord> {
    Ok(ReservationRecord {
        id: row.get(0)?,
        organization: row.get(1)?,
        dataset: row.get(2)?,
        period_key: row.get(3)?,
        epsilon: row.get(4)?,
        delta: row.get(5)?,
        state: row.get(6)?,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
        expires_at: row.get(9)?,
        rho: row.get(10)?,
    })
}

/// Fixed-width UTC timestamp, so that text comparison in SQL is
/// chronological (`expires_at < ?`).
fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A unique, roughly time-ordered reservation id.
fn new_reservation_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = Utc::now();
    // RandomState is seeded from the OS RNG, so processes that share a clock
    // tick and counter value still get different suffixes. The primary key
    // would reject a collision rather than merge two reservations.
    let noise =
        RandomState::new().hash_one((seq, std::process::id(), now.timestamp_subsec_nanos()));
    format!("r{}-{seq:x}-{noise:016x}", now.format("%Y%m%dT%H%M%S%6fZ"))
}

/// Attaches the database path to SQLite errors and sorts them into the
/// variants a caller may want to handle differently.
trait AtPath<T> {
    fn at_path(self, path: &Path) -> Result<T, LedgerError>;
}

impl<T> AtPath<T> for rusqlite::Result<T> {
    fn at_path(self, path: &Path) -> Result<T, LedgerError> {
        self.map_err(|cause| {
            let path = path.to_path_buf();
            match cause.sqlite_error_code() {
                Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                    LedgerError::Corrupt { path, cause }
                }
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                    LedgerError::Busy { path, cause }
                }
                Some(ErrorCode::DiskFull) => LedgerError::Full { path, cause },
                Some(ErrorCode::CannotOpen) => LedgerError::Open { path, cause },
                _ => LedgerError::Database { path, cause },
            }
        })
    }
}

fn check_period(period: Period) -> Result<(), LedgerError> {
    if period.is_valid() {
        return Ok(());
    }
    Err(LedgerError::InvalidPeriod {
        period: period.as_str().into_owned(),
    })
}

fn check_units(what: &'static str, units: i64) -> Result<(), LedgerError> {
    if units < 0 {
        return Err(LedgerError::NegativeUnits { what, units });
    }
    Ok(())
}

/// A durable privacy-budget ledger. Cheap to share: `Send + Sync`, all
/// methods take `&self`. Several `Ledger`s (in one or many processes) may
/// use the same file; SQLite's write lock serialises them.
pub struct Ledger {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens or creates the ledger at `path`: enables WAL and
    /// `synchronous=FULL`, checks the file's integrity (SQLite's
    /// `quick_check`, which reads every page: a damaged ledger is refused
    /// before anything is charged against it) and creates or checks the
    /// schema.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let mut conn = Connection::open(path).at_path(path)?;
        conn.busy_timeout(BUSY_TIMEOUT).at_path(path)?;
        enable_wal(&conn, path)?;
        check_integrity(&conn, path)?;
        // FULL makes every commit fsync the WAL: a reservation survives
        // power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")
            .at_path(path)?;
        // Foreign keys stay off while `migrate` may rebuild a table.
        migrate(&mut conn, path)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .at_path(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reserves `charge` against `account` for the period containing `at`,
    /// with the default ticket lifetime. See [`Ledger::reserve_with_ttl`].
    pub fn reserve(
        &self,
        account: &Account,
        charge: Charge,
        at: DateTime<Utc>,
    ) -> Result<Reservation, LedgerError> {
        self.reserve_with_ttl(account, charge, at, DEFAULT_TICKET_TTL)
    }

    /// Reserves `charge` in one IMMEDIATE transaction: checks the limit,
    /// records the reservation and raises the totals. When this returns `Ok`
    /// the reservation is on disk. The account's limits are stored as given,
    /// so [`Ledger::balances`] reports the latest configuration.
    pub fn reserve_with_ttl(
        &self,
        account: &Account,
        charge: Charge,
        at: DateTime<Utc>,
        ttl: TimeDelta,
    ) -> Result<Reservation, LedgerError> {
        check_units("epsilon limit", account.limit_epsilon)?;
        check_units("delta limit", account.limit_delta)?;
        check_units("epsilon charge", charge.epsilon)?;
        check_units("delta charge", charge.delta)?;
        check_units("rho charge", charge.rho)?;
        check_period(account.period)?;
        let period_key = account.period.key(at);
        let expires_at = at
            .checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let id = new_reservation_id();
        self.write(|tx| {
            upsert_account(tx, account, &period_key, at).at_path(&self.path)?;
            let before = load_balance(tx, &account.organization, &account.dataset, &period_key)
                .at_path(&self.path)?
                .unwrap_or_else(|| Balance::empty(account, &period_key));
            before.same_accounting(charge)?;
            if !before.fits(charge) {
                return Err(before.exhausted(charge));
            }
            insert_reservation(tx, &id, account, &period_key, charge, at, expires_at)
                .at_path(&self.path)?;
            self.add_reserved(tx, account, &period_key, charge)?;
            Ok(Reservation {
                id: id.clone(),
                period_key: period_key.clone(),
                expires_at,
                remaining: before.with_reserved(charge),
            })
        })
    }

    /// Marks the start of data reading. Returns `false` unless the
    /// reservation was in state `reserved`; the caller must then not read
    /// data (the ticket was used, refunded, expired or never existed).
    pub fn start(&self, id: &str) -> Result<bool, LedgerError> {
        let conn = self.lock();
        let changed = conn
            .execute(
                "UPDATE reservations SET state = 'started', updated_at = ?2 WHERE id = ?1 AND state = 'reserved'",
                (id, timestamp(Utc::now())),
            )
            .at_path(&self.path)?;
        Ok(changed == 1)
    }

    /// Makes a reservation final (`reserved`/`started` → `committed`).
    /// Idempotent: committing twice is `Ok`. Committing a refunded or
    /// unknown reservation is an error, because an answer is about to be
    /// released whose spend is not recorded.
    pub fn commit(&self, id: &str) -> Result<(), LedgerError> {
        self.write(|tx| {
            let record = load_reservation(tx, id)
                .at_path(&self.path)?
                .ok_or_else(|| LedgerError::UnknownReservation { id: id.to_string() })?;
            match record.state {
                State::Committed => Ok(()),
                State::Refunded => Err(LedgerError::Refunded { id: id.to_string() }),
                State::Reserved | State::Started => {
                    set_state(tx, id, State::Committed).at_path(&self.path)?;
                    self.move_to_committed(tx, &record)
                }
            }
        })
    }

    /// Returns a reservation's budget. Only call it when the query read no
    /// data. Returns whether budget came back: `false` if the reservation is
    /// committed, already refunded or unknown (nothing changes then).
    pub fn refund(&self, id: &str) -> Result<bool, LedgerError> {
        self.write(|tx| {
            let Some(record) = load_reservation(tx, id).at_path(&self.path)? else {
                return Ok(false);
            };
            if !matches!(record.state, State::Reserved | State::Started) {
                return Ok(false);
            }
            self.refund_record(tx, &record)?;
            Ok(true)
        })
    }

    /// Refunds every reservation still `reserved` whose ticket expired
    /// before `before`: it was never started, so no data was read. Started
    /// reservations are never expired; a crash mid-query keeps its spend.
    pub fn expire_unstarted(&self, before: DateTime<Utc>) -> Result<u64, LedgerError> {
        self.write(|tx| {
            let expired = {
                let sql = format!(
                    "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'reserved' AND expires_at < ?1"
                );
                let mut stmt = tx.prepare(&sql).at_path(&self.path)?;
                let rows = stmt.query_map([timestamp(before)], record_from_row).at_path(&self.path)?;
                rows.collect::<rusqlite::Result<Vec<_>>>().at_path(&self.path)?
            };
            for record in &expired {
                self.refund_record(tx, record)?;
            }
            Ok(expired.len() as u64)
        })
    }

    /// Balances of every account in its current period at `at`, optionally
    /// for one organization, with the limits last given to `reserve`.
    pub fn balances(
        &self,
        organization: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<Vec<Balance>, LedgerError> {
        let conn = self.lock();
        let [day, month, year, total] =
            [Period::Day, Period::Month, Period::Year, Period::Total].map(|period| period.key(at));
        // An N-day account is current when today lies between the first and
        // last day of its key (`first..last`, fixed-width ISO dates, which
        // compare as text). Windows of one N never overlap, so at most one
        // window per account and N matches.
        let sql = format!(
            "SELECT {BALANCE_COLUMNS} FROM accounts
             WHERE (?1 IS NULL OR organization = ?1)
               AND ((period = 'day' AND period_key = ?2) OR (period = 'month' AND period_key = ?3)
                 OR (period = 'year' AND period_key = ?4) OR (period = 'total' AND period_key = ?5)
                 OR (period GLOB '[1-9]*d' AND period_key GLOB '????-??-??..????-??-??'
                     AND ?2 BETWEEN substr(period_key, 1, 10) AND substr(period_key, 13, 10)))
             ORDER BY organization, dataset, period"
        );
        let mut stmt = conn.prepare(&sql).at_path(&self.path)?;
        let rows = stmt
            .query_map((organization, day, month, year, total), balance_from_row)
            .at_path(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .at_path(&self.path)
    }

    /// The balance of `account` in the period containing `at`, with the
    /// limits from `account` (the caller's current configuration). An
    /// account never charged has spent nothing.
    pub fn balance(&self, account: &Account, at: DateTime<Utc>) -> Result<Balance, LedgerError> {
        check_period(account.period)?;
        let period_key = account.period.key(at);
        let conn = self.lock();
        let stored = load_balance(&conn, &account.organization, &account.dataset, &period_key)
            .at_path(&self.path)?;
        let mut balance = stored.unwrap_or_else(|| Balance::empty(account, &period_key));
        balance.limit_epsilon = account.limit_epsilon;
        balance.limit_delta = account.limit_delta;
        Ok(balance)
    }

    /// One reservation row, for audit and for tests.
    pub fn reservation(&self, id: &str) -> Result<Option<ReservationRecord>, LedgerError> {
        load_reservation(&self.lock(), id).at_path(&self.path)
    }

    /// Checks that every account's totals equal the sums of its reservation
    /// rows. Useful after a crash or as an operator health check.
    pub fn verify(&self) -> Result<(), LedgerError> {
        let conn = self.lock();
        let mismatch: Option<String> = conn
            .query_row(
                "SELECT a.organization || '/' || a.dataset || '/' || a.period_key
                 FROM accounts a LEFT JOIN reservations r USING (organization, dataset, period_key)
                 GROUP BY a.organization, a.dataset, a.period_key
                 HAVING a.committed_epsilon != coalesce(sum(CASE WHEN r.state = 'committed' THEN r.epsilon END), 0)
                     OR a.committed_delta != coalesce(sum(CASE WHEN r.state = 'committed' THEN r.delta END), 0)
                     OR a.reserved_epsilon != coalesce(sum(CASE WHEN r.state IN ('reserved', 'started') THEN r.epsilon END), 0)
                     OR a.reserved_delta != coalesce(sum(CASE WHEN r.state IN ('reserved', 'started') THEN r.delta END), 0)
                     OR a.committed_rho != coalesce(sum(CASE WHEN r.state = 'committed' THEN r.rho END), 0)
                     OR a.reserved_rho != coalesce(sum(CASE WHEN r.state IN ('reserved', 'started') THEN r.rho END), 0)
                     OR a.queries != count(CASE WHEN r.state != 'refunded' THEN 1 END)
                 LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()
            .at_path(&self.path)?;
        match mismatch {
            None => Ok(()),
            Some(account) => Err(LedgerError::Inconsistent {
                path: self.path.clone(),
                detail: format!("totals of {account} differ from its reservations"),
            }),
        }
    }

    /// A cached answer to an identical DP query in the same period, if any.
    /// Re-releasing the same noisy answer costs no extra budget.
    pub fn cache_get(
        &self,
        organization: &str,
        key: &str,
        period_key: &str,
    ) -> Result<Option<Vec<u8>>, LedgerError> {
        self.lock()
            .query_row(
                "SELECT answer FROM answer_cache WHERE organization = ?1 AND cache_key = ?2 AND period_key = ?3",
                (organization, key, period_key),
                |row| row.get(0),
            )
            .optional()
            .at_path(&self.path)
    }

    /// Stores an answer unless one is already stored (first writer wins) and
    /// returns the stored answer. Callers must release what this returns: two
    /// different noisy answers to one query would leak more than one ε.
    pub fn cache_put(
        &self,
        organization: &str,
        key: &str,
        period_key: &str,
        answer: &[u8],
    ) -> Result<Vec<u8>, LedgerError> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO answer_cache (organization, cache_key, period_key, answer, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                (organization, key, period_key, answer, timestamp(Utc::now())),
            )
            .at_path(&self.path)?;
            tx.query_row(
                "SELECT answer FROM answer_cache WHERE organization = ?1 AND cache_key = ?2 AND period_key = ?3",
                (organization, key, period_key),
                |row| row.get(0),
            )
            .at_path(&self.path)
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot leave half a change behind:
        // an open Transaction rolls back when dropped. The connection is fine.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in an IMMEDIATE transaction and commits if it returns `Ok`.
    /// IMMEDIATE takes the write lock up front, so the read-check-write in
    /// `f` cannot race another connection, and lock waits go through the busy
    /// handler instead of failing at commit time.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at_path(&self.path)?;
        let out = f(&tx)?;
        tx.commit().at_path(&self.path)?;
        Ok(out)
    }

    fn add_reserved(
        &self,
        tx: &Transaction<'_>,
        account: &Account,
        period_key: &str,
        charge: Charge,
    ) -> Result<(), LedgerError> {
        let changed = tx
            .execute(
                "UPDATE accounts SET reserved_epsilon = reserved_epsilon + ?4, reserved_delta = reserved_delta + ?5,
                     reserved_rho = reserved_rho + ?6, queries = queries + 1
                 WHERE organization = ?1 AND dataset = ?2 AND period_key = ?3",
                (
                    &account.organization,
                    &account.dataset,
                    period_key,
                    charge.epsilon,
                    charge.delta,
                    charge.rho,
                ),
            )
            .at_path(&self.path)?;
        self.expect_one_account(changed, period_key)
    }

    fn move_to_committed(
        &self,
        tx: &Transaction<'_>,
        record: &ReservationRecord,
    ) -> Result<(), LedgerError> {
        let changed = tx
            .execute(
                "UPDATE accounts SET reserved_epsilon = reserved_epsilon - ?4, reserved_delta = reserved_delta - ?5,
                     committed_epsilon = committed_epsilon + ?4, committed_delta = committed_delta + ?5,
                     reserved_rho = reserved_rho - ?7, committed_rho = committed_rho + ?7,
                     updated_at = ?6
                 WHERE organization = ?1 AND dataset = ?2 AND period_key = ?3",
                (
                    &record.organization,
                    &record.dataset,
                    &record.period_key,
                    record.epsilon,
                    record.delta,
                    timestamp(Utc::now()),
                    record.rho,
                ),
            )
            .at_path(&self.path)?;
        self.expect_one_account(changed, &record.period_key)
    }

    fn refund_record(
        &self,
        tx: &Transaction<'_>,
        record: &ReservationRecord,
    ) -> Result<(), LedgerError> {
        set_state(tx, &record.id, State::Refunded).at_path(&self.path)?;
        let changed = tx
            .execute(
                "UPDATE accounts SET reserved_epsilon = reserved_epsilon - ?4, reserved_delta = reserved_delta - ?5,
                     reserved_rho = reserved_rho - ?7, queries = queries - 1, updated_at = ?6
                 WHERE organization = ?1 AND dataset = ?2 AND period_key = ?3",
                (
                    &record.organization,
                    &record.dataset,
                    &record.period_key,
                    record.epsilon,
                    record.delta,
                    timestamp(Utc::now()),
                    record.rho,
                ),
            )
            .at_path(&self.path)?;
        self.expect_one_account(changed, &record.period_key)
    }

    fn expect_one_account(&self, changed: usize, period_key: &str) -> Result<(), LedgerError> {
        if changed == 1 {
            return Ok(());
        }
        Err(LedgerError::Inconsistent {
            path: self.path.clone(),
            detail: format!("expected one account row for period {period_key}, updated {changed}"),
        })
    }
}

/// SQLite's `quick_check` (every page and index entry read, in time
/// linear in the file's size): anything but `ok` is [`LedgerError::Damaged`]
/// with the first few findings.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").at_path(path)?;
    let findings = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .at_path(path)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .at_path(path)?;
    match findings.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        _ => Err(LedgerError::Damaged {
            path: path.to_path_buf(),
            detail: findings.join("; "),
        }),
    }
}

/// Switches to WAL. Retries on BUSY because the switch needs an exclusive
/// lock that a concurrently opening process may briefly hold, and SQLite
/// does not always run the busy handler for it.
fn enable_wal(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        let result = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .at_path(path);
        match result {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(LedgerError::NoWal {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            Err(LedgerError::Busy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Creates the schema in an empty file (as version 2), checks the version
/// of the file and upgrades it to [`SCHEMA_VERSION`] (version 1 → 2:
/// [`MIGRATE_V1_TO_V2`]; 2 → 3: [`MIGRATE_V2_TO_V3`]). Refuses a file from a newer build. Runs in one
/// IMMEDIATE transaction, so that processes opening a new file at the same
/// time do not both create it, and so that an upgrade either happens
/// entirely or not at all (a crash mid-way leaves the version 1 file).
///
/// Switches foreign keys off for the connection (a table rebuild needs
/// that, and the pragma cannot change inside a transaction); the caller
/// switches them back on.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), LedgerError> {
    conn.pragma_update(None, "foreign_keys", "OFF")
        .at_path(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at_path(path)?;
    let count_tables = |filter: &str| -> Result<i64, LedgerError> {
        let sql = format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND {filter}");
        tx.query_row(&sql, [], |row| row.get(0)).at_path(path)
    };
    if count_tables("name = 'schema_version'")? == 0 {
        if count_tables("name NOT LIKE 'sqlite_%'")? > 0 {
            return Err(LedgerError::NotALedger {
                path: path.to_path_buf(),
            });
        }
        tx.execute_batch(SCHEMA).at_path(path)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (2)", [])
            .at_path(path)?;
    }
    let found: Option<i64> = tx
        .query_row("SELECT max(version) FROM schema_version", [], |row| {
            row.get(0)
        })
        .at_path(path)?;
    let found = found.unwrap_or(0);
    let mut version = found;
    if version == 1 {
        tx.execute_batch(MIGRATE_V1_TO_V2).at_path(path)?;
        version = 2;
    }
    if version == 2 {
        tx.execute_batch(MIGRATE_V2_TO_V3).at_path(path)?;
        version = 3;
    }
    // Later versions add their steps here, each from the one before.
    if version != SCHEMA_VERSION {
        return Err(LedgerError::UnsupportedSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found != version {
        check_foreign_keys(&tx, path)?;
    }
    tx.commit().at_path(path)
}

/// After a table rebuild (foreign keys off): every reservation must still
/// point at its account, or the upgrade is rolled back.
fn check_foreign_keys(tx: &Transaction<'_>, path: &Path) -> Result<(), LedgerError> {
    let dangling: Option<String> = tx
        .query_row("PRAGMA foreign_key_check", [], |row| row.get(0))
        .optional()
        .at_path(path)?;
    match dangling {
        None => Ok(()),
        Some(table) => Err(LedgerError::Inconsistent {
            path: path.to_path_buf(),
            detail: format!("a row of {table} references a missing account"),
        }),
    }
}

fn upsert_account(
    tx: &Transaction<'_>,
    account: &Account,
    period_key: &str,
    at: DateTime<Utc>,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO accounts (organization, dataset, period_key, period, limit_epsilon, limit_delta, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (organization, dataset, period_key) DO UPDATE SET
             limit_epsilon = excluded.limit_epsilon, limit_delta = excluded.limit_delta,
             updated_at = excluded.updated_at",
        (
            &account.organization,
            &account.dataset,
            period_key,
            account.period.as_str().as_ref(),
            account.limit_epsilon,
            account.limit_delta,
            timestamp(at),
        ),
    )
}

fn load_balance(
    conn: &Connection,
    organization: &str,
    dataset: &str,
    period_key: &str,
) -> rusqlite::Result<Option<Balance>> {
    let sql = format!(
        "SELECT {BALANCE_COLUMNS} FROM accounts WHERE organization = ?1 AND dataset = ?2 AND period_key = ?3"
    );
    conn.query_row(&sql, (organization, dataset, period_key), balance_from_row)
        .optional()
}

fn insert_reservation(
    tx: &Transaction<'_>,
    id: &str,
    account: &Account,
    period_key: &str,
    charge: Charge,
    at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> rusqlite::Result<usize> {
    let created = timestamp(at);
    tx.execute(
        "INSERT INTO reservations
             (id, organization, dataset, period_key, epsilon, delta, state, created_at, updated_at, expires_at, rho)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)",
        (
            id,
            &account.organization,
            &account.dataset,
            period_key,
            charge.epsilon,
            charge.delta,
            State::Reserved,
            created,
            timestamp(expires_at),
            charge.rho,
        ),
    )
}

fn load_reservation(conn: &Connection, id: &str) -> rusqlite::Result<Option<ReservationRecord>> {
    let sql = format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = ?1");
    conn.query_row(&sql, [id], record_from_row).optional()
}

fn set_state(tx: &Transaction<'_>, id: &str, state: State) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE reservations SET state = ?2, updated_at = ?3 WHERE id = ?1",
        (id, state, timestamp(Utc::now())),
    )
}

#[cfg(test)]
mod tests;
