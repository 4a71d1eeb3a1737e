//! The guest programs bundled with Rebound, as ELF bytes (built from `guests/` by `build.rs`).

/// The demo guest `rebound` runs with no arguments: a hash chain computed by several tasks,
/// written to and verified from disk through the interrupt-free I/O ring.
pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// The guest the test suite and benchmarks drive; its command line picks what it does
/// (see `guests/testguest/src/main.rs`).
pub const TESTGUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// A bundled guest by name.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "demo" => Some(DEMO),
        "testguest" => Some(TESTGUEST),
        _ => None,
    }
}

/// Names accepted by [`by_name`].
pub const NAMES: &[&str] = &["demo", "testguest"];
