//! The gRPC admin API (`relaymesh.admin.v1.Admin`), on its own listener (`admin_listen`), beside
//! `grpc.health.v1.Health` and server reflection.
//!
//! Every call of the admin service needs `authorization: Bearer <admin_token>` (compared in
//! constant time); anything else is `UNAUTHENTICATED`. Health and reflection are open, as
//! probes and generic tools expect. Each call is logged with its peer address.
//!
//! Health: the overall status (`""`) and `relaymesh.admin.v1.Admin` are `SERVING` while the
//! coordinator is ready — its account store answers and at least one comm server is
//! registered — and `NOT_SERVING` otherwise, checked every [`READINESS_EVERY`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use relaymesh_net::sync::lock;
use relaymesh_proto::admin::admin_server::{Admin, AdminServer};
use relaymesh_proto::admin::backend_server::BackendServer;
use relaymesh_proto::admin::{
    self as api, AccountEntry, AccountName, AccountsReply, AddAccessCodeRequest,
    AddPublicKeyRequest, ClientsPage, CreateAccountRequest, DrainServerRequest,
    DrainServerResponse, GetServerRequest, KickClientRequest, KickClientResponse,
    ListAccountsRequest, ListAccountsResponse, ListClientsRequest, ListServersRequest,
    ListServersResponse, Server, SetRoleRequest, UndrainServerRequest,
};
use relaymesh_proto::{encode, v1};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::App;
use crate::accounts::StoreError;
use crate::admin::{AdminCommand, Backend};
use crate::backend_api::{BackendService, QUERY_TIMEOUT, optional, required};
use crate::registry::Entry;
use crate::server_link::ServerLink;

/// How often readiness is checked for the health service.
const READINESS_EVERY: Duration = Duration::from_secs(1);
/// `DrainServer` waits this long when the request names no deadline, and at most the longest.
const DEFAULT_DRAIN_MS: u32 = 30_000;
const MAX_DRAIN_MS: u32 = 600_000;

/// Serves the admin API, health and reflection on `listener` until shutdown.
pub(crate) async fn serve(app: Arc<App>, listener: TcpListener) {
    let local = listener.local_addr().ok();
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(relaymesh_proto::admin::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(reflection) => reflection,
        Err(e) => {
            tracing::error!(error = %e, "admin API: cannot build reflection; not serving it");
            return;
        }
    };
    // Client certificates count only where `admin_ca` verified them.
    let operators = app.config.admin_ca.is_some();
    let token = app.config.admin_token.clone();
    let admin = AdminServer::with_interceptor(AdminService { app: app.clone() }, move |req| {
        authorize(&token, operators, req)
    });
    let token = app.config.admin_token.clone();
    let backend =
        BackendServer::with_interceptor(BackendService { app: app.clone() }, move |req| {
            authorize(&token, operators, req)
        });
    // gRPC and the backend API's HTTP JSON twin on one listener (HTTP/1 for the latter).
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(admin)
        .add_service(backend)
        .into_axum_router()
        .merge(crate::backend_api::http(app.clone()));
    app.tracker.spawn(readiness(app.clone(), health));
    if let Some(local) = local {
        tracing::info!("admin API listening on {local}");
    }
    let shutdown = app.shutdown.clone();
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(routes));
    let served = match admin_acceptor(&app) {
        Ok(None) => {
            server
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    shutdown.cancelled_owned(),
                )
                .await
        }
        Ok(Some(acceptor)) => {
            let incoming = relaymesh_net::tls::incoming(
                listener,
                acceptor,
                app.config.handshake_timeout(),
                app.stats.serving.clone(),
                shutdown.clone(),
                app.tracker.clone(),
            );
            server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        }
        Err(e) => {
            tracing::error!(error = %e, "admin API: cannot set up TLS; not serving it");
            return;
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "admin API stopped");
    }
}

