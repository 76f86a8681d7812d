//! Load and soak harness: the real `sluice` daemon, driven over mTLS by many
//! concurrent Flight SQL clients with a realistic mix of requests.
//!
//! ```text
//! cargo bench -p sluice --bench load -- --clients 200 --seconds 60
//! cargo bench -p sluice --bench load -- --clients 24 --seconds 1800 --rate 30
//! cargo bench -p sluice --bench load -- --clients 200 --seconds 60 --broker
//! ```
//!
//! Not a test: it prints figures (docs/operations.md has the ones measured
//! here) and exits non-zero only when something is wrong (an unexpected
//! error, a ledger that disagrees with the answers, an audit log that does
//! not verify).
//!
//! What it does:
//! 1. Creates a deployment in a fresh state directory (`sluice init`: the
//!    demo data and dev PKI) with the demo policy, changed only so that a
//!    long run does not exhaust it: the research institute's privacy budget
//!    is 10⁹ ε over the whole run and needs no agreement, and the daily
//!    quotas are 10⁹.
//! 2. Starts the daemon (release profile) and N clients, each with its own
//!    mTLS connection as one of the three demo consumers. Each client sends
//!    one request at a time, drawn from its consumer's mix ([`Kind`]); with
//!    `--rate` the clients together send that many requests per second
//!    (open loop), otherwise each sends its next request when the last ends.
//!    With `--broker`, the regional mobility data space of
//!    `examples/broker` runs beside it (its `setup.sh`: two operators'
//!    connectors and a broker, their budgets raised as above), and the
//!    planning agency's clients also ask the broker federated DP
//!    aggregates, cached and fresh, and one the operators refuse (fares:
//!    hidden from queries through the broker).
//! 3. Probes the gRPC health service every 100 ms on its own connection.
//! 4. Samples the daemon's RSS, open descriptors and threads every second
//!    (`/proc/<pid>`), and reports their slope over the run's second half.
//! 5. At the end: the ledger's ε spent (BudgetService) must equal the sum of
//!    the ε that the released answers say they cost; the daemon is stopped
//!    with SIGTERM and `sluice audit verify` must pass on its log. With
//!    `--broker`, the same for each operator: its ledger's ε for the
//!    planning agency equals the sum of what the broker's answers report
//!    that operator charged (`sluice.federation.providers`), and its audit
//!    log verifies; no answer may be partial.
//!
//! Outcomes are counted apart: `ok`; `refused` (the status the request is
//! meant to get: PERMISSION_DENIED for a forbidden column, INVALID_ARGUMENT
//! for bad SQL, NOT_FOUND for an unknown table); `shed` (RESOURCE_EXHAUSTED
//! because the connector is busy: overload, the client backs off 50–150 ms);
//! and `unexpected` (anything else, including success where a refusal was
//! due), which fails the run.
//!
//! Options (`--name value`): `clients` (default 50), `seconds` (30), `rate`
//! (requests per second in all; default closed loop), `warmup` (seconds
//! not counted, 3), `state-dir` (kept afterwards; default a temporary one),
//! `samples` (write the resource samples as CSV here), `max-concurrent`,
//! `per-organization`, `queue`, `queue-per-organization`, `queue-timeout`
//! (the `[limits]` settings; default the embedded defaults), `mix` (e.g.
//! `agg=4,dp_fresh=1`: weights by kind; default the mix below); the flag
//! `--broker` (no value).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use arrow_flight::error::FlightError;
use arrow_flight::sql::CommandGetTables;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightInfo, Ticket};
use datafusion::arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema};
use futures::TryStreamExt;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> anyhow::Result<()> {
    let kept;
    let temporary;
    let state_dir: &Path = match &options.state_dir {
        Some(dir) => {
            kept = dir.clone();
            &kept
        }
        None => {
            temporary = tempfile::tempdir()?;
            temporary.path()
        }
    };
    let config = deployment(state_dir, &options)?;
    let mut daemon = Daemon::start(&config, state_dir)?;
    let mut federation = match options.broker {
        true => Some(Federation::start(
            &state_dir.join("federation"),
            &options.limits,
        )?),
        false => None,
    };
    println!(
        "load: {} clients for {} s ({}), daemon pid {} on {}",
        options.clients,
        options.seconds,
        match options.rate {
            Some(r) => format!("open loop, {r} requests/s in all"),
            None => "closed loop".into(),
        },
        daemon.child.id(),
        daemon.addr
    );
    if let Some(f) = &federation {
        println!(
            "federation: broker on {}, operators north on {} and south on {}",
            f.broker.addr, f.north.addr, f.south.addr
        );
    }

    let pki = state_dir.join("pki");
    let results = Arc::new(Results::default());
    let started = Instant::now();
    let counted_from = started + Duration::from_secs(options.warmup);
    let end = counted_from + Duration::from_secs(options.seconds);
    let sampler = tokio::spawn(sample_resources(daemon.child.id(), started, end));
    let prober = tokio::spawn(probe_health(
        connect(&daemon.addr, &pki, "admin").await?,
        results.clone(),
        counted_from,
        end,
    ));
    let mut clients = Vec::new();
    for i in 0..options.clients {
        let consumer = Consumer::ALL[i % Consumer::ALL.len()];
        let channel = connect(&daemon.addr, &pki, consumer.identity()).await?;
        let mut flight = FlightSqlServiceClient::new(channel);
        if let Some(purpose) = consumer.purpose() {
            flight.set_header("x-sluice-purpose", purpose);
        }
        let broker = match (&federation, consumer) {
            (Some(f), Consumer::Planning) => Some(f.client().await?),
            _ => None,
        };
        let client = Client {
            flight,
            broker,
            consumer,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1)),
            mix: options.mix.for_consumer(consumer, federation.is_some()),
        };
        let schedule = options.rate.map(|rate| Schedule {
            // Client i sends at start + i/rate + k·clients/rate.
            first: started + Duration::from_secs_f64(i as f64 / rate),
            every: Duration::from_secs_f64(options.clients as f64 / rate),
        });
        clients.push(tokio::spawn(client.run(
            results.clone(),
            counted_from,
            end,
            schedule,
        )));
    }
    for c in clients {
        c.await??;
    }
    prober.await??;
    let samples = sampler.await??;
    let elapsed = options.seconds as f64;

    let spent = ledger_spent(&daemon.addr, &pki, "research").await?;
    daemon.stop()?;
    let verified = verify_audit_log(state_dir)?;
    let operators = match &mut federation {
        Some(f) => f.check().await?,
        None => Vec::new(),
    };

    let mut failures = report(&results, elapsed, &samples, spent, &verified);
    failures.extend(report_operators(&results, &operators));
    if let Some(path) = &options.samples {
        write_samples(path, &samples)?;
        println!("resource samples written to {}", path.display());
    }
    ensure!(
        failures.is_empty(),
        "the run failed: {}",
        failures.join("; ")
    );
    Ok(())
}

