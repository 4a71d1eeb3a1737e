//! A userfaultfd over guest memory: in write-protect mode the kernel stops the first write to a
//! protected page (by the guest through KVM, or by a VMM thread) until the handler has seen it;
//! in missing mode it stops the first touch of a page that is not there (a page the host moved
//! out: `swap`) until the handler has put it back. Only the raw syscalls live here; the undo
//! log is in the checkpoint crate's `pre_image`, the swap in `swap`.
//!
//! Measured on this project's PVM hosts: one write-protect fault round trip costs 70-145 us as
//! seen by the guest (see docs/checkpoint.md).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A fault read from a userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A write to a write-protected page at this host address.
    Write(u64),
    /// A touch of a missing page at this host address.
    Missing(u64),
}

/// A userfaultfd registered over one host range (write-protect mode) and, where asked, over
/// parts of it in missing mode too.
pub struct Uffd {
    file: File,
    start: u64,
    len: u64,
}

fn ioctl<T>(fd: &File, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly laid out `repr(C)` struct for `req` (see the kernel's
    // uapi/linux/userfaultfd.h), and the kernel writes at most its size.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd and registers `[start, start + len)` (host addresses of guest memory)
    /// for write-protect faults.
    pub fn register(start: u64, len: u64) -> io::Result<Self> {
        let u = Self::open(start, len)?;
        u.register_range(start, len)?;
        Ok(u)
    }

    /// Opens a userfaultfd for `[start, start + len)` without registering anything yet.
    pub fn open(start: u64, len: u64) -> io::Result<Self> {
        // SAFETY: a plain syscall with flags; the result is checked.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        ioctl(&file, UFFDIO_API, &mut api)?;
        Ok(Self { file, start, len })
    }

    /// Registers `[start, start + len)` too (a range inside the first one that was mapped anew:
    /// a fresh mapping is not registered, even where it replaced a registered one). Pages are
    /// left writable.
    pub fn register_range(&self, start: u64, len: u64) -> io::Result<()> {
        self.register_mode(start, len, UFFDIO_REGISTER_MODE_WP)
    }

    /// Registers `[start, start + len)` in missing mode, and in write-protect mode too if `wp`
    /// (registering again replaces the range's modes).
    pub fn register_missing(&self, start: u64, len: u64, wp: bool) -> io::Result<()> {
        let wp = if wp { UFFDIO_REGISTER_MODE_WP } else { 0 };
        self.register_mode(start, len, UFFDIO_REGISTER_MODE_MISSING | wp)
    }

    fn register_mode(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(&self.file, UFFDIO_REGISTER, &mut reg)
    }

    /// Unregisters `[start, start + len)` (releasing anyone blocked in it).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(&self.file, UFFDIO_UNREGISTER, &mut r)
    }

    /// Resolves a missing fault: maps a copy of `page` (4096 bytes) at `dst`, write-protected if
    /// `wp`. A page that is already there (another thread resolved it) is not an error.
    pub fn copy(&self, dst: u64, page: &[u8], wp: bool) -> io::Result<()> {
        let mut c = UffdioCopy {
            dst,
            src: page.as_ptr() as u64,
            len: page.len() as u64,
            mode: if wp { UFFDIO_COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        match ioctl(&self.file, UFFDIO_COPY, &mut c) {
            // Already there: the copy woke nobody, so wake the waiters here.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.wake(dst, page.len() as u64),
            r => r,
        }
    }

    /// Resolves a missing fault with a zero page at `dst`.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(&self.file, UFFDIO_ZEROPAGE, &mut z) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.wake(dst, len),
            r => r,
        }
    }

    /// Waits until a fault is waiting to be read (true) or `stop` is readable (false).
    pub fn wait(&self, stop: &impl AsRawFd) -> io::Result<bool> {
        let mut pfd = [
            libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds in an array we own.
            let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pfd[1].revents != 0 {
                return Ok(false);
            }
            if pfd[0].revents != 0 {
                return Ok(true);
            }
        }
    }

    /// Write-protects (`true`) or releases (`false`, waking a blocked writer) a range.
    pub fn protect(&self, start: u64, len: u64, on: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(&self.file, UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Protects the whole registered range.
    pub fn protect_all(&self) -> io::Result<()> {
        self.protect(self.start, self.len, true)
    }

    /// Waits up to `timeout_ms` for faults; returns the host addresses of write-protect faults
    /// read (possibly none). For a userfaultfd with no missing-mode range.
    pub fn read_faults(&self, timeout_ms: i32) -> io::Result<Vec<u64>> {
        Ok(self
            .read_all(timeout_ms)?
            .into_iter()
            .filter_map(|f| match f {
                Fault::Write(a) => Some(a),
                Fault::Missing(_) => None,
            })
            .collect())
    }

    /// Waits up to `timeout_ms` for faults and returns those read (possibly none).
    pub fn read_all(&self, timeout_ms: i32) -> io::Result<Vec<Fault>> {
        if !self.wait_readable(timeout_ms)? {
            return Ok(Vec::new());
        }
        Ok(self.read_ready())
    }

    /// Waits up to `timeout_ms` until a fault can be read (true) or the time is up (false).
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }

    /// Reads the faults waiting, without blocking (the descriptor is non-blocking).
    pub fn read_ready(&self) -> Vec<Fault> {
        let mut out = Vec::new();
        let mut buf = [0u8; 32 * 64];
        loop {
            // SAFETY: reads into a buffer of the given length.
            let r =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                break;
            }
            for msg in buf[..r as usize].chunks_exact(32) {
                let flags = u64::from_le_bytes(msg[8..16].try_into().unwrap_or_default());
                let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap_or_default());
                if msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                out.push(if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    Fault::Write(addr)
                } else {
                    Fault::Missing(addr)
                });
            }
        }
        out
    }

    /// Wakes threads waiting on faults in `[start, start + len)` (after a resolution that
    /// did not wake them: one that failed, or found the page already there).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(&self.file, UFFDIO_WAKE, &mut r)
    }

    /// Whether a fault is waiting to be read.
    pub fn pending(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }
}

impl Drop for Uffd {
    fn drop(&mut self) {
        let mut r = UffdioRange {
            start: self.start,
            len: self.len,
        };
        let _ = ioctl(&self.file, UFFDIO_UNREGISTER, &mut r);
    }
}
