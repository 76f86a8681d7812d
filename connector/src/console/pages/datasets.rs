//! Datasets and policy for admins: each dataset with its columns and their
//! classification, what each consumer entry of the policy may do with it,
//! the catalog as a chosen principal sees it, and a playground that runs
//! `EXPLAIN POLICY` for that principal (recorded in the admin's name).

use std::sync::Arc;

use axum::Form;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use serde::Deserialize;
use sluice_policy::compile::{ConsumerRules, DatasetGrant, PolicySet};
use sluice_policy::document::{ColumnClass, Matcher};
use sluice_policy::{Principal, QueryContext};

use super::consumer;
use crate::console::error::error_paragraph;
use crate::console::html::{csrf_field, esc, table, td, url_part};
use crate::console::{Admin, Console, ConsoleError, User};
use crate::control::CatalogDirectory;

/// Whom to see the catalog as, and what to explain.
#[derive(Debug, Default, Deserialize)]
pub struct Subject {
    /// A SAN URI (`spiffe://…`) or any principal id.
    #[serde(default)]
    principal: String,
    #[serde(default)]
    organization: String,
    #[serde(default)]
    sql: String,
    #[serde(default)]
    purpose: String,
    /// On the POST that explains.
    csrf: Option<String>,
}

impl Subject {
    /// The principal a certificate with this SAN URI and organization
    /// would name.
    fn principal(&self) -> Option<Principal> {
        let id = self.principal.trim();
        if id.is_empty() {
            return None;
        }
        let mut principal = Principal::new(id);
        if id.contains("://") {
            principal.san_uris = vec![id.to_string()];
        }
        let organization = self.organization.trim();
        principal.organization = (!organization.is_empty()).then(|| organization.to_string());
        Some(principal)
    }

    /// Showing a catalog reads; explaining is recorded (in the admin's
    /// name), so it is a POST with the CSRF token.
    fn form(&self, csrf: &str) -> String {
        format!(
            "<form id=\"subject\" method=\"post\" action=\"/admin/datasets\">{csrf}\
             <label>Principal (SAN URI) <input name=\"principal\" size=\"50\" value=\"{p}\" placeholder=\"spiffe://sluice.demo/org/city-research\"></label> \
             <label>Organization (O) <input name=\"organization\" value=\"{o}\" placeholder=\"City Research Institute\"></label><br>\
             <label>SQL for EXPLAIN POLICY <textarea name=\"sql\" rows=\"3\" cols=\"80\">{sql}</textarea></label><br>\
             <label>Purpose <input name=\"purpose\" value=\"{purpose}\"></label> \
             <button type=\"submit\" id=\"explain\">Show catalog and explain</button></form>",
            csrf = csrf_field(csrf),
            p = esc(&self.principal),
            o = esc(&self.organization),
            sql = esc(&self.sql),
            purpose = esc(&self.purpose),
        )
    }
}

/// The page, with the catalog as `?principal=…&organization=…` sees it.
pub async fn page(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
    Query(mut subject): Query<Subject>,
) -> Result<Response, ConsoleError> {
    // A link cannot explain: that takes the form.
    subject.sql.clear();
    render(&console, &user, &subject).await
}

/// The page with the catalog as the form's principal sees it and the
/// explanation of its SQL.
pub async fn explain(
    State(console): State<Arc<Console>>,
    Admin(user): Admin,
    headers: HeaderMap,
    Form(subject): Form<Subject>,
) -> Result<Response, ConsoleError> {
    user.check_form(&headers, subject.csrf.as_deref())?;
    render(&console, &user, &subject).await
}

async fn render(
    console: &Arc<Console>,
    user: &User,
    subject: &Subject,
) -> Result<Response, ConsoleError> {
    let gate = console.engine.policy().current();
    let Some(policy) = gate.policy_set() else {
        let body = error_paragraph(
            "no usage policy is loaded: every query is refused until [policy] file is set",
        );
        return Ok(user.page("Datasets and policy", &body));
    };
    let seen_as = match subject.principal() {
        Some(principal) => {
            tracing::info!(admin = %user.principal().id, seen_as = %principal.id, explain = !subject.sql.trim().is_empty(), "web console: catalog and EXPLAIN POLICY as another principal");
            seen_by(console, user, subject, principal).await
        }
        None => {
            "<p>Name a principal to see the catalog as it does and to explain a query for it.</p>"
                .to_string()
        }
    };
    let body = format!(
        "<p>Usage policy in force: <code id=\"policy-version\">{version}</code>.</p>\
         <h2>Datasets</h2>{datasets}<h2>What each consumer may do</h2>{grants}\
         <h2>As a consumer sees it</h2>{recent}{form}{seen_as}",
        version = esc(policy.version()),
        datasets = datasets(policy),
        grants = grants(policy),
        recent = recent_principals(console),
        form = subject.form(&user.session.csrf),
    );
    Ok(user.page("Datasets and policy", &body))
}

fn datasets(policy: &PolicySet) -> String {
    policy
        .datasets()
        .map(|d| {
            let rows: Vec<String> = d
                .schema
                .fields()
                .iter()
                .map(|f| {
                    format!(
                        "<tr>{}{}{}</tr>",
                        td(f.name()),
                        td(&f.data_type().to_string()),
                        td(&classification(&d.class_of(f.name()))),
                    )
                })
                .collect();
            format!(
                "<section class=\"dataset\" data-dataset=\"{name}\"><h3>{name}</h3><p>{title}{unit}</p>{table}</section>",
                name = esc(&d.name),
                title = esc(d.metadata.title.as_deref().unwrap_or("")),
                unit = match &d.privacy_unit {
                    Some(u) => format!(" — privacy unit <code>{}</code>", esc(u)),
                    None => String::new(),
                },
                table = table(
                    &format!("dataset-{}", esc(&d.name)),
                    &["column", "type", "classification"],
                    &rows
                ),
            )
        })
        .collect()
}

