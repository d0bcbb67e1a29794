//! Login keys: HTTP login, single use, expiry, refusal before any WebSocket state.

use std::time::Duration;

use relaymesh_client::{Client, ClientError};
use relaymesh_net::ws::{self, DialError, WsLimits};
use relaymesh_proto::ErrorCode;
use relaymesh_tests::raw::{self, WsMessage};
use relaymesh_tests::{Cluster, CoordinatorHandle, client_config, coordinator_config, post_json};
use serde_json::json;

async fn dial_with_key(url: &str, key: &str) -> Result<relaymesh_net::ws::ClientSocket, DialError> {
    ws::dial(
        &format!("{url}?key={key}"),
        None,
        &WsLimits::default(),
        Duration::from_secs(5),
    )
    .await
}

fn refused(result: Result<relaymesh_net::ws::ClientSocket, DialError>) -> (u16, ErrorCode, String) {
    match result {
        Err(DialError::Refused {
            status,
            message: Some((code, message)),
            ..
        }) => (status.as_u16(), code, message),
        Err(e) => panic!("expected a refusal with a JSON error, got {e}"),
        Ok(_) => panic!("expected a refusal, but the connection was accepted"),
    }
}

#[tokio::test]
async fn http_login_gives_a_key_that_works_exactly_once() {
    let cluster = Cluster::start(2).await;
    let login_url = format!("http://{}/v1/login", cluster.coordinator.addr);
    let (status, login) = post_json(&login_url, &json!({})).await;
    assert_eq!(status, 200, "{login}");
    for field in ["alias", "server_id", "url", "key"] {
        assert!(
            login[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field} missing: {login}"
        );
    }
    assert_eq!(login["expires_in_ms"], 10_000);
    let url = login["url"].as_str().unwrap();
    assert!(url.ends_with("/v1/client"), "{url}");
    let key = login["key"].as_str().unwrap();

    let mut socket = dial_with_key(url, key).await.unwrap();
    raw::send_msg(
        &mut socket,
        &relaymesh_proto::v1::ClientToServer::attach(relaymesh_proto::v1::Attach {
            protocol_version: 1,
        }),
    )
    .await;
    assert!(raw::next_frame(&mut socket).await.is_some(), "no Ready");

    let (status, code, message) = refused(dial_with_key(url, key).await);
    assert_eq!((status, code), (401, ErrorCode::KeyInvalid));
    assert!(message.contains("already used"), "{message}");
    let (status, code, message) =
        refused(dial_with_key(url, "0123456789abcdef0123456789abcdef").await);
    assert_eq!((status, code), (401, ErrorCode::KeyInvalid));
    assert!(message.contains("unknown"), "{message}");
    // Without a key the connection is a login through the server, which must start with
    // `Login` (see `relay.rs`).
    let mut no_key = ws::dial(url, None, &WsLimits::default(), Duration::from_secs(5))
        .await
        .unwrap();
    raw::send_msg(
        &mut no_key,
        &relaymesh_proto::v1::ClientToServer::attach(relaymesh_proto::v1::Attach {
            protocol_version: 1,
        }),
    )
    .await;
    assert_eq!(
        raw::expect_client_error(&mut no_key).await,
        ErrorCode::UnexpectedMessage
    );

    // The server counted the refusals and still serves the accepted client.
    let server = cluster
        .servers
        .iter()
        .find(|s| s.id == login["server_id"])
        .unwrap();
    assert_eq!(server.stat("keys_refused").await, 2);
    assert_eq!(server.stat("clients").await, 1);
    socket.send_close().await;

    // A preferred server is honoured over HTTP too.
    let wanted = &cluster.servers[1].id;
    let (status, login) = post_json(&login_url, &json!({ "preferred_server": wanted })).await;
    assert_eq!(
        (status, login["server_id"].as_str()),
        (200, Some(wanted.as_str()))
    );
    let (status, login) = post_json(&login_url, &json!({ "exclude": [wanted] })).await;
    assert_eq!(
        (status, login["server_id"].as_str()),
        (200, Some(cluster.servers[0].id.as_str()))
    );
}

trait SendClose {
    async fn send_close(&mut self);
}

impl SendClose for relaymesh_net::ws::ClientSocket {
    async fn send_close(&mut self) {
        use futures_util::SinkExt as _;
        let _ = self.send(WsMessage::Close(None)).await;
    }
}

