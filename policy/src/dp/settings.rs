//! The `dp` block of a grant, checked against the dataset's schema.

use std::collections::BTreeMap;

use datafusion_common::ScalarValue;
use datafusion_common::arrow::datatypes::{DataType, Schema};

pub use crate::document::Accounting;
use crate::document::{Candidates, DpRule, KeyValue, Limit, NoiseKind, ValueBounds};
use crate::dp::Period;
use crate::dp::auto::{self, AutoSettings};

/// δ one query spends when the policy does not say.
pub const DEFAULT_DELTA_PER_QUERY: f64 = 1e-7;
/// Smallest ε per query when the policy does not say (capped at
/// `epsilon_per_query`): with the demo's 10 ε a month, at most 1,000 queries.
pub const DEFAULT_MIN_EPSILON: f64 = 0.01;
/// No policy may allow a smaller ε per query: below it the noise of any
/// sum outgrows the 64-bit integers it is drawn in, and a query buys
/// nothing but another chance to observe what is not noised.
pub const LOWEST_MIN_EPSILON: f64 = 1e-6;
/// Quantile candidates between the bounds when the policy does not list them.
pub const DEFAULT_CANDIDATES: u32 = 101;
/// Most candidates a column may declare (the mechanism scores each one).
const MAX_CANDIDATES: usize = 10_000;
/// Most rows or groups per unit a policy may allow: keeps the sensitivity,
/// and so every fixed-point sum, far from overflow.
const MAX_CONTRIBUTION: u64 = 1 << 16;

/// A compiled `dp` block.
#[derive(Debug, Clone, PartialEq)]
pub struct DpGrant {
    pub epsilon_cap: f64,
    /// Smallest ε one query may spend.
    pub min_epsilon: f64,
    pub default_epsilon: f64,
    pub delta_per_query: f64,
    pub budget: Option<Budget>,
    pub max_groups: u64,
    pub max_rows: u64,
    pub noise: NoiseKind,
    pub columns: BTreeMap<String, ColumnBounds>,
    pub public_keys: BTreeMap<String, Vec<ScalarValue>>,
    pub cache: bool,
    /// Share of each query's ε spent on the bias estimates (0 to 0.5).
    pub bias_share: f64,
    /// The bounds written `auto`: their fields above hold the worst case
    /// (the top of their grid) until a query chooses them.
    pub auto: AutoSettings,
}

/// Total budget per organization and period.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub epsilon: f64,
    pub delta: f64,
    /// The window the budget applies to (`budget.period`).
    pub period: Period,
    /// How the queries charged to it compose (`budget.accounting`).
    pub accounting: Accounting,
}

/// Clamping bounds and quantile candidates of one numeric column.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnBounds {
    pub lower: f64,
    pub upper: f64,
    pub candidates: Vec<f64>,
}

impl Budget {
    /// The stricter of two budgets, field by field: the smaller ε (with
    /// its period) and the smaller δ, composed in zCDP only if both are
    /// (zCDP spends δ on its conversion, which a basic budget with δ 0,
    /// pure DP, does not allow).
    pub fn restrict(&self, other: &Budget) -> Budget {
        let base = if other.epsilon < self.epsilon {
            other
        } else {
            self
        };
        let delta = self.delta.min(other.delta);
        let both_zcdp = self.accounting == Accounting::Zcdp && other.accounting == Accounting::Zcdp;
        Budget {
            epsilon: base.epsilon,
            delta,
            period: base.period,
            accounting: if both_zcdp && delta > 0.0 {
                Accounting::Zcdp
            } else {
                Accounting::Basic
            },
        }
    }
}

impl ColumnBounds {
    /// The largest absolute value a clamped value can take.
    pub fn max_abs(&self) -> f64 {
        self.lower.abs().max(self.upper.abs())
    }
}

/// A problem with the `dp` block: the field below `dp` and the reason.
pub type DpError = (String, String);

