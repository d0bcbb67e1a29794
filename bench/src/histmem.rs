//! Memory of topic history on one relaymesh comm server (`bench/configs/history-memory.toml`:
//! every topic keeps history, `max_total_bytes` and `max_topics` lowered): bytes per stored
//! message, and whether the bounds hold under a flood.
//!
//! For each payload size, on a fresh server: a baseline; a fill of `max_topics` topics to about
//! half of `max_total_bytes` (below every bound, so every message is held: bytes per message =
//! the growth of the server's RSS, and of its own `history_bytes`, over the messages held); a
//! flood of the same topics (`flood_factor` × `max_total_bytes` of messages: the total bound
//! evicts); a flood of as many other topics (`max_topics..topics`, which find no room); a flood
//! of all `topics` (twice `max_topics` by default: half of them find no room); then a quiet
//! spell. `/v1/stats` is sampled before, during and after each stage; the server's CPU per
//! message is charged per stage. With `control`, the same stages run again on a server without
//! history, so the CPU per message can be compared.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use relaymesh_client::Client;
use serde::Serialize;

use crate::drivers::System;
use crate::servers::{Launcher, Running};

/// The `[history]` table the server runs with.
pub(crate) const HISTORY_CONFIG: &str = "history-memory.toml";

/// The defaults of the comm server's `[history]` bounds this scenario reads.
const DEFAULT_MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
const DEFAULT_MAX_TOPICS: u64 = 10_000;
/// Share of `max_total_bytes` the fill aims at.
const FILL_SHARE: f64 = 0.5;
/// A guess of the bytes a held message takes beside its payload (frame: topic, alias,
/// position; plus the 64 bytes of bookkeeping history counts), to size the stages.
const GUESSED_OVERHEAD: u64 = 150;
/// Time between samples during a stage.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// How long the server is left quiet after the floods.
const QUIET: Duration = Duration::from_secs(2);

/// How much to measure.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Payload sizes, one fresh server each.
    pub(crate) payloads: Vec<usize>,
    /// Topics of the last flood (the others use `max_topics`).
    pub(crate) topics: usize,
    /// Each flood publishes this many times `max_total_bytes` (by its guessed message size).
    pub(crate) flood_factor: f64,
    /// A stage stops after this long, however far it got.
    pub(crate) max_stage: Duration,
    /// Also run the stages on a server without history.
    pub(crate) control: bool,
}

/// The bounds in the server's config.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Bounds {
    pub(crate) max_total_bytes: u64,
    pub(crate) max_topics: u64,
}

impl Bounds {
    /// Reads `max_total_bytes` and `max_topics` from the `[history]` table in `path` (lines of
    /// `key = integer`), the comm server's defaults for those it does not set.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value = |key: &str| -> anyhow::Result<Option<u64>> {
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default();
                if let Some((k, v)) = line.split_once('=')
                    && k.trim() == key
                {
                    let v = v.trim().replace('_', "");
                    return Ok(Some(v.parse().with_context(|| {
                        format!("{}: {key} = {v} is no integer", path.display())
                    })?));
                }
            }
            Ok(None)
        };
        Ok(Self {
            max_total_bytes: value("max_total_bytes")?.unwrap_or(DEFAULT_MAX_TOTAL_BYTES),
            max_topics: value("max_topics")?.unwrap_or(DEFAULT_MAX_TOPICS),
        })
    }
}

/// One reading of the server's `/v1/stats`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub(crate) stage: &'static str,
    /// Seconds since the server's baseline.
    pub(crate) at_s: f64,
    /// Messages published so far (all stages).
    pub(crate) published: u64,
    pub(crate) history_topics: u64,
    pub(crate) history_bytes: u64,
    /// `history_stored - history_evicted`: messages held.
    pub(crate) held: u64,
    pub(crate) history_stored: u64,
    pub(crate) history_evicted: u64,
    pub(crate) history_not_kept: u64,
    pub(crate) rss_mib: f64,
    pub(crate) peak_rss_mib: f64,
    pub(crate) cpu_s: f64,
}

/// What one stage cost.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Stage {
    pub(crate) stage: &'static str,
    /// Topics `first_topic..first_topic + topics`, round robin.
    pub(crate) first_topic: usize,
    pub(crate) topics: usize,
    pub(crate) messages: u64,
    pub(crate) payload_bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) messages_per_s: f64,
    /// The comm server's CPU per message published in the stage.
    pub(crate) server_cpu_us_per_message: f64,
    /// The stage stopped at `max_stage` before publishing all it meant to.
    pub(crate) cut_short: bool,
}

