//! The read side of a link's WebSocket (RFC 6455 section 5): [`FrameReader`] reads frames
//! straight from the socket into one buffer and hands each message on as a slice of it.
//!
//! It stands where tokio-tungstenite's `WebSocketStream` stood. That one drives tungstenite's
//! blocking-style reader through a waker proxy: every poll registers the task's waker in an
//! `AtomicWaker`, and every payload is split out of tungstenite's buffer and then copied into a
//! message. At a couple of million small frames a second those were a third of a receiving
//! process's time. Here the socket is polled with the caller's context, a payload is unmasked in
//! place and handed on as a `Bytes` slice of the read buffer (one reference-count increment),
//! and a link that goes quiet gives its read buffer back.
//!
//! The reader keeps tungstenite's `Message` and error types, so callers match on the same
//! values as before ([`crate::link::next_frame`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};

use crate::wire::{
    OP_BINARY, OP_CLOSE, OP_CONTINUE, OP_PING, OP_PONG, OP_TEXT, apply_mask, put_frame,
};

/// Most bytes the buffer grows by ahead of what has arrived: a header announcing a large frame
/// does not make a connection allocate the whole frame before the peer sends it.
const GROW_AHEAD: usize = 64 * 1024;
/// Limits beyond this are treated as this: frame arithmetic stays far from overflowing.
const MAX_LIMIT: usize = isize::MAX as usize / 2;

/// Reads WebSocket messages from `io`; the replies the protocol asks for (a pong for each ping,
/// the close reply) are written to `io` too, whole frames, before anything further is read.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    /// Bytes read and not yet handed on: the start of the next frame.
    buf: BytesMut,
    /// Our side of the connection: a server expects masked frames, a client unmasked ones.
    role: Role,
    /// Bytes asked of the socket at once.
    read_chunk: usize,
    max_frame: usize,
    max_message: usize,
    /// A fragmented message being put together: its opcode and the payload so far.
    fragments: Option<(u8, BytesMut)>,
    /// A reply frame (or its unwritten rest) waiting to be written.
    reply: Option<Bytes>,
    /// The peer closed, the connection ended or a protocol error ended reading.
    done: bool,
}

/// A frame header, parsed.
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Header bytes, mask included.
    len: usize,
    payload: usize,
}

