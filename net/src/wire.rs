//! The WebSocket wire format (RFC 6455 section 5) as relaymesh writes it: opcodes, frame
//! headers, masking, and the helpers that walk a run of whole frames. The link writer and the
//! frame reader both build on this module; neither imports the other for it.

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::protocol::Role;

/// A continuation frame.
pub(crate) const OP_CONTINUE: u8 = 0x0;
/// A text frame (refused by relaymesh links).
pub(crate) const OP_TEXT: u8 = 0x1;
/// A binary frame: every relaymesh message.
pub(crate) const OP_BINARY: u8 = 0x2;
/// A close frame.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// A ping.
pub(crate) const OP_PING: u8 = 0x9;
/// A pong.
pub(crate) const OP_PONG: u8 = 0xA;

/// Appends one final WebSocket frame with `opcode` and `payload` to `out`; a client masks it
/// (RFC 6455 section 5.3), a server does not.
pub(crate) fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8], role: Role) {
    let len = payload.len();
    let masked = role == Role::Client;
    let mask_bit = if masked { 0x80 } else { 0 };
    out.reserve(len + 14);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(mask_bit | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(mask_bit | 126);
        out.put_u16(len);
    } else {
        out.put_u8(mask_bit | 127);
        out.put_u64(len as u64);
    }
    if !masked {
        out.put_slice(payload);
        return;
    }
    let key: [u8; 4] = rand::random();
    out.put_slice(&key);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], key);
}

/// Appends the header of an unmasked (server to client) final binary frame of `len` bytes; the
/// payload follows. With [`framed`] this is how a server encodes a message once for every
/// receiver.
pub fn put_frame_header(out: &mut BytesMut, len: usize) {
    out.reserve(10);
    out.put_u8(0x80 | OP_BINARY);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// `payload` as one unmasked binary frame, for a [`crate::link::DataBacklog::framed`] queue.
pub fn framed(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_frame_header(&mut out, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Splits a run of whole unmasked frames into its frames' headers and payloads:
/// `(header_len, payload_len)` of the first frame, if whole.
pub(crate) fn first_frame(frames: &[u8]) -> Option<(usize, usize)> {
    let [_, second, rest @ ..] = frames else {
        return None;
    };
    let (header, len) = match second & 0x7F {
        126 => (
            4,
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
        ),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(*rest.first_chunk::<8>()?)).ok()?,
        ),
        n => (2, usize::from(n)),
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    (frames.len() >= header + mask + len).then_some((header + mask, len))
}

/// How many whole frames a run of frames holds.
pub(crate) fn count_frames(mut frames: &[u8]) -> usize {
    let mut n = 0;
    while let Some((header, len)) = first_frame(frames) {
        n += 1;
        frames = &frames[header + len..];
    }
    n
}

/// The payloads of a run of whole unmasked frames (a [`crate::link::DataBacklog::framed`] item), for a
/// receiver that consumes a data queue itself instead of writing it to a socket.
pub fn frame_payloads(frames: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    payload_ranges(frames).map(|range| frames.slice(range))
}

/// [`frame_payloads`] borrowed: the payloads of a run of whole unmasked frames.
pub fn payloads(frames: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    payload_ranges(frames).map(|range| &frames[range])
}

fn payload_ranges(frames: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let (header, len) = first_frame(frames.get(at..)?)?;
        let range = at + header..at + header + len;
        at = range.end;
        Some(range)
    })
}

/// Whether a run of whole frames (a reply from the reader) holds a close frame.
pub(crate) fn holds_close(mut frames: &[u8]) -> bool {
    while let Some((header, len)) = first_frame(frames) {
        if frames[0] & 0x0F == OP_CLOSE {
            return true;
        }
        frames = &frames[header + len..];
    }
    false
}

/// XORs `body` with the repeated 4-byte `key` (RFC 6455 section 5.3), eight bytes at a time.
pub(crate) fn apply_mask(body: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = body.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn close_frames_are_found_among_whole_frames() {
        let mut out = BytesMut::new();
        put_frame(&mut out, OP_BINARY, &[7; 300], Role::Client);
        assert!(!holds_close(&out));
        put_frame(&mut out, OP_CLOSE, &[], Role::Server);
        assert!(holds_close(&out));
        assert!(!holds_close(&[0x8a, 0x02, 1, 2]), "a pong");
        assert!(!holds_close(&[0x82]), "a truncated header is not a close");
    }

    #[test]
    fn framed_batches_count_and_split_into_their_messages() {
        let mut batch = BytesMut::new();
        for n in [0usize, 3, 200, 70_000] {
            put_frame_header(&mut batch, n);
            batch.put_slice(&vec![n as u8; n]);
        }
        let batch = batch.freeze();
        assert_eq!(count_frames(&batch), 4);
        let sizes: Vec<usize> = frame_payloads(&batch).map(|p| p.len()).collect();
        assert_eq!(sizes, [0, 3, 200, 70_000]);
        assert_eq!(
            framed(b"abc"),
            Bytes::from_static(&[0x82, 3, b'a', b'b', b'c'])
        );
        assert_eq!(
            count_frames(&batch[..batch.len() - 1]),
            3,
            "a cut frame is not whole"
        );
    }
}
