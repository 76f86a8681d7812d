//! What can go wrong with a query, and the gRPC status each failure gets.
//!
//! Messages name the rule, table, column or limit involved. Errors raised
//! while reading data are reduced to their kind ("division by zero"), because
//! the underlying messages can quote the values that caused them.

use std::fmt;

use datafusion::arrow::error::ArrowError;

use crate::config::human_bytes;
use datafusion::error::DataFusionError;
use sluice_policy::{Denial, DenialKind};
use tonic::{Code, Status};

/// The one message of [`QueryError::PrivateAnswerWithheld`].
pub const PRIVATE_ANSWER_WITHHELD: &str = "the differentially private answer could not be computed, and its ε was charged. Why is withheld, because it could depend on the data: a query that needs more memory or time than its limits (limits.query_memory, limits.query_timeout) ends this way, and so would any failure while reading. Narrow the query (fewer groups, a WHERE clause) or ask the provider for higher limits";

#[derive(Debug, Clone)]
pub enum QueryError {
    /// The request is malformed: SQL syntax, unknown column, wrong types,
    /// SQL too long, bad parameters. INVALID_ARGUMENT.
    InvalidRequest(String),
    /// A named object does not exist: a table, a prepared statement. NOT_FOUND.
    NotFound(String),
    /// The plan gate refused the plan.
    Denied(Denial),
    /// A ticket failed verification: altered, expired, or another principal's.
    /// PERMISSION_DENIED.
    TicketRejected(String),
    /// A memory, concurrency or ticket limit was reached. RESOURCE_EXHAUSTED.
    ResourcesExhausted(String),
    /// The query ran past its time limit. DEADLINE_EXCEEDED.
    Timeout(String),
    /// The data made the query fail (division by zero, failed cast); the
    /// message gives only the kind of failure. INVALID_ARGUMENT.
    DataDependent(String),
    /// A differentially private answer failed after its budget was charged.
    /// Its cause is withheld: a failure that a value in the data could
    /// cause would be an answer to a question about the data, without
    /// noise. RESOURCE_EXHAUSTED, always with the same message.
    PrivateAnswerWithheld,
    /// The connector cannot keep its records (the disk holding its state
    /// is full, a write failed), or a dataset's file went away or changed
    /// under the query: nothing unrecorded was released. UNAVAILABLE; the
    /// message says what failed and what to do, never where the files are.
    Unavailable(String),
    /// A dataset's file does not have the dataset's shape (a line cut
    /// short, a value of another type). DATA_LOSS.
    DataLoss(String),
    /// A fault on our side. INTERNAL.
    Internal(String),
    /// Any of the above, with the receipt of its audit record.
    Recorded(Box<QueryError>, String),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::InvalidRequest(m)
            | QueryError::NotFound(m)
            | QueryError::TicketRejected(m)
            | QueryError::ResourcesExhausted(m)
            | QueryError::Timeout(m)
            | QueryError::DataDependent(m)
            | QueryError::Unavailable(m)
            | QueryError::DataLoss(m)
            | QueryError::Internal(m) => f.write_str(m),
            QueryError::Denied(d) => write!(f, "{d}"),
            QueryError::PrivateAnswerWithheld => f.write_str(PRIVATE_ANSWER_WITHHELD),
            QueryError::Recorded(e, receipt) => write!(f, "{e} (audit receipt {receipt})"),
        }
    }
}

impl std::error::Error for QueryError {}

impl QueryError {
    pub fn code(&self) -> Code {
        match self {
            QueryError::InvalidRequest(_) | QueryError::DataDependent(_) => Code::InvalidArgument,
            QueryError::NotFound(_) => Code::NotFound,
            QueryError::Denied(d) => match d.kind {
                DenialKind::Forbidden => Code::PermissionDenied,
                DenialKind::QuotaExceeded => Code::ResourceExhausted,
                DenialKind::Precondition => Code::FailedPrecondition,
            },
            QueryError::TicketRejected(_) => Code::PermissionDenied,
            QueryError::ResourcesExhausted(_) | QueryError::PrivateAnswerWithheld => {
                Code::ResourceExhausted
            }
            QueryError::Timeout(_) => Code::DeadlineExceeded,
            QueryError::Unavailable(_) => Code::Unavailable,
            QueryError::DataLoss(_) => Code::DataLoss,
            QueryError::Internal(_) => Code::Internal,
            QueryError::Recorded(e, _) => e.code(),
        }
    }

