//! Step 2: SQL text → analyzed DataFusion `LogicalPlan`.
//!
//! All later decisions are made on the plan, never on SQL text. Planning
//! never executes anything: DDL such as `CREATE EXTERNAL TABLE` becomes a
//! plan node that the gate then refuses, instead of running as it would
//! through `SessionContext::sql`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion, TreeNodeVisitor};
use datafusion::common::{ParamValues, ScalarValue, TableReference};
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::{DFParserBuilder, Statement};
use datafusion::sql::sqlparser::ast::{
    Expr, Query, SetExpr, Value, Visit, Visitor, visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::dialect_from_str;

use sluice_policy::Denial;

/// The rule reported when a statement other than a query is sent.
pub const READ_ONLY_RULE: &str = "read-only";

use super::QueryError;
use crate::catalog::{CATALOG, Catalog, SCHEMA};

/// Parses one SQL statement and refuses anything but a query. `?` placeholders (ODBC/JDBC/ADBC style) are
/// numbered `$1, $2, …` in the order they appear in the text.
pub fn parse(
    state: &SessionState,
    sql: &str,
    max_sql_bytes: usize,
) -> Result<Statement, QueryError> {
    if sql.len() > max_sql_bytes {
        return Err(QueryError::InvalidRequest(format!(
            "the SQL text is {} bytes; the limit is {} bytes (limits.max_sql_bytes)",
            sql.len(),
            max_sql_bytes
        )));
    }
    if sql.trim().is_empty() {
        return Err(QueryError::InvalidRequest("the SQL text is empty".into()));
    }
    let mut statement = parse_one_statement(state, sql)?;
    refuse_non_queries(&statement)?;
    refuse_deep_chains(&statement)?;
    number_question_marks(&mut statement);
    Ok(statement)
}

/// The one statement in `sql`, parsed with the session's dialect and
/// recursion limit.
fn parse_one_statement(state: &SessionState, sql: &str) -> Result<Statement, QueryError> {
    let options = &state.config().options().sql_parser;
    let dialect = dialect_from_str(options.dialect).ok_or_else(|| {
        QueryError::Internal(format!("unsupported SQL dialect {}", options.dialect))
    })?;
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(dialect.as_ref())
        .with_recursion_limit(options.recursion_limit.get())
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(QueryError::from_planning)?;
    if statements.len() > 1 {
        return Err(QueryError::InvalidRequest(format!(
            "the SQL text holds {} statements; send one statement per query",
            statements.len()
        )));
    }
    statements
        .pop_front()
        .ok_or_else(|| QueryError::InvalidRequest("the SQL text holds no statement".into()))
}

/// Only queries are planned at all. The plan gate refuses writes and DDL
/// too; refusing them here as well gives a clear message before DataFusion
/// tries to plan statements it would only reject with a less helpful one.
fn refuse_non_queries(statement: &Statement) -> Result<(), QueryError> {
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    let kind = match statement {
        Statement::Statement(inner) if matches!(inner.as_ref(), Sql::Query(_)) => return Ok(()),
        Statement::Explain(explain) => return refuse_non_queries(&explain.statement),
        Statement::Statement(inner) => statement_keyword(&inner.to_string()),
        Statement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE".to_string(),
        Statement::CopyTo(_) => "COPY".to_string(),
        Statement::Reset(_) => "RESET".to_string(),
    };
    Err(QueryError::Denied(Denial::forbidden(
        READ_ONLY_RULE,
        format!(
            "{kind} is not accepted: Sluice answers read-only queries (SELECT, WITH, VALUES, EXPLAIN POLICY)"
        ),
    )))
}

/// `INSERT`, `CREATE TABLE`, `SHOW TABLES`: the leading keywords of a statement.
fn statement_keyword(sql: &str) -> String {
    sql.split_whitespace()
        .take_while(|w| w.chars().all(|c| c.is_ascii_alphabetic() || c == '_'))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// Refuses chains of binary operators (`a + b + …`, `x OR y OR …`) and of
/// set operations (`… UNION ALL …`) nested deeper than [`MAX_NESTING_DEPTH`].
///
/// The SQL parser builds these chains in a loop, so its recursion limit does
/// not bound them, but DataFusion's planner recurses through them: a 20,000
/// term sum would overflow the planning thread's stack. The depth is measured
/// with an explicit stack at the top of each chain, and the walk stops at
/// the first chain that is too deep, before any recursive visitor descends
/// into it.
fn refuse_deep_chains(statement: &Statement) -> Result<(), QueryError> {
    struct ChainDepth;
    impl Visitor for ChainDepth {
        type Break = usize;
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<usize> {
            too_deep(set_operation_depth(&query.body))
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<usize> {
            too_deep(binary_operator_depth(expr))
        }
    }
    fn too_deep(depth: usize) -> ControlFlow<usize> {
        if depth > MAX_NESTING_DEPTH {
            ControlFlow::Break(depth)
        } else {
            ControlFlow::Continue(())
        }
    }
    let Statement::Statement(inner) = statement else {
        return Ok(());
    };
    match inner.visit(&mut ChainDepth) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(depth) => Err(QueryError::InvalidRequest(format!(
            "the query chains {depth} operators into one expression (or set operations into one query); \
             the limit is {MAX_NESTING_DEPTH} levels"
        ))),
    }
}

/// Height of the tree of binary operators rooted at `expr`, counted without
/// recursion. Other kinds of expression end a chain: the parser's recursion
/// limit already bounds how deeply they nest.
fn binary_operator_depth(expr: &Expr) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(expr, 0)];
    while let Some((expr, depth)) = pending.pop() {
        if let Expr::BinaryOp { left, right, .. } = expr {
            deepest = deepest.max(depth + 1);
            pending.push((left, depth + 1));
            pending.push((right, depth + 1));
        }
    }
    deepest
}

