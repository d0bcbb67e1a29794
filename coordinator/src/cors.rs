//! CORS for what a web page calls on the coordinator from another origin: `POST /v1/login`,
//! `/v1/login/challenge`, `/v1/nodes` and `/v1/nodes/update`. Only a request whose `Origin` is
//! one of `cors_origins` (or any, with `*`) gets `Access-Control-Allow-Origin` naming it; a
//! preflight (`OPTIONS`) is answered `204`, allowing `POST` with `Content-Type` to those
//! origins. Other requests are untouched. (The comm servers need nothing: WebSockets are not subject to CORS.)

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::App;

/// How long a browser may keep a preflight's answer.
const PREFLIGHT_MAX_AGE_S: &str = "600";

/// Whether `origin` is `*` or `scheme://host[:port]` (no path, query or trailing slash).
pub(crate) fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' ', '@'])
}

/// The `Origin` of `request` if `allowed` lets it in.
fn allowed(allowed: &[String], request: &Request) -> Option<HeaderValue> {
    let origin = request.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(text))
        .then(|| origin.clone())
}

/// A preflight's answer; [`layer`] adds the CORS headers when the origin is allowed.
pub(crate) async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub(crate) async fn layer(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let origin = allowed(&app.config.cors_origins, &request);
    let preflight = request.method() == Method::OPTIONS;
    let mut response = next.run(request).await;
    if !app.config.cors_origins.is_empty() {
        // The answer depends on the origin: caches keep one per origin.
        response
            .headers_mut()
            .append(header::VARY, HeaderValue::from_static("origin"));
    }
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(PREFLIGHT_MAX_AGE_S),
            );
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::valid_origin;

    #[test]
    fn origins_are_a_scheme_and_a_host_and_nothing_more() {
        for good in ["*", "https://app.example", "http://127.0.0.1:8080"] {
            assert!(valid_origin(good), "{good}");
        }
        for bad in [
            "",
            "app.example",
            "https://",
            "https://app.example/",
            "https://app.example/path",
            "https://user@app.example",
            "https://app.example?x",
        ] {
            assert!(!valid_origin(bad), "{bad}");
        }
    }
}
