//! Splits an aggregate query over a federated table into one partial query
//! per provider and one merge query the broker runs over their answers.
//!
//! ```text
//! SELECT start_zone, count(*) AS trips, avg(fare_eur) AS fare
//! FROM trips WHERE mode = 'bus' GROUP BY start_zone ORDER BY trips DESC LIMIT 5
//!
//! each provider:  SELECT start_zone, count(*) AS "p0", sum(fare_eur) AS "p1",
//!                        count(fare_eur) AS "p2"
//!                 FROM <its dataset> AS trips WHERE mode = 'bus' GROUP BY start_zone
//! broker:         SELECT __k0 AS "start_zone", __m0 AS "trips", __m1 AS "fare"
//!                 FROM (SELECT __k0, sum(__p0) AS __m0,
//!                              CASE WHEN sum(__p2) > 0 THEN sum(__p1) / sum(__p2) END AS __m1
//!                       FROM partials GROUP BY __k0)
//!                 ORDER BY "trips" DESC LIMIT 5
//! ```
//!
//! The partial answers become `partials(__k0…, __p0…)` by position; the
//! merge query's own names start with `__` so that they cannot be mistaken
//! for the consumer's columns.
//!
//! COUNT and SUM add, AVG is the sum of sums over the sum of counts, MIN and
//! MAX take the extreme of the extremes. Anything that does not split this
//! way (COUNT(DISTINCT …), other aggregates, joins, subqueries, rows without
//! aggregation) is refused with the reason. Each provider decides its partial
//! query under its own policy: the broker never asks for more than the
//! aggregates themselves.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, SelectItem,
    SetExpr, Statement, TableFactor, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::config::{BrokerConfig, FederatedTable};
use crate::query::bounded_dialect::{BoundedDialect, bracket_refusal};

/// The table name of the partial answers in the merge query.
pub const PARTIALS: &str = "partials";
/// Prefix of the merge query's helper columns.
pub const HIDDEN_PREFIX: &str = "__sluice_";

/// How one aggregate of the query is computed from partial aggregates.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    /// COUNT or SUM: the sum of the partial values (column `p<i>`).
    Add(usize),
    /// AVG: the sum of partial sums over the sum of partial counts.
    Ratio {
        sum: usize,
        count: usize,
    },
    Min(usize),
    Max(usize),
}

/// A query split for federation.
#[derive(Debug, Clone)]
pub struct Federated {
    /// The federated table queried.
    pub table: FederatedTable,
    /// Number of group keys: the partial answers' first columns (`k0…`),
    /// followed by the partial aggregates (`p0…`).
    pub keys: usize,
    pub partial_count: usize,
    /// The merge of each aggregate `m<i>`, in order.
    pub merges: Vec<Merge>,
    /// What each provider runs, by provider name.
    pub partial_sql: Vec<(String, String)>,
    /// What the broker runs over the table [`PARTIALS`].
    pub merge_sql: String,
    /// The output column holding each aggregate unchanged (for noise
    /// metadata): `(output index, aggregate index)`.
    pub plain_outputs: Vec<(usize, usize)>,
    /// The AVG aggregates (by index) whose merged count the merge query
    /// appends as extra last columns, one each, for their confidence
    /// intervals; the broker removes them before anything is sent.
    pub hidden_counts: Vec<usize>,
}

/// Refuses square brackets (array subscripts, slices and literals:
/// `a[1]`, `a[1:2]`, `[1, 2]`) before the statement is parsed. Nothing a
/// broker federates uses them (aggregates of scalar columns), and sqlparser
/// backtracks over them in exponential time: `SELECT a.b[1].c[` repeated
/// 13 times (117 bytes) took minutes to fail to parse, each repetition
/// about four times longer than the one before (found by
/// fuzz/fuzz_targets/broker_sql.rs). Brackets inside string literals and
/// quoted identifiers are tokens of their own and pass.
fn refuse_square_brackets(sql: &str) -> Result<(), Unsupported> {
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    // Text that does not tokenize fails to parse just as fast.
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return Ok(());
    };
    if tokens.iter().any(|t| matches!(t, Token::LBracket)) {
        return unsupported(
            "square brackets (array subscripts and literals) are not supported: federated \
             datasets have no array columns",
        );
    }
    Ok(())
}

/// Why a query cannot be federated; the message says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

fn unsupported<T>(message: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(message.into()))
}

