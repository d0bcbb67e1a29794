//! A TCP proxy in front of a comm server that can black-hole its peer links: bytes of
//! connections that open `/v1/peers` are swallowed in both directions while the switch is on,
//! and nothing is closed, as when a network path silently drops every packet. Other
//! connections (clients, HTTP) pass untouched. It can also hold peer links' bytes back and
//! deliver them, in order, once released: a slow path, not a lost one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running proxy; stops (and drops every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    blackhole: Arc<AtomicBool>,
    held: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
}

impl Proxy {
    /// Starts a proxy on a free port; it forwards to [`Proxy::set_upstream`] once set.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(None));
        let blackhole = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let held = tokio::sync::watch::Sender::new(false);
        let (up, hole, token) = (upstream.clone(), blackhole.clone(), stop.clone());
        let hold = held.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = token.cancelled() => return,
                };
                let Ok((socket, _)) = accepted else { continue };
                let target = *up.lock().unwrap();
                let Some(target) = target else { continue };
                let (hole, token, hold) = (hole.clone(), token.clone(), hold.subscribe());
                tokio::spawn(async move {
                    tokio::select! {
                        () = relay(socket, target, hole, hold) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            upstream,
            blackhole,
            held,
            stop,
        }
    }

    /// Holds back (`true`) or releases (`false`) the bytes of peer links, old and new, in both
    /// directions (all but a new link's first read, which names it a peer link).
    pub fn hold_peers(&self, on: bool) {
        self.held.send_replace(on);
    }

    /// Where connections go.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap() = Some(addr);
    }

    /// Swallows (`true`) or passes (`false`) the bytes of peer links, old and new.
    pub fn blackhole_peers(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    blackhole: Arc<AtomicBool>,
    held: tokio::sync::watch::Receiver<bool>,
) {
    let mut first = vec![0u8; 4096];
    let n = match client.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    first.truncate(n);
    let peer = first.starts_with(b"GET /v1/peers");
    let hole = move || peer && blackhole.load(Ordering::SeqCst);
    let (held_up, held_down) = if peer {
        (Some(held.clone()), Some(held))
    } else {
        (None, None)
    };
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    if !hole() && server.write_all(&first).await.is_err() {
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.split();
    let hole_up = hole.clone();
    let up = async move {
        pipe(&mut client_read, &mut server_write, hole_up, held_up).await;
    };
    let down = async move {
        pipe(&mut server_read, &mut client_write, hole, held_down).await;
    };
    tokio::join!(up, down);
}

/// Copies `from` to `to` until `from` ends, swallowing what arrives while `hole()` holds. An
/// end while swallowing is swallowed too: the other side sees nothing at all. With `held`, what
/// arrives while it says so waits until it no longer does.
async fn pipe<R, W>(
    from: &mut R,
    to: &mut W,
    hole: impl Fn() -> bool,
    mut held: Option<tokio::sync::watch::Receiver<bool>>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hole() {
            continue;
        }
        if let Some(held) = held.as_mut()
            && held.wait_for(|on| !on).await.is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    if hole() {
        std::future::pending::<()>().await;
    }
    let _ = to.shutdown().await;
}
