//! `meshctl`: talk to a relaymesh cluster from the command line.
//!
//! ```text
//! meshctl sub --coordinator ws://127.0.0.1:7400 rooms/lobby      # print messages as they arrive
//! meshctl pub --coordinator ws://127.0.0.1:7400 rooms/lobby hi   # publish one message
//! meshctl servers --coordinator ws://127.0.0.1:7400              # list registered servers
//! meshctl register --name drone-7                                # a node id and its token
//! meshctl listen --node-token TOKEN                              # print direct messages
//! meshctl send NODE_ID "take off"                                # a direct message
//! meshctl admin --admin http://127.0.0.1:7401 drain SERVER_ID     # move a server's clients
//! ```

mod admin;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Parser, Subcommand};
use relaymesh_client::{Client, ClientConfig, Credentials, Event, SignalKind};
use relaymesh_net::http::Method;
use relaymesh_net::url::Form;
use relaymesh_proto::hex;

/// Command-line client for a relaymesh cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Coordinator URL: ws://HOST:PORT or http://HOST:PORT (the same thing); several,
    /// comma-separated, are tried in turn.
    #[arg(
        long,
        global = true,
        env = "RELAYMESH_COORDINATOR",
        default_value = "ws://127.0.0.1:7400"
    )]
    coordinator: String,
    /// CA bundle (PEM) trusted for wss:// and https:// URLs instead of the system's CA store.
    #[arg(long, global = true, env = "RELAYMESH_CA")]
    ca: Option<std::path::PathBuf>,
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
    /// Log in as the node this token names (from `meshctl register`) instead.
    #[arg(
        long,
        global = true,
        env = "RELAYMESH_NODE_TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["code", "key_file"]
    )]
    node_token: Option<String>,
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
    /// Ask the coordinator for this comm server (by id) when it is eligible.
    #[arg(long, global = true)]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        if let Some(token) = &self.node_token {
            return Ok(Credentials::NodeToken(token.clone()));
        }
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
    /// Register a node of the account (and role and group) you log in as; prints
    /// `NODE_ID<TAB>TOKEN`. The token is shown this once: log in with `--node-token`.
    Register {
        #[command(flatten)]
        details: Details,
    },
    /// Replace the name, location and info of the node you log in as (`--node-token` or
    /// `--key-file`); prints its id.
    Update {
        #[command(flatten)]
        details: Details,
    },
    /// List online nodes of your account: `NODE_ID<TAB>NAME<TAB>LOCATION<TAB>SERVERS<TAB>INFO`,
    /// a random sample when there are more than `--limit`.
    Nodes {
        /// Most nodes to list (the server caps it).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only nodes whose name or location contains this (case-insensitive).
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Send a direct message to a node; fails if no session of it is connected.
    Send {
        /// The node id.
        node: String,
        /// The message (sent as UTF-8 bytes).
        message: String,
    },
    /// Send one signal to a node (`init`, `offer`, `answer`, `ice-candidate`, `custom`).
    Signal {
        /// The node id.
        node: String,
        /// The kind of signal.
        kind: SignalArg,
        /// The payload (opaque to relaymesh).
        payload: String,
    },
    /// Print what reaches your node: `direct<TAB>FROM_NODE<TAB>FROM<TAB>PAYLOAD` and
    /// `signal<TAB>KIND<TAB>FROM_NODE<TAB>FROM<TAB>PAYLOAD`, and with `--presence`
    /// `presence<TAB>CHANGE<TAB>NODE_ID<TAB>NAME`.
    Listen {
        /// Exit after this many lines.
        #[arg(long)]
        count: Option<u64>,
        /// Also print presence events of your account's nodes.
        #[arg(long)]
        presence: bool,
    },
    /// Call a node: the signalling half of a WebRTC set-up (init, offer, then ICE candidates
    /// both ways) with `meshctl answer` on the other end; prints each step.
    Call {
        /// The node to call.
        node: String,
        /// ICE candidates to send (and to wait for from the other end).
        #[arg(long, default_value_t = 3)]
        candidates: u32,
    },
    /// Answer one call (`meshctl call`): answers the offer, sends as many ICE candidates as
    /// the caller does, and exits when the exchange is complete.
    Answer,
    /// The coordinator's admin API (`coordinator --admin-listen`): servers, draining,
    /// kicking. Needs RELAYMESH_ADMIN_TOKEN.
    Admin {
        /// The admin API: http://HOST:PORT, or https://HOST:PORT (trusting `--ca`).
        #[arg(long, env = "RELAYMESH_ADMIN", default_value = "http://127.0.0.1:7401")]
        admin: String,
        /// The admin token (prefer the environment: flags show in `ps`); not needed with a
        /// client certificate the coordinator's `admin_ca` signed.
        #[arg(long, env = "RELAYMESH_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Client certificate (PEM) for mutual TLS with the admin API, with `--tls-key`.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// Private key (PEM) of `--tls-cert`.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
}

/// A node's details, as flags.
#[derive(Debug, clap::Args)]
struct Details {
    /// The node's name.
    #[arg(long, default_value = "")]
    name: String,
    /// Where it is.
    #[arg(long, default_value = "")]
    location: String,
    /// A JSON object describing it.
    #[arg(long, default_value = "{}")]
    info: String,
}

impl From<Details> for relaymesh_client::NodeDetails {
    fn from(d: Details) -> Self {
        Self {
            name: d.name,
            location: d.location,
            info: d.info,
        }
    }
}

/// Signal kinds on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SignalArg {
    Init,
    Offer,
    Answer,
    IceCandidate,
    Custom,
}

