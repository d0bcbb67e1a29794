//! The durable inbox: direct messages for nodes that had no session, stored in the `sql`
//! account store until the node acknowledges them.
//!
//! Comm servers send `InboxPut` (a message whose node they found offline), `InboxFetch` (a
//! node's session reading its inbox) and `InboxDone` (what a node acknowledged) over the server
//! link. One writer task owns the inbox tables: it takes whatever has queued up while the last
//! transaction ran (up to `max_batch`) and writes it in **one transaction**, a group commit, so
//! a burst of messages costs one commit (one fsync) rather than one each; only then does it
//! answer the puts (`InboxStored`), so nothing is confirmed that was not written. Reads are
//! answered after the commit, in order. A message stored for a node that has a session by then
//! (it logged in meanwhile) is announced to its servers (`InboxNudge`), so it never waits for
//! the next login. Expired messages are deleted every `sweep_ms`, counted, and reported
//! (`InboxExpired`) to the servers holding sessions of their sending nodes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, ErrorCode};
use relaymesh_proto::{encode, error};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::App;
use crate::server_link::ServerLink;
use crate::sql::{ExpiredMessage, SqlStore};

/// `[inbox]` in the coordinator's config.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// Messages one node's inbox holds; more are refused with `INBOX_FULL`.
    pub max_messages: u64,
    /// Bytes of payload one node's inbox holds.
    pub max_bytes: u64,
    /// Messages older than this are deleted, counted in `inbox_expired`, and reported to their
    /// sending node if it has a session.
    pub ttl_ms: u64,
    /// How often expired messages are looked for.
    pub sweep_ms: u64,
    /// Requests queued for the writer; beyond it puts are refused with `UNAVAILABLE`.
    pub queue: usize,
    /// Most requests written in one transaction.
    pub max_batch: usize,
    /// Messages one `InboxFetch` returns at most.
    pub max_fetch: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 16 * 1024 * 1024,
            ttl_ms: 7 * 24 * 3600 * 1000,
            sweep_ms: 60_000,
            queue: 65_536,
            max_batch: 1_024,
            max_fetch: 1_024,
        }
    }
}

/// A node's limits, as the writer applies them.
#[derive(Debug, Clone, Copy)]
pub struct InboxLimits {
    /// Messages one inbox holds.
    pub max_messages: u64,
    /// Payload bytes one inbox holds.
    pub max_bytes: u64,
}

/// One request for the writer, and the server link that asked.
#[derive(Debug)]
pub(crate) enum Op {
    Put(v1::InboxPut, Arc<ServerLink>),
    Fetch(v1::InboxFetch, Arc<ServerLink>),
    Done(v1::InboxDone),
}

/// The writer's queue; `None` when the account store keeps no inbox.
#[derive(Debug)]
pub(crate) struct Inbox {
    tx: Option<mpsc::Sender<Op>>,
}

impl Inbox {
    /// An inbox for `store` (a writer task when it is `sql`), and the writer to spawn.
    pub(crate) fn new(
        store: &crate::accounts::Store,
        config: &InboxConfig,
    ) -> (Self, Option<(SqlStore, mpsc::Receiver<Op>)>) {
        match store {
            crate::accounts::Store::Sql(db) => {
                let (tx, rx) = mpsc::channel(config.queue.max(1));
                (Self { tx: Some(tx) }, Some((db.clone(), rx)))
            }
            _ => (Self { tx: None }, None),
        }
    }

    /// Hands `op` to the writer; answers at once when it cannot take it.
    pub(crate) fn submit(&self, op: Op) {
        let Some(tx) = &self.tx else {
            refuse(
                op,
                ErrorCode::NotConnected,
                "this coordinator keeps no inbox (accounts.store is not sql): the node has no session",
            );
            return;
        };
        if let Err(e) = tx.try_send(op) {
            let op = match e {
                mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op) => op,
            };
            refuse(
                op,
                ErrorCode::Unavailable,
                "the inbox is busy; nothing was stored",
            );
        }
    }
}

/// Answers `op` with `code` (puts and fetches; a `Done` is only lost, and comes again).
fn refuse(op: Op, code: ErrorCode, message: &str) {
    match op {
        Op::Put(put, link) => {
            if put.request_id != 0 {
                link.send(stored(put.request_id, 0, Some(error(code, message))));
            }
        }
        Op::Fetch(fetch, link) => {
            link.send(batch(
                fetch.request_id,
                Vec::new(),
                Some(error(code, message)),
            ));
        }
        Op::Done(_) => {}
    }
}

fn stored(request_id: u64, inbox_id: u64, error: Option<v1::Error>) -> Bytes {
    encode(&v1::CoordinatorToServer::inbox_stored(v1::InboxStored {
        request_id,
        inbox_id,
        error,
    }))
}

