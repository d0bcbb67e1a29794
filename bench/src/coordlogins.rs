//! Logins one coordinator takes, on a core of its own (relaymesh only). The coordinator is the
//! only server process; the generator plays the rest of the cluster, over the real protocol:
//!
//! * `SERVERS` comm servers: each registers over `/v1/servers` (the cluster secret, `Register`,
//!   a `Load` every half heartbeat interval, `Pong`s) and answers every `Reserve` with a
//!   `Reserved` key, as a comm server does, minus the key store;
//! * the clients, logging in either way a client can (`--relaymesh-logins`):
//!   * `relay`: as a comm server relays the login of a client that dialled it without a key, a
//!     `RelayedLogin` on one of those links in turn (taking the identity, as comm servers do),
//!     answered there by a `RelayedLoginAnswer` (with a `Reserve` first from a coordinator
//!     that answers with keys only);
//!   * `http`: `POST /v1/login`, on a TCP connection of its own as the client library sends
//!     it (the client closes once it has the answer); written and read by hand rather than
//!     with the client library's HTTP client, so the generator's cost per login stays low.
//!
//! Both are open loop at a fixed rate; latency runs from the login's due time to its answer.
//! What a comm server does besides (the client's WebSocket, starting its session) is spread
//! over the servers a cluster has and is left out here: this measures the one process every
//! login goes through. The `logins` scenario measures the whole `Client::connect` instead.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use relaymesh_net::link::{self, Flow, Heartbeat};
use relaymesh_net::queue;
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, coordinator_to_server::Kind};
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION, encode, error};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::logins::{DRAIN, LoginStep, MAX_IN_FLIGHT, Meter, Schedule, Tally, ladder};
use crate::measure::now_ns;
use crate::servers::{CLUSTER_SECRET, Running};

/// Comm servers the generator plays.
const SERVERS: usize = 3;
/// Longest wait for one HTTP login.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for one played server's writer.
const LINK_QUEUE: usize = 16_384;
/// How long a relaying server waits for its answer (the comm server's default
/// `login_relay_timeout_ms`).
const WITHIN_MS: u32 = 8000;
/// The link's timings until the coordinator's `Registered` says its own.
const HEARTBEAT: Heartbeat = Heartbeat {
    timeout: Duration::from_secs(15),
    interval: Duration::from_secs(2),
};

type Shared = Arc<Mutex<Tally>>;

/// One played comm server, as the link driver runs it.
struct Played {
    tx: queue::Sender<Bytes>,
    tally: Shared,
    heartbeat: Heartbeat,
    registered: Option<oneshot::Sender<bool>>,
    keys: u64,
}

impl Played {
    fn send(&self, msg: &v1::ServerToCoordinator) -> Result<(), v1::Error> {
        self.tx.try_send(encode(msg)).map_err(|_| {
            error(
                ErrorCode::Unavailable,
                "the played server's queue to the coordinator is full",
            )
        })
    }
}

impl link::Handler for Played {
    type In = v1::CoordinatorToServer;

    async fn first(&mut self, msg: v1::CoordinatorToServer) -> Result<Flow, v1::Error> {
        let registered = match msg.kind {
            Some(Kind::Registered(registered)) => registered,
            Some(Kind::Error(e)) => return Err(e),
            _ => return Err(error(ErrorCode::BadFrame, "expected Registered")),
        };
        let ms = |ms: u32| Duration::from_millis(u64::from(ms.max(1)));
        // Load reports every half interval, as a comm server sends them.
        self.heartbeat = Heartbeat {
            timeout: ms(registered.heartbeat_timeout_ms),
            interval: ms(registered.heartbeat_interval_ms) / 2,
        };
        self.beat();
        if let Some(tx) = self.registered.take() {
            let _ = tx.send(registered.relays_logins);
        }
        Ok(Flow::Continue)
    }

