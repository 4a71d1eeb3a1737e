//! Shared memory between VMs: named regions (files on tmpfs) mapped into several VMs, each in
//! its own VMM process, read-write or read-only per VM (enforced by the KVM memory slot).
//!
//! A region's first [`share::HEADER_SIZE`] bytes are the header every VMM and guest agrees on
//! (see `rebound_abi::share`): member slots, one per attached VM, and a lock table. A VMM
//! claims a member slot by `flock`ing the slot's file in the region's members directory for as
//! long as it runs, so any VMM can tell a dead member from a live one (the lock dies with the
//! process) and recover what the dead one held: its locks come back marked inconsistent.
//!
//! Wake-ups: a guest sets bits in its own slot's `notify` mask and rings the
//! [`port::SHARE_DOORBELL`] ioeventfd; this VMM's doorbell thread bumps each target's
//! `doorbell` word and futex-wakes it. Each VMM has a watcher thread per region waiting on its
//! own slot's `doorbell` word (a futex on the shared mapping, across processes), which wakes the
//! VM's vCPUs blocked in `BLOCK`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use rebound_abi::indicator;
use rebound_abi::share::{self, LockEntry, Member, RegionHeader, ShareEntry, ShareTable};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;
use crate::wait::Waiters;
use crate::{Error, Result};

/// KVM slot of table entry 0 (slot 0 is guest memory).
const FIRST_KVM_SLOT: u32 = 1;
/// How long a watcher waits before looking whether it should stop.
const WATCH_POLL: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(what: impl std::fmt::Display) -> Error {
    Error::Share(what.to_string())
}

/// A region to attach to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareConfig {
    /// The region's name in the share directory.
    pub name: String,
    /// The VM may only read it.
    pub read_only: bool,
}

/// A persistent cache: a region owned by one VM identity that outlives the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// The region's name.
    pub name: String,
    /// Its size in MiB (used when it is created).
    pub size_mib: u64,
    /// The identity owning it.
    pub identity: String,
    /// Hash of the guest image: a cache filled by another image is stale.
    pub image_hash: u64,
}

/// Checks a region or identity name: 1-31 of `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < 32
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(format!(
            "{what} {name:?}: use 1 to 31 letters, digits, '_', '.' or '-', not starting with '.'"
        )))
    }
}

fn padded(name: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let n = name.len().min(31);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

fn unpadded(bytes: &[u8; 32]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(32);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The host directory of shared regions: `$REBOUND_SHARE_DIR`, default
/// `/dev/shm/rebound-shared`. Region `NAME` is the file `NAME`; its member slot locks are in
/// `NAME.members/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareDir {
    path: PathBuf,
}

/// A region as `list` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionInfo {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The identity owning it, for a persistent cache.
    pub owner: Option<String>,
    /// Attached VMs.
    pub members: Vec<MemberInfo>,
}

/// One attached VM as `list` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Its slot.
    pub slot: usize,
    /// Its VM id.
    pub vm_id: u64,
    /// Its VMM's process id.
    pub pid: u32,
    /// Whether it may write.
    pub writable: bool,
    /// Whether its VMM still runs (a dead member is recovered by the next VMM that looks).
    pub alive: bool,
    /// Times it was woken.
    pub wakeups: u64,
}

impl ShareDir {
    /// The directory named by `$REBOUND_SHARE_DIR`, default `/dev/shm/rebound-shared`.
    pub fn from_env() -> Self {
        let path = std::env::var_os("REBOUND_SHARE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm/rebound-shared"));
        Self { path }
    }

    /// The directory at `path`.
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn slot_file(&self, name: &str, slot: usize) -> PathBuf {
        self.path
            .join(format!("{name}.members"))
            .join(slot.to_string())
    }

    /// Creates region `name` of `size_mib` MiB (a multiple of 2), zero-filled with its header.
    pub fn create(&self, name: &str, size_mib: u64) -> Result<()> {
        self.create_owned(name, size_mib, None)
    }

    fn create_owned(&self, name: &str, size_mib: u64, owner: Option<(&str, u64)>) -> Result<()> {
        check_name("region", name)?;
        let size = size_mib << 20;
        if size_mib == 0 || !size.is_multiple_of(share::ALIGN) || size > share::WINDOW_SIZE {
            return Err(err(format!(
                "region {name}: size {size_mib} MiB must be a non-zero multiple of 2 MiB up to {} MiB",
                share::WINDOW_SIZE >> 20
            )));
        }
        std::fs::create_dir_all(self.path.join(format!("{name}.members")))
            .map_err(|e| err(format!("cannot create {}: {e}", self.path.display())))?;
        let path = self.file(name);
        // Written under a temporary name, then linked in place: a region appears whole.
        let tmp = self
            .path
            .join(format!(".{name}.new-{}", std::process::id()));
        let f =
            File::create(&tmp).map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
        f.set_len(size)
            .map_err(|e| err(format!("cannot size {}: {e}", tmp.display())))?;
        let header = RegionHeader {
            magic: share::MAGIC,
            version: 1,
            flags: 0,
            size,
            name: padded(name),
            owner: owner.map_or([0; 32], |(o, _)| padded(o)),
            image_hash: owner.map_or(0, |(_, h)| h),
            attaches: 0,
        };
        let bytes = vm_memory::ByteValued::as_slice(&header);
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0)
            .map_err(|e| err(format!("cannot write {}: {e}", tmp.display())))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(err(format!("region {name} already exists")))
            }
            Err(e) => Err(err(format!("cannot create {}: {e}", path.display()))),
        }
    }

    /// Removes region `name`; refused while a live VM is attached unless `force`.
    pub fn remove(&self, name: &str, force: bool) -> Result<()> {
        check_name("region", name)?;
        let region = Region::open(self, name)?;
        let live: Vec<usize> = (0..share::MAX_MEMBERS)
            .filter(|&s| region.member_vm(s) != 0 && slot_alive(self, name, s))
            .collect();
        if !live.is_empty() && !force {
            return Err(err(format!(
                "region {name} is attached to live VMs (slots {live:?}): detach them first, or --force"
            )));
        }
        std::fs::remove_file(self.file(name))
            .map_err(|e| err(format!("cannot remove region {name}: {e}")))?;
        let _ = std::fs::remove_dir_all(self.path.join(format!("{name}.members")));
        Ok(())
    }

    /// Every region and who is attached.
    pub fn list(&self) -> Result<Vec<RegionInfo>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Ok(out);
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| check_name("region", n).is_ok())
            .collect();
        names.sort();
        for name in names {
            let Ok(region) = Region::open(self, &name) else {
                continue;
            };
            out.push(region.info(self));
        }
        Ok(out)
    }
}

