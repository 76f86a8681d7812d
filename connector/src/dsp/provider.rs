//! The provider side of DSP 2025-1 over HTTPS: the catalog, contract
//! negotiation and the transfer process, each a route of [`router`].
//!
//! ```text
//! negotiation  REQUESTED ─(automatic offer, or an admin approves)─▶ AGREED ─verification─▶ VERIFIED ─▶ FINALIZED
//!                  └─(admin rejects, consumer terminates, callback fails)──────────────────────────▶ TERMINATED
//! transfer     REQUESTED ─▶ STARTED (token issued) ◀─start── SUSPENDED
//!                              ├─suspension─▶ SUSPENDED   (token revoked)
//!                              ├─completion─▶ COMPLETED   (token revoked)
//!                              └─termination─▶ TERMINATED (token revoked)
//! ```
//!
//! A negotiation ends in an agreement of the existing store, token-bound:
//! a query rests on it only with the token of one of its started
//! transfers. Messages to the consumer go to its callback address, which
//! must present a certificate of the principal that negotiated.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sluice_policy::Principal;
use sluice_policy::offers::Offer;

use super::auth::Authenticate;
use super::https::{Outbound, Peer};
use super::odrl::{self, Endpoints};
use super::store::{DspStore, Negotiation, Transfer, new_pid};
use super::wire::{CONTEXT, Message};
use crate::agreements::{Agreement, AgreementState};
use crate::query::QueryEngine;

/// Where the DSP endpoints are, under the connector's public URL.
pub const BASE_PATH: &str = "/dsp/2025-1";

/// Attempts to deliver one message to a consumer's callback.
const DELIVERY_ATTEMPTS: u32 = 3;

/// The provider: its stores, its way out and its addresses.
pub struct Provider {
    engine: Arc<QueryEngine>,
    store: DspStore,
    outbound: Outbound,
    authenticate: Arc<dyn Authenticate>,
    /// The DSP base URL, `https://HOST:PORT/dsp/2025-1`.
    dsp_url: String,
    /// `grpc+tls://HOST:PORT`.
    flight_sql: String,
    participant: String,
    token_ttl: Duration,
    /// Messages to callbacks in flight at once, all consumers together.
    deliveries: tokio::sync::Semaphore,
    /// … and per consumer.
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Held from a new process's cap check to its insert, so that
    /// concurrent requests cannot all pass the check.
    opening: tokio::sync::Mutex<()>,
}

/// One consumer's share of the messages in flight; given back on drop.
struct InFlight {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    principal: String,
}

impl InFlight {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        principal: &str,
    ) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(principal.to_string()).or_default();
        if *n >= MAX_DELIVERIES_PER_PRINCIPAL {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            principal: principal.to_string(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.principal);
            }
        }
    }
}

/// Messages in flight to callbacks at once: a consumer whose callback
/// hangs holds at most its own processes' worth (see the caps below).
const MAX_DELIVERIES: usize = 64;
const MAX_DELIVERIES_PER_PRINCIPAL: usize = 4;
/// How long a message waits for a slot before it counts as undelivered.
const DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// Every open process is reconciled with its agreement this often (an
/// agreement's expiry is not an event).
const RECONCILE_EVERY: Duration = Duration::from_secs(300);

/// Negotiations and transfers one principal may have open at once.
const MAX_OPEN_PER_PRINCIPAL: usize = 16;
/// Longest process id and callback address accepted.
const MAX_PID_CHARS: usize = 256;
const MAX_CALLBACK_CHARS: usize = 2048;

/// How a provider is set up.
pub struct ProviderSettings {
    pub dsp_url: String,
    pub flight_sql: String,
    pub participant: String,
    pub token_ttl: Duration,
}

