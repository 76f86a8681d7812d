//! The connector's configuration: the TOML file format, its defaults, and
//! validation that names the file, the field and what is wrong.
//!
//! Without `--config`, [`Config::embedded_default`] describes the demo: the
//! state directory's development PKI and the two generated demo datasets.
//! Relative paths in a config file are resolved against the file's directory;
//! relative paths in the embedded default against the state directory.
//!
//! ```
//! let cfg = sluice::config::Config::from_toml_str(
//!     r#"
//!     [server]
//!     listen = "0.0.0.0:50051"
//!
//!     [limits]
//!     query_timeout = "30s"
//!     query_memory = "512MiB"
//!
//!     [[datasets]]
//!     name = "trips"
//!     format = "parquet"
//!     path = "/data/trips/"
//!     "#,
//!     std::path::Path::new("/etc/sluice/sluice.toml"),
//! )
//! .unwrap();
//! assert_eq!(cfg.limits.query_timeout.as_secs(), 30);
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use datafusion::arrow::datatypes::DataType;
use serde::Deserialize;

mod sources;

pub use sources::{
    DatabaseConfig, DatabaseKind, DatabaseTls, ObjectStoreConfig, Secret, bucket_of,
};

/// Where a configuration came from, for error messages.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("<embedded default config>"),
        }
    }
}

/// A configuration problem: which file, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration in {source_name}: {field}: {reason}")]
pub struct ConfigError {
    pub source_name: String,
    /// Dotted path of the field, e.g. `limits.query_timeout` or `datasets[1].path`.
    pub field: String,
    pub reason: String,
}

/// The complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub server: ServerConfig,
    /// `None`: use (and create on first start) the development PKI in the
    /// state directory.
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub datasets: Vec<DatasetConfig>,
    /// Databases datasets are read from (`format = "postgres"`).
    pub databases: Vec<DatabaseConfig>,
    /// Object stores datasets' `s3://` paths are in.
    pub object_stores: Vec<ObjectStoreConfig>,
    /// The usage policy file (YAML, `docs/policy.md`). `None`: no policy, and
    /// every query is refused (deny by default).
    pub policy: Option<PathBuf>,
    /// The workers plan fragments run on (`[cluster]`); none: this
    /// connector executes every query itself.
    pub cluster: ClusterConfig,
    /// The Dataspace Protocol endpoint (`[dsp]`; docs/dsp.md).
    pub dsp: DspConfig,
    /// The web console (`[console]`; docs/console.md).
    pub console: ConsoleConfig,
}

/// `[console]`: the web console for administrators and consumers (HTTPS).
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Where it listens; `None` (no `[console]`, or `listen = "off"`): not
    /// served.
    pub listen: Option<SocketAddr>,
    /// The URL browsers reach it at, e.g. behind a reverse proxy (default
    /// `https://<bound address>`); sign-in links name it.
    pub public_url: Option<url::Url>,
    /// How long a sign-in link lives unless its request asks for less.
    pub login_link_ttl: Duration,
    /// A session ends this long after sign-in, however busy.
    pub session_ttl: Duration,
    /// A session unused this long ends.
    pub session_idle: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: None,
            public_url: None,
            login_link_ttl: Duration::from_secs(300),
            session_ttl: Duration::from_secs(8 * 3600),
            session_idle: Duration::from_secs(30 * 60),
        }
    }
}

/// `[dsp]`: the Dataspace Protocol (2025-1, HTTPS) endpoint.
#[derive(Debug, Clone)]
pub struct DspConfig {
    /// Where it listens; `None` (no `[dsp]`, or `listen = "off"`): not served.
    pub listen: Option<SocketAddr>,
    /// The URL others reach it at (default `https://<bound address>`).
    pub public_url: Option<url::Url>,
    /// The Flight SQL endpoint data addresses name (default
    /// `grpc+tls://<server.listen's bound address>`).
    pub flight_endpoint: Option<String>,
    /// This connector's participant id in the catalog and agreements
    /// (default: the principal of its server certificate).
    pub participant_id: Option<String>,
    /// How long a transfer's access token is valid.
    pub token_ttl: Duration,
}

impl Default for DspConfig {
    fn default() -> Self {
        Self {
            listen: None,
            public_url: None,
            flight_endpoint: None,
            participant_id: None,
            token_ttl: DEFAULT_TOKEN_TTL,
        }
    }
}

/// A transfer's token lasts an hour unless `dsp.token_ttl` says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// `[cluster]`: the `sluice worker`s this connector (their coordinator)
/// sends plan fragments to, and the certificate it presents to them.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `https://host:port` of each worker.
    pub workers: Vec<url::Url>,
    /// `None`: the development PKI's `coordinator` pair and CA.
    pub tls: Option<ClusterTls>,
    /// How often every worker is probed (and at once after a failed query).
    pub probe_interval: Duration,
}

/// The default `cluster.probe_interval`.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            workers: Vec::new(),
            tls: None,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }
}

/// The coordinator's client certificate (role coordinator, `sluice certs
/// coordinator`) and the CA its workers' certificates are issued by.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub worker_ca: PathBuf,
}

/// Why a worker address is not usable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorkerUrlError(String);

