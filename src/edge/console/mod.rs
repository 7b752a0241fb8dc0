//! The console: a web page on the internal listener (`/console/`) where a
//! team sees and steers its tenant and an operator every tenant — signed
//! in with an admin key, which the page keeps in the tab's session storage
//! and sends as a header to the admin API (never a cookie: no other site
//! can make a request with it). Plain HTML, CSS and JavaScript modules,
//! served from the binary as they are written: no build step, nothing
//! loaded from another origin, and a Content-Security-Policy that allows
//! scripts and styles from this origin only.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

/// What the browser may load and call: this origin only, no inline script
/// or style, not framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The console's files: path under `/console/`, content type, content.
const FILES: &[(&str, &str, &str)] = &[
    ("", "text/html; charset=utf-8", include_str!("index.html")),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("console.css"),
    ),
];

/// `GET /console`: to the page, whose relative links need the slash.
pub(crate) async fn to_page() -> Redirect {
    Redirect::permanent("/console/")
}

/// `GET /console/` and `GET /console/{file}`.
pub(crate) async fn file(path: axum::http::Uri) -> Response {
    let name = path.path().strip_prefix("/console/").unwrap_or_default();
    let Some((_, content_type, body)) = FILES.iter().find(|(file, _, _)| *file == name) else {
        return (StatusCode::NOT_FOUND, "no such file in the console").into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
