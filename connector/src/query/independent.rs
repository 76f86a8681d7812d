//! Planning that looks at the query and the deployment only, not at the
//! data: how a connector with workers plans (step 6).
//!
//! DataFusion chooses parts of a physical plan from what it knows of the
//! data: the files' statistics (which join input to gather or build a hash
//! table from, an aggregate answered from row counts), the files' sizes (a
//! small file is read as one partition, and one partition needs no
//! shuffle) and whether a scan found any file at all (one that found none
//! is an `EmptyExec`, known to hold nothing: `catalog/file_table.rs`). On a connector with workers the plan's
//! stages are an output (`EXPLAIN POLICY` shows them, and they decide what
//! runs where and how long it takes), so there these choices are made as
//! if nothing were known: the same query on the same deployment gets the
//! same stages whatever the data.

use std::sync::Arc;

use datafusion::execution::SessionState;

use crate::catalog::file_table::ScanShapes;

/// `state`, planning without statistics, splitting every file into as
/// many ranges as there are partitions, and with every scan of files
/// shaped alike ([`ScanShapes`]): [`ScanShapes::WithoutListing`] for
/// `EXPLAIN POLICY`, which lists nothing, else [`ScanShapes::Fixed`].
pub fn data_independent(mut state: SessionState, shapes: ScanShapes) -> SessionState {
    let config = state.config_mut();
    config.set_extension(Arc::new(shapes));
    let options = config.options_mut();
    options.execution.collect_statistics = false;
    options.optimizer.repartition_file_min_size = 0;
    options.optimizer.preserve_file_partitions = 0;
    state
}