/// Height of the tree of set operations (`UNION`, `INTERSECT`, `EXCEPT`)
/// rooted at `body`, counted without recursion.
fn set_operation_depth(body: &SetExpr) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(body, 0)];
    while let Some((body, depth)) = pending.pop() {
        if let SetExpr::SetOperation { left, right, .. } = body {
            deepest = deepest.max(depth + 1);
            pending.push((left, depth + 1));
            pending.push((right, depth + 1));
        }
    }
    deepest
}

/// Deepest expression and plan nesting Sluice plans. Deeper trees are
/// refused before execution: expression evaluation recurses, and an
/// attacker-sized tree would exhaust an execution thread's stack.
pub const MAX_NESTING_DEPTH: usize = 256;

/// Refuses plans whose node or expression nesting exceeds
/// [`MAX_NESTING_DEPTH`]. The walk uses DataFusion's tree visitors, which
/// grow their stack on the heap, so the check itself cannot overflow.
pub fn check_depth(plan: &LogicalPlan) -> Result<(), QueryError> {
    let plan_depth = tree_depth(plan)?;
    let mut expr_depth = 0;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr_depth = expr_depth.max(tree_depth(expr).unwrap_or(usize::MAX));
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(QueryError::from_planning)?;
    let deepest = plan_depth.max(expr_depth);
    if deepest > MAX_NESTING_DEPTH {
        return Err(QueryError::InvalidRequest(format!(
            "the query nests {deepest} levels deep (expressions or subqueries); the limit is {MAX_NESTING_DEPTH}"
        )));
    }
    Ok(())
}

fn tree_depth<'n, N: TreeNode + 'n>(node: &'n N) -> Result<usize, QueryError> {
    struct Depth<N> {
        current: usize,
        max: usize,
        node: std::marker::PhantomData<N>,
    }
    impl<'n, N: TreeNode + 'n> TreeNodeVisitor<'n> for Depth<N> {
        type Node = N;
        fn f_down(&mut self, _: &'n N) -> datafusion::common::Result<TreeNodeRecursion> {
            self.current += 1;
            self.max = self.max.max(self.current);
            Ok(TreeNodeRecursion::Continue)
        }
        fn f_up(&mut self, _: &'n N) -> datafusion::common::Result<TreeNodeRecursion> {
            self.current -= 1;
            Ok(TreeNodeRecursion::Continue)
        }
    }
    let mut depth = Depth::<N> {
        current: 0,
        max: 0,
        node: std::marker::PhantomData,
    };
    node.visit(&mut depth).map_err(QueryError::from_planning)?;
    Ok(depth.max)
}

