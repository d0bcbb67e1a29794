//! Nodes: clients that other clients can address directly.
//!
//! A node id is 32 lowercase hex characters (128 bits). A registered node's id is random; an
//! Ed25519 key login names the node [`id_of_key`], so the same key is the same node at every
//! login and on every coordinator. A node's sessions receive what is sent to it as messages on
//! its node topic, `@node/<id>`, which routes like any topic (local subscribers, and once to
//! each peer server with interest) but which no client can subscribe or publish to by name:
//! `@` is not allowed in topics.

use sha2::{Digest as _, Sha256};

/// Length of a node id in hex characters.
pub const ID_LEN: usize = 32;

/// The prefix of node topics.
pub const TOPIC_PREFIX: &str = "@node/";

/// The topic presence events arrive on (`v1::PresenceEvent` payloads): clients may subscribe
/// to it, never publish on it.
pub const PRESENCE_TOPIC: &str = "@presence";

/// Why a node id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id {id:?} is not {ID_LEN} lowercase hex characters")]
pub struct BadNodeId {
    /// The refused id (cut to 80 characters).
    pub id: String,
}

/// Checks that `id` is a node id.
pub fn check_id(id: &str) -> Result<(), BadNodeId> {
    if id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(BadNodeId {
            id: id.chars().take(80).collect(),
        })
    }
}

/// The node id of an Ed25519 public key: the first 128 bits of SHA-256 over a fixed label and
/// the key.
pub fn id_of_key(public_key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"relaymesh node id\0")
        .chain_update(public_key)
        .finalize();
    crate::hex::encode(&digest[..ID_LEN / 2])
}

/// The topic a node's sessions receive on.
pub fn topic(id: &str) -> String {
    format!("{TOPIC_PREFIX}{id}")
}

/// The node a node topic names, if `topic` is one.
pub fn of_topic(topic: &str) -> Option<&str> {
    topic.strip_prefix(TOPIC_PREFIX)
}

/// A node token is `<node id>.<secret>`: the id says which node's stored hash to check, and
/// the secret is 256 random bits in hex. `None` when `token` is not of that form.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    (check_id(id).is_ok() && secret.len() == 64 && crate::hex::decode(secret).is_some())
        .then_some((id, secret))
}

/// The stored form of a token's secret: SHA-256, in hex. A fast hash is enough for 256 random
/// bits (nobody can guess their way through 2^256 candidates, however fast each is), where an
/// access code chosen by a person needs argon2's deliberate cost.
pub fn hash_secret(secret: &str) -> String {
    crate::hex::encode(&Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_keys_are_stable_distinct_and_valid() {
        let a = id_of_key(&[1; 32]);
        assert_eq!(a, id_of_key(&[1; 32]));
        assert_ne!(a, id_of_key(&[2; 32]));
        assert_eq!(check_id(&a), Ok(()));
        assert!(check_id("ABCDEF00ABCDEF00ABCDEF00ABCDEF00").is_err());
        assert!(check_id("abc").is_err());
        assert_eq!(of_topic(&topic(&a)), Some(a.as_str()));
        assert_eq!(of_topic("rooms/a"), None);
    }

    #[test]
    fn tokens_split_only_when_well_formed() {
        let id = id_of_key(b"k");
        let secret = "ab".repeat(32);
        let token = format!("{id}.{secret}");
        assert_eq!(split_token(&token), Some((id.as_str(), secret.as_str())));
        assert_eq!(split_token(&format!("{id}.abc")), None);
        assert_eq!(split_token(&format!("nothex.{secret}")), None);
        assert_eq!(split_token("no-dot"), None);
        assert_ne!(hash_secret(&secret), secret);
        assert_eq!(hash_secret(&secret).len(), 64);
    }
}