impl DpGrant {
    /// Checks `rule` against the dataset's `schema`.
    pub fn compile(rule: &DpRule, schema: &Schema) -> Result<Self, DpError> {
        let epsilon_cap = positive("epsilon_per_query", rule.epsilon_per_query)?;
        let default_epsilon = positive(
            "default_epsilon",
            rule.default_epsilon.unwrap_or(epsilon_cap),
        )?;
        if default_epsilon > epsilon_cap {
            return Err(field(
                "default_epsilon",
                format!("{default_epsilon} is above epsilon_per_query ({epsilon_cap})"),
            ));
        }
        let min_epsilon = min_epsilon(rule.min_epsilon_per_query, epsilon_cap)?;
        if default_epsilon < min_epsilon {
            return Err(field(
                "default_epsilon",
                format!("{default_epsilon} is below min_epsilon_per_query ({min_epsilon})"),
            ));
        }
        let delta_per_query = rule.delta_per_query.unwrap_or(DEFAULT_DELTA_PER_QUERY);
        if !(delta_per_query > 0.0 && delta_per_query < 1e-3) {
            return Err(field(
                "delta_per_query",
                "must be above 0 and below 0.001 (δ is the chance the guarantee fails)",
            ));
        }
        let budget = rule
            .budget
            .as_ref()
            .map(|b| budget(b, rule.noise))
            .transpose()?;
        let auto_share = share("auto_share", rule.auto_share, auto::DEFAULT_AUTO_SHARE)?;
        if auto_share == 0.0 {
            return Err(field(
                "auto_share",
                "must be from 0.01 to 0.5: bounds written `auto` are paid from it",
            ));
        }
        let mut auto = AutoSettings {
            share: auto_share,
            ..AutoSettings::default()
        };
        let (max_groups, chosen) = contribution("max_groups", rule.max_groups)?;
        auto.max_groups = chosen;
        let (max_rows, chosen) = contribution("max_rows", rule.max_rows)?;
        auto.max_rows = chosen;
        let mut columns = BTreeMap::new();
        for (name, column) in &rule.columns {
            let bounds = bounds(name, &column.value, schema)?;
            if column.value.bounds == ValueBounds::Chosen(crate::document::Auto::Auto) {
                auto.columns
                    .insert(name.clone(), bounds.candidates.len() as u32);
            }
            columns.insert(name.clone(), bounds);
        }
        let mut public_keys = BTreeMap::new();
        for (name, keys) in &rule.public_keys {
            public_keys.insert(name.clone(), public_key_values(name, &keys.value, schema)?);
        }
        Ok(Self {
            epsilon_cap,
            min_epsilon,
            default_epsilon,
            delta_per_query,
            budget,
            max_groups,
            max_rows,
            noise: rule.noise,
            columns,
            public_keys,
            cache: rule.cache.unwrap_or(true),
            bias_share: bias_share(rule.bias_share)?,
            auto,
        })
    }

    /// The stricter of two blocks for the same dataset (a principal matching
    /// two consumers): smaller ε, smaller contributions, tighter budget.
    pub fn restrict(&self, other: &DpGrant) -> DpGrant {
        let mut out = self.clone();
        out.epsilon_cap = self.epsilon_cap.min(other.epsilon_cap);
        out.min_epsilon = self.min_epsilon.max(other.min_epsilon);
        out.default_epsilon = self.default_epsilon.min(other.default_epsilon);
        out.delta_per_query = self.delta_per_query.min(other.delta_per_query);
        out.max_groups = self.max_groups.min(other.max_groups);
        out.max_rows = self.max_rows.min(other.max_rows);
        // A fixed bound is stricter than `auto` (whose worst case is the
        // grid's top); auto stays only where both are.
        out.auto = self.auto.restrict(&other.auto);
        out.budget = match (&self.budget, &other.budget) {
            (Some(a), Some(b)) => Some(a.restrict(b)),
            (a, b) => a.clone().or(b.clone()),
        };
        out.columns
            .retain(|name, _| other.columns.contains_key(name));
        for (name, bounds) in out.columns.iter_mut() {
            if self.auto.columns.contains_key(name) && !other.auto.columns.contains_key(name) {
                *bounds = other.columns[name].clone();
            }
            // Both auto: the worst case keeps the smaller candidate count.
            if let Some(&count) = out.auto.columns.get(name) {
                bounds.candidates = evenly_spaced(bounds.lower, bounds.upper, count.max(2));
            }
        }
        out.public_keys
            .retain(|name, keys| other.public_keys.get(name) == Some(keys));
        out.cache = self.cache && other.cache;
        // Either share is allowed by its own block; the smaller keeps more
        // of the ε for the answer.
        out.bias_share = self.bias_share.min(other.bias_share);
        if other.noise == NoiseKind::Gaussian {
            out.noise = NoiseKind::Gaussian;
        }
        out
    }
}

