//! Parquet footers: kept between queries only while they are still the
//! file's, and read so that a failure names what happened to the file.
//!
//! A Parquet footer holds the file's schema, where each row group's pages
//! are, and every column's min/max per row group, by which a scan skips
//! row groups. DataFusion keeps footers between queries and trusts one as
//! long as the file's size and modification time are unchanged. A file
//! rewritten in place with both kept (`cp -p` over it, a restore, a tool
//! that sets the time) would then be read with the old footer: row groups
//! skipped by the old statistics, an answer wrong without an error.
//!
//! - [`FooterCache`] keeps the footer of a dataset file on the connector's
//!   disk only if it was read from the file DataFusion listed, settled (no
//!   change for [`SETTLING`]) and unchanged until the footer was offered
//!   back, and serves it only while the file's size, modification and
//!   change times, inode and device are those it had (a `stat` per file
//!   and lookup). No system call sets a change time back, so a footer is
//!   never served for another version of its file.
//!   Footers of objects in object stores are not kept: a store's
//!   modification times have a resolution of a second, and DataFusion's
//!   cache does not tell two buckets' keys apart, so each scan reads an
//!   object's footer again (one ranged GET per object).
//! - [`FooterReaders`] reads footers for the scans with that cache and
//!   keeps the store's error when reading one fails (DataFusion's reader
//!   turns it into text), so that a file deleted before its footer was
//!   read is reported missing, not malformed.

use datafusion::common::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::parquet::{
    CachedParquetFileReaderFactory, ParquetFileReaderFactory,
};
use datafusion::error::Result;
use datafusion::execution::cache::cache_manager::{CachedFileMetadataEntry, FileMetadataCache};
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::cache::{Cache, CacheEntryInfo};
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{ObjectMeta, ObjectStore};
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::ParquetMetaData;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::FutureExt;
use futures::future::BoxFuture;
use prost::bytes::Bytes;

use super::source::Sources;
use super::versions::FileStamp;

/// A file must be unchanged this long before its footer is kept: a
/// rewrite within the resolution of its times could keep every one of
/// them, and a footer read just before it would outlive it.
pub const SETTLING: Duration = Duration::from_secs(2);

/// Lookups noted (see [`Noted::looked_up`]) past which the older are
/// dropped: a fetch whose lookup was dropped keeps no footer, nothing
/// worse.
const NOTED_LOOKUPS: usize = 4096;

/// DataFusion's footer cache, trusted only as the module documentation
/// says.
pub struct FooterCache {
    footers: DefaultCache<Path, CachedFileMetadataEntry>,
    /// Held while `footers` is read or written, so that a footer and its
    /// stamp change together.
    noted: Mutex<Noted>,
    /// Which keys are files of the datasets on this machine's disk (others
    /// are object stores' keys: never `stat`ed, never kept).
    sources: Sources,
    local: LocalFileSystem,
    settling: Duration,
}

#[derive(Debug, Default)]
struct Noted {
    /// The stamp of each kept footer's file when the footer was read.
    kept: HashMap<Path, FileStamp>,
    /// The file's stamp when a task looked for its footer, if it had
    /// settled. DataFusion looks a footer up, in the same task, before it
    /// reads one and offers it back: the footer offered is of that version
    /// of the file if the file still has that stamp (any change since
    /// gives it a later change time, which no system call can set back).
    looked_up: HashMap<(Path, tokio::task::Id), FileStamp>,
}

impl std::fmt::Debug for FooterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FooterCache")
            .field("footers", &self.footers.len())
            .finish()
    }
}

impl FooterCache {
    /// At most `limit` bytes of footers of the files of `sources`.
    pub fn new(limit: usize, sources: Sources) -> Self {
        Self::settling_for(limit, sources, SETTLING)
    }

    fn settling_for(limit: usize, sources: Sources, settling: Duration) -> Self {
        Self {
            footers: DefaultCache::new(limit).with_name("SluiceFooterCache"),
            noted: Mutex::default(),
            sources,
            local: LocalFileSystem::new(),
            settling,
        }
    }

