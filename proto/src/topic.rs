//! Topic naming rules, shared by clients (to fail early) and servers (to enforce).
//!
//! A topic is 1 to `max_len` bytes (servers default to [`DEFAULT_MAX_TOPIC_LEN`]) of ASCII
//! letters, digits and `_ - . :`, in one or more non-empty segments separated by `/`, e.g.
//! `rooms/lobby` or `telemetry/drone-17.gps`. Whitespace, control characters, non-ASCII and the
//! wildcard characters `* # + >` are refused, as are leading, trailing and doubled `/`.
//!
//! Role rules use topic *filters*: `+` stands for one segment and a final `#` for any number of
//! further segments, as in MQTT (`telemetry/#`, `command/+`).

/// Default and recommended maximum topic length in bytes.
pub const DEFAULT_MAX_TOPIC_LEN: usize = 256;

/// Why a topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic was the empty string.
    #[error("topic is empty")]
    Empty,
    /// The topic was longer than the limit.
    #[error("topic is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the refused topic in bytes.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The topic started or ended with `/` or contained `//`.
    #[error("topic has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment,
    /// The topic contained a wildcard character: topics are exact names.
    #[error(
        "topic has the wildcard character {ch:?} at byte {index}; topics are exact names (subscribe to each topic by name; '+' and '#' appear only in role filters, as whole segments)"
    )]
    Wildcard {
        /// The refused character.
        ch: char,
        /// Its byte offset in the topic.
        index: usize,
    },
    /// The topic contained a character outside the allowed set.
    #[error(
        "topic has the character {ch:?} at byte {index}; allowed are ASCII letters, digits, '_', '-', '.', ':' and '/' between segments"
    )]
    BadChar {
        /// The refused character.
        ch: char,
        /// Its byte offset in the topic.
        index: usize,
    },
}

/// Checks a topic that a server routes: a client's topic ([`validate`]), or a node topic
/// (`@node/<id>`, see [`crate::node`]) that only servers make.
pub fn validate_routed(topic: &str, max_len: usize) -> Result<(), TopicError> {
    match crate::node::of_topic(topic) {
        Some(id) if crate::node::check_id(id).is_ok() => Ok(()),
        _ => validate(topic, max_len),
    }
}

/// Checks `topic` against the rules in the module documentation.
pub fn validate(topic: &str, max_len: usize) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > max_len {
        return Err(TopicError::TooLong {
            len: topic.len(),
            max: max_len,
        });
    }
    let mut previous_was_separator = true;
    for (index, ch) in topic.char_indices() {
        match ch {
            '/' if previous_was_separator => return Err(TopicError::EmptySegment),
            '/' => previous_was_separator = true,
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' | '.' | ':' => {
                previous_was_separator = false
            }
            '*' | '#' | '+' | '>' => return Err(TopicError::Wildcard { ch, index }),
            _ => return Err(TopicError::BadChar { ch, index }),
        }
    }
    if previous_was_separator {
        return Err(TopicError::EmptySegment);
    }
    Ok(())
}

/// Checks a topic filter (as used in role rules): segments as in a topic, or `+` for exactly
/// one segment, or `#` as the last segment for any number (including none) of further ones.
pub fn validate_filter(filter: &str, max_len: usize) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > max_len {
        return Err(TopicError::TooLong {
            len: filter.len(),
            max: max_len,
        });
    }
    let segments: Vec<&str> = filter.split('/').collect();
    let mut offset = 0;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "+" => {}
            "#" if i + 1 == segments.len() => {}
            _ => validate(segment, max_len).map_err(|e| match e {
                TopicError::BadChar { ch, index } => TopicError::BadChar {
                    ch,
                    index: offset + index,
                },
                TopicError::Wildcard { ch, index } => TopicError::Wildcard {
                    ch,
                    index: offset + index,
                },
                other => other,
            })?,
        }
        offset += segment.len() + 1;
    }
    Ok(())
}

/// Whether `topic` (a valid topic) matches `filter` (a valid filter).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut topic = topic.split('/');
    for segment in filter.split('/') {
        match segment {
            "#" => return true,
            "+" => {
                if topic.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_mqtt() {
        for (filter, topic, expected) in [
            ("telemetry/#", "telemetry", true),
            ("telemetry/#", "telemetry/drone-1/gps", true),
            ("telemetry/#", "telemetryx/a", false),
            ("#", "anything/at/all", true),
            ("command/+", "command/drone-1", true),
            ("command/+", "command/drone-1/arm", false),
            ("command/+", "command", false),
            ("a/+/c", "a/b/c", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
        ] {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn filters_are_checked() {
        for f in ["#", "a/#", "+/b/+", "telemetry/drone-1"] {
            assert_eq!(validate_filter(f, 256), Ok(()), "{f}");
        }
        assert_eq!(
            validate_filter("a/#/b", 256),
            Err(TopicError::Wildcard { ch: '#', index: 2 })
        );
        assert_eq!(
            validate_filter("a/b+", 256),
            Err(TopicError::Wildcard { ch: '+', index: 3 })
        );
        assert_eq!(validate_filter("a//b", 256), Err(TopicError::Empty));
        assert_eq!(validate_filter("", 256), Err(TopicError::Empty));
    }

    #[test]
    fn accepts_ordinary_topics() {
        for t in ["a", "rooms/lobby", "telemetry/drone-17.gps", "A_b:c/1/2/3"] {
            assert_eq!(validate(t, 256), Ok(()), "{t}");
        }
        assert_eq!(validate(&"x".repeat(256), 256), Ok(()));
    }

    #[test]
    fn refuses_bad_topics() {
        assert_eq!(validate("", 256), Err(TopicError::Empty));
        assert_eq!(
            validate(&"x".repeat(257), 256),
            Err(TopicError::TooLong { len: 257, max: 256 })
        );
        for t in ["/a", "a/", "a//b", "/"] {
            assert_eq!(validate(t, 256), Err(TopicError::EmptySegment), "{t}");
        }
        assert_eq!(
            validate("a b", 256),
            Err(TopicError::BadChar { ch: ' ', index: 1 })
        );
        assert_eq!(
            validate("a/#", 256),
            Err(TopicError::Wildcard { ch: '#', index: 2 })
        );
        assert_eq!(
            validate("é", 256),
            Err(TopicError::BadChar { ch: 'é', index: 0 })
        );
        assert_eq!(
            validate("a\0", 256),
            Err(TopicError::BadChar { ch: '\0', index: 1 })
        );
    }
}
