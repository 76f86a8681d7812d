//! The datasets a connector serves, registered as DataFusion tables.
//!
//! The [`Catalog`] owns the DataFusion session every query is planned in.
//! Each configured dataset (Parquet, CSV or newline-delimited JSON; a file
//! or a directory; schema declared or inferred) becomes a table in
//! `sluice.public`. Results use plain Arrow string and binary types rather
//! than the view types DataFusion prefers internally, because many Flight SQL
//! clients (JDBC, older ADBC and pyarrow builds) cannot read view types.
//!
//! The session is DataFusion's default one with these changes, each of which
//! bounds what one query can make the connector do (see
//! `crate::guard` and the "Limits on one query" section of
//! `docs/architecture.md`):
//! - every built-in scalar function runs behind its guard, and an optimizer
//!   rule puts the calls that bypass the registry (and `||`) behind theirs
//!   before any constant is folded;
//! - `input_file_name()`, `file_row_index()` and `version()` are removed:
//!   they disclose the server (file paths, file layout, engine version), and
//!   a function over constants passes the policy's function allow-list;
//! - the table functions `generate_series` and `range` are removed: the
//!   policy serves datasets only, and their arguments are evaluated while
//!   the SQL is planned, before any check could run.

use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
    TrackConsumersPool,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{SessionState, TaskContext};
use datafusion::optimizer::{Optimizer, OptimizerRule};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{
    CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionConfig, SessionContext,
};

use crate::guard;
use std::path::{Path, PathBuf};

use crate::config::{Config, DatabaseConfig, DatasetConfig, DatasetFormat, Location};

mod decoded;
pub mod file_table;
mod footers;
mod objects;
pub mod postgres;
mod source;
mod versions;

pub use decoded::{TableCache, keep_decoded};
pub use versions::DataReads;

pub use source::{SourceError, SourceExec, SourceFault, find_source_error};

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
    /// Where it is read from.
    pub location: Location,
}

impl Dataset {
    /// When the data last changed, for data on the connector's disk: the
    /// newest modification time of its file or of the files in its
    /// directory. `None` for a database or an object store.
    pub fn modified(&self) -> Option<std::time::SystemTime> {
        let path = self.location.local_path()?;
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
            .max()
    }
}

/// A configured dataset that could not be reached when the connector
/// started: it is not served, and a query naming it is told so.
#[derive(Debug, Clone)]
pub struct Unreached {
    pub name: String,
}

/// Why the served datasets could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A dataset could not be registered: its file is missing, unreadable
    /// or not of the configured format (the cause says which).
    #[error("dataset `{name}` ({})", path.display())]
    Dataset {
        name: String,
        path: std::path::PathBuf,
        #[source]
        source: DataFusionError,
    },
    /// A database relation cannot be served as configured (it does not
    /// exist, or a column has a type Sluice does not serve).
    #[error("dataset `{name}`")]
    Relation {
        name: String,
        #[source]
        source: postgres::DescribeError,
    },
    /// A `[[databases]]` entry cannot be used (its CA file).
    #[error("database `{name}`")]
    Database {
        name: String,
        #[source]
        source: postgres::pool::ConnectError,
    },
    /// The query engine could not be set up.
    #[error(transparent)]
    Engine(#[from] DataFusionError),
    /// The spill directory could not be emptied or created.
    #[error(
        "cannot prepare the spill directory {}: {cause}. It must be a directory this connector \
         may write (or set limits.spill_space = \"0\" to turn spilling off)",
        .path.display()
    )]
    SpillDirectory { path: PathBuf, cause: String },
}

/// The served datasets and the DataFusion session they are registered in.
pub struct Catalog {
    ctx: SessionContext,
    datasets: Vec<Dataset>,
    unreached: Vec<Unreached>,
    sources: source::Sources,
    /// Decoded copies of local datasets (`limits.table_cache`), and the
    /// datasets that may have one, in configuration order.
    table_cache: Option<Arc<TableCache>>,
    decoded_tables: Vec<Arc<decoded::DecodedTable>>,
}

