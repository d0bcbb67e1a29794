//! Lock helpers. Locks in relaymesh guard plain data for a few instructions and are never held
//! across an `.await` (clippy's `await_holding_lock` is denied workspace-wide). A panic while a
//! lock is held is a bug that has already been reported; the data is still consistent enough to
//! keep serving other connections, so poisoning is ignored rather than turned into more panics.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poisoning.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