/// Whether the VMM holding member slot `slot` of region `name` is alive.
fn slot_alive(dir: &ShareDir, name: &str, slot: usize) -> bool {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .open(dir.slot_file(name, slot))
    else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; the result is checked.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        // We got it: nobody holds the slot. Closing `f` lets it go again.
        return false;
    }
    true
}

/// A region mapped into this process.
pub struct Region {
    name: String,
    base: *mut u8,
    size: u64,
    _file: File,
}

// SAFETY: the mapping is shared memory accessed only through atomics (header) or handed to
// KVM; `base` is valid until drop.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Opens and maps region `name`, checking its header.
    pub fn open(dir: &ShareDir, name: &str) -> Result<Self> {
        check_name("region", name)?;
        let path = dir.file(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| err(format!("no region {name} ({}): {e}", path.display())))?;
        let size = file
            .metadata()
            .map_err(|e| err(format!("region {name}: {e}")))?
            .len();
        if size < share::HEADER_SIZE
            || !size.is_multiple_of(share::ALIGN)
            || size > share::WINDOW_SIZE
        {
            return Err(err(format!(
                "region {name}: {size} bytes is not a valid region size"
            )));
        }
        // SAFETY: maps `size` bytes of a file we hold open, shared; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(err(format!(
                "cannot map region {name}: {}",
                io::Error::last_os_error()
            )));
        }
        let region = Self {
            name: name.to_string(),
            base: base.cast(),
            size,
            _file: file,
        };
        let h = region.header();
        if h.magic != share::MAGIC || h.size != size || unpadded(&h.name) != name {
            return Err(err(format!(
                "region {name}: its header is damaged (not a Rebound region?)"
            )));
        }
        Ok(region)
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn host(&self) -> u64 {
        self.base as u64
    }

    /// A copy of the header (guests may scribble on it; nothing here trusts it for safety).
    pub fn header(&self) -> RegionHeader {
        // SAFETY: the header lies at the start of the mapping (size >= HEADER_SIZE); a racy
        // read of plain integers is at worst a torn value, which callers validate.
        unsafe { std::ptr::read_volatile(self.base.cast::<RegionHeader>()) }
    }

    fn u64_at(&self, offset: u64) -> &AtomicU64 {
        assert!(offset + 8 <= share::HEADER_SIZE && offset.is_multiple_of(8));
        // SAFETY: in bounds of the mapping (checked above; size >= HEADER_SIZE), 8-aligned (the
        // mapping is page-aligned), and shared memory is only ever accessed atomically here.
        unsafe { AtomicU64::from_ptr(self.base.add(offset as usize).cast()) }
    }

    fn u32_at(&self, offset: u64) -> &AtomicU32 {
        assert!(offset + 4 <= share::HEADER_SIZE && offset.is_multiple_of(4));
        // SAFETY: as for `u64_at`.
        unsafe { AtomicU32::from_ptr(self.base.add(offset as usize).cast()) }
    }

    fn member_field(&self, slot: usize, field: usize) -> u64 {
        share::member_offset(slot) + field as u64
    }

    fn member_vm(&self, slot: usize) -> u64 {
        self.u64_at(self.member_field(slot, std::mem::offset_of!(Member, vm_id)))
            .load(Ordering::Acquire)
    }

    fn doorbell(&self, slot: usize) -> &AtomicU32 {
        self.u32_at(self.member_field(slot, std::mem::offset_of!(Member, doorbell)))
    }

    fn lock_field(&self, index: usize, field: usize) -> &AtomicU64 {
        self.u64_at(share::lock_offset(index) + field as u64)
    }

    fn info(&self, dir: &ShareDir) -> RegionInfo {
        let h = self.header();
        let owner = unpadded(&h.owner);
        let members = (0..share::MAX_MEMBERS)
            .filter(|&s| self.member_vm(s) != 0)
            .map(|slot| {
                let f = |field| {
                    self.u64_at(self.member_field(slot, field))
                        .load(Ordering::Relaxed)
                };
                let pid_rights = f(std::mem::offset_of!(Member, pid));
                MemberInfo {
                    slot,
                    vm_id: self.member_vm(slot),
                    pid: pid_rights as u32,
                    writable: (pid_rights >> 32) as u32 & share::WRITABLE != 0,
                    alive: slot_alive(dir, &self.name, slot),
                    wakeups: f(std::mem::offset_of!(Member, wakeups)),
                }
            })
            .collect();
        RegionInfo {
            name: self.name.clone(),
            size: self.size,
            owner: (!owner.is_empty()).then_some(owner),
            members,
        }
    }

    /// Wakes member `slot`: bumps its doorbell and wakes whoever waits on it.
    pub fn wake(&self, slot: usize) {
        if slot >= share::MAX_MEMBERS {
            return;
        }
        self.u64_at(self.member_field(slot, std::mem::offset_of!(Member, wakeups)))
            .fetch_add(1, Ordering::Relaxed);
        let bell = self.doorbell(slot);
        bell.fetch_add(1, Ordering::AcqRel);
        futex_wake(bell);
    }

    /// Releases what member `slot` holds: every lock it holds (or reads under) comes back free
    /// and marked inconsistent, and it stops waiting. Waiters are woken.
    fn release_holdings(&self, slot: usize) -> usize {
        let bit = 1u64 << slot;
        let mut released = 0;
        for i in 0..share::MAX_LOCKS {
            let word = self.lock_field(i, std::mem::offset_of!(LockEntry, word));
            let readers = self.lock_field(i, std::mem::offset_of!(LockEntry, readers));
            let waiters = self.lock_field(i, std::mem::offset_of!(LockEntry, waiters));
            let was_reader = readers.fetch_and(!bit, Ordering::AcqRel) & bit != 0;
            waiters.fetch_and(!bit, Ordering::AcqRel);
            let mut w = word.load(Ordering::Acquire);
            loop {
                let holder = w & share::LOCK_HOLDER_MASK;
                if holder != slot as u64 + 1 && !was_reader {
                    break;
                }
                let recoveries = (w >> share::LOCK_RECOVERY_SHIFT).wrapping_add(1);
                let keep = if holder == slot as u64 + 1 { 0 } else { holder };
                let new =
                    keep | share::LOCK_INCONSISTENT | (recoveries << share::LOCK_RECOVERY_SHIFT);
                match word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        released += 1;
                        break;
                    }
                    Err(now) => w = now,
                }
            }
        }
        released
    }

    fn wake_all_others(&self, me: Option<usize>) {
        for s in 0..share::MAX_MEMBERS {
            if Some(s) != me && self.member_vm(s) != 0 {
                self.wake(s);
            }
        }
    }

    /// Recovers every member whose VMM died: releases what it held and frees its slot.
    /// Returns how many were recovered.
    pub fn recover_dead(&self, dir: &ShareDir, me: Option<usize>) -> usize {
        let mut n = 0;
        for s in 0..share::MAX_MEMBERS {
            if Some(s) == me || self.member_vm(s) == 0 {
                continue;
            }
            // Holding the slot's lock while recovering keeps two recoverers apart.
            let Ok(f) = OpenOptions::new()
                .read(true)
                .open(dir.slot_file(&self.name, s))
            else {
                continue;
            };
            // SAFETY: flock on a descriptor we own; the result is checked.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue; // alive
            }
            if self.member_vm(s) != 0 {
                let locks = self.release_holdings(s);
                self.clear_member(s);
                tracing::warn!(
                    region = self.name,
                    slot = s,
                    locks,
                    "recovered a dead member"
                );
                n += 1;
            }
        }
        let orphans = self.release_orphans();
        if n > 0 || orphans > 0 {
            self.wake_all_others(me);
        }
        n
    }

    /// Releases locks whose recorded holder or readers are no member at all (a free slot, or
    /// garbage a guest wrote): nobody would ever release them otherwise.
    fn release_orphans(&self) -> usize {
        let mut released = 0;
        let live: u64 = (0..share::MAX_MEMBERS)
            .filter(|&s| self.member_vm(s) != 0)
            .fold(0, |m, s| m | (1 << s));
        for i in 0..share::MAX_LOCKS {
            let word = self.lock_field(i, std::mem::offset_of!(LockEntry, word));
            let readers = self.lock_field(i, std::mem::offset_of!(LockEntry, readers));
            let stray = readers.fetch_and(live, Ordering::AcqRel) & !live;
            let w = word.load(Ordering::Acquire);
            let holder = w & share::LOCK_HOLDER_MASK;
            let orphan = holder != 0
                && (holder > share::MAX_MEMBERS as u64 || live & (1 << (holder - 1)) == 0);
            if orphan || stray != 0 {
                let keep = if orphan { 0 } else { holder };
                let recoveries = (w >> share::LOCK_RECOVERY_SHIFT).wrapping_add(1);
                let new =
                    keep | share::LOCK_INCONSISTENT | (recoveries << share::LOCK_RECOVERY_SHIFT);
                if word
                    .compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    released += 1;
                }
            }
        }
        released
    }

    fn clear_member(&self, slot: usize) {
        for field in [
            std::mem::offset_of!(Member, notify),
            std::mem::offset_of!(Member, pid),
            std::mem::offset_of!(Member, vm_id),
        ] {
            self.u64_at(self.member_field(slot, field))
                .store(0, Ordering::Release);
        }
        self.u32_at(self.member_field(slot, std::mem::offset_of!(Member, busy)))
            .store(0, Ordering::Release);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`; nothing uses it after drop (KVM
        // slots over it are removed first by their owner).
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 in shared memory; no memory is written.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// Waits until `word` is no longer `seen`, or `timeout` passes (or spuriously).
fn futex_wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 in shared memory with a valid timeout; the
    // kernel only reads them.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// One region attached to this VM.
pub struct Attachment {
    region: Arc<Region>,
    config: ShareConfig,
    /// Whether it is this VM's persistent cache.
    cache: bool,
    slot: usize,
    gpa: u64,
    kvm_slot: u32,
    /// The member slot's lock file, `flock`ed while attached.
    _claim: File,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

/// What a snapshot records of an attachment (re-attached by name on restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    /// The region.
    pub config: ShareConfig,
    /// The member slot the guest knew.
    pub slot: u32,
    /// A persistent cache.
    pub cache: Option<CacheConfig>,
    /// The VM's id when it was recorded.
    pub vm_id: u64,
}

/// An attachment as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttachmentInfo {
    /// Region name.
    pub name: String,
    /// Read-only for this VM.
    pub read_only: bool,
    /// A persistent cache.
    pub cache: bool,
    /// Guest address.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// This VM's member slot.
    pub slot: usize,
    /// Times this VM was woken through it.
    pub wakeups: u64,
}

/// How a VM comes back to a region it was attached to before (restore, live update).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rejoin {
    /// The member slot it had, taken again if free.
    pub slot: Option<usize>,
    /// Same VM (live update): the slot still recorded with its id, and the locks it holds,
    /// stay its own instead of being recovered.
    pub keep_holdings: bool,
}

/// Counters of the sharing paths.
#[derive(Default)]
pub struct ShareCounters {
    /// Doorbell rings handled.
    pub doorbells: AtomicU64,
    /// VMs woken on this VM's behalf.
    pub wakeups_sent: AtomicU64,
    /// Times this VM was woken by another.
    pub wakeups_received: AtomicU64,
    /// Members recovered.
    pub recoveries: AtomicU64,
}

/// The regions of one VM.
pub struct Shares {
    dir: ShareDir,
    vm_id: u64,
    table: Mutex<Vec<Option<Attachment>>>,
    doorbell: EventFd,
    doorbell_thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<ShareCounters>,
    stop: Arc<AtomicBool>,
    records: Mutex<Vec<ShareRecord>>,
}

impl Shares {
    /// Sharing state for a VM (no region yet).
    pub fn new(dir: ShareDir, vm_id: u64) -> Result<Self> {
        Ok(Self {
            dir,
            vm_id,
            table: Mutex::new((0..share::MAX_REGIONS).map(|_| None).collect()),
            doorbell: EventFd::new(0)
                .map_err(|e| err(format!("cannot create the share doorbell: {e}")))?,
            doorbell_thread: Mutex::new(None),
            counters: Arc::new(ShareCounters::default()),
            stop: Arc::new(AtomicBool::new(false)),
            records: Mutex::new(Vec::new()),
        })
    }

    /// The ioeventfd behind [`port::SHARE_DOORBELL`].
    pub fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    /// Counters.
    pub fn counters(&self) -> &ShareCounters {
        &self.counters
    }

    /// This VM's id in member slots.
    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }

    /// Attaches a region (or a persistent cache) to the VM: maps it, claims a member slot
    /// (the one of `rejoin` if free), adds the KVM slot and updates the guest's table.
    /// Returns the index.
    pub fn attach(
        self: &Arc<Self>,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        waiters: &Arc<Waiters>,
        config: &ShareConfig,
        cache: Option<&CacheConfig>,
        rejoin: Rejoin,
    ) -> Result<usize> {
        let Rejoin {
            slot: prefer,
            keep_holdings,
        } = rejoin;
        check_name("region", &config.name)?;
        if let Some(c) = cache {
            check_name("identity", &c.identity)?;
            if !self.dir.file(&c.name).exists() {
                self.dir
                    .create_owned(&c.name, c.size_mib, Some((&c.identity, c.image_hash)))?;
            }
        }
        let region = Arc::new(Region::open(&self.dir, &config.name)?);
        let h = region.header();
        let owner = unpadded(&h.owner);
        match cache {
            None if !owner.is_empty() => {
                return Err(err(format!(
                    "region {} is the persistent cache of {owner:?}: only that identity attaches it",
                    config.name
                )));
            }
            Some(c) if owner != c.identity => {
                return Err(err(format!(
                    "cache {} belongs to {owner:?}, not {:?}: a foreign cache is refused",
                    config.name, c.identity
                )));
            }
            Some(c) if h.image_hash != c.image_hash => {
                return Err(err(format!(
                    "cache {} was filled by another guest image (hash {:#x}, this one {:#x}): a stale cache is refused; remove it to start afresh",
                    config.name, h.image_hash, c.image_hash
                )));
            }
            _ => {}
        }
        let mut table = lock(&self.table);
        if table.iter().flatten().any(|a| a.config.name == config.name) {
            return Err(err(format!("region {} is already attached", config.name)));
        }
        let index = table
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| err(format!("at most {} regions per VM", share::MAX_REGIONS)))?;
        let gpa = place(&table, region.size()).ok_or_else(|| {
            err(format!(
                "no room for region {} in the shared window",
                config.name
            ))
        })?;
        let (slot, claim) = self.claim(&region, prefer, keep_holdings)?;
        region.recover_dead(&self.dir, Some(slot));
        if cache.is_some() && (0..share::MAX_MEMBERS).any(|s| s != slot && region.member_vm(s) != 0)
        {
            region.clear_member(slot);
            return Err(err(format!(
                "cache {} is attached to another VM",
                config.name
            )));
        }
        let rights = if config.read_only { 0 } else { share::WRITABLE };
        let pid_rights = u64::from(std::process::id()) | (u64::from(rights) << 32);
        region
            .u64_at(region.member_field(slot, std::mem::offset_of!(Member, pid)))
            .store(pid_rights, Ordering::Release);
        region
            .u64_at(std::mem::offset_of!(RegionHeader, attaches) as u64)
            .fetch_add(1, Ordering::Relaxed);
        let kvm_slot = FIRST_KVM_SLOT + index as u32;
        // Two KVM slots: the region header's page read-only for every guest (its name, size
        // and owner are what other VMMs check when they attach), the rest as the VM's rights
        // say.
        let body_flags = if config.read_only {
            KVM_MEM_READONLY
        } else {
            0
        };
        let header = SlotMap {
            slot: kvm_slot,
            gpa,
            size: HEADER_PAGE,
            host: region.host(),
            flags: KVM_MEM_READONLY,
        };
        let body = SlotMap {
            slot: kvm_slot + share::MAX_REGIONS as u32,
            gpa: gpa + HEADER_PAGE,
            size: region.size() - HEADER_PAGE,
            host: region.host() + HEADER_PAGE,
            flags: body_flags,
        };
        // SAFETY: the region's mapping stays valid for as long as the slots exist: they are
        // removed (detach, or the VM fd closing) before the `Region` is dropped.
        if let Err(e) = unsafe { header.add(vm_fd) } {
            region.clear_member(slot);
            return Err(e);
        }
        // SAFETY: as above.
        if let Err(e) = unsafe { body.add(vm_fd) } {
            let _ = header.remove(vm_fd);
            region.clear_member(slot);
            return Err(e);
        }
        let stop = Arc::new(AtomicBool::new(false));
        // Read here, not in the thread: a ring between the attach and the thread's first look
        // would otherwise go unseen (and a guest dispatching on indicators never looks at
        // the region without its bit).
        let seen = region.doorbell(slot).load(Ordering::Acquire);
        let watcher = {
            let (region, stop, waiters) = (region.clone(), stop.clone(), waiters.clone());
            let all_stop = self.stop.clone();
            let counters = self.counters.clone();
            std::thread::Builder::new()
                .name(format!("rebound-share-{index}"))
                .spawn(move || {
                    let at = Watch { slot, index, seen };
                    watch(&region, at, &stop, &all_stop, &waiters, &counters)
                })
                .map_err(|e| err(format!("cannot start a share watcher: {e}")))?
        };
        table[index] = Some(Attachment {
            region,
            config: config.clone(),
            cache: cache.is_some(),
            slot,
            gpa,
            kvm_slot,
            _claim: claim,
            stop,
            watcher: Some(watcher),
        });
        lock(&self.records).push(ShareRecord {
            config: config.clone(),
            slot: slot as u32,
            cache: cache.cloned(),
            vm_id: self.vm_id,
        });
        write_table(mem, self.vm_id, &table)?;
        drop(table);
        self.start_doorbell_thread()?;
        tracing::info!(
            region = config.name,
            slot,
            gpa,
            read_only = config.read_only,
            "region attached"
        );
        Ok(index)
    }

    /// Claims a free member slot: its lock file `flock`ed, then its `vm_id` set.
    fn claim(
        &self,
        region: &Region,
        prefer: Option<usize>,
        keep_holdings: bool,
    ) -> Result<(usize, File)> {
        let order = prefer.into_iter().chain(0..share::MAX_MEMBERS);
        for s in order.filter(|&s| s < share::MAX_MEMBERS) {
            let path = self.dir.slot_file(region.name(), s);
            // A live update hands the slot's lock over across exec: nobody saw it free.
            let inherited = keep_holdings
                .then(|| take_inherited_claim(region.name(), s, &path))
                .flatten();
            let Some(f) = inherited.or_else(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .ok()
            }) else {
                continue;
            };
            // SAFETY: flock on a descriptor we own; the result is checked.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            // A dead member's leftovers go first (unless it is this very VM going on in a new
            // process after a live update).
            let previous = region.member_vm(s);
            let rejoining = keep_holdings && previous == self.vm_id;
            if previous != 0 && !rejoining {
                region.release_holdings(s);
                region.clear_member(s);
                region.wake_all_others(Some(s));
            }
            if !rejoining {
                // Counted per membership: the last holder's wake-ups are not ours.
                region
                    .u64_at(region.member_field(s, std::mem::offset_of!(Member, wakeups)))
                    .store(0, Ordering::Relaxed);
            }
            region
                .u64_at(region.member_field(s, std::mem::offset_of!(Member, vm_id)))
                .store(self.vm_id, Ordering::Release);
            region
                .u32_at(region.member_field(s, std::mem::offset_of!(Member, busy)))
                .store(1, Ordering::Release);
            return Ok((s, f));
        }
        Err(err(format!(
            "region {} has no free member slot",
            region.name()
        )))
    }

    /// Detaches region `name`: its KVM slot goes, what this VM held in it is released, its
    /// member slot freed.
    pub fn detach(&self, vm_fd: &VmFd, mem: &GuestMemory, name: &str) -> Result<()> {
        let mut table = lock(&self.table);
        let index = table
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.config.name == name))
            .ok_or_else(|| err(format!("region {name} is not attached")))?;
        let Some(a) = table[index].as_ref() else {
            return Err(err(format!("region {name} is not attached")));
        };
        // The guest loses the region before anything else happens; if KVM refuses, the
        // attachment (and its mapping, which a slot may still point at) stays.
        for slot in [a.kvm_slot + share::MAX_REGIONS as u32, a.kvm_slot] {
            SlotMap::removal(slot, a.gpa).remove(vm_fd)?;
        }
        let Some(mut a) = table[index].take() else {
            return Err(err(format!("region {name} is not attached")));
        };
        a.release(true);
        lock(&self.records).retain(|r| r.config.name != name);
        write_table(mem, self.vm_id, &table)?;
        tracing::info!(region = name, "region detached");
        Ok(())
    }

    /// The attached regions.
    pub fn list(&self) -> Vec<AttachmentInfo> {
        lock(&self.table)
            .iter()
            .flatten()
            .map(|a| AttachmentInfo {
                name: a.config.name.clone(),
                read_only: a.config.read_only,
                cache: a.cache,
                addr: a.gpa,
                size: a.region.size(),
                slot: a.slot,
                wakeups: a
                    .region
                    .u64_at(
                        a.region
                            .member_field(a.slot, std::mem::offset_of!(Member, wakeups)),
                    )
                    .load(Ordering::Relaxed),
            })
            .collect()
    }

    /// What a snapshot records.
    pub fn records(&self) -> Vec<ShareRecord> {
        lock(&self.records).clone()
    }

    fn start_doorbell_thread(self: &Arc<Self>) -> Result<()> {
        let mut t = lock(&self.doorbell_thread);
        if t.is_none() {
            let me = Arc::downgrade(self);
            *t = Some(
                std::thread::Builder::new()
                    .name("rebound-share-bell".into())
                    .spawn(move || {
                        loop {
                            let Some(shares) = me.upgrade() else { return };
                            if shares.stop.load(Ordering::Acquire) {
                                return;
                            }
                            // Read through a duplicate so the wait holds no strong reference.
                            let Ok(bell) = shares.doorbell.try_clone() else {
                                return;
                            };
                            drop(shares);
                            if bell.read().is_err() {
                                return;
                            }
                            let Some(shares) = me.upgrade() else { return };
                            if shares.stop.load(Ordering::Acquire) {
                                return;
                            }
                            shares.on_doorbell();
                        }
                    })
                    .map_err(|e| err(format!("cannot start the share doorbell thread: {e}")))?,
            );
        }
        Ok(())
    }

    /// The guest rang the doorbell: wake the members it marked in its `notify` masks.
    fn on_doorbell(&self) {
        self.counters.doorbells.fetch_add(1, Ordering::Relaxed);
        let table = lock(&self.table);
        for a in table.iter().flatten() {
            let mask = a
                .region
                .u64_at(
                    a.region
                        .member_field(a.slot, std::mem::offset_of!(Member, notify)),
                )
                .swap(0, Ordering::AcqRel);
            self.wake_mask(&a.region, mask);
        }
    }

    fn wake_mask(&self, region: &Region, mask: u64) -> u64 {
        let mut n = 0;
        for s in 0..share::MAX_MEMBERS {
            if mask & (1 << s) != 0 && region.member_vm(s) != 0 {
                region.wake(s);
                n += 1;
            }
        }
        self.counters.wakeups_sent.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// `SHARE_NOTIFY`: wakes the members of table entry `index` set in `mask`.
    pub fn notify(&self, index: u64, mask: u64) -> Option<u64> {
        let table = lock(&self.table);
        let a = table.get(usize::try_from(index).ok()?)?.as_ref()?;
        Some(self.wake_mask(&a.region, mask))
    }

    /// `SHARE_RECOVER`: recovers the dead members of table entry `index`.
    pub fn recover(&self, index: u64) -> Option<u64> {
        let table = lock(&self.table);
        let a = table.get(usize::try_from(index).ok()?)?.as_ref()?;
        let n = a.region.recover_dead(&self.dir, Some(a.slot)) as u64;
        self.counters.recoveries.fetch_add(n, Ordering::Relaxed);
        Some(n)
    }

    /// The VM went back in time (rollback): what it held in shared regions after that point
    /// is released (locks come back marked inconsistent); it stays attached.
    pub fn release_own_holdings(&self) -> usize {
        let table = lock(&self.table);
        let mut n = 0;
        for a in table.iter().flatten() {
            n += a.region.release_holdings(a.slot);
            a.region.wake_all_others(Some(a.slot));
        }
        n
    }

    /// Rewrites the guest's table (after its memory was restored from a snapshot).
    pub fn rewrite_table(&self, mem: &GuestMemory) -> Result<()> {
        write_table(mem, self.vm_id, &lock(&self.table))
    }

    /// Makes this VM's member-slot claims survive `exec` for a live update: their lock files
    /// lose close-on-exec, so the locks stay held through the exec, and the new process finds
    /// them in [`INHERITED_CLAIMS_ENV`], set to the returned value. Undo with
    /// [`keep_claims`](Self::keep_claims) if the update does not happen.
    pub fn hand_over_claims(&self) -> String {
        let table = lock(&self.table);
        let mut out = Vec::new();
        for a in table.iter().flatten() {
            let fd = a._claim.as_raw_fd();
            if set_cloexec(fd, false).is_ok() {
                out.push(format!("{}:{}:{fd}", a.config.name, a.slot));
            }
        }
        out.join(",")
    }

    /// After re-attaching following a live update: inherited claims no attachment took are
    /// let go.
    pub fn drop_inherited_claims(&self) {
        drop_inherited_claims(&self.dir);
    }

    /// The live update did not happen: claims close on exec again (a child process must not
    /// keep them, or a dead VM would look alive).
    pub fn keep_claims(&self) {
        for a in lock(&self.table).iter().flatten() {
            let _ = set_cloexec(a._claim.as_raw_fd(), true);
        }
    }

    /// Stops the threads and releases every member slot (the VM ended).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.doorbell.write(1);
        if let Some(t) = lock(&self.doorbell_thread).take() {
            let _ = t.join();
        }
        let mut table = lock(&self.table);
        for a in table.iter_mut().flatten() {
            a.release(true);
        }
    }
}

impl Drop for Shares {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Attachment {
    fn release(&mut self, free_slot: bool) {
        self.stop.store(true, Ordering::Release);
        // Wake our own watcher so it sees `stop` now.
        let bell = self.region.doorbell(self.slot);
        bell.fetch_add(1, Ordering::AcqRel);
        futex_wake(bell);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if free_slot && self.region.member_vm(self.slot) != 0 {
            self.region.release_holdings(self.slot);
            self.region.clear_member(self.slot);
            self.region.wake_all_others(Some(self.slot));
        }
    }
}

/// Environment variable in which a live update passes member-slot claims to the new process:
/// `NAME:SLOT:FD` entries, comma-separated.
pub const INHERITED_CLAIMS_ENV: &str = "REBOUND_SHARE_CLAIMS";

/// Claims inherited from the process before a live update, not yet taken: (region, slot, fd).
static INHERITED: Mutex<Option<Vec<(String, usize, i32)>>> = Mutex::new(None);

fn set_cloexec(fd: i32, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor this process owns; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether descriptor `fd` is open on the file at `path` (same device and inode).
fn fd_is(fd: i32, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    // SAFETY: an all-zero `stat` is valid; fstat fills it or fails (checked).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`; a closed or foreign fd just fails or mismatches.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev == m.dev() && st.st_ino == m.ino()
}

