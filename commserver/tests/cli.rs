//! The `commserver` binary: bad configuration is one clear line and a non-zero exit.
//! (Signals and config files are exercised with real clusters in `tests/tests/mesh/processes.rs`.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn commserver() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_commserver"));
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
        stderr.starts_with("commserver: ") && stderr.contains(expected),
        "{stderr:?}"
    );
}

#[test]
fn bad_configuration_is_one_clear_line() {
    fails_with(
        commserver()
            .args(["--listen", "127.0.0.1:0"])
            .env("RELAYMESH_CLUSTER_SECRET", "s"),
        "`coordinator` must be a ws:// URL",
    );
    fails_with(
        commserver().args(["--coordinator", "ws://127.0.0.1:7400"]),
        "`cluster_secret` must be set",
    );
    fails_with(
        commserver()
            .args(["--coordinator", "ws://127.0.0.1:7400", "--id", "has spaces"])
            .env("RELAYMESH_CLUSTER_SECRET", "s"),
        "`id` must be",
    );
    fails_with(
        commserver()
            .args([
                "--coordinator",
                "ws://127.0.0.1:7400",
                "--listen",
                "0.0.0.0:0",
            ])
            .env("RELAYMESH_CLUSTER_SECRET", "s"),
        "`public_url` must be set when listening on 0.0.0.0",
    );
}
