//! Accounts, roles and groups end to end: a coordinator with a `file` account store and comm
//! servers that hold every client to the identity the coordinator vouched for.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::{BufMut as _, BytesMut};
use coordinator::accounts::{
    AccessCode, Account, AccountsConfig, AccountsFile, RoleRules, StoreKind, hash_code,
};
use relaymesh_client::{Client, ClientError, Credentials, Event};
use relaymesh_proto::{ErrorCode, v1};
use relaymesh_tests::raw::{dial, next_frame, send, send_msg};
use relaymesh_tests::{
    Cluster, client_config, coordinator_config, eventually, next_message, post_json, within,
};

const CODE: &str = "correct-horse-battery";

fn rules(publish: &[&str], subscribe: &[&str]) -> RoleRules {
    RoleRules {
        publish: publish.iter().map(|s| s.to_string()).collect(),
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
    }
}

fn account(name: &str, roles: BTreeMap<String, RoleRules>, isolate_groups: bool) -> Account {
    Account {
        name: name.into(),
        enabled: true,
        isolate_groups,
        access_codes: vec![AccessCode {
            id: "main".into(),
            hash: hash_code(CODE).unwrap(),
            revoked: false,
        }],
        roles,
    }
}

/// acme: agents publish telemetry and take commands, GCS the reverse, groups isolated;
/// globex: no rules; initech: disabled.
fn accounts_file() -> AccountsFile {
    let acme_roles = BTreeMap::from([
        ("agent".to_string(), rules(&["telemetry/#"], &["command/+"])),
        ("gcs".to_string(), rules(&["command/+"], &["telemetry/#"])),
    ]);
    let mut initech = account("initech", BTreeMap::new(), false);
    initech.enabled = false;
    AccountsFile {
        accounts: vec![
            account("acme", acme_roles, true),
            account("globex", BTreeMap::new(), false),
            initech,
        ],
    }
}

/// A temporary accounts file, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn cluster(servers: usize, burst: u32) -> (Cluster, TempFile) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "relaymesh-accounts-{}-{n}.json",
        std::process::id()
    ));
    accounts_file().save(&path).unwrap();
    let mut config = coordinator_config();
    config.accounts = AccountsConfig {
        store: StoreKind::File,
        path: Some(path.clone()),
        reload_ms: 50,
        ..AccountsConfig::default()
    };
    config.failed_login_burst = burst;
    (
        Cluster::start_configured(servers, config).await,
        TempFile(path),
    )
}

fn login(account: &str, role: &str, group: &str) -> Credentials {
    Credentials::AccessCode {
        account: account.into(),
        code: CODE.into(),
        role: role.into(),
        group: group.into(),
    }
}

#[tokio::test]
async fn accounts_never_see_each_others_traffic_on_one_server_or_across_two() {
    let (cluster, _file) = cluster(2, 10).await;
    let acme_pub = cluster.client_as(0, login("acme", "gcs", "")).await;
    let mut acme_here = cluster.client_as(0, login("acme", "agent", "")).await;
    let mut acme_there = cluster.client_as(1, login("acme", "agent", "")).await;
    let mut globex_here = cluster.client_as(0, login("globex", "", "")).await;
    let mut globex_there = cluster.client_as(1, login("globex", "", "")).await;
    for c in [&acme_here, &acme_there] {
        c.subscribe(["command/all"]).await.unwrap();
    }
    for c in [&globex_here, &globex_there] {
        c.subscribe(["command/all"]).await.unwrap();
    }
    acme_pub.publish("command/all", "acme only").await.unwrap();
    for c in [&mut acme_here, &mut acme_there] {
        let m = next_message(c).await;
        assert_eq!((&*m.payload, m.role.as_str()), (&b"acme only"[..], "gcs"));
        assert_eq!(m.from, acme_pub.alias());
    }
    // Globex's own message is the first either globex client gets: acme's, published before
    // it on the same topic name and servers, never reached them.
    let globex_pub = cluster.client_as(1, login("globex", "", "")).await;
    globex_pub.publish("command/all", "globex").await.unwrap();
    for c in [&mut globex_here, &mut globex_there] {
        assert_eq!(&*next_message(c).await.payload, b"globex");
    }
}

