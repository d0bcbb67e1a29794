//! A cluster's state as its coordinator and servers report it (`GET /v1/stats`), for tools and
//! scripts: which servers are registered, and waiting until a cluster that is starting is
//! ready to use.

use relaymesh_net::tls::Connector;
use std::time::Duration;

use relaymesh_net::http::{HttpClientError, Method};
use relaymesh_net::url::{self, Form};
use serde_json::Value;
use tokio::time::Instant;

/// Why the cluster's state could not be read, or was not as wanted in time.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The request failed (bad URL, nothing listening, timeout).
    #[error(transparent)]
    Http(#[from] HttpClientError),
    /// The answer was not a successful JSON document of the expected shape.
    #[error("{url}: {reason}")]
    Answer {
        /// What was asked.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// [`wait_ready`] gave up; `missing` says what was still missing.
    #[error("gave up after {} s: {missing}", .waited.as_secs())]
    NotReady {
        /// How long it waited.
        waited: Duration,
        /// What the cluster still lacked, in words.
        missing: String,
    },
}

/// One server as the coordinator lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The server's id.
    pub id: String,
    /// Its base URL (`ws://host:port`).
    pub url: String,
    /// Its clients, as of its last load report.
    pub clients: u64,
    /// The most clients it takes.
    pub capacity: u64,
    /// Whether it refuses new clients (shutting down).
    pub draining: bool,
}

/// Longest wait for any one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET {base}/v1/stats` as JSON, waiting at most `within`.
pub async fn stats(base: &str, tls: &Connector, within: Duration) -> Result<Value, ClusterError> {
    let base = url::normalize(base, Form::Http).map_err(|e| ClusterError::Answer {
        url: base.to_owned(),
        reason: e.to_string(),
    })?;
    let url = format!("{}/v1/stats", base.trim_end_matches('/'));
    let (status, body) =
        relaymesh_net::http::request_with(Method::GET, &url, &[], None, tls, within).await?;
    let answer = |reason: String| ClusterError::Answer {
        url: url.clone(),
        reason,
    };
    if !status.is_success() {
        return Err(answer(format!("answered {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| answer(format!("not JSON: {e}")))
}

/// The servers registered with the coordinator at `coordinator` (with several,
/// comma-separated: the first that answers; each has the whole registry).
pub async fn servers(coordinator: &str, tls: &Connector) -> Result<Vec<ServerInfo>, ClusterError> {
    let mut failure = None;
    for url in url::split_list(coordinator) {
        match registered(url, tls, REQUEST_TIMEOUT).await {
            Ok(servers) => return Ok(servers),
            Err(e) => failure = Some(e),
        }
    }
    Err(failure.unwrap_or_else(|| ClusterError::Answer {
        url: coordinator.to_owned(),
        reason: "it names no coordinator".into(),
    }))
}

async fn registered(
    coordinator: &str,
    tls: &Connector,
    within: Duration,
) -> Result<Vec<ServerInfo>, ClusterError> {
    let stats = stats(coordinator, tls, within).await?;
    let Some(list) = stats["servers"].as_array() else {
        return Err(ClusterError::Answer {
            url: coordinator.to_owned(),
            reason: "the coordinator's stats have no `servers` list".into(),
        });
    };
    Ok(list
        .iter()
        .map(|s| ServerInfo {
            id: s["id"].as_str().unwrap_or("?").to_owned(),
            url: s["url"].as_str().unwrap_or_default().to_owned(),
            clients: s["clients"].as_u64().unwrap_or(0),
            capacity: s["capacity"].as_u64().unwrap_or(0),
            draining: s["draining"].as_bool().unwrap_or(false),
        })
        .collect())
}

/// What keeps the cluster from having `servers` registered servers (with every coordinator
/// of the comma-separated list) all linked to each other, in words; `None` once it has them.
async fn missing(
    coordinators: &str,
    servers: usize,
    tls: &Connector,
    within: Duration,
) -> Result<Option<String>, ClusterError> {
    let mut registered = Vec::new();
    for coordinator in url::split_list(coordinators) {
        registered = self::registered(coordinator, tls, within).await?;
        if registered.len() < servers {
            return Ok(Some(format!(
                "{} of {servers} comm servers registered with {coordinator}",
                registered.len()
            )));
        }
    }
    for server in &registered {
        let peers = stats(&server.url, tls, within).await?["peers"]
            .as_u64()
            .unwrap_or(0) as usize;
        if peers + 1 < registered.len() {
            return Ok(Some(format!(
                "{} linked to {peers} of its {} peers",
                server.id,
                registered.len() - 1
            )));
        }
    }
    Ok(None)
}

/// Waits until the coordinator answers and at least `servers` comm servers are registered,
/// each linked to every other; gives up after `timeout`, saying what was missing. With several
/// coordinators (comma-separated), each must answer and list them.
pub async fn wait_ready(
    coordinator: &str,
    servers: usize,
    tls: &Connector,
    timeout: Duration,
) -> Result<(), ClusterError> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let within = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), REQUEST_TIMEOUT);
        let missing = match missing(coordinator, servers, tls, within).await {
            Ok(None) => return Ok(()),
            Ok(Some(missing)) => missing,
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(ClusterError::NotReady {
                waited: start.elapsed(),
                missing,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
