//! Link 1, the server link: a comm server registers over `/v1/servers`, reports load, answers
//! key reservations, and is told when other servers join or leave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use relaymesh_net::accept;
use relaymesh_net::auth::ChallengeAnswer;
use relaymesh_net::link::{self, Closer, Flow, Heartbeat, LastWords, WriterSetup};
use relaymesh_net::metrics::Counter;
use relaymesh_net::queue;
use relaymesh_net::serve::{ApiError, ConnInfo};
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, coordinator_to_server as out, server_to_coordinator::Kind};
use relaymesh_proto::{
    ErrorCode, PROTOCOL_VERSION, check_version, encode, error, error_frame, unexpected,
};
use tokio::sync::oneshot;
use tracing::Instrument as _;

use crate::App;
use crate::registry::Load;

type ReserveReply = Result<v1::Reserved, v1::Error>;

/// A reservation that failed.
#[derive(Debug)]
pub(crate) struct ReserveFailed {
    /// Why, as the login's error.
    pub error: v1::Error,
    /// The server did not answer in time: it may be stuck.
    pub timed_out: bool,
}

/// Removes a request's entry from its map when dropped.
struct Forget<'a, T>(&'a Mutex<HashMap<u64, T>>, u64);

impl<T> Drop for Forget<'_, T> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

/// The answer to a reservation, until read. An answer that came but was never read (the login
/// went to the other server of a race in the same instant, or was given up) is a key nobody
/// collects: it is given back when this is dropped.
struct Unread<'a> {
    link: &'a ServerLink,
    request_id: u64,
    rx: oneshot::Receiver<ReserveReply>,
}

impl Drop for Unread<'_> {
    fn drop(&mut self) {
        // Closed first: an answer sent from now on fails back to `answer`, which gives it
        // back; one sent before is read here. Either way once.
        self.rx.close();
        if let Ok(Ok(reserved)) = self.rx.try_recv() {
            self.link.give_back(self.request_id, reserved.key);
        }
    }
}

/// A registered server's link, as seen by the rest of the coordinator.
pub(crate) struct ServerLink {
    pub(crate) id: String,
    /// Control queue drained by the link's writer task; bounded by `link_queue`.
    tx: queue::Sender<Bytes>,
    closer: Closer,
    /// Reservations sent to this server and awaiting `Reserved`/`ReserveFailed`, by request id.
    /// The receivers are held by the logins waiting in [`ServerLink::reserve`].
    pending: Mutex<HashMap<u64, oneshot::Sender<ReserveReply>>>,
    /// Room for `max_pending_reservations` reservations in flight. A login that finds none
    /// waits for room, in turn and within its reservation's time, instead of being refused:
    /// in a reconnect storm the refused logins came back as new ones, each another HTTP
    /// connection, after their backoff.
    slots: tokio::sync::Semaphore,
    /// A reservation went unanswered within its time while the server answered nothing else
    /// for half of it, and nothing has been answered since: the server may be frozen, so a
    /// login that finds no room goes elsewhere instead of waiting.
    unanswered: AtomicBool,
    /// When the link was made, and its last answer to a reservation (ms after that).
    born: tokio::time::Instant,
    last_answer_ms: AtomicU64,
    /// Admin queries in flight at most (`max_pending_reservations`).
    max_pending: usize,
    /// `ServerQuery`s sent to this server and awaiting their `ServerAnswer`, by request id.
    queries: Mutex<HashMap<u64, oneshot::Sender<v1::ServerAnswer>>>,
    /// The server takes `Unreserve` (its `Register` said so).
    unreserves: bool,
    /// Keys reserved that no login waited for any more, given back with `Unreserve` (the
    /// coordinator's `keys_unreserved`, shared by every link).
    unreserved: Arc<Counter>,
}

