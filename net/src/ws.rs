//! Dialing a WebSocket (over TCP, or TLS over TCP for `wss://`), with the size limits and buffer
//! sizes from [`WsLimits`] and `TCP_NODELAY` set. The accepting side is [`crate::accept`] (feature
//! `server`); both end up with a link ([`crate::link`]), so link code is the same whether this
//! process dialed or accepted.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};
use relaymesh_proto::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
pub use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use bytes::Bytes;

use crate::link::{self, Link, LinkStream};
use crate::tls::ClientTlsStream;
pub use crate::tls::Connector;

/// A WebSocket this process dialed.
pub type ClientSocket = WebSocketStream<UntilHeaders>;
/// A link this process dialed.
pub type ClientLink = Link<Dialed>;
/// The reading end of a link this process dialed.
pub type ClientLinkStream = LinkStream<Dialed>;

/// A connection this process dialed: TCP, or TLS over TCP; reads first return the bytes read
/// past the WebSocket handshake, if any (over TLS the handshake cannot peek, see
/// [`UntilHeaders`]).
#[derive(Debug)]
pub struct Dialed {
    pre: Bytes,
    io: DialedIo,
}

#[derive(Debug)]
enum DialedIo {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

impl Dialed {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            DialedIo::Plain(tcp) => tcp,
            DialedIo::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Why [`open`] could not connect.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// No TCP connection.
    Connect(std::io::Error),
    /// The TLS handshake failed, in words.
    Tls(String),
}

/// Connects to `host:port` (or to the address `connector` is [pinned](Connector::pinned) to),
/// with `TCP_NODELAY`, and over TLS when `secure` (the server's certificate must name `host`).
pub(crate) async fn open(
    host: &str,
    port: u16,
    connector: &Connector,
    secure: bool,
) -> Result<Dialed, OpenError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = match connector.pin() {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect((bare, port)).await,
    }
    .map_err(OpenError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let io = if secure {
        DialedIo::Tls(Box::new(
            connector.connect(bare, tcp).await.map_err(OpenError::Tls)?,
        ))
    } else {
        DialedIo::Plain(tcp)
    };
    Ok(Dialed {
        pre: Bytes::new(),
        io,
    })
}

impl AsyncRead for Dialed {
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
        match &mut self.io {
            DialedIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            DialedIo::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            DialedIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            DialedIo::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            DialedIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            DialedIo::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            DialedIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            DialedIo::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

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
    /// `TCP_USER_TIMEOUT` on the socket (Linux): the kernel ends the connection when data it
    /// sent stays unacknowledged this long, so a peer that vanished (a black-holed route, a
    /// frozen process whose buffers are full) is found without waiting for the heartbeat.
    /// Set only on the links that serve the process (servers' own dials and accepted links).
    pub tcp_user_timeout: Option<Duration>,
}

impl Default for WsLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            read_buffer_bytes: 8 * 1024,
            write_buffer_bytes: 64 * 1024,
            tcp_user_timeout: None,
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
    /// The TLS handshake of a `wss://` URL failed (e.g. a certificate signed by a CA this
    /// process does not trust: give it with `--ca` / `RELAYMESH_CA`).
    #[error("cannot connect to {url}: {message}")]
    Tls {
        /// The URL.
        url: String,
        /// What went wrong, in words.
        message: String,
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
    Credentials(crate::keys::AuthError),
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

/// Opens a WebSocket to `url` (`ws://host:port/path?query`, or `wss://` with the process's
/// default trust, see [`Connector`]), optionally presenting a bearer token, with `TCP_NODELAY`
/// and the given limits.
pub async fn dial(
    url: &str,
    bearer: Option<&str>,
    limits: &WsLimits,
    timeout: Duration,
) -> Result<ClientSocket, DialError> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    dial_authorized(
        url,
        authorization.as_deref(),
        limits,
        &Connector::default(),
        timeout,
    )
    .await
}

/// Like [`dial_authorized`], split into a link's writing and reading ends.
pub async fn dial_link(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
    tls: &Connector,
    timeout: Duration,
) -> Result<ClientLink, DialError> {
    dial_link_with(url, authorization, limits, tls, timeout, &[]).await
}

/// Like [`dial_link`], with the link's first messages (`first`, payloads of binary frames)
/// sent in the same write as the upgrade request: the server reads them right after it, and
/// the round trip of waiting for the upgrade's answer before sending them is saved. If the
/// upgrade is refused they are never read.
pub async fn dial_link_with(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
    tls: &Connector,
    timeout: Duration,
    first: &[Bytes],
) -> Result<ClientLink, DialError> {
    let mut rider = bytes::BytesMut::new();
    for payload in first {
        crate::wire::put_frame(&mut rider, crate::wire::OP_BINARY, payload, Role::Client);
    }
    let dial = dial_inner(url, authorization, limits, tls, rider);
    let socket = tokio::time::timeout(timeout, dial)
        .await
        .unwrap_or_else(|_| Err(DialError::Timeout(url.to_owned())))?;
    // The handshake read nothing past the response headers (see `UntilHeaders`): what it
    // read ahead over TLS is kept in front of the stream, so it can be handed on whole.
    let stream = socket.into_inner().dialed;
    Ok(link::split_link(stream, Role::Client, limits.config()))
}

/// `HTTP/1.1 101`: enough of a response to tell an upgrade from a refusal.
const STATUS_LINE_START: usize = 12;

/// Finds where an HTTP response head ends in a stream read piece by piece, so that a reader
/// can stop exactly there: what follows a `101 Switching Protocols` head is the server's first
/// frames. Pure (no I/O), so it is tested and fuzzed on its own.
#[derive(Debug, Clone, Default)]
pub struct HeadScanner {
    /// The last bytes consumed, to find a `\r\n\r\n` split across reads.
    recent: Vec<u8>,
    /// The first bytes of the response consumed so far (up to `HTTP/1.1 101`).
    head: Vec<u8>,
    done: bool,
}

/// What [`HeadScanner::scan`] says about the bytes available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The response is not a `101`: everything, body included, belongs to the handshake.
    NotUpgrade,
    /// The first `n` bytes belong to the head; with `last`, the head ends with them.
    Take {
        /// Bytes of the head.
        n: usize,
        /// They end the head.
        last: bool,
    },
}

impl HeadScanner {
    /// Whether the head has been consumed whole.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Says how much of `available` (the next bytes of the stream, not yet consumed) belongs
    /// to the head.
    pub fn scan(&self, available: &[u8]) -> Scan {
        if self.head.len() < STATUS_LINE_START {
            // The status line may arrive in pieces; decide once its first 12 bytes are here.
            let want = STATUS_LINE_START - self.head.len();
            let mut head = self.head.clone();
            head.extend_from_slice(&available[..available.len().min(want)]);
            if head.len() == STATUS_LINE_START && !head.ends_with(b" 101") {
                return Scan::NotUpgrade;
            }
        }
        let mut window = self.recent.clone();
        window.extend_from_slice(available);
        match window.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(at) => Scan::Take {
                n: at + 4 - self.recent.len(),
                last: true,
            },
            None => Scan::Take {
                n: available.len(),
                last: false,
            },
        }
    }

