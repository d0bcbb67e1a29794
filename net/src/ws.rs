//! WebSocket accept (over hyper upgrades) and dial (over a plain `TcpStream`), both with the
//! size limits and buffer sizes from [`WsLimits`] and `TCP_NODELAY` set.
//!
//! Both sides end up with a `tokio_tungstenite::WebSocketStream`, so link code is the same
//! whether this process dialed or accepted.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use relaymesh_proto::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
pub use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::http::ApiError;
use crate::link::{self, Link, LinkStream};

/// A WebSocket this process accepted.
pub type ServerSocket = WebSocketStream<TokioIo<Upgraded>>;
/// A WebSocket this process dialed.
pub type ClientSocket = WebSocketStream<UntilHeaders>;
/// A link this process accepted.
pub type ServerLink = Link<Accepted>;
/// The reading end of a link this process accepted.
pub type ServerLinkStream = LinkStream<Accepted>;
/// A link this process dialed.
pub type ClientLink = Link<TcpStream>;
/// The reading end of a link this process dialed.
pub type ClientLinkStream = LinkStream<TcpStream>;

/// Size limits and buffer sizes for one WebSocket.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// Largest message (and frame) accepted from the peer; bigger ones end the link with
    /// `LIMIT_EXCEEDED`.
    pub max_frame_bytes: usize,
    /// Bytes asked of the socket per read. A link holds its read buffer only while frames are
    /// arriving ([`crate::frames::FrameReader`]), so this trades read syscalls on busy links
    /// against memory per busy link.
    pub read_buffer_bytes: usize,
    /// Bytes buffered before tungstenite writes to the socket without an explicit flush.
    pub write_buffer_bytes: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            read_buffer_bytes: 8 * 1024,
            write_buffer_bytes: 64 * 1024,
        }
    }
}

impl WsLimits {
    /// The tungstenite configuration for these limits.
    pub fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            .write_buffer_size(self.write_buffer_bytes)
            .max_message_size(Some(self.max_frame_bytes))
            .max_frame_size(Some(self.max_frame_bytes))
    }
}

/// Checks that `req` is a WebSocket upgrade and answers it: returns the `101 Switching
/// Protocols` response to send and the future that resolves to the upgraded connection.
pub fn accept(req: &mut Request<Body>) -> Result<(Response, OnUpgrade), ApiError> {
    let bad = |what: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            format!("not a WebSocket upgrade: {what}"),
        )
    };
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if req.method() != axum::http::Method::GET {
        return Err(bad("method must be GET"));
    }
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(bad("missing `Connection: upgrade` / `Upgrade: websocket`"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(bad("Sec-WebSocket-Version must be 13"));
    }
    let accept_key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?;
    let on_upgrade = req
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or_else(|| bad("connection cannot be upgraded"))?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key).map_err(|_| bad("bad key"))?,
    );
    Ok((response, on_upgrade))
}

/// Completes an upgrade started by [`accept`] as a link: the writer's end and the reader's.
///
/// The link owns the TCP stream itself: hyper's connection buffer is let go (what the client
/// sent after its upgrade request, if anything, is kept in a copy of its own size), which saves
/// an idle connection the 8 KiB buffer.
pub async fn upgraded_link(on_upgrade: OnUpgrade, limits: &WsLimits) -> Result<ServerLink, String> {
    let upgraded = on_upgrade.await.map_err(|e| e.to_string())?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| "upgraded connection is not a TCP stream".to_owned())?;
    Ok(accepted_link(
        Bytes::copy_from_slice(&parts.read_buf),
        parts.io.into_inner(),
        limits,
    ))
}

/// A server link over `tcp`, whose first bytes (read past the upgrade request) are `pre`; its
/// socket is shared with [`link::Direct`] writers.
fn accepted_link(pre: Bytes, tcp: TcpStream, limits: &WsLimits) -> ServerLink {
    let (read, write) = tcp.into_split();
    let write = Arc::new(write);
    let io = Accepted {
        pre,
        read,
        write: write.clone(),
    };
    let mut link = link::split_link(io, Role::Server, limits.config());
    link.sink.socket = Some(write);
    link
}

/// An accepted TCP stream after its HTTP upgrade: first the bytes hyper had already read past
/// the request, then the stream. The write half is shared with the link's [`link::Direct`]
/// writers, so it is written through `&TcpStream`.
#[derive(Debug)]
pub struct Accepted {
    pre: Bytes,
    read: OwnedReadHalf,
    write: Arc<OwnedWriteHalf>,
}