/// A worker's address as written in `[cluster] workers` or `--worker`.
pub fn parse_worker_url(text: &str) -> Result<url::Url, WorkerUrlError> {
    let bad = |why: String| Err(WorkerUrlError(why));
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            return bad(format!(
                "`{text}` is not a URL ({e}); write https://HOST:PORT"
            ));
        }
    };
    if url.scheme() != "https" {
        return bad(format!(
            "`{text}`: workers are reached over mTLS only; write https://HOST:PORT"
        ));
    }
    if url.host().is_none() || url.port().is_none() {
        return bad(format!(
            "`{text}` needs a host and a port: https://HOST:PORT"
        ));
    }
    if url.path() != "/" || url.query().is_some() {
        return bad(format!(
            "`{text}`: a worker URL has no path: https://HOST:PORT"
        ));
    }
    Ok(url)
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// How long a SIGTERM waits for in-flight streams before exiting anyway.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// Per-query and per-server resource limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory one query may hold (DataFusion memory pool), in bytes.
    pub query_memory: usize,
    /// Memory all queries running at once may hold together, in bytes.
    pub total_query_memory: usize,
    /// Disk all queries may fill together with what their sorts and
    /// aggregations spill beyond `query_memory`, in bytes
    /// (`<state_dir>/spill`); 0 turns spilling off.
    pub spill_space: u64,
    /// Memory for decoded copies of datasets on the connector's disk, in
    /// bytes, for all of them together; 0 keeps none.
    pub table_cache: usize,
    /// Wall-clock limit from the start of execution to the last batch.
    pub query_timeout: Duration,
    /// Queries executing at once; further queries wait in a bounded queue.
    pub max_concurrent_queries: usize,
    /// Of those, how many one organization may run at once (also the cap
    /// on its statements being planned at once).
    pub max_concurrent_queries_per_organization: usize,
    /// Queries that may wait for an execution (or planning) slot, in all;
    /// beyond it a query is refused at once with RESOURCE_EXHAUSTED.
    pub max_queued_queries: usize,
    /// Of those, how many of one organization.
    pub max_queued_queries_per_organization: usize,
    /// Longest wait for a slot before RESOURCE_EXHAUSTED.
    pub queue_timeout: Duration,
    /// Longest SQL text accepted, in bytes.
    pub max_sql_bytes: usize,
    /// How long a ticket from GetFlightInfo stays redeemable.
    pub ticket_ttl: Duration,
    /// Tickets issued but not yet redeemed.
    pub tickets: TenantCaps,
    /// Open prepared statements.
    pub prepared_statements: TenantCaps,
}

/// How many of something (tickets, prepared statements) may be held at
/// once: by all clients together, by one organization, by one principal.
/// One tenant filling its own share leaves the others theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCaps {
    pub total: usize,
    pub per_organization: usize,
    pub per_principal: usize,
    /// What is held, and the settings of the three caps, for messages.
    pub what: &'static str,
    pub settings: [&'static str; 3],
}

impl TenantCaps {
    /// The first cap that `held` (in all, by the organization, by the
    /// principal) has reached, as (count, whose, setting).
    pub fn reached(
        &self,
        held: (usize, usize, usize),
    ) -> Option<(usize, &'static str, &'static str)> {
        let (total, organization, principal) = held;
        let [all, per_organization, per_principal] = self.settings;
        if principal >= self.per_principal {
            Some((principal, "by this principal", per_principal))
        } else if organization >= self.per_organization {
            Some((organization, "by this organization", per_organization))
        } else if total >= self.total {
            Some((total, "by all clients together", all))
        } else {
            None
        }
    }
}

const TICKET_SETTINGS: [&str; 3] = [
    "max_outstanding_tickets",
    "max_outstanding_tickets_per_organization",
    "max_outstanding_tickets_per_principal",
];
const PREPARED_SETTINGS: [&str; 3] = [
    "max_prepared_statements_in_all",
    "max_prepared_statements_per_organization",
    "max_prepared_statements",
];

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Prometheus endpoint; `None` disables it.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `sluice=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Parquet,
    Csv,
    /// Newline-delimited JSON.
    Json,
    /// A table, view or schema-qualified relation in a PostgreSQL database.
    Postgres,
}

impl DatasetFormat {
    pub fn extension(self) -> &'static str {
        match self {
            DatasetFormat::Parquet => ".parquet",
            DatasetFormat::Csv => ".csv",
            DatasetFormat::Json => ".json",
            DatasetFormat::Postgres => "",
        }
    }

    fn is_file_format(self) -> bool {
        self != DatasetFormat::Postgres
    }
}

/// Where a dataset's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A file, or a directory whose files (with the format's extension, in
    /// hive-style partition directories if `partitions` are declared) form
    /// the dataset. Absolute after loading.
    Local(PathBuf),
    /// `s3://bucket/prefix/` (a directory) or `s3://bucket/key` (one
    /// object), in the object store configured for the bucket.
    Object(String),
    /// A relation (`table`, `schema.table`, a view) in `[[databases]]`
    /// entry `database`.
    Database { database: String, relation: String },
}

impl Location {
    /// The local file or directory, for a dataset on the connector's disk.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub name: String,
    pub format: DatasetFormat,
    pub location: Location,
    pub description: Option<String>,
    /// Declared schema; inferred from the files (or read from the
    /// database's catalog) when absent.
    pub schema: Option<Vec<ColumnConfig>>,
    /// Hive-style partition columns (`year=2026/month=11/…`), in directory
    /// order; they become the dataset's last columns.
    pub partitions: Vec<ColumnConfig>,
    pub csv: CsvOptions,
    /// Whether a dataset on the connector's disk may be kept decoded in
    /// memory (`limits.table_cache`); never a partitioned one.
    pub table_cache: bool,
}

#[derive(Debug, Clone)]
pub struct ColumnConfig {
    pub name: String,
    pub data_type: DataType,
    pub nullable: bool,
}

