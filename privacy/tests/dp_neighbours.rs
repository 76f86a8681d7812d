//! Differential privacy as wired, measured: the connector's release path
//! (bounded statistics from DataFusion, then `add_noise` with OpenDP) on two
//! neighbouring datasets that differ in one privacy unit, at ε = ln 3.
//!
//! For each query, 100,000 answers per side are drawn in one release (the
//! answer is replicated as 100,000 independent public groups, each noised
//! exactly as the real query's single group), histogrammed into 66 bins, and
//! δ is estimated as the largest Σ_b max(0, P(b) − e^ε·Q(b)) over both
//! directions. The test fails if it exceeds 0.04; sampling error alone stays
//! far below that (for two samples of 100,000 over 66 bins, the estimate's
//! bias is about 0.005). A power check runs the same estimate with the
//! sensitivity understated fourfold and requires it to fail.
//!
//! The last case is a group released more than once: published hourly keys
//! on a timestamp, grouped by its date. The first build cast the 24 hourly
//! keys of a day to that day and released it 24 times, each with the full
//! ε; the test rebuilds that answer and shows the estimate sees it.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use sluice_policy::dp::AutoChoice;
use sluice_policy::dp::grid_positions::{add_counts, grid_position};
use sluice_policy::dp::{BiasKind, DpQuery, Groups, zcdp};
use sluice_policy::{PlanGate, PlanningContext, PolicyGate, PolicySet, Principal, QueryContext};
use sluice_privacy::release::{
    self, ExactStatistics, add_noise, bias_totals, exact_statistics, noisy_bias_totals,
};

const DRAWS: usize = 100_000;
const BINS: usize = 66;
const DELTA_LIMIT: f64 = 0.04;

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
          x: aggregate_only
        functions:
          aggregate: [count, sum, avg]
        dp:
          epsilon_per_query: 2.0
          delta_per_query: 1.0e-6
          max_groups: 1
          max_rows: 5
          cache: false
          columns:
            x: { bounds: [0, 10] }
"#;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("unit", DataType::Utf8, false),
        Field::new("g", DataType::Utf8, false),
        Field::new("x", DataType::Float64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// 2026-03-19T00:00:00Z in microseconds; every row falls on that day.
const DAY: i64 = 1_773_878_400_000_000;
const HOUR: i64 = 3_600_000_000;

/// The rows' timestamp: an hour of [`DAY`].
fn hour_of(u: usize, i: usize) -> i64 {
    DAY + ((u * 3 + i) % 24) as i64 * HOUR
}

/// Twenty units with three rows each in group `common`; with `victim`, one
/// more unit with five rows of the largest value, in `victim_group`.
fn dataset(victim: bool, victim_group: &str) -> Vec<(String, String, f64)> {
    let mut rows = Vec::new();
    for u in 0..20 {
        for i in 0..3 {
            rows.push((format!("u{u}"), "common".to_string(), (u + i) as f64 % 7.0));
        }
    }
    if victim {
        for _ in 0..5 {
            rows.push(("victim".into(), victim_group.to_string(), 10.0));
        }
    }
    rows
}

struct Context {
    ctx: SessionContext,
}

impl PlanningContext for Context {
    fn dataset_schema(&self, name: &str) -> Option<SchemaRef> {
        (name == "t").then(schema)
    }

    fn parse_predicate(&self, sql: &str, schema: &DFSchema) -> datafusion::error::Result<Expr> {
        self.ctx.state().create_logical_expr(sql, schema)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn session(rows: &[(String, String, f64)]) -> SessionContext {
    let ctx = SessionContext::new();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.0.clone()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.1.clone()),
        )),
        // NaN in a row stands for NULL.
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| (!r.2.is_nan()).then_some(r.2)),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                (0..rows.len()).map(|i| hour_of(i / 3, i % 3)),
            )
            .with_timezone("UTC"),
        ),
    ];
    let batch = RecordBatch::try_new(schema(), columns).unwrap();
    let table = MemTable::try_new(schema(), vec![vec![batch]]).unwrap();
    ctx.register_table("t", Arc::new(table)).unwrap();
    ctx
}

fn analyze(ctx: &SessionContext, plan: LogicalPlan) -> LogicalPlan {
    let state = ctx.state();
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .unwrap()
}

