//! Topic and filter validation and matching on arbitrary strings: a topic that validates keeps
//! every rule the README states, and matching never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relaymesh_proto::topic;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_at(
        text.char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i),
    );
    for candidate in [text, a, b] {
        if topic::validate(candidate, MAX).is_ok() {
            assert!(!candidate.is_empty() && candidate.len() <= MAX);
            assert!(candidate.split('/').all(|segment| !segment.is_empty()));
            assert!(
                candidate
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_-.:/".contains(&c))
            );
            // A topic is a filter that matches itself.
            if topic::validate_filter(candidate, MAX).is_ok() {
                assert!(topic::matches(candidate, candidate));
            }
        }
        let _ = topic::validate_filter(candidate, MAX);
    }
    let _ = topic::matches(a, b);
});