fn inherited_claims() -> MutexGuard<'static, Option<Vec<(String, usize, i32)>>> {
    let mut g = lock(&INHERITED);
    if g.is_none() {
        let parsed = std::env::var(INHERITED_CLAIMS_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|e| {
                let mut it = e.rsplitn(3, ':');
                let fd = it.next()?.parse().ok()?;
                let slot = it.next()?.parse().ok()?;
                Some((it.next()?.to_string(), slot, fd))
            })
            .collect();
        *g = Some(parsed);
    }
    g
}

/// The inherited claim on `region`'s member `slot`, if the previous process handed it over.
fn take_inherited_claim(region: &str, slot: usize, path: &Path) -> Option<File> {
    let mut g = inherited_claims();
    let list = g.as_mut()?;
    let i = list
        .iter()
        .position(|(r, s, _)| r == region && *s == slot)?;
    let (_, _, fd) = list.swap_remove(i);
    // Only a descriptor open on that very slot file is taken: a number the environment
    // names is not trusted to be what it says.
    if !fd_is(fd, path) {
        return None;
    }
    let _ = set_cloexec(fd, true);
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is open on the slot file (checked above), was inherited across exec for
    // exactly this purpose, and is taken once (removed from the list): nothing else owns it.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Closes inherited claims no region was re-attached with (the new process runs without
/// them), so their slots read as free to others.
fn drop_inherited_claims(dir: &ShareDir) {
    let mut g = inherited_claims();
    for (region, slot, fd) in g.as_mut().map(std::mem::take).unwrap_or_default() {
        if fd_is(fd, &dir.slot_file(&region, slot)) {
            // SAFETY: open on a slot file, inherited for a claim that no attachment took;
            // nothing in this process uses it.
            unsafe { libc::close(fd) };
        }
    }
}

/// The region header's page, mapped read-only into every guest.
const HEADER_PAGE: u64 = share::MEMBERS_OFFSET;

/// A KVM memory slot over part of a region.
struct SlotMap {
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
    flags: u32,
}

impl SlotMap {
    /// What deleting slot `slot` takes (size 0).
    fn removal(slot: u32, gpa: u64) -> Self {
        Self {
            slot,
            gpa,
            size: 0,
            host: 0,
            flags: 0,
        }
    }

    /// Adds the slot.
    ///
    /// # Safety
    /// `host .. host + size` must stay mapped for as long as the slot exists.
    unsafe fn add(&self, vm_fd: &VmFd) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot: self.slot,
            flags: self.flags,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host,
        };
        // SAFETY: the caller keeps the memory mapped while the slot exists.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(|source| Error::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })
    }

    /// Deletes slot `self.slot`.
    fn remove(&self, vm_fd: &VmFd) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: self.gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot (size 0) maps no memory.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(|source| Error::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })
    }
}

