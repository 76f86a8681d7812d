//! Issue 14, part 4: a caller learns nothing about what it may not use.
//!
//! - `filter_only` / `group_by_only` columns never sit in a grant whose rows
//!   leave (compiler), and a condition on a column that may not be returned
//!   never accompanies released rows (checker);
//! - negations are checked by meaning, not spelling: `NOT (x = 'a')`,
//!   `(x = 'a') IS NOT TRUE`, `(x = 'a') = false`, a condition used as a
//!   value and later CASE branches all mean `<>`;
//! - counts above an aggregate may only be bounded from below.
//!
//! Decisions only: nothing here reads data.

mod common;

use std::sync::Arc;

use common::{Context, analyzed};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use std::collections::BTreeMap;

use sluice_policy::checks::Checker;
use sluice_policy::compile::DatasetGrant;
use sluice_policy::{
    Denial, PlanGate, PolicyError, PolicyGate, PolicySet, Principal, QueryContext,
};

fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("site", DataType::Utf8, true),
        Field::new("kind", DataType::Utf8, true),
        Field::new("code", DataType::Utf8, true),
        Field::new("energy", DataType::Float64, true),
        Field::new("flag", DataType::Boolean, true),
    ]))
}

fn sites_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("site_id", DataType::Utf8, false),
        Field::new("region", DataType::Utf8, true),
    ]))
}

/// The columns every consumer below gets on `events`.
const EVENTS_GRANT: &str = r#"
        columns:
          id: raw
          site: group_by_only
          kind: raw
          code: filter_only
          energy: aggregate_only
          flag: raw
        aggregation: { min_group_size: 2 }
        functions:
          aggregate: [count, sum, avg, approx_distinct]
          scalar: [coalesce, round, abs, nullif]
        joins:
          - dataset: sites
            on: [[site, site_id]]"#;

/// Three consumers with the same columns and different comparison lists:
/// the defaults (no negation), `<>` without `not`, and `not` without `<>`.
fn policy() -> String {
    format!(
        r#"
version: 1
datasets:
  events:
    privacy_unit: unit
  sites: {{}}
consumers:
  - name: analyst
    match: {{ organization: Analysts }}
    grants:
      events:{EVENTS_GRANT}
      sites:
        columns: {{ site_id: raw, region: raw }}
        joins:
          - dataset: events
            on: [[site_id, site]]
  - name: negator
    match: {{ organization: Negators }}
    grants:
      events:{EVENTS_GRANT}
        comparisons: ["=", "<>", "<", "<=", ">", ">=", in, between, like, is_null, and, or]
  - name: with-not
    match: {{ organization: Not Sayers }}
    grants:
      events:{EVENTS_GRANT}
        comparisons: ["=", "<", "<=", ">", ">=", in, between, like, is_null, and, or, not]
"#
    )
}

