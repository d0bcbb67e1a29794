//! The config loader on arbitrary TOML, as both services read it: parsing and validating never
//! panic; a bad file is an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use relaymesh_net::config::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    if let Ok(config) = parse::<commserver::Config>(text, path) {
        let _ = config.validate();
    }
    if let Ok(config) = parse::<coordinator::Config>(text, path) {
        let _ = config.validate();
    }
});