/// What one run is asked to do.
struct Options {
    clients: usize,
    seconds: u64,
    warmup: u64,
    rate: Option<f64>,
    state_dir: Option<PathBuf>,
    samples: Option<PathBuf>,
    limits: Vec<(&'static str, String)>,
    mix: Mix,
    broker: bool,
}

impl Options {
    fn parse() -> anyhow::Result<Options> {
        let mut options = Options {
            clients: 50,
            seconds: 30,
            warmup: 3,
            rate: None,
            state_dir: None,
            samples: None,
            limits: Vec::new(),
            mix: Mix::default(),
            broker: false,
        };
        // `cargo bench` adds `--bench`; everything else is `--name value`.
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let mut args = args.into_iter();
        while let Some(name) = args.next() {
            if name == "--broker" {
                options.broker = true;
                continue;
            }
            let value = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            let number = || {
                value
                    .parse::<f64>()
                    .with_context(|| format!("{name} {value}: not a number"))
            };
            match name.as_str() {
                "--clients" => options.clients = number()? as usize,
                "--seconds" => options.seconds = number()? as u64,
                "--warmup" => options.warmup = number()? as u64,
                "--rate" => options.rate = Some(number()?),
                "--state-dir" => options.state_dir = Some(value.into()),
                "--samples" => options.samples = Some(value.into()),
                "--max-concurrent" => options.limits.push(("max_concurrent_queries", value)),
                "--per-organization" => options
                    .limits
                    .push(("max_concurrent_queries_per_organization", value)),
                "--queue" => options.limits.push(("max_queued_queries", value)),
                "--queue-per-organization" => options
                    .limits
                    .push(("max_queued_queries_per_organization", value)),
                "--queue-timeout" => options
                    .limits
                    .push(("queue_timeout", format!("\"{value}\""))),
                "--mix" => options.mix = Mix::parse(&value)?,
                _ => bail!("unknown option {name} (see the top of benches/load.rs)"),
            }
        }
        ensure!(options.clients > 0, "--clients must be at least 1");
        Ok(options)
    }
}

/// The three demo consumers, one per organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    /// City Planning Agency: k-anonymous aggregates of trips, all of zones.
    Planning,
    /// City Research Institute: differentially private aggregates of trips.
    Research,
    /// Axle supplier: rows of its own manufacturer's machine events.
    Supplier,
}

impl Consumer {
    const ALL: [Consumer; 3] = [Consumer::Planning, Consumer::Research, Consumer::Supplier];

    /// The purpose its grants ask for (sent with every request).
    fn purpose(self) -> Option<&'static str> {
        match self {
            Consumer::Planning => Some("urban-planning"),
            Consumer::Research => Some("research"),
            Consumer::Supplier => None,
        }
    }

    fn identity(self) -> &'static str {
        match self {
            Consumer::Planning => "planning",
            Consumer::Research => "research",
            Consumer::Supplier => "supplier",
        }
    }
}

/// One kind of request in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// An allowed aggregate (k-anonymous, or the supplier's own machines).
    Aggregate,
    /// A query the policy refuses (a hidden column): PERMISSION_DENIED.
    Forbidden,
    /// SQL that does not parse: INVALID_ARGUMENT.
    Malformed,
    /// A table that does not exist: NOT_FOUND.
    UnknownTable,
    /// A DP aggregate asked before: answered from the cache, no ε.
    DpCached,
    /// A DP aggregate at a fresh ε: computed and charged.
    DpFresh,
    /// A prepared statement (CreatePreparedStatement, bind, execute, close).
    Prepared,
    /// GetCatalogs and GetTables, each with its DoGet.
    Metadata,
    /// Every row the supplier may read of machine_events (5,000 rows).
    LargeStream,
    /// Through the broker (`--broker`): a federated DP aggregate asked
    /// before, answered from each operator's cache.
    Broker,
    /// Through the broker: at a fresh ε, charged at both operators.
    BrokerFresh,
    /// Through the broker: fares, which the operators release only to the
    /// agency's direct questions. A relayed query gets the stricter of the
    /// broker's and the agency's grants, and the broker's has no fares: to
    /// it the column does not exist (INVALID_ARGUMENT, as for any hidden
    /// column).
    BrokerRefused,
}

