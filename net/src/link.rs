//! The parts every link (server, negotiation, client, peer) is built from.
//!
//! A link is a reader task and a writer task over the two halves of one WebSocket:
//!
//! * the **writer** ([`run_writer`]) owns the sink and drains two bounded queues of pre-encoded
//!   frames: `ctrl` (the link's own replies and control messages, always preferred) and `data`
//!   (fanned-out messages). It feeds every frame that is ready, up to [`MAX_BATCH`], and flushes
//!   once, so a busy link costs one `write` syscall per batch instead of per frame. When a link
//!   records drops on its data queue ([`DropTracker`]) the writer appends a notice frame to the
//!   next batch;
//! * the **reader** is link-specific; it pulls frames with [`next_frame`] and ends the link
//!   through the [`Closer`], optionally with "last words" (an encoded `Error`) that the writer
//!   sends before the WebSocket close frame.
//!
//! Nothing here knows message types; the links in the service crates supply encoded frames.

use std::sync::atomic::{AtomicU64, Ordering};
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
    last_words: OnceLock<Bytes>,
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
        let first = !self.inner.token.is_cancelled();
        if first && let Some(words) = last_words {
            let _ = self.inner.last_words.set(words);
        }
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
        self.inner.last_words.get().cloned()
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

/// Drop accounting for one link's data queue, shared by the senders (who drop when the queue is
/// full) and the link's writer (who reports drops to the receiver and notices recovery).
#[derive(Debug, Default)]
pub struct DropTracker {
    unreported: AtomicU64,
    total: AtomicU64,
    /// [`now_ms`] of the first drop since the queue last ran empty; 0 when not stalled.
    stalled_since: AtomicU64,
}

impl DropTracker {
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

    /// Drops recorded over the link's life.
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

/// How a writer reports drops on its data queue.
#[derive(Debug, Clone)]
pub struct DropNotices {
    /// The queue's drop accounting, shared with its senders.
    pub tracker: Arc<DropTracker>,
    /// Encodes the frame that tells the receiver `n` messages were dropped.
    pub notice: fn(u64) -> Bytes,
}

/// What the writer needs besides the sink.
#[derive(Debug)]
pub struct WriterSetup {
    /// Control frames; preferred over data. The link is done when every sender is gone.
    pub ctrl: mpsc::Receiver<Bytes>,
    /// Data frames, if the link carries any.
    pub data: Option<mpsc::Receiver<Bytes>>,
    /// Drop accounting of the data queue and how to report drops to the receiver.
    pub drops: Option<DropNotices>,
    /// The link's closer; when it fires the writer sends the last words and a close frame.
    pub closer: Closer,
    /// Time allowed for the last words and close frame to be written.
    pub linger: Duration,
}

/// Drains the queues into `sink` until the link closes, then sends the last words (if any) and
/// a close frame. Returns the write error that ended the link, if one did; the closer is fired
/// either way so the reader stops too.
pub async fn run_writer<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    setup: WriterSetup,
) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let WriterSetup {
        mut ctrl,
        mut data,
        drops,
        closer,
        linger,
    } = setup;
    let result = async {
        loop {
            let first = tokio::select! {
                biased;
                _ = closer.closed() => return Ok(()),
                frame = ctrl.recv() => match frame {
                    Some(frame) => frame,
                    None => return Ok(()),
                },
                frame = recv_data(&mut data) => match frame {
                    Some(frame) => frame,
                    None => {
                        data = None;
                        continue;
                    }
                },
            };
            let batch = async {
                sink.feed(Message::Binary(first)).await?;
                let mut fed = 1;
                while fed < MAX_BATCH {
                    let Some(frame) = try_next(&mut ctrl, &mut data) else {
                        break;
                    };
                    sink.feed(Message::Binary(frame)).await?;
                    fed += 1;
                }
                if let Some(DropNotices { tracker, notice }) = &drops {
                    if data.as_ref().is_none_or(|d| d.is_empty()) {
                        tracker.drained();
                    }
                    let dropped = tracker.take_unreported();
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
    let goodbye = async {
        if let Some(words) = closer.last_words() {
            sink.feed(Message::Binary(words)).await?;
        }
        sink.send(Message::Close(None)).await?;
        sink.close().await
    };
    let _ = tokio::time::timeout(linger, goodbye).await;
    result
}

async fn recv_data(data: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match data {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn try_next(
    ctrl: &mut mpsc::Receiver<Bytes>,
    data: &mut Option<mpsc::Receiver<Bytes>>,
) -> Option<Bytes> {
    if let Ok(frame) = ctrl.try_recv() {
        return Some(frame);
    }
    data.as_mut()?.try_recv().ok()
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
        Some(Err(E::ConnectionClosed | E::AlreadyClosed)) => Ok(Inbound::Closed),
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
    fn closer_keeps_the_first_reason() {
        let closer = Closer::new();
        assert!(!closer.is_closed());
        assert!(closer.close(Some(Bytes::from_static(b"first"))));
        assert!(!closer.close(Some(Bytes::from_static(b"second"))));
        assert!(closer.is_closed());
        assert_eq!(closer.last_words().as_deref(), Some(&b"first"[..]));
    }

    #[test]
    fn drop_tracker_reports_and_detects_stalls() {
        let t = DropTracker::default();
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
