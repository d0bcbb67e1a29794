//! The client's connection task: establishes a connection round (negotiate, dial, attach,
//! resubscribe), then runs the connection on the link driver: the link writer drains the
//! outbound queue in batches, and the reader turns frames into events and acknowledgements and
//! sends heartbeats; closing the client ends the link. When the connection is lost it starts
//! over with backoff; what is still queued waits for the next connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use relaymesh_net::link::{self, Closer, Flow, Heartbeat, Inbound, OnClose, WriterSetup};
use relaymesh_net::queue;
use relaymesh_net::retry::Backoff;
use relaymesh_net::sync::lock;
use relaymesh_net::ws::{self, ClientLink};
use relaymesh_proto::v1::{self, server_to_client::Kind};
use relaymesh_proto::{PROTOCOL_VERSION, decode_frame, encode};
use tokio::sync::mpsc;

use crate::negotiate::Round;
use crate::{ClientConfig, ClientError, Event, Message, Shared};

/// Servers tried in one connection round before backing off.
const SERVERS_PER_ROUND: usize = 3;

/// The most the first messages of a client link (`Attach`, the resubscription) may weigh to
/// ride with the upgrade request: with the request head (about 350 bytes with its key) they
/// fit one TCP segment even of a 1280-byte IPv6 path, so a server that refuses the upgrade
/// has read them by then and closes without resetting the connection (which could lose its
/// refusal). Larger, they follow the upgrade's answer.
const MAX_RIDER_BYTES: usize = 512;
/// Messages held from the server moved to while the one moved from is read to its end; the
/// rest waits in the connection.
const HOLD_LIMIT: usize = 65_536;
/// Time allowed for a clean close when the client is closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A server connection that is attached and resubscribed.
pub(crate) struct Connected {
    link: ClientLink,
    server_id: String,
    alias: String,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    /// The subscriptions restored on it, by request `restored_by`.
    restored: Vec<String>,
    restored_by: u64,
    /// Servers that had not confirmed that restoration when it was answered.
    unconfirmed: Vec<String>,
    /// Messages read while attaching, when the connection was made to move to (`Hold`):
    /// delivered once the server moved from has been read to the end.
    held: Vec<v1::Message>,
}

/// What happens to messages read while attaching.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrivals {
    /// Delivered (a copy of one already delivered is dropped).
    Deliver,
    /// Held for later: another connection's reader is still delivering, with the record of
    /// what was delivered. Nothing unconfirmed is sent again yet either: the other
    /// connection may still confirm it.
    Hold,
}

