//! The Rebound hypercall ABI, shared by the VMM and the guest SDK so the two cannot drift.
//!
//! Guests run at CPL3 with the VMM as their kernel. A hypercall is: write the arguments into the
//! calling vCPU's [`VcpuPage`] (its address is at `gs:0`), then `out` the hypercall number (32
//! bits, in `eax`) to [`port::HYPERCALL`]. The VMM writes the result into `VcpuPage::ret`
//! before the guest resumes. Results are `i64`: non-negative on success, a negative
//! [`errno`] value on failure. See `docs/abi.md` for the full contract.
#![no_std]

/// Major version: bumped on any incompatible change.
pub const ABI_MAJOR: u32 = 1;
/// Minor version: bumped on compatible additions.
pub const ABI_MINOR: u32 = 10;
/// What [`nr::ABI_VERSION`] returns: `major << 16 | minor`.
pub const ABI_VERSION: u32 = (ABI_MAJOR << 16) | ABI_MINOR;

/// I/O ports the guest may use, reachable from CPL3 through the TSS I/O bitmap. They are 4
/// apart because a 32-bit `out` covers four ports in the bitmap.
pub mod port {
    /// `out dx, eax` with `eax` = hypercall number. Exits to the VMM (~30 us on PVM).
    pub const HYPERCALL: u16 = 0x0510;
    /// `out dx, eax` with `eax` = vCPU id: "my I/O ring has new requests". Absorbed by an
    /// ioeventfd in the kernel (~3 us): the guest does not leave to the VMM.
    pub const DOORBELL: u16 = 0x0514;
    /// Written only by the VMM-provided exception stubs (CPL0) to report a guest fault.
    pub const FAULT: u16 = 0x0518;
    /// `out dx, eax` (any value) (ABI 1.2): "I set bits in my members' `notify` masks of shared
    /// regions: wake those VMs". Absorbed by an ioeventfd (~3 us); see [`super::share`].
    pub const SHARE_DOORBELL: u16 = 0x051C;
    /// `out dx, eax` with `eax` = NIC index (ABI 1.4): "my TX ring has new frames". Absorbed by
    /// an ioeventfd (~3 us); see [`super::net`].
    pub const NET_DOORBELL: u16 = 0x0520;
    /// `out dx, eax` with `eax` = `slot << 8 | vcpu` of a started nested vCPU (ABI 1.10): "I
    /// handed it back and its host thread is asleep". Absorbed by an ioeventfd (~3 us); see
    /// [`super::nested`].
    pub const NESTED_DOORBELL: u16 = 0x0524;
    /// `out 0x80, al` / `in al, 0x80` (ABI 1.10): the POST-code / I/O-delay port firmware and
    /// Linux use, emulated as a register holding the last byte written. Each access is an
    /// exit, unless the VMM promoted a hot written value to an ioeventfd (see docs/abi.md).
    pub const POST: u16 = 0x0080;
}

/// Hypercall numbers.
pub mod nr {
    /// `() -> ABI_VERSION`.
    pub const ABI_VERSION: u32 = 0;
    /// `(ptr, len) -> len`: write bytes to the VM console. `len <= CONSOLE_WRITE_MAX`.
    pub const CONSOLE_WRITE: u32 = 1;
    /// `() -> ns`: monotonic nanoseconds since the VM started.
    pub const CLOCK_MONOTONIC: u32 = 2;
    /// `() -> ns`: wall-clock nanoseconds since the Unix epoch.
    pub const CLOCK_REALTIME: u32 = 3;
    /// `(timeout_ns) -> BLOCK_WOKEN | BLOCK_TIMED_OUT`: block the vCPU in the VMM until an
    /// event for it (an I/O completion, a wake-up) or until `timeout_ns` passes
    /// (`u64::MAX` = no timeout). May return early; callers re-check their indicators.
    pub const BLOCK: u32 = 4;
    /// `() -> 0`: give the host CPU away briefly.
    pub const YIELD: u32 = 5;
    /// `(status)`: end the VM with an exit status (`0..=255`). Does not return.
    pub const EXIT: u32 = 6;
    /// `(ptr, len)`: report a guest panic message and end the VM. Does not return.
    pub const PANIC: u32 = 7;
    /// `(ring_gpa, entries) -> 0`: register the calling vCPU's I/O ring (see [`super::io`]).
    pub const IO_SETUP: u32 = 8;
    /// `() -> generation` (ABI 1.1): 0 after a fresh boot; a new value each time the VM is
    /// restored from a snapshot or cloned, so a guest can tell it was (and which clone it is).
    pub const GENERATION: u32 = 9;
    /// `(region, slots) -> woken` (ABI 1.2): wake the members of shared region `region` (an
    /// index into the [`super::share::ShareTable`]) whose bits are set in `slots`. For members
    /// that cannot write the region (read-only); others use [`super::port::SHARE_DOORBELL`].
    pub const SHARE_NOTIFY: u32 = 10;
    /// `(region) -> recovered` (ABI 1.2): have the VMM check every member of shared region
    /// `region` and release what members that died hold (their locks come back marked
    /// inconsistent). Returns how many members were recovered.
    pub const SHARE_RECOVER: u32 = 11;
    /// `(nic, area_gpa, tx_entries, rx_entries, wake_vcpu) -> 0` (ABI 1.4): register NIC
    /// `nic`'s rings (see [`super::net`]) at `area_gpa`; `wake_vcpu` is woken from `BLOCK` when
    /// frames arrive while the ring says it is idle. Calling it again replaces the rings.
    pub const NET_SETUP: u32 = 12;
    /// `(table_gpa) -> 0` (ABI 1.8): register (or re-read) this VM's memory class table, a
    /// [`super::memory::Table`] in guest-writable memory; the calling vCPU is the one woken from
    /// `BLOCK` when the host posts a request in it. See [`super::memory`].
    pub const MEM_SETUP: u32 = 13;
    /// `(gpa, pages) -> pages` (ABI 1.8): give pages back to the host; their memory is freed on
    /// the host and they read as zero the next time they are touched. Page aligned, inside
    /// guest memory above [`super::IMAGE_BASE`], at most [`super::memory::RETURN_MAX_PAGES`].
    pub const MEM_RETURN: u32 = 14;
    /// `() -> 0 | 1` (ABI 1.9): a clone point. The guest calls it when it sees
    /// [`super::request::CLONE`], at a place where it holds nothing shared with other VMs
    /// (between two jobs of a shared queue). If the host asked for a clone, the call holds the
    /// vCPU in the VMM until the snapshot the clone starts from is taken, and returns 1 in both
    /// the VM and its clone ([`GENERATION`] tells them apart); otherwise it returns 0 at once.
    pub const CLONE_POINT: u32 = 15;
    /// `(id, table_gpa, count) -> 0` (ABI 1.10): sets program `id`'s protection table:
    /// `count` [`super::program::Range`]s at `table_gpa` (`count` = 0 removes the program). The
    /// VMM builds the program's page tables at its next [`PROGRAM_RUN`] and keeps them until
    /// the table changes. Supervisor only. See [`super::program`].
    pub const PROGRAM_SET: u32 = 22;
    /// `(id, entry, stack_top, arg, fault_gpa) -> result` (ABI 1.10): runs program `id` on this
    /// vCPU, at `entry` with `rsp = stack_top`, `rdi = arg` and every other register zero, with
    /// only its table's ranges mapped. Returns what the program passed to [`PROGRAM_EXIT`], or
    /// [`super::program::FAULTED`] if it faulted (the fault is written as a
    /// [`super::program::Fault`] at `fault_gpa`, if not 0). Supervisor only.
    pub const PROGRAM_RUN: u32 = 23;
    /// `(value)` (ABI 1.10): from a program, ends its run: the supervisor's [`PROGRAM_RUN`]
    /// returns `value & i64::MAX`. From the supervisor: `EINVAL`.
    pub const PROGRAM_EXIT: u32 = 24;
    /// `(create_gpa) -> handle` (ABI 1.10): create a nested VM whose memory is a range of the
    /// caller's, described by a [`super::nested::Create`] at `create_gpa`, with an SDK guest
    /// loaded in it. See [`super::nested`].
    pub const NESTED_CREATE: u32 = 16;
    /// `(handle, vcpu, areas_gpa) -> 0` (ABI 1.10): create nested vCPU `vcpu` (or move its
    /// status areas), with its [`super::nested::Areas`] at `areas_gpa`.
    pub const NESTED_VCPU: u32 = 17;
    /// `(handle, vcpu, slice_ns) -> exit reason` (ABI 1.10): run nested vCPU `vcpu` until its
    /// next exit, described in its guest status area, or for at most `slice_ns` nanoseconds
    /// (0: no limit); returns one of [`super::nested::exit`].
    pub const NESTED_RUN: u32 = 18;
    /// `(handle) -> 0` (ABI 1.10): destroy a nested VM (its memory stays the caller's).
    pub const NESTED_DESTROY: u32 = 19;
    /// `(handle, vcpu) -> 0` (ABI 1.10): from now on nested vCPU `vcpu` runs on a host thread
    /// of its own, and its exits are posted in its status areas without a hypercall of the
    /// guest VMM ([`super::nested`], "Posted exits").
    pub const NESTED_START: u32 = 25;
    /// One past the highest number: the size of per-number counters.
    pub const COUNT: usize = 26;
    /// `(kind, index, bit) -> 0` (ABI 1.10): route requester `index` of `kind` (one of
    /// [`super::indicator`]'s `KIND_*`) to bit `bit` (0..=63) of the calling vCPU's
    /// [`super::VcpuPage::pending`] word, or, with `bit` = [`super::indicator::NONE`], stop
    /// routing it there. `EINVAL` for an unknown kind, an index out of range or a bit above 63.
    pub const INDICATOR_SET: u32 = 20;