#[derive(Debug, Clone)]
pub struct CsvOptions {
    pub has_header: bool,
    pub delimiter: u8,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            has_header: true,
            delimiter: b',',
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            query_memory: 1 << 30,
            total_query_memory: 4 << 30,
            spill_space: 8 << 30,
            table_cache: 512 << 20,
            query_timeout: Duration::from_secs(300),
            max_concurrent_queries: 16,
            max_concurrent_queries_per_organization: 4,
            max_queued_queries: 64,
            max_queued_queries_per_organization: 16,
            queue_timeout: Duration::from_secs(10),
            max_sql_bytes: 256 * 1024,
            ticket_ttl: Duration::from_secs(300),
            tickets: TenantCaps {
                total: 10_000,
                per_organization: 1_000,
                per_principal: 256,
                what: "tickets (issued, not yet redeemed)",
                settings: TICKET_SETTINGS,
            },
            prepared_statements: TenantCaps {
                total: 10_000,
                per_organization: 1_024,
                per_principal: 256,
                what: "prepared statements",
                settings: PREPARED_SETTINGS,
            },
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_STATE_DIR: &str = ".sluice";

/// The demo configuration used when `serve` runs without `--config`.
const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_toml_str(&read_file(path)?, path)
    }

    /// Parses and validates config text as if read from `path` (used to name
    /// the file in errors and to resolve relative paths).
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = absolute(&base);
        parse(text, Source::File(absolute(path)), &base)
    }

    /// The demo configuration, with relative paths resolved against
    /// `state_dir`.
    pub fn embedded_default(state_dir: &Path) -> Config {
        let state_dir = absolute(state_dir);
        let mut cfg = parse(EMBEDDED_DEFAULT, Source::Embedded, &state_dir)
            .expect("the embedded default config is valid");
        cfg.server.state_dir = state_dir;
        cfg
    }

    /// The embedded default config text, for `sluice config example`.
    pub fn embedded_default_text() -> &'static str {
        EMBEDDED_DEFAULT
    }

    fn error(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            source_name: self.source.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Checks what can only be checked against the file system: dataset paths
    /// exist and have the declared kind. Called by `serve` before start-up, so
    /// that the embedded default can be checked after demo data is created.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        for (i, ds) in self.datasets.iter().enumerate() {
            let Some(path) = ds.location.local_path() else {
                continue;
            };
            let meta = std::fs::metadata(path).map_err(|e| {
                self.error(
                    format!("datasets[{i}].path"),
                    format!("dataset `{}`: cannot open {}: {e}", ds.name, path.display()),
                )
            })?;
            if !meta.is_file() && !meta.is_dir() {
                return Err(self.error(
                    format!("datasets[{i}].path"),
                    format!("{} is neither a file nor a directory", path.display()),
                ));
            }
        }
        if let Some(tls) = &self.tls {
            for (field, path) in [
                ("tls.cert", &tls.cert),
                ("tls.key", &tls.key),
                ("tls.client_ca", &tls.client_ca),
            ] {
                if !path.is_file() {
                    return Err(self.error(field, format!("no such file: {}", path.display())));
                }
            }
        }
        Ok(())
    }
}

/// Makes `p` absolute against the current directory without touching the
/// file system (paths need not exist yet).
/// `p` as written when absolute, else relative to `base` (the directory of
/// the configuration file).
pub(crate) fn resolve_against(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The text of a configuration file, or an error naming it.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: path.display().to_string(),
        field: "(file)".into(),
        reason: format!("cannot read the file: {e}"),
    })
}

pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

