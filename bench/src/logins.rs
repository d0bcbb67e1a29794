//! Login rate through one coordinator: clients start open loop at a fixed rate and each does
//! what an application does, `Client::connect`: with `--relaymesh-logins relay` (the default)
//! it dials the comm server without a key and logs in through it (`login_servers`), with
//! `http` it logs in with `POST /v1/login`, then attaches to the offered comm server. Latency
//! runs from the login's due time to `connect` returning. With TLS every hop is a TLS
//! handshake (`https://` to the coordinator, `wss://` to the server).
//!
//! Also what both login scenarios share (this one and `coordinator-logins`): the open-loop
//! [`Schedule`], the [`Tally`] of answers, the [`Meter`] that turns a step into a
//! [`LoginStep`], and the [`ladder`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relaymesh_client::{Client, ClientConfig};
use relaymesh_net::sync::lock;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::measure::{histogram, now_ns, pct_ms};
use crate::servers::Running;

/// One login-rate step.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoginStep {
    pub(crate) offered_per_s: f64,
    pub(crate) attempted: u64,
    pub(crate) succeeded: u64,
    /// Of those, logins the coordinator answered with the identity (a relayed login kept on
    /// the relaying server; `coordinator-logins` only).
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) answered_with_identity: u64,
    pub(crate) failed: u64,
    /// The first failure's message, if any.
    pub(crate) first_error: String,
    pub(crate) logins_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// CPU of the system's processes over the step, percent of one core.
    pub(crate) server_cpu_pct: f64,
    pub(crate) generator_cpu_pct: f64,
    pub(crate) generator_bound: bool,
    pub(crate) passed: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Logins in flight at once; a login due when all are taken counts as failed.
pub(crate) const MAX_IN_FLIGHT: usize = 4096;

/// How long a step waits for the answers still on their way once its last login is due.
pub(crate) const DRAIN: Duration = Duration::from_secs(15);

/// The due times of one step's logins: `rate` a second for `window`, from 1 ms from now.
pub(crate) struct Schedule {
    start: u64,
    end: u64,
    interval: f64,
    attempted: u64,
}

impl Schedule {
    pub(crate) fn new(rate: f64, window: Duration) -> Self {
        let start = now_ns() + 1_000_000;
        Self {
            start,
            end: start + window.as_nanos() as u64,
            interval: 1e9 / rate,
            attempted: 0,
        }
    }

    fn due_at(&self, n: u64) -> u64 {
        self.start + (n as f64 * self.interval) as u64
    }

    /// The logins due by now that have not been handed out yet: their number in the step and
    /// their due time.
    pub(crate) fn due(&mut self) -> Vec<(u64, u64)> {
        let now = now_ns();
        let mut due = Vec::new();
        while self.due_at(self.attempted) < self.end && self.due_at(self.attempted) <= now {
            due.push((self.attempted, self.due_at(self.attempted)));
            self.attempted += 1;
        }
        due
    }

    /// Logins handed out so far.
    pub(crate) fn attempted(&self) -> u64 {
        self.attempted
    }

    /// Every login of the step has been handed out.
    pub(crate) fn done(&self) -> bool {
        self.due_at(self.attempted) >= self.end
    }

    /// When the first login was due: answers to logins due before it belong to an earlier
    /// step.
    pub(crate) fn start(&self) -> u64 {
        self.start
    }
}

/// The answers of one step.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    latency_us: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
    /// Logins sent and not yet answered (those the step does not track itself).
    pub(crate) in_flight: usize,
    /// Successful logins answered with the identity.
    pub(crate) identities: u64,
    /// Answers to logins due before this are an earlier step's, late: ignored.
    since: u64,
}

impl Tally {
    pub(crate) fn new(since: u64) -> Self {
        Self {
            since,
            ..Self::default()
        }
    }

    /// The login due at `due` was answered (or failed) now; `false` if it belongs to an
    /// earlier step.
    pub(crate) fn answered(&mut self, due: u64, outcome: Result<(), String>) -> bool {
        if due < self.since {
            return false;
        }
        match outcome {
            Ok(()) => self.latency_us.push(now_ns().saturating_sub(due) / 1000),
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert(e);
            }
        }
        true
    }
}

/// CPU of the system and of the generator since a step started.
pub(crate) struct Meter {
    cpu0: f64,
    gen0: f64,
    t0: u64,
}

impl Meter {
    pub(crate) fn start(running: &Running) -> Self {
        Self {
            cpu0: running.usage().0,
            gen0: relaymesh_net::procstat::process().map_or(0.0, |u| u.cpu_seconds),
            t0: now_ns(),
        }
    }