    /// A short name for logs and metrics.
    pub const fn name(nr: u32) -> &'static str {
        match nr {
            ABI_VERSION => "abi_version",
            CONSOLE_WRITE => "console_write",
            CLOCK_MONOTONIC => "clock_monotonic",
            CLOCK_REALTIME => "clock_realtime",
            BLOCK => "block",
            YIELD => "yield",
            EXIT => "exit",
            PANIC => "panic",
            IO_SETUP => "io_setup",
            GENERATION => "generation",
            SHARE_NOTIFY => "share_notify",
            SHARE_RECOVER => "share_recover",
            NET_SETUP => "net_setup",
            MEM_SETUP => "mem_setup",
            MEM_RETURN => "mem_return",
            CLONE_POINT => "clone_point",
            PROGRAM_SET => "program_set",
            PROGRAM_RUN => "program_run",
            PROGRAM_EXIT => "program_exit",
            NESTED_CREATE => "nested_create",
            NESTED_VCPU => "nested_vcpu",
            NESTED_RUN => "nested_run",
            NESTED_DESTROY => "nested_destroy",
            NESTED_START => "nested_start",
            INDICATOR_SET => "indicator_set",
            _ => "unknown",
        }
    }
}

/// Negative results (Linux errno values, negated).
pub mod errno {
    /// Not allowed to the caller (ABI 1.10): e.g. a hypercall a program may not make.
    pub const EPERM: i64 = -1;
    /// Out of a resource the VMM keeps for the guest (ABI 1.10): e.g. the table pool.
    pub const ENOMEM: i64 = -12;
    /// An I/O error on the host side.
    pub const EIO: i64 = -5;
    /// Try again later: too much waits already (e.g. disk writes held for a checkpoint, ABI
    /// 1.6).
    pub const EAGAIN: i64 = -11;
    /// A length is larger than the call allows.
    pub const E2BIG: i64 = -7;
    /// A pointer or range is outside the memory the guest may name.
    pub const EFAULT: i64 = -14;
    /// Not an image the call can run (ABI 1.10: a nested guest's ELF that is not an SDK guest).
    pub const ENOEXEC: i64 = -8;
    /// No such handle (ABI 1.10: a nested VM that was destroyed or never created).
    pub const EBADF: i64 = -9;
    /// The call is already done and cannot be repeated (e.g. a second `IO_SETUP`).
    pub const EBUSY: i64 = -16;
    /// The device the call needs is not configured.
    pub const ENODEV: i64 = -19;
    /// An argument has a bad value (alignment, range, flags).
    pub const EINVAL: i64 = -22;
    /// A write to a read-only disk.
    pub const EROFS: i64 = -30;
    /// No such hypercall.
    pub const ENOSYS: i64 = -38;
    /// A limit is reached (ABI 1.10: too many nested VMs or vCPUs).
    pub const ENOSPC: i64 = -28;
    /// A handle from before a restore, rollback or clone (ABI 1.10: nested VMs are not part of
    /// checkpoints; create them again).
    pub const ESTALE: i64 = -116;
}

/// Largest `CONSOLE_WRITE` (and `PANIC` message) in bytes.
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;
/// `BLOCK` result: an event arrived (or the wait was cut short).
pub const BLOCK_WOKEN: i64 = 0;
/// `BLOCK` result: the timeout passed.
pub const BLOCK_TIMED_OUT: i64 = 1;

/// Guest-physical address of the read-only [`BootInfo`] page; passed in `rsi` at entry.
pub const BOOT_INFO_ADDR: u64 = 0x10_0000;
/// `BootInfo::magic`: "RBNDBOOT".
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"RBNDBOOT");
/// Where the guest command line starts, as an offset in the boot info page.
pub const BOOT_ARGS_OFFSET: u64 = 512;
/// Longest guest command line, in bytes.
pub const BOOT_ARGS_MAX: u64 = 4096 - BOOT_ARGS_OFFSET;
/// Guest-physical address where a guest ELF's lowest loadable segment may start.
pub const IMAGE_BASE: u64 = 0x40_0000;
/// The ELF note every SDK guest carries (section `.note.rebound`, in a `PT_NOTE` segment): the
/// VMM runs only ELF files that have it, with its major ABI version.
pub mod note {
    /// The note's owner name, NUL-terminated (8 bytes: no padding).
    pub const NAME: [u8; 8] = *b"Rebound\0";
    /// The note type: its descriptor is the ABI version the guest was built for (`u32`,
    /// `major << 16 | minor`), then 4 reserved bytes.
    pub const TYPE_ABI: u32 = 1;
    /// The descriptor's size in bytes.
    pub const DESC_SIZE: u32 = 8;
}

/// Page size the ABI counts in.
pub const PAGE_SIZE: u64 = 4096;

/// What the VMM tells a guest at boot. Read-only to the guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the VMM that booted the guest.
    pub abi_version: u32,
    /// Number of vCPUs; each enters the image with its id in `rdi`.
    pub vcpu_count: u32,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// First byte of memory free for the guest heap (after the loaded image).
    pub heap_start: u64,
    /// One past the last byte of the heap.
    pub heap_end: u64,
    /// Guest-physical address of vCPU 0's [`VcpuPage`]; vCPU `i`'s is `PAGE_SIZE * i` above.
    pub vcpu_pages: u64,
    /// Guest command line: address and length (UTF-8, not NUL-terminated).
    pub args_addr: u64,
    /// Length of the command line in bytes.
    pub args_len: u64,
    /// Size in bytes of the disk behind the I/O ring, 0 if the VM has none.
    pub disk_size: u64,
    /// Requests from the host (ABI 1.3), bits of [`request`]: set by the VMM while the guest
    /// runs (the guest reads the word atomically), never cleared. A vCPU blocked in
    /// [`nr::BLOCK`] is woken when a bit is set.
    pub requests: u64,
    /// Number of network devices (ABI 1.4), at most [`net::MAX_NICS`].
    pub nic_count: u32,
    /// Reserved (zero).
    pub reserved: u32,
    /// The network devices (ABI 1.4): the first `nic_count` entries.
    pub nics: [net::NicInfo; net::MAX_NICS],
}

