//! The user-mode backend: `passt` (Debian package `passt`), a user-mode network stack made for
//! VMMs. It forwards host ports to the guest (`--publish 127.0.0.1:6379:6379`) with no TAP and
//! no root, and exchanges frames with the VMM over a Unix stream socket in QEMU's framing (a
//! 4-byte big-endian length, then the frame).
//!
//! Rebound starts one passt per NIC in its own process group, so it outlives a VMM that is
//! killed: passt keeps its host-side connections while no VMM is attached, and the VMM that
//! recovers the VM attaches to the same socket and carries the guest's TCP streams on (see
//! `docs/network.md`). [`PasstProcess`] is that lifetime; [`PasstLink`] is one VMM's connection,
//! the NIC's [`Backend`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rebound_devices::net::Backend;

use crate::Error;
use crate::config::{Addressing, Publish};

/// Most bytes of frames waiting to be written to passt before new frames are dropped.
const WRITE_BACKLOG: usize = 4 << 20;
/// How long passt may take to open its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A passt process serving one NIC: its socket, pid and log, in a runtime directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasstProcess {
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its pid file.
    pub pid_file: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

impl PasstProcess {
    /// Where NIC `index`'s passt lives in `dir`.
    pub fn at(dir: &Path, index: usize) -> Self {
        Self {
            socket: dir.join(format!("passt-{index}.sock")),
            pid_file: dir.join(format!("passt-{index}.pid")),
            log: dir.join(format!("passt-{index}.log")),
        }
    }

    /// The pid of a passt running for this socket, if one is.
    pub fn running(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: signal 0 only checks the process exists.
        let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
        (alive && UnixStream::connect(&self.socket).is_ok()).then_some(pid)
    }

    /// Starts passt for a NIC with `addressing`, forwarding `publish`, unless one already runs
    /// for this socket (a VMM taking a VM over attaches to the passt its predecessor started).
    /// A passt that is not `durable` exits when its VMM's connection closes (the VMM ended or
    /// was killed: nothing will take its VM over); a durable one waits for the next VMM.
    /// Returns the connection.
    pub fn start(
        &self,
        addressing: &Addressing,
        publish: &[Publish],
        durable: bool,
    ) -> Result<PasstLink, Error> {
        if self.running().is_some() {
            tracing::info!(socket = %self.socket.display(), "attaching to the running passt");
            return PasstLink::connect(&self.socket);
        }
        let fail = |reason: String| Error::Backend {
            what: "passt".into(),
            reason,
        };
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pid_file);
        let log = File::create(&self.log)
            .map_err(|e| fail(format!("cannot create {}: {e}", self.log.display())))?;
        let mut cmd = Command::new(passt_binary());
        cmd.arg("--foreground")
            .arg("--quiet")
            .arg("--ipv4-only")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pid")
            .arg(&self.pid_file)
            .args(["--address", &addressing.guest_ip.to_string()])
            .args(["--netmask", &addressing.prefix.to_string()])
            .args(["--gateway", &addressing.gateway.to_string()])
            .args([
                "--mac-addr",
                &rebound_devices::net::mac_string(addressing.gateway_mac),
            ])
            .args(["--mtu", &addressing.mtu.to_string()])
            // Stay the invoking user: passt would otherwise drop to "nobody" and could not
            // create its socket in a directory only this user may write.
            // SAFETY: getuid cannot fail.
            .args(["--runas", &unsafe { libc::getuid() }.to_string()]);
        if !durable {
            cmd.arg("--one-off");
        }
        if publish.is_empty() {
            cmd.args(["--tcp-ports", "none"]);
        }
        for p in publish {
            cmd.args(["--tcp-ports", &p.passt_spec()]);
        }
        // In its own process group: a signal meant for the VMM's group (a terminal's ^C, a
        // supervisor's kill) leaves it running with its connections.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().map_err(|e| {
            fail(format!(
                "cannot start {}: {e} (install the Debian package passt)",
                passt_binary()
            ))
        })?;
        let t0 = Instant::now();
        loop {
            if let Ok(link) = PasstLink::connect(&self.socket) {
                // passt is not our child to wait for: once started it lives with the VM.
                std::mem::forget(child);
                return Ok(link);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(fail(format!(
                    "it exited ({status}) before opening its socket: {}",
                    self.log_tail()
                )));
            }
            if t0.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "its socket {} did not open within {READY_TIMEOUT:?}: {}",
                    self.socket.display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ends passt (the VM it served ended) and removes its files.
    pub fn stop(&self) {
        if let Some(pid) = self.running() {
            // passt has nothing to flush, and does not end on SIGTERM.
            // SAFETY: sends SIGKILL to the pid passt wrote for itself.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pid_file);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        if lines.is_empty() {
            "(it logged nothing)".into()
        } else {
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        }
    }
}

