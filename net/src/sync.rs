//! Lock helpers, and a future polled only when it woke its task.
//!
//! Locks in relaymesh guard plain data for a few instructions and are never held across an
//! `.await` (clippy's `await_holding_lock` is denied workspace-wide). A panic while a lock is
//! held is a bug that has already been reported; the data is still consistent enough to keep
//! serving other connections, so poisoning is ignored rather than turned into more panics.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Locks `mutex`, ignoring poisoning.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A future polled only once it has asked to be woken (and on its first poll): a branch of a
/// `select!` that almost never fires, such as a link's "closing" or the process's "shutting
/// down", then costs the loop an atomic load per turn instead of a poll of its own. (Polling a
/// `CancellationToken`'s future takes two locks, the token's and its waiters'; a link's read
/// loop turns once per frame.)
pub struct PolledOnWake<F> {
    future: F,
    wake: Arc<WakeFlag>,
    /// Wakes `wake`, handed to `future` when it is polled.
    waker: Waker,
    /// The task's waker as last registered in `wake`: while it is the same, and `wake` has
    /// not fired, it is still there.
    registered: Option<Waker>,
}

#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> PolledOnWake<F> {
    /// `future`, polled on the first poll and then only after it woke its task.
    pub fn new(future: F) -> Self {
        let wake = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(wake.clone());
        Self {
            future,
            wake,
            waker,
            registered: None,
        }
    }
}

impl<F: Future + Unpin> Future for PolledOnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let same_task = (this.registered.as_ref()).is_some_and(|w| w.will_wake(cx.waker()));
        if !this.wake.woken.load(Ordering::Acquire) {
            if same_task {
                // Not woken since this waker was registered, so it is registered still (a wake
                // sets the flag before it takes the waker).
                return Poll::Pending;
            }
            this.wake.task.register(cx.waker());
            this.registered = Some(cx.waker().clone());
            // A wake that came before the registration took the old waker, and left the flag.
            if !this.wake.woken.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        // The flag is cleared before the registration: a wake in between sets it again (this
        // task is then polled once more for nothing), so it is never clear with no waker
        // registered.
        this.wake.woken.store(false, Ordering::Release);
        this.wake.task.register(cx.waker());
        if !same_task {
            this.registered = Some(cx.waker().clone());
        }
        Pin::new(&mut this.future).poll(&mut Context::from_waker(&this.waker))
    }
}

impl<F> std::fmt::Debug for PolledOnWake<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolledOnWake")
            .field("woken", &self.wake.woken.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    /// Counts its polls, and is ready once `token` is cancelled.
    struct Counted<'a> {
        polls: &'a std::cell::Cell<u32>,
        inner: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    }

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            self.inner.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn a_gated_future_is_polled_first_and_then_only_when_it_woke_its_task() {
        let token = CancellationToken::new();
        let polls = std::cell::Cell::new(0);
        let counted = Counted {
            polls: &polls,
            inner: Box::pin(token.clone().cancelled_owned()),
        };
        let mut gated = PolledOnWake::new(counted);
        let (ticks_tx, mut ticks) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..100 {
            ticks_tx.send(()).unwrap();
        }
        // A select loop woken a hundred times by its other branch.
        let mut turns = 0;
        while turns < 100 {
            tokio::select! {
                biased;
                () = &mut gated => panic!("ready before the token was cancelled"),
                Some(()) = ticks.recv() => turns += 1,
            }
        }
        assert_eq!(polls.get(), 1, "polled on the first turn only");
        let canceller = {
            let token = token.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                token.cancel();
            })
        };
        (&mut gated).await;
        assert_eq!(polls.get(), 2, "polled again once woken, and then ready");
        canceller.await.unwrap();
    }
}
