#![allow(dead_code)] // each test binary uses a different part of the harness

//! Planning and executing SQL in the property tests, as the connector does:
//! plan, analyze (type coercion), decide, analyze the rewrite, execute.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::DFSchema;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use sluice_policy::PlanningContext;

/// What the policy compiler sees of a test session: the named datasets'
/// schemas, and DataFusion's parser for row filters.
pub struct Context {
    pub ctx: SessionContext,
    pub datasets: Vec<(&'static str, SchemaRef)>,
}

impl PlanningContext for Context {
    fn dataset_schema(&self, name: &str) -> Option<SchemaRef> {
        self.datasets
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, schema)| schema.clone())
    }

    fn parse_predicate(&self, sql: &str, schema: &DFSchema) -> datafusion::error::Result<Expr> {
        self.ctx.state().create_logical_expr(sql, schema)
    }
}

/// DataFusion executes (and plans some nodes) on tokio.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Runtime::new().expect("a tokio runtime"))
}

/// The analyzed plan of `sql`, or `None` when DataFusion refuses the query
/// (random SQL often does not plan; that is not what these tests test).
pub fn analyzed(ctx: &SessionContext, sql: &str) -> Option<LogicalPlan> {
    let state = ctx.state();
    let plan = runtime().block_on(state.create_logical_plan(sql)).ok()?;
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .ok()
}

/// Runs an approved plan (analyzing it again, as the connector does).
pub fn execute(ctx: &SessionContext, plan: LogicalPlan) -> Vec<RecordBatch> {
    runtime().block_on(async {
        let state = ctx.state();
        let plan = state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})
            .unwrap();
        let physical = state.create_physical_plan(&plan).await.unwrap();
        datafusion::physical_plan::collect(physical, ctx.task_ctx())
            .await
            .unwrap()
    })
}
