//! The policy file as written: YAML deserialized into these types.
//!
//! Nothing here knows about plans. [`PolicyDocument::from_yaml`] checks the
//! syntax and the shape (unknown fields are errors, with line and column);
//! [`crate::PolicySet::compile`] then checks the meaning against the datasets
//! the connector serves. See `docs/policy.md` for the reference.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::PolicyError;

/// A whole policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Format version; only `1` exists.
    pub version: Spanned<u32>,
    /// Named groups of principals that consumers can match on.
    #[serde(default)]
    pub groups: BTreeMap<String, Spanned<Group>>,
    /// What the provider publishes, keyed by the dataset (table) name.
    #[serde(default)]
    pub datasets: BTreeMap<String, Spanned<DatasetPolicy>>,
    /// Who may learn what. A principal no consumer matches is refused.
    #[serde(default)]
    pub consumers: Vec<Spanned<Consumer>>,
    /// Provider administrators: they approve, reject and revoke agreements
    /// and read the whole audit log. A principal matching any entry is one.
    #[serde(default)]
    pub admins: Vec<Spanned<Matcher>>,
    /// Brokers trusted to relay queries for their own consumers (the
    /// signed `x-sluice-on-behalf-of` header). A relayed query is decided
    /// for the end consumer; see [`Broker::require_own_grant`].
    #[serde(default)]
    pub brokers: Vec<Spanned<Broker>>,
}

/// A broker this provider accepts relayed queries from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    /// Shown in decisions and audit records.
    pub name: String,
    /// The broker's own certificate (the mTLS client it connects with).
    #[serde(rename = "match")]
    pub matcher: Spanned<Matcher>,
    /// The end consumers this broker may speak for (matchers, a `group`
    /// allowed); an assertion for anyone else is refused. A broker states
    /// identities, so this list is what it is trusted with.
    pub relays_for: Vec<Spanned<Matcher>>,
    /// Whether the broker must itself be allowed by a consumer entry, in
    /// which case its grants and the end consumer's are combined and the
    /// most restrictive wins (default). With `false` the broker is a relay
    /// only and the end consumer's grants alone apply.
    #[serde(default = "default_true")]
    pub require_own_grant: bool,
}

fn default_true() -> bool {
    true
}

/// Dataset metadata (DCAT-like) and column classification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetPolicy {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub publisher: Option<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub license: Option<String>,
    /// The column naming the person, vehicle or company that k-anonymity (and
    /// later differential privacy) protects.
    #[serde(default)]
    pub privacy_unit: Option<Spanned<String>>,
    /// Classification per column. Columns not listed are `general`.
    #[serde(default)]
    pub columns: BTreeMap<String, Spanned<ColumnClass>>,
    /// Public reference data (no personal data): differentially private
    /// queries may join it.
    #[serde(default)]
    pub public: bool,
}

/// The classification of one column.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnClass {
    #[serde(default)]
    pub class: Class,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// Data grade in the style of GB/T 43697-2024, lowest to highest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    #[default]
    General,
    Important,
    Core,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::General => "general",
            Class::Important => "important",
            Class::Core => "core",
        })
    }
}

/// Personal-data tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    Personal,
    SensitivePersonal,
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tag::Personal => "personal",
            Tag::SensitivePersonal => "sensitive_personal",
        })
    }
}

/// A named set of principals.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// A principal belongs to the group when it matches any member entry.
    pub members: Vec<Matcher>,
}

/// Certificate attributes to match. Every field given must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matcher {
    /// Subject organization (O), exactly.
    #[serde(default)]
    pub organization: Option<String>,
    /// A SAN URI pattern; `*` matches any run of characters.
    #[serde(default)]
    pub san_uri: Option<String>,
    /// Subject common name (CN), exactly.
    #[serde(default)]
    pub common_name: Option<String>,
    /// A group defined under `groups:`.
    #[serde(default)]
    pub group: Option<String>,
}

/// A consumer: who it is and what it may learn from each dataset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Shown in decisions and audit records.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: Spanned<Matcher>,
    /// Values row filters can use as `$name` (besides the certificate's
    /// `$organization`, `$common_name` and `$principal`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Per organization and UTC day.
    #[serde(default)]
    pub quotas: Option<Quotas>,
    #[serde(default)]
    pub grants: BTreeMap<String, Spanned<Grant>>,
}

/// Allowances per organization per UTC day, persisted by the connector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default)]
    pub queries_per_day: Option<u64>,
    #[serde(default)]
    pub rows_per_day: Option<u64>,
}

