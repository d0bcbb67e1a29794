//! The relaymesh coordinator.
//!
//! Comm servers register over `/v1/servers` (authenticated with the cluster secret) and report
//! their load; the coordinator tells every server about the others (peer discovery). Clients ask
//! for a server over `/v1/connect` (or `POST /v1/login`); the coordinator picks one at random
//! among the eligible servers, reserves a single-use login key on it, and hands the client the
//! server's URL and key. The coordinator never carries client messages.
//!
//! [`run`] serves everything from one already-bound listener until the shutdown token is
//! cancelled; the `coordinator` binary is a thin wrapper that parses flags and binds.

pub mod accounts;
pub mod admin;
mod admin_api;
mod alias;
mod api;
mod backend_api;
pub mod config;
mod console;
mod cors;
mod directory;
pub mod inbox;
mod negotiate;
pub mod nodes;
pub mod registry;
mod server_link;
pub mod sql;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use relaymesh_net::auth::{Challenges, LinkTrust};
use relaymesh_net::limits::AddressLimits;

/// Challenges one source address may ask for per minute, sustained, and at once.
const CHALLENGES_PER_MIN: u32 = 120;
const CHALLENGE_BURST: u32 = 30;
use relaymesh_net::config::ConfigError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::registry::Registry;
use crate::server_link::ServerLink;

/// Shared state of one coordinator process.
struct App {
    config: Config,
    /// Who may log in, and as what.
    accounts: Arc<accounts::Store>,
    /// Failed logins per source address.
    failed_logins: AddressLimits,
    /// Challenge requests per source address (`/v1/login/challenge`, `/v1/servers/challenge`).
    challenge_limits: AddressLimits,
    /// Outstanding key-login challenges of `POST /v1/login/challenge`.
    challenges: Challenges,
    /// Who may register as a comm server: the cluster secret, or trusted keys.
    server_trust: LinkTrust,
    /// The durable inbox's writer queue.
    inbox: inbox::Inbox,
    /// Online nodes, as the servers report them. Locked before `registry` when both are.
    directory: Mutex<directory::Directory>,
    /// Registered servers; locked briefly, never across an await.
    registry: Mutex<Registry<Arc<ServerLink>>>,
    /// Servers an operator drained (admin API), by id, until undrained: told again when one
    /// registers anew. Locked after `registry` when both are.
    drained: Mutex<std::collections::BTreeSet<String>>,
    aliases: alias::Aliases,
    next_link: AtomicU64,
    next_request: AtomicU64,
    last_login_seq: AtomicU64,
    stats: api::Stats,
    /// Reservations that failed: logged one line per 10 s with the count, since a storm of
    /// logins can fail thousands a second on busy servers, and a frozen server every one in
    /// flight to it (each is counted in `reservations_failed`; the rest are logged at debug
    /// level).
    reservation_warnings: Mutex<relaymesh_net::serve::Throttle>,
    /// Room for raced reservations (`max_hedged_percent` of all).
    hedges: negotiate::HedgeBudget,
    /// TLS of the listeners (certificate reloaded on change), when configured.
    tls: Option<relaymesh_net::tls::ServiceTls>,
    /// Cancelled on process shutdown; every link watches it.
    shutdown: CancellationToken,
    /// Every link task, so shutdown can wait for them.
    tracker: TaskTracker,
    started: Instant,
}

impl App {
    fn next_link_id(&self) -> u64 {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// A login number that grows with every login and across restarts: microseconds since the
    /// Unix epoch, or one more than the last if the clock has not moved on.
    fn next_login_seq(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut last = self.last_login_seq.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_login_seq.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// Serves the coordinator on `listener` until `shutdown` is cancelled, then closes every link
/// (servers and clients are told `SHUTTING_DOWN`) and waits up to the configured grace period.
/// The admin API, when `admin_listen` is set, is bound here too.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ConfigError> {
    let admin = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            ConfigError::Invalid(format!("cannot listen on {addr} (`admin_listen`): {e}"))
        })?),
        None => None,
    };
    run_with(listener, admin, config, shutdown).await
}

