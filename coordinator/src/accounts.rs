//! Accounts: who may log in, as which role, and what each role may publish and subscribe to.
//!
//! One [`Store`] is chosen in config (`[accounts] store = ...`):
//! - `open`: anyone, as any account and role, with no rules (development only; the coordinator
//!   warns at start-up). Anonymous clients get the empty account.
//! - `single`: one account name and access code from the config (the code preferably from
//!   `RELAYMESH_ACCESS_CODE`); any role, no rules.
//! - `file`: a JSON file of accounts (see [`AccountsFile`]), each with argon2-hashed access
//!   codes, an enabled flag, optional role rules and group isolation; reloaded when it changes.
//! - `sql`: the same accounts in SQLite (default, a file created on first start) or PostgreSQL
//!   ([`crate::sql`]); read at each login, so changes apply at once.
//!
//! Access codes are only ever stored as argon2 hashes; checking one is argon2's verification,
//! which compares in constant time and runs on a blocking thread (it costs milliseconds of CPU
//! on purpose).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use ed25519_dalek::{Signature, VerifyingKey};
use rand::RngExt as _;
use relaymesh_net::sync::lock;
use relaymesh_proto::topic;
use relaymesh_proto::v1::{self, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::nodes::Node;
use crate::sql::SqlStore;

/// Longest account, role or group name.
const MAX_NAME: usize = 64;

/// What a role may do: topic filters (`+`, `#`) it may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRules {
    /// Filters the role may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Filters the role may subscribe to.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// One access code of an account, hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessCode {
    /// Names the code, so it can be revoked without knowing it.
    pub id: String,
    /// The argon2 hash in PHC string form (`$argon2id$...`).
    pub hash: String,
    /// A revoked code no longer logs in.
    #[serde(default)]
    pub revoked: bool,
    /// Groups a login with this code may act in; empty: any. In an account that isolates
    /// groups this is what keeps one group's credentials out of another's topics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// An Ed25519 public key registered to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// Names the key, so it can be revoked.
    pub id: String,
    /// The 32-byte key in hex (64 characters).
    pub key: String,
    /// A revoked key no longer logs in.
    #[serde(default)]
    pub revoked: bool,
    /// Groups a login with this key may act in; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// An account: a customer whose clients see only each other's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// The account's name, as clients give it at login.
    pub name: String,
    /// A disabled account cannot log in (existing sessions are not cut).
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Whether each group (given at login) gets topics of its own inside the account.
    #[serde(default)]
    pub isolate_groups: bool,
    /// Codes that log in to this account (any one of them).
    #[serde(default)]
    pub access_codes: Vec<AccessCode>,
    /// Ed25519 keys that log in to this account (challenge-response).
    #[serde(default)]
    pub public_keys: Vec<PublicKey>,
    /// Roles and their rules. Empty: any role, no rules. Otherwise a login must name one of
    /// these roles and is held to its rules.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleRules>,
    /// Registered nodes, and key nodes that stored their details (see [`crate::nodes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Node>,
}

fn enabled() -> bool {
    true
}

/// The JSON file of the `file` store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsFile {
    /// Every account.
    pub accounts: Vec<Account>,
}

