//! One measured round of a steady workload: connect this process's clients through the
//! coordinator, subscribe (each subscription is acknowledged once active cluster-wide), start
//! every publisher on an open-loop schedule, wait for messages still in flight, and gather what
//! the receivers saw.

use std::collections::BTreeMap;
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

use crate::measure::{self, Counts, Tally, Timeline};
use crate::progress::Progress;
use crate::shard::Control;
use crate::usage::{Meter, Usage};
use crate::workload::{Shard, Workload};

/// Clients negotiating at once.
const CONNECT_CONCURRENCY: usize = 100;

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
    pub(crate) counts: Counts,
    pub(crate) latency: Histogram<u64>,
    pub(crate) timeline: Vec<Histogram<u64>>,
    pub(crate) slot: Duration,
    /// Negotiate-and-connect times in microseconds.
    pub(crate) connect: Histogram<u64>,
    pub(crate) clients_per_server: BTreeMap<String, u64>,
    /// From the first publish to the last publisher's end.
    pub(crate) publish_s: f64,
    /// Time spent waiting for messages in flight after publishing ended.
    pub(crate) drain_s: f64,
    pub(crate) usage: Usage,
    /// Generator processes that contributed.
    pub(crate) shards: usize,
}

impl Outcome {
    pub(crate) fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.counts.delivered)
    }

    pub(crate) fn delivered_per_s(&self) -> f64 {
        self.counts.delivered as f64 / self.publish_s.max(1e-9)
    }

    /// Delivered over expected (1.0 when nothing was expected).
    pub(crate) fn delivery(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            self.counts.delivered as f64 / self.expected as f64
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
            counts: self.counts,
            latency: measure::to_pairs(&self.latency),
            timeline: self.timeline.iter().map(measure::to_pairs).collect(),
            connect: measure::to_pairs(&self.connect),
            clients_per_server: self.clients_per_server.clone(),
            publish_s: self.publish_s,
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
        self.counts.add(&part.counts);
        measure::add_pairs(&mut self.latency, &part.latency);
        measure::add_pairs(&mut self.connect, &part.connect);
        if self.timeline.len() < part.timeline.len() {
            self.timeline
                .resize_with(part.timeline.len(), measure::histogram);
        }
        for (slot, pairs) in self.timeline.iter_mut().zip(&part.timeline) {
            measure::add_pairs(slot, pairs);
        }
        for (server, n) in &part.clients_per_server {
            *self.clients_per_server.entry(server.clone()).or_default() += n;
        }
        self.publish_s = self.publish_s.max(part.publish_s);
        let (u, p) = (&mut self.usage, &part.usage);
        u.generator_cpu_s += p.generator_cpu_s;
        u.generator_busy = u.generator_busy.max(p.generator_busy);
        u.generator_saturated |= p.generator_saturated;
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
    counts: Counts,
    latency: Vec<(u64, u64)>,
    timeline: Vec<Vec<(u64, u64)>>,
    connect: Vec<(u64, u64)>,
    clients_per_server: BTreeMap<String, u64>,
    publish_s: f64,
    usage: Usage,
}

