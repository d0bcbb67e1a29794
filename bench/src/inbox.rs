//! `bench --inbox`: what the durable inbox's group commit buys, on the databases it runs on.
//!
//! The coordinator's inbox writer commits everything that queued up while its last
//! transaction ran in one transaction. Here the same store calls
//! (`SqlStore::inbox_commit`) store messages one transaction each, then in batches of
//! `--inbox-batch`, alternating A/B/A/B in one run, and the rates and their ratio are
//! reported; then a 10 000-message inbox is read back in pages of 256 (the database's part of a login's inbox delivery).
//! SQLite runs with its defaults, a rollback journal and `synchronous=FULL` (every commit
//! waits for the disk), as the coordinator does.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use coordinator::accounts::Account;
use coordinator::inbox::InboxLimits;
use coordinator::nodes::Node;
use coordinator::sql::SqlStore;
use relaymesh_proto::v1;
use serde::Serialize;

/// Figures for one database.
#[derive(Debug, Serialize)]
pub(crate) struct InboxFigures {
    pub(crate) database: String,
    /// Messages stored per second, one transaction each (best of the rounds).
    pub(crate) one_per_transaction_per_s: f64,
    /// Messages stored per second in batches of `batch` (best of the rounds).
    pub(crate) group_commit_per_s: f64,
    pub(crate) batch: usize,
    pub(crate) ratio: f64,
    /// Reading a 10 000-message inbox in pages of 256, milliseconds.
    pub(crate) read_10k_ms: f64,
}

const PAGE: u32 = 256;
const NODES: usize = 100;

/// Runs the A/B on the database at `url` (`label` names it in the report).
pub(crate) async fn run(
    label: &str,
    url: &str,
    batch: usize,
    single: usize,
    grouped: usize,
) -> anyhow::Result<InboxFigures> {
    let db = SqlStore::connect(url)
        .await
        .with_context(|| format!("connecting to {label}"))?;
    let account = Account {
        name: "inbox-bench".into(),
        enabled: true,
        isolate_groups: false,
        access_codes: Vec::new(),
        public_keys: Vec::new(),
        roles: Default::default(),
        nodes: Vec::new(),
    };
    db.put(&account).await?;
    let nodes: Vec<String> = (0..NODES)
        .map(|i| {
            format!(
                "{:032x}",
                0xbe00_0000_u64 + i as u64 + u64::from(rand::random::<u16>()) * 1_000
            )
        })
        .collect();
    for id in &nodes {
        let mut node = Node::unstored(id.clone());
        node.scope = account.name.clone();
        // A node left from an earlier run is fine.
        let _ = db.insert_node(&account.name, &node).await;
    }
    let limits = InboxLimits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
    };
    let put = |i: usize| v1::InboxPut {
        scope: account.name.clone(),
        to_node: nodes[i % NODES].clone(),
        from_alias: "bench-1".into(),
        seq: i as u64 + 1,
        payload: vec![7u8; 128].into(),
        ..Default::default()
    };
    let store = |db: &SqlStore, puts: Vec<v1::InboxPut>, size: usize| {
        let db = db.clone();
        async move {
            let started = Instant::now();
            for chunk in puts.chunks(size) {
                let rows: Vec<&v1::InboxPut> = chunk.iter().collect();
                let outcomes = db.inbox_commit(&[], &rows, limits, 0).await?;
                anyhow::ensure!(outcomes.iter().all(Result::is_ok), "a message was refused");
            }
            Ok::<f64, anyhow::Error>(puts.len() as f64 / started.elapsed().as_secs_f64())
        }
    };
    let (mut one, mut grouped_rate) = (0f64, 0f64);
    for round in 0..2 {
        let a: Vec<_> = (0..single).map(put).collect();
        let a = store(&db, a, 1).await?;
        let b: Vec<_> = (0..grouped).map(put).collect();
        let b = store(&db, b, batch).await?;
        eprintln!(
            "bench: inbox {label} round {}: {a:.0}/s one per transaction, {b:.0}/s in batches of {batch}",
            round + 1
        );
        one = one.max(a);
        grouped_rate = grouped_rate.max(b);
    }
    // Empty the bench's inboxes, then one node gets 10 000 messages to read back.
    let done: Vec<(String, u64)> = nodes.iter().map(|n| (n.clone(), u64::MAX >> 1)).collect();
    db.inbox_commit(&done, &[], limits, 0).await?;
    let full: Vec<v1::InboxPut> = (0..10_000)
        .map(|i| {
            let mut p = put(i);
            p.to_node = nodes[0].clone();
            p
        })
        .collect();
    store(&db, full, batch).await?;
    let started = Instant::now();
    let (mut after, mut read) = (0, 0);
    loop {
        let page = db.inbox_fetch(&nodes[0], after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        read += page.len();
    }
    let read_10k = started.elapsed();
    anyhow::ensure!(read == 10_000, "read {read} of 10000");
    db.inbox_commit(&done, &[], limits, 0).await?;
    db.close().await;
    Ok(InboxFigures {
        database: label.to_owned(),
        one_per_transaction_per_s: one,
        group_commit_per_s: grouped_rate,
        batch,
        ratio: grouped_rate / one.max(f64::MIN_POSITIVE),
        read_10k_ms: read_10k.as_secs_f64() * 1e3,
    })
}

/// The report's table.
pub(crate) fn markdown(figures: &[InboxFigures]) -> String {
    let mut out = String::from(
        "| database | one transaction per message | group commit | ratio | read a 10 000-message inbox |\n|---|---|---|---|---|\n",
    );
    for f in figures {
        out += &format!(
            "| {} | {:.0}/s | {:.0}/s (batches of {}) | {:.1}× | {:.0} ms |\n",
            f.database,
            f.one_per_transaction_per_s,
            f.group_commit_per_s,
            f.batch,
            f.ratio,
            f.read_10k_ms
        );
    }
    out
}

/// A fresh SQLite file for the bench.
pub(crate) fn sqlite_url(dir: &std::path::Path) -> String {
    let _ = std::fs::create_dir_all(dir);
    let path = dir.join(format!("inbox-bench-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    format!("sqlite://{}", path.display())
}

/// Time for the whole inbox bench to be noticed as stuck.
pub(crate) const PATIENCE: Duration = Duration::from_secs(600);
