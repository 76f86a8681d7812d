//! The wire contract beside the protobuf messages: every request and
//! response header, every Arrow schema and field metadata key, and the gRPC
//! code names Sluice writes in records and messages. Clients in any
//! language can rely on these names; changing one is a breaking change.
//!
//! This module needs no gRPC stack, so the privacy and audit libraries can
//! use it without tonic (build `sluice-proto` with `default-features =
//! false`).

/// gRPC request and response headers (ASCII metadata, lower case).
pub mod header {
    /// Request: the declared purpose of a query (`x-sluice-purpose: research`).
    pub const PURPOSE: &str = "x-sluice-purpose";
    /// Request: the ε a differentially private query asks to spend.
    pub const EPSILON: &str = "x-sluice-epsilon";
    /// Response header of DoGet, and error metadata: the audit receipt of
    /// the record about this request.
    pub const RECEIPT: &str = "x-sluice-receipt";
    /// Request, broker to provider: the signed assertion naming the
    /// consumer a broker asks for.
    pub const ON_BEHALF_OF: &str = "x-sluice-on-behalf-of";
    /// Request to a broker: accept an answer from only some providers.
    pub const ALLOW_PARTIAL: &str = "x-sluice-allow-partial";
}

/// Schema metadata every result carries: what class of data it is and
/// which policy released it.
pub mod schema {
    pub const CLASSIFICATION: &str = "sluice.classification";
    pub const TAGS: &str = "sluice.tags";
    pub const POLICY_VERSION: &str = "sluice.policy_version";
}

/// Metadata of a differentially private answer.
pub mod dp {
    /// Field metadata on every noisy column: the mechanism, its scale, the
    /// ε and δ it spent, the 95% half-width of its noise, and what that
    /// half-width covers.
    pub const MECHANISM: &str = "sluice.dp.mechanism";
    pub const SCALE: &str = "sluice.dp.scale";
    pub const EPSILON: &str = "sluice.dp.epsilon";
    pub const DELTA: &str = "sluice.dp.delta";
    pub const CI95: &str = "sluice.dp.ci95_half_width";
    pub const NOTE: &str = "sluice.dp.note";
    /// Field metadata under `accounting: zcdp`: the ρ the column's noise is
    /// calibrated to (its `sluice.dp.epsilon` is then its share of the
    /// query's ε, for reading only).
    pub const RHO: &str = "sluice.dp.rho";
    /// Field metadata: differentially private estimates of what the bounds
    /// left out, as fractions from 0 to 1: rows beyond `max_rows`, rows in
    /// groups beyond `max_groups` (only where groups are capped), and, on a
    /// column that is summed, averaged or ranked, its values clamped to the
    /// bounds; the ε they spent (their share of the query's), and a
    /// sentence saying all of it. The sentence is also schema metadata.
    pub const BIAS_OVER_MAX_ROWS: &str = "sluice.dp.bias.rows_over_max_rows";
    pub const BIAS_OVER_MAX_GROUPS: &str = "sluice.dp.bias.rows_over_max_groups";
    pub const BIAS_CLAMPED: &str = "sluice.dp.bias.clamped";
    pub const BIAS_EPSILON: &str = "sluice.dp.bias.epsilon";
    pub const BIAS: &str = "sluice.dp.bias";
    /// Schema metadata: how ε was divided between the statistics, and what
    /// the whole query spent.
    pub const BUDGET_SPLIT: &str = "sluice.dp.budget_split";
    /// Schema metadata of a query over `auto` bounds: the bounds it chose
    /// from the data, their quantiles and what choosing them cost.
    pub const AUTO_BOUNDS: &str = "sluice.dp.auto_bounds";
    pub const QUERY_EPSILON: &str = "sluice.dp.query_epsilon";
    pub const QUERY_DELTA: &str = "sluice.dp.query_delta";
    /// Schema metadata under `accounting: zcdp`: the ρ the query is charged
    /// (with `sluice.dp.query_charged_delta` for a private selection of
    /// groups); `sluice.dp.query_epsilon` and `query_delta` are then the
    /// guarantee the answer gives on its own.
    pub const QUERY_RHO: &str = "sluice.dp.query_rho";
    pub const QUERY_CHARGED_DELTA: &str = "sluice.dp.query_charged_delta";
    /// Schema metadata: the budget left after this query.
    pub const REMAINING_EPSILON: &str = "sluice.dp.remaining_epsilon";
    pub const REMAINING_DELTA: &str = "sluice.dp.remaining_delta";
    /// Schema metadata: `true` when the answer is a repeat served from the
    /// cache at no cost.
    pub const CACHED: &str = "sluice.dp.cached";
}

/// Schema metadata of a broker's federated answer.
pub mod federation {
    /// The providers whose partial answers were merged.
    pub const PROVIDERS: &str = "sluice.federation.providers";
    /// The providers that did not answer (only with `x-sluice-allow-partial`).
    pub const MISSING: &str = "sluice.federation.missing";
    /// `true` when some provider is missing from the answer.
    pub const PARTIAL: &str = "sluice.federation.partial";
}

/// The canonical upper-case names of the gRPC status codes, by number, as
/// Sluice writes them in audit records and CLI messages.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The canonical name of a gRPC status code (`PERMISSION_DENIED`).
#[cfg(feature = "grpc")]
pub fn code_name(code: tonic::Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

#[cfg(all(test, feature = "grpc"))]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_canonical_name() {
        for number in 0..CODE_NAMES.len() as i32 {
            let code = tonic::Code::from_i32(number);
            let expected = format!("{code:?}")
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_uppercase()).then_some('_');
                    sep.into_iter().chain(c.to_uppercase())
                })
                .collect::<String>();
            assert_eq!(code_name(code), expected);
        }
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
    }
}
