//! Agreements: the contracts under which consumers use offers, kept in
//! embedded SQLite (`<state_dir>/agreements.sqlite`, WAL, `synchronous=FULL`).
//!
//! ```text
//! request ─┬─ automatic offer ─▶ active ──revoke──▶ revoked
//!          │                       └──(expires_at)──▶ expired
//!          └─ manual offer ──▶ pending ──approve──▶ active
//!                                 └──reject──▶ rejected
//! ```
//!
//! An agreement binds an organization (the certificate's O, else the
//! principal id, as for budgets), so a new certificate of the same
//! organization uses the same agreements. Expiry is not a write: an active
//! agreement past `expires_at` reads as expired.
//!
//! An agreement negotiated over the Dataspace Protocol (`crate::dsp`) is
//! *token-bound*: a query may rest on it only when it presents an access
//! token of one of the agreement's transfers, still started, unexpired and
//! issued to the querying principal. The store keeps SHA-256 hashes of
//! tokens, never the tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, Row, params};
use sluice_policy::ActiveAgreement;
use sluice_policy::document::ApprovalMode;
use sluice_policy::offers::Offer;

/// Where an agreement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgreementState {
    Pending,
    Active,
    Rejected,
    Revoked,
    Expired,
}

impl AgreementState {
    fn as_str(self) -> &'static str {
        match self {
            AgreementState::Pending => "pending",
            AgreementState::Active => "active",
            AgreementState::Rejected => "rejected",
            AgreementState::Revoked => "revoked",
            AgreementState::Expired => "expired",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => AgreementState::Pending,
            "active" => AgreementState::Active,
            "rejected" => AgreementState::Rejected,
            "revoked" => AgreementState::Revoked,
            "expired" => AgreementState::Expired,
            _ => return None,
        })
    }
}

impl std::fmt::Display for AgreementState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One agreement as stored, with its state as of when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    pub id: String,
    pub offer_id: String,
    pub dataset: String,
    pub organization: String,
    pub requested_by: String,
    pub purpose: String,
    pub state: AgreementState,
    pub requested_at: SystemTime,
    pub decided_at: Option<SystemTime>,
    pub decided_by: Option<String>,
    pub expires_at: Option<SystemTime>,
    pub reason: Option<String>,
}

/// Why an agreement operation was refused; each maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum AgreementError {
    /// INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// FAILED_PRECONDITION: the agreement is not in a state that allows it.
    #[error("{0}")]
    WrongState(String),
    /// INTERNAL: the database failed.
    #[error("agreement store: {0}")]
    Store(AgreementStoreError),
}

// Not `#[from]`: the message already includes the store error, and a
// source would repeat it in `{:#}` chains.
impl From<AgreementStoreError> for AgreementError {
    fn from(e: AgreementStoreError) -> Self {
        AgreementError::Store(e)
    }
}

/// The agreement store itself failed (the SQLite file, the random source),
/// not the request.
#[derive(Debug, thiserror::Error)]
pub enum AgreementStoreError {
    /// The file could not be opened at all (a directory in its place, a
    /// directory that does not exist, no permission).
    #[error(
        "cannot open the agreement store {}: {cause}. Check that it is a file this connector may \
         read and write (not a directory) and that its directory exists",
        path.display()
    )]
    Open {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The file is not a readable SQLite database, or SQLite's integrity
    /// check found damage in it.
    #[error(
        "the agreement store {} is damaged or not an SQLite database ({detail}). It holds the \
         agreements consumers were granted: restore it from a backup, and start again (the \
         connector does not replace it with an empty one)",
        path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    /// A read or write failed.
    #[error("{}: {error}", path.display())]
    Database {
        path: PathBuf,
        error: rusqlite::Error,
    },
    /// No random agreement id could be made.
    #[error("the system random source failed")]
    Random,
}

