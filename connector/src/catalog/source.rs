//! Reading the datasets' files, and naming the dataset that could not be
//! read.
//!
//! DataFusion reads local files through the object store registered for
//! `file://`. [`SourceStore`] wraps the local file system's so that:
//!
//! - a file that shrinks while it is read fails the query: the local
//!   store hands DataFusion the open file, which its CSV and JSON readers
//!   read to the end of file, so a file cut short mid-scan would end the
//!   result early as if it were complete (and the store's own chunked
//!   stream loops on a short read). Files are read here in chunks, and a
//!   chunk that comes back short is [`SourceFault::Changed`];
//! - a dataset file that is gone fails the query: DataFusion lists a table
//!   whose file is not found as an empty directory, and would answer from
//!   no rows at all ([`SourceFault::Missing`]);
//! - every failure names the dataset ([`SourceError`]), never the path.
//!
//! [`NameSourceFailures`], the last physical optimizer rule, puts a
//! [`SourceExec`] over every scan of a dataset's files, so that failures
//! while parsing what was read (a line cut short, a value of another type)
//! name the dataset too ([`SourceFault::Malformed`]). Its messages are
//! dropped: they can quote the data.

use std::fmt;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::datasource::physical_plan::{FileScanConfig, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    self, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::stream::{BoxStream, Stream, StreamExt};
use prost::bytes::Bytes;

use super::footers::{FooterCache, FooterReaders};

/// How much of a file one read takes.
const CHUNK: u64 = 256 * 1024;

/// What happened to a dataset's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFault {
    /// Its file (or directory) is not there.
    Missing,
    /// It came back shorter than it was when the read began.
    Changed,
    /// Reading it failed (an I/O error).
    Unreadable,
    /// What was read does not parse as the dataset's rows.
    Malformed,
    /// Its database or object store could not be reached.
    Unreachable,
    /// Its database or object store refused the connector's credentials or
    /// permissions.
    Refused,
    /// Its database stopped the statement (`statement_timeout`).
    TimedOut,
}

/// A dataset whose data could not be read. The path and the underlying
/// message stay out of it (they are logged where the error is mapped).
#[derive(Debug, Clone, thiserror::Error)]
#[error("dataset `{dataset}` cannot be read ({fault:?})")]
pub struct SourceError {
    pub dataset: String,
    pub fault: SourceFault,
}

/// The [`SourceError`] behind `err`, however DataFusion, Arrow and the
/// object store wrapped it.
pub fn find_source_error(err: &DataFusionError) -> Option<&SourceError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<SourceError>() {
            return Some(found);
        }
        if let Some(DataFusionError::External(inner)) = e.downcast_ref::<DataFusionError>()
            && let Some(found) = inner.downcast_ref::<SourceError>()
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The datasets' files and directories, as object store paths (no leading
/// `/`), by dataset name.
#[derive(Debug, Clone, Default)]
pub struct Sources(Arc<RwLock<Vec<Source>>>);

#[derive(Debug)]
struct Source {
    dataset: String,
    /// The object store (`s3://bucket`); `None` for the local file system.
    store: Option<String>,
    /// Object store path of the file, or of the directory with a trailing `/`.
    location: String,
    directory: Option<PathBuf>,
    /// Whether `stat` tells every change of its files: a local file system
    /// whose kernel keeps change times (`versions::stat_tells_changes_at`).
    stat_tells_changes: bool,
}

impl Sources {
    /// Registers dataset `name` read from `path` (a file or a directory),
    /// under the path as given and as the file system resolves it.
    pub fn add(&self, name: &str, path: &FsPath) {
        let directory = path.is_dir();
        let stat_tells = super::versions::stat_tells_changes_at(path);
        if !stat_tells {
            tracing::warn!(
                dataset = name,
                "the dataset is on a network, FUSE or unknown file system, whose `stat` may not \
                 show every change of its files: Sluice keeps no decoded copy and no Parquet \
                 footer of it between queries"
            );
        }
        let mut known = self.0.write().unwrap_or_else(|e| e.into_inner());
        let resolved = std::fs::canonicalize(path).ok();
        for path in std::iter::once(path.to_path_buf()).chain(resolved) {
            let mut location = path.to_string_lossy().trim_start_matches('/').to_string();
            if directory {
                location = format!("{}/", location.trim_end_matches('/'));
            }
            known.push(Source {
                dataset: name.to_string(),
                store: None,
                location,
                directory: directory.then(|| path.clone()),
                stat_tells_changes: stat_tells,
            });
        }
    }

