//! Encoding and decoding of whole frames: one protobuf envelope per binary WebSocket message.
//!
//! Every link encodes with [`encode`] and decodes with [`decode`]. The two frames that are built
//! once per published message, a delivered [`v1::Message`] and a peer [`v1::Forward`], have
//! hand-written encoders ([`message_frame`], [`forward_frame`]) that write straight from borrowed
//! strings into one exactly-sized buffer, so the hot path allocates once per publish rather than
//! once per field. Their output is byte-for-byte what prost would produce (see the tests).

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encoded_len_varint, key_len};

use crate::v1;

/// A frame that is not a valid envelope of the expected type.
#[derive(Debug, thiserror::Error)]
#[error("malformed protobuf frame: {0}")]
pub struct DecodeError(prost::DecodeError);

// By hand rather than `#[from]`: the cause is part of the message, so it is not also a
// `source` (an error chain would print it twice).
impl From<prost::DecodeError> for DecodeError {
    fn from(e: prost::DecodeError) -> Self {
        Self(e)
    }
}

/// Encodes a message into a frame, allocating exactly once.
pub fn encode<M: prost::Message>(msg: &M) -> Bytes {
    let mut buf = BytesMut::with_capacity(msg.encoded_len());
    // Encoding into a buffer sized by `encoded_len` cannot run out of space.
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// Decodes a frame. `bytes` fields of the result are slices of `frame`, not copies.
pub fn decode<M: prost::Message + Default>(frame: Bytes) -> Result<M, DecodeError> {
    Ok(M::decode(frame)?)
}

/// Decodes a frame that must be an `M`; a malformed frame becomes `Error{BAD_FRAME}`.
pub fn decode_frame<M: prost::Message + Default>(frame: Bytes) -> Result<M, v1::Error> {
    decode(frame).map_err(|e| v1::Error::new(v1::ErrorCode::BadFrame, e.to_string()))
}

/// An envelope that can carry an [`v1::Error`]: what a process sends before closing a link.
pub trait ErrorEnvelope: prost::Message + Sized {
    /// Wraps `error` in this envelope.
    fn from_error(error: v1::Error) -> Self;
}

/// Encodes `error` as a frame of envelope type `E`.
pub fn error_frame<E: ErrorEnvelope>(error: v1::Error) -> Bytes {
    encode(&E::from_error(error))
}

macro_rules! error_envelopes {
    ($($envelope:ident),*) => {$(
        impl ErrorEnvelope for v1::$envelope {
            fn from_error(error: v1::Error) -> Self {
                Self::error(error)
            }
        }
    )*};
}

error_envelopes!(
    CoordinatorToServer,
    CoordinatorToClient,
    ServerToClient,
    PeerMessage
);

/// Field number of `message` in the `ServerToClient.kind` oneof.
const SERVER_TO_CLIENT_MESSAGE: u32 = 2;
/// Field number of `forward` in the `PeerMessage.kind` oneof.
const PEER_MESSAGE_FORWARD: u32 = 4;

/// Who sent a message, as the accepting server stamps it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sender<'a> {
    /// The sender's alias.
    pub alias: &'a str,
    /// The sender's role (empty for none).
    pub role: &'a str,
    /// The publisher's number for the message (`Publish.seq`; 0 for none).
    pub seq: u64,
    /// The alias it was first published under, when this is a resend (`Publish.resent_from`).
    pub resent_from: &'a str,
    /// The sender's node, for a direct message or signal (empty: none, or not a node).
    pub node: &'a str,
    /// The signal kind (`v1::SignalKind` as `i32`; 0 for none).
    pub signal: i32,
    /// Where the message sits in its topic's history (all zero: the topic keeps none).
    pub position: Position,
}

/// A message's place in a topic's history: `Message.stream`, `offset` and `published_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The stream: one server process's messages on the topic (0: no history).
    pub stream: u64,
    /// 1, 2, 3... within the stream.
    pub offset: u64,
    /// When the stream's server accepted the message (ms since the Unix epoch).
    pub published_ms: u64,
}

/// Field numbers of `stream`, `offset` and `published_ms`, the same in `Message` and `Forward`.
const POSITION_FIELDS: u32 = 10;