impl Provider {
    pub fn new(
        engine: Arc<QueryEngine>,
        store: DspStore,
        outbound: Outbound,
        authenticate: Arc<dyn Authenticate>,
        settings: ProviderSettings,
    ) -> Self {
        Self {
            engine,
            store,
            outbound,
            authenticate,
            dsp_url: settings.dsp_url,
            flight_sql: settings.flight_sql,
            participant: settings.participant,
            token_ttl: settings.token_ttl,
            deliveries: tokio::sync::Semaphore::new(MAX_DELIVERIES),
            in_flight: Default::default(),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    fn endpoints(&self) -> Endpoints<'_> {
        Endpoints {
            dsp: &self.dsp_url,
            flight_sql: &self.flight_sql,
            participant: &self.participant,
        }
    }

    /// Follows the agreement store: an approval moves a waiting
    /// negotiation on, a rejection ends it, a revocation ends its
    /// transfers. Runs until the connector stops.
    pub async fn follow_agreements(
        self: Arc<Self>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut changes = self.engine.agreements().subscribe();
        // Changes made while the connector was down.
        self.clone().reconcile();
        let mut every = tokio::time::interval(RECONCILE_EVERY);
        every.tick().await;
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = every.tick() => {
                    self.clone().reconcile();
                    continue;
                }
                _ = stopped.wait_for(|s| *s) => return,
            };
            match change {
                // Each on its own task: a slow callback holds up nobody else's.
                Ok(agreement) => {
                    tokio::spawn(self.clone().agreement_changed(agreement));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "DSP: agreement changes were missed; reconciling"
                    );
                    self.clone().reconcile();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Brings every open negotiation and transfer in line with its
    /// agreement, as if each agreement's last change had just happened.
    fn reconcile(self: Arc<Self>) {
        let agreements = self.engine.agreements();
        let now = SystemTime::now();
        let mut seen = std::collections::BTreeSet::new();
        let negotiations = self.store.open_negotiations().unwrap_or_default();
        let transfers = self.store.all_open_transfers().unwrap_or_default();
        let ids = negotiations
            .iter()
            .map(|n| n.agreement_id.clone())
            .chain(transfers.iter().map(|t| t.agreement_id.clone()));
        for id in ids {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Ok(Some(agreement)) = agreements.get(&id, now) {
                tokio::spawn(self.clone().agreement_changed(agreement));
            }
        }
    }

    async fn agreement_changed(self: Arc<Self>, agreement: Agreement) {
        let Ok(Some(negotiation)) = self.store.negotiation_of(&agreement.id) else {
            return;
        };
        match agreement.state {
            AgreementState::Active => {
                if self.moved_negotiation(&negotiation, &["REQUESTED"], "AGREED") {
                    self.send_agreement(negotiation).await;
                }
            }
            AgreementState::Rejected | AgreementState::Revoked | AgreementState::Expired => {
                let reason = format!("agreement {} was {}", agreement.id, agreement.state);
                self.end_transfers(&agreement.id, &reason).await;
                if self.moved_negotiation(
                    &negotiation,
                    &["REQUESTED", "AGREED", "VERIFIED"],
                    "TERMINATED",
                ) {
                    self.notify_termination(&negotiation, &reason).await;
                }
            }
            AgreementState::Pending => {}
        }
    }

    fn moved_negotiation(&self, n: &Negotiation, from: &[&str], to: &str) -> bool {
        match self.store.move_negotiation(&n.provider_pid, from, to) {
            Ok(moved) => moved,
            Err(e) => {
                tracing::error!(error = %e, negotiation = %n.provider_pid, "DSP store failed");
                false
            }
        }
    }

    /// POSTs `message` to the consumer's callback `path`, retrying a
    /// little; the callback must present the consumer's certificate.
    async fn deliver(
        &self,
        principal: &str,
        callback: &str,
        path: &[&str],
        message: Value,
    ) -> bool {
        let Some(url) = callback_url(callback, path) else {
            return false;
        };
        // A consumer whose callback hangs fills its own few slots, never
        // everyone's: beyond them its messages fail at once.
        let Some(_own) = InFlight::take(&self.in_flight, principal) else {
            tracing::warn!(
                consumer = principal,
                "DSP: too many messages in flight to this consumer; not delivered"
            );
            return false;
        };
        let Ok(Ok(_permit)) = tokio::time::timeout(DELIVERY_WAIT, self.deliveries.acquire()).await
        else {
            return false;
        };
        let client = match self.outbound.pinned_to(principal) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "DSP: no outbound HTTPS client");
                return false;
            }
        };
        for attempt in 1..=DELIVERY_ATTEMPTS {
            match client.post(url.clone()).json(&message).send().await {
                Ok(response) if response.status().is_success() => return true,
                Ok(response) => {
                    tracing::warn!(%url, status = %response.status(), attempt, "DSP: the consumer's callback refused a message");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, attempt, "DSP: the consumer's callback cannot be reached");
                }
            }
            tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
        }
        false
    }

    /// AGREED: the agreement goes to the consumer; if it cannot, the
    /// negotiation ends and the agreement with it.
    async fn send_agreement(&self, n: Negotiation) {
        let gate = self.engine.policy().current();
        let offer = gate.policy_set().and_then(|p| p.any_offer(&n.offer_id));
        let Some(offer) = offer else {
            return self
                .fail_negotiation(&n, "the offer is no longer in the usage policy")
                .await;
        };
        let agreement = odrl::agreement(
            &n.agreement_id,
            &offer,
            &n.purpose,
            &self.participant,
            &n.principal,
            chrono::Utc::now(),
        );
        let message = json!({
            "@context": [CONTEXT],
            "@type": "ContractAgreementMessage",
            "providerPid": n.provider_pid,
            "consumerPid": n.consumer_pid,
            "agreement": agreement,
        });
        let path = ["negotiations", n.consumer_pid.as_str(), "agreement"];
        if !self
            .deliver(&n.principal, &n.callback, &path, message)
            .await
        {
            self.fail_negotiation(
                &n,
                "the agreement could not be delivered to the callback address",
            )
            .await;
        }
    }

    /// VERIFIED → FINALIZED, then the event goes to the consumer.
    async fn finalize(&self, n: Negotiation) {
        let in_force = self
            .engine
            .agreements()
            .is_active(&n.agreement_id, SystemTime::now())
            .unwrap_or(false);
        if !in_force {
            return self
                .fail_negotiation(&n, "the agreement is no longer active")
                .await;
        }
        if !self.moved_negotiation(&n, &["VERIFIED"], "FINALIZED") {
            return;
        }
        let message = json!({
            "@context": [CONTEXT],
            "@type": "ContractNegotiationEventMessage",
            "providerPid": n.provider_pid,
            "consumerPid": n.consumer_pid,
            "eventType": "FINALIZED",
        });
        let path = ["negotiations", n.consumer_pid.as_str(), "events"];
        if !self
            .deliver(&n.principal, &n.callback, &path, message)
            .await
        {
            tracing::warn!(negotiation = %n.provider_pid, "DSP: the FINALIZED event was not delivered; the agreement stands");
        }
    }

    /// Ends a negotiation this side cannot continue, with its agreement.
    async fn fail_negotiation(&self, n: &Negotiation, reason: &str) {
        tracing::warn!(negotiation = %n.provider_pid, reason, "DSP: negotiation terminated");
        if self.moved_negotiation(
            n,
            &["REQUESTED", "AGREED", "VERIFIED", "FINALIZED"],
            "TERMINATED",
        ) {
            self.end_agreement(n, reason);
            self.notify_termination(n, reason).await;
        }
    }

    async fn notify_termination(&self, n: &Negotiation, reason: &str) {
        let message = json!({
            "@context": [CONTEXT],
            "@type": "ContractNegotiationTerminationMessage",
            "providerPid": n.provider_pid,
            "consumerPid": n.consumer_pid,
            "code": "terminated",
            "reason": [reason],
        });
        let path = ["negotiations", n.consumer_pid.as_str(), "termination"];
        self.deliver(&n.principal, &n.callback, &path, message)
            .await;
    }

    /// Rejects (pending) or revokes (active) the negotiation's agreement,
    /// on the record.
    fn end_agreement(&self, n: &Negotiation, reason: &str) {
        let store = self.engine.agreements();
        let now = SystemTime::now();
        let by = format!("dsp:{}", n.principal);
        let ended = match store.get(&n.agreement_id, now) {
            Ok(Some(a)) if a.state == AgreementState::Pending => store
                .reject(&a.id, &by, reason, now)
                .map(|a| (a, "rejected")),
            Ok(Some(a)) if a.state == AgreementState::Active => store
                .revoke(&a.id, &by, reason, now)
                .map(|a| (a, "revoked")),
            _ => return,
        };
        match ended {
            Ok((agreement, outcome)) => {
                let principal = principal_named(&n.principal);
                if let Err(e) =
                    crate::control::record_change(&self.engine, &principal, outcome, &agreement)
                {
                    tracing::error!(error = %e.message(), "DSP: agreement change not recorded");
                }
            }
            Err(e) => tracing::error!(error = %e, "DSP: ending an agreement failed"),
        }
    }

    /// Ends the open transfers of an agreement: tokens revoked, consumer
    /// told.
    async fn end_transfers(&self, agreement_id: &str, reason: &str) {
        let Ok(transfers) = self.store.open_transfers(agreement_id) else {
            return;
        };
        for t in transfers {
            if self.moved_transfer(&t, &["REQUESTED", "STARTED", "SUSPENDED"], "TERMINATED") {
                self.revoke_tokens(&t);
                let message = transfer_message("TransferTerminationMessage", &t, Some(reason));
                let path = ["transfers", t.consumer_pid.as_str(), "termination"];
                self.deliver(&t.principal, &t.callback, &path, message)
                    .await;
            }
        }
    }

    fn moved_transfer(&self, t: &Transfer, from: &[&str], to: &str) -> bool {
        match self.store.move_transfer(&t.provider_pid, from, to) {
            Ok(moved) => moved,
            Err(e) => {
                tracing::error!(error = %e, transfer = %t.provider_pid, "DSP store failed");
                false
            }
        }
    }

    fn revoke_tokens(&self, t: &Transfer) {
        if let Err(e) = self.engine.agreements().revoke_tokens(&t.provider_pid) {
            tracing::error!(error = %e, transfer = %t.provider_pid, "DSP: revoking tokens failed");
        }
    }

    /// REQUESTED or SUSPENDED → STARTED with a new token, sent to the
    /// consumer in the data address; if it cannot be, the transfer ends.
    async fn start_transfer(&self, t: Transfer, from: &str) {
        let agreements = self.engine.agreements();
        let now = SystemTime::now();
        let agreement = agreements
            .get(&t.agreement_id, now)
            .ok()
            .flatten()
            .filter(|a| a.state == AgreementState::Active);
        let Some(agreement) = agreement else {
            return self
                .fail_transfer(&t, "the agreement is no longer active")
                .await;
        };
        // Never past the agreement's own end.
        let expires_at = match agreement.expires_at {
            Some(end) => end.min(now + self.token_ttl),
            None => now + self.token_ttl,
        };
        let token = match agreements.issue_token(
            &t.agreement_id,
            &t.provider_pid,
            &t.principal,
            expires_at,
        ) {
            Ok(token) => token,
            Err(e) => {
                tracing::error!(error = %e, "DSP: issuing an access token failed");
                return self
                    .fail_transfer(&t, "the provider could not issue an access token")
                    .await;
            }
        };
        if !self.moved_transfer(&t, &[from], "STARTED") {
            // Another message moved it first: this start never happened.
            if let Err(e) = agreements.revoke_token(&token) {
                tracing::error!(error = %e, transfer = %t.provider_pid, "DSP: revoking a token failed");
            }
            return;
        }
        let expires = chrono::DateTime::<chrono::Utc>::from(expires_at)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut message = transfer_message("TransferStartMessage", &t, None);
        message["dataAddress"] = json!({
            "@type": "DataAddress",
            "endpointType": odrl::FLIGHT_SQL_ENDPOINT,
            "endpoint": self.flight_sql,
            "endpointProperties": [
                {"@type": "EndpointProperty", "name": "authorization", "value": token},
                {"@type": "EndpointProperty", "name": "authType", "value": "bearer"},
                {"@type": "EndpointProperty", "name": format!("{}expiresAt", odrl::SLUICE), "value": expires},
                {"@type": "EndpointProperty", "name": format!("{}agreement", odrl::SLUICE), "value": t.agreement_id},
            ],
        });
        let path = ["transfers", t.consumer_pid.as_str(), "start"];
        if self
            .deliver(&t.principal, &t.callback, &path, message)
            .await
        {
            tracing::info!(transfer = %t.provider_pid, agreement = %t.agreement_id, consumer = %t.principal, "DSP: transfer started");
        } else {
            self.fail_transfer(
                &t,
                "the data address could not be delivered to the callback address",
            )
            .await;
        }
    }

    async fn fail_transfer(&self, t: &Transfer, reason: &str) {
        tracing::warn!(transfer = %t.provider_pid, reason, "DSP: transfer terminated");
        self.revoke_tokens(t);
        self.moved_transfer(t, &["REQUESTED", "STARTED", "SUSPENDED"], "TERMINATED");
        // Again: a start racing this one may have issued a token between.
        self.revoke_tokens(t);
    }
}

