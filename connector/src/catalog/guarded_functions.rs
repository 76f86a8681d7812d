//! The function guards (`crate::guard`) in the connector's session, run the
//! way `query::execute` runs a query: a per-query memory pool and
//! deadline, optimisation (constant folding) under the query's guard, then
//! execution.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::collect;
use datafusion::prelude::SessionContext;

use super::{Catalog, ProcessMemory, query_pool, session_state};
use crate::guard::*;

/// A table `t` with a few short strings, a NULL, numbers and timestamps.
const TABLE: &str = "CREATE TABLE t (s VARCHAR, n BIGINT, ts TIMESTAMP) AS VALUES \
    ('kitten', 3, TIMESTAMP '2024-05-06 07:08:09'), \
    ('sitting', -2, TIMESTAMP '2024-01-02 03:04:05'), \
    (NULL, 5, NULL), \
    ('zone-4', 0, TIMESTAMP '2023-12-31 23:59:59')";

/// A table `big` of `rows` rows, each holding `len` bytes of 'a' in `s`.
async fn with_big(ctx: &SessionContext, rows: usize, len: usize) {
    ctx.sql(&format!(
        "CREATE TABLE big AS SELECT repeat('a', {len}) AS s, CAST(value AS BIGINT) AS n \
         FROM (VALUES {}) v(value)",
        (0..rows)
            .map(|i| format!("({i})"))
            .collect::<Vec<_>>()
            .join(",")
    ))
    .await
    .unwrap()
    .collect()
    .await
    .unwrap();
}

async fn guarded_context() -> SessionContext {
    let ctx = SessionContext::new_with_state(session_state().unwrap());
    ctx.sql(TABLE).await.unwrap().collect().await.unwrap();
    ctx
}

/// Runs `sql` as the connector runs a query.
async fn run_in(
    ctx: &SessionContext,
    sql: &str,
    memory: usize,
    timeout: Duration,
) -> Result<Vec<RecordBatch>, DataFusionError> {
    let plan = ctx.state().create_logical_plan(sql).await?;
    let pool = query_pool(memory, &ProcessMemory::new(usize::MAX), false);
    let guard = Arc::new(QueryGuard::new(
        Some(Instant::now() + timeout),
        memory,
        Some(pool.clone()),
    ));
    let state = for_query(ctx.state(), guard.clone());
    let optimized = blocking(|| state.optimize(&plan))?;
    check_constants(&optimized)?;
    guard.share_memory(call_sites(&optimized));
    let physical = state
        .query_planner()
        .create_physical_plan(&optimized, &state)
        .await?;
    collect(physical, Catalog::task_context_with(&state, pool)).await
}

async fn run(sql: &str) -> Result<Vec<RecordBatch>, DataFusionError> {
    let ctx = guarded_context().await;
    run_in(&ctx, sql, 256 << 20, Duration::from_secs(60)).await
}

fn refusal(result: Result<Vec<RecordBatch>, DataFusionError>) -> GuardError {
    match result {
        Ok(batches) => panic!(
            "expected a refusal, got\n{}",
            pretty_format_batches(&batches).unwrap()
        ),
        Err(e) => find_error(&e)
            .cloned()
            .unwrap_or_else(|| panic!("not a guard's refusal: {e}")),
    }
}

