//! One publisher and one subscriber driver per protocol, each with that system's usual Rust
//! client: relaymesh's own client library (protobuf over WebSocket), async-nats, rumqttc (MQTT
//! 3.1.1, QoS 0, `TCP_NODELAY`) and redis (`PUBLISH` pipelined per tick, `SUBSCRIBE` on its own
//! connection). Every publisher sends to one topic; every subscriber subscribes to one topic and
//! hands each payload to its [`SharedTally`]. relaymesh also publishes as an application backend
//! does, through the coordinator's gRPC server API (`relaymesh.admin.v1.Backend/Publish`, tonic).
//! With TLS, relaymesh clients dial `wss://` with [`Endpoints::tls`] and async-nats requires TLS,
//! trusting [`Endpoints::ca`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::StreamExt as _;
use relaymesh_client::{Client, ClientConfig, Credentials, Event};
use relaymesh_proto::admin::PublishRequest;
use relaymesh_proto::admin::backend_client::BackendClient;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::measure::{SharedTally, record};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum System {
    /// relaymesh: coordinator plus comm server(s), clients over WebSocket.
    Relaymesh,
    /// nats-server (a route between two nodes for the two-server scenario).
    Nats,
    /// mosquitto (single node, MQTT over TCP).
    Mosquitto,
    /// redis-server pub/sub (single node).
    Redis,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Relaymesh => "relaymesh",
            Self::Nats => "nats",
            Self::Mosquitto => "mosquitto",
            Self::Redis => "redis",
        }
    }
}

/// How clients reach the servers of one running system; index 0 is server A, 1 is server B.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    pub(crate) system: System,
    /// relaymesh: the coordinator URL; others: one `host:port` per server.
    pub(crate) urls: Vec<String>,
    /// relaymesh: the comm server ids, asked for as the preferred server.
    pub(crate) server_ids: Vec<String>,
    /// relaymesh: the comm servers' base URLs (`ws://127.0.0.1:PORT`).
    pub(crate) server_urls: Vec<String>,
    /// relaymesh: clients log in through the comm server they are meant for (a relayed
    /// `Login`), reconnects through another; `false`: every login is `POST /v1/login`.
    pub(crate) relay_logins: bool,
    /// relaymesh: the coordinator's admin API (gRPC, `http://127.0.0.1:PORT`), which serves
    /// the backend API; `None` for the other systems.
    pub(crate) admin_url: Option<String>,
    /// relaymesh: the bearer token of the admin API (generated per start); empty otherwise.
    pub(crate) admin_token: String,
    /// Whom relaymesh clients trust: the run's CA with TLS, else the default (unused by
    /// `ws://` and `http://` URLs).
    pub(crate) tls: relaymesh_net::tls::Connector,
    /// With TLS, the run's CA certificate (PEM): NATS clients and the admin API's client
    /// trust it. `None`: TLS is off.
    pub(crate) ca: Option<std::path::PathBuf>,
}

/// How a scenario's messages travel from publishers to subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Publishers publish on the topic, subscribers subscribe to it (every system).
    Topic,
    /// relaymesh sends each topic's messages as direct messages to the node that stands for its
    /// subscriber (others use the topic as it is).
    Direct,
    /// relaymesh only: an application backend publishes on the topic through the
    /// coordinator's backend API; the subscribers are logged in to [`BENCH_ACCOUNT`].
    Backend,
}

impl Endpoints {
    pub(crate) fn url(&self, server: usize) -> anyhow::Result<&str> {
        let i = if self.system == System::Relaymesh {
            0
        } else {
            server
        };
        self.urls
            .get(i)
            .map(String::as_str)
            .with_context(|| format!("{} has no server {server}", self.system.name()))
    }

    async fn relaymesh(&self, server: usize) -> anyhow::Result<Client> {
        self.relaymesh_as(server, Credentials::Anonymous).await
    }

