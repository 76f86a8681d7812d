//! Step 2, per caller: a query is planned against the caller's own view of
//! the catalog, so what it may not use does not exist for it.
//!
//! A dataset the caller has no grant for is not in its view, and neither is
//! a column its grant hides. A query naming either gets exactly the error a
//! name that exists nowhere gets, DataFusion's hints list only names the
//! caller may use, `SELECT *` expands to those, and no type error can reveal
//! a hidden column's type. (The policy still checks every use: the view only
//! keeps planning itself from answering questions.)
//!
//! ```text
//! statement ─▶ view of the caller (VisibleTable per dataset it may use) ─▶ LogicalPlan
//!           ─▶ real_scans: each scan of a view becomes a projected scan of the real table
//! ```

use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, Session, TableProvider,
};
use datafusion::common::tree_node::Transformed;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionState;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::logical_plan::{TableScan, TableScanBuilder};
use datafusion::logical_expr::{Expr, LogicalPlan, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::parser::Statement;
use sluice_policy::{PlanGate, PlanningView, Principal};

use super::QueryError;
use super::plan;
use crate::catalog::{CATALOG, Catalog, SCHEMA};

/// The session `principal`'s queries are planned in: the catalog holds only
/// the datasets it may use, each with only the columns it may name.
pub async fn session_for(
    state: &SessionState,
    catalog: &Catalog,
    gate: &dyn PlanGate,
    principal: &Principal,
) -> Result<SessionState, QueryError> {
    let schema = MemorySchemaProvider::new();
    for dataset in catalog.datasets() {
        let full = catalog
            .session()
            .table_provider(dataset.name.as_str())
            .await
            .map_err(|e| QueryError::Internal(format!("dataset `{}`: {e}", dataset.name)))?;
        let Some(table) = visible_table(full, gate, principal, &dataset.name) else {
            continue;
        };
        schema
            .register_table(dataset.name.clone(), table)
            .map_err(|e| QueryError::Internal(format!("building the caller's view: {e}")))?;
    }
    let sluice = MemoryCatalogProvider::new();
    sluice
        .register_schema(SCHEMA, Arc::new(schema))
        .map_err(|e| QueryError::Internal(format!("building the caller's view: {e}")))?;
    let catalogs = MemoryCatalogProviderList::new();
    catalogs.register_catalog(CATALOG.to_string(), Arc::new(sluice));
    Ok(SessionStateBuilder::new_from_existing(state.clone())
        .with_catalog_list(Arc::new(catalogs))
        .build())
}

/// The dataset as `principal` may see it, `None` if not at all.
fn visible_table(
    full: Arc<dyn TableProvider>,
    gate: &dyn PlanGate,
    principal: &Principal,
    dataset: &str,
) -> Option<Arc<dyn TableProvider>> {
    let indices: Vec<usize> = match gate.planning_view(principal, dataset) {
        PlanningView::Hidden => return None,
        PlanningView::All => (0..full.schema().fields().len()).collect(),
        PlanningView::Columns(names) => full
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| names.contains(f.name()))
            .map(|(i, _)| i)
            .collect(),
    };
    Some(Arc::new(VisibleTable::new(full, indices)))
}

/// Refuses a table the caller cannot see with the same message as a table
/// that does not exist.
pub fn check_tables_visible(view: &SessionState, statement: &Statement) -> Result<(), QueryError> {
    let references = view
        .resolve_table_references(statement)
        .map_err(QueryError::from_planning)?;
    for table in references {
        let served_namespace = table.catalog().is_none_or(|c| c == CATALOG)
            && table.schema().is_none_or(|s| s == SCHEMA);
        let visible = served_namespace
            && view
                .catalog_list()
                .catalog(CATALOG)
                .and_then(|c| c.schema(SCHEMA))
                .is_some_and(|s| s.table_exist(table.table()));
        if !visible {
            return Err(plan::no_such_table(&table));
        }
    }
    Ok(())
}

/// Replaces every scan of a view (subqueries included) with a scan of the
/// real table, projected to the same columns: the plan above is unchanged,
/// and the rewrite can reach the columns the policy needs.
pub fn real_scans(plan: LogicalPlan) -> Result<LogicalPlan, QueryError> {
    plan.transform_up_with_subqueries(|node| match node {
        LogicalPlan::TableScan(scan) => real_scan(scan),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
    .map_err(QueryError::from_planning)
}

fn real_scan(scan: TableScan) -> DfResult<Transformed<LogicalPlan>> {
    let provider = source_as_provider(&scan.source)?;
    let Some(view) = provider.downcast_ref::<VisibleTable>() else {
        return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
    };
    let projection = match &scan.projection {
        None => view.indices.clone(),
        Some(picked) => picked.iter().map(|i| view.indices[*i]).collect(),
    };
    let real = TableScanBuilder::new(scan.table_name, provider_as_source(view.full.clone()))
        .with_projection(Some(projection))
        .with_filters(scan.filters)
        .with_fetch(scan.fetch)
        .build()?;
    Ok(Transformed::yes(LogicalPlan::TableScan(real)))
}

/// A dataset seen through a principal's grant: the columns it may name, in
/// the dataset's order, with their real types. Only planned, never read:
/// [`real_scans`] puts the real table in its place.
#[derive(Debug)]
struct VisibleTable {
    full: Arc<dyn TableProvider>,
    /// Positions of the visible columns in the real table.
    indices: Vec<usize>,
    schema: SchemaRef,
}

impl VisibleTable {
    fn new(full: Arc<dyn TableProvider>, indices: Vec<usize>) -> Self {
        let real = full.schema();
        let fields: Vec<_> = indices.iter().map(|i| real.field(*i).clone()).collect();
        let schema = Arc::new(Schema::new_with_metadata(fields, real.metadata().clone()));
        Self {
            full,
            indices,
            schema,
        }
    }
}

#[tonic::async_trait]
impl TableProvider for VisibleTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _: &dyn Session,
        _: Option<&Vec<usize>>,
        _: &[Expr],
        _: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Internal(
            "a caller's view of a dataset is only planned, never read".into(),
        ))
    }
}
