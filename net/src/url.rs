//! Base URLs of coordinators and comm servers, as users write them.
//!
//! One URL names a service for both of its kinds of traffic: WebSocket links and HTTP endpoints.
//! So `ws://host:port` and `http://host:port` are the same thing everywhere (dialing maps one to
//! the other), as are `wss://` and `https://` (the same over TLS), and a URL that cannot be used is refused with an explanation in words instead of
//! a parser's message.

/// Why a URL cannot name a relaymesh service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://` in front (e.g. `127.0.0.1:7400`).
    #[error("it has no scheme; write ws://{0} (or http://{0})")]
    NoScheme(String),
    /// Any other scheme.
    #[error(
        "the scheme {0}:// is not one relaymesh speaks; use ws:// or http:// (wss:// or https:// for TLS)"
    )]
    Scheme(String),
    /// No host after the scheme.
    #[error("it names no host; write e.g. ws://127.0.0.1:7400")]
    NoHost,
}

/// Which of the two forms a URL is wanted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `ws://…`, for dialing a WebSocket.
    WebSocket,
    /// `http://…`, for an HTTP request.
    Http,
}

/// `url` in the wanted form: `ws://` and `http://` are accepted for either and mapped to the
/// one wanted, and so are `wss://` and `https://` (TLS stays TLS); anything else is refused with
/// the reason.
pub fn normalize(url: &str, form: Form) -> Result<String, UrlError> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(UrlError::NoScheme(url.trim_end_matches('/').to_owned()));
    };
    let secure = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => false,
        "wss" | "https" => true,
        _ => return Err(UrlError::Scheme(scheme.to_owned())),
    };
    if rest.is_empty() || rest.starts_with(['/', '?', ':']) {
        return Err(UrlError::NoHost);
    }
    let scheme = match (form, secure) {
        (Form::WebSocket, false) => "ws",
        (Form::WebSocket, true) => "wss",
        (Form::Http, false) => "http",
        (Form::Http, true) => "https",
    };
    Ok(format!("{scheme}://{rest}"))
}

/// Whether `url` (already normalized) is dialed over TLS.
pub fn is_tls(url: &str) -> bool {
    url.starts_with("wss://") || url.starts_with("https://")
}

/// Checks a base URL given in configuration or on the command line, so a bad one is refused
/// at start-up rather than at the first dial.
pub fn check(url: &str) -> Result<(), UrlError> {
    normalize(url, Form::WebSocket).map(drop)
}

/// The host (as written: a name, an IPv4 address, or `[IPv6]`) and port of a base URL, the
/// port defaulting to the scheme's (80, or 443 over TLS); `None` when it is not a URL
/// relaymesh speaks.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let url = normalize(url, Form::WebSocket).ok()?;
    let secure = is_tls(&url);
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(end) = authority.find(']') {
        let (host, tail) = authority.split_at(end + 1);
        (host, tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None if secure => 443,
        None => 80,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// The URLs of a comma-separated list (`ws://a:7400,ws://b:7400`), each once, in order; blanks
/// are skipped.
pub fn split_list(urls: &str) -> Vec<&str> {
    let mut list: Vec<&str> = Vec::new();
    for url in urls.split(',').map(str::trim) {
        if !url.is_empty() && !list.contains(&url) {
            list.push(url);
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ports_and_lists() {
        let hp = host_port;
        assert_eq!(
            hp("ws://coord.example:7400/x"),
            Some(("coord.example".into(), 7400))
        );
        assert_eq!(
            hp("wss://coord.example"),
            Some(("coord.example".into(), 443))
        );
        assert_eq!(hp("http://u:p@10.0.0.1"), Some(("10.0.0.1".into(), 80)));
        assert_eq!(hp("ws://[::1]:7400"), Some(("[::1]".into(), 7400)));
        assert_eq!(hp("ws://[::1]"), Some(("[::1]".into(), 80)));
        assert_eq!(hp("ws://h:notaport"), None);
        assert_eq!(hp("h:7400"), None);
        assert_eq!(
            split_list(" ws://a:1, ,ws://b:2,ws://a:1 "),
            vec!["ws://a:1", "ws://b:2"]
        );
    }

    #[test]
    fn either_scheme_serves_for_both_forms() {
        for url in [
            "ws://127.0.0.1:7400",
            "http://127.0.0.1:7400",
            "HTTP://127.0.0.1:7400",
        ] {
            assert_eq!(
                normalize(url, Form::WebSocket).unwrap(),
                "ws://127.0.0.1:7400"
            );
            assert_eq!(normalize(url, Form::Http).unwrap(), "http://127.0.0.1:7400");
        }
        assert_eq!(
            normalize("ws://h:1/v1/connect?x=1", Form::Http).unwrap(),
            "http://h:1/v1/connect?x=1"
        );
        for url in ["wss://h:1", "HTTPS://h:1"] {
            assert_eq!(normalize(url, Form::WebSocket).unwrap(), "wss://h:1");
            assert_eq!(normalize(url, Form::Http).unwrap(), "https://h:1");
            assert!(is_tls(&normalize(url, Form::Http).unwrap()));
        }
    }

    #[test]
    fn unusable_urls_are_explained() {
        let no_scheme = normalize("127.0.0.1:7400", Form::WebSocket).unwrap_err();
        assert_eq!(
            no_scheme.to_string(),
            "it has no scheme; write ws://127.0.0.1:7400 (or http://127.0.0.1:7400)"
        );
        assert!(matches!(
            normalize("ftp://a:1", Form::Http),
            Err(UrlError::Scheme(_))
        ));
        assert_eq!(normalize("ws://", Form::Http), Err(UrlError::NoHost));
        assert_eq!(normalize("ws://:7400", Form::Http), Err(UrlError::NoHost));
    }
}