impl AgreementStoreError {
    /// Whether a write failed for want of space (SQLite rolled it back).
    pub fn is_disk_full(&self) -> bool {
        match self {
            AgreementStoreError::Database { error, .. }
            | AgreementStoreError::Open { cause: error, .. } => {
                error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            _ => false,
        }
    }
}

/// The agreement store.
pub struct Agreements {
    db: Mutex<Connection>,
    path: PathBuf,
    /// Held from the look-up to the insert of a request, so that two
    /// identical concurrent requests make one agreement.
    requesting: Mutex<()>,
    /// Every approval, rejection and revocation, for those who act on them
    /// (a DSP negotiation waiting for a manual approval).
    changes: tokio::sync::broadcast::Sender<Agreement>,
}

/// What an access token gives: the agreement a query may rest on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub agreement_id: String,
    /// The transfer process that issued it.
    pub transfer_id: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agreements (
    id TEXT PRIMARY KEY,
    offer_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    organization TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    purpose TEXT NOT NULL,
    state TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    decided_at_ms INTEGER,
    decided_by TEXT,
    expires_at_ms INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS agreements_by_org ON agreements (organization, state);
CREATE TABLE IF NOT EXISTS token_bound (agreement_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS access_tokens (
    token_sha256 TEXT PRIMARY KEY,
    agreement_id TEXT NOT NULL,
    transfer_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS access_tokens_by_transfer ON access_tokens (transfer_id);
CREATE INDEX IF NOT EXISTS access_tokens_by_agreement ON access_tokens (agreement_id);
";

impl Agreements {
    /// Opens (or creates) the store at `path`, after SQLite's integrity
    /// check (`quick_check`): a damaged store is refused, never replaced.
    pub fn open(path: &Path) -> Result<Self, AgreementStoreError> {
        let open = || -> rusqlite::Result<(Connection, Vec<String>)> {
            let db = Connection::open(path)?;
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "FULL")?;
            db.busy_timeout(Duration::from_secs(10))?;
            let findings = db
                .prepare("PRAGMA quick_check(5)")?
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if findings != ["ok"] {
                return Ok((db, findings));
            }
            db.execute_batch(SCHEMA)?;
            Ok((db, Vec::new()))
        };
        let damaged = |detail: String| AgreementStoreError::Damaged {
            path: path.to_path_buf(),
            detail,
        };
        let db = match open() {
            Ok((db, findings)) if findings.is_empty() => db,
            Ok((_, findings)) => {
                return Err(damaged(format!(
                    "SQLite's integrity check reports {}",
                    findings.join("; ")
                )));
            }
            Err(cause) => match cause.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                    return Err(damaged(cause.to_string()));
                }
                _ => {
                    return Err(AgreementStoreError::Open {
                        path: path.to_path_buf(),
                        cause,
                    });
                }
            },
        };
        Ok(Self {
            db: Mutex::new(db),
            path: path.to_path_buf(),
            requesting: Mutex::new(()),
            changes: tokio::sync::broadcast::channel(256).0,
        })
    }

    /// Approvals, rejections and revocations from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Agreement> {
        self.changes.subscribe()
    }

    /// A new token-bound agreement for `offer` (a DSP negotiation's): never
    /// an existing one, since each negotiation ends in its own agreement.
    pub fn request_token_bound(
        &self,
        offer: &Offer,
        organization: &str,
        principal: &str,
        purpose: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        let agreement = self.new_agreement(offer, organization, principal, purpose, now)?;
        let mut db = self.lock();
        let tx = db.transaction().map_err(|e| self.store_error(e))?;
        insert_row(&tx, &agreement).map_err(|e| self.store_error(e))?;
        tx.execute(
            "INSERT INTO token_bound VALUES (?1)",
            [agreement.id.as_str()],
        )
        .map_err(|e| self.store_error(e))?;
        tx.commit().map_err(|e| self.store_error(e))?;
        Ok(agreement)
    }

    /// Whether agreement `id` can only be used with an access token.
    pub fn is_token_bound(&self, id: &str) -> Result<bool, AgreementStoreError> {
        self.lock()
            .query_row(
                "SELECT count(*) FROM token_bound WHERE agreement_id = ?1",
                [id],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.store_error(e))
    }