impl From<SignalArg> for SignalKind {
    fn from(k: SignalArg) -> Self {
        match k {
            SignalArg::Init => SignalKind::Init,
            SignalArg::Offer => SignalKind::Offer,
            SignalArg::Answer => SignalKind::Answer,
            SignalArg::IceCandidate => SignalKind::IceCandidate,
            SignalArg::Custom => SignalKind::Custom,
        }
    }
}

/// A signal kind as `meshctl` prints it.
fn kind_name(kind: SignalKind) -> &'static str {
    match kind {
        SignalKind::Init => "init",
        SignalKind::Offer => "offer",
        SignalKind::Answer => "answer",
        SignalKind::IceCandidate => "ice-candidate",
        SignalKind::Custom | SignalKind::Unspecified => "custom",
    }
}

/// A payload as text: UTF-8 escaped, or hex.
fn printable(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) => text.escape_debug().to_string(),
        Err(_) => format!("0x{}", hex::encode(payload)),
    }
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
    if let Command::Admin {
        admin,
        token,
        tls_cert,
        tls_key,
        command,
    } = args.command
    {
        let tls = relaymesh_proto::admin_client::AdminTls {
            ca: args.ca,
            identity: tls_cert.zip(tls_key),
        };
        if token.is_none() && tls.identity.is_none() {
            bail!(
                "meshctl admin needs RELAYMESH_ADMIN_TOKEN (or --token), or a client certificate (--tls-cert, --tls-key)"
            );
        }
        return admin::run(&admin, token.as_deref(), &tls, command).await;
    }
    let tls = relaymesh_net::tls::Connector::from_ca_or_env(args.ca.as_deref())?;
    // Checked once, up front, so an unusable URL is one message in words, whatever the command.
    let coordinator = relaymesh_net::url::split_list(&args.coordinator)
        .into_iter()
        .map(|url| {
            relaymesh_net::url::normalize(url, Form::WebSocket)
                .map(|u| u.trim_end_matches('/').to_owned())
                .map_err(|e| anyhow!("invalid coordinator URL {url:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?
        .join(",");
    if coordinator.is_empty() {
        bail!("--coordinator names no coordinator");
    }
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
    config.tls = tls.clone();
    config.credentials = args.credentials()?;
    config.client_id = args.client_id.clone();
    config.preferred_server = args.server.clone();
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
        Command::Servers => servers(&coordinator, &tls).await,
        Command::Wait { servers, timeout } => Ok(relaymesh_client::cluster::wait_ready(
            &coordinator,
            servers,
            &tls,
            Duration::from_secs(timeout),
        )
        .await?),
        Command::Keygen { .. } | Command::Admin { .. } => Ok(()),
        Command::Register { details } => {
            let node = relaymesh_client::register_node(&config, details.into()).await?;
            println!("{}\t{}", node.node_id, node.token);
            Ok(())
        }
        Command::Update { details } => {
            println!(
                "{}",
                relaymesh_client::update_node(&config, details.into()).await?
            );
            Ok(())
        }
        Command::Nodes { limit, filter } => {
            let client = connect(config).await?;
            let list = client.list_nodes(limit, &filter).await?;
            for n in &list.nodes {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    n.node_id,
                    n.name,
                    n.location,
                    n.servers.join(","),
                    n.info
                );
            }
            eprintln!("{} of {} online nodes", list.nodes.len(), list.total);
            client.close().await;
            Ok(())
        }
        Command::Send { node, message } => {
            let mut client = connect(config).await?;
            let seq = client.send(&node, message.into_bytes()).await?;
            let outcome = settled(&mut client, seq, true).await;
            client.close().await;
            outcome
        }
        Command::Signal {
            node,
            kind,
            payload,
        } => {
            let mut client = connect(config).await?;
            let seq = client.signal(&node, kind.into(), payload).await?;
            let outcome = settled(&mut client, seq, false).await;
            client.close().await;
            outcome
        }
        Command::Listen { count, presence } => listen(config, count, presence).await,
        Command::Call { node, candidates } => call(config, &node, candidates).await,
        Command::Answer => answer(config).await,
        Command::Login => {
            // The first coordinator that answers (a refusal is an answer).
            let mut failure = None;
            for base in relaymesh_net::url::split_list(&coordinator) {
                match http_login(base, &config.credentials, &tls).await {
                    Ok(text) => {
                        println!("{}", text.trim());
                        return Ok(());
                    }
                    Err(LoginFailure::Refused(e)) => return Err(e),
                    Err(LoginFailure::Unreachable(e)) => failure = Some(e),
                }
            }
            Err(failure.unwrap_or_else(|| anyhow!("no coordinator to log in through")))
        }
    }
}

/// Why [`http_login`] failed.
enum LoginFailure {
    /// The coordinator said no (another would say the same).
    Refused(anyhow::Error),
    /// It could not be reached or is unwell: another may do.
    Unreachable(anyhow::Error),
}

/// `POST /v1/login` at the coordinator at `base` (after `POST /v1/login/challenge` for a key);
/// the JSON answer.
async fn http_login(
    base: &str,
    credentials: &Credentials,
    tls: &relaymesh_net::tls::Connector,
) -> Result<String, LoginFailure> {
    let post = |path: &str, body: Vec<u8>| {
        let url = format!("{base}{path}");
        async move {
            let (status, body) = relaymesh_net::http::request_with(
                Method::POST,
                &url,
                &[],
                Some(body),
                tls,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| LoginFailure::Unreachable(e.into()))?;
            let text = String::from_utf8_lossy(&body).trim().to_owned();
            if status.is_server_error() {
                return Err(LoginFailure::Unreachable(anyhow!(
                    "{url} answered {status}: {text}"
                )));
            }
            Ok((status, text))
        }
    };
    let body = match credentials {
        Credentials::Key {
            account,
            key,
            role,
            group,
        } => {
            // Two steps over HTTP, at the same coordinator: a challenge, then the login that
            // signs it.
            let (status, text) = post("/v1/login/challenge", Vec::new()).await?;
            if !status.is_success() {
                return Err(LoginFailure::Refused(anyhow!(
                    "challenge refused ({status}): {text}"
                )));
            }
            let challenge: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoginFailure::Unreachable(e.into()))?;
            let nonce = challenge["nonce"]
                .as_str()
                .and_then(hex::decode)
                .ok_or_else(|| {
                    LoginFailure::Unreachable(anyhow!(
                        "the coordinator's challenge has no hex nonce"
                    ))
                })?;
            let message = relaymesh_proto::login_challenge(&nonce, account, role, group);
            let signature = ed25519_dalek::Signer::sign(key, &message);
            serde_json::json!({"credentials": {"key": {
                "account": account, "role": role, "group": group,
                "public_key": hex::encode(key.verifying_key().as_bytes()),
                "challenge_id": challenge["challenge_id"],
                "signature": hex::encode(&signature.to_bytes()),
            }}})
        }
        // Every other kind is sent as it is (a node token logs in as its node).
        other => serde_json::json!({ "credentials": other.login_json() }),
    };
    let (status, text) = post("/v1/login", body.to_string().into_bytes()).await?;
    if !status.is_success() {
        return Err(LoginFailure::Refused(anyhow!(
            "login refused ({status}): {text}"
        )));
    }
    Ok(text)
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
            Some(Event::Moved {
                from_server,
                server_id,
                reason,
                ..
            }) => eprintln!("meshctl: moved from {from_server} to {server_id}: {reason}"),
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

/// Waits until the server has handled message `seq` (delivered it, or stored it for an
/// offline node) and fails if it did neither.
async fn settled(client: &mut Client, seq: u64, confirmed: bool) -> anyhow::Result<()> {
    client.flush().await?;
    if confirmed {
        client.handle().confirmed(seq).await?;
    }
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, client.next_event()).await {
        match event {
            Event::Undeliverable {
                seq: s,
                reason,
                message,
                to_node,
            } if s == seq => {
                bail!(
                    "not delivered to {to_node}: {}: {message}",
                    reason.as_str_name()
                )
            }
            Event::Accepted {
                seq: s,
                to_node,
                inbox_id,
            } if s == seq => {
                eprintln!("{to_node} is offline: stored in its inbox as {inbox_id}");
            }
            _ => {}
        }
    }
    Ok(())
}

