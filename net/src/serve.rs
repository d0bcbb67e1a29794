//! Serving HTTP (and WebSocket upgrades) from an already-bound listener.
//!
//! [`serve`] is the listener half of the Listener/Handler split: it takes a connection permit
//! from a semaphore *before* accepting (so a full server stops accepting instead of accepting and
//! dropping), backs off on accept errors such as `EMFILE`, refuses a connection at once when its
//! source address holds [`ServeOptions::max_connections_per_ip`] already, sets `TCP_NODELAY`, and
//! hands each connection to hyper with upgrades enabled. Every request carries a [`ConnInfo`]
//! extension with the peer address and the connection permit; a WebSocket handler keeps that
//! permit for the life of the upgraded session, so both caps count WebSocket sessions too.
//!
//! Connections are *set up* a bounded number at a time ([`ServeOptions::max_setups`]): a
//! connection takes a place once its first request has come whole (over TLS, its first record:
//! waiting for a client costs no place, so one that sends half a request and stalls holds
//! none) and keeps it to its first response, or, for an upgrade whose handler takes the place
//! over ([`ConnInfo::claim_setup`]), until the handler says it is set up (a WebSocket session
//! once it has logged in); never longer than [`ServeOptions::setup_timeout`] (for a claimed
//! place, when the handler runs the rest in [`Setup::within`]). Connections
//! past them wait, in order, without being read. When a server dies and its clients all
//! reconnect to the others at once, the others take them at the pace they can set sessions
//! up, and the traffic of the clients they already hold does not wait behind thousands of
//! half-made ones.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use relaymesh_proto::ErrorCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;
use tracing::Instrument as _;

use crate::limits::{AddressSlot, ConnectionsPerAddress};
use crate::metrics::{Counter, Gauge};

/// The accept queue a listener asks for unless configured otherwise: room for a reconnect
/// storm's connections while the process accepts them (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). Tokio's own `TcpListener::bind` asks for 1024, and a
/// connection that finds the queue full has its handshake dropped and retried a second later.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

/// Connections set up at once per CPU the process may run on, unless configured otherwise
/// ([`ServeOptions::max_setups`]). Fewer places keep the established connections' latency
/// lower during a reconnect storm; a place is taken only once a connection's first request
/// has come whole, so this many keep one CPU busy, though a TLS handshake's round trip holds one
/// too.
pub const SETUPS_PER_CPU: usize = 32;

/// [`SETUPS_PER_CPU`] times the CPUs this process may run on.
pub fn default_max_setups() -> usize {
    SETUPS_PER_CPU * std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
/// A connection's longest hold on a set-up place unless configured otherwise
/// ([`ServeOptions::setup_timeout`]).
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(1);

/// Binds a TCP listener on `addr` with an accept queue of `backlog` connections (and
/// `SO_REUSEADDR`, as `TcpListener::bind` sets it).
///
/// # Errors
/// The address cannot be bound (in use, not this host's, not allowed).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.max(1))
}

/// Limits for [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Open TCP connections (HTTP and WebSocket) at once; further connections wait in the
    /// kernel's accept queue until one closes.
    pub max_connections: usize,
    /// Open TCP connections (HTTP and WebSocket) one source address may hold at once (IPv6
    /// addresses by their /64, as in [`crate::limits`]); a further connection from it is
    /// answered `503` at once and closed. 0 is taken as 1: for no limit of its own, set it to
    /// `max_connections` or more.
    pub max_connections_per_ip: usize,
    /// Time a client has to send a complete request head, and then again to send its body and
    /// be answered (a body that never comes gets `408` and the connection is closed). An idle
    /// keep-alive connection is closed after it too. Upgraded WebSocket sessions are not
    /// bound by it.
    pub request_timeout: Duration,
    /// Largest request body, on every endpoint (routes may set a lower one): a larger
    /// `Content-Length` is refused with `413` before anything is read, a chunked body is cut
    /// there.
    pub max_body_bytes: usize,
    /// How long an HTTP connection may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Connections being set up at once, each from the moment its first request (over TLS,
    /// its ClientHello) has come whole (the TLS handshake, the first request, and for a handler that claims it, what follows the upgrade, such as a
    /// login). The work of a reconnect storm then waits here, not in front of the established
    /// connections' traffic. A connection that waits longer than `request_timeout` for a
    /// place is answered `503` and closed. 0 is taken as 1.
    pub max_setups: usize,
    /// The longest one connection keeps its place among `max_setups` (a connection that sends
    /// nothing cannot hold one longer); it goes on being served after it.
    pub setup_timeout: Duration,
    /// Where [`serve`] counts what it refuses; listeners given the same one add up.
    pub stats: Arc<ServeStats>,
    /// TLS: every connection must start with a TLS handshake (within `request_timeout`);
    /// plain ones are answered `400` and closed.
    pub tls: Option<crate::tls::Acceptor>,
}

