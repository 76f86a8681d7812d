//! The catalog view, offers, admins and agreement conditions, decided by
//! the pure policy library.

mod common;

use std::sync::Arc;

use common::{Context, analyzed};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use sluice_policy::offers::OfferMode;
use sluice_policy::{
    ActiveAgreement, DenialKind, PlanGate, PolicyGate, PolicySet, Principal, QueryContext,
};

const POLICY: &str = r#"
version: 1
admins:
  - organization: Provider
datasets:
  people:
    title: People
    keywords: [census]
    privacy_unit: id
    columns:
      id: { class: important, tags: [personal] }
      income: { class: important }
  towns: { public: true }
consumers:
  - name: analysts
    match: { organization: Analysts }
    grants:
      people:
        columns: { city: group_by_only, income: aggregate_only }
        aggregation: { min_group_size: 5 }
        purposes: [research, planning]
        agreement: { approval: manual, valid_for_days: 30 }
      towns:
        columns: { city: raw }
  - name: auditors
    match: { organization: Analysts, common_name: auditor }
    grants:
      people:
        columns: { city: group_by_only, income: aggregate_only }
        aggregation: { min_group_size: 10 }
        agreement: { approval: automatic }
  - name: researchers
    match: { organization: Researchers }
    grants:
      people:
        columns: { city: group_by_only, income: aggregate_only }
        dp:
          epsilon_per_query: 1.0
          budget: { epsilon: 5.0, period: month }
          columns: { income: { bounds: [0, 1000] } }
"#;

fn setup(policy: &str) -> Result<(SessionContext, PolicyGate), sluice_policy::PolicyError> {
    let people: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("city", DataType::Utf8, true),
        Field::new("income", DataType::Float64, true),
    ]));
    let towns: SchemaRef = Arc::new(Schema::new(vec![Field::new("city", DataType::Utf8, true)]));
    let ctx = SessionContext::new();
    for (name, schema) in [("people", &people), ("towns", &towns)] {
        let table = MemTable::try_new(schema.clone(), vec![vec![]]).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
    let context = Context {
        ctx: ctx.clone(),
        datasets: vec![("people", people), ("towns", towns)],
    };
    let policy = PolicySet::compile("policy.yaml", policy, &context, b"k")?;
    Ok((ctx, PolicyGate::new(policy)))
}

fn principal(organization: &str, common_name: &str) -> Principal {
    let mut p = Principal::new(format!("spiffe://test/{organization}/{common_name}"));
    p.organization = Some(organization.into());
    p.common_name = Some(common_name.into());
    p
}

const QUERY: &str = "SELECT city, count(*) FROM people GROUP BY city";

#[test]
fn the_catalog_is_the_policy_seen_by_one_principal() {
    let (_, gate) = setup(POLICY).unwrap();
    let policy = gate.policy_set().unwrap();
    let analyst = policy.catalog(&principal("Analysts", "a"));
    let names: Vec<&str> = analyst.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["people", "towns"]);
    let people = &analyst[0];
    let columns: Vec<&str> = people
        .columns
        .iter()
        .map(|c| c.field.name().as_str())
        .collect();
    assert_eq!(
        columns,
        ["city", "income"],
        "the hidden privacy unit is absent"
    );
    assert_eq!(people.classification.to_string(), "important");
    assert_eq!(people.metadata.keywords, ["census"]);
    let offer = &people.offers[0];
    assert_eq!(
        (offer.id.as_str(), offer.mode),
        ("people/analysts", OfferMode::Aggregate)
    );
    assert_eq!(offer.min_group_size, Some(5));
    assert_eq!(offer.purposes, ["planning", "research"]);
    assert_eq!(offer.agreement.as_ref().unwrap().valid_for_days, Some(30));
    assert!(analyst[1].offers[0].agreement.is_none());
    assert_eq!(analyst[1].offers[0].mode, OfferMode::Raw);

    // A principal matching two entries sees both offers.
    let auditor = policy.catalog(&principal("Analysts", "auditor"));
    let ids: Vec<&str> = auditor[0].offers.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, ["people/analysts", "people/auditors"]);

    let researcher = policy.catalog(&principal("Researchers", "r"));
    assert_eq!(researcher.len(), 1, "no grant on towns: not listed");
    let offer = &researcher[0].offers[0];
    assert_eq!(offer.mode, OfferMode::Dp);
    assert_eq!(offer.dp.as_ref().unwrap().epsilon_cap, 1.0);
    let income = &researcher[0].columns[1];
    assert_eq!(income.dp_bounds, Some([0.0, 1000.0]));

    assert!(policy.catalog(&principal("Strangers", "s")).is_empty());
    assert!(
        policy
            .offer(&principal("Researchers", "r"), "people/analysts")
            .is_none()
    );
    assert!(
        policy
            .offer(&principal("Analysts", "a"), "people/analysts")
            .is_some()
    );
    assert!(policy.any_offer("people/analysts").is_some());
    assert!(policy.is_admin(&principal("Provider", "ops")));
    assert!(!policy.is_admin(&principal("Analysts", "a")));
}