// ---------------------------------------------------------------------------
// The file format. Raw structs mirror the TOML; `parse` validates them into
// the types above, naming the field on every error.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    tls: Option<RawTls>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    datasets: Vec<RawDataset>,
    #[serde(default)]
    databases: Vec<sources::RawDatabase>,
    #[serde(default)]
    object_stores: Vec<sources::RawObjectStore>,
    policy: Option<RawPolicy>,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    dsp: RawDsp,
    #[serde(default)]
    console: RawConsole,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    /// An address, or "off".
    listen: Option<String>,
    public_url: Option<String>,
    login_link_ttl: Option<String>,
    session_ttl: Option<String>,
    session_idle: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDsp {
    /// An address, or "off".
    listen: Option<String>,
    public_url: Option<String>,
    flight_endpoint: Option<String>,
    participant_id: Option<String>,
    token_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    workers: Vec<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    worker_ca: Option<PathBuf>,
    probe_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    query_memory: Option<String>,
    total_query_memory: Option<String>,
    spill_space: Option<String>,
    table_cache: Option<String>,
    query_timeout: Option<String>,
    max_concurrent_queries: Option<usize>,
    max_concurrent_queries_per_organization: Option<usize>,
    max_queued_queries: Option<usize>,
    max_queued_queries_per_organization: Option<usize>,
    queue_timeout: Option<String>,
    max_sql_bytes: Option<String>,
    ticket_ttl: Option<String>,
    max_outstanding_tickets: Option<usize>,
    max_outstanding_tickets_per_organization: Option<usize>,
    max_outstanding_tickets_per_principal: Option<usize>,
    max_prepared_statements: Option<usize>,
    max_prepared_statements_per_organization: Option<usize>,
    max_prepared_statements_in_all: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// An address, or "off".
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    format: DatasetFormat,
    path: Option<String>,
    database: Option<String>,
    relation: Option<String>,
    description: Option<String>,
    schema: Option<Vec<RawColumn>>,
    partitions: Option<Vec<RawColumn>>,
    csv: Option<RawCsv>,
    table_cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    data_type: String,
    #[serde(default = "yes")]
    nullable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCsv {
    has_header: Option<bool>,
    delimiter: Option<String>,
}

fn parse(text: &str, source: Source, base: &Path) -> Result<Config, ConfigError> {
    let raw = deserialize(text, &source)?;
    let err = |field: String, reason: String| ConfigError {
        source_name: source.to_string(),
        field,
        reason,
    };
    let resolve = |p: &Path| resolve_against(base, p);

    let listen = parse_addr(raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN))
        .map_err(|r| err("server.listen".into(), r.to_string()))?;
    let state_dir = resolve(
        raw.server
            .state_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_STATE_DIR)),
    );
    let shutdown_grace = parse_duration(raw.server.shutdown_grace.as_deref().unwrap_or("30s"))
        .map_err(|r| err("server.shutdown_grace".into(), r.to_string()))?;

    let tls = raw.tls.map(|t| TlsConfig {
        cert: resolve(&t.cert),
        key: resolve(&t.key),
        client_ca: resolve(&t.client_ca),
    });

    let limits = parse_limits(raw.limits).map_err(|(f, r)| err(format!("limits.{f}"), r))?;

    let mut workers = Vec::with_capacity(raw.cluster.workers.len());
    for (i, text) in raw.cluster.workers.iter().enumerate() {
        let url = parse_worker_url(text)
            .map_err(|r| err(format!("cluster.workers[{i}]"), r.to_string()))?;
        if workers.contains(&url) {
            return Err(err(
                format!("cluster.workers[{i}]"),
                format!("`{text}` is listed twice"),
            ));
        }
        workers.push(url);
    }
    let probe_interval = match raw.cluster.probe_interval.as_deref() {
        None => DEFAULT_PROBE_INTERVAL,
        Some(text) => parse_duration(text)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                err(
                    "cluster.probe_interval".into(),
                    format!("`{text}` is not a duration above zero, e.g. \"2s\""),
                )
            })?,
    };
    let cluster_tls = match (raw.cluster.cert, raw.cluster.key, raw.cluster.worker_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => Some(ClusterTls {
            cert: resolve(&cert),
            key: resolve(&key),
            worker_ca: resolve(&ca),
        }),
        _ => {
            return Err(err(
                "cluster".into(),
                "set cert, key and worker_ca together (or none of them, for the development PKI)"
                    .into(),
            ));
        }
    };

    let metrics_listen = match raw
        .metrics
        .listen
        .as_deref()
        .unwrap_or(DEFAULT_METRICS_LISTEN)
    {
        "off" => None,
        addr => Some(parse_addr(addr).map_err(|r| err("metrics.listen".into(), r.to_string()))?),
    };

    let dsp = parse_dsp(raw.dsp).map_err(|(f, r)| err(format!("dsp.{f}"), r))?;
    let console = parse_console(raw.console).map_err(|(f, r)| err(format!("console.{f}"), r))?;

    let level = raw.log.level.unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| err("log.level".into(), format!("invalid filter `{level}`: {e}")))?;

    let mut databases: Vec<DatabaseConfig> = Vec::new();
    for (i, db) in raw.databases.into_iter().enumerate() {
        let db = sources::parse_database(db, &resolve, limits.query_timeout)
            .map_err(|(f, r)| err(format!("databases[{i}].{f}"), r))?;
        if databases.iter().any(|d| d.name == db.name) {
            return Err(err(
                format!("databases[{i}].name"),
                format!("database `{}` is defined twice", db.name),
            ));
        }
        databases.push(db);
    }
    let mut object_stores: Vec<ObjectStoreConfig> = Vec::new();
    for (i, store) in raw.object_stores.into_iter().enumerate() {
        let store = sources::parse_object_store(store, &resolve)
            .map_err(|(f, r)| err(format!("object_stores[{i}].{f}"), r))?;
        if object_stores.iter().any(|s| s.bucket == store.bucket) {
            return Err(err(
                format!("object_stores[{i}].url"),
                format!("bucket `{}` is configured twice", store.bucket),
            ));
        }
        object_stores.push(store);
    }

    let mut datasets: Vec<DatasetConfig> = Vec::new();
    for (i, ds) in raw.datasets.into_iter().enumerate() {
        let field = |f: &str| format!("datasets[{i}].{f}");
        if !is_identifier(&ds.name) {
            return Err(err(
                field("name"),
                format!(
                    "`{}` is not a valid table name: use lowercase letters, digits and `_`, starting with a letter or `_`",
                    ds.name
                ),
            ));
        }
        if datasets.iter().any(|d| d.name == ds.name) {
            return Err(err(
                field("name"),
                format!("dataset `{}` is defined twice", ds.name),
            ));
        }
        let schema = match ds.schema {
            None => None,
            Some(cols) => Some(parse_columns(cols).map_err(|(f, r)| err(field(&f), r))?),
        };
        if ds.csv.is_some() && ds.format != DatasetFormat::Csv {
            return Err(err(
                field("csv"),
                "CSV options given for a dataset whose format is not csv".into(),
            ));
        }
        let csv = parse_csv(ds.csv).map_err(|(f, r)| err(field(&f), r))?;
        let partitions = match ds.partitions {
            None => Vec::new(),
            Some(cols) => parse_columns(cols)
                .map_err(|(f, r)| err(field(&f.replacen("schema", "partitions", 1)), r))?,
        };
        let location = dataset_location(
            ds.format,
            ds.path,
            ds.database,
            ds.relation,
            &databases,
            &resolve,
        )
        .map_err(|(f, r)| err(field(&f), r))?;
        if schema.is_some() && !ds.format.is_file_format() {
            return Err(err(
                field("schema"),
                "the schema of a database relation is read from the database; to serve other columns or types, define a view and name it in `relation`".into(),
            ));
        }
        if !partitions.is_empty() && !ds.format.is_file_format() {
            return Err(err(
                field("partitions"),
                "partition columns are for files in hive-style directories, not for a database relation".into(),
            ));
        }
        if ds.table_cache == Some(true) && !matches!(location, Location::Local(_)) {
            return Err(err(
                field("table_cache"),
                "only datasets on the connector's disk (`path` without s3://) are kept decoded in memory; remove the setting".into(),
            ));
        }
        if ds.table_cache == Some(true) && !partitions.is_empty() {
            return Err(err(
                field("table_cache"),
                "partitioned datasets are not kept decoded in memory (a query's release record names the partitions it read); remove the setting".into(),
            ));
        }
        let table_cache = ds.table_cache.unwrap_or(partitions.is_empty());
        datasets.push(DatasetConfig {
            table_cache,
            name: ds.name,
            format: ds.format,
            location,
            description: ds.description,
            schema,
            partitions,
            csv,
        });
    }

    Ok(Config {
        source,
        server: ServerConfig {
            listen,
            state_dir,
            shutdown_grace,
        },
        tls,
        limits,
        metrics: MetricsConfig {
            listen: metrics_listen,
        },
        log: LogConfig {
            format: raw.log.format.unwrap_or(LogFormat::Text),
            level,
        },
        datasets,
        databases,
        object_stores,
        policy: raw.policy.map(|p| resolve(&p.file)),
        cluster: ClusterConfig {
            workers,
            tls: cluster_tls,
            probe_interval,
        },
        dsp,
        console,
    })
}

