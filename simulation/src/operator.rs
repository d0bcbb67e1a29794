//! An operator's drain in the middle of a run (`--drain-server-at`): one comm server is drained
//! through the coordinator's admin API while the clients publish and receive, so the report
//! shows whether its clients moved without losing anything.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use relaymesh_proto::admin::DrainServerRequest;
use relaymesh_proto::admin::admin_client::AdminClient;
use serde::Serialize;

/// How long the admin API gives the drained server's clients to leave.
const DEADLINE: Duration = Duration::from_secs(30);

/// Which server to drain, when, and through which admin API.
#[derive(Debug, Clone)]
pub(crate) struct DrainPlan {
    /// The admin API (http:// or https://HOST:PORT), its bearer token and the CA that signed
    /// its certificate (`--ca`).
    pub(crate) admin: String,
    pub(crate) token: String,
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Seconds into publishing.
    pub(crate) at: Duration,
    /// The server; the one with the most of this run's clients when `None`.
    pub(crate) server: Option<String>,
}

/// What the drain did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServerDrained {
    pub(crate) server_id: String,
    /// Seconds into publishing it started.
    pub(crate) at_s: f64,
    /// Clients that moved, and those still on the server at the deadline (the admin API's
    /// answer).
    pub(crate) moved: u32,
    pub(crate) remaining: u32,
    /// Seconds until the server was empty (or the deadline passed).
    pub(crate) took_s: f64,
    /// Why the drain could not be done, if it could not.
    pub(crate) error: Option<String>,
}

impl ServerDrained {
    /// Done, and the server emptied.
    pub(crate) fn clean(&self) -> bool {
        self.error.is_none() && self.remaining == 0
    }
}

/// Waits until `plan.at` after `started`, then drains `plan.server` (or `busiest`).
pub(crate) async fn drain(plan: DrainPlan, busiest: String, started: Instant) -> ServerDrained {
    tokio::time::sleep_until((started + plan.at).into()).await;
    let server_id = plan.server.clone().unwrap_or(busiest);
    let at = Instant::now();
    let result = call(&plan, &server_id).await;
    let took_s = at.elapsed().as_secs_f64();
    let at_s = at.duration_since(started).as_secs_f64();
    match result {
        Ok((moved, remaining)) => ServerDrained {
            server_id,
            at_s,
            moved,
            remaining,
            took_s,
            error: None,
        },
        Err(e) => ServerDrained {
            server_id,
            at_s,
            moved: 0,
            remaining: 0,
            took_s,
            error: Some(format!("{e:#}")),
        },
    }
}

async fn call(plan: &DrainPlan, server_id: &str) -> anyhow::Result<(u32, u32)> {
    let tls = relaymesh_proto::admin_client::AdminTls {
        ca: plan.ca.clone(),
        identity: None,
    };
    let channel = relaymesh_proto::admin_client::connect(&plan.admin, &tls).await?;
    let mut request = tonic::Request::new(DrainServerRequest {
        server_id: server_id.to_owned(),
        deadline_ms: u32::try_from(DEADLINE.as_millis()).unwrap_or(u32::MAX),
        reason: "simulation: draining in the middle of the run".into(),
    });
    let bearer = format!("Bearer {}", plan.token)
        .parse()
        .map_err(|_| anyhow!("the admin token is not a valid header value"))?;
    request.metadata_mut().insert("authorization", bearer);
    let answer = AdminClient::new(channel)
        .drain_server(request)
        .await
        .map_err(|e| anyhow!("DrainServer {server_id}: {:?}: {}", e.code(), e.message()))?
        .into_inner();
    Ok((answer.moved, answer.remaining))
}
