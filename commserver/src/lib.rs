#![recursion_limit = "256"]
//! The relaymesh comm server.
//!
//! Clients arrive with a single-use key the coordinator reserved here, subscribe to topics and
//! publish. Each published message is encoded once and queued for every local subscriber, and
//! forwarded once to every peer server that has subscribers for the topic; a forwarded message
//! is delivered locally on the receiving server and never forwarded again. The server stays
//! registered with the coordinator, reconnecting with backoff when that link drops, and keeps
//! one link to every other server (the lower id dials).
//!
//! Layout: [`interest`] is the subscription/interest state machine (no I/O), [`control`] the task
//! that owns it, [`routes`] the lock-free-in-steady-state delivery path, [`session`] the client
//! link, [`peers`] the peer links, [`coordinator_link`] registration and key reservation, [`keys`]
//! the key store, [`api`] the operational endpoints.

pub mod config;

mod api;
mod control;
mod coordinator_link;
mod dispatch;
pub mod history;
mod inbox;
mod interest;
mod keys;
mod locals;
mod logins;
mod names;
mod operator;
mod peers;
mod presence;
mod relay;
mod routes;
mod session;
mod small_set;
mod stats;

/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use bytes::Bytes;

    /// Decodes `data` as a dispatch frame; one that decodes must encode back to the same bytes.
    pub fn dispatch_frame(data: &[u8]) {
        let data = Bytes::copy_from_slice(data);
        if let Ok(frame) = crate::dispatch::frame::decode(&data) {
            let again =
                crate::dispatch::frame::encode(frame.kind, &frame.ip, frame.id, &frame.data);
            assert_eq!(
                again, data,
                "{frame:?} does not encode back to what it was decoded from"
            );
        }
    }
}

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use relaymesh_net::auth::{Challenges, LinkCredentials, LinkTrust};
use relaymesh_net::config::ConfigError;
use relaymesh_net::url::Form;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

pub use config::Config;

use crate::control::{Command, PeerLink};
use crate::interest::SessionId;
use crate::keys::KeyStore;
use crate::logins::LoginOf;
use crate::routes::{RouteTable, Subscriber};

/// Commands the control task may have queued before senders wait.
const CONTROL_QUEUE: usize = 8_192;
/// How long a `/v1/peers/challenge` challenge may be answered.
const PEER_CHALLENGE_TTL: Duration = Duration::from_secs(30);
/// Peer-link challenges outstanding at most (peers number in the tens; this bounds a flood).
const MAX_PEER_CHALLENGES: usize = 1_024;

