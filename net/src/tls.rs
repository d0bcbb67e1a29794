//! TLS for every link, with rustls (ring as the crypto provider).
//!
//! * [`Connector`] is the dialing side: whom to trust (a CA bundle, `--ca` /
//!   `RELAYMESH_CA`, or else the system's CA store) and, for mutual TLS, the certificate this
//!   process presents. Every dialer ([`crate::ws`], [`crate::http`]) takes one; a `ws://` or
//!   `http://` URL never uses it.
//! * [`Identity`] is a certificate chain and its private key read from two PEM files, and read
//!   again when either file changes ([`Identity::watch`]): new handshakes use the new
//!   certificate, connections already open keep theirs (certificate rotation).
//! * [`Acceptor`] (feature `server`) is the listening side: the identity to present and,
//!   optionally, the CA whose client certificates are verified (mutual TLS). Its
//!   [`Acceptor::handshake`] refuses a connection that does not start with a TLS record — a
//!   plain `ws://` or `http://` client on a TLS listener — with a `400` answer in plain text and
//!   a log line, rather than a TLS alert the client would not understand.
//! * [`names_host`] tells whether a certificate names a host, for checking a server's or a
//!   peer's certificate against the URL it registered with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

pub use rustls::pki_types::CertificateDer;
pub use tokio_rustls::client::TlsStream as ClientTlsStream;
#[cfg(feature = "server")]
pub use tokio_rustls::server::TlsStream as ServerTlsStream;

/// What is wrong with a TLS set-up: a file that cannot be read or holds no usable PEM.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// A certificate file or CA bundle holds no PEM certificate.
    #[error("{0} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate(PathBuf),
    /// A key file holds no PEM private key.
    #[error("{0} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    /// The certificate, key or CA is not usable: a key that does not match the certificate, a
    /// key type the provider does not support, a CA certificate that does not parse.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which file or setting.
        what: String,
        /// What rustls said.
        reason: String,
    },
    /// The system's CA store could not be read, and no CA bundle was given.
    #[error(
        "no CA bundle given (--ca / RELAYMESH_CA) and the system's CA store holds no usable certificate{0}"
    )]
    NoSystemRoots(String),
}

/// The crypto provider every configuration here is built with.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// The PEM certificates in `path`, in order.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The certificates of the CA bundle at `path` as trust anchors.
fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            what: format!("CA bundle {}", path.display()),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Whether `cert` (DER) is valid for `host`, a DNS name or an IP address (the host of a URL),
/// by its subject alternative names.
pub fn names_host(cert: &CertificateDer<'_>, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    match rustls::server::ParsedCertificate::try_from(cert) {
        Ok(parsed) => rustls::client::verify_server_name(&parsed, &name).is_ok(),
        Err(_) => false,
    }
}

/// Modification time and length of a file, to notice it changed.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A certificate chain and its private key, read from PEM files and read again when they
/// change. It answers for this process both as a server (the certificate a listener presents)
/// and as a client (the certificate presented to a server that asks for one, mutual TLS).
#[derive(Debug)]
pub struct Identity {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: std::sync::Mutex<(Stamp, Stamp)>,
    reloads: AtomicU64,
}

