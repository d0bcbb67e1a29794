//! A set that most of the time holds a few items: a list sized to fit, then a hash set.
//!
//! A comm server keeps, for every session, the topics it subscribes to, twice (the session's
//! own view and the control task's). Most sessions have one or two (a client's own topic, a
//! room), and a hash set's smallest table has room for four plus its control bytes: several
//! times the size of the item. An idle client's memory is mostly its session and its topics.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;

/// A set of `T`: a list while it holds at most [`SmallSet::FEW`], a hash set beyond, so a
/// session with thousands of topics is not searched in a line.
#[derive(Debug, Clone)]
pub(crate) enum SmallSet<T> {
    Few(Vec<T>),
    /// Boxed: inline, the rare large set would make every small one twice the size.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<T>>),
}

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl<T: Eq + Hash> SmallSet<T> {
    /// Items kept in a list, at most.
    pub(crate) const FEW: usize = 8;

    /// Adds `item`; `false` if it was here already.
    pub(crate) fn insert(&mut self, item: T) -> bool {
        match self {
            Self::Few(few) if few.contains(&item) => false,
            Self::Few(few) if few.len() < Self::FEW => {
                // Exactly: the list is never long, and growth by doubling is what this saves.
                few.reserve_exact(1);
                few.push(item);
                true
            }
            Self::Few(few) => {
                let mut many: HashSet<T> = few.drain(..).collect();
                many.insert(item);
                *self = Self::Many(Box::new(many));
                true
            }
            Self::Many(many) => many.insert(item),
        }
    }

    /// Whether `item` is here.
    pub(crate) fn contains<Q>(&self, item: &Q) -> bool
    where
        T: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            Self::Few(few) => few.iter().any(|t| t.borrow() == item),
            Self::Many(many) => many.contains(item),
        }
    }

    /// Takes `item` out; what was here, if it was.
    pub(crate) fn take<Q>(&mut self, item: &Q) -> Option<T>
    where
        T: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            Self::Few(few) => {
                let at = few.iter().position(|t| t.borrow() == item)?;
                Some(few.swap_remove(at))
            }
            Self::Many(many) => many.take(item),
        }
    }

    /// Removes `item`; `false` if it was not here.
    pub(crate) fn remove<Q>(&mut self, item: &Q) -> bool
    where
        T: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.take(item).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Few(few) => few.len(),
            Self::Many(many) => many.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is still a list.
    #[cfg(test)]
    pub(crate) fn is_few(&self) -> bool {
        matches!(self, Self::Few(_))
    }

    /// Every item, in no particular order.
    pub(crate) fn into_vec(self) -> Vec<T> {
        match self {
            Self::Few(few) => few,
            Self::Many(many) => many.into_iter().collect(),
        }
    }
}

impl<T: Eq + Hash> Extend<T> for SmallSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for item in items {
            self.insert(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_fits_its_items_and_a_set_takes_over_past_a_few() {
        let mut set = SmallSet::default();
        assert!(set.insert("a".to_owned()));
        assert!(!set.insert("a".to_owned()), "already here");
        assert!(matches!(&set, SmallSet::Few(few) if few.capacity() == 1));
        for n in 1..SmallSet::<String>::FEW {
            assert!(set.insert(n.to_string()));
        }
        assert!(set.is_few() && set.len() == SmallSet::<String>::FEW);
        assert!(set.insert("past".to_owned()));
        assert!(!set.is_few());
        assert!(!set.insert("past".to_owned()) && !set.insert("a".to_owned()));
        assert_eq!(set.len(), SmallSet::<String>::FEW + 1);
        // Found by a borrowed key, either way.
        assert!(set.contains("a") && !set.contains("b"));
        assert_eq!(set.take("a").as_deref(), Some("a"));
        assert!(set.take("a").is_none() && !set.remove("a"));
        let mut few = SmallSet::default();
        few.extend(["x".to_owned(), "y".to_owned(), "x".to_owned()]);
        assert!(few.contains("y") && few.remove("y") && few.len() == 1);
        let mut all = set.into_vec();
        all.sort();
        assert_eq!(all.len(), SmallSet::<String>::FEW);
        assert!(all.contains(&"past".to_owned()) && !all.contains(&"a".to_owned()));
    }
}