/// Why the account store could not be read, written or changed.
///
/// The message of each is what the coordinator and `coordinator accounts` print; a cause
/// (an I/O or argon2 error) is part of the message and not also a `source`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read.
    #[error("{}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// A file could not be written (or a lock file beside it created).
    #[error("{}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// A file is not valid accounts JSON: it does not parse, or its accounts break a rule.
    #[error("{}: {reason}", path.display())]
    NotAccounts {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The accounts could not be encoded as JSON.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// An account, role, group or id name is malformed.
    #[error(transparent)]
    BadName(#[from] BadName),
    /// Two accounts have the same name.
    #[error("account {0:?} appears twice")]
    Duplicate(String),
    /// A registered public key is not an Ed25519 public key in hex.
    #[error("account {account:?}, key {key:?}: not a 64-hex-digit Ed25519 public key")]
    BadKey {
        /// The account.
        account: String,
        /// The key's id.
        key: String,
    },
    /// An access code's hash is not an argon2 hash in PHC string form.
    #[error("account {account:?}, code {code:?}: bad hash: {error}")]
    BadHash {
        /// The account.
        account: String,
        /// The code's id.
        code: String,
        /// Why (part of the message, so not also a `source`).
        error: argon2::password_hash::Error,
    },
    /// A role's topic filter is malformed.
    #[error("account {account:?}, role {role:?}: filter {filter:?}: {error}")]
    BadFilter {
        /// The account.
        account: String,
        /// The role.
        role: String,
        /// The filter.
        filter: String,
        /// Why (part of the message, so not also a `source`).
        error: topic::TopicError,
    },
    /// An access code could not be hashed.
    #[error("{0}")]
    Hash(argon2::password_hash::Error),
    /// The account database could not be used, or holds an account that breaks a rule; the
    /// text says what was being done and why.
    #[error("{0}")]
    Database(String),
    /// There is no account of that name.
    #[error("no account {0:?}")]
    NoAccount(String),
    /// An account of that name already exists.
    #[error("account {0:?} already exists")]
    AccountExists(String),
    /// The account already has a code or key with that id.
    #[error("account {account:?} already has a {what} {id:?}")]
    EntryExists {
        /// The account.
        account: String,
        /// `code` or `key`.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The account has no code, key or role of that name.
    #[error("account {account:?} has no {what} {id:?}")]
    NoEntry {
        /// The account.
        account: String,
        /// `code`, `key`, `role` or `node`.
        what: &'static str,
        /// The id or role.
        id: String,
    },
    /// Removing the role would leave the account without roles, and so without rules.
    #[error(
        "{role:?} is the last role of {account:?}; removing it would let any role do anything \
         (set another role first)"
    )]
    LastRole {
        /// The account.
        account: String,
        /// The role.
        role: String,
    },
    /// Another `coordinator accounts` command holds the file store's lock file.
    #[error("{} is held by another command (remove it if none is running)", .0.display())]
    Locked(PathBuf),
    /// An `[accounts]` setting is missing or wrong.
    #[error("{setting}: {reason}")]
    BadConfig {
        /// The setting, e.g. `accounts.path`.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `open` and `single` stores have no accounts to manage.
    #[error("the open and single stores have no accounts to manage; use --file or --url")]
    NotManaged,
}

impl AccountsFile {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|error| StoreError::Read {
            path: path.to_owned(),
            error,
        })?;
        let not_accounts = |reason: String| StoreError::NotAccounts {
            path: path.to_owned(),
            reason,
        };
        let file: Self = serde_json::from_str(&text).map_err(|e| not_accounts(e.to_string()))?;
        file.check().map_err(|e| not_accounts(e.to_string()))?;
        Ok(file)
    }

    /// Writes the file atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        self.check()?;
        let text = serde_json::to_string_pretty(self).map_err(StoreError::Encode)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|error| StoreError::Write {
                path: path.to_owned(),
                error,
            })
    }

    /// Names, filters and hashes are well formed and account names unique.
    pub fn check(&self) -> Result<(), StoreError> {
        let mut seen = std::collections::BTreeSet::new();
        let mut seen_nodes = std::collections::BTreeSet::new();
        for a in &self.accounts {
            check_name("account", &a.name)?;
            if !seen.insert(&a.name) {
                return Err(StoreError::Duplicate(a.name.clone()));
            }
            for k in &a.public_keys {
                let valid = hex_decode(&k.key)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .is_some_and(|b| VerifyingKey::from_bytes(&b).is_ok());
                if !valid {
                    return Err(StoreError::BadKey {
                        account: a.name.clone(),
                        key: k.id.clone(),
                    });
                }
            }
            for code in &a.access_codes {
                PasswordHash::new(&code.hash).map_err(|error| StoreError::BadHash {
                    account: a.name.clone(),
                    code: code.id.clone(),
                    error,
                })?;
            }
            for n in &a.nodes {
                relaymesh_proto::node::check_id(&n.id)
                    .map_err(|e| StoreError::Database(format!("account {:?}: {e}", a.name)))?;
                if !seen_nodes.insert(&n.id) {
                    return Err(StoreError::Duplicate(format!("node {}", n.id)));
                }
            }
            for (role, rules) in &a.roles {
                check_name("role", role)?;
                for f in rules.publish.iter().chain(&rules.subscribe) {
                    topic::validate_filter(f, topic::DEFAULT_MAX_TOPIC_LEN).map_err(|error| {
                        StoreError::BadFilter {
                            account: a.name.clone(),
                            role: role.clone(),
                            filter: f.clone(),
                            error,
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The account called `name`.
    pub fn account_mut(&mut self, name: &str) -> Result<&mut Account, StoreError> {
        self.accounts
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or_else(|| StoreError::NoAccount(name.to_owned()))
    }
}

/// A malformed account, role, group or id name (see [`check_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} name {name:?} must be 1-{MAX_NAME} ASCII letters, digits, '_', '-' or '.'")]
pub struct BadName {
    /// What the name names: `account`, `role`, `group`, ...
    pub what: String,
    /// The name as given.
    pub name: String,
}

/// Account, role and group names: 1 to 64 of ASCII letters, digits, `_ - .`.
pub fn check_name(what: &str, name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(BadName {
            what: what.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// Hashes an access code with argon2id and a random salt.
pub fn hash_code(code: &str) -> Result<String, StoreError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(code.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(StoreError::Hash)
}

/// A new random access code: 24 characters from a 57-letter alphabet (about 140 bits).
pub fn new_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn verify(code: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(code.as_bytes(), &h)
            .is_ok()
    })
}

/// Why a login was refused; each maps to its own error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// No such account.
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    /// Wrong or revoked access code.
    #[error("wrong access code for account {0:?}")]
    BadCode(String),
    /// The key is not registered to the account, or the signature does not verify.
    #[error("key not registered to account {0:?}, or its signature does not verify")]
    BadSignature(String),
    /// The account is disabled.
    #[error("account {0:?} is disabled")]
    Disabled(String),
    /// The role is not one of the account's.
    #[error("account {account:?} does not allow role {role:?}")]
    RoleNotPermitted {
        /// The account.
        account: String,
        /// The refused role (empty: none given).
        role: String,
    },
    /// The store needs credentials and got none (or a kind it does not take).
    #[error("this coordinator requires an account and access code")]
    CredentialsRequired,
    /// A name was malformed.
    #[error("{0}")]
    BadName(String),
    /// Too many failed logins from this address.
    #[error("too many failed logins from this address; retry in a minute")]
    RateLimited,
    /// The account database could not be read (the details go to the log, not the client).
    #[error("account store unavailable; retry later")]
    Unavailable(String),
    /// Too many logins are being checked at once.
    #[error("the coordinator is busy checking logins; retry shortly")]
    Busy,
    /// The group is not one the credential may use.
    #[error("this credential may not act in group {0:?}")]
    GroupNotPermitted(String),
    /// A node token that is malformed, unknown, revoked or wrong (which is not said).
    #[error("wrong or revoked node token")]
    BadToken,
}

impl LoginError {
    /// Whether this refusal counts against the source address (a store outage does not).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Unavailable(_) | Self::RateLimited | Self::Busy)
    }
}

impl From<LoginError> for v1::Error {
    fn from(e: LoginError) -> Self {
        let code = match &e {
            LoginError::UnknownAccount(_) => ErrorCode::UnknownAccount,
            LoginError::BadCode(_) | LoginError::BadSignature(_) | LoginError::BadToken => {
                ErrorCode::BadCredentials
            }
            LoginError::Disabled(_) => ErrorCode::AccountDisabled,
            LoginError::RoleNotPermitted { .. } => ErrorCode::RoleNotPermitted,
            LoginError::CredentialsRequired | LoginError::BadName(_) => ErrorCode::Unauthenticated,
            LoginError::RateLimited | LoginError::Busy => ErrorCode::RateLimited,
            LoginError::GroupNotPermitted(_) => ErrorCode::RoleNotPermitted,
            LoginError::Unavailable(detail) => {
                tracing::error!(%detail, "account store unavailable");
                ErrorCode::Internal
            }
        };
        v1::Error::new(code, e.to_string())
    }
}

/// What a successful login grants: the identity fields a key is reserved with (the alias is
/// added by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The account.
    pub account: String,
    /// The role acted as.
    pub role: String,
    /// The group, if any.
    pub group: String,
    /// Routing scope: the account, or `account#group` where the account isolates groups.
    pub scope: String,
    /// The role's rules; `None` for no rules.
    pub rules: Option<RoleRules>,
    /// The node the login is (empty: none): a token's node, or a key's.
    pub node_id: String,
    /// The node's stored name, location and info (empty for none).
    pub node_name: String,
    /// See `node_name`.
    pub node_location: String,
    /// See `node_name`.
    pub node_info: String,
}

impl Grant {
    /// A grant without rules, scoped by account.
    fn unrestricted(account: String, role: String, group: String) -> Self {
        Self {
            scope: account.clone(),
            account,
            role,
            group,
            rules: None,
            node_id: String::new(),
            node_name: String::new(),
            node_location: String::new(),
            node_info: String::new(),
        }
    }

    /// The identity for a reservation.
    pub fn identity(self, alias: String) -> v1::Identity {
        let (publish, subscribe, restricted) = match self.rules {
            Some(r) => (r.publish, r.subscribe, true),
            None => (Vec::new(), Vec::new(), false),
        };
        v1::Identity {
            alias,
            account: self.account,
            role: self.role,
            groups: if self.group.is_empty() {
                Vec::new()
            } else {
                vec![self.group]
            },
            scope: self.scope,
            publish,
            subscribe,
            restricted,
            client_id: String::new(),
            seq: 0,
            node_id: self.node_id,
            node_name: self.node_name,
            node_location: self.node_location,
            node_info: self.node_info,
        }
    }
}

/// Login details from `Hello` or `POST /v1/login`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// No credentials.
    Anonymous,
    /// An Ed25519 key registered to the account, and its signature of the challenge `nonce`.
    Key {
        /// The account.
        account: String,
        /// The role to act as (may be empty).
        role: String,
        /// The group (may be empty).
        group: String,
        /// The 32-byte public key.
        public_key: Vec<u8>,
        /// The challenge the coordinator issued.
        nonce: Vec<u8>,
        /// The 64-byte signature of `login_challenge(nonce, account, role, group)`.
        signature: Vec<u8>,
    },
    /// Account, access code, role and group.
    Code {
        /// The account.
        account: String,
        /// The access code.
        code: String,
        /// The role to act as (may be empty).
        role: String,
        /// The group (may be empty).
        group: String,
    },
    /// A registered node's token (`<node id>.<secret>`).
    NodeToken {
        /// The token.
        token: String,
    },
}

impl From<Option<v1::Credentials>> for Login {
    fn from(c: Option<v1::Credentials>) -> Self {
        match c.and_then(|c| c.kind) {
            None | Some(v1::credentials::Kind::Anonymous(_)) => Self::Anonymous,
            Some(v1::credentials::Kind::AccessCode(a)) => Self::Code {
                account: a.account,
                code: a.code,
                role: a.role,
                group: a.group,
            },
            // The nonce is the caller's to fill in from the challenge it issued.
            Some(v1::credentials::Kind::Key(k)) => Self::Key {
                account: k.account,
                role: k.role,
                group: k.group,
                public_key: k.public_key.to_vec(),
                nonce: Vec::new(),
                signature: k.signature.to_vec(),
            },
            Some(v1::credentials::Kind::NodeToken(t)) => Self::NodeToken { token: t.token },
        }
    }
}

/// What a login offers as proof.
enum Proof {
    Code(String),
    Key {
        public_key: Vec<u8>,
        nonce: Vec<u8>,
        signature: Vec<u8>,
    },
    /// A node token, already checked: the node.
    Node(Node),
}

/// Whether `code` matches one of `hashes` (argon2, on a blocking thread).
/// At most this many argon2 checks run at once per CPU (each costs ~19 MiB and milliseconds
/// of CPU); more wait up to [`ARGON2_WAIT`], then the login is refused as busy.
const ARGON2_PER_CPU: usize = 2;
const ARGON2_WAIT: Duration = Duration::from_secs(5);

static ARGON2_SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(
        std::thread::available_parallelism().map_or(1, usize::from) * ARGON2_PER_CPU,
    )
});

/// Which of `hashes` `code` matches, if any (argon2, on a blocking thread, a bounded number
/// at once).
async fn argon2_find(code: String, hashes: Vec<String>) -> Result<Option<usize>, LoginError> {
    let _slot = tokio::time::timeout(ARGON2_WAIT, ARGON2_SLOTS.acquire())
        .await
        .map_err(|_| LoginError::Busy)?
        .map_err(|_| LoginError::Busy)?;
    Ok(
        tokio::task::spawn_blocking(move || hashes.iter().position(|h| verify(&code, h)))
            .await
            .unwrap_or(None),
    )
}

/// Whether `signature` is `public_key`'s Ed25519 signature of the login challenge.
pub fn verify_signature(
    public_key: &[u8],
    nonce: &[u8],
    signature: &[u8],
    account: &str,
    role: &str,
    group: &str,
) -> bool {
    let (Ok(key), Ok(signature)) = (
        <[u8; 32]>::try_from(public_key),
        <[u8; 64]>::try_from(signature),
    ) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&key) else {
        return false;
    };
    let message = relaymesh_proto::login_challenge(nonce, account, role, group);
    key.verify_strict(&message, &Signature::from_bytes(&signature))
        .is_ok()
}

