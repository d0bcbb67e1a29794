//! The registry of comm servers and server selection, as a plain struct with no I/O.
//!
//! The coordinator's async code keeps one `Registry` behind a mutex and feeds it events
//! (a server registered, reported load, went away); the registry answers with what to tell whom
//! (peer lists, `PeerJoined`/`PeerLeft` recipients, a link to close). `H` is whatever the caller
//! uses to reach a server's link; the unit tests use plain numbers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::RngExt as _;
use rand::seq::IndexedRandom as _;
use serde::{Deserialize, Serialize};

/// Identifies one server-link connection, so that a late "link closed" event for a link that
/// has since been replaced does not unregister its successor.
pub type LinkId = u64;

/// How the coordinator picks a server among the eligible ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Uniformly at random (the default).
    #[default]
    Random,
    /// The server with the most free capacity; ties broken at random.
    LeastLoaded,
    /// Two servers at random, then the less loaded of the two.
    PowerOfTwo,
}

/// What a server last told the coordinator about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    /// Connected clients.
    pub clients: u32,
    /// Keys reserved but not yet redeemed.
    pub pending_keys: u32,
    /// Topics with local subscribers.
    pub topics: u32,
    /// Refuses new clients while shutting down.
    pub draining: bool,
}

/// One registered server.
#[derive(Debug, Clone)]
pub struct Entry<H> {
    /// Base WebSocket URL.
    pub url: String,
    /// Most clients it accepts.
    pub capacity: u32,
    /// Its latest load report, plus keys reserved through this coordinator since.
    pub load: Load,
    /// When that report arrived (or the server registered, before its first).
    pub load_at: Instant,
    /// The link it registered over.
    pub link: LinkId,
    /// How to reach that link.
    pub handle: H,
    /// It let a reservation time out, and has not reported its load since.
    pub unresponsive: bool,
}

impl<H> Entry<H> {
    /// Whether new clients may be sent here at `now`, when a server must have reported within
    /// `stale_after`: it [`Entry::takes_clients`], answers, and was heard from lately. A server
    /// that stopped (SIGSTOP, a blocked runtime) is out of the choice as soon as its reports
    /// are missing, long before its link's heartbeat timeout ends the link.
    pub fn eligible_at(&self, now: Instant, stale_after: Duration) -> bool {
        self.takes_clients() && self.answering_at(now, stale_after)
    }

    /// Not draining and not full.
    pub fn takes_clients(&self) -> bool {
        !self.load.draining && self.used() < u64::from(self.capacity)
    }

    /// No reservation timed out since its last report, which is at most `stale_after` old.
    fn answering_at(&self, now: Instant, stale_after: Duration) -> bool {
        !self.unresponsive && now.saturating_duration_since(self.load_at) <= stale_after
    }

    fn used(&self) -> u64 {
        u64::from(self.load.clients) + u64::from(self.load.pending_keys)
    }

    fn free(&self) -> u64 {
        u64::from(self.capacity).saturating_sub(self.used())
    }
}

/// The outcome of a registration.
#[derive(Debug)]
pub struct Registration<H> {
    /// Every other server, for the `Registered` answer: `(id, url)`.
    pub peers: Vec<(String, String)>,
    /// Links of the other servers, to tell them `PeerJoined` (empty when the server only
    /// re-registered at the same URL).
    pub notify: Vec<H>,
    /// The link this registration replaces (same id, older connection), to be closed.
    pub replaced: Option<H>,
}

/// A server claimed for one login ([`Registry::claim`]).
#[derive(Debug, Clone)]
pub struct Claim<H> {
    /// The server's id.
    pub id: String,
    /// Its base WebSocket URL.
    pub url: String,
    /// Its link.
    pub handle: H,
    link: LinkId,
}

/// Registered servers by id.
#[derive(Debug)]
pub struct Registry<H> {
    servers: BTreeMap<String, Entry<H>>,
    /// A server not heard from for longer is not offered ([`Entry::eligible_at`]).
    stale_after: Duration,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Self {
            servers: BTreeMap::new(),
            stale_after: Duration::MAX,
        }
    }
}

impl<H: Clone> Registry<H> {
    /// An empty registry whose servers never go stale.
    pub fn new() -> Self {
        Self::default()
    }

    /// Servers not heard from for longer than `stale_after` are not offered.
    pub fn stale_after(mut self, stale_after: Duration) -> Self {
        self.stale_after = stale_after;
        self
    }

    /// Whether `entry` may get new clients now ([`Entry::eligible_at`]).
    pub fn eligible(&self, entry: &Entry<H>) -> bool {
        entry.eligible_at(Instant::now(), self.stale_after)
    }

