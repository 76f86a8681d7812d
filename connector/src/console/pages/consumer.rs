//! What a consumer sees of itself: the offers made to it, its agreements,
//! its budget and its audit records. Each page is the answer of the gRPC
//! service a CLI would ask, for the signed-in principal.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use sluice_proto::v1 as pb;
use sluice_proto::v1::agreement_service_server::AgreementService;
use sluice_proto::v1::budget_service_server::BudgetService;
use sluice_proto::v1::catalog_service_server::CatalogService;

use super::{audit, see_other, short_time};
use crate::console::calls::request;
use crate::console::chart::number;
use crate::console::html::{csrf_field, esc, table, td};
use crate::console::{Console, ConsoleError, User};
use crate::control::{AgreementDesk, Budgets, CatalogDirectory};

/// The catalog as the signed-in principal sees it, with a request form
/// under every offer that needs an agreement.
pub async fn catalog(
    State(console): State<Arc<Console>>,
    user: User,
) -> Result<Response, ConsoleError> {
    let directory = CatalogDirectory::new(console.engine.clone());
    let listed = directory
        .list_datasets(request(
            &user.session,
            pb::ListDatasetsRequest {
                page_size: 500,
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    let body = datasets(&listed.datasets, Some(&user.session.csrf));
    Ok(user.page("Catalog", &body))
}

/// Datasets with their columns and offers; with `csrf`, each offer that
/// needs an agreement has a request form.
pub fn datasets(datasets: &[pb::Dataset], csrf: Option<&str>) -> String {
    if datasets.is_empty() {
        return "<p class=\"empty\">No dataset is offered.</p>".into();
    }
    datasets
        .iter()
        .map(|d| {
            let columns: Vec<String> = d
                .columns
                .iter()
                .map(|c| {
                    format!(
                        "<tr>{}{}{}{}{}</tr>",
                        td(&c.name),
                        td(&c.data_type),
                        td(&c.classification),
                        td(&visibility(c)),
                        td(&c.tags.join(", "))
                    )
                })
                .collect();
            let offers: String = d.offers.iter().map(|o| offer(o, csrf)).collect();
            format!(
                "<section class=\"dataset\" data-dataset=\"{name}\"><h2>{name} <small>{class}</small></h2>\
                 <p>{title} — {description}</p><p>Publisher {publisher}; license {license}{unit}</p>\
                 {columns}<h3>Offers</h3>{offers}</section>",
                name = esc(&d.name),
                class = esc(&d.classification),
                title = esc(&d.title),
                description = esc(&d.description),
                publisher = esc(&d.publisher),
                license = esc(&d.license),
                unit = match d.privacy_unit.is_empty() {
                    true => String::new(),
                    false => format!("; privacy unit <code>{}</code>", esc(&d.privacy_unit)),
                },
                columns = table(
                    &format!("columns-{}", esc(&d.name)),
                    &["column", "type", "class", "use", "tags"],
                    &columns
                ),
            )
        })
        .collect()
}

fn visibility(c: &pb::Column) -> String {
    match c.mask.is_empty() {
        true => c.visibility.clone(),
        false => format!("{} ({})", c.visibility, c.mask),
    }
}

fn offer(o: &pb::Offer, csrf: Option<&str>) -> String {
    let mut terms = vec![format!("mode {}", o.mode)];
    if !o.purposes.is_empty() {
        terms.push(format!("purposes {}", o.purposes.join(", ")));
    }
    if o.min_group_size > 0 {
        terms.push(format!("groups of at least {}", o.min_group_size));
    }
    if let Some(dp) = &o.dp {
        terms.push(format!(
            "ε ≤ {} per query, budget {} per {}",
            number(dp.epsilon_per_query),
            number(dp.budget_epsilon),
            dp.budget_period
        ));
    }
    if !o.valid_until.is_empty() {
        terms.push(format!("until {}", short_time(&o.valid_until)));
    }
    let agreement = match o.agreement.as_str() {
        "" | "none" => "no agreement needed".to_string(),
        how => format!("agreement: {how}"),
    };
    let form = match (csrf, o.agreement.as_str()) {
        (Some(csrf), how) if !how.is_empty() && how != "none" => format!(
            "<form class=\"request\" method=\"post\" action=\"/agreements/request\">{csrf}\
             <input type=\"hidden\" name=\"offer\" value=\"{id}\">\
             <label>Purpose <input name=\"purpose\" value=\"{purpose}\"></label> \
             <button type=\"submit\" class=\"request\">Request an agreement</button></form>",
            csrf = csrf_field(csrf),
            id = esc(&o.id),
            purpose = esc(o.purposes.first().map(String::as_str).unwrap_or("")),
        ),
        _ => String::new(),
    };
    format!(
        "<div class=\"offer\" data-offer=\"{id}\"><p><code>{id}</code>: {terms}; {agreement}.</p>\
         <p class=\"guarantee\">{guarantee}</p>{form}</div>",
        id = esc(&o.id),
        terms = esc(&terms.join("; ")),
        agreement = esc(&agreement),
        guarantee = esc(&o.guarantee),
    )
}

#[derive(Deserialize)]
pub struct RequestForm {
    csrf: Option<String>,
    offer: String,
    #[serde(default)]
    purpose: String,
}

/// RequestAgreement, as `sluice agreements request` does.
pub async fn request_agreement(
    State(console): State<Arc<Console>>,
    user: User,
    headers: HeaderMap,
    Form(form): Form<RequestForm>,
) -> Result<Response, ConsoleError> {
    user.check_form(&headers, form.csrf.as_deref())?;
    AgreementDesk::new(console.engine.clone())
        .request_agreement(request(
            &user.session,
            pb::RequestAgreementRequest {
                offer_id: form.offer,
                purpose: form.purpose,
            },
        ))
        .await?;
    Ok(see_other("/agreements", None))
}

/// The agreements of the principal's organization (an admin sees all).
pub async fn agreements(
    State(console): State<Arc<Console>>,
    user: User,
) -> Result<Response, ConsoleError> {
    let listed = list_agreements(&console, &user).await?;
    let rows: Vec<String> = listed
        .iter()
        .map(|a| {
            format!(
                "<tr data-agreement=\"{}\">{}{}{}{}{}{}</tr>",
                esc(&a.id),
                td(&a.id),
                td(&a.offer_id),
                td(&a.purpose),
                td(&state_name(a.state)),
                td(&short_time(&a.requested_at)),
                td(&match a.expires_at.is_empty() {
                    true => String::new(),
                    false => short_time(&a.expires_at),
                }),
            )
        })
        .collect();
    let body = table(
        "my-agreements",
        &["id", "offer", "purpose", "state", "requested", "expires"],
        &rows,
    );
    Ok(user.page("My agreements", &body))
}

/// ListAgreements for the signed-in principal.
pub async fn list_agreements(
    console: &Console,
    user: &User,
) -> Result<Vec<pb::Agreement>, ConsoleError> {
    Ok(AgreementDesk::new(console.engine.clone())
        .list_agreements(request(&user.session, pb::ListAgreementsRequest::default()))
        .await?
        .into_inner()
        .agreements)
}

/// `pending`, `active`, …: the proto's name in lower case.
pub fn state_name(state: i32) -> String {
    pb::AgreementState::try_from(state)
        .map(|s| s.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| "unknown".into())
}

/// GetBudget: the organization's differential-privacy budget.
pub async fn budget(
    State(console): State<Arc<Console>>,
    user: User,
) -> Result<Response, ConsoleError> {
    let budgets = Budgets::new(console.engine.privacy().clone())
        .get_budget(request(&user.session, pb::GetBudgetRequest::default()))
        .await?
        .into_inner();
    let rows: Vec<String> = budgets
        .budgets
        .iter()
        .map(|b| {
            let limited = |v: f64| match b.unlimited {
                true => "unlimited".to_string(),
                false => number(v),
            };
            format!(
                "<tr data-dataset=\"{}\">{}{}{}{}{}{}{}</tr>",
                esc(&b.dataset),
                td(&b.dataset),
                td(&b.period),
                td(&number(b.epsilon_spent)),
                td(&limited(b.epsilon_limit)),
                td(&limited(b.epsilon_remaining)),
                td(&format!(
                    "{:e} of {}",
                    b.delta_spent,
                    limited(b.delta_limit)
                )),
                td(&b.queries.to_string()),
            )
        })
        .collect();
    let body = format!(
        "<p>Organization <strong>{}</strong>. Budgets are charged per organization, dataset and period.</p>{}",
        esc(&budgets.organization),
        table(
            "budget",
            &[
                "dataset", "period", "ε spent", "ε limit", "ε left", "δ spent", "queries"
            ],
            &rows
        )
    );
    Ok(user.page("My budget", &body))
}

/// The audit records about the principal's organization, newest first,
/// filtered as the admin's timeline is (who may read which record is
/// AuditService's rule).
pub async fn receipts(
    State(console): State<Arc<Console>>,
    user: User,
    Query(filters): Query<audit::Filters>,
) -> Result<Response, ConsoleError> {
    let body = audit::listing(&console, &user, &filters, "/receipts")?;
    Ok(user.page("My receipts", &body))
}

/// GetReceipt: one record about the principal's organization.
pub async fn receipt(
    State(console): State<Arc<Console>>,
    user: User,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    audit::record_page(&console, &user, id, "Receipt").await
}
