//! A reconnect storm (relaymesh only), on a coordinator and three comm servers (processes).
//!
//! `clients` clients connect to server A (logging in through A, or with `--relaymesh-logins
//! http` through the coordinator asking for A) and subscribe to
//! one of `topics` topics each, `CONCURRENCY` at a time: the *fresh* time is from the first
//! connect to the last subscription. Meanwhile and throughout, existing clients elsewhere are
//! watched: a publisher on B publishes `PROBE_RATE` timestamped messages a second to five
//! subscribers on B and five on C (their latency), and a prober logs in (`POST /v1/login`)
//! every `LOGIN_EVERY` (the coordinator's answer time). Then A is killed (SIGKILL) and every
//! one of its clients, with the client library's defaults (backoff with jitter, the lost server
//! excluded), logs in again (through B or C, relayed to the coordinator, or over HTTP) and
//! resubscribes on B or C, all at once: the
//! *storm* time is from the kill to the last `Reconnected` (which comes once the client's
//! subscriptions are restored). The curves of clients connected over time, fresh and in the
//! storm, are drawn to `storm.svg` beside the results.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use relaymesh_client::{Client, ClientConfig, Event};
use relaymesh_net::http::{Method, request_with};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::drivers::System;
use crate::idle::{FD_HEADROOM, ephemeral_ports, open_files_limit, time_wait_sockets};
use crate::measure::{histogram, now_ns, pct_ms};
use crate::servers::{Launcher, Running};

/// Fresh clients connecting at once.
const CONCURRENCY: usize = 512;
/// Messages a second the probe publisher sends to the existing clients.
const PROBE_RATE: u64 = 200;
/// Subscribers of the probe on each of B and C.
const PROBE_SUBSCRIBERS: usize = 5;
/// Time between two probe logins.
const LOGIN_EVERY: Duration = Duration::from_millis(20);
/// Longest the storm may take: a client not back by then gave up.
const PATIENCE: Duration = Duration::from_secs(60);
/// Width of a step of the curves.
const SLOT: Duration = Duration::from_millis(50);

/// How big a storm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) clients: usize,
    pub(crate) topics: usize,
    /// The quiet window before the kill, which the probes during the storm are compared with.
    pub(crate) quiet: Duration,
}

/// What the storm did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StormResult {
    pub(crate) clients: usize,
    /// How the clients logged in: through the comm servers (relayed) or over HTTP.
    pub(crate) logins: &'static str,
    /// Seconds from the first fresh connect to the last fresh subscription.
    pub(crate) fresh_s: f64,
    /// Seconds from the kill to the last client's `Reconnected`.
    pub(crate) storm_s: f64,
    /// `storm_s / fresh_s`.
    pub(crate) ratio: f64,
    /// Clients not back within the patience (their event stream ended, or no `Reconnected`).
    pub(crate) gave_up: usize,
    /// Clients each surviving server held at the end (B, C), the probes' included.
    pub(crate) held: Vec<u64>,
    /// The probe logins: p99 in the quiet window before the kill and during the storm, ms, and
    /// how many were made during the storm.
    pub(crate) login_p99_ms_quiet: f64,
    pub(crate) login_p99_ms_storm: f64,
    pub(crate) logins_storm: u64,
    /// Probe logins refused or failed during the storm...
    pub(crate) login_failures_storm: u64,
    /// ...and why: each reason (the answer's status and error code, or the request's error)
    /// with its count, over the whole run.
    pub(crate) login_failure_reasons: Vec<(String, u64)>,
    /// The coordinator's counters over the storm (kill to last client back): logins answered,
    /// logins failed, reservations that failed (a server that was busy or did not answer;
    /// the login went on to another server) and logins refused for their address's rate.
    /// `None` if its `/metrics` could not be read.
    pub(crate) coordinator_storm: Option<CoordinatorCounts>,
    /// The existing clients' delivery latency on B and C: p99 before and during the storm, ms.
    pub(crate) probe_p99_ms_quiet: f64,
    pub(crate) probe_p99_ms_storm: f64,
    /// From the kill to the last client's `Disconnected`, seconds.
    pub(crate) lost_s: f64,
    /// The coordinator's own timing of the placements (claim and reservation) made during the
    /// storm: the bucket bound under which 99 % fell (ms), and how many there were.
    pub(crate) placement_p99_ms_storm: f64,
    pub(crate) placements_storm: u64,
    /// CPU seconds the coordinator and the comm servers (A; B and C, the probes' share
    /// included) took while the fresh clients connected and during the storm.
    pub(crate) fresh_cpu_s: [f64; 2],
    pub(crate) storm_cpu_s: [f64; 2],
    /// Clients connected, by seconds since the first connect (fresh) and since the kill
    /// (storm), one point per `SLOT`.
    pub(crate) fresh_curve: Vec<(f64, usize)>,
    pub(crate) storm_curve: Vec<(f64, usize)>,
}

