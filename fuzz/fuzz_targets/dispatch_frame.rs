//! The PlaceOS dispatch frame parser on arbitrary bytes: it never panics, and a frame it
//! accepts encodes back to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| commserver::fuzzing::dispatch_frame(data));
