//! A multi-producer, single-consumer queue that holds no memory while it is idle: every link's
//! control and data queues.
//!
//! tokio's `mpsc` channel allocates a block of 32 slots and a cache-padded channel state up
//! front, about 1.5 KiB per channel; a comm server holds two per client, and most of its clients
//! are idle most of the time. This queue is a `VecDeque` under a plain lock: idle, it is the
//! few words of its shared state; its buffer grows with a burst, is given back once a large
//! one has drained, and (for a control queue, [`bounded`]) whatever its size when the receiver
//! finds the queue empty and waits. A send or receive takes the lock for a push or a pop, about what the
//! channel's atomics cost, and the link's other per-message state is locked the same way.
//!
//! The API mirrors `tokio::sync::mpsc` (and reuses its error types), so links read the same:
//! [`bounded`] queues have an async [`Sender::send`] that waits for room and a
//! [`Sender::try_send`] that does not; [`unbounded`] queues are bounded by whoever sends to
//! them (a link's data queue by its [`Backlog`](crate::link::Backlog)).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
pub use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

use crate::sync::lock;

/// A queue buffer with room for more than this many items is given back once it drains: a
/// burst's memory is not kept by a link that goes quiet.
pub const KEEP_EMPTY: usize = 16;

/// A queue of at most `capacity` items (at least 1), for messages that come now and then (a
/// link's control queue): its buffer is given back whenever its receiver waits on it empty.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let capacity = u32::try_from(capacity.max(1)).map_or(UNBOUNDED - 1, |c| c.min(UNBOUNDED - 1));
    let shared = Shared::new(capacity, true);
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// A queue with no bound of its own: its senders bound it. For a stream of messages (a link's
/// data queue): it keeps a small buffer (up to [`KEEP_EMPTY`] items) while its receiver waits,
/// so a busy link does not allocate one per wake-up, and gives back a larger one once drained.
pub fn unbounded<T>() -> (UnboundedSender<T>, Receiver<T>) {
    let shared = Shared::new(UNBOUNDED, false);
    (
        UnboundedSender(Sender {
            shared: shared.clone(),
        }),
        Receiver { shared },
    )
}

/// [`Shared::capacity`] of a queue with no bound of its own.
const UNBOUNDED: u32 = u32::MAX;

/// What a queue's senders and receiver share: 128 bytes with its `Arc`'s counts, an
/// allocator's size class (a link has three queues).
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Most items queued (counts kept in 32 bits, so the whole fits its size class), or
    /// [`UNBOUNDED`].
    capacity: u32,
    /// Whether the buffer is given back whenever the receiver waits on an empty queue.
    release_when_idle: bool,
    /// Live senders (weak ones not counted); the receiver sees the end once none is left.
    senders: AtomicUsize,
    /// Wakes senders waiting for room (bounded queues).
    room: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    /// Room promised to [`Permit`]s not yet used (at most the capacity).
    reserved: u32,
    /// The receiver waiting for an item.
    receiver: Option<Waker>,
    /// The receiver closed the queue or is gone: sends fail.
    closed: bool,
}

impl<T> Shared<T> {
    fn new(capacity: u32, release_when_idle: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                reserved: 0,
                receiver: None,
                closed: false,
            }),
            capacity,
            release_when_idle,
            senders: AtomicUsize::new(1),
            room: Notify::new(),
        })
    }

    /// Most items queued.
    fn capacity(&self) -> usize {
        match self.capacity {
            UNBOUNDED => usize::MAX,
            bound => bound as usize,
        }
    }

    /// Whether a queue in `state` has no room.
    fn full(&self, state: &State<T>) -> bool {
        state.items.len() + state.reserved as usize >= self.capacity()
    }

    fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let state = lock(&self.state);
        if state.closed {
            return Err(TrySendError::Closed(value));
        }
        if self.full(&state) {
            return Err(TrySendError::Full(value));
        }
        Self::push(state, value);
        Ok(())
    }

    /// Queues `value` (room checked) and wakes the receiver.
    fn push(mut state: std::sync::MutexGuard<'_, State<T>>, value: T) {
        state.items.push_back(value);
        let receiver = state.receiver.take();
        drop(state);
        if let Some(receiver) = receiver {
            receiver.wake();
        }
    }

    /// Waits until `attempt` (which returns `None` while the queue is full) succeeds.
    async fn wait_for_room<R>(&self, mut attempt: impl FnMut() -> Option<R>) -> R {
        // A queue with room takes the item at once, without a waiter in `room`: that costs
        // its lock twice more, and this is a client's path for every publish.
        if let Some(done) = attempt() {
            return done;
        }
        loop {
            // Enabled before trying, so room made after the try wakes this sender.
            let room = self.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            if let Some(done) = attempt() {
                // Room left over may have been made for another sender too: pass it on.
                let state = lock(&self.state);
                if !self.full(&state) {
                    self.room.notify_one();
                }
                return done;
            }
            room.await;
        }
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    fn add_sender(&self) {
        self.senders.fetch_add(1, Ordering::Relaxed);
    }

    fn drop_sender(&self) {
        if self.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let receiver = lock(&self.state).receiver.take();
            if let Some(receiver) = receiver {
                receiver.wake();
            }
        }
    }
}

