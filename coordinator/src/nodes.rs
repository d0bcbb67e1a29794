//! Nodes: named clients of an account that other clients address directly (direct messages,
//! signals).
//!
//! A node comes into being in one of two ways:
//! - **registration**: a logged-in client sends `RegisterNode{name, location, info}` (or `POST
//!   /v1/nodes`) and gets a random node id and a token, `<node id>.<secret>`, shown once. The
//!   store keeps the SHA-256 of the secret (see [`relaymesh_proto::node::hash_secret`] for why
//!   not argon2), the account, and the role and group of the registering login, which are what
//!   a token login acts as. Tokens are revoked with `coordinator accounts revoke-node`.
//! - **an Ed25519 key login** names the node [`relaymesh_proto::node::id_of_key`]; its first
//!   `UpdateNode` gives it a stored name, location and info.
//!
//! Nodes live in the account store: in the `file` store's JSON (each account's `nodes`), in
//! the `sql` store's `nodes` table. The `open` and `single` stores keep none (a key login still
//! names its node).

use std::time::{SystemTime, UNIX_EPOCH};

use relaymesh_net::sync::lock;
use relaymesh_proto::node;
use relaymesh_proto::v1::{self, ErrorCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::accounts::{AccountsFile, LoginError, Store, StoreError};

/// Longest node name or location, in bytes.
pub const MAX_NODE_TEXT: usize = 128;

/// Default for `max_node_info_bytes`: the longest `info` JSON text.
pub const DEFAULT_MAX_NODE_INFO: usize = 4096;

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// 32 lowercase hex characters.
    pub id: String,
    /// The routing scope it was last reachable in (its account, or `account#group`): direct
    /// messages for its inbox must come from this scope.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// The role a token login acts as.
    #[serde(default)]
    pub role: String,
    /// The group a token login acts in (empty: none).
    #[serde(default)]
    pub group: String,
    /// Free text.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub location: String,
    /// A JSON object, as text.
    #[serde(default = "empty_object")]
    pub info: String,
    /// SHA-256 of the token's secret, in hex; empty for a key node (no token).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_hash: String,
    /// A revoked node's token no longer logs in.
    #[serde(default)]
    pub revoked: bool,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_ms: u64,
    /// Milliseconds since the Unix epoch of the last update.
    #[serde(default)]
    pub updated_ms: u64,
}

impl Node {
    /// A node known only by its id (a key node that never stored its details).
    pub fn unstored(id: String) -> Self {
        Self {
            id,
            scope: String::new(),
            role: String::new(),
            group: String::new(),
            name: String::new(),
            location: String::new(),
            info: empty_object(),
            token_hash: String::new(),
            revoked: false,
            created_ms: 0,
            updated_ms: 0,
        }
    }
}

fn empty_object() -> String {
    "{}".into()
}

/// What a node says about itself: `RegisterNode` and `UpdateNode`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFields {
    /// Free text, at most [`MAX_NODE_TEXT`] bytes.
    pub name: String,
    /// Free text, at most [`MAX_NODE_TEXT`] bytes.
    pub location: String,
    /// A JSON object; empty means `{}`.
    pub info: String,
}

impl NodeFields {
    /// Checks the fields, and makes an empty `info` `{}`.
    pub fn checked(mut self, max_info: usize) -> Result<Self, NodeError> {
        for (field, text) in [("name", &self.name), ("location", &self.location)] {
            if text.len() > MAX_NODE_TEXT {
                return Err(NodeError::BadField {
                    field,
                    code: ErrorCode::LimitExceeded,
                    reason: format!("is longer than {MAX_NODE_TEXT} bytes"),
                });
            }
            if text.chars().any(char::is_control) {
                return Err(NodeError::BadField {
                    field,
                    code: ErrorCode::BadFrame,
                    reason: "contains control characters".into(),
                });
            }
        }
        if self.info.trim().is_empty() {
            self.info = empty_object();
        }
        if self.info.len() > max_info {
            return Err(NodeError::BadField {
                field: "info",
                code: ErrorCode::LimitExceeded,
                reason: format!("is longer than {max_info} bytes (max_node_info_bytes)"),
            });
        }
        match serde_json::from_str::<serde_json::Value>(&self.info) {
            Ok(serde_json::Value::Object(_)) => Ok(self),
            Ok(_) => Err(NodeError::BadField {
                field: "info",
                code: ErrorCode::BadFrame,
                reason: "must be a JSON object".into(),
            }),
            Err(e) => Err(NodeError::BadField {
                field: "info",
                code: ErrorCode::BadFrame,
                reason: format!("is not JSON: {e}"),
            }),
        }
    }
}

