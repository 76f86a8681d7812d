//! Agreements for admins: pending requests (who asked, for which offer and
//! purpose) to approve or reject with a reason, active ones to revoke, and
//! the rest. Each button is the AgreementService call `sluice admin
//! agreements …` makes, audited the same way.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use sluice_proto::v1 as pb;
use sluice_proto::v1::agreement_service_server::AgreementService;

use super::consumer::{list_agreements, state_name};
use super::{see_other, short_time};
use crate::console::calls::request;
use crate::console::html::{csrf_field, esc, table, td};
use crate::console::{Admin, Console, ConsoleError};
use crate::control::AgreementDesk;

pub async fn page(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
) -> Result<Response, ConsoleError> {
    let all = list_agreements(&console, &user).await?;
    let csrf = &user.session.csrf;
    let of = |state: pb::AgreementState| all.iter().filter(move |a| a.state == state as i32);
    let pending: Vec<String> = of(pb::AgreementState::Pending)
        .map(|a| {
            row(
                a,
                &[
                    decision_form(a, "approve", "Approve", csrf),
                    decision_form(a, "reject", "Reject", csrf),
                ],
            )
        })
        .collect();
    let active: Vec<String> = of(pb::AgreementState::Active)
        .map(|a| row(a, &[decision_form(a, "revoke", "Revoke", csrf)]))
        .collect();
    let ended: Vec<String> = all
        .iter()
        .filter(|a| {
            a.state != pb::AgreementState::Pending as i32
                && a.state != pb::AgreementState::Active as i32
        })
        .map(|a| row(a, &[]))
        .collect();
    let headers = [
        "id",
        "offer",
        "organization",
        "requested by",
        "purpose",
        "state",
        "requested",
        "decided",
        "expires",
        "reason",
        "",
    ];
    let body = format!(
        "<h2>Pending requests</h2>{}<h2>Active</h2>{}<h2>Rejected, revoked and expired</h2>{}",
        table("pending", &headers, &pending),
        table("active", &headers, &active),
        table("ended", &headers, &ended),
    );
    Ok(user.page("Agreements", &body))
}

fn row(a: &pb::Agreement, actions: &[String]) -> String {
    let time = |t: &str| match t.is_empty() {
        true => String::new(),
        false => short_time(t),
    };
    let decided = match a.decided_by.is_empty() {
        true => String::new(),
        false => format!("{} by {}", time(&a.decided_at), a.decided_by),
    };
    format!(
        "<tr data-agreement=\"{}\">{}{}{}{}{}{}{}{}{}{}<td>{}</td></tr>",
        esc(&a.id),
        td(&a.id),
        td(&a.offer_id),
        td(&a.organization),
        td(&a.requested_by),
        td(&a.purpose),
        td(&state_name(a.state)),
        td(&time(&a.requested_at)),
        td(&decided),
        td(&time(&a.expires_at)),
        td(&a.reason),
        actions.concat(),
    )
}

fn decision_form(a: &pb::Agreement, verb: &str, label: &str, csrf: &str) -> String {
    format!(
        "<form class=\"{verb}\" method=\"post\" action=\"/admin/agreements/{id}/{verb}\">{csrf}\
         <input name=\"reason\" placeholder=\"reason\" aria-label=\"reason\"> \
         <button type=\"submit\" class=\"{verb}\">{label}</button></form>",
        id = crate::console::html::url_part(&a.id),
        csrf = csrf_field(csrf),
    )
}

#[derive(Deserialize)]
pub struct DecisionForm {
    csrf: Option<String>,
    #[serde(default)]
    reason: String,
}

/// Approve, reject or revoke: the AgreementService call of that name.
pub async fn decide(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
    headers: HeaderMap,
    Path((id, verb)): Path<(String, String)>,
    Form(form): Form<DecisionForm>,
) -> Result<Response, ConsoleError> {
    user.check_form(&headers, form.csrf.as_deref())?;
    let desk = AgreementDesk::new(console.engine.clone());
    let ask = request(
        &user.session,
        pb::DecideAgreementRequest {
            id,
            reason: form.reason,
        },
    );
    match verb.as_str() {
        "approve" => desk.approve_agreement(ask).await?,
        "reject" => desk.reject_agreement(ask).await?,
        "revoke" => desk.revoke_agreement(ask).await?,
        other => {
            return Err(ConsoleError::NotFound(format!(
                "no action `{other}`; use approve, reject or revoke"
            )));
        }
    };
    Ok(see_other("/admin/agreements", None))
}
