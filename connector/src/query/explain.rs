//! `EXPLAIN POLICY <query>`: the decision, the rules and the rewritten plan,
//! as a one-row result, without running the query.

use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, lit};
use sluice_policy::{Approval, Denial, DenialKind};

use super::QueryError;

/// The query after `EXPLAIN POLICY`, if `sql` starts with it.
pub fn strip_explain_policy(sql: &str) -> Option<&str> {
    let (first, rest) = first_word(sql)?;
    let (second, rest) = first_word(rest)?;
    (first.eq_ignore_ascii_case("explain") && second.eq_ignore_ascii_case("policy"))
        .then(|| rest.trim_start())
}

fn first_word(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    let end = text.find(char::is_whitespace).unwrap_or(text.len());
    (end > 0).then(|| text.split_at(end))
}

/// The `stages` of a query on a connector without workers.
pub const ONE_NODE: &str = "stage 0, on this connector: the whole plan (no workers are configured)";

/// A one-row plan describing `decision`: columns `decision`, `rule`,
/// `message`, `policy_version`, `consumers`, `output_class`, `plan` and
/// `stages` (where an allowed query would run: `cluster/report.rs`).
pub fn explain(
    decision: Result<Approval, Denial>,
    version: &str,
    stages: &str,
    describe: impl Fn(&LogicalPlan) -> String,
) -> Result<LogicalPlan, QueryError> {
    let row = match decision {
        Ok(approval) => {
            let record = approval.record;
            let mut class = record.output_class.to_string();
            if !record.output_tags.is_empty() {
                let tags: Vec<String> = record.output_tags.iter().map(|t| t.to_string()).collect();
                class = format!("{class} ({})", tags.join(", "));
            }
            [
                "allow".to_string(),
                record.rules.join("\n"),
                String::new(),
                record.policy_version,
                record.consumers.join(", "),
                class,
                describe(&approval.plan),
                stages.to_string(),
            ]
        }
        Err(denial) => [
            match denial.kind {
                DenialKind::Forbidden => "deny",
                DenialKind::QuotaExceeded => "deny (quota)",
                DenialKind::Precondition => "deny (precondition)",
            }
            .to_string(),
            denial.rule,
            denial.message,
            version.to_string(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ],
    };
    let names = [
        "decision",
        "rule",
        "message",
        "policy_version",
        "consumers",
        "output_class",
        "plan",
        "stages",
    ];
    LogicalPlanBuilder::values(vec![row.iter().map(|v| lit(v.as_str())).collect()])
        .and_then(|b| {
            let columns = b.schema().columns();
            b.project(
                columns
                    .into_iter()
                    .zip(names)
                    .map(|(c, name)| datafusion::logical_expr::col(c).alias(name)),
            )
        })
        .and_then(|b| b.build())
        .map_err(|e| QueryError::Internal(format!("building the EXPLAIN POLICY answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_explain_policy_in_any_case() {
        assert_eq!(
            strip_explain_policy("  explain \n  POLICY  SELECT 1"),
            Some("SELECT 1")
        );
        assert_eq!(
            strip_explain_policy("EXPLAIN POLICY SELECT 1"),
            Some("SELECT 1")
        );
        assert_eq!(strip_explain_policy("EXPLAIN SELECT 1"), None);
        assert_eq!(strip_explain_policy("SELECT 1"), None);
    }
}
