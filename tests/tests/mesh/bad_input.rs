//! Bad input on every link gets an `Error` with a code and a close; the process and every other
//! session keep working.

use std::time::Duration;

use relaymesh_client::Event;
use relaymesh_net::ws::{self, ClientSocket, DialError, WsLimits};
use relaymesh_proto::v1::{self, coordinator_to_client};
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION, encode};
use relaymesh_tests::raw::{self, WsMessage};
use relaymesh_tests::{Cluster, SECRET, within};

fn attach(version: u32) -> v1::ClientToServer {
    v1::ClientToServer::attach(v1::Attach {
        protocol_version: version,
    })
}

fn publish(topic: &str) -> v1::ClientToServer {
    v1::ClientToServer::publish(v1::Publish {
        topic: topic.into(),
        payload: "x".into(),
        ..Default::default()
    })
}

fn publish_bytes(topic: &str, len: usize) -> v1::ClientToServer {
    v1::ClientToServer::publish(v1::Publish {
        topic: topic.into(),
        payload: vec![0u8; len].into(),
        ..Default::default()
    })
}

fn subscribe(topics: &[&str]) -> v1::ClientToServer {
    v1::ClientToServer::subscribe(v1::Subscribe {
        request_id: 1,
        topics: topics.iter().map(|t| t.to_string()).collect(),
        recover: Vec::new(),
    })
}

#[tokio::test]
async fn bad_client_input_closes_only_that_session() {
    let cluster = Cluster::start_with(1, |c| {
        c.max_frame_bytes = 64 * 1024;
        c.max_subscriptions = 5;
    })
    .await;
    let max_payload = 64 * 1024 - 256 - 1024;
    let coordinator = cluster.coordinator.addr;
    // A healthy pair that must keep working throughout.
    let mut watcher = cluster.client_on(0).await;
    watcher.subscribe(["health"]).await.unwrap();
    let talker = cluster.client_on(0).await;

    let long_topic = "t".repeat(257);
    let too_many: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    // (what is sent after the key is redeemed, whether Attach goes first, expected code)
    let cases: Vec<(&str, Vec<WsMessage>, ErrorCode)> = vec![
        (
            "malformed protobuf",
            vec![WsMessage::Binary(vec![0x0a, 0xff, 0xff, 0xff].into())],
            ErrorCode::BadFrame,
        ),
        (
            "text frame",
            vec![WsMessage::Text("hello".into())],
            ErrorCode::BadFrame,
        ),
        (
            "oversized frame",
            vec![WsMessage::Binary(vec![0u8; 100 * 1024].into())],
            ErrorCode::LimitExceeded,
        ),
        (
            "publish before attach",
            vec![bin(&publish("a"))],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "wrong protocol version",
            vec![bin(&attach(99))],
            ErrorCode::UnsupportedVersion,
        ),
        (
            "empty envelope",
            vec![
                bin(&attach(PROTOCOL_VERSION)),
                bin(&v1::ClientToServer { kind: None }),
            ],
            ErrorCode::BadFrame,
        ),
        (
            "second attach",
            vec![
                bin(&attach(PROTOCOL_VERSION)),
                bin(&attach(PROTOCOL_VERSION)),
            ],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "empty topic",
            vec![bin(&attach(PROTOCOL_VERSION)), bin(&publish(""))],
            ErrorCode::InvalidTopic,
        ),
        (
            "topic too long",
            vec![bin(&attach(PROTOCOL_VERSION)), bin(&publish(&long_topic))],
            ErrorCode::InvalidTopic,
        ),
        (
            "bad character",
            vec![bin(&attach(PROTOCOL_VERSION)), bin(&subscribe(&["a b"]))],
            ErrorCode::InvalidTopic,
        ),
        (
            "empty segment",
            vec![bin(&attach(PROTOCOL_VERSION)), bin(&subscribe(&["a//b"]))],
            ErrorCode::InvalidTopic,
        ),
        (
            "too many subscriptions",
            vec![bin(&attach(PROTOCOL_VERSION)), bin(&subscribe(&too_many))],
            ErrorCode::LimitExceeded,
        ),
        (
            // Five are fine (acknowledged), the sixth in a later request is not.
            "too many subscriptions over time",
            vec![
                bin(&attach(PROTOCOL_VERSION)),
                bin(&subscribe(&too_many[..5])),
                bin(&subscribe(&too_many[5..])),
            ],
            ErrorCode::LimitExceeded,
        ),
        (
            // Fits in a frame, but the delivered frame (plus alias and envelope) might not.
            "payload over the limit",
            vec![
                bin(&attach(PROTOCOL_VERSION)),
                bin(&publish_bytes("a", max_payload + 1)),
            ],
            ErrorCode::LimitExceeded,
        ),
    ];
    let count = cases.len() as u64;
    for (what, frames, expected) in cases {
        let mut socket = raw::keyed_client(&coordinator).await;
        let frames_start_with_attach = frames.first() == Some(&bin(&attach(PROTOCOL_VERSION)));
        for frame in frames {
            use futures_util::SinkExt as _;
            socket.send(frame).await.unwrap();
        }
        // `Ready` comes only after a good `Attach`; anything else is refused without it.
        let attached = frames_start_with_attach;
        let first: v1::ServerToClient =
            relaymesh_proto::decode(raw::next_frame(&mut socket).await.expect(what)).unwrap();
        let code = match first.kind {
            Some(v1::server_to_client::Kind::Ready(_)) if attached => {
                raw::expect_client_error(&mut socket).await
            }
            Some(v1::server_to_client::Kind::Error(e)) if !attached => {
                assert!(raw::next_frame(&mut socket).await.is_none(), "{what}");
                e.error_code()
            }
            other => panic!("{what}: {other:?} first"),
        };
        assert_eq!(code, expected, "{what}");
        talker.publish("health", what).await.unwrap();
        let event = within("healthy session still served", watcher.next_event())
            .await
            .unwrap();
        assert!(
            matches!(&event, Event::Message(m) if m.payload == what.as_bytes()),
            "{what}: {event:?}"
        );
    }
    let server = &cluster.servers[0];
    assert_eq!(server.stat("protocol_errors").await, count);
    assert_eq!(
        relaymesh_tests::get_text(&format!("http://{}/healthz", server.addr)).await,
        (200, "ok\n".into())
    );
}

