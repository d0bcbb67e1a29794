//! The `direct` scenario: nodes send direct messages to random other nodes across the servers
//! while a share of the nodes is offline for the first half of the run and logs in after it;
//! what was sent to them meanwhile waits in their inboxes.
//!
//! Every ordered pair (sender, receiver) is its own numbered stream (the header's publisher
//! field is `sender * nodes + receiver`), so loss, duplicates and order are counted exactly as
//! for topics. Latency is that of messages delivered live; messages delivered from an inbox
//! are timed from the receiver's login instead (time to inbox delivery).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use rand::RngExt as _;
use relaymesh_client::{Client, ClientConfig, Credentials, Event, Handle, NodeDetails};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::load::{self, Outcome};
use crate::measure::{self, Tally, Timeline};
use crate::progress::Progress;
use crate::usage::Meter;

/// Nodes registered at once.
const REGISTER_CONCURRENCY: usize = 50;
/// As in `load`: a generator that wakes on millisecond ticks is not charged to the cluster.
const TIMER_SLACK_NS: u64 = 2_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Direct {
    pub(crate) coordinator: String,
    /// Logs in to the account whose nodes are registered (a `sql` store keeps the inbox).
    pub(crate) credentials: Credentials,
    pub(crate) nodes: usize,
    /// Nodes offline for the first half of the run.
    pub(crate) offline: usize,
    /// Messages per second per sending (initially online) node.
    pub(crate) rate: f64,
    pub(crate) payload: usize,
    pub(crate) duration: Duration,
    pub(crate) drain: Duration,
    pub(crate) slot: Duration,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Millis {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Millis {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1_000.0;
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// What only this scenario measures (the rest is in the common outcome).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DirectReport {
    pub(crate) nodes: usize,
    pub(crate) offline_nodes: usize,
    /// Messages stored in an inbox (`Accepted`).
    pub(crate) accepted: u64,
    /// Messages refused (`Undeliverable`): none with the inbox on.
    pub(crate) undeliverable: u64,
    /// Deliveries from inboxes (first deliveries only).
    pub(crate) inbox_delivered: u64,
    /// Inbox deliveries that came after a later message of the same sender that found the node
    /// online (not counted in `out_of_order`: the inbox is read once the node is reachable, so
    /// live messages can overtake it).
    pub(crate) inbox_overtaken: u64,
    /// From the start of a late node's login (negotiation and connection included) to each
    /// inbox delivery.
    pub(crate) inbox_delivery_ms: Millis,
    /// From the start of a late node's login to its `Online` presence event at a watcher on
    /// each server (the event comes from the same copy of the directory `ListNodes` answers
    /// from, so this is when the node is listed there).
    pub(crate) presence_visible_ms: Millis,
    /// Presence events seen of the late nodes' logins (one per late node per server).
    pub(crate) presence_seen: u64,
}

/// What one node's client saw.
#[derive(Debug, Default)]
struct Seen {
    tally: Tally,
    accepted: u64,
    undeliverable: u64,
    /// The numbers ([`Handle::send`]'s) of this node's sends that were undeliverable.
    refused: Vec<u64>,
    overtaken: u64,
    inbox: Option<Histogram<u64>>,
}

impl Direct {
    pub(crate) async fn run(
        &self,
        meter: &Meter,
        progress: &Progress,
    ) -> anyhow::Result<(Outcome, DirectReport)> {
        let n = self.nodes;
        anyhow::ensure!(n >= 2, "direct needs at least 2 nodes (--clients)");
        anyhow::ensure!(self.offline < n, "--offline-nodes must be below --clients");
        anyhow::ensure!(
            u32::try_from(n * n).is_ok(),
            "too many nodes for the message header (at most 65535)"
        );
        progress.line(format!("registering {n} nodes"));
        let mut tokens = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut config = ClientConfig::new(&self.coordinator);
        config.credentials = self.credentials.clone();
        while ids.len() < n {
            let batch = REGISTER_CONCURRENCY.min(n - ids.len());
            let first = ids.len();
            let registered = join_all((first..first + batch).map(|i| {
                let details = NodeDetails {
                    name: format!("sim-node-{i}"),
                    ..NodeDetails::default()
                };
                relaymesh_client::register_node(&config, details)
            }))
            .await;
            for node in registered {
                let node = node.context(
                    "registering a node (the direct scenario needs a coordinator on the sql store)",
                )?;
                ids.push(node.node_id);
                tokens.push(node.token);
            }
        }
        let ids = Arc::new(ids);
        let node_config = |i: usize| {
            let mut config = ClientConfig::new(&self.coordinator);
            config.credentials = Credentials::NodeToken(tokens[i].clone());
            config
        };
        let online = n - self.offline;
        let mut connect_us = measure::histogram();
        let clients = load::connect(online, node_config, &mut connect_us, progress).await?;
        let mut clients_per_server = BTreeMap::new();
        for client in &clients {
            *clients_per_server.entry(client.server_id()).or_default() += 1;
        }
        progress.line(format!(
            "{online} nodes online, {} to log in halfway",
            self.offline
        ));

        let timeline = Arc::new(Timeline::new(self.slot, self.duration + self.drain));
        let stop = CancellationToken::new();
        // First deliveries, and sends their sender was told reached no one: what the drain
        // waits for.
        let delivered = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(online);
        for (i, client) in clients.into_iter().enumerate() {
            senders.push(Sender {
                handle: client.handle(),
                me: i,
                nodes: ids.clone(),
                server: measure::server_hash(&client.server_id()),
            });
            readers.push(spawn_reader(
                client, i, n, None, &timeline, &stop, &delivered,
            ));
        }

        let before = meter.snapshot().await;
        let started = Instant::now();
        let sending = join_all(
            senders
                .into_iter()
                .map(|s| tokio::spawn(s.run(self.rate, self.payload, self.duration))),
        );
        // The late nodes log in halfway through.
        // A watcher of presence events on each server, to time when the late nodes show.
        let mut watchers = Vec::new();
        let late_ids: std::collections::HashSet<String> = ids[online..].iter().cloned().collect();
        let logged_in_at = Arc::new(AtomicU64::new(u64::MAX));
        let tls = relaymesh_net::tls::Connector::default();
        let servers = relaymesh_client::cluster::servers(&self.coordinator, &tls)
            .await
            .context("listing the comm servers")?;
        for server in servers {
            let mut config = ClientConfig::new(&self.coordinator);
            config.credentials = self.credentials.clone();
            config.preferred_server = Some(server.id);
            let watcher = Client::connect(config)
                .await
                .context("connecting a presence watcher")?;
            watcher.watch_presence().await?;
            watchers.push(spawn_watcher(
                watcher,
                late_ids.clone(),
                logged_in_at.clone(),
                &stop,
            ));
        }
        let late = async {
            tokio::time::sleep(self.duration / 2).await;
            let late_config = |i: usize| node_config(online + i);
            let mut late_connect = measure::histogram();
            let logged_in = measure::now_ns();
            logged_in_at.store(logged_in, Ordering::Relaxed);
            let clients =
                load::connect(self.offline, late_config, &mut late_connect, progress).await?;
            let mut late_readers = Vec::new();
            for (i, client) in clients.into_iter().enumerate() {
                late_readers.push(spawn_reader(
                    client,
                    online + i,
                    n,
                    Some(logged_in),
                    &timeline,
                    &stop,
                    &delivered,
                ));
            }
            Ok::<_, anyhow::Error>((late_readers, late_connect))
        };
        let (results, late) = tokio::join!(sending, late);
        let (late_readers, late_connect) = late?;
        readers.extend(late_readers);
        connect_us.add(&late_connect).ok();
        let publish_s = started.elapsed().as_secs_f64();
        let after_publishing = meter.snapshot().await;
        // Per receiver, what each pair stream sent.
        let mut sent: HashMap<usize, Vec<(u32, u64)>> = HashMap::new();
        let mut logs = HashMap::new();
        let (mut scheduled, mut published, mut errors, mut max_lag_s) = (0, 0, 0, 0f64);
        for result in results {
            let mut r = result.context("sender task failed")?;
            logs.insert(r.me, std::mem::take(&mut r.log));
            scheduled += r.scheduled;
            published += r.sent.iter().sum::<u64>();
            errors += r.errors;
            max_lag_s = max_lag_s.max(r.max_lag.as_secs_f64());
            for (to, count) in r.sent.iter().enumerate() {
                if *count > 0 {
                    let pair = u32::try_from(r.me * n + to).unwrap_or(u32::MAX);
                    sent.entry(to).or_default().push((pair, *count));
                }
            }
        }
        let drain_s = load::drain(std::slice::from_ref(&delivered), published, self.drain).await;
        stop.cancel();
        let mut tallies = Vec::with_capacity(n);
        let (mut accepted, mut undeliverable, mut overtaken) = (0, 0, 0);
        let mut inbox = measure::histogram();
        // What each pair's sender was told reached no one (INBOX_FULL, say) is not expected.
        let mut refused: HashMap<u32, Vec<u64>> = HashMap::new();
        for reader in readers {
            let (node, seen) = reader.await.context("reader task failed")?;
            let log = logs.get(&node).map_or(&[][..], Vec::as_slice);
            for seq in &seen.refused {
                if let Ok(i) = log.binary_search_by_key(seq, |&(s, _, _)| s) {
                    let (_, to, number) = log[i];
                    let pair = u32::try_from(node * n + to).unwrap_or(u32::MAX);
                    refused.entry(pair).or_default().push(number);
                }
            }
            accepted += seen.accepted;
            undeliverable += seen.undeliverable;
            overtaken += seen.overtaken;
            if let Some(h) = &seen.inbox {
                inbox.add(h).ok();
            }
            tallies.push((node, seen.tally));
        }
        let mut presence = measure::histogram();
        for watcher in watchers {
            presence
                .add(&watcher.await.context("presence watcher failed")?)
                .ok();
        }
        for numbers in refused.values_mut() {
            numbers.sort_unstable();
        }
        let (expected, lost_by_cause) = load::lost(&tallies, &sent, &HashMap::new(), &refused);
        let (counts, latency) = load::merge(&tallies);
        let after_drain = meter.snapshot().await;
        let mut usage = meter.between(&before, &after_publishing);
        usage.take_drops(&meter.between(&before, &after_drain));
        let outcome = Outcome {
            clients: n,
            publishers: online,
            subscribers: n,
            scheduled,
            published,
            publish_errors: errors,
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
            server_drain: None,
            server_killed: None,
        };
        let report = DirectReport {
            nodes: n,
            offline_nodes: self.offline,
            accepted,
            undeliverable,
            inbox_delivered: inbox.len(),
            inbox_overtaken: overtaken,
            inbox_delivery_ms: Millis::of(&inbox),
            presence_visible_ms: Millis::of(&presence),
            presence_seen: presence.len(),
        };
        Ok((outcome, report))
    }
}

/// Reads node `node`'s events until stopped: direct messages into its tally (those from the
/// inbox timed from `logged_in`, when it logged in late), and the answers to what it sent.
fn spawn_reader(
    mut client: Client,
    node: usize,
    nodes: usize,
    logged_in: Option<u64>,
    timeline: &Arc<Timeline>,
    stop: &CancellationToken,
    delivered: &Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(usize, Seen)> {
    let (timeline, stop, delivered) = (timeline.clone(), stop.clone(), delivered.clone());
    tokio::spawn(async move {
        let mut seen = Seen {
            inbox: logged_in.map(|_| measure::histogram()),
            ..Seen::default()
        };
        let mut server = measure::server_hash(&client.server_id());
        let mine = |pair: u32| pair as usize % nodes == node;
        loop {
            let event = tokio::select! {
                event = client.next_event() => event,
                () = stop.cancelled() => break,
            };
            match event {
                Some(Event::Direct(d)) => {
                    let now = measure::now_ns();
                    let first = if d.inbox_id > 0 {
                        // Timed from the login, not from the send; overtaken by live messages
                        // is counted on its own.
                        let disorder = seen.tally.counts.out_of_order;
                        let fresh = seen.tally.record_untimed(&d.payload, server, mine);
                        if seen.tally.counts.out_of_order > disorder {
                            seen.tally.counts.out_of_order = disorder;
                            seen.overtaken += 1;
                        }
                        if fresh && let (Some(h), Some(at)) = (&mut seen.inbox, logged_in) {
                            h.saturating_record((now.saturating_sub(at) / 1_000).max(1));
                        }
                        fresh
                    } else {
                        seen.tally
                            .record_at(&d.payload, server, &timeline, mine, now)
                    };
                    if first {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Event::Accepted { .. }) => seen.accepted += 1,
                Some(Event::Undeliverable { seq, .. }) => {
                    seen.undeliverable += 1;
                    seen.refused.push(seq);
                    // Settled: the drain waits for no delivery of it.
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                Some(Event::Dropped { count, upstream }) => {
                    seen.tally.counts.dropped_reported += count;
                    seen.tally.counts.dropped_upstream += upstream;
                }
                Some(Event::Disconnected { .. }) => {
                    seen.tally.counts.disconnects += 1;
                    seen.tally.disconnected_at.push(measure::now_ns());
                }
                Some(Event::Reconnected { server_id, .. }) => {
                    server = measure::server_hash(&server_id);
                }
                Some(_) => {}
                None => break,
            }
        }
        seen.tally.flush(&timeline);
        client.close().await;
        (node, seen)
    })
}

/// Records, until stopped, when each of `late` comes online at this watcher, from
/// `logged_in_at` (µs).
fn spawn_watcher(
    mut client: Client,
    late: std::collections::HashSet<String>,
    logged_in_at: Arc<AtomicU64>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<Histogram<u64>> {
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut seen = measure::histogram();
        loop {
            let event = tokio::select! {
                event = client.next_event() => event,
                () = stop.cancelled() => break,
            };
            match event {
                Some(Event::Presence { change, node })
                    if change == relaymesh_client::PresenceChange::Online
                        && late.contains(&node.node_id) =>
                {
                    let since = logged_in_at.load(Ordering::Relaxed);
                    let now = measure::now_ns();
                    if since != u64::MAX {
                        seen.saturating_record((now.saturating_sub(since) / 1_000).max(1));
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        client.close().await;
        seen
    })
}

/// One sending node.
struct Sender {
    handle: Handle,
    me: usize,
    nodes: Arc<Vec<String>>,
    server: u32,
}

/// What one sender did: messages per receiving node.
struct Sent {
    me: usize,
    scheduled: u64,
    sent: Vec<u64>,
    /// Each send: the client's number for it, and the receiving node and its number in that
    /// pair's stream, in the order sent (so by the client's number).
    log: Vec<(u64, usize, u64)>,
    errors: u64,
    max_lag: Duration,
}

impl Sender {
    /// Sends at `rate` per second for `duration`, open loop (as `load`'s publishers do), each
    /// message to a node chosen at random among the others.
    async fn run(self, rate: f64, size: usize, duration: Duration) -> Sent {
        let n = self.nodes.len();
        let phase: f64 = rand::rng().random_range(0.0..1.0);
        let scheduled = (duration.as_secs_f64() * rate + phase).floor() as u64;
        let start = tokio::time::Instant::now();
        let due = |k: u64| Duration::from_secs_f64(((k + 1) as f64 - phase) / rate);
        let mut sent = vec![0u64; n];
        let mut log = Vec::new();
        let (mut done, mut errors) = (0u64, 0u64);
        let mut max_lag = Duration::ZERO;
        while done < scheduled {
            tokio::time::sleep_until(start + due(done)).await;
            let target = ((start.elapsed().as_secs_f64() * rate + phase).floor() as u64)
                .clamp(done + 1, scheduled);
            while done < target {
                let late = start.elapsed().saturating_sub(due(done));
                max_lag = max_lag.max(late);
                let to = {
                    let other = rand::rng().random_range(0..n - 1);
                    if other >= self.me { other + 1 } else { other }
                };
                let pair = u32::try_from(self.me * n + to).unwrap_or(u32::MAX);
                let stamp = measure::stamp(measure::now_ns(), late, TIMER_SLACK_NS);
                let payload = measure::payload(pair, sent[to], self.server, size, stamp);
                match self.handle.send(&self.nodes[to], payload).await {
                    Ok(seq) => {
                        log.push((seq, to, sent[to]));
                        sent[to] += 1;
                    }
                    Err(_) => errors += 1,
                }
                done += 1;
            }
        }
        Sent {
            me: self.me,
            scheduled,
            sent,
            log,
            errors,
            max_lag,
        }
    }
}