    fn noted(&self) -> std::sync::MutexGuard<'_, Noted> {
        self.noted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stamp of the local dataset file at `location` now; `None` for
    /// an object store's key or a file that cannot be `stat`ed.
    fn stamp_now(&self, location: &Path) -> Option<FileStamp> {
        self.sources.dataset_in(None, location.as_ref())?;
        let path = self.local.path_to_filesystem(location).ok()?;
        FileStamp::of(&path)
    }

    /// Whether `stamp` is the file `meta` describes as DataFusion listed
    /// it: same size and modification time, and the inode the local store
    /// puts in its ETag (`{inode:x}-{mtime:x}-{size:x}`).
    fn listed_as(stamp: &FileStamp, meta: &ObjectMeta) -> bool {
        let listed_time = meta.last_modified.timestamp_nanos_opt().map(i128::from);
        let listed_inode = meta
            .e_tag
            .as_deref()
            .and_then(|tag| tag.split('-').next())
            .and_then(|inode| u64::from_str_radix(inode, 16).ok());
        stamp.size == meta.size
            && listed_time == Some(stamp.modified)
            && listed_inode == Some(stamp.inode)
    }
}

impl Cache<Path, CachedFileMetadataEntry> for FooterCache {
    fn get(&self, key: &Path) -> Option<CachedFileMetadataEntry> {
        // `stat` before taking the lock: a slow file system holds up only
        // the lookups of its own files.
        let Some(now) = self.stamp_now(key) else {
            self.remove(key);
            return None;
        };
        let mut noted = self.noted();
        if let Some(task) = tokio::task::try_id()
            && !now.changed_within(self.settling)
        {
            if noted.looked_up.len() >= NOTED_LOOKUPS {
                noted.looked_up.clear();
            }
            noted.looked_up.insert((key.clone(), task), now);
        }
        if noted.kept.get(key) == Some(&now)
            && let Some(footer) = self.footers.get(key)
        {
            return Some(footer);
        }
        noted.kept.remove(key);
        self.footers.remove(key);
        None
    }

    /// Keeps a footer only if it is of the file as it is now: the task
    /// offering it looked it up when the file had settled, the file still
    /// has the stamp it had then, and it is the file DataFusion listed.
    fn put(&self, key: &Path, value: CachedFileMetadataEntry) -> Option<CachedFileMetadataEntry> {
        let now = self.stamp_now(key);
        let mut noted = self.noted();
        let looked_up =
            tokio::task::try_id().and_then(|task| noted.looked_up.remove(&(key.clone(), task)));
        match now {
            Some(now) if looked_up == Some(now) && Self::listed_as(&now, &value.meta) => {
                noted.kept.insert(key.clone(), now);
                self.footers.put(key, value)
            }
            _ => {
                noted.kept.remove(key);
                self.footers.remove(key)
            }
        }
    }

    fn remove(&self, k: &Path) -> Option<CachedFileMetadataEntry> {
        let mut noted = self.noted();
        noted.kept.remove(k);
        self.footers.remove(k)
    }

    fn contains_key(&self, k: &Path) -> bool {
        let _noted = self.noted();
        self.footers.contains_key(k)
    }

    fn len(&self) -> usize {
        self.footers.len()
    }

    fn clear(&self) {
        let mut noted = self.noted();
        *noted = Noted::default();
        self.footers.clear();
    }

    fn name(&self) -> String {
        self.footers.name()
    }

    fn cache_limit(&self) -> usize {
        self.footers.cache_limit()
    }

    fn update_cache_limit(&self, limit: usize) {
        self.footers.update_cache_limit(limit);
    }

    fn cache_ttl(&self) -> Option<Duration> {
        self.footers.cache_ttl()
    }

    fn update_cache_ttl(&self, ttl: Option<Duration>) {
        self.footers.update_cache_ttl(ttl);
    }

    fn drop_table_entries(&self, table_ref: &datafusion::common::TableReference) -> Result<()> {
        self.footers.drop_table_entries(table_ref)
    }

    fn list_entries(&self) -> HashMap<Path, CacheEntryInfo<CachedFileMetadataEntry>> {
        self.footers.list_entries()
    }
}