fn bin(msg: &impl prost::Message) -> WsMessage {
    WsMessage::Binary(encode(msg))
}

#[tokio::test]
async fn bad_negotiation_input_is_refused() {
    let cluster = Cluster::start(1).await;
    let url = format!("{}/v1/connect", cluster.coordinator.url);
    let hello = raw::hello;
    let cases: Vec<(&str, Vec<WsMessage>, ErrorCode)> = vec![
        (
            "garbage",
            vec![WsMessage::Binary(vec![0xff; 16].into())],
            ErrorCode::BadFrame,
        ),
        (
            "connect before hello",
            vec![bin(&v1::ClientToCoordinator::connect(
                v1::Connect::default(),
            ))],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "wrong version",
            vec![bin(&hello(7))],
            ErrorCode::UnsupportedVersion,
        ),
        (
            "hello twice",
            vec![bin(&hello(PROTOCOL_VERSION)), bin(&hello(PROTOCOL_VERSION))],
            ErrorCode::UnexpectedMessage,
        ),
    ];
    for (what, frames, expected) in cases {
        let mut socket = raw::dial(&url, None).await;
        for frame in frames {
            use futures_util::SinkExt as _;
            socket.send(frame).await.unwrap();
        }
        let error = raw::expect_error::<v1::CoordinatorToClient>(&mut socket).await;
        assert_eq!(error.error_code(), expected, "{what}: {error}");
    }
    // A Connect that cannot be satisfied is answered with an Error and the link stays open.
    let mut socket = raw::dial(&url, None).await;
    raw::send_msg(&mut socket, &hello(PROTOCOL_VERSION)).await;
    raw::next_frame(&mut socket).await.expect("Welcome");
    let impossible = v1::Connect {
        preferred_server: String::new(),
        exclude: vec![cluster.servers[0].id.clone()],
        moving: false,
    };
    raw::send_msg(&mut socket, &v1::ClientToCoordinator::connect(impossible)).await;
    let answer: v1::CoordinatorToClient =
        relaymesh_proto::decode(raw::next_frame(&mut socket).await.unwrap()).unwrap();
    assert_eq!(
        raw::CarriesError::error(answer).unwrap().error_code(),
        ErrorCode::NoServerAvailable
    );
    raw::send_msg(
        &mut socket,
        &v1::ClientToCoordinator::connect(v1::Connect::default()),
    )
    .await;
    let answer: v1::CoordinatorToClient =
        relaymesh_proto::decode(raw::next_frame(&mut socket).await.unwrap()).unwrap();
    assert!(
        matches!(answer.kind, Some(coordinator_to_client::Kind::Offer(_))),
        "{answer:?}"
    );
}