impl<R> FrameReader<R> {
    /// A reader for our `role`'s side of an established WebSocket over `io`, with the read
    /// buffer size and message and frame size limits of `config`.
    pub fn new(io: R, role: Role, config: &WebSocketConfig) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            role,
            read_chunk: config.read_buffer_size.max(256),
            max_frame: config.max_frame_size.unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
            max_message: config.max_message_size.unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
            fragments: None,
            reply: None,
            done: false,
        }
    }

    /// The next frame's header, once enough of it has arrived; `Err(need)` with the number of
    /// buffered bytes it takes to say more.
    fn header(&self) -> Result<Result<Header, usize>, Error> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(Err(2));
        }
        let (b0, b1) = (b[0], b[1]);
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::NonZeroReservedBits.into());
        }
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrameFromClient.into()),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrameFromServer.into()),
            _ => {}
        }
        let (payload, mut len) = match b1 & 0x7f {
            126 if b.len() < 4 => return Ok(Err(4)),
            126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() < 10 => return Ok(Err(10)),
            127 => {
                let mut wide = [0u8; 8];
                wide.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(wide), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if b.len() < len + 4 {
                return Ok(Err(len + 4));
            }
            let mut key = [0u8; 4];
            key.copy_from_slice(&b[len..len + 4]);
            len += 4;
            Some(key)
        } else {
            None
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if opcode >= 0x8 {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame.into());
            }
            if payload > 125 {
                return Err(ProtocolError::ControlFrameTooBig.into());
            }
        }
        // Refused on the header, before any of the payload is buffered. A control frame between
        // fragments is not part of the message.
        let so_far = match &self.fragments {
            Some((_, f)) if opcode == OP_CONTINUE => f.len(),
            _ => 0,
        };
        let too_long = |size: usize, max_size: usize| {
            Error::Capacity(CapacityError::MessageTooLong { size, max_size })
        };
        let payload = usize::try_from(payload).map_err(|_| too_long(usize::MAX, self.max_frame))?;
        if payload > self.max_frame {
            return Err(too_long(payload, self.max_frame));
        }
        if so_far.saturating_add(payload) > self.max_message {
            return Err(too_long(so_far.saturating_add(payload), self.max_message));
        }
        Ok(Ok(Header {
            fin,
            opcode,
            mask,
            len,
            payload,
        }))
    }

    /// The next message from the buffered bytes; `Err(need)` when it takes `need` buffered
    /// bytes (or more) to finish the next frame.
    fn parse(&mut self) -> Result<Result<Message, usize>, Error> {
        loop {
            let header = match self.header()? {
                Ok(header) => header,
                Err(need) => return Ok(Err(need)),
            };
            let total = header.len + header.payload;
            if self.buf.len() < total {
                return Ok(Err(total));
            }
            let mut payload = self.buf.split_to(total);
            payload.advance(header.len);
            if let Some(key) = header.mask {
                apply_mask(&mut payload, key);
            }
            match header.opcode {
                OP_CONTINUE => {
                    let Some((_, so_far)) = self.fragments.as_mut() else {
                        return Err(ProtocolError::UnexpectedContinueFrame.into());
                    };
                    so_far.extend_from_slice(&payload);
                    if header.fin
                        && let Some((opcode, whole)) = self.fragments.take()
                    {
                        return data(opcode, whole.freeze()).map(Ok);
                    }
                }
                OP_TEXT | OP_BINARY if self.fragments.is_some() => {
                    let kind = if header.opcode == OP_TEXT {
                        Data::Text
                    } else {
                        Data::Binary
                    };
                    return Err(ProtocolError::ExpectedFragment(kind).into());
                }
                OP_TEXT | OP_BINARY if header.fin => {
                    return data(header.opcode, payload.freeze()).map(Ok);
                }
                OP_TEXT | OP_BINARY => self.fragments = Some((header.opcode, payload)),
                OP_PING => {
                    let payload = payload.freeze();
                    self.queue_reply(OP_PONG, &payload);
                    return Ok(Ok(Message::Ping(payload)));
                }
                OP_PONG => return Ok(Ok(Message::Pong(payload.freeze()))),
                OP_CLOSE => {
                    let frame = close_frame(payload.freeze())?;
                    // Echo the peer's code (RFC 6455 section 5.5.1), or say it broke the rules.
                    let code = frame.as_ref().map(|f| {
                        if f.code.is_allowed() {
                            f.code
                        } else {
                            CloseCode::Protocol
                        }
                    });
                    let reply = code.map(|c| u16::from(c).to_be_bytes());
                    self.queue_reply(OP_CLOSE, reply.as_ref().map_or(&[][..], |r| &r[..]));
                    self.done = true;
                    return Ok(Ok(Message::Close(frame)));
                }
                op if op < 0x8 => return Err(ProtocolError::UnknownDataFrameType(op).into()),
                op => return Err(ProtocolError::UnknownControlFrameType(op).into()),
            }
        }
    }

    fn queue_reply(&mut self, opcode: u8, payload: &[u8]) {
        let mut frame = BytesMut::new();
        put_frame(&mut frame, opcode, payload, self.role);
        self.reply = Some(frame.freeze());
    }
}

/// A whole data message.
fn data(opcode: u8, payload: Bytes) -> Result<Message, Error> {
    if opcode == OP_BINARY {
        return Ok(Message::Binary(payload));
    }
    Utf8Bytes::try_from(payload)
        .map(Message::Text)
        .map_err(|e| Error::Utf8(e.to_string()))
}

