//! TLS on every link: a whole cluster over `wss://` with mutual TLS between servers, a client
//! that trusts the wrong CA, a plain client on a TLS listener, certificate rotation with
//! clients connected, and mutual TLS refusing servers and peers without a valid certificate.

use std::time::Duration;

use relaymesh_client::{Client, ClientError};
use relaymesh_net::tls::{Connector, names_host};
use relaymesh_net::ws::DialError;
use relaymesh_proto::v1;
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION};
use relaymesh_tests::pki::Pki;
use relaymesh_tests::{
    Cluster, SECRET, client_config, coordinator_config, eventually, http_base, next_messages, raw,
    within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cluster::assert_cross_server_delivery;

/// A coordinator and `n` servers, every listener on TLS with certificates from `pki`, mutual
/// TLS on the server and peer links when `mtls`.
async fn tls_cluster(pki: &Pki, n: usize, mtls: bool) -> Cluster {
    let mut coordinator = coordinator_config();
    coordinator.tls = pki.service(mtls);
    Cluster::start_full(n, coordinator, |server| server.tls = pki.service(mtls)).await
}

#[tokio::test]
async fn a_cluster_on_tls_with_mutual_tls_delivers_across_servers_exactly_once_in_order() {
    let pki = Pki::new("relaymesh test CA");
    let cluster = tls_cluster(&pki, 3, true).await;
    assert!(cluster.coordinator.url.starts_with("wss://"));
    // Servers registered (over mutual TLS) with their wss:// URLs, and linked to each other.
    let stats = cluster.coordinator.stats().await;
    for server in stats["servers"].as_array().unwrap() {
        let url = server["url"].as_str().unwrap();
        assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    }
    assert_cross_server_delivery(&cluster).await;
}

#[tokio::test]
async fn a_client_trusting_another_ca_is_refused_with_an_error_that_says_so() {
    let pki = Pki::new("relaymesh test CA");
    let cluster = tls_cluster(&pki, 1, false).await;
    let stranger = Pki::new("some other CA");
    let mut config = client_config(&cluster.coordinator.url);
    config.tls = stranger.connector();
    config.connect_timeout = Duration::from_secs(5);
    let error = Client::connect(config).await.expect_err("wrong CA");
    let text = error.to_string();
    assert!(
        text.contains("not signed by a CA this client trusts") && text.contains("--ca"),
        "{text}"
    );
    assert!(
        matches!(error, ClientError::Dial(DialError::Tls { .. })),
        "{error:?}"
    );
    // The same client trusting the right CA gets in.
    let mut config = client_config(&cluster.coordinator.url);
    config.tls = pki.connector();
    let client = Client::connect(config).await.unwrap();
    client.close().await;
}

#[tokio::test]
async fn a_plain_connection_to_a_tls_listener_is_answered_in_words_and_nothing_else_breaks() {
    let pki = Pki::new("relaymesh test CA");
    let cluster = tls_cluster(&pki, 1, false).await;
    for addr in [cluster.coordinator.addr, cluster.servers[0].addr] {
        // A plain HTTP request: a 400 that says what to use.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /v1/stats HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        within("plain answer", tcp.read_to_string(&mut answer))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("speaks TLS only"), "{answer}");
        // A plain WebSocket dial: refused with the same words.
        let plain = format!("ws://{addr}/v1/stats");
        match raw::dial_tls(&plain, None, &Connector::default()).await {
            Err(DialError::Refused {
                status,
                message: Some((ErrorCode::BadFrame, message)),
                ..
            }) => {
                assert_eq!(status, 400);
                assert!(message.contains("wss://"), "{message}");
            }
            other => panic!("plain dial of a TLS listener: {other:?}"),
        }
        // Through an HTTP client: the whole answer, readable.
        let (status, body) = relaymesh_net::http::request(
            relaymesh_net::http::Method::GET,
            &format!("http://{addr}/v1/stats"),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, 400);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "BAD_FRAME");
        // Garbage that is not HTTP either: closed, the listener still serves.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[0u8; 64]).await.unwrap();
        let mut rest = Vec::new();
        let _ = within("garbage closed", tcp.read_to_end(&mut rest)).await;
    }
    // TLS clients are served as before.
    let mut config = client_config(&cluster.coordinator.url);
    config.tls = pki.connector();
    let client = Client::connect(config).await.unwrap();
    client.close().await;
    // Each refusal counted: three plain connections on each listener; the garbage counts as
    // plain too (it is no TLS record).
    let stats = cluster.servers[0].stats().await;
    assert_eq!(stats["tls_refused_plain"], 4, "{stats}");
    let stats = cluster.coordinator.stats().await;
    assert_eq!(stats["tls_refused_plain"], 4, "{stats}");
}

