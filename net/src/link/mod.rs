//! The parts every link (server, negotiation, client, peer) is built from.
//!
//! A link is a reader task and a writer task over the two halves of one WebSocket:
//!
//! * the **writer** ([`run_writer`]) owns the socket's write half ([`LinkSink`]) and drains
//!   two queues of pre-encoded frames ([`crate::queue`], which hold no memory while idle):
//!   `ctrl` (the link's own replies and control messages, always preferred) and `data`
//!   (fanned-out messages, unbounded as a queue but bounded in frames and bytes by a counted
//!   [`Backlog`]; a comm server queues a subscriber one item per burst of deliveries, not per
//!   message). It frames every message that is ready, up to [`MAX_BATCH`] or the write buffer
//!   size, into one buffer and writes it with one `write`, so a busy link costs one syscall
//!   per batch. When a link records drops on its data queue the writer appends a notice
//!   frame to the next batch. While it has nothing to write it *parks*, and a link that has a
//!   [`Direct`] handle (accepted TCP links) may then be written by its senders straight from
//!   their own task, see [`Direct`];
//! * the **reader** is link-specific; it pulls frames with [`next_frame`] from a
//!   [`FrameReader`] over the socket's read half ([`LinkStream`]), whose own writes (pong and
//!   close replies) go to the writer. It ends the link through the [`Closer`], optionally with
//!   "last words" (an encoded `Error`) that the writer sends before the WebSocket close frame.
//!
//! Nothing here knows message types; the links in the service crates supply encoded frames.
//!
//! Files: this one holds the socket's two halves ([`Link`], [`split_link`]); `backlog.rs` the
//! data queue and its accounting, `direct.rs` direct writes and their gate, `closer.rs` the
//! closer, `writer.rs` the writer, `read.rs` reading frames. The wire format itself is
//! [`crate::wire`].

mod backlog;
mod closer;
mod direct;
mod driver;
mod read;
mod replay;
mod writer;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Time a closing link allows for its last words and the close handshake.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

pub use backlog::{Backlog, DataBacklog, DataRx, DataTx, Unreported, data_queue, now_ms};
pub use closer::{Clock, Closer, LastWords};
pub use direct::{Direct, TrySend};
pub use driver::{
    Flow, Handler, Heartbeat, MAX_BURST, Options, Served, Watch, serve, silent_error,
};
pub use read::{Burst, Inbound, ReadError, first_message, linger, next_frame, ready_frame};
pub use replay::{Replay, ReplayLimits};
pub use writer::{First, MAX_BATCH, OnClose, WriterEnd, WriterSetup, run_writer};

use crate::frames::FrameReader;
use crate::queue;
use crate::wire::{OP_BINARY, put_frame};

/// Replies the reader's WebSocket may have waiting for the writer (pongs, a close reply). A peer
/// that piles up more by pinging a link it does not read from loses the link.
const REPLY_QUEUE: usize = 64;

/// The read half of a link's socket as the reader's [`FrameReader`] sees it: reads come from
/// the socket; writes (its pong and close replies, whole frames) are handed to the link's
/// writer, which alone writes to the socket, so frames never interleave.
#[derive(Debug)]
pub struct ReadSide<S> {
    read: ReadHalf<S>,
    /// Replies from the reader's WebSocket waiting for the writer: rare and small.
    replies: queue::Sender<Bytes>,
}

impl<S: AsyncRead> AsyncRead for ReadSide<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for ReadSide<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.replies.try_send(Bytes::copy_from_slice(buf)) {
            Ok(()) => {}
            Err(queue::TrySendError::Closed(_)) => {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            Err(queue::TrySendError::Full(_)) => {
                return Poll::Ready(Err(std::io::Error::other(
                    "the peer does not read the replies to its pings",
                )));
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The reading end of a link.
pub type LinkStream<S> = FrameReader<ReadSide<S>>;

/// Both ends of a link over one socket.
#[derive(Debug)]
pub struct Link<S> {
    /// The writing end, for [`run_writer`].
    pub sink: LinkSink<S>,
    /// The reading end, for [`next_frame`].
    pub stream: LinkStream<S>,
}

/// The writing end of a link: the socket's write half, written by [`run_writer`], which
/// frames messages itself (and, while the writer is parked, by [`Direct`] senders).
#[derive(Debug)]
pub struct LinkSink<S> {
    write: WriteHalf<S>,
    replies: queue::Receiver<Bytes>,
    role: Role,
    /// Bytes gathered before a batch is written.
    batch_bytes: usize,
    /// The socket again, for [`Direct`] writes; `None` for links that cannot share it.
    pub(crate) socket: Option<Arc<dyn TrySend>>,
}

impl<S> LinkSink<S> {
    /// A handle that lets the senders of the data queue `data` write to the socket themselves
    /// while the writer is parked; give it to the writer too ([`WriterSetup::direct`]). `None`
    /// when the link's socket cannot be shared.
    pub fn direct(&self, data: &DataTx) -> Option<Arc<Direct>> {
        let socket = self.socket.clone()?;
        Some(Arc::new(Direct::new(socket, data.clone())))
    }
}

impl<S: AsyncWrite> LinkSink<S> {
    /// Frames `payloads` and writes them now, before the link's writer is started: the first
    /// messages of a handshake, which must not wait behind anything queued for the writer.
    pub async fn send_now(&mut self, payloads: &[Bytes]) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for payload in payloads {
            put_frame(&mut out, OP_BINARY, payload, self.role);
        }
        self.write.write_all(&out).await?;
        self.write.flush().await
    }

    /// Frames `payloads` and a close with `status` and writes them now: the last words of a
    /// link whose writer never started (a refused handshake). Read the stream on with
    /// [`linger`] before dropping it, or unread input may reset the connection and lose these.
    pub async fn close_now(&mut self, payloads: &[Bytes], status: u16) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for payload in payloads {
            put_frame(&mut out, OP_BINARY, payload, self.role);
        }
        put_frame(
            &mut out,
            crate::wire::OP_CLOSE,
            &status.to_be_bytes(),
            self.role,
        );
        self.write.write_all(&out).await?;
        self.write.flush().await
    }
}

/// Splits an established WebSocket connection (handshake done, nothing read past it) into a
/// link's writing and reading ends. `config` limits what the reader accepts; its
/// `write_buffer_size` is the writer's batch size in bytes.
pub fn split_link<S>(io: S, role: Role, config: WebSocketConfig) -> Link<S>
where
    S: AsyncRead + AsyncWrite,
{
    let (read, write) = tokio::io::split(io);
    let (replies, replies_rx) = queue::bounded(REPLY_QUEUE);
    let batch_bytes = config.write_buffer_size.max(4096);
    let stream = FrameReader::new(ReadSide { read, replies }, role, &config);
    Link {
        sink: LinkSink {
            write,
            replies: replies_rx,
            role,
            batch_bytes,
            socket: None,
        },
        stream,
    }
}
