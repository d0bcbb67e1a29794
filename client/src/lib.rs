//! The relaymesh client library: log in through a coordinator, talk to the comm server it
//! picks, and stay connected.
//!
//! A relaymesh cluster is a coordinator and any number of equivalent comm servers. A client
//! asks the coordinator for a server, gets a single-use key for one chosen at random, and from
//! then on talks to that server: it subscribes to topics and publishes to them, and the cluster
//! delivers every message to every subscriber of its topic, whichever server each sits on.
//!
//! # Connecting
//!
//! ```no_run
//! use relaymesh_client::{Client, ClientConfig, ClientError, Event};
//!
//! # async fn demo() -> Result<(), ClientError> {
//! let mut client = Client::connect(ClientConfig::new("ws://127.0.0.1:7400")).await?;
//! client.subscribe(["rooms/lobby"]).await?; // active cluster-wide once this returns
//! client.publish("rooms/lobby", "hello").await?; // queued; returns at once
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Message(m) => println!("{} from {}: {:?}", m.topic, m.from, m.payload),
//!         // `upstream` of them were lost between servers, the rest in our server's queue.
//!         Event::Dropped { count, upstream } => eprintln!("dropped {count} ({upstream} upstream)"),
//!         other => eprintln!("{other:?}"), // Event is non_exhaustive: keep a wildcard arm
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`Client::connect`] asks the coordinator for a server and a key (`POST /v1/login`; a key
//! login answers its challenge on the negotiation link `/v1/connect`), connects to the server
//! with the key, and starts a background task that owns the connection. The coordinator
//! URL may be written `ws://host:port` or `http://host:port`. [`ClientConfig::new`] gives the
//! defaults; every field of [`ClientConfig`] is public.
//!
//! # Logging in
//!
//! [`ClientConfig::credentials`] says who the client is. [`Credentials::Anonymous`] (the
//! default) is accepted only by a coordinator whose accounts are open (development). Otherwise
//! log in to an account with an access code, or with an Ed25519 key registered to the account
//! (the coordinator sends a challenge and the client signs it; the key never leaves the
//! client). Both name the *role* to act as, which decides what the client may publish and
//! subscribe to, and optionally a *group* within the account.
//!
//! ```no_run
//! use relaymesh_client::{ClientConfig, Credentials, read_signing_key};
//!
//! # fn demo() -> Result<(), relaymesh_client::KeyFileError> {
//! let mut agent = ClientConfig::new("ws://127.0.0.1:7400");
//! agent.credentials = Credentials::AccessCode {
//!     account: "acme".into(),
//!     code: std::env::var("RELAYMESH_ACCESS_CODE").unwrap_or_default(),
//!     role: "agent".into(),
//!     group: "fleet-1".into(),
//! };
//! // A newer login with the same id replaces this one (its server closes it with REPLACED).
//! agent.client_id = Some("drone-7".into());
//!
//! let mut gcs = ClientConfig::new("ws://127.0.0.1:7400");
//! gcs.credentials = Credentials::Key {
//!     account: "acme".into(),
//!     key: read_signing_key(std::path::Path::new("gcs.key"))?, // written by `meshctl keygen`
//!     role: "gcs".into(),
//!     group: "fleet-1".into(),
//! };
//! # Ok(()) }
//! ```
//!
//! The key is an [`ed25519_dalek::SigningKey`], re-exported as [`SigningKey`];
//! [`write_new_signing_key`] makes one and stores it as `meshctl keygen` does. A refused login
//! fails [`Client::connect`] with [`ClientError::Dial`] or [`ClientError::Refused`], whose
//! [`ClientError::code`] says why (`BAD_CREDENTIALS`, `ROLE_NOT_PERMITTED`, `RATE_LIMITED`, …).
//!
//! # Subscribing
//!
//! [`Client::subscribe`] returns once the server has installed the subscription *and* every
//! other server linked to it has acknowledged it: a message published anywhere after it
//! returns reaches this client. If some servers have not confirmed it within
//! [`ClientConfig::request_timeout`] (their link to the client's server is stalled or down),
//! it fails with [`ClientError::NotConfirmed`], which names them: the subscription is active on
//! the client's server and every other, it stays (the client keeps the topics, and restores
//! them on reconnect), those servers get it when their link resumes, and
//! [`Event::SubscriptionConfirmed`] reports when they all have (until then, what is published
//! on those servers may not reach the client).
//!
//! Topics are exact names of ASCII letters, digits and `_ - . :` in `/`-separated segments
//! (`rooms/lobby`, `telemetry/drone-17.gps`); there are no wildcard subscriptions, and a
//! malformed topic fails at once with [`ClientError::InvalidTopic`] without anything being
//! sent. A subscription the server refuses (too many topics, a topic the role may not read)
//! fails that call with the server's error.
//!
//! # Publishing
//!
//! [`Client::publish`] returns once the message is queued in the bounded outbound queue
//! ([`ClientConfig::outbound_queue`]), waiting while the queue is full. A publish the role may
//! not make is not an error of that call (it was already queued): the server refuses it and
//! the client reports [`Event::Forbidden`]. [`Client::flush`] waits until the server has
//! handled everything sent before it, so by the time it returns such a refusal has been
//! reported, ahead of any later event.
//!
//! # Events, and publishing from other tasks
//!
//! [`Client::next_event`] yields [`Event`]s: messages, `Dropped` notices (the server dropped
//! messages because this client read too slowly, or `upstream` of them were lost between
//! servers), `Forbidden`, `Disconnected` / `Reconnected`, `SubscriptionsRefused` and
//! `SubscriptionConfirmed`. The same task reads the server's answers to subscription
//! changes, so keep calling `next_event`: a subscribe waits at most
//! [`ClientConfig::request_timeout`] for its answer. To publish or subscribe while another
//! task receives, take a [`Handle`] with [`Client::handle`]; it is cheap to clone and has the
//! same `publish`, `subscribe`, `unsubscribe` and `flush`.
//!
//! ```no_run
//! # async fn demo(mut client: relaymesh_client::Client) {
//! let handle = client.handle();
//! tokio::spawn(async move {
//!     for n in 0..10 {
//!         if handle.publish("rooms/lobby", format!("tick {n}")).await.is_err() {
//!             break; // the client was closed
//!         }
//!     }
//! });
//! while let Some(event) = client.next_event().await {
//!     println!("{event:?}");
//! }
//! # }
//! ```
//!
//! # Reconnecting, and what is guaranteed
//!
//! When the server goes away the background task reports [`Event::Disconnected`], negotiates
//! again (excluding that server) with capped exponential backoff and jitter
//! ([`ClientConfig::reconnect_min`], [`ClientConfig::reconnect_max`]), resubscribes, and
//! reports [`Event::Reconnected`] with the new server and alias. Messages published meanwhile
//! wait in the outbound queue and go out on the next connection. Every publish is numbered and
//! kept until the server confirms it has taken it ([`ClientConfig::max_unconfirmed`] of them at
//! most; `publish` waits beyond that); after a reconnect the unconfirmed ones go out again
//! first, and receiving clients drop copies they already delivered. Messages from one
//! publisher on one topic arrive in the order published, each once; what a server confirmed
//! and then died holding is lost (delivery is at most once across a server's death).
//! If the new server refuses to restore some subscriptions (its limits are lower), they are
//! dropped and reported as [`Event::SubscriptionsRefused`].
//!
//! A server that is being drained asks its clients to move (`Reconnect`). The client then
//! moves make before break: it connects and subscribes elsewhere while still reading the old
//! server, then leaves it after reading everything queued for it there, and reports
//! [`Event::Moved`]. No numbered message (a client's publish or direct message) is lost or
//! repeated across a move, either way; unnumbered ones (presence events, a backend's
//! publishes) can come twice. A move whose old server ended before it was read to its end is
//! reported as [`Event::Disconnected`] and [`Event::Reconnected`] instead.
//!
//! # Closing
//!
//! [`Client::close`] sends what is still queued, closes the connection cleanly and waits for
//! the background task. Dropping the [`Client`] closes it too, without waiting.

pub mod cluster;
mod connection;
mod history;
mod negotiate;

/// The README's Rust examples, compiled by `cargo test` as doc tests (each in a crate of its
/// own, as a user's would be), so they cannot fall behind the library.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;

pub use bytes::Bytes;
pub use ed25519_dalek::SigningKey;
pub use relaymesh_net::keys::{KeyFileError, read_signing_key, write_new_signing_key};
pub use relaymesh_net::ws::DialError;
pub use relaymesh_proto::v1::{ErrorCode, NodeInfo, PresenceChange, SignalKind};

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relaymesh_net::queue;
use relaymesh_net::sync::lock;
use relaymesh_net::ws::WsLimits;
use relaymesh_proto::topic::{self, TopicError};
use relaymesh_proto::{encode, v1};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How a client finds and keeps its server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Coordinator base URL, e.g. `ws://127.0.0.1:7400`, or several, comma-separated
    /// (`ws://10.0.0.1:7400,ws://10.0.0.2:7400`): a login goes to the one that answered last
    /// and moves on to the next when one is unreachable, shutting down or has no server to
    /// offer.
    pub coordinator: String,
    /// Ask for this server when it is eligible.
    pub preferred_server: Option<String>,
    /// Log in through a comm server instead of the coordinator when one is known (default
    /// `true`): the client dials a server of the cluster without a key and sends its
    /// credentials, which that server relays to the coordinator; the coordinator chooses as
    /// it would for `POST /v1/login`, keeping the client where it dialled when that server is
    /// eligible (or `preferred_server`, when set and eligible), else sending it on to another.
    /// Known servers are those each server's `Ready` lists: a reconnect goes through one of
    /// them other than the server it lost (`preferred_server` if it is one, else one at
    /// random); a first login goes through one of `login_servers`, when there are any. When
    /// that fails the client asks the coordinator as usual. Key logins always ask the
    /// coordinator (they answer its challenge).
    pub relay_logins: bool,
    /// Comm server base URLs (`ws://10.0.0.5:7500`) the first login may go through (see
    /// `relay_logins`); empty (the default): the first login asks the coordinator.
    pub login_servers: Vec<String>,
    /// Reconnect through the coordinator when the server goes away (default `true`).
    pub auto_reconnect: bool,
    /// Time allowed for each step of negotiating and connecting (coordinator answer, server
    /// handshake).
    pub connect_timeout: Duration,
    /// Time a subscribe or unsubscribe may wait for the server's answer. Answers are read by the
    /// same task that delivers events, so a full event queue (nobody calling
    /// [`Client::next_event`]) delays them.
    pub request_timeout: Duration,
    /// First and largest delay between reconnect rounds (before jitter).
    pub reconnect_min: Duration,
    /// See `reconnect_min`.
    pub reconnect_max: Duration,
    /// Frames (publishes, subscription changes) queued while the connection is busy or down;
    /// `publish` waits when it is full.
    pub outbound_queue: usize,
    /// Events buffered for [`Client::next_event`]; when full the client stops reading and the
    /// server's slow-consumer policy applies.
    pub event_queue: usize,
    /// WebSocket limits for the client's connections.
    pub limits: WsLimits,
    /// Whom `wss://` and `https://` connections trust. The default is the process's default
    /// trust: the CA bundle named by `RELAYMESH_CA`, else the system's CA store; for a private
    /// CA set e.g. `Connector::new(Some(path), None)`.
    pub tls: relaymesh_net::tls::Connector,
    /// Who the client is (default: anonymous, which only an `open` coordinator accepts).
    pub credentials: Credentials,
    /// This client's unique id within its account. A newer login with the same id replaces
    /// this one: the server closes it with `REPLACED`, and it does not reconnect.
    pub client_id: Option<String>,
    /// Publishes sent (or queued) that the server has not confirmed yet, kept to be sent again
    /// on the next connection if this one is lost; `publish` waits when this many are
    /// unconfirmed.
    pub max_unconfirmed: usize,
    /// Acknowledge inbox messages ([`Direct::inbox_id`]) once [`Client::next_event`] has
    /// handed them to the application (default `true`); with `false`, the application calls
    /// [`Handle::ack_inbox`] when it has dealt with them (they come again at the next login
    /// until it does).
    pub auto_ack_inbox: bool,
}

