//! One measured round of a steady workload: connect this process's clients through the
//! coordinator, subscribe (each subscription is acknowledged once active cluster-wide), start
//! every publisher on an open-loop schedule, wait for messages still in flight, and gather what
//! the receivers saw.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use rand::RngExt as _;
use relaymesh_client::{Client, ClientConfig, Event, Handle};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::loss::{self, LostByCause, Outages};
use crate::measure::{self, Counts, Tally, Timeline};
use crate::progress::Progress;
use crate::shard::Control;
use crate::usage::{Meter, Usage};
use crate::workload::{Shard, Workload};

/// Clients negotiating at once.
const CONNECT_CONCURRENCY: usize = 100;
/// Events a slow subscriber's client buffers (the library default is 4096), so its server's
/// queue, not the client library, is what overflows.
const SLOW_EVENT_QUEUE: usize = 16;
/// How late past its due time a message may go out before the delay is charged to its
/// latency: tokio's timer wakes on millisecond ticks, so up to about that much is the
/// generator's clock, not the cluster.
const TIMER_SLACK_NS: u64 = 2_000_000;
/// The most timeline slots accepted from another generator process.
const MAX_SLOTS: usize = 100_000;
/// After the drain, how long a receiver reads on at most what is still queued for it, and
/// the silence that ends that sooner.
const SETTLE: Duration = Duration::from_secs(3);
const SETTLE_QUIET: Duration = Duration::from_millis(200);

/// Receivers that read slowly on purpose, to show what the servers do with a slow consumer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slow {
    pub(crate) subscribers: usize,
    pub(crate) delay: Duration,
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    pub(crate) coordinator: String,
    /// Topics are `{topic_prefix}/{index}`.
    pub(crate) topic_prefix: String,
    pub(crate) workload: Workload,
    /// Messages per second per publisher.
    pub(crate) rate: f64,
    pub(crate) payload: usize,
    pub(crate) duration: Duration,
    pub(crate) drain: Duration,
    pub(crate) shard: Shard,
    pub(crate) slow: Slow,
    /// Width of a timeline slot.
    pub(crate) slot: Duration,
    /// A comm server to drain while publishing (`--drain-server-at`).
    pub(crate) server_drain: Option<crate::operator::DrainPlan>,
    /// A comm server to kill while publishing (the failover scenario).
    pub(crate) server_kill: Option<crate::kill::KillPlan>,
}

/// What was measured (for a sharded run, the leader's outcome absorbs the other shards').
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) clients: usize,
    pub(crate) publishers: usize,
    pub(crate) subscribers: usize,
    /// Messages the publishing schedule called for.
    pub(crate) scheduled: u64,
    pub(crate) published: u64,
    pub(crate) publish_errors: u64,
    pub(crate) expected: u64,
    /// Expected deliveries that never arrived, per receiver and publisher.
    pub(crate) lost: u64,
    /// `lost`, by the cause each can be put down to.
    pub(crate) lost_by_cause: LostByCause,
    pub(crate) counts: Counts,
    pub(crate) latency: Histogram<u64>,
    pub(crate) timeline: Vec<Histogram<u64>>,
    pub(crate) slot: Duration,
    /// Negotiate-and-connect times in microseconds.
    pub(crate) connect: Histogram<u64>,
    pub(crate) clients_per_server: BTreeMap<String, u64>,
    /// From the first publish to the last publisher's end.
    pub(crate) publish_s: f64,
    /// From the end of publishing to the last delivery (at most the drain period).
    pub(crate) drain_s: f64,
    /// The furthest any publisher fell behind its schedule, in seconds.
    pub(crate) max_lag_s: f64,
    pub(crate) usage: Usage,
    /// Generator processes that contributed.
    pub(crate) shards: usize,
    /// The comm server drained while publishing (`--drain-server-at`), and how it went.
    pub(crate) server_drain: Option<crate::operator::ServerDrained>,
    /// The comm server killed while publishing, and the one started in its place.
    pub(crate) server_killed: Option<crate::kill::ServerKilled>,
}

impl Outcome {
    /// Deliveries per second, from the first publish to the last delivery.
    pub(crate) fn delivered_per_s(&self) -> f64 {
        self.counts.delivered as f64 / (self.publish_s + self.drain_s).max(1e-9)
    }