impl Identity {
    /// Reads the certificate chain at `cert` and the private key at `key`; refuses a key that
    /// does not match the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let current = Self::read(cert, key)?;
        Ok(Arc::new(Self {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current: RwLock::new(Arc::new(current)),
            stamps: std::sync::Mutex::new(stamps),
            reloads: AtomicU64::new(0),
        }))
    }

    fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = read_certificates(cert)?;
        let pem = read(key)?;
        let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(key.to_owned()),
            e => TlsError::Invalid {
                what: key.display().to_string(),
                reason: e.to_string(),
            },
        })?;
        CertifiedKey::from_der(chain, private, &provider()).map_err(|e| TlsError::Invalid {
            what: format!("{} with {}", cert.display(), key.display()),
            reason: e.to_string(),
        })
    }

    /// The certificate chain and key in use now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Times the files were read again and taken.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reads the files again if either changed since they were last read: `Ok(true)` when the
    /// new pair is taken, `Ok(false)` when nothing changed. A pair that cannot be used (a
    /// half-written file, a key that does not match yet) is an error and the old pair stays,
    /// to be tried again at the next change.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        {
            let mut seen = crate::sync::lock(&self.stamps);
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let fresh = Self::read(&self.cert_path, &self.key_path)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Looks at the files every `every` until `stop` is cancelled, taking a changed pair as
    /// soon as it is whole (see [`Identity::reload_if_changed`]). Spawn it.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    failing = false;
                    tracing::info!(
                        cert = %self.cert_path.display(),
                        "TLS certificate reloaded: new handshakes use it, open connections keep theirs"
                    );
                }
                Ok(false) => {}
                Err(error) => {
                    // Written in two steps (certificate, then key) the pair mismatches for a
                    // moment: said once, and tried again at the next change.
                    if !failing {
                        tracing::warn!(%error, "TLS certificate changed but cannot be used yet; keeping the previous one");
                    }
                    failing = true;
                    // Look again next time even if the files do not change again.
                    *crate::sync::lock(&self.stamps) = (None, None);
                }
            }
        }
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(feature = "server")]
impl rustls::server::ResolvesServerCert for Identity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Whom a dialer trusts, and what it presents when a server asks for a client certificate.
/// Cheap to clone. The default is the process's default trust, settled at the first `wss://`
/// or `https://` dial: the connector given to [`Connector::install_default`] (a binary's
/// `--ca`), else the CA bundle named by `RELAYMESH_CA`, else the system's CA store.
#[derive(Debug, Clone, Default)]
pub struct Connector {
    /// `None`: the process's default.
    config: Option<Arc<ClientConfig>>,
    /// Connect here instead of resolving the URL's host (which still names the server for TLS
    /// and the `Host` header): one of several addresses a name resolves to.
    pin: Option<std::net::SocketAddr>,
}

/// The connector a binary installed as the process's default.
static INSTALLED: OnceLock<Connector> = OnceLock::new();

/// The environment variable naming a CA bundle (PEM) that clients trust instead of the
/// system's CA store.
pub const CA_ENV: &str = "RELAYMESH_CA";

impl Connector {
    /// Trusts the CA bundle at `ca` (or the system's CA store when `None`) and presents
    /// `identity` to servers that ask for a client certificate.
    pub fn new(ca: Option<&Path>, identity: Option<Arc<Identity>>) -> Result<Self, TlsError> {
        if ca.is_none() && identity.is_none() {
            return Ok(Self::default());
        }
        let roots = match ca {
            Some(path) => read_roots(path)?,
            None => system_roots()?,
        };
        Ok(Self {
            config: Some(client_config(roots, identity)?),
            pin: None,
        })
    }

    /// This connector, connecting to `addr` whatever the dialed URL's host resolves to (the
    /// host still names the server: TLS checks its certificate against it, `Host` carries
    /// it). For a link to each of the addresses a DNS name resolves to.
    pub fn pinned(&self, addr: std::net::SocketAddr) -> Self {
        Self {
            config: self.config.clone(),
            pin: Some(addr),
        }
    }

    /// The address [`Connector::pinned`] set, if any.
    pub fn pin(&self) -> Option<std::net::SocketAddr> {
        self.pin
    }

    /// Trusts the CA bundle named by `ca`, else by `RELAYMESH_CA`, else the system's CA store.
    pub fn from_ca_or_env(ca: Option<&Path>) -> Result<Self, TlsError> {
        match ca {
            Some(path) => Self::new(Some(path), None),
            None => match std::env::var_os(CA_ENV) {
                Some(path) if !path.is_empty() => Self::new(Some(Path::new(&path)), None),
                _ => Ok(Self::default()),
            },
        }
    }

    /// Makes this connector the process's default (what [`Connector::default`] dials with),
    /// for a binary's `--ca`; once per process, before the first dial. Gives it back if a
    /// default was installed already.
    pub fn install_default(self) -> Result<(), Self> {
        INSTALLED.set(self)
    }