/// One connection round: log in through a known comm server when there is one (see
/// [`ClientConfig::relay_logins`]), else, or when that fails, negotiate with a coordinator,
/// then connect to the offered server, trying another (and excluding the failed one) if it
/// cannot be reached. A coordinator that fails meanwhile (see
/// [`crate::negotiate::try_another`]) hands the round to the next one.
pub(crate) async fn establish(
    config: &ClientConfig,
    shared: &Shared,
    events: &EventTx,
    exclude: &[String],
    arrivals: Arrivals,
) -> Result<Connected, ClientError> {
    let moving = arrivals == Arrivals::Hold;
    let mut exclude = exclude.to_vec();
    if let Some((server_id, url)) = entry_point(config, shared, &exclude) {
        let login = v1::Login {
            protocol_version: PROTOCOL_VERSION,
            credentials: Some((&config.credentials).into()),
            client_id: config.client_id.clone().unwrap_or_default(),
            exclude: exclude.clone(),
            moving,
            // Unless it is excluded (the server just lost): then the server dialled is.
            preferred_server: config
                .preferred_server
                .clone()
                .filter(|p| !exclude.contains(p))
                .unwrap_or_default(),
        };
        let target = Target::Relay {
            url: &url,
            login: Box::new(login),
        };
        let redirect = match attach(config, shared, events, target, arrivals).await {
            Ok(Attached::Connected(connected)) => return Ok(*connected),
            Ok(Attached::Redirected(offer)) => Some(offer),
            // The coordinator's verdict on the credentials holds everywhere.
            Err(ClientError::Refused(e)) if refused_everywhere(e.error_code()) => {
                return Err(ClientError::Refused(e));
            }
            Err(e) => {
                tracing::debug!(server = %url, error = %e, "login through a server failed; asking the coordinator");
                // Not offered again this round: it may be down too.
                exclude.extend(server_id);
                None
            }
        };
        if let Some(offer) = redirect {
            match attach(config, shared, events, Target::Offer(&offer), arrivals).await {
                Ok(Attached::Connected(connected)) => return Ok(*connected),
                Ok(Attached::Redirected(_)) => {}
                Err(e) => {
                    tracing::debug!(server = %offer.server_id, error = %e, "offered server failed; asking the coordinator");
                    exclude.push(offer.server_id);
                }
            }
        }
    }
    let mut tried = Vec::new();
    let mut round = Round::open(config, &tried, &exclude, moving).await?;
    let mut failure = None;
    for _ in 0..SERVERS_PER_ROUND {
        let offer = match round.offer(config, &exclude, moving).await {
            Ok(offer) => offer,
            Err(e) if crate::negotiate::try_another(&e) => {
                tracing::debug!(coordinator = %round.url(), error = %e, "coordinator failed; trying the next");
                tried.push(round.url().to_owned());
                round.close().await;
                match Round::open(config, &tried, &exclude, moving).await {
                    Ok(next) => {
                        round = next;
                        continue;
                    }
                    // None left: the first coordinator's word stands.
                    Err(_) => return Err(e),
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        match attach(config, shared, events, Target::Offer(&offer), arrivals).await {
            Ok(Attached::Connected(connected)) => {
                round.close().await;
                return Ok(*connected);
            }
            Ok(Attached::Redirected(_)) => {
                exclude.push(offer.server_id);
                failure = Some(ClientError::Protocol(
                    "a server redirected a client that came with a key".into(),
                ));
            }
            Err(e) => {
                tracing::debug!(server = %offer.server_id, error = %e, "offered server failed; asking for another");
                exclude.push(offer.server_id);
                failure = Some(e);
            }
        }
    }
    round.close().await;
    Err(failure.unwrap_or(ClientError::Closed))
}

/// Whether a refusal of a login through a server would be the coordinator's answer too.
fn refused_everywhere(code: v1::ErrorCode) -> bool {
    use v1::ErrorCode as C;
    matches!(
        code,
        C::BadCredentials
            | C::UnknownAccount
            | C::AccountDisabled
            | C::RoleNotPermitted
            | C::RateLimited
            | C::Unauthenticated
    )
}

/// A server to log in through, its id (when known) and URL: of those the last `Ready` listed
/// and `exclude` does not name, the preferred server if it is one, else one at random (the
/// preference goes with the login); with none of those, one of
/// [`ClientConfig::login_servers`] at random. `None`: the login goes to the coordinator.
fn entry_point(
    config: &ClientConfig,
    shared: &Shared,
    exclude: &[String],
) -> Option<(Option<String>, String)> {
    use rand::seq::IndexedRandom as _;
    if !config.relay_logins || crate::negotiate::challenged(config) {
        return None;
    }
    let known = lock(&shared.entry_points);
    let known: Vec<&v1::ServerInfo> = known
        .iter()
        .filter(|s| !exclude.contains(&s.server_id))
        .collect();
    let preferred = config.preferred_server.as_deref();
    let mut rng = rand::rng();
    let server = known
        .iter()
        .find(|s| Some(s.server_id.as_str()) == preferred)
        .or_else(|| known.choose(&mut rng));
    match server {
        Some(server) => Some((Some(server.server_id.clone()), server.url.clone())),
        None => config
            .login_servers
            .choose(&mut rng)
            .map(|url| (None, url.clone())),
    }
}

/// Where [`attach`] connects.
enum Target<'a> {
    /// An offered server, with the key reserved there.
    Offer(&'a v1::ConnectOffer),
    /// A server (base URL) dialled without a key, which relays `login` to the coordinator
    /// (boxed: large beside the other).
    Relay { url: &'a str, login: Box<v1::Login> },
}

/// What [`attach`] came to.
enum Attached {
    /// Boxed: large beside the other.
    Connected(Box<Connected>),
    /// The server dialled without a key relayed the login, and the coordinator chose another
    /// server: this offer is for it.
    Redirected(v1::ConnectOffer),
}

/// Connects to a server, attaches and restores every subscription.
async fn attach(
    config: &ClientConfig,
    shared: &Shared,
    events: &EventTx,
    target: Target<'_>,
    arrivals: Arrivals,
) -> Result<Attached, ClientError> {
    let (url, server) = match &target {
        Target::Offer(offer) => (
            format!("{}?key={}", offer.url, offer.key),
            offer.server_id.as_str(),
        ),
        Target::Relay { url, .. } => (format!("{}/v1/client", url.trim_end_matches('/')), *url),
    };
    let (resubscribe, topics) = restoration(shared);
    let mut recover = Vec::new();
    // Login (when relayed), Attach and the resubscription go out first, ahead of anything
    // queued for the writer.
    let mut opening = Vec::with_capacity(3);
    let relayed = matches!(target, Target::Relay { .. });
    if let Target::Relay { login, .. } = target {
        opening.push(encode(&v1::ClientToServer::login(*login)));
    }
    opening.push(encode(&v1::ClientToServer::attach(v1::Attach {
        protocol_version: PROTOCOL_VERSION,
    })));
    if !topics.is_empty() {
        // After a lost connection, what was missed on topics that keep history is recovered
        // (a move loses nothing: it reads the old server to its end).
        recover = match arrivals {
            Arrivals::Deliver => lock(&shared.history).recover(&topics),
            Arrivals::Hold => Vec::new(),
        };
        opening.push(encode(&v1::ClientToServer::subscribe(v1::Subscribe {
            request_id: resubscribe,
            topics: topics.clone(),
            recover: recover.clone(),
        })));
    }
    // They ride with the upgrade request when small (see `MAX_RIDER_BYTES`), saving the
    // round trip to the upgrade's answer.
    let ride = opening.iter().map(Bytes::len).sum::<usize>() <= MAX_RIDER_BYTES;
    let first: &[Bytes] = if ride { &opening } else { &[] };
    let mut link = ws::dial_link_with(
        &url,
        None,
        &config.limits,
        &config.tls,
        config.connect_timeout,
        first,
    )
    .await?;
    if ride {
        opening.clear();
    }
    // Then what the lost server never confirmed, in order, ahead of the outbound queue.
    if arrivals == Arrivals::Deliver {
        opening.extend(resends(shared));
    }
    if !opening.is_empty() {
        link.sink
            .send_now(&opening)
            .await
            .map_err(|e| ClientError::Protocol(format!("server link failed: {e}")))?;
    }
    // A relayed login is answered first: `Ready` (this server it is), `redirect` or `Error`.
    let relay_answer = if relayed {
        let answer = tokio::time::timeout(config.connect_timeout, first_answer(&mut link))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout(format!(
                    "waiting for {server} to answer the login"
                )))
            })?;
        match answer {
            Kind::Ready(ready) => Some(ready),
            Kind::Redirect(offer) => return Ok(Attached::Redirected(offer)),
            Kind::Error(e) => return Err(ClientError::Refused(e)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected answer to a login from {server}: {other:?}"
                )));
            }
        }
    } else {
        None
    };
    let mut held = Vec::new();
    let handshake = restore(
        &mut link,
        shared,
        events,
        (resubscribe, &recover),
        &topics,
        relay_answer.is_none(),
        arrivals,
        &mut held,
    );
    let (ready, pending) = tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .unwrap_or_else(|_| Err(ClientError::Timeout(format!("attaching to {server}"))))?;
    let ready = match ready.or(relay_answer) {
        Some(ready) if ready.protocol_version == PROTOCOL_VERSION => ready,
        Some(ready) => {
            return Err(ClientError::Protocol(format!(
                "server speaks protocol {}",
                ready.protocol_version
            )));
        }
        None => return Err(ClientError::Closed),
    };
    if !ready.servers.is_empty() {
        *lock(&shared.entry_points) = ready.servers.clone();
    }
    let confirmed = {
        let mut state = lock(&shared.state);
        state.alias = ready.alias.clone();
        state.server_id = ready.server_id.clone();
        state.node_id = ready.node_id.clone();
        // Requests made before this connection are answered by the resubscription.
        state.resubscribed(resubscribe, &topics, pending.clone())
    };
    for event in confirmed {
        let _ = events.send_one(event).await;
    }
    let ms =
        |v: u32, default: u64| Duration::from_millis(if v > 0 { u64::from(v) } else { default });
    Ok(Attached::Connected(Box::new(Connected {
        link,
        server_id: ready.server_id,
        alias: ready.alias,
        heartbeat_interval: ms(ready.heartbeat_interval_ms, 5_000),
        heartbeat_timeout: ms(ready.heartbeat_timeout_ms, 15_000),
        restored: topics,
        restored_by: resubscribe,
        unconfirmed: pending,
        held,
    })))
}