/// Readers of one store's Parquet files: DataFusion's, but for the footer
/// (see the module documentation).
#[derive(Debug)]
pub struct FooterReaders {
    store: Arc<dyn ObjectStore>,
    footers: Arc<FileMetadataCache>,
    inner: CachedParquetFileReaderFactory,
}

impl FooterReaders {
    pub fn new(store: Arc<dyn ObjectStore>, footers: Arc<FileMetadataCache>) -> Self {
        let inner = CachedParquetFileReaderFactory::new(Arc::clone(&store), Arc::clone(&footers));
        Self {
            store,
            footers,
            inner,
        }
    }
}

impl ParquetFileReaderFactory for FooterReaders {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let meta = file.object_meta.clone();
        let pages = self
            .inner
            .create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(FooterReader {
            pages,
            store: Arc::clone(&self.store),
            footers: Arc::clone(&self.footers),
            meta,
            metadata_size_hint,
        }))
    }
}

/// DataFusion's reader for the pages (it counts the bytes scanned); the
/// footer read here.
struct FooterReader {
    pages: Box<dyn AsyncFileReader + Send>,
    store: Arc<dyn ObjectStore>,
    footers: Arc<FileMetadataCache>,
    meta: ObjectMeta,
    metadata_size_hint: Option<usize>,
}

