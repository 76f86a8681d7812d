//! The structure of every DSP 2025-1 message, written from the
//! specification's JSON Schemas (`artifacts/src/main/resources/**` at tag
//! `2025-1-err1` of eclipse-dataspace-protocol-base/DataspaceProtocol), and
//! checked on every message either side receives.
//!
//! Each message is a [`Shape`]: its `@type`, required and optional fields
//! and their JSON types, nested shapes, and the schemas' `oneOf`/`not`
//! rules (an initial request carries `callbackAddress` and no `providerPid`;
//! an offer in a catalog has no `target`). Unknown fields are allowed, as
//! the schemas allow them. A violation names the field's path, so the
//! sender learns what to fix.

use serde_json::Value;

/// The JSON-LD context every message carries (as an array of strings).
pub const CONTEXT: &str = "https://w3id.org/dspace/2025/1/context.jsonld";

/// A message that does not have the structure its schema defines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}: {path}: {reason}")]
pub struct Violation {
    /// The message type that was expected (its `@type`).
    pub message: &'static str,
    /// Where in the message, e.g. `offer.permission[0].action`.
    pub path: String,
    pub reason: String,
}

/// The message types of the protocol, with the schema each follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    CatalogRequestMessage,
    Catalog,
    Dataset,
    CatalogError,
    ContractRequestMessage,
    ContractOfferMessage,
    ContractAgreementMessage,
    ContractAgreementVerificationMessage,
    ContractNegotiationEventMessage,
    ContractNegotiationTerminationMessage,
    ContractNegotiation,
    ContractNegotiationError,
    TransferRequestMessage,
    TransferStartMessage,
    TransferSuspensionMessage,
    TransferCompletionMessage,
    TransferTerminationMessage,
    TransferProcess,
    TransferError,
}

