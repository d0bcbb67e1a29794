//! The device dispatch gateway: plain TCP and UDP devices that cannot speak WebSocket, bridged
//! to drivers over WebSocket, wire-compatible with PlaceOS dispatch.
//!
//! A driver opens `/api/dispatch/v1/tcp_dispatch?port=P&accept=IP1,IP2` (or `udp_dispatch`)
//! with the driver secret. While at least one driver wants port P, the gateway listens on it;
//! every driver whose accept list covers a device's address gets that device's `OPENED`,
//! `RECEIVED` and `CLOSED` events, and may `WRITE` to it or `CLOSE` it. Devices from addresses no
//! driver accepts are refused (TCP) or dropped (UDP) and counted. When a driver leaves, TCP
//! devices no longer covered by any driver are closed; when the last one leaves, the port
//! closes. The gateway runs on its own listener, independent of the coordinator link.
//!
//! Locks: `Dispatch::ports` before `Port::drivers` before `Port::clients`, each held for a few
//! instructions and never across an await.

pub(crate) mod frame;
mod mesh;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Query, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use relaymesh_net::accept::{self, ServerSocket};
use relaymesh_net::limits::TokenBucket;
use relaymesh_net::link::Backlog;
use relaymesh_net::serve::ApiError;
use relaymesh_net::sync::lock;
use relaymesh_proto::ErrorCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::frame::Kind;
use crate::Config;

/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65_536;