    fn config(&self) -> Result<Arc<ClientConfig>, String> {
        if let Some(config) = &self.config {
            return Ok(config.clone());
        }
        static DEFAULT: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                if let Some(config) = INSTALLED.get().and_then(|c| c.config.clone()) {
                    return Ok(config);
                }
                let roots = match std::env::var_os(CA_ENV) {
                    Some(path) if !path.is_empty() => {
                        read_roots(Path::new(&path)).map_err(|e| format!("{CA_ENV}: {e}"))?
                    }
                    _ => system_roots().map_err(|e| e.to_string())?,
                };
                client_config(roots, None).map_err(|e| e.to_string())
            })
            .clone()
    }

    /// Runs the client side of a TLS handshake over `tcp` with the server named `host` (the
    /// host of the URL dialed: a DNS name or an IP address, which the server's certificate
    /// must name). The error says why in words (e.g. an unknown issuer: the wrong `--ca`).
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<ClientTlsStream<TcpStream>, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a DNS name or IP address"))?;
        let config = self.config()?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| describe_handshake_error(&e))
    }
}

/// A client handshake error in words, with the likely fix for the usual ones.
fn describe_handshake_error(error: &std::io::Error) -> String {
    let text = error.to_string();
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        format!(
            "TLS: the server's certificate is not signed by a CA this client trusts ({text}); \
             give the CA that signed it with --ca or RELAYMESH_CA"
        )
    } else if text.contains("NotValidForName") {
        format!("TLS: the server's certificate does not name the host dialed ({text})")
    } else if text.contains("Expired") {
        format!("TLS: the server's certificate has expired ({text})")
    } else {
        format!("TLS handshake failed: {text}")
    }
}

fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(Arc::new(roots))
}

fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<Arc<Identity>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "TLS client".into(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(feature = "server")]
pub use server::*;

#[cfg(feature = "server")]
mod server {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::ServerConfig;
    use rustls::pki_types::CertificateDer;
    use serde::Deserialize;
    use tokio::net::TcpStream;

    use super::{Identity, ServerTlsStream, TlsError, provider, read_roots};

    /// The `[tls]` table of a service's config file.
    #[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
    #[serde(default, deny_unknown_fields)]
    pub struct TlsConfig {
        /// PEM certificate chain (leaf first) the service presents on its listeners; with it,
        /// the listeners speak TLS only (`wss://`, `https://`).
        pub cert: Option<PathBuf>,
        /// PEM private key of `cert`.
        pub key: Option<PathBuf>,
        /// PEM CA bundle: trusted when this service dials (instead of the system's CA store),
        /// and, with `mtls`, the CA whose client certificates are verified.
        pub ca: Option<PathBuf>,
        /// Mutual TLS on the server links: a comm server (at the coordinator) or a peer (at a
        /// comm server) must present a certificate signed by `ca` that names the host of the URL
        /// it registered with. Clients present none.
        pub mtls: bool,
        /// How often the certificate and key files are looked at for a change (milliseconds).
        pub reload_ms: u64,
    }

    impl Default for TlsConfig {
        fn default() -> Self {
            Self {
                cert: None,
                key: None,
                ca: None,
                mtls: false,
                reload_ms: 10_000,
            }
        }
    }

    impl TlsConfig {
        /// Checks the keys fit together (the files are read by [`TlsConfig::load`]).
        pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
            use crate::config::ensure;
            ensure(
                self.cert.is_some() == self.key.is_some(),
                "tls.cert",
                "and tls.key are set together",
            )?;
            ensure(
                !self.mtls || (self.cert.is_some() && self.ca.is_some()),
                "tls.mtls",
                "needs tls.cert, tls.key and tls.ca",
            )?;
            ensure(self.reload_ms > 0, "tls.reload_ms", "must be positive")
        }

        /// Applies a binary's `--tls-cert`, `--tls-key`, `--ca` and `--mtls` flags over the
        /// config file's keys (a flag given wins; `--mtls` only turns it on).
        pub fn apply_flags(
            &mut self,
            cert: Option<PathBuf>,
            key: Option<PathBuf>,
            ca: Option<PathBuf>,
            mtls: bool,
        ) {
            self.cert = cert.or(self.cert.take());
            self.key = key.or(self.key.take());
            self.ca = ca.or(self.ca.take());
            self.mtls |= mtls;
        }

        /// Whether the listeners speak TLS.
        pub fn enabled(&self) -> bool {
            self.cert.is_some()
        }

