use std::fmt;

use datafusion_expr::LogicalPlan;

use crate::document::{Class, Quotas, Tag};
use crate::dp::{Budget, DpQuery, ZcdpCost};

/// A plan the gate allowed, ready to execute exactly as given.
#[derive(Debug, Clone)]
pub struct Approval {
    /// The plan to execute: the input plan, possibly rewritten (row filters,
    /// masks, bounds). Execution must run this plan and no other.
    pub plan: LogicalPlan,
    /// Why the plan was allowed.
    pub record: DecisionRecord,
    /// For a differentially private query: the bounded statistics to noise
    /// and how to finish the answer; `plan` then only describes the result.
    pub dp: Option<Box<DpQuery>>,
}

/// What a decision rested on; carried with the ticket and, later, into the
/// audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRecord {
    /// Content hash of the policy in force.
    pub policy_version: String,
    /// The consumer entries the principal matched.
    pub consumers: Vec<String>,
    /// Names of the rules that allowed and shaped the plan, in order.
    pub rules: Vec<String>,
    /// Datasets the query reads.
    pub datasets: Vec<String>,
    /// The purpose the query declared, else the one its agreement fixes.
    pub purpose: Option<String>,
    /// Ids of the agreements the query runs under.
    pub agreements: Vec<String>,
    /// The highest class of any column that flowed into the output.
    pub output_class: Class,
    /// Personal-data tags of the columns that flowed into the output.
    pub output_tags: Vec<Tag>,
    /// The quota this query counts against, if any.
    pub quota: Option<QuotaCharge>,
    /// The row cap applied to the output.
    pub max_rows: Option<u64>,
    /// The privacy budget a differentially private query spends.
    pub privacy: Option<PrivacyCharge>,
}

/// What a differentially private query costs, and whose budget pays.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyCharge {
    /// The organization (or principal) whose budget is charged.
    pub key: String,
    pub dataset: String,
    /// The query's own guarantee.
    pub epsilon: f64,
    pub delta: f64,
    /// Under `accounting: zcdp`, what the ledger charges instead of ε and δ.
    pub zcdp: Option<ZcdpCost>,
    pub budget: Option<Budget>,
}

/// The rule name recorded for an `EXPLAIN POLICY` answer.
pub const EXPLAIN_RULE: &str = "explain-policy";

impl DecisionRecord {
    /// The record of an `EXPLAIN POLICY` answer: the connector's own text
    /// about a decision, reading no data.
    pub fn explain(policy_version: &str) -> Self {
        Self {
            policy_version: policy_version.to_string(),
            consumers: vec![],
            rules: vec![EXPLAIN_RULE.to_string()],
            datasets: vec![],
            purpose: None,
            agreements: vec![],
            output_class: Class::General,
            output_tags: vec![],
            quota: None,
            max_rows: None,
            privacy: None,
        }
    }

    pub fn is_explanation(&self) -> bool {
        self.rules == [EXPLAIN_RULE] && self.datasets.is_empty()
    }
}

/// A quota to charge: the key (the organization) and its allowances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCharge {
    pub key: String,
    pub quotas: Quotas,
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

impl Denial {
    pub fn quota(rule: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: DenialKind::QuotaExceeded,
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