/// The DP query for `sql` at ε = ln 3 and its exact bounded statistics.
fn prepare(policy: &str, rows: &[(String, String, f64)], sql: &str) -> (DpQuery, ExactStatistics) {
    let ctx = session(rows);
    let policy =
        PolicySet::compile("dp.yaml", policy, &Context { ctx: ctx.clone() }, b"secret").unwrap();
    let gate = PolicyGate::new(policy);
    let mut principal = Principal::new("spiffe://test/analyst");
    principal.organization = Some("Analysts".into());
    let request = QueryContext::new(principal).with_epsilon(3f64.ln());
    let rt = runtime();
    let plan = rt.block_on(ctx.state().create_logical_plan(sql)).unwrap();
    let approval = gate.decide(&request, analyze(&ctx, plan)).unwrap();
    let mut query = *approval.dp.unwrap();
    query.stats_plan = analyze(&ctx, query.stats_plan);
    let batches = rt.block_on(async {
        let physical = ctx
            .state()
            .create_physical_plan(&query.stats_plan)
            .await
            .unwrap();
        datafusion::physical_plan::collect(physical, ctx.task_ctx())
            .await
            .unwrap()
    });
    let exact = exact_statistics(&query, &batches).unwrap();
    (query, exact)
}

/// `DRAWS` independent answers: the query's one group replicated as that
/// many groups (public keys for a single group, candidates for private
/// selection), each noised exactly as the real group would be. Returns one
/// value per draw; `None` where private selection dropped the group.
fn draws(query: &DpQuery, exact: &ExactStatistics, understate: u64) -> Vec<Option<f64>> {
    draws_of(query, exact, understate, |k| {
        k.is_empty() || k[0] == ScalarValue::from("rare")
    })
}

/// [`draws`] for the group whose key `is_target` picks.
fn draws_of(
    query: &DpQuery,
    exact: &ExactStatistics,
    understate: u64,
    is_target: impl Fn(&[ScalarValue]) -> bool,
) -> Vec<Option<f64>> {
    let mut query = query.clone();
    // The bias estimates have their own test (`bias_estimates_are_private`).
    query.bias.clear();
    for statistic in &mut query.statistics {
        statistic.sensitivity = (statistic.sensitivity / understate).max(1);
        if understate > 1 && statistic.delta > 0.0 {
            // A broken selection also spends a δ far above its share.
            statistic.delta = 0.1;
        }
    }
    let target = exact.keys.iter().position(|k| is_target(k));
    let replicated = match target {
        Some(row) => ExactStatistics {
            keys: vec![exact.keys[row].clone(); DRAWS],
            totals: exact.totals.iter().map(|t| vec![t[row]; DRAWS]).collect(),
            values: exact.values.clone(),
            bias: vec![],
        },
        // The group does not exist on this side.
        None => ExactStatistics {
            keys: vec![],
            totals: vec![vec![]; exact.totals.len()],
            values: exact.values.clone(),
            bias: vec![],
        },
    };
    let private = query.groups == Groups::Private;
    if !private {
        query.groups = Groups::Public(vec![vec![]; DRAWS]);
    }
    let noisy = add_noise(&query, replicated).unwrap().batch;
    let last = cast(noisy.column(noisy.num_columns() - 1), &DataType::Float64).unwrap();
    let last = last.as_any().downcast_ref::<Float64Array>().unwrap();
    if private {
        // Kept draws carry a value; the others were dropped.
        let mut out: Vec<Option<f64>> = last.iter().collect();
        out.resize(DRAWS, None);
        out
    } else {
        last.iter().collect()
    }
}

/// δ estimated from two samples over 66 bins (one of them for "absent").
fn estimated_delta(a: &[Option<f64>], b: &[Option<f64>], epsilon: f64) -> f64 {
    let mut present: Vec<f64> = a.iter().chain(b).flatten().copied().collect();
    present.sort_by(f64::total_cmp);
    let bins = BINS - 1;
    let histogram = |sample: &[Option<f64>]| {
        let mut counts = vec![0f64; BINS];
        for v in sample {
            let bin = match v {
                None => BINS - 1,
                Some(v) if present.is_empty() => 0,
                Some(v) => {
                    // Equal-mass bins over the pooled sample.
                    let rank = present.partition_point(|p| p < v);
                    (rank * bins / present.len()).min(bins - 1)
                }
            };
            counts[bin] += 1.0;
        }
        counts
            .iter()
            .map(|c| c / sample.len() as f64)
            .collect::<Vec<_>>()
    };
    let (p, q) = (histogram(a), histogram(b));
    let one_way = |p: &[f64], q: &[f64]| -> f64 {
        p.iter()
            .zip(q)
            .map(|(p, q)| (p - epsilon.exp() * q).max(0.0))
            .sum()
    };
    one_way(&p, &q).max(one_way(&q, &p))
}