const AGGREGATES: &[&str] = &["count", "sum", "avg", "mean", "min", "max"];

/// The statements in `sql`, parsed with a bound on the parser's work (see
/// `query::bounded_dialect`): the broker parses every consumer's SQL before
/// any provider sees it.
fn parse_bounded(sql: &str) -> Result<Vec<Statement>, Unsupported> {
    if let Some(refusal) = bracket_refusal(&GenericDialect {}, sql) {
        return Err(Unsupported(refusal));
    }
    let bounded = BoundedDialect::new(Box::new(GenericDialect {}), sql);
    Parser::new(&bounded)
        .try_with_sql(sql)
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| match bounded.exhausted() {
            true => Unsupported(bounded.exhausted_message()),
            false => Unsupported(format!("the SQL does not parse: {e}")),
        })
}

/// Splits `sql` for the federated tables of `config`.
pub fn decompose(sql: &str, config: &BrokerConfig) -> Result<Federated, Unsupported> {
    refuse_square_brackets(sql)?;
    let mut statements = parse_bounded(sql)?;
    let statement = match statements.len() {
        1 => statements.remove(0),
        0 => return unsupported("the request holds no SQL statement"),
        n => return unsupported(format!("send one statement at a time, not {n}")),
    };
    // The same bounds on depth and size as a provider's own planner applies:
    // everything below walks, clones and prints the statement.
    crate::query::plan::check_statement_limits(&statement)
        .map_err(|e| Unsupported(e.to_string()))?;
    let Statement::Query(query) = statement else {
        return unsupported("the broker answers SELECT queries only");
    };
    let query = *query;
    check_query_clauses(&query)?;
    let SetExpr::Select(select) = *query.body else {
        return unsupported(
            "set operations (UNION, INTERSECT, EXCEPT) and VALUES cannot be federated",
        );
    };
    let select = *select;
    check_select_clauses(&select)?;
    let (table, alias) = federated_table(&select, config)?;
    if let Some(filter) = &select.selection {
        check_plain(filter, "WHERE")?;
    }

    let projection = projection(&select.projection)?;
    let keys = group_keys(&select.group_by, &projection)?;
    for key in &keys {
        check_plain(key, &format!("GROUP BY {key}"))?;
    }
    let mut aggregates = Aggregates::default();
    let mut rewritten: Vec<(Expr, String)> = Vec::new();
    for (expr, name) in &projection {
        rewritten.push((aggregates.rewrite(expr.clone(), &keys)?, name.clone()));
    }
    let having = select
        .having
        .clone()
        .map(|h| aggregates.rewrite(h, &keys))
        .transpose()?;
    let order_by = match &query.order_by {
        None => None,
        Some(order) => match &order.kind {
            ast::OrderByKind::Expressions(list) => {
                let mut out = Vec::new();
                for item in list {
                    let mut item = item.clone();
                    item.expr = aggregates.rewrite(item.expr, &keys)?;
                    out.push(item);
                }
                Some(out)
            }
            ast::OrderByKind::All(_) => return unsupported("ORDER BY ALL is not supported"),
        },
    };
    if aggregates.calls.is_empty() {
        return unsupported(
            "the broker federates aggregates (COUNT, SUM, AVG, MIN, MAX, with GROUP BY); for rows, query a provider directly",
        );
    }

    let partial_sql = table
        .sources
        .iter()
        .map(|(provider, dataset)| {
            let sql = partial_query(dataset, &alias, &table.name, &select, &keys, &aggregates);
            (provider.clone(), sql)
        })
        .collect();
    let plain_outputs = rewritten
        .iter()
        .enumerate()
        .filter_map(|(i, (expr, _))| match expr {
            Expr::Identifier(id) => id
                .value
                .strip_prefix("__m")
                .and_then(|n| n.parse().ok())
                .map(|m| (i, m)),
            _ => None,
        })
        .collect();
    let merge_sql = merge_query(
        &keys,
        &aggregates,
        &rewritten,
        having.as_ref(),
        order_by.as_deref(),
        query.limit_clause.as_ref(),
    );
    let hidden_counts = aggregates
        .calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.merge, Merge::Ratio { .. }))
        .map(|(i, _)| i)
        .collect();
    Ok(Federated {
        hidden_counts,
        table,
        keys: keys.len(),
        partial_count: aggregates.partials,
        merges: aggregates.calls.iter().map(|c| c.merge.clone()).collect(),
        partial_sql,
        merge_sql,
        plain_outputs,
    })
}

