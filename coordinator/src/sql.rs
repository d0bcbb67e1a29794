//! The `sql` account store: accounts in SQLite (a file, created and migrated on first start;
//! the default) or PostgreSQL (by URL), through sqlx's `Any` driver so one set of queries and
//! migrations serves both. Migrations (`coordinator/migrations/`) are versioned and run
//! automatically on connect.

use std::collections::BTreeMap;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row as _};

use crate::accounts::{AccessCode, Account, PublicKey, RoleRules, StoreError};
use crate::inbox::InboxLimits;
use crate::nodes::{Node, TokenNode};
use relaymesh_proto::v1::{self, ErrorCode};
use std::collections::HashMap;

/// Nodes looked up per statement, and inbox rows written per statement (10 parameters each:
/// well within SQLite's and PostgreSQL's limits on parameters).
/// (SQLite finds a parameter by a linear search, so a statement's cost grows with the square of
/// its parameters: these keep statements short.)
const NODES_PER_STATEMENT: usize = 64;
const ROWS_PER_INSERT: usize = 32;

/// `$first, $first+1, ...`: `n` numbered parameters.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Milliseconds as stored (BIGINT).
fn millis(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Connections kept open to the database.
const POOL_SIZE: u32 = 8;

/// A JSON list of names, as stored.
fn json_list(names: &[String]) -> String {
    serde_json::to_string(names).unwrap_or_else(|_| "[]".into())
}

/// A stored JSON list of names (an unreadable one is empty: no restriction is invented).
fn groups(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// An inbox message deleted unread for its age ([`SqlStore::inbox_expire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredMessage {
    /// The recipient's (and so the sender's) scope; empty if the recipient is gone.
    pub scope: String,
    /// The sending node (empty: the sender was not a node).
    pub from_node: String,
    /// What its sender is told.
    pub message: v1::Expired,
}

/// A connected, migrated account database.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    /// PostgreSQL (rows can be locked: several coordinators may share it), not SQLite.
    postgres: bool,
}

/// A database error, with what was being done.
fn failed(what: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Database(format!("{what}: {e}"))
}

