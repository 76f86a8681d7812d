//! `broker.toml`: where the broker listens, whom it serves, which providers
//! it relays to, and which federated tables it offers.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:50090"
//!
//! [tls]                      # serving consumers (mTLS)
//! cert = "pki/broker-server.pem"
//! key = "pki/broker-server.key"
//! client_ca = "pki/ca.pem"
//!
//! [upstream]                 # connecting to providers
//! cert = "pki/broker.pem"    # the broker's identity at providers; its key
//! key = "pki/broker.key"     # also signs the on-behalf-of assertions
//! ca = "pki/ca.pem"          # CA of the providers' server certificates
//! timeout = "10s"
//!
//! [access]                   # who may ask through the broker (deny by default)
//! consumers = [{ organization = "City Planning Agency" }]
//!
//! [[providers]]
//! name = "north"
//! endpoint = "grpc+tls://127.0.0.1:50091"
//!
//! [[federated]]
//! name = "trips"
//! sources = { north = "trips", south = "trips" }
//! ```
//!
//! Relative paths are resolved against the file's directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sluice_policy::document::Matcher;

use crate::config::{
    ConfigError, LogConfig, LogFormat, Source, TlsConfig, ValueError, absolute, deserialize_toml,
    parse_addr, parse_duration,
};

/// The validated broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub source: Source,
    pub listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// Serving consumers.
    pub tls: TlsConfig,
    pub upstream: Upstream,
    /// Consumers allowed to use the broker; a caller matching none is refused.
    pub consumers: Vec<Matcher>,
    pub providers: Vec<Provider>,
    pub federated: Vec<FederatedTable>,
    pub log: LogConfig,
}

/// How the broker reaches providers.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Default per-provider timeout for one partial query, planning to last
    /// row.
    pub timeout: Duration,
    /// Most rows one provider's partial result may have.
    pub max_rows: usize,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    /// `grpc+tls://host:port`.
    pub endpoint: String,
    pub timeout: Duration,
    /// TLS server name to expect, when it differs from the endpoint's host.
    pub domain: Option<String>,
}

/// A name the broker answers for: the same-schema datasets at several
/// providers.
#[derive(Debug, Clone)]
pub struct FederatedTable {
    pub name: String,
    pub description: Option<String>,
    /// Provider name → dataset name at that provider, in configuration order
    /// of the providers.
    pub sources: Vec<(String, String)>,
}

