//! The web console: agreements, the audit trail, budgets, datasets and a
//! SQL workbench in a browser, served by the daemon over HTTPS on its own
//! port (`[console] listen`; docs/console.md).
//!
//! Who is signed in is a principal exactly as on the gRPC port: from a
//! client certificate the browser presents, or from a one-time link that
//! principal minted over mTLS (`sluice console`, [`grpc`]). Every action
//! runs through the same gRPC service implementation a CLI call would
//! ([`calls`]), in process, so it is authorized, refused and audited the
//! same way; queries go through the Flight SQL service itself.
//!
//! | path | who | what | module |
//! |---|---|---|---|
//! | `/login`, `/login/link/{token}`, `/logout` | anyone | sign in and out | [`pages::login`] |
//! | `/` | signed in | who you are, where to go | [`pages::home`] |
//! | `/catalog`, `/agreements`, `/budget`, `/receipts` | signed in | one's own offers, agreements, budget, audit records | [`pages::consumer`] |
//! | `/workbench` | signed in | SQL through the engine; table and chart with DP intervals | [`pages::workbench`] |
//! | `/admin/agreements` | admins | pending, approve, reject, revoke | [`pages::agreements`] |
//! | `/admin/audit` | admins | filtered timeline, records, chain status, export | [`pages::audit`] |
//! | `/admin/budgets` | admins | ε and δ spent over time, quotas per day | [`pages::budgets`] |
//! | `/admin/datasets` | admins | datasets, grants, catalogs as consumers see them, EXPLAIN POLICY | [`pages::datasets`] |

pub mod calls;
pub mod chart;
pub mod error;
pub mod grpc;
pub mod html;
pub mod pages;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::flight::FlightSql;
use crate::metrics::Metrics;
use crate::query::QueryEngine;
pub use error::ConsoleError;
use session::{Session, Sessions};

/// The console's shared state.
pub struct Console {
    pub(crate) engine: Arc<QueryEngine>,
    /// The Flight SQL service the workbench's queries go through.
    pub(crate) flight: FlightSql,
    pub(crate) sessions: Sessions,
    /// `https://host:port` browsers reach the console at.
    pub(crate) root: String,
    pub(crate) chain: Arc<pages::audit::ChainStatus>,
    pub(crate) activity: pages::budgets::ActivityCache,
    pub(crate) workbench: Running,
}

/// Principals with a workbench query running: one each at a time, so one
/// principal cannot hold many answers in the console's memory at once.
#[derive(Default)]
pub struct Running(std::sync::Mutex<std::collections::HashSet<String>>);

impl Running {
    /// Marks `principal` running until the guard drops; `None` if it
    /// already is.
    pub fn begin(&self, principal: &str) -> Option<RunningGuard<'_>> {
        let mut running = self.0.lock().expect("running lock");
        running.insert(principal.to_string()).then(|| RunningGuard {
            running: self,
            principal: principal.to_string(),
        })
    }
}

pub struct RunningGuard<'a> {
    running: &'a Running,
    principal: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.0.lock() {
            running.remove(&self.principal);
        }
    }
}

/// What the console is built from.
pub struct ConsoleSettings {
    /// `https://host:port`, without a trailing slash.
    pub root: String,
    pub lifetimes: session::Lifetimes,
}

impl Console {
    pub fn new(engine: Arc<QueryEngine>, metrics: Arc<Metrics>, settings: ConsoleSettings) -> Self {
        Self {
            flight: FlightSql::new(engine.clone(), metrics),
            engine,
            sessions: Sessions::new(settings.lifetimes),
            root: settings.root,
            chain: Arc::default(),
            activity: pages::budgets::ActivityCache::default(),
            workbench: Running::default(),
        }
    }

    /// The sign-in URL of a token.
    pub fn link_url(&self, token: &str) -> String {
        format!("{}/login/link/{token}", self.root)
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

/// The largest form body accepted.
const FORM_LIMIT: usize = 1 << 20;

/// Every route; each response carries the console's security headers.
pub fn router(console: Arc<Console>) -> Router {
    use pages::{agreements, audit, budgets, consumer, datasets, home, login, workbench};
    Router::new()
        .route("/static/console.css", get(stylesheet))
        .route("/login", get(login::page))
        .route("/login/certificate", post(login::with_certificate))
        .route("/login/link/{token}", get(login::confirm))
        .route("/login/link", post(login::with_link))
        .route("/logout", post(login::logout))
        .route("/", get(home::page))
        .route("/catalog", get(consumer::catalog))
        .route("/agreements", get(consumer::agreements))
        .route("/agreements/request", post(consumer::request_agreement))
        .route("/budget", get(consumer::budget))
        .route("/receipts", get(consumer::receipts))
        .route("/receipts/{id}", get(consumer::receipt))
        .route("/workbench", get(workbench::page).post(workbench::run))
        .route("/admin/agreements", get(agreements::page))
        .route("/admin/agreements/{id}/{verb}", post(agreements::decide))
        .route("/admin/audit", get(audit::timeline))
        .route("/admin/audit/export", get(audit::export))
        .route("/admin/audit/{id}", get(audit::record))
        .route("/admin/budgets", get(budgets::page))
        .route(
            "/admin/datasets",
            get(datasets::page).post(datasets::explain),
        )
        .fallback(not_found)
        // Forms are small; the SQL in one is capped again by the engine.
        .layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT))
        .layer(axum::middleware::map_response(with_secure_headers))
        .with_state(console)
}

