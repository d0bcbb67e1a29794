//! The control task: the single owner of subscription and interest state.
//!
//! Sessions and peer links send it [`Command`]s over a bounded channel (they wait when it is
//! full). It applies each command to [`Interest`], then carries out the effects in an order that
//! keeps the delivery guarantees: routes are rebuilt and published first, then interest messages
//! and acknowledgements go to peers, then replaced links are closed, and only then are waiting
//! subscribe requests answered.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relaymesh_net::link::{Backlog, Closer, DataTx, LastWords};
use relaymesh_net::queue;
use relaymesh_proto::v1;
use relaymesh_proto::{ErrorCode, encode};
use tokio::sync::{mpsc, oneshot};

use crate::Server;
use crate::interest::{Effects, Interest, LinkId, SessionId, ToPeer, TopicKey, WaiterId, coalesce};
use crate::routes::{PeerOut, Route, Subscriber};

/// A live peer link, as the control task sees it.
#[derive(Debug)]
pub(crate) struct PeerLink {
    pub(crate) server_id: Arc<str>,
    pub(crate) link: LinkId,
    /// Control queue of the link's writer (interest messages, acks, pings). A link whose
    /// control queue overflows is closed and re-established with a full interest exchange.
    pub(crate) ctrl: queue::Sender<Bytes>,
    /// The data path (forwards), shared with routes.
    pub(crate) out: Arc<PeerOut>,
    pub(crate) closer: Closer,
    /// Whether this server dialed the link (`true`) or accepted it.
    pub(crate) dialed: bool,
    /// Topics the peer is interested in, kept for stats.
    pub(crate) remote_topics: AtomicU64,
    /// Forwards received from the peer.
    pub(crate) forwards_in: relaymesh_net::metrics::Counter,
    /// Forwards the peer said it dropped for this server (`ForwardDropped`).
    pub(crate) told: relaymesh_net::metrics::Counter,
    /// The link's name, shared by both sides (`PeerHello.link_nonce`).
    pub(crate) nonce: u64,
    /// Fires once the link is over: its reader and writer done, its counts final and its
    /// replay buffer handed to `out`.
    pub(crate) ended: tokio_util::sync::CancellationToken,
}

/// A peer link's queues and closer, made before its handshake.
#[derive(Debug)]
pub(crate) struct PeerQueues {
    pub(crate) ctrl: queue::Sender<Bytes>,
    pub(crate) data: DataTx,
    pub(crate) backlog: Arc<Backlog>,
    pub(crate) closer: Closer,
    /// The replay buffer the link keeps, if any.
    pub(crate) replay: Option<relaymesh_net::link::ReplayLimits>,
}

