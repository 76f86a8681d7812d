//! A dataset's files as DataFusion lists and scans them (`ListingTable`),
//! with one difference on a connector with workers: every scan has the
//! same shape, whatever the listing finds.
//!
//! DataFusion plans a scan that finds no file (no partition directory
//! matches the query's filters) as an `EmptyExec`, which it knows holds
//! exactly nothing: it then answers `count(*)` without scanning, gathers
//! that side of a join, drops a limit. A scan of one file has one
//! partition, a scan of many has one per core. On a connector with
//! workers the plan's stages are an output (`EXPLAIN POLICY` shows them),
//! so there ([`ScanShapes`] set on the session, by
//! `query/independent.rs`) a scan is always a file scan with a partition
//! per core and nothing known of its rows: an empty one has empty
//! partitions. With [`ScanShapes::WithoutListing`] (`EXPLAIN POLICY`), no
//! file is listed at all: the stages are those of any listing.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::common::Statistics;
use datafusion::datasource::listing::{ListingTable, ListingTableUrl};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchemaBuilder;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;

/// How scans of [`FileTable`]s are planned, when set on the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanShapes {
    /// Files are listed; the scan has a partition per core whatever
    /// matched.
    Fixed,
    /// Nothing is listed: a scan of no file, with a partition per core.
    WithoutListing,
}

/// A `ListingTable` whose scans keep one shape under [`ScanShapes`].
#[derive(Debug)]
pub struct FileTable {
    files: Arc<ListingTable>,
}

impl FileTable {
    /// `files` wrapped, if it is a `ListingTable`.
    pub fn wrap(files: &Arc<dyn TableProvider>) -> Option<Self> {
        let listing = files.downcast_ref::<ListingTable>()?;
        Some(Self {
            files: Arc::new(listing.clone()),
        })
    }

    /// `plan`, DataFusion's scan of what the listing found, with a
    /// partition per core ([`ScanShapes::Fixed`]).
    async fn shaped(
        &self,
        state: &dyn Session,
        plan: Arc<dyn ExecutionPlan>,
        projection: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if plan.is::<EmptyExec>() {
            return self.without_files(state, projection, limit).await;
        }
        let partitions = state.config().target_partitions().max(1);
        let Some(scan) = plan.downcast_ref::<DataSourceExec>() else {
            return Ok(plan);
        };
        let Some(files) = scan.data_source().downcast_ref::<FileScanConfig>() else {
            return Ok(plan);
        };
        if files.file_groups.len() >= partitions {
            return Ok(plan);
        }
        // Fewer files than cores: the missing partitions are empty.
        let mut groups = files.file_groups.clone();
        groups.resize_with(partitions, || FileGroup::new(Vec::new()));
        let config = FileScanConfigBuilder::from(files.clone())
            .with_file_groups(groups)
            .build();
        Ok(Arc::new(scan.clone().with_data_source(Arc::new(config))))
    }

    /// A scan of no file, with a partition per core and nothing known of
    /// its rows: the plan over it is the plan over files.
    async fn without_files(
        &self,
        state: &dyn Session,
        projection: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = self.files.schema();
        let Some(store) = self
            .files
            .table_paths()
            .first()
            .map(ListingTableUrl::object_store)
        else {
            return Ok(Arc::new(EmptyExec::new(schema)));
        };
        let options = self.files.options();
        // The partition columns come last in the table's schema.
        let file_fields = schema
            .fields()
            .len()
            .saturating_sub(options.table_partition_cols.len());
        let file_schema = Arc::new(Schema::new(schema.fields()[..file_fields].to_vec()));
        let partition_cols: Vec<_> = options
            .table_partition_cols
            .iter()
            .map(|(name, data_type)| Arc::new(Field::new(name, data_type.clone(), false)))
            .collect();
        let table_schema = TableSchemaBuilder::new(file_schema)
            .with_table_partition_cols(partition_cols)
            .build();
        let partitions = state.config().target_partitions().max(1);
        let config = FileScanConfigBuilder::new(store, options.format.file_source(table_schema))
            .with_file_groups(vec![FileGroup::new(Vec::new()); partitions])
            .with_statistics(Statistics::new_unknown(&schema))
            .with_projection_indices(projection.map(<[usize]>::to_vec))?
            .with_limit(limit)
            .build();
        options.format.create_physical_plan(state, config).await
    }
}

fn shapes(state: &dyn Session) -> Option<ScanShapes> {
    state
        .config()
        .get_extension::<ScanShapes>()
        .map(|shapes| *shapes)
}

#[async_trait]
impl TableProvider for FileTable {
    fn schema(&self) -> SchemaRef {
        self.files.schema()
    }

    fn table_type(&self) -> TableType {
        self.files.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.files.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projected = projection.map(Vec::as_slice);
        match shapes(state) {
            None => self.files.scan(state, projection, filters, limit).await,
            Some(ScanShapes::WithoutListing) => self.without_files(state, projected, limit).await,
            Some(ScanShapes::Fixed) => {
                let plan = self.files.scan(state, projection, filters, limit).await?;
                self.shaped(state, plan, projected, limit).await
            }
        }
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> Result<ScanResult> {
        let projection = args.projection().map(<[usize]>::to_vec);
        let limit = args.limit();
        match shapes(state) {
            None => self.files.scan_with_args(state, args).await,
            Some(ScanShapes::WithoutListing) => self
                .without_files(state, projection.as_deref(), limit)
                .await
                .map(ScanResult::from),
            Some(ScanShapes::Fixed) => {
                let plan = self.files.scan_with_args(state, args).await?.into_inner();
                self.shaped(state, plan, projection.as_deref(), limit)
                    .await
                    .map(ScanResult::from)
            }
        }
    }
}
