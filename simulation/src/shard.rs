//! Coordination between the generator processes of a sharded run (`--shard i/n`), over the mesh
//! itself: every process connects one extra control client subscribed to
//! `{prefix}/control` and exchanges small JSON notes there.
//!
//! - **ready**: a process has subscribed all of its subscribers. Publishing starts once all `n`
//!   are ready, so no publisher runs ahead of a subscriber in another process. The note carries
//!   `n` and a fingerprint of the flags that shape the workload, and a mismatch stops the run:
//!   processes that disagree on the workload would count each other's clients wrongly.
//! - **sent**: after publishing, each process's per-publisher counts, from which every process
//!   works out what its own subscribers should have received, and when its publishers lost
//!   their servers (to put its subscribers' loss down to a cause).
//! - **part** / **got**: each process's measurements for shard 0 (the leader), which confirms
//!   each one and merges them into one report.
//!
//! The control topic crosses the same servers as the load and can lose a note under overload,
//! so every note is repeated until what it is waiting for has arrived.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use relaymesh_client::{Client, ClientConfig, Event};
use serde::{Deserialize, Serialize};

use crate::load::Part;
use crate::workload::Shard;

/// Per publisher: its count, or the time of an outage.
type Pairs = Vec<(u32, u64)>;

/// How often a note is repeated while its answer has not arrived.
const REPEAT: Duration = Duration::from_millis(500);
/// Largest note sent; a result part bigger than this goes without its timeline (the servers'
/// default payload limit is about 1 MiB).
const MAX_NOTE_BYTES: usize = 512 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Note {
    Ready {
        shard: usize,
        count: usize,
        workload: String,
    },
    Sent {
        shard: usize,
        counts: Vec<(u32, u64)>,
        /// (publisher, ns) of each time one of this process's publishers lost its server.
        #[serde(default)]
        outages: Vec<(u32, u64)>,
    },
    Part {
        shard: usize,
        part: Box<Part>,
    },
    Got {
        shard: usize,
    },
}

/// This process's end of the control channel.
pub(crate) struct Control {
    client: Client,
    topic: String,
    shard: Shard,
    /// Fingerprint of the workload flags; every process must have the same.
    workload: String,
    /// How long to wait for the other processes at each step.
    patience: Duration,
    ready: BTreeSet<usize>,
    /// Per process: its publishers' counts and outages.
    sent: BTreeMap<usize, (Pairs, Pairs)>,
    parts: BTreeMap<usize, Part>,
    got: bool,
}

