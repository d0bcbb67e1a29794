//! The `sql` account store on real databases: a SQLite file and a PostgreSQL server
//! (`RELAYMESH_TEST_POSTGRES_URL`, which `scripts/test.sh` provides with a throwaway server).
//! The same checks run on both: migrations on first connect (and again, harmlessly), accounts
//! managed through the admin commands, and logins refused with the right code.

#![allow(clippy::unwrap_used, missing_docs)]

use coordinator::accounts::{Login, LoginError, Store, StoreError};
use coordinator::admin::{AdminCommand, Backend};
use coordinator::inbox::InboxLimits;
use coordinator::nodes::{NodeError, NodeFields};
use coordinator::sql::{ExpiredMessage, SqlStore};
use relaymesh_proto::v1::ErrorCode;
use sqlx::Connection as _;

fn login(account: &str, code: &str, role: &str, group: &str) -> Login {
    Login::Code {
        account: account.into(),
        code: code.into(),
        role: role.into(),
        group: group.into(),
    }
}

async fn admin(db: &SqlStore, command: AdminCommand) -> String {
    Backend::Sql(db.clone()).run(command).await.unwrap()
}

fn named(name: &str) -> String {
    name.to_owned()
}

async fn exercise(url: &str) {
    let db = SqlStore::connect(url).await.unwrap();
    let create = |isolate_groups| AdminCommand::Create {
        name: named("acme"),
        isolate_groups,
    };
    admin(&db, create(true)).await;
    let code = admin(
        &db,
        AdminCommand::AddCode {
            name: named("acme"),
            id: Some(named("main")),
            groups: vec![named("g1")],
        },
    )
    .await;
    let code = code.trim();
    admin(
        &db,
        AdminCommand::SetRole {
            name: named("acme"),
            role: named("agent"),
            publish: vec![named("telemetry/#")],
            subscribe: vec![named("command/+")],
        },
    )
    .await;
    let duplicate = Backend::Sql(db.clone()).run(create(false)).await;
    let duplicate = duplicate.unwrap_err();
    assert!(matches!(&duplicate, StoreError::AccountExists(name) if name == "acme"));
    assert_eq!(duplicate.to_string(), r#"account "acme" already exists"#);

    // Connecting again runs the migrations again: nothing to do, nothing lost.
    let store = Store::Sql(SqlStore::connect(url).await.unwrap());
    let grant = store
        .check(login("acme", code, "agent", "g1"))
        .await
        .unwrap();
    assert_eq!(grant.scope, "acme#g1");
    assert_eq!(grant.rules.unwrap().subscribe, ["command/+"]);
    // The code is bound to group g1: another group's topics are out of its reach.
    assert_eq!(
        store.check(login("acme", code, "agent", "g2")).await,
        Err(LoginError::GroupNotPermitted(named("g2")))
    );
    assert_eq!(
        store.check(login("acme", code, "gcs", "g1")).await,
        Err(LoginError::RoleNotPermitted {
            account: named("acme"),
            role: named("gcs")
        })
    );
    assert_eq!(
        store.check(login("nobody", code, "", "")).await,
        Err(LoginError::UnknownAccount(named("nobody")))
    );
    admin(
        &db,
        AdminCommand::Disable {
            name: named("acme"),
        },
    )
    .await;
    assert_eq!(
        store.check(login("acme", code, "agent", "g1")).await,
        Err(LoginError::Disabled(named("acme")))
    );
    admin(
        &db,
        AdminCommand::Enable {
            name: named("acme"),
        },
    )
    .await;
    admin(
        &db,
        AdminCommand::RevokeCode {
            name: named("acme"),
            id: named("main"),
        },
    )
    .await;
    assert_eq!(
        store.check(login("acme", code, "agent", "g1")).await,
        Err(LoginError::BadCode(named("acme")))
    );
    let missing = Backend::Sql(db.clone())
        .run(AdminCommand::RevokeCode {
            name: named("acme"),
            id: named("nope"),
        })
        .await;
    let missing = missing.unwrap_err();
    assert!(matches!(&missing, StoreError::NoEntry { what: "code", id, .. } if id == "nope"));
    assert_eq!(missing.to_string(), r#"account "acme" has no code "nope""#);
    nodes(&db, &store).await;
    inbox(&db).await;
    let listed = admin(&db, AdminCommand::List).await;
    assert!(
        listed.contains("main (revoked)") && listed.contains("agent [publish telemetry/#"),
        "{listed}"
    );
    db.close().await;
    if let Store::Sql(db) = store {
        db.close().await;
    }
}

/// Nodes: registered with a token whose hash alone is stored, logged in with it (as the
/// registering role and group), updated, listed and revoked.
async fn nodes(db: &SqlStore, store: &Store) {
    let registrar = relaymesh_proto::v1::Identity {
        account: named("acme"),
        role: named("agent"),
        groups: vec![named("g1")],
        ..Default::default()
    };
    let fields = |name: &str| NodeFields {
        name: named(name),
        location: named("bay 3"),
        info: r#"{"model": "x4"}"#.into(),
    };
    let (id, token) = store
        .register_node(&registrar, fields("drone 1"))
        .await
        .unwrap();
    assert_eq!(relaymesh_proto::node::check_id(&id), Ok(()));
    let grant = store
        .check(Login::NodeToken {
            token: token.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        (
            grant.node_id.as_str(),
            grant.node_name.as_str(),
            grant.role.as_str()
        ),
        (id.as_str(), "drone 1", "agent")
    );
    assert_eq!(grant.scope, "acme#g1");
    let me = relaymesh_proto::v1::Identity {
        node_id: id.clone(),
        ..registrar.clone()
    };
    store.update_node(&me, fields("drone 1b")).await.unwrap();
    let listed = admin(
        db,
        AdminCommand::Nodes {
            name: named("acme"),
        },
    )
    .await;
    assert!(
        listed.contains(&id) && listed.contains("drone 1b") && listed.contains("model"),
        "{listed}"
    );
    let secret = token.split_once('.').unwrap().1;
    assert!(!listed.contains(secret));
    let forged = format!("{id}.{}", "0".repeat(64));
    for bad in [forged.as_str(), "garbage", ""] {
        assert_eq!(
            store.check(Login::NodeToken { token: bad.into() }).await,
            Err(LoginError::BadToken)
        );
    }
    admin(
        db,
        AdminCommand::RevokeNode {
            name: named("acme"),
            id: id.clone(),
        },
    )
    .await;
    assert_eq!(
        store.check(Login::NodeToken { token }).await,
        Err(LoginError::BadToken)
    );
    assert!(matches!(
        store.update_node(&me, fields("again")).await,
        Err(NodeError::Unknown(_))
    ));
}

/// The inbox: stored within a node's limits and for its scope only, read back byte for byte
/// in order, deleted when acknowledged or expired.
async fn inbox(db: &SqlStore) {
    let registrar = relaymesh_proto::v1::Identity {
        account: named("acme"),
        scope: named("acme#g1"),
        groups: vec![named("g1")],
        ..Default::default()
    };
    let store = Store::Sql(db.clone());
    let (node, _) = store
        .register_node(&registrar, NodeFields::default())
        .await
        .unwrap();
    let put = |payload: &[u8], scope: &str| relaymesh_proto::v1::InboxPut {
        scope: named(scope),
        to_node: node.clone(),
        from_node: named("f00d"),
        from_alias: named("a1-2"),
        seq: 7,
        payload: payload.to_vec().into(),
        ..Default::default()
    };
    let first = put(&[0, 255, 1, 0], "acme#g1");
    let second = put(b"second", "acme#g1");
    let third = put(b"third", "acme#g1");
    let elsewhere = put(b"x", "acme");
    let limits = InboxLimits {
        max_messages: 2,
        max_bytes: 1 << 20,
    };
    // Ids count per node, and a refused message takes none.
    let outcomes = db
        .inbox_commit(&[], &[&first, &elsewhere, &second, &third], limits, 1_000)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Ok(1),
            Err(ErrorCode::UnknownNode),
            Ok(2),
            Err(ErrorCode::InboxFull)
        ]
    );
    let read = db.inbox_fetch(&node, 0, 10).await.unwrap();
    let got: Vec<(u64, &[u8])> = read.iter().map(|m| (m.id, &m.payload[..])).collect();
    assert_eq!(got, [(1, &[0, 255, 1, 0][..]), (2, &b"second"[..])]);
    assert_eq!((read[0].from_alias.as_str(), read[0].seq), ("a1-2", 7));
    db.inbox_commit(&[(node.clone(), 1)], &[], limits, 2_000)
        .await
        .unwrap();
    assert_eq!(db.inbox_count(&node).await.unwrap(), 1);
    // What was acknowledged no longer counts against the limit, and ids go on from the last
    // one given, not the last one kept.
    let fourth = put(b"fourth", "acme#g1");
    // Sent again after its sender's connection was lost: numbered under its first alias.
    let fifth = relaymesh_proto::v1::InboxPut {
        resent_from: named("a0-1"),
        seq: 3,
        ..put(b"fifth", "acme#g1")
    };
    let outcomes = db
        .inbox_commit(&[], &[&fourth, &fifth], limits, 3_000)
        .await
        .unwrap();
    assert_eq!(outcomes, [Ok(3), Err(ErrorCode::InboxFull)]);
    assert_eq!(db.inbox_expire(500, 10).await.unwrap(), []);
    // What expires comes back with what its sender is told, and the recipient's scope.
    assert_eq!(
        db.inbox_expire(2_001, 10).await.unwrap(),
        [ExpiredMessage {
            scope: "acme#g1".into(),
            from_node: "f00d".into(),
            message: relaymesh_proto::v1::Expired {
                to_node: node.clone(),
                inbox_id: 2,
                seq: 7,
                publisher: "a1-2".into(),
                stored_ms: 1_000,
            },
        }]
    );
    assert_eq!(db.inbox_count(&node).await.unwrap(), 1);
    // Expired messages no longer count either; acknowledging and storing in one commit.
    let outcomes = db
        .inbox_commit(&[(node.clone(), 3)], &[&fifth, &fourth], limits, 4_000)
        .await
        .unwrap();
    assert_eq!(outcomes, [Ok(4), Ok(5)]);
    // At most `limit` at a time.
    let mut expired = db.inbox_expire(u64::MAX >> 2, 1).await.unwrap();
    assert_eq!(expired.len(), 1);
    expired.extend(db.inbox_expire(u64::MAX >> 2, 1).await.unwrap());
    expired.sort_by_key(|e| e.message.inbox_id);
    let told: Vec<(u64, u64, &str)> = expired
        .iter()
        .map(|e| {
            (
                e.message.inbox_id,
                e.message.seq,
                e.message.publisher.as_str(),
            )
        })
        .collect();
    assert_eq!(told, [(4, 3, "a0-1"), (5, 7, "a1-2")]);
    assert_eq!(db.inbox_expire(u64::MAX >> 2, 1).await.unwrap(), []);
    assert_eq!(db.inbox_count(&node).await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_store_is_created_migrated_and_checked() {
    let path = std::env::temp_dir().join(format!("relaymesh-accounts-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    exercise(&format!("sqlite://{}", path.display())).await;
    assert!(path.exists());
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn postgres_store_is_migrated_and_checked() {
    let (url, mut server, name) = postgres_database("store").await;
    exercise(&url).await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut server)
        .await
        .unwrap();
}

/// A database of its own on the test PostgreSQL server: (its URL, a connection to drop it
/// with, its name).
async fn postgres_database(tag: &str) -> (String, sqlx::PgConnection, String) {
    let Ok(base) = std::env::var("RELAYMESH_TEST_POSTGRES_URL") else {
        panic!(
            "RELAYMESH_TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh, which \
             starts a throwaway PostgreSQL server"
        );
    };
    let name = format!("relaymesh_test_{tag}_{}", std::process::id());
    let mut server = sqlx::PgConnection::connect(&base).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&sql).execute(&mut server).await.unwrap();
    }
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("RELAYMESH_TEST_POSTGRES_URL has no database part: {base}"),
    };
    (url, server, name)
}

/// Two coordinators on one PostgreSQL database store direct messages for the same nodes at the
/// same time: each node's ids are 1, 2, 3... with no gap and no repeat, each writer's ids grow
/// in its own commit order, and the inbox limit holds exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_sharing_postgres_number_each_inbox_once_in_commit_order() {
    let (url, mut server, name) = postgres_database("two").await;
    // Both migrate at once, as two coordinators starting together do.
    let (a, b) = tokio::join!(SqlStore::connect(&url), SqlStore::connect(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    admin(
        &a,
        AdminCommand::Create {
            name: named("acme"),
            isolate_groups: false,
        },
    )
    .await;
    let registrar = relaymesh_proto::v1::Identity {
        account: named("acme"),
        scope: named("acme"),
        ..Default::default()
    };
    let store = Store::Sql(a.clone());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (id, _) = store
            .register_node(&registrar, NodeFields::default())
            .await
            .unwrap();
        nodes.push(id);
    }
    const LIMIT: u64 = 900;
    let limits = InboxLimits {
        max_messages: LIMIT,
        max_bytes: 1 << 30,
    };
    // Each writer: 50 commits of 20 messages, alternating between the two nodes (1000 per
    // node in all, 100 more than the limit).
    let write = |db: SqlStore, writer: &'static str, nodes: Vec<String>| async move {
        let mut got: Vec<(String, Result<u64, ErrorCode>)> = Vec::new();
        for commit in 0..50 {
            let puts: Vec<relaymesh_proto::v1::InboxPut> = (0..20)
                .map(|i| relaymesh_proto::v1::InboxPut {
                    scope: named("acme"),
                    to_node: nodes[i % 2].clone(),
                    from_alias: named(writer),
                    seq: (commit * 20 + i) as u64,
                    payload: vec![1u8; 16].into(),
                    ..Default::default()
                })
                .collect();
            let rows: Vec<&relaymesh_proto::v1::InboxPut> = puts.iter().collect();
            let outcomes = db.inbox_commit(&[], &rows, limits, 1_000).await.unwrap();
            got.extend(puts.iter().map(|p| p.to_node.clone()).zip(outcomes));
        }
        got
    };
    let (from_a, from_b) = tokio::join!(
        tokio::spawn(write(a.clone(), "a", nodes.clone())),
        tokio::spawn(write(b.clone(), "b", nodes.clone()))
    );
    let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
    for node in &nodes {
        let mut ids = Vec::new();
        let mut refused = 0;
        for got in [&from_a, &from_b] {
            let mine: Vec<u64> = got
                .iter()
                .filter(|(n, _)| n == node)
                .filter_map(|(_, outcome)| match outcome {
                    Ok(id) => Some(*id),
                    Err(code) => {
                        assert_eq!(*code, ErrorCode::InboxFull);
                        refused += 1;
                        None
                    }
                })
                .collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "a writer's ids for one node grow in its commit order"
            );
            ids.extend(mine);
        }
        ids.sort_unstable();
        assert_eq!(
            ids,
            (1..=LIMIT).collect::<Vec<_>>(),
            "ids 1..={LIMIT}, once each"
        );
        assert_eq!(refused, 1_000 - LIMIT);
        assert_eq!(b.inbox_count(node).await.unwrap(), LIMIT);
        let mut read = Vec::new();
        let mut after = 0;
        loop {
            let page = a.inbox_fetch(node, after, 256).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.id;
            read.extend(page.iter().map(|m| m.id));
        }
        assert_eq!(read, ids, "read back in id order");
    }
    a.close().await;
    b.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut server)
        .await
        .unwrap();
}
