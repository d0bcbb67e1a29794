//! `coordinator`: registers comm servers and places clients on them.
//!
//! ```text
//! RELAYMESH_CLUSTER_SECRET=... coordinator --listen 127.0.0.1:7400 [--config coordinator.toml]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coordinator::Config;
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
    /// TOML config file; flags and RELAYMESH_CLUSTER_SECRET override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    relaymesh_net::logging::init();
    let args = Args::parse();
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
    if let Ok(secret) = std::env::var("RELAYMESH_CLUSTER_SECRET") {
        config.cluster_secret = secret;
    }
    if let Ok(code) = std::env::var("RELAYMESH_ACCESS_CODE") {
        config.accounts.access_code = code;
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn serve(config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("coordinator: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    relaymesh_net::shutdown::cancel_on_signals(shutdown.clone());
    match coordinator::run(listener, config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
