//! What an operator or an application backend asks of this server through the coordinator
//! (its admin API): drain it for an upgrade, close a client's sessions, list its clients,
//! topics and a topic's subscribers, report its peers and counters, and publish a backend's
//! message through the same publish path as a client's.
//!
//! A drained server takes no new clients (it refuses reservations and connections and reports
//! itself draining, so the coordinator sends logins elsewhere) and asks each client to move
//! with `Reconnect{reason}`; the sessions stay up until the clients close them (the client
//! library closes its connection and logs in again elsewhere). A session that cannot take the
//! notice (its queue is full) is closed with `SHUTTING_DOWN`, which moves it as well. A session
//! that attaches while the drain starts is asked as it joins. Undraining lifts it. A restart
//! forgets it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use relaymesh_net::link::LastWords;
use relaymesh_net::sync::lock;
use relaymesh_proto::frame::Sender;
use relaymesh_proto::v1::{self, ErrorCode};
use relaymesh_proto::{encode, error};
use tokio::sync::oneshot;

use crate::Server;
use crate::control::PeerLink;
use crate::routes::{self, Subscriber};

/// A backend's change to one session's subscriptions, waiting for the session to take it.
#[derive(Debug)]
pub(crate) struct SessionOp {
    pub(crate) topics: Vec<String>,
    pub(crate) unsubscribe: bool,
    /// The outcome, once the session has made the change (and, subscribing, the peers have
    /// it or `subscribe_sync_timeout_ms` passed).
    pub(crate) done: oneshot::Sender<Result<(), v1::Error>>,
}

/// Changes one session may have waiting.
pub(crate) const MAX_SESSION_OPS: usize = 16;
/// Topics in one change.
const MAX_CHANGE_TOPICS: usize = 100;

/// The topic of the forward that answers a peer's `Flush`: delivered to nobody.
pub(crate) const FLUSH_TOPIC: &str = "@flush";

/// A flush of the peer links for a leaving client: the peers yet to answer.
#[derive(Debug)]
pub(crate) struct Flushing {
    waiting: BTreeSet<Arc<str>>,
    done: Option<oneshot::Sender<()>>,
}

impl Server {
    /// Drains (`drain.drained`) or undrains this server.
    pub(crate) fn drain(&self, drain: &v1::Drain) {
        if drain.drained {
            *lock(&self.drain_reason) = drain.reason.clone();
        }
        let was = self.drained.swap(drain.drained, Ordering::Relaxed);
        self.load_changed();
        if !drain.drained {
            if was {
                tracing::info!("undrained: taking clients again");
            }
            return;
        }
        let sessions: Vec<Arc<Subscriber>> = lock(&self.sessions).values().cloned().collect();
        tracing::info!(
            clients = sessions.len(),
            reason = %drain.reason,
            "drained: asking every client to move"
        );
        for session in sessions {
            self.ask_to_move(&session);
        }
    }

    /// Sends `session` a `Reconnect` (behind what is queued for it, like any delivery), or
    /// closes it with `SHUTTING_DOWN` if its queue cannot take it: either way it moves.
    pub(crate) fn ask_to_move(&self, session: &Subscriber) {
        let frame = reconnect_frame(&lock(&self.drain_reason));
        if matches!(
            session.send(&frame, 1, false),
            crate::routes::Enqueued::Full
        ) {
            let words = LastWords::error::<v1::ServerToClient>(error(
                ErrorCode::ShuttingDown,
                "this server is drained; connect through the coordinator again",
            ));
            session.closer.close(Some(words));
        }
    }

