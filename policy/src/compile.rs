//! From a [`PolicyDocument`] to a [`PolicySet`] that decisions run on.
//!
//! Compiling checks the meaning of the file against the datasets the
//! connector serves: every dataset, column, function and join key must
//! exist; row filters must parse; no grant may loosen a class default. The
//! first problem found is reported with file, line and field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion_common::DFSchema;
use datafusion_common::arrow::datatypes::{DataType, SchemaRef};
use datafusion_expr::Expr;
use ring::digest;
use serde_saphyr::Spanned;

use crate::document::{
    ApprovalMode, Class, ColumnClass, Construct, DatasetPolicy, Grant, JoinGrant, JoinKind, Mask,
    Matcher, PolicyDocument, Quotas, Tag, Visibility,
};
use crate::dp::DpGrant;

/// A problem in a policy file: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<u64>,
    /// Dotted path of the field, e.g. `consumers[0].grants.trips.columns.fare_eur`.
    pub field: String,
    pub message: String,
}

impl PolicyError {
    pub fn at(file: &str, line: u64, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            line: (line > 0).then_some(line),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What the policy engine needs from the connector to compile a policy: the
/// schemas of the served datasets and a SQL expression parser.
pub trait PlanningContext {
    /// The schema of a served dataset, `None` if the connector serves no
    /// dataset of that name.
    fn dataset_schema(&self, name: &str) -> Option<SchemaRef>;
    /// Parses a SQL predicate over `schema` (unqualified column names).
    /// `$name` placeholders stand for principal attributes. The error's text
    /// (without backtrace) is shown to the policy author after "the row
    /// filter does not plan: ".
    fn parse_predicate(&self, sql: &str, schema: &DFSchema) -> datafusion_common::Result<Expr>;

    /// Whether a scalar or aggregate function of this name exists, so that
    /// a misspelt name in `functions:` is an error rather than a silent
    /// refusal. Contexts that cannot tell answer `true`.
    fn function_exists(&self, name: &str) -> bool {
        let _ = name;
        true
    }
}

/// Aggregate functions allowed when a grant does not list its own.
pub const DEFAULT_AGGREGATES: &[&str] = &["count", "sum", "avg"];
/// Scalar functions allowed when a grant does not list its own.
pub const DEFAULT_SCALARS: &[&str] = &[
    "date_trunc",
    "date_part",
    "round",
    "floor",
    "ceil",
    "abs",
    "lower",
    "upper",
    "coalesce",
];
/// Comparisons allowed when a grant does not list its own. `<>`, `NOT IN`
/// and `NOT LIKE` are left out on purpose: excluding one value is the
/// differencing step of a tracker attack.
pub const DEFAULT_COMPARISONS: &[&str] = &[
    "=", "<", "<=", ">", ">=", "in", "between", "like", "is_null", "and", "or",
];
/// Every comparison name a policy may list.
pub const KNOWN_COMPARISONS: &[&str] = &[
    "=", "<>", "<", "<=", ">", ">=", "in", "not_in", "between", "like", "not_like", "regex",
    "is_null", "and", "or", "not",
];
const TRUNCATE_UNITS: &[&str] = &["year", "quarter", "month", "week", "day", "hour"];

/// One dataset as the policy describes it.
#[derive(Debug, Clone)]
pub struct DatasetRules {
    pub name: String,
    pub metadata: DatasetPolicy,
    pub privacy_unit: Option<String>,
    pub schema: SchemaRef,
}

impl DatasetRules {
    /// The classification of `column` (`general` when not listed).
    pub fn class_of(&self, column: &str) -> ColumnClass {
        self.metadata
            .columns
            .get(column)
            .map(|c| c.value.clone())
            .unwrap_or_default()
    }
}

/// One consumer's rules for one dataset, checked and ready to apply.
#[derive(Debug, Clone)]
pub struct DatasetGrant {
    /// Where the rule lives, e.g. `consumers[0] (city-planning) grants.trips`.
    pub rule: String,
    pub columns: BTreeMap<String, Visibility>,
    /// Column names unqualified; `$name` placeholders for attributes.
    pub row_filter: Option<Expr>,
    pub min_group_size: Option<u64>,
    /// With a minimum group size: whether rows may leave too.
    pub rows_allowed: bool,
    pub aggregates: BTreeSet<String>,
    pub scalars: BTreeSet<String>,
    pub comparisons: BTreeSet<String>,
    pub joins: Vec<JoinGrant>,
    pub allow: BTreeSet<Construct>,
    /// `None`: no purpose required. `Some(set)`: the query must declare one
    /// of these (an empty set, left by combining disjoint grants, admits none).
    pub purposes: Option<BTreeSet<String>>,
    pub valid_from: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    pub max_rows: Option<u64>,
    /// Only differentially private aggregates leave.
    pub dp: Option<DpGrant>,
    /// Offers whose agreement a query needs: none, one, or (for grants
    /// combined from several consumer entries) each entry's.
    pub agreements: Vec<AgreementTerms>,
}

/// A grant that needs an agreement before use: its offer and how
/// agreements for it are made.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementTerms {
    /// `<dataset>/<consumer name>`, as the catalog lists it.
    pub offer: String,
    pub approval: ApprovalMode,
    pub valid_for_days: Option<u32>,
}

/// The id of the offer a consumer entry's grant on a dataset makes.
pub fn offer_id(dataset: &str, consumer: &str) -> String {
    format!("{dataset}/{consumer}")
}

impl DatasetGrant {
    pub fn visibility(&self, column: &str) -> Visibility {
        self.columns
            .get(column)
            .cloned()
            .unwrap_or(Visibility::Hidden)
    }

