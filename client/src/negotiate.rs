//! The client's side of link 2: asking the coordinator for a server and a key, with
//! `POST /v1/login` or, for a key login, on a negotiation link (`/v1/connect`; see [`Round`]).
//! One round may ask for several offers, when an offered server turns out to be unreachable; a
//! negotiation link serves one round and is then closed, and the next round opens a new one.
//!
//! With several coordinators (`ClientConfig::coordinator` is a comma-separated list), a round
//! starts with the one that answered last and moves on to the next when one cannot be
//! reached, breaks, is shutting down, or has no server to offer (a coordinator that has just
//! restarted has an empty registry for a moment). A refusal of the credentials is the same
//! everywhere and ends the round.

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use relaymesh_net::ws::{self, ClientSocket};
use relaymesh_proto::v1::{self, coordinator_to_client::Kind};
use relaymesh_proto::{PROTOCOL_VERSION, decode_frame, encode};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{ClientConfig, ClientError, Credentials};

/// The coordinator of the list that answered last, by list: where the next round starts.
static LAST_GOOD: std::sync::Mutex<Option<(String, String)>> = std::sync::Mutex::new(None);

/// Whether `error`, from a coordinator, means another coordinator may do better.
pub(crate) fn try_another(error: &ClientError) -> bool {
    use relaymesh_net::ws::DialError;
    use relaymesh_proto::v1::ErrorCode;
    match error {
        ClientError::Dial(DialError::Refused { status, .. }) => {
            status.is_server_error() || error.code() == Some(ErrorCode::ShuttingDown)
        }
        ClientError::Dial(DialError::BadUrl { .. } | DialError::Credentials(_)) => false,
        ClientError::Dial(_) | ClientError::Protocol(_) | ClientError::Timeout(_) => true,
        ClientError::Refused(e) => matches!(
            e.error_code(),
            ErrorCode::ShuttingDown
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::NoServerAvailable
                | ErrorCode::HeartbeatTimeout
        ),
        _ => false,
    }
}

/// The coordinators of `config`, the one that answered last first.
fn coordinators(config: &ClientConfig) -> Vec<&str> {
    let mut list = relaymesh_net::url::split_list(&config.coordinator);
    let last = relaymesh_net::sync::lock(&LAST_GOOD).clone();
    if let Some((of, good)) = last
        && of == config.coordinator
        && let Some(at) = list.iter().position(|u| *u == good)
    {
        list.rotate_left(at);
    }
    list
}