fn field(name: &str, message: impl Into<String>) -> DpError {
    (name.to_string(), message.into())
}

/// Share of ε for the bias estimates when the policy does not say.
pub const DEFAULT_BIAS_SHARE: f64 = 0.1;

fn bias_share(written: Option<f64>) -> Result<f64, DpError> {
    share("bias_share", written, DEFAULT_BIAS_SHARE)
}

/// A share of each query's ε: 0 (off) or from 1% to 50%.
fn share(name: &str, written: Option<f64>, default: f64) -> Result<f64, DpError> {
    let share = written.unwrap_or(default);
    // Below 1% the estimates would be too noisy to read, and at a small ε
    // their noise would not fit in 64 bits: the query would be refused.
    if share == 0.0 || (0.01..=0.5).contains(&share) {
        Ok(share)
    } else {
        Err(field(
            name,
            format!("must be 0 (off) or from 0.01 to 0.5, found {share}"),
        ))
    }
}

fn positive(name: &str, value: f64) -> Result<f64, DpError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(field(
            name,
            format!("must be a finite number above 0, found {value}"),
        ))
    }
}

/// The floor on ε per query: as written (at least [`LOWEST_MIN_EPSILON`],
/// at most the cap), else [`DEFAULT_MIN_EPSILON`] capped at the cap.
fn min_epsilon(written: Option<f64>, epsilon_cap: f64) -> Result<f64, DpError> {
    let Some(min) = written else {
        return Ok(DEFAULT_MIN_EPSILON.min(epsilon_cap));
    };
    let min = positive("min_epsilon_per_query", min)?;
    if min < LOWEST_MIN_EPSILON {
        return Err(field(
            "min_epsilon_per_query",
            format!(
                "{min} is below {LOWEST_MIN_EPSILON}: so small an ε buys no useful answer, only another observation of what is not noised"
            ),
        ));
    }
    if min > epsilon_cap {
        return Err(field(
            "min_epsilon_per_query",
            format!("{min} is above epsilon_per_query ({epsilon_cap})"),
        ));
    }
    Ok(min)
}

/// A contribution limit, and whether it is `auto` (then its worst case).
fn contribution(name: &str, value: Option<Limit>) -> Result<(u64, bool), DpError> {
    match value.unwrap_or(Limit::Fixed(1)) {
        Limit::Chosen(_) => Ok((auto::CONTRIBUTION_CEILING, true)),
        Limit::Fixed(0) => Err(field(name, "must be at least 1, or `auto`")),
        Limit::Fixed(n) if n > MAX_CONTRIBUTION => Err(field(
            name,
            format!("at most {MAX_CONTRIBUTION}: a larger limit makes the noise useless"),
        )),
        Limit::Fixed(n) => Ok((n, false)),
    }
}

