//! A reconnect storm at a size CI affords: 2 000 clients of one comm server process (of three)
//! lose it to SIGKILL at once and come back through the coordinator on the other two, with
//! their client library's defaults (backoff, jitter, the lost server excluded), while a
//! publisher on a surviving server goes on publishing. (Its speed is a benchmark: `bench
//! --scenarios storm`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use relaymesh_client::{Client, ClientConfig, Event};
use relaymesh_tests::process::Proc;
use relaymesh_tests::{eventually, get_json, restartable_addr, within};
use tokio_util::sync::CancellationToken;

use super::processes::commservers;

/// Clients on the server that dies.
const CLIENTS: usize = 2_000;
/// Topics they share (client `i` subscribes to `storm/{i % TOPICS}`).
const TOPICS: usize = 50;
/// No round of the publisher's seen yet.
const NONE: u64 = u64::MAX;

/// What one client saw, read by the test while the client's task runs.
struct Seen {
    /// The last round received (`NONE` before the first).
    last_round: AtomicU64,
    /// Times it was told its connection was lost, and that it was back.
    disconnected: AtomicUsize,
    reconnected: AtomicUsize,
}

/// Everything the clients saw.
struct Tally {
    clients: Vec<Seen>,
    /// Rounds received again, or before one already received (never expected).
    repeated: AtomicU64,
    /// Clients whose event stream ended before the test closed them (a client giving up).
    ended: AtomicUsize,
}