fn check(sql: &str, victim_group: &str) {
    check_with(POLICY, sql, victim_group);
}

fn check_with(policy: &str, sql: &str, victim_group: &str) {
    let with = dataset(true, victim_group);
    let without = dataset(false, victim_group);
    let (query, exact_with) = prepare(policy, &with, sql);
    let (_, exact_without) = prepare(policy, &without, sql);
    let epsilon = 3f64.ln();
    let delta = estimated_delta(
        &draws(&query, &exact_with, 1),
        &draws(&query, &exact_without, 1),
        epsilon,
    );
    assert!(
        delta <= DELTA_LIMIT,
        "{sql}: estimated δ = {delta} > {DELTA_LIMIT} at ε = ln 3"
    );
    // Power: with a quarter of the noise the same test must see the unit.
    let broken = estimated_delta(
        &draws(&query, &exact_with, 4),
        &draws(&query, &exact_without, 4),
        epsilon,
    );
    assert!(
        broken > DELTA_LIMIT,
        "{sql}: the test cannot see a fourfold understated sensitivity (δ = {broken})"
    );
    eprintln!("{sql}: estimated δ = {delta:.4}; with understated sensitivity {broken:.4}");
}

#[test]
fn count_is_ln3_dp_on_neighbouring_datasets() {
    check("SELECT count(*) FROM t", "common");
}

#[test]
fn sum_is_ln3_dp_on_neighbouring_datasets() {
    check("SELECT sum(x) FROM t", "common");
}

#[test]
fn avg_is_ln3_dp_on_neighbouring_datasets() {
    check("SELECT avg(x) FROM t", "common");
}

#[test]
fn thresholded_group_by_is_ln3_dp_on_neighbouring_datasets() {
    check("SELECT g, count(*) FROM t GROUP BY g", "rare");
}

#[test]
fn gaussian_sum_is_ln3_dp_on_neighbouring_datasets() {
    let gaussian = POLICY.replace("cache: false", "cache: false\n          noise: gaussian");
    check_with(&gaussian, "SELECT sum(x) FROM t", "common");
}

/// [`POLICY`] with Gaussian noise and a budget that composes in zCDP.
fn zcdp_policy() -> String {
    POLICY.replace(
        "cache: false",
        "cache: false\n          noise: gaussian\n          budget: { epsilon: 100, delta: 1.0e-5, accounting: zcdp }",
    )
}

/// Under zCDP accounting the query is charged ρ = ρ(ln 3, δ) instead of
/// (ln 3, δ), and its noise is calibrated to that ρ: the answer must still
/// be (ln 3, δ)-DP on its own.
#[test]
fn zcdp_gaussian_sum_is_ln3_dp_on_neighbouring_datasets() {
    let policy = zcdp_policy();
    let (query, _) = prepare(&policy, &dataset(true, "common"), "SELECT sum(x) FROM t");
    let cost = query
        .zcdp
        .clone()
        .expect("a zCDP budget prices the query in ρ");
    let expected = zcdp::rho_for_epsilon(3f64.ln(), 1e-6);
    assert!((cost.rho - expected).abs() <= expected * 1e-12, "{cost:?}");
    assert_eq!(cost.delta, 0.0, "no selection, no δ of its own");
    check_with(&policy, "SELECT sum(x) FROM t", "common");
}

#[test]
fn zcdp_thresholded_group_by_is_ln3_dp_on_neighbouring_datasets() {
    let policy = zcdp_policy();
    let sql = "SELECT g, count(*) FROM t GROUP BY g";
    let (query, _) = prepare(&policy, &dataset(true, "rare"), sql);
    let cost = query.zcdp.clone().expect("priced in ρ");
    // Half of δ pays for the threshold (charged as δ), half for the
    // conversion of ρ (the budget's own conversion covers it).
    assert_eq!(cost.delta, 0.5e-6);
    assert!(cost.rho <= zcdp::rho_for_epsilon(3f64.ln(), 0.5e-6));
    check_with(&policy, sql, "rare");
}