    /// Delivered over expected (1.0 when nothing was expected).
    pub(crate) fn delivery(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            (self.expected - self.lost.min(self.expected)) as f64 / self.expected as f64
        }
    }

    pub(crate) fn to_part(&self) -> Part {
        Part {
            clients: self.clients,
            publishers: self.publishers,
            subscribers: self.subscribers,
            scheduled: self.scheduled,
            published: self.published,
            publish_errors: self.publish_errors,
            expected: self.expected,
            lost: self.lost,
            lost_by_cause: self.lost_by_cause,
            counts: self.counts,
            latency: measure::to_pairs(&self.latency),
            timeline: self.timeline.iter().map(measure::to_pairs).collect(),
            connect: measure::to_pairs(&self.connect),
            clients_per_server: self.clients_per_server.clone(),
            publish_s: self.publish_s,
            drain_s: self.drain_s,
            max_lag_s: self.max_lag_s,
            usage: self.usage.clone(),
        }
    }

    /// Adds another generator process's share.
    pub(crate) fn absorb(&mut self, part: &Part) {
        self.clients += part.clients;
        self.publishers += part.publishers;
        self.subscribers += part.subscribers;
        self.scheduled += part.scheduled;
        self.published += part.published;
        self.publish_errors += part.publish_errors;
        self.expected += part.expected;
        self.lost += part.lost;
        self.lost_by_cause.add(&part.lost_by_cause);
        self.counts.add(&part.counts);
        measure::add_pairs(&mut self.latency, &part.latency);
        measure::add_pairs(&mut self.connect, &part.connect);
        let slots = part.timeline.len().min(MAX_SLOTS);
        if self.timeline.len() < slots {
            self.timeline.resize_with(slots, measure::histogram);
        }
        for (slot, pairs) in self.timeline.iter_mut().zip(&part.timeline) {
            measure::add_pairs(slot, pairs);
        }
        for (server, n) in &part.clients_per_server {
            *self.clients_per_server.entry(server.clone()).or_default() += n;
        }
        self.publish_s = self.publish_s.max(part.publish_s);
        self.drain_s = self.drain_s.max(part.drain_s);
        self.max_lag_s = self.max_lag_s.max(part.max_lag_s);
        let (u, p) = (&mut self.usage, &part.usage);
        u.generator_cpu_s += p.generator_cpu_s;
        u.generator_busy = u.generator_busy.max(p.generator_busy);
        u.generator_saturated |= p.generator_saturated;
        u.host_busy = u.host_busy.max(p.host_busy);
        u.machine_saturated |= p.machine_saturated;
        self.shards += 1;
    }
}

/// One generator process's outcome, as shipped to the leader of a sharded run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Part {
    clients: usize,
    publishers: usize,
    subscribers: usize,
    scheduled: u64,
    published: u64,
    publish_errors: u64,
    expected: u64,
    lost: u64,
    #[serde(default)]
    lost_by_cause: LostByCause,
    counts: Counts,
    latency: Vec<(u64, u64)>,
    pub(crate) timeline: Vec<Vec<(u64, u64)>>,
    connect: Vec<(u64, u64)>,
    clients_per_server: BTreeMap<String, u64>,
    publish_s: f64,
    drain_s: f64,
    max_lag_s: f64,
    usage: Usage,
}

/// Connects `count` clients through the coordinator, `CONNECT_CONCURRENCY` at a time, client
/// `i` with `config(i)`, and records how long each took into `connect` (µs).
pub(crate) async fn connect(
    count: usize,
    config: impl Fn(usize) -> ClientConfig,
    connect: &mut Histogram<u64>,
    progress: &Progress,
) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(count);
    progress.phase(count as u64);
    while clients.len() < count {
        let first = clients.len();
        let batch = CONNECT_CONCURRENCY.min(count - first);
        let connected = join_all((first..first + batch).map(|i| {
            let config = config(i);
            async move {
                let start = Instant::now();
                let client = Client::connect(config).await;
                (client, start.elapsed())
            }
        }))
        .await;
        for (client, took) in connected {
            clients.push(client.context("connecting a client through the coordinator")?);
            connect.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
        }
        progress.update(
            clients.len() as u64,
            format!("connected {}/{count}", clients.len()),
        );
    }
    Ok(clients)
}