/// The first message from a server (skipping control frames).
async fn first_answer(link: &mut ClientLink) -> Result<Kind, ClientError> {
    loop {
        match link::next_frame(&mut link.stream).await {
            Ok(Inbound::Frame(frame)) => {
                let msg: v1::ServerToClient = decode_frame(frame).map_err(ClientError::Refused)?;
                return msg
                    .kind
                    .ok_or_else(|| ClientError::Protocol("empty message from the server".into()));
            }
            Ok(Inbound::Control) => continue,
            Ok(Inbound::Closed) => {
                return Err(ClientError::Protocol(
                    "server closed the connection before answering the login".into(),
                ));
            }
            Err(e) => return Err(ClientError::Protocol(format!("server link failed: {e}"))),
        }
    }
}

/// A request number for restoring the subscriptions, and the topics to restore.
fn restoration(shared: &Shared) -> (u64, Vec<String>) {
    let state = lock(&shared.state);
    let request_id = shared
        .next_request
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (request_id, state.topics.iter().cloned().collect())
}

/// Reads `link` until the server's `Ready` (if `attaching`) and the `Ack` of `resubscribe`
/// (the restoration of `topics`, if any), handling what comes meanwhile; gives the `Ready` and
/// the servers the `Ack` said had not confirmed the restoration yet.
#[allow(clippy::too_many_arguments)]
async fn restore(
    link: &mut ClientLink,
    shared: &Shared,
    events: &EventTx,
    (resubscribe, recover): (u64, &[v1::Recover]),
    topics: &[String],
    attaching: bool,
    arrivals: Arrivals,
    held: &mut Vec<v1::Message>,
) -> Result<(Option<v1::Ready>, Vec<String>), ClientError> {
    let mut ready = None;
    let mut acked = topics.is_empty();
    // Servers that had not confirmed the restored subscriptions yet: they are active, and
    // the second `Ack` that confirms them is read with the connection's other frames.
    let mut pending = Vec::new();
    while (attaching && ready.is_none()) || !acked {
        let frame = match link::next_frame(&mut link.stream).await {
            Ok(Inbound::Frame(frame)) => frame,
            Ok(Inbound::Control) => continue,
            Ok(Inbound::Closed) => {
                return Err(ClientError::Protocol(
                    "server closed the connection while attaching".into(),
                ));
            }
            Err(e) => {
                return Err(ClientError::Protocol(format!("server link failed: {e}")));
            }
        };
        let msg: v1::ServerToClient = decode_frame(frame).map_err(ClientError::Refused)?;
        match msg.kind {
            Some(Kind::Ready(r)) if r.protocol_version == PROTOCOL_VERSION => ready = Some(r),
            Some(Kind::Ready(r)) => {
                return Err(ClientError::Protocol(format!(
                    "server speaks protocol {}",
                    r.protocol_version
                )));
            }
            Some(Kind::Ack(ack)) if ack.request_id == resubscribe => {
                let ended = {
                    let mut history = lock(&shared.history);
                    history.subscribed(&ack);
                    history.unrecoverable(recover, &ack)
                };
                let ended: Vec<Event> = {
                    let seen = &mut lock(&shared.seen);
                    ended
                        .into_iter()
                        .flat_map(|(topic, recovery)| recovery_events(topic, recovery, seen))
                        .collect()
                };
                for event in ended {
                    let _ = events.send_one(event).await;
                }
                acked = true;
                pending = ack.pending;
            }
            Some(Kind::Error(e)) if e.request_id == resubscribe => {
                // Which topic the server objects to is unknown: drop the restored set (the
                // app is told) rather than retrying a refused subscription forever.
                let dropped: Vec<String> = {
                    let mut state = lock(&shared.state);
                    topics
                        .iter()
                        .filter(|t| state.topics.remove(*t))
                        .cloned()
                        .collect()
                };
                let event = Event::SubscriptionsRefused {
                    topics: dropped,
                    reason: e.to_string(),
                };
                let _ = events.send_one(event).await;
                return Err(ClientError::Refused(e));
            }
            Some(Kind::Error(e)) => return Err(ClientError::Refused(e)),
            // Sent only to clients that connect with `batch=1`, which this one does not.
            Some(Kind::Batch(_)) => {
                return Err(ClientError::Protocol(
                    "the server sent a batch this client did not ask for".into(),
                ));
            }
            // Drained as this client arrived: another server is tried.
            Some(Kind::Reconnect(r)) => {
                return Err(ClientError::Protocol(format!(
                    "the server asked the client to move: {}",
                    r.reason
                )));
            }
            Some(Kind::Message(m)) if arrivals == Arrivals::Hold => {
                held.push(m);
                // Past this, the rest waits unread in the connection (nothing is lost, the
                // server queues it) until the move is over.
                if held.len() >= HOLD_LIMIT {
                    return Err(ClientError::Protocol(format!(
                        "{HOLD_LIMIT} messages arrived while moving"
                    )));
                }
            }
            Some(Kind::SubscriptionsChanged(c)) => {
                let event = changed_subscriptions(shared, c);
                let _ = events.send_one(event).await;
            }
            // A copy of one already delivered is dropped (the last arm).
            Some(Kind::Message(m)) if fresh(shared, &mut lock(&shared.seen), &m) => {
                let _ = events.send_one(message(m)).await;
            }
            Some(Kind::Undeliverable(u)) => {
                let _ = events.send_one(undeliverable(u)).await;
            }
            Some(Kind::Published(p)) => shared.confirm(p.up_to),
            Some(Kind::Dropped(d)) => {
                let _ = events.send_one(dropped(d)).await;
            }
            _ => {}
        }
    }
    Ok((ready, pending))
}

/// Completes a move to `next` once the connection moved from (`from_alias`) has been read to
/// its end: what that connection was not confirmed goes out again here, the messages read
/// while attaching are delivered (less copies, and less those of topics left meanwhile), and
/// subscription changes made since are made here too.
async fn finish_move(
    config: &ClientConfig,
    shared: &Shared,
    events: &EventTx,
    next: &mut Connected,
    from_alias: &str,
    out: &mut queue::Receiver<Bytes>,
) -> Result<(), ClientError> {
    lost(shared, out, from_alias);
    let fresh_held: Vec<Event> = {
        let topics = lock(&shared.state).topics.clone();
        let mut seen = lock(&shared.seen);
        std::mem::take(&mut next.held)
            .into_iter()
            .filter(|m| m.topic.starts_with('@') || topics.contains(&m.topic))
            .filter(|m| fresh(shared, &mut seen, m))
            .map(message)
            .collect()
    };
    for burst in fresh_held.chunks(events.capacity.max(1)) {
        let room = events.room(burst.len()).await.ok_or(ClientError::Closed)?;
        events
            .send(room, burst.to_vec())
            .map_err(|()| ClientError::Closed)?;
    }
    let resent = resends(shared);
    if !resent.is_empty() {
        next.link
            .sink
            .send_now(&resent)
            .await
            .map_err(|e| ClientError::Protocol(format!("server link failed: {e}")))?;
    }
    catch_up(config, shared, events, next, Arrivals::Deliver).await
}

