//! Addressable clients: nodes, direct messages and signals, across servers and accounts.

use std::path::PathBuf;

use coordinator::accounts::{Account, AccountsConfig, AccountsFile, StoreKind};
use coordinator::admin::{AdminCommand, Backend};
use coordinator::sql::SqlStore;
use relaymesh_client::{
    Client, Credentials, ErrorCode, Event, NodeDetails, PresenceChange, SignalKind, SigningKey,
    register_node, update_node,
};
use relaymesh_tests::proxy::Proxy;
use relaymesh_tests::{
    Cluster, CoordinatorHandle, ServerHandle, client_config, coordinator_config, next_event,
    post_json, server_config, within,
};
use serde_json::json;

/// An Ed25519 key login on an `open` coordinator: the key names the node.
fn key_login(seed: u8) -> Credentials {
    Credentials::Key {
        account: "acme".into(),
        key: SigningKey::from_bytes(&[seed; 32]),
        role: String::new(),
        group: String::new(),
    }
}

/// The next direct message of `client`, skipping nothing.
async fn next_direct(client: &mut Client) -> relaymesh_client::Direct {
    match next_event(client).await {
        Event::Direct(d) => d,
        other => panic!("expected a direct message, got {other:?}"),
    }
}

/// The next `Undeliverable` of `client`: (seq, reason).
async fn next_undeliverable(client: &mut Client) -> (u64, ErrorCode) {
    match next_event(client).await {
        Event::Undeliverable { seq, reason, .. } => (seq, reason),
        other => panic!("expected Undeliverable, got {other:?}"),
    }
}

#[tokio::test]
async fn direct_messages_reach_a_node_on_another_server_once_in_order_stamped() {
    let cluster = Cluster::start(3).await;
    let sender = cluster.client_as(0, key_login(1)).await;
    let mut receiver = cluster.client_as(2, key_login(2)).await;
    let to = receiver.node_id();
    assert_eq!(
        to,
        relaymesh_proto::node::id_of_key(
            SigningKey::from_bytes(&[2; 32]).verifying_key().as_bytes()
        )
    );
    assert_ne!(sender.node_id(), to);
    for i in 0..200u32 {
        sender.send(&to, i.to_be_bytes().to_vec()).await.unwrap();
    }
    for i in 0..200u32 {
        let d = next_direct(&mut receiver).await;
        assert_eq!(&d.payload[..], &i.to_be_bytes()[..], "in send order");
        assert_eq!(
            (d.from_node.as_str(), d.from),
            (sender.node_id().as_str(), sender.alias())
        );
    }
    // A client of the account that is no node may send too; the message says so.
    let code = Credentials::AccessCode {
        account: "acme".into(),
        code: "any code will do on an open coordinator".into(),
        role: String::new(),
        group: String::new(),
    };
    let anonymous = cluster.client_as(1, code).await;
    anonymous.send(&to, "from nobody").await.unwrap();
    let d = next_direct(&mut receiver).await;
    assert_eq!(
        (&d.payload[..], d.from_node.as_str()),
        (&b"from nobody"[..], "")
    );
    // Once each: nothing else is waiting.
    receiver.flush().await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), receiver.next_event())
            .await
            .is_err(),
        "nothing more"
    );
    let sent: u64 = {
        let mut total = 0;
        for s in &cluster.servers {
            total += s.stat("direct_sent").await;
        }
        total
    };
    assert_eq!(sent, 201);
}

#[tokio::test]
async fn a_node_logged_in_twice_gets_each_message_on_both_sessions() {
    let cluster = Cluster::start(2).await;
    let mut phone = cluster.client_as(0, key_login(7)).await;
    let mut laptop = cluster.client_as(1, key_login(7)).await;
    assert_eq!(phone.node_id(), laptop.node_id());
    let sender = cluster.client_as(1, key_login(8)).await;
    sender.send(&phone.node_id(), "to both").await.unwrap();
    for device in [&mut phone, &mut laptop] {
        assert_eq!(&next_direct(device).await.payload[..], b"to both");
    }
}

