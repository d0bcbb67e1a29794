//! The embedded cluster: a coordinator and comm servers on 127.0.0.1 port 0, in this process,
//! started with the same `run` functions the binaries use.

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The secret of the embedded cluster; it never leaves this process.
const SECRET: &str = "embedded-simulation-secret";

pub(crate) struct Embedded {
    pub(crate) coordinator_url: String,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Embedded {
    pub(crate) async fn start(servers: usize) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind coordinator")?;
        let coordinator_url = format!("ws://{}", listener.local_addr()?);
        let config = coordinator::Config {
            cluster_secret: SECRET.into(),
            // The load generator logs in many clients from one address at once.
            connect_rate_per_s: 100_000,
            connect_burst: 100_000,
            ..coordinator::Config::default()
        };
        let token = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = coordinator::run(listener, config, token).await {
                eprintln!("embedded coordinator failed: {e}");
            }
        }));
        for _ in 0..servers {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .context("bind comm server")?;
            let config = commserver::Config {
                coordinator: coordinator_url.clone(),
                cluster_secret: SECRET.into(),
                ..commserver::Config::default()
            };
            let token = stop.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = commserver::run(listener, config, token).await {
                    eprintln!("embedded comm server failed: {e}");
                }
            }));
        }
        let cluster = Self {
            coordinator_url,
            stop,
            tasks,
        };
        cluster.wait_ready(servers).await?;
        Ok(cluster)
    }

    /// Waits until every server is registered and linked to every other.
    async fn wait_ready(&self, servers: usize) -> anyhow::Result<()> {
        let stats_url = format!(
            "{}/v1/stats",
            self.coordinator_url.replacen("ws://", "http://", 1)
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(stats) = get_json(&stats_url).await
                && let Some(list) = stats["servers"].as_array()
                && list.len() == servers
            {
                let mut linked = true;
                for server in list {
                    let url = format!(
                        "{}/v1/stats",
                        server["url"]
                            .as_str()
                            .unwrap_or_default()
                            .replacen("ws://", "http://", 1)
                    );
                    linked &= get_json(&url)
                        .await
                        .is_ok_and(|s| s["peers"].as_u64() == Some(servers as u64 - 1));
                }
                if linked {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "embedded cluster did not come up within 20 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = relaymesh_net::http::request(
        relaymesh_net::http::Method::GET,
        url,
        None,
        std::time::Duration::from_secs(5),
    )
    .await?;
    anyhow::ensure!(status.is_success(), "{url}: {status}");
    Ok(serde_json::from_slice(&body)?)
}
