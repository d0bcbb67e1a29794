//! Authentication of the server and peer links, and single-use challenges.
//!
//! Comm servers present the cluster secret as `Authorization: Bearer <secret>` when they open
//! `/v1/servers` or `/v1/peers`; the comparison is constant time so the secret cannot be
//! guessed byte by byte from response timing. Where trusted Ed25519 keys are configured, a
//! server instead fetches a challenge (`POST /v1/servers/challenge` or `/v1/peers/challenge`)
//! and presents `Authorization: Ed25519 <key>.<challenge id>.<signature>`; each challenge
//! answers one attempt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use ed25519_dalek::{Signature, VerifyingKey};
use relaymesh_proto::hex;
use subtle::ConstantTimeEq;

pub use crate::keys::{AuthError, LinkCredentials};
use crate::sync::lock;

/// The bearer token in an `Authorization` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether `given` equals `secret`, compared in constant time; an empty secret never matches.
pub fn secret_matches(given: &str, secret: &str) -> bool {
    !secret.is_empty() && bool::from(given.as_bytes().ct_eq(secret.as_bytes()))
}

/// Whether `headers` carry `Authorization: Bearer <secret>`, compared in constant time.
///
/// An empty configured secret never matches: a cluster must be configured with a secret.
pub fn bearer_matches(headers: &HeaderMap, secret: &str) -> bool {
    match bearer_token(headers) {
        Some(token) if !secret.is_empty() => token.as_bytes().ct_eq(secret.as_bytes()).into(),
        _ => false,
    }
}

/// Parses hex public keys (config lists of trusted keys).
pub fn parse_public_keys(keys: &[String]) -> Result<Vec<VerifyingKey>, AuthError> {
    keys.iter()
        .map(|k| {
            hex::decode(k)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| VerifyingKey::from_bytes(&b).ok())
                .ok_or_else(|| AuthError::BadPublicKey(k.clone()))
        })
        .collect()
}

/// Who may open a server or peer link: holders of the cluster secret, or, when trusted keys
/// are configured, only holders of one of those keys (challenge-response).
#[derive(Debug)]
pub struct LinkTrust {
    secret: String,
    keys: Vec<VerifyingKey>,
    /// Challenges handed out by `POST <path>/challenge`.
    pub challenges: Challenges,
}

impl LinkTrust {
    /// Trust `secret`, or only `keys` when there are any.
    pub fn new(secret: String, keys: Vec<VerifyingKey>, challenges: Challenges) -> Self {
        Self {
            secret,
            keys,
            challenges,
        }
    }

    /// Checks the `Authorization` of a request for `path`; the error says why it was refused.
    pub fn check(&self, headers: &HeaderMap, path: &str) -> Result<(), Untrusted> {
        if self.keys.is_empty() {
            return if bearer_matches(headers, &self.secret) {
                Ok(())
            } else {
                Err(Untrusted::Secret)
            };
        }
        let value = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(Untrusted::NoKey)?;
        let (scheme, rest) = value.split_once(' ').ok_or(Untrusted::Malformed)?;
        if !scheme.eq_ignore_ascii_case("ed25519") {
            return Err(Untrusted::NoKey);
        }
        let mut parts = rest.trim().split('.');
        let (Some(key), Some(id), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Untrusted::MalformedEd25519);
        };
        let key = hex::decode(key)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .ok_or(Untrusted::MalformedKey)?;
        if !self.keys.contains(&key) {
            return Err(Untrusted::KeyNotTrusted);
        }
        let signature = hex::decode(signature)
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or(Untrusted::MalformedSignature)?;
        let nonce = self.challenges.take(id).ok_or(Untrusted::Challenge)?;
        key.verify_strict(
            &relaymesh_proto::link_challenge(&nonce, path),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| Untrusted::Signature)
    }
}

/// Why [`LinkTrust::check`] refused a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    /// No cluster secret, or the wrong one.
    #[error("missing or wrong cluster secret")]
    Secret,
    /// This side trusts keys only, and none was presented.
    #[error("this side trusts Ed25519 keys only; no key presented")]
    NoKey,
    /// The `Authorization` header is not `<scheme> <credentials>`.
    #[error("malformed Authorization")]
    Malformed,
    /// The Ed25519 credentials are not `<key>.<challenge id>.<signature>`.
    #[error("malformed Ed25519 authorization")]
    MalformedEd25519,
    /// The public key is not an Ed25519 key in hex.
    #[error("malformed Ed25519 public key")]
    MalformedKey,
    /// The key is not one of the trusted keys.
    #[error("key not trusted")]
    KeyNotTrusted,
    /// The signature is not 64 bytes in hex.
    #[error("malformed signature")]
    MalformedSignature,
    /// The challenge is unknown, used or expired.
    #[error("unknown, used or expired challenge")]
    Challenge,
    /// The signature does not verify.
    #[error("signature does not verify")]
    Signature,
}

/// Outstanding challenges: each is used at most once and expires.
#[derive(Debug)]
pub struct Challenges {
    pending: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    ttl: Duration,
    max: usize,
}

