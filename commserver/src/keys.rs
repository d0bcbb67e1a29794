//! Single-use login keys, as a plain struct with no I/O and an explicit clock.
//!
//! The coordinator reserves a key for a client identity; the client presents it once on
//! `/v1/client?key=...` within the key's TTL. Used and expired keys are remembered for a while
//! afterwards as tombstones, so that a refused client is told *why* ("already used", "expired")
//! rather than just "unknown". Memory is bounded: at most `max_pending` live keys, and tombstones
//! only for [`TOMBSTONE_LIFE`], oldest evicted first when there are more than `max_pending`.
//!
//! A key is held as the 128-bit number its 32 hex digits spell, not as a string: every client
//! that logged in within the last minute leaves a tombstone, and three copies of a string each
//! (map, order, tombstone order) were a tenth of an idle client's memory.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::RngExt as _;
use relaymesh_proto::{ErrorCode, v1};

/// How long a used or expired key is remembered.
pub(crate) const TOMBSTONE_LIFE: Duration = Duration::from_secs(60);

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("unknown login key")]
    Unknown,
    #[error("login key has expired; ask the coordinator for a new one")]
    Expired,
    #[error("login key was already used; keys are single-use")]
    Used,
    #[error("too many login keys are pending on this server")]
    Full,
}

#[derive(Debug)]
enum Slot {
    Pending {
        /// Boxed: identities carry role rules and are much larger than the other states.
        identity: Box<v1::Identity>,
        expires: Instant,
    },
    Used,
    Expired,
}

/// A key: 128 random bits, written as 32 lowercase hex digits.
type Key = u128;

/// Digits in a written key.
const KEY_DIGITS: usize = 32;

/// The key a client presented, if it is written the way keys are (anything else is unknown).
fn parse_key(written: &str) -> Option<Key> {
    let well_formed = written.len() == KEY_DIGITS
        && written
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed
        .then(|| Key::from_str_radix(written, 16).ok())
        .flatten()
}

#[derive(Debug)]
pub(crate) struct KeyStore {
    ttl: Duration,
    max_pending: usize,
    slots: HashMap<Key, Slot>,
    /// Pending keys in reservation order; their expiry times ascend because the TTL is fixed.
    pending_order: VecDeque<(Instant, Key)>,
    /// Tombstones in the order they were made, with the time each may be forgotten.
    tombstone_order: VecDeque<(Instant, Key)>,
    pending: usize,
}

impl KeyStore {
    pub(crate) fn new(ttl: Duration, max_pending: usize) -> Self {
        Self {
            ttl,
            max_pending,
            slots: HashMap::new(),
            pending_order: VecDeque::new(),
            tombstone_order: VecDeque::new(),
            pending: 0,
        }
    }

    /// Reserves a fresh 128-bit random key for `identity`.
    pub(crate) fn reserve(
        &mut self,
        now: Instant,
        identity: v1::Identity,
    ) -> Result<(String, Duration), KeyError> {
        self.sweep(now);
        if self.pending >= self.max_pending {
            return Err(KeyError::Full);
        }
        let key = loop {
            let candidate: Key = rand::rng().random();
            if !self.slots.contains_key(&candidate) {
                break candidate;
            }
        };
        let expires = now + self.ttl;
        self.slots.insert(
            key,
            Slot::Pending {
                identity: Box::new(identity),
                expires,
            },
        );
        self.pending_order.push_back((expires, key));
        self.pending += 1;
        Ok((format!("{key:0KEY_DIGITS$x}"), self.ttl))
    }

    /// Consumes `key`, returning the identity it was reserved for.
    pub(crate) fn redeem(&mut self, now: Instant, key: &str) -> Result<v1::Identity, KeyError> {
        self.sweep(now);
        let key = parse_key(key).ok_or(KeyError::Unknown)?;
        match self.slots.get_mut(&key) {
            None => Err(KeyError::Unknown),
            Some(Slot::Used) => Err(KeyError::Used),
            Some(Slot::Expired) => Err(KeyError::Expired),
            Some(slot @ Slot::Pending { .. }) => {
                let Slot::Pending { identity, expires } = std::mem::replace(slot, Slot::Used)
                else {
                    unreachable!("matched Pending above")
                };
                self.pending -= 1;
                self.tombstone_order.push_back((now + TOMBSTONE_LIFE, key));
                if expires <= now {
                    // Expired between sweeps (sweep runs first, so only at the exact instant).
                    if let Some(slot) = self.slots.get_mut(&key) {
                        *slot = Slot::Expired;
                    }
                    return Err(KeyError::Expired);
                }
                Ok(*identity)
            }
        }
    }

    /// Forgets `key`, reserved for a login that went elsewhere (`Unreserve`): it stops counting
    /// against capacity at once, and is refused as expired if offered after all. Whether it
    /// was pending (a key redeemed, expired or unknown is left alone).
    pub(crate) fn unreserve(&mut self, now: Instant, key: &str) -> bool {
        let Some(key) = parse_key(key) else {
            return false;
        };
        let Some(slot @ Slot::Pending { .. }) = self.slots.get_mut(&key) else {
            return false;
        };
        *slot = Slot::Expired;
        self.pending -= 1;
        self.tombstone_order.push_back((now + TOMBSTONE_LIFE, key));
        true
    }

