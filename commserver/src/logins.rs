//! Logins and their replacement: a login with a client id closes, with `REPLACED`, the sessions
//! of older logins of the same client (the coordinator announces it with `Replace`), and a key
//! reserved for an older login is refused when it comes in after the announcement.

use std::sync::Arc;
use std::time::Instant;

use relaymesh_net::link::LastWords;
use relaymesh_proto::{ErrorCode, error, v1};

use crate::Server;
use crate::routes::{ClientKey, Subscriber};

/// Whose login: account, role and client id.
pub(crate) type LoginOf = (String, String, String);

impl Server {
    /// Closes, with `REPLACED`, the sessions of `replace.client_id` in `replace.account` that
    /// come from logins older than `replace.seq`.
    pub(crate) fn replace(&self, replace: &v1::Replace) {
        // Remembered for a key's lifetime, so a key reserved for an older login and redeemed
        // after this notice is refused too (see `replaced_by`).
        {
            let mut newest = relaymesh_net::sync::lock(&self.newest_logins);
            let now = Instant::now();
            if newest.len() >= self.config.max_pending_keys {
                newest.retain(|_, (_, until)| *until > now);
            }
            let key = (
                replace.account.clone(),
                replace.role.clone(),
                replace.client_id.clone(),
            );
            let until = now + self.config.key_ttl();
            let entry = newest.entry(key).or_insert((replace.seq, until));
            if entry.0 <= replace.seq {
                *entry = (replace.seq, until);
            }
        }
        let older: Vec<Arc<Subscriber>> = relaymesh_net::sync::lock(&self.sessions)
            .values()
            .filter(|s| {
                s.client.as_ref().is_some_and(|c| {
                    *c.account == *replace.account
                        && *c.role == *replace.role
                        && *c.client_id == *replace.client_id
                        && c.seq < replace.seq
                })
            })
            .cloned()
            .collect();
        for session in older {
            self.stats.replaced.inc();
            session
                .closer
                .close(Some(LastWords::error::<v1::ServerToClient>(error(
                    ErrorCode::Replaced,
                    format!(
                        "a newer login of client {:?} replaced this session",
                        replace.client_id
                    ),
                ))));
        }
    }

    /// Whether a newer login of `client` has been announced: its session must not start.
    pub(crate) fn replaced_by(&self, client: &ClientKey) -> Option<u64> {
        let key = (
            client.account.to_string(),
            client.role.to_string(),
            client.client_id.to_string(),
        );
        relaymesh_net::sync::lock(&self.newest_logins)
            .get(&key)
            .filter(|(seq, until)| *seq > client.seq && *until > Instant::now())
            .map(|(seq, _)| *seq)
    }
}
