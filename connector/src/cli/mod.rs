//! The `sluice` command line: the daemon (`serve`), a client (`query`,
//! `tables`, `whoami`, `budget`), the control plane ([`control`]: `catalog`,
//! `agreements`, `admin`, `receipt`, `audit`), and tools (`init`, `certs`,
//! `config`).

mod control;
mod generate;

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use datafusion::arrow::array::{Array, BinaryArray, StringArray};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;

use crate::client::{Connection, TlsFiles};
use crate::config::{self, Config, LogFormat};
use crate::dev::{self, DEFAULT_IDENTITY};
use crate::pki::{self, Authority, ClientIdentity, Validity};
use crate::state::StateDir;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A privacy-preserving data-space connector: partners query your data over Arrow Flight SQL with mTLS; the data never leaves.",
    after_help = "Start the demo with `sluice serve`, then in another terminal: sluice query \"SELECT count(*) FROM trips\""
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the connector (the demo when no --config is given).
    Serve(ServeArgs),
    /// Run a broker: federated queries across several connectors (docs/federation.md).
    Broker(BrokerArgs),
    /// Create the state directory (development PKI and demo datasets) and exit.
    Init {
        /// State directory to prepare.
        #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Run a SQL query against a connector and print the result.
    Query(QueryArgs),
    /// List the tables a connector serves, with their columns.
    Tables(ConnArgs),
    /// Show the principal a connector derives from your client certificate.
    Whoami(ConnArgs),
    /// Show your organization's differential-privacy budget: spent and remaining per dataset.
    Budget(BudgetArgs),
    /// Datasets offered to you: metadata, columns as you may use them, offers.
    Catalog(control::CatalogArgs),
    /// Request and read agreements for offers.
    #[command(subcommand)]
    Agreements(control::AgreementsCommand),
    /// Provider administration: decide agreement requests.
    #[command(subcommand)]
    Admin(control::AdminCommand),
    /// Audit receipts: list and fetch yours, verify one against the provider's key.
    #[command(subcommand)]
    Receipt(control::ReceiptCommand),
    /// The audit log: verify the chain offline, export it, show its head.
    #[command(subcommand)]
    Audit(control::AuditCommand),
    /// Create a certificate authority and issue server and client certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Write synthetic datasets (trips, machine events, zones) for examples and tests.
    #[command(subcommand)]
    Generate(generate::GenerateCommand),
    /// Print or check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML). Without it, the embedded demo configuration is used.
    #[arg(long, short = 'c', env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051 (port 0 picks a free port). Overrides server.listen.
    #[arg(long)]
    listen: Option<String>,
    /// State directory (development PKI, demo data). Overrides server.state_dir.
    #[arg(long, env = "SLUICE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Usage policy file (YAML, see docs/policy.md). Overrides policy.file.
    #[arg(long, env = "SLUICE_POLICY")]
    policy: Option<PathBuf>,
    /// Prometheus endpoint address, or `off`. Overrides metrics.listen.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Log format. Overrides log.format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `sluice=debug`. Overrides log.level; RUST_LOG overrides both.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Args, Clone)]
struct ConnArgs {
    /// Connector endpoint.
    #[arg(
        long,
        env = "SLUICE_ENDPOINT",
        default_value = "grpc+tls://127.0.0.1:50051"
    )]
    endpoint: String,
    /// State directory whose development PKI supplies --ca/--cert/--key by default.
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Demo identity in <state-dir>/pki to use: `planning`, `supplier`, `research` or `admin`.
    #[arg(long, default_value = DEFAULT_IDENTITY)]
    identity: String,
    /// CA certificate that signed the server's certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Server name to verify the server certificate against (default: the endpoint's host).
    #[arg(long)]
    tls_domain: Option<String>,
}

