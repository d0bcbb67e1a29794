//! `bench`: relaymesh side by side with NATS, Mosquitto and Redis pub/sub on one machine.
//!
//! ```text
//! bench/compare.sh                      # every system and scenario (needs the peers installed)
//! bench --systems relaymesh --smoke     # seconds-long check of the harness (CI)
//! bench --systems relaymesh,nats --scenarios fanout10 --tls off,on   # plain against TLS
//! bench --systems relaymesh --scenarios fanout10,two-server --history off,on --repeat 3
//! bench --systems relaymesh --scenarios recovery,history-memory   # topic history
//! ```
//!
//! Each system runs as real processes started from `bench/configs/`, pinned to the server CPU,
//! one system at a time; this process is the load generator (one thread). Results go to
//! `results.json` and `results.md` in `--out`.

mod clientfanout;
mod connect;
mod coordlogins;
mod drivers;
mod histmem;
mod idle;
mod inbox;
mod load;
mod logins;
mod measure;
mod pki;
mod recovery;
mod report;
mod servers;
mod storm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::drivers::{Route, System};
use crate::load::{Shape, Window};
use crate::pki::Pki;
use crate::report::{Outcome, Results};
use crate::servers::Launcher;

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
    /// 1 publisher → 10 subscribers on one topic.
    Fanout10,
    /// 1 publisher → 1000 subscribers on one topic.
    Fanout1000,
    /// 50 publishers at 10 msg/s each to one topic with 50 subscribers.
    Dense,
    /// 1 → 10 with the publisher on server A and the subscribers on server B.
    TwoServer,
    /// 1000 publishers → 1000 topics → 1000 subscribers, one each.
    P2p,
    /// P2p with the subscribers on server B.
    P2pTwoServer,
    /// 1000 pairs across two servers, relaymesh with direct messages to nodes (others: one
    /// subject per pair, as P2pTwoServer).
    Direct,
    /// Fanout10 with an application backend publishing through the coordinator's gRPC backend
    /// API instead of a client (relaymesh only).
    Backend,
    /// Memory per idle client on one comm server (relaymesh only).
    Idle,
    /// Logins per second through one coordinator (relaymesh only).
    Logins,
    /// Logins per second one coordinator takes alone on its core, the comm servers' side of
    /// them played by the generator (relaymesh only).
    CoordinatorLogins,
    /// Topic history: a subscriber that lost its server recovers what it missed (three comm
    /// servers), and backlog reads (relaymesh only).
    Recovery,
    /// Topic history: bytes per held message and the bounds under a flood (relaymesh only).
    HistoryMemory,
    /// A reconnect storm: the clients of one comm server of three, killed, back on the other
    /// two (relaymesh only).
    Storm,
    /// The cost of a connection: clients connect and subscribe, the servers' CPU per client.
    Connect,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Fanout10 => "fanout10",
            Self::Fanout1000 => "fanout1000",
            Self::Dense => "dense",
            Self::TwoServer => "two-server",
            Self::P2p => "p2p",
            Self::P2pTwoServer => "p2p-two-server",
            Self::Direct => "direct",
            Self::Backend => "backend",
            Self::Idle => "idle",
            Self::Logins => "logins",
            Self::CoordinatorLogins => "coordinator-logins",
            Self::Recovery => "recovery",
            Self::HistoryMemory => "history-memory",
            Self::Storm => "storm",
            Self::Connect => "connect",
        }
    }
}

/// Whether a system runs with TLS on its links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsMode {
    /// Plain TCP.
    Off,
    /// TLS on every link.
    On,
}

/// How relaymesh clients log in (`--relaymesh-logins`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LoginPath {
    Relay,
    Http,
}

/// Whether relaymesh's comm servers keep topic history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HistoryMode {
    /// No `[history]` table (the default config).
    Off,
    /// `bench/configs/history.toml`: every topic keeps history, default bounds.
    On,
}

