//! The comm server's side of link 1: register with every coordinator, report load, answer key
//! reservations, follow peer changes, and reconnect with capped exponential backoff and jitter
//! whenever a link drops. While the coordinators are away, clients and peer links keep working;
//! only new logins wait for one to come back.
//!
//! **Several coordinators.** The server keeps one link to each coordinator of `coordinator`
//! (a comma-separated list), and to each address a coordinator name resolves to, looked up
//! again every `coordinator_resolve_ms` ([`run`]). Every coordinator hears everything (load,
//! node sessions) and may send clients here, so each has the whole registry. The rest is
//! settled here, in [`Coordinators`]:
//! - **peers** are the union of what the registered coordinators list (a coordinator that
//!   lost a server's link says `PeerLeft`, but the server is still a peer while another lists
//!   it); while none is registered, the last union stays;
//! - the **primary** link, the oldest registered one, carries the inbox's requests and is the
//!   directory of online nodes whose changes become `@presence` events (every coordinator
//!   sends the same changes; one copy of each reaches the subscribers). When it drops, the
//!   next takes over, and what differs between the two directories becomes events;
//! - a link that the coordinator closes as `REPLACED` because another link of this server
//!   registered there (two addresses of one coordinator) stands by until that one ends.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relaymesh_net::link::{self, Closer, Flow, Heartbeat, WriterSetup};
use relaymesh_net::queue;
use relaymesh_net::sync::lock;
use relaymesh_net::ws::ClientLink;
use relaymesh_proto::v1::{self, coordinator_to_server::Kind};
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION, check_version, encode, error, unexpected};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Server;
use crate::keys::KeyError;

/// Frames queued for a coordinator (answers and load reports).
const COORDINATOR_QUEUE: usize = 4_096;
/// Least time between two load reports caused by sessions coming and going.
const LOAD_REPORT_COALESCE: Duration = Duration::from_millis(100);

/// One coordinator link's destination: a configured URL, and the address its name resolved
/// to (`None`: an address already, or a name that did not resolve, which each dial tries
/// again).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    url: String,
    addr: Option<SocketAddr>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{} ({addr})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// Keeps the server registered with every coordinator until shutdown: resolves the
/// configured URLs, starts a link for each address, and stops the links of addresses that
/// went away.
pub(crate) async fn run(server: Arc<Server>) {
    let urls: Vec<String> = server
        .config
        .coordinator_urls()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut running: BTreeMap<Target, CancellationToken> = BTreeMap::new();
    let mut every = tokio::time::interval(server.config.coordinator_resolve());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = server.shutdown.cancelled() => break,
        }
        let mut wanted = Vec::new();
        for url in &urls {
            wanted.extend(resolve(url, &running).await);
        }
        running.retain(|target, stop| {
            let keep = wanted.contains(target);
            if !keep {
                tracing::info!(coordinator = %target, "the coordinator's name no longer resolves to this address; leaving it");
                stop.cancel();
            }
            keep
        });
        for target in wanted {
            if running.contains_key(&target) {
                continue;
            }
            let stop = server.shutdown.child_token();
            let span = tracing::info_span!("coordinator", at = %target);
            // Numbered here, in the order of the configured list and of the addresses, so
            // the oldest link (the primary's first choice) is the first one listed.
            let number = server.coordinators.add(&target);
            let task = keep_registered(server.clone(), target.clone(), number, stop.clone());
            server.tracker.spawn(task.instrument(span));
            running.insert(target, stop);
        }
    }
}

