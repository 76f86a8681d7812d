//! HTTPS for the daemon's browser and Dataspace Protocol endpoints, on
//! rustls with ring (the gRPC port has tonic's own).
//!
//! [`serve`] verifies client certificates from the connector's trust roots
//! in the handshake, when a client presents one, and hands them to the
//! handlers as the connection's [`Peer`]; each endpoint decides which
//! routes need one. What one peer can hold is bounded: a handshake, the
//! request headers and each request's body must arrive in time, a
//! connection lives at most [`CONNECTION_LIMIT`] (then finishes its request
//! in flight and closes), a peer that stops reading its responses is cut
//! off after [`WRITE_STALL`], and one address (an IPv6 /64) holds at most
//! [`MAX_CONNECTIONS_PER_ADDRESS`] of the [`MAX_CONNECTIONS`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::{self, Caller};

/// A TLS handshake, and a request's headers, must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must have arrived this long after its headers: a peer
/// that trickles a body holds its connection no longer.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// After this, a connection takes no new request: the one in flight
/// finishes (within [`DRAIN_LIMIT`]) and the connection closes.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(60);
/// How long a request in flight may still take once its connection is
/// past [`CONNECTION_LIMIT`] (a workbench query runs within the query
/// timeout).
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// A response the peer does not read: when a write makes no progress for
/// this long, the connection closes.
const WRITE_STALL: Duration = Duration::from_secs(15);
/// Connections served at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections of one remote address at once: one peer cannot take every
/// slot.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 32;

/// The certificate and trust roots of one side.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

/// Why TLS could not be set up from the files.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct TlsSetupError {
    pub what: &'static str,
    pub path: String,
    pub reason: String,
}

pub(crate) fn setup_error(
    what: &'static str,
    path: &Path,
    reason: impl std::fmt::Display,
) -> TlsSetupError {
    TlsSetupError {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| setup_error("certificate", path, e))?;
    match chain.is_empty() {
        true => Err(setup_error("certificate", path, "it holds no certificate")),
        false => Ok(chain),
    }
}

pub(crate) fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| setup_error("private key", path, e))
}

pub(crate) fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in chain(path)? {
        roots
            .add(certificate)
            .map_err(|e| setup_error("CA certificate", path, e))?;
    }
    Ok(Arc::new(roots))
}

/// The principal a certificate file names (the provider's participant id
/// defaults to its own).
pub fn principal_of(cert: &Path) -> Result<String, TlsSetupError> {
    let leaf = chain(cert)?.remove(0);
    identity::principal_from_der(leaf.as_ref())
        .map(|p| p.id)
        .map_err(|e| setup_error("certificate", cert, e))
}

/// The server side: our certificate; client certificates verified against
/// `ca` when presented.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| setup_error("CA certificate", &files.ca, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup_error("certificate", &files.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(&files.cert)?, key(&files.key)?)
        .map_err(|e| setup_error("certificate", &files.cert, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What the handshake established about the other side of a connection.
#[derive(Clone, Default)]
pub struct Peer(pub Option<Arc<Caller>>);

/// Serves `router` over HTTPS on `listener` until `stopped` turns true;
/// `name` says which endpoint in log lines.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let permit = tokio::select! {
            permit = room.clone().acquire_owned() => permit,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let (socket, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "{name}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = per_address.take(address_key(remote.ip())) else {
            tracing::debug!(%remote, "{name}: too many connections from one address");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let served = connection(name, acceptor.clone(), socket, remote, router.clone());
        tokio::spawn(async move {
            served.await;
            drop((slot, permit));
        });
    }
}

/// What the per-address cap counts by: an IPv4 address, or an IPv6 /64
/// (one host commonly holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// Connections open per remote address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// One connection of an address, given back on drop.
struct AddressSlot {
    counts: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.0.lock().expect("per-address lock");
        let count = counts.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

async fn connection(
    name: &'static str,
    acceptor: tokio_rustls::TlsAcceptor,
    socket: tokio::net::TcpStream,
    remote: SocketAddr,
    router: axum::Router,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "{name}: TLS handshake refused");
            return;
        }
        Err(_) => return,
    };
    let peer = Peer(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| identity::caller_from_der(leaf.as_ref()).ok())
            .map(Arc::new),
    );
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(|body| axum::body::Body::new(Deadline::new(body)));
        request.extensions_mut().insert(peer.clone());
        tower::ServiceExt::oneshot(router.clone(), request)
    });
    let io = hyper_util::rt::TokioIo::new(WriteStall::new(stream));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(served);
    let ended = tokio::select! {
        ended = served.as_mut() => ended,
        _ = tokio::time::sleep(CONNECTION_LIMIT) => {
            // No new request on this connection; the one in flight ends.
            served.as_mut().graceful_shutdown();
            match tokio::time::timeout(DRAIN_LIMIT, served.as_mut()).await {
                Ok(ended) => ended,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%remote, error = %e, "{name}: connection ended with an error");
    }
}

/// A stream whose writes fail once one has waited [`WRITE_STALL`] without
/// progress: a peer that stops reading its responses loses its connection
/// instead of holding it.
struct WriteStall<S> {
    inner: S,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStall<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            stalled: None,
        }
    }

    /// `written` if it made progress; otherwise pending until the stall
    /// limit, then an error.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that fails once [`BODY_TIMEOUT`] has passed since the
/// request arrived: a handler waiting for it gets an error (and the peer a
/// 400) instead of waiting as long as the peer likes.
struct Deadline {
    body: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            deadline: Box::pin(tokio::time::sleep(BODY_TIMEOUT)),
        }
    }
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())]
struct BodyTimedOut;

impl Body for Deadline {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
