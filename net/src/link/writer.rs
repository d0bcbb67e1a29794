//! The link writer: drains a link's queues into its socket in batches.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt as _, WriteHalf};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use super::LinkSink;
use super::backlog::{DataBacklog, DataRx, now_ms};
use super::closer::{Closer, Side};
use super::direct::{CloseGate, Direct};
use super::replay::Replay;
use relaymesh_proto::CLOSE_NORMAL;

use crate::queue;
use crate::wire::{OP_BINARY, OP_CLOSE, count_frames, holds_close, put_frame};

/// Most frames written to the socket in one `write`.
pub const MAX_BATCH: usize = 512;

/// What the writer needs besides the sink.
#[derive(Debug)]
pub struct WriterSetup {
    /// Control frames; preferred over data. The link is done when every sender is gone.
    pub ctrl: queue::Receiver<Bytes>,
    /// Data frames, if the link carries any, with their backlog accounting (senders must
    /// [`Backlog::reserve`](crate::link::Backlog::reserve) each frame before queueing it).
    pub data: Option<(DataRx, DataBacklog)>,
    /// The link's closer; when it fires the writer sends the last words and a close frame.
    pub closer: Closer,
    /// Time allowed for the last words and close frame to be written.
    pub linger: Duration,
    /// The link's direct-write gate, if its senders may write directly ([`LinkSink::direct`]).
    pub direct: Option<Arc<Direct>>,
    /// What becomes of control frames still queued when the link closes.
    pub on_close: OnClose,
    /// What goes out before anything else.
    pub first: First,
}

/// What a link's writer writes before anything else. Until it has, it does not park, so
/// direct writes cannot overtake it either.
#[derive(Debug, Default)]
pub enum First {
    /// Nothing in particular: the queues in their order.
    #[default]
    Nothing,
    /// These frames, at once: a server's `Register`.
    Frames(Vec<Bytes>),
    /// The first control frame the handler queues: its answer to the handshake (a session's
    /// `Ready`, sent only once `Attach` has been checked) or the last words refusing it.
    Answer,
}

/// What a closing writer does with the control frames still queued.
#[derive(Debug, Clone)]
pub enum OnClose {
    /// Sends them before the close frame (a server link's final `Load`, an `Ack`).
    SendQueued,
    /// Leaves them queued (the queue comes back in [`WriterEnd::ctrl`]) unless this token is
    /// cancelled: a client's messages wait for its next connection instead of going into one
    /// that was lost, and are sent when the client is closing.
    KeepQueuedUnless(CancellationToken),
}

/// How a writer ended.
#[derive(Debug)]
pub struct WriterEnd {
    /// The write error that ended the link, if one did.
    pub error: Option<std::io::Error>,
    /// Data messages still queued when the link closed, never sent.
    pub discarded: usize,
    /// Those messages themselves, when the queue held one message per item (not `framed`
    /// batches): what a link that keeps account of its losses looks into.
    pub unsent: Vec<Bytes>,
    /// The control queue, with what is left in it ([`OnClose`]).
    pub ctrl: queue::Receiver<Bytes>,
    /// The last data messages written, by position, when the data queue keeps a replay buffer
    /// ([`DataBacklog::replay`]). `unsent` is not in it.
    pub replay: Option<Replay>,
}

/// One item for the writer.
enum Out {
    /// Whole frames from the reader's WebSocket, written as they are.
    Raw(Bytes),
    /// A control message to frame.
    Ctrl(Bytes),
    /// A data message to frame (its backlog room is released once framed).
    Data(Bytes),
}

