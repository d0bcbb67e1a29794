//! Accounts, roles and groups end to end: a coordinator with a `file` account store and comm
//! servers that hold every client to the identity the coordinator vouched for.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::{BufMut as _, BytesMut};
use coordinator::accounts::{
    AccessCode, Account, AccountsConfig, AccountsFile, PublicKey, RoleRules, StoreKind, hash_code,
};
use ed25519_dalek::{Signer as _, SigningKey};
use relaymesh_client::{Client, ClientError, Credentials, Event};
use relaymesh_proto::{ErrorCode, v1};
use relaymesh_tests::raw::{dial, next_frame, send, send_msg};
use relaymesh_tests::{
    Cluster, client_config, coordinator_config, eventually, next_message, post_json, within,
};

const CODE: &str = "correct-horse-battery";

/// The drone's key, registered to acme.
fn drone_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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
            groups: Vec::new(),
        }],
        public_keys: vec![PublicKey {
            id: "drone".into(),
            key: hex(drone_key().verifying_key().as_bytes()),
            revoked: false,
            groups: Vec::new(),
        }],
        roles,
        nodes: Vec::new(),
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

/// Encodes `ClientToServer { publish: Publish { topic, payload, 13: alias, 14: role } }`: a client
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
    // Fields Publish does not have (in Message they would be the alias and role).
    field(&mut inner, 13, b"admin");
    field(&mut inner, 14, b"gcs");
    let mut outer = BytesMut::new();
    field(&mut outer, 4, &inner);
    outer.freeze()
}

#[tokio::test]
async fn senders_cannot_forge_alias_or_role() {
    let (cluster, _file) = cluster(1, 10).await;
    let mut gcs = cluster.client_as(0, login("acme", "gcs", "")).await;
    gcs.subscribe(["telemetry/pos"]).await.unwrap();
    let (url, granted) = relaymesh_tests::raw::login_url(
        &cluster.coordinator.addr,
        &serde_json::json!({"credentials": {"access_code": {
            "account": "acme", "code": CODE, "role": "agent"}}}),
    )
    .await;
    let mut raw = dial(&url, None).await;
    send_msg(
        &mut raw,
        &v1::ClientToServer::attach(v1::Attach {
            protocol_version: relaymesh_proto::PROTOCOL_VERSION,
        }),
    )
    .await;
    next_frame(&mut raw).await.expect("Ready");
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

fn key_login(key: SigningKey, role: &str) -> Credentials {
    Credentials::Key {
        account: "acme".into(),
        key,
        role: role.into(),
        group: String::new(),
    }
}

#[tokio::test]
async fn an_ed25519_key_logs_in_by_signing_the_challenge() {
    let (cluster, _file) = cluster(1, 10).await;
    let mut gcs = cluster.client_as(0, login("acme", "gcs", "")).await;
    gcs.subscribe(["telemetry/pos"]).await.unwrap();
    let drone = cluster.client_as(0, key_login(drone_key(), "agent")).await;
    drone.publish("telemetry/pos", "signed in").await.unwrap();
    let m = next_message(&mut gcs).await;
    assert_eq!((&*m.payload, m.role.as_str()), (&b"signed in"[..], "agent"));
    // A key that is not registered to the account does not log in, signature or not.
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = key_login(SigningKey::from_bytes(&[8; 32]), "agent");
    let refused = Client::connect(config).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused(e) if e.error_code() == ErrorCode::BadCredentials),
        "{refused}"
    );
}

#[tokio::test]
async fn a_bad_signature_is_refused() {
    let (cluster, _file) = cluster(1, 10).await;
    let mut link = dial(&format!("{}/v1/connect", cluster.coordinator.url), None).await;
    let hello = v1::Hello {
        protocol_version: relaymesh_proto::PROTOCOL_VERSION,
        credentials: Some(v1::Credentials {
            kind: Some(v1::credentials::Kind::Key(v1::KeyLogin {
                account: "acme".into(),
                public_key: drone_key().verifying_key().as_bytes().to_vec().into(),
                role: "agent".into(),
                ..v1::KeyLogin::default()
            })),
        }),
        ..v1::Hello::default()
    };
    send_msg(&mut link, &v1::ClientToCoordinator::hello(hello)).await;
    let challenge: v1::CoordinatorToClient =
        relaymesh_proto::decode(next_frame(&mut link).await.unwrap()).unwrap();
    let Some(v1::coordinator_to_client::Kind::Challenge(challenge)) = challenge.kind else {
        panic!("expected a Challenge, got {challenge:?}");
    };
    assert_eq!(challenge.nonce.len(), 32);
    // Signed for another role than the one asked for: the signature does not cover this login.
    let wrong = relaymesh_proto::login_challenge(&challenge.nonce, "acme", "gcs", "");
    let response = v1::ChallengeResponse {
        signature: drone_key().sign(&wrong).to_bytes().to_vec().into(),
    };
    send_msg(
        &mut link,
        &v1::ClientToCoordinator::challenge_response(response),
    )
    .await;
    let error = relaymesh_tests::raw::expect_error::<v1::CoordinatorToClient>(&mut link).await;
    assert_eq!(error.error_code(), ErrorCode::BadCredentials, "{error}");
}