impl Kind {
    const ALL: [Kind; 12] = [
        Kind::Aggregate,
        Kind::Forbidden,
        Kind::Malformed,
        Kind::UnknownTable,
        Kind::DpCached,
        Kind::DpFresh,
        Kind::Prepared,
        Kind::Metadata,
        Kind::LargeStream,
        Kind::Broker,
        Kind::BrokerFresh,
        Kind::BrokerRefused,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Aggregate => "aggregate",
            Kind::Forbidden => "forbidden",
            Kind::Malformed => "malformed",
            Kind::UnknownTable => "unknown_table",
            Kind::DpCached => "dp_cached",
            Kind::DpFresh => "dp_fresh",
            Kind::Prepared => "prepared",
            Kind::Metadata => "metadata",
            Kind::LargeStream => "large_stream",
            Kind::Broker => "broker",
            Kind::BrokerFresh => "broker_fresh",
            Kind::BrokerRefused => "broker_refused",
        }
    }

    /// The refusal this request is meant to get, if any.
    fn expected_refusal(self) -> Option<Code> {
        match self {
            Kind::Forbidden => Some(Code::PermissionDenied),
            Kind::Malformed | Kind::BrokerRefused => Some(Code::InvalidArgument),
            Kind::UnknownTable => Some(Code::NotFound),
            _ => None,
        }
    }

    /// Which consumers send this kind.
    fn sent_by(self, consumer: Consumer) -> bool {
        use Consumer::*;
        match self {
            Kind::Aggregate | Kind::Forbidden | Kind::Prepared => {
                matches!(consumer, Planning | Supplier)
            }
            Kind::Malformed | Kind::UnknownTable | Kind::Metadata => true,
            Kind::DpCached | Kind::DpFresh => consumer == Research,
            Kind::LargeStream => consumer == Supplier,
            Kind::Broker | Kind::BrokerFresh | Kind::BrokerRefused => consumer == Planning,
        }
    }

    fn through_broker(self) -> bool {
        matches!(self, Kind::Broker | Kind::BrokerFresh | Kind::BrokerRefused)
    }
}

/// Relative weights of the kinds.
#[derive(Clone)]
struct Mix(BTreeMap<Kind, u32>);

impl Default for Mix {
    /// Mostly allowed aggregates, as in a working data space; refusals and
    /// metadata calls are each a few percent, large streams rarer.
    fn default() -> Self {
        Mix(BTreeMap::from([
            (Kind::Aggregate, 40),
            (Kind::Forbidden, 5),
            (Kind::Malformed, 3),
            (Kind::UnknownTable, 2),
            (Kind::DpCached, 20),
            (Kind::DpFresh, 10),
            (Kind::Prepared, 10),
            (Kind::Metadata, 8),
            (Kind::LargeStream, 2),
            // Only with --broker (the planning agency's clients).
            (Kind::Broker, 8),
            (Kind::BrokerFresh, 2),
            (Kind::BrokerRefused, 1),
        ]))
    }
}

impl Mix {
    fn parse(text: &str) -> anyhow::Result<Mix> {
        let mut weights = BTreeMap::new();
        for part in text.split(',') {
            let (name, weight) = part
                .split_once('=')
                .with_context(|| format!("--mix: `{part}` is not kind=weight"))?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .with_context(|| {
                    format!(
                        "--mix: unknown kind `{name}`; kinds: {}",
                        Kind::ALL.map(Kind::name).join(", ")
                    )
                })?;
            weights.insert(kind, weight.trim().parse()?);
        }
        Ok(Mix(weights))
    }

    /// The kinds `consumer` sends, with their weights; broker kinds only
    /// where a broker runs.
    fn for_consumer(&self, consumer: Consumer, broker: bool) -> Vec<(Kind, u32)> {
        self.0
            .iter()
            .filter(|(k, w)| k.sent_by(consumer) && **w > 0 && (broker || !k.through_broker()))
            .map(|(k, w)| (*k, *w))
            .collect()
    }
}

/// A small deterministic generator (xorshift64*): runs are repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// When an open-loop client sends.
#[derive(Clone, Copy)]
struct Schedule {
    first: Instant,
    every: Duration,
}

/// How one request ended.
enum Outcome {
    Ok {
        /// ε the answer says it cost (DP answers only).
        epsilon: f64,
        cached: bool,
        /// A federated answer: the ε each operator charged for it.
        charged_by_operator: Vec<(String, f64)>,
    },
    Refused(Code),
    Shed,
    Unexpected(Code, String),
}

/// Everything measured, shared by the clients.
#[derive(Default)]
struct Results {
    by_kind: Mutex<BTreeMap<Kind, KindResults>>,
    health: Mutex<Vec<Duration>>,
    health_failures: Mutex<Vec<String>>,
    epsilon_released: Mutex<f64>,
    dp_answers_charged: Mutex<u64>,
    /// Per operator (`--broker`): ε charged and answers charged.
    operator_released: Mutex<BTreeMap<String, (f64, u64)>>,
}

#[derive(Default)]
struct KindResults {
    latencies: Vec<Duration>,
    ok: u64,
    refused: BTreeMap<String, u64>,
    shed: u64,
    shed_latencies: Vec<Duration>,
    unexpected: BTreeMap<String, u64>,
    examples: Vec<String>,
}

struct Client {
    flight: FlightSqlServiceClient<Channel>,
    /// The planning agency's connection to the broker (`--broker`).
    broker: Option<FlightSqlServiceClient<Channel>>,
    consumer: Consumer,
    rng: Rng,
    mix: Vec<(Kind, u32)>,
}

