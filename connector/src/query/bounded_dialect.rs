//! Parsing SQL from outside with a bound on the parser's work.
//!
//! sqlparser backtracks. Where a word can start a special expression (`NOT`,
//! `CAST`, `CASE`, `POSITION`, `SUBSTRING`, `CURRENT_DATE`, …) and that
//! reading fails, it parses the same tokens again as a plain identifier or
//! function call. Nested, the work doubles or triples per level, far below
//! the parser's recursion limit: 25 unclosed `NOT (` (133 bytes) kept a core
//! busy for more than a minute, 40 closed ones longer; one consumer could
//! have spent every planning thread that way.
//!
//! The parser has no budget of its own, but it asks its dialect at every
//! expression it reads (`parse_prefix`), at every operator
//! (`get_next_precedence`, `parse_infix`) and at every statement. So the
//! dialect is where the work is counted: [`BoundedDialect`] delegates every
//! method to the session's dialect, including its type identity (the parser
//! checks `dialect.is::<GenericDialect>()` in places), and once one parse has
//! taken more steps than its budget, those hooks fail with
//! `RecursionLimitExceeded`, the one error that the parser's speculative
//! paths pass on instead of trying the next reading. From then on every path
//! fails at its first step, so a parse ends within about its budget, whatever
//! construct makes it backtrack (this one, or one a later sqlparser adds).
//!
//! Steps alone do not bound the time: the cost of one step can grow with the
//! input. Before each token the parser skips whitespace one token per
//! character, before each expression it tries to read a data type (which
//! walks a whole dotted name or `ARRAY<ARRAY<…` chain), and it copies tokens
//! (a 64 KiB string at every visit). 250 KiB of spaces after 20 `NOT (` took
//! 14 minutes within the step budget. So the same hooks also stop a parse at
//! [`TIME_LIMIT`]; ordinary queries parse in milliseconds, far from it.
//!
//! Data types recurse without the parser's recursion limit (`ARRAY<ARRAY<…`,
//! `NULLABLE(NULLABLE(…`): 20,000 levels overflow a thread's stack, which
//! aborts the process. [`bracket_refusal`] reads the tokens first and
//! refuses brackets nested deeper than [`MAX_BRACKET_DEPTH`], which no
//! query needs (expressions stop at the recursion limit, 50, anyway).

use std::any::TypeId;
use std::cell::Cell;
use std::iter::Peekable;
use std::str::Chars;
use std::time::{Duration, Instant};

use datafusion::sql::sqlparser::ast::{
    ColumnOption, Expr, GranteesType, Ident, ObjectNamePart, Statement,
};
use datafusion::sql::sqlparser::dialect::{Dialect, Precedence};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// Steps a parse may take per byte of SQL, beyond [`BASE_STEPS`]. The test
/// suites' queries take at most 0.3 steps per byte and 40 steps in all
/// (measured by the tests below, which keep a margin of 4); a parse that
/// backtracks reaches the budget of the longest query the connector accepts
/// (256 KiB: about 530,000 steps) in about a second of CPU.
pub const STEPS_PER_BYTE: u64 = 2;
/// Steps every parse may take, however short its text.
pub const BASE_STEPS: u64 = 10_000;
/// Wall time a parse may take, whatever its steps.
pub const TIME_LIMIT: Duration = Duration::from_secs(5);

/// How deep parentheses, square brackets and the angle brackets of
/// `ARRAY<…>`, `MAP<…>` and `STRUCT<…>` may nest.
pub const MAX_BRACKET_DEPTH: usize = 128;

/// Why `sql` must not reach the parser at all: brackets nested deeper than
/// [`MAX_BRACKET_DEPTH`]. SQL that does not tokenize is left to the parser,
/// which says what is wrong with it.
pub fn bracket_refusal(dialect: &dyn Dialect, sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(dialect, sql).tokenize().ok()?;
    let depth = bracket_depth(&tokens);
    (depth > MAX_BRACKET_DEPTH).then(|| {
        format!(
            "the query nests brackets (parentheses, [ ] or the < > of ARRAY, MAP and STRUCT \
             types) {depth} levels deep; the limit is {MAX_BRACKET_DEPTH}"
        )
    })
}

