//! Link 2, client negotiation: `/v1/connect` (WebSocket, stays open for further `Connect`s) and
//! `POST /v1/login` (JSON), both ending in [`place_client`]: pick an eligible server at random,
//! reserve a single-use key on it, and hand the client the server's URL and the key.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use relaymesh_net::accept::{self, ServerLink};
use relaymesh_net::link::{self, Closer, Flow, Heartbeat, WriterSetup};
use relaymesh_net::serve::{ApiError, ConnInfo};
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, client_to_coordinator::Kind, credentials};
use relaymesh_proto::{
    ErrorCode, PROTOCOL_VERSION, check_version, encode, error, error_frame, unexpected,
};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::App;
use crate::accounts::{Login, LoginError, check_name, hex_decode};
use crate::nodes::NodeFields;
use crate::registry::Claim;
use crate::server_link::ReserveFailed;
use crate::server_link::millis;
use relaymesh_net::auth::ChallengeAnswer;
use relaymesh_net::limits::TokenBucket;
use relaymesh_net::queue;

/// Most server ids a client may exclude in one request.
const MAX_EXCLUDE: usize = 64;

/// A server and key for one client.
#[derive(Debug, Serialize)]
pub(crate) struct Placement {
    server_id: String,
    url: String,
    key: String,
    expires_in_ms: u32,
}

/// Where a login was placed.
#[derive(Debug)]
pub(crate) enum Placed {
    /// A key reserved on this server.
    Offer(Placement),
    /// On the server that relayed the login and takes the identity itself (`here`): nothing
    /// reserved there, the claim counted against its capacity as a key's is.
    Relayer,
}

impl Placed {
    /// The offer of a login placed without `here`, which always has one.
    fn into_offer(self) -> Result<Placement, v1::Error> {
        match self {
            Self::Offer(p) => Ok(p),
            Self::Relayer => Err(error(
                ErrorCode::Internal,
                "a login was kept on a relaying server without one",
            )),
        }
    }
}

/// Picks a server for `identity` and reserves a key there, trying up to `reserve_attempts`
/// servers when one fails to answer; a server named `here` (the relaying server, when it
/// takes the identity itself) is claimed without a reservation.
pub(crate) async fn place_client(
    app: &App,
    identity: &v1::Identity,
    preferred: Option<&str>,
    mut exclude: Vec<String>,
    here: Option<&str>,
) -> Result<Placed, v1::Error> {
    if exclude.len() > MAX_EXCLUDE {
        return Err(error(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_EXCLUDE} servers may be excluded"),
        ));
    }
    let mut last_failure = None;
    for _ in 0..app.config.reserve_attempts {
        let claim =
            lock(&app.registry).claim(&mut rand::rng(), app.config.selection, preferred, &exclude);
        let Some(claim) = claim else {
            break;
        };
        // Given back unless the reservation succeeds, also when this login is abandoned while
        // it waits (an HTTP client that went away).
        let claim = Claimed {
            app,
            claim: Some(claim),
        };
        let Some(c) = claim.claim.as_ref() else {
            break;
        };
        if here == Some(c.id.as_str()) {
            claim.keep();
            return Ok(Placed::Relayer);
        }
        let (claim, reserved) = reserve_raced(app, claim, identity, preferred, &mut exclude).await;
        let Some(c) = claim.claim.as_ref() else {
            break;
        };
        match reserved {
            Ok(reserved) => {
                let Some(c) = claim.keep() else { break };
                return Ok(Placed::Offer(Placement {
                    url: format!("{}/v1/client", c.url.trim_end_matches('/')),
                    server_id: c.id,
                    key: reserved.key,
                    expires_in_ms: reserved.expires_in_ms,
                }));
            }
            Err(failed) => {
                let server_id = c.id.clone();
                last_failure = Some(format!("{server_id}: {}", failed.error));
                drop(claim);
                exclude.push(server_id);
            }
        }
    }
    let registered = lock(&app.registry).len();
    let detail = last_failure
        .map(|f| format!("; last failure {f}"))
        .unwrap_or_default();
    Err(error(
        ErrorCode::NoServerAvailable,
        format!(
            "no eligible comm server ({registered} registered, {} excluded){detail}",
            exclude.len()
        ),
    ))
}

