//! The data plane: who receives a message published on a topic, read on every publish.
//!
//! The control task ([`crate::control`]) owns the subscription state and, after every change,
//! publishes an immutable [`Route`] per affected topic into the [`RouteTable`] and bumps the
//! table's generation. Publishing sessions and peer readers keep a private [`RouteCache`]: while
//! the generation is unchanged a publish finds its route with one hash lookup in task-local
//! memory and takes no lock at all; after a change the first publish per topic refreshes from
//! the table under a short read lock. Fan-out then `try_send`s one shared, pre-encoded frame to
//! each receiver's bounded queue: full queues drop and count (the slow-consumer policy), closed
//! ones are skipped until the control task removes them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use relaymesh_net::link::{Closer, DropTracker};
use relaymesh_net::metrics::Counter;
use relaymesh_proto::v1;
use relaymesh_proto::{ErrorCode, error_frame};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::api::Stats;
use crate::interest::{SessionId, TopicKey};

/// Topics a [`RouteCache`] remembers before it starts over.
const CACHE_CAPACITY: usize = 1024;

/// A local client session, as a receiver of messages.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) id: SessionId,
    /// The session's data queue; its writer task holds the receiver. Full means the client is
    /// not keeping up; closed means the session ended.
    pub(crate) data: mpsc::Sender<Bytes>,
    pub(crate) drops: Arc<DropTracker>,
    pub(crate) closer: Closer,
    /// Whether the session has any subscription (for cluster-wide drop notices).
    pub(crate) subscribed: AtomicBool,
}

/// A peer server, as a receiver of forwards.
#[derive(Debug)]
pub(crate) struct PeerOut {
    /// The peer link's data queue; its writer task holds the receiver.
    pub(crate) data: mpsc::Sender<Bytes>,
    pub(crate) drops: Arc<DropTracker>,
    pub(crate) forwards_out: Counter,
}

/// Everyone who receives a topic on this server.
#[derive(Debug, Default)]
pub(crate) struct Route {
    pub(crate) subscribers: Box<[Arc<Subscriber>]>,
    pub(crate) peers: Box<[Arc<PeerOut>]>,
}

type AccountRoutes = HashMap<Arc<str>, Arc<Route>>;

/// Current routes by account and topic, written only by the control task.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: RwLock<HashMap<Arc<str>, AccountRoutes>>,
    generation: AtomicU64,
}

impl RouteTable {
    pub(crate) fn get(&self, account: &str, topic: &str) -> Option<Arc<Route>> {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        routes.get(account)?.get(topic).cloned()
    }

    /// Replaces (or with `None` removes) the route of `key`. Call [`RouteTable::publish`]
    /// after a batch of changes.
    pub(crate) fn set(&self, key: &TopicKey, route: Option<Route>) {
        let mut routes = self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match route {
            Some(route) => {
                routes
                    .entry(key.account.clone())
                    .or_default()
                    .insert(key.topic.clone(), Arc::new(route));
            }
            None => {
                if let Some(account) = routes.get_mut(&key.account) {
                    account.remove(&key.topic);
                    if account.is_empty() {
                        routes.remove(&key.account);
                    }
                }
            }
        }
    }

    /// Makes changes made with [`RouteTable::set`] visible to every cache.
    pub(crate) fn publish(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A task-local cache of routes for one account.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    generation: u64,
    routes: HashMap<Box<str>, Option<Arc<Route>>>,
}

impl RouteCache {
    /// Calls `f` with the route of `topic`. On a cache miss, `check` runs first (topic
    /// validation), so a topic found in the cache is known to be valid.
    pub(crate) fn with_route<R, E>(
        &mut self,
        table: &RouteTable,
        account: &str,
        topic: &str,
        check: impl FnOnce() -> Result<(), E>,
        f: impl FnOnce(Option<&Route>) -> R,
    ) -> Result<R, E> {
        let generation = table.generation();
        if generation != self.generation {
            self.routes.clear();
            self.generation = generation;
        }
        if let Some(route) = self.routes.get(topic) {
            return Ok(f(route.as_deref()));
        }
        check()?;
        let route = table.get(account, topic);
        let result = f(route.as_deref());
        if self.routes.len() >= CACHE_CAPACITY {
            self.routes.clear();
        }
        self.routes.insert(topic.into(), route);
        Ok(result)
    }
}

/// Queues `frame` for every local subscriber of `route`. Returns how many accepted it.
pub(crate) fn deliver(route: &Route, frame: &Bytes, stats: &Stats, slow_consumer_ms: u64) -> u64 {
    let mut delivered = 0;
    for subscriber in route.subscribers.iter() {
        match subscriber.data.try_send(frame.clone()) {
            Ok(()) => delivered += 1,
            Err(TrySendError::Full(_)) => {
                stats.dropped.inc();
                if subscriber.drops.record_drop(slow_consumer_ms) {
                    let words = error_frame::<v1::ServerToClient>(v1::Error::new(
                        ErrorCode::SlowConsumer,
                        format!(
                            "your queue stayed full for over {slow_consumer_ms} ms; messages were dropped"
                        ),
                    ));
                    if subscriber.closer.close(Some(words)) {
                        stats.slow_consumers.inc();
                        tracing::info!(session = subscriber.id, "disconnecting slow consumer");
                    }
                }
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }
    delivered
}

/// Queues `frame` (a `Forward`) for every interested peer of `route`.
pub(crate) fn forward(route: &Route, frame: &Bytes, stats: &Stats) {
    for peer in route.peers.iter() {
        match peer.data.try_send(frame.clone()) {
            Ok(()) => {
                peer.forwards_out.inc();
                stats.forwards_out.inc();
            }
            Err(TrySendError::Full(_)) => {
                // Reported to the peer as ForwardDropped, which tells its subscribers.
                peer.drops.record_drop(u64::MAX);
                stats.forward_dropped.inc();
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }
}
