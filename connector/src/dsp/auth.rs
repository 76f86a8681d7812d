//! Who sends a DSP request. The seam for identities other than client
//! certificates: a Decentralized Claims Protocol (DCP) verifier would
//! implement [`Authenticate`] by checking the self-issued ID token in the
//! `Authorization` header and the credentials it presents, and map the
//! holder's DID to a [`Principal`] the usage policy matches (docs/dsp.md).
//! Whatever implements it, the principal must be the one the Flight SQL
//! endpoint derives for the same consumer, or its agreements would be
//! unusable there.

use axum::http::HeaderMap;
use sluice_policy::Principal;

use super::https::Peer;
use crate::identity;

/// Why a request names no principal (answered 401 with this message).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// Turns a request into the principal that sent it, or says why not.
pub trait Authenticate: Send + Sync {
    fn authenticate(&self, peer: &Peer, headers: &HeaderMap) -> Result<Principal, Unauthenticated>;
}

/// The default: the verified client certificate of the connection, read
/// exactly as the Flight SQL endpoint reads it.
pub struct ClientCertificates;

impl Authenticate for ClientCertificates {
    fn authenticate(
        &self,
        peer: &Peer,
        _headers: &HeaderMap,
    ) -> Result<Principal, Unauthenticated> {
        let caller = peer.0.as_ref().ok_or_else(|| {
            Unauthenticated(
                "a client certificate is required (mTLS) for every DSP endpoint except \
                 /.well-known/dspace-version"
                    .into(),
            )
        })?;
        identity::refuse_roles(&caller.principal)
            .map_err(|s| Unauthenticated(s.message().to_string()))?;
        Ok(caller.principal.clone())
    }
}