fn check_query_clauses(query: &ast::Query) -> Result<(), Unsupported> {
    if query.with.is_some() {
        return unsupported("WITH (common table expressions) cannot be federated");
    }
    if query.fetch.is_some()
        || !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return unsupported("FETCH, FOR, SETTINGS, FORMAT and pipe syntax are not supported");
    }
    if let Some(ast::LimitClause::LimitOffset { limit_by, .. }) = &query.limit_clause
        && !limit_by.is_empty()
    {
        return unsupported("LIMIT BY is not supported");
    }
    Ok(())
}

fn check_select_clauses(select: &ast::Select) -> Result<(), Unsupported> {
    if select.distinct.is_some() {
        return unsupported("SELECT DISTINCT cannot be federated; GROUP BY the columns instead");
    }
    if select.top.is_some()
        || select.into.is_some()
        || select.exclude.is_some()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || !select.named_window.is_empty()
        || select.qualify.is_some()
        || select.value_table_mode.is_some()
    {
        return unsupported(
            "the query uses a clause the broker cannot split (TOP, INTO, LATERAL VIEW, WINDOW, QUALIFY, …)",
        );
    }
    Ok(())
}

/// The one federated table the query reads, and the name its columns are
/// qualified with in the query (its alias, or its own name).
fn federated_table(
    select: &ast::Select,
    config: &BrokerConfig,
) -> Result<(FederatedTable, Ident), Unsupported> {
    let names = || {
        config
            .federated
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let [from] = select.from.as_slice() else {
        return unsupported(format!(
            "read exactly one federated table ({}); joins cannot be federated",
            names()
        ));
    };
    if !from.joins.is_empty() {
        return unsupported("joins cannot be federated; each provider joins its own data");
    }
    let TableFactor::Table {
        name,
        alias,
        args: None,
        with_hints,
        version: None,
        partitions,
        json_path: None,
        sample: None,
        index_hints,
        ..
    } = &from.relation
    else {
        return unsupported("FROM must name a federated table (no subqueries or table functions)");
    };
    if !with_hints.is_empty() || !partitions.is_empty() || !index_hints.is_empty() {
        return unsupported("table hints and partitions are not supported");
    }
    let table_name = match name.0.as_slice() {
        [part] => part
            .as_ident()
            .map(|i| i.value.clone())
            .unwrap_or_else(|| part.to_string()),
        _ => {
            return unsupported(format!(
                "`{name}`: name a federated table without a schema ({})",
                names()
            ));
        }
    };
    let Some(table) = config.table(&table_name) else {
        return unsupported(format!(
            "`{table_name}` is not a federated table of this broker; it offers: {}",
            names()
        ));
    };
    // The alias as written, quoting included, so that it is re-rendered
    // exactly; the federated name is a checked plain identifier.
    let qualifier = match alias {
        Some(alias) if !alias.columns.is_empty() => {
            return unsupported("column aliases on the table (`AS t(a, b)`) are not supported");
        }
        Some(alias) => alias.name.clone(),
        None => Ident::new(table.name.clone()),
    };
    Ok((table.clone(), qualifier))
}

/// Each projected expression with its output name: the alias, or the
/// expression as written.
fn projection(items: &[SelectItem]) -> Result<Vec<(Expr, String)>, Unsupported> {
    items
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(expr) => Ok((expr.clone(), output_name(expr))),
            SelectItem::ExprWithAlias { expr, alias } => Ok((expr.clone(), alias.value.clone())),
            _ => unsupported(
                "list the output columns: `*` cannot be federated (rows do not leave through the broker)",
            ),
        })
        .collect()
}

/// An unaliased column keeps its name; anything else is named as written.
fn output_name(expr: &Expr) -> String {
    match expr {
        Expr::Identifier(id) => id.value.clone(),
        Expr::CompoundIdentifier(parts) => {
            parts.last().map(|p| p.value.clone()).unwrap_or_default()
        }
        other => other.to_string(),
    }
}