/// Programs (ABI 1.10): a guest's supervisor code runs untrusted code as programs, each
/// confined by its own protection table, which the VMM turns into page tables once and keeps
/// (a switch to a program whose table did not change only loads them). An access outside the
/// table, or any other fault, ends the program's run and is reported to the supervisor; the VM
/// goes on. A program may call only `ABI_VERSION`, the clocks, `YIELD`, `CONSOLE_WRITE` (from
/// memory it may read) and [`super::nr::PROGRAM_EXIT`]; anything else returns `EPERM`.
pub mod program {
    /// Program ids are `0..MAX_PROGRAMS`.
    pub const MAX_PROGRAMS: u64 = 16;
    /// Most ranges in one protection table.
    pub const MAX_RANGES: u64 = 16;
    /// [`super::nr::PROGRAM_RUN`]'s result when the program faulted.
    pub const FAULTED: i64 = -1000;

    /// Bits of [`Range::access`].
    pub mod access {
        /// The program may read the range.
        pub const READ: u64 = 1;
        /// The program may write it (implies read).
        pub const WRITE: u64 = 2;
        /// The program may execute it (implies read).
        pub const EXEC: u64 = 4;
    }

    /// One entry of a protection table: page-aligned, inside the guest's own memory (at or
    /// above [`super::IMAGE_BASE`], below the heap's end).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Range {
        /// First byte (page aligned).
        pub start: u64,
        /// Bytes (a multiple of the page size, not 0).
        pub len: u64,
        /// [`access`] bits; READ at least.
        pub access: u64,
    }

    /// What the VMM writes at `fault_gpa` when a program faults.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Fault {
        /// The exception vector (14: page fault, 13: general protection, 6: invalid opcode).
        pub vector: u64,
        /// The error code the CPU pushed (0 if none).
        pub error_code: u64,
        /// The program's instruction pointer at the fault.
        pub rip: u64,
        /// The faulting address, for page faults.
        pub address: u64,
    }

    const _: () = assert!(core::mem::size_of::<Range>() == 24);
    const _: () = assert!(core::mem::size_of::<Fault>() == 32);
}

/// Bits of [`BootInfo::requests`] (ABI 1.3).
pub mod request {
    /// The host asks the guest to shut down cleanly (Firecracker's `SendCtrlAltDel`): finish,
    /// flush, and exit. A guest that has not exited within the host's grace period is stopped.
    pub const SHUTDOWN: u64 = 1;
    /// The host wants to clone the VM for capacity (ABI 1.9): call
    /// [`super::nr::CLONE_POINT`] at the next place that holds nothing shared (between jobs).
    /// The host clears the bit when the point is reached or when it gives up.
    pub const CLONE: u64 = 2;
}

/// Memory classes (ABI 1.8): how a guest divides its memory, and the host's requests to give
/// memory up or take it back.
///
/// A guest registers one [`Table`] with [`nr::MEM_SETUP`]. Its ranges say which memory is
/// *working* (the heap: kept), *cache* (contents the guest can drop and rebuild) and *swap*
/// (cold data the host may move out of RAM at any time, to a file, and bring back when it is
/// touched; the guest sees no difference but speed). The host posts a request by storing
/// `request_pages` and then a new `request_seq`, and wakes the registering vCPU; the guest
/// answers by dropping cache, moving cold data to swap, returning freed pages
/// ([`nr::MEM_RETURN`]), and then storing `answer_pages` and `answer_seq = request_seq`. The
/// host trusts nothing here: ranges are hints, checked against guest memory; a guest that does
/// not answer in time has its swap class moved out by the host.
pub mod memory {
    /// `Table::magic`: "RBNDMEMT".
    pub const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"RBNDMEMT");
    /// Most ranges a table holds.
    pub const MAX_RANGES: usize = 32;
    /// Most pages one [`super::nr::MEM_RETURN`] returns (64 MiB).
    pub const RETURN_MAX_PAGES: u64 = 16384;
    /// `Range::class`: memory the guest keeps (the heap).
    pub const WORKING: u32 = 0;
    /// `Range::class`: memory whose contents the guest can drop and refill.
    pub const CACHE: u32 = 1;
    /// `Range::class`: memory the host may move out of RAM and bring back on access.
    pub const SWAP: u32 = 2;

    /// One range of guest memory and its class.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Range {
        /// Guest-physical address, page aligned.
        pub gpa: u64,
        /// Length in pages.
        pub pages: u64,
        /// [`WORKING`], [`CACHE`] or [`SWAP`].
        pub class: u32,
        /// Reserved (zero).
        pub reserved: u32,
    }

    /// The class table, in guest memory (within one page, 8-byte aligned).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Table {
        /// [`TABLE_MAGIC`].
        pub magic: u64,
        /// Written by the host: a new value for each request (0: none yet).
        pub request_seq: u64,
        /// Written by the host before `request_seq`: pages to give up (> 0), or that the guest
        /// may take back (< 0).
        pub request_pages: i64,
        /// Written by the guest: the `request_seq` it has answered.
        pub answer_seq: u64,
        /// Written by the guest before `answer_seq`: pages it returned (or took back, < 0).
        pub answer_pages: i64,
        /// Ranges in use.
        pub count: u32,
        /// Reserved (zero).
        pub reserved: u32,
        /// The ranges; the first `count` are used.
        pub ranges: [Range; MAX_RANGES],
    }

    impl Default for Table {
        fn default() -> Self {
            Self {
                magic: TABLE_MAGIC,
                request_seq: 0,
                request_pages: 0,
                answer_seq: 0,
                answer_pages: 0,
                count: 0,
                reserved: 0,
                ranges: [Range::default(); MAX_RANGES],
            }
        }
    }

    /// Byte offsets the host and guest access atomically.
    pub const REQUEST_SEQ_OFFSET: u64 = core::mem::offset_of!(Table, request_seq) as u64;
    /// See [`REQUEST_SEQ_OFFSET`].
    pub const REQUEST_PAGES_OFFSET: u64 = core::mem::offset_of!(Table, request_pages) as u64;
    /// See [`REQUEST_SEQ_OFFSET`].
    pub const ANSWER_SEQ_OFFSET: u64 = core::mem::offset_of!(Table, answer_seq) as u64;
    /// See [`REQUEST_SEQ_OFFSET`].
    pub const ANSWER_PAGES_OFFSET: u64 = core::mem::offset_of!(Table, answer_pages) as u64;
    const _: () = assert!(core::mem::size_of::<Table>() <= 4096);
}

