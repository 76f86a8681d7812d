//! Property tests: random queries over a small table, planned by DataFusion,
//! decided by the policy engine, and (when allowed) executed. Whatever the
//! query, an allowed plan never releases a hidden value, never releases an
//! `aggregate_only` value outside an aggregate, and every released group
//! holds at least k distinct privacy units. Random SQL also doubles as a
//! fuzzer: no input may panic the engine.

mod common;

use std::sync::Arc;

use common::{Context, analyzed, execute};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use sluice_policy::{PlanGate, PolicyGate, PolicySet, Principal, QueryContext};

const K: usize = 3;
const ROWS: usize = 40;

/// Every row is its own privacy unit (`unit`), so a group's row count is its
/// unit count; group `v` has only two rows, below k. Hidden values carry a marker; aggregate_only values are
/// distinct odd numbers no sum, average or count of ≥ 2 of them can equal.
fn table() -> (SchemaRef, RecordBatch) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("unit", DataType::Utf8, false),
        Field::new("g", DataType::Utf8, false),
        Field::new("r", DataType::Utf8, false),
        Field::new("a", DataType::Float64, false),
        Field::new("h", DataType::Utf8, false),
        Field::new("f", DataType::Int64, false),
    ]));
    let n = ROWS;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("UNIT-{i}")),
        )),
        Arc::new(StringArray::from_iter_values((0..n).map(|i| {
            if i >= n - 2 {
                "v".to_string()
            } else {
                ["x", "y", "z", "w"][i % 4].to_string()
            }
        }))),
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("r{}", i % 7)),
        )),
        Arc::new(Float64Array::from_iter_values((0..n).map(raw_a))),
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("SECRET-{i}")),
        )),
        Arc::new(Int64Array::from_iter_values((0..n).map(|i| i as i64))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    (schema, batch)
}

/// Values of the aggregate_only column: irregular, so that no sum or mean
/// of several of them lands on one of them.
fn raw_a(i: usize) -> f64 {
    1_000_003.0 + (i as f64 + 2.0).sqrt() * 7.31
}

const POLICY: &str = r#"
version: 1
datasets:
  t:
    privacy_unit: unit
consumers:
  - name: analyst
    match: { organization: Analysts }
    grants:
      t:
        columns:
          g: group_by_only
          r: raw
          a: aggregate_only
          f: filter_only
        aggregation: { min_group_size: 3 }
        functions:
          aggregate: [count, sum, avg, min, max]
          scalar: [upper, lower, round]
"#;

fn setup() -> (SessionContext, PolicyGate) {
    let (schema, batch) = table();
    let ctx = SessionContext::new();
    let provider = MemTable::try_new(schema.clone(), vec![vec![batch]]).unwrap();
    ctx.register_table("t", Arc::new(provider)).unwrap();
    let context = Context {
        ctx: ctx.clone(),
        datasets: vec![("t", schema)],
    };
    let policy = PolicySet::compile("test.yaml", POLICY, &context, b"test secret").unwrap();
    (ctx, PolicyGate::new(policy))
}

fn analyst() -> QueryContext {
    let mut principal = Principal::new("spiffe://test/analyst");
    principal.organization = Some("Analysts".into());
    QueryContext::new(principal)
}

fn select_item() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "g",
        "g",
        "count(*)",
        "count(*)",
        "sum(a)",
        "sum(a)",
        "avg(a)",
        "avg(a)",
        "g",
        "r",
        "a",
        "h",
        "f",
        "unit",
        "count(*)",
        "sum(a)",
        "avg(a)",
        "max(a)",
        "min(r)",
        "count(DISTINCT h)",
        "count(DISTINCT unit)",
        "upper(r)",
        "a * 2",
        "round(avg(a), 1)",
        "sum(CASE WHEN g = 'x' THEN a END)",
        "count(f)",
        "1",
    ])
}

fn predicate() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "g = 'x'",
        "f > 5",
        "f < 12 OR g = 'y'",
        "h = 'SECRET-1'",
        "a > 1000010",
        "unit = 'UNIT-3'",
        "r IN ('r1', 'r2')",
        "f BETWEEN 3 AND 30",
        "g <> 'z'",
        "NOT (g = 'x')",
        "f = 7",
        "upper(r) = 'R1'",
    ])
}

