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
    Expr, Query, Select, SetExpr, TableFactor, Value, Visit, Visitor, visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::{Dialect, dialect_from_str};

use sluice_policy::Denial;

/// The rule reported when a statement other than a query is sent.
pub const READ_ONLY_RULE: &str = "read-only";

use super::QueryError;
use super::bounded_dialect::{BoundedDialect, bracket_refusal};
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
    // Parsing 256 KiB and dropping what was refused take a while on a
    // debug build: without holding a runtime worker.
    crate::blocking::blocking(|| {
        let mut statement = parse_one_statement(state, sql)?;
        // First: everything after this (even printing the statement for an
        // error message) walks the tree recursively.
        check_syntax_limits(&statement)?;
        refuse_non_queries(&statement)?;
        number_question_marks(&mut statement);
        Ok(statement)
    })
}

/// The one statement in `sql`, parsed with the session's dialect and
/// recursion limit.
fn parse_one_statement(state: &SessionState, sql: &str) -> Result<Statement, QueryError> {
    let options = &state.config().options().sql_parser;
    let dialect = dialect_from_str(options.dialect).ok_or_else(|| {
        QueryError::Internal(format!("unsupported SQL dialect {}", options.dialect))
    })?;
    let limit = options.recursion_limit.get();
    if let Some(refusal) = bracket_refusal(dialect.as_ref(), sql) {
        return Err(QueryError::InvalidRequest(refusal));
    }
    let bounded = BoundedDialect::new(dialect, sql);
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&bounded)
        .with_recursion_limit(limit)
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| {
            // Out of steps first: the error it left says nothing true.
            if bounded.exhausted() {
                return QueryError::InvalidRequest(bounded.exhausted_message());
            }
            // The parser stops at its recursion limit, but what it reports
            // then is not always that (a chain of NOTs gives "Expected: end
            // of statement"): a failed statement that nests that deep is
            // told so.
            let too_deep = e.to_string().contains("recursion limit exceeded")
                || prefix_nesting(&bounded, sql) >= limit;
            if too_deep {
                return QueryError::InvalidRequest(format!(
                    "the query nests parentheses, function calls, subqueries or prefix operators \
                     (NOT, -) more than {limit} levels deep, the SQL parser's recursion limit \
                     (datafusion.sql_parser.recursion_limit)"
                ));
            }
            QueryError::from_planning(e)
        })?;
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

/// How deep parentheses and runs of prefix operators (`NOT`, `-`, `+`)
/// nest in `sql`, read from its tokens without parsing: each level is a
/// level of the parser's recursion.
fn prefix_nesting(dialect: &dyn Dialect, sql: &str) -> usize {
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(dialect, sql).tokenize() else {
        return 0;
    };
    let (mut parentheses, mut run, mut deepest) = (0usize, 0usize, 0usize);
    for token in tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::LParen => parentheses += 1,
            Token::RParen => {
                parentheses = parentheses.saturating_sub(1);
                run = 0;
            }
            Token::Minus | Token::Plus => run += 1,
            Token::Word(word) if word.keyword == Keyword::NOT => run += 1,
            _ => run = 0,
        }
        deepest = deepest.max(parentheses + run);
    }
    deepest
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

/// Most syntax elements (expressions, queries, SELECT blocks, table
/// references) one statement may hold.
///
/// Planning and optimisation cost grows with the number of expressions
/// times their depth (DataFusion names every expression after its whole
/// subtree, and several rules re-derive those names), so both are bounded
/// before any of it runs. At the default `limits.max_sql_bytes` (256 KiB) a
/// statement can hold up to ~130,000 elements (`1,1,1,…`); 50,000 is far
/// above what people or BI tools write (an `IN` list of 40,000 values
/// still passes, and took 2.8 s to plan and run on a debug build, a
/// fraction of that in a release build).
pub const MAX_SYNTAX_NODES: usize = 50_000;

/// Most work nested expressions may ask of the planner: the sum, over
/// every expression node, of its depth within its expression (which is
/// also the sum of the sizes of all subexpressions).
///
/// DataFusion names and types each subexpression after its whole subtree
/// (type coercion, name preservation and several optimizer rules walk it
/// again), so a chain of n operators costs about n² of these steps (an
/// operator and an operand per level), and many chains cost their sum:
/// 100 sums of 240 terms (2.9 million steps, within the depth and size
/// limits) took 60 s to plan and run on a debug build, 20 µs a step;
/// 300,000 steps took 3–4 s there (about a tenth of that in a release
/// build). 300,000 admits four 250-term chains, an `IN` list of 40,000
/// values, or 500 columns whose expressions nest 20 deep.
pub const MAX_EXPRESSION_WORK: usize = 300_000;