/// The passt program: `$REBOUND_PASST` or `passt` on PATH.
pub fn passt_binary() -> String {
    std::env::var("REBOUND_PASST").unwrap_or_else(|_| "passt".into())
}

/// One VMM's connection to a passt: the NIC's backend.
pub struct PasstLink {
    stream: UnixStream,
    socket: PathBuf,
    /// Bytes read and not yet returned as frames.
    rbuf: Vec<u8>,
    /// Bytes of frames not yet written (a write that would have blocked mid-frame).
    wbuf: Vec<u8>,
    connected: bool,
}

impl PasstLink {
    /// Connects to the passt at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, Error> {
        let stream = UnixStream::connect(socket).map_err(|e| Error::Backend {
            what: "passt".into(),
            reason: format!("cannot connect to {}: {e}", socket.display()),
        })?;
        stream.set_nonblocking(true).map_err(|e| Error::Backend {
            what: "passt".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            stream,
            socket: socket.to_path_buf(),
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            connected: true,
        })
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A complete frame at the front of the read buffer, if there is one.
    fn take_frame(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        if self.rbuf.len() < 4 {
            return None;
        }
        let len =
            u32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]) as usize;
        if self.rbuf.len() < 4 + len {
            return None;
        }
        let n = len.min(buf.len());
        buf[..n].copy_from_slice(&self.rbuf[4..4 + n]);
        self.rbuf.drain(..4 + len);
        if n < len {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame larger than the receive buffer was dropped",
            )));
        }
        Some(Ok(n))
    }
}

impl Backend for PasstLink {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if !self.connected {
            return Err(io::ErrorKind::NotConnected.into());
        }
        self.flush_backlog()?;
        if self.wbuf.len() + frame.len() + 4 > WRITE_BACKLOG {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut msg = Vec::with_capacity(frame.len() + 4);
        msg.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        msg.extend_from_slice(frame);
        if self.wbuf.is_empty() {
            match self.stream.write(&msg) {
                Ok(n) if n == msg.len() => return Ok(()),
                Ok(n) => msg.drain(..n).for_each(drop),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.connected = false;
                    return Err(e);
                }
            }
        }
        // The rest of the frame must go before any other: keep it.
        self.wbuf.extend_from_slice(&msg);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(r) = self.take_frame(buf) {
            return r;
        }
        if !self.connected {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.connected = false;
                    tracing::warn!(socket = %self.socket.display(), "passt closed its socket");
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&chunk[..n]);
                    if let Some(r) = self.take_frame(buf) {
                        return r;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn buffered(&self) -> bool {
        self.rbuf.len() >= 4
            && self.rbuf.len()
                >= 4 + u32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]])
                    as usize
    }

    fn service(&mut self) -> io::Result<()> {
        if !self.connected {
            // passt restarted (or came back): attach again; frames in between were lost and
            // TCP sends them again.
            if let Ok(s) = UnixStream::connect(&self.socket)
                && s.set_nonblocking(true).is_ok()
            {
                tracing::info!(socket = %self.socket.display(), "reattached to passt");
                self.stream = s;
                self.rbuf.clear();
                self.wbuf.clear();
                self.connected = true;
            }
            return Ok(());
        }
        match self.flush_backlog() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                self.connected = false;
                Err(e)
            }
            _ => Ok(()),
        }
    }

    fn link_up(&self) -> bool {
        self.connected
    }

    fn failovers(&self) -> u64 {
        0
    }

    fn describe(&self) -> String {
        format!("passt {}", self.socket.display())
    }
}

/// The guest-side addressing passt is told (and the guest must use).
pub fn default_addressing(mtu: u16) -> Addressing {
    Addressing {
        guest_ip: Ipv4Addr::new(10, 0, 2, 15),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 0, 2, 2),
        gateway_mac: [0x52, 0x56, 0x00, 0x00, 0x00, 0x02],
        mtu,
    }
}
