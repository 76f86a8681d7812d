use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use datafusion_common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion_expr::LogicalPlan;
use ring::hmac;

use crate::checks::{Checker, DENY_BY_DEFAULT};
use crate::compile::{ConsumerRules, DatasetGrant, PolicySet};
use crate::document::{Class, Matcher, Quotas, Tag, Visibility};
use crate::dp::plan::DpRequest;
use crate::dp::{DpQuery, SUPPORTED};
use crate::lineage::Level;
use crate::rewrite::Rewriter;
use crate::{Approval, DecisionRecord, Denial, DenialKind, Principal, PrivacyCharge};
use datafusion_common::arrow::datatypes::Field;

/// Who asks, why, and when: everything a decision may depend on besides the
/// plan. Never data.
#[derive(Debug, Clone)]
pub struct QueryContext {
    pub principal: Principal,
    /// Declared purpose (the `x-sluice-purpose` request header).
    pub purpose: Option<String>,
    /// ε the query asks to spend under differential privacy (the
    /// `x-sluice-epsilon` header); the policy's default when absent.
    pub epsilon: Option<f64>,
    /// Active agreements of the principal's organization, by offer id
    /// (filled by the connector from its agreement store).
    pub agreements: BTreeMap<String, ActiveAgreement>,
    /// A data-plane access token the query presented (a DSP transfer's,
    /// `authorization: Bearer …`). The connector turns it into
    /// `agreements`; no policy decision reads it.
    pub access_token: Option<AccessToken>,
    pub at: SystemTime,
}

/// A secret bearer token: never printed, even in debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, to look it up; never log it.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(…)")
    }
}

/// An agreement in force, as far as a decision needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveAgreement {
    pub id: String,
    pub purpose: String,
}

impl QueryContext {
    pub fn new(principal: Principal) -> Self {
        Self {
            principal,
            purpose: None,
            epsilon: None,
            agreements: BTreeMap::new(),
            access_token: None,
            at: SystemTime::now(),
        }
    }

    /// Adds an active agreement for `offer`.
    pub fn with_agreement(mut self, offer: impl Into<String>, agreement: ActiveAgreement) -> Self {
        self.agreements.insert(offer.into(), agreement);
        self
    }

    pub fn with_purpose(mut self, purpose: impl Into<String>) -> Self {
        self.purpose = Some(purpose.into());
        self
    }

    pub fn with_epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = Some(epsilon);
        self
    }
}

/// The extension point every query passes between planning and execution.
///
/// Implementations inspect the analyzed plan (types coerced, wildcards
/// expanded) and either approve it, possibly rewritten, or deny it. They must
/// decide on the plan alone, never on data, so a decision can be made (and
/// explained) before anything is read.
pub trait PlanGate: Send + Sync {
    /// Content hash of the rules in force; recorded with every decision.
    fn version(&self) -> &str;

    /// Approve (and possibly rewrite) `plan` for the request, or deny it.
    fn decide(&self, request: &QueryContext, plan: LogicalPlan) -> Result<Approval, Denial>;

    /// The columns of `dataset` that `principal` may see in catalog
    /// listings, typed as queries return them (a hashed column is text, a
    /// redacted one nullable); `None` when the dataset is not theirs to see.
    fn visible_columns(&self, principal: &Principal, dataset: &str) -> Option<Vec<Field>>;

    /// The compiled policy behind this gate, for the catalog, offers and
    /// admin checks; `None` for gates that are not policy files.
    fn policy_set(&self) -> Option<&PolicySet> {
        None
    }

    /// What `principal` may name when a query over `dataset` is planned.
    /// Queries are planned against this view, so that what a caller may
    /// not use does not exist for it: an error cannot tell a hidden column
    /// from a missing one, nor say what type it has.
    fn planning_view(&self, principal: &Principal, dataset: &str) -> PlanningView {
        let _ = (principal, dataset);
        PlanningView::All
    }

