//! The parts every link (server, negotiation, client, peer) is built from.
//!
//! A link is a reader task and a writer task over the two halves of one WebSocket:
//!
//! * the **writer** ([`run_writer`]) owns the socket's write half ([`LinkSink`]) and drains
//!   two queues of pre-encoded frames: `ctrl` (the link's own replies and control messages,
//!   always preferred) and `data` (fanned-out messages, unbounded as a channel but bounded in
//!   frames and bytes by a counted [`Backlog`], so offering a frame takes no lock). It frames
//!   every message that is ready, up to [`MAX_BATCH`] or the write buffer size, into one buffer
//!   and writes it with one `write`, so a busy link costs one syscall per batch and no
//!   per-message lock. When a link records drops on its data queue the writer appends a notice
//!   frame to the next batch. While it has nothing to write it *parks*, and a link that has a
//!   [`Direct`] handle (accepted TCP links) may then be written by its senders straight from
//!   their own task, see [`Direct`];
//! * the **reader** is link-specific; it pulls frames with [`next_frame`] from a
//!   [`FrameReader`] over the socket's read half ([`LinkStream`]), whose own writes (pong and
//!   close replies) go to the writer. It ends the link through the [`Closer`], optionally with
//!   "last words" (an encoded `Error`) that the writer sends before the WebSocket close frame.
//!
//! Nothing here knows message types; the links in the service crates supply encoded frames.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use relaymesh_proto::{ErrorCode, v1};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::frames::{FrameReader, apply_mask};

/// Most frames written to the socket in one `write`.
pub const MAX_BATCH: usize = 512;

/// The sending end of a link's data queue. The channel is unbounded; the link's counted
/// [`Backlog`] bounds it in frames and bytes (senders [`Backlog::reserve`] before sending).
pub type DataTx = mpsc::UnboundedSender<Bytes>;
/// The receiving end of a link's data queue, drained by [`run_writer`].
pub type DataRx = mpsc::UnboundedReceiver<Bytes>;

/// A data queue; pair it with [`Backlog::counted`].
pub fn data_queue() -> (DataTx, DataRx) {
    mpsc::unbounded_channel()
}

/// Replies the reader's WebSocket may have waiting for the writer (pongs, a close reply). A peer
/// that piles up more by pinging a link it does not read from loses the link.
const REPLY_QUEUE: usize = 64;

/// The read half of a link's socket as the reader's [`FrameReader`] sees it: reads come from
/// the socket; writes (its pong and close replies, whole frames) are handed to the link's
/// writer, which alone writes to the socket, so frames never interleave.
#[derive(Debug)]
pub struct ReadSide<S> {
    read: ReadHalf<S>,
    replies: Arc<Replies>,
}

/// Replies from the reader's WebSocket waiting for the writer. Rare and small, so a plain
/// locked queue: a channel would cost every link a block of slots it almost never uses.
#[derive(Debug, Default)]
struct Replies {
    queue: std::sync::Mutex<std::collections::VecDeque<Bytes>>,
    ready: tokio::sync::Notify,
    reader_gone: std::sync::atomic::AtomicBool,
    writer_gone: std::sync::atomic::AtomicBool,
}

impl Replies {
    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Bytes>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next reply; `None` once the reader is gone and nothing is left.
    async fn next(&self) -> Option<Bytes> {
        loop {
            if let Some(reply) = self.queue().pop_front() {
                return Some(reply);
            }
            if self.reader_gone.load(Ordering::Acquire) {
                return None;
            }
            self.ready.notified().await;
        }
    }
}