/// Shared state of one comm server process.
struct Server {
    config: Config,
    id: Arc<str>,
    public_url: String,
    /// TLS of the listeners (certificate reloaded on change), when configured.
    tls: Option<relaymesh_net::tls::ServiceTls>,
    /// Whom this server's dials (coordinator, peers) trust, and what they present.
    connector: relaymesh_net::tls::Connector,
    keys: Mutex<KeyStore>,
    routes: RouteTable,
    /// The history of topics that keep one.
    histories: Arc<history::Histories>,
    /// History requests out to peers, by request id: where their answers go.
    history_queries: Mutex<HashMap<u64, history::AnswerTx>>,
    /// Commands to the control task, which holds the receiver and owns subscription state.
    control: mpsc::Sender<Command>,
    /// Live client sessions, for counts and cluster-wide drop notices.
    sessions: Mutex<HashMap<SessionId, Arc<Subscriber>>>,
    /// The roles, scopes and accounts sessions carry, one copy of each.
    names: names::Names,
    /// Raised when a session comes or goes, so every coordinator link reports the new load
    /// soon (coalesced) instead of at the next heartbeat.
    load_changed: tokio::sync::watch::Sender<()>,
    /// The links to the coordinators: the peers they list, the primary one.
    coordinators: coordinator_link::Coordinators,
    /// Node sessions here, and the cluster's directory of online nodes.
    presence: presence::Presence,
    /// Requests to the coordinator's inbox, and the sessions waiting for their answers.
    inboxes: inbox::Inboxes,
    /// Logins relayed to the coordinator for clients that came without a key.
    relays: relay::Relays,
    /// The peers the coordinator has told of, with their URLs (for readiness: each must be
    /// linked; with mutual TLS, a peer's certificate must name its URL's host).
    known_peers: Mutex<BTreeMap<Arc<str>, String>>,
    /// Woken when `known_peers` gains one.
    peers_known: tokio::sync::Notify,
    /// Live peer links by server id, for stats.
    peer_links: Mutex<BTreeMap<Arc<str>, Arc<PeerLink>>>,
    /// The last link with each peer that went down, to settle what it lost when the peer
    /// links again.
    previous_links: Mutex<HashMap<Arc<str>, peers::PreviousLink>>,
    /// Peers this server dials (those with a higher id), and the tokens that stop their dialers.
    dialers: Mutex<HashMap<Arc<str>, peers::Dialer>>,
    stats: stats::Stats,
    /// How this server proves itself to the coordinator and to peers.
    credentials: LinkCredentials,
    /// Who may open a peer link to this server.
    peer_trust: LinkTrust,
    /// The newest login announced by `Replace` per (account, role, client id), and until when
    /// it matters (a key's lifetime); bounded by `max_pending_keys`.
    newest_logins: Mutex<HashMap<LoginOf, (u64, Instant)>>,
    /// `/v1/peers/challenge` requests per source address.
    challenge_limits: relaymesh_net::limits::AddressLimits,
    next_id: AtomicU64,
    shutdown: CancellationToken,
    /// Drained by an operator (through the coordinator): takes no new clients until undrained.
    drained: std::sync::atomic::AtomicBool,
    /// The reason of the latest drain, told to each client asked to move.
    drain_reason: Mutex<String>,
    /// Flushes of the peer links for leaving clients, by nonce (one per leaving session).
    flushes: Mutex<HashMap<u64, operator::Flushing>>,
    /// Subscription changes a backend asked for, waiting for their session to take them
    /// (at most `operator::MAX_SESSION_OPS` each).
    session_ops: Mutex<HashMap<SessionId, Vec<operator::SessionOp>>>,
    tracker: TaskTracker,
    started: Instant,
    /// `direct_write_budget_us` resolved for this runtime.
    direct_writes: routes::DirectWrites,
}

impl Server {
    /// Hands `command` to the control task, waiting for room in its queue.
    async fn command(&self, command: Command) -> Result<(), relaymesh_proto::v1::Error> {
        self.control.send(command).await.map_err(|_| {
            relaymesh_proto::error(
                relaymesh_proto::ErrorCode::ShuttingDown,
                "comm server is shutting down",
            )
        })
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A waiter for a change to reach the linked peers: its id and the sender, which go to the
    /// control task with the change, and the receiver, which fires once every peer applied it.
    fn peer_waiter(
        &self,
    ) -> (
        interest::WaiterId,
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (done, wait) = tokio::sync::oneshot::channel();
        (self.next_id(), done, wait)
    }

    /// Shutting down or drained: no new clients, reservations refused, reported as draining.
    fn draining(&self) -> bool {
        self.shutdown.is_cancelled() || self.drained.load(Ordering::Relaxed)
    }

    /// How the listeners serve: the configured limits, and TLS when configured.
    fn serve_options(&self) -> relaymesh_net::serve::ServeOptions {
        let mut options = self.config.serve_options(self.stats.serving.clone());
        options.tls = self.tls.as_ref().map(|tls| tls.acceptor.clone());
        options
    }

    /// Tells the coordinator links that sessions came or went.
    fn load_changed(&self) {
        self.load_changed.send_replace(());
    }

    fn client_count(&self) -> usize {
        relaymesh_net::sync::lock(&self.sessions).len()
    }
}

/// The id a server gets when none is configured: its public address, which stays the same as
/// long as the server comes back at the same address.
fn default_id(public_url: &str) -> String {
    let address = public_url
        .trim_start_matches("ws://")
        .trim_start_matches("wss://")
        .trim_end_matches('/');
    address
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-.:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect()
}

/// Serves the comm server on `listener` until `shutdown` is cancelled: registers with the
/// coordinators (and keeps doing so), links to peers, and serves clients. When `shutdown` is
/// cancelled it first drains for up to `drain_on_shutdown_ms` (see [`leave`]), then it reports
/// itself draining, tells clients and peers `SHUTTING_DOWN`, and waits up to the grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ConfigError> {
    config.validate()?;
    let dispatch = match config.dispatch_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            ConfigError::Invalid(format!("cannot listen on {addr} (`dispatch_listen`): {e}"))
        })?),
        None => None,
    };
    run_with(listener, dispatch, config, shutdown).await
}