/// The noise of every statistic, the bias estimates included, is paid from
/// the query's ρ, shared as ε would be, and the pure mechanisms (the bias
/// estimates' Laplace noise) cost no more than their share.
#[test]
fn zcdp_shares_follow_the_epsilon_split() {
    let policy = zcdp_policy().replace("max_rows: 5", "max_rows: 5\n          bias_share: 0.2");
    let sql = "SELECT count(*), sum(x), avg(x) FROM t";
    let (query, exact) = prepare(&policy, &dataset(true, "common"), sql);
    let cost = query.zcdp.clone().unwrap();
    let rho = zcdp::rho_for_epsilon(3f64.ln(), 1e-6);
    assert!(
        (cost.rho - rho).abs() <= rho * 1e-12,
        "{} vs {rho}",
        cost.rho
    );
    // Three statistics (rows, sum of x, count of x) share 80% ...
    assert_eq!(query.statistics.len(), 3);
    for statistic in &query.statistics {
        assert!((statistic.rho - 0.8 * rho / 3.0).abs() <= rho * 1e-12);
        assert_eq!(statistic.delta, 0.0);
    }
    // ... and the bias estimates 20%, each within its share as ε²/2.
    let bias: f64 = query.bias.iter().map(|b| b.rho).sum();
    assert!((bias - 0.2 * rho).abs() <= rho * 1e-12, "{bias}");
    for b in &query.bias {
        let epsilon = release::bias_epsilon(b);
        assert!(epsilon * epsilon / 2.0 <= b.rho);
    }
    let released = add_noise(&query, exact).unwrap();
    for field in released.batch.schema().fields() {
        let column: f64 = field.metadata()["sluice.dp.rho"].parse().unwrap();
        let expected = match field.name().as_str() {
            // AVG reads the sum and the count of x.
            name if name.starts_with("avg") => 2.0 * 0.8 * rho / 3.0,
            _ => 0.8 * rho / 3.0,
        };
        assert!(
            (column - expected).abs() <= rho * 1e-9,
            "{}: ρ {column}",
            field.name()
        );
    }
    assert!(
        query.split_summary().contains(" ρ "),
        "{}",
        query.split_summary()
    );
}

/// Published hourly keys on `ts`; `max_groups: 1`.
fn hourly_keys_policy() -> String {
    let hours: Vec<String> = (0..24)
        .map(|h| format!("\"2026-03-19T{h:02}:00:00Z\""))
        .collect();
    POLICY.replace("          x: aggregate_only", "          x: aggregate_only\n          ts: group_by_only").replace(
        "          columns:\n            x: { bounds: [0, 10] }",
        &format!(
            "          columns:\n            x: {{ bounds: [0, 10] }}\n          public_keys:\n            ts: [{}]",
            hours.join(", ")
        ),
    )
}

const BY_DATE: &str = "SELECT CAST(ts AS DATE) AS d, count(*) FROM t GROUP BY CAST(ts AS DATE)";

/// Grouping by the date of a timestamp whose hours are published: the
/// cast maps 24 keys to one, so published keys cannot be used, and the
/// dates are selected privately: one release per date, within ln 3.
#[test]
fn grouping_published_hours_by_date_releases_each_date_once() {
    let policy = hourly_keys_policy();
    let (query, _) = prepare(&policy, &dataset(true, "common"), BY_DATE);
    assert_eq!(
        query.groups,
        Groups::Private,
        "a lossy cast keeps no published keys"
    );
    let (_, exact_with) = prepare(&policy, &dataset(true, "common"), BY_DATE);
    let (_, exact_without) = prepare(&policy, &dataset(false, "common"), BY_DATE);
    let any = |_: &[ScalarValue]| true;
    let delta = estimated_delta(
        &draws_of(&query, &exact_with, 1, any),
        &draws_of(&query, &exact_without, 1, any),
        3f64.ln(),
    );
    assert!(delta <= DELTA_LIMIT, "{BY_DATE}: estimated δ = {delta}");
    // The same column grouped as it is keeps its published keys.
    let (plain, _) = prepare(
        &policy,
        &dataset(true, "common"),
        "SELECT ts, count(*) FROM t GROUP BY ts",
    );
    assert!(matches!(&plain.groups, Groups::Public(keys) if keys.len() == 24));
}