impl<S> Drop for ReadSide<S> {
    fn drop(&mut self) {
        self.replies.reader_gone.store(true, Ordering::Release);
        self.replies.ready.notify_one();
    }
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
        if self.replies.writer_gone.load(Ordering::Acquire) {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let mut queue = self.replies.queue();
        if queue.len() >= REPLY_QUEUE {
            return Poll::Ready(Err(std::io::Error::other(
                "the peer does not read the replies to its pings",
            )));
        }
        queue.push_back(Bytes::copy_from_slice(buf));
        drop(queue);
        self.replies.ready.notify_one();
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
    replies: Arc<Replies>,
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
        Some(Arc::new(Direct {
            gate: std::sync::Mutex::new(Gate {
                socket: Some(socket),
                parked: false,
                rest: None,
            }),
            wake: data.clone(),
        }))
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
}

/// A socket that can be written without waiting, from any task.
pub trait TrySend: Send + Sync + std::fmt::Debug {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_send(&self, buf: &[u8]) -> std::io::Result<usize>;
}

/// Direct writes: a sender whose receiver's link is idle writes its frames to the socket from
/// its own task instead of queueing them and waking the link's writer. For a message fanned
/// out to a thousand idle receivers that saves a thousand task wake-ups, queue pushes and
/// writer polls; the `write` itself is the same.
///
/// The writer *parks* when it has written everything and its data queue is empty. Only then
/// may a sender write directly; anything else (the writer busy, a direct write that the socket
/// took only part of, a socket that would block) goes through the queue. Every sender takes
/// the gate to write *or* queue, so nothing queued is ever overtaken by a direct write. If the
/// socket takes part of a direct write, the rest is left at the gate for the writer, which
/// writes it before anything else: the stream never splits a frame. The writer takes the gate
/// only when it parks and when it wakes.
#[derive(Debug)]
pub struct Direct {
    gate: std::sync::Mutex<Gate>,
    /// The data queue, to wake the writer (with an empty item) after a partial direct write.
    wake: DataTx,
}

#[derive(Debug)]
struct Gate {
    /// The socket; let go when the writer ends, so a receiver that senders still know of
    /// (in routes not yet rebuilt) does not keep its connection open.
    socket: Option<Arc<dyn TrySend>>,
    /// The writer has nothing to write and nothing is queued: senders may write directly.
    parked: bool,
    /// The unwritten rest of a direct write, for the writer to write first.
    rest: Option<Bytes>,
}

impl Direct {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `frames` (whole WebSocket frames) to the socket now if `write_now` and the
    /// writer is parked, and returns `None`: they are sent, or their rest is the writer's.
    /// Otherwise runs `queue` (which queues them on the link's data queue) under the gate and
    /// returns what it returned.
    pub fn write_or_queue<R>(
        &self,
        frames: &Bytes,
        write_now: bool,
        queue: impl FnOnce() -> R,
    ) -> Option<R> {
        let mut gate = self.gate();
        if let Some(socket) = gate.socket.as_ref().filter(|_| write_now && gate.parked) {
            match socket.try_send(frames) {
                Ok(n) if n == frames.len() => return None,
                Ok(n) if n > 0 => {
                    gate.parked = false;
                    gate.rest = Some(frames.slice(n..));
                    // Closed only once the writer is gone, and then the gate is closed too.
                    let _ = self.wake.send(Bytes::new());
                    return None;
                }
                // Would block, or failed: the writer waits for room or meets the error.
                _ => {}
            }
        }
        gate.parked = false;
        Some(queue())
    }

    /// Whether senders may write directly now.
    #[cfg(test)]
    pub(crate) fn is_parked(&self) -> bool {
        self.gate().parked
    }

    /// The writer has nothing to write: parks it if nothing is queued either.
    fn park(&self, queue_empty: impl FnOnce() -> bool) {
        let mut gate = self.gate();
        if gate.socket.is_some() && gate.rest.is_none() && queue_empty() {
            gate.parked = true;
        }
    }

    /// The writer has woken: no more direct writes; returns the rest of a partial one.
    fn unpark(&self) -> Option<Bytes> {
        let mut gate = self.gate();
        gate.parked = false;
        gate.rest.take()
    }

    /// The writer is done: no more direct writes; returns the rest of a partial one.
    fn close(&self) -> Option<Bytes> {
        let mut gate = self.gate();
        gate.socket = None;
        gate.parked = false;
        gate.rest.take()
    }
}

/// Closes a [`Direct`] gate when the writer ends, however it ends.
struct CloseGate<'a>(Option<&'a Direct>);

impl Drop for CloseGate<'_> {
    fn drop(&mut self) {
        if let Some(direct) = self.0 {
            direct.close();
        }
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
    let replies = Arc::new(Replies::default());
    let batch_bytes = config.write_buffer_size.max(4096);
    let stream = FrameReader::new(
        ReadSide {
            read,
            replies: replies.clone(),
        },
        role,
        &config,
    );
    Link {
        sink: LinkSink {
            write,
            replies,
            role,
            batch_bytes,
            socket: None,
        },
        stream,
    }
}

const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;

/// Appends one final WebSocket frame with `opcode` and `payload` to `out`; a client masks it
/// (RFC 6455 section 5.3), a server does not.
pub(crate) fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8], role: Role) {
    let len = payload.len();
    let masked = role == Role::Client;
    let mask_bit = if masked { 0x80 } else { 0 };
    out.reserve(len + 14);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(mask_bit | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(mask_bit | 126);
        out.put_u16(len);
    } else {
        out.put_u8(mask_bit | 127);
        out.put_u64(len as u64);
    }
    if !masked {
        out.put_slice(payload);
        return;
    }
    let key: [u8; 4] = rand::random();
    out.put_slice(&key);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], key);
}

/// Appends the header of an unmasked (server to client) final binary frame of `len` bytes; the
/// payload follows. With [`framed`] this is how a server encodes a message once for every
/// receiver.
pub fn put_frame_header(out: &mut BytesMut, len: usize) {
    out.reserve(10);
    out.put_u8(0x80 | OP_BINARY);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// `payload` as one unmasked binary frame, for a [`DataBacklog::framed`] queue.
pub fn framed(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_frame_header(&mut out, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Splits a run of whole unmasked frames into its frames' headers and payloads:
/// `(header_len, payload_len)` of the first frame, if whole.
fn first_frame(frames: &[u8]) -> Option<(usize, usize)> {
    let [_, second, rest @ ..] = frames else {
        return None;
    };
    let (header, len) = match second & 0x7F {
        126 => (
            4,
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
        ),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(*rest.first_chunk::<8>()?)).ok()?,
        ),
        n => (2, usize::from(n)),
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    (frames.len() >= header + mask + len).then_some((header + mask, len))
}

/// How many whole frames a run of frames holds.
fn count_frames(mut frames: &[u8]) -> usize {
    let mut n = 0;
    while let Some((header, len)) = first_frame(frames) {
        n += 1;
        frames = &frames[header + len..];
    }
    n
}

/// The payloads of a run of whole unmasked frames (a [`DataBacklog::framed`] item), for a
/// receiver that consumes a data queue itself instead of writing it to a socket.
pub fn frame_payloads(frames: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let (header, len) = first_frame(frames.get(at..)?)?;
        let payload = frames.slice(at + header..at + header + len);
        at += header + len;
        Some(payload)
    })
}