/// A reservation on the claimed server, raced (after `reserve_hedge_ms`, within the hedge
/// budget, unless it is the server the client asked for) by one on another server: the first
/// key reserved wins, and the other claim is given back. Returns the winning claim, or when
/// both fail (or there is no race) the last to fail,
/// with its outcome; a failed reservation is counted and logged here, and the server of one
/// that failed first in a race is added to `exclude`.
async fn reserve_raced<'a>(
    app: &'a App,
    claim: Claimed<'a>,
    identity: &v1::Identity,
    preferred: Option<&str>,
    exclude: &mut Vec<String>,
) -> (Claimed<'a>, Result<v1::Reserved, ReserveFailed>) {
    app.hedges.made();
    let first_id = claim.claim.as_ref().map(|c| c.id.clone());
    let first = reserve_on(app, claim, identity);
    let hedge_after = app.config.reserve_hedge();
    if hedge_after.is_zero() {
        return first.await;
    }
    tokio::pin!(first);
    tokio::select! {
        done = &mut first => return done,
        () = tokio::time::sleep(hedge_after) => {}
    }
    // The first is slow: race it on another server, if there is one and the budget allows. A
    // server the client asked for is waited for: a slow answer there is not a reason to place
    // the client elsewhere.
    let Some(first_id) = first_id.filter(|id| preferred != Some(id.as_str())) else {
        return first.await;
    };
    if !app.hedges.take() {
        return first.await;
    }
    let mut others = exclude.clone();
    others.push(first_id);
    let second = lock(&app.registry)
        .claim(&mut rand::rng(), app.config.selection, None, &others)
        .map(|claim| Claimed {
            app,
            claim: Some(claim),
        });
    let Some(second) = second else {
        app.hedges.give_back();
        return first.await;
    };
    app.stats.reservations_hedged.inc();
    let second = reserve_on(app, second, identity);
    tokio::pin!(second);
    let (done, other) = tokio::select! {
        done = &mut first => (done, second.as_mut()),
        done = &mut second => (done, first.as_mut()),
    };
    if done.1.is_ok() {
        return done;
    }
    let (failed, _) = done;
    if let Some(c) = failed.claim.as_ref() {
        exclude.push(c.id.clone());
    }
    drop(failed);
    other.await
}

/// Reserves a key for `identity` on the claimed server; a failure is counted, logged (a line
/// per 10 s with the count) and, when the server answered nothing for a while, marks it
/// unresponsive.
async fn reserve_on<'a>(
    app: &'a App,
    claim: Claimed<'a>,
    identity: &v1::Identity,
) -> (Claimed<'a>, Result<v1::Reserved, ReserveFailed>) {
    let Some(c) = claim.claim.as_ref() else {
        let failed = ReserveFailed {
            error: error(ErrorCode::Internal, "no server claimed"),
            timed_out: false,
        };
        return (claim, Err(failed));
    };
    let reserved = c
        .handle
        .reserve(
            app.next_request_id(),
            identity.clone(),
            app.config.reserve_timeout(),
        )
        .await;
    if let Err(failed) = &reserved {
        app.stats.reservations_failed.inc();
        if failed.timed_out {
            lock(&app.registry).mark_unresponsive(c);
        }
        let server_id = &c.id;
        let e = &failed.error;
        // A storm on busy servers fails reservations by the thousand, and a frozen server
        // every one in flight to it: one line per 10 s with the count (the link also says
        // once when a server falls silent).
        if let Some(failed) = lock(&app.reservation_warnings).due() {
            tracing::warn!(
                %server_id,
                error = %e,
                failed,
                "reservation failed; trying another server (failed: how many failed since \
                 the last such line, this one included)"
            );
        } else {
            tracing::debug!(%server_id, error = %e, "reservation failed; trying another server");
        }
    }
    (claim, reserved)
}

/// Room for raced reservations: each reservation adds `percent` hundredths of a race, up to
/// 100 races, and each race takes one. Lock-free: every login touches it.
#[derive(Debug)]
pub(crate) struct HedgeBudget {
    /// Races available, in hundredths.
    room: AtomicU32,
    percent: u32,
}

impl HedgeBudget {
    const MOST: u32 = 100 * 100;

    pub(crate) fn new(percent: u32) -> Self {
        Self {
            room: AtomicU32::new(Self::MOST.min(percent.saturating_mul(100))),
            percent,
        }
    }

    /// A reservation is being made.
    fn made(&self) {
        let percent = self.percent;
        let _ = self
            .room
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |room| {
                (room < Self::MOST).then(|| (room + percent).min(Self::MOST))
            });
    }

    /// Gives back the room of a race that found no server to run on.
    fn give_back(&self) {
        let _ = self
            .room
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |room| {
                Some((room + 100).min(Self::MOST))
            });
    }

    /// Takes room for one race, if there is.
    fn take(&self) -> bool {
        self.room
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |room| {
                room.checked_sub(100)
            })
            .is_ok()
    }
}