fn context() -> Context {
    let ctx = SessionContext::new();
    for (name, schema) in [("events", events_schema()), ("sites", sites_schema())] {
        let table = MemTable::try_new(schema, vec![vec![]]).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
    Context {
        ctx,
        datasets: vec![("events", events_schema()), ("sites", sites_schema())],
    }
}

fn compile(yaml: &str) -> Result<PolicySet, PolicyError> {
    PolicySet::compile("policy.yaml", yaml, &context(), b"k")
}

fn gate() -> (SessionContext, PolicyGate) {
    let context = context();
    let policy = PolicySet::compile("policy.yaml", &policy(), &context, b"k").unwrap();
    (context.ctx, PolicyGate::new(policy))
}

fn request(organization: &str) -> QueryContext {
    let mut principal = Principal::new(format!("spiffe://test/{organization}"));
    principal.organization = Some(organization.into());
    QueryContext::new(principal)
}

/// The decision for `sql` as `organization`; panics if it does not plan.
fn decide(organization: &str, sql: &str) -> Result<(), Denial> {
    let (ctx, gate) = gate();
    let plan = analyzed(&ctx, sql).unwrap_or_else(|| panic!("does not plan: {sql}"));
    gate.decide(&request(organization), plan).map(|_| ())
}

/// Every query is refused, by a rule ending in `rule` with a message
/// containing `text`; every failure is reported, not just the first.
fn assert_refused(organization: &str, queries: &[&str], rule: &str, text: &str) {
    let mut wrong = Vec::new();
    for sql in queries {
        match decide(organization, sql) {
            Ok(()) => wrong.push(format!("allowed: {sql}")),
            Err(d) if !d.rule.ends_with(rule) || !d.message.contains(text) => {
                wrong.push(format!("{sql}\n    refused by `{}`: {}", d.rule, d.message))
            }
            Err(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} queries were not refused by `…{rule}` with {text:?}:\n  {}",
        wrong.len(),
        queries.len(),
        wrong.join("\n  ")
    );
}

fn assert_allowed(organization: &str, queries: &[&str]) {
    let wrong: Vec<String> = queries
        .iter()
        .filter_map(|sql| {
            decide(organization, sql)
                .err()
                .map(|d| format!("{sql}\n    refused by `{}`: {}", d.rule, d.message))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} queries were refused:\n  {}",
        wrong.len(),
        queries.len(),
        wrong.join("\n  ")
    );
}

const ANALYST: &str = "Analysts";
const NEGATOR: &str = "Negators";
const NOT_SAYER: &str = "Not Sayers";

fn where_(condition: &str) -> String {
    format!("SELECT count(*) FROM events WHERE {condition}")
}

fn wheres(conditions: &[&str]) -> Vec<String> {
    conditions.iter().map(|c| where_(c)).collect()
}

fn strs(queries: &[String]) -> Vec<&str> {
    queries.iter().map(String::as_str).collect()
}

// ---- item 1: filter_only and group_by_only where rows leave -------------

const ROWS_HEAD: &str = "version: 1\ndatasets:\n  events:\n    privacy_unit: unit\nconsumers:\n  - name: supplier\n    match: { organization: S }\n    grants:\n      events:\n";

#[test]
fn filter_only_in_a_grant_whose_rows_leave_is_a_load_error_with_advice() {
    for (columns, aggregation, why) in [
        (
            "{ id: raw, code: filter_only }",
            "        aggregation: { min_group_size: 2, rows: true }\n",
            "rows: true",
        ),
        ("{ id: raw, code: filter_only }", "", "no `aggregation`"),
        (
            "{ id: raw, site: group_by_only }",
            "        aggregation: { min_group_size: 2, rows: true }\n",
            "rows: true",
        ),
        ("{ id: raw, site: group_by_only }", "", "no `aggregation`"),
        (
            "{ id: raw, code: filter_only }",
            "        aggregation: { min_group_size: 1 }\n",
            "min_group_size: 1",
        ),
    ] {
        let yaml = format!("{ROWS_HEAD}        columns: {columns}\n{aggregation}");
        let err = compile(&yaml).expect_err(&yaml);
        let column = if columns.contains("code") {
            "code"
        } else {
            "site"
        };
        assert_eq!(err.line, Some(10), "{err}");
        assert_eq!(
            err.field,
            format!("consumers[0].grants.events.columns.{column}"),
            "{err}"
        );
        // What is wrong, why, and what to write instead.
        assert!(err.message.contains(why), "{err}");
        assert!(err.message.contains("row by row"), "{err}");
        assert!(err.message.contains("`raw`"), "{err}");
        assert!(err.message.contains("`hidden`"), "{err}");
    }
}

#[test]
fn filter_only_in_aggregation_only_and_dp_grants_still_loads() {
    compile(&format!(
        "{ROWS_HEAD}        columns: {{ id: raw, code: filter_only, site: group_by_only }}\n        aggregation: {{ min_group_size: 2 }}\n"
    ))
    .unwrap();
    compile(&format!(
        "{ROWS_HEAD}        columns: {{ code: filter_only, site: group_by_only }}\n        dp: {{ epsilon_per_query: 1.0 }}\n"
    ))
    .unwrap();
    compile(&policy()).unwrap();
}

#[test]
fn aggregate_only_needs_groups_of_at_least_two_units() {
    let err = compile(&format!(
        "{ROWS_HEAD}        columns: {{ id: raw, energy: aggregate_only }}\n        aggregation: {{ min_group_size: 1 }}\n"
    ))
    .unwrap_err();
    assert_eq!(err.field, "consumers[0].grants.events.columns.energy");
    assert!(err.message.contains("min_group_size"), "{err}");
}

#[test]
fn a_condition_on_a_column_that_may_not_leave_never_accompanies_released_rows() {
    // Rows of `sites` leave; the aggregate over `events` behind the join
    // is narrowed by `events.code`, which may not be returned.
    assert_refused(
        ANALYST,
        &[
            "SELECT s.site_id FROM sites s JOIN (SELECT site, count(*) AS n FROM events WHERE code = 'E-106' GROUP BY site) e ON s.site_id = e.site",
            "SELECT s.region FROM sites s JOIN (SELECT site FROM events WHERE code IN ('E-106') GROUP BY site) e ON s.site_id = e.site",
        ],
        "grants.events.columns.code",
        "events.code",
    );
    // Aggregates narrowed by it, and rows joined to group keys, are fine.
    assert_allowed(
        ANALYST,
        &[
            "SELECT site, count(*) FROM events WHERE code = 'E-106' GROUP BY site",
            "SELECT s.region, count(*) FROM sites s JOIN events e ON s.site_id = e.site WHERE e.code = 'E-106' GROUP BY s.region",
            "SELECT s.site_id FROM sites s JOIN (SELECT site, count(*) AS n FROM events GROUP BY site) e ON s.site_id = e.site",
            "SELECT s.site_id FROM sites s JOIN (SELECT site, count(*) AS n FROM events WHERE kind = 'run' GROUP BY site) e ON s.site_id = e.site",
        ],
    );
}

/// The analyst's grants, with `events` changed as combining consumer
/// entries might leave it (the compiler refuses such a grant in a single
/// entry, so the checker is the second line).
fn adjusted_grants(
    policy: &PolicySet,
    adjust: impl Fn(&mut DatasetGrant),
) -> BTreeMap<String, DatasetGrant> {
    let mut grants = policy.consumers()[0].grants.clone();
    adjust(grants.get_mut("events").unwrap());
    grants
}

/// The checker's decision on `sql` under `grants`, without the gate.
fn check(grants: &BTreeMap<String, DatasetGrant>, sql: &str) -> Result<(), Denial> {
    let context = context();
    let policy = PolicySet::compile("policy.yaml", &policy(), &context, b"k").unwrap();
    let plan = analyzed(&context.ctx, sql).unwrap_or_else(|| panic!("does not plan: {sql}"));
    let checker = Checker {
        policy: &policy,
        grants,
    };
    let lineage = checker.node(&plan)?;
    checker.output(&plan, &lineage)
}

fn analyst_policy() -> PolicySet {
    compile(&policy()).unwrap()
}

#[test]
fn rows_released_beside_a_condition_on_a_filter_only_column_are_refused() {
    let grants = adjusted_grants(&analyst_policy(), |g| g.rows_allowed = true);
    let mut wrong = Vec::new();
    for (sql, column) in [
        ("SELECT id FROM events WHERE code = 'E-106'", "code"),
        ("SELECT 1 AS one FROM events WHERE code = 'E-106'", "code"),
        (
            "SELECT DISTINCT kind FROM events WHERE code = 'E-106'",
            "code",
        ),
        (
            "SELECT id FROM events WHERE code IN ('E-106', 'E-107') AND id > 3",
            "code",
        ),
        (
            "SELECT id FROM events WHERE CASE WHEN code = 'E-106' THEN true ELSE false END",
            "code",
        ),
        (
            "SELECT id FROM (SELECT id, code AS c FROM events) t WHERE c = 'E-106'",
            "code",
        ),
        (
            "SELECT id FROM events WHERE (code = 'E-106') IS TRUE",
            "code",
        ),
        (
            "SELECT id FROM events WHERE code LIKE 'E-1%' ORDER BY id LIMIT 5",
            "code",
        ),
        ("SELECT id FROM events WHERE site = 'Plant A'", "site"),
        (
            "SELECT e.id FROM events e JOIN sites s ON e.site = s.site_id",
            "site",
        ),
    ] {
        match check(&grants, sql) {
            Err(d)
                if d.rule.ends_with(&format!("grants.events.columns.{column}"))
                    && d.message.contains("row by row") => {}
            other => wrong.push(format!("{sql}: {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused as expected:\n{}",
        wrong.join("\n")
    );
    // Aggregates narrowed by it (k = 2 applies to them), and rows selected
    // on columns that may leave, are still fine.
    for sql in [
        "SELECT site, count(*) FROM events WHERE code = 'E-106' GROUP BY site",
        "SELECT count(*) FROM events WHERE code = 'E-106' AND site = 'Plant A'",
        "SELECT id, kind FROM events WHERE kind = 'run' AND id < 100",
    ] {
        check(&grants, sql).unwrap_or_else(|d| panic!("{sql}: {d:?}"));
    }
}

#[test]
fn the_length_of_a_list_aggregate_is_a_count_too() {
    let grants = adjusted_grants(&analyst_policy(), |g| {
        g.rows_allowed = true;
        g.aggregates.insert("string_agg".into());
        g.scalars.insert("character_length".into());
    });
    let denial = check(
        &grants,
        "SELECT kind, count(*) FROM events GROUP BY kind HAVING length(string_agg(kind, ',')) < 9",
    )
    .unwrap_err();
    assert!(denial.message.contains("HAVING"), "{denial:?}");
    check(
        &grants,
        "SELECT kind, string_agg(kind, ',') FROM events GROUP BY kind HAVING count(*) > 3",
    )
    .unwrap();
}

#[test]
fn an_aggregate_without_k_protects_no_filter_only_column() {
    for k in [None, Some(1)] {
        let grants = adjusted_grants(&analyst_policy(), |g| g.min_group_size = k);
        let denial = check(
            &grants,
            "SELECT id, count(*) FROM events WHERE code = 'E-106' GROUP BY id",
        )
        .expect_err("groups of one row are rows");
        assert!(
            denial.rule.ends_with("grants.events.columns.code"),
            "{denial:?}"
        );
    }
}

// ---- item 2: negations by meaning ---------------------------------------

/// Spellings of `kind <> 'run'` (or of another negation) that the default
/// comparisons must refuse.
const NEGATIONS: &[&str] = &[
    "kind <> 'run'",
    "kind != 'run'",
    "kind IS DISTINCT FROM 'run'",
    "NOT (kind = 'run')",
    "NOT NOT NOT (kind = 'run')",
    "(kind = 'run') IS NOT TRUE",
    "(kind = 'run') IS FALSE",
    "(kind = 'run') = false",
    "(kind = 'run') <> true",
    "(kind = 'run') IS DISTINCT FROM true",
    "(kind = 'run') IS NOT DISTINCT FROM false",
    "(NOT (kind = 'run')) = true",
    "((kind = 'run') = false) = true",
    "(kind = 'run') = (kind = 'idle')",
    "(kind = 'run') < true",
    "(kind = 'run' OR NULL) IS UNKNOWN",
    "(kind = 'run' AND NULL) IS NOT UNKNOWN",
    "(kind = 'run') IS NULL",
    "TRY_CAST(kind = 'run' AS INT) = 0",
    "CAST(kind = 'run' AS VARCHAR) = 'false'",
    "TRY_CAST(kind = 'run' AS INT) + 0 < 1",
    "coalesce(kind = 'run', true) = false",
    "CASE WHEN kind = 'run' THEN 0 ELSE 1 END = 1",
    "CASE WHEN kind = 'run' THEN false ELSE true END",
    "CASE WHEN kind = 'run' THEN false WHEN id > 0 THEN true END",
    "CASE kind WHEN 'run' THEN false ELSE true END",
    "(CASE WHEN kind = 'run' THEN 1 END) IS NULL",
    "NOT (kind = 'run' AND id > 3)",
    "NOT (kind = 'run' OR kind = 'idle')",
    "NOT (kind IN ('run', 'idle'))",
    "kind NOT IN ('run')",
    "NOT (kind LIKE 'r%')",
    "kind NOT LIKE 'r%'",
    "NOT (id BETWEEN 1 AND 5)",
    "id NOT BETWEEN 1 AND 5",
    "NOT flag AND NOT (kind = 'run')",
    "nullif(kind, 'run') IS NOT NULL",
    "coalesce(nullif(kind, 'run'), 'none') <> 'none'",
];

#[test]
fn negations_are_refused_whatever_their_spelling() {
    assert!(NEGATIONS.len() >= 15);
    assert_refused(
        ANALYST,
        &strs(&wheres(NEGATIONS)),
        "grants.events.comparisons",
        "comparison",
    );
}

#[test]
fn a_condition_used_as_a_value_shows_both_outcomes() {
    assert_refused(
        ANALYST,
        &[
            "SELECT kind = 'run' AS is_run, count(*) FROM events GROUP BY 1",
            "SELECT CASE WHEN kind = 'run' THEN 'run' ELSE 'other' END AS k, count(*) FROM events GROUP BY 1",
            "SELECT CASE kind WHEN 'run' THEN 1 END AS k, count(*) FROM events GROUP BY 1",
            "SELECT id, kind IN ('run', 'idle') AS busy FROM events",
            "WITH t AS (SELECT kind = 'run' AS r FROM events) SELECT count(*) FROM t WHERE r",
        ],
        "grants.events.comparisons",
        "comparison",
    );
}

#[test]
fn positive_conditions_stay_allowed() {
    assert_allowed(
        ANALYST,
        &strs(&wheres(&[
            "kind = 'run' AND id > 3",
            "kind = 'run' OR kind LIKE 'i%'",
            "kind IN ('run', 'idle')",
            "id BETWEEN 1 AND 5",
            "(kind = 'run') IS TRUE",
            "(kind = 'run') IS NOT FALSE",
            "(kind = 'run') = true",
            "(kind = 'run') IS NOT DISTINCT FROM true",
            "(kind = 'run') IS DISTINCT FROM false",
            "NOT NOT (kind = 'run')",
            "NOT (id < 5)",
            "NOT (id >= 5 OR id <= 2)",
            "kind IS NOT NULL",
            "NOT (kind IS NULL)",
            "kind IS DISTINCT FROM NULL",
            "NOT (kind IS NOT DISTINCT FROM NULL)",
            "CASE WHEN kind = 'run' THEN true ELSE false END",
            "CASE WHEN kind = 'run' THEN id > 3 END",
            "flag",
            "NOT flag",
            "flag = false",
        ])),
    );
    assert_allowed(
        ANALYST,
        &["SELECT site_id, region FROM sites WHERE region = 'north' AND site_id < 'S9'"],
    );
}

#[test]
fn a_negation_is_allowed_where_its_complement_or_not_is() {
    // `<>` listed: NOT (x = v) means x <> v.
    assert_allowed(
        NEGATOR,
        &strs(&wheres(&[
            "kind <> 'run'",
            "NOT (kind = 'run')",
            "(kind = 'run') IS NOT TRUE",
            "(kind = 'run') = false",
            "CASE WHEN kind = 'run' THEN false ELSE true END",
            "CASE WHEN kind = 'run' THEN 0 ELSE 1 END = 1",
            "NOT (kind <> 'run')",
            "nullif(kind, 'run') IS NOT NULL",
        ])),
    );
    // … but not NOT IN, NOT LIKE or NOT BETWEEN, whose complements it lacks.
    assert_refused(
        NEGATOR,
        &strs(&wheres(&[
            "NOT (kind IN ('run', 'idle'))",
            "NOT (kind LIKE 'r%')",
            "NOT (id BETWEEN 1 AND 5)",
        ])),
        "grants.events.comparisons",
        "comparison",
    );
    // `not` listed: every listed comparison may be negated.
    assert_allowed(
        NOT_SAYER,
        &strs(&wheres(&[
            "NOT (kind = 'run')",
            "NOT (kind IN ('run', 'idle'))",
            "kind NOT IN ('run')",
            "NOT (id BETWEEN 1 AND 5)",
            "(kind = 'run') IS FALSE",
            "TRY_CAST(kind = 'run' AS INT) = 0",
        ])),
    );
}

#[test]
fn refusals_of_negations_name_the_grant_and_the_meaning_never_a_value() {
    let denial = decide(ANALYST, &where_("(kind = 'secret-value') IS NOT TRUE")).unwrap_err();
    assert_eq!(
        denial.rule,
        "consumers[0] (analyst) grants.events.comparisons"
    );
    assert!(denial.message.contains("`<>`"), "{}", denial.message);
    assert!(denial.message.contains("kind"), "{}", denial.message);
    assert!(
        !denial.message.contains("secret-value"),
        "{}",
        denial.message
    );
}

// ---- item 3: counts bounded from below only -----------------------------

fn having(condition: &str) -> String {
    format!("SELECT site, count(*) AS n FROM events GROUP BY site HAVING {condition}")
}

const SMALL_COUNT_FILTERS: &[&str] = &[
    "count(*) < 3",
    "count(*) <= 3",
    "count(*) = 3",
    "3 > count(*)",
    "count(*) BETWEEN 1 AND 5",
    "count(*) IN (1, 2, 3)",
    "NOT count(*) >= 10",
    "NOT (count(*) > 10)",
    "(count(*) > 10) IS FALSE",
    "(count(*) > 10) IS NOT TRUE",
    "(count(*) > 10) = false",
    "count(*) - 5 < 0",
    "-count(*) > -5",
    "count(*) * 1 <= 5",
    "5 - count(*) > 0",
    "count(*) / 2 < 3",
    "count(*) IS NOT DISTINCT FROM 3",
    "sum(1) < 3",
    "sum(-1) > -3",
    "count(id) < 3",
    "count(DISTINCT kind) < 3",
    "approx_distinct(kind) < CAST(3 AS BIGINT UNSIGNED)",
    "sum(energy) < 10",
    "round(count(*)) < 3",
    "CAST(count(*) AS VARCHAR) > '3'",
    "CASE WHEN count(*) < 3 THEN 1 ELSE 0 END = 1",
    "CASE WHEN count(*) > 3 THEN 0 ELSE 1 END = 1",
    "count(*) < 3 OR count(*) > 100",
    "count(*) > 3 AND count(*) < 5",
    "count(*) > count(DISTINCT kind)",
];

#[test]
fn counts_above_an_aggregate_are_bounded_from_below_only() {
    assert!(SMALL_COUNT_FILTERS.len() >= 15);
    let queries: Vec<String> = SMALL_COUNT_FILTERS.iter().map(|c| having(c)).collect();
    // The negator may write `<>` and `NOT`, so what refuses these is the
    // count rule, not the comparison list.
    assert_refused(NEGATOR, &strs(&queries), "deny-by-default", "count");
    assert_refused(
        NEGATOR,
        &[
            "SELECT site, count(*) FROM events GROUP BY site HAVING count(*) <> 10",
            "WITH g AS (SELECT site, count(*) AS n FROM events GROUP BY site) SELECT site, n FROM g WHERE n < 3",
            "WITH g AS (SELECT site, count(*) + 0 AS n FROM events GROUP BY site) SELECT site FROM g WHERE n > 3",
            "SELECT * FROM (SELECT site, count(*) AS n FROM events GROUP BY site) g WHERE NOT (n >= 3)",
        ],
        "deny-by-default",
        "count",
    );
}

#[test]
fn lower_bounds_on_counts_stay_allowed() {
    let allowed: Vec<String> = [
        "count(*) > 3",
        "count(*) >= 3",
        "3 < count(*)",
        "3 <= count(*)",
        "count(*) > 3 AND count(*) >= 5",
        "count(*) > 3 OR avg(energy) > 1",
        "sum(1) > 3",
        "sum(energy) > 3",
        "count(DISTINCT kind) > 1",
        "CAST(count(*) AS DOUBLE) > 2.5",
        "avg(energy) < 5",
        "count(*) > 3 AND site = 'A'",
    ]
    .iter()
    .map(|c| having(c))
    .collect();
    assert_allowed(NEGATOR, &strs(&allowed));
    assert_allowed(
        NEGATOR,
        &[
            "WITH g AS (SELECT site, count(*) AS n FROM events GROUP BY site) SELECT site, n FROM g WHERE n > 3",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY n DESC LIMIT 3",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY n",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY site LIMIT 3",
        ],
    );
}

#[test]
fn the_smallest_groups_cannot_be_picked_by_order_and_limit() {
    assert_refused(
        NEGATOR,
        &[
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY n LIMIT 1",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY count(*) ASC LIMIT 2",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY -count(*) DESC LIMIT 1",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY n DESC LIMIT 2 OFFSET 3",
            "SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY n DESC OFFSET 3",
            "SELECT * FROM (SELECT site, count(*) AS n FROM events GROUP BY site ORDER BY n LIMIT 3) g LIMIT 1",
            "SELECT site FROM (SELECT site, count(*) AS n FROM events GROUP BY site) g ORDER BY n + 0 DESC LIMIT 1",
        ],
        "deny-by-default",
        "count",
    );
}
