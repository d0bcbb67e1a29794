//! The server API for application backends (`relaymesh.admin.v1.Backend`), on the admin
//! listener beside `Admin`, with the same token, and its HTTP JSON twin (`POST /api/<method>`,
//! the same messages through serde). Also the cluster-wide lists both services page through.
//!
//! The coordinator holds no subscriptions: it asks the comm servers (`ServerQuery` on their
//! links) and merges their answers. A publish goes through one comm server (the same one for
//! a sender while the servers taking clients stay the same), whose publish path delivers it
//! like a client's message: to its own subscribers, and once to each peer with interest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use relaymesh_net::sync::lock;
use relaymesh_proto::admin::backend_server::Backend;
use relaymesh_proto::admin::{
    BroadcastRequest, ChangeSubscriptionsRequest, ChangeSubscriptionsResponse, Client, ClientsPage,
    KickClientRequest, KickClientResponse, PresenceRequest, PublishRequest, PublishResponse,
    TopicSubscribers, TopicsPage, TopicsRequest,
};
use relaymesh_proto::v1::{self, server_answer::Kind as Answer, server_query::Kind as Query};
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq as _;
use tonic::{Request, Response as GrpcResponse, Status};

use crate::App;
use crate::server_link::ServerLink;

/// How long a server has to answer a query.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Items in a page when the request names no size, and the most.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1_000;
/// Most topics in one `Broadcast`.
const MAX_BROADCAST: usize = 1_000;
/// The alias of a backend's messages when the request names none.
const DEFAULT_SENDER: &str = "backend";
/// How long a server has to make a subscription change (it waits for its session and its
/// peers, up to twice its `subscribe_sync_timeout_ms`).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most topics in one subscription change.
const MAX_CHANGE_TOPICS: usize = 100;

/// Room kept in a server link's frame for a backend publish's envelope and scope.
const QUERY_OVERHEAD: usize = 1_024;
/// Longest name (account, group, topic, sender, alias, token) taken.
const MAX_TEXT: usize = 256;

pub(crate) struct BackendService {
    pub(crate) app: Arc<App>,
}

/// `field` must be non-empty and at most [`MAX_TEXT`] bytes.
pub(crate) fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    optional(field, value)
}

