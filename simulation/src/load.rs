//! Driving the load and measuring it at the receivers.
//!
//! Every payload starts with a 20-byte header: send time (ns on this process's monotonic clock,
//! big-endian u64), publisher index (u32) and sequence number (u64). Receivers keep, per
//! publisher, a bitmap of sequence numbers seen, which yields delivered, duplicate and
//! out-of-order counts exactly, and one-way latency from the timestamp. All clients live in this
//! process, so sender and receiver share the clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::future::join_all;
use relaymesh_client::{Client, ClientConfig, Event, Handle};
use tokio_util::sync::CancellationToken;

use crate::Scenario;

/// Bytes of measurement header at the start of every payload.
pub(crate) const HEADER: usize = 20;
/// Clients connected concurrently.
const CONNECT_BATCH: usize = 100;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) scenario: Scenario,
    pub(crate) clients: usize,
    pub(crate) publishers: usize,
    pub(crate) rate: u32,
    pub(crate) payload: usize,
    pub(crate) duration: Duration,
    pub(crate) drain: Duration,
}

/// What was measured.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) publishers: usize,
    pub(crate) subscribers: usize,
    pub(crate) published: u64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) cross_server: u64,
    pub(crate) dropped_reported: u64,
    pub(crate) disconnects: u64,
    /// One-way latencies in microseconds, sorted.
    pub(crate) latency_us: Vec<u64>,
    /// Negotiate-and-connect times in milliseconds, sorted.
    pub(crate) connect_ms: Vec<f64>,
    pub(crate) clients_per_server: BTreeMap<String, usize>,
    /// From the first publish to the last delivery (or the end of the drain).
    pub(crate) elapsed: Duration,
}

fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    u64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Per-receiver bookkeeping.
#[derive(Debug, Default)]
struct Receiver {
    /// Per publisher: seen sequence numbers (bitmap) and the highest so far.
    seen: Vec<(Vec<u64>, Option<u64>)>,
    delivered: u64,
    duplicates: u64,
    out_of_order: u64,
    cross_server: u64,
    dropped_reported: u64,
    disconnects: u64,
    latency_us: Vec<u64>,
}

impl Receiver {
    fn record(&mut self, payload: &[u8], my_server: &str, publisher_servers: &[String]) -> bool {
        let Some(header) = payload.get(..HEADER) else {
            return false;
        };
        let sent = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        let publisher = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default()) as usize;
        let seq = u64::from_be_bytes(header[12..20].try_into().unwrap_or_default());
        if publisher >= self.seen.len() {
            self.seen.resize_with(publisher + 1, Default::default);
        }
        let (bits, highest) = &mut self.seen[publisher];
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= bits.len() {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        bits[word] |= 1 << bit;
        if highest.is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        *highest = Some(highest.map_or(seq, |h| h.max(seq)));
        self.delivered += 1;
        self.latency_us.push(now_ns().saturating_sub(sent) / 1_000);
        if publisher_servers
            .get(publisher)
            .is_some_and(|s| s != my_server)
        {
            self.cross_server += 1;
        }
        true
    }
}

