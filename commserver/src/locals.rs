//! A topic's local sessions, kept in chunks that its routes share.
//!
//! A route is a snapshot that publishers read without a lock, so every subscription change
//! makes a new one. Built from scratch, it would copy every subscriber of the topic: a room of
//! 20 000 clients joining one by one would copy 200 million handles. Kept in chunks of at most
//! [`CHUNK`], a change rebuilds the one chunk it touched and the list of chunks, and the new
//! route shares every other chunk with the old. Chunks are not merged: newcomers fill the last
//! one, and a room that shrinks keeps at most as many chunks as it had at its largest.

use std::collections::HashMap;
use std::sync::Arc;

use crate::interest::SessionId;

/// Sessions per chunk, at most.
pub(crate) const CHUNK: usize = 256;

/// A route's view of a topic's local sessions: shared chunks, read in order.
#[derive(Debug)]
pub(crate) struct Chunked<S> {
    chunks: Box<[Arc<[S]>]>,
    len: usize,
}

impl<S> Default for Chunked<S> {
    fn default() -> Self {
        Self {
            chunks: Box::default(),
            len: 0,
        }
    }
}

impl<S> Chunked<S> {
    /// How many sessions.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every session, chunk after chunk.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &S> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }
}

/// One chunk of `items` (tests build routes by hand).
#[cfg(test)]
impl<S> From<Vec<S>> for Chunked<S> {
    fn from(items: Vec<S>) -> Self {
        let len = items.len();
        Self {
            chunks: if len == 0 {
                Box::default()
            } else {
                Box::new([items.into()])
            },
            len,
        }
    }
}

/// One chunk as the control task keeps it: its members, and the shared copy routes were last
/// given (`None` once a member came or went).
#[derive(Debug)]
struct Chunk<S> {
    members: Vec<(SessionId, S)>,
    built: Option<Arc<[S]>>,
}

/// A topic's local sessions.
///
/// Most topics fit one chunk (a client's own topic, a small room): they keep no index and no
/// spare room, since an idle client's memory is mostly what its topics and its session hold.
#[derive(Debug)]
pub(crate) struct Locals<S> {
    chunks: Vec<Chunk<S>>,
    /// Which chunk each session is in, once there is more than one (a single chunk is
    /// searched: at most [`CHUNK`] entries, on a subscription change, never per message).
    /// Boxed: inline, an empty map would add five words to every topic, and only topics of
    /// more than [`CHUNK`] sessions have one.
    #[allow(clippy::box_collection)]
    at: Option<Box<HashMap<SessionId, usize>>>,
    len: usize,
}

impl<S> Default for Locals<S> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            at: None,
            len: 0,
        }
    }
}

impl<S: Clone> Locals<S> {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk session `id` is in.
    fn chunk_of(&self, id: SessionId) -> Option<usize> {
        match self.chunks.as_slice() {
            [] => None,
            [only] => only.members.iter().any(|(m, _)| *m == id).then_some(0),
            _ => self.at.as_ref()?.get(&id).copied(),
        }
    }

    /// Adds session `id`, reached through `handle`; `false` (and nothing changes) if it is
    /// here already.
    pub(crate) fn insert(&mut self, id: SessionId, handle: S) -> bool {
        if self.chunk_of(id).is_some() {
            return false;
        }
        let i = match self.chunks.last() {
            Some(last) if last.members.len() < CHUNK => self.chunks.len() - 1,
            _ => {
                if self.chunks.len() == 1 {
                    // A second chunk: from now on the index says where each session is.
                    self.at
                        .get_or_insert_default()
                        .extend(self.chunks[0].members.iter().map(|(m, _)| (*m, 0)));
                }
                self.chunks.reserve_exact(1);
                self.chunks.push(Chunk {
                    members: Vec::new(),
                    built: None,
                });
                self.chunks.len() - 1
            }
        };
        let chunk = &mut self.chunks[i];
        if chunk.members.capacity() == 0 {
            // Room for one first: most topics never get a second.
            chunk.members.reserve_exact(1);
        }
        chunk.members.push((id, handle));
        chunk.built = None;
        if self.chunks.len() > 1 {
            self.at.get_or_insert_default().insert(id, i);
        }
        self.len += 1;
        true
    }

