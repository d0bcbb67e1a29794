//! A link's data queue and its backlog: how many frames and bytes are queued, what was dropped,
//! and whether the receiver has been stalled long enough to count as a slow consumer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use crate::queue;

/// The sending end of a link's data queue. The queue is unbounded; the link's counted
/// [`Backlog`] bounds it in frames and bytes (senders [`Backlog::reserve`] before sending).
pub type DataTx = queue::UnboundedSender<Bytes>;
/// The receiving end of a link's data queue, drained by [`run_writer`](crate::link::run_writer).
pub type DataRx = queue::Receiver<Bytes>;

/// A data queue; pair it with [`Backlog::counted`].
pub fn data_queue() -> (DataTx, DataRx) {
    queue::unbounded()
}

/// Milliseconds on a process-wide monotonic clock; only read on slow paths.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// The backlog of one link's data queue: bytes queued and frames dropped. Shared by the
/// senders (who check the byte budget and drop when the queue is full) and the link's writer
/// (who releases bytes as it writes, reports drops to the receiver and notices recovery).
///
/// The queue bounds it in frames; the byte budget bounds it in memory, so a queue of
/// large messages cannot hold `frames × max_frame_bytes`. Only *large* frames (over
/// `budget / capacity` bytes) are metered: small ones are bounded by the frame count alone to
/// at most another `budget`, and skipping them keeps the common small-message path free of a
/// counter shared between the senders' cores and the writer's.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Frames the queue holds at most when the backlog counts them ([`Backlog::counted`]);
    /// `usize::MAX` when the queue bounds itself.
    capacity: usize,
    queued_frames: AtomicUsize,
    budget: usize,
    large: usize,
    queued_bytes: AtomicUsize,
    /// This queue's own drops not yet told to the receiver.
    unreported: AtomicU64,
    /// Drops elsewhere (a peer server's) not yet told to the receiver; kept apart from the
    /// queue's own so the notice can say which is which ([`Unreported`]).
    upstream: AtomicU64,
    total: AtomicU64,
    /// [`now_ms`] of the first drop since the queue last ran empty; 0 when not stalled.
    stalled_since: AtomicU64,
}

impl Backlog {
    /// A backlog for a queue of `capacity` frames and a budget of `budget` bytes.
    pub fn new(capacity: usize, budget: usize) -> Self {
        Self {
            capacity: usize::MAX,
            budget,
            large: budget / capacity.max(1),
            ..Self::default()
        }
    }

