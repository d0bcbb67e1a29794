//! Server trust with Ed25519 keys: where trusted keys are configured, comm servers prove who
//! they are to the coordinator and to each other by signing a fresh challenge, and a server
//! with another key (or only the cluster secret) is refused and counted.

use ed25519_dalek::SigningKey;
use relaymesh_net::ws::{self, DialError, WsLimits};
use relaymesh_proto::hex;
use relaymesh_tests::{
    CoordinatorHandle, ServerHandle, client_config, coordinator_config, eventually, next_message,
    server_config,
};

/// A key file for seed `n`, and the public key in hex; the file is removed on drop.
struct KeyFile {
    path: std::path::PathBuf,
    public: String,
}

impl KeyFile {
    fn new(n: u8) -> Self {
        let path =
            std::env::temp_dir().join(format!("relaymesh-key-{}-{n}.hex", std::process::id()));
        std::fs::write(&path, hex::encode(&[n; 32])).unwrap();
        let public = hex::encode(SigningKey::from_bytes(&[n; 32]).verifying_key().as_bytes());
        Self { path, public }
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn keyed_server(coordinator: &str, key: &KeyFile, trusted: &[&KeyFile]) -> commserver::Config {
    let mut config = server_config(coordinator);
    config.identity_key_file = Some(key.path.clone());
    config.trusted_peer_keys = trusted.iter().map(|k| k.public.clone()).collect();
    config
}

#[tokio::test]
async fn servers_with_trusted_keys_register_and_link_and_others_are_refused() {
    let (a, b, rogue) = (KeyFile::new(11), KeyFile::new(12), KeyFile::new(13));
    let mut config = coordinator_config();
    config.trusted_server_keys = vec![a.public.clone(), b.public.clone()];
    let coordinator = CoordinatorHandle::start(config).await;
    let trusted = [&a, &b];
    let sa = ServerHandle::start(keyed_server(&coordinator.url, &a, &trusted)).await;
    let sb = ServerHandle::start(keyed_server(&coordinator.url, &b, &trusted)).await;
    eventually("both servers registered and linked", || async {
        let linked = sa.stat("peers").await == 1 && sb.stat("peers").await == 1;
        (coordinator.server_ids().await.len() == 2 && linked).then_some(())
    })
    .await;
    // Traffic crosses the key-authenticated peer link.
    let mut config = client_config(&coordinator.url);
    config.preferred_server = Some(sb.id.clone());
    let mut receiver = relaymesh_client::Client::connect(config).await.unwrap();
    receiver.subscribe(["t"]).await.unwrap();
    let mut config = client_config(&coordinator.url);
    config.preferred_server = Some(sa.id.clone());
    let sender = relaymesh_client::Client::connect(config).await.unwrap();
    sender.publish("t", "over a trusted link").await.unwrap();
    assert_eq!(
        &*next_message(&mut receiver).await.payload,
        b"over a trusted link"
    );

    // A server with an untrusted key, and one with only the cluster secret, never register.
    let before = coordinator.stats().await["server_links_refused"]
        .as_u64()
        .unwrap();
    let _rogue = ServerHandle::start(keyed_server(&coordinator.url, &rogue, &trusted)).await;
    let _secret_only = ServerHandle::start(server_config(&coordinator.url)).await;
    eventually("both rogues refused, more than once", || async {
        let refused = coordinator.stats().await["server_links_refused"]
            .as_u64()
            .unwrap();
        (refused >= before + 4).then_some(())
    })
    .await;
    assert_eq!(coordinator.server_ids().await.len(), 2);

    // A peer that presents only the cluster secret is refused by a key-trusting server.
    let url = format!("ws://{}/v1/peers", sa.addr);
    let refused = ws::dial(
        &url,
        Some(relaymesh_tests::SECRET),
        &WsLimits::default(),
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(matches!(refused, Err(DialError::Refused { status, .. }) if status == 401));
    assert!(sa.stat("peer_links_refused").await >= 1);
}