/// The answer the first build gave: the date's group released once per
/// hourly key, each with the full ε, read back as the mean of the 24 rows.
/// The estimate must see that it is not within ln 3.
#[test]
fn the_estimate_sees_a_date_released_once_per_hourly_key() {
    const REPEATS: usize = 24;
    const MEANS: usize = 10_000;
    let policy = hourly_keys_policy();
    let mean_of_repeats = |victim: bool| -> Vec<Option<f64>> {
        let (mut query, exact) = prepare(&policy, &dataset(victim, "common"), BY_DATE);
        // As the old planner built it: public keys cast to dates, repeats
        // and all, with the sensitivity of a single group.
        query.groups = Groups::Public(vec![exact.keys[0].clone(); REPEATS * MEANS]);
        for statistic in &mut query.statistics {
            statistic.delta = 0.0;
        }
        let noisy = add_noise(&query, exact).unwrap().batch;
        let counts = cast(noisy.column(noisy.num_columns() - 1), &DataType::Float64).unwrap();
        let counts = counts.as_any().downcast_ref::<Float64Array>().unwrap();
        counts
            .values()
            .chunks(REPEATS)
            .map(|rows| Some(rows.iter().sum::<f64>() / REPEATS as f64))
            .collect()
    };
    let broken = estimated_delta(&mean_of_repeats(true), &mean_of_repeats(false), 3f64.ln());
    assert!(
        broken > 0.5,
        "24 releases of one group averaged must break ln 3 (estimated δ = {broken})"
    );
    eprintln!("a date released 24 times: estimated δ = {broken:.3}");
}

/// `max_groups: 1`, `max_rows: 5`, half of each query's ε for the bias
/// estimates (so that each gets enough to be measured).
fn bias_policy(epsilon_cap: f64) -> String {
    POLICY
        .replace(
            "epsilon_per_query: 2.0",
            &format!("epsilon_per_query: {epsilon_cap}"),
        )
        .replace("cache: false", "cache: false\n          bias_share: 0.5")
}

const BIAS_QUERY: &str = "SELECT g, count(*), sum(x) FROM t GROUP BY g";

/// The bias estimates are released from the data too, so they must be as
/// private as the answer. On neighbouring datasets that differ in one unit
/// that exceeds every bound (rows over `max_rows`, a second group over
/// `max_groups`, values outside the bounds), every bias total moves by
/// exactly its sensitivity, and the shared release keeps δ̂ within the limit
/// at the statistic's ε, with a power check at a fourfold understated
/// sensitivity.
#[test]
fn bias_estimates_are_private_on_neighbouring_datasets() {
    let policy = bias_policy(2.0);
    let mut with = dataset(false, "common");
    for i in 0..20 {
        let (group, value) = if i < 12 {
            ("common", 50.0)
        } else {
            ("rare", -3.0)
        };
        with.push(("victim".into(), group.into(), value));
    }
    let without = dataset(false, "common");
    let (query, exact_with) = prepare(&policy, &with, BIAS_QUERY);
    let (_, exact_without) = prepare(&policy, &without, BIAS_QUERY);
    assert_eq!(query.groups, Groups::Private);
    assert_eq!(query.bias.len(), 4, "{:?}", query.bias);
    let all_groups = |exact: &ExactStatistics| vec![None; exact.keys.len()];
    let totals_with = bias_totals(&query, &exact_with, &all_groups(&exact_with));
    let totals_without = bias_totals(&query, &exact_without, &all_groups(&exact_without));
    for (i, statistic) in query.bias.iter().enumerate() {
        // The victim moves every total by its whole sensitivity.
        assert_eq!(
            (totals_with[i] - totals_without[i]).unsigned_abs(),
            statistic.sensitivity,
            "{:?}",
            statistic.kind
        );
        // Every bias total goes through the same release at the same
        // sensitivity here: the draws for one of them (100,000 per side,
        // twice) cover the mechanism; the exact moves above cover the plan.
        if statistic.kind != BiasKind::OverMaxRows {
            continue;
        }
        let draw = |query: &DpQuery, totals: &[i64]| -> Vec<Option<f64>> {
            noisy_bias_totals(query, totals, DRAWS).unwrap()[i]
                .0
                .iter()
                .map(|v| Some(*v as f64))
                .collect()
        };
        let delta = estimated_delta(
            &draw(&query, &totals_with),
            &draw(&query, &totals_without),
            statistic.epsilon,
        );
        assert!(
            delta <= DELTA_LIMIT,
            "{:?}: estimated δ = {delta} at its ε = {}",
            statistic.kind,
            statistic.epsilon
        );
        let mut broken = query.clone();
        broken.bias[i].sensitivity = (statistic.sensitivity / 4).max(1);
        let broken_delta = estimated_delta(
            &draw(&broken, &totals_with),
            &draw(&broken, &totals_without),
            statistic.epsilon,
        );
        assert!(
            broken_delta > DELTA_LIMIT,
            "{:?}: the test cannot see a fourfold understated sensitivity (δ = {broken_delta})",
            statistic.kind
        );
        eprintln!(
            "bias {:?}: estimated δ = {delta:.4}; understated {broken_delta:.4}",
            statistic.kind
        );
    }
}