    /// Records that `bytes`, the start of what was last scanned, were consumed.
    pub fn consumed(&mut self, bytes: &[u8]) {
        let want = STATUS_LINE_START.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..bytes.len().min(want)]);
        let mut window = std::mem::take(&mut self.recent);
        window.extend_from_slice(bytes);
        self.done = window.ends_with(b"\r\n\r\n");
        let keep = window.len().saturating_sub(3);
        self.recent = window.split_off(keep);
    }
}

/// A dialed socket during the WebSocket handshake: reads stop at the end of the response
/// headers, so whatever the server sends after them (its first frames) stays for whoever reads
/// the link next — in the TCP socket (found by peeking), or, over TLS, which cannot peek, in
/// front of the stream ([`Dialed`] reads it first).
///
/// Frames to send with the upgrade request ride along: the request is held until it is
/// flushed, then written together with them.
#[derive(Debug)]
pub struct UntilHeaders {
    dialed: Dialed,
    scanner: HeadScanner,
    /// Reads go straight to the stream: the head is over, or the response is no upgrade.
    done: bool,
    /// Frames to follow the request, until the flush that writes both.
    rider: bytes::BytesMut,
    /// What is held back to be written at the flush: the request, then the rider.
    held: bytes::BytesMut,
}

impl UntilHeaders {
    fn new(dialed: Dialed, rider: bytes::BytesMut) -> Self {
        Self {
            dialed,
            scanner: HeadScanner::default(),
            done: false,
            rider,
            held: bytes::BytesMut::new(),
        }
    }

    /// Peeks at the TCP socket: the bytes available, not consumed.
    fn peek(
        tcp: &TcpStream,
        cx: &mut Context<'_>,
        into: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut view = ReadBuf::new(into);
        tcp.poll_peek(cx, &mut view)
    }
}

