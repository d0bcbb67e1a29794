//! `bench --client-fanout URL`: what receiving costs a process of relaymesh's Rust client, for
//! the comparison with the TypeScript client and nats.js under Node.js
//! (`clients/typescript/bench/fanout.ts` runs this and a publisher the same way): `--fanout-
//! subscribers` clients in this process (a current-thread runtime) on one topic; after "ready"
//! on stdout, `--warmup` seconds, then this process's CPU over `--measure` seconds against the
//! messages its clients received in it. Prints one JSON line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relaymesh_client::{Client, ClientConfig, Event};
use serde_json::{Value, json};

/// What one run measures.
pub(crate) struct Plan {
    pub(crate) coordinator: String,
    pub(crate) subscribers: usize,
    pub(crate) topic: String,
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
}

pub(crate) async fn run(plan: Plan) -> anyhow::Result<Value> {
    let counting = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..plan.subscribers {
        let mut config = ClientConfig::new(plan.coordinator.clone());
        config.auto_reconnect = false;
        config.event_queue = 8192;
        let mut client = Client::connect(config)
            .await
            .context("a subscriber connects")?;
        client.subscribe([plan.topic.as_str()]).await?;
        let (counting, delivered) = (counting.clone(), delivered.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(event) = client.next_event().await {
                if matches!(event, Event::Message(_)) && counting.load(Ordering::Relaxed) {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    println!("ready");
    tokio::time::sleep(plan.warmup).await;
    let cpu0 = own_cpu()?;
    let t0 = Instant::now();
    counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(plan.measure).await;
    counting.store(false, Ordering::Relaxed);
    let cpu = own_cpu()? - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    for task in tasks {
        task.abort();
    }
    let delivered = delivered.load(Ordering::Relaxed);
    Ok(json!({
        "system": "relaymesh",
        "client": "relaymesh-client (Rust)",
        "subscribers": plan.subscribers,
        "seconds": (wall * 1000.0).round() / 1000.0,
        "delivered": delivered,
        "cpu_s": (cpu * 1000.0).round() / 1000.0,
        "delivered_per_cpu_s": (delivered as f64 / cpu).round(),
        "cpu_percent": (1000.0 * cpu / wall).round() / 10.0,
    }))
}

fn own_cpu() -> anyhow::Result<f64> {
    relaymesh_net::procstat::process()
        .map(|u| u.cpu_seconds)
        .context("this process's CPU from /proc")
}