/// Nested guests (ABI 1.10): a guest that is itself a VMM runs SDK guests of its own.
///
/// Hosts without VMX cannot run hardware nested virtualization; here the guest VMM asks the
/// host to run its guests for it. A nested VM's guest-physical memory `[0, mem_size)` is the
/// caller's `[mem_gpa, mem_gpa + mem_size)`: the guest VMM reads and writes its guest's memory
/// directly (to copy a console message out, or to store a hypercall's result in the nested
/// guest's [`VcpuPage`]). The host loads an SDK guest image into that range on
/// [`nr::NESTED_CREATE`] (system area, boot info and all, as for a VM of its own), runs
/// each nested vCPU on [`nr::NESTED_RUN`] until its next exit, and handles none of the
/// nested guest's exits itself: each one is written into the vCPU's [`nested::GuestStatus`] and
/// returned to the guest VMM, which emulates it (a nested hypercall is the guest VMM's to
/// answer) and calls `NESTED_RUN` again. A nested guest's fault is such an exit: it never
/// ends the outer VM.
///
/// Nested VMs are not part of checkpoints or snapshots: after a restore, rollback or clone,
/// handles from before answer [`errno::ESTALE`] and the guest VMM creates its guests
/// again.
///
/// # Posted exits
///
/// `NESTED_RUN` costs the guest VMM an exit of its own per nested exit (two where a direct
/// guest pays one). After [`nr::NESTED_START`] a nested vCPU runs instead on a host thread of
/// its own and the host *posts* each exit: it writes the registers and [`nested::Exit`], then
/// increments [`nested::HostStatus::exit_seq`]. The vCPU is the guest VMM's while
/// `exit_seq != GuestStatus::resume_seq`; it answers as after `NESTED_RUN` (result in the
/// nested `VcpuPage`, `exit.data`, `regs_set`) and hands the vCPU back by storing `exit_seq`
/// into `resume_seq`, then, if [`nested::HostStatus::sleeping`] is set (read after a full
/// fence), rings [`port::NESTED_DOORBELL`]. To wait for an exit without spinning it sets
/// `GuestStatus::waiting`, fences, checks `exit_seq` again and calls `BLOCK`: the host wakes
/// the vCPU that called `NESTED_START` (and sets its [`indicator::KIND_NESTED`] bit, if
/// routed) after each exit posted while `waiting` is set. Neither side leaves its CPU for a
/// handover while the other is quick: a hypercall of the nested guest costs its own exit and
/// no exit of the guest VMM. The host thread pauses with the outer VM (checkpoints see the
/// nested guest stopped) and ends on `NESTED_DESTROY`, a rollback or the VM's end.
pub mod nested {
    /// Most nested VMs one VM may have at a time.
    pub const MAX_VMS: usize = 4;
    /// Most vCPUs a nested VM may have.
    pub const MAX_VCPUS: u32 = 4;
    /// Alignment of a nested VM's memory (its start and size), and the size unit.
    pub const MEM_ALIGN: u64 = 2 << 20;
    /// Smallest nested VM memory (the system area, an image and a heap).
    pub const MIN_MEM: u64 = 8 << 20;

    /// [`Create::flags`]: load the ELF image this VM itself booted from (the guest VMM runs a
    /// copy of itself, in another mode). `ENODEV` where the host has no image (a VM restored
    /// from a snapshot).
    pub const CREATE_SELF_IMAGE: u32 = 1;

    /// What [`super::nr::NESTED_CREATE`] reads at its argument (8-byte aligned, in guest
    /// memory).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Create {
        /// Start of the nested VM's memory in the caller's memory: [`MEM_ALIGN`] aligned, at or
        /// above [`super::IMAGE_BASE`], not overlapping another nested VM's.
        pub mem_gpa: u64,
        /// Its size: a multiple of [`MEM_ALIGN`], at least [`MIN_MEM`], inside guest memory.
        pub mem_size: u64,
        /// vCPUs, `1..=MAX_VCPUS`; each is created by [`super::nr::NESTED_VCPU`].
        pub vcpus: u32,
        /// Bits: [`CREATE_SELF_IMAGE`].
        pub flags: u32,
        /// The SDK guest's ELF image in the caller's memory (unless [`CREATE_SELF_IMAGE`]).
        pub image_gpa: u64,
        /// Its length in bytes.
        pub image_len: u64,
        /// The nested guest's command line in the caller's memory (UTF-8).
        pub args_gpa: u64,
        /// Its length in bytes (at most [`super::BOOT_ARGS_MAX`]).
        pub args_len: u64,
    }

    /// A nested vCPU's general registers, as the guest VMM reads and sets them.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    #[allow(missing_docs)]
    pub struct Regs {
        pub rax: u64,
        pub rbx: u64,
        pub rcx: u64,
        pub rdx: u64,
        pub rsi: u64,
        pub rdi: u64,
        pub rsp: u64,
        pub rbp: u64,
        pub r8: u64,
        pub r9: u64,
        pub r10: u64,
        pub r11: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rip: u64,
        pub rflags: u64,
    }

    /// Exit reasons: what [`super::nr::NESTED_RUN`] returns and [`Exit::reason`] holds.
    pub mod exit {
        /// Not run yet.
        pub const NONE: u32 = 0;
        /// The nested guest made a hypercall (`out` to [`crate::port::HYPERCALL`]):
        /// [`super::Exit::nr`] and [`super::Exit::args`] (copied from its `VcpuPage`). Answer
        /// by storing the result in its `VcpuPage::ret` and running it again.
        pub const HYPERCALL: u32 = 1;
        /// An `out` to another port: [`super::Exit::port`], `size`, `data`.
        pub const IO_OUT: u32 = 2;
        /// An `in`: [`super::Exit::port`], `size`. The nested guest reads [`super::Exit::data`]
        /// (all ones unless the guest VMM stores another value there before running it again).
        pub const IO_IN: u32 = 3;
        /// A write outside the nested VM's memory: [`super::Exit::port`] is the address,
        /// `size`, `data`.
        pub const MMIO_WRITE: u32 = 4;
        /// A read outside its memory: address and size; it reads `data`, as for [`IO_IN`].
        pub const MMIO_READ: u32 = 5;
        /// A CPU exception, reported by the nested system area's stubs: [`super::Exit::vector`],
        /// `error_code`, `fault_rip`, `cr2` (page faults). The vCPU cannot go on as it is; the
        /// guest VMM may set its registers.
        pub const FAULT: u32 = 6;
        /// A triple fault: the vCPU is dead (set its registers, or destroy the VM).
        pub const SHUTDOWN: u32 = 7;
        /// `hlt` reached the host.
        pub const HLT: u32 = 8;
        /// The outer VM is being paused or stopped (a checkpoint, a shutdown): nothing
        /// happened to the nested guest; call `NESTED_RUN` again.
        pub const INTERRUPTED: u32 = 9;
        /// KVM could not run the vCPU (an entry failure or an instruction it cannot emulate):
        /// [`super::Exit::data`] holds KVM's hardware reason where it gave one.
        pub const FAILED: u32 = 10;
        /// The time slice `NESTED_RUN` was given passed without an exit: the nested guest was
        /// computing. Run it (or another nested vCPU) again.
        pub const TIMEOUT: u32 = 11;
    }

    /// The last exit of a nested vCPU, written by the host.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Exit {
        /// One of [`exit`].
        pub reason: u32,
        /// Access size in bytes (I/O and MMIO).
        pub size: u32,
        /// Port (I/O) or guest-physical address (MMIO).
        pub port: u64,
        /// Value written (I/O and MMIO writes, little-endian, zero-extended); for reads, the
        /// value the nested guest will read, all ones until the guest VMM changes it.
        pub data: u64,
        /// Hypercall number ([`exit::HYPERCALL`]).
        pub nr: u64,
        /// Hypercall arguments, copied from the nested vCPU's `VcpuPage`.
        pub args: [u64; 6],
        /// Exception vector ([`exit::FAULT`]).
        pub vector: u64,
        /// Error code the CPU pushed (0 where it pushes none).
        pub error_code: u64,
        /// Instruction pointer of the faulting instruction.
        pub fault_rip: u64,
        /// Faulting address of a page fault.
        pub cr2: u64,
    }

    /// The guest status area: the nested vCPU as the guest VMM sees it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct GuestStatus {
        /// The nested vCPU's registers, written by the host after every exit.
        pub regs: Regs,
        /// Set to non-zero by the guest VMM after it changed `regs`: the host loads them into
        /// the vCPU at the next `NESTED_RUN` (or hand-back) and clears it.
        pub regs_set: u64,
        /// The last exit.
        pub exit: Exit,
        /// Posted exits: the last [`HostStatus::exit_seq`] the guest VMM answered; storing the
        /// current one hands the vCPU back to the host.
        pub resume_seq: u64,
        /// Posted exits: non-zero while the guest VMM is about to block waiting for an exit
        /// (the host then wakes it).
        pub waiting: u64,
    }

    /// The host status area: what the host keeps for the guest VMM about a nested vCPU.
    /// Written by the host only (what the guest VMM writes there is ignored).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HostStatus {
        /// `NESTED_RUN` calls that returned an exit reason.
        pub runs: u64,
        /// Exits reported (all reasons but [`exit::INTERRUPTED`]).
        pub exits: u64,
        /// Nanoseconds spent inside the nested guest (`KVM_RUN`), summed.
        pub guest_ns: u64,
        /// The last exit reason.
        pub last_exit: u32,
        /// The last `NESTED_RUN`'s error (a negative errno), 0 if it succeeded.
        pub error: i32,
        /// Posted exits: exits posted so far; changes after the exit and registers are
        /// written.
        pub exit_seq: u64,
        /// Posted exits: non-zero while the host thread sleeps until the doorbell.
        pub sleeping: u32,
        /// Non-zero once [`super::nr::NESTED_START`] moved the vCPU to a host thread.
        pub started: u32,
    }

    /// Both areas of one nested vCPU, registered by [`super::nr::NESTED_VCPU`]: 8-byte
    /// aligned, in guest-writable memory outside every nested VM's memory.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Areas {
        /// The guest status area.
        pub guest: GuestStatus,
        /// The host status area.
        pub host: HostStatus,
    }

    // No padding anywhere (the structs are read and written as bytes).
    const _: () = assert!(core::mem::size_of::<Create>() == 56);
    const _: () = assert!(core::mem::size_of::<Exit>() == 14 * 8);
    const _: () = assert!(core::mem::size_of::<GuestStatus>() == 18 * 8 + 8 + 14 * 8 + 16);
    const _: () = assert!(core::mem::size_of::<HostStatus>() == 48);
    const _: () = assert!(core::mem::size_of::<Areas>() == 328);

    /// Byte offsets in [`Areas`] of the words the host and the guest VMM access atomically.
    pub const RESUME_SEQ_OFFSET: u64 = (core::mem::offset_of!(Areas, guest)
        + core::mem::offset_of!(GuestStatus, resume_seq))
        as u64;
    /// See [`RESUME_SEQ_OFFSET`].
    pub const WAITING_OFFSET: u64 =
        (core::mem::offset_of!(Areas, guest) + core::mem::offset_of!(GuestStatus, waiting)) as u64;
    /// See [`RESUME_SEQ_OFFSET`].
    pub const EXIT_SEQ_OFFSET: u64 =
        (core::mem::offset_of!(Areas, host) + core::mem::offset_of!(HostStatus, exit_seq)) as u64;
    /// See [`RESUME_SEQ_OFFSET`].
    pub const SLEEPING_OFFSET: u64 =
        (core::mem::offset_of!(Areas, host) + core::mem::offset_of!(HostStatus, sleeping)) as u64;
    const _: () = assert!(RESUME_SEQ_OFFSET.is_multiple_of(8) && WAITING_OFFSET.is_multiple_of(8));
    const _: () = assert!(EXIT_SEQ_OFFSET.is_multiple_of(8) && SLEEPING_OFFSET.is_multiple_of(4));
    const _: () = assert!(
        core::mem::size_of::<Areas>()
            == core::mem::size_of::<GuestStatus>() + core::mem::size_of::<HostStatus>()
    );
}