fn budget(budget: &crate::document::DpBudget, noise: NoiseKind) -> Result<Budget, DpError> {
    let epsilon = positive("budget.epsilon", budget.epsilon)?;
    if !(budget.delta.is_finite() && (0.0..1e-3).contains(&budget.delta)) {
        return Err(field("budget.delta", "must be at least 0 and below 0.001"));
    }
    if budget.accounting == Accounting::Zcdp {
        if noise != NoiseKind::Gaussian {
            // Laplace noise is pure ε-DP: in zCDP each query would cost
            // ε²/2, which only pays off after hundreds of queries.
            return Err(field(
                "budget.accounting",
                "zcdp composes Gaussian noise: set `noise: gaussian`, or keep the default `basic` accounting for Laplace noise",
            ));
        }
        if budget.delta == 0.0 {
            return Err(field(
                "budget.delta",
                "zcdp accounting converts the total to (ε, δ) and needs a δ above 0 (for example 1e-6)",
            ));
        }
    }
    let period = budget
        .period
        .parse::<Period>()
        .map_err(|why| field("budget.period", why.to_string()))?;
    Ok(Budget {
        epsilon,
        delta: budget.delta,
        period,
        accounting: budget.accounting,
    })
}

fn bounds(
    name: &str,
    column: &crate::document::DpColumn,
    schema: &Schema,
) -> Result<ColumnBounds, DpError> {
    let at = format!("columns.{name}");
    let data_type = schema
        .field_with_name(name)
        .map_err(|_| field(&at, format!("the dataset has no column `{name}`")))?
        .data_type();
    if !data_type.is_numeric() {
        return Err(field(
            &at,
            format!("bounds apply to numeric columns; `{name}` is {data_type}"),
        ));
    }
    let [lower, upper] = match column.bounds {
        ValueBounds::Fixed(range) => range,
        ValueBounds::Chosen(_) => {
            if let Some(Candidates::List(_)) = column.candidates {
                return Err(field(
                    &format!("{at}.candidates"),
                    "with `bounds: auto` give a number of candidates (spread over the chosen bounds), not a list",
                ));
            }
            [-auto::VALUE_CEILING, auto::VALUE_CEILING]
        }
    };
    if !(lower.is_finite() && upper.is_finite() && lower < upper) {
        return Err(field(
            &format!("{at}.bounds"),
            "must be two finite numbers, lower below upper",
        ));
    }
    if lower.abs().max(upper.abs()) > 1e12 {
        return Err(field(
            &format!("{at}.bounds"),
            "bounds beyond ±1e12 leave no room for fixed-point sums",
        ));
    }
    let candidates = match &column.candidates {
        None => evenly_spaced(lower, upper, DEFAULT_CANDIDATES),
        Some(Candidates::Count(n)) if *n >= 2 && (*n as usize) <= MAX_CANDIDATES => {
            evenly_spaced(lower, upper, *n)
        }
        Some(Candidates::List(list))
            if !list.is_empty()
                && list.len() <= MAX_CANDIDATES
                && list.iter().all(|c| (lower..=upper).contains(c))
                && list.windows(2).all(|w| w[0] < w[1]) =>
        {
            list.clone()
        }
        Some(_) => {
            return Err(field(
                &format!("{at}.candidates"),
                format!(
                    "a count from 2 to {MAX_CANDIDATES}, or a strictly increasing list within the bounds"
                ),
            ));
        }
    };
    Ok(ColumnBounds {
        lower,
        upper,
        candidates,
    })
}

pub(super) fn evenly_spaced(lower: f64, upper: f64, n: u32) -> Vec<f64> {
    let step = (upper - lower) / f64::from(n - 1);
    (0..n).map(|i| lower + step * f64::from(i)).collect()
}

