//! Memory per idle client: connect N clients to one comm server (each logged in through the
//! coordinator, attached and subscribed to a topic of its own, then quiet but for WebSocket
//! pings), and divide the server's resident-memory growth by N. Connections come from several
//! source addresses (127.0.0.1, 127.0.0.2, ...) so the ephemeral port range is no limit. With
//! TLS the logins are `https://` and the connections `wss://`, each holding its TLS session.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use relaymesh_net::http::{Method, request_with};
use relaymesh_net::tls::Connector;
use relaymesh_proto::v1::{self, client_to_server, server_to_client};
use relaymesh_proto::{PROTOCOL_VERSION, decode_frame, encode};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::servers::Running;

/// One client count's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleStep {
    pub(crate) clients: usize,
    /// Why this count was not measured (empty when it was).
    pub(crate) blocked: String,
    pub(crate) server_rss_mib: f64,
    pub(crate) baseline_rss_mib: f64,
    /// Resident-memory growth over the baseline, per client.
    pub(crate) kib_per_client: f64,
    /// Seconds to open the clients added in this step.
    pub(crate) connect_s: f64,
}

/// Connections opened at once.
const CONCURRENCY: usize = 256;
/// File descriptors kept free for everything else in either process.
pub(crate) const FD_HEADROOM: usize = 256;

/// The soft `Max open files` limit of a process.
pub(crate) fn open_files_limit(pid: &str) -> Option<usize> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How many ports the kernel hands out to outgoing connections
/// (`net.ipv4.ip_local_port_range`), if it says.
pub(crate) fn ephemeral_ports() -> Option<usize> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut ends = range.split_whitespace().map(str::parse::<usize>);
    let (low, high) = (ends.next()?.ok()?, ends.next()?.ok()?);
    Some(high.saturating_sub(low) + 1)
}

/// TCP sockets in `TIME_WAIT` on this host (`/proc/net/sockstat`), if it says: an earlier
/// run's connections, which hold their ports for a minute.
pub(crate) fn time_wait_sockets() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = stat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

