//! Guarded functions: no scalar function may build an unbounded value, run
//! unbounded super-linear work, or allocate outside the query's limits.
//!
//! DataFusion's scalar functions allocate outside the query's memory pool,
//! and several of them amplify their input without a constant factor:
//! `repeat` (|s|·n), `lpad`/`rpad` (up to 4·n bytes whatever the input),
//! `replace` (|s|·|to|), `regexp_replace` (≈|s|·|replacement|), `concat`,
//! `concat_ws`, `overlay` and `||` (the sum of their arguments, so a column
//! doubles at every level of a CTE chain), `encode` (2× per call, so
//! chains grow exponentially). A constant argument is copied to every row
//! of a batch. Some of them panic past 2 GiB per batch, and `lpad` asks the
//! allocator for rows × length bytes at once, which aborts the process.
//! `levenshtein` and the trims with a character set do O(n·m) work on one
//! value. Constant expressions are evaluated while the plan is optimised,
//! which cannot be preempted.
//!
//! So every built-in scalar function (but the struct accessors and the
//! cast functions, which build nothing: see `functions::kind_of`) is
//! replaced, in the session's function registry, by a
//! [`Guarded`](functions::Guarded) wrapper that delegates everything to
//! the built-in (names, aliases, signature, return field, coercion,
//! simplification, ordering, …) and, around each call:
//!
//! 1. stops if the query's deadline has passed;
//! 2. computes, from the argument sizes, the largest value and the total
//!    bytes the call can build (exactly or as an upper bound for the
//!    amplifying functions; for the others, what copying their constant
//!    arguments to every row costs) and the super-linear work it can do,
//!    and refuses the call past [`MAX_VALUE_BYTES`] per value,
//!    [`MAX_VALUE_WORK`] steps per value, or the call's share of the
//!    query's memory ([`QueryGuard::call_limit`]); the estimate is also
//!    reserved in the query's memory pool while the call runs;
//! 3. runs long calls in row chunks, checking the deadline between chunks
//!    (and, where the bound is loose, adding up and reserving what the
//!    chunks really build), on a thread that gives its runtime worker back
//!    ([`blocking`]), so other tenants' queries keep running;
//! 4. measures the result and refuses it past the same limits;
//! 5. charges the result of a call on constants (a folded constant, which
//!    then lives in the plan) to a per-query budget of
//!    [`MAX_CONSTANT_BYTES`], reserved in the query's memory pool for the
//!    life of the query; once it is spent, further calls on constants are
//!    refused before they run, so repeated folding attempts stay cheap.
//!
//! Calls that reach the built-ins without the registry (the `OVERLAY`,
//! `POSITION`, `SUBSTRING … FROM` syntax, functions emitted by another
//! function's simplification) and the `||` operator are rewritten into the
//! guarded form by an optimizer rule that runs first
//! ([`GuardCalls`](rule::GuardCalls)), before any constant is folded; a
//! guarded function's simplification re-guards what it returns.
//!
//! The limits reach each call through [`QueryGuard`], a per-query handle
//! that [`for_query`] installs in the query's `SessionState` as a
//! `ConfigOptions` extension, which DataFusion hands to every function
//! call, both while folding constants and while executing.
//!
//! A limit reached on a constant is reported exactly (the sizes come from
//! the query text); one reached on a row's value names the function and
//! the limit, never the value or its size, which come from the data.

pub mod deadline;
mod functions;
mod rule;
mod sizes;
pub mod total;

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use datafusion::common::config::{ConfigEntry, ConfigExtension, ConfigOptions, ExtensionOptions};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};

pub use functions::session_functions;
pub use rule::{GuardCalls, call_sites, check_constants};

use deadline::DeadlinePassed;

/// Largest string or binary value a function may build: 16 MiB. Far above
/// any value an analytic query returns (gRPC clients refuse messages above
/// 4 MiB by default), and small enough that a batch of them stays bounded.
pub const MAX_VALUE_BYTES: usize = 16 << 20;

/// Most bytes one function call may build for one batch, whatever the
/// query's memory limit: 256 MiB, far below the 2 GiB at which 32-bit
/// string offsets overflow (and some builders panic).
pub const MAX_CALL_BYTES: usize = 256 << 20;

/// Most bytes the constant expressions of one query may build, in all:
/// 1 MiB. Constants are evaluated while the plan is optimised and then
/// live in the plan, where every optimizer rule (about 25, up to 3 passes)
/// copies, hashes and names them: 64 MiB of constants took 6 s to
/// optimise. 1 MiB is four times the SQL text a query may send by default
/// (`limits.max_sql_bytes`), and keeps that work to milliseconds.
pub const MAX_CONSTANT_BYTES: usize = 1 << 20;

/// Largest string or binary constant a query that reads a table may hold:
/// 32 KiB. Operators copy a constant into every row of a batch (8192 rows),
/// so this keeps one constant's copies within [`MAX_CALL_BYTES`].
pub const MAX_BROADCAST_CONSTANT_BYTES: usize = MAX_CALL_BYTES / 8192;

