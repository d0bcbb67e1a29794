//! Every protobuf envelope a relaymesh process decodes from a peer, on arbitrary bytes: decoding
//! never panics, and what decodes encodes to bytes that decode to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relaymesh_proto::{decode, encode, v1};

fn round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(data: &Bytes) {
    if let Ok(msg) = decode::<M>(data.clone()) {
        let again: M = decode(encode(&msg)).expect("re-encoded message decodes");
        assert_eq!(again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    let data = Bytes::copy_from_slice(data);
    round_trip::<v1::ClientToServer>(&data);
    round_trip::<v1::ServerToClient>(&data);
    round_trip::<v1::PeerMessage>(&data);
    round_trip::<v1::ServerToCoordinator>(&data);
    round_trip::<v1::CoordinatorToServer>(&data);
    round_trip::<v1::ClientToCoordinator>(&data);
    round_trip::<v1::CoordinatorToClient>(&data);
});