/// Whether a run of whole frames (a reply from the reader) holds a close frame.
fn holds_close(mut frames: &[u8]) -> bool {
    while let Some((header, len)) = first_frame(frames) {
        if frames[0] & 0x0F == OP_CLOSE {
            return true;
        }
        frames = &frames[header + len..];
    }
    false
}

/// Ends a link, once, with optional last words. Cloned into everything that may end the link:
/// its reader, its writer, and (for client sessions) publishers that find it too slow.
#[derive(Debug, Clone, Default)]
pub struct Closer {
    inner: Arc<CloserInner>,
}

#[derive(Debug, Default)]
struct CloserInner {
    token: CancellationToken,
    /// `Some` once closing, with the first caller's last words. Set before the token fires, so
    /// the writer always sees the words of the call that closed the link.
    state: std::sync::Mutex<Option<Option<Bytes>>>,
}

impl Closer {
    /// A link that is open.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts closing the link. The first caller's `last_words` (an encoded error frame) are
    /// sent before the close frame; later calls change nothing. Returns whether this call was
    /// the first.
    pub fn close(&self, last_words: Option<Bytes>) -> bool {
        if self.inner.token.is_cancelled() {
            return false;
        }
        let first = {
            let mut state = crate::sync::lock(&self.inner.state);
            let first = state.is_none();
            if first {
                *state = Some(last_words);
            }
            first
        };
        self.inner.token.cancel();
        first
    }

    /// Whether the link is closing.
    pub fn is_closed(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Resolves when the link starts closing.
    pub async fn closed(&self) {
        self.inner.token.cancelled().await
    }

    fn last_words(&self) -> Option<Bytes> {
        crate::sync::lock(&self.inner.state).clone().flatten()
    }
}

/// Milliseconds on a process-wide monotonic clock; only read on slow paths.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// The backlog of one link's data queue: bytes queued and frames dropped. Shared by the
/// senders (who check the byte budget and drop when the queue is full) and the link's writer
/// (who releases bytes as it writes, reports drops to the receiver and notices recovery).
///
/// The queue's channel bounds it in frames; the byte budget bounds it in memory, so a queue of
/// large messages cannot hold `frames × max_frame_bytes`. Only *large* frames (over
/// `budget / capacity` bytes) are metered: small ones are bounded by the frame count alone to
/// at most another `budget`, and skipping them keeps the common small-message path free of a
/// counter shared between the senders' cores and the writer's.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Frames the queue holds at most when the backlog counts them ([`Backlog::counted`]);
    /// `usize::MAX` when the queue's channel bounds itself.
    capacity: usize,
    queued_frames: AtomicUsize,
    budget: usize,
    large: usize,
    queued_bytes: AtomicUsize,
    unreported: AtomicU64,
    total: AtomicU64,
    /// [`now_ms`] of the first drop since the queue last ran empty; 0 when not stalled.
    stalled_since: AtomicU64,
}

impl Backlog {
    /// A backlog for a queue of `capacity` frames and a budget of `budget` bytes.
    pub fn new(capacity: usize, budget: usize) -> Self {
        Self {
            capacity: usize::MAX,
            budget,
            large: budget / capacity.max(1),
            ..Self::default()
        }
    }

