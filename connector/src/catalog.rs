//! The datasets a connector serves, registered as DataFusion tables.
//!
//! The [`Catalog`] owns the DataFusion session every query is planned in.
//! Each configured dataset (Parquet, CSV or newline-delimited JSON; a file
//! or a directory; schema declared or inferred) becomes a table in
//! `sluice.public`. Results use plain Arrow string and binary types rather
//! than the view types DataFusion prefers internally, because many Flight SQL
//! clients (JDBC, older ADBC and pyarrow builds) cannot read view types.

use std::sync::Arc;

use anyhow::{Context, Result};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::execution::TaskContext;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{
    CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionConfig, SessionContext,
};

use crate::config::{DatasetConfig, DatasetFormat};

/// Catalog and schema every dataset lives in.
pub const CATALOG: &str = "sluice";
pub const SCHEMA: &str = "public";
/// The only table type Sluice serves.
pub const TABLE_TYPE: &str = "TABLE";

/// What the catalog knows about one served dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub schema: SchemaRef,
    pub description: Option<String>,
    /// The file or directory it is read from.
    pub path: std::path::PathBuf,
}

impl Dataset {
    /// When the data last changed: the newest modification time of its file
    /// or of the files in its directory.
    pub fn modified(&self) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(&self.path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(&self.path)
            .ok()?
            .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
            .max()
    }
}

/// The served datasets and the DataFusion session they are registered in.
pub struct Catalog {
    ctx: SessionContext,
    datasets: Vec<Dataset>,
}

impl Catalog {
    /// Registers every dataset; fails naming the dataset and path that could
    /// not be opened.
    pub async fn open(datasets: &[DatasetConfig]) -> Result<Self> {
        let ctx = SessionContext::new_with_config_rt(session_config(), base_runtime()?);
        let mut served = Vec::with_capacity(datasets.len());
        for ds in datasets {
            register(&ctx, ds)
                .await
                .with_context(|| format!("dataset `{}` ({})", ds.name, ds.path.display()))?;
            let schema = ctx.table_provider(ds.name.as_str()).await?.schema();
            served.push(Dataset {
                name: ds.name.clone(),
                schema,
                description: ds.description.clone(),
                path: ds.path.clone(),
            });
        }
        Ok(Self {
            ctx,
            datasets: served,
        })
    }

    pub fn session(&self) -> &SessionContext {
        &self.ctx
    }

    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }

    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// A task context whose memory pool is private to one query and capped at
    /// `memory_limit` bytes. Spilling is disabled, so a query that needs more
    /// fails with ResourcesExhausted instead of filling the disk.
    pub fn task_context(&self, memory_limit: usize) -> Arc<TaskContext> {
        let state = self.ctx.state();
        let mut runtime = (*state.runtime_env().clone()).clone();
        runtime.memory_pool = Arc::new(TrackConsumersPool::new(
            GreedyMemoryPool::new(memory_limit),
            std::num::NonZeroUsize::new(3).expect("non-zero"),
        ));
        Arc::new(TaskContext::from(&state).with_runtime(Arc::new(runtime)))
    }
}

/// Settings shared by planning and execution.
pub fn session_config() -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_default_catalog_and_schema(CATALOG, SCHEMA)
        .with_information_schema(false);
    let options = config.options_mut();
    options.execution.parquet.schema_force_view_types = false;
    options.sql_parser.map_string_types_to_utf8view = false;
    config
}

fn base_runtime() -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>> {
    Ok(RuntimeEnvBuilder::new()
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()?)
}

async fn register(ctx: &SessionContext, ds: &DatasetConfig) -> Result<()> {
    let is_dir = ds.path.is_dir();
    let mut location = ds.path.to_string_lossy().into_owned();
    let extension = if is_dir {
        if !location.ends_with('/') {
            location.push('/');
        }
        ds.format.extension().to_string()
    } else {
        ds.path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default()
    };
    let declared: Option<Schema> = ds.schema.as_ref().map(|cols| {
        Schema::new(
            cols.iter()
                .map(|c| Field::new(&c.name, c.data_type.clone(), c.nullable))
                .collect::<Vec<_>>(),
        )
    });
    let name = ds.name.as_str();
    match ds.format {
        DatasetFormat::Parquet => {
            let mut opts = ParquetReadOptions::default().file_extension(&extension);
            if let Some(schema) = &declared {
                opts = opts.schema(schema);
            }
            ctx.register_parquet(name, &location, opts).await?;
        }
        DatasetFormat::Csv => {
            let mut opts = CsvReadOptions::new()
                .has_header(ds.csv.has_header)
                .delimiter(ds.csv.delimiter)
                .file_extension(&extension);
            if let Some(schema) = &declared {
                opts = opts.schema(schema);
            }
            ctx.register_csv(name, &location, opts).await?;
        }
        DatasetFormat::Json => {
            let mut opts = JsonReadOptions::default().file_extension(&extension);
            if let Some(schema) = &declared {
                opts = opts.schema(schema);
            }
            ctx.register_json(name, &location, opts).await?;
        }
    }
    Ok(())
}