async fn listen(config: ClientConfig, count: Option<u64>, presence: bool) -> anyhow::Result<()> {
    let mut client = connect(config).await?;
    if presence {
        client.watch_presence().await?;
    }
    let node = client.node_id();
    eprintln!(
        "listening as node {} on {} as {}",
        if node.is_empty() { "(none)" } else { &node },
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
        let line = match event {
            Some(Event::Direct(d)) => format!(
                "direct\t{}\t{}\t{}",
                d.from_node,
                d.from,
                printable(&d.payload)
            ),
            Some(Event::Signal(s)) => format!(
                "signal\t{}\t{}\t{}\t{}",
                kind_name(s.kind),
                s.from_node,
                s.from,
                printable(&s.payload)
            ),
            Some(Event::Presence { change, node }) => format!(
                "presence\t{}\t{}\t{}",
                change
                    .as_str_name()
                    .trim_start_matches("PRESENCE_CHANGE_")
                    .to_lowercase(),
                node.node_id,
                node.name
            ),
            Some(Event::Message(m)) => format!("message\t{}\t{}", m.topic, m.from),
            Some(Event::Expired {
                to_node,
                inbox_id,
                stored_ms,
                ..
            }) => format!("expired\t{to_node}\t{inbox_id}\t{stored_ms}"),
            Some(Event::Disconnected { server_id, reason }) => {
                eprintln!("meshctl: lost {server_id}: {reason}; reconnecting");
                continue;
            }
            Some(other) => {
                eprintln!("meshctl: {other:?}");
                continue;
            }
            None => bail!("connection closed"),
        };
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    client.close().await;
    Ok(())
}

/// The next signal from `from` (any node when empty), within 30 s; an `Undeliverable` for
/// one of ours ends the exchange.
async fn next_signal(client: &mut Client, from: &str) -> anyhow::Result<relaymesh_client::Signal> {
    let wait = async {
        loop {
            match client.next_event().await {
                Some(Event::Signal(s)) if from.is_empty() || s.from_node == from => return Ok(s),
                Some(Event::Undeliverable {
                    to_node,
                    reason,
                    message,
                    ..
                }) => bail!(
                    "signal to {to_node} not delivered: {}: {message}",
                    reason.as_str_name()
                ),
                Some(_) => {}
                None => bail!("connection closed"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| anyhow!("no signal within 30 s"))?
}

/// The caller's half of the exchange `meshctl answer` completes.
async fn call(config: ClientConfig, node: &str, candidates: u32) -> anyhow::Result<()> {
    let mut client = connect(config).await?;
    let me = client.node_id();
    if me.is_empty() {
        bail!("log in as a node (--node-token or --key-file) to call one");
    }
    client.signal(node, SignalKind::Init, "").await?;
    client
        .signal(node, SignalKind::Offer, format!("offer from {me}"))
        .await?;
    println!("sent\tinit\nsent\toffer");
    let answer = next_signal(&mut client, node).await?;
    if answer.kind != SignalKind::Answer {
        bail!("expected an answer, got {}", kind_name(answer.kind));
    }
    println!("got\tanswer\t{}", printable(&answer.payload));
    for i in 0..candidates {
        client
            .signal(
                node,
                SignalKind::IceCandidate,
                format!("candidate {i} of {me}"),
            )
            .await?;
        println!("sent\tice-candidate\t{i}");
    }
    // An empty candidate ends the list, as in WebRTC.
    client.signal(node, SignalKind::IceCandidate, "").await?;
    let mut got = 0;
    loop {
        let s = next_signal(&mut client, node).await?;
        if s.payload.is_empty() {
            break;
        }
        got += 1;
        println!("got\tice-candidate\t{}", printable(&s.payload));
    }
    println!("connected\t{node}\t{got} remote candidates");
    client.close().await;
    Ok(())
}

/// Answers one `meshctl call`.
async fn answer(config: ClientConfig) -> anyhow::Result<()> {
    let mut client = connect(config).await?;
    let me = client.node_id();
    if me.is_empty() {
        bail!("log in as a node (--node-token or --key-file) to answer calls");
    }
    eprintln!("waiting for a call to node {me}");
    let caller = loop {
        let s = next_signal(&mut client, "").await?;
        println!("got\t{}\t{}", kind_name(s.kind), printable(&s.payload));
        if s.kind == SignalKind::Offer {
            break s.from_node;
        }
    };
    client
        .signal(&caller, SignalKind::Answer, format!("answer from {me}"))
        .await?;
    println!("sent\tanswer");
    let mut sent = 0;
    loop {
        let s = next_signal(&mut client, &caller).await?;
        if s.payload.is_empty() {
            break;
        }
        println!("got\tice-candidate\t{}", printable(&s.payload));
        client
            .signal(
                &caller,
                SignalKind::IceCandidate,
                format!("candidate {sent} of {me}"),
            )
            .await?;
        sent += 1;
    }
    client.signal(&caller, SignalKind::IceCandidate, "").await?;
    client.flush().await?;
    println!("connected\t{caller}\t{sent} candidates sent");
    client.close().await;
    Ok(())
}

async fn servers(coordinator: &str, tls: &relaymesh_net::tls::Connector) -> anyhow::Result<()> {
    let servers = relaymesh_client::cluster::servers(coordinator, tls).await?;
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
