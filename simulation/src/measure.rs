//! Measuring at the receiver.
//!
//! Every payload starts with a 24-byte header: send time (ns since the Unix epoch, so generator
//! processes on one host, or on NTP-synchronised hosts, share the clock), publisher id, sequence
//! number and a hash of the publisher's comm server id (so a receiver can tell a message that
//! crossed servers). Each receiver keeps, per publisher, a bitmap of the sequence numbers seen,
//! which gives delivered, duplicate and out-of-order counts exactly, and records one-way latency
//! in an HdrHistogram for the run and in a coarser one per timeline slot for the plot.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut as _, Bytes, BytesMut};
use hdrhistogram::Histogram;
use relaymesh_net::sync::lock;
use serde::{Deserialize, Serialize};

/// Bytes of measurement header at the start of every payload.
pub(crate) const HEADER: usize = 24;
/// Highest latency (µs) the histograms hold exactly; larger values count as this (an hour).
const MAX_US: u64 = 3_600_000_000;

/// Nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A stable 32-bit hash of a server id (FNV-1a), carried in the header.
pub(crate) fn server_hash(server_id: &str) -> u32 {
    server_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A payload of `size` bytes (at least [`HEADER`]) stamped now.
pub(crate) fn payload(publisher: u32, seq: u64, server: u32, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(HEADER));
    buf.put_u64(now_ns());
    buf.put_u32(publisher);
    buf.put_u64(seq);
    buf.put_u32(server);
    buf.resize(size.max(HEADER), 0);
    buf.freeze()
}

/// The header of a received payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) sent_ns: u64,
    pub(crate) publisher: u32,
    pub(crate) seq: u64,
    pub(crate) server: u32,
}

impl Header {
    pub(crate) fn parse(payload: &[u8]) -> Option<Self> {
        let h = payload.get(..HEADER)?;
        Some(Self {
            sent_ns: u64::from_be_bytes(h[0..8].try_into().ok()?),
            publisher: u32::from_be_bytes(h[8..12].try_into().ok()?),
            seq: u64::from_be_bytes(h[12..20].try_into().ok()?),
            server: u32::from_be_bytes(h[20..24].try_into().ok()?),
        })
    }
}

/// A latency histogram in microseconds, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds are valid")
}

/// A cheaper histogram (2 significant digits) for one timeline slot.
fn slot_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("constant bounds are valid")
}

/// Latency over time: one histogram per slot of receive time since the run started. Receivers
/// keep their current slot to themselves and merge it here when they move on, so this lock is
/// taken a few times per second per receiver, not per message.
#[derive(Debug)]
pub(crate) struct Timeline {
    pub(crate) start_ns: u64,
    pub(crate) slot: Duration,
    slots: Mutex<Vec<Histogram<u64>>>,
}

impl Timeline {
    pub(crate) fn new(start_ns: u64, slot: Duration) -> Self {
        Self {
            start_ns,
            slot: slot.max(Duration::from_millis(10)),
            slots: Mutex::new(Vec::new()),
        }
    }

    fn slot_of(&self, at_ns: u64) -> usize {
        let slot_ns = u64::try_from(self.slot.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        usize::try_from(at_ns.saturating_sub(self.start_ns) / slot_ns).unwrap_or(usize::MAX)
    }

    fn merge(&self, slot: usize, h: &Histogram<u64>) {
        let mut slots = lock(&self.slots);
        // A clock step could put a slot absurdly far out; cap the timeline at a day of slots.
        if slot > 86_400 * 100 {
            return;
        }
        if slots.len() <= slot {
            slots.resize_with(slot + 1, slot_histogram);
        }
        let _ = slots[slot].add(h);
    }

    /// The slots so far.
    pub(crate) fn take(&self) -> Vec<Histogram<u64>> {
        std::mem::take(&mut *lock(&self.slots))
    }
}

/// Per publisher: sequence numbers seen (a bitmap) and the highest.
#[derive(Debug, Default)]
struct Track {
    bits: Vec<u64>,
    highest: Option<u64>,
}

/// What one receiver saw.
#[derive(Debug)]
pub(crate) struct Tally {
    tracks: HashMap<u32, Track>,
    pub(crate) counts: Counts,
    pub(crate) latency: Histogram<u64>,
    slot: usize,
    slot_latency: Histogram<u64>,
}

/// Counters that add up across receivers and generator processes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) cross_server: u64,
    /// Sum of the `count`s in `Dropped` notices from servers.
    pub(crate) dropped_reported: u64,
    /// Times a client lost its server (and reconnected).
    pub(crate) disconnects: u64,
    /// Payloads without a valid header (another program publishing on the topic).
    pub(crate) foreign: u64,
}

