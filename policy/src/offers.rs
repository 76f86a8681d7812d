//! The catalog as one principal sees it: the datasets it has a grant for,
//! their columns as it may use them, and the offers (one per matching
//! consumer entry) it may request agreements for.
//!
//! ```text
//! PolicySet::catalog(principal) ─▶ [CatalogEntry { metadata, columns (hidden ones absent), offers }]
//! PolicySet::offer(principal, "trips/city-research") ─▶ Offer { mode, purposes, dp, agreement, … }
//! ```
//!
//! Nothing here decides a query; [`crate::PolicyGate`] does. The catalog
//! only describes the same grants, so the two cannot disagree.

use datafusion_common::arrow::datatypes::SchemaRef;
use datafusion_common::arrow::datatypes::{DataType, Field};

use crate::PolicySet;
use crate::Principal;
use crate::compile::{AgreementTerms, ConsumerRules, DatasetGrant, DatasetRules, offer_id};
use crate::document::{Class, DatasetPolicy, Mask, Quotas, Tag, Visibility};
use crate::dp::DpGrant;

/// One dataset as a principal sees it.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: String,
    /// Title, description, publisher, keywords, license, `public`.
    pub metadata: DatasetPolicy,
    /// The highest class among the visible columns.
    pub classification: Class,
    pub columns: Vec<CatalogColumn>,
    pub offers: Vec<Offer>,
}

/// A column the principal can use, typed as queries return it.
#[derive(Debug, Clone)]
pub struct CatalogColumn {
    pub field: Field,
    pub visibility: Visibility,
    pub class: Class,
    pub tags: Vec<Tag>,
    /// Clamping bounds under differential privacy (fixed ones only).
    pub dp_bounds: Option<[f64; 2]>,
    /// Under differential privacy, each query chooses the bounds (`auto`).
    pub dp_bounds_auto: bool,
}

/// How results of an offer may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferMode {
    /// Rows may leave (as column visibility allows).
    Raw,
    /// Only aggregates over groups of at least `min_group_size` units.
    Aggregate,
    /// Only differentially private aggregates.
    Dp,
}

impl std::fmt::Display for OfferMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OfferMode::Raw => "raw",
            OfferMode::Aggregate => "aggregate",
            OfferMode::Dp => "dp",
        })
    }
}

/// One consumer entry's grant on one dataset, as terms a principal can
/// read and request an agreement for (ODRL: an offer with its constraints).
#[derive(Debug, Clone)]
pub struct Offer {
    /// `<dataset>/<consumer name>`.
    pub id: String,
    pub dataset: String,
    pub consumer: String,
    pub mode: OfferMode,
    /// Empty: any purpose.
    pub purposes: Vec<String>,
    pub min_group_size: Option<u64>,
    pub max_rows: Option<u64>,
    pub dp: Option<DpGrant>,
    pub valid_from: Option<chrono::DateTime<chrono::Utc>>,
    pub valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// `None`: usable without an agreement.
    pub agreement: Option<AgreementTerms>,
    pub quotas: Option<Quotas>,
}

impl PolicySet {
    /// The datasets `principal` has a grant for, by name, with the columns
    /// it may use and the offers it may request.
    pub fn catalog(&self, principal: &Principal) -> Vec<CatalogEntry> {
        let Some(resolved) = self.resolve(principal) else {
            return Vec::new();
        };
        resolved
            .grants
            .iter()
            .filter_map(|(name, grant)| {
                let dataset = self.datasets.get(name)?;
                let columns = catalog_columns(dataset, grant);
                let classification = columns.iter().map(|c| c.class).max().unwrap_or_default();
                let offers = resolved
                    .consumers
                    .iter()
                    .filter_map(|consumer| {
                        let grant = consumer.grants.get(name)?;
                        Some(offer(name, &consumer.name, grant, consumer.quotas))
                    })
                    .collect();
                Some(CatalogEntry {
                    name: name.clone(),
                    metadata: dataset.metadata.clone(),
                    classification,
                    columns,
                    offers,
                })
            })
            .collect()
    }

    /// The offer `id` if `principal` matches the consumer entry making it.
    pub fn offer(&self, principal: &Principal, id: &str) -> Option<Offer> {
        find_offer(self.resolve(principal)?.consumers.into_iter(), id)
    }

    /// Any offer by id, whoever it is for (provider administration).
    pub fn any_offer(&self, id: &str) -> Option<Offer> {
        find_offer(self.consumers.iter(), id)
    }

    /// Whether `principal` is a provider administrator (`admins:`).
    pub fn is_admin(&self, principal: &Principal) -> bool {
        self.admins.iter().any(|m| self.matches(m, principal))
    }
}

/// The offer `id` among the grants of `consumers`.
fn find_offer<'a>(consumers: impl Iterator<Item = &'a ConsumerRules>, id: &str) -> Option<Offer> {
    consumers.into_iter().find_map(|consumer| {
        consumer.grants.iter().find_map(|(dataset, grant)| {
            (offer_id(dataset, &consumer.name) == id)
                .then(|| offer(dataset, &consumer.name, grant, consumer.quotas))
        })
    })
}

