//! The server API for application backends (`relaymesh.admin.v1.Backend`) and its HTTP JSON
//! twin, against a real cluster: publishes reach subscribers on every server through the
//! publish path, lists merge every server's answer page by page, bad input is refused with the
//! field named and nothing done.

use relaymesh_client::{Client, Credentials, Event};
use relaymesh_proto::admin::admin_client::AdminClient;
use relaymesh_proto::admin::backend_client::BackendClient;
use relaymesh_proto::admin::{
    BroadcastRequest, ChangeSubscriptionsRequest, DrainServerRequest, GetServerRequest,
    KickClientRequest, ListClientsRequest, PresenceRequest, PublishRequest, TopicsRequest,
};
use relaymesh_tests::{Cluster, coordinator_config, next_event, next_message, post_json_with};
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "backend-test-token-0123456789";

async fn cluster(n: usize) -> Cluster {
    let mut config = coordinator_config();
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token = TOKEN.into();
    Cluster::start_configured(n, config).await
}

async fn channel(cluster: &Cluster) -> Channel {
    let addr = cluster.coordinator.admin_addr.expect("admin API");
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn authed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

/// A client of account `account` (the open store takes any) on server `index`.
async fn member(cluster: &Cluster, index: usize, account: &str) -> Client {
    let credentials = Credentials::AccessCode {
        account: account.into(),
        code: "any".into(),
        role: "viewer".into(),
        group: String::new(),
    };
    cluster.client_as(index, credentials).await
}

fn publish(account: &str, topic: &str, payload: &[u8]) -> PublishRequest {
    PublishRequest {
        account: account.into(),
        group: String::new(),
        topic: topic.into(),
        payload: payload.to_vec(),
        sender: "cms".into(),
    }
}

#[tokio::test]
async fn a_backend_publishes_lists_and_disconnects_across_the_cluster() {
    let cluster = cluster(3).await;
    let channel = channel(&cluster).await;
    let mut backend = BackendClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    let mut members = Vec::new();
    for i in 0..3 {
        let client = member(&cluster, i, "acme").await;
        client.subscribe(["news"]).await.unwrap();
        members.push(client);
    }
    members[1].subscribe(["alerts/fire"]).await.unwrap();
    let outsider = member(&cluster, 0, "globex").await;
    outsider.subscribe(["news"]).await.unwrap();

    // One publish reaches the account's subscribers on every server, from the backend.
    let answer = backend
        .publish(authed(publish("acme", "news", b"hello")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.reached, 1);
    assert!(cluster.servers.iter().any(|s| s.id == answer.server_id));
    for client in &mut members {
        let m = next_message(client).await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("news", &b"hello"[..]));
        assert_eq!((m.from.as_str(), m.role.as_str()), ("cms", "backend"));
    }
    // A broadcast: one payload on several topics; a topic nobody has is not reached.
    let answer = backend
        .broadcast(authed(BroadcastRequest {
            account: "acme".into(),
            group: String::new(),
            topics: vec!["news".into(), "alerts/fire".into(), "quiet".into()],
            payload: b"all".to_vec(),
            sender: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.reached, 2);
    let got: Vec<String> = relaymesh_tests::next_messages(&mut members[1], 2)
        .await
        .into_iter()
        .map(|m| {
            format!(
                "{} {} {}",
                m.topic,
                m.from,
                String::from_utf8_lossy(&m.payload)
            )
        })
        .collect();
    assert_eq!(got, ["news backend all", "alerts/fire backend all"]);
    // The other account heard none of it: its next message is its own account's.
    backend
        .publish(authed(publish("globex", "news", b"theirs")))
        .await
        .unwrap();
    let mut outsider = outsider;
    assert_eq!(&next_message(&mut outsider).await.payload[..], b"theirs");

    // Topics, merged over the servers, a page at a time.
    let first = backend
        .topics(authed(TopicsRequest {
            account: "acme".into(),
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.topics.len(), 1);
    assert_eq!(
        (first.topics[0].topic.as_str(), first.topics[0].subscribers),
        ("alerts/fire", 1)
    );
    let second = backend
        .topics(authed(TopicsRequest {
            account: "acme".into(),
            page_size: 1,
            page_token: first.next_page_token,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            second.topics[0].topic.as_str(),
            second.topics[0].subscribers
        ),
        ("news", 3)
    );
    assert!(second.next_page_token.is_empty());

    // Presence: who holds the topic, wherever.
    let present = backend
        .presence(authed(PresenceRequest {
            account: "acme".into(),
            topic: "news".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut want: Vec<(String, String)> =
        members.iter().map(|c| (c.alias(), c.server_id())).collect();
    want.sort();
    let got: Vec<(String, String)> = present
        .clients
        .iter()
        .map(|c| (c.alias.clone(), c.server_id.clone()))
        .collect();
    assert_eq!(got, want);
    assert!(
        present
            .clients
            .iter()
            .all(|c| c.scope == "acme" && c.role == "viewer")
    );

    // The operator's list of clients: all, one server's, one account's.
    let all = admin
        .list_clients(authed(ListClientsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.clients.len(), 4);
    let on_one = admin
        .list_clients(authed(ListClientsRequest {
            server_id: cluster.servers[1].id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_one.clients.len(), 1);
    assert_eq!(on_one.clients[0].alias, members[1].alias());
    assert_eq!(on_one.clients[0].topics, 2);
    let theirs = admin
        .list_clients(authed(ListClientsRequest {
            account: "globex".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.clients.len(), 1);
    // GetServer asks the server for its peers and counters.
    let server = admin
        .get_server(authed(GetServerRequest {
            server_id: answer.server_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.peers.len(), 2, "{server:?}");
    assert!(server.counters["backend_publishes"] >= 3, "{server:?}");

    // Disconnect: the client's session closes, and it does not come back.
    let gone = members.pop().unwrap();
    let closed = backend
        .disconnect(authed(KickClientRequest {
            alias: gone.alias(),
            reason: "banned".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .closed;
    assert_eq!(closed, 1);
    let mut gone = gone;
    loop {
        match next_event(&mut gone).await {
            Event::Disconnected { reason, .. } => {
                assert!(reason.contains("banned"), "{reason}");
                break;
            }
            Event::Message(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_backend_calls_are_refused_with_the_field_and_change_nothing() {
    let cluster = cluster(2).await;
    let mut backend = BackendClient::new(channel(&cluster).await);
    let mut watcher = member(&cluster, 0, "acme").await;
    watcher.subscribe(["news"]).await.unwrap();
    let refused = |e: tonic::Status, code: Code, field: &str| {
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    };
    refused(
        backend
            .publish(authed(publish("acme", "", b"x")))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "topic",
    );
    refused(
        backend
            .publish(authed(publish("", "news", b"x")))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "account",
    );
    // Topics clients may not use are the backend's to refuse too.
    refused(
        backend
            .publish(authed(publish("acme", "@presence", b"x")))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "@presence",
    );
    refused(
        backend
            .publish(authed(publish("acme", "news", &vec![0; 2 << 20])))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "payload",
    );
    // A broadcast with one bad topic publishes on none.
    refused(
        backend
            .broadcast(authed(BroadcastRequest {
                account: "acme".into(),
                topics: vec!["news".into(), "bad/+/wild".into()],
                payload: b"half".to_vec(),
                ..Default::default()
            }))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "bad/+/wild",
    );
    refused(
        backend
            .broadcast(authed(BroadcastRequest {
                account: "acme".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "topics",
    );
    let no_token = backend
        .publish(Request::new(publish("acme", "news", b"x")))
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated);
    let mut admin = AdminClient::new(channel(&cluster).await);
    refused(
        admin
            .list_clients(authed(ListClientsRequest {
                server_id: "no-such-server".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err(),
        Code::NotFound,
        "server_id",
    );
    // Nothing above reached the subscriber: the next message is this one.
    backend
        .publish(authed(publish("acme", "news", b"after")))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut watcher).await.payload[..], b"after");
}

#[tokio::test]
async fn the_backend_api_answers_http_json_too() {
    let cluster = cluster(2).await;
    let mut watcher = member(&cluster, 1, "acme").await;
    watcher.subscribe(["news"]).await.unwrap();
    let base = format!("http://{}", cluster.coordinator.admin_addr.unwrap());
    let key = [("x-api-key", TOKEN)];
    // The payload in base64, as proto3 JSON has `bytes`.
    let body = json!({"account": "acme", "topic": "news", "payload": "aGVsbG8=", "sender": "cms"});
    let (status, answer) = post_json_with(
        &format!("{base}/api/publish"),
        &key,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reached"], 1);
    let m = next_message(&mut watcher).await;
    assert_eq!((&m.payload[..], m.from.as_str()), (&b"hello"[..], "cms"));
    let bearer = format!("Bearer {TOKEN}");
    let (status, topics) = post_json_with(
        &format!("{base}/api/topics"),
        &[("authorization", bearer.as_str())],
        br#"{"account": "acme"}"#,
    )
    .await;
    assert_eq!(status, 200, "{topics}");
    assert_eq!(
        topics["topics"],
        json!([{"topic": "news", "subscribers": 1}])
    );

    // Refusals, each with its code and nothing else affected.
    let (status, e) = post_json_with(
        &format!("{base}/api/publish"),
        &[],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!((status, e["code"].as_str()), (401, Some("UNAUTHENTICATED")));
    let (status, e) = post_json_with(
        &format!("{base}/api/publish"),
        &[("x-api-key", "wrong-key-0123456789")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!((status, e["code"].as_str()), (401, Some("UNAUTHENTICATED")));
    let (status, e) = post_json_with(&format!("{base}/api/publish"), &key, b"{not json").await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{e}"
    );
    let (status, e) = post_json_with(
        &format!("{base}/api/publish"),
        &key,
        br#"{"account": "acme", "topic": "news", "payload": "%%%"}"#,
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("base64"), "{e}");
    let (status, e) = post_json_with(
        &format!("{base}/api/publish"),
        &key,
        br#"{"account": "acme"}"#,
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("topic"), "{e}");
    let (status, e) = post_json_with(&format!("{base}/api/nothing"), &key, b"{}").await;
    assert_eq!((status, e["code"].as_str()), (404, Some("NOT_FOUND")));
    // The gRPC side still serves on the same listener after all that.
    let mut backend = BackendClient::new(channel(&cluster).await);
    backend
        .publish(authed(publish("acme", "news", b"grpc")))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut watcher).await.payload[..], b"grpc");
}

#[tokio::test]
async fn a_backend_subscribes_a_client_which_keeps_the_topic_across_a_move() {
    let cluster = cluster(3).await;
    let channel = channel(&cluster).await;
    let mut backend = BackendClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    let mut client = member(&cluster, 1, "acme").await;
    let publisher = member(&cluster, 0, "acme").await;
    let alias = client.alias();
    let change = |topics: &[&str]| ChangeSubscriptionsRequest {
        alias: alias.clone(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
    };
    let subscribed = backend
        .subscribe(authed(change(&["orders", "orders"])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(subscribed.changed, 1);
    assert_eq!(
        next_event(&mut client).await,
        Event::SubscriptionsChanged {
            added: vec!["orders".into()],
            removed: Vec::new(),
        }
    );
    // The subscription is cluster-wide by the time the call answers.
    publisher.publish("orders", "first").await.unwrap();
    assert_eq!(&next_message(&mut client).await.payload[..], b"first");

    // Its server is drained: the client moves, and the backend's topic moves with it.
    let drained = admin
        .drain_server(authed(DrainServerRequest {
            server_id: cluster.servers[1].id.clone(),
            deadline_ms: 20_000,
            reason: "upgrade".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.remaining, 0);
    loop {
        match next_event(&mut client).await {
            Event::Moved { .. } => break,
            Event::SubscriptionConfirmed { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    publisher.publish("orders", "second").await.unwrap();
    assert_eq!(&next_message(&mut client).await.payload[..], b"second");

    // Unsubscribed by the backend (the alias is the one of its new connection now): told,
    // and nothing more arrives on the topic.
    let alias = client.alias();
    let change = |topics: &[&str]| ChangeSubscriptionsRequest {
        alias: alias.clone(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
    };
    let removed = backend
        .unsubscribe(authed(change(&["orders"])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.changed, 1);
    assert_eq!(
        next_event(&mut client).await,
        Event::SubscriptionsChanged {
            added: Vec::new(),
            removed: vec!["orders".into()],
        }
    );
    client.subscribe(["other"]).await.unwrap();
    publisher.publish("orders", "third").await.unwrap();
    publisher.publish("other", "fourth").await.unwrap();
    assert_eq!(&next_message(&mut client).await.payload[..], b"fourth");

    // Refusals: a bad topic, no topics, an alias nobody has.
    let bad = backend
        .subscribe(authed(change(&["a/+/b"])))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let none = backend.subscribe(authed(change(&[]))).await.unwrap_err();
    assert_eq!(none.code(), Code::InvalidArgument, "{none:?}");
    let nobody = backend
        .subscribe(authed(ChangeSubscriptionsRequest {
            alias: "nobody-1".into(),
            topics: vec!["orders".into()],
        }))
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::NotFound, "{nobody:?}");
}

/// Pages bigger than a frame of the coordinator's server links: each server answers what fits
/// and says it has more, the page ends where the first such server's answer ends, and paging
/// through gives every topic once, with no server link dropped on the way.
#[tokio::test]
async fn topics_page_through_answers_larger_than_a_frame() {
    let cluster = cluster(2).await;
    let mut backend = BackendClient::new(channel(&cluster).await);
    let name = |i: usize| format!("{i:05}/{}", "t".repeat(58));
    let mut want = std::collections::BTreeSet::new();
    let mut subscribers = Vec::new();
    // 950 names of 64 bytes on one server (an answer of them all would pass 64 KiB), 300 on
    // the other, interleaved.
    for (server, count) in [(0, 950), (1, 300)] {
        let client = member(&cluster, server, "acme").await;
        let topics: Vec<String> = (0..count).map(|i| name(i * 2 + server)).collect();
        for chunk in topics.chunks(100) {
            client.subscribe(chunk.to_vec()).await.unwrap();
        }
        want.extend(topics);
        subscribers.push(client);
    }
    let mut got = Vec::new();
    let mut token = String::new();
    let mut sizes = Vec::new();
    loop {
        let page = backend
            .topics(authed(TopicsRequest {
                account: "acme".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.topics.len());
        got.extend(page.topics.into_iter().map(|t| {
            assert_eq!(t.subscribers, 1);
            t.topic
        }));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    // 1 000 asked, but each server's answer stops at 32 KiB (about 450 of these names).
    assert!(sizes[0] > 450 && sizes[0] < 1000, "pages {sizes:?}");
    assert_eq!(got.len(), want.len(), "each topic once");
    assert_eq!(
        got.into_iter().collect::<std::collections::BTreeSet<_>>(),
        want
    );
    for server in &cluster.servers {
        assert_eq!(
            server.stat("registrations").await,
            1,
            "no server link dropped"
        );
    }
    for client in subscribers {
        client.close().await;
    }
}