/// Makes on `next` the subscription changes made since its subscriptions were restored (and
/// answers the requests waiting for them), if any were.
async fn catch_up(
    config: &ClientConfig,
    shared: &Shared,
    events: &EventTx,
    next: &mut Connected,
    arrivals: Arrivals,
) -> Result<(), ClientError> {
    let gone: Vec<String> = {
        let state = lock(&shared.state);
        let changed = state.topics.len() != next.restored.len()
            || next.restored.iter().any(|t| !state.topics.contains(t))
            || state.asked_since(next.restored_by);
        if !changed {
            return Ok(());
        }
        next.restored
            .iter()
            .filter(|t| !state.topics.contains(*t))
            .cloned()
            .collect()
    };
    let (id, topics) = restoration(shared);
    let mut frames = Vec::new();
    if !gone.is_empty() {
        let unsubscribe = shared
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        frames.push(encode(&v1::ClientToServer::unsubscribe(v1::Unsubscribe {
            request_id: unsubscribe,
            topics: gone,
        })));
    }
    if !topics.is_empty() {
        frames.push(encode(&v1::ClientToServer::subscribe(v1::Subscribe {
            request_id: id,
            topics: topics.clone(),
            recover: Vec::new(),
        })));
    }
    next.link
        .sink
        .send_now(&frames)
        .await
        .map_err(|e| ClientError::Protocol(format!("server link failed: {e}")))?;
    let mut held = std::mem::take(&mut next.held);
    let restoring = restore(
        &mut next.link,
        shared,
        events,
        (id, &[]),
        &topics,
        false,
        arrivals,
        &mut held,
    );
    let restored = tokio::time::timeout(config.connect_timeout, restoring)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout(format!(
                "restoring subscriptions on {}",
                next.server_id
            )))
        });
    next.held = held;
    let (_, pending) = restored?;
    let confirmed = lock(&shared.state).resubscribed(id, &topics, pending);
    for event in confirmed {
        let _ = events.send_one(event).await;
    }
    next.restored = topics;
    next.restored_by = id;
    Ok(())
}

/// The publishes to send again on a new connection: those the lost one carried (or held
/// queued) without a confirmation, marked with the alias they were first sent under.
fn resends(shared: &Shared) -> Vec<Bytes> {
    let outbox = lock(&shared.outbox);
    outbox
        .unconfirmed
        .iter()
        .take_while(|u| u.seq <= outbox.resend_up_to)
        .filter_map(|u| {
            let mut msg: v1::ClientToServer = relaymesh_proto::decode(u.frame.clone()).ok()?;
            let resent_from = match &mut msg.kind {
                Some(v1::client_to_server::Kind::Publish(p)) => &mut p.resent_from,
                Some(v1::client_to_server::Kind::Send(s)) => &mut s.resent_from,
                _ => return Some(u.frame.clone()),
            };
            if let Some(alias) = &u.first_alias
                && resent_from.is_empty()
            {
                *resent_from = alias.to_string();
            }
            Some(encode(&msg))
        })
        .collect()
}

/// A connection, on which the client had alias `alias`, was lost (or moved from): everything
/// it was given and the server did not confirm goes out again on the next one. The outbound
/// queue is emptied: its publishes are all unconfirmed (and go out again from there), and the
/// resubscription covers its subscription changes.
fn lost(shared: &Shared, out: &mut queue::Receiver<Bytes>, alias: &str) {
    let alias: Arc<str> = alias.into();
    // Node lists asked of the lost server never come: their callers are told now.
    lock(&shared.state).lists.clear();
    let mut outbox = lock(&shared.outbox);
    // Under the outbox lock, which every publish holds while it queues: nothing is queued
    // between emptying the queue and marking what to resend.
    while out.try_recv().is_ok() {}
    for u in &mut outbox.unconfirmed {
        if u.first_alias.is_none() {
            u.first_alias = Some(alias.clone());
        }
    }
    outbox.resend_up_to = outbox.last;
}

/// A delivered message as an event: a topic's message, or a direct message, signal or
/// presence event (topics starting with '@', which only servers make).
fn message(m: v1::Message) -> Event {
    if m.topic.starts_with('@') {
        if m.topic == relaymesh_proto::node::PRESENCE_TOPIC
            && let Ok(event) = relaymesh_proto::decode::<v1::PresenceEvent>(m.payload.clone())
        {
            return Event::Presence {
                change: event.change(),
                node: event.node.unwrap_or_default(),
            };
        }
        if relaymesh_proto::node::of_topic(&m.topic).is_some() {
            if m.signal != 0 {
                return Event::Signal(crate::Signal {
                    from_node: m.from_node,
                    from: m.from_alias,
                    kind: v1::SignalKind::try_from(m.signal).unwrap_or(v1::SignalKind::Custom),
                    payload: m.payload,
                });
            }
            return Event::Direct(crate::Direct {
                from_node: m.from_node,
                from: m.from_alias,
                role: m.from_role,
                payload: m.payload,
                inbox_id: m.inbox_id,
            });
        }
    }
    Event::Message(Message::from(m))
}

/// Whether `m` is new: inbox messages by their inbox id (they come after messages sent later,
/// so publisher numbers say nothing about them), the rest by [`crate::Seen`].
/// On a topic that keeps history, a message whose stream offset was delivered is a copy, and
/// one that arrives while its topic recovers waits for the recovery (it is not new yet).
fn fresh(shared: &Shared, seen: &mut crate::Seen, m: &v1::Message) -> bool {
    if m.inbox_id > 0 {
        return shared.inbox_fresh(m.inbox_id);
    }
    if m.stream != 0 && lock(&shared.history).arrive(m) != crate::history::Arrival::Fresh {
        return false;
    }
    seen.fresh(m)
}

/// A `HistoryBatch`: a recovery's messages (new ones, each publisher's in order) and, when it
/// is done, the live messages it held and its outcome; or part of a `History` answer.
fn history_batch(b: v1::HistoryBatch, shared: &Shared, seen: &mut crate::Seen) -> Handled {
    if !b.recovery {
        lock(&shared.history).answered(b);
        return Handled::Nothing;
    }
    let topic = b.topic.clone();
    let recovery = lock(&shared.history).recovered(b);
    Handled::Events(recovery_events(topic, recovery, seen))
}

