//! Command-line failures: bad configuration or an unreachable cluster is one clear line on
//! stderr and a non-zero exit, for every binary.

use relaymesh_tests::process::run_with_env;

/// Runs `binary` and checks it fails with one stderr line starting with `prefix` and
/// containing `expected`.
fn fails_with(binary: &str, args: &[&str], env: &[(&str, &str)], prefix: &str, expected: &str) {
    let (ok, _, stderr) = run_with_env(binary, args, env);
    assert!(!ok, "{binary} {args:?} succeeded");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(
        stderr.starts_with(prefix) && stderr.contains(expected),
        "{stderr:?}"
    );
}

#[test]
fn bad_configuration_is_one_clear_line() {
    let secret = [("RELAYMESH_CLUSTER_SECRET", "s")];
    let coordinator = |args: &[&str], env: &[(&str, &str)], expected: &str| {
        fails_with("coordinator", args, env, "coordinator: ", expected);
    };
    let commserver = |args: &[&str], env: &[(&str, &str)], expected: &str| {
        fails_with("commserver", args, env, "commserver: ", expected);
    };
    coordinator(
        &["--listen", "127.0.0.1:0"],
        &[],
        "`cluster_secret` must be set",
    );
    let dir = std::env::temp_dir().join(format!("relaymesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let typo = file(
        "typo.toml",
        "cluster_secret = \"s\"\nheartbeat_intervall_ms = 5\n",
    );
    coordinator(
        &["--config", &typo],
        &[],
        "unknown field `heartbeat_intervall_ms`",
    );
    let inconsistent = file(
        "inconsistent.toml",
        "cluster_secret = \"s\"\nheartbeat_interval_ms = 5000\nheartbeat_timeout_ms = 100\n",
    );
    coordinator(
        &["--config", &inconsistent],
        &[],
        "`heartbeat_timeout_ms` must be greater",
    );
    let missing = dir.join("missing.toml");
    coordinator(
        &["--config", missing.to_str().unwrap()],
        &[],
        "cannot read config file",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    coordinator(&["--listen", &addr], &secret, "cannot listen on");
    commserver(
        &["--coordinator", "ws://127.0.0.1:7400", "--listen", &addr],
        &secret,
        "cannot listen on",
    );

    commserver(
        &["--listen", "127.0.0.1:0"],
        &secret,
        "`coordinator` must be a ws:// URL",
    );
    commserver(
        &[
            "--coordinator",
            "ws://127.0.0.1:7400",
            "--listen",
            "127.0.0.1:0",
            "--dispatch-listen",
            "127.0.0.1:0",
        ],
        &secret,
        "`dispatch_secret` must be set",
    );
    commserver(
        &[
            "--coordinator",
            "ws://127.0.0.1:7400",
            "--listen",
            "127.0.0.1:0",
            "--dispatch-listen",
            &addr,
        ],
        &[
            ("RELAYMESH_CLUSTER_SECRET", "s"),
            ("RELAYMESH_DISPATCH_SECRET", "d"),
        ],
        "(`dispatch_listen`)",
    );
    commserver(
        &["--coordinator", "ws://127.0.0.1:7400"],
        &[],
        "`cluster_secret` must be set",
    );
    commserver(
        &["--coordinator", "ws://127.0.0.1:7400", "--id", "has spaces"],
        &secret,
        "`id` must be",
    );
    commserver(
        &[
            "--coordinator",
            "ws://127.0.0.1:7400",
            "--listen",
            "0.0.0.0:0",
        ],
        &secret,
        "`public_url` must be set when listening on 0.0.0.0",
    );
    let tiny = file(
        "tiny.toml",
        "coordinator = \"ws://127.0.0.1:7400\"\nmax_frame_bytes = 2048\n",
    );
    commserver(
        &["--config", &tiny],
        &secret,
        "`max_frame_bytes` must leave",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn meshctl_failures_are_one_line() {
    let meshctl = |args: &[&str], expected: &str| {
        fails_with("meshctl", args, &[], "meshctl: error: ", expected)
    };
    meshctl(
        &["pub", "--coordinator", "ws://127.0.0.1:1", "room", "hi"],
        "cannot connect through the coordinator at ws://127.0.0.1:1: cannot connect to ws://127.0.0.1:1/v1/connect",
    );
    meshctl(
        &["sub", "--coordinator", "ws://127.0.0.1:1", "room"],
        "cannot connect",
    );
    meshctl(
        &["servers", "--coordinator", "ws://127.0.0.1:1"],
        "cannot connect to 127.0.0.1:1",
    );
    meshctl(
        &["login", "--coordinator", "ws://127.0.0.1:1"],
        "cannot connect to 127.0.0.1:1",
    );
    meshctl(&["servers", "--coordinator", "not a url"], "invalid URL");
}
