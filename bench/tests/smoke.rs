//! The harness's smoke mode against relaymesh, as `.ci/run` runs it: real coordinator and comm
//! server processes, every scenario, one short step each. Checks the run passes and writes the
//! JSON and Markdown a user reads.

use std::process::Command;

#[test]
fn smoke_run_measures_every_relaymesh_scenario() {
    let bin_dir = relaymesh_tests::process::binary("coordinator")
        .parent()
        .expect("binaries live in a directory")
        .to_owned();
    let out = std::env::temp_dir().join(format!("relaymesh-bench-smoke-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--systems", "relaymesh", "--smoke", "--server-cpu", ""])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--configs")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("valid JSON");
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

    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for heading in [
        "## Targets",
        "## Summary",
        "### fanout10 — relaymesh",
        "### idle clients — relaymesh",
        "### logins — relaymesh",
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
