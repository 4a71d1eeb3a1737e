//! Async TCP for dispatcher tasks: listeners with a backlog, streams, outgoing connections.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::future::poll_fn;
use core::net::Ipv4Addr;
use core::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError, State};
use smoltcp::wire::IpAddress;

use super::Error;
use super::stack::{Listener, Stack};

/// How long [`TcpStream::connect`] waits for the connection to be established, in
/// nanoseconds (30 s).
pub const CONNECT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Connections a listener keeps listening for at once, by default.
pub const DEFAULT_BACKLOG: usize = 8;

/// A listening TCP port. Keeps `backlog` sockets listening, so that many clients can connect
/// at once; [`accept`](Self::accept) hands out established connections and puts a fresh
/// socket in their place. Several tasks may accept on one listener.
pub struct TcpListener {
    stack: Rc<Stack>,
    id: usize,
    port: u16,
}

impl TcpListener {
    /// Listens on `port` with [`DEFAULT_BACKLOG`]. Errors: `InvalidAddress` for port 0,
    /// `AddressInUse` if another listener of this stack has the port. Dropping the listener
    /// stops listening (connections not yet accepted get a reset).
    pub fn bind(stack: &Rc<Stack>, port: u16) -> Result<TcpListener, Error> {
        Self::bind_with_backlog(stack, port, DEFAULT_BACKLOG)
    }

