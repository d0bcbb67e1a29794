//! Serving HTTP (and WebSocket upgrades) from an already-bound listener.
//!
//! [`serve`] is the listener half of the Listener/Handler split: it takes a connection permit
//! from a semaphore *before* accepting (so a full server stops accepting instead of accepting and
//! dropping), backs off on accept errors such as `EMFILE`, refuses a connection at once when its
//! source address holds [`ServeOptions::max_connections_per_ip`] already, sets `TCP_NODELAY`, and
//! hands each connection to hyper with upgrades enabled. Every request carries a [`ConnInfo`]
//! extension with the peer address and the connection permit; a WebSocket handler keeps that
//! permit for the life of the upgraded session, so both caps count WebSocket sessions too.

use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::metrics::Counter;

/// The accept queue a listener asks for unless configured otherwise: room for a reconnect
/// storm's connections while the process accepts them (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). Tokio's own `TcpListener::bind` asks for 1024, and a
/// connection that finds the queue full has its handshake dropped and retried a second later.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(5),
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

/// A connection's slots under both connection caps, held together so they end together.
#[derive(Debug)]
pub struct ConnPermit {
    _global: OwnedSemaphorePermit,
    _address: AddressSlot,
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
            }),
            client_certificate: None,
        };
        let span = tracing::debug_span!("http", %peer);
        tracker.spawn(
            serve_connection(
                stream,
                info,
                router.clone(),
                options.clone(),
                shutdown.clone(),
            )
            .instrument(span),
        );
    }
}

/// A whole `503` answer carrying `body`, a JSON error, for a connection closed right after it.
fn answer_503(body: &str) -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
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

async fn serve_connection(
    stream: TcpStream,
    mut info: ConnInfo,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
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
        async move { Ok::<_, std::convert::Infallible>(bounded(router, req, timeout, max_body).await) }
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
