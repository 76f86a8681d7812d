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
//! decoded; it checks that (a `stat` per file) at each scan, so a missing,
//! replaced or rewritten file is read from disk, failing or answering
//! exactly as it would without the cache. Files are decoded only once
//! their times are [`SETTLING`] old: a rewrite within the resolution of a
//! file system's timestamps could otherwise keep every one of them.
//! Datasets on network or FUSE file systems, whose `stat` can answer from a
//! cache, are never decoded ([`Sources::stat_tells_changes`]). A query that
//! began from the copy reads that copy to the end, a consistent snapshot,
//! even if the file changes meanwhile; the copy's memory counts against the
//! budget while such queries still hold its batches (not the few batches
//! operators downstream may hold for a moment after the scan ends). Its release
//! record names the version of every file of the dataset (a scan of the
//! files names those it listed, which a `LIMIT` can make fewer;
//! hive-partitioned datasets, whose scans name only the partitions they
//! read, are never kept decoded).
//!
//! When a dataset is decoded depends on the files, not on queries:
//! datasets in configuration order, decoded at start and after their files
//! change, never because a query asked. (Whether one fits can depend on
//! retired copies that queries still read.) Decoding takes CPU beside the
//! queries, so a change to a large dataset's files shows in everyone's
//! latency for as long as it takes (docs/configuration.md).

use std::collections::BTreeMap;
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
use super::versions::{self, DataReads, FilesVersion};

/// How often the keeper looks for datasets to decode (again).
const KEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Files modified this recently are not decoded yet: a file rewritten
/// within the resolution of its timestamps (a second on some file systems,
/// a clock tick for change times on older kernels) could keep the size and
/// times of the version decoded, and the copy would then outlive it.
const SETTLING: Duration = Duration::from_secs(2);

/// After a failure to read a dataset's files, how long before trying
/// again with the same files.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// The decoded copies, within a budget of bytes for all of them.
#[derive(Debug)]
pub struct TableCache {
    budget: usize,
    /// [`SETTLING`], but for tests.
    settling: Duration,
    held: RwLock<BTreeMap<String, Arc<Decoded>>>,
    /// Copies no longer served whose batches queries that began from them
    /// may still hold: they count against the budget until the last such
    /// query lets go.
    retired: Mutex<Vec<Retired>>,
    /// Datasets not decoded at these versions of their files, and why.
    passed_over: Mutex<BTreeMap<String, PassedOver>>,
}

#[derive(Debug)]
struct Retired {
    /// The first column of every batch: alive while any scan holds the
    /// batches (a scan of a copy holds whole batches and projects them as
    /// it emits them).
    columns: Vec<Weak<dyn datafusion::arrow::array::Array>>,
    bytes: usize,
}

impl Retired {
    fn of(decoded: &Decoded) -> Self {
        Self {
            columns: decoded
                .partitions
                .iter()
                .flatten()
                .filter_map(|batch| batch.columns().first().map(Arc::downgrade))
                .collect(),
            bytes: decoded.bytes,
        }
    }

    fn in_use(&self) -> bool {
        self.columns.iter().any(|c| c.strong_count() > 0)
    }
}

#[derive(Debug)]
struct PassedOver {
    files: FilesVersion,
    why: Why,
}

#[derive(Debug)]
enum Why {
    /// Larger than the room the budget had left: tried again when there
    /// is more.
    TooLarge { room: usize },
    /// Its files could not be read: tried again after a while.
    Failed { at: Instant },
}