    /// An approved plan as text for `EXPLAIN POLICY`, with the names of
    /// columns hidden from `principal` replaced by `<hidden>`.
    fn describe_plan(&self, principal: &Principal, plan: &LogicalPlan) -> String {
        let _ = principal;
        plan.display_indent().to_string()
    }
}

/// The part of a dataset a principal's queries are planned against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanningView {
    /// Every column (gates that are not policies).
    All,
    /// These columns, in the dataset's order.
    Columns(Vec<String>),
    /// None: the dataset does not exist for this principal.
    Hidden,
}

/// The gate that enforces a [`PolicySet`].
///
/// ```
/// # use sluice_policy::*;
/// # use datafusion_common::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
/// # use datafusion_common::DFSchema;
/// # use datafusion_expr::{Expr, logical_plan::table_scan};
/// # use std::sync::Arc;
/// struct Datasets(SchemaRef);
/// impl PlanningContext for Datasets {
///     fn dataset_schema(&self, name: &str) -> Option<SchemaRef> {
///         (name == "trips").then(|| self.0.clone())
///     }
///     fn parse_predicate(&self, sql: &str, _: &DFSchema) -> datafusion_common::Result<Expr> {
///         datafusion_common::not_impl_err!("no parser in this example: {sql}")
///     }
/// }
/// let schema = Arc::new(Schema::new(vec![Field::new("zone", DataType::Utf8, true)]));
/// let yaml = r#"
/// version: 1
/// datasets:
///   trips: {}
/// consumers:
///   - name: planning
///     match: { organization: City Planning }
///     grants:
///       trips:
///         columns: { zone: raw }
/// "#;
/// let policy = PolicySet::compile("policy.yaml", yaml, &Datasets(schema.clone()), b"secret").unwrap();
/// let gate = PolicyGate::new(policy);
/// let plan = table_scan(Some("trips"), &schema, None).unwrap().build().unwrap();
///
/// let mut planner = Principal::new("spiffe://city/planning");
/// planner.organization = Some("City Planning".into());
/// assert!(gate.decide(&QueryContext::new(planner), plan.clone()).is_ok());
///
/// let stranger = Principal::new("spiffe://elsewhere/x");
/// let denial = gate.decide(&QueryContext::new(stranger), plan).unwrap_err();
/// assert_eq!(denial.rule, "deny-by-default");
/// ```
pub struct PolicyGate {
    policy: PolicySet,
}

impl PolicyGate {
    pub fn new(policy: PolicySet) -> Self {
        Self { policy }
    }

    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }
}

/// What applies to one principal: the consumers it matches and their grants
/// combined (most restrictive wins).
pub(crate) struct Resolved<'a> {
    pub(crate) consumers: Vec<&'a ConsumerRules>,
    pub(crate) grants: BTreeMap<String, DatasetGrant>,
    attributes: BTreeMap<String, String>,
    quotas: Option<Quotas>,
}

impl Resolved<'_> {
    /// Combines an end consumer's rules with its broker's own: a dataset
    /// only the end consumer holds is dropped, shared ones take the most
    /// restrictive grant, and quotas the lower allowance.
    fn restricted_by<'a>(self, broker: Resolved<'a>) -> Resolved<'a>
    where
        Self: 'a,
    {
        let mut consumers = self.consumers;
        for c in broker.consumers {
            if !consumers.iter().any(|have| std::ptr::eq(*have, c)) {
                consumers.push(c);
            }
        }
        let grants = self
            .grants
            .into_iter()
            .filter_map(|(dataset, grant)| {
                let own = broker.grants.get(&dataset)?;
                Some((dataset, grant.restrict(own)))
            })
            .collect();
        Resolved {
            consumers,
            grants,
            // Row filters' `$name` values are the end consumer's.
            attributes: self.attributes,
            quotas: min_quotas(self.quotas, broker.quotas),
        }
    }
}