fn parse_dsp(raw: RawDsp) -> Result<DspConfig, (String, String)> {
    let listen = match raw.listen.as_deref() {
        None | Some("off") => None,
        Some(addr) => Some(parse_addr(addr).map_err(|r| ("listen".to_string(), r.to_string()))?),
    };
    let public_url = match raw.public_url {
        None => None,
        Some(text) => {
            let url = https_url(&text).ok_or_else(|| {
                (
                    "public_url".to_string(),
                    format!(
                        "`{text}` is not an https URL, e.g. \"https://connector.example:8443\""
                    ),
                )
            })?;
            Some(url)
        }
    };
    if let Some(endpoint) = &raw.flight_endpoint
        && !endpoint.starts_with("grpc+tls://")
    {
        return Err((
            "flight_endpoint".into(),
            format!(
                "`{endpoint}` is not a grpc+tls:// URL, e.g. \"grpc+tls://connector.example:50051\""
            ),
        ));
    }
    let token_ttl = match raw.token_ttl {
        None => DEFAULT_TOKEN_TTL,
        Some(text) => parse_duration(&text)
            .ok()
            .filter(|d| !d.is_zero() && *d <= Duration::from_secs(7 * 86_400))
            .ok_or_else(|| {
                (
                    "token_ttl".to_string(),
                    format!("`{text}` is not a duration between 1s and 7d, e.g. \"1h\""),
                )
            })?,
    };
    Ok(DspConfig {
        listen,
        public_url,
        flight_endpoint: raw.flight_endpoint,
        participant_id: raw.participant_id.filter(|p| !p.trim().is_empty()),
        token_ttl,
    })
}

fn parse_console(raw: RawConsole) -> Result<ConsoleConfig, (String, String)> {
    let defaults = ConsoleConfig::default();
    let listen = match raw.listen.as_deref() {
        None | Some("off") => None,
        Some(addr) => Some(parse_addr(addr).map_err(|r| ("listen".to_string(), r.to_string()))?),
    };
    let public_url = match raw.public_url {
        None => None,
        Some(text) => Some(https_url(&text).ok_or_else(|| {
            (
                "public_url".to_string(),
                format!("`{text}` is not an https URL, e.g. \"https://console.example\""),
            )
        })?),
    };
    let duration = |field: &str, text: Option<String>, default: Duration, max: Duration| {
        let Some(text) = text else { return Ok(default) };
        parse_duration(&text)
            .ok()
            .filter(|d| !d.is_zero() && *d <= max)
            .ok_or_else(|| {
                (
                    field.to_string(),
                    format!(
                        "`{text}` is not a duration between 1s and {}s",
                        max.as_secs()
                    ),
                )
            })
    };
    let hour = Duration::from_secs(3600);
    Ok(ConsoleConfig {
        listen,
        public_url,
        login_link_ttl: duration(
            "login_link_ttl",
            raw.login_link_ttl,
            defaults.login_link_ttl,
            hour,
        )?,
        session_ttl: duration(
            "session_ttl",
            raw.session_ttl,
            defaults.session_ttl,
            24 * hour,
        )?,
        session_idle: duration(
            "session_idle",
            raw.session_idle,
            defaults.session_idle,
            24 * hour,
        )?,
    })
}

/// `text` as an https URL with a host.
fn https_url(text: &str) -> Option<url::Url> {
    url::Url::parse(text)
        .ok()
        .filter(|u| u.scheme() == "https" && u.host().is_some())
}

/// Where a dataset is: a local `path`, an `s3://` `path`, or a `database`
/// and `relation` (for `format = "postgres"`).
fn dataset_location(
    format: DatasetFormat,
    path: Option<String>,
    database: Option<String>,
    relation: Option<String>,
    databases: &[DatabaseConfig],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Location, (String, String)> {
    let fail = |field: &str, reason: &str| Err((field.to_string(), reason.to_string()));
    if !format.is_file_format() {
        if path.is_some() {
            return fail(
                "path",
                "a postgres dataset is a `database` and a `relation`, not a path",
            );
        }
        let Some(database) = database else {
            return fail(
                "database",
                "missing: name the [[databases]] entry this relation is in",
            );
        };
        if !databases.iter().any(|d| d.name == database) {
            return Err((
                "database".into(),
                format!("no [[databases]] entry is named `{database}`"),
            ));
        }
        let Some(relation) = relation.filter(|r| !r.trim().is_empty()) else {
            return fail(
                "relation",
                "missing: name the table or view, e.g. \"trips\" or \"transit.trips\"",
            );
        };
        return Ok(Location::Database { database, relation });
    }
    if database.is_some() || relation.is_some() {
        return fail(
            "database",
            "`database` and `relation` are for format = \"postgres\"; a file dataset has a `path`",
        );
    }
    let Some(path) = path else {
        return fail(
            "path",
            "missing: a file, a directory, or an s3://bucket/prefix/",
        );
    };
    if path.starts_with("s3://") {
        if bucket_of(&path).is_none() {
            return fail("path", "an object store path is s3://bucket/prefix/");
        }
        return Ok(Location::Object(path));
    }
    if path.contains("://") {
        return fail(
            "path",
            "only local paths and s3:// object store paths are supported",
        );
    }
    Ok(Location::Local(resolve(Path::new(&path))))
}

/// TOML → raw structs, reporting the dotted field path and the line.
fn deserialize(text: &str, source: &Source) -> Result<RawConfig, ConfigError> {
    deserialize_toml(text, source)
}

/// Deserializes TOML, naming the field of any error (also for the broker's
/// configuration).
pub(crate) fn deserialize_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    source: &Source,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        source_name: source.to_string(),
        field: "(syntax)".into(),
        reason: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError {
            source_name: source.to_string(),
            field: if path == "." {
                "(top level)".into()
            } else {
                path
            },
            reason: one_line(&e.into_inner().to_string()),
        }
    })
}