impl Catalog {
    /// Registers every dataset of `config`. Fails naming the dataset that
    /// cannot be served as configured (a local file that cannot be opened,
    /// a relation that does not exist, a column type Sluice does not
    /// serve); a database or object store that cannot be reached only
    /// leaves its datasets out (see [`Catalog::unreached`]).
    /// `spill` says where sorts and aggregations spill: `serve` passes
    /// [`Spill::prepare`], a check that runs no query [`Spill::Off`].
    pub async fn open(config: &Config, spill: &Spill) -> Result<Self, CatalogError> {
        let sources = source::Sources::default();
        let ctx = SessionContext::new_with_state(session_state_reading(sources.clone(), spill)?);
        let databases = open_databases(&config.databases)?;
        let schemas = SchemaCache::new(&config.server.state_dir);
        let mut catalog = Self {
            ctx,
            datasets: Vec::with_capacity(config.datasets.len()),
            unreached: Vec::new(),
            sources: sources.clone(),
            table_cache: (config.limits.table_cache > 0)
                .then(|| TableCache::new(config.limits.table_cache)),
            decoded_tables: Vec::new(),
        };
        for ds in &config.datasets {
            let opened = match &ds.location {
                Location::Local(path) => {
                    sources.add(&ds.name, path);
                    register_files(&catalog.ctx, ds, &path.to_string_lossy())
                        .await
                        .map_err(|source| CatalogError::Dataset {
                            name: ds.name.clone(),
                            path: path.clone(),
                            source,
                        })?;
                    catalog.keep_decoded(ds, path).await?;
                    true
                }
                Location::Object(url) => {
                    sources.add_object(&ds.name, url);
                    catalog
                        .open_object_dataset(ds, url, &config.object_stores)
                        .await
                }
                Location::Database { database, relation } => {
                    let db = databases[database.as_str()].clone();
                    catalog.open_relation(ds, db, relation, &schemas).await?
                }
            };
            if !opened {
                catalog.unreached.push(Unreached {
                    name: ds.name.clone(),
                });
                continue;
            }
            let schema = catalog.ctx.table_provider(ds.name.as_str()).await?.schema();
            catalog.datasets.push(Dataset {
                name: ds.name.clone(),
                schema,
                description: ds.description.clone(),
                location: ds.location.clone(),
            });
        }
        Ok(catalog)
    }

    /// Puts the local dataset `ds`, registered from its files, behind a
    /// [`decoded::DecodedTable`] when it may be kept decoded.
    async fn keep_decoded(&mut self, ds: &DatasetConfig, path: &Path) -> Result<(), CatalogError> {
        let Some(cache) = &self.table_cache else {
            return Ok(());
        };
        // A scan of a partitioned dataset names only the partitions it
        // read in its release record; a copy's would name them all.
        if !ds.table_cache || !ds.partitions.is_empty() {
            return Ok(());
        }
        let files = self.ctx.table_provider(ds.name.as_str()).await?;
        let table = Arc::new(decoded::DecodedTable::new(
            &ds.name,
            path,
            matches!(ds.format, DatasetFormat::Parquet),
            files,
            cache.clone(),
        ));
        self.ctx.deregister_table(ds.name.as_str())?;
        self.ctx.register_table(ds.name.as_str(), table.clone())?;
        self.decoded_tables.push(table);
        Ok(())
    }