impl<'a> Sender<'a> {
    /// The fields after a message's length-delimited ones: `seq` (a varint), `resent_from`,
    /// `from_node` and `signal` (a varint).
    fn tail(&self) -> Tail<'a> {
        Tail {
            seq: self.seq,
            resent_from: self.resent_from.as_bytes(),
            node: self.node.as_bytes(),
            signal: self.signal,
            position: self.position,
        }
    }
}

/// Fields numbered right after an envelope's length-delimited ones: a varint, two strings and
/// a varint.
#[derive(Debug, Clone, Copy)]
struct Tail<'a> {
    seq: u64,
    resent_from: &'a [u8],
    node: &'a [u8],
    signal: i32,
    /// Encoded at fields 10, 11 and 12 whatever `first` is.
    position: Position,
}

impl Tail<'_> {
    fn len(&self, first: u32) -> usize {
        let varint = |field: u32, value: u64| {
            if value == 0 {
                0
            } else {
                key_len(field) + encoded_len_varint(value)
            }
        };
        varint(first, self.seq)
            + field_len(first + 1, self.resent_from.len())
            + field_len(first + 2, self.node.len())
            // An enum is encoded as its `i32` sign-extended to 64 bits, as prost does.
            + varint(first + 3, self.signal as i64 as u64)
            + self
                .position_fields()
                .iter()
                .map(|&(field, value)| varint(field, value))
                .sum::<usize>()
    }

    fn position_fields(&self) -> [(u32, u64); 3] {
        let p = self.position;
        [
            (POSITION_FIELDS, p.stream),
            (POSITION_FIELDS + 1, p.offset),
            (POSITION_FIELDS + 2, p.published_ms),
        ]
    }

    fn put(&self, first: u32, buf: &mut BytesMut) {
        if self.seq != 0 {
            put_key(first, WireType::Varint, buf);
            put_varint(self.seq, buf);
        }
        for (field, value) in [(first + 1, self.resent_from), (first + 2, self.node)] {
            if !value.is_empty() {
                put_key(field, WireType::LengthDelimited, buf);
                put_varint(value.len() as u64, buf);
                buf.put_slice(value);
            }
        }
        if self.signal != 0 {
            put_key(first + 3, WireType::Varint, buf);
            put_varint(self.signal as i64 as u64, buf);
        }
        for (field, value) in self.position_fields() {
            if value != 0 {
                put_key(field, WireType::Varint, buf);
                put_varint(value, buf);
            }
        }
    }
}

/// Encodes `ServerToClient { message: Message { topic, from_alias, payload, from_role, seq,
/// resent_from, from_node, signal } }`.
pub fn message_frame(topic: &str, from: Sender<'_>, payload: &[u8]) -> Bytes {
    let fields = message_fields(topic, &from, payload);
    let tail = from.tail();
    let mut buf = BytesMut::with_capacity(wrapped_len(SERVER_TO_CLIENT_MESSAGE, &fields, tail));
    put_wrapped(SERVER_TO_CLIENT_MESSAGE, &fields, tail, &mut buf);
    buf.freeze()
}

/// The length of [`message_frame`]'s encoding, to size a header written before it.
pub fn message_frame_len(topic: &str, from: Sender<'_>, payload: &[u8]) -> usize {
    wrapped_len(
        SERVER_TO_CLIENT_MESSAGE,
        &message_fields(topic, &from, payload),
        from.tail(),
    )
}

/// Appends [`message_frame`]'s encoding to `buf` (so many messages can share one buffer).
pub fn put_message_frame(buf: &mut BytesMut, topic: &str, from: Sender<'_>, payload: &[u8]) {
    put_wrapped(
        SERVER_TO_CLIENT_MESSAGE,
        &message_fields(topic, &from, payload),
        from.tail(),
        buf,
    );
}

fn message_fields<'a>(topic: &'a str, from: &Sender<'a>, payload: &'a [u8]) -> [&'a [u8]; 4] {
    [
        topic.as_bytes(),
        from.alias.as_bytes(),
        payload,
        from.role.as_bytes(),
    ]
}

/// Encodes `PeerMessage { forward: Forward { account, topic, from_alias, payload, from_role,
/// seq, resent_from, from_node, signal } }`
/// (`account` is the routing scope).
pub fn forward_frame(account: &str, topic: &str, from: Sender<'_>, payload: &[u8]) -> Bytes {
    let fields: [&[u8]; 5] = [
        account.as_bytes(),
        topic.as_bytes(),
        from.alias.as_bytes(),
        payload,
        from.role.as_bytes(),
    ];
    let tail = from.tail();
    let mut buf = BytesMut::with_capacity(wrapped_len(PEER_MESSAGE_FORWARD, &fields, tail));
    put_wrapped(PEER_MESSAGE_FORWARD, &fields, tail, &mut buf);
    buf.freeze()
}

