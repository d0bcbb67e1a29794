//! The data plane: who receives a message published on a topic, read on every publish.
//!
//! Every message published on this server goes through one function, [`Publisher::publish`]:
//! client sessions, peer forwards and the dispatch bridge each hold a [`Publisher`]. A local
//! message goes to this server's subscribers and once to every peer server with interest; a
//! peer's forward goes to this server's subscribers only.
//!
//! The control task ([`crate::control`]) owns the subscription state. After each batch of
//! changes it builds an immutable [`Route`] for every affected topic, stores it in the
//! [`RouteTable`] and marks the route it replaced as stale. Publishing sessions and peer readers
//! keep a private [`RouteCache`]: a publish finds its route with one hash lookup in task-local
//! memory plus one atomic load (is it stale?), and takes no lock at all until that topic's
//! route changes. Topics without a route are cached as absent together with the table's
//! generation, which moves only when a route is created.
//!
//! Fan-out encodes each message once, as a WebSocket frame, into a [`Batcher`]: consecutive
//! messages a reader handles for the same route (one burst read from its socket) share one
//! buffer, and each receiver's queue gets that buffer once, within its frame and byte budget
//! (two uncontended atomic additions and no lock per receiver per burst). Full queues drop and
//! count (the slow-consumer policy); closed ones are skipped until the control task removes
//! them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::locals::Chunked;
use bytes::{Bytes, BytesMut};
use relaymesh_net::link::{Backlog, Closer, DataTx, Direct, LastWords, Replay, ReplayLimits};
use relaymesh_net::metrics::Counter;
use relaymesh_net::sync::lock;
use relaymesh_net::wire;
use relaymesh_proto::ErrorCode;
use relaymesh_proto::frame::{self, Sender, forward_frame, message_frame_len, put_message_frame};
use relaymesh_proto::v1;

use crate::history::{Histories, TopicHistory};
use crate::interest::{SessionId, TopicKey};
use crate::stats::Stats;

/// Topics a [`RouteCache`] remembers before it starts over.
const CACHE_CAPACITY: usize = 1024;

/// A local client session, as a receiver of messages.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) id: SessionId,
    /// Who the client is, for the admin API (kicks, client and presence lists): its alias,
    /// routing scope, role and node (if it is one), and how many topics it subscribes to.
    pub(crate) alias: Arc<str>,
    pub(crate) scope: Arc<str>,
    pub(crate) role: Arc<str>,
    pub(crate) node: Option<Arc<str>>,
    pub(crate) topics: std::sync::atomic::AtomicU32,
    /// Woken when the application's backend changed its subscriptions (`Server::session_ops`
    /// holds what to do).
    pub(crate) ops_ready: tokio::sync::Notify,
    /// The session's data queue; its writer task holds the receiver. Full means the client is
    /// not keeping up; closed means the session ended.
    pub(crate) data: DataTx,
    pub(crate) backlog: Arc<Backlog>,
    /// Lets a publisher write to the client's socket itself while the session's writer is idle.
    pub(crate) direct: Option<Arc<Direct>>,
    pub(crate) closer: Closer,
    /// Whether the session has any subscription (for cluster-wide drop notices).
    pub(crate) subscribed: AtomicBool,
    /// The client's unique id within its account and the login it came from, if it gave one:
    /// a newer login with the same id closes this session.
    /// Boxed: many clients give none, and inline it would take the entry out of its
    /// allocator size class.
    pub(crate) client: Option<Box<ClientKey>>,
    /// The client connected with `&batch=1`: a burst's several messages reach it as one
    /// `ServerToClient.batch` (one WebSocket message) instead of one WebSocket message each.
    pub(crate) batches: bool,
}

impl Subscriber {
    /// Hands `frames` (`count` whole WebSocket frames) to the session: written to its socket now
    /// if `write_now` and it is idle, queued otherwise (within its budget, never overtaking
    /// what is queued).
    pub(crate) fn send(&self, frames: &Bytes, count: usize, write_now: bool) -> Enqueued {
        let queue = || enqueue_n(&self.data, &self.backlog, frames, count);
        match &self.direct {
            Some(direct) => direct
                .write_or_queue(frames, write_now, queue)
                .unwrap_or(Enqueued::Yes),
            None => queue(),
        }
    }
}

/// Who a session is, for replacing it on a newer login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientKey {
    pub(crate) account: Arc<str>,
    pub(crate) role: Arc<str>,
    pub(crate) client_id: Arc<str>,
    /// The login's number; larger is newer.
    pub(crate) seq: u64,
}

/// A peer server, as a receiver of forwards.
#[derive(Debug)]
pub(crate) struct PeerOut {
    /// The peer link's data queue; its writer task holds the receiver.
    pub(crate) data: DataTx,
    pub(crate) backlog: Arc<Backlog>,
    /// Forwards queued for the peer.
    pub(crate) forwards_out: Counter,
    /// Forwards routed to the peer but not queued: its queue was full (the peer is told with
    /// `ForwardDropped`) or the link had ended (held for replay, or lost). With
    /// `forwards_out`, everything routed to the peer over this link, which the peer's count is
    /// checked against when it links again.
    pub(crate) missed: Counter,
    /// What becomes of forwards routed here once the link has ended.
    after: std::sync::Mutex<AfterLink>,
    /// Of those, and of those lost with the link's queue, how many per topic (up to
    /// [`MAX_MISSED_TOPICS`] topics), so the peer can tell just their subscribers. Keyed by a
    /// hash of the names, so counting a miss allocates nothing; the names are checked, and a
    /// miss whose hash another topic holds is left unattributed.
    missed_topics: std::sync::Mutex<HashMap<u64, MissedTopic>>,
}

/// What a peer link that ended does with the forwards routed to it.
#[derive(Debug)]
enum AfterLink {
    /// Keeps them for the peer's next link: the link's replay buffer (once its writer has
    /// handed it over, the last forwards it wrote and those still queued come first), or
    /// nothing when replay is off (they are only counted).
    Held(Option<Replay>),
    /// The peer linked again: they go to the new link, after what was replayed.
    Resumed(Arc<PeerOut>),
}