/// A port's budget of device bytes per second (`dispatch_port_bytes_per_s`), with a second's
/// worth of burst. TCP devices over it are read more slowly (TCP pushes back on them); UDP
/// datagrams over it are dropped and counted.
fn byte_rate(rate: u64, now: std::time::Instant) -> TokenBucket {
    TokenBucket::full_at(rate as f64, rate as f64, now)
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

/// What a driver session's writer sends.
#[derive(Debug)]
enum Out {
    Frame(Bytes),
    Ping,
}

/// Where events for one driver go: its queue (its writer task holds the receiver; full, in
/// frames or bytes, drops the event and counts it) and the queue's byte accounting.
#[derive(Debug, Clone)]
struct DriverOut {
    tx: mpsc::Sender<Out>,
    backlog: Arc<Backlog>,
}

/// A driver session's interest in a port.
#[derive(Debug)]
struct Driver {
    out: DriverOut,
    accept: HashSet<IpAddr>,
}

/// A connected TCP device.
#[derive(Debug)]
struct Device {
    ip: IpAddr,
    /// Writes for the device; its task holds the receiver.
    tx: mpsc::Sender<Bytes>,
    stop: CancellationToken,
}

/// A device port and the drivers that want it.
#[derive(Debug)]
struct Port {
    proto: Proto,
    number: u16,
    drivers: Mutex<HashMap<u64, Driver>>,
    /// TCP devices by client id.
    clients: Mutex<HashMap<u64, Device>>,
    /// The UDP socket, for writes; taken when the port closes, so the socket closes with it.
    udp: Mutex<Option<Arc<UdpSocket>>>,
    /// Bytes of driver writes queued for this port's TCP devices (`dispatch_port_write_bytes`).
    write_backlog: Backlog,
    /// Last source port seen per UDP device address (where mesh writes go).
    udp_sources: Mutex<HashMap<IpAddr, u16>>,
    /// The port's byte budget, when limited.
    rate: Option<Mutex<TokenBucket>>,
    /// Stops the listener or receive loop and every device of the port.
    stop: CancellationToken,
}

impl Port {
    /// Queues of the drivers that accept `ip`.
    fn accepting(&self, ip: IpAddr) -> Vec<DriverOut> {
        accepting(&lock(&self.drivers), ip)
    }

    fn udp(&self) -> Option<Arc<UdpSocket>> {
        lock(&self.udp).clone()
    }
}

fn accepting(drivers: &HashMap<u64, Driver>, ip: IpAddr) -> Vec<DriverOut> {
    drivers
        .values()
        .filter(|d| d.accept.contains(&ip))
        .map(|d| d.out.clone())
        .collect()
}

/// Counters of the gateway.
#[derive(Debug, Default)]
struct Stats {
    connections_refused: AtomicU64,
    datagrams_dropped: AtomicU64,
    events_dropped: AtomicU64,
    writes_dropped: AtomicU64,
    bad_frames: AtomicU64,
    /// Times a TCP device was read more slowly to keep its port within its byte budget.
    throttled: AtomicU64,
}

/// The gateway's state.
#[derive(Debug)]
pub(crate) struct Dispatch {
    secret: String,
    bind_ip: IpAddr,
    max_clients_per_port: usize,
    driver_queue: usize,
    driver_queue_bytes: usize,
    write_queue: usize,
    port_write_bytes: usize,
    heartbeat: std::time::Duration,
    silence: std::time::Duration,
    read_bytes: usize,
    port_bytes_per_s: u64,
    limits: relaymesh_net::ws::WsLimits,
    ports: Mutex<BTreeMap<(Proto, u16), Arc<Port>>>,
    next_id: AtomicU64,
    stats: Stats,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The bridge into the mesh, when `dispatch_mesh_account` is set.
    mesh: Option<mesh::Bridge>,
}

/// Resolves at `at`, or never when there is no `at`.
async fn sleep_until_or_forever(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// An IPv4 address seen as IPv6-mapped is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Dispatch {
    /// Queues `frame` for each driver; a full queue drops it (counted).
    fn fan_out(&self, drivers: &[DriverOut], frame: &Bytes) {
        for d in drivers {
            if !d.backlog.reserve(frame.len()) {
                self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(e) = d.tx.try_send(Out::Frame(frame.clone())) {
                d.backlog.release(frame.len());
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Queues a write for a TCP device; a full queue (its own, or the port's bytes) drops it
    /// (counted).
    fn write_to(&self, port: &Port, device: &mpsc::Sender<Bytes>, data: Bytes) {
        let len = data.len();
        if !port.write_backlog.reserve(len) {
            self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if device.try_send(data).is_err() {
            port.write_backlog.release(len);
            self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The gateway of `server`; with `dispatch_mesh_account` set, also the bridge's task.
    pub(crate) fn start(
        server: &Arc<crate::Server>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let config = &server.config;
        let (mesh, queue) = match &config.dispatch_mesh_account {
            Some(scope) => {
                let (bridge, queue, changes) = mesh::Bridge::new(server.clone(), scope);
                tracker.spawn(mesh::forward_changes(server.control.clone(), changes));
                (Some(bridge), Some(queue))
            }
            None => (None, None),
        };
        let dispatch = Arc::new(Self::new(config, tracker.clone(), shutdown, mesh));
        if let Some(queue) = queue {
            tracker.spawn(dispatch.clone().bridge(queue));
        }
        dispatch
    }

    /// Writes messages from the mesh to devices, until shutdown.
    async fn bridge(self: Arc<Self>, mut queue: relaymesh_net::link::DataRx) {
        loop {
            let frame = tokio::select! {
                () = self.shutdown.cancelled() => return,
                frame = queue.recv() => match frame {
                    Some(frame) => frame,
                    None => return,
                },
            };
            let writes = self
                .mesh
                .as_ref()
                .map(|m| m.take(&frame))
                .unwrap_or_default();
            for (proto, number, ip, data) in writes {
                self.write_from_mesh(proto, number, ip, data).await;
            }
        }
    }

    /// Writes one mesh message to the device(s) at `ip` on a port.
    async fn write_from_mesh(&self, proto: Proto, number: u16, ip: IpAddr, data: Bytes) {
        let Some(port) = lock(&self.ports).get(&(proto, number)).cloned() else {
            return;
        };
        match proto {
            Proto::Tcp => {
                let devices: Vec<_> = lock(&port.clients)
                    .values()
                    .filter(|d| d.ip == ip)
                    .map(|d| d.tx.clone())
                    .collect();
                if devices.is_empty() {
                    self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                }
                for tx in devices {
                    self.write_to(&port, &tx, data.clone());
                }
            }
            Proto::Udp => {
                let source = lock(&port.udp_sources).get(&ip).copied();
                let sent = match (port.udp(), source) {
                    (Some(socket), Some(p)) => {
                        socket.send_to(&data, SocketAddr::new(ip, p)).await.is_ok()
                    }
                    _ => false,
                };
                if !sent {
                    self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn new(
        config: &Config,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        mesh: Option<mesh::Bridge>,
    ) -> Self {
        Self {
            mesh,
            secret: config.dispatch_secret.clone(),
            bind_ip: config.dispatch_bind_ip,
            max_clients_per_port: config.dispatch_max_clients_per_port,
            driver_queue: config.dispatch_driver_queue,
            driver_queue_bytes: config.dispatch_driver_queue_bytes,
            write_queue: config.dispatch_write_queue,
            port_write_bytes: config.dispatch_port_write_bytes,
            heartbeat: config.heartbeat_interval(),
            silence: config.heartbeat_timeout(),
            read_bytes: config.dispatch_read_bytes,
            port_bytes_per_s: config.dispatch_port_bytes_per_s,
            limits: relaymesh_net::ws::WsLimits {
                max_frame_bytes: config.dispatch_max_frame_bytes,
                ..relaymesh_net::ws::WsLimits::default()
            },
            ports: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            stats: Stats::default(),
            tracker,
            shutdown,
        }
    }

    /// The gateway's routes.
    pub(crate) fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/api/dispatch/v1/tcp_dispatch", get(tcp_dispatch))
            .route("/api/dispatch/v1/udp_dispatch", get(udp_dispatch))
            .route("/api/dispatch/v1/", get(stats))
            .route("/api/dispatch/v1", get(stats))
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/version",
                get(|| async { Json(json!({"version": env!("CARGO_PKG_VERSION")})) }),
            )
            .fallback(relaymesh_net::serve::not_found)
            .with_state(self)
    }

    /// Whether the request carries the driver secret (header or `bearer_token` parameter).
    fn authorized(&self, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
        if self.secret.is_empty() {
            return false;
        }
        relaymesh_net::auth::bearer_matches(headers, &self.secret)
            || query
                .get("bearer_token")
                .is_some_and(|t| relaymesh_net::auth::secret_matches(t, &self.secret))
    }

    /// Adds driver `id` to `(proto, number)`, opening the port if it is the first.
    fn join(
        self: &Arc<Self>,
        proto: Proto,
        number: u16,
        id: u64,
        driver: Driver,
    ) -> Result<Arc<Port>, String> {
        let mut ports = lock(&self.ports);
        if let Some(port) = ports.get(&(proto, number)) {
            let mut drivers = lock(&port.drivers);
            let covered: HashSet<IpAddr> = drivers
                .values()
                .flat_map(|d| d.accept.iter().copied())
                .collect();
            let new: Vec<IpAddr> = driver.accept.difference(&covered).copied().collect();
            drivers.insert(id, driver);
            if let Some(mesh) = &self.mesh
                && !new.is_empty()
            {
                mesh.watch(proto, number, &new);
            }
            return Ok(port.clone());
        }
        let watched: Vec<IpAddr> = driver.accept.iter().copied().collect();
        let addr = SocketAddr::new(self.bind_ip, number);
        let stop = self.shutdown.child_token();
        let (udp, listener) = match proto {
            Proto::Tcp => {
                let std = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| format!("cannot bind TCP port {number}: {e}"))?;
                let listener =
                    TcpListener::from_std(std).map_err(|e| format!("TCP port {number}: {e}"))?;
                (None, Some(listener))
            }
            Proto::Udp => {
                let std = std::net::UdpSocket::bind(addr)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|e| format!("cannot bind UDP port {number}: {e}"))?;
                let socket =
                    UdpSocket::from_std(std).map_err(|e| format!("UDP port {number}: {e}"))?;
                (Some(Arc::new(socket)), None)
            }
        };
        let port = Arc::new(Port {
            proto,
            number,
            drivers: Mutex::new(HashMap::from([(id, driver)])),
            clients: Mutex::new(HashMap::new()),
            udp: Mutex::new(udp.clone()),
            write_backlog: Backlog::new(self.write_queue, self.port_write_bytes),
            udp_sources: Mutex::new(HashMap::new()),
            rate: (self.port_bytes_per_s > 0)
                .then(|| Mutex::new(byte_rate(self.port_bytes_per_s, std::time::Instant::now()))),
            stop,
        });
        if let Some(mesh) = &self.mesh {
            mesh.watch(proto, number, &watched);
        }
        ports.insert((proto, number), port.clone());
        match (listener, udp) {
            (Some(listener), _) => {
                self.tracker
                    .spawn(self.clone().accept_loop(port.clone(), listener));
            }
            (_, Some(socket)) => {
                self.tracker
                    .spawn(self.clone().receive_loop(port.clone(), socket));
            }
            _ => {}
        }
        tracing::info!(port = number, ?proto, "dispatch port open");
        Ok(port)
    }

    /// Removes driver `id`; closes devices no longer covered, and the port with the last one.
    fn leave(&self, port: &Arc<Port>, id: u64) {
        let mut ports = lock(&self.ports);
        let mut drivers = lock(&port.drivers);
        let Some(gone) = drivers.remove(&id) else {
            return;
        };
        let covered: HashSet<IpAddr> = drivers
            .values()
            .flat_map(|d| d.accept.iter().copied())
            .collect();
        if let Some(mesh) = &self.mesh {
            let uncovered: Vec<IpAddr> = gone.accept.difference(&covered).copied().collect();
            if !uncovered.is_empty() {
                mesh.unwatch(port.proto, port.number, &uncovered);
            }
        }
        if drivers.is_empty() {
            ports.remove(&(port.proto, port.number));
            port.stop.cancel();
            // The receive loop holds the other reference and ends at the stop: the socket
            // closes now, not when the last session lets go of the port.
            lock(&port.udp).take();
            tracing::info!(port = port.number, proto = ?port.proto, "dispatch port closed");
            return;
        }
        for device in lock(&port.clients).values() {
            if !covered.contains(&device.ip) {
                device.stop.cancel();
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, port: Arc<Port>, listener: TcpListener) {
        loop {
            let (stream, addr) = tokio::select! {
                () = port.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(port = port.number, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let ip = canonical(addr.ip());
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(self.write_queue);
            let stop = port.stop.child_token();
            // Checked and recorded under the drivers' lock, so a driver leaving meanwhile
            // either sees the device (and closes it) or is already gone from this check.
            let admitted = {
                let drivers = lock(&port.drivers);
                let accepting = accepting(&drivers, ip);
                let mut clients = lock(&port.clients);
                let full = clients.len() >= self.max_clients_per_port;
                if accepting.is_empty() || full {
                    None
                } else {
                    let device = Device {
                        ip,
                        tx,
                        stop: stop.clone(),
                    };
                    clients.insert(id, device);
                    Some(accepting)
                }
            };
            let Some(drivers) = admitted else {
                self.stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(port = port.number, %addr, "device refused");
                continue;
            };
            let _ = stream.set_nodelay(true);
            self.fan_out(
                &drivers,
                &frame::encode(Kind::Opened, &ip.to_string(), id, b""),
            );
            self.tracker
                .spawn(self.clone().device(port.clone(), id, ip, stream, rx, stop));
        }
    }

    /// One TCP device: its data goes to the drivers that accept it, driver writes go to it.
    async fn device(
        self: Arc<Self>,
        port: Arc<Port>,
        id: u64,
        ip: IpAddr,
        stream: TcpStream,
        mut writes: mpsc::Receiver<Bytes>,
        stop: CancellationToken,
    ) {
        let (mut reader, mut writer) = stream.into_split();
        let ip_text = ip.to_string();
        let mut buf = BytesMut::with_capacity(self.read_bytes);
        // Set while the port is over its byte budget: no reading until then (writes go on).
        let mut resume: Option<tokio::time::Instant> = None;
        loop {
            buf.reserve(self.read_bytes);
            tokio::select! {
                () = stop.cancelled() => break,
                write = writes.recv() => {
                    let Some(data) = write else { break };
                    port.write_backlog.release(data.len());
                    // A device that stops reading must not hold its task past a stop.
                    tokio::select! {
                        () = stop.cancelled() => break,
                        written = writer.write_all(&data) => if written.is_err() { break },
                    }
                }
                () = sleep_until_or_forever(resume), if resume.is_some() => resume = None,
                read = reader.read_buf(&mut buf), if resume.is_none() => match read {
                    Ok(0) | Err(_) => break,
                    // Whatever arrived goes out whole, however large.
                    Ok(_) => {
                        let data = buf.split().freeze();
                        let frame = frame::encode(Kind::Received, &ip_text, id, &data);
                        self.fan_out(&port.accepting(ip), &frame);
                        if let Some(mesh) = &self.mesh {
                            mesh.publish(Proto::Tcp, port.number, ip, &data);
                        }
                        let wait = port.rate.as_ref().map_or(std::time::Duration::ZERO, |r| {
                            lock(r).charge(data.len() as f64, std::time::Instant::now())
                        });
                        if !wait.is_zero() {
                            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                            resume = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                },
            }
        }
        let _ = tokio::time::timeout(relaymesh_net::link::LINGER, writer.shutdown()).await;
        lock(&port.clients).remove(&id);
        self.fan_out(
            &port.accepting(ip),
            &frame::encode(Kind::Closed, &ip_text, id, b""),
        );
    }

    async fn receive_loop(self: Arc<Self>, port: Arc<Port>, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from) = tokio::select! {
                () = port.stop.cancelled() => return,
                received = socket.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    Err(e) => {
                        tracing::debug!(port = port.number, error = %e, "UDP receive failed");
                        continue;
                    }
                },
            };
            let ip = canonical(from.ip());
            let drivers = port.accepting(ip);
            let within_budget = port
                .rate
                .as_ref()
                .is_none_or(|r| lock(r).try_take(n as f64, std::time::Instant::now()));
            if drivers.is_empty() || !within_budget {
                self.stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let frame = frame::encode(
                Kind::Received,
                &ip.to_string(),
                u64::from(from.port()),
                &buf[..n],
            );
            self.fan_out(&drivers, &frame);
            if let Some(mesh) = &self.mesh {
                lock(&port.udp_sources).insert(ip, from.port());
                mesh.publish(Proto::Udp, port.number, ip, &buf[..n]);
            }
        }
    }

    /// Carries out a driver's WRITE or CLOSE.
    async fn command(
        &self,
        port: &Port,
        accept: &HashSet<IpAddr>,
        f: frame::Frame,
    ) -> Result<(), String> {
        let ip: IpAddr =
            f.ip.parse()
                .map_err(|_| format!("bad IP address {:?}", f.ip))?;
        let ip = canonical(ip);
        if !accept.contains(&ip) {
            return Err(format!("{ip} is not in this session's accept list"));
        }
        match (f.kind, port.proto) {
            (Kind::Write, Proto::Tcp) => {
                let tx = lock(&port.clients)
                    .get(&f.id)
                    .filter(|d| d.ip == ip)
                    .map(|d| d.tx.clone());
                // A device that is gone or not keeping up loses the write (counted).
                match tx {
                    Some(tx) => self.write_to(port, &tx, f.data),
                    None => {
                        self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (Kind::Close, Proto::Tcp) => {
                if let Some(device) = lock(&port.clients).get(&f.id).filter(|d| d.ip == ip) {
                    device.stop.cancel();
                }
            }
            (Kind::Write, Proto::Udp) => {
                let to = SocketAddr::new(
                    ip,
                    u16::try_from(f.id).map_err(|_| format!("bad UDP port {}", f.id))?,
                );
                if let Some(socket) = port.udp()
                    && socket.send_to(&f.data, to).await.is_err()
                {
                    self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            (Kind::Close, Proto::Udp) => {}
            (other, _) => return Err(format!("a driver may not send {other:?}")),
        }
        Ok(())
    }

    /// The stats document.
    fn document(&self) -> Value {
        let mut doc = json!({"udp_listeners": {}, "tcp_listeners": {}, "tcp_clients": {}});
        for ((proto, number), port) in lock(&self.ports).iter() {
            let drivers = lock(&port.drivers).len();
            match proto {
                Proto::Tcp => {
                    doc["tcp_listeners"][number.to_string()] = json!(drivers);
                    doc["tcp_clients"][number.to_string()] = json!(lock(&port.clients).len());
                }
                Proto::Udp => doc["udp_listeners"][number.to_string()] = json!(drivers),
            }
        }
        let s = &self.stats;
        doc["connections_refused"] = json!(s.connections_refused.load(Ordering::Relaxed));
        doc["datagrams_dropped"] = json!(s.datagrams_dropped.load(Ordering::Relaxed));
        doc["events_dropped"] = json!(s.events_dropped.load(Ordering::Relaxed));
        doc["writes_dropped"] = json!(s.writes_dropped.load(Ordering::Relaxed));
        doc["bad_frames"] = json!(s.bad_frames.load(Ordering::Relaxed));
        doc["throttled"] = json!(s.throttled.load(Ordering::Relaxed));
        doc
    }
}

fn unauthorized() -> Response {
    ApiError::from_code(ErrorCode::Unauthenticated, "missing or wrong driver token").into_response()
}

fn bad_request(message: String) -> Response {
    ApiError::from_code(ErrorCode::BadFrame, message).into_response()
}

/// `GET /api/dispatch/v1/`.
async fn stats(
    State(dispatch): State<Arc<Dispatch>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !dispatch.authorized(&headers, &query) {
        return unauthorized();
    }
    Json(dispatch.document()).into_response()
}

async fn tcp_dispatch(
    state: State<Arc<Dispatch>>,
    query: Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    open_session(state, query, req, Proto::Tcp).await
}

async fn udp_dispatch(
    state: State<Arc<Dispatch>>,
    query: Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    open_session(state, query, req, Proto::Udp).await
}

/// Checks the token, port and accept list, then upgrades to a driver session.
async fn open_session(
    State(dispatch): State<Arc<Dispatch>>,
    Query(query): Query<HashMap<String, String>>,
    mut req: Request,
    proto: Proto,
) -> Response {
    if !dispatch.authorized(req.headers(), &query) {
        return unauthorized();
    }
    let number = match query.get("port").map(|p| p.parse::<u16>()) {
        Some(Ok(n)) if n > 0 => n,
        _ => return bad_request("`port` must be a port number from 1 to 65535".into()),
    };
    let mut accept = HashSet::new();
    for ip in query
        .get("accept")
        .into_iter()
        .flat_map(|a| a.split(','))
        .filter(|s| !s.trim().is_empty())
    {
        match ip.trim().parse::<IpAddr>() {
            Ok(ip) => {
                accept.insert(canonical(ip));
            }
            Err(_) => return bad_request(format!("`accept` has a bad IP address {ip:?}")),
        }
    }
    if accept.is_empty() {
        return bad_request("`accept` must list the device IP addresses, comma-separated".into());
    }
    let (response, on_upgrade) = match accept::accept(&mut req) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let tracker = dispatch.tracker.clone();
    tracker.spawn(async move {
        match accept::upgraded(on_upgrade, &dispatch.limits).await {
            Ok(socket) => session(dispatch, proto, number, accept, socket).await,
            Err(e) => tracing::debug!(error = %e, "driver upgrade failed"),
        }
    });
    response
}

/// Longest close reason a WebSocket close frame carries (125 bytes of payload, 2 for the code).
const MAX_REASON: usize = 123;

/// `reason` cut to fit a close frame, on a character boundary.
fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_owned().into(),
    }
}

/// One driver session.
async fn session(
    dispatch: Arc<Dispatch>,
    proto: Proto,
    number: u16,
    accept: HashSet<IpAddr>,
    socket: ServerSocket,
) {
    let (mut sink, mut stream) = socket.split();
    let id = dispatch.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Out>(dispatch.driver_queue);
    let backlog = Arc::new(Backlog::new(
        dispatch.driver_queue,
        dispatch.driver_queue_bytes,
    ));
    let own = DriverOut {
        tx,
        backlog: backlog.clone(),
    };
    let driver = Driver {
        out: own.clone(),
        accept: accept.clone(),
    };
    let port = match dispatch.join(proto, number, id, driver) {
        Ok(port) => port,
        Err(reason) => {
            tracing::warn!(%reason, "dispatch session refused");
            let close = close_frame(CloseCode::Error, &reason);
            let _ = sink.send(WsMessage::Close(Some(close))).await;
            return;
        }
    };
    // Set by the reader before the queue closes; sent in the close frame.
    let reason: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let writer_reason = reason.clone();
    // Writer: everything ready goes out in one flush; ends when every sender is gone.
    let mut writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let mut next = Some(out);
            while let Some(out) = next.take() {
                let message = match out {
                    Out::Frame(frame) => {
                        backlog.release(frame.len());
                        WsMessage::Binary(frame)
                    }
                    Out::Ping => WsMessage::Ping(Bytes::new()),
                };
                if sink.feed(message).await.is_err() {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let close = lock(&writer_reason)
            .take()
            .map(|r| close_frame(CloseCode::Policy, &r));
        let _ = sink.send(WsMessage::Close(close)).await;
    });
    // A driver that sends nothing (not even a pong to our pings) for this long is gone.
    let silence = dispatch.silence;
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(dispatch.heartbeat);
    ping.reset();
    let ended: Option<String> = loop {
        let message = tokio::select! {
            () = port.stop.cancelled() => break Some("the port closed".to_owned()),
            _ = ping.tick() => {
                if last_heard.elapsed() > silence {
                    break Some("nothing heard from the driver within the heartbeat timeout".to_owned());
                }
                let _ = own.tx.try_send(Out::Ping);
                continue;
            }
            message = stream.next() => message,
        };
        last_heard = tokio::time::Instant::now();
        match message {
            Some(Ok(WsMessage::Binary(data))) => {
                let outcome = match frame::decode(&data) {
                    Ok(f) => dispatch.command(&port, &accept, f).await,
                    Err(e) => Err(e.to_string()),
                };
                // Like PlaceOS: a frame that cannot be carried out is counted and skipped; the
                // session and the port's other devices carry on.
                if let Err(why) = outcome {
                    dispatch.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%why, "driver frame skipped");
                }
            }
            Some(Ok(WsMessage::Text(_))) => {
                dispatch.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                break Some("binary frames only".to_owned());
            }
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break None,
            Some(Ok(_)) => {}
        }
    };
    *lock(&reason) = ended;
    dispatch.leave(&port, id);
    drop(own);
    if tokio::time::timeout(std::time::Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        // A driver that stopped reading must not keep its writer (and socket) alive.
        writer.abort();
        return;
    }
    // The close frame is out: give the driver a moment to read it and answer before the
    // connection goes.
    relaymesh_net::link::linger(&mut stream, relaymesh_net::link::LINGER).await;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_byte_budget_slows_tcp_and_drops_udp_beyond_it() {
        let start = Instant::now();
        let mut rate = byte_rate(1_000, start);
        assert_eq!(rate.charge(600.0, start), Duration::ZERO);
        // 600 + 900 = 1500 bytes in no time: wait until 500 more have accrued, half a second.
        assert_eq!(rate.charge(900.0, start), Duration::from_millis(500));
        assert!(!rate.try_take(1.0, start));
        assert!(rate.try_take(400.0, start + Duration::from_millis(900)));
        // A datagram over a whole second's budget passes on a full budget, then waits.
        let mut small = byte_rate(10, start);
        assert!(small.try_take(100.0, start));
        assert!(!small.try_take(1.0, start + Duration::from_secs(5)));
        assert!(small.try_take(1.0, start + Duration::from_secs(10)));
        assert_eq!(
            canonical("::ffff:10.0.0.1".parse().unwrap()),
            IpAddr::from([10, 0, 0, 1])
        );
    }
}