/// Which messages a receiver should get: those on its topic from the publishers to it.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    pub(crate) topic: String,
    /// The workload and topic index that decide which publishers count; `None`: any.
    pub(crate) publishers: Option<(Workload, usize)>,
}

impl Expect {
    fn from(&self, publisher: u32) -> bool {
        self.publishers.is_none_or(|(workload, topic)| {
            (publisher as usize) < workload.clients
                && workload.role(publisher as usize).publishes == Some(topic)
        })
    }
}

/// Expected deliveries at the receivers `(topic, tally)` when the publishers on topic `t` sent
/// `sent[t]` (publisher, count) each and lost their servers at `outages`, and those that never
/// arrived by cause. What a publisher was told reached no one (`refused`: its numbers, in
/// order) is not expected.
pub(crate) fn lost(
    tallies: &[(usize, Tally)],
    sent: &HashMap<usize, Vec<(u32, u64)>>,
    outages: &HashMap<u32, Vec<u64>>,
    refused: &HashMap<u32, Vec<u64>>,
) -> (u64, LostByCause) {
    let (mut expected, mut lost) = (0, LostByCause::default());
    for (topic, tally) in tallies {
        let sent = sent.get(topic).map_or(&[][..], Vec::as_slice);
        for &(publisher, n) in sent {
            let told = refused
                .get(&publisher)
                .map_or(0, |r| loss::numbers_in(r, 0, n.saturating_sub(1)));
            expected += n - told.min(n);
        }
        lost.add(&loss::attribute(tally, sent, outages, refused));
    }
    (expected, lost)
}

impl Round {
    fn topic(&self, index: usize) -> String {
        format!("{}/{index}", self.topic_prefix)
    }