/// How a client logs in.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// No account (accepted by an `open` coordinator only).
    #[default]
    Anonymous,
    /// An Ed25519 key registered to the account: the coordinator sends a challenge and the
    /// client signs it, so the key never leaves the client.
    Key {
        /// The account.
        account: String,
        /// The signing (private) key.
        key: ed25519_dalek::SigningKey,
        /// The role (empty for none).
        role: String,
        /// The group (empty for none).
        group: String,
    },
    /// An account's access code, and the role (and optional group) to act as.
    AccessCode {
        /// The account.
        account: String,
        /// The access code.
        code: String,
        /// The role (empty for none).
        role: String,
        /// The group (empty for none).
        group: String,
    },
    /// A registered node's token (from [`register_node`]): logs in as that node, with the
    /// account, role and group it was registered under.
    NodeToken(String),
}

impl std::fmt::Debug for Credentials {
    // The access code stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::AccessCode {
                account,
                role,
                group,
                ..
            } => f
                .debug_struct("AccessCode")
                .field("account", account)
                .field("role", role)
                .field("group", group)
                .finish_non_exhaustive(),
            Self::Key {
                account,
                key,
                role,
                group,
            } => f
                .debug_struct("Key")
                .field("account", account)
                .field("public_key", &key.verifying_key())
                .field("role", role)
                .field("group", group)
                .finish_non_exhaustive(),
            // The token's node id is not secret; its secret is.
            Self::NodeToken(token) => f
                .debug_struct("NodeToken")
                .field("node", &token.split('.').next().unwrap_or_default())
                .finish_non_exhaustive(),
        }
    }
}

impl Credentials {
    /// The `credentials` of a `POST /v1/login` body; `None` for a key, whose login signs a
    /// challenge from `POST /v1/login/challenge` first.
    pub fn login_json(&self) -> Option<serde_json::Value> {
        Some(match self {
            Self::Anonymous => serde_json::json!({ "anonymous": {} }),
            Self::AccessCode {
                account,
                code,
                role,
                group,
            } => serde_json::json!({ "access_code": {
                "account": account, "code": code, "role": role, "group": group,
            }}),
            Self::NodeToken(token) => serde_json::json!({ "node_token": { "token": token } }),
            Self::Key { .. } => return None,
        })
    }
}