impl std::fmt::Debug for ServerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLink")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ServerLink {
    /// Queues a frame for the server. A server whose queue is full is not keeping up with its
    /// link; it is disconnected (it reconnects and re-registers with a fresh peer list) rather
    /// than silently missing a peer change.
    pub(crate) fn send(&self, frame: Bytes) -> bool {
        if self.tx.try_send(frame).is_ok() {
            return true;
        }
        tracing::warn!(server_id = %self.id, "server link queue full; closing the link");
        let words = LastWords::error::<v1::CoordinatorToServer>(error(
            ErrorCode::LimitExceeded,
            "server link queue overflowed",
        ));
        self.closer.close(Some(words));
        false
    }

    /// Queues a frame the server may miss (a `Replace`): when the queue is full it is dropped,
    /// not the link. Returns whether it was queued.
    pub(crate) fn send_lossy(&self, frame: Bytes) -> bool {
        self.tx.try_send(frame).is_ok()
    }

    /// Asks the server `query` (an admin API request) and waits (up to `timeout`) for its
    /// answer; `None` if it did not answer (or too many queries are pending on it).
    pub(crate) async fn ask(
        &self,
        request_id: u64,
        query: v1::server_query::Kind,
        timeout: Duration,
    ) -> Option<v1::server_answer::Kind> {
        let (tx, rx) = oneshot::channel();
        {
            let mut queries = lock(&self.queries);
            if queries.len() >= self.max_pending {
                return None;
            }
            queries.insert(request_id, tx);
        }
        // Forgotten however this ends, a caller that gave up (its future dropped) included.
        let _forget = Forget(&self.queries, request_id);
        let frame = encode(&v1::CoordinatorToServer::query(v1::ServerQuery {
            request_id,
            kind: Some(query),
        }));
        if !self.send(frame) {
            return None;
        }
        tokio::select! {
            answer = tokio::time::timeout(timeout, rx) => {
                answer.ok().and_then(Result::ok).and_then(|a| a.kind)
            }
            _ = self.closer.closed() => None,
        }
    }

    /// Asks the server for a login key for `identity` and waits for the answer.
    pub(crate) async fn reserve(
        &self,
        request_id: u64,
        identity: v1::Identity,
        timeout: Duration,
    ) -> Result<v1::Reserved, ReserveFailed> {
        self.reserve_inner(request_id, identity, timeout)
            .await
            .map_err(|(error, timed_out)| ReserveFailed { error, timed_out })
    }

    async fn reserve_inner(
        &self,
        request_id: u64,
        identity: v1::Identity,
        timeout: Duration,
    ) -> Result<v1::Reserved, (v1::Error, bool)> {
        let busy = |why: &str| {
            error(
                ErrorCode::LimitExceeded,
                format!("too many reservations pending on this server ({why})"),
            )
        };
        let closed = || error(ErrorCode::Internal, "server link closed before answering");
        if self.closer.is_closed() {
            return Err((error(ErrorCode::Internal, "server link is closing"), false));
        }
        // Waiting for room and for the answer share the one `timeout`.
        let deadline = tokio::time::Instant::now() + timeout;
        // Held until this reservation is answered or given up.
        let _slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            // It may be frozen: no waiting behind reservations that will time out.
            Err(_) if self.unanswered.load(Ordering::Relaxed) => {
                return Err((busy("and it left one unanswered"), false));
            }
            Err(_) => {
                let slot = tokio::select! {
                    slot = tokio::time::timeout_at(deadline, self.slots.acquire()) => slot,
                    () = self.closer.closed() => return Err((closed(), false)),
                };
                let Ok(Ok(slot)) = slot else {
                    let waited = format!("no room within {} ms", timeout.as_millis());
                    return Err((busy(&waited), false));
                };
                if self.unanswered.load(Ordering::Relaxed) {
                    return Err((busy("and it left one unanswered"), false));
                }
                // Too little time left for the server to answer: better tried elsewhere than
                // have it reserve a key nobody will collect.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left < timeout / 4 {
                    return Err((busy("room came too late to ask in time"), false));
                }
                slot
            }
        };
        // Reservations may use the link queue only down to a reserve, so a login burst is
        // refused as "busy" instead of overflowing the queue and costing the server its link.
        if self.tx.capacity() <= self.tx.max_capacity() / 4 {
            return Err((busy("its link's queue is nearly full"), false));
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.pending).insert(request_id, reply_tx);
        // Forgotten however this ends, a login given up (its future dropped) included; a key
        // that came for a login given up before it read it is given back.
        let _forget = Forget(&self.pending, request_id);
        let mut reply_rx = Unread {
            link: self,
            request_id,
            rx: reply_rx,
        };
        let frame = encode(&v1::CoordinatorToServer::reserve(v1::Reserve {
            request_id,
            identity: Some(identity),
        }));
        if self.tx.try_send(frame).is_err() {
            return Err((busy("its link's queue is full"), false));
        }
        // `Ok(None)`: the link closed first.
        let outcome = tokio::select! {
            reply = tokio::time::timeout_at(deadline, &mut reply_rx.rx) => reply.map(Result::ok),
            _ = self.closer.closed() => Ok(None),
        };
        match outcome {
            Ok(Some(reply)) => reply.map_err(|e| (e, false)),
            Ok(None) => Err((closed(), false)),
            // A server that answered others meanwhile is busy, not stuck (the login may have
            // had only part of the time, the rest spent waiting for room).
            Err(_) if self.silent_for() < timeout / 2 => {
                Err((busy("no answer in time, though it answers others"), false))
            }
            Err(_) => {
                let silent = self.silent_for();
                if !self.unanswered.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        server_id = %self.id,
                        silent_ms = silent.as_millis(),
                        "a reservation went unanswered and the server has answered none for a \
                         while: it may be frozen; logins go to other servers until it answers"
                    );
                }
                Err((
                    error(
                        ErrorCode::Internal,
                        format!(
                            "server answered no reservation for {} ms",
                            silent.as_millis()
                        ),
                    ),
                    true,
                ))
            }
        }
    }

    /// How long since the server last answered a reservation (or since the link was made).
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_answer_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    fn answer(&self, request_id: u64, reply: ReserveReply) {
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_answer_ms.store(now, Ordering::Relaxed);
        self.unanswered.store(false, Ordering::Relaxed);
        let waiter = lock(&self.pending).remove(&request_id);
        let unused = match waiter {
            Some(waiter) => waiter.send(reply).err(),
            None => Some(reply),
        };
        if let Some(Ok(reserved)) = unused {
            self.give_back(request_id, reserved.key);
        }
    }

    /// Gives back a key no login waits for any more (it went to another server first, timed
    /// out, or was given up): the server forgets it at once instead of holding it, against its
    /// capacity, for the key's whole lifetime. It expires there as before when the server
    /// does not take `Unreserve`, or its queue is down to the last eighth (left to what must
    /// not be lost).
    fn give_back(&self, request_id: u64, key: String) {
        if !self.unreserves || self.tx.capacity() <= self.tx.max_capacity() / 8 {
            return;
        }
        let frame = encode(&v1::CoordinatorToServer::unreserve(v1::Unreserve {
            request_id,
            key,
        }));
        if self.tx.try_send(frame).is_ok() {
            self.unreserved.inc();
        }
    }
}