/// `important (personal)`: the class and its tags.
fn classification(c: &ColumnClass) -> String {
    match c.tags.is_empty() {
        true => c.class.to_string(),
        false => {
            let tags: Vec<String> = c.tags.iter().map(|t| t.to_string()).collect();
            format!("{} ({})", c.class, tags.join(", "))
        }
    }
}

/// Whom a consumer entry matches, as the policy file says it.
fn who(m: &Matcher) -> String {
    let parts: Vec<String> = [
        ("organization", &m.organization),
        ("san_uri", &m.san_uri),
        ("common_name", &m.common_name),
        ("group", &m.group),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}: {v}")))
    .collect();
    parts.join(", ")
}

fn grants(policy: &PolicySet) -> String {
    let rows: Vec<String> = policy
        .consumers()
        .iter()
        .flat_map(|c| {
            c.grants
                .iter()
                .map(move |(dataset, g)| grant_row(c, dataset, g))
        })
        .collect();
    table(
        "grants",
        &[
            "consumer",
            "matches",
            "dataset",
            "release",
            "columns",
            "purposes",
            "agreement",
        ],
        &rows,
    )
}

fn grant_row(c: &ConsumerRules, dataset: &str, g: &DatasetGrant) -> String {
    let release = match (&g.dp, g.min_group_size) {
        (Some(dp), _) => format!("differentially private (ε ≤ {} per query)", dp.epsilon_cap),
        (None, Some(k)) if g.rows_allowed => format!("rows, or aggregates over ≥ {k}"),
        (None, Some(k)) => format!("aggregates over groups of ≥ {k}"),
        (None, None) => "rows".to_string(),
    };
    let columns: Vec<String> = g
        .columns
        .iter()
        .map(|(name, visibility)| format!("{name}: {visibility}"))
        .collect();
    let purposes = match &g.purposes {
        None => "any".to_string(),
        Some(set) => set.iter().cloned().collect::<Vec<_>>().join(", "),
    };
    let agreement = match g.agreements.is_empty() {
        true => "none".to_string(),
        false => g
            .agreements
            .iter()
            .map(|a| a.offer.clone())
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!(
        "<tr>{}{}{}{}{}{}{}</tr>",
        td(&c.name),
        td(&who(&c.matcher)),
        td(dataset),
        td(&release),
        td(&columns.join("; ")),
        td(&purposes),
        td(&agreement),
    )
}

/// Principals seen in the newest audit records, as links that fill the
/// form: the consumers whose view an admin most likely wants.
fn recent_principals(console: &Console) -> String {
    const LOOK_BACK: u64 = 10_000;
    let Some(log) = console.engine.audit().log() else {
        return String::new();
    };
    let from = log.head().records.saturating_sub(LOOK_BACK);
    let Ok((records, _)) =
        crate::blocking::blocking(|| log.scan(from, usize::MAX, |r| r.record.entry.via.is_none()))
    else {
        return String::new();
    };
    let seen: std::collections::BTreeSet<(String, String)> = records
        .iter()
        .map(|r| {
            let e = &r.record.entry;
            // The organization key is the principal id when there is no O.
            let organization = e.organization.clone().filter(|o| o != &e.principal);
            (e.principal.clone(), organization.unwrap_or_default())
        })
        .collect();
    if seen.is_empty() {
        return String::new();
    }
    let links: Vec<String> = seen
        .iter()
        .map(|(principal, organization)| {
            format!(
                "<li><a class=\"see-as\" href=\"/admin/datasets?principal={}&amp;organization={}\">{}{}</a></li>",
                esc(&url_part(principal)),
                esc(&url_part(organization)),
                esc(principal),
                match organization.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", esc(organization)),
                },
            )
        })
        .collect();
    format!(
        "<p>Principals in the newest audit records:</p><ul id=\"recent-principals\">{}</ul>",
        links.concat()
    )
}

/// The catalog as `principal` sees it and, with SQL, the explanation.
async fn seen_by(
    console: &Arc<Console>,
    user: &User,
    subject: &Subject,
    principal: Principal,
) -> String {
    let catalog = CatalogDirectory::new(console.engine.clone()).visible(&principal);
    let mut out = format!(
        "<div id=\"catalog-as\"><h3>Catalog of {}</h3>{}</div>",
        esc(&principal.id),
        consumer::datasets(&catalog, None)
    );
    if subject.sql.trim().is_empty() {
        return out;
    }
    let mut context = QueryContext::new(principal);
    let purpose = subject.purpose.trim();
    context.purpose = (!purpose.is_empty()).then(|| purpose.to_string());
    let explained = console
        .engine
        .explain_as(user.principal(), context, subject.sql.clone())
        .await;
    out.push_str("<h3>EXPLAIN POLICY</h3>");
    out.push_str(&match explained {
        Ok(batches) => explanation(&batches),
        Err(e) => error_paragraph(tonic::Status::from(e).message()),
    });
    out
}

/// The one-row explanation as a definition list (`dl#explanation`).
fn explanation(batches: &[RecordBatch]) -> String {
    let mut out = String::from("<dl id=\"explanation\">");
    for batch in batches.iter().filter(|b| b.num_rows() > 0) {
        for (i, field) in batch.schema().fields().iter().enumerate() {
            let value = array_value_to_string(batch.column(i), 0).unwrap_or_default();
            out.push_str(&format!(
                "<dt>{}</dt><dd><pre>{}</pre></dd>",
                esc(field.name()),
                esc(&value)
            ));
        }
    }
    out.push_str("</dl>");
    out
}