/// The sending end of a [`bounded`] queue.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `value` now, or says why not: the queue is full, or its receiver is gone.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        self.shared.try_send(value)
    }

    /// Queues `value`, waiting for room; fails only once the receiver is gone.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        let mut value = Some(value);
        self.shared
            .wait_for_room(|| {
                let v = value.take()?;
                match self.shared.try_send(v) {
                    Ok(()) => Some(Ok(())),
                    Err(TrySendError::Closed(v)) => Some(Err(SendError(v))),
                    Err(TrySendError::Full(v)) => {
                        value = Some(v);
                        None
                    }
                }
            })
            .await
    }

    /// Waits for room for one item and keeps it for the returned permit: what is then sent
    /// through it cannot fail for want of room. Fails once the receiver is gone.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, SendError<()>> {
        self.shared
            .wait_for_room(|| {
                let mut state = lock(&self.shared.state);
                if state.closed {
                    return Some(Err(SendError(())));
                }
                if self.shared.full(&state) {
                    return None;
                }
                state.reserved += 1;
                Some(Ok(Permit {
                    shared: &self.shared,
                }))
            })
            .await
    }

    /// Items that could be queued now.
    pub fn capacity(&self) -> usize {
        let state = lock(&self.shared.state);
        (self.shared.capacity()).saturating_sub(state.items.len() + state.reserved as usize)
    }

    /// Items the queue holds at most.
    pub fn max_capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the receiver is gone (or closed the queue).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// A handle that does not keep the queue open.
    pub fn downgrade(&self) -> WeakSender<T> {
        WeakSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.add_sender();
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.drop_sender();
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

/// Room for one item in a [`bounded`] queue, from [`Sender::reserve`]; given back if unused.
pub struct Permit<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Permit<'_, T> {
    /// Queues `value` in the room kept for it (dropped if the receiver has gone meanwhile).
    pub fn send(self, value: T) {
        let shared = self.shared;
        std::mem::forget(self);
        let mut state = lock(&shared.state);
        state.reserved -= 1;
        if state.closed {
            drop(state);
            drop(value);
            return;
        }
        Shared::push(state, value);
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        lock(&self.shared.state).reserved -= 1;
        self.shared.room.notify_one();
    }
}

/// A [`Sender`] that does not keep the queue open: the receiver sees the end once every
/// strong sender is gone.
pub struct WeakSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> WeakSender<T> {
    /// A sender again, unless every strong sender is gone.
    pub fn upgrade(&self) -> Option<Sender<T>> {
        self.shared
            .senders
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n + 1)
            })
            .ok()?;
        Some(Sender {
            shared: self.shared.clone(),
        })
    }
}

impl<T> Clone for WeakSender<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for WeakSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakSender").finish_non_exhaustive()
    }
}

/// The sending end of an [`unbounded`] queue: a [`Sender`] whose queue has no bound of its
/// own, so a send never waits.
pub struct UnboundedSender<T>(Sender<T>);

impl<T> UnboundedSender<T> {
    /// Queues `value`; fails only once the receiver is gone.
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.0.try_send(value).map_err(|e| match e {
            TrySendError::Closed(v) | TrySendError::Full(v) => SendError(v),
        })
    }

    /// Whether the receiver is gone (or closed the queue).
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl<T> Clone for UnboundedSender<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::fmt::Debug for UnboundedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UnboundedSender").field(&self.0).finish()
    }
}

