//! Link 3, the client link: `/v1/client?key=KEY`.
//!
//! The key is checked before the upgrade completes: an unknown, expired or reused key gets a
//! 401 with a JSON `{code, message}` body and no WebSocket state is created. A session then
//! reads frames in its own task (subscribe, unsubscribe, publish, ping) while a writer task drains
//! its two bounded queues: replies (`ctrl`) and delivered messages (`data`, filled by publishers
//! on any session or peer link). Publishing fans out from the publisher's own task through its
//! route cache, so no lock is taken per message in the steady state.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use futures_util::FutureExt as _;
use relaymesh_net::accept::{self, ServerLink};
use relaymesh_net::limits::TokenBucket;
use relaymesh_net::link::{self, Backlog, Closer, DataBacklog, Flow, Heartbeat, WriterSetup};
use relaymesh_net::queue;
use relaymesh_net::serve::{ApiError, ConnInfo};
use relaymesh_net::sync::lock;
use relaymesh_proto::frame::Sender;
use relaymesh_proto::v1::{self, client_to_server::Kind};
use relaymesh_proto::{
    ErrorCode, PROTOCOL_VERSION, check_version, encode, error, error_frame, topic, unexpected,
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use relaymesh_proto::node::PRESENCE_TOPIC;

use crate::Server;
use crate::control::Command;
use crate::history;
use crate::inbox::SessionEvent;
use crate::interest::TopicKey;
use crate::relay::Placed;
use crate::routes::{self, ClientKey, Origin, Publisher, Subscriber};
use crate::small_set::SmallSet;

#[derive(Debug, Deserialize)]
pub(crate) struct ClientQuery {
    key: Option<String>,
    /// `batch=1`: the client takes `ServerToClient.batch` (several deliveries in one WebSocket
    /// message).
    #[serde(default)]
    batch: Option<String>,
}

/// Watches the server's sessions ([`link::Watch::Owner`]), instead of a timer and a wait on
/// the shutdown in each, so an idle client's session is never woken:
///
/// * every quarter of the heartbeat timeout it ends the sessions whose clients fell silent,
///   with `HEARTBEAT_TIMEOUT`: a client silent for the timeout is closed within another
///   quarter of it, as a timer of its own would;
/// * when the server shuts down it ends every session with `SHUTTING_DOWN` (one that starts
///   later refuses itself, [`Session::open`]).
pub(crate) async fn watch_sessions(server: Arc<Server>, stop: tokio_util::sync::CancellationToken) {
    let timeout = server.config.heartbeat_timeout();
    let mut tick = tokio::time::interval((timeout / 4).max(std::time::Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = link::Clock::now();
        let silent: Vec<Closer> = lock(&server.sessions)
            .values()
            .filter(|s| s.closer.silent_at(now) > timeout)
            .map(|s| s.closer.clone())
            .collect();
        for closer in silent {
            closer.expire(Some(link::LastWords::error::<v1::ServerToClient>(
                link::silent_error(),
            )));
        }
    }
    let sessions: Vec<Closer> = lock(&server.sessions)
        .values()
        .map(|s| s.closer.clone())
        .collect();
    for closer in sessions {
        closer.stop(Some(link::LastWords::error::<v1::ServerToClient>(
            shutting_down(),
        )));
    }
}

/// What a session ends with when its server shuts down.
fn shutting_down() -> v1::Error {
    error(
        ErrorCode::ShuttingDown,
        "comm server is shutting down; reconnect through the coordinator",
    )
}

/// `GET /v1/client?key=KEY[&batch=1]`: redeems the key, then upgrades to a client session.
pub(crate) async fn upgrade(
    State(server): State<Arc<Server>>,
    Extension(conn): Extension<ConnInfo>,
    query: Result<Query<ClientQuery>, QueryRejection>,
    mut req: Request,
) -> Response {
    let (response, on_upgrade) = match accept::accept(&mut req) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    if server.draining() {
        return ApiError::from_code(
            ErrorCode::ShuttingDown,
            "this comm server is shutting down or drained; ask the coordinator again",
        )
        .into_response();
    }
    let Ok(Query(ClientQuery { key, batch })) = query else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "bad query: expected ?key=KEY (or none, to log in with Login) and batch=1 or 0",
        )
        .into_response();
    };
    let batches = match batch.as_deref() {
        None | Some("0") => false,
        Some("1") => true,
        Some(other) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadFrame,
                format!("batch={other:?}: expected batch=1 or batch=0"),
            )
            .into_response();
        }
    };
    // Checked before the key is spent, so a refused client's key is not wasted. (Keys count
    // against capacity when reserved, so this only trips when the limit was lowered.)
    if server.client_count() >= server.config.max_clients as usize {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ServerFull,
            "this comm server is full",
        )
        .into_response();
    }
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return relayed(server, conn, on_upgrade, response, batches);
    };
    let identity = match lock(&server.keys).redeem(Instant::now(), &key) {
        Ok(identity) => identity,
        Err(e) => return refuse_key(&server, &e.to_string()),
    };
    let limits = server.config.ws_limits();
    let span = tracing::debug_span!("client", peer = %conn.peer, alias = %identity.alias);
    let tracker = server.tracker.clone();
    // Set up (among the listener's `max_setups`) once upgraded: its key is redeemed.
    let setup = conn.claim_setup();
    // The session runs in a task of its own, spawned once the upgrade is done: a task is
    // allocated at the size of its future, and one future holding both the upgrade and the
    // session was the size of both (about 5 KiB, over twice the session's) for the session's
    // whole life.
    tracker.clone().spawn(
        async move {
            match setup
                .within(accept::upgraded_link(on_upgrade, &limits))
                .await
            {
                Ok(socket) => {
                    let session = run(server, socket, identity, conn, batches);
                    tracker.spawn(session.instrument(tracing::Span::current()));
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    response
}

/// A client that came without a key ([`crate::relay`]): upgraded once there is room for
/// another login in flight, then its `Login` goes to the coordinator. When the coordinator
/// keeps it here (its identity, or a key here from an older coordinator) the session starts
/// as if the client had brought a key; an offer of another server is sent to the client as
/// `redirect`, a refusal as `Error`, and the connection closes.
fn relayed(
    server: Arc<Server>,
    conn: ConnInfo,
    on_upgrade: accept::OnUpgrade,
    response: Response,
    batches: bool,
) -> Response {
    let room = match server.relays.admit() {
        Ok(room) => room,
        Err(e) => {
            server.stats.relayed_logins_refused.inc();
            return ApiError::from_code(e.error_code(), e.message).into_response();
        }
    };
    let limits = server.config.ws_limits();
    let span = tracing::debug_span!("client", peer = %conn.peer, alias = tracing::field::Empty);
    let tracker = server.tracker.clone();
    // Set up (among the listener's `max_setups`) once logged in, or refused.
    let setup = conn.claim_setup();
    tracker.clone().spawn(
        async move {
            let logging_in = async {
                let mut socket = match accept::upgraded_link(on_upgrade, &limits).await {
                    Ok(socket) => socket,
                    Err(e) => return Err(e),
                };
                let logged_in = log_in(&server, &mut socket, &conn).await;
                Ok((socket, logged_in))
            };
            let (mut socket, logged_in) = match setup.within(logging_in).await {
                Ok(logged_in) => logged_in,
                Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
            };
            let last_words = match logged_in {
                Ok(identity) => {
                    drop(room);
                    tracing::Span::current().record("alias", identity.alias.as_str());
                    let session = run(server, socket, identity, conn, batches);
                    tracker.spawn(session.instrument(tracing::Span::current()));
                    return;
                }
                Err(last_words) => last_words,
            };
            drop(room);
            if let Some((frame, status)) = last_words
                && socket.sink.close_now(&[frame], status).await.is_ok()
            {
                link::linger(&mut socket.stream, link::LINGER).await;
            }
        }
        .instrument(span),
    );
    response
}

/// Reads a keyless client's `Login`, relays it and takes the identity the coordinator answers
/// with (or redeems the key it reserved here); `Err` holds what to tell the client before
/// closing, and the close status (`None`: it has gone).
async fn log_in(
    server: &Server,
    socket: &mut ServerLink,
    conn: &ConnInfo,
) -> Result<v1::Identity, Option<(Bytes, u16)>> {
    let refuse = |e: v1::Error| {
        let status = relaymesh_proto::close_status(e.error_code());
        Some((error_frame::<v1::ServerToClient>(e), status))
    };
    let first = link::first_message::<v1::ClientToServer, _>(
        &mut socket.stream,
        server.config.handshake_timeout(),
    )
    .await;
    let mut login = match first {
        Ok(Some(v1::ClientToServer {
            kind: Some(Kind::Login(login)),
        })) => login,
        Ok(None) => return Err(None),
        Ok(Some(_)) => {
            return Err(refuse(unexpected(
                "the first message on /v1/client without a key must be Login",
            )));
        }
        Err(e) => return Err(refuse(e)),
    };
    check_version(login.protocol_version, "this server").map_err(refuse)?;
    // No room here (draining, or full since the coordinator last heard): the coordinator
    // chooses among the others, and the client is sent on with a key there.
    if crate::coordinator_link::room_for_one(server, Instant::now()).is_err() {
        login.exclude.push(server.id.to_string());
    }
    let placed = server
        .relays
        .relay(
            server.next_id(),
            login,
            conn.peer.ip(),
            server.config.login_relay_timeout(),
        )
        .await
        .map_err(|e| {
            server.stats.relayed_logins_failed.inc();
            refuse(e)
        })?;
    let identity = match placed {
        // The coordinator counted the client against this server's capacity, as it counts a
        // reserved key, from what it last heard; what this server knows now decides (room
        // may have gone while the login was out).
        Placed::Here(identity) => {
            if let Err(e) = crate::coordinator_link::room_for_one(server, Instant::now()) {
                server.stats.relayed_logins_failed.inc();
                return Err(refuse(e));
            }
            *identity
        }
        Placed::Elsewhere(offer) if *offer.server_id != *server.id => {
            server.stats.relayed_logins_redirected.inc();
            let redirect = encode(&v1::ServerToClient::redirect(offer));
            return Err(Some((redirect, relaymesh_proto::CLOSE_NORMAL)));
        }
        // A coordinator that reserves a key here even so (one from before identity answers).
        Placed::Elsewhere(offer) => lock(&server.keys)
            .redeem(Instant::now(), &offer.key)
            .map_err(|e| {
                server.stats.keys_refused.inc();
                refuse(error(ErrorCode::KeyInvalid, e.to_string()))
            })?,
    };
    server.stats.relayed_logins.inc();
    Ok(identity)
}

/// Most servers a `Ready` lists.
const MAX_READY_SERVERS: usize = 16;

/// The servers a `Ready` lists for the client's next login: this one and the peers it knows
/// (a random few of them in a large cluster).
fn entry_points(server: &Server) -> Vec<v1::ServerInfo> {
    use rand::seq::IteratorRandom as _;
    let info = |id: &str, url: &str| v1::ServerInfo {
        server_id: id.to_owned(),
        url: url.to_owned(),
    };
    let peers = lock(&server.known_peers);
    let chosen = peers.iter().sample(&mut rand::rng(), MAX_READY_SERVERS - 1);
    std::iter::once(info(&server.id, &server.public_url))
        .chain(chosen.into_iter().map(|(id, url)| info(id, url)))
        .collect()
}

fn refuse_key(server: &Server, message: &str) -> Response {
    server.stats.keys_refused.inc();
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::KeyInvalid, message).into_response()
}

/// The `Dropped` notice for what a session's queue dropped and what peers lost for it.
pub(crate) fn dropped_notice(dropped: link::Unreported) -> Bytes {
    encode(&v1::ServerToClient::dropped(v1::Dropped {
        count: dropped.total(),
        upstream: dropped.upstream,
    }))
}

/// What a role may do, from the identity the coordinator reserved the key for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rules {
    /// Anything (open accounts, or an account without role rules).
    Unrestricted,
    /// Only topics matching one of these filters (boxed: most sessions are unrestricted, and
    /// every session holds its rules).
    Filters(Box<RoleFilters>),
}

/// A restricted role's topic filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoleFilters {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl Rules {
    pub(crate) fn of(identity: &v1::Identity) -> Self {
        if identity.restricted {
            Self::Filters(Box::new(RoleFilters {
                publish: identity.publish.clone(),
                subscribe: identity.subscribe.clone(),
            }))
        } else {
            Self::Unrestricted
        }
    }

    pub(crate) fn may_publish(&self, t: &str) -> bool {
        match self {
            Self::Unrestricted => true,
            Self::Filters(filters) => filters.publish.iter().any(|f| topic::matches(f, t)),
        }
    }

    pub(crate) fn may_subscribe(&self, t: &str) -> bool {
        match self {
            Self::Unrestricted => true,
            Self::Filters(filters) => filters.subscribe.iter().any(|f| topic::matches(f, t)),
        }
    }
}