impl ConnArgs {
    fn tls_files(&self) -> TlsFiles {
        let demo = TlsFiles::from_state_dir(&self.state_dir, &self.identity);
        TlsFiles {
            ca: self.ca.clone().unwrap_or(demo.ca),
            cert: self.cert.clone().unwrap_or(demo.cert),
            key: self.key.clone().unwrap_or(demo.key),
            domain: self.tls_domain.clone(),
        }
    }

    async fn connect(&self) -> Result<Connection> {
        Connection::connect(&self.endpoint, &self.tls_files()).await
    }
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    format: OutputFormat,
    /// Declared purpose of the query (sent as the x-sluice-purpose header),
    /// e.g. `research`; policies may require one.
    #[arg(long, short = 'p', env = "SLUICE_PURPOSE")]
    purpose: Option<String>,
    /// ε to spend on a differentially private query (sent as the
    /// x-sluice-epsilon header), up to the policy's per-query cap.
    #[arg(long, short = 'e', env = "SLUICE_EPSILON")]
    epsilon: Option<f64>,
    /// Write the result's audit receipt (JSON) to this file, for
    /// `sluice receipt verify`.
    #[arg(long)]
    receipt_out: Option<PathBuf>,
    /// Through a broker: accept a result without the providers that failed
    /// (sent as x-sluice-allow-partial: true); the result names them.
    #[arg(long)]
    allow_partial: bool,
    /// The SQL query (or `EXPLAIN POLICY <query>`); `-` reads it from standard input.
    sql: String,
}