impl PeerLink {
    pub(crate) fn new(
        server_id: Arc<str>,
        link: LinkId,
        queues: PeerQueues,
        dialed: bool,
        nonce: u64,
    ) -> Self {
        let PeerQueues {
            ctrl,
            data,
            backlog,
            closer,
            replay,
        } = queues;
        let out = Arc::new(PeerOut::new(data, backlog, replay));
        Self {
            server_id,
            link,
            ctrl,
            out,
            closer,
            dialed,
            remote_topics: AtomicU64::new(0),
            forwards_in: Default::default(),
            told: Default::default(),
            nonce,
            ended: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Queues a control frame; closes the link if its control queue is full.
    pub(crate) fn send_ctrl(&self, frame: Bytes) {
        if self.ctrl.try_send(frame).is_err() && !self.closer.is_closed() {
            tracing::warn!(peer = %self.server_id, "peer control queue full; resetting the link");
            let words = v1::Error::new(ErrorCode::LimitExceeded, "peer control queue overflowed");
            self.closer
                .close(Some(LastWords::error::<v1::PeerMessage>(words)));
        }
    }
}

/// Requests to the control task.
#[derive(Debug)]
pub(crate) enum Command {
    /// `done` fires once every linked peer has applied the change; `waiter` (unique, from
    /// `Server::next_id`) names the request in [`Command::Pending`].
    Subscribe {
        session: Arc<Subscriber>,
        topics: Vec<TopicKey>,
        waiter: WaiterId,
        done: oneshot::Sender<()>,
    },
    Unsubscribe {
        session: SessionId,
        topics: Vec<TopicKey>,
        waiter: WaiterId,
        done: oneshot::Sender<()>,
    },
    /// Which peers `waiter` still waits for (none once it is complete). Asked only by a
    /// session whose request is taking longer than `subscribe_sync_timeout_ms`.
    Pending {
        waiter: WaiterId,
        reply: oneshot::Sender<Vec<Arc<str>>>,
    },
    /// With `done`, as for [`Command::Unsubscribe`]: it fires once every linked peer has
    /// applied the removal of what only this session subscribed to.
    SessionClosed {
        session: SessionId,
        done: Option<(WaiterId, oneshot::Sender<()>)>,
    },
    PeerUp {
        peer: Arc<PeerLink>,
    },
    PeerDown {
        server_id: Arc<str>,
        link: LinkId,
    },
    /// A link down since `PeerDown` did not come back within `peer_resume_ms`.
    PeerExpire {
        server_id: Arc<str>,
        link: LinkId,
    },
    /// The coordinators no longer list the peer: a link of it that is down expires now.
    PeerLeft {
        server_id: Arc<str>,
    },
    PeerInterest {
        server_id: Arc<str>,
        link: LinkId,
        interest: v1::Interest,
    },
    PeerAck {
        server_id: Arc<str>,
        link: LinkId,
        seq: u64,
    },
}

/// Commands applied together before routes are rebuilt: a burst of subscriptions to one topic
/// rebuilds its route once per batch, not once per subscriber.
const MAX_BATCH: usize = 1_024;
/// How often waiters whose session gave up (timed out or closed) are swept away.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The control task's state: subscriptions and interest, plus the requests waiting on peers.
struct Control {
    state: Interest<Arc<Subscriber>, Arc<PeerLink>>,
    /// Subscribe/unsubscribe requests (and closed node sessions) waiting for peers, by waiter
    /// id; the requesting session (or the task it leaves the wait to) holds the receiver and
    /// answers its client (or reports its node gone) when the sender fires.
    waiting: HashMap<WaiterId, oneshot::Sender<()>>,
    last_sweep: Instant,
}

impl Control {
    fn wait(&mut self, waiter: WaiterId, done: oneshot::Sender<()>) -> WaiterId {
        self.waiting.insert(waiter, done);
        waiter
    }

    fn handle(&mut self, command: Command) -> Effects<Arc<PeerLink>> {
        match command {
            Command::Subscribe {
                session,
                topics,
                waiter,
                done,
            } => {
                let waiter = self.wait(waiter, done);
                self.state.subscribe(session.id, &session, topics, waiter)
            }
            Command::Unsubscribe {
                session,
                topics,
                waiter,
                done,
            } => {
                let waiter = self.wait(waiter, done);
                self.state.unsubscribe(session, topics, waiter)
            }
            Command::Pending { waiter, reply } => {
                let _ = reply.send(self.state.pending(waiter).unwrap_or_default());
                Effects::default()
            }
            Command::SessionClosed { session, done } => {
                let waiter = done.map(|(waiter, done)| self.wait(waiter, done));
                self.state.session_closed(session, waiter)
            }
            Command::PeerUp { peer } => {
                let name = peer.server_id.clone();
                self.state.peer_up(&name, peer.link, peer)
            }
            Command::PeerDown { server_id, link } => self.state.peer_down(&server_id, link),
            Command::PeerExpire { server_id, link } => self.state.peer_expire(&server_id, link),
            Command::PeerLeft { server_id } => self.state.peer_left(&server_id),
            Command::PeerInterest {
                server_id,
                link,
                interest,
            } => {
                let keys = |refs: Vec<v1::TopicRef>| {
                    refs.into_iter()
                        .map(|r| TopicKey::new(&r.account, &r.topic))
                        .collect()
                };
                let effects = self.state.peer_interest(
                    &server_id,
                    link,
                    interest.seq,
                    interest.full,
                    keys(interest.add),
                    keys(interest.remove),
                );
                if let Some((peer, _)) = effects.to_peers.first() {
                    let topics = self.state.peer_interest_len(&server_id) as u64;
                    peer.remote_topics.store(topics, Ordering::Relaxed);
                }
                effects
            }
            Command::PeerAck {
                server_id,
                link,
                seq,
            } => self.state.peer_ack(&server_id, link, seq),
        }
    }

    /// Forgets requests whose session stopped waiting, so they do not pile up behind a peer
    /// that never acknowledges.
    fn sweep(&mut self) {
        if self.last_sweep.elapsed() < SWEEP_EVERY || self.waiting.is_empty() {
            return;
        }
        self.last_sweep = Instant::now();
        let abandoned: HashSet<u64> = self
            .waiting
            .iter()
            .filter(|(_, done)| done.is_closed())
            .map(|(id, _)| *id)
            .collect();
        if !abandoned.is_empty() {
            self.waiting.retain(|id, _| !abandoned.contains(id));
            self.state.cancel_waiters(&abandoned);
        }
    }
}

/// Runs until the server shuts down.
pub(crate) async fn run(server: Arc<Server>, mut commands: mpsc::Receiver<Command>) {
    let shutdown = server.shutdown.clone();
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    let mut control = Control {
        state: Interest::new(),
        waiting: HashMap::new(),
        last_sweep: Instant::now(),
    };
    loop {
        let first = tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(command) => command,
                None => break,
            },
            _ = &mut stopped => break,
        };
        let mut effects = control.handle(first);
        for _ in 1..MAX_BATCH {
            let Ok(command) = commands.try_recv() else {
                break;
            };
            effects.merge(control.handle(command));
        }
        apply(&server, &mut control.state, effects, &mut control.waiting);
        control.sweep();
        server
            .stats
            .topics
            .store(control.state.local_topics() as u64, Ordering::Relaxed);
    }
}

