//! Test harness: start coordinators and comm servers in-process on `127.0.0.1:0` (the same
//! `run` functions the binaries call) or as real processes, wait for cluster state without
//! sleeping, and talk to the HTTP endpoints.
//!
//! Handles stop what they started when dropped, so a failing test does not leave servers behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod pki;
pub mod process;
pub mod proxy;
pub mod raw;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relaymesh_client::{Client, ClientConfig};
use relaymesh_net::http::Method;
use relaymesh_net::tls::Connector;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The cluster secret every test cluster uses.
pub const SECRET: &str = "test-cluster-secret";

/// Upper bound for any single wait in a test.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Installs a test log subscriber when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Polls `check` until it returns `Some`, for at most [`PATIENCE`]. Panics with `what` if the
/// condition never holds.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Awaits `future` for at most [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// The next event of `client`.
pub async fn next_event(client: &mut Client) -> relaymesh_client::Event {
    within("event", client.next_event())
        .await
        .expect("client closed")
}

/// The next event of `client`, which must be a message.
pub async fn next_message(client: &mut Client) -> relaymesh_client::Message {
    match within("message", client.next_event())
        .await
        .expect("client closed")
    {
        relaymesh_client::Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The next `n` events of `client`, which must all be messages.
pub async fn next_messages(client: &mut Client, n: usize) -> Vec<relaymesh_client::Message> {
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        messages.push(next_message(client).await);
    }
    messages
}

/// `GET url` and parse JSON.
pub async fn get_json(url: &str) -> Value {
    get_json_with(url, &Connector::default()).await
}

/// [`get_json`] trusting `tls` for an `https://` URL.
pub async fn get_json_with(url: &str, tls: &Connector) -> Value {
    let (status, body) =
        relaymesh_net::http::request_with(Method::GET, url, &[], None, tls, PATIENCE)
            .await
            .unwrap();
    assert!(
        status.is_success(),
        "GET {url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap()
}

/// `GET url` as text, with its status.
pub async fn get_text(url: &str) -> (u16, String) {
    let (status, body) = relaymesh_net::http::request(Method::GET, url, None, PATIENCE)
        .await
        .unwrap();
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

/// `POST url` with a JSON body; returns the status and the parsed answer.
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_json_with(url, &[], body.to_string().as_bytes()).await
}

/// `POST url` with `headers` and the raw body `body`; the status and the parsed answer.
pub async fn post_json_with(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let (status, body) = relaymesh_net::http::request_with(
        Method::POST,
        url,
        headers,
        Some(body.to_vec()),
        &relaymesh_net::tls::Connector::default(),
        PATIENCE,
    )
    .await
    .unwrap();
    (
        status.as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// An enabled account `name` with one access code `code` (id `main`) and no role rules.
pub fn account_with_code(name: &str, code: &str) -> coordinator::accounts::Account {
    coordinator::accounts::Account {
        name: name.into(),
        enabled: true,
        isolate_groups: false,
        access_codes: vec![coordinator::accounts::AccessCode {
            id: "main".into(),
            hash: coordinator::accounts::hash_code(code).unwrap(),
            revoked: false,
            groups: Vec::new(),
        }],
        public_keys: Vec::new(),
        roles: std::collections::BTreeMap::new(),
        nodes: Vec::new(),
    }
}

/// An accounts file in the temp directory for a coordinator's `file` store, removed on drop.
#[derive(Debug)]
pub struct TempAccounts(std::path::PathBuf);

impl TempAccounts {
    /// Writes `accounts` to a new file.
    pub fn new(accounts: Vec<coordinator::accounts::Account>) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "relaymesh-accounts-{}-{n}.json",
            std::process::id()
        ));
        coordinator::accounts::AccountsFile { accounts }
            .save(&path)
            .unwrap();
        Self(path)
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// The test coordinator configuration, with this file as its account store.
    pub fn coordinator_config(&self) -> coordinator::Config {
        let mut config = coordinator_config();
        config.accounts = coordinator::accounts::AccountsConfig {
            store: coordinator::accounts::StoreKind::File,
            path: Some(self.0.clone()),
            reload_ms: 50,
            ..coordinator::accounts::AccountsConfig::default()
        };
        config
    }
}

impl Drop for TempAccounts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("json.lock"));
    }
}

/// Waits until `client` is told a newer login of its client id replaced it, and returns the
/// reason it was given; fails if it reconnects instead, or ends without a word.
pub async fn replaced_reason(client: &mut Client) -> String {
    within("REPLACED", async {
        loop {
            match client.next_event().await {
                Some(relaymesh_client::Event::Disconnected { reason, .. }) => return reason,
                Some(relaymesh_client::Event::Reconnected { .. }) => {
                    panic!("a replaced client reconnected")
                }
                Some(_) => {}
                None => panic!("ended without saying why"),
            }
        }
    })
    .await
}