fn forbidden(role: &str, action: &str, topic: &str, request_id: u64) -> v1::Error {
    let role = if role.is_empty() { "(none)" } else { role };
    error(
        ErrorCode::Forbidden,
        format!("role {role} may not {action} {topic:?}"),
    )
    .for_request(request_id)
}

/// Publishes confirmed at once (at the end of the burst that brings them); fewer wait for the
/// next heartbeat interval, so a busy publisher costs a confirmation per this many messages,
/// not per burst, and its client keeps at most about this many plus an interval's worth.
const CONFIRM_EVERY: u64 = 256;

/// Publishes of one `PublishBatch` handled between two yields to other tasks.
const BATCH_YIELD_EVERY: usize = 256;

/// The longest `Publish.resent_from` taken: aliases are far shorter.
const MAX_ALIAS_BYTES: usize = 64;

/// One client session's reader side.
struct Session {
    server: Arc<Server>,
    me: Arc<Subscriber>,
    /// Reply queue of this session's writer.
    ctrl: queue::Sender<Bytes>,
    /// What the client's role may publish and subscribe to.
    rules: Rules,
    /// Topics this session subscribes to (bounded by `max_subscriptions`); most have a few.
    topics: SmallSet<Arc<str>>,
    /// Whether the control task knows this session (and must hear that it closed).
    ever_subscribed: bool,
    /// The client sent `Leave`: it is moving, and what it sends after that (it was queued
    /// before the client stopped writing here) is left for its next server: not taken, so
    /// not confirmed, so sent again there; nothing goes out twice.
    leaving: bool,
    /// `Left` went out (it waits for the direct messages still being stored).
    left: bool,
    /// Room for subscription changes whose second `Ack` is still to come
    /// (`max_pending_confirmations`); each waiting task holds a permit.
    confirmations: Arc<tokio::sync::Semaphore>,
    /// Routes what the client publishes, and batches the deliveries of a burst; made at its
    /// first publish (boxed: most sessions of a large server only listen).
    publisher: Option<Box<Publisher>>,
    /// The highest publish number (`Publish.seq`) taken, and the highest confirmed.
    taken: u64,
    confirmed: u64,
    /// When what was taken and is not confirmed yet is confirmed anyway (a quiet publisher's
    /// last few): armed while there is such a rest, so an idle session has no timer.
    confirm_due: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// This session's signal budget (`signal_rate_per_s`), made at its first signal.
    signals: Option<Box<TokenBucket>>,
    /// The node's details, until `Attach` reports its session to the directory.
    joining: Option<Box<v1::NodeSession>>,
    /// Inbox business: answers to this session's messages for offline nodes, and its node's
    /// own inbox; made when first needed.
    inbox: Option<Box<InboxState>>,
    /// This session's budget of history requests and recoveries, made at its first.
    history: Option<Box<HistoryBudget>>,
}

/// What woke an idle session ([`link::Handler::wake`]).
enum Woke {
    /// An inbox answer, or the end of the inbox's events.
    Inbox(Option<SessionEvent>),
    /// The application's backend asked for subscription changes.
    Backend,
    /// Time to confirm what a quiet publisher sent.
    ConfirmDue,
}

/// A session's budget of history requests: `history.requests_per_s`, and how many may run.
#[derive(Debug)]
struct HistoryBudget {
    rate: TokenBucket,
    running: Arc<tokio::sync::Semaphore>,
}

/// A session's inbox business.
#[derive(Debug)]
struct InboxState {
    events: mpsc::Receiver<SessionEvent>,
    /// Direct messages (by `seq`) waiting for the coordinator to store them: `Published`
    /// confirms nothing from the first of them on.
    storing: std::collections::BTreeSet<u64>,
    /// The highest inbox id delivered to this session, and the highest it acknowledged.
    delivered: u64,
    acked: u64,
    /// A read of the inbox is out; another is due once it is answered.
    fetching: bool,
    fetch_again: bool,
    /// The last page was full: more wait once this one is acknowledged.
    more: bool,
}

/// A session's publisher, made at its first publish.
fn new_publisher(server: &Server) -> Box<Publisher> {
    Box::new(Publisher::new(
        server.direct_writes,
        server.config.slow_consumer_ms,
        server.histories.clone(),
    ))
}

