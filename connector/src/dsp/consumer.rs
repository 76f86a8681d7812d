//! The consumer side of DSP 2025-1: read a provider's catalog, negotiate
//! for one of its offers, start a transfer and end it. The provider's
//! answers and the messages it sends to the callback are checked against
//! the protocol's structure ([`super::wire`]) before they are used.
//!
//! The callback endpoint runs for as long as the [`Consumer`] lives (one
//! `sluice dsp …` command): HTTPS with this consumer's certificate, which
//! the provider pins, and requiring a client certificate from the same
//! trust roots.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::https::{self, Outbound, Peer, TlsFiles, TlsSetupError};
use super::odrl;
use super::store::new_pid;
use super::wire::{self, CONTEXT, Message};

/// Why a consumer operation failed; each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot listen for callbacks on {addr}: {cause}")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("{url}: {cause}. Check the provider's URL and that it serves DSP (`[dsp] listen`)")]
    Unreachable { url: String, cause: String },
    #[error("{url} answered {status}: {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("the provider sent a message that is not valid DSP 2025-1: {0}")]
    Invalid(#[from] wire::Violation),
    #[error("the provider's answer is not usable: {0}")]
    Unusable(String),
    #[error(
        "the provider serves no DSP 2025-1 over HTTPS (its /.well-known/dspace-version lists none)"
    )]
    NoVersion,
    #[error(
        "no offer `{0}` in the provider's catalog for you (`sluice dsp catalog URL` lists them)"
    )]
    UnknownOffer(String),
    #[error("waited {0:?} for the provider; {1}")]
    Timeout(Duration, &'static str),
    #[error("the provider terminated the process: {0}")]
    Terminated(String),
    #[error("the system's random source failed")]
    Random,
}

/// A message the provider sent to the callback.
#[derive(Debug, Clone)]
struct Inbound {
    /// The consumer process id in the callback path.
    consumer_pid: String,
    message: Message,
    body: Value,
}

/// A consumer with its callback endpoint running.
pub struct Consumer {
    outbound: Outbound,
    callback_url: String,
    inbox: mpsc::Receiver<Inbound>,
    callbacks: Arc<Callbacks>,
    stop: watch::Sender<bool>,
}

