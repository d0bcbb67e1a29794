//! The TCP/UDP device gateway with real sockets: drivers over WebSocket, devices over plain TCP
//! and UDP on 127.0.0.1, and a comm server whose coordinator never answers (the gateway does
//! not need it).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use relaymesh_net::ws::{self, ClientSocket, DialError, WsLimits};
use relaymesh_tests::raw::{next_frame, send};
use relaymesh_tests::{eventually, get_text, restartable_addr, server_config, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "driver-secret";
const OPENED: u8 = 0;
const CLOSED: u8 = 1;
const RECEIVED: u8 = 2;
const WRITE: u8 = 3;
const CLOSE: u8 = 4;

/// A comm server with only the gateway in use; stopped on drop.
struct Gateway {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Gateway {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut commserver::Config)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dispatch = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = dispatch.local_addr().unwrap();
        // A coordinator that is never there: the gateway serves regardless.
        let mut config = server_config("ws://127.0.0.1:9");
        config.dispatch_listen = Some(addr);
        config.dispatch_secret = TOKEN.into();
        config.dispatch_bind_ip = [127, 0, 0, 1].into();
        tweak(&mut config);
        let stop = CancellationToken::new();
        tokio::spawn(commserver::run_with(
            listener,
            Some(dispatch),
            config,
            stop.clone(),
        ));
        Self { addr, stop }
    }

    fn url(&self, proto: &str, port: u16, accept: &str) -> String {
        format!(
            "ws://{}/api/dispatch/v1/{proto}_dispatch?port={port}&accept={accept}",
            self.addr
        )
    }

    async fn driver(&self, proto: &str, port: u16, accept: &str) -> ClientSocket {
        ws::dial_authorized(
            &self.url(proto, port, accept),
            Some(&format!("Bearer {TOKEN}")),
            &WsLimits::default(),
            &Default::default(),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    }

    async fn stats(&self) -> serde_json::Value {
        let (status, body) = get_text(&format!(
            "http://{}/api/dispatch/v1/?bearer_token={TOKEN}",
            self.addr
        ))
        .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until `kind` (e.g. `tcp_listeners`) shows `n` drivers (0: gone) on `port`.
    async fn wait_listeners(&self, kind: &str, port: u16, n: u64) {
        eventually(&format!("{kind}[{port}] = {n}"), || async {
            let stats = self.stats().await;
            let have = stats[kind][port.to_string()].as_u64().unwrap_or(0);
            (have == n).then_some(())
        })
        .await;
    }
}

fn encode(kind: u8, ip: &str, id: u64, data: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    b.put_slice(ip.as_bytes());
    b.put_u8(0);
    b.put_u64(id);
    b.put_u32(u32::try_from(data.len()).unwrap());
    b.put_slice(data);
    b.freeze()
}

/// `(type, ip, id, data)` of a gateway frame.
fn decode(f: &[u8]) -> (u8, String, u64, Vec<u8>) {
    let nul = f[1..].iter().position(|&b| b == 0).unwrap() + 1;
    let ip = String::from_utf8(f[1..nul].to_vec()).unwrap();
    let id = u64::from_be_bytes(f[nul + 1..nul + 9].try_into().unwrap());
    let len = u32::from_be_bytes(f[nul + 9..nul + 13].try_into().unwrap()) as usize;
    assert_eq!(f.len(), nul + 13 + len, "length field");
    (f[0], ip, id, f[nul + 13..].to_vec())
}

async fn expect(driver: &mut ClientSocket, kind: u8) -> (String, u64, Vec<u8>) {
    let frame = next_frame(driver).await.expect("a frame from the gateway");
    let (got, ip, id, data) = decode(&frame);
    assert_eq!(got, kind, "frame {frame:?}");
    (ip, id, data)
}

/// The close reason the gateway ends a driver session with.
async fn close_reason(driver: &mut ClientSocket) -> String {
    within("session closes", async {
        loop {
            match driver.next().await {
                Some(Ok(WsMessage::Close(frame))) => {
                    return frame.map(|f| f.reason.to_string()).unwrap_or_default();
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return String::new(),
            }
        }
    })
    .await
}

async fn read_some(device: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let n = within("device read", device.read(&mut buf))
        .await
        .unwrap_or(0);
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn a_tcp_device_opens_talks_is_written_to_and_closed() {
    let gateway = Gateway::start().await;
    let port = restartable_addr().port();
    let mut driver = gateway.driver("tcp", port, "127.0.0.1").await;
    gateway.wait_listeners("tcp_listeners", port, 1).await;
    let mut device = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (ip, id, _) = expect(&mut driver, OPENED).await;
    assert_eq!(ip, "127.0.0.1");
    // Larger than any fixed buffer: arrives whole, in order, over one or more RECEIVED frames.
    let big = vec![7u8; 200_000];
    device.write_all(&big).await.unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (_, from, data) = expect(&mut driver, RECEIVED).await;
        assert_eq!(from, id);
        got.extend(data);
    }
    assert_eq!(got, big);
    send(&mut driver, encode(WRITE, "127.0.0.1", id, b"world")).await;
    assert_eq!(read_some(&mut device).await, b"world");
    assert_eq!(gateway.stats().await["tcp_clients"][port.to_string()], 1);
    send(&mut driver, encode(CLOSE, "127.0.0.1", id, b"")).await;
    assert!(read_some(&mut device).await.is_empty(), "device closed");
    assert_eq!(expect(&mut driver, CLOSED).await.1, id);
    // The last driver leaves: the port closes.
    driver.close(None).await.unwrap();
    gateway.wait_listeners("tcp_listeners", port, 0).await;
    eventually("port closed", || async {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert_eq!(gateway.stats().await["tcp_clients"], serde_json::json!({}));
}

#[tokio::test]
async fn a_udp_device_is_heard_and_answered() {
    let gateway = Gateway::start().await;
    let port = restartable_addr().port();
    let mut driver = gateway.driver("udp", port, "127.0.0.1").await;
    gateway.wait_listeners("udp_listeners", port, 1).await;
    let device = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    device.send_to(b"ping", ("127.0.0.1", port)).await.unwrap();
    let (ip, remote_port, data) = expect(&mut driver, RECEIVED).await;
    assert_eq!(
        (ip.as_str(), remote_port, data.as_slice()),
        (
            "127.0.0.1",
            u64::from(device.local_addr().unwrap().port()),
            &b"ping"[..]
        )
    );
    send(
        &mut driver,
        encode(WRITE, "127.0.0.1", remote_port, b"pong"),
    )
    .await;
    let mut buf = [0u8; 16];
    let (n, _) = within("UDP answer", device.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf[..n], b"pong");
}

#[tokio::test]
async fn drivers_fan_out_accept_lists_refuse_and_leaving_closes_what_is_uncovered() {
    let gateway = Gateway::start().await;
    let port = restartable_addr().port();
    let mut both = gateway.driver("tcp", port, "127.0.0.1,127.0.0.2").await;
    let mut local = gateway.driver("tcp", port, "127.0.0.1").await;
    gateway.wait_listeners("tcp_listeners", port, 2).await;
    let mut device = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (_, id, _) = expect(&mut both, OPENED).await;
    assert_eq!(expect(&mut local, OPENED).await.1, id);
    device.write_all(b"to everyone").await.unwrap();
    for driver in [&mut both, &mut local] {
        assert_eq!(expect(driver, RECEIVED).await.2, b"to everyone");
    }
    // An address no driver accepts is refused and counted.
    let other_port = restartable_addr().port();
    let mut elsewhere = gateway.driver("tcp", other_port, "127.0.0.2").await;
    gateway.wait_listeners("tcp_listeners", other_port, 1).await;
    let mut stranger = TcpStream::connect(("127.0.0.1", other_port)).await.unwrap();
    assert!(
        read_some(&mut stranger).await.is_empty(),
        "refused device is closed"
    );
    assert!(gateway.stats().await["connections_refused"].as_u64() >= Some(1));
    elsewhere.close(None).await.unwrap();
    // `both` leaves: `local` still covers the device, which stays connected.
    both.close(None).await.unwrap();
    gateway.wait_listeners("tcp_listeners", port, 1).await;
    device.write_all(b"still here").await.unwrap();
    assert_eq!(expect(&mut local, RECEIVED).await.2, b"still here");
    // The last driver leaves: the device is closed and the port shuts.
    local.close(None).await.unwrap();
    assert!(
        read_some(&mut device).await.is_empty(),
        "uncovered device closed"
    );
    gateway.wait_listeners("tcp_listeners", port, 0).await;
}

#[tokio::test]
async fn a_device_no_remaining_driver_accepts_is_closed_when_its_driver_leaves() {
    let gateway = Gateway::start().await;
    let port = restartable_addr().port();
    let mut mine = gateway.driver("tcp", port, "127.0.0.1").await;
    let _other = gateway.driver("tcp", port, "127.0.0.2").await;
    gateway.wait_listeners("tcp_listeners", port, 2).await;
    let mut device = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    expect(&mut mine, OPENED).await;
    mine.close(None).await.unwrap();
    assert!(
        read_some(&mut device).await.is_empty(),
        "no driver covers it any more"
    );
    gateway.wait_listeners("tcp_listeners", port, 1).await;
}

#[tokio::test]
async fn bad_tokens_requests_and_frames_are_refused() {
    let gateway = Gateway::start().await;
    let port = restartable_addr().port();
    let url = gateway.url("tcp", port, "127.0.0.1");
    let limits = WsLimits::default();
    let five = Duration::from_secs(5);
    for auth in [None, Some("Bearer wrong")] {
        let refused = ws::dial_authorized(&url, auth, &limits, &Default::default(), five).await;
        assert!(
            matches!(refused, Err(DialError::Refused { status, .. }) if status == 401),
            "{auth:?}"
        );
    }
    // The token may come as a query parameter instead.
    let with_query = format!("{url}&bearer_token={TOKEN}");
    let mut driver = ws::dial_authorized(&with_query, None, &limits, &Default::default(), five)
        .await
        .unwrap();
    let bad_url = format!(
        "ws://{}/api/dispatch/v1/tcp_dispatch?port={port}",
        gateway.addr
    );
    let refused = ws::dial_authorized(
        &bad_url,
        Some(&format!("Bearer {TOKEN}")),
        &limits,
        &Default::default(),
        five,
    )
    .await;
    assert!(matches!(refused, Err(DialError::Refused { status, .. }) if status == 400));
    // A malformed frame, or a write to an address outside the accept list, is counted and
    // skipped (as PlaceOS does); the session goes on.
    send(&mut driver, Bytes::from_static(&[WRITE, b'1', b'2'])).await;
    send(&mut driver, encode(WRITE, "10.9.9.9", 1, b"x")).await;
    eventually("bad frames counted", || async {
        (gateway.stats().await["bad_frames"].as_u64() >= Some(2)).then_some(())
    })
    .await;
    gateway.wait_listeners("tcp_listeners", port, 1).await;
    let mut texting = gateway.driver("tcp", port, "127.0.0.1").await;
    texting.send(WsMessage::text("hello")).await.unwrap();
    assert!(
        close_reason(&mut texting)
            .await
            .contains("binary frames only")
    );
    // A port that cannot be bound is a clear close reason, not a crash.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let mut blocked = gateway.driver("tcp", taken_port, "127.0.0.1").await;
    assert!(close_reason(&mut blocked).await.contains("cannot bind"));
    assert!(gateway.stats().await["bad_frames"].as_u64() >= Some(3));
    // Health and version answer without a token; the stats need one.
    let base = format!("http://{}", gateway.addr);
    assert_eq!(get_text(&format!("{base}/healthz")).await.0, 200);
    assert!(
        get_text(&format!("{base}/version"))
            .await
            .1
            .contains("version")
    );
    assert_eq!(get_text(&format!("{base}/api/dispatch/v1/")).await.0, 401);
}

#[tokio::test]
async fn devices_are_reachable_from_the_mesh_when_bridged() {
    let dispatch_addr = restartable_addr();
    let cluster = relaymesh_tests::Cluster::start_with(1, |c| {
        c.dispatch_listen = Some(dispatch_addr);
        c.dispatch_secret = TOKEN.into();
        c.dispatch_bind_ip = [127, 0, 0, 1].into();
        c.dispatch_mesh_account = Some("plant".into());
    })
    .await;
    let gateway = Gateway {
        addr: dispatch_addr,
        stop: CancellationToken::new(),
    };
    let port = restartable_addr().port();
    let topic = format!("dispatch/tcp/{port}/127.0.0.1");
    // The coordinator's store is open: any code logs in to account "plant".
    let plant = relaymesh_client::Credentials::AccessCode {
        account: "plant".into(),
        code: "any".into(),
        role: "operator".into(),
        group: String::new(),
    };
    let mut operator = cluster.client_as(0, plant).await;
    operator.subscribe([topic.clone()]).await.unwrap();
    let mut driver = gateway.driver("tcp", port, "127.0.0.1").await;
    gateway.wait_listeners("tcp_listeners", port, 1).await;
    // The bridge subscribes to the device's write topic alongside the operator's topic.
    eventually("bridge subscribed", || async {
        (cluster.servers[0].stat("topics").await == 2).then_some(())
    })
    .await;
    let mut device = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    expect(&mut driver, OPENED).await;
    device.write_all(b"temp=21").await.unwrap();
    let m = relaymesh_tests::next_message(&mut operator).await;
    assert_eq!(
        (m.topic.as_str(), &*m.payload, m.role.as_str()),
        (topic.as_str(), &b"temp=21"[..], "dispatch")
    );
    assert_eq!(expect(&mut driver, RECEIVED).await.2, b"temp=21");
    operator
        .publish(&format!("{topic}/write"), "set=22")
        .await
        .unwrap();
    assert_eq!(read_some(&mut device).await, b"set=22");
}

#[tokio::test]
async fn a_port_over_its_byte_budget_drops_datagrams_and_counts_them() {
    let gateway = Gateway::start_with(|c| c.dispatch_port_bytes_per_s = 1).await;
    let port = restartable_addr().port();
    let mut driver = gateway.driver("udp", port, "127.0.0.1").await;
    gateway.wait_listeners("udp_listeners", port, 1).await;
    let device = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for datagram in [&b"first 8b"[..], b"second 8", b"third 8b"] {
        device.send_to(datagram, ("127.0.0.1", port)).await.unwrap();
    }
    // One byte a second: the first datagram takes the second's budget and more; the next two
    // come long before that debt is paid off.
    assert_eq!(expect(&mut driver, RECEIVED).await.2, b"first 8b");
    eventually("two datagrams dropped", || async {
        (gateway.stats().await["datagrams_dropped"] == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_silent_driver_is_let_go_and_its_port_closes() {
    let gateway = Gateway::start_with(|c| {
        c.heartbeat_interval_ms = 50;
        c.heartbeat_timeout_ms = 300;
    })
    .await;
    let port = restartable_addr().port();
    // This driver never reads, so it never answers the gateway's pings.
    let mut silent = gateway.driver("tcp", port, "127.0.0.1").await;
    gateway.wait_listeners("tcp_listeners", port, 1).await;
    gateway.wait_listeners("tcp_listeners", port, 0).await;
    let reason = close_reason(&mut silent).await;
    assert!(reason.contains("heartbeat"), "{reason:?}");
}
