//! Step 1 of every query: who is asking.
//!
//! rustls has already verified the client certificate against the configured
//! CA (chain, validity period, client-auth key usage) during the handshake; a
//! connection without a valid certificate never reaches a handler. The
//! [`authenticate`] interceptor then turns the verified leaf certificate into
//! a [`Principal`] and stores it in the request's extensions, so every
//! handler of every service reads the same identity with [`principal`].

use std::sync::Arc;

use ring::digest;
use sluice_policy::{AccessToken, Principal, QueryContext};
use tonic::{Request, Status};
use x509_parser::error::X509Error;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::relay;
use sluice_proto::wire::header;

/// Why a client certificate does not name a principal.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The bytes are not a DER X.509 certificate.
    #[error("cannot parse the certificate: {0}")]
    Unparsable(x509_parser::nom::Err<X509Error>),
    /// The subjectAltName extension is present but cannot be read.
    #[error("malformed subjectAltName: {0}")]
    MalformedSubjectAltName(X509Error),
    /// Nothing in the certificate can serve as the principal's id: issue it
    /// with a SAN URI or a subject O/CN.
    #[error("the certificate has neither a SAN URI nor a subject O/CN")]
    NoIdentity,
}

/// The principal of a request, plus facts about the certificate it came from.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub certificate_sha256: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// tonic interceptor: derives the [`Caller`] from the verified client
/// certificate, or refuses the call with UNAUTHENTICATED.
pub fn authenticate(mut request: Request<()>) -> Result<Request<()>, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required (mTLS)"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required (mTLS)"))?;
    let mut caller = caller_from_der(leaf.as_ref()).map_err(|reason| {
        Status::unauthenticated(format!("client certificate not usable: {reason}"))
    })?;
    refuse_roles(&caller.principal)?;
    if let Some(token) = request.metadata().get(header::ON_BEHALF_OF) {
        caller.principal = relayed(token, leaf.as_ref(), caller.principal)?;
    }
    request.extensions_mut().insert(Arc::new(caller));
    Ok(request)
}

/// A certificate of the deployment's own processes (a coordinator's, a
/// worker's) is not a consumer: it cannot query, relay or use the control
/// plane.
pub(crate) fn refuse_roles(principal: &Principal) -> Result<(), Status> {
    match principal
        .san_uris
        .iter()
        .find(|u| u.starts_with(crate::pki::ROLE_URI_PREFIX))
    {
        Some(role) => Err(Status::permission_denied(format!(
            "this certificate carries the role `{role}`: it is for the connection between a coordinator and its workers, not for consumers; use a client certificate (`sluice certs client`)"
        ))),
        None => Ok(()),
    }
}

/// The end consumer a broker asserts, relayed by the broker (the
/// certificate's principal). Whether this broker is trusted is the usage
/// policy's decision, not this function's.
fn relayed(
    token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    leaf: &[u8],
    broker: Principal,
) -> Result<Principal, Status> {
    let refuse = |reason: &str| {
        Status::unauthenticated(format!(
            "the {} header is not valid: {reason}",
            header::ON_BEHALF_OF
        ))
    };
    let token = token.to_str().map_err(|_| refuse("it is not ASCII"))?;
    let assertion = relay::Assertion::verify(token, leaf).map_err(|e| refuse(&e.to_string()))?;
    tracing::debug!(broker = %broker.id, consumer = %assertion.sub, nonce = %assertion.nonce, "relayed request");
    Ok(assertion.subject().relayed_by(broker))
}

/// The principal of a request that must not be relayed: the control plane
/// (catalog, agreements, receipts) answers consumers and administrators
/// directly, never through a broker.
pub fn direct_principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    let principal = principal(request)?;
    if let Some(broker) = &principal.via {
        return Err(Status::permission_denied(format!(
            "this service answers direct callers only; `{}` relays for `{}` (the {} header is for queries)",
            broker.id,
            principal.id,
            header::ON_BEHALF_OF
        )));
    }
    Ok(principal)
}

/// The caller of a request that passed [`authenticate`].
pub fn caller<T>(request: &Request<T>) -> Result<Arc<Caller>, Status> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request carries no authenticated identity"))
}

/// The principal of a request that passed [`authenticate`].
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    caller(request).map(|c| c.principal.clone())
}

/// Who asks and why: the principal and the declared purpose (the
/// `x-sluice-purpose` header), for the policy decision.
pub fn query_context<T>(request: &Request<T>) -> Result<QueryContext, Status> {
    let principal = principal(request)?;
    let purpose = match request.metadata().get(header::PURPOSE) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    Status::invalid_argument(format!(
                        "the {} header must be ASCII text",
                        header::PURPOSE
                    ))
                })?
                .trim()
                .to_string(),
        ),
    };
    let mut context = QueryContext::new(principal);
    context.purpose = purpose.filter(|p| !p.is_empty());
    context.epsilon = epsilon(request)?;
    context.access_token = bearer_token(request)?;
    Ok(context)
}

/// The access token of a DSP transfer (`authorization: Bearer …`), which
/// lets a query rest on that transfer's agreement. The token never appears
/// in an error or a log line.
fn bearer_token<T>(request: &Request<T>) -> Result<Option<AccessToken>, Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|text| {
            text.strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|token| !token.is_empty());
    match token {
        Some(token) => Ok(Some(AccessToken::new(token))),
        None => Err(Status::invalid_argument(
            "the authorization header must be `Bearer <token>` with the access token of a DSP \
             transfer; your identity is your client certificate, so leave the header out otherwise",
        )),
    }
}

fn epsilon<T>(request: &Request<T>) -> Result<Option<f64>, Status> {
    let Some(value) = request.metadata().get(header::EPSILON) else {
        return Ok(None);
    };
    let bad = || {
        Status::invalid_argument(format!(
            "the {} header must be a number above 0, e.g. `0.5`",
            header::EPSILON
        ))
    };
    let epsilon: f64 = value
        .to_str()
        .map_err(|_| bad())?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(bad());
    }
    Ok(Some(epsilon))
}

/// Derives the principal from a DER certificate: the first SAN URI, else
/// `O=<org>,CN=<cn>` from the subject.
pub fn principal_from_der(der: &[u8]) -> Result<Principal, CertificateError> {
    caller_from_der(der).map(|c| c.principal)
}

pub fn caller_from_der(der: &[u8]) -> Result<Caller, CertificateError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(CertificateError::Unparsable)?;
    let subject = cert.subject();
    let organization = subject
        .iter_organization()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let san_uris: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(CertificateError::MalformedSubjectAltName(e)),
    };
    let id = match san_uris.first() {
        Some(uri) => uri.clone(),
        None => match (&organization, &common_name) {
            (Some(o), Some(cn)) => format!("O={o},CN={cn}"),
            (None, Some(cn)) => format!("CN={cn}"),
            (Some(o), None) => format!("O={o}"),
            (None, None) => return Err(CertificateError::NoIdentity),
        },
    };
    Ok(Caller {
        principal: Principal {
            id,
            organization,
            common_name,
            san_uris,
            via: None,
        },
        certificate_sha256: hex::encode(digest::digest(&digest::SHA256, der).as_ref()),
        not_after: cert.validity().not_after.timestamp(),
    })
}