#[tokio::test]
async fn sends_nobody_can_take_are_undeliverable_and_the_session_goes_on() {
    let cluster = Cluster::start(2).await;
    let mut sender = cluster.client_as(0, key_login(3)).await;
    let absent = relaymesh_proto::node::id_of_key(b"never logged in");
    let seq = sender.send(&absent, "hello?").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut sender).await,
        (seq, ErrorCode::NotConnected)
    );
    let seq = sender.send("not-a-node-id", "x").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut sender).await,
        (seq, ErrorCode::UnknownNode)
    );
    let receiver = cluster.client_as(1, key_login(4)).await;
    // Over the payload limit, within the frame limit.
    let big = vec![0u8; 1024 * 1024 - 100];
    let seq = sender.send(&receiver.node_id(), big).await.unwrap();
    assert_eq!(
        next_undeliverable(&mut sender).await,
        (seq, ErrorCode::LimitExceeded)
    );
    // The session is still there: a topic round trip works.
    sender.subscribe(["still/here"]).await.unwrap();
    sender.publish("still/here", "yes").await.unwrap();
    assert!(matches!(next_event(&mut sender).await, Event::Message(m) if &m.payload[..] == b"yes"));
    // And a node topic cannot be subscribed to or published on by name.
    let err = sender
        .publish(&relaymesh_proto::node::topic(&receiver.node_id()), "sneak")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid topic"), "{err}");
    assert_eq!(cluster.servers[0].stat("undeliverable").await, 3);
}

#[tokio::test]
async fn signals_carry_an_offer_answer_and_ice_exchange_and_are_rate_limited() {
    let cluster = Cluster::start_with(2, |c| {
        c.signal_rate_per_s = 1;
        c.signal_burst = 20;
    })
    .await;
    let mut caller = cluster.client_as(0, key_login(5)).await;
    let mut callee = cluster.client_as(1, key_login(6)).await;
    let (caller_id, callee_id) = (caller.node_id(), callee.node_id());
    let expect = |event: Event, kind: SignalKind, payload: &[u8], from: &str| match event {
        Event::Signal(s) => {
            assert_eq!(
                (s.kind, &s.payload[..], s.from_node.as_str()),
                (kind, payload, from)
            );
        }
        other => panic!("expected a signal, got {other:?}"),
    };
    caller
        .signal(&callee_id, SignalKind::Offer, "sdp-offer")
        .await
        .unwrap();
    expect(
        next_event(&mut callee).await,
        SignalKind::Offer,
        b"sdp-offer",
        &caller_id,
    );
    callee
        .signal(&caller_id, SignalKind::Answer, "sdp-answer")
        .await
        .unwrap();
    expect(
        next_event(&mut caller).await,
        SignalKind::Answer,
        b"sdp-answer",
        &callee_id,
    );
    for i in 0..3 {
        let c = format!("candidate-{i}");
        caller
            .signal(&callee_id, SignalKind::IceCandidate, c.clone())
            .await
            .unwrap();
        expect(
            next_event(&mut callee).await,
            SignalKind::IceCandidate,
            c.as_bytes(),
            &caller_id,
        );
        callee
            .signal(&caller_id, SignalKind::IceCandidate, c.clone())
            .await
            .unwrap();
        expect(
            next_event(&mut caller).await,
            SignalKind::IceCandidate,
            c.as_bytes(),
            &callee_id,
        );
    }
    // Signals to nobody are not queued.
    let seq = caller
        .signal(
            &relaymesh_proto::node::id_of_key(b"gone"),
            SignalKind::Init,
            "",
        )
        .await
        .unwrap();
    assert_eq!(
        next_undeliverable(&mut caller).await,
        (seq, ErrorCode::NotConnected)
    );
    // A flood runs into the rate: 5 of the burst of 20 are used, so of 30 more some are refused,
    // and the rest arrive.
    let mut limited = 0;
    let mut sent = Vec::new();
    for _ in 0..30 {
        sent.push(
            caller
                .signal(&callee_id, SignalKind::Custom, "x")
                .await
                .unwrap(),
        );
    }
    caller.flush().await.unwrap();
    while let Ok(Some(event)) =
        tokio::time::timeout(std::time::Duration::from_millis(300), caller.next_event()).await
    {
        if let Event::Undeliverable {
            reason: ErrorCode::RateLimited,
            ..
        } = event
        {
            limited += 1;
        }
    }
    assert!((9..=16).contains(&limited), "rate limited {limited} of 30");
    for _ in 0..30 - limited {
        expect(
            next_event(&mut callee).await,
            SignalKind::Custom,
            b"x",
            &caller_id,
        );
    }
}

/// A temporary accounts file, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("json.lock"));
    }
}

const CODE: &str = "nodes-test-code";

fn account(name: &str) -> Account {
    relaymesh_tests::account_with_code(name, CODE)
}

