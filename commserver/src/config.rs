//! Comm server configuration: a TOML file (every key optional, defaults below), overridden by
//! `--coordinator`, `--listen`, `--public-url` and `--id` on the command line and by
//! `RELAYMESH_CLUSTER_SECRET` in the environment.

use std::net::SocketAddr;
use std::sync::Arc;

use relaymesh_net::config::{ConfigError, check_link_timing, check_serving, ensure};
use relaymesh_net::serve::{ServeOptions, ServeStats};
use relaymesh_net::ws::WsLimits;
use serde::Deserialize;

/// Bytes a delivered or forwarded frame may add to a payload besides the topic: alias, account,
/// field tags and lengths.
pub(crate) const ENVELOPE_OVERHEAD: usize = 1024;

/// Every setting of the comm server. Field names are the config file keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Coordinator base URLs, comma-separated, e.g. `ws://10.0.0.1:7400,ws://10.0.0.2:7400`:
    /// the server registers with every one. A URL whose host is a name gets one link per
    /// address the name resolves to (a Kubernetes headless Service of the coordinators),
    /// looked up again every `coordinator_resolve_ms`.
    pub coordinator: String,
    /// How often coordinator names are resolved again, to follow coordinators that come and
    /// go.
    pub coordinator_resolve_ms: u64,
    /// Address to listen on for clients, peers and operators.
    pub listen: SocketAddr,
    /// Base URL clients and peers use to reach this server; defaults to `ws://<listen address>`.
    pub public_url: Option<String>,
    /// Stable server id; defaults to one derived from the public URL, which is stable as long
    /// as the server comes back at the same address.
    pub id: Option<String>,
    /// Secret shared by the coordinator and all comm servers. Prefer `RELAYMESH_CLUSTER_SECRET`.
    pub cluster_secret: String,
    /// File holding this server's Ed25519 private key (hex, as `meshctl keygen` writes it).
    /// When set, the server proves itself to the coordinator and to peers with this key
    /// (challenge-response) instead of the cluster secret.
    pub identity_key_file: Option<std::path::PathBuf>,
    /// Address of the TCP/UDP device gateway's driver API (`--dispatch-listen`); the gateway is
    /// off when unset.
    pub dispatch_listen: Option<SocketAddr>,
    /// Token drivers present (`Authorization: Bearer` or `bearer_token`); prefer
    /// `RELAYMESH_DISPATCH_SECRET`. Required with `dispatch_listen`.
    pub dispatch_secret: String,
    /// Address the device ports are opened on.
    pub dispatch_bind_ip: std::net::IpAddr,
    /// TCP devices per port at most; more are refused (counted).
    pub dispatch_max_clients_per_port: usize,
    /// Events queued per driver; when full, events for it are dropped (counted).
    pub dispatch_driver_queue: usize,
    /// Writes queued per TCP device; when full, writes are dropped (counted).
    pub dispatch_write_queue: usize,
    /// Bytes read from a device at once (each read becomes one RECEIVED, never truncated).
    pub dispatch_read_bytes: usize,
    /// Largest WebSocket message from a driver (so the largest WRITE).
    pub dispatch_max_frame_bytes: usize,
    /// Bytes queued per driver; beyond, events for it are dropped (counted).
    pub dispatch_driver_queue_bytes: usize,
    /// Bytes of driver writes queued for one port's TCP devices; beyond, writes are dropped
    /// (counted).
    pub dispatch_port_write_bytes: usize,
    /// Device bytes per second per port (0: unlimited). TCP devices over it are read more
    /// slowly; UDP datagrams over it are dropped (counted).
    pub dispatch_port_bytes_per_s: u64,
    /// Bridge devices into the mesh in this account (routing scope): device data is published
    /// on `dispatch/{tcp|udp}/{port}/{ip}` and messages on `.../write` are written to the
    /// device. Off when unset.
    pub dispatch_mesh_account: Option<String>,
    /// Ed25519 public keys (hex) of the servers allowed to open peer links to this one. When
    /// set, a peer must prove it holds one of them and the cluster secret alone is refused.
    pub trusted_peer_keys: Vec<String>,
    /// Most clients connected at once (reported to the coordinator, enforced at reservation).
    pub max_clients: u32,
    /// Lifetime of a login key in milliseconds.
    pub key_ttl_ms: u64,
    /// Keys reserved but not yet redeemed; further reservations are refused.
    pub max_pending_keys: usize,
    /// Messages queued for one client (a batch for a client that takes them, `batch=1`,
    /// counts once; `client_queue_bytes` bounds it too); when full, messages for it are dropped
    /// and counted.
    pub client_queue: usize,
    /// Bytes queued for one client, whatever the message count; beyond it messages are dropped.
    pub client_queue_bytes: usize,
    /// A client whose queue stays full (never drains) this long after its first drop is
    /// disconnected with SLOW_CONSUMER.
    pub slow_consumer_ms: u64,
    /// Forwards queued for one peer server; when full, forwards are dropped and counted.
    pub peer_queue: usize,
    /// Bytes queued for one peer server, whatever the forward count.
    pub peer_queue_bytes: usize,
    /// Control messages queued per link (replies, interest changes); a link that overflows
    /// this is closed.
    pub control_queue: usize,
    /// Topics one client may subscribe to.
    pub max_subscriptions: usize,
    /// Signals (`Signal`) one session may send per second on average; more are answered
    /// `Undeliverable{RATE_LIMITED}`.
    pub signal_rate_per_s: u32,
    /// Signals one session may send in a burst above `signal_rate_per_s`.
    pub signal_burst: u32,
    /// Most nodes one `ListNodes` answer carries.
    pub max_list_nodes: usize,
    /// Direct messages for offline nodes one session may have waiting for the coordinator to
    /// store them; more are answered `Undeliverable{LIMIT_EXCEEDED}`.
    pub max_pending_inbox: usize,
    /// Longest topic name in bytes.
    pub max_topic_bytes: usize,
    /// Largest WebSocket message accepted from a client or peer, in bytes.
    pub max_frame_bytes: usize,
    /// Most publishes a client may send in one `PublishBatch` (0: no batches); more end the
    /// session with `LIMIT_EXCEEDED`.
    pub max_batch_publishes: usize,
    /// Bytes read from a connection per syscall; the buffer is held only while frames arrive.
    pub read_buffer_bytes: usize,
    /// Bytes a connection buffers before writing without an explicit flush.
    pub write_buffer_bytes: usize,
    /// How long, in microseconds, a reader fanning out one batch may spend writing it to idle
    /// clients' sockets itself (skipping their writer tasks) before it queues the rest for
    /// them. Unset: no limit when the runtime has one worker thread (queueing would not spread
    /// the writes over cores), 250 µs otherwise. 0: never write directly.
    pub direct_write_budget_us: Option<u64>,
    /// Open TCP connections at most (clients, peers and HTTP).
    pub max_connections: usize,
    /// Open TCP connections one source address may hold at once (clients, peers and HTTP);
    /// more are answered `503`.
    pub max_connections_per_ip: usize,
    /// Connections the kernel holds for the listener before they are accepted (capped by
    /// `net.core.somaxconn`): room for a reconnect storm's handshakes while they are accepted.
    pub listen_backlog: u32,
    /// Connections set up at once, each from the moment its first request has come whole (a
    /// TLS handshake and that request; a client's WebSocket to its session's start, after its
    /// login): a client sending half a request holds no place. Connections
    /// past them wait their turn, in order, so a reconnect storm is taken at the pace sessions
    /// can be set up while established connections are served as before.
    pub max_setups: usize,
    /// The longest one connection counts among `max_setups` (it is served on after that).
    pub setup_timeout_ms: u64,
    /// Interval of heartbeats: Load reports to the coordinator, pings to peers; also suggested
    /// to clients.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a client or coordinator link is considered dead.
    pub heartbeat_timeout_ms: u64,
    /// Silence after which a peer link is considered dead; peers ping each other every third
    /// of it, and the same time unacknowledged on the socket (`TCP_USER_TIMEOUT`) ends the
    /// link too. Shorter than `heartbeat_timeout_ms`: while a peer link is down or stalled,
    /// forwards over it are lost, so a stalled peer must be found fast.
    pub peer_heartbeat_timeout_ms: u64,
    /// How long a peer link that went down keeps the peer's interest: what is routed to it
    /// meanwhile is counted, and the peer is told how much it missed (`ForwardDropped`, passed
    /// on to its subscribers as `Dropped`) when it links again within this time.
    pub peer_resume_ms: u64,
    /// Bytes of recent forwards each peer link keeps to replay on its next link (what the peer
    /// may not have received before the link broke, and what was routed to it while it was
    /// down): a stall or break the buffer covers loses nothing. 0: no replay, only a report of
    /// what was lost.
    pub peer_replay_bytes: usize,
    /// Forwards older than this are not replayed (they are reported as lost instead).
    pub peer_replay_ms: u64,
    /// Time a new link has to send its first message.
    pub handshake_timeout_ms: u64,
    /// Clients that dialled `/v1/client` without a key and whose `Login` the coordinator has
    /// not answered yet; more are refused with `UNAVAILABLE` (503) before the upgrade, and log
    /// in with the coordinator instead.
    pub max_logins_in_flight: usize,
    /// Longest wait for the coordinator's answer to a relayed `Login`: under the clients'
    /// own patience (the Rust client's `connect_timeout`, 10 s), so they hear why; the
    /// coordinator gives a login up after three quarters of it.
    pub login_relay_timeout_ms: u64,
    /// Longest wait for peers to confirm a subscription change before the client is answered
    /// with an `Ack` naming the servers still pending (the change is in force everywhere
    /// else); a second `Ack` follows once they have confirmed.
    pub subscribe_sync_timeout_ms: u64,
    /// Subscription changes per client whose first `Ack` named pending servers and whose
    /// second `Ack` is still to come. A change made while this many are outstanding is refused
    /// with `LIMIT_EXCEEDED` (which closes the session, as every limit does).
    pub max_pending_confirmations: usize,
    /// First reconnect delay (coordinator and peer links).
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay before jitter.
    pub reconnect_max_ms: u64,
    /// Largest reconnect delay to the coordinator before jitter (at most `reconnect_max_ms`):
    /// while it is away no client can log in to this server, and a refused dial costs nothing,
    /// so a restarted coordinator is found again within this (plus jitter).
    pub coordinator_reconnect_max_ms: u64,
    /// Delay between attempts while the coordinator or a peer refuses this server's
    /// credentials (a wrong cluster secret: only an operator can fix it).
    pub refused_retry_ms: u64,
    /// On SIGINT/SIGTERM, first drain for up to this long: no new clients, every client asked
    /// to move to another server (through a coordinator), as an operator's drain does, so a
    /// rolling upgrade loses nothing; then stop. 0 stops at once (clients are told
    /// `SHUTTING_DOWN` and reconnect elsewhere, missing what was in flight).
    pub drain_on_shutdown_ms: u64,
    /// Time allowed to finish after SIGINT/SIGTERM (after the drain).
    pub shutdown_grace_ms: u64,
    /// Time an HTTP client has for its request head, and again for its body and the answer;
    /// idle keep-alive connections are closed after it (WebSocket sessions are not bound).
    pub request_timeout_ms: u64,
    /// Largest HTTP request body on any endpoint, in bytes.
    pub max_body_bytes: usize,
    /// `[tls]`: the certificate of the client/peer and dispatch listeners (which then speak
    /// TLS only, and the default public URL is `wss://`), the CA trusted when dialing the
    /// coordinator and peers, mutual TLS on peer links, reload interval.
    pub tls: relaymesh_net::tls::TlsConfig,
    /// `[history]`: which topics keep history (for recovery after a reconnect, and `History`
    /// requests), and its bounds.
    pub history: crate::history::HistoryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            coordinator: String::new(),
            coordinator_resolve_ms: 5_000,
            listen: SocketAddr::from(([127, 0, 0, 1], 7500)),
            public_url: None,
            id: None,
            cluster_secret: String::new(),
            identity_key_file: None,
            dispatch_listen: None,
            dispatch_secret: String::new(),
            dispatch_bind_ip: std::net::IpAddr::from([0, 0, 0, 0]),
            dispatch_max_clients_per_port: 1_024,
            dispatch_driver_queue: 4_096,
            dispatch_write_queue: 256,
            dispatch_read_bytes: 64 * 1024,
            dispatch_max_frame_bytes: 1024 * 1024,
            dispatch_mesh_account: None,
            dispatch_port_bytes_per_s: 0,
            dispatch_driver_queue_bytes: 16 * 1024 * 1024,
            dispatch_port_write_bytes: 16 * 1024 * 1024,
            trusted_peer_keys: Vec::new(),
            max_clients: 50_000,
            key_ttl_ms: 10_000,
            max_pending_keys: 100_000,
            client_queue: 8_192,
            client_queue_bytes: 8 * 1024 * 1024,
            slow_consumer_ms: 5_000,
            peer_queue: 65_536,
            peer_queue_bytes: 64 * 1024 * 1024,
            control_queue: 1_024,
            max_subscriptions: 1_000,
            signal_rate_per_s: 50,
            signal_burst: 100,
            max_list_nodes: 100,
            max_pending_inbox: 1_024,
            max_topic_bytes: relaymesh_proto::topic::DEFAULT_MAX_TOPIC_LEN,
            max_frame_bytes: 1024 * 1024,
            max_batch_publishes: 1024,
            read_buffer_bytes: 4 * 1024,
            write_buffer_bytes: 64 * 1024,
            direct_write_budget_us: None,
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            listen_backlog: relaymesh_net::serve::DEFAULT_LISTEN_BACKLOG,
            max_setups: relaymesh_net::serve::default_max_setups(),
            setup_timeout_ms: relaymesh_net::serve::DEFAULT_SETUP_TIMEOUT.as_millis() as u64,
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            peer_heartbeat_timeout_ms: 3_000,
            peer_resume_ms: 30_000,
            peer_replay_bytes: 16 * 1024 * 1024,
            peer_replay_ms: 15_000,
            handshake_timeout_ms: 5_000,
            max_logins_in_flight: 8_192,
            login_relay_timeout_ms: 8_000,
            subscribe_sync_timeout_ms: 5_000,
            max_pending_confirmations: 64,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            coordinator_reconnect_max_ms: 500,
            refused_retry_ms: 30_000,
            drain_on_shutdown_ms: 10_000,
            shutdown_grace_ms: 5_000,
            request_timeout_ms: 10_000,
            max_body_bytes: 64 * 1024,
            tls: relaymesh_net::tls::TlsConfig::default(),
            history: crate::history::HistoryConfig::default(),
        }
    }
}

