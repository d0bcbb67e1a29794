//! Peer links that stall: a black-holed link between two comm servers, what reaches a
//! subscriber across it, and what a subscribe made meanwhile is told.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use relaymesh_client::{Client, ClientError, Event};
use relaymesh_tests::proxy::Proxy;
use relaymesh_tests::{
    CoordinatorHandle, ServerHandle, client_config, coordinator_config, eventually, server_config,
    within,
};

/// Two servers, "a" and "b"; "a" reaches "b" (its peer link, and b's clients) through a proxy
/// that can black-hole the peer link.
struct StalledPair {
    coordinator: CoordinatorHandle,
    a: ServerHandle,
    b: ServerHandle,
    proxy: Proxy,
}

impl StalledPair {
    async fn start(replay_bytes: usize) -> Self {
        Self::start_with(|config| config.peer_replay_bytes = replay_bytes).await
    }

    /// [`StalledPair::start`] with `more` applied to both servers' configs.
    async fn start_with(more: impl Fn(&mut commserver::Config)) -> Self {
        let coordinator = CoordinatorHandle::start(coordinator_config()).await;
        let proxy = Proxy::start().await;
        let tweak = |id: &str| {
            let mut config = server_config(&coordinator.url);
            config.id = Some(id.into());
            config.peer_heartbeat_timeout_ms = 600;
            config.handshake_timeout_ms = 1_000;
            more(&mut config);
            config
        };
        let a = ServerHandle::start(tweak("a")).await;
        let mut b_config = tweak("b");
        b_config.public_url = Some(format!("ws://{}", proxy.addr));
        let b = ServerHandle::start(b_config).await;
        proxy.set_upstream(b.addr);
        for server in [&a, &b] {
            eventually("the servers are linked", || async {
                (server.stat("peers").await == 1).then_some(())
            })
            .await;
        }
        Self {
            coordinator,
            a,
            b,
            proxy,
        }
    }

    async fn client_on(&self, server: &ServerHandle) -> Client {
        self.client_with(server, Duration::from_secs(10)).await
    }

    /// A client of `server` whose subscription changes wait at most `request_timeout`.
    async fn client_with(&self, server: &ServerHandle, request_timeout: Duration) -> Client {
        let mut config = client_config(&self.coordinator.url);
        config.preferred_server = Some(server.id.clone());
        config.request_timeout = request_timeout;
        let client = Client::connect(config).await.unwrap();
        assert_eq!(client.server_id(), server.id);
        client
    }

