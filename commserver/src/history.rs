//! Topic history: the messages of topics configured to keep it (`[history]`), held in memory
//! on the comm servers so that a client that lost its server can recover what it missed, and a
//! late joiner can read a backlog.
//!
//! A topic's history is made of *streams*, one per comm server process that accepted messages
//! on it: the origin numbers its own messages 1, 2, 3... (the offset) as it routes them, so
//! nothing is added between publisher and subscriber (no home server, no extra hop). A stream
//! id is random per topic and process, so a position from another topic, or from a server that
//! restarted, names no stream. Every server that receives a topic's forwards (it has
//! subscribers) keeps a copy of the streams it receives, so a stream outlives its origin.
//!
//! A client's position in a topic is the last offset of each stream it heard from. Recovery on
//! any server asks every linked peer (and itself) for what follows, merges the answers (each
//! message once, by stream and offset), and reports as a gap the offsets nobody holds.
//!
//! Appending and the route a message is delivered by are decided under the topic's lock (see
//! [`crate::routes::Publisher::publish`]): a session whose subscription is in force before a
//! recovery reads the history gets each later message live, and each earlier one from the
//! history, so together they miss nothing (the client drops the copies it has twice).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use relaymesh_net::config::{ConfigError, ensure};
use relaymesh_net::metrics::Counter;
use relaymesh_net::sync::lock;
use relaymesh_proto::frame::{self, Position};
use relaymesh_proto::{topic, v1};
use serde::Deserialize;

use tokio::sync::mpsc;

use crate::Server;
use crate::control::PeerLink;
use crate::interest::TopicKey;
use crate::routes::{Batcher, DirectWrites};

/// The `[history]` table of the comm server's configuration. History is off unless `topics` or
/// `accounts` names something. Every server of a cluster should have the same table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Topic filters (`+` one level, `#` the rest) whose topics keep history, in every account.
    pub topics: Vec<String>,
    /// Routing scopes (an account, or `account#group` for an isolated group) all of whose
    /// topics keep history.
    pub accounts: Vec<String>,
    /// Messages kept per topic (all streams together); the oldest go first.
    pub max_messages: usize,
    /// Bytes kept per topic (messages as delivered, plus 64 bytes of bookkeeping each).
    pub max_bytes: usize,
    /// Age after which a message leaves the history.
    pub max_age_ms: u64,
    /// Topics with history held at once; a new topic beyond it keeps none (counted in
    /// `history_not_kept`) until one empties.
    pub max_topics: usize,
    /// Bytes held for all topics together; beyond it a topic makes room by dropping its own
    /// oldest messages, and one with none keeps nothing (counted).
    pub max_total_bytes: usize,
    /// Most messages in one answer (a `History` or a recovery): the newest are kept and the
    /// rest reported as a gap.
    pub max_reply_messages: usize,
    /// `History` requests and recoveries (one per `Subscribe`) each session may make per
    /// second.
    pub requests_per_s: u32,
    /// ... and at once after a quiet spell.
    pub request_burst: u32,
    /// History requests (and recoveries) of one session being answered at once; more are
    /// refused with `LIMIT_EXCEEDED` (recoveries: reported as a gap).
    pub max_running_requests: usize,
    /// How long a history request waits for peers' answers.
    pub query_timeout_ms: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            topics: Vec::new(),
            accounts: Vec::new(),
            max_messages: 1000,
            max_bytes: 1024 * 1024,
            max_age_ms: 10 * 60 * 1000,
            max_topics: 10_000,
            max_total_bytes: 256 * 1024 * 1024,
            max_reply_messages: 10_000,
            requests_per_s: 20,
            request_burst: 200,
            max_running_requests: 4,
            query_timeout_ms: 2000,
        }
    }
}

impl HistoryConfig {
    relaymesh_net::durations! {
        pub(crate) fn query_timeout = query_timeout_ms;
    }

    /// Whether history is on for any topic.
    pub fn enabled(&self) -> bool {
        !self.topics.is_empty() || !self.accounts.is_empty()
    }

