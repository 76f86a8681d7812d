//! Offline verification of a Sluice audit log or receipt, with nothing but
//! this crate and the connector's public key.
//!
//! ```text
//! sluice-audit-verify <audit-dir> [--from SEQ]
//! sluice-audit-verify --receipt <receipt-file> --public-key <pem> [--record <record.json>]
//! ```
//!
//! The first form checks `<audit-dir>/audit.jsonl` against
//! `<audit-dir>/public-key.pem` and prints the report (as
//! `sluice audit verify` does). The second checks a receipt, given as the
//! receipt header's JSON or as a whole signed record (`-` reads standard
//! input), and with `--record` that the record is the one it was issued for
//! (as `sluice receipt verify` does).
//!
//! Exit status: 0 when everything verifies, 1 when something does not (or
//! cannot be read), 2 for a usage error.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sluice_audit::{
    LOG_FILE, PUBLIC_KEY_FILE, Receipt, SignedRecord, key_id_of, read_public_key, receipt_matches,
    verify_file, verify_receipt, verify_record,
};

const USAGE: &str = "\
usage: sluice-audit-verify <audit-dir> [--from SEQ]
       sluice-audit-verify --receipt <receipt-file> --public-key <pem> [--record <record.json>]

  <audit-dir>           directory holding audit.jsonl and public-key.pem
  --from SEQ            check records from SEQ on, trusting its prev_hash
  --receipt FILE        a receipt (the x-sluice-receipt JSON) or a signed record; - for stdin
  --public-key PEM      the connector's public key (PEM or 64 hex characters)
  --record FILE         the signed record the receipt must have been issued for";

/// What the command was asked to do.
enum Command {
    Help,
    Log {
        dir: PathBuf,
        from: Option<u64>,
    },
    Receipt {
        file: PathBuf,
        public_key: PathBuf,
        record: Option<PathBuf>,
    },
}

/// Why the command failed.
enum Failure {
    /// The arguments are wrong (exit 2).
    Usage(String),
    /// Something does not verify or cannot be read (exit 1).
    Failed(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(message) | Failure::Failed(message) => f.write_str(message),
        }
    }
}

fn failed(message: impl fmt::Display) -> Failure {
    Failure::Failed(message.to_string())
}

fn main() -> ExitCode {
    let outcome = parse(std::env::args_os().skip(1)).and_then(|command| match command {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::Log { dir, from } => verify_log(&dir, from),
        Command::Receipt {
            file,
            public_key,
            record,
        } => verify_receipt_file(&file, &public_key, record.as_deref()),
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::FAILURE
        }
    }
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Command, Failure> {
    let (mut dir, mut from, mut receipt, mut public_key, mut record) =
        (None, None, None, None, None);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.into())),
            _ => (text.clone(), None),
        };
        let mut value = |name: &str| -> Result<OsString, Failure> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| Failure::Usage(format!("{name} needs a value")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--from" => {
                let text = value("--from")?;
                let text = text.to_string_lossy();
                let seq = text.parse::<u64>().map_err(|_| {
                    Failure::Usage(format!("--from needs a record number, not {text:?}"))
                })?;
                from = Some(seq);
            }
            "--receipt" => receipt = Some(PathBuf::from(value("--receipt")?)),
            "--public-key" => public_key = Some(PathBuf::from(value("--public-key")?)),
            "--record" => record = Some(PathBuf::from(value("--record")?)),
            _ if flag.starts_with("--") => {
                return Err(Failure::Usage(format!("unknown option {flag}")));
            }
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => return Err(Failure::Usage(format!("unexpected argument {text:?}"))),
        }
    }
    match (dir, receipt, public_key) {
        (Some(dir), None, None) if record.is_none() => Ok(Command::Log { dir, from }),
        (None, Some(file), Some(public_key)) if from.is_none() => Ok(Command::Receipt {
            file,
            public_key,
            record,
        }),
        (None, Some(_), None) => Err(Failure::Usage("--receipt needs --public-key".into())),
        (None, None, _) => Err(Failure::Usage(
            "give an audit directory, or --receipt and --public-key".into(),
        )),
        _ => Err(Failure::Usage(
            "verify either an audit directory (with --from) or a receipt (with --public-key and \
             --record), not both"
                .into(),
        )),
    }
}

/// `sluice audit verify --state-dir …`, with the audit directory itself.
fn verify_log(dir: &Path, from: Option<u64>) -> Result<(), Failure> {
    let key = read_public_key(&dir.join(PUBLIC_KEY_FILE)).map_err(failed)?;
    let report = verify_file(&dir.join(LOG_FILE), &key, from).map_err(failed)?;
    println!("{report}");
    if report.problem.is_some() {
        return Err(failed("the audit log does not verify"));
    }
    Ok(())
}

/// `sluice receipt verify`: the same checks and messages.
fn verify_receipt_file(
    file: &Path,
    public_key: &Path,
    record: Option<&Path>,
) -> Result<(), Failure> {
    let key = read_public_key(public_key).map_err(failed)?;
    let text = read_text(file)?;
    let text = text.trim();
    let receipt = match serde_json::from_str::<SignedRecord>(text) {
        Ok(signed) => {
            verify_record(&signed, &key)
                .map_err(|why| failed(format!("record {}: {why}", signed.record.receipt_id)))?;
            signed.receipt()
        }
        Err(_) => Receipt::from_header(text).map_err(|e| {
            failed(format!(
                "{} holds neither a receipt nor a signed audit record: {e}",
                file.display()
            ))
        })?,
    };
    verify_receipt(&receipt, &key)
        .map_err(|why| failed(format!("receipt {}: {why}", receipt.receipt_id)))?;
    if let Some(path) = record {
        let signed: SignedRecord = serde_json::from_str(read_text(path)?.trim()).map_err(|e| {
            failed(format!(
                "{} is not a signed audit record: {e}",
                path.display()
            ))
        })?;
        verify_record(&signed, &key)
            .map_err(|why| failed(format!("record {}: {why}", signed.record.receipt_id)))?;
        if !receipt_matches(&receipt, &signed) {
            return Err(failed(format!(
                "record {} is not the one receipt {} was issued for (id or hash differ)",
                signed.record.receipt_id, receipt.receipt_id
            )));
        }
    }
    println!(
        "receipt {} (record {}) verifies: signed by {}",
        receipt.receipt_id,
        receipt.seq,
        key_id_of(&key)
    );
    Ok(())
}

/// A file's text, or standard input for `-`.
fn read_text(path: &Path) -> Result<String, Failure> {
    if path == Path::new("-") {
        return std::io::read_to_string(std::io::stdin())
            .map_err(|e| failed(format!("reading standard input: {e}")));
    }
    std::fs::read_to_string(path).map_err(|e| failed(format!("reading {}: {e}", path.display())))
}
