//! Recovery after a lost server, and reading a backlog, on a relaymesh cluster of real
//! processes (a coordinator and three comm servers, `bench/configs/history-recovery.toml`).
//!
//! A trial: a subscriber on server A subscribes to a topic and receives a first few messages
//! from a publisher on server B. Then the coordinator and server A are killed (SIGKILL), so the
//! subscriber loses its server and cannot log in again; the publisher publishes `messages`
//! more and flushes (server B has them all in its history). The coordinator is started again;
//! the subscriber logs in again (on B or C), resubscribes with its positions and receives what
//! it missed. Measured: from the coordinator's restart and from `Event::Reconnected` to
//! `Event::Recovered`; checked: every missed message arrived once, in order, before
//! `Recovered`, and live messages follow. Every trial starts a fresh cluster.
//!
//! A backlog read: a publisher on server A publishes `messages` on a topic nobody subscribes
//! to (so only A holds them); a reader on server C (holding none of it, so every message comes
//! from a peer) and one on A ask `history(topic, Last(messages))`, timed from the call to the
//! answer.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use relaymesh_client::{Client, Event, HistoryQuery};
use serde::Serialize;

use crate::drivers::System;
use crate::measure::{self, Header, Phase};
use crate::servers::{Launcher, Running};

/// The `[history]` table the cluster runs with.
pub(crate) const HISTORY_CONFIG: &str = "history-recovery.toml";

/// Messages the subscriber receives before it loses its server (it then has a position).
const BEFORE: u64 = 100;
/// Live messages published after the recovery, to see they follow it.
const AFTER: u64 = 10;
/// Longest wait for any one thing (a disconnect, the history to fill, the recovery).
const PATIENCE: Duration = Duration::from_secs(30);
/// The subscriber's reconnect delays: short, so that the time from the coordinator's restart
/// to the reconnect is mostly the login, not the backoff (the client's default grows to 5 s).
const RECONNECT_MIN: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_millis(100);

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Messages published while the subscriber is away, and read in a backlog.
    pub(crate) messages: u64,
    /// Recovery trials, each on a fresh cluster.
    pub(crate) trials: usize,
    /// Timed backlog reads from each reader.
    pub(crate) reads: usize,
}

/// One recovery trial.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Trial {
    pub(crate) trial: usize,
    /// Messages published while the subscriber was away.
    pub(crate) missed: u64,
    /// From killing server A to the subscriber's `Disconnected`.
    pub(crate) disconnect_ms: f64,
    /// Publishing and flushing the missed messages.
    pub(crate) publish_ms: f64,
    /// The server the subscriber reconnected to, and whether it held the missed messages
    /// itself (B, the publisher's) or asked its peers (C).
    pub(crate) reconnected_to: String,
    /// From the coordinator's restart (process started) to `Reconnected`: its start-up, the
    /// comm servers registering again, the client's backoff and its login.
    pub(crate) restart_to_reconnected_ms: f64,
    /// From `Reconnected` to the first recovered message.
    pub(crate) reconnected_to_first_ms: f64,
    /// From `Reconnected` to `Recovered`: the recovery proper (goal < 1 s).
    pub(crate) reconnected_to_recovered_ms: f64,
    /// From the coordinator's restart to `Recovered`.
    pub(crate) restart_to_recovered_ms: f64,
    /// `Recovered { count }`.
    pub(crate) recovered_count: u64,
    /// Missed messages received before `Recovered`.
    pub(crate) received_before_recovered: u64,
    /// `RecoveryGap { missed_at_least }`, if one came.
    pub(crate) gap: Option<u64>,
    /// Over the missed and the live messages after them: duplicates, out of order, missing.
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) missing: u64,
    /// The live messages published after `Recovered` all arrived after the missed ones.
    pub(crate) live_followed: bool,
    /// The new server's counters after the trial.
    pub(crate) server_history_requests: u64,
    pub(crate) server_history_replayed: u64,
    pub(crate) server_history_gaps: u64,
    /// Exactly once, in order, no gap, within 1 s of `Reconnected`.
    pub(crate) passed: bool,
}

