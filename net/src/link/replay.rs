//! A replay buffer: the last data messages a link sent, by position in its stream, so that what
//! a broken link may have lost can be sent again on the next one.
//!
//! Positions count the data stream as the receiver counts it: one per message written, and `n`
//! for a notice that `n` were dropped. A receiver that got everything up to position `p` (its
//! own count) is owed every held message after `p`. The buffer is bounded in bytes and in age;
//! what falls out of it can no longer be replayed, only reported.
//!
//! The link's writer owns the buffer while the link is up (no lock on the data path) and hands
//! it over in [`WriterEnd::replay`](crate::link::WriterEnd::replay); after that its owner may
//! keep [`Replay::hold`]ing messages routed to the link while it is down.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::backlog::now_ms;

/// How much a replay buffer keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// Bytes of messages held at most (the oldest go first).
    pub bytes: usize,
    /// Messages older than this are not replayed.
    pub age: Duration,
}

/// One held message.
#[derive(Debug)]
struct Held {
    /// Its position in the stream (1 is the first).
    position: u64,
    /// [`now_ms`] when it was written or held.
    at_ms: u64,
    message: Bytes,
}

/// The last messages of one link's data stream, bounded by [`ReplayLimits`].
#[derive(Debug)]
pub struct Replay {
    limits: ReplayLimits,
    held: VecDeque<Held>,
    bytes: usize,
    /// Positions given out so far.
    positions: u64,
}

impl Replay {
    /// An empty buffer.
    pub fn new(limits: ReplayLimits) -> Self {
        Self {
            limits,
            held: VecDeque::new(),
            bytes: 0,
            positions: 0,
        }
    }

    /// Positions given out so far: the messages written, held or skipped.
    pub fn positions(&self) -> u64 {
        self.positions
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Records a message written at `now` (a [`now_ms`] reading) at the next position, and
    /// hands what no longer fits, oldest first, to `evicted`.
    pub fn written(&mut self, message: Bytes, now: u64, evicted: impl FnMut(Bytes)) {
        self.positions += 1;
        self.bytes += message.len();
        self.held.push_back(Held {
            position: self.positions,
            at_ms: now,
            message,
        });
        self.evict(now, evicted);
    }

    /// Keeps a message that was routed to the link but not written (it was still queued when
    /// the link ended, or the link is down) at the next position; see [`Replay::written`].
    pub fn hold(&mut self, message: Bytes, evicted: impl FnMut(Bytes)) {
        self.written(message, now_ms(), evicted);
    }

    /// Counts `n` positions with nothing to hold: messages the receiver was told were dropped.
    pub fn skip(&mut self, n: u64) {
        self.positions += n;
    }

    /// Appends `later` (held after this buffer's messages) at the following positions.
    /// Returns what no longer fits.
    pub fn append(&mut self, later: Replay, mut evicted: impl FnMut(Bytes)) {
        let now = now_ms();
        for held in later.held {
            self.positions += 1;
            self.bytes += held.message.len();
            self.held.push_back(Held {
                position: self.positions,
                ..held
            });
            self.evict(now, &mut evicted);
        }
    }

    /// Takes every message after position `received`, in order, that is not older than the
    /// age limit, leaving the buffer empty. Returns them and how many held messages were too
    /// old.
    pub fn take_after(&mut self, received: u64) -> (Vec<Bytes>, u64) {
        let now = now_ms();
        let mut stale = 0;
        let age = duration_ms(self.limits.age);
        let mut out = Vec::new();
        for held in self.held.drain(..) {
            if held.position <= received {
                continue;
            }
            if now.saturating_sub(held.at_ms) > age {
                stale += 1;
            } else {
                out.push(held.message);
            }
        }
        self.bytes = 0;
        (out, stale)
    }

    /// Drops the oldest messages while over the byte limit, and those past the age limit.
    fn evict(&mut self, now: u64, mut evicted: impl FnMut(Bytes)) {
        let age = duration_ms(self.limits.age);
        while let Some(oldest) = self.held.front() {
            if self.bytes <= self.limits.bytes && now.saturating_sub(oldest.at_ms) <= age {
                return;
            }
            if let Some(held) = self.held.pop_front() {
                self.bytes -= held.message.len();
                evicted(held.message);
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(bytes: usize) -> ReplayLimits {
        ReplayLimits {
            bytes,
            age: Duration::from_secs(60),
        }
    }

    fn msg(i: u8) -> Bytes {
        Bytes::from(vec![i; 10])
    }

    #[test]
    fn replays_what_follows_the_receivers_count_in_order() {
        let mut r = Replay::new(limits(1000));
        let now = now_ms();
        for i in 1..=5 {
            r.written(msg(i), now, |_| panic!("nothing evicted"));
        }
        // Two were dropped and told: positions 6 and 7 hold nothing.
        r.skip(2);
        r.hold(msg(8), |_| panic!("nothing evicted"));
        assert_eq!(r.positions(), 8);
        let (again, stale) = r.take_after(3);
        assert_eq!(again, vec![msg(4), msg(5), msg(8)]);
        assert_eq!(stale, 0);
        assert!(r.is_empty());
    }

    #[test]
    fn the_oldest_go_when_over_the_byte_limit() {
        let mut r = Replay::new(limits(25));
        let now = now_ms();
        let mut evicted = Vec::new();
        r.written(msg(1), now, |m| evicted.push(m));
        r.written(msg(2), now, |m| evicted.push(m));
        assert!(evicted.is_empty());
        r.written(msg(3), now, |m| evicted.push(m));
        assert_eq!(evicted, vec![msg(1)]);
        assert_eq!(r.len(), 2);
        // Position 1 is gone: a receiver at 0 gets 2 and 3, and learns of the gap elsewhere.
        assert_eq!(r.take_after(0).0, vec![msg(2), msg(3)]);
    }

    #[test]
    fn old_messages_are_not_replayed() {
        let mut r = Replay::new(ReplayLimits {
            bytes: 1000,
            age: Duration::from_millis(100),
        });
        let now = now_ms();
        // One written a second before the next: evicted by it.
        let mut evicted = Vec::new();
        r.written(msg(1), now, |m| evicted.push(m));
        assert!(evicted.is_empty(), "evicted when the next one comes");
        r.written(msg(2), now + 1_000, |m| evicted.push(m));
        assert_eq!(evicted, vec![msg(1)]);
        // Held, but aged by the time it is taken: counted, not replayed.
        let mut r = Replay::new(ReplayLimits {
            bytes: 1000,
            age: Duration::ZERO,
        });
        let then = now_ms();
        r.written(msg(3), then, |_| {});
        while now_ms() == then {
            std::hint::spin_loop();
        }
        let (again, stale) = r.take_after(0);
        assert!(again.is_empty());
        assert_eq!(stale, 1);
    }

    #[test]
    fn appended_messages_follow() {
        let mut r = Replay::new(limits(1000));
        let now = now_ms();
        r.written(msg(1), now, |_| {});
        let mut later = Replay::new(limits(1000));
        later.hold(msg(2), |_| {});
        r.append(later, |_| panic!("nothing evicted"));
        assert_eq!(r.positions(), 2);
        assert_eq!(r.take_after(1).0, vec![msg(2)]);
    }
}