impl From<&Credentials> for v1::Credentials {
    fn from(c: &Credentials) -> Self {
        let kind = match c {
            Credentials::Anonymous => v1::credentials::Kind::Anonymous(v1::Anonymous {}),
            Credentials::AccessCode {
                account,
                code,
                role,
                group,
            } => v1::credentials::Kind::AccessCode(v1::AccessCode {
                account: account.clone(),
                code: code.clone(),
                role: role.clone(),
                group: group.clone(),
            }),
            Credentials::Key {
                account,
                key,
                role,
                group,
            } => v1::credentials::Kind::Key(v1::KeyLogin {
                account: account.clone(),
                public_key: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
                role: role.clone(),
                group: group.clone(),
                challenge_id: String::new(),
                signature: Bytes::new(),
            }),
            Credentials::NodeToken(token) => v1::credentials::Kind::NodeToken(v1::NodeToken {
                token: token.clone(),
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl ClientConfig {
    /// Defaults for a coordinator at `coordinator`.
    pub fn new(coordinator: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            preferred_server: None,
            relay_logins: true,
            login_servers: Vec::new(),
            auto_reconnect: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            outbound_queue: 4096,
            event_queue: 4096,
            limits: WsLimits::default(),
            tls: relaymesh_net::tls::Connector::default(),
            credentials: Credentials::Anonymous,
            client_id: None,
            max_unconfirmed: 16_384,
            auto_ack_inbox: true,
        }
    }
}

/// Something that happened on the client's connection. New kinds of events may be added, so
/// match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message on a subscribed topic.
    Message(Message),
    /// `count` messages meant for this client were dropped: its server's queue for it was full
    /// because it was not reading fast enough, or, `upstream` of them, they were lost between
    /// servers (a peer link that broke or was down for longer than its replay buffer covers;
    /// which subscribers missed those is not always known, so it means "up to `upstream` of
    /// yours").
    Dropped {
        /// Messages lost, both kinds together.
        count: u64,
        /// Of `count`, how many were lost between servers rather than in this client's own
        /// queue (`count - upstream`: the slow-consumer drops).
        upstream: u64,
    },
    /// The connection to `server_id` ended; `reason` says why. With auto-reconnect on, a
    /// [`Event::Reconnected`] follows once another server is reached.
    Disconnected {
        /// The server that was lost.
        server_id: String,
        /// Why, e.g. the server's `Error` or the connection error.
        reason: String,
    },
    /// Connected again, to `server_id`, with every subscription restored on it (and on the
    /// servers linked to it; any that had not confirmed them yet get them when their link
    /// resumes, and [`Event::SubscriptionConfirmed`] follows then).
    Reconnected {
        /// The new server.
        server_id: String,
        /// The client's alias on the new connection.
        alias: String,
    },
    /// The application's backend subscribed this client to `added` and unsubscribed it from
    /// `removed` (the coordinator's server API). They are the client's own from now on: kept
    /// across reconnects, and [`Client::unsubscribe`] ends them.
    SubscriptionsChanged {
        /// Topics now subscribed to.
        added: Vec<String>,
        /// Topics no longer subscribed to.
        removed: Vec<String>,
    },
    /// The server asked the client to move (it is being drained), and it did, make before
    /// break: connected and subscribed on `server_id` before leaving `from_server`, which it
    /// read to the end. Nothing was lost on the way: unlike [`Event::Disconnected`], no
    /// message is missing before this event.
    Moved {
        /// The server moved from.
        from_server: String,
        /// The server moved to.
        server_id: String,
        /// The client's alias on the new connection.
        alias: String,
        /// The reason the old server gave.
        reason: String,
    },
    /// The server refused a publish because the client's role may not publish to that topic
    /// (refused subscriptions fail their `subscribe` call instead). The connection stays up.
    Forbidden {
        /// The server's explanation, naming the role and topic.
        reason: String,
    },
    /// While reconnecting, the new server refused to restore these subscriptions (its limits
    /// are lower than the old server's); the client dropped them and connects without them.
    SubscriptionsRefused {
        /// The subscriptions that were dropped.
        topics: Vec<String>,
        /// The server's error.
        reason: String,
    },
    /// A subscription that was not yet confirmed cluster-wide now is: every server linked to
    /// the client's server has it, so a message published anywhere in the cluster from now on
    /// reaches the client. Reported for a `subscribe` that failed with
    /// [`ClientError::NotConfirmed`] (or [`ClientError::Timeout`]), and for the subscriptions
    /// restored after a reconnect when some servers had not confirmed them by then.
    SubscriptionConfirmed {
        /// The topics of that subscription (or every topic restored).
        topics: Vec<String>,
    },
    /// A direct message to this client's node ([`Handle::send`]).
    Direct(Direct),
    /// A node of this client's scope came online, went offline, or changed (after
    /// [`Handle::watch_presence`]).
    Presence {
        /// What happened.
        change: v1::PresenceChange,
        /// The node (for `Offline`, as it was).
        node: v1::NodeInfo,
    },
    /// A signal to this client's node ([`Handle::signal`]).
    Signal(Signal),
    /// Direct message `seq` (what [`Handle::send`] returned) found its node offline and is
    /// stored in the node's inbox: it is delivered when the node logs in.
    Accepted {
        /// The message's number.
        seq: u64,
        /// The node it is for.
        to_node: String,
        /// Its id in that node's inbox (what an [`Event::Expired`] for it names).
        inbox_id: u64,
    },
    /// A direct message this client's node sent (to a node that was offline) sat unread in the
    /// recipient's inbox past the coordinator's `inbox.ttl_ms` and was deleted. Told to every
    /// session of the sending node that is connected when it expires, so it may name a message
    /// another process of the node sent: `inbox_id` is what its [`Event::Accepted`] said, and
    /// `seq` the number [`Handle::send`] returned while the client's alias
    /// ([`Handle::alias`], or the one in [`Event::Reconnected`]) was `publisher`. A client that
    /// is not a node is not told.
    Expired {
        /// The node it was for.
        to_node: String,
        /// Its id in that node's inbox.
        inbox_id: u64,
        /// Its number, in the process that sent it.
        seq: u64,
        /// The alias that numbered it.
        publisher: String,
        /// When it was stored (ms since the epoch).
        stored_ms: u64,
    },
    /// A direct message or signal this client sent reached no one: `seq` is what
    /// [`Handle::send`] or [`Handle::signal`] returned, `reason` why (`NOT_CONNECTED`: the node
    /// has no session in the cluster, or is no node of this account; `UNKNOWN_NODE`: not a
    /// node id; `RATE_LIMITED`: over the server's signal rate; `LIMIT_EXCEEDED`: too large).
    Undeliverable {
        /// The message's number.
        seq: u64,
        /// The node it was for.
        to_node: String,
        /// Why it reached no one.
        reason: v1::ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The recovery of `topic` after a reconnect is done: the messages published after the
    /// client's last position up to the recovery's read of the history were delivered (before
    /// this event, in each publisher's order, each once), and live messages follow. `count` is
    /// how many the recovery delivered (some may also have arrived live meanwhile: those were
    /// held and dropped as copies). Only for topics the servers keep history for (`[history]`
    /// in their configuration).
    Recovered {
        /// The topic.
        topic: String,
        /// Messages recovered.
        count: u64,
    },
    /// The recovery of `topic` could not reach back to where the client left it: at least
    /// `missed_at_least` messages are gone (aged out or evicted from the history, or held
    /// only by a server that died); 0 when how many cannot be known (the stream's server died
    /// with no copy left). [`Event::Recovered`] follows with what could be recovered.
    RecoveryGap {
        /// The topic.
        topic: String,
        /// A lower bound of the messages missed.
        missed_at_least: u64,
    },
}

/// What a node says about itself ([`register_node`], [`update_node`]); the coordinator
/// bounds each (name and location 128 bytes, info `max_node_info_bytes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeDetails {
    /// Free text.
    pub name: String,
    /// Free text.
    pub location: String,
    /// A JSON object, as text (empty: `{}`).
    pub info: String,
}

/// A newly registered node.
#[derive(Clone, PartialEq, Eq)]
pub struct RegisteredNode {
    /// The node's id: what others send to.
    pub node_id: String,
    /// Logs in as the node ([`Credentials::NodeToken`]). Shown this once: the coordinator
    /// keeps only its hash.
    pub token: String,
}

impl std::fmt::Debug for RegisteredNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredNode")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Registers a new node of the account, role and group that `config.credentials` log in as,
/// through the coordinator at `config.coordinator`.
pub async fn register_node(
    config: &ClientConfig,
    details: NodeDetails,
) -> Result<RegisteredNode, ClientError> {
    let request = v1::ClientToCoordinator::register_node(v1::RegisterNode {
        name: details.name,
        location: details.location,
        info: details.info,
    });
    match ask_coordinator(config, request).await? {
        v1::coordinator_to_client::Kind::NodeRegistered(r) => Ok(RegisteredNode {
            node_id: r.node_id,
            token: r.token,
        }),
        other => Err(negotiate::unexpected(other)),
    }
}

/// Replaces the name, location and info of the node `config.credentials` log in as (a node
/// token, or an Ed25519 key); returns its id.
pub async fn update_node(
    config: &ClientConfig,
    details: NodeDetails,
) -> Result<String, ClientError> {
    let request = v1::ClientToCoordinator::update_node(v1::UpdateNode {
        name: details.name,
        location: details.location,
        info: details.info,
    });
    match ask_coordinator(config, request).await? {
        v1::coordinator_to_client::Kind::NodeUpdated(u) => Ok(u.node_id),
        other => Err(negotiate::unexpected(other)),
    }
}

/// Logs in to the coordinator with `config`, sends `request` on the negotiation link and
/// returns the answer.
async fn ask_coordinator(
    config: &ClientConfig,
    request: v1::ClientToCoordinator,
) -> Result<v1::coordinator_to_client::Kind, ClientError> {
    let mut link = negotiate::Negotiation::open(config, &[], Some(&request)).await?;
    let answer = link.request(config, request).await;
    link.close().await;
    answer
}

/// Online nodes ([`Handle::list_nodes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeList {
    /// A random sample of the matching nodes.
    pub nodes: Vec<v1::NodeInfo>,
    /// How many match in all.
    pub total: u64,
}

/// A direct message to this client's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direct {
    /// The sender's node (empty when the sender is not a node), stamped by its server.
    pub from_node: String,
    /// The sender's alias, stamped by its server.
    pub from: String,
    /// The sender's role (empty for none).
    pub role: String,
    /// The payload, as sent (a slice of the read buffer; see [`Message::payload`]).
    pub payload: Bytes,
    /// Set when it comes from the node's inbox (it was sent while the node was offline): the
    /// client acknowledges it once this event has been handed to the application
    /// ([`ClientConfig::auto_ack_inbox`]), or [`Handle::ack_inbox`] does; until then it comes
    /// again at every login (the library drops the copies). 0 for a message sent while the
    /// node was online.
    pub inbox_id: u64,
}

/// A signal to this client's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// The sender's node (empty when the sender is not a node), stamped by its server.
    pub from_node: String,
    /// The sender's alias, stamped by its server.
    pub from: String,
    /// What the signal carries.
    pub kind: v1::SignalKind,
    /// The payload, as sent.
    pub payload: Bytes,
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The publisher's alias, stamped by the publisher's server.
    pub from: String,
    /// The publisher's role (empty for none), stamped by the publisher's server.
    pub role: String,
    /// The payload, as published. It is a slice of the buffer the connection read it into
    /// (no copy), so keeping it keeps that buffer (a few KiB); to hold many messages for long,
    /// keep copies (`Bytes::copy_from_slice(&m.payload)`).
    pub payload: Bytes,
    /// Where it sits in its topic's history, on a topic that keeps history.
    pub position: Option<Position>,
}