/// What a new link with the peer takes over from the one before it.
#[derive(Debug)]
pub(crate) struct Resumed {
    /// Forwards sent again on the new link.
    pub(crate) replayed: u64,
    /// Held forwards too old to send again.
    pub(crate) stale: u64,
}

/// Forwards on one topic routed to a peer link while it was down.
#[derive(Debug)]
pub(crate) struct MissedTopic {
    pub(crate) scope: Box<str>,
    pub(crate) topic: Box<str>,
    pub(crate) count: u64,
}

/// Topics a down peer link counts misses for one by one; misses on others are told to every
/// subscriber of the peer.
pub(crate) const MAX_MISSED_TOPICS: usize = 10_000;

impl PeerOut {
    /// A peer's data path over a link with these queues.
    pub(crate) fn new(data: DataTx, backlog: Arc<Backlog>, replay: Option<ReplayLimits>) -> Self {
        Self {
            data,
            backlog,
            forwards_out: Counter::default(),
            missed: Counter::default(),
            after: std::sync::Mutex::new(AfterLink::Held(replay.map(Replay::new))),
            missed_topics: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The link's writer has ended: `written` (its replay buffer) and `unsent` (still queued)
    /// go before what was held since.
    pub(crate) fn ended(&self, written: Option<Replay>, unsent: Vec<Bytes>) {
        let mut after = lock(&self.after);
        let AfterLink::Held(held) = &mut *after else {
            return;
        };
        match (written, held.take()) {
            (Some(mut replay), since) => {
                for frame in unsent {
                    replay.hold(frame, |gone| self.note_missed_forward(&gone));
                }
                if let Some(since) = since {
                    replay.append(since, |gone| self.note_missed_forward(&gone));
                }
                *held = Some(replay);
            }
            (None, since) => {
                for frame in &unsent {
                    self.note_missed_forward(frame);
                }
                *held = since;
            }
        }
    }

    /// A forward routed here after the link ended: held for the next link, or passed on to
    /// it. What it costs is counted when the peer links again (`peer_gaps_reported`): what
    /// falls out of the buffer here may be forwards the peer had already received.
    fn routed_after_end(&self, frame: &Bytes, (scope, topic): (&str, &str), stats: &Stats) {
        let mut after = lock(&self.after);
        match &mut *after {
            AfterLink::Resumed(next) => {
                let next = next.clone();
                drop(after);
                forward_to(&next, frame, (scope, topic), stats);
            }
            AfterLink::Held(Some(replay)) => {
                self.missed.inc();
                replay.hold(frame.clone(), |gone| self.note_missed_forward(&gone));
            }
            AfterLink::Held(None) => {
                self.missed.inc();
                self.note_missed(scope, topic);
            }
        }
    }

    /// The peer linked again over `next` and received `received` forwards on this link:
    /// queues what followed them and is still held on `next`, ahead of anything else, and
    /// passes whatever is routed here from now on to `next`.
    pub(crate) fn resume(&self, next: &Arc<PeerOut>, received: u64, stats: &Stats) -> Resumed {
        let mut after = lock(&self.after);
        let (again, stale) = match &mut *after {
            AfterLink::Held(Some(replay)) => replay.take_after(received),
            _ => (Vec::new(), 0),
        };
        for frame in &again {
            next.backlog.force(frame.len(), 1);
            if next.data.send(frame.clone()).is_ok() {
                next.forwards_out.inc();
            } else {
                next.backlog.release(frame.len());
                next.missed.inc();
            }
        }
        stats.forwards_replayed.add(again.len() as u64);
        *after = AfterLink::Resumed(next.clone());
        Resumed {
            replayed: again.len() as u64,
            stale,
        }
    }

    /// [`PeerOut::note_missed`] for an encoded `PeerMessage { forward }`.
    fn note_missed_forward(&self, frame: &Bytes) {
        if let Ok(v1::PeerMessage {
            kind: Some(v1::peer_message::Kind::Forward(forward)),
        }) = relaymesh_proto::decode::<v1::PeerMessage>(frame.clone())
        {
            self.note_missed(&forward.account, &forward.topic);
        }
    }

    /// Everything routed to the peer over this link.
    pub(crate) fn offered(&self) -> u64 {
        self.forwards_out.get() + self.missed.get()
    }

    /// Takes the per-topic counts of what was routed while the link was down.
    pub(crate) fn take_missed_topics(&self) -> Vec<MissedTopic> {
        std::mem::take(&mut *lock(&self.missed_topics))
            .into_values()
            .collect()
    }

    /// Counts a forward on `scope`/`topic` that did not reach the link: its queue was full, it
    /// was down, or it ended with the forward still queued.
    pub(crate) fn note_missed(&self, scope: &str, topic: &str) {
        use std::hash::Hasher as _;
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write(scope.as_bytes());
        hasher.write_u8(0);
        hasher.write(topic.as_bytes());
        let key = hasher.finish();
        let mut topics = lock(&self.missed_topics);
        let known = topics.len();
        match topics.get_mut(&key) {
            Some(m) if &*m.scope == scope && &*m.topic == topic => m.count += 1,
            Some(_) => {}
            None if known < MAX_MISSED_TOPICS => {
                topics.insert(
                    key,
                    MissedTopic {
                        scope: scope.into(),
                        topic: topic.into(),
                        count: 1,
                    },
                );
            }
            None => {}
        }
    }
}

/// Everyone who receives a topic on this server.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) subscribers: Chunked<Arc<Subscriber>>,
    pub(crate) peers: Box<[Arc<PeerOut>]>,
    /// Set once a newer route (or none) has replaced this one in the table.
    stale: AtomicBool,
}

impl Route {
    pub(crate) fn new(subscribers: Chunked<Arc<Subscriber>>, peers: Box<[Arc<PeerOut>]>) -> Self {
        Self {
            subscribers,
            peers,
            stale: AtomicBool::new(false),
        }
    }
}

type AccountRoutes = HashMap<Arc<str>, Arc<Route>>;

/// Current routes by account and topic, written only by the control task.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: RwLock<HashMap<Arc<str>, AccountRoutes>>,
    /// Moves when a route is created, which is what makes a cached "no route" out of date.
    generation: AtomicU64,
}

