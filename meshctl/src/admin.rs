//! `meshctl admin ...`: the coordinator's gRPC admin API (`coordinator --admin-listen`), with
//! the token from `RELAYMESH_ADMIN_TOKEN`.

use anyhow::anyhow;
use clap::Subcommand;
use relaymesh_proto::admin::admin_client::AdminClient;
use relaymesh_proto::admin::{
    DrainServerRequest, GetServerRequest, KickClientRequest, ListServersRequest, Server,
    UndrainServerRequest,
};
use relaymesh_proto::admin_client::AdminTls;

/// What to ask of the admin API.
#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// List the registered comm servers: `id<TAB>url<TAB>clients/capacity<TAB>topics<TAB>state`.
    Servers,
    /// One server, in the same form.
    Server {
        /// The server's id.
        id: String,
    },
    /// Drain a server: no new clients, and its clients move elsewhere. Prints how many moved
    /// once it is empty (or the deadline passed).
    Drain {
        /// The server's id.
        id: String,
        /// Seconds to wait for its clients to leave.
        #[arg(long, default_value_t = 30)]
        deadline: u32,
        /// Told to each client.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Give a drained server clients again.
    Undrain {
        /// The server's id.
        id: String,
    },
    /// Close a client's sessions (by its alias); it does not reconnect.
    Kick {
        /// The client's alias.
        alias: String,
        /// Told to the client.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// One server as a line.
fn line(s: &Server) -> String {
    let state = match (s.drained, s.draining, s.unresponsive) {
        (true, _, _) => "drained",
        (false, true, _) => "draining",
        (false, false, true) => "unresponsive",
        _ => "up",
    };
    format!(
        "{}\t{}\t{}/{}\t{}\t{state}",
        s.server_id, s.url, s.clients, s.capacity, s.topics
    )
}

/// Runs `command` against the admin API at `url` (http:// or https://HOST:PORT) with bearer
/// `token`, or with the client certificate in `tls` alone.
pub(crate) async fn run(
    url: &str,
    token: Option<&str>,
    tls: &AdminTls,
    command: AdminCommand,
) -> anyhow::Result<()> {
    let channel = relaymesh_proto::admin_client::connect(url, tls).await?;
    let bearer: Option<tonic::metadata::MetadataValue<_>> = token
        .map(|token| format!("Bearer {token}").parse())
        .transpose()
        .map_err(|_| anyhow!("RELAYMESH_ADMIN_TOKEN is not a valid header value"))?;
    let mut admin = AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(bearer) = &bearer {
            req.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(req)
    });
    let status = |e: tonic::Status| anyhow!("{:?}: {}", e.code(), e.message());
    match command {
        AdminCommand::Servers => {
            let list = admin
                .list_servers(ListServersRequest {})
                .await
                .map_err(status)?;
            for s in &list.get_ref().servers {
                println!("{}", line(s));
            }
        }
        AdminCommand::Server { id } => {
            let s = admin
                .get_server(GetServerRequest { server_id: id })
                .await
                .map_err(status)?;
            println!("{}", line(s.get_ref()));
        }
        AdminCommand::Drain {
            id,
            deadline,
            reason,
        } => {
            let done = admin
                .drain_server(DrainServerRequest {
                    server_id: id.clone(),
                    deadline_ms: deadline.saturating_mul(1000),
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("moved\t{}\tremaining\t{}", done.moved, done.remaining);
            if done.remaining > 0 {
                anyhow::bail!(
                    "{id} still has {} clients after {deadline} s",
                    done.remaining
                );
            }
        }
        AdminCommand::Undrain { id } => {
            let s = admin
                .undrain_server(UndrainServerRequest { server_id: id })
                .await
                .map_err(status)?;
            println!("{}", line(s.get_ref()));
        }
        AdminCommand::Kick { alias, reason } => {
            let kicked = admin
                .kick_client(KickClientRequest { alias, reason })
                .await
                .map_err(status)?;
            println!("closed\t{}", kicked.get_ref().closed);
        }
    }
    Ok(())
}
