//! Step 5: the ticket that links GetFlightInfo to DoGet.
//!
//! A ticket is a signed claim, not the query: it names an approved plan held
//! by this connector, the principal it was issued to, the plan's hash, the
//! policy version and an expiry, under an HMAC-SHA256 tag. DoGet verifies the
//! tag, the expiry and the principal before it looks the plan up, and then
//! runs exactly that plan: SQL is never re-planned from a ticket, so a stolen
//! or replayed ticket is useless to anyone else and after expiry.
//!
//! The signing key is generated at start-up and never leaves memory; tickets
//! do not survive a restart (neither do the plans they name).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use datafusion::arrow::datatypes::SchemaRef;
use prost::Message;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use sluice_policy::{Approval, Principal};

use super::QueryError;
use crate::config::TenantCaps;

/// Signed content of a ticket.
#[derive(Clone, PartialEq, Message)]
pub struct Claims {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub query_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub principal_id: String,
    /// Unix milliseconds.
    #[prost(int64, tag = "4")]
    pub expires_at_ms: i64,
    /// SHA-256 of the approved plan.
    #[prost(bytes = "vec", tag = "5")]
    pub plan_hash: Vec<u8>,
    #[prost(string, tag = "6")]
    pub policy_version: String,
    /// The privacy-budget reservation this ticket spends (empty when none).
    #[prost(string, tag = "7")]
    pub reservation: String,
}

#[derive(Clone, PartialEq, Message)]
struct SignedTicket {
    #[prost(bytes = "vec", tag = "1")]
    claims: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    tag: Vec<u8>,
}

const CLAIMS_VERSION: u32 = 1;

/// Signs and verifies tickets.
pub struct TicketSigner {
    key: hmac::Key,
}

impl TicketSigner {
    /// A signer with a fresh random key.
    pub fn generate() -> Self {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .expect("the system random source is available");
        Self { key }
    }

    pub fn sign(&self, claims: &Claims) -> Vec<u8> {
        let claims = claims.encode_to_vec();
        let tag = hmac::sign(&self.key, &claims).as_ref().to_vec();
        SignedTicket { claims, tag }.encode_to_vec()
    }

    /// Checks the tag, the expiry and the holder, in that order.
    pub fn verify(
        &self,
        ticket: &[u8],
        holder: &Principal,
        now: SystemTime,
    ) -> Result<Claims, QueryError> {
        let reject = |why: &str| QueryError::TicketRejected(format!("ticket rejected: {why}"));
        let signed =
            SignedTicket::decode(ticket).map_err(|_| reject("it is not a Sluice ticket"))?;
        hmac::verify(&self.key, &signed.claims, &signed.tag)
            .map_err(|_| reject("its signature does not match (altered, or issued by another connector or before a restart)"))?;
        let claims =
            Claims::decode(signed.claims.as_slice()).map_err(|_| reject("malformed claims"))?;
        if claims.version != CLAIMS_VERSION {
            return Err(reject("unsupported ticket version"));
        }
        if unix_ms(now) >= claims.expires_at_ms {
            return Err(reject("it has expired; call GetFlightInfo again"));
        }
        if claims.principal_id != holder_id(holder) {
            return Err(reject("it was issued to a different principal"));
        }
        Ok(claims)
    }
}

/// An approved plan waiting for its DoGet. It owns what the query holds
/// (see `holds.rs`): dropping it unredeemed (expired, evicted, refused,
/// withdrawn) gives that back.
pub struct PendingQuery {
    pub principal_id: String,
    /// The organization it counts against (the budget and quota key).
    pub organization: String,
    pub approval: Approval,
    /// The schema advertised in FlightInfo; DoGet streams exactly this.
    pub schema: SchemaRef,
    pub plan_hash: Vec<u8>,
    pub expires_at: SystemTime,
    /// The same expiry on the monotonic clock: a wall clock stepped back
    /// (NTP, an operator) must not let a ticket live longer than its TTL.
    pub deadline: Instant,
    /// One of the day's queries and, for a DP query, its privacy budget.
    pub holds: super::holds::Holds,
}

/// Approved plans by query id. Each is redeemed at most once and dropped at
/// expiry, so the map stays bounded by the ticket rate × TTL and by caps
/// per principal, per organization and in all: one tenant filling its own
/// share leaves the others theirs.
pub struct PendingQueries {
    inner: Mutex<HashMap<[u8; 16], PendingQuery>>,
    caps: TenantCaps,
}

/// The refusal when a cap of `caps` is reached.
pub fn check_caps(caps: &TenantCaps, held: (usize, usize, usize)) -> Result<(), QueryError> {
    match caps.reached(held) {
        None => Ok(()),
        Some((n, whose, setting)) => Err(QueryError::ResourcesExhausted(format!(
            "{n} {} are held {whose}, the most allowed (limits.{setting}); use or close some, or let them expire, first",
            caps.what
        ))),
    }
}

