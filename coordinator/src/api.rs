//! Operational HTTP endpoints: `GET /healthz`, `GET /v1/stats` (JSON), `GET /metrics`
//! (Prometheus text), and the counters behind them.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use relaymesh_net::metrics::{self, Counter, Exposition, Gauge, Kind};
use relaymesh_net::serve::ServeStats;
use relaymesh_net::sync::lock;
use serde_json::{Value, json};

use crate::App;

/// Coordinator counters; updated without locks from every link.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) negotiation_links: Gauge,
    pub(crate) logins: Counter,
    /// Logins a comm server relayed (`RelayedLogin`), whatever became of them (answered,
    /// failed, refused).
    pub(crate) logins_relayed: Counter,
    pub(crate) login_failures: Counter,
    /// Logins whose credentials the account store refused.
    pub(crate) logins_refused: Counter,
    /// Logins refused because their address failed too often.
    pub(crate) logins_rate_limited: Counter,
    /// Nodes registered (`RegisterNode`, `POST /v1/nodes`).
    pub(crate) nodes_registered: Counter,
    /// Direct messages stored in inboxes, refused (full, unknown node, database down), and
    /// deleted unread after `inbox.ttl_ms`.
    pub(crate) inbox_stored: Counter,
    pub(crate) inbox_refused: Counter,
    pub(crate) inbox_expired: Counter,
    /// Of `inbox_expired`, those whose sending node had a session to tell (`Expired`).
    pub(crate) inbox_expired_reported: Counter,
    /// Inbox transactions (group commits).
    pub(crate) inbox_commits: Counter,
    /// `Replace` notices a server's full link queue did not take.
    pub(crate) replace_dropped: Counter,
    pub(crate) reservations_failed: Counter,
    /// Reservations raced by a second one on another server (`reserve_hedge_ms`).
    pub(crate) reservations_hedged: Counter,
    /// Keys reserved that no login waited for any more (the other of a raced pair, one
    /// answered after its login timed out), given back to their server with `Unreserve`.
    pub(crate) keys_unreserved: Arc<Counter>,
    pub(crate) server_links_refused: Counter,
    /// What the listener refused (connections over `max_connections_per_ip`).
    pub(crate) serving: Arc<ServeStats>,
    pub(crate) dist: Distributions,
}

/// Login latencies, as distributions.
#[derive(Debug)]
pub(crate) struct Distributions {
    pub(crate) login_check_seconds: relaymesh_net::metrics::Histogram,
    pub(crate) login_placement_seconds: relaymesh_net::metrics::Histogram,
}

impl Default for Distributions {
    fn default() -> Self {
        use relaymesh_net::metrics::{Histogram, LATENCY_SECONDS};
        Self {
            login_check_seconds: Histogram::new(LATENCY_SECONDS),
            login_placement_seconds: Histogram::new(LATENCY_SECONDS),
        }
    }
}

/// `GET /healthz`: the process is up and serving.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: `200 ready` while the account store answers, `503` saying why otherwise.
/// (`/healthz` says only that the process answers.)
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match app.accounts.reachable().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => relaymesh_net::serve::ApiError::from_code(
            relaymesh_proto::ErrorCode::Unavailable,
            format!("not ready: the account store does not answer: {e}"),
        )
        .into_response(),
    }
}