/// Offset of [`BootInfo::requests`] in the boot info page.
pub const BOOT_INFO_REQUESTS_OFFSET: u64 = core::mem::offset_of!(BootInfo, requests) as u64;
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= BOOT_ARGS_OFFSET);

/// One page per vCPU, read-write to the guest; `gs:0` holds its own address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuPage {
    /// The page's own guest address (so the guest finds it with one `mov rax, gs:[0]`).
    pub self_addr: u64,
    /// This vCPU's id.
    pub vcpu_id: u64,
    /// Hypercall arguments, in order.
    pub args: [u64; 6],
    /// Hypercall result, written by the VMM.
    pub ret: i64,
    /// The monotonic clock without an exit (ABI 1.5): see [`VcpuClock`].
    pub clock: VcpuClock,
    /// Heartbeat (ABI 1.7): the guest bumps it as it makes progress (the SDK dispatcher, once
    /// per pass of its loop). The VMM only reads it: a host agent tells a guest that stopped
    /// making progress from one that waits (blocked in [`nr::BLOCK`]) without a message.
    pub beat: u64,
    /// Requesters with work (ABI 1.10), one bit each: the VMM sets a requester's bit (an atomic
    /// OR, release) before it wakes the vCPU; the guest takes the word with one atomic swap to
    /// zero and looks only at the requesters whose bits were set. See [`indicator`].
    pub pending: u64,
    /// Which bit of `pending` each requester sets (ABI 1.10), by route slot (see
    /// [`indicator::slot`]): the bit + 1, 0 for none. Written by [`nr::INDICATOR_SET`] (or by the
    /// guest itself); the VMM reads it whenever a requester has work and ignores bad values.
    /// It lives in guest memory so that it follows the VM through snapshots, clones and live
    /// updates.
    pub routes: [u8; indicator::ROUTES],
}

/// Offset of [`VcpuPage::pending`] in a vCPU page.
pub const VCPU_PAGE_PENDING_OFFSET: u64 = core::mem::offset_of!(VcpuPage, pending) as u64;
/// Offset of [`VcpuPage::routes`] in a vCPU page.
pub const VCPU_PAGE_ROUTES_OFFSET: u64 = core::mem::offset_of!(VcpuPage, routes) as u64;

/// Requester indicators (ABI 1.10): with many event sources per VM, the VMM sets one bit per
/// requester that has work in the woken vCPU's [`VcpuPage::pending`] word, so the guest reads
/// which sources have work with one load (an atomic swap to zero) instead of scanning them all.
///
/// A requester is something the VMM completes or signals: the calling vCPU's own I/O ring,
/// a NIC's RX ring, a shared region's wake-ups, memory-class requests. The guest picks its bit
/// with [`super::nr::INDICATOR_SET`]; the route is kept in the vCPU page ([`VcpuPage::routes`]).
/// When a requester has work the VMM ORs its bit into the `pending` word of every vCPU that
/// routed it, then wakes whoever it wakes anyway (so a vCPU woken from `BLOCK` sees the bit).
/// Guest-only sources (a queue another VM fills) get their bits from whatever signals them:
/// a shared region's wake-up, or the guest's own code.
pub mod indicator {
    /// The calling vCPU's own I/O ring (`index` 0): request completions and timers.
    pub const KIND_IO: u64 = 0;
    /// NIC `index`'s RX ring: frames delivered.
    pub const KIND_NET: u64 = 1;
    /// Shared region `index` (an index into the [`super::share::ShareTable`]): another VM (or
    /// this one) rang this VM's doorbell in it.
    pub const KIND_SHARE: u64 = 2;
    /// Memory-class requests (`index` 0): the host posted a request in the class table.
    pub const KIND_MEMORY: u64 = 3;
    /// Nested VM `index` (a handle's low byte): the host posted an exit of one of its started
    /// vCPUs (ABI 1.10, [`super::nested`]).
    pub const KIND_NESTED: u64 = 4;
    /// `bit` for [`super::nr::INDICATOR_SET`]: remove the route.
    pub const NONE: u64 = u64::MAX;
    /// Route slots in a vCPU page.
    pub const ROUTES: usize = 32;
    /// First slot of the NIC routes.
    const NET_SLOT: usize = 1;
    /// First slot of the shared region routes.
    const SHARE_SLOT: usize = NET_SLOT + super::net::MAX_NICS;
    /// The memory-class slot.
    const MEMORY_SLOT: usize = SHARE_SLOT + super::share::MAX_REGIONS;
    /// First slot of the nested VM routes.
    const NESTED_SLOT: usize = MEMORY_SLOT + 1;