    /// Whether `topic` of `scope` keeps history.
    pub fn keeps(&self, scope: &str, topic: &str) -> bool {
        !topic.starts_with('@')
            && (self.accounts.iter().any(|a| a == scope)
                || self.topics.iter().any(|f| topic::matches(f, topic)))
    }

    pub(crate) fn validate(&self, max_topic_bytes: usize) -> Result<(), ConfigError> {
        for f in &self.topics {
            topic::validate_filter(f, max_topic_bytes).map_err(|e| {
                ConfigError::Invalid(format!("`history.topics`: {f:?} is no topic filter: {e}"))
            })?;
        }
        let positive = [
            ("max_messages", self.max_messages as u64),
            ("max_bytes", self.max_bytes as u64),
            ("max_age_ms", self.max_age_ms),
            ("max_topics", self.max_topics as u64),
            ("max_total_bytes", self.max_total_bytes as u64),
            ("max_reply_messages", self.max_reply_messages as u64),
            ("requests_per_s", u64::from(self.requests_per_s)),
            ("request_burst", u64::from(self.request_burst)),
            ("max_running_requests", self.max_running_requests as u64),
            ("query_timeout_ms", self.query_timeout_ms),
        ];
        for (key, value) in positive {
            ensure(value > 0, &format!("history.{key}"), "must be positive")?;
        }
        Ok(())
    }
}

/// Bookkeeping counted per held message on top of its frame.
const ENTRY_OVERHEAD: usize = 64;

/// Counters of the history, reported in `/v1/stats` and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct HistoryStats {
    /// Messages added (as origin or copy).
    pub(crate) stored: Counter,
    /// Messages that left for the bounds (count, bytes, age, total bytes).
    pub(crate) evicted: Counter,
    /// Messages not kept: their topic found no room (`max_topics`, `max_total_bytes`).
    pub(crate) not_kept: Counter,
    /// Recoveries and `History` requests answered, and those that reported a gap.
    pub(crate) requests: Counter,
    pub(crate) gaps: Counter,
    /// Messages sent in answers.
    pub(crate) replayed: Counter,
}

/// Every topic's history on this server.
#[derive(Debug)]
pub(crate) struct Histories {
    pub(crate) config: HistoryConfig,
    topics: Mutex<HashMap<TopicKey, Arc<TopicHistory>>>,
    /// Bytes held, all topics together.
    total_bytes: AtomicUsize,
    /// When topics were last swept for ones to forget (ms since the Unix epoch).
    swept_ms: AtomicU64,
    /// Names this process's streams.
    ids: std::collections::hash_map::RandomState,
    pub(crate) stats: HistoryStats,
    /// How topics' shared batches write to idle subscribers.
    direct: DirectWrites,
}

/// One topic's history.
#[derive(Debug)]
pub(crate) struct TopicHistory {
    /// This server's stream of the topic.
    own: u64,
    streams: Mutex<Streams>,
}

/// A topic's streams, under its lock.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    /// Deliveries to this server's subscribers of the topic, in offset order, that the readers
    /// which added them have not handed on yet (the first to flush does).
    pub(crate) batch: Batcher,
    /// Where stored frames are encoded: one allocation shared by many of them (each holds
    /// its part), see [`Streams::encode`].
    arena: BytesMut,
    /// This server's next offset, and the time it last stamped.
    next: u64,
    last_ms: u64,
    streams: Vec<Stream>,
    /// Messages and bytes held, all streams together.
    count: usize,
    bytes: usize,
}

#[derive(Debug)]
struct Stream {
    id: u64,
    /// This server's own stream.
    origin: bool,
    /// The highest offset ever added (it may have left since).
    last: u64,
    entries: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    offset: u64,
    ms: u64,
    /// The message as delivered: a `ServerToClient { message }` frame with its position.
    frame: Bytes,
}

/// What a history request asks for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    /// The newest `last` messages (0: by position instead).
    pub(crate) last: usize,
    /// The last offset the asker has of each stream.
    pub(crate) since: HashMap<u64, u64>,
    /// For streams not in `since`: messages accepted at or after this time.
    pub(crate) since_ms: u64,
    pub(crate) max_messages: usize,
}