impl StormResult {
    /// The target: every client back within 3 s and within 1.5× the fresh connect, none
    /// giving up, and logins answered within 50 ms at p99 during the storm.
    pub(crate) fn passed(&self) -> bool {
        self.gave_up == 0
            && self.storm_s < 3.0
            && self.ratio <= 1.5
            && self.login_p99_ms_storm < 50.0
    }
}

/// Login counters of the coordinator's `/metrics`, or their difference over a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CoordinatorCounts {
    pub(crate) logins: u64,
    pub(crate) login_failures: u64,
    pub(crate) reservations_failed: u64,
    pub(crate) rate_limited: u64,
}

impl CoordinatorCounts {
    /// The counters in `metrics`; `None` if it is empty (`/metrics` could not be read).
    fn read(metrics: &str) -> Option<Self> {
        if metrics.is_empty() {
            return None;
        }
        let counter = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        Some(Self {
            logins: counter("relaymesh_coordinator_logins_total"),
            login_failures: counter("relaymesh_coordinator_login_failures_total"),
            reservations_failed: counter("relaymesh_coordinator_reservations_failed_total"),
            rate_limited: counter("relaymesh_coordinator_logins_rate_limited_total"),
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            logins: self.logins.saturating_sub(before.logins),
            login_failures: self.login_failures.saturating_sub(before.login_failures),
            reservations_failed: self
                .reservations_failed
                .saturating_sub(before.reservations_failed),
            rate_limited: self.rate_limited.saturating_sub(before.rate_limited),
        }
    }
}

/// Why probe logins failed, with how many failed for each reason.
type Reasons = Arc<Mutex<std::collections::BTreeMap<String, u64>>>;

/// A failed login's reason: its status and the error code of its JSON body, or the request's
/// own error.
fn failure_reason<S, E>(answer: &Result<(S, bytes::Bytes), E>) -> String
where
    S: Clone + Into<u16>,
    E: std::fmt::Display,
{
    match answer {
        Ok((status, body)) => {
            let code = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("{} {code}", status.clone().into())
                .trim_end()
                .to_owned()
        }
        Err(e) => e.to_string(),
    }
}

/// Samples (when, value) of a probe, both in nanoseconds of [`now_ns`].
type Samples = Arc<Mutex<Vec<(u64, u64)>>>;

fn push(samples: &Samples, when: u64, value: u64) {
    samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((when, value));
}

/// p99 in ms of the samples (nanoseconds) taken in `[from, to)`, and how many there were.
fn p99_between(samples: &Samples, from: u64, to: u64) -> (f64, u64) {
    let mut h: Histogram<u64> = histogram();
    for &(when, value) in samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        if (from..to).contains(&when) {
            let _ = h.record((value / 1_000).max(1));
        }
    }
    (pct_ms(&h, 99.0), h.len())
}

/// How many of the samples were taken in `[from, to)`.
fn count_between(samples: &Samples, from: u64, to: u64) -> u64 {
    let samples = samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    samples.iter().filter(|s| (from..to).contains(&s.0)).count() as u64
}

/// The cumulative buckets (`le` in seconds, count) of histogram `name` in a Prometheus text
/// exposition.
fn buckets(exposition: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound (ms) below which 99 % of what `after` counted beyond `before` fell, and
/// how many that was.
fn p99_bound_ms(before: &[(f64, u64)], after: &[(f64, u64)]) -> (f64, u64) {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n.saturating_sub(was))
        })
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    let bound = delta
        .iter()
        .find(|d| d.1 as f64 >= 0.99 * total as f64)
        .map_or(0.0, |d| d.0 * 1e3);
    (bound, total)
}

/// The coordinator's `/metrics`, or nothing when it cannot be read.
async fn coordinator_metrics(endpoints: &crate::drivers::Endpoints) -> String {
    let Ok(base) = endpoints.url(0) else {
        return String::new();
    };
    match request_with(
        Method::GET,
        &format!("{base}/metrics"),
        &[],
        None,
        &endpoints.tls,
        Duration::from_secs(5),
    )
    .await
    {
        Ok((status, body)) if status.is_success() => String::from_utf8_lossy(&body).into_owned(),
        _ => String::new(),
    }
}