/// A principal known only by its id (the consumer of a stored process).
fn principal_named(id: &str) -> Principal {
    Principal {
        id: id.to_string(),
        organization: None,
        common_name: None,
        san_uris: Vec::new(),
        via: None,
    }
}

/// `callback` + `/segment/…`, each segment percent-encoded; None unless
/// `callback` is an https URL.
fn callback_url(callback: &str, path: &[&str]) -> Option<url::Url> {
    let mut url = url::Url::parse(callback)
        .ok()
        .filter(|u| u.scheme() == "https")?;
    url.path_segments_mut().ok()?.pop_if_empty().extend(path);
    Some(url)
}

fn transfer_message(kind: &str, t: &Transfer, reason: Option<&str>) -> Value {
    let mut message = json!({
        "@context": [CONTEXT],
        "@type": kind,
        "providerPid": t.provider_pid,
        "consumerPid": t.consumer_pid,
    });
    if let Some(reason) = reason {
        message["code"] = json!("terminated");
        message["reason"] = json!([reason]);
    }
    message
}

/// The error families of the protocol: each endpoint answers with its own.
#[derive(Clone, Copy)]
enum Family {
    Catalog,
    Negotiation,
    Transfer,
}

/// A refused request: a status code and the family's error body.
struct Refusal {
    status: StatusCode,
    family: Family,
    provider_pid: String,
    consumer_pid: String,
    code: &'static str,
    reason: String,
}