/// Side-by-side benchmark of relaymesh, NATS, Mosquitto and Redis pub/sub on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Systems to measure, one at a time, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "relaymesh,nats,mosquitto,redis"
    )]
    systems: Vec<System>,
    /// Scenarios to run for each system.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fanout10,fanout1000,dense,two-server,p2p,p2p-two-server,direct,backend,idle,logins,coordinator-logins,recovery,history-memory,storm,connect"
    )]
    scenarios: Vec<Scenario>,
    /// Directory for results.json, results.md and the servers' configs and logs.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The documented server configs.
    #[arg(long, default_value = "bench/configs")]
    configs: PathBuf,
    /// Directory with the relaymesh `coordinator` and `commserver` binaries (default: this
    /// binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// CPU list the servers are pinned to with `taskset -c`; empty leaves them unpinned.
    #[arg(long, default_value = "0")]
    server_cpu: String,
    /// Warm-up per step, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measured window per step, seconds.
    #[arg(long, default_value_t = 5.0)]
    measure: f64,
    /// Longest wait for messages still in flight after a step, seconds.
    #[arg(long, default_value_t = 1.0)]
    drain: f64,
    /// A step passes while at least this share of expected deliveries arrives...
    #[arg(long, default_value_t = 0.999)]
    min_delivery: f64,
    /// ...and its p99 stays within this many milliseconds.
    #[arg(long, default_value_t = 10.0)]
    max_p99_ms: f64,
    /// A login step passes while its p99 stays within this many milliseconds.
    #[arg(long, default_value_t = 20.0)]
    login_p99_ms: f64,
    /// Idle client counts to measure memory at.
    #[arg(long, value_delimiter = ',', default_value = "10000,25000,50000")]
    idle_clients: Vec<usize>,
    /// Source addresses for idle clients: 127.0.0.1 up to 127.0.0.N.
    #[arg(long, default_value_t = 4)]
    source_addresses: u8,
    /// Offered delivered messages per second to step through instead of each scenario's own
    /// ladder (message scenarios only).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Offered logins per second to step through instead of the logins scenario's ladder.
    #[arg(long, value_delimiter = ',')]
    login_rates: Vec<f64>,
    /// A seconds-long run that checks the harness works: short windows, one small step per
    /// scenario, 100 point-to-point pairs, 300 idle clients.
    #[arg(long)]
    smoke: bool,
    /// Instead of the systems: the receiving side of a fan-out with relaymesh's Rust client
    /// against the coordinator at this URL (`clients/typescript/bench/fanout.ts` runs it beside
    /// the TypeScript client and nats.js): `--fanout-subscribers` clients on `--fanout-topic`,
    /// "ready" on stdout, `--warmup` s, then `--measure` s; prints one JSON line.
    #[arg(long)]
    client_fanout: Option<String>,
    /// `--client-fanout`: subscribers in this process.
    #[arg(long, default_value_t = 10)]
    fanout_subscribers: usize,
    /// `--client-fanout`: the topic.
    #[arg(long, default_value = "bench.fanout")]
    fanout_topic: String,
    /// Instead of the systems: the durable inbox's group commit against one transaction per
    /// message, on SQLite (a file in `--out`) and on the PostgreSQL at `--inbox-postgres`.
    #[arg(long)]
    inbox: bool,
    /// PostgreSQL URL for `--inbox` (a database the bench may write to).
    #[arg(long, env = "RELAYMESH_BENCH_POSTGRES_URL")]
    inbox_postgres: Option<String>,
    /// Messages per transaction for the group commit.
    #[arg(long, default_value_t = 256)]
    inbox_batch: usize,
    /// TLS on every link, with a CA and a server certificate (ECDSA P-256, for 127.0.0.1) the
    /// bench makes at start in a temporary directory removed at the end. relaymesh: the
    /// coordinator and comm servers get --tls-cert/--tls-key/--ca (so the comm servers dial
    /// the coordinator and each other over TLS) and clients dial wss:// and https://,
    /// trusting the bench CA. NATS: TLS on the client port and on the route between two
    /// nodes (bench/configs/nats-*tls.conf); async-nats requires TLS with the bench CA as its
    /// root. `--tls` alone (`--tls on`) runs everything over TLS; `--tls off,on` runs each
    /// system's scenarios plain, then over TLS, back to back, in one run. Mosquitto and Redis
    /// are measured plain only.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    tls: Vec<TlsMode>,
    /// Topic history on relaymesh's comm servers: `on` appends bench/configs/history.toml
    /// (every topic keeps history, default bounds) to each comm server's config; `--history
    /// off,on` runs each scenario without, then with, back to back (with `--repeat`, the pair
    /// alternates that many times). Other systems run without (`n/a` with history).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    history: Vec<HistoryMode>,
    /// Runs each system and scenario this many times, its TLS and history settings
    /// alternating within each repetition (off, on, off, on...), every run on fresh servers.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// How relaymesh clients log in: `relay` through the comm server they are meant for (a
    /// keyless connection whose `Login` that server relays to the coordinator; reconnects go
    /// through another server), or `http`: `POST /v1/login` to the coordinator, then the
    /// server with the key (every login, reconnects too).
    #[arg(long, value_enum, default_value = "relay")]
    relaymesh_logins: LoginPath,
    /// Storm scenario: clients on the comm server that is killed (each holds an open file in
    /// that server and in the generator, so RLIMIT_NOFILE bounds it).
    #[arg(long, default_value_t = 19_000)]
    storm_clients: usize,
    /// Storm scenario: topics the clients subscribe to (client `i` to `storm/{i % N}`).
    #[arg(long, default_value_t = 100)]
    storm_topics: usize,
    /// Connect scenario: clients that connect and subscribe (each holds an open file in the
    /// server and in the generator).
    #[arg(long, default_value_t = 5000)]
    connect_clients: usize,
    /// Connect scenario: topics the clients subscribe to (client `i` to `connect/{i % N}`).
    #[arg(long, default_value_t = 100)]
    connect_topics: usize,

    /// Recovery scenario: messages published while the subscriber is away (and read back in
    /// the backlog reads).
    #[arg(long, default_value_t = 10_000)]
    recovery_messages: u64,
    /// Recovery scenario: trials, each on a fresh cluster.
    #[arg(long, default_value_t = 5)]
    recovery_trials: usize,
    /// Recovery scenario: timed backlog reads from each reader.
    #[arg(long, default_value_t = 10)]
    history_reads: usize,
    /// History-memory scenario: payload sizes, bytes (one fresh server each).
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    memory_payloads: Vec<usize>,
    /// History-memory scenario: topics of the last flood (twice the config's max_topics of
    /// 1000 leaves half of them without history).
    #[arg(long, default_value_t = 2000)]
    memory_topics: usize,
    /// History-memory scenario: each flood publishes this many times max_total_bytes.
    #[arg(long, default_value_t = 10.0)]
    memory_flood_factor: f64,
    /// History-memory scenario: longest stage, seconds.
    #[arg(long, default_value_t = 20.0)]
    memory_max_stage: f64,
    /// History-memory scenario: also run its stages on a comm server without history, to
    /// compare the server's CPU per message.
    #[arg(long)]
    memory_control: bool,
}

