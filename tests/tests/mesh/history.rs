//! Topic history end to end: clients that lose their server recover what was published while
//! they were away (exactly once, in order, or with a gap they are told of), late joiners read
//! a backlog, and history stays within its account and the role's rules.

use std::collections::BTreeMap;

use coordinator::accounts::RoleRules;
use relaymesh_client::{
    Client, ClientError, Credentials, ErrorCode, Event, HistoryQuery, Message, Position,
};
use relaymesh_tests::{
    Cluster, TempAccounts, account_with_code, coordinator_config, next_messages, within,
};

const CODE: &str = "history-test-code";

fn history_on(config: &mut commserver::Config) {
    config.history.topics = vec!["chat/#".into()];
}

fn payloads(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

fn numbers(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

async fn publish_numbers(client: &Client, topic: &str, range: std::ops::Range<u32>) {
    for i in range {
        client.publish(topic, i.to_string()).await.unwrap();
    }
    client.flush().await.unwrap();
}

/// What a client got from its reconnect to the end of the recovery of `topic`: the messages,
/// the recovered count and the gap, if one was reported.
#[derive(Debug, Default)]
struct Recovery {
    messages: Vec<Message>,
    count: u64,
    gap: Option<u64>,
}

async fn until_recovered(client: &mut Client, topic: &str) -> Recovery {
    within("recovery", async {
        let mut got = Recovery::default();
        loop {
            match client.next_event().await.expect("client closed") {
                Event::Message(m) => got.messages.push(m),
                Event::RecoveryGap {
                    topic: t,
                    missed_at_least,
                } if t == topic => got.gap = Some(missed_at_least),
                Event::Recovered { topic: t, count } if t == topic => {
                    got.count = count;
                    return got;
                }
                Event::Disconnected { .. } | Event::Reconnected { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
}

async fn disconnected(client: &mut Client) {
    within("disconnect", async {
        loop {
            if let Event::Disconnected { .. } = client.next_event().await.expect("client closed") {
                return;
            }
        }
    })
    .await;
}

/// The subscriber's server dies while the coordinator is away too, so it cannot come back
/// before the publisher (on another server) has sent 200 more: they all come in the recovery,
/// once each and in order, and live messages follow.
#[tokio::test]
async fn a_subscriber_whose_server_dies_recovers_what_was_published_meanwhile() {
    let mut cluster = Cluster::start_restartable_with(3, history_on).await;
    let mut sub = cluster.client_on(0).await;
    sub.subscribe(["chat/room"]).await.unwrap();
    let publisher = cluster.client_on(1).await;
    publish_numbers(&publisher, "chat/room", 0..100).await;
    let before = next_messages(&mut sub, 100).await;
    assert_eq!(payloads(&before), numbers(0..100));
    assert!(before.iter().all(|m| m.position.is_some()));

    cluster.coordinator.stop().await;
    cluster.servers.remove(0).stop().await;
    disconnected(&mut sub).await;
    publish_numbers(&publisher, "chat/room", 100..300).await;
    cluster.coordinator.start_again(coordinator_config()).await;

    let recovery = until_recovered(&mut sub, "chat/room").await;
    assert_eq!(payloads(&recovery.messages), numbers(100..300));
    assert_eq!((recovery.count, recovery.gap), (200, None));
    publish_numbers(&publisher, "chat/room", 300..310).await;
    assert_eq!(
        payloads(&next_messages(&mut sub, 10).await),
        numbers(300..310)
    );
}

/// Publisher and subscriber share the server that dies; the publisher keeps publishing while
/// it reconnects (its outbound queue holds the publishes): the subscriber gets every message
/// once, in the publisher's order, whichever servers they land on.
#[tokio::test]
async fn publishes_queued_while_their_client_reconnects_keep_their_place() {
    let mut cluster = Cluster::start_restartable_with(3, history_on).await;
    let mut sub = cluster.client_on(0).await;
    sub.subscribe(["chat/ops"]).await.unwrap();
    let mut publisher = cluster.client_on(0).await;
    publish_numbers(&publisher, "chat/ops", 0..50).await;
    assert_eq!(payloads(&next_messages(&mut sub, 50).await), numbers(0..50));

    cluster.coordinator.stop().await;
    cluster.servers.remove(0).stop().await;
    disconnected(&mut publisher).await;
    for i in 50..150 {
        publisher.publish("chat/ops", i.to_string()).await.unwrap();
    }
    cluster.coordinator.start_again(coordinator_config()).await;
    publisher.flush().await.unwrap();
    let mut got = until_recovered(&mut sub, "chat/ops").await.messages;
    let rest = 100 - got.len();
    got.extend(next_messages(&mut sub, rest).await);
    assert_eq!(payloads(&got), numbers(50..150));
}

/// A history too short for the time away: the newest are recovered and the gap says how many
/// are gone.
#[tokio::test]
async fn a_history_too_short_reports_the_gap_with_its_lower_bound() {
    let mut cluster = Cluster::start_restartable_with(2, |c| {
        history_on(c);
        c.history.max_messages = 10;
    })
    .await;
    let mut sub = cluster.client_on(0).await;
    sub.subscribe(["chat/short"]).await.unwrap();
    let publisher = cluster.client_on(1).await;
    publish_numbers(&publisher, "chat/short", 0..5).await;
    next_messages(&mut sub, 5).await;

    cluster.coordinator.stop().await;
    cluster.servers.remove(0).stop().await;
    disconnected(&mut sub).await;
    publish_numbers(&publisher, "chat/short", 5..55).await;
    cluster.coordinator.start_again(coordinator_config()).await;

    let recovery = until_recovered(&mut sub, "chat/short").await;
    assert_eq!(payloads(&recovery.messages), numbers(45..55));
    assert_eq!((recovery.count, recovery.gap), (10, Some(40)));
}

/// A late joiner reads the backlog from a server that holds none of it (the peers answer),
/// the newest N or what followed a position; and a stream outlives the server that accepted
/// it, in the copy of a server that had subscribers.
#[tokio::test]
async fn late_joiners_read_the_backlog_even_after_its_server_is_gone() {
    let mut cluster = Cluster::start_with(3, history_on).await;
    let publisher = cluster.client_on(0).await;
    // A subscriber on server 1 makes it keep a copy of server 0's stream.
    let mut copier = cluster.client_on(1).await;
    copier.subscribe(["chat/log"]).await.unwrap();
    publish_numbers(&publisher, "chat/log", 0..20).await;
    next_messages(&mut copier, 20).await;

    let reader = cluster.client_on(2).await;
    let page = reader
        .history("chat/log", HistoryQuery::Last(5))
        .await
        .unwrap();
    assert_eq!(payloads(&page.messages), numbers(15..20));
    assert!(!page.gap);
    let all = reader
        .history("chat/log", HistoryQuery::Last(100))
        .await
        .unwrap();
    assert_eq!(payloads(&all.messages), numbers(0..20));
    let tenth: Position = all.messages[9].position.unwrap();
    let page = reader
        .history(
            "chat/log",
            HistoryQuery::Since {
                positions: vec![tenth],
                since_ms: u64::MAX,
            },
        )
        .await
        .unwrap();
    assert_eq!(payloads(&page.messages), numbers(10..20));
    assert!(!page.gap);

    drop(publisher);
    cluster.servers.remove(0).stop().await;
    let page = reader
        .history("chat/log", HistoryQuery::Last(100))
        .await
        .unwrap();
    assert_eq!(payloads(&page.messages), numbers(0..20));
}

fn accounts() -> TempAccounts {
    let mut acme = account_with_code("acme", CODE);
    acme.roles = BTreeMap::from([
        (
            "writer".to_string(),
            RoleRules {
                publish: vec!["chat/#".into()],
                subscribe: vec!["chat/#".into()],
            },
        ),
        (
            "viewer".to_string(),
            RoleRules {
                publish: Vec::new(),
                subscribe: vec!["chat/public".into()],
            },
        ),
    ]);
    TempAccounts::new(vec![acme, account_with_code("globex", CODE)])
}

fn login(account: &str, role: &str) -> Credentials {
    Credentials::AccessCode {
        account: account.into(),
        code: CODE.into(),
        role: role.into(),
        group: String::new(),
    }
}

fn refusal(result: Result<relaymesh_client::HistoryPage, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused(e)) => e.error_code(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// History stays in its account and within the role's subscribe rules, and bad requests are
/// answered clearly without harm to the connection.
#[tokio::test]
async fn history_is_per_account_within_role_rules_and_bad_requests_are_answered() {
    let accounts = accounts();
    let cluster = Cluster::start_full(2, accounts.coordinator_config(), |c| {
        history_on(c);
        c.history.requests_per_s = 1;
        c.history.request_burst = 8;
    })
    .await;
    let writer = cluster.client_as(0, login("acme", "writer")).await;
    publish_numbers(&writer, "chat/secret", 0..5).await;
    publish_numbers(&writer, "chat/public", 0..3).await;

    let other = cluster.client_as(1, login("globex", "")).await;
    let page = other
        .history("chat/secret", HistoryQuery::Last(10))
        .await
        .unwrap();
    assert!(page.messages.is_empty(), "another account's history");

    let viewer = cluster.client_as(1, login("acme", "viewer")).await;
    let code = refusal(viewer.history("chat/secret", HistoryQuery::Last(10)).await);
    assert_eq!(code, ErrorCode::Forbidden);
    let public = viewer
        .history("chat/public", HistoryQuery::Last(10))
        .await
        .unwrap();
    assert_eq!(payloads(&public.messages), numbers(0..3));

    let code = refusal(other.history("nohistory/x", HistoryQuery::Last(1)).await);
    assert_eq!(code, ErrorCode::NotFound);
    let reader = cluster.client_as(1, login("acme", "writer")).await;
    let secret = reader
        .history("chat/secret", HistoryQuery::Last(10))
        .await
        .unwrap();
    let stream = secret.messages[0].position.unwrap().stream;
    // A position ahead of its stream.
    let ahead = Position {
        stream,
        offset: 1_000,
        published_ms: 0,
    };
    let since = |p: Position| HistoryQuery::Since {
        positions: vec![p],
        since_ms: u64::MAX,
    };
    let code = refusal(reader.history("chat/secret", since(ahead)).await);
    assert_eq!(code, ErrorCode::BadFrame);
    // A stream no server has, and a position from another topic, are gaps of unknown size.
    let forged = Position {
        stream: 42,
        offset: 1,
        published_ms: 0,
    };
    let other_topic = public.messages[0].position.unwrap();
    for position in [forged, other_topic] {
        let page = reader
            .history("chat/secret", since(position))
            .await
            .unwrap();
        assert!(page.messages.is_empty());
        assert!(page.gap);
        assert_eq!(page.missed_at_least, 0);
    }
    // Past the burst: refused for the rate, and the connection goes on.
    let mut refused = false;
    for _ in 0..10 {
        match reader.history("chat/secret", HistoryQuery::Last(1)).await {
            Ok(_) => {}
            Err(ClientError::Refused(e)) if e.error_code() == ErrorCode::RateLimited => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "no request was refused for the rate");
    reader.publish("chat/secret", "still up").await.unwrap();
    reader.flush().await.unwrap();
    assert_eq!(cluster.servers[1].stat("history_gaps").await, 2);
}

/// A deployed cluster of real processes with history on, and the simulation's failover
/// scenario killing one comm server with `kill -9` (its `--kill-command`) and starting another
/// in its place (`--restart-command`): the killed server's clients recover what they missed,
/// nothing is lost without a cause, nothing comes twice.
#[tokio::test]
async fn the_failover_scenario_recovers_across_a_kill_9_of_a_real_process() {
    use relaymesh_tests::process::{Proc, binary, temp_dir};

    let dir = temp_dir("history-failover");
    let coordinator_toml = dir.join("coordinator.toml");
    std::fs::write(
        &coordinator_toml,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\n",
    )
    .unwrap();
    let coordinator = {
        let mut proc = Proc::start(
            "coordinator",
            &[
                "--listen",
                "127.0.0.1:0",
                "--config",
                coordinator_toml.to_str().unwrap(),
            ],
        );
        let addr = proc.listening_addr();
        (proc, format!("ws://{addr}"))
    };
    let (_coordinator, url) = coordinator;
    let server_toml = dir.join("server.toml");
    std::fs::write(
        &server_toml,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\nreconnect_min_ms = 20\n\
         drain_on_shutdown_ms = 0\n\n[history]\ntopics = [\"sim/#\"]\n",
    )
    .unwrap();
    let server_args = |id: &str| {
        vec![
            "--coordinator".to_string(),
            url.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--id".into(),
            id.into(),
            "--config".into(),
            server_toml.to_str().unwrap().into(),
        ]
    };
    let mut servers = Vec::new();
    for i in 0..3 {
        let id = format!("s{i}");
        let args = server_args(&id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = Proc::start("commserver", &args);
        proc.wait_for_line("registered with the coordinator");
        std::fs::write(dir.join(format!("{id}.pid")), proc.child.id().to_string()).unwrap();
        servers.push(proc);
    }
    let tls = relaymesh_net::tls::Connector::default();
    within(
        "the cluster ready",
        relaymesh_client::cluster::wait_ready(&url, 3, &tls, std::time::Duration::from_secs(20)),
    )
    .await
    .unwrap();

    let kill = format!(
        "kill -9 \"$(cat {}/\"$RELAYMESH_SERVER_ID\".pid)\"",
        dir.display()
    );
    let restarted_pid = dir.join("restarted.pid");
    let restart_args = server_args("s3").join(" ");
    let restart = format!(
        "{} {restart_args} >/dev/null 2>&1 & echo $! > {}",
        binary("commserver").display(),
        restarted_pid.display()
    );
    let report = dir.join("report.json");
    let mut simulation = Proc::start(
        "simulation",
        &[
            "--coordinator",
            &url,
            "--scenario",
            "failover",
            "--clients",
            "60",
            "--duration",
            "6",
            "--kill-server-at",
            "2",
            "--restart-after",
            "1",
            "--kill-command",
            &kill,
            "--restart-command",
            &restart,
            "--check",
            "--quiet",
            "--json",
            report.to_str().unwrap(),
        ],
    );
    let status = simulation.wait_exit_within(std::time::Duration::from_secs(90));
    if let Ok(pid) = std::fs::read_to_string(&restarted_pid) {
        let _ = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status();
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
    assert!(
        status.success(),
        "the simulation's check failed: {json}\n{}",
        simulation.seen.join("\n")
    );
    let killed = &json["server_killed"];
    assert!(killed["error"].is_null(), "{json}");
    let victim = killed["server_id"].as_str().unwrap_or_default().to_owned();
    let index: usize = victim.trim_start_matches('s').parse().unwrap();
    // It died of the signal, not by its own hand.
    let exited = servers[index].wait_exit_within(std::time::Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exited),
        Some(9),
        "{victim}"
    );
    assert!(json["recovered"].as_u64().unwrap_or(0) > 0, "{json}");
    assert_eq!(json["lost_by_cause"]["unexplained"], 0, "{json}");
    assert_eq!(json["duplicates"], 0, "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Several clients of one server publishing on one history topic at once: its subscribers
/// there get every message (a stream's offsets reach them in order, so none is taken for a
/// copy), each publisher's in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_on_one_server_lose_nothing_to_the_position_check() {
    let cluster = Cluster::start_with(2, history_on).await;
    let mut sub = cluster.client_on(0).await;
    sub.subscribe(["chat/busy"]).await.unwrap();
    let mut remote = cluster.client_on(1).await;
    remote.subscribe(["chat/busy"]).await.unwrap();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let client = cluster.client_on(0).await;
        publishers.push(tokio::spawn(async move {
            for i in 0..1500 {
                client
                    .publish("chat/busy", format!("{p}:{i}"))
                    .await
                    .unwrap();
            }
            client.flush().await.unwrap();
            client
        }));
    }
    for client in [&mut sub, &mut remote] {
        let got = next_messages(client, 6000).await;
        let mut next = [0u32; 4];
        for m in &got {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let (p, i) = text.split_once(':').unwrap();
            let (p, i): (usize, u32) = (p.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[p], "publisher {p} out of order or missing");
            next[p] += 1;
        }
    }
    for p in publishers {
        drop(p.await.unwrap());
    }
}