/// A quiet client: its connection and the task that answers pings and sends its own.
struct Idle {
    task: JoinHandle<()>,
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect_one(
    coordinator: &str,
    tls: &Connector,
    source: Ipv4Addr,
    i: usize,
) -> anyhow::Result<Idle> {
    let (status, body) = request_with(
        Method::POST,
        &format!("{coordinator}/v1/login"),
        &[],
        Some(b"{}".to_vec()),
        tls,
        Duration::from_secs(10),
    )
    .await?;
    if !status.is_success() {
        bail!("login refused: {status} {}", String::from_utf8_lossy(&body));
    }
    let login: serde_json::Value = serde_json::from_slice(&body)?;
    let (Some(url), Some(key)) = (login["url"].as_str(), login["key"].as_str()) else {
        bail!("login answer without url and key: {login}");
    };
    let (secure, rest) = match url.strip_prefix("wss://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("ws://").unwrap_or_default()),
    };
    let addr: SocketAddr = rest
        .split('/')
        .next()
        .and_then(|hostport| hostport.parse().ok())
        .with_context(|| format!("unexpected server URL {url}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    // Small buffers: this is the idle client; the server's are what is measured.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let request = format!("{url}?key={key}");
    if secure {
        let stream = tls
            .connect(&addr.ip().to_string(), stream)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        attach(ws, i).await
    } else {
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        attach(ws, i).await
    }
}

/// Attaches a client's WebSocket, subscribes it to a topic of its own and leaves it quiet but
/// for pings.
async fn attach<S>(mut ws: WebSocketStream<S>, i: usize) -> anyhow::Result<Idle>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let attach = v1::ClientToServer {
        kind: Some(client_to_server::Kind::Attach(v1::Attach {
            protocol_version: PROTOCOL_VERSION,
        })),
    };
    let subscribe = v1::ClientToServer {
        kind: Some(client_to_server::Kind::Subscribe(v1::Subscribe {
            request_id: 1,
            topics: vec![format!("idle-{i}")],
            recover: Vec::new(),
        })),
    };
    ws.feed(WsMessage::Binary(encode(&attach))).await?;
    ws.feed(WsMessage::Binary(encode(&subscribe))).await?;
    ws.flush().await?;
    let (mut ready, mut acked) = (None, false);
    while ready.is_none() || !acked {
        let frame = match ws.next().await.context("server closed while attaching")?? {
            WsMessage::Binary(frame) => frame,
            WsMessage::Close(c) => bail!("server closed while attaching: {c:?}"),
            _ => continue,
        };
        match decode_frame::<v1::ServerToClient>(frame)
            .map_err(|e| anyhow::anyhow!("server refused: {}", e.message))?
            .kind
        {
            Some(server_to_client::Kind::Ready(r)) => ready = Some(r),
            Some(server_to_client::Kind::Ack(a)) if a.request_id == 1 => acked = true,
            Some(server_to_client::Kind::Error(e)) => bail!("server refused: {}", e.message),
            _ => {}
        }
    }
    let interval = ready
        .map(|r| Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(1000))))
        .unwrap_or(Duration::from_secs(5));
    let task = tokio::spawn(async move {
        let mut ping = tokio::time::interval(interval);
        ping.tick().await;
        loop {
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(_)) => {}
                    _ => {
                        eprintln!("bench: idle client {i} was disconnected");
                        return;
                    }
                },
                _ = ping.tick() => {
                    if ws.send(WsMessage::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(Idle { task })
}

async fn server_clients(stats_url: &str, tls: &Connector) -> Option<u64> {
    let (status, body) = request_with(
        Method::GET,
        stats_url,
        &[],
        None,
        tls,
        Duration::from_secs(5),
    )
    .await
    .ok()?;
    if !status.is_success() {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&body).ok()?["clients"].as_u64()
}

/// Measures server memory at each client count in `targets` (ascending; counts the file
/// descriptor limits cannot hold are reported as blocked, and the largest count they can hold is
/// measured instead).
pub(crate) async fn run(
    running: &Running,
    targets: &[usize],
    sources: u8,
    mut progress: impl FnMut(&IdleStep),
) -> anyhow::Result<Vec<IdleStep>> {
    let pid = running
        .pid("commserver-a")
        .context("no comm server running")?;
    let server_limit = open_files_limit(&pid.to_string()).unwrap_or(usize::MAX);
    let own_limit = open_files_limit("self").unwrap_or(usize::MAX);
    let cap = server_limit.min(own_limit).saturating_sub(FD_HEADROOM);
    // `ws://` and `wss://` serve for `http://` and `https://`.
    let coordinator = running.endpoints.urls[0].clone();
    let tls = &running.endpoints.tls;
    let stats_url = format!(
        "{}/v1/stats",
        running.server_http.first().context("no comm server URL")?
    );
    let rss = || relaymesh_net::procstat::of_process(pid).map_or(0, |u| u.rss_bytes);
    let baseline = rss();
    let mut plan: Vec<(usize, String)> = Vec::new();
    let mut sorted = targets.to_vec();
    sorted.sort_unstable();
    for &n in &sorted {
        if n <= cap {
            plan.push((n, String::new()));
        } else {
            if plan
                .last()
                .is_none_or(|(last, why)| *last < cap && why.is_empty())
            {
                plan.push((cap, String::new()));
            }
            plan.push((
                n,
                format!(
                    "needs {n} open files in the comm server and in the generator; RLIMIT_NOFILE is {} (server) and {} (generator), and raising it needs CAP_SYS_RESOURCE",
                    server_limit, own_limit
                ),
            ));
        }
    }
    let sources: Vec<Ipv4Addr> = (1..=sources.max(1))
        .map(|d| Ipv4Addr::new(127, 0, 0, d))
        .collect();
    let mut clients: Vec<Idle> = Vec::new();
    let mut steps = Vec::new();
    for (n, blocked) in plan {
        if !blocked.is_empty() {
            let step = IdleStep {
                clients: n,
                blocked,
                server_rss_mib: 0.0,
                baseline_rss_mib: baseline as f64 / 1048576.0,
                kib_per_client: 0.0,
                connect_s: 0.0,
            };
            progress(&step);
            steps.push(step);
            continue;
        }
        let started = Instant::now();
        let from = clients.len();
        let added = futures_util::stream::iter(from..n)
            .map(|i| connect_one(&coordinator, tls, sources[i % sources.len()], i))
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("opening idle client connections towards {n}"))?;
        clients.extend(added);
        let connect_s = started.elapsed().as_secs_f64();
        // The server counts a client once its session is set up; wait for all of them.
        let deadline = Instant::now() + Duration::from_secs(30);
        while server_clients(&stats_url, tls).await != Some(n as u64) {
            if Instant::now() > deadline {
                bail!("the comm server does not report {n} clients");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let now = rss();
        let step = IdleStep {
            clients: n,
            blocked: String::new(),
            server_rss_mib: now as f64 / 1048576.0,
            baseline_rss_mib: baseline as f64 / 1048576.0,
            kib_per_client: now.saturating_sub(baseline) as f64 / 1024.0 / n as f64,
            connect_s,
        };
        progress(&step);
        steps.push(step);
    }
    Ok(steps)
}