/// Plans a parsed statement after checking that every table it names is
/// served. The plan may still contain parameter placeholders.
pub async fn plan(
    state: &SessionState,
    catalog: &Catalog,
    statement: Statement,
) -> Result<LogicalPlan, QueryError> {
    for table in state
        .resolve_table_references(&statement)
        .map_err(QueryError::from_planning)?
    {
        check_table_exists(catalog, &table)?;
    }
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(QueryError::from_planning)?;
    check_depth(&plan)?;
    Ok(plan)
}

/// Runs DataFusion's analyzer (type coercion, function rewrites) so that the
/// gate sees the plan as it will execute. Refuses plans with unbound
/// parameters.
/// The tables a plan reads (subqueries included), sorted, for audit records
/// of refusals.
pub fn scanned_tables(plan: &LogicalPlan) -> Vec<String> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut tables = std::collections::BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            tables.insert(scan.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    tables.into_iter().collect()
}

pub fn analyze(state: &SessionState, plan: LogicalPlan) -> Result<LogicalPlan, QueryError> {
    let unbound = parameter_names(&plan)?;
    if !unbound.is_empty() {
        return Err(QueryError::InvalidRequest(format!(
            "the query has {} unbound parameter(s) ({}); prepare it and bind values first",
            unbound.len(),
            unbound.join(", ")
        )));
    }
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(QueryError::from_planning)
}

/// Binds positional parameter values to a plan with `$n` placeholders,
/// converting each value to the type the query expects where it is known.
pub fn bind(plan: LogicalPlan, values: Vec<ScalarValue>) -> Result<LogicalPlan, QueryError> {
    let expected = parameter_types(&plan)?;
    if values.len() != expected.len() {
        return Err(QueryError::InvalidRequest(format!(
            "the statement takes {} parameter(s) but {} value(s) were bound",
            expected.len(),
            values.len()
        )));
    }
    let mut converted = Vec::with_capacity(values.len());
    for (i, (value, (_, ty))) in values.into_iter().zip(expected).enumerate() {
        let value = match ty {
            Some(ty) if value.data_type() != ty && !value.is_null() => {
                value.cast_to(&ty).map_err(|_| {
                    QueryError::InvalidRequest(format!(
                        "parameter ${} is {} and cannot be converted to the expected {}",
                        i + 1,
                        value.data_type(),
                        ty
                    ))
                })?
            }
            Some(ty) if value.is_null() => ScalarValue::try_from(&ty).unwrap_or(value),
            _ => value,
        };
        converted.push(value);
    }
    let plan = plan
        .with_param_values(ParamValues::from(converted))
        .map_err(QueryError::from_planning)?;
    check_limits(&plan)?;
    Ok(plan)
}

