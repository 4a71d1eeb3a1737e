//! Trapping operations the VMM emulates (ABI 1.10): port 0x80 (promoted to an ioeventfd when
//! hot), `rdmsr` of the time-stamp MSRs and `hlt` (the CPU faults on them at CPL3; the VMM
//! emulates and resumes), and `cpuid` (here it traps to the hypervisor below the VMM). Each mode
//! checks its results stay the same however the operation is served, and prints ns per op.

use core::arch::asm;

use rebound_guest::{hypercall, println, time};

pub fn run(mode: &str, cpu: &rebound_guest::Cpu, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    match mode {
        "emumulti" => Some(multi(cpu, arg(1, 20000))),
        "emupost" => Some(post(arg(1, 50), arg(2, 0x42) as u8, arg(3, 4), arg(4, 0))),
        "emurdmsr" => Some(rdmsr_loop(arg(1, 1000))),
        "emucpuid" => Some(cpuid_loop(arg(1, 1000), arg(2, 0) != 0)),
        "emusmc" => Some(smc()),
        "emuprog" => Some(with_program(arg(1, 1000))),
        "emucall" => Some(call_loop(arg(1, 1_000_000))),
        "emuhlt" => {
            println!("emuhlt: halting");
            // SAFETY: `hlt` only waits (the VMM emulates it as a block until an event).
            unsafe { asm!("hlt", options(nomem, nostack)) };
            println!("emuhlt: woke");
            Some(0)
        }
        _ => None,
    }
}

fn out80(v: u8) {
    // SAFETY: port 0x80 is the VMM's emulated POST port; writing it has no other effect.
    unsafe { asm!("out 0x80, al", in("al") v, options(nomem, nostack, preserves_flags)) };
}

fn in80() -> u8 {
    let v: u8;
    // SAFETY: as above; reading returns the last byte written.
    unsafe { asm!("in al, 0x80", out("al") v, options(nomem, nostack, preserves_flags)) };
    v
}

/// `rounds` rounds of `n` writes of `value` from one site, each timed, then reads back: the
/// last byte written must come back whether the writes exited or were absorbed. With
/// `quiet_ms`, the guest then leaves the port alone that long (twice, so the VMM judges a whole
/// quiet window) and writes once more.
fn post(n: u64, value: u8, rounds: u64, quiet_ms: u64) -> i32 {
    for r in 0..rounds {
        let t0 = time::monotonic_ns();
        for _ in 0..n {
            out80(value);
        }
        let dt = time::monotonic_ns() - t0;
        let got = in80();
        println!(
            "emupost round {r} n={n} ns_per_op={} last={got:#x}",
            dt / n.max(1)
        );
        if got != value {
            println!("emupost: read {got:#x} after writing {value:#x}");
            return 1;
        }
    }
    // Another value exits (only one is promoted); the register follows it, then the hot one.
    let other = value ^ 0x5a;
    out80(other);
    let a = in80();
    out80(value);
    let b = in80();
    if a != other || b != value {
        println!("emupost: read {a:#x}, {b:#x}; wanted {other:#x}, {value:#x}");
        return 1;
    }
    if quiet_ms > 0 {
        for _ in 0..2 {
            let until = time::monotonic_ns() + quiet_ms * 1_000_000;
            while time::monotonic_ns() < until {
                hypercall::block(until - time::monotonic_ns());
            }
            // A read exits: the VMM judges the promoted value after it.
            let _ = in80();
        }
        out80(value ^ 1);
        out80(value);
        let got = in80();
        println!("emupost quiet {quiet_ms} ms, then last={got:#x}");
        if got != value {
            return 1;
        }
    }
    println!("emupost ok");
    0
}

