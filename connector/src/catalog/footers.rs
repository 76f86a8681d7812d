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
//! - [`FooterCache`], the session's footer cache, serves a footer only
//!   while its file's size, modification and change times, inode and
//!   device are those it had when the footer was read (a `stat` per file
//!   and lookup), and keeps only footers read by the scans'
//!   [`FooterReaders`], each fetch on its own ([`OneFetch`]): a footer is
//!   kept if the file had settled (no change for [`SETTLING`]) when the
//!   fetch looked it up, still has the same stamp when the footer is
//!   offered back, and is the file DataFusion listed. Any change in
//!   between gives the file a later change time, which no system call can
//!   set back, so a footer is never kept or served for another version of
//!   its file. (Two writes the times may not show: one `write` call
//!   throttled for longer than [`SETTLING`], whose times are set as it
//!   starts, and writes through a shared memory map, which set them only
//!   at the first write after the pages were last written back.) Only
//!   files on local file systems whose kernel keeps change times are kept
//!   ([`Sources::stat_tells_changes`], and each file's own file system):
//!   network and FUSE file systems can answer `stat` from a cache or make
//!   change times up.
//! - Footers of objects in object stores are not kept: a store's
//!   modification times have a resolution of a second, and DataFusion's
//!   cache does not tell two buckets' keys apart. Each query reads them
//!   again (when planning, for statistics, and when scanning).
//! - [`FooterReaders`] reads footers for the scans and keeps the store's
//!   error when reading one fails (DataFusion's reader turns it into
//!   text), so that a file deleted before its footer was read is reported
//!   missing, not malformed.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::common::HashMap;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::parquet::{
    CachedParquetMetaData, DefaultParquetFileReaderFactory, ParquetFileReaderFactory,
};
use datafusion::error::Result;
use datafusion::execution::cache::cache_manager::CachedFileMetadataEntry;
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::cache::{Cache, CacheEntryInfo};
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{ObjectMeta, ObjectStore};
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::FutureExt;
use futures::future::BoxFuture;
use prost::bytes::Bytes;

use super::source::Sources;
use super::versions::{FileStamp, stat_tells_changes_at};

/// A file must be unchanged this long before its footer is kept: a
/// rewrite within the resolution of its times could keep every one of
/// them, and a footer read just before it would outlive it.
pub const SETTLING: Duration = Duration::from_secs(2);

/// Stamps of footers no longer held past which they are dropped.
const UNHELD_STAMPS: usize = 1024;

/// DataFusion's footer cache, trusted only as the module documentation
/// says.
pub struct FooterCache {
    footers: DefaultCache<Path, CachedFileMetadataEntry>,
    /// The stamp of each kept footer's file when the footer was read. Held
    /// while `footers` is read or written, so that a footer and its stamp
    /// change together.
    kept: Mutex<HashMap<Path, FileStamp>>,
    /// Which keys are files of datasets on the connector's disk whose
    /// changes `stat` tells (others, object stores' keys among them, are
    /// never `stat`ed here, never kept).
    sources: Sources,
    local: LocalFileSystem,
    settling: Duration,
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
            kept: Mutex::default(),
            sources,
            local: LocalFileSystem::new(),
            settling,
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<Path, FileStamp>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stamp now of the dataset file at `location`, if its footer may
    /// be kept at all.
    fn stamp_now(&self, location: &Path) -> Option<FileStamp> {
        if !self.sources.stat_tells_changes(location.as_ref()) {
            return None;
        }
        let path = self.local.path_to_filesystem(location).ok()?;
        // A file under the dataset's root may be on another file system
        // (a link, a mount point).
        FileStamp::of(&path).filter(|_| stat_tells_changes_at(&path))
    }

    /// The footer kept for `key` if its file's stamp is `now`, the one it
    /// had when the footer was read; otherwise forgets the footer.
    fn serve(&self, key: &Path, now: Option<FileStamp>) -> Option<CachedFileMetadataEntry> {
        let mut kept = self.kept();
        if now.is_some()
            && kept.get(key) == now.as_ref()
            && let Some(footer) = self.footers.get(key)
        {
            return Some(footer);
        }
        kept.remove(key);
        self.footers.remove(key);
        None
    }

