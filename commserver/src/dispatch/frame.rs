//! The PlaceOS dispatch wire format: binary WebSocket frames, big-endian,
//! `u8 type | remote IP as a NUL-terminated string | u64 client id (TCP) or remote port (UDP) |
//! u32 data length | data`.

use bytes::{BufMut as _, Bytes, BytesMut};

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Gateway → driver: a device connected (TCP).
    Opened = 0,
    /// Gateway → driver: a device disconnected (TCP).
    Closed = 1,
    /// Gateway → driver: data from a device.
    Received = 2,
    /// Driver → gateway: data for a device.
    Write = 3,
    /// Driver → gateway: disconnect a device (TCP).
    Close = 4,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    pub(crate) ip: String,
    /// Client id (TCP) or remote port (UDP).
    pub(crate) id: u64,
    pub(crate) data: Bytes,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame is {0} bytes, shorter than a header")]
    Short(usize),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("the IP address is not NUL-terminated")]
    Unterminated,
    #[error("the IP address is not UTF-8")]
    BadIp,
    #[error("data length says {said} bytes but {left} follow")]
    Length { said: usize, left: usize },
}

/// Encodes a frame.
pub(crate) fn encode(kind: Kind, ip: &str, id: u64, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(1 + ip.len() + 1 + 8 + 4 + data.len());
    buf.put_u8(kind as u8);
    buf.put_slice(ip.as_bytes());
    buf.put_u8(0);
    buf.put_u64(id);
    buf.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    buf.put_slice(data);
    buf.freeze()
}

/// Decodes a frame; the data length must match what follows exactly.
pub(crate) fn decode(frame: &Bytes) -> Result<Frame, FrameError> {
    let kind = match frame.first() {
        None => return Err(FrameError::Short(0)),
        Some(0) => Kind::Opened,
        Some(1) => Kind::Closed,
        Some(2) => Kind::Received,
        Some(3) => Kind::Write,
        Some(4) => Kind::Close,
        Some(&other) => return Err(FrameError::UnknownType(other)),
    };
    let nul = frame[1..]
        .iter()
        .position(|&b| b == 0)
        .ok_or(FrameError::Unterminated)?;
    let ip = std::str::from_utf8(&frame[1..1 + nul]).map_err(|_| FrameError::BadIp)?;
    let rest = &frame[2 + nul..];
    if rest.len() < 12 {
        return Err(FrameError::Short(frame.len()));
    }
    let id = u64::from_be_bytes(
        rest[..8]
            .try_into()
            .map_err(|_| FrameError::Short(frame.len()))?,
    );
    let said = u32::from_be_bytes(
        rest[8..12]
            .try_into()
            .map_err(|_| FrameError::Short(frame.len()))?,
    ) as usize;
    let left = rest.len() - 12;
    if said != left {
        return Err(FrameError::Length { said, left });
    }
    let start = frame.len() - left;
    Ok(Frame {
        kind,
        ip: ip.to_owned(),
        id,
        data: frame.slice(start..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_the_placeos_layout() {
        let f = encode(Kind::Write, "10.0.0.7", 42, b"hi");
        assert_eq!(
            &f[..],
            &[
                3, b'1', b'0', b'.', b'0', b'.', b'0', b'.', b'7', 0, 0, 0, 0, 0, 0, 0, 0, 42, 0,
                0, 0, 2, b'h', b'i'
            ][..]
        );
        let d = decode(&f).unwrap();
        assert_eq!(
            (d.kind, d.ip.as_str(), d.id, &d.data[..]),
            (Kind::Write, "10.0.0.7", 42, &b"hi"[..])
        );
        let opened = decode(&encode(Kind::Opened, "::1", 1, b"")).unwrap();
        assert_eq!((opened.kind, opened.data.len()), (Kind::Opened, 0));
    }

    #[test]
    fn bad_frames_are_refused() {
        let good = encode(Kind::Write, "1.2.3.4", 1, b"abc");
        assert_eq!(decode(&Bytes::new()), Err(FrameError::Short(0)));
        assert_eq!(
            decode(&Bytes::from_static(&[9, 0])),
            Err(FrameError::UnknownType(9))
        );
        assert_eq!(
            decode(&Bytes::from_static(&[3, b'1', b'2'])),
            Err(FrameError::Unterminated)
        );
        assert!(matches!(
            decode(&good.slice(..good.len() - 1)),
            Err(FrameError::Length { said: 3, left: 2 })
        ));
        let mut long = BytesMut::from(&good[..]);
        long.put_u8(0);
        assert!(matches!(
            decode(&long.freeze()),
            Err(FrameError::Length { said: 3, left: 4 })
        ));
        assert!(matches!(
            decode(&Bytes::from_static(&[3, b'1', 0, 0])),
            Err(FrameError::Short(4))
        ));
    }
}
