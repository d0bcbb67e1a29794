//! `simulation`: the relaymesh load test.
//!
//! Without `--coordinator` it boots an embedded coordinator and `--servers` comm servers on
//! 127.0.0.1 in this process (on a runtime of their own); with it, it drives a deployed cluster.
//! It connects clients through the coordinator, runs a scenario, waits for messages still in
//! flight, and reports delivery (expected, delivered, lost, duplicates, out of order), one-way
//! latency measured at the receiver, negotiation time, drops, and where the CPU went.
//!
//! Scenarios: `rooms` (the default: many small rooms spread over the servers), `fanout`,
//! `dense`, `churn`, `ramp`, `direct` and `failover`; see `--help` and the README's "Load
//! testing" section.

// The report is one `serde_json::json!` object with more fields than the default limit expands.
#![recursion_limit = "256"]

mod churn;
mod cluster;
mod direct;
mod kill;
mod load;
mod loss;
mod measure;
mod operator;
mod plot;
mod progress;
mod ramp;
mod report;
mod shard;
mod usage;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

use crate::churn::Churn;
use crate::load::{Round, Slow};
use crate::progress::Progress;
use crate::ramp::Ramp;
use crate::report::{RampSummary, Report, Setup};
use crate::shard::Control;
use crate::usage::{Meter, Servers};
use crate::workload::{Shape, Shard, Workload};