    /// Waits until every linked peer has sent this server everything it routed here before
    /// now (each queues a `@flush` forward behind them, answering `Flush`), or until
    /// `subscribe_sync_timeout_ms`. A client that leaves after this missed nothing routed to
    /// it here before its new server's subscription was confirmed, even what was still on its
    /// way from a peer when it asked to leave.
    pub(crate) async fn flush_peers(&self) {
        let peers: Vec<Arc<PeerLink>> = lock(&self.peer_links).values().cloned().collect();
        if peers.is_empty() {
            return;
        }
        let nonce = self.next_id();
        let (done, flushed) = oneshot::channel();
        lock(&self.flushes).insert(
            nonce,
            Flushing {
                waiting: peers.iter().map(|p| p.server_id.clone()).collect(),
                done: Some(done),
            },
        );
        let frame = encode(&v1::PeerMessage::flush(v1::Flush { nonce }));
        for peer in &peers {
            // Not `send_ctrl`: a control queue too full for a flush (a drain of very many
            // clients at once) must not cost the link; that peer is just not waited for.
            if peer.ctrl.try_send(frame.clone()).is_err() {
                tracing::debug!(peer = %peer.server_id, "peer control queue full; not flushed");
                self.flushed(nonce, &peer.server_id);
            }
        }
        let wait = self.config.subscribe_sync_timeout();
        if tokio::time::timeout(wait, flushed).await.is_err() {
            let late: Vec<Arc<str>> = lock(&self.flushes)
                .get(&nonce)
                .map(|f| f.waiting.iter().cloned().collect())
                .unwrap_or_default();
            tracing::warn!(
                ?late,
                "peers did not answer a flush in time; the client leaves anyway"
            );
        }
        lock(&self.flushes).remove(&nonce);
    }

    /// `peer` answered flush `nonce`: everything it routed here before is in.
    pub(crate) fn flushed(&self, nonce: u64, peer: &str) {
        let mut flushes = lock(&self.flushes);
        if let Some(flushing) = flushes.get_mut(&nonce) {
            flushing.waiting.remove(peer);
            if flushing.waiting.is_empty()
                && let Some(done) = flushing.done.take()
            {
                let _ = done.send(());
            }
        }
    }

    /// `peer` asked for flush `nonce`: its answer goes behind every forward queued for it.
    pub(crate) fn flush_to(&self, peer: &PeerLink, nonce: u64) {
        let from = Sender {
            alias: "",
            role: "",
            seq: nonce,
            resent_from: "",
            node: "",
            signal: 0,
            position: Default::default(),
        };
        let frame = relaymesh_proto::frame::forward_frame("", FLUSH_TOPIC, from, &[]);
        routes::forward_to(&peer.out, &frame, ("", FLUSH_TOPIC), &self.stats);
    }

    /// Drained by an operator (not shutting down).
    pub(crate) fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Answers a query of the coordinator's admin API. Arguments were checked there; what
    /// could only be checked here (a topic's form, a payload's size) is an `Error` answer,
    /// with nothing done.
    pub(crate) fn answer(
        &self,
        query: v1::ServerQuery,
        publisher: &mut routes::Publisher,
    ) -> v1::ServerAnswer {
        use v1::server_answer::Kind as Answer;
        use v1::server_query::Kind as Query;
        let kind = match query.kind {
            Some(Query::Kick(kick)) => Answer::Kicked(self.kick(&kick)),
            Some(Query::ListClients(list)) => Answer::Clients(self.list_clients(&list)),
            Some(Query::Details(_)) => Answer::Details(self.details()),
            Some(Query::Publish(publish)) => match self.backend_publish(publish, publisher) {
                Ok(reached) => Answer::Published(v1::BackendPublished { reached }),
                Err(e) => Answer::Error(e),
            },
            Some(Query::Topics(list)) => {
                let (topics, more) = self.routes.topics(
                    &list.scope,
                    &list.prefix,
                    &list.after,
                    (limit(list.limit), MAX_ANSWER_BYTES),
                );
                Answer::Topics(v1::TopicList {
                    topics: topics
                        .into_iter()
                        .map(|(topic, subscribers)| v1::ActiveTopic { topic, subscribers })
                        .collect(),
                    more,
                })
            }
            Some(Query::Presence(presence)) => Answer::Clients(self.presence_of(&presence)),
            // Answered by `change_subscriptions`, from a task of its own.
            Some(Query::Subscriptions(_)) => Answer::Error(error(
                ErrorCode::Internal,
                "subscription changes are answered apart",
            )),
            None => Answer::Error(relaymesh_proto::empty("ServerQuery")),
        };
        v1::ServerAnswer {
            request_id: query.request_id,
            kind: Some(kind),
        }
    }

