//! Shared runtime pieces for the relaymesh services and client.
//!
//! Everything here is protocol-agnostic plumbing that the coordinator, the comm server and the
//! client library would otherwise each write again. A client needs only the part built without
//! features: dialing WebSockets with size limits and `TCP_NODELAY` ([`ws`]), the link driver,
//! writer and reader every link runs on ([`link`], with the frame reader [`frames`] and the
//! wire format [`wire`]), heartbeat watchdogs ([`heartbeat`]), the links' queues ([`queue`]), reconnect backoff ([`retry`]),
//! service URLs ([`url`]), TLS ([`tls`]: trust, certificates reloaded on change and, with
//! `server`, the listening side), Ed25519 key files ([`keys`]), the small HTTP client ([`http`]) and
//! lock helpers ([`sync`]). Feature `server` adds the services' side: serving HTTP from an
//! already-bound listener (`serve`), accepting WebSockets (`accept`), link trust (`auth`), config
//! files (`config`), address limits (`limits`), Prometheus text (`metrics`), process CPU and
//! memory (`procstat`) and shutdown (`shutdown`); feature `logging` the log setup (`logging`).

// What a client needs: dialing, links, key files, the HTTP client.
pub mod frames;
pub mod heartbeat;
pub mod http;
pub mod keys;
pub mod link;
pub mod queue;
pub mod retry;
pub mod sync;
pub mod tls;
pub mod url;
pub mod wire;
pub mod ws;

// The server side: serving HTTP and accepting WebSockets, link trust, config files, limits,
// metrics, process figures and shutdown.
#[cfg(feature = "server")]
pub mod accept;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod procstat;
#[cfg(feature = "server")]
pub mod serve;
#[cfg(feature = "server")]
pub mod shutdown;

#[cfg(feature = "logging")]
pub mod logging;