    /// A backlog that also bounds the queue to `capacity` frames, for an unbounded channel
    /// ([`data_queue`]): offering a frame then costs two uncontended atomic additions instead
    /// of a bounded channel's semaphore.
    pub fn counted(capacity: usize, budget: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            ..Self::new(capacity, budget)
        }
    }

    /// Reserves room for a frame of `len` bytes about to be queued. `false` means the queue is
    /// full in frames (counted backlogs) or bytes; an empty queue always takes one frame,
    /// however large.
    #[inline]
    pub fn reserve(&self, len: usize) -> bool {
        self.reserve_n(len, 1)
    }

    /// Reserves room for `frames` frames of `len` bytes in all, queued as one item (a batch of
    /// pre-framed messages, [`DataBacklog::framed`]). All or nothing.
    #[inline]
    pub fn reserve_n(&self, len: usize, frames: usize) -> bool {
        if self.capacity != usize::MAX {
            let before = self.queued_frames.fetch_add(frames, Ordering::Relaxed);
            // An empty queue takes one item, however many frames it holds.
            if before > 0 && before + frames > self.capacity {
                self.queued_frames.fetch_sub(frames, Ordering::Relaxed);
                return false;
            }
        }
        if len <= self.large {
            return true;
        }
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > self.budget {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            if self.capacity != usize::MAX {
                self.queued_frames.fetch_sub(frames, Ordering::Relaxed);
            }
            return false;
        }
        true
    }

    /// Returns the room of a frame of `len` bytes (it was written, or never queued).
    #[inline]
    pub fn release(&self, len: usize) {
        self.release_n(len, 1);
    }

    /// Returns the room of an item reserved with [`Backlog::reserve_n`].
    #[inline]
    pub fn release_n(&self, len: usize, frames: usize) {
        if self.capacity != usize::MAX {
            self.queued_frames.fetch_sub(frames, Ordering::Relaxed);
        }
        if len > self.large {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Records one dropped frame. Returns `true` when the queue has now been stalled (not run
    /// empty) for longer than `grace_ms` since the first drop: the receiver is a slow consumer.
    pub fn record_drop(&self, grace_ms: u64) -> bool {
        self.record_drops(1, grace_ms)
    }

    /// Records `n` dropped frames at once (a refused batch); see [`Backlog::record_drop`].
    pub fn record_drops(&self, n: u64, grace_ms: u64) -> bool {
        self.unreported.fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n, Ordering::Relaxed);
        let now = now_ms();
        match self
            .stalled_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => false,
            Err(since) => now.saturating_sub(since) > grace_ms,
        }
    }

    /// Counts `n` frames lost without a notice to the receiver (they were queued when the link
    /// broke).
    pub fn record_lost(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Tells the receiver, with the next notice, that it may have missed `n` messages dropped
    /// elsewhere (by a peer server). Not counted as this queue's own drops.
    pub fn report_upstream(&self, n: u64) {
        self.unreported.fetch_add(n, Ordering::Relaxed);
    }

    /// Frames dropped or lost over the link's life.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn take_unreported(&self) -> u64 {
        if self.unreported.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.unreported.swap(0, Ordering::Relaxed)
    }

    fn drained(&self) {
        if self.stalled_since.load(Ordering::Relaxed) != 0 {
            self.stalled_since.store(0, Ordering::Relaxed);
        }
    }
}

/// How a writer accounts for its data queue.
#[derive(Debug, Clone)]
pub struct DataBacklog {
    /// The queue's backlog, shared with its senders.
    pub backlog: Arc<Backlog>,
    /// Encodes the frame that tells the receiver `n` messages were dropped.
    pub notice: fn(u64) -> Bytes,
    /// Data items are whole WebSocket frames, one or more ([`put_frame_header`], [`framed`]),
    /// written as they are: a batch of messages encoded once for many receivers. Otherwise
    /// each item is one message for the writer to frame.
    pub framed: bool,
}

/// What the writer needs besides the sink.
#[derive(Debug)]
pub struct WriterSetup {
    /// Control frames; preferred over data. The link is done when every sender is gone.
    pub ctrl: mpsc::Receiver<Bytes>,
    /// Data frames, if the link carries any, with their backlog accounting (senders must
    /// [`Backlog::reserve`] each frame before queueing it).
    pub data: Option<(DataRx, DataBacklog)>,
    /// The link's closer; when it fires the writer sends the last words and a close frame.
    pub closer: Closer,
    /// Time allowed for the last words and close frame to be written.
    pub linger: Duration,
    /// The link's direct-write gate, if its senders may write directly ([`LinkSink::direct`]).
    pub direct: Option<Arc<Direct>>,
    /// What becomes of control frames still queued when the link closes.
    pub on_close: OnClose,
}

/// What a closing writer does with the control frames still queued.
#[derive(Debug, Clone)]
pub enum OnClose {
    /// Sends them before the close frame (a server link's final `Load`, an `Ack`).
    SendQueued,
    /// Leaves them queued (the queue comes back in [`WriterEnd::ctrl`]) unless this token is
    /// cancelled: a client's messages wait for its next connection instead of going into one
    /// that was lost, and are sent when the client is closing.
    KeepQueuedUnless(CancellationToken),
}

/// How a writer ended.
#[derive(Debug)]
pub struct WriterEnd {
    /// The write error that ended the link, if one did.
    pub error: Option<std::io::Error>,
    /// Data messages still queued when the link closed, never sent.
    pub discarded: usize,
    /// The control queue, with what is left in it ([`OnClose`]).
    pub ctrl: mpsc::Receiver<Bytes>,
}

/// One item for the writer.
enum Out {
    /// Whole frames from the reader's WebSocket, written as they are.
    Raw(Bytes),
    /// A control message to frame.
    Ctrl(Bytes),
    /// A data message to frame (its backlog room is released once framed).
    Data(Bytes),
}

