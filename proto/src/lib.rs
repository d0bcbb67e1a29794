//! The relaymesh wire protocol.
//!
//! This is the only crate that turns messages into bytes and back. It owns the `.proto` file
//! (`relaymesh/v1/mesh.proto`), the code generated from it (checked in under `src/gen/`, kept in
//! sync by `tests/codegen.rs`), the frame encode/decode helpers every link uses, hand-written
//! encoders for the two frames on the per-message hot path, and the topic naming rules.

pub mod frame;
pub mod hex;
pub mod node;
pub mod topic;

/// Generated protobuf types for protocol version 1 (`package relaymesh.v1`).
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod v1 {
    include!("gen/relaymesh.v1.rs");
}

/// The coordinator's gRPC admin API (`package relaymesh.admin.v1`,
/// `relaymesh/admin/v1/admin.proto`): messages, the tonic server trait and the client.
#[cfg(feature = "admin")]
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod admin {
    include!("gen/relaymesh.admin.v1.rs");

    /// The encoded descriptor set of the admin API, for server reflection.
    pub const DESCRIPTOR: &[u8] = include_bytes!("gen/admin_descriptor.bin");
}

/// Serde helpers of the admin API's HTTP JSON form.
#[cfg(feature = "admin")]
pub mod json {
    /// `bytes` fields as base64 strings (standard alphabet, padded), as proto3 JSON has them.
    pub mod base64 {
        use base64::Engine as _;
        use base64::engine::general_purpose::STANDARD;
        use serde::{Deserialize as _, Deserializer, Serializer};

        /// Writes `bytes` as base64.
        pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_str(&STANDARD.encode(bytes))
        }

        /// Reads base64 (an error names what is wrong).
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Vec<u8>, D::Error> {
            let text = String::deserialize(deserializer)?;
            STANDARD
                .decode(text.as_bytes())
                .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
        }
    }
}

pub use frame::{DecodeError, ErrorEnvelope, decode, decode_frame, encode, error_frame};
pub use v1::ErrorCode;

/// The protocol version this build speaks. Carried in the first message of every link.
pub const PROTOCOL_VERSION: u32 = 1;

/// Shorthand for [`v1::Error::new`], for the many places a link refuses something.
pub fn error(code: ErrorCode, message: impl Into<String>) -> v1::Error {
    v1::Error::new(code, message)
}

/// `UNEXPECTED_MESSAGE`: a valid message that the link's state does not allow.
pub fn unexpected(message: impl Into<String>) -> v1::Error {
    error(ErrorCode::UnexpectedMessage, message)
}

/// The error for an envelope (`envelope` names its type) that carries no message.
pub fn empty(envelope: &str) -> v1::Error {
    error(ErrorCode::BadFrame, format!("empty {envelope} message"))
}

/// The WebSocket close status (RFC 6455, section 7.4) for a link that ends with `code`. The
/// error frame sent just before the close says exactly what happened; the status lets a
/// WebSocket library that only sees the close (a browser's `CloseEvent.code`) tell too:
/// 1001 shutting down, 1007 a bad frame, 1008 not authenticated or not allowed, 1009 a limit
/// exceeded, 1011 an internal failure, and 4000 + the relaymesh code for the rest (4013 a
/// heartbeat timeout, 4009 a slow consumer, 4015 replaced, ...).
pub fn close_status(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::ShuttingDown => 1001,
        ErrorCode::BadFrame => 1007,
        ErrorCode::Unauthenticated | ErrorCode::Forbidden => 1008,
        ErrorCode::LimitExceeded => 1009,
        ErrorCode::Internal => 1011,
        other => 4000u16.saturating_add(u16::try_from(other as i32).unwrap_or(999)),
    }
}

/// The close status of a link that ends without an error.
pub const CLOSE_NORMAL: u16 = 1000;

/// Checks the protocol version a link's first message (or its answer) carries: `this` names
/// the side that checks ("this coordinator"), for the `UNSUPPORTED_VERSION` message.
pub fn check_version(version: u32, this: &str) -> Result<(), v1::Error> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(error(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {version} is not supported; {this} speaks {PROTOCOL_VERSION}"
            ),
        ))
    }
}

