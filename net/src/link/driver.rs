//! The link driver: the one lifecycle every link runs, from starting its writer to its last
//! words.
//!
//! [`serve`] starts the writer, reads the first message within the handshake timeout, then reads
//! the link until it ends: process shutdown, the link's closer, silence past the heartbeat
//! timeout (noticed by the link's own timer, or by its owner's sweep: [`Watch`]), a read error,
//! the peer's close, or the handler saying so. Frames are read in bursts
//! (every frame that has already arrived, up to a limit) and handed to the [`Handler`] one
//! message at a time, decoded; after a burst the handler hands on what the burst produced
//! (`burst_end`). When the link ends the handler undoes what it set up (`closing`), the writer
//! sends the last words (an `Error` saying why, when it ended with one) and a close frame, the
//! reader lingers for the peer's close so those words are not cut off by a reset, and the
//! writer is joined.
//!
//! The order-sensitive parts live here once: frames that must go first (a session's `Ready`, a
//! server's `Register`) are the writer's first batch ([`WriterSetup::first`]), so nothing,
//! direct writes included, overtakes them; the last words go before the close frame; lingering
//! comes after both.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use relaymesh_proto::{ErrorCode, decode_frame, error, v1};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::closer::{Side, Why};
use super::{
    Burst, Closer, Inbound, LastWords, Link, WriterEnd, WriterSetup, linger, next_frame, run_writer,
};
use crate::heartbeat::{Beat, Watchdog};
use crate::sync::PolledOnWake;

/// Messages a link handles per burst unless it has a reason to pick another number: enough to
/// batch a burst of publishes, few enough that a busy link still notices closes and silence.
pub const MAX_BURST: usize = 256;

/// Whether a link goes on after what a handler just did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// End the link cleanly (no last words).
    End,
}

/// A link's heartbeat settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Silence after which the link is dead.
    pub timeout: Duration,
    /// How often this side sends its own heartbeat ([`Handler::beat`]).
    pub interval: Duration,
}

/// What one link does with what it reads; [`serve`] does the rest.
pub trait Handler: Send {
    /// The envelope every message read from this link decodes into.
    type In: prost::Message + Default + Send;

    /// Called once the writer runs, before the first message is read: a link that is refused
    /// whatever it says ends here.
    fn open(&mut self) -> Result<Flow, v1::Error> {
        Ok(Flow::Continue)
    }

    /// Handles the first message (the handshake), which must arrive within
    /// [`Options::handshake`]. Not called for links whose handshake is already done
    /// (`handshake: None`).
    fn first(&mut self, msg: Self::In) -> impl Future<Output = Result<Flow, v1::Error>> + Send;

    /// Handles one message after the first. The messages of a burst come one after another,
    /// then [`Handler::burst_end`].
    fn message(&mut self, msg: Self::In) -> impl Future<Output = Result<Flow, v1::Error>> + Send;

    /// A burst is over (also when one of its messages failed or ended the link): hand on what
    /// its messages produced. The handshake's message and what arrived right behind it are a
    /// burst too.
    fn burst_end(&mut self) -> impl Future<Output = Result<Flow, v1::Error>> + Send {
        std::future::ready(Ok(Flow::Continue))
    }

    /// The heartbeat settings, asked once the handshake is done (it may have set them).
    fn heartbeat(&self) -> Heartbeat;

    /// The error a link ends with when nothing arrived within the heartbeat timeout
    /// ([`silent_error`] unless the handler says more).
    fn silent(&self) -> v1::Error {
        silent_error()
    }

    /// Time to send this side's heartbeat (a `Ping`, a `Load`).
    fn beat(&mut self) {}

    /// Something else this link waits for besides its frames (a timer, a notification);
    /// nothing by default. Dropped and asked again whenever something else happens first, so
    /// it must be cancel-safe.
    fn wake(&mut self) -> impl Future<Output = Result<Flow, v1::Error>> + Send {
        std::future::pending()
    }

    /// The process is shutting down: the error to end the link with, or `Ok` to end it
    /// without one (after, say, a last report).
    fn stopping(&mut self) -> Result<(), v1::Error>;

    /// The link is ending, before its last words are sent: undo what the link set up.
    fn closing(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// The frame telling the other side why the link ends; `None` to close without one.
    fn last_words(&self, error: v1::Error) -> Option<Bytes>;
}

/// Who notices that a link's peer fell silent, and that the process is shutting down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Watch {
    /// The link itself: a timer of its own (a [`Watchdog`] ticking at least four times per
    /// timeout, which also says when to send this side's heartbeat, [`Handler::beat`]), and
    /// a wait on [`Options::shutdown`].
    #[default]
    Own,
    /// Its owner, for links that come by the thousand (a comm server's clients): one sweep
    /// over all of them looks at each one's [`Closer::silent_for`] and ends the silent ones
    /// with [`Closer::expire`], and at shutdown it ends each with [`Closer::stop`]. The link
    /// keeps no timer, waits on nothing but its closer, its socket and its handler, and is not
    /// woken while idle; [`Handler::beat`] is never called (a handler that needs a timer arms
    /// one in [`Handler::wake`] while it needs it). A burst that arrives after more than the
    /// timeout of silence is still refused as stale. The owner must stop a link that starts
    /// after its shutdown sweep (say, from [`Handler::open`]).
    Owner,
}