    /// The error with the receipt id of the audit record that holds it.
    pub fn recorded(self, receipt_id: String) -> Self {
        match self {
            QueryError::Recorded(e, _) => QueryError::Recorded(e, receipt_id),
            e => QueryError::Recorded(Box::new(e), receipt_id),
        }
    }

    /// The error without its receipt.
    pub fn cause(&self) -> &QueryError {
        match self {
            QueryError::Recorded(e, _) => e.cause(),
            e => e,
        }
    }

    /// A short label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            QueryError::InvalidRequest(_) => "invalid",
            QueryError::NotFound(_) => "not_found",
            QueryError::Denied(_) => "denied",
            QueryError::TicketRejected(_) => "ticket_rejected",
            QueryError::ResourcesExhausted(_) => "resource_exhausted",
            QueryError::Timeout(_) => "timeout",
            QueryError::DataDependent(_) => "data_error",
            QueryError::PrivateAnswerWithheld => "dp_withheld",
            QueryError::Unavailable(_) => "unavailable",
            QueryError::DataLoss(_) => "data_loss",
            QueryError::Internal(_) => "internal",
            QueryError::Recorded(e, _) => e.outcome(),
        }
    }

    /// Classifies an error raised while parsing, planning or analyzing. These
    /// never read data, so DataFusion's message (which names tables, columns
    /// and types from the query and the catalog) is passed on.
    pub fn from_planning(err: DataFusionError) -> Self {
        if let Some(refused) = crate::guard::find_error(&err) {
            return Self::from_guard(refused);
        }
        match err.find_root() {
            DataFusionError::SQL(e, _) => {
                QueryError::InvalidRequest(format!("SQL syntax error: {e}"))
            }
            DataFusionError::ParquetError(_)
            | DataFusionError::ObjectStore(_)
            | DataFusionError::IoError(_)
            | DataFusionError::Internal(_) => {
                QueryError::Internal(format!("planning failed: {err}"))
            }
            DataFusionError::ResourcesExhausted(m) => QueryError::ResourcesExhausted(m.clone()),
            DataFusionError::NotImplemented(m) => {
                QueryError::InvalidRequest(format!("not supported: {m}"))
            }
            root => QueryError::InvalidRequest(strip_prefixes(&root.to_string())),
        }
    }

    /// Classifies an error raised while executing. Only the kind of a
    /// data-dependent failure is reported, never the message, which may
    /// contain the offending value.
    pub fn from_execution(err: &DataFusionError, memory_limit: usize) -> Self {
        if let Some(refused) = crate::guard::find_error(err) {
            return Self::from_guard(refused);
        }
        if let Some(failed) = crate::catalog::find_source_error(err) {
            return Self::from_source(failed);
        }
        if let Some(full) = spill_full(err, memory_limit) {
            return full;
        }
        match err.find_root() {
            DataFusionError::ResourcesExhausted(message)
                if message.starts_with(crate::catalog::PROCESS_MEMORY_IN_USE) =>
            {
                QueryError::ResourcesExhausted(format!("{message}; try again shortly"))
            }
            DataFusionError::ResourcesExhausted(_) => QueryError::ResourcesExhausted(format!(
                "the query needs more memory than its limit of {} (limits.query_memory)",
                human_bytes(memory_limit)
            )),
            DataFusionError::ArrowError(e, _) => QueryError::DataDependent(arrow_error_kind(e).into()),
            DataFusionError::Execution(_) => {
                QueryError::DataDependent("the query failed while reading data (details withheld: error messages never carry data)".into())
            }
            _ => QueryError::Internal("query execution failed (see the connector log)".into()),
        }
    }
}

fn arrow_error_kind(e: &ArrowError) -> &'static str {
    match e {
        ArrowError::DivideByZero => "division by zero while evaluating the query",
        ArrowError::ArithmeticOverflow(_) => "arithmetic overflow while evaluating the query",
        ArrowError::CastError(_) | ArrowError::ParseError(_) => {
            "a value could not be converted to the requested type (the value is withheld)"
        }
        ArrowError::ComputeError(_) | ArrowError::InvalidArgumentError(_) => {
            "a function failed on a value (the value is withheld)"
        }
        _ => "the query failed while reading data (details withheld)",
    }
}