    /// Registers dataset `name` read from `url` (`s3://bucket/prefix/` or
    /// `s3://bucket/key`) in an object store.
    pub fn add_object(&self, name: &str, url: &str) {
        let Some(bucket) = crate::config::bucket_of(url) else {
            return;
        };
        let store = format!("s3://{bucket}");
        let location = url[store.len()..].trim_start_matches('/').to_string();
        let mut known = self.0.write().unwrap_or_else(|e| e.into_inner());
        known.push(Source {
            dataset: name.to_string(),
            store: Some(store),
            directory: location.ends_with('/').then(PathBuf::new),
            location,
            stat_tells_changes: false,
        });
    }

    /// The dataset `location` belongs to, if any; with its directory when
    /// `location` is a dataset's directory itself.
    fn find(&self, location: &str) -> Option<(String, Option<PathBuf>)> {
        self.find_in(None, location)
    }

    /// [`Sources::find`] in the object store `store` (`None`: local files).
    fn find_in(&self, store: Option<&str>, location: &str) -> Option<(String, Option<PathBuf>)> {
        self.find_source(store, location, |source| {
            (source.dataset.clone(), source.directory.clone())
        })
        .map(|(found, own)| (found.0, if own { found.1 } else { None }))
    }

    /// What `read` takes from the source `location` in `store` belongs to,
    /// and whether `location` is the source's directory itself.
    fn find_source<T>(
        &self,
        store: Option<&str>,
        location: &str,
        read: impl Fn(&Source) -> T,
    ) -> Option<(T, bool)> {
        let known = self.0.read().unwrap_or_else(|e| e.into_inner());
        known
            .iter()
            .filter(|source| source.store.as_deref() == store)
            .find_map(|source| match &source.directory {
                None => (source.location == location).then(|| (read(source), false)),
                Some(_) => {
                    let own =
                        location.trim_end_matches('/') == source.location.trim_end_matches('/');
                    (own || location.starts_with(&source.location)).then(|| (read(source), own))
                }
            })
    }

    /// Whether `location` is a file of a dataset on the connector's disk
    /// whose root is on a file system whose `stat` tells every change
    /// (`versions::stat_tells_changes_at`; a file under it on another file
    /// system is checked on its own by [`super::versions::FileStamp`]'s
    /// users).
    pub fn stat_tells_changes(&self, location: &str) -> bool {
        self.find_source(None, location, |source| source.stat_tells_changes)
            .is_some_and(|(tells, _)| tells)
    }

    /// The dataset `location` in object store `store` (`None`: local files)
    /// belongs to.
    pub fn dataset_in(&self, store: Option<&str>, location: &str) -> Option<String> {
        self.find_in(store, location).map(|(dataset, _)| dataset)
    }

    fn dataset_of(&self, location: &str) -> Option<String> {
        self.find(location).map(|(dataset, _)| dataset)
    }
}

fn source_error(dataset: &str, fault: SourceFault) -> object_store::Error {
    object_store::Error::Generic {
        store: "sluice",
        source: Box::new(SourceError {
            dataset: dataset.to_string(),
            fault,
        }),
    }
}

/// The fault an object store error means for a dataset's file.
fn fault_of(e: &object_store::Error) -> SourceFault {
    use datafusion::object_store::Error;
    match e {
        Error::NotFound { .. } => SourceFault::Missing,
        Error::PermissionDenied { .. } | Error::Unauthenticated { .. } => SourceFault::Refused,
        // An object replaced while it was read (its ETag no longer matches).
        Error::Precondition { .. } => SourceFault::Changed,
        Error::Generic { source, .. } => match source.downcast_ref::<SourceError>() {
            Some(found) => found.fault,
            None if is_short_read(e) => SourceFault::Changed,
            None => SourceFault::Unreadable,
        },
        _ => SourceFault::Unreadable,
    }
}