/// [`run`], with the device gateway's driver listener already bound (tests bind port 0).
pub async fn run_with(
    listener: TcpListener,
    dispatch: Option<TcpListener>,
    config: Config,
    asked: CancellationToken,
) -> Result<(), ConfigError> {
    config.validate()?;
    // Cancelled once the server has drained (see `leave`): everything below stops on it.
    let shutdown = CancellationToken::new();
    let local = listener
        .local_addr()
        .map_err(|e| ConfigError::Invalid(format!("listener has no address: {e}")))?;
    if config.public_url.is_none() && local.ip().is_unspecified() {
        return Err(ConfigError::Invalid(format!(
            "`public_url` must be set when listening on {local}: peers and clients need a reachable address"
        )));
    }
    let tls = config
        .tls
        .load()
        .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?;
    let connector = config
        .tls
        .connector(tls.as_ref())
        .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?;
    // Handed to clients and peers as given, in its ws:// (wss://) form (validated above).
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let public_url = config
        .public_url
        .as_deref()
        .and_then(|url| relaymesh_net::url::normalize(url, Form::WebSocket).ok())
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    if tls.is_some() != relaymesh_net::url::is_tls(&public_url) {
        return Err(ConfigError::Invalid(format!(
            "`public_url` {public_url} must be {scheme}:// when TLS is {} (tls.cert)",
            if tls.is_some() { "on" } else { "off" }
        )));
    }
    let id: Arc<str> = config
        .id
        .clone()
        .unwrap_or_else(|| default_id(&public_url))
        .into();
    let credentials = match &config.identity_key_file {
        Some(path) => LinkCredentials::Key(
            relaymesh_net::keys::read_signing_key(path)
                .map_err(|e| ConfigError::Invalid(format!("`identity_key_file`: {e}")))?,
        ),
        None => LinkCredentials::Secret(config.cluster_secret.clone()),
    };
    let peer_trust = LinkTrust::new(
        config.cluster_secret.clone(),
        relaymesh_net::auth::parse_public_keys(&config.trusted_peer_keys)
            .map_err(|e| ConfigError::Invalid(format!("`trusted_peer_keys`: {e}")))?,
        Challenges::new(PEER_CHALLENGE_TTL, MAX_PEER_CHALLENGES),
    );
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let tracker = TaskTracker::new();
    let direct_writes = routes::DirectWrites::of(
        config.direct_write_budget_us,
        tokio::runtime::Handle::current().metrics().num_workers(),
    );
    let server = Arc::new(Server {
        credentials,
        peer_trust,
        challenge_limits: relaymesh_net::limits::AddressLimits::new(120, 30, 10_000),
        newest_logins: Mutex::new(HashMap::new()),
        keys: Mutex::new(KeyStore::new(config.key_ttl(), config.max_pending_keys)),
        routes: RouteTable::default(),
        histories: Arc::new(history::Histories::new(
            config.history.clone(),
            direct_writes,
        )),
        history_queries: Mutex::new(HashMap::new()),
        control: control_tx,
        sessions: Mutex::new(HashMap::new()),
        names: names::Names::default(),
        known_peers: Mutex::new(BTreeMap::new()),
        peers_known: tokio::sync::Notify::new(),
        peer_links: Mutex::new(BTreeMap::new()),
        previous_links: Mutex::new(HashMap::new()),
        dialers: Mutex::new(HashMap::new()),
        stats: stats::Stats::default(),
        next_id: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        drained: std::sync::atomic::AtomicBool::new(false),
        drain_reason: Mutex::new(String::new()),
        flushes: Mutex::new(HashMap::new()),
        session_ops: Mutex::new(HashMap::new()),
        tracker: tracker.clone(),
        started: Instant::now(),
        load_changed: tokio::sync::watch::Sender::new(()),
        coordinators: coordinator_link::Coordinators::default(),
        presence: presence::Presence::default(),
        inboxes: inbox::Inboxes::default(),
        relays: relay::Relays::new(config.max_logins_in_flight),
        direct_writes,
        id,
        public_url,
        tls,
        connector,
        config,
    });
    if let Some(tls) = &server.tls {
        tracker.spawn(tls.identity.clone().watch(tls.reload, shutdown.clone()));
    }
    // Every log line of this server carries its id (several may share a process in tests).
    let span = tracing::info_span!("commserver", id = %server.id);
    tracker.spawn(leave(server.clone(), asked, shutdown.clone()).instrument(span.clone()));
    tracker.spawn(control::run(server.clone(), control_rx).instrument(span.clone()));
    tracker.spawn(coordinator_link::run(server.clone()).instrument(span.clone()));
    tracker
        .spawn(session::watch_sessions(server.clone(), shutdown.clone()).instrument(span.clone()));
    let router = Router::new()
        .route("/v1/client", get(session::upgrade))
        .route("/v1/peers", get(peers::accept))
        .route("/v1/peers/challenge", post(peers::challenge))
        .route("/v1/stats", get(api::stats))
        .route("/readyz", get(api::readyz))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .fallback(relaymesh_net::serve::not_found)
        .method_not_allowed_fallback(relaymesh_net::serve::method_not_allowed)
        .with_state(server.clone());
    span.in_scope(|| tracing::info!(url = %server.public_url, "comm server listening on {local}"));
    if let Some(dispatch_listener) = dispatch {
        // The gateway has its own listener and does not wait for the coordinator.
        let gateway = dispatch::Dispatch::start(&server, tracker.clone(), shutdown.clone());
        if let Ok(addr) = dispatch_listener.local_addr() {
            span.in_scope(|| tracing::info!("dispatch gateway listening on {addr}"));
        }
        tracker.spawn(
            relaymesh_net::serve::serve(
                dispatch_listener,
                gateway.router(),
                server.serve_options(),
                shutdown.clone(),
                tracker.clone(),
            )
            .instrument(span.clone()),
        );
    }
    let options = server.serve_options();
    relaymesh_net::serve::serve(listener, router, options, shutdown, tracker.clone())
        .instrument(span.clone())
        .await;
    relaymesh_net::shutdown::drain(&tracker, server.config.shutdown_grace()).await;
    span.in_scope(|| tracing::info!("comm server stopped"));
    Ok(())
}

