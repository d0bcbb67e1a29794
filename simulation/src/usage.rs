//! Where the CPU went during a run, and how much memory the servers held.
//!
//! The embedded cluster runs on its own runtime whose threads are named [`CLUSTER_THREADS`] and
//! the load generator on threads named [`GENERATOR_THREADS`], so per-thread CPU from `/proc`
//! separates the two inside one process; memory cannot be split that way, so the embedded
//! figure is the whole process's peak. For a deployed cluster every comm server reports its own
//! process CPU and memory in `/v1/stats`.
//!
//! The same snapshots feed the generator-saturation check: a generator whose threads were busy
//! nearly all the time, or a machine with no idle core, measured itself rather than the cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use relaymesh_net::procstat;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Thread name prefix of the embedded cluster's runtime.
pub(crate) const CLUSTER_THREADS: &str = "rm-cluster";
/// Thread name prefix of the load generator's runtime.
pub(crate) const GENERATOR_THREADS: &str = "rm-load";
/// Busy fraction above which a generator (or the machine) counts as saturated.
const SATURATED: f64 = 0.9;

/// Where the servers run.
#[derive(Debug, Clone)]
pub(crate) enum Servers {
    /// In this process, on the [`CLUSTER_THREADS`] runtime.
    Embedded,
    /// Elsewhere; read through each server's `/v1/stats`.
    Deployed,
}

/// One comm server's counters and usage, from its `/v1/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct ServerStats {
    pub(crate) clients: u64,
    pub(crate) topics: u64,
    pub(crate) remote_topics: u64,
    pub(crate) dropped: u64,
    pub(crate) slow_consumers: u64,
    pub(crate) forward_dropped: u64,
    pub(crate) cpu_seconds: f64,
    pub(crate) rss_bytes: u64,
    pub(crate) peak_rss_bytes: u64,
    /// Host and process id: servers with the same one share a process (and its CPU and memory
    /// figures), as in an embedded or `--cluster-only` cluster.
    pub(crate) process: String,
}

impl ServerStats {
    fn from_json(url: &str, v: &Value) -> Self {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let remote_topics = v["peer_links"].as_array().map_or(0, |l| {
            l.iter()
                .map(|p| p["remote_topics"].as_u64().unwrap_or(0))
                .sum()
        });
        Self {
            clients: n("clients"),
            topics: n("topics"),
            remote_topics,
            dropped: n("dropped"),
            slow_consumers: n("slow_consumers"),
            forward_dropped: n("forward_dropped"),
            cpu_seconds: v["process"]["cpu_seconds"].as_f64().unwrap_or(0.0),
            rss_bytes: v["process"]["rss_bytes"].as_u64().unwrap_or(0),
            peak_rss_bytes: v["process"]["peak_rss_bytes"].as_u64().unwrap_or(0),
            process: format!(
                "{}#{}",
                host(url),
                v["process"]["pid"].as_u64().unwrap_or(0)
            ),
        }
    }
}

/// Every registered comm server's stats, by id, read through the coordinator.
pub(crate) async fn server_stats(
    coordinator: &str,
) -> anyhow::Result<BTreeMap<String, ServerStats>> {
    // With several coordinators, the first that answers: each lists every server.
    let mut cluster = None;
    let mut failure = None;
    for url in relaymesh_net::url::split_list(coordinator) {
        match get_json(&format!("{}/v1/stats", http_base(url))).await {
            Ok(stats) => {
                cluster = Some(stats);
                break;
            }
            Err(e) => failure = Some(e),
        }
    }
    let Some(cluster) = cluster else {
        return Err(failure.unwrap_or_else(|| anyhow::anyhow!("no coordinator URL given")));
    };
    let mut out = BTreeMap::new();
    for server in cluster["servers"].as_array().into_iter().flatten() {
        let (Some(id), Some(url)) = (server["id"].as_str(), server["url"].as_str()) else {
            continue;
        };
        let stats = get_json(&format!("{}/v1/stats", http_base(url))).await?;
        out.insert(id.to_owned(), ServerStats::from_json(url, &stats));
    }
    Ok(out)
}

/// The host part of a URL.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// The HTTP base of a `ws://` URL (coordinator or comm server), without a path. A URL that
/// cannot be used is returned as it is, so the request fails with the reason.
pub(crate) fn http_base(ws: &str) -> String {
    let Ok(http) = relaymesh_net::url::normalize(ws, relaymesh_net::url::Form::Http) else {
        return ws.to_owned();
    };
    match http
        .find("://")
        .and_then(|i| http[i + 3..].find('/').map(|j| i + 3 + j))
    {
        Some(path) => http[..path].to_owned(),
        None => http,
    }
}

pub(crate) async fn get_json(url: &str) -> anyhow::Result<Value> {
    let (status, body) = relaymesh_net::http::request(
        relaymesh_net::http::Method::GET,
        url,
        None,
        Duration::from_secs(5),
    )
    .await?;
    anyhow::ensure!(status.is_success(), "{url}: {status}");
    Ok(serde_json::from_slice(&body)?)
}

/// A point-in-time reading.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    at: Instant,
    generator_cpu: f64,
    host_cpu: (u64, u64),
    cluster_cpu: f64,
    servers: BTreeMap<String, ServerStats>,
}