impl From<v1::Message> for Message {
    fn from(m: v1::Message) -> Self {
        Self {
            position: (m.stream != 0).then_some(Position {
                stream: m.stream,
                offset: m.offset,
                published_ms: m.published_ms,
            }),
            topic: m.topic,
            from: m.from_alias,
            role: m.from_role,
            payload: m.payload,
        }
    }
}

/// A message's place in its topic's history. A topic's history is made of streams, one per
/// comm server process that accepted messages on it; each numbers its messages 1, 2, 3...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The stream (random per topic and server process).
    pub stream: u64,
    /// The message's number in the stream.
    pub offset: u64,
    /// When its server accepted it (ms since the Unix epoch).
    pub published_ms: u64,
}

/// Which part of a topic's history [`Handle::history`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest `n` messages (the server caps `n` at its `history.max_reply_messages`).
    Last(u32),
    /// What followed these positions (the last [`Position`] seen of each stream); for
    /// streams not named, what was accepted at or after `since_ms`.
    Since {
        /// The last offset seen of each stream.
        positions: Vec<Position>,
        /// ms since the Unix epoch.
        since_ms: u64,
    },
}

/// An answer of [`Handle::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Oldest first, each publisher's in its order.
    pub messages: Vec<Message>,
    /// Messages asked for are gone (aged out, evicted, or held only by a server that died),
    /// at least `missed_at_least` of them (0: how many is unknown).
    pub gap: bool,
    /// See `gap`.
    pub missed_at_least: u64,
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator or a server could not be reached or refused the connection.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The coordinator or server answered with an error.
    #[error("{0}")]
    Refused(v1::Error),
    /// A topic broke the topic rules; nothing was sent.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// The rule it broke (part of the message, so not also a `source`).
        reason: TopicError,
    },
    /// The subscription is active on the client's server and on every other server linked to
    /// it except `pending`, which had not confirmed it within
    /// [`ClientConfig::request_timeout`] (their link to the client's server is slow, stalled
    /// or down). It stays subscribed (the client keeps the topics and restores them on
    /// reconnect), and those servers get it when their link resumes: once they all have,
    /// [`Event::SubscriptionConfirmed`] follows. Until then a message published on a pending
    /// server may not reach the client. If the server stops waiting for them (a pending
    /// server's links keep breaking for longer than its `peer_resume_ms`), no event follows.
    #[error(
        "subscribed, but servers {pending:?} have not confirmed it yet: it is active on every other server and reaches them when their links resume (Event::SubscriptionConfirmed follows)"
    )]
    NotConfirmed {
        /// Ids of the servers that had not confirmed.
        pending: Vec<String>,
    },
    /// A link broke or sent something unexpected.
    #[error("{0}")]
    Protocol(String),
    /// Nothing within the timeout.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The client was closed (or gave up reconnecting).
    #[error("client is closed")]
    Closed,
}

impl ClientError {
    /// The protocol error code behind this error, if the other side sent one.
    pub fn code(&self) -> Option<v1::ErrorCode> {
        match self {
            Self::Refused(e) => Some(e.error_code()),
            Self::Dial(e) => e.refusal_code(),
            _ => None,
        }
    }
}

/// State shared by the client's handles and its connection task.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    next_request: AtomicU64,
    /// How long a subscription change may wait for its answer.
    request_timeout: Duration,
    /// Cancelled by [`Client::close`] or when the [`Client`] is dropped.
    stop: CancellationToken,
    /// A newer login with the same `client_id` replaced this client: it must not reconnect
    /// (that would replace the newer one in turn).
    replaced: std::sync::atomic::AtomicBool,
    /// Publishes not yet confirmed by the server.
    outbox: Mutex<Outbox>,
    /// Room for more of them ([`ClientConfig::max_unconfirmed`]).
    outbox_room: tokio::sync::Semaphore,
    /// What the client has delivered, to drop copies of resent messages; the connection
    /// task's reader holds it while a connection runs.
    seen: Mutex<Seen>,
    /// The highest inbox id delivered: an inbox message at or below it is a copy.
    inbox_seen: AtomicU64,
    /// Positions in topics that keep history, recoveries under way, history requests.
    history: Mutex<history::Positions>,
    /// Woken when the server confirms publishes.
    confirmations: tokio::sync::Notify,
    /// The servers the last `Ready` listed: where the next login may go
    /// ([`ClientConfig::relay_logins`]).
    entry_points: Mutex<Vec<v1::ServerInfo>>,
}

impl Shared {
    /// Whether inbox message `id` is new (and records it).
    fn inbox_fresh(&self, id: u64) -> bool {
        self.inbox_seen.fetch_max(id, Ordering::Relaxed) < id
    }
}

impl Shared {
    /// The server confirmed every publish up to `up_to`: they will not be sent again.
    fn confirm(&self, up_to: u64) {
        let mut confirmed = 0;
        {
            let mut outbox = lock(&self.outbox);
            while outbox.unconfirmed.front().is_some_and(|u| u.seq <= up_to) {
                outbox.unconfirmed.pop_front();
                confirmed += 1;
            }
        }
        self.outbox_room.add_permits(confirmed);
        self.confirmations.notify_waiters();
    }
}

/// Publishes the server has not confirmed, oldest first.
#[derive(Debug, Default)]
struct Outbox {
    /// The last publish number given out.
    last: u64,
    unconfirmed: std::collections::VecDeque<Unconfirmed>,
    /// When a connection is lost, the last number given out: those up to it go out again on
    /// the next connection, ahead of the outbound queue (which holds only later ones).
    resend_up_to: u64,
}

/// A publish waiting for the server's confirmation.
#[derive(Debug)]
struct Unconfirmed {
    seq: u64,
    /// The encoded `Publish`.
    frame: Bytes,
    /// The alias of the connection it was first sent on, once that connection is lost.
    first_alias: Option<Arc<str>>,
}

/// The last publish number delivered from each publisher, so that a message resent after its
/// publisher lost a server is delivered once.
///
/// Originals are known by the alias their server stamped (`from_alias`, which no client can
/// forge). A resend names the alias it first went out under (`resent_from`, which the
/// publisher states): it is a copy if that publisher's originals or earlier resends already
/// reached its number. Resends never count against originals, so a client that claims another's
/// alias can at worst hide that publisher's resends, never its messages.
#[derive(Debug, Default)]
struct Seen {
    /// The publisher heard from last and its last number: messages come in runs from one
    /// publisher (a burst on one route), which then cost a string comparison, not a hash.
    /// Written back to `originals` when another publisher's message comes.
    recent: Option<(Box<str>, u64)>,
    originals: HashMap<Box<str>, u64>,
    resends: HashMap<Box<str>, u64>,
    /// Copies dropped.
    copies: u64,
}

/// Publishers [`Seen`] remembers (each way) before starting over.
const MAX_SEEN_PUBLISHERS: usize = 65_536;

impl Seen {
    /// Whether `m` is new, not a copy of a message already delivered.
    fn fresh(&mut self, m: &v1::Message) -> bool {
        if m.seq == 0 {
            return true;
        }
        let fresh = if m.resent_from.is_empty() {
            self.raise_original(&m.from_alias, m.seq)
        } else {
            let original = match &self.recent {
                Some((publisher, last)) if **publisher == *m.resent_from => Some(*last),
                _ => self.originals.get(m.resent_from.as_str()).copied(),
            };
            original.is_none_or(|last| last < m.seq)
                && raise(&mut self.resends, &m.resent_from, m.seq)
        };
        if !fresh {
            self.copies += 1;
        }
        fresh
    }

