//! Datasets on the connector's disk kept decoded in memory
//! (`limits.table_cache`), so that a query over them parses no CSV and
//! decodes no Parquet.
//!
//! ```text
//! scan ─▶ files unchanged since decoded? ─yes─▶ the decoded batches (what a scan of the files gives)
//!                                        └no──▶ the files, as without the cache
//! keeper (every KEEP_INTERVAL) ─▶ decode what changed or is not held yet, within the budget
//! ```
//!
//! A scan serves the decoded copy only while every file of the dataset has
//! the size, modification time, change time and inode it had when it was
//! decoded; it checks that (a `stat` per file) at each scan, so a query
//! never reads an older version of the data than the files hold, and a
//! missing or replaced file is read from disk, failing or answering exactly
//! as it would without the cache. A query whose scan began from the copy
//! reads that copy to the end, a consistent snapshot, even if the file
//! changes meanwhile. Its release record names the same version (files,
//! times, digest) a scan of those files would.
//!
//! What is decoded, and when, depends only on the configuration and the
//! files: datasets in configuration order, decoded at start and after their
//! files change, never because of a query. So how fast a query runs says
//! nothing about what other consumers asked.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;

use super::source::Sources;
use super::versions::{self, DataReads};

/// How often the keeper looks for datasets to decode (again).
pub const KEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The decoded copies, within a budget of bytes for all of them.
#[derive(Debug)]
pub struct TableCache {
    budget: usize,
    held: RwLock<BTreeMap<String, Arc<Decoded>>>,
    /// Datasets not decoded at these versions of their files (too large
    /// for what is left of the budget, or unreadable): tried again once
    /// their files change.
    passed_over: Mutex<BTreeMap<String, FilesVersion>>,
}

/// One dataset's decoded batches, with the version of its files they are.
#[derive(Debug)]
struct Decoded {
    files: FilesVersion,
    /// What a query reading it notes for its release record.
    read_note: String,
    partitions: Vec<Vec<RecordBatch>>,
    bytes: usize,
}

/// Every file of a local dataset as `stat` describes it now: path, size,
/// modification and change times (ns), inode. A file rewritten in place
/// changes its change time; one replaced by a rename, its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FilesVersion(Vec<(PathBuf, u64, i128, i128, u64)>);

impl FilesVersion {
    /// `None` when the dataset's file or directory cannot be read.
    fn now(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let files = if meta.is_dir() {
            versions::walk(path)
        } else {
            vec![path.to_path_buf()]
        };
        let mut described = Vec::with_capacity(files.len());
        for file in files {
            let m = std::fs::metadata(&file).ok()?;
            let nanos = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
            described.push((
                file,
                m.len(),
                nanos(m.mtime(), m.mtime_nsec()),
                nanos(m.ctime(), m.ctime_nsec()),
                m.ino(),
            ));
        }
        described.sort();
        Some(Self(described))
    }

    fn bytes_on_disk(&self) -> u64 {
        self.0.iter().map(|f| f.1).sum()
    }
}

