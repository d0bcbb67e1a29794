//! The whole system as a user runs it: real `coordinator`, `commserver` and `meshctl`
//! processes, configured by flags and files, killed with SIGKILL and stopped with SIGTERM and
//! SIGINT.

use std::net::SocketAddr;

use relaymesh_client::{Client, Event};
use relaymesh_tests::process::{Proc, run, run_with_env};
use relaymesh_tests::{
    client_config, eventually, get_json, next_message, restartable_addr, within,
};

pub(super) struct Server {
    pub(super) proc: Proc,
    pub(super) id: String,
    pub(super) addr: SocketAddr,
}

impl Server {
    pub(super) fn stats_url(&self) -> String {
        format!("http://{}/v1/stats", self.addr)
    }
}

/// Starts `n` comm servers registering with the coordinator at `url`, each on a free port, and
/// waits until each has registered.
pub(super) fn commservers(url: &str, n: usize) -> Vec<Server> {
    (0..n)
        .map(|_| {
            let mut proc = Proc::start(
                "commserver",
                &["--coordinator", url, "--listen", "127.0.0.1:0"],
            );
            let addr = proc.listening_addr();
            proc.wait_for_line("registered with the coordinator");
            Server {
                proc,
                id: addr.to_string(),
                addr,
            }
        })
        .collect()
}

/// Starts `binary` with `--config config` and `args`.
fn configured(binary: &str, config: &std::path::Path, args: &[&str]) -> Proc {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    Proc::start(binary, &all)
}