    /// Combines two grants for the same dataset: the most restrictive wins.
    pub fn restrict(mut self, other: &DatasetGrant) -> DatasetGrant {
        self.rule = format!("{} + {}", self.rule, other.rule);
        let names: BTreeSet<String> = self
            .columns
            .keys()
            .chain(other.columns.keys())
            .cloned()
            .collect();
        for name in names {
            let stricter = stricter_visibility(self.visibility(&name), other.visibility(&name));
            self.columns.insert(name, stricter);
        }
        self.row_filter = match (self.row_filter.take(), other.row_filter.clone()) {
            (Some(a), Some(b)) => Some(a.and(b)),
            (a, b) => a.or(b),
        };
        self.min_group_size = self.min_group_size.max(other.min_group_size);
        self.rows_allowed = match (self.min_group_size, other.min_group_size) {
            (Some(_), Some(_)) => self.rows_allowed && other.rows_allowed,
            _ => self.rows_allowed || other.rows_allowed,
        } && self.min_group_size.is_some();
        self.aggregates = &self.aggregates & &other.aggregates;
        self.scalars = &self.scalars & &other.scalars;
        self.comparisons = &self.comparisons & &other.comparisons;
        self.joins = self
            .joins
            .iter()
            .filter_map(|j| {
                let o = other
                    .joins
                    .iter()
                    .find(|o| o.dataset == j.dataset && o.on == j.on)?;
                let types: Vec<JoinKind> = j
                    .types
                    .iter()
                    .filter(|t| o.types.contains(t))
                    .copied()
                    .collect();
                (!types.is_empty()).then(|| JoinGrant { types, ..j.clone() })
            })
            .collect();
        self.allow = &self.allow & &other.allow;
        self.purposes = match (self.purposes.take(), other.purposes.clone()) {
            (Some(a), Some(b)) => Some(&a & &b),
            (a, b) => a.or(b),
        };
        self.valid_from = self.valid_from.max(other.valid_from);
        self.valid_until = match (self.valid_until, other.valid_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max_rows = match (self.max_rows, other.max_rows) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.dp = match (self.dp.take(), &other.dp) {
            (Some(a), Some(b)) => Some(a.restrict(b)),
            (a, b) => a.or(b.clone()),
        };
        self.agreements.extend(other.agreements.iter().cloned());
        self
    }
}

/// The visibility that admits only what both admit. Where neither is a
/// restriction of the other (a mask and a usage limit, or two different
/// usage limits that overlap only partly) the column is hidden.
fn stricter_visibility(a: Visibility, b: Visibility) -> Visibility {
    use Visibility::*;
    match (a, b) {
        (a, b) if a == b => a,
        (Raw, other) | (other, Raw) => other,
        (Hidden, _) | (_, Hidden) => Hidden,
        (Masked(_), Masked(_)) => Masked(Mask::Redact),
        (GroupByOnly, FilterOnly) | (FilterOnly, GroupByOnly) => FilterOnly,
        _ => Hidden,
    }
}

/// One consumer entry, compiled.
#[derive(Debug, Clone)]
pub struct ConsumerRules {
    pub name: String,
    pub matcher: Matcher,
    pub attributes: BTreeMap<String, String>,
    pub quotas: Option<Quotas>,
    pub grants: BTreeMap<String, DatasetGrant>,
}

/// One `brokers:` entry, compiled.
#[derive(Debug, Clone)]
pub struct BrokerRules {
    /// Where the entry lives, e.g. `brokers[0] (regional-broker)`.
    pub rule: String,
    pub matcher: Matcher,
    /// Whom the broker may relay for.
    pub relays_for: Vec<Matcher>,
    pub require_own_grant: bool,
}

/// A compiled policy: the rules every decision runs on.
#[derive(Debug, Clone)]
pub struct PolicySet {
    pub(crate) version: String,
    pub(crate) datasets: BTreeMap<String, DatasetRules>,
    pub(crate) groups: BTreeMap<String, Vec<Matcher>>,
    pub(crate) consumers: Vec<ConsumerRules>,
    pub(crate) admins: Vec<Matcher>,
    pub(crate) brokers: Vec<BrokerRules>,
    pub(crate) mask_secret: Arc<[u8]>,
    warnings: Vec<PolicyError>,
}

impl PolicySet {
    /// Parses and compiles a policy file. `mask_secret` keys the per-consumer
    /// hashes of `masked: hash` columns; keep it stable so that masked values
    /// stay joinable across queries and restarts.
    pub fn compile(
        file: &str,
        text: &str,
        context: &dyn PlanningContext,
        mask_secret: &[u8],
    ) -> Result<PolicySet, PolicyError> {
        let document = PolicyDocument::from_yaml(file, text)?;
        let compiler = Compiler {
            file,
            context,
            warnings: Default::default(),
        };
        let datasets = compiler.datasets(&document)?;
        let declared: BTreeSet<String> = document.datasets.keys().cloned().collect();
        let groups = compiler.groups(&document)?;
        let consumers = document
            .consumers
            .iter()
            .enumerate()
            .map(|(i, c)| compiler.consumer(i, c, &datasets, &declared, &groups))
            .collect::<Result<Vec<_>, _>>()?;
        compiler.unique_names(&document)?;
        let admins = compiler.admins(&document, &groups)?;
        let brokers = compiler.brokers(&document, &groups)?;
        Ok(PolicySet {
            version: content_version(text),
            datasets,
            groups,
            consumers,
            admins,
            brokers,
            mask_secret: Arc::from(mask_secret),
            warnings: compiler.warnings.into_inner(),
        })
    }