/// A free address for a service that must come back *on the same address* after a restart.
///
/// Ports from `bind(…:0)` come from the kernel's ephemeral range, which the outbound connections
/// of tests running in parallel also draw from, so a freed one can be taken before the restart.
/// This picks a free port below that range (which starts at 32768 on Linux) instead.
pub fn restartable_addr() -> SocketAddr {
    let seed = u64::from(std::process::id()).wrapping_mul(6_364_136_223_846_793_005)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
    for attempt in 0..2_000u64 {
        let port = 20_000 + (seed.wrapping_add(attempt.wrapping_mul(7_919)) % 12_000) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in 20000-31999");
}

/// The `http://` (or `https://`) form of a service URL.
pub fn http_base(url: &str) -> String {
    relaymesh_net::url::normalize(url, relaymesh_net::url::Form::Http).unwrap()
}

/// Coordinator settings for tests: fast heartbeats so dead links are found quickly.
pub fn coordinator_config() -> coordinator::Config {
    coordinator::Config {
        cluster_secret: SECRET.into(),
        heartbeat_interval_ms: 200,
        heartbeat_timeout_ms: 3_000,
        handshake_timeout_ms: 3_000,
        reserve_timeout_ms: 3_000,
        connect_rate_per_s: 10_000,
        connect_burst: 10_000,
        shutdown_grace_ms: 3_000,
        ..coordinator::Config::default()
    }
}

/// Comm server settings for tests, pointing at `coordinator`.
pub fn server_config(coordinator: &str) -> commserver::Config {
    commserver::Config {
        coordinator: coordinator.into(),
        cluster_secret: SECRET.into(),
        heartbeat_interval_ms: 200,
        heartbeat_timeout_ms: 3_000,
        handshake_timeout_ms: 3_000,
        reconnect_min_ms: 20,
        reconnect_max_ms: 300,
        refused_retry_ms: 200,
        // Stopping a server here means clients see `SHUTTING_DOWN` at once, as after a crash;
        // the drain on SIGTERM is tested on its own.
        drain_on_shutdown_ms: 0,
        shutdown_grace_ms: 3_000,
        ..commserver::Config::default()
    }
}

/// A client configuration with quick reconnects.
pub fn client_config(coordinator: &str) -> ClientConfig {
    ClientConfig {
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(300),
        ..ClientConfig::new(coordinator)
    }
}

/// A coordinator running in this process.
#[derive(Debug)]
pub struct CoordinatorHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `ws://addr` (`wss://` with TLS).
    pub url: String,
    /// Where its admin API listens, when `admin_listen` was set (port 0 picks one).
    pub admin_addr: Option<SocketAddr>,
    /// Whom dials to it trust (its `tls.ca`).
    pub tls: Connector,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// Starts a coordinator on a free port.
    pub async fn start(config: coordinator::Config) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    /// Starts a coordinator on `addr` (e.g. the address of one that was stopped).
    pub async fn start_on(addr: SocketAddr, config: coordinator::Config) -> Self {
        init_logging();
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = match config.admin_listen {
            Some(admin) => Some(TcpListener::bind(admin).await.unwrap()),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let scheme = if config.tls.enabled() { "wss" } else { "ws" };
        let tls = Connector::new(config.tls.ca.as_deref(), None).unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            coordinator::run_with(listener, admin, config, token)
                .await
                .unwrap()
        });
        Self {
            addr,
            url: format!("{scheme}://{addr}"),
            admin_addr,
            tls,
            stop,
            task: Some(task),
        }
    }

    /// `http://addr/v1/stats` (`https://` with TLS).
    pub async fn stats(&self) -> Value {
        get_json_with(&format!("{}/v1/stats", http_base(&self.url)), &self.tls).await
    }

    /// Ids of the registered servers.
    pub async fn server_ids(&self) -> Vec<String> {
        let stats = self.stats().await;
        stats["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Shuts it down and waits until it has stopped.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            within("coordinator shutdown", task).await.unwrap();
        }
    }

    /// Starts a fresh coordinator on the same address after [`CoordinatorHandle::stop`].
    pub async fn start_again(&mut self, config: coordinator::Config) {
        *self = Self::start_on(self.addr, config).await;
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A comm server running in this process.
#[derive(Debug)]
pub struct ServerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its id (derived from its address).
    pub id: String,
    /// `ws://addr` (`wss://` with TLS).
    pub url: String,
    /// Whom dials to it trust (its `tls.ca`).
    pub tls: Connector,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Starts a comm server on a free port.
    pub async fn start(config: commserver::Config) -> Self {
        init_logging();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = config.id.clone().unwrap_or_else(|| addr.to_string());
        let scheme = if config.tls.enabled() { "wss" } else { "ws" };
        let tls = Connector::new(config.tls.ca.as_deref(), None).unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task =
            tokio::spawn(async move { commserver::run(listener, config, token).await.unwrap() });
        Self {
            addr,
            id,
            url: format!("{scheme}://{addr}"),
            tls,
            stop,
            task: Some(task),
        }
    }

    /// `http://addr/v1/stats` (`https://` with TLS).
    pub async fn stats(&self) -> Value {
        get_json_with(&format!("{}/v1/stats", http_base(&self.url)), &self.tls).await
    }

    /// One numeric field of `/v1/stats`.
    pub async fn stat(&self, field: &str) -> u64 {
        self.stats().await[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no numeric {field} in stats"))
    }

    /// Shuts it down and waits until it has stopped.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            within("comm server shutdown", task).await.unwrap();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A coordinator and `n` comm servers, fully linked.
#[derive(Debug)]
pub struct Cluster {
    /// The coordinator.
    pub coordinator: CoordinatorHandle,
    /// The comm servers, in start order.
    pub servers: Vec<ServerHandle>,
}

impl Cluster {
    /// Starts a coordinator and `n` servers with test defaults, and waits until every server
    /// is registered and linked to every other.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Like [`Cluster::start`], with this coordinator config (e.g. an account store).
    pub async fn start_configured(n: usize, coordinator: coordinator::Config) -> Self {
        let coordinator = CoordinatorHandle::start(coordinator).await;
        Self::with_coordinator(coordinator, n, |_| {}).await
    }

    /// Like [`Cluster::start`], with this coordinator config and `tweak` applied to each
    /// server's config (e.g. TLS on every listener).
    pub async fn start_full(
        n: usize,
        coordinator: coordinator::Config,
        tweak: impl Fn(&mut commserver::Config),
    ) -> Self {
        let coordinator = CoordinatorHandle::start(coordinator).await;
        Self::with_coordinator(coordinator, n, tweak).await
    }

    /// Like [`Cluster::start`], with a coordinator that can be restarted on its address.
    pub async fn start_restartable(n: usize) -> Self {
        Self::start_restartable_with(n, |_| {}).await
    }

    /// Like [`Cluster::start_restartable`], with `tweak` applied to each server's config.
    pub async fn start_restartable_with(n: usize, tweak: impl Fn(&mut commserver::Config)) -> Self {
        let coordinator =
            CoordinatorHandle::start_on(restartable_addr(), coordinator_config()).await;
        Self::with_coordinator(coordinator, n, tweak).await
    }

    /// Like [`Cluster::start`], with `tweak` applied to each server's config.
    pub async fn start_with(n: usize, tweak: impl Fn(&mut commserver::Config)) -> Self {
        let coordinator = CoordinatorHandle::start(coordinator_config()).await;
        Self::with_coordinator(coordinator, n, tweak).await
    }

    async fn with_coordinator(
        coordinator: CoordinatorHandle,
        n: usize,
        tweak: impl Fn(&mut commserver::Config),
    ) -> Self {
        let mut servers = Vec::new();
        for _ in 0..n {
            let mut config = server_config(&coordinator.url);
            tweak(&mut config);
            servers.push(ServerHandle::start(config).await);
        }
        let cluster = Self {
            coordinator,
            servers,
        };
        cluster.wait_linked().await;
        cluster
    }

    /// Waits until the coordinator lists every server and each has a link to every other.
    pub async fn wait_linked(&self) {
        let n = self.servers.len();
        eventually("every server registered", || async {
            (self.coordinator.server_ids().await.len() == n).then_some(())
        })
        .await;
        for server in &self.servers {
            eventually(
                &format!("{} linked to {} peers", server.id, n - 1),
                || async { (server.stat("peers").await as usize == n - 1).then_some(()) },
            )
            .await;
        }
    }

    /// Connects a client through the coordinator, asking for server `index`.
    pub async fn client_on(&self, index: usize) -> Client {
        self.client_as(index, relaymesh_client::Credentials::Anonymous)
            .await
    }

    /// Connects a client with `credentials` through the coordinator, asking for server
    /// `index`.
    pub async fn client_as(
        &self,
        index: usize,
        credentials: relaymesh_client::Credentials,
    ) -> Client {
        let mut config = client_config(&self.coordinator.url);
        config.tls = self.coordinator.tls.clone();
        config.preferred_server = Some(self.servers[index].id.clone());
        config.credentials = credentials;
        let client = Client::connect(config).await.unwrap();
        assert_eq!(
            client.server_id(),
            self.servers[index].id,
            "preferred server not honoured"
        );
        client
    }
}