/// Connects the clients, runs the plan and gathers the measurements.
pub(crate) async fn run(coordinator: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let mut clients = Vec::with_capacity(plan.clients);
    let mut connect_ms = Vec::with_capacity(plan.clients);
    while clients.len() < plan.clients {
        let batch = CONNECT_BATCH.min(plan.clients - clients.len());
        let connected = join_all((0..batch).map(|_| async {
            let start = Instant::now();
            let client = Client::connect(ClientConfig::new(coordinator)).await;
            (client, start.elapsed())
        }))
        .await;
        for (client, took) in connected {
            clients.push(client.context("connecting a client through the coordinator")?);
            connect_ms.push(took.as_secs_f64() * 1_000.0);
        }
    }
    eprintln!("connected {} clients", clients.len());
    let mut outcome = Outcome {
        connect_ms,
        ..Outcome::default()
    };
    for client in &clients {
        *outcome
            .clients_per_server
            .entry(client.server_id())
            .or_default() += 1;
    }

    let topic = match plan.scenario {
        Scenario::Fanout => "sim/fanout",
        Scenario::Dense => "sim/dense",
    };
    let (publishers, subscribers): (Vec<usize>, Vec<usize>) = match plan.scenario {
        Scenario::Fanout => (
            (0..plan.publishers).collect(),
            (plan.publishers..plan.clients).collect(),
        ),
        Scenario::Dense => ((0..plan.clients).collect(), (0..plan.clients).collect()),
    };
    outcome.publishers = publishers.len();
    outcome.subscribers = subscribers.len();
    // Subscriptions are acknowledged once active cluster-wide, so nothing published later is
    // missed by design.
    let acks = join_all(subscribers.iter().map(|&i| clients[i].subscribe([topic]))).await;
    for ack in acks {
        ack.context("subscribing")?;
    }
    let publisher_servers: Arc<Vec<String>> =
        Arc::new(publishers.iter().map(|&i| clients[i].server_id()).collect());
    let handles: Vec<Handle> = publishers.iter().map(|&i| clients[i].handle()).collect();

    let stop = CancellationToken::new();
    let delivered_total = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    let mut idle = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        if !subscribers.contains(&i) {
            idle.push(client);
            continue;
        }
        let (stop, delivered_total, publisher_servers) = (
            stop.clone(),
            delivered_total.clone(),
            publisher_servers.clone(),
        );
        receivers.push(tokio::spawn(async move {
            let mut receiver = Receiver::default();
            let mut server = client.server_id();
            loop {
                let event = tokio::select! {
                    event = client.next_event() => event,
                    _ = stop.cancelled() => break,
                };
                match event {
                    Some(Event::Message(m)) => {
                        if receiver.record(&m.payload, &server, &publisher_servers) {
                            delivered_total.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Event::Dropped { count }) => receiver.dropped_reported += count,
                    Some(Event::Disconnected { .. }) => receiver.disconnects += 1,
                    Some(Event::Reconnected { server_id, .. }) => server = server_id,
                    Some(_) => {}
                    None => break,
                }
            }
            client.close().await;
            receiver
        }));
    }

    eprintln!(
        "running {} for {} s: {} publishers x {} msg/s, {} subscribers, {} B payloads",
        topic,
        plan.duration.as_secs(),
        handles.len(),
        plan.rate,
        subscribers.len(),
        plan.payload
    );
    let start = Instant::now();
    let published: Vec<u64> = join_all(handles.into_iter().enumerate().map(|(index, handle)| {
        publish(
            handle,
            topic,
            index as u32,
            plan.rate,
            plan.payload,
            plan.duration,
        )
    }))
    .await;
    outcome.published = published.iter().sum();
    outcome.expected = outcome.published * subscribers.len() as u64;
    // Drain: wait for messages still in flight, up to the drain period.
    let drain_end = Instant::now() + plan.drain;
    while delivered_total.load(Ordering::Relaxed) < outcome.expected && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outcome.elapsed = start.elapsed();
    stop.cancel();
    for receiver in receivers {
        let r = receiver.await.context("receiver task failed")?;
        outcome.delivered += r.delivered;
        outcome.duplicates += r.duplicates;
        outcome.out_of_order += r.out_of_order;
        outcome.cross_server += r.cross_server;
        outcome.dropped_reported += r.dropped_reported;
        outcome.disconnects += r.disconnects;
        outcome.latency_us.extend(r.latency_us);
    }
    for client in idle {
        client.close().await;
    }
    outcome.latency_us.sort_unstable();
    outcome.connect_ms.sort_by(f64::total_cmp);
    Ok(outcome)
}

/// Publishes at `rate` messages per second for `duration` (open loop: a late tick catches up).
async fn publish(
    handle: Handle,
    topic: &str,
    index: u32,
    rate: u32,
    size: usize,
    duration: Duration,
) -> u64 {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate)).max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        ticker.tick().await;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * f64::from(rate)) as u64 + 1;
        while sent < due {
            let mut payload = BytesMut::with_capacity(size);
            payload.put_u64(now_ns());
            payload.put_u32(index);
            payload.put_u64(sent);
            payload.resize(size, 0);
            if handle.publish(topic, Bytes::from(payload)).await.is_err() {
                return sent;
            }
            sent += 1;
        }
    }
    sent
}