    async fn message(&mut self, msg: v1::CoordinatorToServer) -> Result<Flow, v1::Error> {
        match msg.kind {
            Some(Kind::Reserve(reserve)) => {
                self.keys += 1;
                self.send(&v1::ServerToCoordinator::reserved(v1::Reserved {
                    request_id: reserve.request_id,
                    key: format!("{:032x}", self.keys),
                    expires_in_ms: 30_000,
                }))?;
            }
            Some(Kind::RelayedLoginAnswer(answer)) => {
                let identity = answer.identity.is_some();
                let outcome = match (answer.error, answer.offer, identity) {
                    (Some(e), _, _) => Err(format!("{:?}: {}", e.error_code(), e.message)),
                    (None, Some(_), false) | (None, None, true) => Ok(()),
                    (None, Some(_), true) => Err("an answer with an offer and an identity".into()),
                    (None, None, false) => Err("an answer with neither offer nor error".into()),
                };
                let ok = outcome.is_ok();
                let mut tally = lock(&self.tally);
                // The request id is the login's due time.
                if tally.answered(answer.request_id, outcome) {
                    tally.in_flight = tally.in_flight.saturating_sub(1);
                    tally.identities += u64::from(ok && identity);
                }
            }
            Some(Kind::Ping(ping)) => {
                self.send(&v1::ServerToCoordinator::pong(v1::Pong {
                    nonce: ping.nonce,
                }))?;
            }
            Some(Kind::Error(e)) => return Err(e),
            // Peers come and go (the other played servers); nothing here links to them. Keys
            // given back (`Unreserve`) were never kept.
            _ => {}
        }
        Ok(Flow::Continue)
    }

    fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }

    fn beat(&mut self) {
        // A missed report is made up by the next one.
        let _ = self.send(&v1::ServerToCoordinator::load(v1::Load::default()));
    }

    fn stopping(&mut self) -> Result<(), v1::Error> {
        Ok(())
    }

    fn last_words(&self, _error: v1::Error) -> Option<Bytes> {
        None
    }
}

