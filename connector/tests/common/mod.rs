//! Shared harness for the integration tests: starts the real `sluice` binary
//! on an ephemeral port and connects to it with arrow-flight's
//! `FlightSqlServiceClient` over mTLS.
//!
//! Every test binary shares one prepared state directory (development PKI and
//! demo data) under Cargo's per-target temporary directory, so the 1M-row
//! demo table is generated once per build, not once per test.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightInfo, Ticket};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long a daemon may take to print its banner.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The `sluice` binary Cargo built for this test run.
pub fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// `sluice`, started so that it is killed if the test process dies without
/// unwinding (killed by a timeout) instead of running on as an orphan:
/// util-linux's `setpriv` sets the parent-death signal and executes it (so
/// the child's pid is the daemon's), without unsafe code here.
pub fn dies_with_parent() -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .arg(env!("CARGO_BIN_EXE_sluice"));
    command
}

/// A state directory with the development PKI and the demo datasets,
/// prepared once with `sluice init` and shared by all tests.
pub fn shared_state_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sluice-demo-state");
        let out = sluice()
            .args(["init", "--state-dir"])
            .arg(&dir)
            .output()
            .expect("running sluice init");
        assert!(
            out.status.success(),
            "sluice init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .clone()
}

/// A fresh, empty directory that lives as long as the returned guard.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-it-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a temporary directory")
}

/// A deployment in a temporary directory: `people.csv` holding `csv`, served
/// as dataset `people` under `policy`, with its own state directory.
/// Returns the directory (keep it alive), the config file and the state dir.
pub fn people_deployment(csv: &str, policy: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = temp_dir();
    let d = dir.path();
    std::fs::write(d.join("people.csv"), csv).unwrap();
    std::fs::write(d.join("policy.yaml"), policy).unwrap();
    let config = d.join("sluice.toml");
    std::fs::write(
        &config,
        "[policy]\nfile = \"policy.yaml\"\n\n[[datasets]]\nname = \"people\"\nformat = \"csv\"\npath = \"people.csv\"\n",
    )
    .unwrap();
    let state = d.join("state");
    (dir, config, state)
}

