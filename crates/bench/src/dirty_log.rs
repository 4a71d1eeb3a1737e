//! Harvesting dirty pages from KVM two ways, in bare VMs (no VMM logic): the bitmap
//! (`KVM_GET_DIRTY_LOG`, cost grows with memory size) and the dirty ring (per-vCPU ring of page
//! numbers plus `KVM_RESET_DIRTY_RINGS`, cost grows with the number of dirty pages). The guest
//! writes K pages, then exits; the host times the harvest.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::bare::{Bare, Tracking, bare};

const KVM_DIRTY_LOG_PAGE_OFFSET: i64 = 64;
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
const RING_ENTRIES: usize = 65_536;
const DIRTY: u32 = 1;
const RESET: u32 = 2;
const WRITE_BASE: u64 = 16 << 20;

/// Median harvest time in microseconds and pages found, for both mechanisms.
pub struct Harvest {
    /// Bitmap: microseconds.
    pub bitmap_us: f64,
    /// Bitmap: pages found.
    pub bitmap_pages: u64,
    /// Ring: microseconds.
    pub ring_us: f64,
    /// Ring: pages found.
    pub ring_pages: u64,
}

/// A VM running `write K pages; out; repeat`.
fn dirtying(size: u64, k: u32, tracking: Tracking) -> Result<Bare> {
    let mut code = vec![0x48, 0xbf];
    code.extend_from_slice(&WRITE_BASE.to_le_bytes()); // mov rdi, WRITE_BASE
    code.push(0xb9);
    code.extend_from_slice(&k.to_le_bytes()); // mov ecx, k
    code.extend_from_slice(&[0x88, 0x07]); // 1: mov [rdi], al
    code.extend_from_slice(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 4096
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xf3]); // dec ecx; jnz 1b
    code.extend_from_slice(&[0x66, 0xba, 0x10, 0x05, 0xee]); // mov dx, 0x510; out dx, al
    code.extend_from_slice(&[0xeb, 0xdd]); // jmp start
    bare(size, &code, tracking)
}

fn run_round(b: &mut Bare) -> Result<()> {
    match b.vcpu.run()? {
        VcpuExit::IoOut(..) => Ok(()),
        other => bail!("dirty-log guest: unexpected exit {other:?}"),
    }
}

/// The vCPU's dirty ring, mapped from its fd.
struct Ring {
    ptr: *mut u8,
    next: usize,
}

impl Ring {
    fn map(vcpu: &VcpuFd) -> Result<Self> {
        let len = RING_ENTRIES * 16;
        // SAFETY: maps the dirty ring KVM allocated for this vCPU (enabled before the vCPU was
        // created) at its documented offset; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET * 4096,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "cannot map the dirty ring: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            ptr: ptr.cast(),
            next: 0,
        })
    }

    /// Collects every dirty entry and marks it for reset; returns how many.
    fn harvest(&mut self) -> u64 {
        let mut n = 0;
        loop {
            let at = (self.next % RING_ENTRIES) * 16;
            // SAFETY: `at` is inside the mapped ring and 4-aligned; KVM and we access the flags
            // word atomically with acquire/release as the dirty ring protocol requires.
            let flags = unsafe { &*self.ptr.add(at).cast::<AtomicU32>() };
            if flags.load(Ordering::Acquire) & DIRTY == 0 {
                return n;
            }
            flags.store(RESET, Ordering::Release);
            self.next += 1;
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), RING_ENTRIES * 16) };
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times both harvests for K dirty pages in `size` bytes of memory.
pub fn measure(size: u64, k: u32, rounds: usize) -> Result<Harvest> {
    let mut b = dirtying(size, k, Tracking::Bitmap)?;
    run_round(&mut b)?;
    b.vm.get_dirty_log(0, size as usize)?;
    let (mut times, mut pages) = (Vec::new(), 0);
    for _ in 0..rounds {
        run_round(&mut b)?;
        let t = Instant::now();
        let log = b.vm.get_dirty_log(0, size as usize)?;
        pages = log.iter().map(|w| u64::from(w.count_ones())).sum();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let bitmap_us = median(times);
    let bitmap_pages = pages;

    let mut b = dirtying(size, k, Tracking::Ring((RING_ENTRIES * 16) as u64))?;
    let mut ring = Ring::map(&b.vcpu)?;
    let reset = |vm: &VmFd| -> Result<()> {
        // SAFETY: an argument-less KVM ioctl on the VM fd; the result is checked.
        if unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) } < 0 {
            bail!("KVM_RESET_DIRTY_RINGS: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    run_round(&mut b)?;
    ring.harvest();
    reset(&b.vm)?;
    let mut times = Vec::new();
    for _ in 0..rounds {
        run_round(&mut b)?;
        let t = Instant::now();
        pages = ring.harvest();
        reset(&b.vm)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Harvest {
        bitmap_us,
        bitmap_pages,
        ring_us: median(times),
        ring_pages: pages,
    })
}