/// Serves one client session. Set up here, outside the returned future, so the socket and the
/// setup are not carried in every idle session's task.
fn run(
    server: Arc<Server>,
    socket: ServerLink,
    mut identity: v1::Identity,
    conn: ConnInfo,
    batches: bool,
) -> impl Future<Output = ()> + Send {
    let (ctrl_tx, ctrl_rx) = queue::bounded(server.config.control_queue);
    let (data_tx, data_rx) = link::data_queue();
    let backlog = Arc::new(Backlog::counted(
        server.config.client_queue,
        server.config.client_queue_bytes,
    ));
    let closer = Closer::new();
    let direct = socket.sink.direct(&data_tx);
    let alias: Arc<str> = identity.alias.as_str().into();
    // Shared by the server's sessions: a handful of names between them all.
    let role = server.names.get(&identity.role);
    // Identities from before scopes existed route by account.
    let scope = server.names.get(if identity.scope.is_empty() {
        &identity.account
    } else {
        &identity.scope
    });
    let node: Option<Arc<str>> =
        (!identity.node_id.is_empty()).then(|| identity.node_id.as_str().into());
    let me = Arc::new(Subscriber {
        id: server.next_id(),
        alias: alias.clone(),
        scope: scope.clone(),
        role: role.clone(),
        node: node.clone(),
        topics: std::sync::atomic::AtomicU32::new(0),
        ops_ready: tokio::sync::Notify::new(),
        data: data_tx,
        backlog: backlog.clone(),
        direct: direct.clone(),
        closer: closer.clone(),
        subscribed: AtomicBool::new(false),
        client: (!identity.client_id.is_empty()).then(|| {
            Box::new(ClientKey {
                account: server.names.get(&identity.account),
                role: role.clone(),
                client_id: identity.client_id.as_str().into(),
                seq: identity.seq,
            })
        }),
        batches,
    });
    let options = link::Options {
        writer: WriterSetup {
            ctrl: ctrl_rx,
            data: Some((
                data_rx,
                DataBacklog {
                    backlog,
                    notice: dropped_notice,
                    framed: true,
                    replay: None,
                },
            )),
            closer,
            linger: link::LINGER,
            direct,
            on_close: link::OnClose::SendQueued,
            // `Ready` is the first thing the client reads, before any message for it, and only
            // once its `Attach` has been checked.
            first: link::First::Answer,
        },
        handshake: Some(server.config.handshake_timeout()),
        shutdown: server.shutdown.clone(),
        max_burst: link::MAX_BURST,
        // The server watches its sessions ([`watch_sessions`]): one sweep finds the silent
        // ones, so an idle client keeps no timer and is not woken every few seconds, and at
        // shutdown it stops each.
        watch: link::Watch::Owner,
    };
    lock(&server.sessions).insert(me.id, me.clone());
    server.stats.clients.inc();
    server.load_changed();
    // Drained since this client's connection was let in: asked to move like the others.
    if server.drained() {
        server.ask_to_move(&me);
    }
    let joining = (!identity.node_id.is_empty()).then(|| {
        Box::new(v1::NodeSession {
            scope: if identity.scope.is_empty() {
                identity.account.clone()
            } else {
                identity.scope.clone()
            },
            node_id: identity.node_id.clone(),
            alias: identity.alias.clone(),
            since_ms: 0,
            name: std::mem::take(&mut identity.node_name),
            location: std::mem::take(&mut identity.node_location),
            info: std::mem::take(&mut identity.node_info),
        })
    });
    let session = Session {
        server: server.clone(),
        me,
        ctrl: ctrl_tx,
        rules: Rules::of(&identity),
        topics: SmallSet::default(),
        ever_subscribed: false,
        leaving: false,
        left: false,
        confirmations: Arc::new(tokio::sync::Semaphore::new(
            server.config.max_pending_confirmations,
        )),
        publisher: None,
        taken: 0,
        confirmed: 0,
        confirm_due: None,
        joining,
        signals: None,
        inbox: None,
        history: None,
    };
    // `map`, not an `async` block awaiting it: that would keep a second copy of the future.
    link::serve(socket, options, session).map(move |served| {
        // The connection's slot under max_connections was held for the session's life.
        drop(conn);
        if let Err(e) = served.outcome
            && e.error_code() != ErrorCode::ShuttingDown
        {
            server.stats.protocol_errors.inc();
            tracing::debug!(error = %e, "closed client session");
        }
    })
}

impl link::Handler for Session {
    type In = v1::ClientToServer;

    /// A key reserved for a login that a newer one has since replaced is refused at once, and
    /// so is any session once the server is shutting down.
    fn open(&mut self) -> Result<Flow, v1::Error> {
        // Listed in the server's sessions before this runs: either the shutdown sweep stops
        // this session, or the shutdown came before this check ([`watch_sessions`]).
        if self.server.shutdown.is_cancelled() {
            return Err(shutting_down());
        }
        if let Some(client) = &self.me.client
            && self.server.replaced_by(client).is_some()
        {
            self.server.stats.replaced.inc();
            return Err(error(
                ErrorCode::Replaced,
                format!(
                    "a newer login of client {:?} replaced this one",
                    client.client_id
                ),
            ));
        }
        Ok(Flow::Continue)
    }

    async fn first(&mut self, msg: v1::ClientToServer) -> Result<Flow, v1::Error> {
        match msg.kind {
            Some(Kind::Attach(attach)) => {
                check_version(attach.protocol_version, "this server")?;
                if let Some(node) = self.me.node.clone() {
                    Box::pin(self.join_node_topic(&node)).await?;
                }
                let config = &self.server.config;
                let ready = v1::Ready {
                    protocol_version: PROTOCOL_VERSION,
                    alias: self.me.alias.to_string(),
                    server_id: self.server.id.to_string(),
                    heartbeat_interval_ms: u32::try_from(config.heartbeat_interval_ms)
                        .unwrap_or(u32::MAX),
                    heartbeat_timeout_ms: u32::try_from(config.heartbeat_timeout_ms)
                        .unwrap_or(u32::MAX),
                    node_id: self.me.node.as_deref().unwrap_or_default().to_owned(),
                    max_frame_bytes: u32::try_from(config.max_frame_bytes).unwrap_or(u32::MAX),
                    max_batch_publishes: u32::try_from(config.max_batch_publishes)
                        .unwrap_or(u32::MAX),
                    servers: entry_points(&self.server),
                };
                self.reply(&v1::ServerToClient::ready(ready))?;
                Ok(Flow::Continue)
            }
            _ => Err(unexpected("the first message on /v1/client must be Attach")),
        }
    }

    async fn message(&mut self, msg: v1::ClientToServer) -> Result<Flow, v1::Error> {
        self.handle(msg).await.map(|()| Flow::Continue)
    }

    async fn burst_end(&mut self) -> Result<Flow, v1::Error> {
        self.flush();
        if self.taken - self.confirmed >= CONFIRM_EVERY {
            self.confirm()?;
        }
        self.confirm_later();
        Ok(Flow::Continue)
    }

    fn heartbeat(&self) -> Heartbeat {
        self.server.config.heartbeat()
    }

    /// Answers about the inbox, once this session has any business with it, and makes the
    /// subscription changes the application's backend asks for.
    async fn wake(&mut self) -> Result<Flow, v1::Error> {
        // What woke it is handled after the wait, so the wait (which every idle session's task
        // holds) does not also hold the handling's state.
        let (me, inbox, confirm_due) = (&self.me, &mut self.inbox, &mut self.confirm_due);
        let woke = tokio::select! {
            event = async {
                match inbox {
                    Some(inbox) => inbox.events.recv().await,
                    None => std::future::pending().await,
                }
            } => Woke::Inbox(event),
            () = me.ops_ready.notified() => Woke::Backend,
            () = async {
                match confirm_due {
                    Some(due) => due.await,
                    None => std::future::pending().await,
                }
            } => Woke::ConfirmDue,
        };
        // Boxed: wakes are rare, and inline the handling would size the wait.
        Box::pin(self.woken(woke)).await
    }

    fn stopping(&mut self) -> Result<(), v1::Error> {
        Err(shutting_down())
    }