/// A server claimed for a login, given back to the registry when dropped unless kept.
struct Claimed<'a> {
    app: &'a App,
    claim: Option<Claim<Arc<crate::server_link::ServerLink>>>,
}

impl Claimed<'_> {
    /// The reservation succeeded: the claim stays counted.
    fn keep(mut self) -> Option<Claim<Arc<crate::server_link::ServerLink>>> {
        self.claim.take()
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            lock(&self.app.registry).release(&claim);
        }
    }
}

/// Checks credentials against the account store and returns the identity a key will be
/// reserved for. Failures count against the source address; an address with too many is
/// refused before the store is asked.
async fn authenticate(
    app: &App,
    login: Login,
    client_id: String,
    from: IpAddr,
) -> Result<v1::Identity, v1::Error> {
    // The attempt takes its token before it is checked, so concurrent guesses cannot all slip
    // through; a successful login gives it back.
    if !app.failed_logins.take(from) {
        app.stats.logins_rate_limited.inc();
        return Err(LoginError::RateLimited.into());
    }
    if !client_id.is_empty() {
        check_name("client id", &client_id)
            .map_err(|e| error(ErrorCode::BadFrame, e.to_string()))?;
    }
    let checking = std::time::Instant::now();
    let checked = app.accounts.check(login).await;
    app.stats
        .dist
        .login_check_seconds
        .observe(checking.elapsed().as_secs_f64());
    match checked {
        Ok(grant) => {
            app.failed_logins.give_back(from);
            let mut identity = grant.identity(app.aliases.next());
            identity.client_id = client_id;
            identity.seq = app.next_login_seq();
            Ok(identity)
        }
        Err(e) => {
            if !e.is_failure() {
                app.failed_logins.give_back(from);
            }
            app.stats.logins_refused.inc();
            tracing::info!(%from, error = %e, "login refused");
            Err(e.into())
        }
    }
}