/// Drains the queues into the socket until the link closes, then sends queued control frames,
/// the last words (if any) and a close frame. The closer is fired either way so the reader
/// stops too.
///
/// Set up here, outside the returned future, so the future holds the pieces once, not also the
/// `sink` and `setup` they came from: it is the state every idle link's writer task carries.
pub fn run_writer<S>(sink: LinkSink<S>, setup: WriterSetup) -> impl Future<Output = WriterEnd>
where
    S: AsyncWrite,
{
    let LinkSink {
        mut write,
        replies,
        role,
        batch_bytes,
        socket: _,
    } = sink;
    let mut replies = Some(replies);
    let WriterSetup {
        mut ctrl,
        data,
        closer,
        linger,
        direct,
        on_close,
        first,
    } = setup;
    let (mut data, accounting) = match data {
        Some((rx, accounting)) => (Some(rx), Some(accounting)),
        None => (None, None),
    };
    // Only a queue of single messages keeps one: positions count messages. Boxed: few links
    // keep one, and inline it would size every link's writer.
    let mut replay = accounting
        .as_ref()
        .filter(|a| !a.framed)
        .and_then(|a| a.replay)
        .map(|limits| Box::new(Replay::new(limits)));
    debug_assert!(
        direct.is_none() || (role == Role::Server && accounting.as_ref().is_some_and(|a| a.framed)),
        "direct writes carry whole server frames: a server link with a framed data queue"
    );
    async move {
        let gate_guard = CloseGate(direct.as_deref());
        let direct = gate_guard.0;
        let mut out = BytesMut::new();
        let mut sent_close = false;
        // A labelled block, not an `async` block awaited here: that would hold a reference to
        // each of the writer's parts as well, in the state every idle link's writer carries.
        let result: std::io::Result<()> = 'run: {
            let first = match first {
                First::Nothing => Vec::new(),
                First::Frames(frames) => frames,
                First::Answer => tokio::select! {
                    biased;
                    _ = closer.closed_for(Side::Writer) => break 'run Ok(()),
                    frame = ctrl.recv() => match frame {
                        Some(frame) => vec![frame],
                        None => break 'run Ok(()),
                    },
                },
            };
            if !first.is_empty() {
                for frame in &first {
                    put_frame(&mut out, OP_BINARY, frame, role);
                }
                tokio::select! {
                    biased;
                    result = write_out(&mut write, &mut out) => if let Err(e) = result {
                        break 'run Err(e);
                    },
                    _ = closer.closed_for(Side::Writer) => break 'run Ok(()),
                }
            }
            loop {
                if let Some(direct) = direct {
                    // Control frames (a session's `Ready` first of all) are not overtaken either.
                    direct.park(|| ctrl.is_empty() && data.as_ref().is_none_or(DataRx::is_empty));
                }
                let first = tokio::select! {
                    biased;
                    _ = closer.closed_for(Side::Writer) => break 'run Ok(()),
                    reply = recv_from(&mut replies) => match reply {
                        Some(raw) => Out::Raw(raw),
                        None => {
                            replies = None;
                            continue;
                        }
                    },
                    frame = ctrl.recv() => match frame {
                        Some(frame) => Out::Ctrl(frame),
                        None => break 'run Ok(()),
                    },
                    frame = recv_from(&mut data) => match frame {
                        Some(frame) => Out::Data(frame),
                        None => {
                            data = None;
                            continue;
                        }
                    },
                };
                out.clear();
                if let Some(rest) = direct.and_then(Direct::unpark) {
                    out.extend_from_slice(&rest);
                }
                let mut next = Some(first);
                let mut framed = 0;
                let now = if replay.is_some() { now_ms() } else { 0 };
                while let Some(item) = next.take() {
                    match item {
                        Out::Raw(raw) => {
                            sent_close |= holds_close(&raw);
                            out.extend_from_slice(&raw);
                        }
                        Out::Ctrl(frame) => put_frame(&mut out, OP_BINARY, &frame, role),
                        // A direct sender's wake-up call; what it left is already in `out`.
                        Out::Data(frame) if frame.is_empty() => {}
                        Out::Data(frame) => match &accounting {
                            Some(a) if a.framed => {
                                a.backlog.release_n(frame.len(), count_frames(&frame));
                                out.extend_from_slice(&frame);
                            }
                            Some(a) => {
                                a.backlog.release(frame.len());
                                put_frame(&mut out, OP_BINARY, &frame, role);
                                if let Some(replay) = &mut replay {
                                    replay.written(frame, now, drop);
                                }
                            }
                            None => put_frame(&mut out, OP_BINARY, &frame, role),
                        },
                    }
                    framed += 1;
                    if framed < MAX_BATCH && out.len() < batch_bytes {
                        next = try_next(&mut replies, &mut ctrl, &mut data);
                    }
                }
                if let Some(DataBacklog {
                    backlog, notice, ..
                }) = &accounting
                {
                    if data.as_ref().is_none_or(|d| d.is_empty()) {
                        backlog.drained();
                    }
                    let dropped = backlog.take_unreported();
                    if dropped.total() > 0 {
                        put_frame(&mut out, OP_BINARY, &notice(dropped), role);
                        // Only this queue's own drops took positions in its stream.
                        if let Some(replay) = &mut replay {
                            replay.skip(dropped.own);
                        }
                    }
                }
                tokio::select! {
                    biased;
                    result = write_out(&mut write, &mut out) => if let Err(e) = result {
                        break 'run Err(e);
                    },
                    // A peer that stopped reading must not keep a closing link alive. What is left
                    // of the batch stays in `out`, so the goodbye starts on a frame boundary.
                    _ = closer.closed_for(Side::Writer) => break 'run Ok(()),
                }
                // A burst's buffer is not kept by a link that goes quiet.
                if out.capacity() > batch_bytes.saturating_mul(2) {
                    out = BytesMut::new();
                }
                if sent_close {
                    break 'run Ok(());
                }
            }
        };
        closer.done(Side::Writer);
        // What a sender could not finish writing goes out before anything else, even the rest of
        // an interrupted batch (there is never both: a parked writer had written everything).
        if let Some(rest) = direct.and_then(Direct::close) {
            let mut first = BytesMut::from(&rest[..]);
            first.extend_from_slice(&out);
            out = first;
        }
        if let Some(replies) = replies.as_mut() {
            replies.close();
        }
        closer.close(None);
        // Refuse further data (senders now see a closed queue, not a full one) and account for
        // what was queued but never sent.
        let mut discarded = 0;
        let mut unsent = Vec::new();
        if let Some(rx) = data.as_mut() {
            rx.close();
            while let Ok(frame) = rx.try_recv() {
                match &accounting {
                    _ if frame.is_empty() => {}
                    Some(a) if a.framed => {
                        let n = count_frames(&frame);
                        discarded += n;
                        a.backlog.release_n(frame.len(), n);
                    }
                    Some(a) => {
                        discarded += 1;
                        a.backlog.release(frame.len());
                        unsent.push(frame);
                    }
                    None => {
                        discarded += 1;
                        unsent.push(frame);
                    }
                }
            }
        }
        // `out` holds the unwritten rest of an interrupted batch, if any; it goes out first, so the
        // stream stays on a frame boundary. Then control frames already queued (a final Load, an
        // Ack, interest changes), unless they are kept for another link; queued data does not, it
        // would only delay the close. After a close frame (ours, or the reader's reply in `out`)
        // nothing more may be sent.
        if result.is_ok() {
            if !sent_close {
                let send_queued = match &on_close {
                    OnClose::SendQueued => true,
                    OnClose::KeepQueuedUnless(closing) => closing.is_cancelled(),
                };
                if send_queued {
                    while let Ok(frame) = ctrl.try_recv() {
                        put_frame(&mut out, OP_BINARY, &frame, role);
                    }
                }
                let status = match closer.last_words() {
                    Some(words) => {
                        put_frame(&mut out, OP_BINARY, &words.frame, role);
                        words.status
                    }
                    None => CLOSE_NORMAL,
                };
                put_frame(&mut out, OP_CLOSE, &status.to_be_bytes(), role);
            }
            let goodbye = async {
                write_out(&mut write, &mut out).await?;
                write.shutdown().await
            };
            // Boxed: it happens once per link, and inline it is the largest state of all, which
            // would size every idle link's writer.
            let _ = Box::pin(tokio::time::timeout(linger, goodbye)).await;
        }
        WriterEnd {
            error: result.err(),
            discarded,
            unsent,
            ctrl,
            replay: replay.map(|replay| *replay),
        }
    }
}