/// On data whose clipping is known, the estimates in the answer's metadata
/// are close to the true fractions, and their ε is part of the query's.
#[test]
fn bias_estimates_are_close_to_the_true_fractions() {
    // 500 light units: 4 rows in `a`, one of them above the bounds. 500
    // heavy units: 10 rows in `a` (5 over max_rows), two above the bounds,
    // and 3 rows in `b` (dropped by max_groups = 1).
    let mut rows = Vec::new();
    for u in 0..1000 {
        let heavy = u % 2 == 1;
        let (n, high) = if heavy { (10, 2) } else { (4, 1) };
        for i in 0..n {
            let x = if i < high { 50.0 } else { 5.0 };
            rows.push((format!("u{u}"), "a".to_string(), x));
        }
        if heavy {
            for _ in 0..3 {
                rows.push((format!("u{u}"), "b".to_string(), 5.0));
            }
        }
    }
    let policy = bias_policy(200.0);
    let (query, exact) = prepare(&policy, &rows, BIAS_QUERY);
    let total_epsilon: f64 = query.statistics.iter().map(|s| s.epsilon).sum::<f64>()
        + query.bias.iter().map(|b| b.epsilon).sum::<f64>();
    assert!((total_epsilon - query.epsilon).abs() < 1e-12);
    assert!((query.bias_epsilon - query.epsilon / 2.0).abs() < 1e-12);
    assert!(query.split_summary().contains("bias estimates"));
    // `prepare` asks for ε = ln 3; a hundred times the bias share makes
    // the noise negligible, so the check is of what is estimated.
    let mut precise = query.clone();
    for b in &mut precise.bias {
        b.epsilon *= 100.0;
    }
    let noisy = add_noise(&precise, exact).unwrap().batch;
    let schema = noisy.schema();
    let sum_field = schema.field(2);
    let value = |key: &str| -> f64 {
        sum_field.metadata()[key]
            .parse()
            .unwrap_or_else(|_| panic!("{key}"))
    };
    // Counted 500·4 + 500·5 = 4500; over max_rows 500·5 = 2500; over
    // max_groups 500·3 = 1500; of 8500. Clamped: 1 of 4 light, 2 of 10
    // heavy weighted to 1 of 5: 1000 of 4500.
    let close = |got: f64, want: f64| (got - want).abs() < 0.01;
    let over_rows = value(sluice_proto::wire::dp::BIAS_OVER_MAX_ROWS);
    let over_groups = value(sluice_proto::wire::dp::BIAS_OVER_MAX_GROUPS);
    let clamped = value(sluice_proto::wire::dp::BIAS_CLAMPED);
    assert!(close(over_rows, 2500.0 / 8500.0), "{over_rows}");
    assert!(close(over_groups, 1500.0 / 8500.0), "{over_groups}");
    assert!(close(clamped, 1000.0 / 4500.0), "{clamped}");
    let sentence = &sum_field.metadata()[sluice_proto::wire::dp::BIAS];
    assert!(
        sentence.contains("of rows were not counted")
            && sentence.contains("x values were clamped to [0, 10]"),
        "{sentence}"
    );
    // The count's field says nothing about x's clamping.
    assert!(
        !schema
            .field(1)
            .metadata()
            .contains_key(sluice_proto::wire::dp::BIAS_CLAMPED)
    );
}

/// `max_rows: auto` and `bounds: auto` on `x`, with half of each query's ε
/// for choosing them.
fn auto_policy() -> String {
    POLICY
        .replace("max_rows: 5", "max_rows: auto")
        .replace("x: { bounds: [0, 10] }", "x: { bounds: auto }")
        .replace("cache: false", "cache: false\n          auto_share: 0.5")
}

