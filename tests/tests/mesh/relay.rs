//! Logins through a comm server: a client dials `/v1/client` without a key and sends
//! `Login`; the server relays it to the coordinator, which keeps the client there when that
//! server is eligible, sends it on to another server (`redirect`) when not, or refuses it as
//! `POST /v1/login` would. The coordinator opens no connection for such a login.

use relaymesh_client::{Client, ClientError, Credentials, Event};
use relaymesh_proto::v1::{self, server_to_client::Kind};
use relaymesh_proto::{ErrorCode, PROTOCOL_VERSION, decode};
use relaymesh_tests::raw;
use relaymesh_tests::{
    Cluster, CoordinatorHandle, SECRET, TempAccounts, account_with_code, client_config,
    coordinator_config, eventually, get_json, next_message, post_json, within,
};

fn login(exclude: &[&str]) -> v1::ClientToServer {
    v1::ClientToServer::login(v1::Login {
        protocol_version: PROTOCOL_VERSION,
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn attach() -> v1::ClientToServer {
    v1::ClientToServer::attach(v1::Attach {
        protocol_version: PROTOCOL_VERSION,
    })
}

async fn next(socket: &mut relaymesh_net::ws::ClientSocket) -> Option<Kind> {
    let frame = raw::next_frame(socket).await?;
    decode::<v1::ServerToClient>(frame).unwrap().kind
}

#[tokio::test]
async fn a_client_logs_in_through_a_server_and_stays_there() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (&cluster.servers[0], &cluster.servers[1]);
    // Login, Attach and a subscription in one go, as the client library sends them.
    let mut socket = raw::dial(&format!("{}/v1/client", a.url), None).await;
    raw::send_msg(&mut socket, &login(&[])).await;
    raw::send_msg(&mut socket, &attach()).await;
    raw::send_msg(
        &mut socket,
        &v1::ClientToServer::subscribe(v1::Subscribe {
            request_id: 1,
            topics: vec!["relay/t".into()],
            recover: Vec::new(),
        }),
    )
    .await;
    let Some(Kind::Ready(ready)) = next(&mut socket).await else {
        panic!("no Ready");
    };
    assert_eq!(ready.server_id, a.id);
    assert!(!ready.alias.is_empty());
    // It lists the cluster's servers, itself first, for the next login.
    let listed: Vec<&str> = ready.servers.iter().map(|s| s.server_id.as_str()).collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0], a.id);
    assert!(listed.contains(&b.id.as_str()), "{listed:?}");
    assert_eq!(ready.servers[0].url, a.url);
    let Some(Kind::Ack(ack)) = next(&mut socket).await else {
        panic!("no Ack");
    };
    assert_eq!(ack.request_id, 1);

    // The session is a session like any other: it gets what is published anywhere.
    let publisher = cluster.client_on(1).await;
    publisher.publish("relay/t", "hello").await.unwrap();
    let Some(Kind::Message(m)) = next(&mut socket).await else {
        panic!("no message");
    };
    assert_eq!(&m.payload[..], b"hello");

    assert_eq!(a.stat("relayed_logins").await, 1);
    assert_eq!(a.stat("clients").await, 1);
    // The coordinator answered with the identity: no key was reserved here for it.
    assert_eq!(a.stat("keys_reserved").await, 0);
    let coordinator = cluster.coordinator.stats().await;
    assert_eq!(coordinator["logins_relayed"], 1, "{coordinator}");
    // The publisher's login, over HTTP, and the relayed one.
    assert_eq!(coordinator["logins"], 2, "{coordinator}");
    socket.close(None).await.ok();
    publisher.close().await;
}