impl BrokerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_str(&crate::config::read_file(path)?, path)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let source = Source::File(absolute(path));
        let base = absolute(path.parent().unwrap_or(Path::new(".")));
        let raw: RawBroker = deserialize_toml(text, &source)?;
        validate(raw, source, &base)
    }

    /// The federated table called `name` (case-insensitive, as SQL
    /// identifiers are).
    pub fn table(&self, name: &str) -> Option<&FederatedTable> {
        self.federated
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// Every file the broker reads at start, with the field naming it.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        let files = [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
            ("upstream.cert", &self.upstream.cert),
            ("upstream.key", &self.upstream.key),
            ("upstream.ca", &self.upstream.ca),
        ];
        for (field, path) in files {
            if !path.is_file() {
                return Err(ConfigError {
                    source_name: self.source.to_string(),
                    field: field.into(),
                    reason: format!("{} does not exist or is not a file", path.display()),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    #[serde(default)]
    server: RawServer,
    tls: RawTls,
    upstream: RawUpstream,
    access: RawAccess,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    federated: Vec<RawFederated>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    timeout: Option<String>,
    max_rows: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    consumers: Vec<Matcher>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    endpoint: String,
    timeout: Option<String>,
    domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederated {
    name: String,
    description: Option<String>,
    sources: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

pub const DEFAULT_BROKER_LISTEN: &str = "127.0.0.1:50090";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_ROWS: usize = 1_000_000;

fn validate(raw: RawBroker, source: Source, base: &Path) -> Result<BrokerConfig, ConfigError> {
    let err = |field: String, reason: String| ConfigError {
        source_name: source.to_string(),
        field,
        reason,
    };
    let resolve = |p: &Path| crate::config::resolve_against(base, p);
    let listen = parse_addr(
        raw.server
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_BROKER_LISTEN),
    )
    .map_err(|r| err("server.listen".into(), r.to_string()))?;
    let shutdown_grace = match &raw.server.shutdown_grace {
        Some(s) => {
            parse_duration(s).map_err(|r| err("server.shutdown_grace".into(), r.to_string()))?
        }
        None => Duration::from_secs(30),
    };
    let timeout = match &raw.upstream.timeout {
        Some(s) => positive(s).map_err(|r| err("upstream.timeout".into(), r.to_string()))?,
        None => DEFAULT_TIMEOUT,
    };
    let max_rows = raw.upstream.max_rows.unwrap_or(DEFAULT_MAX_ROWS);
    if max_rows == 0 {
        return Err(err("upstream.max_rows".into(), "must be at least 1".into()));
    }
    if raw.access.consumers.is_empty() {
        return Err(err(
            "access.consumers".into(),
            "list at least one consumer matcher; the broker serves nobody by default".into(),
        ));
    }
    for (i, m) in raw.access.consumers.iter().enumerate() {
        if m.group.is_some() {
            return Err(err(
                format!("access.consumers[{i}].group"),
                "the broker has no groups; match on organization, san_uri or common_name".into(),
            ));
        }
        if m.organization.is_none() && m.san_uri.is_none() && m.common_name.is_none() {
            return Err(err(
                format!("access.consumers[{i}]"),
                "give organization, san_uri or common_name; an empty matcher would admit everyone"
                    .into(),
            ));
        }
    }
    let mut providers: Vec<Provider> = Vec::new();
    for (i, p) in raw.providers.into_iter().enumerate() {
        let field = format!("providers[{i}]");
        if p.name.trim().is_empty() || providers.iter().any(|have| have.name == p.name) {
            return Err(err(
                format!("{field}.name"),
                format!("`{}` is empty or names another provider too", p.name),
            ));
        }
        if !(p.endpoint.starts_with("grpc+tls://") || p.endpoint.starts_with("https://")) {
            return Err(err(
                format!("{field}.endpoint"),
                format!(
                    "`{}` must start with grpc+tls:// (providers are reached over mTLS)",
                    p.endpoint
                ),
            ));
        }
        let timeout = match &p.timeout {
            Some(s) => positive(s).map_err(|r| err(format!("{field}.timeout"), r.to_string()))?,
            None => timeout,
        };
        providers.push(Provider {
            name: p.name,
            endpoint: p.endpoint,
            timeout,
            domain: p.domain,
        });
    }
    if providers.is_empty() {
        return Err(err(
            "providers".into(),
            "configure at least one [[providers]] entry".into(),
        ));
    }
    let mut federated: Vec<FederatedTable> = Vec::new();
    for (i, t) in raw.federated.into_iter().enumerate() {
        let field = format!("federated[{i}]");
        if !is_identifier(&t.name) {
            return Err(err(
                format!("{field}.name"),
                format!(
                    "`{}` is not a plain SQL identifier (letters, digits, _)",
                    t.name
                ),
            ));
        }
        if federated
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case(&t.name))
        {
            return Err(err(
                format!("{field}.name"),
                format!("another federated table is named `{}`", t.name),
            ));
        }
        if t.sources.is_empty() {
            return Err(err(
                format!("{field}.sources"),
                "map at least one provider to its dataset, e.g. { north = \"trips\" }".into(),
            ));
        }
        for (provider, dataset) in &t.sources {
            if !providers.iter().any(|p| &p.name == provider) {
                return Err(err(
                    format!("{field}.sources.{provider}"),
                    format!("no [[providers]] entry is named `{provider}`"),
                ));
            }
            if !is_identifier(dataset) {
                return Err(err(
                    format!("{field}.sources.{provider}"),
                    format!("`{dataset}` is not a plain SQL identifier"),
                ));
            }
        }
        // Keep the providers' configured order: it is the order of
        // provenance and error messages.
        let sources = providers
            .iter()
            .filter_map(|p| Some((p.name.clone(), t.sources.get(&p.name)?.clone())))
            .collect();
        federated.push(FederatedTable {
            name: t.name,
            description: t.description,
            sources,
        });
    }
    if federated.is_empty() {
        return Err(err(
            "federated".into(),
            "configure at least one [[federated]] table".into(),
        ));
    }
    Ok(BrokerConfig {
        source,
        listen,
        shutdown_grace,
        tls: TlsConfig {
            cert: resolve(&raw.tls.cert),
            key: resolve(&raw.tls.key),
            client_ca: resolve(&raw.tls.client_ca),
        },
        upstream: Upstream {
            cert: resolve(&raw.upstream.cert),
            key: resolve(&raw.upstream.key),
            ca: resolve(&raw.upstream.ca),
            timeout,
            max_rows,
        },
        consumers: raw.access.consumers,
        providers,
        federated,
        log: LogConfig {
            format: raw.log.format.unwrap_or(LogFormat::Text),
            level: raw.log.level.unwrap_or_else(|| "info".into()),
        },
    })
}

/// The longest provider timeout: a query's on-behalf-of assertion must
/// still hold when its last upstream call starts.
const MAX_TIMEOUT: Duration =
    Duration::from_secs(crate::relay::ASSERTION_LIFETIME_SECS as u64 - 60);

/// A provider timeout that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error(
        "at most {}s: the on-behalf-of assertion made for a query holds {}s",
        MAX_TIMEOUT.as_secs(),
        crate::relay::ASSERTION_LIFETIME_SECS
    )]
    TooLong,
}