    /// Registers `id` over `link`, replacing any earlier link with the same id.
    pub fn register(
        &mut self,
        id: &str,
        url: &str,
        capacity: u32,
        link: LinkId,
        handle: H,
    ) -> Registration<H> {
        let entry = Entry {
            url: url.to_owned(),
            capacity,
            load: Load::default(),
            load_at: Instant::now(),
            link,
            handle,
            unresponsive: false,
        };
        let previous = self.servers.insert(id.to_owned(), entry);
        let moved = previous.as_ref().is_none_or(|p| p.url != url);
        let peers = self
            .servers
            .iter()
            .filter(|(other, _)| other.as_str() != id)
            .map(|(other, e)| (other.clone(), e.url.clone()))
            .collect();
        let notify = if moved { self.others(id) } else { Vec::new() };
        Registration {
            peers,
            notify,
            replaced: previous.filter(|p| p.link != link).map(|p| p.handle),
        }
    }

    /// Removes `id` if it is still registered over `link`. Returns the links of the remaining
    /// servers, to tell them `PeerLeft`, or `None` when nothing was removed.
    pub fn unregister(&mut self, id: &str, link: LinkId) -> Option<Vec<H>> {
        if self.servers.get(id)?.link != link {
            return None;
        }
        self.servers.remove(id);
        Some(self.others(id))
    }

    /// Records a load report from `id` over `link`.
    pub fn update_load(&mut self, id: &str, link: LinkId, load: Load) {
        if let Some(entry) = self.servers.get_mut(id).filter(|e| e.link == link) {
            entry.load = load;
            entry.load_at = Instant::now();
            entry.unresponsive = false;
        }
    }

    /// The server of `claim` let its reservation time out: it is not offered again until it
    /// reports its load, so one stuck server costs one login a timeout, not every login.
    pub fn mark_unresponsive(&mut self, claim: &Claim<H>) {
        if let Some(entry) = self
            .servers
            .get_mut(&claim.id)
            .filter(|e| e.link == claim.link)
        {
            entry.unresponsive = true;
        }
    }

    /// Claims a server for one login, under one lock: `preferred` when it is eligible and not
    /// excluded, otherwise one chosen by `strategy` among the eligible servers not in
    /// `exclude`; the key about to be reserved there counts against its capacity at once (until
    /// its next load report, which counts it itself), so concurrent logins cannot overshoot
    /// it. A claim whose reservation fails is given back with [`Registry::release`].
    pub fn claim(
        &mut self,
        rng: &mut impl Rng,
        strategy: Strategy,
        preferred: Option<&str>,
        exclude: &[String],
    ) -> Option<Claim<H>> {
        let id = self.select(rng, strategy, preferred, exclude)?.clone();
        let entry = self.servers.get_mut(&id)?;
        entry.load.pending_keys = entry.load.pending_keys.saturating_add(1);
        Some(Claim {
            url: entry.url.clone(),
            handle: entry.handle.clone(),
            link: entry.link,
            id,
        })
    }

    /// Gives back a claim whose reservation failed.
    pub fn release(&mut self, claim: &Claim<H>) {
        if let Some(entry) = self
            .servers
            .get_mut(&claim.id)
            .filter(|e| e.link == claim.link)
        {
            entry.load.pending_keys = entry.load.pending_keys.saturating_sub(1);
        }
    }

    /// The server [`Registry::claim`] would pick, without claiming it.
    pub fn select(
        &self,
        rng: &mut impl Rng,
        strategy: Strategy,
        preferred: Option<&str>,
        exclude: &[String],
    ) -> Option<&String> {
        let now = Instant::now();
        let allowed =
            |id: &str, e: &Entry<H>| e.takes_clients() && !exclude.iter().any(|x| x == id);
        // A server the client asked for is tried unless it let a reservation time out.
        if let Some(id) = preferred
            && let Some((id, _)) = self
                .servers
                .get_key_value(id)
                .filter(|(id, e)| allowed(id, e) && !e.unresponsive)
        {
            return Some(id);
        }
        let mut candidates: Vec<(&String, &Entry<H>)> = self
            .servers
            .iter()
            .filter(|(id, e)| allowed(id, e) && e.answering_at(now, self.stale_after))
            .collect();
        // When none is answering as it should (or the coordinator itself was too busy to
        // read their reports), trying one is better than refusing the login outright.
        if candidates.is_empty() {
            candidates = self
                .servers
                .iter()
                .filter(|(id, e)| allowed(id, e))
                .collect();
        }
        let (id, _) = match strategy {
            Strategy::Random => *candidates.choose(rng)?,
            Strategy::LeastLoaded => {
                let most_free = candidates.iter().map(|(_, e)| e.free()).max()?;
                let best: Vec<_> = candidates
                    .iter()
                    .filter(|(_, e)| e.free() == most_free)
                    .collect();
                **best.choose(rng)?
            }
            Strategy::PowerOfTwo => {
                let a = *candidates.choose(rng)?;
                let b = candidates[rng.random_range(0..candidates.len())];
                if b.1.free() > a.1.free() { b } else { a }
            }
        };
        Some(id)
    }

