//! `coordinator accounts ...`: manage the accounts of a `file` or `sql` store from the command
//! line. Codes are generated here, printed once and stored only as argon2 hashes. A running
//! coordinator sees the changes without a restart (the file store reloads, the sql store reads
//! at each login).

use std::path::PathBuf;

use clap::Subcommand;

use crate::accounts::{
    AccessCode, Account, AccountsConfig, AccountsFile, PublicKey, RoleRules, StoreError, StoreKind,
    check_name, hash_code, new_code,
};
use crate::sql::SqlStore;

/// What to do to the accounts.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// List accounts, their codes (by id) and roles.
    List,
    /// Create an account (enabled, no codes, no roles: any role may log in).
    Create {
        /// The account name.
        name: String,
        /// Give each group its own topics inside the account.
        #[arg(long)]
        isolate_groups: bool,
    },
    /// Let an account log in again.
    Enable {
        /// The account name.
        name: String,
    },
    /// Refuse the account's logins (sessions already open are not cut).
    Disable {
        /// The account name.
        name: String,
    },
    /// Generate an access code, print it once and store its hash.
    AddCode {
        /// The account name.
        name: String,
        /// Names the code so it can be revoked later [default: code-N].
        #[arg(long)]
        id: Option<String>,
        /// A group the code may act in (repeat for more); without any, every group.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Revoke an access code by id.
    RevokeCode {
        /// The account name.
        name: String,
        /// The code's id (see `list`).
        id: String,
    },
    /// Register an Ed25519 public key (64 hex digits, e.g. from `meshctl keygen`).
    AddKey {
        /// The account name.
        name: String,
        /// The public key in hex.
        key: String,
        /// Names the key so it can be revoked later [default: key-N].
        #[arg(long)]
        id: Option<String>,
        /// A group the key may act in (repeat for more); without any, every group.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Revoke a public key by id.
    RevokeKey {
        /// The account name.
        name: String,
        /// The key's id (see `list`).
        id: String,
    },
    /// Create or replace a role's rules (once an account has roles, logins must name one).
    SetRole {
        /// The account name.
        name: String,
        /// The role.
        role: String,
        /// Topic filter the role may publish to (repeat for more; `+` one level, `#` the rest).
        #[arg(long)]
        publish: Vec<String>,
        /// Topic filter the role may subscribe to (repeat for more).
        #[arg(long)]
        subscribe: Vec<String>,
    },
    /// Remove a role.
    RemoveRole {
        /// The account name.
        name: String,
        /// The role.
        role: String,
    },
    /// List an account's nodes (registered, and key nodes that stored their details).
    Nodes {
        /// The account name.
        name: String,
    },
    /// Revoke a node's token: it no longer logs in (sessions already open are not cut).
    RevokeNode {
        /// The account name.
        name: String,
        /// The node id (see `nodes`).
        id: String,
    },
}

/// Where the accounts live.
#[derive(Debug)]
pub enum Backend {
    /// A JSON file (created by the first `create`).
    File(PathBuf),
    /// A database.
    Sql(SqlStore),
}

impl Backend {
    /// The store a running coordinator uses, to change through its admin API.
    pub(crate) fn of(store: &crate::accounts::Store) -> Result<Self, StoreError> {
        match store {
            crate::accounts::Store::File { path, .. } => Ok(Self::File(path.clone())),
            crate::accounts::Store::Sql(db) => Ok(Self::Sql(db.clone())),
            crate::accounts::Store::Open | crate::accounts::Store::Single { .. } => {
                Err(StoreError::NotManaged)
            }
        }
    }

    /// Every account (for the admin API's `ListAccounts`).
    pub(crate) async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let _turn = match self {
            Self::File(path) => Some(FileTurn::take(path).await?),
            Self::Sql(_) => None,
        };
        self.list().await
    }

    /// Opens the store named by an `[accounts]` config.
    pub async fn open(config: &AccountsConfig) -> Result<Self, StoreError> {
        match config.store {
            StoreKind::File => Ok(Self::File(
                config.path.clone().ok_or_else(crate::accounts::no_path)?,
            )),
            StoreKind::Sql => Ok(Self::Sql(SqlStore::connect(&config.url).await?)),
            StoreKind::Open | StoreKind::Single => Err(StoreError::NotManaged),
        }
    }

    fn load_file(path: &std::path::Path) -> Result<AccountsFile, StoreError> {
        if path.exists() {
            AccountsFile::load(path)
        } else {
            Ok(AccountsFile::default())
        }
    }

    async fn list(&self) -> Result<Vec<Account>, StoreError> {
        match self {
            Self::File(path) => Ok(Self::load_file(path)?.accounts),
            Self::Sql(db) => db.accounts().await,
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Account>, StoreError> {
        Ok(self.list().await?.into_iter().find(|a| a.name == name))
    }

    async fn put(&self, account: Account) -> Result<(), StoreError> {
        match self {
            Self::File(path) => {
                let mut file = Self::load_file(path)?;
                match file.accounts.iter_mut().find(|a| a.name == account.name) {
                    Some(slot) => *slot = account,
                    None => file.accounts.push(account),
                }
                file.save(path)
            }
            Self::Sql(db) => db.put(&account).await,
        }
    }

    async fn existing(&self, name: &str) -> Result<Account, StoreError> {
        self.get(name)
            .await?
            .ok_or_else(|| StoreError::NoAccount(name.to_owned()))
    }

    /// Carries out `command`; returns what to print. Commands on one file store take turns (a
    /// lock file beside it); on a database, enabling, disabling and revoking are single
    /// statements, so a revocation is never undone by a command running at the same time.
    pub async fn run(&self, command: AdminCommand) -> Result<String, StoreError> {
        let _turn = match self {
            Self::File(path) => Some(FileTurn::take(path).await?),
            Self::Sql(_) => None,
        };
        self.apply(command).await
    }

    async fn apply(&self, command: AdminCommand) -> Result<String, StoreError> {
        match command {
            AdminCommand::List => Ok(self.list().await?.iter().map(describe).collect()),
            AdminCommand::Create {
                name,
                isolate_groups,
            } => {
                check_name("account", &name)?;
                if self.get(&name).await?.is_some() {
                    return Err(StoreError::AccountExists(name));
                }
                self.put(Account {
                    name: name.clone(),
                    enabled: true,
                    isolate_groups,
                    access_codes: Vec::new(),
                    public_keys: Vec::new(),
                    roles: Default::default(),
                    nodes: Vec::new(),
                })
                .await?;
                Ok(format!("created account {name}\n"))
            }
            AdminCommand::Enable { name } => self.set_enabled(&name, true).await,
            AdminCommand::Disable { name } => self.set_enabled(&name, false).await,
            AdminCommand::AddCode { name, id, groups } => {
                for g in &groups {
                    check_name("group", g)?;
                }
                let mut account = self.existing(&name).await?;
                let id = id.unwrap_or_else(|| format!("code-{}", account.access_codes.len() + 1));
                check_name("code id", &id)?;
                if account.access_codes.iter().any(|c| c.id == id) {
                    return Err(StoreError::EntryExists {
                        account: name,
                        what: "code",
                        id,
                    });
                }
                let code = new_code();
                account.access_codes.push(AccessCode {
                    id: id.clone(),
                    hash: hash_code(&code)?,
                    revoked: false,
                    groups,
                });
                self.put(account).await?;
                // The only time the code is shown: only its hash is stored.
                Ok(format!("{code}\n"))
            }
            AdminCommand::RevokeCode { name, id } => {
                if let Self::Sql(db) = self {
                    revoke_in_db(db, "access_codes", &name, &id).await?;
                } else {
                    let mut account = self.existing(&name).await?;
                    let code = account
                        .access_codes
                        .iter_mut()
                        .find(|c| c.id == id)
                        .ok_or_else(|| no_entry(&name, "code", &id))?;
                    code.revoked = true;
                    self.put(account).await?;
                }
                Ok(format!("revoked code {id} of {name}\n"))
            }
            AdminCommand::AddKey {
                name,
                key,
                id,
                groups,
            } => {
                for g in &groups {
                    check_name("group", g)?;
                }
                let mut account = self.existing(&name).await?;
                let id = id.unwrap_or_else(|| format!("key-{}", account.public_keys.len() + 1));
                check_name("key id", &id)?;
                if account.public_keys.iter().any(|k| k.id == id) {
                    return Err(StoreError::EntryExists {
                        account: name,
                        what: "key",
                        id,
                    });
                }
                account.public_keys.push(PublicKey {
                    id: id.clone(),
                    key: key.to_ascii_lowercase(),
                    revoked: false,
                    groups,
                });
                // The key is checked with the whole account before anything is written.
                AccountsFile {
                    accounts: vec![account.clone()],
                }
                .check()?;
                self.put(account).await?;
                Ok(format!("added key {id} to {name}\n"))
            }
            AdminCommand::RevokeKey { name, id } => {
                if let Self::Sql(db) = self {
                    revoke_in_db(db, "public_keys", &name, &id).await?;
                } else {
                    let mut account = self.existing(&name).await?;
                    let key = account
                        .public_keys
                        .iter_mut()
                        .find(|k| k.id == id)
                        .ok_or_else(|| no_entry(&name, "key", &id))?;
                    key.revoked = true;
                    self.put(account).await?;
                }
                Ok(format!("revoked key {id} of {name}\n"))
            }
            AdminCommand::SetRole {
                name,
                role,
                publish,
                subscribe,
            } => {
                check_name("role", &role)?;
                let mut account = self.existing(&name).await?;
                account
                    .roles
                    .insert(role.clone(), RoleRules { publish, subscribe });
                // Filters are checked with the whole account before anything is written.
                AccountsFile {
                    accounts: vec![account.clone()],
                }
                .check()?;
                self.put(account).await?;
                Ok(format!("set role {role} of {name}\n"))
            }
            AdminCommand::Nodes { name } => {
                let nodes = match self {
                    Self::File(_) => self.existing(&name).await?.nodes,
                    Self::Sql(db) => {
                        self.existing(&name).await?;
                        db.nodes(&name).await?
                    }
                };
                let mut out = String::new();
                for n in &nodes {
                    // Only the sql store keeps inboxes.
                    let inbox = match self {
                        Self::Sql(db) => format!("\tinbox {}", db.inbox_count(&n.id).await?),
                        Self::File(_) => String::new(),
                    };
                    let or_dash = |s: &str| {
                        if s.is_empty() {
                            "-".to_owned()
                        } else {
                            s.to_owned()
                        }
                    };
                    out += &format!(
                        "{}\t{}{}\trole {}\tgroup {}\tname {:?}\tlocation {:?}\tinfo {}{inbox}\n",
                        n.id,
                        if n.token_hash.is_empty() {
                            "key"
                        } else {
                            "token"
                        },
                        if n.revoked { " (revoked)" } else { "" },
                        or_dash(&n.role),
                        or_dash(&n.group),
                        n.name,
                        n.location,
                        n.info,
                    );
                }
                Ok(out)
            }
            AdminCommand::RevokeNode { name, id } => {
                let revoked = match self {
                    Self::Sql(db) => db.revoke_node(&name, &id).await?,
                    Self::File(path) => {
                        let mut file = Self::load_file(path)?;
                        let account = file.account_mut(&name)?;
                        match account.nodes.iter_mut().find(|n| n.id == id) {
                            Some(node) => {
                                node.revoked = true;
                                file.save(path)?;
                                true
                            }
                            None => false,
                        }
                    }
                };
                if !revoked {
                    return Err(no_entry(&name, "node", &id));
                }
                Ok(format!("revoked node {id} of {name}\n"))
            }
            AdminCommand::RemoveRole { name, role } => {
                let mut account = self.existing(&name).await?;
                if account.roles.remove(&role).is_none() {
                    return Err(no_entry(&name, "role", &role));
                }
                // An account without roles has no rules: removing the last one would lift
                // every restriction at once.
                if account.roles.is_empty() {
                    return Err(StoreError::LastRole {
                        account: name,
                        role,
                    });
                }
                self.put(account).await?;
                Ok(format!("removed role {role} of {name}\n"))
            }
        }
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<String, StoreError> {
        match self {
            Self::Sql(db) => {
                if !db.set_enabled(name, enabled).await? {
                    return Err(StoreError::NoAccount(name.to_owned()));
                }
            }
            Self::File(_) => {
                let mut account = self.existing(name).await?;
                account.enabled = enabled;
                self.put(account).await?;
            }
        }
        Ok(format!(
            "{} account {name}\n",
            if enabled { "enabled" } else { "disabled" }
        ))
    }
}

/// Revokes entry `id` of account `name` in `table` (`access_codes` or `public_keys`) with one
/// statement.
async fn revoke_in_db(db: &SqlStore, table: &str, name: &str, id: &str) -> Result<(), StoreError> {
    if db.revoke(table, name, id).await? {
        Ok(())
    } else {
        let what = if table == "public_keys" {
            "key"
        } else {
            "code"
        };
        Err(no_entry(name, what, id))
    }
}

/// Account `account` has no `what` (`code`, `key` or `role`) called `id`.
fn no_entry(account: &str, what: &'static str, id: &str) -> StoreError {
    StoreError::NoEntry {
        account: account.to_owned(),
        what,
        id: id.to_owned(),
    }
}

/// A turn at changing a file store: a lock file beside it, created exclusively and removed on
/// drop. One left behind by a crashed command is taken over after [`STALE_TURN`].
pub(crate) struct FileTurn(PathBuf);

/// How long a lock file may stand before it is taken to be left over from a crash.
const STALE_TURN: std::time::Duration = std::time::Duration::from_secs(30);

impl FileTurn {
    pub(crate) async fn take(path: &std::path::Path) -> Result<Self, StoreError> {
        let lock = path.with_extension("json.lock");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(_) => return Ok(Self(lock)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&lock)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TURN));
                    if stale {
                        let _ = std::fs::remove_file(&lock);
                        continue;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked(lock));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(error) => return Err(StoreError::Write { path: lock, error }),
            }
        }
    }
}