#[tokio::test]
async fn groups_of_an_isolating_account_are_rooms_of_their_own() {
    let (cluster, _file) = cluster(2, 10).await;
    let mut g1 = cluster.client_as(1, login("acme", "gcs", "g1")).await;
    let mut g2 = cluster.client_as(1, login("acme", "gcs", "g2")).await;
    for c in [&g1, &g2] {
        c.subscribe(["telemetry/pos"]).await.unwrap();
    }
    let agent1 = cluster.client_as(0, login("acme", "agent", "g1")).await;
    let agent2 = cluster.client_as(0, login("acme", "agent", "g2")).await;
    agent1.publish("telemetry/pos", "from g1").await.unwrap();
    agent2.publish("telemetry/pos", "from g2").await.unwrap();
    agent1.publish("telemetry/pos", "g1 again").await.unwrap();
    // Each group hears only its own: g1's second message follows its first directly.
    assert_eq!(&*next_message(&mut g1).await.payload, b"from g1");
    assert_eq!(&*next_message(&mut g1).await.payload, b"g1 again");
    assert_eq!(&*next_message(&mut g2).await.payload, b"from g2");
}

#[tokio::test]
async fn role_rules_allow_and_refuse_and_the_session_goes_on() {
    let (cluster, _file) = cluster(1, 10).await;
    let mut agent = cluster.client_as(0, login("acme", "agent", "")).await;
    let mut gcs = cluster.client_as(0, login("acme", "gcs", "")).await;
    // An agent may not subscribe to telemetry: the request fails, the connection stays.
    let refused = agent.subscribe(["telemetry/pos"]).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Forbidden), "{refused}");
    agent.subscribe(["command/drone-1"]).await.unwrap();
    gcs.subscribe(["telemetry/#".replace('#', "pos")])
        .await
        .unwrap();
    // An agent may not publish commands: told so, and nothing is delivered.
    agent
        .publish("command/drone-1", "self-command")
        .await
        .unwrap();
    let event = within("Forbidden event", async {
        loop {
            match agent.next_event().await {
                Some(Event::Forbidden { reason }) => return reason,
                Some(Event::Message(m)) => panic!("forbidden publish delivered: {m:?}"),
                Some(_) => {}
                None => panic!("client closed"),
            }
        }
    })
    .await;
    assert!(
        event.contains("agent") && event.contains("command/drone-1"),
        "{event}"
    );
    // Allowed traffic flows both ways on the same connections.
    agent.publish("telemetry/pos", "42,7").await.unwrap();
    let m = next_message(&mut gcs).await;
    assert_eq!((&*m.payload, m.role.as_str()), (&b"42,7"[..], "agent"));
    gcs.publish("command/drone-1", "land").await.unwrap();
    assert_eq!(&*next_message(&mut agent).await.payload, b"land");
    assert_eq!(cluster.servers[0].stat("forbidden").await, 2);
}

/// Encodes `ClientToServer { publish: Publish { topic, payload, 3: alias, 4: role } }`: a client
/// trying to pass extra fields off as the sender.
fn forged_publish(topic: &str, payload: &[u8]) -> bytes::Bytes {
    fn field(buf: &mut BytesMut, tag: u8, value: &[u8]) {
        buf.put_u8(tag << 3 | 2);
        buf.put_u8(u8::try_from(value.len()).unwrap());
        buf.put_slice(value);
    }
    let mut inner = BytesMut::new();
    field(&mut inner, 1, topic.as_bytes());
    field(&mut inner, 2, payload);
    field(&mut inner, 3, b"admin");
    field(&mut inner, 4, b"gcs");
    let mut outer = BytesMut::new();
    field(&mut outer, 4, &inner);
    outer.freeze()
}