/// Connects `count` clients through the coordinator, `CONNECT_CONCURRENCY` at a time, and
/// records how long each took into `connect` (µs).
pub(crate) async fn connect(
    coordinator: &str,
    count: usize,
    connect: &mut Histogram<u64>,
    progress: &Progress,
) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(count);
    progress.phase(count as u64);
    while clients.len() < count {
        let batch = CONNECT_CONCURRENCY.min(count - clients.len());
        let connected = join_all((0..batch).map(|_| async {
            let start = Instant::now();
            let client = Client::connect(ClientConfig::new(coordinator)).await;
            (client, start.elapsed())
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
        let mut connect_us = measure::histogram();
        let clients = connect(&self.coordinator, mine.len(), &mut connect_us, progress).await?;
        let mut clients_per_server = BTreeMap::new();
        for client in &clients {
            *clients_per_server.entry(client.server_id()).or_default() += 1;
        }
        progress.line(format!("connected {} clients", clients.len()));

        // Subscribe every subscriber; each ack means the subscription is active cluster-wide.
        let roles: Vec<_> = mine.iter().map(|&c| self.workload.role(c)).collect();
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

        let start_ns = measure::now_ns();
        let timeline = Arc::new(Timeline::new(start_ns, self.slot));
        let stop = CancellationToken::new();
        let mut receivers = Vec::new();
        let mut delivered = Vec::new();
        let mut publishers = Vec::new();
        let mut idle = Vec::new();
        let subscriber_total = roles.iter().filter(|r| r.subscribes.is_some()).count();
        let mut slow_left = self.slow.subscribers;
        for ((client, role), &index) in clients.into_iter().zip(&roles).zip(&mine) {
            if let Some(topic) = role.publishes {
                publishers.push(Publisher {
                    handle: client.handle(),
                    topic: self.topic(topic),
                    id: u32::try_from(index).context("too many clients")?,
                    server: measure::server_hash(&client.server_id()),
                });
            }
            if role.subscribes.is_none() {
                idle.push(client);
                continue;
            }
            let count = Arc::new(AtomicU64::new(0));
            delivered.push(count.clone());
            let delay = if slow_left > 0 {
                slow_left -= 1;
                Some(self.slow.delay)
            } else {
                None
            };
            receivers.push(tokio::spawn(receive(
                client,
                count,
                delay,
                timeline.clone(),
                stop.clone(),
            )));
        }

        progress.line(format!(
            "publishing for {} s: {} publishers x {} msg/s, {} subscribers, {} B payloads",
            self.duration.as_secs_f64(),
            publishers.len(),
            self.rate,
            subscriber_total,
            self.payload
        ));
        let before = meter.snapshot().await;
        let ticker = tokio::spawn(show_progress(
            progress.clone(),
            delivered.clone(),
            self.duration,
        ));
        let started = Instant::now();
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
        let (mut scheduled, mut published, mut publish_errors) = (0, 0, 0);
        for result in results {
            let r = result.context("publisher task failed")?;
            scheduled += r.scheduled;
            published += r.sent;
            publish_errors += r.errors;
            sent.push((r.id, r.sent));
        }
        // Every generator process needs every publisher's count to know what to expect.
        if let Some(control) = control {
            sent = control.exchange_counts(sent).await?;
        }
        let expected = self.workload.expected(&sent, self.shard);

        let drain_s = drain(&delivered, expected, self.drain).await;
        ticker.abort();
        stop.cancel();
        let mut counts = Counts::default();
        let mut latency = measure::histogram();
        for receiver in receivers {
            let tally = receiver.await.context("receiver task failed")?;
            counts.add(&tally.counts);
            let _ = latency.add(&tally.latency);
        }
        for client in idle {
            client.close().await;
        }
        let after_drain = meter.snapshot().await;
        let mut usage = meter.between(&before, &after_publishing);
        let drops = meter.between(&before, &after_drain);
        usage.server_dropped = drops.server_dropped;
        usage.server_slow_consumers = drops.server_slow_consumers;
        usage.server_forward_dropped = drops.server_forward_dropped;
        Ok(Outcome {
            clients: mine.len(),
            publishers: publisher_count,
            subscribers: subscriber_total,
            scheduled,
            published,
            publish_errors,
            expected,
            counts,
            latency,
            timeline: timeline.take(),
            slot: timeline.slot,
            connect: connect_us,
            clients_per_server,
            publish_s,
            drain_s,
            usage,
            shards: 1,
        })
    }
}

/// Waits for messages still in flight, until `expected` have arrived or `limit` passes; returns
/// the seconds waited.
pub(crate) async fn drain(delivered: &[Arc<AtomicU64>], expected: u64, limit: Duration) -> f64 {
    let start = Instant::now();
    while total(delivered) < expected && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed().as_secs_f64()
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

/// A receiving client: records every message until stopped, then closes.
pub(crate) async fn receive(
    mut client: Client,
    delivered: Arc<AtomicU64>,
    delay: Option<Duration>,
    timeline: Arc<Timeline>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally::default();
    let mut server = measure::server_hash(&client.server_id());
    loop {
        let event = tokio::select! {
            event = client.next_event() => event,
            () = stop.cancelled() => break,
        };
        match event {
            Some(Event::Message(m)) => {
                if tally.record(&m.payload, server, &timeline) {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
            }
            Some(Event::Dropped { count }) => tally.counts.dropped_reported += count,
            Some(Event::Disconnected { .. }) => tally.counts.disconnects += 1,
            Some(Event::Reconnected { server_id, .. }) => {
                server = measure::server_hash(&server_id);
            }
            Some(_) => {}
            None => break,
        }
    }
    tally.flush(&timeline);
    client.close().await;
    tally
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
}

impl Publisher {
    /// Publishes at `rate` per second for `duration`, open loop: message `k` is due at
    /// `(k + 1 - phase) / rate` after the start, with a random `phase` so publishers do not fire
    /// in lockstep, and a late publisher catches up rather than skipping.
    async fn run(self, rate: f64, size: usize, duration: Duration) -> Published {
        let phase: f64 = rand::rng().random_range(0.0..1.0);
        let scheduled = (duration.as_secs_f64() * rate + phase).floor() as u64;
        let start = tokio::time::Instant::now();
        let (mut sent, mut errors) = (0u64, 0u64);
        while sent + errors < scheduled {
            let due = start + Duration::from_secs_f64(((sent + errors + 1) as f64 - phase) / rate);
            tokio::time::sleep_until(due).await;
            // Send everything due by now in one go.
            let target = ((start.elapsed().as_secs_f64() * rate + phase).floor() as u64)
                .clamp(sent + errors + 1, scheduled);
            while sent + errors < target {
                let payload = measure::payload(self.id, sent, self.server, size);
                match self.handle.publish(&self.topic, payload).await {
                    Ok(()) => sent += 1,
                    // Not connected (e.g. reconnecting): the message was never published.
                    Err(_) => errors += 1,
                }
            }
        }
        Published {
            id: self.id,
            scheduled,
            sent,
            errors,
        }
    }
}
