//! Login rate through one coordinator: clients start open loop at a fixed rate and each does
//! what an application does, `Client::connect`: with `--relaymesh-logins relay` (the default)
//! it dials the comm server without a key and logs in through it (`login_servers`), with
//! `http` it logs in with `POST /v1/login`, then attaches to the offered comm server. Latency
//! runs from the login's due time to `connect` returning. With TLS every hop is a TLS
//! handshake (`https://` to the coordinator, `wss://` to the server).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use relaymesh_client::{Client, ClientConfig};
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
    pub(crate) failed: u64,
    /// The first failure's message, if any.
    pub(crate) first_error: String,
    pub(crate) logins_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// CPU of the coordinator plus comm server over the step, percent of one core.
    pub(crate) server_cpu_pct: f64,
    pub(crate) generator_cpu_pct: f64,
    pub(crate) generator_bound: bool,
    pub(crate) passed: bool,
}

/// Logins in flight at once; a login due when all are taken counts as failed.
const MAX_IN_FLIGHT: usize = 4096;

#[derive(Default)]
struct Results {
    latency_us: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
}

async fn step(
    coordinator: &str,
    running: &Running,
    rate: f64,
    window: Duration,
    max_p99_ms: f64,
) -> anyhow::Result<LoginStep> {
    let results = Arc::new(Mutex::new(Results::default()));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let interval = 1e9 / rate;
    let start = now_ns() + 1_000_000;
    let end = start + window.as_nanos() as u64;
    let (cpu0, _) = running.usage();
    let gen0 = relaymesh_net::procstat::process().map_or(0.0, |u| u.cpu_seconds);
    let t0 = now_ns();
    let mut tasks = tokio::task::JoinSet::new();
    let mut attempted = 0u64;
    loop {
        let now = now_ns();
        loop {
            let due = start + (attempted as f64 * interval) as u64;
            if due >= end || due > now {
                break;
            }
            attempted += 1;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let mut r = results
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                r.failed += 1;
                r.first_error
                    .get_or_insert_with(|| format!("{MAX_IN_FLIGHT} logins already in flight"));
                continue;
            };
            let results = results.clone();
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
                let done = now_ns();
                drop(permit);
                let client = {
                    let mut r = results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match outcome {
                        Ok(client) => {
                            r.latency_us.push(done.saturating_sub(due) / 1000);
                            Some(client)
                        }
                        Err(e) => {
                            r.failed += 1;
                            r.first_error.get_or_insert_with(|| e.to_string());
                            None
                        }
                    }
                };
                if let Some(client) = client {
                    client.close().await;
                }
            });
        }
        if start + (attempted as f64 * interval) as u64 >= end {
            break;
        }
        // Reap finished logins so the set stays small.
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let drain = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let elapsed_s = (now_ns() - t0) as f64 / 1e9;
    let (cpu1, _) = running.usage();
    let gen1 = relaymesh_net::procstat::process().map_or(0.0, |u| u.cpu_seconds);
    let r = results
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut h = histogram();
    for &us in &r.latency_us {
        h.saturating_record(us.max(1));
    }
    let succeeded = r.latency_us.len() as u64;
    let failed = r.failed
        + if drain.is_err() {
            attempted - succeeded - r.failed
        } else {
            0
        };
    let p99_ms = pct_ms(&h, 99.0);
    let generator_cpu_pct = 100.0 * (gen1 - gen0) / elapsed_s;
    Ok(LoginStep {
        offered_per_s: rate,
        attempted,
        succeeded,
        failed,
        first_error: r.first_error.clone().unwrap_or_default(),
        logins_per_s: succeeded as f64 / window.as_secs_f64(),
        p50_ms: pct_ms(&h, 50.0),
        p99_ms,
        max_ms: h.max() as f64 / 1e3,
        server_cpu_pct: 100.0 * (cpu1 - cpu0) / elapsed_s,
        generator_cpu_pct,
        generator_bound: generator_cpu_pct >= 90.0,
        passed: failed == 0 && succeeded > 0 && p99_ms <= max_p99_ms,
    })
}

/// Steps the login rate up until a step fails.
pub(crate) async fn run(
    running: &Running,
    ladder: &[f64],
    window: Duration,
    max_p99_ms: f64,
    mut progress: impl FnMut(&LoginStep),
) -> anyhow::Result<Vec<LoginStep>> {
    let coordinator = running.endpoints.urls[0].clone();
    let mut steps = Vec::new();
    for &rate in ladder {
        let s = step(&coordinator, running, rate, window, max_p99_ms).await?;
        progress(&s);
        let passed = s.passed;
        steps.push(s);
        if !passed {
            break;
        }
    }
    Ok(steps)
}