/// The registered servers as `/v1/stats` (and the console) show them.
pub(crate) fn servers_json(app: &App) -> Vec<Value> {
    let registry = lock(&app.registry);
    registry
        .iter()
        .map(|(id, e)| {
            json!({
                "id": id,
                "url": e.url,
                "clients": e.load.clients,
                "capacity": e.capacity,
                "pending_keys": e.load.pending_keys,
                "topics": e.load.topics,
                "draining": e.load.draining,
                "eligible": registry.eligible(e),
                "unresponsive": e.unresponsive,
                "load_age_ms": u64::try_from(e.load_at.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// `GET /v1/stats`.
pub(crate) async fn stats(State(app): State<Arc<App>>) -> Json<Value> {
    let servers = servers_json(&app);
    let s = &app.stats;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": app.started.elapsed().as_secs(),
        "servers": servers,
        "negotiation_links": s.negotiation_links.get(),
        "logins": s.logins.get(),
        "logins_relayed": s.logins_relayed.get(),
        "login_failures": s.login_failures.get(),
        "logins_refused": s.logins_refused.get(),
        "logins_rate_limited": s.logins_rate_limited.get(),
        "nodes_registered": s.nodes_registered.get(),
        "inbox_stored": s.inbox_stored.get(),
        "inbox_refused": s.inbox_refused.get(),
        "inbox_expired": s.inbox_expired.get(),
        "inbox_expired_reported": s.inbox_expired_reported.get(),
        "inbox_commits": s.inbox_commits.get(),
        "replace_dropped": s.replace_dropped.get(),
        "reservations_failed": s.reservations_failed.get(),
        "reservations_hedged": s.reservations_hedged.get(),
        "keys_unreserved": s.keys_unreserved.get(),
        "server_links_refused": s.server_links_refused.get(),
        "connections_refused_per_ip": s.serving.refused_per_ip.get(),
        "tls_refused_plain": s.serving.tls_refused_plain.get(),
        "tls_handshakes_failed": s.serving.tls_handshakes_failed.get(),
        "setups_waiting": s.serving.setups_waiting.get(),
        "setups_refused": s.serving.setups_refused.get(),
        "nodes_online": lock(&app.directory).len(),
        "tasks": relaymesh_net::procstat::tasks(),
        "process": relaymesh_net::procstat::process(),
    }))
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut e = Exposition::new();
    {
        let registry = lock(&app.registry);
        e.single(
            "relaymesh_coordinator_servers",
            Kind::Gauge,
            "Registered comm servers.",
            registry.len() as f64,
        );
        let mut clients = e.family(
            "relaymesh_coordinator_server_clients",
            Kind::Gauge,
            "Clients per comm server, as last reported.",
        );
        for (id, entry) in registry.iter() {
            clients.sample(&[("server", id)], entry.load.clients);
        }
        let mut draining = e.family(
            "relaymesh_coordinator_server_draining",
            Kind::Gauge,
            "1 when the comm server is draining.",
        );
        for (id, entry) in registry.iter() {
            draining.sample(&[("server", id)], u8::from(entry.load.draining));
        }
        type PerServer = fn(&crate::registry::Entry<Arc<crate::server_link::ServerLink>>) -> f64;
        let per_server: [(&str, &str, PerServer); 4] = [
            (
                "relaymesh_coordinator_server_capacity",
                "Most clients the comm server takes.",
                |e| f64::from(e.capacity),
            ),
            (
                "relaymesh_coordinator_server_pending_keys",
                "Login keys reserved on the comm server and not yet used, as last reported.",
                |e| f64::from(e.load.pending_keys),
            ),
            (
                "relaymesh_coordinator_server_topics",
                "Topics with subscribers on the comm server, as last reported.",
                |e| f64::from(e.load.topics),
            ),
            (
                "relaymesh_coordinator_server_unresponsive",
                "1 when the comm server let a reservation time out and has not reported since.",
                |e| f64::from(u8::from(e.unresponsive)),
            ),
        ];
        for (name, help, value) in per_server {
            let mut family = e.family(name, Kind::Gauge, help);
            for (id, entry) in registry.iter() {
                family.sample(&[("server", id)], value(entry));
            }
        }
        let mut eligible = e.family(
            "relaymesh_coordinator_server_eligible",
            Kind::Gauge,
            "1 when the comm server is in the choice for new clients.",
        );
        for (id, entry) in registry.iter() {
            eligible.sample(&[("server", id)], u8::from(registry.eligible(entry)));
        }
        let mut age = e.family(
            "relaymesh_coordinator_server_load_age_ms",
            Kind::Gauge,
            "Milliseconds since the comm server's last load report.",
        );
        for (id, entry) in registry.iter() {
            age.sample(
                &[("server", id)],
                entry.load_at.elapsed().as_millis() as f64,
            );
        }
    }
    let s = &app.stats;
    e.process("relaymesh_coordinator", app.started.elapsed());
    e.single(
        "relaymesh_coordinator_replace_dropped_total",
        Kind::Counter,
        "Replace notices a comm server's full link queue did not take.",
        s.replace_dropped.get() as f64,
    );
    e.histogram(
        "relaymesh_coordinator_login_check_seconds",
        "Checking a login's credentials (argon2 for a code, a signature for a key), seconds.",
        &s.dist.login_check_seconds,
    );
    e.histogram(
        "relaymesh_coordinator_login_placement_seconds",
        "Placing a logged-in client: choosing a comm server and reserving its key there, seconds.",
        &s.dist.login_placement_seconds,
    );
    e.single(
        "relaymesh_coordinator_nodes_online",
        Kind::Gauge,
        "Nodes with at least one session in the cluster (all scopes).",
        lock(&app.directory).len() as f64,
    );
    e.single(
        "relaymesh_coordinator_tasks",
        Kind::Gauge,
        "Tokio tasks alive in the process.",
        relaymesh_net::procstat::tasks() as f64,
    );
    e.single(
        "relaymesh_coordinator_negotiation_links",
        Kind::Gauge,
        "Open /v1/connect links.",
        s.negotiation_links.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_logins_total",
        Kind::Counter,
        "Clients given a server and key.",
        s.logins.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_logins_relayed_total",
        Kind::Counter,
        "Logins a comm server relayed (answered or failed).",
        s.logins_relayed.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_login_failures_total",
        Kind::Counter,
        "Logins that got no server.",
        s.login_failures.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_logins_refused_total",
        Kind::Counter,
        "Logins whose credentials were refused.",
        s.logins_refused.get() as f64,
    );
    for (name, help, value) in [
        (
            "relaymesh_coordinator_inbox_stored_total",
            "Direct messages stored in offline nodes' inboxes.",
            s.inbox_stored.get(),
        ),
        (
            "relaymesh_coordinator_inbox_refused_total",
            "Direct messages not stored (inbox full, unknown node, database down).",
            s.inbox_refused.get(),
        ),
        (
            "relaymesh_coordinator_inbox_expired_total",
            "Inbox messages deleted unread after inbox.ttl_ms.",
            s.inbox_expired.get(),
        ),
        (
            "relaymesh_coordinator_inbox_expired_reported_total",
            "Expired inbox messages reported to their sending node's sessions.",
            s.inbox_expired_reported.get(),
        ),
        (
            "relaymesh_coordinator_inbox_commits_total",
            "Inbox transactions (each a group commit of what queued up).",
            s.inbox_commits.get(),
        ),
    ] {
        e.single(name, Kind::Counter, help, value as f64);
    }
    e.single(
        "relaymesh_coordinator_nodes_registered_total",
        Kind::Counter,
        "Nodes registered.",
        s.nodes_registered.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_logins_rate_limited_total",
        Kind::Counter,
        "Logins refused because their source address failed too often.",
        s.logins_rate_limited.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_reservations_failed_total",
        Kind::Counter,
        "Key reservations a server refused or did not answer.",
        s.reservations_failed.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_reservations_hedged_total",
        Kind::Counter,
        "Reservations raced by a second one on another server (reserve_hedge_ms).",
        s.reservations_hedged.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_keys_unreserved_total",
        Kind::Counter,
        "Keys reserved that no login waited for any more (another server answered first, or the login timed out), given back to their server (Unreserve).",
        s.keys_unreserved.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_server_links_refused_total",
        Kind::Counter,
        "Server links refused for a missing or wrong cluster secret.",
        s.server_links_refused.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_connections_refused_per_ip_total",
        Kind::Counter,
        "Connections refused because their source address held max_connections_per_ip.",
        s.serving.refused_per_ip.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_tls_refused_plain_total",
        Kind::Counter,
        "Plain (non-TLS) connections to a TLS listener, answered 400 and closed.",
        s.serving.tls_refused_plain.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_tls_handshakes_failed_total",
        Kind::Counter,
        "TLS handshakes that failed or timed out.",
        s.serving.tls_handshakes_failed.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_setups_waiting",
        Kind::Gauge,
        "Connections waiting for a place among max_setups (their first request has come whole).",
        s.serving.setups_waiting.get() as f64,
    );
    e.single(
        "relaymesh_coordinator_setups_refused_total",
        Kind::Counter,
        "Connections that waited longer than request_timeout_ms for a place among max_setups, answered 503 (closed, over TLS).",
        s.serving.setups_refused.get() as f64,
    );
    relaymesh_net::serve::text(metrics::CONTENT_TYPE, e.finish())
}
