//! Planning and executing SQL in the property tests, as the connector does:
//! plan, analyze (type coercion), decide, analyze the rewrite, execute.

use datafusion::arrow::array::RecordBatch;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

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