/// `GET /v1/connect`: upgrades to the negotiation link.
pub(crate) async fn upgrade(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
    mut req: Request,
) -> Response {
    let (response, on_upgrade) = match accept::accept(&mut req) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let limits = app.config.ws_limits();
    let span = tracing::debug_span!("negotiation", peer = %conn.peer);
    let tracker = app.tracker.clone();
    tracker.spawn(
        async move {
            match accept::upgraded_link(on_upgrade, &limits).await {
                Ok(socket) => run(app, socket, conn).await,
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    response
}

async fn run(app: Arc<App>, socket: ServerLink, conn: ConnInfo) {
    let _open = app.stats.negotiation_links.track();
    let (tx, rx) = queue::bounded(app.config.link_queue);
    let options = link::Options {
        writer: WriterSetup {
            ctrl: rx,
            data: None,
            closer: Closer::new(),
            linger: link::LINGER,
            direct: None,
            on_close: link::OnClose::SendQueued,
            first: link::First::Nothing,
        },
        handshake: Some(app.config.handshake_timeout()),
        shutdown: app.shutdown.clone(),
        max_burst: link::MAX_BURST,
        watch: link::Watch::Own,
    };
    let bucket = TokenBucket::new(
        f64::from(app.config.connect_rate_per_s),
        app.config.connect_burst,
    );
    let negotiation = Negotiation {
        app: app.clone(),
        tx,
        from: conn.peer.ip(),
        state: Step::Greeting,
        bucket,
        welcome: None,
    };
    let served = link::serve(socket, options, negotiation).await;
    if let Err(e) = served.outcome {
        tracing::debug!(error = %e, "closing negotiation link");
    }
}

/// Queues a reply; a client that lets its queue fill up is not reading and is dropped.
fn reply(tx: &queue::Sender<Bytes>, msg: &v1::CoordinatorToClient) -> Result<(), v1::Error> {
    send_frame(tx, encode(msg))
}

/// Queues an encoded reply; see [`reply`].
fn send_frame(tx: &queue::Sender<Bytes>, frame: Bytes) -> Result<(), v1::Error> {
    tx.try_send(frame)
        .map_err(|_| error(ErrorCode::SlowConsumer, "replies are not being read"))
}

/// Queues the held `Welcome`, if any.
fn send_welcome(tx: &queue::Sender<Bytes>, welcome: &mut Option<Bytes>) -> Result<(), v1::Error> {
    welcome.take().map_or(Ok(()), |frame| send_frame(tx, frame))
}

/// Where a negotiation link is.
enum Step {
    /// Waiting for `Hello`.
    Greeting,
    /// A key login was sent a `Challenge`; its answer is due by `deadline`.
    Challenged {
        hello: v1::Hello,
        key: v1::KeyLogin,
        nonce: [u8; 32],
        deadline: tokio::time::Instant,
    },
    /// Logged in: `Connect`s are answered.
    LoggedIn(v1::Identity),
}

/// The reading side of one negotiation link.
struct Negotiation {
    app: Arc<App>,
    /// Replies, drained by the link's writer.
    tx: queue::Sender<Bytes>,
    from: IpAddr,
    state: Step,
    /// `Connect`s allowed on this link.
    bucket: TokenBucket,
    /// `Welcome`, held until the first answer after it or the end of the burst that logged
    /// in: a client that sent `Connect` with its `Hello` gets both answers in one write.
    welcome: Option<Bytes>,
}

impl Negotiation {
    /// Checks the login and says `Welcome`.
    async fn log_in(&mut self, login: Login, client_id: String) -> Result<Flow, v1::Error> {
        let app = &self.app;
        let identity = authenticate(app, login, client_id, self.from).await?;
        let servers = lock(&app.registry)
            .iter()
            .map(|(id, e)| v1::ServerInfo {
                server_id: id.clone(),
                url: e.url.clone(),
            })
            .collect();
        self.welcome = Some(encode(&v1::CoordinatorToClient::welcome(v1::Welcome {
            protocol_version: PROTOCOL_VERSION,
            alias: identity.alias.clone(),
            servers,
            heartbeat_interval_ms: millis(app.config.heartbeat_interval()),
            heartbeat_timeout_ms: millis(app.config.heartbeat_timeout()),
            node_id: identity.node_id.clone(),
        })));
        self.state = Step::LoggedIn(identity);
        Ok(Flow::Continue)
    }
}

impl link::Handler for Negotiation {
    type In = v1::ClientToCoordinator;

    async fn first(&mut self, msg: v1::ClientToCoordinator) -> Result<Flow, v1::Error> {
        let Some(Kind::Hello(mut hello)) = msg.kind else {
            return Err(unexpected("the first message on /v1/connect must be Hello"));
        };
        check_version(hello.protocol_version, "this coordinator")?;
        match hello.credentials.take() {
            Some(v1::Credentials {
                kind: Some(credentials::Kind::Key(key)),
            }) => {
                // Challenge-response: a fresh nonce for this attempt only.
                let nonce: [u8; 32] = rand::random();
                reply(
                    &self.tx,
                    &v1::CoordinatorToClient::challenge(v1::Challenge {
                        nonce: Bytes::copy_from_slice(&nonce),
                    }),
                )?;
                let deadline = tokio::time::Instant::now() + self.app.config.handshake_timeout();
                self.state = Step::Challenged {
                    hello,
                    key,
                    nonce,
                    deadline,
                };
                Ok(Flow::Continue)
            }
            credentials => self.log_in(Login::from(credentials), hello.client_id).await,
        }
    }

    async fn message(&mut self, msg: v1::ClientToCoordinator) -> Result<Flow, v1::Error> {
        if let Step::Challenged { .. } = self.state {
            let Step::Challenged {
                hello, key, nonce, ..
            } = std::mem::replace(&mut self.state, Step::Greeting)
            else {
                return Ok(Flow::Continue);
            };
            let Some(Kind::ChallengeResponse(response)) = msg.kind else {
                return Err(unexpected(
                    "a key login must answer the Challenge with ChallengeResponse",
                ));
            };
            let login = Login::Key {
                account: key.account,
                role: key.role,
                group: key.group,
                public_key: key.public_key.to_vec(),
                nonce: nonce.to_vec(),
                signature: response.signature.to_vec(),
            };
            return self.log_in(login, hello.client_id).await;
        }
        let Step::LoggedIn(identity) = &self.state else {
            return Err(error(ErrorCode::Internal, "not logged in"));
        };
        let app = &self.app;
        // Queued right before this message's answer: the writer sends both together.
        let mut welcome = self.welcome.take();
        let tx = &self.tx;
        let mut reply = |msg: &v1::CoordinatorToClient| {
            send_welcome(tx, &mut welcome)?;
            reply(tx, msg)
        };
        match msg.kind {
            Some(Kind::Connect(connect)) => {
                let answer = if self.bucket.take(Instant::now()) {
                    let preferred =
                        Some(connect.preferred_server.as_str()).filter(|s| !s.is_empty());
                    place(
                        app,
                        identity,
                        preferred,
                        connect.exclude,
                        connect.moving,
                        None,
                    )
                    .await
                    .and_then(Placed::into_offer)
                } else {
                    Err(too_many())
                };
                let msg = match answer {
                    Ok(p) => v1::CoordinatorToClient::offer(v1::ConnectOffer {
                        server_id: p.server_id,
                        url: p.url,
                        key: p.key,
                        expires_in_ms: p.expires_in_ms,
                    }),
                    Err(e) => v1::CoordinatorToClient::error(e),
                };
                reply(&msg)?;
            }
            Some(Kind::Ping(ping)) => reply(&v1::CoordinatorToClient::pong(v1::Pong {
                nonce: ping.nonce,
            }))?,
            Some(Kind::RegisterNode(r)) => {
                let answer = if self.bucket.take(Instant::now()) {
                    register_node(app, identity, node_fields(r.name, r.location, r.info))
                        .await
                        .map(|(node_id, token)| {
                            v1::CoordinatorToClient::node_registered(v1::NodeRegistered {
                                node_id,
                                token,
                            })
                        })
                } else {
                    Err(too_many())
                };
                reply(&answer.unwrap_or_else(v1::CoordinatorToClient::error))?;
            }
            Some(Kind::UpdateNode(u)) => {
                let answer = if self.bucket.take(Instant::now()) {
                    update_node(app, identity, node_fields(u.name, u.location, u.info))
                        .await
                        .map(|()| {
                            v1::CoordinatorToClient::node_updated(v1::NodeUpdated {
                                node_id: identity.node_id.clone(),
                            })
                        })
                } else {
                    Err(too_many())
                };
                reply(&answer.unwrap_or_else(v1::CoordinatorToClient::error))?;
            }
            Some(Kind::Hello(_)) => {
                return Err(unexpected("Hello was already sent on this link"));
            }
            Some(Kind::ChallengeResponse(_)) => {
                return Err(unexpected("no challenge is pending on this link"));
            }
            None => return Err(relaymesh_proto::empty("ClientToCoordinator")),
        }
        Ok(Flow::Continue)
    }

    /// A login's `Welcome` that no answer took along goes out now.
    async fn burst_end(&mut self) -> Result<Flow, v1::Error> {
        send_welcome(&self.tx, &mut self.welcome)?;
        Ok(Flow::Continue)
    }

    fn heartbeat(&self) -> Heartbeat {
        self.app.config.heartbeat()
    }

    /// A challenge left unanswered past the handshake timeout ends the link.
    async fn wake(&mut self) -> Result<Flow, v1::Error> {
        let Step::Challenged { deadline, .. } = &self.state else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(*deadline).await;
        Err(error(
            ErrorCode::HeartbeatTimeout,
            format!(
                "no first message within {} ms",
                self.app.config.handshake_timeout().as_millis()
            ),
        ))
    }

    fn stopping(&mut self) -> Result<(), v1::Error> {
        Err(error(
            ErrorCode::ShuttingDown,
            "coordinator is shutting down",
        ))
    }

    fn last_words(&self, error: v1::Error) -> Option<Bytes> {
        Some(error_frame::<v1::CoordinatorToClient>(error))
    }
}

/// A negotiation link asked for more than `connect_rate_per_s` allows.
fn too_many() -> v1::Error {
    error(
        ErrorCode::LimitExceeded,
        "too many requests on this link (Connect, RegisterNode, UpdateNode); slow down",
    )
}

fn node_fields(name: String, location: String, info: String) -> NodeFields {
    NodeFields {
        name,
        location,
        info,
    }
}

/// Registers a node for the logged-in `identity` (see [`crate::nodes`]).
async fn register_node(
    app: &App,
    identity: &v1::Identity,
    fields: NodeFields,
) -> Result<(String, String), v1::Error> {
    let fields = fields.checked(app.config.max_node_info_bytes)?;
    let (id, token) = app.accounts.register_node(identity, fields).await?;
    app.stats.nodes_registered.inc();
    tracing::info!(account = %identity.account, node = %id, "node registered");
    Ok((id, token))
}

/// Updates the node `identity` is.
async fn update_node(
    app: &App,
    identity: &v1::Identity,
    fields: NodeFields,
) -> Result<(), v1::Error> {
    let fields = fields.checked(app.config.max_node_info_bytes)?;
    app.accounts.update_node(identity, fields.clone()).await?;
    let mut directory = lock(&app.directory);
    let change = directory.update(
        &identity.scope,
        &identity.node_id,
        &fields.name,
        &fields.location,
        &fields.info,
    );
    crate::server_link::push_presence(&lock(&app.registry), change.into_iter().collect());
    Ok(())
}

/// [`place_client`] with login accounting.
async fn place(
    app: &App,
    identity: &v1::Identity,
    preferred: Option<&str>,
    exclude: Vec<String>,
    moving: bool,
    here: Option<&str>,
) -> Result<Placed, v1::Error> {
    let placing = std::time::Instant::now();
    let result = place_client(app, identity, preferred, exclude, here).await;
    app.stats
        .dist
        .login_placement_seconds
        .observe(placing.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            app.stats.logins.inc();
            // A client moving off a drained server closes its old session itself, once read
            // to the end.
            if !identity.client_id.is_empty() && !moving {
                replace_older(app, identity);
            }
        }
        Err(_) => app.stats.login_failures.inc(),
    }
    result
}

/// Tells every server that `identity` logged in again, so sessions of its earlier logins close
/// with `REPLACED` wherever they are. Every server, because the older session may sit on any.
fn replace_older(app: &App, identity: &v1::Identity) {
    let frame = encode(&v1::CoordinatorToServer::replace(v1::Replace {
        account: identity.account.clone(),
        client_id: identity.client_id.clone(),
        seq: identity.seq,
        role: identity.role.clone(),
    }));
    let links: Vec<_> = lock(&app.registry)
        .iter()
        .map(|(_, e)| e.handle.clone())
        .collect();
    for link in links {
        if !link.send_lossy(frame.clone()) {
            app.stats.replace_dropped.inc();
        }
    }
}

/// Body of `POST /v1/login`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LoginRequest {
    credentials: Option<LoginCredentials>,
    /// Optional unique id of the client within its account (see `Hello.client_id`).
    client_id: String,
    preferred_server: Option<String>,
    exclude: Vec<String>,
    /// The client is moving off a drained server and keeps that session until it has read it
    /// to the end (see `Connect.moving`): this login does not replace it.
    moving: bool,
}

/// JSON form of [`v1::Credentials`]: `{"anonymous": {}}`, `{"access_code": {"account": ...,
/// "code": ..., "role": ..., "group": ...}}` (role and group optional), `{"key": {...}}` or
/// `{"node_token": {"token": ...}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum LoginCredentials {
    Anonymous {},
    AccessCode {
        account: String,
        code: String,
        #[serde(default)]
        role: String,
        #[serde(default)]
        group: String,
    },
    /// An Ed25519 key: `public_key` and `signature` in hex, `challenge_id` from
    /// `POST /v1/login/challenge`.
    Key {
        account: String,
        public_key: String,
        #[serde(default)]
        role: String,
        #[serde(default)]
        group: String,
        challenge_id: String,
        signature: String,
    },
    /// A registered node's token.
    NodeToken {
        token: String,
    },
}

