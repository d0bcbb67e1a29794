//! Several coordinators serving one cluster: every comm server registers with each, a login
//! through either reaches the same mesh, what must be agreed between them (one session per
//! client id, the directory of online nodes) is, and clients fail over when one dies.

use relaymesh_client::{Client, Credentials, Event, NodeDetails, PresenceChange, register_node};
use relaymesh_tests::process::{Proc, temp_dir};
use relaymesh_tests::{
    CoordinatorHandle, ServerHandle, TempAccounts, client_config, eventually, get_json, next_event,
    next_message, restartable_addr, server_config, within,
};

const CODE: &str = "coordinators-test-code";

/// An accounts file with account `acme`, shared by the coordinators of a test.
fn accounts() -> TempAccounts {
    TempAccounts::new(vec![relaymesh_tests::account_with_code("acme", CODE)])
}

fn code() -> Credentials {
    Credentials::AccessCode {
        account: "acme".into(),
        code: CODE.into(),
        role: "agent".into(),
        group: String::new(),
    }
}

/// `n` comm servers registering with both coordinators; waits until each coordinator lists
/// every one and each is linked to the others and registered with both.
async fn servers_of(a: &CoordinatorHandle, b: &CoordinatorHandle, n: usize) -> Vec<ServerHandle> {
    let list = format!("{},{}", a.url, b.url);
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(ServerHandle::start(server_config(&list)).await);
    }
    for coordinator in [a, b] {
        eventually("every server registered with each coordinator", || async {
            (coordinator.server_ids().await.len() == n).then_some(())
        })
        .await;
    }
    for server in &servers {
        eventually("linked to every peer, registered with both", || async {
            (server.stat("peers").await as usize == n - 1
                && server.stat("coordinators_connected").await == 2)
                .then_some(())
        })
        .await;
    }
    servers
}

/// A client through the coordinators at `coordinators` (comma-separated), on server `on`.
async fn client(coordinators: &str, on: &ServerHandle, id: Option<&str>) -> Client {
    let mut config = client_config(coordinators);
    config.credentials = code();
    config.preferred_server = Some(on.id.clone());
    config.client_id = id.map(str::to_owned);
    let client = Client::connect(config).await.unwrap();
    assert_eq!(client.server_id(), on.id);
    client
}

#[tokio::test]
async fn two_coordinators_serve_one_mesh_and_agree_on_one_session_per_client_id() {
    let accounts = accounts();
    let a = CoordinatorHandle::start(accounts.coordinator_config()).await;
    let b = CoordinatorHandle::start(accounts.coordinator_config()).await;
    let servers = servers_of(&a, &b, 3).await;
    // Each server's links: one registered with each coordinator, one of them the primary.
    for server in &servers {
        let links = server.stats().await["coordinator_links"].clone();
        let links = links.as_array().unwrap();
        assert_eq!(links.len(), 2, "{links:?}");
        assert!(links.iter().all(|l| l["registered"] == true), "{links:?}");
        let primaries = links.iter().filter(|l| l["primary"] == true).count();
        assert_eq!(primaries, 1, "{links:?}");
        assert_ne!(links[0]["coordinator_id"], links[1]["coordinator_id"]);
    }
    // A subscriber logged in through A hears a publisher logged in through B, across servers.
    let mut sub = client(&a.url, &servers[0], None).await;
    sub.subscribe(["room/x"]).await.unwrap();
    let publisher = client(&b.url, &servers[2], None).await;
    publisher.publish("room/x", "through b").await.unwrap();
    assert_eq!(&next_message(&mut sub).await.payload[..], b"through b");

    // One session per client id: a login through B replaces a session made through A (every
    // coordinator tells every server, and the login's number orders them).
    let mut older = client(&a.url, &servers[0], Some("drone-7")).await;
    let newer = client(&b.url, &servers[1], Some("drone-7")).await;
    let reason = relaymesh_tests::replaced_reason(&mut older).await;
    assert!(reason.contains("REPLACED"), "{reason}");
    assert_eq!(servers[0].stat("replaced").await, 1);
    // And back the other way.
    let mut newest = client(&a.url, &servers[2], Some("drone-7")).await;
    eventually("the session made through B replaced", || async {
        (servers[1].stat("replaced").await == 1).then_some(())
    })
    .await;
    newest.subscribe(["room/x"]).await.unwrap();
    publisher.publish("room/x", "still one mesh").await.unwrap();
    assert_eq!(
        &next_message(&mut newest).await.payload[..],
        b"still one mesh"
    );
    drop(newer);
}