    /// Removes session `id`; its handle, if it was here.
    pub(crate) fn remove(&mut self, id: SessionId) -> Option<S> {
        let i = self.chunk_of(id)?;
        if let Some(at) = self.at.as_mut() {
            at.remove(&id);
        }
        let chunk = self.chunks.get_mut(i)?;
        let position = chunk.members.iter().position(|(m, _)| *m == id)?;
        let (_, handle) = chunk.members.swap_remove(position);
        chunk.built = None;
        self.len -= 1;
        if chunk.members.is_empty() {
            // The last chunk takes the empty one's place.
            self.chunks.swap_remove(i);
            if let (Some(moved), Some(at)) = (self.chunks.get(i), self.at.as_mut()) {
                for (m, _) in &moved.members {
                    at.insert(*m, i);
                }
            }
        }
        if self.chunks.len() <= 1 {
            // Back to one chunk (or none): it is searched again.
            self.at = None;
        }
        Some(handle)
    }

    /// The sessions as a route shares them: chunks nobody changed since the last call are the
    /// same shared copies.
    pub(crate) fn chunked(&mut self) -> Chunked<S> {
        let chunks = self
            .chunks
            .iter_mut()
            .map(|c| {
                c.built
                    .get_or_insert_with(|| c.members.iter().map(|(_, s)| s.clone()).collect())
                    .clone()
            })
            .collect();
        Chunked {
            chunks,
            len: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(c: &Chunked<u64>) -> Vec<u64> {
        let mut v: Vec<u64> = c.iter().copied().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_change_rebuilds_one_chunk_and_shares_the_others() {
        let mut locals = Locals::default();
        let n = 3 * CHUNK as u64 + 10;
        for id in 0..n {
            assert!(locals.insert(id, id));
        }
        assert!(!locals.insert(5, 5), "already here");
        let before = locals.chunked();
        assert_eq!(before.len(), n as usize);
        assert_eq!(ids(&before), (0..n).collect::<Vec<_>>());

        // One leaves from the second chunk: only that chunk is new.
        assert_eq!(locals.remove(CHUNK as u64 + 1), Some(CHUNK as u64 + 1));
        assert_eq!(locals.remove(CHUNK as u64 + 1), None);
        let after = locals.chunked();
        let shared: Vec<bool> = (before.chunks.iter().zip(after.chunks.iter()))
            .map(|(a, b)| Arc::ptr_eq(a, b))
            .collect();
        assert_eq!(shared, [true, false, true, true]);
        assert_eq!(after.len(), n as usize - 1);
        assert!(!ids(&after).contains(&(CHUNK as u64 + 1)));
    }

    #[test]
    fn one_chunk_keeps_no_index_and_a_second_brings_it() {
        let mut locals = Locals::default();
        assert!(locals.insert(1, 1));
        assert!(!locals.insert(1, 1), "already here");
        assert!(locals.at.is_none());
        assert_eq!(locals.chunks[0].members.capacity(), 1);
        for id in 2..=CHUNK as u64 + 1 {
            assert!(locals.insert(id, id));
        }
        assert_eq!(locals.chunks.len(), 2);
        assert_eq!(locals.at.as_ref().map(|at| at.len()), Some(CHUNK + 1));
        assert!(
            !locals.insert(CHUNK as u64 + 1, 0),
            "already here, in the second chunk"
        );
        // Back to one chunk: the index goes, and every session is still found.
        assert_eq!(locals.remove(CHUNK as u64 + 1), Some(CHUNK as u64 + 1));
        assert!(locals.at.is_none());
        for id in 1..=CHUNK as u64 {
            assert_eq!(locals.remove(id), Some(id));
        }
        assert!(locals.is_empty());
        assert!(locals.chunked().is_empty());
    }

    #[test]
    fn an_emptied_chunk_gives_way_to_the_last_and_every_session_stays_findable() {
        let mut locals = Locals::default();
        let n = 2 * CHUNK as u64 + 3;
        for id in 0..n {
            locals.insert(id, id);
        }
        // Empty the first chunk: the last (3 sessions) takes its place.
        for id in 0..CHUNK as u64 {
            assert_eq!(locals.remove(id), Some(id));
        }
        let now = locals.chunked();
        assert_eq!(now.chunks.len(), 2);
        assert_eq!(ids(&now), (CHUNK as u64..n).collect::<Vec<_>>());
        // The moved sessions are found where they went.
        for id in 2 * CHUNK as u64..n {
            assert_eq!(locals.remove(id), Some(id));
        }
        for id in CHUNK as u64..2 * CHUNK as u64 {
            assert_eq!(locals.remove(id), Some(id));
        }
        assert!(locals.is_empty());
        assert!(locals.chunked().is_empty());
    }
}
