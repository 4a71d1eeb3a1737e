//! Nested guests (ABI 1.10): a nested guest's hypercall round trip (nested guest `out` ->
//! nested exit reported to the guest VMM -> it emulates the call -> `NESTED_RUN` again) against
//! a plain guest's (its `out` -> the VMM answers -> re-entry), in one VM, interleaved one for
//! one so both see the same load; then the same with the nested vCPU started (posted exits:
//! the guest VMM hands it back and sees its next exit without a hypercall).

use anyhow::{Context, Result, bail};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{Vm, VmOutcome};

use crate::{emit, median_p99, testguest};

/// Word `i` of the console line starting with `prefix`, as a number.
fn word(text: &str, prefix: &str, i: usize) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no {prefix:?} line in {text:?}"))?;
    line.split_whitespace()
        .nth(i)
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("no number at word {i} of {line:?}"))
}

pub(crate) fn round_trip(runs: usize) -> Result<()> {
    let n = 5_000u64;
    let (mut direct, mut nested, mut ratio, mut in_run) = (vec![], vec![], vec![], vec![]);
    let (mut pdirect, mut posted, mut pratio) = (vec![], vec![], vec![]);
    for _ in 0..runs.clamp(1, 10) {
        let out = SharedBuffer::new();
        let vm = Vm::launch(
            &testguest(&format!("nestbench {n}"), 1, 64),
            Box::new(out.clone()),
        )?;
        let outcome = vm.wait();
        let text = out.text();
        if outcome != (VmOutcome::Exited { status: 0 }) {
            bail!("nestbench ended with {outcome}: {text}");
        }
        // "nestbench direct COUNT NS", "nestbench nested COUNT NS runs R guest_ns G".
        let d = word(&text, "nestbench direct", 3)? / word(&text, "nestbench direct", 2)? / 1e3;
        let nn = word(&text, "nestbench nested", 3)? / word(&text, "nestbench nested", 2)? / 1e3;
        let runs_done = word(&text, "nestbench nested", 5)?;
        let guest_ns = word(&text, "nestbench nested", 7)?;
        direct.push(d);
        nested.push(nn);
        ratio.push(nn / d);
        in_run.push(guest_ns / runs_done / 1e3);
        // "nestbench pdirect COUNT NS", "nestbench posted COUNT NS runs R guest_ns G".
        let pd = word(&text, "nestbench pdirect", 3)? / word(&text, "nestbench pdirect", 2)? / 1e3;
        let pn = word(&text, "nestbench posted", 3)? / word(&text, "nestbench posted", 2)? / 1e3;
        pdirect.push(pd);
        posted.push(pn);
        pratio.push(pn / pd);
    }
    let (d, _) = median_p99(direct);
    let (nn, _) = median_p99(nested);
    let (r, _) = median_p99(ratio);
    let (k, _) = median_p99(in_run);
    let (pd, _) = median_p99(pdirect);
    let (pn, _) = median_p99(posted);
    let (pr, _) = median_p99(pratio);
    emit("nested_direct_hypercall_round_trip", d, "us");
    emit("nested_hypercall_round_trip", nn, "us");
    emit("nested_vs_direct", r, "ratio");
    emit("nested_run_in_kvm", k, "us");
    emit("nested_posted_direct_hypercall_round_trip", pd, "us");
    emit("nested_posted_hypercall_round_trip", pn, "us");
    emit("nested_posted_vs_direct", pr, "ratio");
    eprintln!(
        "nested: a nested guest's hypercall round trip {nn:.1} us vs a direct one {d:.1} us: \
         {r:.2}x (goal <= 2x); of it {k:.1} us inside the nested KVM_RUN (the nested exit), \
         {:.1} us the outer NESTED_RUN hypercall's exit and re-entry and the guest VMM's \
         emulation",
        nn - k
    );
    eprintln!(
        "nested, started vCPU (posted exits): round trip {pn:.1} us vs a direct one {pd:.1} us: \
         {pr:.2}x (goal <= 2x): the nested exit only, no exit of the guest VMM"
    );
    Ok(())
}