    /// The route slot of requester `index` of `kind`; None for an unknown kind or an index out
    /// of range.
    pub const fn slot(kind: u64, index: u64) -> Option<usize> {
        match kind {
            KIND_IO if index == 0 => Some(0),
            KIND_NET if index < super::net::MAX_NICS as u64 => Some(NET_SLOT + index as usize),
            KIND_SHARE if index < super::share::MAX_REGIONS as u64 => {
                Some(SHARE_SLOT + index as usize)
            }
            KIND_MEMORY if index == 0 => Some(MEMORY_SLOT),
            KIND_NESTED if index < super::nested::MAX_VMS as u64 => {
                Some(NESTED_SLOT + index as usize)
            }
            _ => None,
        }
    }

    /// The bit a route byte names; None for none (0) or a bad value.
    pub const fn bit_of(route: u8) -> Option<u32> {
        if route >= 1 && route <= 64 {
            Some(route as u32 - 1)
        } else {
            None
        }
    }

    const _: () = assert!(NESTED_SLOT + super::nested::MAX_VMS <= ROUTES);
}

/// Offset of [`VcpuPage::beat`] in a vCPU page.
pub const VCPU_PAGE_BEAT_OFFSET: u64 = core::mem::offset_of!(VcpuPage, beat) as u64;

/// Offset of [`VcpuPage::clock`] in a vCPU page.
pub const VCPU_PAGE_CLOCK_OFFSET: u64 = core::mem::offset_of!(VcpuPage, clock) as u64;

/// How a vCPU reads [`nr::CLOCK_MONOTONIC`]'s clock from its time-stamp counter (ABI 1.5),
/// without leaving the guest: an exit costs tens of microseconds where `rdtsc` costs tens of
/// nanoseconds.
///
/// The VMM writes it into the vCPU's own page, only while that vCPU is out of the guest (at
/// start, and when a rollback or restore may have changed its TSC), bumping `seq` each time. A
/// reader takes `seq`, the fields and `rdtsc`, then `seq` again, and retries if it changed (an
/// exit in between may have rewritten the page). With [`clock_flags::TSC`] clear, use the
/// hypercall.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuClock {
    /// Changes whenever the VMM rewrites the other fields.
    pub seq: u32,
    /// Bits of [`clock_flags`].
    pub flags: u32,
    /// The vCPU's TSC at `ns_base`.
    pub tsc_base: u64,
    /// The clock at `tsc_base`, in nanoseconds.
    pub ns_base: u64,
    /// Nanoseconds per TSC tick, in 32.32 fixed point.
    pub mul: u64,
}

impl VcpuClock {
    /// The clock when the TSC reads `tsc` (never before `ns_base`).
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let ticks = u128::from(tsc.saturating_sub(self.tsc_base));
        self.ns_base
            .wrapping_add(((ticks * u128::from(self.mul)) >> 32) as u64)
    }
}

/// Bits of [`VcpuClock::flags`].
pub mod clock_flags {
    /// The fields are valid: the clock is `ns_at(rdtsc())`.
    pub const TSC: u32 = 1;
}

/// The asynchronous I/O ring: requests in guest memory, completed without an interrupt.
///
/// Layout at the registered address: an [`IoRingHeader`], then `entries` × [`IoRequest`].
/// The guest fills `requests[producer % entries]`, then advances `producer` (release) and
/// rings [`port::DOORBELL`]. The VMM processes requests in order, writes each one's result into
/// the `u64` completion indicator at `IoRequest::completion` (see [`completion`]) and advances
/// `consumer`. A vCPU blocked in [`nr::BLOCK`] is woken when its ring completes a request.
pub mod io {
    /// Read `len` bytes of the disk at `offset` into `buf`.
    pub const OP_READ: u32 = 1;
    /// Write `len` bytes from `buf` to the disk at `offset`.
    pub const OP_WRITE: u32 = 2;
    /// Make earlier writes durable.
    pub const OP_FLUSH: u32 = 3;
    /// Complete after `offset` nanoseconds (a timer with no exit and no interrupt).
    pub const OP_TIMER: u32 = 4;

    /// Most entries a ring may have.
    pub const MAX_ENTRIES: u32 = 4096;
    /// Largest single transfer.
    pub const MAX_TRANSFER: u32 = 1 << 20;
    /// Disk offsets and lengths must be multiples of this.
    pub const SECTOR_SIZE: u64 = 512;

    /// Start of the ring.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IoRingHeader {
        /// Requests submitted so far (wrapping), written by the guest.
        pub producer: u32,
        /// Requests completed so far (wrapping), written by the VMM.
        pub consumer: u32,
    }

    /// One request. `completion` is the guest address of an 8-byte aligned `u64` the
    /// guest zeroed before submitting.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IoRequest {
        /// One of the `OP_*` values.
        pub op: u32,
        /// Transfer length in bytes.
        pub len: u32,
        /// Guest address of the data buffer.
        pub buf: u64,
        /// Disk byte offset (or delay in ns for [`OP_TIMER`]).
        pub offset: u64,
        /// Guest address of the completion indicator.
        pub completion: u64,
    }

    /// Size of the header in bytes.
    pub const HEADER_SIZE: u64 = core::mem::size_of::<IoRingHeader>() as u64;
    /// Size of one request in bytes.
    pub const REQUEST_SIZE: u64 = core::mem::size_of::<IoRequest>() as u64;

    /// Bytes a ring of `entries` requests occupies.
    pub const fn ring_size(entries: u32) -> u64 {
        HEADER_SIZE + REQUEST_SIZE * entries as u64
    }
}

