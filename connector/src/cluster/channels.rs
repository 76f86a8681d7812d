//! How the coordinator reaches its workers: mTLS channels presenting the
//! coordinator's certificate, and which workers are answering.
//!
//! A worker that stops answering is left out of the next queries' stages
//! until it answers again: a probe runs every `cluster.probe_interval`, and
//! at once when a query fails. The probe is a `GetWorkerInfo` call over
//! the same mTLS channel queries use, within [`CONNECT_TIMEOUT`]: a worker
//! that is stalled, presents a certificate the coordinator does not accept,
//! refuses the coordinator's, or runs another build (its version is not
//! [`build_fingerprint`]: a different hash seed or function would change
//! answers, and could split a privacy unit's rows between partitions) is
//! left out.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{
    ChannelResolver, GetWorkerInfoRequest, WorkerChannel, WorkerResolver,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use url::Url;

use super::ClusterError;

/// How long a probe or a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a worker reports as its version, and what the coordinator requires:
/// the Sluice and DataFusion versions and the worker session's functions.
pub fn build_fingerprint(functions: &super::cut::Functions) -> String {
    format!(
        "sluice {} datafusion {} functions {}",
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
        functions.fingerprint()
    )
}
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Channels to the workers over mTLS, one per worker, reused by every query.
#[derive(Clone)]
pub struct Channels {
    tls: ClientTlsConfig,
    open: Arc<Mutex<HashMap<Url, Channel>>>,
}

impl Channels {
    pub fn new(cert: &Path, key: &Path, worker_ca: &Path) -> Result<Self, ClusterError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| ClusterError::Tls {
                file: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(worker_ca)?))
            .identity(Identity::from_pem(read(cert)?, read(key)?));
        Ok(Self {
            tls,
            open: Arc::default(),
        })
    }

    fn channel(&self, url: &Url) -> Result<Channel, DataFusionError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = open.get(url) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .and_then(|e| e.tls_config(self.tls.clone()))
            .map_err(|e| {
                DataFusionError::Configuration(format!("worker {url} cannot be reached: {e}"))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE);
        // Connects on first use and reconnects after a failure.
        let channel = endpoint.connect_lazy();
        open.insert(url.clone(), channel.clone());
        Ok(channel)
    }
}

#[async_trait]
impl ChannelResolver for Channels {
    async fn get_worker_client_for_url(
        &self,
        url: &Url,
    ) -> Result<Box<dyn WorkerChannel>, DataFusionError> {
        let channel = self.channel(url)?;
        Ok(create_worker_client(BoxCloneSyncChannel::new(channel)))
    }
}

/// The configured workers and which of them did not answer the last probe.
pub struct Workers {
    all: Vec<Url>,
    down: Mutex<BTreeSet<Url>>,
    channels: Channels,
    /// The version a worker must report ([`build_fingerprint`]).
    version: String,
}

impl Workers {
    pub fn new(all: Vec<Url>, channels: Channels, version: String) -> Self {
        Self {
            all,
            down: Mutex::default(),
            channels,
            version,
        }
    }

    /// `cluster.workers[i]`: how errors name a worker to consumers (its
    /// address is the provider's own).
    pub fn name(&self, url: &Url) -> String {
        match self.all.iter().position(|u| u == url) {
            Some(i) => format!("cluster.workers[{i}]"),
            None => "a worker".into(),
        }
    }

    pub fn all(&self) -> &[Url] {
        &self.all
    }

    /// The workers that answered the last probe.
    pub fn live(&self) -> Vec<Url> {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        self.all
            .iter()
            .filter(|u| !down.contains(*u))
            .cloned()
            .collect()
    }

    /// Probes every worker now; returns those that do not answer.
    pub async fn probe(&self) -> Vec<Url> {
        let probes = self.all.iter().map(|url| async move {
            let answered = self.check(url).await;
            (url.clone(), answered)
        });
        let results = futures::future::join_all(probes).await;
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let mut unreachable = Vec::new();
        for (url, answered) in results {
            match answered {
                Ok(()) => {
                    if down.remove(&url) {
                        tracing::info!(worker = %url, "worker answers again");
                    }
                }
                Err(why) => {
                    if down.insert(url.clone()) {
                        tracing::warn!(worker = %url, %why, "worker does not answer: left out of new queries");
                    }
                    unreachable.push(url);
                }
            }
        }
        unreachable
    }

    /// One worker answers, over mTLS, as the same build.
    async fn check(&self, url: &Url) -> Result<(), ProbeFailure> {
        let info = async {
            let mut client = self
                .channels
                .get_worker_client_for_url(url)
                .await
                .map_err(|e| e.to_string())?;
            client
                .get_worker_info(GetWorkerInfoRequest {})
                .await
                .map_err(|e| e.to_string())
        };
        let info = tokio::time::timeout(CONNECT_TIMEOUT, info)
            .await
            .map_err(|_| ProbeFailure(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(ProbeFailure)?;
        if info.version != self.version {
            return Err(ProbeFailure(format!(
                "it runs `{}`, this connector `{}`: run the same release everywhere",
                info.version, self.version
            )));
        }
        Ok(())
    }
}

/// Why a worker is left out, for the log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProbeFailure(String);

/// The workers one query's stages are routed to: fixed when the query is
/// planned, so that the task count and the routing agree.
pub struct Routing(pub Vec<Url>);

impl WorkerResolver for Routing {
    fn get_urls(&self) -> Result<Vec<Url>, DataFusionError> {
        Ok(self.0.clone())
    }
}