impl RouteTable {
    /// Topics of `scope` with subscribers here, named after `after` and starting with
    /// `prefix`, by name, at most `limit` of them and `bytes` of names (at least one), with
    /// their subscriber counts; and whether more follow.
    pub(crate) fn topics(
        &self,
        scope: &str,
        prefix: &str,
        after: &str,
        (limit, bytes): (usize, usize),
    ) -> (Vec<(String, u32)>, bool) {
        let mut found: Vec<(String, u32)> = {
            let routes = self
                .routes
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(topics) = routes.get(scope) else {
                return (Vec::new(), false);
            };
            topics
                .iter()
                .filter(|(topic, route)| {
                    !route.subscribers.is_empty()
                        && !topic.starts_with('@')
                        && topic.starts_with(prefix)
                        && &***topic > after
                })
                .map(|(topic, route)| {
                    let n = u32::try_from(route.subscribers.len()).unwrap_or(u32::MAX);
                    (topic.to_string(), n)
                })
                .collect()
        };
        found.sort_unstable();
        let mut used = 0;
        let fits = found
            .iter()
            .take(limit)
            .take_while(|(topic, _)| {
                used += topic.len() + 8;
                used <= bytes
            })
            .count()
            .max(1);
        let more = found.len() > fits;
        found.truncate(fits);
        (found, more)
    }

    pub(crate) fn get(&self, account: &str, topic: &str) -> Option<Arc<Route>> {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        routes.get(account)?.get(topic).cloned()
    }

    /// Replaces (or with `None` removes) the route of `key` and marks the old one stale.
    /// Returns whether a route was created for a topic that had none; call
    /// [`RouteTable::publish`] after a batch that created any.
    pub(crate) fn set(&self, key: &TopicKey, route: Option<Route>) -> bool {
        let mut routes = self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = match route {
            Some(route) => {
                let account = routes.entry(key.account.clone()).or_default();
                let old = account.insert(key.topic.clone(), Arc::new(route));
                if old.is_none() {
                    return true;
                }
                old
            }
            None => {
                let account = routes.get_mut(&key.account);
                let old = account.and_then(|a| a.remove(&key.topic));
                if routes.get(&key.account).is_some_and(HashMap::is_empty) {
                    routes.remove(&key.account);
                }
                old
            }
        };
        // Under the write lock: a cache that sees the flag and looks again finds the new route.
        if let Some(old) = old {
            old.stale.store(true, Ordering::Release);
        }
        false
    }

    /// Makes routes created by [`RouteTable::set`] visible to caches that remember their
    /// topics as having none.
    pub(crate) fn publish(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A cached lookup.
#[derive(Debug)]
enum Cached {
    Route(Arc<Route>),
    /// No route, as of this table generation.
    Absent(u64),
}

impl Cached {
    fn route(&self) -> Option<&Arc<Route>> {
        match self {
            Self::Route(route) => Some(route),
            Self::Absent(_) => None,
        }
    }

    /// Whether this is still the topic's route in `table`.
    fn current(&self, table: &RouteTable) -> bool {
        match self {
            Self::Route(route) => !route.stale.load(Ordering::Acquire),
            Self::Absent(generation) => *generation == table.generation(),
        }
    }
}

/// What a cache knows of a topic: its route, and its history if it keeps one.
#[derive(Debug)]
struct CacheEntry {
    cached: Cached,
    history: Option<Option<Arc<TopicHistory>>>,
}

/// A task-local cache of routes for one account.
#[derive(Debug, Default)]
struct RouteCache {
    routes: HashMap<Box<str>, CacheEntry>,
}

impl RouteCache {
    /// Calls `f` with the entry of `topic`, its route current. Before a topic's first lookup,
    /// `check` runs (topic validation), so a topic found in the cache is known to be valid.
    fn with_route<R, E>(
        &mut self,
        table: &RouteTable,
        account: &str,
        topic: &str,
        check: impl FnOnce() -> Result<(), E>,
        f: impl FnOnce(&mut CacheEntry) -> R,
    ) -> Result<R, E> {
        let known = match self.routes.get_mut(topic) {
            Some(entry) if entry.cached.current(table) => return Ok(f(entry)),
            Some(_) => true,
            None => false,
        };
        if !known {
            check()?;
            if self.routes.len() >= CACHE_CAPACITY {
                self.routes.clear();
            }
        }
        // The generation is read before the lookup, so a route created in between is either
        // found now or makes this entry out of date.
        let generation = table.generation();
        let cached = match table.get(account, topic) {
            Some(route) => Cached::Route(route),
            None => Cached::Absent(generation),
        };
        let entry = match self.routes.entry(topic.into()) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let entry = e.into_mut();
                entry.cached = cached;
                entry
            }
            std::collections::hash_map::Entry::Vacant(e) => e.insert(CacheEntry {
                cached,
                history: None,
            }),
        };
        Ok(f(entry))
    }
}

/// Where a published message comes from, which decides where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A client of this server (or the dispatch bridge): local subscribers, and once to every
    /// peer server with interest.
    Local,
    /// A peer server's forward: local subscribers only, never forwarded again.
    Peer,
}

/// One message to route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub(crate) origin: Origin,
    /// The routing scope (account, or account and group).
    pub(crate) scope: &'a str,
    pub(crate) topic: &'a str,
    /// Who published it, as stamped by its server.
    pub(crate) from: Sender<'a>,
    pub(crate) payload: &'a [u8],
}

/// Accounts a publisher keeps route caches for before starting over.
const MAX_CACHED_SCOPES: usize = 1024;

/// The one publish path: every message published on this server, by a client session, a peer
/// forward or the dispatch bridge, goes through [`Publisher::publish`]. Each reader keeps its
/// own publisher: route caches per scope, and the batch of deliveries of the burst it is
/// handling ([`Publisher::flush`] hands that on).
#[derive(Debug)]
pub(crate) struct Publisher {
    /// The scope most recently published in and its cache: a client session's only one.
    last: Option<(Box<str>, RouteCache)>,
    /// Caches of the other scopes (a peer link carries every account's forwards).
    others: HashMap<Box<str>, RouteCache>,
    batch: Batcher,
    slow_consumer_ms: u64,
    /// Where topics that keep history keep it.
    histories: Arc<Histories>,
    /// History topics whose shared batch this reader added to since it last flushed.
    touched: Vec<Arc<TopicHistory>>,
    /// The time history positions are stamped with, and how many more messages may take it:
    /// the clock is read for the first message on a history topic after a flush and then once
    /// every [`CLOCK_MESSAGES`], not for each message.
    now_ms: Option<(u64, u32)>,
}

