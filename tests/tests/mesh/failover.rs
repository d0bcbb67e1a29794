//! Losing the coordinator or a comm server.

use relaymesh_client::{Client, Event};
use relaymesh_tests::{
    Cluster, client_config, coordinator_config, eventually, next_message, within,
};

#[tokio::test]
async fn comm_servers_ride_out_a_coordinator_restart_and_reregister() {
    let mut cluster = Cluster::start_restartable(2).await;
    let mut a = cluster.client_on(0).await;
    a.subscribe(["ops/alerts"]).await.unwrap();
    let b = cluster.client_on(1).await;
    let links_before = peer_links(&cluster).await;

    cluster.coordinator.stop().await;
    for server in &cluster.servers {
        eventually("server notices the coordinator is gone", || async {
            (server.stats().await["coordinator_connected"] == false).then_some(())
        })
        .await;
    }
    // Relaying between existing clients, across servers, does not need the coordinator.
    b.publish("ops/alerts", "coordinator down").await.unwrap();
    assert_eq!(next_message(&mut a).await.payload, "coordinator down");
    // New clients cannot negotiate while it is away...
    let url = cluster.coordinator.url.clone();
    assert!(Client::connect(client_config(&url)).await.is_err());

    // ...and can again once it is back on the same address, with both servers re-registered
    // under the same ids and their peer link untouched.
    cluster.coordinator.start_again(coordinator_config()).await;
    let mut ids = eventually("both servers re-registered", || async {
        let ids = cluster.coordinator.server_ids().await;
        (ids.len() == 2).then_some(ids)
    })
    .await;
    ids.sort();
    let mut expected: Vec<String> = cluster.servers.iter().map(|s| s.id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    for server in &cluster.servers {
        // The coordinator lists a server a moment before the server has read `Registered`.
        eventually("server counts its re-registration", || async {
            (server.stat("registrations").await == 2).then_some(())
        })
        .await;
        assert_eq!(server.stat("peers").await, 1);
    }
    let c = Client::connect(client_config(&url)).await.unwrap();
    c.publish("ops/alerts", "coordinator back").await.unwrap();
    assert_eq!(next_message(&mut a).await.payload, "coordinator back");
    // Re-registration did not make the servers replace the peer link they already had.
    let mut probe = cluster.client_on(1).await;
    probe.subscribe(["ops/probe"]).await.unwrap();
    a.publish("ops/probe", "same link").await.unwrap();
    assert_eq!(next_message(&mut probe).await.payload, "same link");
    assert_eq!(peer_links(&cluster).await, links_before);
}

/// Each server's peer link ids.
async fn peer_links(cluster: &Cluster) -> Vec<Vec<u64>> {
    let mut all = Vec::new();
    for server in &cluster.servers {
        let stats = server.stats().await;
        all.push(
            stats["peer_links"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["link"].as_u64().unwrap())
                .collect(),
        );
    }
    all
}

#[tokio::test]
async fn clients_of_a_dead_server_move_to_another_and_resubscribe() {
    let mut cluster = Cluster::start(3).await;
    let mut mover = cluster.client_on(0).await;
    mover
        .subscribe(["fleet/status", "fleet/cmd"])
        .await
        .unwrap();
    let mut talker = cluster.client_on(2).await;
    talker.subscribe(["fleet/log"]).await.unwrap();
    let dead = cluster.servers.remove(0);
    let dead_id = dead.id.clone();
    dead.stop().await;

    let Event::Disconnected { server_id, reason } =
        within("disconnect", mover.next_event()).await.unwrap()
    else {
        panic!("expected Disconnected")
    };
    assert_eq!(server_id, dead_id);
    assert!(reason.contains("SHUTTING_DOWN"), "{reason}");
    // Published between connections: waits in the outbound queue for the next one.
    mover.publish("fleet/log", "sent while away").await.unwrap();
    let Event::Reconnected { server_id, .. } =
        within("reconnect", mover.next_event()).await.unwrap()
    else {
        panic!("expected Reconnected")
    };
    assert_ne!(server_id, dead_id);
    assert_eq!(mover.server_id(), server_id);
    assert_eq!(mover.handle().topics(), ["fleet/cmd", "fleet/status"]);
    let m = next_message(&mut talker).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("fleet/log", &b"sent while away"[..])
    );
    // Resubscribed: messages from another server reach it on its new server.
    talker.publish("fleet/cmd", "return to base").await.unwrap();
    let m = next_message(&mut mover).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("fleet/cmd", &b"return to base"[..])
    );
    // The survivors dropped their links to the dead server and the coordinator forgot it.
    for server in &cluster.servers {
        eventually("link to the dead server dropped", || async {
            (server.stat("peers").await == 1).then_some(())
        })
        .await;
    }
    eventually("coordinator forgot the dead server", || async {
        (!cluster.coordinator.server_ids().await.contains(&dead_id)).then_some(())
    })
    .await;
}

/// A reconnecting client avoids the server it just lost even when that server is still
/// registered, eligible, and the client's preferred one.
#[tokio::test]
async fn a_reconnecting_client_excludes_the_server_it_lost() {
    let cluster = Cluster::start_with(2, |c| {
        c.client_queue = 16;
        c.slow_consumer_ms = 200;
    })
    .await;
    let (kicked_from, other) = (cluster.servers[0].id.clone(), cluster.servers[1].id.clone());
    let mut config = client_config(&cluster.coordinator.url);
    config.preferred_server = Some(kicked_from.clone());
    config.event_queue = 1; // stop reading so the server cuts the client off as slow
    let mut client = Client::connect(config).await.unwrap();
    client.subscribe(["flood"]).await.unwrap();
    let flooder_client = cluster.client_on(0).await;
    let flooder = flooder_client.handle();
    let flooding = tokio::spawn(async move {
        while flooder.publish("flood", vec![0u8; 32 * 1024]).await.is_ok() {
            tokio::task::yield_now().await;
        }
    });
    eventually("client cut off as a slow consumer", || async {
        (cluster.servers[0].stat("slow_consumers").await == 1).then_some(())
    })
    .await;
    flooding.abort();
    let reconnected_to = within("reconnect", async {
        let mut lost = None;
        loop {
            match client.next_event().await.expect("client closed") {
                Event::Disconnected { server_id, .. } => lost = Some(server_id),
                Event::Reconnected { server_id, .. } => break (lost, server_id),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(reconnected_to, (Some(kicked_from.clone()), other.clone()));
    assert!(
        cluster
            .coordinator
            .server_ids()
            .await
            .contains(&kicked_from),
        "the lost server is still registered"
    );
    // Resubscribed on the new server.
    let talker = cluster.client_on(0).await;
    talker.publish("flood", "after the move").await.unwrap();
    loop {
        if next_message(&mut client).await.payload == "after the move" {
            break;
        }
    }
}