pub use relaymesh_proto::hex::{decode as hex_decode, encode as hex_encode};

/// Which store, from the config file's `[accounts]` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// Anyone (development only).
    #[default]
    Open,
    /// One account from the config.
    Single,
    /// A JSON file of accounts.
    File,
    /// SQLite or PostgreSQL.
    Sql,
}

/// `[accounts]` in the coordinator's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsConfig {
    /// `open`, `single` or `file`.
    pub store: StoreKind,
    /// `single`: the account name.
    pub account: String,
    /// `single`: the access code (prefer `RELAYMESH_ACCESS_CODE`).
    pub access_code: String,
    /// `file`: the JSON file.
    pub path: Option<PathBuf>,
    /// `file`: how often the file is checked for changes.
    pub reload_ms: u64,
    /// `sql`: `sqlite://FILE` (created if missing) or `postgres://USER:PASSWORD@HOST/DB`
    /// (prefer `RELAYMESH_ACCOUNTS_URL` for a URL with a password).
    pub url: String,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Open,
            account: String::new(),
            access_code: String::new(),
            path: None,
            reload_ms: 1_000,
            url: "sqlite://relaymesh-accounts.db".into(),
        }
    }
}

/// The error of a `file` store configured without `accounts.path`.
pub(crate) fn no_path() -> StoreError {
    StoreError::BadConfig {
        setting: "accounts.path",
        reason: "must be set for the file store".into(),
    }
}

