//! Rate limits: a token bucket, token buckets per source address (failed logins, challenge
//! requests) and open connections per source address, so one address cannot use up a shared
//! resource. IPv6 addresses are grouped by /64, the usual allocation to one host or site; behind
//! a proxy every client shares the proxy's address and so its allowance.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::sync::lock;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
    }

    /// A full bucket of `burst` tokens (any amount, e.g. bytes) as of `now`.
    pub fn full_at(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.try_take(1.0, now)
    }

    /// Takes `n` tokens if there are that many, or if the bucket is full: a request larger
    /// than the whole burst passes on a full bucket and leaves a debt that later requests wait
    /// out.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n.min(self.burst) {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Charges `n` tokens already spent (the bucket may go into debt) and returns how long
    /// until it is out of debt: how long to wait before spending more.
    pub fn charge(&mut self, n: f64, now: Instant) -> std::time::Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Gives a token back (up to the burst).
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// The key an address is limited under: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
        v4 => v4,
    }
}

/// A token bucket per source address, tracking a bounded number of addresses.
#[derive(Debug)]
pub struct AddressLimits {
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
    per_minute: u32,
    burst: u32,
    /// Most addresses tracked; when full, addresses whose bucket has refilled are forgotten,
    /// and if none has, new addresses are limited until some have.
    max_addresses: usize,
}

impl AddressLimits {
    /// `per_minute` sustained and `burst` at once per address, for at most `max_addresses`.
    pub fn new(per_minute: u32, burst: u32, max_addresses: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            per_minute,
            burst,
            max_addresses,
        }
    }

    /// Takes a token for `ip`; `false` when its allowance is used up (or the table is full of
    /// limited addresses).
    pub fn take(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let ip = key(ip);
        let mut buckets = lock(&self.buckets);
        if !buckets.contains_key(&ip) && buckets.len() >= self.max_addresses {
            buckets.retain(|_, b| !b.full(now));
            if buckets.len() >= self.max_addresses {
                return false;
            }
        }
        let rate = f64::from(self.per_minute) / 60.0;
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, self.burst))
            .take(now)
    }

    /// Gives `ip` back the token it took (the attempt did not count, e.g. a login succeeded).
    pub fn give_back(&self, ip: IpAddr) {
        if let Some(bucket) = lock(&self.buckets).get_mut(&key(ip)) {
            bucket.give_back();
        }
    }
}

/// Open connections per source address, each address holding at most `max` at once: a slot is
/// taken when a connection is accepted and given back when its [`AddressSlot`] drops. The table
/// holds only addresses with a connection open (an address is removed when its last one
/// closes), so it never has more entries than there are open connections.
#[derive(Debug)]
pub struct ConnectionsPerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// The table is shrunk when it is emptier than this...
const SHRINK_ABOVE: usize = 1024;

impl ConnectionsPerAddress {
    /// At most `max` connections per address (0 is taken as 1).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            max: max.max(1),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds `max` already.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = key(ip);
        let mut open = lock(&self.open);
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        drop(open);
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections open from `ip` (from its /64 for IPv6).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        lock(&self.open).get(&key(ip)).copied().unwrap_or(0)
    }

    /// Addresses with a connection open.
    pub fn addresses(&self) -> usize {
        lock(&self.open).len()
    }

    fn close(&self, key: IpAddr) {
        let mut open = lock(&self.open);
        if let Entry::Occupied(mut entry) = open.entry(key) {
            if *entry.get() <= 1 {
                entry.remove();
            } else {
                *entry.get_mut() -= 1;
            }
        }
        // Memory follows the open connections down too, not only up (with room to spare, so
        // it is not resized at every close).
        if open.capacity() > SHRINK_ABOVE && open.len() * 4 < open.capacity() {
            let target = (open.len() * 2).max(SHRINK_ABOVE);
            open.shrink_to(target);
        }
    }
}

/// One connection's place under [`ConnectionsPerAddress`]; given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<ConnectionsPerAddress>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        self.table.close(self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10.0, 3);
        b.last = start;
        assert!((0..3).all(|_| b.take(start)));
        assert!(!b.take(start));
        assert!(b.take(start + Duration::from_millis(100)));
        assert!(!b.take(start + Duration::from_millis(100)));
    }

    #[test]
    fn addresses_are_limited_apart_and_the_table_is_bounded() {
        let limits = AddressLimits::new(1, 3, 2);
        let (a, b, c) = (
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from([127, 0, 0, 2]),
            IpAddr::from([127, 0, 0, 3]),
        );
        assert!((0..3).all(|_| limits.take(a)));
        assert!(!limits.take(a));
        limits.give_back(a);
        assert!(limits.take(a), "a refunded attempt can be made again");
        assert!(limits.take(b));
        // The table is full of addresses that are not back to full: a third waits.
        assert!(!limits.take(c));
        assert!(lock(&limits.buckets).len() <= 2);
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let limits = AddressLimits::new(1, 1, 10);
        assert!(limits.take("2001:db8::1".parse().unwrap()));
        assert!(!limits.take("2001:db8::2".parse().unwrap()));
        assert!(limits.take("2001:db8:0:1::1".parse().unwrap()));
    }

    #[test]
    fn connections_per_address_are_counted_until_their_slots_drop() {
        let table = ConnectionsPerAddress::new(2);
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([10, 0, 0, 1]));
        let first = table.open(a).unwrap();
        let second = table.open(a).unwrap();
        assert!(table.open(a).is_none(), "a third from the same address");
        assert_eq!(table.open_from(a), 2, "a refusal takes no slot");
        let other = table
            .open(b)
            .expect("another address has its own allowance");
        drop(first);
        let again = table
            .open(a)
            .expect("a closed connection gives its slot back");
        assert!(table.open(a).is_none());
        drop((second, again, other));
        assert_eq!(
            table.addresses(),
            0,
            "no entry is left for closed connections"
        );
        assert_eq!(table.open_from(a), 0);
    }

    #[test]
    fn connections_per_address_group_ipv6_by_64_and_see_mapped_ipv4() {
        let table = ConnectionsPerAddress::new(1);
        let _v4 = table.open(IpAddr::from([192, 0, 2, 1])).unwrap();
        assert!(
            table.open("::ffff:192.0.2.1".parse().unwrap()).is_none(),
            "an IPv4-mapped address is the IPv4 address"
        );
        let _v6 = table.open("2001:db8::1".parse().unwrap()).unwrap();
        assert!(table.open("2001:db8::2".parse().unwrap()).is_none());
        assert!(table.open("2001:db8:0:1::1".parse().unwrap()).is_some());
        assert_eq!(table.addresses(), 2);
    }

    #[test]
    fn the_connection_table_shrinks_when_connections_close() {
        let table = ConnectionsPerAddress::new(1);
        let slots: Vec<_> = (0..20_000u32)
            .map(|i| table.open(IpAddr::from(i.to_be_bytes())).unwrap())
            .collect();
        let peak = lock(&table.open).capacity();
        drop(slots);
        assert_eq!(table.addresses(), 0);
        assert!(lock(&table.open).capacity() < peak / 4, "stays at {peak}");
    }
}