    /// Points relaymesh client `config` at server `server`, asked for as the preferred one:
    /// with `relay_logins` its login goes through that server (key logins, which the client
    /// never relays, and any that fall back ask the coordinator), else to the coordinator.
    pub(crate) fn place(&self, config: &mut ClientConfig, server: usize) -> anyhow::Result<()> {
        let missing = || format!("relaymesh has no server {server}");
        let id = self.server_ids.get(server).with_context(missing)?;
        config.preferred_server = Some(id.clone());
        if self.relay_logins {
            let url = self.server_urls.get(server).with_context(missing)?;
            config.login_servers = vec![url.clone()];
        } else {
            config.relay_logins = false;
        }
        Ok(())
    }

    /// A relaymesh client on server `server` logged in with `credentials`.
    async fn relaymesh_as(
        &self,
        server: usize,
        credentials: Credentials,
    ) -> anyhow::Result<Client> {
        self.relaymesh_with(server, |config| config.credentials = credentials)
            .await
    }

    /// A relaymesh client on server `server`, anonymous and without auto-reconnect unless
    /// `tweak` changes its config.
    pub(crate) async fn relaymesh_with(
        &self,
        server: usize,
        tweak: impl FnOnce(&mut ClientConfig),
    ) -> anyhow::Result<Client> {
        let id = self
            .server_ids
            .get(server)
            .with_context(|| format!("relaymesh has no server {server}"))?;
        let mut config = ClientConfig::new(self.url(0)?);
        config.tls = self.tls.clone();
        self.place(&mut config, server)?;
        // A reconnect would hide a dropped connection behind a fresh one.
        config.auto_reconnect = false;
        config.outbound_queue = 8192;
        config.event_queue = 8192;
        tweak(&mut config);
        let client = Client::connect(config).await?;
        if client.server_id() != *id {
            bail!(
                "relaymesh placed a client on {} instead of {id}",
                client.server_id()
            );
        }
        Ok(client)
    }

    /// async-nats options: with TLS, TLS required and the run's CA as the only root.
    fn nats_options(&self) -> async_nats::ConnectOptions {
        let options = async_nats::ConnectOptions::new();
        match &self.ca {
            Some(ca) => options.add_root_certificates(ca.clone()).require_tls(true),
            None => options,
        }
    }
}

/// The account of the direct-message and backend scenarios' clients (the benchmark's
/// coordinator is open: any account logs in, and a key login names its node).
const BENCH_ACCOUNT: &str = "bench";

/// The alias receivers see on the backend's messages.
const BACKEND_SENDER: &str = "bench-backend";

/// Backend API calls one publisher has outstanding at most: the pacer waits for a permit, so a
/// slow API shows as release lag (which fails the step), not as memory.
const BACKEND_IN_FLIGHT: usize = 256;

/// Logs in to [`BENCH_ACCOUNT`] with an access code (any code opens the benchmark's accounts).
fn bench_account_code() -> Credentials {
    Credentials::AccessCode {
        account: BENCH_ACCOUNT.into(),
        code: "open".into(),
        role: String::new(),
        group: String::new(),
    }
}

/// The key of the node that stands for `topic`'s subscriber in the direct scenario.
fn direct_key(topic: &str) -> anyhow::Result<relaymesh_client::SigningKey> {
    let mut seed = [0u8; 32];
    anyhow::ensure!(
        topic.len() <= seed.len(),
        "topic {topic:?} too long for a key seed"
    );
    seed[..topic.len()].copy_from_slice(topic.as_bytes());
    Ok(relaymesh_client::SigningKey::from_bytes(&seed))
}

/// The node `topic`'s subscriber is in the direct scenario.
fn direct_node(topic: &str) -> anyhow::Result<String> {
    Ok(relaymesh_proto::node::id_of_key(
        direct_key(topic)?.verifying_key().as_bytes(),
    ))
}