    /// A new access token for a transfer under agreement `agreement_id`,
    /// usable by `principal` until `expires_at`. Only its hash is stored.
    pub fn issue_token(
        &self,
        agreement_id: &str,
        transfer_id: &str,
        principal: &str,
        expires_at: SystemTime,
    ) -> Result<String, AgreementStoreError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| AgreementStoreError::Random)?;
        let token = format!(
            "sluice-at-{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
        );
        self.lock()
            .execute(
                "INSERT INTO access_tokens VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                params![
                    token_hash(&token),
                    agreement_id,
                    transfer_id,
                    principal,
                    ms(expires_at)
                ],
            )
            .map_err(|e| self.store_error(e))?;
        Ok(token)
    }

    /// Revokes one token (a start that lost a race keeps none alive).
    pub fn revoke_token(&self, token: &str) -> Result<(), AgreementStoreError> {
        self.lock()
            .execute(
                "UPDATE access_tokens SET revoked = 1 WHERE token_sha256 = ?1",
                [token_hash(token)],
            )
            .map(drop)
            .map_err(|e| self.store_error(e))
    }

    /// Revokes every token a transfer issued (it was suspended, completed
    /// or terminated).
    pub fn revoke_tokens(&self, transfer_id: &str) -> Result<(), AgreementStoreError> {
        self.lock()
            .execute(
                "UPDATE access_tokens SET revoked = 1 WHERE transfer_id = ?1",
                [transfer_id],
            )
            .map(drop)
            .map_err(|e| self.store_error(e))
    }

    /// What `token` gives `principal` now: nothing if it is unknown,
    /// revoked, expired or another principal's (one answer for all four, so
    /// a holder of someone else's token learns nothing from it).
    pub fn redeem_token(
        &self,
        token: &str,
        principal: &str,
        now: SystemTime,
    ) -> Result<Option<TokenGrant>, AgreementStoreError> {
        self.lock()
            .query_row(
                "SELECT agreement_id, transfer_id FROM access_tokens
                 WHERE token_sha256 = ?1 AND principal = ?2 AND revoked = 0 AND expires_at_ms > ?3",
                params![token_hash(token), principal, ms(now)],
                |row| {
                    Ok(TokenGrant {
                        agreement_id: row.get(0)?,
                        transfer_id: row.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.store_error(e))
    }

    /// Whether a token-bound agreement has a live token (one not revoked,
    /// not expired) of `principal`.
    fn has_live_token(
        &self,
        agreement_id: &str,
        principal: &str,
        now: SystemTime,
    ) -> Result<bool, AgreementStoreError> {
        self.lock()
            .query_row(
                "SELECT count(*) FROM access_tokens
                 WHERE agreement_id = ?1 AND principal = ?2 AND revoked = 0 AND expires_at_ms > ?3",
                params![agreement_id, principal, ms(now)],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.store_error(e))
    }

    /// Requests an agreement for `offer` on behalf of `organization`.
    /// Automatic offers are active at once; an identical pending or active
    /// request is returned instead of a new one.
    pub fn request(
        &self,
        offer: &Offer,
        organization: &str,
        principal: &str,
        purpose: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        requestable(offer, purpose)?;
        let _one_at_a_time = self.requesting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = self
            .list(Some(organization), Some(&offer.id), now)?
            .into_iter()
            .find(|a| {
                a.purpose == purpose
                    && matches!(a.state, AgreementState::Pending | AgreementState::Active)
                    // A DSP negotiation's agreement is its negotiator's alone.
                    && !self.is_token_bound(&a.id).unwrap_or(true)
            })
        {
            return Ok(existing);
        }
        let agreement = self.new_agreement(offer, organization, principal, purpose, now)?;
        self.insert(&agreement)?;
        Ok(agreement)
    }

    /// A requested agreement, active at once for an automatic offer.
    fn new_agreement(
        &self,
        offer: &Offer,
        organization: &str,
        principal: &str,
        purpose: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        requestable(offer, purpose)?;
        let mut agreement = Agreement {
            id: new_id()?,
            offer_id: offer.id.clone(),
            dataset: offer.dataset.clone(),
            organization: organization.to_string(),
            requested_by: principal.to_string(),
            purpose: purpose.to_string(),
            state: AgreementState::Pending,
            requested_at: now,
            decided_at: None,
            decided_by: None,
            expires_at: None,
            reason: None,
        };
        if offer
            .agreement
            .as_ref()
            .is_some_and(|terms| terms.approval == ApprovalMode::Automatic)
        {
            activate(&mut agreement, offer, "policy", now);
        }
        Ok(agreement)
    }

    /// Approves a pending agreement; `offer` gives its duration.
    pub fn approve(
        &self,
        id: &str,
        offer: &Offer,
        admin: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        self.transition(id, AgreementState::Pending, "approve", now, |a| {
            activate(a, offer, admin, now);
            a.reason = non_empty(reason);
        })
    }

    /// Rejects a pending agreement.
    pub fn reject(
        &self,
        id: &str,
        admin: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        self.end(id, AgreementState::Rejected, admin, reason, now)
    }

    /// Revokes an active agreement: later queries and tickets already issued
    /// under it are refused.
    pub fn revoke(
        &self,
        id: &str,
        admin: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        self.end(id, AgreementState::Revoked, admin, reason, now)
    }

    /// Rejects (a pending) or revokes (an active) agreement.
    fn end(
        &self,
        id: &str,
        to: AgreementState,
        admin: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<Agreement, AgreementError> {
        let (from, verb) = match to {
            AgreementState::Rejected => (AgreementState::Pending, "reject"),
            _ => (AgreementState::Active, "revoke"),
        };
        self.transition(id, from, verb, now, |a| {
            a.state = to;
            a.decided_at = Some(now);
            a.decided_by = Some(admin.to_string());
            a.reason = non_empty(reason);
        })
    }

    pub fn get(&self, id: &str, now: SystemTime) -> Result<Option<Agreement>, AgreementStoreError> {
        let db = self.lock();
        let found = db
            .query_row("SELECT * FROM agreements WHERE id = ?1", [id], read_row)
            .optional()
            .map_err(|e| self.store_error(e))?;
        Ok(found.map(|a| as_of(a, now)))
    }

    /// Agreements, newest first, of one organization (or all) and one offer
    /// (or all).
    pub fn list(
        &self,
        organization: Option<&str>,
        offer: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<Agreement>, AgreementStoreError> {
        let db = self.lock();
        let mut statement = db
            .prepare_cached(
                "SELECT * FROM agreements
                 WHERE (?1 IS NULL OR organization = ?1) AND (?2 IS NULL OR offer_id = ?2)
                 ORDER BY requested_at_ms DESC, id",
            )
            .map_err(|e| self.store_error(e))?;
        let rows = statement
            .query_map(params![organization, offer], read_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.store_error(e))?;
        Ok(rows.into_iter().map(|a| as_of(a, now)).collect())
    }

    /// The agreements a query of `organization` can run under, by offer.
    /// Where several are active for one offer, the one for `purpose` wins,
    /// else the newest. Token-bound agreements count only if `unlocked`
    /// names them (the query presented one of their tokens).
    pub fn active(
        &self,
        organization: &str,
        purpose: Option<&str>,
        now: SystemTime,
        unlocked: Option<&str>,
    ) -> Result<BTreeMap<String, ActiveAgreement>, AgreementStoreError> {
        let mut out: BTreeMap<String, ActiveAgreement> = BTreeMap::new();
        for agreement in self.list(Some(organization), None, now)? {
            if agreement.state != AgreementState::Active {
                continue;
            }
            if unlocked != Some(agreement.id.as_str()) && self.is_token_bound(&agreement.id)? {
                continue;
            }
            let better = match out.get(&agreement.offer_id) {
                None => true,
                Some(held) => {
                    purpose == Some(agreement.purpose.as_str()) && purpose != Some(&held.purpose)
                }
            };
            if better {
                out.insert(
                    agreement.offer_id.clone(),
                    ActiveAgreement {
                        id: agreement.id,
                        purpose: agreement.purpose,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Whether agreement `id` is in force now (DoGet re-checks tickets).
    pub fn is_active(&self, id: &str, now: SystemTime) -> Result<bool, AgreementStoreError> {
        Ok(self
            .get(id, now)?
            .is_some_and(|a| a.state == AgreementState::Active))
    }

    /// Whether `principal` may still use agreement `id`: it is active and,
    /// if token-bound, one of its transfers' tokens of `principal` is still
    /// live (suspending, completing or terminating the transfer ends it).
    pub fn is_usable(
        &self,
        id: &str,
        principal: &str,
        now: SystemTime,
    ) -> Result<bool, AgreementStoreError> {
        Ok(self.is_active(id, now)?
            && (!self.is_token_bound(id)? || self.has_live_token(id, principal, now)?))
    }

    fn transition(
        &self,
        id: &str,
        from: AgreementState,
        verb: &str,
        now: SystemTime,
        change: impl FnOnce(&mut Agreement),
    ) -> Result<Agreement, AgreementError> {
        let mut agreement = self
            .get(id, now)?
            .ok_or_else(|| AgreementError::NotFound(format!("no agreement `{id}`")))?;
        if agreement.state != from {
            return Err(AgreementError::WrongState(format!(
                "cannot {verb} agreement `{id}`: it is {}, and only a {from} one can be",
                agreement.state
            )));
        }
        change(&mut agreement);
        let db = self.lock();
        let changed = db
            .execute(
                "UPDATE agreements SET state = ?2, decided_at_ms = ?3, decided_by = ?4,
                 expires_at_ms = ?5, reason = ?6 WHERE id = ?1 AND state = ?7",
                params![
                    agreement.id,
                    agreement.state.as_str(),
                    agreement.decided_at.map(ms),
                    agreement.decided_by,
                    agreement.expires_at.map(ms),
                    agreement.reason,
                    from.as_str(),
                ],
            )
            .map_err(|e| self.store_error(e))?;
        if changed == 0 {
            return Err(AgreementError::WrongState(format!(
                "cannot {verb} agreement `{id}`: it changed concurrently; read it again"
            )));
        }
        drop(db);
        // Nobody listening is fine: the change is stored either way.
        let _ = self.changes.send(agreement.clone());
        Ok(agreement)
    }

    fn insert(&self, a: &Agreement) -> Result<(), AgreementError> {
        insert_row(&self.lock(), a).map_err(|e| self.store_error(e))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store_error(&self, error: rusqlite::Error) -> AgreementStoreError {
        AgreementStoreError::Database {
            path: self.path.clone(),
            error,
        }
    }
}

fn insert_row(db: &Connection, a: &Agreement) -> rusqlite::Result<usize> {
    db.execute(
        "INSERT INTO agreements (id, offer_id, dataset, organization, requested_by, purpose, state,
         requested_at_ms, decided_at_ms, decided_by, expires_at_ms, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            a.id,
            a.offer_id,
            a.dataset,
            a.organization,
            a.requested_by,
            a.purpose,
            a.state.as_str(),
            ms(a.requested_at),
            a.decided_at.map(ms),
            a.decided_by,
            a.expires_at.map(ms),
            a.reason,
        ],
    )
}

/// SHA-256 of a token, lowercase hex: what the store keeps.
fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Whether an agreement may be requested for `offer` with `purpose`.
fn requestable(offer: &Offer, purpose: &str) -> Result<(), AgreementError> {
    if offer.agreement.is_none() {
        return Err(AgreementError::Invalid(format!(
            "offer `{}` needs no agreement: query dataset `{}` directly",
            offer.id, offer.dataset
        )));
    }
    check_purpose(offer, purpose)
}

fn check_purpose(offer: &Offer, purpose: &str) -> Result<(), AgreementError> {
    if purpose.trim().is_empty() {
        return Err(AgreementError::Invalid(format!(
            "an agreement states its purpose: give one{}",
            match offer.purposes.is_empty() {
                true => String::new(),
                false => format!(" of: {}", offer.purposes.join(", ")),
            }
        )));
    }
    if !offer.purposes.is_empty() && !offer.purposes.iter().any(|p| p == purpose) {
        return Err(AgreementError::Invalid(format!(
            "purpose `{purpose}` is not offered for `{}`; offered: {}",
            offer.id,
            offer.purposes.join(", ")
        )));
    }
    Ok(())
}

/// Makes `a` active from `now`, until the offer's duration or the grant's
/// end, whichever comes first.
fn activate(a: &mut Agreement, offer: &Offer, by: &str, now: SystemTime) {
    a.state = AgreementState::Active;
    a.decided_at = Some(now);
    a.decided_by = Some(by.to_string());
    let by_duration = offer
        .agreement
        .as_ref()
        .and_then(|t| t.valid_for_days)
        .map(|days| now + Duration::from_secs(u64::from(days) * 86_400));
    let by_grant = offer.valid_until.map(SystemTime::from);
    a.expires_at = match (by_duration, by_grant) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
}

/// The state as of `now`: an active agreement past its expiry is expired.
fn as_of(mut a: Agreement, now: SystemTime) -> Agreement {
    if a.state == AgreementState::Active && a.expires_at.is_some_and(|at| at <= now) {
        a.state = AgreementState::Expired;
    }
    a
}

fn read_row(row: &Row<'_>) -> rusqlite::Result<Agreement> {
    let state: String = row.get("state")?;
    Ok(Agreement {
        id: row.get("id")?,
        offer_id: row.get("offer_id")?,
        dataset: row.get("dataset")?,
        organization: row.get("organization")?,
        requested_by: row.get("requested_by")?,
        purpose: row.get("purpose")?,
        state: AgreementState::parse(&state).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(
                6,
                format!("state `{state}`"),
                rusqlite::types::Type::Text,
            )
        })?,
        requested_at: from_ms(row.get("requested_at_ms")?),
        decided_at: row.get::<_, Option<i64>>("decided_at_ms")?.map(from_ms),
        decided_by: row.get("decided_by")?,
        expires_at: row.get::<_, Option<i64>>("expires_at_ms")?.map(from_ms),
        reason: row.get("reason")?,
    })
}

fn new_id() -> Result<String, AgreementStoreError> {
    let mut bytes = [0u8; 8];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AgreementStoreError::Random)?;
    Ok(format!("agr-{}", hex::encode(bytes)))
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.trim().to_string())
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::compile::AgreementTerms;
    use sluice_policy::offers::OfferMode;

    fn offer(approval: ApprovalMode, days: Option<u32>) -> Offer {
        Offer {
            id: "trips/research".into(),
            dataset: "trips".into(),
            consumer: "research".into(),
            mode: OfferMode::Dp,
            purposes: vec!["mobility-research".into()],
            min_group_size: None,
            max_rows: None,
            dp: None,
            valid_from: None,
            valid_until: None,
            agreement: Some(AgreementTerms {
                offer: "trips/research".into(),
                approval,
                valid_for_days: days,
            }),
            quotas: None,
        }
    }

    fn store() -> (tempfile::TempDir, Agreements) {
        let dir = tempfile::tempdir().unwrap();
        let store = Agreements::open(&dir.path().join("agreements.sqlite")).unwrap();
        (dir, store)
    }

    #[test]
    fn automatic_offers_are_active_at_once_and_expire() {
        let (_dir, store) = store();
        let now = SystemTime::now();
        let offer = offer(ApprovalMode::Automatic, Some(30));
        let a = store
            .request(&offer, "Org", "spiffe://x", "mobility-research", now)
            .unwrap();
        assert_eq!(a.state, AgreementState::Active);
        assert_eq!(a.decided_by.as_deref(), Some("policy"));
        let active = store.active("Org", None, now, None).unwrap();
        assert_eq!(active["trips/research"].id, a.id);
        // Asking again returns the same agreement.
        let again = store
            .request(&offer, "Org", "spiffe://y", "mobility-research", now)
            .unwrap();
        assert_eq!(again.id, a.id);
        let later = now + Duration::from_secs(31 * 86_400);
        assert_eq!(
            store.get(&a.id, later).unwrap().unwrap().state,
            AgreementState::Expired
        );
        assert!(store.active("Org", None, later, None).unwrap().is_empty());
        assert!(store.active("Other", None, now, None).unwrap().is_empty());
    }

    #[test]
    fn a_token_bound_agreement_counts_only_with_a_live_token_of_its_principal() {
        let (_dir, store) = store();
        let now = SystemTime::now();
        let offer = offer(ApprovalMode::Automatic, None);
        let a = store
            .request_token_bound(&offer, "Org", "p", "mobility-research", now)
            .unwrap();
        let again = store
            .request_token_bound(&offer, "Org", "p", "mobility-research", now)
            .unwrap();
        assert_ne!(a.id, again.id, "each negotiation has its own agreement");
        assert!(store.is_token_bound(&a.id).unwrap());
        assert!(store.active("Org", None, now, None).unwrap().is_empty());
        assert!(!store.is_usable(&a.id, "p", now).unwrap());

        let expires = now + Duration::from_secs(60);
        let token = store.issue_token(&a.id, "tp-1", "p", expires).unwrap();
        let grant = store.redeem_token(&token, "p", now).unwrap().unwrap();
        assert_eq!(grant.agreement_id, a.id);
        let active = store.active("Org", None, now, Some(&a.id)).unwrap();
        assert_eq!(active.values().next().unwrap().id, a.id);
        assert!(store.is_usable(&a.id, "p", now).unwrap());
        // Another principal, a later time, a changed token: nothing.
        assert_eq!(store.redeem_token(&token, "q", now).unwrap(), None);
        assert_eq!(store.redeem_token(&token, "p", expires).unwrap(), None);
        assert_eq!(
            store.redeem_token(&format!("{token}x"), "p", now).unwrap(),
            None
        );
        assert!(!store.is_usable(&a.id, "q", now).unwrap());

        store.revoke_tokens("tp-1").unwrap();
        assert_eq!(store.redeem_token(&token, "p", now).unwrap(), None);
        assert!(!store.is_usable(&a.id, "p", now).unwrap());
        // The hash is kept, never the token.
        let kept: String = store
            .lock()
            .query_row("SELECT token_sha256 FROM access_tokens", [], |r| r.get(0))
            .unwrap();
        assert!(!kept.contains(&token) && kept.len() == 64);
    }

    #[test]
    fn manual_offers_wait_for_an_admin() {
        let (_dir, store) = store();
        let now = SystemTime::now();
        let offer = offer(ApprovalMode::Manual, None);
        let a = store
            .request(&offer, "Org", "p", "mobility-research", now)
            .unwrap();
        assert_eq!(a.state, AgreementState::Pending);
        assert!(!store.is_active(&a.id, now).unwrap());
        let err = store.revoke(&a.id, "admin", "", now).unwrap_err();
        assert!(matches!(err, AgreementError::WrongState(_)), "{err}");
        let approved = store.approve(&a.id, &offer, "admin", "ok", now).unwrap();
        assert_eq!(approved.state, AgreementState::Active);
        assert_eq!(approved.expires_at, None);
        assert!(store.is_active(&a.id, now).unwrap());
        let revoked = store.revoke(&a.id, "admin", "misuse", now).unwrap();
        assert_eq!(revoked.state, AgreementState::Revoked);
        assert!(!store.is_active(&a.id, now).unwrap());
        assert_eq!(
            store.get(&a.id, now).unwrap().unwrap().reason.as_deref(),
            Some("misuse")
        );
        let b = store
            .request(&offer, "Org", "p", "mobility-research", now)
            .unwrap();
        assert_ne!(b.id, a.id, "a revoked agreement is not reused");
        assert_eq!(
            store.reject(&b.id, "admin", "no", now).unwrap().state,
            AgreementState::Rejected
        );
    }

    #[test]
    fn purposes_are_checked() {
        let (_dir, store) = store();
        let offer = offer(ApprovalMode::Automatic, None);
        let now = SystemTime::now();
        let err = store
            .request(&offer, "Org", "p", "marketing", now)
            .unwrap_err();
        assert!(err.to_string().contains("not offered"), "{err}");
        let err = store.request(&offer, "Org", "p", " ", now).unwrap_err();
        assert!(err.to_string().contains("purpose"), "{err}");
        let mut open = offer.clone();
        open.agreement = None;
        let err = store
            .request(&open, "Org", "p", "mobility-research", now)
            .unwrap_err();
        assert!(err.to_string().contains("needs no agreement"), "{err}");
    }

    #[test]
    fn agreements_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agreements.sqlite");
        let now = SystemTime::now();
        let id = {
            let store = Agreements::open(&path).unwrap();
            store
                .request(
                    &offer(ApprovalMode::Automatic, None),
                    "Org",
                    "p",
                    "mobility-research",
                    now,
                )
                .unwrap()
                .id
        };
        let store = Agreements::open(&path).unwrap();
        assert!(store.is_active(&id, now).unwrap());
    }
}