/// Messages of one burst stamped with one reading of the clock.
const CLOCK_MESSAGES: u32 = 64;

impl Publisher {
    /// A publisher whose deliveries write to idle subscribers as `direct` allows and disconnect
    /// subscribers whose queue stays full for `slow_consumer_ms`.
    pub(crate) fn new(
        direct: DirectWrites,
        slow_consumer_ms: u64,
        histories: Arc<Histories>,
    ) -> Self {
        Self {
            last: None,
            others: HashMap::new(),
            batch: Batcher::new(direct),
            slow_consumer_ms,
            histories,
            touched: Vec::new(),
            now_ms: None,
        }
    }

    /// Routes `msg`: its local subscribers get it in this reader's batch, and a local message
    /// goes once to each peer server with interest. Before a topic is first looked up in a
    /// scope, `check` runs (topic rules, role rules); a topic found in the cache passed it.
    /// Local messages that pass are counted in `messages_in`. Returns whether the message
    /// went anywhere: to a local subscriber, or (a local message) to a peer.
    ///
    /// On a topic that keeps history, a local message is numbered in this server's stream and
    /// a forward that carries a position is copied, both under the topic's lock and only once
    /// the route it goes by is checked to be current under that lock: a session added to the
    /// route before a history read gets each message either from that read or live. Its local
    /// deliveries go into the topic's shared batch (not this reader's), so that every
    /// subscriber here gets a stream's messages in offset order even when several readers
    /// publish on the topic at once; whichever reader flushes first hands them on.
    pub(crate) fn publish<E>(
        &mut self,
        routes: &RouteTable,
        stats: &Stats,
        msg: Message<'_>,
        check: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        let Self {
            batch,
            slow_consumer_ms,
            histories,
            touched,
            now_ms,
            ..
        } = self;
        let slow_ms = *slow_consumer_ms;
        let cache = Self::cache(&mut self.last, &mut self.others, msg.scope);
        let mut check = Some(check);
        let mut counted = msg.origin != Origin::Local;
        loop {
            let routed = cache.with_route(
                routes,
                msg.scope,
                msg.topic,
                || check.take().map_or(Ok(()), |check| check()),
                |entry| {
                    if !counted {
                        counted = true;
                        stats.messages_in.inc();
                    }
                    let history: &Option<_> = match msg.origin {
                        Origin::Local => entry
                            .history
                            .get_or_insert_with(|| histories.for_local(msg.scope, msg.topic)),
                        Origin::Peer if msg.from.position.stream != 0 => entry
                            .history
                            .get_or_insert_with(|| histories.for_copy(msg.scope, msg.topic)),
                        Origin::Peer => &None,
                    };
                    let Some(history) = history else {
                        // What this reader put in shared batches came first.
                        flush_shared(touched, stats, slow_ms);
                        return Some(route(
                            batch,
                            entry.cached.route(),
                            &msg,
                            None,
                            stats,
                            slow_ms,
                        ));
                    };
                    // What this reader put in other topics' shared batches came first (handed
                    // on before this topic's lock is taken: two locks are never held at once).
                    if touched.iter().any(|t| !Arc::ptr_eq(t, history)) {
                        flush_shared(touched, stats, slow_ms);
                    }
                    let mut streams = history.lock();
                    if !entry.cached.current(routes) {
                        return None;
                    }
                    // This reader's own batch came first.
                    batch.flush(stats, slow_ms);
                    let mut msg = msg;
                    let now = match now_ms {
                        Some((now, uses @ 1..)) => {
                            *uses -= 1;
                            *now
                        }
                        _ => {
                            let now = relaymesh_net::link::now_ms();
                            *now_ms = Some((now, CLOCK_MESSAGES - 1));
                            now
                        }
                    };
                    if msg.origin == Origin::Local {
                        msg.from.position = history.next_position(&mut streams, now);
                    }
                    // Encoded once: the stored frame is also what the subscribers here get.
                    let frame = streams.encode(msg.topic, msg.from, msg.payload);
                    let shared = &mut streams.batch;
                    let reached = route(
                        shared,
                        entry.cached.route(),
                        &msg,
                        Some(&frame),
                        stats,
                        slow_ms,
                    );
                    histories.record(
                        &mut streams,
                        msg.origin == Origin::Local,
                        msg.from.position,
                        frame,
                        now,
                    );
                    drop(streams);
                    if !touched.iter().any(|t| Arc::ptr_eq(t, history)) {
                        touched.push(history.clone());
                    }
                    Some(reached)
                },
            )?;
            // Otherwise the route changed while the topic's lock was awaited: look again.
            if let Some(reached) = routed {
                return Ok(reached);
            }
        }
    }

    /// Hands the deliveries batched so far to their subscribers: after a burst, and before
    /// anything that must not overtake them.
    pub(crate) fn flush(&mut self, stats: &Stats) {
        self.now_ms = None;
        self.batch.flush(stats, self.slow_consumer_ms);
        flush_shared(&mut self.touched, stats, self.slow_consumer_ms);
    }

    /// The cache of `scope`, made current.
    fn cache<'c>(
        last: &'c mut Option<(Box<str>, RouteCache)>,
        others: &mut HashMap<Box<str>, RouteCache>,
        scope: &str,
    ) -> &'c mut RouteCache {
        if last.as_ref().is_some_and(|(s, _)| &**s == scope) {
            return &mut last.get_or_insert_with(Default::default).1;
        }
        if let Some((previous, cache)) = last.take() {
            if others.len() >= MAX_CACHED_SCOPES {
                others.clear();
            }
            others.insert(previous, cache);
        }
        let cache = others.remove(scope).unwrap_or_default();
        &mut last.insert((scope.into(), cache)).1
    }
}

