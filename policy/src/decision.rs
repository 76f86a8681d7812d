use std::fmt;

use datafusion_expr::LogicalPlan;

/// A plan the gate allowed, ready to execute exactly as given.
#[derive(Debug, Clone)]
pub struct Approval {
    /// The plan to execute: the input plan, possibly rewritten (row filters,
    /// masks, bounds). Execution must run this plan and no other.
    pub plan: LogicalPlan,
    /// Why the plan was allowed.
    pub record: DecisionRecord,
}

/// What a decision rested on; carried with the ticket and, later, into the
/// audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    /// Content hash of the policy in force (`"none"` when no usage policy is
    /// loaded).
    pub policy_version: String,
    /// Names of the rules that allowed the plan, in the order they applied.
    pub rules: Vec<String>,
}

/// Which family of refusal this is; the connector maps each family to one
/// gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialKind {
    /// The plan asks for something no rule allows (PERMISSION_DENIED).
    Forbidden,
    /// A quota or budget is spent (RESOURCE_EXHAUSTED).
    QuotaExceeded,
    /// A condition of use is unmet: outside the validity window, purpose
    /// missing (FAILED_PRECONDITION).
    Precondition,
}

/// A refusal. The message names the rule and the offending plan element
/// (table, column, node kind) and never contains data values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub kind: DenialKind,
    /// The rule that refused, e.g. `read-only`.
    pub rule: String,
    /// Human-readable reason, e.g. `DML statements are not accepted`.
    pub message: String,
}

impl Denial {
    pub fn forbidden(rule: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: DenialKind::Forbidden,
            rule: rule.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "denied by rule `{}`: {}", self.rule, self.message)
    }
}

impl std::error::Error for Denial {}
