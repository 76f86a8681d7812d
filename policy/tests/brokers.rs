//! Relayed queries (`brokers:`): decided for the end consumer, refused for
//! untrusted brokers, and combined with the broker's own grant where the
//! policy requires one (the most restrictive wins).

mod common;

use std::sync::Arc;

use common::{Context, analyzed};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use sluice_policy::{PlanGate, PolicyGate, PolicySet, Principal, QueryContext};

const POLICY: &str = r#"
version: 1
datasets:
  people:
    privacy_unit: id
    columns:
      id: { class: important, tags: [personal] }
brokers:
  - name: strict-broker
    match: { organization: Strict Broker }
    relays_for: [{ organization: Planners }, { organization: Strangers }]
  - name: relay-only
    match: { organization: Relay }
    relays_for: [{ organization: Planners }]
    require_own_grant: false
consumers:
  - name: planners
    match: { organization: Planners }
    quotas: { queries_per_day: 100 }
    grants:
      people:
        columns: { city: raw, income: aggregate_only }
        aggregation: { min_group_size: 5 }
  - name: strict-broker
    match: { organization: Strict Broker }
    quotas: { queries_per_day: 7 }
    grants:
      people:
        columns: { city: group_by_only }
        aggregation: { min_group_size: 20 }
"#;

fn setup(policy: &str) -> Result<(SessionContext, PolicyGate), sluice_policy::PolicyError> {
    let people: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("city", DataType::Utf8, true),
        Field::new("income", DataType::Float64, true),
    ]));
    let ctx = SessionContext::new();
    let table = MemTable::try_new(people.clone(), vec![vec![]]).unwrap();
    ctx.register_table("people", Arc::new(table)).unwrap();
    let context = Context {
        ctx: ctx.clone(),
        datasets: vec![("people", people)],
    };
    let policy = PolicySet::compile("policy.yaml", policy, &context, b"k")?;
    Ok((ctx, PolicyGate::new(policy)))
}

fn org(organization: &str) -> Principal {
    let mut p = Principal::new(format!("spiffe://test/{organization}"));
    p.organization = Some(organization.into());
    p
}

fn relayed(consumer: &str, broker: &str) -> QueryContext {
    QueryContext::new(org(consumer).relayed_by(org(broker)))
}

#[test]
fn a_relayed_query_gets_the_stricter_of_consumer_and_broker() {
    let (ctx, gate) = setup(POLICY).unwrap();
    let by_city = "SELECT city, count(*) FROM people GROUP BY city";
    let plan = || analyzed(&ctx, by_city).unwrap();

    // Directly, the planners may; through the strict broker k becomes 20 and
    // the quota the broker's 7.
    let direct = gate
        .decide(&QueryContext::new(org("Planners")), plan())
        .unwrap();
    assert!(
        direct.record.rules.iter().any(|r| r.contains("k = 5")),
        "{:?}",
        direct.record.rules
    );
    let through = gate
        .decide(&relayed("Planners", "Strict Broker"), plan())
        .unwrap();
    let rules = through.record.rules.join(" | ");
    assert!(
        rules.starts_with("brokers[0] (strict-broker) (relayed)"),
        "{rules}"
    );
    assert!(rules.contains("k = 20"), "{rules}");
    assert_eq!(
        through
            .record
            .quota
            .as_ref()
            .unwrap()
            .quotas
            .queries_per_day,
        Some(7)
    );
    // Budgets and quotas stay the end consumer's organization's.
    assert_eq!(through.record.quota.as_ref().unwrap().key, "Planners");
    assert!(
        through
            .record
            .consumers
            .iter()
            .any(|c| c == "strict-broker")
    );

    // The planners may sum incomes; the broker's grant hides income.
    let income = "SELECT city, sum(income) FROM people GROUP BY city";
    assert!(
        gate.decide(
            &QueryContext::new(org("Planners")),
            analyzed(&ctx, income).unwrap()
        )
        .is_ok()
    );
    let denial = gate
        .decide(
            &relayed("Planners", "Strict Broker"),
            analyzed(&ctx, income).unwrap(),
        )
        .unwrap_err();
    assert!(denial.message.contains("income"), "{}", denial.message);

    // City is raw for the planners but group_by_only for the broker.
    let rows = "SELECT city FROM people";
    assert!(
        gate.decide(
            &relayed("Planners", "Strict Broker"),
            analyzed(&ctx, rows).unwrap()
        )
        .is_err()
    );
}

#[test]
fn a_relay_only_broker_passes_the_end_consumers_grant() {
    let (ctx, gate) = setup(POLICY).unwrap();
    let income = analyzed(&ctx, "SELECT city, sum(income) FROM people GROUP BY city").unwrap();
    let approval = gate.decide(&relayed("Planners", "Relay"), income).unwrap();
    assert!(approval.record.rules[0].starts_with("brokers[1] (relay-only)"));
    assert_eq!(
        approval.record.quota.unwrap().quotas.queries_per_day,
        Some(100)
    );
}

#[test]
fn untrusted_brokers_and_unknown_consumers_are_refused() {
    let (ctx, gate) = setup(POLICY).unwrap();
    let plan = || analyzed(&ctx, "SELECT city, count(*) FROM people GROUP BY city").unwrap();
    let denial = gate
        .decide(&relayed("Planners", "Planners"), plan())
        .unwrap_err();
    assert_eq!(denial.rule, "brokers");
    assert!(
        denial.message.contains("not a trusted broker"),
        "{}",
        denial.message
    );
    // A trusted broker cannot lend its own rights to someone unknown.
    let denial = gate
        .decide(&relayed("Strangers", "Strict Broker"), plan())
        .unwrap_err();
    assert_eq!(denial.rule, "deny-by-default");
    // Nor speak for a consumer outside its relays_for.
    let denial = gate
        .decide(&relayed("Strict Broker", "Relay"), plan())
        .unwrap_err();
    assert_eq!(denial.rule, "brokers[1] (relay-only).relays_for");
    assert!(
        denial.message.contains("may not speak for"),
        "{}",
        denial.message
    );
}

#[test]
fn a_broker_that_must_hold_a_grant_but_has_none_is_refused() {
    let policy = POLICY.replace("    require_own_grant: false\n", "");
    let (ctx, gate) = setup(&policy).unwrap();
    let plan = analyzed(&ctx, "SELECT city, count(*) FROM people GROUP BY city").unwrap();
    let denial = gate
        .decide(&relayed("Planners", "Relay"), plan)
        .unwrap_err();
    assert_eq!(denial.rule, "brokers[1] (relay-only).require_own_grant");
}

#[test]
fn broker_entries_are_checked_at_load() {
    for (from, to, field) in [
        (
            "match: { organization: Relay }",
            "match: {}",
            "brokers[1].match",
        ),
        (
            "match: { organization: Relay }",
            "match: { group: nobody }",
            "brokers[1].match.group",
        ),
        (
            "- name: relay-only",
            "- name: strict-broker",
            "brokers[1].name",
        ),
        (
            "    require_own_grant: false",
            "    trusted: yes",
            "unknown field `trusted`",
        ),
        (
            "relays_for: [{ organization: Planners }]\n",
            "relays_for: []\n",
            "brokers[1].relays_for",
        ),
        (
            "relays_for: [{ organization: Planners }]\n",
            "relays_for: [{}]\n",
            "brokers[1].relays_for[0]",
        ),
        (
            "    relays_for: [{ organization: Planners }]\n",
            "",
            "missing field `relays_for`",
        ),
    ] {
        let e = setup(&POLICY.replace(from, to)).err().expect(to);
        assert!(e.to_string().contains(field), "{to}: {e}");
    }
}