/// Most items one SELECT list may name. DataFusion resolves each output
/// column against its input schema by name, so projections cost about
/// items × input width: 12,000 columns took 10 s to plan on a debug
/// build, 2,000 take 0.6 s. A wildcard (`SELECT *`) counts as one item:
/// the width of a dataset is the provider's choice.
pub const MAX_SELECT_ITEMS: usize = 2_000;

/// Most table references (FROM items and JOIN operands, derived tables
/// included) in one statement. DataFusion plans a FROM list or a JOIN
/// chain as a left-deep tree, so this also bounds the plan depth that
/// joins add; the parser builds such lists in a loop, so its recursion
/// limit does not.
pub const MAX_RELATIONS: usize = MAX_NESTING_DEPTH;

/// A syntax limit a statement exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyntaxLimit {
    Depth,
    Nodes,
    Relations,
    ExpressionWork,
    SelectItems,
}

/// Refuses a statement that nests deeper than [`MAX_NESTING_DEPTH`], holds
/// more than [`MAX_SYNTAX_NODES`] syntax elements, more than
/// [`MAX_RELATIONS`] table references, expressions heavier than
/// [`MAX_EXPRESSION_WORK`] or a SELECT list longer than
/// [`MAX_SELECT_ITEMS`], before it is planned.
///
/// Every kind of nesting counts: expressions of any kind (operators,
/// `::` casts, `AT TIME ZONE`, unary operators, function calls, CASE…),
/// queries and SELECT blocks, derived tables, and set operations. The
/// parser's recursion limit bounds only what it parses recursively; chains
/// of binary operators, casts, `AT TIME ZONE`, `IS NULL`, set operations
/// and joins are built in loops, so a 250 KB statement can nest 100,000
/// levels deep, and DataFusion's planner and optimizer do work quadratic in
/// that depth (a 20,000-cast chain took 34 s of CPU to plan).
///
/// The walk is sqlparser's visitor, which recurses natively, but it counts
/// depth on the way down and stops at the first element past a limit, so
/// it never descends more than [`MAX_NESTING_DEPTH`] levels. Set operations
/// have no visitor hook: the height of a query's set-operation tree is
/// measured iteratively when the query is entered, before the visitor
/// descends into it.
fn check_syntax_limits(statement: &Statement) -> Result<(), QueryError> {
    let outcome = match statement {
        Statement::Statement(inner) => inner.visit(&mut SyntaxSize::default()),
        Statement::Explain(explain) => return check_syntax_limits(&explain.statement),
        Statement::CopyTo(copy) => match &copy.source {
            datafusion::sql::parser::CopyToSource::Query(query) => {
                query.visit(&mut SyntaxSize::default())
            }
            datafusion::sql::parser::CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        Statement::CreateExternalTable(_) | Statement::Reset(_) => ControlFlow::Continue(()),
    };
    syntax_limit_error(outcome)
}

/// The refusal for the limit a syntax walk stopped at, if any.
fn syntax_limit_error(outcome: ControlFlow<SyntaxLimit>) -> Result<(), QueryError> {
    match outcome {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(SyntaxLimit::Depth) => Err(QueryError::InvalidRequest(format!(
            "the query nests more than {MAX_NESTING_DEPTH} levels deep (operators, casts, function calls, \
             subqueries and set operations all count); the limit is {MAX_NESTING_DEPTH} levels"
        ))),
        ControlFlow::Break(SyntaxLimit::Nodes) => Err(QueryError::InvalidRequest(format!(
            "the query has more than {MAX_SYNTAX_NODES} syntax elements (expressions, subqueries, \
             table references); the limit is {MAX_SYNTAX_NODES} elements"
        ))),
        ControlFlow::Break(SyntaxLimit::Relations) => Err(QueryError::InvalidRequest(format!(
            "the query references more than {MAX_RELATIONS} tables (FROM items and JOIN operands); \
             the limit is {MAX_RELATIONS} table references"
        ))),
        ControlFlow::Break(SyntaxLimit::ExpressionWork) => {
            Err(QueryError::InvalidRequest(format!(
                "the query's nested expressions are too large to plan: the sizes of all their \
             subexpressions add up to more than {MAX_EXPRESSION_WORK}, the limit (long chains of \
             operators cost the square of their length; use IN lists, CASE or fewer terms)"
            )))
        }
        ControlFlow::Break(SyntaxLimit::SelectItems) => Err(QueryError::InvalidRequest(format!(
            "a SELECT list names more than {MAX_SELECT_ITEMS} items; the limit is \
             {MAX_SELECT_ITEMS} items per SELECT"
        ))),
    }
}

/// [`check_syntax_limits`] for a statement parsed with sqlparser directly
/// (the broker parses consumers' SQL itself): call it before anything else
/// walks or prints the statement.
pub fn check_statement_limits(
    statement: &datafusion::sql::sqlparser::ast::Statement,
) -> Result<(), QueryError> {
    syntax_limit_error(statement.visit(&mut SyntaxSize::default()))
}

/// Depth and size of the syntax tree seen so far by the visitor.
#[derive(Default)]
struct SyntaxSize {
    depth: usize,
    nodes: usize,
    relations: usize,
    /// How much each element on the current path added to `depth`.
    path: Vec<usize>,
    /// The depth of the current expression within its expression, for
    /// each query on the path (an expression in a subquery starts anew).
    expression_depth: Vec<usize>,
    expression_work: usize,
}

impl SyntaxSize {
    fn enter(&mut self, levels: usize) -> ControlFlow<SyntaxLimit> {
        self.depth += levels;
        self.nodes += 1;
        self.path.push(levels);
        if self.depth > MAX_NESTING_DEPTH {
            ControlFlow::Break(SyntaxLimit::Depth)
        } else if self.nodes > MAX_SYNTAX_NODES {
            ControlFlow::Break(SyntaxLimit::Nodes)
        } else {
            ControlFlow::Continue(())
        }
    }

    fn leave(&mut self) -> ControlFlow<SyntaxLimit> {
        self.depth -= self.path.pop().unwrap_or(0);
        ControlFlow::Continue(())
    }
}

impl Visitor for SyntaxSize {
    type Break = SyntaxLimit;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<SyntaxLimit> {
        self.expression_depth.push(0);
        // A query plus the set operations it chains (each one a plan level).
        self.enter(1 + set_operation_depth(&query.body))
    }
    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<SyntaxLimit> {
        self.expression_depth.pop();
        self.leave()
    }
    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<SyntaxLimit> {
        if select.projection.len() > MAX_SELECT_ITEMS {
            return ControlFlow::Break(SyntaxLimit::SelectItems);
        }
        self.enter(1)
    }
    fn post_visit_select(&mut self, _: &Select) -> ControlFlow<SyntaxLimit> {
        self.leave()
    }
    fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<SyntaxLimit> {
        self.relations += 1;
        if self.relations > MAX_RELATIONS {
            return ControlFlow::Break(SyntaxLimit::Relations);
        }
        self.enter(1)
    }
    fn post_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<SyntaxLimit> {
        self.leave()
    }
    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<SyntaxLimit> {
        if self.expression_depth.is_empty() {
            self.expression_depth.push(0);
        }
        if let Some(depth) = self.expression_depth.last_mut() {
            *depth += 1;
            self.expression_work += *depth;
        }
        if self.expression_work > MAX_EXPRESSION_WORK {
            return ControlFlow::Break(SyntaxLimit::ExpressionWork);
        }
        self.enter(1)
    }
    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<SyntaxLimit> {
        if let Some(depth) = self.expression_depth.last_mut() {
            *depth = depth.saturating_sub(1);
        }
        self.leave()
    }
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
    // Planning is synchronous CPU work inside; it runs without holding a
    // runtime worker, so other tenants' queries go on meanwhile.
    let plan = crate::blocking::blocking_async(state.statement_to_plan(statement))
        .await
        .map_err(QueryError::from_planning)?;
    check_depth(&plan)?;
    refuse_computed_patterns(&plan)?;
    refuse_volatile_functions(&plan)?;
    check_patterns(&plan)?;
    check_limits(&plan)?;
    Ok(plan)
}

/// Refuses volatile functions (`random()`, `uuid()`): a new value for every
/// row.
///
/// An expression over one is evaluated once per row that reaches it and
/// cannot be evaluated ahead like other constants ([`super::constants`]),
/// so one that always fails (`to_timestamp(CAST(random() AS VARCHAR))`)
/// fails exactly when some row reaches it: an exact answer to "does any
/// row match?" under differential privacy or for a group smaller than k.
/// Nor does a policy ever allow-list them: they read no column. Sampling
/// belongs to the provider.
pub fn refuse_volatile_functions(plan: &LogicalPlan) -> Result<(), QueryError> {
    use datafusion::logical_expr::Expr as PlanExpr;
    let mut found: Option<String> = None;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let PlanExpr::ScalarFunction(call) = e
                    && e.is_volatile_node()
                {
                    found = Some(call.name().to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    match found {
        None => Ok(()),
        Some(name) => Err(QueryError::InvalidRequest(format!(
            "`{name}()` gives each row a new value and is not accepted: whether an expression over \
             it fails would depend on which rows the query reaches"
        ))),
    }
}

/// The regular-expression functions, with the positions of their arguments
/// that are compiled into the regex (pattern and flags).
const REGEX_FUNCTIONS: [(&str, &[usize]); 5] = [
    ("regexp_like", &[1, 2]),
    ("regexp_match", &[1, 2]),
    ("regexp_count", &[1, 3]),
    ("regexp_instr", &[1, 4]),
    ("regexp_replace", &[1, 3]),
];

/// Refuses LIKE, ILIKE, SIMILAR TO, the regex operators (`~`, `~*`, `!~`,
/// `!~*`) and the `regexp_*` functions when their pattern (or flags) is
/// computed from the rows instead of being a constant.
///
/// A pattern is compiled into an automaton: a ten-byte pattern such as
/// `\w{1000}` takes about a second and 10 MB to compile, outside the
/// query's memory pool. With a constant pattern that happens once per
/// batch; with a pattern taken from a column, once per distinct value (the
/// regex kernels even keep every compiled pattern of a batch in memory),
/// which no per-row limit could make cheap. There is no cheap safe bound
/// on what one pattern costs to compile, so patterns must be constants
/// (literals, parameters, or expressions over them). Refused here, after
/// planning and before anything runs.
pub fn refuse_computed_patterns(plan: &LogicalPlan) -> Result<(), QueryError> {
    use datafusion::logical_expr::{Expr as PlanExpr, Operator};
    let mut refused: Option<String> = None;
    let mut check = |expr: &PlanExpr| {
        let computed = |pattern: &PlanExpr| !is_constant(pattern);
        let what = match expr {
            PlanExpr::Like(like) if computed(&like.pattern) => Some(
                if like.case_insensitive {
                    "ILIKE"
                } else {
                    "LIKE"
                }
                .to_string(),
            ),
            PlanExpr::SimilarTo(like) if computed(&like.pattern) => Some("SIMILAR TO".into()),
            PlanExpr::BinaryExpr(binary)
                if matches!(
                    binary.op,
                    Operator::RegexMatch
                        | Operator::RegexIMatch
                        | Operator::RegexNotMatch
                        | Operator::RegexNotIMatch
                        | Operator::LikeMatch
                        | Operator::ILikeMatch
                        | Operator::NotLikeMatch
                        | Operator::NotILikeMatch
                ) && computed(&binary.right) =>
            {
                Some(format!("the operator `{}`", binary.op))
            }
            PlanExpr::ScalarFunction(function) => REGEX_FUNCTIONS
                .iter()
                .find(|(name, _)| *name == function.name())
                .filter(|(_, positions)| {
                    positions
                        .iter()
                        .filter_map(|&i| function.args.get(i))
                        .any(computed)
                })
                .map(|(name, _)| format!("`{name}`")),
            _ => None,
        };
        if let Some(what) = what {
            refused.get_or_insert(what);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    };
    plan.apply_with_subqueries(|node| node.apply_expressions(|expr| expr.apply(&mut check)))
        .map_err(QueryError::from_planning)?;
    match refused {
        None => Ok(()),
        Some(what) => Err(QueryError::InvalidRequest(format!(
            "{what} with a pattern computed from the rows is not accepted: every distinct pattern \
             would be compiled, which can take a second and megabytes of memory each; use a \
             constant pattern (a literal or a parameter)"
        ))),
    }
}

/// Most wildcards (`%`, `_`) one LIKE pattern may hold. A LIKE pattern
/// with wildcards inside is compiled into a regular expression with a
/// `.*` or `.` per wildcard; past a few thousand the compiled automaton
/// takes seconds to build and to run on each value (8,000 took 30 s of
/// one core on a 40-row table, unpreemptible). Hand-written patterns hold
/// a handful.
pub const MAX_LIKE_WILDCARDS: usize = 100;

/// Most memory one regular expression (a `~` operator, a `regexp_*`
/// function, SIMILAR TO) may compile into: a fifth of the regex engine's
/// default limit. Compilation time and the cost of matching grow with it;
/// Unicode classes are large: `\w{100}` is over it, `\w{40}` and
/// `[a-z]{1000}` are not.
pub const MAX_REGEX_COMPILED_BYTES: usize = 2 << 20;

/// Refuses constant patterns too large to compile cheaply (see
/// [`MAX_LIKE_WILDCARDS`], [`MAX_REGEX_COMPILED_BYTES`]). Runs on the
/// plan as written, when parameters are bound, and on the optimised plan,
/// where patterns computed from constants have been folded.
pub fn check_patterns(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut problem: Option<String> = None;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                problem = pattern_problem(e);
                Ok(if problem.is_some() {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            })
        })
    });
    problem.map_or(Ok(()), |p| Err(QueryError::InvalidRequest(p)))
}