async fn with_secure_headers(mut response: Response) -> Response {
    html::secure_headers(response.headers_mut());
    response
}

async fn not_found() -> ConsoleError {
    ConsoleError::NotFound("no such page in the console".into())
}

async fn stylesheet() -> Response {
    let mut response = include_str!("console.css").into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    response
}

/// A signed-in browser: its session and whether its principal is an admin
/// under the policy in force now.
pub struct User {
    pub session: Session,
    pub admin: bool,
    /// The console's own origin, which forms must come from.
    origin: String,
}

impl User {
    pub fn principal(&self) -> &sluice_policy::Principal {
        &self.session.caller.principal
    }

    /// The navigation and CSRF token of the pages this user sees.
    pub fn viewer(&self) -> html::Viewer<'_> {
        html::Viewer {
            principal: &self.principal().id,
            admin: self.admin,
            csrf: &self.session.csrf,
        }
    }

    /// A whole page for this user.
    pub fn page(&self, title: &str, body: &str) -> Response {
        html::respond(
            StatusCode::OK,
            html::page(title, Some(&self.viewer()), body),
        )
    }

    /// Refuses a state-changing request that lacks this session's CSRF
    /// token or that a browser says came from another site.
    pub fn check_form(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<(), ConsoleError> {
        same_site(headers, &self.origin)?;
        match session::csrf_matches(&self.session, csrf) {
            true => Ok(()),
            false => Err(ConsoleError::Csrf),
        }
    }
}

/// Refuses a request a browser marks as sent from another site
/// (`Sec-Fetch-Site`), or whose `Origin` is neither the console's
/// configured one (`origin`) nor that of the `Host` it was sent to: defence
/// in depth under the CSRF token, and the only guard of the sign-in forms.
pub fn same_site(headers: &HeaderMap, origin: &str) -> Result<(), ConsoleError> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err(ConsoleError::Csrf);
    }
    if let Some(sent_from) = text("origin") {
        let host = text("host").map(|h| format!("https://{h}"));
        if sent_from != origin && Some(sent_from) != host.as_deref() {
            return Err(ConsoleError::Csrf);
        }
    }
    Ok(())
}

impl FromRequestParts<Arc<Console>> for User {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let id = session::cookie_value(&parts.headers).ok_or(ConsoleError::SignIn)?;
        let session = console.sessions.get(&id).ok_or(ConsoleError::SignIn)?;
        let admin = crate::control::is_admin(&console.engine, &session.caller.principal);
        // A policy edit that drops a principal ends its console use at once.
        if !admin && !admitted(&console.engine, &session.caller.principal) {
            console.sessions.end(&id);
            return Err(ConsoleError::NotAdmitted(
                session.caller.principal.id.clone(),
            ));
        }
        Ok(User {
            session,
            admin,
            origin: console.root.clone(),
        })
    }
}

/// Whether the policy in force admits `principal` at all: an admin, or a
/// consumer some grant names. Anyone else (a certificate from the CA that
/// no rule mentions) may not sign in: the console is not theirs to hold
/// sessions in.
pub fn admitted(engine: &QueryEngine, principal: &sluice_policy::Principal) -> bool {
    let gate = engine.policy().current();
    gate.policy_set()
        .is_some_and(|p| p.is_admin(principal) || !p.catalog(principal).is_empty())
}

/// A signed-in provider admin; anyone else gets 403.
pub struct Admin(pub User);

impl FromRequestParts<Arc<Console>> for Admin {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let user = User::from_request_parts(parts, console).await?;
        match user.admin {
            true => Ok(Admin(user)),
            false => Err(ConsoleError::NotAdmin(user.principal().id.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forms_from_another_site_are_refused() {
        let ours = "https://console.example:8444";
        assert!(same_site(&headers(&[]), ours).is_ok());
        assert!(same_site(&headers(&[("sec-fetch-site", "same-origin")]), ours).is_ok());
        assert!(same_site(&headers(&[("origin", ours)]), ours).is_ok());
        let proxied = [
            ("origin", "https://10.0.0.5:8444"),
            ("host", "10.0.0.5:8444"),
        ];
        assert!(same_site(&headers(&proxied), ours).is_ok());
        for refused in [
            vec![("sec-fetch-site", "cross-site")],
            vec![("sec-fetch-site", "same-site")],
            vec![("origin", "https://evil.example")],
            vec![("origin", "null")],
            vec![("origin", "http://console.example:8444")],
        ] {
            assert!(
                matches!(same_site(&headers(&refused), ours), Err(ConsoleError::Csrf)),
                "{refused:?}"
            );
        }
    }
}
