//! Measuring at the receiver.
//!
//! Every payload starts with a 24-byte header: send time (ns since the Unix epoch, so generator
//! processes on one host, or on NTP-synchronised hosts, share the clock), publisher id, sequence
//! number and a hash of the publisher's comm server id (so a receiver can tell a message that
//! crossed servers). Each receiver keeps, per publisher, a bitmap of the sequence numbers seen,
//! which gives delivered, duplicate and out-of-order counts exactly, and records one-way latency
//! in an HdrHistogram for the run and in one per timeline slot for the plot.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The send stamp of a message that goes out `late` (by the monotonic clock) after it was due,
/// at wall-clock time `now_ns`: the time it was due, plus at most `slack_ns`. Only the lateness
/// comes from the monotonic clock, never a wall-clock time taken at the start of the run: a
/// wall clock that runs fast or slow against the monotonic one (thousands of ppm on some VMs)
/// would otherwise show up as latency growing with the length of the run.
pub(crate) fn stamp(now_ns: u64, late: Duration, slack_ns: u64) -> u64 {
    let late_ns = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
    now_ns.saturating_sub(late_ns.saturating_sub(slack_ns))
}

/// A stable 32-bit hash of a server id (FNV-1a), carried in the header.
pub(crate) fn server_hash(server_id: &str) -> u32 {
    server_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A payload of `size` bytes (at least [`HEADER`]) stamped with `sent_ns` (see
/// `Publisher::run` for why that is not always the time it went out).
pub(crate) fn payload(publisher: u32, seq: u64, server: u32, size: usize, sent_ns: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(HEADER));
    buf.put_u64(sent_ns);
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

/// A latency histogram in microseconds. Two significant digits (1 % resolution) keep it at
/// about 26 KB, which matters with one per receiver; three would cost eight times that.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("constant bounds are valid")
}

/// Latency over time: one histogram per slot of receive time since the run started. Receivers
/// keep their current slot to themselves and merge it here when they move on, so this lock is
/// taken a few times per second per receiver, not per message.
#[derive(Debug)]
pub(crate) struct Timeline {
    start: Instant,
    pub(crate) slot: Duration,
    /// Slots kept; later receptions go into the last one.
    max_slots: usize,
    slots: Mutex<Vec<Histogram<u64>>>,
}

impl Timeline {
    /// A timeline from now, in slots of `slot`, long enough for `span` (twice over).
    pub(crate) fn new(slot: Duration, span: Duration) -> Self {
        let slot = slot.max(Duration::from_millis(10));
        Self {
            start: Instant::now(),
            slot,
            max_slots: (span.as_secs_f64() / slot.as_secs_f64() * 2.0).ceil() as usize + 10,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn slot_now(&self) -> usize {
        let slot = self.start.elapsed().as_nanos() / self.slot.as_nanos().max(1);
        usize::try_from(slot)
            .unwrap_or(usize::MAX)
            .min(self.max_slots - 1)
    }

    fn merge(&self, slot: usize, h: &Histogram<u64>) {
        let mut slots = lock(&self.slots);
        if slots.len() <= slot {
            slots.resize_with(slot + 1, histogram);
        }
        let _ = slots[slot].add(h);
    }

    /// The slots so far.
    pub(crate) fn take(&self) -> Vec<Histogram<u64>> {
        std::mem::take(&mut *lock(&self.slots))
    }
}

/// Per publisher: sequence numbers seen (a bitmap), the highest, and where the stream skipped.
#[derive(Debug, Default)]
struct Track {
    bits: Vec<u64>,
    highest: Option<u64>,
    /// The highest's send stamp and arrival.
    last: Option<Arrival>,
    /// Every jump past the highest, in order (at most [`MAX_GAPS`]).
    gaps: Vec<Gap>,
    /// Sequence numbers that arrived only after the drain ([`Tally::record_late`]).
    late: HashSet<u64>,
}

impl Track {
    fn has(&self, seq: u64) -> bool {
        usize::try_from(seq / 64)
            .ok()
            .and_then(|word| self.bits.get(word))
            .is_some_and(|w| w & (1u64 << (seq % 64)) != 0)
    }

    /// Late arrivals in `from..to`.
    fn late_in(&self, from: u64, to: u64) -> u64 {
        self.late.iter().filter(|&&s| from <= s && s < to).count() as u64
    }

    /// Distinct sequence numbers below `end` received.
    fn received_below(&self, end: u64) -> u64 {
        let full = usize::try_from(end / 64).unwrap_or(usize::MAX);
        let mut n: u64 = self
            .bits
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if let Some(w) = self.bits.get(full) {
            n += u64::from((w & ((1u64 << (end % 64)) - 1)).count_ones());
        }
        n
    }

    /// Notes that `seq`, sent at `sent_ns`, arrived at `now` above the highest so far.
    fn advance(&mut self, seq: u64, sent_ns: u64, now: u64) {
        let next = self.highest.map_or(0, |top| top + 1);
        if seq > next {
            let full = self.gaps.len() >= MAX_GAPS;
            match self.gaps.last_mut() {
                // Past the limit the last gap grows over what arrived since: its count stays
                // exact (the bitmap says what is missing), its time window only widens.
                Some(gap) if full => {
                    gap.last = seq - 1;
                    gap.after_ns = now;
                }
                _ => self.gaps.push(Gap {
                    first: next,
                    last: seq - 1,
                    before: self.last,
                    after_ns: now,
                }),
            }
        }
        self.highest = Some(seq);
        self.last = Some(Arrival {
            sent_ns,
            at_ns: now,
        });
    }
}

/// A message's send stamp and the receiver's clock when it arrived (both ns on the stamps'
/// clock, [`now_ns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    pub(crate) sent_ns: u64,
    pub(crate) at_ns: u64,
}

/// Sequence numbers a publisher's stream skipped at one receiver: `first..=last` had not
/// arrived when a later one did (some may have arrived out of order since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) first: u64,
    pub(crate) last: u64,
    /// The message before the gap; `None` when the gap starts the stream.
    pub(crate) before: Option<Arrival>,
    /// When the message after the gap arrived; `u64::MAX` when none did (the gap ends it).
    pub(crate) after_ns: u64,
}

/// Gaps kept per publisher and receiver; past this the last one absorbs the rest.
const MAX_GAPS: usize = 1024;
/// Late arrivals kept per publisher and receiver.
const MAX_LATE: usize = 1 << 20;

/// Largest forward jump in one publisher's sequence numbers that is believed; anything further
/// is a corrupt or foreign header and must not make the bitmap allocate.
const MAX_SEQ_JUMP: u64 = 1 << 24;

/// What one receiver saw.
#[derive(Debug)]
pub(crate) struct Tally {
    tracks: HashMap<u32, Track>,
    pub(crate) counts: Counts,
    /// When this receiver lost its server ([`now_ns`] at each `Disconnected` event).
    pub(crate) disconnected_at: Vec<u64>,
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
    /// Of `dropped_reported`, the `upstream` part: lost between servers, not in the receiver's
    /// own queue.
    #[serde(default)]
    pub(crate) dropped_upstream: u64,
    /// Times a client lost its server (and reconnected).
    pub(crate) disconnects: u64,
    /// Times a client was asked to move (its server drained) and moved, make before break.
    #[serde(default)]
    pub(crate) moves: u64,
    /// Payloads without a valid header (another program publishing on the topic).
    pub(crate) foreign: u64,
    /// Messages from a publisher (or on a topic) this receiver did not subscribe to.
    pub(crate) misrouted: u64,
    /// Subscriptions a new server refused to restore after a reconnect.
    pub(crate) refused: u64,
    /// Messages delivered by recoveries after reconnects (`Recovered` events; topics that keep
    /// history).
    #[serde(default)]
    pub(crate) recovered: u64,
    /// Recoveries that could not reach back far enough (`RecoveryGap` events), the messages
    /// they said were gone, and how many of them could not say how many.
    #[serde(default)]
    pub(crate) recovery_gaps: u64,
    #[serde(default)]
    pub(crate) recovery_gap_missed: u64,
    #[serde(default)]
    pub(crate) recovery_gap_unknown: u64,
}

impl Counts {
    pub(crate) fn add(&mut self, o: &Self) {
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.cross_server += o.cross_server;
        self.dropped_reported += o.dropped_reported;
        self.dropped_upstream += o.dropped_upstream;
        self.disconnects += o.disconnects;
        self.moves += o.moves;
        self.foreign += o.foreign;
        self.misrouted += o.misrouted;
        self.refused += o.refused;
        self.recovered += o.recovered;
        self.recovery_gaps += o.recovery_gaps;
        self.recovery_gap_missed += o.recovery_gap_missed;
        self.recovery_gap_unknown += o.recovery_gap_unknown;
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            tracks: HashMap::new(),
            counts: Counts::default(),
            disconnected_at: Vec::new(),
            latency: histogram(),
            slot: 0,
            slot_latency: histogram(),
        }
    }
}