/// `attempt` with the coordinators of `config` not in `tried`, the one that answered last
/// first, then the others in turn while [`try_another`] says so. When none succeeds, the
/// error is the first coordinator's answer (one with a code, such as `NO_SERVER_AVAILABLE`),
/// or, when none answered, the first failure.
async fn first_to_answer<'a, T, Fut>(
    config: &'a ClientConfig,
    tried: &[String],
    mut attempt: impl FnMut(&'a str) -> Fut,
) -> Result<T, ClientError>
where
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut failure = None;
    for url in coordinators(config) {
        if tried.iter().any(|t| t == url) {
            continue;
        }
        match attempt(url).await {
            Ok(answer) => {
                *relaymesh_net::sync::lock(&LAST_GOOD) =
                    Some((config.coordinator.clone(), url.to_owned()));
                return Ok(answer);
            }
            Err(e) if try_another(&e) => {
                tracing::debug!(coordinator = url, error = %e, "coordinator failed; trying the next");
                let answered = |f: &ClientError| f.code().is_some();
                if failure
                    .as_ref()
                    .is_none_or(|f| !answered(f) && answered(&e))
                {
                    failure = Some(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(failure.unwrap_or(ClientError::Closed))
}

/// One connection round's way of asking a coordinator for servers.
///
/// Credentials that need no challenge log in with `POST /v1/login`, one request per offer:
/// one round trip fewer than a negotiation link and about a fifth less coordinator CPU per
/// login (`bench/results/connect/http-login-ab.md`). A key login answers its challenge on a
/// negotiation link (`/v1/connect`), which asks for every offer of the round: over HTTP the
/// challenge would come from `/v1/login/challenge`, which is rate-limited per source address,
/// and a fleet of devices behind one address reconnecting at once would wait on it.
pub(crate) enum Round {
    /// `POST /v1/login` on the coordinator at `url`; `first` is the offer its first login got.
    Http {
        url: String,
        first: Option<v1::ConnectOffer>,
    },
    /// A negotiation link (boxed: its socket is large beside the other variant).
    Link(Box<Negotiation>),
}

impl Round {
    /// Starts a round on a coordinator of `config` not in `tried` (see [`first_to_answer`]) with
    /// a first request for a server other than those in `exclude`.
    pub(crate) async fn open(
        config: &ClientConfig,
        tried: &[String],
        exclude: &[String],
        moving: bool,
    ) -> Result<Self, ClientError> {
        if challenged(config) {
            let first = connect_request(config, exclude, moving);
            return Negotiation::open(config, tried, Some(&first))
                .await
                .map(|link| Self::Link(Box::new(link)));
        }
        first_to_answer(config, tried, |url| async move {
            let offer = login(config, url, exclude, moving).await?;
            Ok(Self::Http {
                url: url.to_owned(),
                first: Some(offer),
            })
        })
        .await
    }

    /// The coordinator's URL.
    pub(crate) fn url(&self) -> &str {
        match self {
            Self::Http { url, .. } => url,
            Self::Link(link) => &link.url,
        }
    }

    /// A server and key, not one in `exclude`.
    pub(crate) async fn offer(
        &mut self,
        config: &ClientConfig,
        exclude: &[String],
        moving: bool,
    ) -> Result<v1::ConnectOffer, ClientError> {
        match self {
            Self::Http { url, first } => match first.take() {
                Some(offer) => Ok(offer),
                None => login(config, url, exclude, moving).await,
            },
            Self::Link(link) => link.offer(config, exclude, moving).await,
        }
    }

    /// Ends the round (closes a negotiation link politely).
    pub(crate) async fn close(self) {
        if let Self::Link(link) = self {
            link.close().await;
        }
    }
}

/// Whether `config`'s credentials answer a challenge to log in.
pub(crate) fn challenged(config: &ClientConfig) -> bool {
    matches!(config.credentials, Credentials::Key { .. })
}

/// `POST {base}/v1/login` for a server not in `exclude`, with credentials that need no
/// challenge. A refusal (4xx) is [`ClientError::Refused`] with the coordinator's code, as on a
/// negotiation link; a 5xx is [`DialError::Refused`](relaymesh_net::ws::DialError::Refused)
/// with it, which hands the round to the next coordinator.
async fn login(
    config: &ClientConfig,
    base: &str,
    exclude: &[String],
    moving: bool,
) -> Result<v1::ConnectOffer, ClientError> {
    use relaymesh_net::http::{self, HttpClientError};
    use relaymesh_net::ws::DialError;
    let Some(credentials) = config.credentials.login_json() else {
        return Err(ClientError::Protocol(
            "a key login answers a challenge on a negotiation link".into(),
        ));
    };
    let body = serde_json::json!({
        "credentials": credentials,
        "client_id": config.client_id.as_deref().unwrap_or_default(),
        "preferred_server": config.preferred_server,
        "exclude": exclude,
        "moving": moving,
    });
    let url = format!("{}/v1/login", base.trim_end_matches('/'));
    let (status, answer) = http::request_with(
        http::Method::POST,
        &url,
        &[],
        Some(body.to_string().into_bytes()),
        &config.tls,
        config.connect_timeout,
    )
    .await
    .map_err(|e| match e {
        HttpClientError::BadUrl { url, reason } => DialError::BadUrl { url, reason }.into(),
        HttpClientError::Connect { error, .. } => DialError::Connect {
            url: url.clone(),
            error,
        }
        .into(),
        HttpClientError::Tls { message, .. } => DialError::Tls {
            url: url.clone(),
            message,
        }
        .into(),
        HttpClientError::Exchange { message, .. } => {
            ClientError::Protocol(format!("login at {url} failed: {message}"))
        }
        HttpClientError::Timeout(_) => ClientError::Timeout("waiting for the coordinator".into()),
    })?;
    if !status.is_success() {
        let message = ws::parse_error_body(&answer);
        // A 5xx is this coordinator's trouble (shutting down, out of descriptors, no server
        // to offer): another may do better, whatever the code says (see `try_another`).
        return Err(match message {
            Some((code, message)) if !status.is_server_error() => ClientError::Refused(v1::Error {
                code: code.into(),
                message,
                request_id: 0,
            }),
            message => DialError::Refused {
                url,
                status,
                message,
            }
            .into(),
        });
    }
    let offer = serde_json::from_slice::<serde_json::Value>(&answer)
        .ok()
        .and_then(|answer| {
            let text = |field: &str| answer[field].as_str().map(str::to_owned);
            Some(v1::ConnectOffer {
                server_id: text("server_id")?,
                url: text("url")?,
                key: text("key")?,
                expires_in_ms: u32::try_from(answer["expires_in_ms"].as_u64()?).ok()?,
            })
        });
    offer.ok_or_else(|| ClientError::Protocol(format!("{url} answered without a server and key")))
}

/// The `Connect` asking for a server for `config`, not one in `exclude`.
pub(crate) fn connect_request(
    config: &ClientConfig,
    exclude: &[String],
    moving: bool,
) -> v1::ClientToCoordinator {
    v1::ClientToCoordinator::connect(v1::Connect {
        preferred_server: config.preferred_server.clone().unwrap_or_default(),
        exclude: exclude.to_vec(),
        moving,
    })
}

/// An open negotiation link.
pub(crate) struct Negotiation {
    socket: ClientSocket,
    /// The alias the coordinator assigned on this link.
    pub(crate) alias: String,
    /// The coordinator's URL.
    pub(crate) url: String,
    /// A request sent right behind `Hello`, not answered yet: the next call that would send
    /// it only reads its answer.
    ahead: Option<v1::ClientToCoordinator>,
}

impl Negotiation {
    /// Connects to a coordinator of `config` not in `tried` and says hello (see
    /// [`first_to_answer`]).
    ///
    /// `ahead`, the request the caller makes next, goes out with `Hello` when the login needs
    /// no challenge: the coordinator answers both in turn, and the round trip for `Welcome`
    /// is saved (the caller then makes that request as usual, and only its answer is read).
    pub(crate) async fn open(
        config: &ClientConfig,
        tried: &[String],
        ahead: Option<&v1::ClientToCoordinator>,
    ) -> Result<Self, ClientError> {
        first_to_answer(config, tried, |url| Self::open_one(config, url, ahead)).await
    }

    async fn open_one(
        config: &ClientConfig,
        base: &str,
        ahead: Option<&v1::ClientToCoordinator>,
    ) -> Result<Self, ClientError> {
        let url = format!("{}/v1/connect", base.trim_end_matches('/'));
        let socket = ws::dial_authorized(
            &url,
            None,
            &config.limits,
            &config.tls,
            config.connect_timeout,
        )
        .await?;
        let mut link = Self {
            socket,
            alias: String::new(),
            url: base.to_owned(),
            ahead: None,
        };
        let hello = v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            credentials: Some((&config.credentials).into()),
            client_id: config.client_id.clone().unwrap_or_default(),
        };
        let challenged = challenged(config);
        let hello = v1::ClientToCoordinator::hello(hello);
        match ahead {
            Some(ahead) if !challenged => {
                link.send_all(&[&hello, ahead]).await?;
                link.ahead = Some(ahead.clone());
            }
            _ => link.send(&hello).await?,
        }
        let mut answer = link.receive(config).await?;
        if let (
            Kind::Challenge(challenge),
            Credentials::Key {
                account,
                key,
                role,
                group,
            },
        ) = (&answer, &config.credentials)
        {
            let message = relaymesh_proto::login_challenge(&challenge.nonce, account, role, group);
            let signature = ed25519_dalek::Signer::sign(key, &message);
            let response = v1::ChallengeResponse {
                signature: Bytes::copy_from_slice(&signature.to_bytes()),
            };
            link.send(&v1::ClientToCoordinator::challenge_response(response))
                .await?;
            answer = link.receive(config).await?;
        }
        match answer {
            Kind::Welcome(welcome) if welcome.protocol_version == PROTOCOL_VERSION => {
                link.alias = welcome.alias
            }
            Kind::Welcome(welcome) => {
                return Err(ClientError::Protocol(format!(
                    "coordinator speaks protocol {}",
                    welcome.protocol_version
                )));
            }
            other => return Err(unexpected(other)),
        }
        Ok(link)
    }

    /// Asks for a server and a key.
    pub(crate) async fn offer(
        &mut self,
        config: &ClientConfig,
        exclude: &[String],
        moving: bool,
    ) -> Result<v1::ConnectOffer, ClientError> {
        self.send_unless_ahead(connect_request(config, exclude, moving))
            .await?;
        match self.receive(config).await? {
            Kind::Offer(offer) => Ok(offer),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `msg` and returns the coordinator's answer.
    pub(crate) async fn request(
        &mut self,
        config: &ClientConfig,
        msg: v1::ClientToCoordinator,
    ) -> Result<Kind, ClientError> {
        self.send_unless_ahead(msg).await?;
        self.receive(config).await
    }

    /// Closes the link politely.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            self.socket.close(None),
        )
        .await;
    }

    async fn send(&mut self, msg: &v1::ClientToCoordinator) -> Result<(), ClientError> {
        self.send_all(&[msg]).await
    }

    /// Sends `msgs` with one write.
    async fn send_all(&mut self, msgs: &[&v1::ClientToCoordinator]) -> Result<(), ClientError> {
        let failed = |e| ClientError::Protocol(format!("coordinator link failed: {e}"));
        for msg in msgs {
            self.socket
                .feed(WsMessage::Binary(encode(*msg)))
                .await
                .map_err(failed)?;
        }
        self.socket.flush().await.map_err(failed)
    }

    /// Sends `msg`, unless it went ahead with `Hello` (then its answer is the next one).
    async fn send_unless_ahead(&mut self, msg: v1::ClientToCoordinator) -> Result<(), ClientError> {
        if self.ahead.take().is_some_and(|ahead| ahead == msg) {
            return Ok(());
        }
        self.send(&msg).await
    }

    /// The next answer from the coordinator; an `Error` becomes [`ClientError::Refused`].
    async fn receive(&mut self, config: &ClientConfig) -> Result<Kind, ClientError> {
        let read = async {
            loop {
                let frame = match self.socket.next().await {
                    Some(Ok(WsMessage::Binary(frame))) => frame,
                    Some(Ok(WsMessage::Close(_))) | None => {
                        return Err(ClientError::Protocol(
                            "coordinator closed the negotiation link".into(),
                        ));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        return Err(ClientError::Protocol(format!(
                            "coordinator link failed: {e}"
                        )));
                    }
                };
                let msg: v1::CoordinatorToClient =
                    decode_frame(frame).map_err(ClientError::Refused)?;
                match msg.kind {
                    Some(Kind::Pong(_)) => continue,
                    Some(Kind::Error(e)) => return Err(ClientError::Refused(e)),
                    Some(kind) => return Ok(kind),
                    None => {
                        return Err(ClientError::Protocol(
                            "empty message from the coordinator".into(),
                        ));
                    }
                }
            }
        };
        tokio::time::timeout(config.connect_timeout, read)
            .await
            .unwrap_or_else(|_| Err(ClientError::Timeout("waiting for the coordinator".into())))
    }
}

pub(crate) fn unexpected(kind: Kind) -> ClientError {
    ClientError::Protocol(format!("unexpected message from the coordinator: {kind:?}"))
}