/// What the callback endpoint shares with the command: where messages go,
/// and the processes this command started (messages for any other are
/// refused, so a stranger cannot fill the inbox).
struct Callbacks {
    inbox: mpsc::Sender<Inbound>,
    expected: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Messages waiting for the command at most; more are refused (503).
const INBOX: usize = 64;

/// Where the negotiation ended.
#[derive(Debug, Clone)]
pub struct Agreed {
    pub provider_pid: String,
    pub agreement: Value,
}

/// A started transfer: the data address the provider gave.
#[derive(Debug, Clone)]
pub struct Started {
    pub provider_pid: String,
    pub consumer_pid: String,
    /// `grpc+tls://HOST:PORT`.
    pub endpoint: String,
    pub token: String,
    pub expires_at: Option<String>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Consumer {
    /// Starts the callback endpoint on `listen`; `public_url` is how the
    /// provider reaches it (default `https://<bound address>/callback`).
    pub async fn start(
        files: TlsFiles,
        listen: SocketAddr,
        public_url: Option<String>,
    ) -> Result<Self, ConsumerError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|cause| ConsumerError::Listen {
                addr: listen,
                cause,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|cause| ConsumerError::Listen {
                addr: listen,
                cause,
            })?;
        let (tx, inbox) = mpsc::channel(INBOX);
        let callbacks = Arc::new(Callbacks {
            inbox: tx,
            expected: Default::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let tls = https::server_config(&files)?;
        let router = Router::new()
            .route(
                "/callback/negotiations/{pid}/{kind}",
                post(negotiation_callback),
            )
            .route("/callback/transfers/{pid}/{kind}", post(transfer_callback))
            .with_state(callbacks.clone());
        tokio::spawn(https::serve("DSP callback", listener, tls, router, stopped));
        Ok(Self {
            outbound: Outbound::new(files)?,
            callback_url: public_url.unwrap_or_else(|| format!("https://{bound}/callback")),
            inbox,
            callbacks,
            stop,
        })
    }

    /// Accepts callbacks for `consumer_pid` from now on.
    fn expect(&self, consumer_pid: &str) {
        self.callbacks
            .expected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(consumer_pid.to_string());
    }

    /// The provider's DSP base URL, from its version endpoint.
    pub async fn base_url(&self, provider: &str) -> Result<String, ConsumerError> {
        let root = provider.trim_end_matches('/');
        let url = format!("{root}/.well-known/dspace-version");
        let versions = self.get(&url).await?;
        wire::check_versions(&versions)?;
        let path = versions["protocolVersions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["version"] == "2025-1" && v["binding"] == "HTTPS")
            .and_then(|v| v["path"].as_str())
            .ok_or(ConsumerError::NoVersion)?;
        Ok(format!("{root}{path}"))
    }

    /// The provider's catalog for this consumer.
    pub async fn catalog(&self, provider: &str) -> Result<Value, ConsumerError> {
        let base = self.base_url(provider).await?;
        let request = json!({"@context": [CONTEXT], "@type": "CatalogRequestMessage"});
        let (_, catalog) = self
            .post(&format!("{base}/catalog/request"), &request)
            .await?;
        Message::Catalog.check(&catalog)?;
        Ok(catalog)
    }

    /// Negotiates for `offer_id` (for `purpose`, if the offer lets the
    /// consumer choose) until the agreement is FINALIZED, waiting up to
    /// `wait` for each step (a manual offer waits for the provider's
    /// administrator).
    pub async fn negotiate(
        &mut self,
        provider: &str,
        offer_id: &str,
        purpose: Option<&str>,
        wait: Duration,
    ) -> Result<Agreed, ConsumerError> {
        let base = self.base_url(provider).await?;
        let catalog = self.catalog(provider).await?;
        let dataset = catalog["dataset"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["hasPolicy"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| o["@id"] == offer_id)
            })
            .and_then(|d| d["@id"].as_str())
            .ok_or_else(|| ConsumerError::UnknownOffer(offer_id.to_string()))?
            .to_string();
        let consumer_pid = new_pid().map_err(|_| ConsumerError::Random)?;
        let mut permission = json!({"action": "use"});
        if let Some(purpose) = purpose {
            permission["constraint"] =
                json!([{"leftOperand": "purpose", "operator": "eq", "rightOperand": purpose}]);
        }
        let request = json!({
            "@context": [CONTEXT],
            "@type": "ContractRequestMessage",
            "consumerPid": consumer_pid,
            "callbackAddress": self.callback_url,
            "offer": {"@type": "Offer", "@id": offer_id, "target": dataset, "permission": [permission]},
        });
        Message::ContractRequestMessage.check(&request)?;
        self.expect(&consumer_pid);
        let (_, ack) = self
            .post(&format!("{base}/negotiations/request"), &request)
            .await?;
        Message::ContractNegotiation.check(&ack)?;
        let provider_pid = text(&ack, "providerPid")?;
        let agreement = self
            .await_message(&consumer_pid, wait, "no agreement yet (a manual offer waits for the provider's administrator; the negotiation ends if the agreement finds no callback)", |m| {
                m == Message::ContractAgreementMessage
            })
            .await?;
        let agreement = agreement["agreement"].clone();
        if agreement["target"] != dataset.as_str() {
            return Err(ConsumerError::Unusable(format!(
                "the agreement is for `{}`, not dataset `{dataset}`",
                agreement["target"]
            )));
        }
        let verification = json!({
            "@context": [CONTEXT],
            "@type": "ContractAgreementVerificationMessage",
            "providerPid": provider_pid,
            "consumerPid": consumer_pid,
        });
        self.post(
            &format!(
                "{base}/negotiations/{}/agreement/verification",
                segment(&provider_pid)
            ),
            &verification,
        )
        .await?;
        self.await_message(&consumer_pid, wait, "no FINALIZED event", |m| {
            m == Message::ContractNegotiationEventMessage
        })
        .await?;
        Ok(Agreed {
            provider_pid,
            agreement,
        })
    }

    /// Requests a Flight SQL pull transfer under `agreement_id` and waits
    /// for its data address.
    pub async fn transfer(
        &mut self,
        provider: &str,
        agreement_id: &str,
        wait: Duration,
    ) -> Result<Started, ConsumerError> {
        let base = self.base_url(provider).await?;
        let consumer_pid = new_pid().map_err(|_| ConsumerError::Random)?;
        let request = json!({
            "@context": [CONTEXT],
            "@type": "TransferRequestMessage",
            "consumerPid": consumer_pid,
            "agreementId": agreement_id,
            "format": odrl::FLIGHT_SQL_PULL,
            "callbackAddress": self.callback_url,
        });
        Message::TransferRequestMessage.check(&request)?;
        self.expect(&consumer_pid);
        let (_, ack) = self
            .post(&format!("{base}/transfers/request"), &request)
            .await?;
        Message::TransferProcess.check(&ack)?;
        let provider_pid = text(&ack, "providerPid")?;
        let start = self
            .await_message(&consumer_pid, wait, "no TransferStartMessage", |m| {
                m == Message::TransferStartMessage
            })
            .await?;
        let address = &start["dataAddress"];
        let property = |name: &str| {
            address["endpointProperties"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name)
                .and_then(|p| p["value"].as_str())
                .map(str::to_string)
        };
        Ok(Started {
            provider_pid,
            consumer_pid,
            endpoint: address["endpoint"]
                .as_str()
                .ok_or_else(|| ConsumerError::Unusable("the data address has no endpoint".into()))?
                .to_string(),
            token: property("authorization").ok_or_else(|| {
                ConsumerError::Unusable("the data address has no authorization token".into())
            })?,
            expires_at: property(&format!("{}expiresAt", odrl::SLUICE)),
        })
    }

    /// Ends transfer `provider_pid`: `kind` is TransferTerminationMessage,
    /// TransferCompletionMessage or TransferSuspensionMessage.
    pub async fn end_transfer(
        &self,
        provider: &str,
        provider_pid: &str,
        kind: Message,
        reason: Option<&str>,
    ) -> Result<(), ConsumerError> {
        let base = self.base_url(provider).await?;
        let url = format!("{base}/transfers/{}", segment(provider_pid));
        let process = self.get(&url).await?;
        Message::TransferProcess.check(&process)?;
        let mut message = json!({
            "@context": [CONTEXT],
            "@type": kind.name(),
            "providerPid": provider_pid,
            "consumerPid": process["consumerPid"],
        });
        if let (Some(reason), false) = (reason, kind == Message::TransferCompletionMessage) {
            message["reason"] = json!([reason]);
        }
        kind.check(&message)?;
        let verb = match kind {
            Message::TransferCompletionMessage => "completion",
            Message::TransferSuspensionMessage => "suspension",
            _ => "termination",
        };
        self.post(&format!("{url}/{verb}"), &message)
            .await
            .map(drop)
    }

    async fn await_message(
        &mut self,
        consumer_pid: &str,
        wait: Duration,
        waiting_for: &'static str,
        wanted: impl Fn(Message) -> bool,
    ) -> Result<Value, ConsumerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let inbound = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .map_err(|_| ConsumerError::Timeout(wait, waiting_for))?
                .ok_or(ConsumerError::Timeout(wait, waiting_for))?;
            if inbound.consumer_pid != consumer_pid {
                continue;
            }
            if wanted(inbound.message) {
                return Ok(inbound.body);
            }
            if matches!(
                inbound.message,
                Message::ContractNegotiationTerminationMessage
                    | Message::TransferTerminationMessage
            ) {
                let reason = inbound.body["reason"]
                    .as_array()
                    .and_then(|r| r.first())
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_string();
                return Err(ConsumerError::Terminated(reason));
            }
        }
    }