    /// A backlog that also bounds the queue to `capacity` frames, for an unbounded queue
    /// ([`data_queue`]): offering a frame then costs two uncontended atomic additions, and a
    /// queue can take one item holding several frames ([`Backlog::reserve_n`]).
    pub fn counted(capacity: usize, budget: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            ..Self::new(capacity, budget)
        }
    }

    /// Frames queued now (counted backlogs; 0 for others): what a drop's queue held.
    pub fn queued_frames(&self) -> usize {
        self.queued_frames.load(Ordering::Relaxed)
    }

    /// Reserves room for a frame of `len` bytes about to be queued. `false` means the queue is
    /// full in frames (counted backlogs) or bytes; an empty queue always takes one frame,
    /// however large.
    #[inline]
    pub fn reserve(&self, len: usize) -> bool {
        self.reserve_n(len, 1)
    }

    /// Reserves room for `frames` frames of `len` bytes in all, queued as one item (a batch of
    /// pre-framed messages, [`DataBacklog::framed`]). All or nothing.
    #[inline]
    pub fn reserve_n(&self, len: usize, frames: usize) -> bool {
        if self.capacity != usize::MAX {
            let before = self.queued_frames.fetch_add(frames, Ordering::Relaxed);
            // An empty queue takes one item, however many frames it holds.
            if before > 0 && before + frames > self.capacity {
                self.queued_frames.fetch_sub(frames, Ordering::Relaxed);
                return false;
            }
        }
        if len <= self.large {
            return true;
        }
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > self.budget {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            if self.capacity != usize::MAX {
                self.queued_frames.fetch_sub(frames, Ordering::Relaxed);
            }
            return false;
        }
        true
    }

    /// Returns the room of a frame of `len` bytes (it was written, or never queued).
    #[inline]
    pub fn release(&self, len: usize) {
        self.release_n(len, 1);
    }

    /// Returns the room of an item reserved with [`Backlog::reserve_n`].
    #[inline]
    pub fn release_n(&self, len: usize, frames: usize) {
        if self.capacity != usize::MAX {
            self.queued_frames.fetch_sub(frames, Ordering::Relaxed);
        }
        if len > self.large {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Reserves room for `frames` frames of `len` bytes whatever the queue holds: messages
    /// replayed from a previous link, bounded by their own buffer.
    pub fn force(&self, len: usize, frames: usize) {
        if self.capacity != usize::MAX {
            self.queued_frames.fetch_add(frames, Ordering::Relaxed);
        }
        if len > self.large {
            self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// Records one dropped frame. Returns `true` when the queue has now been stalled (not run
    /// empty) for longer than `grace_ms` since the first drop: the receiver is a slow consumer.
    pub fn record_drop(&self, grace_ms: u64) -> bool {
        self.record_drops(1, grace_ms)
    }

    /// Records `n` dropped frames at once (a refused batch); see [`Backlog::record_drop`].
    pub fn record_drops(&self, n: u64, grace_ms: u64) -> bool {
        self.unreported.fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n, Ordering::Relaxed);
        let now = now_ms();
        match self
            .stalled_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => false,
            Err(since) => now.saturating_sub(since) > grace_ms,
        }
    }

    /// Counts `n` frames lost without a notice to the receiver (they were queued when the link
    /// broke).
    pub fn record_lost(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Tells the receiver, with the next notice, that it may have missed `n` messages dropped
    /// elsewhere (by a peer server). Not counted as this queue's own drops, and told apart from
    /// them ([`Unreported::upstream`]).
    pub fn report_upstream(&self, n: u64) {
        self.upstream.fetch_add(n, Ordering::Relaxed);
    }

    /// Frames dropped or lost over the link's life.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The drops not yet told to the receiver, now told. Called by the writer once per batch:
    /// each counter is only loaded (a shared cache line, no write) unless it has something.
    pub(crate) fn take_unreported(&self) -> Unreported {
        let take = |counter: &AtomicU64| match counter.load(Ordering::Relaxed) {
            0 => 0,
            _ => counter.swap(0, Ordering::Relaxed),
        };
        Unreported {
            own: take(&self.unreported),
            upstream: take(&self.upstream),
        }
    }

    pub(crate) fn drained(&self) {
        if self.stalled_since.load(Ordering::Relaxed) != 0 {
            self.stalled_since.store(0, Ordering::Relaxed);
        }
    }
}

/// Drops to tell the receiver about, by where they happened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unreported {
    /// Dropped from this queue ([`Backlog::record_drops`]).
    pub own: u64,
    /// Dropped elsewhere and passed on ([`Backlog::report_upstream`]): a peer server's loss.
    pub upstream: u64,
}

impl Unreported {
    /// Both together.
    pub fn total(&self) -> u64 {
        self.own + self.upstream
    }
}

/// How a writer accounts for its data queue.
#[derive(Debug, Clone)]
pub struct DataBacklog {
    /// The queue's backlog, shared with its senders.
    pub backlog: Arc<Backlog>,
    /// Encodes the frame that tells the receiver messages were dropped, this queue's own and
    /// those passed on from upstream.
    pub notice: fn(Unreported) -> Bytes,
    /// Data items are whole WebSocket frames, one or more ([`put_frame_header`](crate::wire::put_frame_header), [`framed`](crate::wire::framed)),
    /// written as they are: a batch of messages encoded once for many receivers. Otherwise
    /// each item is one message for the writer to frame.
    pub framed: bool,
    /// Keep the last messages written in a replay buffer this large (single messages only, not
    /// `framed`), handed back in [`WriterEnd::replay`](crate::link::WriterEnd::replay).
    pub replay: Option<super::replay::ReplayLimits>,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_counted_backlog_bounds_frames() {
        let b = Backlog::counted(2, 1 << 20);
        assert!(b.reserve(10));
        assert!(b.reserve(10));
        assert!(!b.reserve(10), "two frames queued");
        b.release(10);
        assert!(b.reserve(10));
        // A refusal for bytes gives the frame slot back.
        let b = Backlog::counted(4, 1000);
        assert!(b.reserve(900));
        assert!(!b.reserve(600));
        assert!(b.reserve(50));
        assert!(b.reserve(50));
        assert!(b.reserve(10));
        assert!(!b.reserve(10), "four frames queued");
        // A batch counts all its frames, and an empty queue takes any one batch.
        let b = Backlog::counted(10, 1 << 20);
        assert!(b.reserve_n(100, 8));
        assert!(!b.reserve_n(100, 3));
        b.release_n(100, 8);
        assert!(b.reserve_n(100, 30));
    }

    #[test]
    fn backlog_bounds_bytes_but_always_takes_one_frame() {
        // 10 frames, 1000 bytes: frames of 100 bytes or less are bounded by the count alone.
        let b = Backlog::new(10, 1000);
        for _ in 0..50 {
            assert!(b.reserve(100), "small frames are not metered");
        }
        assert!(b.reserve(800));
        assert!(!b.reserve(300), "over budget");
        assert!(b.reserve(200), "exactly at budget");
        b.release(800);
        b.release(200);
        b.release(100); // small: no effect
        assert!(b.reserve(5000), "an empty queue takes one oversized frame");
        assert!(!b.reserve(101));
    }

    #[test]
    fn backlog_reports_drops_and_detects_stalls() {
        let t = Backlog::new(16, 1 << 20);
        assert!(!t.record_drop(1_000));
        assert!(!t.record_drop(1_000));
        assert_eq!(
            t.take_unreported(),
            Unreported {
                own: 2,
                upstream: 0
            }
        );
        assert_eq!(t.take_unreported(), Unreported::default());
        assert_eq!(t.total(), 2);
        // A zero grace period: the second drop of a stall already exceeds it once time moves.
        t.drained();
        assert!(!t.record_drop(0));
        let start = now_ms();
        while now_ms() == start {
            std::hint::spin_loop();
        }
        assert!(t.record_drop(0));
        t.drained();
        assert!(!t.record_drop(0), "a drained queue starts a new stall");
    }

    #[test]
    fn upstream_drops_are_told_apart_from_the_queues_own() {
        let t = Backlog::new(16, 1 << 20);
        t.report_upstream(5);
        assert_eq!(
            t.take_unreported(),
            Unreported {
                own: 0,
                upstream: 5
            }
        );
        assert_eq!(t.total(), 0, "a peer's loss is not this queue's drop");
        t.record_drops(3, 1_000);
        t.report_upstream(4);
        t.report_upstream(1);
        let told = t.take_unreported();
        assert_eq!(
            told,
            Unreported {
                own: 3,
                upstream: 5
            }
        );
        assert_eq!(told.total(), 8);
        assert_eq!(t.take_unreported(), Unreported::default());
        assert_eq!(t.total(), 3);
    }
}