/// One payload size's run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemoryRun {
    pub(crate) payload: usize,
    /// The server kept history (`false`: the control run).
    pub(crate) history: bool,
    pub(crate) bounds: Bounds,
    pub(crate) stages: Vec<Stage>,
    pub(crate) samples: Vec<Sample>,
    /// After the fill: `history_bytes / held`, and RSS growth over the baseline / held.
    pub(crate) accounted_bytes_per_message: f64,
    pub(crate) rss_bytes_per_message: f64,
    /// The highest `history_bytes` and `history_topics` sampled.
    pub(crate) max_history_bytes: u64,
    pub(crate) max_history_topics: u64,
    pub(crate) baseline_rss_mib: f64,
    /// RSS at the end of the last flood and after the quiet spell, and the highest.
    pub(crate) flood_end_rss_mib: f64,
    pub(crate) settled_rss_mib: f64,
    pub(crate) peak_rss_mib: f64,
    /// `history_bytes ≤ max_total_bytes` and `history_topics ≤ max_topics` in every sample.
    pub(crate) bounds_held: bool,
}

fn counter(stats: &serde_json::Value, key: &str) -> anyhow::Result<u64> {
    stats[key]
        .as_u64()
        .with_context(|| format!("no {key} in the comm server's stats"))
}

async fn sample(
    running: &Running,
    stage: &'static str,
    start: Instant,
    published: u64,
) -> anyhow::Result<Sample> {
    let s = running.comm_stats(0).await?;
    let stored = counter(&s, "history_stored")?;
    let evicted = counter(&s, "history_evicted")?;
    let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
    Ok(Sample {
        stage,
        at_s: start.elapsed().as_secs_f64(),
        published,
        history_topics: counter(&s, "history_topics")?,
        history_bytes: counter(&s, "history_bytes")?,
        held: stored.saturating_sub(evicted),
        history_stored: stored,
        history_evicted: evicted,
        history_not_kept: counter(&s, "history_not_kept")?,
        rss_mib: mib(&s["process"]["rss_bytes"]),
        peak_rss_mib: mib(&s["process"]["peak_rss_bytes"]),
        cpu_s: s["process"]["cpu_seconds"].as_f64().unwrap_or(0.0),
    })
}

/// The state of a run: its server, publisher and samples.
struct Flood<'a> {
    running: &'a Running,
    publisher: Client,
    start: Instant,
    published: u64,
    samples: Vec<Sample>,
    stages: Vec<Stage>,
}

impl Flood<'_> {
    async fn sample(&mut self, stage: &'static str) -> anyhow::Result<()> {
        let s = sample(self.running, stage, self.start, self.published).await?;
        self.samples.push(s);
        Ok(())
    }

    /// Publishes `messages` of `payload`, round robin over `topics`, sampling as it goes;
    /// stops after `max_stage`.
    async fn stage(
        &mut self,
        stage: &'static str,
        topics: std::ops::Range<usize>,
        messages: u64,
        payload: &Bytes,
        max_stage: Duration,
    ) -> anyhow::Result<()> {
        let first_topic = topics.start;
        let mut names: Vec<String> = topics.map(|i| format!("bench-memory-{i}")).collect();
        if names.is_empty() {
            names.push(format!("bench-memory-{first_topic}"));
        }
        self.sample(stage).await?;
        let cpu_before = self.samples.last().map_or(0.0, |s| s.cpu_s);
        let began = Instant::now();
        let mut next_sample = began + SAMPLE_EVERY;
        let mut sent = 0;
        let mut cut_short = false;
        while sent < messages {
            let topic = &names[(sent % names.len() as u64) as usize];
            self.publisher.publish(topic, payload.clone()).await?;
            sent += 1;
            self.published += 1;
            if sent % 512 == 0 && Instant::now() >= next_sample {
                self.publisher.flush().await?;
                self.sample(stage).await?;
                next_sample = Instant::now() + SAMPLE_EVERY;
                if began.elapsed() > max_stage {
                    cut_short = sent < messages;
                    break;
                }
            }
        }
        self.publisher.flush().await?;
        let seconds = began.elapsed().as_secs_f64();
        self.sample(stage).await?;
        let cpu = self.samples.last().map_or(0.0, |s| s.cpu_s) - cpu_before;
        self.stages.push(Stage {
            stage,
            first_topic,
            topics: names.len(),
            messages: sent,
            payload_bytes: payload.len() as u64,
            seconds,
            messages_per_s: sent as f64 / seconds.max(1e-9),
            server_cpu_us_per_message: 1e6 * cpu / (sent.max(1) as f64),
            cut_short,
        });
        Ok(())
    }
}