impl LoginCredentials {
    /// The login these credentials ask for; a key login takes (and so uses up) its challenge.
    fn into_login(self, app: &App) -> Result<Login, LoginError> {
        Ok(match self {
            Self::Anonymous {} => Login::Anonymous,
            Self::AccessCode {
                account,
                code,
                role,
                group,
            } => Login::Code {
                account,
                code,
                role,
                group,
            },
            Self::Key {
                account,
                public_key,
                role,
                group,
                challenge_id,
                signature,
            } => {
                let bad = || LoginError::BadSignature(account.clone());
                let nonce = app.challenges.take(&challenge_id).ok_or_else(bad)?;
                Login::Key {
                    public_key: hex_decode(&public_key).ok_or_else(bad)?,
                    signature: hex_decode(&signature).ok_or_else(bad)?,
                    nonce,
                    account,
                    role,
                    group,
                }
            }
            Self::NodeToken { token } => Login::NodeToken { token },
        })
    }
}

/// `POST /v1/login/challenge`: a single-use challenge for an Ed25519 login over HTTP.
pub(crate) async fn challenge(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
) -> Result<Json<ChallengeAnswer>, ApiError> {
    app.challenges
        .answer_for(&app.challenge_limits, conn.peer.ip())
        .map(Json)
}

/// Answer of `POST /v1/login`.
#[derive(Debug, Serialize)]
pub(crate) struct LoginResponse {
    alias: String,
    /// The node the login is (omitted when none).
    #[serde(skip_serializing_if = "String::is_empty")]
    node_id: String,
    #[serde(flatten)]
    placement: Placement,
}

