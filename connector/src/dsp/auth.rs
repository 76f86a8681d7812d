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

/// Turns a request into the principal that sent it, or says why not.
pub trait Authenticate: Send + Sync {
    fn authenticate(&self, peer: &Peer, headers: &HeaderMap) -> Result<Principal, String>;
}

/// The default: the verified client certificate of the connection, read
/// exactly as the Flight SQL endpoint reads it.
pub struct ClientCertificates;

impl Authenticate for ClientCertificates {
    fn authenticate(&self, peer: &Peer, _headers: &HeaderMap) -> Result<Principal, String> {
        let caller = peer.0.as_ref().ok_or_else(|| {
            "a client certificate is required (mTLS) for every DSP endpoint except \
             /.well-known/dspace-version"
                .to_string()
        })?;
        identity::refuse_roles(&caller.principal).map_err(|s| s.message().to_string())?;
        Ok(caller.principal.clone())
    }
}
