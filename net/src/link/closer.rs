//! Ending a link, once, with optional last words.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use bytes::Bytes;
use relaymesh_proto::{ErrorEnvelope, close_status, error_frame, v1};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a link says as it closes: an encoded error frame, and the status of the close frame
/// after it ([`relaymesh_proto::close_status`]).
#[derive(Debug, Clone)]
pub struct LastWords {
    /// The error frame (an envelope carrying a [`v1::Error`]).
    pub frame: Bytes,
    /// The close frame's status code.
    pub status: u16,
}

impl LastWords {
    /// `error` in envelope `E`, with its close status.
    pub fn error<E: ErrorEnvelope>(error: v1::Error) -> Self {
        Self::framed(&error, error_frame::<E>(error.clone()))
    }

    /// `frame`, already encoded, that carries `error`.
    pub fn framed(error: &v1::Error, frame: Bytes) -> Self {
        Self {
            frame,
            status: close_status(error.error_code()),
        }
    }
}

/// Ends a link, once, with optional last words. Cloned into everything that may end the link:
/// its reader, its writer, and (for client sessions) publishers that find it too slow.
///
/// It also keeps when the link last heard from its peer, for links that their owner watches
/// ([`Watch::Owner`](super::Watch)): the owner looks at [`Closer::silent_for`] now and then
/// and ends a silent link with [`Closer::expire`], and at shutdown ends each link with
/// [`Closer::stop`].
///
/// The link's reader and writer wait for it in a slot each ([`Closer::closed_for`]), which
/// takes no room in their tasks and costs two atomic operations to poll; anything else waits
/// in [`Closer::closed`].
#[derive(Debug, Clone)]
pub struct Closer {
    inner: Arc<CloserInner>,
}

impl Default for Closer {
    fn default() -> Self {
        Self::new()
    }
}

/// [`CloserInner::heard`] while the link is [busy](Closer::busy).
const BUSY: u64 = u64::MAX;

/// A reading of the clock links' silence is measured on, for [`Closer::silent_at`].
#[derive(Debug, Clone, Copy)]
pub struct Clock(u64);

impl Clock {
    /// Now.
    pub fn now() -> Self {
        Self(clock_ms())
    }
}

/// Milliseconds since the first call, on tokio's clock (which tests may pause).
fn clock_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// Which side of a link waits in [`Closer::closed_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Reader,
    Writer,
}

/// Why a link closed, as far as its reader's ending goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Anything else: the link ends without an error of its own.
    Closed,
    /// [`Closer::expire`]: its peer fell silent.
    Expired,
    /// [`Closer::stop`]: the process is shutting down.
    Stopped,
}

#[derive(Debug)]
struct CloserInner {
    /// When the peer was last heard from ([`clock_ms`]).
    heard: AtomicU64,
    /// A [`Why`] other than `Closed`, set before closing.
    why: AtomicU8,
    /// The reader and the writer waiting for the close.
    reader: AtomicWaker,
    writer: AtomicWaker,
    /// Set once closing (a flag and a `Notify` rather than a `CancellationToken`: every link
    /// has a closer, and a token's tree node is an allocation of its own).
    closed: AtomicBool,
    /// Wakes what waits in [`Closer::closed`].
    ready: Notify,
    /// `Some` once closing, with the first caller's last words. Set before `closed`, so the
    /// writer always sees the words of the call that closed the link.
    /// Boxed words: few links close with any, and inline they would take the closer out of its
    /// allocator size class.
    state: std::sync::Mutex<Option<Option<Box<LastWords>>>>,
}

impl Closer {
    /// A link that is open, and heard from now.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(CloserInner {
                heard: AtomicU64::new(clock_ms()),
                why: AtomicU8::new(Why::Closed as u8),
                reader: AtomicWaker::new(),
                writer: AtomicWaker::new(),
                closed: AtomicBool::new(false),
                ready: Notify::new(),
                state: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The peer was heard from now. `false` when it had been silent for longer than
    /// `timeout` before (this process was not running meanwhile, so no sweep could end the
    /// link): what arrived is stale, and the link is dead.
    pub fn heard(&self, timeout: Duration) -> bool {
        let now = clock_ms();
        let before = self.inner.heard.swap(now, Ordering::Relaxed);
        before == BUSY || u128::from(now.saturating_sub(before)) <= timeout.as_millis()
    }

    /// The link's own side is busy (its handshake, or handling what arrived) and is not
    /// reading: none of that time counts as the peer's silence, until [`Closer::heard`].
    pub fn busy(&self) {
        self.inner.heard.store(BUSY, Ordering::Relaxed);
    }

    /// How long since the peer was last heard from (zero while the link is
    /// [busy](Closer::busy)).
    pub fn silent_for(&self) -> Duration {
        self.silent_at(Clock::now())
    }

    /// [`Closer::silent_for`] at a reading of the clock taken once for many links.
    pub fn silent_at(&self, now: Clock) -> Duration {
        match self.inner.heard.load(Ordering::Relaxed) {
            BUSY => Duration::ZERO,
            heard => Duration::from_millis(now.0.saturating_sub(heard)),
        }
    }

    /// Ends the link because its peer fell silent: its reader ends with the handler's
    /// [`silent`](super::Handler::silent) error; `last_words` are what the link says (the
    /// handler's words for that error). Returns whether this call closed the link.
    pub fn expire(&self, last_words: Option<LastWords>) -> bool {
        self.close_with(Why::Expired, last_words)
    }

