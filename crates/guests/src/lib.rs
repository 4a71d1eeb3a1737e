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

/// Host-side replays of the test guest's computations, to check what a guest reports.
pub mod testguest {
    /// `seq`: one step.
    fn step(x: u64, i: u64) -> u64 {
        let y = (x ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        y ^ (y >> 29)
    }

    /// What `seq N REPORT` prints when its generation never changes (no restore or clone
    /// changed it): a line every REPORT steps, then the result.
    pub fn seq_output(n: u64, report: u64) -> String {
        use std::fmt::Write;
        let mut hist = vec![0u64; 4096];
        let (mut x, mut line, mut out) = (1u64, 0u64, String::new());
        for i in 0..n {
            x = step(x, i) ^ hist[(i % 4096) as usize];
            hist[(i % 4096) as usize] = x >> 7;
            if i % report == report - 1 {
                let _ = writeln!(out, "seq line {line} at {} x={x:016x}", i + 1);
                line += 1;
            }
        }
        let _ = writeln!(out, "seq done {n} result={x:016x}");
        out
    }

    /// `seq N`'s value after `n` steps, with each reported (generation, step) mixed in.
    pub fn seq_expected(n: u64, gens: &[(u64, u64)]) -> u64 {
        let mut hist = vec![0u64; 4096];
        let mut x = 1u64;
        for i in 0..n {
            x = step(x, i) ^ hist[(i % 4096) as usize];
            hist[(i % 4096) as usize] = x >> 7;
            if let Some((g, _)) = gens.iter().find(|(_, at)| *at == i) {
                x ^= g;
            }
        }
        x
    }

    /// `stress`: word `i` of round `r`.
    pub fn stress_word(r: u64, i: u64) -> u64 {
        let mut z = (r << 40) ^ i ^ 0x5851_f42d_4c95_7f2d;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `stress`: the checksum round `r` reports over `words` words.
    pub fn stress_round(r: u64, words: u64) -> u64 {
        (0..words).fold(0u64, |acc, i| acc.rotate_left(5) ^ stress_word(r, i))
    }
}