/// The local store's errors for a range past the end of a file (it shrank).
fn is_short_read(e: &object_store::Error) -> bool {
    let text = e.to_string();
    text.contains("Out of range") || text.contains("Requested range was invalid")
}

/// The local file system, reading the datasets' files as the module
/// documentation says.
#[derive(Debug)]
pub struct SourceStore {
    inner: LocalFileSystem,
    sources: Sources,
}

impl SourceStore {
    pub fn new(sources: Sources) -> Self {
        Self {
            inner: LocalFileSystem::new(),
            sources,
        }
    }

    /// `e`, as a [`SourceError`] when `location` is a dataset's.
    fn fail(&self, location: &Path, e: object_store::Error) -> object_store::Error {
        match self.sources.dataset_of(location.as_ref()) {
            Some(dataset) => {
                tracing::warn!(error = %e, dataset, "reading a dataset failed");
                source_error(&dataset, fault_of(&e))
            }
            None => e,
        }
    }
}

impl fmt::Display for SourceStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceStore({})", self.inner)
    }
}

#[tonic::async_trait]
impl ObjectStore for SourceStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let Some(dataset) = self.sources.dataset_of(location.as_ref()) else {
            return self.inner.get_opts(location, options).await;
        };
        let result = self
            .inner
            .get_opts(location, options)
            .await
            .map_err(|e| self.fail(location, e))?;
        let payload = match result.payload {
            GetResultPayload::File(file, _) => {
                GetResultPayload::Stream(checked_chunks(file, result.range.clone(), dataset))
            }
            stream => stream,
        };
        Ok(GetResult { payload, ..result })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner
            .get_ranges(location, ranges)
            .await
            .map_err(|e| self.fail(location, e))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let found = prefix.and_then(|p| self.sources.find(p.as_ref()));
        let Some((dataset, directory)) = found else {
            return self.inner.list(prefix);
        };
        // A dataset's directory that is gone lists as empty: a failure.
        if let Some(dir) = directory
            && !dir.is_dir()
        {
            tracing::warn!(dataset, directory = %dir.display(), "a dataset's directory is missing");
            let missing = source_error(&dataset, SourceFault::Missing);
            return futures::stream::once(async move { Err(missing) }).boxed();
        }
        self.inner
            .list(prefix)
            .map(move |item| {
                item.map_err(|e| {
                    tracing::warn!(error = %e, dataset, "listing a dataset failed");
                    source_error(&dataset, fault_of(&e))
                })
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// Bytes `range` of an open dataset file, [`CHUNK`] at a time on a
/// blocking thread; a chunk that comes back short (the file shrank since
/// its size was taken) is [`SourceFault::Changed`].
fn checked_chunks(
    file: std::fs::File,
    range: Range<u64>,
    dataset: String,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let end = range.end;
    futures::stream::try_unfold(
        (file, range.start, dataset),
        move |(file, offset, dataset)| async move {
            if offset >= end {
                return Ok(None);
            }
            let want = (end - offset).min(CHUNK) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    match std::os::unix::fs::FileExt::read_at(
                        &file,
                        &mut buf[filled..],
                        offset + filled as u64,
                    ) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return (file, Err(e)),
                    }
                }
                buf.truncate(filled);
                (file, Ok(buf))
            })
            .await;
            let (file, buf) = match read {
                Ok((file, Ok(buf))) => (file, buf),
                Ok((_, Err(e))) => {
                    tracing::warn!(error = %e, dataset, "reading a dataset failed");
                    return Err(source_error(&dataset, SourceFault::Unreadable));
                }
                Err(_) => return Err(source_error(&dataset, SourceFault::Unreadable)),
            };
            if buf.len() < want {
                tracing::warn!(
                    dataset,
                    offset,
                    expected = want,
                    read = buf.len(),
                    "a dataset's file shrank while it was read"
                );
                return Err(source_error(&dataset, SourceFault::Changed));
            }
            let next = offset + want as u64;
            Ok(Some((Bytes::from(buf), (file, next, dataset))))
        },
    )
    .boxed()
}

