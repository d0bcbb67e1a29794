//! Rate limits: a token bucket, and token buckets per source address (failed logins, challenge
//! requests), so one address cannot use up a shared resource. IPv6 addresses are grouped by
//! /64, the usual allocation to one host or site; behind a proxy every client shares the
//! proxy's address and so its allowance.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
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
}
