//! Which groups a differentially private answer reports is fixed before any
//! data is read, and each reported group is distinct: published keys are used
//! only where the GROUP BY key is the published column itself (read through
//! renames, never by its bare name) and any cast on the way keeps every key
//! apart. Otherwise groups are selected privately. The first build looked
//! keys up by the key's bare name through casts, and released a date once per
//! published hour.

mod common;

use std::sync::Arc;

use common::{Context, analyzed};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use sluice_policy::dp::{DpQuery, Groups};
use sluice_policy::{PlanGate, PolicyGate, PolicySet, Principal, QueryContext};

const POLICY: &str = r#"
version: 1
datasets:
  t:
    privacy_unit: unit
  places:
    public: true
consumers:
  - name: analyst
    match: { organization: Analysts }
    grants:
      t:
        columns:
          zone: group_by_only
          end_zone: group_by_only
          big: group_by_only
          small: group_by_only
          ts: group_by_only
        joins:
          - dataset: places
            on: [[zone, zone]]
        dp:
          epsilon_per_query: 1.0
          max_groups: 4
          max_rows: 2
          public_keys:
            zone: [Z1, Z2, Z3]
            big: [9007199254740992, 9007199254740993, 5]
            small: [1, 2, 3]
            ts: ["2026-03-19T00:00:00Z", "2026-03-19T01:00:00Z", "2026-03-19T02:00:00Z"]
      places:
        columns: { zone: raw, big: raw, name: raw }
        joins:
          - dataset: t
            on: [[zone, zone]]
"#;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("unit", DataType::Utf8, false),
        Field::new("zone", DataType::Utf8, true),
        Field::new("end_zone", DataType::Utf8, true),
        Field::new("big", DataType::Int64, true),
        Field::new("small", DataType::Int32, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
    ]))
}

/// A public table with columns named like published ones.
fn places_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("zone", DataType::Utf8, true),
        Field::new("big", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
    ]))
}

fn query(sql: &str) -> DpQuery {
    let ctx = SessionContext::new();
    for (name, schema) in [("t", schema()), ("places", places_schema())] {
        let table = MemTable::try_new(schema, vec![vec![]]).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
    let context = Context {
        ctx: ctx.clone(),
        datasets: vec![("t", schema()), ("places", places_schema())],
    };
    let policy = PolicySet::compile("groups.yaml", POLICY, &context, b"key").unwrap();
    let mut principal = Principal::new("spiffe://test/analyst");
    principal.organization = Some("Analysts".into());
    let plan = analyzed(&ctx, sql).unwrap_or_else(|| panic!("{sql} does not plan"));
    let approval = PolicyGate::new(policy)
        .decide(&QueryContext::new(principal), plan)
        .unwrap_or_else(|d| panic!("{sql}: {d}"));
    *approval.dp.expect("a DP query")
}

fn published(sql: &str) -> usize {
    match query(sql).groups {
        Groups::Public(keys) => keys.len(),
        other => panic!("{sql}: expected published keys, got {other:?}"),
    }
}

fn private(sql: &str) {
    let q = query(sql);
    assert_eq!(q.groups, Groups::Private, "{sql}");
}

#[test]
fn published_keys_are_used_as_they_are_and_through_renames() {
    assert_eq!(published("SELECT zone, count(*) FROM t GROUP BY zone"), 3);
    assert_eq!(
        published("SELECT zone AS z, count(*) FROM t GROUP BY zone"),
        3
    );
    assert_eq!(
        published(
            "WITH c AS (SELECT zone AS area FROM t) SELECT area, count(*) FROM c GROUP BY area"
        ),
        3
    );
    assert_eq!(
        published("SELECT s.zone, count(*) FROM (SELECT * FROM t) s GROUP BY s.zone"),
        3
    );
    // Joined with a public table: the key is still t's own column.
    assert_eq!(
        published(
            "SELECT t.zone, count(*) FROM t JOIN places p ON t.zone = p.zone GROUP BY t.zone"
        ),
        3
    );
    assert_eq!(
        published("SELECT zone, small, count(*) FROM t GROUP BY zone, small"),
        9
    );
}

#[test]
fn a_renamed_column_is_not_looked_up_by_its_new_name() {
    // end_zone renamed to zone: zone's published keys do not describe it.
    private(
        "WITH c AS (SELECT end_zone AS zone FROM t) SELECT zone, count(*) FROM c GROUP BY zone",
    );
    private("SELECT x.zone, count(*) FROM (SELECT end_zone AS zone FROM t) x GROUP BY x.zone");
    // A public table's column of the same name is not the published one.
    private("SELECT p.zone, count(*) FROM t JOIN places p ON t.zone = p.zone GROUP BY p.zone");
    private("SELECT p.big, count(*) FROM t JOIN places p ON t.zone = p.zone GROUP BY p.big");
}

#[test]
fn casts_that_merge_or_change_keys_fall_back_to_private_selection() {
    // Hours of one day become one date: the date would be released thrice.
    private("SELECT CAST(ts AS DATE) AS d, count(*) FROM t GROUP BY CAST(ts AS DATE)");
    private("SELECT date_trunc('day', ts) AS d, count(*) FROM t GROUP BY date_trunc('day', ts)");
    // 2^53 and 2^53 + 1 are the same Float64.
    private("SELECT CAST(big AS DOUBLE) AS b, count(*) FROM t GROUP BY CAST(big AS DOUBLE)");
    private("SELECT CAST(big AS FLOAT) AS b, count(*) FROM t GROUP BY CAST(big AS FLOAT)");
    // A cast that keeps every key apart keeps them published.
    assert_eq!(
        published(
            "SELECT CAST(small AS BIGINT) AS s, count(*) FROM t GROUP BY CAST(small AS BIGINT)"
        ),
        3
    );
    assert_eq!(
        published(
            "SELECT CAST(small AS FLOAT) AS s, count(*) FROM t GROUP BY CAST(small AS FLOAT)"
        ),
        3
    );
    // Not a column at all.
    private("SELECT upper(zone) AS z, count(*) FROM t GROUP BY upper(zone)");
}

#[test]
fn a_unit_counts_in_at_most_as_many_groups_as_there_are_distinct_keys() {
    // max_groups is 4; three published zones bound a unit to 3 groups.
    assert_eq!(
        query("SELECT zone, count(*) FROM t GROUP BY zone").max_groups,
        3
    );
    assert_eq!(
        query("SELECT zone, small, count(*) FROM t GROUP BY zone, small").max_groups,
        4
    );
}