impl Args {
    /// The TLS settings to run each system and scenario in, in order: `false` is plain.
    fn tls_modes(&self) -> Vec<bool> {
        modes(self.tls.iter().map(|m| *m == TlsMode::On))
    }

    /// The history settings to run each scenario in, in order: `false` is without.
    fn history_modes(&self) -> Vec<bool> {
        modes(self.history.iter().map(|m| *m == HistoryMode::On))
    }
}

/// An off/on flag's settings in the order given, each once; off alone when none is given.
fn modes(given: impl Iterator<Item = bool>) -> Vec<bool> {
    let mut modes: Vec<bool> = Vec::new();
    for on in given {
        if !modes.contains(&on) {
            modes.push(on);
        }
    }
    if modes.is_empty() {
        modes.push(false);
    }
    modes
}

/// Offered delivered messages per second, one step each.
const FANOUT_LADDER: &[f64] = &[
    100e3, 250e3, 500e3, 750e3, 1e6, 1.25e6, 1.5e6, 1.75e6, 2e6, 2.5e6, 3e6, 4e6,
];
/// The backend scenario's: one unary gRPC call per published message puts its limit an order
/// of magnitude below a client's, under the first step of [`FANOUT_LADDER`].
const BACKEND_LADDER: &[f64] = &[
    5e3, 10e3, 20e3, 30e3, 50e3, 75e3, 100e3, 150e3, 200e3, 300e3, 500e3,
];
const P2P_LADDER: &[f64] = &[50e3, 100e3, 200e3, 300e3, 500e3, 750e3, 1e6, 1.5e6, 2e6];
const LOGIN_LADDER: &[f64] = &[1000.0, 2500.0, 5000.0, 7500.0, 10000.0, 15000.0];
const COORDINATOR_LOGIN_LADDER: &[f64] =
    &[10e3, 20e3, 40e3, 60e3, 80e3, 100e3, 120e3, 140e3, 160e3];