    /// Keys reserved and not yet redeemed or expired.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Expires pending keys whose TTL has passed and forgets old tombstones.
    pub(crate) fn sweep(&mut self, now: Instant) {
        while let Some((expires, _)) = self.pending_order.front() {
            if *expires > now {
                break;
            }
            let Some((_, key)) = self.pending_order.pop_front() else {
                break;
            };
            if let Some(slot @ Slot::Pending { .. }) = self.slots.get_mut(&key) {
                *slot = Slot::Expired;
                self.pending -= 1;
                self.tombstone_order.push_back((now + TOMBSTONE_LIFE, key));
            }
        }
        while let Some((forget_at, _)) = self.tombstone_order.front() {
            if *forget_at > now && self.tombstone_order.len() <= self.max_pending {
                break;
            }
            let Some((_, key)) = self.tombstone_order.pop_front() else {
                break;
            };
            if matches!(self.slots.get(&key), Some(Slot::Used | Slot::Expired)) {
                self.slots.remove(&key);
            }
        }
    }
}

/// A key refusal as the protocol error a client or the coordinator is sent.
impl From<KeyError> for v1::Error {
    fn from(e: KeyError) -> Self {
        let code = if e == KeyError::Full {
            ErrorCode::LimitExceeded
        } else {
            ErrorCode::KeyInvalid
        };
        v1::Error::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(alias: &str) -> v1::Identity {
        v1::Identity {
            alias: alias.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_key_works_once() {
        let t0 = Instant::now();
        let mut keys = KeyStore::new(Duration::from_secs(10), 100);
        let (key, ttl) = keys.reserve(t0, identity("a")).unwrap();
        assert_eq!((key.len(), ttl), (32, Duration::from_secs(10)));
        assert_eq!(keys.pending(), 1);
        assert_eq!(keys.redeem(t0, &key).unwrap().alias, "a");
        assert_eq!(keys.pending(), 0);
        assert_eq!(keys.redeem(t0, &key), Err(KeyError::Used));
        assert_eq!(keys.redeem(t0, "made-up"), Err(KeyError::Unknown));
    }

    #[test]
    fn a_key_is_known_only_as_it_was_written() {
        let t0 = Instant::now();
        let mut keys = KeyStore::new(Duration::from_secs(10), 100);
        let (key, _) = keys.reserve(t0, identity("a")).unwrap();
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // The same number written another way is not the key.
        for other in [
            key.to_uppercase(),
            format!("+{}", &key[1..]),
            format!("0{key}"),
            key[..31].to_owned(),
            format!("{key} "),
        ] {
            if other != key {
                assert_eq!(keys.redeem(t0, &other), Err(KeyError::Unknown), "{other:?}");
            }
        }
        assert_eq!(keys.redeem(t0, &key).unwrap().alias, "a");
        // Small numbers keep their leading zeros.
        assert_eq!(parse_key(&format!("{:032x}", 7u128)), Some(7));
        assert_eq!(parse_key("7"), None);
    }

    #[test]
    fn keys_expire_and_tombstones_are_forgotten() {
        let t0 = Instant::now();
        let mut keys = KeyStore::new(Duration::from_secs(10), 100);
        let (key, _) = keys.reserve(t0, identity("a")).unwrap();
        let (other, _) = keys
            .reserve(t0 + Duration::from_secs(5), identity("b"))
            .unwrap();
        assert_eq!(
            keys.redeem(t0 + Duration::from_secs(10), &key),
            Err(KeyError::Expired)
        );
        assert_eq!(keys.pending(), 1);
        assert_eq!(
            keys.redeem(t0 + Duration::from_secs(14), &other)
                .unwrap()
                .alias,
            "b"
        );
        let later = t0 + Duration::from_secs(10) + TOMBSTONE_LIFE + Duration::from_secs(5);
        keys.sweep(later);
        assert_eq!(keys.redeem(later, &key), Err(KeyError::Unknown));
        assert_eq!(keys.redeem(later, &other), Err(KeyError::Unknown));
        assert!(keys.slots.is_empty());
    }

    #[test]
    fn pending_keys_are_bounded() {
        let t0 = Instant::now();
        let mut keys = KeyStore::new(Duration::from_secs(10), 2);
        keys.reserve(t0, identity("a")).unwrap();
        let (b, _) = keys.reserve(t0, identity("b")).unwrap();
        assert_eq!(keys.reserve(t0, identity("c")), Err(KeyError::Full));
        keys.redeem(t0, &b).unwrap();
        keys.reserve(t0, identity("c")).unwrap();
        // Once the first two expire there is room again, and tombstones stay bounded.
        for i in 0..10u64 {
            let now = t0 + Duration::from_secs(10 * (i + 1));
            keys.reserve(now, identity("d")).unwrap();
            assert!(keys.slots.len() <= 2 + 3, "{} slots", keys.slots.len());
        }
    }

    #[test]
    fn a_key_taken_back_frees_its_room_and_is_refused_after() {
        let t0 = Instant::now();
        let mut keys = KeyStore::new(Duration::from_secs(10), 1);
        let (a, _) = keys.reserve(t0, identity("a")).unwrap();
        assert_eq!(keys.reserve(t0, identity("b")), Err(KeyError::Full));
        assert!(keys.unreserve(t0, &a));
        assert_eq!(keys.pending(), 0);
        assert!(!keys.unreserve(t0, &a), "taken back twice");
        assert_eq!(keys.redeem(t0, &a), Err(KeyError::Expired));
        let (b, _) = keys.reserve(t0, identity("b")).unwrap();
        // A key redeemed, or one that is no key, is left alone.
        keys.redeem(t0, &b).unwrap();
        assert!(!keys.unreserve(t0, &b));
        assert!(!keys.unreserve(t0, "not a key"));
        assert_eq!(keys.pending(), 0);
        // Its entry in the expiry order finds nothing pending when its time comes.
        keys.sweep(t0 + Duration::from_secs(11));
        assert_eq!(keys.pending(), 0);
    }
}
