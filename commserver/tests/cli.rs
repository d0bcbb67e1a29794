//! The `commserver` binary: bad configuration is one clear line and a non-zero exit; the
//! config file is honoured; SIGTERM is a clean shutdown even while the coordinator is away.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

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

#[test]
fn config_file_is_used_and_sigterm_shuts_down_cleanly() {
    let dir = std::env::temp_dir().join(format!("relaymesh-commserver-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("commserver.toml");
    // Nothing listens on port 1: the server keeps retrying the coordinator meanwhile.
    std::fs::write(
        &config,
        "coordinator = \"ws://127.0.0.1:1\"\nlisten = \"127.0.0.1:0\"\nid = \"from-file\"\ncluster_secret = \"s\"\nmax_clients = 7\n",
    )
    .unwrap();
    let mut child = commserver()
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let listening = lines
        .by_ref()
        .find(|l| l.contains("listening on"))
        .expect("no `listening on` line");
    assert!(listening.contains("id=from-file"), "{listening}");
    assert!(
        lines
            .by_ref()
            .any(|l| l.contains("cannot reach the coordinator"))
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
