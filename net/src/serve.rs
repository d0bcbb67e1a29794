//! Serving HTTP (and WebSocket upgrades) from an already-bound listener.
//!
//! [`serve`] is the listener half of the Listener/Handler split: it takes a connection permit
//! from a semaphore *before* accepting (so a full server stops accepting instead of accepting and
//! dropping), backs off on accept errors such as `EMFILE`, sets `TCP_NODELAY`, and hands each
//! connection to hyper with upgrades enabled. Every request carries a [`ConnInfo`] extension with
//! the peer address and the connection permit; a WebSocket handler keeps that permit for the
//! life of the upgraded session, so the cap counts WebSocket sessions too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// Limits for [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Open TCP connections (HTTP and WebSocket) at once; further connections wait in the
    /// kernel's accept queue until one closes.
    pub max_connections: usize,
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
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Per-connection facts attached to every request as an extension.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The remote address.
    pub peer: SocketAddr,
    /// The connection's slot under [`ServeOptions::max_connections`]; released when the last
    /// clone is dropped.
    pub permit: Arc<OwnedSemaphorePermit>,
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
        let info = ConnInfo {
            peer,
            permit: Arc::new(permit),
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

/// One file descriptor held in reserve for refusing connections when the process has none left.
struct Reserve {
    file: Option<std::fs::File>,
    /// The whole `503` answer.
    answer: String,
    /// Connections refused for want of descriptors since the last log line.
    refused: u64,
    logged: Option<std::time::Instant>,
}

/// The body a connection refused for want of file descriptors reads before the close.
const NO_DESCRIPTORS: &str = r#"{"code":"SERVER_FULL","message":"this process is out of file descriptors; try again later"}"#;

impl Reserve {
    fn new() -> Self {
        Self {
            file: std::fs::File::open("/dev/null").ok(),
            answer: format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n{NO_DESCRIPTORS}",
                NO_DESCRIPTORS.len()
            ),
            refused: 0,
            logged: None,
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
            // A fresh socket's buffer takes the whole answer.
            let _ = stream.try_write(self.answer.as_bytes());
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
        self.refused += 1;
        let now = std::time::Instant::now();
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            tracing::warn!(
                %error,
                %peer,
                refused = self.refused,
                "out of file descriptors: refusing new connections (raise the open-files limit, \
                 or lower max_connections below it)"
            );
            self.refused = 0;
            self.logged = Some(now);
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
    info: ConnInfo,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
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
    let req = req.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, max_body)));
    match tokio::time::timeout(timeout, router.call(req)).await {
        Ok(Ok(response)) => response,
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
            ErrorCode::NoServerAvailable | ErrorCode::ServerFull | ErrorCode::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
