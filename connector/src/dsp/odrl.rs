//! The caller's view of the usage policy as a DSP catalog: each dataset a
//! `Dataset`, each consumer entry granting it an ODRL `Offer` whose
//! constraints say what the grant says, and one distribution: Flight SQL
//! pull from this connector's Flight SQL endpoint.
//!
//! Standard ODRL left operands where ODRL has one (`purpose`, `dateTime`,
//! `elapsedTime`); Sluice's own terms under [`SLUICE`] for the rest
//! (docs/dsp.md lists them). Numbers are strings: the 2025-1 schema allows
//! no JSON number as a right operand.

use chrono::SecondsFormat;
use serde_json::{Value, json};
use sluice_policy::offers::{CatalogEntry, Offer};

use super::wire::CONTEXT;

/// The namespace of Sluice's own ODRL terms.
pub const SLUICE: &str = "https://w3id.org/sluice/odrl/";

/// The distribution format: pull over Arrow Flight SQL.
pub const FLIGHT_SQL_PULL: &str = "ArrowFlightSQL-PULL";

/// The `endpointType` of the data address a transfer starts with.
pub const FLIGHT_SQL_ENDPOINT: &str = "https://arrow.apache.org/docs/format/FlightSql.html";

/// Where the catalog's services are.
pub struct Endpoints<'a> {
    /// The DSP base URL (`…/dsp/2025-1`), the `DataService` negotiations go to.
    pub dsp: &'a str,
    /// `grpc+tls://HOST:PORT`.
    pub flight_sql: &'a str,
    /// This connector's participant id (`participantId`, `assigner`).
    pub participant: &'a str,
}

fn term(name: &str) -> String {
    format!("{SLUICE}{name}")
}

fn constraint(left: &str, operator: &str, right: impl Into<Value>) -> Value {
    json!({"leftOperand": left, "operator": operator, "rightOperand": right.into()})
}

/// An offer's permission: `use`, under constraints that restate the grant.
pub fn permission(offer: &Offer) -> Value {
    let mut constraints = Vec::new();
    if !offer.purposes.is_empty() {
        constraints.push(constraint("purpose", "isAnyOf", offer.purposes.clone()));
    }
    if let Some(from) = offer.valid_from {
        let at = from.to_rfc3339_opts(SecondsFormat::Secs, true);
        constraints.push(constraint("dateTime", "gteq", at));
    }
    if let Some(until) = offer.valid_until {
        let at = until.to_rfc3339_opts(SecondsFormat::Secs, true);
        constraints.push(constraint("dateTime", "lteq", at));
    }
    if let Some(days) = offer.agreement.as_ref().and_then(|a| a.valid_for_days) {
        constraints.push(constraint("elapsedTime", "lteq", format!("P{days}D")));
    }
    constraints.push(constraint(&term("release"), "eq", offer.mode.to_string()));
    if let Some(k) = offer.min_group_size {
        constraints.push(constraint(&term("minGroupSize"), "gteq", k.to_string()));
    }
    if let Some(rows) = offer.max_rows {
        constraints.push(constraint(
            &term("maxRowsPerQuery"),
            "lteq",
            rows.to_string(),
        ));
    }
    if let Some(dp) = &offer.dp {
        constraints.push(constraint(
            &term("epsilonPerQuery"),
            "lteq",
            dp.epsilon_cap.to_string(),
        ));
        constraints.push(constraint(
            &term("noise"),
            "eq",
            format!("{:?}", dp.noise).to_lowercase(),
        ));
        if let Some(budget) = &dp.budget {
            constraints.push(constraint(
                &term("epsilonBudget"),
                "lteq",
                budget.epsilon.to_string(),
            ));
            constraints.push(constraint(
                &term("deltaBudget"),
                "lteq",
                budget.delta.to_string(),
            ));
            constraints.push(constraint(
                &term("budgetPeriod"),
                "eq",
                budget.period.to_string(),
            ));
        }
    }
    if let Some(quotas) = offer.quotas {
        if let Some(n) = quotas.queries_per_day {
            constraints.push(constraint(&term("queriesPerDay"), "lteq", n.to_string()));
        }
        if let Some(n) = quotas.rows_per_day {
            constraints.push(constraint(&term("rowsPerDay"), "lteq", n.to_string()));
        }
    }
    json!({"action": "use", "constraint": constraints})
}

/// How an agreement for the offer is approved: `automatic` (at once),
/// `manual` (a provider administrator decides) or `none` (the offer is
/// usable without one; a negotiation still ends in an automatic one).
pub fn approval(offer: &Offer) -> String {
    match &offer.agreement {
        None => "none".into(),
        Some(terms) => terms.approval.to_string(),
    }
}

/// An offer inside a catalog (no `target`: its dataset is).
pub fn catalog_offer(offer: &Offer) -> Value {
    json!({
        "@id": offer.id,
        "@type": "Offer",
        "permission": [permission(offer)],
        term("approval"): approval(offer),
    })
}

