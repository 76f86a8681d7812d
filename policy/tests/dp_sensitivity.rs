//! The bounded statistics plan of a differentially private query, executed
//! by DataFusion on neighbouring datasets: removing one privacy unit changes
//! at most `max_groups` groups, and each statistic of a group by at most its
//! declared sensitivity. Generators include NULL, NaN, ±inf, extreme values,
//! empty groups and one unit with thousands of rows.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{Context, analyzed, execute};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use sluice_policy::dp::{DpQuery, Groups, StatisticKind};
use sluice_policy::{PlanGate, PolicyGate, PolicySet, Principal, QueryContext};

const MAX_GROUPS: u64 = 2;
const MAX_ROWS: u64 = 3;

const POLICY: &str = r#"
version: 1
datasets:
  t:
    privacy_unit: unit
  labels:
    public: true
  secrets: {}
consumers:
  - name: analyst
    match: { organization: Analysts }
    grants:
      t:
        columns:
          g: group_by_only
          x: aggregate_only
        functions:
          aggregate: [count, sum, avg, var_pop, stddev, median, min]
        joins:
          - dataset: labels
            on: [[g, g]]
          - dataset: secrets
            on: [[g, g]]
        dp:
          epsilon_per_query: 1.0
          max_groups: 2
          max_rows: 3
          columns:
            x: { bounds: [-10, 25] }
      labels:
        columns: { g: raw, label: raw }
        joins:
          - dataset: t
            on: [[g, g]]
      secrets:
        columns: { g: raw, label: raw }
        joins:
          - dataset: t
            on: [[g, g]]
"#;

/// `labels` (public reference data) and `secrets` (not public): g → label.
fn lookup_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("g", DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
    ]))
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("unit", DataType::Utf8, false),
        Field::new("g", DataType::Utf8, true),
        Field::new("x", DataType::Float64, true),
    ]))
}

/// One row: (unit, group, value).
type Row = (String, Option<String>, Option<f64>);

fn session(rows: &[Row]) -> SessionContext {
    let ctx = SessionContext::new();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.0.clone()),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema(), columns).unwrap();
    let table = MemTable::try_new(schema(), vec![vec![batch]]).unwrap();
    ctx.register_table("t", Arc::new(table)).unwrap();
    for name in ["labels", "secrets"] {
        let lookup = RecordBatch::try_new(
            lookup_schema(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(StringArray::from(vec!["A", "B"])),
            ],
        )
        .unwrap();
        let table = MemTable::try_new(lookup_schema(), vec![vec![lookup]]).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
    ctx
}

fn gate(ctx: &SessionContext) -> PolicyGate {
    gate_with(ctx, POLICY)
}

fn gate_with(ctx: &SessionContext, policy: &str) -> PolicyGate {
    let context = Context {
        ctx: ctx.clone(),
        datasets: vec![
            ("t", schema()),
            ("labels", lookup_schema()),
            ("secrets", lookup_schema()),
        ],
    };
    let policy = PolicySet::compile("dp.yaml", policy, &context, b"secret").unwrap();
    PolicyGate::new(policy)
}

/// The same grant with `g`'s keys published: two keys, no more than
/// max_groups, so units need no group cap and only `a` and `b` are reported.
fn public_keys_policy() -> String {
    POLICY.replace(
        "          max_rows: 3\n",
        "          max_rows: 3\n          public_keys: { g: [a, b] }\n",
    )
}

fn analyst() -> QueryContext {
    let mut principal = Principal::new("spiffe://test/analyst");
    principal.organization = Some("Analysts".into());
    QueryContext::new(principal)
}

fn dp_query(ctx: &SessionContext, sql: &str, policy: &str) -> DpQuery {
    let plan = analyzed(ctx, sql).expect("the query plans");
    let approval = gate_with(ctx, policy)
        .decide(&analyst(), plan)
        .expect("allowed");
    *approval.dp.expect("a DP query")
}