async fn one(
    launcher: &Launcher,
    tls: bool,
    plan: &Plan,
    bounds: Bounds,
    payload_len: usize,
    history: bool,
) -> anyhow::Result<MemoryRun> {
    let mut running = launcher
        .start(System::Relaymesh, 1, tls, history.then_some(HISTORY_CONFIG))
        .await?;
    let publisher = running.endpoints.relaymesh_with(0, |_| {}).await?;
    let mut f = Flood {
        running: &running,
        publisher,
        start: Instant::now(),
        published: 0,
        samples: Vec::new(),
        stages: Vec::new(),
    };
    f.sample("baseline").await?;
    let payload = Bytes::from(vec![0x5a; payload_len]);
    let guess = payload_len as u64 + GUESSED_OVERHEAD;
    let kept = usize::try_from(bounds.max_topics)?;
    let fill = ((bounds.max_total_bytes as f64 * FILL_SHARE) / guess as f64) as u64;
    f.stage("fill", 0..kept, fill, &payload, plan.max_stage)
        .await?;
    let filled = f.samples.last().cloned().context("no sample")?;
    let flood = (bounds.max_total_bytes as f64 * plan.flood_factor / guess as f64) as u64;
    f.stage("flood-kept", 0..kept, flood, &payload, plan.max_stage)
        .await?;
    let all = plan.topics.max(kept);
    f.stage("flood-not-kept", kept..all, flood, &payload, plan.max_stage)
        .await?;
    f.stage("flood-all", 0..all, flood, &payload, plan.max_stage)
        .await?;
    let flood_end = f.samples.last().cloned().context("no sample")?;
    tokio::time::sleep(QUIET).await;
    f.sample("quiet").await?;
    let Flood {
        publisher,
        samples,
        stages,
        ..
    } = f;
    publisher.close().await;
    running.check_alive(&launcher.run_dir)?;
    let baseline = samples.first().context("no sample")?.clone();
    let settled = samples.last().context("no sample")?.clone();
    let max_history_bytes = samples.iter().map(|s| s.history_bytes).max().unwrap_or(0);
    let max_history_topics = samples.iter().map(|s| s.history_topics).max().unwrap_or(0);
    let held = filled.held.max(1) as f64;
    Ok(MemoryRun {
        payload: payload_len,
        history,
        bounds,
        accounted_bytes_per_message: filled.history_bytes as f64 / held,
        rss_bytes_per_message: (filled.rss_mib - baseline.rss_mib) * 1024.0 * 1024.0 / held,
        max_history_bytes,
        max_history_topics,
        baseline_rss_mib: baseline.rss_mib,
        flood_end_rss_mib: flood_end.rss_mib,
        settled_rss_mib: settled.rss_mib,
        peak_rss_mib: samples.iter().map(|s| s.peak_rss_mib).fold(0.0, f64::max),
        bounds_held: max_history_bytes <= bounds.max_total_bytes
            && max_history_topics <= bounds.max_topics
            && (history || max_history_bytes == 0),
        stages,
        samples,
    })
}

/// Runs every payload size of `plan`, each on a fresh server.
pub(crate) async fn run(
    launcher: &Launcher,
    tls: bool,
    plan: &Plan,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<MemoryRun>> {
    let bounds = Bounds::read(&launcher.configs.join(HISTORY_CONFIG))?;
    let mut runs = Vec::new();
    for &payload in &plan.payloads {
        let run = one(launcher, tls, plan, bounds, payload, true).await?;
        progress(&run_line(&run));
        runs.push(run);
        if plan.control {
            let run = one(launcher, tls, plan, bounds, payload, false).await?;
            progress(&run_line(&run));
            runs.push(run);
        }
    }
    Ok(runs)
}

pub(crate) fn run_line(r: &MemoryRun) -> String {
    let cpu: Vec<String> = r
        .stages
        .iter()
        .map(|s| {
            format!(
                "{} {} msgs {:.0}/s {:.2} µs/msg{}",
                s.stage,
                s.messages,
                s.messages_per_s,
                s.server_cpu_us_per_message,
                if s.cut_short { " (cut short)" } else { "" }
            )
        })
        .collect();
    format!(
        "{}, payload {} B: {:.0} B/msg accounted, {:.0} B/msg RSS; history_bytes max {:.1} MiB (bound {:.1}), topics max {} (bound {}); RSS baseline {:.1} MiB, flood end {:.1}, quiet {:.1}, peak {:.1} MiB; bounds held: {}; {}",
        if r.history {
            "history memory"
        } else {
            "control without history"
        },
        r.payload,
        r.accounted_bytes_per_message,
        r.rss_bytes_per_message,
        r.max_history_bytes as f64 / 1048576.0,
        r.bounds.max_total_bytes as f64 / 1048576.0,
        r.max_history_topics,
        r.bounds.max_topics,
        r.baseline_rss_mib,
        r.flood_end_rss_mib,
        r.settled_rss_mib,
        r.peak_rss_mib,
        r.bounds_held,
        cpu.join("; ")
    )
}