/// The played servers, registered with the coordinator.
struct Cluster {
    links: Vec<queue::Sender<Bytes>>,
    tally: Shared,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Cluster {
    async fn register(running: &Running, relay: bool) -> anyhow::Result<Self> {
        let coordinator = &running.endpoints.urls[0];
        let tally = Shared::default();
        let stop = CancellationToken::new();
        let mut links = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..SERVERS {
            let url = format!("{coordinator}/v1/servers");
            let socket = relaymesh_net::ws::dial_link(
                &url,
                Some(&format!("Bearer {CLUSTER_SECRET}")),
                &relaymesh_net::ws::WsLimits::default(),
                &running.endpoints.tls,
                Duration::from_secs(5),
            )
            .await
            .with_context(|| format!("dialling {url}"))?;
            let (tx, rx) = queue::bounded(LINK_QUEUE);
            let register = v1::ServerToCoordinator::register(v1::Register {
                protocol_version: PROTOCOL_VERSION,
                server_id: format!("played-{i}"),
                // Never dialled: the coordinator hands it to clients, which are played too.
                public_url: format!("ws://127.0.0.1:{}", 9 + i),
                capacity: u32::MAX,
                version: "bench".into(),
                // As a comm server says: keys given back are sent, and ignored here.
                unreserves: true,
            });
            let options = link::Options {
                writer: link::WriterSetup {
                    ctrl: rx,
                    data: None,
                    closer: link::Closer::new(),
                    linger: link::LINGER,
                    direct: None,
                    on_close: link::OnClose::SendQueued,
                    first: link::First::Frames(vec![encode(&register)]),
                },
                handshake: Some(Duration::from_secs(5)),
                shutdown: stop.clone(),
                max_burst: link::MAX_BURST,
                watch: link::Watch::Own,
            };
            let (registered_tx, registered) = oneshot::channel();
            let played = Played {
                tx: tx.clone(),
                tally: tally.clone(),
                heartbeat: HEARTBEAT,
                registered: Some(registered_tx),
                keys: 0,
            };
            let served = link::serve(socket, options, played);
            tasks.spawn(async move {
                if let Err(e) = served.await.outcome {
                    eprintln!("a played comm server's link ended: {e:?}");
                }
            });
            let relays = registered
                .await
                .context("the coordinator did not register a played comm server")?;
            if relay && !relays {
                bail!("this coordinator does not take relayed logins (Registered.relays_logins)");
            }
            links.push(tx);
        }
        Ok(Self {
            links,
            tally,
            stop,
            tasks,
        })
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// `POST /v1/login` with anonymous credentials, the body the client library sends.
fn login_request(addr: SocketAddr) -> Bytes {
    let body = r#"{"credentials":{"anonymous":{}},"client_id":"","preferred_server":null,"exclude":[],"moving":false}"#;
    Bytes::from(format!(
        "POST /v1/login HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// One HTTP login on a connection of its own: `Ok` for a `200` with its whole body.
async fn http_login(addr: SocketAddr, request: &[u8]) -> Result<(), String> {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    socket
        .write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if socket
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("the coordinator closed before its answer".into());
        }
        let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let headers = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
        let length = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() < head + 4 + length {
            continue;
        }
        let status = headers.split(' ').nth(1).unwrap_or_default();
        return if status == "200" {
            Ok(())
        } else {
            Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&buf[head + 4..])
            ))
        };
    }
}

async fn step(
    running: &Running,
    cluster: &Cluster,
    relay: bool,
    rate: f64,
    window: Duration,
    max_p99_ms: f64,
) -> anyhow::Result<LoginStep> {
    let addr: SocketAddr = running.endpoints.urls[0]
        .trim_start_matches("ws://")
        .parse()
        .context("the coordinator's address")?;
    let request = login_request(addr);
    let login = v1::Login {
        protocol_version: PROTOCOL_VERSION,
        credentials: Some(v1::Credentials {
            kind: Some(v1::credentials::Kind::Anonymous(v1::Anonymous {})),
        }),
        ..v1::Login::default()
    };
    let mut schedule = Schedule::new(rate, window);
    *lock(&cluster.tally) = Tally::new(schedule.start());
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let meter = Meter::start(running);
    let mut tasks = tokio::task::JoinSet::new();
    let full = || Err(format!("{MAX_IN_FLIGHT} logins already in flight"));
    loop {
        let due_now = schedule.due();
        if relay {
            let mut tally = lock(&cluster.tally);
            for (n, due) in due_now {
                if tally.in_flight >= MAX_IN_FLIGHT {
                    tally.answered(due, full());
                    continue;
                }
                let frame = encode(&v1::ServerToCoordinator::relayed_login(v1::RelayedLogin {
                    // Unique in the run: due times only grow.
                    request_id: due,
                    login: Some(login.clone()),
                    from: "127.0.0.1".into(),
                    within_ms: WITHIN_MS,
                    takes_identity: true,
                }));
                match cluster.links[n as usize % SERVERS].try_send(frame) {
                    Ok(()) => tally.in_flight += 1,
                    Err(_) => {
                        tally.answered(due, Err("a played link's queue is full".into()));
                    }
                }
            }
        } else {
            for (_, due) in due_now {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    lock(&cluster.tally).answered(due, full());
                    continue;
                };
                let (tally, request) = (cluster.tally.clone(), request.clone());
                tasks.spawn(async move {
                    let outcome = tokio::time::timeout(HTTP_TIMEOUT, http_login(addr, &request))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {HTTP_TIMEOUT:?}")));
                    drop(permit);
                    lock(&tally).answered(due, outcome);
                });
            }
        }
        if schedule.done() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The answers still on their way (every HTTP login ends within its timeout).
    let drain_until = now_ns() + DRAIN.as_nanos() as u64;
    while tasks.join_next().await.is_some() {}
    while lock(&cluster.tally).in_flight > 0 && now_ns() < drain_until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let tally = lock(&cluster.tally);
    Ok(meter.finish(
        running,
        (rate, window, max_p99_ms),
        schedule.attempted(),
        &tally,
        tally.in_flight as u64,
    ))
}

/// Steps the login rate up (see [`ladder`]), logins relayed (`relay`) or over HTTP.
pub(crate) async fn run(
    running: &Running,
    relay: bool,
    rates: &[f64],
    (warmup, window): (Duration, Duration),
    max_p99_ms: f64,
    progress: impl FnMut(&LoginStep),
) -> anyhow::Result<Vec<LoginStep>> {
    let cluster = Cluster::register(running, relay).await?;
    let steps = ladder(
        rates,
        (warmup, window),
        |rate, window| step(running, &cluster, relay, rate, window, max_p99_ms),
        progress,
    )
    .await;
    cluster.stop().await;
    steps
}