/// Connections [`serve`] refused, for a service's `/v1/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections refused because their source address held
    /// [`ServeOptions::max_connections_per_ip`] already.
    pub refused_per_ip: Counter,
    /// Plain (non-TLS) connections to a TLS listener, answered `400` and closed.
    pub tls_refused_plain: Counter,
    /// TLS handshakes that failed or timed out (a client that does not trust the
    /// certificate, a client certificate that does not verify).
    pub tls_handshakes_failed: Counter,
    /// Connections whose first request has come whole, waiting for a place among
    /// [`ServeOptions::max_setups`].
    pub setups_waiting: Gauge,
    /// Connections that waited for a place longer than [`ServeOptions::request_timeout`],
    /// answered `503` and closed.
    pub setups_refused: Counter,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(5),
            max_setups: default_max_setups(),
            setup_timeout: DEFAULT_SETUP_TIMEOUT,
            stats: Arc::default(),
            tls: None,
        }
    }
}

/// Per-connection facts attached to every request as an extension.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The remote address.
    pub peer: SocketAddr,
    /// The connection's slots under [`ServeOptions::max_connections`] and
    /// [`ServeOptions::max_connections_per_ip`]; both are released when the last clone is
    /// dropped.
    pub permit: Arc<ConnPermit>,
    /// Over TLS with client certificates asked for: the one the client presented, verified
    /// against the listener's client CA.
    pub client_certificate: Option<Arc<rustls::pki_types::CertificateDer<'static>>>,
}

/// A connection's slots under both connection caps, held together so they end together, and
/// its place among the connections being set up while it has one.
#[derive(Debug)]
pub struct ConnPermit {
    _global: OwnedSemaphorePermit,
    _address: AddressSlot,
    /// Boxed: every session keeps its permit, and an empty box is a pointer.
    setup: Mutex<Option<Box<Place>>>,
}