impl Challenges {
    /// Challenges good for `ttl`, at most `max` outstanding.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            ttl,
            max,
        }
    }

    /// How long a challenge stays good.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new challenge: its id and 32 random bytes; `None` when `max` are outstanding.
    pub fn issue(&self) -> Option<(String, Vec<u8>)> {
        let now = Instant::now();
        let mut pending = lock(&self.pending);
        if pending.len() >= self.max {
            pending.retain(|_, (_, expires)| *expires > now);
            if pending.len() >= self.max {
                return None;
            }
        }
        let id = hex::encode(&rand::random::<[u8; 16]>());
        let nonce: [u8; 32] = rand::random();
        pending.insert(id.clone(), (nonce.to_vec(), now + self.ttl));
        Some((id, nonce.to_vec()))
    }

    /// Takes challenge `id` if it exists and has not expired; it cannot be taken again.
    pub fn take(&self, id: &str) -> Option<Vec<u8>> {
        let (nonce, expires) = lock(&self.pending).remove(id)?;
        (expires > Instant::now()).then_some(nonce)
    }
}

/// Answer of `POST .../challenge`.
#[derive(Debug, serde::Serialize)]
pub struct ChallengeAnswer {
    /// Names the challenge in the answer.
    pub challenge_id: String,
    /// 32 random bytes in hex, to sign.
    pub nonce: String,
    /// How long the challenge stays good.
    pub expires_in_ms: u64,
}

impl Challenges {
    /// Issues a challenge for a request from `ip`, within that address's allowance.
    pub fn answer_for(
        &self,
        limits: &crate::limits::AddressLimits,
        ip: std::net::IpAddr,
    ) -> Result<ChallengeAnswer, crate::serve::ApiError> {
        if !limits.take(ip) {
            return Err(crate::serve::ApiError::from_code(
                relaymesh_proto::ErrorCode::RateLimited,
                "too many challenges from this address; retry in a minute",
            ));
        }
        self.answer()
    }

    /// Issues a challenge as the JSON answer of a challenge endpoint.
    pub fn answer(&self) -> Result<ChallengeAnswer, crate::serve::ApiError> {
        let (challenge_id, nonce) = self.issue().ok_or_else(|| {
            crate::serve::ApiError::from_code(
                relaymesh_proto::ErrorCode::LimitExceeded,
                "too many challenges outstanding; retry shortly",
            )
        })?;
        Ok(ChallengeAnswer {
            challenge_id,
            nonce: hex::encode(&nonce),
            expires_in_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn challenges_are_single_use_and_bounded() {
        let challenges = Challenges::new(Duration::from_secs(30), 2);
        let (id, nonce) = challenges.issue().unwrap();
        assert_eq!(nonce.len(), 32);
        assert!(challenges.issue().is_some());
        assert!(challenges.issue().is_none(), "bounded");
        assert_eq!(challenges.take(&id), Some(nonce));
        assert_eq!(challenges.take(&id), None, "used once");
        let expired = Challenges::new(Duration::ZERO, 2);
        let (id, _) = expired.issue().unwrap();
        assert_eq!(expired.take(&id), None, "expired");
    }

    #[test]
    fn key_trust_wants_a_trusted_key_and_a_fresh_signed_challenge() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let stranger = SigningKey::from_bytes(&[6; 32]);
        let trust = LinkTrust::new(
            "secret".into(),
            vec![key.verifying_key()],
            Challenges::new(Duration::from_secs(30), 10),
        );
        let present = |signer: &SigningKey, path: &str| {
            let (id, nonce) = trust.challenges.issue().unwrap();
            let signature = signer.sign(&relaymesh_proto::link_challenge(&nonce, path));
            let value = format!(
                "Ed25519 {}.{id}.{}",
                hex::encode(signer.verifying_key().as_bytes()),
                hex::encode(&signature.to_bytes())
            );
            (headers(&value), id)
        };
        let (good, _) = present(&key, "/v1/peers");
        assert_eq!(trust.check(&good, "/v1/peers"), Ok(()));
        assert_eq!(trust.check(&good, "/v1/peers"), Err(Untrusted::Challenge));
        let (other_path, _) = present(&key, "/v1/servers");
        assert_eq!(
            trust.check(&other_path, "/v1/peers"),
            Err(Untrusted::Signature)
        );
        let (untrusted, _) = present(&stranger, "/v1/peers");
        assert_eq!(
            trust.check(&untrusted, "/v1/peers"),
            Err(Untrusted::KeyNotTrusted)
        );
        assert!(trust.check(&headers("Bearer secret"), "/v1/peers").is_err());
    }

    #[test]
    fn bad_keys_and_challenges_say_what_is_wrong_once() {
        let good = hex::encode(SigningKey::from_bytes(&[5; 32]).verifying_key().as_bytes());
        assert_eq!(
            parse_public_keys(std::slice::from_ref(&good))
                .unwrap()
                .len(),
            1
        );
        let bad = parse_public_keys(&[good, "abc".into()]).unwrap_err();
        assert!(matches!(&bad, AuthError::BadPublicKey(k) if k == "abc"));
        assert_eq!(
            bad.to_string(),
            r#""abc" is not a 64-hex-digit Ed25519 public key"#
        );
        let dial = crate::ws::DialError::Credentials(AuthError::NoChallenge {
            url: "http://a:1/v1/peers/challenge".into(),
        });
        assert_eq!(
            dial.to_string(),
            "cannot prepare credentials: http://a:1/v1/peers/challenge: no challenge in the answer"
        );
        // The cause is in the message, so not also a `source` (`{e:#}` prints it once).
        assert!(std::error::Error::source(&dial).is_none());
    }

    #[test]
    fn matches_only_the_exact_secret() {
        assert!(bearer_matches(&headers("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(&headers("bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cret!"), "s3cret"));
        assert!(!bearer_matches(&headers("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer "), ""));
    }
}