#[tokio::test]
async fn a_login_the_coordinator_places_elsewhere_is_redirected_with_a_key_there() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (&cluster.servers[0], &cluster.servers[1]);
    let mut socket = raw::dial(&format!("{}/v1/client", a.url), None).await;
    // Excluding the server it dialled, as a client moving off it would.
    raw::send_msg(&mut socket, &login(&[&a.id])).await;
    raw::send_msg(&mut socket, &attach()).await;
    let Some(Kind::Redirect(offer)) = next(&mut socket).await else {
        panic!("no redirect");
    };
    assert_eq!(offer.server_id, b.id);
    assert!(raw::closed_within(&mut socket, std::time::Duration::from_secs(5)).await);
    let mut there = raw::dial(&format!("{}?key={}", offer.url, offer.key), None).await;
    raw::send_msg(&mut there, &attach()).await;
    let Some(Kind::Ready(ready)) = next(&mut there).await else {
        panic!("no Ready at the server redirected to");
    };
    assert_eq!(ready.server_id, b.id);
    assert_eq!(a.stat("relayed_logins_redirected").await, 1);
    assert_eq!(a.stat("clients").await, 0);
    assert_eq!(b.stat("clients").await, 1);
    there.close(None).await.ok();
}

#[tokio::test]
async fn a_client_logging_in_through_a_full_server_ends_on_one_with_room() {
    let cluster = Cluster::start_with(2, |c| c.max_clients = 1).await;
    let (a, b) = (&cluster.servers[0], &cluster.servers[1]);
    let first = cluster.client_on(0).await;
    assert_eq!(a.stat("clients").await, 1);
    // The full server turns the keyless connection away before the upgrade; the library
    // logs in with the coordinator instead, which places it where there is room.
    let mut config = client_config(&cluster.coordinator.url);
    config.login_servers = vec![a.url.clone()];
    let client = Client::connect(config).await.unwrap();
    assert_eq!(client.server_id(), b.id);
    assert_eq!(a.stat("clients").await, 1);
    assert_eq!(b.stat("clients").await, 1);
    client.close().await;
    first.close().await;
}