async fn file_cluster(servers: usize) -> (Cluster, TempFile) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("relaymesh-nodes-{}-{n}.json", std::process::id()));
    AccountsFile {
        accounts: vec![account("acme"), account("globex")],
    }
    .save(&path)
    .unwrap();
    let mut config = coordinator_config();
    config.accounts = AccountsConfig {
        store: StoreKind::File,
        path: Some(path.clone()),
        reload_ms: 50,
        ..AccountsConfig::default()
    };
    (
        Cluster::start_configured(servers, config).await,
        TempFile(path),
    )
}

fn code(account: &str) -> Credentials {
    Credentials::AccessCode {
        account: account.into(),
        code: CODE.into(),
        role: "gcs".into(),
        group: String::new(),
    }
}

#[tokio::test]
async fn a_registered_node_logs_in_with_its_token_updates_itself_and_is_revoked() {
    let (cluster, file) = file_cluster(2).await;
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = code("acme");
    let details = NodeDetails {
        name: "ground station 1".into(),
        location: "hangar 2".into(),
        info: r#"{"battery": 97}"#.into(),
    };
    let node = register_node(&config, details).await.unwrap();
    assert!(
        !format!("{node:?}").contains(&node.token),
        "the token stays out of logs"
    );
    // Only the hash is stored.
    let stored = std::fs::read_to_string(&file.0).unwrap();
    let secret = node.token.split_once('.').unwrap().1;
    assert!(stored.contains(&node.node_id) && !stored.contains(secret));

    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = Credentials::NodeToken(node.token.clone());
    let mut station = Client::connect(config.clone()).await.unwrap();
    assert_eq!(
        station.node_id(),
        node.node_id,
        "the same node at every login"
    );
    let again = update_node(
        &config,
        NodeDetails {
            name: "ground station 1b".into(),
            ..NodeDetails::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(again, node.node_id);
    let stored = std::fs::read_to_string(&file.0).unwrap();
    assert!(stored.contains("ground station 1b"), "{stored}");

    // A client of the account reaches the node by its id.
    let commander = cluster.client_as(1, code("acme")).await;
    commander.send(&node.node_id, "go").await.unwrap();
    assert_eq!(&next_direct(&mut station).await.payload[..], b"go");

    // Over HTTP: register, then update with the token.
    let url = cluster.coordinator.url.replace("ws://", "http://");
    let (status, body) = post_json(
        &format!("{url}/v1/nodes"),
        &json!({"credentials": {"access_code": {"account": "acme", "code": CODE}},
                "name": "drone 9", "info": {"kind": "quad"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    let (status, body) = post_json(
        &format!("{url}/v1/nodes/update"),
        &json!({"credentials": {"node_token": {"token": token}}, "location": "field"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, login) = post_json(
        &format!("{url}/v1/login"),
        &json!({"credentials": {"node_token": {"token": token}}}),
    )
    .await;
    assert_eq!(status, 200, "{login}");
    assert_eq!(login["node_id"], body["node_id"]);
    // Bad info is refused with the field named, and nothing is stored.
    let (status, body) = post_json(
        &format!("{url}/v1/nodes"),
        &json!({"credentials": {"access_code": {"account": "acme", "code": CODE}},
                "info": [1, 2]}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("BAD_FRAME")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("info"), "{body}");

    // Revoked: the token no longer logs in; a wrong token never did.
    Backend::File(file.0.clone())
        .run(AdminCommand::RevokeNode {
            name: "acme".into(),
            id: node.node_id.clone(),
        })
        .await
        .unwrap();
    let listed = Backend::File(file.0.clone())
        .run(AdminCommand::Nodes {
            name: "acme".into(),
        })
        .await
        .unwrap();
    assert!(
        listed.contains(&format!("{}\ttoken (revoked)", node.node_id)),
        "{listed}"
    );
    let refused = within("refusal", async {
        loop {
            match Client::connect(config.clone()).await {
                Err(e) => return e,
                // The running coordinator reloads the file within `reload_ms`.
                Ok(c) => c.close().await,
            }
        }
    })
    .await;
    assert_eq!(refused.code(), Some(ErrorCode::BadCredentials), "{refused}");
    let mut forged = config.clone();
    forged.credentials = Credentials::NodeToken(format!("{}.{}", node.node_id, "0".repeat(64)));
    let refused = Client::connect(forged).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::BadCredentials));
    station.close().await;
}

#[tokio::test]
async fn nodes_of_another_account_cannot_be_reached_or_told_apart_from_absent_ones() {
    let (cluster, _file) = file_cluster(2).await;
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = code("acme");
    let node = register_node(&config, NodeDetails::default())
        .await
        .unwrap();
    config.credentials = Credentials::NodeToken(node.token);
    let mut acme_node = Client::connect(config).await.unwrap();
    let mut rival = cluster.client_as(1, code("globex")).await;
    let seq = rival.send(&node.node_id, "let me in").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut rival).await,
        (seq, ErrorCode::NotConnected)
    );
    let seq = rival
        .send(&relaymesh_proto::node::id_of_key(b"nobody"), "x")
        .await
        .unwrap();
    assert_eq!(
        next_undeliverable(&mut rival).await,
        (seq, ErrorCode::NotConnected)
    );
    // The acme node got nothing: its first message is its own account's.
    let friend = cluster.client_as(0, code("acme")).await;
    friend.send(&node.node_id, "hi").await.unwrap();
    assert_eq!(&next_direct(&mut acme_node).await.payload[..], b"hi");
}

/// The next presence event of `client`: (change, node id, servers).
async fn next_presence(client: &mut Client) -> (PresenceChange, String, Vec<String>) {
    match next_event(client).await {
        Event::Presence { change, node } => (change, node.node_id, node.servers),
        other => panic!("expected a presence event, got {other:?}"),
    }
}

#[tokio::test]
async fn presence_is_cluster_wide_and_follows_logins_updates_and_logouts() {
    let (cluster, _file) = file_cluster(3).await;
    let mut watcher = cluster.client_as(0, code("acme")).await;
    watcher.watch_presence().await.unwrap();
    let mut rival = cluster.client_as(1, code("globex")).await;
    rival.watch_presence().await.unwrap();
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = code("acme");
    let details = NodeDetails {
        name: "Drone Seven".into(),
        location: "north field".into(),
        info: r#"{"battery": 80}"#.into(),
    };
    let node = register_node(&config, details).await.unwrap();
    config.credentials = Credentials::NodeToken(node.token.clone());
    config.preferred_server = Some(cluster.servers[2].id.clone());
    let drone = Client::connect(config.clone()).await.unwrap();
    assert_eq!(
        next_presence(&mut watcher).await,
        (
            PresenceChange::Online,
            node.node_id.clone(),
            vec![cluster.servers[2].id.clone()]
        )
    );
    // Every server lists it, with its stored details; the other account's does not.
    for i in 0..3 {
        let asker = cluster.client_as(i, code("acme")).await;
        let list = relaymesh_tests::eventually("the node listed", || async {
            let list = asker.list_nodes(10, "").await.unwrap();
            (list.total == 1).then_some(list)
        })
        .await;
        let n = &list.nodes[0];
        assert_eq!(
            (
                n.node_id.as_str(),
                n.name.as_str(),
                n.location.as_str(),
                n.info.as_str()
            ),
            (
                node.node_id.as_str(),
                "Drone Seven",
                "north field",
                r#"{"battery": 80}"#
            )
        );
        assert_eq!(asker.list_nodes(10, "FIELD").await.unwrap().total, 1);
        assert_eq!(asker.list_nodes(10, "south").await.unwrap().total, 0);
        asker.close().await;
    }
    let outsider = cluster.client_as(2, code("globex")).await;
    assert_eq!(outsider.list_nodes(10, "").await.unwrap().total, 0);
    // An update reaches watchers as such.
    update_node(
        &config,
        NodeDetails {
            name: "Drone Seven".into(),
            location: "south field".into(),
            info: r#"{"battery": 60}"#.into(),
        },
    )
    .await
    .unwrap();
    match next_event(&mut watcher).await {
        Event::Presence { change, node: n } => {
            assert_eq!(
                (change, n.location.as_str()),
                (PresenceChange::Updated, "south field")
            );
        }
        other => panic!("expected an update, got {other:?}"),
    }
    drone.close().await;
    assert_eq!(
        next_presence(&mut watcher).await,
        (PresenceChange::Offline, node.node_id.clone(), vec![])
    );
    // The other account heard nothing of it.
    rival.flush().await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), rival.next_event())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn list_nodes_is_capped_and_a_fair_random_sample() {
    let cluster = Cluster::start_with(2, |c| c.max_list_nodes = 5).await;
    let mut nodes = Vec::new();
    for seed in 0..20u8 {
        nodes.push(
            cluster
                .client_as(usize::from(seed % 2), key_login(100 + seed))
                .await,
        );
    }
    let asker = cluster.client_as(0, key_login(1)).await;
    relaymesh_tests::eventually("all 21 nodes listed", || async {
        (asker.list_nodes(0, "").await.unwrap().total == 21).then_some(())
    })
    .await;
    // 300 samples of 5 of 21 (capped from 50): each node is expected 71 times; a fair sample
    // puts every count within 35..=110 except with a probability far below one in a million.
    let mut counts = std::collections::HashMap::<String, u32>::new();
    for _ in 0..300 {
        let list = asker.list_nodes(50, "").await.unwrap();
        assert_eq!(
            (list.nodes.len(), list.total),
            (5, 21),
            "capped at max_list_nodes"
        );
        let distinct: std::collections::HashSet<_> =
            list.nodes.iter().map(|n| &n.node_id).collect();
        assert_eq!(distinct.len(), 5, "no node twice in one sample");
        for n in list.nodes {
            *counts.entry(n.node_id).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), 21, "every node turns up");
    for (node, count) in &counts {
        assert!(
            (35..=110).contains(count),
            "node {node} sampled {count} times of an expected 71"
        );
    }
    drop(nodes);
}

#[tokio::test]
async fn the_directory_comes_back_after_a_coordinator_restart() {
    let mut cluster = Cluster::start_restartable(2).await;
    let node = cluster.client_as(1, key_login(42)).await;
    let asker = cluster.client_as(0, key_login(43)).await;
    relaymesh_tests::eventually("both nodes listed", || async {
        (asker.list_nodes(0, "").await.unwrap().total == 2).then_some(())
    })
    .await;
    cluster.coordinator.stop().await;
    cluster.coordinator.start_again(coordinator_config()).await;
    cluster.wait_linked().await;
    let stats = relaymesh_tests::eventually("the directory rebuilt", || async {
        let stats = cluster.coordinator.stats().await;
        (stats["nodes_online"] == 2).then_some(stats)
    })
    .await;
    assert_eq!(stats["nodes_online"], 2);
    let list = asker.list_nodes(0, "").await.unwrap();
    assert!(
        list.nodes.iter().any(|n| n.node_id == node.node_id()),
        "{list:?}"
    );
    // And direct messages never needed the coordinator.
    let mut node = node;
    asker.send(&node.node_id(), "still here").await.unwrap();
    assert_eq!(&next_direct(&mut node).await.payload[..], b"still here");
}

/// A cluster on the `sql` store (a SQLite file) with accounts acme and globex, and the store
/// to look into.
async fn sql_cluster(
    servers: usize,
    tweak: impl Fn(&mut coordinator::Config),
) -> (Cluster, SqlStore, TempFile) {
    let (mut config, db, file) = sql_coordinator().await;
    tweak(&mut config);
    (Cluster::start_configured(servers, config).await, db, file)
}

/// A coordinator config with a fresh SQLite account store holding `acme` and `globex`.
async fn sql_coordinator() -> (coordinator::Config, SqlStore, TempFile) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("relaymesh-inbox-{}-{n}.db", std::process::id()));
    let url = format!("sqlite://{}", path.display());
    let db = SqlStore::connect(&url).await.unwrap();
    for name in ["acme", "globex"] {
        db.put(&account(name)).await.unwrap();
    }
    let mut config = coordinator_config();
    config.accounts = AccountsConfig {
        store: StoreKind::Sql,
        url,
        ..AccountsConfig::default()
    };
    (config, db, TempFile(path))
}

#[tokio::test]
async fn a_node_seen_going_offline_has_the_next_direct_message_stored_and_accepted() {
    // The node's server, b, is reached through a proxy that can hold its peer link up, so its
    // peer a may still route the node's topic to b after the session ended there.
    let (config, _db, _file) = sql_coordinator().await;
    let coordinator = CoordinatorHandle::start(config).await;
    let proxy = Proxy::start().await;
    // Ids decide which of two servers dials the other: a dials b, through the proxy.
    let mut a_config = server_config(&coordinator.url);
    a_config.id = Some("a".into());
    let a = ServerHandle::start(a_config).await;
    let mut b_config = server_config(&coordinator.url);
    b_config.id = Some("b".into());
    b_config.public_url = Some(format!("ws://{}", proxy.addr));
    // The held link, not this timeout, decides when b reports the node gone.
    b_config.subscribe_sync_timeout_ms = 60_000;
    let b = ServerHandle::start(b_config).await;
    proxy.set_upstream(b.addr);
    let cluster = Cluster {
        coordinator,
        servers: vec![a, b],
    };
    cluster.wait_linked().await;
    let (drone, mut config) = node_of(&cluster, "acme", "drone").await;
    config.preferred_server = Some(cluster.servers[1].id.clone());
    let mut station = cluster.client_as(0, code("acme")).await;
    station.watch_presence().await.unwrap();
    let node = Client::connect(config).await.unwrap();
    assert_eq!(
        next_presence(&mut station).await,
        (
            PresenceChange::Online,
            drone.clone(),
            vec![cluster.servers[1].id.clone()]
        )
    );

    proxy.hold_peers(true);
    node.close().await;
    relaymesh_tests::eventually("the node's session ended on b", || async {
        (cluster.servers[1].stat("clients").await == 0).then_some(())
    })
    .await;
    // Until a stopped routing the node's topic to b, nobody hears that the node left.
    let listed = station.list_nodes(10, "").await.unwrap();
    assert_eq!(
        listed.total, 1,
        "reported offline while a still routes to b"
    );
    proxy.hold_peers(false);
    assert_eq!(
        next_presence(&mut station).await,
        (PresenceChange::Offline, drone.clone(), vec![])
    );
    // Heard offline, sent: stored in the node's inbox, and the sender is told so.
    let seq = station.send(&drone, "while away").await.unwrap();
    match next_event(&mut station).await {
        Event::Accepted {
            seq: s, to_node, ..
        } => assert_eq!((s, to_node.as_str()), (seq, drone.as_str())),
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// Registers a node of `account` and returns (its id, a config logging in as it).
async fn node_of(
    cluster: &Cluster,
    account: &str,
    name: &str,
) -> (String, relaymesh_client::ClientConfig) {
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = code(account);
    let details = NodeDetails {
        name: name.into(),
        ..NodeDetails::default()
    };
    let node = register_node(&config, details).await.unwrap();
    config.credentials = Credentials::NodeToken(node.token);
    (node.node_id, config)
}

#[tokio::test]
async fn an_offline_nodes_messages_wait_in_its_inbox_and_arrive_in_order_at_login() {
    let (cluster, db, _file) = sql_cluster(2, |_| {}).await;
    let (drone, mut config) = node_of(&cluster, "acme", "drone").await;
    let mut station = cluster.client_as(0, code("acme")).await;
    // In two halves: a session may have `max_pending_inbox` (1024) waiting to be stored.
    let mut seqs = Vec::new();
    for half in [0..550u32, 550..1_100] {
        let mut sent = Vec::new();
        for i in half {
            sent.push(
                station
                    .send(&drone, i.to_be_bytes().to_vec())
                    .await
                    .unwrap(),
            );
        }
        // Accepted once stored, for every one, and only then confirmed.
        for seq in &sent {
            match next_event(&mut station).await {
                Event::Accepted {
                    seq: s, to_node, ..
                } => {
                    assert_eq!((s, to_node.as_str()), (*seq, drone.as_str()))
                }
                other => panic!("expected Accepted, got {other:?}"),
            }
        }
        seqs.extend(sent);
    }
    station
        .handle()
        .confirmed(*seqs.last().unwrap())
        .await
        .unwrap();
    assert_eq!(db.inbox_count(&drone).await.unwrap(), 1_100);
    // Fewer transactions than messages: writes that queue up together commit together.
    let commits = cluster.coordinator.stats().await["inbox_commits"]
        .as_u64()
        .unwrap();
    assert!(commits < 1_100, "{commits} commits for 1100 messages");

    // At login, in order (more than one page of 1024), each once.
    config.preferred_server = Some(cluster.servers[1].id.clone());
    let mut node = Client::connect(config.clone()).await.unwrap();
    let mut last = 0;
    for i in 0..1_100u32 {
        let d = next_direct(&mut node).await;
        assert_eq!(&d.payload[..], &i.to_be_bytes()[..]);
        assert!(d.inbox_id > last, "inbox order");
        last = d.inbox_id;
        assert_eq!(d.from, station.alias());
    }
    // Acknowledged as they were handed over: the inbox empties.
    relaymesh_tests::eventually("the inbox emptied", || async {
        (db.inbox_count(&drone).await.unwrap() == 0).then_some(())
    })
    .await;
    // Online now: the next message is live, not stored.
    station.send(&drone, "live").await.unwrap();
    let d = next_direct(&mut node).await;
    assert_eq!((&d.payload[..], d.inbox_id), (&b"live"[..], 0));
    node.close().await;
}

#[tokio::test]
async fn an_expired_inbox_message_is_counted_and_reported_to_every_session_of_its_sender() {
    let (cluster, db, _file) = sql_cluster(2, |c| {
        c.inbox.ttl_ms = 1_000;
        c.inbox.sweep_ms = 100;
    })
    .await;
    let (drone, mut drone_config) = node_of(&cluster, "acme", "drone").await;
    let (_, mut station_config) = node_of(&cluster, "acme", "station").await;
    // The station is a node on two devices, one per server; a client that is no node sends too.
    station_config.preferred_server = Some(cluster.servers[0].id.clone());
    let mut sender = Client::connect(station_config.clone()).await.unwrap();
    station_config.preferred_server = Some(cluster.servers[1].id.clone());
    let mut other_device = Client::connect(station_config).await.unwrap();
    let anonymous = cluster.client_as(1, code("acme")).await;
    // Both sessions are in the coordinator's directory (and so in every server's copy).
    relaymesh_tests::eventually("both station sessions known", || async {
        let list = sender.list_nodes(10, "station").await.unwrap();
        (list.nodes.first().is_some_and(|n| n.servers.len() == 2)).then_some(())
    })
    .await;

    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        let seq = sender.send(&drone, text).await.unwrap();
        match next_event(&mut sender).await {
            Event::Accepted {
                seq: s,
                to_node,
                inbox_id,
            } => {
                assert_eq!((s, to_node.as_str()), (seq, drone.as_str()));
                sent.push((seq, inbox_id));
            }
            other => panic!("expected Accepted, got {other:?}"),
        }
    }
    anonymous.send(&drone, "from nobody").await.unwrap();

    // Nobody reads them within the inbox's 1 s (its shortest): each session of the sending node is told,
    // with the number and id its Accepted gave.
    let alias = sender.alias();
    let want: Vec<_> = sent.iter().map(|(s, i)| (*s, *i, alias.clone())).collect();
    for client in [&mut sender, &mut other_device] {
        let mut told = Vec::new();
        while told.len() < 3 {
            match next_event(client).await {
                Event::Expired {
                    to_node,
                    inbox_id,
                    seq,
                    publisher,
                    stored_ms,
                } => {
                    assert_eq!(to_node, drone);
                    assert!(stored_ms > 0);
                    told.push((seq, inbox_id, publisher));
                }
                other => panic!("expected Expired, got {other:?}"),
            }
        }
        told.sort();
        assert_eq!(told, want);
    }
    let stats = relaymesh_tests::eventually("all four expired", || async {
        let stats = cluster.coordinator.stats().await;
        (stats["inbox_expired"].as_u64() == Some(4)).then_some(stats)
    })
    .await;
    // The three of the node were reported; the one from a client that is no node only counted.
    assert_eq!(stats["inbox_expired_reported"].as_u64(), Some(3));
    assert_eq!(db.inbox_count(&drone).await.unwrap(), 0);

    // The drone logs in to an empty inbox: the first thing it gets is live.
    drone_config.preferred_server = Some(cluster.servers[1].id.clone());
    let mut node = Client::connect(drone_config).await.unwrap();
    sender.send(&drone, "live").await.unwrap();
    let d = next_direct(&mut node).await;
    assert_eq!((&d.payload[..], d.inbox_id), (&b"live"[..], 0));
    for client in [sender, other_device, node, anonymous] {
        client.close().await;
    }
}

#[tokio::test]
async fn unacknowledged_inbox_messages_come_again_and_the_application_sees_each_once() {
    let (cluster, db, _file) = sql_cluster(2, |_| {}).await;
    let (drone, mut config) = node_of(&cluster, "acme", "drone").await;
    let mut station = cluster.client_as(0, code("acme")).await;
    for text in ["one", "two", "three"] {
        let seq = station.send(&drone, text).await.unwrap();
        assert!(
            matches!(next_event(&mut station).await, Event::Accepted { seq: s, .. } if s == seq)
        );
    }
    config.auto_ack_inbox = false;
    config.preferred_server = Some(cluster.servers[1].id.clone());
    let mut node = Client::connect(config.clone()).await.unwrap();
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        let d = next_direct(&mut node).await;
        assert_eq!(&d.payload[..], text.as_bytes());
        ids.push(d.inbox_id);
    }
    // Its server goes away before anything is acknowledged: on the next server the inbox is
    // delivered again, and the library drops what the application already has.
    let mut servers = cluster.servers;
    let gone = servers.remove(1);
    gone.stop().await;
    loop {
        match next_event(&mut node).await {
            Event::Reconnected { .. } => break,
            Event::Disconnected { .. } => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    let server = &servers[0];
    relaymesh_tests::eventually("delivered again", || async {
        (server.stat("inbox_delivered").await >= 3).then_some(())
    })
    .await;
    station.send(&drone, "four").await.unwrap();
    let d = next_direct(&mut node).await;
    assert_eq!(
        (&d.payload[..], d.inbox_id),
        (&b"four"[..], 0),
        "no copy of one, two, three"
    );
    // Acknowledged by hand: deleted. An acknowledgement beyond what was delivered is counted
    // and goes no further.
    node.handle().ack_inbox(ids[2] + 1_000).await.unwrap();
    relaymesh_tests::eventually("deleted", || async {
        (db.inbox_count(&drone).await.unwrap() == 0).then_some(())
    })
    .await;
    assert_eq!(server.stat("inbox_acks_ignored").await, 1);
    node.close().await;
}

#[tokio::test]
async fn full_inboxes_unknown_nodes_and_other_accounts_are_refused_and_nothing_else_is_affected() {
    let (cluster, db, _file) = sql_cluster(2, |c| c.inbox.max_messages = 5).await;
    let (drone, _) = node_of(&cluster, "acme", "drone").await;
    let (other, mut other_config) = node_of(&cluster, "acme", "other").await;
    let (rival, _) = node_of(&cluster, "globex", "rival").await;
    let mut station = cluster.client_as(0, code("acme")).await;
    for _ in 0..5 {
        station.send(&drone, "fits").await.unwrap();
        assert!(matches!(
            next_event(&mut station).await,
            Event::Accepted { .. }
        ));
    }
    let seq = station.send(&drone, "one too many").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut station).await,
        (seq, ErrorCode::InboxFull)
    );
    // Another node's inbox is unaffected.
    station.send(&other, "for other").await.unwrap();
    assert!(matches!(
        next_event(&mut station).await,
        Event::Accepted { .. }
    ));
    // A node of another account, and one nobody registered: the same answer.
    let seq = station.send(&rival, "hello rival").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut station).await,
        (seq, ErrorCode::UnknownNode)
    );
    let seq = station
        .send(&relaymesh_proto::node::id_of_key(b"nobody"), "x")
        .await
        .unwrap();
    assert_eq!(
        next_undeliverable(&mut station).await,
        (seq, ErrorCode::UnknownNode)
    );
    assert_eq!(db.inbox_count(&rival).await.unwrap(), 0);
    assert_eq!(db.inbox_count(&drone).await.unwrap(), 5);
    other_config.preferred_server = Some(cluster.servers[1].id.clone());
    let mut other_node = Client::connect(other_config).await.unwrap();
    assert_eq!(
        &next_direct(&mut other_node).await.payload[..],
        b"for other"
    );
    let stats = cluster.coordinator.stats().await;
    assert_eq!(
        (
            stats["inbox_stored"].as_u64(),
            stats["inbox_refused"].as_u64()
        ),
        (Some(6), Some(3))
    );
}