/// Leaves when `asked`: drains first (no new clients, every client asked to move, the way an
/// operator's drain does it, so they lose nothing), waits until they have all gone or
/// `drain_on_shutdown_ms` has passed, and then cancels `stop`, which closes what is left with
/// `SHUTTING_DOWN`. A rolling upgrade (SIGTERM to one server at a time) so loses no messages.
async fn leave(server: Arc<Server>, asked: CancellationToken, stop: CancellationToken) {
    tokio::select! {
        () = asked.cancelled() => {}
        () = stop.cancelled() => return,
    }
    let within = server.config.drain_on_shutdown();
    let clients = server.client_count();
    if !within.is_zero() && clients > 0 {
        tracing::info!(
            clients,
            within_ms = within.as_millis() as u64,
            "draining before stopping: asking every client to move"
        );
        let mut changed = server.load_changed.subscribe();
        server.drain(&relaymesh_proto::v1::Drain {
            drained: true,
            reason: "the server is shutting down".into(),
        });
        let emptied = tokio::time::timeout(within, async {
            while server.client_count() > 0 {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        match emptied {
            Ok(()) => tracing::info!("every client moved; stopping"),
            Err(_) => tracing::warn!(
                clients = server.client_count(),
                "clients still here after drain_on_shutdown_ms; closing their sessions"
            ),
        }
    }
    stop.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ids_are_the_public_address() {
        assert_eq!(default_id("ws://127.0.0.1:7501"), "127.0.0.1:7501");
        assert_eq!(default_id("ws://[::1]:80/"), "-::1-:80");
        assert_eq!(
            default_id("ws://relay-a.example.com:7500"),
            "relay-a.example.com:7500"
        );
    }
}