/// The per-unit rows an `auto` query chooses its bounds from.
fn auto_rows(query: &DpQuery, rows: &[(String, String, f64)]) -> Vec<RecordBatch> {
    let ctx = session(rows);
    let plan = analyze(&ctx, query.auto.as_ref().expect("auto bounds").plan.clone());
    runtime().block_on(async {
        let physical = ctx.state().create_physical_plan(&plan).await.unwrap();
        datafusion::physical_plan::collect(physical, ctx.task_ctx())
            .await
            .unwrap()
    })
}

/// A choice's counts per grid position (summed over the plan's rows).
fn position_counts(batches: &[RecordBatch], choice: &AutoChoice) -> Vec<u64> {
    let mut out = vec![0; 2 * choice.candidates.len() + 1];
    for batch in batches {
        add_counts(&mut out, batch.column_by_name(&choice.column).unwrap()).unwrap();
    }
    out
}

/// Counts over the `full` grid moved onto `subset`, a run of its
/// candidates: each full position lies in exactly one subset position.
fn restricted_counts(full: &[f64], counts: &[u64], subset: &[f64]) -> Vec<u64> {
    let mut out = vec![0; 2 * subset.len() + 1];
    for (at, n) in counts.iter().enumerate() {
        let moved = match at % 2 {
            // Exactly full[i]: where that value lies on the subset.
            1 => grid_position(subset, full[at / 2]).unwrap(),
            // Strictly between full[i - 1] and full[i]: below every
            // subset candidate from full[i] up, above the others.
            _ => {
                let next = full.get(at / 2).copied().unwrap_or(f64::INFINITY);
                2 * subset.partition_point(|c| *c < next)
            }
        };
        out[moved] += n;
    }
    out
}

/// Bounds chosen from the data are a release too. On neighbouring datasets
/// (one unit with five rows of the largest value, or not), each choice's
/// counts per grid position differ by one at one position (its input is at
/// symmetric distance 1); the choice of `x`'s upper bound (100,000 draws per
/// side at ε = ln 3) keeps δ̂ within the limit, with a power check at four
/// times that ε (δ̂ about 0.12 there, against the limit of 0.04). The
/// choices' ε is the query's `auto` share, and the shares of the whole
/// query add up to its ε.
#[test]
fn auto_bounds_are_private_on_neighbouring_datasets() {
    use sluice_policy::dp::AutoKind;
    use sluice_privacy::noise::BoundMechanism;

    let sql = "SELECT sum(x) FROM t";
    // The victim's value (7) just above everyone else's (at most 6): the
    // neighbour that moves the likeliest candidates most, so that the
    // check at four times the ε has the power to fail.
    let mut with = dataset(true, "common");
    for row in with.iter_mut().filter(|row| row.0 == "victim") {
        row.2 = 7.0;
    }
    // And a unit whose values are all NULL: it has rows, so it counts for
    // `max_rows`, but no value, so the value bounds leave it out.
    let mut without = dataset(false, "common");
    for rows in [&mut with, &mut without] {
        rows.extend((0..2).map(|_| ("blank".to_string(), "common".to_string(), f64::NAN)));
    }
    let (query, _) = prepare(&auto_policy(), &with, sql);
    let bounds = query.auto.as_ref().expect("the query chooses its bounds");
    let kinds: Vec<AutoKind> = bounds.choices.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            AutoKind::MaxRows,
            AutoKind::Upper("x".into()),
            AutoKind::Lower("x".into())
        ]
    );
    let parts = query.auto_epsilon
        + query.bias_epsilon
        + query.statistics.iter().map(|s| s.epsilon).sum::<f64>();
    assert!(
        (parts - query.epsilon).abs() <= 1e-15,
        "{parts} vs {}",
        query.epsilon
    );
    assert!((query.auto_epsilon - query.epsilon / 2.0).abs() <= 1e-15);
    let epsilon = query.auto_epsilon_per_release();
    assert!((epsilon * 3.0 - query.auto_epsilon).abs() <= 1e-15);

    let (query_without, _) = prepare(&auto_policy(), &without, sql);
    let (rows_with, rows_without) = (
        auto_rows(&query, &with),
        auto_rows(&query_without, &without),
    );
    for choice in &bounds.choices {
        let (a, b) = (
            position_counts(&rows_with, choice),
            position_counts(&rows_without, choice),
        );
        assert_eq!(
            a.len(),
            2 * choice.candidates.len() + 1,
            "{:?}",
            choice.kind
        );
        // One value per unit, the blank one only where it has one.
        let blank = u64::from(choice.kind == AutoKind::MaxRows);
        assert_eq!(a.iter().sum::<u64>(), 21 + blank, "{:?}", choice.kind);
        assert_eq!(b.iter().sum::<u64>(), 20 + blank, "{:?}", choice.kind);
        // The extra unit's value is counted at one position, once.
        let moved: Vec<u64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        assert_eq!(
            moved.iter().filter(|d| **d == 1).count(),
            1,
            "{:?}",
            choice.kind
        );
    }

    // The mechanism, at ε = ln 3 (the query's own share is too small for
    // 100,000 draws to tell apart from a broken one), over the grid's
    // candidates from 0.5 to 48 (exact Gumbel draws are slow in a debug
    // build; the candidates above the data all behave alike).
    let upper = &bounds.choices[1];
    let candidates: Vec<f64> = upper
        .candidates
        .iter()
        .copied()
        .filter(|c| (0.5..=48.0).contains(c))
        .collect();
    let epsilon = 3f64.ln();
    let draw = |rows: &[RecordBatch], epsilon: f64| -> Vec<Option<f64>> {
        let full = position_counts(rows, upper);
        let counts = restricted_counts(&upper.candidates, &full, &candidates);
        let mechanism = BoundMechanism::new(&candidates, upper.quantile, epsilon).unwrap();
        (0..DRAWS)
            .map(|_| Some(mechanism.release_counts(&counts).unwrap().0))
            .collect()
    };
    let delta = estimated_delta(
        &draw(&rows_with, epsilon),
        &draw(&rows_without, epsilon),
        epsilon,
    );
    assert!(
        delta <= DELTA_LIMIT,
        "upper bound: estimated δ = {delta} at ε = {epsilon}"
    );
    let broken = estimated_delta(
        &draw(&rows_with, 4.0 * epsilon),
        &draw(&rows_without, 4.0 * epsilon),
        epsilon,
    );
    assert!(
        broken > DELTA_LIMIT,
        "the test cannot see four times the ε (δ = {broken})"
    );
    eprintln!("auto upper bound: estimated δ = {delta:.4}; at 4ε {broken:.4}");
}