    /// Content hash of the policy text, e.g. `sha256:3f2a…` (16 hex digits).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn datasets(&self) -> impl Iterator<Item = &DatasetRules> {
        self.datasets.values()
    }

    pub fn consumers(&self) -> &[ConsumerRules] {
        &self.consumers
    }

    /// Things worth a log line that do not stop the policy from loading,
    /// e.g. a dataset this connector does not serve.
    pub fn warnings(&self) -> &[PolicyError] {
        &self.warnings
    }
}

/// `sha256:` and the first 16 hex digits of the SHA-256 of the policy text.
pub fn content_version(text: &str) -> String {
    let hash = digest::digest(&digest::SHA256, text.as_bytes());
    let hex: String = hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

struct Compiler<'a> {
    file: &'a str,
    context: &'a dyn PlanningContext,
    warnings: std::cell::RefCell<Vec<PolicyError>>,
}

impl Compiler<'_> {
    fn error(
        &self,
        line: u64,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        PolicyError::at(self.file, line, field, message)
    }

    fn datasets(
        &self,
        doc: &PolicyDocument,
    ) -> Result<BTreeMap<String, DatasetRules>, PolicyError> {
        let mut out = BTreeMap::new();
        for (name, spanned) in &doc.datasets {
            let field = format!("datasets.{name}");
            let line = spanned.referenced.line();
            let Some(schema) = self.context.dataset_schema(name) else {
                // One policy may cover several connectors; a dataset this one
                // does not serve is skipped (and so granted to nobody here).
                self.warnings.borrow_mut().push(self.error(
                    line,
                    &field,
                    format!("this connector serves no dataset named `{name}`; its rules are ignored here"),
                ));
                continue;
            };
            let dataset = &spanned.value;
            for (column, class) in &dataset.columns {
                self.known_column(
                    &schema,
                    name,
                    column,
                    class.referenced.line(),
                    &format!("{field}.columns.{column}"),
                )?;
            }
            if let Some(unit) = &dataset.privacy_unit {
                self.known_column(
                    &schema,
                    name,
                    &unit.value,
                    unit.referenced.line(),
                    &format!("{field}.privacy_unit"),
                )?;
            }
            out.insert(
                name.clone(),
                DatasetRules {
                    name: name.clone(),
                    metadata: dataset.clone(),
                    privacy_unit: dataset.privacy_unit.as_ref().map(|u| u.value.clone()),
                    schema,
                },
            );
        }
        Ok(out)
    }

    fn known_column(
        &self,
        schema: &SchemaRef,
        dataset: &str,
        column: &str,
        line: u64,
        field: &str,
    ) -> Result<(), PolicyError> {
        if schema.field_with_name(column).is_ok() {
            return Ok(());
        }
        Err(self.error(
            line,
            field,
            format!("dataset `{dataset}` has no column `{column}`"),
        ))
    }