impl Refusal {
    fn new(
        family: Family,
        status: StatusCode,
        code: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            status,
            family,
            provider_pid: String::new(),
            consumer_pid: String::new(),
            code,
            reason: reason.into(),
        }
    }

    fn pids(mut self, provider_pid: &str, consumer_pid: &str) -> Self {
        self.provider_pid = provider_pid.to_string();
        self.consumer_pid = consumer_pid.to_string();
        self
    }

    fn body(&self) -> Value {
        let kind = match self.family {
            Family::Catalog => "CatalogError",
            Family::Negotiation => "ContractNegotiationError",
            Family::Transfer => "TransferError",
        };
        let mut body = json!({
            "@context": [CONTEXT],
            "@type": kind,
            "code": self.code,
            "reason": [self.reason],
        });
        if !matches!(self.family, Family::Catalog) {
            body["providerPid"] = json!(self.provider_pid);
            body["consumerPid"] = json!(self.consumer_pid);
        }
        body
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

type Answer = Result<Response, Refusal>;

fn ok_json(status: StatusCode, body: Value) -> Answer {
    Ok((status, axum::Json(body)).into_response())
}

fn ok_empty() -> Answer {
    Ok(StatusCode::OK.into_response())
}

/// Store failures: the consumer hears that the provider failed, not why.
fn internal(family: Family) -> impl Fn(super::store::DspStoreError) -> Refusal {
    move |e| {
        tracing::error!(error = %e, "DSP store failed");
        Refusal::new(
            family,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the provider's DSP store failed (see its log)",
        )
    }
}

impl Provider {
    fn who(&self, family: Family, peer: &Peer, headers: &HeaderMap) -> Result<Principal, Refusal> {
        self.authenticate
            .authenticate(peer, headers)
            .map_err(|e| Refusal::new(family, StatusCode::UNAUTHORIZED, "unauthenticated", e.0))
    }

    /// The body as the message `expected`, checked against its schema.
    fn parse(&self, family: Family, body: &Bytes, expected: Message) -> Result<Value, Refusal> {
        let bad = |reason: String| {
            Refusal::new(family, StatusCode::BAD_REQUEST, "invalid-message", reason)
        };
        let value: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
        expected.check(&value).map_err(|v| bad(v.to_string()))?;
        Ok(value)
    }

    /// The negotiation `pid` if it is `principal`'s; 404 otherwise, the
    /// same for one that does not exist and one of another consumer.
    fn own_negotiation(&self, principal: &Principal, pid: &str) -> Result<Negotiation, Refusal> {
        self.store
            .negotiation(pid)
            .map_err(internal(Family::Negotiation))?
            .filter(|n| n.principal == principal.id)
            .ok_or_else(|| {
                Refusal::new(
                    Family::Negotiation,
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no negotiation `{pid}` of yours"),
                )
                .pids(pid, "")
            })
    }

    fn own_transfer(&self, principal: &Principal, pid: &str) -> Result<Transfer, Refusal> {
        self.store
            .transfer(pid)
            .map_err(internal(Family::Transfer))?
            .filter(|t| t.principal == principal.id)
            .ok_or_else(|| {
                Refusal::new(
                    Family::Transfer,
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no transfer process `{pid}` of yours"),
                )
                .pids(pid, "")
            })
    }
}

/// The routes: the version endpoint at the root, the rest under
/// [`BASE_PATH`].
pub fn router(provider: Arc<Provider>) -> Router {
    let base = |path: &str| format!("{BASE_PATH}{path}");
    Router::new()
        .route("/.well-known/dspace-version", get(versions))
        .route(&base("/catalog/request"), post(catalog_request))
        .route(&base("/catalog/datasets/{id}"), get(dataset))
        .route(&base("/negotiations/request"), post(negotiation_request))
        .route(&base("/negotiations/{pid}"), get(negotiation))
        .route(&base("/negotiations/{pid}/request"), post(counter_offer))
        .route(&base("/negotiations/{pid}/events"), post(negotiation_event))
        .route(
            &base("/negotiations/{pid}/agreement/verification"),
            post(verification),
        )
        .route(
            &base("/negotiations/{pid}/termination"),
            post(negotiation_termination),
        )
        .route(&base("/transfers/request"), post(transfer_request))
        .route(&base("/transfers/{pid}"), get(transfer))
        .route(&base("/transfers/{pid}/start"), post(transfer_start))
        .route(
            &base("/transfers/{pid}/completion"),
            post(transfer_completion),
        )
        .route(
            &base("/transfers/{pid}/suspension"),
            post(transfer_suspension),
        )
        .route(
            &base("/transfers/{pid}/termination"),
            post(transfer_termination),
        )
        .layer(axum::middleware::from_fn(require_certificate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "no such DSP endpoint; see /.well-known/dspace-version\n",
            )
        })
        .with_state(provider)
}