impl Query {
    pub(crate) fn from_positions(
        last: u32,
        since: &[v1::StreamPosition],
        since_ms: u64,
        max_messages: usize,
    ) -> Self {
        Self {
            last: (last as usize).min(max_messages),
            since: since.iter().map(|p| (p.stream, p.offset)).collect(),
            since_ms,
            max_messages,
        }
    }

    pub(crate) fn to_peer(&self, request_id: u64, key: &TopicKey) -> v1::HistoryQuery {
        v1::HistoryQuery {
            request_id,
            account: key.account.to_string(),
            topic: key.topic.to_string(),
            last: u32::try_from(self.last).unwrap_or(u32::MAX),
            since: self
                .since
                .iter()
                .map(|(&stream, &offset)| v1::StreamPosition { stream, offset })
                .collect(),
            since_ms: self.since_ms,
            max_messages: u32::try_from(self.max_messages).unwrap_or(u32::MAX),
        }
    }
}

/// One held message, as found.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) stream: u64,
    pub(crate) offset: u64,
    pub(crate) ms: u64,
    pub(crate) frame: Bytes,
}

impl Found {
    fn order(&self) -> (u64, u64, u64) {
        (self.ms, self.stream, self.offset)
    }
}

/// What one server holds for a query.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) messages: Vec<Found>,
    pub(crate) held: Vec<v1::StreamHeld>,
}

impl Histories {
    pub(crate) fn new(config: HistoryConfig, direct: DirectWrites) -> Self {
        Self {
            direct,
            config,
            topics: Mutex::new(HashMap::new()),
            total_bytes: AtomicUsize::new(0),
            swept_ms: AtomicU64::new(0),
            ids: std::collections::hash_map::RandomState::new(),
            stats: HistoryStats::default(),
        }
    }

    /// The history of `topic` of `scope` if it keeps one and there is room: for messages
    /// published here.
    pub(crate) fn for_local(&self, scope: &str, topic: &str) -> Option<Arc<TopicHistory>> {
        if !self.config.keeps(scope, topic) {
            return None;
        }
        self.topic(scope, topic, true)
    }

    /// The history a forward that carries a position is copied into, if there is room.
    pub(crate) fn for_copy(&self, scope: &str, topic: &str) -> Option<Arc<TopicHistory>> {
        self.topic(scope, topic, true)
    }

    /// The history of a topic, made if `make` and there is room.
    pub(crate) fn topic(&self, scope: &str, topic: &str, make: bool) -> Option<Arc<TopicHistory>> {
        let key = TopicKey::new(scope, topic);
        let mut topics = lock(&self.topics);
        if let Some(h) = topics.get(&key) {
            return Some(h.clone());
        }
        if !make {
            return None;
        }
        if topics.len() >= self.config.max_topics {
            // A sweep looks at every topic: at most one a second, not one per message on a
            // topic that finds no room.
            let now = relaymesh_net::link::now_ms();
            if self.swept_ms.load(Ordering::Relaxed) + SWEEP_EVERY_MS <= now {
                self.swept_ms.store(now, Ordering::Relaxed);
                self.forget_empty(&mut topics);
            }
            if topics.len() >= self.config.max_topics {
                self.stats.not_kept.inc();
                return None;
            }
        }
        let own = self.ids.hash_one((scope, topic)).max(1);
        let h = Arc::new(TopicHistory {
            own,
            streams: Mutex::new(Streams {
                next: 1,
                batch: Batcher::new(self.direct),
                ..Streams::default()
            }),
        });
        topics.insert(key, h.clone());
        Some(h)
    }

    /// Forgets topics whose history has emptied (aged out) and that no publisher holds.
    fn forget_empty(&self, topics: &mut HashMap<TopicKey, Arc<TopicHistory>>) {
        let now = relaymesh_net::link::now_ms();
        topics.retain(|_, h| {
            if Arc::strong_count(h) > 1 {
                return true;
            }
            let Ok(mut streams) = h.streams.try_lock() else {
                return true;
            };
            self.expire(&mut streams, now);
            streams.count > 0 || streams.next > 1 && streams.last_ms + self.config.max_age_ms > now
        });
    }

    /// Topics with history held, and the bytes held.
    pub(crate) fn held(&self) -> (usize, usize) {
        (
            lock(&self.topics).len(),
            self.total_bytes.load(Ordering::Relaxed),
        )
    }