    /// Changes the subscriptions of the sessions of `change.alias` here, as its backend asked;
    /// how many sessions changed, or why not.
    pub(crate) async fn change_subscriptions(
        &self,
        change: v1::ChangeSubscriptions,
    ) -> v1::server_answer::Kind {
        use v1::server_answer::Kind as Answer;
        if change.topics.is_empty() || change.topics.len() > MAX_CHANGE_TOPICS {
            return Answer::Error(error(
                ErrorCode::BadFrame,
                format!("topics: 1 to {MAX_CHANGE_TOPICS} topics"),
            ));
        }
        for topic in &change.topics {
            if let Err(e) = relaymesh_proto::topic::validate(topic, self.config.max_topic_bytes) {
                return Answer::Error(error(ErrorCode::InvalidTopic, format!("{topic:?}: {e}")));
            }
        }
        let sessions: Vec<Arc<Subscriber>> = lock(&self.sessions)
            .values()
            .filter(|s| *s.alias == *change.alias)
            .cloned()
            .collect();
        let mut waiting = Vec::new();
        for session in &sessions {
            let (done, outcome) = oneshot::channel();
            {
                let mut ops = lock(&self.session_ops);
                let queued = ops.entry(session.id).or_default();
                if queued.len() >= MAX_SESSION_OPS {
                    return Answer::Error(error(
                        ErrorCode::LimitExceeded,
                        format!("{MAX_SESSION_OPS} changes already wait for this client"),
                    ));
                }
                queued.push(SessionOp {
                    topics: change.topics.clone(),
                    unsubscribe: change.unsubscribe,
                    done,
                });
            }
            session.ops_ready.notify_one();
            waiting.push(outcome);
        }
        // The session answers once the change is made; one that closes first drops its ops.
        let wait = self.config.subscribe_sync_timeout() * 2;
        let mut changed = 0;
        let mut refused = None;
        for outcome in waiting {
            match tokio::time::timeout(wait, outcome).await {
                Ok(Ok(Ok(()))) => changed += 1,
                Ok(Ok(Err(e))) => refused = Some(e),
                Ok(Err(_)) | Err(_) => {}
            }
        }
        // A session that closed as the change was queued left it behind: forgotten.
        {
            let live = lock(&self.sessions);
            lock(&self.session_ops).retain(|id, _| live.contains_key(id));
        }
        match refused {
            Some(e) if changed == 0 => Answer::Error(e),
            _ => Answer::Changed(changed),
        }
    }

    /// The changes waiting for session `id`.
    pub(crate) fn take_session_ops(&self, id: crate::interest::SessionId) -> Vec<SessionOp> {
        lock(&self.session_ops).remove(&id).unwrap_or_default()
    }

    /// This server's clients of `list.scope` (all, if empty), by alias, after `list.after`.
    fn list_clients(&self, list: &v1::ListClients) -> v1::ClientList {
        let sessions: Vec<Arc<Subscriber>> = lock(&self.sessions)
            .values()
            .filter(|s| list.scope.is_empty() || *s.scope == *list.scope)
            .filter(|s| *s.alias > *list.after)
            .cloned()
            .collect();
        page_of(sessions, limit(list.limit))
    }

    /// The subscribers here of `presence.topic` of `presence.scope`.
    fn presence_of(&self, presence: &v1::TopicPresence) -> v1::ClientList {
        let subscribers: Vec<Arc<Subscriber>> = self
            .routes
            .get(&presence.scope, &presence.topic)
            .map(|route| {
                route
                    .subscribers
                    .iter()
                    .filter(|s| *s.alias > *presence.after)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        page_of(subscribers, limit(presence.limit))
    }

    /// Its peer links and the counters of `/v1/stats`.
    fn details(&self) -> v1::ServerDetailsReply {
        let peers = lock(&self.peer_links)
            .keys()
            .map(|id| id.to_string())
            .collect();
        let counters = match crate::api::stats_json(self) {
            serde_json::Value::Object(fields) => fields
                .into_iter()
                .filter_map(|(name, value)| value.as_u64().map(|n| (name, n)))
                .collect(),
            _ => Default::default(),
        };
        v1::ServerDetailsReply { peers, counters }
    }

    /// Publishes a backend's message on each of its topics, through the publish path of
    /// clients' messages (local subscribers, then each interested peer once); how many topics
    /// had a subscriber anywhere.
    fn backend_publish(
        &self,
        publish: v1::BackendPublish,
        publisher: &mut routes::Publisher,
    ) -> Result<u32, v1::Error> {
        let max_payload = self.config.max_payload_bytes();
        if publish.payload.len() > max_payload {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!(
                    "payload of {} bytes exceeds the limit of {max_payload} bytes",
                    publish.payload.len()
                ),
            ));
        }
        let max_topic = self.config.max_topic_bytes;
        for topic in &publish.topics {
            relaymesh_proto::topic::validate(topic, max_topic)
                .map_err(|e| error(ErrorCode::InvalidTopic, format!("{topic:?}: {e}")))?;
        }
        let mut reached = 0;
        for topic in &publish.topics {
            let msg = routes::Message {
                origin: routes::Origin::Local,
                scope: &publish.scope,
                topic,
                from: Sender {
                    alias: &publish.sender,
                    role: BACKEND_ROLE,
                    ..Sender::default()
                },
                payload: &publish.payload,
            };
            if publisher.publish(&self.routes, &self.stats, msg, || Ok::<(), v1::Error>(()))? {
                reached += 1;
            }
        }
        publisher.flush(&self.stats);
        self.stats
            .backend_publishes
            .add(publish.topics.len() as u64);
        Ok(reached)
    }