/// Field number of `history` in the `ServerToClient.kind` oneof.
const SERVER_TO_CLIENT_HISTORY: u32 = 15;
/// Field number of `history_answer` in the `PeerMessage.kind` oneof.
const PEER_MESSAGE_HISTORY_ANSWER: u32 = 11;

/// Encodes `ServerToClient { history: head + messages }`, where each of `messages` is a
/// [`message_frame`]: `HistoryBatch.messages` is field 2 as `ServerToClient.message` is, so a
/// message frame is already an encoded element of it and is copied as it is.
pub fn history_batch_frame<'a>(
    head: &v1::HistoryBatch,
    messages: impl Iterator<Item = &'a Bytes> + Clone,
) -> Bytes {
    wrap_with_messages(SERVER_TO_CLIENT_HISTORY, head, messages)
}

/// Encodes `PeerMessage { history_answer: head + messages }`, as [`history_batch_frame`].
pub fn history_answer_frame<'a>(
    head: &v1::HistoryAnswer,
    messages: impl Iterator<Item = &'a Bytes> + Clone,
) -> Bytes {
    wrap_with_messages(PEER_MESSAGE_HISTORY_ANSWER, head, messages)
}

/// Field number of `batch` in the `ServerToClient.kind` oneof.
const SERVER_TO_CLIENT_BATCH: u32 = 16;

/// Whether `frame` is a [`message_frame`] (a `ServerToClient` holding a `message`).
pub fn is_message_frame(frame: &[u8]) -> bool {
    frame.first()
        == Some(&((SERVER_TO_CLIENT_MESSAGE << 3) as u8 | WireType::LengthDelimited as u8))
}

/// The length of the head of `ServerToClient { batch: MessageBatch }` whose messages, each a
/// [`message_frame`], take `messages_len` bytes. `MessageBatch.messages` is field 2 as
/// `ServerToClient.message` is, so the message frames follow the head as they are.
pub fn batch_head_len(messages_len: usize) -> usize {
    key_len(SERVER_TO_CLIENT_BATCH) + encoded_len_varint(messages_len as u64)
}

/// Appends that head to `buf`; `messages_len` bytes of message frames are to follow.
pub fn put_batch_head(buf: &mut BytesMut, messages_len: usize) {
    put_key(SERVER_TO_CLIENT_BATCH, WireType::LengthDelimited, buf);
    put_varint(messages_len as u64, buf);
}

fn wrap_with_messages<'a>(
    tag: u32,
    head: &impl prost::Message,
    messages: impl Iterator<Item = &'a Bytes> + Clone,
) -> Bytes {
    let inner = head.encoded_len() + messages.clone().map(Bytes::len).sum::<usize>();
    let mut buf = BytesMut::with_capacity(key_len(tag) + encoded_len_varint(inner as u64) + inner);
    put_key(tag, WireType::LengthDelimited, &mut buf);
    put_varint(inner as u64, &mut buf);
    head.encode_raw(&mut buf);
    for m in messages {
        buf.put_slice(m);
    }
    buf.freeze()
}

/// The encoded length of an envelope whose oneof field `tag` holds a message made of
/// length-delimited fields numbered 1, 2, 3, ..., then `tail`.
fn wrapped_len(tag: u32, fields: &[&[u8]], tail: Tail<'_>) -> usize {
    let inner = inner_len(fields, tail);
    key_len(tag) + encoded_len_varint(inner as u64) + inner
}

fn inner_len(fields: &[&[u8]], tail: Tail<'_>) -> usize {
    fields
        .iter()
        .zip(1u32..)
        .map(|(value, field)| field_len(field, value.len()))
        .sum::<usize>()
        + tail.len(fields.len() as u32 + 1)
}

/// Appends such an envelope to `buf`. Empty fields are omitted, as proto3 requires.
fn put_wrapped(tag: u32, fields: &[&[u8]], tail: Tail<'_>, buf: &mut BytesMut) {
    let inner = inner_len(fields, tail);
    buf.reserve(key_len(tag) + encoded_len_varint(inner as u64) + inner);
    put_key(tag, WireType::LengthDelimited, buf);
    put_varint(inner as u64, buf);
    for (value, field) in fields.iter().zip(1u32..) {
        if !value.is_empty() {
            put_key(field, WireType::LengthDelimited, buf);
            put_varint(value.len() as u64, buf);
            buf.put_slice(value);
        }
    }
    tail.put(fields.len() as u32 + 1, buf);
}