/// The events of (part of) a recovery of `topic`: its new messages, then, when it is done, the
/// drops of held messages that did not fit, the gap and the end.
fn recovery_events(
    topic: String,
    recovery: crate::history::Recovery,
    seen: &mut crate::Seen,
) -> Vec<Event> {
    let mut events: Vec<Event> = recovery
        .messages
        .into_iter()
        .filter(|m| seen.fresh(m))
        .map(message)
        .collect();
    if recovery.dropped > 0 {
        events.push(Event::Dropped {
            count: recovery.dropped,
            upstream: 0,
        });
    }
    if let Some(missed_at_least) = recovery.gap {
        events.push(Event::RecoveryGap {
            topic: topic.clone(),
            missed_at_least,
        });
    }
    if let Some(count) = recovery.recovered {
        events.push(Event::Recovered { topic, count });
    }
    events
}

/// The backend changed the subscriptions: they are the client's own from now on.
fn changed_subscriptions(shared: &Shared, c: v1::SubscriptionsChanged) -> Event {
    let mut state = lock(&shared.state);
    for topic in &c.removed {
        state.topics.remove(topic);
    }
    state.topics.extend(c.added.iter().cloned());
    Event::SubscriptionsChanged {
        added: c.added,
        removed: c.removed,
    }
}

fn undeliverable(u: v1::Undeliverable) -> Event {
    Event::Undeliverable {
        seq: u.seq,
        to_node: u.to_node,
        reason: v1::ErrorCode::try_from(u.reason).unwrap_or(v1::ErrorCode::Unspecified),
        message: u.message,
    }
}

/// How a connection ended.
enum Ended {
    /// The client was closed.
    Stopped,
    /// The connection was lost, for this reason.
    Lost(String),
    /// The server asked the client to move (for this reason), and it did: the next
    /// connection is made; `true` if the one moved from was read to its end (`Left`).
    Moved(String, Box<Connected>, bool),
}