    /// Runs the round. `control` is the channel to the other generator processes of a sharded
    /// run (`None` when this process drives every client).
    pub(crate) async fn run(
        &self,
        mut control: Option<&mut Control>,
        meter: &Meter,
        progress: &Progress,
    ) -> anyhow::Result<Outcome> {
        let mine: Vec<usize> = (0..self.workload.clients)
            .filter(|&c| self.shard.owns(c))
            .collect();
        let roles: Vec<_> = mine.iter().map(|&c| self.workload.role(c)).collect();
        // The first `--slow-subscribers` subscribers of this process read slowly.
        let slow: Vec<bool> = roles
            .iter()
            .scan(0, |seen, role| {
                let subscriber = role.subscribes.is_some();
                *seen += usize::from(subscriber);
                Some(subscriber && *seen <= self.slow.subscribers)
            })
            .collect();
        let mut connect_us = measure::histogram();
        let config = |i: usize| {
            let mut config = ClientConfig::new(&self.coordinator);
            if slow[i] {
                config.event_queue = SLOW_EVENT_QUEUE;
            }
            config
        };
        let clients = connect(mine.len(), config, &mut connect_us, progress).await?;
        let mut clients_per_server = BTreeMap::new();
        for client in &clients {
            *clients_per_server.entry(client.server_id()).or_default() += 1;
        }
        progress.line(format!("connected {} clients", clients.len()));

        // Subscribe every subscriber; each ack means the subscription is active cluster-wide.
        let acks = join_all(clients.iter().zip(&roles).filter_map(|(client, role)| {
            role.subscribes.map(|t| client.subscribe([self.topic(t)]))
        }))
        .await;
        for ack in acks {
            ack.context("subscribing")?;
        }
        if let Some(control) = control.as_deref_mut() {
            progress.line(format!(
                "waiting for {} generator processes to be ready",
                self.shard.count
            ));
            control.barrier().await?;
        }

        let timeline = Arc::new(Timeline::new(self.slot, self.duration + self.drain));
        let stop = CancellationToken::new();
        let outages = Arc::new(Outages::default());
        let mut receivers = Vec::new();
        let mut delivered = Vec::new();
        let mut publishers = Vec::new();
        let mut idle = Vec::new();
        for (i, client) in clients.into_iter().enumerate() {
            let (role, index) = (roles[i], mine[i]);
            let id = u32::try_from(index).context("too many clients")?;
            // Whoever reads this client's events records when it lost its server.
            let publisher = role.publishes.map(|_| (outages.clone(), id));
            if let Some(topic) = role.publishes {
                publishers.push(Publisher {
                    handle: client.handle(),
                    topic: self.topic(topic),
                    id,
                    server: measure::server_hash(&client.server_id()),
                });
            }
            let Some(topic) = role.subscribes else {
                idle.push(tokio::spawn(watch(client, publisher, stop.clone())));
                continue;
            };
            let count = Arc::new(AtomicU64::new(0));
            delivered.push(count.clone());
            let expect = Expect {
                topic: self.topic(topic),
                publishers: Some((self.workload, topic)),
            };
            let delay = slow[i].then_some(self.slow.delay);
            let (timeline, stop) = (timeline.clone(), stop.clone());
            receivers.push(tokio::spawn(async move {
                let tally = receive(client, expect, count, delay, timeline, stop, publisher).await;
                (topic, tally)
            }));
        }

        progress.line(format!(
            "publishing for {} s: {} publishers x {} msg/s, {} subscribers, {} B payloads",
            self.duration.as_secs_f64(),
            publishers.len(),
            self.rate,
            receivers.len(),
            self.payload
        ));
        let before = meter.snapshot().await;
        let ticker = tokio::spawn(show_progress(
            progress.clone(),
            delivered.clone(),
            self.duration,
        ));
        let started = Instant::now();
        let busiest = clients_per_server
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(id, _)| id.clone())
            .unwrap_or_default();
        let drain_task = self
            .server_drain
            .clone()
            .map(|plan| tokio::spawn(crate::operator::drain(plan, busiest.clone(), started)));
        let kill_task = self
            .server_kill
            .clone()
            .map(|plan| tokio::spawn(crate::kill::run(plan, busiest, started)));
        let publisher_count = publishers.len();
        let results = join_all(
            publishers
                .into_iter()
                .map(|p| tokio::spawn(p.run(self.rate, self.payload, self.duration))),
        )
        .await;
        let publish_s = started.elapsed().as_secs_f64();
        let after_publishing = meter.snapshot().await;
        let mut sent = Vec::with_capacity(results.len());
        let (mut scheduled, mut published, mut publish_errors, mut max_lag_s) = (0, 0, 0, 0f64);
        for result in results {
            let r = result.context("publisher task failed")?;
            scheduled += r.scheduled;
            published += r.sent;
            publish_errors += r.errors;
            max_lag_s = max_lag_s.max(r.max_lag.as_secs_f64());
            sent.push((r.id, r.sent));
        }
        // Every generator process needs every publisher's count to know what to expect, and
        // when the others' publishers lost their servers. (A publisher's outage after this is
        // seen only by its own process.)
        if let Some(control) = control {
            let others;
            (sent, others) = control.exchange_counts(sent, outages.list()).await?;
            outages.extend(&others);
        }
        let drain_s = drain(
            &delivered,
            self.workload.expected(&sent, self.shard),
            self.drain,
        )
        .await;
        ticker.abort();
        let server_drain = match drain_task {
            Some(task) => Some(task.await.context("drain task failed")?),
            None => None,
        };
        let server_killed = match kill_task {
            Some(task) => Some(task.await.context("kill task failed")?),
            None => None,
        };
        stop.cancel();
        let mut tallies = Vec::with_capacity(receivers.len());
        for receiver in receivers {
            tallies.push(receiver.await.context("receiver task failed")?);
        }
        let mut by_topic: HashMap<usize, Vec<(u32, u64)>> = HashMap::new();
        for &(p, n) in &sent {
            if let Some(topic) = self.workload.role(p as usize).publishes {
                by_topic.entry(topic).or_default().push((p, n));
            }
        }
        for watcher in idle {
            watcher.await.context("watcher task failed")?;
        }
        let (expected, lost_by_cause) = lost(
            &tallies,
            &by_topic,
            &outages.by_publisher(),
            &HashMap::new(),
        );
        let (counts, latency) = merge(&tallies);
        let after_drain = meter.snapshot().await;
        let mut usage = meter.between(&before, &after_publishing);
        usage.take_drops(&meter.between(&before, &after_drain));
        Ok(Outcome {
            clients: mine.len(),
            publishers: publisher_count,
            subscribers: tallies.len(),
            scheduled,
            published,
            publish_errors,
            expected,
            lost: lost_by_cause.total(),
            lost_by_cause,
            counts,
            latency,
            timeline: timeline.take(),
            slot: timeline.slot,
            connect: connect_us,
            clients_per_server,
            publish_s,
            drain_s,
            max_lag_s,
            usage,
            shards: 1,
            server_drain,
            server_killed,
        })
    }
}