fn shape(scenario: Scenario, smoke: bool) -> Option<Shape> {
    let first = |ladder: &[f64]| -> Vec<f64> {
        if smoke {
            vec![ladder[0] / 10.0]
        } else {
            ladder.to_vec()
        }
    };
    Some(match scenario {
        Scenario::Fanout10 => Shape {
            publishers: 1,
            topics: 1,
            subscribers_per_topic: 10,
            subscriber_server: 0,
            ladder: first(FANOUT_LADDER),
            route: Route::Topic,
        },
        Scenario::Fanout1000 => Shape {
            publishers: 1,
            topics: 1,
            subscribers_per_topic: 1000,
            subscriber_server: 0,
            ladder: first(FANOUT_LADDER),
            route: Route::Topic,
        },
        Scenario::Dense => Shape {
            publishers: 50,
            topics: 1,
            subscribers_per_topic: 50,
            subscriber_server: 0,
            // 50 publishers × 10 msg/s × 50 subscribers.
            ladder: vec![25e3],
            route: Route::Topic,
        },
        Scenario::TwoServer => Shape {
            publishers: 1,
            topics: 1,
            subscribers_per_topic: 10,
            subscriber_server: 1,
            ladder: first(FANOUT_LADDER),
            route: Route::Topic,
        },
        Scenario::Backend => Shape {
            publishers: 1,
            topics: 1,
            subscribers_per_topic: 10,
            subscriber_server: 0,
            ladder: first(BACKEND_LADDER),
            route: Route::Backend,
        },
        Scenario::P2p | Scenario::P2pTwoServer | Scenario::Direct => {
            let pairs = if smoke { 100 } else { 1000 };
            Shape {
                publishers: pairs,
                topics: pairs,
                subscribers_per_topic: 1,
                subscriber_server: usize::from(scenario != Scenario::P2p),
                ladder: first(P2P_LADDER),
                route: if scenario == Scenario::Direct {
                    Route::Direct
                } else {
                    Route::Topic
                },
            }
        }
        Scenario::Idle
        | Scenario::Logins
        | Scenario::CoordinatorLogins
        | Scenario::Recovery
        | Scenario::HistoryMemory
        | Scenario::Storm
        | Scenario::Connect => {
            return None;
        }
    })
}

