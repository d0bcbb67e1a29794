//! Loss by cause: every expected delivery that never arrived is put down to a cause the run can
//! prove, per receiver, in this order:
//!
//! 0. **late**: it did arrive, after the drain (the receiver reads on for a moment without
//!    counting deliveries, so what was still queued for it, and the `Dropped` notices queued
//!    behind it, are seen);
//! 1. **slow consumer**: the receiver was told of drops from its own server queue (`Dropped`,
//!    `count - upstream`), up to that many;
//! 2. **peer gap**: it was told of drops between servers (`Dropped.upstream`), up to that many;
//! 3. **server failure**: the message lies in a gap of its publisher's stream (between the last
//!    message that arrived before it and the first after) that spans a time the receiver or the
//!    publisher lost its server (a `Disconnected` event): delivery across a server failure is
//!    at most once; of those, the ones a recovery said were gone (**recovery gap**: the
//!    receiver got `RecoveryGap` events, up to the counts they gave, all of them when one could
//!    not say) are told apart;
//! 4. **unexplained**: the rest, which should be none.
//!
//! A notice names no messages, so the told counts go first to the lost messages no failure
//! window covers: the attribution leaves as little unexplained as the evidence allows.
//!
//! The windows compare times on the stamps' clock ([`now_ns`](crate::measure::now_ns)): a gap starts at the
//! arrival (for the receiver's disconnects) or the send stamp (for the publisher's) of the
//! message before it, and ends at the arrival of the message after it. A publisher's messages
//! that its dying server swallowed were sent after the last one that got through and before it
//! saw the disconnect; the first to arrive afterwards went through its next server.

use std::collections::HashMap;
use std::sync::Mutex;

use relaymesh_net::sync::lock;
use serde::{Deserialize, Serialize};

use crate::measure::{Gap, Tally};

/// Expected deliveries that never arrived, by cause (see the module's documentation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LostByCause {
    /// Covered by `Dropped` notices of the receiver's own queue's drops.
    pub(crate) slow_consumer: u64,
    /// Covered by `Dropped` notices of drops between servers (`upstream`).
    pub(crate) peer_gap: u64,
    /// In a gap that spans a server failure the receiver or the publisher saw, and not told
    /// by a recovery.
    pub(crate) server_failure: u64,
    /// In such a gap, and told: the receiver's recovery reported a gap (`RecoveryGap`).
    #[serde(default)]
    pub(crate) recovery_gap: u64,
    /// Arrived after the drain: still queued for a receiver slower than `--drain`.
    #[serde(default)]
    pub(crate) late: u64,
    /// None of the above.
    pub(crate) unexplained: u64,
}

impl LostByCause {
    pub(crate) fn total(&self) -> u64 {
        self.slow_consumer
            + self.peer_gap
            + self.server_failure
            + self.recovery_gap
            + self.late
            + self.unexplained
    }

    /// Lost and told by `Dropped` notices.
    pub(crate) fn told(&self) -> u64 {
        self.slow_consumer + self.peer_gap
    }

    pub(crate) fn add(&mut self, o: &Self) {
        self.slow_consumer += o.slow_consumer;
        self.peer_gap += o.peer_gap;
        self.server_failure += o.server_failure;
        self.recovery_gap += o.recovery_gap;
        self.late += o.late;
        self.unexplained += o.unexplained;
    }

    /// The README's guarantee ("Guarantees") that the run's delivery kept to, the weakest that
    /// applied.
    pub(crate) fn guarantee(&self) -> &'static str {
        if self.unexplained > 0 {
            "broken: messages lost without a notice or a server failure"
        } else if self.server_failure > 0 {
            "at most once across a server failure"
        } else if self.recovery_gap > 0 {
            "recovered across a server failure, except what a reported gap says is gone"
        } else if self.told() > 0 {
            "exactly once while connected, every drop told (Dropped)"
        } else if self.late > 0 {
            "exactly once (some arrived after the drain)"
        } else {
            "exactly once"
        }
    }
}

/// When each publisher lost its server: [`now_ns`](crate::measure::now_ns) at its client's `Disconnected`
/// events, recorded by whichever task reads that client's events.
#[derive(Debug, Default)]
pub(crate) struct Outages(Mutex<HashMap<u32, Vec<u64>>>);

impl Outages {
    pub(crate) fn record(&self, publisher: u32, at_ns: u64) {
        lock(&self.0).entry(publisher).or_default().push(at_ns);
    }

    /// Every outage as `(publisher, time)`, to share with other generator processes.
    pub(crate) fn list(&self) -> Vec<(u32, u64)> {
        let outages = lock(&self.0);
        let mut list: Vec<_> = outages
            .iter()
            .flat_map(|(&p, times)| times.iter().map(move |&t| (p, t)))
            .collect();
        list.sort_unstable();
        list
    }

    /// Adds outages another generator process saw.
    pub(crate) fn extend(&self, list: &[(u32, u64)]) {
        let mut outages = lock(&self.0);
        for &(p, t) in list {
            outages.entry(p).or_default().push(t);
        }
    }