/// DSP messages are small; a larger body is refused before it is read.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// Every route but the version endpoint needs a client certificate, and
/// is refused without one before its body is read.
async fn require_certificate(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let anonymous = request
        .extensions()
        .get::<Peer>()
        .is_none_or(|peer| peer.0.is_none());
    let path = request.uri().path();
    if !anonymous || path == "/.well-known/dspace-version" {
        return next.run(request).await;
    }
    let family = match path {
        p if p.contains("/negotiations") => Family::Negotiation,
        p if p.contains("/transfers") => Family::Transfer,
        _ => Family::Catalog,
    };
    Refusal::new(
        family,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "a client certificate is required (mTLS) for every DSP endpoint except \
         /.well-known/dspace-version",
    )
    .into_response()
}

type Shared = State<Arc<Provider>>;

/// Unauthenticated and unversioned, as the specification requires.
async fn versions(State(p): Shared) -> Response {
    axum::Json(json!({
        "protocolVersions": [{
            "version": "2025-1",
            "path": BASE_PATH,
            "binding": "HTTPS",
            "serviceId": p.participant,
            "auth": {"protocol": "mTLS", "version": "1.3", "profile": ["x509-client-certificate"]},
        }]
    }))
    .into_response()
}

async fn catalog_request(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let principal = p.who(Family::Catalog, &peer, &headers)?;
    let request = p.parse(Family::Catalog, &body, Message::CatalogRequestMessage)?;
    if request["filter"].as_array().is_some_and(|f| !f.is_empty()) {
        return Err(Refusal::new(
            Family::Catalog,
            StatusCode::BAD_REQUEST,
            "filter-unsupported",
            "catalog filters are not supported: send no filter (the catalog holds only what is offered to you)",
        ));
    }
    let entries = p.catalog_entries(&principal);
    ok_json(StatusCode::OK, odrl::catalog(&entries, &p.endpoints()))
}

