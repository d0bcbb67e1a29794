//! Shared runtime pieces for the relaymesh services and client.
//!
//! Everything here is protocol-agnostic plumbing that the coordinator, the comm server and the
//! client library would otherwise each write again: serving HTTP with WebSocket upgrades from an
//! already-bound listener ([`http`]), dialing and accepting WebSockets with size limits and
//! `TCP_NODELAY` ([`ws`]), the batched link writer every link uses ([`link`]) and its WebSocket frame reader
//! ([`frames`]),
//! heartbeat watchdogs ([`heartbeat`]), reconnect backoff ([`retry`]), process shutdown
//! ([`shutdown`]), Prometheus text ([`metrics`]), process CPU and memory ([`procstat`]), config files ([`config`]), service URLs ([`url`]), lock helpers ([`sync`]) and logging
//! ([`logging`]).

pub mod auth;
pub mod config;
pub mod frames;
pub mod heartbeat;
pub mod http;
pub mod limits;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod procstat;
pub mod retry;
pub mod shutdown;
pub mod sync;
pub mod url;
pub mod wire;
pub mod ws;