        /// Reads the files: the service's TLS state, or `None` when TLS is off.
        pub fn load(&self) -> Result<Option<ServiceTls>, TlsError> {
            let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
                return Ok(None);
            };
            let identity = Identity::load(cert, key)?;
            let client_ca = match (&self.ca, self.mtls) {
                (Some(ca), true) => Some(ca.as_path()),
                _ => None,
            };
            let acceptor = Acceptor::new(identity.clone(), client_ca, &[b"http/1.1"])?;
            let connector = super::Connector::new(self.ca.as_deref(), Some(identity.clone()))?;
            Ok(Some(ServiceTls {
                identity,
                acceptor,
                connector,
                mtls: self.mtls,
                reload: Duration::from_millis(self.reload_ms),
            }))
        }

        /// The dialer of a service: its CA and, with TLS on, its certificate for mutual TLS.
        pub fn connector(&self, loaded: Option<&ServiceTls>) -> Result<super::Connector, TlsError> {
            match loaded {
                Some(tls) => Ok(tls.connector.clone()),
                None => super::Connector::new(self.ca.as_deref(), None),
            }
        }
    }

    /// A service's TLS, loaded: its identity (watched for changes), the acceptor for its
    /// listeners and the connector for its dials.
    #[derive(Debug, Clone)]
    pub struct ServiceTls {
        /// The certificate and key, reloaded on change.
        pub identity: Arc<Identity>,
        /// For the service's HTTP/WebSocket listeners.
        pub acceptor: Acceptor,
        /// For the service's own dials (trusting `ca`, presenting `identity`).
        pub connector: super::Connector,
        /// Server and peer links must present a certificate naming their registered host.
        pub mtls: bool,
        /// How often the files are looked at.
        pub reload: Duration,
    }

    /// The listening side of TLS: what a listener presents and whose client certificates it
    /// verifies. Cheap to clone.
    #[derive(Debug, Clone)]
    pub struct Acceptor {
        config: Arc<ServerConfig>,
        refusals: Arc<std::sync::Mutex<crate::serve::Throttle>>,
    }

    /// Why a connection to a TLS listener was not served.
    #[derive(Debug, thiserror::Error)]
    pub enum HandshakeError {
        /// It spoke plain HTTP (or anything but TLS): answered `400` and closed.
        #[error("plain connection on a TLS listener")]
        Plain,
        /// The handshake failed (a client that does not trust our certificate, a client
        /// certificate that does not verify, garbage).
        #[error("TLS handshake failed: {0}")]
        Failed(std::io::Error),
        /// Nothing within the time allowed.
        #[error("TLS handshake timed out")]
        Timeout,
    }

    /// The body of the answer a plain client gets from a TLS listener before the close.
    const PLAIN_REFUSAL: &str =
        r#"{"code":"BAD_FRAME","message":"this listener speaks TLS only: use wss:// or https://"}"#;

    /// The whole `400` answer carrying [`PLAIN_REFUSAL`].
    fn plain_refusal() -> String {
        format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{PLAIN_REFUSAL}",
            PLAIN_REFUSAL.len()
        )
    }

    impl Acceptor {
        /// Presents `identity`; with `client_ca`, asks every client for a certificate and
        /// verifies the ones given against it (a client without one is let in: whether a link
        /// needs one is for its handler to say). `alpn`: the application protocols offered.
        pub fn new(
            identity: Arc<Identity>,
            client_ca: Option<&Path>,
            alpn: &[&[u8]],
        ) -> Result<Self, TlsError> {
            let invalid = |reason: String| TlsError::Invalid {
                what: "TLS server".into(),
                reason,
            };
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(e.to_string()))?;
            let builder = match client_ca {
                Some(ca) => {
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        read_roots(ca)?,
                        provider(),
                    )
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                    builder.with_client_cert_verifier(verifier)
                }
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(identity);
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Self {
                config: Arc::new(config),
                refusals: Arc::default(),
            })
        }

        /// The same acceptor offering other application protocols (e.g. `h2` for gRPC).
        pub fn with_alpn(&self, alpn: &[&[u8]]) -> Self {
            let mut config = (*self.config).clone();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Self {
                config: Arc::new(config),
                refusals: self.refusals.clone(),
            }
        }

        /// The server side of a handshake over `tcp` from `peer`, within `timeout`. A
        /// connection whose first byte is not a TLS handshake record is answered `400` in
        /// plain HTTP and closed, with a log line (at most one each 10 s); failed handshakes
        /// are logged the same way. Both are counted in `stats` (`tls_refused_plain`,
        /// `tls_handshakes_failed`).
        pub async fn handshake(
            &self,
            tcp: TcpStream,
            peer: SocketAddr,
            timeout: Duration,
            stats: &crate::serve::ServeStats,
        ) -> Result<ServerTlsStream<TcpStream>, HandshakeError> {
            let result = tokio::time::timeout(timeout, self.handshake_inner(tcp, stats)).await;
            let result = result.unwrap_or(Err(HandshakeError::Timeout));
            if let Err(error) = &result {
                if !matches!(error, HandshakeError::Plain) {
                    stats.tls_handshakes_failed.inc();
                }
                let due = crate::sync::lock(&self.refusals).due();
                if let Some(count) = due {
                    match error {
                        HandshakeError::Plain => tracing::warn!(
                            %peer,
                            count,
                            "plain (non-TLS) connection on a TLS listener refused: the client \
                             must use wss:// or https://"
                        ),
                        error => tracing::info!(%peer, count, %error, "TLS handshake failed"),
                    }
                }
            }
            result
        }

        async fn handshake_inner(
            &self,
            tcp: TcpStream,
            stats: &crate::serve::ServeStats,
        ) -> Result<ServerTlsStream<TcpStream>, HandshakeError> {
            let mut first = [0u8; 1];
            let n = tcp.peek(&mut first).await.map_err(HandshakeError::Failed)?;
            // 0x16: a TLS handshake record (the ClientHello).
            if n == 1 && first[0] != 0x16 {
                // Counted before the answer, so whoever reads it finds it counted.
                stats.tls_refused_plain.inc();
                crate::serve::refuse(&tcp, plain_refusal().as_bytes());
                return Err(HandshakeError::Plain);
            }
            tokio_rustls::TlsAcceptor::from(self.config.clone())
                .accept(tcp)
                .await
                .map_err(HandshakeError::Failed)
        }
    }

    /// The end-entity certificate a client presented (verified against the listener's client
    /// CA), if it presented one.
    pub fn client_certificate(
        stream: &ServerTlsStream<TcpStream>,
    ) -> Option<Arc<CertificateDer<'static>>> {
        let (_, session) = stream.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| Arc::new(cert.clone().into_owned()))
    }

    /// Checks a link's client certificate against the URL the other end registered with: with
    /// mutual TLS on, it must have presented one naming that URL's host. The refusal says why.
    pub fn check_link_certificate(
        mtls: bool,
        cert: Option<&CertificateDer<'_>>,
        url: &str,
    ) -> Result<(), String> {
        if !mtls {
            return Ok(());
        }
        let host = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split(['/', '?'])
            .next()
            .unwrap_or_default();
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        };
        match cert {
            None => Err("mutual TLS: this link needs a client certificate signed by the cluster's CA (tls.cert, tls.key and tls.ca on the dialing server)".into()),
            Some(cert) if super::names_host(cert, host) => Ok(()),
            Some(_) => Err(format!(
                "mutual TLS: the client certificate does not name {host}, the host of the URL it registered with ({url})"
            )),
        }
    }
}

