//! Per-operation cost of trapping operations, measured inside the guest (its exit-free clock)
//! in one run: port 0x80 trapping to the VMM vs promoted to an ioeventfd, `rdmsr` emulated
//! after its fault, `cpuid` trapping (on these hosts, to the hypervisor below the VMM), armed
//! and emulated by the VMM, and replaced in a copied page, and a plain function call returning
//! what `cpuid` leaf 0 does (the floor a replaced `cpuid` is held to).

use anyhow::{Context, Result, bail};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{Vm, VmOutcome};

use crate::{emit, testguest};

fn run(args: &str) -> Result<String> {
    let out = SharedBuffer::new();
    let vm = Vm::launch(&testguest(args, 1, 64), Box::new(out.clone()))?;
    let outcome = vm.wait();
    if outcome != (VmOutcome::Exited { status: 0 }) {
        bail!("testguest {args}: {outcome}\n{}", out.text());
    }
    Ok(out.text())
}

/// The number after `key=` on the `n`th line starting with `prefix`.
fn field(out: &str, prefix: &str, n: usize, key: &str) -> Result<f64> {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .nth(n)
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        })
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}= in line {n} of {prefix:?}:\n{out}"))
}

pub fn trapping() -> Result<()> {
    // 50 writes per round: round 0 traps every write (the site turns hot at 64); rounds from
    // 2 on are absorbed by the ioeventfd.
    let post = run("emupost 50 66 6")?;
    let trapped = field(&post, "emupost round", 0, "ns_per_op")?;
    let promoted = field(&post, "emupost round", 5, "ns_per_op")?;
    let rdmsr = field(&run("emurdmsr 2000")?, "emurdmsr", 0, "ns_per_op")?;
    // One guest: cpuid leaf 0 unarmed (traps to the hypervisor below), armed and emulated by
    // the VMM, then replaced; and a plain call in the same loop shape as the replaced one.
    let cpu = run("emucpuid 2000000")?;
    let cpuid = field(&cpu, "emucpuid n=", 0, "trap_ns")?;
    let emulated = field(&cpu, "emucpuid n=", 0, "emulated_ns")?;
    let replaced = field(&cpu, "emucpuid n=", 0, "replaced_ps")? / 1000.0;
    let same_call = field(&cpu, "emucpuid n=", 0, "call_ps")? / 1000.0;
    let call_ps = field(&run("emucall 10000000")?, "emucall", 0, "ps_per_op")?;
    let call = call_ps / 1000.0;
    emit("emulation_port_trapped", trapped, "ns/op");
    emit("emulation_port_promoted", promoted, "ns/op");
    emit("emulation_port_speedup", trapped / promoted, "ratio");
    emit("emulation_rdmsr_emulated", rdmsr, "ns/op");
    emit("emulation_cpuid_trapping", cpuid, "ns/op");
    emit("emulation_cpuid_emulated", emulated, "ns/op");
    emit("emulation_cpuid_replaced", replaced, "ns/op");
    emit("emulation_function_call", call, "ns/op");
    emit("emulation_function_call_same_loop", same_call, "ns/op");
    emit(
        "emulation_cpuid_replaced_vs_call",
        replaced / same_call,
        "ratio",
    );
    emit(
        "emulation_cpuid_trapping_vs_replaced",
        cpuid / replaced,
        "ratio",
    );
    eprintln!(
        "emulation: port 0x80 write trapped {trapped:.0} ns, promoted to an ioeventfd {promoted:.0} ns ({:.1}x); \
         rdmsr emulated after its #GP {rdmsr:.0} ns; cpuid: trapping (below the VMM) {cpuid:.0} ns, \
         armed and emulated {emulated:.0} ns, replaced {replaced:.2} ns; plain function call {same_call:.2} ns \
         in the same loop, best batch ({call:.2} ns in `emucall`); replaced/call {:.2}x, trapping/replaced {:.0}x",
        trapped / promoted,
        replaced / same_call,
        cpuid / replaced
    );
    Ok(())
}

/// Program switches (ABI 1.10), in one guest: a bare hypercall; a run of a program whose page
/// tables are reused (one exit in, one out); a run right after its table changed (the VMM builds
/// its page tables for it). Each run is a round trip supervisor -> program -> supervisor.
pub fn programs(n: u64, rebuilds: u64) -> Result<()> {
    let out = run(&format!("progbench {n} {rebuilds}"))?;
    let floor = field(&out, "progbench", 0, "floor_ns")?;
    let reused = field(&out, "progbench", 0, "reused_ns")?;
    let rebuilt = field(&out, "progbench", 0, "rebuilt_ns")?;
    let done = field(&out, "progbench", 0, "rebuilds")?;
    emit("program_switch_hypercall_floor", floor, "ns");
    emit("program_switch_reused", reused, "ns");
    emit("program_switch_rebuilt", rebuilt, "ns");
    emit("program_switch_reused_vs_floor", reused / floor, "ratio");
    eprintln!(
        "programs: run round trip with reused tables {reused:.0} ns ({:.2}x the {floor:.0} ns hypercall floor; \
         two exits), with tables rebuilt {rebuilt:.0} ns ({done:.0} rebuilds); {n} runs with every counter checked",
        reused / floor
    );
    Ok(())
}
