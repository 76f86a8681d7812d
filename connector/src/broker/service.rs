//! The broker's Flight SQL service: GetFlightInfo runs the federated query
//! (every provider's partial query, then the merge) and returns a
//! single-use ticket for the merged result; DoGet streams it.
//!
//! The whole query runs at GetFlightInfo because providers charge their
//! budgets when they release their partial answers, and the merged schema
//! (with each provider's receipt and ε) is only known then; the FlightInfo
//! schema therefore equals the streamed one exactly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use ring::rand::{SecureRandom, SystemRandom};
use sluice_policy::Principal;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Request, Response, Status};

use super::config::BrokerConfig;
use super::decompose::{self, Federated};
use super::merge::{self, Merged};
use super::upstream::{
    PartialAnswer, ProviderClient, ProviderFailure, RelayHeaders, UpstreamSetupError,
};
use crate::identity;
use crate::relay::{RelayKeyError, RelaySigner};
use sluice_proto::wire::header;

/// How long a merged result waits for its DoGet.
const RESULT_TTL: Duration = Duration::from_secs(300);
/// Merged results held at once, in all and per consumer; beyond either, new
/// queries are refused (never someone else's result dropped: providers
/// charged their budgets for it).
const MAX_HELD_RESULTS: usize = 256;
const MAX_HELD_PER_CONSUMER: usize = 16;
/// Federated queries running at once; more wait.
const MAX_CONCURRENT_QUERIES: usize = 16;

/// Why the broker cannot start serving.
#[derive(Debug, thiserror::Error)]
pub enum BrokerSetupError {
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    /// upstream.key cannot be read.
    #[error("reading upstream.key {}: {error}", path.display())]
    ReadKey {
        path: PathBuf,
        error: std::io::Error,
    },
    /// upstream.key is not a key the broker can sign assertions with.
    #[error("upstream.key {}: {error}", path.display())]
    Key { path: PathBuf, error: RelayKeyError },
}

/// The broker's Flight SQL service.
pub struct Broker {
    config: Arc<BrokerConfig>,
    providers: Vec<ProviderClient>,
    signer: RelaySigner,
    results: Mutex<HashMap<String, Held>>,
    running: tokio::sync::Semaphore,
    rng: SystemRandom,
}

/// A merged result waiting for its DoGet.
struct Held {
    holder: String,
    merged: Merged,
    at: Instant,
}

type DoGetStream = <Broker as FlightService>::DoGetStream;

impl Broker {
    pub fn new(config: Arc<BrokerConfig>) -> Result<Self, BrokerSetupError> {
        let providers = config
            .providers
            .iter()
            .map(|p| ProviderClient::new(&config, p))
            .collect::<Result<Vec<_>, _>>()?;
        let path = || config.upstream.key.clone();
        let key = std::fs::read_to_string(&config.upstream.key).map_err(|error| {
            BrokerSetupError::ReadKey {
                path: path(),
                error,
            }
        })?;
        let signer = RelaySigner::from_pem(&key).map_err(|error| BrokerSetupError::Key {
            path: path(),
            error,
        })?;
        Ok(Self {
            config,
            providers,
            signer,
            results: Mutex::new(HashMap::new()),
            running: tokio::sync::Semaphore::new(MAX_CONCURRENT_QUERIES),
            rng: SystemRandom::new(),
        })
    }

    pub fn into_service(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The caller, if it may use this broker.
    fn admit<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = identity::principal(request)?;
        if let Some(other) = &principal.via {
            return Err(Status::permission_denied(format!(
                "`{}` relays for `{}`: brokers do not relay through brokers",
                other.id, principal.id
            )));
        }
        if !self
            .config
            .consumers
            .iter()
            .any(|m| m.matches_attributes(&principal))
        {
            return Err(Status::permission_denied(format!(
                "`{}` may not query through this broker (access.consumers)",
                principal.id
            )));
        }
        Ok(principal)
    }

    fn relay_headers<T>(
        &self,
        principal: &Principal,
        request: &Request<T>,
    ) -> Result<RelayHeaders, Status> {
        let token = self
            .signer
            .sign(principal)
            .map_err(|e| Status::internal(format!("signing the on-behalf-of assertion: {e}")))?;
        let forward = |name: &str| request.metadata().get(name).cloned();
        Ok(RelayHeaders {
            on_behalf_of: AsciiMetadataValue::try_from(token)
                .map_err(|_| Status::internal("the on-behalf-of assertion is not ASCII"))?,
            purpose: forward(header::PURPOSE),
            epsilon: forward(header::EPSILON),
        })
    }

    /// Runs every provider's partial query at once.
    async fn fan_out(
        &self,
        federated: &Federated,
        headers: &RelayHeaders,
    ) -> (Vec<PartialAnswer>, Vec<ProviderFailure>) {
        let calls = federated.partial_sql.iter().map(|(provider, sql)| {
            let client = self
                .providers
                .iter()
                .find(|p| &p.name == provider)
                .expect("config validation ties sources to providers");
            let dataset = federated
                .table
                .sources
                .iter()
                .find(|(p, _)| p == provider)
                .map(|(_, d)| d.as_str())
                .unwrap_or_default();
            client.run(dataset, sql, headers)
        });
        let mut answers = Vec::new();
        let mut failures = Vec::new();
        for result in futures::future::join_all(calls).await {
            match result {
                Ok(answer) => answers.push(answer),
                Err(failure) => failures.push(failure),
            }
        }
        (answers, failures)
    }

