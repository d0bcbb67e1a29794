//! Batches on the client link: several publishes sent as one `PublishBatch`, and a burst of
//! deliveries received as one `MessageBatch` by a client that connected with `&batch=1` (and
//! as one WebSocket message each by a client that did not).

use relaymesh_net::ws::ClientSocket;
use relaymesh_proto::v1::{self, server_to_client::Kind};
use relaymesh_proto::{PROTOCOL_VERSION, decode};
use relaymesh_tests::Cluster;
use relaymesh_tests::raw;

/// Opens `/v1/client` with a fresh key (and `extra` query parameters), attaches and
/// subscribes to `topic`: the socket once the subscription is confirmed.
async fn subscriber(coordinator: &std::net::SocketAddr, extra: &str, topic: &str) -> ClientSocket {
    let (url, _) = raw::login_url(coordinator, &serde_json::json!({})).await;
    let mut socket = raw::dial(&format!("{url}{extra}"), None).await;
    raw::send_msg(
        &mut socket,
        &v1::ClientToServer::attach(v1::Attach {
            protocol_version: PROTOCOL_VERSION,
        }),
    )
    .await;
    raw::send_msg(
        &mut socket,
        &v1::ClientToServer::subscribe(v1::Subscribe {
            request_id: 1,
            topics: vec![topic.into()],
            recover: vec![],
        }),
    )
    .await;
    loop {
        let frame: v1::ServerToClient =
            decode(raw::next_frame(&mut socket).await.expect("Ack")).unwrap();
        match frame.kind {
            Some(Kind::Ready(ready)) => assert!(ready.max_frame_bytes > 0, "{ready:?}"),
            Some(Kind::Ack(ack)) if ack.pending.is_empty() => return socket,
            Some(Kind::Ack(_)) => {}
            other => panic!("{other:?} before the Ack"),
        }
    }
}

fn payloads(messages: &[v1::Message]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| std::str::from_utf8(&m.payload).unwrap())
        .collect()
}

#[tokio::test]
async fn a_publish_batch_is_delivered_in_order_as_one_batch_or_one_message_each() {
    let cluster = Cluster::start(1).await;
    let coordinator = cluster.coordinator.addr;
    let mut batching = subscriber(&coordinator, "&batch=1", "b/t").await;
    let mut plain = subscriber(&coordinator, "", "b/t").await;

    let mut publisher = raw::attached_client(&coordinator).await;
    let publishes: Vec<v1::Publish> = (1..=5u64)
        .map(|seq| v1::Publish {
            topic: "b/t".into(),
            payload: seq.to_string().into_bytes().into(),
            seq,
            ..v1::Publish::default()
        })
        .collect();
    raw::send_msg(
        &mut publisher,
        &v1::ClientToServer::batch(v1::PublishBatch { publishes }),
    )
    .await;

    // One burst for the server (one WebSocket message), so one batch for a client that takes
    // them.
    let frame: v1::ServerToClient = decode(raw::next_frame(&mut batching).await.unwrap()).unwrap();
    let Some(Kind::Batch(batch)) = frame.kind else {
        panic!("not a batch: {frame:?}");
    };
    assert_eq!(payloads(&batch.messages), ["1", "2", "3", "4", "5"]);
    assert_eq!(
        batch.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    // One WebSocket message per delivery otherwise.
    let mut one_each = Vec::new();
    for _ in 0..5 {
        let frame: v1::ServerToClient = decode(raw::next_frame(&mut plain).await.unwrap()).unwrap();
        let Some(Kind::Message(m)) = frame.kind else {
            panic!("not a message: {frame:?}");
        };
        one_each.push(m);
    }
    assert_eq!(payloads(&one_each), ["1", "2", "3", "4", "5"]);
}

#[tokio::test]
async fn a_bad_batch_parameter_is_refused_before_the_key_is_spent() {
    let cluster = Cluster::start(1).await;
    let (url, _) = raw::login_url(&cluster.coordinator.addr, &serde_json::json!({})).await;
    let refused = raw::dial_tls(
        &format!("{url}&batch=yes"),
        None,
        &relaymesh_net::ws::Connector::default(),
    )
    .await;
    let error = refused.map(drop).expect_err("batch=yes is refused");
    assert!(error.to_string().contains("400"), "{error}");
    // The key still serves.
    raw::dial(&format!("{url}&batch=1"), None).await;
}

#[tokio::test]
async fn a_batch_over_max_batch_publishes_ends_only_that_session() {
    let cluster = Cluster::start_with(1, |c| c.max_batch_publishes = 4).await;
    let coordinator = cluster.coordinator.addr;
    let mut watcher = subscriber(&coordinator, "&batch=1", "b/t").await;
    let mut publisher = raw::attached_client(&coordinator).await;
    let batch = |n: u64| {
        v1::ClientToServer::batch(v1::PublishBatch {
            publishes: (1..=n)
                .map(|seq| v1::Publish {
                    topic: "b/t".into(),
                    payload: seq.to_string().into_bytes().into(),
                    seq,
                    ..v1::Publish::default()
                })
                .collect(),
        })
    };
    raw::send_msg(&mut publisher, &batch(4)).await;
    let frame: v1::ServerToClient = decode(raw::next_frame(&mut watcher).await.unwrap()).unwrap();
    assert!(
        matches!(&frame.kind, Some(Kind::Batch(b)) if b.messages.len() == 4),
        "{frame:?}"
    );
    raw::send_msg(&mut publisher, &batch(5)).await;
    assert_eq!(
        raw::expect_client_error(&mut publisher).await,
        relaymesh_proto::ErrorCode::LimitExceeded
    );
    // The watcher got none of the refused batch, and is still served.
    let mut other = raw::attached_client(&coordinator).await;
    raw::send_msg(&mut other, &batch(1)).await;
    let frame: v1::ServerToClient = decode(raw::next_frame(&mut watcher).await.unwrap()).unwrap();
    let Some(Kind::Message(m)) = frame.kind else {
        panic!("not a message: {frame:?}");
    };
    assert_eq!(&m.payload[..], b"1");
}