fn batch(request_id: u64, messages: Vec<v1::InboxMessage>, error: Option<v1::Error>) -> Bytes {
    encode(&v1::CoordinatorToServer::inbox_batch(v1::InboxBatch {
        request_id,
        messages,
        error,
    }))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The writer: group commits until shutdown.
pub(crate) async fn run(app: Arc<App>, db: SqlStore, mut rx: mpsc::Receiver<Op>) {
    let config = app.config.inbox;
    let limits = InboxLimits {
        max_messages: config.max_messages,
        max_bytes: config.max_bytes,
    };
    let mut sweep = tokio::time::interval(Duration::from_millis(config.sweep_ms.max(100)));
    let mut ops = Vec::with_capacity(config.max_batch);
    loop {
        tokio::select! {
            () = app.shutdown.cancelled() => return,
            _ = sweep.tick() => {
                let limit = u32::try_from(config.max_batch).unwrap_or(u32::MAX);
                match db.inbox_expire(now_ms().saturating_sub(config.ttl_ms), limit).await {
                    Ok(expired) => {
                        // More may be waiting: the next chunk right after what queued meanwhile.
                        if expired.len() >= limit as usize {
                            sweep.reset_immediately();
                        }
                        if !expired.is_empty() {
                            tracing::info!(expired = expired.len(), "inbox messages expired");
                            app.stats.inbox_expired.add(expired.len() as u64);
                            report_expired(&app, expired);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "expiring inbox messages failed"),
                }
                continue;
            }
            got = rx.recv_many(&mut ops, config.max_batch.max(1)) => {
                if got == 0 {
                    return;
                }
            }
        }
        commit(&app, &db, limits, &mut ops).await;
        ops.clear();
    }
}

/// Writes one batch and answers it.
async fn commit(app: &App, db: &SqlStore, limits: InboxLimits, ops: &mut Vec<Op>) {
    let now = now_ms();
    let mut done = Vec::new();
    let mut puts = Vec::new();
    for op in ops.iter() {
        match op {
            Op::Done(d) => done.push((d.node_id.clone(), d.up_to)),
            Op::Put(put, link) => puts.push((put, link)),
            Op::Fetch(..) => {}
        }
    }
    if !done.is_empty() || !puts.is_empty() {
        let rows: Vec<&v1::InboxPut> = puts.iter().map(|(put, _)| *put).collect();
        let result = db.inbox_commit(&done, &rows, limits, now).await;
        app.stats.inbox_commits.inc();
        match result {
            Ok(outcomes) => {
                let mut nudges = Vec::new();
                for ((put, link), outcome) in puts.iter().zip(outcomes) {
                    let answer = match outcome {
                        Ok(id) => {
                            app.stats.inbox_stored.inc();
                            nudges.push((put.scope.clone(), put.to_node.clone()));
                            stored(put.request_id, id, None)
                        }
                        Err(code) => {
                            app.stats.inbox_refused.inc();
                            let message = match code {
                                ErrorCode::InboxFull => "the node's inbox is full",
                                _ => "no such node in your account",
                            };
                            stored(put.request_id, 0, Some(error(code, message)))
                        }
                    };
                    if put.request_id != 0 {
                        link.send(answer);
                    }
                }
                nudge(app, nudges);
            }
            Err(e) => {
                tracing::error!(error = %e, "inbox write failed; refusing its messages");
                for (put, link) in &puts {
                    app.stats.inbox_refused.inc();
                    if put.request_id != 0 {
                        let e = error(
                            ErrorCode::Unavailable,
                            "the inbox database is unavailable; nothing was stored",
                        );
                        link.send(stored(put.request_id, 0, Some(e)));
                    }
                }
            }
        }
    }
    for op in ops.drain(..) {
        let Op::Fetch(fetch, link) = op else { continue };
        let limit = fetch.limit.clamp(1, app.config.inbox.max_fetch);
        let answer = match db.inbox_fetch(&fetch.node_id, fetch.after_id, limit).await {
            Ok(messages) => batch(fetch.request_id, messages, None),
            Err(e) => {
                tracing::error!(error = %e, "inbox read failed");
                let e = error(ErrorCode::Unavailable, "the inbox database is unavailable");
                batch(fetch.request_id, Vec::new(), Some(e))
            }
        };
        link.send(answer);
    }
}

/// Tells the sending nodes of expired messages that have sessions, through the servers that
/// hold them (under the directory, then registry, lock, as presence is sent). A sender that is
/// not a node, or has no session, is only counted.
fn report_expired(app: &App, expired: Vec<ExpiredMessage>) {
    let mut by_sender: BTreeMap<(String, String), Vec<v1::Expired>> = BTreeMap::new();
    for e in expired {
        if !e.from_node.is_empty() && !e.scope.is_empty() {
            by_sender
                .entry((e.scope, e.from_node))
                .or_default()
                .push(e.message);
        }
    }
    if by_sender.is_empty() {
        return;
    }
    let directory = lock(&app.directory);
    let registry = lock(&app.registry);
    for ((scope, from_node), messages) in by_sender {
        let servers = directory.servers_of(&scope, &from_node);
        if servers.is_empty() {
            continue;
        }
        app.stats.inbox_expired_reported.add(messages.len() as u64);
        let frame = encode(&v1::CoordinatorToServer::inbox_expired(v1::InboxExpired {
            scope,
            from_node,
            messages,
        }));
        for (id, entry) in registry.iter() {
            if servers.iter().any(|s| s == id) {
                entry.handle.send(frame.clone());
            }
        }
    }
}

/// Tells the servers holding sessions of nodes that just got messages to read them.
fn nudge(app: &App, mut nodes: Vec<(String, String)>) {
    if nodes.is_empty() {
        return;
    }
    nodes.sort();
    nodes.dedup();
    let directory = lock(&app.directory);
    let registry = lock(&app.registry);
    for (scope, node) in nodes {
        let servers = directory.servers_of(&scope, &node);
        if servers.is_empty() {
            continue;
        }
        let frame = encode(&v1::CoordinatorToServer::inbox_nudge(v1::InboxNudge {
            scope,
            node_id: node,
        }));
        for (id, entry) in registry.iter() {
            if servers.iter().any(|s| s == id) {
                entry.handle.send(frame.clone());
            }
        }
    }
}