/// toml renders errors as a multi-line snippet; keep the line number and the
/// message, which is what a log line needs.
fn one_line(msg: &str) -> String {
    let lines: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let location = lines
        .iter()
        .find(|l| l.starts_with("TOML parse error at"))
        .map(|l| l.trim_start_matches("TOML parse error at ").to_string());
    let message = lines
        .iter()
        .rev()
        .find(|l| !l.starts_with('|') && !l.starts_with("TOML parse error") && !l.contains(" | "))
        .copied()
        .unwrap_or(msg);
    match location {
        Some(loc) => format!("{message} (at {loc})"),
        None => message.to_string(),
    }
}

fn parse_limits(raw: RawLimits) -> Result<Limits, (String, String)> {
    let d = Limits::default();
    let positive = |name: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err((name.to_string(), "must be at least 1".to_string())),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let field = |name: &'static str| move |r: ValueError| (name.to_string(), r.to_string());
    let query_memory = match raw.query_memory {
        Some(s) => parse_size(&s).map_err(field("query_memory"))?,
        None => d.query_memory,
    };
    // Unset, it grows with query_memory so that one query always fits.
    let total_query_memory = match raw.total_query_memory {
        Some(s) => parse_size(&s).map_err(field("total_query_memory"))?,
        None => d.total_query_memory.max(query_memory),
    };
    if total_query_memory < query_memory {
        return Err((
            "total_query_memory".into(),
            format!(
                "is {}, less than one query's query_memory ({}): raise it or lower query_memory",
                human_bytes(total_query_memory),
                human_bytes(query_memory)
            ),
        ));
    }
    Ok(Limits {
        query_memory,
        total_query_memory,
        spill_space: match raw.spill_space {
            // "0" is the one size of zero allowed: no spilling.
            Some(s) if s.trim() == "0" => 0,
            Some(s) => parse_size(&s).map_err(field("spill_space"))? as u64,
            None => d.spill_space,
        },
        table_cache: match raw.table_cache {
            // "0" is the one size of zero allowed: no decoded copies.
            Some(s) if s.trim() == "0" => 0,
            Some(s) => parse_size(&s).map_err(field("table_cache"))?,
            None => d.table_cache,
        },
        query_timeout: match raw.query_timeout {
            Some(s) => parse_duration(&s).map_err(field("query_timeout"))?,
            None => d.query_timeout,
        },
        max_concurrent_queries: positive(
            "max_concurrent_queries",
            raw.max_concurrent_queries,
            d.max_concurrent_queries,
        )?,
        max_sql_bytes: match raw.max_sql_bytes {
            Some(s) => parse_size(&s).map_err(field("max_sql_bytes"))?,
            None => d.max_sql_bytes,
        },
        ticket_ttl: match raw.ticket_ttl {
            Some(s) => parse_duration(&s).map_err(field("ticket_ttl"))?,
            None => d.ticket_ttl,
        },
        max_concurrent_queries_per_organization: positive(
            "max_concurrent_queries_per_organization",
            raw.max_concurrent_queries_per_organization,
            d.max_concurrent_queries_per_organization,
        )?,
        // Zero is allowed: no queue, a query finding every slot taken is
        // refused at once.
        max_queued_queries: raw.max_queued_queries.unwrap_or(d.max_queued_queries),
        max_queued_queries_per_organization: raw
            .max_queued_queries_per_organization
            .unwrap_or(d.max_queued_queries_per_organization),
        queue_timeout: match raw.queue_timeout {
            Some(s) => parse_duration(&s).map_err(field("queue_timeout"))?,
            None => d.queue_timeout,
        },
        tickets: TenantCaps {
            total: positive(
                TICKET_SETTINGS[0],
                raw.max_outstanding_tickets,
                d.tickets.total,
            )?,
            per_organization: positive(
                TICKET_SETTINGS[1],
                raw.max_outstanding_tickets_per_organization,
                d.tickets.per_organization,
            )?,
            per_principal: positive(
                TICKET_SETTINGS[2],
                raw.max_outstanding_tickets_per_principal,
                d.tickets.per_principal,
            )?,
            ..d.tickets
        },
        prepared_statements: TenantCaps {
            total: positive(
                PREPARED_SETTINGS[0],
                raw.max_prepared_statements_in_all,
                d.prepared_statements.total,
            )?,
            per_organization: positive(
                PREPARED_SETTINGS[1],
                raw.max_prepared_statements_per_organization,
                d.prepared_statements.per_organization,
            )?,
            per_principal: positive(
                PREPARED_SETTINGS[2],
                raw.max_prepared_statements,
                d.prepared_statements.per_principal,
            )?,
            ..d.prepared_statements
        },
    })
}

fn parse_columns(cols: Vec<RawColumn>) -> Result<Vec<ColumnConfig>, (String, String)> {
    if cols.is_empty() {
        return Err((
            "schema".into(),
            "a declared schema needs at least one column".into(),
        ));
    }
    let mut out: Vec<ColumnConfig> = Vec::with_capacity(cols.len());
    for (j, c) in cols.into_iter().enumerate() {
        if out.iter().any(|o| o.name == c.name) {
            return Err((
                format!("schema[{j}].name"),
                format!("column `{}` is declared twice", c.name),
            ));
        }
        let data_type = DataType::from_str(c.data_type.trim()).map_err(|_| {
            (
                format!("schema[{j}].type"),
                format!(
                    "`{}` is not an Arrow type; write e.g. Int64, Float64, Utf8, Boolean, Date32, Timestamp(Microsecond, \"UTC\") or Decimal128(12, 2)",
                    c.data_type
                ),
            )
        })?;
        out.push(ColumnConfig {
            name: c.name,
            data_type,
            nullable: c.nullable,
        });
    }
    Ok(out)
}

