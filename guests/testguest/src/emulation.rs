//! Trapping operations the VMM emulates (ABI 1.10): port 0x80 (promoted to an ioeventfd when
//! hot), `rdmsr` of the time-stamp MSRs and `hlt` (the CPU faults on them at CPL3; the VMM
//! emulates and resumes), and `cpuid` (here it traps to the hypervisor below the VMM). Each mode
//! checks its results stay the same however the operation is served, and prints ns per op.

use core::arch::asm;

use rebound_guest::{hypercall, println, time};

pub fn run(mode: &str, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    match mode {
        "emupost" => Some(post(arg(1, 50), arg(2, 0x42) as u8, arg(3, 4), arg(4, 0))),
        "emurdmsr" => Some(rdmsr_loop(arg(1, 1000))),
        "emucpuid" => Some(cpuid_loop(arg(1, 1000))),
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

fn cpuid_loop(n: u64) -> i32 {
    let first = core::arch::x86_64::__cpuid_count(0, 0);
    let t0 = time::monotonic_ns();
    for _ in 0..n {
        let r = core::arch::x86_64::__cpuid_count(0, 0);
        if (r.eax, r.ebx, r.ecx, r.edx) != (first.eax, first.ebx, first.ecx, first.edx) {
            println!("emucpuid: leaf 0 changed");
            return 1;
        }
    }
    let dt = time::monotonic_ns() - t0;
    println!(
        "emucpuid n={n} ns_per_op={} max_leaf={} ok",
        dt / n.max(1),
        first.eax
    );
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