/// Hands on the shared batches of the history topics in `touched` (what any reader put there).
fn flush_shared(touched: &mut Vec<Arc<TopicHistory>>, stats: &Stats, slow_ms: u64) {
    for history in touched.drain(..) {
        history.lock().batch.flush(stats, slow_ms);
    }
}

/// Hands `msg` to `route`'s local subscribers (in `batch`) and, a local message, once to each
/// interested peer. `encoded`, when given, is `msg` already encoded as a `ServerToClient`
/// frame, copied as it is. Returns whether it went anywhere.
fn route(
    batch: &mut Batcher,
    route: Option<&Arc<Route>>,
    msg: &Message<'_>,
    encoded: Option<&[u8]>,
    stats: &Stats,
    slow_ms: u64,
) -> bool {
    let Some(route) = route else { return false };
    let mut reached = false;
    if !route.subscribers.is_empty() {
        match encoded {
            Some(frame) => batch.push_encoded(route, frame, stats, slow_ms),
            None => batch.push(route, msg.topic, msg.from, msg.payload, stats, slow_ms),
        }
        reached = true;
    }
    if msg.origin == Origin::Local && !route.peers.is_empty() {
        let frame = forward_frame(msg.scope, msg.topic, msg.from, msg.payload);
        forward(route, &frame, (msg.scope, msg.topic), stats);
        reached = true;
    }
    reached
}

/// Most messages in one batch.
const BATCH_MESSAGES: usize = 512;
/// Bytes a batch stays within (unless it is one message).
const BATCH_BYTES: usize = 64 * 1024;
/// The longest WebSocket frame header a server writes (RFC 6455 section 5.2).
const MAX_FRAME_HEADER: usize = 10;

/// How much of one batch's fan-out the reader writes to idle subscribers' sockets itself
/// ([`Direct`]) instead of queueing it for their writer tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum DirectWrites {
    /// Always queue.
    #[default]
    Off,
    /// Write directly to every idle subscriber.
    Unlimited,
    /// Write directly until this much time has gone, then queue the rest, so that other worker
    /// threads can take those writes.
    For(Duration),
}

impl DirectWrites {
    /// Default budget when the runtime has several worker threads.
    const SHARED: Duration = Duration::from_micros(250);
    /// Subscribers served between two looks at the clock.
    const CLOCK_EVERY: usize = 16;

    /// The policy for `direct_write_budget_us` on a runtime with `workers` worker threads.
    pub(crate) fn of(budget_us: Option<u64>, workers: usize) -> Self {
        match budget_us {
            Some(0) => Self::Off,
            Some(us) => Self::For(Duration::from_micros(us)),
            None if workers <= 1 => Self::Unlimited,
            None => Self::For(Self::SHARED),
        }
    }
}

/// Messages for one route's local subscribers, encoded once as WebSocket frames and handed to
/// every subscriber as one buffer. A reader pushes what it handles and flushes when its socket
/// has nothing more ready; a message for another route flushes first, so each publisher's
/// messages keep their order even across topics.
#[derive(Debug, Default)]
pub(crate) struct Batcher {
    pending: Option<(Arc<Route>, BytesMut, usize)>,
    direct: DirectWrites,
}

impl Batcher {
    /// A batcher that writes to idle subscribers as `direct` allows.
    pub(crate) fn new(direct: DirectWrites) -> Self {
        Self {
            pending: None,
            direct,
        }
    }

    /// Adds a message for `route`'s local subscribers.
    fn push(
        &mut self,
        route: &Arc<Route>,
        topic: &str,
        from: Sender<'_>,
        payload: &[u8],
        stats: &Stats,
        slow_consumer_ms: u64,
    ) {
        let len = message_frame_len(topic, from, payload);
        let frames = self.frames(route, len, stats, slow_consumer_ms);
        wire::put_frame_header(frames, len);
        put_message_frame(frames, topic, from, payload);
        self.pushed(stats, slow_consumer_ms);
    }

    /// Adds a message for `route`'s local subscribers already encoded as a `ServerToClient`
    /// frame.
    fn push_encoded(
        &mut self,
        route: &Arc<Route>,
        frame: &[u8],
        stats: &Stats,
        slow_consumer_ms: u64,
    ) {
        let frames = self.frames(route, frame.len(), stats, slow_consumer_ms);
        wire::put_frame_header(frames, frame.len());
        frames.extend_from_slice(frame);
        self.pushed(stats, slow_consumer_ms);
    }

    /// The buffer a message frame of `len` bytes for `route`'s local subscribers is appended to
    /// (as one whole WebSocket frame), [`Batcher::pushed`] to be called after. What is pending
    /// is handed on first when it is for another route, or when this message would take it
    /// over [`BATCH_BYTES`]: a batch is never larger than that unless it is one message.
    fn frames(
        &mut self,
        route: &Arc<Route>,
        len: usize,
        stats: &Stats,
        slow_consumer_ms: u64,
    ) -> &mut BytesMut {
        if self.pending.as_ref().is_some_and(|(r, frames, _)| {
            !Arc::ptr_eq(r, route) || frames.len() + len + MAX_FRAME_HEADER > BATCH_BYTES
        }) {
            self.flush(stats, slow_consumer_ms);
        }
        &mut self
            .pending
            .get_or_insert_with(|| (route.clone(), BytesMut::new(), 0))
            .1
    }

    /// Counts the message just appended, and hands the batch on when it is full.
    fn pushed(&mut self, stats: &Stats, slow_consumer_ms: u64) {
        if let Some((_, _, count)) = &mut self.pending {
            *count += 1;
            if *count >= BATCH_MESSAGES {
                self.flush(stats, slow_consumer_ms);
            }
        }
    }

    /// Hands what is pending to the subscribers.
    pub(crate) fn flush(&mut self, stats: &Stats, slow_consumer_ms: u64) {
        if let Some((route, frames, count)) = self.pending.take() {
            stats.dist.fanout_batch_messages.observe(count as f64);
            let frames = frames.freeze();
            stats.messages_out.add(deliver(
                &route,
                &frames,
                count,
                stats,
                slow_consumer_ms,
                self.direct,
            ));
        }
    }
}

