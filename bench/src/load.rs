//! Message scenarios: connect the subscribers and publishers of a [`Shape`], prove every
//! subscription live with probes, then step the offered rate up. Each step is open loop at a
//! fixed rate (warm-up, measured window, drain); the first step that delivers less than the
//! minimum or whose p99 passes the limit ends the ladder.

use std::time::Duration;

use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use rand::RngExt as _;
use serde::Serialize;

use crate::drivers::{Endpoints, Publisher, Route, Subscriber};
use crate::measure::{self, Phase, SharedTally, Tally, histogram, lock, now_ns, pct_ms};
use crate::servers::Running;

/// Who publishes and who subscribes in a scenario.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// Publishers, one connection and one topic each (topic `i % topics`).
    pub(crate) publishers: usize,
    /// Distinct topics.
    pub(crate) topics: usize,
    /// Subscribers per topic, one connection each.
    pub(crate) subscribers_per_topic: usize,
    /// Server the subscribers connect to (publishers use server 0).
    pub(crate) subscriber_server: usize,
    /// Offered delivered messages per second, one step each.
    pub(crate) ladder: Vec<f64>,
    /// How messages travel: on the topic, as relaymesh direct messages, or from relaymesh's
    /// backend API.
    pub(crate) route: Route,
}

impl Shape {
    /// Deliveries each published message makes.
    fn fanout(&self) -> usize {
        self.subscribers_per_topic
    }
}

/// Step timing and pass criteria.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
    pub(crate) drain: Duration,
    /// Smallest delivered share of expected for a step to pass.
    pub(crate) min_delivery: f64,
    /// Largest p99 for a step to pass.
    pub(crate) max_p99_ms: f64,
}

/// One rate step's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    /// Offered delivered messages per second (publish rate × fan-out).
    pub(crate) offered_per_s: f64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) delivered_per_s: f64,
    pub(crate) delivery_pct: f64,
    /// Deliveries not in publish order (duplicates or reordering).
    pub(crate) out_of_order: u64,
    /// Messages the system refused during the step (relaymesh backend API calls that failed;
    /// other clients see no refusals).
    pub(crate) refused: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    /// Server CPU (all the system's processes) from the end of warm-up to the end of drain.
    pub(crate) server_cpu_s: f64,
    /// `server_cpu_s` over the measured window: 100 is one core kept busy.
    pub(crate) server_cpu_pct: f64,
    pub(crate) delivered_per_cpu_s: f64,
    /// Resident memory of the system's processes at the end of the step.
    pub(crate) server_rss_mib: f64,
    /// The load generator's CPU over the same window, percent of one core.
    pub(crate) generator_cpu_pct: f64,
    /// How late the generator released messages against their schedule (p99, ms): timer slack
    /// plus any time a publish call blocked. Latency is measured from release.
    pub(crate) release_lag_p99_ms: f64,
    /// The generator was at least 90 % busy: the step measures the generator, not the server.
    pub(crate) generator_bound: bool,
    pub(crate) passed: bool,
}

/// A connected scenario: its publishers (with their pacing state) and subscribers.
struct Rig {
    slots: Vec<Slot>,
    tallies: Vec<SharedTally>,
    _subscribers: Vec<Subscriber>,
}

struct Slot {
    publisher: Publisher,
    id: u32,
    seq: u64,
}

/// Connections opened at once while setting a scenario up.
const CONNECT_CONCURRENCY: usize = 64;

