//! Reconnect backoff: capped exponential delays with jitter, from the `backon` crate.
//!
//! Links that must come back on their own (comm server -> coordinator, peer links, the client
//! library's server link) wait `min`, then twice that, and so on up to `max`, each step plus a
//! random jitter of up to 100 % of the step so that a restarted coordinator is not hit by every
//! server at the same instant. The schedule never ends; it restarts after a link has come up.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

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
}
