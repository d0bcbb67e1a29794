//! Cluster-secret checks for the server and peer links.
//!
//! Comm servers present the cluster secret as `Authorization: Bearer <secret>` when they open
//! `/v1/servers` or `/v1/peers`. The comparison is constant time so the secret cannot be guessed
//! byte by byte from response timing.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

/// The bearer token in an `Authorization` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, value.parse().unwrap());
        h
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
