//! The churn scenario: steady subscribers on a feed topic while workers keep cycling short-lived
//! clients (negotiate, connect, subscribe to a room, publish a few messages to the feed, leave).
//! It measures negotiation latency under churn, checks that every churned message reached the
//! steady subscribers, and that the servers end with exactly the sessions, topics and peer
//! interest they had before the churn: nothing leaks per session. Resident memory early in the
//! churn and at its end shows whether memory grows with sessions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use relaymesh_client::{Client, ClientConfig};
use relaymesh_net::procstat;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::load::{self, Expect, Outcome};
use crate::measure::{self, Timeline};
use crate::progress::Progress;
use crate::usage::{self, Meter, ServerStats, Servers};

/// Rooms the churning clients subscribe to in turn (so interest appears and disappears).
const ROOMS: u32 = 16;
/// How long the servers get to clean up after the last session before a difference counts
/// as a leak.
const SETTLE: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Churn {
    pub(crate) coordinator: String,
    pub(crate) topic_prefix: String,
    pub(crate) steady: usize,
    pub(crate) workers: usize,
    /// Messages each session publishes before leaving.
    pub(crate) messages: u64,
    /// Publishing pace within a session, per second.
    pub(crate) rate: f64,
    pub(crate) payload: usize,
    pub(crate) duration: Duration,
    pub(crate) drain: Duration,
    pub(crate) slot: Duration,
}

/// What churn adds to the report.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ChurnReport {
    pub(crate) sessions: u64,
    pub(crate) sessions_per_s: f64,
    pub(crate) connect_failures: u64,
    /// Whether the servers' stats could be read after the churn (if not, the leak counts
    /// below mean nothing).
    pub(crate) leaks_checked: bool,
    /// Sessions, topics and peer interest left on the servers beyond the pre-churn baseline.
    pub(crate) leaked_sessions: u64,
    pub(crate) leaked_topics: u64,
    pub(crate) leaked_remote_topics: u64,
    /// Resident memory a third of the way in and at the end (see `rss_scope`).
    pub(crate) rss_early_bytes: u64,
    pub(crate) rss_end_bytes: u64,
    /// `rss_end - rss_early` per thousand sessions in between.
    pub(crate) rss_growth_per_1000_sessions: f64,
    pub(crate) rss_scope: String,
}

/// What one worker did.
struct Worker {
    sessions: u64,
    failures: u64,
    sent: Vec<(u32, u64)>,
    /// Negotiate-and-connect times (µs).
    connect: Histogram<u64>,
}

impl Default for Worker {
    fn default() -> Self {
        Self {
            sessions: 0,
            failures: 0,
            sent: Vec::new(),
            connect: measure::histogram(),
        }
    }
}

impl Churn {
    pub(crate) async fn run(
        &self,
        meter: &Meter,
        progress: &Progress,
    ) -> anyhow::Result<(Outcome, ChurnReport)> {
        let feed = format!("{}/feed", self.topic_prefix);
        let mut steady_connect = measure::histogram();
        let config = |_| ClientConfig::new(&self.coordinator);
        let clients = load::connect(self.steady, config, &mut steady_connect, progress).await?;
        let mut clients_per_server = BTreeMap::new();
        for client in &clients {
            *clients_per_server.entry(client.server_id()).or_default() += 1;
        }
        for ack in join_all(clients.iter().map(|c| c.subscribe([feed.clone()]))).await {
            ack.context("subscribing")?;
        }
        let baseline = usage::server_stats(&self.coordinator)
            .await
            .context("reading the servers' stats before the churn")?;

        let timeline = Arc::new(Timeline::new(self.slot, self.duration + self.drain));
        let stop = CancellationToken::new();
        let mut delivered = Vec::new();
        let mut receivers = Vec::new();
        for client in clients {
            let count = Arc::new(AtomicU64::new(0));
            delivered.push(count.clone());
            let expect = Expect {
                topic: feed.clone(),
                publishers: None,
            };
            receivers.push(tokio::spawn(load::receive(
                client,
                expect,
                count,
                None,
                timeline.clone(),
                stop.clone(),
                None,
            )));
        }
        progress.line(format!(
            "churning for {} s: {} workers, each session publishes {} x {} B to {} steady subscribers",
            self.duration.as_secs_f64(),
            self.workers,
            self.messages,
            self.payload,
            self.steady
        ));
        let before = meter.snapshot().await;
        let ticker = tokio::spawn(load::show_progress(
            progress.clone(),
            delivered.clone(),
            self.duration,
        ));
        let next_id = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..self.workers)
            .map(|_| tokio::spawn(self.clone().work(feed.clone(), next_id.clone(), started)))
            .collect();
        // A third of the way in, the servers have seen churn; take the memory reading to
        // compare with the end.
        tokio::time::sleep(self.duration / 3).await;
        let rss_early = self.rss(meter).await;
        let sessions_early = next_id.load(std::sync::atomic::Ordering::Relaxed);
        let mut merged = Worker::default();
        let mut connect = measure::histogram();
        for worker in join_all(workers).await {
            let w = worker.context("churn worker failed")?;
            merged.sessions += w.sessions;
            merged.failures += w.failures;
            merged.sent.extend(w.sent);
            let _ = connect.add(&w.connect);
        }
        let publish_s = started.elapsed().as_secs_f64();
        let after_publishing = meter.snapshot().await;
        let published: u64 = merged.sent.iter().map(|(_, n)| n).sum();
        let drain_s = load::drain(&delivered, published * self.steady as u64, self.drain).await;
        ticker.abort();

