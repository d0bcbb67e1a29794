//! The simulation as users run it: the binary, against an embedded cluster (or one served by
//! `--cluster-only` for sharded runs), with the report checked through `--json`.
//!
//! Every scenario runs briefly at a modest rate and must deliver every expected message exactly
//! once and in order; a deliberately slow subscriber must show up as drops in the report.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// The JSON fields the README promises to scripts.
const FIELDS: &[&str] = &[
    "scenario",
    "published",
    "expected",
    "delivered",
    "lost",
    "duplicates",
    "out_of_order",
    "delivered_per_s",
    "latency_us",
    "connect_ms",
    "clients_per_server",
    "cross_server_delivered",
    "dropped_reported",
    "lost_by_cause",
    "server_dropped",
    "cpu",
    "memory",
    "timeline",
    "warnings",
];

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("relaymesh-sim-{}-{name}", std::process::id()))
}

/// Runs the simulation with `args` plus `--json`; returns the output and the report.
fn simulate(name: &str, args: &[&str]) -> (Output, Value) {
    let json = temp(&format!("{name}.json"));
    let output = Command::new(env!("CARGO_BIN_EXE_simulation"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let report = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&json);
    (output, report)
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts a clean run: the report has every field, something was delivered, and nothing was
/// lost, duplicated or reordered.
fn assert_clean(output: &Output, report: &Value, scenario: &str) {
    assert!(output.status.success(), "{}", text(output));
    for field in FIELDS {
        assert!(!report[field].is_null(), "{field} missing: {report:#}");
    }
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            report["latency_us"][q].is_u64(),
            "latency_us.{q}: {report:#}"
        );
    }
    for q in ["p50", "p99"] {
        assert!(
            report["connect_ms"][q].is_f64(),
            "connect_ms.{q}: {report:#}"
        );
    }
    assert_eq!(report["scenario"], scenario);
    assert!(report["published"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["expected"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["delivered"], report["expected"], "{report:#}");
    assert_eq!(
        [
            &report["lost"],
            &report["duplicates"],
            &report["out_of_order"]
        ],
        [0, 0, 0],
        "{report:#}"
    );
    // On a busy machine the report may rightly warn that the CPU was saturated or publishers
    // ran late; any other warning is about delivery and fails the run.
    let about_load = |w: &Value| {
        let w = w.as_str().unwrap_or_default();
        w.contains("busy") || w.contains("behind their schedule")
    };
    let warnings = report["warnings"].as_array().unwrap();
    assert!(warnings.iter().all(about_load), "{report:#}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("every expected message delivered once, in order"),
        "{stdout}"
    );
}

fn clients_on_servers(report: &Value) -> u64 {
    report["clients_per_server"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

#[test]
fn rooms_deliver_everything_mostly_across_servers() {
    let (output, report) = simulate(
        "rooms",
        &[
            "--clients",
            "40",
            "--room-size",
            "8",
            "--rate",
            "20",
            "--duration",
            "1",
            "--check",
        ],
    );
    assert_clean(&output, &report, "rooms");
    assert_eq!(clients_on_servers(&report), 40);
    assert_eq!(report["clients_per_server"].as_object().unwrap().len(), 3);
    // 40 members publish 20/s into rooms of 8: every message reaches 8 subscribers, and with
    // three servers some of them are elsewhere.
    assert_eq!(
        report["expected"],
        report["published"].as_u64().unwrap() * 8
    );
    assert!(
        report["cross_server_delivered"].as_u64().unwrap() > 0,
        "{report:#}"
    );
}

#[test]
fn draining_a_server_mid_run_moves_its_clients_and_loses_nothing() {
    let (output, report) = simulate(
        "drain",
        &[
            "--clients",
            "60",
            "--room-size",
            "6",
            "--rate",
            "50",
            "--duration",
            "3",
            "--drain-server-at",
            "1",
            "--check",
        ],
    );
    assert_clean(&output, &report, "rooms");
    let drain = &report["server_drain"];
    let drained = drain["server_id"].as_str().unwrap();
    assert!(drain["error"].is_null(), "{report:#}");
    // The busiest server's clients all moved, as the clients saw it too.
    let held = report["clients_per_server"][drained].as_u64().unwrap();
    assert!(held > 0, "{report:#}");
    assert_eq!(drain["moved"].as_u64(), Some(held), "{report:#}");
    assert_eq!(drain["remaining"], 0, "{report:#}");
    // Every one of them receives (each room member subscribes).
    assert_eq!(report["moves"].as_u64(), Some(held), "{report:#}");
    assert_eq!(report["disconnects"], 0, "{report:#}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("server drained  {drained}")),
        "{stdout}"
    );
}

#[test]
fn fanout_reaches_every_subscriber() {
    let (output, report) = simulate(
        "fanout",
        &[
            "--scenario",
            "fanout",
            "--clients",
            "21",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
    );
    assert_clean(&output, &report, "fanout");
    assert_eq!(
        (
            report["publishers"].as_u64(),
            report["subscribers"].as_u64()
        ),
        (Some(2), Some(19))
    );
    assert_eq!(
        report["expected"],
        report["published"].as_u64().unwrap() * 19
    );
}

#[test]
fn dense_clients_hear_everyone_including_themselves() {
    let (output, report) = simulate(
        "dense",
        &[
            "--scenario",
            "dense",
            "--clients",
            "12",
            "--duration",
            "1",
            "--servers",
            "2",
        ],
    );
    assert_clean(&output, &report, "dense");
    assert_eq!(
        report["expected"],
        report["published"].as_u64().unwrap() * 12
    );
    // Placement is random: both servers, or (rarely) only one, hold the 12.
    assert!(report["clients_per_server"].as_object().unwrap().len() <= 2);
}

#[test]
fn churn_delivers_every_message_and_leaks_nothing() {
    let (output, report) = simulate(
        "churn",
        &[
            "--scenario",
            "churn",
            "--clients",
            "6",
            "--churners",
            "4",
            "--churn-messages",
            "5",
            "--rate",
            "100",
            "--duration",
            "1.5",
            "--check",
        ],
    );
    assert_clean(&output, &report, "churn");
    let churn = &report["churn"];
    assert!(churn["sessions"].as_u64().unwrap() >= 4, "{report:#}");
    assert_eq!(
        [
            &churn["leaked_sessions"],
            &churn["leaked_topics"],
            &churn["leaked_remote_topics"]
        ],
        [0, 0, 0],
        "{report:#}"
    );
    // Every session is a publisher of its own, and its negotiation is timed.
    assert_eq!(report["publishers"], churn["sessions"], "{report:#}");
    assert!(churn["rss_end_bytes"].as_u64().unwrap() > 0, "{report:#}");
}

#[test]
fn ramp_steps_up_and_reports_the_sustainable_rate() {
    let (output, report) = simulate(
        "ramp",
        &[
            "--scenario",
            "ramp",
            "--clients",
            "4",
            "--rate",
            "100",
            "--ramp-factor",
            "2",
            "--ramp-steps",
            "2",
            "--duration",
            "0.5",
            "--max-p99-ms",
            "1000",
        ],
    );
    assert_clean(&output, &report, "ramp");
    let steps = report["ramp"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{report:#}");
    assert!(steps.iter().all(|s| s["passed"] == true), "{report:#}");
    // The second step offered twice the first's rate to 3 subscribers.
    assert_eq!(steps[1]["offered_per_s"].as_f64(), Some(600.0));
    assert_eq!(
        report["ramp"]["sustainable_per_s"], steps[1]["delivered_per_s"],
        "{report:#}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("sustainable"), "{stdout}");
}

#[test]
fn a_slow_subscriber_shows_up_as_drops_not_as_silence() {
    // One of three subscribers reads 50 messages/s of 8 KB while 2000/s arrive: its server's
    // queue overflows within the run and the server drops for it.
    let (output, report) = simulate(
        "slow",
        &[
            "--scenario",
            "fanout",
            "--clients",
            "4",
            "--rate",
            "2000",
            "--payload",
            "8000",
            "--slow-subscribers",
            "1",
            "--duration",
            "3",
            "--drain",
            "1",
            "--servers",
            "1",
            "--check",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "--check fails the run: {}",
        text(&output)
    );
    assert!(report["lost"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["server_dropped"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["duplicates"], 0, "{report:#}");
    // Every lost message has its cause: dropped and told, or still queued when the drain ended.
    let by = &report["lost_by_cause"];
    assert!(by["slow_consumer"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(by["unexplained"], 0, "{report:#}");
    let causes = [
        "slow_consumer",
        "peer_gap",
        "server_failure",
        "late",
        "unexplained",
    ];
    assert_eq!(
        causes.iter().map(|c| by[c].as_u64().unwrap()).sum::<u64>(),
        report["lost"].as_u64().unwrap(),
        "{report:#}"
    );
    let warnings = report["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("dropped for slow consumers")),
        "{report:#}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("WARNING") && stdout.contains("delivery incomplete"),
        "{stdout}"
    );
}

/// A `--cluster-only` process, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Served {
    /// Starts `simulation --cluster-only` and reads the coordinator URL it prints.
    fn start(servers: &str) -> (Self, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_simulation"))
            .args(["--cluster-only", "--servers", servers])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .env_remove("RUST_LOG")
            .spawn()
            .unwrap();
        let mut url = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut url)
            .unwrap();
        let url = url.trim().to_owned();
        assert!(url.starts_with("ws://127.0.0.1:"), "{url:?}");
        (Self(child), url)
    }
}

#[test]
fn two_generator_processes_share_one_cluster_and_one_report() {
    let (served, url) = Served::start("2");

    let common = [
        "--coordinator",
        &url,
        "--run-id",
        "shardtest",
        "--clients",
        "30",
        "--room-size",
        "6",
        "--rate",
        "20",
        "--duration",
        "1",
    ];
    let follower = Command::new(env!("CARGO_BIN_EXE_simulation"))
        .args(common)
        .args(["--shard", "1/2"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut args = common.to_vec();
    args.extend(["--shard", "0/2"]);
    let (output, report) = simulate("shard", &args);
    let follower = follower.wait_with_output().unwrap();
    drop(served);
    assert!(follower.status.success(), "{}", text(&follower));
    assert!(
        follower.stdout.is_empty(),
        "only shard 0 reports: {}",
        text(&follower)
    );
    assert_clean(&output, &report, "rooms");
    assert_eq!(report["shards"], 2, "{report:#}");
    assert_eq!(report["clients"], 30, "{report:#}");
    assert_eq!(clients_on_servers(&report), 30);
    assert_eq!(
        report["expected"],
        report["published"].as_u64().unwrap() * 6
    );
}

#[test]
fn shards_with_different_workloads_refuse_to_run() {
    let (served, url) = Served::start("1");
    let shard = |index: &str, clients: &str| {
        Command::new(env!("CARGO_BIN_EXE_simulation"))
            .args([
                "--coordinator",
                &url,
                "--run-id",
                "mismatch",
                "--duration",
                "1",
            ])
            .args([
                "--shard-timeout",
                "20",
                "--shard",
                index,
                "--clients",
                clients,
            ])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (shard("0/2", "20"), shard("1/2", "30"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    drop(served);
    for output in [a, b] {
        assert!(!output.status.success(), "{}", text(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("runs a different workload"), "{stderr}");
    }
}

#[test]
fn plot_draws_both_charts() {
    let svg = temp("plot.svg");
    let (output, report) = simulate(
        "plot",
        &[
            "--scenario",
            "dense",
            "--clients",
            "4",
            "--duration",
            "1",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    assert_clean(&output, &report, "dense");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(
        drawn.starts_with("<svg"),
        "{}",
        &drawn[..drawn.len().min(200)]
    );
    for title in ["latency over time", "latency distribution", "p99"] {
        assert!(drawn.contains(title), "{title} missing from the plot");
    }
    assert!(drawn.contains("<polyline"), "no lines drawn");
}

#[test]
fn bad_flags_get_one_clear_line() {
    for (args, message) in [
        (&["--shard", "0/2"][..], "--shard needs --coordinator"),
        (&["--shard", "2/2"][..], "need 0 <= i < n"),
        (
            &[
                "--scenario",
                "fanout",
                "--clients",
                "3",
                "--publishers",
                "3",
            ][..],
            "--publishers must be",
        ),
        (&["--rate", "0"][..], "--rate must be positive"),
        (
            &[
                "--coordinator",
                "ws://127.0.0.1:1",
                "--scenario",
                "churn",
                "--shard",
                "0/2",
                "--run-id",
                "x",
            ][..],
            "run churn in one process",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_simulation"))
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}: {}", text(&output));
    }
}

#[test]
fn direct_messages_reach_online_nodes_and_wait_in_the_inboxes_of_offline_ones() {
    let (output, report) = simulate(
        "direct",
        &[
            "--scenario",
            "direct",
            "--clients",
            "30",
            "--offline-nodes",
            "6",
            "--rate",
            "20",
            "--duration",
            "2",
            "--check",
        ],
    );
    assert_clean(&output, &report, "direct");
    let direct = &report["direct"];
    assert_eq!(
        (direct["nodes"].as_u64(), direct["offline_nodes"].as_u64()),
        (Some(30), Some(6))
    );
    // 24 senders to 29 others each: the offline six get about a fifth of the first half, all
    // of it through their inboxes, and every message stored is delivered.
    let accepted = direct["accepted"].as_u64().unwrap();
    assert!(accepted > 0, "{report:#}");
    assert_eq!(
        direct["inbox_delivered"].as_u64(),
        Some(accepted),
        "{report:#}"
    );
    assert_eq!(direct["undeliverable"], 0, "{report:#}");
    assert!(direct["inbox_delivery_ms"]["p99"].as_f64().unwrap() > 0.0);
    // Each late node came online once at a watcher on each of the 3 servers.
    assert_eq!(direct["presence_seen"], 18, "{report:#}");
    assert_eq!(report["published"], report["expected"]);
}

/// Runs the failover scenario: 3 servers, one killed a third of the way in and another started
/// in its place; `--check` passes only when nothing is lost without a cause and nothing comes
/// twice or out of order.
fn failover(history: &str) -> Value {
    let (output, report) = simulate(
        &format!("failover-{history}"),
        &[
            "--scenario",
            "failover",
            "--clients",
            "60",
            "--duration",
            "4",
            "--restart-after",
            "1",
            "--history",
            history,
            "--check",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let killed = &report["server_killed"];
    assert!(killed["error"].is_null(), "{report:#}");
    assert!(killed["restarted"].is_string(), "{report:#}");
    assert!(report["disconnects"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["lost_by_cause"]["unexplained"], 0, "{report:#}");
    assert_eq!(
        [&report["duplicates"], &report["out_of_order"]],
        [0, 0],
        "{report:#}"
    );
    report
}

#[test]
fn failover_recovers_what_the_killed_servers_clients_missed_with_history_on() {
    let on = failover("on");
    assert!(on["recovered"].as_u64().unwrap() > 0, "{on:#}");
    let off = failover("off");
    assert_eq!(off["recovered"], 0, "{off:#}");
}
