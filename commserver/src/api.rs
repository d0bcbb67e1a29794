//! Operational HTTP endpoints: `GET /healthz`, `GET /v1/stats` (JSON), `GET /metrics`
//! (Prometheus text), read from the server's counters ([`crate::stats`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use relaymesh_net::metrics::{self, Counter, Exposition, Kind};
use relaymesh_net::sync::lock;
use serde_json::{Value, json};

use crate::Server;

/// `GET /healthz`.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: `200 ready` when this server should get clients — registered with a
/// coordinator (one will do: it sends clients here), linked to every peer the coordinators
/// named, and not draining — and `503` with what is missing otherwise. (`/healthz` says only that the process answers.)
pub(crate) async fn readyz(State(server): State<Arc<Server>>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let mut missing = Vec::new();
    if !server.stats.coordinator_connected.load(Ordering::Relaxed) {
        missing.push("not registered with any coordinator".to_owned());
    }
    let unlinked: Vec<String> = {
        let linked = lock(&server.peer_links);
        lock(&server.known_peers)
            .keys()
            .filter(|p| !linked.contains_key(*p))
            .map(|p| p.to_string())
            .collect()
    };
    if !unlinked.is_empty() {
        missing.push(format!("no link to peers {}", unlinked.join(", ")));
    }
    if server.draining() {
        missing.push("draining".to_owned());
    }
    if missing.is_empty() {
        "ready\n".into_response()
    } else {
        relaymesh_net::serve::ApiError::from_code(
            relaymesh_proto::ErrorCode::Unavailable,
            format!("not ready: {}", missing.join("; ")),
        )
        .into_response()
    }
}

/// `GET /v1/stats`.
pub(crate) async fn stats(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(stats_json(&server))
}