/// The deepest nesting of brackets in `tokens`. A `<` opens a level only
/// right after `ARRAY`, `MAP` or `STRUCT` (elsewhere it compares), and
/// closes at `>` (or two at `>>`).
fn bracket_depth(tokens: &[Token]) -> usize {
    let (mut open, mut deepest) = (Vec::new(), 0);
    let mut previous: Option<&Token> = None;
    for token in tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::LParen | Token::LBracket => open.push(false),
            Token::Lt if previous.is_some_and(opens_a_type) => open.push(true),
            Token::RParen | Token::RBracket => {
                open.pop();
            }
            Token::Gt | Token::ShiftRight => {
                let closes = if *token == Token::Gt { 1 } else { 2 };
                for _ in 0..closes {
                    if open.last() == Some(&true) {
                        open.pop();
                    }
                }
            }
            _ => {}
        }
        deepest = deepest.max(open.len());
        previous = Some(token);
    }
    deepest
}

fn opens_a_type(token: &Token) -> bool {
    matches!(token, Token::Word(w) if matches!(w.keyword, Keyword::ARRAY | Keyword::MAP | Keyword::STRUCT))
}

/// The session's dialect, counting the parser's steps against a budget.
#[derive(Debug)]
pub struct BoundedDialect {
    inner: Box<dyn Dialect>,
    steps: Cell<u64>,
    budget: u64,
    deadline: Instant,
    time_limit: Duration,
    out_of_time: Cell<bool>,
}

impl BoundedDialect {
    /// A dialect for parsing `sql` once: the budget grows with its length.
    pub fn new(inner: Box<dyn Dialect>, sql: &str) -> Self {
        let budget = BASE_STEPS.saturating_add(STEPS_PER_BYTE.saturating_mul(sql.len() as u64));
        BoundedDialect {
            inner,
            steps: Cell::new(0),
            budget,
            deadline: Instant::now() + TIME_LIMIT,
            time_limit: TIME_LIMIT,
            out_of_time: Cell::new(false),
        }
    }

    /// The same with another time limit, counted from now.
    pub fn with_time_limit(mut self, limit: Duration) -> Self {
        self.deadline = Instant::now() + limit;
        self.time_limit = limit;
        self
    }

    /// Whether the parse ran out of steps (its error, if any, is then not
    /// about the SQL's syntax).
    pub fn exhausted(&self) -> bool {
        self.steps.get() > self.budget || self.out_of_time.get()
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps.get()
    }

    /// The budget of this parse, in steps.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// What to tell the sender of a query that ran out of steps.
    pub fn exhausted_message(&self) -> String {
        if self.out_of_time.get() {
            return format!(
                "the SQL parser gave up on this query after {:.1} s: long runs of whitespace, long \
                 dotted names, long literals or deeply nested types make it re-read the same text \
                 at every expression; shorten them",
                self.time_limit.as_secs_f64()
            );
        }
        format!(
            "the SQL parser gave up after {} steps on this query: it parses nested NOT, CAST, \
             CASE, POSITION or similar prefixes once per way to read them, so the work doubles \
             with every level; nest fewer of them (the budget is {} steps plus {} per byte)",
            self.budget, BASE_STEPS, STEPS_PER_BYTE
        )
    }

    /// Counts one step; true once the budget or the time is spent.
    fn over_budget(&self) -> bool {
        let steps = self.steps.get().saturating_add(1);
        self.steps.set(steps);
        if self.out_of_time.get() || steps > self.budget {
            return true;
        }
        if Instant::now() >= self.deadline {
            self.out_of_time.set(true);
            return true;
        }
        false
    }
}

/// Methods that only read the inner dialect's settings, delegated as they are.
macro_rules! delegate_settings {
    ($($name:ident,)*) => {
        $(fn $name(&self) -> bool { self.inner.$name() })*
    };
}

impl Dialect for BoundedDialect {
    // The counted hooks: every expression, operator and statement.
    fn parse_prefix(&self, parser: &mut Parser) -> Option<Result<Expr, ParserError>> {
        if self.over_budget() {
            return Some(Err(ParserError::RecursionLimitExceeded));
        }
        self.inner.parse_prefix(parser)
    }

    fn parse_infix(
        &self,
        parser: &mut Parser,
        expr: &Expr,
        precedence: u8,
    ) -> Option<Result<Expr, ParserError>> {
        if self.over_budget() {
            return Some(Err(ParserError::RecursionLimitExceeded));
        }
        self.inner.parse_infix(parser, expr, precedence)
    }

