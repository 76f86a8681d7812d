//! What a console request can fail with, and the one place it becomes an
//! HTTP response. Operations run through the gRPC services in process, so
//! most failures arrive as their `Status`, message included: the browser
//! reads the same words a gRPC client would.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::html::{esc, page, respond};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No live session: the browser goes to the sign-in page.
    #[error("sign in first")]
    SignIn,
    /// A sign-in link that is unknown, expired or spent (one answer for all).
    #[error(
        "this sign-in link is expired, already used or unknown. Ask for a new one: sluice console --identity <you>"
    )]
    LinkRefused,
    /// A state-changing request without the session's CSRF token, or sent
    /// from another site.
    #[error(
        "refused: the form's CSRF token is missing or wrong, or the request came from another site. Reload the page and submit it again"
    )]
    Csrf,
    /// An admin page for a principal that is not an admin.
    #[error(
        "only provider admins may open this page; `{0}` matches no entry under `admins:` in the usage policy"
    )]
    NotAdmin(String),
    /// A principal no rule of the usage policy admits.
    #[error(
        "`{0}` is not admitted by the connector's usage policy (no entry under `admins:` or `consumers:` matches it), so it cannot use the console"
    )]
    NotAdmitted(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A refusal or failure of the operation, as its gRPC service answered.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
}

impl ConsoleError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::SignIn => StatusCode::SEE_OTHER,
            ConsoleError::LinkRefused => StatusCode::UNAUTHORIZED,
            ConsoleError::Csrf | ConsoleError::NotAdmin(_) | ConsoleError::NotAdmitted(_) => {
                StatusCode::FORBIDDEN
            }
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Status(status) => http_status(status.code()),
        }
    }
}

/// The HTTP status for a gRPC code.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The paragraph that carries an error on any page (`#error`).
pub fn error_paragraph(message: &str) -> String {
    format!("<p id=\"error\" class=\"error\">{}</p>", esc(message))
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        if let ConsoleError::SignIn = self {
            let mut response = respond(
                StatusCode::SEE_OTHER,
                page("Sign in", None, "<p><a href=\"/login\">Sign in</a></p>"),
            );
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/login"));
            return response;
        }
        let status = self.status_code();
        let title = match status {
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::UNAUTHORIZED => "Not signed in",
            StatusCode::NOT_FOUND => "Not found",
            s if s.is_client_error() => "Refused",
            _ => "Something failed",
        };
        let body = format!(
            "{}<p><a href=\"/\">Back to the console</a></p>",
            error_paragraph(&self.to_string())
        );
        respond(status, page(title, None, &body))
    }
}