impl ConnPermit {
    /// Takes the set-up place out (`None` once it is given up or taken).
    fn take_setup(&self) -> Option<Box<Place>> {
        self.setup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl ConnInfo {
    /// Takes this connection's place among those being set up ([`ServeOptions::max_setups`])
    /// over from [`serve`], which otherwise gives it up with the first response (for an
    /// upgrade, the `101`). The handler gives it up by dropping the [`Setup`] once the
    /// connection is set up (a WebSocket session once it has logged in); run the rest of the
    /// set-up in [`Setup::within`] for the place not to be held past
    /// [`ServeOptions::setup_timeout`]. Holds nothing when the place was given up already (a
    /// second request on the connection).
    #[must_use]
    pub fn claim_setup(&self) -> Setup {
        Setup(self.permit.take_setup())
    }
}

/// A place among the connections being set up, and when it is given up at the latest.
#[derive(Debug)]
struct Place {
    _permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
}

/// A connection's place among the connections being set up, claimed by its handler
/// ([`ConnInfo::claim_setup`]); dropping it gives the place up.
#[derive(Debug)]
pub struct Setup(Option<Box<Place>>);

impl Setup {
    /// Runs `work` (the rest of the set-up), and gives the place up when it is done or at the
    /// deadline, whichever comes first; `work` goes on after the deadline.
    pub async fn within<F: std::future::Future>(self, work: F) -> F::Output {
        let Some(deadline) = self.0.as_ref().map(|place| place.deadline) else {
            return work.await;
        };
        tokio::pin!(work);
        let out = tokio::select! {
            out = &mut work => out,
            () = tokio::time::sleep_until(deadline) => {
                drop(self);
                return work.await;
            }
        };
        drop(self);
        out
    }
}

/// Accepts connections on `listener` and serves `router` until `shutdown` is cancelled.
/// Connection tasks are spawned on `tracker`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let addresses = ConnectionsPerAddress::new(options.max_connections_per_ip);
    let too_many = answer_503(
        &serde_json::json!({
            "code": ErrorCode::LimitExceeded.as_str_name(),
            "message": format!(
                "too many connections from your address (at most {} at once); \
                 close some and try again",
                options.max_connections_per_ip.max(1)
            ),
        })
        .to_string(),
    );
    let mut too_many_log = Throttle::default();
    let mut reserve = Reserve::new();
    let mut accept_backoff = Duration::from_millis(1);
    let places = Arc::new(Semaphore::new(options.max_setups.max(1)));
    let answers = Arc::new(Answers {
        busy: answer_503(
            &serde_json::json!({
                "code": ErrorCode::Unavailable.as_str_name(),
                "message": "too many connections waiting to be set up; try again later",
            })
            .to_string(),
        ),
        slow: answer_408(options.request_timeout),
    });
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors (EMFILE, ENFILE): refuse the waiting connection
                    // at once with the one held in reserve, rather than leave it and every
                    // one behind it waiting in the kernel's queue.
                    match reserve.refuse(&listener, &error) {
                        Refusal::Refused | Refusal::NothingWaiting => continue,
                        Refusal::NoReserve => {}
                    }
                    // Anything else (ENOBUFS and friends): wait and try again, not spin.
                    tracing::warn!(%error, backoff = ?accept_backoff, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(accept_backoff) => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        accept_backoff = Duration::from_millis(1);
        let Some(address) = addresses.open(peer.ip()) else {
            // Over its address's allowance: answered and closed here, without a task.
            refuse(&stream, too_many.as_bytes());
            drop((stream, permit));
            options.stats.refused_per_ip.inc();
            if let Some(refused) = too_many_log.due() {
                tracing::warn!(
                    %peer,
                    refused,
                    limit = options.max_connections_per_ip,
                    "too many connections from one address: refusing its new ones \
                     (max_connections_per_ip)"
                );
            }
            continue;
        };
        let info = ConnInfo {
            peer,
            permit: Arc::new(ConnPermit {
                _global: permit,
                _address: address,
                setup: Mutex::new(None),
            }),
            client_certificate: None,
        };
        let span = tracing::debug_span!("http", %peer);
        let setup = Places {
            places: places.clone(),
            answers: answers.clone(),
        };
        tracker.spawn(
            serve_connection(
                stream,
                info,
                router.clone(),
                options.clone(),
                shutdown.clone(),
                setup,
            )
            .instrument(span),
        );
    }
}

/// The places of connections being set up, and the answer to one that waited too long for one.
struct Places {
    places: Arc<Semaphore>,
    answers: Arc<Answers>,
}

/// Whole answers for connections closed before they are served.
struct Answers {
    /// `503`: no place to set the connection up in time.
    busy: String,
    /// `408`: the body of the first request did not come in time.
    slow: String,
}

/// A whole `408` answer, as [`bounded`] gives it, for a connection closed right after it.
fn answer_408(timeout: Duration) -> String {
    let body = serde_json::json!({
        "code": ErrorCode::LimitExceeded.as_str_name(),
        "message": format!("request not completed within {} ms", timeout.as_millis()),
    })
    .to_string();
    whole_answer(StatusCode::REQUEST_TIMEOUT, &body)
}

/// A whole `503` answer carrying `body`, a JSON error, for a connection closed right after it.
fn answer_503(body: &str) -> String {
    whole_answer(StatusCode::SERVICE_UNAVAILABLE, body)
}

/// A whole answer with `status` carrying `body`, a JSON error, for a connection closed right
/// after it.
fn whole_answer(status: StatusCode, body: &str) -> String {
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default(),
        body.len()
    )
}

