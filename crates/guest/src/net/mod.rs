//! Networking (ABI 1.4): a driver for the VMM's network interfaces and TCP/IP over it.
//!
//! - [`Nic`]: one interface's TX and RX rings of frame descriptors, registered with
//!   `NET_SETUP`. Frames are queued in batches and the doorbell port (an ioeventfd, no exit)
//!   rings once per batch; received frames are taken from the RX ring and their buffers posted
//!   again. Nothing the VMM writes is used unchecked: lengths are checked against the guest's
//!   own buffers, indices against the ring size.
//! - [`Stack`]: an IPv4 interface and its sockets (smoltcp) over a NIC, run as a dispatcher
//!   [`Source`](crate::dispatch::Source): polled every round, it asks the VMM for a wake-up
//!   when frames arrive while the vCPU blocks, and bounds the block by its next TCP timer.
//! - [`TcpListener`] and [`TcpStream`]: async TCP for the dispatcher's tasks.
//! - [`NicDevice`]: the NIC as a `smoltcp::phy::Device`, for guests that use smoltcp directly.
//!
//! A VM has network interfaces only when `rebound run` is given `--publish
//! [ADDR:]HOST_PORT[:GUEST_PORT]` (the user-mode backend: the guest is 10.0.2.15/24, gateway
//! 10.0.2.2), `--tap NAME` or `--mac MAC`. Without one, [`nics`] is empty and
//! [`Nic::setup`] fails with `ENODEV`; nothing else in this module can be reached without a
//! `Nic`.
//!
//! Errors: setting up a NIC returns an [`Errno`]; the stack and TCP return [`Error`], see
//! each variant for which calls return it.
//!
//! A TCP echo server:
//!
//! ```no_run
//! use rebound_guest::dispatch::Dispatcher;
//! use rebound_guest::net::{Error, Ipv4Addr, Nic, Stack, TcpListener};
//!
//! fn serve() -> Result<(), Error> {
//!     let nic = Nic::setup(0, 256, 256)?; // ENODEV without --publish or --tap
//!     let gateway = Some(Ipv4Addr::new(10, 0, 2, 2));
//!     let stack = Stack::new(nic, Ipv4Addr::new(10, 0, 2, 15), 24, gateway)?;
//!     let listener = TcpListener::bind(&stack, 7)?;
//!     let mut d = Dispatcher::new();
//!     d.add_source(stack.clone()); // without it, no frame moves
//!     let spawner = d.spawner();
//!     d.spawn(async move {
//!         while let Ok(conn) = listener.accept().await {
//!             spawner.spawn(async move {
//!                 let mut buf = [0u8; 2048];
//!                 while let Ok(n @ 1..) = conn.read(&mut buf).await {
//!                     if conn.write_all(&buf[..n]).await.is_err() {
//!                         break;
//!                     }
//!                 }
//!                 conn.close();
//!             });
//!         }
//!     });
//!     d.run(); // until the host asks for a shutdown
//!     Ok(())
//! }
//! # serve().unwrap();
//! ```

mod nic;
mod ring;
mod stack;
mod tcp;

pub use core::net::Ipv4Addr;

/// The TCP/IP stack the SDK uses (for guests that drive it themselves through [`NicDevice`]).
pub use smoltcp;

pub use nic::{Nic, RxFrame, nics};
pub use ring::{NicStats, SendError};
pub use stack::{NicDevice, RxToken, Stack, StackStats, TxToken};
pub use tcp::{CONNECT_TIMEOUT_NS, DEFAULT_BACKLOG, TcpListener, TcpStream};

use crate::hypercall::Errno;

/// Why a network operation failed. `Display` says it in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The VMM found the NIC's rings corrupt and stopped using them (`RING_BROKEN`); every
    /// connection was aborted. [`Stack::reset`] sets the rings up again. Any TCP call (accept,
    /// connect, read, write, flush) returns it from then on.
    RingBroken,
    /// The peer refused the connection ([`TcpStream::connect`]: a reset answered the SYN).
    ConnectionRefused,
    /// The connection was not established in time ([`TcpStream::connect`]: no answer to ARP
    /// or to the SYN within [`CONNECT_TIMEOUT_NS`] or the given timeout).
    TimedOut,
    /// The connection was reset by the peer, timed out (30 s without acknowledgements), or
    /// was aborted ([`TcpStream`] reads, writes and flushes).
    ConnectionReset,
    /// This side closed the connection ([`TcpStream::close`]): nothing more can be written.
    Closed,
    /// An address, prefix or port that cannot be used: [`Stack::new`] with an unspecified,
    /// multicast or broadcast address or a prefix over 32; [`TcpListener::bind`] or
    /// [`TcpStream::connect`] with port 0; a connect to such an address.
    InvalidAddress,
    /// Another listener of this stack has the port ([`TcpListener::bind`]).
    AddressInUse,
    /// A hypercall failed (from [`Nic::setup`] through `?`; see [`Errno`]).
    Hypercall(Errno),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::RingBroken => f.write_str("the VMM stopped using the NIC's rings (broken)"),
            Error::ConnectionRefused => f.write_str("connection refused"),
            Error::TimedOut => f.write_str("connection timed out"),
            Error::ConnectionReset => f.write_str("connection reset"),
            Error::Closed => f.write_str("connection closed by this side"),
            Error::InvalidAddress => f.write_str("invalid address or port"),
            Error::AddressInUse => f.write_str("port already in use"),
            Error::Hypercall(e) => write!(f, "hypercall failed: {e}"),
        }
    }
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Self {
        Error::Hypercall(e)
    }
}

/// A static IPv4 configuration, e.g. from the command line ([`from_args`](Self::from_args)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Config {
    /// The interface's address.
    pub addr: Ipv4Addr,
    /// Its prefix length (24 for a /24).
    pub prefix: u8,
    /// The default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

impl Ipv4Config {
    /// Reads `ip=A.B.C.D/P` and `gw=A.B.C.D` from a command line (other words are ignored).
    /// None without a valid `ip=`; a `gw=` that does not parse is ignored.
    ///
    /// ```
    /// use rebound_guest::net::{Ipv4Addr, Ipv4Config};
    ///
    /// let c = Ipv4Config::from_args("serve ip=10.0.2.15/24 gw=10.0.2.2").unwrap();
    /// assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
    /// assert_eq!((c.prefix, c.gateway), (24, Some(Ipv4Addr::new(10, 0, 2, 2))));
    /// assert_eq!(Ipv4Config::from_args("ip=10.0.2.15"), None); // no prefix
    /// ```
    pub fn from_args(args: &str) -> Option<Ipv4Config> {
        let value = |key: &str| {
            args.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let (addr, prefix) = value("ip")?.split_once('/')?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        Some(Ipv4Config {
            addr: addr.parse().ok()?,
            prefix,
            gateway: value("gw").and_then(|g| g.parse().ok()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_config_from_the_command_line() {
        let c = Ipv4Config::from_args("net-echo 7 ip=10.0.2.15/24 gw=10.0.2.2").unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.prefix, 24);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        let c = Ipv4Config::from_args("ip=192.168.1.2/16").unwrap();
        assert_eq!((c.prefix, c.gateway), (16, None));
        assert_eq!(Ipv4Config::from_args("ip=10.0.2.15"), None);
        assert_eq!(Ipv4Config::from_args("ip=10.0.2.15/33"), None);
        assert_eq!(Ipv4Config::from_args("ip=10.0.2/24"), None);
        assert_eq!(Ipv4Config::from_args("zip=10.0.2.15/24"), None);
    }
}