/// Appends a field's key (as prost's `encode_key`).
#[inline]
fn put_key(field: u32, wire_type: WireType, buf: &mut BytesMut) {
    put_varint(u64::from(field << 3 | wire_type as u32), buf);
}

/// Appends `value` as a varint (as prost's `encode_varint`), with one copy into `buf` rather
/// than one checked write per byte: these frames are encoded once per published message.
#[inline]
fn put_varint(mut value: u64, buf: &mut BytesMut) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while value >= 0x80 {
        bytes[n] = (value as u8) | 0x80;
        value >>= 7;
        n += 1;
    }
    bytes[n] = value as u8;
    buf.extend_from_slice(&bytes[..=n]);
}

fn field_len(field: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(field) + encoded_len_varint(len as u64) + len
    }
}

/// Shorthand constructors for envelopes, so link code reads as what it sends.
macro_rules! envelope_ctors {
    ($envelope:ident, $kind:path { $($variant:ident($inner:ty) => $fn:ident),* $(,)? }) => {
        impl v1::$envelope {
            $(
                #[doc = concat!("Wraps a [`", stringify!($inner), "`] in a [`v1::", stringify!($envelope), "`].")]
                pub fn $fn(inner: $inner) -> Self {
                    Self { kind: Some(<$kind>::$variant(inner)) }
                }
            )*
        }
    };
}

