//! The web console (`console = true`, `--console`): a page under `/console` on the main
//! listener, its files embedded in this binary at build time (nothing is fetched from
//! elsewhere), and the JSON it polls, `/console/api/cluster` (and `/console/api/results`),
//! which answer only with `Authorization: Bearer <admin_token>`.
//!
//! The page's script is built from `clients/typescript/console/console.ts` with the TypeScript
//! client (`npm run console` there) and checked in as `coordinator/console/console.js`; a test
//! of the TypeScript package builds it again and fails when it differs.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use relaymesh_net::http::Method;
use relaymesh_net::serve::ApiError;
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::ErrorCode;
use serde_json::{Value, json};

use crate::App;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");

/// Longest wait for one comm server's `/v1/stats`.
const SERVER_STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// The console's routes, for the main router when `console` is on.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/console.js", get(script))
        .route("/console/api/cluster", get(cluster))
        .route("/console/api/results", get(results))
        .with_state(app)
}

/// What the page may do: its own script, and connections back here and to comm servers
/// (WebSockets for the topic tail).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self' ws: wss: http: https:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn refuse() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthenticated,
        "the console's data needs `Authorization: Bearer <admin token>` (RELAYMESH_ADMIN_TOKEN)",
    )
    .into_response()
}

/// `GET /console/api/cluster`: the coordinator's servers, each with its own `/v1/stats` (or
/// why it could not be read), for the page to draw and to turn counters into rates.
async fn cluster(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !relaymesh_net::auth::bearer_matches(&headers, &app.config.admin_token) {
        return refuse();
    }
    let registered = crate::api::servers_json(&app);
    let connector = match app.config.tls.connector(app.tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("no TLS connector for the servers' stats: {e}"),
            )
            .into_response();
        }
    };
    let reads = registered.iter().map(|server| {
        let connector = connector.clone();
        let url = server["url"].as_str().unwrap_or_default().to_owned();
        async move {
            let base = relaymesh_net::url::normalize(&url, relaymesh_net::url::Form::Http)
                .map_err(|e| e.to_string())?;
            let stats_url = format!("{}/v1/stats", base.trim_end_matches('/'));
            let (status, body) = relaymesh_net::http::request_with(
                Method::GET,
                &stats_url,
                &[],
                None,
                &connector,
                SERVER_STATS_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("{stats_url} answered {status}"));
            }
            serde_json::from_slice::<Value>(&body).map_err(|e| format!("{stats_url}: {e}"))
        }
    });
    let stats = futures_util::future::join_all(reads).await;
    let servers: Vec<Value> = registered
        .into_iter()
        .zip(stats)
        .map(|(mut server, stats)| {
            match stats {
                Ok(s) => {
                    server["stats"] = json!({
                        "clients": s["clients"],
                        "topics": s["topics"],
                        "messages_in": s["messages_in"],
                        "messages_out": s["messages_out"],
                        "dropped": s["dropped"],
                        "peers": s["peers"],
                        "peer_links": s["peer_links"],
                        "cpu_seconds": s["process"]["cpu_seconds"],
                        "rss_bytes": s["process"]["rss_bytes"],
                        "uptime_s": s["uptime_s"],
                    });
                }
                Err(e) => server["error"] = Value::String(e),
            }
            server
        })
        .collect();
    let s = &app.stats;
    axum::Json(json!({
        "at_ms": relaymesh_net::link::now_ms(),
        "coordinator": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": app.started.elapsed().as_secs(),
            "logins": s.logins.get(),
            "logins_refused": s.logins_refused.get(),
            "nodes_online": lock(&app.directory).len(),
            "results": app.config.console_results.is_some(),
        },
        "servers": servers,
    }))
    .into_response()
}

/// `GET /console/api/results`: the `console_results` file as it is now (404 when none is
/// configured or it cannot be read as JSON).
async fn results(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !relaymesh_net::auth::bearer_matches(&headers, &app.config.admin_token) {
        return refuse();
    }
    let Some(path) = app.config.console_results.clone() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no console_results file is configured",
        )
        .into_response();
    };
    let read = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    })
    .await;
    match read {
        Ok(Ok(value)) => axum::Json(value).into_response(),
        Ok(Err(e)) => ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
        .into_response(),
    }
}