fn parse_csv(raw: Option<RawCsv>) -> Result<CsvOptions, (String, String)> {
    let mut opts = CsvOptions::default();
    let Some(raw) = raw else { return Ok(opts) };
    if let Some(h) = raw.has_header {
        opts.has_header = h;
    }
    if let Some(d) = raw.delimiter {
        let bytes = d.as_bytes();
        if bytes.len() != 1 {
            return Err((
                "csv.delimiter".into(),
                format!("must be a single ASCII character, got {d:?}"),
            ));
        }
        opts.delimiter = bytes[0];
    }
    Ok(opts)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A setting whose text is not a value of its kind; each message shows
/// how to write one. Each variant holds the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("`{0}` is not an address: write IP:PORT, e.g. 127.0.0.1:50051 or [::1]:50051")]
    Address(String),
    #[error("`{0}` is not a duration: write e.g. 500ms, 30s, 5m, 2h or 1d")]
    Duration(String),
    #[error("`{0}`: must be longer than zero")]
    ZeroDuration(String),
    #[error("`{0}` is not a size: write e.g. 65536, 512KiB, 256MiB or 2GiB")]
    Size(String),
    #[error("`{0}`: must be larger than zero")]
    ZeroSize(String),
}

/// Parses `host:port` (IPv4 or bracketed IPv6).
pub fn parse_addr(s: &str) -> Result<SocketAddr, ValueError> {
    s.parse().map_err(|_| ValueError::Address(s.to_string()))
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let bad = || ValueError::Duration(s.to_string());
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.checked_mul(1_000).ok_or_else(bad)?,
        "m" => n.checked_mul(60_000).ok_or_else(bad)?,
        "h" => n.checked_mul(3_600_000).ok_or_else(bad)?,
        "d" => n.checked_mul(86_400_000).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if ms == 0 {
        return Err(ValueError::ZeroDuration(s.to_string()));
    }
    Ok(Duration::from_millis(ms))
}

/// Parses `1048576`, `512KiB`, `256MiB`, `2GiB` (also `KB`/`MB`/`GB` as
/// powers of 1000).
pub fn parse_size(s: &str) -> Result<usize, ValueError> {
    let bad = || ValueError::Size(s.to_string());
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| bad())?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let v = n.checked_mul(mult).ok_or_else(bad)?;
    if v == 0 {
        return Err(ValueError::ZeroSize(s.to_string()));
    }
    Ok(v)
}