    /// Registers a dataset in an object store; `false` (logged, naming the
    /// dataset) if the store cannot be reached or read.
    async fn open_object_dataset(
        &self,
        ds: &DatasetConfig,
        url: &str,
        stores: &[crate::config::ObjectStoreConfig],
    ) -> bool {
        let Some(bucket) = crate::config::bucket_of(url) else {
            return false;
        };
        let config = stores.iter().find(|s| s.bucket == bucket);
        let store = match objects::s3_store(bucket, config) {
            Ok(store) => store,
            Err(e) => {
                tracing::error!(dataset = %ds.name, error = %e, "the dataset's object store cannot be set up; the dataset is not served");
                return false;
            }
        };
        let store_url = url::Url::parse(&format!("s3://{bucket}")).expect("a valid URL");
        self.ctx.register_object_store(&store_url, store);
        match register_files(&self.ctx, ds, url).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(dataset = %ds.name, error = %e, "the dataset's objects cannot be listed or read; the dataset is not served until the connector restarts");
                false
            }
        }
    }

    /// Registers a database relation, described by the database or, if it
    /// cannot be reached now, by the description saved when it last could;
    /// `false` (logged) if neither is available.
    async fn open_relation(
        &self,
        ds: &DatasetConfig,
        db: Arc<postgres::Database>,
        relation: &str,
        schemas: &SchemaCache,
    ) -> Result<bool, CatalogError> {
        let described = match postgres::describe(&db, relation).await {
            Ok(described) => {
                schemas.save(&ds.name, &described);
                described
            }
            Err(postgres::DescribeError::Unreachable { database, cause }) => {
                let Some(saved) = schemas.load(&ds.name) else {
                    tracing::error!(dataset = %ds.name, %database, %cause, "the dataset's database cannot be reached and its relation was never described; the dataset is not served until the connector restarts");
                    return Ok(false);
                };
                tracing::warn!(dataset = %ds.name, %database, %cause, "the dataset's database cannot be reached; serving it with the description saved when it last could (queries fail with UNAVAILABLE until it is back)");
                saved
            }
            Err(source) => {
                return Err(CatalogError::Relation {
                    name: ds.name.clone(),
                    source,
                });
            }
        };
        let table = postgres::PgTable::new(&ds.name, db, described).map_err(|source| {
            CatalogError::Relation {
                name: ds.name.clone(),
                source,
            }
        })?;
        self.ctx.register_table(ds.name.as_str(), Arc::new(table))?;
        Ok(true)
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

    /// The decoded copies, unless `limits.table_cache` is 0.
    pub fn table_cache(&self) -> Option<&Arc<TableCache>> {
        self.table_cache.as_ref()
    }

    fn decoded_tables(&self) -> &[Arc<decoded::DecodedTable>] {
        &self.decoded_tables
    }

    fn sources(&self) -> &source::Sources {
        &self.sources
    }

    /// Notes in `reads` the files each scan of `plan` was planned over.
    pub fn note_files(&self, plan: &Arc<dyn ExecutionPlan>, reads: &DataReads) {
        versions::note_files(plan, &self.sources, reads);
    }

    /// The DP answer cache's version key for `datasets` (see
    /// [`versions::cache_version`]); `None`: do not cache.
    pub fn cache_version(&self, datasets: &[String]) -> Option<String> {
        let locations: Vec<&Location> = datasets
            .iter()
            .map(|name| self.dataset(name).map(|d| &d.location))
            .collect::<Option<_>>()?;
        versions::cache_version(locations.into_iter())
    }

    /// The configured datasets that could not be reached at startup.
    pub fn unreached(&self) -> &[Unreached] {
        &self.unreached
    }

    /// A task context for `state` (a query's own session state) whose
    /// operators allocate from `pool` (see [`query_pool`]).
    pub fn task_context_with(state: &SessionState, pool: Arc<dyn MemoryPool>) -> Arc<TaskContext> {
        let mut runtime = (*state.runtime_env().clone()).clone();
        runtime.memory_pool = pool;
        Arc::new(TaskContext::from(state).with_runtime(Arc::new(runtime)))
    }
}

/// A memory pool private to one query, capped at `memory_limit` bytes and
/// drawing from `process`, which all queries share. Sorts and aggregations
/// that need more spill to disk (within `limits.spill_space` for all
/// queries); anything else fails with ResourcesExhausted.
///
/// With spilling on, the query's limit is shared fairly between its
/// spillable operators (DataFusion's `FairSpillPool`): under a first-come
/// pool the first aggregation takes everything, and the next one fails
/// instead of spilling.
pub fn query_pool(
    memory_limit: usize,
    process: &ProcessMemory,
    spilling: bool,
) -> Arc<dyn MemoryPool> {
    let top = std::num::NonZeroUsize::new(3).expect("non-zero");
    let query: Arc<dyn MemoryPool> = if spilling {
        Arc::new(TrackConsumersPool::new(
            FairSpillPool::new(memory_limit),
            top,
        ))
    } else {
        Arc::new(TrackConsumersPool::new(
            GreedyMemoryPool::new(memory_limit),
            top,
        ))
    };
    Arc::new(QueryPool {
        query,
        process: process.0.clone(),
    })
}