#[tokio::test]
async fn expired_keys_are_refused() {
    let cluster = Cluster::start_with(1, |c| c.key_ttl_ms = 50).await;
    let (status, login) = post_json(
        &format!("http://{}/v1/login", cluster.coordinator.addr),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(login["expires_in_ms"], 50);
    // Let the key's lifetime pass (this waits for the clock, not for cluster state).
    tokio::time::sleep(Duration::from_millis(120)).await;
    let (status, code, message) = refused(
        dial_with_key(
            login["url"].as_str().unwrap(),
            login["key"].as_str().unwrap(),
        )
        .await,
    );
    assert_eq!((status, code), (401, ErrorCode::KeyInvalid));
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn logins_are_refused_clearly_when_no_server_can_take_them() {
    let coordinator = CoordinatorHandle::start(coordinator_config()).await;
    let login_url = format!("http://{}/v1/login", coordinator.addr);
    let (status, body) = post_json(&login_url, &json!({})).await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "NO_SERVER_AVAILABLE");
    assert!(
        body["message"].as_str().unwrap().contains("0 registered"),
        "{body}"
    );

    let err = Client::connect(client_config(&coordinator.url))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoServerAvailable), "{err}");

    let (status, body) = post_json(&login_url, &json!({ "account": "acme" })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("BAD_FRAME")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("unknown field"),
        "{body}"
    );
    let (status, body) = relaymesh_net::http::request(
        relaymesh_net::http::Method::POST,
        &login_url,
        Some(b"{not json".to_vec()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(status.as_u16(), 400, "{}", String::from_utf8_lossy(&body));

    let err = Client::connect(client_config("ws://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Dial(DialError::Connect { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("cannot connect to ws://127.0.0.1:1/v1/login"),
        "{err}"
    );
}

/// A raw session of `client_id` logged in through `POST /v1/login` (`moving` as given).
async fn session_of(
    coordinator: &std::net::SocketAddr,
    client_id: &str,
    moving: bool,
) -> relaymesh_net::ws::ClientSocket {
    let body = json!({ "client_id": client_id, "moving": moving });
    let (url, _) = raw::login_url(coordinator, &body).await;
    let mut socket = raw::dial(&url, None).await;
    raw::send_msg(
        &mut socket,
        &relaymesh_proto::v1::ClientToServer::attach(relaymesh_proto::v1::Attach {
            protocol_version: relaymesh_proto::PROTOCOL_VERSION,
        }),
    )
    .await;
    raw::next_frame(&mut socket).await.expect("Ready");
    socket
}

#[tokio::test]
async fn an_http_login_that_is_moving_does_not_replace_the_session_it_moves_from() {
    let cluster = Cluster::start(1).await;
    let coordinator = cluster.coordinator.addr;
    let mut old = session_of(&coordinator, "drone-1", false).await;
    let mut marker = session_of(&coordinator, "marker", false).await;
    // The move's login: the session it moves from stays.
    let _moved = session_of(&coordinator, "drone-1", true).await;
    // A later ordinary login of another id replaces that one's session. Replacements reach the
    // server in login order, so by the time the marker is replaced a replacement of the old
    // session would have arrived.
    let _marker_again = session_of(&coordinator, "marker", false).await;
    assert_eq!(
        raw::expect_client_error(&mut marker).await,
        ErrorCode::Replaced
    );
    raw::send_msg(
        &mut old,
        &relaymesh_proto::v1::ClientToServer::ping(relaymesh_proto::v1::Ping { nonce: 7 }),
    )
    .await;
    let pong: relaymesh_proto::v1::ServerToClient =
        relaymesh_proto::decode(raw::next_frame(&mut old).await.expect("Pong")).unwrap();
    assert!(
        matches!(
            pong.kind,
            Some(relaymesh_proto::v1::server_to_client::Kind::Pong(_))
        ),
        "{pong:?}"
    );
    // An ordinary login of the same id does replace it.
    let _replacing = session_of(&coordinator, "drone-1", false).await;
    assert_eq!(
        raw::expect_client_error(&mut old).await,
        ErrorCode::Replaced
    );
}

/// The coordinator's next answer on a negotiation link.
async fn answer(
    socket: &mut relaymesh_net::ws::ClientSocket,
) -> Option<relaymesh_proto::v1::coordinator_to_client::Kind> {
    let frame = raw::next_frame(socket).await.expect("an answer");
    relaymesh_proto::decode::<relaymesh_proto::v1::CoordinatorToClient>(frame)
        .expect("a CoordinatorToClient")
        .kind
}

/// The Rust client sends `Connect` right behind `Hello` (one write, no wait for `Welcome`):
/// the coordinator answers both in turn, and a refused `Hello` is answered with its error alone.
#[tokio::test]
async fn a_connect_sent_with_hello_is_answered_after_the_welcome() {
    use futures_util::SinkExt as _;
    use relaymesh_proto::v1::{self, coordinator_to_client::Kind};
    let cluster = Cluster::start(1).await;
    let url = format!("{}/v1/connect", cluster.coordinator.url);
    let hello = raw::hello;
    let connect = v1::ClientToCoordinator::connect(v1::Connect::default());
    let both = |hello: v1::ClientToCoordinator| {
        [hello, connect.clone()].map(|m| WsMessage::Binary(relaymesh_proto::encode(&m)))
    };

    let mut socket = raw::dial(&url, None).await;
    for frame in both(hello(relaymesh_proto::PROTOCOL_VERSION)) {
        socket.feed(frame).await.unwrap();
    }
    socket.flush().await.unwrap();
    assert!(matches!(answer(&mut socket).await, Some(Kind::Welcome(_))));
    let Some(Kind::Offer(offer)) = answer(&mut socket).await else {
        panic!("no offer after the welcome");
    };
    assert_eq!(offer.server_id, cluster.servers[0].id);
    // The offered key works.
    let attached = dial_with_key(&offer.url, &offer.key).await;
    assert!(attached.is_ok(), "the offered key was refused");

    let mut socket = raw::dial(&url, None).await;
    for frame in both(hello(7)) {
        socket.feed(frame).await.unwrap();
    }
    socket.flush().await.unwrap();
    let error = raw::expect_error::<v1::CoordinatorToClient>(&mut socket).await;
    assert_eq!(error.error_code(), ErrorCode::UnsupportedVersion, "{error}");
    assert!(
        raw::closed_within(&mut socket, Duration::from_secs(5)).await,
        "the link stays open after the refusal"
    );
}

/// `Attach` sent in the same write as the upgrade request is read after it: `Ready` comes
/// back with no round trip in between. With a spent key the upgrade is refused with its JSON
/// error, however many frames rode along, and the server goes on serving.
#[tokio::test]
async fn an_attach_riding_with_the_upgrade_is_answered_and_a_refusal_stays_readable() {
    use relaymesh_proto::v1;
    let cluster = Cluster::start(1).await;
    let login_url = format!("http://{}/v1/login", cluster.coordinator.addr);
    let (status, login) = post_json(&login_url, &json!({})).await;
    assert_eq!(status, 200, "{login}");
    let url = format!(
        "{}?key={}",
        login["url"].as_str().unwrap(),
        login["key"].as_str().unwrap()
    );
    let attach = relaymesh_proto::encode(&v1::ClientToServer::attach(v1::Attach {
        protocol_version: relaymesh_proto::PROTOCOL_VERSION,
    }));
    let subscribe = relaymesh_proto::encode(&v1::ClientToServer::subscribe(v1::Subscribe {
        request_id: 1,
        topics: vec!["riders".into()],
        recover: Vec::new(),
    }));
    let first = [attach, subscribe];
    let dial = |url: String| {
        let first = first.clone();
        async move {
            let tls = relaymesh_net::tls::Connector::default();
            let limits = WsLimits::default();
            ws::dial_link_with(&url, None, &limits, &tls, Duration::from_secs(5), &first).await
        }
    };
    let mut link = dial(url.clone()).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        use futures_util::StreamExt as _;
        let frame = relaymesh_tests::within("the server's answers", link.stream.next())
            .await
            .expect("link open")
            .expect("a frame");
        let raw::WsMessage::Binary(frame) = frame else {
            continue;
        };
        let msg: v1::ServerToClient = relaymesh_proto::decode_frame(frame).unwrap();
        kinds.push(msg.kind.unwrap());
    }
    assert!(
        matches!(kinds[0], v1::server_to_client::Kind::Ready(_)),
        "{kinds:?}"
    );
    assert!(
        matches!(&kinds[1], v1::server_to_client::Kind::Ack(ack) if ack.request_id == 1),
        "{kinds:?}"
    );

    for _ in 0..20 {
        match dial(url.clone()).await {
            Err(DialError::Refused {
                status,
                message: Some((code, message)),
                ..
            }) => {
                assert_eq!((status.as_u16(), code), (401, ErrorCode::KeyInvalid));
                assert!(message.contains("already used"), "{message}");
            }
            Err(e) => panic!("expected a refusal with a JSON error, got {e}"),
            Ok(_) => panic!("a spent key was accepted"),
        }
    }
    assert_eq!(cluster.servers[0].stat("clients").await, 1);
}
