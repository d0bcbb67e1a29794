//! `meshctl`: talk to a relaymesh cluster from the command line.
//!
//! ```text
//! meshctl sub --coordinator ws://127.0.0.1:7400 rooms/lobby      # print messages as they arrive
//! meshctl pub --coordinator ws://127.0.0.1:7400 rooms/lobby hi   # publish one message
//! meshctl servers --coordinator ws://127.0.0.1:7400              # list registered servers
//! ```

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use relaymesh_client::{Client, ClientConfig, Credentials, Event};
use relaymesh_net::http::Method;

/// Command-line client for a relaymesh cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "RELAYMESH_COORDINATOR",
        default_value = "ws://127.0.0.1:7400"
    )]
    coordinator: String,
    /// Log in to this account (with `--code` or RELAYMESH_ACCESS_CODE); anonymous without.
    #[arg(long, global = true, env = "RELAYMESH_ACCOUNT")]
    account: Option<String>,
    /// The account's access code (prefer RELAYMESH_ACCESS_CODE: flags show in `ps`).
    #[arg(
        long,
        global = true,
        env = "RELAYMESH_ACCESS_CODE",
        hide_env_values = true
    )]
    code: Option<String>,
    /// The role to act as.
    #[arg(long, global = true, default_value = "")]
    role: String,
    /// The group within the account.
    #[arg(long, global = true, default_value = "")]
    group: String,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        match (&self.account, &self.code) {
            (None, _) => Ok(Credentials::Anonymous),
            (Some(_), None) => bail!("--account needs --code or RELAYMESH_ACCESS_CODE"),
            (Some(account), Some(code)) => Ok(Credentials::AccessCode {
                account: account.clone(),
                code: code.clone(),
                role: self.role.clone(),
                group: self.group.clone(),
            }),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Subscribe to topics and print each message as `topic<TAB>from<TAB>payload`.
    Sub {
        /// Topics to subscribe to.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publish one message.
    Pub {
        /// Topic to publish on.
        topic: String,
        /// The message (sent as UTF-8 bytes).
        message: String,
    },
    /// List the comm servers registered with the coordinator.
    Servers,
    /// Ask the coordinator for a server and key over HTTP (POST /v1/login) and print the JSON.
    Login,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        relaymesh_net::logging::init();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meshctl: error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = ClientConfig::new(args.coordinator.trim_end_matches('/'));
    config.credentials = args.credentials()?;
    let coordinator = config.coordinator.clone();
    match args.command {
        Command::Sub { topics, count } => subscribe(config, topics, count).await,
        Command::Pub { topic, message } => {
            let client = connect(config).await?;
            client.publish(&topic, message.into_bytes()).await?;
            client.close().await;
            Ok(())
        }
        Command::Servers => servers(&coordinator).await,
        Command::Login => {
            let url = format!("{coordinator}/v1/login");
            let body = match &config.credentials {
                Credentials::AccessCode {
                    account,
                    code,
                    role,
                    group,
                } => serde_json::json!({"credentials": {"access_code": {
                    "account": account, "code": code, "role": role, "group": group,
                }}}),
                _ => serde_json::json!({}),
            };
            let (status, body) = relaymesh_net::http::request(
                Method::POST,
                &url,
                Some(body.to_string().into_bytes()),
                Duration::from_secs(10),
            )
            .await?;
            let text = String::from_utf8_lossy(&body);
            if !status.is_success() {
                bail!("login refused ({status}): {}", text.trim());
            }
            println!("{}", text.trim());
            Ok(())
        }
    }
}

async fn connect(config: ClientConfig) -> anyhow::Result<Client> {
    let coordinator = config.coordinator.clone();
    Client::connect(config)
        .await
        .with_context(|| format!("cannot connect through the coordinator at {coordinator}"))
}

async fn subscribe(
    config: ClientConfig,
    topics: Vec<String>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let mut client = connect(config).await?;
    client.subscribe(topics.iter().cloned()).await?;
    eprintln!(
        "subscribed to {} on {} as {}",
        topics.join(" "),
        client.server_id(),
        client.alias()
    );
    let mut seen = 0u64;
    let mut stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            event = client.next_event() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            Some(Event::Message(m)) => {
                let payload = match std::str::from_utf8(&m.payload) {
                    Ok(text) => text.escape_debug().to_string(),
                    Err(_) => format!(
                        "0x{}",
                        m.payload
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                    ),
                };
                writeln!(stdout, "{}\t{}\t{payload}", m.topic, m.from)?;
                stdout.flush()?;
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            Some(Event::Dropped { count }) => {
                eprintln!("meshctl: warning: {count} messages were dropped")
            }
            Some(Event::Disconnected { server_id, reason }) => {
                eprintln!("meshctl: lost {server_id}: {reason}; reconnecting")
            }
            Some(Event::Reconnected { server_id, .. }) => {
                eprintln!("meshctl: reconnected to {server_id}")
            }
            Some(Event::SubscriptionsRefused { topics, reason }) => {
                bail!(
                    "the server refused to restore {}: {reason}",
                    topics.join(" ")
                )
            }
            Some(other) => eprintln!("meshctl: {other:?}"),
            None => bail!("connection closed"),
        }
    }
    client.close().await;
    Ok(())
}

async fn servers(coordinator: &str) -> anyhow::Result<()> {
    let url = format!("{coordinator}/v1/stats");
    let (status, body) =
        relaymesh_net::http::request(Method::GET, &url, None, Duration::from_secs(10)).await?;
    if !status.is_success() {
        bail!("{url} answered {status}");
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&body).context("coordinator sent invalid JSON")?;
    let servers = stats["servers"]
        .as_array()
        .context("coordinator stats have no `servers` list")?;
    println!(
        "{:<24} {:<32} {:>8} {:>9} STATE",
        "ID", "URL", "CLIENTS", "CAPACITY"
    );
    for s in servers {
        let state = if s["draining"].as_bool() == Some(true) {
            "draining"
        } else {
            "serving"
        };
        println!(
            "{:<24} {:<32} {:>8} {:>9} {state}",
            s["id"].as_str().unwrap_or("?"),
            s["url"].as_str().unwrap_or("?"),
            s["clients"].as_u64().unwrap_or(0),
            s["capacity"].as_u64().unwrap_or(0),
        );
    }
    Ok(())
}