impl Client {
    async fn run(
        mut self,
        results: Arc<Results>,
        counted_from: Instant,
        end: Instant,
        schedule: Option<Schedule>,
    ) -> anyhow::Result<()> {
        if self.mix.is_empty() {
            // The mix has nothing this consumer sends.
            return Ok(());
        }
        let mut next_send = schedule.map(|s| s.first);
        while Instant::now() < end {
            if let (Some(at), Some(s)) = (next_send, schedule) {
                tokio::time::sleep_until(at.into()).await;
                next_send = Some(at + s.every);
                if Instant::now() >= end {
                    break;
                }
            }
            let kind = self.pick();
            let began = Instant::now();
            let outcome = self.request(kind).await;
            let took = began.elapsed();
            let shed = matches!(outcome, Outcome::Shed);
            if let Outcome::Ok {
                epsilon,
                cached,
                charged_by_operator,
            } = &outcome
            {
                // The ledger check counts warm-up answers too.
                results.released(*epsilon, *cached, charged_by_operator);
            }
            if began >= counted_from {
                results.record(kind, took, outcome);
            }
            if shed && schedule.is_none() {
                let pause = 50 + self.rng.below(100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        Ok(())
    }

    fn pick(&mut self) -> Kind {
        let total: u32 = self.mix.iter().map(|(_, w)| w).sum();
        let mut at = self.rng.below(total as u64) as u32;
        for (kind, weight) in &self.mix {
            if at < *weight {
                return *kind;
            }
            at -= weight;
        }
        self.mix[0].0
    }

    async fn request(&mut self, kind: Kind) -> Outcome {
        let result = match kind {
            Kind::Prepared => self.prepared().await,
            Kind::Metadata => self.metadata().await,
            Kind::Broker | Kind::BrokerFresh | Kind::BrokerRefused => self.federated(kind).await,
            _ => {
                let (sql, epsilon) = self.statement(kind);
                self.statement_query(sql, epsilon).await
            }
        };
        classify(kind, result)
    }

    /// The SQL and ε of a statement request.
    fn statement(&mut self, kind: Kind) -> (String, Option<String>) {
        let sql = match (kind, self.consumer) {
            (Kind::Aggregate, Consumer::Planning) => {
                let column = ["start_zone", "end_zone", "mode"][self.rng.below(3) as usize];
                format!(
                    "SELECT {column}, count(*) AS trips, avg(fare_eur) AS fare FROM trips GROUP BY {column}"
                )
            }
            (Kind::Aggregate, _) => {
                "SELECT site, event_type, count(*) AS n, avg(vibration_mm_s) AS v FROM machine_events GROUP BY site, event_type".into()
            }
            (Kind::Forbidden, Consumer::Planning) => "SELECT distance_km FROM trips LIMIT 5".into(),
            (Kind::Forbidden, _) => "SELECT energy_kwh FROM machine_events".into(),
            (Kind::Malformed, _) => "SELEC count(* FROM".into(),
            (Kind::UnknownTable, _) => "SELECT * FROM no_such_table".into(),
            (Kind::DpCached, _) => {
                "SELECT mode, count(*) AS trips FROM trips GROUP BY mode".into()
            }
            (Kind::DpFresh, _) => {
                "SELECT start_zone, count(*) AS trips, avg(fare_eur) AS fare FROM trips GROUP BY start_zone".into()
            }
            (Kind::LargeStream, _) => {
                "SELECT event_id, machine_serial, site, event_time, event_type, temperature_c FROM machine_events".into()
            }
            (
                Kind::Prepared
                | Kind::Metadata
                | Kind::Broker
                | Kind::BrokerFresh
                | Kind::BrokerRefused,
                _,
            ) => unreachable!("not a statement to the connector"),
        };
        // The research institute always names its ε: the cached question
        // at the policy's default, a fresh one at an ε not asked before
        // (no cached answer matches it).
        let epsilon = match kind {
            Kind::DpFresh => Some(format!("{:.6}", 0.1 + self.rng.below(400_000) as f64 / 1e6)),
            _ if self.consumer == Consumer::Research => Some("0.5".into()),
            _ => None,
        };
        (sql, epsilon)
    }

    async fn statement_query(
        &mut self,
        sql: String,
        epsilon: Option<String>,
    ) -> Result<Answer, FlightError> {
        let client = &mut self.flight;
        if let Some(e) = epsilon {
            client.set_header("x-sluice-epsilon", e);
        }
        let info = client.execute(sql, None).await?;
        fetch(client, &info).await
    }

    /// A federated aggregate through the broker, always with an ε (the
    /// operators' DP terms).
    async fn federated(&mut self, kind: Kind) -> Result<Answer, FlightError> {
        let (sql, epsilon) = match kind {
            Kind::Broker if self.rng.below(2) == 0 => (
                "SELECT mode, count(*) AS trips, avg(distance_km) AS km FROM trips GROUP BY mode",
                "0.5".to_string(),
            ),
            Kind::Broker => (
                "SELECT start_zone, count(*) AS trips FROM trips GROUP BY start_zone",
                "0.5".to_string(),
            ),
            Kind::BrokerFresh => (
                "SELECT mode, count(*) AS trips FROM trips GROUP BY mode",
                format!("{:.6}", 0.1 + self.rng.below(400_000) as f64 / 1e6),
            ),
            _ => (
                "SELECT mode, avg(fare_eur) AS fare FROM trips GROUP BY mode",
                "0.5".to_string(),
            ),
        };
        let client = self
            .broker
            .as_mut()
            .ok_or_else(|| FlightError::ProtocolError("no broker connection".into()))?;
        client.set_header("x-sluice-epsilon", epsilon);
        let info = client.execute(sql.to_string(), None).await?;
        fetch(client, &info).await
    }

    async fn prepared(&mut self) -> Result<Answer, FlightError> {
        let mut prepared;
        let parameters = match self.consumer {
            Consumer::Planning => {
                let mode = ["bus", "tram", "metro"][self.rng.below(3) as usize];
                prepared = self
                    .flight
                    .prepare(
                        "SELECT start_zone, count(*) AS trips FROM trips WHERE mode = ? GROUP BY start_zone".into(),
                        None,
                    )
                    .await?;
                parameter("mode", Arc::new(StringArray::from(vec![mode])))?
            }
            _ => {
                let threshold = self.rng.below(10) as f64;
                prepared = self
                    .flight
                    .prepare(
                        "SELECT site, count(*) AS n FROM machine_events WHERE vibration_mm_s > ? GROUP BY site".into(),
                        None,
                    )
                    .await?;
                parameter("threshold", Arc::new(Float64Array::from(vec![threshold])))?
            }
        };
        let client = &mut self.flight;
        prepared.set_parameters(parameters)?;
        let info = prepared.execute().await?;
        let answer = fetch(client, &info).await;
        prepared.close().await?;
        answer
    }

    async fn metadata(&mut self) -> Result<Answer, FlightError> {
        let client = &mut self.flight;
        let catalogs = client.get_catalogs().await?;
        let mut answer = fetch(client, &catalogs).await?;
        let tables = client
            .get_tables(CommandGetTables {
                include_schema: true,
                ..Default::default()
            })
            .await?;
        let more = fetch(client, &tables).await?;
        answer.rows += more.rows;
        // Every consumer sees at least the tables its grants name.
        if more.rows == 0 {
            return Err(FlightError::ProtocolError(
                "GetTables listed no table".into(),
            ));
        }
        Ok(answer)
    }
}

/// A one-row parameter batch for a prepared statement.
fn parameter(name: &str, value: ArrayRef) -> Result<RecordBatch, FlightError> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        name,
        value.data_type().clone(),
        true,
    )]));
    Ok(RecordBatch::try_new(schema, vec![value])?)
}