/// The start of the error a query gets when the memory all queries share
/// is in use (see `QueryError::from_execution` in the query module).
pub const PROCESS_MEMORY_IN_USE: &str = "the memory all running queries may hold together";

/// The memory all queries running at once may hold together
/// (`limits.total_query_memory`): without it, each of
/// `max_concurrent_queries` queries could hold its whole `query_memory`.
#[derive(Debug, Clone)]
pub struct ProcessMemory(Arc<GreedyMemoryPool>);

impl ProcessMemory {
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(GreedyMemoryPool::new(limit)))
    }

    /// Bytes held by all queries now.
    pub fn reserved(&self) -> usize {
        self.0.reserved()
    }
}

/// One query's pool: a reservation must fit both the query's own limit and
/// what is left of the process-wide one.
#[derive(Debug)]
struct QueryPool {
    query: Arc<dyn MemoryPool>,
    process: Arc<GreedyMemoryPool>,
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "query pool ({}, within {})", self.query, self.process)
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "sluice-query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.query.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.query.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.query.grow(reservation, additional);
        self.process.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.query.shrink(reservation, shrink);
        self.process.shrink(reservation, shrink);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        self.query.try_grow(reservation, additional)?;
        if self.process.try_grow(reservation, additional).is_err() {
            self.query.shrink(reservation, additional);
            return Err(datafusion::error::DataFusionError::ResourcesExhausted(
                format!(
                    "{PROCESS_MEMORY_IN_USE} (limits.total_query_memory, {}) is in use by the queries running now",
                    crate::config::human_bytes(match self.process.memory_limit() {
                        MemoryLimit::Finite(limit) => limit,
                        _ => 0,
                    })
                ),
            ));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.query.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.query.memory_limit()
    }
}

/// [`session_state_reading`] with no datasets, for tests.
#[cfg(test)]
pub(crate) fn session_state() -> Result<SessionState> {
    session_state_reading(source::Sources::default(), &Spill::Off)
}

/// DataFusion's default session with the connector's changes (see the
/// module documentation): guarded scalar functions and the rule that
/// guards every call first, no server-disclosing functions, no table
/// functions; the files of `sources` read through
/// [`source::SourceStore`], their failures named by dataset
/// ([`source::NameSourceFailures`], the last physical optimizer rule).
fn session_state_reading(sources: source::Sources, spill: &Spill) -> Result<SessionState> {
    let footers = Arc::new(footers::FooterCache::new(
        datafusion::execution::cache::cache_manager::DEFAULT_METADATA_CACHE_LIMIT,
        sources.clone(),
    ));
    let runtime = base_runtime(spill, Arc::clone(&footers))?;
    let mut config = session_config();
    if let Spill::Directory {
        sort_reservation, ..
    } = spill
    {
        config.options_mut().execution.sort_spill_reservation_bytes = *sort_reservation;
    }
    runtime.register_object_store(
        datafusion::datasource::object_store::ObjectStoreUrl::local_filesystem().as_ref(),
        Arc::new(source::SourceStore::new(sources.clone())),
    );
    let name_failures = source::NameSourceFailures {
        sources,
        stores: Arc::clone(&runtime.object_store_registry),
        footers,
    };
    let mut builder = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(name_failures));
    let defaults = builder.scalar_functions().take().unwrap_or_default();
    let mut rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> = vec![Arc::new(guard::GuardCalls)];
    rules.extend(Optimizer::new().rules);
    Ok(builder
        .with_scalar_functions(guard::session_functions(defaults))
        .with_table_functions(Default::default())
        .with_optimizer_rules(rules)
        .build())
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

/// Where sorts and aggregations that outgrow `limits.query_memory` write
/// what they spill.
pub enum Spill {
    Off,
    /// This process's own directory, `<state_dir>/spill/p<pid>`, the disk
    /// all its queries may fill there together, and what each sort
    /// partition reserves up front for merging its spilled runs.
    Directory {
        path: PathBuf,
        max_bytes: u64,
        sort_reservation: usize,
    },
}

