//! Registration, peer discovery, random spread and cross-server delivery.

use std::collections::{BTreeMap, HashMap};

use futures_util::future::join_all;
use relaymesh_client::{Client, Event};
use relaymesh_tests::{Cluster, client_config, eventually, next_messages, within};

#[tokio::test]
async fn three_servers_register_and_form_one_link_per_pair() {
    let cluster = Cluster::start(3).await;
    let stats = cluster.coordinator.stats().await;
    let servers = stats["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 3);
    for s in servers {
        assert!(
            s["url"].as_str().unwrap().starts_with("ws://127.0.0.1:"),
            "{s}"
        );
        assert_eq!(s["clients"], 0);
        assert_eq!(s["draining"], false);
    }
    // Every pair is linked exactly once: one side dialed, the other accepted.
    let mut dialed: BTreeMap<(String, String), u32> = BTreeMap::new();
    for server in &cluster.servers {
        let stats = server.stats().await;
        let links = stats["peer_links"].as_array().unwrap();
        assert_eq!(links.len(), 2, "{stats}");
        for link in links {
            let peer = link["id"].as_str().unwrap().to_owned();
            let pair = if server.id < peer {
                (server.id.clone(), peer)
            } else {
                (peer, server.id.clone())
            };
            *dialed.entry(pair).or_default() += u32::from(link["dialed"].as_bool().unwrap());
        }
    }
    assert_eq!(dialed.len(), 3);
    assert!(dialed.values().all(|n| *n == 1), "{dialed:?}");
}

/// Closing a client sends everything it has queued before the connection closes, even what
/// is still queued behind a full socket when it is closed.
#[tokio::test]
async fn a_closing_client_sends_what_it_has_queued() {
    // 20 MB: more than the socket buffers hold, so most of it is still queued at the close.
    const QUEUED: usize = 2000;
    let padding = "x".repeat(10_000);
    // The listener's server queue holds all of it, so no scheduling of the listener's task can
    // make the server drop (which would be its slow-consumer policy, not what is tested here).
    let cluster = Cluster::start_with(1, |c| c.client_queue_bytes = 64 << 20).await;
    let mut listener = cluster.client_on(0).await;
    listener.subscribe(["log"]).await.unwrap();
    // A subscriber that reads while the sender sends and closes, as an application does.
    let reading = tokio::spawn(async move {
        let got: Vec<String> = next_messages(&mut listener, QUEUED)
            .await
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        got
    });
    let sender = cluster.client_on(0).await;
    for i in 0..QUEUED {
        // Returns once queued, not once sent.
        sender
            .publish("log", format!("{i} {padding}"))
            .await
            .unwrap();
    }
    within("close", sender.close()).await;
    let got = within("messages", reading).await.unwrap();
    let sent: Vec<String> = (0..QUEUED).map(|i| format!("{i} {padding}")).collect();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "messages differ from what was sent");
}

/// Every subscriber on every server gets each message exactly once, in publish order per
/// publisher, with the topic and the server-stamped alias of its publisher.
#[tokio::test]
async fn messages_cross_servers_exactly_once_and_in_order() {
    let cluster = Cluster::start(3).await;
    assert_cross_server_delivery(&cluster).await;
}