    /// [`raise`] for an original, through `recent`.
    fn raise_original(&mut self, publisher: &str, seq: u64) -> bool {
        if let Some((recent, last)) = &mut self.recent
            && **recent == *publisher
        {
            if *last >= seq {
                return false;
            }
            *last = seq;
            return true;
        }
        if let Some((recent, last)) = self.recent.take() {
            if self.originals.len() >= MAX_SEEN_PUBLISHERS {
                self.originals.clear();
            }
            self.originals.insert(recent, last);
        }
        let (publisher, last) = self
            .originals
            .remove_entry(publisher)
            .unwrap_or_else(|| (publisher.into(), 0));
        let fresh = last < seq;
        self.recent = Some((publisher, last.max(seq)));
        fresh
    }
}

/// Records `seq` as the last from `publisher` in `last`; `false` if it was not past it.
fn raise(last: &mut HashMap<Box<str>, u64>, publisher: &str, seq: u64) -> bool {
    match last.get_mut(publisher) {
        Some(known) if *known >= seq => false,
        Some(known) => {
            *known = seq;
            true
        }
        None => {
            if last.len() >= MAX_SEEN_PUBLISHERS {
                last.clear();
            }
            last.insert(publisher.into(), seq);
            true
        }
    }
}

#[derive(Debug, Default)]
struct State {
    alias: String,
    server_id: String,
    /// The node this client is (empty: none), from the server's `Ready`.
    node_id: String,
    /// Topics the client wants; restored on every reconnect.
    topics: BTreeSet<String>,
    /// Subscription changes waiting for the server's `Ack`, by request id.
    pending: HashMap<u64, Pending>,
    /// `ListNodes` requests waiting for their answer, by request id.
    lists: HashMap<u64, oneshot::Sender<v1::NodeList>>,
}

/// A subscription change waiting for the server's answer.
#[derive(Debug)]
struct Pending {
    /// Fires with the outcome; the requesting [`Handle`] holds the receiver. `None` when
    /// nobody waits (the restored subscriptions of a reconnect).
    done: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// Topics the request added to [`State::topics`], taken back out if the server refuses it.
    added: Vec<String>,
    /// The topics of a subscribe (for [`Event::SubscriptionConfirmed`]); `None` for an
    /// unsubscribe.
    subscribe: Option<Vec<String>>,
    /// Servers that had not confirmed the change, from a first `Ack` that named them.
    unconfirmed: Option<Vec<String>>,
    /// The requester has been told it failed (it timed out), or nobody waits: the outcome
    /// is an event now.
    reported: bool,
    /// The request whose `Ack` answers this one: itself, or, after a reconnect, the
    /// resubscription that covers it.
    answered_by: u64,
}

impl Pending {
    /// A request `id` that `done` waits for.
    fn new(
        id: u64,
        done: oneshot::Sender<Result<(), ClientError>>,
        added: Vec<String>,
        subscribe: Option<Vec<String>>,
    ) -> Self {
        Self {
            done: Some(done),
            added,
            subscribe,
            unconfirmed: None,
            reported: false,
            answered_by: id,
        }
    }

    /// Ends the request with `outcome`: tells the requester, or, if it has been told already,
    /// returns the event that says so (a subscribe confirmed after all).
    fn finish(self, outcome: Result<(), ClientError>) -> Option<Event> {
        if !self.reported {
            if let Some(done) = self.done {
                let _ = done.send(outcome);
            }
            return None;
        }
        match (outcome, self.subscribe) {
            (Ok(()), Some(topics)) => Some(Event::SubscriptionConfirmed { topics }),
            _ => None,
        }
    }
}

impl State {
    /// Applies the server's `Ack` for request `id`, which names the servers that had not
    /// confirmed the change yet (`pending`, empty when every linked server has). Returns the
    /// events it amounts to.
    ///
    /// A complete `Ack` completes the requests it answers. A first `Ack` with servers pending
    /// completes an unsubscribe (the client's server no longer delivers those topics) and
    /// leaves a subscribe waiting for the second `Ack`; a second one that still names servers
    /// means the server stopped waiting for them, and fails a subscribe still being waited
    /// for with [`ClientError::NotConfirmed`].
    fn acknowledge(&mut self, id: u64, pending: Vec<String>) -> Vec<Event> {
        let answered: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.answered_by == id)
            .map(|(request, _)| *request)
            .collect();
        let mut events = Vec::new();
        for request in answered {
            let Some(mut p) = self.pending.remove(&request) else {
                continue;
            };
            let outcome = if pending.is_empty() || p.subscribe.is_none() {
                Ok(())
            } else if p.unconfirmed.is_none() {
                p.unconfirmed = Some(pending.clone());
                self.pending.insert(request, p);
                continue;
            } else {
                Err(ClientError::NotConfirmed {
                    pending: pending.clone(),
                })
            };
            events.extend(p.finish(outcome));
        }
        events
    }

    /// Whether a subscription change asked after request `id` still waits for its answer.
    fn asked_since(&self, id: u64) -> bool {
        self.pending
            .iter()
            .any(|(request, p)| *request > id && p.answered_by == *request && p.done.is_some())
    }

    /// A new connection restored every subscription with request `id` (`topics`, answered
    /// with `pending`). Requests made before it are answered by that restoration: what it
    /// confirmed they get now, and what is pending they wait for with it.
    fn resubscribed(&mut self, id: u64, topics: &[String], pending: Vec<String>) -> Vec<Event> {
        // An earlier restoration still unconfirmed is superseded by this one.
        self.pending
            .retain(|_, p| p.answered_by >= id || p.done.is_some());
        for p in self.pending.values_mut().filter(|p| p.answered_by < id) {
            p.answered_by = id;
            p.unconfirmed = None;
        }
        if !pending.is_empty() && !topics.is_empty() {
            // Nobody waits for the restoration: its confirmation is an event.
            self.pending.insert(
                id,
                Pending {
                    done: None,
                    added: Vec::new(),
                    subscribe: Some(topics.to_vec()),
                    unconfirmed: None,
                    reported: true,
                    answered_by: id,
                },
            );
        }
        self.acknowledge(id, pending)
    }

    /// Fails request `id` with the server's refusal and forgets the topics it added, so they
    /// are not resubscribed (and refused again) on every reconnect.
    fn refuse(&mut self, id: u64, error: v1::Error) -> bool {
        let Some(pending) = self.pending.remove(&id) else {
            return false;
        };
        for topic in &pending.added {
            self.topics.remove(topic);
        }
        if let Some(done) = pending.done {
            let _ = done.send(Err(ClientError::Refused(error)));
        }
        true
    }
}

/// A cloneable handle for publishing and changing subscriptions, usable from any task while
/// the [`Client`] receives events elsewhere.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    /// Outbound frames; the connection task holds the receiver.
    out: queue::Sender<Bytes>,
}

/// A connected client. Dropping it closes the connection.
#[derive(Debug)]
pub struct Client {
    handle: Handle,
    /// Events from the connection task, which holds the sender, in bursts (one per burst of
    /// frames read); closed when the task ends.
    events: connection::EventRx,
    /// The rest of the burst being handed out.
    ready: std::collections::VecDeque<Event>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// [`ClientConfig::auto_ack_inbox`], and the highest inbox id handed out and not yet
    /// acknowledged.
    auto_ack_inbox: bool,
    unacked: u64,
}