async fn coordinator_servers(stats_url: &str) -> Vec<serde_json::Value> {
    get_json(stats_url).await["servers"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_real_processes_survives_kills_and_stops_cleanly() {
    let addr = restartable_addr();
    let url = format!("ws://{addr}");
    let stats_url = format!("http://{addr}/v1/stats");

    // One comm server configured by a file (its `listen` overridden by the flag), started
    // before the coordinator exists: it keeps retrying until the coordinator comes up.
    let dir = std::env::temp_dir().join(format!("relaymesh-processes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("commserver.toml");
    let toml = format!(
        "coordinator = \"{url}\"\nlisten = \"127.0.0.1:1\"\nid = \"from-file\"\nmax_clients = 7\n"
    );
    std::fs::write(&config, toml).unwrap();
    let mut from_file = configured("commserver", &config, &["--listen", "127.0.0.1:0"]);
    let from_file_addr = from_file.listening_addr();
    from_file.wait_for_line("cannot reach the coordinator");

    let mut coordinator = Proc::start("coordinator", &["--listen", &addr.to_string()]);
    assert_eq!(coordinator.listening_addr(), addr);
    from_file.wait_for_line("registered with the coordinator");
    let mut servers = vec![Server {
        proc: from_file,
        id: "from-file".into(),
        addr: from_file_addr,
    }];
    for _ in 0..2 {
        let mut proc = Proc::start(
            "commserver",
            &["--coordinator", &url, "--listen", "127.0.0.1:0"],
        );
        let addr = proc.listening_addr();
        proc.wait_for_line("registered with the coordinator");
        servers.push(Server {
            proc,
            id: addr.to_string(),
            addr,
        });
    }
    eventually("three servers registered", || async {
        (coordinator_servers(&stats_url).await.len() == 3).then_some(())
    })
    .await;
    let listed = coordinator_servers(&stats_url).await;
    let from_file_entry = listed
        .iter()
        .find(|s| s["id"] == "from-file")
        .expect("server from the config file");
    assert_eq!(from_file_entry["capacity"], 7);
    for server in &servers {
        eventually("full mesh", || async {
            (get_json(&server.stats_url()).await["peers"] == 2).then_some(())
        })
        .await;
    }

    // meshctl: list servers, subscribe in one process, publish from another.
    let (ok, out, err) = run("meshctl", &["servers", "--coordinator", &url]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    for server in &servers {
        assert!(
            out.contains(server.id.as_str()),
            "{} missing from\n{out}",
            server.id
        );
    }
    let mut sub = Proc::start(
        "meshctl",
        &["sub", "--coordinator", &url, "room/1", "room/2"],
    );
    sub.wait_for_line("subscribed to room/1 room/2");
    let (ok, _, err) = run(
        "meshctl",
        &["pub", "--coordinator", &url, "room/2", "hello from meshctl"],
    );
    assert!(ok, "{err}");
    let line = sub.next_stdout_line();
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        (fields.len(), fields[0], fields[2]),
        (3, "room/2", "hello from meshctl"),
        "{line}"
    );
    let (ok, _, err) = run("meshctl", &["pub", "--coordinator", &url, "bad topic", "x"]);
    assert!(
        !ok && err.lines().count() == 1 && err.contains("invalid topic \"bad topic\""),
        "{err}"
    );
    let (ok, out, err) = run("meshctl", &["login", "--coordinator", &url]);
    assert!(ok, "{err}");
    let login: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        login["key"].as_str().is_some_and(|k| k.len() == 32),
        "{out}"
    );

    // Library clients on two different servers.
    let mut config = client_config(&url);
    config.preferred_server = Some(servers[1].id.clone());
    let mut a = Client::connect(config).await.unwrap();
    a.subscribe(["fleet/1"]).await.unwrap();
    let mut config = client_config(&url);
    config.preferred_server = Some(servers[2].id.clone());
    let b = Client::connect(config).await.unwrap();

    // SIGKILL the coordinator: relaying goes on; a new coordinator on the same address gets
    // every server back under the same id.
    coordinator.kill();
    b.publish("fleet/1", "no coordinator").await.unwrap();
    assert_eq!(next_message(&mut a).await.payload, "no coordinator");
    let mut coordinator = Proc::start("coordinator", &["--listen", &addr.to_string()]);
    assert_eq!(coordinator.listening_addr(), addr);
    let mut ids = eventually("servers re-registered", || async {
        let ids: Vec<String> = coordinator_servers(&stats_url)
            .await
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        (ids.len() == 3).then_some(ids)
    })
    .await;
    ids.sort();
    let mut expected: Vec<String> = servers.iter().map(|s| s.id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let (ok, _, err) = run(
        "meshctl",
        &["pub", "--coordinator", &url, "room/1", "after restart"],
    );
    assert!(ok, "{err}");
    assert!(sub.next_stdout_line().ends_with("\tafter restart"));

    // SIGKILL the comm server `a` is on: it moves to another server and is resubscribed.
    let mut dead = servers.remove(1);
    dead.proc.kill();
    let event = within("disconnect", a.next_event()).await.unwrap();
    assert!(
        matches!(&event, Event::Disconnected { server_id, .. } if *server_id == dead.id),
        "{event:?}"
    );
    let event = within("reconnect", a.next_event()).await.unwrap();
    assert!(
        matches!(&event, Event::Reconnected { server_id, .. } if *server_id != dead.id),
        "{event:?}"
    );
    b.publish("fleet/1", "after failover").await.unwrap();
    assert_eq!(next_message(&mut a).await.payload, "after failover");
    for server in &servers {
        eventually("dead peer dropped", || async {
            (get_json(&server.stats_url()).await["peers"] == 1).then_some(())
        })
        .await;
    }

    // SIGTERM the servers while `a` and `b` are still connected: each drains first (its
    // clients are asked to move, and do, to the other server while there is one) and exits 0.
    // The last has nowhere to send them: when `drain_on_shutdown_ms` is up it closes their
    // sessions, and the clients are told. SIGINT stops the coordinator the same way.
    drop(sub);
    let first = servers[0].id.clone();
    let was_on_first = a.server_id() == first;
    for server in &mut servers {
        assert!(server.proc.terminate(), "comm server did not exit cleanly");
        server.proc.wait_for_line("comm server stopped");
    }
    let mut moved = false;
    let event = within("shutdown notice", async {
        loop {
            match a.next_event().await {
                Some(Event::Moved { from_server, .. }) => moved |= from_server == first,
                Some(event @ Event::Disconnected { .. }) => return event,
                Some(_) => {}
                None => panic!("the client ended without a word"),
            }
        }
    })
    .await;
    assert!(matches!(&event, Event::Disconnected { .. }), "{event:?}");
    assert_eq!(moved, was_on_first, "moved off the first server drained");
    assert!(
        coordinator.signal("INT"),
        "coordinator did not exit cleanly on SIGINT"
    );
    coordinator.wait_for_line("coordinator stopped");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_managed_from_the_command_line_log_in_to_real_processes() {
    let dir = std::env::temp_dir().join(format!("relaymesh-accounts-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}", dir.join("accounts.db").display());
    let admin = |args: &[&str]| {
        let mut all = vec!["accounts", "--url", &db];
        all.extend_from_slice(args);
        let (ok, out, err) = run("coordinator", &all);
        assert!(ok, "coordinator {all:?}: {err}");
        out
    };
    admin(&["create", "acme"]);
    admin(&["set-role", "acme", "agent", "--publish", "telemetry/#"]);
    admin(&["set-role", "acme", "gcs", "--subscribe", "telemetry/#"]);
    let code = admin(&["add-code", "acme"]).trim().to_owned();
    let key_file = dir.join("gcs.key");
    let (ok, public, err) = run("meshctl", &["keygen", key_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    admin(&["add-key", "acme", public.trim(), "--id", "gcs-1"]);
    assert!(admin(&["list"]).contains("gcs-1"));

    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!("[accounts]\nstore = \"sql\"\nurl = \"{db}\"\n"),
    )
    .unwrap();
    let mut coordinator = configured("coordinator", &config, &["--listen", "127.0.0.1:0"]);
    let url = format!("ws://{}", coordinator.listening_addr());
    let _server = Proc::start(
        "commserver",
        &["--coordinator", &url, "--listen", "127.0.0.1:0"],
    );
    let stats_url = format!("http://{}/v1/stats", coordinator.listening_addr());
    eventually("the comm server registered", || async {
        (coordinator_servers(&stats_url).await.len() == 1).then_some(())
    })
    .await;

    // A ground station logs in with the key from `meshctl keygen`; an agent publishes with
    // the access code `add-code` printed, through `meshctl`.
    let mut gcs = client_config(&url);
    gcs.credentials = relaymesh_client::Credentials::Key {
        account: "acme".into(),
        key: relaymesh_net::keys::read_signing_key(&key_file).unwrap(),
        role: "gcs".into(),
        group: String::new(),
    };
    let mut gcs = Client::connect(gcs).await.unwrap();
    gcs.subscribe(["telemetry/pos"]).await.unwrap();
    let agent = [
        "--coordinator",
        &url,
        "--account",
        "acme",
        "--role",
        "agent",
    ];
    let mut publish = agent.to_vec();
    publish.extend(["--code", &code, "pub", "telemetry/pos", "from meshctl"]);
    let (ok, _, err) = run("meshctl", &publish);
    assert!(ok, "{err}");
    let m = next_message(&mut gcs).await;
    assert_eq!(
        (&*m.payload, m.role.as_str()),
        (&b"from meshctl"[..], "agent")
    );
    // The HTTP login with the key works too; a wrong code is one clear line.
    let (ok, login, err) = run(
        "meshctl",
        &[
            "--coordinator",
            &url,
            "--account",
            "acme",
            "--role",
            "gcs",
            "--key-file",
            key_file.to_str().unwrap(),
            "login",
        ],
    );
    assert!(ok && login.contains("\"key\""), "{login} {err}");
    // A publish the role may not make fails `meshctl pub` with the server's reason.
    let mut forbidden = agent.to_vec();
    forbidden.extend(["--code", &code, "pub", "command/drone-7", "land"]);
    let (ok, _, err) = run("meshctl", &forbidden);
    assert!(!ok && err.contains("may not publish"), "{err}");
    let mut wrong = agent.to_vec();
    wrong.extend(["--code", "not-the-code", "pub", "telemetry/pos", "x"]);
    let (ok, _, err) = run("meshctl", &wrong);
    assert!(
        !ok && err.lines().count() == 1 && err.contains("BAD_CREDENTIALS"),
        "{err}"
    );
    gcs.close().await;
    assert!(coordinator.terminate());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn account_commands_run_at_the_same_time_lose_nothing() {
    let dir = std::env::temp_dir().join(format!("relaymesh-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("accounts.json");
    let file = file.to_str().unwrap();
    let (ok, _, err) = run(
        "coordinator",
        &["accounts", "--file", file, "create", "acme"],
    );
    assert!(ok, "{err}");
    // Eight processes add a code each at once; each reads, changes and writes the file.
    let children: Vec<_> = (0..8)
        .map(|i| {
            std::process::Command::new(relaymesh_tests::process::binary("coordinator"))
                .args([
                    "accounts",
                    "--file",
                    file,
                    "add-code",
                    "acme",
                    "--id",
                    &format!("c{i}"),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, listed, err) = run("coordinator", &["accounts", "--file", file, "list"]);
    assert!(ok, "{err}");
    for i in 0..8 {
        assert!(
            listed.contains(&format!("c{i}")),
            "code c{i} lost: {listed}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A comm server with the wrong cluster secret says so, as an error, instead of "cannot
/// reach"; one started before its coordinator says it is waiting, without a warning.
#[tokio::test]
async fn a_wrong_secret_is_named_and_an_early_start_is_not_a_warning() {
    let addr = restartable_addr();
    let url = format!("ws://{addr}");
    // Retrying often, so it registers soon after the coordinator is up however busy the machine.
    let config = std::env::temp_dir().join(format!("relaymesh-early-{}.toml", std::process::id()));
    std::fs::write(&config, "reconnect_max_ms = 200\n").unwrap();
    let mut early = configured(
        "commserver",
        &config,
        &["--coordinator", &url, "--listen", "127.0.0.1:0"],
    );
    let waiting = early.wait_for_line("is not reachable yet");
    assert!(waiting.contains(" INFO "), "{waiting}");
    let mut coordinator = Proc::start("coordinator", &["--listen", &addr.to_string()]);
    coordinator.listening_addr();
    early.wait_for_line("registered with the coordinator");
    assert!(
        !early
            .seen
            .iter()
            .any(|l| l.contains(" WARN ") || l.contains(" ERROR ")),
        "{:#?}",
        early.seen
    );

    let mut wrong = Proc::start_with_secret(
        "commserver",
        &["--coordinator", &url, "--listen", "127.0.0.1:0"],
        Some("not-the-secret"),
    );
    let refused = wrong.wait_for_line("refused this server's credentials");
    assert!(
        refused.contains(" ERROR ")
            && refused.contains("wrong cluster secret")
            && refused.contains("retrying every 30 s"),
        "{refused}"
    );
    assert!(
        !wrong.seen.iter().any(|l| l.contains("not reachable")),
        "{:#?}",
        wrong.seen
    );
}

/// A process at its open-files limit answers new connections at once (`503 SERVER_FULL`)
/// instead of leaving them, and everything queued behind them, waiting in the kernel; it
/// serves again as soon as descriptors are free.
#[tokio::test]
async fn a_process_out_of_file_descriptors_refuses_at_once_and_recovers() {
    // Held connections stay for the whole test unless the server refuses them.
    let config = std::env::temp_dir().join(format!("relaymesh-nofile-{}.toml", std::process::id()));
    std::fs::write(&config, "request_timeout_ms = 60000\n").unwrap();
    let mut coordinator = configured("coordinator", &config, &["--listen", "127.0.0.1:0"]);
    let addr = coordinator.listening_addr();
    let limited = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", coordinator.child.id()))
        .arg("--nofile=48:48")
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success());
    // More connections than it has descriptors left, sending nothing.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let healthz = format!("http://{addr}/healthz");
    let (status, body) = relaymesh_tests::get_text(&healthz).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("SERVER_FULL"), "{body}");
    let line = coordinator.wait_for_line("out of file descriptors");
    assert!(line.contains(" WARN "), "{line}");
    drop(held);
    eventually("served again once descriptors are free", || async {
        let answer = relaymesh_net::http::request(
            relaymesh_net::http::Method::GET,
            &healthz,
            None,
            std::time::Duration::from_secs(5),
        )
        .await;
        answer.ok().filter(|(status, _)| status.as_u16() == 200)
    })
    .await;
    std::fs::remove_file(&config).ok();
}

/// A coordinator and two comm servers as processes, configured by these files' contents,
/// linked and both offered.
struct TwoServers {
    dir: std::path::PathBuf,
    coordinator: Proc,
    addr: std::net::SocketAddr,
    url: String,
    stats_url: String,
    /// The processes and their ids.
    servers: Vec<(Proc, String)>,
}

impl TwoServers {
    async fn start(name: &str, coordinator_toml: &str, server_toml: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("relaymesh-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, coordinator_toml).unwrap();
        let mut coordinator = configured("coordinator", &config, &["--listen", "127.0.0.1:0"]);
        let addr = coordinator.listening_addr();
        let url = format!("ws://{addr}");
        let stats_url = format!("http://{addr}/v1/stats");
        let server_config = dir.join("commserver.toml");
        std::fs::write(&server_config, server_toml).unwrap();
        let mut servers = Vec::new();
        for _ in 0..2 {
            let mut proc = configured(
                "commserver",
                &server_config,
                &["--coordinator", &url, "--listen", "127.0.0.1:0"],
            );
            let id = proc.listening_addr().to_string();
            proc.wait_for_line("registered with the coordinator");
            servers.push((proc, id));
        }
        let two = Self {
            dir,
            coordinator,
            addr,
            url,
            stats_url,
            servers,
        };
        for i in 0..2 {
            eventually("the servers are linked", || async {
                (get_json(&two.server_stats(i)).await["peers"] == 1).then_some(())
            })
            .await;
            eventually("both servers offered", || async {
                (two.eligible(i).await == Some(true)).then_some(())
            })
            .await;
        }
        two
    }

    fn server_stats(&self, i: usize) -> String {
        format!("http://{}/v1/stats", self.servers[i].1)
    }

    /// Whether the coordinator offers server `i` (`None`: not registered).
    async fn eligible(&self, i: usize) -> Option<bool> {
        coordinator_servers(&self.stats_url)
            .await
            .iter()
            .find(|s| s["id"] == self.servers[i].1.as_str())
            .map(|s| s["eligible"] == true)
    }

    /// A client through the coordinator, asking for server `i`.
    async fn client_on(&self, i: usize) -> Client {
        let mut config = client_config(&self.url);
        config.preferred_server = Some(self.servers[i].1.clone());
        let client = Client::connect(config).await.unwrap();
        assert_eq!(client.server_id(), self.servers[i].1);
        client
    }

    /// Sends `SIG<name>` (e.g. `STOP`) to server `i`.
    fn signal(&self, i: usize, name: &str) {
        self.servers[i].0.send_signal(name);
    }

    fn stop(mut self) {
        self.servers.clear();
        self.coordinator.kill();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A comm server that stops answering (SIGSTOP) while its links stay open is out of the
/// coordinator's choice within the heartbeat interval, long before the heartbeat timeout would
/// end its link: logins go to the healthy server without waiting for a reservation to time
/// out; its peer gives up their link after the peer heartbeat timeout. Once it runs again, it
/// is offered and linked again, and its subscriber is told how many messages it missed while
/// the link was down.
#[tokio::test]
async fn a_frozen_server_is_not_offered_and_comes_back_when_it_runs_again() {
    // A short interval (reports every 150 ms) and a timeout far beyond the test; client and
    // coordinator links that would wait a minute; peer links keep the default.
    let two = TwoServers::start(
        "frozen",
        "heartbeat_interval_ms = 300\nheartbeat_timeout_ms = 60000\n",
        "heartbeat_timeout_ms = 60000\n",
    )
    .await;
    let (addr, stats_url) = (two.addr, two.stats_url.clone());
    let healthy_stats = two.server_stats(1);
    // A subscriber on the server about to freeze, a publisher on the other.
    let mut subscriber = two.client_on(0).await;
    subscriber.subscribe(["ops/frozen"]).await.unwrap();
    let publisher = two.client_on(1).await;
    publisher.publish("ops/frozen", "before").await.unwrap();
    assert_eq!(next_message(&mut subscriber).await.payload, "before");

    two.signal(0, "STOP");
    eventually("the frozen server is no longer offered", || async {
        (two.eligible(0).await == Some(false)).then_some(())
    })
    .await;
    // Still registered (its link is open), yet every login goes to the other server at once.
    assert_eq!(coordinator_servers(&stats_url).await.len(), 2);
    for _ in 0..20 {
        let (status, login) =
            relaymesh_tests::post_json(&format!("http://{addr}/v1/login"), &serde_json::json!({}))
                .await;
        assert_eq!(status, 200, "{login}");
        assert_eq!(login["server_id"], two.servers[1].1.as_str());
    }
    assert_eq!(get_json(&stats_url).await["reservations_failed"], 0);
    // The healthy server gives up its link to the frozen one after the peer heartbeat
    // timeout (3 s), not the minute its other links would wait.
    eventually("the peer link to the frozen server is closed", || async {
        (get_json(&healthy_stats).await["peers"] == 0).then_some(())
    })
    .await;
    // Published while the link is down: held for the peer's next link.
    const WHILE_DOWN: u64 = 25;
    for i in 0..WHILE_DOWN {
        publisher
            .publish("ops/frozen", format!("down {i}"))
            .await
            .unwrap();
    }

    two.signal(0, "CONT");
    eventually("offered again once it runs", || async {
        (two.eligible(0).await == Some(true)).then_some(())
    })
    .await;
    eventually("linked again", || async {
        (get_json(&healthy_stats).await["peers"] == 1).then_some(())
    })
    .await;
    // The subscriber gets every one of them, in order, replayed on the new link.
    for i in 0..WHILE_DOWN {
        assert_eq!(
            next_message(&mut subscriber).await.payload,
            format!("down {i}")
        );
    }
    let healthy = get_json(&healthy_stats).await;
    assert_eq!(healthy["forwards_replayed"], WHILE_DOWN);
    assert_eq!(healthy["peer_gaps_reported"], 0);
    // And the link carries messages again.
    publisher.publish("ops/frozen", "after").await.unwrap();
    assert_eq!(next_message(&mut subscriber).await.payload, "after");
    two.stop();
}

/// A publisher whose server freezes: what it handed to that server without a confirmation
/// goes out again through another server. Each message arrives once, in order, and nothing
/// stale follows when the frozen server runs again.
#[tokio::test]
async fn publishes_a_frozen_server_never_confirmed_are_sent_again_and_arrive_once() {
    // Clients give up a silent server after 1.5 s.
    let two = TwoServers::start(
        "unconfirmed",
        "heartbeat_interval_ms = 300\n",
        "heartbeat_interval_ms = 300\nheartbeat_timeout_ms = 1500\n",
    )
    .await;
    let mut subscriber = two.client_on(1).await;
    subscriber.subscribe(["ops/resend"]).await.unwrap();
    let mut publisher = two.client_on(0).await;
    publisher.publish("ops/resend", "0").await.unwrap();
    assert_eq!(next_message(&mut subscriber).await.payload, "0");

    two.signal(0, "STOP");
    let stopped = tokio::time::Instant::now();
    // Taken by the frozen server's socket, never confirmed.
    const TOTAL: usize = 40;
    for i in 1..TOTAL {
        publisher
            .publish("ops/resend", i.to_string())
            .await
            .unwrap();
    }
    // The publisher moves to the other server and sends them again.
    loop {
        match within("the publisher moves", publisher.next_event()).await {
            Some(Event::Reconnected { server_id, .. }) => {
                assert_eq!(server_id, two.servers[1].1);
                break;
            }
            Some(_) => {}
            None => panic!("the publisher's client ended"),
        }
    }
    for i in 1..TOTAL {
        assert_eq!(next_message(&mut subscriber).await.payload, i.to_string());
    }
    // The frozen server runs again once its sessions' heartbeat timeout (1.5 s) has passed
    // with room to spare: the publisher's session there has timed out, and nothing stale
    // comes out of it. (The publisher gives the server up after the same 1.5 s, counted from
    // the server's last ping, so without this the freeze could end just inside the server's
    // timeout: it would then route what it read as fresh, and the subscriber's client, which
    // never counts a resend against originals, would deliver those a second time. The freeze's
    // length is this scenario's parameter, not a wait for state.)
    tokio::time::sleep_until(stopped + std::time::Duration::from_secs(3)).await;
    two.signal(0, "CONT");
    eventually("linked again", || async {
        (get_json(&two.server_stats(1)).await["peers"] == 1).then_some(())
    })
    .await;
    publisher.publish("ops/resend", "last").await.unwrap();
    assert_eq!(next_message(&mut subscriber).await.payload, "last");
    two.stop();
}

/// What clients cost a comm server goes when they leave: its tokio tasks, sessions, topics and
/// the peer's interest are back where they were before they came (the soak test,
/// `scripts/soak.sh`, watches the same figures for half an hour of churn).
#[tokio::test]
async fn tasks_sessions_and_interest_go_when_their_clients_leave() {
    let two = TwoServers::start("tasks", "", "").await;
    let figures = |i: usize| {
        let url = two.server_stats(i);
        async move {
            let s = get_json(&url).await;
            let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
            let remote: u64 = s["peer_links"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["remote_topics"].as_u64().unwrap())
                .sum();
            (n("tasks"), n("clients"), n("topics"), remote)
        }
    };
    let publisher = two.client_on(1).await;
    let idle = [figures(0).await, figures(1).await];
    assert_eq!((idle[0].1, idle[0].2, idle[1].3), (0, 0, 0));

    let mut subscribers = Vec::new();
    for round in 0..3 {
        for i in 0..10 {
            let client = two.client_on(0).await;
            client.subscribe([format!("ops/tasks/{i}")]).await.unwrap();
            subscribers.push(client);
        }
        for i in 0..10 {
            publisher
                .publish(&format!("ops/tasks/{i}"), format!("{round}"))
                .await
                .unwrap();
        }
        for client in &mut subscribers {
            assert_eq!(next_message(client).await.payload, round.to_string());
        }
        let busy = figures(0).await;
        // A session is at least one task of its own.
        assert!(
            busy.0 >= idle[0].0 + 10,
            "{busy:?} against idle {:?}",
            idle[0]
        );
        assert_eq!((busy.1, busy.2), (10, 10));
        assert_eq!(figures(1).await.3, 10, "server 1 knows server 0's interest");
        for client in subscribers.drain(..) {
            client.close().await;
        }
        for (i, idle) in idle.iter().enumerate() {
            eventually("the server is back to idle", || async {
                (figures(i).await == *idle).then_some(())
            })
            .await;
        }
    }
    drop(publisher);
    two.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_message_and_call_each_other_through_meshctl_and_go_offline_with_their_server()
 {
    let mut cluster = SqlProcesses::start("nodes-cli", "127.0.0.1:0").await;
    let (url, code, db) = (
        cluster.url.clone(),
        cluster.code.clone(),
        cluster.db.clone(),
    );
    let admin = |args: &[&str]| sql_admin(&db, args);
    let servers = &mut cluster.servers;
    let meshctl = |server: &Server, args: &[&str]| -> Vec<String> {
        let mut all = vec!["--coordinator", &url, "--server", &server.id];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect()
    };
    let strs = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join(" ");

    // Two nodes registered with the account's code; the tokens log them in.
    let mut tokens = Vec::new();
    for name in ["station", "drone"] {
        let args = meshctl(
            &servers[0],
            &[
                "--account",
                "acme",
                "--code",
                &code,
                "register",
                "--name",
                name,
            ],
        );
        let (ok, out, err) = run(
            "meshctl",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(ok, "{}: {err}", strs(&args));
        let (id, token) = out.trim().split_once('\t').expect("NODE_ID<TAB>TOKEN");
        tokens.push((id.to_owned(), token.to_owned()));
    }
    let ((station, station_token), (drone, drone_token)) = (tokens[0].clone(), tokens[1].clone());
    assert!(admin(&["nodes", "acme"]).contains(&drone));
    // `meshctl login` with a token logs in as its node.
    let args = meshctl(&servers[0], &["--node-token", &drone_token, "login"]);
    let (ok, login, err) = run(
        "meshctl",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(ok, "{err}");
    let login: serde_json::Value = serde_json::from_str(&login).unwrap();
    assert_eq!(login["node_id"], drone.as_str(), "{login}");

    // A watcher on server 0 sees the drone come online on server 1 and go with it.
    let mut watcher = client_config(&url);
    watcher.credentials = relaymesh_client::Credentials::AccessCode {
        account: "acme".into(),
        code: code.clone(),
        role: String::new(),
        group: String::new(),
    };
    watcher.preferred_server = Some(servers[0].id.clone());
    let mut watcher = Client::connect(watcher).await.unwrap();
    watcher.watch_presence().await.unwrap();

    let args = meshctl(
        &servers[1],
        &["--node-token", &drone_token, "listen", "--count", "2"],
    );
    let mut listener = Proc::start(
        "meshctl",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    listener.wait_for_line(&format!("listening as node {drone} on {}", servers[1].id));
    match within("online", watcher.next_event()).await {
        Some(Event::Presence { change, node }) => {
            assert_eq!(
                (change, node.node_id.as_str()),
                (relaymesh_client::PresenceChange::Online, drone.as_str())
            );
        }
        other => panic!("expected the drone online, got {other:?}"),
    }
    let run_meshctl = |args: Vec<String>| {
        let (ok, out, err) = run(
            "meshctl",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        (ok, out, err)
    };
    for text in ["take off", "land"] {
        let (ok, _, err) = run_meshctl(meshctl(
            &servers[0],
            &["--node-token", &station_token, "send", &drone, text],
        ));
        assert!(ok, "{err}");
        let line = listener.next_stdout_line();
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            (fields.len(), fields[0], fields[1], fields[3]),
            (4, "direct", station.as_str(), text),
            "{line}"
        );
    }
    assert!(listener.wait_exit().success());
    // Gone now: the message waits in its inbox, and is what its next login gets first.
    let (ok, _, err) = run_meshctl(meshctl(
        &servers[0],
        &[
            "--node-token",
            &station_token,
            "send",
            &drone,
            "while you were out",
        ],
    ));
    assert!(
        ok && err.contains("is offline: stored in its inbox"),
        "{err}"
    );
    let inbox_of = |node: &str| -> String {
        let listed = admin(&["nodes", "acme"]);
        let line = listed
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_default();
        line.rsplit('\t').next().unwrap_or_default().to_owned()
    };
    assert_eq!(inbox_of(&drone), "inbox 1");
    let args = meshctl(
        &servers[1],
        &["--node-token", &drone_token, "listen", "--count", "1"],
    );
    let mut listener = Proc::start(
        "meshctl",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let line = listener.next_stdout_line();
    assert!(
        line.starts_with(&format!("direct\t{station}\t")) && line.ends_with("\twhile you were out"),
        "{line}"
    );
    assert!(listener.wait_exit().success());
    // Acknowledged as it was handed over: nothing waits any more.
    eventually("the inbox emptied", || async {
        (inbox_of(&drone) == "inbox 0").then_some(())
    })
    .await;

    // The signalling example: the station calls the drone across the two servers.
    let args = meshctl(&servers[1], &["--node-token", &drone_token, "answer"]);
    let mut answering = Proc::start(
        "meshctl",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    answering.wait_for_line(&format!("waiting for a call to node {drone}"));
    let (ok, out, err) = run_meshctl(meshctl(
        &servers[0],
        &[
            "--node-token",
            &station_token,
            "call",
            &drone,
            "--candidates",
            "2",
        ],
    ));
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("got\tanswer\tanswer from {drone}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("got\tice-candidate\tcandidate 1 of {drone}")),
        "{out}"
    );
    assert!(
        out.ends_with(&format!("connected\t{drone}\t2 remote candidates\n")),
        "{out}"
    );
    assert!(answering.wait_exit().success());

    // `meshctl nodes` lists what is online: the drone, listening again.
    let args = meshctl(&servers[1], &["--node-token", &drone_token, "listen"]);
    let mut listener = Proc::start(
        "meshctl",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    listener.wait_for_line("listening as node");
    let listed = eventually("the drone listed", || {
        let args = meshctl(&servers[0], &["--node-token", &station_token, "nodes"]);
        let drone = drone.clone();
        async move {
            let (ok, out, _) = run_meshctl(args);
            (ok && out.contains(&drone)).then_some(out)
        }
    })
    .await;
    assert!(
        listed.contains(&format!("{drone}\tdrone\t\t{}", servers[1].id)),
        "{listed}"
    );

    // Its server dies: every server sees the drone offline within the heartbeat timeout.
    // (The meshctl processes above came and went: their events are read first.)
    watcher.flush().await.unwrap();
    while let Ok(Some(_)) =
        tokio::time::timeout(std::time::Duration::from_millis(100), watcher.next_event()).await
    {
    }
    servers[1].proc.kill();
    let offline = within("offline", async {
        loop {
            match watcher.next_event().await {
                Some(Event::Presence { change, node })
                    if change == relaymesh_client::PresenceChange::Offline
                        && node.node_id == drone =>
                {
                    return node;
                }
                Some(_) => {}
                None => panic!("watcher closed"),
            }
        }
    })
    .await;
    assert!(offline.servers.is_empty());
    assert_eq!(watcher.list_nodes(0, "").await.unwrap().total, 0);
    drop(listener);
    watcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_direct_messages_survive_kill_9_of_the_coordinator_and_of_the_nodes_server() {
    let addr = restartable_addr();
    let mut cluster = SqlProcesses::start("inbox-kill", &addr.to_string()).await;
    let (url, code) = (cluster.url.clone(), cluster.code.clone());
    let login = relaymesh_client::Credentials::AccessCode {
        account: "acme".into(),
        code,
        role: String::new(),
        group: String::new(),
    };
    let mut config = client_config(&url);
    config.credentials = login.clone();
    let drone = relaymesh_client::register_node(&config, relaymesh_client::NodeDetails::default())
        .await
        .unwrap();
    config.preferred_server = Some(cluster.servers[0].id.clone());
    let mut station = Client::connect(config).await.unwrap();
    for i in 0..20u32 {
        let seq = station
            .send(&drone.node_id, i.to_be_bytes().to_vec())
            .await
            .unwrap();
        match within("accepted", station.next_event()).await {
            Some(Event::Accepted { seq: s, .. }) => assert_eq!(s, seq),
            other => panic!("expected Accepted, got {other:?}"),
        }
    }
    // Accepted means written: the coordinator dies at once and comes back.
    cluster.coordinator.kill();
    cluster.coordinator = configured(
        "coordinator",
        &cluster.dir.join("coordinator.toml"),
        &["--listen", &addr.to_string()],
    );
    cluster.coordinator.listening_addr();
    let servers = &mut cluster.servers;
    for server in servers.iter() {
        eventually("re-registered", || async {
            (get_json(&server.stats_url()).await["coordinator_connected"] == true).then_some(())
        })
        .await;
    }
    // The drone logs in on server 1 and reads without acknowledging; server 1 dies.
    let mut drone_config = client_config(&url);
    drone_config.credentials = relaymesh_client::Credentials::NodeToken(drone.token.clone());
    drone_config.preferred_server = Some(servers[1].id.clone());
    drone_config.auto_ack_inbox = false;
    let mut node = Client::connect(drone_config).await.unwrap();
    let mut last = 0;
    for i in 0..20u32 {
        match within("inbox", node.next_event()).await {
            Some(Event::Direct(d)) => {
                assert_eq!(&d.payload[..], &i.to_be_bytes()[..]);
                last = d.inbox_id;
            }
            other => panic!("expected a direct message, got {other:?}"),
        }
    }
    servers[1].proc.kill();
    loop {
        match within("reconnect", node.next_event()).await {
            Some(Event::Reconnected { server_id, .. }) => {
                assert_eq!(server_id, servers[0].id);
                break;
            }
            Some(Event::Disconnected { .. }) => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    // Delivered again on server 0 (unacknowledged), and dropped by the library as copies: the
    // application's next message is the live one.
    eventually("delivered again", || async {
        (get_json(&servers[0].stats_url()).await["inbox_delivered"].as_u64() >= Some(20))
            .then_some(())
    })
    .await;
    station.send(&drone.node_id, "live").await.unwrap();
    match within("live", node.next_event()).await {
        Some(Event::Direct(d)) => assert_eq!((&d.payload[..], d.inbox_id), (&b"live"[..], 0)),
        other => panic!("expected the live message, got {other:?}"),
    }
    node.handle().ack_inbox(last).await.unwrap();
    eventually("acknowledged and deleted", || async {
        let listed = cluster.admin(&["nodes", "acme"]);
        listed
            .lines()
            .any(|l| l.starts_with(&drone.node_id) && l.ends_with("\tinbox 0"))
            .then_some(())
    })
    .await;
    node.close().await;
    station.close().await;
}

/// A coordinator on a SQLite `sql` store with account `acme` (and its code), and two comm
/// servers, as processes; the coordinator is stopped and the files removed on drop.
struct SqlProcesses {
    dir: std::path::PathBuf,
    db: String,
    code: String,
    url: String,
    coordinator: Proc,
    servers: Vec<Server>,
}

impl SqlProcesses {
    async fn start(name: &str, listen: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("relaymesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = format!("sqlite://{}", dir.join("accounts.db").display());
        sql_admin(&db, &["create", "acme"]);
        let code = sql_admin(&db, &["add-code", "acme"]).trim().to_owned();
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 2000\n\
                 [accounts]\nstore = \"sql\"\nurl = \"{db}\"\n"
            ),
        )
        .unwrap();
        let mut coordinator = configured("coordinator", &config, &["--listen", listen]);
        let url = format!("ws://{}", coordinator.listening_addr());
        let servers = commservers(&url, 2);
        for server in &servers {
            eventually("linked", || async {
                (get_json(&server.stats_url()).await["peers"] == 1).then_some(())
            })
            .await;
        }
        Self {
            dir,
            db,
            code,
            url,
            coordinator,
            servers,
        }
    }

    /// `coordinator accounts --url DB ARGS`; its output.
    fn admin(&self, args: &[&str]) -> String {
        sql_admin(&self.db, args)
    }
}

/// `coordinator accounts --url DB ARGS` on the database at `db`; its output.
fn sql_admin(db: &str, args: &[&str]) -> String {
    let mut all = vec!["accounts", "--url", db];
    all.extend_from_slice(args);
    let (ok, out, err) = run("coordinator", &all);
    assert!(ok, "coordinator {all:?}: {err}");
    out
}

impl Drop for SqlProcesses {
    fn drop(&mut self) {
        self.coordinator.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_admin_lists_drains_and_undrains_servers_of_a_real_coordinator() {
    const TOKEN: &str = "process-admin-token-0123456789";
    let secret = ("RELAYMESH_CLUSTER_SECRET", relaymesh_tests::SECRET);
    let mut coordinator = Proc::start_with_env(
        "coordinator",
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[secret, ("RELAYMESH_ADMIN_TOKEN", TOKEN)],
    );
    let after = |line: String| line.rsplit(' ').next().unwrap().to_owned();
    let admin_addr = after(coordinator.wait_for_line("admin API listening on "));
    let addr = after(coordinator.wait_for_line("coordinator listening on "));
    let url = format!("ws://{addr}");
    let servers = commservers(&url, 2);
    let admin_url = format!("http://{admin_addr}");
    let meshctl = |token: &str, args: &[&str]| {
        let mut all = vec!["admin", "--admin", &admin_url];
        all.extend_from_slice(args);
        run_with_env("meshctl", &all, &[("RELAYMESH_ADMIN_TOKEN", token)])
    };
    let (ok, out, err) = meshctl(TOKEN, &["servers"]);
    assert!(ok, "{err}");
    let mut listed: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    listed.sort_unstable();
    let mut ids: Vec<&str> = servers.iter().map(|s| s.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(listed, ids, "{out}");
    // A wrong token: refused, said in one line.
    let (ok, _, err) = meshctl("wrong-token-0123456789", &["servers"]);
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");
    coordinator.wait_for_line("admin API: wrong token");

    // A client on the first server moves to the second when the first is drained.
    let drained = servers[0].id.clone();
    let mut config = client_config(&url);
    config.preferred_server = Some(drained.clone());
    let mut client = Client::connect(config).await.unwrap();
    assert_eq!(client.server_id(), drained);
    eventually("the client reported", || async {
        let (_, out, _) = meshctl(TOKEN, &["server", &drained]);
        out.contains("\t1/").then_some(())
    })
    .await;
    let (ok, out, err) = meshctl(TOKEN, &["drain", &drained, "--reason", "upgrade"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "moved\t1\tremaining\t0");
    match within("move", client.next_event()).await {
        Some(Event::Moved {
            from_server,
            server_id,
            ..
        }) => {
            assert_eq!(from_server, drained);
            assert_eq!(server_id, servers[1].id);
        }
        other => panic!("expected a move, got {other:?}"),
    }
    coordinator.wait_for_line("admin: DrainServer done");
    let (ok, out, _) = meshctl(TOKEN, &["undrain", &drained]);
    assert!(ok);
    assert!(out.trim().ends_with("\tup"), "{out}");
    let (ok, _, err) = meshctl(TOKEN, &["drain", "no-such-server"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
    client.close().await;
    for mut server in servers {
        assert!(server.proc.terminate());
    }
    assert!(coordinator.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_accounts_with_admin_changes_the_running_coordinators_store() {
    const TOKEN: &str = "process-accounts-token-0123456789";
    let dir = std::env::temp_dir().join(format!("relaymesh-accounts-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}", dir.join("accounts.db").display());
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!("[accounts]\nstore = \"sql\"\nurl = \"{db}\"\n"),
    )
    .unwrap();
    let secret = ("RELAYMESH_CLUSTER_SECRET", relaymesh_tests::SECRET);
    let mut coordinator = Proc::start_with_env(
        "coordinator",
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[secret, ("RELAYMESH_ADMIN_TOKEN", TOKEN)],
    );
    let after = |line: String| line.rsplit(' ').next().unwrap().to_owned();
    let admin_url = format!(
        "http://{}",
        after(coordinator.wait_for_line("admin API listening on "))
    );
    let url = format!(
        "ws://{}",
        after(coordinator.wait_for_line("coordinator listening on "))
    );
    let servers = commservers(&url, 1);
    let accounts = |token: &str, args: &[&str]| {
        let mut all = vec!["accounts", "--admin", &admin_url];
        all.extend_from_slice(args);
        run_with_env("coordinator", &all, &[("RELAYMESH_ADMIN_TOKEN", token)])
    };
    let (ok, out, err) = accounts(TOKEN, &["create", "acme"]);
    assert!(ok, "{err}");
    assert_eq!(out, "created account acme\n");
    let (ok, code, err) = accounts(TOKEN, &["add-code", "acme", "--id", "ops"]);
    assert!(ok, "{err}");
    // The code made through the running coordinator logs in there at once.
    let mut config = relaymesh_tests::client_config(&url);
    config.credentials = relaymesh_client::Credentials::AccessCode {
        account: "acme".into(),
        code: code.trim().into(),
        role: String::new(),
        group: String::new(),
    };
    Client::connect(config).await.unwrap().close().await;
    let (ok, listed, _) = accounts(TOKEN, &["list"]);
    assert!(ok);
    assert!(listed.starts_with("acme\tenabled\tcodes: ops"), "{listed}");
    // Refusals: a wrong token, an account that exists, one that does not.
    let (ok, _, err) = accounts("not-the-token", &["list"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = accounts(TOKEN, &["create", "acme"]);
    assert!(!ok && err.contains("AlreadyExists"), "{err}");
    let (ok, _, err) = accounts(TOKEN, &["disable", "globex"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
    coordinator.wait_for_line("admin: accounts changed");
    for mut server in servers {
        assert!(server.proc.terminate());
    }
    assert!(coordinator.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The TLS set-up of the README with real processes: a coordinator and two comm servers on
/// TLS with mutual TLS between them (flags only), meshctl publishing on one server and
/// subscribing on the other with `--ca`, the admin API over https; a meshctl that trusts
/// nothing is refused in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_of_real_processes_relays_between_servers_for_meshctl_with_ca() {
    const TOKEN: &str = "process-tls-token-0123456789";
    let pki = relaymesh_tests::pki::Pki::new("relaymesh process CA");
    let ca = pki.ca.to_str().unwrap().to_owned();
    let tls_args = |file: &str| {
        let issued = pki.issue(file);
        vec![
            "--tls-cert".to_owned(),
            issued.cert.to_str().unwrap().to_owned(),
            "--tls-key".to_owned(),
            issued.key.to_str().unwrap().to_owned(),
            "--ca".to_owned(),
            ca.clone(),
            "--mtls".to_owned(),
        ]
    };
    let secret = ("RELAYMESH_CLUSTER_SECRET", relaymesh_tests::SECRET);
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        .map(str::to_owned)
        .to_vec();
    args.extend(tls_args("coordinator"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut coordinator = Proc::start_with_env(
        "coordinator",
        &args,
        &[secret, ("RELAYMESH_ADMIN_TOKEN", TOKEN)],
    );
    let after = |line: String| line.rsplit(' ').next().unwrap().to_owned();
    let admin_addr = after(coordinator.wait_for_line("admin API listening on "));
    // Not `listening_addr`: the admin API's line may come first and names another port.
    let addr = after(coordinator.wait_for_line("coordinator listening on "));
    let url = format!("wss://{addr}");
    let mut servers = Vec::new();
    for i in 0..2 {
        let mut args: Vec<String> = ["--coordinator", &url, "--listen", "127.0.0.1:0"]
            .map(str::to_owned)
            .to_vec();
        args.extend(tls_args(&format!("server-{i}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = Proc::start_with_env("commserver", &args, &[secret]);
        let addr = proc.listening_addr();
        proc.wait_for_line("registered with the coordinator");
        servers.push((proc, addr.to_string()));
    }
    let meshctl_env = [("RELAYMESH_CA", ca.as_str())];
    let (ok, _, err) = run_with_env(
        "meshctl",
        &[
            "wait",
            "--coordinator",
            &url,
            "--servers",
            "2",
            "--timeout",
            "20",
        ],
        &meshctl_env,
    );
    assert!(ok, "{err}");
    let mut sub = Proc::start_with_env(
        "meshctl",
        &[
            "sub",
            "--coordinator",
            &url,
            "--server",
            &servers[0].1,
            "room/tls",
        ],
        &meshctl_env,
    );
    sub.wait_for_line("subscribed to room/tls");
    let (ok, _, err) = run(
        "meshctl",
        &[
            "pub",
            "--ca",
            &ca,
            "--coordinator",
            &url,
            "--server",
            &servers[1].1,
            "room/tls",
            "over tls",
        ],
    );
    assert!(ok, "{err}");
    let line = sub.next_stdout_line();
    assert!(
        line.starts_with("room/tls\t") && line.ends_with("\tover tls"),
        "{line}"
    );
    // Trusting the system's store only: refused, and told what to do.
    let (ok, _, err) = run("meshctl", &["pub", "--coordinator", &url, "room/tls", "x"]);
    assert!(!ok);
    assert!(err.contains("RELAYMESH_CA"), "{err}");
    // The admin API over https.
    let admin_url = format!("https://{admin_addr}");
    let (ok, out, err) = run_with_env(
        "meshctl",
        &["admin", "--admin", &admin_url, "servers"],
        &[("RELAYMESH_ADMIN_TOKEN", TOKEN), ("RELAYMESH_CA", &ca)],
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("wss://")).count(),
        2,
        "{out}"
    );
    sub.kill();
    for (mut server, _) in servers {
        assert!(server.terminate());
    }
    assert!(coordinator.terminate());
}
