//! The comm server's side of link 1: register with the coordinator, report load, answer key
//! reservations, follow peer changes, and reconnect with capped exponential backoff and jitter
//! whenever the link drops. While the coordinator is away, clients and peer links keep working;
//! only new logins wait for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relaymesh_net::link::{self, Closer, Flow, Heartbeat, WriterSetup};
use relaymesh_net::sync::lock;
use relaymesh_net::ws::ClientLink;
use relaymesh_proto::v1::{self, coordinator_to_server::Kind};
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION, check_version, encode, error, unexpected};
use tokio::sync::mpsc;

use crate::Server;
use crate::keys::KeyError;

/// Frames queued for the coordinator (answers and load reports).
const COORDINATOR_QUEUE: usize = 4_096;
/// Least time between two load reports caused by sessions coming and going.
const LOAD_REPORT_COALESCE: Duration = Duration::from_millis(100);

/// Keeps the server registered until shutdown.
pub(crate) async fn run(server: Arc<Server>) {
    let config = &server.config;
    let mut redial = config.redial_coordinator();
    while !server.shutdown.is_cancelled() {
        let dial = crate::peers::dial_link(&server, &config.coordinator, "/v1/servers");
        let dialed = tokio::select! {
            dialed = dial => dialed,
            _ = server.shutdown.cancelled() => break,
        };
        let delay = match dialed {
            Ok(socket) => {
                redial.reached();
                let up_since = Instant::now();
                match serve(&server, socket).await {
                    Ok(Ended::Lost) => {
                        if !server.shutdown.is_cancelled() {
                            tracing::warn!("lost the coordinator link; reconnecting");
                        }
                        redial.lost(up_since, Instant::now())
                    }
                    Ok(Ended::Said) => redial.lost(up_since, Instant::now()),
                    Ok(Ended::Unregistered) => redial.next_delay(),
                    Err(e) => {
                        tracing::warn!(error = %e, "coordinator link failed");
                        redial.next_delay()
                    }
                }
            }
            Err(e) => redial.failed(&e),
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = server.shutdown.cancelled() => break,
        }
    }
}

/// How a connection to the coordinator ended, when not with an error.
enum Ended {
    /// Before registering (shutdown, or the coordinator closed at once).
    Unregistered,
    /// After registering, with no word why: the link broke.
    Lost,
    /// After registering, and why was logged (shutdown, or the coordinator's own `Error`).
    Said,
}