impl Client {
    /// Negotiates a server through the coordinator and connects to it.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let urls = relaymesh_net::url::split_list(&config.coordinator);
        if urls.is_empty() {
            return Err(DialError::BadUrl {
                url: config.coordinator.clone(),
                reason: "it names no coordinator".into(),
            }
            .into());
        }
        for url in urls {
            relaymesh_net::url::check(url).map_err(|e| DialError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            next_request: AtomicU64::new(1),
            request_timeout: config.request_timeout,
            stop: CancellationToken::new(),
            replaced: std::sync::atomic::AtomicBool::new(false),
            outbox: Mutex::new(Outbox::default()),
            outbox_room: tokio::sync::Semaphore::new(
                config
                    .max_unconfirmed
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            ),
            seen: Mutex::new(Seen::default()),
            inbox_seen: AtomicU64::new(0),
            history: Mutex::new(history::Positions::default()),
            confirmations: tokio::sync::Notify::new(),
            entry_points: Mutex::new(Vec::new()),
        });
        let config_auto_ack = config.auto_ack_inbox;
        let (out_tx, out_rx) = queue::bounded(config.outbound_queue.max(1));
        let (events_tx, events_rx) = connection::event_queue(config.event_queue);
        let first = connection::establish(
            &config,
            &shared,
            &events_tx,
            &[],
            connection::Arrivals::Deliver,
        )
        .await?;
        let task = tokio::spawn(connection::drive(
            config,
            shared.clone(),
            first,
            out_rx,
            out_tx.downgrade(),
            events_tx,
        ));
        Ok(Self {
            handle: Handle {
                shared,
                out: out_tx,
            },
            events: events_rx,
            ready: std::collections::VecDeque::new(),
            task: Some(task),
            auto_ack_inbox: config_auto_ack,
            unacked: 0,
        })
    }

    /// A handle for publishing and subscribing from other tasks.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The next event; `None` once the client has closed (or given up reconnecting).
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                if self.auto_ack_inbox
                    && let Event::Direct(Direct { inbox_id, .. }) = &event
                    && *inbox_id > 0
                {
                    self.unacked = self.unacked.max(*inbox_id);
                }
                // The burst's inbox messages are all handed out with this one: one
                // acknowledgement for them (when the outbound queue is full, with the next).
                if self.ready.is_empty()
                    && self.unacked > 0
                    && self.handle.try_ack_inbox(self.unacked)
                {
                    self.unacked = 0;
                }
                return Some(event);
            }
            if self.unacked > 0 && self.handle.try_ack_inbox(self.unacked) {
                self.unacked = 0;
            }
            // Taken over whole (no copy) when the last burst is used up, which it is here.
            self.ready = self.events.recv().await?.into();
        }
    }

    /// See [`Handle::subscribe`].
    pub async fn subscribe<I, S>(&self, topics: I) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.handle.subscribe(topics).await
    }

    /// See [`Handle::flush`].
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.handle.flush().await
    }

    /// See [`Handle::unsubscribe`].
    pub async fn unsubscribe<I, S>(&self, topics: I) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.handle.unsubscribe(topics).await
    }

    /// See [`Handle::publish`].
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        self.handle.publish(topic, payload).await
    }

    /// See [`Handle::send`].
    pub async fn send(&self, to_node: &str, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        self.handle.send(to_node, payload).await
    }

    /// See [`Handle::signal`].
    pub async fn signal(
        &self,
        to_node: &str,
        kind: v1::SignalKind,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        self.handle.signal(to_node, kind, payload).await
    }

    /// See [`Handle::node_id`].
    pub fn node_id(&self) -> String {
        self.handle.node_id()
    }

    /// See [`Handle::history`].
    pub async fn history(
        &self,
        topic: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ClientError> {
        self.handle.history(topic, query).await
    }

    /// See [`Handle::list_nodes`].
    pub async fn list_nodes(&self, limit: u32, filter: &str) -> Result<NodeList, ClientError> {
        self.handle.list_nodes(limit, filter).await
    }

    /// See [`Handle::watch_presence`].
    pub async fn watch_presence(&self) -> Result<(), ClientError> {
        self.handle.watch_presence().await
    }

    /// See [`Handle::alias`].
    pub fn alias(&self) -> String {
        self.handle.alias()
    }

    /// See [`Handle::server_id`].
    pub fn server_id(&self) -> String {
        self.handle.server_id()
    }

    /// Closes the client: when connected, sends what is queued and closes the connection
    /// cleanly; when reconnecting, gives up. Waits for the connection task.
    pub async fn close(mut self) {
        self.handle.shared.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.handle.shared.stop.cancel();
    }
}