#[cfg(feature = "server")]
mod incoming {
    use std::time::Duration;

    use futures_util::Stream;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Semaphore, mpsc};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::{Acceptor, ServerTlsStream};

    /// Handshakes running at once on one [`incoming`] listener; further connections wait in
    /// the kernel's accept queue.
    const MAX_HANDSHAKES: usize = 256;

    /// The TLS connections accepted on `listener`, each handshake run in a task of its own
    /// (bounded in number and by `timeout`), for servers that take a stream of connections
    /// (tonic); refusals and failures counted in `stats`. Ends when `shutdown` is cancelled.
    pub fn incoming(
        listener: TcpListener,
        acceptor: Acceptor,
        timeout: Duration,
        stats: std::sync::Arc<crate::serve::ServeStats>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> impl Stream<Item = std::io::Result<ServerTlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(64);
        let spawner = tracker.clone();
        tracker.spawn(async move {
            let slots = std::sync::Arc::new(Semaphore::new(MAX_HANDSHAKES));
            loop {
                let slot = tokio::select! {
                    () = shutdown.cancelled() => return,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                };
                let (tcp, peer) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx, stats) = (acceptor.clone(), tx.clone(), stats.clone());
                spawner.spawn(async move {
                    // Refusals and failures are logged and counted by the acceptor.
                    if let Ok(tls) = acceptor.handshake(tcp, peer, timeout, &stats).await {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    drop(slot);
                });
            }
        });
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
    }
}

