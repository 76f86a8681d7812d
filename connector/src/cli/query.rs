//! `sluice query`: runs SQL through a connector (or a broker) and prints
//! the result as a table, CSV, JSON or Arrow IPC, with its audit receipts
//! and, for a federated answer, which providers contributed.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;

use super::conn::ConnArgs;

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    pub format: OutputFormat,
    /// Declared purpose of the query (sent as the x-sluice-purpose header),
    /// e.g. `research`; policies may require one.
    #[arg(long, short = 'p', env = "SLUICE_PURPOSE")]
    pub purpose: Option<String>,
    /// ε to spend on a differentially private query (sent as the
    /// x-sluice-epsilon header), up to the policy's per-query cap.
    #[arg(long, short = 'e', env = "SLUICE_EPSILON")]
    pub epsilon: Option<f64>,
    /// The access token of a DSP transfer (`sluice dsp transfer` prints it),
    /// sent as `authorization: Bearer <token>`: the query runs under that
    /// transfer's agreement.
    #[arg(long, env = "SLUICE_ACCESS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Write the result's audit receipt (JSON) to this file, for
    /// `sluice receipt verify`.
    #[arg(long)]
    pub receipt_out: Option<PathBuf>,
    /// Through a broker: accept a result without the providers that failed
    /// (sent as x-sluice-allow-partial: true); the result names them.
    #[arg(long)]
    pub allow_partial: bool,
    /// The SQL query (or `EXPLAIN POLICY <query>`); `-` reads it from standard input.
    pub sql: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
    /// An Arrow IPC stream (binary).
    Arrow,
}

pub async fn query(args: QueryArgs) -> Result<()> {
    let sql = if args.sql == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading SQL from standard input")?
    } else {
        args.sql.clone()
    };
    let mut conn = args.conn.connect().await?;
    if let Some(purpose) = &args.purpose {
        conn.set_purpose(purpose)?;
    }
    if let Some(epsilon) = args.epsilon {
        conn.set_epsilon(epsilon);
    }
    if let Some(token) = &args.token {
        conn.set_header("authorization", &format!("Bearer {}", token.trim()))?;
    }
    if args.allow_partial {
        conn.set_header(sluice_proto::wire::header::ALLOW_PARTIAL, "true")?;
    }
    let (schema, batches) = conn.query_stream(&sql).await?;
    report_federation(&schema);
    let mut batches = std::pin::pin!(batches);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.format {
        OutputFormat::Table => {
            let all: Vec<RecordBatch> = batches.try_collect().await?;
            let rows: usize = all.iter().map(RecordBatch::num_rows).sum();
            if all.is_empty() {
                let empty = RecordBatch::new_empty(schema);
                writeln!(
                    out,
                    "{}",
                    datafusion::arrow::util::pretty::pretty_format_batches(&[empty])?
                )?;
            } else {
                writeln!(
                    out,
                    "{}",
                    datafusion::arrow::util::pretty::pretty_format_batches(&all)?
                )?;
            }
            writeln!(out, "{rows} row(s)")?;
            report_bias(all.first().map(|b| b.schema()));
        }
        OutputFormat::Csv => {
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            let mut first = None;
            while let Some(batch) = batches.try_next().await? {
                writer.write(&batch)?;
                first.get_or_insert_with(|| batch.schema());
            }
            if first.is_none() {
                writer.write(&RecordBatch::new_empty(schema))?;
            }
            report_bias(first);
        }
        OutputFormat::Json => {
            let mut writer = datafusion::arrow::json::ArrayWriter::new(&mut out);
            let mut first = None;
            while let Some(batch) = batches.try_next().await? {
                writer.write(&batch)?;
                first.get_or_insert_with(|| batch.schema());
            }
            report_bias(first);
            writer.finish()?;
            drop(writer);
            writeln!(out)?;
        }
        OutputFormat::Arrow => {
            let mut writer =
                datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
            while let Some(batch) = batches.try_next().await? {
                writer.write(&batch)?;
            }
            writer.finish()?;
        }
    }
    drop(out);
    report_receipts(conn.receipts(), args.receipt_out.as_deref())
}

/// For a differentially private answer (`schema` is its first batch's):
/// the bounds it chose from the data (if any were `auto`) and how much of
/// the data its bounds left out (DP estimates the answer carries), on
/// standard error, whatever the output format.
fn report_bias(schema: Option<datafusion::arrow::datatypes::SchemaRef>) {
    use sluice_proto::wire::dp::{AUTO_BOUNDS, BIAS};
    let Some(schema) = schema else {
        return;
    };
    for (key, label) in [(AUTO_BOUNDS, "bounds"), (BIAS, "bias")] {
        if let Some(sentence) = schema.metadata().get(key) {
            eprintln!("{label}: {sentence}");
        }
    }
}

/// For a broker's answer: which providers contributed (with their receipts
/// and ε) and which are missing, on standard error.
fn report_federation(schema: &datafusion::arrow::datatypes::Schema) {
    use sluice_proto::wire::federation::{MISSING, PROVIDERS};
    let list = |key: &str| -> Vec<serde_json::Value> {
        schema
            .metadata()
            .get(key)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default()
    };
    for p in list(PROVIDERS) {
        let receipt = p["receipt"]
            .as_str()
            .and_then(|r| sluice::audit::Receipt::from_header(r).ok())
            .map(|r| r.receipt_id)
            .unwrap_or_else(|| "-".into());
        let epsilon = p["epsilon"]
            .as_f64()
            .map(|e| format!(", ε {e}"))
            .unwrap_or_default();
        eprintln!(
            "provider {}: {} rows, receipt {receipt}{epsilon}",
            p["provider"].as_str().unwrap_or("?"),
            p["rows"]
        );
    }
    for m in list(MISSING) {
        eprintln!(
            "provider {} MISSING from this result ({}): {}",
            m["provider"].as_str().unwrap_or("?"),
            m["code"].as_str().unwrap_or("?"),
            m["message"].as_str().unwrap_or("")
        );
    }
}

/// Names the audit receipt of each result on standard error, and keeps the
/// last one in `path` when asked.
fn report_receipts(receipts: &[String], path: Option<&Path>) -> Result<()> {
    for receipt in receipts {
        match sluice::audit::Receipt::from_header(receipt) {
            Ok(r) => eprintln!("audit receipt {} (record {})", r.receipt_id, r.seq),
            Err(_) => eprintln!("audit receipt (unreadable): {receipt}"),
        }
    }
    if let Some(path) = path {
        let Some(last) = receipts.last() else {
            bail!(
                "the connector sent no audit receipt to write to {}",
                path.display()
            );
        };
        std::fs::write(path, format!("{last}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