/// What is wrong with the constant pattern of `expr`, if it has one.
fn pattern_problem(expr: &datafusion::logical_expr::Expr) -> Option<String> {
    use datafusion::logical_expr::{Expr as PlanExpr, Operator};
    let (what, pattern, like) = match expr {
        PlanExpr::Like(like) => (
            if like.case_insensitive {
                "ILIKE"
            } else {
                "LIKE"
            },
            &*like.pattern,
            Some(like.escape_char),
        ),
        // DataFusion matches SIMILAR TO patterns as regular expressions.
        PlanExpr::SimilarTo(like) => ("the SIMILAR TO pattern", &*like.pattern, None),
        PlanExpr::BinaryExpr(binary) => match binary.op {
            Operator::LikeMatch
            | Operator::ILikeMatch
            | Operator::NotLikeMatch
            | Operator::NotILikeMatch => ("LIKE", &*binary.right, Some(None)),
            Operator::RegexMatch
            | Operator::RegexIMatch
            | Operator::RegexNotMatch
            | Operator::RegexNotIMatch => ("the regular expression", &*binary.right, None),
            _ => return None,
        },
        PlanExpr::ScalarFunction(function)
            if REGEX_FUNCTIONS
                .iter()
                .any(|(name, _)| *name == function.name()) =>
        {
            ("the regular expression", function.args.get(1)?, None)
        }
        _ => return None,
    };
    let text = literal_text(pattern)?;
    if let Some(escape) = like {
        let wildcards = like_wildcards(text, escape.unwrap_or('\\'));
        if wildcards > MAX_LIKE_WILDCARDS {
            return Some(format!(
                "the {what} pattern has {wildcards} wildcards (`%`, `_`); the limit is \
                 {MAX_LIKE_WILDCARDS}: each one becomes a step of a regular expression \
                 that every value is matched against"
            ));
        }
        return None;
    }
    match regex::RegexBuilder::new(text)
        .size_limit(MAX_REGEX_COMPILED_BYTES)
        .build()
    {
        Err(regex::Error::CompiledTooBig(_)) => Some(format!(
            "{what} is too large: compiled, it would exceed {} (the limit); use fewer or \
             smaller repetitions and character classes",
            crate::config::human_bytes(MAX_REGEX_COMPILED_BYTES)
        )),
        // Other errors (syntax) are DataFusion's to report, as they are.
        _ => None,
    }
}

