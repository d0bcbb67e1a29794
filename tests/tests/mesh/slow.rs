//! Slow subscribers: drops are counted and reported, never hidden; a subscriber that stays
//! full is disconnected.

use futures_util::StreamExt as _;
use relaymesh_client::{Client, Event};
use relaymesh_proto::v1::{self, server_to_client::Kind};
use relaymesh_proto::{ErrorCode, decode};
use relaymesh_tests::raw::{self, WsMessage};
use relaymesh_tests::{Cluster, client_config, eventually, within};

/// Payloads large enough to fill the kernel's socket buffers quickly.
const PAYLOAD: usize = 32 * 1024;

#[tokio::test]
async fn drops_for_a_slow_subscriber_are_counted_and_reported() {
    const SENT: u64 = 2_000;
    // Plenty of room in messages, little in bytes: the byte budget is what fills up.
    let cluster = Cluster::start_with(1, |c| {
        c.client_queue = 4_096;
        c.client_queue_bytes = 512 * 1024;
        c.slow_consumer_ms = 60_000;
    })
    .await;
    let mut config = client_config(&cluster.coordinator.url);
    config.event_queue = 1; // stop reading the socket as soon as one event is unread
    config.preferred_server = Some(cluster.servers[0].id.clone());
    let mut slow = Client::connect(config).await.unwrap();
    slow.subscribe(["firehose"]).await.unwrap();
    let publisher = cluster.client_on(0).await;
    for i in 0..SENT {
        let mut payload = vec![0u8; PAYLOAD];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        publisher.publish("firehose", payload).await.unwrap();
    }
    let server = &cluster.servers[0];
    eventually("every publish handled", || async {
        (server.stat("messages_in").await == SENT).then_some(())
    })
    .await;
    let dropped = server.stat("dropped").await;
    assert!(dropped > 0, "the subscriber never fell behind; raise SENT");

    // Now read everything: messages plus reported drops account for every publish.
    let (mut received, mut reported) = (0u64, 0u64);
    let mut last = None;
    while received + reported < SENT {
        match within("all messages or drop notices", slow.next_event())
            .await
            .unwrap()
        {
            Event::Message(m) => {
                let seq = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
                assert!(
                    last.is_none_or(|l| seq > l),
                    "order broken: {seq} after {last:?}"
                );
                last = Some(seq);
                received += 1;
            }
            Event::Dropped { count, upstream } => {
                // One server: every drop was this subscriber's own queue's.
                assert_eq!(upstream, 0, "a single server has no upstream to lose in");
                reported += count;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((received + reported, reported), (SENT, dropped));
    assert_eq!(server.stat("slow_consumers").await, 0);
    assert_eq!(server.stat("messages_out").await, SENT - dropped);
}

#[tokio::test]
async fn a_subscriber_that_stays_full_is_disconnected_as_a_slow_consumer() {
    let cluster = Cluster::start_with(1, |c| {
        c.client_queue = 64;
        // Long enough that a reader that keeps draining is never mistaken for a stalled one
        // on a loaded machine; the one that stopped reading still goes after a second.
        c.slow_consumer_ms = 1_000;
    })
    .await;
    // A raw subscriber that stops reading after subscribing.
    let mut slow = raw::attached_client(&cluster.coordinator.addr).await;
    raw::send_msg(
        &mut slow,
        &v1::ClientToServer::subscribe(v1::Subscribe {
            request_id: 9,
            topics: vec!["firehose".into()],
            recover: Vec::new(),
        }),
    )
    .await;
    let ack: v1::ServerToClient = decode(raw::next_frame(&mut slow).await.unwrap()).unwrap();
    assert!(
        matches!(&ack.kind, Some(Kind::Ack(a)) if a.request_id == 9 && a.pending.is_empty()),
        "{ack:?}"
    );
    let mut fine = cluster.client_on(0).await;
    fine.subscribe(["firehose"]).await.unwrap();
    // A subscriber that reads concurrently with the flood. An unpaced flood can outrun it now
    // and then (drops are reported), but its queue keeps draining, so it is never cut off.
    let fine = tokio::spawn(async move {
        let mut messages = 0u64;
        while let Some(event) = fine.next_event().await {
            match event {
                Event::Message(_) => messages += 1,
                Event::Dropped { .. } => {}
                other => {
                    return Err(format!(
                        "well-behaved subscriber got {other:?} after {messages} messages"
                    ));
                }
            }
            if messages == 200 {
                break;
            }
        }
        Ok(messages)
    });
    let publisher = cluster.client_on(0).await;
    let server = &cluster.servers[0];
    let flood = publisher.handle();
    let flooding = tokio::spawn(async move {
        while flood.publish("firehose", vec![7u8; PAYLOAD]).await.is_ok() {
            // Let the well-behaved reader run between publishes (the test runtime has one
            // thread); the stalled subscriber falls behind regardless.
            tokio::task::yield_now().await;
        }
    });
    eventually("slow consumer disconnected", || async {
        (server.stat("slow_consumers").await >= 1).then_some(())
    })
    .await;
    // The well-behaved subscriber was not affected.
    assert_eq!(
        within("well-behaved subscriber", fine).await.unwrap(),
        Ok(200)
    );
    flooding.abort();
    // The slow one finds its connection closed once it reads what was buffered; if the error
    // frame made it out before the buffers filled, it names the reason.
    let mut error = None;
    within("slow subscriber sees the close", async {
        while let Some(Ok(msg)) = slow.next().await {
            if let WsMessage::Binary(frame) = msg
                && let Ok(v1::ServerToClient {
                    kind: Some(Kind::Error(e)),
                }) = decode(frame)
            {
                error = Some(e.error_code());
            }
        }
    })
    .await;
    assert!(
        error.is_none_or(|code| code == ErrorCode::SlowConsumer),
        "{error:?}"
    );
    assert!(server.stat("dropped").await > 0);
    assert_eq!(
        server.stat("slow_consumers").await,
        1,
        "only the subscriber that stopped reading"
    );
    // Only the publisher is left (the well-behaved subscriber's task has finished).
    eventually("slow session gone", || async {
        (server.stat("clients").await == 1).then_some(())
    })
    .await;
}

/// A client whose application does not take its events for several heartbeat timeouts is not
/// taken for a dead one: it keeps pinging while its event queue is full, and nothing is lost.
/// (Paused time: the cluster's and the client's timers run in virtual time.)
#[tokio::test(start_paused = true)]
async fn a_client_whose_application_is_slow_keeps_its_connection() {
    const SENT: usize = 10;
    let cluster = Cluster::start(1).await;
    let mut config = client_config(&cluster.coordinator.url);
    config.event_queue = 2;
    config.preferred_server = Some(cluster.servers[0].id.clone());
    let mut slow = Client::connect(config).await.unwrap();
    slow.subscribe(["t"]).await.unwrap();
    let publisher = cluster.client_on(0).await;
    // Two bursts: the first fills the event queue, the second leaves the client's connection
    // task waiting for room.
    for half in [0..SENT / 2, SENT / 2..SENT] {
        for i in half {
            publisher.publish("t", i.to_string()).await.unwrap();
        }
        publisher.flush().await.unwrap();
        // Every task runs until all wait (virtual time moves only then).
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Three of the server's heartbeat timeouts (3 s in tests) without taking an event.
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    for i in 0..SENT {
        match within("message", slow.next_event()).await {
            Some(Event::Message(m)) => assert_eq!(&*m.payload, i.to_string().as_bytes()),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    assert_eq!(
        cluster.servers[0].stat("clients").await,
        2,
        "no session was closed"
    );
}
