//! The parts every link (server, negotiation, client, peer) is built from.
//!
//! A link is a reader task and a writer task over the two halves of one WebSocket:
//!
//! * the **writer** ([`run_writer`]) owns the sink and drains two bounded queues of pre-encoded
//!   frames: `ctrl` (the link's own replies and control messages, always preferred) and `data`
//!   (fanned-out messages). It feeds every frame that is ready, up to [`MAX_BATCH`], and flushes
//!   once, so a busy link costs one `write` syscall per batch instead of per frame. When a link
//!   records drops on its data queue ([`Backlog`]) the writer appends a notice frame to the
//!   next batch;
//! * the **reader** is link-specific; it pulls frames with [`next_frame`] and ends the link
//!   through the [`Closer`], optionally with "last words" (an encoded `Error`) that the writer
//!   sends before the WebSocket close frame.
//!
//! Nothing here knows message types; the links in the service crates supply encoded frames.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use relaymesh_proto::{ErrorCode, v1};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// Most frames fed to the socket between two flushes.
pub const MAX_BATCH: usize = 512;

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
            budget,
            large: budget / capacity.max(1),
            ..Self::default()
        }
    }

    /// Reserves room for a frame of `len` bytes about to be queued. `false` means the queue is
    /// full in bytes; an empty queue always takes one frame, however large.
    #[inline]
    pub fn reserve(&self, len: usize) -> bool {
        if len <= self.large {
            return true;
        }
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > self.budget {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Returns the room of a frame of `len` bytes (it was written, or never queued).
    #[inline]
    pub fn release(&self, len: usize) {
        if len > self.large {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Records one dropped frame. Returns `true` when the queue has now been stalled (not run
    /// empty) for longer than `grace_ms` since the first drop: the receiver is a slow consumer.
    pub fn record_drop(&self, grace_ms: u64) -> bool {
        self.unreported.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
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
}

/// What the writer needs besides the sink.
#[derive(Debug)]
pub struct WriterSetup {
    /// Control frames; preferred over data. The link is done when every sender is gone.
    pub ctrl: mpsc::Receiver<Bytes>,
    /// Data frames, if the link carries any, with their backlog accounting (senders must
    /// [`Backlog::reserve`] each frame's bytes before queueing it).
    pub data: Option<(mpsc::Receiver<Bytes>, DataBacklog)>,
    /// The link's closer; when it fires the writer sends the last words and a close frame.
    pub closer: Closer,
    /// Time allowed for the last words and close frame to be written.
    pub linger: Duration,
}

/// How a writer ended.
#[derive(Debug)]
pub struct WriterEnd {
    /// The write error that ended the link, if one did.
    pub error: Option<tungstenite::Error>,
    /// Data frames still queued when the link closed, never sent.
    pub discarded: usize,
}

/// Drains the queues into `sink` until the link closes, then sends queued control frames, the
/// last words (if any) and a close frame. The closer is fired either way so the reader stops
/// too.
pub async fn run_writer<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    setup: WriterSetup,
) -> WriterEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let WriterSetup {
        mut ctrl,
        data,
        closer,
        linger,
    } = setup;
    let (mut data, accounting) = match data {
        Some((rx, accounting)) => (Some(rx), Some(accounting)),
        None => (None, None),
    };
    let result: Result<(), tungstenite::Error> = async {
        loop {
            let first = tokio::select! {
                biased;
                _ = closer.closed() => return Ok(()),
                frame = ctrl.recv() => match frame {
                    Some(frame) => (frame, false),
                    None => return Ok(()),
                },
                frame = recv_data(&mut data) => match frame {
                    Some(frame) => (frame, true),
                    None => {
                        data = None;
                        continue;
                    }
                },
            };
            let batch = async {
                let mut next = Some(first);
                let mut fed = 0;
                while let Some((frame, is_data)) = next.take() {
                    if is_data && let Some(DataBacklog { backlog, .. }) = &accounting {
                        backlog.release(frame.len());
                    }
                    sink.feed(Message::Binary(frame)).await?;
                    fed += 1;
                    if fed < MAX_BATCH {
                        next = try_next(&mut ctrl, &mut data);
                    }
                }
                if let Some(DataBacklog { backlog, notice }) = &accounting {
                    if data.as_ref().is_none_or(|d| d.is_empty()) {
                        backlog.drained();
                    }
                    let dropped = backlog.take_unreported();
                    if dropped > 0 {
                        sink.feed(Message::Binary(notice(dropped))).await?;
                    }
                }
                sink.flush().await
            };
            tokio::select! {
                biased;
                result = batch => result?,
                // A peer that stopped reading must not keep a closing link alive.
                _ = closer.closed() => return Ok(()),
            }
        }
    }
    .await;
    closer.close(None);
    // Refuse further data (senders now see a closed queue, not a full one) and account for
    // what was queued but never sent.
    let mut discarded = 0;
    if let Some(rx) = data.as_mut() {
        rx.close();
        while let Ok(frame) = rx.try_recv() {
            discarded += 1;
            if let Some(DataBacklog { backlog, .. }) = &accounting {
                backlog.release(frame.len());
            }
        }
    }
    // Control frames already queued (a final Load, an Ack, interest changes) still go out;
    // queued data does not, it would only delay the close.
    let goodbye = async {
        while let Ok(frame) = ctrl.try_recv() {
            sink.feed(Message::Binary(frame)).await?;
        }
        if let Some(words) = closer.last_words() {
            sink.feed(Message::Binary(words)).await?;
        }
        sink.send(Message::Close(None)).await?;
        sink.close().await
    };
    let _ = tokio::time::timeout(linger, goodbye).await;
    WriterEnd {
        error: result.err(),
        discarded,
    }
}

async fn recv_data(data: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match data {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next ready frame, control first; the flag says whether it is data.
fn try_next(
    ctrl: &mut mpsc::Receiver<Bytes>,
    data: &mut Option<mpsc::Receiver<Bytes>>,
) -> Option<(Bytes, bool)> {
    if let Ok(frame) = ctrl.try_recv() {
        return Some((frame, false));
    }
    data.as_mut()?.try_recv().ok().map(|frame| (frame, true))
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
pub async fn first_message<M, S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    timeout: Duration,
) -> Result<Option<M>, v1::Error>
where
    M: prost::Message + Default,
    S: AsyncRead + AsyncWrite + Unpin,
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
pub async fn next_frame<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
) -> Result<Inbound, ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
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

/// After the writer has sent a close frame, keeps reading (and discarding) for up to `linger`
/// until the peer closes too. Closing a socket with unread input makes the kernel send a reset,
/// which can destroy the error frame the peer has not read yet; waiting for the peer's close
/// lets the error arrive.
pub async fn linger<S>(stream: &mut SplitStream<WebSocketStream<S>>, linger: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(linger, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
