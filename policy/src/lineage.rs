//! Column lineage: for every column a plan node outputs, which dataset
//! columns flowed into it and at what level (row by row, as a group key, or
//! through an aggregate).
//!
//! Lineage is what lets the checker follow a column through aliases,
//! projections, CTEs, subqueries, unions, joins, windows and CASE: a CTE is
//! only a `SubqueryAlias` over a `Projection`, so `WITH t AS (SELECT fare AS
//! f FROM trips) SELECT f FROM t` still outputs `trips.fare`, row by row.

use std::collections::BTreeSet;
use std::fmt;

use datafusion_expr::{Expr, LogicalPlan};

/// A column of a published dataset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub dataset: String,
    pub column: String,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.dataset, self.column)
    }
}

/// How a value relates to the rows it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    /// No dataset column flowed into it (a literal).
    #[default]
    Constant,
    /// One value per input row.
    Row,
    /// A GROUP BY key: one value per group.
    GroupKey,
    /// Computed by an aggregate function over a group.
    Aggregated,
}

/// Lineage of one output column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub sources: BTreeSet<Source>,
    /// Set when the column is a dataset column passed through unchanged
    /// (aliases and type-widening casts allowed).
    pub plain: Option<Source>,
    pub level: Level,
    /// Set when the value is an aggregate that grows with the rows of its
    /// group (`count`, `sum`, … see `checks::COUNT_LIKE_AGGREGATES`) passed
    /// through unchanged (aliases, lossless casts): a lower bound on it is
    /// a lower bound on the group's size.
    pub is_count: bool,
    /// Set when the value was computed from such an aggregate in any way
    /// (`count(*) - 5`, `round(count(*))`, a CASE over it): a filter that
    /// reads it may select groups by their size.
    pub count_derived: bool,
}

impl Lineage {
    pub fn of_source(source: Source) -> Self {
        Self {
            sources: BTreeSet::from([source.clone()]),
            plain: Some(source),
            level: Level::Row,
            is_count: false,
            count_derived: false,
        }
    }

    /// Lineage of a value computed from `inputs`.
    /// A value computed from a row-level value is row-level, whatever else
    /// went into it (a row value plus an aggregate still reveals the row).
    pub fn derived<'a>(inputs: impl IntoIterator<Item = &'a Lineage>) -> Self {
        let mut out = Lineage::default();
        let mut row_level = false;
        for input in inputs {
            out.sources.extend(input.sources.iter().cloned());
            out.level = out.level.max(input.level);
            out.count_derived |= input.count_derived;
            row_level |= input.level == Level::Row;
        }
        if row_level {
            out.level = Level::Row;
        }
        out
    }

    /// Merges the lineage of the same column from two UNION branches.
    pub fn union(&self, other: &Lineage) -> Self {
        let mut out = Lineage::derived([self, other]);
        if self.plain == other.plain {
            out.plain = self.plain.clone();
        }
        out.is_count = self.is_count && other.is_count;
        out
    }
}

/// The lineage of every output column of a plan node, plus what the checker
/// needs to know about the subtree below it.
#[derive(Debug, Clone, Default)]
pub struct NodeLineage {
    /// One entry per field of the node's output schema, in order.
    pub columns: Vec<Lineage>,
    /// Datasets scanned anywhere below (each scan once).
    pub scans: Vec<String>,
    /// Datasets that release only aggregates and whose rows have not yet
    /// passed through an aggregate.
    pub unaggregated: BTreeSet<String>,
    /// Of those, datasets whose rows were picked by position (LIMIT, OFFSET)
    /// before any aggregate: aggregating them would isolate single rows.
    pub position_selected: BTreeSet<String>,
    /// Whether an aggregate sits below.
    pub aggregated: bool,
    /// Datasets whose rows reach this node one by one: not yet through an
    /// aggregate that k (at least 2) or differential privacy protects.
    /// Any dataset, whatever its grant, unlike `unaggregated`.
    pub row_level: BTreeSet<String>,
    /// Dataset columns read row by row by a condition anywhere below (WHERE,
    /// HAVING, scan filters, join keys): if rows leave, each must be one
    /// that could leave too (`filter_only` would be readable row by row).
    pub condition_reads: BTreeSet<Source>,
    /// Set when this node's rows are ordered by a count-like value (see
    /// [`CountOrder`]): a LIMIT or OFFSET then selects groups by size.
    pub count_order: Option<CountOrder>,
}

/// How the rows of a node are ordered by a count-like key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountOrder {
    /// Largest groups first by a plain count (`ORDER BY count(*) DESC`): a
    /// LIMIT keeps the largest groups, which is allowed; an OFFSET skips
    /// them, which is not.
    pub largest_first: bool,
    /// The sort key, for messages (query text only, never data).
    pub key: String,
}

impl NodeLineage {
    /// The lineage of `column`, resolved against `plan`, the node this
    /// lineage describes.
    pub fn column(
        &self,
        plan: &LogicalPlan,
        column: &datafusion_common::Column,
    ) -> Option<&Lineage> {
        let index = plan.schema().index_of_column(column).ok()?;
        self.columns.get(index)
    }
}

/// Strips aliases and casts that cannot change a value (type widening), to
/// see whether an expression is a plain column reference. `schema` is the
/// schema the expression is evaluated against.
pub fn strip_plain<'e>(expr: &'e Expr, schema: &datafusion_common::DFSchema) -> &'e Expr {
    match expr {
        Expr::Alias(alias) => strip_plain(&alias.expr, schema),
        Expr::Cast(cast) if crate::casts::is_lossless_cast(cast, schema) => {
            strip_plain(&cast.expr, schema)
        }
        other => other,
    }
}
