//! The guarded wrapper around DataFusion's scalar functions, the guarded
//! `||` operator, and the session's function list.

use std::ops::Range;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array};
use datafusion::arrow::compute::concat;
use datafusion::arrow::compute::kernels::concat_elements::concat_elements_dyn;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{ExprSchema, Result, ScalarValue, exec_err};
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::preimage::PreimageResult;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExpressionPlacement, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, StructFieldMapping, Volatility,
};

use datafusion::execution::memory_pool::MemoryReservation;

use super::sizes::{self, Bytes, Ints};
use super::{
    CHUNK_WORK, GuardError, HEAVY_BYTES, MAX_CALL_BYTES, MAX_VALUE_BYTES, MAX_VALUE_WORK,
    QueryGuard, blocking, guard_of,
};

/// Removed from the session: they disclose the server instead of the data
/// (`input_file_name()` returns the server-side path of the file a row
/// came from, `file_row_index()` the row's position in it, `version()` the
/// engine version), and a function over constants passes the policy's
/// function allow-list.
pub const REMOVED_FUNCTIONS: [&str; 3] = ["input_file_name", "file_row_index", "version"];

/// How a function's output and work are bounded before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    /// `repeat(s, n)`: |s|·n.
    Repeat,
    /// `lpad`/`rpad(s, n[, fill])`: n characters, up to 4·n bytes.
    Pad,
    /// `replace(s, from, to)`: |s| + matches·(|to| − |from|).
    Replace,
    /// `regexp_replace(s, pattern, replacement[, flags])`.
    RegexpReplace,
    /// `concat(…)`: the sum of its arguments.
    Concat,
    /// `concat_ws(sep, …)`: the sum of its arguments and separators.
    ConcatWs,
    /// `overlay(s placing t from p [for n])`: up to 2·|s| + |t|.
    Overlay,
    /// `a || b` (see [`StringConcat`]).
    StringConcat,
    /// `levenshtein(a, b)`: |a|·|b| steps.
    Levenshtein,
    /// `btrim`/`ltrim`/`rtrim(s, set)`: |s|·|set| steps.
    Trim,
    /// Output at most this many times the bytes of its arguments (case
    /// mapping, `translate`, `encode`, `to_char`'s format).
    Scaled(u8),
    /// Bounded by its arguments: only copying constant arguments to every
    /// row is estimated before the call; the result is measured after.
    Plain,
}

/// The guard for the built-in scalar function `name`, or `None` for a
/// function left as it is: struct accessors, which DataFusion recognises by
/// type and which build nothing, and cast functions, which simplification
/// replaces by a CAST before anything runs.
pub(super) fn kind_of(name: &str) -> Option<Kind> {
    Some(match name {
        "repeat" => Kind::Repeat,
        "lpad" | "rpad" => Kind::Pad,
        "replace" => Kind::Replace,
        "regexp_replace" => Kind::RegexpReplace,
        "concat" => Kind::Concat,
        "concat_ws" => Kind::ConcatWs,
        "overlay" => Kind::Overlay,
        "levenshtein" => Kind::Levenshtein,
        "btrim" | "ltrim" | "rtrim" => Kind::Trim,
        // Unicode special casing maps one character to up to three.
        "upper" | "lower" | "initcap" => Kind::Scaled(3),
        // An ASCII character to a 4-byte one.
        "translate" => Kind::Scaled(4),
        // hex: 2×; base64: 4/3×.
        "encode" => Kind::Scaled(2),
        // One format byte (`%+`) yields up to 32 characters.
        "to_char" => Kind::Scaled(20),
        "get_field" | "named_struct" | "struct" | "arrow_cast" | "arrow_try_cast"
        | "cast_to_type" | "try_cast_to_type" => return None,
        // `log(power(…))` is simplified by recognising each other's type.
        "power" | "log" => return None,
        name if REMOVED_FUNCTIONS.contains(&name) => return None,
        _ => Kind::Plain,
    })
}

/// The scalar functions the connector's session offers: DataFusion's, with
/// every one that [`kind_of`] names wrapped in its guard and the
/// [`REMOVED_FUNCTIONS`] left out.
pub fn session_functions(defaults: Vec<Arc<ScalarUDF>>) -> Vec<Arc<ScalarUDF>> {
    defaults
        .into_iter()
        .filter(|f| !REMOVED_FUNCTIONS.contains(&f.name()))
        .map(|f| guarded(&f).unwrap_or(f))
        .collect()
}