/// Hands `frames` (`count` whole WebSocket frames) to every local subscriber of `route`:
/// written to its socket now if it is idle and `direct` allows, queued otherwise. Returns how
/// many messages were accepted.
fn deliver(
    route: &Route,
    frames: &Bytes,
    count: usize,
    stats: &Stats,
    slow_consumer_ms: u64,
    direct: DirectWrites,
) -> u64 {
    let deadline = match direct {
        DirectWrites::For(budget) => Some(Instant::now() + budget),
        _ => None,
    };
    let mut write_now = direct != DirectWrites::Off;
    let mut accepted = 0;
    // Built for the first subscriber that takes batches, then shared like `frames`.
    let mut batch: Option<Option<Bytes>> = None;
    for (i, s) in route.subscribers.iter().enumerate() {
        if write_now
            && i % DirectWrites::CLOCK_EVERY == DirectWrites::CLOCK_EVERY - 1
            && deadline.is_some_and(|d| Instant::now() >= d)
        {
            write_now = false;
        }
        let batch = match s.batches && count > 1 {
            true => batch.get_or_insert_with(|| batched(frames)).as_ref(),
            false => None,
        };
        let item = match batch {
            Some(batch) => Item {
                frames: batch,
                frames_n: 1,
                messages: count,
            },
            None => Item::frames(frames, count),
        };
        if offer(s, item, stats, slow_consumer_ms, write_now) {
            accepted += count as u64;
        }
    }
    accepted
}

/// What is handed to a subscriber: `frames_n` whole WebSocket frames holding `messages`
/// messages (more than `frames_n` when they are a batch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item<'a> {
    pub(crate) frames: &'a Bytes,
    pub(crate) frames_n: usize,
    pub(crate) messages: usize,
}

impl<'a> Item<'a> {
    /// `n` whole frames, a message each.
    pub(crate) fn frames(frames: &'a Bytes, n: usize) -> Self {
        Self {
            frames,
            frames_n: n,
            messages: n,
        }
    }
}

/// `frames` (whole WebSocket frames, each a message frame) as one WebSocket frame holding
/// `ServerToClient { batch }`, for subscribers that take batches: the message frames are copied
/// behind a head as they are. `None` if one of them is not a message.
fn batched(frames: &[u8]) -> Option<Bytes> {
    let mut len = 0;
    for payload in wire::payloads(frames) {
        if !frame::is_message_frame(payload) {
            return None;
        }
        len += payload.len();
    }
    let head = frame::batch_head_len(len);
    let mut out = BytesMut::with_capacity(10 + head + len);
    wire::put_frame_header(&mut out, head + len);
    frame::put_batch_head(&mut out, len);
    for payload in wire::payloads(frames) {
        out.extend_from_slice(payload);
    }
    Some(out.freeze())
}

/// What became of a frame offered to a receiver's queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    Yes,
    /// The queue is full, in frames or in bytes.
    Full,
    /// The receiver is gone.
    Closed,
}

/// Queues `frame` on `data` within `backlog`'s budget, without waiting.
fn enqueue(data: &DataTx, backlog: &Backlog, frame: &Bytes) -> Enqueued {
    enqueue_n(data, backlog, frame, 1)
}

/// Queues an item holding `count` frames on `data` within `backlog`'s budget.
fn enqueue_n(data: &DataTx, backlog: &Backlog, frames: &Bytes, count: usize) -> Enqueued {
    if !backlog.reserve_n(frames.len(), count) {
        return Enqueued::Full;
    }
    match data.send(frames.clone()) {
        Ok(()) => Enqueued::Yes,
        Err(_) => {
            backlog.release_n(frames.len(), count);
            Enqueued::Closed
        }
    }
}

/// Writes `frames` (`count` messages) to one subscriber's socket (`write_now` and the subscriber
/// idle) or queues them, or drops them (counted, reported, and possibly the end of a slow
/// consumer) when the subscriber's queue is full.
pub(crate) fn offer(
    subscriber: &Subscriber,
    item: Item<'_>,
    stats: &Stats,
    slow_consumer_ms: u64,
    write_now: bool,
) -> bool {
    let count = item.messages;
    match subscriber.send(item.frames, item.frames_n, write_now) {
        Enqueued::Yes => return true,
        Enqueued::Closed => return false,
        Enqueued::Full => {}
    }
    stats.dropped.add(count as u64);
    stats
        .dist
        .queue_depth_at_drop
        .observe(subscriber.backlog.queued_frames() as f64);
    if subscriber
        .backlog
        .record_drops(count as u64, slow_consumer_ms)
    {
        let words = LastWords::error::<v1::ServerToClient>(v1::Error::new(
            ErrorCode::SlowConsumer,
            format!("your queue stayed full for over {slow_consumer_ms} ms; messages were dropped"),
        ));
        if subscriber.closer.close(Some(words)) {
            stats.slow_consumers.inc();
            tracing::info!(session = subscriber.id, "disconnecting slow consumer");
        }
    }
    false
}

/// Queues `frame` (a `Forward`) for every interested peer of `route`.
fn forward(route: &Route, frame: &Bytes, topic: (&str, &str), stats: &Stats) {
    for peer in route.peers.iter() {
        forward_to(peer, frame, topic, stats);
    }
}