/// The error a link ends with when nothing arrived from its peer within the heartbeat timeout.
pub fn silent_error() -> v1::Error {
    error(
        ErrorCode::HeartbeatTimeout,
        "nothing received within the heartbeat timeout",
    )
}

/// How [`serve`] runs a link.
#[derive(Debug)]
pub struct Options {
    /// The writer's queues and settings; its closer is the link's, and its `first` frames
    /// (a session's `Ready`, a server's `Register`) go out ahead of every queue and every
    /// direct write.
    pub writer: WriterSetup,
    /// Time the first message has to arrive; `None` when the handshake was done before
    /// [`serve`] (the handler's `first` is then not called).
    pub handshake: Option<Duration>,
    /// Ends the link ([`Handler::stopping`]) when cancelled: the process's shutdown (heard by
    /// every link during its handshake; after it, by [`Watch::Own`] links, while the others
    /// hear it from their owner).
    pub shutdown: CancellationToken,
    /// Most messages handled per burst.
    pub max_burst: usize,
    /// Who notices a silent peer and the process's shutdown.
    pub watch: Watch,
}

/// How a link served by [`serve`] ended.
#[derive(Debug)]
pub struct Served<H> {
    /// `Err` when it ended with an error (sent as the last words when the handler has them).
    pub outcome: Result<(), v1::Error>,
    /// The writer's end; `None` if the writer task failed.
    pub writer: Option<WriterEnd>,
    /// The handler, given back.
    pub handler: H,
}

/// Runs a link from start to end with `handler`; see the module documentation.
///
/// The writer starts at once, when this is called; the returned future reads. (Taking the
/// link apart here, outside the future, keeps its write half and the writer's setup out of the
/// future every idle link's task carries.)
pub fn serve<S, H>(
    link: Link<S>,
    options: Options,
    mut handler: H,
) -> impl Future<Output = Served<H>> + Send
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Handler,
{
    let Link { sink, mut stream } = link;
    let Options {
        writer,
        handshake,
        shutdown,
        max_burst,
        watch,
    } = options;
    let closer = writer.closer.clone();
    let linger_for = writer.linger;
    let writer = tokio::spawn(run_writer(sink, writer));
    async move {
        let outcome = read(
            &mut stream,
            &closer,
            &shutdown,
            handshake,
            max_burst,
            watch,
            &mut handler,
        )
        .await;
        closer.done(Side::Reader);
        // The last words first: whatever else closes the link meanwhile (a publisher finding
        // it too slow) does not get to say why instead.
        closer.close(outcome.as_ref().err().and_then(|e| {
            let frame = handler.last_words(e.clone())?;
            Some(LastWords::framed(e, frame))
        }));
        // The handshake, the closing and the lingering happen once per link: their futures
        // are boxed so they do not add to the size every idle link's task carries.
        Box::pin(handler.closing()).await;
        // A peer silent past the heartbeat timeout will not answer the close either.
        let silent = matches!(&outcome, Err(e) if e.error_code() == ErrorCode::HeartbeatTimeout);
        if !silent {
            Box::pin(linger(&mut stream, linger_for)).await;
        }
        Served {
            outcome,
            writer: writer.await.ok(),
            handler,
        }
    }
}

/// The handshake: its message within `timeout`, then what arrived right behind it, as a
/// burst.
async fn handshake_burst<St, H>(
    stream: &mut St,
    closer: &Closer,
    shutdown: &CancellationToken,
    timeout: Duration,
    max_burst: usize,
    handler: &mut H,
) -> Result<Flow, v1::Error>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin + Send,
    H: Handler,
{
    let first: Option<H::In> = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return handler.stopping().map(|()| Flow::End),
        _ = closer.closed() => return Ok(Flow::End),
        first = super::first_message(stream, timeout) => first?,
    };
    let Some(first) = first else {
        return Ok(Flow::End);
    };
    if handler.first(first).await? == Flow::End {
        return Ok(Flow::End);
    }
    // The handshake's message starts a burst like any other: what arrived right behind it
    // (a request sent with the hello) is handled with it, and then the burst ends.
    burst_and_end(stream, handler, None, max_burst).await
}

/// A burst ([`burst`]), then the handler's [`Handler::burst_end`] (also when the burst
/// failed); whether the link goes on after both.
async fn burst_and_end<St, H>(
    stream: &mut St,
    handler: &mut H,
    first: Option<Bytes>,
    max: usize,
) -> Result<Flow, v1::Error>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    H: Handler,
{
    let handled = burst(stream, handler, first, max).await;
    let after = handler.burst_end().await;
    Ok(match (handled?, after?) {
        (Flow::Continue, Flow::Continue) => Flow::Continue,
        _ => Flow::End,
    })
}