/// The GROUP BY expressions, with ordinals and output aliases resolved.
fn group_keys(
    group_by: &GroupByExpr,
    projection: &[(Expr, String)],
) -> Result<Vec<Expr>, Unsupported> {
    let GroupByExpr::Expressions(exprs, modifiers) = group_by else {
        return unsupported("GROUP BY ALL is not supported; list the keys");
    };
    if !modifiers.is_empty() {
        return unsupported("GROUP BY … WITH ROLLUP/CUBE/TOTALS cannot be federated");
    }
    let mut keys: Vec<Expr> = Vec::new();
    for expr in exprs {
        let key = match expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => {
                    let i: usize = n.parse().unwrap_or(0);
                    match i.checked_sub(1).and_then(|i| projection.get(i)) {
                        Some((e, _)) => e.clone(),
                        None => return unsupported(format!("GROUP BY {n}: no such output column")),
                    }
                }
                _ => expr.clone(),
            },
            Expr::Identifier(id) if !projection.iter().any(|(e, _)| same(e, expr)) => {
                match projection
                    .iter()
                    .find(|(_, name)| name.eq_ignore_ascii_case(&id.value))
                {
                    Some((e, _)) => e.clone(),
                    None => expr.clone(),
                }
            }
            Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_) => {
                return unsupported("GROUPING SETS, CUBE and ROLLUP cannot be federated");
            }
            _ => expr.clone(),
        };
        if !keys.iter().any(|k| same(k, &key)) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Textual equality as SQL treats unquoted identifiers (case-insensitive).
fn same(a: &Expr, b: &Expr) -> bool {
    a.to_string().eq_ignore_ascii_case(&b.to_string())
}

/// One aggregate call of the query and how it merges.
#[derive(Debug, Clone)]
struct Call {
    text: String,
    merge: Merge,
}

/// The aggregates found while rewriting, and the partial aggregates they
/// need from each provider.
#[derive(Debug, Default)]
struct Aggregates {
    calls: Vec<Call>,
    /// The SQL of each partial aggregate `p<i>`.
    partial_exprs: Vec<String>,
    partials: usize,
}

impl Aggregates {
    /// `expr` in terms of the merge query's inner columns: group keys become
    /// `k<i>` and aggregate calls `m<i>`.
    fn rewrite(&mut self, mut expr: Expr, keys: &[Expr]) -> Result<Expr, Unsupported> {
        let mut rewriter = Rewriter {
            keys,
            aggregates: self,
            error: None,
        };
        let _ = expr.visit(&mut rewriter);
        match rewriter.error {
            Some(e) => Err(e),
            None => Ok(expr),
        }
    }

    fn partial(&mut self, sql: String) -> usize {
        if let Some(i) = self.partial_exprs.iter().position(|p| p == &sql) {
            return i;
        }
        self.partial_exprs.push(sql);
        self.partials = self.partial_exprs.len();
        self.partials - 1
    }

    /// The index `m<i>` of an aggregate call, registering it when new.
    fn call(&mut self, function: &ast::Function) -> Result<usize, Unsupported> {
        let text = function.to_string();
        if let Some(i) = self
            .calls
            .iter()
            .position(|c| c.text.eq_ignore_ascii_case(&text))
        {
            return Ok(i);
        }
        let name = function.name.to_string().to_ascii_lowercase();
        if function.over.is_some() {
            return unsupported(format!("`{text}`: window functions cannot be federated"));
        }
        if function.filter.is_some() || function.null_treatment.is_some() {
            return unsupported(format!(
                "`{text}`: FILTER and IGNORE NULLS are not supported"
            ));
        }
        let FunctionArguments::List(list) = &function.args else {
            return unsupported(format!("`{text}`: unsupported argument form"));
        };
        if list.duplicate_treatment.is_some() {
            return unsupported(format!(
                "`{text}`: DISTINCT aggregates cannot be merged across providers (a value counted at two providers would count twice)"
            ));
        }
        if !list.clauses.is_empty() {
            return unsupported(format!(
                "`{text}`: clauses inside aggregates are not supported"
            ));
        }
        let argument = match list.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if name == "count" => "*".to_string(),
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => {
                check_plain(e, &format!("`{text}`"))?;
                e.to_string()
            }
            _ => return unsupported(format!("`{text}`: give the aggregate one argument")),
        };
        let merge = match name.as_str() {
            "count" => Merge::Add(self.partial(format!("count({argument})"))),
            "sum" => Merge::Add(self.partial(format!("sum({argument})"))),
            "avg" | "mean" => Merge::Ratio {
                sum: self.partial(format!("sum({argument})")),
                count: self.partial(format!("count({argument})")),
            },
            "min" => Merge::Min(self.partial(format!("min({argument})"))),
            "max" => Merge::Max(self.partial(format!("max({argument})"))),
            _ => unreachable!("checked by the caller"),
        };
        self.calls.push(Call { text, merge });
        Ok(self.calls.len() - 1)
    }
}

