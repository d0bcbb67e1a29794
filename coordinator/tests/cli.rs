//! The `coordinator` binary: bad configuration is one clear line and a non-zero exit.
//! (Signals and config files are exercised with real clusters in `tests/tests/mesh/processes.rs`.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn coordinator() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    command
        .env_remove("RELAYMESH_CLUSTER_SECRET")
        .env("RUST_LOG", "info");
    command
}

fn fails_with(command: &mut Command, expected: &str) {
    let output = command.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(
        stderr.starts_with("coordinator: ") && stderr.contains(expected),
        "{stderr:?}"
    );
}

#[test]
fn bad_configuration_is_one_clear_line() {
    fails_with(
        coordinator().args(["--listen", "127.0.0.1:0"]),
        "`cluster_secret` must be set",
    );
    let dir =
        std::env::temp_dir().join(format!("relaymesh-coordinator-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(
        &typo,
        "cluster_secret = \"s\"\nheartbeat_intervall_ms = 5\n",
    )
    .unwrap();
    fails_with(
        coordinator().arg("--config").arg(&typo),
        "unknown field `heartbeat_intervall_ms`",
    );
    let inconsistent = dir.join("inconsistent.toml");
    std::fs::write(
        &inconsistent,
        "cluster_secret = \"s\"\nheartbeat_interval_ms = 5000\nheartbeat_timeout_ms = 100\n",
    )
    .unwrap();
    fails_with(
        coordinator().arg("--config").arg(&inconsistent),
        "`heartbeat_timeout_ms` must be greater",
    );
    fails_with(
        coordinator().arg("--config").arg(dir.join("missing.toml")),
        "cannot read config file",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(
        coordinator()
            .args(["--listen", &addr])
            .env("RELAYMESH_CLUSTER_SECRET", "s"),
        "cannot listen on",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