/// Two subscribers and one publisher on each of the cluster's servers: every subscriber gets
/// every publisher's 200 messages once each, in order.
pub(crate) async fn assert_cross_server_delivery(cluster: &Cluster) {
    const PER_PUBLISHER: usize = 200;
    let mut subscribers = Vec::new();
    for server in 0..3 {
        for _ in 0..2 {
            let client = cluster.client_on(server).await;
            client.subscribe(["chat/room-1"]).await.unwrap();
            subscribers.push(client);
        }
    }
    let publishers: Vec<Client> = join_all((0..3).map(|s| cluster.client_on(s))).await;
    let aliases: Vec<String> = publishers.iter().map(Client::alias).collect();
    for publisher in &publishers {
        let handle = publisher.handle();
        tokio::spawn(async move {
            for seq in 0..=PER_PUBLISHER {
                // The last message is a marker: anything duplicated would arrive before it.
                let body = if seq == PER_PUBLISHER {
                    "end".to_owned()
                } else {
                    seq.to_string()
                };
                handle.publish("chat/room-1", body).await.unwrap();
            }
        });
    }
    for (i, sub) in subscribers.iter_mut().enumerate() {
        let mut next_seq: HashMap<String, usize> = HashMap::new();
        let mut ended = 0;
        while ended < publishers.len() {
            let event = within("messages", sub.next_event()).await.unwrap();
            let Event::Message(m) = event else {
                panic!("subscriber {i}: unexpected {event:?}")
            };
            assert_eq!(m.topic, "chat/room-1");
            assert!(aliases.contains(&m.from), "unknown sender {}", m.from);
            let expected = next_seq.entry(m.from.clone()).or_default();
            if &m.payload[..] == b"end" {
                assert_eq!(
                    *expected, PER_PUBLISHER,
                    "subscriber {i}: {} ended early",
                    m.from
                );
                ended += 1;
            } else {
                let seq: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                assert_eq!(
                    seq, *expected,
                    "subscriber {i}: {} out of order or duplicated",
                    m.from
                );
                *expected += 1;
            }
        }
    }
}

#[tokio::test]
async fn clients_are_spread_at_random_over_all_servers() {
    let cluster = Cluster::start(3).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        let batch =
            join_all((0..50).map(|_| Client::connect(client_config(&cluster.coordinator.url))))
                .await;
        clients.extend(batch.into_iter().map(Result::unwrap));
    }
    let mut per_server: HashMap<String, usize> = HashMap::new();
    for client in &clients {
        *per_server.entry(client.server_id()).or_default() += 1;
    }
    assert_eq!(per_server.len(), 3, "{per_server:?}");
    // Uniform choice gives ~100 each; below 50 has probability far under 1e-9.
    assert!(per_server.values().all(|n| *n >= 50), "{per_server:?}");
    for server in &cluster.servers {
        let expected = per_server[&server.id] as u64;
        eventually("server counts its clients", || async {
            (server.stat("clients").await == expected).then_some(())
        })
        .await;
    }
    // The coordinator's view catches up with the servers' load reports.
    eventually("coordinator sees 300 clients", || async {
        let stats = cluster.coordinator.stats().await;
        let total: u64 = stats["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["clients"].as_u64().unwrap())
            .sum();
        (total == 300).then_some(())
    })
    .await;
}

