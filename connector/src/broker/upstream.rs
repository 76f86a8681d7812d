//! The broker's side of each provider connection: one partial query, with
//! the end consumer's identity asserted, a deadline, and the provider's
//! receipt kept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::{FlightDescriptor, Ticket};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use prost::Message;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::{BrokerConfig, Provider};
use sluice_proto::wire::header;

/// Why the broker cannot set up its connection to a provider.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    /// One of the broker's own TLS files (upstream.ca, .cert, .key) cannot
    /// be read.
    #[error("reading {field} {}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Endpoint(#[from] crate::client::PlaintextEndpoint),
    /// tonic refused the URI or the TLS settings.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// A provider the broker can ask, over a lazily connected mTLS channel (a
/// provider that is down at start does not stop the broker).
pub struct ProviderClient {
    pub name: String,
    client: FlightServiceClient<Channel>,
    timeout: Duration,
    max_rows: usize,
}

/// Headers every upstream call of one query carries.
#[derive(Debug, Clone)]
pub struct RelayHeaders {
    /// The signed on-behalf-of assertion.
    pub on_behalf_of: AsciiMetadataValue,
    pub purpose: Option<AsciiMetadataValue>,
    pub epsilon: Option<AsciiMetadataValue>,
}

impl RelayHeaders {
    fn apply(&self, metadata: &mut MetadataMap) {
        metadata.insert(header::ON_BEHALF_OF, self.on_behalf_of.clone());
        if let Some(p) = &self.purpose {
            metadata.insert(header::PURPOSE, p.clone());
        }
        if let Some(e) = &self.epsilon {
            metadata.insert(header::EPSILON, e.clone());
        }
    }
}

/// One provider's answer to its partial query.
#[derive(Debug, Clone)]
pub struct PartialAnswer {
    pub provider: String,
    pub dataset: String,
    /// The schema as streamed (with the provider's noise metadata).
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The provider's `x-sluice-receipt` header, when it sent one.
    pub receipt: Option<String>,
}