/// Why a node could not be registered or updated.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The `open` and `single` stores keep no nodes.
    #[error(
        "this coordinator keeps no nodes (accounts.store is open or single); use the file or sql store"
    )]
    NotKept,
    /// Registration needs a login to a named account.
    #[error("log in to an account to register a node")]
    NoAccount,
    /// `UpdateNode` from a login that is not a node.
    #[error("this login is not a node: log in with a node token or an Ed25519 key")]
    NotANode,
    /// The node was revoked (or belongs to no account of this login).
    #[error("node {0} is revoked or unknown")]
    Unknown(String),
    /// A field broke a rule.
    #[error("{field} {reason}")]
    BadField {
        /// `name`, `location` or `info`.
        field: &'static str,
        /// `LIMIT_EXCEEDED` for a size, `BAD_FRAME` for the rest.
        code: ErrorCode,
        /// What is wrong.
        reason: String,
    },
    /// The store could not be read or written (details in the log, not for the client).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<NodeError> for v1::Error {
    fn from(e: NodeError) -> Self {
        let code = match &e {
            NodeError::NotKept | NodeError::NoAccount | NodeError::NotANode => ErrorCode::Forbidden,
            NodeError::Unknown(_) => ErrorCode::UnknownNode,
            NodeError::BadField { code, .. } => *code,
            NodeError::Store(detail) => {
                tracing::error!(%detail, "node store unavailable");
                return v1::Error::new(ErrorCode::Internal, "node store unavailable; retry later");
            }
        };
        v1::Error::new(code, e.to_string())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A registered node logging in: who it is.
#[derive(Debug, Clone)]
pub(crate) struct TokenNode {
    pub(crate) account: String,
    pub(crate) node: Node,
}

impl Store {
    /// Registers a new node of `identity`'s account, role and group; returns its id and token.
    pub async fn register_node(
        &self,
        identity: &v1::Identity,
        fields: NodeFields,
    ) -> Result<(String, String), NodeError> {
        if identity.account.is_empty() {
            return Err(NodeError::NoAccount);
        }
        let id = relaymesh_proto::hex::encode(&rand::random::<[u8; node::ID_LEN / 2]>());
        let secret = relaymesh_proto::hex::encode(&rand::random::<[u8; 32]>());
        let now = now_ms();
        let stored = Node {
            id: id.clone(),
            scope: identity.scope.clone(),
            role: identity.role.clone(),
            group: identity.groups.first().cloned().unwrap_or_default(),
            name: fields.name,
            location: fields.location,
            info: fields.info,
            token_hash: node::hash_secret(&secret),
            revoked: false,
            created_ms: now,
            updated_ms: now,
        };
        self.write_node(&identity.account, stored, false).await?;
        Ok((id.clone(), format!("{id}.{secret}")))
    }

    /// Replaces the name, location and info of the node `identity` logged in as; a key node's
    /// first update stores it.
    pub async fn update_node(
        &self,
        identity: &v1::Identity,
        fields: NodeFields,
    ) -> Result<(), NodeError> {
        if identity.node_id.is_empty() {
            return Err(NodeError::NotANode);
        }
        let now = now_ms();
        let node = Node {
            id: identity.node_id.clone(),
            scope: identity.scope.clone(),
            role: identity.role.clone(),
            group: identity.groups.first().cloned().unwrap_or_default(),
            name: fields.name,
            location: fields.location,
            info: fields.info,
            token_hash: String::new(),
            revoked: false,
            created_ms: now,
            updated_ms: now,
        };
        self.write_node(&identity.account, node, true).await
    }

    /// Stores `node` in `account`: a new one, or (`update`) the name, location and info of an
    /// existing one (created if missing: a key node's first update).
    async fn write_node(&self, account: &str, node: Node, update: bool) -> Result<(), NodeError> {
        match self {
            Self::Open | Self::Single { .. } => Err(NodeError::NotKept),
            Self::Sql(db) => {
                let done = if update {
                    db.update_node(account, &node).await?
                } else {
                    db.insert_node(account, &node).await.map(|()| true)?
                };
                if done {
                    Ok(())
                } else {
                    Err(NodeError::Unknown(node.id))
                }
            }
            Self::File { path, accounts, .. } => {
                let _turn = crate::admin::FileTurn::take(path).await?;
                let mut file = AccountsFile::load(path)?;
                let entry = file.account_mut(account)?;
                match entry.nodes.iter_mut().find(|n| n.id == node.id) {
                    Some(existing) if update => {
                        if existing.revoked {
                            return Err(NodeError::Unknown(node.id));
                        }
                        existing.name = node.name;
                        existing.location = node.location;
                        existing.info = node.info;
                        existing.updated_ms = node.updated_ms;
                    }
                    // 128 random bits do not collide; an id seen twice is a bug, not luck.
                    Some(_) => {
                        return Err(NodeError::Store(StoreError::Database(format!(
                            "node id {} is taken",
                            node.id
                        ))));
                    }
                    None => entry.nodes.push(node),
                }
                file.save(path)?;
                // In force at once, not at the next reload.
                *lock(accounts) = std::sync::Arc::new(file);
                Ok(())
            }
        }
    }

    /// The registered node a token names, if the token's secret matches and the node is not
    /// revoked.
    pub(crate) async fn node_of_token(&self, token: &str) -> Result<TokenNode, LoginError> {
        let bad = || LoginError::BadToken;
        let (id, secret) = node::split_token(token).ok_or_else(bad)?;
        let found = match self {
            Self::Open | Self::Single { .. } => None,
            Self::File { accounts, .. } => {
                let file = lock(accounts).clone();
                file.accounts.iter().find_map(|a| {
                    a.nodes.iter().find(|n| n.id == id).map(|n| TokenNode {
                        account: a.name.clone(),
                        node: n.clone(),
                    })
                })
            }
            Self::Sql(db) => db
                .node(id)
                .await
                .map_err(|e| LoginError::Unavailable(e.to_string()))?,
        };
        let found = found.ok_or_else(bad)?;
        let hash = node::hash_secret(secret);
        let matches: bool = hash
            .as_bytes()
            .ct_eq(found.node.token_hash.as_bytes())
            .into();
        if found.node.revoked || found.node.token_hash.is_empty() || !matches {
            return Err(bad());
        }
        Ok(found)
    }

    /// Revokes node `id` of `account` (its token no longer logs in); `false` when there is no
    /// such node.
    pub async fn revoke_node(&self, account: &str, id: &str) -> Result<bool, StoreError> {
        match self {
            Self::Open | Self::Single { .. } => Err(StoreError::NotManaged),
            Self::Sql(db) => db.revoke_node(account, id).await,
            Self::File { path, accounts, .. } => {
                let _turn = crate::admin::FileTurn::take(path).await?;
                let mut file = AccountsFile::load(path)?;
                let entry = file.account_mut(account)?;
                let Some(node) = entry.nodes.iter_mut().find(|n| n.id == id) else {
                    return Ok(false);
                };
                node.revoked = true;
                file.save(path)?;
                *lock(accounts) = std::sync::Arc::new(file);
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_bounded_and_info_is_a_json_object() {
        let ok = NodeFields {
            name: "drone 7".into(),
            location: "hangar".into(),
            info: String::new(),
        }
        .checked(64)
        .expect("valid");
        assert_eq!(ok.info, "{}");
        let code = |f: NodeFields| match f.checked(64) {
            Err(NodeError::BadField { field, code, .. }) => (field, code),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let long = "x".repeat(MAX_NODE_TEXT + 1);
        assert_eq!(
            code(NodeFields {
                name: long,
                ..NodeFields::default()
            }),
            ("name", ErrorCode::LimitExceeded)
        );
        assert_eq!(
            code(NodeFields {
                location: "a\nb".into(),
                ..NodeFields::default()
            }),
            ("location", ErrorCode::BadFrame)
        );
        for info in ["[1]", "{", "\"text\""] {
            assert_eq!(
                code(NodeFields {
                    info: info.into(),
                    ..NodeFields::default()
                }),
                ("info", ErrorCode::BadFrame)
            );
        }
        assert_eq!(
            code(NodeFields {
                info: format!("{{\"k\":\"{}\"}}", "v".repeat(64)),
                ..NodeFields::default()
            }),
            ("info", ErrorCode::LimitExceeded)
        );
    }
}
