//! One shared copy of each name many sessions carry (roles, scopes, accounts).
//!
//! Every session keeps its role and routing scope as `Arc<str>`; made per session, each is an
//! allocation of its own, while a server's sessions share a handful of them. A name is kept
//! here while some session holds it: the set is pruned of names nobody else holds whenever it
//! has doubled since the last pruning, so it stays within twice the names in use.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use relaymesh_net::sync::lock;

/// Names kept before the first pruning.
const FIRST_PRUNE: usize = 1024;

#[derive(Debug)]
pub(crate) struct Names {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    names: HashSet<Arc<str>>,
    /// Size at which the set is next pruned.
    prune_at: usize,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                names: HashSet::new(),
                prune_at: FIRST_PRUNE,
            }),
        }
    }
}

impl Names {
    /// The shared copy of `name`.
    pub(crate) fn get(&self, name: &str) -> Arc<str> {
        let mut inner = lock(&self.inner);
        if let Some(known) = inner.names.get(name) {
            return known.clone();
        }
        if inner.names.len() >= inner.prune_at {
            inner.names.retain(|n| Arc::strong_count(n) > 1);
            inner.prune_at = (inner.names.len() * 2).max(FIRST_PRUNE);
        }
        let shared: Arc<str> = name.into();
        inner.names.insert(shared.clone());
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name_and_names_nobody_holds_are_let_go() {
        let names = Names::default();
        let a = names.get("admin");
        let b = names.get("admin");
        assert!(Arc::ptr_eq(&a, &b));
        // Many names held only briefly: the set is pruned as it doubles, and what is still
        // held stays shared.
        for n in 0..10 * FIRST_PRUNE {
            drop(names.get(&format!("room-{n}")));
        }
        assert!(names.len() <= FIRST_PRUNE + 1, "{} names kept", names.len());
        assert!(Arc::ptr_eq(&a, &names.get("admin")));
    }
}