/// One dataset with its offers and its distribution.
pub fn dataset(entry: &CatalogEntry, endpoints: &Endpoints<'_>) -> Value {
    let metadata = &entry.metadata;
    let mut dataset = json!({
        "@id": entry.name,
        "@type": "Dataset",
        "hasPolicy": entry.offers.iter().map(catalog_offer).collect::<Vec<_>>(),
        "distribution": [{
            "@type": "Distribution",
            "format": FLIGHT_SQL_PULL,
            "accessService": {
                "@id": "urn:sluice:flight-sql",
                "@type": "DataService",
                "endpointURL": endpoints.flight_sql,
                "endpointDescription": "Arrow Flight SQL over mTLS: the query runs at the provider under the agreement's usage policy; send the transfer's token as `authorization: Bearer <token>`",
            },
        }],
        term("classification"): entry.classification.to_string(),
    });
    let fields = [
        ("title", metadata.title.clone().map(Value::from)),
        ("description", metadata.description.clone().map(Value::from)),
        ("publisher", metadata.publisher.clone().map(Value::from)),
        ("license", metadata.license.clone().map(Value::from)),
        (
            "keyword",
            (!metadata.keywords.is_empty()).then(|| Value::from(metadata.keywords.clone())),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            dataset[name] = value;
        }
    }
    dataset
}

/// The root `Catalog` of the datasets `entries` (the caller's).
pub fn catalog(entries: &[CatalogEntry], endpoints: &Endpoints<'_>) -> Value {
    let mut catalog = json!({
        "@context": [CONTEXT],
        "@id": format!("{}#catalog", endpoints.dsp),
        "@type": "Catalog",
        "participantId": endpoints.participant,
        "service": [{
            "@id": "urn:sluice:dsp",
            "@type": "DataService",
            "endpointURL": endpoints.dsp,
        }],
    });
    // An empty list is not valid (minItems 1): no datasets, no key.
    if !entries.is_empty() {
        catalog["dataset"] = entries.iter().map(|e| dataset(e, endpoints)).collect();
    }
    catalog
}

/// A root `Dataset` (`GET /catalog/datasets/:id`).
pub fn root_dataset(entry: &CatalogEntry, endpoints: &Endpoints<'_>) -> Value {
    let mut dataset = dataset(entry, endpoints);
    dataset["@context"] = json!([CONTEXT]);
    dataset
}

/// The agreement a negotiation ends in: the offer's permission, for one
/// consumer, one dataset and one purpose.
pub fn agreement(
    agreement_id: &str,
    offer: &Offer,
    purpose: &str,
    assigner: &str,
    assignee: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Value {
    let mut permission = permission(offer);
    // The agreement's purpose, where the offer listed several.
    if let Some(constraints) = permission["constraint"].as_array_mut() {
        constraints.retain(|c| c["leftOperand"] != "purpose");
        constraints.insert(0, constraint("purpose", "eq", purpose));
    }
    json!({
        "@id": agreement_id,
        "@type": "Agreement",
        "target": offer.dataset,
        "assigner": assigner,
        "assignee": assignee,
        "timestamp": at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "permission": [permission],
    })
}

/// Longest purpose a contract request may state.
const MAX_PURPOSE_CHARS: usize = 256;

/// A contract request that does not say which purpose it is for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PurposeUnstated(String);

/// The purpose an offer in a contract request asks for: a `purpose`
/// constraint `eq` (or `isAnyOf` with one value) in its permission, else
/// the offer's only purpose. `Err` says what to send.
pub fn requested_purpose(requested: &Value, offer: &Offer) -> Result<String, PurposeUnstated> {
    let constraints = requested["permission"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["constraint"].as_array().into_iter().flatten());
    for c in constraints {
        if c["leftOperand"] != "purpose" {
            continue;
        }
        let chosen = match (&c["operator"], &c["rightOperand"]) {
            (op, Value::String(p)) if op == "eq" => Some(p.clone()),
            (op, Value::Array(ps)) if (op == "isAnyOf" || op == "eq") && ps.len() == 1 => {
                ps[0].as_str().map(str::to_string)
            }
            _ => None,
        };
        if let Some(purpose) = chosen.map(|p| p.trim().to_string()) {
            if purpose.is_empty() || purpose.chars().count() > MAX_PURPOSE_CHARS {
                return Err(PurposeUnstated(format!(
                    "a purpose has 1 to {MAX_PURPOSE_CHARS} characters"
                )));
            }
            return Ok(purpose);
        }
    }
    match offer.purposes.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(PurposeUnstated(
            "state the purpose of use: a permission constraint \
             {\"leftOperand\": \"purpose\", \"operator\": \"eq\", \"rightOperand\": \"…\"}"
                .into(),
        )),
        several => Err(PurposeUnstated(format!(
            "the offer allows several purposes; choose one with a permission constraint \
             {{\"leftOperand\": \"purpose\", \"operator\": \"eq\", \"rightOperand\": \"…\"}}, one of: {}",
            several.join(", ")
        ))),
    }
}
