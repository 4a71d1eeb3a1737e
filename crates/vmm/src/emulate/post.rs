//! Port 0x80, the POST-code / I/O-delay port: firmware and Linux write progress codes and delay
//! bytes there. Emulated as a register holding the last byte written. A hot write of one value
//! is promoted to an ioeventfd matching that value: the kernel absorbs it (~3 us instead of an
//! exit, ~30 us here) and the eventfd counts it. The device stays exact: writes of the promoted
//! value are drained from the eventfd before any access that exits is handled, and every exited
//! access is synchronous, so whatever was absorbed since happened after the last exited write.

use std::sync::Mutex;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The port.
pub const PORT: u16 = 0x80;

struct Promoted {
    value: u8,
    fd: EventFd,
    /// Writes absorbed since the window started.
    used: u64,
    window_start_ns: u64,
}

#[derive(Default)]
struct State {
    last: u8,
    writes: u64,
    absorbed: u64,
    promoted: Option<Promoted>,
}

/// The device.
#[derive(Default)]
pub(crate) struct PostPort {
    state: Mutex<State>,
}

/// What `/metrics` shows of the device.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct PostSnapshot {
    /// The last byte written.
    pub last: u8,
    /// Bytes written in all.
    pub writes: u64,
    /// Of those, absorbed by the promoted ioeventfd.
    pub absorbed: u64,
    /// The value promoted now, if any.
    pub promoted_value: Option<u8>,
}

fn drain(s: &mut State) {
    if let Some(p) = &mut s.promoted
        && let Ok(n) = p.fd.read()
    {
        s.last = p.value;
        s.writes += n;
        s.absorbed += n;
        p.used += n;
    }
}

impl PostPort {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A write that exited.
    pub(crate) fn write(&self, value: u8) {
        let mut s = self.lock();
        drain(&mut s);
        s.last = value;
        s.writes += 1;
    }

    /// A read.
    pub(crate) fn read(&self) -> u8 {
        let mut s = self.lock();
        drain(&mut s);
        s.last
    }

    /// Promotes writes of `value` to an ioeventfd (replacing another promoted value). False if
    /// KVM refused (the slow path goes on working).
    pub(crate) fn promote(&self, vm_fd: &VmFd, value: u8, now_ns: u64) -> bool {
        let mut s = self.lock();
        Self::demote_locked(&mut s, vm_fd);
        let Ok(fd) = EventFd::new(EFD_NONBLOCK) else {
            return false;
        };
        if let Err(e) = vm_fd.register_ioevent(&fd, &IoEventAddress::Pio(u64::from(PORT)), value) {
            tracing::warn!(%e, "cannot promote port 0x80 to an ioeventfd");
            return false;
        }
        s.promoted = Some(Promoted {
            value,
            fd,
            used: 0,
            window_start_ns: now_ns,
        });
        true
    }

    fn demote_locked(s: &mut State, vm_fd: &VmFd) -> Option<u8> {
        drain(s);
        let p = s.promoted.take()?;
        let _ = vm_fd.unregister_ioevent(&p.fd, &IoEventAddress::Pio(u64::from(PORT)), p.value);
        // Writes absorbed between the last drain and the unregistration.
        if let Ok(n) = p.fd.read() {
            s.last = p.value;
            s.writes += n;
            s.absorbed += n;
        }
        Some(p.value)
    }

    /// The judgment for the promoted value: after a whole window, `cold(used, elapsed)` says
    /// whether to demote it. Returns the value demoted.
    pub(crate) fn judge(
        &self,
        vm_fd: &VmFd,
        now_ns: u64,
        window_ns: u64,
        cold: impl Fn(u64, u64) -> bool,
    ) -> Option<u8> {
        let mut s = self.lock();
        drain(&mut s);
        let p = s.promoted.as_mut()?;
        let elapsed = now_ns.saturating_sub(p.window_start_ns);
        if elapsed < window_ns {
            return None;
        }
        if cold(p.used, elapsed) {
            return Self::demote_locked(&mut s, vm_fd);
        }
        p.used = 0;
        p.window_start_ns = now_ns;
        None
    }

    pub(crate) fn snapshot(&self) -> PostSnapshot {
        let mut s = self.lock();
        drain(&mut s);
        PostSnapshot {
            last: s.last,
            writes: s.writes,
            absorbed: s.absorbed,
            promoted_value: s.promoted.as_ref().map(|p| p.value),
        }
    }
}