/// A client of the storm: subscribed to its topic, counting what it receives until `stop`.
async fn storm_client(
    i: usize,
    mut client: Client,
    tally: Arc<Tally>,
    stop: CancellationToken,
) -> Client {
    let seen = &tally.clients[i];
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return client,
            event = client.next_event() => event,
        };
        match event {
            None => {
                tally.ended.fetch_add(1, Ordering::Relaxed);
                return client;
            }
            Some(Event::Message(m)) => {
                let round: u64 = std::str::from_utf8(&m.payload)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .expect("a round number");
                let last = seen.last_round.swap(round, Ordering::Relaxed);
                if last != NONE && round <= last {
                    tally.repeated.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(Event::Disconnected { .. }) => {
                seen.disconnected.fetch_add(1, Ordering::Relaxed);
            }
            Some(Event::Reconnected { .. }) => {
                seen.reconnected.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_of_a_killed_server_comes_back_resubscribed_and_nothing_comes_twice() {
    let addr = restartable_addr();
    let url = format!("ws://{addr}");
    let mut coordinator = Proc::start("coordinator", &["--listen", &addr.to_string()]);
    assert_eq!(coordinator.listening_addr(), addr);
    let mut servers = commservers(&url, 3);
    let (victim, survivors) = servers.split_first_mut().unwrap();

    // The clients, every one on the victim (asked for by id), with the library's defaults.
    let tally = Arc::new(Tally {
        clients: (0..CLIENTS)
            .map(|_| Seen {
                last_round: AtomicU64::new(NONE),
                disconnected: AtomicUsize::new(0),
                reconnected: AtomicUsize::new(0),
            })
            .collect(),
        repeated: AtomicU64::new(0),
        ended: AtomicUsize::new(0),
    });
    let stop = CancellationToken::new();
    let started = std::time::Instant::now();
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let config = ClientConfig {
            preferred_server: Some(victim.id.clone()),
            ..ClientConfig::new(url.clone())
        };
        connecting.spawn(async move {
            let client = Client::connect(config).await.expect("a client connects");
            client
                .subscribe([format!("storm/{}", i % TOPICS)])
                .await
                .expect("a client subscribes");
            (i, client)
        });
    }
    let mut running = tokio::task::JoinSet::new();
    within("every client connected and subscribed", async {
        while let Some(done) = connecting.join_next().await {
            let (i, client) = done.unwrap();
            assert_eq!(client.server_id(), victim.id, "client {i} placed elsewhere");
            running.spawn(storm_client(i, client, tally.clone(), stop.clone()));
        }
    })
    .await;
    eprintln!(
        "storm: {CLIENTS} clients connected and subscribed in {:?}",
        started.elapsed()
    );

    // A publisher on a surviving server: a numbered round on every topic every 100 ms.
    let publisher = Client::connect(ClientConfig {
        preferred_server: Some(survivors[0].id.clone()),
        ..ClientConfig::new(url.clone())
    })
    .await
    .unwrap();
    let round = Arc::new(AtomicU64::new(0));
    let publishing = tokio::spawn({
        let round = round.clone();
        let stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return publisher,
                    _ = tick.tick() => {}
                }
                let r = round.fetch_add(1, Ordering::Relaxed);
                for t in 0..TOPICS {
                    publisher
                        .publish(&format!("storm/{t}"), r.to_string())
                        .await
                        .unwrap();
                }
            }
        }
    });
    eventually("every client has a round before the kill", || async {
        let waiting = tally
            .clients
            .iter()
            .filter(|s| s.last_round.load(Ordering::Relaxed) == NONE)
            .count();
        (waiting == 0).then_some(())
    })
    .await;

    victim.proc.kill();
    let killed = std::time::Instant::now();

    // Every client told once that it lost the victim, and once that it is back (on a
    // survivor, with its subscription restored: `Reconnected` comes after that).
    eventually("every client reconnected", || async {
        let back = tally
            .clients
            .iter()
            .filter(|s| s.reconnected.load(Ordering::Relaxed) >= 1)
            .count();
        (back == CLIENTS).then_some(())
    })
    .await;
    eprintln!(
        "storm: every client back {:?} after the kill",
        killed.elapsed()
    );
    // Then each receives a round published after the last came back.
    let after = round.load(Ordering::Relaxed);
    eventually("every client receives rounds again", || async {
        let behind = tally
            .clients
            .iter()
            .filter(|s| {
                let last = s.last_round.load(Ordering::Relaxed);
                last == NONE || last <= after
            })
            .count();
        (behind == 0).then_some(())
    })
    .await;

    eprintln!(
        "storm: every client receiving again {:?} after the kill",
        killed.elapsed()
    );
    // The survivors hold every client (and the publisher), split between them.
    let mut held = Vec::new();
    for server in survivors.iter() {
        held.push(
            get_json(&server.stats_url()).await["clients"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(
        held.iter().sum::<u64>(),
        CLIENTS as u64 + 1,
        "clients held: {held:?}"
    );
    assert!(held.iter().all(|&n| n > 0), "clients held: {held:?}");
    // They logged in again through the survivors (the victim's `Ready` had listed them), the
    // coordinator choosing as ever, or over HTTP when a survivor had too many logins in
    // flight.
    let logins = get_json(&format!("http://{addr}/v1/stats")).await;
    let relayed = logins["logins_relayed"].as_u64().unwrap();
    eprintln!("storm: {relayed} of the {CLIENTS} logins relayed by a survivor");
    // Every one but those that fell back (none in a quiet run).
    assert!(relayed >= CLIENTS as u64 * 9 / 10, "{logins}");

    stop.cancel();
    let publisher = publishing.await.unwrap();
    publisher.close().await;
    let mut clients = Vec::new();
    while let Some(client) = running.join_next().await {
        clients.push(client.unwrap());
    }
    // Closed together: each close waits for its server's answer.
    futures_util::future::join_all(clients.into_iter().map(Client::close)).await;
    for (i, seen) in tally.clients.iter().enumerate() {
        assert_eq!(seen.disconnected.load(Ordering::Relaxed), 1, "client {i}");
        assert_eq!(seen.reconnected.load(Ordering::Relaxed), 1, "client {i}");
    }
    assert_eq!(tally.ended.load(Ordering::Relaxed), 0, "clients gave up");
    assert_eq!(
        tally.repeated.load(Ordering::Relaxed),
        0,
        "rounds received twice"
    );
    for server in servers.iter_mut() {
        server.proc.kill();
    }
    coordinator.kill();
}
