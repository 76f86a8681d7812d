//! The Dataspace Protocol (DSP 2025-1, HTTPS binding), so that connectors
//! of Eclipse-EDC-based data spaces can find, negotiate for and use what
//! this connector offers, and so that `sluice dsp …` can drive another
//! provider.
//!
//! | part | module |
//! |---|---|
//! | message structure (the 2025-1 JSON Schemas, as checks) | [`wire`] |
//! | the usage policy as a DCAT catalog with ODRL offers | [`odrl`] |
//! | who sends a request (client certificates; the DCP seam) | [`auth`] |
//! | HTTPS in (mTLS) and out (pinned callbacks) | [`https`] |
//! | negotiations and transfer processes | [`store`] |
//! | the provider's endpoints and state machines | [`provider`] |
//! | the consumer: catalog, negotiate, transfer | [`consumer`] |
//!
//! A negotiation ends in an agreement of [`crate::agreements`]; a transfer
//! hands out an access token bound to it, which a Flight SQL query
//! presents (`authorization: Bearer …`). docs/dsp.md has the whole story.

pub mod auth;
pub mod consumer;
pub mod https;
pub mod odrl;
pub mod provider;
pub mod store;
pub mod wire;