/// The receivers' counts and latencies together.
pub(crate) fn merge(tallies: &[(usize, Tally)]) -> (Counts, Histogram<u64>) {
    let mut counts = Counts::default();
    let mut latency = measure::histogram();
    for (_, tally) in tallies {
        counts.add(&tally.counts);
        let _ = latency.add(&tally.latency);
    }
    (counts, latency)
}

/// Waits for messages still in flight, until `expected` have arrived or `limit` passes; returns
/// the seconds from the start of the drain to the last delivery seen (waiting for messages that
/// never come does not count as delivering).
pub(crate) async fn drain(delivered: &[Arc<AtomicU64>], expected: u64, limit: Duration) -> f64 {
    let start = Instant::now();
    let (mut seen, mut last) = (total(delivered), Duration::ZERO);
    while seen < expected && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = total(delivered);
        if now > seen {
            (seen, last) = (now, start.elapsed());
        }
    }
    last.as_secs_f64()
}

pub(crate) fn total(delivered: &[Arc<AtomicU64>]) -> u64 {
    delivered.iter().map(|d| d.load(Ordering::Relaxed)).sum()
}

/// Updates the live line with what has been delivered, until aborted.
pub(crate) async fn show_progress(
    progress: Progress,
    delivered: Vec<Arc<AtomicU64>>,
    duration: Duration,
) {
    let start = Instant::now();
    progress.phase((duration.as_secs_f64() * 10.0) as u64);
    let (mut last, mut last_at) = (0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = total(&delivered);
        let rate = (now - last.min(now)) as f64 / last_at.elapsed().as_secs_f64().max(1e-9);
        (last, last_at) = (now, Instant::now());
        let elapsed = start.elapsed();
        let phase = if elapsed < duration {
            "publishing"
        } else {
            "draining"
        };
        progress.update(
            (elapsed.as_secs_f64() * 10.0) as u64,
            format!("{phase}: delivered {now} ({rate:.0}/s)"),
        );
    }
}