#[tokio::test]
async fn senders_cannot_forge_alias_or_role() {
    let (cluster, _file) = cluster(1, 10).await;
    let mut gcs = cluster.client_as(0, login("acme", "gcs", "")).await;
    gcs.subscribe(["telemetry/pos"]).await.unwrap();
    let (status, granted) = post_json(
        &format!("http://{}/v1/login", cluster.coordinator.addr),
        &serde_json::json!({"credentials": {"access_code": {
            "account": "acme", "code": CODE, "role": "agent"}}}),
    )
    .await;
    assert_eq!(status, 200, "{granted}");
    let url = format!(
        "{}?key={}",
        granted["url"].as_str().unwrap(),
        granted["key"].as_str().unwrap()
    );
    let mut raw = dial(&url, None).await;
    next_frame(&mut raw).await.expect("Ready");
    send_msg(
        &mut raw,
        &v1::ClientToServer::attach(v1::Attach {
            protocol_version: relaymesh_proto::PROTOCOL_VERSION,
        }),
    )
    .await;
    send(&mut raw, forged_publish("telemetry/pos", b"forged?")).await;
    let m = next_message(&mut gcs).await;
    assert_eq!(&*m.payload, b"forged?");
    assert_eq!(
        (m.from.as_str(), m.role.as_str()),
        (granted["alias"].as_str().unwrap(), "agent")
    );
}

#[tokio::test]
async fn failed_logins_get_their_own_codes_and_are_rate_limited_per_address() {
    let (cluster, _file) = cluster(1, 4).await;
    let url = format!("http://{}/v1/login", cluster.coordinator.addr);
    let attempt = |account: &str, code: &str, role: &str| {
        serde_json::json!({"credentials": {"access_code": {
            "account": account, "code": code, "role": role}}})
    };
    for (body, status, code) in [
        (attempt("nobody", CODE, ""), 401, "UNKNOWN_ACCOUNT"),
        (
            attempt("acme", "wrong-code", "agent"),
            401,
            "BAD_CREDENTIALS",
        ),
        (attempt("initech", CODE, ""), 403, "ACCOUNT_DISABLED"),
        (attempt("acme", CODE, "admin"), 403, "ROLE_NOT_PERMITTED"),
    ] {
        let (got, answer) = post_json(&url, &body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    // Four failures used this address's burst: even a correct login is refused now, on
    // either endpoint, with a code that says why.
    let (got, answer) = post_json(&url, &attempt("globex", CODE, "")).await;
    assert_eq!(
        (got, answer["code"].as_str()),
        (429, Some("RATE_LIMITED")),
        "{answer}"
    );
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = login("globex", "", "");
    let refused = Client::connect(config).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused(e) if e.error_code() == ErrorCode::RateLimited),
        "{refused}"
    );
    assert!(cluster.coordinator.stats().await["logins_rate_limited"].as_u64() >= Some(2));
}

#[tokio::test]
async fn an_anonymous_client_is_refused_and_a_changed_file_takes_effect() {
    let (cluster, file) = cluster(1, 10).await;
    let refused = Client::connect(client_config(&cluster.coordinator.url))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused(e) if e.error_code() == ErrorCode::Unauthenticated),
        "{refused}"
    );
    // Disable globex in the file: the coordinator notices without a restart.
    let mut accounts = accounts_file();
    accounts.account_mut("globex").unwrap().enabled = false;
    accounts.save(&file.0).unwrap();
    eventually("globex disabled", || async {
        let mut config = client_config(&cluster.coordinator.url);
        config.credentials = login("globex", "", "");
        match Client::connect(config).await {
            Err(ClientError::Refused(e)) if e.error_code() == ErrorCode::AccountDisabled => {
                Some(())
            }
            _ => None,
        }
    })
    .await;
}