        // The steady clients are still connected; the servers should be back to the baseline.
        let leaks = self.leaks(&baseline).await;
        let rss_end = self.rss(meter).await;
        stop.cancel();
        let mut tallies = Vec::with_capacity(receivers.len());
        for receiver in receivers {
            tallies.push((0, receiver.await.context("receiver task failed")?));
        }
        // The churned publishers' outages are not watched: each lives for a few messages.
        let (expected, lost_by_cause) = load::lost(
            &tallies,
            &HashMap::from([(0, merged.sent.clone())]),
            &HashMap::new(),
            &HashMap::new(),
        );
        let (counts, latency) = load::merge(&tallies);
        let after_drain = meter.snapshot().await;
        let mut usage = meter.between(&before, &after_publishing);
        usage.take_drops(&meter.between(&before, &after_drain));
        let sessions_late = merged.sessions.saturating_sub(u64::from(sessions_early));
        let report = ChurnReport {
            sessions: merged.sessions,
            sessions_per_s: merged.sessions as f64 / publish_s.max(1e-9),
            connect_failures: merged.failures,
            leaks_checked: leaks.is_some(),
            leaked_sessions: leaks.map_or(0, |l| l.0),
            leaked_topics: leaks.map_or(0, |l| l.1),
            leaked_remote_topics: leaks.map_or(0, |l| l.2),
            rss_early_bytes: rss_early,
            rss_end_bytes: rss_end,
            rss_growth_per_1000_sessions: (rss_end as f64 - rss_early as f64)
                / (sessions_late.max(1) as f64 / 1000.0),
            rss_scope: match meter.servers {
                Servers::Embedded => "embedded cluster and load generator: one process",
                Servers::Deployed => "all comm server processes together",
            }
            .to_owned(),
        };
        let scheduled = merged.sessions * self.messages;
        let outcome = Outcome {
            clients: self.steady,
            publishers: merged.sent.len(),
            subscribers: self.steady,
            scheduled,
            published,
            publish_errors: scheduled.saturating_sub(published),
            expected,
            lost: lost_by_cause.total(),
            lost_by_cause,
            counts,
            latency,
            timeline: timeline.take(),
            slot: timeline.slot,
            connect,
            clients_per_server,
            publish_s,
            drain_s,
            max_lag_s: 0.0,
            usage,
            shards: 1,
            server_drain: None,
            server_killed: None,
        };
        Ok((outcome, report))
    }

    /// One worker: sessions back to back until the duration is up.
    async fn work(self, feed: String, next_id: Arc<AtomicU32>, started: Instant) -> Worker {
        let mut w = Worker::default();
        let gap = Duration::from_secs_f64(1.0 / self.rate.max(1e-3));
        while started.elapsed() < self.duration {
            let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t0 = Instant::now();
            let client = match Client::connect(ClientConfig::new(&self.coordinator)).await {
                Ok(client) => client,
                Err(_) => {
                    w.failures += 1;
                    // Do not spin on a coordinator that refuses everyone.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            {
                w.connect.saturating_record(
                    u64::try_from(t0.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
            }
            let room = format!("{}/room/{}", self.topic_prefix, id % ROOMS);
            let server = measure::server_hash(&client.server_id());
            let mut sent = 0;
            if client.subscribe([room]).await.is_ok() {
                let mut tick = tokio::time::interval(gap);
                for seq in 0..self.messages {
                    tick.tick().await;
                    let payload =
                        measure::payload(id, seq, server, self.payload, measure::now_ns());
                    if client.publish(&feed, payload).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
            }
            // `close` sends what is queued before closing, so every publish counts.
            client.close().await;
            w.sessions += 1;
            w.sent.push((id, sent));
        }
        w
    }

    /// Waits up to [`SETTLE`] for every server to be back at `baseline`; returns what is left
    /// over (sessions, topics, peer interest), or `None` if the stats could not be read.
    async fn leaks(&self, baseline: &BTreeMap<String, ServerStats>) -> Option<(u64, u64, u64)> {
        let excess = |now: &BTreeMap<String, ServerStats>| {
            let mut leak = (0, 0, 0);
            for (id, s) in now {
                let b = baseline.get(id).cloned().unwrap_or_default();
                leak.0 += s.clients.saturating_sub(b.clients);
                leak.1 += s.topics.saturating_sub(b.topics);
                leak.2 += s.remote_topics.saturating_sub(b.remote_topics);
            }
            leak
        };
        let deadline = Instant::now() + SETTLE;
        loop {
            let leak = usage::server_stats(&self.coordinator)
                .await
                .ok()
                .map(|now| excess(&now));
            if leak == Some((0, 0, 0)) || Instant::now() >= deadline {
                return leak;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn rss(&self, meter: &Meter) -> u64 {
        match meter.servers {
            Servers::Embedded => procstat::process().map_or(0, |u| u.rss_bytes),
            // Each process once, however many servers it runs.
            Servers::Deployed => usage::server_stats(&self.coordinator).await.map_or(0, |s| {
                s.values()
                    .map(|s| (&s.process, s.rss_bytes))
                    .collect::<BTreeMap<_, _>>()
                    .values()
                    .sum()
            }),
        }
    }
}
