//! What an operator asks of this server through the coordinator (its admin API): drain it for
//! an upgrade, or close a client's sessions.
//!
//! A drained server takes no new clients (it refuses reservations and connections and reports
//! itself draining, so the coordinator sends logins elsewhere) and asks each client to move
//! with `Reconnect{reason}`; the sessions stay up until the clients close them (the client
//! library closes its connection and logs in again elsewhere). A session that cannot take the
//! notice (its queue is full) is closed with `SHUTTING_DOWN`, which moves it as well. A session
//! that attaches while the drain starts is asked as it joins. Undraining lifts it. A restart
//! forgets it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use relaymesh_net::link::LastWords;
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, ErrorCode};
use relaymesh_proto::{encode, error};

use crate::Server;
use crate::routes::Subscriber;

impl Server {
    /// Drains (`drain.drained`) or undrains this server.
    pub(crate) fn drain(&self, drain: &v1::Drain) {
        if drain.drained {
            *lock(&self.drain_reason) = drain.reason.clone();
        }
        let was = self.drained.swap(drain.drained, Ordering::Relaxed);
        self.load_changed.notify_one();
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

    /// Drained by an operator (not shutting down).
    pub(crate) fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
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