struct Rewriter<'a> {
    keys: &'a [Expr],
    aggregates: &'a mut Aggregates,
    error: Option<Unsupported>,
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Some(i) = self.keys.iter().position(|k| same(k, expr)) {
            *expr = Expr::Identifier(Ident::new(format!("__k{i}")));
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Function(f) if is_aggregate(f) => match self.aggregates.call(f) {
                Ok(i) => *expr = Expr::Identifier(Ident::new(format!("__m{i}"))),
                Err(e) => {
                    self.error = Some(e);
                    return ControlFlow::Break(());
                }
            },
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                self.error = Some(Unsupported("subqueries cannot be federated".into()));
                return ControlFlow::Break(());
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Filters, group keys and aggregate arguments go to every provider as
/// written: they must stay plain expressions over the federated table.
fn check_plain(expr: &Expr, place: &str) -> Result<(), Unsupported> {
    let mut reason = None;
    let _ = ast::visit_expressions(expr, |e| {
        reason = match e {
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                Some("subqueries cannot be federated")
            }
            Expr::Function(f) if f.over.is_some() => Some("window functions cannot be federated"),
            Expr::Function(f) if is_aggregate(f) => Some("aggregates cannot be nested here"),
            _ => None,
        };
        match reason {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    });
    match reason {
        Some(reason) => unsupported(format!("{place}: {reason}")),
        None => Ok(()),
    }
}

fn is_aggregate(f: &ast::Function) -> bool {
    let name = f.name.to_string().to_ascii_lowercase();
    AGGREGATES.contains(&name.as_str())
}

fn partial_query(
    dataset: &str,
    qualifier: &Ident,
    federated: &str,
    select: &ast::Select,
    keys: &[Expr],
    aggregates: &Aggregates,
) -> String {
    let mut columns: Vec<String> = keys.iter().map(ToString::to_string).collect();
    columns.extend(
        aggregates
            .partial_exprs
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{e} AS \"p{i}\"")),
    );
    let mut sql = format!("SELECT {} FROM {dataset}", columns.join(", "));
    // Keep the name the query's qualified columns use.
    if !qualifier.value.eq_ignore_ascii_case(dataset) || !federated.eq_ignore_ascii_case(dataset) {
        sql.push_str(&format!(" AS {qualifier}"));
    }
    if let Some(filter) = &select.selection {
        sql.push_str(&format!(" WHERE {filter}"));
    }
    if !keys.is_empty() {
        let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
        sql.push_str(&format!(" GROUP BY {}", keys.join(", ")));
    }
    sql
}

fn merge_query(
    keys: &[Expr],
    aggregates: &Aggregates,
    outputs: &[(Expr, String)],
    having: Option<&Expr>,
    order_by: Option<&[ast::OrderByExpr]>,
    limit: Option<&ast::LimitClause>,
) -> String {
    let mut inner: Vec<String> = (0..keys.len()).map(|i| format!("__k{i}")).collect();
    for (i, call) in aggregates.calls.iter().enumerate() {
        let merged = match call.merge {
            Merge::Add(p) => format!("sum(__p{p})"),
            Merge::Ratio { sum, count } => format!(
                "CASE WHEN sum(__p{count}) > 0 THEN CAST(sum(__p{sum}) AS DOUBLE) / CAST(sum(__p{count}) AS DOUBLE) END"
            ),
            Merge::Min(p) => format!("min(__p{p})"),
            Merge::Max(p) => format!("max(__p{p})"),
        };
        inner.push(format!("{merged} AS __m{i}"));
        if let Merge::Ratio { count, .. } = call.merge {
            inner.push(format!("sum(__p{count}) AS __n{i}"));
        }
    }
    let mut inner_sql = format!("SELECT {} FROM {PARTIALS}", inner.join(", "));
    if !keys.is_empty() {
        let group: Vec<String> = (0..keys.len()).map(|i| format!("__k{i}")).collect();
        inner_sql.push_str(&format!(" GROUP BY {}", group.join(", ")));
    }
    let mut select: Vec<String> = outputs
        .iter()
        .map(|(expr, name)| format!("{expr} AS {}", quoted(name)))
        .collect();
    for (i, call) in aggregates.calls.iter().enumerate() {
        if let Merge::Ratio { .. } = call.merge {
            select.push(format!(
                "__n{i} AS {}",
                quoted(&format!("{HIDDEN_PREFIX}n{i}"))
            ));
        }
    }
    let mut sql = format!("SELECT {} FROM ({inner_sql}) AS merged", select.join(", "));
    if let Some(having) = having {
        sql.push_str(&format!(" WHERE {having}"));
    }
    if let Some(order) = order_by {
        let items: Vec<String> = order.iter().map(|o| order_item(o, outputs)).collect();
        sql.push_str(&format!(" ORDER BY {}", items.join(", ")));
    }
    if let Some(limit) = limit {
        sql.push_str(&format!("{limit}"));
    }
    sql
}

