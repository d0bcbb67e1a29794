//! The harness's smoke mode against relaymesh, as `.ci/run` runs it: real coordinator and comm
//! server processes, every scenario, one short step each. Checks the run passes and writes the
//! JSON and Markdown a user reads.

use std::path::Path;
use std::process::Command;

/// Runs `bench --systems relaymesh --smoke` with `args` against this build's binaries, writing
/// to `out`; asserts it succeeded and returns its `results.json`.
fn smoke_run(args: &[&str], out: &Path) -> serde_json::Value {
    let bin_dir = relaymesh_tests::process::binary("coordinator")
        .parent()
        .expect("binaries live in a directory")
        .to_owned();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--systems", "relaymesh", "--smoke", "--server-cpu", ""])
        .args(args)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--configs")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
        .arg("--out")
        .arg(out)
        .output()
        .expect("bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stderr}");
    serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
        .expect("valid JSON")
}

#[test]
fn smoke_run_measures_every_relaymesh_scenario() {
    let out = std::env::temp_dir().join(format!("relaymesh-bench-smoke-{}", std::process::id()));
    let json = smoke_run(&[], &out);
    let outcomes = json["outcomes"].as_array().expect("outcomes");
    let scenario = |name: &str| {
        outcomes
            .iter()
            .find(|o| o["scenario"] == name)
            .unwrap_or_else(|| panic!("no {name} outcome in {json}"))
    };
    for name in [
        "fanout10",
        "fanout1000",
        "dense",
        "two-server",
        "p2p",
        "backend",
    ] {
        let o = scenario(name);
        assert_eq!(o["status"], "ok", "{name}: {o}");
        let step = &o["steps"][0];
        // Latency limits are the benchmark's business (this may be a debug build on a busy
        // machine); every message arriving once and in order is the harness's.
        assert!(
            step["delivered"].as_u64().unwrap_or(0) > 0,
            "{name}: {step}"
        );
        assert_eq!(
            step["delivered"], step["expected"],
            "{name}: nothing lost: {step}"
        );
        // Backend publishes are concurrent unary calls, which may overtake each other.
        if name != "backend" {
            assert_eq!(step["out_of_order"], 0, "{name}: {step}");
        }
        assert_eq!(step["refused"], 0, "{name}: {step}");
        assert!(
            step["server_cpu_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{name}: server CPU read from /proc: {step}"
        );
        assert!(
            step["server_rss_mib"].as_f64().unwrap_or(0.0) > 1.0,
            "{name}: {step}"
        );
    }
    let idle = &scenario("idle")["idle"][0];
    assert_eq!(idle["clients"], 300);
    assert_eq!(idle["blocked"], "");
    assert!(
        idle["kib_per_client"].as_f64().unwrap_or(0.0) > 0.0,
        "{idle}"
    );
    let logins = &scenario("logins")["logins"][0];
    assert_eq!(logins["failed"], 0, "{logins}");
    assert_eq!(logins["succeeded"], logins["attempted"], "{logins}");
    assert!(logins["succeeded"].as_u64().unwrap_or(0) > 0, "{logins}");
    // The coordinator alone, its comm servers played by the generator: every relayed login
    // answered, with the identity (the played servers relay it and take it).
    let alone = &scenario("coordinator-logins");
    assert_eq!(alone["status"], "ok", "{alone}");
    let step = &alone["logins"][0];
    assert_eq!(step["failed"], 0, "{step}");
    assert_eq!(step["succeeded"], step["attempted"], "{step}");
    assert!(step["succeeded"].as_u64().unwrap_or(0) > 0, "{step}");
    assert_eq!(step["answered_with_identity"], step["succeeded"], "{step}");
    assert!(
        alone["logins_via"]
            .as_str()
            .unwrap_or_default()
            .contains("RelayedLogin"),
        "{alone}"
    );

    // The storm: every client of the killed server back, spread over the other two, and its
    // curves drawn.
    let storm = &scenario("storm")["storm"];
    assert_eq!(storm["clients"], 300, "{storm}");
    assert_eq!(storm["gave_up"], 0, "{storm}");
    assert!(storm["storm_s"].as_f64().unwrap_or(0.0) > 0.0, "{storm}");
    let held: Vec<u64> = storm["held"]
        .as_array()
        .expect("held")
        .iter()
        .map(|n| n.as_u64().unwrap_or(0))
        .collect();
    // The storm's 300, and the probes (a publisher and five subscribers on B, five on C).
    assert_eq!(held.iter().sum::<u64>(), 300 + 11, "{storm}");
    let curve = storm["storm_curve"].as_array().expect("storm_curve");
    assert_eq!(curve.last().expect("a point")[1], 300, "{storm}");
    let svg = std::fs::read_to_string(out.join("storm.svg")).expect("storm.svg");
    assert!(svg.contains("<svg"), "{svg}");

    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for heading in [
        "## Targets",
        "## Summary",
        "### fanout10 — relaymesh",
        "### idle clients — relaymesh",
        "### logins — relaymesh",
        "### coordinator-logins — relaymesh",
        "## Reconnect storm — relaymesh",
    ] {
        assert!(md.contains(heading), "results.md lacks {heading}:\n{md}");
    }
    // The servers it started (their configs live under `out`) are gone.
    let out_str = out.to_string_lossy().into_owned();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&out_str))
        .collect();
    assert!(survivors.is_empty(), "still running: {survivors:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_missing_peer_is_named_with_the_package_to_install() {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--systems", "relaymesh,nats", "--smoke"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("bench runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nats-server not installed") && stderr.contains("apt-get install"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

/// `--tls off,on` in smoke mode: each scenario plain and then over TLS with certificates the
/// bench makes (NATS too where nats-server is installed); every TLS run delivers everything,
/// the outcomes say which were on TLS, and the certificates' directory is gone afterwards.
#[test]
fn smoke_run_over_tls_measures_plain_and_tls_side_by_side() {
    let bin_dir = relaymesh_tests::process::binary("coordinator")
        .parent()
        .expect("binaries live in a directory")
        .to_owned();
    let nats = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("nats-server").is_file())
    });
    let systems = if nats { "relaymesh,nats" } else { "relaymesh" };
    let out =
        std::env::temp_dir().join(format!("relaymesh-bench-smoke-tls-{}", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--systems", systems, "--smoke", "--server-cpu", ""])
        .args([
            "--scenarios",
            "fanout10,two-server,backend,idle,logins",
            "--tls",
            "off,on",
        ])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--configs")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bench starts");
    let pid = child.id();
    let output = child.wait_with_output().expect("bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("valid JSON");
    assert_eq!(json["tls"], serde_json::json!(["off", "on"]));
    let outcomes = json["outcomes"].as_array().expect("outcomes");
    let tls_ok: Vec<&serde_json::Value> = outcomes
        .iter()
        .filter(|o| o["tls"] == true && o["status"] == "ok")
        .collect();
    let expected = if nats { 5 + 2 } else { 5 };
    assert_eq!(tls_ok.len(), expected, "TLS outcomes: {json}");
    for o in &tls_ok {
        if let Some(step) = o["steps"].get(0) {
            assert!(step["delivered"].as_u64().unwrap_or(0) > 0, "{o}");
            assert_eq!(step["delivered"], step["expected"], "{o}");
        }
    }
    let logins = tls_ok
        .iter()
        .find(|o| o["scenario"] == "logins")
        .expect("logins over TLS");
    assert_eq!(logins["logins"][0]["failed"], 0, "{logins}");
    let idle = tls_ok
        .iter()
        .find(|o| o["scenario"] == "idle")
        .expect("idle over TLS");
    assert_eq!(idle["idle"][0]["blocked"], "", "{idle}");

    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(md.contains("### fanout10 — relaymesh (TLS)"), "{md}");
    assert!(
        md.contains("fanout10: relaymesh over TLS keeps ≥ 75 %"),
        "{md}"
    );
    // The directory of the certificates the servers were given is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("relaymesh-bench-tls-{pid}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `--history off,on` and the history scenarios in smoke mode: each message scenario runs
/// without and with topic history on the comm servers (which then hold what was published), a
/// subscriber that lost its server recovers every message it missed once and in order, and a
/// flood leaves the history within its configured bounds.
#[test]
fn smoke_run_with_history_measures_its_cost_recovery_and_memory() {
    let out = std::env::temp_dir().join(format!(
        "relaymesh-bench-smoke-history-{}",
        std::process::id()
    ));
    let json = smoke_run(
        &[
            "--scenarios",
            "fanout10,recovery,history-memory",
            "--history",
            "off,on",
        ],
        &out,
    );
    assert_eq!(json["history"], serde_json::json!(["off", "on"]));
    let outcomes = json["outcomes"].as_array().expect("outcomes");
    let find = |scenario: &str, history: bool| {
        outcomes
            .iter()
            .find(|o| o["scenario"] == scenario && o["history"] == history)
            .unwrap_or_else(|| panic!("no {scenario} outcome (history {history}) in {json}"))
    };
    for history in [false, true] {
        let o = find("fanout10", history);
        assert_eq!(o["status"], "ok", "{o}");
        let step = &o["steps"][0];
        assert_eq!(step["delivered"], step["expected"], "{o}");
        let stored = o["history_held"]["stored"].as_u64().unwrap_or(0);
        assert_eq!(stored > 0, history, "history held: {o}");
    }
    let recovery = find("recovery", false);
    assert_eq!(recovery["status"], "ok", "{recovery}");
    let trial = &recovery["recovery"]["trials"][0];
    assert_eq!(trial["recovered_count"], trial["missed"], "{trial}");
    for key in ["missing", "duplicates", "out_of_order"] {
        assert_eq!(trial[key], 0, "{key}: {trial}");
    }
    assert!(trial["gap"].is_null(), "{trial}");
    assert_eq!(trial["live_followed"], true, "{trial}");
    for read in recovery["recovery"]["reads"].as_array().expect("reads") {
        assert_eq!(read["messages"], read["asked"], "{read}");
        assert_eq!(read["in_order"], true, "{read}");
    }
    let memory = find("history-memory", false);
    assert_eq!(memory["status"], "ok", "{memory}");
    assert_eq!(memory["memory"][0]["bounds_held"], true, "{memory}");
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for heading in ["## Recovery", "### Backlog reads", "## History memory"] {
        assert!(md.contains(heading), "results.md lacks {heading}:\n{md}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
