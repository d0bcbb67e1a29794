//! Presence on a comm server: the node sessions it holds, which it reports to every
//! coordinator it is registered with (all of them after each registration, then changes as
//! they happen), and its copy of the cluster's directory of online nodes, kept up to date by
//! the coordinators, which answers `ListNodes` and becomes the events of `@presence`
//! subscribers.
//!
//! Every coordinator sends the same directory. One copy is kept per coordinator link; the
//! primary link's (see `coordinator_link`) is the one in force. When the primary changes,
//! what differs between its copy and the next one's becomes events, so subscribers miss
//! nothing and hear nothing twice.

use std::collections::{BTreeMap, HashMap};

use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, PresenceChange};
use std::sync::Mutex;
use tokio::sync::watch;

/// Online nodes by scope, then node id.
type Directory = HashMap<String, HashMap<String, v1::NodeInfo>>;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Presence {
    local: Mutex<Local>,
    /// Raised when a session opens or closes: every coordinator link reports what it has not.
    pub(crate) changed: watch::Sender<()>,
    directories: Mutex<Directories>,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            local: Mutex::default(),
            changed: watch::Sender::new(()),
            directories: Mutex::default(),
        }
    }
}

/// The coordinators' directories, by coordinator link.
#[derive(Debug, Default)]
struct Directories {
    copies: BTreeMap<u64, Copy>,
    /// The link whose copy is in force; its copy stays (the last word) while no link is up.
    source: Option<u64>,
    /// The copy that was in force before a handover to a link whose snapshot has not come
    /// yet: subscribers hear the differences when it does.
    handover: Option<Directory>,
}

/// One coordinator's directory.
#[derive(Debug, Default)]
struct Copy {
    nodes: Directory,
    /// Its snapshot came.
    whole: bool,
}

impl Directories {
    fn current(&self) -> Option<&Directory> {
        match &self.handover {
            Some(previous) => Some(previous),
            None => self
                .source
                .and_then(|s| self.copies.get(&s))
                .map(|c| &c.nodes),
        }
    }
}

/// This server's node sessions, and the changes each coordinator link has yet to report.
#[derive(Debug, Default)]
struct Local {
    sessions: HashMap<u64, v1::NodeSession>,
    /// By coordinator link, from its full report on.
    unreported: BTreeMap<u64, Unreported>,
}

#[derive(Debug, Default)]
struct Unreported {
    opened: Vec<v1::NodeSession>,
    closed: Vec<v1::NodeSession>,
}

impl Presence {
    /// Session `session` of a node opened (its node topic is in force).
    pub(crate) fn opened(&self, session: u64, node: v1::NodeSession) {
        let mut local = lock(&self.local);
        for unreported in local.unreported.values_mut() {
            unreported.opened.push(node.clone());
        }
        local.sessions.insert(session, node);
        drop(local);
        self.changed.send_replace(());
    }

    /// Session `session` closed (if it was a node's).
    pub(crate) fn closed(&self, session: u64) {
        let mut local = lock(&self.local);
        let Some(node) = local.sessions.remove(&session) else {
            return;
        };
        for unreported in local.unreported.values_mut() {
            // Opened and closed before any report: the coordinator need not hear of it, and
            // must not hear of the close before the open.
            let before = unreported.opened.len();
            unreported
                .opened
                .retain(|o| !(o.alias == node.alias && o.node_id == node.node_id));
            if unreported.opened.len() == before {
                unreported.closed.push(node.clone());
            }
        }
        drop(local);
        self.changed.send_replace(());
    }

    /// Every node session here, for coordinator link `link` after registering; the changes
    /// after it are kept for that link.
    pub(crate) fn full_report(&self, link: u64) -> v1::NodeSessions {
        let mut local = lock(&self.local);
        local.unreported.insert(link, Unreported::default());
        v1::NodeSessions {
            full: true,
            opened: local.sessions.values().cloned().collect(),
            closed: Vec::new(),
        }
    }

    /// The changes coordinator link `link` has not reported, if any.
    pub(crate) fn take_changes(&self, link: u64) -> Option<v1::NodeSessions> {
        let mut local = lock(&self.local);
        let unreported = local.unreported.get_mut(&link)?;
        if unreported.opened.is_empty() && unreported.closed.is_empty() {
            return None;
        }
        Some(v1::NodeSessions {
            full: false,
            opened: std::mem::take(&mut unreported.opened),
            closed: std::mem::take(&mut unreported.closed),
        })
    }

