//! Ending a link, once, with optional last words.

use std::sync::Arc;

use bytes::Bytes;
use relaymesh_proto::{ErrorEnvelope, close_status, error_frame, v1};
use tokio_util::sync::CancellationToken;

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
    token: CancellationToken,
    /// `Some` once closing, with the first caller's last words. Set before the token fires, so
    /// the writer always sees the words of the call that closed the link.
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

    pub(crate) fn last_words(&self) -> Option<LastWords> {
        crate::sync::lock(&self.inner.state).clone().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
