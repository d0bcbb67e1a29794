//! Reconnect backoff: capped exponential delays with jitter, from the `backon` crate.
//!
//! Links that must come back on their own (comm server -> coordinator, peer links, the client
//! library's server link) wait `min`, then twice that, and so on up to `max`, each step plus a
//! random jitter of up to 100 % of the step so that a restarted coordinator is not hit by every
//! server at the same instant. The schedule never ends; it restarts after a link has come up.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use relaymesh_proto::ErrorCode;

use crate::ws::DialError;

/// An endless backoff schedule; call [`Backoff::reset`] once a connection succeeds.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// A schedule starting at `min` and doubling up to `max` (before jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max.max(min))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            current: builder.build(),
            max: max.max(min),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times` makes the iterator endless; fall back to the cap regardless.
        self.current.next().unwrap_or(self.max)
    }

    /// Starts the schedule again from `min`.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

/// How long failed dials of a link that never came up are logged quietly: a comm server
/// started a moment before its coordinator should not warn.
pub const QUIET_FOR: Duration = Duration::from_secs(10);

/// How long a link must have been up for its loss to count as a new incident: the first
/// redial then goes at once and the backoff starts again from `min`. A link lost sooner
/// (flapping: refused right after its handshake) keeps the backoff growing.
pub const STABLE_AFTER: Duration = Duration::from_secs(5);

/// What one failed dial means, and so how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first failure after the link was up (or at start): `info`.
    First,
    /// A later one within [`QUIET_FOR`] of the first: `debug`.
    Early,
    /// Failing for longer than [`QUIET_FOR`]: `warn`, every attempt.
    Persisting,
    /// The other side refused this process's credentials: `error`, and the slow retry, since
    /// only an operator can fix it.
    Refused,
}

/// Redialing one link: the backoff schedule, plus what to say about each failure.
#[derive(Debug)]
pub struct Redial {
    what: String,
    backoff: Backoff,
    refused_retry: Duration,
    failing_since: Option<Instant>,
}

impl Redial {
    /// Redials `what` (e.g. "the coordinator") with backoff from `min` to `max`, and every
    /// `refused_retry` while it refuses the credentials.
    pub fn new(
        what: impl Into<String>,
        min: Duration,
        max: Duration,
        refused_retry: Duration,
    ) -> Self {
        Self {
            what: what.into(),
            backoff: Backoff::new(min, max),
            refused_retry,
            failing_since: None,
        }
    }

    /// The delay before redialing a link that came up at `up_since` and has just ended (at
    /// `now`). After a stable link ([`STABLE_AFTER`]): none, and the backoff starts again from
    /// `min`; a restarted coordinator is found again as soon as it listens. After a short-lived
    /// one: the next step of the backoff, which keeps growing while the link flaps.
    pub fn lost(&mut self, up_since: Instant, now: Instant) -> Duration {
        self.failing_since = None;
        if now.saturating_duration_since(up_since) >= STABLE_AFTER {
            self.backoff.reset();
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        }
    }

    /// The other side answered (the link may still fail its handshake): the next failure to
    /// reach it starts a new streak, logged as a first one, but the backoff keeps growing.
    pub fn reached(&mut self) {
        self.failing_since = None;
    }

    /// Classifies a failure at `now`; `refused` when the other side refused the credentials.
    pub fn classify(&mut self, now: Instant, refused: bool) -> Failure {
        if refused {
            return Failure::Refused;
        }
        match self.failing_since {
            None => {
                self.failing_since = Some(now);
                Failure::First
            }
            Some(since) if now.duration_since(since) < QUIET_FOR => Failure::Early,
            Some(_) => Failure::Persisting,
        }
    }

    /// Logs a failed dial as [`Redial::classify`] says and returns the delay before the next.
    pub fn failed(&mut self, error: &DialError) -> Duration {
        let refused = error.refusal_code() == Some(ErrorCode::Unauthenticated);
        let failure = self.classify(Instant::now(), refused);
        let what = &self.what;
        match failure {
            Failure::First => tracing::info!(%error, "{what} is not reachable yet; retrying"),
            Failure::Early => tracing::debug!(%error, "{what} is still not reachable; retrying"),
            Failure::Persisting => {
                let secs = self.failing_since.map_or(0, |s| s.elapsed().as_secs());
                tracing::warn!(%error, "cannot reach {what} for {secs} s; retrying");
            }
            Failure::Refused => {
                tracing::error!(
                    %error,
                    "{what} refused this server's credentials: wrong cluster secret \
                     (RELAYMESH_CLUSTER_SECRET must be the same on every coordinator and comm \
                     server) or an identity key it does not trust; retrying every {}",
                    spoken(self.refused_retry)
                );
                return self.refused_retry;
            }
        }
        self.backoff.next_delay()
    }

    /// The delay before redialing after a link that had been up ended.
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }
}

/// A duration as a person would say it in a log line: `30 s`, `250 ms`.
pub fn spoken(d: std::time::Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut b = Backoff::new(min, max);
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let step = (min * 2u32.pow(i as u32)).min(max);
            assert!(
                *d >= step && *d <= step * 2,
                "attempt {i}: {d:?} not in [{step:?}, {:?}]",
                step * 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= min * 2);
    }

    #[test]
    fn jitter_spreads_servers_that_start_together() {
        let firsts: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).next_delay())
            .collect();
        assert!(firsts.len() > 10, "first delays barely differ: {firsts:?}");
    }

    #[test]
    fn failures_are_quiet_at_first_loud_when_they_last_and_refusals_always() {
        let ms = Duration::from_millis;
        let mut r = Redial::new("the coordinator", ms(10), ms(80), Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(r.classify(t0, false), Failure::First);
        assert_eq!(r.classify(t0 + ms(500), false), Failure::Early);
        assert_eq!(r.classify(t0 + QUIET_FOR, false), Failure::Persisting);
        assert_eq!(r.classify(t0 + QUIET_FOR, true), Failure::Refused);
        r.lost(t0, t0 + QUIET_FOR * 2);
        assert_eq!(r.classify(t0 + QUIET_FOR * 2, false), Failure::First);
    }

    #[test]
    fn a_stable_link_is_redialed_at_once_and_a_flapping_one_backs_off() {
        let ms = Duration::from_millis;
        let mut r = Redial::new("the coordinator", ms(100), ms(500), Duration::from_secs(30));
        let t0 = Instant::now();
        // Grown by failures before the link came up...
        for _ in 0..6 {
            r.next_delay();
        }
        // ...then up for a while and lost: at once, and from the start again.
        assert_eq!(r.lost(t0, t0 + STABLE_AFTER), Duration::ZERO);
        assert!(r.next_delay() <= ms(200));
        // Up for a moment each time: the delays grow to the cap, never zero.
        let flaps: Vec<Duration> = (0..6).map(|_| r.lost(t0, t0 + ms(50))).collect();
        assert!(flaps.iter().all(|d| *d >= ms(200)), "{flaps:?}");
        assert!(flaps[5] >= ms(500), "{flaps:?}");
    }

    #[test]
    fn a_refusal_waits_the_slow_retry() {
        let ms = Duration::from_millis;
        let mut r = Redial::new("the coordinator", ms(10), ms(80), Duration::from_secs(30));
        let refused = DialError::Refused {
            url: "ws://a:1/v1/servers".into(),
            status: axum::http::StatusCode::UNAUTHORIZED,
            message: Some((ErrorCode::Unauthenticated, "wrong secret".into())),
        };
        assert_eq!(r.failed(&refused), Duration::from_secs(30));
        let unreachable = DialError::Timeout("ws://a:1".into());
        assert!(r.failed(&unreachable) <= ms(20));
    }
}