fn refusal(result: Result<ClientSocket, DialError>) -> (u16, Option<ErrorCode>) {
    match result {
        Err(DialError::Refused {
            status, message, ..
        }) => (status.as_u16(), message.map(|(c, _)| c)),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, but the link was accepted"),
    }
}

#[tokio::test]
async fn server_and_peer_links_need_the_cluster_secret_and_valid_hellos() {
    let cluster = Cluster::start(1).await;
    let limits = WsLimits::default();
    let servers_url = format!("{}/v1/servers", cluster.coordinator.url);
    for bearer in [None, Some("wrong-secret")] {
        let result = ws::dial(&servers_url, bearer, &limits, Duration::from_secs(5)).await;
        assert_eq!(refusal(result), (401, Some(ErrorCode::Unauthenticated)));
    }
    assert_eq!(cluster.coordinator.stats().await["server_links_refused"], 2);

    let register = |version, url: &str| {
        v1::ServerToCoordinator::register(v1::Register {
            protocol_version: version,
            server_id: "rogue".into(),
            public_url: url.into(),
            capacity: 10,
            version: "test".into(),
            ..Default::default()
        })
    };
    for (msg, expected) in [
        (
            register(3, "ws://127.0.0.1:9"),
            ErrorCode::UnsupportedVersion,
        ),
        (
            register(PROTOCOL_VERSION, "http://not-ws"),
            ErrorCode::BadFrame,
        ),
        (
            v1::ServerToCoordinator::load(v1::Load::default()),
            ErrorCode::UnexpectedMessage,
        ),
    ] {
        let mut socket = raw::dial(&servers_url, Some(SECRET)).await;
        raw::send_msg(&mut socket, &msg).await;
        assert_eq!(
            raw::expect_error::<v1::CoordinatorToServer>(&mut socket)
                .await
                .error_code(),
            expected
        );
    }
    assert_eq!(
        cluster.coordinator.server_ids().await,
        vec![cluster.servers[0].id.clone()]
    );

    let server = &cluster.servers[0];
    let peers_url = format!("ws://{}/v1/peers", server.addr);
    let result = ws::dial(
        &peers_url,
        Some("wrong-secret"),
        &limits,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(refusal(result), (401, Some(ErrorCode::Unauthenticated)));
    assert_eq!(server.stat("peer_links_refused").await, 1);
    // Links are dialed by the lower id; a higher id dialing in is refused.
    let mut socket = raw::dial(&peers_url, Some(SECRET)).await;
    raw::send_msg(
        &mut socket,
        &v1::PeerMessage::hello(v1::PeerHello {
            protocol_version: PROTOCOL_VERSION,
            server_id: "zzz".into(),
            ..Default::default()
        }),
    )
    .await;
    let error = raw::expect_error::<v1::PeerMessage>(&mut socket).await;
    assert_eq!(error.error_code(), ErrorCode::Forbidden, "{error}");
    assert_eq!(server.stat("peers").await, 0);
}

#[tokio::test]
async fn idle_and_silent_connections_are_closed_by_the_heartbeat_timeout() {
    let cluster = Cluster::start_with(1, |c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 1_000;
        c.handshake_timeout_ms = 1_000;
    })
    .await;
    // A library client (it pings at the interval the server suggests) connected first...
    let mut client = cluster.client_on(0).await;
    client.subscribe(["still/here"]).await.unwrap();
    // ...outlives an attached client that goes silent and one that never attaches.
    let mut idle = raw::attached_client(&cluster.coordinator.addr).await;
    assert_eq!(
        raw::expect_client_error(&mut idle).await,
        ErrorCode::HeartbeatTimeout
    );
    let mut mute = raw::keyed_client(&cluster.coordinator.addr).await;
    assert_eq!(
        raw::expect_client_error(&mut mute).await,
        ErrorCode::HeartbeatTimeout
    );
    assert_eq!(cluster.servers[0].stat("clients").await, 1);
    client.publish("still/here", "yes").await.unwrap();
    let event = within("message", client.next_event()).await;
    assert!(
        matches!(event, Some(Event::Message(_))),
        "the pinging client was cut off: {event:?}"
    );
}

