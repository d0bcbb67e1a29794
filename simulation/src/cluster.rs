//! The embedded cluster: a coordinator and comm servers on 127.0.0.1 port 0, started with the
//! same `run` functions the binaries use, on a runtime of their own whose threads are named
//! [`CLUSTER_THREADS`] so their CPU time can be told apart from the load generator's.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use relaymesh_net::sync::lock;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::usage::CLUSTER_THREADS;

/// The secret of the embedded cluster; it never leaves this process.
const SECRET: &str = "embedded-simulation-secret";
/// How long the cluster gets to come up.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long shutdown may take before the runtime is dropped regardless.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How the embedded cluster is set up.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Options {
    /// An account on a SQLite store (nodes and their inboxes).
    pub(crate) inbox: bool,
    /// The coordinator's admin API.
    pub(crate) admin: bool,
    /// The comm servers keep history for the simulation's topics (`sim/#`).
    pub(crate) history: bool,
    /// Each comm server on a runtime of its own, so that one can be killed ([`Killable`]).
    pub(crate) killable: bool,
}

pub(crate) struct Embedded {
    pub(crate) coordinator_url: String,
    /// With an inbox: the account the simulation logs in to, on a SQLite store of its own.
    pub(crate) login: Option<relaymesh_client::Credentials>,
    /// With `admin`: the coordinator's admin API (http://HOST:PORT) and its token.
    pub(crate) admin: Option<(String, String)>,
    /// That store's file, deleted at `stop`.
    db: Option<std::path::PathBuf>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    runtime: Runtime,
    /// The comm servers, when each runs on a runtime of its own.
    pub(crate) killable: Option<std::sync::Arc<Killable>>,
}

impl Embedded {
    /// Starts the cluster on `threads` worker threads and waits until every server is
    /// registered and linked to every other.
    pub(crate) fn start(servers: usize, threads: usize, options: Options) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(CLUSTER_THREADS)
            .enable_all()
            .build()
            .context("starting the cluster runtime")?;
        let stop = CancellationToken::new();
        let (db, login, accounts) = if options.inbox {
            let (db, login, accounts) = runtime.block_on(store())?;
            (Some(db), Some(login), Some(accounts))
        } else {
            (None, None, None)
        };
        let in_cluster_runtime = if options.killable { 0 } else { servers };
        let (coordinator_url, admin, tasks) =
            runtime.block_on(spawn(in_cluster_runtime, stop.clone(), accounts, options))?;
        let killable = match options.killable {
            false => None,
            true => {
                let killable = Killable {
                    coordinator_url: coordinator_url.clone(),
                    history: options.history,
                    threads: (threads / servers.max(1)).max(1),
                    stop: stop.clone(),
                    servers: Mutex::new(Vec::new()),
                    started: AtomicUsize::new(0),
                };
                for _ in 0..servers {
                    killable.start_server()?;
                }
                Some(std::sync::Arc::new(killable))
            }
        };
        let cluster = Self {
            coordinator_url,
            admin,
            login,
            db,
            stop,
            tasks,
            runtime,
            killable,
        };
        cluster
            .runtime
            .block_on(wait_ready(&cluster.coordinator_url, servers))?;
        Ok(cluster)
    }

    /// Waits for SIGINT or SIGTERM (for `--cluster-only`).
    pub(crate) fn serve_until_signalled(&self) {
        let token = CancellationToken::new();
        let _guard = self.runtime.enter();
        relaymesh_net::shutdown::cancel_on_signals(token.clone());
        self.runtime.block_on(token.cancelled());
    }

    pub(crate) fn stop(self) {
        self.stop.cancel();
        if let Some(killable) = &self.killable {
            killable.stop();
        }
        let tasks = self.tasks;
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(STOP_GRACE, futures_util::future::join_all(tasks)).await;
        });
        self.runtime.shutdown_timeout(STOP_GRACE);
        if let Some(db) = self.db {
            for path in [db.clone(), db.with_extension("db-journal")] {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A SQLite account store of the simulation's own (in the temporary directory) with one
/// account and a fresh access code: the `sql` store, which keeps nodes' inboxes.
async fn store() -> anyhow::Result<(
    std::path::PathBuf,
    relaymesh_client::Credentials,
    coordinator::accounts::AccountsConfig,
)> {
    let path = std::env::temp_dir().join(format!("relaymesh-simulation-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let url = format!("sqlite://{}", path.display());
    let db = coordinator::sql::SqlStore::connect(&url).await?;
    let code = coordinator::accounts::new_code();
    let account = coordinator::accounts::Account {
        name: "sim".into(),
        enabled: true,
        isolate_groups: false,
        access_codes: vec![coordinator::accounts::AccessCode {
            id: "simulation".into(),
            hash: coordinator::accounts::hash_code(&code)?,
            revoked: false,
            groups: Vec::new(),
        }],
        public_keys: Vec::new(),
        roles: Default::default(),
        nodes: Vec::new(),
    };
    db.put(&account).await?;
    db.close().await;
    let login = relaymesh_client::Credentials::AccessCode {
        account: "sim".into(),
        code,
        role: String::new(),
        group: String::new(),
    };
    let accounts = coordinator::accounts::AccountsConfig {
        store: coordinator::accounts::StoreKind::Sql,
        url,
        ..Default::default()
    };
    Ok((path, login, accounts))
}

async fn spawn(
    servers: usize,
    stop: CancellationToken,
    accounts: Option<coordinator::accounts::AccountsConfig>,
    options: Options,
) -> anyhow::Result<(String, Option<(String, String)>, Vec<JoinHandle<()>>)> {
    let admin = options.admin;
    let mut tasks = Vec::new();
    let listener = bind_loopback().context("bind coordinator")?;
    let coordinator_url = format!("ws://{}", listener.local_addr()?);
    let (admin_listener, admin) = if admin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the admin API")?;
        let url = format!("http://{}", listener.local_addr()?);
        let token = format!("{:032x}", rand::random::<u128>());
        (Some(listener), Some((url, token)))
    } else {
        (None, None)
    };
    let defaults = coordinator::Config::default();
    let config = coordinator::Config {
        cluster_secret: SECRET.into(),
        // The load generator logs in many clients from one address at once...
        connect_rate_per_s: 100_000,
        connect_burst: 100_000,
        // ...and holds all its connections from 127.0.0.1: only the overall cap applies.
        max_connections_per_ip: defaults.max_connections,
        accounts: accounts.unwrap_or_default(),
        // Logins checked against the store (node registrations) all come from 127.0.0.1, many
        // at once: each takes a failed-login token while it is checked.
        failed_login_burst: 10_000,
        admin_token: admin
            .as_ref()
            .map(|(_, token)| token.clone())
            .unwrap_or_default(),
        ..defaults
    };
    let token = stop.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = coordinator::run_with(listener, admin_listener, config, token).await {
            eprintln!("embedded coordinator failed: {e}");
        }
    }));
    for _ in 0..servers {
        let listener = bind_loopback().context("bind comm server")?;
        let config = server_config(&coordinator_url, options.history);
        let token = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = commserver::run(listener, config, token).await {
                eprintln!("embedded comm server failed: {e}");
            }
        }));
    }
    Ok((coordinator_url, admin, tasks))
}