fn rdmsr(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdmsr` faults at CPL3; the VMM emulates reads of the TSC MSRs and resumes.
    unsafe {
        asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn rdmsr_loop(n: u64) -> i32 {
    let aux = rdmsr(0xc000_0103);
    let tsc0 = rdmsr(0x10);
    let t0 = time::monotonic_ns();
    for _ in 0..n {
        if rdmsr(0xc000_0103) != aux {
            println!("emurdmsr: TSC_AUX changed");
            return 1;
        }
    }
    let dt = time::monotonic_ns() - t0;
    let tsc1 = rdmsr(0x10);
    if tsc1 <= tsc0 {
        println!("emurdmsr: TSC went from {tsc0} to {tsc1}");
        return 1;
    }
    println!("emurdmsr n={n} ns_per_op={} aux={aux} ok", dt / n.max(1));
    0
}

// `rb_raw_cpuid` is a bare label (no `.type @function`), so the VMM does not decode it and
// leaves its `cpuid` unarmed: it traps to the hypervisor below, the path before replacement.
// `rb_smc` is a function alone in its page, with a hot `cpuid` followed by a `mov eax, imm32`
// whose immediate the guest rewrites (self-modifying code on a replaced page).
core::arch::global_asm!(
    ".pushsection .text.rb_raw_cpuid,\"ax\",@progbits",
    ".globl rb_raw_cpuid",
    "rb_raw_cpuid:",
    "push rbx",
    "mov eax, edi",
    "xor ecx, ecx",
    "cpuid",
    "mov [rsi], eax",
    "mov [rsi + 4], ebx",
    "mov [rsi + 8], ecx",
    "mov [rsi + 12], edx",
    "pop rbx",
    "ret",
    ".popsection",
    ".pushsection .text.rb_smc,\"ax\",@progbits",
    ".p2align 12",
    ".globl rb_smc",
    ".type rb_smc,@function",
    "rb_smc:",
    "push rbx",
    "mov eax, edi",
    "xor ecx, ecx",
    "cpuid",
    ".globl rb_smc_mov",
    "rb_smc_mov:",
    "mov eax, 0x11111111",
    "pop rbx",
    "ret",
    ".size rb_smc, . - rb_smc",
    // A displaced instruction that writes its own page: the write faults in the trampoline.
    ".globl rb_smc_store",
    ".type rb_smc_store,@function",
    "rb_smc_store:",
    "push rbx",
    "lea rdi, [rip + rb_smc_data]",
    "xor eax, eax",
    "xor ecx, ecx",
    "cpuid",
    "mov [rdi], eax",
    "mov [rdi + 4], ebx",
    "pop rbx",
    "ret",
    ".size rb_smc_store, . - rb_smc_store",
    ".globl rb_smc_data",
    "rb_smc_data:",
    ".quad 0",
    ".p2align 12",
    ".popsection",
);

unsafe extern "C" {
    fn rb_raw_cpuid(leaf: u32, out: *mut [u32; 4]);
    fn rb_smc(leaf: u32) -> u32;
    fn rb_smc_store();
    static rb_smc_mov: u8;
    static rb_smc_data: u64;
}

fn raw_cpuid(leaf: u32) -> [u32; 4] {
    let mut r = [0u32; 4];
    // SAFETY: `rb_raw_cpuid` writes 16 bytes at `out` and follows the C ABI.
    unsafe { rb_raw_cpuid(leaf, &mut r) };
    r
}

/// One armed `cpuid` site (the VMM found it in this function).
#[inline(never)]
fn leaf(l: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(l, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Written by the host to end the spin of `emucpuid N 1`.
static SPIN_DONE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// `cpuid` leaf 0 timed on each path, results compared throughout: unarmed (traps to the
/// hypervisor below), armed and emulated by the VMM (the site's first 30 runs), and after the
/// site turned hot and was replaced (N runs). Leaf 0x80000000 then takes the trampoline's
/// fallback (the real `cpuid`). With `spin`, it keeps checking leaf 0 until the host writes
/// the flag (a snapshot or rollback lands meanwhile), then runs the self-modifying test.
fn cpuid_loop(n: u64, spin: bool) -> i32 {
    let time = |k: u64, f: &mut dyn FnMut() -> bool| -> Option<u64> {
        let t0 = time::monotonic_ns();
        for _ in 0..k {
            if !f() {
                return None;
            }
        }
        Some((time::monotonic_ns() - t0) / k.max(1))
    };
    let raw0 = raw_cpuid(0);
    let Some(trap) = time(200, &mut || raw_cpuid(0) == raw0) else {
        println!("emucpuid: unarmed leaf 0 changed");
        return 1;
    };
    let first = leaf(0);
    let ext = leaf(0x8000_0000);
    if first != raw0 {
        println!("emucpuid: emulated leaf 0 {first:x?}, native {raw0:x?}");
        return 1;
    }
    let Some(emulated) = time(30, &mut || leaf(0) == first) else {
        println!("emucpuid: emulated leaf 0 changed");
        return 1;
    };
    // The site turns hot at its 64th trap and runs from the copy after.
    if time(100, &mut || leaf(0) == first).is_none() {
        println!("emucpuid: leaf 0 changed while the site turned hot");
        return 1;
    }
    let Some(replaced) = time(n, &mut || leaf(0) == first) else {
        println!("emucpuid: leaf 0 changed after replacement");
        return 1;
    };
    if time(10, &mut || leaf(0x8000_0000) == ext).is_none() {
        println!("emucpuid: leaf 0x80000000 changed (fallback)");
        return 1;
    }
    // The replaced site against a plain call in the same loop shape, in alternating batches
    // (the host is shared: the best batch of each, ps per op).
    let batch = (n / 8).max(1);
    let (mut replaced_ps, mut call_ps) = (u64::MAX, u64::MAX);
    let want = first[0] ^ first[1] ^ first[2] ^ first[3];
    for _ in 0..8 {
        let t0 = time::monotonic_ns();
        let mut acc = 0u32;
        for _ in 0..batch {
            let r = leaf(core::hint::black_box(0));
            acc = acc.wrapping_add(r[0] ^ r[1] ^ r[2] ^ r[3]);
        }
        replaced_ps = replaced_ps.min((time::monotonic_ns() - t0) * 1000 / batch);
        if acc != want.wrapping_mul(batch as u32) {
            println!("emucpuid: leaf 0 changed in the timed loop");
            return 1;
        }
        let t0 = time::monotonic_ns();
        let mut acc = 0u32;
        for i in 0..batch {
            let r = leaf0(core::hint::black_box(i));
            acc = acc.wrapping_add(r.0 ^ r.1 ^ r.2 ^ r.3);
        }
        call_ps = call_ps.min((time::monotonic_ns() - t0) * 1000 / batch);
        core::hint::black_box(acc);
    }
    println!(
        "emucpuid n={n} ns_per_op={replaced} trap_ns={trap} emulated_ns={emulated} \
         replaced_ps={replaced_ps} call_ps={call_ps} max_leaf={} ok",
        first[0]
    );
    if spin {
        println!(
            "emucpuid: spinning, flag at {:#x}",
            &raw const SPIN_DONE as u64
        );
        let mut runs = 0u64;
        while SPIN_DONE.load(core::sync::atomic::Ordering::Relaxed) == 0 {
            if leaf(0) != first || leaf(0x8000_0000) != ext {
                println!("emucpuid: results changed while spinning after {runs} runs");
                return 1;
            }
            runs += 1;
        }
        println!("emucpuid: spin done, results intact");
        return smc();
    }
    0
}

/// A replaced site, then a program run (its own page tables) and back: the supervisor runs
/// from the copy again (no trap: the host checks the site's count), and its write watch still
/// works (the self-modifying test).
fn with_program(n: u64) -> i32 {
    // A program run before the replacement too: the VMM's view of the supervisor's system
    // registers is first taken then, with the boot tree in CR3.
    if !crate::programs::run_once() {
        println!("emuprog: the first program run failed");
        return 1;
    }
    let first = leaf(0);
    for _ in 0..100 {
        if leaf(0) != first {
            println!("emuprog: leaf 0 changed");
            return 1;
        }
    }
    if !crate::programs::run_once() {
        println!("emuprog: the program run failed");
        return 1;
    }
    for _ in 0..n {
        if leaf(0) != first {
            println!("emuprog: leaf 0 changed after the program");
            return 1;
        }
    }
    println!("emuprog: {n} runs after the program");
    smc()
}

const SMC_VALUES: [u32; 3] = [0x1111_1111, 0x1111_1122, 0x1111_1133];

static ARRIVED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static SMC_DONE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static READER: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Two or more vCPUs: all run the same `cpuid` site N times (it is replaced while they run)
/// and check their results; then vCPU 0 runs the self-modifying test while the others keep
/// running `rb_smc` and check that its value only moves forward (no vCPU runs a dropped copy
/// after the write that dropped it).
fn multi(cpu: &rebound_guest::Cpu, n: u64) -> i32 {
    use core::sync::atomic::Ordering::SeqCst;
    let count = cpu.count();
    ARRIVED.fetch_add(1, SeqCst);
    while ARRIVED.load(SeqCst) < count {
        core::hint::spin_loop();
    }
    let first = leaf(0);
    let ext = leaf(0x8000_0000);
    for i in 0..n {
        if leaf(0) != first || (i % 16 == 0 && leaf(0x8000_0000) != ext) {
            println!("emumulti: vCPU {}: results changed at run {i}", cpu.id());
            return 1;
        }
    }
    if cpu.id() != 0 {
        let mut seen = 0usize;
        let mut runs = 0u64;
        while !SMC_DONE.load(SeqCst) {
            // SAFETY: `rb_smc` follows the C ABI and only runs `cpuid`.
            let v = unsafe { rb_smc(0) };
            let Some(k) = SMC_VALUES.iter().position(|x| *x == v) else {
                println!("emumulti: vCPU {}: rb_smc returned {v:#x}", cpu.id());
                READER.store(u64::MAX, SeqCst);
                return 1;
            };
            if k < seen {
                println!(
                    "emumulti: vCPU {}: rb_smc went back from {:#x} to {v:#x}",
                    cpu.id(),
                    SMC_VALUES[seen]
                );
                READER.store(u64::MAX, SeqCst);
                return 1;
            }
            seen = k;
            runs += 1;
        }
        READER.fetch_add(1, SeqCst);
        println!("emumulti: vCPU {} ran rb_smc {runs} times", cpu.id());
        return 0;
    }
    let r = smc();
    SMC_DONE.store(true, SeqCst);
    while READER.load(SeqCst) < u64::from(count - 1) {
        hypercall::yield_now();
    }
    if r != 0 || READER.load(SeqCst) == u64::MAX {
        return 1;
    }
    println!("emumulti ok");
    0
}

fn patch_smc(v: u32) {
    let at = (&raw const rb_smc_mov as *mut u8).wrapping_add(1);
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        // SAFETY: the immediate of `rb_smc`'s `mov eax, imm32`, in this image's code, which the
        // boot page tables map writable; nothing runs `rb_smc` while it changes.
        unsafe { core::ptr::write_volatile(at.wrapping_add(i), b) };
    }
}

/// Self-modifying code on a replaced page: `rb_smc` turns hot (replaced), the guest rewrites
/// its immediate (the VMM drops the copy), and the next run returns the new value; twice, the
/// second time after the site was replaced again from the new bytes.
fn smc() -> i32 {
    // SAFETY: `rb_smc` follows the C ABI and only runs `cpuid`.
    let call = || unsafe { rb_smc(0) };
    // Only the low byte changes (single-byte stores): another vCPU running `rb_smc` meanwhile
    // sees one value or the next, never a mix.
    let values = SMC_VALUES;
    patch_smc(values[0]);
    for w in values.windows(2) {
        for i in 0..200 {
            let got = call();
            if got != w[0] {
                println!("emusmc: run {i} returned {got:#x}, wanted {:#x}", w[0]);
                return 1;
            }
        }
        patch_smc(w[1]);
        let got = call();
        if got != w[1] {
            println!("emusmc: after the patch {got:#x}, wanted {:#x}", w[1]);
            return 1;
        }
    }
    let t0 = time::monotonic_ns();
    for _ in 0..200 {
        if call() != values[2] {
            println!("emusmc: the last value did not stay");
            return 1;
        }
    }
    let ns = (time::monotonic_ns() - t0) / 200;
    // A site whose displaced store writes its own page, again and again: each store after a
    // replacement faults from the trampoline; the VMM drops the copy and the store completes
    // in the original (and after a few drops stops copying the page).
    let want = leaf(0);
    for i in 0..300 {
        // SAFETY: zeroing the data word `rb_smc_store` writes; nothing else uses it.
        unsafe { core::ptr::write_volatile(&raw const rb_smc_data as *mut u64, 0) };
        // SAFETY: `rb_smc_store` follows the C ABI and writes only `rb_smc_data`.
        unsafe { rb_smc_store() };
        // SAFETY: reading the word back.
        let got = unsafe { core::ptr::read_volatile(&raw const rb_smc_data) };
        if got != u64::from(want[0]) | (u64::from(want[1]) << 32) {
            println!("emusmc: store {i} wrote {got:#x}");
            return 1;
        }
    }
    println!("emusmc ok ns_per_op={ns}");
    0
}

#[inline(never)]
fn leaf0(x: u64) -> (u32, u32, u32, u32) {
    (x as u32 ^ 0x10, 0x68747541, 0x444d4163, 0x69746e65)
}

/// A plain function call returning what `cpuid` leaf 0 would: the floor a replaced `cpuid`
/// is measured against.
fn call_loop(n: u64) -> i32 {
    let t0 = time::monotonic_ns();
    let mut acc = 0u32;
    for i in 0..n {
        let r = leaf0(core::hint::black_box(i));
        acc = acc.wrapping_add(r.0 ^ r.1 ^ r.2 ^ r.3);
    }
    let dt = time::monotonic_ns() - t0;
    println!("emucall n={n} ps_per_op={} acc={acc}", dt * 1000 / n.max(1));
    0
}
