//! The web console: off unless enabled; its page and script from the binary; its data only
//! with the admin token, naming every server with its own counters and peer links.

use relaymesh_tests::*;

const TOKEN: &str = "console-admin-token-for-tests";

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let (status, body) = relaymesh_net::http::request_with(
        relaymesh_net::http::Method::GET,
        url,
        &headers,
        None,
        &relaymesh_net::tls::Connector::default(),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_console_shows_every_server_with_its_peer_links_to_the_admin_token_only() {
    let mut config = coordinator_config();
    config.console = true;
    config.admin_token = TOKEN.into();
    let cluster = Cluster::start_configured(3, config).await;
    let base = http_base(&cluster.coordinator.url);

    let (status, page) = get(&format!("{base}/console"), None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>relaymesh console</title>"), "{page}");
    let (status, script) = get(&format!("{base}/console/console.js"), None).await;
    assert_eq!(status, 200);
    assert!(
        script.contains("/console/api/cluster"),
        "the page's script polls the cluster"
    );

    for token in [None, Some("not-the-admin-token")] {
        let (status, body) = get(&format!("{base}/console/api/cluster"), token).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("UNAUTHENTICATED"), "{body}");
    }
    let (status, body) = get(&format!("{base}/console/api/cluster"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let servers = view["servers"].as_array().unwrap();
    let mut ids: Vec<&str> = servers.iter().map(|s| s["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut expected = cluster.coordinator.server_ids().await;
    expected.sort_unstable();
    assert_eq!(ids, expected);
    for s in servers {
        let links: Vec<&str> = s["stats"]["peer_links"]
            .as_array()
            .unwrap_or_else(|| panic!("no stats for {s}"))
            .iter()
            .map(|l| l["id"].as_str().unwrap())
            .collect();
        assert_eq!(links.len(), 2, "each server links to the two others: {s}");
        assert!(!links.contains(&s["id"].as_str().unwrap()));
        assert!(s["stats"]["messages_out"].is_u64(), "{s}");
    }
    // No results file configured: none shown.
    let (status, _) = get(&format!("{base}/console/api/results"), Some(TOKEN)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_console_is_off_unless_enabled_and_needs_an_admin_token() {
    let cluster = Cluster::start(1).await;
    let base = http_base(&cluster.coordinator.url);
    for path in ["/console", "/console/console.js", "/console/api/cluster"] {
        let (status, body) = get(&format!("{base}{path}"), Some(TOKEN)).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let mut config = coordinator_config();
    config.console = true;
    config.admin_token = String::new();
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("admin_token") && error.contains("console"),
        "{error}"
    );
}

#[tokio::test]
async fn the_console_shows_the_results_file_as_it_is_now() {
    let dir = relaymesh_tests::process::temp_dir("console-results");
    let file = dir.join("results.json");
    std::fs::write(&file, r#"{"delivered": 450000, "lost": 0}"#).unwrap();
    let mut config = coordinator_config();
    config.console = true;
    config.admin_token = TOKEN.into();
    config.console_results = Some(file.clone());
    let cluster = Cluster::start_configured(1, config).await;
    let base = http_base(&cluster.coordinator.url);
    let (status, body) = get(&format!("{base}/console/api/results"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("450000"), "{body}");
    std::fs::write(&file, r#"{"delivered": 7}"#).unwrap();
    let (_, body) = get(&format!("{base}/console/api/results"), Some(TOKEN)).await;
    assert!(body.contains(r#""delivered":7"#), "read again: {body}");
    std::fs::write(&file, "not json").unwrap();
    let (status, body) = get(&format!("{base}/console/api/results"), Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = get(&format!("{base}/console/api/results"), None).await;
    assert_eq!(status, 401);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends a raw HTTP/1.1 `request` (with `connection: close`) and returns the answer.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within("the answer", async {
        let _ = socket.read_to_end(&mut answer).await;
    })
    .await;
    String::from_utf8_lossy(&answer).to_ascii_lowercase()
}

#[tokio::test]
async fn a_web_page_of_a_listed_origin_may_log_in_across_origins_and_no_other() {
    let mut config = coordinator_config();
    config.cors_origins = vec!["http://app.example:8080".into()];
    let cluster = Cluster::start_configured(1, config).await;
    let addr = cluster.coordinator.addr;

    let preflight = |origin: &str| {
        format!(
            "OPTIONS /v1/login HTTP/1.1\r\nhost: x\r\norigin: {origin}\r\n\
             access-control-request-method: POST\r\naccess-control-request-headers: content-type\r\n\
             connection: close\r\n\r\n"
        )
    };
    let answer = raw(addr, &preflight("http://app.example:8080")).await;
    assert!(answer.starts_with("http/1.1 204"), "{answer}");
    assert!(
        answer.contains("access-control-allow-origin: http://app.example:8080"),
        "{answer}"
    );
    assert!(
        answer.contains("access-control-allow-methods: post"),
        "{answer}"
    );
    assert!(
        answer.contains("access-control-allow-headers: content-type"),
        "{answer}"
    );
    let other = raw(addr, &preflight("http://elsewhere.example")).await;
    assert!(!other.contains("access-control-allow-origin"), "{other}");

    let login = |origin: &str| {
        format!(
            "POST /v1/login HTTP/1.1\r\nhost: x\r\norigin: {origin}\r\ncontent-type: application/json\r\n\
             content-length: 2\r\nconnection: close\r\n\r\n{{}}"
        )
    };
    let answer = raw(addr, &login("http://app.example:8080")).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("access-control-allow-origin: http://app.example:8080"),
        "{answer}"
    );
    assert!(answer.contains("\"key\""), "{answer}");
    let other = raw(addr, &login("http://elsewhere.example")).await;
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    // Not a web page's endpoint: no CORS whatever the origin.
    let stats = raw(
        addr,
        "GET /v1/stats HTTP/1.1\r\nhost: x\r\norigin: http://app.example:8080\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(!stats.contains("access-control-allow-origin"), "{stats}");

    let mut bad = coordinator_config();
    bad.cors_origins = vec!["http://app.example/path".into()];
    let error = bad.validate().unwrap_err().to_string();
    assert!(error.contains("cors_origins"), "{error}");
}