/// Drains the queues into the socket until the link closes, then sends queued control frames,
/// the last words (if any) and a close frame. The closer is fired either way so the reader
/// stops too.
pub async fn run_writer<S>(sink: LinkSink<S>, setup: WriterSetup) -> WriterEnd
where
    S: AsyncWrite,
{
    let LinkSink {
        mut write,
        replies,
        role,
        batch_bytes,
        socket: _,
    } = sink;
    let reply_source = replies;
    let mut replies = Some(&*reply_source);
    let WriterSetup {
        mut ctrl,
        data,
        closer,
        linger,
        direct,
        on_close,
    } = setup;
    let (mut data, accounting) = match data {
        Some((rx, accounting)) => (Some(rx), Some(accounting)),
        None => (None, None),
    };
    debug_assert!(
        direct.is_none() || (role == Role::Server && accounting.as_ref().is_some_and(|a| a.framed)),
        "direct writes carry whole server frames: a server link with a framed data queue"
    );
    let gate_guard = CloseGate(direct.as_deref());
    let direct = gate_guard.0;
    let mut out = BytesMut::new();
    let mut sent_close = false;
    // Pinned once: a fresh `closed()` per batch would check the token under its lock and
    // register a waiter every time.
    let closed = closer.closed();
    tokio::pin!(closed);
    let result: std::io::Result<()> = async {
        loop {
            if let Some(direct) = direct {
                // Control frames (a session's `Ready` first of all) are not overtaken either.
                direct.park(|| ctrl.is_empty() && data.as_ref().is_none_or(DataRx::is_empty));
            }
            let first = tokio::select! {
                biased;
                _ = &mut closed => return Ok(()),
                reply = recv_reply(&mut replies) => match reply {
                    Some(raw) => Out::Raw(raw),
                    None => {
                        replies = None;
                        continue;
                    }
                },
                frame = ctrl.recv() => match frame {
                    Some(frame) => Out::Ctrl(frame),
                    None => return Ok(()),
                },
                frame = recv_data(&mut data) => match frame {
                    Some(frame) => Out::Data(frame),
                    None => {
                        data = None;
                        continue;
                    }
                },
            };
            out.clear();
            if let Some(rest) = direct.and_then(Direct::unpark) {
                out.extend_from_slice(&rest);
            }
            let mut next = Some(first);
            let mut framed = 0;
            while let Some(item) = next.take() {
                match item {
                    Out::Raw(raw) => {
                        sent_close |= holds_close(&raw);
                        out.extend_from_slice(&raw);
                    }
                    Out::Ctrl(frame) => put_frame(&mut out, OP_BINARY, &frame, role),
                    // A direct sender's wake-up call; what it left is already in `out`.
                    Out::Data(frame) if frame.is_empty() => {}
                    Out::Data(frame) => match &accounting {
                        Some(a) if a.framed => {
                            a.backlog.release_n(frame.len(), count_frames(&frame));
                            out.extend_from_slice(&frame);
                        }
                        Some(a) => {
                            a.backlog.release(frame.len());
                            put_frame(&mut out, OP_BINARY, &frame, role);
                        }
                        None => put_frame(&mut out, OP_BINARY, &frame, role),
                    },
                }
                framed += 1;
                if framed < MAX_BATCH && out.len() < batch_bytes {
                    next = try_next(&mut replies, &mut ctrl, &mut data);
                }
            }
            if let Some(DataBacklog {
                backlog, notice, ..
            }) = &accounting
            {
                if data.as_ref().is_none_or(|d| d.is_empty()) {
                    backlog.drained();
                }
                let dropped = backlog.take_unreported();
                if dropped > 0 {
                    put_frame(&mut out, OP_BINARY, &notice(dropped), role);
                }
            }
            tokio::select! {
                biased;
                result = write_out(&mut write, &mut out) => result?,
                // A peer that stopped reading must not keep a closing link alive. What is left
                // of the batch stays in `out`, so the goodbye starts on a frame boundary.
                _ = &mut closed => return Ok(()),
            }
            // A burst's buffer is not kept by a link that goes quiet.
            if out.capacity() > batch_bytes.saturating_mul(2) {
                out = BytesMut::new();
            }
            if sent_close {
                return Ok(());
            }
        }
    }
    .await;
    // What a sender could not finish writing goes out before anything else, even the rest of
    // an interrupted batch (there is never both: a parked writer had written everything).
    if let Some(rest) = direct.and_then(Direct::close) {
        let mut first = BytesMut::from(&rest[..]);
        first.extend_from_slice(&out);
        out = first;
    }
    reply_source.writer_gone.store(true, Ordering::Release);
    closer.close(None);
    // Refuse further data (senders now see a closed queue, not a full one) and account for
    // what was queued but never sent.
    let mut discarded = 0;
    if let Some(rx) = data.as_mut() {
        rx.close();
        while let Ok(frame) = rx.try_recv() {
            match &accounting {
                _ if frame.is_empty() => {}
                Some(a) if a.framed => {
                    let n = count_frames(&frame);
                    discarded += n;
                    a.backlog.release_n(frame.len(), n);
                }
                Some(a) => {
                    discarded += 1;
                    a.backlog.release(frame.len());
                }
                None => discarded += 1,
            }
        }
    }
    // `out` holds the unwritten rest of an interrupted batch, if any; it goes out first, so the
    // stream stays on a frame boundary. Then control frames already queued (a final Load, an
    // Ack, interest changes), unless they are kept for another link; queued data does not, it
    // would only delay the close. After a close frame (ours, or the reader's reply in `out`)
    // nothing more may be sent.
    if result.is_ok() {
        if !sent_close {
            let send_queued = match &on_close {
                OnClose::SendQueued => true,
                OnClose::KeepQueuedUnless(closing) => closing.is_cancelled(),
            };
            if send_queued {
                while let Ok(frame) = ctrl.try_recv() {
                    put_frame(&mut out, OP_BINARY, &frame, role);
                }
            }
            if let Some(words) = closer.last_words() {
                put_frame(&mut out, OP_BINARY, &words, role);
            }
            put_frame(&mut out, OP_CLOSE, &[], role);
        }
        let goodbye = async {
            write_out(&mut write, &mut out).await?;
            write.shutdown().await
        };
        let _ = tokio::time::timeout(linger, goodbye).await;
    }
    WriterEnd {
        error: result.err(),
        discarded,
        ctrl,
    }
}