/// The links `url` wants: one per address its host resolves to. A URL naming an address needs
/// no lookup; a name that does not resolve keeps the links it had (DNS may be away for a
/// moment), or, having none, gets one that resolves at each dial and says why it fails.
async fn resolve(url: &str, running: &BTreeMap<Target, CancellationToken>) -> Vec<Target> {
    let unresolved = || Target {
        url: url.to_owned(),
        addr: None,
    };
    let Some((host, port)) = relaymesh_net::url::host_port(url) else {
        return vec![unresolved()];
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return vec![unresolved()];
    }
    match tokio::net::lookup_host((bare, port)).await {
        Ok(addrs) => {
            let mut targets: Vec<Target> = addrs
                .map(|addr| Target {
                    url: url.to_owned(),
                    addr: Some(addr),
                })
                .collect();
            targets.sort();
            targets.dedup();
            if targets.is_empty() {
                targets.push(unresolved());
            }
            targets
        }
        Err(e) => {
            let had: Vec<Target> = running.keys().filter(|t| t.url == url).cloned().collect();
            tracing::warn!(url, error = %e, kept = had.len(), "cannot resolve the coordinator's name");
            if had.is_empty() {
                vec![unresolved()]
            } else {
                had
            }
        }
    }
}

/// Keeps one coordinator link registered until `stop` (its address went away) or shutdown.
async fn keep_registered(
    server: Arc<Server>,
    target: Target,
    number: u64,
    stop: CancellationToken,
) {
    let mut redial = server
        .config
        .redial_coordinator(format!("the coordinator at {target}"));
    let connector = match target.addr {
        Some(addr) => server.connector.pinned(addr),
        None => server.connector.clone(),
    };
    while !stop.is_cancelled() {
        let dial = crate::peers::dial_link_with(&server, &target.url, "/v1/servers", &connector);
        let dialed = tokio::select! {
            dialed = dial => dialed,
            () = stop.cancelled() => break,
        };
        let delay = match dialed {
            Ok(socket) => {
                redial.reached();
                let up_since = Instant::now();
                match serve(&server, number, socket, &stop).await {
                    Ok(Ended::Lost) => {
                        if !stop.is_cancelled() {
                            tracing::warn!("lost the coordinator link; reconnecting");
                        }
                        redial.lost(up_since, Instant::now())
                    }
                    Ok(Ended::Said) => redial.lost(up_since, Instant::now()),
                    Ok(Ended::Replaced(coordinator)) => {
                        stand_by(&server, number, &coordinator, &stop).await;
                        redial.next_delay()
                    }
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
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => break,
        }
    }
    server.coordinators.remove(number);
}

/// The coordinator replaced this link with another of this server's: both addresses reach
/// the same coordinator. Waits until no other link is registered with it.
async fn stand_by(server: &Server, number: u64, coordinator: &str, stop: &CancellationToken) {
    let mut changed = server.coordinators.changed.subscribe();
    let mut said = false;
    while let Some(other) = server.coordinators.registered_with(coordinator, number) {
        if !said {
            tracing::info!(
                coordinator,
                same_as = %other,
                "this address reaches a coordinator this server is registered with already; standing by"
            );
            said = true;
        }
        tokio::select! {
            changed = changed.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// How a connection to a coordinator ended, when not with an error.
enum Ended {
    /// Before registering (shutdown, or the coordinator closed at once).
    Unregistered,
    /// After registering, with no word why: the link broke.
    Lost,
    /// After registering, and why was logged (shutdown, or the coordinator's own `Error`).
    Said,
    /// The coordinator (with this id) took another link of this server's in place of this one.
    Replaced(String),
}

/// Runs one connection to a coordinator.
async fn serve(
    server: &Arc<Server>,
    number: u64,
    socket: ClientLink,
    stop: &CancellationToken,
) -> Result<Ended, v1::Error> {
    let (tx, rx) = queue::bounded(COORDINATOR_QUEUE);
    let register = v1::Register {
        protocol_version: PROTOCOL_VERSION,
        server_id: server.id.to_string(),
        public_url: server.public_url.clone(),
        capacity: server.config.max_clients,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        unreserves: true,
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
        // A link whose address went away ends like one at shutdown (without the drain).
        shutdown: stop.clone(),
        max_burst: link::MAX_BURST,
        watch: link::Watch::Own,
    };
    let reader = Reader {
        server: server.clone(),
        number,
        coordinator_id: String::new(),
        tx,
        heartbeat: server.config.heartbeat(),
        last_report: Instant::now(),
        changed: false,
        load_changed: server.load_changed.subscribe(),
        presence_changed: server.presence.changed.subscribe(),
        ended: Ended::Unregistered,
        publisher: crate::routes::Publisher::new(
            server.direct_writes,
            server.config.slow_consumer_ms,
            server.histories.clone(),
        ),
    };
    let served = link::serve(socket, options, reader).await;
    served.outcome.map(|()| served.handler.ended)
}

/// The coordinator links of this server, as the rest of it sees them: see the module
/// documentation.
#[derive(Debug)]
pub(crate) struct Coordinators {
    state: Mutex<State>,
    /// Raised whenever a link registers or leaves.
    changed: watch::Sender<()>,
}

impl Default for Coordinators {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            changed: watch::Sender::new(()),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Every link by number (the oldest has the lowest), and where it goes.
    targets: BTreeMap<u64, String>,
    /// The registered ones.
    registered: BTreeMap<u64, Registration>,
    /// The link the inbox uses and the presence events come from.
    primary: Option<u64>,
    /// Counts peer news, so the newest word on a peer's URL wins the union.
    news: u64,
}

#[derive(Debug)]
struct Registration {
    coordinator_id: String,
    tx: queue::Sender<Bytes>,
    /// The coordinator takes relayed logins (`Registered.relays_logins`).
    relays_logins: bool,
    /// The peers this coordinator lists: id -> (URL, news number).
    peers: HashMap<String, (String, u64)>,
}

/// A coordinator link as `/v1/stats` shows it.
#[derive(Debug)]
pub(crate) struct LinkState {
    /// The configured URL, and the address it resolved to.
    pub(crate) coordinator: String,
    pub(crate) registered: bool,
    /// The coordinator's id, once registered.
    pub(crate) coordinator_id: String,
    /// Carries the inbox and is the directory of online nodes in force.
    pub(crate) primary: bool,
}

impl Coordinators {
    fn add(&self, target: &Target) -> u64 {
        let mut state = lock(&self.state);
        state.next += 1;
        let number = state.next;
        state.targets.insert(number, target.to_string());
        number
    }

    fn remove(&self, number: u64) {
        lock(&self.state).targets.remove(&number);
    }

    /// Registered coordinator links.
    pub(crate) fn connected(&self) -> usize {
        lock(&self.state).registered.len()
    }

    /// Every link, for `/v1/stats`.
    pub(crate) fn states(&self) -> Vec<LinkState> {
        let state = lock(&self.state);
        state
            .targets
            .iter()
            .map(|(number, target)| {
                let registration = state.registered.get(number);
                LinkState {
                    coordinator: target.clone(),
                    registered: registration.is_some(),
                    coordinator_id: registration
                        .map(|r| r.coordinator_id.clone())
                        .unwrap_or_default(),
                    primary: state.primary == Some(*number),
                }
            })
            .collect()
    }

    /// The target of another registered link with coordinator `id`, if any.
    fn registered_with(&self, id: &str, except: u64) -> Option<String> {
        let state = lock(&self.state);
        state
            .registered
            .iter()
            .find(|(n, r)| **n != except && r.coordinator_id == id)
            .and_then(|(n, _)| state.targets.get(n).cloned())
    }

    /// Link `number` registered with coordinator `id`, which listed `peers`.
    fn registered(
        &self,
        server: &Arc<Server>,
        number: u64,
        id: String,
        tx: queue::Sender<Bytes>,
        (peers, relays_logins): (Vec<v1::ServerInfo>, bool),
    ) {
        let mut state = lock(&self.state);
        state.news += 1;
        let news = state.news;
        let peers = peers
            .into_iter()
            .map(|p| (p.server_id, (p.url, news)))
            .collect();
        state.registered.insert(
            number,
            Registration {
                coordinator_id: id,
                tx: tx.clone(),
                relays_logins,
                peers,
            },
        );
        if state.primary.is_none() {
            state.primary = Some(number);
            server.relays.set_link(relays_logins.then(|| tx.clone()));
            server.inboxes.set_link(Some(tx));
        }
        server.set_peers(union(&state));
        server
            .stats
            .coordinator_connected
            .store(true, Ordering::Relaxed);
        drop(state);
        self.changed.send_replace(());
    }

    /// Coordinator link `number` says `peer` joined (or moved).
    fn peer_joined(&self, server: &Arc<Server>, number: u64, peer: v1::ServerInfo) {
        let mut state = lock(&self.state);
        state.news += 1;
        let news = state.news;
        if let Some(r) = state.registered.get_mut(&number) {
            r.peers.insert(peer.server_id, (peer.url, news));
            server.set_peers(union(&state));
        }
    }

    /// Coordinator link `number` says `peer` left.
    fn peer_left(&self, server: &Arc<Server>, number: u64, peer: &str) {
        let mut state = lock(&self.state);
        if let Some(r) = state.registered.get_mut(&number) {
            r.peers.remove(peer);
            server.set_peers(union(&state));
        }
    }

    /// Link `number` is no longer registered. Returns the presence events of a change of
    /// primary.
    fn unregistered(&self, server: &Arc<Server>, number: u64) -> Vec<(String, v1::PresenceEvent)> {
        let mut state = lock(&self.state);
        if state.registered.remove(&number).is_none() {
            return Vec::new();
        }
        let mut events = Vec::new();
        if state.primary == Some(number) {
            state.primary = state.registered.keys().next().copied();
            let primary = state.primary.and_then(|n| state.registered.get(&n));
            let tx = primary.map(|r| r.tx.clone());
            // What was asked over the old primary is answered "unavailable" now.
            server
                .relays
                .set_link(primary.filter(|r| r.relays_logins).map(|r| r.tx.clone()));
            server.inboxes.set_link(tx);
            events = server.presence.source_changed(number, state.primary);
        } else {
            server.presence.forget(number);
        }
        if state.registered.is_empty() {
            server
                .stats
                .coordinator_connected
                .store(false, Ordering::Relaxed);
        } else {
            server.set_peers(union(&state));
        }
        drop(state);
        self.changed.send_replace(());
        events
    }

    /// Whether link `number` is the primary.
    fn is_primary(&self, number: u64) -> bool {
        lock(&self.state).primary == Some(number)
    }
}

/// The peers the registered coordinators list, each with the URL of the newest word on it.
fn union(state: &State) -> Vec<v1::ServerInfo> {
    let mut peers: HashMap<&str, (&str, u64)> = HashMap::new();
    for r in state.registered.values() {
        for (id, (url, news)) in &r.peers {
            let entry = peers.entry(id.as_str()).or_insert((url.as_str(), *news));
            if *news > entry.1 {
                *entry = (url.as_str(), *news);
            }
        }
    }
    peers
        .into_iter()
        .map(|(id, (url, _))| v1::ServerInfo {
            server_id: id.to_owned(),
            url: url.to_owned(),
        })
        .collect()
}

/// The reading side of one coordinator link.
struct Reader {
    server: Arc<Server>,
    /// This link's number among the server's coordinator links.
    number: u64,
    /// The coordinator's id, once registered.
    coordinator_id: String,
    /// Answers and load reports, drained by the link's writer.
    tx: queue::Sender<Bytes>,
    /// The coordinator's heartbeat settings once registered (they win, so both ends agree on
    /// when the link is dead), this server's before.
    heartbeat: Heartbeat,
    last_report: Instant,
    /// Sessions came or went since the last report: one is due.
    changed: bool,
    /// Raised when sessions come or go (every coordinator link hears it).
    load_changed: watch::Receiver<()>,
    /// Raised when node sessions open or close.
    presence_changed: watch::Receiver<()>,
    ended: Ended,
    /// Delivers presence events to this server's `@presence` subscribers.
    publisher: crate::routes::Publisher,
}

impl Reader {
    /// Delivers presence events to this server's `@presence` subscribers (local only: every
    /// server hears the change itself).
    fn tell_presence(&mut self, events: Vec<(String, v1::PresenceEvent)>) {
        if events.is_empty() {
            return;
        }
        let server = &self.server;
        for (scope, event) in events {
            let payload = encode(&event);
            let msg = crate::routes::Message {
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
        self.coordinator_id.clone_from(&registered.coordinator_id);
        server.stats.registrations.inc();
        tracing::info!(
            peers = registered.peers.len(),
            coordinator_id = %registered.coordinator_id,
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
        // restarted (or this link broke); changes from here on are kept for this link.
        let sessions =
            v1::ServerToCoordinator::node_sessions(server.presence.full_report(self.number));
        answer_coordinator(&self.tx, sessions, self.heartbeat.timeout).await?;
        // The peers once the report is out, so readiness never sees a registered server with
        // none to link to.
        server.coordinators.registered(
            &server,
            self.number,
            registered.coordinator_id,
            self.tx.clone(),
            (registered.peers, registered.relays_logins),
        );
        Ok(Flow::Continue)
    }

    async fn message(&mut self, msg: v1::CoordinatorToServer) -> Result<Flow, v1::Error> {
        let server = &self.server;
        match msg.kind {
            Some(Kind::Reserve(reserve)) => {
                let answer = reserve_key(server, reserve);
                answer_coordinator(&self.tx, answer, self.heartbeat.timeout).await?;
            }
            Some(Kind::Unreserve(unreserve)) => {
                if lock(&server.keys).unreserve(Instant::now(), &unreserve.key) {
                    server.stats.keys_unreserved.inc();
                }
                tracing::debug!(request_id = unreserve.request_id, "key taken back unused");
            }
            Some(Kind::PeerJoined(joined)) => {
                if let Some(peer) = joined.peer {
                    tracing::info!(peer = %peer.server_id, url = %peer.url, "peer joined");
                    server.coordinators.peer_joined(server, self.number, peer);
                }
            }
            Some(Kind::PeerLeft(left)) => {
                tracing::info!(peer = %left.server_id, "peer left");
                server
                    .coordinators
                    .peer_left(server, self.number, &left.server_id);
            }
            Some(Kind::Replace(replace)) => server.replace(&replace),
            Some(Kind::RelayedLoginAnswer(answer)) => server.relays.answered(answer),
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
                let primary = server.coordinators.is_primary(self.number);
                let events = server.presence.apply(self.number, primary, presence);
                self.tell_presence(events);
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
            Some(Kind::Error(e)) if e.error_code() == ErrorCode::Replaced => {
                tracing::info!(error = %e, "the coordinator took another link of this server's");
                self.ended = Ended::Replaced(self.coordinator_id.clone());
                return Ok(Flow::End);
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
            // The senders live as long as the server, which this reader holds.
            Ok(()) = self.load_changed.changed(), if load_due.is_none() => self.changed = true,
            Ok(()) = self.presence_changed.changed() => {
                if let Some(changes) = server.presence.take_changes(self.number) {
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
        let server = self.server.clone();
        server.presence.link_closed(self.number);
        // Another link takes over as the primary, and its directory's differences become
        // events.
        let events = server.coordinators.unregistered(&server, self.number);
        self.tell_presence(events);
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
    tx: &queue::Sender<Bytes>,
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

/// Whether this server takes one more client: not while it drains, nor when its clients and
/// the keys reserved for more fill `max_clients`. `Ok` holds the key store, swept and locked.
pub(crate) fn room_for_one(
    server: &Server,
    now: Instant,
) -> Result<std::sync::MutexGuard<'_, crate::keys::KeyStore>, v1::Error> {
    if server.draining() {
        return Err(error(ErrorCode::ShuttingDown, "server is draining"));
    }
    let clients = server.client_count();
    let mut keys = lock(&server.keys);
    keys.sweep(now);
    if clients + keys.pending() >= server.config.max_clients as usize {
        return Err(error(ErrorCode::ServerFull, "server is at capacity"));
    }
    Ok(keys)
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
    let Some(identity) = reserve.identity.filter(|i| !i.alias.is_empty()) else {
        return failed(error(
            ErrorCode::BadFrame,
            "Reserve needs an identity with an alias",
        ));
    };
    let now = Instant::now();
    let mut keys = match room_for_one(server, now) {
        Ok(keys) => keys,
        Err(e) => return failed(e),
    };
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