impl PartialAnswer {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Why a provider contributed nothing.
#[derive(Debug, Clone)]
pub struct ProviderFailure {
    pub provider: String,
    pub code: tonic::Code,
    pub message: String,
}

impl ProviderClient {
    pub fn new(config: &BrokerConfig, provider: &Provider) -> Result<Self, UpstreamSetupError> {
        let read = |path: &Path, field: &'static str| {
            std::fs::read(path).map_err(|source| UpstreamSetupError::Read {
                field,
                path: path.to_path_buf(),
                source,
            })
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(
                &config.upstream.ca,
                "upstream.ca",
            )?))
            .identity(Identity::from_pem(
                read(&config.upstream.cert, "upstream.cert")?,
                read(&config.upstream.key, "upstream.key")?,
            ));
        if let Some(domain) = &provider.domain {
            tls = tls.domain_name(domain.clone());
        }
        let uri = crate::client::dial_uri(&provider.endpoint)?;
        let channel = Endpoint::from_shared(uri)?
            .tls_config(tls)?
            .tcp_nodelay(true)
            .connect_timeout(provider.timeout.min(Duration::from_secs(10)))
            .connect_lazy();
        Ok(Self {
            name: provider.name.clone(),
            client: FlightServiceClient::new(channel).max_decoding_message_size(64 << 20),
            timeout: provider.timeout,
            max_rows: config.upstream.max_rows,
        })
    }

    /// Runs `sql` against `dataset` at this provider, within its timeout.
    pub async fn run(
        &self,
        dataset: &str,
        sql: &str,
        headers: &RelayHeaders,
    ) -> Result<PartialAnswer, ProviderFailure> {
        match tokio::time::timeout(self.timeout, self.ask(dataset, sql, headers)).await {
            Ok(result) => result,
            Err(_) => Err(self.failure(
                tonic::Code::DeadlineExceeded,
                format!("did not answer within {:?}", self.timeout),
            )),
        }
    }

    async fn ask(
        &self,
        dataset: &str,
        sql: &str,
        headers: &RelayHeaders,
    ) -> Result<PartialAnswer, ProviderFailure> {
        let mut client = self.client.clone();
        let command = CommandStatementQuery {
            query: sql.to_string(),
            transaction_id: None,
        };
        let mut request =
            tonic::Request::new(FlightDescriptor::new_cmd(command.as_any().encode_to_vec()));
        headers.apply(request.metadata_mut());
        let info = client
            .get_flight_info(request)
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        let announced = info
            .clone()
            .try_decode_schema()
            .map_err(|e| self.failure(tonic::Code::Internal, format!("sent a bad schema: {e}")))?;
        let mut answer = PartialAnswer {
            provider: self.name.clone(),
            dataset: dataset.to_string(),
            schema: std::sync::Arc::new(announced),
            batches: Vec::new(),
            receipt: None,
        };
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.ok_or_else(|| {
                self.failure(
                    tonic::Code::Internal,
                    "sent an endpoint without a ticket".into(),
                )
            })?;
            self.fetch(&mut client, ticket, headers, &mut answer)
                .await?;
        }
        Ok(answer)
    }

    async fn fetch(
        &self,
        client: &mut FlightServiceClient<Channel>,
        ticket: Ticket,
        headers: &RelayHeaders,
        answer: &mut PartialAnswer,
    ) -> Result<(), ProviderFailure> {
        let mut request = tonic::Request::new(ticket);
        headers.apply(request.metadata_mut());
        let response = client.do_get(request).await.map_err(|s| self.refused(s))?;
        if let Some(receipt) = response
            .metadata()
            .get(header::RECEIPT)
            .and_then(|v| v.to_str().ok())
        {
            answer.receipt = Some(receipt.to_string());
        }
        let mut stream = FlightRecordBatchStream::new_from_flight_data(
            response.into_inner().map_err(FlightError::from),
        );
        while let Some(batch) = stream.try_next().await.map_err(|e| match e {
            FlightError::Tonic(status) => self.refused(*status),
            other => self.failure(tonic::Code::Internal, format!("sent bad data: {other}")),
        })? {
            answer.batches.push(batch);
            if answer.rows() > self.max_rows {
                return Err(self.failure(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "returned more than {} rows (upstream.max_rows)",
                        self.max_rows
                    ),
                ));
            }
        }
        if let Some(schema) = stream.schema() {
            answer.schema = schema.clone();
        }
        Ok(())
    }

    fn refused(&self, status: tonic::Status) -> ProviderFailure {
        self.failure(status.code(), status.message().to_string())
    }

    fn failure(&self, code: tonic::Code, message: String) -> ProviderFailure {
        ProviderFailure {
            provider: self.name.clone(),
            code,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::broker::config::with_files as config;

    fn headers() -> RelayHeaders {
        RelayHeaders {
            on_behalf_of: AsciiMetadataValue::from_static("v1.x.y"),
            purpose: None,
            epsilon: None,
        }
    }

    #[tokio::test]
    async fn a_provider_that_never_answers_fails_with_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        // Accepts connections (the kernel does) and never speaks TLS.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = config(dir.path(), silent.local_addr().unwrap().port());
        let client = ProviderClient::new(&cfg, &cfg.providers[0]).unwrap();
        let started = Instant::now();
        let failure = client.run("t", "SELECT 1", &headers()).await.unwrap_err();
        assert_eq!(failure.code, tonic::Code::DeadlineExceeded);
        assert_eq!(failure.provider, "slow");
        assert!(
            failure.message.contains("did not answer within 400ms"),
            "{}",
            failure.message
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_provider_that_is_down_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = config(dir.path(), port);
        let client = ProviderClient::new(&cfg, &cfg.providers[0]).unwrap();
        let failure = client.run("t", "SELECT 1", &headers()).await.unwrap_err();
        assert_eq!(
            failure.code,
            tonic::Code::Unavailable,
            "{}",
            failure.message
        );
    }
}