    /// Adds `frame` (a `ServerToClient { message }` frame) at `position` of `stream`, within
    /// the bounds, at `now` (ms since the Unix epoch, what ages entries out). Returns whether
    /// it was kept.
    pub(crate) fn record(
        &self,
        streams: &mut Streams,
        origin: bool,
        position: Position,
        frame: Bytes,
        now: u64,
    ) -> bool {
        let size = frame.len() + ENTRY_OVERHEAD;
        self.expire(streams, now);
        let i = match streams.streams.iter().position(|s| s.id == position.stream) {
            Some(i) => i,
            None => {
                streams.streams.push(Stream {
                    id: position.stream,
                    origin,
                    last: 0,
                    entries: VecDeque::new(),
                });
                streams.streams.len() - 1
            }
        };
        if position.offset <= streams.streams[i].last {
            // Already here (a forward sent again on a resumed link).
            return false;
        }
        streams.streams[i].last = position.offset;
        let config = &self.config;
        // What the oldest messages give back is settled with the total once, below.
        let total = self.total_bytes.load(Ordering::Relaxed);
        let (mut count, mut bytes, mut freed) = (streams.count, streams.bytes, 0);
        while count > 0
            && (count + 1 > config.max_messages
                || bytes + size > config.max_bytes
                || total.saturating_sub(freed) + size > config.max_total_bytes)
        {
            let (c, b) = Self::evict_oldest(streams);
            if c == 0 {
                break;
            }
            self.stats.evicted.inc();
            (count, bytes, freed) = (count - c, bytes - b, freed + b);
        }
        let kept = size <= config.max_bytes
            && total.saturating_sub(freed) + size <= config.max_total_bytes;
        if kept {
            streams.streams[i].entries.push_back(Entry {
                offset: position.offset,
                ms: position.published_ms,
                frame,
            });
            (count, bytes) = (count + 1, bytes + size);
            self.stats.stored.inc();
        } else {
            self.stats.not_kept.inc();
        }
        (streams.count, streams.bytes) = (count, bytes);
        let added = if kept { size } else { 0 };
        if added > freed {
            self.total_bytes.fetch_add(added - freed, Ordering::Relaxed);
        } else if freed > added {
            self.total_bytes.fetch_sub(freed - added, Ordering::Relaxed);
        }
        kept
    }

    /// Drops what is older than `max_age_ms`.
    fn expire(&self, streams: &mut Streams, now: u64) {
        let oldest = now.saturating_sub(self.config.max_age_ms);
        // Usually nothing has aged out: one look at each stream's oldest entry says so.
        if !streams
            .streams
            .iter()
            .any(|s| s.entries.front().is_some_and(|e| e.ms < oldest))
        {
            return;
        }
        let mut freed = (0, 0);
        for s in &mut streams.streams {
            while s.entries.front().is_some_and(|e| e.ms < oldest) {
                if let Some(e) = s.entries.pop_front() {
                    freed.0 += 1;
                    freed.1 += e.frame.len() + ENTRY_OVERHEAD;
                }
            }
        }
        // A copied stream with nothing left is forgotten; this server's own stays numbered.
        streams
            .streams
            .retain(|s| s.origin || !s.entries.is_empty());
        self.release(streams, freed);
    }

    /// Drops the oldest message of the topic (of whichever stream has it), and says what it
    /// held (messages and bytes), for the caller to take off the counts.
    fn evict_oldest(streams: &mut Streams) -> (usize, usize) {
        let oldest = streams
            .streams
            .iter_mut()
            .filter(|s| !s.entries.is_empty())
            .min_by_key(|s| s.entries.front().map(|e| (e.ms, e.offset)));
        oldest
            .and_then(|s| s.entries.pop_front())
            .map_or((0, 0), |e| (1, e.frame.len() + ENTRY_OVERHEAD))
    }

    fn release(&self, streams: &mut Streams, (count, bytes): (usize, usize)) {
        if count == 0 {
            return;
        }
        streams.count -= count;
        streams.bytes -= bytes;
        self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.stats.evicted.add(count as u64);
    }