/// Runs connections until the client is closed (or, without auto-reconnect, until the first
/// connection is lost).
pub(crate) async fn drive(
    config: ClientConfig,
    shared: Arc<Shared>,
    first: Connected,
    mut out: queue::Receiver<Bytes>,
    pings: queue::WeakSender<Bytes>,
    events: EventTx,
) {
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut next = Some(first);
    let mut exclude = Vec::new();
    loop {
        let connected = match next.take() {
            Some(connected) => connected,
            None => {
                let round = establish(&config, &shared, &events, &exclude, Arrivals::Deliver);
                match stoppable(&shared, round).await {
                    None => break,
                    Some(Ok(connected)) => {
                        backoff.reset();
                        let event = Event::Reconnected {
                            server_id: connected.server_id.clone(),
                            alias: connected.alias.clone(),
                        };
                        if stoppable(&shared, events.send_one(event)).await.is_none() {
                            break;
                        }
                        connected
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reconnect failed");
                        // The excluded server may be the only one; allow it again next round.
                        exclude.clear();
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => continue,
                            _ = shared.stop.cancelled() => break,
                        }
                    }
                }
            }
        };
        let server_id = connected.server_id.clone();
        let alias = connected.alias.clone();
        let (ended, queue) = run(connected, &config, &shared, out, &pings, &events).await;
        let Some(queue) = queue else { break };
        out = queue;
        let reason = match ended {
            Ended::Stopped => break,
            Ended::Moved(reason, mut moved, clean) => {
                let finished = finish_move(&config, &shared, &events, &mut moved, &alias, &mut out);
                match stoppable(&shared, finished).await {
                    None => break,
                    Some(Ok(())) => {
                        tracing::info!(from = %server_id, to = %moved.server_id, %reason, clean, "moved");
                        let told = if clean {
                            vec![Event::Moved {
                                from_server: server_id,
                                server_id: moved.server_id.clone(),
                                alias: moved.alias.clone(),
                                reason,
                            }]
                        } else {
                            // The old server was not read to its end: what it still held for
                            // the client may be missing, as after any lost connection.
                            vec![
                                Event::Disconnected {
                                    server_id,
                                    reason: format!(
                                        "moving ({reason}): the server ended before sending everything queued here"
                                    ),
                                },
                                Event::Reconnected {
                                    server_id: moved.server_id.clone(),
                                    alias: moved.alias.clone(),
                                },
                            ]
                        };
                        let mut stopped = false;
                        for event in told {
                            stopped |= stoppable(&shared, events.send_one(event)).await.is_none();
                        }
                        if stopped {
                            break;
                        }
                        next = Some(*moved);
                        continue;
                    }
                    // The server moved to failed as the move ended: lost like any other.
                    Some(Err(e)) => {
                        lost(&shared, &mut out, &moved.alias);
                        exclude = vec![moved.server_id.clone()];
                        let server_id = moved.server_id.clone();
                        let reason = format!("lost while moving to it: {e}");
                        if !report_lost(&config, &shared, &events, server_id, reason).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            Ended::Lost(reason) => reason,
        };
        lost(&shared, &mut out, &alias);
        if !report_lost(&config, &shared, &events, server_id.clone(), reason).await {
            break;
        }
        exclude = vec![server_id];
    }
    // Requests still waiting see their channel close and fail with `Closed`.
    lock(&shared.state).pending.clear();
}

/// Tells the application the connection to `server_id` was lost; whether to connect again.
async fn report_lost(
    config: &ClientConfig,
    shared: &Shared,
    events: &EventTx,
    server_id: String,
    reason: String,
) -> bool {
    tracing::info!(server = %server_id, %reason, "connection lost");
    let event = Event::Disconnected { server_id, reason };
    // An application that stopped reading events must still be able to close.
    if stoppable(shared, events.send_one(event)).await.is_none() {
        return false;
    }
    config.auto_reconnect
        && !shared.stop.is_cancelled()
        && !shared.replaced.load(std::sync::atomic::Ordering::Relaxed)
}

/// Awaits `future` unless the client is closed first (`None`).
async fn stoppable<T>(shared: &Shared, future: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::select! {
        value = future => Some(value),
        _ = shared.stop.cancelled() => None,
    }
}

/// Runs one connection on the link driver: a spawned writer drains `out`, the outbound queue
/// (given back with what is left in it), and this task reads, turning frames into events. The
/// queue comes back as `None` only if the writer task failed (a bug): the client then ends.
///
/// Asked to move (`Reconnect`), it moves make-before-break: while this connection is still
/// read, another is made through the coordinator and subscribed; then this one is sent
/// `Leave` and read up to the server's `Left`, so nothing queued for the client here is lost,
/// and the caller finishes the move. If the other connection cannot be made, this one ends
/// and the client reconnects as after a loss.
async fn run(
    connected: Connected,
    config: &ClientConfig,
    shared: &Arc<Shared>,
    out: queue::Receiver<Bytes>,
    pings: &queue::WeakSender<Bytes>,
    events: &EventTx,
) -> (Ended, Option<queue::Receiver<Bytes>>) {
    let closer = Closer::new();
    let options = link::Options {
        writer: WriterSetup {
            ctrl: out,
            data: None,
            closer: closer.clone(),
            linger: CLOSE_TIMEOUT,
            direct: None,
            // Closing the client sends what is queued; a lost connection leaves it queued.
            on_close: OnClose::KeepQueuedUnless(shared.stop.clone()),
            first: link::First::Nothing,
        },
        // Attached and resubscribed already.
        handshake: None,
        shutdown: shared.stop.clone(),
        max_burst: link::MAX_BURST,
        watch: link::Watch::Own,
    };
    let (move_tx, mut move_rx) = tokio::sync::oneshot::channel();
    let reader = Reader {
        shared: shared.clone(),
        events: events.clone(),
        pings: pings.clone(),
        closer: closer.clone(),
        heartbeat: Heartbeat {
            timeout: connected.heartbeat_timeout,
            interval: connected.heartbeat_interval,
        },
        nonce: 0,
        burst: Vec::new(),
        reason: None,
        seen: std::mem::take(&mut *lock(&shared.seen)),
        asked_to_move: config.auto_reconnect.then_some(move_tx),
        moving: false,
        left: false,
    };
    let server_id = connected.server_id.clone();
    let serve = link::serve(connected.link, options, reader);
    tokio::pin!(serve);
    let mut moved = None;
    let mut served = tokio::select! {
        served = &mut serve => served,
        Ok(reason) = &mut move_rx => {
            tracing::info!(server = %server_id, %reason, "asked to move: connecting elsewhere first");
            let exclude = [server_id.clone()];
            let elsewhere = establish(config, shared, events, &exclude, Arrivals::Hold);
            tokio::select! {
                served = &mut serve => served,
                next = elsewhere => match next {
                    Ok(mut next) => {
                        // The old connection is still read while the new one settles.
                        let settled = tokio::select! {
                            served = &mut serve => Some(served),
                            () = settle(config, shared, events, &mut next) => None,
                        };
                        let served = match settled {
                            // It ended before `Left`: the move is not clean.
                            Some(served) => served,
                            None if leave(pings) => {
                                ping(&mut next).await;
                                match tokio::time::timeout(config.connect_timeout, &mut serve).await {
                                    Ok(served) => served,
                                    Err(_) => {
                                        tracing::warn!(server = %server_id, "no Left in time; closing");
                                        closer.close(None);
                                        serve.await
                                    }
                                }
                            }
                            None => {
                                closer.close(None);
                                serve.await
                            }
                        };
                        moved = Some((reason, next));
                        served
                    }
                    Err(e) => {
                        tracing::warn!(server = %server_id, error = %e, "could not connect elsewhere first; moving after closing");
                        closer.close(None);
                        serve.await
                    }
                },
            }
        }
    };
    *lock(&shared.seen) = std::mem::take(&mut served.handler.seen);
    let Some(end) = served.writer else {
        return (Ended::Stopped, None);
    };
    let reason = match served.outcome {
        Err(e) if e.error_code() == v1::ErrorCode::HeartbeatTimeout => format!(
            "server silent for over {} ms",
            connected.heartbeat_timeout.as_millis()
        ),
        Err(e) if e.error_code() == v1::ErrorCode::BadFrame => {
            format!("bad frame from server: {}", e.message)
        }
        Err(e) => e.message,
        Ok(()) => served
            .handler
            .reason
            .unwrap_or_else(|| "server closed the connection".to_owned()),
    };
    // Every sender gone means the client was dropped.
    let ended = if shared.stop.is_cancelled() || end.ctrl.is_closed() {
        Ended::Stopped
    } else if let Some((why, next)) = moved {
        // Whatever ended this connection, the next one is up; clean only if read to `Left`.
        let clean = served.handler.left;
        Ended::Moved(why, Box::new(next), clean)
    } else if let Some(e) = &end.error {
        Ended::Lost(format!("write to server failed: {e}"))
    } else {
        Ended::Lost(reason)
    };
    (ended, Some(end.ctrl))
}

/// Reads `next` (holding its messages) until every server has confirmed its restored
/// subscriptions, if some had not when it was answered: until then, messages published on
/// those servers would reach the client only through the connection it is leaving. Waits at
/// most the server's confirmation deadline (its second `Ack` says who is still missing), or
/// the connect timeout.
async fn confirmed(config: &ClientConfig, shared: &Shared, events: &EventTx, next: &mut Connected) {
    if next.unconfirmed.is_empty() {
        return;
    }
    let mut held = std::mem::take(&mut next.held);
    let reading = restore(
        &mut next.link,
        shared,
        events,
        (next.restored_by, &[]),
        &next.restored,
        false,
        Arrivals::Hold,
        &mut held,
    );
    if let Ok(Ok((_, pending))) = tokio::time::timeout(config.connect_timeout, reading).await {
        let answered = lock(&shared.state).acknowledge(next.restored_by, pending.clone());
        for event in answered {
            let _ = events.send_one(event).await;
        }
        next.unconfirmed = pending;
    }
    next.held = held;
}

/// Queues `Leave` behind what the client has queued for the server moved from; whether it
/// could (a full queue, or one whose writer is gone, cannot take it).
fn leave(pings: &queue::WeakSender<Bytes>) -> bool {
    pings.upgrade().is_some_and(|out| {
        out.try_send(encode(&v1::ClientToServer::leave(v1::Leave {})))
            .is_ok()
    })
}

/// Pings a connection that is not run yet, so its server does not take the client for dead
/// while the old one is read to its end.
async fn ping(next: &mut Connected) {
    let ping = encode(&v1::ClientToServer::ping(v1::Ping { nonce: 0 }));
    let _ = next.link.sink.send_now(&[ping]).await;
}

/// Gets `next` ready to take over: every server has its restored subscriptions (or the time
/// for that passed), and subscription changes made since are made there too.
async fn settle(config: &ClientConfig, shared: &Shared, events: &EventTx, next: &mut Connected) {
    confirmed(config, shared, events, next).await;
    if let Err(e) = catch_up(config, shared, events, next, Arrivals::Hold).await {
        tracing::debug!(server = %next.server_id, error = %e, "changes made while moving wait for the move");
    }
}

/// The reading side of one connection.
struct Reader {
    shared: Arc<Shared>,
    events: EventTx,
    /// The outbound queue, for pings; does not keep it open.
    pings: queue::WeakSender<Bytes>,
    closer: Closer,
    heartbeat: Heartbeat,
    nonce: u64,
    /// Events of the burst being read, handed on together.
    burst: Vec<Event>,
    /// Why the connection ended, when the reader ended it.
    reason: Option<String>,
    /// What has been delivered (the client's, held while the connection runs).
    seen: crate::Seen,
    /// Told when the server asks the client to move (`None` once told, or without
    /// auto-reconnect: the connection then just ends).
    asked_to_move: Option<tokio::sync::oneshot::Sender<String>>,
    /// Told already: the move is under way.
    moving: bool,
    /// The server moved from sent `Left`: everything queued for the client there was read.
    left: bool,
}

impl Reader {
    fn end(&mut self, reason: &str) -> Flow {
        self.reason = Some(reason.to_owned());
        Flow::End
    }
}

impl link::Handler for Reader {
    type In = v1::ServerToClient;

    async fn first(&mut self, _msg: v1::ServerToClient) -> Result<Flow, v1::Error> {
        // Not called: the handshake is done before the connection runs on the driver.
        Ok(Flow::Continue)
    }

    async fn message(&mut self, msg: v1::ServerToClient) -> Result<Flow, v1::Error> {
        Ok(match event_for(msg, &self.shared, &mut self.seen) {
            Handled::Event(event) => {
                self.burst.push(event);
                Flow::Continue
            }
            Handled::Events(events) => {
                self.burst.extend(events);
                Flow::Continue
            }
            Handled::Nothing => Flow::Continue,
            Handled::Move(reason) => match self.asked_to_move.take() {
                Some(tell) => {
                    let _ = tell.send(reason);
                    self.moving = true;
                    Flow::Continue
                }
                // Asked again while moving.
                None if self.moving => Flow::Continue,
                None => self.end(&format!("the server asked the client to move: {reason}")),
            },
            Handled::Left => {
                self.left = true;
                self.end("moved to another server")
            }
            Handled::End(reason) => {
                self.reason = Some(reason);
                Flow::End
            }
        })
    }

    /// Hands the burst's events on. Events before an ending still reach the application, and
    /// messages already read are not given up lightly: a closing client still waits a while
    /// for the application to make room.
    async fn burst_end(&mut self) -> Result<Flow, v1::Error> {
        if self.burst.is_empty() {
            return Ok(Flow::Continue);
        }
        let mut burst = std::mem::take(&mut self.burst);
        let n = burst.len();
        // Room is there almost always: then no timer is set up.
        let sent = (self.events.try_room(n))
            .map(|room| self.events.send(room, std::mem::take(&mut burst)));
        match sent {
            Some(Ok(())) => return Ok(Flow::Continue),
            Some(Err(())) => return Ok(self.end("client dropped")),
            None => {}
        }
        // The queue's sending end, apart from `self`, which the pings below need.
        let events = self.events.clone();
        let mut closing = false;
        // The driver does not tick while this waits: keep pinging, so an application that is
        // slow to take its events is not taken for a dead client.
        let mut pings = tokio::time::interval_at(
            tokio::time::Instant::now() + self.heartbeat.interval,
            self.heartbeat.interval,
        );
        let room = loop {
            tokio::select! {
                biased;
                room = events.room(n) => break room,
                _ = self.shared.stop.cancelled() => {
                    closing = true;
                    break tokio::time::timeout(CLOSE_TIMEOUT, events.room(n)).await.ok().flatten();
                }
                _ = self.closer.closed() => {
                    closing = true;
                    break tokio::time::timeout(CLOSE_TIMEOUT, events.room(n)).await.ok().flatten();
                }
                _ = pings.tick() => self.beat(),
            }
        };
        let Some(room) = room else {
            return Ok(self.end(if closing { "closed" } else { "client dropped" }));
        };
        if events.send(room, burst).is_err() {
            return Ok(self.end("client dropped"));
        }
        Ok(if closing {
            self.end("closed")
        } else {
            Flow::Continue
        })
    }

    fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }

    /// Pings share the outbound queue; one that finds the queue full is skipped, since the
    /// queued traffic shows the server that the client lives.
    fn beat(&mut self) {
        let Some(out) = self.pings.upgrade() else {
            return;
        };
        self.nonce += 1;
        let _ = out.try_send(encode(&v1::ClientToServer::ping(v1::Ping {
            nonce: self.nonce,
        })));
    }

    /// The client is closing: end cleanly, sending what is queued.
    fn stopping(&mut self) -> Result<(), v1::Error> {
        Ok(())
    }

    /// A client has nothing to tell the server when it ends a connection.
    fn last_words(&self, _error: v1::Error) -> Option<Bytes> {
        None
    }
}

/// The connection task's end of the event queue. Events travel in bursts (one channel
/// operation per burst), and the queue is bounded in events, not bursts: each burst takes room
/// for its events, which the application's end gives back as it takes bursts out.
#[derive(Debug, Clone)]
pub(crate) struct EventTx {
    tx: mpsc::UnboundedSender<Vec<Event>>,
    room: Arc<tokio::sync::Semaphore>,
    capacity: usize,
}

/// The application's end of the event queue.
#[derive(Debug)]
pub(crate) struct EventRx {
    rx: mpsc::UnboundedReceiver<Vec<Event>>,
    room: Arc<tokio::sync::Semaphore>,
    capacity: usize,
}

/// An event queue holding up to `capacity` events.
pub(crate) fn event_queue(capacity: usize) -> (EventTx, EventRx) {
    let capacity = capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(tokio::sync::Semaphore::new(capacity));
    (
        EventTx {
            tx,
            room: room.clone(),
            capacity,
        },
        EventRx { rx, room, capacity },
    )
}

/// Room taken in the event queue for one burst (given back if the burst is not sent).
pub(crate) struct Room<'a>(tokio::sync::SemaphorePermit<'a>);

