//! Direct writes: a sender writes an idle receiver's socket from its own task.

use std::sync::Arc;

use bytes::Bytes;

use super::backlog::DataTx;

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
    /// A gate for `socket`, whose writer is woken through its data queue `wake`.
    pub(crate) fn new(socket: Arc<dyn TrySend>, wake: DataTx) -> Self {
        Self {
            gate: std::sync::Mutex::new(Gate {
                socket: Some(socket),
                parked: false,
                rest: None,
            }),
            wake,
        }
    }

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
    pub(crate) fn park(&self, queue_empty: impl FnOnce() -> bool) {
        let mut gate = self.gate();
        if gate.socket.is_some() && gate.rest.is_none() && queue_empty() {
            gate.parked = true;
        }
    }

    /// The writer has woken: no more direct writes; returns the rest of a partial one.
    pub(crate) fn unpark(&self) -> Option<Bytes> {
        let mut gate = self.gate();
        gate.parked = false;
        gate.rest.take()
    }

    /// The writer is done: no more direct writes; returns the rest of a partial one.
    pub(crate) fn close(&self) -> Option<Bytes> {
        let mut gate = self.gate();
        gate.socket = None;
        gate.parked = false;
        gate.rest.take()
    }
}

/// Closes a [`Direct`] gate when the writer ends, however it ends.
pub(crate) struct CloseGate<'a>(pub(crate) Option<&'a Direct>);

impl Drop for CloseGate<'_> {
    fn drop(&mut self) {
        if let Some(direct) = self.0 {
            direct.close();
        }
    }
}
