//! Reading a link: the next frame, the first message, bursts, and lingering for the peer's
//! close.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use relaymesh_proto::{ErrorCode, v1};
use tokio_tungstenite::tungstenite::{self, Message};

/// One step of reading a link.
#[derive(Debug)]
pub enum Inbound {
    /// A binary frame: one protobuf envelope.
    Frame(Bytes),
    /// A WebSocket ping or pong: traffic, but nothing to handle.
    Control,
    /// The peer closed the link or the connection ended.
    Closed,
}

/// Why reading a link failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A message above the configured size limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the refused message.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A text frame; relaymesh speaks binary protobuf only.
    #[error("text frames are not supported; send binary protobuf frames")]
    Text,
    /// A WebSocket protocol violation.
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(String),
}

impl ReadError {
    /// The protocol error to send before closing the link.
    pub fn to_error(&self) -> v1::Error {
        let code = match self {
            Self::TooLarge { .. } => ErrorCode::LimitExceeded,
            Self::Text | Self::Protocol(_) => ErrorCode::BadFrame,
            Self::Io(_) => ErrorCode::Internal,
        };
        v1::Error::new(code, self.to_string())
    }
}

/// Reads the first message of a link, which must arrive within `timeout`.
pub async fn first_message<M, St>(
    stream: &mut St,
    timeout: Duration,
) -> Result<Option<M>, v1::Error>
where
    M: prost::Message + Default,
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let read = async {
        loop {
            match next_frame(stream).await {
                Ok(Inbound::Frame(frame)) => return relaymesh_proto::decode_frame(frame).map(Some),
                Ok(Inbound::Control) => continue,
                Ok(Inbound::Closed) => return Ok(None),
                Err(e) => return Err(e.to_error()),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(v1::Error::new(
                ErrorCode::HeartbeatTimeout,
                format!("no first message within {} ms", timeout.as_millis()),
            ))
        })
}

/// Reads the next step from a link.
pub async fn next_frame<St>(stream: &mut St) -> Result<Inbound, ReadError>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    use tungstenite::Error as E;
    use tungstenite::error::CapacityError;
    match stream.next().await {
        None => Ok(Inbound::Closed),
        Some(Ok(Message::Binary(frame))) => Ok(Inbound::Frame(frame)),
        Some(Ok(Message::Text(_))) => Err(ReadError::Text),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Ok(Inbound::Control),
        Some(Ok(Message::Close(_))) => Ok(Inbound::Closed),
        // A peer that vanished (killed, reset, dropped without a close frame) has simply gone;
        // that is not bad input and there is nobody left to tell.
        Some(Err(
            E::ConnectionClosed
            | E::AlreadyClosed
            | E::Io(_)
            | E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
        )) => Ok(Inbound::Closed),
        Some(Err(E::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
            Err(ReadError::TooLarge {
                size,
                max: max_size,
            })
        }
        Some(Err(E::Protocol(e))) => Err(ReadError::Protocol(e.to_string())),
        Some(Err(E::Utf8(_))) => Err(ReadError::Text),
        Some(Err(e)) => Err(ReadError::Io(e.to_string())),
    }
}

/// The next step of a link if it has already arrived, without waiting: lets a reader handle a
/// burst of frames before handing on what they produced.
pub fn ready_frame<St>(stream: &mut St) -> Option<Result<Inbound, ReadError>>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    use futures_util::FutureExt as _;
    next_frame(stream).now_or_never()
}

/// The frames of one burst: the one that woke the reader, then every one that has already
/// arrived behind it, up to a limit. A reader handles them all before handing on what they
/// produced (one batch per subscriber instead of one per frame).
#[derive(Debug)]
pub struct Burst {
    pending: Option<Bytes>,
    handled: usize,
    max: usize,
    closed: bool,
}

impl Burst {
    /// A burst starting with `first`, of at most `max` frames.
    pub fn new(first: Bytes, max: usize) -> Self {
        Self {
            pending: Some(first),
            handled: 0,
            max,
            closed: false,
        }
    }

    /// A burst of the frames that have already arrived (at most `max`), the one that started
    /// it handled already (a handshake).
    pub fn behind(max: usize) -> Self {
        Self {
            pending: None,
            handled: 0,
            max,
            closed: false,
        }
    }

    /// The next frame of the burst; `None` once nothing more has arrived, a control frame
    /// came, the limit is reached or the link closed ([`Burst::closed`]).
    pub fn next_frame<St>(&mut self, stream: &mut St) -> Result<Option<Bytes>, v1::Error>
    where
        St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let frame = match self.pending.take() {
            Some(frame) => Some(frame),
            None if self.closed || self.handled >= self.max => None,
            None => match ready_frame(stream) {
                None => None,
                Some(step) => match step.map_err(|e| e.to_error())? {
                    Inbound::Frame(frame) => Some(frame),
                    Inbound::Control => None,
                    Inbound::Closed => {
                        self.closed = true;
                        None
                    }
                },
            },
        };
        if frame.is_some() {
            self.handled += 1;
        } else {
            // A burst that ended stays ended.
            self.handled = self.max;
        }
        Ok(frame)
    }

    /// Whether the link closed during the burst.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// After the writer has sent a close frame, keeps reading (and discarding) for up to `linger`
/// until the peer closes too. Closing a socket with unread input makes the kernel send a reset,
/// which can destroy the error frame the peer has not read yet; waiting for the peer's close
/// lets the error arrive.
pub async fn linger<St>(stream: &mut St, linger: Duration)
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let _ = tokio::time::timeout(linger, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}