/// The JSON body of a login-like request (`POST /v1/login`, `/v1/nodes`, `/v1/nodes/update`);
/// an empty body is `T::default()`.
fn json_body<T: serde::de::DeserializeOwned + Default>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    // The route's body limit (`max_login_body_bytes`) stops reading early; say so as JSON.
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::LimitExceeded,
            format!(
                "request body is larger than {} bytes",
                app.config.max_login_body_bytes
            ),
        ),
        status => ApiError::new(status, ErrorCode::BadFrame, e.body_text()),
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            format!("invalid request JSON: {e}"),
        )
    })
}

/// Checks the credentials of an HTTP request and returns the identity they log in as.
async fn http_identity(
    app: &App,
    credentials: Option<LoginCredentials>,
    client_id: String,
    from: IpAddr,
) -> Result<v1::Identity, ApiError> {
    let login = credentials.map_or(Ok(Login::Anonymous), |c| c.into_login(app));
    identity_of(app, login, client_id, from)
        .await
        .map_err(ApiError::from)
}

/// Checks a login whose challenge (if any) was taken already, and returns its identity.
async fn identity_of(
    app: &App,
    login: Result<Login, LoginError>,
    client_id: String,
    from: IpAddr,
) -> Result<v1::Identity, v1::Error> {
    match login {
        Ok(login) => authenticate(app, login, client_id, from).await,
        Err(e) => {
            // An unknown or used challenge is a failed attempt like a bad signature.
            if !app.failed_logins.take(from) {
                app.stats.logins_rate_limited.inc();
                return Err(LoginError::RateLimited.into());
            }
            app.stats.logins_refused.inc();
            Err(e.into())
        }
    }
}

