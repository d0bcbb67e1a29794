//! Rate limits of the negotiation side: a token bucket per negotiation link (`Connect`s) and
//! one per source address for failed logins, so guessing access codes is slow and costs the
//! coordinator little (a limited address is refused before argon2 runs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use relaymesh_net::sync::lock;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
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

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is there, without taking it.
    fn available(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Failed logins per source address: each failure takes a token; an address with none left is
/// refused (`RATE_LIMITED`) until the bucket refills.
#[derive(Debug)]
pub(crate) struct FailedLogins {
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
    per_minute: u32,
    burst: u32,
    /// Most addresses tracked; when full, addresses whose bucket has refilled are forgotten.
    max_addresses: usize,
}

impl FailedLogins {
    pub(crate) fn new(per_minute: u32, burst: u32, max_addresses: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            per_minute,
            burst,
            max_addresses,
        }
    }

    /// Whether `ip` may try to log in now.
    pub(crate) fn allows(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        lock(&self.buckets)
            .get_mut(&ip)
            .is_none_or(|b| b.available(now))
    }

    /// Records a failed login from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if !buckets.contains_key(&ip) && buckets.len() >= self.max_addresses {
            buckets.retain(|_, b| !b.full(now));
            if buckets.len() >= self.max_addresses {
                // Every tracked address is still limited: forget one rather than grow.
                if let Some(any) = buckets.keys().next().copied() {
                    buckets.remove(&any);
                }
            }
        }
        let rate = f64::from(self.per_minute) / 60.0;
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, self.burst))
            .take(now);
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
    fn failures_limit_one_address_only() {
        let limits = FailedLogins::new(1, 3, 2);
        let (a, b, c) = (
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from([127, 0, 0, 2]),
            IpAddr::from([127, 0, 0, 3]),
        );
        for _ in 0..3 {
            assert!(limits.allows(a));
            limits.failed(a);
        }
        assert!(!limits.allows(a));
        assert!(limits.allows(b));
        // Tracking is bounded: a third address evicts rather than growing the table.
        limits.failed(b);
        limits.failed(c);
        assert!(lock(&limits.buckets).len() <= 2);
    }
}