impl QueryError {
    /// A function guard's refusal. Its message names the function and the
    /// limit, and gives sizes only when they follow from constants in the
    /// query, never from the data, so it is passed on as it is.
    fn from_guard(refused: &crate::guard::GuardError) -> Self {
        match refused.blame() {
            crate::guard::Blame::Request => QueryError::InvalidRequest(refused.to_string()),
            crate::guard::Blame::Resources => QueryError::ResourcesExhausted(refused.to_string()),
        }
    }
}

/// DataFusion prefixes messages with their category; the gRPC code already
/// says that.
fn strip_prefixes(msg: &str) -> String {
    let mut m = msg;
    for prefix in [
        "Error during planning: ",
        "Schema error: ",
        "Optimizer rule ",
    ] {
        m = m.strip_prefix(prefix).unwrap_or(m);
    }
    without_field_hints(m)
}

/// DataFusion lists the valid fields (or suggests a close name) after an
/// unknown column; those lists include columns the policy hides, so they
/// are cut and the caller is pointed to the catalog listing instead.
fn without_field_hints(msg: &str) -> String {
    let Some(start) = msg.find("No field named") else {
        return msg.to_string();
    };
    let tail = &msg[start..];
    let end = ["Valid fields", "Did you mean", "Column names"]
        .iter()
        .filter_map(|hint| tail.find(hint))
        .min()
        .unwrap_or(tail.len());
    format!(
        "{}{}. The columns you may use are listed by GetTables (`sluice tables`)",
        &msg[..start],
        tail[..end].trim_end().trim_end_matches('.')
    )
}

/// Longest status message sent, in bytes. A status message travels as an
/// HTTP/2 header, and gRPC clients refuse response headers past 8 KiB by
/// default (reporting RESOURCE_EXHAUSTED instead of the error); DataFusion
/// messages that print a large expression can exceed that.
const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

impl From<QueryError> for Status {
    fn from(e: QueryError) -> Self {
        let mut status = Status::new(e.code(), shortened(e.to_string()));
        if let QueryError::Recorded(_, receipt) = &e
            && let Ok(value) = receipt.parse()
        {
            status
                .metadata_mut()
                .insert(sluice_proto::wire::header::RECEIPT, value);
        }
        status
    }
}

/// `message` cut to [`MAX_STATUS_MESSAGE_BYTES`] (at a character boundary),
/// marked where it was cut.
fn shortened(mut message: String) -> String {
    const CUT: &str = " … (shortened)";
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES - CUT.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(CUT);
    message
}

impl QueryError {
    /// How the audit record of this refusal describes it.
    pub fn refusal(&self) -> crate::audit::Refusal {
        let cause = self.cause();
        crate::audit::Refusal {
            outcome: match cause {
                QueryError::Denied(_)
                | QueryError::TicketRejected(_)
                | QueryError::ResourcesExhausted(_) => "denied",
                QueryError::InvalidRequest(_) | QueryError::NotFound(_) => "invalid",
                _ => "failed",
            },
            code: sluice_proto::wire::code_name(self.code()),
            rule: match cause {
                QueryError::Denied(denial) => Some(denial.rule.clone()),
                _ => None,
            },
            message: self.to_string(),
        }
    }
}

impl QueryError {
    /// A dataset that could not be read: named, with what happened to it
    /// and what to do, and nothing from the file (no path, no value).
    fn from_source(failed: &crate::catalog::SourceError) -> Self {
        use crate::catalog::SourceFault;
        let dataset = &failed.dataset;
        let cannot = format!("dataset `{dataset}` cannot be read");
        match failed.fault {
            SourceFault::Missing => QueryError::Unavailable(format!(
                "{cannot}: its data is missing (deleted or moved since the connector started), so \
                 the answer ends here; try again later, and if it persists tell the provider"
            )),
            SourceFault::Changed => QueryError::Unavailable(format!(
                "{cannot}: its data changed while this query read it (a file was cut short or \
                 replaced), so the answer ends here, incomplete; try again"
            )),
            SourceFault::Unreadable => QueryError::Unavailable(format!(
                "{cannot}: reading its data failed (an I/O error), so the answer ends here, \
                 incomplete; try again later, and if it persists tell the provider"
            )),
            SourceFault::Unreachable => QueryError::Unavailable(format!(
                "{cannot}: the database or object store it is read from cannot be reached now; \
                 try again later, and if it persists tell the provider"
            )),
            SourceFault::Refused => QueryError::Unavailable(format!(
                "{cannot}: the database or object store it is read from refused the connector's \
                 credentials or permissions; tell the provider"
            )),
            SourceFault::TimedOut => QueryError::Unavailable(format!(
                "{cannot}: its database stopped the statement after its statement_timeout; \
                 try again later, or ask for less"
            )),
            SourceFault::Malformed => QueryError::DataLoss(format!(
                "{cannot}: its data does not have the dataset's shape (a line cut short, a field \
                 missing, a value of another type; details withheld, as they could show data), so \
                 the answer ends here, incomplete. Tell the provider"
            )),
        }
    }
}