/// The configured account store.
#[derive(Debug)]
pub enum Store {
    /// Anyone.
    Open,
    /// One account, its code hashed at start-up.
    Single {
        /// The account name.
        account: String,
        /// argon2 hash of its code.
        hash: String,
    },
    /// A JSON file, reloaded by [`Store::watch`].
    File {
        /// The file.
        path: PathBuf,
        /// The accounts as last loaded.
        accounts: Mutex<Arc<AccountsFile>>,
        /// How often to look for changes.
        reload: Duration,
    },
    /// SQLite or PostgreSQL.
    Sql(SqlStore),
}

impl Store {
    /// Builds the store from config, loading (and checking) the file or connecting to (and
    /// migrating) the database now.
    pub async fn from_config(config: &AccountsConfig) -> Result<Self, StoreError> {
        match config.store {
            StoreKind::Open => Ok(Self::Open),
            StoreKind::Single => {
                check_name("account", &config.account).map_err(|e| StoreError::BadConfig {
                    setting: "accounts.account",
                    reason: e.to_string(),
                })?;
                if config.access_code.len() < 8 {
                    return Err(StoreError::BadConfig {
                        setting: "accounts.access_code",
                        reason: "must be at least 8 characters \
                                 (RELAYMESH_ACCESS_CODE or the config file)"
                            .into(),
                    });
                }
                Ok(Self::Single {
                    account: config.account.clone(),
                    hash: hash_code(&config.access_code)?,
                })
            }
            StoreKind::File => {
                let path = config.path.clone().ok_or_else(no_path)?;
                let accounts = AccountsFile::load(&path)?;
                Ok(Self::File {
                    path,
                    accounts: Mutex::new(Arc::new(accounts)),
                    reload: Duration::from_millis(config.reload_ms.max(50)),
                })
            }
            StoreKind::Sql => Ok(Self::Sql(SqlStore::connect(&config.url).await?)),
        }
    }