/// [`run`], with the admin API's listener (if any) already bound (tests bind port 0). Needs
/// `admin_token` set when it is given.
pub async fn run_with(
    listener: TcpListener,
    admin: Option<TcpListener>,
    mut config: Config,
    shutdown: CancellationToken,
) -> Result<(), ConfigError> {
    if let Some(admin) = &admin {
        config.admin_listen = admin.local_addr().ok();
        // Checked here too, whatever the address: an admin API never runs without its token.
        relaymesh_net::config::ensure(
            config.admin_token.len() >= 16,
            "admin_token",
            "must be set, at least 16 bytes (RELAYMESH_ADMIN_TOKEN or the config file), when admin_listen is",
        )?;
    }
    config.validate()?;
    let local = listener
        .local_addr()
        .map_err(|e| ConfigError::Invalid(format!("listener has no address: {e}")))?;
    let tracker = TaskTracker::new();
    let accounts = Arc::new(
        accounts::Store::from_config(&config.accounts)
            .await
            .map_err(|e| ConfigError::Invalid(format!("accounts: {e}")))?,
    );
    match &*accounts {
        accounts::Store::Open => tracing::warn!(
            "ACCOUNTS ARE OPEN: anyone can log in as any account and role, with no rules; \
             for development only (set [accounts] store = \"single\", \"file\" or \"sql\")"
        ),
        _ => tracing::info!(store = ?config.accounts.store, "account store ready"),
    }
    tracker.spawn(accounts.clone().watch(shutdown.clone()));
    let tls = config
        .tls
        .load()
        .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?;
    if let Some(tls) = &tls {
        tracker.spawn(tls.identity.clone().watch(tls.reload, shutdown.clone()));
    }
    let (inbox, inbox_writer) = inbox::Inbox::new(&accounts, &config.inbox);
    let app = Arc::new(App {
        inbox,
        challenges: Challenges::new(config.challenge_ttl(), config.max_pending_challenges),
        server_trust: LinkTrust::new(
            config.cluster_secret.clone(),
            relaymesh_net::auth::parse_public_keys(&config.trusted_server_keys)
                .map_err(|e| ConfigError::Invalid(format!("trusted_server_keys: {e}")))?,
            Challenges::new(config.challenge_ttl(), config.max_pending_challenges),
        ),
        challenge_limits: AddressLimits::new(
            CHALLENGES_PER_MIN,
            CHALLENGE_BURST,
            config.max_tracked_addresses,
        ),
        failed_logins: AddressLimits::new(
            config.failed_logins_per_min,
            config.failed_login_burst,
            config.max_tracked_addresses,
        ),
        accounts,
        // Servers report every half interval: a server with no report for a whole one (at
        // least a second) has missed two and is no longer offered.
        directory: Mutex::new(directory::Directory::default()),
        registry: Mutex::new(
            Registry::new().stale_after(config.heartbeat_interval().max(Duration::from_secs(1))),
        ),
        drained: Mutex::new(std::collections::BTreeSet::new()),
        aliases: alias::Aliases::new(),
        next_link: AtomicU64::new(1),
        next_request: AtomicU64::new(1),
        last_login_seq: AtomicU64::new(0),
        stats: api::Stats::default(),
        reservation_warnings: Mutex::default(),
        hedges: negotiate::HedgeBudget::new(config.max_hedged_percent),
        tls,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        started: Instant::now(),
        config,
    });
    if let Some((db, rx)) = inbox_writer {
        tracker.spawn(inbox::run(app.clone(), db, rx));
    }
    if let Some(admin) = admin {
        tracker.spawn(admin_api::serve(app.clone(), admin));
    }
    // What a web page calls across origins, with CORS for the `cors_origins`.
    let web = Router::new()
        .route(
            "/v1/login",
            post(negotiate::login)
                .options(cors::preflight)
                .layer(DefaultBodyLimit::max(app.config.max_login_body_bytes)),
        )
        .route(
            "/v1/login/challenge",
            post(negotiate::challenge).options(cors::preflight),
        )
        .route(
            "/v1/nodes",
            post(negotiate::register_node_http)
                .options(cors::preflight)
                .layer(DefaultBodyLimit::max(app.config.max_login_body_bytes)),
        )
        .route(
            "/v1/nodes/update",
            post(negotiate::update_node_http)
                .options(cors::preflight)
                .layer(DefaultBodyLimit::max(app.config.max_login_body_bytes)),
        )
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            cors::layer,
        ));
    let router = Router::new()
        .route("/v1/servers", get(server_link::upgrade))
        .route("/v1/servers/challenge", post(server_link::challenge))
        .route("/v1/connect", get(negotiate::upgrade))
        .merge(web)
        .route("/v1/stats", get(api::stats))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .fallback(relaymesh_net::serve::not_found)
        .method_not_allowed_fallback(relaymesh_net::serve::method_not_allowed)
        .with_state(app.clone());
    let router = if app.config.console {
        tracing::info!("web console on at /console");
        router.merge(console::router(app.clone()))
    } else {
        router
    };
    if app.config.selection != registry::Strategy::Random {
        tracing::info!(strategy = ?app.config.selection, "server selection strategy");
    }
    if app.tls.is_some() {
        tracing::info!("TLS on: clients and comm servers dial wss:// (https:// for HTTP)");
    }
    tracing::info!("coordinator listening on {local}");
    let mut options = app.config.serve_options(app.stats.serving.clone());
    options.tls = app.tls.as_ref().map(|tls| tls.acceptor.clone());
    relaymesh_net::serve::serve(listener, router, options, shutdown, tracker.clone()).await;
    relaymesh_net::shutdown::drain(&tracker, app.config.shutdown_grace()).await;
    tracing::info!("coordinator stopped");
    Ok(())
}