    /// The step at `rate` over `window`, from its tally; logins neither answered nor failed
    /// (`unanswered`) count as failed.
    pub(crate) fn finish(
        self,
        running: &Running,
        (rate, window, max_p99_ms): (f64, Duration, f64),
        attempted: u64,
        tally: &Tally,
        unanswered: u64,
    ) -> LoginStep {
        let elapsed_s = (now_ns() - self.t0) as f64 / 1e9;
        let cpu1 = running.usage().0;
        let gen1 = relaymesh_net::procstat::process().map_or(0.0, |u| u.cpu_seconds);
        let mut h = histogram();
        for &us in &tally.latency_us {
            h.saturating_record(us.max(1));
        }
        let succeeded = tally.latency_us.len() as u64;
        let failed = tally.failed + unanswered;
        let p99_ms = pct_ms(&h, 99.0);
        let generator_cpu_pct = 100.0 * (gen1 - self.gen0) / elapsed_s;
        LoginStep {
            offered_per_s: rate,
            attempted,
            succeeded,
            answered_with_identity: tally.identities,
            failed,
            first_error: tally.first_error.clone().unwrap_or_else(|| {
                if unanswered > 0 {
                    format!("{unanswered} unanswered after {} s", DRAIN.as_secs())
                } else {
                    String::new()
                }
            }),
            logins_per_s: succeeded as f64 / window.as_secs_f64(),
            p50_ms: pct_ms(&h, 50.0),
            p99_ms,
            max_ms: h.max() as f64 / 1e3,
            server_cpu_pct: 100.0 * (cpu1 - self.cpu0) / elapsed_s,
            generator_cpu_pct,
            generator_bound: generator_cpu_pct >= 90.0,
            passed: failed == 0 && succeeded > 0 && p99_ms <= max_p99_ms,
        }
    }
}

/// Steps through `rates`, each for `window`, after `warmup` at the first rate (not reported:
/// a process just started, whose code and memory this host may have paged out, runs its
/// first logins slowly), until two steps in a row fail (one stall of this shared machine is
/// not the bound).
pub(crate) async fn ladder<F, Fut>(
    rates: &[f64],
    (warmup, window): (Duration, Duration),
    mut step: F,
    mut progress: impl FnMut(&LoginStep),
) -> anyhow::Result<Vec<LoginStep>>
where
    F: FnMut(f64, Duration) -> Fut,
    Fut: Future<Output = anyhow::Result<LoginStep>>,
{
    if let Some(&first) = rates.first()
        && !warmup.is_zero()
    {
        step(first, warmup).await?;
    }
    let mut steps: Vec<LoginStep> = Vec::new();
    for &rate in rates {
        let s = step(rate, window).await?;
        progress(&s);
        steps.push(s);
        if steps.iter().rev().take(2).filter(|s| !s.passed).count() == 2 {
            break;
        }
    }
    Ok(steps)
}

async fn step(
    coordinator: &str,
    running: &Running,
    rate: f64,
    window: Duration,
    max_p99_ms: f64,
) -> anyhow::Result<LoginStep> {
    let mut schedule = Schedule::new(rate, window);
    let tally = Arc::new(Mutex::new(Tally::new(schedule.start())));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let meter = Meter::start(running);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        for (_, due) in schedule.due() {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                lock(&tally).answered(
                    due,
                    Err(format!("{MAX_IN_FLIGHT} logins already in flight")),
                );
                continue;
            };
            let tally = tally.clone();
            let mut config = ClientConfig::new(coordinator);
            config.tls = running.endpoints.tls.clone();
            config.auto_reconnect = false;
            if running.endpoints.relay_logins {
                config
                    .login_servers
                    .clone_from(&running.endpoints.server_urls);
            } else {
                config.relay_logins = false;
            }
            tasks.spawn(async move {
                let outcome = Client::connect(config).await;
                drop(permit);
                let (outcome, client) = match outcome {
                    Ok(client) => (Ok(()), Some(client)),
                    Err(e) => (Err(e.to_string()), None),
                };
                lock(&tally).answered(due, outcome);
                if let Some(client) = client {
                    client.close().await;
                }
            });
        }
        if schedule.done() {
            break;
        }
        // Reap finished logins so the set stays small.
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    let tally = lock(&tally);
    // Logins still running after the drain are cut off with the set.
    let unanswered = if drained.is_err() {
        schedule.attempted - tally.latency_us.len() as u64 - tally.failed
    } else {
        0
    };
    Ok(meter.finish(
        running,
        (rate, window, max_p99_ms),
        schedule.attempted,
        &tally,
        unanswered,
    ))
}

/// Steps the login rate up (see [`ladder`]).
pub(crate) async fn run(
    running: &Running,
    rates: &[f64],
    (warmup, window): (Duration, Duration),
    max_p99_ms: f64,
    progress: impl FnMut(&LoginStep),
) -> anyhow::Result<Vec<LoginStep>> {
    let coordinator = running.endpoints.urls[0].clone();
    ladder(
        rates,
        (warmup, window),
        |rate, window| step(&coordinator, running, rate, window, max_p99_ms),
        progress,
    )
    .await
}