/// The configuration of an embedded comm server.
fn server_config(coordinator_url: &str, history: bool) -> commserver::Config {
    let defaults = commserver::Config::default();
    let mut config = commserver::Config {
        coordinator: coordinator_url.to_owned(),
        cluster_secret: SECRET.into(),
        // Every client comes from 127.0.0.1: only the overall cap applies.
        max_connections_per_ip: defaults.max_connections,
        ..defaults
    };
    if history {
        config.history.topics = vec!["sim/#".into()];
    }
    config
}

/// Comm servers each on a runtime of its own: one can die at once, with no word to anyone
/// (its runtime is shut down and its sockets close), and another be started.
pub(crate) struct Killable {
    coordinator_url: String,
    history: bool,
    /// Worker threads per server.
    threads: usize,
    stop: CancellationToken,
    /// Live servers: id, runtime, and the task that serves.
    servers: Mutex<Vec<(String, Runtime, JoinHandle<()>)>>,
    /// Servers started so far (names the next: `sim-N`).
    started: AtomicUsize,
}

impl Killable {
    /// Starts a comm server on a runtime of its own; returns its id.
    fn start_server(&self) -> anyhow::Result<String> {
        let id = format!("sim-{}", self.started.fetch_add(1, Ordering::Relaxed));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads)
            .thread_name(CLUSTER_THREADS)
            .enable_all()
            .build()
            .context("starting a comm server runtime")?;
        // Bound within its runtime, which serves it.
        let listener = {
            let _inside = runtime.enter();
            bind_loopback().context("bind comm server")?
        };
        let mut config = server_config(&self.coordinator_url, self.history);
        config.id = Some(id.clone());
        let token = self.stop.clone();
        let task = runtime.spawn(async move {
            if let Err(e) = commserver::run(listener, config, token).await {
                eprintln!("embedded comm server failed: {e}");
            }
        });
        lock(&self.servers).push((id.clone(), runtime, task));
        Ok(id)
    }

    /// Kills server `id`: its runtime stops at once, dropping every task and socket.
    pub(crate) fn kill(&self, id: &str) -> anyhow::Result<()> {
        let (_, runtime, _) = {
            let mut servers = lock(&self.servers);
            let i = servers
                .iter()
                .position(|(s, _, _)| s == id)
                .with_context(|| format!("no embedded comm server {id}"))?;
            servers.remove(i)
        };
        runtime.shutdown_background();
        Ok(())
    }

    /// Starts a new server (in place of a killed one); returns its id.
    pub(crate) fn restart(&self) -> anyhow::Result<String> {
        self.start_server()
    }

    /// After `stop` is cancelled: waits for each server to finish, then ends its runtime.
    fn stop(&self) {
        let servers: Vec<_> = lock(&self.servers).drain(..).collect();
        for (_, runtime, task) in servers {
            runtime.block_on(async move {
                let _ = tokio::time::timeout(STOP_GRACE, task).await;
            });
            runtime.shutdown_timeout(STOP_GRACE);
        }
    }
}

/// Waits until `servers` are registered and fully linked.
async fn wait_ready(coordinator: &str, servers: usize) -> anyhow::Result<()> {
    let tls = relaymesh_net::tls::Connector::default();
    relaymesh_client::cluster::wait_ready(coordinator, servers, &tls, READY_WITHIN)
        .await
        .context("the embedded cluster did not come up")
}

/// A listener on a free loopback port with the servers' own accept queue (a simulation's
/// clients connect in bursts, as their binaries' would).
fn bind_loopback() -> std::io::Result<TcpListener> {
    relaymesh_net::serve::bind(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        relaymesh_net::serve::DEFAULT_LISTEN_BACKLOG,
    )
}
