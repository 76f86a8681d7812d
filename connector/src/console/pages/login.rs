//! Signing in and out. A browser signs in with the client certificate it
//! presents in the TLS handshake, or with a one-time link its principal
//! minted over mTLS. Opening a link only shows whom it signs in; the
//! button spends it, so a link preview or prefetch cannot.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::see_other;
use crate::console::html::{self, esc};
use crate::console::session::{SessionsFull, clear_cookie, cookie_value, set_cookie};
use crate::console::{Console, ConsoleError, User, same_site};
use crate::https::Peer;

/// The sign-in page: the one page without a session.
pub async fn page(peer: Option<Extension<Peer>>) -> Response {
    let certificate = match certificate_caller(peer) {
        Some(caller) => format!(
            "<form id=\"certificate-login\" method=\"post\" action=\"/login/certificate\">\
             <p>Your browser presented a client certificate for <strong>{}</strong>.</p>\
             <button type=\"submit\" id=\"sign-in-certificate\">Sign in with this certificate</button></form>",
            esc(&caller.principal.id)
        ),
        None => "<p>Your browser presented no client certificate.</p>".to_string(),
    };
    let body = format!(
        "{certificate}<h2>Sign in with a one-time link</h2>\
         <p>With the client certificate you use for gRPC, ask the connector for a link that signs this browser in as you; it works once and for minutes:</p>\
         <pre><code>sluice console --identity admin</code></pre>\
         <p>(or <code>--cert</code>, <code>--key</code> and <code>--ca</code> for your own certificate).</p>"
    );
    html::respond(StatusCode::OK, html::page("Sign in to Sluice", None, &body))
}

fn certificate_caller(peer: Option<Extension<Peer>>) -> Option<Arc<crate::identity::Caller>> {
    let caller = peer?.0.0?;
    crate::identity::refuse_roles(&caller.principal).ok()?;
    Some(caller)
}

/// Signs in with the browser's client certificate.
pub async fn with_certificate(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    peer: Option<Extension<Peer>>,
) -> Result<Response, ConsoleError> {
    same_site(&headers, &console.root)?;
    let caller = certificate_caller(peer).ok_or(ConsoleError::Status(
        tonic::Status::unauthenticated(
            "your browser presented no usable client certificate; sign in with a link from `sluice console`",
        ),
    ))?;
    if !crate::console::admitted(&console.engine, &caller.principal) {
        return Err(ConsoleError::NotAdmitted(caller.principal.id.clone()));
    }
    tracing::info!(principal = %caller.principal.id, "web console sign-in with a client certificate");
    let (id, _) = console.sessions.start(caller).map_err(full)?;
    Ok(see_other("/", Some(set_cookie(&id))))
}

/// What a link shows before it is spent.
pub async fn confirm(
    State(console): State<Arc<Console>>,
    Path(token): Path<String>,
) -> Result<Response, ConsoleError> {
    let caller = console
        .sessions
        .peek_link(&token)
        .ok_or(ConsoleError::LinkRefused)?;
    let body = format!(
        "<form id=\"link-login\" method=\"post\" action=\"/login/link\">\
         <p>This link signs you in as <strong id=\"link-principal\">{principal}</strong>. It works once.</p>\
         <input type=\"hidden\" name=\"token\" value=\"{token}\">\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form>",
        principal = esc(&caller.principal.id),
        token = esc(&token),
    );
    Ok(html::respond(
        StatusCode::OK,
        html::page("Sign in to Sluice", None, &body),
    ))
}

#[derive(Deserialize)]
pub struct LinkForm {
    token: String,
}

/// Spends a link and starts a session.
pub async fn with_link(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<LinkForm>,
) -> Result<Response, ConsoleError> {
    // Another site must not sign a browser in as someone else.
    same_site(&headers, &console.root)?;
    let caller = console
        .sessions
        .take_link(&form.token)
        .ok_or(ConsoleError::LinkRefused)?;
    if !crate::console::admitted(&console.engine, &caller.principal) {
        return Err(ConsoleError::NotAdmitted(caller.principal.id.clone()));
    }
    tracing::info!(principal = %caller.principal.id, "web console sign-in with a one-time link");
    let (id, _) = console.sessions.start(caller).map_err(full)?;
    Ok(see_other("/", Some(set_cookie(&id))))
}

fn full(e: SessionsFull) -> ConsoleError {
    ConsoleError::Status(tonic::Status::resource_exhausted(e.to_string()))
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: Option<String>,
}

/// Ends the session.
pub async fn logout(
    State(console): State<Arc<Console>>,
    user: User,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ConsoleError> {
    user.check_form(&headers, form.csrf.as_deref())?;
    if let Some(id) = cookie_value(&headers) {
        console.sessions.end(&id);
    }
    Ok(see_other("/login", Some(clear_cookie())))
}
