//! The comm server's counters: bumped without locks from every session, link and the control
//! task, read by the operational endpoints ([`crate::api`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use relaymesh_net::metrics::{Counter, Gauge, Histogram};
use relaymesh_net::serve::ServeStats;

/// Comm server counters, bumped without locks from every session and link.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) clients: Gauge,
    /// Topics with local subscribers; written by the control task.
    pub(crate) topics: AtomicU64,
    /// Messages published by this server's clients.
    pub(crate) messages_in: Counter,
    /// Messages queued for this server's clients (local and forwarded publishes).
    pub(crate) messages_out: Counter,
    /// Messages dropped for clients whose queue was full.
    pub(crate) dropped: Counter,
    pub(crate) slow_consumers: Counter,
    pub(crate) forwards_in: Counter,
    pub(crate) forwards_out: Counter,
    /// Forwards dropped: a peer link's queue was full, or (counted when the peer links again)
    /// the link had ended and they were no longer in its replay buffer.
    pub(crate) forward_dropped: Counter,
    /// Forwards sent again on a peer's new link because its previous link may not have
    /// delivered them.
    pub(crate) forwards_replayed: Counter,
    /// Forwards peers reported dropping for this server.
    pub(crate) peer_drops_reported: Counter,
    /// Forwards routed to a peer's previous link that it never received (lost in the link or
    /// routed while it was down), reported to the peer when it linked again.
    pub(crate) peer_gaps_reported: Counter,
    /// Client sessions closed for bad input (malformed frames, invalid topics, limits...).
    pub(crate) protocol_errors: Counter,
    /// Publishes and subscriptions refused by role rules.
    pub(crate) forbidden: Counter,
    /// Messages published by application backends through the admin API (one per topic).
    pub(crate) backend_publishes: Counter,
    /// Direct messages and signals sent by this server's clients that reached a session.
    pub(crate) direct_sent: Counter,
    /// Direct messages and signals answered `Undeliverable` (no session, unknown node, over a
    /// limit or the signal rate).
    pub(crate) undeliverable: Counter,
    /// Direct messages for offline nodes that the coordinator stored (`Accepted`).
    pub(crate) inbox_accepted: Counter,
    /// Inbox messages delivered to node sessions (a message delivered again after a
    /// reconnect counts again).
    pub(crate) inbox_delivered: Counter,
    /// `InboxAck`s for ids never delivered to the session (ignored beyond what was).
    pub(crate) inbox_acks_ignored: Counter,
    /// Forwards for a node whose last session here had just closed, handed to its inbox.
    pub(crate) inbox_handed_on: Counter,
    /// Subscription changes answered with an `Ack` naming servers that had not confirmed them
    /// within `subscribe_sync_timeout_ms`.
    pub(crate) acks_pending: Counter,
    /// Of those, changes the server stopped waiting for (`confirm_deadline`) with servers
    /// still pending, named in their second `Ack`.
    pub(crate) confirmations_abandoned: Counter,
    /// Sessions closed because a newer login of the same client replaced them.
    pub(crate) replaced: Counter,
    pub(crate) keys_reserved: Counter,
    /// Keys the coordinator took back unused (`Unreserve`: their login went elsewhere or timed
    /// out).
    pub(crate) keys_unreserved: Counter,
    /// Client connections refused for an unknown, expired or reused key.
    pub(crate) keys_refused: Counter,
    /// Keyless clients whose relayed `Login` gave them a session here, were sent to another
    /// server, failed (the coordinator's refusal, or no answer), or were refused before the
    /// upgrade (`max_logins_in_flight`, or no coordinator link).
    pub(crate) relayed_logins: Counter,
    pub(crate) relayed_logins_redirected: Counter,
    pub(crate) relayed_logins_failed: Counter,
    pub(crate) relayed_logins_refused: Counter,
    pub(crate) peer_links_refused: Counter,
    /// What the listeners refused (connections over `max_connections_per_ip`).
    pub(crate) serving: Arc<ServeStats>,
    pub(crate) coordinator_connected: AtomicBool,
    pub(crate) registrations: Counter,
    pub(crate) dist: Distributions,
}

/// What operators need as distributions, not totals.
#[derive(Debug)]
pub(crate) struct Distributions {
    /// From a client's `Subscribe` to its first `Ack` (confirmed by every linked peer, or
    /// `subscribe_sync_timeout_ms`), seconds.
    pub(crate) subscribe_ack_seconds: Histogram,
    /// Messages in each batch handed to a topic's local subscribers.
    pub(crate) fanout_batch_messages: Histogram,
    /// Frames a client's queue held when messages for it were dropped.
    pub(crate) queue_depth_at_drop: Histogram,
}

impl Default for Distributions {
    fn default() -> Self {
        use relaymesh_net::metrics::{COUNTS, LATENCY_SECONDS};
        Self {
            subscribe_ack_seconds: Histogram::new(LATENCY_SECONDS),
            fanout_batch_messages: Histogram::new(COUNTS),
            queue_depth_at_drop: Histogram::new(COUNTS),
        }
    }
}