/// `function` wrapped in its guard; `None` if it needs none or already has
/// one.
pub(super) fn guarded(function: &Arc<ScalarUDF>) -> Option<Arc<ScalarUDF>> {
    if is_guarded(function) {
        return None;
    }
    let kind = kind_of(function.name())?;
    Some(Arc::new(ScalarUDF::new_from_impl(Guarded {
        inner: function.as_ref().clone(),
        kind,
    })))
}

pub(super) fn is_guarded(function: &ScalarUDF) -> bool {
    function.inner().downcast_ref::<Guarded>().is_some()
}

/// Whether `function` is a guarded call that builds values larger than its
/// arguments (and so takes a share of the query's memory).
pub(super) fn builds(function: &ScalarUDF) -> bool {
    function
        .inner()
        .downcast_ref::<Guarded>()
        .is_some_and(|g| g.kind.builds())
}

impl Kind {
    /// Whether the function's results can outgrow its arguments by more
    /// than a small constant factor, or grow again when it is applied to
    /// its own result (`encode`: 2× each time). The others (case mapping,
    /// `translate`, trims, `substr`…) stay within a small factor of data
    /// that is already in memory, however they are nested.
    fn builds(self) -> bool {
        matches!(
            self,
            Kind::Repeat
                | Kind::Pad
                | Kind::Replace
                | Kind::RegexpReplace
                | Kind::Concat
                | Kind::ConcatWs
                | Kind::Overlay
                | Kind::StringConcat
                | Kind::Scaled(2)
        )
    }
}

/// The guarded `||`, which [`super::GuardCalls`] puts in place of the
/// operator.
pub(super) fn string_concat() -> Arc<ScalarUDF> {
    Arc::new(ScalarUDF::new_from_impl(Guarded {
        inner: ScalarUDF::new_from_impl(StringConcat::new()),
        kind: Kind::StringConcat,
    }))
}

/// A built-in scalar function behind its guard. Everything but the call
/// itself is the built-in's: name, aliases, signature, return field,
/// coercion, simplification (re-guarded), ordering, documentation.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Guarded {
    inner: ScalarUDF,
    kind: Kind,
}

/// What a call may build and do, estimated before it runs.
#[derive(Debug, Default)]
struct Estimate {
    /// Largest value, in bytes.
    value: u128,
    /// Bytes allocated in all: results plus constants copied to every row.
    total: u128,
    /// Steps of super-linear work for the largest value.
    value_work: u128,
    /// Bytes and steps per row (empty for a call on constants, and for a
    /// bound the same for every row: plain and scaled calls do no
    /// super-linear work, so their `value_work` is 0).
    row_value: Vec<u128>,
    row_work: Vec<u128>,
    /// A bound that may be far above the truth: the call then runs in
    /// chunks, measuring what each really built.
    loose: bool,
}