/// Load-test a relaymesh cluster and report delivery, latency and cost.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Drive the cluster at this coordinator URL instead of an embedded one (several,
    /// comma-separated: clients log in through the one that answers and fail over).
    #[arg(long)]
    coordinator: Option<String>,
    /// Comm servers in the embedded cluster.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// What the clients do.
    #[arg(long, value_enum, default_value_t = Scenario::Rooms)]
    scenario: Scenario,
    /// Clients [defaults: rooms 300, fanout 101, dense 50, churn 20 steady subscribers, ramp 11].
    #[arg(long)]
    clients: Option<usize>,
    /// Publishing clients in fanout and ramp; every other client subscribes.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Clients per room in the rooms scenario.
    #[arg(long, default_value_t = 10)]
    room_size: usize,
    /// Messages per second per publisher [defaults: rooms 5, fanout 100, dense 10, churn 50
    /// within a session, ramp 5000 at the first step].
    #[arg(long)]
    rate: Option<f64>,
    /// Payload bytes (at least 24: timestamp, publisher, sequence number, server).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of publishing (ramp: per step) [default: 15, ramp 3].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds to wait for messages still in flight before counting the rest as lost.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// Churn: clients connecting and leaving at once.
    #[arg(long, default_value_t = 20)]
    churners: usize,
    /// Churn: messages each short-lived client publishes before leaving.
    #[arg(long, default_value_t = 10)]
    churn_messages: u64,
    /// Ramp: rate multiplier from one step to the next.
    #[arg(long, default_value_t = 1.5)]
    ramp_factor: f64,
    /// Ramp: most steps to run.
    #[arg(long, default_value_t = 10)]
    ramp_steps: usize,
    /// Ramp: a step passes only with at least this percentage delivered ...
    #[arg(long, default_value_t = 99.9)]
    min_delivery: f64,
    /// ... and p99 latency at or under this many milliseconds.
    #[arg(long, default_value_t = 10.0)]
    max_p99_ms: f64,
    /// Subscribers that read slowly on purpose (to see the slow-consumer policy at work).
    #[arg(long, default_value_t = 0)]
    slow_subscribers: usize,
    /// Milliseconds a slow subscriber spends on each message.
    #[arg(long, default_value_t = 20)]
    slow_delay_ms: u64,
    /// Drive only the clients `j` with `j % n == i` (`i/n`) against `--coordinator`; run the
    /// other shards as separate processes with the same flags. Shard 0 prints the combined report.
    #[arg(long, value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Seconds a shard waits for the others at each step (beyond the run's own duration).
    #[arg(long, default_value_t = 120)]
    shard_timeout: u64,
    /// Names this run's topics; every shard of one run needs the same id [default: random].
    #[arg(long)]
    run_id: Option<String>,
    /// Boot the embedded cluster, print its coordinator URL and serve until SIGINT/SIGTERM
    /// (run the load from other processes with `--coordinator`).
    #[arg(long, conflicts_with_all = ["coordinator", "shard"])]
    cluster_only: bool,
    /// Worker threads of the load generator [default: CPUs].
    #[arg(long)]
    generator_threads: Option<usize>,
    /// Worker threads of the embedded cluster [default: CPUs].
    #[arg(long)]
    cluster_threads: Option<usize>,
    /// Width of a latency-over-time slot in milliseconds [default: duration / 150, at least 100].
    #[arg(long)]
    slot_ms: Option<u64>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency over time and the latency distribution to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Exit with status 1 unless every expected message arrived once and in order and nothing
    /// leaked.
    #[arg(long)]
    check: bool,
    /// No live progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Direct: nodes that log in only halfway through the run [default: a fifth of --clients].
    #[arg(long)]
    offline_nodes: Option<usize>,
    /// Direct on a deployed cluster: the account whose nodes are registered...
    #[arg(long, env = "RELAYMESH_ACCOUNT")]
    account: Option<String>,
    /// ...and its access code (prefer RELAYMESH_ACCESS_CODE).
    #[arg(long, env = "RELAYMESH_ACCESS_CODE", hide_env_values = true)]
    code: Option<String>,
    /// Rooms, fanout, dense: drain a comm server (through the coordinator's admin API) this
    /// many seconds into publishing; its clients move, and `--check` fails unless it empties
    /// and nothing is lost.
    #[arg(long)]
    drain_server_at: Option<f64>,
    /// The server to drain [default: the one holding most of the run's clients].
    #[arg(long, requires = "drain_server_at")]
    drain_server: Option<String>,
    /// A deployed cluster's admin API (http://HOST:PORT), for --drain-server-at; its token
    /// comes from RELAYMESH_ADMIN_TOKEN.
    #[arg(long, env = "RELAYMESH_ADMIN")]
    admin: Option<String>,
    /// CA bundle (PEM) trusted for a deployed cluster's wss:// and https:// URLs instead of
    /// the system's CA store.
    #[arg(long, env = "RELAYMESH_CA")]
    ca: Option<std::path::PathBuf>,
    /// Failover: kill a comm server this many seconds into publishing [default: a third of
    /// --duration].
    #[arg(long)]
    kill_server_at: Option<f64>,
    /// Failover: the server to kill [default: the one holding most of the run's clients].
    #[arg(long)]
    kill_server: Option<String>,
    /// Failover: seconds from the kill to starting a server in its place.
    #[arg(long, default_value_t = 2.0)]
    restart_after: f64,
    /// Failover on a deployed cluster: the command that kills a server (run with `sh -c`, the
    /// server's id in RELAYMESH_SERVER_ID); without it the kill is left to someone else.
    #[arg(long)]
    kill_command: Option<String>,
    /// Failover on a deployed cluster: the command that starts a server in its place.
    #[arg(long)]
    restart_command: Option<String>,
    /// The embedded cluster keeps history for the run's topics, so clients that lose their
    /// server recover what they missed [default: on for failover, off otherwise].
    #[arg(long, value_enum)]
    history: Option<Toggle>,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Toggle {
    On,
    Off,
}