/// What a DoGet returned.
struct Answer {
    rows: usize,
    epsilon: f64,
    cached: bool,
    /// A broker's answer: the ε each operator charged (not cached there).
    charged_by_operator: Vec<(String, f64)>,
    /// A broker's answer without some operator's part.
    partial: bool,
}

async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: &FlightInfo,
) -> Result<Answer, FlightError> {
    let ticket: Ticket = info
        .endpoint
        .first()
        .and_then(|e| e.ticket.clone())
        .ok_or_else(|| FlightError::ProtocolError("a FlightInfo without a ticket".into()))?;
    let mut stream = client.do_get(ticket).await?;
    let mut rows = 0;
    while let Some(batch) = stream.try_next().await? {
        rows += batch.num_rows();
    }
    let metadata = stream
        .schema()
        .map(|s| s.metadata().clone())
        .unwrap_or_default();
    let epsilon = metadata
        .get(sluice_proto::wire::dp::QUERY_EPSILON)
        .and_then(|e| e.parse().ok())
        .unwrap_or(0.0);
    let cached = metadata
        .get(sluice_proto::wire::dp::CACHED)
        .is_some_and(|c| c == "true");
    let charged_by_operator = match metadata.get(sluice_proto::wire::federation::PROVIDERS) {
        Some(providers) => charged_by_operator(providers)?,
        None => Vec::new(),
    };
    let partial = metadata
        .get(sluice_proto::wire::federation::PARTIAL)
        .is_some_and(|p| p == "true");
    Ok(Answer {
        rows,
        epsilon,
        cached,
        charged_by_operator,
        partial,
    })
}

/// From a broker's provenance (`sluice.federation.providers`): the ε each
/// operator charged for its part, where it was computed (not cached).
fn charged_by_operator(providers: &str) -> Result<Vec<(String, f64)>, FlightError> {
    let bad = |what: &str| FlightError::ProtocolError(format!("provenance: {what}: {providers}"));
    let list: serde_json::Value = serde_json::from_str(providers).map_err(|_| bad("not JSON"))?;
    let mut charged = Vec::new();
    for entry in list.as_array().ok_or_else(|| bad("not a list"))? {
        let provider = entry["provider"]
            .as_str()
            .ok_or_else(|| bad("no provider"))?;
        let epsilon = entry["epsilon"].as_f64().unwrap_or(0.0);
        let cached = entry["cached"].as_bool().unwrap_or(false);
        if epsilon > 0.0 && !cached {
            charged.push((provider.to_string(), epsilon));
        }
    }
    Ok(charged)
}

fn classify(kind: Kind, result: Result<Answer, FlightError>) -> Outcome {
    match (result, kind.expected_refusal()) {
        (Ok(answer), None) => {
            if matches!(kind, Kind::DpCached | Kind::Broker | Kind::BrokerFresh) && answer.rows == 0
            {
                return Outcome::Unexpected(Code::Ok, "a DP answer without rows".into());
            }
            if answer.partial {
                return Outcome::Unexpected(Code::Ok, "a partial federated answer".into());
            }
            Outcome::Ok {
                epsilon: answer.epsilon,
                cached: answer.cached,
                charged_by_operator: answer.charged_by_operator,
            }
        }
        (Ok(_), Some(want)) => {
            Outcome::Unexpected(Code::Ok, format!("answered, but {want:?} was due"))
        }
        (Err(FlightError::Tonic(status)), want) => {
            let code = status.code();
            if Some(code) == want {
                Outcome::Refused(code)
            } else if code == Code::ResourceExhausted && status.message().contains("is busy") {
                Outcome::Shed
            } else {
                Outcome::Unexpected(code, status.message().chars().take(200).collect())
            }
        }
        (Err(other), _) => Outcome::Unexpected(Code::Unknown, other.to_string()),
    }
}

