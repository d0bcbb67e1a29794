//! The gateway's bridge into the mesh (`dispatch_mesh_account`): data from a device is
//! published on `dispatch/{tcp|udp}/{port}/{device ip}` in that account, and messages on
//! `dispatch/{tcp|udp}/{port}/{device ip}/write` are written to the device (every TCP
//! connection from that address on that port; for UDP, the address's last source port). Any
//! mesh client of the account whose role allows those topics can read and drive the device.
//!
//! The bridge is a subscriber of this comm server like a client session: it has its own
//! bounded queue (the slow-consumer policy applies) and its subscriptions follow the ports and
//! accept lists in use. Messages it publishes carry the alias `dispatch@{server id}` and the
//! role `dispatch`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use relaymesh_net::link::{Backlog, Closer, DataRx};
use relaymesh_proto::frame::Sender;
use relaymesh_proto::v1::{self, server_to_client::Kind};
use tokio::sync::{mpsc, oneshot};

use super::Proto;
use crate::Server;
use crate::control::Command;
use crate::interest::TopicKey;
use crate::routes::{self, Origin, Publisher, Subscriber};

/// The role stamped on messages from devices.
const ROLE: &str = "dispatch";

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// The topic a device's data is published on.
pub(super) fn data_topic(proto: Proto, port: u16, ip: IpAddr) -> String {
    format!("dispatch/{}/{port}/{ip}", proto_name(proto))
}

/// What a `.../write` topic names.
pub(super) fn parse_write_topic(topic: &str) -> Option<(Proto, u16, IpAddr)> {
    let mut parts = topic.split('/');
    let (Some("dispatch"), Some(proto), Some(port), Some(ip), Some("write"), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    Some((proto, port.parse().ok()?, ip.parse().ok()?))
}

/// The bridge: publishes device data and holds the subscription for writes.
pub(super) struct Bridge {
    server: Arc<Server>,
    scope: Arc<str>,
    alias: String,
    me: Arc<Subscriber>,
    /// Subscription changes, in order, to the task that hands them to the control task.
    changes: mpsc::Sender<Command>,
}

/// Subscription changes queued for the control task; a burst beyond this is dropped (and
/// logged), leaving a write topic unsubscribed until its port is reopened.
const CHANGE_QUEUE: usize = 1_024;

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("scope", &self.scope)
            .field("alias", &self.alias)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// A bridge in `scope`; returns it, the queue of messages for it (writes to devices) and
    /// the queue of its subscription changes, for [`forward_changes`].
    pub(super) fn new(server: Arc<Server>, scope: &str) -> (Self, DataRx, mpsc::Receiver<Command>) {
        let (changes, changes_rx) = mpsc::channel(CHANGE_QUEUE);
        let (tx, rx) = relaymesh_net::link::data_queue();
        let me = Arc::new(Subscriber {
            id: server.next_id(),
            // No client: a driver's bridge (no alias, so no operator's kick reaches it).
            alias: Arc::from(""),
            scope: scope.into(),
            role: Arc::from("dispatch"),
            node: None,
            topics: std::sync::atomic::AtomicU32::new(0),
            ops_ready: tokio::sync::Notify::new(),
            data: tx,
            backlog: Arc::new(Backlog::counted(
                server.config.client_queue,
                server.config.client_queue_bytes,
            )),
            direct: None,
            closer: Closer::new(),
            subscribed: AtomicBool::new(true),
            client: None,
            // The bridge reads its queue frame by frame.
            batches: false,
        });
        let alias = format!("dispatch@{}", server.id);
        (
            Self {
                server,
                scope: scope.into(),
                alias,
                me,
                changes,
            },
            rx,
            changes_rx,
        )
    }

    /// Publishes a device's data on its topic, to local subscribers and interested peers.
    pub(super) fn publish(&self, proto: Proto, port: u16, ip: IpAddr, data: &[u8]) {
        let topic = data_topic(proto, port, ip);
        let server = &self.server;
        let msg = routes::Message {
            origin: Origin::Local,
            scope: &self.scope,
            topic: &topic,
            from: Sender {
                alias: &self.alias,
                role: ROLE,
                ..Sender::default()
            },
            payload: data,
        };
        // Device reads come from many tasks, each publishing now and then: a publisher each.
        let mut publisher = Publisher::new(
            server.direct_writes,
            server.config.slow_consumer_ms,
            server.histories.clone(),
        );
        let valid = publisher.publish(&server.routes, &server.stats, msg, || Ok::<_, ()>(()));
        debug_assert!(valid.is_ok(), "device topics are built valid");
        publisher.flush(&server.stats);
    }

    fn keys(&self, proto: Proto, port: u16, ips: &[IpAddr]) -> Vec<TopicKey> {
        ips.iter()
            .map(|&ip| {
                TopicKey::new(
                    &self.scope,
                    &format!("{}/write", data_topic(proto, port, ip)),
                )
            })
            .collect()
    }

    /// Subscribes to the write topics of `ips` on a port (from a task: callers hold locks).
    pub(super) fn watch(&self, proto: Proto, port: u16, ips: &[IpAddr]) {
        let (done, _) = oneshot::channel();
        let command = Command::Subscribe {
            session: self.me.clone(),
            topics: self.keys(proto, port, ips),
            waiter: self.server.next_id(),
            done,
        };
        self.queue(command);
    }

    fn queue(&self, command: Command) {
        if self.changes.try_send(command).is_err() {
            tracing::warn!("dispatch bridge: too many subscription changes at once; one dropped");
        }
    }

    /// Drops the write topics of `ips` on a port.
    pub(super) fn unwatch(&self, proto: Proto, port: u16, ips: &[IpAddr]) {
        let (done, _) = oneshot::channel();
        let command = Command::Unsubscribe {
            session: self.me.id,
            topics: self.keys(proto, port, ips),
            waiter: self.server.next_id(),
            done,
        };
        self.queue(command);
    }

    /// An item taken off the bridge's queue (one or more framed messages): its room is
    /// returned, and each `.../write` message in it yields where and what to write.
    pub(super) fn take(&self, frames: &Bytes) -> Vec<(Proto, u16, IpAddr, Bytes)> {
        let messages: Vec<Bytes> = relaymesh_net::wire::frame_payloads(frames).collect();
        self.me.backlog.release_n(frames.len(), messages.len());
        messages
            .into_iter()
            .filter_map(|frame| {
                let msg: v1::ServerToClient = relaymesh_proto::decode(frame).ok()?;
                let Some(Kind::Message(m)) = msg.kind else {
                    return None;
                };
                let (proto, port, ip) = parse_write_topic(&m.topic)?;
                Some((proto, port, ip, m.payload))
            })
            .collect()
    }
}

/// Hands the bridge's subscription changes to the control task one at a time, in order.
pub(super) async fn forward_changes(
    control: mpsc::Sender<Command>,
    mut changes: mpsc::Receiver<Command>,
) {
    while let Some(command) = changes.recv().await {
        if control.send(command).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_topics_name_protocol_port_and_device() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(data_topic(Proto::Tcp, 502, ip), "dispatch/tcp/502/10.1.2.3");
        assert_eq!(
            parse_write_topic("dispatch/udp/47808/10.1.2.3/write"),
            Some((Proto::Udp, 47808, ip))
        );
        assert_eq!(parse_write_topic("dispatch/tcp/502/10.1.2.3"), None);
        assert_eq!(parse_write_topic("dispatch/tcp/99999/10.1.2.3/write"), None);
        assert_eq!(parse_write_topic("dispatch/sctp/1/10.1.2.3/write"), None);
    }
}