/// Puts a [`SourceExec`] over every scan of a dataset's files, and has its
/// Parquet footers read by [`FooterReaders`]. The last physical optimizer
/// rule: every other rule has seen the scans as they are.
#[derive(Debug)]
pub struct NameSourceFailures {
    pub sources: Sources,
    /// The session's object stores, which the footer readers read from.
    pub stores: Arc<dyn ObjectStoreRegistry>,
    /// The session's footer cache, for the local file system's scans.
    pub footers: Arc<FooterCache>,
}

impl NameSourceFailures {
    /// `node` (`scan`) with its Parquet footers read by [`FooterReaders`];
    /// `node` itself if it does not read Parquet.
    fn with_footer_readers(
        &self,
        node: &Arc<dyn ExecutionPlan>,
        scan: &DataSourceExec,
        files: &FileScanConfig,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(parquet) = files.file_source.downcast_ref::<ParquetSource>() else {
            return Ok(Arc::clone(node));
        };
        let url = files.object_store_url.as_ref();
        let store = self.stores.get_store(url)?;
        let footers = (url.scheme() == "file").then(|| Arc::clone(&self.footers));
        let readers = FooterReaders::new(store, footers);
        let mut config = files.clone();
        config.file_source = Arc::new(
            parquet
                .clone()
                .with_parquet_file_reader_factory(Arc::new(readers)),
        );
        Ok(Arc::new(scan.clone().with_data_source(Arc::new(config))))
    }
}

impl PhysicalOptimizerRule for NameSourceFailures {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(scan) = node.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(files) = scan.data_source().downcast_ref::<FileScanConfig>() else {
                return Ok(Transformed::no(node));
            };
            let url = files.object_store_url.as_str().trim_end_matches('/');
            let store = url.starts_with("s3://").then_some(url);
            let dataset = files
                .file_groups
                .iter()
                .flat_map(|group| group.iter())
                .find_map(|file| {
                    self.sources
                        .find_in(store, file.object_meta.location.as_ref())
                        .map(|(dataset, _)| dataset)
                });
            match dataset {
                Some(dataset) => Ok(Transformed::yes(Arc::new(SourceExec {
                    input: self.with_footer_readers(&node, scan, files)?,
                    dataset,
                }))),
                None => Ok(Transformed::no(node)),
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "name_source_failures"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A scan of a dataset's files whose failures name the dataset.
#[derive(Debug)]
pub struct SourceExec {
    input: Arc<dyn ExecutionPlan>,
    dataset: String,
}

impl DisplayAs for SourceExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceExec: dataset={}", self.dataset)
    }
}

impl ExecutionPlan for SourceExec {
    fn name(&self) -> &str {
        "SourceExec"
    }