impl Message {
    pub fn name(self) -> &'static str {
        match self {
            Message::CatalogRequestMessage => "CatalogRequestMessage",
            Message::Catalog => "Catalog",
            Message::Dataset => "Dataset",
            Message::CatalogError => "CatalogError",
            Message::ContractRequestMessage => "ContractRequestMessage",
            Message::ContractOfferMessage => "ContractOfferMessage",
            Message::ContractAgreementMessage => "ContractAgreementMessage",
            Message::ContractAgreementVerificationMessage => "ContractAgreementVerificationMessage",
            Message::ContractNegotiationEventMessage => "ContractNegotiationEventMessage",
            Message::ContractNegotiationTerminationMessage => {
                "ContractNegotiationTerminationMessage"
            }
            Message::ContractNegotiation => "ContractNegotiation",
            Message::ContractNegotiationError => "ContractNegotiationError",
            Message::TransferRequestMessage => "TransferRequestMessage",
            Message::TransferStartMessage => "TransferStartMessage",
            Message::TransferSuspensionMessage => "TransferSuspensionMessage",
            Message::TransferCompletionMessage => "TransferCompletionMessage",
            Message::TransferTerminationMessage => "TransferTerminationMessage",
            Message::TransferProcess => "TransferProcess",
            Message::TransferError => "TransferError",
        }
    }

    /// Every message type, for tests that check them all.
    pub const ALL: [Message; 19] = [
        Message::CatalogRequestMessage,
        Message::Catalog,
        Message::Dataset,
        Message::CatalogError,
        Message::ContractRequestMessage,
        Message::ContractOfferMessage,
        Message::ContractAgreementMessage,
        Message::ContractAgreementVerificationMessage,
        Message::ContractNegotiationEventMessage,
        Message::ContractNegotiationTerminationMessage,
        Message::ContractNegotiation,
        Message::ContractNegotiationError,
        Message::TransferRequestMessage,
        Message::TransferStartMessage,
        Message::TransferSuspensionMessage,
        Message::TransferCompletionMessage,
        Message::TransferTerminationMessage,
        Message::TransferProcess,
        Message::TransferError,
    ];

    /// The message type named by `@type`, if it is one of the protocol's.
    pub fn named(name: &str) -> Option<Message> {
        Message::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Checks `value` against this message's schema.
    pub fn check(self, value: &Value) -> Result<(), Violation> {
        let mut checker = Checker {
            message: self.name(),
            path: Vec::new(),
        };
        checker.context(value)?;
        checker.typed(value, self.name())?;
        match self {
            Message::CatalogRequestMessage => checker.optional(value, "filter", Checker::array_any),
            Message::Catalog => checker.catalog(value, true),
            Message::Dataset => checker.dataset(value),
            Message::CatalogError => {
                checker.optional(value, "code", Checker::string)?;
                checker.optional(value, "reason", Checker::array_any)
            }
            Message::ContractRequestMessage => {
                checker.pids(value, &["consumerPid"])?;
                checker.one_of_callback_or(value, "providerPid")?;
                checker.required(value, "offer", |c, v| c.message_offer(v, false))
            }
            Message::ContractOfferMessage => {
                checker.pids(value, &["providerPid"])?;
                checker.one_of_callback_or(value, "consumerPid")?;
                checker.required(value, "offer", |c, v| c.message_offer(v, true))
            }
            Message::ContractAgreementMessage => {
                checker.pids(value, &["providerPid", "consumerPid"])?;
                checker.required(value, "agreement", Checker::agreement)
            }
            Message::ContractAgreementVerificationMessage | Message::TransferCompletionMessage => {
                checker.pids(value, &["providerPid", "consumerPid"])
            }
            Message::ContractNegotiationEventMessage => {
                checker.pids(value, &["providerPid", "consumerPid"])?;
                checker.required(value, "eventType", |c, v| {
                    c.one_of_strings(v, &["ACCEPTED", "FINALIZED"])
                })
            }
            Message::ContractNegotiationTerminationMessage
            | Message::ContractNegotiationError
            | Message::TransferSuspensionMessage
            | Message::TransferTerminationMessage
            | Message::TransferError => {
                checker.pids(value, &["providerPid", "consumerPid"])?;
                checker.optional(value, "code", Checker::string)?;
                checker.optional(value, "reason", Checker::non_empty_array)
            }
            Message::ContractNegotiation => {
                checker.pids(value, &["providerPid", "consumerPid"])?;
                checker.required(value, "state", |c, v| {
                    c.one_of_strings(
                        v,
                        &[
                            "REQUESTED",
                            "OFFERED",
                            "ACCEPTED",
                            "AGREED",
                            "VERIFIED",
                            "FINALIZED",
                            "TERMINATED",
                        ],
                    )
                })
            }
            Message::TransferRequestMessage => {
                checker.pids(
                    value,
                    &["consumerPid", "agreementId", "format", "callbackAddress"],
                )?;
                checker.optional(value, "dataAddress", Checker::data_address)
            }
            Message::TransferStartMessage => {
                checker.pids(value, &["providerPid", "consumerPid"])?;
                checker.optional(value, "dataAddress", Checker::data_address)
            }
            Message::TransferProcess => {
                checker.pids(value, &["providerPid", "consumerPid"])?;
                checker.required(value, "state", |c, v| {
                    c.one_of_strings(
                        v,
                        &[
                            "REQUESTED",
                            "STARTED",
                            "TERMINATED",
                            "COMPLETED",
                            "SUSPENDED",
                        ],
                    )
                })
            }
        }
    }
}

/// Checks the body of `GET /.well-known/dspace-version` (plain JSON, no
/// context: `common/protocol-version-schema.json`).
pub fn check_versions(value: &Value) -> Result<(), Violation> {
    let mut c = Checker {
        message: "VersionResponse",
        path: Vec::new(),
    };
    c.object(value)?;
    c.required(value, "protocolVersions", |c, list| {
        c.non_empty_array(list)?;
        c.each(list, |c, version| {
            c.object(version)?;
            c.required(version, "version", Checker::string)?;
            c.required(version, "path", Checker::string)?;
            c.required(version, "binding", |c, v| c.one_of_strings(v, &["HTTPS"]))?;
            c.optional(version, "identifierType", Checker::string)?;
            c.optional(version, "serviceId", Checker::string)?;
            c.optional(version, "auth", |c, auth| {
                c.object(auth)?;
                c.required(auth, "protocol", Checker::string)?;
                c.required(auth, "version", Checker::string)?;
                c.optional(auth, "profile", |c, p| c.each(p, Checker::string))
            })
        })
    })
}

struct Checker {
    message: &'static str,
    path: Vec<String>,
}