/// A receiving client: records every message until stopped, then closes. `publisher`: the
/// client also publishes, as this id; its outages are recorded there.
pub(crate) async fn receive(
    mut client: Client,
    expect: Expect,
    delivered: Arc<AtomicU64>,
    delay: Option<Duration>,
    timeline: Arc<Timeline>,
    stop: CancellationToken,
    publisher: Option<(Arc<Outages>, u32)>,
) -> Tally {
    let mut tally = Tally::default();
    let mut server = measure::server_hash(&client.server_id());
    // Once stopped (the drain is over), what is still queued for this receiver is read at full
    // speed until the connection goes quiet, as late, not delivered: it and the `Dropped`
    // notices queued behind it tell what became of the messages it had not read.
    let mut late_until = None;
    loop {
        let event = match late_until {
            None => tokio::select! {
                event = client.next_event() => event,
                () = stop.cancelled() => {
                    late_until = Some(tokio::time::Instant::now() + SETTLE);
                    continue;
                }
            },
            Some(deadline) => {
                let quiet = (tokio::time::Instant::now() + SETTLE_QUIET).min(deadline);
                match tokio::time::timeout_at(quiet, client.next_event()).await {
                    Ok(event) => event,
                    Err(_) => break,
                }
            }
        };
        match event {
            Some(Event::Message(m)) if late_until.is_some() => {
                if m.topic == expect.topic {
                    tally.record_late(&m.payload, |p| expect.from(p));
                }
            }
            Some(Event::Message(m)) => {
                if m.topic != expect.topic {
                    tally.counts.misrouted += 1;
                } else if tally.record(&m.payload, server, &timeline, |p| expect.from(p)) {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
            }
            Some(Event::Dropped { count, upstream }) => {
                tally.counts.dropped_reported += count;
                tally.counts.dropped_upstream += upstream;
            }
            Some(Event::Disconnected { .. }) => {
                let now = measure::now_ns();
                tally.counts.disconnects += 1;
                tally.disconnected_at.push(now);
                if let Some((outages, id)) = &publisher {
                    outages.record(*id, now);
                }
            }
            Some(Event::Reconnected { server_id, .. }) => {
                server = measure::server_hash(&server_id);
            }
            Some(Event::Moved { server_id, .. }) => {
                tally.counts.moves += 1;
                server = measure::server_hash(&server_id);
            }
            Some(Event::SubscriptionsRefused { topics, .. }) => {
                tally.counts.refused += topics.len() as u64;
            }
            Some(Event::Recovered { count, .. }) => tally.counts.recovered += count,
            Some(Event::RecoveryGap {
                missed_at_least, ..
            }) => {
                tally.counts.recovery_gaps += 1;
                match missed_at_least {
                    0 => tally.counts.recovery_gap_unknown += 1,
                    n => tally.counts.recovery_gap_missed += n,
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    tally.flush(&timeline);
    client.close().await;
    tally
}

/// A client that does not subscribe: reads its events until stopped, recording when it lost
/// its server if it publishes (`publisher`), then closes.
async fn watch(
    mut client: Client,
    publisher: Option<(Arc<Outages>, u32)>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            event = client.next_event() => event,
            () = stop.cancelled() => break,
        };
        match event {
            Some(Event::Disconnected { .. }) => {
                if let Some((outages, id)) = &publisher {
                    outages.record(*id, measure::now_ns());
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    client.close().await;
}

/// One publishing client.
struct Publisher {
    handle: Handle,
    topic: String,
    id: u32,
    server: u32,
}

/// What one publisher did.
struct Published {
    id: u32,
    scheduled: u64,
    sent: u64,
    errors: u64,
    max_lag: Duration,
}

impl Publisher {
    /// Publishes at `rate` per second for `duration`, open loop: message `k` is due at
    /// `(k + 1 - phase) / rate` after the start, with a random `phase` so publishers do not fire
    /// in lockstep. A message is stamped with the time it was due plus at most
    /// [`TIMER_SLACK_NS`], so when the generator or a full outbound queue holds the publisher
    /// back, the delay counts as latency (no coordinated omission), while the timer's own
    /// millisecond granularity does not; a late publisher catches up rather than skipping.
    async fn run(self, rate: f64, size: usize, duration: Duration) -> Published {
        let phase: f64 = rand::rng().random_range(0.0..1.0);
        let scheduled = (duration.as_secs_f64() * rate + phase).floor() as u64;
        let start = tokio::time::Instant::now();
        let due = |k: u64| Duration::from_secs_f64(((k + 1) as f64 - phase) / rate);
        let (mut sent, mut errors) = (0u64, 0u64);
        let mut max_lag = Duration::ZERO;
        while sent + errors < scheduled {
            tokio::time::sleep_until(start + due(sent + errors)).await;
            // Send everything due by now in one go.
            let target = ((start.elapsed().as_secs_f64() * rate + phase).floor() as u64)
                .clamp(sent + errors + 1, scheduled);
            while sent + errors < target {
                let k = sent + errors;
                let late = start.elapsed().saturating_sub(due(k));
                let stamp = measure::stamp(measure::now_ns(), late, TIMER_SLACK_NS);
                let payload = measure::payload(self.id, sent, self.server, size, stamp);
                max_lag = max_lag.max(start.elapsed().saturating_sub(due(k)));
                match self.handle.publish(&self.topic, payload).await {
                    Ok(()) => sent += 1,
                    // The client was closed under us; the message was never published.
                    Err(_) => errors += 1,
                }
            }
        }
        Published {
            id: self.id,
            scheduled,
            sent,
            errors,
            max_lag,
        }
    }
}