impl Control {
    pub(crate) async fn connect(
        coordinator: &str,
        prefix: &str,
        shard: Shard,
        workload: String,
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
            workload,
            patience,
            ready: BTreeSet::from([shard.index]),
            sent: BTreeMap::new(),
            parts: BTreeMap::new(),
            got: false,
        })
    }

    async fn send(&self, note: &Note) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(note)?;
        anyhow::ensure!(
            bytes.len() <= MAX_NOTE_BYTES,
            "a control note of {} bytes is too large",
            bytes.len()
        );
        self.client
            .publish(&self.topic, bytes)
            .await
            .context("publishing on the control topic")
    }

    /// Handles one control note, or returns after `wait` without one.
    async fn receive(&mut self, wait: Duration) -> anyhow::Result<()> {
        let event = match tokio::time::timeout(wait, self.client.next_event()).await {
            Ok(event) => event.context("control client closed")?,
            Err(_) => return Ok(()),
        };
        let Event::Message(m) = event else {
            return Ok(());
        };
        let note = serde_json::from_slice::<Note>(&m.payload).with_context(|| {
            format!(
                "unreadable note on {} (another run with the same --run-id?)",
                self.topic
            )
        })?;
        match note {
            Note::Ready {
                shard,
                count,
                workload,
            } => {
                if count != self.shard.count || workload != self.workload {
                    // Tell the other process too: it is subscribed, since its note came, but
                    // may have missed ours.
                    let _ = self.send(&self.ready_note()).await;
                    // This process is about to exit: make sure the note has left.
                    let _ = self.client.flush().await;
                }
                anyhow::ensure!(
                    count == self.shard.count && workload == self.workload,
                    "shard {shard}/{count} runs a different workload ({workload}) from this one \
                     ({}/{}: {}); give every shard the same flags",
                    self.shard.index,
                    self.shard.count,
                    self.workload
                );
                self.ready.insert(shard);
            }
            Note::Sent {
                shard,
                counts,
                outages,
            } if shard < self.shard.count => {
                self.sent.insert(shard, (counts, outages));
            }
            Note::Part { shard, part } if self.shard.is_leader() && shard < self.shard.count => {
                self.parts.insert(shard, *part);
                // Confirm every copy: an earlier confirmation may have been lost.
                self.send(&Note::Got { shard }).await?;
            }
            Note::Got { shard } if shard == self.shard.index => self.got = true,
            _ => {}
        }
        Ok(())
    }

    /// Repeats `note` (if any) every [`REPEAT`] and handles incoming notes until `done` holds; fails
    /// after the patience runs out, naming `what` was awaited.
    async fn until(
        &mut self,
        note: Option<&Note>,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut repeat = tokio::time::Instant::now();
        while !done(self) {
            let now = tokio::time::Instant::now();
            anyhow::ensure!(
                now < deadline,
                "gave up after {} s waiting for {what} from the other generator processes \
                 (are all {} running, with the same --run-id and flags?)",
                self.patience.as_secs(),
                self.shard.count
            );
            if now >= repeat {
                if let Some(note) = note {
                    self.send(note).await?;
                }
                repeat = now + REPEAT;
            }
            self.receive(repeat.min(deadline) - now).await?;
        }
        Ok(())
    }

    fn ready_note(&self) -> Note {
        Note::Ready {
            shard: self.shard.index,
            count: self.shard.count,
            workload: self.workload.clone(),
        }
    }

    /// Waits until every process has subscribed all its subscribers.
    pub(crate) async fn barrier(&mut self) -> anyhow::Result<()> {
        let me = self.ready_note();
        let count = self.shard.count;
        self.until(Some(&me), "readiness", |c| c.ready.len() >= count)
            .await?;
        // Everyone's `ready` was sent after they subscribed to the control topic, so this last
        // one reaches a process whose subscription came after our earlier ones.
        self.send(&me).await
    }

    /// Shares this process's per-publisher counts and outages (publisher, ns); returns
    /// everyone's counts and the other processes' outages.
    pub(crate) async fn exchange_counts(
        &mut self,
        mine: Vec<(u32, u64)>,
        outages: Vec<(u32, u64)>,
    ) -> anyhow::Result<(Pairs, Pairs)> {
        self.sent
            .insert(self.shard.index, (mine.clone(), outages.clone()));
        let me = Note::Sent {
            shard: self.shard.index,
            counts: mine,
            outages,
        };
        let count = self.shard.count;
        self.until(Some(&me), "publish counts", |c| c.sent.len() >= count)
            .await?;
        self.send(&me).await?;
        let counts = self.sent.values().flat_map(|(c, _)| c).copied().collect();
        let others = self
            .sent
            .iter()
            .filter(|&(&shard, _)| shard != self.shard.index)
            .flat_map(|(_, (_, o))| o)
            .copied()
            .collect();
        Ok((counts, others))
    }

    /// Sends this process's part until the leader confirms it; the leader collects the others'
    /// and returns them.
    pub(crate) async fn gather(&mut self, mut mine: Part) -> anyhow::Result<Vec<Part>> {
        if self.shard.is_leader() {
            let count = self.shard.count;
            self.until(None, "results", |c| c.parts.len() + 1 >= count)
                .await?;
            return Ok(std::mem::take(&mut self.parts).into_values().collect());
        }
        if serde_json::to_vec(&mine).map_or(0, |b| b.len()) > MAX_NOTE_BYTES {
            // The leader still gets every count and the latency histogram.
            mine.timeline.clear();
        }
        let me = Note::Part {
            shard: self.shard.index,
            part: Box::new(mine),
        };
        self.until(Some(&me), "the leader's confirmation", |c| c.got)
            .await?;
        Ok(Vec::new())
    }

    pub(crate) async fn close(self) {
        self.client.close().await;
    }
}