/// First-fit placement of `size` bytes in the window, ALIGN-aligned.
fn place(table: &[Option<Attachment>], size: u64) -> Option<u64> {
    let mut used: Vec<(u64, u64)> = table
        .iter()
        .flatten()
        .map(|a| (a.gpa, a.gpa + a.region.size()))
        .collect();
    used.sort();
    let mut at = share::WINDOW_BASE;
    for (start, end) in used {
        if at + size <= start {
            break;
        }
        at = at.max(end);
    }
    (at + size <= share::WINDOW_BASE + share::WINDOW_SIZE).then_some(at)
}

fn write_table(mem: &GuestMemory, vm_id: u64, table: &[Option<Attachment>]) -> Result<()> {
    let at = GuestAddress(share::TABLE_ADDR);
    let old: ShareTable = mem.read_obj(at).unwrap_or_default();
    let mut t = ShareTable {
        magic: share::TABLE_MAGIC,
        generation: old.generation.wrapping_add(1),
        count: 0,
        vm_id,
        entries: [ShareEntry::default(); share::MAX_REGIONS],
    };
    for (i, a) in table.iter().enumerate() {
        if let Some(a) = a {
            t.entries[i] = ShareEntry {
                name: padded(&a.config.name),
                addr: a.gpa,
                size: a.region.size(),
                flags: if a.config.read_only {
                    0
                } else {
                    share::WRITABLE
                } | if a.cache { share::CACHE } else { 0 },
                slot: a.slot as u32,
            };
            t.count = t.count.max(i as u32 + 1);
        }
    }
    mem.write_obj(t, at)
        .map_err(|e| err(format!("cannot write the share table: {e}")))
}

/// What a watcher watches: its member slot, the region's table index, the doorbell value it
/// starts from.
struct Watch {
    slot: usize,
    index: usize,
    seen: u32,
}

/// The watcher of this VM's member slot in one region: wakes the VM's vCPUs when another VM
/// rings its doorbell, after setting the region's indicator (ABI 1.10).
fn watch(
    region: &Region,
    Watch { slot, index, seen }: Watch,
    stop: &AtomicBool,
    all_stop: &AtomicBool,
    waiters: &Waiters,
    counters: &ShareCounters,
) {
    let bell = region.doorbell(slot);
    let mut seen = seen;
    loop {
        futex_wait(bell, seen, WATCH_POLL);
        if stop.load(Ordering::Acquire) || all_stop.load(Ordering::Acquire) {
            return;
        }
        let now = bell.load(Ordering::Acquire);
        if now != seen {
            seen = now;
            counters.wakeups_received.fetch_add(1, Ordering::Relaxed);
            // The region's indicator (ABI 1.10) first, so the woken vCPUs see it.
            if let Some(route) = indicator::slot(indicator::KIND_SHARE, index as u64) {
                rebound_devices::Notify::indicate(waiters, None, route);
            }
            waiters.notify_all();
        }
    }
}