envelope_ctors!(ServerToCoordinator, v1::server_to_coordinator::Kind {
    Register(v1::Register) => register,
    Load(v1::Load) => load,
    Reserved(v1::Reserved) => reserved,
    ReserveFailed(v1::ReserveFailed) => reserve_failed,
    Pong(v1::Pong) => pong,
    NodeSessions(v1::NodeSessions) => node_sessions,
    InboxPut(v1::InboxPut) => inbox_put,
    InboxFetch(v1::InboxFetch) => inbox_fetch,
    InboxDone(v1::InboxDone) => inbox_done,
    Answer(v1::ServerAnswer) => answer,
    RelayedLogin(v1::RelayedLogin) => relayed_login,
});
envelope_ctors!(CoordinatorToServer, v1::coordinator_to_server::Kind {
    Registered(v1::Registered) => registered,
    PeerJoined(v1::PeerJoined) => peer_joined,
    PeerLeft(v1::PeerLeft) => peer_left,
    Reserve(v1::Reserve) => reserve,
    Error(v1::Error) => error,
    Ping(v1::Ping) => ping,
    Replace(v1::Replace) => replace,
    Presence(v1::NodePresence) => presence,
    InboxStored(v1::InboxStored) => inbox_stored,
    InboxBatch(v1::InboxBatch) => inbox_batch,
    InboxNudge(v1::InboxNudge) => inbox_nudge,
    InboxExpired(v1::InboxExpired) => inbox_expired,
    Drain(v1::Drain) => drain,
    Query(v1::ServerQuery) => query,
    RelayedLoginAnswer(v1::RelayedLoginAnswer) => relayed_login_answer,
    Unreserve(v1::Unreserve) => unreserve,
});
envelope_ctors!(ClientToCoordinator, v1::client_to_coordinator::Kind {
    Hello(v1::Hello) => hello,
    Connect(v1::Connect) => connect,
    Ping(v1::Ping) => ping,
    ChallengeResponse(v1::ChallengeResponse) => challenge_response,
    RegisterNode(v1::RegisterNode) => register_node,
    UpdateNode(v1::UpdateNode) => update_node,
});
envelope_ctors!(CoordinatorToClient, v1::coordinator_to_client::Kind {
    Welcome(v1::Welcome) => welcome,
    Offer(v1::ConnectOffer) => offer,
    Error(v1::Error) => error,
    Pong(v1::Pong) => pong,
    Challenge(v1::Challenge) => challenge,
    NodeRegistered(v1::NodeRegistered) => node_registered,
    NodeUpdated(v1::NodeUpdated) => node_updated,
});
envelope_ctors!(ClientToServer, v1::client_to_server::Kind {
    Attach(v1::Attach) => attach,
    Subscribe(v1::Subscribe) => subscribe,
    Unsubscribe(v1::Unsubscribe) => unsubscribe,
    Publish(v1::Publish) => publish,
    Ping(v1::Ping) => ping,
    Send(v1::Send) => send,
    Signal(v1::Signal) => signal,
    ListNodes(v1::ListNodes) => list_nodes,
    InboxAck(v1::InboxAck) => inbox_ack,
    Leave(v1::Leave) => leave,
    History(v1::History) => history,
    Batch(v1::PublishBatch) => batch,
    Login(v1::Login) => login,
});
envelope_ctors!(ServerToClient, v1::server_to_client::Kind {
    Ready(v1::Ready) => ready,
    Message(v1::Message) => message,
    Dropped(v1::Dropped) => dropped,
    Error(v1::Error) => error,
    Pong(v1::Pong) => pong,
    Ack(v1::Ack) => ack,
    Published(v1::Published) => published,
    Undeliverable(v1::Undeliverable) => undeliverable,
    NodeList(v1::NodeList) => node_list,
    Accepted(v1::Accepted) => accepted,
    Expired(v1::Expired) => expired,
    Reconnect(v1::Reconnect) => reconnect,
    Left(v1::Left) => left,
    SubscriptionsChanged(v1::SubscriptionsChanged) => subscriptions_changed,
    History(v1::HistoryBatch) => history,
    Batch(v1::MessageBatch) => batch,
    Redirect(v1::ConnectOffer) => redirect,
});
envelope_ctors!(PeerMessage, v1::peer_message::Kind {
    Hello(v1::PeerHello) => hello,
    Interest(v1::Interest) => interest,
    InterestAck(v1::InterestAck) => interest_ack,
    Forward(v1::Forward) => forward,
    ForwardDropped(v1::ForwardDropped) => forward_dropped,
    Ping(v1::Ping) => ping,
    Pong(v1::Pong) => pong,
    Error(v1::Error) => error,
    Flush(v1::Flush) => flush,
    HistoryQuery(v1::HistoryQuery) => history_query,
    HistoryAnswer(v1::HistoryAnswer) => history_answer,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frame_matches_prost() {
        for (topic, alias, payload, role, seq, resent_from, node, signal) in [
            ("rooms/lobby", "a1-7", &b"hello"[..], "gcs", 0, "", "", 0),
            ("t", "", &b""[..], "", 1, "", "", 0),
            ("x", "y", &[0u8; 300][..], "", 300, "old-alias", "", 0),
            ("x", "y", &b"z"[..], "r", u64::MAX, "o", "", 0),
            ("@node/ab", "y", &b"z"[..], "", 7, "", "0123abcd", 0),
            ("@node/ab", "y", &b"z"[..], "r", 7, "o", "0123abcd", 4),
            ("@node/ab", "y", &b"z"[..], "", 0, "", "", -1),
        ] {
            let expected = encode(&v1::ServerToClient::message(v1::Message {
                topic: topic.into(),
                from_alias: alias.into(),
                payload: Bytes::copy_from_slice(payload),
                from_role: role.into(),
                seq,
                resent_from: resent_from.into(),
                from_node: node.into(),
                signal,
                inbox_id: 0,
                stream: seq.wrapping_mul(31),
                offset: seq,
                published_ms: seq / 2,
            }));
            let from = Sender {
                alias,
                role,
                seq,
                resent_from,
                node,
                signal,
                position: Position {
                    stream: seq.wrapping_mul(31),
                    offset: seq,
                    published_ms: seq / 2,
                },
            };
            assert_eq!(message_frame(topic, from, payload), expected);
            assert_eq!(message_frame_len(topic, from, payload), expected.len());
            let mut shared = BytesMut::from(&b"head"[..]);
            put_message_frame(&mut shared, topic, from, payload);
            assert_eq!(&shared[4..], &expected[..]);
        }
    }

    #[test]
    fn batch_of_message_frames_matches_prost() {
        let messages: Vec<v1::Message> = (0..3u64)
            .map(|i| v1::Message {
                topic: format!("t{i}"),
                from_alias: "a".into(),
                payload: Bytes::from(vec![i as u8; 150 * i as usize]),
                seq: i,
                ..v1::Message::default()
            })
            .collect();
        let frames: Vec<Bytes> = messages
            .iter()
            .map(|m| encode(&v1::ServerToClient::message(m.clone())))
            .collect();
        assert!(frames.iter().all(|f| is_message_frame(f)));
        assert!(!is_message_frame(&encode(&v1::ServerToClient::pong(
            v1::Pong::default()
        ))));
        let len = frames.iter().map(Bytes::len).sum();
        let mut buf = BytesMut::new();
        put_batch_head(&mut buf, len);
        assert_eq!(buf.len(), batch_head_len(len));
        for f in &frames {
            buf.put_slice(f);
        }
        let expected = encode(&v1::ServerToClient::batch(v1::MessageBatch { messages }));
        assert_eq!(buf.freeze(), expected);
    }

    #[test]
    fn forward_frame_matches_prost() {
        let payload = vec![7u8; 200_000];
        for (account, role, seq, resent_from, node, signal) in [
            ("", "", 0, "", "", 0),
            ("acme", "agent", 77_777, "", "", 0),
            ("a", "", 5, "b", "", 0),
            ("a", "", 5, "b", "f00d", 2),
            ("a", "r", 0, "", "f00d", 0),
        ] {
            let expected = encode(&v1::PeerMessage::forward(v1::Forward {
                account: account.into(),
                topic: "telemetry/drone-1".into(),
                from_alias: "c0ffee-12".into(),
                payload: Bytes::from(payload.clone()),
                from_role: role.into(),
                seq,
                resent_from: resent_from.into(),
                from_node: node.into(),
                signal,
                stream: seq << 40,
                offset: seq / 3,
                published_ms: 1_700_000_000_000 + seq,
            }));
            let from = Sender {
                alias: "c0ffee-12",
                role,
                seq,
                resent_from,
                node,
                signal,
                position: Position {
                    stream: seq << 40,
                    offset: seq / 3,
                    published_ms: 1_700_000_000_000 + seq,
                },
            };
            assert_eq!(
                forward_frame(account, "telemetry/drone-1", from, &payload),
                expected
            );
        }
    }

    #[test]
    fn history_frames_hold_message_frames_as_they_are() {
        let from = Sender {
            alias: "a",
            position: Position {
                stream: 9,
                offset: 3,
                published_ms: 5,
            },
            ..Sender::default()
        };
        let frames = [
            message_frame("t", from, b"one"),
            message_frame("t", from, b"two"),
        ];
        let messages = |frames: &[Bytes]| -> Vec<v1::Message> {
            frames
                .iter()
                .map(
                    |f| match decode::<v1::ServerToClient>(f.clone()).unwrap().kind {
                        Some(v1::server_to_client::Kind::Message(m)) => m,
                        other => panic!("{other:?}"),
                    },
                )
                .collect()
        };
        let head = v1::HistoryBatch {
            request_id: 4,
            topic: "t".into(),
            done: true,
            ..Default::default()
        };
        let expected = encode(&v1::ServerToClient::history(v1::HistoryBatch {
            messages: messages(&frames),
            ..head.clone()
        }));
        let got: v1::ServerToClient = decode(history_batch_frame(&head, frames.iter())).unwrap();
        assert_eq!(got, decode(expected).unwrap());
        let head = v1::HistoryAnswer {
            request_id: 2,
            more: true,
            ..Default::default()
        };
        let got: v1::PeerMessage = decode(history_answer_frame(&head, frames.iter())).unwrap();
        let Some(v1::peer_message::Kind::HistoryAnswer(answer)) = got.kind else {
            panic!("not an answer");
        };
        assert_eq!(answer.messages, messages(&frames));
        assert!(answer.more);
    }

    #[test]
    fn decode_round_trips_and_rejects_garbage() {
        let frame = message_frame(
            "a/b",
            Sender {
                alias: "me",
                ..Sender::default()
            },
            b"payload",
        );
        let decoded: v1::ServerToClient = decode(frame).unwrap();
        let Some(v1::server_to_client::Kind::Message(m)) = decoded.kind else {
            panic!("expected a Message, got {decoded:?}");
        };
        assert_eq!(
            (m.topic.as_str(), m.from_alias.as_str(), &m.payload[..]),
            ("a/b", "me", &b"payload"[..])
        );
        // A length prefix that runs past the end of the frame.
        assert!(decode::<v1::ClientToServer>(Bytes::from_static(&[0x22, 0x10, 0x01])).is_err());
    }
}