pub(crate) fn optional<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.len() > MAX_TEXT {
        return Err(Status::invalid_argument(format!(
            "{field}: longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(value)
}

/// The routing scope of `account` (and `group`, for an account that isolates groups).
fn scope(account: &str, group: &str) -> Result<String, Status> {
    let account = required("account", account)?;
    Ok(scope_of(account, optional("group", group)?))
}

/// `account`, or `account#group` (the scope of an isolated group).
pub(crate) fn scope_of(account: &str, group: &str) -> String {
    if group.is_empty() {
        account.to_owned()
    } else {
        format!("{account}#{group}")
    }
}

/// Whether `given` is the admin token (compared in constant time).
pub(crate) fn token_matches(token: &str, given: &str) -> bool {
    bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

/// The size of a page.
fn page_size(asked: u32) -> u32 {
    if asked == 0 {
        DEFAULT_PAGE
    } else {
        asked.min(MAX_PAGE)
    }
}

/// The links of the registered servers (of `only`, if named: `NOT_FOUND` if it is not), by id.
pub(crate) fn links(app: &App, only: &str) -> Result<Vec<(String, Arc<ServerLink>)>, Status> {
    let registry = lock(&app.registry);
    let mut links: Vec<(String, Arc<ServerLink>)> = registry
        .iter()
        .filter(|(id, _)| only.is_empty() || *id == only)
        .map(|(id, e)| (id.to_owned(), e.handle.clone()))
        .collect();
    if !only.is_empty() && links.is_empty() {
        return Err(Status::not_found(format!(
            "server_id: no server {only:?} is registered"
        )));
    }
    links.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(links)
}

/// One page of items gathered from every server in `links`: each is asked (`query(after,
/// limit)`) for its first `size` items after `token` (`page`), the answers are merged by `key` (items
/// with the same key combined with `combine`), and the first `size` kept. Fails `UNAVAILABLE`
/// when a server does not answer: a page missing a server's items would be wrong, not short.
async fn gather<T>(
    app: &App,
    links: &[(String, Arc<ServerLink>)],
    (size, token): (u32, &str),
    query: impl Fn(&str, u32) -> Query,
    items: impl Fn(&str, Answer) -> Option<(Vec<T>, bool)>,
    key: impl Fn(&T) -> String,
    combine: impl Fn(&mut T, T),
) -> Result<(Vec<T>, String), Status> {
    let asked = links.iter().map(|(id, link)| {
        let q = query(token, size);
        async move { (id, link.ask(app.next_request_id(), q, QUERY_TIMEOUT).await) }
    });
    let mut merged: BTreeMap<String, T> = BTreeMap::new();
    // A server that has more answered with its first items only (a page, or what fits in a
    // frame): past its last key, items of its own may be missing, so the page ends there.
    let mut cut: Option<String> = None;
    for (id, answer) in futures_util::future::join_all(asked).await {
        let answer = answer
            .ok_or_else(|| Status::unavailable(format!("server {id} did not answer; try again")))?;
        if let Answer::Error(e) = answer {
            return Err(Status::invalid_argument(format!("server {id}: {e}")));
        }
        let (list, more) = items(id, answer)
            .ok_or_else(|| Status::internal(format!("server {id} answered something else")))?;
        if more && let Some(last) = list.last().map(&key) {
            cut = Some(match cut {
                Some(c) if c <= last => c,
                _ => last,
            });
        }
        for item in list {
            match merged.entry(key(&item)) {
                std::collections::btree_map::Entry::Occupied(mut e) => combine(e.get_mut(), item),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(item);
                }
            }
        }
    }
    let limit = usize::try_from(size).unwrap_or(usize::MAX);
    let mut page: Vec<T> = merged
        .into_values()
        .take_while(|item| cut.as_ref().is_none_or(|c| key(item) <= *c))
        .take(limit.saturating_add(1))
        .collect();
    let more = cut.is_some() || page.len() > limit;
    page.truncate(limit);
    let next = match page.last() {
        Some(last) if more => key(last),
        _ => String::new(),
    };
    Ok((page, next))
}

/// A server's clients as the API shows them.
fn clients_of(server_id: &str, answer: Answer) -> Option<(Vec<Client>, bool)> {
    let Answer::Clients(list) = answer else {
        return None;
    };
    let clients = list
        .clients
        .into_iter()
        .map(|c| Client {
            alias: c.alias,
            server_id: server_id.to_owned(),
            scope: c.scope,
            role: c.role,
            client_id: c.client_id,
            node_id: c.node_id,
            topics: c.topics,
        })
        .collect();
    Some((clients, list.more))
}

/// A page of clients on the servers of `links`, each asked with `query(after, limit)` (a
/// `ListClients` or a `TopicPresence`), by alias.
pub(crate) async fn clients_page(
    app: &App,
    links: &[(String, Arc<ServerLink>)],
    (size, token): (u32, &str),
    query: impl Fn(&str, u32) -> Query,
) -> Result<ClientsPage, Status> {
    let (clients, next_page_token) = gather(
        app,
        links,
        (page_size(size), optional("page_token", token)?),
        query,
        clients_of,
        |c: &Client| c.alias.clone(),
        |_, _| {},
    )
    .await?;
    Ok(ClientsPage {
        clients,
        next_page_token,
    })
}

/// The clients of `scope` (all, if empty), a page at a time.
pub(crate) fn list_clients(scope: &str) -> impl Fn(&str, u32) -> Query + '_ {
    move |after, limit| {
        Query::ListClients(v1::ListClients {
            scope: scope.to_owned(),
            after: after.to_owned(),
            limit,
        })
    }
}

/// Closes the sessions of alias `alias` on every server; how many.
pub(crate) async fn kick(app: &App, request: KickClientRequest) -> Result<u32, Status> {
    let alias = required("alias", &request.alias)?;
    let reason = optional("reason", &request.reason)?;
    let links = links(app, "")?;
    let asked = links.iter().map(|(_, link)| {
        let kick = Query::Kick(v1::Kick {
            alias: alias.to_owned(),
            reason: reason.to_owned(),
        });
        async move {
            match link.ask(app.next_request_id(), kick, QUERY_TIMEOUT).await {
                Some(Answer::Kicked(n)) => Some(n),
                _ => None,
            }
        }
    });
    let answers = futures_util::future::join_all(asked).await;
    let closed = answers
        .iter()
        .flatten()
        .fold(0u32, |sum, n| sum.saturating_add(*n));
    let silent = answers.iter().filter(|a| a.is_none()).count();
    if closed == 0 && silent > 0 {
        return Err(Status::unavailable(format!(
            "{silent} server(s) did not answer; the client may still be connected"
        )));
    }
    Ok(closed)
}

impl BackendService {
    /// Subscribes (or unsubscribes) the sessions of `request.alias`, wherever they are.
    async fn change(
        &self,
        request: ChangeSubscriptionsRequest,
        unsubscribe: bool,
    ) -> Result<ChangeSubscriptionsResponse, Status> {
        let alias = required("alias", &request.alias)?.to_owned();
        if request.topics.is_empty() || request.topics.len() > MAX_CHANGE_TOPICS {
            return Err(Status::invalid_argument(format!(
                "topics: 1 to {MAX_CHANGE_TOPICS} topics"
            )));
        }
        for topic in &request.topics {
            required("topics", topic)?;
        }
        let links = links(&self.app, "")?;
        let asked = links.iter().map(|(id, link)| {
            let query = Query::Subscriptions(v1::ChangeSubscriptions {
                alias: alias.clone(),
                topics: request.topics.clone(),
                unsubscribe,
            });
            async move {
                let answer = link
                    .ask(self.app.next_request_id(), query, CHANGE_TIMEOUT)
                    .await;
                (id, answer)
            }
        });
        let mut changed = 0u32;
        let mut refused = None;
        let mut silent = Vec::new();
        for (id, answer) in futures_util::future::join_all(asked).await {
            match answer {
                Some(Answer::Changed(n)) => changed = changed.saturating_add(n),
                Some(Answer::Error(e)) => refused = Some(e),
                _ => silent.push(id.clone()),
            }
        }
        if changed > 0 {
            return Ok(ChangeSubscriptionsResponse { changed });
        }
        if let Some(e) = refused {
            return Err(match e.error_code() {
                v1::ErrorCode::LimitExceeded => Status::resource_exhausted(e.message),
                _ => Status::invalid_argument(e.message),
            });
        }
        if !silent.is_empty() {
            return Err(Status::unavailable(format!(
                "server(s) {silent:?} did not answer; the client may be there"
            )));
        }
        Err(Status::not_found(format!(
            "alias: no server holds a client {alias:?} (or it already had that)"
        )))
    }

    /// Publishes `payload` on `topics` of `scope` through a random server taking clients.
    async fn publish(
        &self,
        scope: String,
        topics: Vec<String>,
        payload: Vec<u8>,
        sender: &str,
    ) -> Result<PublishResponse, Status> {
        let sender = match optional("sender", sender)? {
            "" => DEFAULT_SENDER,
            sender => sender,
        };
        // The query must fit in one frame of the server link (`max_frame_bytes`, which the
        // servers share by default); each server checks its own payload limit as well.
        let size = payload.len() + topics.iter().map(|t| t.len() + 4).sum::<usize>() + sender.len();
        let room = self
            .app
            .config
            .max_frame_bytes
            .saturating_sub(QUERY_OVERHEAD);
        if size > room {
            return Err(Status::invalid_argument(format!(
                "payload: {} bytes with its topics exceed the {room} bytes a publish may take (max_frame_bytes)",
                payload.len()
            )));
        }
        // One server per (scope, sender), by rendezvous hashing over those taking clients: a
        // backend that awaits each publish has them delivered in order, as one client's
        // (through one server and its links); senders spread over the servers.
        let link = {
            let registry = lock(&self.app.registry);
            registry
                .iter()
                .filter(|(_, e)| !e.load.draining && !e.unresponsive)
                .max_by_key(|(id, _)| rendezvous(id, &scope, sender))
                .map(|(id, e)| (id.to_owned(), e.handle.clone()))
        };
        let Some((server_id, link)) = link else {
            return Err(Status::unavailable("no comm server is registered"));
        };
        let query = Query::Publish(v1::BackendPublish {
            scope,
            topics,
            payload: payload.into(),
            sender: sender.to_owned(),
        });
        match link
            .ask(self.app.next_request_id(), query, QUERY_TIMEOUT)
            .await
        {
            Some(Answer::Published(p)) => Ok(PublishResponse {
                reached: p.reached,
                server_id,
            }),
            Some(Answer::Error(e)) => Err(Status::invalid_argument(e.message)),
            // Not known to be published, nor known not to be: the caller decides.
            _ => Err(Status::unavailable(format!(
                "server {server_id} did not confirm the publish in time; it may or may not have gone out"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Backend for BackendService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<GrpcResponse<PublishResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let scope = scope(&req.account, &req.group)?;
        let topic = required("topic", &req.topic)?.to_owned();
        tracing::debug!(?peer, %scope, %topic, "backend: Publish");
        let answer =
            BackendService::publish(self, scope, vec![topic], req.payload, &req.sender).await?;
        Ok(GrpcResponse::new(answer))
    }

    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<GrpcResponse<PublishResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let scope = scope(&req.account, &req.group)?;
        if req.topics.is_empty() || req.topics.len() > MAX_BROADCAST {
            return Err(Status::invalid_argument(format!(
                "topics: 1 to {MAX_BROADCAST} topics"
            )));
        }
        for topic in &req.topics {
            required("topics", topic)?;
        }
        tracing::debug!(?peer, %scope, topics = req.topics.len(), "backend: Broadcast");
        let answer =
            BackendService::publish(self, scope, req.topics, req.payload, &req.sender).await?;
        Ok(GrpcResponse::new(answer))
    }

    async fn topics(
        &self,
        request: Request<TopicsRequest>,
    ) -> Result<GrpcResponse<TopicsPage>, Status> {
        let req = request.into_inner();
        let scope = scope(&req.account, &req.group)?;
        let prefix = optional("prefix", &req.prefix)?;
        let size = page_size(req.page_size);
        let links = links(&self.app, "")?;
        let (topics, next_page_token) = gather(
            &self.app,
            &links,
            (size, optional("page_token", &req.page_token)?),
            |after, limit| {
                Query::Topics(v1::ListTopics {
                    scope: scope.clone(),
                    prefix: prefix.to_owned(),
                    after: after.to_owned(),
                    limit,
                })
            },
            |_, answer| match answer {
                Answer::Topics(list) => Some((
                    list.topics
                        .into_iter()
                        .map(|t| TopicSubscribers {
                            topic: t.topic,
                            subscribers: t.subscribers,
                        })
                        .collect(),
                    list.more,
                )),
                _ => None,
            },
            |t: &TopicSubscribers| t.topic.clone(),
            |sum, t| sum.subscribers = sum.subscribers.saturating_add(t.subscribers),
        )
        .await?;
        Ok(GrpcResponse::new(TopicsPage {
            topics,
            next_page_token,
        }))
    }

    async fn presence(
        &self,
        request: Request<PresenceRequest>,
    ) -> Result<GrpcResponse<ClientsPage>, Status> {
        let req = request.into_inner();
        let scope = scope(&req.account, &req.group)?;
        let topic = required("topic", &req.topic)?;
        let links = links(&self.app, "")?;
        let page = clients_page(
            &self.app,
            &links,
            (req.page_size, &req.page_token),
            |after, limit| {
                Query::Presence(v1::TopicPresence {
                    scope: scope.clone(),
                    topic: topic.to_owned(),
                    after: after.to_owned(),
                    limit,
                })
            },
        )
        .await?;
        Ok(GrpcResponse::new(page))
    }

    async fn disconnect(
        &self,
        request: Request<KickClientRequest>,
    ) -> Result<GrpcResponse<KickClientResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let alias = req.alias.clone();
        let closed = kick(&self.app, req).await?;
        tracing::info!(?peer, %alias, closed, "backend: Disconnect");
        Ok(GrpcResponse::new(KickClientResponse { closed }))
    }

    async fn subscribe(
        &self,
        request: Request<ChangeSubscriptionsRequest>,
    ) -> Result<GrpcResponse<ChangeSubscriptionsResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        tracing::info!(?peer, alias = %req.alias, topics = ?req.topics, "backend: Subscribe");
        Ok(GrpcResponse::new(self.change(req, false).await?))
    }

    async fn unsubscribe(
        &self,
        request: Request<ChangeSubscriptionsRequest>,
    ) -> Result<GrpcResponse<ChangeSubscriptionsResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        tracing::info!(?peer, alias = %req.alias, topics = ?req.topics, "backend: Unsubscribe");
        Ok(GrpcResponse::new(self.change(req, true).await?))
    }
}

/// The weight of server `id` for a backend's publishes from `sender` in `scope`.
fn rendezvous(id: &str, scope: &str, sender: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // Stable for the process's life, which is all the order needs (a restart re-picks).
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (id, scope, sender).hash(&mut hasher);
    hasher.finish()
}

/// The HTTP JSON twin: `POST /api/<method>`, authorized like the gRPC calls.
pub(crate) fn http(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/api/{method}", axum::routing::post(call))
        .with_state(Arc::new(BackendService { app }))
}

/// The token of an HTTP call: `authorization: Bearer <token>` or `x-api-key: <token>`.
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    bearer
        .or(key)
        .is_some_and(|given| token_matches(&app.config.admin_token, given))
}

async fn call(
    State(service): State<Arc<BackendService>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&service.app, &headers) {
        tracing::warn!(%method, "backend HTTP API: missing or wrong token");
        return refusal(Status::unauthenticated(
            "missing or wrong token (`authorization: Bearer <token>` or `x-api-key: <token>`)",
        ));
    }
    let s = &*service;
    match method.as_str() {
        "publish" => json_call(body, |r| Backend::publish(s, r)).await,
        "broadcast" => json_call(body, |r| Backend::broadcast(s, r)).await,
        "topics" => json_call(body, |r| Backend::topics(s, r)).await,
        "presence" => json_call(body, |r| Backend::presence(s, r)).await,
        "disconnect" => json_call(body, |r| Backend::disconnect(s, r)).await,
        "subscribe" => json_call(body, |r| Backend::subscribe(s, r)).await,
        "unsubscribe" => json_call(body, |r| Backend::unsubscribe(s, r)).await,
        _ => refusal(Status::not_found(format!(
            "no method {method:?}: publish, broadcast, topics, presence, disconnect, subscribe or unsubscribe"
        ))),
    }
}

/// Parses `body` as the request, calls the gRPC method, and answers its response as JSON.
async fn json_call<Req, Res, F>(
    body: axum::body::Bytes,
    method: impl FnOnce(Request<Req>) -> F,
) -> Response
where
    Req: DeserializeOwned,
    Res: Serialize,
    F: std::future::Future<Output = Result<GrpcResponse<Res>, Status>>,
{
    let request: Req = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return refusal(Status::invalid_argument(format!("request body: {e}"))),
    };
    match method(Request::new(request)).await {
        Ok(answer) => axum::Json(answer.into_inner()).into_response(),
        Err(status) => refusal(status),
    }
}

/// A refused call as HTTP: the status that matches the gRPC code and
/// `{"code": "INVALID_ARGUMENT", "message": ...}`.
fn refusal(status: Status) -> Response {
    use tonic::Code;
    let http = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = format!("{:?}", status.code());
    let body = serde_json::json!({
        "code": screaming(&code),
        "message": status.message(),
    });
    (http, axum::Json(body)).into_response()
}

/// `InvalidArgument` → `INVALID_ARGUMENT`.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