async fn dataset(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Answer {
    let principal = p.who(Family::Catalog, &peer, &headers)?;
    let entry = p
        .catalog_entries(&principal)
        .into_iter()
        .find(|e| e.name == id);
    match entry {
        Some(entry) => ok_json(StatusCode::OK, odrl::root_dataset(&entry, &p.endpoints())),
        // The same answer for a dataset that does not exist and one not offered to the caller.
        None => Err(Refusal::new(
            Family::Catalog,
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no dataset `{id}` is offered to you"),
        )),
    }
}

impl Provider {
    /// The caller's catalog: what its usage policy grants, of the datasets
    /// this connector serves.
    fn catalog_entries(&self, principal: &Principal) -> Vec<sluice_policy::offers::CatalogEntry> {
        let gate = self.engine.policy().current();
        let Some(policy) = gate.policy_set() else {
            return Vec::new();
        };
        policy
            .catalog(principal)
            .into_iter()
            .filter(|e| self.engine.catalog().dataset(&e.name).is_some())
            .collect()
    }
}

async fn negotiation_request(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let principal = p.who(Family::Negotiation, &peer, &headers)?;
    let request = p.parse(Family::Negotiation, &body, Message::ContractRequestMessage)?;
    let consumer_pid = request["consumerPid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let refuse = |code, reason: String| {
        Refusal::new(Family::Negotiation, StatusCode::BAD_REQUEST, code, reason)
            .pids("", &consumer_pid)
    };
    let Some(callback) = request["callbackAddress"].as_str() else {
        return Err(refuse("invalid-message", "a new negotiation is requested with `callbackAddress`; a request with `providerPid` goes to /negotiations/:providerPid/request".into()));
    };
    let _opening = p.opening.lock().await;
    p.check_new_process(&principal, &consumer_pid, callback, Kind::Negotiation)
        .map_err(|(code, reason)| refuse(code, reason))?;
    let offer_id = request["offer"]["@id"].as_str().unwrap_or_default();
    let gate = p.engine.policy().current();
    let offer = gate
        .policy_set()
        .and_then(|policy| policy.offer(&principal, offer_id));
    let Some(offer) = offer else {
        return Err(refuse(
            "unknown-offer",
            format!(
                "no offer `{offer_id}` is made to you; the catalog lists yours (POST {BASE_PATH}/catalog/request)"
            ),
        ));
    };
    if offer.agreement.is_none() {
        return Err(refuse(
            "no-agreement-needed",
            format!(
                "offer `{}` needs no agreement: query dataset `{}` over Flight SQL at {} with \
                 your certificate",
                offer.id, offer.dataset, p.flight_sql
            ),
        ));
    }
    if let Some(target) = request["offer"]["target"]
        .as_str()
        .filter(|t| *t != offer.dataset)
    {
        return Err(refuse(
            "wrong-target",
            format!(
                "offer `{}` is for dataset `{}`, not `{target}`",
                offer.id, offer.dataset
            ),
        ));
    }
    let purpose = odrl::requested_purpose(&request["offer"], &offer)
        .map_err(|e| refuse("purpose", e.to_string()))?;
    let agreement = p
        .request_agreement(&principal, &offer, &purpose)
        .map_err(|e| refuse("agreement", e.to_string()))?;
    let negotiation = Negotiation {
        provider_pid: new_pid().map_err(internal(Family::Negotiation))?,
        consumer_pid: consumer_pid.clone(),
        principal: principal.id.clone(),
        callback: callback.to_string(),
        offer_id: offer.id.clone(),
        dataset: offer.dataset.clone(),
        purpose,
        state: "REQUESTED".into(),
        agreement_id: agreement.id.clone(),
    };
    p.store
        .insert_negotiation(&negotiation)
        .map_err(internal(Family::Negotiation))?;
    tracing::info!(negotiation = %negotiation.provider_pid, agreement = %agreement.id, offer = %offer.id, consumer = %principal.id, state = %agreement.state, "DSP: contract requested");
    if agreement.state == AgreementState::Active {
        let provider = p.clone();
        let n = negotiation.clone();
        tokio::spawn(async move {
            if provider.moved_negotiation(&n, &["REQUESTED"], "AGREED") {
                provider.send_agreement(n).await;
            }
        });
    }
    ok_json(
        StatusCode::CREATED,
        negotiation_ack(&negotiation.provider_pid, &consumer_pid, "REQUESTED"),
    )
}

impl Provider {
    /// A token-bound agreement for the offer, on the record; automatic
    /// offers (and offers that need none) are active at once.
    fn request_agreement(
        &self,
        principal: &Principal,
        offer: &Offer,
        purpose: &str,
    ) -> Result<Agreement, AgreementNotMade> {
        let agreement = self
            .engine
            .agreements()
            .request_token_bound(
                offer,
                &crate::audit::organization_key(principal),
                &principal.id,
                purpose,
                SystemTime::now(),
            )
            .map_err(|e| match e {
                // The store's own failure names files: the log has it.
                crate::agreements::AgreementError::Store(e) => {
                    tracing::error!(error = %e, "DSP: the agreement store failed");
                    AgreementNotMade("the provider's agreement store failed (see its log)".into())
                }
                refused => AgreementNotMade(refused.to_string()),
            })?;
        crate::control::record_change(&self.engine, principal, "requested", &agreement)
            .map_err(|s| AgreementNotMade(s.message().to_string()))?;
        Ok(agreement)
    }
}

/// The agreement store refused the request, or could not record it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AgreementNotMade(String);

/// Which kind of process a request opens.
#[derive(Clone, Copy)]
enum Kind {
    Negotiation,
    Transfer,
}

impl Provider {
    /// What any new process must be: a sane id and callback, and room
    /// under the principal's cap (each open process may hold a delivery
    /// task and a callback connection).
    fn check_new_process(
        &self,
        principal: &Principal,
        consumer_pid: &str,
        callback: &str,
        kind: Kind,
    ) -> Result<(), (&'static str, String)> {
        if consumer_pid.is_empty() || consumer_pid.chars().count() > MAX_PID_CHARS {
            return Err((
                "invalid-message",
                format!("consumerPid must have 1 to {MAX_PID_CHARS} characters"),
            ));
        }
        if callback.chars().count() > MAX_CALLBACK_CHARS || callback_url(callback, &[]).is_none() {
            return Err((
                "invalid-callback",
                format!(
                    "callbackAddress must be an https URL of at most {MAX_CALLBACK_CHARS} characters"
                ),
            ));
        }
        let (negotiations, transfers) = self.store.open_processes(&principal.id).map_err(|e| {
            tracing::error!(error = %e, "DSP store failed");
            (
                "internal",
                "the provider's DSP store failed (see its log)".to_string(),
            )
        })?;
        let (open, what) = match kind {
            Kind::Negotiation => (negotiations, "negotiations"),
            Kind::Transfer => (transfers, "transfers"),
        };
        if open >= MAX_OPEN_PER_PRINCIPAL {
            return Err((
                "too-many-processes",
                format!(
                    "you have {open} {what} open, the most one consumer may have; finish or \
                     terminate some first"
                ),
            ));
        }
        Ok(())
    }
}

fn negotiation_ack(provider_pid: &str, consumer_pid: &str, state: &str) -> Value {
    json!({
        "@context": [CONTEXT],
        "@type": "ContractNegotiation",
        "providerPid": provider_pid,
        "consumerPid": consumer_pid,
        "state": state,
    })
}

async fn negotiation(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
) -> Answer {
    let principal = p.who(Family::Negotiation, &peer, &headers)?;
    let n = p.own_negotiation(&principal, &pid)?;
    ok_json(
        StatusCode::OK,
        negotiation_ack(&n.provider_pid, &n.consumer_pid, &n.state),
    )
}

/// A message for negotiation `pid`: it must be the caller's, name the
/// same consumer process, and have the message's structure.
fn negotiation_message(
    p: &Provider,
    peer: &Peer,
    headers: &HeaderMap,
    pid: &str,
    body: &Bytes,
    expected: Message,
) -> Result<(Negotiation, Value), Refusal> {
    let principal = p.who(Family::Negotiation, peer, headers)?;
    let n = p.own_negotiation(&principal, pid)?;
    let message = p
        .parse(Family::Negotiation, body, expected)
        .map_err(|r| r.pids(pid, &n.consumer_pid))?;
    if message["providerPid"] != pid || message["consumerPid"] != n.consumer_pid.as_str() {
        return Err(Refusal::new(
            Family::Negotiation,
            StatusCode::BAD_REQUEST,
            "wrong-process",
            "providerPid and consumerPid must name this negotiation",
        )
        .pids(pid, &n.consumer_pid));
    }
    Ok((n, message))
}

fn wrong_state(family: Family, what: &str, state: &str, pid: &str, consumer_pid: &str) -> Refusal {
    Refusal::new(
        family,
        StatusCode::BAD_REQUEST,
        "invalid-state",
        format!("{what} is not allowed while the process is {state}"),
    )
    .pids(pid, consumer_pid)
}

async fn counter_offer(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let (n, _) = negotiation_message(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::ContractRequestMessage,
    )?;
    Err(Refusal::new(Family::Negotiation, StatusCode::BAD_REQUEST, "unsupported", "counter-offers are not supported: the offers are the usage policy's; terminate this negotiation and request an offer from the catalog").pids(&pid, &n.consumer_pid))
}

async fn negotiation_event(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let (n, message) = negotiation_message(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::ContractNegotiationEventMessage,
    )?;
    let event = message["eventType"].as_str().unwrap_or_default();
    // This provider never sends an offer, so there is nothing to accept;
    // FINALIZED is the provider's event.
    Err(wrong_state(
        Family::Negotiation,
        &format!("a consumer's {event} event"),
        &n.state,
        &pid,
        &n.consumer_pid,
    ))
}

async fn verification(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let (n, _) = negotiation_message(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::ContractAgreementVerificationMessage,
    )?;
    if !p
        .store
        .move_negotiation(&pid, &["AGREED"], "VERIFIED")
        .map_err(internal(Family::Negotiation))?
    {
        return Err(wrong_state(
            Family::Negotiation,
            "an agreement verification",
            &n.state,
            &pid,
            &n.consumer_pid,
        ));
    }
    let provider = p.clone();
    tokio::spawn(async move { provider.finalize(n).await });
    ok_empty()
}

async fn negotiation_termination(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let (n, _) = negotiation_message(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::ContractNegotiationTerminationMessage,
    )?;
    let open = ["REQUESTED", "AGREED", "VERIFIED"];
    if !p
        .store
        .move_negotiation(&pid, &open, "TERMINATED")
        .map_err(internal(Family::Negotiation))?
    {
        return Err(wrong_state(
            Family::Negotiation,
            "a termination",
            &n.state,
            &pid,
            &n.consumer_pid,
        ));
    }
    p.end_agreement(&n, "the consumer terminated the negotiation");
    tracing::info!(negotiation = %pid, agreement = %n.agreement_id, "DSP: negotiation terminated by the consumer");
    ok_empty()
}

async fn transfer_request(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let principal = p.who(Family::Transfer, &peer, &headers)?;
    let request = p.parse(Family::Transfer, &body, Message::TransferRequestMessage)?;
    let consumer_pid = request["consumerPid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let refuse = |code, reason: String| {
        Refusal::new(Family::Transfer, StatusCode::BAD_REQUEST, code, reason)
            .pids("", &consumer_pid)
    };
    if let Some(existing) = p
        .store
        .transfer_by_consumer(&principal.id, &consumer_pid)
        .map_err(internal(Family::Transfer))?
    {
        return ok_json(StatusCode::CREATED, transfer_ack(&existing));
    }
    let agreement_id = request["agreementId"].as_str().unwrap_or_default();
    let negotiation = p
        .store
        .negotiation_of(agreement_id)
        .map_err(internal(Family::Transfer))?
        .filter(|n| n.principal == principal.id);
    let Some(negotiation) = negotiation else {
        return Err(refuse(
            "unknown-agreement",
            format!("no agreement `{agreement_id}` of yours was negotiated here"),
        ));
    };
    if negotiation.state != "FINALIZED" {
        return Err(refuse(
            "invalid-state",
            format!(
                "agreement `{agreement_id}`'s negotiation is {}, not FINALIZED",
                negotiation.state
            ),
        ));
    }
    let active = p
        .engine
        .agreements()
        .is_active(agreement_id, SystemTime::now())
        .map_err(|e| {
            tracing::error!(error = %e, "reading agreements failed");
            Refusal::new(
                Family::Transfer,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the provider's agreement store failed (see its log)",
            )
        })?;
    if !active {
        return Err(refuse(
            "agreement-ended",
            format!(
                "agreement `{agreement_id}` is no longer active (revoked, terminated or expired)"
            ),
        ));
    }
    let format = request["format"].as_str().unwrap_or_default();
    if format != odrl::FLIGHT_SQL_PULL {
        return Err(refuse(
            "unsupported-format",
            format!(
                "format `{format}` is not offered; the distribution's format is `{}`",
                odrl::FLIGHT_SQL_PULL
            ),
        ));
    }
    if request.get("dataAddress").is_some() {
        return Err(refuse("unsupported-format", "push transfers are not supported: data never leaves the provider; leave out `dataAddress`".into()));
    }
    let callback = request["callbackAddress"].as_str().unwrap_or_default();
    let _opening = p.opening.lock().await;
    p.check_new_process(&principal, &consumer_pid, callback, Kind::Transfer)
        .map_err(|(code, reason)| refuse(code, reason))?;
    let transfer = Transfer {
        provider_pid: new_pid().map_err(internal(Family::Transfer))?,
        consumer_pid: consumer_pid.clone(),
        principal: principal.id.clone(),
        callback: callback.to_string(),
        agreement_id: agreement_id.to_string(),
        format: format.to_string(),
        state: "REQUESTED".into(),
    };
    let inserted = p
        .store
        .insert_transfer(&transfer)
        .map_err(internal(Family::Transfer))?;
    if !inserted {
        // The same request, concurrently: answered with the one stored.
        let existing = p
            .store
            .transfer_by_consumer(&principal.id, &consumer_pid)
            .map_err(internal(Family::Transfer))?;
        if let Some(existing) = existing {
            return ok_json(StatusCode::CREATED, transfer_ack(&existing));
        }
    }
    let provider = p.clone();
    let t = transfer.clone();
    tokio::spawn(async move { provider.start_transfer(t, "REQUESTED").await });
    ok_json(StatusCode::CREATED, transfer_ack(&transfer))
}

fn transfer_ack(t: &Transfer) -> Value {
    json!({
        "@context": [CONTEXT],
        "@type": "TransferProcess",
        "providerPid": t.provider_pid,
        "consumerPid": t.consumer_pid,
        "state": t.state,
    })
}

async fn transfer(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
) -> Answer {
    let principal = p.who(Family::Transfer, &peer, &headers)?;
    let t = p.own_transfer(&principal, &pid)?;
    ok_json(StatusCode::OK, transfer_ack(&t))
}

fn transfer_message_for(
    p: &Provider,
    peer: &Peer,
    headers: &HeaderMap,
    pid: &str,
    body: &Bytes,
    expected: Message,
) -> Result<Transfer, Refusal> {
    let principal = p.who(Family::Transfer, peer, headers)?;
    let t = p.own_transfer(&principal, pid)?;
    let message = p
        .parse(Family::Transfer, body, expected)
        .map_err(|r| r.pids(pid, &t.consumer_pid))?;
    if message["providerPid"] != pid || message["consumerPid"] != t.consumer_pid.as_str() {
        return Err(Refusal::new(
            Family::Transfer,
            StatusCode::BAD_REQUEST,
            "wrong-process",
            "providerPid and consumerPid must name this transfer process",
        )
        .pids(pid, &t.consumer_pid));
    }
    Ok(t)
}

/// Moves transfer `t` from one of `from` to `to`, revoking its tokens.
fn end_use(p: &Provider, t: &Transfer, what: &str, from: &[&str], to: &str) -> Answer {
    if !from.contains(&t.state.as_str()) {
        return Err(wrong_state(
            Family::Transfer,
            what,
            &t.state,
            &t.provider_pid,
            &t.consumer_pid,
        ));
    }
    // The tokens go first: if they cannot, nothing changes and the
    // consumer hears so, rather than a TERMINATED transfer whose token
    // still works.
    p.engine
        .agreements()
        .revoke_tokens(&t.provider_pid)
        .map_err(|e| {
            tracing::error!(error = %e, transfer = %t.provider_pid, "DSP: revoking tokens failed");
            Refusal::new(
                Family::Transfer,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the provider could not revoke the transfer's token; nothing was changed (see its log)",
            )
            .pids(&t.provider_pid, &t.consumer_pid)
        })?;
    if !p
        .store
        .move_transfer(&t.provider_pid, from, to)
        .map_err(internal(Family::Transfer))?
    {
        return Err(wrong_state(
            Family::Transfer,
            what,
            &t.state,
            &t.provider_pid,
            &t.consumer_pid,
        ));
    }
    // Again, now that the state has moved: a start racing this message may
    // have issued a token after the first revocation.
    p.revoke_tokens(t);
    tracing::info!(transfer = %t.provider_pid, agreement = %t.agreement_id, state = to, "DSP: transfer {what}");
    ok_empty()
}

async fn transfer_start(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let t = transfer_message_for(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::TransferStartMessage,
    )?;
    // Only a suspended transfer is restarted by the consumer; the first
    // start is the provider's.
    if t.state != "SUSPENDED" {
        return Err(wrong_state(
            Family::Transfer,
            "a consumer's start",
            &t.state,
            &pid,
            &t.consumer_pid,
        ));
    }
    let active = p
        .engine
        .agreements()
        .is_active(&t.agreement_id, SystemTime::now())
        .unwrap_or(false);
    if !active {
        return Err(Refusal::new(
            Family::Transfer,
            StatusCode::BAD_REQUEST,
            "agreement-ended",
            format!("agreement `{}` is no longer active", t.agreement_id),
        )
        .pids(&pid, &t.consumer_pid));
    }
    let provider = p.clone();
    tokio::spawn(async move { provider.start_transfer(t, "SUSPENDED").await });
    ok_empty()
}

async fn transfer_completion(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let t = transfer_message_for(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::TransferCompletionMessage,
    )?;
    end_use(&p, &t, "completion", &["STARTED"], "COMPLETED")
}

async fn transfer_suspension(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let t = transfer_message_for(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::TransferSuspensionMessage,
    )?;
    end_use(&p, &t, "suspension", &["STARTED"], "SUSPENDED")
}

async fn transfer_termination(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    body: Bytes,
) -> Answer {
    let t = transfer_message_for(
        &p,
        &peer,
        &headers,
        &pid,
        &body,
        Message::TransferTerminationMessage,
    )?;
    end_use(
        &p,
        &t,
        "termination",
        &["REQUESTED", "STARTED", "SUSPENDED"],
        "TERMINATED",
    )
}