/// A `Login` relayed by comm server `relayer` (`RelayedLogin`): checked and placed as
/// `POST /v1/login` would, with the relaying server preferred (unless the client named
/// another), so a client that dialled an eligible server stays there and the coordinator
/// opens no connection for it. A key login carries the challenge of
/// `POST /v1/login/challenge`, as over HTTP. The login is given up, before anything is
/// reserved or replaced, once three quarters of the time the relaying server waits have gone:
/// its answer would find nobody waiting, and the client logging in again meanwhile.
pub(crate) async fn relayed_login(
    app: &App,
    relayer: &str,
    relayed: v1::RelayedLogin,
) -> v1::RelayedLoginAnswer {
    let request_id = relayed.request_id;
    app.stats.logins_relayed.inc();
    let budget = match relayed.within_ms {
        0 => app.config.reserve_timeout() * app.config.reserve_attempts,
        ms => std::time::Duration::from_millis(u64::from(ms) * 3 / 4),
    };
    let placed = async {
        let login = relayed.login.unwrap_or_default();
        check_version(login.protocol_version, "this coordinator")?;
        let from: IpAddr = relayed.from.parse().map_err(|_| {
            error(
                ErrorCode::BadFrame,
                format!("RelayedLogin.from {:?} is not an IP address", relayed.from),
            )
        })?;
        let credentials = match login.credentials.and_then(|c| c.kind) {
            Some(credentials::Kind::Key(key)) => app
                .challenges
                .take(&key.challenge_id)
                .ok_or_else(|| LoginError::BadSignature(key.account.clone()))
                .map(|nonce| Login::Key {
                    public_key: key.public_key.to_vec(),
                    signature: key.signature.to_vec(),
                    nonce,
                    account: key.account,
                    role: key.role,
                    group: key.group,
                }),
            other => Ok(Login::from(
                other.map(|kind| v1::Credentials { kind: Some(kind) }),
            )),
        };
        let identity = identity_of(app, credentials, login.client_id, from).await?;
        let preferred = Some(login.preferred_server.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(relayer);
        let here = relayed.takes_identity.then_some(relayer);
        let placed = place(
            app,
            &identity,
            Some(preferred),
            login.exclude,
            login.moving,
            here,
        )
        .await?;
        Ok((placed, identity))
    };
    let placed = tokio::time::timeout(budget, placed)
        .await
        .unwrap_or_else(|_| {
            app.stats.login_failures.inc();
            Err(error(
                ErrorCode::Unavailable,
                format!(
                    "the login was not placed within {} ms, most of the time the relaying \
                     server waits",
                    budget.as_millis()
                ),
            ))
        });
    match placed {
        Ok((Placed::Offer(p), _)) => v1::RelayedLoginAnswer {
            request_id,
            offer: Some(v1::ConnectOffer {
                server_id: p.server_id,
                url: p.url,
                key: p.key,
                expires_in_ms: p.expires_in_ms,
            }),
            ..Default::default()
        },
        Ok((Placed::Relayer, identity)) => v1::RelayedLoginAnswer {
            request_id,
            identity: Some(identity),
            ..Default::default()
        },
        Err(e) => v1::RelayedLoginAnswer {
            request_id,
            error: Some(e),
            ..Default::default()
        },
    }
}

/// `POST /v1/login`: the same choice as `/v1/connect`, as JSON.
pub(crate) async fn login(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LoginResponse>, ApiError> {
    let request: LoginRequest = json_body(&app, body)?;
    // Set up (among the listener's `max_setups`) once its request is read: what follows waits
    // on the account store and a comm server, not on this process, and must not hold a place.
    drop(conn.claim_setup());
    let identity =
        http_identity(&app, request.credentials, request.client_id, conn.peer.ip()).await?;
    let placement = place(
        &app,
        &identity,
        request.preferred_server.as_deref(),
        request.exclude,
        request.moving,
        None,
    )
    .await
    .and_then(Placed::into_offer)?;
    Ok(Json(LoginResponse {
        alias: identity.alias,
        node_id: identity.node_id,
        placement,
    }))
}

/// Body of `POST /v1/nodes` and `POST /v1/nodes/update`: credentials as for `/v1/login`, and
/// the node's fields.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct NodeRequest {
    credentials: Option<LoginCredentials>,
    name: String,
    location: String,
    /// A JSON object (not text, unlike the protobuf field).
    info: Option<serde_json::Value>,
}

impl NodeRequest {
    fn fields(&mut self) -> NodeFields {
        NodeFields {
            name: std::mem::take(&mut self.name),
            location: std::mem::take(&mut self.location),
            info: self.info.take().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// A `/v1/nodes...` body: who its credentials log in as, and the node's fields.
async fn node_request(
    app: &App,
    conn: &ConnInfo,
    body: Result<Bytes, BytesRejection>,
) -> Result<(v1::Identity, NodeFields), ApiError> {
    let mut request: NodeRequest = json_body(app, body)?;
    let credentials = request.credentials.take();
    let identity = http_identity(app, credentials, String::new(), conn.peer.ip()).await?;
    Ok((identity, request.fields()))
}

/// Answer of `POST /v1/nodes`: the token is shown this once.
#[derive(Debug, Serialize)]
pub(crate) struct NodeRegisteredJson {
    node_id: String,
    token: String,
}

/// `POST /v1/nodes`: registers a node of the logged-in account, role and group.
pub(crate) async fn register_node_http(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<NodeRegisteredJson>, ApiError> {
    let (identity, fields) = node_request(&app, &conn, body).await?;
    let (node_id, token) = register_node(&app, &identity, fields).await?;
    Ok(Json(NodeRegisteredJson { node_id, token }))
}

/// Answer of `POST /v1/nodes/update`.
#[derive(Debug, Serialize)]
pub(crate) struct NodeUpdatedJson {
    node_id: String,
}

/// `POST /v1/nodes/update`: replaces the name, location and info of the node the credentials
/// (a node token or an Ed25519 key) log in as.
pub(crate) async fn update_node_http(
    State(app): State<Arc<App>>,
    Extension(conn): Extension<ConnInfo>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<NodeUpdatedJson>, ApiError> {
    let (identity, fields) = node_request(&app, &conn, body).await?;
    update_node(&app, &identity, fields).await?;
    Ok(Json(NodeUpdatedJson {
        node_id: identity.node_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::HedgeBudget;

    #[test]
    fn races_are_a_share_of_the_reservations_with_bursts_of_up_to_100() {
        let budget = HedgeBudget::new(10);
        // It starts with room for a share of a hundred reservations...
        assert_eq!((0..20).filter(|_| budget.take()).count(), 10);
        // ...and each ten reservations make room for one more.
        (0..25).for_each(|_| budget.made());
        assert_eq!((0..20).filter(|_| budget.take()).count(), 2);
        // Room gathers up to a burst of 100.
        (0..100_000).for_each(|_| budget.made());
        assert_eq!((0..1_000).filter(|_| budget.take()).count(), 100);
        // A race that found no server to run on gives its room back.
        budget.give_back();
        assert!(budget.take());
        assert!(!budget.take());
        let never = HedgeBudget::new(0);
        (0..1_000).for_each(|_| never.made());
        assert!(!never.take());
    }
}