/// The bytes a comm server signs to open `/v1/servers` or `/v1/peers` (`path`) with an Ed25519
/// key: a fixed context string, the verifier's nonce and the path.
pub fn link_challenge(nonce: &[u8], path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + nonce.len() + path.len());
    out.extend_from_slice(b"relaymesh-link-v1\0");
    out.extend_from_slice(nonce);
    out.push(0);
    out.extend_from_slice(path.as_bytes());
    out
}

/// The bytes an Ed25519 login signs: a fixed context string, the coordinator's nonce, and the
/// account, role and group asked for (NUL-separated), so a signature serves one challenge and
/// one request only.
pub fn login_challenge(nonce: &[u8], account: &str, role: &str, group: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + nonce.len() + account.len() + role.len() + group.len());
    out.extend_from_slice(b"relaymesh-login-v1\0");
    out.extend_from_slice(nonce);
    for part in [account, role, group] {
        out.push(0);
        out.extend_from_slice(part.as_bytes());
    }
    out
}

impl v1::Error {
    /// An error with a code and a human-readable message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as i32,
            message: message.into(),
            request_id: 0,
        }
    }

    /// The same error, marked as the answer to request `request_id`.
    pub fn for_request(mut self, request_id: u64) -> Self {
        self.request_id = request_id;
        self
    }

    /// The code, or `ERROR_CODE_UNSPECIFIED` when the peer sent a code this build doesn't know.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::try_from(self.code).unwrap_or(ErrorCode::Unspecified)
    }
}

impl std::fmt::Display for v1::Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_code().as_str_name(), self.message)
    }
}

/// Opening a channel to the coordinator's admin API, over plain HTTP/2 (`http://`) or TLS
/// (`https://`, trusting a CA bundle or the system's CA store, optionally presenting a client
/// certificate for mutual TLS): one way for every admin tool.
#[cfg(feature = "admin")]
pub mod admin_client {
    use std::path::{Path, PathBuf};

    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    /// The TLS side of an admin connection; ignored for `http://` URLs.
    #[derive(Debug, Clone, Default)]
    pub struct AdminTls {
        /// CA bundle (PEM) that signed the coordinator's certificate; the system's CA store
        /// when `None`.
        pub ca: Option<PathBuf>,
        /// Client certificate (PEM) and its key, for a coordinator with `admin_ca` (mutual TLS
        /// instead of the token).
        pub identity: Option<(PathBuf, PathBuf)>,
    }

    /// Why no channel could be opened.
    #[derive(Debug, thiserror::Error)]
    pub enum ConnectError {
        /// The URL does not parse.
        #[error("invalid admin URL {url:?}: {reason}")]
        Url {
            /// The URL given.
            url: String,
            /// Why.
            reason: String,
        },
        /// A PEM file could not be read.
        #[error("cannot read {path}: {error}")]
        Read {
            /// The file.
            path: PathBuf,
            /// Why (part of the message, so not also a `source`).
            error: std::io::Error,
        },
        /// No connection (or no TLS handshake) to the admin API.
        #[error("cannot reach the admin API at {url}: {error}")]
        Connect {
            /// The URL given.
            url: String,
            /// Why.
            error: tonic::transport::Error,
        },
    }

    fn read(path: &Path) -> Result<Vec<u8>, ConnectError> {
        std::fs::read(path).map_err(|error| ConnectError::Read {
            path: path.to_owned(),
            error,
        })
    }

    /// Connects to the admin API at `url` (`http://HOST:PORT` or `https://HOST:PORT`).
    pub async fn connect(url: &str, tls: &AdminTls) -> Result<Channel, ConnectError> {
        let bad = |reason: String| ConnectError::Url {
            url: url.to_owned(),
            reason,
        };
        // Calls may take long (a drain waits up to its deadline); connecting may not.
        let mut endpoint = Channel::from_shared(url.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10));
        if url.trim().to_ascii_lowercase().starts_with("https://") {
            let mut config = ClientTlsConfig::new();
            config = match &tls.ca {
                Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => config.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| bad(e.to_string()))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|error| ConnectError::Connect {
                url: url.to_owned(),
                error,
            })
    }
}