/// The histogram the coordinator times each login's placement with (a server claimed and a
/// key reserved on it).
const PLACEMENT: &str = "relaymesh_coordinator_login_placement_seconds";

/// The curve: the cumulative count of `done` (seconds) at the end of each `SLOT`, from 0 to the slot
/// holding the last.
fn curve(done: &[f64]) -> Vec<(f64, usize)> {
    let slot = SLOT.as_secs_f64();
    let mut per_slot: Vec<usize> = Vec::new();
    for &d in done {
        // Slot k (1-based) ends at k * SLOT.
        let k = (d / slot).ceil().max(1.0) as usize;
        if per_slot.len() <= k {
            per_slot.resize(k + 1, 0);
        }
        per_slot[k] += 1;
    }
    let mut total = 0;
    per_slot
        .iter()
        .enumerate()
        .map(|(k, n)| {
            total += n;
            (k as f64 * slot, total)
        })
        .collect()
}

/// A storm client: reports its `Reconnected` (the time since the kill is taken by the reader)
/// and whether its event stream ended, until `stop`.
async fn storm_client(
    mut client: Client,
    back: tokio::sync::mpsc::UnboundedSender<(bool, Instant)>,
    ended: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
) -> Client {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return client,
            event = client.next_event() => event,
        };
        match event {
            None => {
                ended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return client;
            }
            Some(Event::Disconnected { .. }) => {
                let _ = back.send((false, Instant::now()));
            }
            Some(Event::Reconnected { .. }) => {
                let _ = back.send((true, Instant::now()));
            }
            Some(_) => {}
        }
    }
}

/// A subscriber of the probe: records each message's latency by the time it was sent.
async fn probe_subscriber(mut client: Client, samples: Samples, stop: CancellationToken) -> Client {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return client,
            event = client.next_event() => event,
        };
        match event {
            None => return client,
            Some(Event::Message(m)) => {
                if let Some(sent) = m.payload.get(..8).and_then(|b| b.try_into().ok()) {
                    let sent = u64::from_le_bytes(sent);
                    push(&samples, sent, now_ns().saturating_sub(sent));
                }
            }
            Some(_) => {}
        }
    }
}

/// The probes: subscribers on B and C and a publisher on B (the existing clients' latency),
/// and a prober logging in. They run on a thread and runtime of their own, so that the storm's
/// clients on the bench's runtime do not delay what they measure.
struct Probes {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    /// (sent, latency) of each probe message.
    latency: Samples,
    /// (started, answer time) of each probe login answered with success...
    logins: Samples,
    /// ...and (started, 0) of each refused or failed...
    login_failures: Samples,
    /// ...and why.
    reasons: Reasons,
}