/// Queues `frame` for one peer.
pub(crate) fn forward_to(
    peer: &PeerOut,
    frame: &Bytes,
    (scope, topic): (&str, &str),
    stats: &Stats,
) {
    match enqueue(&peer.data, &peer.backlog, frame) {
        Enqueued::Yes => {
            peer.forwards_out.inc();
            stats.forwards_out.inc();
        }
        // A full queue whose writer has just ended is an ended link.
        Enqueued::Full if !peer.data.is_closed() => {
            // Reported to the peer as ForwardDropped, which tells its subscribers.
            peer.backlog.record_drop(u64::MAX);
            peer.missed.inc();
            peer.note_missed(scope, topic);
            stats.forward_dropped.inc();
        }
        // The link has ended, its interest kept for a while: held for its next link (or
        // counted, and reported to the peer when it links again).
        Enqueued::Full | Enqueued::Closed => peer.routed_after_end(frame, (scope, topic), stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(
        id: SessionId,
        capacity: usize,
    ) -> (Arc<Subscriber>, relaymesh_net::link::DataRx) {
        let (data, rx) = relaymesh_net::link::data_queue();
        let s = Subscriber {
            id,
            alias: Arc::from("a"),
            scope: Arc::from("acme"),
            role: Arc::from(""),
            node: None,
            topics: std::sync::atomic::AtomicU32::new(0),
            ops_ready: tokio::sync::Notify::new(),
            data,
            backlog: Arc::new(Backlog::counted(capacity, 1 << 20)),
            direct: None,
            closer: Closer::new(),
            subscribed: AtomicBool::new(true),
            client: None,
            batches: false,
        };
        (Arc::new(s), rx)
    }

    fn route(subscribers: &[Arc<Subscriber>]) -> Arc<Route> {
        Arc::new(Route::new(subscribers.to_vec().into(), Box::new([])))
    }

    fn topics(item: &Bytes) -> Vec<String> {
        wire::frame_payloads(item)
            .map(|p| {
                let msg: v1::ServerToClient = relaymesh_proto::decode(p).expect("a frame");
                match msg.kind {
                    Some(v1::server_to_client::Kind::Message(m)) => {
                        String::from_utf8(m.payload.to_vec()).expect("utf-8")
                    }
                    other => panic!("not a message: {other:?}"),
                }
            })
            .collect()
    }

    const FROM: Sender<'static> = Sender {
        alias: "a",
        role: "",
        seq: 0,
        resent_from: "",
        node: "",
        signal: 0,
        position: relaymesh_proto::frame::Position {
            stream: 0,
            offset: 0,
            published_ms: 0,
        },
    };

    #[test]
    fn a_burst_reaches_each_subscriber_as_one_batch_in_order() {
        let stats = Stats::default();
        let (s1, mut rx1) = subscriber(1, 100);
        let (s2, mut rx2) = subscriber(2, 100);
        let both = route(&[s1.clone(), s2.clone()]);
        let only_two = route(std::slice::from_ref(&s2));
        let mut batch = Batcher::default();
        batch.push(&both, "t", FROM, b"1", &stats, 1000);
        batch.push(&both, "t", FROM, b"2", &stats, 1000);
        // Another route hands the first batch on, so the order across topics holds.
        batch.push(&only_two, "u", FROM, b"3", &stats, 1000);
        batch.push(&both, "t", FROM, b"4", &stats, 1000);
        batch.flush(&stats, 1000);
        let items = |rx: &mut relaymesh_net::link::DataRx| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|item| topics(&item))
                .collect::<Vec<_>>()
        };
        assert_eq!(items(&mut rx1), [vec!["1", "2"], vec!["4"]]);
        assert_eq!(items(&mut rx2), [vec!["1", "2"], vec!["3"], vec!["4"]]);
        assert_eq!(stats.messages_out.get(), 7);
    }

    #[test]
    fn a_subscriber_that_takes_batches_gets_a_burst_as_one_frame() {
        let stats = Stats::default();
        let (plain, mut plain_rx) = subscriber(1, 100);
        let (batching, mut batching_rx) = subscriber(2, 100);
        let batching = Arc::new(Subscriber {
            batches: true,
            ..Arc::into_inner(batching).expect("the only reference")
        });
        let r = route(&[plain, batching.clone()]);
        let mut batch = Batcher::default();
        for payload in [b"1", b"2", b"3"] {
            batch.push(&r, "t", FROM, payload, &stats, 1000);
        }
        batch.flush(&stats, 1000);
        // A lone message goes as it is.
        batch.push(&r, "t", FROM, b"4", &stats, 1000);
        batch.flush(&stats, 1000);
        let plain_items: Vec<_> = std::iter::from_fn(|| plain_rx.try_recv().ok())
            .map(|item| topics(&item))
            .collect();
        assert_eq!(plain_items, [vec!["1", "2", "3"], vec!["4"]]);
        let batched = batching_rx.try_recv().expect("the burst");
        let payloads: Vec<_> = relaymesh_net::wire::frame_payloads(&batched).collect();
        assert_eq!(payloads.len(), 1, "one WebSocket frame");
        let msg: v1::ServerToClient =
            relaymesh_proto::decode(payloads[0].clone()).expect("a frame");
        let Some(v1::server_to_client::Kind::Batch(b)) = msg.kind else {
            panic!("not a batch: {msg:?}");
        };
        let got: Vec<_> = b.messages.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(got, [b"1", b"2", b"3"]);
        assert_eq!(
            topics(&batching_rx.try_recv().expect("the lone one")),
            ["4"]
        );
        // Its queue holds frames: the batch is one of them; messages are counted as sent.
        assert_eq!(batching.backlog.queued_frames(), 2);
        assert_eq!(stats.messages_out.get(), 8);
    }

    #[test]
    fn a_batch_is_handed_on_before_a_message_would_take_it_over_its_size() {
        let stats = Stats::default();
        let (s, mut rx) = subscriber(1, 100);
        let r = route(std::slice::from_ref(&s));
        let mut batch = Batcher::default();
        let big = vec![b'x'; 30 * 1024];
        for _ in 0..3 {
            batch.push(&r, "t", FROM, &big, &stats, 1000);
        }
        // One alone may be larger than a batch: it goes as it is.
        let huge = vec![b'y'; 100 * 1024];
        batch.push(&r, "t", FROM, &huge, &stats, 1000);
        batch.flush(&stats, 1000);
        let sizes: Vec<(usize, usize)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|item| {
                (
                    relaymesh_net::wire::frame_payloads(&item).count(),
                    item.len(),
                )
            })
            .collect();
        assert_eq!(sizes.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [2, 1, 1]);
        assert!(
            sizes[..2].iter().all(|(_, len)| *len <= BATCH_BYTES),
            "{sizes:?}"
        );
    }

    #[test]
    fn direct_writes_are_unlimited_only_on_one_worker_unless_configured() {
        assert_eq!(DirectWrites::of(None, 1), DirectWrites::Unlimited);
        assert_eq!(
            DirectWrites::of(None, 4),
            DirectWrites::For(DirectWrites::SHARED)
        );
        assert_eq!(DirectWrites::of(Some(0), 1), DirectWrites::Off);
        assert_eq!(
            DirectWrites::of(Some(80), 1),
            DirectWrites::For(Duration::from_micros(80))
        );
    }

    #[test]
    fn a_batch_that_does_not_fit_is_dropped_and_counted_per_message() {
        let stats = Stats::default();
        let (small, mut rx) = subscriber(1, 3);
        let r = route(std::slice::from_ref(&small));
        let mut batch = Batcher::default();
        for _ in 0..2 {
            batch.push(&r, "t", FROM, b"x", &stats, u64::MAX);
        }
        batch.flush(&stats, u64::MAX);
        for _ in 0..2 {
            batch.push(&r, "t", FROM, b"y", &stats, u64::MAX);
        }
        batch.flush(&stats, u64::MAX);
        assert_eq!(stats.dropped.get(), 2, "the second batch would make 4 of 3");
        assert_eq!(small.backlog.total(), 2);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    fn peer() -> (Arc<PeerOut>, relaymesh_net::link::DataRx) {
        let (data, rx) = relaymesh_net::link::data_queue();
        let p = PeerOut::new(data, Arc::new(Backlog::counted(16, 1 << 20)), None);
        (Arc::new(p), rx)
    }

    #[test]
    fn forwards_to_a_down_peer_are_counted_per_topic() {
        let stats = Stats::default();
        let (p, rx) = peer();
        drop(rx); // the link's writer is gone: the queue is closed
        let a = Route::new(Chunked::default(), Box::new([p.clone()]));
        let b = Route::new(Chunked::default(), Box::new([p.clone()]));
        let frame = Bytes::from_static(b"f");
        for _ in 0..3 {
            forward(&a, &frame, ("acme", "a"), &stats);
        }
        forward(&b, &frame, ("acme", "b"), &stats);
        assert_eq!((p.offered(), p.forwards_out.get()), (4, 0));
        // Counted as dropped only if the peer, linking again, turns out not to have them.
        assert_eq!(stats.forward_dropped.get(), 0);
        let mut missed: Vec<_> = p
            .take_missed_topics()
            .into_iter()
            .map(|m| (m.topic.to_string(), m.count))
            .collect();
        missed.sort();
        assert_eq!(missed, vec![("a".into(), 3), ("b".into(), 1)]);
        assert!(p.take_missed_topics().is_empty(), "taken once");
    }

    #[test]
    fn a_resumed_link_gets_what_followed_the_peers_count_then_what_old_routes_carry() {
        let stats = Stats::default();
        let limits = ReplayLimits {
            bytes: 1 << 20,
            age: Duration::from_secs(60),
        };
        let (data, rx) = relaymesh_net::link::data_queue();
        let old = Arc::new(PeerOut::new(
            data,
            Arc::new(Backlog::counted(16, 1 << 20)),
            Some(limits),
        ));
        drop(rx);
        let f = |s: &'static str| Bytes::from_static(s.as_bytes());
        // Written on the link (positions 1 to 3), then one still queued when it ended...
        let mut written = Replay::new(limits);
        for frame in ["1", "2", "3"] {
            written.written(f(frame), relaymesh_net::link::now_ms(), drop);
        }
        old.ended(Some(written), vec![f("4")]);
        // ...and one routed to it while it was down.
        let route = Route::new(Chunked::default(), Box::new([old.clone()]));
        forward(&route, &f("5"), ("acme", "t"), &stats);
        // The peer got 2 on it: 3, 4 and 5 go on the new link, before what the old routes
        // still carry.
        let (next, mut next_rx) = peer();
        let resumed = old.resume(&next, 2, &stats);
        assert_eq!((resumed.replayed, resumed.stale), (3, 0));
        forward(&route, &f("6"), ("acme", "t"), &stats);
        let got: Vec<Bytes> = std::iter::from_fn(|| next_rx.try_recv().ok()).collect();
        assert_eq!(got, vec![f("3"), f("4"), f("5"), f("6")]);
        assert_eq!(stats.forwards_replayed.get(), 3);
    }

    #[test]
    fn local_messages_go_to_subscribers_and_peers_and_forwards_to_subscribers_only() {
        let stats = Stats::default();
        let table = RouteTable::default();
        let (s, mut rx) = subscriber(1, 100);
        let (p, mut peer_rx) = peer();
        for scope in ["acme", "globex"] {
            let route = Route::new(vec![s.clone()].into(), Box::new([p.clone()]));
            table.set(&TopicKey::new(scope, "t"), Some(route));
        }
        table.publish();
        let mut publisher = Publisher::new(
            DirectWrites::Off,
            1000,
            Arc::new(Histories::new(Default::default(), DirectWrites::Off)),
        );
        let msg = |origin, scope, payload| Message {
            origin,
            scope,
            topic: "t",
            from: FROM,
            payload,
        };
        let ok = || Ok::<_, ()>(());
        publisher
            .publish(&table, &stats, msg(Origin::Local, "acme", b"1"), ok)
            .unwrap();
        publisher
            .publish(&table, &stats, msg(Origin::Peer, "acme", b"2"), ok)
            .unwrap();
        // Another scope has its own cache; coming back finds the first one again.
        publisher
            .publish(&table, &stats, msg(Origin::Peer, "globex", b"3"), ok)
            .unwrap();
        publisher
            .publish(&table, &stats, msg(Origin::Local, "acme", b"4"), ok)
            .unwrap();
        publisher.flush(&stats);
        let delivered: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|item| topics(&item))
            .collect();
        assert_eq!(delivered, ["1", "2", "3", "4"]);
        assert_eq!(
            std::iter::from_fn(|| peer_rx.try_recv().ok()).count(),
            2,
            "local ones only"
        );
        assert_eq!((stats.messages_in.get(), stats.forwards_out.get()), (2, 2));
        // A topic's check runs before its first lookup in a scope, and a refusal routes nothing.
        let refused =
            publisher.publish(&table, &stats, msg(Origin::Local, "initech", b"5"), || {
                Err("no")
            });
        assert_eq!(refused, Err("no"));
        assert_eq!(stats.messages_in.get(), 2);
    }
}