impl UntilHeaders {
    /// Writes what is held back, request and rider, in as few writes as the socket allows.
    fn poll_write_held(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while !this.held.is_empty() {
            let n = std::task::ready!(Pin::new(&mut this.dialed).poll_write(cx, &this.held))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let _ = this.held.split_to(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for UntilHeaders {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.done {
            return Pin::new(&mut self.dialed).poll_read(cx, buf);
        }
        let this = &mut *self;
        let from_socket =
            this.dialed.pre.is_empty() && matches!(this.dialed.io, DialedIo::Plain(_));
        let mut peeked = [0u8; 1024];
        // What is available: read ahead (TLS), or peeked at (TCP).
        let available: &[u8] = match &mut this.dialed.io {
            _ if !this.dialed.pre.is_empty() => &this.dialed.pre,
            DialedIo::Plain(tcp) => match Self::peek(tcp, cx, &mut peeked) {
                Poll::Ready(Ok(n)) => &peeked[..n],
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            },
            DialedIo::Tls(tls) => {
                let mut view = ReadBuf::new(&mut peeked);
                match Pin::new(&mut **tls).poll_read(cx, &mut view) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                let n = view.filled().len();
                this.dialed.pre = Bytes::copy_from_slice(&peeked[..n]);
                &this.dialed.pre
            }
        };
        if available.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let take = match this.scanner.scan(available) {
            // Only a successful upgrade is followed by frames. A refusal's body (the JSON
            // error) belongs to the handshake, which reads it from its own buffer.
            Scan::NotUpgrade => {
                this.done = true;
                return Pin::new(&mut this.dialed).poll_read(cx, buf);
            }
            Scan::Take { n, .. } => n.min(buf.remaining()),
        };
        let chunk: Vec<u8> = if from_socket {
            let mut chunk = vec![0u8; take];
            // The bytes are in the socket (peeked), so a non-blocking read returns them now.
            let read = match this.dialed.tcp().try_read(&mut chunk) {
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            chunk.truncate(read);
            chunk
        } else {
            this.dialed.pre.split_to(take).to_vec()
        };
        buf.put_slice(&chunk);
        this.scanner.consumed(&chunk);
        this.done = this.scanner.done();
        Poll::Ready(Ok(()))
    }
}

/// Writes go straight to the stream, except while a rider waits: then the request is held
/// and written with it at the flush.
impl AsyncWrite for UntilHeaders {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !self.rider.is_empty() {
            self.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if !self.held.is_empty() {
            std::task::ready!(self.as_mut().poll_write_held(cx))?;
        }
        Pin::new(&mut self.dialed).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.rider.is_empty() {
            let rider = std::mem::take(&mut self.rider);
            self.held.extend_from_slice(&rider);
        }
        std::task::ready!(self.as_mut().poll_write_held(cx))?;
        Pin::new(&mut self.dialed).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.dialed).poll_shutdown(cx)
    }
}

/// Like [`dial`], with a whole `Authorization` header value (e.g. from
/// [`crate::auth::LinkCredentials::authorization`]) and the trust for a `wss://` URL.
pub async fn dial_authorized(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
    tls: &Connector,
    timeout: Duration,
) -> Result<ClientSocket, DialError> {
    let dial = dial_inner(url, authorization, limits, tls, bytes::BytesMut::new());
    tokio::time::timeout(timeout, dial)
        .await
        .unwrap_or_else(|_| Err(DialError::Timeout(url.to_owned())))
}

/// Dials `url` and upgrades; `rider` (whole frames, maybe none) goes out in the same write as
/// the upgrade request.
async fn dial_inner(
    url: &str,
    authorization: Option<&str>,
    limits: &WsLimits,
    tls: &Connector,
    rider: bytes::BytesMut,
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
    let secure = request.uri().scheme_str() == Some("wss");
    let port = request
        .uri()
        .port_u16()
        .unwrap_or(if secure { 443 } else { 80 });
    if let Some(value) = authorization {
        let value = HeaderValue::from_str(value)
            .map_err(|_| bad_url("credentials are not a valid header value"))?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let stream = open(&host, port, tls, secure).await.map_err(|e| match e {
        OpenError::Connect(error) => DialError::Connect {
            url: url.to_owned(),
            error,
        },
        OpenError::Tls(message) => DialError::Tls {
            url: url.to_owned(),
            message,
        },
    })?;
    #[cfg(feature = "server")]
    crate::accept::set_user_timeout(stream.tcp(), limits.tcp_user_timeout);
    match tokio_tungstenite::client_async_with_config(
        request,
        UntilHeaders::new(stream, rider),
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
    // The first JSON value only: a server that kept the connection open after refusing an
    // upgrade may have answered the frames that rode behind it too (an older comm server
    // read them as a request), and those bytes follow in the same read.
    let body: serde_json::Value = serde_json::Deserializer::from_slice(body)
        .into_iter()
        .next()?
        .ok()?;
    let code = ErrorCode::from_str_name(body["code"].as_str()?).unwrap_or(ErrorCode::Unspecified);
    Some((code, body["message"].as_str()?.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

    #[test]
    fn an_error_body_is_read_up_to_its_end_whatever_follows() {
        let body = br#"{"code":"KEY_INVALID","message":"key already used"}"#;
        let expected = Some((ErrorCode::KeyInvalid, "key already used".to_owned()));
        assert_eq!(parse_error_body(body), expected);
        let mut followed = body.to_vec();
        followed.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(parse_error_body(&followed), expected);
        assert_eq!(parse_error_body(b"not json"), None);
    }

    /// Feeds `stream` to a scanner in pieces of `step` bytes, consuming at most `read` of each
    /// piece, as `UntilHeaders` does; returns what it consumed, or `None` for no upgrade.
    fn scan_in_pieces(stream: &[u8], step: usize, read: usize) -> Option<(usize, bool)> {
        let mut scanner = HeadScanner::default();
        let mut at = 0;
        while at < stream.len() && !scanner.done() {
            let available = &stream[at..(at + step).min(stream.len())];
            match scanner.scan(available) {
                Scan::NotUpgrade => return None,
                Scan::Take { n, .. } => {
                    let n = n.min(read);
                    scanner.consumed(&available[..n]);
                    at += n;
                }
            }
        }
        Some((at, scanner.done()))
    }

    #[test]
    fn the_head_scanner_stops_exactly_at_the_end_of_a_101_head() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        let mut stream = head.to_vec();
        stream.extend_from_slice(b"\x82\x03abc\r\n\r\n");
        for step in 1..=stream.len() {
            for read in 1..=4 {
                assert_eq!(
                    scan_in_pieces(&stream, step, read),
                    Some((head.len(), true)),
                    "step {step}, read {read}"
                );
            }
        }
        // A head not complete yet is consumed whole and is not done.
        assert_eq!(scan_in_pieces(&head[..20], 3, 2), Some((20, false)));
        // Anything but a 101 is left to the handshake, however it arrives.
        let refused = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}";
        for step in 1..=refused.len() {
            assert_eq!(scan_in_pieces(refused, step, 1), None, "step {step}");
        }
    }

    /// Reads an HTTP request's head, byte by byte so nothing after it is consumed.
    async fn read_request(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
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
            &Connector::default(),
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

    /// Answers one upgrade on `io` and sends the first frame in the same write.
    async fn answer_with_a_frame<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut io: S,
    ) -> S {
        let request = read_request(&mut io).await;
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
        io.write_all(&answer).await.unwrap();
        io.flush().await.unwrap();
        io
    }

    async fn expect_first_frame(url: &str, tls: &Connector) {
        let link = dial_link(url, None, &WsLimits::default(), tls, Duration::from_secs(5))
            .await
            .unwrap();
        let mut stream = link.stream;
        match stream.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                assert_eq!(&b[..], b"abc")
            }
            other => panic!("expected the first frame, got {other:?}"),
        }
    }

    /// A server that answers the upgrade and sends its first frame in the same write: the
    /// frame must reach the dialed link's reader, not vanish into the handshake's buffer.
    #[tokio::test]
    async fn a_frame_sent_with_the_handshake_reaches_the_link() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            answer_with_a_frame(tcp).await
        });
        expect_first_frame(&format!("ws://{addr}/x"), &Connector::default()).await;
        drop(server.await.unwrap());
    }

    /// The same over TLS, where the handshake cannot peek: the frame arrives in the same TLS
    /// record as the head, is read ahead with it, and must still reach the link.
    #[tokio::test]
    async fn a_frame_sent_with_the_handshake_reaches_the_link_over_tls() {
        let pki = crate::tls::tests::TestPki::new();
        let acceptor = crate::tls::Acceptor::new(pki.identity(), None, &[]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.unwrap();
            let stats = crate::serve::ServeStats::default();
            let tls = acceptor
                .handshake(tcp, peer, Duration::from_secs(5), &stats)
                .await
                .unwrap();
            answer_with_a_frame(tls).await
        });
        expect_first_frame(&format!("wss://{addr}/x"), &pki.connector()).await;
        drop(server.await.unwrap());
    }
}