impl Drop for FileTurn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn describe(a: &Account) -> String {
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let named =
        |id: &str, revoked: bool| format!("{id}{}", if revoked { " (revoked)" } else { "" });
    let codes = a
        .access_codes
        .iter()
        .map(|c| named(&c.id, c.revoked))
        .collect();
    let keys = a
        .public_keys
        .iter()
        .map(|k| named(&k.id, k.revoked))
        .collect();
    let roles: Vec<String> = a
        .roles
        .iter()
        .map(|(role, r)| {
            format!(
                "{role} [publish {}; subscribe {}]",
                r.publish.join(" "),
                r.subscribe.join(" ")
            )
        })
        .collect();
    format!(
        "{}\t{}{}\tcodes: {}\tkeys: {}\troles: {}\n",
        a.name,
        if a.enabled { "enabled" } else { "disabled" },
        if a.isolate_groups {
            ", groups isolated"
        } else {
            ""
        },
        list(codes),
        list(keys),
        if roles.is_empty() {
            "any".into()
        } else {
            roles.join(", ")
        },
    )
}

/// `coordinator accounts --admin URL`: a command carried out by a running coordinator through
/// its admin API.
pub mod remote {
    use relaymesh_proto::admin::admin_client::AdminClient;
    use relaymesh_proto::admin::{
        AccountEntry, AccountName, AddAccessCodeRequest, AddPublicKeyRequest, CreateAccountRequest,
        ListAccountsRequest, SetRoleRequest,
    };
    pub use relaymesh_proto::admin_client::AdminTls;
    use relaymesh_proto::admin_client::ConnectError;

