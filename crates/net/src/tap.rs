//! A TAP device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`): frames to and from the host's network
//! stack, for real deployments. The device is named by the operator (created beforehand, e.g.
//! `ip tuntap add tap0 mode tap`, as Firecracker expects), so it outlives the VMM: a recovered
//! or live-updated VMM opens it again by name.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use rebound_devices::net::Backend;

/// A TAP device opened for one NIC.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates, if this process may) the TAP device `name`, non-blocking.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("host_dev_name {name:?}: 1 to {} bytes", libc::IFNAMSIZ - 1),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq we own (NUL-terminated name, flags); the result is
        // checked.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot attach to TAP device {name}: {e}"),
            ));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Whether the host interface `name` is up with a carrier (`/sys/class/net/NAME`).
pub fn carrier(name: &str) -> bool {
    let p = format!("/sys/class/net/{name}/carrier");
    std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "1")
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A TAP write is one frame, whole or not at all.
        self.file.write(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn buffered(&self) -> bool {
        false
    }

    fn service(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn link_up(&self) -> bool {
        carrier(&self.name)
    }

    fn failovers(&self) -> u64 {
        0
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }
}