    fn get_next_precedence(&self, parser: &Parser) -> Option<Result<u8, ParserError>> {
        if self.over_budget() {
            return Some(Err(ParserError::RecursionLimitExceeded));
        }
        self.inner.get_next_precedence(parser)
    }

    fn parse_statement(&self, parser: &mut Parser) -> Option<Result<Statement, ParserError>> {
        if self.over_budget() {
            return Some(Err(ParserError::RecursionLimitExceeded));
        }
        self.inner.parse_statement(parser)
    }

    // The inner dialect's identity: the parser's `dialect_of!` checks.
    fn dialect(&self) -> TypeId {
        self.inner.dialect()
    }

    // Everything else as the inner dialect has it.
    fn get_next_precedence_default(&self, parser: &Parser) -> Result<u8, ParserError> {
        self.inner.get_next_precedence_default(parser)
    }

    fn parse_column_option(
        &self,
        parser: &mut Parser,
    ) -> Result<Option<Result<Option<ColumnOption>, ParserError>>, ParserError> {
        self.inner.parse_column_option(parser)
    }

    fn peek_nested_delimited_identifier_quotes(
        &self,
        chars: Peekable<Chars<'_>>,
    ) -> Option<(char, Option<char>)> {
        self.inner.peek_nested_delimited_identifier_quotes(chars)
    }

    fn identifier_quote_style(&self, identifier: &str) -> Option<char> {
        self.inner.identifier_quote_style(identifier)
    }

    fn prec_value(&self, prec: Precedence) -> u8 {
        self.inner.prec_value(prec)
    }

    fn prec_unknown(&self) -> u8 {
        self.inner.prec_unknown()
    }

    fn get_reserved_keywords_for_select_item_operator(&self) -> &[Keyword] {
        self.inner.get_reserved_keywords_for_select_item_operator()
    }