    async fn get(&self, url: &str) -> Result<Value, ConsumerError> {
        let client = self.outbound.by_host_name()?;
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| unreachable(url, e))?;
        answer(url, response).await.map(|(_, v)| v)
    }

    async fn post(&self, url: &str, body: &Value) -> Result<(StatusCode, Value), ConsumerError> {
        let client = self.outbound.by_host_name()?;
        let response = client
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| unreachable(url, e))?;
        answer(url, response).await
    }
}

fn unreachable(url: &str, e: reqwest::Error) -> ConsumerError {
    use std::error::Error;
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause.push_str(&format!(": {s}"));
        source = s.source();
    }
    ConsumerError::Unreachable {
        url: url.to_string(),
        cause,
    }
}

/// A 2xx answer's JSON body (Null if empty); an error answer's reason.
async fn answer(
    url: &str,
    response: reqwest::Response,
) -> Result<(StatusCode, Value), ConsumerError> {
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = response.bytes().await.map_err(|e| unreachable(url, e))?;
    let body: Value = match bytes.is_empty() {
        true => Value::Null,
        false => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    if status.is_success() {
        return Ok((status, body));
    }
    let reason = body["reason"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&bytes)
                .trim()
                .chars()
                .take(300)
                .collect()
        });
    Err(ConsumerError::Refused {
        url: url.to_string(),
        status: status.as_u16(),
        reason,
    })
}

