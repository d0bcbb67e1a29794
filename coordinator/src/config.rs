//! Coordinator configuration: a TOML file (every key optional, defaults below), with
//! `--listen` on the command line and the cluster secret from `RELAYMESH_CLUSTER_SECRET`
//! taking precedence over the file.

use std::net::SocketAddr;
use std::sync::Arc;

use relaymesh_net::config::{ConfigError, check_link_timing, check_serving, ensure};
use relaymesh_net::serve::{ServeOptions, ServeStats};
use relaymesh_net::ws::WsLimits;
use serde::Deserialize;

use crate::accounts::AccountsConfig;
use crate::registry::Strategy;

/// Every setting of the coordinator. Field names are the config file keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (the `--listen` flag overrides it).
    pub listen: SocketAddr,
    /// Address of the gRPC admin API (`--admin-listen`); none (the default): not served.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token every admin API call must carry. Prefer `RELAYMESH_ADMIN_TOKEN`; required
    /// (at least 16 bytes) when `admin_listen` is set.
    pub admin_token: String,
    /// Serve the web console under `/console` on the main listener (its data behind
    /// `admin_token`, which must then be set).
    pub console: bool,
    /// A results file the console shows (a `simulation --json` report or a bench
    /// `results.json`), read again at each request; none: not shown.
    pub console_results: Option<std::path::PathBuf>,
    /// Origins of web pages that may call `POST /v1/login` (and `/v1/login/challenge`,
    /// `/v1/nodes`, `/v1/nodes/update`) from a browser: `scheme://host[:port]`, or `*` for
    /// any. Empty (the default): no CORS headers, so only pages of the coordinator's own
    /// origin may.
    pub cors_origins: Vec<String>,
    /// Secret comm servers present on `/v1/servers`. Prefer `RELAYMESH_CLUSTER_SECRET`.
    pub cluster_secret: String,
    /// How a server is picked for a client: `random`, `least_loaded` or `power_of_two`.
    pub selection: Strategy,
    /// Time a reserved server has to answer a `Reserve` before the next server is tried.
    pub reserve_timeout_ms: u64,
    /// Servers tried per client login before answering `NO_SERVER_AVAILABLE`.
    pub reserve_attempts: u32,
    /// A reservation not answered within this is raced by one on another server, and the
    /// login takes the first key reserved (a server that has just died or frozen then costs
    /// it this long, not `reserve_timeout_ms`). A server the client asked for is not raced.
    /// 0: never.
    pub reserve_hedge_ms: u64,
    /// Raced reservations as a share of all, at most (percent); within it the races may come
    /// in a burst of up to 100.
    pub max_hedged_percent: u32,
    /// Reservations awaiting an answer per server; more are refused as that server being busy.
    pub max_pending_reservations: usize,
    /// Logins a comm server may have relayed (`RelayedLogin`) and not yet answered; more are
    /// answered `UNAVAILABLE` at once (the client then logs in over HTTP).
    pub max_relayed_logins: usize,
    /// Interval at which servers report load and the coordinator pings them; also told to
    /// negotiation clients as the interval at which to ping if they keep the link open.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a server or negotiation link is closed.
    pub heartbeat_timeout_ms: u64,
    /// Time a new link has to send its first message (`Register` or `Hello`).
    pub handshake_timeout_ms: u64,
    /// Outbound queue length of each link; a server link whose queue overflows is closed
    /// (it reconnects and gets a fresh peer list).
    pub link_queue: usize,
    /// `Connect` requests allowed per negotiation link per second, sustained.
    pub connect_rate_per_s: u32,
    /// Burst of `Connect` requests allowed above the sustained rate.
    pub connect_burst: u32,
    /// Open TCP connections at most.
    pub max_connections: usize,
    /// Open TCP connections one source address may hold at once; more are answered `503`.
    pub max_connections_per_ip: usize,
    /// Connections the kernel holds for the listener before they are accepted (capped by
    /// `net.core.somaxconn`): room for a reconnect storm's handshakes while they are accepted.
    pub listen_backlog: u32,
    /// Connections set up at once, each from the moment its first request has come whole to
    /// its answer (a TLS handshake and that request; a login until its request is read): a
    /// client sending half a request holds no place. Connections past them wait their turn,
    /// in order, so a burst of logins is taken at the pace they can be answered while the
    /// links to the comm servers are served as before.
    pub max_setups: usize,
    /// The longest one connection counts among `max_setups` (it is served on after that).
    pub setup_timeout_ms: u64,
    /// Largest WebSocket message accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Largest `POST /v1/login` (and `/v1/nodes...`) body accepted, in bytes.
    pub max_login_body_bytes: usize,
    /// Longest node `info` (a JSON object as text) accepted by `RegisterNode` and
    /// `UpdateNode`, in bytes.
    pub max_node_info_bytes: usize,
    /// The durable inbox of offline nodes (`sql` store only).
    pub inbox: crate::inbox::InboxConfig,
    /// Time allowed for connections and tasks to finish after SIGINT/SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Time an HTTP client has for its request head, and again for its body and the answer;
    /// idle keep-alive connections are closed after it (WebSocket sessions are not bound).
    pub request_timeout_ms: u64,
    /// Largest HTTP request body on any endpoint, in bytes.
    pub max_body_bytes: usize,
    /// Who may log in: the `[accounts]` table (store `open`, `single` or `file`).
    pub accounts: AccountsConfig,
    /// `[tls]`: the certificate of the HTTP/WebSocket and admin listeners (which then speak TLS
    /// only), the CA that verifies comm servers' certificates with `mtls`, reload interval.
    pub tls: relaymesh_net::tls::TlsConfig,
    /// CA bundle (PEM) whose client certificates authenticate admin API calls (mutual TLS,
    /// instead of the bearer token); needs `[tls]`. None (the default): the token only.
    pub admin_ca: Option<std::path::PathBuf>,
    /// Failed logins allowed per source address per minute, sustained; beyond that the
    /// address gets `RATE_LIMITED` until its allowance refills.
    pub failed_logins_per_min: u32,
    /// Failed logins a source address may make in a burst.
    pub failed_login_burst: u32,
    /// Source addresses tracked for failed logins at most.
    pub max_tracked_addresses: usize,
    /// How long a `POST /v1/login/challenge` challenge may be answered.
    pub challenge_ttl_ms: u64,
    /// Challenges outstanding at most; more are refused until some are used or expire.
    pub max_pending_challenges: usize,
    /// Ed25519 public keys (hex) of the comm servers allowed to register. When set, a server
    /// must prove it holds one of them (challenge-response) and the cluster secret alone is
    /// refused.
    pub trusted_server_keys: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            cluster_secret: String::new(),
            selection: Strategy::Random,
            reserve_timeout_ms: 2_000,
            reserve_attempts: 3,
            reserve_hedge_ms: 20,
            max_hedged_percent: 10,
            max_pending_reservations: 4_096,
            max_relayed_logins: 8_192,
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            handshake_timeout_ms: 5_000,
            link_queue: 16_384,
            connect_rate_per_s: 20,
            connect_burst: 40,
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            listen_backlog: relaymesh_net::serve::DEFAULT_LISTEN_BACKLOG,
            max_setups: relaymesh_net::serve::default_max_setups(),
            setup_timeout_ms: relaymesh_net::serve::DEFAULT_SETUP_TIMEOUT.as_millis() as u64,
            max_frame_bytes: 64 * 1024,
            max_login_body_bytes: 16 * 1024,
            max_node_info_bytes: crate::nodes::DEFAULT_MAX_NODE_INFO,
            inbox: crate::inbox::InboxConfig::default(),
            shutdown_grace_ms: 5_000,
            request_timeout_ms: 10_000,
            max_body_bytes: 64 * 1024,
            accounts: AccountsConfig::default(),
            tls: relaymesh_net::tls::TlsConfig::default(),
            admin_ca: None,
            failed_logins_per_min: 10,
            failed_login_burst: 10,
            max_tracked_addresses: 100_000,
            challenge_ttl_ms: 30_000,
            max_pending_challenges: 10_000,
            trusted_server_keys: Vec::new(),
            admin_listen: None,
            admin_token: String::new(),
            console: false,
            console_results: None,
            cors_origins: Vec::new(),
        }
    }
}