/// Why one of the connector's stores failed, told to a client: the cause
/// and what the provider must do, never a path (the full error is logged).
struct StorageFault {
    cause: String,
    fix: &'static str,
}

const FREE_SPACE: &str = "free space on the disk that holds the connector's state directory";
const CHECK_DISK: &str = "check the disk that holds the connector's state directory";

impl StorageFault {
    fn full() -> Self {
        StorageFault {
            cause: "the disk is full".into(),
            fix: FREE_SPACE,
        }
    }

    fn io(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Self::full(),
            kind => StorageFault {
                cause: format!("an I/O error: {kind}"),
                fix: CHECK_DISK,
            },
        }
    }

    fn sqlite(e: &rusqlite::Error) -> Option<Self> {
        use rusqlite::ErrorCode;
        let cause = match e.sqlite_error_code()? {
            ErrorCode::DiskFull => return Some(Self::full()),
            ErrorCode::ReadOnly | ErrorCode::PermissionDenied => "its file cannot be written",
            ErrorCode::SystemIoFailure | ErrorCode::CannotOpen => "an I/O error",
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return Some(StorageFault {
                    cause: "another process held its database for too long".into(),
                    fix: "check that no other process holds the connector's databases",
                });
            }
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                return Some(StorageFault {
                    cause: "its database is damaged".into(),
                    fix: "restore it from a backup (the connector's log names the file)",
                });
            }
            _ => return None,
        };
        Some(StorageFault {
            cause: cause.into(),
            fix: CHECK_DISK,
        })
    }

    /// UNAVAILABLE: `what` (the audit log, …) could not be written, so the
    /// request was refused.
    fn refusal(self, what: &str) -> QueryError {
        QueryError::Unavailable(format!(
            "the connector cannot write its {what} ({}), and nothing leaves without its record \
             there, so nothing more was sent. Try again later; the provider must {} (the \
             connector's log has the details)",
            self.cause, self.fix
        ))
    }
}

/// A quota refusal keeps its rule and message; a store fault is logged and
/// reported without its path.
impl From<crate::quota::QuotaError> for QueryError {
    fn from(e: crate::quota::QuotaError) -> Self {
        use crate::quota::QuotaError;
        match e {
            QuotaError::Exceeded(denial) => QueryError::Denied(denial),
            other => {
                tracing::error!(error = %other, "quota counters failure");
                let fault = match &other {
                    QuotaError::Open { source, .. } | QuotaError::Database { source, .. } => {
                        StorageFault::sqlite(source)
                    }
                    _ => None,
                };
                match fault {
                    Some(fault) => fault.refusal("quota counters"),
                    None => QueryError::Internal(
                        "the quota counters cannot be read or written (see the connector log)"
                            .into(),
                    ),
                }
            }
        }
    }
}

/// The audit log could not be written: nothing is released without its
/// record. The cause (a path, an OS error) stays in the provider's log.
impl From<sluice_audit::StoreError> for QueryError {
    fn from(e: sluice_audit::StoreError) -> Self {
        use sluice_audit::StoreError;
        tracing::error!(error = %e, "the audit log cannot be written");
        let fault = match &e {
            StoreError::Append { cause, .. }
            | StoreError::Open { cause, .. }
            | StoreError::Lock { cause, .. }
            | StoreError::Read { cause, .. }
            | StoreError::Seek { cause, .. }
            | StoreError::Truncate { cause, .. } => StorageFault::io(cause),
            StoreError::Refused { .. } | StoreError::Shrank { .. } => StorageFault {
                cause: "it refuses appends until the connector is restarted".into(),
                fix: "check the log with `sluice audit verify` and restart the connector",
            },
            _ => StorageFault {
                cause: "its records cannot be read or written".into(),
                fix: "check the log with `sluice audit verify`",
            },
        };
        fault.refusal("audit log")
    }
}

