//! Step 3's home in the daemon: loads the usage policy file, keeps the gate
//! that enforces it, and swaps in a new one when the file changes or on
//! SIGHUP. A broken new file is refused (logged with its line) and the
//! policy in force stays in force; connections are never dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use datafusion::arrow::datatypes::{Field, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::logical_expr::{Expr, LogicalPlan};
use sluice_policy::{
    Approval, Denial, PlanGate, PlanningContext, PolicyError, PolicyGate, PolicySet, Principal,
    QueryContext,
};
use tokio::sync::watch;

use crate::catalog::{Catalog, CatalogError};

/// How often the policy file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a usage policy file cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum UsagePolicyError {
    /// The file cannot be read (the cause says why).
    #[error("reading the usage policy {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is read but wrong: the message names file, line and field.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// The datasets the policy is checked against cannot be opened
    /// (`sluice config check`).
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The gate in force, replaceable while queries run.
pub struct PolicyHandle {
    current: RwLock<Arc<dyn PlanGate>>,
    file: Option<PathBuf>,
    mask_secret: Vec<u8>,
    catalog: Option<Arc<Catalog>>,
}

impl PolicyHandle {
    /// Loads `file` (or, with `None`, a gate that refuses everything).
    pub fn load(
        file: Option<&Path>,
        mask_secret: Vec<u8>,
        catalog: Arc<Catalog>,
    ) -> Result<Self, UsagePolicyError> {
        let gate: Arc<dyn PlanGate> = match file {
            Some(path) => Arc::new(compile(path, &mask_secret, &catalog)?),
            None => Arc::new(NoPolicy),
        };
        Ok(Self {
            current: RwLock::new(gate),
            file: file.map(Path::to_path_buf),
            mask_secret,
            catalog: Some(catalog),
        })
    }

    /// A handle on a given gate that never reloads (benchmarks, embedding).
    pub fn fixed(gate: Arc<dyn PlanGate>) -> Self {
        Self {
            current: RwLock::new(gate),
            file: None,
            mask_secret: Vec::new(),
            catalog: None,
        }
    }

    /// The gate in force now. Callers keep the `Arc` for the whole decision,
    /// so a reload never changes the rules halfway through one.
    pub fn current(&self) -> Arc<dyn PlanGate> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn version(&self) -> String {
        self.current().version().to_string()
    }

    /// Re-reads the policy file. On error the old policy stays in force.
    pub fn reload(&self) -> Result<bool, UsagePolicyError> {
        let (Some(path), Some(catalog)) = (&self.file, &self.catalog) else {
            return Ok(false);
        };
        let gate = compile(path, &self.mask_secret, catalog)?;
        let changed = gate.version() != self.version();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(gate);
        Ok(changed)
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

fn compile(
    path: &Path,
    mask_secret: &[u8],
    catalog: &Catalog,
) -> Result<PolicyGate, UsagePolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| UsagePolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let policy = PolicySet::compile(
        &path.display().to_string(),
        &text,
        &CatalogContext { catalog },
        mask_secret,
    )?;
    for warning in policy.warnings() {
        tracing::warn!("usage policy: {warning}");
    }
    Ok(PolicyGate::new(policy))
}

/// Compiles the policy file against the datasets of a config, as `serve`
/// would, without serving: returns the policy version. (`sluice config check`.)
pub async fn check(
    config: &crate::config::Config,
    file: &Path,
) -> Result<String, UsagePolicyError> {
    // A check runs no query: it must not touch a running server's spill
    // directory.
    let catalog = Catalog::open(config, &crate::catalog::Spill::Off).await?;
    let gate = compile(file, b"check", &catalog)?;
    Ok(gate.version().to_string())
}

/// Reloads the policy when its file changes (polled) or on SIGHUP, until
/// `stop` turns true.
pub async fn watch_for_changes(handle: Arc<PolicyHandle>, mut stop: watch::Receiver<bool>) {
    let Some(path) = handle.file().map(Path::to_path_buf) else {
        return;
    };
    let mut last_seen = fingerprint(&path);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup_signal = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_signal = std::future::pending::<Option<()>>();
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(POLL_INTERVAL) => false,
            _ = hangup_signal => true,
        };
        let seen = fingerprint(&path);
        if !forced && seen == last_seen {
            continue;
        }
        last_seen = seen;
        let before = handle.version();
        match handle.reload() {
            Ok(true) => tracing::info!(
                file = %path.display(),
                from = %before,
                to = %handle.version(),
                "usage policy reloaded"
            ),
            Ok(false) => {
                tracing::info!(file = %path.display(), version = %before, "usage policy unchanged")
            }
            Err(e) => tracing::error!(
                file = %path.display(),
                version = %before,
                "the changed usage policy was refused; the previous policy stays in force: {}",
                with_causes(&e)
            ),
        }
    }
}

/// `error: cause: cause…`, as anyhow's `{:#}` prints a chain.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Modification time and length: enough to notice an edit.
fn fingerprint(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Lets the policy engine see the served datasets and parse row filters
/// with the same SQL dialect and functions as queries.
struct CatalogContext<'a> {
    catalog: &'a Catalog,
}

impl PlanningContext for CatalogContext<'_> {
    fn dataset_schema(&self, name: &str) -> Option<SchemaRef> {
        self.catalog.dataset(name).map(|d| d.schema.clone())
    }

    fn parse_predicate(&self, sql: &str, schema: &DFSchema) -> datafusion::error::Result<Expr> {
        self.catalog
            .session()
            .state()
            .create_logical_expr(sql, schema)
    }

    fn function_exists(&self, name: &str) -> bool {
        let state = self.catalog.session().state();
        state.scalar_functions().contains_key(name)
            || state.aggregate_functions().contains_key(name)
            || state.window_functions().contains_key(name)
    }
}

/// The gate without a policy file: deny by default, everything.
struct NoPolicy;

impl PlanGate for NoPolicy {
    fn version(&self) -> &str {
        "none"
    }

    fn decide(&self, _: &QueryContext, _: LogicalPlan) -> Result<Approval, Denial> {
        Err(Denial::forbidden(
            sluice_policy::checks::DENY_BY_DEFAULT,
            "no usage policy is configured, so nothing may be read: set [policy] file = \"policy.yaml\" in the connector config (see docs/policy.md)",
        ))
    }

    fn visible_columns(&self, _: &Principal, _: &str) -> Option<Vec<Field>> {
        None
    }

    fn planning_view(&self, _: &Principal, _: &str) -> sluice_policy::PlanningView {
        sluice_policy::PlanningView::Hidden
    }
}