#[tokio::test]
async fn presence_comes_once_and_survives_the_primary_coordinator_going_away() {
    let accounts = accounts();
    let mut a = CoordinatorHandle::start(accounts.coordinator_config()).await;
    let b = CoordinatorHandle::start(accounts.coordinator_config()).await;
    let servers = servers_of(&a, &b, 2).await;
    let both = format!("{},{}", a.url, b.url);
    let mut watcher = client(&both, &servers[1], None).await;
    watcher.watch_presence().await.unwrap();
    // A node registered and logged in through A, on the other server.
    let mut config = client_config(&a.url);
    config.credentials = code();
    let node = register_node(
        &config,
        NodeDetails {
            name: "drone".into(),
            ..NodeDetails::default()
        },
    )
    .await
    .unwrap();
    config.credentials = Credentials::NodeToken(node.token.clone());
    config.preferred_server = Some(servers[0].id.clone());
    let drone = Client::connect(config).await.unwrap();
    // Both coordinators tell the watcher's server; the watcher hears it once.
    let presence = |event: Event| match event {
        Event::Presence { change, node } => (change, node.node_id),
        other => panic!("expected a presence event, got {other:?}"),
    };
    assert_eq!(
        presence(next_event(&mut watcher).await),
        (PresenceChange::Online, node.node_id.clone())
    );
    watcher.flush().await.unwrap();
    assert!(quiet(&mut watcher).await, "a second copy of the event");
    // A goes: servers whose primary it was take B's directory, which agrees: no event.
    a.stop().await;
    for server in &servers {
        eventually("registered with B only", || async {
            (server.stat("coordinators_connected").await == 1).then_some(())
        })
        .await;
    }
    assert!(quiet(&mut watcher).await, "an event from the handover");
    let listed = watcher.list_nodes(10, "").await.unwrap();
    assert_eq!(listed.total, 1);
    // And B alone carries the news from now on.
    drone.close().await;
    assert_eq!(
        presence(next_event(&mut watcher).await),
        (PresenceChange::Offline, node.node_id.clone())
    );
}

/// Whether `client` has no event for a while (after a flush: what was due has come).
async fn quiet(client: &mut Client) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(300), client.next_event())
        .await
        .is_err()
}

// ---- real processes ----