    /// Closes the sessions of the client with alias `kick.alias`; how many.
    pub(crate) fn kick(&self, kick: &v1::Kick) -> u32 {
        let sessions: Vec<Arc<Subscriber>> = lock(&self.sessions)
            .values()
            .filter(|s| *s.alias == *kick.alias)
            .cloned()
            .collect();
        let reason = if kick.reason.is_empty() {
            "an operator closed this session".to_owned()
        } else {
            format!("an operator closed this session: {}", kick.reason)
        };
        let mut closed = 0;
        for session in sessions {
            let words = LastWords::error::<v1::ServerToClient>(error(ErrorCode::Kicked, &reason));
            if session.closer.close(Some(words)) {
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::info!(alias = %kick.alias, closed, "kicked");
        }
        closed
    }
}

/// The role a backend's messages carry.
pub(crate) const BACKEND_ROLE: &str = "backend";
/// Clients or topics in one answer when the query names no limit, and the most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

fn limit(asked: u32) -> usize {
    match usize::try_from(asked) {
        Ok(0) | Err(_) => DEFAULT_LIMIT,
        Ok(n) => n.min(MAX_LIMIT),
    }
}

/// Bytes of items in one answer at most, so it fits a frame of the coordinator link
/// (`max_frame_bytes`, 64 KiB by default) with room to spare; past it, `more` says so.
pub(crate) const MAX_ANSWER_BYTES: usize = 32 * 1024;

/// `sessions`, by alias, at most `limit` of them (and [`MAX_ANSWER_BYTES`]), as a client list.
fn page_of(mut sessions: Vec<Arc<Subscriber>>, limit: usize) -> v1::ClientList {
    sessions.sort_unstable_by(|a, b| a.alias.cmp(&b.alias));
    let mut bytes = 0;
    let fits = sessions
        .iter()
        .take(limit)
        .take_while(|s| {
            bytes += s.alias.len()
                + s.scope.len()
                + s.role.len()
                + s.node.as_deref().map_or(0, str::len)
                + s.client.as_ref().map_or(0, |c| c.client_id.len())
                + 32;
            bytes <= MAX_ANSWER_BYTES
        })
        .count()
        .max(1);
    let more = sessions.len() > fits;
    sessions.truncate(fits);
    v1::ClientList {
        clients: sessions
            .iter()
            .map(|s| v1::ClientInfo {
                alias: s.alias.to_string(),
                scope: s.scope.to_string(),
                role: s.role.to_string(),
                client_id: s
                    .client
                    .as_ref()
                    .map(|c| c.client_id.to_string())
                    .unwrap_or_default(),
                node_id: s.node.as_deref().unwrap_or_default().to_owned(),
                topics: s.topics.load(Ordering::Relaxed),
            })
            .collect(),
        more,
    }
}

/// `Reconnect{reason}`, as a frame for a session's data queue.
fn reconnect_frame(reason: &str) -> Bytes {
    let reason = if reason.is_empty() {
        "this server is being drained".to_owned()
    } else {
        reason.to_owned()
    };
    relaymesh_net::wire::framed(&encode(&v1::ServerToClient::reconnect(v1::Reconnect {
        reason,
    })))
}
