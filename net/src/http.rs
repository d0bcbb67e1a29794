//! The small HTTP client the services, the CLI and tests use for `/v1/stats`, `/v1/login` and
//! challenges. Serving HTTP is [`crate::serve`] (feature `server`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
pub use hyper::Method;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use crate::tls::Connector;
use crate::ws::OpenError;

/// Why an HTTP request from [`request`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The URL is not `http://host:port/path` (or `ws://`, which is mapped to `http://`).
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        /// `host:port` that was dialed.
        addr: String,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The TLS handshake of an `https://` URL failed (e.g. a certificate signed by a CA this
    /// process does not trust: give it with `--ca` / `RELAYMESH_CA`).
    #[error("cannot connect to {addr}: {message}")]
    Tls {
        /// `host:port` that was dialed.
        addr: String,
        /// What went wrong, in words.
        message: String,
    },
    /// The exchange failed after connecting.
    #[error("HTTP request to {url} failed: {message}")]
    Exchange {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// No answer in time.
    #[error("HTTP request to {0} timed out")]
    Timeout(String),
}

/// Largest response body [`request`] reads.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Makes one HTTP/1.1 request and returns the status and body. `ws://` URLs are treated as
/// `http://` (and `wss://` as `https://`, with the process's default trust, see
/// [`Connector`]) so one coordinator URL serves for both WebSocket links and HTTP endpoints.
pub async fn request(
    method: Method,
    url: &str,
    json_body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpClientError> {
    request_with(method, url, &[], json_body, &Connector::default(), timeout).await
}

/// [`request`] with extra request headers (an API key, say) and the trust for an `https://`
/// URL.
pub async fn request_with(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    json_body: Option<Vec<u8>>,
    tls: &Connector,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpClientError> {
    tokio::time::timeout(timeout, request_inner(method, url, headers, json_body, tls))
        .await
        .unwrap_or_else(|_| Err(HttpClientError::Timeout(url.to_owned())))
}

async fn request_inner(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    json_body: Option<Vec<u8>>,
    tls: &Connector,
) -> Result<(StatusCode, Bytes), HttpClientError> {
    let bad_url = |reason: String| HttpClientError::BadUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: hyper::Uri = crate::url::normalize(url, crate::url::Form::Http)
        .map_err(|e| bad_url(e.to_string()))?
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad_url(e.to_string()))?;
    let host = uri.host().ok_or_else(|| bad_url("no host".into()))?;
    let secure = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let addr = format!("{host}:{port}");
    let stream = crate::ws::open(host, port, tls, secure)
        .await
        .map_err(|e| match e {
            OpenError::Connect(error) => HttpClientError::Connect {
                addr: addr.clone(),
                error,
            },
            OpenError::Tls(message) => HttpClientError::Tls {
                addr: addr.clone(),
                message,
            },
        })?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    exchange(stream, method, url, path, &addr, headers, json_body).await
}

/// One request on the connection `io` to `host_port`, and its answer.
async fn exchange<I>(
    io: I,
    method: Method,
    url: &str,
    path: &str,
    host_port: &str,
    headers: &[(&str, &str)],
    json_body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), HttpClientError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let exchange = |e: &dyn std::fmt::Display| HttpClientError::Exchange {
        url: url.to_owned(),
        message: e.to_string(),
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(WriteFirst::new(io)))
            .await
            .map_err(|e| exchange(&e))?;
    let driver = tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host_port);
    if json_body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder
        .body(Full::new(Bytes::from(json_body.unwrap_or_default())))
        .map_err(|e| exchange(&e))?;
    let response = sender.send_request(req).await.map_err(|e| exchange(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| exchange(&e))?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

/// A connection that is not read before something was written to it.
///
/// A server that refuses a connection at once (`503` when it is out of file descriptors)
/// answers before the request arrives. hyper reads an idle connection before it writes the
/// request, takes such an answer for an unexpected message and drops the request
/// ("operation was canceled"); held back until the request is written, the answer is read as
/// the request's, the way curl reads it.
struct WriteFirst<I> {
    io: I,
    wrote: bool,
    /// The reader waiting for the first write.
    reader: Option<std::task::Waker>,
}

impl<I> WriteFirst<I> {
    fn new(io: I) -> Self {
        Self {
            io,
            wrote: false,
            reader: None,
        }
    }

    fn written(&mut self, result: &Poll<std::io::Result<usize>>) {
        if !self.wrote && matches!(result, Poll::Ready(Ok(n)) if *n > 0) {
            self.wrote = true;
            if let Some(reader) = self.reader.take() {
                reader.wake();
            }
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteFirst<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.wrote {
            self.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteFirst<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.written(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.written(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An answer that is there before the request was sent is the request's answer.
    #[tokio::test]
    async fn an_answer_sent_before_the_request_is_read_as_its_answer() {
        let (client, mut server) = tokio::io::duplex(4096);
        let body = r#"{"code":"SERVER_FULL"}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        server.write_all(answer.as_bytes()).await.unwrap();
        let served = tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = server.read(&mut request).await.unwrap();
            drop(server);
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        let answered = exchange(
            client,
            Method::GET,
            "http://127.0.0.1:1/healthz",
            "/healthz",
            "127.0.0.1:1",
            &[],
            None,
        );
        let (status, got) = tokio::time::timeout(std::time::Duration::from_secs(10), answered)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got, body.as_bytes());
        assert!(
            served
                .await
                .unwrap()
                .starts_with("GET /healthz HTTP/1.1\r\n")
        );
    }
}
