//! The SQL workbench: a query runs through the Flight SQL service exactly
//! as a client's would (policy, DP noise, budget, quotas, audit), and its
//! answer comes back as a table and, for grouped aggregates, as a bar
//! chart with each noisy value's 95% interval drawn.

use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use datafusion::arrow::array::{Array, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::arrow::util::display::array_value_to_string;
use serde::Deserialize;

use crate::console::calls::{self, Answer, Room};
use crate::console::chart::{self, Bar, number};
use crate::console::error::error_paragraph;
use crate::console::html::{csrf_field, esc, table, td};
use crate::console::{Console, ConsoleError, User};

/// What the workbench reads of an answer at most; the rest is not read
/// (its completion record says so). A Flight client streams an answer;
/// the console holds it to draw it, so it holds little.
const ROOM: Room = Room {
    rows: 10_000,
    bytes: 4 << 20,
};
/// Characters of a value shown; longer ones are cut (the table is for
/// reading, not for moving data).
const MAX_CELL: usize = 200;
/// Values and HTML bytes one answer's table holds at most.
const MAX_CELLS: usize = 100_000;
const MAX_TABLE_BYTES: usize = 4 << 20;
/// Groups drawn at most; more make a chart no one reads.
const MAX_BARS: usize = 60;
/// The field metadata key of a noisy column's 95% half-width.
const CI95: &str = "sluice.dp.ci95_half_width";

const EXAMPLE: &str =
    "SELECT start_zone, count(*) AS trips FROM trips GROUP BY start_zone ORDER BY start_zone";

#[derive(Deserialize, Default)]
pub struct QueryForm {
    csrf: Option<String>,
    #[serde(default)]
    sql: String,
    #[serde(default)]
    purpose: String,
}

pub async fn page(user: User) -> Response {
    let body = form(&user, EXAMPLE, "");
    user.page("Workbench", &body)
}

fn form(user: &User, sql: &str, purpose: &str) -> String {
    format!(
        "<form id=\"query\" method=\"post\" action=\"/workbench\">{csrf}\
         <label>SQL<br><textarea name=\"sql\" rows=\"5\" cols=\"100\">{sql}</textarea></label><br>\
         <label>Purpose <input name=\"purpose\" value=\"{purpose}\" placeholder=\"research\"></label> \
         <button type=\"submit\" id=\"run\">Run</button></form>\
         <p class=\"note\">The query runs as <strong>{who}</strong>, under the same policy, budget and quotas as from any Flight SQL client, and is audited.</p>",
        csrf = csrf_field(&user.session.csrf),
        sql = esc(sql),
        purpose = esc(purpose),
        who = esc(&user.principal().id),
    )
}

pub async fn run(
    State(console): State<Arc<Console>>,
    user: User,
    headers: HeaderMap,
    Form(ask): Form<QueryForm>,
) -> Result<Response, ConsoleError> {
    user.check_form(&headers, ask.csrf.as_deref())?;
    let purpose = Some(ask.purpose.as_str());
    let Some(_running) = console.workbench.begin(&user.principal().id) else {
        return Err(ConsoleError::Status(tonic::Status::resource_exhausted(
            "your previous workbench query is still running; wait for it to finish",
        )));
    };
    let answer = calls::query(&console, &user.session, &ask.sql, purpose, ROOM).await;
    let result = match answer {
        Ok(answer) => render(&answer),
        Err(status) => error_paragraph(status.message()),
    };
    let body = format!("{}{result}", form(&user, &ask.sql, &ask.purpose));
    Ok(user.page("Workbench", &body))
}

fn render(answer: &Answer) -> String {
    let headers: Vec<&str> = answer
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let (rows, shown) = table_rows(answer);
    let truncated = match answer.truncated || shown < answer.rows {
        true => format!(
            "<p class=\"note\">Showing the first {shown} rows; the rest was not read or not shown (the workbench holds at most {} rows, {} MiB of an answer and {MAX_CELLS} values; use a Flight SQL client for more).</p>",
            ROOM.rows,
            ROOM.bytes >> 20
        ),
        false => format!("<p class=\"note\">{} rows.</p>", answer.rows),
    };
    format!(
        "<h2>Answer</h2>{chart}{privacy}{truncated}{table}",
        chart = grouped_chart(answer).unwrap_or_default(),
        privacy = privacy_notes(answer),
        table = table("result", &headers, &rows),
    )
}

/// The answer's rows as table rows, until [`MAX_CELLS`] values or
/// [`MAX_TABLE_BYTES`] of HTML: the Arrow size of an answer says little
/// about its page (a NULL or a boolean is a bit in Arrow, a cell on the
/// page). How many rows that is.
fn table_rows(answer: &Answer) -> (Vec<String>, usize) {
    let columns = answer.schema.fields().len().max(1);
    let max_rows = (MAX_CELLS / columns).max(1);
    let (mut rows, mut bytes) = (Vec::new(), 0usize);
    'batches: for batch in &answer.batches {
        for row in 0..batch.num_rows() {
            if rows.len() >= max_rows || bytes >= MAX_TABLE_BYTES {
                break 'batches;
            }
            let cells: String = batch
                .columns()
                .iter()
                .map(|column| td(&cell(column, row)))
                .collect();
            bytes += cells.len();
            rows.push(format!("<tr>{cells}</tr>"));
        }
    }
    let shown = rows.len();
    (rows, shown)
}