/// A session keeps no timer of its own: the server's sweep ends silent ones (above), and a
/// quiet publisher's last publishes are still confirmed one heartbeat interval later, with
/// nothing else sent.
#[tokio::test]
async fn a_quiet_publishers_last_publishes_are_confirmed_a_heartbeat_interval_later() {
    let cluster = Cluster::start_with(1, |c| {
        c.heartbeat_interval_ms = 300;
        c.heartbeat_timeout_ms = 60_000;
    })
    .await;
    let mut publisher = raw::attached_client(&cluster.coordinator.addr).await;
    for seq in [1, 2] {
        let publish = v1::ClientToServer::publish(v1::Publish {
            topic: "quiet/t".into(),
            payload: b"x".to_vec().into(),
            seq,
            ..v1::Publish::default()
        });
        raw::send_msg(&mut publisher, &publish).await;
    }
    let sent = std::time::Instant::now();
    let frame = raw::next_frame(&mut publisher)
        .await
        .expect("a confirmation");
    let confirmed: v1::ServerToClient = relaymesh_proto::decode(frame).unwrap();
    assert!(
        matches!(confirmed.kind, Some(v1::server_to_client::Kind::Published(ref p)) if p.up_to == 2),
        "{confirmed:?}"
    );
    // Not before the interval (the two came in fewer than CONFIRM_EVERY), and only once.
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(900), raw::next_frame(&mut publisher))
            .await
            .is_err(),
        "nothing more is confirmed"
    );
}

/// A comm server or peer that registers and then goes silent (a half-open connection looks
/// exactly like this) is dropped after the heartbeat timeout.
#[tokio::test]
async fn silent_servers_and_peers_are_dropped() {
    let mut config = relaymesh_tests::coordinator_config();
    config.heartbeat_timeout_ms = 600;
    let coordinator = relaymesh_tests::CoordinatorHandle::start(config).await;
    let servers_url = format!("{}/v1/servers", coordinator.url);
    let mut rogue = raw::dial(&servers_url, Some(SECRET)).await;
    let register = v1::ServerToCoordinator::register(v1::Register {
        protocol_version: PROTOCOL_VERSION,
        server_id: "silent".into(),
        public_url: "ws://127.0.0.1:9".into(),
        capacity: 10,
        version: "test".into(),
        ..Default::default()
    });
    raw::send_msg(&mut rogue, &register).await;
    relaymesh_tests::eventually("registered", || async {
        (coordinator.server_ids().await == ["silent"]).then_some(())
    })
    .await;
    let error = raw::expect_error::<v1::CoordinatorToServer>(&mut rogue).await;
    assert_eq!(error.error_code(), ErrorCode::HeartbeatTimeout, "{error}");
    assert!(coordinator.server_ids().await.is_empty());

    let mut config = relaymesh_tests::server_config(&coordinator.url);
    config.heartbeat_timeout_ms = 600;
    let server = relaymesh_tests::ServerHandle::start(config).await;
    let mut peer = raw::dial(&format!("ws://{}/v1/peers", server.addr), Some(SECRET)).await;
    let hello = v1::PeerMessage::hello(v1::PeerHello {
        protocol_version: PROTOCOL_VERSION,
        server_id: "0-lowest".into(),
        ..Default::default()
    });
    raw::send_msg(&mut peer, &hello).await;
    let error = raw::expect_error::<v1::PeerMessage>(&mut peer).await;
    assert_eq!(error.error_code(), ErrorCode::HeartbeatTimeout, "{error}");
    assert_eq!(server.stat("peers").await, 0);
}