/// Writes `answer` to a connection about to be closed unserved, without waiting for anything.
pub(crate) fn refuse(stream: &TcpStream, answer: &[u8]) {
    // What the client sent already is read first, a little of it at most: closing a socket
    // with unread data resets the connection, and the client may lose the answer with it.
    let mut scratch = [0u8; 1024];
    for _ in 0..4 {
        if !matches!(stream.try_read(&mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
    // A fresh socket's buffer takes the whole answer.
    let _ = stream.try_write(answer);
}

/// Rate-limits a warning to one line per 10 s, saying how many times it happened meanwhile.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Times since the last line.
    count: u64,
    logged: Option<Instant>,
}

impl Throttle {
    /// Counts one more; returns the count to log when a line is due (this one included).
    pub fn due(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(10))
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// One file descriptor held in reserve for refusing connections when the process has none left.
struct Reserve {
    file: Option<std::fs::File>,
    /// The whole `503` answer.
    answer: String,
    /// Connections refused for want of descriptors.
    log: Throttle,
}

/// The body a connection refused for want of file descriptors reads before the close.
const NO_DESCRIPTORS: &str = r#"{"code":"SERVER_FULL","message":"this process is out of file descriptors; try again later"}"#;

impl Reserve {
    fn new() -> Self {
        Self {
            file: std::fs::File::open("/dev/null").ok(),
            answer: answer_503(NO_DESCRIPTORS),
            log: Throttle::default(),
        }
    }

    /// Lets the reserve go, accepts one waiting connection with it, answers `503` and closes
    /// it, and takes the reserve again.
    fn refuse(&mut self, listener: &TcpListener, error: &std::io::Error) -> Refusal {
        use futures_util::FutureExt as _;
        let Some(file) = self.file.take() else {
            return Refusal::NoReserve;
        };
        drop(file);
        // The listener was just found readable: the connection is there to take now.
        let taken = listener.accept().now_or_never();
        if let Some(Ok((stream, _))) = &taken {
            refuse(stream, self.answer.as_bytes());
        }
        // Closed before the reserve is taken again: it needs the descriptor back.
        let peer = match taken {
            Some(Ok((_stream, peer))) => Some(peer),
            _ => None,
        };
        self.file = std::fs::File::open("/dev/null").ok();
        let Some(peer) = peer else {
            // Linux takes the descriptor before looking at the queue: an empty queue fails
            // the same way. The listener now waits for the next connection.
            return Refusal::NothingWaiting;
        };
        if let Some(refused) = self.log.due() {
            tracing::warn!(
                %error,
                %peer,
                refused,
                "out of file descriptors: refusing new connections (raise the open-files limit, \
                 or lower max_connections below it)"
            );
        }
        Refusal::Refused
    }
}

/// What [`Reserve::refuse`] did.
enum Refusal {
    /// Refused one waiting connection.
    Refused,
    /// Found no connection waiting.
    NothingWaiting,
    /// Had no descriptor in reserve (it could not be taken again): the caller backs off.
    NoReserve,
}

/// Serves one connection: once its first request has come whole, in a place among those being set
/// up, held until its first response (or its handler's claim of the place) and
/// [`ServeOptions::setup_timeout`] at the longest.
async fn serve_connection(
    stream: TcpStream,
    mut info: ConnInfo,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
    setup: Places,
) {
    // Waiting for the client holds no place: the connection takes one once its first request
    // (over TLS, its first record: the ClientHello) has come whole, so a client that sends
    // half of one and stalls holds none. A client that sends no whole one within the request
    // timeout is closed, as hyper closes one that sends no complete request head.
    let tls = options.tls.is_some();
    let mut seen = Start::Partial;
    let first = tokio::time::timeout(options.request_timeout, async {
        stream.readable().await?;
        first_request(&stream, tls, &mut seen).await
    });
    let came = tokio::select! {
        came = first => came,
        () = shutdown.cancelled() => return,
    };
    match came {
        Ok(Ok(true)) => {}
        // A head whose body did not come in time is answered as hyper answers one that comes
        // too slowly after it has a place.
        Err(_) if seen == Start::Head => return refuse(&stream, setup.answers.slow.as_bytes()),
        _ => return,
    }
    let waiting = options.stats.setups_waiting.track();
    let waited = tokio::time::timeout(options.request_timeout, setup.places.acquire_owned());
    let place = tokio::select! {
        place = waited => match place {
            Ok(Ok(place)) => place,
            Ok(Err(_)) => return,
            Err(_) => {
                // Over TLS the client waits for a handshake, not an answer: it is only closed.
                if options.tls.is_none() {
                    refuse(&stream, setup.answers.busy.as_bytes());
                }
                options.stats.setups_refused.inc();
                tracing::debug!(peer = %info.peer, "no place to set the connection up in time");
                return;
            }
        },
        () = shutdown.cancelled() => return,
    };
    drop(waiting);
    let deadline = tokio::time::Instant::now() + options.setup_timeout;
    *info
        .permit
        .setup
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(Place {
        _permit: place,
        deadline,
    }));
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let permit = info.permit.clone();
    let serving = async move {
        match &options.tls {
            None => serve_http(stream, info, router, options, shutdown).await,
            Some(acceptor) => {
                let handshake =
                    acceptor.handshake(stream, info.peer, options.request_timeout, &options.stats);
                let tls = tokio::select! {
                    tls = handshake => tls,
                    () = shutdown.cancelled() => return,
                };
                // Refusals and failures are logged and counted by the acceptor.
                if let Ok(tls) = tls {
                    info.client_certificate = crate::tls::client_certificate(&tls);
                    serve_http(tls, info, router, options, shutdown).await;
                }
            }
        }
    };
    tokio::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        () = tokio::time::sleep_until(deadline) => {
            drop(permit.take_setup());
            serving.await;
        }
    }
    // Closed (or upgraded) before its first response.
    drop(permit.take_setup());
}

/// The bytes of a connection's start looked at to tell whether its first request has come
/// whole; a longer start is taken as whole once this much has come.
const FIRST_REQUEST_PEEK: usize = 4096;

/// How much of its first request a connection has sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// Not even the head (over TLS, not the whole first record).
    Partial,
    /// The head, and not all of the body it declares.
    Head,
    /// All of it, or as much as is looked at, or something malformed.
    Whole,
}