    /// Publishes on "a" to a subscriber on "b" while the peer link is black-holed until both
    /// servers have given it up, then lets it through again. Returns what the subscriber got:
    /// the payloads, in order, and the `Dropped` counts it was told of: all of them, and how
    /// many of those were lost between servers (`upstream`).
    async fn publish_across_a_stall(&self, total: usize) -> (Vec<usize>, u64, u64) {
        let mut subscriber = self.client_on(&self.b).await;
        subscriber.subscribe(["room/stall"]).await.unwrap();
        let publisher = Arc::new(self.client_on(&self.a).await);
        let stalled = Arc::new(AtomicBool::new(false));
        // A steady publisher: before the stall, through it and after it.
        let (p, s) = (publisher.clone(), stalled.clone());
        let publishing = tokio::spawn(async move {
            for i in 0..total {
                p.publish("room/stall", i.to_string()).await.unwrap();
                // Pacing, so that some of the messages fall into the stall.
                if !s.load(Ordering::SeqCst) || i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
        // Something has crossed before the stall starts.
        let mut got = Vec::new();
        let mut told = (0, 0);
        let mut next = async |got: &mut Vec<usize>, told: &mut (u64, u64)| match within(
            "the subscriber hears of every message",
            subscriber.next_event(),
        )
        .await
        {
            Some(Event::Message(m)) => {
                got.push(std::str::from_utf8(&m.payload).unwrap().parse().unwrap())
            }
            Some(Event::Dropped { count, upstream }) => {
                told.0 += count;
                told.1 += upstream;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("the subscriber's client ended"),
        };
        next(&mut got, &mut told).await;
        self.proxy.blackhole_peers(true);
        stalled.store(true, Ordering::SeqCst);
        for server in [&self.a, &self.b] {
            eventually("both ends gave up the stalled link", || async {
                (server.stat("peers").await == 0).then_some(())
            })
            .await;
        }
        self.proxy.blackhole_peers(false);
        stalled.store(false, Ordering::SeqCst);
        within("the publisher finishes", publishing).await.unwrap();
        while got.len() as u64 + told.0 < total as u64 {
            next(&mut got, &mut told).await;
        }
        (got, told.0, told.1)
    }
}

#[tokio::test]
async fn a_stall_shorter_than_the_replay_buffer_loses_nothing() {
    let pair = StalledPair::start(16 << 20).await;
    const TOTAL: usize = 1_500;
    let (got, told, _) = pair.publish_across_a_stall(TOTAL).await;
    // Every message, once, in order: what the black hole swallowed and what was published
    // while the link was down came again on the next link.
    assert_eq!(told, 0, "nothing should have been lost");
    assert_eq!(got, (0..TOTAL).collect::<Vec<_>>());
    assert!(pair.a.stat("forwards_replayed").await > 0);
    assert_eq!(pair.a.stat("peer_gaps_reported").await, 0);
    assert_eq!(pair.b.stat("peers").await, 1);
}

#[tokio::test]
async fn without_replay_a_stall_is_reported_not_silent() {
    let pair = StalledPair::start(0).await;
    const TOTAL: usize = 1_500;
    let (got, told, upstream) = pair.publish_across_a_stall(TOTAL).await;
    // What did not arrive was told, to the message, as lost between servers.
    assert!(told > 0, "the stall should have lost something");
    assert_eq!(
        upstream, told,
        "the peer link lost them, not the subscriber's queue"
    );
    assert_eq!(got.len() as u64 + told, TOTAL as u64);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates"
    );
    assert_eq!(pair.a.stat("peer_gaps_reported").await, told);
    assert_eq!(pair.a.stat("forwards_replayed").await, 0);
}

#[tokio::test]
async fn a_subscribe_across_a_stalled_link_names_the_pending_server_and_is_confirmed_when_it_resumes()
 {
    // The partial Ack (at 300 ms) comes well before the stalled link is found dead (2 s).
    let pair = StalledPair::start_with(|config| {
        config.peer_heartbeat_timeout_ms = 2_000;
        config.subscribe_sync_timeout_ms = 300;
    })
    .await;
    let mut subscriber = pair.client_with(&pair.b, Duration::from_secs(1)).await;
    pair.proxy.blackhole_peers(true);
    // Server a cannot have heard of the subscription: it is active on b, pending on a.
    let result = within("the subscribe answers", subscriber.subscribe(["room/sync"])).await;
    match result {
        Err(ClientError::NotConfirmed { pending }) => assert_eq!(pending, vec!["a".to_owned()]),
        other => panic!("expected NotConfirmed naming a, got {other:?}"),
    }
    assert_eq!(subscriber.handle().topics(), vec!["room/sync".to_owned()]);
    assert_eq!(pair.b.stat("acks_pending").await, 1);
    // The stalled link is given up, then the path lets bytes through again: a links again and
    // the new link starts with b's full interest set, which confirms the subscription.
    for server in [&pair.a, &pair.b] {
        eventually("both ends gave up the stalled link", || async {
            (server.stat("peers").await == 0).then_some(())
        })
        .await;
    }
    pair.proxy.blackhole_peers(false);
    loop {
        match within("the confirmation", subscriber.next_event()).await {
            Some(Event::SubscriptionConfirmed { topics }) => {
                assert_eq!(topics, vec!["room/sync".to_owned()]);
                break;
            }
            // The broken link may be reported as losses; nothing was published yet.
            Some(Event::Dropped { .. }) => {}
            other => panic!("expected the confirmation, got {other:?}"),
        }
    }
    // Confirmed means a has it: what is published there now reaches the subscriber.
    let publisher = pair.client_on(&pair.a).await;
    publisher.publish("room/sync", "after").await.unwrap();
    loop {
        match within("the message from a", subscriber.next_event()).await {
            Some(Event::Message(m)) => {
                assert_eq!(
                    (m.topic.as_str(), &m.payload[..]),
                    ("room/sync", &b"after"[..])
                );
                break;
            }
            Some(Event::Dropped { .. }) => {}
            other => panic!("expected the message, got {other:?}"),
        }
    }
    assert_eq!(pair.b.stat("confirmations_abandoned").await, 0);
}

/// A subscribe on b waiting for a, whose link is black-holed, when a stops: the coordinator
/// drops a, and once b's link to a is down too (in either order) the subscribe is answered as
/// confirmed, as one made after the link went down would be. It is not left to
/// `subscribe_sync_timeout_ms` or to the link's expiry (`peer_resume_ms`), both far longer
/// than this test waits. In a reconnect storm this is a client resubscribing on b a moment
/// before b has seen the dead server's link close.
#[tokio::test]
async fn a_subscribe_waiting_for_a_server_that_stopped_is_answered_once_the_coordinator_drops_it() {
    for link_down_first in [false, true] {
        let pair = StalledPair::start_with(|config| {
            config.subscribe_sync_timeout_ms = 600_000;
            config.peer_resume_ms = 600_000;
            // The session answers nothing else while its subscribe waits: its client must not
            // take the silence for a dead server.
            config.heartbeat_timeout_ms = 600_000;
            // Dropped by the coordinator first: b's link to a outlives a by a few seconds.
            if !link_down_first {
                config.peer_heartbeat_timeout_ms = 6_000;
            }
        })
        .await;
        let subscriber = pair.client_with(&pair.b, Duration::from_secs(600)).await;
        pair.proxy.blackhole_peers(true);
        let subscribing = tokio::spawn(async move {
            let result = subscriber.subscribe(["room/left"]).await;
            (subscriber, result)
        });
        eventually("b has the subscription", || async {
            (pair.b.stat("topics").await == 1).then_some(())
        })
        .await;
        if link_down_first {
            eventually("b gave the stalled link up", || async {
                (pair.b.stat("peers").await == 0).then_some(())
            })
            .await;
        }
        let StalledPair {
            coordinator,
            a,
            b,
            proxy: _proxy,
        } = pair;
        a.stop().await;
        if !link_down_first {
            eventually("the coordinator dropped a", || async {
                (coordinator.server_ids().await == ["b"]).then_some(())
            })
            .await;
            assert_eq!(b.stat("peers").await, 1, "b's link to a is still up");
        }
        let (subscriber, result) = within("the subscribe is answered", subscribing)
            .await
            .unwrap();
        assert!(
            result.is_ok(),
            "link down first: {link_down_first}: {result:?}"
        );
        assert_eq!(coordinator.server_ids().await, vec!["b".to_owned()]);
        assert_eq!(b.stat("acks_pending").await, 0);
        subscriber.close().await;
    }
}