impl Spill {
    /// Removes what dead processes left in `<state_dir>/spill` (spill files
    /// hold rows of the data and must not outlive the process that wrote
    /// them; a crash leaves them behind), then, unless `max_bytes` is 0,
    /// creates this process's own directory there. Directories of live
    /// processes (another `serve` on the same state directory, say) are
    /// left alone.
    pub fn prepare(
        state_dir: &Path,
        max_bytes: u64,
        query_memory: usize,
    ) -> Result<Self, CatalogError> {
        let base = state_dir.join("spill");
        let failed = |path: &Path, e: std::io::Error| CatalogError::SpillDirectory {
            path: path.to_path_buf(),
            cause: e.to_string(),
        };
        remove_stale_spill(&base).map_err(|e| failed(&base, e))?;
        if max_bytes == 0 {
            return Ok(Spill::Off);
        }
        let path = base.join(format!("p{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| failed(&path, e))?;
        // DataFusion reserves 10 MiB per sort partition up front once
        // spilling is on, which would take most of a small query's memory
        // before a row is sorted: a quarter of the query's share per
        // partition leaves room for the data.
        let partitions = std::thread::available_parallelism().map_or(1, usize::from);
        let sort_reservation = (query_memory / (4 * partitions)).clamp(256 << 10, 10 << 20);
        Ok(Spill::Directory {
            path,
            max_bytes,
            sort_reservation,
        })
    }

    fn disk_manager(&self) -> DiskManagerBuilder {
        match self {
            Spill::Off => DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            Spill::Directory {
                path, max_bytes, ..
            } => DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![path.clone()]))
                .with_max_temp_directory_size(*max_bytes),
        }
    }
}