/// Waits until the connection's first request (`tls`: its first TLS record) has come whole,
/// without reading it: `Ok(false)` when the client closed first. `seen`: how much had come at
/// the last look.
async fn first_request(stream: &TcpStream, tls: bool, seen: &mut Start) -> std::io::Result<bool> {
    let mut start = vec![0; FIRST_REQUEST_PEEK];
    let n = stream.peek(&mut start).await?;
    *seen = look(&start[..n], tls);
    if n == 0 || *seen == Start::Whole {
        return Ok(n > 0);
    }
    // The rest is still to come. What is peeked stays readable, so each later look waits for
    // readiness and peeks inside `try_io`, which clears the readiness only if nothing came
    // since it was seen (no lost wake-up). tokio has no peek that does not wait, so it
    // peeks through a second descriptor of the socket.
    let peeker = std::net::TcpStream::from(std::os::fd::AsFd::as_fd(stream).try_clone_to_owned()?);
    loop {
        let ready = stream.ready(tokio::io::Interest::READABLE).await?;
        let looked = stream.try_io(tokio::io::Interest::READABLE, || {
            let n = peeker.peek(&mut start)?;
            *seen = look(&start[..n], tls);
            if n == 0 || *seen == Start::Whole {
                Ok(n > 0)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        match looked {
            // The client shut its side with the request still part-sent: nothing more will
            // come (and the socket stays readable, so waiting again would spin).
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                return Ok(false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            came => return came,
        }
        // Should the socket ever stay ready without anything new, the task still yields, and
        // the request timeout around it still fires.
        tokio::task::consume_budget().await;
    }
}

/// How much of its first request `start`, a connection's first bytes, holds: whole once it
/// has the head and the body its `Content-Length` declares (`tls`: the first record, whose
/// header gives its length). What is malformed counts as whole, for the server to refuse at
/// once, and so does a head declaring more body than is looked at (for the server to refuse
/// one over its limit at once, or read it).
fn look(start: &[u8], tls: bool) -> Start {
    let whole = |done: bool| if done { Start::Whole } else { Start::Partial };
    if start.len() >= FIRST_REQUEST_PEEK {
        return Start::Whole;
    }
    if tls {
        // A record: its type (0x16: handshake), version (2 bytes) and length (2 bytes). A
        // first byte other than 0x16 is a plain client, which the handshake refuses.
        return whole(match start {
            [0x16, _, _, high, low, record @ ..] => {
                record.len() >= usize::from(u16::from_be_bytes([*high, *low]))
            }
            [0x16, ..] => false,
            _ => true,
        });
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(start) {
        Ok(httparse::Status::Complete(head)) => {
            let body = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(header::CONTENT_LENGTH.as_str()))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            // A client that sends `Expect: 100-continue` waits for the server's word before it
            // sends its body.
            let expects = request.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case(header::EXPECT.as_str())
                    && h.value.eq_ignore_ascii_case(b"100-continue")
            });
            // A chunked body (hyper ignores a Content-Length beside it) is not waited for.
            let chunked = request.headers.iter().any(|h| {
                h.name
                    .eq_ignore_ascii_case(header::TRANSFER_ENCODING.as_str())
            });
            if expects
                || chunked
                || start.len() - head >= body
                || head.saturating_add(body) > FIRST_REQUEST_PEEK
            {
                Start::Whole
            } else {
                Start::Head
            }
        }
        Ok(httparse::Status::Partial) => Start::Partial,
        // Malformed, or more headers than looked at: hyper answers it.
        Err(_) => Start::Whole,
    }
}

/// Serves HTTP/1.1 (with upgrades) on one connection, plain or TLS.
async fn serve_http<I>(
    stream: I,
    info: ConnInfo,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (timeout, max_body) = (options.request_timeout, options.max_body_bytes);
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info.clone());
        let router = router.clone();
        let permit = info.permit.clone();
        async move {
            let response = bounded(router, req, timeout, max_body).await;
            // The first response ends the set-up, unless the handler claimed it.
            drop(permit.take_setup());
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.request_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "http connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(options.shutdown_grace, conn).await;
        }
    }
}

/// Serves one request within `timeout`, its body bounded by `max_body`.
async fn bounded(
    mut router: Router,
    req: Request<hyper::body::Incoming>,
    timeout: Duration,
    max_body: usize,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body as u64) {
        return closing(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::LimitExceeded,
            format!("request body over the limit of {max_body} bytes"),
        ));
    }
    // A client may send its first frames right behind an upgrade request (see
    // `ws::dial_link_with`); if the upgrade is refused they must not be read as the next
    // request, so a refused upgrade is the connection's last answer.
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let req = req.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, max_body)));
    match tokio::time::timeout(timeout, router.call(req)).await {
        Ok(Ok(mut response)) => {
            if upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            response
        }
        Ok(Err(never)) => match never {},
        Err(_) => closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::LimitExceeded,
            format!("request not completed within {} ms", timeout.as_millis()),
        )),
    }
}