    /// Listens on `port`, keeping `backlog` (at least 1) sockets listening: how many clients
    /// can be connecting at the same moment. Errors as for [`bind`](Self::bind).
    pub fn bind_with_backlog(
        stack: &Rc<Stack>,
        port: u16,
        backlog: usize,
    ) -> Result<TcpListener, Error> {
        if port == 0 {
            return Err(Error::InvalidAddress);
        }
        let mut inner = stack.inner.borrow_mut();
        if inner.listeners.iter().flatten().any(|l| l.port == port) {
            return Err(Error::AddressInUse);
        }
        let mut handles = Vec::with_capacity(backlog.max(1));
        for _ in 0..backlog.max(1) {
            let mut s = inner.new_socket();
            s.listen(port).map_err(|_| Error::InvalidAddress)?;
            handles.push(inner.sockets.add(s));
        }
        let listener = Listener {
            port,
            backlog: handles,
            waiters: Vec::new(),
        };
        let id = match inner.listeners.iter().position(Option::is_none) {
            Some(free) => {
                inner.listeners[free] = Some(listener);
                free
            }
            None => {
                inner.listeners.push(Some(listener));
                inner.listeners.len() - 1
            }
        };
        Ok(TcpListener {
            stack: stack.clone(),
            id,
            port,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next established connection (one whose client already closed its side
    /// counts: its data is still there to read). Errors: `RingBroken` once the VMM stopped
    /// using the NIC's rings (see [`Stack::reset`](super::Stack::reset)).
    pub async fn accept(&self) -> Result<TcpStream, Error> {
        poll_fn(|cx| {
            self.stack.check()?;
            let mut inner = self.stack.inner.borrow_mut();
            let inner = &mut *inner;
            let Some(l) = inner.listeners.get(self.id).and_then(Option::as_ref) else {
                return Poll::Ready(Err(Error::Closed));
            };
            let ready = l.backlog.iter().position(|&h| {
                matches!(
                    inner.sockets.get::<tcp::Socket>(h).state(),
                    State::Established | State::CloseWait
                )
            });
            if let Some(i) = ready {
                let mut fresh = inner.new_socket();
                let listening = fresh.listen(self.port);
                let fresh = inner.sockets.add(fresh);
                let l = inner.listeners[self.id].as_mut().expect("checked above");
                let handle = core::mem::replace(&mut l.backlog[i], fresh);
                if listening.is_err() {
                    // Cannot happen for a new socket and a non-zero port; the housekeeping
                    // would retry it anyway.
                    l.backlog.swap_remove(i);
                }
                self.stack.count_accepted();
                return Poll::Ready(Ok(TcpStream {
                    stack: self.stack.clone(),
                    handle,
                }));
            }
            let l = inner.listeners[self.id].as_mut().expect("checked above");
            if !l.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                l.waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let mut inner = self.stack.inner.borrow_mut();
        if let Some(l) = inner.listeners.get_mut(self.id).and_then(Option::take) {
            for h in l.backlog {
                // Half-open connections get a reset.
                inner.sockets.get_mut::<tcp::Socket>(h).abort();
                let now = self.stack.now();
                inner.orphan(h, now);
            }
            l.waiters.into_iter().for_each(|w| w.wake());
        }
        self.stack.touch();
    }
}

/// A TCP connection. Reads and writes take `&self`, so one task may read while another
/// writes (each direction wakes one waiting task). Dropping it closes the connection
/// gracefully (a FIN after the data written); the socket is freed once closed.
pub struct TcpStream {
    stack: Rc<Stack>,
    handle: SocketHandle,
}

impl TcpStream {
    /// Connects to `addr`:`port` from an ephemeral port (49152 to 65535). Errors:
    /// `InvalidAddress` for port 0 or an unspecified, broadcast or multicast address,
    /// `ConnectionRefused` if the peer refuses, `TimedOut` if it is not established within
    /// [`CONNECT_TIMEOUT_NS`], `RingBroken`.
    pub async fn connect(stack: &Rc<Stack>, addr: Ipv4Addr, port: u16) -> Result<TcpStream, Error> {
        Self::connect_timeout(stack, addr, port, CONNECT_TIMEOUT_NS).await
    }

    /// [`connect`](Self::connect), giving up after `timeout_ns` nanoseconds (checked on the
    /// stack's polls, at least every 100 ms).
    pub async fn connect_timeout(
        stack: &Rc<Stack>,
        addr: Ipv4Addr,
        port: u16,
        timeout_ns: u64,
    ) -> Result<TcpStream, Error> {
        stack.check()?;
        if port == 0 || addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(Error::InvalidAddress);
        }
        let handle = {
            let mut inner = stack.inner.borrow_mut();
            let mut s = inner.new_socket();
            let local = inner.ephemeral_port();
            inner.connect(&mut s, addr, port, local)?;
            let h = inner.sockets.add(s);
            let deadline = stack.now().saturating_add(timeout_ns);
            inner.connect_deadline(h, deadline);
            h
        };
        stack.touch();
        // Owned from here: a connect that is given up closes its socket.
        let stream = TcpStream {
            stack: stack.clone(),
            handle,
        };
        poll_fn(|cx| {
            stream.stack.check()?;
            let state = stream.with(|s| {
                s.register_send_waker(cx.waker());
                s.state()
            });
            match state {
                State::SynSent | State::SynReceived => Poll::Pending,
                State::Closed if stream.stack.inner.borrow_mut().timed_out(stream.handle) => {
                    Poll::Ready(Err(Error::TimedOut))
                }
                State::Closed => Poll::Ready(Err(Error::ConnectionRefused)),
                _ => Poll::Ready(Ok(())),
            }
        })
        .await?;
        stack.count_connected();
        Ok(stream)
    }

    fn with<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        f(self
            .stack
            .inner
            .borrow_mut()
            .sockets
            .get_mut::<tcp::Socket>(self.handle))
    }

    /// Reads what has arrived into `buf`, waiting for at least one byte: how many bytes were
    /// read, `Ok(0)` once the peer closed its side and everything was read (or for an empty
    /// `buf`). Errors: `ConnectionReset` (reset, timed out or aborted), `RingBroken`.
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        poll_fn(|cx| {
            self.stack.check()?;
            let r = self.with(|s| match s.recv_slice(buf) {
                Ok(0) => {
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                Ok(n) => Poll::Ready(Ok(n)),
                Err(RecvError::Finished) => Poll::Ready(Ok(0)),
                Err(RecvError::InvalidState) => Poll::Ready(Err(Error::ConnectionReset)),
            });
            if matches!(r, Poll::Ready(Ok(1..))) {
                // The receive window opened: the peer may need to hear about it.
                self.stack.touch();
            }
            r
        })
        .await
    }

    /// Queues some of `buf` for sending, waiting for room in the send buffer: how many bytes
    /// were queued (at least one, unless `buf` is empty). Errors: `Closed` after
    /// [`close`](Self::close), `ConnectionReset`, `RingBroken`.
    pub async fn write(&self, buf: &[u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        poll_fn(|cx| {
            self.stack.check()?;
            let r = self.with(|s| {
                if !s.may_send() {
                    return Poll::Ready(Err(match s.state() {
                        State::Closed | State::TimeWait => Error::ConnectionReset,
                        _ => Error::Closed,
                    }));
                }
                match s.send_slice(buf) {
                    Ok(0) => {
                        s.register_send_waker(cx.waker());
                        Poll::Pending
                    }
                    Ok(n) => Poll::Ready(Ok(n)),
                    Err(_) => Poll::Ready(Err(Error::ConnectionReset)),
                }
            });
            if matches!(r, Poll::Ready(Ok(_))) {
                self.stack.touch();
            }
            r
        })
        .await
    }

    /// Queues all of `buf` for sending (waiting for room as needed); errors as for
    /// [`write`](Self::write). Queued is not sent: [`flush`](Self::flush) waits for the
    /// peer's acknowledgement.
    pub async fn write_all(&self, mut buf: &[u8]) -> Result<(), Error> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Waits until the peer acknowledged everything written. Errors: `ConnectionReset` if the
    /// connection closed with data unacknowledged, `RingBroken`.
    pub async fn flush(&self) -> Result<(), Error> {
        poll_fn(|cx| {
            self.stack.check()?;
            self.with(|s| {
                if s.send_queue() == 0 {
                    Poll::Ready(Ok(()))
                } else if !s.is_open() {
                    Poll::Ready(Err(Error::ConnectionReset))
                } else {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
            })
        })
        .await
    }

    /// Closes this side: a FIN follows the data already written. Reading goes on until the
    /// peer closes too.
    pub fn close(&self) {
        self.with(|s| s.close());
        self.stack.touch();
    }

    /// Drops the connection at once (the peer gets a reset).
    pub fn abort(&self) {
        self.with(|s| s.abort());
        self.stack.touch();
    }

    /// The peer's address and port (None once closed).
    pub fn peer(&self) -> Option<(Ipv4Addr, u16)> {
        self.with(|s| {
            s.remote_endpoint().and_then(|e| match e.addr {
                IpAddress::Ipv4(a) => Some((a, e.port)),
                #[allow(unreachable_patterns)] // with smoltcp's IPv6 enabled elsewhere
                _ => None,
            })
        })
    }

    /// The local port.
    pub fn local_port(&self) -> u16 {
        self.with(|s| s.local_endpoint().map_or(0, |e| e.port))
    }

    /// Whether the connection is still open in some direction.
    pub fn is_open(&self) -> bool {
        self.with(|s| s.is_open())
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let now = self.stack.now();
        let mut inner = self.stack.inner.borrow_mut();
        let s = inner.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.state() == State::Closed {
            inner.forget(self.handle);
            return;
        }
        s.close();
        inner.orphan(self.handle, now);
        drop(inner);
        self.stack.touch();
    }
}