impl PassedOver {
    fn still_applies(&self, files: &FilesVersion, room: usize) -> bool {
        self.files == *files
            && match self.why {
                Why::TooLarge { room: then } => room <= then,
                Why::Failed { at } => at.elapsed() < RETRY_AFTER_FAILURE,
            }
    }
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

impl TableCache {
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            budget,
            settling: SETTLING,
            held: RwLock::default(),
            retired: Mutex::default(),
            passed_over: Mutex::default(),
        })
    }

    /// Bytes of decoded batches in memory: the copies served, and retired
    /// ones that queries still read.
    pub fn bytes(&self) -> usize {
        let served: usize = self.read().values().map(|d| d.bytes).sum();
        let mut retired = lock(&self.retired);
        retired.retain(Retired::in_use);
        served + retired.iter().map(|r| r.bytes).sum::<usize>()
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

    /// Stops serving `dataset`'s copy; its memory counts until the queries
    /// reading it are done.
    fn retire(&self, dataset: &str) {
        let removed = self
            .held
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(dataset);
        if let Some(decoded) = removed {
            lock(&self.retired).push(Retired::of(&decoded));
        }
    }

    fn serve(&self, dataset: &str, decoded: Decoded) {
        lock(&self.passed_over).remove(dataset);
        self.held
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dataset.to_string(), Arc::new(decoded));
    }

    fn pass_over(&self, dataset: &str, files: FilesVersion, why: Why) {
        lock(&self.passed_over).insert(dataset.to_string(), PassedOver { files, why });
    }

    /// Brings every table up to date with its files, in order: retires the
    /// copies whose files changed, then decodes what is not held, as long
    /// as it fits in what the others leave of the budget.
    pub async fn keep(
        &self,
        tables: &[Arc<DecodedTable>],
        state: &SessionState,
        sources: &Sources,
    ) {
        for table in tables {
            // A copy is served while `stat` shows its files unchanged,
            // which a network or FUSE file system does not promise.
            let location = table.path.to_string_lossy();
            if !sources.stat_tells_changes(location.trim_start_matches('/')) {
                continue;
            }
            let Some(files) = FilesVersion::now(&table.path) else {
                self.retire(&table.dataset);
                continue;
            };
            // Read, then let go of the lock: retiring takes it to write.
            let current = self.read().get(&table.dataset).map(|d| d.files == files);
            match current {
                Some(true) => continue,
                Some(false) => self.retire(&table.dataset),
                None => {}
            }
            if files.changed_within(self.settling) {
                continue; // decoded once the files have settled
            }
            if !files.stat_tells_changes() {
                continue; // a file on a network or FUSE file system
            }
            let room = self.budget.saturating_sub(self.bytes());
            let passed_over = lock(&self.passed_over)
                .get(&table.dataset)
                .is_some_and(|p| p.still_applies(&files, room));
            if passed_over {
                continue;
            }
            self.decode_into(table, files, room, state, sources).await;
        }
    }

    async fn decode_into(
        &self,
        table: &DecodedTable,
        files: FilesVersion,
        room: usize,
        state: &SessionState,
        sources: &Sources,
    ) {
        let started = Instant::now();
        match decode(table, files.clone(), room, state, sources).await {
            Ok(Some(decoded)) => {
                tracing::info!(
                    dataset = %table.dataset,
                    bytes = decoded.bytes,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "dataset decoded into memory (limits.table_cache)"
                );
                self.serve(&table.dataset, decoded);
            }
            Ok(None) => {
                tracing::info!(
                    dataset = %table.dataset,
                    room,
                    "dataset not kept decoded: larger than what is left of limits.table_cache; it is read from its files"
                );
                self.pass_over(&table.dataset, files, Why::TooLarge { room });
            }
            Err(Undecodable::Changed) => {} // tried again at the next round
            Err(Undecodable::Failed(kind)) => {
                // The message of a decoding error can quote the data.
                tracing::warn!(
                    dataset = %table.dataset,
                    error = kind,
                    "dataset could not be decoded into memory; it is read from its files"
                );
                let at = Instant::now();
                self.pass_over(&table.dataset, files, Why::Failed { at });
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
    // `state`'s runtime lists the files afresh (the catalog turns
    // DataFusion's listing cache off): the batches are of `files`.
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
        if let Some(reads) = state.config().get_extension::<DataReads>()
            && !decoded.read_note.is_empty()
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::tree_node::TreeNode;
    use datafusion::dataframe::DataFrameWriteOptions;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    fn batch(from: i64, to: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(from..to))],
        )
        .unwrap()
    }

    async fn write_parquet(path: &Path, rows: RecordBatch) {
        SessionContext::new()
            .read_batch(rows)
            .unwrap()
            .write_parquet(path.to_str().unwrap(), DataFrameWriteOptions::new(), None)
            .await
            .unwrap();
    }

    /// `SELECT count(*), sum(x)` over `t` in `ctx`, and what the query
    /// noted for its release record (as `execute.rs` runs a query).
    async fn count_and_sum(
        ctx: &SessionContext,
        sources: &Sources,
    ) -> ((i64, i64), Option<String>, bool) {
        let reads = DataReads::new();
        let mut state = ctx.state();
        state.config_mut().set_extension(reads.clone());
        let plan = state
            .create_logical_plan("SELECT count(*) AS n, sum(x) AS s FROM t")
            .await
            .unwrap();
        let physical = state.create_physical_plan(&plan).await.unwrap();
        versions::note_files(&physical, sources, &reads);
        let mut from_copy = false;
        physical
            .apply(|node| {
                from_copy |= node.downcast_ref::<DataSourceExec>().is_some_and(|scan| {
                    scan.data_source()
                        .downcast_ref::<MemorySourceConfig>()
                        .is_some()
                });
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
            .unwrap();
        let out = datafusion::physical_plan::collect(physical, state.task_ctx())
            .await
            .unwrap();
        let column = |i: usize| {
            out[0]
                .column(i)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        };
        ((column(0), column(1)), reads.version_of("t"), from_copy)
    }

    /// `t` of `files` (at `data`) behind a copy in a cache of `budget`
    /// bytes that decodes files however new. `parquet: false` skips the
    /// check of the size on disk, so that decoding itself runs out of room.
    async fn decoded_table(
        files: &SessionContext,
        data: &Path,
        budget: usize,
        parquet: bool,
    ) -> (Arc<TableCache>, Arc<DecodedTable>) {
        let mut cache = TableCache::new(budget);
        Arc::get_mut(&mut cache).unwrap().settling = Duration::ZERO;
        let table = Arc::new(DecodedTable::new(
            "t",
            data,
            parquet,
            files.table_provider("t").await.unwrap(),
            cache.clone(),
        ));
        (cache, table)
    }

    #[tokio::test]
    async fn a_directory_is_served_from_its_copy_until_a_file_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("t");
        std::fs::create_dir(&data).unwrap();
        write_parquet(&data.join("a.parquet"), batch(0, 100)).await;
        write_parquet(&data.join("b.parquet"), batch(100, 200)).await;
        let sources = Sources::default();
        sources.add("t", &data);
        // The files as the catalog reads them (listed afresh at each scan,
        // which the keeper relies on), and the same behind a copy.
        let plain = SessionContext::new_with_state(
            super::super::session_state_reading(sources.clone(), &super::super::Spill::Off)
                .unwrap(),
        );
        plain
            .register_parquet("t", data.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
        let (cache, table) = decoded_table(&plain, &data, 1 << 20, true).await;
        let served = SessionContext::new();
        served.register_table("t", table.clone()).unwrap();

        let (files_answer, files_note, read_copy) = count_and_sum(&plain, &sources).await;
        assert!(!read_copy);
        assert_eq!(files_answer, (200, 19_900));
        cache
            .keep(std::slice::from_ref(&table), &plain.state(), &sources)
            .await;
        assert!(cache.read().contains_key("t"), "decoded");
        let held = cache.bytes();
        assert!(held > 0 && held <= 1 << 20, "{held}");
        let (answer, note, read_copy) = count_and_sum(&served, &sources).await;
        assert!(read_copy, "served from the copy");
        assert_eq!(answer, files_answer);
        assert!(note.is_some());
        assert_eq!(
            note, files_note,
            "the copy's release record names the files' version"
        );

        // A file added: the next scan reads the files, at once.
        write_parquet(&data.join("c.parquet"), batch(200, 250)).await;
        let (answer, note, read_copy) = count_and_sum(&served, &sources).await;
        assert!(!read_copy, "a file was added: the files are read");
        assert_eq!(answer, (250, 31_125));
        assert_ne!(note, files_note);
        cache
            .keep(std::slice::from_ref(&table), &plain.state(), &sources)
            .await;
        let (again, again_note, read_copy) = count_and_sum(&served, &sources).await;
        assert!(read_copy, "decoded again");
        assert_eq!((again, again_note), (answer, note));
        assert!(cache.bytes() > held, "the copy of three files");

        // Too small a budget: not decoded, and not tried again for the
        // same files while the room stays what it was.
        let (small, table) = decoded_table(&plain, &data, 64, false).await;
        small
            .keep(std::slice::from_ref(&table), &plain.state(), &sources)
            .await;
        assert_eq!(small.bytes(), 0);
        assert!(lock(&small.passed_over).contains_key("t"));
    }

    #[test]
    fn a_retired_copy_counts_until_its_last_reader_lets_go() {
        let cache = TableCache::new(1 << 20);
        let files = FilesVersion(Vec::new());
        let decoded = Decoded {
            files,
            read_note: String::new(),
            partitions: vec![vec![batch(0, 1000)], vec![batch(1000, 2000)]],
            bytes: 16_000,
        };
        cache.serve("t", decoded);
        assert_eq!(cache.bytes(), 16_000);
        // A scan holds the batches of one partition, as MemoryStream does.
        let reader: Vec<RecordBatch> = cache.read()["t"].partitions[1].clone();
        cache.retire("t");
        assert!(!cache.read().contains_key("t"));
        assert_eq!(cache.bytes(), 16_000, "still read by a query");
        drop(reader);
        assert_eq!(cache.bytes(), 0);
        assert!(lock(&cache.retired).is_empty());
    }

    #[test]
    fn a_file_added_and_removed_again_changes_the_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), "x\n1\n").unwrap();
        let before = FilesVersion::now(dir.path()).unwrap();
        // Past the coarsest timestamp tick of a kernel (HZ = 100).
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(dir.path().join("b.csv"), "x\n2\n").unwrap();
        std::fs::remove_file(dir.path().join("b.csv")).unwrap();
        assert_ne!(FilesVersion::now(dir.path()).unwrap(), before);
    }

    #[test]
    fn files_just_written_have_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.csv");
        std::fs::write(&file, "x\n1\n").unwrap();
        let version = FilesVersion::now(&file).unwrap();
        assert!(version.changed_within(SETTLING));
        let stamp = versions::FileStamp {
            size: 4,
            modified: 0,
            changed: 0,
            inode: 1,
            device: 1,
        };
        let old = FilesVersion(vec![(file.clone(), stamp)]);
        assert!(!old.changed_within(SETTLING));
        assert!(FilesVersion::now(&dir.path().join("gone.csv")).is_none());
    }
}
