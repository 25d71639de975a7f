//! pipebridge: a gateway that runs on each host and makes local pipes reachable across
//! the network over TLS + WebSocket (`pipebridge.v1`).
//!
//! # Architecture
//! A gateway **exports** local pipe endpoints ([`server`]) and **hosts** local endpoints
//! that forward to pipes exported elsewhere ([`client`]). A session is one WebSocket on
//! one side and one local endpoint connection on the other; [`bridge`] is the only code
//! that moves its bytes. [`auth`] turns transport facts into an identity, [`config`]
//! parses and validates the TOML config, [`endpoint`] opens and hosts local pipes,
//! [`tunnel`] holds TLS setup and the wire protocol.
//!
//! # Glossary
//! - **pipe**: a named local IPC object; a `[[pipe]]` a gateway exports.
//! - **endpoint**: how a pipe is reached locally, `kind:target`.
//! - **export**: a pipe this gateway serves to the network.
//! - **forward**: a local endpoint this gateway hosts, bridged to a remote export.
//! - **peer**: the gateway or `pipebridge connect` at the far end of a tunnel.
//! - **identity**: who the remote client proved to be.
//! - **principal**: the local account an identity maps to.
//! - **session**: one tunnel plus one local endpoint connection.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod bridge;
pub mod cli;
pub mod client;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod identity;
pub mod logfmt;
pub mod metrics;
pub mod pki;
pub mod platform;
pub mod sd_notify;
pub mod server;
pub mod shard;
pub mod tunnel;
