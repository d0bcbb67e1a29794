//! Heartbeat watchdog for a link's reader loop.
//!
//! Every link closes a peer that has been silent for the heartbeat timeout (idle and half-open
//! connections). Resetting a timer on every frame would cost a timer-wheel update per message, so
//! the watchdog instead ticks at most every `timeout / 4` and counts ticks without traffic: a link
//! is declared dead after between `timeout` and `1.5 × timeout` of silence. The same tick tells
//! the link when to send its own heartbeat.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Ticks per timeout, at least.
const TICKS_PER_TIMEOUT: u32 = 4;

/// What a tick means for the link.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    /// Nothing to do.
    Quiet,
    /// Time to send this side's heartbeat (Ping or Load).
    Send,
    /// The peer has been silent for the timeout; close the link.
    Expired,
}

/// Tracks silence on a link and when to send heartbeats.
#[derive(Debug)]
pub struct Watchdog {
    tick: Interval,
    period: Duration,
    quiet_ticks: u32,
    expire_after: u32,
    send_every: Duration,
    last_send: Instant,
}

impl Watchdog {
    /// A watchdog that expires after `timeout` of silence and asks for a heartbeat every
    /// `send_every`.
    pub fn new(timeout: Duration, send_every: Duration) -> Self {
        let period = (timeout / TICKS_PER_TIMEOUT)
            .min(send_every)
            .max(Duration::from_millis(1));
        let expire_after = timeout.as_nanos().div_ceil(period.as_nanos()).max(1);
        let expire_after = u32::try_from(expire_after).unwrap_or(u32::MAX);
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            tick,
            period,
            quiet_ticks: 0,
            expire_after,
            send_every,
            last_send: Instant::now(),
        }
    }

    /// Records that something arrived from the peer. Cheap enough for every frame.
    #[inline]
    pub fn activity(&mut self) {
        self.quiet_ticks = 0;
    }

    /// Waits for the next tick and says what to do.
    pub async fn tick(&mut self) -> Beat {
        let now = self.tick.tick().await;
        self.quiet_ticks = self.quiet_ticks.saturating_add(1);
        if self.quiet_ticks > self.expire_after {
            return Beat::Expired;
        }
        if now.duration_since(self.last_send) + self.period / 2 >= self.send_every {
            self.last_send = now;
            return Beat::Send;
        }
        Beat::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_silence_and_not_with_traffic() {
        let start = Instant::now();
        let mut w = Watchdog::new(Duration::from_secs(4), Duration::from_secs(1));
        let mut sends = 0;
        loop {
            match w.tick().await {
                Beat::Send => sends += 1,
                Beat::Quiet => {}
                Beat::Expired => break,
            }
        }
        let silent = start.elapsed();
        assert!(
            silent >= Duration::from_secs(4) && silent <= Duration::from_secs(6),
            "{silent:?}"
        );
        assert!(sends >= 4, "{sends} heartbeats sent in {silent:?}");

        let mut w = Watchdog::new(Duration::from_secs(4), Duration::from_secs(1));
        for _ in 0..100 {
            w.activity();
            assert_ne!(w.tick().await, Beat::Expired);
        }
    }
}
