//! Losing the coordinator or a comm server.

use relaymesh_client::{Client, Event};
use relaymesh_tests::{
    Cluster, client_config, coordinator_config, eventually, next_message, within,
};

#[tokio::test]
async fn comm_servers_ride_out_a_coordinator_restart_and_reregister() {
    let mut cluster = Cluster::start(2).await;
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
        assert_eq!(server.stat("registrations").await, 2);
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
    let talker = cluster.client_on(2).await;
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
    let Event::Reconnected { server_id, .. } =
        within("reconnect", mover.next_event()).await.unwrap()
    else {
        panic!("expected Reconnected")
    };
    assert_ne!(server_id, dead_id);
    assert_eq!(mover.server_id(), server_id);
    assert_eq!(mover.handle().topics(), ["fleet/cmd", "fleet/status"]);
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
