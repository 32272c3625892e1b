//! Shared pieces of RingKV: everything that crosses a process boundary lives here.
//!
//! # Layout
//! - [`types`]: newtypes for node ids and versions, node states and stats.
//! - [`protocol`]: the envelope, the handshake and the request/response enums.
//! - [`codec`]: the frame codec (length, CRC32, MessagePack), the one chokepoint for bytes.
//! - [`wire_fast`]: the codec's hand-written path for the data path's messages.
//! - [`error`]: the typed errors that cross the wire, classified by whether they may have applied.
//! - [`ring`]: the consistent-hash ring with virtual nodes.
//! - [`server`]: the per-connection loop shared by the node and the coordinator (handshake, pipelining).
//! - [`client`]: a pipelining client over one connection.
//! - [`cluster_token`]: the secret that lets only the coordinator and its nodes take peer roles.
//! - [`config`]: parsers shared by the binaries' flags.
//! - [`signals`]: SIGTERM and ctrl-c as a shutdown token.
//! - [`process`]: finding local processes by their command line.
//! - [`dir_lock`]: the exclusive lock a process holds on its data directory.
//! - [`durable_file`]: small files replaced whole and durably, and directory syncs.
//! - [`runtime`]: the server binaries' async runtime and its worker count.
//! - [`sync`]: locks that are taken even after a panic poisoned them.
//! - [`file_range`]: a byte range of a file walked in pieces of bounded length.
//! - [`write_ahead`]: files kept written ahead in zeros, so that syncing them is cheap.

pub mod client;
pub mod cluster_token;
pub mod codec;
pub mod config;
pub mod dir_lock;
pub mod durable_file;
pub mod error;
pub mod file_range;
pub mod id_hash;
pub mod process;
pub mod protocol;
pub mod ring;
pub mod runtime;
pub mod server;
pub mod signals;
pub mod sync;
pub mod types;
pub mod wire_fast;
pub mod write_ahead;

pub use config::{duration_arg, parse_duration, parse_period};
pub use error::WireError;
pub use types::{NodeId, NodeState, NodeStats, Version};

/// Default address of the coordinator, for clients and `ringkv-coordinator --listen`.
pub const DEFAULT_COORDINATOR_ADDR: &str = "127.0.0.1:7400";
