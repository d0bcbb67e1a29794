//! What an HTTP client may hold open is bounded: a body that never comes, a body that is too
//! large, a connection that sends nothing, a keep-alive connection left idle.

use relaymesh_tests::{CoordinatorHandle, coordinator_config, get_text, within};
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