/// Why `system` does not run `scenario` (with TLS when `tls`, with history when `history`),
/// if it does not.
fn not_applicable(
    system: System,
    scenario: Scenario,
    tls: bool,
    history: bool,
) -> Option<&'static str> {
    match (system, scenario) {
        (_, _) if history && system != System::Relaymesh => {
            Some("relaymesh only: topic history on its comm servers")
        }
        (System::Mosquitto, Scenario::TwoServer | Scenario::P2pTwoServer | Scenario::Direct) => {
            Some("mosquitto does not cluster")
        }
        (System::Redis, Scenario::TwoServer | Scenario::P2pTwoServer | Scenario::Direct) => {
            Some("redis pub/sub between nodes needs Redis Cluster; not measured")
        }
        (System::Relaymesh, Scenario::CoordinatorLogins) if tls => {
            Some("measured without TLS: the generator's HTTP logins are plain TCP")
        }
        (System::Relaymesh, _) => None,
        (
            _,
            Scenario::Idle
            | Scenario::Logins
            | Scenario::CoordinatorLogins
            | Scenario::Recovery
            | Scenario::HistoryMemory
            | Scenario::Storm,
        ) => Some("relaymesh target only"),
        (_, Scenario::Backend) => Some("relaymesh only: publishes through its backend API"),
        (System::Mosquitto | System::Redis, _) if tls => {
            Some("measured without TLS (the bench sets TLS up for relaymesh and NATS)")
        }
        _ => None,
    }
}

/// `system/scenario` for progress lines, with ` (TLS)` after the system when `tls` and
/// ` (history)` when `history`.
fn label(system: System, scenario: Scenario, tls: bool, history: bool) -> String {
    format!(
        "{}{}{}/{}",
        system.name(),
        if tls { " (TLS)" } else { "" },
        if history { " (history)" } else { "" },
        scenario.name()
    )
}

/// One run of a system in a scenario.
#[derive(Debug, Clone, Copy)]
struct Run {
    system: System,
    scenario: Scenario,
    tls: bool,
    history: bool,
    /// Which repetition (0 for the first).
    repeat: u32,
}

impl Run {
    fn outcome(&self) -> Outcome {
        let mut o = Outcome::new(self.system, self.scenario, self.tls);
        o.history = self.history;
        o.repeat = self.repeat;
        o
    }

    fn label(&self) -> String {
        let l = label(self.system, self.scenario, self.tls, self.history);
        if self.repeat > 0 {
            format!("{l} #{}", self.repeat + 1)
        } else {
            l
        }
    }
}

/// The history scenarios, which start their own servers.
async fn run_history_scenario(
    args: &Args,
    launcher: &Launcher,
    run: Run,
) -> anyhow::Result<Outcome> {
    let label = run.label();
    let mut outcome = run.outcome();
    match run.scenario {
        Scenario::Recovery => {
            let plan = recovery::Plan {
                messages: if args.smoke {
                    args.recovery_messages.min(1000)
                } else {
                    args.recovery_messages
                },
                trials: if args.smoke { 1 } else { args.recovery_trials },
                reads: if args.smoke { 2 } else { args.history_reads },
            };
            let result = recovery::run(launcher, run.tls, plan, |line| {
                eprintln!("{label}: {line}");
            })
            .await?;
            outcome.recovery = Some(result);
        }
        _ => {
            let plan = histmem::Plan {
                payloads: if args.smoke {
                    args.memory_payloads.iter().take(1).copied().collect()
                } else {
                    args.memory_payloads.clone()
                },
                topics: args.memory_topics,
                flood_factor: if args.smoke {
                    args.memory_flood_factor.min(0.5)
                } else {
                    args.memory_flood_factor
                },
                max_stage: Duration::from_secs_f64(if args.smoke {
                    args.memory_max_stage.min(3.0)
                } else {
                    args.memory_max_stage
                }),
                control: args.memory_control,
            };
            outcome.memory = histmem::run(launcher, run.tls, &plan, |line| {
                eprintln!("{label}: {line}");
            })
            .await?;
        }
    }
    Ok(outcome)
}