    use super::AdminCommand;

    /// Why a command could not be carried out through the admin API.
    #[derive(Debug, thiserror::Error)]
    pub enum RemoteError {
        /// No channel to the admin API (a bad URL, an unreadable CA file, nothing there).
        #[error(transparent)]
        Connect(#[from] ConnectError),
        /// The token cannot be sent as a header.
        #[error("RELAYMESH_ADMIN_TOKEN is not a valid header value")]
        Token,
        /// The coordinator refused or failed the call.
        #[error("{:?}: {}", .0.code(), .0.message())]
        Status(#[from] tonic::Status),
    }

    /// Carries out `command` on the coordinator whose admin API is at `url`, with bearer
    /// `token`; returns what to print (what the command prints against the store itself).
    pub async fn run(
        url: &str,
        token: &str,
        tls: &AdminTls,
        command: AdminCommand,
    ) -> Result<String, RemoteError> {
        let channel = relaymesh_proto::admin_client::connect(url, tls).await?;
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| RemoteError::Token)?;
        let mut admin =
            AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", bearer.clone());
                Ok(req)
            });
        let entry = |account: String, id: String| AccountEntry { account, id };
        let reply = match command {
            AdminCommand::List => {
                return Ok(admin
                    .list_accounts(ListAccountsRequest {})
                    .await?
                    .into_inner()
                    .text);
            }
            AdminCommand::Create {
                name,
                isolate_groups,
            } => {
                admin
                    .create_account(CreateAccountRequest {
                        account: name,
                        isolate_groups,
                    })
                    .await?
            }
            AdminCommand::Enable { name } => {
                admin.enable_account(AccountName { account: name }).await?
            }
            AdminCommand::Disable { name } => {
                admin.disable_account(AccountName { account: name }).await?
            }
            AdminCommand::AddCode { name, id, groups } => {
                admin
                    .add_access_code(AddAccessCodeRequest {
                        account: name,
                        id: id.unwrap_or_default(),
                        groups,
                    })
                    .await?
            }
            AdminCommand::RevokeCode { name, id } => {
                admin.revoke_access_code(entry(name, id)).await?
            }
            AdminCommand::AddKey {
                name,
                key,
                id,
                groups,
            } => {
                admin
                    .add_public_key(AddPublicKeyRequest {
                        account: name,
                        key,
                        id: id.unwrap_or_default(),
                        groups,
                    })
                    .await?
            }
            AdminCommand::RevokeKey { name, id } => {
                admin.revoke_public_key(entry(name, id)).await?
            }
            AdminCommand::SetRole {
                name,
                role,
                publish,
                subscribe,
            } => {
                admin
                    .set_role(SetRoleRequest {
                        account: name,
                        role,
                        publish,
                        subscribe,
                    })
                    .await?
            }
            AdminCommand::RemoveRole { name, role } => admin.remove_role(entry(name, role)).await?,
            AdminCommand::Nodes { name } => admin.list_nodes(AccountName { account: name }).await?,
            AdminCommand::RevokeNode { name, id } => admin.revoke_node(entry(name, id)).await?,
        };
        Ok(reply.into_inner().text)
    }
}
