//! A small Flight SQL client over mTLS, used by the `sluice` CLI and the
//! benchmark. It speaks the same wire protocol as any other client.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use sluice::client::{Connection, TlsFiles};
//! let files = TlsFiles::from_state_dir(".sluice".as_ref(), "planning");
//! let mut conn = Connection::connect("grpc+tls://127.0.0.1:50051", &files).await?;
//! let result = conn.query("SELECT count(*) FROM trips").await?;
//! println!("{} rows", result.num_rows());
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandGetTables, CommandStatementQuery, ProstMessageExt};
use arrow_flight::{FlightDescriptor, FlightInfo};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The files a client needs for mTLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to verify the server certificate against; defaults to the
    /// endpoint's host.
    pub domain: Option<String>,
}

impl TlsFiles {
    /// The development PKI of a state directory, as demo identity `name`.
    pub fn from_state_dir(state_dir: &Path, name: &str) -> Self {
        let pki = state_dir.join("pki");
        Self {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{name}.pem")),
            key: pki.join(format!("{name}.key")),
            domain: None,
        }
    }
}

/// A result: its schema and batches.
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

pub struct Connection {
    client: FlightServiceClient<Channel>,
    channel: Channel,
    purpose: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// `x-sluice-receipt` headers of the DoGet calls made so far (JSON).
    receipts: Vec<String>,
    epsilon: Option<f64>,
    /// More request headers for GetFlightInfo (e.g. a broker's
    /// `x-sluice-allow-partial`).
    headers: Vec<(&'static str, tonic::metadata::AsciiMetadataValue)>,
}

/// An endpoint given without TLS: Sluice only speaks mTLS.
#[derive(Debug, thiserror::Error)]
#[error("endpoint `{0}` must start with grpc+tls:// (Sluice always uses mTLS)")]
pub struct PlaintextEndpoint(pub String);

/// `grpc+tls://host:port` (or `https://`) to the URI tonic dials.
pub(crate) fn dial_uri(endpoint: &str) -> Result<String, PlaintextEndpoint> {
    let rest = endpoint
        .strip_prefix("grpc+tls://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| PlaintextEndpoint(endpoint.to_string()))?;
    Ok(format!("https://{rest}"))
}

impl Connection {
    pub async fn connect(endpoint: &str, files: &TlsFiles) -> Result<Self> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(
                &files.ca,
                "CA certificate (--ca)",
            )?))
            .identity(Identity::from_pem(
                read(&files.cert, "client certificate (--cert)")?,
                read(&files.key, "client key (--key)")?,
            ));
        if let Some(domain) = &files.domain {
            tls = tls.domain_name(domain.clone());
        }
        let channel = Endpoint::from_shared(dial_uri(endpoint)?)?
            .tls_config(tls)?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to {endpoint}"))?;
        Ok(Self {
            client: FlightServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            channel,
            purpose: None,
            receipts: Vec::new(),
            epsilon: None,
            headers: Vec::new(),
        })
    }

    /// Declares the purpose of the following queries (the
    /// `x-sluice-purpose` header), as policies may require.
    pub fn set_purpose(&mut self, purpose: &str) -> Result<()> {
        self.purpose =
            Some(purpose.parse().map_err(|_| {
                anyhow::anyhow!("the purpose must be ASCII text without line breaks")
            })?);
        Ok(())
    }

    /// The ε the following differentially private queries spend (the
    /// `x-sluice-epsilon` header); the policy's default otherwise.
    pub fn set_epsilon(&mut self, epsilon: f64) {
        self.epsilon = Some(epsilon);
    }

    /// Sends `name: value` with every query from now on.
    pub fn set_header(&mut self, name: &'static str, value: &str) -> Result<()> {
        let value = value
            .parse()
            .map_err(|_| anyhow::anyhow!("the {name} header must be ASCII text"))?;
        self.headers.push((name, value));
        Ok(())
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The audit receipts (JSON, see `sluice receipt verify`) of the
    /// results fetched so far, oldest first.
    pub fn receipts(&self) -> &[String] {
        &self.receipts
    }

    /// Runs a SQL query and collects the result.
    pub async fn query(&mut self, sql: &str) -> Result<QueryResult> {
        let (schema, stream) = self.query_stream(sql).await?;
        let batches = stream.try_collect().await?;
        Ok(QueryResult { schema, batches })
    }

    /// Runs a SQL query; batches arrive as they are streamed.
    pub async fn query_stream(
        &mut self,
        sql: &str,
    ) -> Result<(SchemaRef, impl Stream<Item = Result<RecordBatch>> + use<>)> {
        let cmd = CommandStatementQuery {
            query: sql.to_string(),
            transaction_id: None,
        };
        let info = self.flight_info(cmd.as_any().encode_to_vec()).await?;
        self.fetch(info).await
    }

    /// GetTables with schemas.
    pub async fn tables(&mut self) -> Result<QueryResult> {
        let cmd = CommandGetTables {
            include_schema: true,
            ..Default::default()
        };
        let info = self.flight_info(cmd.as_any().encode_to_vec()).await?;
        let (schema, stream) = self.fetch(info).await?;
        Ok(QueryResult {
            schema,
            batches: stream.try_collect().await?,
        })
    }

    async fn flight_info(&mut self, cmd: Vec<u8>) -> Result<FlightInfo> {
        let mut request = tonic::Request::new(FlightDescriptor::new_cmd(cmd));
        if let Some(purpose) = &self.purpose {
            request
                .metadata_mut()
                .insert(sluice_proto::wire::header::PURPOSE, purpose.clone());
        }
        for (name, value) in &self.headers {
            request.metadata_mut().insert(*name, value.clone());
        }
        if let Some(epsilon) = self.epsilon {
            let value = epsilon
                .to_string()
                .parse()
                .map_err(|_| anyhow::anyhow!("ε must be a number"))?;
            request
                .metadata_mut()
                .insert(sluice_proto::wire::header::EPSILON, value);
        }
        let info = self
            .client
            .get_flight_info(request)
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(info)
    }

    async fn fetch(
        &mut self,
        info: FlightInfo,
    ) -> Result<(SchemaRef, impl Stream<Item = Result<RecordBatch>> + use<>)> {
        let schema = std::sync::Arc::new(info.clone().try_decode_schema()?);
        let mut streams = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.ok_or_else(|| {
                anyhow::anyhow!("the server returned an endpoint without a ticket")
            })?;
            let response = self.client.do_get(ticket).await.map_err(status_error)?;
            if let Some(receipt) = response
                .metadata()
                .get(sluice_proto::wire::header::RECEIPT)
                .and_then(|v| v.to_str().ok())
            {
                self.receipts.push(receipt.to_string());
            }
            let flight = FlightRecordBatchStream::new_from_flight_data(
                response
                    .into_inner()
                    .map_err(arrow_flight::error::FlightError::from),
            );
            streams.push(flight.map_err(|e| match e {
                arrow_flight::error::FlightError::Tonic(status) => status_error(*status),
                other => anyhow::Error::from(other),
            }));
        }
        Ok((schema, futures::stream::iter(streams).flatten()))
    }
}

/// `PERMISSION_DENIED: denied by rule …` rather than tonic's debug format.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

use sluice_proto::wire::code_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_tls() {
        assert_eq!(
            dial_uri("grpc+tls://127.0.0.1:1").unwrap(),
            "https://127.0.0.1:1"
        );
        assert!(dial_uri("grpc://127.0.0.1:1").is_err());
    }
}