/// Planned again with the bounds it chose, the query's statistics follow
/// them (sensitivities from the chosen `max_rows` and range), its shares
/// are unchanged, and under zCDP it charges the ρ it reserved.
#[test]
fn a_query_planned_with_chosen_bounds_keeps_its_charge() {
    use sluice_policy::dp::Chosen;

    for policy in [auto_policy(), auto_policy().replace("max_groups: 1", "max_groups: 1\n          noise: gaussian\n          budget: { epsilon: 10, delta: 1.0e-5, accounting: zcdp }")] {
        let rows = dataset(true, "common");
        let (query, _) = prepare(&policy, &rows, "SELECT count(*), sum(x) FROM t");
        let chosen = [
            Chosen { value: 3.0, quantile: 0.99 },
            Chosen { value: 6.0, quantile: 0.99 },
            Chosen { value: 0.0, quantile: 0.99 },
        ];
        let planned = query.with_chosen(&chosen).unwrap();
        assert!(planned.auto.is_none());
        assert_eq!(planned.max_rows, 3);
        let sum = planned
            .statistics
            .iter()
            .find(|s| matches!(s.kind, sluice_policy::dp::StatisticKind::Sum(_)))
            .unwrap();
        // 3 rows of at most 6, in fixed point (6 · 2^17 = 786,432 per row).
        assert_eq!(sum.sensitivity, 3 * 786_432);
        assert_eq!(planned.epsilon, query.epsilon);
        assert_eq!(planned.auto_epsilon, query.auto_epsilon);
        assert_eq!(planned.bias_epsilon, query.bias_epsilon);
        let eps = |q: &DpQuery| q.statistics.iter().map(|s| s.epsilon).collect::<Vec<_>>();
        assert_eq!(eps(&planned), eps(&query));
        assert_eq!(planned.zcdp, query.zcdp);
        let chosen_bounds = planned.chosen.as_ref().unwrap();
        assert_eq!(chosen_bounds.columns["x"].0, [0.0, 6.0]);
        assert!(planned.split_summary().contains("choosing bounds (max_rows, upper bound of x, lower bound of x)"), "{}", planned.split_summary());
        // A value that is not a candidate is refused (a bug, not data).
        let mut wrong = chosen;
        wrong[0].value = 5.0;
        assert!(query.with_chosen(&wrong).is_err());
    }
}