/// `POST /v1/servers/challenge`: a single-use challenge for a comm server that registers with
/// an Ed25519 key.
pub(crate) async fn challenge(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
) -> Result<Json<ChallengeAnswer>, ApiError> {
    app.server_trust
        .challenges
        .answer_for(&app.challenge_limits, conn.peer.ip())
        .map(Json)
}

/// `GET /v1/servers`: checks the cluster secret (or trusted key), then upgrades to the server
/// link.
pub(crate) async fn upgrade(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
    mut req: Request,
) -> Response {
    if let Err(why) = app.server_trust.check(req.headers(), "/v1/servers") {
        app.stats.server_links_refused.inc();
        tracing::warn!(peer = %conn.peer, %why, "refused a comm server");
        return ApiError::from_code(ErrorCode::Unauthenticated, why.to_string()).into_response();
    }
    let (response, on_upgrade) = match accept::accept(&mut req) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let limits = app.config.ws_limits();
    let span =
        tracing::info_span!("server_link", peer = %conn.peer, server_id = tracing::field::Empty);
    let tracker = app.tracker.clone();
    tracker.spawn(
        async move {
            match accept::upgraded_link(on_upgrade, &limits).await {
                Ok(socket) => run(app, socket, conn).await,
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    response
}

async fn run(app: Arc<App>, socket: accept::ServerLink, conn: ConnInfo) {
    let (tx, rx) = queue::bounded(app.config.link_queue);
    let closer = Closer::new();
    let options = link::Options {
        writer: WriterSetup {
            ctrl: rx,
            data: None,
            closer: closer.clone(),
            linger: link::LINGER,
            direct: None,
            on_close: link::OnClose::SendQueued,
            first: link::First::Nothing,
        },
        handshake: Some(app.config.handshake_timeout()),
        shutdown: app.shutdown.clone(),
        max_burst: link::MAX_BURST,
        watch: link::Watch::Own,
    };
    let relayed = Arc::new(tokio::sync::Semaphore::new(app.config.max_relayed_logins));
    let reader = Reader {
        app,
        tx: Some(tx),
        closer,
        registered: None,
        nonce: 0,
        client_certificate: conn.client_certificate,
        relayed,
    };
    let served = link::serve(socket, options, reader).await;
    if let Err(e) = served.outcome {
        tracing::info!(error = %e, "closing server link");
    }
}

fn validate_register(reg: &v1::Register) -> Result<(), v1::Error> {
    check_version(reg.protocol_version, "this coordinator")?;
    let id_ok = !reg.server_id.is_empty()
        && reg.server_id.len() <= 128
        && reg
            .server_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if !id_ok {
        return Err(error(
            ErrorCode::BadFrame,
            "server_id must be 1-128 characters of letters, digits and _ - . :",
        ));
    }
    let url_ok = reg
        .public_url
        .strip_prefix("ws://")
        .or_else(|| reg.public_url.strip_prefix("wss://"))
        .is_some_and(|rest| !rest.is_empty() && rest.len() < 512)
        && reg.public_url.parse::<axum::http::Uri>().is_ok();
    if !url_ok {
        return Err(error(
            ErrorCode::BadFrame,
            format!(
                "public_url {:?} is not a ws:// or wss:// URL",
                reg.public_url
            ),
        ));
    }
    if reg.capacity == 0 {
        return Err(error(ErrorCode::BadFrame, "capacity must be positive"));
    }
    Ok(())
}

/// The reading side of one server link.
struct Reader {
    app: Arc<App>,
    /// The link's control queue, until registration hands it to the [`ServerLink`].
    tx: Option<queue::Sender<Bytes>>,
    closer: Closer,
    /// Once registered: the link as the rest of the coordinator sees it, and its registry id.
    registered: Option<(Arc<ServerLink>, u64)>,
    nonce: u64,
    /// The certificate the server presented over TLS, checked against its URL with `mtls`.
    client_certificate: Option<Arc<relaymesh_net::tls::CertificateDer<'static>>>,
    /// Room for logins this server relayed and that are not answered yet
    /// (`max_relayed_logins`).
    relayed: Arc<tokio::sync::Semaphore>,
}

impl Reader {
    /// Checks and places a login the server relayed, in a task of its own (it may wait for a
    /// reservation), and answers on the link; with `max_relayed_logins` in flight already it
    /// is answered `UNAVAILABLE` at once.
    fn relay(&self, handle: &Arc<ServerLink>, login: v1::RelayedLogin) {
        let Ok(permit) = self.relayed.clone().try_acquire_owned() else {
            let answer = v1::RelayedLoginAnswer {
                request_id: login.request_id,
                error: Some(error(
                    ErrorCode::Unavailable,
                    "too many logins relayed by this server are in flight; log in with the \
                     coordinator",
                )),
                ..Default::default()
            };
            handle.send(encode(&v1::CoordinatorToServer::relayed_login_answer(
                answer,
            )));
            return;
        };
        let (app, handle) = (self.app.clone(), handle.clone());
        self.app.tracker.spawn(async move {
            let answer = crate::negotiate::relayed_login(&app, &handle.id, login).await;
            drop(permit);
            handle.send(encode(&v1::CoordinatorToServer::relayed_login_answer(
                answer,
            )));
        });
    }
}

impl link::Handler for Reader {
    type In = v1::ServerToCoordinator;

    async fn first(&mut self, msg: v1::ServerToCoordinator) -> Result<Flow, v1::Error> {
        let Some(Kind::Register(reg)) = msg.kind else {
            return Err(unexpected(
                "the first message on /v1/servers must be Register",
            ));
        };
        validate_register(&reg)?;
        if self.app.tls.is_some() && !reg.public_url.starts_with("wss://") {
            // Its clients and peers would be sent to it in the clear, the cluster secret too.
            self.app.stats.server_links_refused.inc();
            let why = format!(
                "this coordinator speaks TLS: a comm server must serve TLS too and register a \
                 wss:// public_url, not {} (set its tls.cert and tls.key)",
                reg.public_url
            );
            tracing::warn!(server_id = %reg.server_id, %why, "refused a comm server");
            return Err(error(ErrorCode::Unauthenticated, why));
        }
        let mtls = self.app.tls.as_ref().is_some_and(|tls| tls.mtls);
        if let Err(why) = relaymesh_net::tls::check_link_certificate(
            mtls,
            self.client_certificate.as_deref(),
            &reg.public_url,
        ) {
            self.app.stats.server_links_refused.inc();
            tracing::warn!(server_id = %reg.server_id, %why, "refused a comm server");
            return Err(error(ErrorCode::Unauthenticated, why));
        }
        let Some(tx) = self.tx.take() else {
            return Err(error(ErrorCode::Internal, "registered twice"));
        };
        tracing::Span::current().record("server_id", reg.server_id.as_str());
        let app = &self.app;
        let link_id = app.next_link_id();
        let handle = Arc::new(ServerLink {
            id: reg.server_id.clone(),
            tx,
            closer: self.closer.clone(),
            pending: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(app.config.max_pending_reservations),
            unanswered: AtomicBool::new(false),
            born: tokio::time::Instant::now(),
            last_answer_ms: AtomicU64::new(0),
            max_pending: app.config.max_pending_reservations,
            queries: Mutex::new(HashMap::new()),
            unreserves: reg.unreserves,
            unreserved: app.stats.keys_unreserved.clone(),
        });
        {
            // The directory is locked first and held while the copy goes out, so every change
            // after it reaches this server too, and none before it twice.
            let directory = lock(&app.directory);
            let mut registry = lock(&app.registry);
            let registration = registry.register(
                &reg.server_id,
                &reg.public_url,
                reg.capacity,
                link_id,
                handle.clone(),
            );
            let registered = v1::Registered {
                protocol_version: PROTOCOL_VERSION,
                peers: registration
                    .peers
                    .into_iter()
                    .map(|(server_id, url)| v1::ServerInfo { server_id, url })
                    .collect(),
                heartbeat_interval_ms: millis(app.config.heartbeat_interval()),
                heartbeat_timeout_ms: millis(app.config.heartbeat_timeout()),
                coordinator_id: app.aliases.epoch().to_owned(),
                relays_logins: true,
            };
            handle.send(encode(&v1::CoordinatorToServer::registered(registered)));
            handle.send(encode(&v1::CoordinatorToServer::presence(
                directory.snapshot(),
            )));
            // Still drained by an operator: out of the choice, and told so again.
            if lock(&app.drained).contains(&reg.server_id) {
                if let Some(entry) = registry.get_mut(&reg.server_id) {
                    entry.load.draining = true;
                }
                handle.send(crate::admin_api::drain_frame(
                    true,
                    "drained by an operator",
                ));
            }
            let joined = encode(&v1::CoordinatorToServer::peer_joined(v1::PeerJoined {
                peer: Some(v1::ServerInfo {
                    server_id: reg.server_id.clone(),
                    url: reg.public_url.clone(),
                }),
            }));
            for other in registration.notify {
                other.send(joined.clone());
            }
            if let Some(old) = registration.replaced {
                let words = error(
                    ErrorCode::Replaced,
                    "a newer connection registered the same server id",
                );
                old.closer
                    .close(Some(LastWords::error::<v1::CoordinatorToServer>(words)));
            }
        }
        tracing::info!(server_id = %reg.server_id, url = %reg.public_url, capacity = reg.capacity, "comm server registered");
        self.registered = Some((handle, link_id));
        Ok(Flow::Continue)
    }

    async fn message(&mut self, msg: v1::ServerToCoordinator) -> Result<Flow, v1::Error> {
        let Some((handle, link_id)) = &self.registered else {
            return Err(error(ErrorCode::Internal, "not registered"));
        };
        match msg.kind {
            Some(Kind::Load(load)) => {
                // A report sent before an operator's drain reached the server must not put it
                // back in the choice.
                let drained = lock(&self.app.drained).contains(&handle.id);
                let load = Load {
                    clients: load.clients,
                    pending_keys: load.pending_keys,
                    topics: load.topics,
                    draining: load.draining || drained,
                };
                lock(&self.app.registry).update_load(&handle.id, *link_id, load);
            }
            Some(Kind::Reserved(reserved)) => handle.answer(reserved.request_id, Ok(reserved)),
            Some(Kind::ReserveFailed(failed)) => {
                let e = failed
                    .error
                    .unwrap_or_else(|| error(ErrorCode::Internal, "reservation failed"));
                handle.answer(failed.request_id, Err(e));
            }
            Some(Kind::NodeSessions(report)) => {
                let mut directory = lock(&self.app.directory);
                let changes = directory.report(&handle.id, report);
                push_presence(&lock(&self.app.registry), changes);
            }
            Some(Kind::InboxPut(put)) => self
                .app
                .inbox
                .submit(crate::inbox::Op::Put(put, handle.clone())),
            Some(Kind::InboxFetch(fetch)) => self
                .app
                .inbox
                .submit(crate::inbox::Op::Fetch(fetch, handle.clone())),
            Some(Kind::InboxDone(done)) => self.app.inbox.submit(crate::inbox::Op::Done(done)),
            Some(Kind::Answer(answer)) => {
                if let Some(tx) = lock(&handle.queries).remove(&answer.request_id) {
                    let _ = tx.send(answer);
                }
            }
            Some(Kind::RelayedLogin(login)) => self.relay(handle, login),
            Some(Kind::Pong(_)) => {}
            Some(Kind::Register(_)) => {
                return Err(unexpected("already registered on this link"));
            }
            None => return Err(relaymesh_proto::empty("ServerToCoordinator")),
        }
        Ok(Flow::Continue)
    }

    fn heartbeat(&self) -> Heartbeat {
        self.app.config.heartbeat()
    }

    fn silent(&self) -> v1::Error {
        error(
            ErrorCode::HeartbeatTimeout,
            "no load report within the heartbeat timeout",
        )
    }

    fn beat(&mut self) {
        if let Some((handle, _)) = &self.registered {
            self.nonce += 1;
            handle.send(encode(&v1::CoordinatorToServer {
                kind: Some(out::Kind::Ping(v1::Ping { nonce: self.nonce })),
            }));
        }
    }

    fn stopping(&mut self) -> Result<(), v1::Error> {
        Err(error(
            ErrorCode::ShuttingDown,
            "coordinator is shutting down",
        ))
    }

    async fn closing(&mut self) {
        let Some((handle, link_id)) = self.registered.take() else {
            return;
        };
        {
            // Under the lock, like PeerJoined, so a quick re-registration cannot overtake it.
            let mut directory = lock(&self.app.directory);
            let mut registry = lock(&self.app.registry);
            let unregistered = registry.unregister(&handle.id, link_id);
            if unregistered.is_some() && self.app.shutdown.is_cancelled() {
                // This coordinator is going away, not the server: the servers still linked
                // here hear nothing of it (they may be registered with other coordinators,
                // whose word on peers and nodes stays true).
                tracing::debug!(server_id = %handle.id, "server link closed at shutdown");
            } else if let Some(others) = unregistered {
                let frame = encode(&v1::CoordinatorToServer::peer_left(v1::PeerLeft {
                    server_id: handle.id.clone(),
                }));
                for other in others {
                    other.send(frame.clone());
                }
                tracing::info!(server_id = %handle.id, "comm server left");
                // Its nodes' sessions went with it.
                push_presence(&registry, directory.server_gone(&handle.id));
            }
        }
        // Logins waiting on this server see their reply channel close and try another server.
        lock(&handle.pending).clear();
    }

    fn last_words(&self, error: v1::Error) -> Option<Bytes> {
        Some(error_frame::<v1::CoordinatorToServer>(error))
    }
}

/// Sends changes to the directory of online nodes to every registered server. A server whose
/// queue is full loses its link (and gets a fresh copy when it registers again), as for peer
/// changes.
pub(crate) fn push_presence(
    registry: &crate::registry::Registry<Arc<ServerLink>>,
    entries: Vec<v1::NodeEntry>,
) {
    if entries.is_empty() {
        return;
    }
    let frame = encode(&v1::CoordinatorToServer::presence(v1::NodePresence {
        snapshot: false,
        entries,
    }));
    for (_, entry) in registry.iter() {
        entry.handle.send(frame.clone());
    }
}

pub(crate) fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relaymesh_proto::decode;

    /// A link to no server with room for `max_pending` reservations, and its queue's far end.
    fn link(max_pending: usize) -> (Arc<ServerLink>, queue::Receiver<Bytes>) {
        link_to(max_pending, true)
    }

    /// [`link`], to a server that does (`unreserves`) or does not take `Unreserve`.
    fn link_to(max_pending: usize, unreserves: bool) -> (Arc<ServerLink>, queue::Receiver<Bytes>) {
        let (tx, rx) = queue::bounded(64);
        let link = Arc::new(ServerLink {
            id: "s".into(),
            tx,
            closer: Closer::new(),
            pending: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(max_pending),
            unanswered: AtomicBool::new(false),
            born: tokio::time::Instant::now(),
            last_answer_ms: AtomicU64::new(0),
            max_pending,
            queries: Mutex::new(HashMap::new()),
            unreserves,
            unreserved: Arc::default(),
        });
        (link, rx)
    }

    /// The request id of the next `Reserve` the link sent.
    async fn sent(rx: &mut queue::Receiver<Bytes>) -> u64 {
        // The clock is paused: an hour passes at once when nothing else can happen.
        let frame = tokio::time::timeout(Duration::from_secs(3600), rx.recv())
            .await
            .expect("no Reserve was sent")
            .expect("a frame");
        match decode::<v1::CoordinatorToServer>(frame)
            .expect("decodes")
            .kind
        {
            Some(out::Kind::Reserve(r)) => r.request_id,
            other => panic!("not a Reserve: {other:?}"),
        }
    }

    /// The request id and key of the `Unreserve` the link has sent.
    fn unreserved(rx: &mut queue::Receiver<Bytes>) -> (u64, String) {
        let frame = rx.try_recv().expect("no Unreserve was sent");
        match decode::<v1::CoordinatorToServer>(frame)
            .expect("decodes")
            .kind
        {
            Some(out::Kind::Unreserve(u)) => (u.request_id, u.key),
            other => panic!("not an Unreserve: {other:?}"),
        }
    }

    /// A login reserving with `id` (given `secs` to be answered), in a task of its own.
    fn in_flight(
        link: &Arc<ServerLink>,
        id: u64,
        secs: u64,
    ) -> tokio::task::JoinHandle<Result<v1::Reserved, ReserveFailed>> {
        let link = link.clone();
        tokio::spawn(async move {
            link.reserve(id, v1::Identity::default(), Duration::from_secs(secs))
                .await
        })
    }

    /// A reservation with `id`, polled until its `Reserve` was sent and left unanswered, for
    /// the caller to drop unread.
    async fn asked<'a>(
        link: &'a ServerLink,
        rx: &mut queue::Receiver<Bytes>,
        id: u64,
    ) -> std::pin::Pin<
        Box<impl std::future::Future<Output = Result<v1::Reserved, ReserveFailed>> + 'a>,
    > {
        let mut reserving =
            Box::pin(link.reserve(id, v1::Identity::default(), Duration::from_secs(60)));
        tokio::select! {
            r = &mut reserving => panic!("answered before the server answered: {r:?}"),
            sent_id = sent(rx) => assert_eq!(sent_id, id),
        }
        reserving
    }

    fn reserved(key: &str) -> ReserveReply {
        Ok(v1::Reserved {
            key: key.into(),
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_that_finds_no_room_waits_its_turn_instead_of_failing() {
        let (link, mut rx) = link(1);
        let first = in_flight(&link, 1, 30);
        assert_eq!(sent(&mut rx).await, 1);
        let second = link.reserve(2, v1::Identity::default(), Duration::from_secs(30));
        tokio::pin!(second);
        // The clock runs on only once every task waits: the second login has found no room.
        tokio::select! {
            r = &mut second => panic!("answered while the first was in flight: {r:?}"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        assert!(rx.try_recv().is_err(), "sent before there was room");
        link.answer(1, reserved("k1"));
        assert_eq!(first.await.unwrap().unwrap().key, "k1");
        let (id, second) = tokio::join!(
            async {
                let id = sent(&mut rx).await;
                link.answer(id, reserved("k2"));
                id
            },
            second
        );
        assert_eq!(id, 2, "sent once the first was answered");
        assert_eq!(second.unwrap().key, "k2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_still_without_room_when_its_time_is_up_is_told_the_server_is_busy() {
        let (link, mut rx) = link(1);
        let _first = in_flight(&link, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        let failed = link
            .reserve(2, v1::Identity::default(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(failed.error.code(), ErrorCode::LimitExceeded);
        assert!(
            failed.error.message.contains("no room within 2000 ms"),
            "{failed:?}"
        );
        assert!(!failed.timed_out, "a busy server is not a stuck one");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_that_waited_goes_elsewhere_when_the_server_left_one_unanswered() {
        let (link, mut rx) = link(1);
        let first = in_flight(&link, 1, 2);
        assert_eq!(sent(&mut rx).await, 1);
        let second = link
            .reserve(2, v1::Identity::default(), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(first.await.unwrap().unwrap_err().timed_out);
        assert_eq!(second.error.code(), ErrorCode::LimitExceeded);
        assert!(second.error.message.contains("unanswered"), "{second:?}");
        assert!(
            rx.try_recv().is_err(),
            "nothing sent to a server that may be frozen"
        );
        // An answer clears it: a login that has to wait for room is sent once there is some.
        // Its key, reserved for a login that is gone, is given back.
        link.answer(1, reserved("late"));
        assert_eq!(unreserved(&mut rx), (1, "late".into()));
        let third = in_flight(&link, 3, 30);
        assert_eq!(sent(&mut rx).await, 3);
        let fourth = in_flight(&link, 4, 30);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rx.try_recv().is_err(), "sent before there was room");
        link.answer(3, reserved("k3"));
        assert_eq!(third.await.unwrap().unwrap().key, "k3");
        assert_eq!(sent(&mut rx).await, 4);
        link.answer(4, reserved("k4"));
        assert_eq!(fourth.await.unwrap().unwrap().key, "k4");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_that_finds_no_room_at_a_server_that_left_one_unanswered_goes_at_once() {
        let (link, mut rx) = link(2);
        let stuck = in_flight(&link, 1, 2);
        let _long = in_flight(&link, 2, 60);
        assert_eq!((sent(&mut rx).await, sent(&mut rx).await), (1, 2));
        assert!(stuck.await.unwrap().unwrap_err().timed_out);
        // Its slot went to the next login (the server is still tried when there is room) ...
        let _third = in_flight(&link, 3, 60);
        assert_eq!(sent(&mut rx).await, 3);
        // ... and one that finds none does not queue behind reservations that may time out.
        let at = tokio::time::Instant::now();
        let refused = link
            .reserve(4, v1::Identity::default(), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(tokio::time::Instant::now(), at, "it waited");
        assert!(refused.error.message.contains("unanswered"), "{refused:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_room_and_for_the_answer_share_one_timeout() {
        let (link, mut rx) = link(1);
        let first = in_flight(&link, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        let at = tokio::time::Instant::now();
        let second = in_flight(&link, 2, 2);
        // Room comes 1.5 s into the second login's 2 s; the server does not answer in the rest.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        link.answer(1, reserved("k1"));
        assert_eq!(first.await.unwrap().unwrap().key, "k1");
        assert_eq!(sent(&mut rx).await, 2);
        let failed = second.await.unwrap().unwrap_err();
        assert_eq!(tokio::time::Instant::now() - at, Duration::from_secs(2));
        // It answered another half a second before: busy, not stuck, and not marked.
        assert!(!failed.timed_out, "{failed:?}");
        assert!(
            failed.error.message.contains("answers others"),
            "{failed:?}"
        );
        assert!(!link.unanswered.load(Ordering::Relaxed));
        assert!(
            lock(&link.pending).is_empty(),
            "the given-up reservation is forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_waiting_for_room_ends_when_the_link_closes() {
        let (link, _rx) = link(1);
        // The room is held here, so only the close can end the wait.
        let _held = link.slots.try_acquire().unwrap();
        let waiting = in_flight(&link, 1, 60);
        tokio::time::sleep(Duration::from_secs(1)).await;
        link.closer.close(None);
        let at = tokio::time::Instant::now();
        let failed = waiting.await.unwrap().unwrap_err();
        assert_eq!(
            tokio::time::Instant::now(),
            at,
            "it waited on after the close"
        );
        assert!(failed.error.message.contains("closed"), "{failed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_that_waited_and_got_no_answer_from_a_silent_server_marks_it_stuck() {
        let (link, mut rx) = link(1);
        let first = in_flight(&link, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        let second = in_flight(&link, 2, 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        link.answer(1, reserved("k1"));
        assert_eq!(first.await.unwrap().unwrap().key, "k1");
        assert_eq!(sent(&mut rx).await, 2);
        // Nothing more comes: 1.7 s of silence is most of the 2 s.
        let failed = second.await.unwrap().unwrap_err();
        assert!(failed.timed_out, "{failed:?}");
        assert!(link.unanswered.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_whose_room_comes_too_late_to_be_answered_is_not_sent() {
        let (link, mut rx) = link(1);
        let first = in_flight(&link, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        let second = in_flight(&link, 2, 2);
        tokio::time::sleep(Duration::from_millis(1800)).await;
        link.answer(1, reserved("k1"));
        assert_eq!(first.await.unwrap().unwrap().key, "k1");
        let failed = second.await.unwrap().unwrap_err();
        assert!(!failed.timed_out, "{failed:?}");
        assert!(failed.error.message.contains("too late"), "{failed:?}");
        assert!(rx.try_recv().is_err(), "sent with 0.2 s of its 2 s left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_given_up_while_waiting_for_room_or_an_answer_leaves_nothing_behind() {
        let (link, mut rx) = link(1);
        let first = in_flight(&link, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        let second = in_flight(&link, 2, 60);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // An HTTP client that went away: both logins' futures are dropped.
        second.abort();
        first.abort();
        let _ = (first.await, second.await);
        assert!(
            lock(&link.pending).is_empty(),
            "an abandoned reservation stayed pending"
        );
        assert_eq!(
            link.slots.available_permits(),
            1,
            "a slot was not given back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_reserved_for_a_login_no_longer_waiting_is_given_back() {
        let (link, mut rx) = link(2);
        // One login given up (the other of a raced pair), one still waiting.
        let given_up = in_flight(&link, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        let waiting = in_flight(&link, 2, 60);
        assert_eq!(sent(&mut rx).await, 2);
        given_up.abort();
        let _ = given_up.await;
        link.answer(1, reserved("k1"));
        link.answer(2, reserved("k2"));
        assert_eq!(waiting.await.unwrap().unwrap().key, "k2");
        assert_eq!(unreserved(&mut rx), (1, "k1".into()));
        // Only the unused key; a failure has none to give back.
        link.answer(3, Err(error(ErrorCode::Internal, "no")));
        assert!(rx.try_recv().is_err(), "more than the one Unreserve");
        assert_eq!(link.unreserved.get(), 1);

        // A key that came for a login given up before it read it (the other of a race won in
        // the same instant) is given back too.
        let (racing, mut rx) = link_to(1, true);
        let reserving = asked(&racing, &mut rx, 4).await;
        racing.answer(4, reserved("k4"));
        assert!(
            rx.try_recv().is_err(),
            "given back while the login still waits"
        );
        drop(reserving);
        assert_eq!(unreserved(&mut rx), (4, "k4".into()));
        assert_eq!(racing.unreserved.get(), 1);
        // A refusal that was never read has no key to give back.
        let refused = asked(&racing, &mut rx, 5).await;
        racing.answer(5, Err(error(ErrorCode::Internal, "no")));
        drop(refused);
        assert!(rx.try_recv().is_err(), "an Unreserve for a refusal");
        assert_eq!(racing.unreserved.get(), 1);

        // A server that did not say it takes `Unreserve` (an older one, which would close its
        // link on it) is sent none.
        let (old, mut rx) = link_to(2, false);
        let given_up = in_flight(&old, 1, 60);
        assert_eq!(sent(&mut rx).await, 1);
        given_up.abort();
        let _ = given_up.await;
        old.answer(1, reserved("k1"));
        assert!(
            rx.try_recv().is_err(),
            "an Unreserve sent to an older server"
        );
    }
}
