//! Link 4, peer links between comm servers (`/v1/peers`, cluster secret).
//!
//! Exactly one link per pair: the server with the lower id dials, the other accepts, and an
//! acceptor refuses a dial from a higher id. The dialer keeps redialing with backoff while the
//! peer is registered with the coordinator; a newer link from the same peer replaces an older
//! one. On link-up each side sends its full interest set, then deltas; forwards flow only to
//! peers interested in the topic, and a forwarded message is delivered locally and never
//! forwarded again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use relaymesh_net::auth::ChallengeAnswer;
use relaymesh_net::link::{
    self, Backlog, Closer, DataBacklog, Flow, Heartbeat, LastWords, Link, Unreported, WriterSetup,
};
use relaymesh_net::queue;
use relaymesh_net::serve::{ApiError, ConnInfo};
use relaymesh_net::sync::lock;
use relaymesh_net::tls::CertificateDer;
use relaymesh_net::ws;
use relaymesh_proto::frame::Sender;
use relaymesh_proto::v1::{self, peer_message::Kind};
use relaymesh_proto::{
    ErrorCode, PROTOCOL_VERSION, check_version, encode, error, error_frame, topic, unexpected,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Server;
use crate::control::{Command, PeerLink, PeerQueues};
use crate::routes::{self, Origin, Publisher};

/// Forwards are one hop: a peer link's queue only ever has drops of its own to tell.
fn forward_dropped_notice(dropped: Unreported) -> Bytes {
    encode(&v1::PeerMessage::forward_dropped(v1::ForwardDropped {
        count: dropped.total(),
        topics: Vec::new(),
        link: 0,
    }))
}

/// A peer link that went down (or is being replaced), kept to settle what it lost.
#[derive(Debug, Clone)]
pub(crate) struct PreviousLink {
    /// Its name (`PeerHello.link_nonce`).
    nonce: u64,
    /// Its data path: what was routed to the peer over it, still counting while routes built
    /// before the peer linked again point at it.
    out: Arc<routes::PeerOut>,
    /// Forwards received on it, counting those the peer said it dropped.
    received: u64,
}

impl PreviousLink {
    fn of(link: &PeerLink) -> Self {
        Self {
            nonce: link.nonce,
            out: link.out.clone(),
            received: link.forwards_in.get() + link.told.get(),
        }
    }
}

/// The previous link with `peer`, once it is over: a live one (about to be replaced by a new
/// link) is closed and waited for, so that its counts are final and its replay buffer has been
/// handed over. One that does not end within `handshake_timeout_ms` is taken as it stands.
async fn previous_link(server: &Server, peer: &str) -> Option<PreviousLink> {
    let live = lock(&server.peer_links).get(peer).cloned();
    if let Some(live) = live {
        live.closer
            .close(Some(LastWords::error::<v1::PeerMessage>(error(
                ErrorCode::Replaced,
                "the peer opened a new link",
            ))));
        let ended = tokio::time::timeout(server.config.handshake_timeout(), live.ended.cancelled());
        if ended.await.is_err() {
            tracing::warn!(%peer, "the peer link being replaced did not end in time");
            return Some(PreviousLink::of(&live));
        }
    }
    lock(&server.previous_links).get(peer).cloned()
}

/// This server's `PeerHello` for link `nonce`, telling what it received on `previous`.
fn hello(server: &Server, nonce: u64, previous: Option<&PreviousLink>) -> Bytes {
    encode(&v1::PeerMessage::hello(v1::PeerHello {
        protocol_version: PROTOCOL_VERSION,
        server_id: server.id.to_string(),
        link_nonce: nonce,
        previous_link: previous.map_or(0, |p| p.nonce),
        previous_received: previous.map_or(0, |p| p.received),
    }))
}

/// A peer this server dials: where to find it and how to stop dialing it.
#[derive(Debug)]
pub(crate) struct Dialer {
    url: Arc<Mutex<String>>,
    stop: CancellationToken,
}

impl Server {
    /// Replaces the set of known peers with the coordinators' (see `coordinator_link`).
    /// Dialers of peers no longer registered stop once their current link ends; live links are
    /// kept until they break.
    pub(crate) fn set_peers(self: &Arc<Self>, peers: Vec<v1::ServerInfo>) {
        let wanted: HashMap<String, String> =
            peers.into_iter().map(|p| (p.server_id, p.url)).collect();
        let gone: Vec<Arc<str>> = {
            let mut known = lock(&self.known_peers);
            let gone = known
                .keys()
                .filter(|id| !wanted.contains_key(&***id))
                .cloned()
                .collect();
            *known = wanted
                .iter()
                .map(|(id, url)| (Arc::from(id.as_str()), url.clone()))
                .collect();
            gone
        };
        self.peers_known.notify_waiters();
        // A peer the coordinators dropped (a server that died, most often) is no longer waited
        // for by subscriptions once its link is down too.
        for server_id in gone {
            let server = self.clone();
            self.tracker.spawn(async move {
                // Unless listed again meanwhile.
                if !lock(&server.known_peers).contains_key(&server_id) {
                    let _ = server.control.send(Command::PeerLeft { server_id }).await;
                }
            });
        }
        let mut dialers = lock(&self.dialers);
        dialers.retain(|id, dialer| {
            let keep = wanted.contains_key(&**id);
            if !keep {
                dialer.stop.cancel();
            }
            keep
        });
        drop(dialers);
        for (id, url) in wanted {
            self.peer_joined(v1::ServerInfo { server_id: id, url });
        }
    }

    /// A peer registered (or moved to a new URL). Starts dialing it if this server has the
    /// lower id.
    pub(crate) fn peer_joined(self: &Arc<Self>, info: v1::ServerInfo) {
        if info.server_id.as_str() != &*self.id {
            lock(&self.known_peers).insert(Arc::from(info.server_id.as_str()), info.url.clone());
            self.peers_known.notify_waiters();
        }
        if info.server_id.as_str() <= &*self.id {
            return; // it dials us (or it is us)
        }
        let mut dialers = lock(&self.dialers);
        if let Some(dialer) = dialers.get(info.server_id.as_str()) {
            *lock(&dialer.url) = info.url;
            return;
        }
        let id: Arc<str> = info.server_id.into();
        let dialer = Dialer {
            url: Arc::new(Mutex::new(info.url)),
            stop: CancellationToken::new(),
        };
        let task = dial_loop(
            self.clone(),
            id.clone(),
            dialer.url.clone(),
            dialer.stop.clone(),
        );
        self.tracker
            .spawn(task.instrument(tracing::info_span!("peer", peer = %id, dialed = true)));
        dialers.insert(id, dialer);
    }
}

async fn dial_loop(
    server: Arc<Server>,
    peer: Arc<str>,
    url: Arc<Mutex<String>>,
    stop: CancellationToken,
) {
    let mut redial = server.config.redial(format!("peer {peer}"));
    while !stop.is_cancelled() && !server.shutdown.is_cancelled() {
        // A link dialed before the coordinator restarted (by a dialer that has since been told
        // to stop) may still be up: keep using it rather than replacing it, and dial only once
        // it is gone.
        let live = lock(&server.peer_links)
            .get(&*peer)
            .map(|link| link.closer.clone());
        if let Some(closer) = live.filter(|c| !c.is_closed()) {
            tokio::select! {
                _ = closer.closed() => {}
                _ = stop.cancelled() => break,
                _ = server.shutdown.cancelled() => break,
            }
        }
        let base = lock(&url).clone();
        let dial = dial_link(&server, &base, "/v1/peers");
        let dialed = tokio::select! {
            dialed = dial => dialed,
            _ = stop.cancelled() => break,
            _ = server.shutdown.cancelled() => break,
        };
        let delay = match dialed {
            Ok(socket) => {
                redial.reached();
                let up_since = std::time::Instant::now();
                if run_link(&server, socket, Some(peer.clone()), None).await {
                    redial.lost(up_since, std::time::Instant::now())
                } else {
                    redial.next_delay()
                }
            }
            Err(e) => redial.failed(&e),
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => break,
            _ = server.shutdown.cancelled() => break,
        }
    }
    tracing::debug!("stopped dialing peer");
}

/// `POST /v1/peers/challenge`: a single-use challenge for a peer that links with an Ed25519
/// key.
pub(crate) async fn challenge(
    State(server): State<Arc<Server>>,
    Extension(conn): Extension<ConnInfo>,
) -> Result<Json<ChallengeAnswer>, ApiError> {
    server
        .peer_trust
        .challenges
        .answer_for(&server.challenge_limits, conn.peer.ip())
        .map(Json)
}

/// Opens `path` (`/v1/servers` or `/v1/peers`) at `base` (a ws:// URL) with this server's
/// credentials: the cluster secret, or a signed challenge fetched from `base` first.
pub(crate) async fn dial_link(
    server: &Server,
    base: &str,
    path: &str,
) -> Result<ws::ClientLink, ws::DialError> {
    dial_link_with(server, base, path, &server.connector).await
}

/// [`dial_link`] through `connector` (this server's, [pinned](relaymesh_net::tls::Connector::pinned)
/// to one of the addresses `base`'s name resolves to): the challenge and the link go to the
/// same address.
pub(crate) async fn dial_link_with(
    server: &Server,
    base: &str,
    path: &str,
    connector: &relaymesh_net::tls::Connector,
) -> Result<ws::ClientLink, ws::DialError> {
    let base = base.trim_end_matches('/');
    if path == "/v1/peers" && server.tls.is_some() && !relaymesh_net::url::is_tls(base) {
        // The cluster secret and every forward would cross in the clear.
        return Err(ws::DialError::BadUrl {
            url: base.to_owned(),
            reason: "this server speaks TLS and links to its peers over TLS only (wss://)".into(),
        });
    }
    let timeout = server.config.handshake_timeout();
    let authorization = server
        .credentials
        .authorization(base, path, connector, timeout)
        .await
        .map_err(ws::DialError::Credentials)?;
    let url = format!("{base}{path}");
    let limits = if path == "/v1/peers" {
        server.config.peer_ws_limits()
    } else {
        server.config.ws_limits()
    };
    ws::dial_link(&url, Some(&authorization), &limits, connector, timeout).await
}

/// `GET /v1/peers`: checks the cluster secret (or trusted key), then upgrades to a peer link.
pub(crate) async fn accept(
    State(server): State<Arc<Server>>,
    Extension(conn): Extension<ConnInfo>,
    mut req: Request,
) -> Response {
    if let Err(why) = server.peer_trust.check(req.headers(), "/v1/peers") {
        server.stats.peer_links_refused.inc();
        tracing::warn!(peer = %conn.peer, %why, "refused a peer link");
        return ApiError::from_code(ErrorCode::Unauthenticated, why.to_string()).into_response();
    }
    let (response, on_upgrade) = match relaymesh_net::accept::accept(&mut req) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let limits = server.config.peer_ws_limits();
    let span = tracing::info_span!("peer", addr = %conn.peer, dialed = false);
    let tracker = server.tracker.clone();
    tracker.spawn(
        async move {
            match relaymesh_net::accept::upgraded_link(on_upgrade, &limits).await {
                Ok(socket) => {
                    // The connection's slot under max_connections is held for the link's life.
                    let certificate = conn.client_certificate.clone();
                    let _conn = conn;
                    run_link(&server, socket, None, certificate).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    response
}

/// Runs one peer link to its end. `expected` is the peer's id when this server dialed;
/// `certificate` the client certificate the peer presented when it dialed over TLS. Returns
/// whether the link got past the handshake.
async fn run_link<S>(
    server: &Arc<Server>,
    socket: Link<S>,
    expected: Option<Arc<str>>,
    certificate: Option<Arc<CertificateDer<'static>>>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ctrl_tx, ctrl_rx) = queue::bounded(server.config.control_queue);
    let (data_tx, data_rx) = link::data_queue();
    let backlog = Arc::new(Backlog::counted(
        server.config.peer_queue,
        server.config.peer_queue_bytes,
    ));
    let closer = Closer::new();

    // The dialer names the link; the acceptor answers in `first` with the same name.
    let nonce = rand::random::<u64>().max(1);
    let mut previous = None;
    let mut hello_frame = None;
    if let Some(peer) = expected.as_deref() {
        previous = previous_link(server, peer).await;
        hello_frame = Some(hello(server, nonce, previous.as_ref()));
    }
    let options = link::Options {
        writer: WriterSetup {
            ctrl: ctrl_rx,
            data: Some((
                data_rx,
                DataBacklog {
                    backlog: backlog.clone(),
                    notice: forward_dropped_notice,
                    framed: false,
                    replay: server.config.peer_replay(),
                },
            )),
            closer: closer.clone(),
            linger: link::LINGER,
            direct: None,
            on_close: link::OnClose::SendQueued,
            // The dialer says who it is first; the acceptor answers once it has checked.
            first: match hello_frame {
                Some(hello) => link::First::Frames(vec![hello]),
                None => link::First::Answer,
            },
        },
        handshake: Some(server.config.handshake_timeout()),
        shutdown: server.shutdown.clone(),
        max_burst: link::MAX_BURST,
        watch: link::Watch::Own,
    };
    let reader = PeerReader {
        server: server.clone(),
        expected,
        certificate,
        link_nonce: nonce,
        previous,
        pending: Some(PeerQueues {
            ctrl: ctrl_tx,
            data: data_tx,
            backlog: backlog.clone(),
            closer,
            replay: server.config.peer_replay(),
        }),
        peer: None,
        publisher: Publisher::new(
            server.direct_writes,
            server.config.slow_consumer_ms,
            server.histories.clone(),
        ),
        nonce: 0,
    };
    let served = link::serve(socket, options, reader).await;
    if let Err(e) = &served.outcome
        && e.error_code() != ErrorCode::ShuttingDown
    {
        tracing::warn!(error = %e, "closed peer link");
    }
    let peer = served.handler.peer.clone();
    let (replay, unsent) = match served.writer {
        Some(end) => {
            if end.discarded > 0 {
                tracing::info!(
                    unsent = end.discarded,
                    "peer link closed with forwards still queued; they are kept for its next link"
                );
                backlog.record_lost(end.discarded as u64);
            }
            (end.replay, end.unsent)
        }
        None => (None, Vec::new()),
    };
    if let Some(peer) = peer {
        // Held (or, without replay, counted by topic) for the peer's next link.
        peer.out.ended(replay, unsent);
        peer.ended.cancel();
    }
    served.handler.established()
}

/// The reading side of one peer link.
struct PeerReader {
    server: Arc<Server>,
    /// The peer's id when this server dialed.
    expected: Option<Arc<str>>,
    /// The client certificate the peer presented, when it dialed over TLS.
    certificate: Option<Arc<CertificateDer<'static>>>,
    /// The link's name: chosen here when this server dialed, the dialer's otherwise.
    link_nonce: u64,
    /// The previous link with the peer (the dialer looks it up before dialing, the acceptor
    /// once it knows who dialed).
    previous: Option<PreviousLink>,
    /// The link's queues and closer, until the handshake makes them a [`PeerLink`].
    pending: Option<PeerQueues>,
    /// The link, once the peer is known.
    peer: Option<Arc<PeerLink>>,
    /// Routes the forwards (of every account) to local subscribers, batched per burst.
    publisher: Publisher,
    nonce: u64,
}

impl PeerReader {
    fn established(&self) -> bool {
        self.peer.is_some()
    }

    fn flush(&mut self) {
        self.publisher.flush(&self.server.stats);
    }

    /// Takes over from the previous link with the peer, which (by its `PeerHello`) received
    /// `received` forwards on it: what followed those and is still held is queued on this link
    /// ahead of anything else, what is routed to the old link from now on comes here too, and
    /// the peer is told how many it missed beyond that (lost, or too old to send again).
    fn resume(&mut self, previous_link: u64, received: u64) {
        let (Some(previous), Some(peer)) = (self.previous.take(), &self.peer) else {
            return;
        };
        let server = &self.server;
        if previous.nonce == 0 || previous.nonce != previous_link {
            // The peer does not know that link (it restarted): nothing of it is owed.
            previous.out.resume(&peer.out, u64::MAX, &server.stats);
            return;
        }
        let resumed = previous.out.resume(&peer.out, received, &server.stats);
        let missed = previous
            .out
            .offered()
            .saturating_sub(received.saturating_add(resumed.replayed));
        if resumed.replayed > 0 {
            tracing::info!(
                peer = %peer.server_id,
                replayed = resumed.replayed,
                "sent the peer again what its previous link may not have delivered"
            );
        }
        if missed == 0 {
            return;
        }
        server.stats.peer_gaps_reported.add(missed);
        server.stats.forward_dropped.add(missed);
        tracing::warn!(
            peer = %peer.server_id,
            missed,
            too_old = resumed.stale,
            "the peer missed forwards beyond the replay buffer while its link was broken or down; telling it"
        );
        // Those that left the replay buffer (or were routed while the link was down without
        // one) are known by topic; the rest are not.
        let mut left = missed;
        let mut topics = Vec::new();
        for lost in previous.out.take_missed_topics() {
            let count = lost.count.min(left);
            if count == 0 {
                break;
            }
            left -= count;
            topics.push(v1::TopicCount {
                account: lost.scope.into(),
                topic: lost.topic.into(),
                count,
            });
        }
        peer.send_ctrl(encode(&v1::PeerMessage::forward_dropped(
            v1::ForwardDropped {
                count: missed,
                topics,
                link: previous.nonce,
            },
        )));
    }

    /// Checks who the peer says it is.
    async fn check_hello(
        &self,
        first: v1::PeerMessage,
    ) -> Result<(Arc<str>, v1::PeerHello), v1::Error> {
        let Some(Kind::Hello(hello)) = first.kind else {
            return Err(unexpected(
                "the first message on /v1/peers must be PeerHello",
            ));
        };
        check_version(hello.protocol_version, "this server")?;
        let id = hello.server_id.clone();
        let me = &*self.server.id;
        match self.expected.as_deref() {
            Some(expected) if id != expected => Err(error(
                ErrorCode::Forbidden,
                format!("dialed peer {expected} but reached {id:?}"),
            )),
            None if id.is_empty() || id.len() > 128 || id.as_str() >= me => Err(error(
                ErrorCode::Forbidden,
                format!(
                    "peer {id:?} may not dial {me}: links are dialed by the server with the lower id"
                ),
            )),
            None => {
                self.check_certificate(&id).await?;
                Ok((id.into(), hello))
            }
            Some(_) => Ok((id.into(), hello)),
        }
    }

    /// With mutual TLS, a peer that dialed must have presented a certificate naming the host
    /// of the URL it registered with (as the coordinator lists it). A peer that dials as soon
    /// as it hears of this server may be quicker than the coordinator's word about it here:
    /// it is waited for, up to the handshake timeout.
    async fn check_certificate(&self, id: &str) -> Result<(), v1::Error> {
        let Some(tls) = self.server.tls.as_ref().filter(|tls| tls.mtls) else {
            return Ok(());
        };
        let server = &self.server;
        let known = async {
            loop {
                let told = server.peers_known.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if let Some(url) = lock(&server.known_peers).get(id).cloned() {
                    return url;
                }
                told.await;
            }
        };
        let Ok(url) = tokio::time::timeout(server.config.handshake_timeout(), known).await else {
            server.stats.peer_links_refused.inc();
            tracing::warn!(peer = %id, "refused a peer link: not a registered server here");
            return Err(error(
                ErrorCode::Unauthenticated,
                format!("mutual TLS: peer {id:?} is not a registered server here"),
            ));
        };
        relaymesh_net::tls::check_link_certificate(tls.mtls, self.certificate.as_deref(), &url)
            .map_err(|why| {
                self.server.stats.peer_links_refused.inc();
                tracing::warn!(peer = %id, %why, "refused a peer link");
                error(ErrorCode::Unauthenticated, why)
            })
    }
}

impl link::Handler for PeerReader {
    type In = v1::PeerMessage;

    async fn first(&mut self, msg: v1::PeerMessage) -> Result<Flow, v1::Error> {
        let (peer_id, their) = self.check_hello(msg).await?;
        let Some(queues) = self.pending.take() else {
            return Err(error(ErrorCode::Internal, "peer link set up twice"));
        };
        let server = self.server.clone();
        if self.expected.is_none() {
            self.previous = previous_link(&server, &peer_id).await;
            self.link_nonce = their.link_nonce;
            let _ = queues
                .ctrl
                .try_send(hello(&server, self.link_nonce, self.previous.as_ref()));
        }
        let peer = Arc::new(PeerLink::new(
            peer_id,
            server.next_id(),
            queues,
            self.expected.is_some(),
            self.link_nonce,
        ));
        lock(&server.peer_links).insert(peer.server_id.clone(), peer.clone());
        tracing::info!(peer = %peer.server_id, link = peer.link, "peer link up");
        self.peer = Some(peer.clone());
        // Before the routes move to the new link: what is replayed goes ahead of anything
        // published from now on, and what the old routes still carry follows it here.
        self.resume(their.previous_link, their.previous_received);
        self.server.command(Command::PeerUp { peer }).await?;
        Ok(Flow::Continue)
    }

    async fn message(&mut self, msg: v1::PeerMessage) -> Result<Flow, v1::Error> {
        let Some(peer) = self.peer.clone() else {
            return Err(error(ErrorCode::Internal, "no peer yet"));
        };
        let kind = msg.kind;
        if !matches!(kind, Some(Kind::Forward(_))) {
            self.flush();
        }
        match kind {
            // The answer to a flush: what came before it is delivered (to the sessions'
            // queues) first.
            Some(Kind::Forward(forward)) if forward.topic == crate::operator::FLUSH_TOPIC => {
                self.flush();
                peer.forwards_in.inc();
                self.server.stats.forwards_in.inc();
                self.server.flushed(forward.seq, &peer.server_id);
            }
            Some(Kind::Forward(forward)) => {
                deliver_forward(&self.server, &peer, &mut self.publisher, forward)?;
            }
            Some(Kind::Flush(flush)) => self.server.flush_to(&peer, flush.nonce),
            Some(Kind::HistoryQuery(query)) => {
                crate::history::answer_peer(&self.server, &peer, query);
            }
            Some(Kind::HistoryAnswer(answer)) => {
                crate::history::answered(&self.server, &peer.server_id, answer);
            }
            Some(Kind::Interest(interest)) => {
                self.server
                    .command(Command::PeerInterest {
                        server_id: peer.server_id.clone(),
                        link: peer.link,
                        interest,
                    })
                    .await?;
            }
            Some(Kind::InterestAck(ack)) => {
                self.server
                    .command(Command::PeerAck {
                        server_id: peer.server_id.clone(),
                        link: peer.link,
                        seq: ack.seq,
                    })
                    .await?;
            }
            Some(Kind::ForwardDropped(dropped)) => {
                // A report on a previous link's loss is not part of this link's stream.
                if dropped.link == 0 {
                    peer.told.add(dropped.count);
                }
                report_peer_drops(&self.server, dropped);
            }
            Some(Kind::Ping(ping)) => peer.send_ctrl(encode(&v1::PeerMessage::pong(v1::Pong {
                nonce: ping.nonce,
            }))),
            Some(Kind::Pong(_)) => {}
            Some(Kind::Error(e)) => {
                if e.error_code() == ErrorCode::ShuttingDown {
                    tracing::info!("peer is shutting down");
                } else {
                    tracing::warn!(error = %e, "peer is closing the link");
                }
                return Ok(Flow::End);
            }
            Some(Kind::Hello(_)) => {
                return Err(unexpected("PeerHello was already sent"));
            }
            None => return Err(relaymesh_proto::empty("PeerMessage")),
        }
        Ok(Flow::Continue)
    }

    async fn burst_end(&mut self) -> Result<Flow, v1::Error> {
        self.flush();
        Ok(Flow::Continue)
    }

    fn heartbeat(&self) -> Heartbeat {
        self.server.config.peer_heartbeat()
    }

    fn beat(&mut self) {
        if let Some(peer) = &self.peer {
            self.nonce += 1;
            peer.send_ctrl(encode(&v1::PeerMessage::ping(v1::Ping {
                nonce: self.nonce,
            })));
        }
    }

    fn stopping(&mut self) -> Result<(), v1::Error> {
        Err(error(
            ErrorCode::ShuttingDown,
            "comm server is shutting down",
        ))
    }

    async fn closing(&mut self) {
        let Some(peer) = self.peer.clone() else {
            return;
        };
        let server = &self.server;
        {
            // Recorded before the link leaves `peer_links`, so a new link always finds it.
            lock(&server.previous_links).insert(peer.server_id.clone(), PreviousLink::of(&peer));
            let mut links = lock(&server.peer_links);
            if links
                .get(&peer.server_id)
                .is_some_and(|p| Arc::ptr_eq(p, &peer))
            {
                links.remove(&peer.server_id);
            }
        }
        // Its interest stays (what is routed to it is counted) until the peer links again, or
        // for peer_resume_ms; then it goes, and so does the record.
        let (control, shutdown) = (server.control.clone(), server.shutdown.clone());
        let (server_id, link, nonce) = (peer.server_id.clone(), peer.link, peer.nonce);
        let resume = server.config.peer_resume();
        let expiring = server.clone();
        server.tracker.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(resume) => {}
                () = shutdown.cancelled() => return,
            }
            {
                let mut previous = lock(&expiring.previous_links);
                if previous.get(&server_id).is_some_and(|p| p.nonce == nonce) {
                    previous.remove(&server_id);
                }
            }
            let _ = control.send(Command::PeerExpire { server_id, link }).await;
        });
        let _ = server
            .control
            .send(Command::PeerDown {
                server_id: peer.server_id.clone(),
                link: peer.link,
            })
            .await;
        // Looked at once `PeerDown` is queued: coordinators that dropped the peer before this
        // are answered here, and any that drop it later send `PeerLeft` behind it (`set_peers`).
        if !lock(&server.known_peers).contains_key(&peer.server_id) {
            let server_id = peer.server_id.clone();
            let _ = server.control.send(Command::PeerLeft { server_id }).await;
        }
        tracing::info!(peer = %peer.server_id, link = peer.link, "peer link down");
    }

    fn last_words(&self, error: v1::Error) -> Option<Bytes> {
        Some(error_frame::<v1::PeerMessage>(error))
    }
}

/// Delivers a forwarded message to this server's own subscribers (never to other peers).
fn deliver_forward(
    server: &Server,
    peer: &PeerLink,
    publisher: &mut Publisher,
    forward: v1::Forward,
) -> Result<(), v1::Error> {
    peer.forwards_in.inc();
    server.stats.forwards_in.inc();
    let max_topic = server.config.max_topic_bytes;
    let msg = routes::Message {
        origin: Origin::Peer,
        scope: &forward.account,
        topic: &forward.topic,
        from: Sender {
            alias: &forward.from_alias,
            role: &forward.from_role,
            seq: forward.seq,
            resent_from: &forward.resent_from,
            node: &forward.from_node,
            signal: forward.signal,
            position: relaymesh_proto::frame::Position {
                stream: forward.stream,
                offset: forward.offset,
                published_ms: forward.published_ms,
            },
        },
        payload: &forward.payload,
    };
    let reached = publisher.publish(&server.routes, &server.stats, msg, || {
        topic::validate_routed(&forward.topic, max_topic)
            .map_err(|e| error(ErrorCode::InvalidTopic, e.to_string()))
    })?;
    // A direct message for a node whose last session here closed while it was on its way:
    // its inbox keeps it rather than nobody.
    if !reached
        && forward.signal == 0
        && let Some(node) = relaymesh_proto::node::of_topic(&forward.topic)
    {
        let put = v1::InboxPut {
            request_id: 0,
            scope: forward.account.clone(),
            to_node: node.to_owned(),
            from_node: forward.from_node.clone(),
            from_alias: forward.from_alias.clone(),
            from_role: forward.from_role.clone(),
            seq: forward.seq,
            resent_from: forward.resent_from.clone(),
            payload: forward.payload.clone(),
        };
        if server.inboxes.put_unattended(put) {
            server.stats.inbox_handed_on.inc();
        } else {
            server.stats.undeliverable.inc();
        }
    }
    Ok(())
}

/// A peer had to drop `dropped.count` forwards meant for this server. The subscribers of the
/// topics it names are told how many of theirs; for the rest, which subscribers missed them
/// is unknown, so every session with subscriptions is told it may have missed that many.
fn report_peer_drops(server: &Server, dropped: v1::ForwardDropped) {
    tracing::warn!(
        count = dropped.count,
        "a peer dropped forwards for this server"
    );
    server.stats.peer_drops_reported.add(dropped.count);
    let mut rest = dropped.count;
    for missed in dropped.topics {
        rest = rest.saturating_sub(missed.count);
        if let Some(route) = server.routes.get(&missed.account, &missed.topic) {
            for session in route.subscribers.iter() {
                tell_dropped(session, missed.count);
            }
        }
    }
    if rest == 0 {
        return;
    }
    for session in lock(&server.sessions).values() {
        if session.subscribed.load(Ordering::Relaxed) {
            tell_dropped(session, rest);
        }
    }
}

/// Tells `session` it missed `count` messages.
fn tell_dropped(session: &routes::Subscriber, count: u64) {
    let notice = relaymesh_net::wire::framed(&crate::session::dropped_notice(Unreported {
        own: 0,
        upstream: count,
    }));
    // A busy queue (the notice does not fit) is about to be written anyway: the writer adds
    // these to its next Dropped notice.
    if session.send(&notice, 1, true) != routes::Enqueued::Yes {
        session.backlog.report_upstream(count);
    }
}
