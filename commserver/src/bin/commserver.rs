//! `commserver`: relays topic messages between clients and peer servers.
//!
//! ```text
//! RELAYMESH_CLUSTER_SECRET=... commserver --coordinator ws://127.0.0.1:7400 --listen 127.0.0.1:0
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// jemalloc, unless built without the `jemalloc` feature: see the workspace manifest.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use commserver::Config;
use tokio_util::sync::CancellationToken;

/// A relaymesh comm server: accepts clients holding a coordinator-issued key, relays their
/// topic messages locally and to peer servers with interest.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Coordinator URLs, comma-separated (e.g. ws://10.0.0.1:7400,ws://10.0.0.2:7400): the
    /// server registers with every one, and with every address a name resolves to.
    #[arg(long)]
    coordinator: Option<String>,
    /// Address to listen on for clients (/v1/client), peers (/v1/peers) and operators.
    /// Port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// URL clients and peers use to reach this server (default: ws://<bound address>).
    #[arg(long)]
    public_url: Option<String>,
    /// Stable server id (default: derived from the public URL).
    #[arg(long)]
    id: Option<String>,
    /// Open the TCP/UDP device gateway's driver API on this address (needs
    /// RELAYMESH_DISPATCH_SECRET).
    #[arg(long)]
    dispatch_listen: Option<SocketAddr>,
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
    /// Mutual TLS on the peer links: peers must present a certificate signed by --ca
    /// naming the host of the URL they registered with (config `[tls] mtls`).
    #[arg(long)]
    mtls: bool,
    /// TOML config file; flags and RELAYMESH_CLUSTER_SECRET override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    relaymesh_net::logging::init();
    let args = Args::parse();
    match load_config(args) {
        Ok(config) => serve(config),
        Err(e) => {
            eprintln!("commserver: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: Args) -> Result<Config, relaymesh_net::config::ConfigError> {
    let mut config: Config = relaymesh_net::config::load(args.config.as_deref())?;
    if let Some(coordinator) = args.coordinator {
        config.coordinator = coordinator;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.public_url.is_some() {
        config.public_url = args.public_url;
    }
    if args.id.is_some() {
        config.id = args.id;
    }
    config
        .tls
        .apply_flags(args.tls_cert, args.tls_key, args.ca, args.mtls);
    if let Ok(secret) = std::env::var("RELAYMESH_CLUSTER_SECRET") {
        config.cluster_secret = secret;
    }
    if args.dispatch_listen.is_some() {
        config.dispatch_listen = args.dispatch_listen;
    }
    if let Ok(secret) = std::env::var("RELAYMESH_DISPATCH_SECRET") {
        config.dispatch_secret = secret;
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn serve(config: Config) -> ExitCode {
    let listener = match relaymesh_net::serve::bind(config.listen, config.listen_backlog) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("commserver: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    relaymesh_net::shutdown::cancel_on_signals(shutdown.clone());
    // On a worker thread, not the main one `block_on` runs on: the accept loop then hands
    // each connection to the thread it runs on instead of waking another one.
    match tokio::spawn(commserver::run(listener, config, shutdown)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("commserver: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("commserver: {e}");
            ExitCode::FAILURE
        }
    }
}