fn min_quotas(a: Option<Quotas>, b: Option<Quotas>) -> Option<Quotas> {
    match (a, b) {
        (Some(a), Some(b)) => Some(Quotas {
            queries_per_day: min_option(a.queries_per_day, b.queries_per_day),
            rows_per_day: min_option(a.rows_per_day, b.rows_per_day),
        }),
        (a, b) => a.or(b),
    }
}

impl PolicySet {
    /// The rules for `principal`; for a relayed query, combined with its
    /// broker's own where the `brokers:` entry requires that. `None` when
    /// nothing admits the principal (see [`PolicySet::check_relay`] for why).
    pub(crate) fn resolve(&self, principal: &Principal) -> Option<Resolved<'_>> {
        let direct = self.resolve_direct(principal)?;
        let Some(broker) = &principal.via else {
            return Some(direct);
        };
        let trusted = self.broker_entry(broker)?;
        if !self.may_relay_for(trusted, principal) {
            return None;
        }
        if !trusted.require_own_grant {
            return Some(direct);
        }
        Some(direct.restricted_by(self.resolve_direct(broker)?))
    }

    /// The `brokers:` entry `broker` matches.
    pub fn broker_entry(&self, broker: &Principal) -> Option<&crate::compile::BrokerRules> {
        self.brokers
            .iter()
            .find(|b| self.matches(&b.matcher, broker))
    }

    /// Whether `entry`'s broker may speak for `principal` (`relays_for`).
    fn may_relay_for(&self, entry: &crate::compile::BrokerRules, principal: &Principal) -> bool {
        let consumer = principal.direct();
        entry.relays_for.iter().any(|m| self.matches(m, &consumer))
    }

    /// Refuses a relayed query whose broker this policy does not trust, or
    /// that must itself be allowed and is not.
    pub(crate) fn check_relay(&self, principal: &Principal) -> Result<(), Denial> {
        let Some(broker) = &principal.via else {
            return Ok(());
        };
        let Some(entry) = self.broker_entry(broker) else {
            return Err(Denial::forbidden(
                "brokers",
                format!(
                    "`{}` relays queries for `{}` but is not a trusted broker in the usage policy (brokers:)",
                    broker.id, principal.id
                ),
            ));
        };
        if !self.may_relay_for(entry, principal) {
            return Err(Denial::forbidden(
                format!("{}.relays_for", entry.rule),
                format!(
                    "the broker `{}` may not speak for `{}`",
                    broker.id, principal.id
                ),
            ));
        }
        if entry.require_own_grant && self.resolve_direct(broker).is_none() {
            return Err(Denial::forbidden(
                format!("{}.require_own_grant", entry.rule),
                format!(
                    "the broker `{}` must itself be allowed, but no consumer entry matches it",
                    broker.id
                ),
            ));
        }
        Ok(())
    }

    fn resolve_direct(&self, principal: &Principal) -> Option<Resolved<'_>> {
        let consumers: Vec<&ConsumerRules> = self
            .consumers
            .iter()
            .filter(|c| self.matches(&c.matcher, principal))
            .collect();
        if consumers.is_empty() {
            return None;
        }
        let mut grants: BTreeMap<String, DatasetGrant> = BTreeMap::new();
        let mut attributes = BTreeMap::new();
        let mut quotas: Option<Quotas> = None;
        for consumer in &consumers {
            for (dataset, grant) in &consumer.grants {
                let merged = match grants.remove(dataset) {
                    Some(existing) => existing.restrict(grant),
                    None => grant.clone(),
                };
                grants.insert(dataset.clone(), merged);
            }
            attributes.extend(consumer.attributes.clone());
            quotas = min_quotas(quotas, consumer.quotas);
        }
        // Certificate attributes win over declared ones of the same name.
        attributes.insert("principal".into(), principal.id.clone());
        if let Some(org) = &principal.organization {
            attributes.insert("organization".into(), org.clone());
        }
        if let Some(cn) = &principal.common_name {
            attributes.insert("common_name".into(), cn.clone());
        }
        Some(Resolved {
            consumers,
            grants,
            attributes,
            quotas,
        })
    }

    pub(crate) fn matches(&self, matcher: &Matcher, principal: &Principal) -> bool {
        matcher.matches_attributes(principal)
            && matcher.group.as_ref().is_none_or(|group| {
                self.groups
                    .get(group)
                    .is_some_and(|members| members.iter().any(|m| self.matches(m, principal)))
            })
    }

    /// The key for `masked: hash` columns: one per set of matched consumers,
    /// so two consumers cannot join their hashed ids.
    fn hash_key(&self, consumers: &[&ConsumerRules]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.mask_secret);
        let names: Vec<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
        let tag = hmac::sign(
            &key,
            format!("sluice-mask-v1:{}", names.join("\n")).as_bytes(),
        );
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl PlanGate for PolicyGate {
    fn version(&self) -> &str {
        self.policy.version()
    }

    fn decide(&self, request: &QueryContext, plan: LogicalPlan) -> Result<Approval, Denial> {
        self.policy.check_relay(&request.principal)?;
        let resolved = self.policy.resolve(&request.principal).ok_or_else(|| {
            Denial::forbidden(
                DENY_BY_DEFAULT,
                format!(
                    "no consumer in the usage policy matches `{}`",
                    request.principal
                ),
            )
        })?;
        let scanned = scanned_datasets(&plan);
        let terms = agreed_terms(&resolved.grants, &scanned, request)?;
        for dataset in &scanned {
            if let Some(grant) = resolved.grants.get(dataset) {
                check_conditions(grant, dataset, request.at, terms.purpose.as_deref())?;
            }
        }
        let checker = Checker {
            policy: &self.policy,
            grants: &resolved.grants,
        };
        let lineage = checker.node(&plan)?;
        checker.output(&plan, &lineage)?;

        let (output_class, output_tags) = self.output_class(&lineage);
        let max_rows = scanned
            .iter()
            .filter_map(|d| resolved.grants.get(d)?.max_rows)
            .min();
        let rewriter = Rewriter {
            policy: &self.policy,
            grants: &resolved.grants,
            attributes: &resolved.attributes,
            hash_key: self.policy.hash_key(&resolved.consumers),
            next_column: Cell::new(0),
        };
        let cannot_rewrite = |e: datafusion_common::DataFusionError| {
            Denial::forbidden(
                DENY_BY_DEFAULT,
                format!("the plan cannot be rewritten safely: {e}"),
            )
        };
        let dp_datasets: Vec<&String> = scanned
            .iter()
            .filter(|d| resolved.grants.get(*d).is_some_and(|g| g.dp.is_some()))
            .collect();
        let (rewritten, dp) = match dp_datasets.as_slice() {
            [] => (
                rewriter.rewrite(plan, max_rows).map_err(cannot_rewrite)?,
                None,
            ),
            [dataset] => {
                let query =
                    self.plan_private(request, &rewriter, &resolved, dataset, plan, max_rows)?;
                (query.plan.clone(), Some(Box::new(query)))
            }
            several => {
                return Err(Denial::forbidden(
                    DENY_BY_DEFAULT,
                    format!(
                        "a differentially private query reads one dataset under dp (plus public ones); this one reads {}",
                        join(several)
                    ),
                ));
            }
        };
        let key = request
            .principal
            .organization
            .clone()
            .unwrap_or_else(|| request.principal.id.clone());
        let mut rules = self.rules_applied(&resolved, &scanned, max_rows);
        if let Some(entry) = request
            .principal
            .via
            .as_deref()
            .and_then(|b| self.policy.broker_entry(b))
        {
            rules.insert(0, format!("{} (relayed)", entry.rule));
        }
        if let Some(query) = &dp {
            rules.push(format!(
                "{}.dp (ε = {}, δ = {}, {}; {})",
                resolved.grants[&query.dataset].rule,
                query.epsilon,
                query.delta,
                query.limits_summary(),
                query.split_summary()
            ));
        }
        let record = DecisionRecord {
            policy_version: self.policy.version().to_string(),
            consumers: resolved.consumers.iter().map(|c| c.name.clone()).collect(),
            rules,
            datasets: scanned.iter().cloned().collect(),
            purpose: terms.purpose,
            agreements: terms.agreements,
            output_class,
            output_tags,
            quota: resolved.quotas.map(|quotas| crate::QuotaCharge {
                key: key.clone(),
                quotas,
            }),
            max_rows,
            privacy: dp.as_ref().map(|q| PrivacyCharge {
                key: key.clone(),
                dataset: q.dataset.clone(),
                epsilon: q.epsilon,
                delta: q.delta,
                zcdp: q.zcdp.clone(),
                budget: q.budget.clone(),
            }),
        };
        Ok(Approval {
            plan: rewritten,
            record,
            dp,
        })
    }

    fn describe_plan(&self, principal: &Principal, plan: &LogicalPlan) -> String {
        let mut text = plan.display_indent().to_string();
        for (dataset, column) in self.hidden_columns(principal) {
            text = replace_word(
                &text,
                &format!("{dataset}.{column}"),
                &format!("{dataset}.<hidden>"),
            );
            text = replace_word(&text, &column, "<hidden>");
        }
        text
    }

    fn visible_columns(&self, principal: &Principal, dataset: &str) -> Option<Vec<Field>> {
        let resolved = self.policy.resolve(principal)?;
        let grant = resolved.grants.get(dataset)?;
        let schema = &self.policy.datasets.get(dataset)?.schema;
        let fields = crate::offers::visible_fields(schema, grant);
        Some(fields.into_iter().map(|(field, _)| field).collect())
    }

    fn policy_set(&self) -> Option<&PolicySet> {
        Some(&self.policy)
    }

    /// Every column not hidden by the principal's grant, and under dp the
    /// privacy unit, which COUNT(DISTINCT <unit>) counts (it can be used
    /// for nothing else: the checker refuses it anywhere else).
    fn planning_view(&self, principal: &Principal, dataset: &str) -> PlanningView {
        let Some(resolved) = self.policy.resolve(principal) else {
            return PlanningView::Hidden;
        };
        let (Some(grant), Some(rules)) = (
            resolved.grants.get(dataset),
            self.policy.datasets.get(dataset),
        ) else {
            return PlanningView::Hidden;
        };
        let unit = rules.privacy_unit.as_deref().filter(|_| grant.dp.is_some());
        PlanningView::Columns(
            rules
                .schema
                .fields()
                .iter()
                .map(|f| f.name())
                .filter(|name| {
                    grant.visibility(name) != Visibility::Hidden || Some(name.as_str()) == unit
                })
                .cloned()
                .collect(),
        )
    }
}