fn query() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(select_item(), 1..4),
        prop::option::weighted(0.5, predicate()),
        prop::collection::vec(
            prop::sample::select(vec!["g", "g", "g", "r", "f", "a", "h"]),
            0..3,
        ),
        prop::option::of(prop::sample::select(vec!["1", "2"])),
        prop::option::of(1usize..5),
        any::<bool>(),
    )
        .prop_map(|(items, filter, group, order, limit, wrap)| {
            let mut sql = format!("SELECT {} FROM t", items.join(", "));
            if let Some(p) = filter {
                sql.push_str(&format!(" WHERE {p}"));
            }
            if !group.is_empty() {
                sql.push_str(&format!(" GROUP BY {}", group.join(", ")));
            }
            if let Some(o) = order {
                sql.push_str(&format!(" ORDER BY {o}"));
            }
            if let Some(l) = limit {
                sql.push_str(&format!(" LIMIT {l}"));
            }
            if wrap {
                sql = format!("SELECT * FROM ({sql}) s");
            }
            sql
        })
}

/// Every released value, as text.
fn values(batches: &[RecordBatch]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for batch in batches {
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            for row in 0..column.len() {
                let text =
                    datafusion::arrow::util::display::array_value_to_string(column, row).unwrap();
                out.push((field.name().clone(), text));
            }
        }
    }
    out
}

/// Each row's unit count, when the query also counts rows with count(*)
/// at the top level (each row is its own unit here).
fn row_counts(batches: &[RecordBatch]) -> Vec<i64> {
    let mut out = Vec::new();
    for batch in batches {
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            if field.name() == "count(*)" && column.data_type() == &DataType::Int64 {
                out.extend(
                    column
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                        .iter()
                        .flatten(),
                );
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn allowed_plans_release_nothing_they_should_not(sql in query()) {
        let (ctx, gate) = setup();
        let Some(analyzed) = analyzed(&ctx, &sql) else { return Ok(()) };
        let Ok(approval) = gate.decide(&analyst(), analyzed) else { return Ok(()) };
        let batches = execute(&ctx, approval.plan);
        let raw_a: Vec<String> = (0..ROWS).map(|i| format!("{}", raw_a(i))).collect();
        for (column, value) in values(&batches) {
            prop_assert!(!value.contains("SECRET"), "{sql}: hidden value {value} released in {column}");
            prop_assert!(!value.contains("UNIT-"), "{sql}: privacy unit {value} released in {column}");
            prop_assert!(!raw_a.contains(&value), "{sql}: aggregate_only value {value} released in {column}");
        }
        for n in row_counts(&batches) {
            prop_assert!(n >= K as i64, "{sql}: a released group has {n} < {K} units");
        }
    }

    /// Arbitrary text through parse, plan and policy: errors are fine,
    /// panics are not.
    #[test]
    fn arbitrary_sql_never_panics(sql in "[ -~]{0,80}", prefix in prop::sample::select(vec!["", "SELECT ", "SELECT g, count(*) FROM t ", "SELECT * FROM t WHERE "])) {
        let (ctx, gate) = setup();
        let sql = format!("{prefix}{sql}");
        if let Some(analyzed) = analyzed(&ctx, &sql) {
            let _ = gate.decide(&analyst(), analyzed);
        }
    }
}

#[test]
fn the_generator_produces_allowed_queries_too() {
    // Guards the property above against passing vacuously: a fair share of
    // generated queries must be allowed (and so executed and checked).
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (ctx, gate) = setup();
    let mut allowed = 0;
    for _ in 0..400 {
        let sql = query().new_tree(&mut runner).unwrap().current();
        let Some(analyzed) = analyzed(&ctx, &sql) else {
            continue;
        };
        allowed += usize::from(gate.decide(&analyst(), analyzed).is_ok());
    }
    assert!(
        allowed >= 20,
        "only {allowed} of 400 generated queries were allowed"
    );

    let sql = "SELECT g, count(*), avg(a) FROM t WHERE f > 2 GROUP BY g";
    let approval = gate
        .decide(&analyst(), analyzed(&ctx, sql).unwrap())
        .unwrap();
    let batches = execute(&ctx, approval.plan);
    let counts = row_counts(&batches);
    assert!(!counts.is_empty());
    assert!(counts.iter().all(|n| *n >= K as i64));
    assert_eq!(
        counts.len(),
        4,
        "groups x, y, z, w are released; v (2 units) is not"
    );
}