async fn connect(at: &Endpoints, shape: &Shape, label: &str) -> anyhow::Result<Rig> {
    let topic = |i: usize| format!("bench-{label}-{i}");
    let tallies: Vec<SharedTally> = (0..shape.topics * shape.subscribers_per_topic)
        .map(|_| std::sync::Arc::new(std::sync::Mutex::new(Tally::new(0))))
        .collect();
    let subscribers =
        futures_util::stream::iter(tallies.iter().enumerate())
            .map(|(i, tally)| {
                let t = topic(i % shape.topics);
                let tally = tally.clone();
                async move {
                    Subscriber::start(at, shape.subscriber_server, &t, shape.route, tally).await
                }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
    let publishers = futures_util::stream::iter(0..shape.publishers)
        .map(|i| async move {
            let t = topic(i % shape.topics);
            Publisher::connect(at, 0, &t, shape.route).await
        })
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let slots = publishers
        .into_iter()
        .enumerate()
        .map(|(i, publisher)| Slot {
            publisher,
            id: u32::try_from(i).unwrap_or(u32::MAX),
            seq: 0,
        })
        .collect();
    Ok(Rig {
        slots,
        tallies,
        _subscribers: subscribers,
    })
}

/// Sends probes until every subscriber has received one: subscriptions (and, between two
/// servers, interest) are live everywhere before anything is measured.
async fn probe(rig: &mut Rig) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for s in &mut rig.slots {
            let p = measure::payload(now_ns(), s.seq, s.id, 0, Phase::Probe);
            s.seq += 1;
            s.publisher.send(p).await?;
            s.publisher.flush().await?;
        }
        let waiting = rig.tallies.iter().filter(|t| lock(t).probes == 0).count();
        if waiting == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{waiting} subscribers received no probe in 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU and memory of the servers and of this generator at one moment.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at_ns: u64,
    server_cpu_s: f64,
    server_rss: u64,
    generator_cpu_s: f64,
}

fn read(running: &Running) -> Reading {
    let (server_cpu_s, server_rss) = running.usage();
    Reading {
        at_ns: now_ns(),
        server_cpu_s,
        server_rss,
        generator_cpu_s: relaymesh_net::procstat::process().map_or(0.0, |u| u.cpu_seconds),
    }
}

/// Publishes open loop at `rate` per publisher for warm-up plus the measured window; returns the
/// reading taken when the measured window began, the messages due in it and how late (µs) the
/// generator released them against their schedule.
async fn pace(
    rig: &mut Rig,
    rate: f64,
    step: u32,
    w: &Window,
    running: &Running,
) -> anyhow::Result<(Reading, u64, Histogram<u64>)> {
    let interval = 1e9 / rate;
    let start = now_ns() + 1_000_000;
    let warm_end = start + w.warmup.as_nanos() as u64;
    let end = warm_end + w.measure.as_nanos() as u64;
    let mut rng = rand::rng();
    // Random phases so publishers do not all fire on the same tick.
    let offsets: Vec<u64> = rig
        .slots
        .iter()
        .map(|_| (rng.random::<f64>() * interval) as u64)
        .collect();
    let mut sent = vec![0u64; rig.slots.len()];
    let mut measured = 0u64;
    let mut begin = None;
    let mut lag = histogram();
    loop {
        let now = now_ns();
        if begin.is_none() && now >= warm_end {
            begin = Some(read(running));
        }
        let mut pending = false;
        for (i, s) in rig.slots.iter_mut().enumerate() {
            let mut fired = false;
            loop {
                let due = start + offsets[i] + (sent[i] as f64 * interval) as u64;
                if due >= end {
                    break;
                }
                if due > now {
                    pending = true;
                    break;
                }
                let phase = if due < warm_end {
                    Phase::Warmup
                } else {
                    measured += 1;
                    lag.saturating_record((now - due) / 1000);
                    Phase::Measured
                };
                // Stamped when released to the client: the timer's 1-2 ms of slack is the
                // generator's, not the system's. How late releases were is `lag`.
                s.publisher
                    .send(measure::payload(now, s.seq, s.id, step, phase))
                    .await?;
                s.seq += 1;
                sent[i] += 1;
                fired = true;
            }
            if fired {
                s.publisher.flush().await?;
            }
        }
        if !pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let begin = begin.unwrap_or_else(|| read(running));
    Ok((begin, measured, lag))
}

async fn run_step(
    rig: &mut Rig,
    shape: &Shape,
    offered: f64,
    step: u32,
    w: &Window,
    running: &Running,
) -> anyhow::Result<Step> {
    for t in &rig.tallies {
        *lock(t) = Tally::new(step);
    }
    let refused = |rig: &Rig| -> u64 { rig.slots.iter().map(|s| s.publisher.refused()).sum() };
    let refused_before = refused(rig);
    let rate = offered / (shape.publishers * shape.fanout()) as f64;
    let (begin, measured, lag) = pace(rig, rate, step, w, running).await?;
    let expected = measured * shape.fanout() as u64;
    let drain_end = tokio::time::Instant::now() + w.drain;
    while tokio::time::Instant::now() < drain_end {
        let received: u64 = rig.tallies.iter().map(|t| lock(t).received).sum();
        if received >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = read(running);
    let refused = refused(rig).saturating_sub(refused_before);
    let mut latency = histogram();
    let (mut delivered, mut out_of_order) = (0, 0);
    for t in &rig.tallies {
        let t = lock(t);
        delivered += t.received;
        out_of_order += t.out_of_order;
        let _ = latency.add(&t.latency);
    }
    let measure_s = w.measure.as_secs_f64();
    let server_cpu_s = end.server_cpu_s - begin.server_cpu_s;
    let generator_cpu_s = end.generator_cpu_s - begin.generator_cpu_s;
    let elapsed_s = (end.at_ns.saturating_sub(begin.at_ns)) as f64 / 1e9;
    let delivery = if expected == 0 {
        0.0
    } else {
        delivered as f64 / expected as f64
    };
    let p99_ms = pct_ms(&latency, 99.0);
    let generator_cpu_pct = 100.0 * generator_cpu_s / elapsed_s.max(1e-9);
    Ok(Step {
        offered_per_s: offered,
        expected,
        delivered,
        delivered_per_s: delivered as f64 / measure_s,
        delivery_pct: 100.0 * delivery,
        out_of_order,
        refused,
        p50_ms: pct_ms(&latency, 50.0),
        p99_ms,
        p999_ms: pct_ms(&latency, 99.9),
        max_ms: latency.max() as f64 / 1e3,
        server_cpu_s,
        server_cpu_pct: 100.0 * server_cpu_s / measure_s,
        delivered_per_cpu_s: if server_cpu_s > 0.0 {
            delivered as f64 / server_cpu_s
        } else {
            0.0
        },
        server_rss_mib: end.server_rss as f64 / (1024.0 * 1024.0),
        generator_cpu_pct,
        release_lag_p99_ms: pct_ms(&lag, 99.0),
        generator_bound: generator_cpu_pct >= 90.0,
        // A publisher held back by its system falls behind its schedule; that fails the step
        // just as latency does.
        passed: expected > 0
            && delivery >= w.min_delivery
            && p99_ms <= w.max_p99_ms
            && pct_ms(&lag, 99.0) <= w.max_p99_ms,
    })
}

/// Runs a scenario's whole ladder against a running system; `progress` gets each step.
pub(crate) async fn run(
    at: &Endpoints,
    running: &Running,
    shape: &Shape,
    label: &str,
    w: &Window,
    mut progress: impl FnMut(&Step),
) -> anyhow::Result<Vec<Step>> {
    let mut rig = connect(at, shape, label).await?;
    probe(&mut rig).await?;
    let mut steps = Vec::new();
    for (i, &offered) in shape.ladder.iter().enumerate() {
        let step = run_step(&mut rig, shape, offered, u32::try_from(i + 1)?, w, running).await?;
        progress(&step);
        let passed = step.passed;
        steps.push(step);
        if !passed {
            break;
        }
    }
    for s in rig.slots {
        s.publisher.close().await;
    }
    Ok(steps)
}
