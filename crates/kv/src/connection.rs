//! One client's protocol state: bytes in, replies out.

use alloc::vec::Vec;

use crate::commands::{self, Client, Ctx};
use crate::parse::{Parsed, Parser};
use crate::resp;
use crate::store::Store;

/// Default bound on one request's buffered arguments ([`Connection::with_max_request`]).
pub const DEFAULT_MAX_REQUEST: usize = 4 * 1024 * 1024;

/// When `out` holds this many bytes, [`Connection::feed`] stops executing and keeps the rest
/// of its input for the next call, so that many small requests for big values (pipelined
/// `GET`s) cannot make one call produce replies without bound.
pub const OUTPUT_HIGH_WATER: usize = 1024 * 1024;

/// Whether the connection stays open after [`Connection::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Keep reading.
    Open,
    /// Send what is in `out`, then close: after `QUIT`, or after a protocol error (whose
    /// reply is the last thing in `out`), as Redis does. Later calls ignore their input.
    Close,
}

/// Per-client protocol state: the partial request and the client's name and id.
pub struct Connection {
    parser: Parser,
    client: Client,
    /// Input received while `out` was over [`OUTPUT_HIGH_WATER`], not yet parsed.
    backlog: Vec<u8>,
    closed: bool,
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

impl Connection {
    /// A new client whose requests may each buffer up to [`DEFAULT_MAX_REQUEST`] bytes.
    pub fn new() -> Self {
        Self::with_max_request(DEFAULT_MAX_REQUEST)
    }

    /// A new client whose requests may each buffer up to `max_bytes` of arguments (plus a small
    /// per-argument overhead). A longer request is refused as soon as its declared lengths
    /// pass the bound, before its bytes arrive: an error reply, then [`Status::Close`].
    /// Inline requests and header lines are bounded separately (64 KiB, as in Redis), bulk
    /// strings by 512 MiB (`-ERR Protocol error: invalid bulk length`).
    pub fn with_max_request(max_bytes: usize) -> Self {
        Connection {
            parser: Parser::new(max_bytes),
            client: Client::default(),
            backlog: Vec::new(),
            closed: false,
        }
    }

    /// Takes bytes as they arrive from the socket, in any split: runs every request they
    /// complete against `store` (at time `now_ms`), appends each reply to `out`, keeps an
    /// incomplete request for the next call. Never panics, whatever the input.
    ///
    /// Once `out` holds [`OUTPUT_HIGH_WATER`] bytes, the remaining input is kept unparsed
    /// ([`Connection::has_backlog`]): send `out`, then call again (with new input or none)
    /// before reading more from the socket.
    pub fn feed(
        &mut self,
        input: &[u8],
        store: &mut Store,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Status {
        if self.closed {
            return Status::Close;
        }
        if self.client.id == 0 {
            self.client.id = store.new_client_id();
        }
        if self.backlog.is_empty() {
            self.run(input, store, now_ms, out)
        } else {
            let mut data = core::mem::take(&mut self.backlog);
            data.extend_from_slice(input);
            self.run(&data, store, now_ms, out)
        }
    }

    /// Whether input is kept unparsed because `out` was full: call [`Connection::feed`] again
    /// (after sending `out`) before reading more.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Bytes held for an incomplete request and the backlog.
    pub fn buffered(&self) -> usize {
        self.parser.buffered() + self.backlog.len()
    }

    fn run(&mut self, data: &[u8], store: &mut Store, now_ms: u64, out: &mut Vec<u8>) -> Status {
        let mut pos = 0;
        while pos < data.len() {
            if out.len() >= OUTPUT_HIGH_WATER {
                self.backlog.extend_from_slice(&data[pos..]);
                break;
            }
            match self.parser.next(data, &mut pos) {
                None => break,
                Some(Parsed::Error(msg)) => {
                    let mut line = Vec::from(&b"ERR "[..]);
                    line.extend_from_slice(msg.as_bytes());
                    resp::error(out, &line);
                    return self.close();
                }
                Some(Parsed::Command(args)) => {
                    let mut cx = Ctx {
                        store,
                        now: now_ms,
                        out,
                        client: &mut self.client,
                        close: false,
                    };
                    commands::execute(&mut cx, args);
                    if cx.close {
                        return self.close();
                    }
                }
            }
        }
        Status::Open
    }

    fn close(&mut self) -> Status {
        self.closed = true;
        self.backlog = Vec::new();
        Status::Close
    }
}