/// A coordinator process on `addr` with the test accounts file.
fn coordinator_proc(
    addr: std::net::SocketAddr,
    accounts: &TempAccounts,
    dir: &std::path::Path,
) -> Proc {
    let config = dir.join(format!("coordinator-{}.toml", addr.port()));
    std::fs::write(
        &config,
        format!(
            "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\n\n[accounts]\nstore = \"file\"\npath = {:?}\nreload_ms = 50\n",
            accounts.path()
        ),
    )
    .unwrap();
    let mut proc = Proc::start(
        "coordinator",
        &[
            "--listen",
            &addr.to_string(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    proc.wait_for_line("coordinator listening on");
    proc
}

/// A comm server process registering with `coordinators`, on a free port; its address.
fn server_proc(coordinators: &str, config: &std::path::Path) -> (Proc, std::net::SocketAddr) {
    let mut proc = Proc::start(
        "commserver",
        &[
            "--coordinator",
            coordinators,
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let addr = proc.listening_addr();
    (proc, addr)
}

/// Peer link numbers of the server at `addr`: (peer, link).
async fn peer_links(addr: std::net::SocketAddr) -> Vec<(String, u64)> {
    let stats = get_json(&format!("http://{addr}/v1/stats")).await;
    let mut links: Vec<(String, u64)> = stats["peer_links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_owned(),
                p["link"].as_u64().unwrap(),
            )
        })
        .collect();
    links.sort();
    links
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_go_on_through_the_other_coordinator_after_a_kill_9_and_it_catches_up() {
    let accounts = accounts();
    let dir = temp_dir("kill-coordinator");
    let (a_addr, b_addr) = (restartable_addr(), restartable_addr());
    let mut a = coordinator_proc(a_addr, &accounts, &dir);
    let _b = coordinator_proc(b_addr, &accounts, &dir);
    let both = format!("ws://{a_addr},ws://{b_addr}");
    let server_toml = dir.join("server.toml");
    std::fs::write(
        &server_toml,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\nreconnect_min_ms = 20\ncoordinator_reconnect_max_ms = 200\n",
    )
    .unwrap();
    let servers: Vec<_> = (0..3).map(|_| server_proc(&both, &server_toml)).collect();
    let tls = relaymesh_net::tls::Connector::default();
    within(
        "the cluster ready on both coordinators",
        relaymesh_client::cluster::wait_ready(&both, 3, &tls, std::time::Duration::from_secs(20)),
    )
    .await
    .unwrap();
    let ids: Vec<String> = servers.iter().map(|(_, addr)| addr.to_string()).collect();
    let on = |i: usize| {
        let mut config = client_config(&both);
        config.credentials = code();
        config.preferred_server = Some(ids[i].clone());
        config
    };
    let mut sub = Client::connect(on(0)).await.unwrap();
    sub.subscribe(["fleet/x"]).await.unwrap();
    let publisher = Client::connect(on(1)).await.unwrap();
    publisher.publish("fleet/x", "before").await.unwrap();
    assert_eq!(&next_message(&mut sub).await.payload[..], b"before");
    // One session per client id across the two processes: a login through B alone replaces
    // the session made through A alone.
    let through = |coordinator: std::net::SocketAddr, i: usize| {
        let mut config = client_config(&format!("ws://{coordinator}"));
        config.credentials = code();
        config.client_id = Some("drone-7".into());
        config.preferred_server = Some(ids[i].clone());
        config
    };
    let mut older = Client::connect(through(a_addr, 0)).await.unwrap();
    let newer = Client::connect(through(b_addr, 2)).await.unwrap();
    let reason = relaymesh_tests::replaced_reason(&mut older).await;
    assert!(reason.contains("REPLACED"), "{reason}");
    newer.close().await;
    let links_before = [
        peer_links(servers[0].1).await,
        peer_links(servers[1].1).await,
        peer_links(servers[2].1).await,
    ];

    a.kill();
    // Logins through the list that names the dead coordinator first: each one fails over to
    // B, and no error reaches the application.
    for i in 0..10 {
        let mut client = Client::connect(on(i % 3)).await.unwrap();
        client.subscribe([format!("fleet/{i}")]).await.unwrap();
        publisher
            .publish(&format!("fleet/{i}"), "after")
            .await
            .unwrap();
        assert_eq!(&next_message(&mut client).await.payload[..], b"after");
        client.close().await;
    }
    // So does meshctl.
    let (ok, out, err) = relaymesh_tests::process::run(
        "meshctl",
        &[
            "pub",
            "--coordinator",
            &both,
            "--account",
            "acme",
            "--code",
            CODE,
            "--role",
            "agent",
            "fleet/x",
            "from meshctl",
        ],
    );
    assert!(ok, "meshctl pub failed: {out}{err}");
    // Existing clients and peer links are untouched.
    assert_eq!(&next_message(&mut sub).await.payload[..], b"from meshctl");
    publisher.publish("fleet/x", "during").await.unwrap();
    assert_eq!(&next_message(&mut sub).await.payload[..], b"during");
    for (i, (_, addr)) in servers.iter().enumerate() {
        assert_eq!(
            peer_links(*addr).await,
            links_before[i],
            "server {i}'s peer links changed"
        );
        let stats = get_json(&format!("http://{addr}/v1/stats")).await;
        assert_eq!(stats["coordinators_connected"], 1, "{stats}");
        assert_eq!(stats["coordinator_connected"], true);
    }

    // A comes back on its address and catches up: every server registers with it again.
    let _a = coordinator_proc(a_addr, &accounts, &dir);
    eventually("the restarted coordinator lists every server", || async {
        let stats = get_json(&format!("http://{a_addr}/v1/stats")).await;
        (stats["servers"].as_array().map(Vec::len) == Some(3)).then_some(())
    })
    .await;
    for (_, addr) in &servers {
        eventually("registered with both again", || async {
            let stats = get_json(&format!("http://{addr}/v1/stats")).await;
            (stats["coordinators_connected"] == 2).then_some(())
        })
        .await;
    }
    let mut config = client_config(&format!("ws://{a_addr}"));
    config.credentials = code();
    let mut late = Client::connect(config).await.unwrap();
    late.subscribe(["fleet/x"]).await.unwrap();
    publisher.publish("fleet/x", "all back").await.unwrap();
    assert_eq!(&next_message(&mut late).await.payload[..], b"all back");
    assert_eq!(&next_message(&mut sub).await.payload[..], b"all back");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `commserver` with `/etc/hosts` replaced, for this process only, by `hosts` (a mount
/// namespace of its own, with the file bind-mounted over `/etc/hosts`): a name that resolves to
/// several addresses without touching the machine's resolver. Needs root (CI runs as root).
fn server_with_hosts(hosts: &std::path::Path, args: &[&str]) -> Proc {
    let binary = relaymesh_tests::process::binary("commserver");
    let script = format!(
        "mount --bind {} /etc/hosts && exec {} \"$@\"",
        hosts.display(),
        binary.display()
    );
    let mut all = vec!["--mount", "--", "sh", "-c", script.as_str(), "commserver"];
    all.extend_from_slice(args);
    Proc::start_program("unshare", &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_registers_with_every_address_a_coordinator_name_resolves_to() {
    let accounts = accounts();
    let dir = temp_dir("dns-coordinators");
    // Two coordinators on one port of two loopback addresses, as two pods behind one name.
    let first = restartable_addr();
    let second = std::net::SocketAddr::from(([127, 0, 0, 2], first.port()));
    let _a = coordinator_proc(first, &accounts, &dir);
    let _b = coordinator_proc(second, &accounts, &dir);
    let hosts = dir.join("hosts");
    let name = "coordinators.relaymesh.test";
    let write_hosts = |addrs: &[&str]| {
        let text: String = addrs.iter().map(|a| format!("{a} {name}\n")).collect();
        // In place (same inode): the bind mount shows the new text.
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{text}")).unwrap();
    };
    write_hosts(&["127.0.0.1", "127.0.0.2"]);
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        "coordinator_resolve_ms = 200\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\n",
    )
    .unwrap();
    let url = format!("ws://{name}:{}", first.port());
    let mut server = server_with_hosts(
        &hosts,
        &[
            "--coordinator",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let addr = server.listening_addr();
    let listed = |coordinator: std::net::SocketAddr| async move {
        let stats = get_json(&format!("http://{coordinator}/v1/stats")).await;
        stats["servers"].as_array().map_or(0, Vec::len)
    };
    for coordinator in [first, second] {
        eventually("registered with each address of the name", || async {
            (listed(coordinator).await == 1).then_some(())
        })
        .await;
    }
    let stats = get_json(&format!("http://{addr}/v1/stats")).await;
    let mut links: Vec<String> = stats["coordinator_links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    links.sort();
    assert_eq!(
        links,
        [format!("{url} ({first})"), format!("{url} ({second})")]
    );
    // The name drops an address: the server leaves that coordinator...
    write_hosts(&["127.0.0.1"]);
    eventually("left the address the name no longer has", || async {
        (listed(second).await == 0).then_some(())
    })
    .await;
    assert_eq!(listed(first).await, 1);
    // ...and registers again when it comes back.
    write_hosts(&["127.0.0.1", "127.0.0.2"]);
    eventually("registered with the address again", || async {
        (listed(second).await == 1).then_some(())
    })
    .await;
    server.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole rolling upgrade of a deployment, as Kubernetes runs one (SIGTERM, wait for the
/// exit, start the new one at the same address): every comm server in turn (each drains
/// first, so its clients move), then every coordinator in turn, while the simulation drives
/// the cluster through both coordinators. Nothing is lost, nothing arrives twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_of_every_server_and_coordinator_loses_nothing() {
    let dir = temp_dir("rolling-upgrade");
    let coordinator_toml = dir.join("coordinator.toml");
    std::fs::write(
        &coordinator_toml,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\n",
    )
    .unwrap();
    let coordinators = [restartable_addr(), restartable_addr()];
    let start_coordinator = |addr: std::net::SocketAddr| {
        let mut proc = Proc::start(
            "coordinator",
            &[
                "--listen",
                &addr.to_string(),
                "--config",
                coordinator_toml.to_str().unwrap(),
            ],
        );
        proc.wait_for_line("coordinator listening on");
        proc
    };
    let mut coordinator_procs: Vec<Proc> =
        coordinators.iter().map(|a| start_coordinator(*a)).collect();
    let both = format!("ws://{},ws://{}", coordinators[0], coordinators[1]);
    let server_toml = dir.join("server.toml");
    std::fs::write(
        &server_toml,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\nreconnect_min_ms = 20\n\
         coordinator_reconnect_max_ms = 200\n",
    )
    .unwrap();
    let servers: Vec<std::net::SocketAddr> = (0..3).map(|_| restartable_addr()).collect();
    let start_server = |i: usize| {
        let mut proc = Proc::start(
            "commserver",
            &[
                "--coordinator",
                &both,
                "--listen",
                &servers[i].to_string(),
                "--id",
                &format!("s{i}"),
                "--config",
                server_toml.to_str().unwrap(),
            ],
        );
        proc.wait_for_line("registered with the coordinator");
        proc
    };
    let mut server_procs: Vec<Proc> = (0..3).map(start_server).collect();
    let tls = relaymesh_net::tls::Connector::default();
    let ready = || {
        relaymesh_client::cluster::wait_ready(&both, 3, &tls, std::time::Duration::from_secs(20))
    };
    within("the cluster ready", ready()).await.unwrap();

    let report = dir.join("report.json");
    let mut simulation = Proc::start(
        "simulation",
        &[
            "--coordinator",
            &both,
            "--clients",
            "60",
            "--room-size",
            "6",
            "--duration",
            "15",
            "--check",
            "--quiet",
            "--json",
            report.to_str().unwrap(),
        ],
    );
    // Its clients are connected: the upgrade starts under load.
    eventually("the simulation's clients connected", || async {
        let mut clients = 0;
        for server in &servers {
            clients += get_json(&format!("http://{server}/v1/stats")).await["clients"]
                .as_u64()
                .unwrap_or(0);
        }
        (clients >= 60).then_some(())
    })
    .await;
    for (i, server) in server_procs.iter_mut().enumerate() {
        assert!(server.terminate(), "server s{i} did not stop cleanly");
        *server = start_server(i);
        within("the cluster ready again", ready()).await.unwrap();
    }
    for (coordinator, addr) in coordinator_procs.iter_mut().zip(coordinators) {
        assert!(
            coordinator.terminate(),
            "coordinator {addr} did not stop cleanly"
        );
        *coordinator = start_coordinator(addr);
        within("the cluster ready again", ready()).await.unwrap();
    }
    let status = simulation.wait_exit_within(std::time::Duration::from_secs(90));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
    let outcome = &json;
    assert!(
        status.success(),
        "the simulation's check failed: {outcome}\n{}",
        simulation.seen.join("\n")
    );
    assert_eq!(outcome["lost"], 0, "{outcome}");
    assert!(outcome["delivered"].as_u64().unwrap_or(0) > 0, "{outcome}");
    // The drains moved clients (each server had some when it was stopped).
    assert!(outcome["moves"].as_u64().unwrap_or(0) > 0, "{outcome}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A coordinator that answers every request at once with `body` and status `status`, the way
/// one that has run out of file descriptors does; its address.
async fn answering(status: &'static str, body: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// A coordinator in trouble (a 5xx answer, whatever its code) hands the login to the next one
/// in the list; when none can place it, the client hears the first coordinator's answer, not
/// the last one's connection failure.
#[tokio::test]
async fn a_coordinator_in_trouble_hands_logins_to_the_next_and_its_answer_is_kept() {
    let cluster = relaymesh_tests::Cluster::start(1).await;
    let full = answering(
        "503 Service Unavailable",
        r#"{"code":"SERVER_FULL","message":"this process is out of file descriptors; try again later"}"#,
    )
    .await;
    let list = format!("ws://{full},{}", cluster.coordinator.url);
    let client = within(
        "a login through the list",
        Client::connect(client_config(&list)),
    )
    .await
    .unwrap();
    assert_eq!(client.server_id(), cluster.servers[0].id);
    client.close().await;

    // A coordinator with no server to offer, then one that is not there.
    let empty = CoordinatorHandle::start(relaymesh_tests::coordinator_config()).await;
    let list = format!("{},ws://127.0.0.1:1", empty.url);
    let refused = within("a refused login", Client::connect(client_config(&list)))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(relaymesh_proto::v1::ErrorCode::NoServerAvailable),
        "{refused}"
    );
}
