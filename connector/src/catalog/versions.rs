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
/// and a digest of every file's name, size, time and ETag (equal digests,
/// equal files). Sizes are not written out: consumers read their own
/// release records, and a dataset's size in bytes changes with each row
/// added, which DP answers do not reveal.
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
            by_dataset.entry(dataset.clone()).or_default().push(format!(
                "{}\t{}\t{}\t{}",
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

/// The cache version of datasets on the connector's disk: their files'
/// sizes and modification times now. `None` when a dataset is in a
/// database or an object store, whose changes cannot be seen without
/// reading them: DP answers over those are never served from the cache.
pub fn cache_version<'a>(locations: impl Iterator<Item = &'a Location>) -> Option<String> {
    let mut lines = Vec::new();
    for location in locations {
        let Location::Local(path) = location else {
            return None;
        };
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            walk(path)
        } else {
            vec![path.clone()]
        };
        for file in files {
            let meta = std::fs::metadata(&file).ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            lines.push(format!(
                "{}\t{}\t{modified}",
                file.display(),
                meta.map(|m| m.len()).unwrap_or(0)
            ));
        }
    }
    lines.sort();
    Some(short_digest(&lines.join("\n")))
}

/// Every file under `dir` (partition directories included). A directory
/// reached twice (through a symbolic link) is walked once.
pub(super) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    walk_with_directories(dir).0
}

/// The files under `dir`, and the directories walked (`dir` first).
pub(super) fn walk_with_directories(
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
        assert_eq!(walk(dir.path()), vec![dir.path().join("a.csv")]);
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
        let remote = Location::Object("s3://lake/t/".into());
        assert_eq!(cache_version([&location, &remote].into_iter()), None);
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
