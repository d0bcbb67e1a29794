//! Client aliases: `<epoch>-<n>`, where `epoch` is 48 random bits drawn when the coordinator
//! starts and `n` counts logins. Aliases are unique within one coordinator's life and, because a
//! restarted coordinator draws a new epoch, not reused after a restart.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::RngExt as _;

pub(crate) struct Aliases {
    epoch: String,
    next: AtomicU64,
}

impl Aliases {
    pub(crate) fn new() -> Self {
        let epoch: u64 = rand::rng().random::<u64>() & 0xffff_ffff_ffff;
        Self {
            epoch: format!("{epoch:012x}"),
            next: AtomicU64::new(1),
        }
    }

    /// This coordinator process's random id (the aliases' prefix), told to comm servers.
    pub(crate) fn epoch(&self) -> &str {
        &self.epoch
    }

    pub(crate) fn next(&self) -> String {
        format!(
            "{}-{}",
            self.epoch,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_unique_and_differ_across_restarts() {
        let a = Aliases::new();
        let (first, second) = (a.next(), a.next());
        assert_ne!(first, second);
        assert!(first.ends_with("-1") && second.ends_with("-2"));
        let restarted = Aliases::new();
        assert_ne!(restarted.next(), first);
    }
}