fn text(value: &Value, field: &str) -> Result<String, ConsumerError> {
    value[field]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ConsumerError::Unusable(format!("no `{field}` in the answer")))
}

/// A process id as one path segment.
fn segment(pid: &str) -> String {
    url::form_urlencoded::byte_serialize(pid.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

type Inbox = State<Arc<Callbacks>>;

async fn negotiation_callback(
    inbox: Inbox,
    peer: Extension<Peer>,
    Path((pid, kind)): Path<(String, String)>,
    body: Bytes,
) -> (StatusCode, String) {
    let message = match kind.as_str() {
        "agreement" => Message::ContractAgreementMessage,
        "events" => Message::ContractNegotiationEventMessage,
        "termination" => Message::ContractNegotiationTerminationMessage,
        "offers" => Message::ContractOfferMessage,
        _ => return (StatusCode::NOT_FOUND, "no such callback\n".into()),
    };
    receive(inbox, peer, pid, message, body)
}

async fn transfer_callback(
    inbox: Inbox,
    peer: Extension<Peer>,
    Path((pid, kind)): Path<(String, String)>,
    body: Bytes,
) -> (StatusCode, String) {
    let message = match kind.as_str() {
        "start" => Message::TransferStartMessage,
        "completion" => Message::TransferCompletionMessage,
        "termination" => Message::TransferTerminationMessage,
        "suspension" => Message::TransferSuspensionMessage,
        _ => return (StatusCode::NOT_FOUND, "no such callback\n".into()),
    };
    receive(inbox, peer, pid, message, body)
}

/// Checks a callback message and hands it to the waiting command.
fn receive(
    State(inbox): Inbox,
    Extension(peer): Extension<Peer>,
    consumer_pid: String,
    message: Message,
    body: Bytes,
) -> (StatusCode, String) {
    if peer.0.is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            "a client certificate is required\n".into(),
        );
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}\n"),
            );
        }
    };
    if let Err(violation) = message.check(&value) {
        return (StatusCode::BAD_REQUEST, format!("{violation}\n"));
    }
    let expected = inbox
        .expected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&consumer_pid);
    if !expected || value["consumerPid"] != consumer_pid.as_str() {
        return (StatusCode::NOT_FOUND, "no such process\n".into());
    }
    let inbound = Inbound {
        consumer_pid,
        message,
        body: value,
    };
    match inbox.inbox.try_send(inbound) {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many messages\n".into(),
        ),
    }
}