/// Takes readings of the generator, the process and the servers.
#[derive(Debug, Clone)]
pub(crate) struct Meter {
    pub(crate) servers: Servers,
    pub(crate) coordinator: String,
    /// Worker threads of the generator runtime.
    pub(crate) generator_threads: usize,
}

impl Meter {
    pub(crate) async fn snapshot(&self) -> Snapshot {
        let generator_cpu = procstat::threads_cpu_seconds(GENERATOR_THREADS).unwrap_or(0.0);
        Snapshot {
            at: Instant::now(),
            generator_cpu,
            host_cpu: procstat::host_cpu().unwrap_or((0, 0)),
            // The whole process but the generator's threads: the cluster's blocking threads
            // (argon2 checks of logins) come and go, and a thread that exited would take its
            // CPU time out of a sum over the cluster's live threads.
            cluster_cpu: match self.servers {
                Servers::Embedded => {
                    procstat::process().map_or(0.0, |u| (u.cpu_seconds - generator_cpu).max(0.0))
                }
                Servers::Deployed => 0.0,
            },
            // Best effort: a cluster that stopped answering stats still gets a load report.
            servers: server_stats(&self.coordinator).await.unwrap_or_default(),
        }
    }

    /// What happened between two snapshots.
    pub(crate) fn between(&self, a: &Snapshot, b: &Snapshot) -> Usage {
        let window = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let generator_cpu_s = (b.generator_cpu - a.generator_cpu).max(0.0);
        let host_busy = (b.host_cpu.0.saturating_sub(a.host_cpu.0)) as f64
            / (b.host_cpu.1.saturating_sub(a.host_cpu.1)).max(1) as f64;
        let cores = procstat::cores();
        let counter = |f: fn(&ServerStats) -> u64| -> u64 {
            b.servers
                .iter()
                .map(|(id, s)| f(s).saturating_sub(a.servers.get(id).map_or(0, f)))
                .sum()
        };
        let (servers_cpu_s, peak_rss_bytes, rss_scope) = match self.servers {
            Servers::Embedded => (
                (b.cluster_cpu - a.cluster_cpu).max(0.0),
                procstat::process().map_or(0, |u| u.peak_rss_bytes),
                "embedded cluster and load generator: one process",
            ),
            Servers::Deployed => {
                // Count each process once, however many servers it runs.
                let mut processes = BTreeMap::new();
                for (id, s) in &b.servers {
                    let before = a.servers.get(id).map_or(s.cpu_seconds, |s| s.cpu_seconds);
                    processes.insert(
                        &s.process,
                        ((s.cpu_seconds - before).max(0.0), s.peak_rss_bytes),
                    );
                }
                (
                    processes.values().map(|p| p.0).sum(),
                    processes.values().map(|p| p.1).max().unwrap_or(0),
                    "largest comm server process",
                )
            }
        };
        let generator_busy = generator_cpu_s / window / self.generator_threads.max(1) as f64;
        Usage {
            window_s: window,
            cores,
            generator_cpu_s,
            generator_busy,
            servers_cpu_s,
            peak_rss_bytes,
            rss_scope: rss_scope.to_owned(),
            generator_saturated: generator_busy >= SATURATED,
            host_busy,
            machine_saturated: host_busy >= SATURATED,
            server_dropped: counter(|s| s.dropped),
            server_slow_consumers: counter(|s| s.slow_consumers),
            server_forward_dropped: counter(|s| s.forward_dropped),
        }
    }
}

impl Usage {
    /// Takes the servers' drop counters from `later`, a reading over a longer window (one that
    /// includes the drain).
    pub(crate) fn take_drops(&mut self, later: &Usage) {
        self.server_dropped = later.server_dropped;
        self.server_slow_consumers = later.server_slow_consumers;
        self.server_forward_dropped = later.server_forward_dropped;
    }
}

/// CPU and memory over a measured window, and the servers' drop counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Usage {
    pub(crate) window_s: f64,
    pub(crate) cores: usize,
    pub(crate) generator_cpu_s: f64,
    /// Generator CPU over its worker threads' capacity (1.0 = every worker busy all the time).
    pub(crate) generator_busy: f64,
    pub(crate) servers_cpu_s: f64,
    pub(crate) peak_rss_bytes: u64,
    /// What `peak_rss_bytes` covers.
    pub(crate) rss_scope: String,
    pub(crate) generator_saturated: bool,
    /// How busy this host's CPUs were, whoever kept them busy (1.0 = every core all the time).
    pub(crate) host_busy: f64,
    /// This host had no idle core to speak of: generator and cluster (or other programs)
    /// competed for CPU.
    pub(crate) machine_saturated: bool,
    /// Messages the servers dropped for slow consumers, by their own counters.
    pub(crate) server_dropped: u64,
    pub(crate) server_slow_consumers: u64,
    pub(crate) server_forward_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_base_drops_the_path() {
        assert_eq!(http_base("ws://127.0.0.1:7000"), "http://127.0.0.1:7000");
        assert_eq!(http_base("ws://h:1/v1/client"), "http://h:1");
        assert_eq!(http_base("http://h:1/"), "http://h:1");
        assert_eq!(host("ws://10.0.0.1:7000/v1/client"), "10.0.0.1");
    }
}