/// LIMIT and OFFSET must be integers of at least 0 (or NULL: none). The SQL
/// planner checks literals; a bound parameter is only a literal once bound,
/// so it is checked here rather than failing at execution.
fn check_limits(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut problem = None;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::Limit(limit) = node {
            let bounds = limit.skip.iter().chain(limit.fetch.iter());
            if let Some(bad) = bounds.filter_map(|e| limit_problem(e)).next() {
                problem = Some(bad);
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match problem {
        Some(message) => Err(QueryError::InvalidRequest(message.into())),
        None => Ok(()),
    }
}

/// What is wrong with a bound LIMIT or OFFSET value, if anything.
fn limit_problem(bound: &datafusion::logical_expr::Expr) -> Option<&'static str> {
    use datafusion::logical_expr::Expr;
    match bound {
        Expr::Literal(value, _) if value.is_null() => None,
        Expr::Literal(ScalarValue::Int64(Some(n)), _) if *n >= 0 => None,
        Expr::Literal(ScalarValue::Int64(Some(_)), _) => {
            Some("LIMIT and OFFSET take an integer of at least 0; the bound value is negative")
        }
        Expr::Literal(..) => Some("LIMIT and OFFSET take an integer (BIGINT); bind one"),
        _ => None,
    }
}

/// The parameters of a prepared statement as an Arrow schema (`$1`, `$2`, …;
/// type Null where the query does not determine it).
pub fn parameter_schema(plan: &LogicalPlan) -> Result<Schema, QueryError> {
    Ok(Schema::new(
        parameter_types(plan)?
            .into_iter()
            .map(|(name, ty)| Field::new(name, ty.unwrap_or(DataType::Null), true))
            .collect::<Vec<_>>(),
    ))
}

/// `$n` parameters in order, with their inferred types.
fn parameter_types(plan: &LogicalPlan) -> Result<Vec<(String, Option<DataType>)>, QueryError> {
    let mut by_index = BTreeMap::new();
    for (name, ty) in plan
        .get_parameter_types()
        .map_err(QueryError::from_planning)?
    {
        let index: usize = name
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                QueryError::InvalidRequest(format!(
                    "named parameter `{name}` is not supported; use `?` or `$1`, `$2`, …"
                ))
            })?;
        by_index.insert(index, (name, ty));
    }
    if let Some((&last, _)) = by_index.last_key_value()
        && last != by_index.len()
    {
        return Err(QueryError::InvalidRequest(format!(
            "parameters must be numbered $1..${last} without gaps"
        )));
    }
    Ok(by_index.into_values().collect())
}

pub(crate) fn parameter_names(plan: &LogicalPlan) -> Result<Vec<String>, QueryError> {
    let mut names: Vec<String> = plan
        .get_parameter_types()
        .map_err(QueryError::from_planning)?
        .into_keys()
        .collect();
    names.sort();
    Ok(names)
}

fn check_table_exists(catalog: &Catalog, table: &TableReference) -> Result<(), QueryError> {
    let served_namespace =
        table.catalog().is_none_or(|c| c == CATALOG) && table.schema().is_none_or(|s| s == SCHEMA);
    if served_namespace && catalog.dataset(table.table()).is_some() {
        return Ok(());
    }
    Err(no_such_table(table))
}

/// The error for a table that does not exist, or that the caller may not
/// see: the two must not be told apart.
pub fn no_such_table(table: &TableReference) -> QueryError {
    QueryError::NotFound(format!(
        "table `{table}` does not exist (list the tables with GetTables or `sluice tables`)"
    ))
}

/// Rewrites every `?` placeholder to `$1, $2, …` by position in the text.
fn number_question_marks(statement: &mut Statement) {
    match statement {
        Statement::Statement(inner) => {
            let mut positions = Vec::new();
            let _ = visit_expressions_mut(inner.as_mut(), |expr| {
                if let Expr::Value(v) = expr
                    && matches!(&v.value, Value::Placeholder(p) if p == "?")
                {
                    positions.push((v.span.start.line, v.span.start.column));
                }
                ControlFlow::<()>::Continue(())
            });
            positions.sort();
            let _ = visit_expressions_mut(inner.as_mut(), |expr| {
                if let Expr::Value(v) = expr
                    && matches!(&v.value, Value::Placeholder(p) if p == "?")
                {
                    let at = (v.span.start.line, v.span.start.column);
                    if let Ok(i) = positions.binary_search(&at) {
                        v.value = Value::Placeholder(format!("${}", i + 1));
                    }
                }
                ControlFlow::<()>::Continue(())
            });
        }
        Statement::Explain(explain) => number_question_marks(&mut explain.statement),
        _ => {}
    }
}

/// Caps the rows a plan returns (the day's remaining row quota).
pub fn cap_rows(plan: LogicalPlan, rows: u64) -> Result<LogicalPlan, QueryError> {
    let rows = usize::try_from(rows).unwrap_or(usize::MAX);
    datafusion::logical_expr::LogicalPlanBuilder::from(plan)
        .limit(0, Some(rows))
        .and_then(|b| b.build())
        .map_err(|e| QueryError::Internal(format!("capping the result rows: {e}")))
}