impl Results {
    /// An answer was released: what it says it cost.
    fn released(&self, epsilon: f64, cached: bool, charged_by_operator: &[(String, f64)]) {
        if !charged_by_operator.is_empty() {
            // A broker's answer: its ε was charged at the operators.
            let mut operators = self.operator_released.lock().unwrap();
            for (operator, epsilon) in charged_by_operator {
                let entry = operators.entry(operator.clone()).or_default();
                entry.0 += epsilon;
                entry.1 += 1;
            }
        } else if epsilon > 0.0 && !cached {
            *self.epsilon_released.lock().unwrap() += epsilon;
            *self.dp_answers_charged.lock().unwrap() += 1;
        }
    }

    fn record(&self, kind: Kind, took: Duration, outcome: Outcome) {
        let mut all = self.by_kind.lock().unwrap();
        let entry = all.entry(kind).or_default();
        match outcome {
            Outcome::Ok { .. } => {
                entry.ok += 1;
                entry.latencies.push(took);
            }
            Outcome::Refused(code) => {
                entry.latencies.push(took);
                *entry.refused.entry(format!("{code:?}")).or_default() += 1;
            }
            Outcome::Shed => {
                entry.shed += 1;
                entry.shed_latencies.push(took);
            }
            Outcome::Unexpected(code, message) => {
                *entry.unexpected.entry(format!("{code:?}")).or_default() += 1;
                if entry.examples.len() < 3 {
                    entry.examples.push(format!("{code:?}: {message}"));
                }
            }
        }
    }
}

/// Checks the health service every 100 ms on its own connection.
async fn probe_health(
    channel: Channel,
    results: Arc<Results>,
    counted_from: Instant,
    end: Instant,
) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut client = HealthClient::new(channel);
    while Instant::now() < end {
        let began = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await;
        if began >= counted_from {
            match answer {
                Ok(Ok(_)) => results.health.lock().unwrap().push(began.elapsed()),
                Ok(Err(status)) => results
                    .health_failures
                    .lock()
                    .unwrap()
                    .push(status.to_string()),
                Err(_) => results
                    .health_failures
                    .lock()
                    .unwrap()
                    .push("no answer within 5 s".into()),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One reading of what the daemon holds.
#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

async fn sample_resources(pid: u32, started: Instant, end: Instant) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < end {
        tick.tick().await;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .context("reading the daemon's /proc status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        samples.push(Sample {
            at: started.elapsed().as_secs_f64(),
            rss_kib: field("VmRSS:"),
            fds,
            threads: field("Threads:"),
        });
    }
    Ok(samples)
}

/// Least-squares slope of `y` over `x`, per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx * 60.0 }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// Prints the figures; returns what went wrong.
fn report(
    results: &Results,
    seconds: f64,
    samples: &[Sample],
    spent: LedgerSpent,
    verified: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    let by_kind = results.by_kind.lock().unwrap();
    println!(
        "\n{:<14} {:>8} {:>9} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9}  refusals (expected)",
        "kind", "ok", "refused", "shed", "unexp.", "answers/s", "p50 ms", "p99 ms", "p999 ms"
    );
    let (mut answered, mut shed_all, mut unexpected_all) = (0u64, 0u64, 0u64);
    let mut shed_latencies = Vec::new();
    for (kind, r) in by_kind.iter() {
        let mut latencies = r.latencies.clone();
        latencies.sort();
        let refused: u64 = r.refused.values().sum();
        let unexpected: u64 = r.unexpected.values().sum();
        answered += r.ok + refused;
        shed_all += r.shed;
        unexpected_all += unexpected;
        shed_latencies.extend_from_slice(&r.shed_latencies);
        println!(
            "{:<14} {:>8} {:>9} {:>8} {:>7} {:>10.1} {:>9.1} {:>9.1} {:>9.1}  {}",
            kind.name(),
            r.ok,
            refused,
            r.shed,
            unexpected,
            (r.ok + refused) as f64 / seconds,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 0.999),
            r.refused
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if unexpected > 0 {
            failures.push(format!("{} unexpected {:?}", kind.name(), r.unexpected));
            for e in &r.examples {
                println!("    unexpected: {e}");
            }
        }
    }
    println!(
        "in all: {answered} answered ({:.1}/s), {shed_all} shed as busy, {unexpected_all} unexpected",
        answered as f64 / seconds
    );
    if !shed_latencies.is_empty() {
        shed_latencies.sort();
        println!(
            "busy refusals (RESOURCE_EXHAUSTED) came after p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&shed_latencies, 0.5),
            percentile(&shed_latencies, 0.99),
            percentile(&shed_latencies, 1.0)
        );
    }

    let mut health = results.health.lock().unwrap().clone();
    health.sort();
    let health_failures = results.health_failures.lock().unwrap();
    println!(
        "health checks: {} answered, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} failed",
        health.len(),
        percentile(&health, 0.5),
        percentile(&health, 0.99),
        percentile(&health, 1.0),
        health_failures.len()
    );
    if !health_failures.is_empty() {
        failures.push(format!("health checks failed: {:?}", &health_failures[..1]));
    }

    report_resources(samples);

    let released = *results.epsilon_released.lock().unwrap();
    let charged = *results.dp_answers_charged.lock().unwrap();
    println!(
        "privacy ledger: {:.6} ε spent in {} queries, {:.6} ε reserved; the released answers (warm-up included) say {:.6} ε in {charged}",
        spent.epsilon, spent.queries, spent.reserved, released
    );
    if (spent.epsilon - released).abs() > 1e-6 * spent.epsilon.max(1.0) || spent.queries != charged
    {
        failures.push(format!(
            "the ledger ({} ε in {} queries) disagrees with the answers ({released} ε in {charged})",
            spent.epsilon, spent.queries
        ));
    }
    if spent.reserved.abs() > 1e-9 {
        failures.push(format!("{} ε still reserved after the run", spent.reserved));
    }
    println!("audit log: {verified}");
    failures
}

fn report_resources(samples: &[Sample]) {
    let Some(last) = samples.last() else {
        return;
    };
    let second_half: Vec<&Sample> = samples.iter().filter(|s| s.at >= last.at / 2.0).collect();
    let series = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        second_half.iter().map(|s| (s.at, f(s))).collect()
    };
    let rss_mib = |s: &Sample| s.rss_kib as f64 / 1024.0;
    let max = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).fold(f64::MIN, f64::max);
    println!(
        "daemon: RSS {:.0} → {:.0} MiB (max {:.0}; slope over the second half {:+.2} MiB/min); fds {} → {} (max {:.0}; {:+.3}/min); threads {} → {} (max {:.0}; {:+.3}/min); {} samples",
        rss_mib(&samples[0]),
        rss_mib(last),
        max(&rss_mib),
        slope_per_minute(&series(&rss_mib)),
        samples[0].fds,
        last.fds,
        max(&|s: &Sample| s.fds as f64),
        slope_per_minute(&series(&|s: &Sample| s.fds as f64)),
        samples[0].threads,
        last.threads,
        max(&|s: &Sample| s.threads as f64),
        slope_per_minute(&series(&|s: &Sample| s.threads as f64)),
        samples.len()
    );
}