/// Most steps of super-linear work (`levenshtein`: |a|·|b|; trims with a
/// character set: |s|·|set|) for one value: 10⁸, about 0.1–0.3 s of CPU;
/// `levenshtein` of two 10,000-character strings still passes.
pub const MAX_VALUE_WORK: u128 = 100_000_000;

/// Steps of work between two deadline checks inside one call: 10⁷, a few
/// milliseconds.
pub const CHUNK_WORK: u128 = 10_000_000;

/// A call estimated to build more than this many bytes runs on a thread
/// that hands its runtime worker over to other tasks first.
const HEAVY_BYTES: u128 = 8 << 20;

/// Whether a limit was reached by what the query asks for (the same query
/// always fails: INVALID_ARGUMENT) or by the resources it was given
/// (RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Request,
    Resources,
}

/// A guard refused a function call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuardError {
    #[error(
        "{function} would build a value of {}; the limit is {} per value",
        size.map_or_else(|| "more than the limit (sizes computed from column values are not reported)".to_string(), bytes),
        bytes(MAX_VALUE_BYTES as u128)
    )]
    ValueTooLarge {
        function: String,
        /// The size, if it follows from constants only.
        size: Option<u128>,
    },
    #[error(
        "{function} would take {} steps for one value; the limit is {MAX_VALUE_WORK} steps per value",
        steps.map_or_else(|| "more than the limit of".to_string(), |s| s.to_string())
    )]
    TooMuchWork {
        function: String,
        steps: Option<u128>,
    },
    #[error(
        "{function} would build {} for a batch of {rows} row{}; the limit is {} per function call and batch (its share of limits.query_memory)",
        size.map_or_else(|| "more than the limit".to_string(), bytes),
        if *rows == 1 { "" } else { "s" },
        bytes(*limit as u128)
    )]
    CallTooLarge {
        function: String,
        size: Option<u128>,
        rows: usize,
        limit: usize,
    },
    #[error(
        "the query's constant expressions would build more than {} (while evaluating {function}); the limit is {} per query",
        bytes(MAX_CONSTANT_BYTES as u128),
        bytes(MAX_CONSTANT_BYTES as u128)
    )]
    ConstantBudget { function: String },
    #[error(
        "{function} needs more memory than the query has left within its limit of {} (limits.query_memory)",
        bytes(*limit as u128)
    )]
    Memory { function: String, limit: usize },
    #[error(
        "the query holds a constant of {}, but a query that reads a table may hold constants of at most {} (each is copied into every row)",
        bytes(*size as u128),
        bytes(MAX_BROADCAST_CONSTANT_BYTES as u128)
    )]
    BroadcastConstant { size: usize },
}

impl GuardError {
    /// Whether one value alone made the call fail (rather than the batch,
    /// the memory left, or the query's constants): such a failure is that
    /// value's, and a total expression gives that row NULL.
    pub fn is_about_one_value(&self) -> bool {
        matches!(
            self,
            GuardError::ValueTooLarge { .. } | GuardError::TooMuchWork { .. }
        )
    }

    pub fn blame(&self) -> Blame {
        match self {
            GuardError::ValueTooLarge { .. }
            | GuardError::TooMuchWork { .. }
            | GuardError::ConstantBudget { .. }
            | GuardError::BroadcastConstant { .. } => Blame::Request,
            GuardError::CallTooLarge { .. } | GuardError::Memory { .. } => Blame::Resources,
        }
    }
}

impl From<GuardError> for DataFusionError {
    fn from(e: GuardError) -> Self {
        DataFusionError::External(Box::new(e))
    }
}

/// The guard error behind `err`, however DataFusion and Arrow wrapped it.
pub fn find_error(err: &DataFusionError) -> Option<&GuardError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(guard) = e.downcast_ref::<GuardError>() {
            return Some(guard);
        }
        if let Some(DataFusionError::External(inner)) = e.downcast_ref::<DataFusionError>()
            && let Some(guard) = inner.downcast_ref::<GuardError>()
        {
            return Some(guard);
        }
        current = e.source();
    }
    None
}

/// Sizes in errors: exact bytes, with a rounded unit for large ones.
fn bytes(n: u128) -> String {
    const UNITS: [(&str, u128); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{n} bytes ({:.1} {unit})", n as f64 / size as f64)
            };
        }
    }
    format!("{n} bytes")
}

/// The limits one query runs under, shared by every function call of the
/// query: its deadline, its memory pool, and the constants it built.
pub struct QueryGuard {
    deadline: Option<Instant>,
    memory_limit: usize,
    pool: Option<Arc<dyn MemoryPool>>,
    constants: Mutex<Constants>,
    /// Calls in the plan that build values; the memory limit is shared
    /// between them.
    sites: AtomicUsize,
}

struct Constants {
    built: usize,
    /// Holds the constants' bytes in the query's pool while the query runs.
    reservation: Option<MemoryReservation>,
}

impl fmt::Debug for QueryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryGuard")
            .field("deadline", &self.deadline)
            .field("memory_limit", &self.memory_limit)
            .field("sites", &self.sites)
            .finish_non_exhaustive()
    }
}

