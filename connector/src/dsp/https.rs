//! HTTPS for the Dataspace Protocol, both ways, on rustls with ring.
//!
//! - [`serve`] (the shared server of [`crate::https`]): the DSP endpoint.
//!   A certificate is optional at the TLS layer only because
//!   `/.well-known/dspace-version` must be unauthenticated; every other
//!   route refuses a request without one.
//! - [`Outbound`]: the HTTPS client for messages to the other side. It
//!   presents this side's certificate; a provider calling a consumer's
//!   callback address also pins the consumer's principal: the callback
//!   must present a certificate of the same principal that negotiated, so
//!   a callback address can never point the provider at anyone else (a
//!   service inside the provider's network, say).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub use crate::https::{Peer, TlsFiles, TlsSetupError, principal_of, serve, server_config};
use crate::https::{chain, key, provider, roots, setup_error};
use crate::identity;

/// One outbound message, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