impl PolicyGate {
    /// The DP form of an allowed query over `dataset` (a dataset under dp).
    fn plan_private(
        &self,
        request: &QueryContext,
        rewriter: &Rewriter,
        resolved: &Resolved,
        dataset: &str,
        plan: LogicalPlan,
        max_rows: Option<u64>,
    ) -> Result<DpQuery, Denial> {
        let grant = &resolved.grants[dataset];
        let dp = grant.dp.as_ref().expect("called for dp grants only");
        let rule = format!("{}.dp", grant.rule);
        let refuse = |message: String| Denial::forbidden(rule.clone(), message);
        let epsilon = request.epsilon.unwrap_or(dp.default_epsilon);
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(refuse(format!(
                "ε must be a number above 0, found {epsilon}"
            )));
        }
        if epsilon > dp.epsilon_cap {
            return Err(refuse(format!(
                "this query asks for ε = {}, above the {} allowed per query on dataset `{dataset}`",
                short_number(epsilon),
                dp.epsilon_cap
            )));
        }
        if epsilon < dp.min_epsilon {
            return Err(refuse(format!(
                "this query asks for ε = {}, below the {} a query on dataset `{dataset}` must spend at least (min_epsilon_per_query): a smaller ε buys a useless answer and one more observation of what noise does not cover",
                short_number(epsilon),
                dp.min_epsilon
            )));
        }
        for other in scanned_datasets(&plan) {
            let public = self
                .policy
                .datasets
                .get(&other)
                .is_some_and(|d| d.metadata.public);
            if other != dataset && !public {
                return Err(refuse(format!(
                    "under differential privacy `{dataset}` may be joined only with datasets the policy marks `public: true`; `{other}` is not"
                )));
            }
        }
        let unsupported = |e: datafusion_common::DataFusionError| {
            refuse(
                e.strip_backtrace()
                    .trim_start_matches("Error during planning: ")
                    .to_string(),
            )
        };
        let rewritten = rewriter
            .rewrite_scans(plan, max_rows)
            .map_err(unsupported)?;
        let aggregate = find_private_aggregate(&rewritten).map_err(|e| refuse(e.to_string()))?;
        let (input, units) = rewriter
            .expose_units(std::sync::Arc::unwrap_or_clone(aggregate.input.clone()))
            .map_err(unsupported)?;
        let [(unit, _)] = units.as_slice() else {
            return Err(refuse(format!(
                "the privacy unit of `{dataset}` must reach the aggregate exactly once; supported: {SUPPORTED}"
            )));
        };
        DpQuery::build(
            rewritten.clone(),
            &aggregate,
            input,
            DpRequest {
                dataset,
                unit: unit.clone(),
                privacy_unit: self.policy.datasets[dataset]
                    .privacy_unit
                    .as_deref()
                    .unwrap_or_default(),
                grant: dp,
                epsilon,
            },
        )
        .map_err(unsupported)
    }

    fn hidden_columns(&self, principal: &Principal) -> Vec<(String, String)> {
        let granted = self
            .policy
            .resolve(principal)
            .map(|r| r.grants)
            .unwrap_or_default();
        let mut hidden = Vec::new();
        for (name, dataset) in &self.policy.datasets {
            for field in dataset.schema.fields() {
                let visible = granted
                    .get(name)
                    .is_some_and(|g| g.visibility(field.name()) != Visibility::Hidden);
                if !visible {
                    hidden.push((name.clone(), field.name().clone()));
                }
            }
        }
        hidden
    }

    fn output_class(&self, lineage: &crate::lineage::NodeLineage) -> (Class, Vec<Tag>) {
        let mut class = Class::General;
        let mut tags = BTreeSet::new();
        for column in &lineage.columns {
            if column.level == Level::Constant {
                continue;
            }
            for source in &column.sources {
                let column_class = self.policy.datasets[&source.dataset].class_of(&source.column);
                class = class.max(column_class.class);
                tags.extend(column_class.tags);
            }
        }
        (class, tags.into_iter().collect())
    }

    fn rules_applied(
        &self,
        resolved: &Resolved,
        scanned: &BTreeSet<String>,
        max_rows: Option<u64>,
    ) -> Vec<String> {
        let mut rules = Vec::new();
        for dataset in scanned {
            let Some(grant) = resolved.grants.get(dataset) else {
                continue;
            };
            rules.push(grant.rule.clone());
            if grant.row_filter.is_some() {
                rules.push(format!("{}.row_filter", grant.rule));
            }
            let masked: Vec<&String> = grant
                .columns
                .iter()
                .filter(|(_, v)| matches!(v, Visibility::Masked(_)))
                .map(|(c, _)| c)
                .collect();
            if !masked.is_empty() {
                rules.push(format!(
                    "{}.columns (masked: {})",
                    grant.rule,
                    join(&masked)
                ));
            }
            // Under dp, noise and group selection take the place of k.
            // k is named with what it does not do, so that nobody reads
            // more into this line than it gives.
            if let Some(k) = grant.min_group_size.filter(|_| grant.dp.is_none()) {
                rules.push(format!(
                    "{}.aggregation (k = {k} distinct privacy units; k does not stop differencing: aggregates whose filters differ by one unit reveal it, only dp bounds that)",
                    grant.rule
                ));
            }
        }
        if let Some(n) = max_rows {
            rules.push(format!("max_rows = {n}"));
        }
        rules
    }
}