/// Removes every entry of `base` except the directories of live processes
/// (`p<pid>` with `/proc/<pid>` present; this process starts afresh).
fn remove_stale_spill(base: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(base) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let own = std::process::id();
    // Another connector starting on the same state directory may clean up
    // at the same time: an entry that is already gone is not an error.
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let live = entry
            .file_name()
            .to_str()
            .and_then(|name| name.strip_prefix('p'))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| pid != own && Path::new("/proc").join(pid.to_string()).exists());
        if live {
            continue;
        }
        // A symlink is removed, never followed.
        let removed = match entry.file_type() {
            Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(entry.path()),
            Ok(_) => std::fs::remove_file(entry.path()),
            Err(e) => Err(e),
        };
        match removed {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn base_runtime(
    spill: &Spill,
    footers: Arc<footers::FooterCache>,
) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>> {
    use datafusion::execution::cache::cache_manager::CacheManagerConfig;
    RuntimeEnvBuilder::new()
        // Data is live: every query lists a dataset's directory or prefix
        // again, so that files added or removed since are seen (DataFusion
        // would otherwise keep the first listing for ever). Parquet footers
        // are kept only while they are still their files' (`footers`);
        // per-file statistics, which DataFusion would keep by size and
        // modification time alone, are computed from them at each query.
        .with_cache_manager(
            CacheManagerConfig::default()
                .with_list_files_cache_limit(0)
                .with_file_statistics_cache_limit(0)
                .with_file_metadata_cache(Some(footers)),
        )
        .with_disk_manager_builder(spill.disk_manager())
        .build_arc()
}

/// The pools of the `[[databases]]` entries, by name.
fn open_databases(
    configs: &[DatabaseConfig],
) -> Result<std::collections::HashMap<&str, Arc<postgres::Database>>, CatalogError> {
    configs
        .iter()
        .map(|c| {
            let db =
                postgres::Database::new(c.clone()).map_err(|source| CatalogError::Database {
                    name: c.name.clone(),
                    source,
                })?;
            Ok((c.name.as_str(), Arc::new(db)))
        })
        .collect()
}

/// Relation descriptions saved in the state directory, so that a dataset
/// whose database is down when the connector starts is still served (and
/// governed by the policy), failing with UNAVAILABLE until it is back.
struct SchemaCache {
    dir: std::path::PathBuf,
}

impl SchemaCache {
    fn new(state_dir: &std::path::Path) -> Self {
        Self {
            dir: state_dir.join("sources"),
        }
    }

    fn file(&self, dataset: &str) -> std::path::PathBuf {
        self.dir.join(format!("{dataset}.relation.json"))
    }

    fn save(&self, dataset: &str, relation: &postgres::Relation) {
        let saved = std::fs::create_dir_all(&self.dir).and_then(|()| {
            let text = serde_json::to_vec_pretty(relation).map_err(std::io::Error::other)?;
            let temporary = self.file(&format!("{dataset}.tmp"));
            std::fs::write(&temporary, text)?;
            std::fs::rename(&temporary, self.file(dataset))
        });
        if let Err(e) = saved {
            tracing::warn!(dataset, error = %e, "the relation's description could not be saved in the state directory");
        }
    }

    fn load(&self, dataset: &str) -> Option<postgres::Relation> {
        let text = std::fs::read(self.file(dataset)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// Registers a dataset of files at `location` (a local path or an
/// `s3://` URL): one file, or a directory of them (hive-style partitioned
/// if the dataset declares partition columns).
async fn register_files(ctx: &SessionContext, ds: &DatasetConfig, location: &str) -> Result<()> {
    let is_dir = match &ds.location {
        Location::Local(path) => path.is_dir(),
        _ => location.ends_with('/'),
    };
    let mut location = location.to_string();
    let extension = if is_dir {
        if !location.ends_with('/') {
            location.push('/');
        }
        ds.format.extension().to_string()
    } else {
        std::path::Path::new(&location)
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
    let partitions: Vec<(String, datafusion::arrow::datatypes::DataType)> = ds
        .partitions
        .iter()
        .map(|c| (c.name.clone(), c.data_type.clone()))
        .collect();
    let name = ds.name.as_str();
    match ds.format {
        DatasetFormat::Parquet => {
            let mut opts = ParquetReadOptions::default()
                .file_extension(&extension)
                .table_partition_cols(partitions);
            if let Some(schema) = &declared {
                opts = opts.schema(schema);
            }
            ctx.register_parquet(name, &location, opts).await?;
        }
        DatasetFormat::Csv => {
            let mut opts = CsvReadOptions::new()
                .has_header(ds.csv.has_header)
                .delimiter(ds.csv.delimiter)
                .file_extension(&extension)
                .table_partition_cols(partitions);
            if let Some(schema) = &declared {
                opts = opts.schema(schema);
            }
            ctx.register_csv(name, &location, opts).await?;
        }
        DatasetFormat::Json => {
            let mut opts = JsonReadOptions::default()
                .file_extension(&extension)
                .table_partition_cols(partitions);
            if let Some(schema) = &declared {
                opts = opts.schema(schema);
            }
            ctx.register_json(name, &location, opts).await?;
        }
        DatasetFormat::Postgres => {
            return Err(DataFusionError::Internal(
                "a postgres dataset has no files".into(),
            ));
        }
    }
    // Scans that keep their shape on a connector with workers.
    let files = ctx.table_provider(name).await?;
    if let Some(table) = file_table::FileTable::wrap(&files) {
        ctx.deregister_table(name)?;
        ctx.register_table(name, Arc::new(table))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query's scan keeps the footer of a settled file, and the next
    /// queries are served it (`footers::FooterCache`; its own tests show
    /// when it must not be).
    #[tokio::test]
    async fn queries_keep_the_footers_of_settled_files() {
        tokio::spawn(async {
            use datafusion::arrow::array::Int64Array;
            use datafusion::arrow::record_batch::RecordBatch;
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("t.parquet");
            let schema = Arc::new(Schema::new(vec![Field::new(
                "x",
                datafusion::arrow::datatypes::DataType::Int64,
                false,
            )]));
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from_iter_values(0..1000))],
            )
            .unwrap();
            let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
                std::fs::File::create(&file).unwrap(),
                schema,
                None,
            )
            .unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
            tokio::time::sleep(footers::SETTLING + std::time::Duration::from_millis(100)).await;

            let sources = source::Sources::default();
            sources.add("t", &file);
            let ctx = SessionContext::new_with_state(
                session_state_reading(sources, &Spill::Off).unwrap(),
            );
            ctx.register_parquet("t", file.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            let kept = ctx.runtime_env().cache_manager.get_file_metadata_cache();
            let mut hits = Vec::new();
            for _ in 0..3 {
                let rows = ctx
                    .sql("SELECT count(*) FROM t WHERE x > 500")
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap();
                assert_eq!(rows[0].num_rows(), 1);
                let entries = kept.list_entries();
                assert_eq!(entries.len(), 1, "the footer was not kept");
                hits.push(entries.values().next().unwrap().hits);
            }
            // Kept by the first query's scan; served to the planning and
            // the scan of the next ones.
            assert!(hits[0] < hits[1] && hits[1] < hits[2], "{hits:?}");
        })
        .await
        .unwrap();
    }

    #[test]
    fn stale_spill_of_dead_processes_is_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("spill");
        let dead = base.join("p4000000000"); // above any pid_max
        let live = base.join("p1"); // init: always running
        let own = base.join(format!("p{}", std::process::id()));
        for d in [&dead, &live, &own] {
            std::fs::create_dir_all(d.join("datafusion-x")).unwrap();
            std::fs::write(d.join("datafusion-x/rows.arrow"), b"rows").unwrap();
        }
        std::fs::write(base.join("stray.arrow"), b"rows").unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("plink")).unwrap();

        let spill = Spill::prepare(dir.path(), 1 << 20, 64 << 20).unwrap();
        assert!(!dead.exists() && !base.join("stray.arrow").exists());
        assert!(
            live.join("datafusion-x/rows.arrow").exists(),
            "a live process keeps its files"
        );
        assert!(!base.join("plink").exists());
        assert!(
            outside.join("keep").exists(),
            "a symlink is removed, not followed"
        );
        match spill {
            Spill::Directory {
                path,
                sort_reservation,
                ..
            } => {
                assert_eq!(path, own);
                assert!(path.is_dir() && std::fs::read_dir(&path).unwrap().next().is_none());
                assert!((256 << 10..=10 << 20).contains(&sort_reservation));
            }
            Spill::Off => panic!("spilling was asked for"),
        }
        // Connectors starting together clean up together without failing.
        for i in 0..20 {
            std::fs::create_dir_all(
                base.join(format!("p{}/datafusion-{i}/x", 4_000_000_000u32 + i)),
            )
            .unwrap();
        }
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| remove_stale_spill(&base).unwrap());
            }
        });
        assert!(live.exists());
        // Off still cleans up, and creates nothing.
        assert!(matches!(
            Spill::prepare(dir.path(), 0, 64 << 20).unwrap(),
            Spill::Off
        ));
        assert!(!own.exists());
        assert!(live.exists());
    }

    #[test]
    fn queries_share_the_process_memory_and_return_it() {
        let process = ProcessMemory::new(1000);
        let first = query_pool(800, &process, false);
        let second = query_pool(800, &process, false);
        let a = MemoryConsumer::new("a").register(&first);
        let b = MemoryConsumer::new("b").register(&second);
        a.try_grow(600).unwrap();
        // Within its own limit, beyond what the other query left.
        let refused = b.try_grow(600).unwrap_err().to_string();
        assert!(refused.contains(PROCESS_MEMORY_IN_USE), "{refused}");
        assert!(refused.contains("limits.total_query_memory"), "{refused}");
        // The refused reservation took nothing from its own query's pool.
        assert_eq!(second.reserved(), 0);
        b.try_grow(400).unwrap();
        assert_eq!(process.reserved(), 1000);
        // A query's own limit still applies first.
        assert!(a.try_grow(300).is_err());
        drop(a);
        assert_eq!(process.reserved(), 400);
        b.try_grow(400).unwrap();
        drop(b);
        assert_eq!(process.reserved(), 0);
    }
}

/// The function guards at work in this session.
#[cfg(test)]
mod guarded_functions;