impl AsyncFileReader for FooterReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, ParquetError>> {
        self.pages.get_bytes(range)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, Result<Vec<Bytes>, ParquetError>> {
        self.pages.get_byte_ranges(ranges)
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>, ParquetError>> {
        async move {
            DFParquetMetadata::new(self.store.as_ref(), &self.meta)
                .with_file_metadata_cache(Some(Arc::clone(&self.footers)))
                .with_metadata_size_hint(self.metadata_size_hint)
                .with_page_index_policy(options.map(|o| o.column_index_policy()))
                .fetch_metadata()
                .await
                // The error itself, not its text: it says whether the
                // file was missing, unreadable or malformed.
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::cache::cache_manager::FileMetadata;
    use datafusion::object_store::ObjectStoreExt;

    /// A footer stand-in: the cache only keeps it and gives it back.
    struct Footer(&'static str);

    impl FileMetadata for Footer {
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn memory_size(&self) -> usize {
            64
        }
        fn extra_info(&self) -> HashMap<String, String> {
            HashMap::new()
        }
    }

    /// A cache of the footers of the files under `dir`, kept as soon as
    /// they are read.
    fn cache_of(dir: &std::path::Path) -> FooterCache {
        let sources = Sources::default();
        sources.add("t", dir);
        FooterCache::settling_for(1 << 20, sources, Duration::ZERO)
    }

    /// What DataFusion lists for `file`.
    async fn listed(file: &std::path::Path) -> (Path, ObjectMeta) {
        let location = Path::from_filesystem_path(file).unwrap();
        let meta = LocalFileSystem::new().head(&location).await.unwrap();
        (location, meta)
    }

    /// DataFusion's fetch of a footer: look it up, and on a miss read it
    /// (here: `footer`) and offer it back. What it gives the scan.
    fn fetch(
        cache: &FooterCache,
        location: &Path,
        meta: &ObjectMeta,
        footer: &'static str,
    ) -> &'static str {
        match cache.get(location) {
            Some(kept) => {
                kept.file_metadata
                    .as_any()
                    .downcast_ref::<Footer>()
                    .unwrap()
                    .0
            }
            None => {
                let entry = CachedFileMetadataEntry::new(meta.clone(), Arc::new(Footer(footer)));
                cache.put(location, entry);
                footer
            }
        }
    }

    /// Rewrites `file` in place with `content` (of the same length) and
    /// gives it back its modification time: only the change time differs.
    fn rewrite_keeping_size_and_time(file: &std::path::Path, content: &[u8]) {
        let kept = std::fs::metadata(file).unwrap().modified().unwrap();
        // Past the coarsest timestamp tick of a kernel (HZ = 100).
        std::thread::sleep(Duration::from_millis(50));
        let mut f = std::fs::File::options().write(true).open(file).unwrap();
        std::io::Write::write_all(&mut f, content).unwrap();
        f.set_modified(kept).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(file).unwrap().modified().unwrap(), kept);
    }

    /// Runs `test` in a task of its own, as DataFusion's fetches run.
    async fn in_a_task(test: impl std::future::Future<Output = ()> + Send + 'static) {
        tokio::spawn(test).await.unwrap();
    }

    #[tokio::test]
    async fn a_footer_is_served_until_its_file_is_rewritten_keeping_size_and_time() {
        in_a_task(async {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("a.parquet");
            std::fs::write(&file, b"first").unwrap();
            let cache = cache_of(dir.path());
            let (location, meta) = listed(&file).await;
            assert_eq!(fetch(&cache, &location, &meta, "first"), "first");
            assert_eq!(
                fetch(&cache, &location, &meta, "read again"),
                "first",
                "not kept"
            );

            rewrite_keeping_size_and_time(&file, b"other");
            let (_, now) = listed(&file).await;
            assert_eq!(
                (now.size, now.last_modified),
                (meta.size, meta.last_modified)
            );
            assert_eq!(
                fetch(&cache, &location, &now, "other"),
                "other",
                "the old footer was served"
            );
            assert_eq!(fetch(&cache, &location, &now, "read again"), "other");

            // Replaced by a rename: another inode.
            let new = dir.path().join("new");
            std::fs::write(&new, b"third").unwrap();
            let time = std::fs::metadata(&file).unwrap().modified().unwrap();
            std::fs::File::options()
                .write(true)
                .open(&new)
                .unwrap()
                .set_modified(time)
                .unwrap();
            std::fs::rename(&new, &file).unwrap();
            let (_, renamed) = listed(&file).await;
            assert_eq!(fetch(&cache, &location, &renamed, "third"), "third");

            // Deleted.
            std::fs::remove_file(&file).unwrap();
            assert!(cache.get(&location).is_none());
            assert_eq!(cache.len(), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn a_footer_is_kept_only_if_read_from_the_settled_file_listed() {
        in_a_task(async {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("a.parquet");
            std::fs::write(&file, b"first").unwrap();
            let (location, meta) = listed(&file).await;

            // Just written: not settled.
            let sources = Sources::default();
            sources.add("t", dir.path());
            let settling = FooterCache::new(1 << 20, sources);
            fetch(&settling, &location, &meta, "first");
            assert_eq!(settling.len(), 0);

            // Changed in place between the lookup and the offer: the
            // footer read may be of either version.
            let cache = cache_of(dir.path());
            assert!(cache.get(&location).is_none());
            rewrite_keeping_size_and_time(&file, b"other");
            let entry = CachedFileMetadataEntry::new(meta.clone(), Arc::new(Footer("first")));
            cache.put(&location, entry.clone());
            assert_eq!(cache.len(), 0);

            // Offered without a lookup of this task's.
            cache.put(&location, entry.clone());
            assert_eq!(cache.len(), 0);

            // Replaced by a rename between the listing and the lookup.
            let (_, listed_before) = listed(&file).await;
            let new = dir.path().join("new");
            std::fs::write(&new, b"third").unwrap();
            std::fs::rename(&new, &file).unwrap();
            fetch(&cache, &location, &listed_before, "other");
            assert_eq!(cache.len(), 0);

            // Not a file of a local dataset (an object store's key).
            let object = Path::from("lake/trips/part-0.parquet");
            let remote = ObjectMeta {
                location: object.clone(),
                ..meta.clone()
            };
            assert_eq!(fetch(&cache, &object, &remote, "remote"), "remote");
            assert_eq!(cache.len(), 0);
        })
        .await;
    }

    #[test]
    fn outside_a_task_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.parquet");
        std::fs::write(&file, b"first").unwrap();
        let cache = cache_of(dir.path());
        let location = Path::from_filesystem_path(&file).unwrap();
        let meta = futures::executor::block_on(LocalFileSystem::new().head(&location)).unwrap();
        fetch(&cache, &location, &meta, "first");
        assert_eq!(cache.len(), 0);
    }
}