    /// A copy, per publisher.
    pub(crate) fn by_publisher(&self) -> HashMap<u32, Vec<u64>> {
        lock(&self.0).clone()
    }
}

/// Whether `gap` in `publisher`'s stream at a receiver that lost its server at
/// `receiver_down` spans an outage of either end.
fn spans_a_failure(gap: &Gap, receiver_down: &[u64], publisher_down: Option<&Vec<u64>>) -> bool {
    let arrived_before = gap.before.map_or(0, |b| b.at_ns);
    let sent_before = gap.before.map_or(0, |b| b.sent_ns);
    receiver_down
        .iter()
        .any(|&t| arrived_before <= t && t <= gap.after_ns)
        || publisher_down
            .into_iter()
            .flatten()
            .any(|&t| sent_before <= t && t <= gap.after_ns)
}

/// One receiver's loss by cause, when the publishers it expects sent `sent` (publisher, count)
/// each and lost their servers at `outages`. `refused` holds, per publisher, the numbers (in
/// order) whose sender was told they reached no one (`Undeliverable`): not expected, so not lost.
pub(crate) fn attribute(
    tally: &Tally,
    sent: &[(u32, u64)],
    outages: &HashMap<u32, Vec<u64>>,
    refused: &HashMap<u32, Vec<u64>>,
) -> LostByCause {
    let (mut lost, mut in_windows, mut late) = (0u64, 0u64, 0u64);
    for &(publisher, n) in sent {
        late += tally.late_below(publisher, n);
        let refused = refused.get(&publisher).map_or(&[][..], Vec::as_slice);
        for (gap, missing) in tally.gaps(publisher, n) {
            let told = numbers_in(refused, gap.first, gap.last.min(n.saturating_sub(1)));
            let missing = missing.saturating_sub(told);
            lost += missing;
            if spans_a_failure(&gap, &tally.disconnected_at, outages.get(&publisher)) {
                in_windows += missing;
            }
        }
    }
    let counts = &tally.counts;
    let upstream = counts.dropped_upstream.min(counts.dropped_reported);
    let slow_consumer = (counts.dropped_reported - upstream).min(lost);
    let peer_gap = upstream.min(lost - slow_consumer);
    // The notices go first to what no window covers.
    let unexplained = (lost - in_windows).saturating_sub(slow_consumer + peer_gap);
    let in_failures = lost - slow_consumer - peer_gap - unexplained;
    let told_gone = match counts.recovery_gap_unknown {
        0 => counts.recovery_gap_missed,
        _ => u64::MAX,
    };
    let recovery_gap = in_failures.min(told_gone);
    LostByCause {
        slow_consumer,
        peer_gap,
        server_failure: in_failures - recovery_gap,
        recovery_gap,
        late,
        unexplained,
    }
}

