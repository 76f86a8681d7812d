//! Server-rendered HTML: escaping, the page frame, and the headers every
//! response carries. Every value that did not come from this file goes
//! through [`esc`]; there is no script, and the Content-Security-Policy
//! would refuse one anyway.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Only this origin's stylesheet and forms; no script, no frames, no
/// plugins, no inline style. Charts are inline SVG with presentation
/// attributes, which the policy allows.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `text` safe inside HTML text and double-quoted attributes.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as a URL query or path component.
pub fn url_part(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Who the page is for: the navigation it shows.
pub struct Viewer<'a> {
    pub principal: &'a str,
    pub admin: bool,
    pub csrf: &'a str,
}

/// A whole page: the frame around `body`, with navigation for `viewer`
/// (none on the sign-in pages).
pub fn page(title: &str, viewer: Option<&Viewer>, body: &str) -> String {
    let nav = viewer.map(navigation).unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Sluice</title><link rel=\"stylesheet\" href=\"/static/console.css\"></head>\
         <body>{nav}<main><h1>{title}</h1>\n{body}\n</main></body></html>\n",
        title = esc(title),
    )
}

fn navigation(viewer: &Viewer) -> String {
    let mut links = vec![
        ("/", "Home"),
        ("/catalog", "Catalog"),
        ("/agreements", "My agreements"),
        ("/budget", "My budget"),
        ("/receipts", "My receipts"),
        ("/workbench", "Workbench"),
    ];
    if viewer.admin {
        links.extend([
            ("/admin/agreements", "Agreements"),
            ("/admin/audit", "Audit trail"),
            ("/admin/budgets", "Budgets"),
            ("/admin/datasets", "Datasets & policy"),
        ]);
    }
    let items: String = links
        .iter()
        .map(|(href, label)| format!("<a href=\"{href}\">{label}</a>"))
        .collect();
    format!(
        "<nav><span class=\"brand\">Sluice</span>{items}\
         <form method=\"post\" action=\"/logout\" class=\"logout\">{csrf}\
         <span id=\"signed-in-as\">{who}</span> <button type=\"submit\">Sign out</button></form></nav>",
        csrf = csrf_field(viewer.csrf),
        who = esc(viewer.principal),
    )
}

/// The hidden field every state-changing form carries.
pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

/// A table: header cells and rows of already-rendered cells.
pub fn table(id: &str, headers: &[&str], rows: &[String]) -> String {
    let head: String = headers
        .iter()
        .map(|h| format!("<th>{}</th>", esc(h)))
        .collect();
    let body = match rows.is_empty() {
        true => format!(
            "<tr class=\"empty\"><td colspan=\"{}\">none</td></tr>",
            headers.len()
        ),
        false => rows.concat(),
    };
    format!("<table id=\"{id}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
}

/// One cell with escaped text.
pub fn td(text: &str) -> String {
    format!("<td>{}</td>", esc(text))
}

/// A response with the console's headers: no caching, no sniffing, no
/// framing, no referrer to other sites (a sign-in link's path must not
/// travel on).
pub fn respond(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(headers);
    response
}

/// The headers every console response carries, HTML or not.
pub fn secure_headers(headers: &mut axum::http::HeaderMap) {
    let set = |headers: &mut axum::http::HeaderMap, name, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    // Nothing travels to other sites (a sign-in link's path included);
    // `no-referrer` would also make browsers send `Origin: null` on this
    // origin's own forms, which the origin check must then refuse.
    set(headers, header::REFERRER_POLICY, "same-origin");
    set(headers, header::CACHE_CONTROL, "no-store");
    set(
        headers,
        header::STRICT_TRANSPORT_SECURITY,
        "max-age=31536000",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            esc("<script>alert(\"x\")</script>&'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        let page = page("<b>", None, "");
        assert!(page.contains("<h1>&lt;b&gt;</h1>"));
    }

    #[test]
    fn url_parts_are_encoded() {
        assert_eq!(url_part("a b&c=/"), "a+b%26c%3D%2F");
    }
}