/// A value as text, cut at [`MAX_CELL`] characters.
fn cell(column: &dyn Array, row: usize) -> String {
    let text = array_value_to_string(column, row).unwrap_or_default();
    match text.char_indices().nth(MAX_CELL) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// A bar per group when the answer is a grouped aggregate: a label column
/// and a numeric one (the first noisy one, else the first numeric).
fn grouped_chart(answer: &Answer) -> Option<String> {
    let fields = answer.schema.fields();
    let numeric = |f: &Field| f.data_type().is_numeric();
    let label = fields.iter().position(|f| !numeric(f))?;
    let value = fields
        .iter()
        .position(|f| numeric(f) && f.metadata().contains_key(CI95))
        .or_else(|| fields.iter().position(|f| numeric(f)))?;
    let half_width = fields[value]
        .metadata()
        .get(CI95)
        .and_then(|h| h.parse::<f64>().ok());
    let mut bars = Vec::new();
    for batch in &answer.batches {
        let values = cast(batch.column(value), &DataType::Float64).ok()?;
        let values = values.as_any().downcast_ref::<Float64Array>()?;
        for row in 0..batch.num_rows() {
            if values.is_null(row) {
                continue;
            }
            bars.push(Bar {
                label: cell(batch.column(label), row),
                value: values.value(row),
                half_width,
            });
        }
    }
    if bars.is_empty() || bars.len() > MAX_BARS {
        return None;
    }
    let title = format!("{} by {}", fields[value].name(), fields[label].name());
    let note = match half_width {
        Some(h) => format!(
            "<p id=\"interval-note\" class=\"note\">Error bars: the DP 95% interval, ± {} ({CI95}). 95% of answers fall within it of the bounded, clamped true value; the bias of the bounds is not in it (below).</p>",
            number(h)
        ),
        None => "<p class=\"note\">This column carries no noise interval.</p>".to_string(),
    };
    Some(format!(
        "<figure>{}<figcaption>{}</figcaption></figure>{note}",
        chart::bars("chart", &title, &bars),
        esc(&title)
    ))
}

/// The DP facts the answer carries: schema metadata, and per column its
/// mechanism, ε and interval.
fn privacy_notes(answer: &Answer) -> String {
    let schema_notes: Vec<String> = answer
        .schema
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("sluice."))
        .map(|(k, v)| format!("<tr>{}{}</tr>", td(k), td(v)))
        .collect();
    let column_notes: Vec<String> = answer
        .schema
        .fields()
        .iter()
        .flat_map(|f| {
            f.metadata()
                .iter()
                .filter(|(k, _)| k.starts_with("sluice.dp."))
                .map(move |(k, v)| format!("<tr>{}{}{}</tr>", td(f.name()), td(k), td(v)))
        })
        .collect();
    if schema_notes.is_empty() && column_notes.is_empty() {
        return String::new();
    }
    format!(
        "<details id=\"privacy\"><summary>Differential privacy of this answer</summary>{}{}</details>",
        table("answer-metadata", &["key", "value"], &schema_notes),
        table(
            "column-metadata",
            &["column", "key", "value"],
            &column_notes
        ),
    )
}