impl Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The function as the query wrote it, for messages.
    fn label(&self) -> String {
        match self.kind {
            Kind::StringConcat => "the || operator".to_string(),
            _ => self.name().to_string(),
        }
    }

    /// What the call may build and do. `matches`: for `regexp_replace`, how
    /// many times the pattern matches in each row, if known.
    fn estimate(&self, args: &ScalarFunctionArgs, matches: Option<&Ints>) -> Estimate {
        let rows = args.number_rows;
        let owned: Vec<Bytes<'_>> = args.args.iter().map(Bytes::of).collect();
        let bytes = &owned;
        let constant = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        // Constants copied to every row by kernels that work on arrays.
        let copies: u128 = if rows > 1 {
            bytes
                .iter()
                .filter(|b| b.is_constant())
                .map(|b| b.buffer_bytes(rows))
                .sum()
        } else {
            0
        };
        let arg = |i: usize| bytes.get(i);
        let len = |i: usize, row: usize| arg(i).map_or(0, |b| b.len_at(row)) as u128;
        let null = |i: usize, row: usize| arg(i).is_none_or(|b| b.is_null_at(row));
        let per_row: Box<dyn Fn(usize) -> (u128, u128) + '_> = match self.kind {
            Kind::Repeat => {
                let count = args.args.get(1).map_or(Ints::Other, Ints::of);
                Box::new(move |row| {
                    let n = count.at(row).unwrap_or(0).max(0) as u128;
                    (len(0, row).saturating_mul(n), 0)
                })
            }
            Kind::Pad => {
                let target = args.args.get(1).map_or(Ints::Other, Ints::of);
                Box::new(move |row| {
                    if null(0, row) {
                        return (0, 0);
                    }
                    let n = target.at(row).unwrap_or(0).max(0) as u128;
                    let ascii =
                        |i: usize| arg(i).and_then(|b| b.at(row)).is_none_or(<[u8]>::is_ascii);
                    let width = if ascii(0) && ascii(2) { 1 } else { 4 };
                    (n * width, 0)
                })
            }
            Kind::Replace => Box::new(move |row| {
                let (Some(s), Some(from), Some(to)) = (
                    arg(0).and_then(|b| b.at(row)),
                    arg(1).and_then(|b| b.at(row)),
                    arg(2).and_then(|b| b.at(row)),
                ) else {
                    return (0, 0);
                };
                if from.is_empty() || to.len() <= from.len() {
                    return (s.len() as u128, 0);
                }
                let matches = count_matches(s, from) as u128;
                (
                    s.len() as u128 + matches * (to.len() - from.len()) as u128,
                    0,
                )
            }),
            Kind::RegexpReplace => {
                // Each `$n`/`\n` copies (part of) a match, and matches do
                // not overlap: together at most |s| per reference.
                let references = |replacement: &[u8]| {
                    replacement
                        .iter()
                        .filter(|&&c| c == b'$' || c == b'\\')
                        .count() as u128
                };
                // Counted once for a constant replacement.
                let constant_references = match arg(2) {
                    Some(Bytes::Constant(r)) => Some(references(r.unwrap_or_default())),
                    _ => None,
                };
                Box::new(move |row| {
                    if null(0, row) {
                        return (0, 0);
                    }
                    let s = len(0, row);
                    let replacement = arg(2).and_then(|b| b.at(row)).unwrap_or_default();
                    let references = constant_references.unwrap_or_else(|| references(replacement));
                    let global = arg(3)
                        .and_then(|b| b.at(row))
                        .is_some_and(|flags| flags.contains(&b'g'));
                    let found = matches.and_then(|m| m.at(row)).map(|n| n.max(0) as u128);
                    let matches = match (global, found) {
                        (true, Some(n)) => n,
                        (false, Some(n)) => n.min(1),
                        // An empty match can occur between any two characters.
                        (true, None) => s + 1,
                        (false, None) => 1,
                    };
                    (
                        s.saturating_mul(1 + references)
                            .saturating_add(matches.saturating_mul(replacement.len() as u128)),
                        0,
                    )
                })
            }
            Kind::Concat => Box::new(move |row| ((0..bytes.len()).map(|i| len(i, row)).sum(), 0)),
            Kind::ConcatWs => Box::new(move |row| {
                if null(0, row) {
                    return (0, 0);
                }
                let parts = bytes.len().saturating_sub(1) as u128;
                let separators = len(0, row) * parts.saturating_sub(1);
                (
                    separators + (1..bytes.len()).map(|i| len(i, row)).sum::<u128>(),
                    0,
                )
            }),
            Kind::Overlay => Box::new(move |row| (2 * len(0, row) + len(1, row), 0)),
            Kind::StringConcat => Box::new(move |row| {
                if null(0, row) || null(1, row) {
                    return (0, 0);
                }
                (len(0, row) + len(1, row), 0)
            }),
            Kind::Levenshtein => Box::new(move |row| (0, len(0, row).saturating_mul(len(1, row)))),
            Kind::Trim if bytes.len() >= 2 => {
                Box::new(move |row| (len(0, row), len(0, row).saturating_mul(len(1, row))))
            }
            Kind::Trim => Box::new(move |row| (len(0, row), 0)),
            Kind::Scaled(factor) => {
                // Only the constant arguments are estimated: a result
                // scaled from the data is measured after the call (it is
                // within a small factor of data already in memory).
                let constants: u128 = bytes
                    .iter()
                    .filter(|b| b.is_constant())
                    .map(|b| b.len_at(0) as u128)
                    .sum();
                Box::new(move |_| (constants * factor as u128, 0))
            }
            Kind::Plain => Box::new(|_| (0, 0)),
        };
        let mut estimate = Estimate {
            loose: matches!(self.kind, Kind::RegexpReplace | Kind::Pad | Kind::Overlay),
            ..Estimate::default()
        };
        // A plain or scaled call's bound is the same for every row (it
        // reads only constant arguments): one value stands for all rows, so
        // the common functions cost no per-row work here (this loop was 5%
        // of a 10M-row DP query).
        let uniform = matches!(self.kind, Kind::Plain | Kind::Scaled(_));
        if constant || uniform {
            // One value, which whatever consumes it copies to every row
            // (or, for a uniform bound, each row's).
            let (value, work) = per_row(0);
            estimate.value = value;
            let copies_of_value = if constant { rows.max(1) } else { rows };
            estimate.total = value.saturating_mul(copies_of_value as u128);
            estimate.value_work = work;
        } else {
            estimate.row_value = Vec::with_capacity(rows);
            estimate.row_work = Vec::with_capacity(rows);
            for row in 0..rows {
                let (value, work) = per_row(row);
                estimate.value = estimate.value.max(value);
                estimate.total = estimate.total.saturating_add(value);
                estimate.value_work = estimate.value_work.max(work);
                estimate.row_value.push(value);
                estimate.row_work.push(work);
            }
        }
        if self.kind == Kind::StringConcat && !constant {
            // The kernel reserves both sides' whole value buffers.
            let buffers = bytes.iter().map(|b| b.buffer_bytes(rows)).sum::<u128>();
            estimate.total = estimate.total.max(buffers);
        }
        estimate.total = estimate.total.saturating_add(copies);
        estimate
    }

    /// The checks before a call; returns the memory reservation to hold
    /// while it runs.
    fn admit(
        &self,
        guard: Option<&Arc<QueryGuard>>,
        estimate: &Estimate,
        constant: bool,
        rows: usize,
    ) -> Result<Option<MemoryReservation>> {
        let function = || self.label();
        if estimate.value > MAX_VALUE_BYTES as u128 {
            return Err(GuardError::ValueTooLarge {
                function: function(),
                size: constant.then_some(estimate.value),
            }
            .into());
        }
        if estimate.value_work > MAX_VALUE_WORK {
            return Err(GuardError::TooMuchWork {
                function: function(),
                steps: constant.then_some(estimate.value_work),
            }
            .into());
        }
        let limit = guard.map_or(MAX_CALL_BYTES, |g| g.call_limit());
        // A loose bound is enforced chunk by chunk on what is really built.
        if (constant || !estimate.loose) && estimate.total > limit as u128 {
            return Err(GuardError::CallTooLarge {
                function: function(),
                size: constant.then_some(estimate.total),
                rows,
                limit,
            }
            .into());
        }
        let Some(guard) = guard else {
            return Ok(None);
        };
        if constant && !guard.constants_fit(estimate.value) {
            return Err(GuardError::ConstantBudget {
                function: function(),
            }
            .into());
        }
        // A loose bound past the limit is not reserved: the call runs in
        // chunks and reserves what they really build.
        let chunked = estimate.loose && !constant && estimate.total > limit as u128;
        let reserve = if chunked { 0 } else { estimate.total };
        Ok(guard.reserve(&self.label(), reserve)?)
    }

    /// The checks after a call, on what it really built.
    fn settle(
        &self,
        guard: Option<&Arc<QueryGuard>>,
        result: &ColumnarValue,
        constant: bool,
        rows: usize,
    ) -> Result<()> {
        let Some((largest, total)) = sizes::measure(result) else {
            return Ok(());
        };
        let function = || self.label();
        if largest > MAX_VALUE_BYTES as u128 {
            return Err(GuardError::ValueTooLarge {
                function: function(),
                size: constant.then_some(largest),
            }
            .into());
        }
        let limit = guard.map_or(MAX_CALL_BYTES, |g| g.call_limit());
        if !constant && self.kind.builds() && total > limit as u128 {
            return Err(GuardError::CallTooLarge {
                function: function(),
                size: None,
                rows,
                limit,
            }
            .into());
        }
        if constant && let Some(guard) = guard {
            guard.charge_constant(&self.label(), largest)?;
        }
        Ok(())
    }

    /// Calls the built-in over `rows`, in chunks that each do at most
    /// [`CHUNK_WORK`] steps or build at most `chunk_bytes`, checking the
    /// deadline and what was built between chunks.
    fn call_in_chunks(
        &self,
        guard: Option<&Arc<QueryGuard>>,
        args: &ScalarFunctionArgs,
        chunks: Vec<Range<usize>>,
        limit: usize,
        reservation: Option<&MemoryReservation>,
    ) -> Result<ColumnarValue> {
        let mut parts: Vec<ArrayRef> = Vec::with_capacity(chunks.len());
        let mut built = 0u128;
        for chunk in chunks {
            if let Some(guard) = guard {
                guard.check_deadline()?;
            }
            let part = self.inner.invoke_with_args(ScalarFunctionArgs {
                args: args
                    .args
                    .iter()
                    .map(|a| sizes::slice(a, chunk.start, chunk.len()))
                    .collect(),
                arg_fields: args.arg_fields.clone(),
                number_rows: chunk.len(),
                return_field: args.return_field.clone(),
                config_options: args.config_options.clone(),
            })?;
            if self.kind.builds()
                && let Some((_, total)) = sizes::measure(&part)
            {
                built += total;
                if built > limit as u128 {
                    return Err(GuardError::CallTooLarge {
                        function: self.label(),
                        size: None,
                        rows: args.number_rows,
                        limit,
                    }
                    .into());
                }
                if let (Some(reservation), Some(guard)) = (reservation, guard) {
                    reservation
                        .try_grow(usize::try_from(total).unwrap_or(usize::MAX))
                        .map_err(|_| GuardError::Memory {
                            function: self.label(),
                            limit: guard.memory_limit,
                        })?;
                }
            }
            parts.push(sizes::to_array(part, chunk.len())?);
        }
        let parts: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        Ok(ColumnarValue::Array(concat(&parts)?))
    }

    /// `lpad`/`rpad` reserve Σ length bytes for a batch, and a negative
    /// length read from a column wraps to a huge reservation (a panic). A
    /// negative length pads to the empty string, as 0 does, so negative
    /// lengths are passed as 0.
    fn without_negative_lengths(&self, mut args: ScalarFunctionArgs) -> ScalarFunctionArgs {
        if self.kind != Kind::Pad {
            return args;
        }
        if let Some(ColumnarValue::Array(lengths)) = args.args.get(1)
            && let Some(lengths) = lengths.as_any().downcast_ref::<Int64Array>()
            && Ints::Array(Arc::new(lengths.clone())).any_negative()
        {
            let clamped: Int64Array = lengths.iter().map(|v| v.map(|v| v.max(0))).collect();
            args.args[1] = ColumnarValue::Array(Arc::new(clamped));
        }
        args
    }
}

