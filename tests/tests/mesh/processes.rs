//! The whole system as a user runs it: real `coordinator`, `commserver` and `meshctl`
//! processes, killed with SIGKILL and stopped with SIGTERM.

use relaymesh_client::{Client, Event};
use relaymesh_tests::process::{Proc, run};
use relaymesh_tests::{client_config, eventually, get_json, next_message, within};

fn start_coordinator(listen: &str) -> (Proc, std::net::SocketAddr) {
    let mut coordinator = Proc::start("coordinator", &["--listen", listen]);
    let addr = coordinator.listening_addr();
    (coordinator, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_real_processes_survives_kills_and_stops_cleanly() {
    let (mut coordinator, addr) = start_coordinator("127.0.0.1:0");
    let url = format!("ws://{addr}");
    let mut servers: Vec<(Proc, String)> = (0..3)
        .map(|_| {
            let mut server = Proc::start(
                "commserver",
                &["--coordinator", &url, "--listen", "127.0.0.1:0"],
            );
            let id = server.listening_addr().to_string();
            server.wait_for_line("registered with the coordinator");
            (server, id)
        })
        .collect();
    let stats_url = format!("http://{addr}/v1/stats");
    eventually("three servers registered", || async {
        (get_json(&stats_url).await["servers"]
            .as_array()
            .unwrap()
            .len()
            == 3)
            .then_some(())
    })
    .await;
    for (_, id) in &servers {
        eventually("full mesh", || async {
            (get_json(&format!("http://{id}/v1/stats")).await["peers"] == 2).then_some(())
        })
        .await;
    }

    // meshctl: list servers, subscribe in one process, publish from another.
    let (ok, out, err) = run("meshctl", &["servers", "--coordinator", &url]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    for (_, id) in &servers {
        assert!(out.contains(id.as_str()), "{id} missing from\n{out}");
    }
    let mut sub = Proc::start(
        "meshctl",
        &["sub", "--coordinator", &url, "room/1", "room/2"],
    );
    sub.wait_for_line("subscribed to room/1 room/2");
    let (ok, _, err) = run(
        "meshctl",
        &["pub", "--coordinator", &url, "room/2", "hello from meshctl"],
    );
    assert!(ok, "{err}");
    let line = sub.next_stdout_line();
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        (fields.len(), fields[0], fields[2]),
        (3, "room/2", "hello from meshctl"),
        "{line}"
    );
    let (ok, _, err) = run("meshctl", &["pub", "--coordinator", &url, "bad topic", "x"]);
    assert!(
        !ok && err.lines().count() == 1 && err.contains("invalid topic \"bad topic\""),
        "{err}"
    );

    // Library clients on two different servers.
    let mut config = client_config(&url);
    config.preferred_server = Some(servers[0].1.clone());
    let mut a = Client::connect(config).await.unwrap();
    a.subscribe(["fleet/1"]).await.unwrap();
    let mut config = client_config(&url);
    config.preferred_server = Some(servers[1].1.clone());
    let b = Client::connect(config).await.unwrap();

    // SIGKILL the coordinator: relaying goes on; a new coordinator on the same address gets
    // every server back under the same id.
    coordinator.kill();
    b.publish("fleet/1", "no coordinator").await.unwrap();
    assert_eq!(next_message(&mut a).await.payload, "no coordinator");
    let (mut coordinator, again) = start_coordinator(&addr.to_string());
    assert_eq!(again, addr);
    let mut ids = eventually("servers re-registered", || async {
        let stats = get_json(&stats_url).await;
        let ids: Vec<String> = stats["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        (ids.len() == 3).then_some(ids)
    })
    .await;
    ids.sort();
    let mut expected: Vec<String> = servers.iter().map(|(_, id)| id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let (ok, _, err) = run(
        "meshctl",
        &["pub", "--coordinator", &url, "room/1", "after restart"],
    );
    assert!(ok, "{err}");
    assert!(sub.next_stdout_line().ends_with("\tafter restart"));

    // SIGKILL the comm server `a` is on: it moves to another server and is resubscribed.
    let (mut dead, dead_id) = servers.remove(0);
    dead.kill();
    let event = within("disconnect", a.next_event()).await.unwrap();
    assert!(
        matches!(&event, Event::Disconnected { server_id, .. } if *server_id == dead_id),
        "{event:?}"
    );
    let event = within("reconnect", a.next_event()).await.unwrap();
    assert!(
        matches!(&event, Event::Reconnected { server_id, .. } if *server_id != dead_id),
        "{event:?}"
    );
    b.publish("fleet/1", "after failover").await.unwrap();
    assert_eq!(next_message(&mut a).await.payload, "after failover");
    for (_, id) in &servers {
        eventually("dead peer dropped", || async {
            (get_json(&format!("http://{id}/v1/stats")).await["peers"] == 1).then_some(())
        })
        .await;
    }

    // SIGTERM: everything shuts down cleanly.
    drop((a, b));
    drop(sub);
    for (server, _) in &mut servers {
        assert!(server.terminate(), "comm server did not exit cleanly");
        server.wait_for_line("comm server stopped");
    }
    assert!(coordinator.terminate(), "coordinator did not exit cleanly");
}