impl Counts {
    pub(crate) fn add(&mut self, o: &Self) {
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.cross_server += o.cross_server;
        self.dropped_reported += o.dropped_reported;
        self.disconnects += o.disconnects;
        self.foreign += o.foreign;
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            tracks: HashMap::new(),
            counts: Counts::default(),
            latency: histogram(),
            slot: 0,
            slot_latency: slot_histogram(),
        }
    }
}

impl Tally {
    /// Records one received payload; returns whether it was a first delivery.
    pub(crate) fn record(&mut self, payload: &[u8], my_server: u32, timeline: &Timeline) -> bool {
        let Some(h) = Header::parse(payload) else {
            self.counts.foreign += 1;
            return false;
        };
        let track = self.tracks.entry(h.publisher).or_default();
        let Ok(word) = usize::try_from(h.seq / 64) else {
            self.counts.foreign += 1;
            return false;
        };
        // A corrupt sequence number must not make the bitmap allocate gigabytes.
        if word > 1 << 24 {
            self.counts.foreign += 1;
            return false;
        }
        if word >= track.bits.len() {
            track.bits.resize(word + 1, 0);
        }
        let bit = 1u64 << (h.seq % 64);
        if track.bits[word] & bit != 0 {
            self.counts.duplicates += 1;
            return false;
        }
        track.bits[word] |= bit;
        if track.highest.is_some_and(|top| h.seq < top) {
            self.counts.out_of_order += 1;
        }
        track.highest = Some(track.highest.map_or(h.seq, |top| top.max(h.seq)));
        self.counts.delivered += 1;
        if h.server != my_server {
            self.counts.cross_server += 1;
        }
        let now = now_ns();
        let us = (now.saturating_sub(h.sent_ns) / 1_000).max(1);
        self.latency.saturating_record(us);
        let slot = timeline.slot_of(now);
        if slot != self.slot {
            self.flush(timeline);
            self.slot = slot;
        }
        self.slot_latency.saturating_record(us);
        true
    }

    /// Hands the current slot to the timeline.
    pub(crate) fn flush(&mut self, timeline: &Timeline) {
        if !self.slot_latency.is_empty() {
            timeline.merge(self.slot, &self.slot_latency);
            self.slot_latency.reset();
        }
    }
}

/// A histogram as `(value, count)` pairs, to ship between generator processes.
pub(crate) fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `(value, count)` pairs into `h`.
pub(crate) fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        let _ = h.record_n(value.clamp(1, MAX_US), count);
    }
}

/// `p` (0–100) of `h`, 0 when empty.
pub(crate) fn pct(h: &Histogram<u64>, p: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_percentile(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(publisher: u32, seq: u64, server: u32) -> Bytes {
        payload(publisher, seq, server, 100)
    }

    #[test]
    fn header_round_trips() {
        let p = payload(7, 42, 9, 10);
        assert_eq!(p.len(), HEADER);
        let h = Header::parse(&p).unwrap();
        assert_eq!((h.publisher, h.seq, h.server), (7, 42, 9));
        assert!(Header::parse(&p[..HEADER - 1]).is_none());
    }

    #[test]
    fn tally_counts_duplicates_reordering_and_crossings() {
        let timeline = Timeline::new(now_ns(), Duration::from_millis(100));
        let mut t = Tally::default();
        for (seq, server) in [(0, 1), (2, 1), (1, 2), (2, 1), (3, 2)] {
            t.record(&stamped(5, seq, server), 1, &timeline);
        }
        t.record(b"not ours", 1, &timeline);
        assert_eq!(
            t.counts,
            Counts {
                delivered: 4,
                duplicates: 1,
                out_of_order: 1,
                cross_server: 2,
                foreign: 1,
                ..Counts::default()
            }
        );
        assert_eq!(t.latency.len(), 4);
        t.flush(&timeline);
        assert_eq!(timeline.take().iter().map(Histogram::len).sum::<u64>(), 4);
    }

    #[test]
    fn absurd_sequence_numbers_are_refused_not_allocated() {
        let timeline = Timeline::new(now_ns(), Duration::from_millis(100));
        let mut t = Tally::default();
        assert!(!t.record(&stamped(1, u64::MAX - 1, 0), 0, &timeline));
        assert_eq!(t.counts.foreign, 1);
    }

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut h = histogram();
        for v in [1, 10, 100, 1_000, 10_000, 123_456] {
            h.record(v).unwrap();
        }
        let mut back = histogram();
        add_pairs(&mut back, &to_pairs(&h));
        assert_eq!(back.len(), h.len());
        assert!(back.equivalent(back.max(), h.max()));
        assert!(back.equivalent(pct(&back, 50.0), pct(&h, 50.0)));
        assert_eq!(pct(&histogram(), 99.0), 0);
    }
}