impl Config {
    /// Checks ranges and consistency; the message names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tls.validate()?;
        self.history.validate(self.max_topic_bytes)?;
        ensure(
            !self.coordinator_urls().is_empty(),
            "coordinator",
            "must be set: the coordinators' URLs, e.g. --coordinator ws://127.0.0.1:7400 (several comma-separated)",
        )?;
        for url in self.coordinator_urls() {
            if let Err(e) = relaymesh_net::url::check(url) {
                return Err(ConfigError::Invalid(format!(
                    "`coordinator` (--coordinator) {url:?} is not a coordinator URL: {e}"
                )));
            }
        }
        ensure(
            self.coordinator_resolve_ms >= 100,
            "coordinator_resolve_ms",
            "must be at least 100",
        )?;
        ensure(
            !self.cluster_secret.is_empty()
                || (self.identity_key_file.is_some() && !self.trusted_peer_keys.is_empty()),
            "cluster_secret",
            "must be set (RELAYMESH_CLUSTER_SECRET or the config file), unless identity_key_file and trusted_peer_keys are",
        )?;
        if self.dispatch_listen.is_some() {
            ensure(
                !self.dispatch_secret.is_empty(),
                "dispatch_secret",
                "must be set with dispatch_listen (RELAYMESH_DISPATCH_SECRET or the config file)",
            )?;
            ensure(
                self.dispatch_max_clients_per_port > 0
                    && self.dispatch_driver_queue > 0
                    && self.dispatch_write_queue > 0
                    && self.dispatch_read_bytes > 0,
                "dispatch_max_clients_per_port",
                "dispatch limits must be positive",
            )?;
        }
        if let Some(url) = &self.public_url
            && let Err(e) = relaymesh_net::url::check(url)
        {
            return Err(ConfigError::Invalid(format!(
                "`public_url` (--public-url) {url:?} is not a URL clients can use: {e}"
            )));
        }
        if let Some(id) = &self.id {
            let ok = !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
            ensure(
                ok,
                "id",
                "must be 1-128 characters of letters, digits and _ - . :",
            )?;
        }
        ensure(self.max_clients > 0, "max_clients", "must be positive")?;
        ensure(
            self.listen_backlog > 0,
            "listen_backlog",
            "must be positive",
        )?;
        relaymesh_net::config::check_setups(self.max_setups, self.setup_timeout_ms)?;
        ensure(self.key_ttl_ms > 0, "key_ttl_ms", "must be positive")?;
        ensure(
            self.max_pending_keys > 0,
            "max_pending_keys",
            "must be positive",
        )?;
        ensure(self.client_queue >= 1, "client_queue", "must be at least 1")?;
        ensure(self.peer_queue >= 1, "peer_queue", "must be at least 1")?;
        ensure(
            self.client_queue_bytes >= 1,
            "client_queue_bytes",
            "must be positive",
        )?;
        ensure(
            self.peer_queue_bytes >= 1,
            "peer_queue_bytes",
            "must be positive",
        )?;
        ensure(
            self.control_queue >= 16,
            "control_queue",
            "must be at least 16",
        )?;
        ensure(
            self.max_subscriptions >= 1,
            "max_subscriptions",
            "must be at least 1",
        )?;
        ensure(
            self.signal_rate_per_s >= 1 && self.signal_burst >= 1,
            "signal_rate_per_s",
            "signal_rate_per_s and signal_burst must be at least 1",
        )?;
        ensure(
            self.max_list_nodes >= 1,
            "max_list_nodes",
            "must be at least 1",
        )?;
        ensure(
            self.max_pending_inbox >= 1,
            "max_pending_inbox",
            "must be at least 1",
        )?;
        ensure(
            self.max_pending_confirmations >= 1,
            "max_pending_confirmations",
            "must be at least 1",
        )?;
        ensure(
            self.max_topic_bytes >= 1,
            "max_topic_bytes",
            "must be at least 1",
        )?;
        ensure(
            self.max_frame_bytes >= self.max_topic_bytes + ENVELOPE_OVERHEAD + 1024,
            "max_frame_bytes",
            "must leave at least 1024 bytes of payload after max_topic_bytes and 1024 bytes of envelope",
        )?;
        ensure(
            self.read_buffer_bytes >= 1024,
            "read_buffer_bytes",
            "must be at least 1024",
        )?;
        check_serving(
            self.max_connections,
            self.max_connections_per_ip,
            self.request_timeout_ms,
            self.max_body_bytes,
        )?;
        check_link_timing(
            self.heartbeat_interval_ms,
            self.heartbeat_timeout_ms,
            self.handshake_timeout_ms,
        )?;
        ensure(
            self.max_logins_in_flight > 0,
            "max_logins_in_flight",
            "must be at least 1",
        )?;
        ensure(
            self.login_relay_timeout_ms > 0,
            "login_relay_timeout_ms",
            "must be positive",
        )?;
        ensure(
            self.peer_heartbeat_timeout_ms >= 300,
            "peer_heartbeat_timeout_ms",
            "must be at least 300",
        )?;
        ensure(
            self.reconnect_min_ms > 0,
            "reconnect_min_ms",
            "must be positive",
        )?;
        ensure(
            self.reconnect_max_ms >= self.reconnect_min_ms,
            "reconnect_max_ms",
            "must be at least reconnect_min_ms",
        )?;
        ensure(
            self.coordinator_reconnect_max_ms >= self.reconnect_min_ms,
            "coordinator_reconnect_max_ms",
            "must be at least reconnect_min_ms",
        )?;
        ensure(
            self.refused_retry_ms > 0,
            "refused_retry_ms",
            "must be positive",
        )?;
        Ok(())
    }

    /// Largest payload a client may publish: what fits in `max_frame_bytes` together with the
    /// longest topic and the envelope, so no delivered or forwarded frame exceeds the limit.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_frame_bytes
            .saturating_sub(self.max_topic_bytes + ENVELOPE_OVERHEAD)
    }

    /// Redialing a peer with this server's reconnect settings.
    pub(crate) fn redial(&self, what: impl Into<String>) -> relaymesh_net::retry::Redial {
        relaymesh_net::retry::Redial::new(
            what,
            self.reconnect_min(),
            self.reconnect_max(),
            self.refused_retry(),
        )
    }

    /// The coordinator URLs of `coordinator`, each once, in the order given.
    pub fn coordinator_urls(&self) -> Vec<&str> {
        relaymesh_net::url::split_list(&self.coordinator)
    }

    /// Redialing a coordinator (`what`): as a peer, capped at `coordinator_reconnect_max_ms`.
    pub(crate) fn redial_coordinator(&self, what: String) -> relaymesh_net::retry::Redial {
        relaymesh_net::retry::Redial::new(
            what,
            self.reconnect_min(),
            self.coordinator_reconnect_max().min(self.reconnect_max()),
            self.refused_retry(),
        )
    }

    /// How long after its first `Ack` a subscription change still waits for pending peers
    /// before the server gives up and names those still pending in the second `Ack`. By then
    /// a stalled link has been found dead (within 1.5 peer heartbeat timeouts), and a peer
    /// that did not link again has expired (`peer_resume_ms`), ending the wait; only a peer
    /// whose links keep breaking before they confirm anything lasts longer.
    pub(crate) fn confirm_deadline(&self) -> std::time::Duration {
        self.peer_resume() + self.peer_heartbeat_timeout() * 2 + self.handshake_timeout()
    }

    /// The heartbeat settings of this service's links.
    pub(crate) fn heartbeat(&self) -> relaymesh_net::link::Heartbeat {
        relaymesh_net::link::Heartbeat {
            timeout: self.heartbeat_timeout(),
            interval: self.heartbeat_interval(),
        }
    }

    relaymesh_net::durations! {
        pub(crate) fn heartbeat_interval = heartbeat_interval_ms;
        pub(crate) fn heartbeat_timeout = heartbeat_timeout_ms;
        pub(crate) fn peer_heartbeat_timeout = peer_heartbeat_timeout_ms;
        pub(crate) fn peer_resume = peer_resume_ms;
        pub(crate) fn peer_replay_age = peer_replay_ms;
        pub(crate) fn handshake_timeout = handshake_timeout_ms;
        pub(crate) fn login_relay_timeout = login_relay_timeout_ms;
        pub(crate) fn subscribe_sync_timeout = subscribe_sync_timeout_ms;
        pub(crate) fn key_ttl = key_ttl_ms;
        pub(crate) fn reconnect_min = reconnect_min_ms;
        pub(crate) fn reconnect_max = reconnect_max_ms;
        pub(crate) fn coordinator_reconnect_max = coordinator_reconnect_max_ms;
        pub(crate) fn coordinator_resolve = coordinator_resolve_ms;
        pub(crate) fn refused_retry = refused_retry_ms;
        /// Shutdown grace period.
        pub fn shutdown_grace = shutdown_grace_ms;
        pub(crate) fn drain_on_shutdown = drain_on_shutdown_ms;
        pub(crate) fn request_timeout = request_timeout_ms;
        pub(crate) fn setup_timeout = setup_timeout_ms;
    }

    pub(crate) fn ws_limits(&self) -> WsLimits {
        WsLimits {
            max_frame_bytes: self.max_frame_bytes,
            read_buffer_bytes: self.read_buffer_bytes,
            write_buffer_bytes: self.write_buffer_bytes,
            tcp_user_timeout: None,
        }
    }

    /// Peer links: unacknowledged data ends the link after the peer heartbeat timeout.
    pub(crate) fn peer_ws_limits(&self) -> WsLimits {
        WsLimits {
            tcp_user_timeout: Some(self.peer_heartbeat_timeout()),
            ..self.ws_limits()
        }
    }

    /// The replay buffer of each peer link, if any.
    pub(crate) fn peer_replay(&self) -> Option<relaymesh_net::link::ReplayLimits> {
        (self.peer_replay_bytes > 0).then(|| relaymesh_net::link::ReplayLimits {
            bytes: self.peer_replay_bytes,
            age: self.peer_replay_age(),
        })
    }

    /// The heartbeat of peer links: pings every third of the peer timeout.
    pub(crate) fn peer_heartbeat(&self) -> relaymesh_net::link::Heartbeat {
        relaymesh_net::link::Heartbeat {
            timeout: self.peer_heartbeat_timeout(),
            interval: self.peer_heartbeat_timeout() / 3,
        }
    }

    /// The listener's limits; it counts what it refuses in `stats`.
    pub(crate) fn serve_options(&self, stats: Arc<ServeStats>) -> ServeOptions {
        ServeOptions {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            shutdown_grace: self.shutdown_grace(),
            request_timeout: self.request_timeout(),
            max_body_bytes: self.max_body_bytes,
            max_setups: self.max_setups,
            setup_timeout: self.setup_timeout(),
            stats,
            tls: None,
        }
    }
}
