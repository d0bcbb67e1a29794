//! What every driver's subscriber records: the 100-byte benchmark payload (due time, sequence,
//! publisher, step, phase), and a per-subscriber tally of deliveries, order and one-way latency.
//! The same code measures every system, so only the driver differs between them.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;

/// Payload size of every benchmark message (the README's benchmark method).
pub(crate) const PAYLOAD_BYTES: usize = 100;
/// Bytes of the header at the front of each payload.
const HEADER_BYTES: usize = 25;

/// Why a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Proves a subscription is live before a scenario starts; never measured.
    Probe = 0,
    /// Sent during a step's warm-up; not measured.
    Warmup = 1,
    /// Sent in a step's measured window.
    Measured = 2,
}

/// Nanoseconds since the first call in this process (publishers and subscribers share the
/// process, so one clock serves both ends).
pub(crate) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Builds a payload: due time (ns), sequence number, publisher, step and phase, zero-padded to
/// [`PAYLOAD_BYTES`].
pub(crate) fn payload(due_ns: u64, seq: u64, publisher: u32, step: u32, phase: Phase) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD_BYTES);
    b.put_u64_le(due_ns);
    b.put_u64_le(seq);
    b.put_u32_le(publisher);
    b.put_u32_le(step);
    b.put_u8(phase as u8);
    b.resize(PAYLOAD_BYTES, 0);
    b.freeze()
}

/// The header of a payload; `None` for anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) due_ns: u64,
    pub(crate) seq: u64,
    pub(crate) publisher: u32,
    pub(crate) step: u32,
    pub(crate) phase: u8,
}

impl Header {
    pub(crate) fn parse(p: &[u8]) -> Option<Self> {
        let h = p.get(..HEADER_BYTES)?;
        let u64_at = |i: usize| h.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
        let u32_at = |i: usize| h.get(i..i + 4)?.try_into().ok().map(u32::from_le_bytes);
        Some(Self {
            due_ns: u64_at(0)?,
            seq: u64_at(8)?,
            publisher: u32_at(16)?,
            step: u32_at(20)?,
            phase: h[24],
        })
    }
}

/// Latency histogram in microseconds, 1 µs to 60 s at two significant digits (1 % resolution,
/// about 26 KB, which matters with a thousand subscribers).
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// One subscriber's record of the step being measured.
#[derive(Debug)]
pub(crate) struct Tally {
    /// The step whose measured messages count.
    pub(crate) step: u32,
    /// Measured messages of `step` received.
    pub(crate) received: u64,
    /// Measured messages that arrived with a sequence number not above the last one seen from
    /// the same publisher (duplicates or reordering).
    pub(crate) out_of_order: u64,
    /// Measured messages of another step (late arrivals from a finished step).
    pub(crate) stray: u64,
    /// Probes received (any step).
    pub(crate) probes: u64,
    /// Last sequence number per publisher, `u64::MAX` for none yet.
    last_seq: Vec<u64>,
    /// One-way latency of the measured messages in µs: receive time minus due time.
    pub(crate) latency: Histogram<u64>,
}

impl Tally {
    pub(crate) fn new(step: u32) -> Self {
        Self {
            step,
            received: 0,
            out_of_order: 0,
            stray: 0,
            probes: 0,
            last_seq: Vec::new(),
            latency: histogram(),
        }
    }

    /// Records one delivered payload received at `now` (ns); payloads that are not benchmark
    /// messages are ignored.
    pub(crate) fn record(&mut self, payload: &[u8], now: u64) {
        let Some(h) = Header::parse(payload) else {
            return;
        };
        if h.phase == Phase::Probe as u8 {
            self.probes += 1;
            return;
        }
        if h.phase != Phase::Measured as u8 {
            return;
        }
        if h.step != self.step {
            self.stray += 1;
            return;
        }
        self.received += 1;
        let i = h.publisher as usize;
        if i >= self.last_seq.len() {
            // Publisher ids are dense and small (at most the scenario's publisher count).
            self.last_seq
                .resize(i.saturating_add(1).min(1 << 20), u64::MAX);
        }
        if let Some(last) = self.last_seq.get_mut(i) {
            if *last != u64::MAX && h.seq <= *last {
                self.out_of_order += 1;
            } else {
                *last = h.seq;
            }
        }
        self.latency
            .saturating_record((now.saturating_sub(h.due_ns) / 1000).max(1));
    }
}

/// A subscriber's tally, shared between its reader task and the step runner. The reader is the
/// only one locking it while a step runs, so the lock is uncontended.
pub(crate) type SharedTally = Arc<Mutex<Tally>>;

/// Locks a tally; a reader that panicked leaves its counts as they were.
pub(crate) fn lock(t: &SharedTally) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records `payload` into `tally` now.
pub(crate) fn record(tally: &SharedTally, payload: &[u8]) {
    let now = now_ns();
    lock(tally).record(payload, now);
}

/// Percentile of a microsecond histogram, in milliseconds.
pub(crate) fn pct_ms(h: &Histogram<u64>, p: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(p / 100.0) as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_is_100_bytes() {
        let p = payload(123, 7, 3, 9, Phase::Measured);
        assert_eq!(p.len(), PAYLOAD_BYTES);
        let h = Header::parse(&p).expect("header");
        assert_eq!(
            h,
            Header {
                due_ns: 123,
                seq: 7,
                publisher: 3,
                step: 9,
                phase: 2
            }
        );
        assert_eq!(Header::parse(&p[..10]), None);
    }

    #[test]
    fn tally_counts_only_measured_messages_of_its_step() {
        let mut t = Tally::new(2);
        t.record(&payload(0, 0, 0, 2, Phase::Warmup), 10);
        t.record(&payload(0, 1, 0, 2, Phase::Probe), 10);
        t.record(&payload(0, 2, 0, 1, Phase::Measured), 10);
        t.record(&payload(0, 3, 0, 2, Phase::Measured), 1_000_000);
        t.record(b"not ours", 10);
        assert_eq!((t.received, t.stray, t.probes), (1, 1, 1));
        assert_eq!(t.latency.len(), 1);
        assert!((pct_ms(&t.latency, 99.0) - 1.0).abs() < 0.01);
    }

    #[test]
    fn tally_flags_duplicates_and_reordering_per_publisher() {
        let mut t = Tally::new(1);
        for (publisher, seq) in [(0, 5), (1, 1), (0, 6), (0, 6), (1, 0), (0, 8)] {
            t.record(&payload(0, seq, publisher, 1, Phase::Measured), 1);
        }
        assert_eq!(t.received, 6);
        assert_eq!(t.out_of_order, 2);
    }
}