async fn run_one(args: &Args, launcher: &Launcher, run: Run) -> anyhow::Result<Outcome> {
    let Run {
        system,
        scenario,
        tls,
        history,
        ..
    } = run;
    if matches!(scenario, Scenario::Recovery | Scenario::HistoryMemory) {
        return run_history_scenario(args, launcher, run).await;
    }
    if scenario == Scenario::Storm {
        let label = run.label();
        let mut outcome = run.outcome();
        let plan = storm::Plan {
            clients: if args.smoke {
                args.storm_clients.min(300)
            } else {
                args.storm_clients
            },
            topics: args.storm_topics,
            quiet: Duration::from_secs(if args.smoke { 1 } else { 3 }),
        };
        let plot = args.out.join("storm.svg");
        std::fs::create_dir_all(&args.out)?;
        outcome.storm = Some(
            storm::run(launcher, tls, plan, &plot, |line| {
                eprintln!("{label}: {line}");
            })
            .await?,
        );
        return Ok(outcome);
    }
    let servers = match scenario {
        Scenario::TwoServer | Scenario::P2pTwoServer | Scenario::Direct => 2,
        // The coordinator alone: the generator plays the comm servers.
        Scenario::CoordinatorLogins => 0,
        _ => 1,
    };
    let mut running = launcher
        .start(system, servers, tls, history.then_some(HISTORY_CONFIG))
        .await?;
    let label = run.label();
    let mut outcome = run.outcome();
    let window = Window {
        warmup: Duration::from_secs_f64(args.warmup),
        measure: Duration::from_secs_f64(args.measure),
        drain: Duration::from_secs_f64(args.drain),
        min_delivery: args.min_delivery,
        max_p99_ms: args.max_p99_ms,
    };
    match scenario {
        Scenario::Idle => {
            let counts = if args.smoke {
                vec![300]
            } else {
                args.idle_clients.clone()
            };
            outcome.idle = idle::run(&running, &counts, args.source_addresses, |s| {
                eprintln!("{label}: {}", report::idle_line(s));
            })
            .await?;
        }
        Scenario::Connect => {
            let clients = if args.smoke {
                args.connect_clients.min(200)
            } else {
                args.connect_clients
            };
            let r = connect::run(&running, system, clients, args.connect_topics).await?;
            eprintln!("{label}: {}", report::connect_line(&r));
            outcome.connect = Some(r);
        }
        Scenario::Logins => {
            let ladder = login_rates(args, 200.0, LOGIN_LADDER);
            outcome.logins_via = login_via(scenario, args.relaymesh_logins);
            outcome.logins = logins::run(
                &running,
                &ladder,
                (window.warmup, window.measure),
                args.login_p99_ms,
                |s| eprintln!("{label}: {}", report::login_line(s)),
            )
            .await?;
        }
        Scenario::CoordinatorLogins => {
            let ladder = login_rates(args, 500.0, COORDINATOR_LOGIN_LADDER);
            outcome.logins_via = login_via(scenario, args.relaymesh_logins);
            outcome.logins = coordlogins::run(
                &running,
                args.relaymesh_logins == LoginPath::Relay,
                &ladder,
                (window.warmup, window.measure),
                args.login_p99_ms,
                |s| eprintln!("{label}: {}", report::login_line(s)),
            )
            .await?;
        }
        _ => {
            let mut shape =
                shape(scenario, args.smoke).ok_or_else(|| anyhow::anyhow!("no shape"))?;
            if !args.rates.is_empty() {
                shape.ladder = args.rates.clone();
            }
            let endpoints = running.endpoints.clone();
            outcome.steps = load::run(
                &endpoints,
                &running,
                &shape,
                scenario.name(),
                &window,
                |s| {
                    eprintln!("{label}: {}", report::step_line(s));
                },
            )
            .await?;
        }
    }
    running.check_alive(&launcher.run_dir)?;
    if system == System::Relaymesh {
        // What the servers' topic history holds at the end. A server too busy to answer in
        // time (100 000 idle clients in an emulated VM) costs this figure, not the run's.
        match report::HistoryHeld::read(&running, servers).await {
            Ok(held) => outcome.history_held = Some(held),
            Err(e) => eprintln!("{label}: history figures not read: {e:#}"),
        }
    }
    Ok(outcome)
}

/// The `[history]` table of `--history on`.
const HISTORY_CONFIG: &str = "history.toml";

