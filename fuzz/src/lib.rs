//! What the fuzz targets share: a scratch directory in memory, and a demo
//! connector built once per fuzzing process the way `sluice serve` builds
//! it (`App::build` on the embedded default config), over small copies of
//! the demo datasets, with the demo usage policy, the demo principals and an
//! approved agreement for the research institute. The audit log is switched
//! off (the `ServeHooks::audit_off` embedding hook): its records would grow
//! without bound over a campaign; the entries are still built.
//!
//! Nothing here executes a query: the targets plan, decide and rewrite.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use sluice::config::Config;
use sluice::dev::{self, DEMO_CLIENTS, demo};
use sluice::query::QueryEngine;
use sluice::server::{App, ServeHooks};
use sluice::state::StateDir;
use sluice_policy::Principal;

/// Rows of the small demo datasets: enough for Parquet statistics and CSV
/// schema checks, small enough to write in well under a second.
pub const TRIPS_ROWS: usize = 2_000;
pub const MACHINE_EVENTS_ROWS: usize = 500;

/// A directory for the whole process, in memory (`/dev/shm`) when there is
/// one: targets write a file per input there. libFuzzer leaves by `exit`,
/// which drops no statics, so each process names its directory by its pid
/// and removes those of processes that are gone.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        if let Ok(entries) = std::fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("sluice-fuzz-")) else {
                    continue;
                };
                let alive = pid
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if !alive {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = base.join(format!("sluice-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    })
}

/// The runtime everything async runs on: like the daemon's query runtime,
/// with 256 MiB thread stacks (the limits on one query assume them).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fuzz-query")
            .thread_stack_size(256 << 20)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Runs `fut` on a worker of [`runtime`] (never on libFuzzer's thread, whose
/// stack is the main thread's) and waits for it. A panic inside is resumed
/// here, so libFuzzer reports it as a crash.
pub fn run<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = runtime();
    match rt.block_on(rt.spawn(fut)) {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("fuzz task cancelled: {e}"),
    }
}

/// The demo connector: its engine and where its state lives.
pub struct Demo {
    pub engine: Arc<QueryEngine>,
    pub config: Config,
    pub state_dir: PathBuf,
    _app: App,
}

/// The demo connector, built on first use.
pub fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| build_demo().expect("the demo connector builds"))
}

/// `sluice init` with small datasets: the development PKI and masking key
/// (`dev::prepare` without demo data), then the three demo datasets with
/// fewer rows and the demo usage policy.
pub fn prepare_small_demo(root: &Path) -> anyhow::Result<Config> {
    let state = StateDir::new(root);
    dev::prepare(&state, false)?;
    let data = state.data_dir();
    std::fs::create_dir_all(&data)?;
    demo::write_trips(&data.join("trips.parquet"), demo::TRIPS_SEED, TRIPS_ROWS)?;
    demo::write_zones(&data.join("zones.json"))?;
    demo::write_machine_events(
        &data.join("machine_events.csv"),
        demo::MACHINE_EVENTS_SEED,
        MACHINE_EVENTS_ROWS,
        &demo::MANUFACTURERS,
    )?;
    std::fs::write(root.join("policy.yaml"), demo::DEMO_POLICY)?;
    Ok(Config::embedded_default(root))
}

fn build_demo() -> anyhow::Result<Demo> {
    let state_dir = scratch().join("demo");
    let config = prepare_small_demo(&state_dir)?;
    let hooks = ServeHooks {
        audit_off: true,
        ..ServeHooks::default()
    };
    let build_config = config.clone();
    let app =
        run(
            async move { App::build(build_config, tokio::runtime::Handle::current(), hooks).await },
        )?;
    let engine = app.engine().clone();
    approve_research_agreement(&engine)?;
    Ok(Demo {
        engine,
        config,
        state_dir,
        _app: app,
    })
}

/// The research institute's queries need an approved agreement for offer
/// `trips/city-research` (as in the README walk-through).
fn approve_research_agreement(engine: &QueryEngine) -> anyhow::Result<()> {
    let research = principal(2);
    let admin = principal(3);
    let gate = engine.policy().current();
    let policy = gate
        .policy_set()
        .ok_or_else(|| anyhow::anyhow!("the demo policy is not a policy set"))?;
    let offer = policy
        .offer(&research, "trips/city-research")
        .ok_or_else(|| anyhow::anyhow!("the demo policy has no offer trips/city-research"))?;
    let now = SystemTime::now();
    let organization = sluice::audit::organization_key(&research);
    let agreement =
        engine
            .agreements()
            .request(&offer, &organization, &research.id, "research", now)?;
    engine
        .agreements()
        .approve(&agreement.id, &offer, &admin.id, "fuzzing", now)?;
    Ok(())
}

/// A principal chosen by `selector`, as the certificate interceptor derives
/// it: the four demo organizations, a stranger no rule admits, and the city
/// planning agency relayed by a broker the demo policy does not trust.
pub fn principal(selector: u8) -> Principal {
    match selector % 6 {
        n @ 0..=3 => {
            let client = &DEMO_CLIENTS[n as usize];
            Principal {
                id: client.uri.to_string(),
                organization: Some(client.organization.to_string()),
                common_name: Some(client.common_name.to_string()),
                san_uris: vec![client.uri.to_string()],
                via: None,
            }
        }
        4 => Principal {
            id: "spiffe://elsewhere.example/org/stranger".into(),
            organization: Some("Stranger Ltd".into()),
            common_name: Some("stranger".into()),
            san_uris: vec!["spiffe://elsewhere.example/org/stranger".into()],
            via: None,
        },
        _ => principal(0).relayed_by(Principal {
            id: "spiffe://broker.example/broker".into(),
            organization: Some("Broker".into()),
            common_name: Some("broker".into()),
            san_uris: vec!["spiffe://broker.example/broker".into()],
            via: None,
        }),
    }
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a target writes its generated seeds when the environment names a
/// directory (`SLUICE_FUZZ_SEEDS=fuzz/seeds/<target>`, see
/// `tests/fuzz.sh --seeds`); `None` on an ordinary run.
pub fn seed_dir() -> Option<PathBuf> {
    std::env::var_os("SLUICE_FUZZ_SEEDS").map(PathBuf::from)
}

/// Writes one seed named by the SHA-1 of its content, as libFuzzer names
/// corpus files.
pub fn write_seed(dir: &Path, data: &[u8]) {
    std::fs::create_dir_all(dir).expect("the seed directory");
    let name = to_hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data).as_ref());
    std::fs::write(dir.join(name), data).expect("writing a seed");
}

/// `selector` followed by `rest`.
pub fn with_selector(selector: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push(selector);
    out.extend_from_slice(rest);
    out
}
