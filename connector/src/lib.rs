//! # Sluice
//!
//! A privacy-preserving data-space connector: partners send SQL over Arrow
//! Flight SQL on mutual TLS; Sluice plans it with DataFusion, checks the plan
//! against the provider's rules, runs it beside the data and streams back
//! only what may leave.
//!
//! The daemon joins the three pillars: `sluice_policy` (controllable),
//! `sluice_privacy` (private) and `sluice_audit` (traceable), over the wire
//! contract in `sluice_proto`. The modules follow the life of a query:
//!
//! | step | module |
//! |---|---|
//! | 1. identity: the principal from the client certificate | [`identity`], [`relay`] |
//! | 2. plan: SQL → analyzed `LogicalPlan` | [`query::plan`] |
//! | 3–4. decision and rewrite: the usage policy on the plan | [`usage_policy`] (loading, reload) and `sluice_policy` (the engine) |
//! | holds: a day's query ([`quota`]) and the DP budget | `query::holds` |
//! | 5. signed, single-use ticket | [`query::ticket`] |
//! | 6. execution under memory and time limits | [`query::execute`], [`guard`] |
//! | 7. release: the advertised schema, exactly | [`query::release`] |
//! | 7a. differential privacy: bounded statistics + OpenDP noise | `query::private` and `sluice_privacy` |
//! | 8. privacy budget: reserved before reading, in SQLite | `sluice_privacy::ledger` |
//! | 9. audit: hash-chained, signed records; receipts for consumers | [`audit`] and `sluice_audit` |
//!
//! GetFlightInfo is `query::issue`, DoGet `query::redeem`: each reads as
//! its steps. The control plane: [`catalog`] and `control::catalog` (what
//! is offered), [`agreements`] (contracts a grant may require), [`audit`]
//! (receipts), [`dsp`] (the Dataspace Protocol: catalog, negotiation and
//! transfer for EDC-based data spaces), [`console`] (the web console for
//! admins and consumers, over the same operations).
//!
//! Around them: [`flight`] (the Flight SQL protocol), [`control`] (Sluice's
//! own gRPC services), [`broker`] (federation), [`server`] (built first,
//! then served and drained), [`config`], [`state`] (the state directory),
//! [`dev`] (development PKI and demo data), [`pki`] (`sluice certs`),
//! [`https`] (the HTTPS server of the console and DSP endpoints),
//! [`metrics`], [`telemetry`], [`blocking`] and [`client`]. The command
//! line is in the binary (`src/main.rs`, `src/cli/`).

pub mod agreements;
pub mod audit;
pub mod blocking;
pub mod broker;
pub mod catalog;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod console;
pub mod control;
pub mod dev;
pub mod dsp;
pub mod flight;
pub mod guard;
pub mod https;
pub mod identity;
pub mod metrics;
pub mod pki;
pub mod query;
pub mod quota;
pub mod relay;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod usage_policy;

/// Major version of the Arrow libraries Sluice speaks (arrow-rs 59, as used
/// by DataFusion 55).
pub const ARROW_VERSION: &str = "59";