/// The login rates a logins scenario steps through: one small step for `--smoke`, else
/// `--login-rates`, else the scenario's own ladder.
fn login_rates(args: &Args, smoke: f64, ladder: &[f64]) -> Vec<f64> {
    if args.smoke {
        vec![smoke]
    } else if !args.login_rates.is_empty() {
        args.login_rates.clone()
    } else {
        ladder.to_vec()
    }
}

/// How the logins of a logins scenario went, for its report.
fn login_via(scenario: Scenario, path: LoginPath) -> String {
    match (scenario, path) {
        (Scenario::CoordinatorLogins, LoginPath::Relay) => {
            "relayed (`RelayedLogin`) by three comm servers the generator plays"
        }
        (Scenario::CoordinatorLogins, LoginPath::Http) => {
            "`POST /v1/login`, a TCP connection each, keys reserved on three comm servers the generator plays"
        }
        (_, LoginPath::Relay) => {
            "`Client::connect` through the comm server (`login_servers`), relayed to the coordinator"
        }
        (_, LoginPath::Http) => "`Client::connect` with `POST /v1/login` to the coordinator",
    }
    .to_owned()
}

/// `--client-fanout`: one receiving run of the Rust client.
fn client_fanout_main(args: &Args, coordinator: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plan = clientfanout::Plan {
        coordinator: coordinator.to_owned(),
        subscribers: args.fanout_subscribers,
        topic: args.fanout_topic.clone(),
        warmup: Duration::from_secs_f64(args.warmup),
        measure: Duration::from_secs_f64(args.measure),
    };
    match runtime.block_on(clientfanout::run(plan)) {
        Ok(result) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench --client-fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--inbox`: the group-commit A/B; writes `inbox.json` and `inbox.md` in `--out`.
fn inbox_main(args: &Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (single, grouped) = if args.smoke {
        (50, 2_560)
    } else {
        (1_000, 25_600)
    };
    let mut databases = vec![(
        "SQLite (synchronous=FULL)".to_owned(),
        inbox::sqlite_url(&args.out),
    )];
    if let Some(url) = &args.inbox_postgres {
        databases.push(("PostgreSQL".to_owned(), url.clone()));
    }
    let figures = runtime.block_on(async {
        let mut figures = Vec::new();
        for (label, url) in &databases {
            let run = inbox::run(label, url, args.inbox_batch, single, grouped);
            figures.push(tokio::time::timeout(inbox::PATIENCE, run).await??);
        }
        Ok::<_, anyhow::Error>(figures)
    });
    let figures = match figures {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bench: inbox: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let table = inbox::markdown(&figures);
    println!("{table}");
    let written = std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::write(args.out.join("inbox.md"), &table))
        .and_then(|()| {
            let json = serde_json::to_string_pretty(&figures).unwrap_or_default();
            std::fs::write(args.out.join("inbox.json"), json + "\n")
        });
    if let Err(e) = written {
        eprintln!("bench: cannot write to {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(coordinator) = &args.client_fanout {
        return client_fanout_main(&args, coordinator);
    }
    if args.inbox {
        return inbox_main(&args);
    }
    if args.smoke {
        args.warmup = args.warmup.min(0.3);
        args.measure = args.measure.min(1.0);
        args.drain = args.drain.min(1.0);
    }
    let missing: Vec<(&str, &str)> = args
        .systems
        .iter()
        .filter_map(|&s| servers::requirement(s))
        .filter(|(program, _)| !servers::installed(program))
        .collect();
    if !missing.is_empty() {
        let programs: Vec<&str> = missing.iter().map(|m| m.0).collect();
        let packages: Vec<&str> = missing.iter().map(|m| m.1).collect();
        eprintln!(
            "bench: {} not installed; install with `apt-get install -y --no-install-recommends {}` or pick --systems",
            programs.join(", "),
            packages.join(" ")
        );
        return ExitCode::FAILURE;
    }
    if !args.server_cpu.is_empty() && !servers::installed("taskset") {
        eprintln!("bench: taskset (util-linux) is needed to pin servers; or pass --server-cpu ''");
        return ExitCode::FAILURE;
    }
    let bin_dir = match args.bin_dir.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
    }) {
        Some(dir) => dir,
        None => {
            eprintln!("bench: cannot tell where the relaymesh binaries are; pass --bin-dir");
            return ExitCode::FAILURE;
        }
    };
    if args.systems.contains(&System::Relaymesh)
        && !["coordinator", "commserver"]
            .iter()
            .all(|b| bin_dir.join(b).is_file())
    {
        eprintln!(
            "bench: no coordinator and commserver in {}; build them (cargo build --release -p coordinator -p commserver) or pass --bin-dir",
            bin_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let tls_modes = args.tls_modes();
    let history_modes = args.history_modes();
    if args.repeat == 0 {
        eprintln!("bench: --repeat must be at least 1");
        return ExitCode::FAILURE;
    }
    // The certificates live until the end of main (the directory is removed on drop).
    let pki = if tls_modes.contains(&true) {
        match Pki::create() {
            Ok(pki) => Some(pki),
            Err(e) => {
                eprintln!("bench: cannot make the TLS certificates: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let connector = match &pki {
        Some(pki) => match relaymesh_net::tls::Connector::new(Some(&pki.files().ca), None) {
            Ok(c) => {
                // Every wss:// and https:// dial in this process trusts the bench CA, even one
                // made without an explicit connector; plain URLs never use it.
                if c.clone().install_default().is_err() {
                    eprintln!("bench: a default TLS trust was installed already");
                    return ExitCode::FAILURE;
                }
                c
            }
            Err(e) => {
                eprintln!("bench: cannot load the bench CA: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => relaymesh_net::tls::Connector::default(),
    };
    let launcher = Launcher {
        configs: args.configs.clone(),
        run_dir: args.out.join("run"),
        bin_dir,
        server_cpu: Some(args.server_cpu.clone()).filter(|c| !c.is_empty()),
        tls: pki.as_ref().map(|p| p.files().clone()),
        connector,
        relay_logins: args.relaymesh_logins == LoginPath::Relay,
    };
    // One worker thread: the generator gets one core, as the servers do.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut results = Results::new(
        &args.server_cpu,
        args.warmup,
        args.measure,
        args.drain,
        args.max_p99_ms,
        args.smoke,
        &tls_modes,
    )
    .with_history(&history_modes);
    runtime.block_on(async {
        // Plain and TLS, without and with history, of one system and scenario run back to
        // back (alternating, repetition after repetition), so they see the machine in the
        // same state.
        for &system in &args.systems {
            for &scenario in &args.scenarios {
                // The history scenarios bring their own [history] config: run once.
                let own_history = matches!(
                    scenario,
                    Scenario::Recovery | Scenario::HistoryMemory | Scenario::Storm
                );
                let histories = if own_history {
                    &history_modes[..1]
                } else {
                    &history_modes[..]
                };
                for repeat in 0..args.repeat {
                    for &tls in &tls_modes {
                        for &history in histories {
                            let run = Run {
                                system,
                                scenario,
                                tls,
                                history,
                                repeat,
                            };
                            if let Some(why) = not_applicable(system, scenario, tls, history) {
                                if repeat == 0 {
                                    let mut o = run.outcome();
                                    o.status = format!("n/a: {why}");
                                    results.push(o);
                                }
                                continue;
                            }
                            let label = run.label();
                            eprintln!("bench: {label}");
                            match run_one(&args, &launcher, run).await {
                                Ok(o) => results.push(o),
                                Err(e) => {
                                    eprintln!("bench: {label} failed: {e:#}");
                                    let mut o = run.outcome();
                                    o.status = format!("error: {e:#}");
                                    results.push(o);
                                }
                            }
                        }
                    }
                }
            }
        }
    });
    match results.write(&args.out) {
        Ok(()) => {
            println!("{}", results.markdown());
            eprintln!(
                "bench: wrote {} and {}",
                args.out.join("results.json").display(),
                args.out.join("results.md").display()
            );
            if results.any_failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bench: cannot write results to {}: {e}", args.out.display());
            ExitCode::FAILURE
        }
    }
}