impl link::TrySend for OwnedWriteHalf {
    fn try_send(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write(buf)
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let head = self.pre.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let tcp: &TcpStream = (*self.write).as_ref();
        loop {
            std::task::ready!(tcp.poll_write_ready(cx))?;
            // `try_write` clears the readiness it finds stale, so this loop waits, not spins.
            match tcp.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let tcp: &TcpStream = (*self.write).as_ref();
        Poll::Ready(socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write))
    }
}

/// Completes an upgrade started by [`accept`].
pub async fn upgraded(
    on_upgrade: OnUpgrade,
    limits: &WsLimits,
) -> Result<ServerSocket, hyper::Error> {
    let io = on_upgrade.await?;
    Ok(
        WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(limits.config()))
            .await,
    )
}

/// Why a WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URL is not a `ws://host:port/path` (or `http://…`) URL.
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No TCP connection.
    #[error("cannot connect to {url}: {error}")]
    Connect {
        /// The URL.
        url: String,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The server answered the upgrade with an error (e.g. 401 for a bad key), with the
    /// `{code, message}` body it sent when there was one.
    #[error("{url} refused the connection: {status}{}", .message.as_ref().map(|(c, m)| format!(" {}: {m}", c.as_str_name())).unwrap_or_default())]
    Refused {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The protocol error code and message from a JSON body.
        message: Option<(ErrorCode, String)>,
    },
    /// The WebSocket handshake failed for another reason.
    #[error("WebSocket handshake with {url} failed: {message}")]
    Handshake {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Nothing within the timeout.
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// The credentials to present could not be prepared (e.g. no challenge to sign); the cause
    /// is part of the message, so not also a `source`.
    #[error("cannot prepare credentials: {0}")]
    Credentials(crate::auth::AuthError),
}

impl DialError {
    /// The protocol error code the server refused with, if it sent one.
    pub fn refusal_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused {
                message: Some((code, _)),
                ..
            } => Some(*code),
            _ => None,
        }
    }
}

/// Opens a WebSocket to `url` (`ws://host:port/path?query`), optionally presenting a bearer
/// token, with `TCP_NODELAY` and the given limits.
pub async fn dial(
    url: &str,
    bearer: Option<&str>,
    limits: &WsLimits,
    timeout: Duration,
) -> Result<ClientSocket, DialError> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    dial_authorized(url, authorization.as_deref(), limits, timeout).await
}

/// Like [`dial_authorized`], split into a link's writing and reading ends.
pub async fn dial_link(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
    timeout: Duration,
) -> Result<ClientLink, DialError> {
    let socket = dial_authorized(url, authorization, limits, timeout).await?;
    // The handshake read nothing past the response headers (see `UntilHeaders`), so the
    // socket can be handed on whole.
    let stream = socket.into_inner().tcp;
    Ok(link::split_link(stream, Role::Client, limits.config()))
}

/// `HTTP/1.1 101`: enough of a response to tell an upgrade from a refusal.
const STATUS_LINE_START: usize = 12;

/// A dialed socket during the WebSocket handshake: reads stop at the end of the response
/// headers, so whatever the server sends after them (its first frames) stays in the socket for
/// whoever reads the link next.
#[derive(Debug)]
pub struct UntilHeaders {
    tcp: TcpStream,
    /// The last bytes read, to find a `\r\n\r\n` split across reads.
    recent: [u8; 3],
    /// The first bytes of the response read so far (up to `HTTP/1.1 101`).
    head: Vec<u8>,
    done: bool,
}

impl UntilHeaders {
    fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            recent: [0; 3],
            head: Vec::new(),
            done: false,
        }
    }
}