fn write_samples(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut text = String::from("seconds,rss_kib,fds,threads\n");
    for s in samples {
        text.push_str(&format!(
            "{:.1},{},{},{}\n",
            s.at, s.rss_kib, s.fds, s.threads
        ));
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// An organization's spend on trips, from a ledger (BudgetService).
struct LedgerSpent {
    epsilon: f64,
    reserved: f64,
    queries: u64,
}

async fn ledger_spent(addr: &str, pki: &Path, identity: &str) -> anyhow::Result<LedgerSpent> {
    use sluice_proto::v1::GetBudgetRequest;
    use sluice_proto::v1::budget_service_client::BudgetServiceClient;
    let mut client = BudgetServiceClient::new(connect(addr, pki, identity).await?);
    let response = client
        .get_budget(GetBudgetRequest {
            dataset: "trips".into(),
        })
        .await?
        .into_inner();
    let mut spent = LedgerSpent {
        epsilon: 0.0,
        reserved: 0.0,
        queries: 0,
    };
    for line in response.budgets {
        spent.epsilon += line.epsilon_spent;
        spent.reserved += line.epsilon_reserved;
        spent.queries += line.queries.max(0) as u64;
    }
    Ok(spent)
}

/// The regional mobility data space of `examples/broker`: two operators'
/// connectors and the broker federating their `trips`.
struct Federation {
    dir: PathBuf,
    north: Daemon,
    south: Daemon,
    broker: Daemon,
}

/// What one operator's ledger and audit log say after the run.
struct OperatorCheck {
    name: String,
    spent: LedgerSpent,
    verified: String,
}

impl Federation {
    /// `examples/broker/setup.sh` into `dir`, the operators' budgets raised
    /// so that a long run cannot exhaust them and their `[limits]` those of
    /// the run; then the three daemons.
    fn start(dir: &Path, limits: &[(&str, String)]) -> anyhow::Result<Federation> {
        let setup = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/broker/setup.sh"
        ))
        .arg(dir)
        .env("SLUICE", env!("CARGO_BIN_EXE_sluice"))
        .output()?;
        ensure!(
            setup.status.success(),
            "examples/broker/setup.sh failed: {}",
            String::from_utf8_lossy(&setup.stderr)
        );
        for operator in ["north", "south"] {
            let path = dir.join(operator).join("policy.yaml");
            let policy = std::fs::read_to_string(&path)?;
            let from = "budget: { epsilon: 10, period: 30d }";
            ensure!(
                policy.contains(from),
                "the operator policy no longer has `{from}`"
            );
            std::fs::write(
                &path,
                policy.replace(from, "budget: { epsilon: 1.0e9, period: total }"),
            )?;
            if !limits.is_empty() {
                let config_path = dir.join(operator).join("sluice.toml");
                let mut config = std::fs::read_to_string(&config_path)?;
                config.push_str("\n[limits]\n");
                for (name, value) in limits {
                    config.push_str(&format!("{name} = {value}\n"));
                }
                std::fs::write(&config_path, config)?;
            }
        }
        let operator = |name: &str| {
            let config = dir.join(name).join("sluice.toml");
            Daemon::spawn(
                name,
                &["serve".as_ref(), "--config".as_ref(), config.as_os_str()],
            )
        };
        let north = operator("north")?;
        let south = operator("south")?;
        // The broker reaches the operators where they listen now.
        let config_path = dir.join("broker.toml");
        let mut config = std::fs::read_to_string(&config_path)?;
        for (default_port, daemon) in [("50091", &north), ("50092", &south)] {
            let from = format!("grpc+tls://127.0.0.1:{default_port}\"");
            ensure!(config.contains(&from), "broker.toml has no `{from}`");
            config = config.replace(&from, &format!("grpc+tls://{}\"", daemon.addr));
        }
        std::fs::write(&config_path, config)?;
        let broker = Daemon::spawn(
            "the broker",
            &[
                "broker".as_ref(),
                "--config".as_ref(),
                config_path.as_os_str(),
            ],
        )?;
        Ok(Federation {
            dir: dir.to_path_buf(),
            north,
            south,
            broker,
        })
    }

    /// The planning agency's connection to the broker.
    async fn client(&self) -> anyhow::Result<FlightSqlServiceClient<Channel>> {
        let channel = connect(&self.broker.addr, &self.dir.join("pki"), "planning").await?;
        let mut client = FlightSqlServiceClient::new(channel);
        client.set_header("x-sluice-purpose", "urban-planning");
        Ok(client)
    }

    /// Each operator's ledger for the planning agency, then (daemons
    /// stopped) its audit log verified.
    async fn check(&mut self) -> anyhow::Result<Vec<OperatorCheck>> {
        let pki = self.dir.join("pki");
        let north = ledger_spent(&self.north.addr, &pki, "planning").await?;
        let south = ledger_spent(&self.south.addr, &pki, "planning").await?;
        self.broker.stop()?;
        self.north.stop()?;
        self.south.stop()?;
        let mut checks = Vec::new();
        for (name, spent) in [("north", north), ("south", south)] {
            checks.push(OperatorCheck {
                name: name.into(),
                spent,
                verified: verify_audit_log(&self.dir.join(name).join("state"))?,
            });
        }
        Ok(checks)
    }
}

