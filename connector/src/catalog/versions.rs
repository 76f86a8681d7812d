//! Which version of each dataset a query read, for its audit records, and
//! the version key of the DP answer cache.
//!
//! Data is live: files are replaced, objects rewritten, database rows
//! change. A query's [`DataReads`] travels in its session's configuration;
//! the files a scan was planned over (size, modification time, ETag, as
//! DataFusion listed them) and each PostgreSQL scan's transaction snapshot
//! are noted in it, and the release record names them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use ring::digest;

use super::source::Sources;
use crate::config::Location;

/// The data versions one query read, by dataset.
#[derive(Debug, Default)]
pub struct DataReads(Mutex<BTreeMap<String, String>>);

impl DataReads {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Notes `version` of `dataset` (a dataset read twice keeps both).
    pub fn note(&self, dataset: &str, version: String) {
        let mut reads = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match reads.get_mut(dataset) {
            Some(known) if !known.contains(&version) => {
                known.push_str("; ");
                known.push_str(&version);
            }
            Some(_) => {}
            None => {
                reads.insert(dataset.to_string(), version);
            }
        }
    }

    /// What was noted for `dataset`.
    pub fn version_of(&self, dataset: &str) -> Option<String> {
        let reads = self.0.lock().unwrap_or_else(|e| e.into_inner());
        reads.get(dataset).cloned()
    }

    /// `dataset: version` lines, in dataset order.
    pub fn lines(&self) -> Vec<String> {
        let reads = self.0.lock().unwrap_or_else(|e| e.into_inner());
        reads.iter().map(|(d, v)| format!("{d}: {v}")).collect()
    }
}

/// Notes the files each scan of `plan` was planned over, by dataset: how
/// many, the newest modification time (which the catalog shows anyway),
/// and a digest of every file's name, size, time and ETag, and a local
/// file's change time (equal digests, equal files). Sizes are not written
/// out: consumers read their own release records, and a dataset's size in
/// bytes changes with each row added, which DP answers do not reveal.
pub fn note_files(plan: &Arc<dyn ExecutionPlan>, sources: &Sources, reads: &DataReads) {
    let _ = plan.apply(|node| {
        let Some(files) = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|scan| scan.data_source().downcast_ref::<FileScanConfig>())
        else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let url = files.object_store_url.as_str().trim_end_matches('/');
        let store = url.starts_with("s3://").then_some(url);
        let mut by_dataset: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut newest: BTreeMap<String, i64> = BTreeMap::new();
        // A large file is split into byte ranges over several groups: each
        // file counts once.
        let mut seen = std::collections::BTreeSet::new();
        for file in files.file_groups.iter().flat_map(|group| group.iter()) {
            let meta = &file.object_meta;
            if !seen.insert(meta.location.clone()) {
                continue;
            }
            let Some(dataset) = sources.dataset_in(store, meta.location.as_ref()) else {
                continue;
            };
            // A local file rewritten in place can keep its size, time and
            // ETag (inode, time, size): its change time tells.
            let changed = match store {
                None => local_stamp(&meta.location)
                    .map(|stamp| format!("\t{}", stamp.changed))
                    .unwrap_or_default(),
                Some(_) => String::new(),
            };
            by_dataset.entry(dataset.clone()).or_default().push(format!(
                "{}\t{}\t{}\t{}{changed}",
                meta.location,
                meta.size,
                meta.last_modified.timestamp_micros(),
                meta.e_tag.as_deref().unwrap_or("")
            ));
            let time = newest.entry(dataset).or_insert(i64::MIN);
            *time = (*time).max(meta.last_modified.timestamp_micros());
        }
        for (dataset, mut lines) in by_dataset {
            lines.sort();
            let newest = chrono::DateTime::from_timestamp_micros(newest[&dataset])
                .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
                .unwrap_or_default();
            reads.note(
                &dataset,
                format!(
                    "{} file(s), newest modified {newest}, digest {}",
                    lines.len(),
                    short_digest(&lines.join("\n"))
                ),
            );
        }
        Ok(TreeNodeRecursion::Continue)
    });
}

/// The stamp of the local file at `location` now.
fn local_stamp(location: &datafusion::object_store::path::Path) -> Option<FileStamp> {
    let path = datafusion::object_store::local::LocalFileSystem::new()
        .path_to_filesystem(location)
        .ok()?;
    FileStamp::of(&path)
}

