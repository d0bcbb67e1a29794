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

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use relaymesh_client::{Client, ClientConfig, Credentials, Event};
use relaymesh_net::http::Method;
use relaymesh_net::url::Form;
use relaymesh_proto::hex;

/// Command-line client for a relaymesh cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Coordinator URL: ws://HOST:PORT or http://HOST:PORT (the same thing).
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
    /// Log in with the Ed25519 key in this file (from `meshctl keygen`) instead of a code.
    #[arg(
        long,
        global = true,
        env = "RELAYMESH_KEY_FILE",
        conflicts_with = "code"
    )]
    key_file: Option<std::path::PathBuf>,
    /// The role to act as.
    #[arg(long, global = true, default_value = "")]
    role: String,
    /// The group within the account.
    #[arg(long, global = true, default_value = "")]
    group: String,
    /// This client's unique id within the account: a newer login with the same id replaces
    /// this one.
    #[arg(long, global = true)]
    client_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        if let (Some(account), Some(path)) = (&self.account, &self.key_file) {
            return Ok(Credentials::Key {
                account: account.clone(),
                key: relaymesh_client::read_signing_key(path)?,
                role: self.role.clone(),
                group: self.group.clone(),
            });
        }
        match (&self.account, &self.code) {
            (None, _) => Ok(Credentials::Anonymous),
            (Some(_), None) => {
                bail!("--account needs --code (or RELAYMESH_ACCESS_CODE) or --key-file")
            }
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
    /// Wait until the coordinator answers and, with `--servers N`, until at least N comm
    /// servers are registered and every registered server is linked to all the others (for
    /// scripts that start a cluster).
    Wait {
        /// Comm servers to wait for.
        #[arg(long, default_value_t = 0)]
        servers: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Ask the coordinator for a server and key over HTTP (POST /v1/login) and print the JSON.
    Login,
    /// Make an Ed25519 key pair: the private key goes to FILE (hex, readable by you only), the
    /// public key (hex) to stdout, ready for `coordinator accounts add-key`.
    Keygen {
        /// Where to write the private key; refuses to overwrite.
        file: std::path::PathBuf,
    },
}

/// Writes a new private key to `path` (mode 0600) and returns the public key in hex.
fn keygen(path: &std::path::Path) -> anyhow::Result<String> {
    let key = relaymesh_client::write_new_signing_key(path)?;
    Ok(hex::encode(key.verifying_key().as_bytes()))
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
    if let Command::Keygen { file } = &args.command {
        println!("{}", keygen(file)?);
        return Ok(());
    }
    // Checked once, up front, so an unusable URL is one message in words, whatever the command.
    let coordinator = relaymesh_net::url::normalize(&args.coordinator, Form::WebSocket)
        .map_err(|e| anyhow!("invalid coordinator URL {:?}: {e}", args.coordinator))?
        .trim_end_matches('/')
        .to_owned();
    // Topics too, before connecting: a typo is reported as such even with no cluster up.
    let topics: &[String] = match &args.command {
        Command::Sub { topics, .. } => topics,
        Command::Pub { topic, .. } => std::slice::from_ref(topic),
        _ => &[],
    };
    for topic in topics {
        relaymesh_proto::topic::validate(topic, relaymesh_proto::topic::DEFAULT_MAX_TOPIC_LEN)
            .map_err(|e| anyhow!("invalid topic {topic:?}: {e}"))?;
    }
    let mut config = ClientConfig::new(coordinator.clone());
    config.credentials = args.credentials()?;
    config.client_id = args.client_id.clone();
    match args.command {
        Command::Sub { topics, count } => subscribe(config, topics, count).await,
        Command::Pub { topic, message } => {
            let mut client = connect(config).await?;
            client.publish(&topic, message.into_bytes()).await?;
            // Wait for the server to take it, so a refusal is reported, not lost.
            client.flush().await?;
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::ZERO, client.next_event()).await
            {
                if let Event::Forbidden { reason } = event {
                    client.close().await;
                    bail!("{reason}");
                }
            }
            client.close().await;
            Ok(())
        }
        Command::Servers => servers(&coordinator).await,
        Command::Wait { servers, timeout } => Ok(relaymesh_client::cluster::wait_ready(
            &coordinator,
            servers,
            Duration::from_secs(timeout),
        )
        .await?),
        Command::Keygen { .. } => Ok(()),
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
                Credentials::Key {
                    account,
                    key,
                    role,
                    group,
                } => {
                    // Two steps over HTTP: a challenge, then the login that signs it.
                    let (status, body) = relaymesh_net::http::request(
                        Method::POST,
                        &format!("{coordinator}/v1/login/challenge"),
                        Some(Vec::new()),
                        Duration::from_secs(10),
                    )
                    .await?;
                    if !status.is_success() {
                        bail!(
                            "challenge refused ({status}): {}",
                            String::from_utf8_lossy(&body).trim()
                        );
                    }
                    let challenge: serde_json::Value = serde_json::from_slice(&body)?;
                    let nonce = challenge["nonce"]
                        .as_str()
                        .and_then(hex::decode)
                        .context("the coordinator's challenge has no hex nonce")?;
                    let message = relaymesh_proto::login_challenge(&nonce, account, role, group);
                    let signature = ed25519_dalek::Signer::sign(key, &message);
                    serde_json::json!({"credentials": {"key": {
                        "account": account, "role": role, "group": group,
                        "public_key": hex::encode(key.verifying_key().as_bytes()),
                        "challenge_id": challenge["challenge_id"],
                        "signature": hex::encode(&signature.to_bytes()),
                    }}})
                }
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
    match Client::connect(config).await {
        Ok(client) => Ok(client),
        // A dial error names the URL and the cause already.
        Err(e @ relaymesh_client::ClientError::Dial(_)) => Err(e.into()),
        Err(e) => Err(anyhow!(
            "cannot log in through the coordinator at {coordinator}: {e}"
        )),
    }
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
                    Err(_) => format!("0x{}", hex::encode(&m.payload)),
                };
                writeln!(stdout, "{}\t{}\t{payload}", m.topic, m.from)?;
                stdout.flush()?;
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            Some(Event::Dropped { count, upstream }) => {
                eprintln!(
                    "meshctl: warning: {count} messages were dropped ({upstream} between servers)"
                )
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
    let servers = relaymesh_client::cluster::servers(coordinator).await?;
    println!(
        "{:<24} {:<32} {:>8} {:>9} STATE",
        "ID", "URL", "CLIENTS", "CAPACITY"
    );
    for s in servers {
        let state = if s.draining { "draining" } else { "serving" };
        println!(
            "{:<24} {:<32} {:>8} {:>9} {state}",
            s.id, s.url, s.clients, s.capacity
        );
    }
    Ok(())
}