/// The reading part of [`serve`]: the handler's [`Handler::open`], the handshake, then frames
/// until the link ends. One function, not one for the handshake awaited by one for the loop:
/// each level would add its own copy of the arguments to the state every idle link's task
/// holds.
async fn read<St, H>(
    stream: &mut St,
    closer: &Closer,
    shutdown: &CancellationToken,
    handshake: Option<Duration>,
    max_burst: usize,
    watch: Watch,
    handler: &mut H,
) -> Result<(), v1::Error>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin + Send,
    H: Handler,
{
    // Not the peer's silence until the handshake is done (it has a timeout of its own).
    closer.busy();
    if handler.open()? == Flow::End {
        return Ok(());
    }
    if let Some(timeout) = handshake {
        // Boxed: it happens once per link, and inline its state would share the layout of
        // the loop below, which every idle link's task holds.
        let shake = handshake_burst(stream, closer, shutdown, timeout, max_burst, handler);
        if Box::pin(shake).await? == Flow::End {
            return Ok(());
        }
    }
    // What a link that watches itself needs, boxed: one its owner watches has neither, and
    // inline they would size every such link's task anyway. (In a block: a local in scope
    // across the loop's waits takes room in the task.)
    let (timeout, mut own) = {
        let Heartbeat { timeout, interval } = handler.heartbeat();
        let own = (watch == Watch::Own).then(|| {
            Box::new(OwnWatch {
                watchdog: Watchdog::new(timeout, interval),
                // Pinned once, and polled only when it woke the task: polling a waiting
                // cancellation future takes its lock, and the loop turns once per frame.
                stopping: PolledOnWake::new(Box::pin(shutdown.cancelled())),
            })
        });
        (timeout, own)
    };
    closer.heard(timeout);
    loop {
        // The arms only say what happened; a frame is handled after the wait, so nothing
        // of the wait's state lives on while a burst is handled (each would add its size
        // to every idle link's task).
        let step = tokio::select! {
            biased;
            () = closer.closed_for(Side::Reader) => return match closer.why() {
                Why::Stopped => handler.stopping(),
                Why::Expired => Err(handler.silent()),
                Why::Closed => Ok(()),
            },
            beat = own_watch(&mut own) => match beat {
                None => return handler.stopping(),
                Some(Beat::Expired) => return Err(handler.silent()),
                Some(Beat::Send) => {
                    handler.beat();
                    continue;
                }
                Some(Beat::Quiet) => continue,
            },
            flow = handler.wake() => match flow? {
                Flow::Continue => continue,
                Flow::End => return Ok(()),
            },
            step = next_frame(stream) => step.map_err(|e| e.to_error())?,
        };
        let frame = match step {
            Inbound::Closed => return Ok(()),
            Inbound::Control => None,
            Inbound::Frame(frame) => Some(frame),
        };
        let fresh = match own.as_mut() {
            Some(own) => own.watchdog.heard(),
            None => closer.heard(timeout),
        };
        if !fresh {
            return Err(handler.silent());
        }
        let Some(frame) = frame else { continue };
        if own.is_none() {
            // What the handler takes to handle the burst is not the peer's silence (a timer of
            // its own is not polled meanwhile, and is told afterwards).
            closer.busy();
        }
        // Boxed: inline, the burst's state (the handler's futures) would size every idle
        // link's task; a box per burst is small beside its reads.
        let flow = Box::pin(burst_and_end(stream, handler, Some(frame), max_burst)).await;
        match own.as_mut() {
            Some(own) => own.watchdog.handled(),
            None => {
                closer.heard(Duration::MAX);
            }
        }
        if flow? == Flow::End {
            return Ok(());
        }
    }
}

/// What a link that watches itself ([`Watch::Own`]) waits for besides its closer.
struct OwnWatch<'a> {
    watchdog: Watchdog,
    stopping: PolledOnWake<Pin<Box<WaitForCancellationFuture<'a>>>>,
}

/// The process's shutdown (`None`) or the watchdog's next tick; never, for a link its owner
/// watches (the owner stops it and ends it when silent). A poll, not an `async fn`: it then
/// takes no room in the wait every idle link's task holds.
fn own_watch<'a>(
    own: &'a mut Option<Box<OwnWatch<'_>>>,
) -> impl Future<Output = Option<Beat>> + 'a {
    std::future::poll_fn(move |cx| {
        let Some(own) = own.as_mut() else {
            return Poll::Pending;
        };
        if Pin::new(&mut own.stopping).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        own.watchdog.poll_tick(cx).map(Some)
    })
}

/// Hands `first` (if any) and every frame already behind it (up to `max`) to the handler.
async fn burst<St, H>(
    stream: &mut St,
    handler: &mut H,
    first: Option<Bytes>,
    max: usize,
) -> Result<Flow, v1::Error>
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    H: Handler,
{
    let mut burst = match first {
        Some(first) => Burst::new(first, max),
        None => Burst::behind(max),
    };
    while let Some(frame) = burst.next_frame(stream)? {
        let msg: H::In = decode_frame(frame)?;
        if handler.message(msg).await? == Flow::End {
            return Ok(Flow::End);
        }
    }
    Ok(if burst.closed() {
        Flow::End
    } else {
        Flow::Continue
    })
}