/// The certificate `tls` is shown by the server at `addr` in a fresh handshake.
async fn presented_certificate(addr: std::net::SocketAddr, tls: &Connector) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tls.connect("127.0.0.1", tcp).await.unwrap();
    let (_, session) = stream.get_ref();
    session.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_rotated_server_certificate_is_used_for_new_handshakes_while_clients_stay_connected() {
    let pki = Pki::new("relaymesh test CA");
    let mut coordinator = coordinator_config();
    coordinator.tls = pki.service(false);
    // Each server's files, in start order.
    let files = std::sync::Mutex::new(Vec::new());
    let cluster = Cluster::start_full(2, coordinator, |server| {
        server.tls = pki.service(false);
        files.lock().unwrap().push(server.tls.clone());
    })
    .await;
    let files = files.into_inner().unwrap().remove(0);
    let target = &cluster.servers[0];
    let subscriber_config = {
        let mut config = client_config(&cluster.coordinator.url);
        config.tls = pki.connector();
        config.preferred_server = Some(target.id.clone());
        config
    };
    let mut subscriber = Client::connect(subscriber_config.clone()).await.unwrap();
    subscriber.subscribe(["rotation/t"]).await.unwrap();
    let publisher = cluster_client(&cluster, &pki, 1).await;
    publisher.publish("rotation/t", "before").await.unwrap();
    let got = next_messages(&mut subscriber, 1).await;
    assert_eq!(&got[0].payload[..], b"before");

    // Renewal: a new certificate (same CA, one more name) written over server 0's files, the
    // key first, as a deployment tool would.
    let before = presented_certificate(target.addr, &pki.connector()).await;
    let renewed = pki.issue_for("renewed", &["localhost", "127.0.0.1", "renewed.test"]);
    std::fs::copy(&renewed.key, files.key.as_ref().unwrap()).unwrap();
    std::fs::copy(&renewed.cert, files.cert.as_ref().unwrap()).unwrap();
    eventually("new handshakes present the renewed certificate", || async {
        let now = presented_certificate(target.addr, &pki.connector()).await;
        (now != before && names_host(&now.into(), "renewed.test")).then_some(())
    })
    .await;
    // The subscriber connected before the rotation is still there and still gets messages,
    // and a client connecting now (a new handshake) does too.
    let mut late = Client::connect(subscriber_config).await.unwrap();
    late.subscribe(["rotation/t"]).await.unwrap();
    for i in 0..20 {
        publisher
            .publish("rotation/t", format!("after {i}"))
            .await
            .unwrap();
    }
    let wanted: Vec<String> = (0..20).map(|i| format!("after {i}")).collect();
    for client in [&mut subscriber, &mut late] {
        let got = next_messages(client, 20).await;
        let bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(bodies, wanted);
    }
    assert_eq!(
        target.stat("clients").await,
        2,
        "the first subscriber stayed"
    );
    for client in [subscriber, late, publisher] {
        client.close().await;
    }
}

/// A client of `cluster` on server `index`, trusting `pki`.
async fn cluster_client(cluster: &Cluster, pki: &Pki, index: usize) -> Client {
    let mut config = client_config(&cluster.coordinator.url);
    config.tls = pki.connector();
    config.preferred_server = Some(cluster.servers[index].id.clone());
    Client::connect(config).await.unwrap()
}

