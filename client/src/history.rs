//! Where the client stands in each topic that keeps history, and recovery after a reconnect.
//!
//! A message on such a topic carries its stream position (see [`crate::Position`]). The client
//! keeps the last offset of every stream it heard from per topic; after a reconnect it
//! resubscribes with those positions (`Subscribe.recover`) and the server sends what followed.
//! While a topic recovers, live messages on it wait here, so the missed ones come first; each
//! is then delivered once (a stream offset at or below the last one delivered is a copy).

use std::collections::{HashMap, VecDeque};

use relaymesh_proto::v1;
use tokio::sync::oneshot;

/// Live messages held per recovering topic at most; beyond, the oldest held go (counted as
/// dropped, and the position check drops nothing that was not delivered).
const MAX_HELD: usize = 100_000;

/// The client's positions, its recoveries and its history requests.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    topics: HashMap<String, TopicPosition>,
    requests: HashMap<u64, Request>,
}

#[derive(Debug, Default)]
struct TopicPosition {
    /// When the subscription took effect (server clock): for streams not heard from.
    since_ms: u64,
    /// The last offset delivered of each stream.
    streams: HashMap<u64, u64>,
    /// Live messages held while the topic recovers (`Some` until its answer is done).
    recovering: Option<VecDeque<v1::Message>>,
    /// Messages recovered so far in the current recovery, and held ones that did not fit.
    recovered: u64,
    overflow: u64,
}

/// A `History` request waiting for its answer.
#[derive(Debug)]
struct Request {
    messages: Vec<v1::Message>,
    done: oneshot::Sender<Result<crate::HistoryPage, crate::ClientError>>,
}

/// What to do with a live message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// New: deliver it.
    Fresh,
    /// Its stream offset was delivered already.
    Copy,
    /// Its topic is recovering: held until that is done.
    Held,
}

/// What a recovery batch gives the application.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    /// Messages to deliver (checked against positions; the caller checks publisher numbers).
    pub(crate) messages: Vec<v1::Message>,
    /// Events after them (the recovery is done).
    pub(crate) gap: Option<u64>,
    pub(crate) recovered: Option<u64>,
    /// Held live messages that did not fit.
    pub(crate) dropped: u64,
}

impl Positions {
    /// The first `Ack` of a subscription: its topics that keep history start from now.
    pub(crate) fn subscribed(&mut self, ack: &v1::Ack) {
        for topic in &ack.history {
            self.topics
                .entry(topic.clone())
                .or_insert_with(|| TopicPosition {
                    since_ms: ack.at_ms,
                    ..TopicPosition::default()
                });
        }
    }

    /// The client unsubscribed from `topic`.
    pub(crate) fn forget(&mut self, topic: &str) {
        self.topics.remove(topic);
    }

    /// What to ask a new server to recover, for those of `topics` with a position; each is
    /// marked recovering (live messages on it are held until its answer is done).
    pub(crate) fn recover(&mut self, topics: &[String]) -> Vec<v1::Recover> {
        let mut out = Vec::new();
        for topic in topics {
            let Some(p) = self.topics.get_mut(topic) else {
                continue;
            };
            p.recovering = Some(VecDeque::new());
            p.recovered = 0;
            p.overflow = 0;
            out.push(v1::Recover {
                topic: topic.clone(),
                since: p
                    .streams
                    .iter()
                    .map(|(&stream, &offset)| v1::StreamPosition { stream, offset })
                    .collect(),
                since_ms: p.since_ms,
            });
        }
        out
    }

    /// The `Ack` of a resubscription that asked to recover `asked`: a topic the server keeps
    /// no history for (a server of another configuration or an older version) will not be
    /// recovered. Its recovery ends as a gap of unknown size, and what it held is given back.
    pub(crate) fn unrecoverable(
        &mut self,
        asked: &[v1::Recover],
        ack: &v1::Ack,
    ) -> Vec<(String, Recovery)> {
        let mut out = Vec::new();
        for r in asked {
            if ack.history.contains(&r.topic) {
                continue;
            }
            let recovery = self.recovered(v1::HistoryBatch {
                topic: r.topic.clone(),
                recovery: true,
                done: true,
                gap: true,
                ..v1::HistoryBatch::default()
            });
            out.push((r.topic.clone(), recovery));
        }
        out
    }

    /// A live message.
    pub(crate) fn arrive(&mut self, m: &v1::Message) -> Arrival {
        if m.stream == 0 {
            return Arrival::Fresh;
        }
        let Some(p) = self.topics.get_mut(&m.topic) else {
            return Arrival::Fresh;
        };
        if let Some(held) = &mut p.recovering {
            if held.len() >= MAX_HELD {
                held.pop_front();
                p.overflow += 1;
            }
            held.push_back(m.clone());
            return Arrival::Held;
        }
        if advance(p, m) {
            Arrival::Fresh
        } else {
            Arrival::Copy
        }
    }

    /// A recovery batch for `b.topic`.
    pub(crate) fn recovered(&mut self, b: v1::HistoryBatch) -> Recovery {
        let mut out = Recovery::default();
        let Some(p) = self.topics.get_mut(&b.topic) else {
            return out;
        };
        for m in b.messages {
            if advance(p, &m) {
                p.recovered += 1;
                out.messages.push(m);
            }
        }
        if b.done {
            // Streams no server holds any more are not heard from again.
            for stream in &b.unknown_streams {
                p.streams.remove(stream);
            }
            for m in p.recovering.take().unwrap_or_default() {
                if advance(p, &m) {
                    out.messages.push(m);
                }
            }
            out.gap = b.gap.then_some(b.missed_at_least);
            out.recovered = Some(p.recovered);
            out.dropped = std::mem::take(&mut p.overflow);
        }
        out
    }

