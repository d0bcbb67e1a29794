//! Raw protocol access for tests that must send what the client library never would: garbage
//! frames, oversized frames, messages out of order.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use relaymesh_net::ws::{self, ClientSocket, WsLimits};
use relaymesh_proto::v1::{self, server_to_client::Kind};
use relaymesh_proto::{ErrorCode, decode, encode};
pub use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{PATIENCE, within};

/// Dials `url` with generous limits (so the test can send what the server refuses).
pub async fn dial(url: &str, bearer: Option<&str>) -> ClientSocket {
    dial_tls(url, bearer, &ws::Connector::default())
        .await
        .unwrap_or_else(|e| panic!("dial {url}: {e}"))
}

/// [`dial`] trusting (and presenting) what `tls` says for a `wss://` URL; the error is the
/// caller's to judge.
pub async fn dial_tls(
    url: &str,
    bearer: Option<&str>,
    tls: &ws::Connector,
) -> Result<ClientSocket, ws::DialError> {
    let limits = WsLimits {
        max_frame_bytes: 64 * 1024 * 1024,
        ..WsLimits::default()
    };
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    ws::dial_authorized(url, authorization.as_deref(), &limits, tls, PATIENCE).await
}

/// Sends one binary frame.
pub async fn send(socket: &mut ClientSocket, frame: impl Into<Bytes>) {
    socket.send(WsMessage::Binary(frame.into())).await.unwrap();
}

/// Sends one protobuf message.
pub async fn send_msg(socket: &mut ClientSocket, msg: &impl prost::Message) {
    send(socket, encode(msg)).await;
}

/// The next binary frame, skipping pings; `None` when the link closes.
pub async fn next_frame(socket: &mut ClientSocket) -> Option<Bytes> {
    within("next frame", async {
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Binary(frame))) => return Some(frame),
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
}

/// An envelope a process may close a link with: it can carry an [`v1::Error`].
pub trait CarriesError: prost::Message + Default {
    /// The error inside, if this is one.
    fn error(self) -> Option<v1::Error>;
}

macro_rules! carries_error {
    ($($envelope:ident => $module:ident),* $(,)?) => {$(
        impl CarriesError for v1::$envelope {
            fn error(self) -> Option<v1::Error> {
                match self.kind {
                    Some(v1::$module::Kind::Error(e)) => Some(e),
                    _ => None,
                }
            }
        }
    )*};
}

carries_error!(
    ServerToClient => server_to_client,
    CoordinatorToServer => coordinator_to_server,
    CoordinatorToClient => coordinator_to_client,
    PeerMessage => peer_message,
);

/// Reads envelopes of type `M` until one carries an `Error`, checks that the link then closes
/// with a close frame whose status matches the error ([`relaymesh_proto::close_status`]), and
/// returns the error. Panics if the link closes without one.
pub async fn expect_error<M: CarriesError>(socket: &mut ClientSocket) -> v1::Error {
    let error = loop {
        let frame = next_frame(socket)
            .await
            .expect("link closed without an Error");
        if let Some(error) = decode::<M>(frame).ok().and_then(M::error) {
            break error;
        }
    };
    let status = within("close frame", async {
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Close(close))) => return close.map(|c| u16::from(c.code)),
                Some(Ok(WsMessage::Binary(_))) => panic!("link stayed open after {error}"),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => panic!("link ended without a close frame after {error}"),
            }
        }
    })
    .await;
    assert_eq!(
        status,
        Some(relaymesh_proto::close_status(error.error_code())),
        "close status after {error}"
    );
    error
}

/// [`expect_error`] for the client link, returning the code.
pub async fn expect_client_error(socket: &mut ClientSocket) -> ErrorCode {
    expect_error::<v1::ServerToClient>(socket)
        .await
        .error_code()
}

/// Gets a key through `POST /v1/login`, connects to `/v1/client` raw and attaches. Returns the
/// socket after the server's `Ready`.
pub async fn attached_client(coordinator: &std::net::SocketAddr) -> ClientSocket {
    let mut socket = keyed_client(coordinator).await;
    send_msg(
        &mut socket,
        &v1::ClientToServer::attach(v1::Attach {
            protocol_version: relaymesh_proto::PROTOCOL_VERSION,
        }),
    )
    .await;
    let ready: v1::ServerToClient = decode(next_frame(&mut socket).await.expect("Ready")).unwrap();
    assert!(matches!(ready.kind, Some(Kind::Ready(_))), "{ready:?}");
    socket
}

/// Logs in through `POST /v1/login` with `body`: the `/v1/client?key=…` URL to open, and the
/// whole answer (alias, server).
pub async fn login_url(
    coordinator: &std::net::SocketAddr,
    body: &serde_json::Value,
) -> (String, serde_json::Value) {
    let (status, login) = crate::post_json(&format!("http://{coordinator}/v1/login"), body).await;
    assert_eq!(status, 200, "{login}");
    let url = format!(
        "{}?key={}",
        login["url"].as_str().unwrap(),
        login["key"].as_str().unwrap()
    );
    (url, login)
}

/// Gets a key through `POST /v1/login` and opens `/v1/client` with it, sending nothing (the
/// server says nothing either until it has an `Attach`).
pub async fn keyed_client(coordinator: &std::net::SocketAddr) -> ClientSocket {
    let (url, _) = login_url(coordinator, &serde_json::json!({})).await;
    dial(&url, None).await
}

/// Waits until the link closes, returning how long that took.
pub async fn closed_within(socket: &mut ClientSocket, limit: Duration) -> bool {
    tokio::time::timeout(limit, async { while next_frame(socket).await.is_some() {} })
        .await
        .is_ok()
}

/// A negotiation `Hello` (anonymous) speaking protocol `version`.
pub fn hello(version: u32) -> v1::ClientToCoordinator {
    v1::ClientToCoordinator::hello(v1::Hello {
        protocol_version: version,
        ..v1::Hello::default()
    })
}