#[tokio::test]
async fn mutual_tls_refuses_servers_and_peers_without_a_valid_certificate() {
    let pki = Pki::new("relaymesh test CA");
    let cluster = tls_cluster(&pki, 1, true).await;
    let servers_url = format!("{}/v1/servers", cluster.coordinator.url);
    let register = |url: &str| {
        v1::ServerToCoordinator::register(v1::Register {
            protocol_version: PROTOCOL_VERSION,
            server_id: "rogue".into(),
            public_url: url.into(),
            capacity: 10,
            version: "test".into(),
            ..Default::default()
        })
    };
    // With the cluster secret but no client certificate: refused at registration.
    let mut rogue = raw::dial_tls(&servers_url, Some(SECRET), &pki.connector())
        .await
        .unwrap();
    raw::send_msg(&mut rogue, &register("wss://127.0.0.1:9")).await;
    let error = raw::expect_error::<v1::CoordinatorToServer>(&mut rogue).await;
    assert_eq!(error.error_code(), ErrorCode::Unauthenticated, "{error}");
    assert!(error.message.contains("client certificate"), "{error}");
    // A certificate from the cluster's CA that names another host than the URL registered.
    let elsewhere = pki.issue_for("elsewhere", &["elsewhere.test"]);
    let identity = relaymesh_net::tls::Identity::load(&elsewhere.cert, &elsewhere.key).unwrap();
    let with_elsewhere = Connector::new(Some(&pki.ca), Some(identity)).unwrap();
    let mut rogue = raw::dial_tls(&servers_url, Some(SECRET), &with_elsewhere)
        .await
        .unwrap();
    raw::send_msg(&mut rogue, &register("wss://127.0.0.1:9")).await;
    let error = raw::expect_error::<v1::CoordinatorToServer>(&mut rogue).await;
    assert_eq!(error.error_code(), ErrorCode::Unauthenticated, "{error}");
    assert!(error.message.contains("does not name 127.0.0.1"), "{error}");
    // A certificate from another CA: the TLS handshake itself fails.
    let stranger = Pki::new("some other CA");
    let foreign = stranger.issue("foreign");
    let identity = relaymesh_net::tls::Identity::load(&foreign.cert, &foreign.key).unwrap();
    let with_foreign = Connector::new(Some(&pki.ca), Some(identity)).unwrap();
    let refused = raw::dial_tls(&servers_url, Some(SECRET), &with_foreign).await;
    assert!(
        refused.is_err(),
        "a foreign client certificate was accepted"
    );
    let stats = cluster.coordinator.stats().await;
    assert_eq!(stats["server_links_refused"], 2, "{stats}");
    // A valid certificate, but a plain ws:// URL: refused, its clients would be sent there in
    // the clear.
    let valid = pki.issue("valid");
    let identity = relaymesh_net::tls::Identity::load(&valid.cert, &valid.key).unwrap();
    let with_valid = Connector::new(Some(&pki.ca), Some(identity)).unwrap();
    let mut plain_url = raw::dial_tls(&servers_url, Some(SECRET), &with_valid)
        .await
        .unwrap();
    raw::send_msg(&mut plain_url, &register("ws://127.0.0.1:9")).await;
    let error = raw::expect_error::<v1::CoordinatorToServer>(&mut plain_url).await;
    assert_eq!(error.error_code(), ErrorCode::Unauthenticated, "{error}");
    assert!(error.message.contains("wss://"), "{error}");

    // Peers. A server registered with a valid certificate ("0-peer", a lower id than the
    // real server's, so it is the one to dial), known to the real server from the
    // coordinator...
    let server = &cluster.servers[0];
    let mut registered = raw::dial_tls(&servers_url, Some(SECRET), &with_valid)
        .await
        .unwrap();
    let mut peer_register = register("wss://127.0.0.1:9");
    if let Some(v1::server_to_coordinator::Kind::Register(r)) = &mut peer_register.kind {
        r.server_id = "0-peer".into();
    }
    raw::send_msg(&mut registered, &peer_register).await;
    let readyz = format!("{}/readyz", http_base(&server.url));
    eventually("the server knows of 0-peer", || async {
        let (_, body) = relaymesh_net::http::request_with(
            relaymesh_net::http::Method::GET,
            &readyz,
            &[],
            None,
            &server.tls,
            Duration::from_secs(5),
        )
        .await
        .ok()?;
        String::from_utf8_lossy(&body)
            .contains("0-peer")
            .then_some(())
    })
    .await;
    // ...dialing it without a certificate is refused at its hello, in words.
    let peers_url = format!("{}/v1/peers", server.url);
    let hello = v1::PeerMessage::hello(v1::PeerHello {
        protocol_version: PROTOCOL_VERSION,
        server_id: "0-peer".into(),
        ..Default::default()
    });
    let mut peer = raw::dial_tls(&peers_url, Some(SECRET), &pki.connector())
        .await
        .unwrap();
    raw::send_msg(&mut peer, &hello).await;
    let error = raw::expect_error::<v1::PeerMessage>(&mut peer).await;
    assert_eq!(error.error_code(), ErrorCode::Unauthenticated, "{error}");
    assert!(error.message.contains("client certificate"), "{error}");
    // With a certificate naming another host: refused too.
    let mut peer = raw::dial_tls(&peers_url, Some(SECRET), &with_elsewhere)
        .await
        .unwrap();
    raw::send_msg(&mut peer, &hello).await;
    let error = raw::expect_error::<v1::PeerMessage>(&mut peer).await;
    assert_eq!(error.error_code(), ErrorCode::Unauthenticated, "{error}");
    assert!(error.message.contains("does not name 127.0.0.1"), "{error}");
    assert_eq!(server.stat("peer_links_refused").await, 2);
    assert_eq!(server.stat("peers").await, 0);
}