/// A provider timeout: above zero, and short enough that the on-behalf-of
/// assertion made at the start of a query still holds at its end.
fn positive(s: &str) -> Result<Duration, TimeoutError> {
    let d = parse_duration(s)?;
    if d > MAX_TIMEOUT {
        return Err(TimeoutError::TooLong);
    }
    Ok(d)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A valid configuration (north and south, federated `trips`), for tests.
#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"
[tls]
cert = "s.pem"
key = "s.key"
client_ca = "ca.pem"
[upstream]
cert = "b.pem"
key = "b.key"
ca = "ca.pem"
timeout = "5s"
[access]
consumers = [{ organization = "City Planning" }]
[[providers]]
name = "north"
endpoint = "grpc+tls://127.0.0.1:1"
[[providers]]
name = "south"
endpoint = "grpc+tls://127.0.0.1:2"
timeout = "2s"
[[federated]]
name = "trips"
sources = { south = "trips_s", north = "trips" }
"#;

/// [`EXAMPLE`], loaded as if from `/etc/sluice/broker.toml`.
#[cfg(test)]
pub(crate) fn example() -> BrokerConfig {
    BrokerConfig::from_toml_str(EXAMPLE, Path::new("/etc/sluice/broker.toml")).unwrap()
}

/// A config whose one provider (`slow`, timeout 400ms) is at `port`, with
/// a throwaway identity written to `dir`, for tests that start a broker.
#[cfg(test)]
pub(crate) fn with_files(dir: &Path, port: u16) -> BrokerConfig {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let text = format!(
        r#"
[tls]
cert = "cert.pem"
key = "key.pem"
client_ca = "cert.pem"
[upstream]
cert = "cert.pem"
key = "key.pem"
ca = "cert.pem"
timeout = "400ms"
[access]
consumers = [{{ organization = "x" }}]
[[providers]]
name = "slow"
endpoint = "grpc+tls://127.0.0.1:{port}"
[[federated]]
name = "t"
sources = {{ slow = "t" }}
"#
    );
    BrokerConfig::from_toml_str(&text, &dir.join("broker.toml")).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = EXAMPLE;

    fn load(text: &str) -> Result<BrokerConfig, ConfigError> {
        BrokerConfig::from_toml_str(text, Path::new("/etc/sluice/broker.toml"))
    }

    #[test]
    fn a_good_file_loads_with_paths_resolved_and_providers_in_order() {
        let cfg = load(GOOD).unwrap();
        assert_eq!(cfg.tls.cert, PathBuf::from("/etc/sluice/s.pem"));
        assert_eq!(cfg.providers[1].timeout, Duration::from_secs(2));
        assert_eq!(cfg.providers[0].timeout, Duration::from_secs(5));
        let trips = cfg.table("TRIPS").unwrap();
        assert_eq!(
            trips.sources,
            vec![
                ("north".to_string(), "trips".to_string()),
                ("south".to_string(), "trips_s".to_string())
            ]
        );
    }

    #[test]
    fn mistakes_name_their_field() {
        for (from, to, field) in [
            (
                "south = \"trips_s\"",
                "west = \"x\"",
                "federated[0].sources.west",
            ),
            ("timeout = \"5s\"", "timeout = \"0s\"", "upstream.timeout"),
            // The on-behalf-of assertion would expire mid-query.
            (
                "timeout = \"2s\"",
                "timeout = \"5m\"",
                "providers[1].timeout",
            ),
            (
                "consumers = [{ organization = \"City Planning\" }]",
                "consumers = [{}]",
                "access.consumers[0]",
            ),
            (
                "grpc+tls://127.0.0.1:1",
                "http://127.0.0.1:1",
                "providers[0].endpoint",
            ),
            (
                "name = \"trips\"",
                "name = \"trips; drop\"",
                "federated[0].name",
            ),
            ("[access]", "[acces]", "acces"),
        ] {
            let text = GOOD.replace(from, to);
            let e = load(&text).unwrap_err();
            assert!(e.field.contains(field), "{to}: {e}");
        }
    }
}
