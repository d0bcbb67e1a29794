//! Subscription and interest bookkeeping: the control plane of a comm server, as a plain
//! struct with no I/O.
//!
//! It knows which local sessions subscribe to which topics, which peer servers are linked and
//! what each peer is interested in (the topics with subscribers over there). Every event returns
//! [`Effects`]: the topics whose delivery route changed, the interest messages to send to peers,
//! and the subscribe/unsubscribe requests that are now complete.
//!
//! Interest changes sent to a peer are numbered; the peer answers `InterestAck{seq}` once it has
//! applied them. A subscribe request completes only when every linked peer has acknowledged
//! everything sent to it so far, which is what lets the comm server promise that a message
//! published anywhere in the cluster after the client's `Ack` reaches the client. A peer whose
//! link goes down while a request waits for it is still waited for: the request completes once
//! the peer links again and acknowledges the full set the new link starts with, once the peer
//! expires, or once the coordinators no longer list the peer (it died or left). A peer whose
//! link is already down when a request is made is not linked, and not waited for (it hears the
//! change in that same full set). Until a request completes, [`Interest::pending`] names the
//! peers it waits for.
//!
//! `S` is whatever the driver uses to reach a session and `P` a peer link; the tests use numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::locals::{Chunked, Locals};
use crate::small_set::SmallSet;

/// A client session on this server.
pub(crate) type SessionId = u64;
/// One connection of a peer link; a reconnect gets a new id.
pub(crate) type LinkId = u64;
/// A subscribe or unsubscribe request waiting for peers to confirm.
pub(crate) type WaiterId = u64;

/// A topic within an account: the unit of routing. The same topic name in two accounts is two
/// topics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TopicKey {
    pub(crate) account: Arc<str>,
    pub(crate) topic: Arc<str>,
}

impl TopicKey {
    pub(crate) fn new(account: &str, topic: &str) -> Self {
        Self {
            account: account.into(),
            topic: topic.into(),
        }
    }
}

/// A control message for a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToPeer {
    /// Our interest: a full set (on link-up) or a delta.
    Interest {
        seq: u64,
        full: bool,
        add: Vec<TopicKey>,
        remove: Vec<TopicKey>,
    },
    /// We applied the peer's interest message `seq`.
    Ack { seq: u64 },
}

/// What the driver must do after an event, in this order: rebuild `routes`, send `to_peers`,
/// close `close`, complete `completed`.
#[derive(Debug)]
pub(crate) struct Effects<P> {
    pub(crate) routes: BTreeSet<TopicKey>,
    pub(crate) to_peers: Vec<(P, ToPeer)>,
    pub(crate) close: Vec<P>,
    pub(crate) completed: Vec<WaiterId>,
}

impl<P> Effects<P> {
    /// Appends `later`'s effects, keeping the order of messages.
    pub(crate) fn merge(&mut self, later: Self) {
        self.routes.extend(later.routes);
        self.to_peers.extend(later.to_peers);
        self.close.extend(later.close);
        self.completed.extend(later.completed);
    }
}

impl<P> Default for Effects<P> {
    fn default() -> Self {
        Self {
            routes: BTreeSet::new(),
            to_peers: Vec::new(),
            close: Vec::new(),
            completed: Vec::new(),
        }
    }
}

/// Folds a batch of messages into at most one `Interest` and one `Ack` per peer link, keeping
/// the order in which links first appear. Acknowledgements are cumulative (an ack for `seq`
/// covers every earlier one), and a later interest change to a topic supersedes an earlier one,
/// so the folded messages say the same with far fewer frames: a burst of a thousand
/// subscriptions becomes one delta per peer instead of a thousand, and cannot overflow a peer's
/// control queue. `link` identifies a peer link.
pub(crate) fn coalesce<P: Clone>(
    messages: Vec<(P, ToPeer)>,
    link: impl Fn(&P) -> usize,
) -> Vec<(P, ToPeer)> {
    #[derive(Default)]
    struct Folded {
        interest: Option<(u64, bool)>,
        ops: BTreeMap<TopicKey, bool>,
        ack: Option<u64>,
    }
    let mut order = Vec::new();
    let mut folded: HashMap<usize, Folded> = HashMap::new();
    for (peer, message) in messages {
        let key = link(&peer);
        let entry = folded.entry(key).or_insert_with(|| {
            order.push((key, peer.clone()));
            Folded::default()
        });
        match message {
            ToPeer::Interest {
                seq,
                full,
                add,
                remove,
            } => {
                let full = full || entry.interest.is_some_and(|(_, f)| f);
                if full && entry.interest.is_none_or(|(_, f)| !f) {
                    entry.ops.clear();
                }
                entry.ops.extend(remove.into_iter().map(|t| (t, false)));
                entry.ops.extend(add.into_iter().map(|t| (t, true)));
                entry.interest = Some((seq, full));
            }
            ToPeer::Ack { seq } => entry.ack = Some(entry.ack.map_or(seq, |a| a.max(seq))),
        }
    }
    let mut out = Vec::new();
    for (key, peer) in order {
        let Some(f) = folded.remove(&key) else {
            continue;
        };
        if let Some((seq, full)) = f.interest {
            let (add, remove): (Vec<_>, Vec<_>) = f.ops.into_iter().partition(|(_, added)| *added);
            let add = add.into_iter().map(|(t, _)| t).collect();
            // A full set replaces everything, so it has nothing to remove.
            let remove = if full {
                Vec::new()
            } else {
                remove.into_iter().map(|(t, _)| t).collect()
            };
            out.push((
                peer.clone(),
                ToPeer::Interest {
                    seq,
                    full,
                    add,
                    remove,
                },
            ));
        }
        if let Some(seq) = f.ack {
            out.push((peer, ToPeer::Ack { seq }));
        }
    }
    out
}