/// How many of the ordered `numbers` lie in `first..=last`.
pub(crate) fn numbers_in(numbers: &[u64], first: u64, last: u64) -> u64 {
    let from = numbers.partition_point(|&k| k < first);
    let to = numbers.partition_point(|&k| k <= last);
    to.saturating_sub(from) as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::measure::{Timeline, payload};

    /// Publisher 1, 10 messages sent at 1000 + 100 × seq ns; a receiver that got `got`, each
    /// arriving 50 ns after it was sent.
    fn receiver(got: &[u64]) -> Tally {
        let timeline = Timeline::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut t = Tally::default();
        for &seq in got {
            let sent = 1_000 + 100 * seq;
            t.record_at(
                &payload(1, seq, 0, 24, sent),
                0,
                &timeline,
                |_| true,
                sent + 50,
            );
        }
        t
    }

    const SENT: &[(u32, u64)] = &[(1, 10)];
    /// 4 and 5 missing: the gap runs from 3's arrival (1350) or send (1300) to 6's arrival
    /// (1650).
    const GOT: &[u64] = &[0, 1, 2, 3, 6, 7, 8, 9];

    fn none() -> HashMap<u32, Vec<u64>> {
        HashMap::new()
    }

    #[test]
    fn messages_their_sender_was_told_were_refused_are_not_lost() {
        // 4 and 5 missing; the sender was told 5 (and 12, beyond what it sent) reached no one.
        let refused = HashMap::from([(1, vec![5, 12])]);
        let by = attribute(&receiver(GOT), SENT, &none(), &refused);
        assert_eq!(
            by,
            LostByCause {
                unexplained: 1,
                ..LostByCause::default()
            }
        );
        let refused = HashMap::from([(1, vec![4, 5])]);
        assert_eq!(
            attribute(&receiver(GOT), SENT, &none(), &refused),
            LostByCause::default()
        );
        assert_eq!(numbers_in(&[1, 4, 5, 9], 4, 8), 2);
        assert_eq!(numbers_in(&[1, 4, 5, 9], 10, 20), 0);
    }

    #[test]
    fn own_queue_drops_told_are_a_slow_consumer() {
        let mut t = receiver(GOT);
        t.counts.dropped_reported = 2;
        let by = attribute(&t, SENT, &none(), &none());
        assert_eq!(
            by,
            LostByCause {
                slow_consumer: 2,
                ..LostByCause::default()
            }
        );
        assert_eq!(
            by.guarantee(),
            "exactly once while connected, every drop told (Dropped)"
        );
    }

    #[test]
    fn upstream_drops_told_are_a_peer_gap() {
        let mut t = receiver(GOT);
        // Told of 5 between servers ("up to 5 of yours"): only the 2 lost count.
        t.counts.dropped_reported = 5;
        t.counts.dropped_upstream = 5;
        assert_eq!(
            attribute(&t, SENT, &none(), &none()),
            LostByCause {
                peer_gap: 2,
                ..LostByCause::default()
            }
        );
        // One of each.
        t.counts.dropped_reported = 2;
        t.counts.dropped_upstream = 1;
        assert_eq!(
            attribute(&t, SENT, &none(), &none()),
            LostByCause {
                slow_consumer: 1,
                peer_gap: 1,
                ..LostByCause::default()
            }
        );
    }

    #[test]
    fn a_gap_spanning_a_disconnect_went_with_the_server() {
        let failure = LostByCause {
            server_failure: 2,
            ..LostByCause::default()
        };
        // The receiver lost its server between 3's arrival and 6's.
        let mut t = receiver(GOT);
        t.disconnected_at = vec![1_500];
        assert_eq!(attribute(&t, SENT, &none(), &none()), failure);
        assert_eq!(failure.guarantee(), "at most once across a server failure");
        // The publisher lost its server after it sent 3 and before 6 arrived (its 5 and 6 may
        // have waited in its client's queue meanwhile).
        let t = receiver(GOT);
        assert_eq!(
            attribute(&t, SENT, &HashMap::from([(1, vec![1_640])]), &none()),
            failure
        );
        // Another publisher's outage, or one outside the gap, explains nothing.
        for outages in [
            HashMap::from([(2, vec![1_500])]),
            HashMap::from([(1, vec![1_200, 1_700])]),
        ] {
            assert_eq!(attribute(&t, SENT, &outages, &none()).unexplained, 2);
        }
        // Nor does the receiver's own disconnect before 3 arrived.
        let mut t = receiver(GOT);
        t.disconnected_at = vec![1_340];
        assert_eq!(attribute(&t, SENT, &none(), &none()).unexplained, 2);
    }

    #[test]
    fn loss_with_no_notice_and_no_failure_is_unexplained() {
        let by = attribute(&receiver(GOT), SENT, &none(), &none());
        assert_eq!(
            by,
            LostByCause {
                unexplained: 2,
                ..LostByCause::default()
            }
        );
        assert!(by.guarantee().starts_with("broken"));
        assert_eq!(LostByCause::default().guarantee(), "exactly once");
    }

    #[test]
    fn notices_cover_what_no_window_does_first() {
        // 1 is lost outside any window, 4 and 5 in one, 9 at the end of the stream.
        let mut t = receiver(&[0, 2, 3, 6, 7, 8]);
        t.disconnected_at = vec![1_500];
        t.counts.dropped_reported = 2;
        assert_eq!(
            attribute(&t, SENT, &none(), &none()),
            LostByCause {
                slow_consumer: 2,
                server_failure: 2,
                ..LostByCause::default()
            },
            "the two told cover 1 and 9, the window 4 and 5"
        );
        // Told of one only: 9 is left over (no disconnect after 8 arrived).
        t.counts.dropped_reported = 1;
        assert_eq!(
            attribute(&t, SENT, &none(), &none()),
            LostByCause {
                slow_consumer: 1,
                server_failure: 2,
                unexplained: 1,
                ..LostByCause::default()
            }
        );
    }

    #[test]
    fn a_stream_that_ends_or_never_starts_is_open_ended() {
        // Nothing after 3: a disconnect any time after it arrived covers 4..=9.
        let mut t = receiver(&[0, 1, 2, 3]);
        t.disconnected_at = vec![5_000_000];
        assert_eq!(attribute(&t, SENT, &none(), &none()).server_failure, 6);
        // Nothing at all from publisher 1: any outage of either end covers all 10.
        let t = receiver(&[]);
        assert_eq!(
            attribute(&t, SENT, &HashMap::from([(1, vec![7])]), &none()).server_failure,
            10
        );
        assert_eq!(attribute(&t, SENT, &none(), &none()).unexplained, 10);
    }

    #[test]
    fn what_arrived_after_the_drain_is_late_and_told_drops_cover_the_rest() {
        let mut t = receiver(GOT);
        t.record_late(&payload(1, 4, 0, 24, 1_400), |_| true);
        t.counts.dropped_reported = 3;
        let by = attribute(&t, SENT, &none(), &none());
        assert_eq!(
            by,
            LostByCause {
                late: 1,
                slow_consumer: 1,
                ..LostByCause::default()
            }
        );
        assert_eq!(by.total(), 2);
    }

    #[test]
    fn outages_are_shared_by_publisher() {
        let o = Outages::default();
        o.record(3, 20);
        o.record(1, 10);
        o.extend(&[(3, 5)]);
        assert_eq!(o.list(), vec![(1, 10), (3, 5), (3, 20)]);
        assert_eq!(o.by_publisher()[&3], vec![20, 5]);
    }
}
