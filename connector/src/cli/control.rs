//! CLI commands for the control plane: `catalog`, `agreements`, `admin`,
//! `receipt` and `audit`. The online ones are gRPC clients of
//! `proto/sluice/v1`; `audit verify`, `audit export` and `receipt verify`
//! work offline, with files and a public key only.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use sluice_proto::v1 as pb;
use sluice_proto::v1::agreement_service_client::AgreementServiceClient;
use sluice_proto::v1::audit_service_client::AuditServiceClient;
use sluice_proto::v1::catalog_service_client::CatalogServiceClient;

use super::conn::ConnArgs;
use sluice::client::status_error;
use sluice::config;
use sluice_audit::{self as log, Receipt, SignedRecord, key_id_of, read_public_key};

#[derive(Args)]
pub struct CatalogArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Show one dataset in full: columns as you may use them, and offers.
    dataset: Option<String>,
    /// Only datasets whose name, title, description or keywords contain this.
    #[arg(long)]
    keyword: Option<String>,
    /// Only datasets of this classification (general, important, core).
    #[arg(long)]
    classification: Option<String>,
    /// Only datasets whose publisher contains this.
    #[arg(long)]
    publisher: Option<String>,
}

#[derive(Subcommand)]
pub enum AgreementsCommand {
    /// Request an agreement for an offer (see `sluice catalog DATASET`).
    Request {
        #[command(flatten)]
        conn: ConnArgs,
        /// The offer id, e.g. `trips/city-research`.
        offer: String,
        /// What the data will be used for (one of the offer's purposes).
        #[arg(long, short = 'p')]
        purpose: String,
    },
    /// Your organization's agreements (all, for a provider admin).
    List(ListArgs),
    /// One agreement.
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        id: String,
    },
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Only agreements in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StateArg {
    Pending,
    Active,
    Rejected,
    Revoked,
    Expired,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Decide agreement requests (needs an identity listed under `admins:`).
    #[command(subcommand)]
    Agreements(AdminAgreements),
}

#[derive(Subcommand)]
pub enum AdminAgreements {
    /// All agreements (`--state pending` for requests waiting for you).
    List(ListArgs),
    /// Approve a pending request.
    Approve(DecideArgs),
    /// Reject a pending request.
    Reject(DecideArgs),
    /// End an active agreement; tickets already issued under it stop working.
    Revoke(DecideArgs),
}

#[derive(Args)]
pub struct DecideArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The agreement id, e.g. `agr-5f2c9e0d41a7b3c8`.
    id: String,
    /// Recorded with the agreement and in the audit log.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Subcommand)]