/// Shared memory between VMs (ABI 1.2): named regions the VMM maps into a window of
/// guest-physical (and, identity-mapped, virtual) space, read-write or read-only per VM.
///
/// Each region starts with [`HEADER_SIZE`] bytes the VMMs and guests agree on:
///
/// ```text
/// +0x0000  RegionHeader (magic, size, name)
/// +0x1000  members: MAX_MEMBERS x Member (64 bytes): one slot per VM attached
/// +0x2000  locks: MAX_LOCKS x LockEntry (32 bytes): the lock table the VMMs can recover
/// +0x4000  data: the guests' own (queues, caches, anything)
/// ```
///
/// Guests find their regions in the read-only [`ShareTable`] page at [`TABLE_ADDR`].
pub mod share {
    /// Guest-physical (= virtual) start of the window regions are mapped in: 64 GiB, above
    /// any guest memory.
    pub const WINDOW_BASE: u64 = 64 << 30;
    /// Size of the window.
    pub const WINDOW_SIZE: u64 = 16 << 30;
    /// Regions are placed and sized in multiples of this (the window's page size).
    pub const ALIGN: u64 = 2 << 20;
    /// The read-only page listing this VM's regions.
    pub const TABLE_ADDR: u64 = 0x1F_0000;
    /// Most regions one VM can attach.
    pub const MAX_REGIONS: usize = 16;
    /// Most VMs attached to one region.
    pub const MAX_MEMBERS: usize = 64;
    /// Locks in a region's lock table.
    pub const MAX_LOCKS: usize = 256;
    /// `RegionHeader::magic`: "RBNDSHR1".
    pub const MAGIC: u64 = u64::from_le_bytes(*b"RBNDSHR1");
    /// `ShareTable::magic`: "RBNDSHTB".
    pub const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"RBNDSHTB");
    /// Offset of the member slots.
    pub const MEMBERS_OFFSET: u64 = 0x1000;
    /// Offset of the lock table.
    pub const LOCKS_OFFSET: u64 = 0x2000;
    /// Bytes before the data area.
    pub const HEADER_SIZE: u64 = 0x4000;
    /// A work queue in a region's data area (the SDK's `share::Queue`) starts with this magic;
    /// the host reads the queue's depth from it (ABI 1.9): capacity, enqueue and dequeue
    /// positions at these byte offsets from the queue's start.
    pub const QUEUE_MAGIC: u64 = u64::from_le_bytes(*b"RBNDQUE1");
    /// See [`QUEUE_MAGIC`].
    pub const QUEUE_CAPACITY_OFFSET: u64 = 8;
    /// See [`QUEUE_MAGIC`].
    pub const QUEUE_ENQ_OFFSET: u64 = 64;
    /// See [`QUEUE_MAGIC`].
    pub const QUEUE_DEQ_OFFSET: u64 = 128;

    /// `ShareEntry::flags`: this VM may write the region.
    pub const WRITABLE: u32 = 1;
    /// `ShareEntry::flags`: a persistent cache owned by this VM's identity.
    pub const CACHE: u32 = 2;

    /// Lock word: holder slot + 1 in the low byte (0: free) ...
    pub const LOCK_HOLDER_MASK: u64 = 0xff;
    /// ... a member holding the lock (or reading under it) died or was rolled back: the data it
    /// protects may be inconsistent. Reported to, and cleared by, the next holder ...
    pub const LOCK_INCONSISTENT: u64 = 1 << 8;
    /// ... and a count of recoveries above (diagnostic).
    pub const LOCK_RECOVERY_SHIFT: u32 = 32;

    /// The start of a region.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RegionHeader {
        /// [`MAGIC`].
        pub magic: u64,
        /// Layout version (1).
        pub version: u32,
        /// Reserved.
        pub flags: u32,
        /// Region size in bytes.
        pub size: u64,
        /// Name, NUL-padded.
        pub name: [u8; 32],
        /// Identity owning a persistent cache (NUL-padded; empty for plain regions).
        pub owner: [u8; 32],
        /// Hash of the guest image that filled a persistent cache.
        pub image_hash: u64,
        /// Times a VM attached (diagnostic).
        pub attaches: u64,
    }

    /// One VM's slot in a region. The guest writes `busy` and `notify`; VMMs the rest.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Member {
        /// Id of the VM holding the slot (0: free).
        pub vm_id: u64,
        /// 1 while the VM's dispatcher runs tasks, 0 while it is idle (about to block).
        pub busy: u32,
        /// Bumped (and futex-woken) by whoever wakes this VM.
        pub doorbell: u32,
        /// Slots this VM wants woken (its guest sets bits, then rings the doorbell port).
        pub notify: u64,
        /// Times this VM was woken (counted by the waker's VMM).
        pub wakeups: u64,
        /// The holder's host process id (diagnostic).
        pub pid: u32,
        /// [`WRITABLE`] if the holder may write the region.
        pub rights: u32,
        /// Reserved.
        pub reserved: [u64; 3],
    }

    /// A lock in the lock table.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LockEntry {
        /// Holder and flags (see `LOCK_*`).
        pub word: u64,
        /// Members holding it shared (bit per slot).
        pub readers: u64,
        /// Members waiting for it (bit per slot): wake them on release.
        pub waiters: u64,
        /// Reserved.
        pub reserved: u64,
    }

    /// One region as this VM sees it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ShareEntry {
        /// Name, NUL-padded.
        pub name: [u8; 32],
        /// Guest address of the region (its [`RegionHeader`]).
        pub addr: u64,
        /// Size in bytes.
        pub size: u64,
        /// [`WRITABLE`], [`CACHE`].
        pub flags: u32,
        /// This VM's member slot in the region.
        pub slot: u32,
    }

    /// The page at [`TABLE_ADDR`]: the regions attached to this VM. `generation` changes when a
    /// region is attached or detached while the VM runs.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ShareTable {
        /// [`TABLE_MAGIC`].
        pub magic: u64,
        /// Changes on every attach or detach.
        pub generation: u32,
        /// Entries in use.
        pub count: u32,
        /// This VM's id in every region's member slots.
        pub vm_id: u64,
        /// The regions.
        pub entries: [ShareEntry; MAX_REGIONS],
    }

    /// Offset of member `slot` in a region.
    pub const fn member_offset(slot: usize) -> u64 {
        MEMBERS_OFFSET + (slot as u64) * core::mem::size_of::<Member>() as u64
    }

    /// Offset of lock `index` in a region.
    pub const fn lock_offset(index: usize) -> u64 {
        LOCKS_OFFSET + (index as u64) * core::mem::size_of::<LockEntry>() as u64
    }

    const _: () = assert!(core::mem::size_of::<Member>() == 64);
    const _: () = assert!(core::mem::size_of::<LockEntry>() == 32);
    const _: () = assert!(core::mem::size_of::<RegionHeader>() <= MEMBERS_OFFSET as usize);
    const _: () = assert!(member_offset(MAX_MEMBERS) <= LOCKS_OFFSET);
    const _: () = assert!(lock_offset(MAX_LOCKS) <= HEADER_SIZE);
    const _: () = assert!(core::mem::size_of::<ShareTable>() <= 4096);
    const _: () = assert!(MAX_MEMBERS <= 64, "bitmaps are u64");
}

/// Network devices (ABI 1.4): rings of frame descriptors in guest memory, completed without
/// an interrupt.
///
/// Layout at the address given to [`nr::NET_SETUP`] (8-byte aligned, in the guest's writable
/// memory): a [`NetRingHeader`], then `tx_entries` × [`NetDesc`] (the TX ring), then
/// `rx_entries` × [`NetDesc`] (the RX ring). Entry counts are powers of two up to
/// [`MAX_ENTRIES`]; indices are free-running `u32`s, an entry's slot is `index % entries`.
///
/// - **TX**: the guest puts a frame in a buffer, fills `tx[tx_producer % n]` with its address
///   and length, advances `tx_producer` (release) and, once per batch, rings
///   [`super::port::NET_DOORBELL`]. The VMM sends every frame up to `tx_producer` and advances
///   `tx_consumer`; a buffer below `tx_consumer` may be reused.
/// - **RX**: the guest posts empty buffers: `rx[rx_producer % n]` = address and capacity, then
///   advances `rx_producer`. For each frame that arrives the VMM takes the next posted buffer,
///   copies the frame in, writes its length into the descriptor's `len` and advances
///   `rx_consumer` (release). Frames that arrive with no buffer posted, or larger than the
///   buffer, are dropped (and counted).
/// - **Waking**: before blocking in [`super::nr::BLOCK`] the guest sets `rx_idle` to 1 and
///   looks at the rings once more; after delivering a batch the VMM wakes the NIC's vCPU if
///   `rx_idle` is 1 and sets it to 0. One wake-up per batch, none while the guest is busy.
///
/// Everything the guest writes is checked: a descriptor naming memory outside the guest's
/// writable range, a length over the frame limit, or a producer more than `entries` ahead of
/// its consumer makes the VMM set [`RING_BROKEN`] and ignore the NIC until it is set up again.
pub mod net {
    /// Most NICs one VM can have.
    pub const MAX_NICS: usize = 8;
    /// Most entries a ring may have.
    pub const MAX_ENTRIES: u32 = 4096;
    /// Largest MTU.
    pub const MAX_MTU: u16 = 9000;
    /// Bytes a frame may have beyond its MTU (Ethernet header and a VLAN tag).
    pub const FRAME_OVERHEAD: u32 = 18;
    /// [`NetRingHeader::flags`]: the VMM found a bad descriptor or index and stopped using the
    /// rings (until [`super::nr::NET_SETUP`] again).
    pub const RING_BROKEN: u32 = 1;
    /// [`NetRingHeader::flags`]: the host side of the NIC has a working path.
    pub const LINK_UP: u32 = 2;

