//! Who publishes and who subscribes to what, derived from the scenario's parameters alone.
//!
//! Clients have global indices `0..clients`. Every index maps to at most one topic it publishes
//! to and at most one it subscribes to, so each generator process of a sharded run (`--shard
//! i/n` owns the indices `j` with `j % n == i`) computes the same picture without talking to the
//! others, and the expected delivery count is `Σ published(p) × subscribers(topic(p))`.
//! A publisher's id in the payload header is its global index.

/// The steady topologies (churn and ramp build on these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Indices `0..publishers` publish to topic 0; every other index subscribes to it.
    Fanout {
        /// Publishing clients.
        publishers: usize,
    },
    /// Every client subscribes to topic 0 and publishes to it.
    Dense,
    /// Consecutive runs of `size` clients form a room (topic); members publish to and subscribe
    /// to their room. The last room holds the remainder.
    Rooms {
        /// Clients per room.
        size: usize,
    },
}

/// One client's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Role {
    /// The topic it subscribes to.
    pub(crate) subscribes: Option<usize>,
    /// The topic it publishes to.
    pub(crate) publishes: Option<usize>,
}

/// Which slice of the clients this process drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) count: usize,
}

impl Shard {
    pub(crate) const WHOLE: Self = Self { index: 0, count: 1 };

    /// Parses `i/n`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not i/n"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("bad shard index `{i}`"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("bad shard count `{n}`"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= i < n"));
        }
        Ok(Self { index, count })
    }

    pub(crate) fn owns(self, client: usize) -> bool {
        client % self.count == self.index
    }

    pub(crate) fn is_leader(self) -> bool {
        self.index == 0
    }
}

/// A steady workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Workload {
    pub(crate) clients: usize,
    pub(crate) shape: Shape,
}

impl Workload {
    pub(crate) fn role(&self, client: usize) -> Role {
        match self.shape {
            Shape::Fanout { publishers } if client < publishers => Role {
                subscribes: None,
                publishes: Some(0),
            },
            Shape::Fanout { .. } => Role {
                subscribes: Some(0),
                publishes: None,
            },
            Shape::Dense => Role {
                subscribes: Some(0),
                publishes: Some(0),
            },
            Shape::Rooms { size } => Role {
                subscribes: Some(client / size),
                publishes: Some(client / size),
            },
        }
    }

    pub(crate) fn topics(&self) -> usize {
        match self.shape {
            Shape::Fanout { .. } | Shape::Dense => 1,
            Shape::Rooms { size } => self.clients.div_ceil(size),
        }
    }

    /// Subscribers per topic among the clients `shard` owns, indexed by topic.
    pub(crate) fn subscriber_counts(&self, shard: Shard) -> Vec<u64> {
        let mut counts = vec![0u64; self.topics()];
        for c in (0..self.clients).filter(|&c| shard.owns(c)) {
            if let Some(t) = self.role(c).subscribes {
                counts[t] += 1;
            }
        }
        counts
    }

    /// Clients that publish.
    pub(crate) fn publishers(&self) -> usize {
        (0..self.clients)
            .filter(|&c| self.role(c).publishes.is_some())
            .count()
    }

    /// Deliveries per published message, on average over the publishers.
    pub(crate) fn fanout_factor(&self) -> f64 {
        let publishers = self.publishers().max(1) as f64;
        let sent: Vec<(u32, u64)> = (0..self.clients)
            .filter_map(|c| Some((u32::try_from(c).ok()?, 1)))
            .collect();
        self.expected(&sent, Shard::WHOLE) as f64 / publishers
    }

    /// Messages `shard`'s subscribers should receive when each publisher `p` sent `sent[p]`.
    pub(crate) fn expected(&self, sent: &[(u32, u64)], shard: Shard) -> u64 {
        let subscribers = self.subscriber_counts(shard);
        sent.iter()
            .filter_map(|&(p, n)| {
                let topic = self.role(p as usize).publishes?;
                Some(n * subscribers.get(topic)?)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_splits_publishers_from_subscribers() {
        let w = Workload {
            clients: 5,
            shape: Shape::Fanout { publishers: 2 },
        };
        assert_eq!(w.subscriber_counts(Shard::WHOLE), vec![3]);
        assert_eq!(w.expected(&[(0, 10), (1, 4)], Shard::WHOLE), 42);
        assert_eq!(w.role(1).subscribes, None);
        assert_eq!((w.publishers(), w.fanout_factor()), (2, 3.0));
    }

    #[test]
    fn dense_clients_receive_their_own_messages() {
        let w = Workload {
            clients: 4,
            shape: Shape::Dense,
        };
        assert_eq!(
            w.expected(&[(0, 1), (1, 1), (2, 1), (3, 1)], Shard::WHOLE),
            16
        );
    }

    #[test]
    fn rooms_hold_the_remainder_and_shards_split_the_count() {
        let w = Workload {
            clients: 25,
            shape: Shape::Rooms { size: 10 },
        };
        assert_eq!(w.topics(), 3);
        assert_eq!(w.subscriber_counts(Shard::WHOLE), vec![10, 10, 5]);
        // Publisher 21 is in the last room of 5.
        assert_eq!(w.expected(&[(21, 7)], Shard::WHOLE), 35);
        let halves = [0, 1].map(|index| Shard { index, count: 2 });
        let per_shard: u64 = halves.iter().map(|&s| w.expected(&[(21, 7)], s)).sum();
        assert_eq!(per_shard, 35);
        assert_eq!(w.subscriber_counts(halves[0]), vec![5, 5, 3]);
    }

    #[test]
    fn shard_syntax_is_checked() {
        assert_eq!(Shard::parse("1/3"), Ok(Shard { index: 1, count: 3 }));
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("x").is_err());
        assert!(Shard::parse("1/3").is_ok_and(|s| s.owns(4) && !s.owns(3)));
    }
}