/// Malformed and oversized frames on the coordinator's and peers' links are refused too.
#[tokio::test]
async fn malformed_frames_on_every_link_are_refused() {
    let cluster = Cluster::start(1).await;
    let garbage = || WsMessage::Binary(vec![0x0a, 0xff, 0xff, 0xff].into());
    // Server link, after a valid Register.
    let mut socket = raw::dial(
        &format!("{}/v1/servers", cluster.coordinator.url),
        Some(SECRET),
    )
    .await;
    let register = v1::ServerToCoordinator::register(v1::Register {
        protocol_version: PROTOCOL_VERSION,
        server_id: "garbled".into(),
        public_url: "ws://127.0.0.1:9".into(),
        capacity: 10,
        version: "test".into(),
        ..Default::default()
    });
    raw::send_msg(&mut socket, &register).await;
    raw::send(&mut socket, encode(&register)).await;
    let error = raw::expect_error::<v1::CoordinatorToServer>(&mut socket).await;
    assert_eq!(error.error_code(), ErrorCode::UnexpectedMessage, "{error}");
    let mut socket = raw::dial(
        &format!("{}/v1/servers", cluster.coordinator.url),
        Some(SECRET),
    )
    .await;
    {
        use futures_util::SinkExt as _;
        socket.send(garbage()).await.unwrap();
    }
    let error = raw::expect_error::<v1::CoordinatorToServer>(&mut socket).await;
    assert_eq!(error.error_code(), ErrorCode::BadFrame, "{error}");
    // Negotiation link: a frame over the coordinator's 64 KiB limit.
    let mut socket = raw::dial(&format!("{}/v1/connect", cluster.coordinator.url), None).await;
    raw::send(&mut socket, vec![0u8; 100 * 1024]).await;
    let error = raw::expect_error::<v1::CoordinatorToClient>(&mut socket).await;
    assert_eq!(error.error_code(), ErrorCode::LimitExceeded, "{error}");
    // Peer link: garbage after a valid hello.
    let server = &cluster.servers[0];
    let mut peer = raw::dial(&format!("ws://{}/v1/peers", server.addr), Some(SECRET)).await;
    let hello = v1::PeerMessage::hello(v1::PeerHello {
        protocol_version: PROTOCOL_VERSION,
        server_id: "0-lowest".into(),
        ..Default::default()
    });
    raw::send_msg(&mut peer, &hello).await;
    {
        use futures_util::SinkExt as _;
        peer.send(garbage()).await.unwrap();
    }
    let error = raw::expect_error::<v1::PeerMessage>(&mut peer).await;
    assert_eq!(error.error_code(), ErrorCode::BadFrame, "{error}");
    // The real server is still registered and serving.
    assert_eq!(
        cluster.coordinator.server_ids().await,
        vec![server.id.clone()]
    );
    let mut client = cluster.client_on(0).await;
    client.subscribe(["ok"]).await.unwrap();
    client.publish("ok", "fine").await.unwrap();
    assert!(matches!(
        within("message", client.next_event()).await,
        Some(Event::Message(_))
    ));
}