fn public_key_values(
    name: &str,
    keys: &[KeyValue],
    schema: &Schema,
) -> Result<Vec<ScalarValue>, DpError> {
    let at = format!("public_keys.{name}");
    let data_type = schema
        .field_with_name(name)
        .map_err(|_| field(&at, format!("the dataset has no column `{name}`")))?
        .data_type()
        .clone();
    if keys.is_empty() {
        return Err(field(&at, "list at least one key"));
    }
    let mut out: Vec<ScalarValue> = Vec::with_capacity(keys.len());
    for key in keys {
        let value = match key {
            KeyValue::Bool(b) => ScalarValue::Boolean(Some(*b)),
            KeyValue::Integer(i) => ScalarValue::Int64(Some(*i)),
            KeyValue::Float(f) => ScalarValue::Float64(Some(*f)),
            KeyValue::Text(t) => ScalarValue::Utf8(Some(t.clone())),
        };
        let cast = value.cast_to(&data_type).map_err(|_| {
            field(
                &at,
                format!("key `{value}` is not a value of the column's type {data_type}"),
            )
        })?;
        if out.contains(&cast) {
            return Err(field(&at, format!("key `{value}` is listed twice")));
        }
        out.push(cast);
    }
    if matches!(data_type, DataType::Float32 | DataType::Float64) {
        return Err(field(
            &at,
            "public keys on a floating-point column are not supported (group on a bucketed or integer column)",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_share_is_off_or_between_one_and_fifty_percent() {
        assert_eq!(bias_share(None), Ok(DEFAULT_BIAS_SHARE));
        assert_eq!(bias_share(Some(0.0)), Ok(0.0));
        assert_eq!(bias_share(Some(0.5)), Ok(0.5));
        for refused in [0.005, 0.6, -0.1, f64::NAN] {
            let (field, message) = bias_share(Some(refused)).unwrap_err();
            assert_eq!(field, "bias_share");
            assert!(message.contains("from 0.01 to 0.5"), "{message}");
        }
    }

    fn compile_dp(yaml: &str) -> Result<DpGrant, DpError> {
        use datafusion_common::arrow::datatypes::Field;
        let rule: DpRule = serde_saphyr::from_str(yaml).expect("a dp block");
        let schema = Schema::new(vec![
            Field::new("fare", DataType::Float64, true),
            Field::new("zone", DataType::Utf8, true),
        ]);
        DpGrant::compile(&rule, &schema)
    }

    #[test]
    fn auto_bounds_compile_to_their_worst_case() {
        let grant = compile_dp(
            "epsilon_per_query: 1\nmax_groups: auto\nmax_rows: 5\ncolumns:\n  fare: { bounds: auto, candidates: 11 }\n",
        )
        .unwrap();
        assert!(grant.auto.max_groups && !grant.auto.max_rows);
        assert_eq!(grant.max_groups, auto::CONTRIBUTION_CEILING);
        assert_eq!(grant.max_rows, 5);
        assert_eq!(grant.auto.columns["fare"], 11);
        assert_eq!(grant.columns["fare"].upper, auto::VALUE_CEILING);
        assert_eq!(grant.auto.share, auto::DEFAULT_AUTO_SHARE);
        // Fixed everywhere: nothing is auto.
        let fixed = compile_dp("epsilon_per_query: 1\nmax_rows: 5\n").unwrap();
        assert!(!fixed.auto.any());
        // A fixed bound restricts an auto one; auto stays where both are.
        let restricted = grant.restrict(&fixed);
        assert_eq!(
            (restricted.max_groups, restricted.auto.max_groups),
            (1, false)
        );
        assert!(restricted.auto.columns.is_empty());
        // Both auto: the worst case has the smaller candidate count, as the
        // auto settings do (the cache key and the median grid agree).
        let coarse =
            compile_dp("epsilon_per_query: 1\ncolumns:\n  fare: { bounds: auto, candidates: 5 }\n")
                .unwrap();
        for both in [grant.restrict(&coarse), coarse.restrict(&grant)] {
            assert_eq!(both.auto.columns["fare"], 5);
            assert_eq!(both.columns["fare"].candidates.len(), 5);
        }
    }

    #[test]
    fn auto_bounds_refuse_what_they_cannot_use() {
        for (yaml, at, says) in [
            (
                "epsilon_per_query: 1\nmax_rows: auto\nauto_share: 0\n",
                "auto_share",
                "from 0.01 to 0.5",
            ),
            (
                "epsilon_per_query: 1\nauto_share: 0.7\n",
                "auto_share",
                "from 0.01 to 0.5",
            ),
            (
                "epsilon_per_query: 1\ncolumns:\n  fare: { bounds: auto, candidates: [1, 2] }\n",
                "columns.fare.candidates",
                "not a list",
            ),
            (
                "epsilon_per_query: 1\nmax_rows: 0\n",
                "max_rows",
                "or `auto`",
            ),
        ] {
            let (field, message) = compile_dp(yaml).unwrap_err();
            assert_eq!(field, at, "{yaml}");
            assert!(message.contains(says), "{yaml}: {message}");
        }
        // Neither a number nor `auto`: refused when the YAML is read.
        let error = serde_saphyr::from_str::<DpRule>("epsilon_per_query: 1\nmax_rows: sometimes\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("a whole number of at least 1, or `auto`"),
            "{error}"
        );
    }

    fn written(delta: f64, accounting: Accounting) -> crate::document::DpBudget {
        crate::document::DpBudget {
            epsilon: 10.0,
            delta,
            period: "month".into(),
            accounting,
        }
    }

    #[test]
    fn zcdp_accounting_needs_gaussian_noise_and_a_delta() {
        let ok = budget(&written(1e-6, Accounting::Zcdp), NoiseKind::Gaussian).unwrap();
        assert_eq!(ok.accounting, Accounting::Zcdp);
        let (field, message) =
            budget(&written(1e-6, Accounting::Zcdp), NoiseKind::Laplace).unwrap_err();
        assert_eq!(field, "budget.accounting");
        assert!(message.contains("noise: gaussian"), "{message}");
        let (field, message) =
            budget(&written(0.0, Accounting::Zcdp), NoiseKind::Gaussian).unwrap_err();
        assert_eq!(field, "budget.delta");
        assert!(message.contains("above 0"), "{message}");
        // Basic accounting takes either noise and no δ.
        budget(&written(0.0, Accounting::Basic), NoiseKind::Laplace).unwrap();
    }

    #[test]
    fn restricting_budgets_keeps_the_stricter_of_each_field() {
        let zcdp = Budget {
            epsilon: 4.99,
            delta: 1e-6,
            period: Period::Month,
            accounting: Accounting::Zcdp,
        };
        let pure = Budget {
            epsilon: 5.0,
            delta: 0.0,
            period: Period::Total,
            accounting: Accounting::Basic,
        };
        // A partner's pure-DP budget is not swapped for a zCDP one with δ.
        for restricted in [zcdp.restrict(&pure), pure.restrict(&zcdp)] {
            assert_eq!(restricted.epsilon, 4.99);
            assert_eq!(restricted.delta, 0.0);
            assert_eq!(restricted.period, Period::Month);
            assert_eq!(restricted.accounting, Accounting::Basic);
        }
        let other_zcdp = Budget {
            epsilon: 8.0,
            delta: 1e-7,
            ..zcdp.clone()
        };
        let both = zcdp.restrict(&other_zcdp);
        assert_eq!((both.epsilon, both.delta), (4.99, 1e-7));
        assert_eq!(both.accounting, Accounting::Zcdp);
        let basic_with_delta = Budget {
            delta: 1e-6,
            ..pure.clone()
        };
        assert_eq!(
            zcdp.restrict(&basic_with_delta).accounting,
            Accounting::Basic
        );
    }

    #[test]
    fn accounting_is_written_in_plain_words() {
        let parsed: crate::document::DpBudget =
            serde_saphyr::from_str("{epsilon: 1, delta: 1.0e-6, accounting: zcdp}").unwrap();
        assert_eq!(parsed.accounting, Accounting::Zcdp);
        let default: crate::document::DpBudget = serde_saphyr::from_str("{epsilon: 1}").unwrap();
        assert_eq!(default.accounting, Accounting::Basic);
        assert!(
            serde_saphyr::from_str::<crate::document::DpBudget>("{epsilon: 1, accounting: rdp}")
                .is_err()
        );
    }
}