impl EventTx {
    /// Waits for room for `n` events; `None` once the application's end is gone.
    pub(crate) async fn room(&self, n: usize) -> Option<Room<'_>> {
        let n = u32::try_from(n.min(self.capacity)).unwrap_or(u32::MAX);
        self.room.acquire_many(n).await.ok().map(Room)
    }

    /// Room for `n` events if there is some now (and the application's end is there).
    pub(crate) fn try_room(&self, n: usize) -> Option<Room<'_>> {
        let n = u32::try_from(n.min(self.capacity)).unwrap_or(u32::MAX);
        self.room.try_acquire_many(n).ok().map(Room)
    }

    /// Queues a burst in the room taken for it.
    pub(crate) fn send(&self, room: Room<'_>, burst: Vec<Event>) -> Result<(), ()> {
        room.0.forget();
        self.tx.send(burst).map_err(|_| ())
    }

    /// Queues one event once there is room.
    pub(crate) async fn send_one(&self, event: Event) -> Result<(), ()> {
        let room = self.room(1).await.ok_or(())?;
        self.send(room, vec![event])
    }
}

impl EventRx {
    /// The next burst; its room is given back.
    pub(crate) async fn recv(&mut self) -> Option<Vec<Event>> {
        let burst = self.rx.recv().await?;
        self.room.add_permits(burst.len().min(self.capacity));
        Some(burst)
    }
}

