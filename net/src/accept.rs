//! The server side of a WebSocket: answering an upgrade request that came in over hyper
//! ([`accept`]) and turning the upgraded connection into a link ([`upgraded_link`]) or, for the
//! dispatch gateway's drivers, a plain tungstenite socket ([`upgraded`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
pub use hyper::upgrade::OnUpgrade;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use relaymesh_proto::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::link::{self, Link, LinkStream};
use crate::serve::ApiError;
use crate::tls::ServerTlsStream;
use crate::ws::WsLimits;

/// A WebSocket this process accepted, as a plain tungstenite socket.
pub type ServerSocket = WebSocketStream<TokioIo<Upgraded>>;
/// Both ends of a link this process accepted.
pub type ServerLink = Link<Accepted>;
/// The reading end of a link this process accepted.
pub type ServerLinkStream = LinkStream<Accepted>;

/// Why an accepted upgrade could not become a link.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The upgrade itself failed (the client went away, a protocol error).
    #[error("upgrade failed: {0}")]
    Upgrade(hyper::Error),
    /// The connection is neither TCP nor TLS over TCP.
    #[error("upgraded connection is not a TCP or TLS stream")]
    NotTcp,
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
/// The link owns the TCP (or TLS) stream itself: hyper's connection buffer is let go (what the
/// client sent after its upgrade request, if anything, is kept in a copy of its own size), which
/// saves an idle connection the 8 KiB buffer.
pub async fn upgraded_link(
    on_upgrade: OnUpgrade,
    limits: &WsLimits,
) -> Result<ServerLink, UpgradeError> {
    let upgraded = on_upgrade.await.map_err(UpgradeError::Upgrade)?;
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            set_user_timeout(parts.io.inner(), limits.tcp_user_timeout);
            return Ok(accepted_link(
                Bytes::copy_from_slice(&parts.read_buf),
                parts.io.into_inner(),
                limits,
            ));
        }
        Err(upgraded) => upgraded,
    };
    let parts = upgraded
        .downcast::<TokioIo<ServerTlsStream<TcpStream>>>()
        .map_err(|_| UpgradeError::NotTcp)?;
    let tls = parts.io.into_inner();
    set_user_timeout(tls.get_ref().0, limits.tcp_user_timeout);
    let io = Accepted {
        pre: Bytes::copy_from_slice(&parts.read_buf),
        io: AcceptedIo::Tls(Box::new(tls)),
    };
    // No direct writes: TLS records are written by the link's writer alone.
    Ok(link::split_link(io, Role::Server, limits.config()))
}

/// Sets `TCP_USER_TIMEOUT` ([`WsLimits::tcp_user_timeout`]) where the system has it.
pub(crate) fn set_user_timeout(tcp: &TcpStream, timeout: Option<Duration>) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(timeout) = timeout
        && let Err(error) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout))
    {
        tracing::debug!(%error, "cannot set TCP_USER_TIMEOUT");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (tcp, timeout);
}

/// A server link over `tcp`, whose first bytes (read past the upgrade request) are `pre`; its
/// socket is shared with [`link::Direct`] writers.
fn accepted_link(pre: Bytes, tcp: TcpStream, limits: &WsLimits) -> ServerLink {
    let (read, write) = tcp.into_split();
    let write = Arc::new(write);
    let io = Accepted {
        pre,
        io: AcceptedIo::Plain {
            read,
            write: write.clone(),
        },
    };
    let mut link = link::split_link(io, Role::Server, limits.config());
    link.sink.socket = Some(write);
    link
}

/// An accepted TCP (or TLS) stream after its HTTP upgrade: first the bytes hyper had already
/// read past the request, then the stream. A TCP stream's write half is shared with the link's
/// [`link::Direct`] writers, so it is written through `&TcpStream`.
#[derive(Debug)]
pub struct Accepted {
    pre: Bytes,
    io: AcceptedIo,
}

#[derive(Debug)]
enum AcceptedIo {
    Plain {
        read: OwnedReadHalf,
        write: Arc<OwnedWriteHalf>,
    },
    Tls(Box<ServerTlsStream<TcpStream>>),
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
        match &mut self.io {
            AcceptedIo::Plain { read, .. } => Pin::new(read).poll_read(cx, buf),
            AcceptedIo::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let write = match &mut self.io {
            AcceptedIo::Plain { write, .. } => write,
            AcceptedIo::Tls(tls) => return Pin::new(&mut **tls).poll_write(cx, buf),
        };
        let tcp: &TcpStream = (**write).as_ref();
        loop {
            std::task::ready!(tcp.poll_write_ready(cx))?;
            // `try_write` clears the readiness it finds stale, so this loop waits, not spins.
            match tcp.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            AcceptedIo::Plain { .. } => Poll::Ready(Ok(())),
            AcceptedIo::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            AcceptedIo::Plain { write, .. } => {
                let tcp: &TcpStream = (**write).as_ref();
                Poll::Ready(socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write))
            }
            AcceptedIo::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio::io::AsyncReadExt as _;

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
        let (_ctrl_tx, ctrl) = crate::queue::bounded(16);
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
                        replay: None,
                    },
                )),
                closer: closer.clone(),
                linger: Duration::from_secs(5),
                direct: Some(direct.clone()),
                on_close: link::OnClose::SendQueued,
                first: link::First::Nothing,
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
        assert_eq!(
            rest,
            [0x88, 0x02, 0x03, 0xe8],
            "only the close frame (1000) after the data"
        );
    }
}
