//! `dp.budget.period`: calendar periods and fixed N-day windows, checked
//! when the policy is loaded.

mod common;

use std::sync::Arc;

use common::Context;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::SessionContext;
use sluice_policy::{PolicyError, PolicySet, Principal};

fn policy(period: &str) -> String {
    format!(
        r#"
version: 1
datasets:
  people:
    privacy_unit: id
    columns:
      id: {{ class: important, tags: [personal] }}
consumers:
  - name: researchers
    match: {{ organization: Researchers }}
    grants:
      people:
        columns: {{ city: group_by_only, income: aggregate_only }}
        dp:
          epsilon_per_query: 0.5
          budget: {{ epsilon: 10.0, period: {period} }}
          columns: {{ income: {{ bounds: [0, 1000] }} }}
"#
    )
}

/// The compiled budget period of the researchers' offer.
fn compile(period: &str) -> Result<String, PolicyError> {
    let people: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("city", DataType::Utf8, true),
        Field::new("income", DataType::Float64, true),
    ]));
    let context = Context {
        ctx: SessionContext::new(),
        datasets: vec![("people", people)],
    };
    let set = PolicySet::compile("policy.yaml", &policy(period), &context, b"k")?;
    let mut researcher = Principal::new("spiffe://test/Researchers/r");
    researcher.organization = Some("Researchers".into());
    let catalog = set.catalog(&researcher);
    let dp = catalog[0].offers[0].dp.as_ref().expect("a dp offer");
    Ok(dp.budget.as_ref().expect("a budget").period.to_string())
}

#[test]
fn n_day_windows_are_accepted_in_canonical_form() {
    for (written, canonical) in [
        ("30d", "30d"),
        ("30 days", "30d"),
        ("30days", "30d"),
        ("\"30 days\"", "30d"),
        ("1d", "1d"),
        ("1 day", "1d"),
        ("3660d", "3660d"),
        ("day", "day"),
        ("month", "month"),
        ("year", "year"),
        ("total", "total"),
    ] {
        assert_eq!(compile(written).unwrap(), canonical, "{written}");
    }
}

#[test]
fn bad_periods_are_refused_naming_the_field() {
    for (written, hint) in [
        ("0d", "from 1 to 3660"),
        ("3661d", "from 1 to 3660"),
        ("99999999999999999999999d", "from 1 to 3660"),
        ("-3d", "is not a period"),
        ("30x", "is not a period"),
        ("weekly", "is not a period"),
        ("d", "is not a period"),
        ("1.5d", "is not a period"),
    ] {
        let err = compile(written).unwrap_err();
        assert!(
            err.field.ends_with("dp.budget.period"),
            "{written}: {}",
            err.field
        );
        assert!(err.message.contains(hint), "{written}: {}", err.message);
        assert!(err.message.contains("30d"), "{written}: {}", err.message);
    }
    let err = compile("30x").unwrap_err();
    assert!(
        err.message.contains(
            "use day, month, year, total, or a window of N days written `30d` or `30 days`"
        ),
        "{}",
        err.message
    );
}