#[tokio::test]
async fn legitimate_calls_answer_as_plain_datafusion_does() {
    // DataFusion's own session with the connector's settings.
    let plain = SessionContext::new_with_config(super::session_config());
    plain.sql(TABLE).await.unwrap().collect().await.unwrap();
    let guarded = guarded_context().await;
    for sql in [
        "SELECT lpad(s, 5) AS a, rpad(s, 9, '*') AS b, lpad(s, n + 3) AS c FROM t",
        "SELECT repeat('-', 3) AS a, repeat(s, 2) AS b, repeat(s, n) AS c FROM t",
        "SELECT concat(s, '/', n) AS a, concat_ws('-', s, s, NULL) AS b FROM t",
        "SELECT s || s AS a, s || NULL AS b, 'x' || 'y' AS c, s || 'z' || s AS d FROM t",
        "SELECT levenshtein(s, 'kitten') AS a, levenshtein('kitten', 'sitting') AS b FROM t",
        "SELECT btrim(s, 'kn') AS a, ltrim(s, 'k') AS b, rtrim(s, 'gn') AS c, trim(s) AS d FROM t",
        "SELECT replace(s, 't', 'TT') AS a, regexp_replace(s, '[aeiou]', '<$0>', 'g') AS b FROM t",
        "SELECT overlay(s placing 'XY' from 2 for 1) AS a, upper(s) AS b, translate(s, 'it', 'IT') AS c FROM t",
        "SELECT date_trunc('day', ts) AS a, to_char(ts, '%Y-%m') AS b, position('t' in s) AS c, substring(s from 2 for 3) AS d FROM t",
        "SELECT encode(s, 'hex') AS a, length(s) AS b, starts_with(s, 'k') AS c FROM t",
    ] {
        let want = plain.sql(sql).await.unwrap().collect().await.unwrap();
        let got = run_in(&guarded, sql, 256 << 20, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(
            pretty_format_batches(&got).unwrap().to_string(),
            pretty_format_batches(&want).unwrap().to_string(),
            "{sql}"
        );
        // Same names, types and nullability.
        assert_eq!(got[0].schema(), want[0].schema(), "{sql}");
    }
}

#[tokio::test]
async fn huge_constants_are_refused_exactly_without_allocating() {
    let started = Instant::now();
    for (sql, size) in [
        (
            "SELECT length(repeat(arrow_cast('x', 'LargeUtf8'), 30000000000)) AS n",
            30_000_000_000u128,
        ),
        ("SELECT length(repeat('x', 1000000000)) AS n", 1_000_000_000),
        ("SELECT length(lpad('x', 2147483647)) AS n", 2_147_483_647),
        ("SELECT length(rpad('x', 100000000, 'y')) AS n", 100_000_000),
    ] {
        match refusal(run(sql).await) {
            GuardError::ValueTooLarge {
                function,
                size: got,
            } => {
                assert!(sql.contains(&function), "{sql}: {function}");
                assert_eq!(got, Some(size), "{sql}");
            }
            other => panic!("{sql}: {other}"),
        }
    }
    // Refused before anything was built: no 30 GB allocation happened.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn negative_and_huge_lengths_from_a_column() {
    // A negative length read from a column used to panic ("capacity
    // overflow"); it pads to '' as it does for a constant.
    let batches = run("SELECT lpad(s, n - 10) AS a, rpad(s, n - 10) AS b FROM t")
        .await
        .unwrap();
    let text = pretty_format_batches(&batches).unwrap().to_string();
    assert!(!text.contains("kitten"), "{text}");
    // A huge length from a column is refused without naming its size.
    let err = refusal(run("SELECT lpad(s, n * 1000000000) AS a FROM t").await);
    assert!(
        matches!(&err, GuardError::ValueTooLarge { size: None, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("3000000000"), "{err}");
}

#[tokio::test]
async fn amplification_chains_and_siblings_hit_the_limits() {
    // Each CTE level quadruples a constant: refused once a value passes
    // 16 MiB (or the constants together pass 64 MiB).
    for step in [
        "s || s || s || s",
        "replace(s, 'x', 'xxxx')",
        "regexp_replace(s, 'x', 'xxxx', 'g')",
    ] {
        let err = refusal(run(&cte_chain("SELECT 'xx' AS s", step, 20)).await);
        assert!(
            matches!(
                err,
                GuardError::ValueTooLarge { .. }
                    | GuardError::ConstantBudget { .. }
                    | GuardError::CallTooLarge { .. }
            ),
            "{step}: {err}"
        );
    }
    // Many sibling calls, each under the per-value limit, together over the
    // per-query budget of constants.
    let siblings = format!(
        "SELECT length(concat({})) AS n",
        vec!["repeat('x', 8000000)"; 40].join(", ")
    );
    let err = refusal(run(&siblings).await);
    assert!(
        matches!(
            err,
            GuardError::ConstantBudget { .. } | GuardError::ValueTooLarge { .. }
        ),
        "{err}"
    );
    // The same over a table's rows: each level is a call over a batch.
    let rows = cte_chain("SELECT s FROM t", "s || s || s || s", 20);
    let err = refusal(run(&rows).await);
    assert!(
        matches!(
            err,
            GuardError::ValueTooLarge { size: None, .. } | GuardError::CallTooLarge { .. }
        ),
        "{err}"
    );
    // OVERLAY written with its syntax reaches the built-in without the
    // registry; it is guarded all the same.
    let overlays = cte_chain("SELECT s FROM t", "overlay(s placing s from 1 for 0)", 30);
    assert!(matches!(
        refusal(run(&overlays).await),
        GuardError::ValueTooLarge { .. } | GuardError::CallTooLarge { .. }
    ));
    // encode doubles: 30 levels would be 2^30 times the input.
    let encodes = (0..30).fold("s".to_string(), |e, _| format!("encode({e}, 'hex')"));
    assert!(matches!(
        refusal(run(&format!("SELECT length({encodes}) AS n FROM t")).await),
        GuardError::ValueTooLarge { .. } | GuardError::CallTooLarge { .. }
    ));
}

#[tokio::test]
async fn quadratic_functions_are_refused_before_they_run() {
    let started = Instant::now();
    for sql in [
        "SELECT levenshtein(repeat('a', 120000), repeat('b', 120000)) AS d",
        "SELECT length(btrim(repeat('a', 20000), repeat('b', 20000))) AS d",
        "SELECT length(ltrim(repeat('a', 20000), repeat('b', 20000))) AS d",
    ] {
        match refusal(run(sql).await) {
            GuardError::TooMuchWork { steps, .. } => assert!(steps.is_some(), "{sql}"),
            other => panic!("{sql}: {other}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_stops_at_the_deadline() {
    // 400 rows of 5,000 × 5,000 steps: each under the per-value limit, far
    // more than 300 ms together; the deadline is checked between chunks.
    let ctx = guarded_context().await;
    with_big(&ctx, 400, 5_000).await;
    let started = Instant::now();
    let err = run_in(
        &ctx,
        "SELECT sum(levenshtein(s, replace(s, 'a', 'b'))) AS d FROM big",
        256 << 20,
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(crate::guard::deadline::is_deadline(&err), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn calls_over_batches_share_the_query_memory() {
    let ctx = guarded_context().await;
    with_big(&ctx, 200, 20_000).await;
    // 200 rows × 20 KB × 200 = 800 MB for one batch: over its share.
    let err = refusal(
        run_in(
            &ctx,
            "SELECT length(repeat(s, 200)) AS n FROM big",
            256 << 20,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(
        matches!(err, GuardError::CallTooLarge { size: None, .. }),
        "{err}"
    );
    assert_eq!(err.blame(), Blame::Resources);
    // A constant copied to every row counts for every row.
    let err = refusal(
        run_in(
            &ctx,
            "SELECT length(concat(s, repeat('x', 1000000))) AS n FROM big",
            256 << 20,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(
        matches!(
            err,
            GuardError::CallTooLarge { .. } | GuardError::BroadcastConstant { .. }
        ),
        "{err}"
    );
    // A plan that reads a table holds no constant a batch would copy into
    // every row past its limit.
    let err = refusal(
        run_in(
            &ctx,
            "SELECT n, repeat('x', 100000) AS pad FROM big",
            256 << 20,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(
        matches!(err, GuardError::BroadcastConstant { size: 100_000 }),
        "{err}"
    );
    // A small memory limit is a small share.
    let err = refusal(
        run_in(
            &ctx,
            "SELECT length(s || s) AS n FROM big",
            1 << 20,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(
        matches!(
            err,
            GuardError::CallTooLarge { .. } | GuardError::Memory { .. }
        ),
        "{err}"
    );
    // The same query within a sufficient limit answers.
    run_in(
        &ctx,
        "SELECT length(s || s) AS n FROM big",
        256 << 20,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn loose_bounds_are_enforced_on_what_is_built() {
    // regexp_replace's bound (an empty match at every character) is far
    // above what this replacement builds: the call runs in chunks and
    // answers.
    let ctx = guarded_context().await;
    with_big(&ctx, 300, 20_000).await;
    let batches = run_in(
        &ctx,
        "SELECT sum(length(regexp_replace(s, 'b', repeat('c', 1000), 'g'))) AS n FROM big",
        64 << 20,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let text = pretty_format_batches(&batches).unwrap().to_string();
    assert!(text.contains("6000000"), "{text}");
    // When it really builds too much, it is refused.
    let err = refusal(
        run_in(
            &ctx,
            "SELECT sum(length(regexp_replace(s, 'a', repeat('c', 700), 'g'))) AS n FROM big",
            64 << 20,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(
        matches!(
            err,
            GuardError::CallTooLarge { .. } | GuardError::ValueTooLarge { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn server_disclosing_and_table_functions_are_gone() {
    let ctx = guarded_context().await;
    for sql in [
        "SELECT version()",
        "SELECT input_file_name()",
        "SELECT file_row_index()",
        "SELECT * FROM generate_series(1, 10000000000000)",
        "SELECT * FROM range(1, 10)",
    ] {
        let started = Instant::now();
        let err = run_in(&ctx, sql, 1 << 20, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("not found") || err.to_string().contains("Invalid function"),
            "{sql}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{sql}");
    }
}

/// `WITH a0 AS (<start>), a1 AS (SELECT <step> AS s FROM a0), …` for
/// `levels` levels, then the length of the last level's `s`.
fn cte_chain(start: &str, step: &str, levels: usize) -> String {
    let mut sql = format!("WITH a0 AS ({start})");
    for i in 1..=levels {
        sql.push_str(&format!(", a{i} AS (SELECT {step} AS s FROM a{})", i - 1));
    }
    sql.push_str(&format!(" SELECT length(s) AS n FROM a{levels}"));
    sql
}