/// A load pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Many small rooms: members publish to and subscribe to their room; with random placement
    /// most deliveries cross servers.
    Rooms,
    /// `--publishers` publishers, every other client subscribed to their topic.
    Fanout,
    /// Every client subscribed to one shared topic and publishing to it (players in one room).
    Dense,
    /// Short-lived clients connect, subscribe, publish and leave continuously while steady
    /// subscribers listen; checks that nothing leaks on the servers.
    Churn,
    /// Fanout at rising rates until delivery or p99 fails; reports the highest sustainable rate.
    Ramp,
    /// Nodes send direct messages to random other nodes; `--offline-nodes` of them log in only
    /// halfway through and get what was sent to them meanwhile from their inboxes.
    Direct,
    /// Rooms spread over the servers while one comm server is killed (and another started in
    /// its place): with history on, its clients recover what they missed; the report tells
    /// recovered messages, those lost with a reported gap, and unexplained loss apart.
    Failover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Rooms => "rooms",
            Self::Fanout => "fanout",
            Self::Dense => "dense",
            Self::Churn => "churn",
            Self::Ramp => "ramp",
            Self::Direct => "direct",
            Self::Failover => "failover",
        }
    }
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        relaymesh_net::logging::init();
    }
    let args = Args::parse();
    // Every dial of this process (clients, stats, the admin API) trusts it.
    match relaymesh_net::tls::Connector::from_ca_or_env(args.ca.as_deref()) {
        Ok(tls) => {
            let _ = tls.install_default();
        }
        Err(e) => {
            eprintln!("simulation: error: --ca: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("simulation: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything validated, before anything starts.
struct Plan {
    scenario: Scenario,
    clients: usize,
    rate: f64,
    duration: Duration,
    workload: Workload,
    shard: Shard,
    run_id: String,
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    let scenario = args.scenario;
    let clients = args.clients.unwrap_or(match scenario {
        Scenario::Rooms => 300,
        Scenario::Fanout => 101,
        Scenario::Dense => 50,
        Scenario::Churn => 20,
        Scenario::Ramp => 11,
        Scenario::Direct => 100,
        Scenario::Failover => 150,
    });
    let rate = args.rate.unwrap_or(match scenario {
        Scenario::Rooms => 5.0,
        Scenario::Fanout => 100.0,
        Scenario::Dense => 10.0,
        Scenario::Churn => 50.0,
        Scenario::Ramp => 5000.0,
        Scenario::Direct => 20.0,
        Scenario::Failover => 20.0,
    });
    let duration = args.duration.unwrap_or(if scenario == Scenario::Ramp {
        3.0
    } else {
        15.0
    });
    anyhow::ensure!(clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(
        duration > 0.0 && duration <= 86_400.0,
        "--duration must be between 0 and 86400 seconds"
    );
    anyhow::ensure!(
        (0.0..=3_600.0).contains(&args.drain),
        "--drain must be between 0 and 3600 seconds"
    );
    anyhow::ensure!(args.servers >= 1, "--servers must be at least 1");
    anyhow::ensure!(u32::try_from(clients).is_ok(), "--clients is too large");
    let shape = match scenario {
        Scenario::Fanout | Scenario::Ramp => {
            anyhow::ensure!(
                args.publishers >= 1 && args.publishers < clients,
                "--publishers must be between 1 and --clients - 1"
            );
            Shape::Fanout {
                publishers: args.publishers,
            }
        }
        Scenario::Dense | Scenario::Churn | Scenario::Direct => Shape::Dense,
        Scenario::Rooms | Scenario::Failover => {
            anyhow::ensure!(args.room_size >= 1, "--room-size must be at least 1");
            Shape::Rooms {
                size: args.room_size,
            }
        }
    };
    if scenario == Scenario::Ramp {
        anyhow::ensure!(args.ramp_factor > 1.0, "--ramp-factor must be above 1");
        anyhow::ensure!(args.ramp_steps >= 1, "--ramp-steps must be at least 1");
    }
    if scenario == Scenario::Churn {
        anyhow::ensure!(args.churners >= 1, "--churners must be at least 1");
    }
    if scenario == Scenario::Direct {
        anyhow::ensure!(clients >= 2, "direct needs at least 2 nodes (--clients)");
        anyhow::ensure!(
            clients <= 65_535,
            "direct takes at most 65535 nodes (--clients)"
        );
        let offline = args.offline_nodes.unwrap_or(clients / 5);
        anyhow::ensure!(offline < clients, "--offline-nodes must be below --clients");
        anyhow::ensure!(
            args.coordinator.is_none() || (args.account.is_some() && args.code.is_some()),
            "direct on a deployed cluster needs --account and --code (RELAYMESH_ACCESS_CODE) of an account on a coordinator with the sql store, which keeps the inbox"
        );
    }
    if scenario == Scenario::Failover {
        anyhow::ensure!(
            args.coordinator.is_some() || args.servers >= 2,
            "failover needs at least 2 comm servers (--servers): one dies, the others take its clients"
        );
        anyhow::ensure!(
            args.shard.is_none(),
            "failover needs one generator process (no --shard)"
        );
        let at = args.kill_server_at.unwrap_or(duration / 3.0);
        anyhow::ensure!(
            at >= 0.0 && at < duration,
            "--kill-server-at must be within the publishing time (0 to --duration)"
        );
        anyhow::ensure!(
            (0.0..=600.0).contains(&args.restart_after),
            "--restart-after must be between 0 and 600 seconds"
        );
    } else {
        anyhow::ensure!(
            args.kill_server_at.is_none()
                && args.kill_command.is_none()
                && args.restart_command.is_none(),
            "--kill-server-at, --kill-command and --restart-command go with --scenario failover"
        );
    }
    let shard = match args.shard {
        Some(shard) => {
            anyhow::ensure!(
                args.coordinator.is_some(),
                "--shard needs --coordinator: every shard must drive the same cluster"
            );
            anyhow::ensure!(
                matches!(
                    scenario,
                    Scenario::Rooms | Scenario::Fanout | Scenario::Dense
                ),
                "--shard works with rooms, fanout and dense; run {} in one process",
                scenario.name()
            );
            anyhow::ensure!(
                shard.count == 1 || args.run_id.is_some(),
                "--shard needs --run-id, the same on every shard"
            );
            shard
        }
        None => Shard::WHOLE,
    };
    if let Some(at) = args.drain_server_at {
        anyhow::ensure!(
            at >= 0.0 && at < duration,
            "--drain-server-at must be within the publishing time (0 to --duration)"
        );
        anyhow::ensure!(
            matches!(
                scenario,
                Scenario::Rooms | Scenario::Fanout | Scenario::Dense
            ),
            "--drain-server-at works with rooms, fanout and dense"
        );
        anyhow::ensure!(
            args.shard.is_none_or(|s| s.count == 1),
            "--drain-server-at needs one generator process (no --shard)"
        );
        anyhow::ensure!(
            args.coordinator.is_none() || args.admin.is_some(),
            "--drain-server-at on a deployed cluster needs --admin (RELAYMESH_ADMIN) and RELAYMESH_ADMIN_TOKEN"
        );
    }
    let run_id = match &args.run_id {
        Some(id) => {
            anyhow::ensure!(
                !id.is_empty()
                    && id.len() <= 64
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "--run-id must be 1-64 letters, digits, '-' or '_'"
            );
            id.clone()
        }
        None => format!("{:08x}", rand::random::<u32>()),
    };
    Ok(Plan {
        scenario,
        clients,
        rate,
        duration: Duration::from_secs_f64(duration),
        workload: Workload { clients, shape },
        shard,
        run_id,
    })
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let plan = plan(&args)?;
    let cores = relaymesh_net::procstat::cores();
    let embedded = match &args.coordinator {
        Some(_) => None,
        None => Some(cluster::Embedded::start(
            args.servers,
            args.cluster_threads.unwrap_or(cores),
            cluster::Options {
                inbox: plan.scenario == Scenario::Direct,
                admin: args.drain_server_at.is_some(),
                history: args.history.unwrap_or(match plan.scenario {
                    Scenario::Failover => Toggle::On,
                    _ => Toggle::Off,
                }) == Toggle::On,
                killable: plan.scenario == Scenario::Failover,
            },
        )?),
    };
    if args.cluster_only {
        let Some(cluster) = embedded else {
            unreachable!("clap refuses --cluster-only with --coordinator")
        };
        // The one line scripts read: where to point the load generators.
        println!("{}", cluster.coordinator_url);
        eprintln!(
            "embedded cluster of {} comm servers serving; stop with Ctrl-C",
            args.servers
        );
        cluster.serve_until_signalled();
        cluster.stop();
        return Ok(ExitCode::SUCCESS);
    }
    let (coordinator, servers) = match &embedded {
        Some(cluster) => (cluster.coordinator_url.clone(), Servers::Embedded),
        None => (
            args.coordinator.clone().unwrap_or_default(),
            Servers::Deployed,
        ),
    };
    let generator_threads = args.generator_threads.unwrap_or(cores).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(generator_threads)
        .thread_name(usage::GENERATOR_THREADS)
        .enable_all()
        .build()
        .context("starting the load generator runtime")?;
    let meter = Meter {
        servers,
        coordinator: coordinator.clone(),
        generator_threads,
    };
    let cluster_text = match &embedded {
        Some(_) => format!("{} embedded comm servers", args.servers),
        None => format!("cluster at {coordinator}"),
    };
    let cluster_text = match (&embedded, args.history) {
        (Some(_), Some(Toggle::On)) => format!("{cluster_text}, history on"),
        (Some(_), None) if plan.scenario == Scenario::Failover => {
            format!("{cluster_text}, history on")
        }
        (Some(_), Some(Toggle::Off)) if plan.scenario == Scenario::Failover => {
            format!("{cluster_text}, history off")
        }
        _ => cluster_text,
    };
    let progress = Progress::new(args.quiet);
    progress.line(format!(
        "coordinator {coordinator}{}, run id {}",
        if embedded.is_some() {
            " (embedded)"
        } else {
            ""
        },
        plan.run_id
    ));
    let mut drive_args = args.clone_for_drive();
    drive_args.login = match (&embedded, &args.account, &args.code) {
        (Some(cluster), _, _) => cluster.login.clone(),
        (None, Some(account), Some(code)) => Some(relaymesh_client::Credentials::AccessCode {
            account: account.clone(),
            code: code.clone(),
            role: String::new(),
            group: String::new(),
        }),
        _ => None,
    };
    drive_args.server_drain = match args.drain_server_at {
        Some(at) => {
            let (admin, token) = match &embedded {
                Some(cluster) => cluster
                    .admin
                    .clone()
                    .context("the embedded cluster has no admin API")?,
                None => (
                    args.admin.clone().unwrap_or_default(),
                    std::env::var("RELAYMESH_ADMIN_TOKEN")
                        .context("--drain-server-at needs RELAYMESH_ADMIN_TOKEN")?,
                ),
            };
            Some(operator::DrainPlan {
                admin,
                token,
                ca: args.ca.clone(),
                at: Duration::from_secs_f64(at),
                server: args.drain_server.clone(),
            })
        }
        None => None,
    };
    if plan.scenario == Scenario::Failover {
        let how = match &embedded {
            Some(cluster) => kill::KillHow::Embedded(
                cluster
                    .killable
                    .clone()
                    .context("the embedded cluster's servers cannot be killed")?,
            ),
            None => kill::KillHow::Commands {
                kill: args.kill_command.clone(),
                restart: args.restart_command.clone(),
            },
        };
        drive_args.server_kill = Some(kill::KillPlan {
            at: Duration::from_secs_f64(
                args.kill_server_at
                    .unwrap_or(plan.duration.as_secs_f64() / 3.0),
            ),
            restart_after: Duration::from_secs_f64(args.restart_after),
            how,
            server: args.kill_server.clone(),
        });
    }
    let drive = drive(drive_args, plan, coordinator, meter, progress.clone());
    let result = runtime.block_on(async move { tokio::spawn(drive).await });
    progress.finish();
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Some(cluster) = embedded {
        cluster.stop();
    }
    let Some(report) = result.context("the load generator panicked")?? else {
        // A non-leader shard: shard 0 prints the combined report.
        return Ok(ExitCode::SUCCESS);
    };
    let report = Report {
        setup: Setup {
            cluster: cluster_text,
            ..report.setup
        },
        ..report
    };
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "relaymesh {} ({})",
            report.setup.scenario, report.setup.shape
        );
        plot::write(path, &title, &report.outcome)
            .with_context(|| format!("drawing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let leaked = report
        .churn
        .as_ref()
        .is_some_and(|c| c.leaked_sessions + c.leaked_topics + c.leaked_remote_topics > 0);
    Ok(if args.check && (!report.clean() || leaked) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The flags the load generator needs (the rest stay on the main thread).
#[derive(Debug, Clone)]
struct DriveArgs {
    servers: Option<usize>,
    payload: usize,
    drain: Duration,
    churners: usize,
    churn_messages: u64,
    ramp_factor: f64,
    ramp_steps: usize,
    min_delivery: f64,
    max_p99: Duration,
    slow: Slow,
    slot: Option<Duration>,
    shard_timeout: Duration,
    /// Direct: the nodes' account login, and how many log in late.
    login: Option<relaymesh_client::Credentials>,
    offline_nodes: Option<usize>,
    /// Rooms, fanout, dense: a comm server to drain while publishing.
    server_drain: Option<operator::DrainPlan>,
    /// Failover: the comm server to kill while publishing.
    server_kill: Option<kill::KillPlan>,
}

impl Args {
    fn clone_for_drive(&self) -> DriveArgs {
        DriveArgs {
            servers: self.coordinator.is_none().then_some(self.servers),
            payload: self.payload.max(measure::HEADER),
            drain: Duration::from_secs_f64(self.drain),
            churners: self.churners,
            churn_messages: self.churn_messages,
            ramp_factor: self.ramp_factor,
            ramp_steps: self.ramp_steps,
            min_delivery: self.min_delivery / 100.0,
            max_p99: Duration::from_secs_f64(self.max_p99_ms.max(0.0) / 1_000.0),
            slow: Slow {
                subscribers: self.slow_subscribers,
                delay: Duration::from_millis(self.slow_delay_ms),
            },
            slot: self.slot_ms.map(|ms| Duration::from_millis(ms.max(10))),
            shard_timeout: Duration::from_secs(self.shard_timeout),
            login: None,
            offline_nodes: self.offline_nodes,
            server_drain: None,
            server_kill: None,
        }
    }
}

/// Runs the scenario on the generator runtime; `None` for a shard that is not the leader.
async fn drive(
    args: DriveArgs,
    plan: Plan,
    coordinator: String,
    meter: Meter,
    progress: Progress,
) -> anyhow::Result<Option<Report>> {
    let prefix = format!("sim/{}/{}", plan.run_id, plan.scenario.name());
    let slot = args
        .slot
        .unwrap_or_else(|| (plan.duration / 150).max(Duration::from_millis(100)));
    let shape = match plan.workload.shape {
        Shape::Fanout { publishers } => {
            format!("{publishers} -> {} subscribers", plan.clients - publishers)
        }
        Shape::Dense => format!("{} clients on one topic", plan.clients),
        Shape::Rooms { size } => format!(
            "{} clients in {} rooms of {size}",
            plan.clients,
            plan.workload.topics()
        ),
    };
    let mut setup = Setup {
        scenario: plan.scenario.name(),
        shape,
        cluster: String::new(),
        servers: args.servers,
        rate_per_publisher: plan.rate,
        payload_bytes: args.payload,
        duration_s: plan.duration.as_secs_f64(),
    };
    let round = Round {
        coordinator: coordinator.clone(),
        topic_prefix: prefix.clone(),
        workload: plan.workload,
        rate: plan.rate,
        payload: args.payload,
        duration: plan.duration,
        drain: args.drain,
        shard: plan.shard,
        slow: args.slow,
        slot,
        server_drain: args.server_drain.clone(),
        server_kill: args.server_kill.clone(),
    };
    match plan.scenario {
        Scenario::Direct => {
            let offline = args.offline_nodes.unwrap_or(plan.clients / 5);
            setup.shape = format!(
                "{} nodes sending to random others, {offline} offline for the first half",
                plan.clients
            );
            let direct = direct::Direct {
                coordinator,
                credentials: args
                    .login
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("direct needs an account login"))?,
                nodes: plan.clients,
                offline,
                rate: plan.rate,
                payload: args.payload,
                duration: plan.duration,
                drain: args.drain,
                slot,
            };
            let (outcome, report) = direct.run(&meter, &progress).await?;
            Ok(Some(Report {
                setup,
                outcome,
                churn: None,
                ramp: None,
                direct: Some(report),
            }))
        }
        Scenario::Churn => {
            setup.shape = format!(
                "{} steady subscribers, {} churning clients x {} messages",
                plan.clients, args.churners, args.churn_messages
            );
            let churn = Churn {
                coordinator,
                topic_prefix: prefix,
                steady: plan.clients,
                workers: args.churners,
                messages: args.churn_messages,
                rate: plan.rate,
                payload: args.payload,
                duration: plan.duration,
                drain: args.drain,
                slot,
            };
            let (outcome, churn) = churn.run(&meter, &progress).await?;
            Ok(Some(Report {
                setup,
                outcome,
                churn: Some(churn),
                ramp: None,
                direct: None,
            }))
        }
        Scenario::Ramp => {
            let ramp = Ramp {
                round,
                factor: args.ramp_factor,
                steps: args.ramp_steps,
                min_delivery: args.min_delivery,
                max_p99: args.max_p99,
            };
            let result = ramp.run(&meter, &progress).await?;
            let best = result.best.as_ref().map(|(i, _)| *i);
            let outcome = match (result.best, result.first) {
                (Some((i, outcome)), _) => {
                    setup.rate_per_publisher =
                        plan.rate * args.ramp_factor.powi(i32::try_from(i).unwrap_or(0));
                    outcome
                }
                (None, Some(outcome)) => outcome,
                (None, None) => anyhow::bail!("the ramp ran no step"),
            };
            Ok(Some(Report {
                setup,
                outcome,
                churn: None,
                direct: None,
                ramp: Some(RampSummary {
                    steps: result.steps,
                    best,
                    min_delivery: args.min_delivery,
                    max_p99_ms: args.max_p99.as_secs_f64() * 1_000.0,
                }),
            }))
        }
        Scenario::Rooms | Scenario::Fanout | Scenario::Dense | Scenario::Failover => {
            let mut control = match plan.shard.count {
                1 => None,
                _ => Some(
                    Control::connect(
                        &coordinator,
                        &prefix,
                        plan.shard,
                        format!(
                            "{} {:?} clients={} rate={} duration={:?} payload={} slot={:?}",
                            plan.scenario.name(),
                            plan.workload.shape,
                            plan.clients,
                            plan.rate,
                            plan.duration,
                            args.payload,
                            slot
                        ),
                        plan.duration + args.drain + args.shard_timeout,
                    )
                    .await?,
                ),
            };
            let mut outcome = round.run(control.as_mut(), &meter, &progress).await?;
            if let Some(mut control) = control {
                let others = control.gather(outcome.to_part()).await?;
                control.close().await;
                if !plan.shard.is_leader() {
                    progress.line(format!(
                        "shard {}/{}: sent results to shard 0",
                        plan.shard.index, plan.shard.count
                    ));
                    return Ok(None);
                }
                for part in &others {
                    outcome.absorb(part);
                }
            }
            Ok(Some(Report {
                setup,
                outcome,
                churn: None,
                ramp: None,
                direct: None,
            }))
        }
    }
}