/// The admin listener's TLS, when the coordinator has a certificate: gRPC needs `h2` by ALPN.
/// Client certificates are asked for only with `admin_ca`, and verified against it alone: the
/// cluster's CA (`tls.ca`, which signs the comm servers' certificates) is no operator's.
fn admin_acceptor(
    app: &App,
) -> Result<Option<relaymesh_net::tls::Acceptor>, relaymesh_net::tls::TlsError> {
    let Some(tls) = &app.tls else {
        return Ok(None);
    };
    const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
    let operators = app.config.admin_ca.as_deref();
    relaymesh_net::tls::Acceptor::new(tls.identity.clone(), operators, ALPN).map(Some)
}

/// Whether a call came with a client certificate verified against `admin_ca` (mutual TLS).
fn client_certificate(req: &Request<()>) -> bool {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|certs| !certs.is_empty())
}

/// The check every admin call goes through: a client certificate verified against `admin_ca`
/// (mutual TLS; `operators` says `admin_ca` is set), or the bearer token.
fn authorize(token: &str, operators: bool, req: Request<()>) -> Result<Request<()>, Status> {
    if operators && client_certificate(&req) {
        tracing::debug!(peer = ?req.remote_addr(), "admin API: operator certificate");
        return Ok(req);
    }
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if crate::backend_api::token_matches(token, given) => Ok(req),
        Some(_) => {
            tracing::warn!(peer = ?req.remote_addr(), "admin API: wrong token");
            Err(Status::unauthenticated("wrong admin token"))
        }
        None => {
            tracing::warn!(peer = ?req.remote_addr(), "admin API: no bearer token");
            Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` (RELAYMESH_ADMIN_TOKEN)",
            ))
        }
    }
}

/// Keeps the health service's status in step with readiness.
async fn readiness(app: Arc<App>, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let servers = !lock(&app.registry).is_empty();
        let store = app.accounts.reachable().await;
        let ready = servers && store.is_ok();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if !ready {
                tracing::info!(
                    servers,
                    store = ?store.err().map(|e| e.to_string()),
                    "admin API health: not serving"
                );
            }
            health.set_service_status("", status).await;
            let admin = <AdminServer<AdminService> as tonic::server::NamedService>::NAME;
            health.set_service_status(admin, status).await;
            last = Some(ready);
        }
        tokio::select! {
            () = tokio::time::sleep(READINESS_EVERY) => {}
            () = app.shutdown.cancelled() => return,
        }
    }
}

struct AdminService {
    app: Arc<App>,
}

/// A server as the API shows it.
fn server(app: &App, id: &str, e: &Entry<Arc<ServerLink>>, now: Instant) -> Server {
    Server {
        server_id: id.to_owned(),
        url: e.url.clone(),
        capacity: e.capacity,
        clients: e.load.clients,
        pending_keys: e.load.pending_keys,
        topics: e.load.topics,
        draining: e.load.draining,
        drained: lock(&app.drained).contains(id),
        report_age_ms: u64::try_from(now.saturating_duration_since(e.load_at).as_millis())
            .unwrap_or(u64::MAX),
        unresponsive: e.unresponsive,
        peers: Vec::new(),
        counters: Default::default(),
    }
}

/// Server `id` as the API shows it, or `NOT_FOUND`.
fn find(app: &App, id: &str) -> Result<Server, Status> {
    let registry = lock(&app.registry);
    registry
        .get(id)
        .map(|e| server(app, id, e, Instant::now()))
        .ok_or_else(|| Status::not_found(format!("server_id: no server {id:?} is registered")))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_servers(
        &self,
        request: Request<ListServersRequest>,
    ) -> Result<Response<ListServersResponse>, Status> {
        tracing::debug!(peer = ?request.remote_addr(), "admin: ListServers");
        let now = Instant::now();
        let registry = lock(&self.app.registry);
        let mut servers: Vec<Server> = registry
            .iter()
            .map(|(id, e)| server(&self.app, id, e, now))
            .collect();
        servers.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        Ok(Response::new(ListServersResponse { servers }))
    }

    async fn get_server(
        &self,
        request: Request<GetServerRequest>,
    ) -> Result<Response<Server>, Status> {
        tracing::debug!(peer = ?request.remote_addr(), "admin: GetServer");
        let id = required("server_id", &request.get_ref().server_id)?;
        let mut server = find(&self.app, id)?;
        // Its peers and counters, from the server itself: left empty if it does not answer.
        let link = lock(&self.app.registry).get(id).map(|e| e.handle.clone());
        if let Some(link) = link {
            let ask = v1::server_query::Kind::Details(v1::ServerDetails {});
            if let Some(v1::server_answer::Kind::Details(details)) = link
                .ask(self.app.next_request_id(), ask, QUERY_TIMEOUT)
                .await
            {
                server.peers = details.peers;
                server.counters = details.counters;
            }
        }
        Ok(Response::new(server))
    }

    async fn drain_server(
        &self,
        request: Request<DrainServerRequest>,
    ) -> Result<Response<DrainServerResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let id = required("server_id", &req.server_id)?.to_owned();
        let reason = optional("reason", &req.reason)?.to_owned();
        if req.deadline_ms > MAX_DRAIN_MS {
            return Err(Status::invalid_argument(format!(
                "deadline_ms: at most {MAX_DRAIN_MS}"
            )));
        }
        let deadline_ms = if req.deadline_ms == 0 {
            DEFAULT_DRAIN_MS
        } else {
            req.deadline_ms
        };
        let app = &self.app;
        let before = set_drained(app, &id, true, &reason)?;
        tracing::info!(?peer, server = %id, clients = before, %reason, "admin: DrainServer");
        // Until its clients have left (as its load reports say) or the deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(deadline_ms.into());
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let remaining = loop {
            let clients = lock(&app.registry).get(&id).map(|e| e.load.clients);
            match clients {
                Some(0) | None => break 0,
                Some(n) if tokio::time::Instant::now() >= deadline => break n,
                Some(_) => {}
            }
            tokio::select! {
                _ = tick.tick() => {}
                () = app.shutdown.cancelled() => {
                    return Err(Status::unavailable("the coordinator is shutting down"));
                }
            }
        };
        let server = find(app, &id).ok();
        tracing::info!(server = %id, moved = before.saturating_sub(remaining), remaining, "admin: DrainServer done");
        Ok(Response::new(DrainServerResponse {
            moved: before.saturating_sub(remaining),
            remaining,
            server,
        }))
    }

    async fn undrain_server(
        &self,
        request: Request<UndrainServerRequest>,
    ) -> Result<Response<Server>, Status> {
        let peer = request.remote_addr();
        let id = required("server_id", &request.get_ref().server_id)?.to_owned();
        set_drained(&self.app, &id, false, "")?;
        tracing::info!(?peer, server = %id, "admin: UndrainServer");
        Ok(Response::new(find(&self.app, &id)?))
    }

    async fn kick_client(
        &self,
        request: Request<KickClientRequest>,
    ) -> Result<Response<KickClientResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let alias = req.alias.clone();
        let closed = crate::backend_api::kick(&self.app, req).await?;
        tracing::info!(?peer, %alias, closed, "admin: KickClient");
        Ok(Response::new(KickClientResponse { closed }))
    }

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ClientsPage>, Status> {
        tracing::debug!(peer = ?request.remote_addr(), "admin: ListClients");
        let req = request.into_inner();
        let server_id = optional("server_id", &req.server_id)?;
        let account = optional("account", &req.account)?;
        let group = optional("group", &req.group)?;
        if account.is_empty() && !group.is_empty() {
            return Err(Status::invalid_argument("group: needs account"));
        }
        let scope = crate::backend_api::scope_of(account, group);
        let links = crate::backend_api::links(&self.app, server_id)?;
        let page = crate::backend_api::clients_page(
            &self.app,
            &links,
            (req.page_size, &req.page_token),
            crate::backend_api::list_clients(&scope),
        )
        .await?;
        Ok(Response::new(page))
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        tracing::info!(peer = ?request.remote_addr(), "admin: ListAccounts");
        let backend = Backend::of(&self.app.accounts).map_err(store_status)?;
        let accounts = backend.accounts().await.map_err(store_status)?;
        let text = accounts.iter().map(crate::admin::describe).collect();
        Ok(Response::new(ListAccountsResponse {
            accounts: accounts.into_iter().map(account).collect(),
            text,
        }))
    }

    async fn create_account(
        &self,
        request: Request<CreateAccountRequest>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let command = AdminCommand::Create {
            name: required("account", &req.account)?.to_owned(),
            isolate_groups: req.isolate_groups,
        };
        self.accounts(peer, "CreateAccount", command).await
    }

    async fn enable_account(
        &self,
        request: Request<AccountName>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let name = required("account", &request.get_ref().account)?.to_owned();
        self.accounts(peer, "EnableAccount", AdminCommand::Enable { name })
            .await
    }

    async fn disable_account(
        &self,
        request: Request<AccountName>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let name = required("account", &request.get_ref().account)?.to_owned();
        self.accounts(peer, "DisableAccount", AdminCommand::Disable { name })
            .await
    }

    async fn add_access_code(
        &self,
        request: Request<AddAccessCodeRequest>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let command = AdminCommand::AddCode {
            name: required("account", &req.account)?.to_owned(),
            id: (!req.id.is_empty()).then_some(req.id),
            groups: req.groups,
        };
        let mut reply = self.accounts(peer, "AddAccessCode", command).await?;
        let answer = reply.get_mut();
        answer.code = answer.text.trim().to_owned();
        Ok(reply)
    }

    async fn revoke_access_code(
        &self,
        request: Request<AccountEntry>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let (name, id) = entry(request.get_ref(), "id")?;
        self.accounts(
            peer,
            "RevokeAccessCode",
            AdminCommand::RevokeCode { name, id },
        )
        .await
    }

    async fn add_public_key(
        &self,
        request: Request<AddPublicKeyRequest>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let command = AdminCommand::AddKey {
            name: required("account", &req.account)?.to_owned(),
            key: required("key", &req.key)?.to_owned(),
            id: (!req.id.is_empty()).then_some(req.id),
            groups: req.groups,
        };
        self.accounts(peer, "AddPublicKey", command).await
    }

    async fn revoke_public_key(
        &self,
        request: Request<AccountEntry>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let (name, id) = entry(request.get_ref(), "id")?;
        self.accounts(
            peer,
            "RevokePublicKey",
            AdminCommand::RevokeKey { name, id },
        )
        .await
    }

    async fn set_role(
        &self,
        request: Request<SetRoleRequest>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let command = AdminCommand::SetRole {
            name: required("account", &req.account)?.to_owned(),
            role: required("role", &req.role)?.to_owned(),
            publish: req.publish,
            subscribe: req.subscribe,
        };
        self.accounts(peer, "SetRole", command).await
    }

    async fn remove_role(
        &self,
        request: Request<AccountEntry>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let (name, role) = entry(request.get_ref(), "id")?;
        self.accounts(peer, "RemoveRole", AdminCommand::RemoveRole { name, role })
            .await
    }

    async fn list_nodes(
        &self,
        request: Request<AccountName>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let name = required("account", &request.get_ref().account)?.to_owned();
        self.accounts(peer, "ListNodes", AdminCommand::Nodes { name })
            .await
    }

    async fn revoke_node(
        &self,
        request: Request<AccountEntry>,
    ) -> Result<Response<AccountsReply>, Status> {
        let peer = request.remote_addr();
        let (name, id) = entry(request.get_ref(), "id")?;
        self.accounts(peer, "RevokeNode", AdminCommand::RevokeNode { name, id })
            .await
    }
}

impl AdminService {
    /// Carries out `command` on the running coordinator's account store (what
    /// `coordinator accounts` does against the store itself), logged with the caller.
    async fn accounts(
        &self,
        peer: Option<std::net::SocketAddr>,
        method: &'static str,
        command: AdminCommand,
    ) -> Result<Response<AccountsReply>, Status> {
        let backend = Backend::of(&self.app.accounts).map_err(store_status)?;
        let described = format!("{command:?}");
        match backend.run(command).await {
            Ok(text) => {
                // The command, not its output: a new code is shown only to the caller.
                tracing::info!(?peer, method, command = %described, "admin: accounts changed");
                Ok(Response::new(AccountsReply {
                    text,
                    code: String::new(),
                }))
            }
            Err(e) => {
                tracing::warn!(?peer, method, command = %described, error = %e, "admin: accounts call refused");
                Err(store_status(e))
            }
        }
    }
}

/// An account's entry (`field` names the id's field in errors).
fn entry(entry: &AccountEntry, field: &str) -> Result<(String, String), Status> {
    Ok((
        required("account", &entry.account)?.to_owned(),
        required(field, &entry.id)?.to_owned(),
    ))
}

/// The store's refusal as a gRPC status.
fn store_status(e: StoreError) -> Status {
    let message = e.to_string();
    match e {
        StoreError::NoAccount(_) | StoreError::NoEntry { .. } => Status::not_found(message),
        StoreError::AccountExists(_) | StoreError::EntryExists { .. } => {
            Status::already_exists(message)
        }
        StoreError::BadName(_)
        | StoreError::BadKey { .. }
        | StoreError::BadFilter { .. }
        | StoreError::Duplicate(_) => Status::invalid_argument(message),
        StoreError::LastRole { .. } | StoreError::NotManaged => {
            Status::failed_precondition(message)
        }
        StoreError::Locked(_) | StoreError::Database(_) => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

/// An account as the API shows it (never a code's hash).
fn account(a: crate::accounts::Account) -> api::Account {
    api::Account {
        name: a.name,
        enabled: a.enabled,
        isolate_groups: a.isolate_groups,
        access_codes: a
            .access_codes
            .into_iter()
            .map(|c| api::Credential {
                id: c.id,
                revoked: c.revoked,
                groups: c.groups,
                key: String::new(),
            })
            .collect(),
        public_keys: a
            .public_keys
            .into_iter()
            .map(|k| api::Credential {
                id: k.id,
                revoked: k.revoked,
                groups: k.groups,
                key: k.key,
            })
            .collect(),
        roles: a
            .roles
            .into_iter()
            .map(|(name, r)| api::Role {
                name,
                publish: r.publish,
                subscribe: r.subscribe,
            })
            .collect(),
    }
}

/// Drains or undrains server `id`: remembered (and told again if it registers anew), out of
/// (or back in) the choice at once, and told. Returns its clients at that moment.
fn set_drained(app: &App, id: &str, drained: bool, reason: &str) -> Result<u32, Status> {
    let mut registry = lock(&app.registry);
    let entry = registry
        .get_mut(id)
        .ok_or_else(|| Status::not_found(format!("server_id: no server {id:?} is registered")))?;
    // Told first: a server whose link cannot take it is left as it was.
    if !entry.handle.send(drain_frame(drained, reason)) {
        return Err(Status::unavailable(
            "the server's link is not keeping up (it is being reconnected); nothing changed",
        ));
    }
    {
        let mut set = lock(&app.drained);
        if drained {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
    }
    // Its next load report says the same; until then no login goes there (undrained, they may
    // again at once: its next report says whether it is shutting down).
    entry.load.draining = drained;
    Ok(entry.load.clients)
}

/// `Drain` for a server link.
pub(crate) fn drain_frame(drained: bool, reason: &str) -> bytes::Bytes {
    encode(&v1::CoordinatorToServer::drain(v1::Drain {
        drained,
        reason: reason.to_owned(),
    }))
}