impl Probes {
    async fn start(endpoints: &crate::drivers::Endpoints) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let (latency, logins, login_failures) =
            (Samples::default(), Samples::default(), Samples::default());
        let reasons = Reasons::default();
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("storm-probes".into())
            .spawn({
                let (endpoints, stop) = (endpoints.clone(), stop.clone());
                let (latency, logins, login_failures) =
                    (latency.clone(), logins.clone(), login_failures.clone());
                let reasons = reasons.clone();
                move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let failures = (login_failures, reasons);
                        let started =
                            Self::run(&endpoints, stop.clone(), latency, logins, failures);
                        match started.await {
                            Ok(tasks) => {
                                let _ = ready_tx.send(Ok(()));
                                stop.cancelled().await;
                                let mut clients = Vec::new();
                                for task in tasks {
                                    if let Ok(Some(c)) = task.await {
                                        clients.push(c);
                                    }
                                }
                                futures_util::future::join_all(
                                    clients.into_iter().map(Client::close),
                                )
                                .await;
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                            }
                        }
                    });
                }
            })?;
        let probes = Self {
            stop,
            thread: Some(thread),
            latency,
            logins,
            login_failures,
            reasons,
        };
        ready.await.context("the probes' thread ended")??;
        Ok(probes)
    }

    /// Connects the probes and starts their tasks (each gives its client back, if it has one).
    async fn run(
        endpoints: &crate::drivers::Endpoints,
        stop: CancellationToken,
        latency: Samples,
        logins: Samples,
        (login_failures, reasons): (Samples, Reasons),
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<Option<Client>>>> {
        let mut tasks = Vec::new();
        for server in [1, 2] {
            for _ in 0..PROBE_SUBSCRIBERS {
                let c = endpoints.relaymesh_with(server, |_| {}).await?;
                c.subscribe(["storm-probe"]).await?;
                let (latency, stop) = (latency.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    Some(probe_subscriber(c, latency, stop).await)
                }));
            }
        }
        let publisher = endpoints.relaymesh_with(1, |_| {}).await?;
        let every = Duration::from_nanos(1_000_000_000 / PROBE_RATE);
        tasks.push(tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return Some(publisher),
                        _ = tick.tick() => {}
                    }
                    let sent = now_ns().to_le_bytes().to_vec();
                    if publisher.publish("storm-probe", sent).await.is_err() {
                        return Some(publisher);
                    }
                }
            }
        }));
        let login_url = format!("{}/v1/login", endpoints.url(0)?);
        let tls = endpoints.tls.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOGIN_EVERY);
            while !stop.is_cancelled() {
                tick.tick().await;
                let started = now_ns();
                let answer = request_with(
                    Method::POST,
                    &login_url,
                    &[],
                    Some(b"{}".to_vec()),
                    &tls,
                    Duration::from_secs(10),
                )
                .await;
                if matches!(answer, Ok((status, _)) if status.is_success()) {
                    push(&logins, started, now_ns().saturating_sub(started));
                } else {
                    push(&login_failures, started, 0);
                    *reasons
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(failure_reason(&answer))
                        .or_default() += 1;
                }
            }
            None
        }));
        Ok(tasks)
    }

    /// Stops the probes and waits for their thread.
    fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the probes' thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs the storm on a fresh cluster.