/// Writes all of `out`, consuming it as it goes: if the future is dropped, `out` still holds
/// exactly what was not written.
async fn write_out<W: AsyncWrite>(
    write: &mut WriteHalf<W>,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = write.write(out).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes::Buf::advance(out, n);
    }
    Ok(())
}

async fn recv_reply(replies: &mut Option<&Replies>) -> Option<Bytes> {
    match replies {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

async fn recv_data(data: &mut Option<DataRx>) -> Option<Bytes> {
    match data {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next ready item: replies, then control, then data.
fn try_next(
    replies: &mut Option<&Replies>,
    ctrl: &mut mpsc::Receiver<Bytes>,
    data: &mut Option<DataRx>,
) -> Option<Out> {
    if let Some(raw) = replies.and_then(|r| r.queue().pop_front()) {
        return Some(Out::Raw(raw));
    }
    if let Ok(frame) = ctrl.try_recv() {
        return Some(Out::Ctrl(frame));
    }
    data.as_mut()?.try_recv().ok().map(Out::Data)
}

/// One step of reading a link.
#[derive(Debug)]
pub enum Inbound {
    /// A binary frame: one protobuf envelope.
    Frame(Bytes),
    /// A WebSocket ping or pong: traffic, but nothing to handle.
    Control,
    /// The peer closed the link or the connection ended.
    Closed,
}

/// Why reading a link failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A message above the configured size limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the refused message.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A text frame; relaymesh speaks binary protobuf only.
    #[error("text frames are not supported; send binary protobuf frames")]
    Text,
    /// A WebSocket protocol violation.
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(String),
}

impl ReadError {
    /// The protocol error to send before closing the link.
    pub fn to_error(&self) -> v1::Error {
        let code = match self {
            Self::TooLarge { .. } => ErrorCode::LimitExceeded,
            Self::Text | Self::Protocol(_) => ErrorCode::BadFrame,
            Self::Io(_) => ErrorCode::Internal,
        };
        v1::Error::new(code, self.to_string())
    }
}

/// Reads the first message of a link, which must arrive within `timeout`.
pub async fn first_message<M, St>(
    stream: &mut St,
    timeout: Duration,
) -> Result<Option<M>, v1::Error>
where
    M: prost::Message + Default,
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let read = async {
        loop {
            match next_frame(stream).await {
                Ok(Inbound::Frame(frame)) => return relaymesh_proto::decode_frame(frame).map(Some),
                Ok(Inbound::Control) => continue,
                Ok(Inbound::Closed) => return Ok(None),
                Err(e) => return Err(e.to_error()),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(v1::Error::new(
                ErrorCode::HeartbeatTimeout,
                format!("no first message within {} ms", timeout.as_millis()),
            ))
        })
}

/// Reads the next step from a link.
pub async fn next_frame<St>(stream: &mut St) -> Result<Inbound, ReadError>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    use tungstenite::Error as E;
    use tungstenite::error::CapacityError;
    match stream.next().await {
        None => Ok(Inbound::Closed),
        Some(Ok(Message::Binary(frame))) => Ok(Inbound::Frame(frame)),
        Some(Ok(Message::Text(_))) => Err(ReadError::Text),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Ok(Inbound::Control),
        Some(Ok(Message::Close(_))) => Ok(Inbound::Closed),
        // A peer that vanished (killed, reset, dropped without a close frame) has simply gone;
        // that is not bad input and there is nobody left to tell.
        Some(Err(
            E::ConnectionClosed
            | E::AlreadyClosed
            | E::Io(_)
            | E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
        )) => Ok(Inbound::Closed),
        Some(Err(E::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
            Err(ReadError::TooLarge {
                size,
                max: max_size,
            })
        }
        Some(Err(E::Protocol(e))) => Err(ReadError::Protocol(e.to_string())),
        Some(Err(E::Utf8(_))) => Err(ReadError::Text),
        Some(Err(e)) => Err(ReadError::Io(e.to_string())),
    }
}

/// The next step of a link if it has already arrived, without waiting: lets a reader handle a
/// burst of frames before handing on what they produced.
pub fn ready_frame<St>(stream: &mut St) -> Option<Result<Inbound, ReadError>>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    use futures_util::FutureExt as _;
    next_frame(stream).now_or_never()
}

/// The frames of one burst: the one that woke the reader, then every one that has already
/// arrived behind it, up to a limit. A reader handles them all before handing on what they
/// produced (one batch per subscriber instead of one per frame).
#[derive(Debug)]
pub struct Burst {
    pending: Option<Bytes>,
    handled: usize,
    max: usize,
    closed: bool,
}

impl Burst {
    /// A burst starting with `first`, of at most `max` frames.
    pub fn new(first: Bytes, max: usize) -> Self {
        Self {
            pending: Some(first),
            handled: 0,
            max,
            closed: false,
        }
    }

    /// The next frame of the burst; `None` once nothing more has arrived, a control frame
    /// came, the limit is reached or the link closed ([`Burst::closed`]).
    pub fn next_frame<St>(&mut self, stream: &mut St) -> Result<Option<Bytes>, v1::Error>
    where
        St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let frame = match self.pending.take() {
            Some(frame) => Some(frame),
            None if self.closed || self.handled >= self.max => None,
            None => match ready_frame(stream) {
                None => None,
                Some(step) => match step.map_err(|e| e.to_error())? {
                    Inbound::Frame(frame) => Some(frame),
                    Inbound::Control => None,
                    Inbound::Closed => {
                        self.closed = true;
                        None
                    }
                },
            },
        };
        if frame.is_some() {
            self.handled += 1;
        } else {
            // A burst that ended stays ended.
            self.handled = self.max;
        }
        Ok(frame)
    }

    /// Whether the link closed during the burst.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// After the writer has sent a close frame, keeps reading (and discarding) for up to `linger`
/// until the peer closes too. Closing a socket with unread input makes the kernel send a reset,
/// which can destroy the error frame the peer has not read yet; waiting for the peer's close
/// lets the error arrive.
pub async fn linger<St>(stream: &mut St, linger: Duration)
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let _ = tokio::time::timeout(linger, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt as _;
    use tokio_tungstenite::WebSocketStream;

    /// The control sender, closer, reader end and writer task of a link, and its peer.
    type Pair = (
        mpsc::Sender<Bytes>,
        Closer,
        LinkStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<WriterEnd>,
        WebSocketStream<tokio::io::DuplexStream>,
    );

    /// A link end running the writer, and a plain tungstenite WebSocket as the peer.
    async fn pair(role: Role) -> Pair {
        pair_over(role, 1 << 20).await
    }

    /// Like [`pair`], over a pipe that holds `buffer` bytes.
    async fn pair_over(role: Role, buffer: usize) -> Pair {
        let (ours, theirs) = tokio::io::duplex(buffer);
        let config = WebSocketConfig::default().max_message_size(Some(1 << 20));
        let Link { sink, stream } = split_link(ours, role, config);
        let (ctrl_tx, ctrl) = mpsc::channel(16);
        let closer = Closer::new();
        let writer = tokio::spawn(run_writer(
            sink,
            WriterSetup {
                ctrl,
                data: None,
                closer: closer.clone(),
                linger: Duration::from_secs(5),
                direct: None,
                on_close: OnClose::SendQueued,
            },
        ));
        let peer_role = if role == Role::Server {
            Role::Client
        } else {
            Role::Server
        };
        let peer = WebSocketStream::from_raw_socket(theirs, peer_role, None).await;
        (ctrl_tx, closer, stream, writer, peer)
    }

    async fn writer_frames_reach_a_tungstenite_peer(role: Role) {
        let (ctrl, closer, mut stream, writer, mut peer) = pair(role).await;
        // Every length encoding: 7-bit, 16-bit and 64-bit, at their edges.
        let sizes = [0usize, 1, 7, 125, 126, 1000, 65535, 65536, 70001];
        for &n in &sizes {
            let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            ctrl.send(Bytes::from(body)).await.unwrap();
        }
        for &n in &sizes {
            match peer.next().await {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b.len(), n);
                    assert!(b.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
                }
                other => panic!("expected a binary frame of {n} bytes, got {other:?}"),
            }
        }
        // A ping read by the link's reader is answered through the writer.
        peer.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            loop {
                match next_frame(&mut stream).await {
                    Ok(Inbound::Closed) | Err(_) => return stream,
                    Ok(_) => {}
                }
            }
        });
        match peer.next().await {
            Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"hi"),
            other => panic!("expected a pong, got {other:?}"),
        }
        // Closing sends the last words, then a close frame.
        closer.close(Some(Bytes::from_static(b"bye")));
        match peer.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"bye"),
            other => panic!("expected the last words, got {other:?}"),
        }
        assert!(matches!(peer.next().await, Some(Ok(Message::Close(_)))));
        let end = writer.await.unwrap();
        assert!(end.error.is_none());
        drop(peer);
        let _ = reader.await;
    }

    #[tokio::test]
    async fn server_frames_reach_a_tungstenite_client() {
        writer_frames_reach_a_tungstenite_peer(Role::Server).await;
    }

    #[tokio::test]
    async fn client_frames_are_masked_for_a_tungstenite_server() {
        // A tungstenite server refuses unmasked frames from a client.
        writer_frames_reach_a_tungstenite_peer(Role::Client).await;
    }

    #[tokio::test]
    async fn a_close_from_the_peer_ends_the_link_with_one_close_frame() {
        let (_ctrl, closer, mut stream, writer, mut peer) = pair(Role::Server).await;
        peer.send(Message::Close(None)).await.unwrap();
        assert!(matches!(next_frame(&mut stream).await, Ok(Inbound::Closed)));
        // As every reader does: a closed link is closed for the writer too.
        closer.close(None);
        assert!(matches!(peer.next().await, Some(Ok(Message::Close(_)))));
        let end = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends once the link closes")
            .unwrap();
        assert!(end.error.is_none());
        // The reader's own close reply finds the writer gone; no second close frame follows.
        linger(&mut stream, Duration::from_millis(100)).await;
        drop(stream);
        assert!(peer.next().await.is_none());
    }

    #[tokio::test]
    async fn closing_mid_batch_finishes_the_frame_before_the_last_words() {
        // A peer that does not read: the writer is stuck inside a 200 KB frame when the link
        // closes. The goodbye must resume at that point, or the last words would be garbage.
        let (ctrl_tx, closer, _stream, writer, mut peer) = pair_over(Role::Server, 4096).await;
        ctrl_tx.send(Bytes::from(vec![9u8; 200_000])).await.unwrap();
        tokio::task::yield_now().await;
        closer.close(Some(Bytes::from_static(b"bye")));
        match peer.next().await {
            Some(Ok(Message::Binary(b))) => {
                assert!(b.len() == 200_000 && b.iter().all(|&x| x == 9))
            }
            other => panic!("expected the whole frame, got {other:?}"),
        }
        match peer.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"bye"),
            other => panic!("expected the last words, got {other:?}"),
        }
        assert!(matches!(peer.next().await, Some(Ok(Message::Close(_)))));
        assert!(writer.await.unwrap().error.is_none());
    }

    #[test]
    fn close_frames_are_found_among_whole_frames() {
        let mut out = BytesMut::new();
        put_frame(&mut out, OP_BINARY, &[7; 300], Role::Client);
        assert!(!holds_close(&out));
        put_frame(&mut out, OP_CLOSE, &[], Role::Server);
        assert!(holds_close(&out));
        assert!(!holds_close(&[0x8a, 0x02, 1, 2]), "a pong");
        assert!(!holds_close(&[0x82]), "a truncated header is not a close");
    }

    #[test]
    fn framed_batches_count_and_split_into_their_messages() {
        let mut batch = BytesMut::new();
        for n in [0usize, 3, 200, 70_000] {
            put_frame_header(&mut batch, n);
            batch.put_slice(&vec![n as u8; n]);
        }
        let batch = batch.freeze();
        assert_eq!(count_frames(&batch), 4);
        let sizes: Vec<usize> = frame_payloads(&batch).map(|p| p.len()).collect();
        assert_eq!(sizes, [0, 3, 200, 70_000]);
        assert_eq!(
            framed(b"abc"),
            Bytes::from_static(&[0x82, 3, b'a', b'b', b'c'])
        );
        assert_eq!(
            count_frames(&batch[..batch.len() - 1]),
            3,
            "a cut frame is not whole"
        );
    }

    #[test]
    fn a_counted_backlog_bounds_frames() {
        let b = Backlog::counted(2, 1 << 20);
        assert!(b.reserve(10));
        assert!(b.reserve(10));
        assert!(!b.reserve(10), "two frames queued");
        b.release(10);
        assert!(b.reserve(10));
        // A refusal for bytes gives the frame slot back.
        let b = Backlog::counted(4, 1000);
        assert!(b.reserve(900));
        assert!(!b.reserve(600));
        assert!(b.reserve(50));
        assert!(b.reserve(50));
        assert!(b.reserve(10));
        assert!(!b.reserve(10), "four frames queued");
        // A batch counts all its frames, and an empty queue takes any one batch.
        let b = Backlog::counted(10, 1 << 20);
        assert!(b.reserve_n(100, 8));
        assert!(!b.reserve_n(100, 3));
        b.release_n(100, 8);
        assert!(b.reserve_n(100, 30));
    }

    #[test]
    fn backlog_bounds_bytes_but_always_takes_one_frame() {
        // 10 frames, 1000 bytes: frames of 100 bytes or less are bounded by the count alone.
        let b = Backlog::new(10, 1000);
        for _ in 0..50 {
            assert!(b.reserve(100), "small frames are not metered");
        }
        assert!(b.reserve(800));
        assert!(!b.reserve(300), "over budget");
        assert!(b.reserve(200), "exactly at budget");
        b.release(800);
        b.release(200);
        b.release(100); // small: no effect
        assert!(b.reserve(5000), "an empty queue takes one oversized frame");
        assert!(!b.reserve(101));
    }

    #[test]
    fn closer_keeps_the_first_reason() {
        let closer = Closer::new();
        assert!(!closer.is_closed());
        assert!(closer.close(Some(Bytes::from_static(b"first"))));
        assert!(!closer.close(Some(Bytes::from_static(b"second"))));
        assert!(closer.is_closed());
        assert_eq!(closer.last_words().as_deref(), Some(&b"first"[..]));
    }

    #[test]
    fn backlog_reports_drops_and_detects_stalls() {
        let t = Backlog::new(16, 1 << 20);
        assert!(!t.record_drop(1_000));
        assert!(!t.record_drop(1_000));
        assert_eq!(t.take_unreported(), 2);
        assert_eq!(t.take_unreported(), 0);
        assert_eq!(t.total(), 2);
        // A zero grace period: the second drop of a stall already exceeds it once time moves.
        t.drained();
        assert!(!t.record_drop(0));
        let start = now_ms();
        while now_ms() == start {
            std::hint::spin_loop();
        }
        assert!(t.record_drop(0));
        t.drained();
        assert!(!t.record_drop(0), "a drained queue starts a new stall");
    }
}