#[tokio::test]
async fn without_a_database_or_a_coordinator_nothing_is_accepted_that_was_not_written() {
    use sqlx::Connection as _;
    let (cluster, db, file) = sql_cluster(2, |_| {}).await;
    let (drone, _) = node_of(&cluster, "acme", "drone").await;
    let mut station = cluster.client_as(0, code("acme")).await;
    // Another writer holds the database (as a database that does not answer would): the
    // inbox write fails after the busy timeout, and the sender hears UNAVAILABLE.
    let url = format!("sqlite://{}", file.0.display());
    let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .unwrap();
    let seq = station.send(&drone, "not now").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut station).await,
        (seq, ErrorCode::Unavailable)
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    assert_eq!(db.inbox_count(&drone).await.unwrap(), 0);
    // Back: stored again.
    station.send(&drone, "now").await.unwrap();
    assert!(matches!(
        next_event(&mut station).await,
        Event::Accepted { .. }
    ));
    assert_eq!(cluster.coordinator.stats().await["inbox_refused"], 1);
}

#[tokio::test]
async fn a_send_for_an_offline_node_while_the_coordinator_is_away_is_unavailable() {
    let mut cluster = Cluster::start_restartable(2).await;
    let mut station = cluster.client_as(0, key_login(9)).await;
    let mut awake = cluster.client_as(1, key_login(10)).await;
    let offline = relaymesh_proto::node::id_of_key(b"asleep");
    cluster.coordinator.stop().await;
    relaymesh_tests::eventually("the coordinator link down", || async {
        (cluster.servers[0].stats().await["coordinator_connected"] == false).then_some(())
    })
    .await;
    let seq = station.send(&offline, "anyone?").await.unwrap();
    assert_eq!(
        next_undeliverable(&mut station).await,
        (seq, ErrorCode::Unavailable)
    );
    // Online nodes do not need the coordinator.
    station.send(&awake.node_id(), "hello").await.unwrap();
    assert_eq!(&next_direct(&mut awake).await.payload[..], b"hello");
    cluster.coordinator.start_again(coordinator_config()).await;
}