/// How many times `regexp_replace`'s pattern matches in the rows listed in
/// `rows` (non-overlapping, as the replacement finds them), counted with
/// DataFusion's own `regexp_count`; NULL for the other rows. `None` if
/// that cannot be done: the replacement then fails on the same pattern, or
/// the loose bound applies.
fn regexp_matches(args: &ScalarFunctionArgs, rows: &[usize], constant: bool) -> Option<Ints> {
    use datafusion::arrow::array::{StringArray, UInt32Array};
    use datafusion::arrow::compute::{cast, take};
    use datafusion::functions::regex::regexpcount::regexp_count_func;
    let [values, pattern, rest @ ..] = args.args.as_slice() else {
        return None;
    };
    // A call on constants has one value (row 0); otherwise every argument
    // is taken as `number_rows` rows.
    let length = if constant { 1 } else { args.number_rows };
    let indices = UInt32Array::from_iter_values(rows.iter().map(|&r| r as u32));
    // The listed rows of an argument, as `text` (regexp_count wants one
    // string type for all its arguments).
    let picked = |v: &ColumnarValue, text: &DataType| -> Option<ArrayRef> {
        let all = v.to_array(length).ok()?;
        cast(&take(&all, &indices, None).ok()?, text).ok()
    };
    let text = values.data_type();
    if !matches!(
        text,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return None;
    }
    let mut call = vec![picked(values, &text)?, picked(pattern, &text)?];
    // regexp_count takes the flags but the global one ('g').
    if let Some(flags) = rest.get(1) {
        let flags = picked(flags, &DataType::Utf8)?;
        let flags: StringArray = flags
            .as_any()
            .downcast_ref::<StringArray>()?
            .iter()
            .map(|f| f.map(|f| f.replace('g', "")))
            .collect();
        if flags.iter().flatten().any(|f| !f.is_empty()) {
            call.push(Arc::new(Int64Array::from(vec![1; rows.len()])));
            call.push(cast(&flags, &text).ok()?);
        }
    }
    let counts = regexp_count_func(&call).ok()?;
    let counts = counts.as_any().downcast_ref::<Int64Array>()?;
    if constant {
        return Some(Ints::Constant(
            (!counts.is_null(0)).then(|| counts.value(0)),
        ));
    }
    let mut all = vec![None; length];
    for (i, &row) in rows.iter().enumerate() {
        all[row] = (!counts.is_null(i)).then(|| counts.value(i));
    }
    Some(Ints::Array(Arc::new(Int64Array::from(all))))
}