/// What one consumer may do with one dataset.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Visibility per column; a column not listed is `hidden`.
    #[serde(default)]
    pub columns: BTreeMap<String, Spanned<Visibility>>,
    /// A SQL predicate over this dataset's columns, applied at the scan.
    #[serde(default)]
    pub row_filter: Option<Spanned<String>>,
    /// When present, only aggregates leave, over groups of at least
    /// `min_group_size` distinct privacy units.
    #[serde(default)]
    pub aggregation: Option<Aggregation>,
    /// Allowed functions; defaults in `docs/policy.md`.
    #[serde(default)]
    pub functions: Option<Functions>,
    /// Allowed comparison operators; defaults in `docs/policy.md`.
    #[serde(default)]
    pub comparisons: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub joins: Vec<Spanned<JoinGrant>>,
    /// Constructs denied by default that this grant allows.
    #[serde(default)]
    pub allow: Vec<Construct>,
    /// Purposes this data may be used for; when given, every query must
    /// declare one of them.
    #[serde(default)]
    pub purposes: Vec<String>,
    #[serde(default)]
    pub valid_from: Option<Spanned<String>>,
    #[serde(default)]
    pub valid_until: Option<Spanned<String>>,
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Differential privacy: only noisy aggregates leave (`docs/privacy.md`).
    #[serde(default)]
    pub dp: Option<DpRule>,
    /// When present, the consumer's organization needs an active agreement
    /// for this grant (its offer in the catalog) before any query.
    #[serde(default)]
    pub agreement: Option<Spanned<AgreementRule>>,
}

/// How agreements for a grant's offer are made.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgreementRule {
    /// `automatic`: a request is approved at once (the consumer still has
    /// to ask, and so is on record); `manual`: a provider admin decides.
    pub approval: ApprovalMode,
    /// Days an approved agreement lasts; without it, until the grant's
    /// `valid_until` or a revocation.
    #[serde(default)]
    pub valid_for_days: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalMode {
    Automatic,
    Manual,
}

impl fmt::Display for ApprovalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApprovalMode::Automatic => "automatic",
            ApprovalMode::Manual => "manual",
        })
    }
}

/// How a column may be used.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Values leave as stored.
    Raw,
    /// Values leave transformed at the scan.
    Masked(Mask),
    /// Only inside allowed aggregate functions.
    AggregateOnly,
    /// In GROUP BY, filters and as group keys in the output.
    GroupByOnly,
    /// Only in filter predicates.
    FilterOnly,
    /// Not usable at all.
    Hidden,
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Visibility::Raw => f.write_str("raw"),
            Visibility::Masked(mask) => write!(f, "masked ({mask})"),
            Visibility::AggregateOnly => f.write_str("aggregate_only"),
            Visibility::GroupByOnly => f.write_str("group_by_only"),
            Visibility::FilterOnly => f.write_str("filter_only"),
            Visibility::Hidden => f.write_str("hidden"),
        }
    }
}

/// Masks applied at the scan, before the query sees the column.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// HMAC-SHA256 with a key per consumer, hex; stable across queries, so
    /// the consumer can count and join on it but not reverse it.
    Hash,
    /// Replaced by NULL.
    Redact,
    /// Timestamps and dates truncated to `year`, `quarter`, `month`, `week`,
    /// `day` or `hour`.
    Truncate(String),
    /// Numbers rounded down to a multiple of the width.
    Bucket(f64),
}

impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mask::Hash => f.write_str("keyed hash"),
            Mask::Redact => f.write_str("redacted"),
            Mask::Truncate(unit) => write!(f, "truncated to {unit}"),
            Mask::Bucket(width) => write!(f, "bucketed by {width}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregation {
    /// Minimum number of distinct privacy units in every released group.
    pub min_group_size: u64,
    /// Whether rows may also leave (as column visibility allows). Default
    /// `false`: only aggregates. With `true`, k still applies to every
    /// aggregate, which is what gives `aggregate_only` columns meaning on a
    /// dataset whose other columns are released row by row.
    #[serde(default)]
    pub rows: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Functions {
    #[serde(default)]
    pub aggregate: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub scalar: Option<Vec<Spanned<String>>>,
}

/// A join this dataset may take part in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinGrant {
    /// The other dataset.
    pub dataset: String,
    /// Equality keys: `[column of this dataset, column of the other]`.
    pub on: Vec<[String; 2]>,
    /// Join types; `inner` when not given.
    #[serde(default)]
    pub types: Vec<JoinKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
}

/// Plan constructs refused unless a grant allows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Construct {
    /// UNION / UNION ALL.
    Union,
    /// Window functions (row-level output).
    Window,
    /// GROUPING SETS / ROLLUP / CUBE.
    GroupingSets,
    /// A join of a dataset with itself.
    SelfJoin,
}

impl fmt::Display for Construct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Construct::Union => "union",
            Construct::Window => "window",
            Construct::GroupingSets => "grouping_sets",
            Construct::SelfJoin => "self_join",
        })
    }
}