    fn hold(&self, holder: &Principal, merged: Merged) -> Result<String, Status> {
        let mut bytes = [0u8; 16];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| Status::internal("no randomness available"))?;
        let handle = hex::encode(bytes);
        let mut held = self.results.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|_, h| h.at.elapsed() < RESULT_TTL);
        let mine = held.values().filter(|h| h.holder == holder.id).count();
        if mine >= MAX_HELD_PER_CONSUMER || held.len() >= MAX_HELD_RESULTS {
            return Err(Status::resource_exhausted(format!(
                "too many federated results wait for their DoGet ({mine} of yours, {} in all); fetch them or let them expire ({} s)",
                held.len(),
                RESULT_TTL.as_secs()
            )));
        }
        held.insert(
            handle.clone(),
            Held {
                holder: holder.id.clone(),
                merged,
                at: Instant::now(),
            },
        );
        Ok(handle)
    }

    fn take(&self, handle: &[u8], principal: &Principal) -> Result<Merged, Status> {
        let handle = std::str::from_utf8(handle)
            .map_err(|_| Status::invalid_argument("the ticket is not a broker ticket"))?;
        let mut held = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let refused = || {
            Status::not_found(
                "the ticket is unknown, expired or already used; call GetFlightInfo again",
            )
        };
        let entry = held.get(handle).ok_or_else(refused)?;
        if entry.holder != principal.id || entry.at.elapsed() >= RESULT_TTL {
            return Err(refused());
        }
        Ok(held.remove(handle).expect("present").merged)
    }
}

/// The consumer's choice about partial results.
fn allow_partial<T>(request: &Request<T>) -> Result<bool, Status> {
    match request.metadata().get(header::ALLOW_PARTIAL) {
        None => Ok(false),
        Some(v) => match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Ok("true" | "1" | "yes") => Ok(true),
            Ok("false" | "0" | "no") => Ok(false),
            _ => Err(Status::invalid_argument(format!(
                "the {} header must be `true` or `false`",
                header::ALLOW_PARTIAL
            ))),
        },
    }
}

/// One status for failed providers: the first one's code, every provider
/// named with what it said.
fn failed(failures: &[ProviderFailure], total: usize) -> Status {
    let each: Vec<String> = failures
        .iter()
        .map(|f| {
            format!(
                "provider `{}` failed ({}): {}",
                f.provider,
                sluice_proto::wire::code_name(f.code),
                f.message
            )
        })
        .collect();
    let hint = if failures.len() < total {
        format!(
            " (send {}: true to accept a result without it)",
            header::ALLOW_PARTIAL
        )
    } else {
        String::new()
    };
    Status::new(failures[0].code, format!("{}{hint}", each.join("; ")))
}

#[tonic::async_trait]
impl FlightSqlService for Broker {
    type FlightService = Broker;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let started = Instant::now();
        let principal = self.admit(&request)?;
        let partial_ok = allow_partial(&request)?;
        let _running = self
            .running
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the broker is shutting down"))?;
        let federated = decompose::decompose(&query.query, &self.config)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        merge::precheck(&federated)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let headers = self.relay_headers(&principal, &request)?;
        let (answers, failures) = self.fan_out(&federated, &headers).await;
        let total = federated.partial_sql.len();
        if answers.is_empty() || (!failures.is_empty() && !partial_ok) {
            tracing::info!(principal = %principal, table = %federated.table.name, failed = failures.len(), "federated query failed");
            return Err(failed(&failures, total));
        }
        let merged = merge::merge(&federated, &answers, &failures)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(
            principal = %principal,
            table = %federated.table.name,
            providers = answers.len(),
            missing = failures.len(),
            rows = merged.rows(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "federated query answered"
        );
        let schema = merged.schema.clone();
        let rows = merged.rows() as i64;
        let handle = self.hold(&principal, merged)?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into_bytes().into(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(format!("encoding the result schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(request.into_inner())
            .with_total_records(rows);
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let principal = identity::principal(&request)?;
        let merged = self.take(&ticket.statement_handle, &principal)?;
        let batches = futures::stream::iter(merged.batches.into_iter().map(Ok));
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(merged.schema)
            .build(batches)
            .map_err(Status::from)
            .boxed();
        Ok(Response::new(stream))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::Schema;

    use super::*;

    fn merged() -> Merged {
        Merged {
            schema: Arc::new(Schema::empty()),
            batches: Vec::new(),
        }
    }

    #[tokio::test]
    async fn results_wait_for_their_consumer_once_and_are_capped_per_consumer() {
        let dir = tempfile::tempdir().unwrap();
        let broker =
            Broker::new(Arc::new(crate::broker::config::with_files(dir.path(), 1))).unwrap();
        let alice = Principal::new("spiffe://a/alice");
        let bob = Principal::new("spiffe://b/bob");

        let handle = broker.hold(&alice, merged()).unwrap();
        assert_eq!(
            broker.take(handle.as_bytes(), &bob).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert!(broker.take(handle.as_bytes(), &alice).is_ok());
        assert_eq!(
            broker.take(handle.as_bytes(), &alice).unwrap_err().code(),
            tonic::Code::NotFound
        );

        for _ in 0..MAX_HELD_PER_CONSUMER {
            broker.hold(&alice, merged()).unwrap();
        }
        let refused = broker.hold(&alice, merged()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Nobody else's result was dropped to make room, and others still fit.
        assert!(broker.hold(&bob, merged()).is_ok());
    }
}