    /// The session is over for everyone else now; the close handshake that follows is only
    /// courtesy.
    ///
    /// A node's session is reported gone (presence) only once the peers stopped routing its
    /// node's topic here (or `subscribe_sync_timeout_ms` passed): whoever hears that the node
    /// went offline and then sends it a direct message has it stored in the node's inbox and
    /// is told so (`Accepted`), instead of it being forwarded to this server after the session.
    async fn closing(&mut self) {
        let server = self.server.clone();
        let node = self.me.node.is_some();
        let mut withdrawn = None;
        if self.ever_subscribed {
            let done = node.then(|| {
                let (waiter, done, wait) = server.peer_waiter();
                withdrawn = Some(wait);
                (waiter, done)
            });
            let _ = server
                .control
                .send(Command::SessionClosed {
                    session: self.me.id,
                    done,
                })
                .await;
        }
        if self.inbox.is_some() {
            server.inboxes.leave(self.me.id);
        }
        lock(&server.sessions).remove(&self.me.id);
        server.stats.clients.dec();
        server.load_changed();
        // Changes a backend asked for and this session never made: their callers hear so.
        drop(server.take_session_ops(self.me.id));
        // Only a node's session waits (`withdrawn` is its own).
        if let Some(withdrawn) = withdrawn {
            let timeout = server.config.subscribe_sync_timeout();
            if tokio::time::timeout(timeout, withdrawn).await.is_err() {
                tracing::warn!(
                    ?timeout,
                    "peers did not confirm in time that they dropped a node's topic; \
                     reporting the node gone without them"
                );
            }
        }
        if node {
            server.presence.closed(self.me.id);
        }
    }

    fn last_words(&self, error: v1::Error) -> Option<Bytes> {
        Some(error_frame::<v1::ServerToClient>(error))
    }
}

impl Session {
    /// Handles what woke an idle session ([`link::Handler::wake`]).
    async fn woken(&mut self, woke: Woke) -> Result<Flow, v1::Error> {
        match woke {
            Woke::Inbox(Some(event)) => self.inbox_event(event)?,
            Woke::Inbox(None) => std::future::pending().await,
            Woke::Backend => self.backend_changes().await?,
            Woke::ConfirmDue => {
                self.confirm_due = None;
                // A full reply queue (a client that does not read) is found by the next burst.
                let _ = self.confirm();
                self.confirm_later();
            }
        }
        Ok(Flow::Continue)
    }

    /// Hands the pending batch of deliveries to the subscribers.
    fn flush(&mut self) {
        if let Some(publisher) = &mut self.publisher {
            publisher.flush(&self.server.stats);
        }
    }

    async fn handle(&mut self, msg: v1::ClientToServer) -> Result<(), v1::Error> {
        if !matches!(
            msg.kind,
            Some(Kind::Publish(_) | Kind::Batch(_) | Kind::Send(_) | Kind::Signal(_))
        ) {
            self.flush();
        }
        if self.leaving
            && !matches!(
                msg.kind,
                Some(Kind::Ping(_) | Kind::InboxAck(_) | Kind::Leave(_))
            )
        {
            return Ok(());
        }
        match msg.kind {
            Some(Kind::Publish(publish)) => self.publish(publish),
            Some(Kind::Batch(batch)) => self.publish_batch(batch.publishes).await,
            Some(Kind::Send(send)) => {
                let seq = send.seq;
                let result = self.direct(send.to_node, &send.payload, seq, &send.resent_from, 0);
                self.numbered(seq, result)
            }
            Some(Kind::Signal(signal)) => {
                let seq = signal.seq;
                let result = self.signal(signal);
                self.numbered(seq, result)
            }
            Some(Kind::InboxAck(ack)) => self.inbox_ack(ack.up_to),
            Some(Kind::Leave(_)) => Box::pin(self.leave()).await,
            Some(Kind::ListNodes(list)) => {
                let max = self.server.config.max_list_nodes;
                let limit = match usize::try_from(list.limit) {
                    Ok(0) | Err(_) => max,
                    Ok(limit) => limit.min(max),
                };
                let filter: String = list.filter.chars().take(128).collect();
                let (nodes, total) = self.server.presence.list(&self.me.scope, limit, &filter);
                self.reply(&v1::ServerToClient::node_list(v1::NodeList {
                    request_id: list.request_id,
                    nodes,
                    total,
                }))
            }
            // Rare next to publishes, and their futures are large: boxed, so they do not add
            // to the size of every session's task. What was published before is confirmed
            // first, so a client's `flush` also settles its publishes.
            Some(Kind::Subscribe(sub)) => {
                self.confirm()?;
                let asked = Instant::now();
                let result = Box::pin(self.subscribe(sub)).await;
                let waited = asked.elapsed().as_secs_f64();
                self.server.stats.dist.subscribe_ack_seconds.observe(waited);
                result
            }
            Some(Kind::Unsubscribe(unsub)) => {
                self.confirm()?;
                Box::pin(self.unsubscribe(unsub)).await
            }
            Some(Kind::Ping(ping)) => {
                self.reply(&v1::ServerToClient::pong(v1::Pong { nonce: ping.nonce }))
            }
            Some(Kind::History(request)) => self.history_request(request),
            Some(Kind::Attach(_)) => Err(unexpected("Attach was already sent on this link")),
            Some(Kind::Login(_)) => Err(unexpected(
                "Login comes first on a connection without a key, and only there",
            )),
            None => Err(relaymesh_proto::empty("ClientToServer")),
        }
    }