/// Peer stats as `(forwards_in, forwards_out)` of `server`'s link to `peer`.
async fn link_counters(cluster: &Cluster, server: usize, peer: usize) -> (u64, u64) {
    let stats = cluster.servers[server].stats().await;
    let link = stats["peer_links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == cluster.servers[peer].id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no link from {server} to {peer}: {stats}"));
    (
        link["forwards_in"].as_u64().unwrap(),
        link["forwards_out"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn forwards_go_only_to_peers_with_interest_and_only_once() {
    let cluster = Cluster::start(3).await;
    let (a, b, c) = (0, 1, 2);
    let mut on_b = cluster.client_on(b).await;
    on_b.subscribe(["only/b"]).await.unwrap();
    let publisher = cluster.client_on(a).await;
    for i in 0..10 {
        publisher.publish("only/b", format!("{i}")).await.unwrap();
    }
    // Nobody anywhere subscribes to this one.
    for _ in 0..10 {
        publisher.publish("nobody/listens", "x").await.unwrap();
    }
    // A marker after the rest: once B has it, everything A sent before has been routed.
    publisher.publish("only/b", "marker").await.unwrap();
    let got = next_messages(&mut on_b, 11).await;
    assert_eq!(got.last().unwrap().payload, "marker");
    assert_eq!(link_counters(&cluster, a, b).await.1, 11);
    assert_eq!(
        link_counters(&cluster, a, c).await.1,
        0,
        "A forwarded to C, which has no subscribers"
    );
    assert_eq!(cluster.servers[c].stat("forwards_in").await, 0);
    assert_eq!(cluster.servers[b].stat("forwards_in").await, 11);

    // With subscribers on B and C, each gets one copy per message; A's own local subscriber
    // gets it without any forward.
    let mut on_c = cluster.client_on(c).await;
    on_c.subscribe(["both"]).await.unwrap();
    on_b.subscribe(["both"]).await.unwrap();
    let mut on_a = cluster.client_on(a).await;
    on_a.subscribe(["both"]).await.unwrap();
    for i in 0..5 {
        publisher.publish("both", format!("{i}")).await.unwrap();
    }
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        let got = next_messages(client, 5).await;
        assert_eq!(
            got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
            ["0", "1", "2", "3", "4"]
        );
    }
    assert_eq!(link_counters(&cluster, a, b).await.1, 16);
    assert_eq!(link_counters(&cluster, a, c).await.1, 5);
    // Forwarded messages are never forwarded again: B and C sent nothing on to each other.
    assert_eq!(link_counters(&cluster, b, c).await, (0, 0));

    // After B's subscriber leaves "only/b", A stops forwarding it.
    on_b.unsubscribe(["only/b"]).await.unwrap();
    publisher.publish("only/b", "unwanted").await.unwrap();
    publisher.publish("both", "marker").await.unwrap();
    next_messages(&mut on_b, 1).await;
    assert_eq!(
        link_counters(&cluster, a, b).await.1,
        17,
        "only the \"both\" marker was forwarded to B"
    );
}

/// The largest payload a client may publish still fits every frame it becomes — the delivered
/// `Message` and the peer `Forward`, which add the alias and envelope — so it crosses servers
/// without resetting the peer link.
#[tokio::test]
async fn the_largest_allowed_payload_crosses_servers() {
    let cluster = Cluster::start_with(2, |c| c.max_frame_bytes = 64 * 1024).await;
    let max_payload = 64 * 1024 - 256 - 1024;
    let mut sub = cluster.client_on(1).await;
    sub.subscribe(["big"]).await.unwrap();
    let links_before = cluster.servers[0].stats().await["peer_links"][0]["link"].clone();
    let publisher = cluster.client_on(0).await;
    publisher
        .publish("big", vec![7u8; max_payload])
        .await
        .unwrap();
    let m = relaymesh_tests::next_message(&mut sub).await;
    assert_eq!(m.payload.len(), max_payload);
    assert_eq!(
        cluster.servers[0].stats().await["peer_links"][0]["link"],
        links_before
    );
}

/// A subscription the server refuses fails that `subscribe` call; the client reconnects with
/// the subscriptions it had, instead of retrying the refused ones forever.
#[tokio::test]
async fn a_refused_subscription_fails_the_call_and_keeps_the_others() {
    let cluster = Cluster::start_with(1, |c| c.max_subscriptions = 2).await;
    let mut client = cluster.client_on(0).await;
    client.subscribe(["kept"]).await.unwrap();
    let err = client.subscribe(["one", "two"]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(relaymesh_proto::ErrorCode::LimitExceeded),
        "{err}"
    );
    let reconnected = within("reconnect", async {
        loop {
            if let Event::Reconnected { .. } = client.next_event().await.expect("client closed") {
                break;
            }
        }
    });
    reconnected.await;
    assert_eq!(client.handle().topics(), ["kept"]);
    let talker = cluster.client_on(0).await;
    talker.publish("kept", "still subscribed").await.unwrap();
    assert_eq!(
        relaymesh_tests::next_message(&mut client).await.payload,
        "still subscribed"
    );
}

/// A burst of subscriptions is folded into one interest change per peer per batch, so even a
/// small peer control queue does not overflow and reset the link.
#[tokio::test]
async fn a_burst_of_subscriptions_does_not_reset_peer_links() {
    let cluster = Cluster::start_with(2, |c| c.control_queue = 16).await;
    let link_before = cluster.servers[0].stats().await["peer_links"][0]["link"].clone();
    let clients = join_all((0..100).map(|_| cluster.client_on(0))).await;
    let acks = join_all(
        clients
            .iter()
            .enumerate()
            .map(|(i, c)| c.subscribe([format!("burst/{i}")])),
    )
    .await;
    assert!(acks.iter().all(Result::is_ok), "{acks:?}");
    let stats = cluster.servers[1].stats().await;
    assert_eq!(stats["peer_links"][0]["remote_topics"], 100, "{stats}");
    assert_eq!(
        cluster.servers[0].stats().await["peer_links"][0]["link"],
        link_before
    );
}
