//! The operational endpoints of both binaries: `/healthz`, `/v1/stats`, `/metrics`.

use relaymesh_client::Event;
use relaymesh_tests::{Cluster, eventually, get_text, within};

#[tokio::test]
async fn health_stats_and_metrics_reflect_traffic() {
    let cluster = Cluster::start(2).await;
    let mut sub = cluster.client_on(1).await;
    sub.subscribe(["metrics/test"]).await.unwrap();
    let publisher = cluster.client_on(0).await;
    for _ in 0..3 {
        publisher.publish("metrics/test", "m").await.unwrap();
    }
    for _ in 0..3 {
        assert!(matches!(
            within("message", sub.next_event()).await,
            Some(Event::Message(_))
        ));
    }

    let coordinator = cluster.coordinator.addr;
    assert_eq!(
        get_text(&format!("http://{coordinator}/healthz")).await,
        (200, "ok\n".into())
    );
    let stats = cluster.coordinator.stats().await;
    assert_eq!(stats["logins"], 2);
    assert_eq!(stats["servers"].as_array().unwrap().len(), 2);
    let (status, metrics) = get_text(&format!("http://{coordinator}/metrics")).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE relaymesh_coordinator_logins_total counter\nrelaymesh_coordinator_logins_total 2\n"), "{metrics}");
    assert!(
        metrics.contains("relaymesh_coordinator_servers 2\n"),
        "{metrics}"
    );

    let (a, b) = (&cluster.servers[0], &cluster.servers[1]);
    for server in [a, b] {
        assert_eq!(
            get_text(&format!("http://{}/healthz", server.addr)).await,
            (200, "ok\n".into())
        );
        let stats = server.stats().await;
        for field in [
            "clients",
            "topics",
            "peers",
            "messages_in",
            "messages_out",
            "dropped",
        ] {
            assert!(stats[field].is_u64(), "{field} missing: {stats}");
        }
        assert_eq!(stats["clients"], 1);
        assert_eq!(stats["peers"], 1);
        assert_eq!(stats["coordinator_connected"], true);
    }
    assert_eq!(
        (
            a.stat("messages_in").await,
            a.stat("forwards_out").await,
            a.stat("messages_out").await
        ),
        (3, 3, 0)
    );
    assert_eq!(
        (
            b.stat("topics").await,
            b.stat("forwards_in").await,
            b.stat("messages_out").await
        ),
        (1, 3, 3)
    );
    let (status, metrics) = get_text(&format!("http://{}/metrics", b.addr)).await;
    assert_eq!(status, 200);
    for line in [
        "relaymesh_clients 1\n",
        "relaymesh_forwards_in_total 3\n",
        "relaymesh_messages_out_total 3\n",
        "relaymesh_peers 1\n",
    ] {
        assert!(metrics.contains(line), "{line:?} not in\n{metrics}");
    }
}

/// Unknown paths and wrong methods get a JSON error with a code of their own, on both binaries.
#[tokio::test]
async fn unknown_paths_and_methods_are_named_as_such() {
    let cluster = Cluster::start(1).await;
    for base in [cluster.coordinator.addr, cluster.servers[0].addr] {
        let (status, body) = get_text(&format!("http://{base}/no/such/path")).await;
        assert_eq!(status, 404, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], "NOT_FOUND");
        assert_eq!(body["message"], "no endpoint at /no/such/path");
        let (status, body) =
            relaymesh_tests::post_json(&format!("http://{base}/v1/stats"), &serde_json::json!({}))
                .await;
        assert_eq!((status, &body["code"]), (405, &"METHOD_NOT_ALLOWED".into()));
    }
}

/// The coordinator's view of a server's clients follows sessions as they come and go, not only
/// at the next heartbeat: here the heartbeat is a minute apart.
#[tokio::test]
async fn the_coordinator_sees_clients_as_they_attach_and_leave() {
    let config = coordinator::Config {
        heartbeat_interval_ms: 60_000,
        heartbeat_timeout_ms: 120_000,
        ..relaymesh_tests::coordinator_config()
    };
    let cluster = Cluster::start_configured(1, config).await;
    let clients = || async {
        let stats = cluster.coordinator.stats().await;
        let server = &stats["servers"][0];
        assert!(server["load_age_ms"].is_u64(), "{stats}");
        server["clients"].as_u64().unwrap()
    };
    let client = cluster.client_on(0).await;
    eventually("the coordinator counts the client", || async {
        (clients().await == 1).then_some(())
    })
    .await;
    client.close().await;
    eventually("the coordinator counts it gone", || async {
        (clients().await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn readyz_says_whether_each_process_should_get_traffic_and_why_not() {
    use coordinator::accounts::{AccountsConfig, AccountsFile, StoreKind};
    let path = std::env::temp_dir().join(format!("relaymesh-readyz-{}.json", std::process::id()));
    AccountsFile { accounts: vec![] }.save(&path).unwrap();
    let mut config = relaymesh_tests::coordinator_config();
    config.accounts = AccountsConfig {
        store: StoreKind::File,
        path: Some(path.clone()),
        ..AccountsConfig::default()
    };
    let cluster = Cluster::start_configured(2, config).await;
    let coordinator = cluster.coordinator.addr;
    assert_eq!(
        get_text(&format!("http://{coordinator}/readyz")).await,
        (200, "ready\n".into())
    );
    for server in &cluster.servers {
        eventually("server ready", || async {
            (get_text(&format!("http://{}/readyz", server.addr)).await.0 == 200).then_some(())
        })
        .await;
    }
    // The account file gone: the coordinator is alive but not ready, and says why.
    std::fs::remove_file(&path).unwrap();
    let (status, body) = get_text(&format!("http://{coordinator}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("account store"), "{body}");
    assert_eq!(
        get_text(&format!("http://{coordinator}/healthz")).await.0,
        200
    );
    // A comm server with no coordinator to register with is not ready either.
    let lonely =
        relaymesh_tests::ServerHandle::start(relaymesh_tests::server_config("ws://127.0.0.1:1"))
            .await;
    let (status, body) = get_text(&format!("http://{}/readyz", lonely.addr)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not registered"), "{body}");
}