    /// One NIC as the VMM describes it in [`super::BootInfo`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NicInfo {
        /// The NIC's MAC address.
        pub mac: [u8; 6],
        /// Its MTU (bytes of IP packet per frame).
        pub mtu: u16,
        /// Reserved (zero).
        pub flags: u32,
        /// Reserved (zero).
        pub reserved: u32,
    }

    /// The start of a NIC's ring area.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NetRingHeader {
        /// Frames the guest queued for sending (free-running), written by the guest.
        pub tx_producer: u32,
        /// Frames the VMM has taken (free-running), written by the VMM.
        pub tx_consumer: u32,
        /// Buffers the guest posted for receiving (free-running), written by the guest.
        pub rx_producer: u32,
        /// Buffers the VMM filled (free-running), written by the VMM.
        pub rx_consumer: u32,
        /// 1: the guest is about to block and wants a wake-up when frames arrive. Set by the
        /// guest, cleared by the VMM when it wakes it.
        pub rx_idle: u32,
        /// [`RING_BROKEN`], [`LINK_UP`], written by the VMM.
        pub flags: u32,
        /// Reserved (zero).
        pub reserved: [u32; 10],
    }

    /// A frame buffer: its address and length (TX: the frame's length; RX: the buffer's
    /// capacity when posted, the frame's length once filled).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NetDesc {
        /// Guest address of the buffer.
        pub addr: u64,
        /// Length in bytes.
        pub len: u32,
        /// Reserved (zero).
        pub flags: u32,
    }

    /// Size of the header in bytes.
    pub const HEADER_SIZE: u64 = core::mem::size_of::<NetRingHeader>() as u64;
    /// Size of a descriptor in bytes.
    pub const DESC_SIZE: u64 = core::mem::size_of::<NetDesc>() as u64;
    /// Bytes a ring area with these entry counts occupies.
    pub const fn area_size(tx_entries: u32, rx_entries: u32) -> u64 {
        HEADER_SIZE + DESC_SIZE * (tx_entries as u64 + rx_entries as u64)
    }
    /// Offset of TX descriptor `slot`.
    pub const fn tx_desc(slot: u32) -> u64 {
        HEADER_SIZE + DESC_SIZE * slot as u64
    }
    /// Offset of RX descriptor `slot` in an area with `tx_entries` TX entries.
    pub const fn rx_desc(tx_entries: u32, slot: u32) -> u64 {
        HEADER_SIZE + DESC_SIZE * (tx_entries as u64 + slot as u64)
    }

    const _: () = assert!(core::mem::size_of::<NicInfo>() == 16);
    const _: () = assert!(core::mem::size_of::<NetRingHeader>() == 64);
    const _: () = assert!(core::mem::size_of::<NetDesc>() == 16);
}

/// Encoding of the completion indicator word.
pub mod completion {
    /// Set once the request is complete; the low 32 bits then hold the result.
    pub const DONE: u64 = 1 << 63;

    /// The word the VMM stores for a result (`>= 0` bytes, or a negative errno).
    pub const fn encode(result: i32) -> u64 {
        DONE | (result as u32 as u64)
    }

    /// `None` while pending, else the result.
    pub const fn decode(word: u64) -> Option<i32> {
        if word & DONE == 0 {
            None
        } else {
            Some(word as u32 as i32)
        }
    }
}

// The wire layout is the ABI: any change here is a major version bump, except a field appended
// to the vCPU page (a whole page each: older guests never touch the tail; 1.7 added `beat`).
// Checked when compiling.
const _: () = assert!(core::mem::size_of::<BootInfo>() == 216);
const _: () = assert!(core::mem::size_of::<VcpuPage>() == 152);
const _: () = assert!(VCPU_PAGE_PENDING_OFFSET == 112);
const _: () = assert!(core::mem::size_of::<VcpuClock>() == 32);
const _: () = assert!(core::mem::size_of::<memory::Range>() == 24);
const _: () = assert!(core::mem::size_of::<memory::Table>() == 48 + 24 * memory::MAX_RANGES);
const _: () = assert!(io::HEADER_SIZE == 8);
const _: () = assert!(io::REQUEST_SIZE == 32);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= BOOT_ARGS_OFFSET);
// A 32-bit `out` covers four ports of the I/O bitmap: keep the ports a dword apart.
const _: () = assert!(port::DOORBELL >= port::HYPERCALL + 4);
const _: () = assert!(port::FAULT >= port::DOORBELL + 4);
const _: () = assert!(port::SHARE_DOORBELL >= port::FAULT + 4);
const _: () = assert!(port::NET_DOORBELL >= port::SHARE_DOORBELL + 4);
const _: () = assert!(port::NESTED_DOORBELL >= port::NET_DOORBELL + 4);

// SAFETY: plain `repr(C)` structs of integers: every byte pattern is a valid value and there is
// no padding (sizes are checked in the tests below).
#[cfg(feature = "vm-memory")]
mod byte_valued {
    use vm_memory::ByteValued;
    // SAFETY: see above.
    unsafe impl ByteValued for super::BootInfo {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::VcpuPage {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::VcpuClock {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::io::IoRingHeader {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::net::NetRingHeader {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::net::NetDesc {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::net::NicInfo {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::io::IoRequest {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::share::ShareTable {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::share::ShareEntry {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::share::RegionHeader {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::memory::Table {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::memory::Range {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::program::Range {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::program::Fault {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::nested::Create {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::nested::Regs {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::nested::Exit {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::nested::GuestStatus {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::nested::HostStatus {}
    // SAFETY: see above.
    unsafe impl ByteValued for super::nested::Areas {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_round_trips() {
        assert_eq!(completion::decode(0), None);
        assert_eq!(completion::decode(completion::encode(4096)), Some(4096));
        assert_eq!(completion::decode(completion::encode(-14)), Some(-14));
        assert_eq!(completion::decode(completion::encode(0)), Some(0));
    }

    #[test]
    fn the_tsc_clock_scales_and_never_runs_back() {
        // 2.5 GHz: 0.4 ns per tick.
        let c = VcpuClock {
            seq: 2,
            flags: clock_flags::TSC,
            tsc_base: 1_000,
            ns_base: 7_000,
            mul: (1u64 << 32) * 2 / 5,
        };
        assert_eq!(c.ns_at(1_000), 7_000);
        assert_eq!(c.ns_at(1_000 + 2_500_000_000), 7_000 + 1_000_000_000 - 1);
        assert_eq!(
            c.ns_at(10),
            7_000,
            "a TSC before the base reads as the base"
        );
        assert_eq!(
            c.ns_at(u64::MAX),
            c.ns_base
                .wrapping_add(((u128::from(u64::MAX - 1_000) * u128::from(c.mul)) >> 32) as u64)
        );
        assert_eq!(VCPU_PAGE_CLOCK_OFFSET, 72);
    }

    #[test]
    fn indicator_routes_are_distinct_and_checked() {
        use indicator::*;
        assert_eq!(slot(KIND_IO, 0), Some(0));
        assert_eq!(slot(KIND_IO, 1), None, "only the caller's own ring");
        assert_eq!(slot(KIND_NET, 7), Some(8));
        assert_eq!(slot(KIND_NET, 8), None);
        assert_eq!(slot(KIND_SHARE, 0), Some(9));
        assert_eq!(slot(KIND_SHARE, 16), None);
        assert_eq!(slot(KIND_MEMORY, 0), Some(25));
        assert_eq!(slot(KIND_MEMORY, 1), None);
        assert_eq!(slot(KIND_NESTED, 0), Some(26));
        assert_eq!(slot(KIND_NESTED, 3), Some(29));
        assert_eq!(slot(KIND_NESTED, 4), None);
        assert_eq!(slot(5, 0), None);
        assert_eq!(slot(u64::MAX, u64::MAX), None);
        assert_eq!(bit_of(0), None);
        assert_eq!(bit_of(1), Some(0));
        assert_eq!(bit_of(64), Some(63));
        assert_eq!(bit_of(65), None);
        assert_eq!(bit_of(255), None);
    }

    #[test]
    fn version_packs_major_and_minor() {
        assert_eq!(ABI_VERSION >> 16, ABI_MAJOR);
        assert_eq!(ABI_VERSION & 0xffff, ABI_MINOR);
    }
}