/// One timed `history(topic, Last(n))`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Read {
    /// `local` (the reader's server holds the messages) or `peers` (it holds none).
    pub(crate) from: &'static str,
    pub(crate) asked: u64,
    pub(crate) ms: f64,
    pub(crate) messages: u64,
    pub(crate) in_order: bool,
    pub(crate) gap: bool,
}

/// Everything the recovery scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RecoveryResult {
    pub(crate) trials: Vec<Trial>,
    pub(crate) reads: Vec<Read>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn payload(seq: u64) -> bytes::Bytes {
    measure::payload(measure::now_ns(), seq, 0, 0, Phase::Measured)
}

fn seq_of(payload: &[u8]) -> anyhow::Result<u64> {
    Header::parse(payload)
        .map(|h| h.seq)
        .context("a message that is not the bench's")
}

async fn publish(client: &Client, topic: &str, seqs: std::ops::Range<u64>) -> anyhow::Result<()> {
    for seq in seqs {
        client.publish(topic, payload(seq)).await?;
    }
    client.flush().await?;
    Ok(())
}

/// The next event, within [`PATIENCE`].
async fn next(client: &mut Client, waiting_for: &str) -> anyhow::Result<Event> {
    tokio::time::timeout(PATIENCE, client.next_event())
        .await
        .with_context(|| format!("no event in {PATIENCE:?} waiting for {waiting_for}"))?
        .with_context(|| format!("the client closed waiting for {waiting_for}"))
}

/// A counter of comm server `i`'s `/v1/stats`.
async fn stat(running: &Running, i: usize, key: &str) -> anyhow::Result<u64> {
    let stats = running.comm_stats(i).await?;
    stats[key]
        .as_u64()
        .with_context(|| format!("no {key} in the stats of server {i}"))
}