/// Who receives a topic here: local sessions and interested peers.
#[derive(Debug)]
struct TopicState<S, P> {
    local: Locals<S>,
    remote: BTreeMap<Arc<str>, P>,
}

impl<S, P> Default for TopicState<S, P> {
    fn default() -> Self {
        Self {
            local: Locals::default(),
            remote: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct PeerState<P> {
    link: LinkId,
    handle: P,
    interest: HashSet<TopicKey>,
    /// Last interest seq sent to the peer, and the last it acknowledged.
    sent: u64,
    acked: u64,
    /// The link is down and its interest kept until the peer links again or the link
    /// expires ([`Interest::peer_expire`]): forwards routed to it meanwhile are counted as
    /// missed for the peer, which is told of them when it comes back.
    down: bool,
}

#[derive(Debug)]
struct Waiter {
    id: WaiterId,
    /// (peer, link, seq) acknowledgements still missing, at most one per peer. A need on a link
    /// that went down stays; when the peer links again it becomes (new link, 1), the full set
    /// the new link starts with, and it goes only when the peer expires or the coordinators
    /// no longer list it ([`Interest::peer_left`]).
    needs: Vec<(Arc<str>, LinkId, u64)>,
}

/// The control-plane state of one comm server.
#[derive(Debug)]
pub(crate) struct Interest<S, P> {
    topics: HashMap<TopicKey, TopicState<S, P>>,
    /// A session's topics: most have a few ([`SmallSet`]).
    sessions: HashMap<SessionId, SmallSet<TopicKey>>,
    peers: BTreeMap<Arc<str>, PeerState<P>>,
    waiters: Vec<Waiter>,
    local_topics: usize,
}

impl<S, P> Default for Interest<S, P> {
    fn default() -> Self {
        Self {
            topics: HashMap::new(),
            sessions: HashMap::new(),
            peers: BTreeMap::new(),
            waiters: Vec::new(),
            local_topics: 0,
        }
    }
}

impl<S: Clone, P: Clone> Interest<S, P> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Session `id` subscribes to `topics`; `waiter` completes once peers have caught up.
    pub(crate) fn subscribe(
        &mut self,
        id: SessionId,
        handle: &S,
        topics: Vec<TopicKey>,
        waiter: WaiterId,
    ) -> Effects<P> {
        let mut fx = Effects::default();
        if topics.is_empty() {
            // Nothing new: the request only waits for what peers have not confirmed yet.
            self.wait(waiter, &mut fx);
            return fx;
        }
        let mut added = Vec::new();
        let mine = self.sessions.entry(id).or_default();
        for topic in topics {
            if !mine.insert(topic.clone()) {
                continue;
            }
            let state = self.topics.entry(topic.clone()).or_default();
            if state.local.is_empty() {
                added.push(topic.clone());
                self.local_topics += 1;
            }
            state.local.insert(id, handle.clone());
            fx.routes.insert(topic);
        }
        self.announce(added, Vec::new(), &mut fx);
        self.wait(waiter, &mut fx);
        fx
    }

    /// Session `id` unsubscribes from `topics`; `waiter` completes once peers have caught up.
    pub(crate) fn unsubscribe(
        &mut self,
        id: SessionId,
        topics: Vec<TopicKey>,
        waiter: WaiterId,
    ) -> Effects<P> {
        let mut fx = Effects::default();
        self.drop_local(id, topics, &mut fx);
        self.wait(waiter, &mut fx);
        fx
    }

    /// Session `id` ended; `waiter`, if any, completes once every linked peer has applied the
    /// interest this removed.
    pub(crate) fn session_closed(&mut self, id: SessionId, waiter: Option<WaiterId>) -> Effects<P> {
        let mut fx = Effects::default();
        if let Some(topics) = self.sessions.remove(&id) {
            self.drop_local(id, topics.into_vec(), &mut fx);
        }
        if let Some(waiter) = waiter {
            self.wait(waiter, &mut fx);
        }
        fx
    }

    /// A link to peer `name` came up. Replaces (and asks to close) an older link to the same
    /// peer, and sends the new link our full interest set. Requests waiting for the old link
    /// wait for the new link's acknowledgement of that set instead.
    pub(crate) fn peer_up(&mut self, name: &Arc<str>, link: LinkId, handle: P) -> Effects<P> {
        let mut fx = Effects::default();
        if let Some(old) = self.peers.get(name).map(|p| p.link) {
            for need in self.waiters.iter_mut().flat_map(|w| w.needs.iter_mut()) {
                if need.0 == *name && need.1 == old {
                    need.1 = link;
                    need.2 = 1;
                }
            }
        }
        // What the peer wanted over its previous link stays in the routes, now through the
        // new link, until its full set arrives over the new link and says what changed: a
        // message published meanwhile still reaches it.
        let mut interest = HashSet::new();
        if let Some(old) = self.peers.remove(name) {
            for topic in &old.interest {
                if let Some(state) = self.topics.get_mut(topic) {
                    state.remote.insert(name.clone(), handle.clone());
                }
                fx.routes.insert(topic.clone());
            }
            interest = old.interest;
            fx.close.push(old.handle);
        }
        let mut all: Vec<TopicKey> = self
            .topics
            .iter()
            .filter(|(_, s)| !s.local.is_empty())
            .map(|(t, _)| t.clone())
            .collect();
        all.sort();
        fx.to_peers.push((
            handle.clone(),
            ToPeer::Interest {
                seq: 1,
                full: true,
                add: all,
                remove: Vec::new(),
            },
        ));
        self.peers.insert(
            name.clone(),
            PeerState {
                link,
                handle,
                interest,
                sent: 1,
                acked: 0,
                down: false,
            },
        );
        fx
    }

    /// The link `link` to peer `name` went down. Its interest stays (and with it the peer in
    /// the routes) until the peer links again or [`Interest::peer_expire`]. Requests waiting
    /// for it keep waiting, until it expires or the coordinators no longer list it
    /// ([`Interest::peer_left`]): the peer has not applied what they changed, and will when it
    /// links again (its new link starts with our full set).
    pub(crate) fn peer_down(&mut self, name: &Arc<str>, link: LinkId) -> Effects<P> {
        if let Some(peer) = self.peers.get_mut(name).filter(|p| p.link == link) {
            peer.down = true;
        }
        Effects::default()
    }

    /// The link `link` to peer `name`, down since [`Interest::peer_down`], did not come back
    /// in time: its interest goes, and requests stop waiting for it (it left the cluster).
    pub(crate) fn peer_expire(&mut self, name: &Arc<str>, link: LinkId) -> Effects<P> {
        let mut fx = Effects::default();
        if self
            .peers
            .get(name)
            .is_some_and(|p| p.link == link && p.down)
        {
            self.remove_peer(name, link, &mut fx);
            fx.close.clear();
            self.settle(|n, l, _| n == name && l == link, &mut fx);
        }
        fx
    }

    /// The coordinators no longer list peer `name` (it died or left, or they lost it): if its
    /// link is down, requests stop waiting for it now, as they would not wait for it had its
    /// link been down when they were made (it hears what they changed in the full set its
    /// next link starts with). Its interest stays until the link expires, so what is routed
    /// to it meanwhile is still counted. A link still up is waited for as before; see
    /// `peers::PeerLink`'s closing for when it goes down later.
    pub(crate) fn peer_left(&mut self, name: &Arc<str>) -> Effects<P> {
        let mut fx = Effects::default();
        if let Some(link) = self.peers.get(name).filter(|p| p.down).map(|p| p.link) {
            self.settle(|n, l, _| n == name && l == link, &mut fx);
        }
        fx
    }

    /// Peer `name` sent its interest (a full set or a delta) over `link`.
    pub(crate) fn peer_interest(
        &mut self,
        name: &Arc<str>,
        link: LinkId,
        seq: u64,
        full: bool,
        add: Vec<TopicKey>,
        remove: Vec<TopicKey>,
    ) -> Effects<P> {
        let mut fx = Effects::default();
        let Some(peer) = self.peers.get_mut(name).filter(|p| p.link == link) else {
            return fx;
        };
        let handle = peer.handle.clone();
        let removed: Vec<TopicKey> = if full {
            let wanted: HashSet<&TopicKey> = add.iter().collect();
            peer.interest
                .iter()
                .filter(|t| !wanted.contains(t))
                .cloned()
                .collect()
        } else {
            remove
        };
        for topic in removed {
            if peer.interest.remove(&topic) {
                if let Some(state) = self.topics.get_mut(&topic) {
                    state.remote.remove(name);
                }
                Self::forget_if_empty(&mut self.topics, &topic);
                fx.routes.insert(topic);
            }
        }
        for topic in add {
            if peer.interest.insert(topic.clone()) {
                self.topics
                    .entry(topic.clone())
                    .or_default()
                    .remote
                    .insert(name.clone(), handle.clone());
                fx.routes.insert(topic);
            }
        }
        fx.to_peers.push((handle, ToPeer::Ack { seq }));
        fx
    }

    /// Peer `name` applied our interest messages up to `seq`.
    pub(crate) fn peer_ack(&mut self, name: &Arc<str>, link: LinkId, seq: u64) -> Effects<P> {
        let mut fx = Effects::default();
        if let Some(peer) = self.peers.get_mut(name).filter(|p| p.link == link) {
            peer.acked = peer.acked.max(seq);
            self.settle(|n, l, s| n == name && l == link && s <= seq, &mut fx);
        }
        fx
    }

    /// Forgets waiters whose requester stopped waiting.
    pub(crate) fn cancel_waiters(&mut self, ids: &HashSet<WaiterId>) {
        self.waiters.retain(|w| !ids.contains(&w.id));
    }

    /// The peers `waiter` still waits for, in name order; `None` once it is complete (or
    /// unknown).
    pub(crate) fn pending(&self, waiter: WaiterId) -> Option<Vec<Arc<str>>> {
        let w = self.waiters.iter().find(|w| w.id == waiter)?;
        let mut names: Vec<Arc<str>> = w.needs.iter().map(|(n, _, _)| n.clone()).collect();
        names.sort();
        names.dedup();
        Some(names)
    }

    /// Local sessions and interested peers for `topic`, or `None` when there are neither.
    /// (`&mut`: the local sessions' chunks are copied for routes as they change.)
    pub(crate) fn route(&mut self, topic: &TopicKey) -> Option<(Chunked<S>, Vec<P>)> {
        let state = self.topics.get_mut(topic)?;
        Some((
            state.local.chunked(),
            state.remote.values().cloned().collect(),
        ))
    }

    /// Topics with at least one local subscriber.
    pub(crate) fn local_topics(&self) -> usize {
        self.local_topics
    }

    /// Topics peer `name` is interested in.
    pub(crate) fn peer_interest_len(&self, name: &str) -> usize {
        self.peers.get(name).map_or(0, |p| p.interest.len())
    }

    fn drop_local(&mut self, id: SessionId, topics: Vec<TopicKey>, fx: &mut Effects<P>) {
        let mut removed = Vec::new();
        for topic in topics {
            if let Some(mine) = self.sessions.get_mut(&id)
                && !mine.remove(&topic)
            {
                continue;
            }
            let Some(state) = self.topics.get_mut(&topic) else {
                continue;
            };
            if state.local.remove(id).is_none() {
                continue;
            }
            if state.local.is_empty() {
                removed.push(topic.clone());
                self.local_topics -= 1;
            }
            Self::forget_if_empty(&mut self.topics, &topic);
            fx.routes.insert(topic);
        }
        if self.sessions.get(&id).is_some_and(SmallSet::is_empty) {
            self.sessions.remove(&id);
        }
        self.announce(Vec::new(), removed, fx);
    }

    /// Sends an interest delta to every peer.
    fn announce(&mut self, add: Vec<TopicKey>, remove: Vec<TopicKey>, fx: &mut Effects<P>) {
        if add.is_empty() && remove.is_empty() {
            return;
        }
        // A link that is down hears the whole set when it comes back.
        for peer in self.peers.values_mut().filter(|p| !p.down) {
            peer.sent += 1;
            let msg = ToPeer::Interest {
                seq: peer.sent,
                full: false,
                add: add.clone(),
                remove: remove.clone(),
            };
            fx.to_peers.push((peer.handle.clone(), msg));
        }
    }

    /// Registers `waiter` to complete when every linked peer has acknowledged all it was sent.
    /// A peer whose link is down is not linked: it hears everything in the full set its next
    /// link starts with.
    fn wait(&mut self, waiter: WaiterId, fx: &mut Effects<P>) {
        let needs: Vec<_> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.down && p.acked < p.sent)
            .map(|(name, p)| (name.clone(), p.link, p.sent))
            .collect();
        if needs.is_empty() {
            fx.completed.push(waiter);
        } else {
            self.waiters.push(Waiter { id: waiter, needs });
        }
    }

    /// Drops the needs matching `satisfied` and completes waiters left with none.
    fn settle(&mut self, satisfied: impl Fn(&Arc<str>, LinkId, u64) -> bool, fx: &mut Effects<P>) {
        self.waiters.retain_mut(|w| {
            w.needs.retain(|(n, l, s)| !satisfied(n, *l, *s));
            if w.needs.is_empty() {
                fx.completed.push(w.id);
                false
            } else {
                true
            }
        });
    }

    fn remove_peer(&mut self, name: &Arc<str>, link: LinkId, fx: &mut Effects<P>) {
        if self.peers.get(name).is_none_or(|p| p.link != link) {
            return;
        }
        let Some(peer) = self.peers.remove(name) else {
            return;
        };
        for topic in peer.interest {
            if let Some(state) = self.topics.get_mut(&topic) {
                state.remote.remove(name);
            }
            Self::forget_if_empty(&mut self.topics, &topic);
            fx.routes.insert(topic);
        }
        fx.close.push(peer.handle);
    }

    fn forget_if_empty(topics: &mut HashMap<TopicKey, TopicState<S, P>>, topic: &TopicKey) {
        if topics
            .get(topic)
            .is_some_and(|s| s.local.is_empty() && s.remote.is_empty())
        {
            topics.remove(topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type I = Interest<u64, &'static str>;

    fn t(name: &str) -> TopicKey {
        TopicKey::new("", name)
    }

    fn name(n: &str) -> Arc<str> {
        n.into()
    }

    /// The interest message announcing `add` and `remove` (topic names) as number `seq`.
    fn interest(seq: u64, full: bool, add: &[&str], remove: &[&str]) -> ToPeer {
        ToPeer::Interest {
            seq,
            full,
            add: add.iter().map(|n| t(n)).collect(),
            remove: remove.iter().map(|n| t(n)).collect(),
        }
    }

    /// The route's sessions (by id) and peers.
    fn route(i: &mut I, topic: &str) -> (Vec<u64>, Vec<&'static str>) {
        i.route(&t(topic))
            .map(|(local, remote)| {
                let mut local: Vec<u64> = local.iter().copied().collect();
                local.sort_unstable();
                (local, remote)
            })
            .unwrap_or_default()
    }

    #[test]
    fn first_and_last_local_subscriber_are_announced_to_peers() {
        let mut i = I::new();
        let fx = i.peer_up(&name("b"), 1, "B");
        assert_eq!(fx.to_peers, vec![("B", interest(1, true, &[], &[]))]);
        i.peer_ack(&name("b"), 1, 1);

        let fx = i.subscribe(10, &10, vec![t("x"), t("y")], 100);
        assert_eq!(fx.routes, [t("x"), t("y")].into_iter().collect());
        assert_eq!(
            fx.to_peers,
            vec![("B", interest(2, false, &["x", "y"], &[]))]
        );
        assert!(
            fx.completed.is_empty(),
            "waits for the peer to apply the delta"
        );
        let fx = i.peer_ack(&name("b"), 1, 2);
        assert_eq!(fx.completed, vec![100]);

        // A second subscriber to x changes the route but tells peers nothing new...
        let fx = i.subscribe(11, &11, vec![t("x")], 101);
        assert!(fx.to_peers.is_empty());
        assert_eq!(fx.completed, vec![101]);
        assert_eq!(route(&mut i, "x").0, vec![10, 11]);
        assert_eq!(i.local_topics(), 2);

        // ...and only the last unsubscribe of x is announced.
        let fx = i.unsubscribe(10, vec![t("x")], 102);
        assert!(fx.to_peers.is_empty());
        let fx = i.session_closed(11, None);
        assert_eq!(fx.to_peers, vec![("B", interest(3, false, &[], &["x"]))]);
        assert!(i.route(&t("x")).is_none());
        assert_eq!(i.local_topics(), 1);
    }

    #[test]
    fn a_closed_sessions_waiter_completes_once_peers_applied_its_removal() {
        let mut i = I::new();
        // No peer linked: nothing to wait for.
        i.subscribe(1, &1, vec![t("x")], 1);
        assert_eq!(i.session_closed(1, Some(2)).completed, vec![2]);
        // A linked peer: complete once it acknowledged the removal, not before.
        i.peer_up(&name("b"), 1, "B");
        i.peer_ack(&name("b"), 1, 1);
        i.subscribe(3, &3, vec![t("y")], 3);
        i.peer_ack(&name("b"), 1, 2);
        let fx = i.session_closed(3, Some(4));
        assert_eq!(fx.to_peers, vec![("B", interest(3, false, &[], &["y"]))]);
        assert!(fx.completed.is_empty());
        assert!(i.peer_ack(&name("b"), 1, 2).completed.is_empty());
        assert_eq!(i.peer_ack(&name("b"), 1, 3).completed, vec![4]);
        // A peer whose link is down is not waited for (it hears the full set when it links
        // again); one that goes down while waited for is waited for until it expires.
        i.subscribe(5, &5, vec![t("z")], 5);
        i.peer_ack(&name("b"), 1, 4);
        let fx = i.session_closed(5, Some(6));
        assert!(fx.completed.is_empty());
        assert!(i.peer_down(&name("b"), 1).completed.is_empty());
        assert_eq!(i.peer_expire(&name("b"), 1).completed, vec![6]);
        i.subscribe(7, &7, vec![t("w")], 7);
        assert_eq!(i.session_closed(7, Some(8)).completed, vec![8]);
    }

    #[test]
    fn routes_include_only_interested_peers() {
        let mut i = I::new();
        i.peer_up(&name("b"), 1, "B");
        i.peer_up(&name("c"), 2, "C");
        let fx = i.peer_interest(&name("b"), 1, 1, true, vec![t("x")], vec![]);
        assert_eq!(fx.to_peers, vec![("B", ToPeer::Ack { seq: 1 })]);
        i.peer_interest(&name("c"), 2, 1, true, vec![], vec![]);
        assert_eq!(route(&mut i, "x"), (vec![], vec!["B"]));
        assert!(
            i.route(&t("y")).is_none(),
            "nobody wants y: nothing is forwarded"
        );
        i.peer_interest(&name("c"), 2, 2, false, vec![t("x"), t("y")], vec![]);
        assert_eq!(route(&mut i, "x").1, vec!["B", "C"]);
        i.peer_interest(&name("b"), 1, 2, false, vec![], vec![t("x")]);
        assert_eq!(route(&mut i, "x").1, vec!["C"]);
        // A full set replaces what the peer wanted before.
        i.peer_interest(&name("c"), 2, 3, true, vec![t("z")], vec![]);
        assert!(i.route(&t("x")).is_none() && i.route(&t("y")).is_none());
        assert_eq!(route(&mut i, "z").1, vec!["C"]);
        assert_eq!(i.peer_interest_len("c"), 1);
        // Messages from a stale link are ignored.
        let fx = i.peer_interest(&name("c"), 99, 4, false, vec![t("q")], vec![]);
        assert!(fx.to_peers.is_empty() && i.route(&t("q")).is_none());
    }

    #[test]
    fn a_new_link_gets_the_full_set_and_replaces_the_old_one() {
        let mut i = I::new();
        i.subscribe(1, &1, vec![t("b"), t("a")], 0);
        i.peer_up(&name("p"), 1, "P1");
        i.peer_interest(&name("p"), 1, 1, true, vec![t("a")], vec![]);
        assert_eq!(route(&mut i, "a"), (vec![1], vec!["P1"]));
        let fx = i.peer_up(&name("p"), 2, "P2");
        assert_eq!(fx.close, vec!["P1"]);
        assert_eq!(
            fx.to_peers,
            vec![("P2", interest(1, true, &["a", "b"], &[]))]
        );
        assert_eq!(
            route(&mut i, "a"),
            (vec![1], vec!["P2"]),
            "what the peer wanted goes on, over the new link, until it says otherwise"
        );
        // The old link's late "down" must not remove the new link.
        let fx = i.peer_down(&name("p"), 1);
        assert!(fx.close.is_empty() && fx.routes.is_empty());
        // The full set over the new link settles it.
        i.peer_interest(&name("p"), 2, 1, true, vec![t("b")], vec![]);
        assert_eq!(route(&mut i, "b").1, vec!["P2"]);
        assert_eq!(route(&mut i, "a").1, Vec::<&str>::new());
        // Down, the link keeps its interest (what is routed to it is counted as missed)...
        let fx = i.peer_down(&name("p"), 2);
        assert!(fx.routes.is_empty() && fx.close.is_empty());
        assert_eq!(route(&mut i, "b").1, vec!["P2"]);
        // ...and a later change is not sent to it (its next link starts with the full set),
        // nor waited for.
        let fx = i.subscribe(2, &2, vec![t("c")], 5);
        assert!(fx.to_peers.is_empty() && fx.completed == vec![5]);
        // An expiry for another link changes nothing; its own removes the interest.
        assert!(i.peer_expire(&name("p"), 1).routes.is_empty());
        let fx = i.peer_expire(&name("p"), 2);
        assert!(fx.routes.contains(&t("b")) && fx.close.is_empty());
        assert_eq!(route(&mut i, "b"), (vec![1], vec![]));
        // A link that is up does not expire.
        i.peer_up(&name("p"), 3, "P3");
        assert!(i.peer_expire(&name("p"), 3).routes.is_empty());
    }

    #[test]
    fn waiters_complete_when_peers_ack_or_expire() {
        let mut i = I::new();
        i.peer_up(&name("b"), 1, "B");
        i.peer_up(&name("c"), 2, "C");
        // Neither peer has acknowledged its full set yet: a subscribe waits for both.
        let fx = i.subscribe(1, &1, vec![t("x")], 7);
        assert!(fx.completed.is_empty());
        assert_eq!(i.pending(7), Some(vec![name("b"), name("c")]));
        assert!(i.peer_ack(&name("b"), 1, 2).completed.is_empty());
        assert_eq!(i.pending(7), Some(vec![name("c")]));
        // A link going down does not answer for the peer...
        assert!(i.peer_down(&name("c"), 2).completed.is_empty());
        assert_eq!(i.pending(7), Some(vec![name("c")]));
        // ...its expiry does: the peer left.
        assert_eq!(i.peer_expire(&name("c"), 2).completed, vec![7]);
        assert_eq!(i.pending(7), None);
        // An ack for an older seq does not complete a newer wait.
        i.subscribe(2, &2, vec![t("y")], 8);
        assert!(i.peer_ack(&name("b"), 1, 2).completed.is_empty());
        assert_eq!(i.peer_ack(&name("b"), 1, 3).completed, vec![8]);
        // Without peers, requests complete at once.
        i.peer_down(&name("b"), 1);
        i.peer_expire(&name("b"), 1);
        assert_eq!(i.unsubscribe(2, vec![t("y")], 9).completed, vec![9]);
        assert_eq!(i.pending(9), None);
    }

    #[test]
    fn a_need_survives_its_link_going_down_and_is_met_on_the_next_link() {
        let mut i = I::new();
        i.peer_up(&name("p"), 1, "P1");
        i.peer_ack(&name("p"), 1, 1);
        // The delta (seq 2) is sent; the link goes down before it is acknowledged.
        assert!(i.subscribe(1, &1, vec![t("x")], 7).completed.is_empty());
        assert!(i.peer_down(&name("p"), 1).completed.is_empty());
        assert_eq!(i.pending(7), Some(vec![name("p")]));
        // A change made while it is down is not sent, nor waited for: the peer is not linked.
        let fx = i.subscribe(2, &2, vec![t("y")], 8);
        assert!(fx.to_peers.is_empty() && fx.completed == vec![8]);
        let fx = i.subscribe(3, &3, vec![t("z")], 9);
        assert!(fx.completed == vec![9]);
        // The peer links again: the new link starts with the full set (seq 1), and the first
        // request now waits for its acknowledgement.
        let fx = i.peer_up(&name("p"), 2, "P2");
        assert!(fx.completed.is_empty());
        assert_eq!(
            fx.to_peers,
            vec![("P2", interest(1, true, &["x", "y", "z"], &[]))]
        );
        assert_eq!(i.pending(7), Some(vec![name("p")]));
        // A request made now waits for the same acknowledgement.
        assert!(i.unsubscribe(3, vec![t("z")], 10).completed.is_empty());
        // A late ack from the old link is not the new link's.
        assert!(i.peer_ack(&name("p"), 1, 9).completed.is_empty());
        assert_eq!(i.peer_ack(&name("p"), 2, 1).completed, vec![7]);
        assert_eq!(i.peer_ack(&name("p"), 2, 2).completed, vec![10]);
        assert_eq!(i.pending(7), None);
        // The old link's expiry, late, changes nothing.
        let fx = i.peer_expire(&name("p"), 1);
        assert!(fx.completed.is_empty() && fx.routes.is_empty());
    }

    #[test]
    fn a_peer_the_coordinators_no_longer_list_stops_being_waited_for_once_its_link_is_down() {
        let mut i = I::new();
        i.peer_up(&name("p"), 1, "P1");
        i.peer_ack(&name("p"), 1, 1);
        assert!(i.subscribe(1, &1, vec![t("x")], 7).completed.is_empty());
        // Listed no more while its link is up: still waited for (it may only have lost the
        // coordinators).
        assert!(i.peer_left(&name("p")).completed.is_empty());
        assert_eq!(i.pending(7), Some(vec![name("p")]));
        // Its link goes down: kept, as for a peer that may link again...
        assert!(i.peer_down(&name("p"), 1).completed.is_empty());
        assert_eq!(i.pending(7), Some(vec![name("p")]));
        // ...until the coordinators say it is gone: then the request stops waiting for it,
        // as one made now would not wait for it.
        assert_eq!(i.peer_left(&name("p")).completed, vec![7]);
        assert_eq!(i.pending(7), None);
        assert_eq!(i.subscribe(2, &2, vec![t("y")], 8).completed, vec![8]);
        assert!(i.peer_left(&name("p")).completed.is_empty());
        // Its link comes back after all: it gets the full set, as after any absence.
        let fx = i.peer_up(&name("p"), 2, "P2");
        assert!(
            matches!(&fx.to_peers[..], [("P2", ToPeer::Interest { full: true, add, .. })] if add.len() == 2)
        );
    }

    #[test]
    fn a_need_follows_the_peer_across_links_until_it_expires() {
        let mut i = I::new();
        i.peer_up(&name("p"), 1, "P1");
        i.peer_ack(&name("p"), 1, 1);
        assert!(i.subscribe(1, &1, vec![t("x")], 6).completed.is_empty());
        i.peer_down(&name("p"), 1);
        // The peer links again, and that link breaks before it acknowledges anything: the
        // need moves to each new link, and only the peer's expiry drops it.
        i.peer_up(&name("p"), 2, "P2");
        assert!(i.peer_down(&name("p"), 2).completed.is_empty());
        assert_eq!(i.pending(6), Some(vec![name("p")]));
        assert!(
            i.peer_expire(&name("p"), 1).completed.is_empty(),
            "a stale expiry"
        );
        assert_eq!(i.peer_expire(&name("p"), 2).completed, vec![6]);
        assert!(i.pending(6).is_none());
        // An expired peer is not linked: nothing waits for it.
        assert_eq!(i.subscribe(2, &2, vec![t("z")], 8).completed, vec![8]);
    }

    #[test]
    fn a_batch_folds_into_one_interest_and_one_ack_per_link() {
        let key = |p: &&'static str| p.as_ptr() as usize;
        let folded = coalesce(
            vec![
                ("B", interest(2, false, &["x"], &[])),
                ("C", ToPeer::Ack { seq: 4 }),
                ("B", ToPeer::Ack { seq: 7 }),
                ("B", interest(3, false, &["y"], &["x"])),
                ("B", ToPeer::Ack { seq: 5 }),
                ("B", interest(4, false, &["z"], &[])),
            ],
            key,
        );
        assert_eq!(
            folded,
            vec![
                ("B", interest(4, false, &["y", "z"], &["x"])),
                ("B", ToPeer::Ack { seq: 7 }),
                ("C", ToPeer::Ack { seq: 4 }),
            ]
        );
        // A full set absorbs the deltas after it and removes nothing.
        let folded = coalesce(
            vec![
                ("B", interest(1, true, &["a", "b"], &[])),
                ("B", interest(2, false, &["c"], &["a"])),
            ],
            key,
        );
        assert_eq!(folded, vec![("B", interest(2, true, &["b", "c"], &[]))]);
    }

    #[test]
    fn a_session_with_many_topics_keeps_each_once() {
        let mut i = I::new();
        let names: Vec<String> = (0..3 * SmallSet::<TopicKey>::FEW)
            .map(|n| format!("t{n}"))
            .collect();
        // Past the list's size the set takes over; repeats change nothing either side of it.
        for name in &names {
            i.subscribe(1, &1, vec![t(name), t(&names[0])], 0);
        }
        assert_eq!(i.local_topics(), names.len());
        assert!(matches!(i.sessions.get(&1), Some(set) if !set.is_few()));
        let fx = i.unsubscribe(1, vec![t(&names[3]), t(&names[3])], 1);
        assert_eq!(fx.routes.len(), 1);
        assert_eq!(i.local_topics(), names.len() - 1);
        i.session_closed(1, None);
        assert_eq!(i.local_topics(), 0);
        assert!(i.topics.is_empty() && i.sessions.is_empty());
        // A few topics stay a list, and leave the same way.
        i.subscribe(2, &2, vec![t("a"), t("b"), t("a")], 2);
        assert!(matches!(i.sessions.get(&2), Some(set) if set.is_few() && set.len() == 2));
        i.unsubscribe(2, vec![t("b"), t("a")], 3);
        assert!(i.topics.is_empty() && i.sessions.is_empty());
    }

    #[test]
    fn duplicate_and_unknown_topics_change_nothing() {
        let mut i = I::new();
        i.subscribe(1, &1, vec![t("x"), t("x")], 0);
        assert_eq!(route(&mut i, "x").0, vec![1]);
        let fx = i.subscribe(1, &1, vec![t("x")], 1);
        assert!(fx.routes.is_empty());
        let fx = i.unsubscribe(1, vec![t("nope")], 2);
        assert!(fx.routes.is_empty() && fx.completed == vec![2]);
        let fx = i.unsubscribe(2, vec![t("x")], 3);
        assert!(fx.routes.is_empty(), "session 2 never subscribed to x");
        assert_eq!(i.local_topics(), 1);
        i.session_closed(1, None);
        assert_eq!(i.local_topics(), 0);
        assert!(i.topics.is_empty() && i.sessions.is_empty());
        // Unsubscribing from everything leaves nothing behind either.
        i.subscribe(3, &3, vec![t("a"), t("b")], 4);
        i.unsubscribe(3, vec![t("a"), t("b")], 5);
        assert!(i.topics.is_empty() && i.sessions.is_empty());
    }
}