impl QueryGuard {
    /// Limits for a query that must finish by `deadline` within
    /// `memory_limit` bytes of `pool`.
    pub fn new(
        deadline: Option<Instant>,
        memory_limit: usize,
        pool: Option<Arc<dyn MemoryPool>>,
    ) -> Self {
        let reservation = pool
            .as_ref()
            .map(|p| MemoryConsumer::new("constant expressions").register(p));
        Self {
            deadline,
            memory_limit,
            pool,
            constants: Mutex::new(Constants {
                built: 0,
                reservation,
            }),
            sites: AtomicUsize::new(1),
        }
    }

    /// Records how many calls that build values the optimised plan holds,
    /// which sets each call's share of the memory limit.
    pub fn share_memory(&self, sites: usize) {
        self.sites.store(sites.max(1), Ordering::Relaxed);
    }

    /// Most bytes one call may build for one batch: the query's memory
    /// split evenly between the calls of its plan that build values, whose
    /// results may all be alive at once (the arguments of one call, the
    /// columns of one batch). DataFusion does not account those results in
    /// the memory pool; while a call runs, its estimate is reserved there
    /// as well, which also bounds partitions running calls at once.
    pub fn call_limit(&self) -> usize {
        let sharers = self.sites.load(Ordering::Relaxed).max(1);
        (self.memory_limit / sharers).min(MAX_CALL_BYTES)
    }

    fn check_deadline(&self) -> datafusion::common::Result<()> {
        match self.deadline {
            Some(deadline) if Instant::now() >= deadline => {
                Err(DataFusionError::External(Box::new(DeadlinePassed)))
            }
            _ => Ok(()),
        }
    }

    /// Reserves `size` bytes of the query's pool while a call runs.
    fn reserve(&self, function: &str, size: u128) -> Result<Option<MemoryReservation>, GuardError> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let reservation = MemoryConsumer::new(format!("guarded {function}")).register(pool);
        reservation.try_grow(size).map_err(|_| GuardError::Memory {
            function: function.to_string(),
            limit: self.memory_limit,
        })?;
        Ok(Some(reservation))
    }

    /// Whether `size` more bytes of constants would fit in the budget.
    fn constants_fit(&self, size: u128) -> bool {
        let built = self.constants.lock().map_or(usize::MAX, |c| c.built);
        built as u128 + size <= MAX_CONSTANT_BYTES as u128
    }

    /// Charges `size` bytes of constants to the query.
    fn charge_constant(&self, function: &str, size: u128) -> Result<(), GuardError> {
        let over = || GuardError::ConstantBudget {
            function: function.to_string(),
        };
        let mut constants = self.constants.lock().map_err(|_| over())?;
        let size = usize::try_from(size).map_err(|_| over())?;
        let built = constants.built.saturating_add(size);
        if built > MAX_CONSTANT_BYTES {
            return Err(over());
        }
        if let Some(reservation) = &constants.reservation {
            reservation.try_grow(size).map_err(|_| GuardError::Memory {
                function: function.to_string(),
                limit: self.memory_limit,
            })?;
        }
        constants.built = built;
        Ok(())
    }
}

/// Carries a query's [`QueryGuard`] in its `ConfigOptions`, which
/// DataFusion passes to every scalar function call (constant folding
/// included). Unlike ordinary options it shares state between the copies
/// DataFusion makes: every copy must reach the same query's budget.
#[derive(Debug, Clone, Default)]
pub struct GuardOptions {
    guard: Option<Arc<QueryGuard>>,
}

impl ConfigExtension for GuardOptions {
    const PREFIX: &'static str = "sluice_guard";
}

impl ExtensionOptions for GuardOptions {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn cloned(&self) -> Box<dyn ExtensionOptions> {
        Box::new(self.clone())
    }

    fn set(&mut self, key: &str, _value: &str) -> datafusion::common::Result<()> {
        Err(DataFusionError::Configuration(format!(
            "{}.{key} cannot be set",
            Self::PREFIX
        )))
    }

    fn entries(&self) -> Vec<ConfigEntry> {
        Vec::new()
    }
}

/// The query guard carried by `options`, if any. Calls outside a query
/// (none in the connector) get the fixed per-value and per-call limits
/// only.
fn guard_of(options: &ConfigOptions) -> Option<&Arc<QueryGuard>> {
    options.extensions.get::<GuardOptions>()?.guard.as_ref()
}

/// `state` set up for one query: its function calls see `guard`, both
/// while constants are folded and while the plan executes.
pub fn for_query(mut state: SessionState, guard: Arc<QueryGuard>) -> SessionState {
    state
        .config_mut()
        .options_mut()
        .extensions
        .insert(GuardOptions { guard: Some(guard) });
    // Physical expressions capture the options recorded here.
    state.mark_start_execution();
    state
}

pub use crate::blocking::{blocking, blocking_async};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_messages() {
        assert_eq!(bytes(16 << 20), "16 MiB");
        assert_eq!(bytes(30_000_000_000), "30000000000 bytes (27.9 GiB)");
        assert_eq!(bytes(12), "12 bytes");
    }
}