/// A spill that did not fit: DataFusion's writer fails with an I/O error
/// when the spill space is used up (or the disk is full), which would
/// otherwise read as a failure while reading data. The error text is only
/// searched, never passed on.
fn spill_full(err: &DataFusionError, memory_limit: usize) -> Option<QueryError> {
    let text = err.to_string();
    let over_limit = text.contains("during the spilling process has exceeded");
    let disk_full = text.contains("No space left on device");
    if !(over_limit || disk_full) {
        return None;
    }
    let what = if over_limit {
        "filled the spill space all queries share (limits.spill_space)"
    } else {
        "filled the disk that holds the spill directory"
    };
    Some(QueryError::ResourcesExhausted(format!(
        "the query needs more memory than its limit of {} (limits.query_memory), and what it \
         spilled to disk beyond that {what}",
        human_bytes(memory_limit)
    )))
}

/// Budget refusals keep their message (what remains, what the query
/// needs: facts about the caller's own budget); faults are logged and
/// reported without paths.
impl From<sluice_privacy::PrivacyError> for QueryError {
    fn from(e: sluice_privacy::PrivacyError) -> Self {
        use sluice_privacy::PrivacyError;
        match e {
            e if e.is_exhausted() => QueryError::ResourcesExhausted(e.to_string()),
            // A budget period closed to this kind of charge: like an
            // exhausted budget, it reopens with the next period.
            e @ PrivacyError::Ledger(sluice_privacy::ledger::LedgerError::AccountingChanged {
                ..
            }) => QueryError::ResourcesExhausted(e.to_string()),
            PrivacyError::ReservationSpent => QueryError::TicketRejected(e.to_string()),
            other => {
                use sluice_privacy::ledger::LedgerError;
                tracing::error!(error = %other, "privacy ledger failure");
                let fault = match &other {
                    PrivacyError::Ledger(LedgerError::Full { .. }) => Some(StorageFault::full()),
                    PrivacyError::Ledger(
                        LedgerError::Open { cause, .. }
                        | LedgerError::Corrupt { cause, .. }
                        | LedgerError::Busy { cause, .. }
                        | LedgerError::Database { cause, .. },
                    ) => StorageFault::sqlite(cause),
                    _ => None,
                };
                match fault {
                    Some(fault) => fault.refusal("privacy-budget ledger"),
                    None => QueryError::Internal(
                        "the privacy ledger failed (see the connector log)".into(),
                    ),
                }
            }
        }
    }
}

/// Planning a DP query's noise: ε too small for the query is the caller's
/// to fix; a mechanism OpenDP cannot build is ours.
impl From<sluice_privacy::PlanNoiseError> for QueryError {
    fn from(e: sluice_privacy::PlanNoiseError) -> Self {
        match e {
            sluice_privacy::PlanNoiseError::EpsilonTooSmall { .. } => {
                QueryError::InvalidRequest(e.to_string())
            }
            sluice_privacy::PlanNoiseError::Mechanism(_) => {
                tracing::error!(error = %e, "planning the noise of a DP query failed");
                QueryError::Internal(e.to_string())
            }
        }
    }
}

/// The agreement store cannot be read: the cause (a path, an SQLite
/// error) stays in the provider's log.
impl From<crate::agreements::AgreementStoreError> for QueryError {
    fn from(e: crate::agreements::AgreementStoreError) -> Self {
        use crate::agreements::AgreementStoreError;
        tracing::error!(error = %e, "reading agreements failed");
        let fault = match &e {
            AgreementStoreError::Open { cause, .. } => StorageFault::sqlite(cause),
            AgreementStoreError::Database { error, .. } => StorageFault::sqlite(error),
            _ => None,
        };
        match fault {
            Some(fault) => QueryError::Unavailable(format!(
                "the connector cannot read its agreement store ({}): this request was refused. Try \
                 again later; the provider must {} (the connector's log has the details)",
                fault.cause, fault.fix
            )),
            None => QueryError::Internal(
                "the agreement store cannot be read (see the connector log)".into(),
            ),
        }
    }
}

