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
    /// The task's waker as last put in `wake.task` (which a wake does not empty).
    registered: Option<Waker>,
}

#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    /// The task to wake. Locked only when the task's waker changes and when `future` wakes,
    /// both rare; a wake leaves it in place, so it is never missing once set.
    task: Mutex<Option<Waker>>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = lock(&self.task).clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F: Future + Unpin> PolledOnWake<F> {
    /// `future`, polled on the first poll and then only after it woke its task.
    pub fn new(future: F) -> Self {
        let wake = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
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
        // Registered before the flag is read, so a wake after the read wakes this waker.
        if !(this.registered.as_ref()).is_some_and(|w| w.will_wake(cx.waker())) {
            *lock(&this.wake.task) = Some(cx.waker().clone());
            this.registered = Some(cx.waker().clone());
        }
        if !this.wake.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // Cleared before `future` is polled: a wake from here on sets it again.
        this.wake.woken.store(false, Ordering::Release);
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

    /// Pending until its third poll; keeps the waker of its last poll.
    struct Steps {
        polls: u32,
        waker: Option<Waker>,
    }

    impl Future for Steps {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            if self.polls == 3 {
                return Poll::Ready(());
            }
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Counts the wakes of the task polling the gated future.
    #[derive(Default)]
    struct Task(std::sync::atomic::AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_wake_of_the_inner_future_wakes_the_task_and_gets_it_polled() {
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut gated = PolledOnWake::new(Steps {
            polls: 0,
            waker: None,
        });
        let wakes = || task.0.load(Ordering::SeqCst);
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(gated.future.polls, 1, "not polled again before it woke");
        for (round, polls) in [(1, 2), (2, 3)] {
            gated.future.waker.take().expect("a waker").wake();
            assert_eq!(wakes(), round, "the task was woken");
            let ready = Pin::new(&mut gated).poll(&mut cx).is_ready();
            assert_eq!(gated.future.polls, polls);
            assert_eq!(ready, polls == 3);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_future_woken_twice_from_another_thread_completes() {
        for _ in 0..2000 {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            // Woken once to no avail, then once more for good.
            let inner = Box::pin(async move {
                rx.recv().await;
                rx.recv().await;
            });
            let notifier = std::thread::spawn(move || {
                let _ = tx.send(());
                std::thread::yield_now();
                let _ = tx.send(());
            });
            let gated = PolledOnWake::new(inner);
            tokio::time::timeout(std::time::Duration::from_secs(10), gated)
                .await
                .expect("a wake was lost");
            notifier.join().unwrap();
        }
    }
}