/// An ORDER BY item of the merge query: an output's name where the item is
/// an output (so `ORDER BY trips` and `ORDER BY count(*)` both work).
fn order_item(item: &ast::OrderByExpr, outputs: &[(Expr, String)]) -> String {
    let by_name = |name: &String| match &item.expr {
        Expr::Identifier(id) if id.quote_style.is_none() => name.eq_ignore_ascii_case(&id.value),
        Expr::Identifier(id) => name == &id.value,
        _ => false,
    };
    match outputs
        .iter()
        .find(|(e, name)| same(e, &item.expr) || by_name(name))
    {
        Some((_, name)) => {
            let mut named = item.clone();
            named.expr = Expr::Identifier(Ident::with_quote('"', name));
            named.to_string()
        }
        None => item.to_string(),
    }
}

fn quoted(name: &str) -> String {
    Ident::with_quote('"', name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BrokerConfig {
        super::super::config::example()
    }

    /// Regression (fuzz/fuzz_targets/broker_sql.rs): sqlparser's
    /// backtracking made this 117-byte statement take minutes to fail to
    /// parse; it is refused before parsing.
    #[test]
    fn square_brackets_are_refused_before_parsing() {
        let started = std::time::Instant::now();
        for sql in [
            format!("SELECT {}", "a.b[1].c[".repeat(13)),
            format!("SELECT {}", "a.b[".repeat(40)),
            "SELECT start_zone, count(*) FROM trips WHERE fare_eur > [1][1] GROUP BY start_zone"
                .to_string(),
        ] {
            let err = decompose(&sql, &config()).unwrap_err();
            assert!(err.to_string().contains("square brackets"), "{sql}: {err}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // In a string literal, a bracket is text.
        decompose(
            "SELECT start_zone, count(*) FROM trips WHERE mode <> '[x' GROUP BY start_zone",
            &config(),
        )
        .unwrap();
    }

    /// SQL on which the parser backtracks (the work doubles per nested
    /// `NOT (`, `CAST(`, …) ends at the parse budget, with that reason.
    #[test]
    fn backtracking_sql_stops_at_the_parse_budget() {
        for prefix in ["NOT (", "CAST(", "POSITION(", "CASE (", "a AND NOT ("] {
            for closed in [")", ""] {
                let sql = format!(
                    "SELECT count(*) AS n FROM trips WHERE {}1{}",
                    prefix.repeat(40),
                    closed.repeat(40)
                );
                let err = decompose(&sql, &config()).unwrap_err();
                assert!(err.to_string().contains("gave up"), "{sql:.60}: {err}");
            }
        }
    }

    #[test]
    fn count_sum_avg_group_by_split_into_partials_and_a_merge() {
        let f = decompose(
            "SELECT start_zone, COUNT(*) AS trips, AVG(fare_eur) AS fare, SUM(fare_eur) \
             FROM trips WHERE mode = 'bus' GROUP BY start_zone ORDER BY trips DESC LIMIT 5",
            &config(),
        )
        .unwrap();
        assert_eq!(f.keys, 1);
        assert_eq!(
            f.merges,
            vec![
                Merge::Add(0),
                Merge::Ratio { sum: 1, count: 2 },
                Merge::Add(1)
            ]
        );
        assert_eq!(
            f.partial_sql[0],
            (
                "north".to_string(),
                "SELECT start_zone, count(*) AS \"p0\", sum(fare_eur) AS \"p1\", count(fare_eur) AS \"p2\" \
                 FROM trips WHERE mode = 'bus' GROUP BY start_zone"
                    .to_string()
            )
        );
        assert!(
            f.partial_sql[1].1.contains("FROM trips_s AS trips WHERE"),
            "{}",
            f.partial_sql[1].1
        );
        assert!(f.merge_sql.contains("GROUP BY __k0"), "{}", f.merge_sql);
        assert!(
            f.merge_sql.ends_with("ORDER BY \"trips\" DESC LIMIT 5"),
            "{}",
            f.merge_sql
        );
        assert_eq!(f.plain_outputs, vec![(1, 0), (2, 1), (3, 2)]);
    }

    #[test]
    fn expressions_over_aggregates_having_and_ordinals_work() {
        let f = decompose(
            "SELECT t.start_zone AS zone, round(avg(t.fare_eur), 2) AS fare FROM trips t \
             GROUP BY 1 HAVING count(*) > 100 ORDER BY count(*) DESC",
            &config(),
        )
        .unwrap();
        assert_eq!(f.keys, 1);
        assert!(
            f.partial_sql[0].1.contains("GROUP BY t.start_zone"),
            "{}",
            f.partial_sql[0].1
        );
        assert!(f.merge_sql.contains("WHERE __m1 > 100"), "{}", f.merge_sql);
        assert!(
            f.merge_sql.contains("round(__m0, 2) AS \"fare\""),
            "{}",
            f.merge_sql
        );
        assert_eq!(f.plain_outputs, vec![]);
    }

    #[test]
    fn what_cannot_be_split_is_refused_with_the_reason() {
        for (sql, want) in [
            ("SELECT * FROM trips", "`*` cannot be federated"),
            (
                "SELECT fare_eur FROM trips",
                "for rows, query a provider directly",
            ),
            (
                "SELECT count(DISTINCT card_id) FROM trips",
                "DISTINCT aggregates",
            ),
            ("SELECT count(*) FROM zones", "not a federated table"),
            (
                "SELECT count(*) FROM trips a JOIN trips b ON a.x = b.x",
                "joins",
            ),
            (
                "SELECT count(*) FROM trips UNION SELECT count(*) FROM trips",
                "set operations",
            ),
            ("WITH x AS (SELECT 1) SELECT count(*) FROM trips", "WITH"),
            (
                "SELECT count(*) FROM trips WHERE x IN (SELECT 1)",
                "subqueries",
            ),
            ("SELECT sum((SELECT 1)) FROM trips", "subqueries"),
            (
                "SELECT (SELECT 1) AS k, count(*) FROM trips GROUP BY 1",
                "GROUP BY",
            ),
            ("SELECT sum(count(*)) FROM trips", "nested"),
            ("SELECT sum(row_number() OVER ()) FROM trips", "window"),
            (
                "SELECT zone, count(*) FROM trips GROUP BY ROLLUP(zone)",
                "ROLLUP",
            ),
            ("SELECT count(*) OVER () FROM trips", "window"),
            ("DELETE FROM trips", "SELECT queries only"),
            ("SELEC 1", "does not parse"),
            ("SELECT 1; SELECT 2", "one statement"),
        ] {
            let e = decompose(sql, &config()).unwrap_err();
            assert!(e.0.contains(want), "{sql}: {e}");
        }
    }

    #[test]
    fn a_quoted_alias_stays_one_quoted_identifier() {
        let f = decompose(
            "SELECT count(*) AS n FROM trips AS \"t, zones AS u --\" WHERE mode = 'bus'",
            &config(),
        )
        .unwrap();
        let south = &f.partial_sql[1].1;
        assert!(
            south.ends_with("FROM trips_s AS \"t, zones AS u --\" WHERE mode = 'bus'"),
            "{south}"
        );
        let f = decompose(
            "SELECT count(*) AS \"n\"\"x\" FROM trips GROUP BY mode",
            &config(),
        )
        .unwrap();
        assert!(f.merge_sql.contains("AS \"n\"\"x\""), "{}", f.merge_sql);
    }

    #[test]
    fn statements_beyond_the_syntax_limits_are_refused_before_the_broker_walks_them() {
        let wide = format!(
            "SELECT count(*) AS n FROM trips WHERE {}",
            vec!["fare_eur > 1"; 1_000].join(" OR ")
        );
        let refused = decompose(&wide, &config()).unwrap_err().to_string();
        assert!(refused.contains("limit"), "{refused}");
        let many_aggregates = format!(
            "SELECT {} FROM trips",
            (0..2_500)
                .map(|i| format!("sum(fare_eur) AS s{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let refused = decompose(&many_aggregates, &config())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("limit"), "{refused}");
    }
}
