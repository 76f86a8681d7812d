//! The console's pages, one module per area. Handlers read as: who (the
//! [`User`](super::User) or [`Admin`](super::Admin) extractor), what (the
//! same gRPC operation a CLI would call, [`super::calls`]), and the HTML.

pub mod agreements;
pub mod audit;
pub mod budgets;
pub mod consumer;
pub mod datasets;
pub mod home;
pub mod login;
pub mod workbench;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use super::html;

/// 303 to `location`, optionally setting a cookie.
pub fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut response = html::respond(
        StatusCode::SEE_OTHER,
        html::page(
            "Moved",
            None,
            &format!("<p><a href=\"{0}\">{0}</a></p>", html::esc(location)),
        ),
    );
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, value);
    }
    if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// An RFC 3339 time as the pages show it: to the second, in UTC.
pub fn short_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}