    /// A `PublishBatch`: each publish as if it had come alone, in order. A long one hands its
    /// deliveries on and lets other tasks run every [`BATCH_YIELD_EVERY`] publishes, as a
    /// burst of single publishes would.
    async fn publish_batch(&mut self, publishes: Vec<v1::Publish>) -> Result<(), v1::Error> {
        let max = self.server.config.max_batch_publishes;
        if publishes.len() > max {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!(
                    "a batch of {} publishes; this server takes at most {max} (max_batch_publishes)",
                    publishes.len()
                ),
            ));
        }
        for (i, publish) in publishes.into_iter().enumerate() {
            if i > 0 && i % BATCH_YIELD_EVERY == 0 {
                self.flush();
                tokio::task::yield_now().await;
            }
            self.publish(publish)?;
        }
        Ok(())
    }

    fn publish(&mut self, publish: v1::Publish) -> Result<(), v1::Error> {
        let seq = publish.seq;
        let result = self.route(publish);
        self.numbered(seq, result)
    }

    /// Records numbered publish (or direct message) `seq` as taken, with the `result` of
    /// routing it.
    fn numbered(&mut self, seq: u64, result: Result<(), v1::Error>) -> Result<(), v1::Error> {
        // Taken, delivered or refused: the client must not send it again. A refusal that ends
        // the session goes out after this confirmation.
        if seq > self.taken {
            self.taken = seq;
            if result.is_err() {
                self.confirm()?;
            }
        }
        result
    }

    /// Arms the timer that confirms, one heartbeat interval from now, what was taken and is not
    /// confirmed yet (unless it is armed already, or there is no such rest).
    fn confirm_later(&mut self) {
        if self.taken > self.confirmed && self.confirm_due.is_none() {
            let interval = self.server.config.heartbeat_interval();
            self.confirm_due = Some(Box::pin(tokio::time::sleep(interval)));
        }
    }

    /// Confirms the numbered publishes taken so far (`Published`): after a burst that brings
    /// [`CONFIRM_EVERY`] or more since the last confirmation, a heartbeat interval after a
    /// burst leaves some unconfirmed, and before a refusal that ends the session.
    fn confirm(&mut self) -> Result<(), v1::Error> {
        // A direct message still being stored is not confirmed, nor anything after it: the
        // client sends them again if this connection is lost before they are.
        let up_to = match self.inbox.as_ref().and_then(|i| i.storing.first()) {
            Some(first) => self.taken.min(first - 1),
            None => self.taken,
        };
        if up_to > self.confirmed {
            self.confirmed = up_to;
            self.reply(&v1::ServerToClient::published(v1::Published { up_to }))?;
        }
        Ok(())
    }

    /// The client is subscribed on another server and moving there: the peers flush what
    /// they routed here, and once no direct message of its is still being stored, what it sent
    /// is confirmed (ahead of `Left`: confirmations go on the reply queue, which the writer
    /// empties first) and `Left` goes behind every delivery queued for it, so the client can
    /// read up to it and close knowing it missed nothing here and has nothing here to send
    /// again. (A message still being stored when `Left` went would be sent again from the next
    /// server and stored twice.) A queue with no room for it ends the session (the client then
    /// closes on its own timeout, as after any loss).
    async fn leave(&mut self) -> Result<(), v1::Error> {
        if std::mem::replace(&mut self.leaving, true) {
            return Ok(());
        }
        self.server.flush_peers().await;
        self.finish_leaving()
    }

    /// Sends `Left` if the client is leaving and nothing it sent is still being stored (each
    /// store is answered: stored, refused, or failed with its coordinator link).
    fn finish_leaving(&mut self) -> Result<(), v1::Error> {
        if !self.leaving || self.left || self.inbox.as_ref().is_some_and(|i| !i.storing.is_empty())
        {
            return Ok(());
        }
        self.left = true;
        self.confirm()?;
        let left = relaymesh_net::wire::framed(&encode(&v1::ServerToClient::left(v1::Left {})));
        // Queued, not written past the writer: the confirmation on the reply queue goes first.
        match self.me.send(&left, 1, false) {
            routes::Enqueued::Yes => Ok(()),
            routes::Enqueued::Full | routes::Enqueued::Closed => Err(error(
                ErrorCode::SlowConsumer,
                "no room to confirm the move: deliveries are not being read",
            )),
        }
    }

    /// This session's inbox business, set up on first need.
    fn inbox_state(&mut self) -> &mut InboxState {
        let server = &self.server;
        let id = self.me.id;
        self.inbox.get_or_insert_with(|| {
            let (tx, events) = mpsc::channel(crate::inbox::SESSION_EVENTS);
            server.inboxes.join(id, tx);
            Box::new(InboxState {
                events,
                storing: std::collections::BTreeSet::new(),
                delivered: 0,
                acked: 0,
                fetching: false,
                fetch_again: false,
                more: false,
            })
        })
    }

    /// Direct message `seq` found no session of `to_node`: asks the coordinator to store it
    /// in the node's inbox. `Accepted` (or `Undeliverable`) follows when it answers.
    fn store(
        &mut self,
        to_node: String,
        payload: &[u8],
        seq: u64,
        resent_from: &str,
    ) -> Result<(), v1::Error> {
        let limit = self.server.config.max_pending_inbox;
        let busy = self
            .inbox
            .as_ref()
            .is_some_and(|i| i.storing.len() >= limit);
        if busy {
            let why = format!("{limit} direct messages are still being stored (max_pending_inbox)");
            return self.undeliverable(seq, to_node, ErrorCode::LimitExceeded, why);
        }
        let put = v1::InboxPut {
            request_id: 0,
            scope: self.me.scope.to_string(),
            to_node: to_node.clone(),
            from_node: self.me.node.as_deref().unwrap_or_default().to_owned(),
            from_alias: self.me.alias.to_string(),
            from_role: self.me.role.to_string(),
            seq,
            resent_from: resent_from.to_owned(),
            payload: Bytes::copy_from_slice(payload),
        };
        let id = self.me.id;
        self.inbox_state();
        let server = self.server.clone();
        if !server.inboxes.put(&server, id, put) {
            return self.undeliverable(
                seq,
                to_node,
                ErrorCode::Unavailable,
                "the node has no session and its inbox cannot be reached (no coordinator)".into(),
            );
        }
        self.inbox_state().storing.insert(seq);
        Ok(())
    }

    /// Reads this node's inbox after what was delivered (unless a read is out already).
    fn fetch_inbox(&mut self) {
        let Some(node) = self.me.node.clone() else {
            return;
        };
        let id = self.me.id;
        let server = self.server.clone();
        let scope = self.me.scope.clone();
        let state = self.inbox_state();
        if state.fetching {
            state.fetch_again = true;
            return;
        }
        if server
            .inboxes
            .fetch(&server, id, &scope, &node, state.delivered)
        {
            state.fetching = true;
            state.fetch_again = false;
        }
    }

    fn inbox_event(&mut self, event: SessionEvent) -> Result<(), v1::Error> {
        match event {
            SessionEvent::Stored {
                seq,
                to_node,
                result,
            } => {
                self.inbox_state().storing.remove(&seq);
                match result {
                    Ok(inbox_id) => {
                        self.server.stats.inbox_accepted.inc();
                        self.reply(&v1::ServerToClient::accepted(v1::Accepted {
                            seq,
                            to_node,
                            inbox_id,
                        }))?;
                    }
                    Err(e) => {
                        let code = e.error_code();
                        self.undeliverable(seq, to_node, code, e.message)?;
                    }
                }
                self.confirm()?;
                self.finish_leaving()
            }
            SessionEvent::Batch(result) => {
                let state = self.inbox_state();
                state.fetching = false;
                match result {
                    Ok(messages) => self.deliver_inbox(messages),
                    // A coordinator that keeps no inbox says so to every node's first read.
                    Err(e) if e.error_code() == ErrorCode::NotConnected => Ok(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read a node's inbox");
                        Ok(())
                    }
                }?;
                if self.inbox_state().fetch_again {
                    self.fetch_inbox();
                }
                Ok(())
            }
            SessionEvent::Nudge => {
                self.fetch_inbox();
                Ok(())
            }
            SessionEvent::Expired(expired) => {
                let mut frames = bytes::BytesMut::new();
                let count = expired.len();
                for e in expired {
                    let frame = encode(&v1::ServerToClient::expired(e));
                    relaymesh_net::wire::put_frame_header(&mut frames, frame.len());
                    frames.extend_from_slice(&frame);
                }
                // Queued like a delivery: a session too slow to take them has them counted and
                // reported as dropped.
                crate::routes::offer(
                    &self.me,
                    crate::routes::Item::frames(&frames.freeze(), count),
                    &self.server.stats,
                    self.server.config.slow_consumer_ms,
                    false,
                );
                Ok(())
            }
        }
    }

    /// Hands a page of the node's inbox to the client, in order, as one batch.
    fn deliver_inbox(&mut self, messages: Vec<v1::InboxMessage>) -> Result<(), v1::Error> {
        let Some(node) = self.me.node.clone() else {
            return Ok(());
        };
        let topic = relaymesh_proto::node::topic(&node);
        let full = messages.len() >= crate::inbox::PAGE as usize;
        let state = self.inbox_state();
        let mut frames = bytes::BytesMut::new();
        let mut count = 0;
        for m in messages {
            if m.id <= state.delivered {
                continue;
            }
            state.delivered = m.id;
            let frame = encode(&v1::ServerToClient::message(v1::Message {
                topic: topic.clone(),
                from_alias: m.from_alias,
                payload: m.payload,
                from_role: m.from_role,
                seq: m.seq,
                resent_from: m.resent_from,
                from_node: m.from_node,
                signal: 0,
                inbox_id: m.id,
                ..v1::Message::default()
            }));
            relaymesh_net::wire::put_frame_header(&mut frames, frame.len());
            frames.extend_from_slice(&frame);
            count += 1;
        }
        state.more = full;
        if count == 0 {
            return Ok(());
        }
        self.server.stats.inbox_delivered.add(count as u64);
        // Behind what is queued for the session, like any delivery; a session whose queue is
        // full gets them again at its next login (they are deleted only when acknowledged).
        let _ = self.me.send(&frames.freeze(), count, false);
        Ok(())
    }

    /// The client handled its inbox up to `up_to`: delete it, and read the next page if the
    /// last was full.
    fn inbox_ack(&mut self, up_to: u64) -> Result<(), v1::Error> {
        let Some(node) = self.me.node.clone() else {
            self.server.stats.inbox_acks_ignored.inc();
            return Ok(());
        };
        let server = self.server.clone();
        let scope = self.me.scope.clone();
        let state = self.inbox_state();
        if up_to > state.delivered {
            server.stats.inbox_acks_ignored.inc();
        }
        let up_to = up_to.min(state.delivered);
        if up_to <= state.acked {
            return Ok(());
        }
        state.acked = up_to;
        let next = state.more && up_to == state.delivered;
        // A lost acknowledgement only means the messages come again at the next login.
        let _ = server.inboxes.done(&scope, &node, up_to);
        if next {
            self.fetch_inbox();
        }
        Ok(())
    }

    fn route(&mut self, publish: v1::Publish) -> Result<(), v1::Error> {
        let server = &*self.server;
        let v1::Publish {
            topic,
            payload,
            seq,
            resent_from,
        } = publish;
        // Delivered and forwarded frames add the alias, account and envelope to the payload;
        // the limit keeps them within every receiver's frame limit.
        if resent_from.len() > MAX_ALIAS_BYTES {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("resent_from is longer than an alias ({MAX_ALIAS_BYTES} bytes)"),
            ));
        }
        let max_payload = server.config.max_payload_bytes();
        if payload.len() > max_payload {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!(
                    "payload of {} bytes exceeds the limit of {max_payload} bytes",
                    payload.len()
                ),
            ));
        }
        let max_topic = server.config.max_topic_bytes;
        let rules = &self.rules;
        let role = &*self.me.role;
        let msg = routes::Message {
            origin: Origin::Local,
            scope: &self.me.scope,
            topic: &topic,
            from: Sender {
                alias: &self.me.alias,
                role,
                seq,
                resent_from: &resent_from,
                ..Sender::default()
            },
            payload: &payload,
        };
        let routed = self
            .publisher
            .get_or_insert_with(|| new_publisher(server))
            .publish(&server.routes, &server.stats, msg, || {
                topic::validate(&topic, max_topic)
                    .map_err(|e| error(ErrorCode::InvalidTopic, e.to_string()))?;
                // Checked once per topic: an allowed topic stays in the route cache.
                if rules.may_publish(&topic) {
                    Ok(())
                } else {
                    Err(forbidden(role, "publish to", &topic, 0))
                }
            });
        match routed {
            // A role violation is answered and counted; the session goes on.
            Err(e) if e.error_code() == ErrorCode::Forbidden => self.refuse(e),
            other => other.map(|_| ()),
        }
    }

    /// Subscribes this session to its node's topic, and waits (up to
    /// `subscribe_sync_timeout_ms`) until the linked peers have it too: from `Ready` on, what
    /// is sent to the node anywhere in the cluster reaches this session (from a peer that did
    /// not confirm in time, once it has).
    async fn join_node_topic(&mut self, node: &str) -> Result<(), v1::Error> {
        let topic: Arc<str> = relaymesh_proto::node::topic(node).into();
        let (_, wait) = self.add_topics(vec![topic]).await?;
        let timeout = self.server.config.subscribe_sync_timeout();
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::warn!(
                %node,
                ?timeout,
                "peers did not confirm a node's topic in time; it is ready without them"
            );
            self.server.stats.acks_pending.inc();
        }
        if let Some(mut session) = self.joining.take() {
            session.since_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            self.server.presence.opened(self.me.id, *session);
        }
        // What waited for the node while it was offline.
        self.fetch_inbox();
        Ok(())
    }

    /// Routes a direct message (`signal` 0) or a signal to node `to_node` of this session's
    /// scope through the one publish path, as a message on the node's topic. A node with no
    /// session anywhere, an id that is no node id, or a payload over the limit is answered
    /// `Undeliverable`, and the session goes on.
    fn direct(
        &mut self,
        to_node: String,
        payload: &[u8],
        seq: u64,
        resent_from: &str,
        signal: i32,
    ) -> Result<(), v1::Error> {
        if resent_from.len() > MAX_ALIAS_BYTES {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("resent_from is longer than an alias ({MAX_ALIAS_BYTES} bytes)"),
            ));
        }
        if let Err(e) = relaymesh_proto::node::check_id(&to_node) {
            return self.undeliverable(seq, to_node, ErrorCode::UnknownNode, e.to_string());
        }
        let max_payload = self.server.config.max_payload_bytes();
        if payload.len() > max_payload {
            let why = format!(
                "payload of {} bytes exceeds the limit of {max_payload} bytes",
                payload.len()
            );
            return self.undeliverable(seq, to_node, ErrorCode::LimitExceeded, why);
        }
        let server = &*self.server;
        let topic = relaymesh_proto::node::topic(&to_node);
        let msg = routes::Message {
            origin: Origin::Local,
            scope: &self.me.scope,
            topic: &topic,
            from: Sender {
                alias: &self.me.alias,
                role: &self.me.role,
                seq,
                resent_from,
                node: self.me.node.as_deref().unwrap_or_default(),
                signal,
                position: Default::default(),
            },
            payload,
        };
        // Node topics are made here, never taken from the client: nothing to check.
        let reached = self
            .publisher
            .get_or_insert_with(|| new_publisher(server))
            .publish(&server.routes, &server.stats, msg, || {
                Ok::<(), v1::Error>(())
            })?;
        if reached {
            server.stats.direct_sent.inc();
            return Ok(());
        }
        if signal == 0 {
            return self.store(to_node, payload, seq, resent_from);
        }
        self.undeliverable(
            seq,
            to_node,
            ErrorCode::NotConnected,
            "the node has no session in the cluster".into(),
        )
    }

    /// A signal: a direct message with a kind, within the session's signal rate.
    fn signal(&mut self, signal: v1::Signal) -> Result<(), v1::Error> {
        let v1::Signal {
            to_node,
            kind,
            payload,
            seq,
        } = signal;
        let known = v1::SignalKind::try_from(kind).is_ok_and(|k| k != v1::SignalKind::Unspecified);
        if !known {
            let why = format!("unknown signal kind {kind}");
            return self.undeliverable(seq, to_node, ErrorCode::BadFrame, why);
        }
        let config = &self.server.config;
        let bucket = self.signals.get_or_insert_with(|| {
            Box::new(TokenBucket::new(
                f64::from(config.signal_rate_per_s),
                config.signal_burst,
            ))
        });
        if !bucket.take(Instant::now()) {
            let why = format!(
                "more than {} signals per second (signal_rate_per_s)",
                config.signal_rate_per_s
            );
            return self.undeliverable(seq, to_node, ErrorCode::RateLimited, why);
        }
        self.direct(to_node, &payload, seq, "", kind)
    }

    /// Answers direct message or signal `seq` with `Undeliverable`, and counts it.
    fn undeliverable(
        &self,
        seq: u64,
        to_node: String,
        reason: ErrorCode,
        message: String,
    ) -> Result<(), v1::Error> {
        self.server.stats.undeliverable.inc();
        self.reply(&v1::ServerToClient::undeliverable(v1::Undeliverable {
            seq,
            reason: reason as i32,
            to_node,
            message,
        }))
    }

    /// Answers a forbidden request with `FORBIDDEN` and counts it, keeping the session.
    fn refuse(&self, e: v1::Error) -> Result<(), v1::Error> {
        self.server.stats.forbidden.inc();
        self.reply(&v1::ServerToClient::error(e))
    }

    fn check_topics(&self, topics: &[String]) -> Result<(), v1::Error> {
        for t in topics {
            // Presence events: subscribed to by name, published on only by servers.
            if t == PRESENCE_TOPIC {
                continue;
            }
            topic::validate(t, self.server.config.max_topic_bytes)
                .map_err(|e| error(ErrorCode::InvalidTopic, format!("{t:?}: {e}")))?;
        }
        Ok(())
    }

    /// Refusals name the request, so the client can fail that request (and forget its topics)
    /// instead of treating the close as a lost connection.
    async fn subscribe(&mut self, sub: v1::Subscribe) -> Result<(), v1::Error> {
        self.check_topics(&sub.topics)
            .map_err(|e| e.for_request(sub.request_id))?;
        if let Some(t) = sub
            .topics
            .iter()
            .find(|t| *t != PRESENCE_TOPIC && !self.rules.may_subscribe(t))
        {
            return self.refuse(forbidden(&self.me.role, "subscribe to", t, sub.request_id));
        }
        let fresh: Vec<Arc<str>> = {
            let mut seen = HashSet::new();
            sub.topics
                .iter()
                .filter(|t| !self.topics.contains(t.as_str()) && seen.insert(t.as_str()))
                .map(|t| Arc::from(t.as_str()))
                .collect()
        };
        let limit = self.server.config.max_subscriptions;
        // The node's own topic does not count.
        let own = usize::from(self.me.node.is_some());
        if self.topics.len() - own + fresh.len() > limit {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("subscription limit of {limit} topics per client reached"),
            )
            .for_request(sub.request_id));
        }
        let config = &self.server.config.history;
        let history: Vec<String> = match config.enabled() {
            true => sub
                .topics
                .iter()
                .filter(|t| config.keeps(&self.me.scope, t))
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        if sub.topics.is_empty() {
            return self.ack(sub.request_id, Vec::new(), history);
        }
        let room = self.confirmation_room(sub.request_id)?;
        // Topics this session has already are not sent again, but the request still waits for
        // what peers have not confirmed yet: an earlier request for them may be pending.
        let (waiter, wait) = self.add_topics(fresh).await?;
        self.answer_change(sub.request_id, waiter, wait, room, history.clone())
            .await?;
        if sub.recover.is_empty() {
            return Ok(());
        }
        self.recover(sub.request_id, sub.recover, &history)
    }

    /// Starts recovering `recover` (topics of Subscribe `request_id` that keep `history`) now
    /// that the subscription is in force: what the client missed follows its `Ack`.
    fn recover(
        &mut self,
        request_id: u64,
        recover: Vec<v1::Recover>,
        history: &[String],
    ) -> Result<(), v1::Error> {
        // A recovery that cannot be made is answered as one that found nothing (the client
        // is told of a gap), not with an Error: the subscription itself stands.
        let unrecovered = |topic: &str| {
            let gap = history::Merged {
                gap: true,
                ..Default::default()
            };
            history_batches(request_id, true, topic, &gap)
        };
        let max = self.server.config.history.max_reply_messages;
        let mut items = Vec::new();
        for r in recover {
            if !history.contains(&r.topic) {
                tracing::debug!(topic = %r.topic, "recovery of a topic not subscribed, or without history");
                for frame in unrecovered(&r.topic) {
                    self.reply_frame(frame)?;
                }
                continue;
            }
            let query = history::Query::from_positions(0, &r.since, r.since_ms, max);
            items.push((r.topic, query));
        }
        if items.is_empty() {
            return Ok(());
        }
        let permit = match self.history_permit(request_id) {
            Ok(permit) => permit,
            Err(e) => {
                tracing::info!(error = %e, "recovery refused");
                for (topic, _) in &items {
                    for frame in unrecovered(topic) {
                        self.reply_frame(frame)?;
                    }
                }
                return Ok(());
            }
        };
        self.answer_history(request_id, true, items, permit);
        Ok(())
    }

    /// `History`: the topic's backlog, answered by a task of its own.
    fn history_request(&mut self, request: v1::History) -> Result<(), v1::Error> {
        let request_id = request.request_id;
        let server = self.server.clone();
        let config = &server.config;
        if let Err(e) = topic::validate(&request.topic, config.max_topic_bytes) {
            let why = format!("{:?}: {e}", request.topic);
            return self.refuse(error(ErrorCode::InvalidTopic, why).for_request(request_id));
        }
        if !self.rules.may_subscribe(&request.topic) {
            let e = forbidden(
                &self.me.role,
                "read the history of",
                &request.topic,
                request_id,
            );
            return self.refuse(e);
        }
        if !config.history.keeps(&self.me.scope, &request.topic) {
            let why = format!(
                "{:?} keeps no history (the comm servers' [history] configuration names the topics that do)",
                request.topic
            );
            return self.refuse(error(ErrorCode::NotFound, why).for_request(request_id));
        }
        let permit = match self.history_permit(request_id) {
            Ok(permit) => permit,
            Err(e) => return self.refuse(e),
        };
        let query = history::Query::from_positions(
            request.last,
            &request.since,
            request.since_ms,
            config.history.max_reply_messages,
        );
        self.answer_history(request_id, false, vec![(request.topic, query)], permit);
        Ok(())
    }

    /// Takes a history request from this session's budget: the permit to answer it, or why
    /// not.
    fn history_permit(
        &mut self,
        request_id: u64,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, v1::Error> {
        let config = &self.server.config.history;
        let budget = self.history.get_or_insert_with(|| {
            Box::new(HistoryBudget {
                rate: TokenBucket::new(f64::from(config.requests_per_s), config.request_burst),
                running: Arc::new(tokio::sync::Semaphore::new(config.max_running_requests)),
            })
        });
        if !budget.rate.take(Instant::now()) {
            let why = format!(
                "more than {} history requests per second (history.requests_per_s)",
                config.requests_per_s
            );
            return Err(error(ErrorCode::RateLimited, why).for_request(request_id));
        }
        budget.running.clone().try_acquire_owned().map_err(|_| {
            let why = format!(
                "{} history requests are still being answered (history.max_running_requests)",
                config.max_running_requests
            );
            error(ErrorCode::LimitExceeded, why).for_request(request_id)
        })
    }

    /// Answers history request `request_id` (a recovery when `recovery`), topic by topic, in
    /// a task of its own that ends with the session.
    fn answer_history(
        &self,
        request_id: u64,
        recovery: bool,
        items: Vec<(String, history::Query)>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let server = self.server.clone();
        let ctrl = self.ctrl.clone();
        let closer = self.me.closer.clone();
        let account = self.me.scope.clone();
        let task = async move {
            let _permit = permit;
            for (topic, query) in items {
                let key = TopicKey::new(&account, &topic);
                let merged = tokio::select! {
                    merged = history::collect(&server, &key, &query) => merged,
                    () = closer.closed() => return,
                    () = server.shutdown.cancelled() => return,
                };
                let frames = match merged {
                    Ok(merged) => history_batches(request_id, recovery, &topic, &merged),
                    Err(e) if recovery => {
                        tracing::info!(error = %e, %topic, "recovery from a position no stream has");
                        let gap = history::Merged {
                            gap: true,
                            ..Default::default()
                        };
                        history_batches(request_id, recovery, &topic, &gap)
                    }
                    Err(e) => {
                        let e = error(ErrorCode::BadFrame, e.to_string()).for_request(request_id);
                        vec![encode(&v1::ServerToClient::error(e))]
                    }
                };
                for frame in frames {
                    tokio::select! {
                        sent = ctrl.send(frame) => if sent.is_err() { return },
                        () = closer.closed() => return,
                    }
                }
            }
        };
        self.server
            .tracker
            .spawn(task.instrument(tracing::Span::current()));
    }

    /// Subscribes this session to `fresh` (topics it does not have yet) through the control
    /// task; returns the waiter that fires once every linked peer has confirmed.
    async fn add_topics(
        &mut self,
        fresh: Vec<Arc<str>>,
    ) -> Result<(u64, oneshot::Receiver<()>), v1::Error> {
        if !fresh.is_empty() {
            // Recorded before the command is sent, so the session's close always cleans up.
            self.topics.extend(fresh.iter().cloned());
            self.me.topics.store(
                u32::try_from(self.topics.len()).unwrap_or(u32::MAX),
                Ordering::Relaxed,
            );
            self.me.subscribed.store(true, Ordering::Relaxed);
            self.ever_subscribed = true;
        }
        let topics = self.keys(fresh);
        let (waiter, done, wait) = self.server.peer_waiter();
        self.server
            .command(Command::Subscribe {
                session: self.me.clone(),
                topics,
                waiter,
                done,
            })
            .await?;
        Ok((waiter, wait))
    }

    async fn unsubscribe(&mut self, unsub: v1::Unsubscribe) -> Result<(), v1::Error> {
        self.check_topics(&unsub.topics)
            .map_err(|e| e.for_request(unsub.request_id))?;
        let gone: Vec<Arc<str>> = unsub
            .topics
            .iter()
            .filter_map(|t| self.topics.take(t.as_str()))
            .collect();
        if !gone.is_empty() {
            let room = self.confirmation_room(unsub.request_id)?;
            let (waiter, wait) = self.remove_topics(gone).await?;
            return self
                .answer_change(unsub.request_id, waiter, wait, room, Vec::new())
                .await;
        }
        self.ack(unsub.request_id, Vec::new(), Vec::new())
    }

    /// Unsubscribes this session from `gone` (taken out of its topics already) through the
    /// control task; returns the waiter that fires once every linked peer has confirmed.
    async fn remove_topics(
        &mut self,
        gone: Vec<Arc<str>>,
    ) -> Result<(u64, oneshot::Receiver<()>), v1::Error> {
        self.me.topics.store(
            u32::try_from(self.topics.len()).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
        self.me
            .subscribed
            .store(!self.topics.is_empty(), Ordering::Relaxed);
        let topics = self.keys(gone);
        let (waiter, done, wait) = self.server.peer_waiter();
        self.server
            .command(Command::Unsubscribe {
                session: self.me.id,
                topics,
                waiter,
                done,
            })
            .await?;
        Ok((waiter, wait))
    }

    /// Makes the subscription changes the application's backend asked for, tells the client
    /// (`SubscriptionsChanged`) and answers each.
    async fn backend_changes(&mut self) -> Result<(), v1::Error> {
        for op in self.server.take_session_ops(self.me.id) {
            let outcome = if op.unsubscribe {
                self.backend_unsubscribe(&op.topics).await
            } else {
                self.backend_subscribe(&op.topics).await
            };
            let told = match &outcome {
                Ok(Some(changed)) => {
                    self.reply(&v1::ServerToClient::subscriptions_changed(changed.clone()))
                }
                _ => Ok(()),
            };
            let _ = op.done.send(outcome.map(|_| ()));
            told?;
        }
        Ok(())
    }

    /// Subscribes to `topics` (those it does not have), within the subscription limit, and
    /// waits (up to `subscribe_sync_timeout_ms`) for the linked peers to have them.
    async fn backend_subscribe(
        &mut self,
        topics: &[String],
    ) -> Result<Option<v1::SubscriptionsChanged>, v1::Error> {
        let mut seen = HashSet::new();
        let fresh: Vec<Arc<str>> = topics
            .iter()
            .filter(|t| !self.topics.contains(t.as_str()) && seen.insert(t.as_str()))
            .map(|t| Arc::from(t.as_str()))
            .collect();
        if fresh.is_empty() {
            return Ok(None);
        }
        let limit = self.server.config.max_subscriptions;
        let own = usize::from(self.me.node.is_some());
        if self.topics.len() - own + fresh.len() > limit {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("the client's subscription limit of {limit} topics would be passed"),
            ));
        }
        let added = fresh.iter().map(|t| t.to_string()).collect();
        let (_, wait) = self.add_topics(fresh).await?;
        let _ = tokio::time::timeout(self.server.config.subscribe_sync_timeout(), wait).await;
        Ok(Some(v1::SubscriptionsChanged {
            added,
            removed: Vec::new(),
        }))
    }

    /// Unsubscribes from those of `topics` it has.
    async fn backend_unsubscribe(
        &mut self,
        topics: &[String],
    ) -> Result<Option<v1::SubscriptionsChanged>, v1::Error> {
        let gone: Vec<Arc<str>> = topics
            .iter()
            .filter_map(|t| self.topics.take(t.as_str()))
            .collect();
        if gone.is_empty() {
            return Ok(None);
        }
        let removed = gone.iter().map(|t| t.to_string()).collect();
        self.remove_topics(gone).await?;
        Ok(Some(v1::SubscriptionsChanged {
            added: Vec::new(),
            removed,
        }))
    }

    /// This session's account's keys for `topics`.
    fn keys(&self, topics: Vec<Arc<str>>) -> Vec<TopicKey> {
        topics
            .into_iter()
            .map(|topic| TopicKey {
                account: self.me.scope.clone(),
                topic,
            })
            .collect()
    }

    /// Room for one more change that may outlast `subscribe_sync_timeout_ms`, taken before the
    /// change is made: a client with `max_pending_confirmations` changes still unconfirmed
    /// gets `LIMIT_EXCEEDED` for the next one.
    fn confirmation_room(
        &self,
        request_id: u64,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, v1::Error> {
        self.confirmations.clone().try_acquire_owned().map_err(|_| {
            let limit = self.server.config.max_pending_confirmations;
            error(
                ErrorCode::LimitExceeded,
                format!(
                    "{limit} subscription changes are still waiting for servers to confirm them"
                ),
            )
            .for_request(request_id)
        })
    }

    /// Answers request `request_id` once every linked peer has applied its change (`wait`
    /// fires), or at `subscribe_sync_timeout_ms` with an `Ack` naming the peers still pending;
    /// then [`follow_up`], a task of its own, waits for them without holding up this session's
    /// reading, and sends the second `Ack`.
    async fn answer_change(
        &self,
        request_id: u64,
        waiter: u64,
        mut wait: oneshot::Receiver<()>,
        room: tokio::sync::OwnedSemaphorePermit,
        history: Vec<String>,
    ) -> Result<(), v1::Error> {
        let server = &self.server;
        let timeout = server.config.subscribe_sync_timeout();
        tokio::select! {
            result = tokio::time::timeout(timeout, &mut wait) => {
                if result.is_ok() {
                    return self.ack(request_id, Vec::new(), history);
                }
            }
            _ = self.me.closer.closed() => return Ok(()),
            _ = server.shutdown.cancelled() => return Err(error(ErrorCode::ShuttingDown, "comm server is shutting down")),
        }
        let pending = pending_peers(server, waiter).await?;
        if pending.is_empty() {
            return self.ack(request_id, pending, history);
        }
        tracing::warn!(
            session = self.me.id,
            ?timeout,
            ?pending,
            "peers did not confirm a subscription change in time"
        );
        server.stats.acks_pending.inc();
        self.ack(request_id, pending, history)?;
        let follow_up = follow_up(
            server.clone(),
            self.ctrl.clone(),
            self.me.closer.clone(),
            request_id,
            waiter,
            wait,
            room,
        );
        server
            .tracker
            .spawn(follow_up.instrument(tracing::Span::current()));
        Ok(())
    }

    /// The first `Ack` of a change; `history`: the subscribed topics that keep history.
    fn ack(
        &self,
        request_id: u64,
        pending: Vec<String>,
        history: Vec<String>,
    ) -> Result<(), v1::Error> {
        self.reply(&v1::ServerToClient::ack(v1::Ack {
            request_id,
            pending,
            at_ms: link::now_ms(),
            history,
        }))
    }

    /// Queues a reply. A client whose reply queue is full is not reading at all.
    fn reply(&self, msg: &v1::ServerToClient) -> Result<(), v1::Error> {
        self.reply_frame(encode(msg))
    }

    fn reply_frame(&self, frame: Bytes) -> Result<(), v1::Error> {
        self.ctrl
            .try_send(frame)
            .map_err(|_| error(ErrorCode::SlowConsumer, "replies are not being read"))
    }
}