fn offer(dataset: &str, consumer: &str, grant: &DatasetGrant, quotas: Option<Quotas>) -> Offer {
    let mode = match (&grant.dp, grant.min_group_size) {
        (Some(_), _) => OfferMode::Dp,
        (None, Some(_)) if !grant.rows_allowed => OfferMode::Aggregate,
        _ => OfferMode::Raw,
    };
    Offer {
        id: offer_id(dataset, consumer),
        dataset: dataset.to_string(),
        consumer: consumer.to_string(),
        mode,
        purposes: grant.purposes.iter().flatten().cloned().collect(),
        min_group_size: grant.min_group_size.filter(|_| grant.dp.is_none()),
        max_rows: grant.max_rows,
        dp: grant.dp.clone(),
        valid_from: grant.valid_from,
        valid_until: grant.valid_until,
        agreement: grant.agreements.first().cloned(),
        quotas,
    }
}

/// Said plainly wherever k-anonymity is on offer, because its name promises
/// more than it gives.
pub const DIFFERENCING_CAVEAT: &str = "k-anonymity does not stop differencing: two allowed aggregates whose filters differ by one unit or row (with and without it) reveal its value by subtraction";

impl Offer {
    /// What the offer guarantees about a single privacy unit, and what it
    /// does not, in plain words: the catalog's honest summary of its terms.
    pub fn guarantee(&self) -> String {
        let k = self.min_group_size.unwrap_or_default();
        match (self.mode, &self.dp) {
            (OfferMode::Dp, Some(dp)) => dp_guarantee(dp),
            (OfferMode::Dp, None) => "Only differentially private aggregates leave.".to_string(),
            (OfferMode::Aggregate, _) => format!(
                "Only aggregates leave, each over at least {k} distinct privacy units (smaller groups are suppressed). {DIFFERENCING_CAVEAT}; only differential privacy (an offer of mode dp) bounds what a series of queries reveals."
            ),
            (OfferMode::Raw, _) if self.min_group_size.is_some() => format!(
                "Rows leave as the column visibilities allow (masks applied). Every aggregate needs at least {k} distinct privacy units, which keeps aggregate_only columns out of single results, but {DIFFERENCING_CAVEAT}."
            ),
            (OfferMode::Raw, _) => "Rows leave as the column visibilities allow (masks applied); nothing protects single rows beyond the masks and the row filter.".to_string(),
        }
    }
}

fn dp_guarantee(dp: &DpGrant) -> String {
    let delta = match dp.delta_per_query {
        d if d > 0.0 => format!(", δ ≤ {} where a query needs one", number(d)),
        _ => String::new(),
    };
    let budget = match &dp.budget {
        Some(b) if b.period == crate::dp::Period::Total => format!(
            "composed over a budget of ε = {} (δ = {}) for your organization that never resets, which bounds what any series of queries reveals about one unit",
            number(b.epsilon),
            number(b.delta)
        ),
        Some(b) => format!(
            "composed over a budget of ε = {} (δ = {}) for your organization per {}, which bounds what the queries of one period reveal about one unit (it resets each period, so over several periods the bound adds up)",
            number(b.epsilon),
            number(b.delta),
            b.period
        ),
        None => "composed over every query; no total budget is set, so the bound grows with each query (spend is still recorded)".to_string(),
    };
    let limit = |chosen: bool, fixed: u64, what: &str| match chosen {
        true => format!("{what} (a number each query chooses from the data, privately)"),
        false => format!("{fixed} {what}"),
    };
    let auto_columns = match dp.auto.columns.is_empty() {
        true => String::new(),
        false => format!(
            " ({} with bounds each query chooses from the data, privately)",
            dp.auto
                .columns
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "ε-differential privacy per query (ε ≤ {}{delta}), {budget}. Results are noisy; each unit counts in at most {} with at most {} each, and values are clamped to the declared bounds{auto_columns}.",
        number(dp.epsilon_cap),
        limit(dp.auto.max_groups, dp.max_groups, "group(s)"),
        limit(dp.auto.max_rows, dp.max_rows, "row(s)")
    )
}

/// A number as people read it: `1e-8` rather than `0.00000001`.
fn number(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Visible columns in schema order, typed as a query returns them.
fn catalog_columns(dataset: &DatasetRules, grant: &DatasetGrant) -> Vec<CatalogColumn> {
    visible_fields(&dataset.schema, grant)
        .into_iter()
        .map(|(field, visibility)| {
            let class = dataset.class_of(field.name());
            let dp = grant.dp.as_ref();
            let dp_bounds_auto = dp.is_some_and(|dp| dp.auto.columns.contains_key(field.name()));
            // An auto column's compiled bounds are the grid's worst case,
            // not bounds any answer uses.
            let dp_bounds = dp
                .and_then(|dp| dp.columns.get(field.name()))
                .filter(|_| !dp_bounds_auto)
                .map(|b| [b.lower, b.upper]);
            CatalogColumn {
                field,
                visibility,
                class: class.class,
                tags: class.tags,
                dp_bounds,
                dp_bounds_auto,
            }
        })
        .collect()
}

/// The fields of `schema` the grant does not hide, with their visibility;
/// a hashed column is text and a redacted one nullable, as in results.
pub(crate) fn visible_fields(schema: &SchemaRef, grant: &DatasetGrant) -> Vec<(Field, Visibility)> {
    schema
        .fields()
        .iter()
        .filter_map(|field| {
            let field = field.as_ref().clone();
            let visibility = grant.visibility(field.name());
            let field = match &visibility {
                Visibility::Hidden => return None,
                Visibility::Masked(Mask::Hash) => {
                    field.with_data_type(DataType::Utf8).with_nullable(true)
                }
                Visibility::Masked(Mask::Redact) => field.with_nullable(true),
                _ => field,
            };
            Some((field, visibility))
        })
        .collect()
}