    /// What this server holds of `topic` for `query`.
    pub(crate) fn answer(&self, key: &TopicKey, query: &Query) -> Answer {
        let Some(h) = self.topic(&key.account, &key.topic, false) else {
            return Answer::default();
        };
        let mut streams = h.lock();
        self.expire(&mut streams, relaymesh_net::link::now_ms());
        let mut answer = Answer::default();
        for s in &streams.streams {
            answer.held.push(v1::StreamHeld {
                stream: s.id,
                first: s.entries.front().map_or(s.last + 1, |e| e.offset),
                last: s.last,
                origin: s.origin,
            });
            let start = if query.last > 0 {
                s.entries.len().saturating_sub(query.last)
            } else if let Some(&after) = query.since.get(&s.id) {
                s.entries.partition_point(|e| e.offset <= after)
            } else {
                s.entries.partition_point(|e| e.ms < query.since_ms)
            };
            answer
                .messages
                .extend(s.entries.range(start..).map(|e| Found {
                    stream: s.id,
                    offset: e.offset,
                    ms: e.ms,
                    frame: e.frame.clone(),
                }));
        }
        drop(streams);
        answer.messages.sort_unstable_by_key(Found::order);
        let keep = if query.last > 0 {
            query.last
        } else {
            query.max_messages
        };
        let extra = answer.messages.len().saturating_sub(keep);
        answer.messages.drain(..extra);
        answer
    }
}

/// How often a full set of topics is swept for emptied ones.
const SWEEP_EVERY_MS: u64 = 1000;

/// Largest buffer stored frames of one topic share.
const ARENA_BYTES: usize = 4096;

impl Streams {
    /// `frame::message_frame(topic, from, payload)`, encoded into a buffer that the topic's
    /// next messages share rather than an allocation of its own: on a busy topic one
    /// allocation holds many messages (freed when the last of them leaves). The buffer grows
    /// with what the topic holds (a frame's size times the messages held, up to
    /// [`ARENA_BYTES`]), so a quiet topic's frame does not hold much more than itself.
    pub(crate) fn encode(&mut self, topic: &str, from: frame::Sender<'_>, payload: &[u8]) -> Bytes {
        let len = frame::message_frame_len(topic, from, payload);
        if self.arena.capacity() < len {
            let size = len
                .saturating_mul(self.count + 1)
                .clamp(len, ARENA_BYTES.max(len));
            self.arena = BytesMut::with_capacity(size);
        }
        frame::put_message_frame(&mut self.arena, topic, from, payload);
        self.arena.split().freeze()
    }
}

impl TopicHistory {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Streams> {
        lock(&self.streams)
    }

    /// The position of the next message this server accepts on the topic, at `now` (ms since
    /// the Unix epoch; a stream's times never go back).
    pub(crate) fn next_position(&self, streams: &mut Streams, now: u64) -> Position {
        let offset = streams.next;
        streams.next += 1;
        streams.last_ms = streams.last_ms.max(now);
        Position {
            stream: self.own,
            offset,
            published_ms: streams.last_ms,
        }
    }
}

/// The answers of every server merged: each message once, oldest first, and what is known to
/// be missing.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub(crate) messages: Vec<Found>,
    pub(crate) gap: bool,
    pub(crate) missed: u64,
    /// Streams asked about that no server holds.
    pub(crate) unknown: Vec<u64>,
}

/// Why a request cannot be answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MergeError {
    #[error(
        "position {offset} of stream {stream:x} is ahead of that stream (its newest message is {newest})"
    )]
    Ahead {
        stream: u64,
        offset: u64,
        newest: u64,
    },
}

