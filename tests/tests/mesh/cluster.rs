//! Registration, peer discovery, spread and cross-server delivery.

use relaymesh_client::Event;
use relaymesh_tests::{Cluster, within};

#[tokio::test]
async fn three_servers_form_a_full_mesh_and_relay_across_it() {
    let cluster = Cluster::start(3).await;
    let mut sub = cluster.client_on(0).await;
    sub.subscribe(["rooms/lobby"]).await.unwrap();
    let publisher = cluster.client_on(2).await;
    publisher.publish("rooms/lobby", "hello").await.unwrap();
    let event = within("message", sub.next_event()).await.unwrap();
    let Event::Message(m) = event else {
        panic!("{event:?}")
    };
    assert_eq!(
        (m.topic.as_str(), m.from.as_str(), &m.payload[..]),
        ("rooms/lobby", publisher.alias().as_str(), &b"hello"[..])
    );
}
