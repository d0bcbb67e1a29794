//! The comm server's side of link 1: register with the coordinator, report load, answer key
//! reservations, follow peer changes, and reconnect with capped exponential backoff and jitter
//! whenever the link drops. While the coordinator is away, clients and peer links keep working;
//! only new logins wait for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relaymesh_net::heartbeat::{Beat, Watchdog};
use relaymesh_net::link::{self, Closer, Inbound, WriterSetup};
use relaymesh_net::sync::lock;
use relaymesh_net::ws::{ClientLink, ClientLinkStream};
use relaymesh_proto::v1::{self, coordinator_to_server::Kind};
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION, decode_frame, encode, error};
use tokio::sync::mpsc;

use crate::keys::KeyError;
use crate::{LINGER, Server};

/// Frames queued for the coordinator (answers and load reports).
const COORDINATOR_QUEUE: usize = 4_096;
/// Least time between two load reports caused by sessions coming and going.
const LOAD_REPORT_COALESCE: Duration = Duration::from_millis(100);

/// Keeps the server registered until shutdown.
pub(crate) async fn run(server: Arc<Server>) {
    let config = &server.config;
    let mut redial = config.redial("the coordinator");
    while !server.shutdown.is_cancelled() {
        let dial = crate::peers::dial_link(&server, &config.coordinator, "/v1/servers");
        let dialed = tokio::select! {
            dialed = dial => dialed,
            _ = server.shutdown.cancelled() => break,
        };
        let delay = match dialed {
            Ok(socket) => {
                redial.reached();
                let outcome = serve(&server, socket).await;
                server
                    .stats
                    .coordinator_connected
                    .store(false, Ordering::Relaxed);
                match outcome {
                    Ok(Ended::Lost) => {
                        redial.connected();
                        if !server.shutdown.is_cancelled() {
                            tracing::warn!("lost the coordinator link; reconnecting");
                        }
                    }
                    Ok(Ended::Said) => redial.connected(),
                    Ok(Ended::Unregistered) => {}
                    Err(e) => tracing::warn!(error = %e, "coordinator link failed"),
                }
                redial.next_delay()
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
    let ClientLink { sink, mut stream } = socket;
    let (tx, rx) = mpsc::channel(COORDINATOR_QUEUE);
    let closer = Closer::new();
    let writer = tokio::spawn(link::run_writer(
        sink,
        WriterSetup {
            ctrl: rx,
            data: None,
            closer: closer.clone(),
            linger: LINGER,
            direct: None,
            on_close: link::OnClose::SendQueued,
        },
    ));
    let register = v1::Register {
        protocol_version: PROTOCOL_VERSION,
        server_id: server.id.to_string(),
        public_url: server.public_url.clone(),
        capacity: server.config.max_clients,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let _ = tx.try_send(encode(&v1::ServerToCoordinator::register(register)));
    let outcome = registered(server, &mut stream, &tx, &closer).await;
    closer.close(None);
    link::linger(&mut stream, LINGER).await;
    let _ = writer.await;
    outcome
}

async fn registered(
    server: &Arc<Server>,
    stream: &mut ClientLinkStream,
    tx: &mpsc::Sender<Bytes>,
    closer: &Closer,
) -> Result<Ended, v1::Error> {
    let first: Option<v1::CoordinatorToServer> = tokio::select! {
        first = link::first_message(stream, server.config.handshake_timeout()) => first?,
        _ = server.shutdown.cancelled() => return Ok(Ended::Unregistered),
    };
    let registered = match first.and_then(|m| m.kind) {
        None => return Ok(Ended::Unregistered),
        Some(Kind::Registered(registered)) => registered,
        Some(Kind::Error(e)) => return Err(e),
        Some(_) => {
            return Err(error(
                ErrorCode::UnexpectedMessage,
                "expected Registered from the coordinator",
            ));
        }
    };
    if registered.protocol_version != PROTOCOL_VERSION {
        return Err(error(
            ErrorCode::UnsupportedVersion,
            format!(
                "coordinator speaks protocol {}",
                registered.protocol_version
            ),
        ));
    }
    server
        .stats
        .coordinator_connected
        .store(true, Ordering::Relaxed);
    server.stats.registrations.inc();
    tracing::info!(
        peers = registered.peers.len(),
        "registered with the coordinator"
    );
    server.set_peers(registered.peers);
    // The coordinator's heartbeat settings win, so both ends agree on when the link is dead.
    let interval = Some(registered.heartbeat_interval_ms)
        .filter(|ms| *ms > 0)
        .map_or(server.config.heartbeat_interval(), |ms| {
            Duration::from_millis(ms.into())
        });
    let timeout = Some(registered.heartbeat_timeout_ms)
        .filter(|ms| *ms > 0)
        .map_or(server.config.heartbeat_timeout(), |ms| {
            Duration::from_millis(ms.into())
        });
    // Load reports are heartbeats: when the queue is full, traffic is flowing anyway and the
    // next report will do.
    let report_load = || {
        let _ = tx.try_send(encode(&v1::ServerToCoordinator::load(load(server))));
        Instant::now()
    };
    let mut last_report = report_load();
    let mut watchdog = Watchdog::new(timeout, interval);
    // A session that comes or goes is reported within LOAD_REPORT_COALESCE, not at the next
    // heartbeat: many logins in a burst make one report.
    let coalesce = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(coalesce);
    let mut changed = false;
    loop {
        tokio::select! {
            biased;
            _ = server.shutdown.cancelled() => {
                // Stop new clients from being sent here before the sessions close.
                report_load();
                return Ok(Ended::Said);
            }
            _ = closer.closed() => return Ok(Ended::Lost),
            beat = watchdog.tick() => match beat {
                Beat::Expired => return Err(error(ErrorCode::HeartbeatTimeout, "coordinator silent past the heartbeat timeout")),
                Beat::Send => last_report = report_load(),
                Beat::Quiet => {}
            },
            _ = server.load_changed.notified(), if !changed => {
                changed = true;
                coalesce.as_mut().reset((last_report + LOAD_REPORT_COALESCE).into());
            }
            _ = &mut coalesce, if changed => {
                changed = false;
                last_report = report_load();
            }
            step = link::next_frame(stream) => match step.map_err(|e| e.to_error())? {
                Inbound::Closed => return Ok(Ended::Lost),
                Inbound::Control => watchdog.activity(),
                Inbound::Frame(frame) => {
                    watchdog.activity();
                    let msg: v1::CoordinatorToServer = decode_frame(frame)?;
                    match msg.kind {
                        Some(Kind::Reserve(reserve)) => answer(tx, reserve_key(server, reserve), timeout).await?,
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
                        Some(Kind::Ping(ping)) => {
                            answer(tx, v1::ServerToCoordinator::pong(v1::Pong { nonce: ping.nonce }), timeout).await?
                        }
                        Some(Kind::Error(e)) => {
                            if e.error_code() == ErrorCode::ShuttingDown {
                                tracing::info!("the coordinator is shutting down; reconnecting until it is back");
                            } else {
                                tracing::warn!(error = %e, "coordinator closed the link; reconnecting");
                            }
                            return Ok(Ended::Said);
                        }
                        Some(Kind::Registered(_)) => {
                            return Err(error(ErrorCode::UnexpectedMessage, "Registered was already received"));
                        }
                        None => return Err(error(ErrorCode::BadFrame, "empty CoordinatorToServer message")),
                    }
                }
            },
        }
    }
}

/// Queues an answer to the coordinator, waiting for room: a burst of reservations slows the
/// coordinator down instead of costing this server its registration. A coordinator that stops
/// reading altogether ends the link after `within`.
async fn answer(
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
