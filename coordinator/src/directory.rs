//! The directory of online nodes: which nodes of each scope have sessions, on which comm
//! servers, since when, with their name, location and info.
//!
//! The comm servers are its source of truth: each reports the node sessions it holds (all of
//! them after every registration, then each change), and a server that leaves the cluster (its
//! link closed or silent past the heartbeat timeout) takes its sessions with it. So the
//! directory is rebuilt by itself after a coordinator restart, as the servers register again.
//! The coordinator sends every change to every server, and a whole copy to each server that
//! registers; servers answer `ListNodes` and tell `@presence` subscribers from their copy.
//! Nothing here is stored: a node's stored details live in the account store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use relaymesh_proto::v1::{self, PresenceChange};

/// A node's scope and id.
type Key = (String, String);

/// One online node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    location: String,
    info: String,
    /// Its sessions: (server id, alias) -> opened at (ms since the epoch).
    sessions: BTreeMap<(String, String), u64>,
}

impl Entry {
    fn info(&self, node_id: &str) -> v1::NodeInfo {
        let servers: BTreeSet<&str> = self.sessions.keys().map(|(s, _)| s.as_str()).collect();
        v1::NodeInfo {
            node_id: node_id.to_owned(),
            name: self.name.clone(),
            location: self.location.clone(),
            info: self.info.clone(),
            since_ms: self.sessions.values().copied().min().unwrap_or(0),
            servers: servers.into_iter().map(str::to_owned).collect(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    nodes: HashMap<Key, Entry>,
}

impl Directory {
    /// Online nodes, all scopes.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Applies server `server`'s report; returns the changes every server must hear of.
    pub(crate) fn report(&mut self, server: &str, report: v1::NodeSessions) -> Vec<v1::NodeEntry> {
        let mut before: HashMap<Key, Option<Entry>> = HashMap::new();
        let mut touch = |nodes: &HashMap<Key, Entry>, key: &Key| {
            before
                .entry(key.clone())
                .or_insert_with(|| nodes.get(key).cloned());
        };
        if report.full {
            let held: Vec<Key> = self
                .nodes
                .iter()
                .filter(|(_, e)| e.sessions.keys().any(|(s, _)| s == server))
                .map(|(k, _)| k.clone())
                .collect();
            for key in held {
                touch(&self.nodes, &key);
                if let Some(entry) = self.nodes.get_mut(&key) {
                    entry.sessions.retain(|(s, _), _| s != server);
                }
            }
        }
        for closed in report.closed {
            let key = (closed.scope, closed.node_id);
            touch(&self.nodes, &key);
            if let Some(entry) = self.nodes.get_mut(&key) {
                entry.sessions.remove(&(server.to_owned(), closed.alias));
            }
        }
        for opened in report.opened {
            let key = (opened.scope, opened.node_id);
            touch(&self.nodes, &key);
            let entry = self.nodes.entry(key).or_insert_with(|| Entry {
                name: String::new(),
                location: String::new(),
                info: String::new(),
                sessions: BTreeMap::new(),
            });
            // The newest login carries the newest stored details.
            entry.name = opened.name;
            entry.location = opened.location;
            entry.info = opened.info;
            entry
                .sessions
                .insert((server.to_owned(), opened.alias), opened.since_ms);
        }
        self.settle(before)
    }

    /// Server `server` left the cluster: its sessions are gone.
    pub(crate) fn server_gone(&mut self, server: &str) -> Vec<v1::NodeEntry> {
        self.report(
            server,
            v1::NodeSessions {
                full: true,
                ..v1::NodeSessions::default()
            },
        )
    }

    /// Node `node_id` of `scope` changed its details; the change, if it is online.
    pub(crate) fn update(
        &mut self,
        scope: &str,
        node_id: &str,
        name: &str,
        location: &str,
        info: &str,
    ) -> Option<v1::NodeEntry> {
        let entry = self
            .nodes
            .get_mut(&(scope.to_owned(), node_id.to_owned()))?;
        entry.name = name.to_owned();
        entry.location = location.to_owned();
        entry.info = info.to_owned();
        Some(v1::NodeEntry {
            scope: scope.to_owned(),
            node: Some(entry.info(node_id)),
            change: PresenceChange::Updated as i32,
        })
    }

    /// The servers holding sessions of node `node_id` of `scope`.
    pub(crate) fn servers_of(&self, scope: &str, node_id: &str) -> Vec<String> {
        self.nodes
            .get(&(scope.to_owned(), node_id.to_owned()))
            .map(|e| e.info(node_id).servers)
            .unwrap_or_default()
    }

    /// The whole directory, for a server that has just registered.
    pub(crate) fn snapshot(&self) -> v1::NodePresence {
        v1::NodePresence {
            snapshot: true,
            entries: self
                .nodes
                .iter()
                .map(|((scope, id), entry)| v1::NodeEntry {
                    scope: scope.clone(),
                    node: Some(entry.info(id)),
                    change: PresenceChange::Online as i32,
                })
                .collect(),
        }
    }

    /// Drops nodes left without sessions and says what changed for each node touched.
    fn settle(&mut self, before: HashMap<Key, Option<Entry>>) -> Vec<v1::NodeEntry> {
        let mut changes = Vec::new();
        for (key, was) in before {
            let now = self
                .nodes
                .get(&key)
                .filter(|e| !e.sessions.is_empty())
                .cloned();
            let was = was.filter(|e| !e.sessions.is_empty());
            let (change, entry) = match (&was, &now) {
                (None, Some(now)) => (PresenceChange::Online, now),
                (Some(was), None) => {
                    self.nodes.remove(&key);
                    (PresenceChange::Offline, was)
                }
                (Some(was), Some(now)) if was != now => (PresenceChange::Updated, now),
                _ => {
                    if now.is_none() {
                        self.nodes.remove(&key);
                    }
                    continue;
                }
            };
            let mut info = entry.info(&key.1);
            if change == PresenceChange::Offline {
                info.servers.clear();
            }
            changes.push(v1::NodeEntry {
                scope: key.0,
                node: Some(info),
                change: change as i32,
            });
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(node: &str, alias: &str) -> v1::NodeSession {
        v1::NodeSession {
            scope: "acme".into(),
            node_id: node.into(),
            alias: alias.into(),
            since_ms: 7,
            name: format!("{node} name"),
            ..Default::default()
        }
    }

    fn opened(sessions: Vec<v1::NodeSession>) -> v1::NodeSessions {
        v1::NodeSessions {
            opened: sessions,
            ..Default::default()
        }
    }

    fn changes(entries: &[v1::NodeEntry]) -> Vec<(String, PresenceChange, Vec<String>)> {
        let mut out: Vec<_> = entries
            .iter()
            .map(|e| {
                let node = e.node.clone().unwrap_or_default();
                (node.node_id, e.change(), node.servers)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn sessions_come_and_go_and_a_leaving_server_takes_its_nodes_offline() {
        let mut d = Directory::default();
        let c = d.report("s1", opened(vec![session("n1", "a1"), session("n2", "a2")]));
        assert_eq!(
            changes(&c),
            [
                ("n1".into(), PresenceChange::Online, vec!["s1".into()]),
                ("n2".into(), PresenceChange::Online, vec!["s1".into()]),
            ]
        );
        // A second session on another server is an update, not a second node.
        let c = d.report("s2", opened(vec![session("n1", "b1")]));
        assert_eq!(
            changes(&c),
            [(
                "n1".into(),
                PresenceChange::Updated,
                vec!["s1".into(), "s2".into()]
            )]
        );
        assert_eq!(d.len(), 2);
        // s1 dies: n2 goes offline, n1 stays online on s2.
        let c = d.server_gone("s1");
        assert_eq!(
            changes(&c),
            [
                ("n1".into(), PresenceChange::Updated, vec!["s2".into()]),
                ("n2".into(), PresenceChange::Offline, vec![]),
            ]
        );
        let c = d.report(
            "s2",
            v1::NodeSessions {
                closed: vec![session("n1", "b1")],
                ..Default::default()
            },
        );
        assert_eq!(
            changes(&c),
            [("n1".into(), PresenceChange::Offline, vec![])]
        );
        assert_eq!(d.len(), 0);
        // Closing what was never open changes nothing.
        assert!(
            d.report(
                "s2",
                v1::NodeSessions {
                    closed: vec![session("n9", "x")],
                    ..Default::default()
                }
            )
            .is_empty()
        );
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_full_report_replaces_what_the_server_had_and_repeats_are_quiet() {
        let mut d = Directory::default();
        d.report("s1", opened(vec![session("n1", "a1"), session("n2", "a2")]));
        let full = v1::NodeSessions {
            full: true,
            opened: vec![session("n2", "a2"), session("n3", "a3")],
            closed: Vec::new(),
        };
        let c = d.report("s1", full.clone());
        assert_eq!(
            changes(&c),
            [
                ("n1".into(), PresenceChange::Offline, vec![]),
                ("n3".into(), PresenceChange::Online, vec!["s1".into()]),
            ]
        );
        assert!(d.report("s1", full).is_empty(), "the same report again");
        assert_eq!(d.snapshot().entries.len(), 2);
        let u = d.update("acme", "n2", "renamed", "here", "{}").unwrap();
        assert_eq!(u.node.unwrap().name, "renamed");
        assert!(d.update("acme", "n1", "offline", "", "{}").is_none());
    }
}