/// Merges the answers to `query`.
pub(crate) fn merge(query: &Query, answers: Vec<Answer>) -> Result<Merged, MergeError> {
    let mut held: HashMap<u64, (u64, u64, bool)> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut messages = Vec::new();
    for answer in answers {
        for h in answer.held {
            let e = held.entry(h.stream).or_insert((h.first, h.last, h.origin));
            e.0 = e.0.min(h.first);
            e.1 = e.1.max(h.last);
            e.2 |= h.origin;
        }
        for m in answer.messages {
            if seen.insert((m.stream, m.offset)) {
                messages.push(m);
            }
        }
    }
    messages.sort_unstable_by_key(Found::order);
    let mut merged = Merged::default();
    if query.last > 0 {
        let extra = messages.len().saturating_sub(query.last);
        messages.drain(..extra);
        merged.messages = messages;
        return Ok(merged);
    }
    // Per stream, the offsets found.
    let mut found: HashMap<u64, u64> = HashMap::new();
    for m in &messages {
        *found.entry(m.stream).or_default() += 1;
    }
    for (&stream, &after) in &query.since {
        match held.get(&stream) {
            // No server holds the stream: a position from another topic, a forged one, or a
            // stream whose server died with no copy left.
            None => {
                merged.gap = true;
                merged.unknown.push(stream);
            }
            Some(&(_, newest, origin)) => {
                if after > newest && origin {
                    return Err(MergeError::Ahead {
                        stream,
                        offset: after,
                        newest,
                    });
                }
                let due = newest.saturating_sub(after);
                let got = found.get(&stream).copied().unwrap_or(0);
                if due > got {
                    merged.gap = true;
                    merged.missed += due - got;
                }
            }
        }
    }
    // Streams the asker had not heard from: only holes inside what is found are known.
    for (&stream, &(_, newest, _)) in &held {
        if query.since.contains_key(&stream) {
            continue;
        }
        let offsets: Vec<u64> = messages
            .iter()
            .filter(|m| m.stream == stream)
            .map(|m| m.offset)
            .collect();
        if let Some(&first) = offsets.first() {
            let due = newest + 1 - first;
            let got = offsets.len() as u64;
            if due > got {
                merged.gap = true;
                merged.missed += due - got;
            }
        }
    }
    let extra = messages.len().saturating_sub(query.max_messages);
    if extra > 0 {
        messages.drain(..extra);
        merged.gap = true;
        merged.missed += extra as u64;
    }
    merged.messages = messages;
    Ok(merged)
}

/// Most bytes of messages in one `HistoryBatch` or `HistoryAnswer` frame.
pub(crate) const FRAME_BUDGET: usize = 256 * 1024;