/// Writes all of `out`, consuming it as it goes: if the future is dropped, `out` still holds
/// exactly what was not written. Then flushes (a no-op on TCP; over TLS, what the session still
/// holds in records goes out).
async fn write_out<W: AsyncWrite>(
    write: &mut WriteHalf<W>,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = write.write(out).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes::Buf::advance(out, n);
    }
    write.flush().await
}

/// The next item of a queue the writer may have done with (`None`: waits forever).
async fn recv_from(queue: &mut Option<queue::Receiver<Bytes>>) -> Option<Bytes> {
    match queue {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next ready item: replies, then control, then data.
fn try_next(
    replies: &mut Option<queue::Receiver<Bytes>>,
    ctrl: &mut queue::Receiver<Bytes>,
    data: &mut Option<DataRx>,
) -> Option<Out> {
    if let Some(raw) = replies.as_mut().and_then(|r| r.try_recv().ok()) {
        return Some(Out::Raw(raw));
    }
    if let Ok(frame) = ctrl.try_recv() {
        return Some(Out::Ctrl(frame));
    }
    data.as_mut()?.try_recv().ok().map(Out::Data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{Inbound, Link, LinkStream, linger, next_frame, split_link};
    use futures_util::SinkExt as _;
    use futures_util::StreamExt as _;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    /// The control sender, closer, reader end and writer task of a link, and its peer.
    type Pair = (
        queue::Sender<Bytes>,
        Closer,
        LinkStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<WriterEnd>,
        WebSocketStream<tokio::io::DuplexStream>,
    );

    /// A link end running the writer, and a plain tungstenite WebSocket as the peer.
    async fn pair(role: Role) -> Pair {
        pair_over(role, 1 << 20).await
    }

    /// Like [`pair`], over a pipe that holds `buffer` bytes.
    async fn pair_over(role: Role, buffer: usize) -> Pair {
        let (ours, theirs) = tokio::io::duplex(buffer);
        let config = WebSocketConfig::default().max_message_size(Some(1 << 20));
        let Link { sink, stream } = split_link(ours, role, config);
        let (ctrl_tx, ctrl) = queue::bounded(16);
        let closer = Closer::new();
        let writer = tokio::spawn(run_writer(
            sink,
            WriterSetup {
                ctrl,
                data: None,
                closer: closer.clone(),
                linger: Duration::from_secs(5),
                direct: None,
                on_close: OnClose::SendQueued,
                first: First::Nothing,
            },
        ));
        let peer_role = if role == Role::Server {
            Role::Client
        } else {
            Role::Server
        };
        let peer = WebSocketStream::from_raw_socket(theirs, peer_role, None).await;
        (ctrl_tx, closer, stream, writer, peer)
    }

    async fn writer_frames_reach_a_tungstenite_peer(role: Role) {
        let (ctrl, closer, mut stream, writer, mut peer) = pair(role).await;
        // Every length encoding: 7-bit, 16-bit and 64-bit, at their edges.
        let sizes = [0usize, 1, 7, 125, 126, 1000, 65535, 65536, 70001];
        for &n in &sizes {
            let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            ctrl.send(Bytes::from(body)).await.unwrap();
        }
        for &n in &sizes {
            match peer.next().await {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b.len(), n);
                    assert!(b.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
                }
                other => panic!("expected a binary frame of {n} bytes, got {other:?}"),
            }
        }
        // A ping read by the link's reader is answered through the writer.
        peer.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            loop {
                match next_frame(&mut stream).await {
                    Ok(Inbound::Closed) | Err(_) => return stream,
                    Ok(_) => {}
                }
            }
        });
        match peer.next().await {
            Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"hi"),
            other => panic!("expected a pong, got {other:?}"),
        }
        // Closing sends the last words, then a close frame with their status.
        closer.close(Some(crate::link::LastWords {
            frame: Bytes::from_static(b"bye"),
            status: 4013,
        }));
        match peer.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"bye"),
            other => panic!("expected the last words, got {other:?}"),
        }
        match peer.next().await {
            Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), 4013),
            other => panic!("expected a close frame with a status, got {other:?}"),
        }
        let end = writer.await.unwrap();
        assert!(end.error.is_none());
        drop(peer);
        let _ = reader.await;
    }

    #[tokio::test]
    async fn server_frames_reach_a_tungstenite_client() {
        writer_frames_reach_a_tungstenite_peer(Role::Server).await;
    }

    #[tokio::test]
    async fn client_frames_are_masked_for_a_tungstenite_server() {
        // A tungstenite server refuses unmasked frames from a client.
        writer_frames_reach_a_tungstenite_peer(Role::Client).await;
    }

    #[tokio::test]
    async fn a_close_from_the_peer_ends_the_link_with_one_close_frame() {
        let (_ctrl, closer, mut stream, writer, mut peer) = pair(Role::Server).await;
        peer.send(Message::Close(None)).await.unwrap();
        assert!(matches!(next_frame(&mut stream).await, Ok(Inbound::Closed)));
        // As every reader does: a closed link is closed for the writer too.
        closer.close(None);
        match peer.next().await {
            Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), 1000),
            other => panic!("expected a normal close, got {other:?}"),
        }
        let end = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends once the link closes")
            .unwrap();
        assert!(end.error.is_none());
        // The reader's own close reply finds the writer gone; no second close frame follows.
        linger(&mut stream, Duration::from_millis(100)).await;
        drop(stream);
        assert!(peer.next().await.is_none());
    }

    #[tokio::test]
    async fn closing_mid_batch_finishes_the_frame_before_the_last_words() {
        // A peer that does not read: the writer is stuck inside a 200 KB frame when the link
        // closes. The goodbye must resume at that point, or the last words would be garbage.
        let (ctrl_tx, closer, _stream, writer, mut peer) = pair_over(Role::Server, 4096).await;
        ctrl_tx.send(Bytes::from(vec![9u8; 200_000])).await.unwrap();
        tokio::task::yield_now().await;
        closer.close(Some(crate::link::LastWords {
            frame: Bytes::from_static(b"bye"),
            status: 1001,
        }));
        match peer.next().await {
            Some(Ok(Message::Binary(b))) => {
                assert!(b.len() == 200_000 && b.iter().all(|&x| x == 9))
            }
            other => panic!("expected the whole frame, got {other:?}"),
        }
        match peer.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"bye"),
            other => panic!("expected the last words, got {other:?}"),
        }
        assert!(matches!(peer.next().await, Some(Ok(Message::Close(_)))));
        assert!(writer.await.unwrap().error.is_none());
    }
}