/// `1 GiB`, `256 MiB`, `4096 bytes`: a size as the configuration writes it.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [(&str, usize); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/sluice/sluice.toml"))
    }

    #[test]
    fn embedded_default_is_valid_and_resolves_against_state_dir() {
        let cfg = Config::embedded_default(Path::new("/var/lib/sluice"));
        assert_eq!(cfg.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.datasets.len(), 3);
        assert!(
            cfg.datasets[0]
                .location
                .local_path()
                .unwrap()
                .starts_with("/var/lib/sluice")
        );
        assert_eq!(
            cfg.policy.as_deref(),
            Some(Path::new("/var/lib/sluice/policy.yaml"))
        );
        assert!(cfg.tls.is_none());
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../examples/sluice.toml");
        let cfg = Config::from_toml_str(text, Path::new("/repo/examples/sluice.toml")).unwrap();
        assert_eq!(cfg.datasets.len(), 2);
        assert_eq!(
            cfg.tls.unwrap().client_ca,
            PathBuf::from("/repo/examples/../.sluice/pki/ca.pem")
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let cfg = load("[[datasets]]\nname='t'\nformat='csv'\npath='data/t.csv'\n").unwrap();
        assert_eq!(
            cfg.datasets[0].location,
            Location::Local(PathBuf::from("/etc/sluice/data/t.csv"))
        );
    }

    const DATABASE: &str = "[[databases]]\nname='transit'\nkind='postgres'\nhost='db.internal'\ndbname='transit'\nuser='sluice'\npassword_file='secrets/pg'\nca_file='pki/db-ca.pem'\n";

    #[test]
    fn the_table_cache_is_a_size_and_only_for_files_on_disk() {
        let d = load("[[datasets]]\nname='t'\nformat='csv'\npath='t.csv'\n").unwrap();
        assert_eq!(d.limits.table_cache, 512 << 20, "on by default");
        assert!(d.datasets[0].table_cache);
        let off = load("[limits]\ntable_cache = \"0\"\n").unwrap();
        assert_eq!(off.limits.table_cache, 0);
        let e = load("[limits]\ntable_cache = \"a lot\"\n").unwrap_err();
        assert_eq!(e.field, "limits.table_cache");
        let out = load("[[datasets]]\nname='t'\nformat='csv'\npath='t.csv'\ntable_cache=false\n")
            .unwrap();
        assert!(!out.datasets[0].table_cache);
        let partitioned = "[[datasets]]\nname='t'\nformat='csv'\npath='t/'\npartitions=[{name='day', type='Utf8'}]\n";
        assert!(!load(partitioned).unwrap().datasets[0].table_cache);
        let e = load(&format!("{partitioned}table_cache=true\n")).unwrap_err();
        assert_eq!(e.field, "datasets[0].table_cache", "{e}");
        assert!(e.reason.contains("partitioned"), "{e}");
        for location in [
            "format='postgres'\ndatabase='transit'\nrelation='trips'",
            "format='parquet'\npath='s3://lake/trips/'",
        ] {
            let e = load(&format!(
                "{DATABASE}[[datasets]]\nname='t'\n{location}\ntable_cache=true\n"
            ))
            .unwrap_err();
            assert_eq!(e.field, "datasets[0].table_cache", "{e}");
            assert!(e.reason.contains("remove the setting"), "{e}");
        }
    }

    #[test]
    fn a_database_dataset_names_its_database_and_relation() {
        let cfg = load(&format!(
            "{DATABASE}[[datasets]]\nname='trips'\nformat='postgres'\ndatabase='transit'\nrelation='public.trips'\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.datasets[0].location,
            Location::Database {
                database: "transit".into(),
                relation: "public.trips".into()
            }
        );
        let db = &cfg.databases[0];
        assert_eq!(db.port, 5432);
        assert_eq!(
            db.password,
            Secret::File(PathBuf::from("/etc/sluice/secrets/pg"))
        );
        assert_eq!(
            db.tls,
            DatabaseTls::VerifyFull {
                ca: PathBuf::from("/etc/sluice/pki/db-ca.pem")
            }
        );
        assert_eq!(db.statement_timeout, cfg.limits.query_timeout);
    }

    #[test]
    fn database_settings_are_checked() {
        let cases = [
            (
                "password='hunter2'\n",
                "databases[0].password",
                "unknown field",
            ),
            (
                "password_env='PG'\n",
                "databases[0].password_file",
                "not both",
            ),
            ("tls='require'\n", "databases[0].tls", "not a TLS mode"),
            (
                "max_connections=0\n",
                "databases[0].max_connections",
                "at least 1",
            ),
        ];
        for (extra, field, reason) in cases {
            let e = load(&format!("{DATABASE}{extra}")).unwrap_err();
            assert!(e.field.starts_with(field), "{extra}: {e}");
            assert!(e.reason.contains(reason), "{extra}: {e}");
        }
        let no_ca = DATABASE.replace("ca_file='pki/db-ca.pem'\n", "");
        let e = load(&no_ca).unwrap_err();
        assert_eq!(e.field, "databases[0].ca_file", "{e}");
        let e = load(&format!(
            "{DATABASE}[[datasets]]\nname='trips'\nformat='postgres'\ndatabase='other'\nrelation='trips'\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "datasets[0].database", "{e}");
        let e = load(&format!(
            "{DATABASE}[[datasets]]\nname='trips'\nformat='postgres'\ndatabase='transit'\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "datasets[0].relation", "{e}");
    }

    #[test]
    fn an_object_store_path_and_its_partitions() {
        let cfg = load(
            "[[object_stores]]\nurl='s3://lake'\nendpoint='http://127.0.0.1:5000'\nallow_http=true\n\
             [[datasets]]\nname='t'\nformat='parquet'\npath='s3://lake/trips/'\n\
             [[datasets.partitions]]\nname='year'\ntype='Int32'\n",
        )
        .unwrap();
        assert_eq!(
            cfg.datasets[0].location,
            Location::Object("s3://lake/trips/".into())
        );
        assert_eq!(cfg.datasets[0].partitions[0].name, "year");
        assert_eq!(cfg.object_stores[0].bucket, "lake");
        let e =
            load("[[object_stores]]\nurl='s3://lake'\nendpoint='http://10.0.0.1'\n").unwrap_err();
        assert_eq!(e.field, "object_stores[0].endpoint", "{e}");
        let e = load("[[object_stores]]\nurl='s3://lake/prefix'\n").unwrap_err();
        assert_eq!(e.field, "object_stores[0].url", "{e}");
        let e = load("[[datasets]]\nname='t'\nformat='csv'\npath='https://x/y.csv'\n").unwrap_err();
        assert_eq!(e.field, "datasets[0].path", "{e}");
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = load("[limits]\nquery_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(e.field, "limits.query_timeout");
        assert!(e.to_string().contains("/etc/sluice/sluice.toml"), "{e}");
        assert!(e.reason.contains("not a duration"), "{e}");

        let e =
            load("[limits]\nquery_memory = \"2GiB\"\ntotal_query_memory = \"1GiB\"\n").unwrap_err();
        assert_eq!(e.field, "limits.total_query_memory");
        assert!(e.reason.contains("less than one query's"), "{}", e.reason);
        let grown = load("[limits]\nquery_memory = \"8GiB\"\n").unwrap();
        assert_eq!(grown.limits.total_query_memory, 8 << 30);
        assert_eq!(
            grown.limits.spill_space,
            8 << 30,
            "spilling is on by default"
        );
        let off = load("[limits]\nspill_space = \"0\"\n").unwrap();
        assert_eq!(off.limits.spill_space, 0);
        let e = load("[limits]\nspill_space = \"lots\"\n").unwrap_err();
        assert_eq!(e.field, "limits.spill_space");
        let e = load("[limits]\nmax_concurrent_queries = \"many\"\n").unwrap_err();
        assert_eq!(e.field, "limits.max_concurrent_queries");
        assert!(e.reason.contains("line 2"), "{e}");

        let e = load("[server]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(e.reason.contains("unknown field `listen_addr`"), "{e}");

        let e = load(
            "[[datasets]]\nname='a'\nformat='csv'\npath='x'\n[[datasets]]\nname='b'\nformat='csv'\npath='y'\n[[datasets.schema]]\nname='c'\ntype='int'\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "datasets[1].schema[0].type");

        let e = load("[[datasets]]\nname='Trips'\nformat='csv'\npath='x'\n").unwrap_err();
        assert_eq!(e.field, "datasets[0].name");

        let e = load("[[datasets]]\nname='t'\nformat='xlsx'\npath='x'\n").unwrap_err();
        assert_eq!(e.field, "datasets[0].format");
        assert!(e.reason.contains("parquet"), "{e}");

        let e = load("[server\n").unwrap_err();
        assert_eq!(e.field, "(syntax)");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn metrics_can_be_turned_off() {
        let cfg = load("[metrics]\nlisten = \"off\"\n").unwrap();
        assert!(cfg.metrics.listen.is_none());
    }
}