impl PendingQueries {
    pub fn new(caps: TenantCaps) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            caps,
        }
    }

    /// Stores an approved plan under a fresh random id, unless its principal,
    /// its organization or everyone together hold as many as allowed.
    pub fn insert(&self, pending: PendingQuery, now: SystemTime) -> Result<[u8; 16], QueryError> {
        let mut id = [0u8; 16];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| QueryError::Internal("the system random source failed".into()))?;
        let expired;
        let inserted = {
            let mut map = self.lock();
            expired = take_expired(&mut map, now);
            let held = held(&map, &pending.organization, &pending.principal_id);
            match check_caps(&self.caps, held) {
                Ok(()) => {
                    map.insert(id, pending);
                    Ok(id)
                }
                // Dropped outside the lock, below: it returns its budget.
                Err(e) => Err((e, pending)),
            }
        };
        drop(expired);
        inserted.map_err(|(e, _refused)| e)
    }

    /// Refuses early (before a quota or budget is charged) if `principal`
    /// could not hold one more ticket now.
    pub fn check_room(&self, principal: &Principal) -> Result<(), QueryError> {
        let expired;
        let checked = {
            let mut map = self.lock();
            expired = take_expired(&mut map, SystemTime::now());
            let organization = crate::audit::organization_key(principal);
            check_caps(&self.caps, held(&map, &organization, &holder_id(principal)))
        };
        drop(expired);
        checked
    }

    /// Takes the plan a verified ticket names. The claims were verified, so
    /// a missing entry means it was already redeemed or the connector
    /// restarted.
    pub fn redeem(&self, claims: &Claims) -> Result<PendingQuery, QueryError> {
        let id: [u8; 16] = claims.query_id.as_slice().try_into().map_err(|_| {
            QueryError::TicketRejected("ticket rejected: malformed query id".into())
        })?;
        let pending = self
            .lock()
            .remove(&id)
            .ok_or_else(|| {
                QueryError::NotFound(
                    "the ticket was already redeemed (tickets are single-use); call GetFlightInfo again".into(),
                )
            })?;
        if pending.plan_hash != claims.plan_hash || pending.principal_id != claims.principal_id {
            return Err(QueryError::TicketRejected(
                "ticket rejected: it does not match the approved plan".into(),
            ));
        }
        // The claims' expiry was checked on the wall clock; the TTL must
        // also have not passed in real time (dropped, it returns its holds).
        if pending.deadline <= Instant::now() {
            return Err(QueryError::TicketRejected(
                "ticket rejected: it has expired; call GetFlightInfo again".into(),
            ));
        }
        Ok(pending)
    }

    /// Withdraws a ticket before it was handed out (its decision could not
    /// be recorded). `query_id` is the hex id.
    pub fn cancel(&self, query_id: &str) -> Option<PendingQuery> {
        let mut map = self.lock();
        let id = *map
            .keys()
            .find(|id| hex::encode(id.as_slice()) == query_id)?;
        map.remove(&id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired entries (outside the lock: each returns its budget).
    pub fn purge_expired(&self, now: SystemTime) {
        let expired = take_expired(&mut self.lock(), now);
        drop(expired);
    }

    /// Drops every entry (outside the lock: each returns its holds).
    pub fn withdraw_all(&self) {
        let all: Vec<PendingQuery> = self.lock().drain().map(|(_, p)| p).collect();
        drop(all);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], PendingQuery>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tickets held in all, by `organization` and by the principal `holder`.
fn held(
    map: &HashMap<[u8; 16], PendingQuery>,
    organization: &str,
    holder: &str,
) -> (usize, usize, usize) {
    let (mut by_organization, mut by_principal) = (0, 0);
    for pending in map.values() {
        by_organization += usize::from(pending.organization == organization);
        by_principal += usize::from(pending.principal_id == holder);
    }
    (map.len(), by_organization, by_principal)
}

/// Removes and returns the entries expired on either clock, for the
/// caller to drop once it has let go of the lock.
fn take_expired(map: &mut HashMap<[u8; 16], PendingQuery>, now: SystemTime) -> Vec<PendingQuery> {
    let real_now = Instant::now();
    let ids: Vec<[u8; 16]> = map
        .iter()
        .filter(|(_, p)| p.expires_at <= now || p.deadline <= real_now)
        .map(|(id, _)| *id)
        .collect();
    ids.iter().filter_map(|id| map.remove(id)).collect()
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// Whom a ticket is bound to: the principal, and for a relayed query also
/// the broker that relayed it, so that only the same broker can redeem it
/// for the same consumer.
pub fn holder_id(principal: &sluice_policy::Principal) -> String {
    match &principal.via {
        None => principal.id.clone(),
        // Length-prefixed, so that no direct principal id can spell it.
        Some(broker) => format!(
            "relayed:{}:{}:{}",
            principal.id.len(),
            principal.id,
            broker.id
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires_at_ms: i64) -> Claims {
        Claims {
            version: CLAIMS_VERSION,
            query_id: vec![7; 16],
            principal_id: "spiffe://a/org/x".into(),
            expires_at_ms,
            plan_hash: vec![1; 32],
            policy_version: "none".into(),
            reservation: String::new(),
        }
    }

    #[test]
    fn verifies_its_own_tickets() {
        let signer = TicketSigner::generate();
        let now = SystemTime::now();
        let c = claims(unix_ms(now) + 60_000);
        let t = signer.sign(&c);
        assert_eq!(
            signer
                .verify(&t, &Principal::new("spiffe://a/org/x"), now)
                .unwrap(),
            c
        );
    }

    #[test]
    fn refuses_altered_expired_foreign_tickets() {
        let signer = TicketSigner::generate();
        let now = SystemTime::now();
        let owner = Principal::new("spiffe://a/org/x");
        let t = signer.sign(&claims(unix_ms(now) + 60_000));

        for i in 0..t.len() {
            let mut altered = t.clone();
            altered[i] ^= 0x01;
            assert!(
                signer.verify(&altered, &owner, now).is_err(),
                "byte {i} flipped"
            );
        }
        let e = signer
            .verify(&t, &Principal::new("spiffe://b/org/y"), now)
            .unwrap_err();
        assert!(e.to_string().contains("different principal"), "{e}");

        let expired = signer.sign(&claims(unix_ms(now) - 1));
        let e = signer.verify(&expired, &owner, now).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");

        let other = TicketSigner::generate();
        assert!(
            other.verify(&t, &owner, now).is_err(),
            "another key's ticket"
        );
    }
}