impl Drop for EventRx {
    fn drop(&mut self) {
        // A connection task waiting for room gives up.
        self.room.close();
    }
}

/// A `Dropped` notice as an event (`upstream` is part of `count`; a server that says more is
/// believed for `count`).
fn dropped(d: v1::Dropped) -> Event {
    Event::Dropped {
        count: d.count,
        upstream: d.upstream.min(d.count),
    }
}

/// What one frame from the server amounts to.
enum Handled {
    /// An event for the application.
    Event(Event),
    /// Any number of events (an `Ack` may confirm several subscriptions at once).
    Events(Vec<Event>),
    /// Nothing more to do.
    Nothing,
    /// The server asks the client to move, for this reason.
    Move(String),
    /// The server moved from has sent everything queued for the client.
    Left,
    /// The connection is over, for this reason.
    End(String),
}

/// Applies one message from the server to the client's state.
fn event_for(msg: v1::ServerToClient, shared: &Shared, seen: &mut crate::Seen) -> Handled {
    let event = match msg.kind {
        Some(Kind::Message(m)) if fresh(shared, seen, &m) => message(m),
        Some(Kind::Accepted(a)) => Event::Accepted {
            seq: a.seq,
            to_node: a.to_node,
            inbox_id: a.inbox_id,
        },
        Some(Kind::Expired(e)) => Event::Expired {
            to_node: e.to_node,
            inbox_id: e.inbox_id,
            seq: e.seq,
            publisher: e.publisher,
            stored_ms: e.stored_ms,
        },
        Some(Kind::Undeliverable(u)) => undeliverable(u),
        Some(Kind::SubscriptionsChanged(c)) => changed_subscriptions(shared, c),
        Some(Kind::NodeList(list)) => {
            if let Some(done) = lock(&shared.state).lists.remove(&list.request_id) {
                let _ = done.send(list);
            }
            return Handled::Nothing;
        }
        Some(Kind::Message(_)) => return Handled::Nothing,
        // Sent only to clients that connect with `batch=1`, which this one does not.
        Some(Kind::Batch(_)) => {
            return Handled::End("the server sent a batch this client did not ask for".into());
        }
        Some(Kind::Published(p)) => {
            shared.confirm(p.up_to);
            return Handled::Nothing;
        }
        Some(Kind::Dropped(d)) => dropped(d),
        Some(Kind::Ack(ack)) => {
            lock(&shared.history).subscribed(&ack);
            let events = lock(&shared.state).acknowledge(ack.request_id, ack.pending);
            return Handled::Events(events);
        }
        Some(Kind::History(b)) => return history_batch(b, shared, seen),
        // A refused `History` request fails that request only.
        Some(Kind::Error(e))
            if e.request_id != 0 && lock(&shared.history).refused(e.request_id, e.clone()) =>
        {
            return Handled::Nothing;
        }
        Some(Kind::Error(e)) if e.error_code() == v1::ErrorCode::Forbidden => {
            // Role rules: the server refused one request and keeps the connection.
            if e.request_id != 0 {
                lock(&shared.state).refuse(e.request_id, e);
                return Handled::Nothing;
            }
            Event::Forbidden { reason: e.message }
        }
        // Neither a replaced nor a kicked client comes back by itself.
        Some(Kind::Error(e))
            if matches!(
                e.error_code(),
                v1::ErrorCode::Replaced | v1::ErrorCode::Kicked
            ) =>
        {
            shared
                .replaced
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Handled::End(e.to_string());
        }
        // The server is being drained: move through the coordinator to another one.
        Some(Kind::Reconnect(r)) => return Handled::Move(r.reason),
        // Read to the end after a move: everything queued for the client here came before.
        Some(Kind::Left(_)) => return Handled::Left,
        Some(Kind::Error(e)) => {
            // A refused subscription change fails that request; the server then closes the
            // connection and the client reconnects without the refused topics.
            let reason = e.to_string();
            if e.request_id != 0 {
                lock(&shared.state).refuse(e.request_id, e);
            }
            return Handled::End(reason);
        }
        // Answers to a login, which comes before the session.
        Some(Kind::Pong(_) | Kind::Ready(_) | Kind::Redirect(_)) | None => {
            return Handled::Nothing;
        }
    };
    Handled::Event(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    fn dropped(count: u64) -> Event {
        Event::Dropped { count, upstream: 0 }
    }

    #[tokio::test]
    async fn the_event_queue_is_bounded_in_events_not_bursts() {
        let (tx, mut rx) = event_queue(4);
        for i in 0..4 {
            tx.send_one(dropped(i)).await.expect("room for four events");
        }
        assert!(tx.room(1).now_or_never().is_none(), "a fifth event waits");
        assert_eq!(rx.recv().await, Some(vec![dropped(0)]));
        let room = tx.room(1).await.expect("room again");
        tx.send(room, vec![dropped(4)]).expect("queued");
        // A burst takes room for all its events.
        for _ in 0..4 {
            rx.recv().await.expect("a burst");
        }
        let room = tx.room(3).await.expect("room for three");
        tx.send(room, vec![dropped(5), dropped(6), dropped(7)])
            .expect("queued");
        assert!(tx.room(2).now_or_never().is_none(), "only one left");
        assert!(
            tx.try_room(2).is_none(),
            "only one left, without waiting either"
        );
        assert!(tx.room(1).now_or_never().is_some());
        // Room taken and not used is given back.
        assert!(tx.try_room(1).is_some());
        assert!(tx.try_room(1).is_some());
        // The application's end gone: waiting for room gives up.
        drop(rx);
        assert!(tx.room(4).await.is_none());
    }
}