/// Statistics per group key (NULL key as "<null>"), in statistics order,
/// then the bias columns.
/// Quantile statistics become the number of values the group holds.
fn statistics(ctx: &SessionContext, query: &DpQuery) -> BTreeMap<String, Vec<f64>> {
    let batches = execute(ctx, query.stats_plan.clone());
    let mut out = BTreeMap::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let key = if query.key_count == 0 {
                String::new()
            } else {
                let keys = batch.column(0).as_string::<i32>();
                if keys.is_null(row) {
                    "<null>".into()
                } else {
                    keys.value(row).to_string()
                }
            };
            let bias_columns = query.bias.iter().map(|b| (&b.column, false));
            let columns = query
                .statistics
                .iter()
                .map(|s| (&s.column, matches!(s.kind, StatisticKind::Quantile { .. })))
                .chain(bias_columns);
            let values = columns
                .map(|(name, quantile)| {
                    let column = batch.column_by_name(name).unwrap();
                    if quantile {
                        return quantile_values(column, row) as f64;
                    }
                    // Counts are Int64, fixed-point sums Decimal128(38, 0).
                    let column = cast(column, &DataType::Float64).unwrap();
                    let column = column.as_primitive::<Float64Type>();
                    if column.is_null(row) {
                        0.0
                    } else {
                        column.value(row)
                    }
                })
                .collect();
            out.insert(key, values);
        }
    }
    out
}

/// Values a group holds for a quantile, after capping each unit at
/// `MAX_ROWS` (which the connector does when it flattens the lists).
fn quantile_values(column: &ArrayRef, row: usize) -> usize {
    let outer = column.as_list::<i32>().value(row);
    let units = outer.as_list::<i32>();
    (0..units.len())
        .map(|u| {
            let values = units.value(u);
            let values = values.as_primitive::<Float64Type>();
            values.len() - values.null_count()
        })
        .map(|n| n.min(MAX_ROWS as usize))
        .sum()
}

#[test]
fn supported_queries_are_planned_and_others_refused() {
    let ctx = session(&[("u1".into(), Some("a".into()), Some(1.0))]);
    let gate = gate(&ctx);
    for sql in [
        "SELECT count(*) FROM t",
        "SELECT g, count(*), sum(x), avg(x) FROM t GROUP BY g",
        "SELECT g, var_pop(x), stddev(x), median(x) FROM t GROUP BY g HAVING count(*) > 5 ORDER BY g",
        "SELECT count(DISTINCT unit) FROM t WHERE g = 'a'",
        "SELECT l.label, count(*), sum(x) FROM t JOIN labels l ON t.g = l.g GROUP BY l.label",
    ] {
        let plan = analyzed(&ctx, sql).unwrap();
        let approval = gate
            .decide(&analyst(), plan)
            .unwrap_or_else(|d| panic!("{sql}: {d}"));
        assert!(approval.dp.is_some(), "{sql}");
    }
    for (sql, why) in [
        ("SELECT x FROM t", "releases only aggregates"),
        ("SELECT g, count(DISTINCT x) FROM t GROUP BY g", "DISTINCT"),
        (
            "SELECT min(x) FROM t",
            "not supported under differential privacy",
        ),
    ] {
        let plan = analyzed(&ctx, sql).unwrap();
        let denial = gate.decide(&analyst(), plan).unwrap_err();
        assert!(denial.message.contains(why), "{sql}: {denial}");
    }
    let plan = analyzed(&ctx, "SELECT count(*) FROM t").unwrap();
    let denial = gate.decide(&analyst().with_epsilon(2.0), plan).unwrap_err();
    assert!(denial.message.contains("above the 1 allowed"), "{denial}");
}

fn value() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        4 => (-30.0f64..40.0).prop_map(Some),
        1 => Just(None),
        1 => Just(Some(f64::NAN)),
        1 => Just(Some(f64::INFINITY)),
        1 => Just(Some(f64::NEG_INFINITY)),
        1 => Just(Some(f64::MAX)),
        1 => Just(Some(-f64::MAX)),
    ]
}

