//! Presence on a comm server: the node sessions it holds, which it reports to the coordinator
//! (all of them after each registration, then changes as they happen), and its copy of the
//! cluster's directory of online nodes, kept up to date by the coordinator, which answers
//! `ListNodes` and becomes the events of `@presence` subscribers.

use std::collections::HashMap;

use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, PresenceChange};
use std::sync::Mutex;

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    local: Mutex<Local>,
    /// A session opened or closed since the last report.
    pub(crate) changed: tokio::sync::Notify,
    /// Online nodes of the cluster by scope, then node id.
    directory: Mutex<HashMap<String, HashMap<String, v1::NodeInfo>>>,
}

/// This server's node sessions, and the changes not yet reported.
#[derive(Debug, Default)]
struct Local {
    sessions: HashMap<u64, v1::NodeSession>,
    opened: Vec<v1::NodeSession>,
    closed: Vec<v1::NodeSession>,
}

impl Presence {
    /// Session `session` of a node opened (its node topic is in force).
    pub(crate) fn opened(&self, session: u64, node: v1::NodeSession) {
        let mut local = lock(&self.local);
        local.opened.push(node.clone());
        local.sessions.insert(session, node);
        drop(local);
        self.changed.notify_one();
    }

    /// Session `session` closed (if it was a node's).
    pub(crate) fn closed(&self, session: u64) {
        let mut local = lock(&self.local);
        let Some(node) = local.sessions.remove(&session) else {
            return;
        };
        // Opened and closed before any report: the coordinator need not hear of it, and must
        // not hear of the close before the open.
        let before = local.opened.len();
        local
            .opened
            .retain(|o| !(o.alias == node.alias && o.node_id == node.node_id));
        if local.opened.len() == before {
            local.closed.push(node);
        }
        drop(local);
        self.changed.notify_one();
    }

    /// Every node session here, for the coordinator after registering (pending changes are
    /// part of it).
    pub(crate) fn full_report(&self) -> v1::NodeSessions {
        let mut local = lock(&self.local);
        local.opened.clear();
        local.closed.clear();
        v1::NodeSessions {
            full: true,
            opened: local.sessions.values().cloned().collect(),
            closed: Vec::new(),
        }
    }

    /// The changes since the last report, if any.
    pub(crate) fn take_changes(&self) -> Option<v1::NodeSessions> {
        let mut local = lock(&self.local);
        if local.opened.is_empty() && local.closed.is_empty() {
            return None;
        }
        Some(v1::NodeSessions {
            full: false,
            opened: std::mem::take(&mut local.opened),
            closed: std::mem::take(&mut local.closed),
        })
    }

    /// Applies the coordinator's `NodePresence` to this server's copy. Returns the events for
    /// `@presence` subscribers, by scope (none for a snapshot, which only brings the copy up to
    /// date).
    pub(crate) fn apply(&self, presence: v1::NodePresence) -> Vec<(String, v1::PresenceEvent)> {
        let mut events = Vec::new();
        let mut updated = Vec::new();
        {
            let mut directory = lock(&self.directory);
            if presence.snapshot {
                directory.clear();
            }
            for entry in presence.entries {
                let change = entry.change();
                let Some(node) = entry.node else { continue };
                let scope = directory.entry(entry.scope.clone()).or_default();
                if change == PresenceChange::Offline {
                    scope.remove(&node.node_id);
                    if scope.is_empty() {
                        directory.remove(&entry.scope);
                    }
                } else {
                    if change == PresenceChange::Updated {
                        updated.push((entry.scope.clone(), node.clone()));
                    }
                    scope.insert(node.node_id.clone(), node.clone());
                }
                if !presence.snapshot {
                    events.push((
                        entry.scope,
                        v1::PresenceEvent {
                            change: change as i32,
                            node: Some(node),
                        },
                    ));
                }
            }
        }
        // Sessions here report the newest details after a coordinator restart.
        if !updated.is_empty() {
            let mut local = lock(&self.local);
            for session in local.sessions.values_mut() {
                if let Some((_, node)) = updated
                    .iter()
                    .find(|(scope, n)| *scope == session.scope && n.node_id == session.node_id)
                {
                    session.name.clone_from(&node.name);
                    session.location.clone_from(&node.location);
                    session.info.clone_from(&node.info);
                }
            }
        }
        events
    }

