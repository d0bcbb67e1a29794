//! The README's shell examples, run as a user runs them: the block as it stands in the README,
//! with bash, from a directory laid out like the repository (`target/release` holding the
//! binaries under test). The one change is the fixed ports, so a run cannot collide with a
//! coordinator someone left on 7400. (The README's Rust examples are compiled as doc
//! tests of `relaymesh-client`.)

use relaymesh_tests::process::{binaries_dir, run_script};
use relaymesh_tests::{PATIENCE, restartable_addr};
use std::path::{Path, PathBuf};

/// The one ```sh block of the README that contains `marker`.
fn sh_block(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    let mut found = blocks.into_iter().filter(|b| b.contains(marker));
    let block = found
        .next()
        .unwrap_or_else(|| panic!("no sh block with {marker:?}"));
    assert!(found.next().is_none(), "two sh blocks with {marker:?}");
    block
}

/// A directory laid out like a checkout after `cargo build --release`.
struct Checkout(PathBuf);

impl Checkout {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("relaymesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("target")).unwrap();
        std::os::unix::fs::symlink(binaries_dir(), dir.join("target/release")).unwrap();
        Self(dir)
    }

    /// Runs `block` there, with free ports instead of the README's fixed ones (7400 for the
    /// coordinator, 8090 for the dispatch gateway).
    fn run(&self, block: &str) -> (bool, String, String) {
        let mut script = block.to_owned();
        for fixed in ["127.0.0.1:7400", "127.0.0.1:8090"] {
            script = script.replace(fixed, &restartable_addr().to_string());
        }
        run_script(&script, &self.0, PATIENCE * 3)
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log lines at WARN or ERROR, but for `expected` ones.
fn alarms<'a>(stderr: &'a str, expected: &[&str]) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !expected.iter().any(|e| l.contains(e)))
        .collect()
}

fn require_curl() {
    let found = std::process::Command::new("curl")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "curl is needed to run the README's examples (apt-get install curl)"
    );
}

#[test]
fn the_by_hand_cluster_runs_as_written() {
    require_curl();
    let block = sh_block("for i in 1 2 3; do");
    let checkout = Checkout::new("readme-by-hand");
    let (ok, out, err) = checkout.run(&block);
    let report = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(ok, "{report}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" serving")).count(),
        3,
        "{report}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("rooms/lobby\t") && l.ends_with("\thello")),
        "{report}"
    );
    assert!(out.contains("\"server_id\""), "no login answer: {report}");
    assert!(out.contains("\"servers\":["), "no stats: {report}");
    // Open accounts are the development default, and the README says so; nothing else may
    // alarm a user, from start-up (servers wait for the coordinator) to the final kill.
    let alarms = alarms(&err, &["ACCOUNTS ARE OPEN"]);
    assert!(
        alarms.is_empty(),
        "unexpected warnings: {alarms:#?}\n{report}"
    );
}

#[test]
fn the_dispatch_gateway_runs_without_a_coordinator_as_written() {
    require_curl();
    let block = sh_block("--dispatch-listen 127.0.0.1:8090");
    let checkout = Checkout::new("readme-dispatch");
    let (ok, out, err) = checkout.run(&block);
    let report = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(ok, "{report}");
    assert!(out.contains("\"tcp_listeners\""), "{report}");
    let alarms = alarms(&err, &[]);
    assert!(
        alarms.is_empty(),
        "unexpected warnings: {alarms:#?}\n{report}"
    );
}

#[test]
fn the_accounts_example_runs_as_written_and_again() {
    let block = sh_block("acme-example");
    let checkout = Checkout::new("readme-accounts");
    for run in 1..=2 {
        let (ok, out, err) = checkout.run(&block);
        let report = format!("run {run}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(ok, "{report}");
        assert!(
            out.contains("codes: fleet") && out.contains("keys: gcs-1"),
            "{report}"
        );
        // The ground station got the agent's telemetry; the agent's command was refused.
        assert!(
            out.lines()
                .any(|l| l.starts_with("telemetry/pos\t") && l.ends_with("\t48.85,2.35")),
            "{report}"
        );
        assert!(err.contains("may not publish"), "{report}");
        let alarms = alarms(&err, &[]);
        assert!(
            alarms.is_empty(),
            "unexpected warnings: {alarms:#?}\n{report}"
        );
        // Everything it wrote is in its own directory.
        let mut written: Vec<String> = std::fs::read_dir(&checkout.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        written.sort();
        assert_eq!(written, ["target"], "{report}");
    }
}

#[test]
fn the_tls_example_runs_as_written() {
    require_curl();
    let found = std::process::Command::new("openssl")
        .arg("version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "openssl is needed to run the README's TLS example (apt-get install openssl)"
    );
    let block = sh_block("--mtls &");
    let checkout = Checkout::new("readme-tls");
    let (ok, out, err) = checkout.run(&block);
    let report = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(ok, "{report}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("wss://127.0.0.1:") && l.ends_with(" serving"))
            .count(),
        2,
        "{report}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("rooms/lobby\t") && l.ends_with("\thello over TLS")),
        "{report}"
    );
    assert!(
        out.contains("\"servers\":["),
        "no stats over https: {report}"
    );
    assert!(
        out.contains("speaks TLS only"),
        "no refusal of plain HTTP: {report}"
    );
    let alarms = alarms(
        &err,
        &[
            "ACCOUNTS ARE OPEN",
            "plain (non-TLS) connection on a TLS listener refused",
        ],
    );
    assert!(
        alarms.is_empty(),
        "unexpected warnings: {alarms:#?}\n{report}"
    );
}
