//! The churn scenario: steady subscribers on a feed topic while workers keep cycling short-lived
//! clients (negotiate, connect, subscribe to a room, publish a few messages to the feed, leave).
//! It measures negotiation latency under churn, checks that every churned message reached the
//! steady subscribers, and that the servers end with exactly the sessions, topics and peer
//! interest they had before the churn: nothing leaks per session. Resident memory early in the
//! churn and at its end shows whether memory grows with sessions.

use std::collections::BTreeMap;
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

use crate::load::{self, Outcome};
use crate::measure::{self, Counts, Timeline};
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
    /// Sessions, topics and peer interest left on the servers beyond the pre-churn baseline.
    pub(crate) leaked_sessions: u64,
    pub(crate) leaked_topics: u64,
    pub(crate) leaked_remote_topics: u64,
    /// Resident memory a third of the way in and at the end (see `rss_scope`).
    pub(crate) rss_early_bytes: u64,
    pub(crate) rss_end_bytes: u64,
    pub(crate) rss_scope: String,
}

/// What one worker did.
#[derive(Default)]
struct Worker {
    sessions: u64,
    failures: u64,
    sent: Vec<(u32, u64)>,
    connect: Option<Histogram<u64>>,
}

impl Churn {
    pub(crate) async fn run(
        &self,
        meter: &Meter,
        progress: &Progress,
    ) -> anyhow::Result<(Outcome, ChurnReport)> {
        let feed = format!("{}/feed", self.topic_prefix);
        let mut steady_connect = measure::histogram();
        let clients = load::connect(
            &self.coordinator,
            self.steady,
            &mut steady_connect,
            progress,
        )
        .await?;
        let mut clients_per_server = BTreeMap::new();
        for client in &clients {
            *clients_per_server.entry(client.server_id()).or_default() += 1;
        }
        for ack in join_all(clients.iter().map(|c| c.subscribe([feed.clone()]))).await {
            ack.context("subscribing")?;
        }
        let baseline = usage::server_stats(&self.coordinator).await?;

        let timeline = Arc::new(Timeline::new(measure::now_ns(), self.slot));
        let stop = CancellationToken::new();
        let mut delivered = Vec::new();
        let mut receivers = Vec::new();
        for client in clients {
            let count = Arc::new(AtomicU64::new(0));
            delivered.push(count.clone());
            receivers.push(tokio::spawn(load::receive(
                client,
                count,
                None,
                timeline.clone(),
                stop.clone(),
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
        let mut merged = Worker::default();
        let mut connect = measure::histogram();
        for worker in join_all(workers).await {
            let w = worker.context("churn worker failed")?;
            merged.sessions += w.sessions;
            merged.failures += w.failures;
            merged.sent.extend(w.sent);
            if let Some(h) = &w.connect {
                let _ = connect.add(h);
            }
        }
        let publish_s = started.elapsed().as_secs_f64();
        let after_publishing = meter.snapshot().await;
        let published: u64 = merged.sent.iter().map(|(_, n)| n).sum();
        let expected = published * self.steady as u64;
        let drain_s = load::drain(&delivered, expected, self.drain).await;
        ticker.abort();

        // The steady clients are still connected; the servers should be back to the baseline.
        let (leaked_sessions, leaked_topics, leaked_remote_topics) = self.leaks(&baseline).await;
        let rss_end = self.rss(meter).await;
        stop.cancel();
        let mut counts = Counts::default();
        let mut latency = measure::histogram();
        for receiver in receivers {
            let tally = receiver.await.context("receiver task failed")?;
            counts.add(&tally.counts);
            let _ = latency.add(&tally.latency);
        }
        let after_drain = meter.snapshot().await;
        let mut usage = meter.between(&before, &after_publishing);
        let drops = meter.between(&before, &after_drain);
        usage.server_dropped = drops.server_dropped;
        usage.server_slow_consumers = drops.server_slow_consumers;
        usage.server_forward_dropped = drops.server_forward_dropped;
        let report = ChurnReport {
            sessions: merged.sessions,
            sessions_per_s: merged.sessions as f64 / publish_s.max(1e-9),
            connect_failures: merged.failures,
            leaked_sessions,
            leaked_topics,
            leaked_remote_topics,
            rss_early_bytes: rss_early,
            rss_end_bytes: rss_end,
            rss_scope: match meter.servers {
                Servers::Embedded => "process (embedded cluster and load generator together)",
                Servers::Deployed => "all comm server processes together",
            }
            .to_owned(),
        };
        let outcome = Outcome {
            clients: self.steady,
            publishers: merged.sent.len(),
            subscribers: self.steady,
            scheduled: merged.sessions * self.messages,
            published,
            publish_errors: merged.sessions * self.messages
                - published.min(merged.sessions * self.messages),
            expected,
            counts,
            latency,
            timeline: timeline.take(),
            slot: timeline.slot,
            connect,
            clients_per_server,
            publish_s,
            drain_s,
            usage,
            shards: 1,
        };
        Ok((outcome, report))
    }

    /// One worker: sessions back to back until the duration is up.
    async fn work(self, feed: String, next_id: Arc<AtomicU32>, started: Instant) -> Worker {
        let mut w = Worker {
            connect: Some(measure::histogram()),
            ..Worker::default()
        };
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
            if let Some(h) = &mut w.connect {
                h.saturating_record(
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
                    let payload = measure::payload(id, seq, server, self.payload);
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
    /// over (sessions, topics, peer interest).
    async fn leaks(&self, baseline: &BTreeMap<String, ServerStats>) -> (u64, u64, u64) {
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
            let now = usage::server_stats(&self.coordinator)
                .await
                .unwrap_or_default();
            let leak = excess(&now);
            if leak == (0, 0, 0) || Instant::now() >= deadline {
                return leak;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn rss(&self, meter: &Meter) -> u64 {
        match meter.servers {
            Servers::Embedded => procstat::process().map_or(0, |u| u.rss_bytes),
            Servers::Deployed => usage::server_stats(&self.coordinator)
                .await
                .map_or(0, |s| s.values().map(|s| s.rss_bytes).sum()),
        }
    }
}
