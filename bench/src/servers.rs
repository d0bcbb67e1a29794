//! Starts the systems under test as real processes on 127.0.0.1, each from its documented
//! config in `bench/configs/` (placeholders such as `{{port}}` filled with free ports), pinned
//! with `taskset` to the server CPU, and stops them by PID (kill, then wait) when dropped.
//! With TLS (`--tls`), relaymesh's coordinator and comm servers get the run's certificate with
//! `--tls-cert`/`--tls-key`/`--ca`, and NATS starts from the `-tls` configs (TLS on the client
//! port and on the route). With history (`--history`, and the history scenarios), a `[history]`
//! table from `bench/configs/history*.toml` is appended to each comm server's config. A server
//! can be stopped (killed) and started again with the same command line, as the recovery
//! scenario does to the coordinator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::drivers::{Endpoints, System};
use crate::pki::TlsFiles;

/// The secret the benchmark's relaymesh servers share (loopback only).
pub(crate) const CLUSTER_SECRET: &str = "bench-cluster-secret";

/// A fresh bearer token for a coordinator's admin API: 32 random hex digits (it must be at
/// least 16 bytes). It reaches the coordinator as `RELAYMESH_ADMIN_TOKEN`, as the cluster
/// secret does, so the filled-in config under `--out` holds no token.
fn admin_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Where configs come from and how servers are placed.
#[derive(Debug, Clone)]
pub(crate) struct Launcher {
    /// `bench/configs`.
    pub(crate) configs: PathBuf,
    /// Filled-in configs and server logs go here.
    pub(crate) run_dir: PathBuf,
    /// Directory holding the `coordinator` and `commserver` binaries.
    pub(crate) bin_dir: PathBuf,
    /// `taskset -c` CPU list for the servers; `None` leaves them unpinned.
    pub(crate) server_cpu: Option<String>,
    /// The run's certificates, when any system starts with TLS.
    pub(crate) tls: Option<TlsFiles>,
    /// A dialer trusting the run's CA (the default trust without TLS).
    pub(crate) connector: relaymesh_net::tls::Connector,
    /// relaymesh clients log in through comm servers ([`Endpoints::relay_logins`]).
    pub(crate) relay_logins: bool,
}

/// One server process, killed and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
    recipe: Recipe,
}

/// How a server process was started, to start it again the same way.
#[derive(Debug, Clone)]
pub(crate) struct Recipe {
    name: String,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started system.
pub(crate) struct Running {
    pub(crate) endpoints: Endpoints,
    /// relaymesh: each comm server's `http://` (with TLS `https://`) base (for `/v1/stats`).
    pub(crate) server_http: Vec<String>,
    procs: Vec<Proc>,
}

impl Running {
    /// CPU seconds and resident bytes summed over the system's processes.
    pub(crate) fn usage(&self) -> (f64, u64) {
        self.procs
            .iter()
            .filter_map(|p| relaymesh_net::procstat::of_process(p.child.id()))
            .fold((0.0, 0), |(cpu, rss), u| {
                (cpu + u.cpu_seconds, rss + u.rss_bytes)
            })
    }

    /// The process id of the named server (`commserver-a`, `nats-a`, ...).
    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
    }

    /// Kills the named server (SIGKILL: as a crash) and reaps it; returns how to start it
    /// again.
    pub(crate) fn stop(&mut self, name: &str) -> anyhow::Result<Recipe> {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no server named {name}"))?;
        let mut p = self.procs.remove(i);
        p.child.kill()?;
        p.child.wait()?;
        Ok(p.recipe.clone())
    }

    /// Starts a server stopped with [`Running::stop`] again, with the same command line (its
    /// log is appended to).
    pub(crate) fn start_again(
        &mut self,
        launcher: &Launcher,
        recipe: Recipe,
    ) -> anyhow::Result<()> {
        let p = launcher.launch(recipe, true)?;
        self.procs.push(p);
        Ok(())
    }

    /// The `/v1/stats` of relaymesh comm server `i` (0 = A).
    pub(crate) async fn comm_stats(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let base = self
            .server_http
            .get(i)
            .with_context(|| format!("no comm server {i}"))?;
        get_json(&format!("{base}/v1/stats"), &self.endpoints.tls).await
    }

