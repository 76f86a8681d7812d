//! `sluice budget`: your organization's differential-privacy budget.

use anyhow::Result;
use clap::Args;

use super::conn::ConnArgs;

#[derive(Args)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Only this dataset.
    #[arg(long)]
    pub dataset: Option<String>,
}

pub async fn budget(args: BudgetArgs) -> Result<()> {
    use sluice_proto::v1::GetBudgetRequest;
    use sluice_proto::v1::budget_service_client::BudgetServiceClient;
    let conn = args.conn.connect().await?;
    let mut client = BudgetServiceClient::new(conn.channel());
    let response = client
        .get_budget(GetBudgetRequest {
            dataset: args.dataset.unwrap_or_default(),
        })
        .await
        .map_err(sluice::client::status_error)?
        .into_inner();
    println!("privacy budget of {}", response.organization);
    if response.budgets.is_empty() {
        println!("no differentially private queries charged yet");
    }
    for line in &response.budgets {
        let limit = if line.unlimited {
            "no limit".to_string()
        } else {
            format!(
                "{} ε, {} δ",
                line.epsilon_limit,
                delta_text(line.delta_limit)
            )
        };
        println!(
            "  {} ({}): spent {} ε and {} δ{} in {} queries (of which {} ε reserved); remaining {}; limit {limit}",
            line.dataset,
            line.period,
            round9(line.epsilon_spent),
            delta_text(line.delta_spent),
            if line.rho_spent > 0.0 {
                format!(" (with ρ {} in zCDP)", line.rho_spent)
            } else {
                String::new()
            },
            line.queries,
            round9(line.epsilon_reserved),
            if line.unlimited {
                "unlimited".to_string()
            } else {
                format!(
                    "{} ε, {:e} δ",
                    round9(line.epsilon_remaining),
                    line.delta_remaining
                )
            },
        );
    }
    Ok(())
}

fn delta_text(delta: f64) -> String {
    if delta == 0.0 {
        "0".into()
    } else {
        format!("{delta:e}")
    }
}

fn round9(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}
