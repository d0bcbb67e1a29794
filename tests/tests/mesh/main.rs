//! End-to-end tests of relaymesh: whole clusters on 127.0.0.1 with port 0.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod accounts;
mod admin;
mod backend;
mod bad_input;
mod batches;
mod cli;
mod cluster;
mod console;
mod coordinators;
mod dispatch;
mod failover;
mod history;
mod http;
mod keys;
mod nodes;
mod ops;
mod peer_links;
mod processes;
mod readme;
mod relay;
mod slow;
mod storm;
mod tls;
mod trust;
