//! The WebSocket frame reader (`relaymesh_net::frames::FrameReader`) on arbitrary bytes, in
//! either role, arriving in pieces of arbitrary size: it never panics, never asks for more
//! after the stream has ended, and ends reading at once after an error.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use libfuzzer_sys::fuzz_target;
use relaymesh_net::frames::FrameReader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Bytes that arrive `step` at a time; whatever is written back is taken and dropped.
struct Pieces {
    data: Vec<u8>,
    at: usize,
    step: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let end = (self.at + self.step).min(self.data.len());
        let n = (end - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pieces {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&control, data)) = input.split_first() else {
        return;
    };
    let role = if control & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let step = usize::from(control >> 1).max(1);
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .max_frame_size(Some(4096))
        .max_message_size(Some(8192));
    let io = Pieces {
        data: data.to_vec(),
        at: 0,
        step,
    };
    let mut reader = FrameReader::new(io, role, &config);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut failed = false;
    // Every poll consumes input or ends the stream; the bound only guards the harness.
    for _ in 0..data.len() * 2 + 16 {
        match Pin::new(&mut reader).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(_))) => assert!(!failed, "a message after an error"),
            Poll::Ready(Some(Err(_))) => {
                assert!(!failed, "a second error");
                failed = true;
            }
            Poll::Ready(None) => return,
            // The input is always ready: pending only once it is used up.
            Poll::Pending => return,
        }
    }
    panic!("the reader neither ended nor ran out of input");
});
