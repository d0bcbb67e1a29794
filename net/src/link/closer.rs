//! Ending a link, once, with optional last words.

use std::sync::Arc;

use bytes::Bytes;
use relaymesh_proto::{ErrorEnvelope, close_status, error_frame, v1};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

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
#[derive(Debug, Clone, Default)]
pub struct Closer {
    inner: Arc<CloserInner>,
}

#[derive(Debug, Default)]
struct CloserInner {
    /// Set once closing (a flag and a `Notify` rather than a `CancellationToken`: every link
    /// has a closer, and a token's tree node is an allocation of its own).
    closed: AtomicBool,
    /// Wakes what waits in [`Closer::closed`].
    ready: Notify,
    /// `Some` once closing, with the first caller's last words. Set before `closed`, so the
    /// writer always sees the words of the call that closed the link.
    state: std::sync::Mutex<Option<Option<LastWords>>>,
}

impl Closer {
    /// A link that is open.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts closing the link. The first caller's `last_words` are sent before the close
    /// frame, and give its status (without them: 1000, a normal closure); later calls change
    /// nothing. Returns whether this call was the first.
    pub fn close(&self, last_words: Option<LastWords>) -> bool {
        if self.is_closed() {
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
        self.inner.closed.store(true, Ordering::Release);
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

    pub(crate) fn last_words(&self) -> Option<LastWords> {
        crate::sync::lock(&self.inner.state).clone().flatten()
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