/// `error` as the last response on its connection (its request's body is left unread).
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// An error answered as JSON `{"code": "...", "message": "..."}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The protocol error code, rendered by name.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// The HTTP status that fits a protocol error code.
    pub fn status_for(code: ErrorCode) -> StatusCode {
        match code {
            ErrorCode::BadFrame
            | ErrorCode::InvalidTopic
            | ErrorCode::UnsupportedVersion
            | ErrorCode::UnexpectedMessage => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated
            | ErrorCode::KeyInvalid
            | ErrorCode::UnknownAccount
            | ErrorCode::BadCredentials => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::AccountDisabled | ErrorCode::RoleNotPermitted => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::LimitExceeded | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NoServerAvailable
            | ErrorCode::ServerFull
            | ErrorCode::ShuttingDown
            | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// An error whose status follows from its code.
    pub fn from_code(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(Self::status_for(code), code, message)
    }
}

impl From<relaymesh_proto::v1::Error> for ApiError {
    fn from(e: relaymesh_proto::v1::Error) -> Self {
        Self::from_code(e.error_code(), e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code.as_str_name(), "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Fallback for paths no route serves: a JSON error like every other refusal.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::from_code(
        ErrorCode::NotFound,
        format!("no endpoint at {}", uri.path()),
    )
}

/// Fallback for a known path with the wrong method.
pub async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::from_code(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A `text/plain` response, for `/healthz` and `/metrics`.
pub fn text(content_type: &'static str, body: String) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Reads an answer to its end (a reset after it counts as the end too).
    async fn answer(socket: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_listener_queues_as_many_connections_as_its_backlog_asks_for() {
        // More than the 1024 Tokio's own bind asks for: none of these has its handshake
        // dropped, so every one is in the accept queue once its connect returns (a dropped
        // one would come a second later, when its SYN-ACK is sent again).
        const CONNECTIONS: usize = 1_500;
        let listener = bind("127.0.0.1:0".parse().unwrap(), 2_000).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut accepted = 0;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        {
            accepted += 1;
        }
        assert_eq!(accepted, CONNECTIONS);
    }

    #[tokio::test]
    async fn a_connection_over_its_address_allowance_is_answered_503_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServeOptions {
            max_connections_per_ip: 1,
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, options, shutdown.clone(), tracker));

        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = Vec::new();
        while !first.ends_with(b"ok") {
            let mut buf = [0u8; 512];
            let n = held.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&first));
            first.extend_from_slice(&buf[..n]);
        }
        assert!(first.starts_with(b"HTTP/1.1 200"));

        // The second from the same address is answered without sending anything.
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let answer = answer(&mut refused).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{answer}"
        );
        let (code, message) = crate::ws::parse_error_body(body.as_bytes()).unwrap();
        assert_eq!(code, ErrorCode::LimitExceeded);
        assert!(
            message.starts_with("too many connections from your address"),
            "{message}"
        );
        assert_eq!(stats.refused_per_ip.get(), 1);
        shutdown.cancel();
    }

    /// Waits (up to 10 s) until `ready` holds.
    async fn until(mut ready: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !ready() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the state never came");
    }

    /// A server with `options` whose `GET /` answers `ok` and says so on `served`; what
    /// `extra` adds to its routes. Returns its address and what stops it.
    async fn setups_server(
        options: ServeOptions,
        extra: Router,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<&'static str>,
        CancellationToken,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (served_tx, served) = tokio::sync::mpsc::unbounded_channel();
        let router = Router::new()
            .route(
                "/",
                axum::routing::get(move || {
                    let _ = served_tx.send("/");
                    async { "ok" }
                }),
            )
            .merge(extra);
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        tokio::spawn(serve(listener, router, options, shutdown.clone(), tracker));
        (addr, served, shutdown)
    }

    /// The next route served (within 10 s).
    async fn next_served(
        served: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    ) -> Option<&'static str> {
        tokio::time::timeout(Duration::from_secs(10), served.recv())
            .await
            .expect("nothing was served")
    }

    /// Sends `GET /` on a new connection.
    async fn get_root(addr: SocketAddr) -> TcpStream {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        socket
    }

    /// A route `/claim` whose handler claims its connection's place and hands it over.
    fn claiming() -> (Router, tokio::sync::mpsc::UnboundedReceiver<Setup>) {
        let (claimed_tx, claimed) = tokio::sync::mpsc::unbounded_channel();
        let router = Router::new().route(
            "/claim",
            axum::routing::get(move |axum::Extension(conn): axum::Extension<ConnInfo>| {
                let _ = claimed_tx.send(conn.claim_setup());
                async { "claimed" }
            }),
        );
        (router, claimed)
    }

    /// Opens a connection whose handler claims its place, and takes the place from it.
    async fn claim_first(
        addr: SocketAddr,
        claimed: &mut tokio::sync::mpsc::UnboundedReceiver<Setup>,
    ) -> (TcpStream, Setup) {
        let mut first = TcpStream::connect(addr).await.unwrap();
        first
            .write_all(b"GET /claim HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let place = tokio::time::timeout(Duration::from_secs(10), claimed.recv())
            .await
            .expect("the handler claimed no place")
            .unwrap();
        (first, place)
    }

    #[tokio::test]
    async fn a_connection_past_max_setups_waits_for_the_place_the_one_before_holds() {
        let options = ServeOptions {
            max_setups: 1,
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let (claim, mut claimed) = claiming();
        let (addr, mut served, shutdown) = setups_server(options, claim).await;

        // The first connection's handler keeps its place after answering.
        let (_first, place) = claim_first(addr, &mut claimed).await;

        // The second waits for it, unread...
        let mut second = get_root(addr).await;
        until(|| stats.setups_waiting.get() == 1).await;
        assert!(served.try_recv().is_err(), "served without a place");

        // ...and is served once the place is given up.
        drop(place);
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
        assert_eq!(stats.setups_waiting.get(), 0);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_connection_answered_once_needs_no_place_for_its_next_request() {
        let options = ServeOptions {
            max_setups: 1,
            ..ServeOptions::default()
        };
        let (claim, mut claimed) = claiming();
        let (addr, mut served, shutdown) = setups_server(options, claim).await;
        let mut kept = TcpStream::connect(addr).await.unwrap();
        let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        kept.write_all(request).await.unwrap();
        assert_eq!(next_served(&mut served).await, Some("/"));
        // Another connection takes the only place and keeps it...
        let (_other, _place) = claim_first(addr, &mut claimed).await;
        // ...and the first connection's next request is served all the same.
        kept.write_all(request).await.unwrap();
        assert_eq!(next_served(&mut served).await, Some("/"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_claimed_place_run_within_its_deadline_is_given_up_there() {
        let options = ServeOptions {
            max_setups: 1,
            setup_timeout: Duration::from_millis(200),
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let (claim, mut claimed) = claiming();
        let (addr, mut served, shutdown) = setups_server(options, claim).await;
        let (_first, place) = claim_first(addr, &mut claimed).await;
        // The rest of the first's set-up never ends; its place goes at the deadline.
        let endless = tokio::spawn(place.within(std::future::pending::<()>()));
        let mut second = get_root(addr).await;
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
        assert_eq!(stats.setups_waiting.get(), 0);
        endless.abort();
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_connection_that_has_sent_nothing_holds_no_place() {
        let options = ServeOptions {
            max_setups: 1,
            ..ServeOptions::default()
        };
        let (addr, mut served, shutdown) = setups_server(options, Router::new()).await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut second = get_root(addr).await;
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_connection_that_has_sent_part_of_its_request_holds_no_place() {
        // Long timeouts: a place taken by a part would be kept past the test's patience.
        let options = ServeOptions {
            max_setups: 1,
            setup_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let login = Router::new().route(
            "/login",
            axum::routing::post(|body: String| async move { body }),
        );
        let (addr, mut served, shutdown) = setups_server(options, login).await;
        // Half a head, and a whole head whose declared body has not come.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        let mut headless = TcpStream::connect(addr).await.unwrap();
        let head =
            b"POST /login HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\n";
        headless.write_all(head).await.unwrap();
        let mut whole = get_root(addr).await;
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut whole).await.starts_with("HTTP/1.1 200"));
        assert_eq!(stats.setups_waiting.get(), 0);
        // The rest comes, in pieces, and each is served.
        headless.write_all(b"he").await.unwrap();
        headless.write_all(b"llo").await.unwrap();
        let login = answer(&mut headless).await;
        assert!(
            login.starts_with("HTTP/1.1 200") && login.ends_with("hello"),
            "{login}"
        );
        half.write_all(b" x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut half).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }

    /// On two threads: a connection spinning on its socket would keep one of them busy, and
    /// the other sees it never closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_shut_with_half_a_request_is_closed() {
        let options = ServeOptions {
            request_timeout: Duration::from_secs(60),
            ..ServeOptions::default()
        };
        let (addr, mut served, shutdown) = setups_server(options, Router::new()).await;
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        // More bytes after a first look, then the client shuts its side.
        tokio::task::yield_now().await;
        half.write_all(b" x").await.unwrap();
        half.shutdown().await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), answer(&mut half)).await;
        assert_eq!(closed.expect("the connection was not closed"), "");
        let mut whole = get_root(addr).await;
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut whole).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_tls_handshake_holds_a_place_only_from_a_whole_client_hello_to_its_end() {
        let pki = crate::tls::tests::TestPki::new();
        let options = ServeOptions {
            max_setups: 1,
            setup_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            tls: Some(crate::tls::Acceptor::new(pki.identity(), None, &[]).unwrap()),
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let (addr, mut served, shutdown) = setups_server(options, Router::new()).await;
        // Part of a ClientHello holds no place; a whole record that is no ClientHello takes
        // one, fails, and gives it up.
        let mut part = TcpStream::connect(addr).await.unwrap();
        part.write_all(&[0x16, 3, 1, 0, 200, 1]).await.unwrap();
        let mut bogus = TcpStream::connect(addr).await.unwrap();
        bogus
            .write_all(&[0x16, 3, 1, 0, 4, 9, 9, 9, 9])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = bogus.read_to_end(&mut rest).await;
        until(|| stats.tls_handshakes_failed.get() == 1).await;
        // A real client is served with the only place.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = pki.connector().connect("127.0.0.1", tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(next_served(&mut served).await, Some("/"));
        let mut response = String::new();
        tls.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert_eq!(stats.setups_waiting.get(), 0);
        drop(part);
        shutdown.cancel();
    }

    #[test]
    fn a_first_request_is_whole_with_its_declared_body_and_a_tls_record_with_its_length() {
        use Start::{Head, Partial, Whole};
        let head = b"POST /v1/login HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(look(&head[..10], false), Partial);
        assert_eq!(look(head, false), Head);
        assert_eq!(look(&[&head[..], b"ab"].concat(), false), Head);
        assert_eq!(look(&[&head[..], b"abc"].concat(), false), Whole);
        assert_eq!(look(b"GET / HTTP/1.1\r\n\r\n", false), Whole);
        // More body than is looked at: whole, for the server to refuse or read at once.
        let large = b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n";
        assert_eq!(look(large, false), Whole);
        let chunked =
            b"POST / HTTP/1.1\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(look(chunked, false), Whole);
        // A client waiting for `100 Continue` before its body: whole, to be answered.
        let expects = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(look(expects, false), Whole);
        // Malformed: whole, for hyper to refuse at once.
        assert_eq!(look(b"\x16\x03\x01 hello", false), Whole);
        assert_eq!(look(&[0; FIRST_REQUEST_PEEK], false), Whole);
        assert_eq!(look(&[0x16, 3, 1], true), Partial);
        assert_eq!(look(&[0x16, 3, 1, 0, 3, 1, 2], true), Partial);
        assert_eq!(look(&[0x16, 3, 1, 0, 3, 1, 2, 3], true), Whole);
        // A plain client on a TLS listener: refused by the handshake at once.
        assert_eq!(look(b"GET", true), Whole);
    }

    #[tokio::test]
    async fn a_place_is_given_up_at_the_setup_timeout() {
        // Without the setup timeout the first connection, its request never answered, would
        // keep its place for the minute of the request timeout.
        let options = ServeOptions {
            max_setups: 1,
            setup_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_secs(60),
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let hang = Router::new().route(
            "/hang",
            axum::routing::get(std::future::pending::<&'static str>),
        );
        let (addr, mut served, shutdown) = setups_server(options, hang).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first
            .write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut second = get_root(addr).await;
        until(|| stats.setups_waiting.get() == 1).await;
        assert_eq!(next_served(&mut served).await, Some("/"));
        assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_connection_that_finds_no_place_within_the_request_timeout_is_answered_503() {
        let options = ServeOptions {
            max_setups: 1,
            request_timeout: Duration::from_millis(300),
            setup_timeout: Duration::from_secs(60),
            ..ServeOptions::default()
        };
        let stats = options.stats.clone();
        let (claim, mut claimed) = claiming();
        let (addr, mut served, shutdown) = setups_server(options, claim).await;
        let (_first, _place) = claim_first(addr, &mut claimed).await;

        let mut second = get_root(addr).await;
        let answer = answer(&mut second).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        let (code, _) = crate::ws::parse_error_body(body.as_bytes()).unwrap();
        assert_eq!(code, ErrorCode::Unavailable);
        assert_eq!(stats.setups_refused.get(), 1);
        assert_eq!(stats.setups_waiting.get(), 0);
        assert!(served.try_recv().is_err());
        shutdown.cancel();
    }

    #[test]
    fn a_warning_is_throttled_to_one_line_per_10_s_with_the_count() {
        let mut log = Throttle::default();
        assert_eq!(log.due(), Some(1));
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        log.logged = log.logged.map(|at| at - Duration::from_secs(10));
        assert_eq!(log.due(), Some(3), "the ones in between are counted");
    }
}
