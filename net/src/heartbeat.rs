//! Heartbeat watchdog for a link's reader loop.
//!
//! Every link closes a peer that has been silent for the heartbeat timeout (idle and half-open
//! connections). Resetting a timer on every frame would cost a timer-wheel update per message, so
//! the watchdog instead ticks at most every `timeout / 4` and notes the time of the last burst
//! heard: a link is declared dead after between `timeout` and `1.25 × timeout` of silence. The
//! same tick tells the link when to send its own heartbeat.
//!
//! Silence is measured on the clock, not in ticks, so a process that was stopped (SIGSTOP, a
//! suspended VM) sees, when it runs again, how long its links were silent: a burst that
//! arrives after the timeout has passed is refused rather than acted on. The other side gave
//! the link up by then (it uses the same timeout), and what it sent before is stale: a client
//! has sent its unconfirmed publishes again through another server.

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
    timeout: Duration,
    /// When the last burst (or control frame) arrived.
    last_heard: Instant,
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
        let now = Instant::now();
        let mut tick = tokio::time::interval_at(now + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            tick,
            period,
            timeout,
            last_heard: now,
            send_every,
            last_send: now,
        }
    }

    /// Records that a burst (or a control frame) arrived from the peer, once per burst: it
    /// reads the clock. `false` when the link had already been silent for longer than the
    /// timeout (this process was not running): the burst is stale and the link is dead.
    pub fn heard(&mut self) -> bool {
        let now = Instant::now();
        let fresh = now.duration_since(self.last_heard) <= self.timeout;
        self.last_heard = now;
        fresh
    }

    /// The link's own handler kept it from reading until now (it waited for room to hand a
    /// burst on): that time is not the peer's silence.
    pub fn handled(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Waits for the next tick and says what to do.
    pub async fn tick(&mut self) -> Beat {
        std::future::poll_fn(|cx| self.poll_tick(cx)).await
    }

    /// [`Watchdog::tick`] as a poll, for a wait that keeps no state of its own.
    pub fn poll_tick(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Beat> {
        std::task::ready!(self.tick.poll_tick(cx));
        std::task::Poll::Ready(self.beat())
    }

    /// What a tick that came now means.
    fn beat(&mut self) -> Beat {
        let now = Instant::now();
        if now.duration_since(self.last_heard) > self.timeout {
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
            assert!(w.heard());
            assert_ne!(w.tick().await, Beat::Expired);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_after_the_timeout_is_stale_even_before_a_tick() {
        let mut w = Watchdog::new(Duration::from_secs(4), Duration::from_secs(1));
        assert!(w.heard());
        // The process did not run for 10 s (no tick was handled meanwhile).
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            !w.heard(),
            "what arrives now was sent to a link the peer has given up"
        );
        // And a tick after such a pause expires at once, not after counting quiet ticks.
        let mut w = Watchdog::new(Duration::from_secs(4), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(w.tick().await, Beat::Expired);
    }
}