    /// A `History` request is out: its answer goes to `done`.
    pub(crate) fn ask(
        &mut self,
        request_id: u64,
        done: oneshot::Sender<Result<crate::HistoryPage, crate::ClientError>>,
    ) {
        self.requests.insert(
            request_id,
            Request {
                messages: Vec::new(),
                done,
            },
        );
    }

    /// A batch answering a `History` request.
    pub(crate) fn answered(&mut self, b: v1::HistoryBatch) {
        let Some(r) = self.requests.get_mut(&b.request_id) else {
            return;
        };
        r.messages.extend(b.messages);
        if b.done
            && let Some(r) = self.requests.remove(&b.request_id)
        {
            let page = crate::HistoryPage {
                messages: r.messages.into_iter().map(crate::Message::from).collect(),
                gap: b.gap,
                missed_at_least: b.missed_at_least,
            };
            let _ = r.done.send(Ok(page));
        }
    }

    /// The server refused request `request_id`: whether it was a `History` request.
    pub(crate) fn refused(&mut self, request_id: u64, e: v1::Error) -> bool {
        match self.requests.remove(&request_id) {
            Some(r) => {
                let _ = r.done.send(Err(crate::ClientError::Refused(e)));
                true
            }
            None => false,
        }
    }

    /// The request gave up.
    pub(crate) fn cancel(&mut self, request_id: u64) {
        self.requests.remove(&request_id);
    }
}

/// Records `m`'s offset; whether it is new.
fn advance(p: &mut TopicPosition, m: &v1::Message) -> bool {
    let last = p.streams.entry(m.stream).or_insert(0);
    if m.offset <= *last {
        return false;
    }
    *last = m.offset;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(stream: u64, offset: u64) -> v1::Message {
        v1::Message {
            topic: "t".into(),
            stream,
            offset,
            ..v1::Message::default()
        }
    }

    fn subscribed() -> Positions {
        let mut p = Positions::default();
        p.subscribed(&v1::Ack {
            history: vec!["t".into()],
            at_ms: 5,
            ..v1::Ack::default()
        });
        p
    }

    #[test]
    fn copies_are_dropped_and_recovery_comes_before_the_live_messages_it_held() {
        let mut p = subscribed();
        assert_eq!(p.arrive(&msg(1, 1)), Arrival::Fresh);
        assert_eq!(p.arrive(&msg(1, 2)), Arrival::Fresh);
        assert_eq!(p.arrive(&msg(1, 2)), Arrival::Copy);
        let asked = p.recover(&["t".into(), "other".into()]);
        assert_eq!(asked.len(), 1);
        assert_eq!(
            asked[0].since,
            [v1::StreamPosition {
                stream: 1,
                offset: 2
            }]
        );
        assert_eq!(asked[0].since_ms, 5);
        // Live messages during the recovery wait, one of them also in the recovery.
        assert_eq!(p.arrive(&msg(1, 5)), Arrival::Held);
        assert_eq!(p.arrive(&msg(2, 1)), Arrival::Held);
        let first = p.recovered(v1::HistoryBatch {
            topic: "t".into(),
            recovery: true,
            messages: vec![msg(1, 3), msg(1, 4)],
            ..v1::HistoryBatch::default()
        });
        assert_eq!(first.recovered, None);
        let last = p.recovered(v1::HistoryBatch {
            topic: "t".into(),
            recovery: true,
            done: true,
            messages: vec![msg(1, 5)],
            ..v1::HistoryBatch::default()
        });
        let got: Vec<(u64, u64)> = first
            .messages
            .iter()
            .chain(&last.messages)
            .map(|m| (m.stream, m.offset))
            .collect();
        assert_eq!(got, [(1, 3), (1, 4), (1, 5), (2, 1)]);
        assert_eq!(last.recovered, Some(3));
        assert_eq!(last.gap, None);
        assert_eq!(p.arrive(&msg(1, 6)), Arrival::Fresh);
    }

    #[test]
    fn a_server_without_the_topics_history_ends_the_recovery_and_gives_back_what_it_held() {
        let mut p = subscribed();
        assert_eq!(p.arrive(&msg(1, 1)), Arrival::Fresh);
        let asked = p.recover(&["t".into()]);
        assert_eq!(p.arrive(&msg(1, 2)), Arrival::Held);
        let ended = p.unrecoverable(&asked, &v1::Ack::default());
        assert_eq!(ended.len(), 1);
        let (topic, r) = &ended[0];
        assert_eq!(topic, "t");
        assert_eq!((r.gap, r.recovered), (Some(0), Some(0)));
        assert_eq!(r.messages.len(), 1);
        assert_eq!(p.arrive(&msg(1, 3)), Arrival::Fresh);
    }

    #[test]
    fn streams_no_server_holds_are_forgotten() {
        let mut p = subscribed();
        p.arrive(&msg(7, 4));
        p.recover(&["t".into()]);
        p.recovered(v1::HistoryBatch {
            topic: "t".into(),
            recovery: true,
            done: true,
            gap: true,
            unknown_streams: vec![7],
            ..v1::HistoryBatch::default()
        });
        assert!(p.recover(&["t".into()])[0].since.is_empty());
    }

    #[test]
    fn a_gap_is_reported_with_its_lower_bound() {
        let mut p = subscribed();
        p.recover(&["t".into()]);
        let r = p.recovered(v1::HistoryBatch {
            topic: "t".into(),
            recovery: true,
            done: true,
            gap: true,
            missed_at_least: 7,
            ..v1::HistoryBatch::default()
        });
        assert_eq!(r.gap, Some(7));
        assert_eq!(r.recovered, Some(0));
    }
}