#[tokio::test]
async fn a_challenge_answers_one_login_only() {
    let (cluster, _file) = cluster(1, 10).await;
    let base = format!("http://{}", cluster.coordinator.addr);
    let (status, challenge) = post_json(
        &format!("{base}/v1/login/challenge"),
        &serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200, "{challenge}");
    let nonce: Vec<u8> = {
        let text = challenge["nonce"].as_str().unwrap();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    };
    let signature = drone_key().sign(&relaymesh_proto::login_challenge(
        &nonce, "acme", "agent", "",
    ));
    let body = serde_json::json!({"credentials": {"key": {
        "account": "acme", "role": "agent",
        "public_key": hex(drone_key().verifying_key().as_bytes()),
        "challenge_id": challenge["challenge_id"],
        "signature": hex(&signature.to_bytes()),
    }}});
    let (status, first) = post_json(&format!("{base}/v1/login"), &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["key"].is_string(), "{first}");
    // The same signed answer again: the challenge is spent.
    let (status, replay) = post_json(&format!("{base}/v1/login"), &body).await;
    assert_eq!(
        (status, replay["code"].as_str()),
        (401, Some("BAD_CREDENTIALS")),
        "{replay}"
    );
}

#[tokio::test]
async fn a_newer_login_of_the_same_client_replaces_the_older_session_on_any_server() {
    let (cluster, _file) = cluster(2, 10).await;
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = login("acme", "agent", "");
    config.client_id = Some("drone-7".into());
    config.preferred_server = Some(cluster.servers[0].id.clone());
    let mut older = Client::connect(config.clone()).await.unwrap();
    config.preferred_server = Some(cluster.servers[1].id.clone());
    let newer = Client::connect(config).await.unwrap();
    // The older session is told why, and does not come back (it would replace the newer one).
    let reason = relaymesh_tests::replaced_reason(&mut older).await;
    assert!(reason.contains("REPLACED"), "{reason}");
    assert!(
        within("older client ends", older.next_event())
            .await
            .is_none()
    );
    assert_eq!(cluster.servers[0].stat("replaced").await, 1);
    newer.subscribe(["command/x"]).await.unwrap();
    // Another client id of the same account is left alone.
    let mut other = client_config(&cluster.coordinator.url);
    other.credentials = login("acme", "agent", "");
    other.client_id = Some("drone-8".into());
    Client::connect(other).await.unwrap();
    assert_eq!(cluster.servers[1].stat("replaced").await, 0);
}

#[tokio::test]
async fn a_key_reserved_for_a_replaced_login_is_refused_when_it_comes_in_late() {
    let (cluster, _file) = cluster(1, 10).await;
    let login_url = format!("http://{}/v1/login", cluster.coordinator.addr);
    let body = serde_json::json!({"client_id": "drone-9", "credentials": {"access_code": {
        "account": "acme", "code": CODE, "role": "agent"}}});
    let (status, older) = post_json(&login_url, &body).await;
    assert_eq!(status, 200, "{older}");
    // A newer login of the same client, before the older key is used.
    let mut config = client_config(&cluster.coordinator.url);
    config.credentials = login("acme", "agent", "");
    config.client_id = Some("drone-9".into());
    let _newer = Client::connect(config).await.unwrap();
    // The server handles its coordinator link in order: once it has reserved a key for a
    // later login, it has seen the Replace.
    let (status, _) = post_json(
        &login_url,
        &serde_json::json!({"credentials": {"access_code": {
        "account": "globex", "code": CODE}}}),
    )
    .await;
    assert_eq!(status, 200);
    let url = format!(
        "{}?key={}",
        older["url"].as_str().unwrap(),
        older["key"].as_str().unwrap()
    );
    // Refused before anything else, `Ready` included.
    let mut late = dial(&url, None).await;
    let error = relaymesh_tests::raw::expect_error::<v1::ServerToClient>(&mut late).await;
    assert_eq!(error.error_code(), ErrorCode::Replaced, "{error}");
}