    /// Up to `limit` online nodes of `scope`, chosen at random among those whose name or
    /// location contains `filter` (ASCII case-insensitive), and how many match.
    pub(crate) fn list(&self, scope: &str, limit: usize, filter: &str) -> (Vec<v1::NodeInfo>, u64) {
        let filter = filter.to_ascii_lowercase();
        let matches = |n: &v1::NodeInfo| {
            filter.is_empty()
                || n.name.to_ascii_lowercase().contains(&filter)
                || n.location.to_ascii_lowercase().contains(&filter)
        };
        let directory = lock(&self.directory);
        let Some(nodes) = directory.get(scope) else {
            return (Vec::new(), 0);
        };
        // Reservoir sampling: each match is equally likely to be in the sample.
        let mut rng = rand::rng();
        let mut sample: Vec<&v1::NodeInfo> = Vec::with_capacity(limit.min(nodes.len()));
        let mut seen = 0u64;
        for node in nodes.values().filter(|n| matches(n)) {
            seen += 1;
            if sample.len() < limit {
                sample.push(node);
            } else if limit > 0 {
                let slot = rand::RngExt::random_range(&mut rng, 0..seen);
                if let Ok(slot) = usize::try_from(slot)
                    && slot < limit
                {
                    sample[slot] = node;
                }
            }
        }
        (sample.into_iter().cloned().collect(), seen)
    }

    /// This server's sessions of node `node_id` of `scope`.
    pub(crate) fn sessions_of(&self, scope: &str, node_id: &str) -> Vec<u64> {
        lock(&self.local)
            .sessions
            .iter()
            .filter(|(_, s)| s.scope == scope && s.node_id == node_id)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Online nodes in this server's copy, all scopes.
    pub(crate) fn online(&self) -> usize {
        lock(&self.directory).values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, name: &str) -> v1::NodeInfo {
        v1::NodeInfo {
            node_id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn entry(id: &str, change: PresenceChange) -> v1::NodeEntry {
        v1::NodeEntry {
            scope: "acme".into(),
            node: Some(node(id, &format!("drone {id}"))),
            change: change as i32,
        }
    }

    #[test]
    fn a_session_closed_before_it_was_reported_is_never_reported() {
        let p = Presence::default();
        let session = v1::NodeSession {
            node_id: "n".into(),
            alias: "a".into(),
            ..Default::default()
        };
        p.opened(1, session.clone());
        p.opened(
            2,
            v1::NodeSession {
                alias: "b".into(),
                ..session.clone()
            },
        );
        p.closed(1);
        let changes = p.take_changes().unwrap();
        assert_eq!((changes.opened.len(), changes.closed.len()), (1, 0));
        p.closed(2);
        let changes = p.take_changes().unwrap();
        assert_eq!((changes.opened.len(), changes.closed.len()), (0, 1));
        assert!(p.take_changes().is_none());
        assert!(p.full_report().opened.is_empty());
    }

    #[test]
    fn the_copy_follows_changes_and_lists_a_capped_filtered_sample() {
        let p = Presence::default();
        let snapshot = v1::NodePresence {
            snapshot: true,
            entries: (0..50)
                .map(|i| entry(&i.to_string(), PresenceChange::Online))
                .collect(),
        };
        assert!(p.apply(snapshot).is_empty(), "a snapshot is no event");
        assert_eq!(p.online(), 50);
        let events = p.apply(v1::NodePresence {
            snapshot: false,
            entries: vec![
                entry("7", PresenceChange::Offline),
                entry("x", PresenceChange::Online),
            ],
        });
        assert_eq!(events.len(), 2);
        assert_eq!(p.online(), 50);
        let (nodes, total) = p.list("acme", 10, "");
        assert_eq!((nodes.len(), total), (10, 50));
        let (nodes, total) = p.list("acme", 10, "DRONE 4");
        assert_eq!((nodes.len(), total), (10, 11), "4 and 40-49");
        let (nodes, total) = p.list("other", 10, "");
        assert_eq!((nodes.len(), total), (0, 0));
        assert!(
            p.list("acme", 100, "drone 7")
                .0
                .iter()
                .all(|n| n.node_id != "7")
        );
    }
}