impl Checker {
    fn fail(&self, reason: impl Into<String>) -> Violation {
        Violation {
            message: self.message,
            path: match self.path.is_empty() {
                true => "(the message)".into(),
                false => self.path.concat().trim_start_matches('.').to_string(),
            },
            reason: reason.into(),
        }
    }

    fn at<T>(
        &mut self,
        segment: String,
        check: impl FnOnce(&mut Self) -> Result<T, Violation>,
    ) -> Result<T, Violation> {
        self.path.push(segment);
        let result = check(self);
        self.path.pop();
        result
    }

    fn object(&mut self, value: &Value) -> Result<(), Violation> {
        match value.is_object() {
            true => Ok(()),
            false => Err(self.fail(format!("must be a JSON object, not {}", kind(value)))),
        }
    }

    /// `@context`: an array of strings holding the 2025-1 context
    /// (`common/context-schema.json`; a bare string is not valid).
    fn context(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.required(value, "@context", |c, context| {
            let Some(items) = context.as_array() else {
                return Err(c.fail(format!(
                    "must be an array of strings holding \"{CONTEXT}\", not {}",
                    kind(context)
                )));
            };
            c.each(context, Checker::string)?;
            match items.iter().any(|i| i == CONTEXT) {
                true => Ok(()),
                false => Err(c.fail(format!("must hold \"{CONTEXT}\""))),
            }
        })
    }

    fn typed(&mut self, value: &Value, name: &str) -> Result<(), Violation> {
        self.required(value, "@type", |c, t| c.constant(t, name))
    }

    fn constant(&mut self, value: &Value, expected: &str) -> Result<(), Violation> {
        match value.as_str() {
            Some(s) if s == expected => Ok(()),
            _ => Err(self.fail(format!("must be \"{expected}\", not {}", short(value)))),
        }
    }

    fn required(
        &mut self,
        value: &Value,
        field: &str,
        check: impl FnOnce(&mut Self, &Value) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        match value.get(field) {
            Some(inner) => self.at(format!(".{field}"), |c| check(c, inner)),
            None => Err(self.fail(format!("`{field}` is required"))),
        }
    }

    fn optional(
        &mut self,
        value: &Value,
        field: &str,
        check: impl FnOnce(&mut Self, &Value) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        match value.get(field) {
            Some(inner) => self.at(format!(".{field}"), |c| check(c, inner)),
            None => Ok(()),
        }
    }

    /// Required string fields (process ids, `agreementId`, `format`, …).
    fn pids(&mut self, value: &Value, fields: &[&str]) -> Result<(), Violation> {
        for field in fields {
            self.required(value, field, Checker::string)?;
        }
        Ok(())
    }