/// A running `sluice serve` process; killed when dropped.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub state_dir: PathBuf,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// The embedded demo configuration on the shared state directory, under
    /// the open test policy (`tests/policies/open.yaml`): for tests of the
    /// transport, not of the policy.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// [`Daemon::start`] plus extra `serve` arguments.
    pub fn start_with(extra: &[&str]) -> Daemon {
        Self::start_with_policy(&open_policy(), extra)
    }

    /// The embedded demo configuration with its demo usage policy (from the
    /// source tree: the shared state directory keeps the copy it was created
    /// with, which may be older).
    pub fn start_demo_policy_with(extra: &[&str]) -> Daemon {
        Self::start_with_policy(&demo_policy(), extra)
    }

    fn start_with_policy(policy: &Path, extra: &[&str]) -> Daemon {
        let state_dir = shared_state_dir();
        let mut args = vec![
            "--state-dir".to_string(),
            state_dir.display().to_string(),
            "--policy".to_string(),
            policy.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args, state_dir)
    }

    /// `sluice serve --config FILE` (its state directory is the shared one
    /// unless the file says otherwise; the file's own settings apply; the
    /// open test policy unless the file names a policy).
    pub fn start_config(config: &Path) -> Daemon {
        let mut args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--state-dir".to_string(),
            shared_state_dir().display().to_string(),
        ];
        let text = std::fs::read_to_string(config).unwrap_or_default();
        if !text.contains("[policy]") {
            args.extend(["--policy".to_string(), open_policy().display().to_string()]);
        }
        Self::spawn(&args, shared_state_dir())
    }

    /// `sluice serve --config FILE` on a state directory of its own (its own
    /// development PKI, quota usage and masking key).
    pub fn start_isolated(config: &Path, state_dir: &Path) -> Daemon {
        let args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--state-dir".to_string(),
            state_dir.display().to_string(),
        ];
        Self::spawn(&args, state_dir.to_path_buf())
    }

    /// [`Daemon::start_isolated`] with extra environment variables for the
    /// daemon (a fake clock through libfaketime, say).
    pub fn start_isolated_with_env(
        config: &Path,
        state_dir: &Path,
        env: &[(String, String)],
    ) -> Daemon {
        let args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--state-dir".to_string(),
            state_dir.display().to_string(),
        ];
        Self::spawn_with_env(&args, state_dir.to_path_buf(), env)
    }

    /// `sluice serve ARGS` with `state_dir` as its state directory.
    pub fn start_args(args: &[String], state_dir: PathBuf) -> Daemon {
        Self::spawn(args, state_dir)
    }

    fn spawn(args: &[String], state_dir: PathBuf) -> Daemon {
        Self::spawn_with_env(args, state_dir, &[])
    }

    fn spawn_with_env(args: &[String], state_dir: PathBuf, env: &[(String, String)]) -> Daemon {
        let mut child = dies_with_parent()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            // Tests run side by side: never the default's fixed DSP and
            // console ports.
            .args(["--dsp-listen", "127.0.0.1:0"])
            .args(["--console-listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning sluice serve");

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let (lines_tx, lines_rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let banner = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                banner.lock().unwrap().push_str(&format!("{line}\n"));
                // Once nobody listens, keep draining so the daemon never blocks on stdout.
                let _ = lines_tx.send(line);
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let mut addr = None;
        let mut metrics = None;
        while Instant::now() < deadline {
            match lines_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on grpc+tls://").nth(1) {
                        addr = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
                    } else if let Some(rest) = line.split("metrics on http://").nth(1) {
                        metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
                    } else if line.contains("DSP 2025-1 on ") {
                        // Its URL is read from the banner (`dsp_url`).
                    } else if addr.is_some() {
                        break; // the banner's next line: metrics would have come by now
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if addr.is_some() {
                        break;
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "sluice serve exited with {status}: {}",
                            stderr.lock().unwrap()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let Some(addr) = addr else {
            let _ = child.kill();
            panic!("sluice serve printed no banner: {}", stderr.lock().unwrap());
        };
        Daemon {
            child,
            addr,
            metrics,
            state_dir,
            stdout,
            stderr,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("grpc+tls://{}", self.addr)
    }

    pub fn pki(&self) -> PathBuf {
        self.state_dir.join("pki")
    }

    /// The DSP endpoint's root URL, `https://HOST:PORT`, from the banner.
    pub fn dsp_url(&self) -> String {
        let banner = self.banner();
        let rest = banner
            .split("DSP 2025-1 on ")
            .nth(1)
            .unwrap_or_else(|| panic!("no DSP endpoint in the banner: {banner}"));
        let url = rest.split_whitespace().next().unwrap();
        url.trim_end_matches("/dsp/2025-1").to_string()
    }

    /// An mTLS channel as demo identity `identity` (`planning` or `supplier`).
    pub async fn channel(&self, identity: &str) -> Channel {
        let pki = self.pki();
        self.channel_with(
            &pki.join("ca.pem"),
            &pki.join(format!("{identity}.pem")),
            &pki.join(format!("{identity}.key")),
        )
        .await
        .expect("connecting over mTLS")
    }

    /// A channel with explicit files; `Err` if the handshake fails.
    pub async fn channel_with(
        &self,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Channel, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
    }

    pub async fn client(&self, identity: &str) -> FlightSqlServiceClient<Channel> {
        FlightSqlServiceClient::new(self.channel(identity).await)
    }

    /// Sends SIGHUP (reload the usage policy).
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGKILL and reaps the process: a crash, no cleanup.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Everything the daemon printed to standard output so far (the banner).
    pub fn banner(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// `sluice serve` on the embedded demo with a state directory that does
    /// not exist yet: the first start of a newcomer.
    pub fn start_fresh(state_dir: &Path) -> Daemon {
        let args = vec!["--state-dir".to_string(), state_dir.display().to_string()];
        Self::spawn(&args, state_dir.to_path_buf())
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// GET a path on the metrics endpoint; returns (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        let addr = self.metrics.expect("the metrics endpoint is on");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo usage policy, as the source tree has it.
pub fn demo_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dev/demo_policy.yaml")
}

/// The open test policy: every demo column raw for both demo organizations.
pub fn open_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/open.yaml")
}

/// The gRPC status behind a Flight client error.
pub fn status(error: FlightError) -> tonic::Status {
    match error {
        FlightError::Tonic(status) => *status,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

/// The ticket of a FlightInfo's single endpoint.
pub fn ticket(info: &FlightInfo) -> Ticket {
    assert_eq!(info.endpoint.len(), 1, "one endpoint per query");
    info.endpoint[0]
        .ticket
        .clone()
        .expect("the endpoint has a ticket")
}

/// DoGet on the FlightInfo's ticket, collecting the stream's schema and batches.
pub async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: &FlightInfo,
) -> Result<(SchemaRef, Vec<RecordBatch>), FlightError> {
    let mut stream = client.do_get(ticket(info)).await?;
    let mut batches = Vec::new();
    while let Some(batch) = stream.try_next().await? {
        batches.push(batch);
    }
    let schema = stream
        .schema()
        .cloned()
        .ok_or_else(|| FlightError::ProtocolError("the stream carried no schema".into()))?;
    Ok((schema, batches))
}

/// GetFlightInfo + DoGet for a SQL statement.
pub async fn query(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> Result<(SchemaRef, Vec<RecordBatch>), FlightError> {
    let info = client.execute(sql.to_string(), None).await?;
    fetch(client, &info).await
}

/// Runs `sql` on plain in-process DataFusion over the same demo files.
pub async fn datafusion_answer(state_dir: &Path, sql: &str) -> Vec<RecordBatch> {
    use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
    let ctx = SessionContext::new();
    let data = state_dir.join("data");
    ctx.register_parquet(
        "trips",
        data.join("trips.parquet").to_str().unwrap(),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    ctx.register_csv(
        "machine_events",
        data.join("machine_events.csv").to_str().unwrap(),
        CsvReadOptions::new(),
    )
    .await
    .unwrap();
    ctx.register_json(
        "zones",
        data.join("zones.json").to_str().unwrap(),
        datafusion::prelude::JsonReadOptions::default(),
    )
    .await
    .unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// Batches rendered as text, for comparing values independent of batch boundaries.
pub fn render(batches: &[RecordBatch]) -> String {
    datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string()
}

pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// How a `sluice serve` that was expected to refuse to start ended.
pub struct Refused {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Runs `sluice serve --config CONFIG --state-dir STATE` expecting it to
/// refuse to start: panics if it starts listening, or has not exited
/// within a minute.
pub fn serve_refused(config: &Path, state_dir: &Path) -> Refused {
    let mut child = dies_with_parent()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sluice serve");
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        (text, reader)
    };
    let (stdout, out_reader) = collect(Box::new(child.stdout.take().unwrap()));
    let (stderr, err_reader) = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let started = stdout.lock().unwrap().contains("listening on");
        if started || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sluice serve {} instead of refusing to start:\n{}\n{}",
                if started {
                    "started"
                } else {
                    "ran for a minute"
                },
                stdout.lock().unwrap(),
                stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = (out_reader.join(), err_reader.join());
    let stdout = stdout.lock().unwrap().clone();
    assert!(
        !stdout.contains("listening on"),
        "sluice serve printed that it listens before it failed ({status}):\n{stdout}"
    );
    let stderr = stderr.lock().unwrap().clone();
    Refused { status, stderr }
}

/// A running `sluice worker` process (docs/deploy.md, "Distributed
/// execution"); killed when dropped.
pub struct Worker {
    child: Child,
    /// `https://127.0.0.1:PORT`, as a coordinator's `--worker` names it.
    pub url: String,
}

impl Worker {
    /// A worker on a free loopback port, with the development PKI of
    /// `state_dir` (its `worker` certificate, trusting its CA).
    pub fn start(state_dir: &Path) -> Worker {
        let mut child = dies_with_parent()
            .arg("worker")
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning sluice worker");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .expect("sluice worker printed no banner");
        let url = line
            .split("listening on ")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected worker banner: {line}"))
            .trim()
            .to_string();
        Worker { child, url }
    }

    /// `n` workers on the shared state directory's PKI.
    pub fn start_many(n: usize) -> Vec<Worker> {
        (0..n).map(|_| Worker::start(&shared_state_dir())).collect()
    }

    /// `--worker URL` for each of `workers`.
    pub fn args(workers: &[Worker]) -> Vec<String> {
        workers
            .iter()
            .flat_map(|w| ["--worker".to_string(), w.url.clone()])
            .collect()
    }

    /// SIGSTOP: it keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGKILL, and reaps it: its connections are reset.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// An mTLS channel to the worker with a certificate of `pki`.
    pub async fn channel_as(&self, pki: &Path, name: &str) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(pki.join("ca.pem")).unwrap(),
            ))
            .identity(Identity::from_pem(
                std::fs::read(pki.join(format!("{name}.pem"))).unwrap(),
                std::fs::read(pki.join(format!("{name}.key"))).unwrap(),
            ))
            .domain_name("localhost");
        Endpoint::from_shared(self.url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connecting to the worker over mTLS")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the shared state directory's PKI into `state_dir`, so that a
/// deployment of its own trusts the same workers.
pub fn share_pki(state_dir: &Path) {
    let from = shared_state_dir().join("pki");
    let to = state_dir.join("pki");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The neighbouring-datasets check at ε = ln 3 on two samples of answers
/// (true values `low + 3` and `low + 4`), in six bins (≤ low, …, ≥ low + 5).
/// By Weissman's inequality, ‖p̂ − p‖₁ ≥ t with probability at most
/// (2^k − 2)·e^(−n t²/2), so with t for a false-alarm rate of 1e-7 per
/// sample, δ̂ ≤ δ + t·(1 + e^ε) always holds but for 2e-7. An answer without
/// noise (δ̂ = 1) fails it.
pub fn assert_within_ln3(a: &[i64], b: &[i64], low: i64) {
    let bins = 6;
    let n = a.len().min(b.len());
    let histogram = |sample: &[i64]| {
        let mut p = vec![0.0; bins];
        for v in sample {
            p[((*v).clamp(low, low + 5) - low) as usize] += 1.0 / sample.len() as f64;
        }
        p
    };
    let (p, q) = (histogram(a), histogram(b));
    let e = 3.0f64;
    let one_way =
        |p: &[f64], q: &[f64]| -> f64 { p.iter().zip(q).map(|(p, q)| (p - e * q).max(0.0)).sum() };
    let delta = one_way(&p, &q).max(one_way(&q, &p));
    let t = (2.0 * ((2f64.powi(bins as i32) - 2.0).ln() + 1e7f64.ln()) / n as f64).sqrt();
    let limit = t * (1.0 + e);
    assert!(limit < 1.0, "the test must be able to fail: limit {limit}");
    assert!(
        delta <= limit,
        "estimated δ = {delta} > {limit} at ε = ln 3 (p = {p:?}, q = {q:?})"
    );
}

/// Column `column` of `batches` as f64 (every value non-null).
pub fn floats(batches: &[RecordBatch], column: usize) -> Vec<f64> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{DataType, Float64Type};
    batches
        .iter()
        .flat_map(|b| {
            let c = datafusion::arrow::compute::cast(b.column(column), &DataType::Float64).unwrap();
            c.as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The ε the caller of `channel` has spent on `dataset`.
pub async fn spent(channel: Channel, dataset: &str) -> f64 {
    let response = sluice_proto::v1::budget_service_client::BudgetServiceClient::new(channel)
        .get_budget(sluice_proto::v1::GetBudgetRequest {
            dataset: dataset.into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.budgets.first().map_or(0.0, |b| b.epsilon_spent)
}
