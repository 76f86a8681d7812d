//! HTTPS for the Dataspace Protocol, both ways, on rustls with ring.
//!
//! - [`serve`]: the DSP endpoint. Client certificates from the connector's
//!   trust roots are verified in the handshake and handed to the handlers
//!   as the connection's [`Peer`]. A certificate is optional at the TLS
//!   layer only because `/.well-known/dspace-version` must be
//!   unauthenticated; every other route refuses a request without one.
//! - [`Outbound`]: the HTTPS client for messages to the other side. It
//!   presents this side's certificate; a provider calling a consumer's
//!   callback address also pins the consumer's principal: the callback
//!   must present a certificate of the same principal that negotiated, so
//!   a callback address can never point the provider at anyone else (a
//!   service inside the provider's network, say).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::{self, Caller};

/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// One outbound message, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection to the DSP endpoint lasts at most this long (its messages
/// are small): a peer that trickles bytes holds it no longer.
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 512;

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

fn setup_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| setup_error("certificate", path, e))?;
    match chain.is_empty() {
        true => Err(setup_error("certificate", path, "it holds no certificate")),
        false => Ok(chain),
    }
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| setup_error("private key", path, e))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsSetupError> {
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

/// Serves `router` over HTTPS on `listener` until `stopped` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
                tracing::warn!(error = %e, "DSP endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let served = connection(acceptor.clone(), socket, remote, router.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_LIMIT, served).await;
            drop(permit);
        });
    }
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    socket: tokio::net::TcpStream,
    remote: SocketAddr,
    router: axum::Router,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "DSP endpoint: TLS handshake refused");
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
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(peer.clone());
            tower::ServiceExt::oneshot(router.clone(), request)
        });
    let io = hyper_util::rt::TokioIo::new(stream);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(%remote, error = %e, "DSP endpoint: connection ended with an error");
    }
}

/// Sends DSP messages to the other side over HTTPS with this side's
/// certificate.
#[derive(Clone)]
pub struct Outbound {
    files: TlsFiles,
}

impl Outbound {
    pub fn new(files: TlsFiles) -> Result<Self, TlsSetupError> {
        // Read once now, so that a bad file is reported at start.
        Self::client_config(&files, None)?;
        Ok(Self { files })
    }

    /// A client that verifies the server by its host name (a consumer
    /// calling a provider's URL).
    pub fn by_host_name(&self) -> Result<reqwest::Client, TlsSetupError> {
        self.client(None)
    }

    /// A client that accepts only a server presenting a certificate of
    /// `principal` from the trust roots, whatever host it is reached at (a
    /// provider calling back the consumer that negotiated).
    pub fn pinned_to(&self, principal: &str) -> Result<reqwest::Client, TlsSetupError> {
        self.client(Some(principal.to_string()))
    }

    fn client(&self, pinned: Option<String>) -> Result<reqwest::Client, TlsSetupError> {
        let config = Self::client_config(&self.files, pinned)?;
        reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| setup_error("certificate", &self.files.cert, e))
    }

    fn client_config(
        files: &TlsFiles,
        pinned: Option<String>,
    ) -> Result<rustls::ClientConfig, TlsSetupError> {
        let roots = roots(&files.ca)?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| setup_error("CA certificate", &files.ca, e))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup_error("certificate", &files.cert, e))?;
        let builder = match pinned {
            None => builder.with_webpki_verifier(webpki),
            Some(principal) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedPrincipal { webpki, principal })),
        };
        let mut config = builder
            .with_client_auth_cert(chain(&files.cert)?, key(&files.key)?)
            .map_err(|e| setup_error("certificate", &files.cert, e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Whether a certificate names a DNS name or an IP address: a server's,
/// never a consumer's. A callback presenting one is refused even if its
/// principal (`CN=…`) matches, so no server certificate of the provider's
/// network can answer for a consumer.
fn names_a_host(der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return true;
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName(_) | GeneralName::IPAddress(_))),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Verifies a server certificate as web PKI does (chain to the roots,
/// validity, server-auth key usage), except that instead of the host name
/// it must name `principal`.
#[derive(Debug)]
struct PinnedPrincipal {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    principal: String,
}

impl ServerCertVerifier for PinnedPrincipal {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // The chain, validity and key usage were checked before the name.
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let named =
            identity::principal_from_der(end_entity.as_ref()).is_ok_and(|p| p.id == self.principal);
        match named && !names_a_host(end_entity.as_ref()) {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