#[tokio::test]
async fn the_admin_api_speaks_tls_and_takes_a_client_certificate_from_admin_ca_instead_of_the_token()
 {
    use relaymesh_proto::admin::ListServersRequest;
    use relaymesh_proto::admin::admin_client::AdminClient;
    use relaymesh_proto::admin_client::{AdminTls, connect};

    let pki = Pki::new("relaymesh test CA");
    let operators = Pki::new("operators CA");
    let mut coordinator = coordinator_config();
    coordinator.tls = pki.service(false);
    coordinator.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    coordinator.admin_token = "test-admin-token-0123456789".into();
    coordinator.admin_ca = Some(operators.ca.clone());
    let cluster =
        Cluster::start_full(1, coordinator, |server| server.tls = pki.service(false)).await;
    let addr = cluster.coordinator.admin_addr.unwrap();
    let url = format!("https://{addr}");
    let trusting = AdminTls {
        ca: Some(pki.ca.clone()),
        identity: None,
    };

    // Over TLS with neither token nor certificate: UNAUTHENTICATED.
    let mut admin = AdminClient::new(connect(&url, &trusting).await.unwrap());
    let refused = admin.list_servers(ListServersRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    // With the token: served.
    let mut request = tonic::Request::new(ListServersRequest {});
    request.metadata_mut().insert(
        "authorization",
        "Bearer test-admin-token-0123456789".parse().unwrap(),
    );
    let listed = admin.list_servers(request).await.unwrap().into_inner();
    assert_eq!(listed.servers.len(), 1);
    assert!(listed.servers[0].url.starts_with("wss://"));

    // An operator's certificate from `admin_ca`, no token: served.
    let operator = operators.issue("operator");
    let with_certificate = AdminTls {
        ca: Some(pki.ca.clone()),
        identity: Some((operator.cert.clone(), operator.key.clone())),
    };
    let mut admin = AdminClient::new(connect(&url, &with_certificate).await.unwrap());
    let listed = admin
        .list_servers(ListServersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.servers.len(), 1);

    // A certificate the cluster's CA signed (a comm server's) is no operator: the handshake
    // fails.
    let server_cert = pki.issue("a-server");
    let with_server_cert = AdminTls {
        ca: Some(pki.ca.clone()),
        identity: Some((server_cert.cert, server_cert.key)),
    };
    let refused = match connect(&url, &with_server_cert).await {
        Err(_) => true,
        Ok(channel) => AdminClient::new(channel)
            .list_servers(ListServersRequest {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate outside admin_ca authenticated an admin call"
    );

    // Trusting the wrong CA: no channel, and the error says TLS.
    let wrong = AdminTls {
        ca: Some(operators.ca.clone()),
        identity: None,
    };
    let refused = connect(&url, &wrong)
        .await
        .expect_err("an untrusted certificate");
    assert!(
        refused.to_string().contains("cannot reach the admin API"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_comm_servers_certificate_is_no_admin_credential() {
    use relaymesh_proto::admin::ListServersRequest;
    use relaymesh_proto::admin::admin_client::AdminClient;
    use relaymesh_proto::admin_client::{AdminTls, connect};

    // Mutual TLS between the servers, no `admin_ca`: the admin API takes the token only.
    let pki = Pki::new("relaymesh test CA");
    let mut coordinator = coordinator_config();
    coordinator.tls = pki.service(true);
    coordinator.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    coordinator.admin_token = "test-admin-token-0123456789".into();
    let cluster =
        Cluster::start_full(1, coordinator, |server| server.tls = pki.service(true)).await;
    let server_cert = pki.issue("a-server");
    let as_server = AdminTls {
        ca: Some(pki.ca.clone()),
        identity: Some((server_cert.cert, server_cert.key)),
    };
    let url = format!("https://{}", cluster.coordinator.admin_addr.unwrap());
    let mut admin = AdminClient::new(connect(&url, &as_server).await.unwrap());
    let refused = admin.list_servers(ListServersRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}