impl SqlStore {
    /// Connects to `url` (`sqlite://FILE` or `postgres://...`) and brings the schema up to
    /// date. A SQLite file is created if missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let url = if url.starts_with("sqlite:") && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect(&url)
            .await
            .map_err(failed("connecting to the account database"))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(format!("migrating the account database: {e}")))?;
        Ok(Self {
            pool,
            postgres: url.starts_with("postgres"),
        })
    }

    /// The account called `name`, with its codes, keys and roles, read in one transaction (so
    /// never half of a change), and checked like a file's.
    pub async fn account(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(failed("starting a transaction"))?;
        let account = Self::read(&mut tx, name).await?;
        tx.commit().await.map_err(failed("reading an account"))?;
        if let Some(account) = &account {
            crate::accounts::AccountsFile {
                accounts: vec![account.clone()],
            }
            .check()
            .map_err(|e| StoreError::Database(format!("stored account is not valid: {e}")))?;
        }
        Ok(account)
    }

    async fn read(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        name: &str,
    ) -> Result<Option<Account>, StoreError> {
        let Some(row) = sqlx::query("SELECT enabled, isolate_groups FROM accounts WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(failed("reading an account"))?
        else {
            return Ok(None);
        };
        let flag = |i: usize| row.try_get::<i64, _>(i).map(|v| v != 0);
        let (enabled, isolate_groups) = (
            flag(0).map_err(failed("reading an account"))?,
            flag(1).map_err(failed("reading an account"))?,
        );
        let codes = sqlx::query(
            "SELECT id, hash, revoked, groups FROM access_codes WHERE account = $1 ORDER BY id",
        )
        .bind(name)
        .fetch_all(&mut **tx)
        .await
        .map_err(failed("reading access codes"))?;
        let access_codes = codes
            .iter()
            .map(|r| {
                Ok(AccessCode {
                    id: r.try_get(0)?,
                    hash: r.try_get(1)?,
                    revoked: r.try_get::<i64, _>(2)? != 0,
                    groups: groups(&r.try_get::<String, _>(3)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(failed("reading access codes"))?;
        let keys = sqlx::query(
            "SELECT id, key, revoked, groups FROM public_keys WHERE account = $1 ORDER BY id",
        )
        .bind(name)
        .fetch_all(&mut **tx)
        .await
        .map_err(failed("reading public keys"))?;
        let public_keys = keys
            .iter()
            .map(|r| {
                Ok(PublicKey {
                    id: r.try_get(0)?,
                    key: r.try_get(1)?,
                    revoked: r.try_get::<i64, _>(2)? != 0,
                    groups: groups(&r.try_get::<String, _>(3)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(failed("reading public keys"))?;
        let role_rows =
            sqlx::query("SELECT role, publish, subscribe FROM roles WHERE account = $1")
                .bind(name)
                .fetch_all(&mut **tx)
                .await
                .map_err(failed("reading roles"))?;
        let mut roles = BTreeMap::new();
        for r in &role_rows {
            let role: String = r.try_get(0).map_err(failed("reading roles"))?;
            let list = |i: usize| -> Result<Vec<String>, StoreError> {
                let text: String = r.try_get(i).map_err(failed("reading roles"))?;
                serde_json::from_str(&text)
                    .map_err(|e| StoreError::Database(format!("role {role:?}: {e}")))
            };
            roles.insert(
                role.clone(),
                RoleRules {
                    publish: list(1)?,
                    subscribe: list(2)?,
                },
            );
        }
        Ok(Some(Account {
            name: name.to_owned(),
            enabled,
            isolate_groups,
            access_codes,
            public_keys,
            roles,
            // Read on their own (`node`, `nodes`): an account may have many.
            nodes: Vec::new(),
        }))
    }

    /// Every account, by name.
    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let names: Vec<String> = sqlx::query("SELECT name FROM accounts ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(failed("listing accounts"))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(failed("listing accounts"))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.extend(self.account(&name).await?);
        }
        Ok(out)
    }

    /// Writes `account` (creating or replacing it, codes and roles included) in one
    /// transaction.
    pub async fn put(&self, account: &Account) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(failed("starting a transaction"))?;
        sqlx::query(
            "INSERT INTO accounts (name, enabled, isolate_groups) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled, \
             isolate_groups = excluded.isolate_groups",
        )
        .bind(&account.name)
        .bind(i64::from(account.enabled))
        .bind(i64::from(account.isolate_groups))
        .execute(&mut *tx)
        .await
        .map_err(failed("writing an account"))?;
        for table in ["access_codes", "public_keys", "roles"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE account = $1"))
                .bind(&account.name)
                .execute(&mut *tx)
                .await
                .map_err(failed("writing an account"))?;
        }
        for code in &account.access_codes {
            sqlx::query(
                "INSERT INTO access_codes (account, id, hash, revoked, groups) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&account.name)
            .bind(&code.id)
            .bind(&code.hash)
            .bind(i64::from(code.revoked))
            .bind(json_list(&code.groups))
            .execute(&mut *tx)
            .await
            .map_err(failed("writing an access code"))?;
        }
        for key in &account.public_keys {
            sqlx::query(
                "INSERT INTO public_keys (account, id, key, revoked, groups) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&account.name)
            .bind(&key.id)
            .bind(&key.key)
            .bind(i64::from(key.revoked))
            .bind(json_list(&key.groups))
            .execute(&mut *tx)
            .await
            .map_err(failed("writing a public key"))?;
        }
        for (role, rules) in &account.roles {
            let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
            sqlx::query(
                "INSERT INTO roles (account, role, publish, subscribe) VALUES ($1, $2, $3, $4)",
            )
            .bind(&account.name)
            .bind(role)
            .bind(json(&rules.publish))
            .bind(json(&rules.subscribe))
            .execute(&mut *tx)
            .await
            .map_err(failed("writing a role"))?;
        }
        tx.commit().await.map_err(failed("committing an account"))
    }

    /// Sets an account's enabled flag; `false` when there is no such account.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE accounts SET enabled = $1 WHERE name = $2")
            .bind(i64::from(enabled))
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(failed("updating an account"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Revokes entry `id` of `account` in `table` (`access_codes` or `public_keys`); `false`
    /// when there is none.
    pub async fn revoke(&self, table: &str, account: &str, id: &str) -> Result<bool, StoreError> {
        let table = match table {
            "access_codes" => "access_codes",
            "public_keys" => "public_keys",
            other => {
                return Err(StoreError::Database(format!(
                    "no table {other:?} to revoke in"
                )));
            }
        };
        let done = sqlx::query(&format!(
            "UPDATE {table} SET revoked = 1 WHERE account = $1 AND id = $2"
        ))
        .bind(account)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(failed("revoking"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores a new node of `account`.
    pub async fn insert_node(&self, account: &str, node: &Node) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (id, account, role, grp, name, location, info, token_hash, \
             revoked, created_ms, updated_ms, scope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&node.id)
        .bind(account)
        .bind(&node.role)
        .bind(&node.group)
        .bind(&node.name)
        .bind(&node.location)
        .bind(&node.info)
        .bind(&node.token_hash)
        .bind(i64::from(node.revoked))
        .bind(millis(node.created_ms))
        .bind(millis(node.updated_ms))
        .bind(&node.scope)
        .execute(&self.pool)
        .await
        .map_err(failed("registering a node"))?;
        Ok(())
    }

    /// Replaces the name, location and info of node `node.id` of `account`, storing it if it
    /// is not stored yet (a key node); `false` when it is revoked or another account's.
    pub async fn update_node(&self, account: &str, node: &Node) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE nodes SET name = $1, location = $2, info = $3, updated_ms = $4 \
             WHERE id = $5 AND account = $6 AND revoked = 0",
        )
        .bind(&node.name)
        .bind(&node.location)
        .bind(&node.info)
        .bind(millis(node.updated_ms))
        .bind(&node.id)
        .bind(account)
        .execute(&self.pool)
        .await
        .map_err(failed("updating a node"))?;
        if done.rows_affected() > 0 {
            return Ok(true);
        }
        if self.node(&node.id).await?.is_some() {
            return Ok(false);
        }
        self.insert_node(account, node).await?;
        Ok(true)
    }

    /// Node `id`, with its account.
    pub(crate) async fn node(&self, id: &str) -> Result<Option<TokenNode>, StoreError> {
        let row = sqlx::query(
            "SELECT account, role, grp, name, location, info, token_hash, revoked, created_ms, \
             updated_ms, scope FROM nodes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(failed("reading a node"))?;
        let Some(r) = row else { return Ok(None) };
        let read = || -> Result<TokenNode, sqlx::Error> {
            Ok(TokenNode {
                account: r.try_get(0)?,
                node: Node {
                    id: id.to_owned(),
                    role: r.try_get(1)?,
                    group: r.try_get(2)?,
                    name: r.try_get(3)?,
                    location: r.try_get(4)?,
                    info: r.try_get(5)?,
                    token_hash: r.try_get(6)?,
                    revoked: r.try_get::<i64, _>(7)? != 0,
                    created_ms: u64::try_from(r.try_get::<i64, _>(8)?).unwrap_or(0),
                    updated_ms: u64::try_from(r.try_get::<i64, _>(9)?).unwrap_or(0),
                    scope: r.try_get(10)?,
                },
            })
        };
        read().map(Some).map_err(failed("reading a node"))
    }

    /// The nodes of `account`, by id.
    pub async fn nodes(&self, account: &str) -> Result<Vec<Node>, StoreError> {
        let ids: Vec<String> = sqlx::query("SELECT id FROM nodes WHERE account = $1 ORDER BY id")
            .bind(account)
            .fetch_all(&self.pool)
            .await
            .map_err(failed("listing nodes"))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(failed("listing nodes"))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.node(&id).await?.map(|n| n.node));
        }
        Ok(out)
    }

    /// Revokes node `id` of `account`; `false` when there is none.
    pub async fn revoke_node(&self, account: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE nodes SET revoked = 1 WHERE account = $1 AND id = $2")
            .bind(account)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(failed("revoking a node"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Records that node `node.id` of `account` logged in, in scope `node.scope`: stores a key
    /// node met for the first time, and keeps the scope its inbox takes messages from current.
    pub(crate) async fn touch_node(&self, account: &str, node: &Node) -> Result<(), StoreError> {
        match self.node(&node.id).await? {
            Some(stored) if stored.account != account => Ok(()),
            Some(stored) if stored.node.scope == node.scope => Ok(()),
            Some(_) => {
                sqlx::query("UPDATE nodes SET scope = $1 WHERE id = $2 AND account = $3")
                    .bind(&node.scope)
                    .bind(&node.id)
                    .bind(account)
                    .execute(&self.pool)
                    .await
                    .map_err(failed("updating a node"))?;
                Ok(())
            }
            None => self.insert_node(account, node).await,
        }
    }

    /// One group commit: deletes what nodes acknowledged (`done`: node id, up to) and stores
    /// `puts` within each node's limits, in one transaction. Returns, for each put, the id it
    /// was stored under, or the code of why not (`UNKNOWN_NODE`, `INBOX_FULL`).
    ///
    /// Ids count per node, from the node's row, which the transaction locks first (all its
    /// nodes, in id order, so two coordinators' commits wait for each other instead of
    /// deadlocking): in commit order whichever coordinator commits, and limits are checked
    /// against what the other coordinators committed.
    pub async fn inbox_commit(
        &self,
        done: &[(String, u64)],
        puts: &[&v1::InboxPut],
        limits: InboxLimits,
        now_ms: u64,
    ) -> Result<Vec<Result<u64, ErrorCode>>, StoreError> {
        let what = "storing direct messages";
        let mut tx = self.pool.begin().await.map_err(failed(what))?;
        // Every node of the batch, each read (and, in PostgreSQL, locked) once: the scope each
        // takes messages from, how full each inbox is, and its last id. A few statements per
        // batch, not per message.
        let mut distinct: Vec<&str> = puts
            .iter()
            .map(|p| p.to_node.as_str())
            .chain(done.iter().map(|(node, _)| node.as_str()))
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        let lock_rows = if self.postgres { " FOR UPDATE" } else { "" };
        let mut nodes: HashMap<&str, (String, u64, u64, u64)> = HashMap::new();
        for chunk in distinct.chunks(NODES_PER_STATEMENT) {
            let list = placeholders(1, chunk.len());
            let sql = format!(
                "SELECT id, scope, inbox_count, inbox_bytes, inbox_last, revoked FROM nodes \
                 WHERE id IN ({list}) ORDER BY id{lock_rows}"
            );
            let mut query = sqlx::query(&sql);
            for node in chunk {
                query = query.bind(*node);
            }
            for row in query.fetch_all(&mut *tx).await.map_err(failed(what))? {
                let id: String = row.try_get(0).map_err(failed(what))?;
                let scope: String = row.try_get(1).map_err(failed(what))?;
                let count: i64 = row.try_get(2).map_err(failed(what))?;
                let bytes: i64 = row.try_get(3).map_err(failed(what))?;
                let last: i64 = row.try_get(4).map_err(failed(what))?;
                let revoked: i64 = row.try_get(5).map_err(failed(what))?;
                if revoked != 0 {
                    continue;
                }
                if let Some(node) = chunk.iter().find(|n| **n == id) {
                    let used = |v: i64| u64::try_from(v).unwrap_or(0);
                    nodes.insert(node, (scope, used(count), used(bytes), used(last)));
                }
            }
        }
        for (node, up_to) in done {
            let gone = sqlx::query(
                "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM inbox \
                 WHERE node_id = $1 AND id <= $2",
            )
            .bind(node)
            .bind(millis(*up_to))
            .fetch_one(&mut *tx)
            .await
            .map_err(failed(what))?;
            let count: i64 = gone.try_get(0).map_err(failed(what))?;
            let bytes: i64 = gone.try_get(1).map_err(failed(what))?;
            if count == 0 {
                continue;
            }
            sqlx::query("DELETE FROM inbox WHERE node_id = $1 AND id <= $2")
                .bind(node)
                .bind(millis(*up_to))
                .execute(&mut *tx)
                .await
                .map_err(failed(what))?;
            sqlx::query(
                "UPDATE nodes SET inbox_count = inbox_count - $1, inbox_bytes = inbox_bytes - $2 \
                 WHERE id = $3",
            )
            .bind(count)
            .bind(bytes)
            .bind(node)
            .execute(&mut *tx)
            .await
            .map_err(failed(what))?;
            if let Some(entry) = nodes.get_mut(node.as_str()) {
                let less = |v: i64| u64::try_from(v).unwrap_or(0);
                entry.1 = entry.1.saturating_sub(less(count));
                entry.2 = entry.2.saturating_sub(less(bytes));
            }
        }
        let mut outcomes = Vec::with_capacity(puts.len());
        let mut rows = Vec::with_capacity(puts.len());
        // What each node's inbox gains, and its new last id.
        let mut added: HashMap<&str, (i64, i64, i64)> = HashMap::new();
        for put in puts {
            let Some((scope, count, bytes, last)) = nodes.get_mut(put.to_node.as_str()) else {
                outcomes.push(Err(ErrorCode::UnknownNode));
                continue;
            };
            // Another scope's sender learns nothing about this node.
            if *scope != put.scope {
                outcomes.push(Err(ErrorCode::UnknownNode));
                continue;
            }
            let size = put.payload.len() as u64;
            if *count >= limits.max_messages || *bytes + size > limits.max_bytes {
                outcomes.push(Err(ErrorCode::InboxFull));
                continue;
            }
            *count += 1;
            *bytes += size;
            *last += 1;
            let gain = added.entry(put.to_node.as_str()).or_default();
            gain.0 += 1;
            gain.1 += millis(size);
            gain.2 = millis(*last);
            rows.push((*last, *put));
            outcomes.push(Ok(*last));
        }
        // Usage and last ids of all the batch's nodes in one statement (per
        // `NODES_PER_STATEMENT`).
        let added: Vec<(&str, (i64, i64, i64))> = added.into_iter().collect();
        for chunk in added.chunks(NODES_PER_STATEMENT) {
            let case = |column: usize| -> String {
                (0..chunk.len())
                    .map(|i| {
                        format!(
                            "WHEN ${} THEN CAST(${} AS BIGINT)",
                            i * 4 + 1,
                            i * 4 + column
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let ids: Vec<String> = (0..chunk.len())
                .map(|i| format!("${}", i * 4 + 1))
                .collect();
            let sql = format!(
                "UPDATE nodes SET inbox_count = inbox_count + CASE id {} ELSE 0 END, \
                 inbox_bytes = inbox_bytes + CASE id {} ELSE 0 END, \
                 inbox_last = CASE id {} ELSE inbox_last END WHERE id IN ({})",
                case(2),
                case(3),
                case(4),
                ids.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for (node, (count, bytes, last)) in chunk {
                query = query.bind(*node).bind(*count).bind(*bytes).bind(*last);
            }
            query.execute(&mut *tx).await.map_err(failed(what))?;
        }
        // Many rows per INSERT.
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|r| format!("({})", placeholders(r * 10 + 1, 10)))
                .collect();
            let sql = format!(
                "INSERT INTO inbox (node_id, id, from_node, from_alias, from_role, seq, \
                 resent_from, payload, size, stored_ms) VALUES {}",
                values.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for (id, put) in chunk {
                query = query
                    .bind(&put.to_node)
                    .bind(millis(*id))
                    .bind(&put.from_node)
                    .bind(&put.from_alias)
                    .bind(&put.from_role)
                    .bind(millis(put.seq))
                    .bind(&put.resent_from)
                    .bind(put.payload.to_vec())
                    .bind(millis(put.payload.len() as u64))
                    .bind(millis(now_ms));
            }
            query.execute(&mut *tx).await.map_err(failed(what))?;
        }
        tx.commit().await.map_err(failed(what))?;
        Ok(outcomes)
    }

    /// Up to `limit` messages of node `node`'s inbox after id `after`, oldest first.
    pub async fn inbox_fetch(
        &self,
        node: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<v1::InboxMessage>, StoreError> {
        let what = "reading an inbox";
        let rows = sqlx::query(
            "SELECT id, from_node, from_alias, from_role, seq, resent_from, payload, stored_ms \
             FROM inbox WHERE node_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(node)
        .bind(millis(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(failed(what))?;
        rows.iter()
            .map(|r| {
                let number = |i: usize| {
                    r.try_get::<i64, _>(i)
                        .map(|v| u64::try_from(v).unwrap_or(0))
                };
                Ok(v1::InboxMessage {
                    id: number(0)?,
                    from_node: r.try_get(1)?,
                    from_alias: r.try_get(2)?,
                    from_role: r.try_get(3)?,
                    seq: number(4)?,
                    resent_from: r.try_get(5)?,
                    payload: r.try_get::<Vec<u8>, _>(6)?.into(),
                    stored_ms: number(7)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(failed(what))
    }

    /// Messages waiting in node `node`'s inbox (counted, not taken from its usage).
    pub async fn inbox_count(&self, node: &str) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM inbox WHERE node_id = $1")
            .bind(node)
            .fetch_one(&self.pool)
            .await
            .map_err(failed("reading an inbox"))?;
        let count: i64 = row.try_get(0).map_err(failed("reading an inbox"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Deletes the oldest inbox messages stored before `before_ms`, at most `limit` of them in
    /// one transaction (call again while it returns `limit`), and returns what it deleted, with
    /// each recipient's scope, so their senders can be told.
    pub async fn inbox_expire(
        &self,
        before_ms: u64,
        limit: u32,
    ) -> Result<Vec<ExpiredMessage>, StoreError> {
        let what = "expiring inbox messages";
        let mut tx = self.pool.begin().await.map_err(failed(what))?;
        let rows = sqlx::query(
            "DELETE FROM inbox WHERE (node_id, id) IN \
             (SELECT node_id, id FROM inbox WHERE stored_ms < $1 ORDER BY stored_ms LIMIT $2) \
             RETURNING node_id, id, from_node, from_alias, seq, resent_from, stored_ms",
        )
        .bind(millis(before_ms))
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(failed(what))?;
        let number = |v: i64| u64::try_from(v).unwrap_or(0);
        let mut expired = Vec::with_capacity(rows.len());
        for r in &rows {
            let from_alias: String = r.try_get(3).map_err(failed(what))?;
            let resent_from: String = r.try_get(5).map_err(failed(what))?;
            expired.push(ExpiredMessage {
                scope: String::new(),
                from_node: r.try_get(2).map_err(failed(what))?,
                message: v1::Expired {
                    to_node: r.try_get(0).map_err(failed(what))?,
                    inbox_id: number(r.try_get(1).map_err(failed(what))?),
                    seq: number(r.try_get(4).map_err(failed(what))?),
                    // The alias that numbered it: where it was first sent from.
                    publisher: if resent_from.is_empty() {
                        from_alias
                    } else {
                        resent_from
                    },
                    stored_ms: number(r.try_get(6).map_err(failed(what))?),
                },
            });
        }
        // The recipients: their scopes (a sender is in its recipient's scope), and their usage
        // counted afresh.
        let mut nodes: Vec<&str> = expired.iter().map(|e| e.message.to_node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut scopes: HashMap<String, String> = HashMap::new();
        for chunk in nodes.chunks(NODES_PER_STATEMENT) {
            let list = placeholders(1, chunk.len());
            let sql = format!(
                "UPDATE nodes SET \
                 inbox_count = (SELECT COUNT(*) FROM inbox WHERE inbox.node_id = nodes.id), \
                 inbox_bytes = (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM inbox \
                 WHERE inbox.node_id = nodes.id) \
                 WHERE id IN ({list}) RETURNING id, scope"
            );
            let mut query = sqlx::query(&sql);
            for node in chunk {
                query = query.bind(*node);
            }
            for row in query.fetch_all(&mut *tx).await.map_err(failed(what))? {
                scopes.insert(
                    row.try_get(0).map_err(failed(what))?,
                    row.try_get(1).map_err(failed(what))?,
                );
            }
        }
        tx.commit().await.map_err(failed(what))?;
        for e in &mut expired {
            if let Some(scope) = scopes.get(&e.message.to_node) {
                e.scope.clone_from(scope);
            }
        }
        Ok(expired)
    }

    /// Whether the database answers a query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .fetch_one(&self.pool)
            .await
            .map(|_| ())
            .map_err(failed("reaching the database"))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