/// Waits (holding `room`) for the peers that had not confirmed request `request_id`'s change
/// (`waiter`) when its first `Ack` went out, then sends the second `Ack`: empty once they
/// have all confirmed, or, if they have not by `Config::confirm_deadline`, naming those that
/// still have not. Ends, sending nothing, when the session ends (`closer`) or the server shuts
/// down; dropping `wait` then lets the control task forget the waiter.
async fn follow_up(
    server: Arc<Server>,
    ctrl: queue::Sender<Bytes>,
    closer: Closer,
    request_id: u64,
    waiter: u64,
    wait: oneshot::Receiver<()>,
    room: tokio::sync::OwnedSemaphorePermit,
) {
    let _room = room;
    let deadline = server.config.confirm_deadline();
    let still = tokio::select! {
        result = tokio::time::timeout(deadline, wait) => match result {
            Ok(_) => Vec::new(),
            Err(_) => match pending_peers(&server, waiter).await {
                Ok(still) => still,
                Err(_) => return,
            },
        },
        () = closer.closed() => return,
        () = server.shutdown.cancelled() => return,
    };
    if !still.is_empty() {
        tracing::warn!(
            ?deadline,
            pending = ?still,
            "gave up waiting for peers to confirm a subscription change"
        );
        server.stats.confirmations_abandoned.inc();
    }
    let ack = v1::ServerToClient::ack(v1::Ack {
        request_id,
        pending: still,
        ..v1::Ack::default()
    });
    if ctrl.try_send(encode(&ack)).is_err() {
        let words = error(ErrorCode::SlowConsumer, "replies are not being read");
        closer.close(Some(link::LastWords::error::<v1::ServerToClient>(words)));
    }
}

