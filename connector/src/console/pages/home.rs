//! The first page after signing in: who you are and where to go.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use crate::console::html::esc;
use crate::console::{Console, User};

pub async fn page(State(console): State<Arc<Console>>, user: User) -> Response {
    let principal = user.principal();
    let organization = principal.organization.as_deref().unwrap_or("(none)");
    let role = match user.admin {
        true => "a provider admin (listed under <code>admins:</code> in the usage policy)",
        false => "a consumer",
    };
    let admin_links = match user.admin {
        true => {
            "<li><a href=\"/admin/agreements\">Agreements</a>: pending requests, approve, reject, revoke</li>\
                 <li><a href=\"/admin/audit\">Audit trail</a>: who saw what, when, under which contract</li>\
                 <li><a href=\"/admin/budgets\">Budgets</a>: privacy budget spent over time, quotas per day</li>\
                 <li><a href=\"/admin/datasets\">Datasets &amp; policy</a>: what each consumer may do, EXPLAIN POLICY</li>"
        }
        false => "",
    };
    let body = format!(
        "<p>Signed in as <strong id=\"whoami\">{id}</strong> (organization {org}), {role}.</p>\
         <p>Usage policy in force: <code id=\"policy-version\">{version}</code>.</p>\
         <ul>{admin_links}\
         <li><a href=\"/catalog\">Catalog</a>: the offers made to you; request an agreement</li>\
         <li><a href=\"/agreements\">My agreements</a></li>\
         <li><a href=\"/budget\">My budget</a>: differential-privacy budget left</li>\
         <li><a href=\"/receipts\">My receipts</a>: the audit records about your organization</li>\
         <li><a href=\"/workbench\">Workbench</a>: run SQL; see noisy answers with their 95% intervals</li></ul>",
        id = esc(&principal.id),
        org = esc(organization),
        version = esc(&console.engine.policy_version()),
    );
    user.page("Sluice console", &body)
}