impl From<Denial> for QueryError {
    fn from(d: Denial) -> Self {
        QueryError::Denied(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_all_queries_share_is_reported_as_such() {
        let shared = DataFusionError::ResourcesExhausted(format!(
            "{} (limits.total_query_memory, 4 GiB) is in use by the queries running now",
            crate::catalog::PROCESS_MEMORY_IN_USE
        ));
        let e = QueryError::from_execution(&shared, 1 << 30);
        assert!(matches!(&e, QueryError::ResourcesExhausted(m)
            if m.contains("limits.total_query_memory") && m.ends_with("try again shortly")));
        let own = DataFusionError::ResourcesExhausted("Failed to allocate".into());
        let e = QueryError::from_execution(&own, 1 << 30);
        assert!(
            matches!(&e, QueryError::ResourcesExhausted(m) if m.contains("limits.query_memory"))
        );
    }

    #[test]
    fn full_spill_space_is_reported_with_its_setting() {
        // As DataFusion's spill writer fails when the spill files outgrow
        // the DiskManager's limit: an I/O error inside an Arrow error.
        let io = std::io::Error::other(
            "The used disk space during the spilling process has exceeded the allowable limit \
             of 1.0 MB. Please try increasing the config: `datafusion.runtime.max_temp_directory_size`.",
        );
        let full = DataFusionError::ArrowError(
            Box::new(datafusion::arrow::error::ArrowError::IoError(
                io.to_string(),
                io,
            )),
            None,
        );
        let e = QueryError::from_execution(&full, 1 << 30);
        assert!(
            matches!(&e, QueryError::ResourcesExhausted(m)
                if m.contains("limits.spill_space") && !m.contains("datafusion.runtime")),
            "{e:?}"
        );
        let enospc = DataFusionError::IoError(std::io::Error::from_raw_os_error(28));
        let e = QueryError::from_execution(&enospc, 1 << 30);
        assert!(
            matches!(&e, QueryError::ResourcesExhausted(m) if m.contains("filled the disk")),
            "{e:?}"
        );
        // Any other I/O failure is still a failure while reading.
        let other = DataFusionError::IoError(std::io::Error::other("short read"));
        assert!(matches!(
            QueryError::from_execution(&other, 1 << 30),
            QueryError::DataDependent(_) | QueryError::Internal(_)
        ));
    }

    #[test]
    fn long_messages_are_shortened_to_fit_a_header() {
        let long = QueryError::InvalidRequest("é".repeat(5000));
        let status = Status::from(long);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE_BYTES);
        assert!(status.message().ends_with("(shortened)"));
        let short = Status::from(QueryError::InvalidRequest("short".into()));
        assert_eq!(short.message(), "short");
    }

    #[test]
    fn unknown_column_errors_do_not_list_other_columns() {
        let m = strip_prefixes(
            "Schema error: No field named nope. Valid fields are trips.card_id, trips.mode.",
        );
        assert!(!m.contains("card_id"), "{m}");
        assert!(m.starts_with("No field named nope. The columns"), "{m}");
        let m = strip_prefixes("Schema error: No field named card. Did you mean 'trips.card_id'?.");
        assert!(!m.contains("card_id"), "{m}");
    }

    #[test]
    fn execution_errors_never_carry_the_message() {
        let err = DataFusionError::ArrowError(
            Box::new(ArrowError::CastError(
                "Cannot cast string 'secret-value' to Int64".into(),
            )),
            None,
        );
        let q = QueryError::from_execution(&err, 1 << 20);
        assert_eq!(q.code(), Code::InvalidArgument);
        assert!(!q.to_string().contains("secret-value"), "{q}");
        let exec = DataFusionError::Execution("value 'secret-value' is bad".into());
        assert!(
            !QueryError::from_execution(&exec, 1)
                .to_string()
                .contains("secret")
        );
    }

    #[test]
    fn memory_errors_name_the_limit() {
        let err = DataFusionError::ResourcesExhausted("pool".into());
        let q = QueryError::from_execution(
            &DataFusionError::Context("x".into(), Box::new(err)),
            256 << 20,
        );
        assert_eq!(q.code(), Code::ResourceExhausted);
        assert!(q.to_string().contains("256 MiB"), "{q}");
    }

    #[test]
    fn denials_map_by_kind() {
        let d = Denial::forbidden("read-only", "COPY is not accepted");
        assert_eq!(QueryError::from(d).code(), Code::PermissionDenied);
    }
}