pub(crate) async fn run(
    launcher: &Launcher,
    tls: bool,
    plan: Plan,
    plot: &std::path::Path,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<StormResult> {
    let mut running = launcher.start(System::Relaymesh, 3, tls, None).await?;
    let result = tokio::time::timeout(PATIENCE * 4, storm(&mut running, plan, &mut progress))
        .await
        .context("the storm took too long")??;
    running.check_alive(&launcher.run_dir)?;
    draw(plot, &result)?;
    Ok(result)
}

async fn storm(
    running: &mut Running,
    plan: Plan,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<StormResult> {
    let pid = running.pid("commserver-a").context("no comm server a")?;
    let cap = open_files_limit(&pid.to_string())
        .unwrap_or(usize::MAX)
        .min(open_files_limit("self").unwrap_or(usize::MAX))
        .saturating_sub(FD_HEADROOM + CONCURRENCY);
    if plan.clients > cap {
        bail!(
            "{} clients need as many open files in comm server a and in the generator; RLIMIT_NOFILE allows {cap} (ask for fewer with --storm-clients)",
            plan.clients
        );
    }
    // In the storm a client holds its dead connection until it notices the loss, then its
    // login's while it logs in: thousands at once. Without room for them the generator runs
    // out of descriptors, and its failed connects show as extra logins (a key taken and not
    // used) and as probe logins failing with "Too many open files".
    if plan.clients > cap / 8 * 7 {
        progress(&format!(
            "warning: {} clients leave {} spare descriptors for the reconnects in flight; the \
             generator may run out (see the probe logins' failures in the report)",
            plan.clients,
            cap - plan.clients
        ));
    }
    // Every connection comes from 127.0.0.1 to one address and port, so each needs a port of
    // its own; past about half the range the kernel searches for a free one at every connect
    // and the generator, not the servers, sets the pace.
    let ports = ephemeral_ports().unwrap_or(usize::MAX);
    if plan.clients.saturating_mul(2) > ports {
        progress(&format!(
            "warning: {} clients with {ports} ephemeral ports: past about half of them every \
             connect searches for a free port and the curves measure the host; widen the range \
             (sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\")",
            plan.clients
        ));
    }
    let waiting = time_wait_sockets().unwrap_or(0);
    if waiting > plan.clients / 2 {
        progress(&format!(
            "warning: {waiting} sockets in TIME_WAIT, most likely an earlier run's: they hold \
             their ports for a minute and slow every connect down; wait for them to go"
        ));
    }
    let endpoints = running.endpoints.clone();
    let victim = endpoints.server_ids.first().context("no server a")?.clone();
    let stop = CancellationToken::new();

    // The probes on B and C, running throughout.
    let mut probes = Probes::start(&endpoints).await?;

    // The fresh clients, all on A.
    let config = {
        let mut c = ClientConfig::new(endpoints.url(0)?);
        c.tls = endpoints.tls.clone();
        endpoints.place(&mut c, 0)?;
        c.outbound_queue = 64;
        c.event_queue = 64;
        c
    };
    let cpu = |running: &Running, name: &str| {
        running
            .pid(name)
            .and_then(relaymesh_net::procstat::of_process)
            .map_or(0.0, |u| u.cpu_seconds)
    };
    let fresh_cpu = (cpu(running, "coordinator"), cpu(running, "commserver-a"));
    let started = Instant::now();
    let topics = plan.topics.max(1);
    let connected: Vec<(Client, f64)> = futures_util::stream::iter(0..plan.clients)
        .map(|i| {
            let config = config.clone();
            async move {
                let client = Client::connect(config).await?;
                client.subscribe([format!("storm/{}", i % topics)]).await?;
                anyhow::Ok((client, started.elapsed().as_secs_f64()))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("connecting the fresh clients")?;
    let fresh_cpu = (
        cpu(running, "coordinator") - fresh_cpu.0,
        cpu(running, "commserver-a") - fresh_cpu.1,
    );
    let fresh_done: Vec<f64> = connected.iter().map(|(_, t)| *t).collect();
    let fresh_s = fresh_done.iter().copied().fold(0.0, f64::max);
    let elsewhere = connected
        .iter()
        .filter(|(c, _)| c.server_id() != victim)
        .count();
    if elsewhere > 0 {
        bail!("{elsewhere} clients were placed on another server than a");
    }
    progress(&format!(
        "{} fresh clients connected and subscribed in {fresh_s:.2} s",
        plan.clients
    ));

    let (back_tx, mut back_rx) = tokio::sync::mpsc::unbounded_channel();
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = connected
        .into_iter()
        .map(|(c, _)| {
            tokio::spawn(storm_client(
                c,
                back_tx.clone(),
                ended.clone(),
                stop.clone(),
            ))
        })
        .collect();
    drop(back_tx);

    // The quiet window, then the kill.
    tokio::time::sleep(plan.quiet).await;
    let storm_cpu = (
        cpu(running, "coordinator"),
        cpu(running, "commserver-b") + cpu(running, "commserver-c"),
    );
    let metrics_before = coordinator_metrics(&endpoints).await;
    let placement_before = buckets(&metrics_before, PLACEMENT);
    let counts_before = CoordinatorCounts::read(&metrics_before);
    let killed_ns = now_ns();
    let killed = Instant::now();
    running.stop("commserver-a")?;
    let mut storm_done = Vec::with_capacity(plan.clients);
    let mut lost = Vec::with_capacity(plan.clients);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while storm_done.len() < plan.clients {
        match tokio::time::timeout_at(deadline, back_rx.recv()).await {
            Ok(Some((true, at))) => storm_done.push(at.duration_since(killed).as_secs_f64()),
            Ok(Some((false, at))) => lost.push(at.duration_since(killed).as_secs_f64()),
            Ok(None) | Err(_) => break,
        }
    }
    let storm_end_ns = now_ns();
    let metrics_after = coordinator_metrics(&endpoints).await;
    let (placement_p99_ms_storm, placements_storm) =
        p99_bound_ms(&placement_before, &buckets(&metrics_after, PLACEMENT));
    let coordinator_storm = CoordinatorCounts::read(&metrics_after)
        .zip(counts_before)
        .map(|(after, before)| after.since(before));
    let storm_cpu = (
        cpu(running, "coordinator") - storm_cpu.0,
        cpu(running, "commserver-b") + cpu(running, "commserver-c") - storm_cpu.1,
    );
    let storm_s = storm_done.iter().copied().fold(0.0, f64::max);
    let gave_up = plan.clients - storm_done.len();
    progress(&format!(
        "{} of {} clients back {storm_s:.2} s after the kill",
        storm_done.len(),
        plan.clients
    ));
    let mut held = Vec::new();
    for i in [1, 2] {
        held.push(
            running.comm_stats(i).await?["clients"]
                .as_u64()
                .unwrap_or(0),
        );
    }

    stop.cancel();
    let mut closing = Vec::new();
    for task in clients {
        closing.push(task.await?);
    }
    futures_util::stream::iter(closing)
        .for_each_concurrent(CONCURRENCY, |c| c.close())
        .await;
    probes.stop()?;
    let Probes {
        latency,
        logins,
        login_failures,
        reasons,
        ..
    } = &probes;
    let login_failure_reasons = reasons
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(reason, n)| (reason.clone(), *n))
        .collect();

    let quiet_from =
        killed_ns.saturating_sub(u64::try_from(plan.quiet.as_nanos()).unwrap_or(u64::MAX));
    let (login_p99_ms_quiet, _) = p99_between(logins, quiet_from, killed_ns);
    let (login_p99_ms_storm, logins_storm) = p99_between(logins, killed_ns, storm_end_ns);
    let login_failures_storm = count_between(login_failures, killed_ns, storm_end_ns);
    let (probe_p99_ms_quiet, _) = p99_between(latency, quiet_from, killed_ns);
    let (probe_p99_ms_storm, _) = p99_between(latency, killed_ns, storm_end_ns);
    Ok(StormResult {
        clients: plan.clients,
        logins: if endpoints.relay_logins {
            "through the comm server they dial (A, then B or C), which relays each to the coordinator"
        } else {
            "over HTTP to the coordinator (`POST /v1/login`), then to the server it chose"
        },
        fresh_s,
        storm_s,
        ratio: if fresh_s > 0.0 {
            storm_s / fresh_s
        } else {
            0.0
        },
        gave_up,
        held,
        login_p99_ms_quiet,
        login_p99_ms_storm,
        logins_storm,
        login_failures_storm,
        login_failure_reasons,
        coordinator_storm,
        probe_p99_ms_quiet,
        probe_p99_ms_storm,
        lost_s: lost.iter().copied().fold(0.0, f64::max),
        placement_p99_ms_storm,
        placements_storm,
        fresh_cpu_s: [fresh_cpu.0, fresh_cpu.1],
        storm_cpu_s: [storm_cpu.0, storm_cpu.1],
        fresh_curve: curve(&fresh_done),
        storm_curve: curve(&storm_done),
    })
}

/// The two curves, clients connected over time, as an SVG.
fn draw(path: &std::path::Path, r: &StormResult) -> anyhow::Result<()> {
    let end = r
        .fresh_curve
        .last()
        .map_or(0.0, |p| p.0)
        .max(r.storm_curve.last().map_or(0.0, |p| p.0))
        .max(0.1);
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} clients of a killed comm server back on the other two",
                r.clients
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end * 1.05, 0usize..r.clients + r.clients / 20 + 1)?;
    chart
        .configure_mesh()
        .x_desc("seconds (fresh: since the first connect; storm: since the kill)")
        .y_desc("clients connected and subscribed")
        .draw()?;
    chart
        .draw_series(LineSeries::new(r.fresh_curve.iter().copied(), &BLUE))?
        .label(format!(
            "fresh, {CONCURRENCY} at a time: {:.2} s",
            r.fresh_s
        ))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(r.storm_curve.iter().copied(), &RED))?
        .label(format!("storm, all at once: {:.2} s", r.storm_s))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histograms_p99_bound_is_read_from_the_difference_of_two_expositions() {
        let text = |a: u64, b: u64, c: u64| {
            format!(
                "# TYPE x histogram\nx_bucket{{le=\"0.001\"}} {a}\nx_bucket{{le=\"0.01\"}} {b}\nx_bucket{{le=\"+Inf\"}} {c}\nx_sum 1\nx_count {c}\n"
            )
        };
        let before = buckets(&text(10, 10, 10), "x");
        assert_eq!(before.len(), 3);
        // 100 more: 98 under 10 ms, 2 over it.
        let after = buckets(&text(10, 108, 110), "x");
        assert_eq!(p99_bound_ms(&before, &after), (f64::INFINITY, 100));
        let after = buckets(&text(10, 110, 110), "x");
        assert_eq!(p99_bound_ms(&before, &after), (10.0, 100));
    }

    #[test]
    fn the_curve_counts_what_is_done_by_the_end_of_each_slot() {
        let c = curve(&[0.01, 0.02, 0.07, 0.149, 0.0]);
        let counts: Vec<usize> = c.iter().map(|p| p.1).collect();
        assert_eq!(counts, vec![0, 3, 4, 5]);
        assert!((c[3].0 - 0.15).abs() < 1e-9);
        assert!(curve(&[]).is_empty());
    }
}
