//! Keys and credentials a process presents: Ed25519 key files (the private key in hex, as
//! `meshctl keygen` writes it), for clients that log in with a key and servers that prove
//! themselves with one; and how a comm server proves itself when it dials the coordinator or a
//! peer ([`LinkCredentials`]). Checking credentials is [`crate::auth`] (feature `server`).

use std::time::Duration;

use ed25519_dalek::{Signer as _, SigningKey};
use hyper::{Method, StatusCode};
use relaymesh_proto::hex;

use crate::http::HttpClientError;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read the key file {path}: {error}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("{path} does not hold a 64-hex-digit Ed25519 private key")]
    NotAKey {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The file could not be created.
    #[error("cannot create the key file {path}: {error}")]
    Create {
        /// The file.
        path: std::path::PathBuf,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
}

/// Reads a hex Ed25519 private key (as `meshctl keygen` and [`write_new_signing_key`] write it).
pub fn read_signing_key(path: &std::path::Path) -> Result<SigningKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| KeyFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    hex::decode(text.trim())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(|b| SigningKey::from_bytes(&b))
        .ok_or_else(|| KeyFileError::NotAKey {
            path: path.to_owned(),
        })
}

/// Makes a new Ed25519 key, writes its private half to `path` in hex (a new file, readable by
/// its owner only; an existing file is never overwritten) and returns it.
pub fn write_new_signing_key(path: &std::path::Path) -> Result<SigningKey, KeyFileError> {
    use std::io::Write as _;
    let secret: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&secret);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let create = |error| KeyFileError::Create {
        path: path.to_owned(),
        error,
    };
    let mut file = options.open(path).map_err(create)?;
    writeln!(file, "{}", hex::encode(&secret)).map_err(create)?;
    Ok(key)
}

/// How a comm server proves itself when it opens `/v1/servers` on the coordinator or
/// `/v1/peers` on another server: the cluster secret, or an Ed25519 key the other side trusts.
#[derive(Clone)]
pub enum LinkCredentials {
    /// `Authorization: Bearer <secret>`.
    Secret(String),
    /// `Authorization: Ed25519 <public key>.<challenge id>.<signature>` (all hex), signing a
    /// challenge fetched from `POST <path>/challenge` on the other side first.
    Key(SigningKey),
}

impl std::fmt::Debug for LinkCredentials {
    // Neither the secret nor the private key goes into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret(..)"),
            Self::Key(key) => write!(f, "Key({})", hex::encode(key.verifying_key().as_bytes())),
        }
    }
}

impl LinkCredentials {
    /// The `Authorization` header value for opening `path` (`/v1/servers` or `/v1/peers`) at
    /// `base` (`ws://host:port` or `http://host:port`, or their TLS forms, dialed with `tls`).
    /// For a key this asks the other side for a challenge.
    pub async fn authorization(
        &self,
        base: &str,
        path: &str,
        tls: &crate::tls::Connector,
        timeout: Duration,
    ) -> Result<String, AuthError> {
        let key = match self {
            Self::Secret(secret) => return Ok(format!("Bearer {secret}")),
            Self::Key(key) => key,
        };
        let url = format!("{base}{path}/challenge");
        let (status, body) = match crate::http::request_with(
            Method::POST,
            &url,
            &[],
            Some(Vec::new()),
            tls,
            timeout,
        )
        .await
        {
            Ok(answer) => answer,
            Err(error) => return Err(AuthError::ChallengeRequest { url, error }),
        };
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body).trim().to_owned();
            return Err(AuthError::ChallengeRefused { url, status, body });
        }
        let challenge: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(challenge) => challenge,
            Err(error) => return Err(AuthError::ChallengeNotJson { url, error }),
        };
        let (Some(id), Some(nonce)) = (
            challenge["challenge_id"].as_str(),
            challenge["nonce"].as_str().and_then(hex::decode),
        ) else {
            return Err(AuthError::NoChallenge { url });
        };
        let signature = key.sign(&relaymesh_proto::link_challenge(&nonce, path));
        Ok(format!(
            "Ed25519 {}.{id}.{}",
            hex::encode(key.verifying_key().as_bytes()),
            hex::encode(&signature.to_bytes())
        ))
    }
}

/// Why a link's `Authorization` could not be prepared ([`LinkCredentials::authorization`]), or
/// a list of trusted keys could not be read ([`parse_public_keys`]).
///
/// A cause (an HTTP or JSON error) is part of the message and not also a `source`.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The challenge could not be fetched.
    #[error("{url}: {error}")]
    ChallengeRequest {
        /// The challenge endpoint.
        url: String,
        /// Why (part of the message, so not also a `source`).
        error: HttpClientError,
    },
    /// The other side answered the challenge request with an error status.
    #[error("{url}: {status}: {body}")]
    ChallengeRefused {
        /// The challenge endpoint.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The body of the answer, as text, trimmed.
        body: String,
    },
    /// The answer to the challenge request is not JSON.
    #[error("{url}: {error}")]
    ChallengeNotJson {
        /// The challenge endpoint.
        url: String,
        /// Why (part of the message, so not also a `source`).
        error: serde_json::Error,
    },
    /// The answer to the challenge request has no challenge id or hex nonce.
    #[error("{url}: no challenge in the answer")]
    NoChallenge {
        /// The challenge endpoint.
        url: String,
    },
    /// A configured public key is not an Ed25519 public key in hex.
    #[error("{0:?} is not a 64-hex-digit Ed25519 public key")]
    BadPublicKey(String),
}