/// Non-overlapping occurrences of `needle` in `haystack` (as `replace`
/// finds them).
fn count_matches(haystack: &[u8], needle: &[u8]) -> usize {
    match (std::str::from_utf8(haystack), std::str::from_utf8(needle)) {
        (Ok(h), Ok(n)) => h.matches(n).count(),
        // Not text: at most one match per needle length.
        _ => haystack.len() / needle.len().max(1),
    }
}

/// Splits `0..weights.len()` into runs whose weights add up to at most
/// `budget` (a row heavier than the budget gets a run of its own).
fn chunks(weights: impl Iterator<Item = u128>, budget: u128) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut sum = 0u128;
    let mut end = 0;
    for (i, w) in weights.enumerate() {
        if i > start && sum.saturating_add(w) > budget {
            runs.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(w);
        end = i + 1;
    }
    if end > start {
        runs.push(start..end);
    }
    runs
}

#[warn(clippy::missing_trait_methods)] // it delegates, so it must implement every method
impl ScalarUDFImpl for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[expect(deprecated)]
        self.inner.inner().display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        // Re-wrapped: returning the built-in would drop the guard.
        let updated = self.inner.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Guarded {
            inner: updated,
            kind: self.kind,
        }))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        #[expect(deprecated)]
        self.inner.inner().is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let guard = guard_of(&args.config_options).cloned();
        let guard = guard.as_ref();
        if let Some(guard) = guard {
            guard.check_deadline()?;
        }
        let rows = args.number_rows;
        let constant = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let limit = guard.map_or(MAX_CALL_BYTES, |g| g.call_limit());
        let mut estimate = self.estimate(&args, None);
        if self.kind == Kind::RegexpReplace && estimate.value > MAX_VALUE_BYTES as u128 {
            // The bound without knowing the matches (an empty match at
            // every character) is far too loose for some values: count the
            // matches in those (the others are enforced on what is built).
            let over: Vec<usize> = if constant {
                vec![0]
            } else {
                (0..rows)
                    .filter(|&r| estimate.row_value[r] > MAX_VALUE_BYTES as u128)
                    .collect()
            };
            if let Some(matches) = regexp_matches(&args, &over, constant) {
                let counted_all = constant || over.len() == rows;
                estimate = self.estimate(&args, Some(&matches));
                estimate.loose = !counted_all;
            }
        }
        let reservation = self.admit(guard, &estimate, constant, rows)?;
        let args = self.without_negative_lengths(args);
        let work: u128 = estimate.row_work.iter().sum();
        let heavy = work > CHUNK_WORK || estimate.total > HEAVY_BYTES;
        let result = if constant || !heavy {
            if heavy {
                blocking(|| self.inner.invoke_with_args(args))?
            } else {
                self.inner.invoke_with_args(args)?
            }
        } else if work > CHUNK_WORK {
            let runs = chunks(estimate.row_work.iter().copied(), CHUNK_WORK);
            blocking(|| self.call_in_chunks(guard, &args, runs, limit, reservation.as_ref()))?
        } else if estimate.loose && estimate.total > limit as u128 {
            // Chunks whose bound is a fraction of the limit; what they
            // really build is added up as they run.
            let runs = chunks(
                estimate.row_value.iter().copied(),
                (limit as u128 / 4).max(1),
            );
            blocking(|| self.call_in_chunks(guard, &args, runs, limit, reservation.as_ref()))?
        } else {
            blocking(|| self.inner.invoke_with_args(args))?
        };
        self.settle(guard, &result, constant, rows)?;
        Ok(result)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        // What the built-in simplifies to may call other built-ins
        // (`concat_ws` → `concat`): those are guarded too.
        match self.inner.inner().simplify(args, info)? {
            ExprSimplifyResult::Simplified(expr) => Ok(ExprSimplifyResult::Simplified(
                super::rule::guard_expr(expr, info.schema())?.data,
            )),
            original => Ok(original),
        }
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.inner().evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.inner().propagate_constraints(interval, inputs)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.inner().output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.inner().documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

