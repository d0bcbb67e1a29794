//! The scanner that finds the end of a WebSocket upgrade's response head
//! (`relaymesh_net::ws::HeadScanner`), on arbitrary responses arriving in arbitrary pieces and
//! consumed in arbitrary amounts: it stops exactly after the first blank line of a `101`
//! response, and leaves any other response alone once its status line is known.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relaymesh_net::ws::{HeadScanner, Scan};

fuzz_target!(|input: &[u8]| {
    let Some((&control, stream)) = input.split_first() else {
        return;
    };
    let step = usize::from(control & 0x0f) + 1;
    let read = usize::from(control >> 4) + 1;
    let mut scanner = HeadScanner::default();
    let mut at = 0;
    let mut upgrade = true;
    while at < stream.len() && !scanner.done() {
        let available = &stream[at..(at + step).min(stream.len())];
        match scanner.scan(available) {
            Scan::NotUpgrade => {
                upgrade = false;
                break;
            }
            Scan::Take { n, last } => {
                assert!(n <= available.len());
                assert!(!last || n > 0);
                let n = n.min(read);
                scanner.consumed(&available[..n]);
                at += n;
            }
        }
    }
    let end = stream
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4);
    // A blank line within the first 12 bytes is no HTTP response at all: whether the scanner
    // stops there or calls it a refusal depends on how it arrived, and the handshake refuses
    // it either way.
    if end.is_some_and(|end| end <= 12) {
        return;
    }
    let status_known = stream.len() >= 12;
    if status_known && !stream[..12].ends_with(b" 101") {
        assert!(!upgrade, "a non-101 response was taken as an upgrade");
        return;
    }
    assert!(upgrade, "a 101 response was taken for a refusal");
    match end {
        Some(end) => {
            assert!(scanner.done());
            assert_eq!(at, end, "stopped anywhere but the end of the head");
        }
        None => {
            assert!(!scanner.done());
            assert_eq!(at, stream.len());
        }
    }
});
