//! What an HTTP client may hold open is bounded: a body that never comes, a body that is too
//! large, a connection that sends nothing, a keep-alive connection left idle, more connections
//! from one address than it may hold.

use std::net::SocketAddr;

use relaymesh_net::http::{Method, request};
use relaymesh_net::ws::{self, WsLimits};
use relaymesh_proto::v1;
use relaymesh_tests::raw::{next_frame, send_msg};
use relaymesh_tests::{
    Cluster, CoordinatorHandle, PATIENCE, coordinator_config, eventually, get_text, within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Sends `request` on a new connection and reads until the server closes it.
async fn until_closed(addr: std::net::SocketAddr, request: &str) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within("the server closes the connection", async {
        // A reset after the answer counts as closed too.
        let _ = socket.read_to_end(&mut answer).await;
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn http_requests_are_bounded_in_time_and_size() {
    let mut config = coordinator_config();
    config.request_timeout_ms = 300;
    config.max_body_bytes = 1024;
    let coordinator = CoordinatorHandle::start(config).await;
    let addr = coordinator.addr;

    // Complete headers of a login whose body never comes: `408`, then the connection closes.
    let stalled = until_closed(
        addr,
        "POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n{\"cre",
    )
    .await;
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(stalled.contains("LIMIT_EXCEEDED"), "{stalled}");

    // A declared body over the limit: `413` before any of it is read.
    let large = until_closed(
        addr,
        "POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 1000000\r\n\r\n",
    )
    .await;
    assert!(large.starts_with("HTTP/1.1 413"), "{large}");

    // A chunked body that runs past the limit is cut there.
    let chunk = "x".repeat(2000);
    let chunked = until_closed(
        addr,
        &format!(
            "POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        ),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");

    // A connection that never sends a byte is closed without an answer...
    assert_eq!(until_closed(addr, "").await, "");
    // ...and so is a keep-alive connection left idle after its answer.
    let idle = until_closed(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(idle.starts_with("HTTP/1.1 200"), "{idle}");
    assert!(idle.ends_with("ok\n"), "{idle}");

    // None of it kept the coordinator from serving.
    assert_eq!(
        get_text(&format!("http://{addr}/healthz")).await,
        (200, "ok\n".into())
    );
}

/// A new connection to `addr` with one request answered `200` on it, left open (keep-alive);
/// `None` when the server answers otherwise or closes it.
async fn served(addr: SocketAddr) -> Option<TcpStream> {
    let mut socket = TcpStream::connect(addr).await.ok()?;
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    within("an answer to /healthz", async {
        while !answer.ends_with(b"ok\n") {
            let mut buf = [0u8; 1024];
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(b"ok\n")).then_some(socket)
}

/// Checks `answer` is the refusal of a connection over its address's allowance.
fn assert_too_many(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    assert_eq!(body["code"], "LIMIT_EXCEEDED", "{answer}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("too many connections from your address")),
        "{answer}"
    );
}

/// One address holds at most `max_connections_per_ip` connections, and a WebSocket session
/// holds its slot until it closes. Waits are `eventually` because a closed connection's slot is
/// given back when the server sees the close, not when the client closes.
#[tokio::test]
async fn one_address_holds_at_most_max_connections_per_ip_websockets_included() {
    let cluster = Cluster::start_with(1, |c| c.max_connections_per_ip = 3).await;
    let addr = cluster.servers[0].addr;

    // A client session: a WebSocket upgraded on the comm server's listener.
    let (url, _) =
        relaymesh_tests::raw::login_url(&cluster.coordinator.addr, &serde_json::json!({})).await;
    // (The cluster's start-up requests may not have been seen closing yet.)
    let mut session = eventually("a client session", || async {
        ws::dial(&url, None, &WsLimits::default(), PATIENCE)
            .await
            .ok()
    })
    .await;
    send_msg(
        &mut session,
        &v1::ClientToServer::attach(v1::Attach {
            protocol_version: relaymesh_proto::PROTOCOL_VERSION,
        }),
    )
    .await;
    let ready: v1::ServerToClient =
        relaymesh_proto::decode(next_frame(&mut session).await.expect("Ready")).unwrap();
    assert!(
        matches!(ready.kind, Some(v1::server_to_client::Kind::Ready(_))),
        "{ready:?}"
    );

    // Two plain HTTP connections besides it stay open...
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(eventually("an HTTP connection", || served(addr)).await);
    }
    // ...and a fourth is answered at once, before it has sent anything, and closed.
    assert_too_many(&until_closed(addr, "").await);
    // An HTTP client that sends its request reads the same answer.
    assert_too_many(&until_closed(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await);

    // A closed connection gives its slot back.
    drop(held.pop());
    held.push(eventually("a slot freed by a close", || served(addr)).await);
    // The WebSocket session still holds its slot, long after its upgrade...
    assert_too_many(&until_closed(addr, "").await);
    // ...until it closes.
    drop(session);
    held.push(eventually("the session's slot freed by its close", || served(addr)).await);
    assert_too_many(&until_closed(addr, "").await);

    // The refusals are counted, in /v1/stats and /metrics.
    drop(held);
    let stats: serde_json::Value = eventually("stats once the connections closed", || async {
        let (status, body) = request(
            Method::GET,
            &format!("http://{addr}/v1/stats"),
            None,
            PATIENCE,
        )
        .await
        .ok()?;
        (status == 200).then(|| serde_json::from_slice(&body).unwrap())
    })
    .await;
    let refused = stats["connections_refused_per_ip"].as_u64().unwrap();
    assert!(refused >= 4, "{stats}");
    let (status, metrics) = get_text(&format!("http://{addr}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nrelaymesh_connections_refused_per_ip_total "),
        "{metrics}"
    );
    // The coordinator's listener has its own count.
    assert_eq!(
        cluster.coordinator.stats().await["connections_refused_per_ip"],
        0
    );
}