impl TableCache {
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            budget,
            held: RwLock::default(),
            passed_over: Mutex::default(),
        })
    }

    /// Bytes of decoded batches held now.
    pub fn bytes(&self) -> usize {
        self.read().values().map(|d| d.bytes).sum()
    }

    /// The copy of `dataset` if its files at `path` are still the ones it
    /// was decoded from.
    fn fresh(&self, dataset: &str, path: &Path) -> Option<Arc<Decoded>> {
        let decoded = self.read().get(dataset).cloned()?;
        (FilesVersion::now(path).as_ref() == Some(&decoded.files)).then_some(decoded)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Decoded>>> {
        self.held.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Decoded>>> {
        self.held.write().unwrap_or_else(|e| e.into_inner())
    }

    fn passed_over(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FilesVersion>> {
        self.passed_over.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings every table up to date with its files, in order: drops the
    /// copies whose files changed, then decodes what is not held, as long
    /// as it fits in what the others leave of the budget.
    pub async fn keep(
        &self,
        tables: &[Arc<DecodedTable>],
        state: &SessionState,
        sources: &Sources,
    ) {
        for table in tables {
            let Some(files) = FilesVersion::now(&table.path) else {
                self.write().remove(&table.dataset);
                continue;
            };
            let held = self.read().get(&table.dataset).map(|d| d.files == files);
            match held {
                Some(true) => continue,
                Some(false) => {
                    self.write().remove(&table.dataset);
                }
                None => {}
            }
            if self.passed_over().get(&table.dataset) == Some(&files) {
                continue;
            }
            let room = self.budget.saturating_sub(self.bytes());
            let started = Instant::now();
            match decode(table, files.clone(), room, state, sources).await {
                Ok(Some(decoded)) => {
                    tracing::info!(
                        dataset = %table.dataset,
                        bytes = decoded.bytes,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "dataset decoded into memory (limits.table_cache)"
                    );
                    self.passed_over().remove(&table.dataset);
                    self.write()
                        .insert(table.dataset.clone(), Arc::new(decoded));
                }
                Ok(None) => {
                    tracing::info!(
                        dataset = %table.dataset,
                        room,
                        "dataset not kept decoded: larger than what is left of limits.table_cache; it is read from its files"
                    );
                    self.passed_over().insert(table.dataset.clone(), files);
                }
                Err(Undecodable::Changed) => {} // tried again at the next round
                Err(Undecodable::Failed(kind)) => {
                    // The message of a decoding error can quote the data.
                    tracing::warn!(
                        dataset = %table.dataset,
                        error = kind,
                        "dataset could not be decoded into memory; it is read from its files"
                    );
                    self.passed_over().insert(table.dataset.clone(), files);
                }
            }
        }
    }
}

enum Undecodable {
    /// The files changed while they were read.
    Changed,
    /// Reading failed; the kind of error, without its message.
    Failed(&'static str),
}

/// Decodes every row of `table` from the files at version `files`; `None`
/// when the batches would take more than `room` bytes.
async fn decode(
    table: &DecodedTable,
    files: FilesVersion,
    room: usize,
    state: &SessionState,
    sources: &Sources,
) -> std::result::Result<Option<Decoded>, Undecodable> {
    let failed = |e: datafusion::error::DataFusionError| Undecodable::Failed(error_kind(&e));
    // Decoded Parquet is larger than its compressed pages.
    if table.parquet && files.bytes_on_disk() > room as u64 {
        return Ok(None);
    }
    let plan = table
        .files
        .scan(state, None, &[], None)
        .await
        .map_err(failed)?;
    let reads = DataReads::default();
    versions::note_files(&plan, sources, &reads);
    let read_note = reads.version_of(&table.dataset).unwrap_or_default();
    let task = state.task_ctx();
    let mut partitions = Vec::new();
    let mut bytes = 0usize;
    for partition in 0..plan.properties().partitioning.partition_count() {
        let mut stream = plan.execute(partition, task.clone()).map_err(failed)?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(failed)?;
            bytes += batch.get_array_memory_size();
            if bytes > room {
                return Ok(None);
            }
            if batch.num_rows() > 0 {
                batches.push(batch);
            }
        }
        partitions.push(batches);
    }
    if FilesVersion::now(&table.path).as_ref() != Some(&files) {
        return Err(Undecodable::Changed);
    }
    Ok(Some(Decoded {
        files,
        read_note,
        partitions,
        bytes,
    }))
}

fn error_kind(e: &datafusion::error::DataFusionError) -> &'static str {
    use datafusion::error::DataFusionError as E;
    match e.find_root() {
        E::ArrowError(..) => "arrow",
        E::ParquetError(..) => "parquet",
        E::IoError(..) | E::ObjectStore(..) => "io",
        E::ResourcesExhausted(..) => "resources exhausted",
        E::External(..) => "source",
        _ => "other",
    }
}

/// Runs [`TableCache::keep`] every [`KEEP_INTERVAL`] until the catalog is
/// dropped; sets `gauge` to the bytes held after each round.
pub async fn keep_decoded(
    catalog: Weak<super::Catalog>,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    let mut every = tokio::time::interval(KEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(catalog) = catalog.upgrade() else {
            return;
        };
        let Some(cache) = catalog.table_cache() else {
            return;
        };
        let state = catalog.session().state();
        cache
            .keep(catalog.decoded_tables(), &state, catalog.sources())
            .await;
        gauge.set(cache.bytes() as i64);
    }
}

/// A dataset on the connector's disk, served from its decoded copy while
/// that is current, else from its files.
#[derive(Debug)]
pub struct DecodedTable {
    dataset: String,
    path: PathBuf,
    parquet: bool,
    /// The dataset's files, as DataFusion reads them.
    files: Arc<dyn TableProvider>,
    cache: Arc<TableCache>,
}

impl DecodedTable {
    pub fn new(
        dataset: &str,
        path: &Path,
        parquet: bool,
        files: Arc<dyn TableProvider>,
        cache: Arc<TableCache>,
    ) -> Self {
        Self {
            dataset: dataset.to_string(),
            path: path.to_path_buf(),
            parquet,
            files,
            cache,
        }
    }

    /// A scan of the decoded copy, if it is current; the version it is of
    /// is noted for the query's release record.
    fn decoded_scan(
        &self,
        state: &dyn Session,
        projection: Option<Vec<usize>>,
    ) -> Option<Result<Arc<dyn ExecutionPlan>>> {
        let decoded = self.cache.fresh(&self.dataset, &self.path)?;
        if let Some(reads) = state.config().get_extension::<DataReads>() {
            reads.note(&self.dataset, decoded.read_note.clone());
        }
        Some(
            MemorySourceConfig::try_new(&decoded.partitions, self.schema(), projection).map(
                // Batch counts would tell the size of the dataset.
                |source| {
                    DataSourceExec::from_data_source(source.with_show_sizes(false))
                        as Arc<dyn ExecutionPlan>
                },
            ),
        )
    }
}

#[tonic::async_trait]
impl TableProvider for DecodedTable {
    fn schema(&self) -> SchemaRef {
        self.files.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// As the files would, except that no filter is applied exactly: the
    /// decoded copy applies none, so DataFusion keeps every filter above
    /// the scan.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(self
            .files
            .supports_filters_pushdown(filters)?
            .into_iter()
            .map(|support| match support {
                TableProviderFilterPushDown::Exact => TableProviderFilterPushDown::Inexact,
                other => other,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match self.decoded_scan(state, projection.cloned()) {
            Some(plan) => plan,
            None => self.files.scan(state, projection, filters, limit).await,
        }
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> Result<ScanResult> {
        match self.decoded_scan(state, args.projection().map(<[usize]>::to_vec)) {
            Some(plan) => plan.map(ScanResult::from),
            None => self.files.scan_with_args(state, args).await,
        }
    }
}