/// The text of a string literal (through casts between string types).
fn literal_text(expr: &datafusion::logical_expr::Expr) -> Option<&str> {
    use datafusion::logical_expr::Expr as PlanExpr;
    match expr {
        PlanExpr::Literal(
            ScalarValue::Utf8(Some(text))
            | ScalarValue::LargeUtf8(Some(text))
            | ScalarValue::Utf8View(Some(text)),
            _,
        ) => Some(text),
        PlanExpr::Cast(cast) => literal_text(&cast.expr),
        PlanExpr::TryCast(cast) => literal_text(&cast.expr),
        PlanExpr::Alias(alias) => literal_text(&alias.expr),
        _ => None,
    }
}

/// Unescaped `%` and `_` in a LIKE pattern.
fn like_wildcards(pattern: &str, escape: char) -> usize {
    let mut count = 0;
    let mut escaped = false;
    for c in pattern.chars() {
        if escaped {
            escaped = false;
        } else if c == escape {
            escaped = true;
        } else if c == '%' || c == '_' {
            count += 1;
        }
    }
    count
}

/// True if `expr` has the same value for every row: no column, subquery,
/// aggregate, window or volatile function in it. Parameters count as
/// constants, since they are bound to values before execution.
pub(super) fn is_constant(expr: &datafusion::logical_expr::Expr) -> bool {
    use datafusion::logical_expr::Expr as PlanExpr;
    !expr
        .exists(|e| {
            Ok(matches!(
                e,
                PlanExpr::Column(_)
                    | PlanExpr::OuterReferenceColumn(..)
                    | PlanExpr::ScalarSubquery(_)
                    | PlanExpr::Exists(_)
                    | PlanExpr::InSubquery(_)
                    | PlanExpr::SetComparison(_)
                    | PlanExpr::AggregateFunction(_)
                    | PlanExpr::WindowFunction(_)
                    | PlanExpr::ScalarVariable(..)
            ) || e.is_volatile_node())
        })
        .unwrap_or(true)
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
    crate::blocking::blocking(|| {
        state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})
    })
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
    check_patterns(&plan)?;
    Ok(plan)
}