/// Runs one connection to the coordinator.
async fn serve(server: &Arc<Server>, socket: ClientLink) -> Result<Ended, v1::Error> {
    let (tx, rx) = mpsc::channel(COORDINATOR_QUEUE);
    let register = v1::Register {
        protocol_version: PROTOCOL_VERSION,
        server_id: server.id.to_string(),
        public_url: server.public_url.clone(),
        capacity: server.config.max_clients,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let options = link::Options {
        writer: WriterSetup {
            ctrl: rx,
            data: None,
            closer: Closer::new(),
            linger: link::LINGER,
            direct: None,
            on_close: link::OnClose::SendQueued,
            first: link::First::Frames(vec![encode(&v1::ServerToCoordinator::register(register))]),
        },
        handshake: Some(server.config.handshake_timeout()),
        shutdown: server.shutdown.clone(),
        max_burst: link::MAX_BURST,
    };
    let reader = Reader {
        server: server.clone(),
        tx,
        heartbeat: server.config.heartbeat(),
        last_report: Instant::now(),
        changed: false,
        ended: Ended::Unregistered,
        publisher: crate::routes::Publisher::new(
            server.direct_writes,
            server.config.slow_consumer_ms,
        ),
    };
    let served = link::serve(socket, options, reader).await;
    served.outcome.map(|()| served.handler.ended)
}

/// The reading side of one coordinator link.
struct Reader {
    server: Arc<Server>,
    /// Answers and load reports, drained by the link's writer.
    tx: mpsc::Sender<Bytes>,
    /// The coordinator's heartbeat settings once registered (they win, so both ends agree on
    /// when the link is dead), this server's before.
    heartbeat: Heartbeat,
    last_report: Instant,
    /// Sessions came or went since the last report: one is due.
    changed: bool,
    ended: Ended,
    /// Delivers presence events to this server's `@presence` subscribers.
    publisher: crate::routes::Publisher,
}

impl Reader {
    /// Reports this server's load. Load reports are heartbeats: when the queue is full,
    /// traffic is flowing anyway and the next report will do.
    fn report_load(&mut self) {
        let _ = self
            .tx
            .try_send(encode(&v1::ServerToCoordinator::load(load(&self.server))));
        self.last_report = Instant::now();
    }
}

impl link::Handler for Reader {
    type In = v1::CoordinatorToServer;

    async fn first(&mut self, msg: v1::CoordinatorToServer) -> Result<Flow, v1::Error> {
        let registered = match msg.kind {
            None => return Ok(Flow::End),
            Some(Kind::Registered(registered)) => registered,
            Some(Kind::Error(e)) => return Err(e),
            Some(_) => {
                return Err(unexpected("expected Registered from the coordinator"));
            }
        };
        check_version(registered.protocol_version, "this comm server")?;
        let server = &self.server;
        // The peers first, so readiness never sees a registered server with none to link to.
        server.set_peers(registered.peers.clone());
        server
            .stats
            .coordinator_connected
            .store(true, Ordering::Relaxed);
        server.stats.registrations.inc();
        tracing::info!(
            peers = registered.peers.len(),
            "registered with the coordinator"
        );
        let ms = |ms: u32, ours: Duration| {
            Some(ms)
                .filter(|ms| *ms > 0)
                .map_or(ours, |ms| Duration::from_millis(ms.into()))
        };
        // Load reports go every half interval: the coordinator stops offering a server it has
        // not heard from for a whole one (two missed reports), so a stopped server is out of
        // the choice within the interval.
        self.heartbeat = Heartbeat {
            timeout: ms(registered.heartbeat_timeout_ms, self.heartbeat.timeout),
            interval: ms(registered.heartbeat_interval_ms, self.heartbeat.interval) / 2,
        };
        self.ended = Ended::Lost;
        let server = self.server.clone();
        self.report_load();
        // Every node session here, so the coordinator's directory is whole again after it
        // restarted (or this link broke).
        let sessions = v1::ServerToCoordinator::node_sessions(server.presence.full_report());
        answer_coordinator(&self.tx, sessions, self.heartbeat.timeout).await?;
        server.inboxes.set_link(Some(self.tx.clone()));
        Ok(Flow::Continue)
    }

    async fn message(&mut self, msg: v1::CoordinatorToServer) -> Result<Flow, v1::Error> {
        let server = &self.server;
        match msg.kind {
            Some(Kind::Reserve(reserve)) => {
                let answer = reserve_key(server, reserve);
                answer_coordinator(&self.tx, answer, self.heartbeat.timeout).await?;
            }
            Some(Kind::PeerJoined(joined)) => {
                if let Some(peer) = joined.peer {
                    tracing::info!(peer = %peer.server_id, url = %peer.url, "peer joined");
                    server.peer_joined(peer);
                }
            }
            Some(Kind::PeerLeft(left)) => {
                tracing::info!(peer = %left.server_id, "peer left");
                server.peer_left(&left.server_id);
            }
            Some(Kind::Replace(replace)) => server.replace(&replace),
            Some(Kind::InboxStored(stored)) => server.inboxes.stored(stored),
            Some(Kind::InboxBatch(batch)) => server.inboxes.batch(batch),
            Some(Kind::InboxNudge(nudge)) => server
                .inboxes
                .nudge(server.presence.sessions_of(&nudge.scope, &nudge.node_id)),
            Some(Kind::InboxExpired(expired)) => server.inboxes.expired(
                server
                    .presence
                    .sessions_of(&expired.scope, &expired.from_node),
                expired.messages,
            ),
            Some(Kind::Presence(presence)) => {
                for (scope, event) in server.presence.apply(presence) {
                    let payload = encode(&event);
                    let msg = crate::routes::Message {
                        // Local subscribers only: every server hears the change itself.
                        origin: crate::routes::Origin::Peer,
                        scope: &scope,
                        topic: relaymesh_proto::node::PRESENCE_TOPIC,
                        from: relaymesh_proto::frame::Sender::default(),
                        payload: &payload,
                    };
                    let _ = self
                        .publisher
                        .publish(&server.routes, &server.stats, msg, || {
                            Ok::<(), v1::Error>(())
                        });
                }
                self.publisher.flush(&server.stats);
            }
            Some(Kind::Drain(drain)) => server.drain(&drain),
            // A subscription change waits for the session and the peers: answered from a task
            // of its own, so the link goes on meanwhile.
            Some(Kind::Query(v1::ServerQuery {
                request_id,
                kind: Some(v1::server_query::Kind::Subscriptions(change)),
            })) => {
                let (server, tx) = (server.clone(), self.tx.clone());
                let within = self.heartbeat.timeout;
                server.tracker.clone().spawn(async move {
                    let kind = server.change_subscriptions(change).await;
                    let answer = v1::ServerToCoordinator::answer(v1::ServerAnswer {
                        request_id,
                        kind: Some(kind),
                    });
                    let _ = answer_coordinator(&tx, answer, within).await;
                });
            }
            Some(Kind::Query(query)) => {
                let answer = server.answer(query, &mut self.publisher);
                let answer = v1::ServerToCoordinator::answer(answer);
                answer_coordinator(&self.tx, answer, self.heartbeat.timeout).await?;
            }
            Some(Kind::Ping(ping)) => {
                let pong = v1::ServerToCoordinator::pong(v1::Pong { nonce: ping.nonce });
                answer_coordinator(&self.tx, pong, self.heartbeat.timeout).await?;
            }
            Some(Kind::Error(e)) => {
                if e.error_code() == ErrorCode::ShuttingDown {
                    tracing::info!(
                        "the coordinator is shutting down; reconnecting until it is back"
                    );
                } else {
                    tracing::warn!(error = %e, "coordinator closed the link; reconnecting");
                }
                self.ended = Ended::Said;
                return Ok(Flow::End);
            }
            Some(Kind::Registered(_)) => {
                return Err(unexpected("Registered was already received"));
            }
            None => return Err(relaymesh_proto::empty("CoordinatorToServer")),
        }
        Ok(Flow::Continue)
    }

    fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }

    fn silent(&self) -> v1::Error {
        error(
            ErrorCode::HeartbeatTimeout,
            "coordinator silent past the heartbeat timeout",
        )
    }

    fn beat(&mut self) {
        self.report_load();
    }

    /// A session that came or went is reported within [`LOAD_REPORT_COALESCE`], not at the
    /// next heartbeat: many logins in a burst make one report.
    /// Node sessions that opened or closed are reported at once (all that came since the
    /// last report together).
    async fn wake(&mut self) -> Result<Flow, v1::Error> {
        let server = self.server.clone();
        let load_due = self
            .changed
            .then_some(self.last_report + LOAD_REPORT_COALESCE);
        tokio::select! {
            () = async {
                match load_due {
                    Some(due) => tokio::time::sleep_until(due.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                self.changed = false;
                self.report_load();
            }
            () = server.load_changed.notified(), if load_due.is_none() => self.changed = true,
            () = server.presence.changed.notified() => {
                if let Some(changes) = server.presence.take_changes() {
                    let report = v1::ServerToCoordinator::node_sessions(changes);
                    answer_coordinator(&self.tx, report, self.heartbeat.timeout).await?;
                }
            }
        }
        Ok(Flow::Continue)
    }

    fn stopping(&mut self) -> Result<(), v1::Error> {
        // Once registered: stops new clients from being sent here before the sessions close.
        if matches!(self.ended, Ended::Lost) {
            self.report_load();
            self.ended = Ended::Said;
        }
        Ok(())
    }

    async fn closing(&mut self) {
        self.server
            .stats
            .coordinator_connected
            .store(false, Ordering::Relaxed);
        // What was asked of the inbox on this link is answered "unavailable" now.
        self.server.inboxes.set_link(None);
    }

    /// The coordinator is told nothing: it sees the link close and the server unregister.
    fn last_words(&self, _error: v1::Error) -> Option<Bytes> {
        None
    }
}

/// Queues an answer to the coordinator, waiting for room: a burst of reservations slows the
/// coordinator down instead of costing this server its registration. A coordinator that stops
/// reading altogether ends the link after `within`.
async fn answer_coordinator(
    tx: &mpsc::Sender<Bytes>,
    msg: v1::ServerToCoordinator,
    within: Duration,
) -> Result<(), v1::Error> {
    match tokio::time::timeout(within, tx.send(encode(&msg))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(error(ErrorCode::Internal, "coordinator link closed")),
        Err(_) => Err(error(
            ErrorCode::HeartbeatTimeout,
            "coordinator stopped reading",
        )),
    }
}

fn load(server: &Server) -> v1::Load {
    let pending_keys = {
        let mut keys = lock(&server.keys);
        keys.sweep(Instant::now());
        keys.pending()
    };
    v1::Load {
        clients: u32::try_from(server.client_count()).unwrap_or(u32::MAX),
        draining: server.draining(),
        pending_keys: u32::try_from(pending_keys).unwrap_or(u32::MAX),
        topics: u32::try_from(server.stats.topics.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
    }
}

/// Answers a `Reserve`: a key for the identity, unless the server is draining or full.
fn reserve_key(server: &Server, reserve: v1::Reserve) -> v1::ServerToCoordinator {
    let request_id = reserve.request_id;
    let failed = |e: v1::Error| {
        v1::ServerToCoordinator::reserve_failed(v1::ReserveFailed {
            request_id,
            error: Some(e),
        })
    };
    if server.draining() {
        return failed(error(ErrorCode::ShuttingDown, "server is draining"));
    }
    let Some(identity) = reserve.identity.filter(|i| !i.alias.is_empty()) else {
        return failed(error(
            ErrorCode::BadFrame,
            "Reserve needs an identity with an alias",
        ));
    };
    let clients = server.client_count();
    let mut keys = lock(&server.keys);
    let now = Instant::now();
    keys.sweep(now);
    if clients + keys.pending() >= server.config.max_clients as usize {
        return failed(error(ErrorCode::ServerFull, "server is at capacity"));
    }
    match keys.reserve(now, identity) {
        Ok((key, ttl)) => {
            server.stats.keys_reserved.inc();
            let expires_in_ms = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX);
            v1::ServerToCoordinator::reserved(v1::Reserved {
                request_id,
                key,
                expires_in_ms,
            })
        }
        Err(e @ KeyError::Full) => failed(e.into()),
        Err(e) => failed(error(ErrorCode::Internal, e.to_string())),
    }
}
