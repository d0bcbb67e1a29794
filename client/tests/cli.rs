//! `meshctl` failures are one clear line and a non-zero exit.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn meshctl_fails_with(args: &[&str], expected: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(
        stderr.starts_with("meshctl: error: ") && stderr.contains(expected),
        "{stderr:?}"
    );
}

#[test]
fn unreachable_coordinator_and_bad_topics_are_one_line() {
    meshctl_fails_with(
        &["pub", "--coordinator", "ws://127.0.0.1:1", "room", "hi"],
        "cannot connect through the coordinator at ws://127.0.0.1:1: cannot connect to ws://127.0.0.1:1/v1/connect",
    );
    meshctl_fails_with(
        &["sub", "--coordinator", "ws://127.0.0.1:1", "room"],
        "cannot connect",
    );
    meshctl_fails_with(
        &["servers", "--coordinator", "ws://127.0.0.1:1"],
        "cannot connect to 127.0.0.1:1",
    );
    meshctl_fails_with(&["servers", "--coordinator", "not a url"], "invalid URL");
}