/// A close frame's code and reason.
fn close_frame(payload: Bytes) -> Result<Option<CloseFrame>, Error> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::InvalidCloseSequence.into()),
        _ => {
            let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
            let reason =
                Utf8Bytes::try_from(payload.slice(2..)).map_err(|e| Error::Utf8(e.to_string()))?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

impl<R: AsyncRead + AsyncWrite + Unpin> Stream for FrameReader<R> {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(reply) = this.reply.as_mut() {
                let mut failed = None;
                while !reply.is_empty() {
                    match Pin::new(&mut this.io).poll_write(cx, reply) {
                        Poll::Ready(Ok(n)) if n > 0 => reply.advance(n),
                        // The writer is gone (the link is closing): nobody to answer, and
                        // reading goes on until the peer's close or the end of the connection.
                        Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                        // Anything else ends reading: a peer that pings without reading the
                        // pongs (a link's reply queue is bounded) loses the link.
                        Poll::Ready(result) => {
                            failed = Some(result.err().unwrap_or_else(|| {
                                std::io::Error::from(std::io::ErrorKind::WriteZero)
                            }));
                            break;
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                this.reply = None;
                if let Some(e) = failed {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            let need = match this.parse() {
                Ok(Ok(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(Err(need)) => need,
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            // Room for what is missing, up to GROW_AHEAD; a large frame grows the buffer as it
            // arrives.
            let want = need
                .saturating_sub(this.buf.len())
                .min(GROW_AHEAD)
                .max(this.read_chunk / 4);
            if this.buf.capacity() - this.buf.len() < want {
                this.buf.reserve(want.max(this.read_chunk));
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(Ok(0)) => {
                    // The connection ended without a close frame (mid-frame or not): over.
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
                Poll::Pending => {
                    // A link that goes quiet keeps no read buffer: idle connections are many.
                    if this.buf.is_empty() {
                        this.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::WebSocketStream;

    fn config(max: usize) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(256)
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }

    /// Our reader on one end of a pipe and tungstenite's own WebSocket, the peer, on the other.
    async fn pair(
        role: Role,
        max: usize,
    ) -> (
        FrameReader<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let peer_role = match role {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        };
        let peer = WebSocketStream::from_raw_socket(theirs, peer_role, Some(config(max))).await;
        (FrameReader::new(ours, role, &config(max)), peer)
    }

    #[tokio::test]
    async fn reads_what_tungstenite_writes_on_either_side() {
        for role in [Role::Server, Role::Client] {
            let (mut reader, mut peer) = pair(role, 1 << 16).await;
            // Sizes around the 7-bit, 16-bit and 64-bit length forms, and past the read chunk.
            let sizes = [0usize, 1, 7, 8, 125, 126, 1000, 65_535, 65_536];
            for size in sizes {
                let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
                peer.feed(Message::binary(payload))
                    .await
                    .expect("peer writes");
            }
            peer.send(Message::text("hi")).await.expect("peer writes");
            for size in sizes {
                match reader.next().await {
                    Some(Ok(Message::Binary(got))) => {
                        let want: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
                        assert_eq!(got, want, "{role:?}: payload of {size} bytes");
                    }
                    other => panic!("{role:?}: expected {size} bytes, got {other:?}"),
                }
            }
            assert_eq!(reader.next().await.unwrap().unwrap(), Message::text("hi"));
        }
    }

    #[tokio::test]
    async fn pings_are_answered_and_a_close_is_echoed_then_reading_ends() {
        let (mut reader, mut peer) = pair(Role::Server, 1024).await;
        peer.send(Message::Ping(Bytes::from_static(b"are you there")))
            .await
            .unwrap();
        peer.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::Ping(Bytes::from_static(b"are you there"))
        );
        match reader.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Away);
                assert_eq!(frame.reason.as_str(), "bye");
            }
            other => panic!("expected the close, got {other:?}"),
        }
        assert!(reader.next().await.is_none(), "nothing after a close");
        // The peer sees the pong, then the close reply with its own code.
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"are you there"))
        );
        match peer.next().await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected the close reply, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn fragments_are_joined_within_the_message_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(ours, Role::Client, &config(10));
        // "abc" + "def" as a fragmented binary message, a ping between the fragments.
        theirs
            .write_all(b"\x02\x03abc\x89\x00\x80\x03def")
            .await
            .unwrap();
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::Ping(Bytes::new())
        );
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::binary(&b"abcdef"[..])
        );
        // A control frame between fragments does not count toward the message's size.
        theirs
            .write_all(b"\x02\x06abcdef\x89\x05hello\x80\x04ghij")
            .await
            .unwrap();
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::Ping(Bytes::from_static(b"hello"))
        );
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::binary(&b"abcdefghij"[..])
        );
        // Fragments that add up past the limit are refused on the header of the one that
        // crosses it.
        theirs.write_all(b"\x02\x06abcdef\x80\x05").await.unwrap();
        match reader.next().await {
            Some(Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                assert_eq!((size, max_size), (11, 10));
            }
            other => panic!("expected the limit, got {other:?}"),
        }
        assert!(reader.next().await.is_none(), "reading ends on an error");
        // The pongs went back, masked as a client's frames must be.
        let mut pong = [0u8; 6];
        theirs.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong[..2], b"\x8a\x80", "a client's pong is masked");
        let mut pong = [0u8; 11];
        theirs.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong[..2], b"\x8a\x85");
    }

    #[tokio::test]
    async fn protocol_violations_end_reading_with_their_error() {
        let cases: [(&[u8], Role, &str); 6] = [
            (b"\x82\x01x", Role::Server, "unmasked frame from a client"),
            (
                b"\x82\x81\0\0\0\0x",
                Role::Client,
                "masked frame from a server",
            ),
            (b"\xc2\x01x", Role::Client, "reserved bits"),
            (b"\x80\x01x", Role::Client, "continuation without a start"),
            (b"\x09\x00", Role::Client, "fragmented ping"),
            (b"\x83\x00", Role::Client, "reserved data opcode"),
        ];
        for (bytes, role, what) in cases {
            let (ours, mut theirs) = tokio::io::duplex(1024);
            let mut reader = FrameReader::new(ours, role, &config(1024));
            theirs.write_all(bytes).await.unwrap();
            match reader.next().await {
                Some(Err(Error::Protocol(_))) => {}
                other => panic!("{what}: expected a protocol error, got {other:?}"),
            }
            assert!(reader.next().await.is_none(), "{what}: reading ends");
        }
        // A frame above the limit is refused before its payload arrives.
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(ours, Role::Client, &config(1024));
        theirs
            .write_all(b"\x82\x7f\0\0\0\0\xff\0\0\0")
            .await
            .unwrap();
        match reader.next().await {
            Some(Err(Error::Capacity(CapacityError::MessageTooLong { max_size, .. }))) => {
                assert_eq!(max_size, 1024);
            }
            other => panic!("expected the limit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_arriving_a_byte_at_a_time_read_the_same() {
        // Every header form, masked (from a client) and not, with a ping and a fragmented
        // message among them; a one-byte pipe splits every header and payload across reads.
        let payloads: Vec<Vec<u8>> = [0usize, 5, 125, 126, 300, 70_000]
            .iter()
            .map(|&n| (0..n).map(|i| (i % 253) as u8).collect())
            .collect();
        for (role, sender) in [(Role::Server, Role::Client), (Role::Client, Role::Server)] {
            let mut wire = BytesMut::new();
            for p in &payloads {
                put_frame(&mut wire, OP_BINARY, p, sender);
            }
            put_frame(&mut wire, OP_PING, b"p", sender);
            // "ab" + "cd": a start frame without FIN, then a final continuation.
            let mut start = BytesMut::new();
            put_frame(&mut start, OP_BINARY, b"ab", sender);
            start[0] &= 0x7f;
            wire.extend_from_slice(&start);
            put_frame(&mut wire, OP_CONTINUE, b"cd", sender);
            let (ours, mut theirs) = tokio::io::duplex(1 << 20);
            theirs.write_all(&wire).await.unwrap();
            let mut reader = FrameReader::new(Trickle(ours), role, &config(1 << 17));
            for p in &payloads {
                match reader.next().await {
                    Some(Ok(Message::Binary(got))) => assert_eq!(&got[..], &p[..], "{role:?}"),
                    other => panic!("{role:?}: expected {} bytes, got {other:?}", p.len()),
                }
            }
            let ping = reader.next().await.unwrap().unwrap();
            assert_eq!(ping, Message::Ping(Bytes::from_static(b"p")));
            let joined = reader.next().await.unwrap().unwrap();
            assert_eq!(joined, Message::binary(&b"abcd"[..]), "{role:?}");
        }
    }

    /// Reads until the stream ends; after an error it must end at once.
    async fn read_to_end<R: AsyncRead + AsyncWrite + Unpin>(mut reader: FrameReader<R>) {
        let mut steps = 0;
        while let Some(item) = reader.next().await {
            steps += 1;
            assert!(steps < 10_000, "reading must end");
            if item.is_err() {
                assert!(reader.next().await.is_none(), "nothing after an error");
                return;
            }
        }
    }

    #[tokio::test]
    async fn arbitrary_input_never_panics_and_reading_always_ends() {
        use rand::{RngExt as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let opcodes = [
            OP_CONTINUE,
            OP_TEXT,
            OP_BINARY,
            OP_CLOSE,
            OP_PING,
            OP_PONG,
            0x3,
            0xB,
        ];
        for case in 0..1500 {
            let role = if case % 2 == 0 {
                Role::Server
            } else {
                Role::Client
            };
            let peer = if case % 2 == 0 {
                Role::Client
            } else {
                Role::Server
            };
            let mut wire = BytesMut::new();
            if case % 5 == 0 {
                // Noise.
                for _ in 0..rng.random_range(0..200) {
                    wire.extend_from_slice(&[rng.random::<u8>()]);
                }
            } else {
                // Frames of every kind and size (a few over the limit, a few masked the wrong
                // way, some without FIN), then a byte or two changed.
                for _ in 0..rng.random_range(1..6) {
                    let opcode = opcodes[rng.random_range(0..opcodes.len())];
                    let len = match rng.random_range(0..16) {
                        0 => 70_000,
                        n => [0, 1, 2, 7, 125, 126, 127, 300, 2000][n % 9],
                    };
                    let payload: Vec<u8> = (0..len).map(|_| rng.random::<u8>()).collect();
                    let sender = if rng.random_range(0..10) == 0 {
                        role
                    } else {
                        peer
                    };
                    let start = wire.len();
                    put_frame(&mut wire, opcode, &payload, sender);
                    if rng.random_range(0..3) == 0 {
                        wire[start] &= 0x7f;
                    }
                }
                for _ in 0..rng.random_range(0..3) {
                    let i = rng.random_range(0..wire.len());
                    wire[i] = rng.random::<u8>();
                }
            }
            let (ours, mut theirs) = tokio::io::duplex(1 << 20);
            theirs.write_all(&wire).await.unwrap();
            // The end of the input, so that every case ends.
            theirs.shutdown().await.unwrap();
            if case % 3 == 0 {
                read_to_end(FrameReader::new(Trickle(ours), role, &config(1 << 16))).await;
            } else {
                read_to_end(FrameReader::new(ours, role, &config(1 << 16))).await;
            }
        }
    }

    /// A stream that hands over one byte per read.
    struct Trickle(tokio::io::DuplexStream);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let mut one = [0u8; 1];
            let mut small = tokio::io::ReadBuf::new(&mut one);
            let polled = Pin::new(&mut self.0).poll_read(cx, &mut small);
            if let Poll::Ready(Ok(())) = polled {
                buf.put_slice(small.filled());
            }
            polled
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_large_frame_is_buffered_as_it_arrives_not_when_announced() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(ours, Role::Client, &config(1 << 20));
        // A header announcing 1 000 000 bytes, then only a few of them.
        theirs
            .write_all(b"\x82\x7f\0\0\0\0\0\x0f\x42\x40abc")
            .await
            .unwrap();
        assert!(futures_util::FutureExt::now_or_never(reader.next()).is_none());
        assert!(
            reader.buf.capacity() <= GROW_AHEAD + 1024,
            "{} bytes reserved for 13 received",
            reader.buf.capacity()
        );
        theirs.write_all(&vec![7u8; 1_000_000 - 3]).await.unwrap();
        match reader.next().await {
            Some(Ok(Message::Binary(got))) => assert_eq!(got.len(), 1_000_000),
            other => panic!("expected the frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_peer_that_pings_without_reading_the_pongs_loses_the_link() {
        // A link whose writer is stuck: its replies pile up in the link's bounded queue.
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let crate::link::Link { sink, mut stream } =
            crate::link::split_link(ours, Role::Server, config(1024));
        let mut peer = WebSocketStream::from_raw_socket(theirs, Role::Client, None).await;
        for _ in 0..100 {
            peer.feed(Message::Ping(Bytes::new())).await.unwrap();
        }
        peer.flush().await.unwrap();
        // The peer then goes: a reader that ignored the full queue would just see the end.
        drop(peer);
        let mut pings = 0;
        let ended = loop {
            match stream.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => break other,
            }
        };
        assert!(matches!(ended, Some(Err(Error::Io(_)))), "{ended:?}");
        assert!(stream.next().await.is_none(), "and then nothing");
        assert!(pings < 100, "the link ended before the peer's last ping");
        drop(sink);
    }

    #[tokio::test]
    async fn a_connection_that_ends_without_a_close_ends_the_stream() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(ours, Role::Client, &config(1024));
        // Half a frame, then the peer goes.
        theirs.write_all(b"\x82\x05ab").await.unwrap();
        drop(theirs);
        assert!(reader.next().await.is_none());
    }

    #[test]
    fn masking_twice_gives_the_payload_back() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let original: Vec<u8> = (0..=40).collect();
        let mut body = original.clone();
        apply_mask(&mut body, key);
        for (i, (masked, plain)) in body.iter().zip(&original).enumerate() {
            assert_eq!(*masked, plain ^ key[i % 4]);
        }
        apply_mask(&mut body, key);
        assert_eq!(body, original);
    }
}