impl Config {
    /// Checks ranges and consistency; the message names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tls.validate()?;
        ensure(
            self.admin_ca.is_none() || self.tls.enabled(),
            "admin_ca",
            "needs tls.cert and tls.key (mutual TLS runs over TLS)",
        )?;
        ensure(
            !self.cluster_secret.is_empty() || !self.trusted_server_keys.is_empty(),
            "cluster_secret",
            "must be set (RELAYMESH_CLUSTER_SECRET or the config file), unless trusted_server_keys is",
        )?;
        if let Err(e) = relaymesh_net::auth::parse_public_keys(&self.trusted_server_keys) {
            return Err(ConfigError::Invalid(format!("`trusted_server_keys`: {e}")));
        }
        ensure(
            self.listen_backlog > 0,
            "listen_backlog",
            "must be positive",
        )?;
        relaymesh_net::config::check_setups(self.max_setups, self.setup_timeout_ms)?;
        ensure(
            self.max_node_info_bytes >= 2 && self.max_node_info_bytes < self.max_frame_bytes,
            "max_node_info_bytes",
            "must be at least 2 (`{}`) and less than max_frame_bytes",
        )?;
        ensure(
            self.admin_listen.is_none() || self.admin_token.len() >= 16,
            "admin_token",
            "must be set, at least 16 bytes (RELAYMESH_ADMIN_TOKEN or the config file), when admin_listen is",
        )?;
        ensure(
            !self.console || self.admin_token.len() >= 16,
            "admin_token",
            "must be set, at least 16 bytes (RELAYMESH_ADMIN_TOKEN or the config file), when console is",
        )?;
        for origin in &self.cors_origins {
            ensure(
                crate::cors::valid_origin(origin),
                "cors_origins",
                "each must be `*` or an origin, `scheme://host[:port]` with no path",
            )?;
        }
        let inbox = &self.inbox;
        ensure(
            inbox.max_messages >= 1,
            "inbox.max_messages",
            "must be at least 1",
        )?;
        ensure(
            inbox.max_bytes >= 1,
            "inbox.max_bytes",
            "must be at least 1",
        )?;
        ensure(
            inbox.ttl_ms >= 1_000,
            "inbox.ttl_ms",
            "must be at least 1000",
        )?;
        ensure(
            inbox.sweep_ms >= 100,
            "inbox.sweep_ms",
            "must be at least 100",
        )?;
        ensure(inbox.queue >= 1, "inbox.queue", "must be at least 1")?;
        ensure(
            inbox.max_batch >= 1,
            "inbox.max_batch",
            "must be at least 1",
        )?;
        ensure(
            inbox.max_fetch >= 1,
            "inbox.max_fetch",
            "must be at least 1",
        )?;
        ensure(
            self.reserve_timeout_ms > 0,
            "reserve_timeout_ms",
            "must be positive",
        )?;
        ensure(
            self.reserve_attempts > 0,
            "reserve_attempts",
            "must be at least 1",
        )?;
        ensure(
            self.reserve_hedge_ms < self.reserve_timeout_ms,
            "reserve_hedge_ms",
            "must be less than reserve_timeout_ms (0 turns racing off)",
        )?;
        ensure(
            self.max_hedged_percent <= 100,
            "max_hedged_percent",
            "must be at most 100",
        )?;
        ensure(
            self.max_pending_reservations > 0,
            "max_pending_reservations",
            "must be at least 1",
        )?;
        ensure(
            self.max_relayed_logins > 0,
            "max_relayed_logins",
            "must be at least 1",
        )?;
        check_link_timing(
            self.heartbeat_interval_ms,
            self.heartbeat_timeout_ms,
            self.handshake_timeout_ms,
        )?;
        ensure(self.link_queue >= 16, "link_queue", "must be at least 16")?;
        ensure(
            self.connect_rate_per_s > 0,
            "connect_rate_per_s",
            "must be positive",
        )?;
        check_serving(
            self.max_connections,
            self.max_connections_per_ip,
            self.request_timeout_ms,
            self.max_body_bytes,
        )?;
        ensure(
            self.max_frame_bytes >= 1024,
            "max_frame_bytes",
            "must be at least 1024",
        )?;
        ensure(
            self.failed_logins_per_min > 0 && self.failed_login_burst > 0,
            "failed_logins_per_min",
            "failed_logins_per_min and failed_login_burst must be positive",
        )?;
        ensure(
            self.challenge_ttl_ms > 0 && self.max_pending_challenges > 0,
            "challenge_ttl_ms",
            "challenge_ttl_ms and max_pending_challenges must be positive",
        )?;
        ensure(
            self.max_tracked_addresses > 0,
            "max_tracked_addresses",
            "must be positive",
        )?;
        Ok(())
    }

    /// The heartbeat settings of this service's links.
    pub(crate) fn heartbeat(&self) -> relaymesh_net::link::Heartbeat {
        relaymesh_net::link::Heartbeat {
            timeout: self.heartbeat_timeout(),
            interval: self.heartbeat_interval(),
        }
    }

    relaymesh_net::durations! {
        pub(crate) fn reserve_timeout = reserve_timeout_ms;
        pub(crate) fn reserve_hedge = reserve_hedge_ms;
        pub(crate) fn heartbeat_interval = heartbeat_interval_ms;
        pub(crate) fn heartbeat_timeout = heartbeat_timeout_ms;
        pub(crate) fn challenge_ttl = challenge_ttl_ms;
        pub(crate) fn handshake_timeout = handshake_timeout_ms;
        /// Shutdown grace period.
        pub fn shutdown_grace = shutdown_grace_ms;
        pub(crate) fn request_timeout = request_timeout_ms;
        pub(crate) fn setup_timeout = setup_timeout_ms;
    }

    pub(crate) fn ws_limits(&self) -> WsLimits {
        WsLimits {
            max_frame_bytes: self.max_frame_bytes,
            read_buffer_bytes: 4 * 1024,
            write_buffer_bytes: 16 * 1024,
            tcp_user_timeout: None,
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