    /// Keeps `footer`, read from the file when it had `stamp`.
    fn keep(&self, key: &Path, footer: CachedFileMetadataEntry, stamp: FileStamp) {
        let mut kept = self.kept();
        // `DefaultCache::put` leaves an entry it will not take (too large)
        // where it is: none may outlive the stamp it was read at.
        self.footers.remove(key);
        self.footers.put(key, footer);
        kept.insert(key.clone(), stamp);
        if kept.len() > self.footers.len() + UNHELD_STAMPS {
            kept.retain(|key, _| self.footers.contains_key(key));
        }
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

/// DataFusion's own fetches (planning: schemas and statistics) are served
/// kept footers; what they offer back is not kept, since nothing ties an
/// offer to the lookup before its read ([`OneFetch`] does, for the scans).
impl Cache<Path, CachedFileMetadataEntry> for FooterCache {
    fn get(&self, key: &Path) -> Option<CachedFileMetadataEntry> {
        // `stat` before taking the lock: a slow disk holds up only the
        // lookups of its own files.
        let now = self.stamp_now(key);
        self.serve(key, now)
    }

    fn put(&self, _: &Path, _: CachedFileMetadataEntry) -> Option<CachedFileMetadataEntry> {
        None
    }

    fn remove(&self, k: &Path) -> Option<CachedFileMetadataEntry> {
        let mut kept = self.kept();
        kept.remove(k);
        self.footers.remove(k)
    }

    fn contains_key(&self, k: &Path) -> bool {
        self.footers.contains_key(k)
    }

    fn len(&self) -> usize {
        self.footers.len()
    }

    fn clear(&self) {
        let mut kept = self.kept();
        kept.clear();
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
    /// `None` for an object store: its footers are not kept.
    footers: Option<Arc<FooterCache>>,
    pages: DefaultParquetFileReaderFactory,
}

impl FooterReaders {
    pub fn new(store: Arc<dyn ObjectStore>, footers: Option<Arc<FooterCache>>) -> Self {
        let pages = DefaultParquetFileReaderFactory::new(Arc::clone(&store));
        Self {
            store,
            footers,
            pages,
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
            .pages
            .create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(FooterReader {
            pages,
            store: Arc::clone(&self.store),
            footers: self.footers.clone(),
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
    footers: Option<Arc<FooterCache>>,
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
        let (store, meta, hint) = (self.store.as_ref(), &self.meta, self.metadata_size_hint);
        let location = &meta.location;
        let keeping = self
            .footers
            .clone()
            .filter(|footers| footers.sources.stat_tells_changes(location.as_ref()));
        async move {
            let Some(footers) = keeping else {
                let policy = options.map(|o| o.column_index_policy());
                return read_footer(store, meta, hint, policy).await;
            };
            let mut fetch = OneFetch::new(footers);
            if let Some(kept) = fetch.lookup(meta).and_then(|entry| {
                let footer = entry
                    .file_metadata
                    .as_any()
                    .downcast_ref::<CachedParquetMetaData>()?;
                Some(Arc::clone(footer.parquet_metadata()))
            }) {
                return Ok(kept);
            }
            // Kept with its page index, so that the planning of later
            // queries, which asks for it, is served the footer as it is.
            let footer = read_footer(store, meta, hint, Some(PageIndexPolicy::Optional)).await?;
            fetch.put(meta, Arc::clone(&footer));
            Ok(footer)
        }
        .boxed()
    }
}

/// Reads the footer of the file `meta` from `store`.
async fn read_footer(
    store: &dyn ObjectStore,
    meta: &ObjectMeta,
    metadata_size_hint: Option<usize>,
    policy: Option<PageIndexPolicy>,
) -> Result<Arc<ParquetMetaData>, ParquetError> {
    DFParquetMetadata::new(store, meta)
        .with_metadata_size_hint(metadata_size_hint)
        .with_page_index_policy(policy)
        .fetch_metadata()
        .await
        // The error itself, not its text: it says whether the file was
        // missing, unreadable or malformed.
        .map_err(|e| ParquetError::External(Box::new(e)))
}

/// One scan's fetch of one footer: it looks the footer up, and on a miss
/// reads it and offers it back. The fetch notes the file's stamp at its
/// lookup, and the footer is kept only if the file had settled then and
/// still has that stamp.
struct OneFetch {
    cache: Arc<FooterCache>,
    looked_up: Option<FileStamp>,
}

impl OneFetch {
    fn new(cache: Arc<FooterCache>) -> Self {
        Self {
            cache,
            looked_up: None,
        }
    }

    /// The footer kept for the file listed as `meta`: kept for the file as
    /// it is now, and for the version the scan was planned on (the same
    /// size, modification time and inode), whose byte ranges the scan
    /// reads.
    fn lookup(&mut self, meta: &ObjectMeta) -> Option<CachedFileMetadataEntry> {
        let now = self.cache.stamp_now(&meta.location);
        self.looked_up = now.filter(|stamp| !stamp.changed_within(self.cache.settling));
        self.cache
            .serve(&meta.location, now)
            .filter(|kept| kept.is_valid_for(meta) && kept.meta.e_tag == meta.e_tag)
    }

    /// Offers `footer`, read after [`OneFetch::lookup`] from the file
    /// listed as `meta`, to be kept.
    fn put(self, meta: &ObjectMeta, footer: Arc<ParquetMetaData>) {
        let entry = CachedFileMetadataEntry::new(
            meta.clone(),
            Arc::new(CachedParquetMetaData::new(footer)),
        );
        self.offer(&meta.location, entry);
    }

    /// [`OneFetch::put`] of a footer in its cache entry.
    fn offer(self, key: &Path, entry: CachedFileMetadataEntry) {
        // Offered without a settled lookup: not kept.
        let Some(looked_up) = self.looked_up else {
            return;
        };
        // Otherwise a footer kept for the file as it is now stays: lookups
        // check it against the file anyway.
        if let Some(now) = self.cache.stamp_now(key)
            && now == looked_up
            && FooterCache::listed_as(&now, &entry.meta)
        {
            self.cache.keep(key, entry, now);
        }
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
    fn cache_of(dir: &std::path::Path) -> Arc<FooterCache> {
        let sources = Sources::default();
        sources.add("t", dir);
        Arc::new(FooterCache::settling_for(1 << 20, sources, Duration::ZERO))
    }

    /// What DataFusion lists for `file`.
    async fn listed(file: &std::path::Path) -> (Path, ObjectMeta) {
        let location = Path::from_filesystem_path(file).unwrap();
        let meta = LocalFileSystem::new().head(&location).await.unwrap();
        (location, meta)
    }

    fn entry(meta: &ObjectMeta, footer: &'static str) -> CachedFileMetadataEntry {
        CachedFileMetadataEntry::new(meta.clone(), Arc::new(Footer(footer)))
    }

    fn footer(entry: CachedFileMetadataEntry) -> &'static str {
        entry
            .file_metadata
            .as_any()
            .downcast_ref::<Footer>()
            .unwrap()
            .0
    }

    /// A scan's fetch of a footer: look it up, and on a miss read it (here:
    /// `read`) and offer it back. What it gives the scan.
    fn fetch(cache: &Arc<FooterCache>, meta: &ObjectMeta, read: &'static str) -> &'static str {
        let mut one = OneFetch::new(Arc::clone(cache));
        match one.lookup(meta) {
            Some(kept) => footer(kept),
            None => {
                one.offer(&meta.location, entry(meta, read));
                read
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

    #[tokio::test]
    async fn a_footer_is_served_until_its_file_is_rewritten_keeping_size_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.parquet");
        std::fs::write(&file, b"first").unwrap();
        let cache = cache_of(dir.path());
        let (location, meta) = listed(&file).await;
        assert_eq!(fetch(&cache, &meta, "first"), "first");
        assert_eq!(fetch(&cache, &meta, "read again"), "first", "not kept");
        // DataFusion's own lookups (planning) are served it too.
        assert_eq!(cache.get(&location).map(footer), Some("first"));

        rewrite_keeping_size_and_time(&file, b"other");
        let (_, now) = listed(&file).await;
        assert_eq!(
            (now.size, now.last_modified),
            (meta.size, meta.last_modified)
        );
        assert!(cache.get(&location).is_none(), "the old footer was served");
        assert_eq!(fetch(&cache, &now, "other"), "other");
        assert_eq!(fetch(&cache, &now, "read again"), "other");

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
        assert_eq!(fetch(&cache, &renamed, "third"), "third");

        // Deleted.
        std::fs::remove_file(&file).unwrap();
        assert!(cache.get(&location).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[tokio::test]
    async fn a_footer_is_kept_only_if_read_from_the_settled_file_listed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.parquet");
        std::fs::write(&file, b"first").unwrap();
        let (location, meta) = listed(&file).await;

        // Just written: not settled.
        let sources = Sources::default();
        sources.add("t", dir.path());
        let settling = Arc::new(FooterCache::new(1 << 20, sources));
        fetch(&settling, &meta, "first");
        assert_eq!(settling.len(), 0);

        // Changed in place between the lookup and the offer: the footer
        // read may be of either version.
        let cache = cache_of(dir.path());
        let mut one = OneFetch::new(Arc::clone(&cache));
        assert!(one.lookup(&meta).is_none());
        rewrite_keeping_size_and_time(&file, b"other");
        one.offer(&location, entry(&meta, "first"));
        assert_eq!(cache.len(), 0);

        // Two fetches of one file at once: the first looks up, reads the
        // old footer; the file changes and settles; the second looks up.
        // The first's offer is still refused: its own lookup saw the old
        // version.
        let (_, before) = listed(&file).await;
        let mut first = OneFetch::new(Arc::clone(&cache));
        assert!(first.lookup(&before).is_none());
        rewrite_keeping_size_and_time(&file, b"third");
        let mut second = OneFetch::new(Arc::clone(&cache));
        assert!(second.lookup(&before).is_none());
        first.offer(&location, entry(&before, "other"));
        assert_eq!(cache.len(), 0);
        let (_, after) = listed(&file).await;
        second.offer(&location, entry(&after, "third"));
        assert_eq!(cache.get(&location).map(footer), Some("third"));

        // Offered without a lookup, or by DataFusion's own fetches.
        cache.remove(&location);
        OneFetch::new(Arc::clone(&cache)).offer(&location, entry(&after, "third"));
        cache.put(&location, entry(&after, "third"));
        assert_eq!(cache.len(), 0);

        // Replaced by a rename between the listing and the lookup, by a
        // file of the same size and modification time: only the inode
        // differs from what was listed.
        let new = dir.path().join("new");
        std::fs::write(&new, b"forth").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(std::fs::metadata(&file).unwrap().modified().unwrap())
            .unwrap();
        std::fs::rename(&new, &file).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (_, renamed) = listed(&file).await;
        assert_eq!(
            (renamed.size, renamed.last_modified),
            (after.size, after.last_modified)
        );
        fetch(&cache, &after, "third");
        assert_eq!(cache.len(), 0);
        assert_eq!(fetch(&cache, &renamed, "forth"), "forth");
        assert_eq!(cache.len(), 1, "the file listed is kept");

        // A scan planned on an older version (another size) is not served
        // the footer kept for the file as it is now.
        let smaller = ObjectMeta {
            size: renamed.size - 1,
            ..renamed.clone()
        };
        assert_eq!(fetch(&cache, &smaller, "planned"), "planned");
        let other_inode = ObjectMeta {
            e_tag: Some("1-2-3".into()),
            ..renamed.clone()
        };
        assert!(
            OneFetch::new(Arc::clone(&cache))
                .lookup(&other_inode)
                .is_none()
        );
        assert_eq!(fetch(&cache, &renamed, "read again"), "forth");

        // A file on this disk, but of no dataset.
        let elsewhere = tempfile::tempdir().unwrap();
        let stray = elsewhere.path().join("b.parquet");
        std::fs::write(&stray, b"stray").unwrap();
        let (_, stray_meta) = listed(&stray).await;
        assert_eq!(fetch(&cache, &stray_meta, "stray"), "stray");
        assert_eq!(fetch(&cache, &stray_meta, "read again"), "read again");
    }
}