#[derive(Args)]
struct BrokerArgs {
    /// Broker configuration file (TOML; see docs/federation.md).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// Address to listen on. Overrides server.listen.
    #[arg(long)]
    listen: Option<String>,
    /// Log format. Overrides log.format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info`. Overrides log.level; RUST_LOG overrides both.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Args)]
struct BudgetArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Only this dataset.
    #[arg(long)]
    dataset: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
    /// An Arrow IPC stream (binary).
    Arrow,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a certificate authority: DIR/ca.pem and DIR/ca.key.
    Ca {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "Sluice CA")]
        name: String,
        /// Organization of the CA.
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        validity: ValidityArgs,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a server certificate signed by DIR/ca.pem: DIR/NAME.pem and DIR/NAME.key.
    Server {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[arg(long, default_value = "server")]
        name: String,
        /// DNS names the server answers to (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP addresses the server answers on (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[command(flatten)]
        validity: ValidityArgs,
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate signed by DIR/ca.pem: DIR/NAME.pem and DIR/NAME.key.
    Client {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// File stem of the certificate and key.
        #[arg(long)]
        name: String,
        /// Subject common name (default: NAME).
        #[arg(long)]
        cn: Option<String>,
        /// Subject organization: the organization budgets and quotas are kept for.
        #[arg(long)]
        org: Option<String>,
        /// SAN URI identifying the principal, e.g. spiffe://city.example/org/planning (repeatable; the first is the principal id).
        #[arg(long = "uri")]
        uris: Vec<String>,
        #[command(flatten)]
        validity: ValidityArgs,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct ValidityArgs {
    /// Validity in days from now.
    #[arg(long)]
    days: Option<i64>,
    /// Start of validity (YYYY-MM-DD, UTC); overrides --days.
    #[arg(long)]
    not_before: Option<String>,
    /// End of validity (YYYY-MM-DD, UTC); overrides --days.
    #[arg(long)]
    not_after: Option<String>,
}

impl ValidityArgs {
    fn resolve(&self, default_days: i64) -> Result<Validity> {
        let mut v = Validity::days_from_now(self.days.unwrap_or(default_days));
        if let Some(d) = &self.not_before {
            v.not_before = parse_date(d).context("--not-before")?;
        }
        if let Some(d) = &self.not_after {
            v.not_after = parse_date(d).context("--not-after")?;
        }
        if v.not_after <= v.not_before {
            bail!("the certificate would end before it starts");
        }
        Ok(v)
    }
}

fn parse_date(s: &str) -> Result<time::OffsetDateTime> {
    let parts: Vec<&str> = s.split('-').collect();
    let bad = || anyhow::anyhow!("`{s}` is not a date: write YYYY-MM-DD");
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let month = time::Month::try_from(m.parse::<u8>().map_err(|_| bad())?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(
        y.parse().map_err(|_| bad())?,
        month,
        d.parse().map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    Ok(date.midnight().assume_utc())
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the embedded demo configuration (a starting point for your own).
    Example,
    /// Validate a configuration file, including that its paths exist.
    Check { file: PathBuf },
}

/// Entry point of the `sluice` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve(args),
        Command::Broker(args) => broker(args),
        Command::Init { state_dir } => {
            let state = StateDir::new(config::absolute(&state_dir));
            report_created(&dev::prepare(&state, true)?);
            println!("state directory ready: {}", state.root().display());
            Ok(())
        }
        Command::Query(args) => client_runtime()?.block_on(query(args)),
        Command::Tables(args) => client_runtime()?.block_on(tables(args)),
        Command::Whoami(args) => client_runtime()?.block_on(whoami(args)),
        Command::Budget(args) => client_runtime()?.block_on(budget(args)),
        Command::Catalog(args) => client_runtime()?.block_on(control::catalog(args)),
        Command::Agreements(cmd) => client_runtime()?.block_on(control::agreements(cmd)),
        Command::Admin(cmd) => client_runtime()?.block_on(control::admin(cmd)),
        Command::Receipt(cmd) => client_runtime()?.block_on(control::receipt(cmd)),
        Command::Audit(cmd) => client_runtime()?.block_on(control::audit(cmd)),
        Command::Certs(cmd) => certs(cmd),
        Command::Generate(cmd) => generate::run(cmd),
        Command::Config(ConfigCommand::Example) => {
            print!("{}", Config::embedded_default_text());
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let cfg = Config::load(&file)?;
            cfg.check_paths()?;
            let policy = match &cfg.policy {
                Some(policy_file) => {
                    let version = client_runtime()?
                        .block_on(crate::usage_policy::check(&cfg.datasets, policy_file))?;
                    format!("policy {} {version}", policy_file.display())
                }
                None => "no policy: every query would be refused".into(),
            };
            println!(
                "{}: valid ({} dataset(s), listen {}, {policy})",
                file.display(),
                cfg.datasets.len(),
                cfg.server.listen
            );
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(
            args.state_dir
                .as_deref()
                .unwrap_or(Path::new(config::DEFAULT_STATE_DIR)),
        ),
    };
    if let Some(dir) = &args.state_dir {
        cfg.server.state_dir = config::absolute(dir);
    }
    if let Some(listen) = &args.listen {
        cfg.server.listen =
            config::parse_addr(listen).map_err(|r| anyhow::anyhow!("--listen: {r}"))?;
    }
    if let Some(policy) = &args.policy {
        cfg.policy = Some(config::absolute(policy));
    }
    if let Some(m) = &args.metrics_listen {
        cfg.metrics.listen = match m.as_str() {
            "off" => None,
            addr => Some(
                config::parse_addr(addr).map_err(|r| anyhow::anyhow!("--metrics-listen: {r}"))?,
            ),
        };
    }
    if let Some(format) = args.log_format {
        cfg.log.format = format;
    }
    if let Some(level) = &args.log_level {
        cfg.log.level = level.clone();
    }
    crate::telemetry::init(cfg.log.format, &cfg.log.level);

    let demo = matches!(cfg.source, config::Source::Embedded);
    if demo || cfg.tls.is_none() {
        let state = StateDir::new(&cfg.server.state_dir);
        report_created(&dev::prepare(&state, demo)?);
    }

    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Parsing, planning and execution run on these threads (and on the
    // threads `block_in_place` hands a worker's tasks to, which tokio
    // creates with the same stack size). SQL parsing and DataFusion
    // planning are iterative or heap-grown for deep inputs, but dropping a
    // deep syntax tree recurses natively: the parser builds chains of
    // operators and `::` casts in a loop, so the default 256 KiB of
    // `limits.max_sql_bytes` hold a chain 130,000 levels deep, which
    // `query::plan` refuses and then drops (measured: within 16 MiB; 8 MiB
    // overflowed planning a 2,000-cast chain before the syntax limits).
    // 256 MiB leaves room for larger `max_sql_bytes`; it is virtual memory,
    // committed only as far as it is used.
    //
    // Some of DataFusion's work happens inside one poll of an operator that
    // nothing can interrupt (building a hash join's table concatenates its
    // whole input): such a poll holds its worker for as long as it takes
    // (up to seconds in a debug build). One organization runs at most
    // `max_concurrent_queries_per_organization` queries, so with that many
    // workers beyond the cores, another organization's query always finds
    // a worker, and the operating system shares the cores between them.
    let workers = threads + cfg.limits.max_concurrent_queries_per_organization;
    let query_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("sluice-query")
        .thread_stack_size(256 << 20)
        .enable_all()
        .build()?;
    // Connections, handshakes and health checks. Planning used to run here
    // and needed the large stack; it no longer does, but the margin costs
    // nothing (it is committed only as far as it is used).
    let io_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(2))
        .thread_name("sluice-io")
        .thread_stack_size(256 << 20)
        .enable_all()
        .build()?;
    let result = io_runtime.block_on(async {
        let app = crate::server::App::build(
            cfg,
            query_runtime.handle().clone(),
            crate::server::ServeHooks::default(),
        )
        .await?;
        let listening = app.listen().await?;
        print!("{}", listening.banner());
        std::io::Write::flush(&mut std::io::stdout())?;
        listening.serve().await
    });
    query_runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    io_runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn broker(args: BrokerArgs) -> Result<()> {
    let mut cfg = crate::broker::BrokerConfig::load(&args.config)?;
    if let Some(listen) = &args.listen {
        cfg.listen = config::parse_addr(listen).map_err(|r| anyhow::anyhow!("--listen: {r}"))?;
    }
    if let Some(format) = args.log_format {
        cfg.log.format = format;
    }
    if let Some(level) = &args.log_level {
        cfg.log.level = level.clone();
    }
    crate::telemetry::init(cfg.log.format, &cfg.log.level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("sluice-broker")
        // Dropping a statement near the nesting limit recurses as deeply as
        // parsing it did; the serving runtime has the same margin.
        .thread_stack_size(256 << 20)
        .enable_all()
        .build()?;
    let result = runtime.block_on(crate::broker::serve(cfg));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn report_created(created: &[String]) {
    if created.is_empty() {
        return;
    }
    eprintln!("first start: created");
    for line in created {
        eprintln!("  {line}");
    }
}

fn client_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn query(args: QueryArgs) -> Result<()> {
    let sql = if args.sql == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading SQL from standard input")?
    } else {
        args.sql.clone()
    };
    let mut conn = args.conn.connect().await?;
    if let Some(purpose) = &args.purpose {
        conn.set_purpose(purpose)?;
    }
    if let Some(epsilon) = args.epsilon {
        conn.set_epsilon(epsilon);
    }
    if args.allow_partial {
        conn.set_header(sluice_proto::wire::header::ALLOW_PARTIAL, "true")?;
    }
    let (schema, batches) = conn.query_stream(&sql).await?;
    report_federation(&schema);
    let mut batches = std::pin::pin!(batches);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.format {
        OutputFormat::Table => {
            let all: Vec<RecordBatch> = batches.try_collect().await?;
            let rows: usize = all.iter().map(RecordBatch::num_rows).sum();
            if all.is_empty() {
                let empty = RecordBatch::new_empty(schema);
                writeln!(
                    out,
                    "{}",
                    datafusion::arrow::util::pretty::pretty_format_batches(&[empty])?
                )?;
            } else {
                writeln!(
                    out,
                    "{}",
                    datafusion::arrow::util::pretty::pretty_format_batches(&all)?
                )?;
            }
            writeln!(out, "{rows} row(s)")?;
        }
        OutputFormat::Csv => {
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            let mut wrote = false;
            while let Some(batch) = batches.try_next().await? {
                writer.write(&batch)?;
                wrote = true;
            }
            if !wrote {
                writer.write(&RecordBatch::new_empty(schema))?;
            }
        }
        OutputFormat::Json => {
            let mut writer = datafusion::arrow::json::ArrayWriter::new(&mut out);
            while let Some(batch) = batches.try_next().await? {
                writer.write(&batch)?;
            }
            writer.finish()?;
            drop(writer);
            writeln!(out)?;
        }
        OutputFormat::Arrow => {
            let mut writer =
                datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
            while let Some(batch) = batches.try_next().await? {
                writer.write(&batch)?;
            }
            writer.finish()?;
        }
    }
    drop(out);
    report_receipts(conn.receipts(), args.receipt_out.as_deref())
}

/// For a broker's answer: which providers contributed (with their receipts
/// and ε) and which are missing, on standard error.
fn report_federation(schema: &datafusion::arrow::datatypes::Schema) {
    use sluice_proto::wire::federation::{MISSING, PROVIDERS};
    let list = |key: &str| -> Vec<serde_json::Value> {
        schema
            .metadata()
            .get(key)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default()
    };
    for p in list(PROVIDERS) {
        let receipt = p["receipt"]
            .as_str()
            .and_then(|r| crate::audit::Receipt::from_header(r).ok())
            .map(|r| r.receipt_id)
            .unwrap_or_else(|| "-".into());
        let epsilon = p["epsilon"]
            .as_f64()
            .map(|e| format!(", ε {e}"))
            .unwrap_or_default();
        eprintln!(
            "provider {}: {} rows, receipt {receipt}{epsilon}",
            p["provider"].as_str().unwrap_or("?"),
            p["rows"]
        );
    }
    for m in list(MISSING) {
        eprintln!(
            "provider {} MISSING from this result ({}): {}",
            m["provider"].as_str().unwrap_or("?"),
            m["code"].as_str().unwrap_or("?"),
            m["message"].as_str().unwrap_or("")
        );
    }
}

/// Names the audit receipt of each result on standard error, and keeps the
/// last one in `path` when asked.
fn report_receipts(receipts: &[String], path: Option<&Path>) -> Result<()> {
    for receipt in receipts {
        match crate::audit::Receipt::from_header(receipt) {
            Ok(r) => eprintln!("audit receipt {} (record {})", r.receipt_id, r.seq),
            Err(_) => eprintln!("audit receipt (unreadable): {receipt}"),
        }
    }
    if let Some(path) = path {
        let Some(last) = receipts.last() else {
            bail!(
                "the connector sent no audit receipt to write to {}",
                path.display()
            );
        };
        std::fs::write(path, format!("{last}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn budget(args: BudgetArgs) -> Result<()> {
    use sluice_proto::v1::GetBudgetRequest;
    use sluice_proto::v1::budget_service_client::BudgetServiceClient;
    let conn = args.conn.connect().await?;
    let mut client = BudgetServiceClient::new(conn.channel());
    let response = client
        .get_budget(GetBudgetRequest {
            dataset: args.dataset.unwrap_or_default(),
        })
        .await
        .map_err(crate::client::status_error)?
        .into_inner();
    println!("privacy budget of {}", response.organization);
    if response.budgets.is_empty() {
        println!("no differentially private queries charged yet");
    }
    for line in &response.budgets {
        let limit = if line.unlimited {
            "no limit".to_string()
        } else {
            format!(
                "{} ε, {} δ",
                line.epsilon_limit,
                delta_text(line.delta_limit)
            )
        };
        println!(
            "  {} ({}): spent {} ε and {} δ in {} queries (of which {} ε reserved); remaining {}; limit {limit}",
            line.dataset,
            line.period,
            round9(line.epsilon_spent),
            delta_text(line.delta_spent),
            line.queries,
            round9(line.epsilon_reserved),
            if line.unlimited {
                "unlimited".to_string()
            } else {
                format!(
                    "{} ε, {:e} δ",
                    round9(line.epsilon_remaining),
                    line.delta_remaining
                )
            },
        );
    }
    Ok(())
}

fn delta_text(delta: f64) -> String {
    if delta == 0.0 {
        "0".into()
    } else {
        format!("{delta:e}")
    }
}

fn round9(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}

async fn tables(args: ConnArgs) -> Result<()> {
    let mut conn = args.connect().await?;
    let result = conn.tables().await?;
    for batch in &result.batches {
        let names = column::<StringArray>(batch, "table_name")?;
        let schemas = column::<BinaryArray>(batch, "table_schema")?;
        for row in 0..batch.num_rows() {
            println!("{}", names.value(row));
            if schemas.is_valid(row) {
                for field in decode_ipc_schema(schemas.value(row))?.fields() {
                    println!(
                        "    {:<20} {}{}",
                        field.name(),
                        field.data_type(),
                        if field.is_nullable() { "" } else { " NOT NULL" }
                    );
                }
            }
        }
    }
    Ok(())
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            anyhow::anyhow!("the server's GetTables result has no usable `{name}` column")
        })
}

/// GetTables carries each table's schema as an IPC schema message.
fn decode_ipc_schema(bytes: &[u8]) -> Result<datafusion::arrow::datatypes::SchemaRef> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    Ok(reader.schema())
}

async fn whoami(args: ConnArgs) -> Result<()> {
    let conn = args.connect().await?;
    let mut client =
        sluice_proto::v1::connector_service_client::ConnectorServiceClient::new(conn.channel());
    let me = client
        .who_am_i(sluice_proto::v1::WhoAmIRequest {})
        .await
        .map_err(crate::client::status_error)?
        .into_inner();
    println!("principal:    {}", me.principal_id);
    println!("organization: {}", me.organization);
    println!("common name:  {}", me.common_name);
    for uri in &me.san_uris {
        println!("SAN URI:      {uri}");
    }
    println!("certificate:  sha256:{}", me.certificate_sha256);
    Ok(())
}

fn certs(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Ca {
            dir,
            name,
            org,
            validity,
            force,
        } => {
            let ca = pki::create_ca(&name, org.as_deref(), validity.resolve(3650)?)?;
            let (cert, key) = pki::write_pair(&dir, "ca", &ca, force)?;
            println!(
                "CA certificate: {}\nCA key:         {} (keep it offline)",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Server {
            dir,
            name,
            dns,
            ips,
            validity,
            force,
        } => {
            let authority = load_authority(&dir)?;
            let issued = authority.issue_server(&dns, &ips, validity.resolve(397)?)?;
            let (cert, key) = pki::write_pair(&dir, &name, &issued, force)?;
            println!(
                "server certificate: {}\nserver key:         {}",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Client {
            dir,
            name,
            cn,
            org,
            uris,
            validity,
            force,
        } => {
            let authority = load_authority(&dir)?;
            let who = ClientIdentity {
                common_name: cn.unwrap_or_else(|| name.clone()),
                organization: org,
                uris,
            };
            let issued = authority.issue_client(&who, validity.resolve(397)?)?;
            let (cert, key) = pki::write_pair(&dir, &name, &issued, force)?;
            println!(
                "client certificate: {}\nclient key:         {}",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

fn load_authority(dir: &Path) -> Result<Authority> {
    Authority::load(&dir.join("ca.pem"), &dir.join("ca.key")).with_context(|| {
        format!(
            "loading the CA from {} (create one with `sluice certs ca --dir {}`)",
            dir.display(),
            dir.display()
        )
    })
}