/// The `HistoryBatch` frames of `merged`, the last with `done` (and the gap).
fn history_batches(
    request_id: u64,
    recovery: bool,
    topic: &str,
    merged: &history::Merged,
) -> Vec<Bytes> {
    let runs = history::chunks(&merged.messages);
    let last = runs.len() - 1;
    runs.into_iter()
        .enumerate()
        .map(|(i, run)| {
            let done = i == last;
            let head = v1::HistoryBatch {
                request_id,
                messages: Vec::new(),
                topic: topic.to_owned(),
                recovery,
                done,
                gap: done && merged.gap,
                missed_at_least: if done { merged.missed } else { 0 },
                unknown_streams: if done {
                    merged.unknown.clone()
                } else {
                    Vec::new()
                },
            };
            history::batch_frame(&head, run)
        })
        .collect()
}

/// The peers `waiter` still waits for, by server id (none once it is complete).
async fn pending_peers(server: &Server, waiter: u64) -> Result<Vec<String>, v1::Error> {
    let (reply, answer) = oneshot::channel();
    server.command(Command::Pending { waiter, reply }).await?;
    let names = answer.await.unwrap_or_default();
    Ok(names.iter().map(|n| n.to_string()).collect())
}

#[cfg(test)]
mod rules_tests {
    use super::*;

    #[test]
    fn an_identity_without_rules_may_do_anything_and_one_with_rules_only_what_they_say() {
        let open = Rules::of(&v1::Identity::default());
        assert!(open.may_publish("any/topic") && open.may_subscribe("any/topic"));
        let agent = Rules::of(&v1::Identity {
            restricted: true,
            publish: vec!["telemetry/#".into()],
            subscribe: vec!["command/+".into()],
            ..v1::Identity::default()
        });
        assert!(agent.may_publish("telemetry/gps/1") && !agent.may_publish("command/x"));
        assert!(agent.may_subscribe("command/x") && !agent.may_subscribe("telemetry/gps"));
        let nothing = Rules::of(&v1::Identity {
            restricted: true,
            ..v1::Identity::default()
        });
        assert!(!nothing.may_publish("a") && !nothing.may_subscribe("a"));
    }
}