    /// Ends the link because the process is shutting down: its reader ends with what the
    /// handler's [`stopping`](super::Handler::stopping) says; `last_words` are what the link
    /// says (the handler's words for that error). Returns whether this call closed the link.
    pub fn stop(&self, last_words: Option<LastWords>) -> bool {
        self.close_with(Why::Stopped, last_words)
    }

    /// Why the link closed (read once it has).
    pub(crate) fn why(&self) -> Why {
        match self.inner.why.load(Ordering::Acquire) {
            w if w == Why::Expired as u8 => Why::Expired,
            w if w == Why::Stopped as u8 => Why::Stopped,
            _ => Why::Closed,
        }
    }

    /// Starts closing the link. The first caller's `last_words` are sent before the close
    /// frame, and give its status (without them: 1000, a normal closure); later calls change
    /// nothing. Returns whether this call was the first.
    pub fn close(&self, last_words: Option<LastWords>) -> bool {
        self.close_with(Why::Closed, last_words)
    }

    /// [`Closer::close`], and why: the reason, like the words, is the first caller's.
    fn close_with(&self, why: Why, last_words: Option<LastWords>) -> bool {
        if self.is_closed() {
            return false;
        }
        let first = {
            let mut state = crate::sync::lock(&self.inner.state);
            let first = state.is_none();
            if first {
                *state = Some(last_words.map(Box::new));
                // Before the flag, so whoever the close wakes reads it.
                self.inner.why.store(why as u8, Ordering::Release);
            }
            first
        };
        self.inner.closed.store(true, Ordering::Release);
        self.inner.reader.wake();
        self.inner.writer.wake();
        self.inner.ready.notify_waiters();
        first
    }

    /// Whether the link is closing.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Resolves when the link starts closing.
    pub async fn closed(&self) {
        let ready = self.inner.ready.notified();
        let mut ready = std::pin::pin!(ready);
        // Enabled before the flag is read: `close` sets the flag, then wakes every enabled
        // waiter.
        ready.as_mut().enable();
        if !self.is_closed() {
            ready.await;
        }
    }

    /// Resolves when the link starts closing; for the link's own reader or writer, one of each:
    /// the task is woken through the closer's slot for its side.
    pub(crate) fn closed_for(&self, side: Side) -> impl Future<Output = ()> + Unpin + '_ {
        std::future::poll_fn(move |cx| self.poll_closed(side, cx))
    }

    fn poll_closed(&self, side: Side, cx: &mut Context<'_>) -> Poll<()> {
        let slot = match side {
            Side::Reader => &self.inner.reader,
            Side::Writer => &self.inner.writer,
        };
        // Registered before the flag is read: `close` sets the flag, then wakes the slot.
        slot.register(cx.waker());
        if self.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The reader or the writer is done waiting: its task's waker is not kept for the rest of
    /// the closer's life (routes and follow-up tasks may hold a copy a while longer).
    pub(crate) fn done(&self, side: Side) {
        match side {
            Side::Reader => self.inner.reader.take(),
            Side::Writer => self.inner.writer.take(),
        };
    }

    pub(crate) fn last_words(&self) -> Option<LastWords> {
        crate::sync::lock(&self.inner.state)
            .as_ref()
            .and_then(|words| words.as_deref().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[tokio::test]
    async fn every_waiter_hears_the_close_and_later_ones_at_once() {
        let closer = Closer::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let closer = closer.clone();
                tokio::spawn(async move { closer.closed().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(closer.close(None));
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("a waiter hears the close")
                .unwrap();
        }
        // Closed already: no wait.
        closer.closed().await;
    }

    #[tokio::test]
    async fn the_reader_and_writer_hear_the_close_in_their_slots_with_its_reason() {
        let closer = Closer::new();
        let sides = [Side::Reader, Side::Writer].map(|side| {
            let closer = closer.clone();
            tokio::spawn(async move { closer.closed_for(side).await })
        });
        tokio::task::yield_now().await;
        assert!(closer.expire(None));
        for side in sides {
            tokio::time::timeout(std::time::Duration::from_secs(5), side)
                .await
                .expect("each side hears the close")
                .unwrap();
        }
        assert_eq!(closer.why(), Why::Expired);
        // The first reason stays; a plain close says nothing of its own.
        assert!(!closer.stop(None));
        assert_eq!(closer.why(), Why::Expired);
        let stopped = Closer::new();
        assert!(stopped.stop(None) && stopped.why() == Why::Stopped);
        let closed = Closer::new();
        assert!(closed.close(None) && closed.why() == Why::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_measured_from_the_last_time_the_peer_was_heard() {
        let closer = Closer::new();
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        // (Not quite 3 s if another test started the process's clock a moment later.)
        assert!(closer.silent_for() >= std::time::Duration::from_millis(2_990));
        // A busy link is not silent, and what comes after it is not stale.
        closer.busy();
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        assert_eq!(closer.silent_for(), std::time::Duration::ZERO);
        assert!(closer.heard(std::time::Duration::from_secs(5)));
        assert!(closer.silent_for() < std::time::Duration::from_secs(1));
        // Heard again after more than the timeout: what arrived is stale.
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        assert!(!closer.heard(std::time::Duration::from_secs(5)));
    }

    #[test]
    fn closer_keeps_the_first_reason() {
        let closer = Closer::new();
        assert!(!closer.is_closed());
        let words = |text: &'static str, status| LastWords {
            frame: Bytes::from_static(text.as_bytes()),
            status,
        };
        assert!(closer.close(Some(words("first", 4001))));
        assert!(!closer.close(Some(words("second", 4002))));
        assert!(closer.is_closed());
        let kept = closer.last_words().unwrap();
        assert_eq!((&kept.frame[..], kept.status), (&b"first"[..], 4001));
    }
}
