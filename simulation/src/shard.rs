//! Coordination between the generator processes of a sharded run (`--shard i/n`), over the mesh
//! itself: every process connects one extra control client subscribed to
//! `{prefix}/control` and exchanges small JSON messages there.
//!
//! - **ready**: a process has subscribed all of its subscribers. Publishing starts once all `n`
//!   are ready, so no publisher runs ahead of a subscriber in another process.
//! - **sent**: after publishing, each process's per-publisher counts, from which every process
//!   works out what its own subscribers should have received.
//! - **part**: each process's measurements; shard 0 (the leader) merges them into one report.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use relaymesh_client::{Client, ClientConfig, Event};
use serde::{Deserialize, Serialize};

use crate::load::Part;
use crate::workload::Shard;

/// How often a process repeats `ready` until it has heard from everyone.
const READY_REPEAT: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Note {
    Ready {
        shard: usize,
    },
    Sent {
        shard: usize,
        counts: Vec<(u32, u64)>,
    },
    Part {
        shard: usize,
        part: Box<Part>,
    },
}

/// This process's end of the control channel.
pub(crate) struct Control {
    client: Client,
    topic: String,
    shard: Shard,
    /// How long to wait for the other processes at each step.
    patience: Duration,
    ready: BTreeSet<usize>,
    sent: BTreeMap<usize, Vec<(u32, u64)>>,
    parts: BTreeMap<usize, Part>,
}

impl Control {
    pub(crate) async fn connect(
        coordinator: &str,
        prefix: &str,
        shard: Shard,
        patience: Duration,
    ) -> anyhow::Result<Self> {
        let client = Client::connect(ClientConfig::new(coordinator))
            .await
            .context("connecting the control client")?;
        let topic = format!("{prefix}/control");
        client.subscribe([topic.clone()]).await?;
        Ok(Self {
            client,
            topic,
            shard,
            patience,
            ready: BTreeSet::new(),
            sent: BTreeMap::new(),
            parts: BTreeMap::new(),
        })
    }

    async fn send(&self, note: &Note) -> anyhow::Result<()> {
        self.client
            .publish(&self.topic, serde_json::to_vec(note)?)
            .await
            .context("publishing on the control topic")
    }

    /// Reads one control message (or times out after `wait`); returns false on timeout.
    async fn receive(&mut self, wait: Duration) -> anyhow::Result<bool> {
        let event = match tokio::time::timeout(wait, self.client.next_event()).await {
            Ok(event) => event.context("control client closed")?,
            Err(_) => return Ok(false),
        };
        if let Event::Message(m) = event {
            match serde_json::from_slice::<Note>(&m.payload) {
                Ok(Note::Ready { shard }) => {
                    self.ready.insert(shard);
                }
                Ok(Note::Sent { shard, counts }) => {
                    self.sent.insert(shard, counts);
                }
                Ok(Note::Part { shard, part }) => {
                    self.parts.insert(shard, *part);
                }
                Err(e) => anyhow::bail!(
                    "unreadable message on {} (another run with the same --run-id?): {e}",
                    self.topic
                ),
            }
        }
        Ok(true)
    }

    fn waited_too_long(&self, what: &str, have: usize) -> anyhow::Error {
        anyhow::anyhow!(
            "gave up after {} s waiting for {what}: heard from {have} of {} generator processes \
             (same --run-id, --scenario and --clients on all of them?)",
            self.patience.as_secs(),
            self.shard.count
        )
    }

    /// Waits until every process has subscribed all its subscribers.
    pub(crate) async fn barrier(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.patience;
        let me = Note::Ready {
            shard: self.shard.index,
        };
        self.send(&me).await?;
        let mut repeat = tokio::time::Instant::now() + READY_REPEAT;
        while self.ready.len() < self.shard.count {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.waited_too_long("readiness", self.ready.len()));
            }
            if now >= repeat {
                self.send(&me).await?;
                repeat = now + READY_REPEAT;
            }
            self.receive(repeat.min(deadline) - now).await?;
        }
        // Everyone's `ready` arrived after they subscribed to the control topic, so this last
        // one reaches a process that subscribed after our earlier ones.
        self.send(&me).await
    }

    /// Shares this process's per-publisher counts and returns everyone's.
    pub(crate) async fn exchange_counts(
        &mut self,
        mine: Vec<(u32, u64)>,
    ) -> anyhow::Result<Vec<(u32, u64)>> {
        self.send(&Note::Sent {
            shard: self.shard.index,
            counts: mine,
        })
        .await?;
        let deadline = tokio::time::Instant::now() + self.patience;
        while self.sent.len() < self.shard.count {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.waited_too_long("publish counts", self.sent.len()));
            }
            self.receive(deadline - now).await?;
        }
        Ok(self.sent.values().flatten().copied().collect())
    }

    /// Sends this process's part; the leader collects the others' and returns them.
    pub(crate) async fn gather(&mut self, mine: Part) -> anyhow::Result<Vec<Part>> {
        if !self.shard.is_leader() {
            self.send(&Note::Part {
                shard: self.shard.index,
                part: Box::new(mine),
            })
            .await?;
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + self.patience;
        while self.parts.len() + 1 < self.shard.count {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.waited_too_long("results", self.parts.len() + 1));
            }
            self.receive(deadline - now).await?;
        }
        Ok(std::mem::take(&mut self.parts).into_values().collect())
    }

    pub(crate) async fn close(self) {
        self.client.close().await;
    }
}