/// Each operator's ledger against what the broker's answers said it
/// charged; returns what went wrong.
fn report_operators(results: &Results, operators: &[OperatorCheck]) -> Vec<String> {
    let released = results.operator_released.lock().unwrap();
    let mut failures = Vec::new();
    for operator in operators {
        let (epsilon, answers) = released.get(&operator.name).copied().unwrap_or_default();
        let spent = &operator.spent;
        println!(
            "operator {}: ledger {:.6} ε spent in {} queries, {:.6} ε reserved; the broker's answers say {:.6} ε in {answers}; audit log: {}",
            operator.name, spent.epsilon, spent.queries, spent.reserved, epsilon, operator.verified
        );
        if (spent.epsilon - epsilon).abs() > 1e-6 * spent.epsilon.max(1.0)
            || spent.queries != answers
        {
            failures.push(format!(
                "operator {}: the ledger ({} ε in {} queries) disagrees with the broker's answers ({epsilon} ε in {answers})",
                operator.name, spent.epsilon, spent.queries
            ));
        }
        if spent.reserved.abs() > 1e-9 {
            failures.push(format!(
                "operator {}: {} ε still reserved after the run",
                operator.name, spent.reserved
            ));
        }
    }
    failures
}

/// `sluice audit verify` on the daemon's log, after it stopped.
fn verify_audit_log(state_dir: &Path) -> anyhow::Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["audit", "verify", "--state-dir"])
        .arg(state_dir)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    ensure!(
        output.status.success(),
        "sluice audit verify failed: {text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(format!("`sluice audit verify` passed: {text}"))
}

/// The deployment: demo data and PKI, the load policy, a config.
fn deployment(state_dir: &Path, options: &Options) -> anyhow::Result<PathBuf> {
    let init = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["init", "--state-dir"])
        .arg(state_dir)
        .output()?;
    ensure!(
        init.status.success(),
        "sluice init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let policy = load_policy()?;
    let policy_path = state_dir.join("load-policy.yaml");
    std::fs::write(&policy_path, policy)?;
    let example = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["config", "example"])
        .output()?;
    ensure!(example.status.success(), "sluice config example failed");
    let mut config = String::from_utf8(example.stdout)?;
    config = config.replace(
        "file = \"policy.yaml\"",
        &format!("file = \"{}\"", policy_path.display()),
    );
    for (name, value) in &options.limits {
        let line = config
            .lines()
            .find(|l| l.starts_with(&format!("{name} =")))
            .with_context(|| format!("the example config has no `{name}` line"))?
            .to_string();
        config = config.replace(&line, &format!("{name} = {value}"));
    }
    let path = state_dir.join("load.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// The demo policy with budgets and quotas a long run cannot exhaust.
fn load_policy() -> anyhow::Result<String> {
    let mut text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/dev/demo_policy.yaml"
    ))?;
    for (from, to) in [
        (
            "budget: { epsilon: 10.0, delta: 1.0e-6, period: month }",
            "budget: { epsilon: 1.0e9, delta: 9.0e-4, period: total }",
        ),
        ("agreement: { approval: manual, valid_for_days: 30 }", ""),
        (
            "quotas: { queries_per_day: 10000, rows_per_day: 5000000 }",
            "quotas: { queries_per_day: 1000000000, rows_per_day: 1000000000000 }",
        ),
        (
            "quotas: { queries_per_day: 2000, rows_per_day: 500000 }",
            "quotas: { queries_per_day: 1000000000, rows_per_day: 1000000000000 }",
        ),
    ] {
        ensure!(
            text.contains(from),
            "the demo policy no longer has `{from}`"
        );
        text = text.replace(from, to);
    }
    Ok(text)
}

/// The daemon under load.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(config: &Path, state_dir: &Path) -> anyhow::Result<Daemon> {
        Daemon::spawn(
            "the daemon",
            &[
                "serve".as_ref(),
                "--metrics-listen".as_ref(),
                "off".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
                "--state-dir".as_ref(),
                state_dir.as_os_str(),
            ],
        )
    }

    /// `sluice ARGS --listen 127.0.0.1:0 --log-level warn`, until it says
    /// where it listens.
    fn spawn(name: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<Daemon> {
        // `setpriv` makes the daemon die with the harness, even if it is killed.
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                bail!("{name} exited before listening");
            };
            if let Some(rest) = line?.split("listening on grpc+tls://").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Daemon { child, addr })
    }

    /// SIGTERM, then wait: the daemon drains and closes its logs.
    fn stop(&mut self) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(sent.success(), "kill -TERM failed");
        let status = self.child.wait()?;
        ensure!(status.success(), "the daemon exited with {status}");
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(addr: &str, pki: &Path, identity: &str) -> anyhow::Result<Channel> {
    let read = |name: String| std::fs::read(pki.join(&name)).with_context(|| name);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())?))
        .identity(Identity::from_pem(
            read(format!("{identity}.pem"))?,
            read(format!("{identity}.key"))?,
        ))
        .domain_name("localhost");
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}