/// Carries out a batch's effects in the order the guarantees need: routes first, then peer
/// messages (acknowledgements promise the routes are in place), then closes, then answers.
fn apply(
    server: &Server,
    state: &mut Interest<Arc<Subscriber>, Arc<PeerLink>>,
    effects: Effects<Arc<PeerLink>>,
    waiting: &mut HashMap<WaiterId, oneshot::Sender<()>>,
) {
    let mut created = false;
    for topic in &effects.routes {
        let route = state.route(topic).map(|(subscribers, peers)| {
            Route::new(
                subscribers,
                peers.into_iter().map(|p| p.out.clone()).collect(),
            )
        });
        created |= server.routes.set(topic, route);
    }
    if created {
        server.routes.publish();
    }
    let to_peers = coalesce(effects.to_peers, |peer| Arc::as_ptr(peer) as usize);
    for (peer, message) in to_peers {
        let frame = match message {
            ToPeer::Interest {
                seq,
                full,
                add,
                remove,
            } => {
                let refs = |keys: Vec<TopicKey>| {
                    keys.into_iter()
                        .map(|k| v1::TopicRef {
                            account: k.account.to_string(),
                            topic: k.topic.to_string(),
                        })
                        .collect()
                };
                v1::PeerMessage::interest(v1::Interest {
                    seq,
                    full,
                    add: refs(add),
                    remove: refs(remove),
                })
            }
            ToPeer::Ack { seq } => v1::PeerMessage::interest_ack(v1::InterestAck { seq }),
        };
        peer.send_ctrl(encode(&frame));
    }
    for peer in effects.close {
        let words = v1::Error::new(
            ErrorCode::Replaced,
            "a newer link to the same server replaced this one",
        );
        peer.closer
            .close(Some(LastWords::error::<v1::PeerMessage>(words)));
    }
    for waiter in effects.completed {
        if let Some(done) = waiting.remove(&waiter) {
            let _ = done.send(());
        }
    }
}
