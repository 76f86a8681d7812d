//! Names Sluice gives the columns and tables it adds to a plan.

/// Prefix of the internal columns and tables the rewrite and the DP
/// statistics plan add; no dataset column may start with it.
pub const INTERNAL_PREFIX: &str = "__sluice_";