/// What `/v1/stats` shows (also the admin API's `GetServer` counters).
pub(crate) fn stats_json(server: &Server) -> Value {
    let s = &server.stats;
    let peer_links: Vec<Value> = lock(&server.peer_links)
        .values()
        .map(|p| {
            json!({
                "id": &*p.server_id,
                "link": p.link,
                "dialed": p.dialed,
                "remote_topics": p.remote_topics.load(Ordering::Relaxed),
                "forwards_in": p.forwards_in.get(),
                "forwards_out": p.out.forwards_out.get(),
                "forward_dropped": p.out.backlog.total(),
            })
        })
        .collect();
    let pending_keys = lock(&server.keys).pending();
    let h = &server.histories.stats;
    let (history_topics, history_bytes) = server.histories.held();
    json!({
        "id": &*server.id,
        "url": server.public_url,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": server.started.elapsed().as_secs(),
        "coordinator_connected": s.coordinator_connected.load(Ordering::Relaxed),
        "coordinators_connected": server.coordinators.connected(),
        "coordinator_links": server.coordinators.states().into_iter().map(|l| json!({
            "id": l.coordinator,
            "coordinator_id": l.coordinator_id,
            "registered": l.registered,
            "primary": l.primary,
        })).collect::<Vec<Value>>(),
        "registrations": s.registrations.get(),
        "draining": server.draining(),
        "clients": s.clients.get(),
        "topics": s.topics.load(Ordering::Relaxed),
        "nodes_online": server.presence.online(),
        "peers": peer_links.len(),
        "peer_links": peer_links,
        "messages_in": s.messages_in.get(),
        "messages_out": s.messages_out.get(),
        "dropped": s.dropped.get(),
        "slow_consumers": s.slow_consumers.get(),
        "forwards_in": s.forwards_in.get(),
        "forwards_out": s.forwards_out.get(),
        "forward_dropped": s.forward_dropped.get(),
        "forwards_replayed": s.forwards_replayed.get(),
        "peer_drops_reported": s.peer_drops_reported.get(),
        "peer_gaps_reported": s.peer_gaps_reported.get(),
        "protocol_errors": s.protocol_errors.get(),
        "forbidden": s.forbidden.get(),
        "backend_publishes": s.backend_publishes.get(),
        "direct_sent": s.direct_sent.get(),
        "undeliverable": s.undeliverable.get(),
        "inbox_accepted": s.inbox_accepted.get(),
        "inbox_delivered": s.inbox_delivered.get(),
        "inbox_acks_ignored": s.inbox_acks_ignored.get(),
        "inbox_handed_on": s.inbox_handed_on.get(),
        "acks_pending": s.acks_pending.get(),
        "confirmations_abandoned": s.confirmations_abandoned.get(),
        "replaced": s.replaced.get(),
        "keys_pending": pending_keys,
        "keys_reserved": s.keys_reserved.get(),
        "keys_unreserved": s.keys_unreserved.get(),
        "keys_refused": s.keys_refused.get(),
        "relayed_logins": s.relayed_logins.get(),
        "relayed_logins_redirected": s.relayed_logins_redirected.get(),
        "relayed_logins_failed": s.relayed_logins_failed.get(),
        "relayed_logins_refused": s.relayed_logins_refused.get(),
        "peer_links_refused": s.peer_links_refused.get(),
        "connections_refused_per_ip": s.serving.refused_per_ip.get(),
        "tls_refused_plain": s.serving.tls_refused_plain.get(),
        "tls_handshakes_failed": s.serving.tls_handshakes_failed.get(),
        "setups_waiting": s.serving.setups_waiting.get(),
        "setups_refused": s.serving.setups_refused.get(),
        "history_topics": history_topics,
        "history_bytes": history_bytes,
        "history_stored": h.stored.get(),
        "history_evicted": h.evicted.get(),
        "history_not_kept": h.not_kept.get(),
        "history_requests": h.requests.get(),
        "history_gaps": h.gaps.get(),
        "history_replayed": h.replayed.get(),
        "tasks": relaymesh_net::procstat::tasks(),
        "process": relaymesh_net::procstat::process(),
    })
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let s = &server.stats;
    let mut e = Exposition::new();
    let peers = lock(&server.peer_links).len();
    e.process("relaymesh", server.started.elapsed());
    let peer_links: Vec<Arc<crate::control::PeerLink>> =
        lock(&server.peer_links).values().cloned().collect();
    type PerPeer = fn(&crate::control::PeerLink) -> u64;
    let per_peer: [(&str, Kind, &str, PerPeer); 4] = [
        (
            "relaymesh_peer_remote_topics",
            Kind::Gauge,
            "Topics the peer is interested in.",
            |p| p.remote_topics.load(Ordering::Relaxed),
        ),
        (
            "relaymesh_peer_forwards_in_total",
            Kind::Counter,
            "Forwards received from the peer on its current link.",
            |p| p.forwards_in.get(),
        ),
        (
            "relaymesh_peer_forwards_out_total",
            Kind::Counter,
            "Forwards queued for the peer on its current link.",
            |p| p.out.forwards_out.get(),
        ),
        (
            "relaymesh_peer_forward_dropped_total",
            Kind::Counter,
            "Forwards dropped for the peer on its current link (its queue was full).",
            |p| p.out.backlog.total(),
        ),
    ];
    for (name, kind, help, value) in per_peer {
        let mut family = e.family(name, kind, help);
        for p in &peer_links {
            family.sample(&[("peer", &p.server_id)], value(p) as f64);
        }
    }
    let links = server.coordinators.states();
    for (name, help, value) in [
        (
            "relaymesh_coordinator_link_registered",
            "1 while the link to this coordinator address is registered.",
            (|l: &crate::coordinator_link::LinkState| l.registered) as fn(&_) -> bool,
        ),
        (
            "relaymesh_coordinator_link_primary",
            "1 for the coordinator link that carries the inbox and the directory in force.",
            |l| l.primary,
        ),
    ] {
        let mut family = e.family(name, Kind::Gauge, help);
        for l in &links {
            family.sample(&[("coordinator", &l.coordinator)], u8::from(value(l)));
        }
    }
    e.single(
        "relaymesh_setups_waiting",
        Kind::Gauge,
        "Connections waiting for a place among max_setups (their first request has come whole).",
        s.serving.setups_waiting.get() as f64,
    );
    e.single(
        "relaymesh_draining",
        Kind::Gauge,
        "1 while the server takes no new clients (shutting down or drained).",
        u8::from(server.draining()),
    );
    e.single(
        "relaymesh_keys_pending",
        Kind::Gauge,
        "Login keys reserved and not yet used.",
        lock(&server.keys).pending() as f64,
    );
    let (history_topics, history_bytes) = server.histories.held();
    let h = &server.histories.stats;
    let gauges: [(&str, &str, f64); 9] = [
        (
            "relaymesh_history_topics",
            "Topics with history held on this server.",
            history_topics as f64,
        ),
        (
            "relaymesh_history_bytes",
            "Bytes of history held (messages as delivered plus bookkeeping).",
            history_bytes as f64,
        ),
        (
            "relaymesh_clients",
            "Connected clients.",
            s.clients.get() as f64,
        ),
        (
            "relaymesh_topics",
            "Topics with local subscribers.",
            s.topics.load(Ordering::Relaxed) as f64,
        ),
        ("relaymesh_peers", "Live peer links.", peers as f64),
        (
            "relaymesh_nodes_online",
            "Online nodes in this server's copy of the cluster's directory (all scopes).",
            server.presence.online() as f64,
        ),
        (
            "relaymesh_tasks",
            "Tokio tasks alive in the process.",
            relaymesh_net::procstat::tasks() as f64,
        ),
        (
            "relaymesh_coordinator_connected",
            "1 while registered with at least one coordinator.",
            f64::from(u8::from(s.coordinator_connected.load(Ordering::Relaxed))),
        ),
        (
            "relaymesh_coordinators_connected",
            "Coordinators this server is registered with.",
            server.coordinators.connected() as f64,
        ),
    ];
    for (name, help, value) in gauges {
        e.single(name, Kind::Gauge, help, value);
    }
    let counters: [(&str, &str, &Counter); 41] = [
        (
            "relaymesh_history_stored_total",
            "Messages added to topic history (as origin or copy).",
            &h.stored,
        ),
        (
            "relaymesh_history_evicted_total",
            "History messages dropped for the bounds (count, bytes, age).",
            &h.evicted,
        ),
        (
            "relaymesh_history_not_kept_total",
            "Messages on history topics not kept for lack of room (max_topics, max_total_bytes).",
            &h.not_kept,
        ),
        (
            "relaymesh_history_requests_total",
            "History requests and recoveries answered.",
            &h.requests,
        ),
        (
            "relaymesh_history_gaps_total",
            "History answers that reported a gap.",
            &h.gaps,
        ),
        (
            "relaymesh_history_replayed_total",
            "Messages sent in history answers.",
            &h.replayed,
        ),
        (
            "relaymesh_replaced_total",
            "Sessions closed because a newer login of the same client replaced them.",
            &s.replaced,
        ),
        (
            "relaymesh_messages_in_total",
            "Messages published by local clients.",
            &s.messages_in,
        ),
        (
            "relaymesh_messages_out_total",
            "Messages queued for local clients.",
            &s.messages_out,
        ),
        (
            "relaymesh_dropped_total",
            "Messages dropped for clients whose queue was full.",
            &s.dropped,
        ),
        (
            "relaymesh_slow_consumers_total",
            "Clients disconnected as slow consumers.",
            &s.slow_consumers,
        ),
        (
            "relaymesh_forwards_in_total",
            "Messages received from peer servers.",
            &s.forwards_in,
        ),
        (
            "relaymesh_forwards_out_total",
            "Messages forwarded to peer servers.",
            &s.forwards_out,
        ),
        (
            "relaymesh_forward_dropped_total",
            "Forwards dropped: a peer link queue was full, or the link had ended and they fell out of its replay buffer.",
            &s.forward_dropped,
        ),
        (
            "relaymesh_forwards_replayed_total",
            "Forwards sent again on a peer's new link because its previous link may not have delivered them.",
            &s.forwards_replayed,
        ),
        (
            "relaymesh_peer_drops_reported_total",
            "Forwards peers reported dropping for this server.",
            &s.peer_drops_reported,
        ),
        (
            "relaymesh_peer_gaps_reported_total",
            "Forwards a peer missed on a broken or down link, reported to it when it linked again.",
            &s.peer_gaps_reported,
        ),
        (
            "relaymesh_protocol_errors_total",
            "Client sessions closed for bad input.",
            &s.protocol_errors,
        ),
        (
            "relaymesh_backend_publishes_total",
            "Messages published by application backends through the admin API (one per topic).",
            &s.backend_publishes,
        ),
        (
            "relaymesh_forbidden_total",
            "Publishes and subscriptions refused by role rules.",
            &s.forbidden,
        ),
        (
            "relaymesh_direct_sent_total",
            "Direct messages and signals from this server's clients that reached a session.",
            &s.direct_sent,
        ),
        (
            "relaymesh_undeliverable_total",
            "Direct messages and signals answered Undeliverable.",
            &s.undeliverable,
        ),
        (
            "relaymesh_inbox_accepted_total",
            "Direct messages for offline nodes stored in their inbox.",
            &s.inbox_accepted,
        ),
        (
            "relaymesh_inbox_delivered_total",
            "Inbox messages delivered to node sessions.",
            &s.inbox_delivered,
        ),
        (
            "relaymesh_inbox_acks_ignored_total",
            "Inbox acknowledgements for ids never delivered.",
            &s.inbox_acks_ignored,
        ),
        (
            "relaymesh_inbox_handed_on_total",
            "Forwards for a node that had just left, handed to its inbox.",
            &s.inbox_handed_on,
        ),
        (
            "relaymesh_acks_pending_total",
            "Subscription changes acknowledged with servers still to confirm them.",
            &s.acks_pending,
        ),
        (
            "relaymesh_confirmations_abandoned_total",
            "Subscription changes given up on with servers still to confirm them.",
            &s.confirmations_abandoned,
        ),
        (
            "relaymesh_keys_reserved_total",
            "Login keys reserved for the coordinator.",
            &s.keys_reserved,
        ),
        (
            "relaymesh_keys_unreserved_total",
            "Login keys the coordinator took back unused (their login went to another server, or timed out).",
            &s.keys_unreserved,
        ),
        (
            "relaymesh_keys_refused_total",
            "Client connections refused for a bad key.",
            &s.keys_refused,
        ),
        (
            "relaymesh_relayed_logins_total",
            "Keyless clients whose relayed Login gave them a session here.",
            &s.relayed_logins,
        ),
        (
            "relaymesh_relayed_logins_redirected_total",
            "Keyless clients whose relayed Login sent them to another server.",
            &s.relayed_logins_redirected,
        ),
        (
            "relaymesh_relayed_logins_failed_total",
            "Relayed Logins the coordinator refused or did not answer.",
            &s.relayed_logins_failed,
        ),
        (
            "relaymesh_relayed_logins_refused_total",
            "Keyless clients refused before the upgrade (max_logins_in_flight, no coordinator).",
            &s.relayed_logins_refused,
        ),
        (
            "relaymesh_peer_links_refused_total",
            "Peer links refused for a bad cluster secret.",
            &s.peer_links_refused,
        ),
        (
            "relaymesh_connections_refused_per_ip_total",
            "Connections refused because their source address held max_connections_per_ip.",
            &s.serving.refused_per_ip,
        ),
        (
            "relaymesh_tls_refused_plain_total",
            "Plain (non-TLS) connections to a TLS listener, answered 400 and closed.",
            &s.serving.tls_refused_plain,
        ),
        (
            "relaymesh_tls_handshakes_failed_total",
            "TLS handshakes that failed or timed out.",
            &s.serving.tls_handshakes_failed,
        ),
        (
            "relaymesh_setups_refused_total",
            "Connections that waited longer than request_timeout_ms for a place among max_setups, answered 503 (closed, over TLS).",
            &s.serving.setups_refused,
        ),
        (
            "relaymesh_registrations_total",
            "Successful registrations with the coordinator.",
            &s.registrations,
        ),
    ];
    for (name, help, counter) in counters {
        e.single(name, Kind::Counter, help, counter.get() as f64);
    }
    let d = &s.dist;
    e.histogram(
        "relaymesh_subscribe_ack_seconds",
        "From a client's Subscribe to its first Ack (every linked peer confirmed, or subscribe_sync_timeout_ms).",
        &d.subscribe_ack_seconds,
    );
    e.histogram(
        "relaymesh_fanout_batch_messages",
        "Messages in each batch handed to a topic's local subscribers.",
        &d.fanout_batch_messages,
    );
    e.histogram(
        "relaymesh_queue_depth_at_drop",
        "Frames a client's queue held when messages for it were dropped.",
        &d.queue_depth_at_drop,
    );
    relaymesh_net::serve::text(metrics::CONTENT_TYPE, e.finish())
}