fn next_client_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn mqtt_options(addr: &str) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("bad MQTT address {addr}"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in {addr}"))?;
    let mut options = rumqttc::MqttOptions::new(format!("bench-{}", next_client_id()), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(64 * 1024, 64 * 1024)
        .set_request_channel_capacity(8192);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 8192);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    Ok((client, events))
}

/// Polls an MQTT event loop until `done` says the awaited packet arrived.
async fn mqtt_until(
    events: &mut rumqttc::EventLoop,
    done: impl Fn(&rumqttc::Packet) -> bool,
) -> anyhow::Result<()> {
    let wait = async {
        loop {
            if let rumqttc::Event::Incoming(p) = events.poll().await?
                && done(&p)
            {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .context("MQTT broker did not answer in 10 s")??;
    Ok(())
}

/// Sends messages to one topic.
pub(crate) enum Publisher {
    Relaymesh {
        client: Client,
        topic: String,
    },
    /// Direct messages to one node.
    RelaymeshDirect {
        client: Client,
        node: String,
    },
    /// An application backend: one unary `Backend/Publish` call per message through the
    /// coordinator's gRPC API, each in its own task so call latency does not hold the pacer.
    RelaymeshBackend {
        client: BackendClient<tonic::transport::Channel>,
        /// `Bearer <token>`, added to every call.
        bearer: tonic::metadata::AsciiMetadataValue,
        account: String,
        topic: String,
        /// Calls sent and not yet answered, at most [`BACKEND_IN_FLIGHT`].
        in_flight: Arc<Semaphore>,
        /// Calls the API refused or that failed (each is a message not sent).
        refused: Arc<AtomicU64>,
    },
    Nats {
        client: async_nats::Client,
        subject: async_nats::Subject,
    },
    Mqtt {
        client: rumqttc::AsyncClient,
        topic: String,
        task: JoinHandle<()>,
    },
    Redis {
        conn: redis::aio::MultiplexedConnection,
        topic: String,
        pipe: redis::Pipeline,
        queued: usize,
        /// Pipelines sent and not yet answered, bounded so a slow server shows as latency,
        /// not as memory.
        in_flight: Arc<Semaphore>,
    },
}

impl Publisher {
    /// Connects a publisher for `topic` to server `server` (0 = A, 1 = B); `route` says how
    /// relaymesh sends (the backend goes through the coordinator, whatever `server`).
    pub(crate) async fn connect(
        at: &Endpoints,
        server: usize,
        topic: &str,
        route: Route,
    ) -> anyhow::Result<Self> {
        if route == Route::Backend && at.system != System::Relaymesh {
            bail!("{} has no backend API", at.system.name());
        }
        Ok(match at.system {
            System::Relaymesh if route == Route::Direct => Self::RelaymeshDirect {
                client: at.relaymesh_as(server, bench_account_code()).await?,
                node: direct_node(topic)?,
            },
            System::Relaymesh if route == Route::Backend => {
                let url = at
                    .admin_url
                    .clone()
                    .context("relaymesh was started without its admin API")?;
                // `https://` with TLS, trusting the run's CA.
                let tls = relaymesh_proto::admin_client::AdminTls {
                    ca: at.ca.clone(),
                    identity: None,
                };
                let channel = relaymesh_proto::admin_client::connect(&url, &tls).await?;
                let bearer = format!("Bearer {}", at.admin_token)
                    .parse()
                    .context("the admin token is not a valid header value")?;
                Self::RelaymeshBackend {
                    client: BackendClient::new(channel),
                    bearer,
                    account: BENCH_ACCOUNT.to_owned(),
                    topic: topic.to_owned(),
                    in_flight: Arc::new(Semaphore::new(BACKEND_IN_FLIGHT)),
                    refused: Arc::new(AtomicU64::new(0)),
                }
            }
            System::Relaymesh => Self::Relaymesh {
                client: at.relaymesh(server).await?,
                topic: topic.to_owned(),
            },
            System::Nats => Self::Nats {
                client: at.nats_options().connect(at.url(server)?).await?,
                subject: async_nats::Subject::from(topic),
            },
            System::Mosquitto => {
                let (client, mut events) = mqtt_options(at.url(server)?)?;
                mqtt_until(&mut events, |p| matches!(p, rumqttc::Packet::ConnAck(_))).await?;
                let task = tokio::spawn(async move {
                    loop {
                        if let Err(e) = events.poll().await {
                            eprintln!("bench: MQTT publisher connection failed: {e}");
                            return;
                        }
                    }
                });
                Self::Mqtt {
                    client,
                    topic: topic.to_owned(),
                    task,
                }
            }
            System::Redis => {
                let client = redis::Client::open(format!("redis://{}/", at.url(server)?))?;
                Self::Redis {
                    conn: client.get_multiplexed_async_connection().await?,
                    topic: topic.to_owned(),
                    pipe: redis::pipe(),
                    queued: 0,
                    in_flight: Arc::new(Semaphore::new(64)),
                }
            }
        })
    }

    /// Queues one message; [`Publisher::flush`] ends the pacer's tick.
    pub(crate) async fn send(&mut self, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Self::Relaymesh { client, topic } => client.publish(topic, payload).await?,
            Self::RelaymeshDirect { client, node } => {
                client.send(node, payload).await?;
            }
            Self::RelaymeshBackend {
                client,
                bearer,
                account,
                topic,
                in_flight,
                refused,
            } => {
                let permit = in_flight.clone().acquire_owned().await?;
                let mut request = tonic::Request::new(PublishRequest {
                    account: account.clone(),
                    group: String::new(),
                    topic: topic.clone(),
                    payload: payload.to_vec(),
                    sender: BACKEND_SENDER.to_owned(),
                });
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
                let mut client = client.clone();
                let refused = refused.clone();
                tokio::spawn(async move {
                    if let Err(status) = client.publish(request).await
                        && refused.fetch_add(1, Ordering::Relaxed) == 0
                    {
                        eprintln!(
                            "bench: backend publish refused ({:?}): {} (further refusals are counted)",
                            status.code(),
                            status.message()
                        );
                    }
                    drop(permit);
                });
            }
            Self::Nats { client, subject } => client.publish(subject.clone(), payload).await?,
            Self::Mqtt { client, topic, .. } => {
                client
                    .publish_bytes(topic.as_str(), rumqttc::QoS::AtMostOnce, false, payload)
                    .await?;
            }
            Self::Redis {
                topic,
                pipe,
                queued,
                ..
            } => {
                pipe.cmd("PUBLISH")
                    .arg(topic.as_str())
                    .arg(payload.as_ref())
                    .ignore();
                *queued += 1;
            }
        }
        Ok(())
    }

    /// Sends what this tick queued where the client does not do it by itself (Redis: one
    /// pipelined round trip, answered in the background).
    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        if let Self::Redis {
            conn,
            pipe,
            queued,
            in_flight,
            ..
        } = self
        {
            if *queued == 0 {
                return Ok(());
            }
            let permit = in_flight.clone().acquire_owned().await?;
            let pipe = std::mem::replace(pipe, redis::pipe());
            *queued = 0;
            let mut conn = conn.clone();
            tokio::spawn(async move {
                if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                    eprintln!("bench: Redis PUBLISH pipeline failed: {e}");
                }
                drop(permit);
            });
        }
        Ok(())
    }

    /// Messages the system refused to take so far (backend API calls that failed); 0 where a
    /// refusal cannot be seen (the other clients queue and send without an answer).
    pub(crate) fn refused(&self) -> u64 {
        match self {
            Self::RelaymeshBackend { refused, .. } => refused.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Closes the connection (the backend: once its calls are answered, or after 10 s).
    pub(crate) async fn close(self) {
        match self {
            Self::Relaymesh { client, .. } | Self::RelaymeshDirect { client, .. } => {
                client.close().await
            }
            Self::RelaymeshBackend {
                in_flight, refused, ..
            } => {
                let all = u32::try_from(BACKEND_IN_FLIGHT).unwrap_or(u32::MAX);
                let answered =
                    tokio::time::timeout(Duration::from_secs(10), in_flight.acquire_many(all))
                        .await;
                if answered.is_err() {
                    eprintln!("bench: backend publish calls still unanswered after 10 s");
                }
                let refused = refused.load(Ordering::Relaxed);
                if refused > 0 {
                    eprintln!("bench: {refused} backend publishes refused in all");
                }
            }
            Self::Nats { client, .. } => {
                let _ = client.flush().await;
            }
            Self::Mqtt { client, task, .. } => {
                let _ = client.disconnect().await;
                task.abort();
            }
            Self::Redis { .. } => {}
        }
    }
}

/// Receives messages on one topic into a tally until dropped.
pub(crate) struct Subscriber {
    task: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Connects to server `server`, subscribes to `topic` (the server has confirmed it where
    /// the protocol says so) and starts recording into `tally`; relaymesh logs in as `route`
    /// needs (a node's key for direct messages, the backend's account for its publishes).
    pub(crate) async fn start(
        at: &Endpoints,
        server: usize,
        topic: &str,
        route: Route,
        tally: SharedTally,
    ) -> anyhow::Result<Self> {
        let lost =
            |what: &'static str| move || eprintln!("bench: {what} subscriber connection ended");
        let task = match at.system {
            System::Relaymesh if route == Route::Direct => {
                let key = Credentials::Key {
                    account: BENCH_ACCOUNT.into(),
                    key: direct_key(topic)?,
                    role: String::new(),
                    group: String::new(),
                };
                // The node's topic is in force cluster-wide once it is connected.
                let mut client = at.relaymesh_as(server, key).await?;
                let ended = lost("relaymesh");
                tokio::spawn(async move {
                    while let Some(event) = client.next_event().await {
                        if let Event::Direct(d) = event {
                            record(&tally, &d.payload);
                        }
                    }
                    ended();
                })
            }
            System::Relaymesh => {
                let mut client = if route == Route::Backend {
                    at.relaymesh_as(server, bench_account_code()).await?
                } else {
                    at.relaymesh(server).await?
                };
                client.subscribe([topic]).await?;
                let ended = lost("relaymesh");
                tokio::spawn(async move {
                    while let Some(event) = client.next_event().await {
                        if let Event::Message(m) = event {
                            record(&tally, &m.payload);
                        }
                    }
                    ended();
                })
            }
            System::Nats => {
                let client = at
                    .nats_options()
                    .subscription_capacity(1 << 16)
                    .connect(at.url(server)?)
                    .await?;
                let mut sub = client.subscribe(topic.to_owned()).await?;
                client.flush().await?;
                let ended = lost("NATS");
                tokio::spawn(async move {
                    let _client = client;
                    while let Some(m) = sub.next().await {
                        record(&tally, &m.payload);
                    }
                    ended();
                })
            }
            System::Mosquitto => {
                let (client, mut events) = mqtt_options(at.url(server)?)?;
                mqtt_until(&mut events, |p| matches!(p, rumqttc::Packet::ConnAck(_))).await?;
                client.subscribe(topic, rumqttc::QoS::AtMostOnce).await?;
                mqtt_until(&mut events, |p| matches!(p, rumqttc::Packet::SubAck(_))).await?;
                let ended = lost("MQTT");
                tokio::spawn(async move {
                    let _client = client;
                    loop {
                        match events.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                                record(&tally, &p.payload);
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    ended();
                })
            }
            System::Redis => {
                let client = redis::Client::open(format!("redis://{}/", at.url(server)?))?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(topic).await?;
                let mut messages = pubsub.into_on_message();
                let ended = lost("Redis");
                tokio::spawn(async move {
                    while let Some(m) = messages.next().await {
                        record(&tally, m.get_payload_bytes());
                    }
                    ended();
                })
            }
        };
        Ok(Self { task })
    }
}