pub enum ReceiptCommand {
    /// Your organization's audit records, oldest first.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only records of this event: decision, release, completion, agreement.
        #[arg(long)]
        event: Option<String>,
    },
    /// One audit record with its hash and signature, as a JSON line that
    /// `sluice receipt verify` checks.
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        receipt_id: String,
    },
    /// Check a receipt (the JSON of the `x-sluice-receipt` header, e.g. from
    /// `sluice query --receipt-out`) or a signed record (`sluice receipt get`,
    /// a line of `sluice audit export`) against the provider's public key.
    Verify {
        /// File holding the receipt or record; `-` reads standard input.
        file: PathBuf,
        /// The provider's public key (PEM), obtained from the provider out
        /// of band (`sluice audit head --public-key-out` shows what it serves).
        #[arg(long)]
        public_key: PathBuf,
        /// A signed record to check the receipt against: same id, same hash.
        #[arg(long)]
        record: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole chain and every signature, offline; reports the first
    /// bad record.
    Verify {
        #[command(flatten)]
        files: LogFiles,
        /// Start at this record (its `prev_hash` is trusted as the anchor).
        #[arg(long)]
        from: Option<u64>,
        /// A head published earlier (the hash `audit verify` or `audit head`
        /// printed): it must still be in the log, or records were removed or
        /// rewritten since.
        #[arg(long)]
        head: Option<String>,
    },
    /// Print the records as JSON lines (each with hash and signature).
    Export {
        #[command(flatten)]
        files: LogFiles,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Start at this record.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// The newest record's hash and the public key the connector signs with.
    Head {
        #[command(flatten)]
        conn: ConnArgs,
        /// Write the served public key (PEM) here.
        #[arg(long)]
        public_key_out: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct LogFiles {
    /// State directory holding `audit/audit.jsonl` and `audit/public-key.pem`.
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The log file (default: <state-dir>/audit/audit.jsonl).
    #[arg(long)]
    log: Option<PathBuf>,
    /// The public key (default: <state-dir>/audit/public-key.pem).
    #[arg(long)]
    public_key: Option<PathBuf>,
}

impl DecideArgs {
    fn request(self) -> pb::DecideAgreementRequest {
        pb::DecideAgreementRequest {
            id: self.id,
            reason: self.reason,
        }
    }
}

impl LogFiles {
    fn log(&self) -> PathBuf {
        self.log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit").join("audit.jsonl"))
    }

    fn public_key(&self) -> PathBuf {
        self.public_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit").join("public-key.pem"))
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// One signed record per line.
    Jsonl,
}

pub async fn catalog(args: CatalogArgs) -> Result<()> {
    let conn = args.conn.connect().await?;
    let mut client = CatalogServiceClient::new(conn.channel());
    if let Some(name) = args.dataset {
        let dataset = client
            .get_dataset(pb::GetDatasetRequest { name })
            .await
            .map_err(status_error)?
            .into_inner();
        print_dataset(&dataset);
        return Ok(());
    }
    let mut token = String::new();
    loop {
        let page = client
            .list_datasets(pb::ListDatasetsRequest {
                page_size: 100,
                page_token: token,
                keyword: args.keyword.clone().unwrap_or_default(),
                classification: args.classification.clone().unwrap_or_default(),
                publisher: args.publisher.clone().unwrap_or_default(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for d in &page.datasets {
            let modes: Vec<String> = d.offers.iter().map(|o| o.mode.clone()).collect();
            println!(
                "{:<16} {:<10} {:<40} offers: {}",
                d.name,
                d.classification,
                d.title,
                modes.join(", ")
            );
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        token = page.next_page_token;
    }
}

fn print_dataset(d: &pb::Dataset) {
    println!("{} ({}): {}", d.name, d.classification, d.title);
    if !d.description.is_empty() {
        println!("  {}", d.description);
    }
    println!("  publisher: {}  license: {}", d.publisher, d.license);
    println!(
        "  keywords:  {}  modified: {}",
        d.keywords.join(", "),
        d.modified
    );
    println!("  columns:");
    for c in &d.columns {
        let how = match c.mask.is_empty() {
            true => c.visibility.clone(),
            false => format!("masked ({})", c.mask),
        };
        let bounds = match c.dp_bounds.as_slice() {
            _ if c.dp_bounds_auto => "  bounds auto (chosen by each query)".to_string(),
            [lo, hi] => format!("  bounds [{lo}, {hi}]"),
            _ => String::new(),
        };
        println!("    {:<16} {:<24} {how}{bounds}", c.name, c.data_type);
    }
    for o in &d.offers {
        println!("  offer {} ({}):", o.id, o.mode);
        if !o.purposes.is_empty() {
            println!("    purposes: {}", o.purposes.join(", "));
        }
        if o.min_group_size > 0 {
            println!("    groups of at least {} privacy units", o.min_group_size);
        }
        if let Some(dp) = &o.dp {
            println!(
                "    differential privacy: ε from {} to {} per query (default {}), budget {} ε per {}, {} noise",
                dp.min_epsilon_per_query,
                dp.epsilon_per_query,
                dp.default_epsilon,
                dp.budget_epsilon,
                dp.budget_period,
                dp.noise
            );
            if !d.privacy_unit.is_empty() {
                println!(
                    "    privacy unit: {} (count people with COUNT(DISTINCT {}))",
                    d.privacy_unit, d.privacy_unit
                );
            }
        }
        let agreement = match o.agreement.as_str() {
            "none" => "not needed".to_string(),
            approval => format!(
                "{approval} approval: sluice agreements request {} --purpose …",
                o.id
            ),
        };
        println!("    agreement: {agreement}");
        if !o.valid_until.is_empty() {
            println!("    valid until {}", o.valid_until);
        }
        if !o.guarantee.is_empty() {
            println!("    guarantee: {}", o.guarantee);
        }
    }
}

pub async fn agreements(command: AgreementsCommand) -> Result<()> {
    match command {
        AgreementsCommand::Request {
            conn,
            offer,
            purpose,
        } => {
            let mut client = agreement_client(&conn).await?;
            let a = client
                .request_agreement(pb::RequestAgreementRequest {
                    offer_id: offer,
                    purpose,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_agreement(&a);
        }
        AgreementsCommand::List(args) => list_agreements(args).await?,
        AgreementsCommand::Get { conn, id } => {
            let mut client = agreement_client(&conn).await?;
            let a = client
                .get_agreement(pb::GetAgreementRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_agreement(&a);
        }
    }
    Ok(())
}

pub async fn admin(command: AdminCommand) -> Result<()> {
    let AdminCommand::Agreements(command) = command;
    let decided = match command {
        AdminAgreements::List(args) => return list_agreements(args).await,
        AdminAgreements::Approve(args) => {
            let mut client = agreement_client(&args.conn).await?;
            client.approve_agreement(args.request()).await
        }
        AdminAgreements::Reject(args) => {
            let mut client = agreement_client(&args.conn).await?;
            client.reject_agreement(args.request()).await
        }
        AdminAgreements::Revoke(args) => {
            let mut client = agreement_client(&args.conn).await?;
            client.revoke_agreement(args.request()).await
        }
    }
    .map_err(status_error)?
    .into_inner();
    print_agreement(&decided);
    Ok(())
}

async fn list_agreements(args: ListArgs) -> Result<()> {
    let mut client = agreement_client(&args.conn).await?;
    let state = match args.state {
        None => pb::AgreementState::Unspecified,
        Some(StateArg::Pending) => pb::AgreementState::Pending,
        Some(StateArg::Active) => pb::AgreementState::Active,
        Some(StateArg::Rejected) => pb::AgreementState::Rejected,
        Some(StateArg::Revoked) => pb::AgreementState::Revoked,
        Some(StateArg::Expired) => pb::AgreementState::Expired,
    };
    let list = client
        .list_agreements(pb::ListAgreementsRequest {
            state: state as i32,
            offer_id: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for a in &list.agreements {
        println!(
            "{:<22} {:<9} {:<26} {:<28} {}",
            a.id,
            state_name(a.state),
            a.offer_id,
            a.organization,
            a.purpose
        );
    }
    if list.agreements.is_empty() {
        println!("no agreements");
    }
    Ok(())
}

async fn agreement_client(
    conn: &ConnArgs,
) -> Result<AgreementServiceClient<tonic::transport::Channel>> {
    Ok(AgreementServiceClient::new(conn.connect().await?.channel()))
}

fn state_name(state: i32) -> &'static str {
    match pb::AgreementState::try_from(state) {
        Ok(pb::AgreementState::Pending) => "pending",
        Ok(pb::AgreementState::Active) => "active",
        Ok(pb::AgreementState::Rejected) => "rejected",
        Ok(pb::AgreementState::Revoked) => "revoked",
        Ok(pb::AgreementState::Expired) => "expired",
        _ => "unknown",
    }
}

fn print_agreement(a: &pb::Agreement) {
    println!("agreement {}: {}", a.id, state_name(a.state));
    println!("  offer:        {} (dataset {})", a.offer_id, a.dataset);
    println!(
        "  organization: {} (requested by {})",
        a.organization, a.requested_by
    );
    println!("  purpose:      {}", a.purpose);
    println!("  requested:    {}", a.requested_at);
    if !a.decided_at.is_empty() {
        println!("  decided:      {} by {}", a.decided_at, a.decided_by);
    }
    if !a.expires_at.is_empty() {
        println!("  expires:      {}", a.expires_at);
    }
    if !a.reason.is_empty() {
        println!("  reason:       {}", a.reason);
    }
}

pub async fn receipt(command: ReceiptCommand) -> Result<()> {
    match command {
        ReceiptCommand::List { conn, event } => {
            let mut client = AuditServiceClient::new(conn.connect().await?.channel());
            let mut token = String::new();
            loop {
                let page = client
                    .list_receipts(pb::ListReceiptsRequest {
                        page_size: 1000,
                        page_token: token,
                        event: event.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for r in &page.records {
                    println!(
                        "{:<20} {} {:<10} {:<9} {:<20} {}",
                        r.receipt_id,
                        r.time,
                        r.event,
                        r.outcome,
                        r.datasets.join(","),
                        r.rule
                    );
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                token = page.next_page_token;
            }
        }
        ReceiptCommand::Get { conn, receipt_id } => {
            let mut client = AuditServiceClient::new(conn.connect().await?.channel());
            let r = client
                .get_receipt(pb::GetReceiptRequest { receipt_id })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", signed_record_json(&r)?);
            Ok(())
        }
        ReceiptCommand::Verify {
            file,
            public_key,
            record,
        } => verify_receipt(&file, &public_key, record.as_deref()),
    }
}

/// The AuditService message back in the log's own line format.
fn signed_record_json(r: &pb::AuditRecord) -> Result<String> {
    let signed = SignedRecord {
        record: serde_json::from_str(&r.record_json)
            .context("the server sent a record that is not valid JSON")?,
        hash: r.hash.clone(),
        key_id: r.key_id.clone(),
        signature: r.signature.clone(),
    };
    Ok(serde_json::to_string(&signed)?)
}

fn read_text(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        return std::io::read_to_string(std::io::stdin()).context("reading standard input");
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn verify_receipt(file: &Path, public_key: &Path, record: Option<&Path>) -> Result<()> {
    let key = read_public_key(public_key)?;
    let text = read_text(file)?;
    let text = text.trim();
    let receipt = match serde_json::from_str::<SignedRecord>(text) {
        Ok(signed) => {
            log::verify_record(&signed, &key)
                .map_err(|why| anyhow::anyhow!("record {}: {why}", signed.record.receipt_id))?;
            signed.receipt()
        }
        Err(_) => Receipt::from_header(text).with_context(|| {
            format!(
                "{} holds neither a receipt nor a signed audit record",
                file.display()
            )
        })?,
    };
    log::verify_receipt(&receipt, &key)
        .map_err(|why| anyhow::anyhow!("receipt {}: {why}", receipt.receipt_id))?;
    if let Some(path) = record {
        let signed: SignedRecord = serde_json::from_str(read_text(path)?.trim())
            .with_context(|| format!("{} is not a signed audit record", path.display()))?;
        log::verify_record(&signed, &key)
            .map_err(|why| anyhow::anyhow!("record {}: {why}", signed.record.receipt_id))?;
        if !log::receipt_matches(&receipt, &signed) {
            bail!(
                "record {} is not the one receipt {} was issued for (id or hash differ)",
                signed.record.receipt_id,
                receipt.receipt_id
            );
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

pub async fn audit(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { files, from, head } => {
            let key = read_public_key(&files.public_key())?;
            let report = log::verify_file(&files.log(), &key, from)?;
            println!("{report}");
            if report.problem.is_some() {
                bail!("the audit log does not verify");
            }
            if let Some(head) = head {
                let seq = find_hash(&files.log(), head.trim())?.with_context(|| {
                    format!(
                        "the published head {head} is not in the log: records were removed or rewritten after it"
                    )
                })?;
                println!("published head {head} is record {seq}");
            }
            Ok(())
        }
        AuditCommand::Export {
            files,
            format: ExportFormat::Jsonl,
            from,
        } => export(&files.log(), from),
        AuditCommand::Head {
            conn,
            public_key_out,
        } => {
            let mut client = AuditServiceClient::new(conn.connect().await?.channel());
            let head = client
                .get_chain_head(pb::GetChainHeadRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("records:  {}", head.records);
            println!("head:     {}", head.hash);
            println!("time:     {}", head.time);
            println!("key:      {}", head.key_id);
            if let Some(path) = public_key_out {
                std::fs::write(&path, &head.public_key_pem)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("public key written to {}", path.display());
            }
            Ok(())
        }
    }
}

/// The seq of the record whose hash is `hash`, if any (the log was verified).
fn find_hash(path: &Path, hash: &str) -> Result<Option<u64>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let signed: SignedRecord = serde_json::from_str(&line)
            .with_context(|| format!("{} holds a line that is not a record", path.display()))?;
        if signed.hash == hash {
            return Ok(Some(signed.record.seq));
        }
    }
    Ok(None)
}

/// Copies the log's lines from record `from` on: the file already is JSON
/// Lines of signed records.
fn export(path: &Path, from: u64) -> Result<()> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if (index as u64) < from {
            continue;
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}