/// A plan shape the DP planner cannot bound: `shape` names the part of the
/// query at fault; the message lists what is supported instead.
#[derive(Debug, thiserror::Error)]
#[error("{shape} is not supported under differential privacy; supported: {SUPPORTED}")]
struct UnsupportedUnderDp {
    shape: String,
}

/// The one aggregate of a DP query, reached from the top through nodes that
/// only post-process its output (projection, HAVING, ORDER BY, LIMIT); below
/// it only row-wise nodes and inner joins.
fn find_private_aggregate(
    plan: &LogicalPlan,
) -> Result<datafusion_expr::logical_plan::Aggregate, UnsupportedUnderDp> {
    let unsupported = |shape: String| Err(UnsupportedUnderDp { shape });
    let mut node = plan;
    let aggregate = loop {
        match node {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_) => node = node.inputs()[0],
            LogicalPlan::Aggregate(a) => break a,
            LogicalPlan::TableScan(_) => return unsupported("releasing rows".to_string()),
            other => return unsupported(format!("`{}` above the aggregate", other.display())),
        }
    };
    let mut problem = None;
    let _ = aggregate.input.apply(|n| {
        let fine = match n {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::TableScan(_) => true,
            LogicalPlan::Join(j) => j.join_type == datafusion_common::JoinType::Inner,
            _ => false,
        };
        if !fine {
            problem = Some(format!("`{}` below the aggregate", n.display()));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match problem {
        Some(shape) => unsupported(shape),
        None => Ok(aggregate.clone()),
    }
}

/// What the agreements of a query establish: their ids, and the one
/// purpose the query runs under (declared, else the agreements').
struct Terms {
    agreements: Vec<String>,
    purpose: Option<String>,
}

/// Every grant the plan reads that needs an agreement must have an active
/// one, and all of them, with the declared purpose if any, must agree on a
/// single purpose.
fn agreed_terms(
    grants: &BTreeMap<String, DatasetGrant>,
    scanned: &BTreeSet<String>,
    request: &QueryContext,
) -> Result<Terms, Denial> {
    let mut terms = Terms {
        agreements: Vec::new(),
        purpose: request.purpose.clone(),
    };
    for dataset in scanned {
        let Some(grant) = grants.get(dataset) else {
            continue;
        };
        for needed in &grant.agreements {
            let rule = format!("{}.agreement", grant.rule);
            let Some(agreement) = request.agreements.get(&needed.offer) else {
                return Err(precondition(
                    rule,
                    format!(
                        "dataset `{dataset}` is used under an agreement: request one for offer `{}` (sluice.v1.AgreementService/RequestAgreement{})",
                        needed.offer,
                        match needed.approval {
                            crate::document::ApprovalMode::Automatic => ", approved at once",
                            crate::document::ApprovalMode::Manual => ", approved by the provider",
                        }
                    ),
                ));
            };
            match (&terms.purpose, &request.purpose) {
                (None, _) => terms.purpose = Some(agreement.purpose.clone()),
                (Some(p), _) if *p == agreement.purpose => {}
                (Some(declared), Some(_)) => {
                    return Err(precondition(
                        rule,
                        format!(
                            "agreement `{}` for offer `{}` covers purpose `{}`, not the declared `{declared}`",
                            agreement.id, needed.offer, agreement.purpose
                        ),
                    ));
                }
                (Some(other), None) => {
                    return Err(precondition(
                        rule,
                        format!(
                            "the query's agreements cover different purposes (`{other}`, `{}`); declare one with the x-sluice-purpose header",
                            agreement.purpose
                        ),
                    ));
                }
            }
            if !terms.agreements.contains(&agreement.id) {
                terms.agreements.push(agreement.id.clone());
            }
        }
    }
    Ok(terms)
}

fn precondition(rule: String, message: String) -> Denial {
    Denial {
        kind: DenialKind::Precondition,
        rule,
        message,
    }
}

/// Validity window and purpose: conditions of use, checked before the
/// plan. `purpose` is the query's, declared or fixed by its agreements.
fn check_conditions(
    grant: &DatasetGrant,
    dataset: &str,
    at: SystemTime,
    purpose: Option<&str>,
) -> Result<(), Denial> {
    let now: DateTime<Utc> = at.into();
    if let Some(from) = grant.valid_from
        && now < from
    {
        return Err(precondition(
            format!("{}.valid_from", grant.rule),
            format!(
                "your grant for dataset `{dataset}` is valid from {}",
                from.to_rfc3339()
            ),
        ));
    }
    if let Some(until) = grant.valid_until
        && now > until
    {
        return Err(precondition(
            format!("{}.valid_until", grant.rule),
            format!(
                "your grant for dataset `{dataset}` expired at {}",
                until.to_rfc3339()
            ),
        ));
    }
    if let Some(purposes) = &grant.purposes {
        let allowed: Vec<&String> = purposes.iter().collect();
        match purpose {
            Some(purpose) if purposes.contains(purpose) => {}
            Some(purpose) => {
                return Err(precondition(
                    format!("{}.purposes", grant.rule),
                    format!(
                        "purpose `{purpose}` is not allowed for dataset `{dataset}`; allowed: {}",
                        join(&allowed)
                    ),
                ));
            }
            None => {
                return Err(precondition(
                    format!("{}.purposes", grant.rule),
                    format!(
                        "dataset `{dataset}` requires a declared purpose: send the x-sluice-purpose header with one of: {}",
                        join(&allowed)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn scanned_datasets(plan: &LogicalPlan) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            out.insert(scan.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

fn min_option(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replaces `word` in `text` where it is not part of a longer identifier.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + word.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

impl Matcher {
    /// Whether `principal`'s certificate has every attribute this matcher
    /// gives. A `group` is not resolved here (that needs a policy's groups).
    pub fn matches_attributes(&self, principal: &Principal) -> bool {
        let field_ok = |want: &Option<String>, have: Option<&String>| {
            want.as_ref().is_none_or(|w| have == Some(w))
        };
        field_ok(&self.organization, principal.organization.as_ref())
            && field_ok(&self.common_name, principal.common_name.as_ref())
            && self.san_uri.as_ref().is_none_or(|pattern| {
                principal
                    .san_uris
                    .iter()
                    .any(|uri| wildcard_match(pattern, uri))
            })
    }
}

/// `*` matches any run of characters; everything else literally.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// A number as the consumer would write it: plain in the usual range, in
/// scientific notation outside it (`1e-300` is not 300 digits long).
fn short_number(value: f64) -> String {
    if value == 0.0 || (1e-4..1e9).contains(&value.abs()) {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::{short_number, wildcard_match};

    #[test]
    fn numbers_in_messages_stay_short() {
        assert_eq!(short_number(0.5), "0.5");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(1e-300), "1e-300");
        assert_eq!(short_number(5e-324), "5e-324");
        assert_eq!(short_number(1e-9), "1e-9");
    }

    #[test]
    fn replaces_whole_identifiers_only() {
        assert_eq!(
            super::replace_word("t.card_id, card_ids, card_id", "card_id", "<h>"),
            "t.<h>, card_ids, <h>"
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("spiffe://city/*", "spiffe://city/org/a"));
        assert!(wildcard_match("spiffe://*/org/a", "spiffe://city/org/a"));
        assert!(!wildcard_match("spiffe://city/*", "spiffe://town/org/a"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("a*b*c", "acb"));
        assert!(!wildcard_match("ab*ba", "aba"));
    }
}