    /// The schemas' `oneOf`: an initial message carries `callbackAddress`
    /// and not the other side's id; a later one the id and no address.
    fn one_of_callback_or(&mut self, value: &Value, pid: &str) -> Result<(), Violation> {
        self.optional(value, "callbackAddress", Checker::string)?;
        self.optional(value, pid, Checker::string)?;
        match (value.get("callbackAddress"), value.get(pid)) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            (Some(_), Some(_)) => Err(self.fail(format!(
                "carries both `callbackAddress` and `{pid}`: the first message of a process has \
                 the callback address, later ones the other side's `{pid}`"
            ))),
            (None, None) => Err(self.fail(format!(
                "needs `callbackAddress` (a first message) or `{pid}` (a later one)"
            ))),
        }
    }

    fn string(&mut self, value: &Value) -> Result<(), Violation> {
        match value.is_string() {
            true => Ok(()),
            false => Err(self.fail(format!("must be a string, not {}", kind(value)))),
        }
    }

    fn one_of_strings(&mut self, value: &Value, allowed: &[&str]) -> Result<(), Violation> {
        match value.as_str() {
            Some(s) if allowed.contains(&s) => Ok(()),
            _ => Err(self.fail(format!(
                "must be one of {}, not {}",
                allowed.join(", "),
                short(value)
            ))),
        }
    }

    fn array_any(&mut self, value: &Value) -> Result<(), Violation> {
        match value.is_array() {
            true => Ok(()),
            false => Err(self.fail(format!("must be an array, not {}", kind(value)))),
        }
    }

    fn non_empty_array(&mut self, value: &Value) -> Result<(), Violation> {
        match value.as_array() {
            Some(items) if !items.is_empty() => Ok(()),
            Some(_) => Err(self.fail("must hold at least one item")),
            None => Err(self.fail(format!("must be an array, not {}", kind(value)))),
        }
    }

    fn each(
        &mut self,
        value: &Value,
        check: impl Fn(&mut Self, &Value) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        self.array_any(value)?;
        for (i, item) in value.as_array().into_iter().flatten().enumerate() {
            self.at(format!("[{i}]"), |c| check(c, item))?;
        }
        Ok(())
    }

    /// A non-empty array whose items pass `check`.
    fn list_of(
        &mut self,
        value: &Value,
        check: impl Fn(&mut Self, &Value) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        self.non_empty_array(value)?;
        self.each(value, check)
    }

    /// `catalog/catalog-schema.json`: a Catalog (the root one also has
    /// `@context` and `participantId`); never `hasPolicy`.
    fn catalog(&mut self, value: &Value, root: bool) -> Result<(), Violation> {
        self.object(value)?;
        self.typed(value, "Catalog")?;
        self.required(value, "@id", Checker::string)?;
        if root {
            self.required(value, "participantId", Checker::string)?;
        }
        if value.get("hasPolicy").is_some() {
            return Err(self.fail("a Catalog has no `hasPolicy`; offers belong to its datasets"));
        }
        self.optional(value, "dataset", |c, v| c.list_of(v, Checker::dataset_item))?;
        self.optional(value, "catalog", |c, v| {
            c.list_of(v, |c, v| c.catalog(v, false))
        })?;
        self.optional(value, "service", |c, v| c.list_of(v, Checker::data_service))?;
        self.optional(value, "distribution", |c, v| {
            c.list_of(v, Checker::distribution)
        })
    }

    /// A root Dataset (`GET /catalog/datasets/:id`).
    fn dataset(&mut self, value: &Value) -> Result<(), Violation> {
        self.dataset_item(value)
    }

    /// `dataset-schema.json#/definitions/Dataset`.
    fn dataset_item(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.required(value, "@id", Checker::string)?;
        self.required(value, "hasPolicy", |c, v| {
            c.list_of(v, Checker::catalog_offer)
        })?;
        self.required(value, "distribution", |c, v| {
            c.list_of(v, Checker::distribution)
        })
    }

    fn distribution(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.required(value, "format", Checker::string)?;
        self.required(value, "accessService", |c, v| match v {
            Value::String(_) => Ok(()),
            _ => c.data_service(v),
        })?;
        self.optional(value, "hasPolicy", |c, v| {
            c.list_of(v, Checker::catalog_offer)
        })
    }

    fn data_service(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.required(value, "@id", Checker::string)?;
        self.typed(value, "DataService")?;
        self.required(value, "endpointURL", Checker::string)
    }

    /// `contract-schema.json#/definitions/PolicyClass`.
    fn policy_class(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.required(value, "@id", Checker::string)?;
        self.optional(value, "profile", |c, v| match v {
            Value::String(_) => Ok(()),
            _ => c.each(v, Checker::string),
        })?;
        self.optional(value, "permission", |c, v| c.list_of(v, Checker::rule))?;
        self.optional(value, "prohibition", |c, v| c.list_of(v, Checker::rule))?;
        self.optional(value, "obligation", |c, v| c.list_of(v, Checker::rule))?;
        if value.get("permission").is_none() && value.get("prohibition").is_none() {
            return Err(self.fail("a policy needs `permission` or `prohibition`"));
        }
        Ok(())
    }

    /// An offer inside a catalog: `@type` "Offer" if present, no `target`.
    fn catalog_offer(&mut self, value: &Value) -> Result<(), Violation> {
        self.policy_class(value)?;
        self.optional(value, "@type", |c, t| c.constant(t, "Offer"))?;
        match value.get("target") {
            Some(_) => {
                Err(self.fail("an offer in a catalog has no `target`: its dataset is the target"))
            }
            None => Ok(()),
        }
    }

    /// An offer in a negotiation message (`MessageOffer`; the offer message
    /// also requires `@id` and `target`).
    fn message_offer(&mut self, value: &Value, offer_message: bool) -> Result<(), Violation> {
        self.policy_class(value)?;
        self.typed(value, "Offer")?;
        match offer_message {
            true => self.required(value, "target", Checker::string),
            false => self.optional(value, "target", Checker::string),
        }
    }

    fn agreement(&mut self, value: &Value) -> Result<(), Violation> {
        self.policy_class(value)?;
        self.typed(value, "Agreement")?;
        self.pids(value, &["target", "assigner", "assignee"])?;
        self.optional(value, "timestamp", |c, v| {
            let text = v.as_str().unwrap_or_default();
            match chrono::DateTime::parse_from_rfc3339(text).is_ok() {
                true => Ok(()),
                false => Err(c.fail(format!("must be an xsd:dateTime, not {}", short(v)))),
            }
        })
    }

    /// A Permission, Prohibition or Duty: an `action` string and
    /// constraints.
    fn rule(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.required(value, "action", Checker::string)?;
        self.optional(value, "constraint", |c, v| c.each(v, Checker::constraint))
    }

    /// An atomic constraint (`leftOperand`, `operator`, `rightOperand`) or
    /// a logical one (exactly one of `and`, `andSequence`, `or`, `xone`).
    fn constraint(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        let logical: Vec<&str> = ["and", "andSequence", "or", "xone"]
            .into_iter()
            .filter(|k| value.get(*k).is_some())
            .collect();
        match logical.as_slice() {
            [] => {}
            [one] => return self.required(value, one, |c, v| c.each(v, Checker::constraint)),
            _ => {
                return Err(
                    self.fail("a logical constraint has exactly one of and, andSequence, or, xone")
                );
            }
        }
        self.required(value, "leftOperand", Checker::string)?;
        self.required(value, "operator", |c, v| {
            c.one_of_strings(
                v,
                &[
                    "eq",
                    "gt",
                    "gteq",
                    "hasPart",
                    "isA",
                    "isAllOf",
                    "isAnyOf",
                    "isNoneOf",
                    "isPartOf",
                    "lt",
                    "term-lteq",
                    "lteq",
                    "neq",
                ],
            )
        })?;
        self.required(value, "rightOperand", |c, v| match v {
            Value::String(_) | Value::Object(_) | Value::Array(_) => Ok(()),
            _ => Err(c.fail(format!(
                "must be a string, an object or an array, not {}",
                kind(v)
            ))),
        })
    }

    /// `transfer/data-address-schema.json`.
    fn data_address(&mut self, value: &Value) -> Result<(), Violation> {
        self.object(value)?;
        self.typed(value, "DataAddress")?;
        self.required(value, "endpointType", Checker::string)?;
        self.optional(value, "endpoint", Checker::string)?;
        self.optional(value, "endpointProperties", |c, v| {
            c.list_of(v, |c, p| {
                c.object(p)?;
                c.typed(p, "EndpointProperty")?;
                c.required(p, "name", Checker::string)?;
                c.required(p, "value", Checker::string)
            })
        })
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as an error may quote it: short strings and constants only.
fn short(value: &Value) -> String {
    match value {
        Value::String(s) if s.chars().count() <= 60 => format!("\"{s}\""),
        other => kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!([CONTEXT])
    }

    #[test]
    fn the_specifications_examples_pass() {
        let request = json!({"@context": ctx(), "@type": "ContractRequestMessage",
            "consumerPid": "urn:uuid:32541fe6", "callbackAddress": "https://example.com/callback",
            "offer": {"@type": "Offer", "@id": "urn:uuid:2828282", "target": "urn:uuid:3dd1add8",
                      "permission": [{"action": "use"}]}});
        Message::ContractRequestMessage.check(&request).unwrap();
        let agreement = json!({"@context": ctx(), "@type": "ContractAgreementMessage",
            "providerPid": "p", "consumerPid": "c",
            "agreement": {"@id": "urn:uuid:e8dc", "@type": "Agreement", "target": "urn:uuid:3dd1",
                "timestamp": "2023-01-01T01:00:00Z", "assigner": "http://example.com/Provider",
                "assignee": "http://example.com/Consumer",
                "permission": [{"action": "use", "constraint": [{"leftOperand": "dateTime",
                    "operator": "lteq", "rightOperand": "2023-12-31T06:00Z"}]}]}});
        Message::ContractAgreementMessage.check(&agreement).unwrap();
        let start = json!({"@context": ctx(), "@type": "TransferStartMessage",
            "providerPid": "p", "consumerPid": "c",
            "dataAddress": {"@type": "DataAddress", "endpointType": "https://w3id.org/idsa/v4.1/HTTP",
                "endpoint": "http://example.com", "endpointProperties": [
                    {"@type": "EndpointProperty", "name": "authorization", "value": "TOKEN-ABCDEFG"},
                    {"@type": "EndpointProperty", "name": "authType", "value": "bearer"}]}});
        Message::TransferStartMessage.check(&start).unwrap();
        let catalog = json!({"@context": ctx(), "@id": "urn:uuid:3afe", "@type": "Catalog",
            "participantId": "urn:example:DataProviderA",
            "service": [{"@id": "urn:uuid:4aa2", "@type": "DataService", "endpointURL": "https://provider-a.com/connector"}],
            "dataset": [{"@id": "urn:uuid:3dd1", "@type": "Dataset",
                "hasPolicy": [{"@id": "urn:uuid:3dd1", "@type": "Offer", "permission": [{"action": "use",
                    "constraint": [{"leftOperand": "spatial", "operator": "eq", "rightOperand": "http://example.org/EU"}]}]}],
                "distribution": [{"@type": "Distribution", "format": "HttpData-PULL", "accessService": "urn:uuid:4aa2"}]}]});
        Message::Catalog.check(&catalog).unwrap();
        check_versions(
            &json!({"protocolVersions": [{"version": "2025-1", "path": "/some/path/2025-1",
            "binding": "HTTPS", "serviceId": "service-asdf", "identifierType": "did:web"}]}),
        )
        .unwrap();
    }

    #[test]
    fn what_the_schemas_refuse_is_refused_with_its_path() {
        let cases = [
            (
                Message::CatalogRequestMessage,
                json!({"@context": CONTEXT, "@type": "CatalogRequestMessage"}),
                "@context",
            ),
            (
                Message::ContractNegotiation,
                json!({"@context": ctx(), "@type": "ContractNegotiation", "providerPid": "p",
                       "consumerPid": "c", "state": "dspace:REQUESTED"}),
                "state",
            ),
            (
                Message::ContractRequestMessage,
                json!({"@context": ctx(), "@type": "ContractRequestMessage", "consumerPid": "c",
                       "providerPid": "p", "callbackAddress": "https://x",
                       "offer": {"@type": "Offer", "@id": "o", "permission": [{"action": "use"}]}}),
                "(the message)",
            ),
            (
                Message::ContractAgreementMessage,
                json!({"@context": ctx(), "@type": "ContractAgreementMessage", "providerPid": "p",
                       "consumerPid": "c", "agreement": {"@id": "a", "@type": "Agreement",
                       "target": "t", "assigner": "x", "assignee": "y",
                       "permission": [{"action": "use", "constraint": [{"leftOperand": "count",
                       "operator": "lteq", "rightOperand": 5}]}]}}),
                "agreement.permission[0].constraint[0].rightOperand",
            ),
            (
                Message::ContractNegotiationError,
                json!({"@context": ctx(), "@type": "ContractNegotiationError", "providerPid": "p",
                       "consumerPid": "c", "reason": []}),
                "reason",
            ),
            (
                Message::Catalog,
                json!({"@context": ctx(), "@type": "Catalog", "@id": "c", "participantId": "p",
                       "dataset": []}),
                "dataset",
            ),
            (
                Message::Dataset,
                json!({"@context": ctx(), "@id": "d", "@type": "Dataset",
                       "hasPolicy": [{"@id": "o", "target": "d", "permission": [{"action": "use"}]}],
                       "distribution": [{"format": "f", "accessService": "s"}]}),
                "hasPolicy[0]",
            ),
            (
                Message::TransferStartMessage,
                json!({"@context": ctx(), "@type": "TransferStartMessage", "providerPid": "p",
                       "consumerPid": "c", "dataAddress": {"@type": "DataAddress",
                       "endpointType": "t", "endpointProperties": [{"@type": "EndpointProperty",
                       "name": "authorization", "value": 7}]}}),
                "dataAddress.endpointProperties[0].value",
            ),
            (
                Message::TransferRequestMessage,
                json!({"@context": ctx(), "@type": "TransferRequestMessage", "consumerPid": "c",
                       "agreementId": "a", "format": "f"}),
                "(the message)",
            ),
        ];
        for (message, value, path) in cases {
            let violation = message.check(&value).expect_err(&value.to_string());
            assert_eq!(violation.path, path, "{violation}");
        }
    }
}