    /// Server `id`.
    pub fn get(&self, id: &str) -> Option<&Entry<H>> {
        self.servers.get(id)
    }

    /// Server `id`, to change (an operator draining it).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Entry<H>> {
        self.servers.get_mut(id)
    }

    /// All servers, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry<H>)> {
        self.servers.iter()
    }

    /// Number of registered servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether no server is registered.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    fn others(&self, id: &str) -> Vec<H> {
        self.servers
            .iter()
            .filter(|(other, _)| other.as_str() != id)
            .map(|(_, e)| e.handle.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;

    fn registry(n: u32) -> Registry<u32> {
        let mut r = Registry::new();
        for i in 0..n {
            r.register(
                &format!("s{i}"),
                &format!("ws://h{i}"),
                100,
                u64::from(i),
                i,
            );
        }
        r
    }

    fn spread(
        r: &Registry<u32>,
        strategy: Strategy,
        exclude: &[String],
        picks: usize,
    ) -> HashMap<String, usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = HashMap::new();
        for _ in 0..picks {
            let id = r.select(&mut rng, strategy, None, exclude).unwrap();
            *counts.entry(id.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn random_selection_spreads_over_every_eligible_server() {
        let counts = spread(&registry(3), Strategy::Random, &[], 3000);
        assert_eq!(counts.len(), 3);
        for (id, n) in &counts {
            assert!((800..1200).contains(n), "{id} got {n} of 3000");
        }
    }

    #[test]
    fn excluded_draining_and_full_servers_are_never_picked() {
        let mut r = registry(4);
        r.update_load(
            "s1",
            1,
            Load {
                draining: true,
                ..Load::default()
            },
        );
        r.update_load(
            "s2",
            2,
            Load {
                clients: 60,
                pending_keys: 40,
                ..Load::default()
            },
        );
        let counts = spread(&r, Strategy::Random, &["s3".to_owned()], 200);
        assert_eq!(counts.keys().collect::<Vec<_>>(), vec!["s0"]);
        let mut rng = StdRng::seed_from_u64(1);
        assert!(
            r.select(
                &mut rng,
                Strategy::Random,
                None,
                &["s0".to_owned(), "s3".to_owned()]
            )
            .is_none()
        );
    }

    #[test]
    fn preferred_server_is_honoured_only_when_eligible() {
        let mut r = registry(3);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            assert_eq!(
                r.select(&mut rng, Strategy::Random, Some("s2"), &[])
                    .unwrap(),
                "s2"
            );
        }
        r.update_load(
            "s2",
            2,
            Load {
                draining: true,
                ..Load::default()
            },
        );
        assert_ne!(
            r.select(&mut rng, Strategy::Random, Some("s2"), &[])
                .unwrap(),
            "s2"
        );
        assert_ne!(
            r.select(&mut rng, Strategy::Random, Some("s1"), &["s1".to_owned()])
                .unwrap(),
            "s1"
        );
        assert!(
            r.select(&mut rng, Strategy::Random, Some("nope"), &[])
                .is_some()
        );
    }

    #[test]
    fn a_server_that_stops_reporting_or_answering_is_not_offered() {
        let every = Duration::from_secs(5);
        let mut r = registry(2).stale_after(every);
        let now = Instant::now();
        let s0 = |r: &Registry<u32>| r.servers["s0"].eligible_at(now, every);
        assert!(s0(&r));
        // Its last report is older than the limit: out of the choice, the other still in.
        r.servers.get_mut("s0").unwrap().load_at = now - every - Duration::from_millis(1);
        assert!(!s0(&r));
        assert!(r.servers["s1"].eligible_at(now, every));
        let counts = spread(&r, Strategy::Random, &[], 50);
        assert_eq!(counts.keys().collect::<Vec<_>>(), vec!["s1"]);
        // A report brings it back.
        r.update_load("s0", 0, Load::default());
        assert!(r.eligible(&r.servers["s0"]));
        // A reservation that timed out takes it out until its next report; a mark for an
        // older link of the same id changes nothing.
        let mut rng = StdRng::seed_from_u64(5);
        let claim = r
            .claim(&mut rng, Strategy::Random, Some("s0"), &[])
            .unwrap();
        r.release(&claim);
        let stale = Claim {
            link: 99,
            ..claim.clone()
        };
        r.mark_unresponsive(&stale);
        assert!(r.eligible(&r.servers["s0"]));
        r.mark_unresponsive(&claim);
        assert!(!r.eligible(&r.servers["s0"]));
        let counts = spread(&r, Strategy::Random, &[], 50);
        assert_eq!(counts.keys().collect::<Vec<_>>(), vec!["s1"]);
        // With nothing better, it is still tried rather than the login refused.
        let counts = spread(&r, Strategy::Random, &["s1".to_owned()], 5);
        assert_eq!(counts.keys().collect::<Vec<_>>(), vec!["s0"]);
        r.update_load("s0", 0, Load::default());
        assert!(r.eligible(&r.servers["s0"]));
    }

    #[test]
    fn load_aware_strategies_prefer_free_capacity() {
        let mut r = registry(3);
        r.update_load(
            "s0",
            0,
            Load {
                clients: 90,
                ..Load::default()
            },
        );
        r.update_load(
            "s1",
            1,
            Load {
                clients: 10,
                ..Load::default()
            },
        );
        r.update_load(
            "s2",
            2,
            Load {
                clients: 50,
                ..Load::default()
            },
        );
        let least = spread(&r, Strategy::LeastLoaded, &[], 50);
        assert_eq!(least.get("s1"), Some(&50));
        let p2 = spread(&r, Strategy::PowerOfTwo, &[], 900);
        assert!(p2.get("s1").copied().unwrap_or(0) > p2.get("s0").copied().unwrap_or(0));
    }

    #[test]
    fn a_claim_counts_at_once_and_a_failed_one_is_given_back() {
        let mut r = Registry::new();
        r.register("s0", "ws://h0", 2, 0, 0u32);
        let mut rng = StdRng::seed_from_u64(5);
        let pending = |r: &Registry<u32>| r.iter().next().unwrap().1.load.pending_keys;
        let first = r.claim(&mut rng, Strategy::Random, None, &[]).unwrap();
        assert_eq!(
            (first.id.as_str(), first.url.as_str(), pending(&r)),
            ("s0", "ws://h0", 1)
        );
        let second = r.claim(&mut rng, Strategy::Random, None, &[]).unwrap();
        assert!(
            r.claim(&mut rng, Strategy::Random, None, &[]).is_none(),
            "two claims fill a server of capacity 2"
        );
        r.release(&second);
        assert_eq!(pending(&r), 1);
        assert!(r.claim(&mut rng, Strategy::Random, None, &[]).is_some());
        // A claim on a link that has since been replaced gives nothing back.
        r.register("s0", "ws://h0", 2, 1, 0u32);
        r.update_load(
            "s0",
            1,
            Load {
                pending_keys: 1,
                ..Load::default()
            },
        );
        r.release(&first);
        assert_eq!(pending(&r), 1);
    }

    #[test]
    fn registration_reports_peers_and_replacements() {
        let mut r = registry(2);
        let third = r.register("s2", "ws://h2", 100, 10, 2);
        assert_eq!(
            third.peers,
            vec![
                ("s0".into(), "ws://h0".into()),
                ("s1".into(), "ws://h1".into())
            ]
        );
        assert_eq!(third.notify, vec![0, 1]);
        assert!(third.replaced.is_none());

        // The same server reconnects at the same URL: the old link is replaced, nobody needs a
        // PeerJoined, and the old link's late close does not unregister the new one.
        let again = r.register("s2", "ws://h2", 100, 11, 22);
        assert_eq!(again.replaced, Some(2));
        assert!(again.notify.is_empty());
        assert_eq!(r.unregister("s2", 10), None);
        assert_eq!(r.len(), 3);
        // Moving to a new URL is announced again.
        assert_eq!(
            r.register("s2", "ws://elsewhere", 100, 12, 23).notify,
            vec![0, 1]
        );
        assert_eq!(r.unregister("s2", 12), Some(vec![0, 1]));
        assert_eq!(r.len(), 2);
        // Load reports over a stale link are ignored.
        r.update_load(
            "s0",
            99,
            Load {
                clients: 7,
                ..Load::default()
            },
        );
        assert_eq!(r.iter().next().unwrap().1.load.clients, 0);
    }
}
