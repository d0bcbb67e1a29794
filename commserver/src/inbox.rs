//! The comm server's side of the durable inbox (kept by the coordinator; see the
//! coordinator's `inbox` module): sessions store direct messages for offline nodes, node
//! sessions read and acknowledge their inbox, all over the coordinator link. Answers come back
//! on that link and are handed to the session that asked as [`SessionEvent`]s, which its
//! reader takes in `wake`; a link that ends fails what is outstanding on it.

use std::collections::HashMap;

use bytes::Bytes;
use relaymesh_net::queue;
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, ErrorCode};
use relaymesh_proto::{encode, error};
use tokio::sync::mpsc;

use crate::Server;
use crate::interest::SessionId;

/// Events one session may have waiting; beyond it an answer is lost (and its message is sent
/// again by the client, unconfirmed).
pub(crate) const SESSION_EVENTS: usize = 1_024;
/// Inbox messages read per request (and delivered before the next is asked for, once the
/// client acknowledges them): within a client's default queue, few round trips for a full
/// inbox.
pub(crate) const PAGE: u32 = 1_024;

/// An answer for a session about the inbox.
#[derive(Debug)]
pub(crate) enum SessionEvent {
    /// Direct message `seq` for `to_node` was stored (its inbox id), or why not.
    Stored {
        seq: u64,
        to_node: String,
        result: Result<u64, v1::Error>,
    },
    /// A page of this session's node's inbox, or why it could not be read.
    Batch(Result<Vec<v1::InboxMessage>, v1::Error>),
    /// Something new is in this session's node's inbox.
    Nudge,
    /// Messages this session's node sent expired unread in their recipients' inboxes.
    Expired(Vec<v1::Expired>),
}

/// What an outstanding request was, to make its answer an event.
#[derive(Debug)]
enum Asked {
    Put { seq: u64, to_node: String },
    Fetch,
}

/// The server's part: the coordinator link to send on, sessions to answer, requests out.
#[derive(Debug, Default)]
pub(crate) struct Inboxes {
    /// The registered coordinator link's queue.
    link: std::sync::Mutex<Option<queue::Sender<Bytes>>>,
    sessions: std::sync::Mutex<HashMap<SessionId, mpsc::Sender<SessionEvent>>>,
    asked: std::sync::Mutex<HashMap<u64, (SessionId, Asked)>>,
}

impl Inboxes {
    /// The coordinator link is up (`Some`) or down: what was asked on the old one fails.
    pub(crate) fn set_link(&self, link: Option<queue::Sender<Bytes>>) {
        *lock(&self.link) = link;
        let asked: Vec<_> = lock(&self.asked).drain().collect();
        for (_, (session, asked)) in asked {
            let e = || error(ErrorCode::Unavailable, "the coordinator link was lost");
            let event = match asked {
                Asked::Put { seq, to_node } => SessionEvent::Stored {
                    seq,
                    to_node,
                    result: Err(e()),
                },
                Asked::Fetch => SessionEvent::Batch(Err(e())),
            };
            self.tell(session, event);
        }
    }

    /// Session `session` takes events through `tx` until [`Inboxes::leave`].
    pub(crate) fn join(&self, session: SessionId, tx: mpsc::Sender<SessionEvent>) {
        lock(&self.sessions).insert(session, tx);
    }

    pub(crate) fn leave(&self, session: SessionId) {
        lock(&self.sessions).remove(&session);
    }

    fn tell(&self, session: SessionId, event: SessionEvent) {
        if let Some(tx) = lock(&self.sessions).get(&session) {
            let _ = tx.try_send(event);
        }
    }

    /// Sends `msg` for `session`, remembering what it asked; `false` when there is no
    /// coordinator link (or its queue is full).
    fn ask(&self, session: SessionId, asked: Asked, msg: v1::ServerToCoordinator) -> bool {
        let Some(link) = lock(&self.link).clone() else {
            return false;
        };
        let request_id = match &msg.kind {
            Some(v1::server_to_coordinator::Kind::InboxPut(p)) => p.request_id,
            Some(v1::server_to_coordinator::Kind::InboxFetch(f)) => f.request_id,
            _ => 0,
        };
        lock(&self.asked).insert(request_id, (session, asked));
        if link.try_send(encode(&msg)).is_err() {
            lock(&self.asked).remove(&request_id);
            return false;
        }
        true
    }

    /// Asks the coordinator to store `put` for `session` (a fresh request id is set).
    pub(crate) fn put(&self, server: &Server, session: SessionId, mut put: v1::InboxPut) -> bool {
        put.request_id = server.next_id();
        let asked = Asked::Put {
            seq: put.seq,
            to_node: put.to_node.clone(),
        };
        self.ask(session, asked, v1::ServerToCoordinator::inbox_put(put))
    }

    /// Stores `put` with nobody to answer (a forward for a node that left this server).
    pub(crate) fn put_unattended(&self, mut put: v1::InboxPut) -> bool {
        put.request_id = 0;
        let Some(link) = lock(&self.link).clone() else {
            return false;
        };
        link.try_send(encode(&v1::ServerToCoordinator::inbox_put(put)))
            .is_ok()
    }

    /// Asks for node `node_id`'s inbox after `after_id`.
    pub(crate) fn fetch(
        &self,
        server: &Server,
        session: SessionId,
        scope: &str,
        node_id: &str,
        after_id: u64,
    ) -> bool {
        let fetch = v1::InboxFetch {
            request_id: server.next_id(),
            scope: scope.to_owned(),
            node_id: node_id.to_owned(),
            after_id,
            limit: PAGE,
        };
        self.ask(
            session,
            Asked::Fetch,
            v1::ServerToCoordinator::inbox_fetch(fetch),
        )
    }

    /// Node `node_id` acknowledged its inbox up to `up_to`.
    pub(crate) fn done(&self, scope: &str, node_id: &str, up_to: u64) -> bool {
        let Some(link) = lock(&self.link).clone() else {
            return false;
        };
        let done = v1::InboxDone {
            scope: scope.to_owned(),
            node_id: node_id.to_owned(),
            up_to,
        };
        link.try_send(encode(&v1::ServerToCoordinator::inbox_done(done)))
            .is_ok()
    }

    /// The coordinator's answer to a put.
    pub(crate) fn stored(&self, answer: v1::InboxStored) {
        let Some((session, Asked::Put { seq, to_node })) =
            lock(&self.asked).remove(&answer.request_id)
        else {
            return;
        };
        let result = match answer.error {
            Some(e) => Err(e),
            None => Ok(answer.inbox_id),
        };
        self.tell(
            session,
            SessionEvent::Stored {
                seq,
                to_node,
                result,
            },
        );
    }

    /// The coordinator's answer to a fetch.
    pub(crate) fn batch(&self, answer: v1::InboxBatch) {
        let Some((session, Asked::Fetch)) = lock(&self.asked).remove(&answer.request_id) else {
            return;
        };
        let result = match answer.error {
            Some(e) => Err(e),
            None => Ok(answer.messages),
        };
        self.tell(session, SessionEvent::Batch(result));
    }

    /// Tells `sessions` (of the sending node) that its messages `expired`.
    pub(crate) fn expired(&self, sessions: Vec<SessionId>, expired: Vec<v1::Expired>) {
        for session in sessions {
            self.tell(session, SessionEvent::Expired(expired.clone()));
        }
    }

    /// Tells `sessions` that their node's inbox has something new.
    pub(crate) fn nudge(&self, sessions: Vec<SessionId>) {
        for session in sessions {
            self.tell(session, SessionEvent::Nudge);
        }
    }
}
