//! Ending a link, once, with optional last words.

use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

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

    pub(crate) fn last_words(&self) -> Option<Bytes> {
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
        assert!(closer.close(Some(Bytes::from_static(b"first"))));
        assert!(!closer.close(Some(Bytes::from_static(b"second"))));
        assert!(closer.is_closed());
        assert_eq!(closer.last_words().as_deref(), Some(&b"first"[..]));
    }
}
