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