impl AsyncRead for UntilHeaders {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.done {
            return Pin::new(&mut self.tcp).poll_read(cx, buf);
        }
        let mut peeked = [0u8; 1024];
        let mut view = ReadBuf::new(&mut peeked);
        let n = match self.tcp.poll_peek(cx, &mut view) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if n == 0 {
            return Poll::Ready(Ok(()));
        }
        // Only a successful upgrade is followed by frames. A refusal's body (the JSON error)
        // belongs to the handshake, which reads it from its own buffer.
        if self.head.len() < STATUS_LINE_START {
            // The status line may arrive in pieces; decide once its first 12 bytes are here.
            let want = STATUS_LINE_START - self.head.len();
            let mut head = self.head.clone();
            head.extend_from_slice(&peeked[..n.min(want)]);
            if head.len() == STATUS_LINE_START && !head.ends_with(b" 101") {
                self.done = true;
                return Pin::new(&mut self.tcp).poll_read(cx, buf);
            }
        }
        let mut window = self.recent.to_vec();
        window.extend_from_slice(&peeked[..n]);
        let end = window
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| at + 4 - self.recent.len());
        let take = end.unwrap_or(n).min(buf.remaining());
        let mut chunk = vec![0u8; take];
        // The bytes are in the socket (peeked), so a non-blocking read returns them now.
        let read = match self.tcp.try_read(&mut chunk) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Err(e) => return Poll::Ready(Err(e)),
        };
        buf.put_slice(&chunk[..read]);
        let want = STATUS_LINE_START.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..read.min(want)]);
        let mut recent = self.recent.to_vec();
        recent.extend_from_slice(&chunk[..read]);
        let keep = recent.len() - 3;
        self.recent.copy_from_slice(&recent[keep..]);
        if end.is_some_and(|end| read == end) {
            self.done = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes go straight to the stream; only reading the handshake is special.
impl AsyncWrite for UntilHeaders {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Like [`dial`], with a whole `Authorization` header value (e.g. from
/// [`crate::auth::LinkCredentials::authorization`]).
pub async fn dial_authorized(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
    timeout: Duration,
) -> Result<ClientSocket, DialError> {
    tokio::time::timeout(timeout, dial_inner(url, authorization, limits))
        .await
        .unwrap_or_else(|_| Err(DialError::Timeout(url.to_owned())))
}

async fn dial_inner(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
) -> Result<ClientSocket, DialError> {
    let bad_url = |reason: &str| DialError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let mut request = crate::url::normalize(url, crate::url::Form::WebSocket)
        .map_err(|e| bad_url(&e.to_string()))?
        .into_client_request()
        .map_err(|e| bad_url(&e.to_string()))?;
    let host = request
        .uri()
        .host()
        .ok_or_else(|| bad_url("no host"))?
        .to_owned();
    let port = request.uri().port_u16().unwrap_or(80);
    if let Some(value) = authorization {
        let value = HeaderValue::from_str(value)
            .map_err(|_| bad_url("credentials are not a valid header value"))?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|error| DialError::Connect {
            url: url.to_owned(),
            error,
        })?;
    let _ = stream.set_nodelay(true);
    match tokio_tungstenite::client_async_with_config(
        request,
        UntilHeaders::new(stream),
        Some(limits.config()),
    )
    .await
    {
        Ok((socket, _response)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let message = response.body().as_deref().and_then(parse_error_body);
            Err(DialError::Refused {
                url: url.to_owned(),
                status,
                message,
            })
        }
        Err(e) => Err(DialError::Handshake {
            url: url.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// Parses a `{"code": "KEY_INVALID", "message": "..."}` body.
pub fn parse_error_body(body: &[u8]) -> Option<(ErrorCode, String)> {
    #[derive(serde::Deserialize)]
    struct Body {
        code: String,
        message: String,
    }
    let body: Body = serde_json::from_slice(body).ok()?;
    let code = ErrorCode::from_str_name(&body.code).unwrap_or(ErrorCode::Unspecified);
    Some((code, body.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Reads an HTTP request's head, byte by byte so nothing after it is consumed.
    async fn read_request(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.unwrap();
            request.push(byte[0]);
        }
        request
    }

    /// A refusal whose status line arrives in two pieces still hands its JSON error to the
    /// dialer.
    #[tokio::test]
    async fn a_refusal_split_across_reads_keeps_its_error_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            read_request(&mut tcp).await;
            let body = r#"{"code":"KEY_INVALID","message":"no such key"}"#;
            tcp.write_all(b"HTTP/1.1 4").await.unwrap();
            tcp.flush().await.unwrap();
            // A network that delivers the status line in two segments.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let rest = format!(
                "01 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(rest.as_bytes()).await.unwrap();
            tcp
        });
        let refused = dial_link(
            &format!("ws://{addr}/x"),
            None,
            &WsLimits::default(),
            Duration::from_secs(5),
        )
        .await
        .expect_err("refused");
        assert_eq!(
            refused.refusal_code(),
            Some(ErrorCode::KeyInvalid),
            "{refused}"
        );
        drop(server.await.unwrap());
    }

    /// A server that answers the upgrade and sends its first frame in the same write: the
    /// frame must reach the dialed link's reader, not vanish into the handshake's buffer.
    #[tokio::test]
    async fn a_frame_sent_with_the_handshake_reaches_the_link() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let request = read_request(&mut tcp).await;
            let text = String::from_utf8(request).unwrap();
            let key = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Sec-WebSocket-Key: ")
                        .or_else(|| l.strip_prefix("sec-websocket-key: "))
                })
                .unwrap()
                .trim()
                .to_owned();
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
            .into_bytes();
            answer.extend_from_slice(&[0x82, 3, b'a', b'b', b'c']);
            tcp.write_all(&answer).await.unwrap();
            tcp
        });
        let link = dial_link(
            &format!("ws://{addr}/x"),
            None,
            &WsLimits::default(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let mut stream = link.stream;
        match stream.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                assert_eq!(&b[..], b"abc")
            }
            other => panic!("expected the first frame, got {other:?}"),
        }
        drop(server.await.unwrap());
    }

    /// Waits (yielding, not sleeping) until the writer behind `direct` has parked.
    async fn parked(direct: &link::Direct) {
        let wait = async {
            while !direct.is_parked() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the writer parks once it has written everything");
    }

    /// Direct writes reach the client while its link is idle; once the socket is full they
    /// are queued behind what the socket did not take, and the client reads every frame whole
    /// and in order; after the link closes nothing is written directly. Two worker threads, so
    /// the writer runs while the test offers frames.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_keep_frames_whole_and_in_order_under_backpressure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        // Small buffers, so the socket fills after a few frames.
        socket2::SockRef::from(&accepted)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let link = accepted_link(Bytes::new(), accepted, &WsLimits::default());
        let (data_tx, data_rx) = link::data_queue();
        let backlog = Arc::new(link::Backlog::counted(1 << 16, 1 << 30));
        let direct = link
            .sink
            .direct(&data_tx)
            .expect("an accepted link shares its socket");
        let (_ctrl_tx, ctrl) = tokio::sync::mpsc::channel(16);
        let closer = link::Closer::new();
        let writer = tokio::spawn(link::run_writer(
            link.sink,
            link::WriterSetup {
                ctrl,
                data: Some((
                    data_rx,
                    link::DataBacklog {
                        backlog: backlog.clone(),
                        notice: |_| Bytes::new(),
                        framed: true,
                    },
                )),
                closer: closer.clone(),
                linger: Duration::from_secs(5),
                direct: Some(direct.clone()),
                on_close: link::OnClose::SendQueued,
                first: Vec::new(),
            },
        ));
        let frame = |i: usize, len: usize| {
            let body: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            crate::wire::framed(&body)
        };
        let queue = |frames: &Bytes| {
            assert!(backlog.reserve_n(frames.len(), 1));
            data_tx.send(frames.clone()).is_ok()
        };

        // Idle: written by the caller, never queued.
        parked(&direct).await;
        let first = frame(0, 100);
        assert!(
            direct
                .write_or_queue(&first, true, || panic!("queued while idle"))
                .is_none()
        );
        let mut got = vec![0; first.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("a direct write arrives")
            .unwrap();
        assert_eq!(got, first);

        // Something queued is never overtaken by a direct write.
        parked(&direct).await;
        let (a, b) = (frame(1, 300), frame(2, 300));
        assert!(direct.write_or_queue(&a, false, || queue(&a)).is_some());
        let _ = direct.write_or_queue(&b, true, || queue(&b));
        let mut got = vec![0; a.len() + b.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("queued and direct writes arrive")
            .unwrap();
        assert!(
            got[..a.len()] == a[..],
            "a direct write overtook a queued frame"
        );

        // A client that does not read: direct writes until the socket is full, then queued.
        // Frames span several segments, so the socket takes part of one.
        parked(&direct).await;
        let mut sent = Vec::new();
        let mut queued = 0;
        for i in 1..200 {
            let f = frame(i, 256 * 1024 + i);
            if direct.write_or_queue(&f, true, || queue(&f)).is_some() {
                queued += 1;
            }
            sent.extend_from_slice(&f);
            if queued == 3 {
                break;
            }
        }
        assert_eq!(queued, 3, "the socket never filled");
        let mut got = vec![0; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the client reads everything that was accepted")
            .unwrap();
        assert!(got == sent, "the client read frames cut or out of order");

        // Idle again, then closed: no more direct writes, and the close frame ends the stream.
        parked(&direct).await;
        closer.close(None);
        let end = writer.await.unwrap();
        assert!(end.error.is_none(), "{:?}", end.error);
        assert!(
            direct
                .write_or_queue(&first, true, || queue(&first))
                .is_some_and(|ok| !ok),
            "a closed link takes no direct writes and its queue is closed"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0x88, 0x00], "only the close frame after the data");
    }
}
