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
        "`coordinator` must be set: the coordinators' URLs",
    );
    commserver(
        &["--coordinator", "127.0.0.1:7400"],
        &secret,
        "is not a coordinator URL: it has no scheme; write ws://127.0.0.1:7400 (or http://127.0.0.1:7400)",
    );
    commserver(
        &["--coordinator", "ftp://127.0.0.1:7400"],
        &secret,
        "the scheme ftp:// is not one relaymesh speaks; use ws:// or http:// (wss:// or https:// for TLS)",
    );
    // TLS: a certificate without its key, a file that is not there, a public URL whose
    // scheme does not match.
    commserver(
        &[
            "--coordinator",
            "ws://127.0.0.1:7400",
            "--tls-cert",
            "/nonexistent/server.pem",
            "--tls-key",
            "/nonexistent/server.key",
            "--listen",
            "127.0.0.1:0",
        ],
        &secret,
        "tls: cannot read /nonexistent/server.pem",
    );
    coordinator(
        &["--listen", "127.0.0.1:0", "--mtls"],
        &secret,
        "`tls.mtls` needs tls.cert, tls.key and tls.ca",
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
        "meshctl: error: cannot connect to ws://127.0.0.1:1/v1/login: Connection refused",
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
    meshctl(
        &["servers", "--coordinator", "not a url"],
        "it has no scheme",
    );
}

/// Each failure is said once, in words: no cause repeated after itself, no parser jargon.
#[test]
fn meshctl_says_each_failure_once_in_words() {
    let failure = |args: &[&str]| {
        let (ok, _, stderr) = run_with_env("meshctl", args, &[]);
        assert!(!ok, "meshctl {args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
        stderr
    };
    let once = |stderr: &str, part: &str| {
        assert_eq!(
            stderr.matches(part).count(),
            1,
            "{part:?} not once in {stderr:?}"
        );
    };

    let refused = failure(&["pub", "--coordinator", "ws://127.0.0.1:1", "room", "hi"]);
    once(&refused, "Connection refused");
    once(&refused, "127.0.0.1:1");
    let refused = failure(&["servers", "--coordinator", "http://127.0.0.1:1"]);
    once(&refused, "Connection refused");

    let bad_topic = failure(&["pub", "rooms/my lobby", "hi"]);
    once(&bad_topic, "topic has the character ' ' at byte 8");
    let wildcard = failure(&["sub", "rooms/#"]);
    once(&wildcard, "wildcard character '#' at byte 6");
    assert!(wildcard.contains("topics are exact names"), "{wildcard}");

    for command in [
        &["pub", "room", "hi"][..],
        &["sub", "room"],
        &["servers"],
        &["login"],
    ] {
        let mut args = command.to_vec();
        args.extend(["--coordinator", "127.0.0.1:7400"]);
        let no_scheme = failure(&args);
        assert!(
            no_scheme
                .contains("it has no scheme; write ws://127.0.0.1:7400 (or http://127.0.0.1:7400)"),
            "{no_scheme}"
        );
        assert!(!no_scheme.contains("format error"), "{no_scheme}");
        args.pop();
        args.push("gopher://127.0.0.1:7400");
        let scheme = failure(&args);
        assert!(
            scheme.contains("gopher:// is not one relaymesh speaks"),
            "{scheme}"
        );
    }
}

/// `ws://` and `http://` name the same coordinator for every command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_takes_either_scheme_for_every_command() {
    let cluster = relaymesh_tests::Cluster::start(1).await;
    let addr = cluster.coordinator.addr;
    for scheme in ["ws", "http"] {
        let url = format!("{scheme}://{addr}/");
        for command in [
            &["servers"][..],
            &["login"],
            &["pub", "rooms/lobby", "hi"],
            &["wait", "--servers", "1"],
        ] {
            let mut args = vec!["--coordinator".to_owned(), url.clone()];
            args.extend(command.iter().map(|a| (*a).to_owned()));
            let (ok, out, err) = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run_with_env("meshctl", &args, &[])
            })
            .await
            .unwrap();
            assert!(ok, "meshctl {command:?} with {url}: {out} {err}");
        }
    }
}
