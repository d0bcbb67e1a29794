//! Process shutdown: one [`CancellationToken`] per process, cancelled by SIGINT or SIGTERM;
//! every listener and connection holds a child of it, every task is spawned on a
//! [`TaskTracker`], and [`drain`] waits for them with a grace timeout so shutdown cannot hang.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cancels `token` when the process receives SIGINT or SIGTERM.
///
/// The handlers are installed before this returns, so a signal that arrives right after (say,
/// just after the `listening on` line) already means "shut down cleanly" rather than the
/// default "die at once". Call it from within the runtime.
pub fn cancel_on_signals(token: CancellationToken) {
    let signals = Signals::install();
    tokio::spawn(async move {
        let name = signals.wait().await;
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    });
}

#[cfg(unix)]
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

#[cfg(unix)]
impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(term)) => Self(Some((int, term))),
            _ => {
                tracing::warn!(
                    "cannot install SIGINT/SIGTERM handlers; falling back to ctrl-c only"
                );
                Self(None)
            }
        }
    }

    async fn wait(self) -> &'static str {
        match self.0 {
            Some((mut int, mut term)) => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
                "ctrl-c"
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Self {
        Self
    }

    async fn wait(self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}

/// Closes `tracker` and waits up to `grace` for its tasks. Returns `false` if some were still
/// running when the grace period ran out (they are abandoned when the runtime stops).
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> bool {
    tracker.close();
    match tokio::time::timeout(grace, tracker.wait()).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(
                remaining = tracker.len(),
                ?grace,
                "grace period over; abandoning tasks"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_but_not_past_the_grace_period() {
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert!(
            drain(&tracker, Duration::from_secs(2)).await,
            "finished within the grace period"
        );

        let tracker = TaskTracker::new();
        tracker.spawn(std::future::pending::<()>());
        let start = tokio::time::Instant::now();
        assert!(
            !drain(&tracker, Duration::from_secs(5)).await,
            "a stuck task is abandoned"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