impl Handle {
    /// Subscribes to `topics` and waits for the server's acknowledgement, after which every
    /// message published anywhere in the cluster on those topics reaches this client.
    ///
    /// When some servers have not confirmed the subscription within
    /// [`ClientConfig::request_timeout`] (their link to this client's server is stalled or
    /// down), this fails with [`ClientError::NotConfirmed`] naming them: the subscription is
    /// active everywhere else and stays (the topics are kept, and restored on reconnect), and
    /// [`Event::SubscriptionConfirmed`] follows once those servers have it. A request that
    /// times out without any answer ([`ClientError::Timeout`]) keeps its topics too.
    pub async fn subscribe<I, S>(&self, topics: I) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let topics = checked(topics)?;
        self.request(|state, request_id, done| {
            let added: Vec<String> = topics
                .iter()
                .filter(|t| state.topics.insert((*t).clone()))
                .cloned()
                .collect();
            (
                v1::ClientToServer::subscribe(v1::Subscribe {
                    request_id,
                    topics: topics.clone(),
                    recover: Vec::new(),
                }),
                Pending::new(request_id, done, added, Some(topics)),
            )
        })
        .await
    }

    /// Waits until the server has handled everything sent before it, publishes included: a
    /// publish the server refused has been reported (as [`Event::Forbidden`], ahead of any
    /// event that follows) by the time this returns.
    pub async fn flush(&self) -> Result<(), ClientError> {
        // An empty unsubscribe is answered in order, after everything queued before it.
        self.unsubscribe(Vec::<String>::new()).await
    }

    /// Unsubscribes from `topics` and waits for the server's acknowledgement. It returns at
    /// the server's first answer, even one that names servers yet to confirm the change: from
    /// then on this client's server no longer delivers those topics to it.
    pub async fn unsubscribe<I, S>(&self, topics: I) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let topics = checked(topics)?;
        {
            let mut positions = lock(&self.shared.history);
            for t in &topics {
                positions.forget(t);
            }
        }
        self.request(|state, request_id, done| {
            for t in &topics {
                state.topics.remove(t);
            }
            (
                v1::ClientToServer::unsubscribe(v1::Unsubscribe { request_id, topics }),
                Pending::new(request_id, done, Vec::new(), None),
            )
        })
        .await
    }

    /// Queues a message for `topic`. Returns once it is queued (waiting if the outbound queue
    /// is full); delivery is at most once.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        topic::validate(topic, topic::DEFAULT_MAX_TOPIC_LEN).map_err(|reason| {
            ClientError::InvalidTopic {
                topic: topic.to_owned(),
                reason,
            }
        })?;
        let payload = payload.into();
        // Room among the unconfirmed, then in the outbound queue; then numbered, kept and
        // queued at once, so numbers go out in order.
        let room = self
            .shared
            .outbox_room
            .acquire()
            .await
            .map_err(|_| ClientError::Closed)?;
        let permit = self.out.reserve().await.map_err(|_| ClientError::Closed)?;
        room.forget();
        let mut outbox = lock(&self.shared.outbox);
        outbox.last += 1;
        let seq = outbox.last;
        let frame = encode(&v1::ClientToServer::publish(v1::Publish {
            topic: topic.to_owned(),
            payload,
            seq,
            resent_from: String::new(),
        }));
        outbox.unconfirmed.push_back(Unconfirmed {
            seq,
            frame: frame.clone(),
            first_alias: None,
        });
        permit.send(frame);
        Ok(())
    }

    /// Queues a direct message to node `to_node` of this client's account (its routing
    /// scope) and returns its number. It reaches every session of that node, wherever in the
    /// cluster it is connected, once, in order with this client's other messages; like a
    /// publish it is sent again after a lost connection until a server confirms it. A node
    /// with no session gets [`Event::Undeliverable`] with this number back.
    pub async fn send(&self, to_node: &str, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        let payload = payload.into();
        let to_node = to_node.to_owned();
        self.numbered(true, move |seq| {
            v1::ClientToServer::send(v1::Send {
                to_node,
                payload,
                seq,
                resent_from: String::new(),
            })
        })
        .await
    }

    /// Sends a signal (WebRTC set-up: offer, answer, ICE candidate...) to node `to_node` and
    /// returns its number. Signals are relayed at most once and never queued for an offline
    /// node: [`Event::Undeliverable`] says when one reached no one (or exceeded the server's
    /// signal rate).
    pub async fn signal(
        &self,
        to_node: &str,
        kind: v1::SignalKind,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        let payload = payload.into();
        let to_node = to_node.to_owned();
        self.numbered(false, move |seq| {
            v1::ClientToServer::signal(v1::Signal {
                to_node,
                kind: kind as i32,
                payload,
                seq,
            })
        })
        .await
    }

    /// Numbers and queues the frame `build` makes; kept until confirmed (and sent again on the
    /// next connection if this one is lost) when `keep`.
    async fn numbered(
        &self,
        keep: bool,
        build: impl FnOnce(u64) -> v1::ClientToServer,
    ) -> Result<u64, ClientError> {
        let room = if keep {
            let room = self
                .shared
                .outbox_room
                .acquire()
                .await
                .map_err(|_| ClientError::Closed)?;
            Some(room)
        } else {
            None
        };
        let permit = self.out.reserve().await.map_err(|_| ClientError::Closed)?;
        let mut outbox = lock(&self.shared.outbox);
        outbox.last += 1;
        let seq = outbox.last;
        let frame = encode(&build(seq));
        if let Some(room) = room {
            room.forget();
            outbox.unconfirmed.push_back(Unconfirmed {
                seq,
                frame: frame.clone(),
                first_alias: None,
            });
        }
        permit.send(frame);
        Ok(seq)
    }

    /// Reads `topic`'s history (a topic the servers keep history for, which the client's role
    /// may subscribe to; it need not be subscribed): a late joiner's backlog, or the last known
    /// state. Refused with `FORBIDDEN` outside the role's subscribe rules, `NOT_FOUND` on a
    /// topic without history, `RATE_LIMITED` over the server's `history.requests_per_s`.
    pub async fn history(
        &self,
        topic: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ClientError> {
        topic::validate(topic, topic::DEFAULT_MAX_TOPIC_LEN).map_err(|reason| {
            ClientError::InvalidTopic {
                topic: topic.to_owned(),
                reason,
            }
        })?;
        let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        lock(&self.shared.history).ask(request_id, done);
        let (last, since, since_ms) = match query {
            HistoryQuery::Last(n) => (n.max(1), Vec::new(), 0),
            HistoryQuery::Since {
                positions,
                since_ms,
            } => (
                0,
                positions
                    .iter()
                    .map(|p| v1::StreamPosition {
                        stream: p.stream,
                        offset: p.offset,
                    })
                    .collect(),
                since_ms,
            ),
        };
        let frame = encode(&v1::ClientToServer::history(v1::History {
            request_id,
            topic: topic.to_owned(),
            last,
            since,
            since_ms,
        }));
        let outcome = match self.out.send(frame).await {
            Err(_) => Err(ClientError::Closed),
            Ok(()) => match tokio::time::timeout(self.shared.request_timeout, answer).await {
                Ok(Ok(page)) => page,
                Ok(Err(_)) => Err(ClientError::Protocol(
                    "the connection was lost before the history came".into(),
                )),
                Err(_) => Err(ClientError::Timeout("waiting for the history".into())),
            },
        };
        lock(&self.shared.history).cancel(request_id);
        outcome
    }

    /// Online nodes of this client's scope: at most `limit` (the server caps it; 0 asks for
    /// the cap) chosen at random among those whose name or location contains `filter` (ASCII
    /// case-insensitive; empty: all), and how many match in all. Answered from the server's
    /// copy of the cluster's directory.
    pub async fn list_nodes(&self, limit: u32, filter: &str) -> Result<NodeList, ClientError> {
        let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        lock(&self.shared.state).lists.insert(request_id, done);
        let frame = encode(&v1::ClientToServer::list_nodes(v1::ListNodes {
            request_id,
            limit,
            filter: filter.to_owned(),
        }));
        let sent = self.out.send(frame).await;
        let outcome = match sent {
            Err(_) => Err(ClientError::Closed),
            Ok(()) => match tokio::time::timeout(self.shared.request_timeout, answer).await {
                Ok(Ok(list)) => Ok(NodeList {
                    nodes: list.nodes,
                    total: list.total,
                }),
                // The connection was lost before the answer: ask again.
                Ok(Err(_)) => Err(ClientError::Protocol(
                    "the connection was lost before the node list came".into(),
                )),
                Err(_) => Err(ClientError::Timeout("waiting for the node list".into())),
            },
        };
        lock(&self.shared.state).lists.remove(&request_id);
        outcome
    }

    /// Subscribes to presence events of this client's scope: [`Event::Presence`] for each
    /// node that comes online, goes offline or changes, from now on (restored after a
    /// reconnect like any subscription).
    pub async fn watch_presence(&self) -> Result<(), ClientError> {
        self.subscribe([relaymesh_proto::node::PRESENCE_TOPIC])
            .await
    }

    /// Acknowledges this node's inbox up to `inbox_id` ([`Direct::inbox_id`]): those messages
    /// are deleted and never come again. Only needed with [`ClientConfig::auto_ack_inbox`]
    /// off.
    pub async fn ack_inbox(&self, inbox_id: u64) -> Result<(), ClientError> {
        let frame = encode(&v1::ClientToServer::inbox_ack(v1::InboxAck {
            up_to: inbox_id,
        }));
        self.out.send(frame).await.map_err(|_| ClientError::Closed)
    }

    /// Waits until the server has confirmed publish or direct message `seq` (what
    /// [`Handle::send`] returned, or the `seq` of a publish): routed, refused, or, for a
    /// direct message to an offline node, stored or refused by the inbox, so its
    /// [`Event::Accepted`] or [`Event::Undeliverable`] has been queued by then. Servers
    /// confirm at each subscription change ([`Handle::flush`]) and at their heartbeat interval.
    pub async fn confirmed(&self, seq: u64) -> Result<(), ClientError> {
        let wait = async {
            loop {
                let notified = self.shared.confirmations.notified();
                let pending = lock(&self.shared.outbox)
                    .unconfirmed
                    .iter()
                    .any(|u| u.seq == seq);
                if !pending {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(self.shared.request_timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout(format!("waiting for the server to confirm {seq}")))
    }

    /// [`Handle::ack_inbox`] if the outbound queue has room now.
    fn try_ack_inbox(&self, inbox_id: u64) -> bool {
        let frame = encode(&v1::ClientToServer::inbox_ack(v1::InboxAck {
            up_to: inbox_id,
        }));
        match self.out.try_send(frame) {
            Ok(()) => true,
            Err(queue::TrySendError::Closed(_)) => true,
            Err(queue::TrySendError::Full(_)) => false,
        }
    }

    /// The node this client is (empty: none): a node token login's node, or an Ed25519 key
    /// login's ([`relaymesh_proto::node::id_of_key`]).
    pub fn node_id(&self) -> String {
        lock(&self.shared.state).node_id.clone()
    }

    /// The client's alias on its current connection, as stamped on what it publishes.
    pub fn alias(&self) -> String {
        lock(&self.shared.state).alias.clone()
    }

    /// The server the client is connected to (or was last connected to).
    pub fn server_id(&self) -> String {
        lock(&self.shared.state).server_id.clone()
    }

    /// Topics the client is subscribed to.
    pub fn topics(&self) -> Vec<String> {
        lock(&self.shared.state).topics.iter().cloned().collect()
    }

    /// Sends a subscription change and waits for its answer, at most `request_timeout`.
    async fn request(
        &self,
        build: impl FnOnce(
            &mut State,
            u64,
            oneshot::Sender<Result<(), ClientError>>,
        ) -> (v1::ClientToServer, Pending),
    ) -> Result<(), ClientError> {
        let (done, mut wait) = oneshot::channel();
        let (request_id, frame) = {
            let mut state = lock(&self.shared.state);
            let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
            let (msg, pending) = build(&mut state, request_id, done);
            state.pending.insert(request_id, pending);
            (request_id, encode(&msg))
        };
        self.out
            .send(frame)
            .await
            .map_err(|_| ClientError::Closed)?;
        if let Ok(answer) = tokio::time::timeout(self.shared.request_timeout, &mut wait).await {
            return answer.map_err(|_| ClientError::Closed)?;
        }
        // Under the lock, so the answer either came just now or is reported as an event.
        let mut state = lock(&self.shared.state);
        match wait.try_recv() {
            Ok(answer) => return answer,
            Err(oneshot::error::TryRecvError::Closed) => return Err(ClientError::Closed),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // The entry stays: a late answer still applies (a late refusal takes the topics back
        // out, so they are not resubscribed and refused forever; a late confirmation is
        // reported as `Event::SubscriptionConfirmed`).
        let Some(entry) = state.pending.get_mut(&request_id) else {
            return Err(ClientError::Closed);
        };
        entry.reported = true;
        match &entry.unconfirmed {
            Some(pending) => Err(ClientError::NotConfirmed {
                pending: pending.clone(),
            }),
            None => Err(ClientError::Timeout(format!(
                "no answer from the server within {} ms (is the event queue being read?)",
                self.shared.request_timeout.as_millis()
            ))),
        }
    }
}

fn checked<I, S>(topics: I) -> Result<Vec<String>, ClientError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    topics
        .into_iter()
        .map(|t| {
            let t = t.into();
            if t == relaymesh_proto::node::PRESENCE_TOPIC {
                return Ok(t);
            }
            match topic::validate(&t, topic::DEFAULT_MAX_TOPIC_LEN) {
                Ok(()) => Ok(t),
                Err(reason) => Err(ClientError::InvalidTopic { topic: t, reason }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(request_timeout: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::default()),
            next_request: AtomicU64::new(1),
            request_timeout,
            stop: CancellationToken::new(),
            replaced: std::sync::atomic::AtomicBool::new(false),
            outbox: Mutex::new(Outbox::default()),
            outbox_room: tokio::sync::Semaphore::new(16),
            seen: Mutex::new(Seen::default()),
            inbox_seen: AtomicU64::new(0),
            history: Mutex::new(history::Positions::default()),
            confirmations: tokio::sync::Notify::new(),
            entry_points: Mutex::new(Vec::new()),
        })
    }

    fn waiting(
        state: &mut State,
        id: u64,
        subscribe: bool,
    ) -> oneshot::Receiver<Result<(), ClientError>> {
        let (done, wait) = oneshot::channel();
        let topics = subscribe.then(|| vec![format!("t{id}")]);
        state
            .pending
            .insert(id, Pending::new(id, done, Vec::new(), topics));
        wait
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_partial_ack_holds_a_subscribe_until_the_second_and_completes_an_unsubscribe() {
        let mut state = State::default();
        let mut sub = waiting(&mut state, 1, true);
        let mut unsub = waiting(&mut state, 2, false);
        assert!(state.acknowledge(1, names(&["a"])).is_empty());
        assert!(sub.try_recv().is_err(), "still waiting for the second Ack");
        assert!(state.acknowledge(2, names(&["a"])).is_empty());
        assert!(matches!(unsub.try_recv(), Ok(Ok(()))));
        assert!(state.acknowledge(1, Vec::new()).is_empty());
        assert!(matches!(sub.try_recv(), Ok(Ok(()))));
        assert!(state.pending.is_empty());
        // A second Ack that still names servers: the server stopped waiting.
        let mut sub = waiting(&mut state, 3, true);
        state.acknowledge(3, names(&["a"]));
        state.acknowledge(3, names(&["a"]));
        assert!(matches!(
            sub.try_recv(),
            Ok(Err(ClientError::NotConfirmed { pending })) if pending == names(&["a"])
        ));
        assert!(state.pending.is_empty());
    }

    #[tokio::test]
    async fn a_subscribe_not_confirmed_in_time_fails_keeps_its_topics_and_is_confirmed_later() {
        let shared = shared(Duration::from_millis(50));
        let (out, mut sent) = queue::bounded(4);
        let handle = Handle {
            shared: shared.clone(),
            out,
        };
        let server = shared.clone();
        tokio::spawn(async move {
            // The server's first Ack names "a".
            let _frame = sent.recv().await;
            let id = *lock(&server.state).pending.keys().next().unwrap();
            lock(&server.state).acknowledge(id, names(&["a"]));
            std::future::pending::<()>().await;
        });
        let result = handle.subscribe(["room/x"]).await;
        assert!(
            matches!(&result, Err(ClientError::NotConfirmed { pending }) if *pending == names(&["a"])),
            "{result:?}"
        );
        assert_eq!(handle.topics(), names(&["room/x"]), "the topic is kept");
        let id = *lock(&shared.state).pending.keys().next().unwrap();
        let events = lock(&shared.state).acknowledge(id, Vec::new());
        assert_eq!(
            events,
            vec![Event::SubscriptionConfirmed {
                topics: names(&["room/x"])
            }]
        );
        assert!(lock(&shared.state).pending.is_empty());
    }

    #[test]
    fn a_partial_resubscription_carries_earlier_requests_and_confirms_with_an_event() {
        let mut state = State::default();
        let mut sub = waiting(&mut state, 1, true);
        state.acknowledge(1, names(&["a"]));
        let mut unsub = waiting(&mut state, 2, false);
        let restored = names(&["t1", "x"]);
        // Reconnected: the resubscription (request 3) is answered with "b" pending.
        assert!(state.resubscribed(3, &restored, names(&["b"])).is_empty());
        assert!(matches!(unsub.try_recv(), Ok(Ok(()))));
        assert!(sub.try_recv().is_err());
        assert_eq!(
            state.pending[&1].unconfirmed,
            Some(names(&["b"])),
            "it now waits for what the new server waits for"
        );
        // The old server's second Ack for request 1 is gone with its connection; request 3's
        // confirms both.
        assert!(state.acknowledge(1, Vec::new()).is_empty());
        let events = state.acknowledge(3, Vec::new());
        assert_eq!(
            events,
            vec![Event::SubscriptionConfirmed { topics: restored }]
        );
        assert!(matches!(sub.try_recv(), Ok(Ok(()))));
        assert!(state.pending.is_empty());
        // A complete resubscription answers everything at once.
        let mut sub = waiting(&mut state, 4, true);
        state.acknowledge(4, names(&["a"]));
        assert!(
            state
                .resubscribed(5, &names(&["t4"]), Vec::new())
                .is_empty()
        );
        assert!(matches!(sub.try_recv(), Ok(Ok(()))));
        assert!(state.pending.is_empty());
    }

    fn msg(from: &str, seq: u64, resent_from: &str) -> v1::Message {
        v1::Message {
            topic: "t".into(),
            from_alias: from.into(),
            seq,
            resent_from: resent_from.into(),
            ..v1::Message::default()
        }
    }

    #[test]
    fn a_resent_message_already_delivered_is_dropped_once_and_only_then() {
        let mut seen = Seen::default();
        // The originals from "old", up to 3 (4 and 5 were lost with its server).
        for seq in 1..=3 {
            assert!(seen.fresh(&msg("old", seq, "")));
        }
        // Sent again under a new alias after the publisher lost "old"'s server: 2 and 3 are
        // copies, 4 and 5 are new.
        assert!(!seen.fresh(&msg("new", 2, "old")));
        assert!(!seen.fresh(&msg("new", 3, "old")));
        assert!(seen.fresh(&msg("new", 4, "old")));
        assert!(seen.fresh(&msg("new", 5, "old")));
        // The same resend again (after a second failover) is a copy.
        assert!(!seen.fresh(&msg("newer", 5, "old")));
        // The publisher's later messages under its new alias, and unnumbered ones, pass.
        assert!(seen.fresh(&msg("new", 6, "")));
        assert!(seen.fresh(&msg("other", 0, "")));
        assert!(seen.fresh(&msg("other", 0, "")));
        assert_eq!(seen.copies, 3);
    }

    #[test]
    fn publishers_taking_turns_keep_their_own_numbers() {
        let mut seen = Seen::default();
        // Runs from "a" and "b" in turns: each keeps its own last number through the switches.
        assert!(seen.fresh(&msg("a", 1, "")));
        assert!(seen.fresh(&msg("a", 2, "")));
        assert!(seen.fresh(&msg("b", 1, "")));
        assert!(!seen.fresh(&msg("a", 2, "")));
        assert!(seen.fresh(&msg("a", 3, "")));
        assert!(!seen.fresh(&msg("b", 1, "")));
        assert!(seen.fresh(&msg("b", 2, "")));
        // A resend of "a"'s messages is checked against "a"'s originals whether or not "a"
        // was heard from last.
        assert!(!seen.fresh(&msg("a2", 3, "a")));
        assert!(seen.fresh(&msg("a2", 4, "a")));
        assert!(seen.fresh(&msg("b", 3, "")));
        assert!(!seen.fresh(&msg("b2", 3, "b")));
        assert_eq!(seen.copies, 4);
    }

    #[test]
    fn a_client_claiming_anothers_alias_cannot_hide_its_messages() {
        let mut seen = Seen::default();
        assert!(seen.fresh(&msg("victim", 1, "")));
        // A forged "resend" in the victim's name with a huge number...
        assert!(seen.fresh(&msg("mallory", u64::MAX - 1, "victim")));
        // ...does not make the victim's own messages look like copies.
        assert!(seen.fresh(&msg("victim", 2, "")));
        assert!(seen.fresh(&msg("victim", 3, "")));
    }
}
