//! A usage-policy file → `PolicyHandle::load` (what `serve` and every
//! reload run: read the file, `PolicySet::compile` against the served
//! datasets, whose context parses row filters with DataFusion). A policy
//! that compiles is then used: the catalog and offers of every demo
//! principal, the columns each may see, and decisions on a few planned demo
//! queries (allowed and refused ones), so that a policy the compiler
//! accepts cannot make a decision panic either.
//!
//! Input: the YAML text, as it is on disk.

#![no_main]

use std::sync::OnceLock;

use datafusion::logical_expr::LogicalPlan;
use libfuzzer_sys::fuzz_target;
use sluice::query::plan;
use sluice::usage_policy::PolicyHandle;
use sluice_policy::QueryContext;

const QUERIES: [&str; 6] = [
    "SELECT mode, count(*) AS trips, round(avg(fare_eur), 2) FROM trips GROUP BY mode",
    "SELECT card_id, fare_eur FROM trips LIMIT 5",
    "SELECT event_id, machine_serial, event_time, temperature_c FROM machine_events WHERE fault_code = 'E-106'",
    "SELECT z.district, count(*) FROM trips t JOIN zones z ON t.start_zone = z.zone_id GROUP BY z.district",
    "SELECT * FROM zones UNION SELECT * FROM zones",
    "SELECT manufacturer, sum(energy_kwh) FROM machine_events GROUP BY manufacturer HAVING count(*) > 2",
];

/// The demo queries, planned once against the whole catalog and analyzed
/// (what the gate sees after `view::real_scans`).
fn plans() -> &'static [LogicalPlan] {
    static PLANS: OnceLock<Vec<LogicalPlan>> = OnceLock::new();
    PLANS.get_or_init(|| {
        let catalog = sluice_fuzz::demo().engine.catalog().clone();
        sluice_fuzz::run(async move {
            let state = catalog.session().state();
            let mut plans = Vec::new();
            for sql in QUERIES {
                let statement = plan::parse(&state, sql, 1 << 20).expect("demo SQL parses");
                let planned = plan::plan(&state, &catalog, statement)
                    .await
                    .expect("demo SQL plans");
                plans.push(plan::analyze(&state, planned).expect("demo plan analyzes"));
            }
            plans
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let demo = sluice_fuzz::demo();
    let plans = plans();
    let path = sluice_fuzz::scratch().join("policy.yaml");
    std::fs::write(&path, data).expect("writing the policy file");
    let catalog = demo.engine.catalog().clone();
    let Ok(handle) = PolicyHandle::load(Some(&path), b"fuzz-mask-key".to_vec(), catalog.clone())
    else {
        return;
    };
    let gate = handle.current();
    let state = catalog.session().state();
    let _ = gate.version();
    for selector in 0..6u8 {
        let principal = sluice_fuzz::principal(selector);
        if let Some(policy) = gate.policy_set() {
            for entry in policy.catalog(&principal) {
                let _ = format!("{entry:?}");
            }
            let _ = policy.is_admin(&principal);
            let _ = policy.offer(&principal, "trips/city-research");
        }
        for dataset in catalog.datasets() {
            let _ = gate.visible_columns(&principal, &dataset.name);
            let _ = gate.planning_view(&principal, &dataset.name);
        }
        for (i, plan) in plans.iter().enumerate() {
            let mut request = QueryContext::new(principal.clone());
            if i % 2 == 0 {
                request.purpose = Some("research".into());
            }
            if let Ok(approval) = gate.decide(&request, plan.clone()) {
                // The connector coerces the rewrite's types again.
                if let Ok(plan) = plan::analyze(&state, approval.plan) {
                    let _ = plan.display_indent_schema().to_string();
                }
            }
        }
    }
});