impl Tally {
    /// Records one received payload; returns whether it was a first delivery. `expects` says
    /// whether this receiver should hear from a publisher at all.
    pub(crate) fn record(
        &mut self,
        payload: &[u8],
        my_server: u32,
        timeline: &Timeline,
        expects: impl Fn(u32) -> bool,
    ) -> bool {
        self.record_at(payload, my_server, timeline, expects, now_ns())
    }

    /// [`Tally::record`] of a payload that arrived at `now` ([`now_ns`]).
    pub(crate) fn record_at(
        &mut self,
        payload: &[u8],
        my_server: u32,
        timeline: &Timeline,
        expects: impl Fn(u32) -> bool,
        now: u64,
    ) -> bool {
        self.record_inner(payload, my_server, Some(timeline), expects, now)
    }

    /// [`Tally::record`] without its latency: a message that was held on purpose (an offline
    /// node's inbox), whose time is measured otherwise.
    pub(crate) fn record_untimed(
        &mut self,
        payload: &[u8],
        my_server: u32,
        expects: impl Fn(u32) -> bool,
    ) -> bool {
        self.record_inner(payload, my_server, None, expects, now_ns())
    }

    fn record_inner(
        &mut self,
        payload: &[u8],
        my_server: u32,
        timeline: Option<&Timeline>,
        expects: impl Fn(u32) -> bool,
        now: u64,
    ) -> bool {
        let Some(h) = Header::parse(payload) else {
            self.counts.foreign += 1;
            return false;
        };
        if !expects(h.publisher) {
            self.counts.misrouted += 1;
            return false;
        }
        let track = self.tracks.entry(h.publisher).or_default();
        let believable = h.seq <= track.highest.unwrap_or(0).saturating_add(MAX_SEQ_JUMP);
        let Some(word) = usize::try_from(h.seq / 64).ok().filter(|_| believable) else {
            self.counts.foreign += 1;
            return false;
        };
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
        } else {
            track.advance(h.seq, h.sent_ns, now);
        }
        self.counts.delivered += 1;
        if h.server != my_server {
            self.counts.cross_server += 1;
        }
        let Some(timeline) = timeline else {
            return true;
        };
        let us = (now.saturating_sub(h.sent_ns) / 1_000).max(1);
        self.latency.saturating_record(us);
        let slot = timeline.slot_now();
        if slot != self.slot {
            self.flush(timeline);
            self.slot = slot;
        }
        self.slot_latency.saturating_record(us);
        true
    }

    /// Distinct sequence numbers below `sent` received from `publisher`: what arrived of what
    /// it published.
    #[cfg(test)]
    pub(crate) fn received_below(&self, publisher: u32, sent: u64) -> u64 {
        self.tracks
            .get(&publisher)
            .map_or(0, |track| track.received_below(sent))
    }

    /// Notes a payload that arrived after the drain: lost to the measurement (not counted as
    /// delivered), but shown to have been still on its way rather than gone.
    pub(crate) fn record_late(&mut self, payload: &[u8], expects: impl Fn(u32) -> bool) {
        let Some(h) = Header::parse(payload).filter(|h| expects(h.publisher)) else {
            return;
        };
        let track = self.tracks.entry(h.publisher).or_default();
        if !track.has(h.seq) && track.late.len() < MAX_LATE {
            track.late.insert(h.seq);
        }
    }

    /// How many of `publisher`'s first `sent` messages arrived only after the drain.
    pub(crate) fn late_below(&self, publisher: u32, sent: u64) -> u64 {
        self.tracks
            .get(&publisher)
            .map_or(0, |track| track.late_in(0, sent))
    }

    /// Where `publisher`'s first `sent` messages did not arrive: each gap (the last one up to
    /// `sent`, open-ended) with how many of it never arrived, not even late. Together with
    /// [`Tally::late_below`] they count `sent - received_below(publisher, sent)`.
    pub(crate) fn gaps(&self, publisher: u32, sent: u64) -> Vec<(Gap, u64)> {
        let Some(track) = self.tracks.get(&publisher) else {
            let whole = Gap {
                first: 0,
                last: sent.saturating_sub(1),
                before: None,
                after_ns: u64::MAX,
            };
            return if sent > 0 {
                vec![(whole, sent)]
            } else {
                Vec::new()
            };
        };
        let next = track.highest.map_or(0, |top| top + 1);
        let trailing = (next < sent).then_some(Gap {
            first: next,
            last: sent - 1,
            before: track.last,
            after_ns: u64::MAX,
        });
        track
            .gaps
            .iter()
            .copied()
            .chain(trailing)
            .filter(|gap| gap.first < sent)
            .map(|gap| {
                let end = gap.last.min(sent - 1) + 1;
                let received = track.received_below(end) - track.received_below(gap.first);
                let missing = (end - gap.first) - received - track.late_in(gap.first, end);
                (gap, missing)
            })
            .filter(|&(_, missing)| missing > 0)
            .collect()
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

    #[test]
    fn a_stamp_is_the_due_time_whatever_the_wall_clock_did_since_the_start() {
        let slack = 2_000_000;
        // On time, or late within the slack: now.
        assert_eq!(stamp(10_000_000_000, Duration::ZERO, slack), 10_000_000_000);
        assert_eq!(
            stamp(10_000_000_000, Duration::from_millis(1), slack),
            10_000_000_000
        );
        // Held back 50 ms: the delay counts, less the slack.
        assert_eq!(
            stamp(10_000_000_000, Duration::from_millis(50), slack),
            10_000_000_000 - 48_000_000
        );
        // A wall clock running 5 ms/s fast has moved 1.005 s while the monotonic one moved
        // 1 s: an on-time message 1 s into the run is still stamped now, with no 5 ms of
        // invented latency (a stamp of start + due, as before, would have had them).
        let start_wall = 1_000_000_000_000;
        let now_wall = start_wall + 1_005_000_000;
        assert_eq!(stamp(now_wall, Duration::ZERO, slack), now_wall);
    }

    fn stamped(publisher: u32, seq: u64, server: u32) -> Bytes {
        payload(publisher, seq, server, 100, now_ns())
    }

    fn timeline() -> Timeline {
        Timeline::new(Duration::from_millis(100), Duration::from_secs(1))
    }

    #[test]
    fn header_round_trips() {
        let p = payload(7, 42, 9, 10, 5);
        assert_eq!(p.len(), HEADER);
        let h = Header::parse(&p).unwrap();
        assert_eq!((h.sent_ns, h.publisher, h.seq, h.server), (5, 7, 42, 9));
        assert!(Header::parse(&p[..HEADER - 1]).is_none());
    }

    #[test]
    fn tally_counts_duplicates_reordering_crossings_and_strangers() {
        let timeline = timeline();
        let mut t = Tally::default();
        for (seq, server) in [(0, 1), (2, 1), (1, 2), (2, 1), (3, 2), (70, 1)] {
            t.record(&stamped(5, seq, server), 1, &timeline, |p| p == 5);
        }
        t.record(b"not ours", 1, &timeline, |_| true);
        t.record(&stamped(6, 0, 1), 1, &timeline, |p| p == 5);
        assert_eq!(
            t.counts,
            Counts {
                delivered: 5,
                duplicates: 1,
                out_of_order: 1,
                cross_server: 2,
                foreign: 1,
                misrouted: 1,
                ..Counts::default()
            }
        );
        // Of publisher 5's first 64 messages 0..=3 arrived; of its first 71, 70 as well.
        assert_eq!(t.received_below(5, 64), 4);
        assert_eq!(t.received_below(5, 71), 5);
        assert_eq!(t.received_below(5, 2), 2);
        assert_eq!(t.received_below(6, 10), 0);
        assert_eq!(t.latency.len(), 5);
        t.flush(&timeline);
        assert_eq!(timeline.take().iter().map(Histogram::len).sum::<u64>(), 5);
    }

    #[test]
    fn gaps_say_where_a_stream_skipped_and_how_much_is_still_missing() {
        let timeline = timeline();
        let mut t = Tally::default();
        // Sent at 100 × seq, arriving 7 ns later; 3 arrives late, out of order.
        for seq in [0, 1, 4, 5, 3, 9] {
            let p = payload(5, seq, 0, 24, 100 * seq);
            t.record_at(&p, 0, &timeline, |_| true, 100 * seq + 7);
        }
        let at = |seq: u64| {
            Some(Arrival {
                sent_ns: 100 * seq,
                at_ns: 100 * seq + 7,
            })
        };
        let gap = |first, last, before, after_ns| Gap {
            first,
            last,
            before,
            after_ns,
        };
        assert_eq!(
            t.gaps(5, 12),
            vec![
                (gap(2, 3, at(1), 407), 1),
                (gap(6, 8, at(5), 907), 3),
                (gap(10, 11, at(9), u64::MAX), 2),
            ]
        );
        assert_eq!(12 - t.received_below(5, 12), 1 + 3 + 2);
        // Only what was sent counts; a publisher never heard from is one open gap.
        assert_eq!(
            t.gaps(5, 7),
            vec![(gap(2, 3, at(1), 407), 1), (gap(6, 8, at(5), 907), 1)]
        );
        assert!(t.gaps(5, 2).is_empty());
        assert_eq!(t.gaps(6, 3), vec![(gap(0, 2, None, u64::MAX), 3)]);
        assert!(t.gaps(6, 0).is_empty());
    }

    #[test]
    fn late_arrivals_are_no_longer_missing_but_not_delivered() {
        let timeline = timeline();
        let mut t = Tally::default();
        for seq in [0, 3] {
            t.record_at(&payload(5, seq, 0, 24, 0), 0, &timeline, |_| true, 1);
        }
        // 1 and 5 come after the drain (1 twice); 3 again is no news; 6 was never expected.
        for seq in [1, 1, 3, 5, 6] {
            t.record_late(&payload(5, seq, 0, 24, 0), |p| p == 5);
        }
        t.record_late(&payload(7, 0, 0, 24, 0), |p| p == 5);
        assert_eq!(t.counts.delivered, 2);
        assert_eq!(t.late_below(5, 6), 2);
        assert_eq!(t.late_below(7, 6), 0);
        let missing: Vec<_> = t
            .gaps(5, 6)
            .iter()
            .map(|&(g, n)| (g.first, g.last, n))
            .collect();
        assert_eq!(missing, vec![(1, 2, 1), (4, 5, 1)]);
    }

    #[test]
    fn gaps_past_the_limit_widen_the_last_one() {
        let timeline = timeline();
        let mut t = Tally::default();
        let mut seq = 0;
        for _ in 0..MAX_GAPS + 10 {
            t.record_at(&payload(1, seq, 0, 24, 0), 0, &timeline, |_| true, seq);
            seq += 2;
        }
        let gaps = t.gaps(1, seq - 1);
        assert_eq!(gaps.len(), MAX_GAPS);
        assert_eq!(
            gaps.iter().map(|(_, n)| n).sum::<u64>(),
            (MAX_GAPS + 9) as u64
        );
        let (last, missing) = gaps[MAX_GAPS - 1];
        assert_eq!((last.last, last.after_ns, missing), (seq - 3, seq - 2, 10));
    }

    #[test]
    fn absurd_sequence_numbers_are_refused_not_allocated() {
        let timeline = timeline();
        let mut t = Tally::default();
        assert!(!t.record(&stamped(1, u64::MAX - 1, 0), 0, &timeline, |_| true));
        assert!(!t.record(&stamped(1, MAX_SEQ_JUMP + 1, 0), 0, &timeline, |_| true));
        assert!(t.record(&stamped(1, MAX_SEQ_JUMP, 0), 0, &timeline, |_| true));
        assert_eq!(t.counts.foreign, 2);
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
