//! A comm server killed in the middle of a run (`--scenario failover`), and a new one started
//! in its place a little later: its clients lose their server abruptly, reconnect elsewhere and
//! (on topics that keep history) recover what was published meanwhile.
//!
//! In the embedded cluster the server's runtime is shut down without a word (its sockets just
//! close, as when a process dies); on a deployed cluster `--kill-command` and
//! `--restart-command` run through `sh -c` with the server's id in `RELAYMESH_SERVER_ID`
//! (e.g. `kubectl delete pod --grace-period=0 --force "$RELAYMESH_SERVER_ID"`), or the kill is
//! left to someone outside (an external kill).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

/// When and how.
#[derive(Clone)]
pub(crate) struct KillPlan {
    /// Seconds into publishing.
    pub(crate) at: Duration,
    /// From the kill to the start of the server that replaces it.
    pub(crate) restart_after: Duration,
    pub(crate) how: KillHow,
    /// The server to kill; the one with the most of this run's clients when `None`.
    pub(crate) server: Option<String>,
}

impl std::fmt::Debug for KillPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KillPlan")
            .field("at", &self.at)
            .field("restart_after", &self.restart_after)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub(crate) enum KillHow {
    /// A server of the embedded cluster.
    Embedded(Arc<crate::cluster::Killable>),
    /// Shell commands (`None`: done by someone else).
    Commands {
        kill: Option<String>,
        restart: Option<String>,
    },
}

/// What was done.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServerKilled {
    pub(crate) server_id: String,
    /// Seconds into publishing.
    pub(crate) at_s: f64,
    /// The server started in its place (its id, when known) and when.
    pub(crate) restarted: Option<String>,
    pub(crate) restarted_at_s: Option<f64>,
    /// No command: the kill was left to someone outside the run.
    pub(crate) external: bool,
    pub(crate) error: Option<String>,
}

/// Waits until `plan.at` after `started`, kills `plan.server` (or `busiest`), and starts a
/// server in its place `plan.restart_after` later.
pub(crate) async fn run(plan: KillPlan, busiest: String, started: Instant) -> ServerKilled {
    tokio::time::sleep_until((started + plan.at).into()).await;
    let server_id = plan.server.clone().unwrap_or(busiest);
    let at_s = started.elapsed().as_secs_f64();
    let mut killed = ServerKilled {
        server_id: server_id.clone(),
        at_s,
        restarted: None,
        restarted_at_s: None,
        external: false,
        error: None,
    };
    let outcome = match &plan.how {
        KillHow::Embedded(cluster) => cluster.kill(&server_id),
        KillHow::Commands { kill: None, .. } => {
            killed.external = true;
            Ok(())
        }
        KillHow::Commands {
            kill: Some(command),
            ..
        } => shell(command, &server_id).await,
    };
    if let Err(e) = outcome {
        killed.error = Some(format!("{e:#}"));
        return killed;
    }
    tokio::time::sleep(plan.restart_after).await;
    let restarted = match &plan.how {
        KillHow::Embedded(cluster) => cluster.restart().map(Some),
        KillHow::Commands {
            restart: Some(command),
            ..
        } => shell(command, &server_id).await.map(|()| None),
        KillHow::Commands { restart: None, .. } => return killed,
    };
    match restarted {
        Ok(id) => {
            killed.restarted = id.or(Some(String::new()));
            killed.restarted_at_s = Some(started.elapsed().as_secs_f64());
        }
        Err(e) => killed.error = Some(format!("restarting: {e:#}")),
    }
    killed
}

/// Runs `command` with `sh -c`, `RELAYMESH_SERVER_ID` set; fails unless it exits with 0.
async fn shell(command: &str, server_id: &str) -> anyhow::Result<()> {
    let (command, server_id) = (command.to_owned(), server_id.to_owned());
    tokio::task::spawn_blocking(move || {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("RELAYMESH_SERVER_ID", &server_id)
            .status()
            .with_context(|| format!("running {command:?}"))?;
        anyhow::ensure!(status.success(), "{command:?} exited with {status}");
        Ok(())
    })
    .await
    .context("the command's thread failed")?
}
