//! # sluice-policy
//!
//! The seam between planning and execution. Every query Sluice answers is a
//! DataFusion [`LogicalPlan`] that passes through a [`PlanGate`] before a
//! single row is read:
//!
//! ```text
//! identity ─▶ plan ─▶ PlanGate::decide ─▶ (rewritten plan) ─▶ execute ─▶ release
//!                          │
//!                          └─▶ Denial { rule, kind, message }
//! ```
//!
//! This crate is a pure library: no networking, no async runtime, no file
//! I/O. It sees a [`Principal`] (who asks), a plan (what they ask), and
//! returns either an [`Approval`] (the plan to run, possibly rewritten, plus
//! the [`DecisionRecord`] that explains it) or a [`Denial`] naming the rule.
//!
//! ```
//! use sluice_policy::{PlanGate, Principal, ReadOnlyGate};
//! use datafusion_expr::{LogicalPlanBuilder, logical_plan::table_scan};
//! use datafusion_common::arrow::datatypes::{DataType, Field, Schema};
//!
//! let schema = Schema::new(vec![Field::new("zone", DataType::Utf8, true)]);
//! let plan = table_scan(Some("trips"), &schema, None).unwrap().build().unwrap();
//! let who = Principal::new("spiffe://city.example/org/planning");
//!
//! let approval = ReadOnlyGate.decide(&who, plan).unwrap();
//! assert_eq!(approval.record.policy_version, "none");
//! ```

mod decision;
mod gate;
mod principal;

pub use decision::{Approval, DecisionRecord, Denial, DenialKind};
pub use gate::{PlanGate, READ_ONLY_RULE, ReadOnlyGate};
pub use principal::Principal;