    /// Coordinator link `link` ended: nothing more is kept for it to report.
    pub(crate) fn link_closed(&self, link: u64) {
        lock(&self.local).unreported.remove(&link);
    }

    /// Applies coordinator link `link`'s `NodePresence` to its copy. The primary link's copy
    /// is the one in force (and the first link's, while there is no primary). Returns the
    /// events for `@presence` subscribers, by scope: none unless the copy is in force, and
    /// none for a snapshot, which only brings the copy up to date (a restarted coordinator's
    /// first snapshot lacks the servers that have not registered again yet), except after a
    /// handover, when the differences from the copy in force before are the news.
    pub(crate) fn apply(
        &self,
        link: u64,
        primary: bool,
        presence: v1::NodePresence,
    ) -> Vec<(String, v1::PresenceEvent)> {
        let mut events = Vec::new();
        let mut updated = Vec::new();
        {
            let mut directories = lock(&self.directories);
            if directories.source != Some(link) && (primary || directories.source.is_none()) {
                // The copy in force was a link that left while none was up: its word is old.
                if let Some(old) = directories.source.replace(link) {
                    directories.copies.remove(&old);
                }
                directories.handover = None;
            }
            let in_force = directories.source == Some(link);
            let handover = if in_force && presence.snapshot {
                directories.handover.take()
            } else {
                None
            };
            let copy = directories.copies.entry(link).or_default();
            if presence.snapshot {
                copy.nodes.clear();
                copy.whole = true;
            }
            let directory = &mut copy.nodes;
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
                    if change == PresenceChange::Updated && in_force {
                        updated.push((entry.scope.clone(), node.clone()));
                    }
                    scope.insert(node.node_id.clone(), node.clone());
                }
                if in_force && !presence.snapshot {
                    events.push((
                        entry.scope,
                        v1::PresenceEvent {
                            change: change as i32,
                            node: Some(node),
                        },
                    ));
                }
            }
            if let Some(previous) = handover {
                events = differences(&previous, directory);
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

    /// The primary coordinator link `old` left and `new` (if any) took over: `new`'s copy is
    /// in force from now on, and what differs from `old`'s is returned as events (once `new`'s
    /// snapshot is in). With no link left, `old`'s copy stays in force until one registers.
    pub(crate) fn source_changed(
        &self,
        old: u64,
        new: Option<u64>,
    ) -> Vec<(String, v1::PresenceEvent)> {
        let mut directories = lock(&self.directories);
        let Some(new) = new else {
            return Vec::new();
        };
        if directories.source != Some(old) {
            directories.copies.remove(&old);
            return Vec::new();
        }
        let previous = match directories.handover.take() {
            Some(previous) => {
                directories.copies.remove(&old);
                previous
            }
            None => directories
                .copies
                .remove(&old)
                .map(|c| c.nodes)
                .unwrap_or_default(),
        };
        directories.source = Some(new);
        let next = directories.copies.entry(new).or_default();
        if next.whole {
            let events = differences(&previous, &next.nodes);
            return events;
        }
        directories.handover = Some(previous);
        Vec::new()
    }

    /// Coordinator link `link`, not the primary, left: its copy goes.
    pub(crate) fn forget(&self, link: u64) {
        let mut directories = lock(&self.directories);
        if directories.source != Some(link) {
            directories.copies.remove(&link);
        }
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
        let directories = lock(&self.directories);
        let Some(nodes) = directories.current().and_then(|d| d.get(scope)) else {
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
        lock(&self.directories)
            .current()
            .map_or(0, |d| d.values().map(HashMap::len).sum())
    }
}

/// The events that take a subscriber who saw `old` to `new`.
fn differences(old: &Directory, new: &Directory) -> Vec<(String, v1::PresenceEvent)> {
    let event = |scope: &str, change: PresenceChange, node: &v1::NodeInfo| {
        (
            scope.to_owned(),
            v1::PresenceEvent {
                change: change as i32,
                node: Some(node.clone()),
            },
        )
    };
    let mut events = Vec::new();
    for (scope, nodes) in new {
        for (id, node) in nodes {
            match old.get(scope).and_then(|o| o.get(id)) {
                None => events.push(event(scope, PresenceChange::Online, node)),
                Some(was) if was != node => {
                    events.push(event(scope, PresenceChange::Updated, node))
                }
                Some(_) => {}
            }
        }
    }
    for (scope, nodes) in old {
        for (id, node) in nodes {
            if new.get(scope).is_none_or(|n| !n.contains_key(id)) {
                let mut gone = node.clone();
                gone.servers.clear();
                events.push(event(scope, PresenceChange::Offline, &gone));
            }
        }
    }
    events
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
        let first = p.full_report(7);
        assert!(first.opened.is_empty());
        p.opened(1, session.clone());
        p.opened(
            2,
            v1::NodeSession {
                alias: "b".into(),
                ..session.clone()
            },
        );
        p.closed(1);
        // A second coordinator link registers now: its report has session 2, and it hears
        // only of what comes after.
        assert_eq!(p.full_report(8).opened.len(), 1);
        let changes = p.take_changes(7).unwrap();
        assert_eq!((changes.opened.len(), changes.closed.len()), (1, 0));
        p.closed(2);
        for link in [7, 8] {
            let changes = p.take_changes(link).unwrap();
            assert_eq!((changes.opened.len(), changes.closed.len()), (0, 1));
            assert!(p.take_changes(link).is_none());
        }
        assert!(
            p.take_changes(9).is_none(),
            "a link that never reported keeps nothing"
        );
        p.link_closed(8);
        p.opened(3, session.clone());
        assert!(p.take_changes(8).is_none());
        assert_eq!(p.take_changes(7).unwrap().opened.len(), 1);
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
        assert!(
            p.apply(1, true, snapshot).is_empty(),
            "a snapshot is no event"
        );
        assert_eq!(p.online(), 50);
        let events = p.apply(
            1,
            true,
            v1::NodePresence {
                snapshot: false,
                entries: vec![
                    entry("7", PresenceChange::Offline),
                    entry("x", PresenceChange::Online),
                ],
            },
        );
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

    fn names(events: &[(String, v1::PresenceEvent)]) -> Vec<(String, PresenceChange)> {
        let mut out: Vec<_> = events
            .iter()
            .map(|(_, e)| (e.node.clone().unwrap_or_default().node_id, e.change()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn only_the_primary_copy_makes_events_and_a_handover_tells_the_differences() {
        let p = Presence::default();
        let snapshot = |ids: &[&str]| v1::NodePresence {
            snapshot: true,
            entries: ids
                .iter()
                .map(|i| entry(i, PresenceChange::Online))
                .collect(),
        };
        let delta = |id: &str, change| v1::NodePresence {
            snapshot: false,
            entries: vec![entry(id, change)],
        };
        // Link 1 is the primary; link 2 hears the same changes a little later.
        assert!(p.apply(1, true, snapshot(&["a", "b"])).is_empty());
        assert!(p.apply(2, false, snapshot(&["a"])).is_empty());
        assert_eq!(
            names(&p.apply(1, true, delta("c", PresenceChange::Online))),
            [("c".into(), PresenceChange::Online)]
        );
        assert!(
            p.apply(2, false, delta("c", PresenceChange::Online))
                .is_empty(),
            "the same change from the second coordinator is told once"
        );
        assert_eq!(p.online(), 3);
        // Link 1 goes: link 2's copy (which missed b) takes over, and b going is the news.
        assert_eq!(
            names(&p.source_changed(1, Some(2))),
            [("b".into(), PresenceChange::Offline)]
        );
        assert_eq!(p.online(), 2);
        // A link that takes over before its snapshot came: the old copy stays in force until
        // it does, then the differences are told.
        assert!(p.source_changed(2, Some(3)).is_empty());
        assert_eq!(p.online(), 2);
        assert_eq!(
            names(&p.apply(3, true, snapshot(&["a", "c", "d"]))),
            [("d".into(), PresenceChange::Online)]
        );
        // With no link left the last copy stays; a restarted coordinator's snapshot then
        // replaces it without events (it may lack servers not registered again yet).
        assert!(p.source_changed(3, None).is_empty());
        assert_eq!(p.online(), 3);
        assert!(p.apply(4, true, snapshot(&["a"])).is_empty());
        assert_eq!(p.online(), 1);
    }
}
