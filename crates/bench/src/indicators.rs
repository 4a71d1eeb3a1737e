//! `rebound-bench indicators`: the cost of one dispatch round with 1 of N sources pending
//! (N = 1 to 64), requester indicators (ABI 1.10: one swap of the pending word, one source
//! polled) against scanning every source. Measured inside one guest run with its TSC clock
//! (no exit per round), so both columns share the machine's noise.

use anyhow::{Context, Result, bail};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{Vm, VmOutcome};

use crate::{emit, testguest};

/// Runs `testguest indbench ROUNDS` and prints its table.
pub fn run(rounds: u64) -> Result<()> {
    let out = SharedBuffer::new();
    let vm = Vm::launch(
        &testguest(&format!("indbench {rounds}"), 1, 64),
        Box::new(out.clone()),
    )?;
    let outcome = vm.wait();
    let text = out.text();
    if outcome != (VmOutcome::Exited { status: 0 }) {
        bail!("indbench ended with {outcome}: {text}");
    }
    let field = |line: &str, key: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in {line:?}"))
    };
    eprintln!(
        "indicators: ns per dispatch round, 1 of N sources pending (fastest of 5 runs of {rounds} rounds)"
    );
    eprintln!(
        "{:>4} {:>12} {:>12} {:>8}",
        "N", "indicators", "scan all", "scan/ind"
    );
    let mut rows = 0;
    for line in text.lines().filter(|l| l.starts_with("indbench n=")) {
        let n = field(line, "n=")?;
        let ind = field(line, "indicator_ns=")?;
        let scan = field(line, "scan_ns=")?;
        emit(&format!("indicators_n{n}_indicator"), ind, "ns");
        emit(&format!("indicators_n{n}_scan"), scan, "ns");
        eprintln!("{n:>4} {ind:>12.1} {scan:>12.1} {:>8.2}", scan / ind);
        rows += 1;
    }
    if rows != 7 {
        bail!("indbench printed {rows} rows, expected 7: {text}");
    }
    Ok(())
}