    /// Checks a login. Runs argon2 on a blocking thread.
    pub async fn check(&self, login: Login) -> Result<Grant, LoginError> {
        let (account, role, group, proof) = match login {
            Login::Anonymous => {
                return match self {
                    Self::Open => Ok(Grant::unrestricted(
                        String::new(),
                        String::new(),
                        String::new(),
                    )),
                    _ => Err(LoginError::CredentialsRequired),
                };
            }
            Login::Code {
                account,
                code,
                role,
                group,
            } => (account, role, group, Proof::Code(code)),
            Login::Key {
                account,
                role,
                group,
                public_key,
                nonce,
                signature,
            } => (
                account,
                role,
                group,
                Proof::Key {
                    public_key,
                    nonce,
                    signature,
                },
            ),
            Login::NodeToken { token } => {
                let found = self.node_of_token(&token).await?;
                let node = found.node;
                (
                    found.account,
                    node.role.clone(),
                    node.group.clone(),
                    Proof::Node(node),
                )
            }
        };
        let bad_name = |e: BadName| LoginError::BadName(e.to_string());
        check_name("account", &account).map_err(bad_name)?;
        for (what, name) in [("role", &role), ("group", &group)] {
            if !name.is_empty() {
                check_name(what, name).map_err(bad_name)?;
            }
        }
        // A signature always answers a fresh challenge; without one it could be replayed.
        let signed = |public_key: &[u8], nonce: &[u8], signature: &[u8]| {
            nonce.len() >= 16
                && verify_signature(public_key, nonce, signature, &account, &role, &group)
        };
        let entry = match self {
            Self::Open => {
                // Anyone may log in, but a key login still proves it holds its key.
                if let Proof::Key {
                    public_key,
                    nonce,
                    signature,
                } = &proof
                    && !signed(public_key, nonce, signature)
                {
                    return Err(LoginError::BadSignature(account));
                }
                let mut grant = Grant::unrestricted(account, role, group);
                if let Proof::Key { public_key, .. } = &proof {
                    grant.node_id = relaymesh_proto::node::id_of_key(public_key);
                }
                return Ok(grant);
            }
            Self::Single {
                account: name,
                hash,
            } => {
                if *name != account {
                    return Err(LoginError::UnknownAccount(account));
                }
                let Proof::Code(code) = proof else {
                    return Err(LoginError::BadSignature(account));
                };
                if argon2_find(code, vec![hash.clone()]).await?.is_none() {
                    return Err(LoginError::BadCode(account));
                }
                return Ok(Grant::unrestricted(account, role, group));
            }
            Self::File { accounts, .. } => {
                let file = lock(accounts).clone();
                file.accounts.iter().find(|a| a.name == account).cloned()
            }
            Self::Sql(db) => db
                .account(&account)
                .await
                .map_err(|e| LoginError::Unavailable(e.to_string()))?,
        };
        let entry = entry.ok_or_else(|| LoginError::UnknownAccount(account.clone()))?;
        // The node the login is, and the groups the matching credential may act in (empty:
        // any).
        let mut node = None;
        let groups = match proof {
            Proof::Code(code) => {
                let live: Vec<&AccessCode> =
                    entry.access_codes.iter().filter(|c| !c.revoked).collect();
                let hashes = live.iter().map(|c| c.hash.clone()).collect();
                match argon2_find(code, hashes).await? {
                    Some(i) => live[i].groups.clone(),
                    None => return Err(LoginError::BadCode(account)),
                }
            }
            Proof::Key {
                public_key,
                nonce,
                signature,
            } => {
                let registered = entry
                    .public_keys
                    .iter()
                    .filter(|k| !k.revoked)
                    .any(|k| hex_decode(&k.key).is_some_and(|k| k == public_key));
                if !registered || !signed(&public_key, &nonce, &signature) {
                    return Err(LoginError::BadSignature(account));
                }
                let groups = entry
                    .public_keys
                    .iter()
                    .find(|k| !k.revoked && hex_decode(&k.key).is_some_and(|k| k == public_key))
                    .map(|k| k.groups.clone())
                    .unwrap_or_default();
                let id = relaymesh_proto::node::id_of_key(&public_key);
                let stored = match self {
                    Self::Sql(db) => db
                        .node(&id)
                        .await
                        .map_err(|e| LoginError::Unavailable(e.to_string()))?
                        .filter(|n| n.account == account)
                        .map(|n| n.node),
                    _ => entry.nodes.iter().find(|n| n.id == id).cloned(),
                };
                node = Some(stored.unwrap_or_else(|| Node::unstored(id)));
                groups
            }
            // Registered in this group, with this role: checked below like any login's.
            Proof::Node(stored) => {
                node = Some(stored);
                Vec::new()
            }
        };
        if !groups.is_empty() && !groups.contains(&group) {
            return Err(LoginError::GroupNotPermitted(group));
        }
        if !entry.enabled {
            return Err(LoginError::Disabled(account));
        }
        let rules =
            if entry.roles.is_empty() {
                None
            } else {
                Some(entry.roles.get(&role).cloned().ok_or_else(|| {
                    LoginError::RoleNotPermitted {
                        account: account.clone(),
                        role: role.clone(),
                    }
                })?)
            };
        let scope = if entry.isolate_groups && !group.is_empty() {
            format!("{account}#{group}")
        } else {
            account.clone()
        };
        // The inbox takes messages for this node from the scope it logs in to; a key node
        // met for the first time is stored, so its inbox exists while it is offline.
        if let (Self::Sql(db), Some(node)) = (self, &mut node) {
            node.scope.clone_from(&scope);
            if node.role.is_empty() && node.token_hash.is_empty() {
                node.role.clone_from(&role);
                node.group.clone_from(&group);
            }
            db.touch_node(&account, node)
                .await
                .map_err(|e| LoginError::Unavailable(e.to_string()))?;
        }
        Ok(Grant {
            account,
            role,
            group,
            scope,
            rules,
            node_id: node.as_ref().map(|n| n.id.clone()).unwrap_or_default(),
            node_name: node.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
            node_location: node
                .as_ref()
                .map(|n| n.location.clone())
                .unwrap_or_default(),
            node_info: node.map(|n| n.info).unwrap_or_default(),
        })
    }