    /// Fails when a server has exited, naming its log.
    pub(crate) fn check_alive(&mut self, log_dir: &Path) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited ({status}); see {}",
                    p.name,
                    log_dir.join(format!("{}.log", p.name)).display()
                );
            }
        }
        Ok(())
    }
}

/// GETs `url` and parses its JSON body.
async fn get_json(
    url: &str,
    tls: &relaymesh_net::tls::Connector,
) -> anyhow::Result<serde_json::Value> {
    let (status, body) = relaymesh_net::http::request_with(
        relaymesh_net::http::Method::GET,
        url,
        &[],
        None,
        tls,
        Duration::from_secs(5),
    )
    .await?;
    if !status.is_success() {
        bail!("{url}: {status}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The comm servers of a relaymesh cluster the harness starts at most.
pub(crate) const MAX_SERVERS: usize = 3;

/// A free TCP port on 127.0.0.1 (bound and released; the server binds it right after).
///
/// It is taken below the kernel's ephemeral range (which starts at 32768 on Linux): outbound
/// connections, this run's and those of tests running beside it, draw their ports from that
/// range, and one of them could take a port found free there before the server binds it.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()).wrapping_mul(6_364_136_223_846_793_005)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
    for _ in 0..2_000 {
        let n = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(7_919));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The executable a system needs, and the Debian package it comes from.
pub(crate) fn requirement(system: System) -> Option<(&'static str, &'static str)> {
    match system {
        System::Relaymesh => None,
        System::Nats => Some(("nats-server", "nats-server")),
        System::Mosquitto => Some(("mosquitto", "mosquitto")),
        System::Redis => Some(("redis-server", "redis-server")),
    }
}

/// Whether `program` is on `PATH` (or is a path to a file).
pub(crate) fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

impl Launcher {
    fn fill(
        &self,
        template: &str,
        name: &str,
        values: &HashMap<&str, String>,
    ) -> anyhow::Result<PathBuf> {
        let path = self.configs.join(template);
        let mut text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (k, v) in values {
            text = text.replace(&format!("{{{{{k}}}}}"), v);
        }
        if let Some(at) = text.find("{{") {
            bail!("{} has an unknown placeholder at byte {at}", path.display());
        }
        let out = self.run_dir.join(name);
        std::fs::write(&out, text)?;
        Ok(out)
    }

    /// Starts `program` with `args` and, beside the cluster secret, the variables in `env`.
    fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let recipe = Recipe {
            name: name.to_owned(),
            program: program.to_owned(),
            args: args.iter().map(|&a| a.to_owned()).collect(),
            env: env
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        };
        self.launch(recipe, false)
    }

    /// Starts the process `recipe` describes, its output to `<name>.log` in the run directory
    /// (appended to when `append`).
    fn launch(&self, recipe: Recipe, append: bool) -> anyhow::Result<Proc> {
        let path = self.run_dir.join(format!("{}.log", recipe.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)?;
        let mut cmd = match &self.server_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpu]).arg(&recipe.program);
                c
            }
            None => Command::new(&recipe.program),
        };
        cmd.args(&recipe.args)
            .env("RELAYMESH_CLUSTER_SECRET", CLUSTER_SECRET)
            .envs(recipe.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", recipe.program.display()))?;
        Ok(Proc {
            name: recipe.name.clone(),
            child,
            recipe,
        })
    }

    /// Starts `system` with `servers` nodes (2 or, relaymesh, 3 only where the system
    /// clusters), on TLS with `tls`, relaymesh's comm servers with the `[history]` table of
    /// `history` (a file in the configs directory) when given, and waits until it accepts
    /// clients.
    pub(crate) async fn start(
        &self,
        system: System,
        servers: usize,
        tls: bool,
        history: Option<&str>,
    ) -> anyhow::Result<Running> {
        std::fs::create_dir_all(&self.run_dir)?;
        if servers > MAX_SERVERS || (servers > 2 && system != System::Relaymesh) {
            bail!("{} servers of {} asked for", servers, system.name());
        }
        if history.is_some() && system != System::Relaymesh {
            bail!("{} keeps no history", system.name());
        }
        let history_table = match history {
            Some(file) => {
                let path = self.configs.join(file);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Some(text)
            }
            None => None,
        };
        let files = match (tls, &self.tls) {
            (false, _) => None,
            (true, Some(files)) => Some(files),
            (true, None) => bail!("TLS asked for without certificates"),
        };
        if files.is_some() && matches!(system, System::Mosquitto | System::Redis) {
            bail!("{} is measured without TLS", system.name());
        }
        let (ws, http) = if tls {
            ("wss", "https")
        } else {
            ("ws", "http")
        };
        let connector = if tls {
            self.connector.clone()
        } else {
            relaymesh_net::tls::Connector::default()
        };
        // `--tls-cert FILE --tls-key FILE --ca FILE`, or nothing.
        let tls_flags: Vec<&std::ffi::OsStr> = files.map_or_else(Vec::new, |f| {
            vec![
                "--tls-cert".as_ref(),
                f.cert.as_os_str(),
                "--tls-key".as_ref(),
                f.key.as_os_str(),
                "--ca".as_ref(),
                f.ca.as_os_str(),
            ]
        });
        let mut waits = Vec::new();
        let mut procs = Vec::new();
        let mut urls = Vec::new();
        let mut server_ids = Vec::new();
        let mut server_http = Vec::new();
        let mut server_urls = Vec::new();
        let ports: Vec<u16> = (0..servers)
            .map(|_| free_port())
            .collect::<Result<_, _>>()?;
        let letters = ["a", "b", "c"];
        match system {
            System::Relaymesh => {
                let coordinator = free_port()?;
                let admin = free_port()?;
                let token = admin_token();
                let cfg = self.fill(
                    "coordinator.toml",
                    "coordinator.toml",
                    &HashMap::from([
                        ("port", coordinator.to_string()),
                        ("admin_port", admin.to_string()),
                    ]),
                )?;
                let mut args = vec!["--config".as_ref(), cfg.as_os_str()];
                args.extend(&tls_flags);
                procs.push(self.spawn(
                    "coordinator",
                    &self.bin_dir.join("coordinator"),
                    &args,
                    &[("RELAYMESH_ADMIN_TOKEN", &token)],
                )?);
                // The config names the coordinator with ws://; the flag says wss:// with TLS.
                let coordinator_url = format!("{ws}://127.0.0.1:{coordinator}");
                for (i, port) in ports.iter().enumerate() {
                    let id = letters[i];
                    let cfg = self.fill(
                        "commserver.toml",
                        &format!("commserver-{id}.toml"),
                        &HashMap::from([
                            ("port", port.to_string()),
                            ("coordinator_port", coordinator.to_string()),
                            ("id", id.to_owned()),
                        ]),
                    )?;
                    if let Some(table) = &history_table {
                        let mut text = std::fs::read_to_string(&cfg)?;
                        text.push('\n');
                        text.push_str(table);
                        std::fs::write(&cfg, text)?;
                    }
                    let mut args = vec![
                        "--config".as_ref(),
                        cfg.as_os_str(),
                        "--coordinator".as_ref(),
                        coordinator_url.as_ref(),
                    ];
                    args.extend(&tls_flags);
                    procs.push(self.spawn(
                        &format!("commserver-{id}"),
                        &self.bin_dir.join("commserver"),
                        &args,
                        &[],
                    )?);
                    server_ids.push(id.to_owned());
                    server_http.push(format!("{http}://127.0.0.1:{port}"));
                    server_urls.push(format!("{ws}://127.0.0.1:{port}"));
                }
                urls.push(coordinator_url);
                let mut running = Running {
                    endpoints: Endpoints {
                        system,
                        urls,
                        server_ids,
                        server_urls,
                        relay_logins: self.relay_logins,
                        admin_url: Some(format!("{http}://127.0.0.1:{admin}")),
                        admin_token: token,
                        tls: connector,
                        ca: files.map(|f| f.ca.clone()),
                    },
                    server_http,
                    procs,
                };
                let stats = format!("{http}://127.0.0.1:{coordinator}/v1/stats");
                wait_relaymesh(&mut running, &stats, servers, &self.run_dir).await?;
                wait_port(&mut running, &format!("127.0.0.1:{admin}"), &self.run_dir).await?;
                return Ok(running);
            }
            System::Nats => {
                let cluster: Vec<u16> = (0..servers)
                    .map(|_| free_port())
                    .collect::<Result<_, _>>()?;
                for (i, port) in ports.iter().enumerate() {
                    let name = format!("nats-{}", letters[i]);
                    let mut values = HashMap::from([("port", port.to_string())]);
                    if servers > 1 {
                        values.insert("cluster_port", cluster[i].to_string());
                        values.insert("route_port", cluster[(i + 1) % servers].to_string());
                    }
                    if let Some(f) = files {
                        for (k, path) in [("cert", &f.cert), ("key", &f.key), ("ca", &f.ca)] {
                            values.insert(k, path.display().to_string());
                        }
                    }
                    let template = match (servers > 1, files.is_some()) {
                        (false, false) => "nats.conf",
                        (false, true) => "nats-tls.conf",
                        (true, false) => "nats-cluster.conf",
                        (true, true) => "nats-cluster-tls.conf",
                    };
                    let cfg = self.fill(template, &format!("{name}.conf"), &values)?;
                    procs.push(self.spawn(
                        &name,
                        Path::new("nats-server"),
                        &["-c".as_ref(), cfg.as_os_str()],
                        &[],
                    )?);
                    waits.push(format!("127.0.0.1:{port}"));
                    urls.push(if tls {
                        format!("tls://127.0.0.1:{port}")
                    } else {
                        format!("127.0.0.1:{port}")
                    });
                }
            }
            System::Mosquitto => {
                if servers > 1 {
                    bail!("mosquitto does not cluster");
                }
                let cfg = self.fill(
                    "mosquitto.conf",
                    "mosquitto.conf",
                    &HashMap::from([("port", ports[0].to_string())]),
                )?;
                procs.push(self.spawn(
                    "mosquitto-a",
                    Path::new("mosquitto"),
                    &["-c".as_ref(), cfg.as_os_str()],
                    &[],
                )?);
                urls.push(format!("127.0.0.1:{}", ports[0]));
                waits.push(format!("127.0.0.1:{}", ports[0]));
            }
            System::Redis => {
                if servers > 1 {
                    bail!("redis pub/sub is measured on one node");
                }
                let cfg = self.fill(
                    "redis.conf",
                    "redis.conf",
                    &HashMap::from([("port", ports[0].to_string())]),
                )?;
                procs.push(self.spawn(
                    "redis-a",
                    Path::new("redis-server"),
                    &[cfg.as_os_str()],
                    &[],
                )?);
                urls.push(format!("127.0.0.1:{}", ports[0]));
                waits.push(format!("127.0.0.1:{}", ports[0]));
            }
        }
        let mut running = Running {
            endpoints: Endpoints {
                system,
                urls,
                server_ids,
                server_urls,
                relay_logins: false,
                admin_url: None,
                admin_token: String::new(),
                tls: connector,
                ca: files.map(|f| f.ca.clone()),
            },
            server_http,
            procs,
        };
        for addr in &waits {
            wait_port(&mut running, addr, &self.run_dir).await?;
        }
        Ok(running)
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(15);

async fn wait_port(running: &mut Running, addr: &str, logs: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        running.check_alive(logs)?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listens on {addr} after {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the coordinator's `/v1/stats` at `url` lists `servers` eligible comm servers.
async fn wait_relaymesh(
    running: &mut Running,
    url: &str,
    servers: usize,
    logs: &Path,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        running.check_alive(logs)?;
        if let Ok((status, body)) = relaymesh_net::http::request_with(
            relaymesh_net::http::Method::GET,
            url,
            &[],
            None,
            &running.endpoints.tls,
            Duration::from_secs(1),
        )
        .await
            && status.is_success()
            && let Ok(stats) = serde_json::from_slice::<serde_json::Value>(&body)
        {
            let eligible = stats["servers"].as_array().map_or(0, |s| {
                s.iter()
                    .filter(|s| s["eligible"].as_bool() == Some(true))
                    .count()
            });
            if eligible >= servers {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the coordinator did not list {servers} eligible comm servers in {START_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