fn group() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        6 => "[a-e]".prop_map(Some),
        1 => Just(None),
    ]
}

/// Units 0..8 with up to 12 rows each, plus sometimes one unit with
/// thousands of rows.
fn dataset() -> impl Strategy<Value = Vec<Row>> {
    let rows = prop::collection::vec((0u8..8, group(), value()), 0..60);
    (rows, any::<bool>(), value()).prop_map(|(rows, heavy, heavy_value)| {
        let mut out: Vec<Row> = rows
            .into_iter()
            .map(|(u, g, x)| (format!("u{u}"), g, x))
            .collect();
        if heavy {
            for i in 0..3000 {
                let g = ["a", "b", "c"][i % 3].to_string();
                out.push(("heavy".into(), Some(g), heavy_value.map(|v| v + i as f64)));
            }
        }
        out
    })
}

const QUERIES: &[&str] = &[
    "SELECT g, count(*), count(x), count(DISTINCT unit), sum(x), avg(x), var_pop(x), median(x) FROM t GROUP BY g",
    "SELECT count(*), sum(x), stddev(x) FROM t",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn removing_one_unit_changes_each_statistic_by_at_most_its_sensitivity(
        rows in dataset(),
        victim in prop_oneof![(0u8..8).prop_map(|u| format!("u{u}")), Just("heavy".to_string())],
        query in 0..QUERIES.len(),
        public in any::<bool>(),
    ) {
        let policy = if public { public_keys_policy() } else { POLICY.to_string() };
        let with = session(&rows);
        let without_rows: Vec<Row> = rows.iter().filter(|r| r.0 != victim).cloned().collect();
        let without = session(&without_rows);
        let plan_with = dp_query(&with, QUERIES[query], &policy);
        let plan_without = dp_query(&without, QUERIES[query], &policy);
        let a = statistics(&with, &plan_with);
        let b = statistics(&without, &plan_without);
        if public && plan_with.key_count > 0 {
            prop_assert!(matches!(plan_with.groups, Groups::Public(_)));
        }
        // With public keys only the listed groups are ever reported.
        let reported = |key: &String| {
            !matches!(plan_with.groups, Groups::Public(_)) || key == "a" || key == "b"
        };
        let keys: std::collections::BTreeSet<&String> =
            a.keys().chain(b.keys()).filter(|k| reported(k)).collect();
        let n = plan_with.statistics.len();
        let zeros = vec![0.0; n + plan_with.bias.len()];
        let mut changed_groups = 0;
        let mut bias_change = vec![0.0; plan_with.bias.len()];
        for key in keys {
            let x = a.get(key).unwrap_or(&zeros);
            let y = b.get(key).unwrap_or(&zeros);
            if x[..n] != y[..n] {
                changed_groups += 1;
            }
            for (i, change) in bias_change.iter_mut().enumerate() {
                *change += x[n + i] - y[n + i];
            }
            for (i, statistic) in plan_with.statistics.iter().enumerate() {
                let difference = (x[i] - y[i]).abs();
                prop_assert!(
                    difference <= statistic.sensitivity as f64,
                    "group {key}: {:?} changed by {difference} > sensitivity {}",
                    statistic.kind, statistic.sensitivity
                );
            }
        }
        // Each bias estimate is one total over the reported groups.
        prop_assert!(!plan_with.bias.is_empty());
        for (statistic, change) in plan_with.bias.iter().zip(&bias_change) {
            prop_assert!(
                change.abs() <= statistic.sensitivity as f64,
                "bias {:?} changed by {change} > sensitivity {}",
                statistic.kind, statistic.sensitivity
            );
        }
        let max_groups = if plan_with.key_count == 0 { 1 } else { MAX_GROUPS };
        prop_assert!(plan_with.max_groups <= max_groups);
        prop_assert!(
            changed_groups <= plan_with.max_groups,
            "{changed_groups} groups changed, the noise assumes at most {}",
            plan_with.max_groups
        );
    }
}
