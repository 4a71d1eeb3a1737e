//! The engine of Rebound's bundled `kv` guest: an in-memory key-value server speaking the
//! Redis protocol, without the networking.
//!
//! - [`Store`]: the data (byte-string keys and values, optional expiry times, a memory budget).
//! - [`Connection`]: one client's protocol state. The server feeds it the bytes read from the
//!   socket and sends what it appends to `out`:
//!
//! ```
//! use rebound_kv::{Connection, Status, Store};
//!
//! let mut store = Store::with_limit(64 << 20);
//! let mut conn = Connection::new();
//! let mut out = Vec::new();
//! // Requests may arrive split anywhere and pipelined.
//! assert_eq!(conn.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1", &mut store, 0, &mut out), Status::Open);
//! assert_eq!(conn.feed(b"\r\nv\r\nGET k\r\n", &mut store, 0, &mut out), Status::Open);
//! assert_eq!(out, b"+OK\r\n$1\r\nv\r\n");
//! // The server's timer: drop expired keys, a bounded number per tick.
//! store.expire_some(1_000, 100);
//! ```
//!
//! `no_std` with `alloc`; no I/O and no clock: the caller passes the time (milliseconds, any
//! monotonic origin) with each call. Replies are RESP2 and follow Redis 7.0 (types, error
//! messages, option rules).
//!
//! # Commands
//!
//! Names are case-insensitive; arity errors, option rules and error messages are Redis's.
//!
//! - Strings: `GET`, `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`,
//!   `SETNX`, `SETEX`, `PSETEX`, `GETSET`, `GETDEL`, `MGET`, `MSET`, `APPEND`, `STRLEN`,
//!   `INCR`, `INCRBY`, `DECR`, `DECRBY`.
//! - Keys: `DEL`, `UNLINK`, `EXISTS`, `TYPE`, `KEYS pattern` (Redis globs), `DBSIZE`,
//!   `FLUSHALL`/`FLUSHDB [ASYNC|SYNC]`.
//! - Expiry: `EXPIRE`, `PEXPIRE`, `EXPIREAT`, `PEXPIREAT` (with `NX|XX|GT|LT`), `TTL`, `PTTL`,
//!   `EXPIRETIME`, `PEXPIRETIME`, `PERSIST`.
//! - Connection and server: `PING`, `ECHO`, `SELECT 0` (one database), `AUTH` (no password is
//!   set), `HELLO [2]` (RESP2 only: `HELLO 3` gets `-NOPROTO`), `CLIENT ID|GETNAME|SETNAME|
//!   SETINFO|HELP`, `INFO [section ...]`, `COMMAND [COUNT|DOCS|INFO|LIST|HELP]` (`DOCS` is
//!   empty), `CONFIG GET pattern ...` (a few parameters: `save`, `appendonly`, `maxmemory`,
//!   ...), `CONFIG RESETSTAT`, `RESET`, `QUIT`.
//!
//! Values are strings only (no lists, hashes, sets; no transactions, pub/sub, scripting or
//! persistence): other commands get Redis's unknown-command error.
//!
//! # Limits
//!
//! - A request's arguments: [`DEFAULT_MAX_REQUEST`] bytes ([`Connection::with_max_request`]);
//!   a bulk string: [`MAX_BULK`]; an inline request or header line: [`MAX_INLINE`]. Past them
//!   the client gets a protocol error and the connection closes, as in Redis.
//! - The store: [`Store::with_limit`] (keys + values + [`ENTRY_OVERHEAD`] per key); a write
//!   that would go over gets `-OOM`.
//! - Output: [`OUTPUT_HIGH_WATER`] ([`Connection::has_backlog`]).

#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod commands;
mod connection;
mod glob;
mod parse;
mod resp;
mod store;

pub use commands::REDIS_VERSION;
pub use connection::{Connection, DEFAULT_MAX_REQUEST, OUTPUT_HIGH_WATER, Status};
pub use parse::{MAX_BULK, MAX_INLINE};
pub use store::{ENTRY_OVERHEAD, Store};

#[cfg(test)]
mod tests;
