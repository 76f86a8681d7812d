//! # sluice-policy
//!
//! Usage policies, decided on query plans. Every query Sluice answers is a
//! DataFusion [`LogicalPlan`](datafusion_expr::LogicalPlan) that passes
//! through a [`PlanGate`] before a single row is read:
//!
//! ```text
//! identity ─▶ plan ─▶ PlanGate::decide ─┬─▶ Approval { rewritten plan, DecisionRecord } ─▶ execute
//!                                       └─▶ Denial { kind, rule, message }
//! ```
//!
//! This crate is a pure library: no networking, no async runtime, no file
//! I/O. The connector reads the policy file and hands its text to
//! [`PolicySet::compile`]; [`PolicyGate`] then decides each query:
//!
//! - [`document`]: the YAML file as written (`docs/policy.md`).
//! - [`compile`]: checks it against the served datasets.
//! - [`lineage`] and [`checks`]: the decision, on the plan with column lineage.
//! - [`rewrite`] and [`mask`]: row filters, masks, minimum group sizes, row caps.
//! - [`dp`]: differentially private aggregates with bounded contributions.
//! - [`offers`]: the catalog one principal sees, and the offers it may
//!   request agreements for.

mod casts;
pub mod checks;
pub mod compile;
mod decision;
pub mod document;
pub mod dp;
mod gate;
mod internal;
pub mod lineage;
pub mod mask;
pub mod offers;
mod principal;
pub mod rewrite;

pub use compile::{PlanningContext, PolicyError, PolicySet};
pub use decision::{Approval, DecisionRecord, Denial, DenialKind, PrivacyCharge, QuotaCharge};
pub use document::{Class, Tag};
pub use gate::{AccessToken, ActiveAgreement, PlanGate, PlanningView, PolicyGate, QueryContext};
pub use principal::Principal;