    // Parents that look for a particular child type see through the wrapper.
    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.input.as_ref())
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "SourceExec takes one input".into(),
            ));
        }
        Ok(Arc::new(SourceExec {
            input: children.swap_remove(0),
            dataset: self.dataset.clone(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self
            .input
            .execute(partition, context)
            .map_err(|e| named(e, &self.dataset))?;
        Ok(Box::pin(SourceStream {
            input,
            dataset: self.dataset.clone(),
        }))
    }
}

/// `e` as a failure of `dataset` when reading or parsing its files failed;
/// anything else unchanged: a failure already named, the query's limits,
/// and errors of expressions a scan may evaluate (DataFusion pushes
/// projections and filters into scans), which are the query's, not the
/// file's.
fn named(e: DataFusionError, dataset: &str) -> DataFusionError {
    if find_source_error(&e).is_some() {
        return e;
    }
    let Some(fault) = file_fault(&e) else {
        return e;
    };
    tracing::warn!(error = %e, dataset, "reading a dataset failed");
    DataFusionError::External(Box::new(SourceError {
        dataset: dataset.to_string(),
        fault,
    }))
}

/// What reading a file failed with, if `e` is a failure to read or parse
/// one: object store and I/O errors, and the format readers' own errors
/// (CSV, JSON, Parquet) which no expression of a query raises.
fn file_fault(e: &DataFusionError) -> Option<SourceFault> {
    use datafusion::arrow::error::ArrowError;
    // A store error anywhere in the chain says what happened to the file,
    // even inside a format reader's error (the Parquet reader wraps the
    // store's NotFound for an object deleted mid-scan): it is not
    // malformed data.
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = current {
        if let Some(store) = cause.downcast_ref::<object_store::Error>() {
            return Some(fault_of(store));
        }
        if let Some(DataFusionError::ParquetError(parquet)) =
            cause.downcast_ref::<DataFusionError>()
            && let Some(inner) = std::error::Error::source(parquet.as_ref())
            && let Some(store) = inner.downcast_ref::<object_store::Error>()
        {
            return Some(fault_of(store));
        }
        current = cause.source();
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = current {
        if let Some(store) = cause.downcast_ref::<object_store::Error>() {
            return Some(fault_of(store));
        }
        if cause.is::<std::io::Error>() {
            return Some(SourceFault::Unreadable);
        }
        if let Some(arrow) = cause.downcast_ref::<ArrowError>() {
            match arrow {
                ArrowError::CsvError(_)
                | ArrowError::JsonError(_)
                | ArrowError::ParquetError(_) => {
                    return Some(SourceFault::Malformed);
                }
                ArrowError::IoError(..) => return Some(SourceFault::Unreadable),
                _ => {}
            }
        }
        if let Some(DataFusionError::ParquetError(_)) = cause.downcast_ref::<DataFusionError>() {
            return Some(SourceFault::Malformed);
        }
        current = cause.source();
    }
    None
}

struct SourceStream {
    input: SendableRecordBatchStream,
    dataset: String,
}

impl Stream for SourceStream {
    type Item = Result<datafusion::arrow::record_batch::RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.input.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(named(e, &self.dataset)))),
            other => other,
        }
    }
}

impl RecordBatchStream for SourceStream {
    fn schema(&self) -> datafusion::arrow::datatypes::SchemaRef {
        self.input.schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::object_store::ObjectStoreExt;

    #[test]
    fn locations_map_to_their_datasets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.csv");
        std::fs::write(&file, "x\n1\n").unwrap();
        let sub = dir.path().join("parts");
        std::fs::create_dir(&sub).unwrap();
        let sources = Sources::default();
        sources.add("a", &file);
        sources.add("b", &sub);
        let relative = |p: &FsPath| p.to_string_lossy().trim_start_matches('/').to_string();
        assert_eq!(sources.dataset_of(&relative(&file)).as_deref(), Some("a"));
        assert_eq!(
            sources
                .dataset_of(&relative(&sub.join("p1.csv")))
                .as_deref(),
            Some("b")
        );
        assert_eq!(sources.find(&relative(&sub)).unwrap().1, Some(sub.clone()));
        assert_eq!(
            sources.dataset_of(&relative(&dir.path().join("c.csv"))),
            None
        );
    }

    #[tokio::test]
    async fn a_file_that_shrinks_under_a_read_is_a_changed_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.csv");
        std::fs::write(&file, vec![b'x'; 3 * CHUNK as usize]).unwrap();
        let sources = Sources::default();
        sources.add("a", &file);
        let store = SourceStore::new(sources);
        let location = Path::from_filesystem_path(&file).unwrap();
        let got = store
            .get_opts(&location, GetOptions::default())
            .await
            .unwrap();
        let GetResultPayload::Stream(mut chunks) = got.payload else {
            panic!("a dataset's file is read as a stream");
        };
        assert_eq!(chunks.next().await.unwrap().unwrap().len(), CHUNK as usize);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(CHUNK + 10)
            .unwrap();
        let e = chunks.next().await.unwrap().unwrap_err();
        assert_eq!(fault_of(&e), SourceFault::Changed, "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = store.head(&location).await.unwrap_err();
        assert_eq!(fault_of(&e), SourceFault::Missing, "{e}");
    }
}