/// The cache version of datasets on the connector's disk: a digest of
/// their [`FilesVersion`]s now (all but the devices). `None` when a dataset is in a database or
/// an object store, whose changes cannot be seen without reading them, or
/// cannot be read at all: DP answers over those are never served from the
/// cache.
pub fn cache_version<'a>(locations: impl Iterator<Item = &'a Location>) -> Option<String> {
    let mut lines = Vec::new();
    for location in locations {
        let Location::Local(path) = location else {
            return None;
        };
        let files = FilesVersion::now(path)?;
        lines.extend(files.0.iter().map(|(file, stamp)| {
            // Not the device: its number can change across a restart (it
            // is made up for overlayfs, btrfs, tmpfs), and the key is kept.
            format!(
                "{}\t{}\t{}\t{}\t{}",
                file.display(),
                stamp.size,
                stamp.modified,
                stamp.changed,
                stamp.inode
            )
        }));
    }
    lines.sort();
    Some(short_digest(&lines.join("\n")))
}

/// One file (or directory) as `stat` describes it: what changes when it
/// is rewritten, replaced or touched. Size and modification time can be
/// kept by a rewrite (`cp -p`, `touch -r`, a restore); the change time
/// cannot (no system call sets it) and a file replaced by a rename has
/// another inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct FileStamp {
    pub size: u64,
    /// Modification time, in ns since the epoch.
    pub modified: i128,
    /// Change time (of content or metadata), in ns since the epoch.
    pub changed: i128,
    pub inode: u64,
    pub device: u64,
}

impl FileStamp {
    /// `None` when `path` cannot be `stat`ed (gone, no permission).
    pub(super) fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let nanos = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
        Some(Self {
            size: m.len(),
            modified: nanos(m.mtime(), m.mtime_nsec()),
            changed: nanos(m.ctime(), m.ctime_nsec()),
            inode: m.ino(),
            device: m.dev(),
        })
    }

    /// Whether its modification or change time is less than `window` ago
    /// (or in the future). A file changed that recently may change again
    /// within the resolution of its times and keep this stamp.
    pub(super) fn changed_within(&self, window: std::time::Duration) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let settled_before = now - window.as_nanos() as i128;
        self.modified.max(self.changed) > settled_before
    }
}

/// Whether `stat` tells every change of the files of the file system
/// `path` is on: a local one whose kernel keeps change times (any write,
/// rename or metadata change sets the change time to now, and no system
/// call sets it back). Network and FUSE file systems are not: `stat` may
/// answer from an attribute cache, and some make change times up.
/// A path not there yet is on the file system of its nearest ancestor.
pub(super) fn stat_tells_changes_at(path: &std::path::Path) -> bool {
    path.ancestors()
        .find_map(|p| rustix::fs::statfs(p).ok())
        .is_some_and(|fs| kept_by_the_kernel(fs.f_type as u32))
}

/// Whether `f_type` (from `statfs`) names a file system whose kernel
/// keeps change times.
fn kept_by_the_kernel(f_type: u32) -> bool {
    const KEPT_BY_THE_KERNEL: [u32; 10] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
        0x2FC1_2FC1, // zfs
        0xF2F5_2010, // f2fs
        0x7371_7368, // squashfs (read-only)
        0xE0F5_E1E2, // erofs (read-only)
        0x9660,      // iso9660 (read-only)
    ];
    KEPT_BY_THE_KERNEL.contains(&f_type)
}

/// Every file (and directory) of a local dataset as [`FileStamp`]
/// describes it now. A file rewritten in place changes its change time;
/// one replaced by a rename, its inode; a file added or removed, its
/// directory's times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FilesVersion(pub(super) Vec<(std::path::PathBuf, FileStamp)>);

impl FilesVersion {
    /// `None` when the dataset's file or directory cannot be read.
    pub(super) fn now(path: &std::path::Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        // A directory's own times change when a file is added or removed:
        // one added and removed again while the files are read shows.
        let files = if meta.is_dir() {
            let (mut files, directories) = walk_with_directories(path);
            files.extend(directories);
            files
        } else {
            vec![path.to_path_buf()]
        };
        // An entry that cannot be `stat`ed (a dangling symbolic link, a file
        // removed since the walk, which its directory's times show) is left
        // out, as DataFusion's listing leaves it out.
        let mut described: Vec<_> = files
            .into_iter()
            .filter_map(|file| FileStamp::of(&file).map(|stamp| (file, stamp)))
            .collect();
        described.sort();
        Some(Self(described))
    }

