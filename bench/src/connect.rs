//! The cost of a connection: `clients` clients connect and subscribe to one topic each (the
//! server has confirmed the subscription where the protocol says so), `CONCURRENCY` at a time,
//! with each system's usual client library ([`Subscriber::start`], as the fan-out scenarios'
//! subscribers). For relaymesh that is a login through the coordinator (negotiation, a key
//! reserved on the comm server), the attach to the comm server and the first subscribe; for
//! NATS a connect (`INFO`/`CONNECT`), `SUB` and a flush; for MQTT `CONNECT`/`SUBSCRIBE` and their
//! acks; for Redis a `SUBSCRIBE` and its confirmation. The servers' CPU over that phase (every
//! process of the system: the coordinator and comm server for relaymesh) divided by the clients
//! is the cost of a connection; the generator's is reported beside it. The clients are closed
//! afterwards, outside the measurement.

use std::time::Instant;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use serde::Serialize;

use crate::drivers::{Route, Subscriber, System};
use crate::measure::{SharedTally, Tally};
use crate::servers::Running;

/// Clients connecting at once.
pub(crate) const CONCURRENCY: usize = 64;

/// Longest the clients' sockets may take to close once the clients are dropped.
const CLOSE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Files this process has open.
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// What connecting cost.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnectResult {
    pub(crate) clients: usize,
    /// Topics the clients subscribed to (client `i` to `connect/{i % topics}`).
    pub(crate) topics: usize,
    /// From the first connect to the last confirmed subscription, seconds.
    pub(crate) wall_s: f64,
    /// CPU seconds of all the system's server processes over the phase.
    pub(crate) server_cpu_s: f64,
    /// relaymesh: the coordinator's part of `server_cpu_s`.
    pub(crate) coordinator_cpu_s: Option<f64>,
    /// CPU seconds of the generator (this process) over the phase.
    pub(crate) generator_cpu_s: f64,
}

impl ConnectResult {
    /// Server CPU per connection, µs.
    pub(crate) fn server_us(&self) -> f64 {
        self.server_cpu_s * 1e6 / self.clients.max(1) as f64
    }

    /// The coordinator's CPU per connection, µs (relaymesh).
    pub(crate) fn coordinator_us(&self) -> Option<f64> {
        self.coordinator_cpu_s
            .map(|s| s * 1e6 / self.clients.max(1) as f64)
    }

    /// Generator CPU per connection, µs.
    pub(crate) fn generator_us(&self) -> f64 {
        self.generator_cpu_s * 1e6 / self.clients.max(1) as f64
    }

    /// Connections (connected and subscribed) per second of the phase.
    pub(crate) fn per_s(&self) -> f64 {
        self.clients as f64 / self.wall_s.max(1e-9)
    }
}

/// Connects and subscribes `clients` clients to `running`'s first server, then closes them.
pub(crate) async fn run(
    running: &Running,
    system: System,
    clients: usize,
    topics: usize,
) -> anyhow::Result<ConnectResult> {
    let topics = topics.max(1);
    let endpoints = &running.endpoints;
    // Nothing is published: the tally stays empty.
    let tally: SharedTally = std::sync::Arc::new(std::sync::Mutex::new(Tally::new(0)));
    let coordinator = || {
        running
            .pid("coordinator")
            .and_then(relaymesh_net::procstat::of_process)
            .map(|u| u.cpu_seconds)
    };
    let generator = || relaymesh_net::procstat::process().map_or(0.0, |u| u.cpu_seconds);
    let open0 = open_files();
    let (server0, _) = running.usage();
    let coordinator0 = coordinator();
    let generator0 = generator();
    let started = Instant::now();
    let subscribers: Vec<Subscriber> = futures_util::stream::iter(0..clients)
        .map(|i| {
            let tally = tally.clone();
            async move {
                let topic = format!("connect/{}", i % topics);
                Subscriber::start(endpoints, 0, &topic, Route::Topic, tally).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("connecting {clients} {} clients", system.name()))?;
    let wall_s = started.elapsed().as_secs_f64();
    let (server1, _) = running.usage();
    let result = ConnectResult {
        clients,
        topics,
        wall_s,
        server_cpu_s: server1 - server0,
        coordinator_cpu_s: coordinator().zip(coordinator0).map(|(b, a)| b - a),
        generator_cpu_s: generator() - generator0,
    };
    // Closed: every socket is given back before the next run (which may be another system's).
    drop(subscribers);
    let deadline = Instant::now() + CLOSE_PATIENCE;
    let mut open = open_files();
    while open > open0 + 16 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        open = open_files();
    }
    anyhow::ensure!(
        open <= open0 + 16,
        "{} of the {clients} {} clients' sockets still open {CLOSE_PATIENCE:?} after they were dropped",
        open - open0,
        system.name()
    );
    Ok(result)
}