#[test]
fn a_grant_with_an_agreement_needs_an_active_one() {
    let (ctx, gate) = setup(POLICY).unwrap();
    let plan = || analyzed(&ctx, QUERY).unwrap();
    let request = QueryContext::new(principal("Analysts", "a")).with_purpose("research");
    let denial = gate.decide(&request, plan()).unwrap_err();
    assert_eq!(denial.kind, DenialKind::Precondition);
    assert!(denial.rule.ends_with("grants.people.agreement"), "{denial}");
    assert!(
        denial.message.contains("offer `people/analysts`"),
        "{denial}"
    );

    let agreement = ActiveAgreement {
        id: "agr-1".into(),
        purpose: "research".into(),
    };
    let approved = gate
        .decide(
            &request
                .clone()
                .with_agreement("people/analysts", agreement.clone()),
            plan(),
        )
        .unwrap();
    assert_eq!(approved.record.agreements, ["agr-1"]);
    assert_eq!(approved.record.purpose.as_deref(), Some("research"));

    // Without a declared purpose the agreement's applies (and satisfies
    // `purposes`); a different declared purpose is refused.
    let undeclared = QueryContext::new(principal("Analysts", "a"))
        .with_agreement("people/analysts", agreement.clone());
    let approved = gate.decide(&undeclared, plan()).unwrap();
    assert_eq!(approved.record.purpose.as_deref(), Some("research"));
    let other = QueryContext::new(principal("Analysts", "a"))
        .with_purpose("planning")
        .with_agreement("people/analysts", agreement.clone());
    let denial = gate.decide(&other, plan()).unwrap_err();
    assert_eq!(denial.kind, DenialKind::Precondition);
    assert!(
        denial.message.contains("covers purpose `research`"),
        "{denial}"
    );

    // Two matching entries: both agreements are needed (most restrictive).
    let auditor = QueryContext::new(principal("Analysts", "auditor"))
        .with_purpose("research")
        .with_agreement("people/analysts", agreement.clone());
    let denial = gate.decide(&auditor, plan()).unwrap_err();
    assert!(
        denial.message.contains("offer `people/auditors`"),
        "{denial}"
    );
    let both = auditor.with_agreement(
        "people/auditors",
        ActiveAgreement {
            id: "agr-2".into(),
            purpose: "research".into(),
        },
    );
    let approved = gate.decide(&both, plan()).unwrap();
    assert_eq!(approved.record.agreements, ["agr-1", "agr-2"]);
    // Agreements for different purposes: the query must say which.
    let split = QueryContext::new(principal("Analysts", "auditor"))
        .with_agreement("people/analysts", agreement.clone())
        .with_agreement(
            "people/auditors",
            ActiveAgreement {
                id: "agr-3".into(),
                purpose: "planning".into(),
            },
        );
    let denial = gate.decide(&split, plan()).unwrap_err();
    assert!(denial.message.contains("different purposes"), "{denial}");

    // Datasets without an agreement clause need none.
    let towns = analyzed(&ctx, "SELECT city FROM towns").unwrap();
    gate.decide(&QueryContext::new(principal("Analysts", "a")), towns)
        .unwrap();
}

#[test]
fn agreement_and_admin_mistakes_are_load_errors() {
    let zero = POLICY.replace("valid_for_days: 30", "valid_for_days: 0");
    let err = setup(&zero).err().expect("refused");
    assert!(err.field.ends_with("agreement.valid_for_days"), "{err}");
    let twice = POLICY.replace("- name: auditors", "- name: analysts");
    let err = setup(&twice).err().expect("refused");
    assert!(err.message.contains("names must be unique"), "{err}");
    let empty_admin = POLICY.replace("- organization: Provider", "- {}");
    let err = setup(&empty_admin).err().expect("refused");
    assert!(err.message.contains("everyone an admin"), "{err}");
    let bad_mode = POLICY.replace("approval: manual", "approval: sometimes");
    assert!(setup(&bad_mode).is_err());
}

/// Issue 14: every offer says what it guarantees and what it does not; an
/// aggregate offer says that k does not stop differencing, a dp offer names
/// its ε and budget, a raw one that rows leave.
#[test]
fn each_offer_states_its_guarantee_and_its_limits() {
    let (_, gate) = setup(POLICY).unwrap();
    let policy = gate.policy_set().unwrap();
    let analyst = policy.catalog(&principal("Analysts", "a"));
    let aggregate = analyst[0].offers[0].guarantee();
    assert!(
        aggregate.contains("at least 5 distinct privacy units"),
        "{aggregate}"
    );
    assert!(
        aggregate.contains("does not stop differencing"),
        "{aggregate}"
    );
    assert!(aggregate.contains("differential privacy"), "{aggregate}");
    let raw = analyst[1].offers[0].guarantee();
    assert!(raw.starts_with("Rows leave"), "{raw}");
    assert!(!raw.contains("k-anonymity"), "{raw}");

    let research = policy.catalog(&principal("Researchers", "r"));
    let dp = research[0].offers[0].guarantee();
    assert!(
        dp.starts_with("ε-differential privacy per query (ε ≤ 1"),
        "{dp}"
    );
    assert!(dp.contains("budget of ε = 5"), "{dp}");
    assert!(dp.contains("per month"), "{dp}");
    assert!(!dp.contains("does not stop differencing"), "{dp}");
}

#[test]
fn explain_policy_says_that_k_does_not_stop_differencing() {
    let (ctx, gate) = setup(POLICY).unwrap();
    let request = QueryContext::new(principal("Analysts", "a"))
        .with_purpose("research")
        .with_agreement(
            "people/analysts",
            ActiveAgreement {
                id: "a1".into(),
                purpose: "research".into(),
            },
        );
    let approval = gate
        .decide(&request, analyzed(&ctx, QUERY).unwrap())
        .unwrap();
    let line = approval
        .record
        .rules
        .iter()
        .find(|r| r.contains(".aggregation (k = 5"))
        .unwrap_or_else(|| panic!("{:?}", approval.record.rules));
    assert!(line.contains("does not stop differencing"), "{line}");
}