#[tokio::test]
async fn refused_credentials_are_the_coordinators_answer_and_nothing_else_breaks() {
    let accounts = TempAccounts::new(vec![account_with_code("acme", "s3cret")]);
    let cluster = Cluster::start_configured(2, accounts.coordinator_config()).await;
    let a = &cluster.servers[0];
    let code = |code: &str| Credentials::AccessCode {
        account: "acme".into(),
        code: code.into(),
        role: String::new(),
        group: String::new(),
    };
    let (bad, good) = (code("wrong"), code("s3cret"));
    let mut config = client_config(&cluster.coordinator.url);
    config.login_servers = vec![a.url.clone()];
    config.credentials = bad;
    let Err(refused) = Client::connect(config.clone()).await else {
        panic!("bad credentials let in");
    };
    assert!(
        matches!(&refused, ClientError::Refused(e) if e.error_code() == ErrorCode::BadCredentials),
        "{refused}"
    );
    // Refused once, through the server: the client did not ask the coordinator again.
    let coordinator = cluster.coordinator.stats().await;
    assert_eq!(coordinator["logins_refused"], 1, "{coordinator}");
    assert_eq!(coordinator["logins_relayed"], 1, "{coordinator}");
    assert_eq!(a.stat("relayed_logins_failed").await, 1);

    // Bad input on a keyless connection: an error and a close, and the server goes on.
    let mut wrong_first = raw::dial(&format!("{}/v1/client", a.url), None).await;
    raw::send_msg(&mut wrong_first, &attach()).await;
    assert_eq!(
        raw::expect_client_error(&mut wrong_first).await,
        ErrorCode::UnexpectedMessage
    );
    let mut garbage = raw::dial(&format!("{}/v1/client", a.url), None).await;
    raw::send(&mut garbage, &b"\xff\xff\xff"[..]).await;
    assert_eq!(
        raw::expect_client_error(&mut garbage).await,
        ErrorCode::BadFrame
    );
    let mut old = raw::dial(&format!("{}/v1/client", a.url), None).await;
    raw::send_msg(
        &mut old,
        &v1::ClientToServer::login(v1::Login {
            protocol_version: 99,
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        raw::expect_client_error(&mut old).await,
        ErrorCode::UnsupportedVersion
    );

    config.credentials = good;
    let client = Client::connect(config).await.unwrap();
    assert_eq!(client.server_id(), a.id);
    assert_eq!(a.stat("relayed_logins").await, 1);
    client.close().await;
}

#[tokio::test]
async fn logins_in_flight_are_bounded_and_a_client_over_the_bound_asks_the_coordinator() {
    let cluster = Cluster::start_with(2, |c| {
        c.max_logins_in_flight = 1;
        // The silent connection below holds its place until this runs out.
        c.handshake_timeout_ms = 60_000;
    })
    .await;
    let a = &cluster.servers[0];
    // A connection that never sends its Login holds the one place.
    let _silent = raw::dial(&format!("{}/v1/client", a.url), None).await;
    let over = relaymesh_net::ws::dial(
        &format!("{}/v1/client", a.url),
        None,
        &relaymesh_net::ws::WsLimits::default(),
        std::time::Duration::from_secs(5),
    )
    .await;
    match over {
        Err(relaymesh_net::ws::DialError::Refused {
            status,
            message: Some((code, _)),
            ..
        }) => assert_eq!((status.as_u16(), code), (503, ErrorCode::Unavailable)),
        Err(e) => panic!("expected a 503 refusal, got {e}"),
        Ok(_) => panic!("a second login in flight was let in"),
    }
    assert_eq!(a.stat("relayed_logins_refused").await, 1);
    // The client library falls back to the coordinator.
    let mut config = client_config(&cluster.coordinator.url);
    config.login_servers = vec![a.url.clone()];
    let client = Client::connect(config).await.unwrap();
    assert_eq!(a.stat("relayed_logins_refused").await, 2);
    let coordinator = cluster.coordinator.stats().await;
    assert_eq!(coordinator["logins_relayed"], 0, "{coordinator}");
    assert_eq!(coordinator["logins"], 1, "{coordinator}");
    client.close().await;
}

#[tokio::test]
async fn a_client_that_loses_its_server_logs_in_again_through_another() {
    let mut cluster = Cluster::start(3).await;
    let mut client = cluster.client_on(0).await;
    client.subscribe(["relay/back"]).await.unwrap();
    let before = cluster.coordinator.stats().await;
    assert_eq!(before["logins_relayed"], 0, "{before}");
    cluster.servers.remove(0).stop().await;
    let back = within("the client reconnects", async {
        loop {
            if let Event::Reconnected { server_id, .. } = client.next_event().await.unwrap() {
                return server_id;
            }
        }
    })
    .await;
    // Through a server: the coordinator relayed the login and gave no key over HTTP.
    let after = cluster.coordinator.stats().await;
    assert_eq!(after["logins_relayed"], 1, "{after}");
    assert_eq!(
        after["logins"].as_u64().unwrap(),
        before["logins"].as_u64().unwrap() + 1,
        "{after}"
    );
    let server = cluster.servers.iter().find(|s| s.id == back).unwrap();
    eventually("the login is counted where the client is", || async {
        (server.stat("relayed_logins").await == 1).then_some(())
    })
    .await;
    // And its subscription is back.
    let publisher = cluster.client_on(0).await;
    publisher.publish("relay/back", "again").await.unwrap();
    assert_eq!(&next_message(&mut client).await.payload[..], b"again");
    publisher.close().await;
    client.close().await;
}

/// The next frame of a raw server link that is not a ping or the directory, decoded.
async fn from_coordinator(
    link: &mut relaymesh_net::ws::ClientSocket,
) -> v1::coordinator_to_server::Kind {
    use v1::coordinator_to_server::Kind as K;
    loop {
        let frame = raw::next_frame(link).await.expect("the link stays up");
        match decode::<v1::CoordinatorToServer>(frame).unwrap().kind {
            // Answered, as a server would: a link silent past the heartbeat timeout is closed.
            Some(K::Ping(ping)) => {
                let pong = v1::Pong { nonce: ping.nonce };
                raw::send_msg(link, &v1::ServerToCoordinator::pong(pong)).await;
            }
            Some(K::Presence(_)) => continue,
            Some(kind) => return kind,
            None => panic!("an empty message"),
        }
    }
}

#[tokio::test]
async fn the_coordinator_gives_a_relayed_login_up_before_its_server_stops_waiting() {
    use v1::coordinator_to_server::Kind as K;
    let coordinator = CoordinatorHandle::start(coordinator_config()).await;
    let mut link = raw::dial(&format!("{}/v1/servers", coordinator.url), Some(SECRET)).await;
    raw::send_msg(
        &mut link,
        &v1::ServerToCoordinator::register(v1::Register {
            protocol_version: PROTOCOL_VERSION,
            server_id: "slow".into(),
            public_url: "ws://127.0.0.1:9".into(),
            capacity: 10,
            version: "test".into(),
            ..Default::default()
        }),
    )
    .await;
    let K::Registered(registered) = from_coordinator(&mut link).await else {
        panic!("not registered");
    };
    assert!(
        registered.relays_logins,
        "a comm server may relay logins here"
    );
    // As a comm server from before identity answers relays (`takes_identity` unset): a key
    // is reserved on it first.
    let relayed_as = |request_id, from: &str, takes_identity| {
        v1::ServerToCoordinator::relayed_login(v1::RelayedLogin {
            request_id,
            login: Some(v1::Login {
                protocol_version: PROTOCOL_VERSION,
                ..Default::default()
            }),
            from: from.into(),
            within_ms: 400,
            takes_identity,
        })
    };
    let relayed = |request_id, from: &str| relayed_as(request_id, from, false);
    // A login for this server, which never answers the reservation: given up at three
    // quarters of the 400 ms the server waits, with nothing reserved or replaced.
    raw::send_msg(&mut link, &relayed(7, "127.0.0.1")).await;
    let K::Reserve(reserve) = from_coordinator(&mut link).await else {
        panic!("no reservation on the relaying server");
    };
    assert!(!reserve.identity.unwrap().alias.is_empty());
    let K::RelayedLoginAnswer(answer) = from_coordinator(&mut link).await else {
        panic!("no answer");
    };
    assert_eq!(answer.request_id, 7);
    assert!(answer.offer.is_none());
    let e = answer.error.expect("an error");
    assert_eq!(e.error_code(), ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("300 ms"), "{e}");
    // A relaying server's word on the client's address must be an address.
    raw::send_msg(&mut link, &relayed(8, "somewhere")).await;
    let K::RelayedLoginAnswer(answer) = from_coordinator(&mut link).await else {
        panic!("no answer");
    };
    assert_eq!(answer.request_id, 8);
    assert_eq!(
        answer.error.expect("an error").error_code(),
        ErrorCode::BadFrame
    );
    let stats = coordinator.stats().await;
    assert_eq!(stats["logins_relayed"], 2, "{stats}");
    assert_eq!(stats["logins"], 0, "{stats}");
    // A server that takes the identity itself is answered with it: no reservation comes
    // first (the next frame is the answer), and the login counts.
    raw::send_msg(&mut link, &relayed_as(9, "127.0.0.1", true)).await;
    let K::RelayedLoginAnswer(answer) = from_coordinator(&mut link).await else {
        panic!("a reservation before the answer");
    };
    assert_eq!(answer.request_id, 9);
    assert!(
        answer.offer.is_none() && answer.error.is_none(),
        "{answer:?}"
    );
    assert!(!answer.identity.expect("the identity").alias.is_empty());
    let stats = coordinator.stats().await;
    assert_eq!(stats["logins_relayed"], 3, "{stats}");
    assert_eq!(stats["logins"], 1, "{stats}");
}

/// Raw server links registered with `coordinator` under `ids`, in order.
async fn registered<const N: usize>(
    coordinator: &CoordinatorHandle,
    ids: [&str; N],
) -> Vec<relaymesh_net::ws::ClientSocket> {
    use v1::coordinator_to_server::Kind as K;
    let mut links = Vec::new();
    for id in ids {
        let mut link = raw::dial(&format!("{}/v1/servers", coordinator.url), Some(SECRET)).await;
        raw::send_msg(
            &mut link,
            &v1::ServerToCoordinator::register(v1::Register {
                protocol_version: PROTOCOL_VERSION,
                server_id: id.into(),
                public_url: format!("ws://{id}.invalid:9"),
                capacity: 10,
                version: "test".into(),
                unreserves: true,
            }),
        )
        .await;
        let K::Registered(_) = from_coordinator(&mut link).await else {
            panic!("{id} not registered");
        };
        links.push(link);
    }
    links
}

/// Answers reservation `request_id` on a raw server link with `key` (valid for 10 s).
async fn answer_reserved(link: &mut relaymesh_net::ws::ClientSocket, request_id: u64, key: &str) {
    let reserved = v1::Reserved {
        request_id,
        key: key.into(),
        expires_in_ms: 10_000,
    };
    raw::send_msg(link, &v1::ServerToCoordinator::reserved(reserved)).await;
}

/// The next reservation on a raw server link (a server hears those that register after it
/// join first, and those the coordinator loses leave: a frozen one, on a slow run).
async fn reserve(link: &mut relaymesh_net::ws::ClientSocket) -> v1::Reserve {
    use v1::coordinator_to_server::Kind as K;
    loop {
        match from_coordinator(link).await {
            K::PeerJoined(_) | K::PeerLeft(_) => continue,
            K::Reserve(reserve) => return reserve,
            other => panic!("not a reservation: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_reservation_left_unanswered_is_raced_on_another_server() {
    // Without the race the login would wait the whole reservation timeout for the server it
    // was placed on, which stays mute, and only then be reserved on the other.
    let coordinator = CoordinatorHandle::start(coordinator::Config {
        reserve_timeout_ms: 60_000,
        reserve_hedge_ms: 50,
        ..coordinator_config()
    })
    .await;
    let mut links = registered(&coordinator, ["first", "second"]).await;
    let mut second = links.pop().unwrap();
    let mut first = links.pop().unwrap();
    let url = format!("{}/v1/login", coordinator.url);
    let login = tokio::spawn(async move { post_json(&url, &serde_json::json!({})).await });
    // Whichever server is picked stays mute; the other is asked too, and answers.
    let (mute, asked) = tokio::select! {
        asked = reserve(&mut first) => ("first", asked),
        asked = reserve(&mut second) => ("second", asked),
    };
    let (mute_link, quick) = if mute == "first" {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    let raced = reserve(quick).await;
    assert_eq!(
        raced.identity, asked.identity,
        "both reserve for the same client"
    );
    answer_reserved(quick, raced.request_id, "quick-key").await;
    let (status, body) = within("the login", login).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["server_id"], mute, "{body}");
    assert_eq!(body["key"], "quick-key", "{body}");
    // The mute server answers at last: the key it reserved, for a login placed elsewhere, is
    // taken back rather than left to count against its room until it expires.
    answer_reserved(mute_link, asked.request_id, "late-key").await;
    let v1::coordinator_to_server::Kind::Unreserve(back) = from_coordinator(mute_link).await else {
        panic!("the late key was not taken back");
    };
    assert_eq!(
        (back.request_id, back.key.as_str()),
        (asked.request_id, "late-key")
    );
    let stats = coordinator.stats().await;
    assert_eq!(stats["reservations_hedged"], 1, "{stats}");
    assert_eq!(stats["reservations_failed"], 0, "{stats}");
    assert_eq!(stats["keys_unreserved"], 1, "{stats}");
}

/// A comm server (a real process) frozen while a login is reserved on it loses the race to
/// another server; once it thaws and answers, the coordinator takes the key back and the
/// server frees its room at once instead of holding the key to its expiry.
#[tokio::test]
async fn a_frozen_server_that_loses_a_race_frees_the_key_once_it_answers() {
    let coordinator = CoordinatorHandle::start(coordinator_config()).await;
    // Started off the runtime, which the coordinator needs while the process registers.
    let coordinator_url = coordinator.url.clone();
    let real =
        tokio::task::spawn_blocking(move || super::processes::commservers(&coordinator_url, 1))
            .await
            .unwrap()
            .remove(0);
    let [mut other] = <[_; 1]>::try_from(registered(&coordinator, ["other"]).await).unwrap();
    let url = format!("{}/v1/login", coordinator.url);
    // The login goes to either server at random: frozen, the real one is raced on the other.
    for attempt in 0.. {
        assert!(attempt < 30, "the real server was never picked first");
        real.proc.send_signal("STOP");
        let url = url.clone();
        let login = tokio::spawn(async move { post_json(&url, &serde_json::json!({})).await });
        let asked = reserve(&mut other).await;
        answer_reserved(
            &mut other,
            asked.request_id,
            &format!("other-key-{attempt}"),
        )
        .await;
        let (status, body) = within("the login", login).await.unwrap();
        real.proc.send_signal("CONT");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["server_id"], "other", "{body}");
        if coordinator.stats().await["reservations_hedged"] == 1 {
            break;
        }
    }
    let stats_url = real.stats_url();
    eventually("the real server's late key taken back", || async {
        let stats = get_json(&stats_url).await;
        (stats["keys_unreserved"] == 1 && stats["keys_pending"] == 0).then_some(())
    })
    .await;
    let stats = get_json(&stats_url).await;
    assert_eq!(stats["keys_reserved"], 1, "{stats}");
    assert_eq!(coordinator.stats().await["keys_unreserved"], 1);
}

#[tokio::test]
async fn a_server_the_client_asked_for_is_waited_for_not_raced() {
    let coordinator = CoordinatorHandle::start(coordinator::Config {
        reserve_timeout_ms: 1_000,
        reserve_hedge_ms: 20,
        ..coordinator_config()
    })
    .await;
    let mut links = registered(&coordinator, ["asked", "other"]).await;
    let mut other = links.pop().unwrap();
    let _asked = links.pop().unwrap();
    let url = format!("{}/v1/login", coordinator.url);
    let login = tokio::spawn(async move {
        post_json(&url, &serde_json::json!({"preferred_server": "asked"})).await
    });
    // The server asked for never answers: the login waits its whole reservation timeout
    // there, and only then is reserved on the other.
    let reserve = reserve(&mut other).await;
    answer_reserved(&mut other, reserve.request_id, "other-key").await;
    let (status, body) = within("the login", login).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_id"], "other", "{body}");
    let stats = coordinator.stats().await;
    assert_eq!(stats["reservations_hedged"], 0, "{stats}");
    assert_eq!(stats["reservations_failed"], 1, "{stats}");
}

/// A comm server with one set-up place takes client after client, with a key and relayed:
/// each session gives its place up once it has started. Were it kept (the set-up timeout
/// here is ten minutes), the next client's connection would wait for it and be refused `503`.
#[tokio::test]
async fn each_session_gives_its_set_up_place_up_once_it_has_started() {
    let cluster = Cluster::start_with(1, |c| {
        c.max_setups = 1;
        c.setup_timeout_ms = 600_000;
        c.request_timeout_ms = 2_000;
    })
    .await;
    let a = &cluster.servers[0];
    let mut clients = Vec::new();
    for relayed in [false, true, false, true] {
        let mut config = client_config(&cluster.coordinator.url);
        if relayed {
            config.login_servers = vec![a.url.clone()];
        }
        let client = within("a client connects", Client::connect(config)).await;
        clients.push(client.unwrap());
    }
    assert_eq!(a.stat("clients").await, 4);
    let stats = a.stats().await;
    assert_eq!(stats["setups_refused"], 0, "{stats}");
    assert_eq!(stats["setups_waiting"], 0, "{stats}");
    let coordinator = cluster.coordinator.stats().await;
    assert_eq!(coordinator["logins_relayed"], 2, "{coordinator}");
    for client in clients {
        client.close().await;
    }
}