    pub(super) fn bytes_on_disk(&self) -> u64 {
        self.0.iter().map(|(_, stamp)| stamp.size).sum()
    }

    /// Whether a file's modification or change time is less than `window`
    /// ago (or in the future).
    pub(super) fn changed_within(&self, window: std::time::Duration) -> bool {
        self.0.iter().any(|(_, stamp)| stamp.changed_within(window))
    }

    /// Whether `stat` tells every change of every file (none is on a
    /// network or FUSE file system).
    pub(super) fn stat_tells_changes(&self) -> bool {
        self.0.iter().all(|(path, _)| stat_tells_changes_at(path))
    }
}

/// The files under `dir` (partition directories included), and the
/// directories walked (`dir` first). A directory reached twice (through a
/// symbolic link) is walked once.
fn walk_with_directories(
    dir: &std::path::Path,
) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let mut directories = Vec::new();
    let mut walked = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&d) else {
            continue;
        };
        if !walked.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        directories.push(d);
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    (files, directories)
}

fn short_digest(text: &str) -> String {
    digest::digest(&digest::SHA256, text.as_bytes()).as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_linked_into_itself_is_walked_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), "x\n1\n").unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("again")).unwrap();
        let (files, directories) = walk_with_directories(dir.path());
        assert_eq!(files, vec![dir.path().join("a.csv")]);
        assert_eq!(directories, vec![dir.path().to_path_buf()]);
    }

    #[test]
    fn the_cache_version_follows_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("zone=1");
        std::fs::create_dir(&part).unwrap();
        std::fs::write(part.join("a.csv"), "x\n1\n").unwrap();
        let location = Location::Local(dir.path().to_path_buf());
        let before = cache_version(std::iter::once(&location)).unwrap();
        assert_eq!(cache_version(std::iter::once(&location)).unwrap(), before);
        std::fs::write(part.join("a.csv"), "x\n1\n2\n").unwrap();
        assert_ne!(cache_version(std::iter::once(&location)).unwrap(), before);
        // Rewritten in place with its size and modification time kept.
        let file = part.join("a.csv");
        let kept = std::fs::metadata(&file).unwrap().modified().unwrap();
        let before = cache_version(std::iter::once(&location)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, "x\n3\n4\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(kept)
            .unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), kept);
        assert_ne!(cache_version(std::iter::once(&location)).unwrap(), before);
        // A dangling link in the directory is left out: it does not make
        // the version unknown.
        std::os::unix::fs::symlink(dir.path().join("nowhere"), part.join("b.csv")).unwrap();
        assert!(cache_version(std::iter::once(&location)).is_some());
        let gone = Location::Local(dir.path().join("gone"));
        assert_eq!(cache_version(std::iter::once(&gone)), None);
        let remote = Location::Object("s3://lake/t/".into());
        assert_eq!(cache_version([&location, &remote].into_iter()), None);
    }

    #[test]
    fn only_file_systems_that_keep_change_times_are_trusted() {
        assert!(kept_by_the_kernel(0xEF53)); // ext4
        assert!(kept_by_the_kernel(0x9123_683E)); // btrfs
        assert!(!kept_by_the_kernel(0x6969)); // nfs
        assert!(!kept_by_the_kernel(0x6573_5546)); // fuse
        assert!(!kept_by_the_kernel(0xFF53_4D42)); // cifs
        assert!(!kept_by_the_kernel(0x0102_1997)); // 9p
        // The test machines' temporary directories are on one of them.
        let dir = tempfile::tempdir().unwrap();
        assert!(stat_tells_changes_at(dir.path()));
        assert!(stat_tells_changes_at(&dir.path().join("not/yet")));
        assert!(!stat_tells_changes_at(std::path::Path::new("/proc/self")));
    }

    #[test]
    fn reads_keep_one_line_per_dataset() {
        let reads = DataReads::default();
        reads.note("trips", "v1".into());
        reads.note("trips", "v1".into());
        reads.note("trips", "v2".into());
        reads.note("zones", "v3".into());
        assert_eq!(reads.lines(), vec!["trips: v1; v2", "zones: v3"]);
    }
}
