//! The coordinator's gRPC admin API, from a real tonic client: the token, servers, health and
//! reflection, draining a server with its clients moving elsewhere, kicking a client.

use std::collections::BTreeSet;

use relaymesh_client::{Client, Event};
use relaymesh_proto::admin::admin_client::AdminClient;
use relaymesh_proto::admin::{
    AccountEntry, AccountName, AddAccessCodeRequest, AddPublicKeyRequest, CreateAccountRequest,
    DrainServerRequest, GetServerRequest, KickClientRequest, ListAccountsRequest,
    ListServersRequest, SetRoleRequest, UndrainServerRequest,
};
use relaymesh_tests::{Cluster, client_config, coordinator_config, eventually, next_event, within};
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "test-admin-token-0123456789";

/// A cluster of `n` servers whose coordinator serves the admin API.
async fn cluster(n: usize) -> Cluster {
    let mut config = coordinator_config();
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token = TOKEN.into();
    Cluster::start_configured(n, config).await
}

async fn channel(cluster: &Cluster) -> Channel {
    let addr = cluster.coordinator.admin_addr.expect("admin API");
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `message` with the bearer token `token`.
fn with<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn authed<T>(message: T) -> Request<T> {
    with(TOKEN, message)
}

#[tokio::test]
async fn the_admin_api_needs_its_token_lists_servers_and_serves_health_and_reflection() {
    let cluster = cluster(3).await;
    let channel = channel(&cluster).await;
    let mut admin = AdminClient::new(channel.clone());

    // No token, a wrong one, one in the wrong form: UNAUTHENTICATED, and nothing else breaks.
    let none = admin.list_servers(ListServersRequest {}).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    assert!(none.message().contains("Bearer"), "{none:?}");
    let wrong = admin
        .list_servers(with("not-the-token", ListServersRequest {}))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let mut malformed = Request::new(ListServersRequest {});
    malformed
        .metadata_mut()
        .insert("authorization", TOKEN.parse().unwrap());
    assert_eq!(
        admin.list_servers(malformed).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let listed = admin
        .list_servers(authed(ListServersRequest {}))
        .await
        .unwrap()
        .into_inner();
    let ids: BTreeSet<String> = listed.servers.iter().map(|s| s.server_id.clone()).collect();
    let want: BTreeSet<String> = cluster.servers.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, want);
    assert!(listed.servers.iter().all(|s| !s.draining && s.capacity > 0));

    // Bad arguments name their field; an unknown server is NOT_FOUND.
    let empty = admin
        .get_server(authed(GetServerRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().starts_with("server_id"), "{empty:?}");
    let unknown = admin
        .drain_server(authed(DrainServerRequest {
            server_id: "no-such-server".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let too_long = admin
        .drain_server(authed(DrainServerRequest {
            server_id: cluster.servers[0].id.clone(),
            deadline_ms: 10_000_000,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    // Nothing was half-applied: no server is draining.
    let one = admin
        .get_server(authed(GetServerRequest {
            server_id: cluster.servers[0].id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!one.draining && !one.drained);

    // Health: serving once a server is registered and the store answers; no token needed.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    eventually("health serving", || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "relaymesh.admin.v1.Admin".into(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                .then_some(())
        }
    })
    .await;
    let overall = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        overall.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Reflection lists the services, as generic gRPC tools ask for them.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures_util::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "relaymesh.admin.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.contains(service), "{services:?}");
    }
}

#[tokio::test]
async fn draining_a_server_moves_its_clients_make_before_break_losing_nothing_either_way() {
    let cluster = cluster(3).await;
    let drained = cluster.servers[0].id.clone();
    let mut admin = AdminClient::new(channel(&cluster).await);
    // A watcher on another server, and clients on the server to drain: subscribers, and a
    // publisher that keeps publishing while it moves.
    let mut watcher = cluster.client_on(2).await;
    watcher.subscribe(["drain/moving"]).await.unwrap();
    let mut movers = Vec::new();
    for i in 0..5 {
        let mut config = client_config(&cluster.coordinator.url);
        config.preferred_server = Some(drained.clone());
        // A client id: the move's login must not replace the session it moves from.
        config.client_id = Some(format!("mover-{i}"));
        let client = Client::connect(config).await.unwrap();
        assert_eq!(client.server_id(), drained);
        client.subscribe(["drain/elsewhere"]).await.unwrap();
        movers.push(client);
    }
    // `moved` counts by the server's load reports: wait until they have all five.
    eventually("five clients reported", || {
        let mut admin = admin.clone();
        let id = drained.clone();
        async move {
            let server = admin
                .get_server(authed(GetServerRequest { server_id: id }))
                .await
                .ok()?
                .into_inner();
            (server.clients == 5).then_some(())
        }
    })
    .await;
    // One of them publishes while it moves, and the watcher publishes to them all meanwhile.
    let publish = |handle: relaymesh_client::Handle, topic: &'static str| {
        tokio::spawn(async move {
            for i in 0..400u32 {
                handle
                    .publish(topic, i.to_be_bytes().to_vec())
                    .await
                    .unwrap();
                if i % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let publishing = publish(movers[0].handle(), "drain/moving");
    let incoming = publish(watcher.handle(), "drain/elsewhere");

    let answer = within(
        "drain",
        admin.drain_server(authed(DrainServerRequest {
            server_id: drained.clone(),
            deadline_ms: 20_000,
            reason: "upgrade".into(),
        })),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!((answer.moved, answer.remaining), (5, 0), "{answer:?}");
    let server = answer.server.unwrap();
    assert!(server.draining && server.drained, "{server:?}");
    within("publisher", publishing).await.unwrap();
    within("watcher publishing", incoming).await.unwrap();

    // Every client was asked to move, and did, to another server, without a disconnection;
    // and each received everything published to it meanwhile, once and in order.
    for client in &mut movers {
        let mut moved = false;
        let mut next = 0u32;
        while next < 400 || !moved {
            match next_event(client).await {
                Event::Moved {
                    from_server,
                    server_id,
                    reason,
                    ..
                } => {
                    assert!(!moved, "moved twice");
                    assert_eq!(from_server, drained);
                    assert_ne!(server_id, drained);
                    assert_eq!(client.server_id(), server_id);
                    assert!(reason.contains("upgrade"), "{reason}");
                    moved = true;
                }
                Event::Message(m) => {
                    assert_eq!(m.topic, "drain/elsewhere");
                    assert_eq!(&m.payload[..], &next.to_be_bytes()[..], "message {next}");
                    next += 1;
                }
                Event::SubscriptionConfirmed { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // Nothing the moving publisher published was lost: the watcher has all 400, in order.
    for i in 0..400u32 {
        let m = relaymesh_tests::next_message(&mut watcher).await;
        assert_eq!(&m.payload[..], &i.to_be_bytes()[..], "message {i}");
    }
    // New logins go elsewhere while it is drained.
    for _ in 0..5 {
        let mut config = client_config(&cluster.coordinator.url);
        config.preferred_server = Some(drained.clone());
        let client = Client::connect(config).await.unwrap();
        assert_ne!(client.server_id(), drained);
        client.close().await;
    }
    assert_eq!(cluster.servers[0].stat("clients").await, 0);
    assert_eq!(cluster.servers[0].stats().await["draining"], true);
    let (status, body) =
        relaymesh_tests::get_text(&format!("http://{}/readyz", cluster.servers[0].addr)).await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");

    // Undrained, it takes clients again.
    let undrained = admin
        .undrain_server(authed(UndrainServerRequest {
            server_id: drained.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!undrained.drained);
    eventually("takes clients again", || async {
        let mut config = client_config(&cluster.coordinator.url);
        config.preferred_server = Some(drained.clone());
        let client = Client::connect(config).await.unwrap();
        let there = client.server_id() == drained;
        client.close().await;
        there.then_some(())
    })
    .await;
    for client in movers {
        client.close().await;
    }
}

#[tokio::test]
async fn a_kicked_client_is_closed_and_does_not_come_back() {
    let cluster = cluster(2).await;
    let mut admin = AdminClient::new(channel(&cluster).await);
    let mut kicked = cluster.client_on(1).await;
    let bystander = cluster.client_on(1).await;
    let answer = admin
        .kick_client(authed(KickClientRequest {
            alias: kicked.alias(),
            reason: "misbehaving".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.closed, 1);
    match next_event(&mut kicked).await {
        Event::Disconnected { reason, .. } => assert!(reason.contains("misbehaving"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // It does not reconnect: its events end.
    assert!(within("end of events", kicked.next_event()).await.is_none());
    // An alias nobody has: nothing closed. The other client is untouched.
    let nobody = admin
        .kick_client(authed(KickClientRequest {
            alias: "nobody-1".into(),
            reason: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nobody.closed, 0);
    assert_eq!(cluster.servers[1].stat("clients").await, 1);
    bystander.close().await;
}

/// The running coordinator's account store through the API: every change takes effect on the
/// next login, refusals name what is wrong and change nothing.
#[tokio::test]
async fn accounts_are_managed_on_the_running_coordinator() {
    let path = std::env::temp_dir().join(format!(
        "relaymesh-admin-accounts-{}.db",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let mut config = coordinator_config();
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token = TOKEN.into();
    config.accounts = coordinator::accounts::AccountsConfig {
        store: coordinator::accounts::StoreKind::Sql,
        url: format!("sqlite://{}", path.display()),
        ..Default::default()
    };
    let cluster = Cluster::start_configured(1, config).await;
    let mut admin = AdminClient::new(channel(&cluster).await);
    let login = |code: &str, role: &str| {
        let mut config = client_config(&cluster.coordinator.url);
        config.credentials = relaymesh_client::Credentials::AccessCode {
            account: "acme".into(),
            code: code.into(),
            role: role.into(),
            group: String::new(),
        };
        config.auto_reconnect = false;
        Client::connect(config)
    };

    admin
        .create_account(authed(CreateAccountRequest {
            account: "acme".into(),
            isolate_groups: false,
        }))
        .await
        .unwrap();
    let again = admin
        .create_account(authed(CreateAccountRequest {
            account: "acme".into(),
            isolate_groups: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let bad = admin
        .create_account(authed(CreateAccountRequest {
            account: "no spaces".into(),
            isolate_groups: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let empty = admin
        .enable_account(authed(AccountName {
            account: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("account"), "{empty:?}");

    // A code made through the API logs in at once; it is shown once, never listed.
    let code = admin
        .add_access_code(authed(AddAccessCodeRequest {
            account: "acme".into(),
            id: "ops".into(),
            groups: Vec::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .code;
    assert!(code.len() >= 16, "{code:?}");
    login(&code, "").await.unwrap().close().await;

    // Roles: once there is one, logins must name it, and its rules hold.
    admin
        .set_role(authed(SetRoleRequest {
            account: "acme".into(),
            role: "viewer".into(),
            publish: Vec::new(),
            subscribe: vec!["status/#".into()],
        }))
        .await
        .unwrap();
    let bad_filter = admin
        .set_role(authed(SetRoleRequest {
            account: "acme".into(),
            role: "broken".into(),
            publish: vec!["a/#/b".into()],
            subscribe: Vec::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_filter.code(), Code::InvalidArgument, "{bad_filter:?}");
    let viewer = login(&code, "viewer").await.unwrap();
    viewer.subscribe(["status/a"]).await.unwrap();
    assert!(viewer.subscribe(["orders"]).await.is_err());
    viewer.close().await;
    let last = admin
        .remove_role(authed(AccountEntry {
            account: "acme".into(),
            id: "viewer".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(last.code(), Code::FailedPrecondition, "{last:?}");

    let bad_key = admin
        .add_public_key(authed(AddPublicKeyRequest {
            account: "acme".into(),
            key: "not-hex".into(),
            id: String::new(),
            groups: Vec::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_key.code(), Code::InvalidArgument, "{bad_key:?}");

    let listed = admin
        .list_accounts(authed(ListAccountsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.accounts.len(), 1);
    let acme = &listed.accounts[0];
    assert!(acme.enabled);
    assert_eq!(acme.access_codes.len(), 1);
    assert_eq!(acme.access_codes[0].id, "ops");
    assert!(acme.public_keys.is_empty(), "the bad key was not written");
    assert_eq!(acme.roles.len(), 1, "the bad role was not written");
    assert!(listed.text.starts_with("acme\tenabled"), "{}", listed.text);

    // Disabled: refused; enabled: in again. Revoked: refused for good.
    admin
        .disable_account(authed(AccountName {
            account: "acme".into(),
        }))
        .await
        .unwrap();
    assert!(login(&code, "viewer").await.is_err());
    admin
        .enable_account(authed(AccountName {
            account: "acme".into(),
        }))
        .await
        .unwrap();
    login(&code, "viewer").await.unwrap().close().await;
    admin
        .revoke_access_code(authed(AccountEntry {
            account: "acme".into(),
            id: "ops".into(),
        }))
        .await
        .unwrap();
    assert!(login(&code, "viewer").await.is_err());
    let unknown = admin
        .revoke_access_code(authed(AccountEntry {
            account: "acme".into(),
            id: "nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let nobody = admin
        .list_nodes(authed(AccountName {
            account: "globex".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::NotFound, "{nobody:?}");
    drop(cluster);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn the_open_store_has_no_accounts_to_manage() {
    let cluster = cluster(1).await;
    let mut admin = AdminClient::new(channel(&cluster).await);
    let refused = admin
        .list_accounts(authed(ListAccountsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
}
