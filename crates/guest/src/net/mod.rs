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
//! A TCP echo server:
//!
//! ```ignore
//! let nic = Nic::setup(0, 256, 256)?;
//! let stack = Stack::new(nic, Ipv4Addr::new(10, 0, 2, 15), 24, None)?;
//! let mut d = Dispatcher::new();
//! d.add_source(stack.clone());
//! let spawner = d.spawner();
//! d.spawn(async move {
//!     let listener = TcpListener::bind(&stack, 7).unwrap();
//!     while let Ok(conn) = listener.accept().await {
//!         spawner.spawn(async move {
//!             let mut buf = [0u8; 2048];
//!             while let Ok(n @ 1..) = conn.read(&mut buf).await {
//!                 if conn.write_all(&buf[..n]).await.is_err() {
//!                     break;
//!                 }
//!             }
//!             conn.close();
//!         });
//!     }
//! });
//! d.run();
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

/// Why a network operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The VMM found the NIC's rings corrupt and stopped using them (`RING_BROKEN`); every
    /// connection was aborted. [`Stack::reset`] sets the rings up again.
    RingBroken,
    /// The peer refused the connection.
    ConnectionRefused,
    /// The connection was not established in time (no answer to ARP or to the SYN).
    TimedOut,
    /// The connection was reset by the peer, timed out, or was aborted.
    ConnectionReset,
    /// This side closed the connection: nothing more can be written.
    Closed,
    /// An address, prefix or port that cannot be used (unspecified, zero, out of range).
    InvalidAddress,
    /// Another listener has the port.
    AddressInUse,
    /// A hypercall failed.
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

/// A static IPv4 configuration.
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