/// The receiving end of a queue.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once every sender is gone and the queue is
    /// empty (or it was closed and has drained). Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Receiver::recv`] as a poll.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = lock(&self.shared.state);
        if let Some(item) = self.pop(&mut state) {
            return Poll::Ready(Some(item));
        }
        if state.closed || self.shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        // The receiver goes idle: an idle control queue holds no buffer (a session's kept one
        // from its first reply on).
        if self.shared.release_when_idle && state.items.capacity() > 0 {
            state.items = VecDeque::new();
        }
        match &mut state.receiver {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        // A sender leaving after the count above takes this lock to wake the stored waker.
        Poll::Pending
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = lock(&self.shared.state);
        if let Some(item) = self.pop(&mut state) {
            return Ok(item);
        }
        if state.closed || self.shared.senders.load(Ordering::Acquire) == 0 {
            Err(TryRecvError::Disconnected)
        } else {
            Err(TryRecvError::Empty)
        }
    }

    fn pop(&self, state: &mut State<T>) -> Option<T> {
        let full = self.shared.full(state);
        let item = state.items.pop_front()?;
        if state.items.is_empty() && state.items.capacity() > KEEP_EMPTY {
            state.items = VecDeque::new();
        }
        if full {
            self.shared.room.notify_one();
        }
        Some(item)
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        lock(&self.shared.state).items.len()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        lock(&self.shared.state).items.is_empty()
    }

    /// Whether nothing more can arrive: the queue was closed or every sender is gone (what
    /// is queued can still be received).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed() || self.shared.senders.load(Ordering::Acquire) == 0
    }

    /// Refuses further sends; what is queued can still be received.
    pub fn close(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.room.notify_waiters();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = lock(&self.shared.state);
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        self.shared.room.notify_waiters();
        // Dropped outside the lock: an item's drop may do anything.
        drop(items);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_come_out_in_order_and_the_end_comes_after_them() {
        let (tx, mut rx) = bounded(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        tx2.send(2).await.unwrap();
        drop(tx);
        assert_eq!(rx.len(), 2);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(tx2);
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_sender_waits_for_room() {
        let (tx, mut rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(tx.capacity(), 0);
        // Two senders wait; two pops let both in, in turn.
        let waiting = |n| {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(n).await })
        };
        let (a, b) = (waiting(3), waiting(4));
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rx.recv().await.unwrap());
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(a.await.unwrap().is_ok() && b.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_permit_keeps_its_room_until_used_or_dropped() {
        let (tx, mut rx) = bounded(2);
        let permit = tx.reserve().await.unwrap();
        tx.try_send(1).unwrap();
        assert!(matches!(tx.try_send(2), Err(TrySendError::Full(2))));
        permit.send(3);
        assert_eq!((rx.try_recv(), rx.try_recv()), (Ok(1), Ok(3)));
        let unused = tx.reserve().await.unwrap();
        assert_eq!(tx.capacity(), 1);
        drop(unused);
        assert_eq!(tx.capacity(), 2);
        drop(rx);
        assert!(tx.reserve().await.is_err());
    }

    #[tokio::test]
    async fn a_gone_receiver_fails_sends_and_wakes_the_waiting() {
        let (tx, rx) = bounded(1);
        tx.try_send(1).unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(2).await })
        };
        tokio::task::yield_now().await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a waiting sender hears that the receiver is gone")
            .unwrap();
        assert_eq!(sent, Err(SendError(2)));
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
    }

    #[tokio::test]
    async fn a_closed_queue_hands_out_what_it_holds_then_ends() {
        let (tx, mut rx) = unbounded();
        tx.send(1).unwrap();
        rx.close();
        assert_eq!(tx.send(2), Err(SendError(2)));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_an_item_and_for_the_last_sender_leaving() {
        let (tx, mut rx) = unbounded::<u32>();
        let receiving = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        tokio::task::yield_now().await;
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), receiving)
            .await
            .expect("the receiver is woken")
            .unwrap();
        assert_eq!(got, (Some(7), None));
    }

    #[test]
    fn a_weak_sender_does_not_keep_the_queue_open() {
        let (tx, mut rx) = bounded::<u32>(1);
        let weak = tx.downgrade();
        let again = weak.upgrade().expect("a strong sender is alive");
        drop(tx);
        again.try_send(5).unwrap();
        drop(again);
        assert!(weak.upgrade().is_none());
        assert_eq!(rx.try_recv(), Ok(5));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let (tx, mut rx) = unbounded();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(lock(&rx.shared.state).items.capacity(), 0);
        // A data queue keeps its few slots for the next message, also while its receiver
        // waits: a busy link does not allocate a buffer per wake-up.
        tx.send(1).unwrap();
        rx.try_recv().unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(rx.poll_recv(&mut cx).is_pending());
        let kept = lock(&rx.shared.state).items.capacity();
        assert!(kept > 0 && kept <= KEEP_EMPTY);
    }

    #[test]
    fn an_idle_control_queue_holds_no_buffer() {
        let (tx, mut rx) = bounded(2048);
        for i in 0..1000 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(lock(&rx.shared.state).items.capacity(), 0);
        // A small one keeps its few slots for the next message while the receiver is busy...
        tx.try_send(1).unwrap();
        rx.try_recv().unwrap();
        let kept = lock(&rx.shared.state).items.capacity();
        assert!(kept > 0 && kept <= KEEP_EMPTY);
        // ...and gives them back once the receiver waits.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(lock(&rx.shared.state).items.capacity(), 0);
        tx.try_send(2).unwrap();
        assert_eq!(rx.try_recv(), Ok(2));
    }

    #[test]
    fn an_empty_queue_is_small() {
        // The point of this queue: a tokio channel costs about 1.5 KiB before its first item.
        // With its `Arc`'s two counts, it fills an allocator's 128-byte size class.
        assert!(std::mem::size_of::<Shared<bytes::Bytes>>() + 16 <= 128);
    }
}