    fn groups(&self, doc: &PolicyDocument) -> Result<BTreeMap<String, Vec<Matcher>>, PolicyError> {
        let mut out = BTreeMap::new();
        for (name, group) in &doc.groups {
            for member in &group.value.members {
                if member.group.is_some() {
                    return Err(self.error(
                        group.referenced.line(),
                        format!("groups.{name}.members"),
                        "a group member cannot name another group",
                    ));
                }
                if is_empty_matcher(member) {
                    return Err(self.error(
                        group.referenced.line(),
                        format!("groups.{name}.members"),
                        "a member must give organization, san_uri or common_name",
                    ));
                }
            }
            out.insert(name.clone(), group.value.members.clone());
        }
        Ok(out)
    }

    /// Consumer names name offers and appear in audit records: two entries
    /// with one name would make both ambiguous.
    fn unique_names(&self, doc: &PolicyDocument) -> Result<(), PolicyError> {
        let mut seen = BTreeSet::new();
        for (index, consumer) in doc.consumers.iter().enumerate() {
            if !seen.insert(consumer.value.name.as_str()) {
                return Err(self.error(
                    consumer.referenced.line(),
                    format!("consumers[{index}].name"),
                    format!(
                        "another consumer is already named `{}`; names must be unique",
                        consumer.value.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn brokers(
        &self,
        doc: &PolicyDocument,
        groups: &BTreeMap<String, Vec<Matcher>>,
    ) -> Result<Vec<BrokerRules>, PolicyError> {
        let mut out: Vec<BrokerRules> = Vec::new();
        for (index, broker) in doc.brokers.iter().enumerate() {
            let entry = &broker.value;
            let field = format!("brokers[{index}]");
            let line = entry.matcher.referenced.line();
            if is_empty_matcher(&entry.matcher.value) {
                return Err(self.error(
                    line,
                    format!("{field}.match"),
                    "a broker entry must give organization, san_uri, common_name or group; an empty one would let anyone relay queries",
                ));
            }
            if let Some(group) = &entry.matcher.value.group
                && !groups.contains_key(group)
            {
                return Err(self.error(
                    line,
                    format!("{field}.match.group"),
                    format!("no group named `{group}` is defined under groups:"),
                ));
            }
            if entry.relays_for.is_empty() {
                return Err(self.error(
                    line,
                    format!("{field}.relays_for"),
                    "list the end consumers this broker may speak for (matchers); a broker states identities, so an empty list would trust it with no one",
                ));
            }
            for (i, m) in entry.relays_for.iter().enumerate() {
                let at = format!("{field}.relays_for[{i}]");
                if is_empty_matcher(&m.value) {
                    return Err(self.error(
                        m.referenced.line(),
                        at,
                        "give organization, san_uri, common_name or group; an empty matcher would let the broker speak for anyone",
                    ));
                }
                if let Some(group) = &m.value.group
                    && !groups.contains_key(group)
                {
                    return Err(self.error(
                        m.referenced.line(),
                        format!("{at}.group"),
                        format!("no group named `{group}` is defined under groups:"),
                    ));
                }
            }
            let rule = format!("{field} ({})", entry.name);
            if out
                .iter()
                .any(|b| b.rule.ends_with(&format!("({})", entry.name)))
            {
                return Err(self.error(
                    broker.referenced.line(),
                    format!("{field}.name"),
                    format!(
                        "another broker is already named `{}`; names must be unique",
                        entry.name
                    ),
                ));
            }
            out.push(BrokerRules {
                rule,
                matcher: entry.matcher.value.clone(),
                relays_for: entry.relays_for.iter().map(|m| m.value.clone()).collect(),
                require_own_grant: entry.require_own_grant,
            });
        }
        Ok(out)
    }

    fn admins(
        &self,
        doc: &PolicyDocument,
        groups: &BTreeMap<String, Vec<Matcher>>,
    ) -> Result<Vec<Matcher>, PolicyError> {
        let mut out = Vec::new();
        for (index, admin) in doc.admins.iter().enumerate() {
            let line = admin.referenced.line();
            if is_empty_matcher(&admin.value) {
                return Err(self.error(
                    line,
                    format!("admins[{index}]"),
                    "an admin entry must give organization, san_uri, common_name or group; an empty one would make everyone an admin",
                ));
            }
            if let Some(group) = &admin.value.group
                && !groups.contains_key(group)
            {
                return Err(self.error(
                    line,
                    format!("admins[{index}].group"),
                    format!("no group named `{group}` is defined under groups:"),
                ));
            }
            out.push(admin.value.clone());
        }
        Ok(out)
    }

    fn consumer(
        &self,
        index: usize,
        spanned: &Spanned<crate::document::Consumer>,
        datasets: &BTreeMap<String, DatasetRules>,
        declared: &BTreeSet<String>,
        groups: &BTreeMap<String, Vec<Matcher>>,
    ) -> Result<ConsumerRules, PolicyError> {
        let consumer = &spanned.value;
        let field = format!("consumers[{index}]");
        let matcher = &consumer.matcher.value;
        if is_empty_matcher(matcher) {
            return Err(self.error(
                consumer.matcher.referenced.line(),
                format!("{field}.match"),
                "match must give organization, san_uri, common_name or group; an empty match would admit everyone",
            ));
        }
        if let Some(group) = &matcher.group
            && !groups.contains_key(group)
        {
            return Err(self.error(
                consumer.matcher.referenced.line(),
                format!("{field}.match.group"),
                format!("no group named `{group}` is defined under groups:"),
            ));
        }
        let mut grants = BTreeMap::new();
        for (dataset, grant) in &consumer.grants {
            let rule = format!("consumers[{index}] ({}) grants.{dataset}", consumer.name);
            let grant_field = format!("{field}.grants.{dataset}");
            let Some(rules) = datasets.get(dataset) else {
                if declared.contains(dataset) {
                    continue;
                }
                return Err(self.error(
                    grant.referenced.line(),
                    &grant_field,
                    format!("dataset `{dataset}` is not declared under datasets:"),
                ));
            };
            let mut compiled = self.grant(rule, &grant_field, grant, rules, datasets, declared)?;
            if let Some(agreement) = &grant.value.agreement {
                if agreement.value.valid_for_days == Some(0) {
                    return Err(self.error(
                        agreement.referenced.line(),
                        format!("{grant_field}.agreement.valid_for_days"),
                        "must be at least 1 (leave it out for agreements without expiry)",
                    ));
                }
                compiled.agreements.push(AgreementTerms {
                    offer: offer_id(dataset, &consumer.name),
                    approval: agreement.value.approval,
                    valid_for_days: agreement.value.valid_for_days,
                });
            }
            grants.insert(dataset.clone(), compiled);
        }
        Ok(ConsumerRules {
            name: consumer.name.clone(),
            matcher: matcher.clone(),
            attributes: consumer.attributes.clone(),
            quotas: consumer.quotas,
            grants,
        })
    }

    fn grant(
        &self,
        rule: String,
        field: &str,
        spanned: &Spanned<Grant>,
        dataset: &DatasetRules,
        datasets: &BTreeMap<String, DatasetRules>,
        declared: &BTreeSet<String>,
    ) -> Result<DatasetGrant, PolicyError> {
        let grant = &spanned.value;
        let grant_line = spanned.referenced.line();
        let mut columns = BTreeMap::new();
        for (column, visibility) in &grant.columns {
            let line = visibility.referenced.line();
            let column_field = format!("{field}.columns.{column}");
            self.known_column(&dataset.schema, &dataset.name, column, line, &column_field)?;
            self.check_class_default(dataset, column, &visibility.value, line, &column_field)?;
            self.check_mask(dataset, column, &visibility.value, line, &column_field)?;
            columns.insert(column.clone(), visibility.value.clone());
        }
        let row_filter = match &grant.row_filter {
            Some(sql) => Some(self.row_filter(dataset, sql, &format!("{field}.row_filter"))?),
            None => None,
        };
        if let Some(aggregation) = &grant.aggregation {
            if aggregation.min_group_size == 0 {
                return Err(self.error(
                    grant_line,
                    format!("{field}.aggregation.min_group_size"),
                    "must be at least 1",
                ));
            }
            if dataset.privacy_unit.is_none() {
                return Err(self.error(
                    grant_line,
                    format!("{field}.aggregation"),
                    format!("groups are counted in distinct privacy units, but dataset `{}` declares no privacy_unit", dataset.name),
                ));
            }
        }
        if grant.aggregation.is_none()
            && grant.dp.is_none()
            && let Some((column, visibility)) = grant
                .columns
                .iter()
                .find(|(_, v)| v.value == Visibility::AggregateOnly)
        {
            return Err(self.error(
                visibility.referenced.line(),
                format!("{field}.columns.{column}"),
                "`aggregate_only` needs `aggregation: { min_group_size: k }` in the same grant (add `rows: true` there to release other columns row by row): without a minimum group size, an aggregate over one row is that row's value",
            ));
        }
        self.check_usage_limits(grant, field)?;
        let dp = match &grant.dp {
            Some(rule) => {
                if dataset.privacy_unit.is_none() {
                    return Err(self.error(
                        grant_line,
                        format!("{field}.dp"),
                        format!("differential privacy protects privacy units, but dataset `{}` declares no privacy_unit", dataset.name),
                    ));
                }
                Some(
                    DpGrant::compile(rule, &dataset.schema).map_err(|(at, why)| {
                        self.error(grant_line, format!("{field}.dp.{at}"), why)
                    })?,
                )
            }
            None => None,
        };
        let functions = grant.functions.clone().unwrap_or_default();
        for name in functions
            .aggregate
            .iter()
            .flatten()
            .chain(functions.scalar.iter().flatten())
        {
            if !self
                .context
                .function_exists(&name.value.to_ascii_lowercase())
            {
                return Err(self.error(
                    name.referenced.line(),
                    format!("{field}.functions"),
                    format!("there is no function named `{}`", name.value),
                ));
            }
        }
        let aggregates = name_list(functions.aggregate.as_deref(), DEFAULT_AGGREGATES);
        let scalars = name_list(functions.scalar.as_deref(), DEFAULT_SCALARS);
        let comparisons = name_list(grant.comparisons.as_deref(), DEFAULT_COMPARISONS);
        if let Some(list) = &grant.comparisons {
            for op in list {
                if !KNOWN_COMPARISONS.contains(&op.value.to_ascii_lowercase().as_str()) {
                    return Err(self.error(
                        op.referenced.line(),
                        format!("{field}.comparisons"),
                        format!(
                            "unknown comparison `{}`; known: {}",
                            op.value,
                            KNOWN_COMPARISONS.join(", ")
                        ),
                    ));
                }
            }
        }
        let mut joins = Vec::new();
        for join in &grant.joins {
            let line = join.referenced.line();
            let join_field = format!("{field}.joins");
            let Some(other) = datasets.get(&join.value.dataset) else {
                if declared.contains(&join.value.dataset) {
                    continue;
                }
                return Err(self.error(
                    line,
                    &join_field,
                    format!(
                        "dataset `{}` is not declared under datasets:",
                        join.value.dataset
                    ),
                ));
            };
            if join.value.on.is_empty() {
                return Err(self.error(
                    line,
                    &join_field,
                    "a join needs at least one key pair in `on`",
                ));
            }
            for [mine, theirs] in &join.value.on {
                self.known_column(&dataset.schema, &dataset.name, mine, line, &join_field)?;
                self.known_column(&other.schema, &other.name, theirs, line, &join_field)?;
            }
            let mut join = join.value.clone();
            if join.types.is_empty() {
                join.types.push(JoinKind::Inner);
            }
            joins.push(join);
        }
        Ok(DatasetGrant {
            rule,
            columns,
            row_filter,
            // Under dp, rows never leave: the grant is aggregation-only and
            // noisy group selection takes the place of k.
            min_group_size: match (&grant.aggregation, &dp) {
                (Some(a), _) => Some(a.min_group_size),
                (None, Some(_)) => Some(1),
                (None, None) => None,
            },
            rows_allowed: grant.aggregation.is_some_and(|a| a.rows) && dp.is_none(),
            aggregates,
            scalars,
            comparisons,
            joins,
            allow: grant.allow.iter().copied().collect(),
            purposes: (!grant.purposes.is_empty())
                .then(|| grant.purposes.iter().cloned().collect()),
            valid_from: self.instant(grant.valid_from.as_ref(), &format!("{field}.valid_from"))?,
            valid_until: self
                .instant(grant.valid_until.as_ref(), &format!("{field}.valid_until"))?,
            max_rows: grant.max_rows,
            dp,
            agreements: Vec::new(),
        })
    }

    /// `filter_only`, `group_by_only` and `aggregate_only` promise that a
    /// column's value never leaves row by row. Where rows leave, `SELECT id
    /// … WHERE code = 'E-106'` reads a filter column row by row, and `GROUP
    /// BY id, site` a group key (k ≥ 2 still keeps `aggregate_only` values
    /// out); where a group can be a single unit (k = 1), `GROUP BY id`
    /// reads any of them. Such grants are refused at load, with what to
    /// write instead.
    fn check_usage_limits(&self, grant: &Grant, field: &str) -> Result<(), PolicyError> {
        let Some(exposure) = RowExposure::of(grant) else {
            return Ok(());
        };
        let limited = grant.columns.iter().find(|(_, v)| match v.value {
            Visibility::FilterOnly | Visibility::GroupByOnly => true,
            Visibility::AggregateOnly => exposure == RowExposure::SingleUnitGroups,
            _ => false,
        });
        let Some((column, visibility)) = limited else {
            return Ok(());
        };
        let how = match visibility.value {
            Visibility::FilterOnly => {
                "a query can return the rows WHERE it equals a value of its choice"
            }
            Visibility::GroupByOnly => {
                "a query can return the rows WHERE it equals a value of its choice, or GROUP BY it and a unique column"
            }
            _ => "an aggregate over a group of one unit can be a single row's value",
        };
        let instead = match visibility.value {
            Visibility::AggregateOnly => "`hidden` if its values may not leave",
            _ => "`raw` (or a mask) if rows may carry it, `hidden` if not",
        };
        Err(self.error(
            visibility.referenced.line(),
            format!("{field}.columns.{column}"),
            format!(
                "`{v}` cannot hold in this grant: {why}, and {how}, which shows the value row by row. Write {instead}; or keep `{v}` and make the grant aggregation-only: `aggregation: {{ min_group_size: k }}` with k ≥ 2 and without `rows: true` (or use `dp:`)",
                v = visibility.value,
                why = exposure.describe(),
            ),
        ))
    }

    /// A grant may not loosen the defaults of a column's class and tags.
    fn check_class_default(
        &self,
        dataset: &DatasetRules,
        column: &str,
        visibility: &Visibility,
        line: u64,
        field: &str,
    ) -> Result<(), PolicyError> {
        let class = dataset.class_of(column);
        let refuse = |why: String| Err(self.error(line, field, why));
        if class.class == Class::Core && *visibility != Visibility::Hidden {
            return refuse(format!(
                "column `{}.{column}` is classified `core`: core data never leaves in any form, so it can only be `hidden` (found `{visibility}`)",
                dataset.name
            ));
        }
        if class.tags.contains(&Tag::SensitivePersonal)
            && !matches!(visibility, Visibility::AggregateOnly | Visibility::Hidden)
        {
            return refuse(format!(
                "column `{}.{column}` is tagged `sensitive_personal`: it may only be `aggregate_only` or `hidden` (found `{visibility}`)",
                dataset.name
            ));
        }
        if class.tags.contains(&Tag::Personal) && *visibility == Visibility::Raw {
            return refuse(format!(
                "column `{}.{column}` is tagged `personal`: it may not be `raw`; use a mask, aggregate_only, group_by_only, filter_only or hidden",
                dataset.name
            ));
        }
        if dataset.privacy_unit.as_deref() == Some(column)
            && matches!(
                visibility,
                Visibility::Raw
                    | Visibility::AggregateOnly
                    | Visibility::GroupByOnly
                    | Visibility::FilterOnly
            )
        {
            return refuse(format!(
                "column `{}.{column}` is the privacy unit: it may only be `hidden` or masked with `hash`",
                dataset.name
            ));
        }
        if dataset.privacy_unit.as_deref() == Some(column)
            && matches!(visibility, Visibility::Masked(m) if *m != Mask::Hash)
        {
            return refuse(format!(
                "column `{}.{column}` is the privacy unit: the only mask allowed is `hash`",
                dataset.name
            ));
        }
        Ok(())
    }

    fn check_mask(
        &self,
        dataset: &DatasetRules,
        column: &str,
        visibility: &Visibility,
        line: u64,
        field: &str,
    ) -> Result<(), PolicyError> {
        let Visibility::Masked(mask) = visibility else {
            return Ok(());
        };
        let data_type = dataset
            .schema
            .field_with_name(column)
            .map(|f| f.data_type().clone())
            .unwrap_or(DataType::Null);
        match mask {
            Mask::Truncate(unit) => {
                if !TRUNCATE_UNITS.contains(&unit.as_str()) {
                    return Err(self.error(
                        line,
                        field,
                        format!(
                            "truncate unit `{unit}` is not one of {}",
                            TRUNCATE_UNITS.join(", ")
                        ),
                    ));
                }
                if !matches!(
                    data_type,
                    DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
                ) {
                    return Err(self.error(
                        line,
                        field,
                        format!(
                            "truncate applies to timestamps and dates; `{column}` is {data_type}"
                        ),
                    ));
                }
            }
            Mask::Bucket(width) => {
                if !(width.is_finite() && *width > 0.0) {
                    return Err(self.error(line, field, "bucket width must be a positive number"));
                }
                if !data_type.is_numeric() {
                    return Err(self.error(
                        line,
                        field,
                        format!("bucket applies to numbers; `{column}` is {data_type}"),
                    ));
                }
            }
            Mask::Hash | Mask::Redact => {}
        }
        Ok(())
    }

    fn row_filter(
        &self,
        dataset: &DatasetRules,
        sql: &Spanned<String>,
        field: &str,
    ) -> Result<Expr, PolicyError> {
        let schema = DFSchema::try_from(dataset.schema.as_ref().clone())
            .map_err(|e| self.error(sql.referenced.line(), field, e.to_string()))?;
        self.context
            .parse_predicate(&sql.value, &schema)
            .map_err(|e| {
                self.error(
                    sql.referenced.line(),
                    field,
                    format!("the row filter does not plan: {}", e.strip_backtrace()),
                )
            })
    }

    fn instant(
        &self,
        value: Option<&Spanned<String>>,
        field: &str,
    ) -> Result<Option<DateTime<Utc>>, PolicyError> {
        let Some(value) = value else { return Ok(None) };
        DateTime::parse_from_rfc3339(&value.value)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| {
                self.error(
                    value.referenced.line(),
                    field,
                    format!(
                        "`{}` is not an RFC 3339 time such as 2027-01-01T00:00:00Z: {e}",
                        value.value
                    ),
                )
            })
    }
}

/// How single rows can leave under a grant that is not differentially
/// private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowExposure {
    /// No `aggregation`: rows leave and aggregates are not protected.
    NoAggregation,
    /// `rows: true`: rows leave beside the k-protected aggregates.
    RowsToo,
    /// `min_group_size: 1`: a group may be a single privacy unit.
    SingleUnitGroups,
}

impl RowExposure {
    fn of(grant: &Grant) -> Option<Self> {
        if grant.dp.is_some() {
            return None;
        }
        match &grant.aggregation {
            None => Some(RowExposure::NoAggregation),
            Some(a) if a.rows => Some(RowExposure::RowsToo),
            Some(a) if a.min_group_size < 2 => Some(RowExposure::SingleUnitGroups),
            Some(_) => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            RowExposure::NoAggregation => "the grant has no `aggregation`, so its rows leave",
            RowExposure::RowsToo => "the grant says `rows: true`, so its rows leave",
            RowExposure::SingleUnitGroups => {
                "with `min_group_size: 1` a group can be a single privacy unit"
            }
        }
    }
}

fn is_empty_matcher(m: &Matcher) -> bool {
    m.organization.is_none() && m.san_uri.is_none() && m.common_name.is_none() && m.group.is_none()
}

fn name_list(given: Option<&[Spanned<String>]>, default: &[&str]) -> BTreeSet<String> {
    match given {
        Some(list) => list.iter().map(|s| s.value.to_ascii_lowercase()).collect(),
        None => default.iter().map(|s| s.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_common::arrow::datatypes::{Field, Schema};

    struct OneTable(SchemaRef);

    impl PlanningContext for OneTable {
        fn dataset_schema(&self, name: &str) -> Option<SchemaRef> {
            (name == "people").then(|| self.0.clone())
        }
        fn parse_predicate(&self, sql: &str, _: &DFSchema) -> datafusion_common::Result<Expr> {
            datafusion_common::plan_err!("cannot parse {sql} here")
        }
        fn function_exists(&self, name: &str) -> bool {
            ["count", "sum", "avg", "round"].contains(&name)
        }
    }

    fn compile(yaml: &str) -> Result<PolicySet, PolicyError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("city", DataType::Utf8, false),
            Field::new("salary", DataType::Float64, false),
        ]));
        PolicySet::compile("p.yaml", yaml, &OneTable(schema), b"k")
    }

    const HEAD: &str = "version: 1\ndatasets:\n  people:\n    privacy_unit: id\n    columns:\n      salary: { class: core }\nconsumers:\n  - name: a\n    match: { organization: A }\n    grants:\n      people:\n";

    #[test]
    fn a_grant_cannot_loosen_a_class_default_and_the_error_names_the_line() {
        let err = compile(&format!(
            "{HEAD}        columns: {{ salary: aggregate_only }}\n"
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(12), "{err}");
        assert_eq!(err.field, "consumers[0].grants.people.columns.salary");
        assert!(err.message.contains("core"), "{err}");
    }

    #[test]
    fn misspelt_functions_unknown_columns_and_bad_masks_are_errors() {
        let err = compile(&format!(
            "{HEAD}        functions: {{ aggregate: [cnt] }}\n"
        ))
        .unwrap_err();
        assert!(err.message.contains("no function named `cnt`"), "{err}");
        let err = compile(&format!("{HEAD}        columns: {{ town: raw }}\n")).unwrap_err();
        assert!(err.message.contains("no column `town`"), "{err}");
        let err = compile(&format!(
            "{HEAD}        columns: {{ city: {{ masked: {{ truncate: month }} }} }}\n"
        ))
        .unwrap_err();
        assert!(err.message.contains("timestamps and dates"), "{err}");
        let err = compile(&format!("{HEAD}        columns: {{ id: raw }}\n")).unwrap_err();
        assert!(err.message.contains("privacy unit"), "{err}");
    }

    #[test]
    fn an_empty_match_would_admit_everyone_and_is_refused() {
        let yaml = "version: 1\nconsumers:\n  - name: a\n    match: {}\n";
        let err = compile(yaml).unwrap_err();
        assert!(err.message.contains("admit everyone"), "{err}");
        assert_eq!(err.line, Some(4));
    }

    #[test]
    fn combined_visibilities_admit_only_what_both_admit() {
        use Visibility::*;
        let hash = Masked(Mask::Hash);
        assert_eq!(stricter_visibility(Raw, hash.clone()), hash);
        assert_eq!(stricter_visibility(hash.clone(), GroupByOnly), Hidden);
        assert_eq!(stricter_visibility(GroupByOnly, FilterOnly), FilterOnly);
        assert_eq!(stricter_visibility(AggregateOnly, FilterOnly), Hidden);
        assert_eq!(stricter_visibility(AggregateOnly, GroupByOnly), Hidden);
        assert_eq!(
            stricter_visibility(hash, Masked(Mask::Redact)),
            Masked(Mask::Redact)
        );
        assert_eq!(stricter_visibility(Raw, Raw), Raw);
    }
}