#[cfg(feature = "server")]
pub use incoming::incoming;

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    use super::*;

    /// A CA and certificates it signs, as PEM files in a directory removed on drop.
    pub(crate) struct TestPki {
        dir: PathBuf,
        issuer: Issuer<'static, KeyPair>,
        pub(crate) ca: PathBuf,
    }

    impl TestPki {
        pub(crate) fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "relaymesh-net-pki-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            let ca = dir.join("ca.pem");
            std::fs::write(&ca, cert.pem()).unwrap();
            Self {
                dir,
                issuer: Issuer::new(params, key),
                ca,
            }
        }

        /// Writes a certificate for `names` and its key as `<file>.pem`, `<file>.key`.
        pub(crate) fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let paths = (
                self.dir.join(format!("{file}.pem")),
                self.dir.join(format!("{file}.key")),
            );
            std::fs::write(&paths.0, cert.pem()).unwrap();
            std::fs::write(&paths.1, key.serialize_pem()).unwrap();
            paths
        }

        /// An identity for `127.0.0.1`.
        pub(crate) fn identity(&self) -> Arc<Identity> {
            let (cert, key) = self.issue("server", &["127.0.0.1"]);
            Identity::load(&cert, &key).unwrap()
        }

        pub(crate) fn connector(&self) -> Connector {
            Connector::new(Some(&self.ca), None).unwrap()
        }
    }

    impl Drop for TestPki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_rotation_keeps_the_old_pair_until_the_new_one_matches() {
        let pki = TestPki::new();
        let (cert, key) = pki.issue("live", &["old.test"]);
        let identity = Identity::load(&cert, &key).unwrap();
        assert!(!identity.reload_if_changed().unwrap(), "nothing changed");
        // The new certificate is written first: it does not match the old key yet.
        let (new_cert, new_key) = pki.issue("next", &["new.test"]);
        std::fs::copy(&new_cert, &cert).unwrap();
        assert!(
            identity.reload_if_changed().is_err(),
            "a mismatched pair was taken"
        );
        let current = identity.current();
        assert!(
            names_host(&current.cert[0], "old.test"),
            "the old pair stays"
        );
        std::fs::copy(&new_key, &key).unwrap();
        assert!(identity.reload_if_changed().unwrap());
        assert!(names_host(&identity.current().cert[0], "new.test"));
        assert_eq!(identity.reloads(), 1);
    }

    #[test]
    fn a_link_certificate_must_name_the_host_of_the_registered_url() {
        let pki = TestPki::new();
        let (cert, _) = pki.issue("peer", &["::1", "relay.example"]);
        let cert = read_certificates(&cert).unwrap().remove(0);
        let check = |url: &str| check_link_certificate(true, Some(&cert), url);
        assert!(check("wss://[::1]:7500").is_ok());
        assert!(check("wss://[::1]").is_ok());
        assert!(check("wss://relay.example/v1").is_ok());
        assert!(check("wss://relay.example:7500?x=1").is_ok());
        let other = check("wss://other.example:7500").unwrap_err();
        assert!(other.contains("does not name other.example"), "{other}");
        assert!(check("wss://user@relay.example:1").is_err());
        let none = check_link_certificate(true, None, "wss://relay.example:1").unwrap_err();
        assert!(none.contains("needs a client certificate"), "{none}");
        assert!(check_link_certificate(false, None, "wss://relay.example:1").is_ok());
    }

    #[test]
    fn a_key_file_without_a_key_is_named() {
        let pki = TestPki::new();
        let (cert, _) = pki.issue("a", &["a.test"]);
        let error = Identity::load(&cert, &cert).unwrap_err();
        assert!(matches!(error, TlsError::NoKey(_)), "{error}");
        let error = Identity::load(&pki.dir.join("missing.pem"), &cert).unwrap_err();
        assert!(error.to_string().contains("cannot read"), "{error}");
    }
}
