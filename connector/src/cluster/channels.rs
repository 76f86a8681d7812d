//! How the coordinator reaches its workers: mTLS channels presenting the
//! coordinator's certificate, and which workers are answering.
//!
//! A worker that stops answering is left out of the next queries' stages
//! until it answers again: a probe (a TCP connection) runs every
//! [`PROBE_INTERVAL`], and at once when a query fails.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{ChannelResolver, WorkerChannel, WorkerResolver};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use url::Url;

use super::ClusterError;

/// How often every worker is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a probe or a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
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
#[derive(Debug)]
pub struct Workers {
    all: Vec<Url>,
    down: Mutex<BTreeSet<Url>>,
}

impl Workers {
    pub fn new(all: Vec<Url>) -> Self {
        Self {
            all,
            down: Mutex::default(),
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
            let answered = reachable(url).await;
            (url.clone(), answered)
        });
        let results = futures::future::join_all(probes).await;
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let mut unreachable = Vec::new();
        for (url, answered) in results {
            if answered {
                if down.remove(&url) {
                    tracing::info!(worker = %url, "worker answers again");
                }
            } else {
                if down.insert(url.clone()) {
                    tracing::warn!(worker = %url, "worker does not answer: left out of new queries");
                }
                unreachable.push(url);
            }
        }
        unreachable
    }
}

async fn reachable(url: &Url) -> bool {
    let (Some(host), Some(port)) = (url.host_str(), url.port()) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    matches!(
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host, port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// The workers one query's stages are routed to: fixed when the query is
/// planned, so that the task count and the routing agree.
pub struct Routing(pub Vec<Url>);

impl WorkerResolver for Routing {
    fn get_urls(&self) -> Result<Vec<Url>, DataFusionError> {
        Ok(self.0.clone())
    }
}