    fn get_reserved_grantees_types(&self) -> &[GranteesType] {
        self.inner.get_reserved_grantees_types()
    }

    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        self.inner.is_delimited_identifier_start(ch)
    }

    fn is_nested_delimited_identifier_start(&self, ch: char) -> bool {
        self.inner.is_nested_delimited_identifier_start(ch)
    }

    fn is_identifier_start(&self, ch: char) -> bool {
        self.inner.is_identifier_start(ch)
    }

    fn is_identifier_part(&self, ch: char) -> bool {
        self.inner.is_identifier_part(ch)
    }

    fn is_custom_operator_part(&self, ch: char) -> bool {
        self.inner.is_custom_operator_part(ch)
    }

    fn is_reserved_for_identifier(&self, kw: Keyword) -> bool {
        self.inner.is_reserved_for_identifier(kw)
    }

    fn is_column_alias(&self, kw: &Keyword, parser: &mut Parser) -> bool {
        self.inner.is_column_alias(kw, parser)
    }

    fn is_select_item_alias(&self, explicit: bool, kw: &Keyword, parser: &mut Parser) -> bool {
        self.inner.is_select_item_alias(explicit, kw, parser)
    }

    fn is_table_factor(&self, kw: &Keyword, parser: &mut Parser) -> bool {
        self.inner.is_table_factor(kw, parser)
    }

    fn is_table_alias(&self, kw: &Keyword, parser: &mut Parser) -> bool {
        self.inner.is_table_alias(kw, parser)
    }

    fn is_table_factor_alias(&self, explicit: bool, kw: &Keyword, parser: &mut Parser) -> bool {
        self.inner.is_table_factor_alias(explicit, kw, parser)
    }

    fn is_identifier_generating_function_name(
        &self,
        ident: &Ident,
        name_parts: &[ObjectNamePart],
    ) -> bool {
        self.inner
            .is_identifier_generating_function_name(ident, name_parts)
    }

    delegate_settings! {
        supports_string_literal_backslash_escape, ignores_wildcard_escapes,
        supports_unicode_string_literal, supports_filter_during_aggregation,
        supports_window_clause_named_window_reference, supports_within_after_array_aggregation,
        supports_partition_by_after_order_by, supports_array_join_syntax,
        supports_group_by_expr, supports_group_by_with_modifier,
        supports_left_associative_joins_without_parens, supports_outer_join_operator,
        supports_cross_join_constraint, supports_connect_by, supports_execute_immediate,
        supports_match_recognize, supports_in_empty_list, supports_start_transaction_modifier,
        supports_end_transaction_modifier, supports_named_fn_args_with_eq_operator,
        supports_named_fn_args_with_colon_operator,
        supports_named_fn_args_with_assignment_operator,
        supports_named_fn_args_with_rarrow_operator, supports_named_fn_args_with_expr_name,
        supports_numeric_prefix, supports_numeric_literal_underscores,
        supports_window_function_null_treatment_arg, supports_dictionary_syntax,
        support_map_literal_syntax, supports_lambda_functions,
        supports_parenthesized_set_variables, supports_comma_separated_set_assignments,
        supports_update_order_by, supports_select_wildcard_except, convert_type_before_value,
        supports_triple_quoted_string, supports_trailing_commas, supports_limit_comma,
        supports_string_literal_concatenation,
        supports_string_literal_concatenation_with_newline, supports_projection_trailing_commas,
        supports_from_trailing_commas, supports_column_definition_trailing_commas,
        supports_object_name_double_dot_notation, supports_struct_literal,
        supports_empty_projections, supports_select_expr_star, supports_from_first_select,
        supports_from_first_insert, supports_pipe_operator, supports_user_host_grantee,
        supports_match_against, supports_select_wildcard_exclude, supports_select_exclude,
        supports_create_table_multi_schema_info_sources, supports_select_modifiers,
        describe_requires_table_keyword, allow_extract_custom, allow_extract_single_quotes,
        supports_extract_comma_syntax, supports_subquery_as_function_arg,
        supports_create_view_comment_syntax, supports_array_typedef_without_element_type,
        supports_parens_around_table_factor, supports_values_as_table_factor,
        supports_dollar_placeholder, supports_dollar_as_money_prefix,
        supports_create_index_with_clause, require_interval_qualifier,
        supports_explain_with_utility_options, supports_asc_desc_in_column_definition,
        supports_factorial_operator, supports_bitwise_shift_operators, supports_nested_comments,
        supports_multiline_comment_hints, supports_eq_alias_assignment, supports_try_convert,
        supports_bang_not_operator, supports_listen_notify, supports_load_data,
        supports_load_extension, supports_top_before_distinct, supports_boolean_literals,
        supports_show_like_before_in, supports_comment_on, supports_create_table_select,
        supports_partiql, supports_constraint_keyword_without_name, supports_key_column_option,
        supports_table_sample_before_alias, supports_insert_set, supports_insert_table_function,
        supports_insert_table_query, supports_insert_format, supports_insert_table_alias,
        supports_set_stmt_without_operator, supports_table_versioning,
        supports_string_escape_constant, supports_table_hints,
        requires_single_line_comment_whitespace, supports_array_typedef_with_brackets,
        supports_geometric_types, supports_order_by_all, supports_set_names,
        supports_space_separated_column_options, supports_alter_column_type_using,
        supports_comma_separated_drop_column_list, supports_notnull_operator,
        supports_data_type_signed_suffix, supports_interval_options,
        supports_create_table_like_parenthesized, supports_semantic_view_table_factor,
        supports_quote_delimited_string, supports_comment_optimizer_hint,
        supports_double_ampersand_operator, supports_binary_kw_as_cast,
        supports_select_wildcard_replace, supports_select_wildcard_ilike,
        supports_select_wildcard_rename, supports_select_wildcard_with_alias,
        supports_optimize_table, supports_install, supports_detach, supports_prewhere,
        supports_with_fill, supports_limit_by, supports_interpolate, supports_settings,
        supports_select_format, supports_comma_separated_trim, supports_cte_without_as,
        supports_select_item_multi_column_alias, supports_xml_expressions,
        supports_create_table_using, supports_long_type_as_bigint,
        supports_map_literal_with_angle_brackets,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::GenericDialect;

    use super::*;

    /// Parses `sql` with `dialect`.
    fn parse(dialect: &dyn Dialect, sql: &str) -> Result<Vec<Statement>, ParserError> {
        Parser::new(dialect)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements())
    }

    /// The SQL of the test suites and docs (the broker fuzz target's seeds,
    /// written by fuzz/make_seeds.py): ordinary queries and hostile ones.
    fn corpus() -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/broker_sql");
        let mut corpus: Vec<String> = std::fs::read_dir(dir)
            .expect("fuzz/seeds/broker_sql")
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .filter_map(|bytes| String::from_utf8(bytes).ok())
            .collect();
        corpus.sort();
        assert!(corpus.len() > 300, "the seed corpus is missing");
        corpus
    }

    /// `KEYWORD (` nested `levels` deep, closed or not.
    fn nested(prefix: &str, levels: usize, closed: bool) -> String {
        let tail = if closed {
            ")".repeat(levels)
        } else {
            String::new()
        };
        format!("SELECT {}1{tail} AS x", format!("{prefix}(").repeat(levels))
    }

    #[test]
    fn keeps_the_inner_dialects_identity() {
        let bounded = BoundedDialect::new(Box::new(GenericDialect {}), "SELECT 1");
        let as_dialect: &dyn Dialect = &bounded;
        assert!(as_dialect.is::<GenericDialect>());
    }

    /// Every query of the suites parses to the same tree (or the same
    /// error) as with the inner dialect alone, within a fraction of its
    /// budget: the wrapper changes nothing an ordinary query can see.
    #[test]
    fn parses_the_suites_queries_exactly_as_the_inner_dialect() {
        let generic = GenericDialect {};
        let (mut most_per_byte, mut most_steps): (f64, u64) = (0.0, 0);
        for sql in corpus() {
            let bounded = BoundedDialect::new(Box::new(GenericDialect {}), &sql);
            let plain = format!("{:?}", parse(&generic, &sql));
            let wrapped = format!("{:?}", parse(&bounded, &sql));
            assert!(!bounded.exhausted(), "ran out of steps: {sql:.200}");
            assert_eq!(plain, wrapped, "parsed differently: {sql:.200}");
            most_steps = most_steps.max(bounded.steps());
            most_per_byte = most_per_byte.max(bounded.steps() as f64 / sql.len() as f64);
        }
        eprintln!(
            "the suites' queries took at most {most_steps} steps, {most_per_byte:.2} per byte"
        );
        // Both allowances keep a margin of 4 over the suites.
        assert!(
            most_per_byte * 4.0 <= STEPS_PER_BYTE as f64,
            "an ordinary query took {most_per_byte:.2} steps per byte"
        );
        assert!(
            most_steps * 4 <= BASE_STEPS,
            "an ordinary query took {most_steps} steps"
        );
    }

    /// Constructs that make the parser read the same tokens more than once
    /// per nesting level, nested far past where the work would take minutes:
    /// each parse ends within about its budget, with the budget's message.
    #[test]
    fn backtracking_stops_at_the_budget_whatever_the_construct() {
        let prefixes = [
            "NOT ",
            "CAST",
            "TRY_CAST",
            "CASE ",
            "CEIL",
            "FLOOR",
            "POSITION",
            "SUBSTRING",
            "SUBSTR",
            "OVERLAY",
            "CONVERT",
            "CURRENT_DATE",
            "CURRENT_TIMESTAMP",
            "LOCALTIME",
            "NOT IN",
            "NOT LIKE",
            "a AND NOT ",
            "OVERFLOW(1, ",
            "- NOT ",
        ];
        let mut cases = Vec::new();
        for prefix in prefixes {
            for closed in [false, true] {
                cases.push(nested(prefix, 48, closed));
            }
        }
        // A mix of all of them, the fuzzer's way.
        let mixed: String = (0..60)
            .map(|i| format!("{}(", prefixes[i * 7 % prefixes.len()]))
            .collect();
        cases.push(format!("SELECT {mixed}1"));
        // The input the fuzzer found (a 39-second timeout at 285 bytes).
        let found = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/regressions/sql_policy/timeout-98165e7869a9059df84fbb676de8bdb63096c9bd"
        ))
        .unwrap();
        cases.push(String::from_utf8_lossy(&found[1..]).into_owned());
        for sql in cases {
            let bounded = BoundedDialect::new(Box::new(GenericDialect {}), &sql);
            let result = parse(&bounded, &sql);
            // Past the budget, every path fails at its first step: the
            // unwinding costs at most one step per pending alternative.
            assert!(
                bounded.steps() <= bounded.budget() + 4 * sql.len() as u64,
                "{sql:.80}: {} steps for a budget of {}",
                bounded.steps(),
                bounded.budget()
            );
            eprintln!(
                "{:>7} steps, budget {:>6}: {sql:.60}",
                bounded.steps(),
                bounded.budget()
            );
            if bounded.exhausted() {
                assert!(result.is_err(), "{sql:.80}: parsed although out of steps");
            }
        }
    }

    /// What makes each step cost more as the input grows (found by a
    /// review; minutes to hours of CPU within the step budget): the parse
    /// stops at its time limit, whatever the construct.
    #[test]
    fn costly_steps_stop_at_the_time_limit() {
        let limit = Duration::from_millis(50);
        let not_20 = "NOT (".repeat(20);
        let cases = [
            // Whitespace skipped one character at a time before each token.
            format!("SELECT {not_20}{}1", " ".repeat(128 << 10)),
            // A dotted name walked whole before each expression.
            format!("SELECT {not_20}{}", vec!["a"; 32 << 10].join(".")),
            // A long literal copied at every visit.
            format!("SELECT {not_20}'{}'", "x".repeat(128 << 10)),
        ];
        for sql in cases {
            let bounded =
                BoundedDialect::new(Box::new(GenericDialect {}), &sql).with_time_limit(limit);
            let started = Instant::now();
            let result = parse(&bounded, &sql);
            let took = started.elapsed();
            assert!(result.is_err(), "{sql:.60}: parsed");
            assert!(
                bounded.exhausted(),
                "{sql:.60}: failed otherwise: {result:?}"
            );
            assert!(
                bounded.exhausted_message().contains("after 0.1 s"),
                "{sql:.60}: {}",
                bounded.exhausted_message()
            );
            eprintln!("{took:?} ({} steps): {sql:.40}", bounded.steps());
        }
    }

    /// Types nested past the limit never reach the parser (20,000 levels
    /// overflowed a thread's stack); comparisons are not brackets.
    #[test]
    fn deeply_nested_brackets_are_refused_before_parsing() {
        let generic = GenericDialect {};
        for sql in [
            format!("SELECT CAST(1 AS {}", "ARRAY<".repeat(20_000)),
            format!("SELECT {}1", "ARRAY<".repeat(129)),
            format!("SELECT {}", "NULLABLE(".repeat(10_000)),
            format!("SELECT CAST(1 AS {}", "TABLE(a ".repeat(30_000)),
            format!("SELECT {}1{}", "[".repeat(200), "]".repeat(200)),
            format!(
                "SELECT CAST(x AS {}INT{})",
                "STRUCT<a ".repeat(200),
                ">".repeat(200)
            ),
        ] {
            let refusal = bracket_refusal(&generic, &sql).unwrap_or_else(|| panic!("{sql:.60}"));
            assert!(refusal.contains("the limit is 128"), "{refusal}");
        }
        for sql in [
            format!(
                "SELECT 1 FROM t WHERE {}",
                vec!["a < 1"; 2_000].join(" AND ")
            ),
            format!(
                "SELECT CAST(x AS {}INT{})",
                "ARRAY<".repeat(100),
                ">".repeat(100)
            ),
            format!(
                "SELECT CAST(x AS {}INT{})",
                "ARRAY<".repeat(100),
                ">>".repeat(50)
            ),
            format!("SELECT {}1{}", "(".repeat(120), ")".repeat(120)),
            "SELECT a << 1, b >> 1, ARRAY[1, 2][1] FROM t".to_string(),
        ] {
            assert_eq!(bracket_refusal(&generic, &sql), None, "{sql:.60}");
        }
    }

    /// Nesting that does not backtrack is not refused for its depth here:
    /// 40 plain parentheses and 40 nested ordinary calls fit the budget (the
    /// recursion limit and the statement limits bound them elsewhere).
    #[test]
    fn plain_nesting_fits_the_budget() {
        for sql in [
            format!("SELECT {}1{} AS x", "(".repeat(20), ")".repeat(20)),
            nested("abs", 20, true),
            format!("SELECT {} AS x", vec!["CAST(a AS INT)"; 500].join(" + ")),
            format!("SELECT {} AS x", vec!["NOT (a = 1)"; 500].join(" AND ")),
        ] {
            let bounded = BoundedDialect::new(Box::new(GenericDialect {}), &sql);
            assert!(parse(&bounded, &sql).is_ok(), "{sql:.80}");
            assert!(!bounded.exhausted());
        }
    }
}