/// Splits `messages` into runs of at most [`FRAME_BUDGET`] bytes (at least one run, and at
/// least one message in each).
pub(crate) fn chunks(messages: &[Found]) -> Vec<&[Found]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, m) in messages.iter().enumerate() {
        if i > start && bytes + m.frame.len() > FRAME_BUDGET {
            out.push(&messages[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += m.frame.len();
    }
    if start < messages.len() || out.is_empty() {
        out.push(&messages[start..]);
    }
    out
}

/// A `ServerToClient { history: HistoryBatch }` frame holding `messages`.
pub(crate) fn batch_frame(head: &v1::HistoryBatch, messages: &[Found]) -> Bytes {
    frame::history_batch_frame(head, messages.iter().map(|m| &m.frame))
}

/// A `PeerMessage { history_answer }` frame holding `messages`.
pub(crate) fn answer_frame(head: &v1::HistoryAnswer, messages: &[Found]) -> Bytes {
    frame::history_answer_frame(head, messages.iter().map(|m| &m.frame))
}

/// A peer's answer as found messages (their frames re-encoded for delivery).
pub(crate) fn from_peer(answer: v1::HistoryAnswer) -> Answer {
    let messages = answer
        .messages
        .into_iter()
        .filter(|m| m.stream != 0 && m.offset != 0)
        .map(|m| Found {
            stream: m.stream,
            offset: m.offset,
            ms: m.published_ms,
            frame: frame::encode(&v1::ServerToClient::message(m)),
        })
        .collect();
    Answer {
        messages,
        held: answer.held,
    }
}

/// Gathers what the cluster holds of `key` for `query`: this server's history and the answer
/// of every linked peer. A peer that has not answered in full within `query_timeout_ms` counts
/// as holding nothing more than what it sent (what only it held shows as a gap).
pub(crate) async fn collect(
    server: &Arc<Server>,
    key: &TopicKey,
    query: &Query,
) -> Result<Merged, MergeError> {
    let histories = &server.histories;
    histories.stats.requests.inc();
    let mut answers = vec![histories.answer(key, query)];
    let peers: Vec<Arc<PeerLink>> = lock(&server.peer_links).values().cloned().collect();
    if !peers.is_empty() {
        let id = server.next_id();
        let (tx, mut rx) = mpsc::channel(ANSWER_QUEUE);
        lock(&server.history_queries).insert(id, tx);
        let frame = frame::encode(&v1::PeerMessage::history_query(query.to_peer(id, key)));
        for peer in &peers {
            peer.send_ctrl(frame.clone());
        }
        let mut partial: HashMap<Arc<str>, Answer> = HashMap::new();
        let mut done = 0;
        let deadline = tokio::time::sleep(histories.config.query_timeout());
        tokio::pin!(deadline);
        while done < peers.len() {
            tokio::select! {
                answer = rx.recv() => {
                    let Some((peer, answer)) = answer else { break };
                    let more = answer.more;
                    let got = from_peer(answer);
                    let entry = partial.entry(peer).or_default();
                    entry.messages.extend(got.messages);
                    entry.held.extend(got.held);
                    if !more {
                        done += 1;
                    }
                }
                () = &mut deadline => {
                    tracing::warn!(
                        topic = %key.topic,
                        answered = done,
                        peers = peers.len(),
                        "peers did not answer a history request in time"
                    );
                    break;
                }
            }
        }
        lock(&server.history_queries).remove(&id);
        answers.extend(partial.into_values());
    }
    let merged = merge(query, answers)?;
    if merged.gap {
        histories.stats.gaps.inc();
    }
    histories.stats.replayed.add(merged.messages.len() as u64);
    Ok(merged)
}

/// Answers a peer's `HistoryQuery` from this server's history, in frames of at most
/// [`FRAME_BUDGET`] bytes of messages.
pub(crate) fn answer_peer(server: &Server, peer: &PeerLink, query: v1::HistoryQuery) {
    let max = (query.max_messages as usize).min(server.histories.config.max_reply_messages);
    let key = TopicKey::new(&query.account, &query.topic);
    let q = Query::from_positions(query.last, &query.since, query.since_ms, max);
    let answer = server.histories.answer(&key, &q);
    let runs = chunks(&answer.messages);
    let mut held = answer.held;
    let last = runs.len() - 1;
    for (i, run) in runs.into_iter().enumerate() {
        let head = v1::HistoryAnswer {
            request_id: query.request_id,
            messages: Vec::new(),
            held: std::mem::take(&mut held),
            more: i < last,
        };
        peer.send_ctrl(answer_frame(&head, run));
    }
}

/// Hands a peer's `HistoryAnswer` to the request waiting for it (none: it gave up).
pub(crate) fn answered(server: &Server, peer: &Arc<str>, answer: v1::HistoryAnswer) {
    let queries = lock(&server.history_queries);
    if let Some(tx) = queries.get(&answer.request_id)
        && tx.try_send((peer.clone(), answer)).is_err()
    {
        tracing::warn!(%peer, "a history answer found its request's queue full; dropped");
    }
}

/// Where a peer's answers to one history request go.
pub(crate) type AnswerTx = mpsc::Sender<(Arc<str>, v1::HistoryAnswer)>;

/// Answer frames one history request takes from its peers before they wait (a request takes
/// its answers as they come; more is a peer answering far beyond `max_reply_messages`).
const ANSWER_QUEUE: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use relaymesh_proto::frame::{Sender, message_frame};

    fn config() -> HistoryConfig {
        HistoryConfig {
            topics: vec!["chat/#".into()],
            ..HistoryConfig::default()
        }
    }

    fn publish(h: &Histories, t: &TopicHistory, payload: &str) -> Position {
        let mut streams = t.lock();
        let now = relaymesh_net::link::now_ms();
        let position = t.next_position(&mut streams, now);
        let from = Sender {
            alias: "a",
            position,
            ..Sender::default()
        };
        let frame = message_frame("chat/x", from, payload.as_bytes());
        h.record(&mut streams, true, position, frame, now);
        position
    }

    #[test]
    fn only_configured_topics_keep_history_and_stream_ids_differ_per_topic() {
        let h = Histories::new(config(), DirectWrites::Off);
        assert!(h.for_local("acme", "other").is_none());
        assert!(h.for_local("acme", "@presence").is_none());
        let a = h.for_local("acme", "chat/a").unwrap();
        let b = h.for_local("acme", "chat/b").unwrap();
        let a2 = h.for_local("beta", "chat/a").unwrap();
        assert_ne!(a.own, b.own);
        assert_ne!(a.own, a2.own);
        assert!(Arc::ptr_eq(&a, &h.for_local("acme", "chat/a").unwrap()));
    }

    #[test]
    fn bounds_drop_the_oldest_and_answers_say_what_is_gone() {
        let h = Histories::new(
            HistoryConfig {
                max_messages: 5,
                ..config()
            },
            DirectWrites::Off,
        );
        let key = TopicKey::new("acme", "chat/x");
        let t = h.for_local("acme", "chat/x").unwrap();
        for i in 0..8 {
            publish(&h, &t, &format!("m{i}"));
        }
        let query = Query {
            since: HashMap::from([(t.own, 1)]),
            max_messages: 100,
            ..Query::default()
        };
        let answer = h.answer(&key, &query);
        let offsets: Vec<u64> = answer.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [4, 5, 6, 7, 8]);
        let merged = merge(&query, vec![answer]).unwrap();
        assert!(merged.gap);
        assert_eq!(merged.missed, 2, "offsets 2 and 3 are gone");
        let last = Query {
            last: 2,
            max_messages: 100,
            ..Query::default()
        };
        let merged = merge(&last, vec![h.answer(&key, &last)]).unwrap();
        assert_eq!(merged.messages.len(), 2);
        assert_eq!(merged.messages[1].offset, 8);
    }

    #[test]
    fn copies_from_two_servers_merge_once_each_and_unknown_or_future_positions_are_told() {
        let h = Histories::new(config(), DirectWrites::Off);
        let key = TopicKey::new("acme", "chat/x");
        let t = h.for_local("acme", "chat/x").unwrap();
        for i in 0..4 {
            publish(&h, &t, &format!("m{i}"));
        }
        let query = Query {
            since: HashMap::from([(t.own, 2)]),
            max_messages: 100,
            ..Query::default()
        };
        let merged = merge(&query, vec![h.answer(&key, &query), h.answer(&key, &query)]).unwrap();
        assert_eq!(merged.messages.len(), 2);
        assert!(!merged.gap);
        let unknown = Query {
            since: HashMap::from([(12345, 2)]),
            max_messages: 100,
            ..Query::default()
        };
        let merged = merge(&unknown, vec![h.answer(&key, &unknown)]).unwrap();
        assert!(merged.gap);
        assert_eq!(merged.missed, 0);
        let ahead = Query {
            since: HashMap::from([(t.own, 99)]),
            max_messages: 100,
            ..Query::default()
        };
        assert!(merge(&ahead, vec![h.answer(&key, &ahead)]).is_err());
    }

    #[test]
    fn a_batch_frame_decodes_as_its_messages() {
        let h = Histories::new(config(), DirectWrites::Off);
        let key = TopicKey::new("acme", "chat/x");
        let t = h.for_local("acme", "chat/x").unwrap();
        for i in 0..3 {
            publish(&h, &t, &format!("m{i}"));
        }
        let answer = h.answer(
            &key,
            &Query {
                last: 10,
                max_messages: 10,
                ..Query::default()
            },
        );
        let head = v1::HistoryBatch {
            request_id: 7,
            topic: "chat/x".into(),
            done: true,
            ..Default::default()
        };
        let frame = batch_frame(&head, &answer.messages);
        let decoded: v1::ServerToClient = relaymesh_proto::frame::decode(frame).unwrap();
        let Some(v1::server_to_client::Kind::History(batch)) = decoded.kind else {
            panic!("not a batch");
        };
        assert_eq!(batch.request_id, 7);
        assert!(batch.done);
        let payloads: Vec<&[u8]> = batch.messages.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(payloads, [&b"m0"[..], b"m1", b"m2"]);
        assert_eq!(batch.messages[2].offset, 3);
        assert_eq!(batch.messages[2].stream, t.own);
    }
}