/// Waits until comm server `i`'s `key` reaches `at_least`.
async fn stat_reaches(running: &Running, i: usize, key: &str, at_least: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = stat(running, i, key).await?;
        if now >= at_least {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("server {i}'s {key} is {now}, not {at_least}, after {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Order check over sequence numbers that should be `from..to`, each once.
#[derive(Debug, Default)]
struct Order {
    next: u64,
    seen: std::collections::HashSet<u64>,
    duplicates: u64,
    out_of_order: u64,
}

impl Order {
    fn starting_at(next: u64) -> Self {
        Self {
            next,
            ..Self::default()
        }
    }

    fn add(&mut self, seq: u64) {
        if !self.seen.insert(seq) {
            self.duplicates += 1;
        } else if seq != self.next {
            self.out_of_order += 1;
        }
        self.next = seq + 1;
    }

    fn missing(&self, from: u64, to: u64) -> u64 {
        (from..to).filter(|s| !self.seen.contains(s)).count() as u64
    }
}

async fn trial(
    launcher: &Launcher,
    running: &mut Running,
    n: usize,
    missed: u64,
) -> anyhow::Result<Trial> {
    let at = running.endpoints.clone();
    let topic = format!("bench-recovery-{n}");
    let mut sub = at
        .relaymesh_with(0, |c| {
            c.auto_reconnect = true;
            c.reconnect_min = RECONNECT_MIN;
            c.reconnect_max = RECONNECT_MAX;
        })
        .await?;
    sub.subscribe([topic.as_str()]).await?;
    let publisher = at.relaymesh_with(1, |_| {}).await?;
    publish(&publisher, &topic, 0..BEFORE).await?;
    let mut got = 0;
    while got < BEFORE {
        match next(&mut sub, "the first messages").await? {
            Event::Message(m) => {
                if seq_of(&m.payload)? != got {
                    bail!("message {} came as number {got}", seq_of(&m.payload)?);
                }
                if m.position.is_none() {
                    bail!("a message on a topic with history came without a position");
                }
                got += 1;
            }
            Event::SubscriptionConfirmed { .. } => {}
            other => bail!("unexpected {other:?} before the server was lost"),
        }
    }

    // The subscriber loses its server and cannot come back: no coordinator.
    let coordinator = running.stop("coordinator")?;
    let killed = Instant::now();
    running.stop("commserver-a")?;
    match next(&mut sub, "the disconnect").await? {
        Event::Disconnected { .. } => {}
        other => bail!("unexpected {other:?} waiting for the disconnect"),
    }
    let disconnect = killed.elapsed();
    let stored = stat(running, 1, "history_stored").await?;
    let started = Instant::now();
    publish(&publisher, &topic, BEFORE..BEFORE + missed).await?;
    stat_reaches(running, 1, "history_stored", stored + missed).await?;
    let publish_time = started.elapsed();

    running.start_again(launcher, coordinator)?;
    let restart = Instant::now();
    let mut reconnected: Option<(Instant, String)> = None;
    let mut first: Option<Instant> = None;
    let mut gap = None;
    let mut order = Order::starting_at(BEFORE);
    let mut before_recovered = 0;
    let (recovered_at, recovered_count) = loop {
        match next(&mut sub, "the recovery").await? {
            Event::Reconnected { server_id, .. } => {
                reconnected = Some((Instant::now(), server_id));
            }
            Event::Message(m) => {
                if reconnected.is_none() {
                    bail!("a message before the reconnect");
                }
                first.get_or_insert_with(Instant::now);
                order.add(seq_of(&m.payload)?);
                before_recovered += 1;
            }
            Event::RecoveryGap {
                topic: t,
                missed_at_least,
            } if t == topic => gap = Some(missed_at_least),
            Event::Recovered { topic: t, count } if t == topic => break (Instant::now(), count),
            Event::SubscriptionConfirmed { .. } => {}
            other => bail!("unexpected {other:?} during the recovery"),
        }
    };
    let (reconnected_at, server) = reconnected.context("recovered without a reconnect")?;
    // Live messages follow.
    let end = BEFORE + missed + AFTER;
    publish(&publisher, &topic, BEFORE + missed..end).await?;
    let mut live = 0;
    while live < AFTER {
        match next(&mut sub, "the live messages").await? {
            Event::Message(m) => {
                order.add(seq_of(&m.payload)?);
                live += 1;
            }
            Event::SubscriptionConfirmed { .. } => {}
            other => bail!("unexpected {other:?} after the recovery"),
        }
    }
    let live_followed = order.missing(BEFORE + missed, end) == 0;
    let i = at
        .server_ids
        .iter()
        .position(|id| *id == server)
        .with_context(|| format!("reconnected to an unknown server {server}"))?;
    let recovery = recovered_at.duration_since(reconnected_at);
    let missing = order.missing(BEFORE, end);
    let result = Trial {
        trial: n,
        missed,
        disconnect_ms: ms(disconnect),
        publish_ms: ms(publish_time),
        reconnected_to: format!(
            "{server} ({})",
            if i == 1 {
                "holds the missed messages"
            } else {
                "holds none: peers answer"
            }
        ),
        restart_to_reconnected_ms: ms(reconnected_at.duration_since(restart)),
        reconnected_to_first_ms: first.map_or(f64::NAN, |f| ms(f.duration_since(reconnected_at))),
        reconnected_to_recovered_ms: ms(recovery),
        restart_to_recovered_ms: ms(recovered_at.duration_since(restart)),
        recovered_count,
        received_before_recovered: before_recovered,
        gap,
        duplicates: order.duplicates,
        out_of_order: order.out_of_order,
        missing,
        live_followed,
        server_history_requests: stat(running, i, "history_requests").await?,
        server_history_replayed: stat(running, i, "history_replayed").await?,
        server_history_gaps: stat(running, i, "history_gaps").await?,
        passed: gap.is_none()
            && before_recovered == missed
            && recovered_count == missed
            && order.duplicates + order.out_of_order + missing == 0
            && live_followed
            && recovery < Duration::from_secs(1),
    };
    sub.close().await;
    publisher.close().await;
    Ok(result)
}

/// `reads` timed `history(topic, Last(n))` calls of `reader`.
async fn read_backlog(
    reader: &Client,
    topic: &str,
    n: u64,
    from: &'static str,
    reads: usize,
) -> anyhow::Result<Vec<Read>> {
    let mut out = Vec::new();
    for _ in 0..reads {
        let asked = u32::try_from(n)?;
        let started = Instant::now();
        let page = tokio::time::timeout(PATIENCE, reader.history(topic, HistoryQuery::Last(asked)))
            .await
            .context("no history answer")??;
        let took = started.elapsed();
        let mut in_order = true;
        for (i, m) in page.messages.iter().enumerate() {
            if seq_of(&m.payload)? != i as u64 {
                in_order = false;
            }
        }
        out.push(Read {
            from,
            asked: n,
            ms: ms(took),
            messages: page.messages.len() as u64,
            in_order,
            gap: page.gap,
        });
    }
    Ok(out)
}

async fn backlog(running: &Running, n: u64, reads: usize) -> anyhow::Result<Vec<Read>> {
    let at = running.endpoints.clone();
    let topic = "bench-backlog";
    let publisher = at.relaymesh_with(0, |_| {}).await?;
    let stored = stat(running, 0, "history_stored").await?;
    publish(&publisher, topic, 0..n).await?;
    stat_reaches(running, 0, "history_stored", stored + n).await?;
    let far = at.relaymesh_with(2, |_| {}).await?;
    let near = at.relaymesh_with(0, |_| {}).await?;
    // Alternated, so both see the machine in the same state.
    let mut out = Vec::new();
    for _ in 0..reads {
        out.extend(read_backlog(&far, topic, n, "peers", 1).await?);
        out.extend(read_backlog(&near, topic, n, "local", 1).await?);
    }
    for c in [publisher, far, near] {
        c.close().await;
    }
    Ok(out)
}

/// Runs the trials and the backlog reads.
pub(crate) async fn run(
    launcher: &Launcher,
    tls: bool,
    plan: Plan,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<RecoveryResult> {
    let mut result = RecoveryResult::default();
    for n in 0..plan.trials {
        let mut running = launcher
            .start(System::Relaymesh, 3, tls, Some(HISTORY_CONFIG))
            .await?;
        let t = tokio::time::timeout(
            PATIENCE * 4,
            trial(launcher, &mut running, n, plan.messages),
        )
        .await
        .context("a recovery trial took too long")??;
        progress(&trial_line(&t));
        running.check_alive(&launcher.run_dir)?;
        result.trials.push(t);
    }
    let mut running = launcher
        .start(System::Relaymesh, 3, tls, Some(HISTORY_CONFIG))
        .await?;
    result.reads = tokio::time::timeout(PATIENCE * 4, backlog(&running, plan.messages, plan.reads))
        .await
        .context("the backlog reads took too long")??;
    for r in &result.reads {
        progress(&read_line(r));
    }
    running.check_alive(&launcher.run_dir)?;
    Ok(result)
}

pub(crate) fn trial_line(t: &Trial) -> String {
    format!(
        "recovery {}: {} missed, reconnected to {}; restart→reconnected {:.0} ms, reconnected→first {:.1} ms, reconnected→recovered {:.1} ms; recovered {} ({} before the event), gap {:?}, {} duplicates, {} out of order, {} missing, live followed: {} {}",
        t.trial,
        t.missed,
        t.reconnected_to,
        t.restart_to_reconnected_ms,
        t.reconnected_to_first_ms,
        t.reconnected_to_recovered_ms,
        t.recovered_count,
        t.received_before_recovered,
        t.gap,
        t.duplicates,
        t.out_of_order,
        t.missing,
        t.live_followed,
        if t.passed { "pass" } else { "FAIL" }
    )
}

pub(crate) fn read_line(r: &Read) -> String {
    format!(
        "history Last({}) from {}: {} messages in {:.1} ms, in order: {}, gap: {}",
        r.asked, r.from, r.messages, r.ms, r.in_order, r.gap
    )
}
