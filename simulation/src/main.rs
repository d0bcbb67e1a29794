//! `simulation`: a load test for relaymesh.
//!
//! Without `--coordinator` it boots an embedded coordinator and `--servers` comm servers on
//! 127.0.0.1 in this process; with it, it drives a deployed cluster. It connects `--clients`
//! clients through the coordinator, runs a scenario for `--duration` seconds, waits for messages
//! still in flight, and reports delivery (expected, delivered, lost, duplicates, out of order)
//! and one-way latency measured at the receiver from a timestamp in every payload.
//!
//! Scenarios: `fanout` (publishers to many subscribers on one topic) and `dense` (every client
//! subscribes to one shared topic and publishes to it: players in one room).

mod cluster;
mod load;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Load-test a relaymesh cluster and report delivery and latency.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Drive the cluster at this coordinator URL instead of an embedded one.
    #[arg(long)]
    coordinator: Option<String>,
    /// Comm servers in the embedded cluster.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Clients to connect (default: 300 for fanout, 50 for dense).
    #[arg(long)]
    clients: Option<usize>,
    /// What the clients do.
    #[arg(long, value_enum, default_value_t = Scenario::Fanout)]
    scenario: Scenario,
    /// Publishers in the fanout scenario; the other clients subscribe.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages per second per publisher (default: 100 for fanout, 10 for dense).
    #[arg(long)]
    rate: Option<u32>,
    /// Payload size in bytes (at least 20: timestamp, publisher and sequence number).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Seconds to wait for messages still in flight before counting losses.
    #[arg(long, default_value_t = 2)]
    drain: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A load pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// `--publishers` publishers, every other client subscribed to their topic.
    Fanout,
    /// Every client subscribed to one shared topic and publishing to it.
    Dense,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Fanout => "fanout",
            Self::Dense => "dense",
        }
    }
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        relaymesh_net::logging::init();
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("simulation: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simulation: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let plan = load::Plan {
        scenario: args.scenario,
        clients: args.clients.unwrap_or(match args.scenario {
            Scenario::Fanout => 300,
            Scenario::Dense => 50,
        }),
        publishers: args.publishers,
        rate: args.rate.unwrap_or(match args.scenario {
            Scenario::Fanout => 100,
            Scenario::Dense => 10,
        }),
        payload: args.payload.max(load::HEADER),
        duration: Duration::from_secs(args.duration),
        drain: Duration::from_secs(args.drain),
    };
    anyhow::ensure!(plan.clients >= 2, "--clients must be at least 2");
    anyhow::ensure!(plan.rate > 0, "--rate must be positive");
    if plan.scenario == Scenario::Fanout {
        anyhow::ensure!(
            plan.publishers >= 1 && plan.publishers < plan.clients,
            "--publishers must be between 1 and --clients - 1"
        );
    }
    let (embedded, coordinator) = match args.coordinator {
        Some(url) => (None, url),
        None => {
            anyhow::ensure!(args.servers >= 1, "--servers must be at least 1");
            let cluster = cluster::Embedded::start(args.servers).await?;
            let url = cluster.coordinator_url.clone();
            eprintln!(
                "embedded cluster: coordinator {url}, {} comm servers",
                args.servers
            );
            (Some(cluster), url)
        }
    };
    let outcome = load::run(&coordinator, &plan).await;
    if let Some(cluster) = embedded {
        cluster.stop().await;
    }
    let report = report::Report::new(args.scenario.name(), &plan, outcome?);
    print!("{}", report.summary());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report.json())?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