    /// Whether the store answers: the database takes a query, the file can be read.
    pub async fn reachable(&self) -> Result<(), StoreError> {
        match self {
            Self::Open | Self::Single { .. } => Ok(()),
            Self::File { path, .. } => tokio::fs::metadata(path)
                .await
                .map(|_| ())
                .map_err(|e| StoreError::Database(format!("{}: {e}", path.display()))),
            Self::Sql(db) => db.ping().await,
        }
    }

    /// Reloads a `file` store whenever its modification time changes, until `shutdown`; a file
    /// that no longer parses is logged and the accounts loaded before stay in force.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let Self::File {
            path,
            accounts,
            reload,
        } = &*self
        else {
            return;
        };
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen: Option<SystemTime> = modified(path);
        let mut tick = tokio::time::interval(*reload);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = modified(path);
            if now == seen {
                continue;
            }
            seen = now;
            match AccountsFile::load(path) {
                Ok(file) => {
                    tracing::info!(path = %path.display(), accounts = file.accounts.len(), "accounts reloaded");
                    *lock(accounts) = Arc::new(file);
                }
                Err(e) => {
                    tracing::error!(error = %e, "accounts file not reloaded; keeping the previous accounts")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(account: &str, code: &str, role: &str, group: &str) -> Login {
        Login::Code {
            account: account.into(),
            code: code.into(),
            role: role.into(),
            group: group.into(),
        }
    }

    fn file_store(file: AccountsFile) -> Store {
        Store::File {
            path: PathBuf::new(),
            accounts: Mutex::new(Arc::new(file)),
            reload: Duration::from_secs(1),
        }
    }

    fn drone() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[3; 32])
    }

    const N1: [u8; 32] = [1; 32];
    const N2: [u8; 32] = [2; 32];

    fn key(role: &str, nonce: &[u8], signed_nonce: &[u8]) -> Login {
        let message = relaymesh_proto::login_challenge(signed_nonce, "acme", role, "fleet-1");
        Login::Key {
            account: "acme".into(),
            role: role.into(),
            group: "fleet-1".into(),
            public_key: drone().verifying_key().as_bytes().to_vec(),
            nonce: nonce.to_vec(),
            signature: ed25519_dalek::Signer::sign(&drone(), &message)
                .to_bytes()
                .to_vec(),
        }
    }

    #[tokio::test]
    async fn key_logins_verify_the_signature_of_this_challenge() {
        let store = file_store(AccountsFile {
            accounts: vec![acme()],
        });
        assert!(store.check(key("agent", &N1, &N1)).await.is_ok());
        // The key is bound to group fleet-1; a short nonce is never accepted.
        let Login::Key {
            public_key,
            signature,
            ..
        } = key("agent", &N1, &N1)
        else {
            unreachable!()
        };
        let elsewhere = Login::Key {
            account: "acme".into(),
            role: "agent".into(),
            group: "fleet-2".into(),
            public_key: public_key.clone(),
            nonce: N1.to_vec(),
            signature: ed25519_dalek::Signer::sign(
                &drone(),
                &relaymesh_proto::login_challenge(&N1, "acme", "agent", "fleet-2"),
            )
            .to_bytes()
            .to_vec(),
        };
        assert_eq!(
            store.check(elsewhere).await,
            Err(LoginError::GroupNotPermitted("fleet-2".into()))
        );
        let short = Login::Key {
            account: "acme".into(),
            role: "agent".into(),
            group: "fleet-1".into(),
            public_key,
            nonce: Vec::new(),
            signature,
        };
        assert_eq!(
            store.check(short).await,
            Err(LoginError::BadSignature("acme".into()))
        );
        // A signature of another challenge (a replay) or another role does not verify.
        assert_eq!(
            store.check(key("agent", &N2, &N1)).await,
            Err(LoginError::BadSignature("acme".into()))
        );
        let Login::Key { signature, .. } = key("gcs", &N1, &N1) else {
            unreachable!()
        };
        let Login::Key {
            mut public_key,
            nonce,
            ..
        } = key("agent", &N1, &N1)
        else {
            unreachable!()
        };
        let forged = Login::Key {
            account: "acme".into(),
            role: "agent".into(),
            group: String::new(),
            public_key: public_key.clone(),
            nonce: nonce.clone(),
            signature,
        };
        assert!(store.check(forged).await.is_err());
        public_key[0] ^= 1;
        assert!(!verify_signature(
            &public_key,
            &nonce,
            &[0; 64],
            "acme",
            "agent",
            ""
        ));
    }

    fn acme() -> Account {
        Account {
            name: "acme".into(),
            enabled: true,
            isolate_groups: true,
            access_codes: vec![
                AccessCode {
                    id: "old".into(),
                    hash: hash_code("revoked-code").unwrap(),
                    revoked: true,
                    groups: Vec::new(),
                },
                AccessCode {
                    id: "main".into(),
                    hash: hash_code("s3cret-code").unwrap(),
                    revoked: false,
                    groups: Vec::new(),
                },
            ],
            public_keys: vec![PublicKey {
                id: "drone".into(),
                key: hex_encode(drone().verifying_key().as_bytes()),
                revoked: false,
                groups: vec!["fleet-1".into()],
            }],
            roles: BTreeMap::from([(
                "agent".into(),
                RoleRules {
                    publish: vec!["telemetry/#".into()],
                    subscribe: vec!["command/+".into()],
                },
            )]),
            nodes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn file_store_checks_code_state_and_role() {
        let mut disabled = acme();
        disabled.name = "gone".into();
        disabled.enabled = false;
        let store = file_store(AccountsFile {
            accounts: vec![acme(), disabled],
        });
        let grant = store
            .check(code("acme", "s3cret-code", "agent", "fleet-1"))
            .await;
        let grant = grant.unwrap();
        assert_eq!(grant.scope, "acme#fleet-1");
        assert_eq!(grant.rules.unwrap().publish, ["telemetry/#"]);
        for (login, expected) in [
            (code("nobody", "x", "", ""), ErrorCode::UnknownAccount),
            (
                code("acme", "wrong", "agent", ""),
                ErrorCode::BadCredentials,
            ),
            (
                code("acme", "revoked-code", "agent", ""),
                ErrorCode::BadCredentials,
            ),
            (
                code("gone", "s3cret-code", "agent", ""),
                ErrorCode::AccountDisabled,
            ),
            (
                code("acme", "s3cret-code", "gcs", ""),
                ErrorCode::RoleNotPermitted,
            ),
            (
                code("acme", "s3cret-code", "", ""),
                ErrorCode::RoleNotPermitted,
            ),
            (Login::Anonymous, ErrorCode::Unauthenticated),
            (code("a b", "x", "", ""), ErrorCode::Unauthenticated),
        ] {
            let refused = store.check(login.clone()).await.unwrap_err();
            assert_eq!(v1::Error::from(refused).error_code(), expected, "{login:?}");
        }
    }

    #[tokio::test]
    async fn open_and_single_stores() {
        let open = Store::Open;
        let anon = open.check(Login::Anonymous).await.unwrap();
        assert_eq!((anon.scope.as_str(), anon.rules), ("", None));
        let named = open.check(code("acme", "any", "gcs", "g")).await.unwrap();
        assert_eq!(named.scope, "acme");
        let single = Store::from_config(&AccountsConfig {
            store: StoreKind::Single,
            account: "acme".into(),
            access_code: "long-enough".into(),
            ..AccountsConfig::default()
        })
        .await
        .unwrap();
        assert!(
            single
                .check(code("acme", "long-enough", "x", ""))
                .await
                .is_ok()
        );
        assert_eq!(
            single.check(code("other", "long-enough", "", "")).await,
            Err(LoginError::UnknownAccount("other".into()))
        );
        assert_eq!(
            single.check(code("acme", "nope", "", "")).await,
            Err(LoginError::BadCode("acme".into()))
        );
    }

    #[test]
    fn files_with_bad_entries_are_refused() {
        let mut twice = AccountsFile {
            accounts: vec![acme(), acme()],
        };
        let refused = twice.check().unwrap_err();
        assert!(matches!(&refused, StoreError::Duplicate(name) if name == "acme"));
        assert_eq!(refused.to_string(), r#"account "acme" appears twice"#);
        twice.accounts.pop();
        twice.accounts[0].roles.get_mut("agent").unwrap().publish = vec!["a/#/b".into()];
        let refused = twice.check().unwrap_err();
        assert!(matches!(&refused, StoreError::BadFilter { filter, .. } if filter == "a/#/b"));
        assert!(
            refused
                .to_string()
                .starts_with(r#"account "acme", role "agent": filter "a/#/b": "#)
        );
        twice.accounts[0].roles.clear();
        twice.accounts[0].access_codes[0].hash = "plain".into();
        let refused = twice.check().unwrap_err();
        assert!(matches!(&refused, StoreError::BadHash { code, .. } if code == "old"));
        assert!(
            refused
                .to_string()
                .starts_with(r#"account "acme", code "old": bad hash: "#)
        );
        twice.accounts[0].name = "a b".into();
        let refused = twice.check().unwrap_err();
        assert_eq!(
            refused.to_string(),
            r#"account name "a b" must be 1-64 ASCII letters, digits, '_', '-' or '.'"#
        );
        // Each message carries its cause once: none is repeated as a `source`.
        assert!(std::error::Error::source(&refused).is_none());
        assert!(new_code().len() == 24 && new_code() != new_code());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir =
            std::env::temp_dir().join(format!("relaymesh-accounts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("accounts.json");
        let missing = AccountsFile::load(&path).unwrap_err();
        assert!(matches!(&missing, StoreError::Read { .. }));
        assert!(
            missing
                .to_string()
                .starts_with(&format!("{}: ", path.display()))
        );
        assert!(std::error::Error::source(&missing).is_none());
        std::fs::write(&path, r#"{"accounts": [{"name": "a b"}]}"#).unwrap();
        let invalid = AccountsFile::load(&path).unwrap_err();
        assert_eq!(
            invalid.to_string(),
            format!(
                r#"{}: account name "a b" must be 1-64 ASCII letters, digits, '_', '-' or '.'"#,
                path.display()
            )
        );
        AccountsFile {
            accounts: vec![acme()],
        }
        .save(&path)
        .unwrap();
        let mut file = AccountsFile::load(&path).unwrap();
        assert!(file.account_mut("acme").is_ok());
        assert_eq!(
            file.account_mut("nobody").unwrap_err().to_string(),
            r#"no account "nobody""#
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn bad_configs_say_which_setting() {
        let refused = |config: AccountsConfig| async move {
            Store::from_config(&config).await.unwrap_err().to_string()
        };
        assert_eq!(
            refused(AccountsConfig {
                store: StoreKind::Single,
                account: "a b".into(),
                access_code: "long-enough".into(),
                ..AccountsConfig::default()
            })
            .await,
            r#"accounts.account: account name "a b" must be 1-64 ASCII letters, digits, '_', '-' or '.'"#
        );
        assert_eq!(
            refused(AccountsConfig {
                store: StoreKind::Single,
                account: "acme".into(),
                access_code: "short".into(),
                ..AccountsConfig::default()
            })
            .await,
            "accounts.access_code: must be at least 8 characters \
             (RELAYMESH_ACCESS_CODE or the config file)"
        );
        assert_eq!(
            refused(AccountsConfig {
                store: StoreKind::File,
                ..AccountsConfig::default()
            })
            .await,
            "accounts.path: must be set for the file store"
        );
    }
}
