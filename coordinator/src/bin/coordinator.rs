//! `coordinator`: registers comm servers and places clients on them.
//!
//! ```text
//! RELAYMESH_CLUSTER_SECRET=... coordinator --listen 127.0.0.1:7400 [--config coordinator.toml]
//! coordinator accounts [--config coordinator.toml | --file accounts.json | --url sqlite://accounts.db] <command>
//! RELAYMESH_ADMIN_TOKEN=... coordinator accounts --admin http://HOST:PORT <command>
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coordinator::Config;
use coordinator::accounts::{AccountsConfig, StoreKind};
use coordinator::admin::{AdminCommand, Backend};
use tokio_util::sync::CancellationToken;

/// The relaymesh coordinator: registers comm servers, picks one at random for each client and
/// reserves a single-use login key on it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on for comm servers (/v1/servers), clients (/v1/connect,
    /// POST /v1/login) and operators (/healthz, /v1/stats, /metrics).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address to serve the gRPC admin API on (off unless given here or in the config); its
    /// calls need RELAYMESH_ADMIN_TOKEN as a bearer token.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Serve the web console at /console (config `console`); its data needs
    /// RELAYMESH_ADMIN_TOKEN as the bearer token, which the page asks for.
    #[arg(long)]
    console: bool,
    /// PEM certificate chain for the listeners, which then speak TLS only (wss://, https://);
    /// reloaded when the file changes (config `[tls] cert`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (config `[tls] key`).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle trusted when dialing, and verifying servers' certificates with --mtls
    /// (config `[tls] ca`).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Mutual TLS on the server links: comm servers must present a certificate signed by --ca
    /// naming the host of the URL they registered with (config `[tls] mtls`).
    #[arg(long)]
    mtls: bool,
    /// TOML config file; flags and RELAYMESH_CLUSTER_SECRET override its keys.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the accounts of the file or sql store (the config's [accounts], or --file/--url),
    /// or those of a running coordinator through its admin API (--admin).
    Accounts {
        /// A running coordinator's admin API (http://HOST:PORT), with the token from
        /// RELAYMESH_ADMIN_TOKEN: the command runs there, on its store.
        #[arg(long, conflicts_with_all = ["file", "url"])]
        admin: Option<String>,
        /// The accounts JSON file (file store).
        #[arg(long, conflicts_with = "url")]
        file: Option<PathBuf>,
        /// The account database: sqlite://FILE or postgres://... (sql store; also
        /// RELAYMESH_ACCOUNTS_URL).
        #[arg(long, env = "RELAYMESH_ACCOUNTS_URL", hide_env_values = true)]
        url: Option<String>,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

fn main() -> ExitCode {
    relaymesh_net::logging::init();
    let args = Args::parse();
    if let Some(Command::Accounts {
        admin,
        file,
        url,
        command,
    }) = args.command
    {
        if let Some(admin) = admin {
            return remote_accounts(&admin, command);
        }
        return accounts(args.config.as_deref(), file, url, command);
    }
    match load_config(&args) {
        Ok(config) => serve(config),
        Err(e) => {
            eprintln!("coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> Result<Config, relaymesh_net::config::ConfigError> {
    let mut config: Config = relaymesh_net::config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = args.admin_listen {
        config.admin_listen = Some(admin);
    }
    if args.console {
        config.console = true;
    }
    if let Ok(token) = std::env::var("RELAYMESH_ADMIN_TOKEN") {
        config.admin_token = token;
    }
    config.tls.apply_flags(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.ca.clone(),
        args.mtls,
    );
    if let Ok(secret) = std::env::var("RELAYMESH_CLUSTER_SECRET") {
        config.cluster_secret = secret;
    }
    if let Ok(code) = std::env::var("RELAYMESH_ACCESS_CODE") {
        config.accounts.access_code = code;
    }
    if let Ok(url) = std::env::var("RELAYMESH_ACCOUNTS_URL") {
        config.accounts.url = url;
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main(flavor = "current_thread")]
async fn accounts(
    config: Option<&std::path::Path>,
    file: Option<PathBuf>,
    url: Option<String>,
    command: AdminCommand,
) -> ExitCode {
    let store = match (file, url) {
        (Some(path), _) => AccountsConfig {
            store: StoreKind::File,
            path: Some(path),
            ..AccountsConfig::default()
        },
        (None, Some(url)) => AccountsConfig {
            store: StoreKind::Sql,
            url,
            ..AccountsConfig::default()
        },
        (None, None) => match relaymesh_net::config::load::<Config>(config) {
            Ok(config) => config.accounts,
            Err(e) => {
                eprintln!("coordinator: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let result = match Backend::open(&store).await {
        Ok(backend) => backend.run(command).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coordinator accounts: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn remote_accounts(admin: &str, command: AdminCommand) -> ExitCode {
    let Ok(token) = std::env::var("RELAYMESH_ADMIN_TOKEN") else {
        eprintln!("coordinator accounts: --admin needs RELAYMESH_ADMIN_TOKEN");
        return ExitCode::FAILURE;
    };
    // The CA that signed an https:// admin API's certificate (else the system's CA store).
    let tls = coordinator::admin::remote::AdminTls {
        ca: std::env::var_os("RELAYMESH_CA")
            .filter(|ca| !ca.is_empty())
            .map(Into::into),
        identity: None,
    };
    match coordinator::admin::remote::run(admin, &token, &tls, command).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coordinator accounts: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(config: Config) -> ExitCode {
    let listener = match relaymesh_net::serve::bind(config.listen, config.listen_backlog) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("coordinator: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let admin = match config.admin_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("coordinator: cannot listen on {addr} (admin_listen): {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let shutdown = CancellationToken::new();
    relaymesh_net::shutdown::cancel_on_signals(shutdown.clone());
    // On a worker thread, not the main one `block_on` runs on: the accept loop then hands
    // each connection to the thread it runs on instead of waking another one.
    match tokio::spawn(coordinator::run_with(listener, admin, config, shutdown)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("coordinator: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