/// The differential-privacy block of a grant: with it, the consumer gets
/// only differentially private aggregates of the dataset (`docs/privacy.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpRule {
    /// Largest ε one query may spend (the consumer picks up to this with
    /// the `x-sluice-epsilon` header).
    pub epsilon_per_query: f64,
    /// ε spent when the query does not say; `epsilon_per_query` by default.
    #[serde(default)]
    pub default_epsilon: Option<f64>,
    /// Smallest ε one query may spend (default 0.01, or `epsilon_per_query`
    /// if that is lower). Each query is a chance to learn from what is not
    /// noised (whether it was answered, how long it took), so a floor on ε
    /// bounds how many such chances a budget buys.
    #[serde(default)]
    pub min_epsilon_per_query: Option<f64>,
    /// δ one query spends where it needs one (private group selection,
    /// Gaussian noise). Default 1e-7.
    #[serde(default)]
    pub delta_per_query: Option<f64>,
    /// Total budget per period, keyed to the organization.
    #[serde(default)]
    pub budget: Option<DpBudget>,
    /// Groups one privacy unit may contribute to (default 1), or `auto`:
    /// chosen for each query from the data, privately.
    #[serde(default)]
    pub max_groups: Option<Limit>,
    /// Rows one privacy unit may contribute to one group (default 1), or
    /// `auto`.
    #[serde(default)]
    pub max_rows: Option<Limit>,
    /// `laplace` (default) or `gaussian`.
    #[serde(default)]
    pub noise: NoiseKind,
    /// Clamping bounds (and quantile candidates) per numeric column; a
    /// column without bounds cannot be summed, averaged or ranked.
    #[serde(default)]
    pub columns: BTreeMap<String, Spanned<DpColumn>>,
    /// Group keys the provider publishes, per column: every listed key is
    /// reported (empty groups too) and no other, at no δ.
    #[serde(default)]
    pub public_keys: BTreeMap<String, Spanned<Vec<KeyValue>>>,
    /// Whether identical repeated queries get the cached noisy answer at no
    /// new cost (default true).
    #[serde(default)]
    pub cache: Option<bool>,
    /// Share of each query's ε spent on estimating what the bounds left out
    /// (rows over `max_rows` and `max_groups`, values clamped), from 0 (no
    /// estimates) to 0.5; default 0.1.
    #[serde(default)]
    pub bias_share: Option<f64>,
    /// Share of each query's ε spent choosing the bounds written `auto`
    /// (from 0.01 to 0.5; default 0.1). Spent only by queries that use one.
    #[serde(default)]
    pub auto_share: Option<f64>,
}

/// A contribution limit: a number, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a whole number of at least 1, or `auto`")]
pub enum Limit {
    Fixed(u64),
    Chosen(Auto),
}

/// The word `auto`: a bound each query chooses from the data with a DP
/// quantile paid from its own ε (docs/privacy.md, "Bounds chosen from the
/// data").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auto {
    Auto,
}

/// A numeric column's clamping bounds: `[lower, upper]`, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged, expecting = "`[lower, upper]` (two numbers) or `auto`")]
pub enum ValueBounds {
    Fixed([f64; 2]),
    Chosen(Auto),
}

/// The noise family of a DP grant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    #[default]
    Laplace,
    Gaussian,
}

/// Bounds of one numeric column under DP.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpColumn {
    /// `[lower, upper]`: values are clamped into this range before they are
    /// aggregated; the sensitivity follows from it, never from the data.
    /// `auto`: each query chooses the range with DP quantiles first.
    pub bounds: ValueBounds,
    /// Candidate values for median and quantiles: a list, or a number of
    /// evenly spaced points between the bounds (default 101).
    #[serde(default)]
    pub candidates: Option<Candidates>,
}

/// One public group key as written in YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum KeyValue {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Candidates {
    Count(u32),
    List(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpBudget {
    pub epsilon: f64,
    #[serde(default)]
    pub delta: f64,
    /// `day`, `month`, `year`, `total`, or N days: `30d` / `30 days`.
    #[serde(default = "default_period")]
    pub period: String,
    /// How queries are composed: `basic` (the default: their ε and δ add
    /// up) or `zcdp` (their ρ adds up; Gaussian noise only).
    #[serde(default)]
    pub accounting: Accounting,
}

/// How the queries charged to one budget compose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accounting {
    /// Basic composition: each query's ε and δ are added.
    #[default]
    Basic,
    /// Zero-concentrated DP: each query's ρ is added, and the total is
    /// converted to (ε, δ) against the budget.
    Zcdp,
}

fn default_period() -> String {
    "total".into()
}

impl PolicyDocument {
    /// Parses a policy file. `file` only names the source in errors.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, PolicyError> {
        let document: PolicyDocument = serde_saphyr::from_str(text).map_err(|e| PolicyError {
            file: file.to_string(),
            line: e.location().map(|l| l.line()).filter(|l| *l > 0),
            field: String::new(),
            message: e.to_string(),
        })?;
        if document.version.value != 1 {
            return Err(PolicyError::at(
                file,
                document.version.referenced.line(),
                "version",
                format!(
                    "version {} is not supported; this connector reads version 1",
                    document.version.value
                ),
            ));
        }
        Ok(document)
    }
}
