//! The same properties as `properties.rs`, over the demo schema under the
//! demo policy (`connector/src/dev/demo_policy.yaml`): a small `trips` table in
//! memory where every row is its own card, so a group's row count is its
//! unit count.

mod common;

use std::sync::Arc;

use common::{Context, analyzed, execute};
use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use sluice_policy::{PlanGate, PolicyGate, PolicySet, Principal, QueryContext};

const DEMO_POLICY: &str = include_str!("../../connector/src/dev/demo_policy.yaml");
const K: i64 = 10;
const ROWS: usize = 70;
const MODES: [&str; 4] = ["bus", "tram", "metro", "ferry"];

fn fare(i: usize) -> f64 {
    1.0 + (i as f64 + 3.0).sqrt() * 0.731
}

fn distance(i: usize) -> f64 {
    0.5 + (i as f64 + 5.0).ln() * 1.377
}

/// Modes: about 16 rows each, except `bike` with 7 (below k); ferries are
/// removed by the demo row filter.
fn trips() -> (SchemaRef, RecordBatch) {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("trip_id", DataType::Int64, false),
        Field::new("card_id", DataType::Utf8, false),
        Field::new("start_time", ts.clone(), false),
        Field::new("end_time", ts, false),
        Field::new("start_zone", DataType::Utf8, false),
        Field::new("end_zone", DataType::Utf8, false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("distance_km", DataType::Float64, false),
        Field::new("fare_eur", DataType::Float64, false),
        Field::new("age_band", DataType::Utf8, true),
    ]));
    let mode = |i: usize| if i < 7 { "bike" } else { MODES[i % 4] };
    let hour = 3_600_000_000i64;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            (0..ROWS).map(|i| 9_000_001 + i as i64),
        )),
        Arc::new(StringArray::from_iter_values(
            (0..ROWS).map(|i| format!("CARD-{i}")),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                (0..ROWS).map(|i| 1_767_225_600_000_000 + (i as i64 % 3) * hour + 1_234_567),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                (0..ROWS).map(|i| 1_767_225_600_000_000 + i as i64 * 7_777_777),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            (0..ROWS).map(|i| format!("Z0{}", i % 2 + 1)),
        )),
        Arc::new(StringArray::from_iter_values(
            (0..ROWS).map(|i| format!("Z0{}", i % 3 + 1)),
        )),
        Arc::new(StringArray::from_iter_values((0..ROWS).map(mode))),
        Arc::new(Float64Array::from_iter_values((0..ROWS).map(distance))),
        Arc::new(Float64Array::from_iter_values((0..ROWS).map(fare))),
        Arc::new(StringArray::from_iter(
            (0..ROWS).map(|i| (i % 4 != 0).then(|| format!("AGE-{i}"))),
        )),
    ];
    (
        schema.clone(),
        RecordBatch::try_new(schema, columns).unwrap(),
    )
}

fn setup() -> (SessionContext, PolicyGate) {
    let (schema, batch) = trips();
    let ctx = SessionContext::new();
    ctx.register_table(
        "trips",
        Arc::new(MemTable::try_new(schema.clone(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let context = Context {
        ctx: ctx.clone(),
        datasets: vec![("trips", schema)],
    };
    let policy = PolicySet::compile("demo_policy.yaml", DEMO_POLICY, &context, b"k").unwrap();
    (ctx, PolicyGate::new(policy))
}

fn planning() -> QueryContext {
    let mut principal = Principal::new("spiffe://sluice.demo/org/city-planning");
    principal.organization = Some("City Planning Agency".into());
    principal.san_uris = vec![principal.id.clone()];
    QueryContext::new(principal).with_purpose("research")
}

fn query() -> impl Strategy<Value = String> {
    let item = prop::sample::select(vec![
        "mode",
        "mode",
        "start_zone",
        "count(*)",
        "count(*)",
        "sum(fare_eur)",
        "avg(distance_km)",
        "count(age_band)",
        "trip_id",
        "card_id",
        "fare_eur",
        "age_band",
        "start_time",
        "end_time",
        "max(fare_eur)",
        "count(DISTINCT card_id)",
        "round(avg(fare_eur), 1)",
    ]);
    let filter = prop::sample::select(vec![
        "mode = 'bus'",
        "start_zone = 'Z01'",
        "end_zone IN ('Z01', 'Z02')",
        "trip_id > 9000010",
        "card_id = 'CARD-3'",
        "fare_eur > 2",
        "start_time > TIMESTAMP '2026-01-01T01:00:00Z'",
        "mode <> 'tram'",
    ]);
    let key = prop::sample::select(vec![
        "mode",
        "mode",
        "start_zone",
        "end_zone",
        "start_time",
        "card_id",
        "fare_eur",
    ]);
    (
        prop::collection::vec(item, 1..4),
        prop::option::weighted(0.4, filter),
        prop::collection::vec(key, 0..3),
        any::<bool>(),
    )
        .prop_map(|(items, filter, keys, wrap)| {
            let mut sql = format!("SELECT {} FROM trips", items.join(", "));
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            if !keys.is_empty() {
                sql.push_str(&format!(" GROUP BY {}", keys.join(", ")));
            }
            if wrap {
                sql = format!("WITH q AS ({sql}) SELECT * FROM q");
            }
            sql
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_demo_policy_releases_nothing_it_should_not(sql in query()) {
        let (ctx, gate) = setup();
        let Some(analyzed) = analyzed(&ctx, &sql) else { return Ok(()) };
        let Ok(approval) = gate.decide(&planning(), analyzed) else { return Ok(()) };
        let batches = execute(&ctx, approval.plan);
        let raw: Vec<String> = (0..ROWS).flat_map(|i| [format!("{}", fare(i)), format!("{}", distance(i))]).collect();
        for batch in &batches {
            for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
                for row in 0..column.len() {
                    let value = datafusion::arrow::util::display::array_value_to_string(column, row).unwrap();
                    prop_assert!(!value.contains("CARD-") && !value.contains("AGE-"), "{sql}: {value} in {}", field.name());
                    prop_assert!(!value.starts_with("9000"), "{sql}: trip id {value} released");
                    prop_assert!(!raw.contains(&value), "{sql}: aggregate_only value {value} released");
                    prop_assert!(value != "ferry", "{sql}: the row filter was bypassed");
                    if field.name() == "count(*)" {
                        let n: i64 = value.parse().unwrap();
                        prop_assert!(n >= K, "{sql}: a group of {n} < {K} cards released");
                    }
                }
            }
        }
    }
}

#[test]
fn bike_trips_are_a_group_below_k_and_are_suppressed() {
    let (ctx, gate) = setup();
    let sql = "SELECT mode, count(*) FROM trips GROUP BY mode ORDER BY mode";
    let approval = gate
        .decide(&planning(), analyzed(&ctx, sql).unwrap())
        .unwrap();
    let batches = execute(&ctx, approval.plan);
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    assert!(
        text.contains("bus") && text.contains("metro") && text.contains("tram"),
        "{text}"
    );
    assert!(!text.contains("bike") && !text.contains("ferry"), "{text}");
}

#[test]
fn the_generator_produces_allowed_demo_queries_too() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (ctx, gate) = setup();
    let mut allowed = 0;
    for _ in 0..300 {
        let sql = query().new_tree(&mut runner).unwrap().current();
        let Some(analyzed) = analyzed(&ctx, &sql) else {
            continue;
        };
        allowed += usize::from(gate.decide(&planning(), analyzed).is_ok());
    }
    assert!(
        allowed >= 15,
        "only {allowed} of 300 generated queries were allowed"
    );
}