/// `a || b` as a function, with the operator's semantics: NULL if either
/// side is NULL, the same string or binary type as its (already coerced)
/// operands, the operator's output name. Arrow's kernel is the operator's
/// own; as a function it runs behind a guard, which the operator cannot.
/// It is not registered: only [`super::GuardCalls`] creates calls to it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct StringConcat {
    signature: Signature,
}

impl StringConcat {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }

    /// Operand types the function (and arrow's kernel) takes: both sides of
    /// one of these types.
    pub(super) fn supports(left: &DataType, right: &DataType) -> bool {
        left == right
            && matches!(
                left,
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Binary
                    | DataType::LargeBinary
                    | DataType::BinaryView
            )
    }
}

impl ScalarUDFImpl for StringConcat {
    fn name(&self) -> &str {
        "string_concat_operator"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        // The operator's name, so that rewriting keeps output names.
        match args {
            [left, right] => Ok(format!("{} || {}", left.schema_name(), right.schema_name())),
            _ => exec_err!("|| takes two operands"),
        }
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [left, right] if Self::supports(left, right) => Ok(left.clone()),
            _ => exec_err!("|| is not defined for {arg_types:?}"),
        }
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args
            .arg_fields
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
        Ok(Arc::new(Field::new(
            self.name(),
            self.return_type(&types)?,
            nullable,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [left, right] = args.args.as_slice() else {
            return exec_err!("|| takes two operands");
        };
        let constant = matches!(
            (left, right),
            (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_))
        );
        let rows = if constant { 1 } else { args.number_rows };
        let left = left.to_array(rows)?;
        let right = right.to_array(rows)?;
        let result = concat_elements_dyn(&left, &right)?;
        if constant {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                &result, 0,
            )?));
        }
        Ok(ColumnarValue::Array(result))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;

    use super::*;

    fn call_args(args: Vec<ColumnarValue>, rows: usize) -> ScalarFunctionArgs {
        ScalarFunctionArgs {
            arg_fields: args
                .iter()
                .map(|_| Arc::new(Field::new("a", DataType::Utf8, true)))
                .collect(),
            args,
            number_rows: rows,
            return_field: Arc::new(Field::new("r", DataType::Utf8, true)),
            config_options: Arc::new(ConfigOptions::new()),
        }
    }

    fn guarded_builtin(name: &str) -> Guarded {
        let function = datafusion::functions::all_default_functions()
            .into_iter()
            .find(|f| f.name() == name)
            .expect("a built-in");
        Guarded {
            inner: function.as_ref().clone(),
            kind: kind_of(name).expect("guarded"),
        }
    }

    /// A bound that is the same for every row is kept once, not per row,
    /// and still adds up to every row's share.
    #[test]
    fn a_uniform_bound_is_not_repeated_per_row() {
        let rows = 10_000;
        let column = ColumnarValue::Array(Arc::new(StringArray::from(vec!["ab"; rows])));
        let constant = ColumnarValue::Scalar(ScalarValue::Utf8(Some("xyz".into())));

        let plain =
            guarded_builtin("coalesce").estimate(&call_args(vec![column.clone()], rows), None);
        assert!(plain.row_value.is_empty() && plain.row_work.is_empty());
        assert_eq!((plain.value, plain.total, plain.value_work), (0, 0, 0));

        // A scaled call counts its constant arguments once for all rows:
        // `translate(column, 'xyz', 'xyz')`, 6 bytes × 4.
        let scaled = guarded_builtin("translate").estimate(
            &call_args(vec![column.clone(), constant.clone(), constant], rows),
            None,
        );
        assert!(scaled.row_value.is_empty());
        assert_eq!(scaled.value, 6 * 4);
        assert!(scaled.total >= 6 * 4 * rows as u128);

        // A bound that depends on the row is still kept per row.
        let count = ColumnarValue::Scalar(ScalarValue::Int64(Some(3)));
        let repeat =
            guarded_builtin("repeat").estimate(&call_args(vec![column, count], rows), None);
        assert_eq!(repeat.row_value.len(), rows);
        assert!(repeat.row_value.iter().all(|&v| v == 6));
        assert!(repeat.total >= 6 * rows as u128);
    }
}