/// LIMIT and OFFSET must be integers from 0 to 2^63 - 1 (or NULL: none),
/// checked when the statement is planned and again when parameters are
/// bound, rather than failing at execution (where the optimizer would
/// report it as an internal error, after any budget was reserved).
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

/// What is wrong with a LIMIT or OFFSET value, if anything. A parameter
/// not bound yet is checked once it is; an expression over constants
/// (`-1`, `2 * 5`) is folded first.
fn limit_problem(bound: &datafusion::logical_expr::Expr) -> Option<&'static str> {
    use datafusion::logical_expr::Expr;
    use datafusion::logical_expr::simplify::SimplifyContext;
    use datafusion::optimizer::simplify_expressions::ExprSimplifier;
    const NEGATIVE: &str = "LIMIT and OFFSET take an integer of at least 0; the value is negative";
    const NOT_AN_INTEGER: &str = "LIMIT and OFFSET take an integer from 0 to 9223372036854775807 (a BIGINT constant or parameter)";
    if bound
        .exists(|e| Ok(matches!(e, Expr::Placeholder(_))))
        .unwrap_or(false)
    {
        return None;
    }
    let folded = match bound {
        Expr::Literal(..) => bound.clone(),
        _ => match ExprSimplifier::new(SimplifyContext::default()).simplify(bound.clone()) {
            Ok(folded) => folded,
            Err(_) => return Some(NOT_AN_INTEGER),
        },
    };
    match folded {
        Expr::Literal(value, _) if value.is_null() => None,
        Expr::Literal(ScalarValue::Int64(Some(n)), _) if n >= 0 => None,
        Expr::Literal(ScalarValue::Int64(Some(_)), _) => Some(NEGATIVE),
        _ => Some(NOT_AN_INTEGER),
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

/// Refuses a query naming a configured dataset whose database or object
/// store could not be reached when the connector started (it is not
/// served until then). This tells a caller that the name is configured,
/// which a caller without a grant for it could not learn otherwise; a
/// database dataset described once is served from its saved description
/// instead, and fails at execution, after the policy's decision.
pub fn refuse_unreached(
    state: &SessionState,
    catalog: &Catalog,
    statement: &Statement,
) -> Result<(), QueryError> {
    if catalog.unreached().is_empty() {
        return Ok(());
    }
    for table in state
        .resolve_table_references(statement)
        .map_err(QueryError::from_planning)?
    {
        let served_namespace = table.catalog().is_none_or(|c| c == CATALOG)
            && table.schema().is_none_or(|s| s == SCHEMA);
        if served_namespace
            && let Some(unreached) = catalog.unreached().iter().find(|u| u.name == table.table())
        {
            return Err(QueryError::Unavailable(format!(
                "dataset `{}` is not available: its database or object store could not be reached when the connector started; try again later, and if it persists tell the provider (it is served once the connector restarts with its source reachable)",
                unreached.name
            )));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    fn refusal(sql: &str) -> String {
        let state = SessionContext::new().state();
        match parse(&state, sql, 1 << 20) {
            Ok(_) => panic!("`{}…` should be refused", &sql[..sql.len().min(60)]),
            Err(e) => {
                assert!(
                    matches!(e, QueryError::InvalidRequest(_)),
                    "{e:?} is not INVALID_ARGUMENT"
                );
                e.to_string()
            }
        }
    }

    fn accepted(sql: &str) {
        let state = SessionContext::new().state();
        if let Err(e) = parse(&state, sql, 1 << 20) {
            panic!("`{sql}` refused: {e}");
        }
    }

    /// Runs `work` on a thread with a `mib` MiB stack.
    fn on_stack(mib: usize, work: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(mib << 20)
            .spawn(work)
            .unwrap()
            .join()
            .unwrap();
    }

    /// The query runtime's stack (cli): refused trees are dropped there.
    const QUERY_STACK_MIB: usize = 256;

    #[test]
    fn every_kind_of_chain_is_bounded_before_planning() {
        on_stack(QUERY_STACK_MIB, || {
            let casts = format!("SELECT 1{}", "::INT".repeat(50_000));
            let at_time_zone = format!("SELECT now(){}", " AT TIME ZONE 'UTC'".repeat(5_000));
            let is_null = format!("SELECT 1{}", " IS NULL".repeat(5_000));
            let sum = format!("SELECT {}", vec!["1"; 20_000].join(" + "));
            let unions = vec!["SELECT 1 AS x"; 5_000].join(" UNION ALL ");
            let explained = format!("EXPLAIN SELECT 1{}", "::INT".repeat(5_000));
            for sql in [&casts, &at_time_zone, &is_null, &sum, &unions, &explained] {
                let message = refusal(sql);
                assert!(message.contains("the limit is 256 levels"), "{message}");
            }
        });
    }

    #[test]
    fn the_check_stops_at_the_limit_and_the_deepest_tree_drops_safely() {
        on_stack(QUERY_STACK_MIB, || {
            // The deepest chain the default limits.max_sql_bytes (256 KiB)
            // can hold: two bytes a level.
            let sql = format!("SELECT 1{}", "+1".repeat(128 * 1024));
            let state = SessionContext::new().state();
            let statement = parse_one_statement(&state, &sql).unwrap();
            // The check itself needs no deep stack: it stops at the limit.
            let statement = std::thread::Builder::new()
                .stack_size(1 << 20)
                .spawn(move || {
                    assert!(check_syntax_limits(&statement).is_err());
                    statement
                })
                .unwrap()
                .join()
                .unwrap();
            // Dropping it recurses once per level, within the query
            // runtime's stack.
            drop(statement);
        });
    }

    #[test]
    fn statements_parsed_elsewhere_are_checked_the_same_way() {
        use datafusion::sql::sqlparser::dialect::GenericDialect;
        use datafusion::sql::sqlparser::parser::Parser;
        on_stack(QUERY_STACK_MIB, || {
            let sql = format!("SELECT 1{} FROM trips", "::INT".repeat(5_000));
            let statement = Parser::parse_sql(&GenericDialect {}, &sql)
                .unwrap()
                .remove(0);
            let err = check_statement_limits(&statement).unwrap_err();
            assert!(err.to_string().contains("the limit is 256 levels"), "{err}");
            let fine = Parser::parse_sql(&GenericDialect {}, "SELECT mode FROM trips")
                .unwrap()
                .remove(0);
            check_statement_limits(&fine).unwrap();
        });
    }

    #[test]
    fn prefix_operators_and_nested_calls_stop_at_the_parser_limit() {
        let minus = format!("SELECT {}1", "- ".repeat(2_000));
        let not = format!("SELECT {}true", "NOT ".repeat(2_000));
        // Between the recursion limit (50) and the bracket limit (128).
        let calls = format!("SELECT {}1{}", "abs(".repeat(100), ")".repeat(100));
        let parentheses = format!("SELECT {}1{}", "(".repeat(100), ")".repeat(100));
        for sql in [&minus, &not, &calls, &parentheses] {
            let message = refusal(sql);
            assert!(
                message.contains("recursion limit") && message.contains("50"),
                "{message}"
            );
        }
        // Past the bracket limit: refused before the parser runs.
        for sql in [
            format!("SELECT {}1{}", "abs(".repeat(2_000), ")".repeat(2_000)),
            format!("SELECT {}1{}", "(".repeat(2_000), ")".repeat(2_000)),
        ] {
            let message = refusal(&sql);
            assert!(
                message.contains("nests brackets")
                    && message.contains("2000 levels deep")
                    && message.contains("the limit is 128"),
                "{message}"
            );
        }
        accepted(&format!("SELECT {}true", "NOT ".repeat(10)));
        accepted(&format!("SELECT {}1", "- ".repeat(10)));
    }

    #[test]
    fn wide_statements_are_bounded_too() {
        let many = format!(
            "SELECT count(*) FROM trips WHERE trip_id IN ({})",
            vec!["1"; MAX_SYNTAX_NODES].join(",")
        );
        assert!(refusal(&many).contains("syntax elements"));
        let tables = (0..=MAX_RELATIONS)
            .map(|i| format!("trips t{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert!(refusal(&format!("SELECT 1 FROM {tables}")).contains("references more than"));
        let joins = (1..=MAX_RELATIONS)
            .map(|i| format!(" JOIN trips t{i} ON true"))
            .collect::<String>();
        assert!(
            refusal(&format!("SELECT 1 FROM trips t0{joins}")).contains("references more than")
        );
    }

    #[test]
    fn expressions_that_are_costly_to_plan_are_refused() {
        // 100 sums of 240 terms: within depth and size, quadratic to plan.
        let sums = (0..100)
            .map(|i| format!("({}) AS c{i}", vec!["trip_id"; 240].join(" + ")))
            .collect::<Vec<_>>()
            .join(", ");
        let message = refusal(&format!("SELECT {sums} FROM trips"));
        assert!(message.contains("too large to plan"), "{message}");
        let columns = (0..=MAX_SELECT_ITEMS)
            .map(|i| format!("trip_id AS c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let message = refusal(&format!("SELECT {columns} FROM trips"));
        assert!(message.contains("items per SELECT"), "{message}");
        // A subquery's expressions are weighed on their own.
        let chain = vec!["trip_id"; 250].join(" + ");
        accepted(&format!(
            "SELECT ({chain}) AS a, (SELECT {chain} FROM trips) AS b FROM trips"
        ));
    }

    #[test]
    fn ordinary_queries_pass() {
        accepted("SELECT mode, count(*) FROM trips WHERE fare_eur > 2 GROUP BY mode");
        accepted(&format!("SELECT 1{}", "::INT".repeat(200)));
        accepted(&format!(
            "SELECT count(*) FROM trips WHERE trip_id IN ({})",
            (0..20_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
        accepted(
            "WITH a AS (SELECT mode FROM trips), b AS (SELECT mode FROM a) SELECT * FROM b UNION ALL SELECT mode FROM trips",
        );
    }

    async fn planned(sql: &str) -> Result<LogicalPlan, QueryError> {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE t (s VARCHAR, p VARCHAR) AS VALUES ('a', 'a%')")
            .await
            .unwrap();
        let state = ctx.state();
        let statement = parse(&state, sql, 1 << 20)?;
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(QueryError::from_planning)?;
        refuse_computed_patterns(&plan)?;
        refuse_volatile_functions(&plan)?;
        check_patterns(&plan)?;
        check_limits(&plan)?;
        Ok(plan)
    }

    #[tokio::test]
    async fn volatile_functions_are_refused_anywhere() {
        for sql in [
            "SELECT to_timestamp(CAST(random() AS VARCHAR)) AS g, count(*) FROM t GROUP BY 1",
            "SELECT s FROM t WHERE random() < 0.5",
            "SELECT s FROM t ORDER BY uuid()",
            "SELECT count(*) FROM t WHERE s IN (SELECT CAST(random() AS VARCHAR))",
        ] {
            let err = planned(sql).await.unwrap_err();
            assert!(
                matches!(&err, QueryError::InvalidRequest(m) if m.contains("gives each row a new value")),
                "{sql}: {err}"
            );
        }
        // Stable functions are one value per query: folded, then checked.
        planned("SELECT s FROM t WHERE now() > TIMESTAMP '2020-01-01T00:00:00'")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn patterns_too_large_to_compile_cheaply_are_refused() {
        let many = |unit: &str, n: usize| unit.repeat(n);
        for sql in [
            format!("SELECT s LIKE '{}' FROM t", many("%_", 51)),
            format!("SELECT s NOT ILIKE 'x{}' FROM t", many("_", 101)),
            format!("SELECT count(*) FROM t WHERE s ~~ '{}'", many("a%", 101)),
            "SELECT s ~ '\\w{1000}' FROM t".to_string(),
            format!("SELECT regexp_like(s, '{}') FROM t", many(".*.", 20_000)),
            "SELECT s SIMILAR TO '(\\w{300}){10}' FROM t".to_string(),
        ] {
            let err = planned(&sql).await.unwrap_err();
            assert!(
                matches!(&err, QueryError::InvalidRequest(m) if m.contains("limit")),
                "{}: {err}",
                &sql[..60.min(sql.len())]
            );
        }
        for sql in [
            format!("SELECT s LIKE '{}' FROM t", many("%_", 50)),
            // Escaped wildcards are literal characters.
            format!("SELECT s LIKE '{}' FROM t", many("\\%", 500)),
            "SELECT s ~ '^[a-z]{3}-\\d{1,4}$' FROM t".to_string(),
            "SELECT s ~ '\\w{40}' FROM t".to_string(),
            "SELECT s ~ '[a-z]{1000}' FROM t".to_string(),
        ] {
            planned(&sql)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", &sql[..60.min(sql.len())]));
        }
    }

    #[tokio::test]
    async fn limits_must_be_integers_from_zero() {
        for sql in [
            "SELECT s FROM t LIMIT -1",
            "SELECT s FROM t LIMIT 1 OFFSET -5",
            "SELECT s FROM t LIMIT 2 - 3",
            "SELECT s FROM t OFFSET 18446744073709551615",
            "SELECT s FROM t LIMIT 1.5",
        ] {
            let err = planned(sql).await.unwrap_err();
            assert!(
                matches!(&err, QueryError::InvalidRequest(m) if m.contains("LIMIT and OFFSET")),
                "{sql}: {err}"
            );
        }
        for sql in [
            "SELECT s FROM t LIMIT 0",
            "SELECT s FROM t LIMIT 2 * 5 OFFSET 1",
            "SELECT s FROM t LIMIT NULL",
            "SELECT s FROM t LIMIT $1",
        ] {
            planned(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[tokio::test]
    async fn patterns_from_rows_are_refused() {
        for sql in [
            "SELECT s LIKE p FROM t",
            "SELECT s ILIKE p || '%' FROM t",
            "SELECT s NOT LIKE upper(p) FROM t",
            "SELECT s ~ p FROM t",
            "SELECT s SIMILAR TO p FROM t",
            "SELECT regexp_like(s, p) FROM t",
            "SELECT regexp_replace(s, 'a', 'b', p) FROM t",
            "SELECT count(*) FROM t WHERE s LIKE (SELECT max(p) FROM t)",
            "SELECT s LIKE CAST(random() AS VARCHAR) FROM t",
        ] {
            let err = planned(sql).await.unwrap_err();
            assert!(
                matches!(&err, QueryError::InvalidRequest(m) if m.contains("pattern computed from the rows")),
                "{sql}: {err}"
            );
        }
        for sql in [
            "SELECT s LIKE 'a%' FROM t",
            "SELECT s LIKE 'a' || '%' FROM t",
            "SELECT s ~ '^a' FROM t",
            "SELECT regexp_replace(s, 'a', p, 'g') FROM t",
            "SELECT s LIKE $1 FROM t",
        ] {
            planned(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
