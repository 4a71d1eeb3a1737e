//! The guest programs bundled with Rebound, as ELF bytes (built from `guests/` by `build.rs`).

/// The demo guest `rebound` runs with no arguments: a hash chain computed by several tasks,
/// written to and verified from disk through the interrupt-free I/O ring.
pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// The guest the test suite and benchmarks drive; its command line picks what it does
/// (see `guests/testguest/src/main.rs`).
pub const TESTGUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// An in-memory key-value server speaking the Redis protocol over the VM's first network
/// interface (`rebound run --bundled kv --publish 127.0.0.1:6379:6379`).
pub const KV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv.elf"));

/// A bundled guest, and what its command line (`--args`) does: the one description of it that
/// `rebound guests` shows (a test checks it against the guest's source).
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    /// The name `--bundled` takes.
    pub name: &'static str,
    /// What it is.
    pub summary: &'static str,
    /// Its command line, for a guest without modes; empty otherwise.
    pub args: &'static str,
    /// Its modes: the command line's first word picks one, the rest are its arguments.
    pub modes: &'static [Mode],
    /// An example command line.
    pub example: &'static str,
    /// The ELF image.
    pub elf: &'static [u8],
}

/// One mode of a bundled guest.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// The first word of the command line.
    pub name: &'static str,
    /// Its arguments (`[X]` optional, `a|b` a choice).
    pub args: &'static str,
    /// What it does, with the arguments' defaults.
    pub summary: &'static str,
}

const fn mode(name: &'static str, args: &'static str, summary: &'static str) -> Mode {
    Mode {
        name,
        args,
        summary,
    }
}

/// The bundled guests.
pub const GUESTS: &[Guest] = &[
    Guest {
        name: "demo",
        summary: "what `rebound` runs with no arguments: T tasks (4) compute a hash chain of N \
                  blocks each (128), write it to the disk through the I/O ring, read it back and \
                  verify it (a 16 MiB scratch disk unless --disk or --scratch-disk-mib)",
        args: "[blocks=N] [tasks=T]",
        modes: &[],
        example: "blocks=64 tasks=2",
        elf: DEMO,
    },
    Guest {
        name: "testguest",
        summary: "the guest the tests and benchmarks drive: prints what it checks, exits 0 on \
                  success (REGION: a region attached with --share)",
        args: "",
        modes: TESTGUEST_MODES,
        example: "ticks 20 5",
        elf: TESTGUEST,
    },
    Guest {
        name: "kv",
        summary: "an in-memory key-value server speaking the Redis protocol (RESP2: strings, \
                  expiry, pipelining, many clients) on port P (6379) of the VM's first network \
                  interface; real Redis clients work unchanged. Start it with --publish \
                  127.0.0.1:6379:6379 (or --tap). MAXMEMORY MiB for data (half of the heap); \
                  ip= and gw= default to the user-mode backend's 10.0.2.15/24 and 10.0.2.2; \
                  it exits 0 when asked to shut down (SendCtrlAltDel)",
        args: "[port=P] [maxmemory=MIB] [ip=A.B.C.D/P] [gw=A.B.C.D]",
        modes: &[],
        example: "port=6379 maxmemory=64",
        elf: KV,
    },
];

/// The test guest's modes (`guests/testguest/src/main.rs`, `sharing.rs`, `net.rs`,
/// `memory.rs`, `capacity.rs`, `emulation.rs`, `programs.rs` and `nested.rs`). REGION is
/// a shared region attached with `--share`; the network modes use NIC 0.
const TESTGUEST_MODES: &[Mode] = &[
    mode("hello", "", "print a line from vCPU 0 (the default mode)"),
    mode("exit", "[CODE]", "exit with CODE (0)"),
    mode(
        "ticks",
        "[MS] [COUNT]",
        "print `tick N` every MS ms (20), COUNT times (0: forever)",
    ),
    mode(
        "multi",
        "",
        "every vCPU meets at a barrier and computes: checks they ran concurrently",
    ),
    mode(
        "memhold",
        "[WORKING] [CACHE] [SWAP] [ANSWER] [PRESWAP] [BUSY]",
        "hold WORKING MiB of checked data (8), a CACHE MiB page cache (4) and a SWAP MiB swap area (8) in a memory class table; answer the host's memory requests (ANSWER 1; 0: never), PRESWAP MiB of the data in swap from the start (0), BUSY 1: work without pause; checks every page at shutdown",
    ),
    mode(
        "memhostile",
        "",
        "memory class hypercalls with hostile arguments: each must fail cleanly",
    ),
    mode(
        "indicators",
        "io [MS] | share REGION",
        "64 dispatcher sources with indicator bits (ABI 1.10), one made pending by the VMM: \
         an I/O ring timer of MS ms (5) or a wake-up through REGION; checks one was polled",
    ),
    mode(
        "indhostile",
        "",
        "INDICATOR_SET with hostile arguments and garbage route bytes: each must fail cleanly",
    ),
    mode(
        "indbench",
        "[ROUNDS]",
        "ns per dispatch round with 1 of N sources pending (N = 1..64), indicators against \
         scanning, ROUNDS (200000) rounds, fastest of 5",
    ),
    mode("fault-pf", "", "page fault: write to an unmapped address"),
    mode("fault-gp", "", "general protection fault: hlt at CPL3"),
    mode("fault-ud", "", "invalid opcode: ud2"),
    mode(
        "fault-port",
        "",
        "write to the VMM's fault port, closed to CPL3",
    ),
    mode(
        "fault-write-pagetable",
        "",
        "write to the (supervisor-only) page tables",
    ),
    mode("fault-stack", "", "overflow the stack"),
    mode("panic", "[STEP]", "panic with `boom at step STEP` (3)"),
    mode(
        "hostile",
        "",
        "hypercalls and I/O requests with hostile arguments: each must fail cleanly (needs a disk)",
    ),
    mode(
        "io",
        "[TASKS] [BLOCKS]",
        "TASKS tasks (8) write, read back and check BLOCKS blocks (8) each (needs a disk)",
    ),
    mode(
        "spin",
        "",
        "every vCPU computes forever without leaving the guest",
    ),
    mode(
        "seq",
        "[N] [REPORT]",
        "N steps (2^26) of a deterministic sequence in memory, a line every REPORT steps (N/16)",
    ),
    mode(
        "disk-scatter",
        "[N] [SLOTS] [PAUSE_US] [QUIET]",
        "N steps (200): each writes a record to a sector picked by the clock among SLOTS (64), prints `rec SLOT STEP TIME` (not if QUIET is 1), waits PAUSE_US (1000); then reads every slot back and checks it against what it wrote (needs a disk)",
    ),
    mode(
        "disk-flood",
        "[MIB] [TASKS]",
        "TASKS tasks (4) write MIB MiB (64) in 1 MiB writes as fast as they can, resubmitting at once a write refused with EAGAIN (needs a disk)",
    ),
    mode(
        "disk-fsync",
        "[N]",
        "N rounds (1000) of a 4 KiB write then a FLUSH; prints the p50 and p99 round latency in us (needs a disk)",
    ),
    mode(
        "dirty",
        "[PAGES]",
        "write one byte of each of PAGES pages (64), round and round, forever",
    ),
    mode(
        "rate",
        "[PERMILLE] [SECS] [FILL]",
        "compute for SECS s (3) writing PERMILLE/1000 of memory per second (10), one byte per page or, if FILL is 1, the whole page with random bytes; print the work",
    ),
    mode(
        "stress",
        "[MIB] [ROUNDS]",
        "fill MIB MiB (8) with a pattern and check it, ROUNDS times (forever)",
    ),
    mode("hcbench", "[N]", "time N (10000) null hypercalls"),
    mode(
        "clock",
        "[N]",
        "check N (1000) clock readings against the clock hypercall, then time N of each",
    ),
    mode(
        "warm",
        "[MIB] [PAGES]",
        "touch MIB MiB (16), then write PAGES (64) of its pages forever",
    ),
    mode("touch", "[MIB]", "touch MIB MiB (16), then block forever"),
    mode(
        "share-info",
        "REGION",
        "print the region's slot, access, size and peers",
    ),
    mode(
        "share-write",
        "REGION [VALUE]",
        "write VALUE (0) to the region's application word",
    ),
    mode(
        "share-read",
        "REGION",
        "print the region's application word",
    ),
    mode(
        "share-wait",
        "REGION [VALUE]",
        "wait until the application word is VALUE (1)",
    ),
    mode(
        "pong",
        "REGION [COUNT] [always|idle] [nopoll]",
        "answer COUNT (100) pings in its inbox",
    ),
    mode(
        "ping",
        "REGION [COUNT] [always|idle] [nopoll]",
        "send COUNT (100) pings to a peer's inbox, wait for each answer",
    ),
    mode(
        "sink",
        "REGION [COUNT] [lossy|exact] [nopoll]",
        "receive COUNT (100) messages in its inbox, checking each sender's order",
    ),
    mode(
        "source",
        "REGION [COUNT] [always]",
        "send COUNT (100) messages to a peer's inbox",
    ),
    mode(
        "workq-put",
        "REGION [N] [TAKERS]",
        "put N (100) items on the shared work queue for TAKERS (1) takers",
    ),
    mode(
        "workq-take",
        "REGION",
        "take items from the shared work queue until told to stop",
    ),
    mode(
        "lockstress",
        "REGION [ITERS]",
        "increment a shared counter under lock 0 ITERS times (1000)",
    ),
    mode(
        "lockhold",
        "REGION [LOCK]",
        "take lock LOCK (0) and hold it forever",
    ),
    mode(
        "locktake",
        "REGION [LOCK]",
        "take lock LOCK (0), say how it was left, release it",
    ),
    mode(
        "lockwait",
        "REGION [LOCK]",
        "wait until another VM holds lock LOCK (0), then take it",
    ),
    mode(
        "lockowner",
        "REGION [CLIENTS]",
        "serve a private counter to CLIENTS (2) lockclient VMs",
    ),
    mode(
        "lockclient",
        "REGION [N]",
        "add 1 to a lockowner's counter N times (100) under the shared lock",
    ),
    mode(
        "recover-loop",
        "REGION [MS]",
        "ask the VMM to recover dead members for MS ms (1000)",
    ),
    mode(
        "share-hostile",
        "REGION",
        "write garbage over a peer's inbox and the region header",
    ),
    mode(
        "cache-writer",
        "REGION [ROUNDS]",
        "fill cache slots ROUNDS times (1000) under lock 1",
    ),
    mode(
        "cache-reader",
        "REGION [READS]",
        "read cache slots READS times (100000) without locks, checking each is whole",
    ),
    mode(
        "pcache",
        "",
        "count the VM's runs in its persistent cache (--identity, --cache)",
    ),
    mode(
        "lockbench",
        "REGION [N]",
        "time N (1000000) uncontended lock and unlock pairs",
    ),
    mode(
        "net-echo",
        "[PORT] [BACKLOG] ip=A.B.C.D/P [gw=A.B.C.D]",
        "serve TCP echo on PORT (7) of NIC 0, BACKLOG (16) clients connecting at once, \
         until a shutdown request; then print its counters",
    ),
    mode(
        "net-break",
        "[PORT] [BACKLOG] ip=A.B.C.D/P [gw=A.B.C.D]",
        "damage its own TX ring, see the VMM mark it broken, set it up again, then serve as \
         net-echo",
    ),
    mode(
        "net-discard",
        "[PORT] [BACKLOG] ip=A.B.C.D/P [gw=A.B.C.D]",
        "read and drop what clients send to PORT (7) of NIC 0, until a shutdown request",
    ),
    mode(
        "net-chargen",
        "[PORT] [BACKLOG] [BYTES] ip=A.B.C.D/P [gw=A.B.C.D]",
        "send BYTES (1048576) of a pattern to each client of PORT (7) on NIC 0, then close",
    ),
    mode(
        "net-hostile",
        "[FRAMES]",
        "place NIC 0's rings in system memory, name system memory in a TX descriptor, then \
         flood FRAMES (20000) full-size frames; print what the VMM did",
    ),
    mode(
        "net-send",
        "ADDR PORT [BYTES] [TIMEOUT_MS] ip=A.B.C.D/P [gw=A.B.C.D]",
        "connect to an echo server at ADDR:PORT (waiting up to TIMEOUT_MS, 30000), send BYTES \
         (65536), check they come back",
    ),
    mode(
        "net-reflect",
        "[FRAMES]",
        "send every frame NIC 0 receives back with its MACs swapped, FRAMES times (0: until \
         a shutdown request), without TCP/IP",
    ),
    mode(
        "capworker",
        "REGION [SPIN]",
        "take jobs from REGION's queue (each SPIN (200) loops of work), calling clone points \
         between jobs; cloned by the host when saturated",
    ),
    mode(
        "capfeed",
        "REGION [JOBS] [UNTIL_OTHERS] [MAX]",
        "post JOBS (10000) jobs to REGION's queue, keeping it full until UNTIL_OTHERS workers \
         joined, and check every job was done exactly once",
    ),
    mode(
        "capidle",
        "",
        "wait without work (a VM that lends its CPU share)",
    ),
    mode(
        "caphostile",
        "",
        "clone points called when not asked, and other hostile calls",
    ),
    mode(
        "emupost",
        "[N] [VALUE] [ROUNDS] [QUIET_MS]",
        "ROUNDS (4) rounds of N (50) writes of VALUE (66) to port 0x80, timed, reading the \
         register back; with QUIET_MS, leave the port alone twice that long and check again",
    ),
    mode(
        "emurdmsr",
        "[N]",
        "rdmsr TSC_AUX N (1000) times (emulated), timed",
    ),
    mode(
        "emucpuid",
        "[N] [SPIN]",
        "cpuid leaf 0 unarmed, armed and emulated, then replaced N (1000) times, timed, results \
         compared; with SPIN 1, keep checking until the host writes the printed flag, then run \
         emusmc",
    ),
    mode(
        "emumulti",
        "[N]",
        "every vCPU runs one cpuid site N (20000) times while it is replaced; then vCPU 0 runs \
         emusmc while the others run its function and check its value only moves forward",
    ),
    mode(
        "emuprog",
        "[N]",
        "replace a cpuid site, run a program once, then N (1000) runs of the site and emusmc",
    ),
    mode(
        "emusmc",
        "",
        "self-modifying code on a page whose cpuid was replaced: the new code runs",
    ),
    mode(
        "emucall",
        "[N]",
        "a plain function call N (1000000) times, timed",
    ),
    mode(
        "emuhlt",
        "",
        "hlt once (waits in the VMM until an event or a pause)",
    ),
    mode(
        "progs",
        "[N]",
        "run two confined programs N (1000) times each, then check they cannot reach each \
         other or this guest, faults come back, a changed table applies",
    ),
    mode(
        "progspin",
        "",
        "run a program that waits for the host to set a word in its data",
    ),
    mode(
        "proghostile",
        "",
        "bad PROGRAM_SET/RUN/EXIT calls, each refused",
    ),
    mode(
        "progbench",
        "[N] [REBUILDS]",
        "time N (10000) hypercalls, N program runs with reused tables, REBUILDS (60) with \
         tables rebuilt",
    ),
    mode("chatter", "[N]", "print N (5) deterministic lines"),
    mode(
        "portread",
        "",
        "read port 0x600 and print the value (all ones from Rebound)",
    ),
    mode(
        "nestslice",
        "",
        "run a two-vCPU nested `hello` from one vCPU with time slices (NESTED_RUN's slice_ns)",
    ),
    mode(
        "nestio",
        "",
        "run `portread` nested and answer its read with 0x12345678",
    ),
    mode(
        "nestvmm",
        "MODE [ARGS..]",
        "be a guest VMM: run this guest in MODE as a nested guest (ABI 1.10) to completion, \
         emulating its hypercalls, and exit with its status (its output, then `nestvmm:` lines)",
    ),
    mode(
        "nestpost",
        "MODE [ARGS..]",
        "as `nestvmm`, with the nested vCPU started (NESTED_START): it runs on a host thread of \
         its own and its exits are posted, without hypercalls of this guest's",
    ),
    mode(
        "nestfault",
        "MODE",
        "run a faulting MODE nested, print the fault the host reported, then run `hello` \
         nested in a new VM",
    ),
    mode(
        "nesthostile",
        "",
        "call every nested hypercall with bad arguments and check each errno (--mem-mib 128)",
    ),
    mode(
        "nestbench",
        "[N]",
        "N (10000) hypercalls directly, then N by a nested guest answered here, with times; \
         then the same with the nested vCPU started (posted exits)",
    ),
];

/// A bundled guest by name.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|g| g.name == name).map(|g| g.elf)
}

/// Names accepted by [`by_name`].
pub const NAMES: &[&str] = &["demo", "testguest", "kv"];

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn source(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../guests")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The string patterns of the match arms in `src` (`"a" =>`, `"a" | "b" =>`): the modes a
    /// guest dispatches on.
    fn dispatched(src: &str) -> BTreeSet<String> {
        src.lines()
            .filter_map(|l| l.trim().split_once("=>").map(|(pat, _)| pat.trim()))
            .filter(|pat| pat.starts_with('"'))
            .flat_map(|pat| pat.split('|'))
            .map(|p| p.trim().trim_matches('"').to_string())
            .collect()
    }

    #[test]
    fn every_mode_the_testguest_dispatches_on_is_described_and_no_other() {
        let src = source("testguest/src/main.rs")
            + &source("testguest/src/sharing.rs")
            + &source("testguest/src/net.rs")
            + &source("testguest/src/memory.rs")
            + &source("testguest/src/capacity.rs")
            + &source("testguest/src/emulation.rs")
            + &source("testguest/src/programs.rs")
            + &source("testguest/src/nested.rs")
            + &source("testguest/src/indicators.rs");
        let in_source = dispatched(&src);
        assert!(in_source.len() > 20, "the parser found {in_source:?}");
        let guest = GUESTS.iter().find(|g| g.name == "testguest").unwrap();
        let listed: BTreeSet<String> = guest.modes.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(listed.len(), guest.modes.len(), "a mode is listed twice");
        let missing: Vec<_> = in_source.difference(&listed).collect();
        let stale: Vec<_> = listed.difference(&in_source).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "testguest modes not in GUESTS: {missing:?}; in GUESTS but not dispatched: {stale:?}"
        );
    }

    #[test]
    fn every_demo_parameter_is_described() {
        let src = source("demo/src/main.rs");
        let demo = GUESTS.iter().find(|g| g.name == "demo").unwrap();
        let keys: Vec<&str> = src
            .split("param(&cpu, \"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(!keys.is_empty(), "no param(...) calls found in the demo");
        for k in keys {
            assert!(
                demo.args.contains(&format!("{k}=")),
                "demo parameter {k} is not described"
            );
        }
    }

    #[test]
    fn names_match_the_guests() {
        let names: Vec<&str> = GUESTS.iter().map(|g| g.name).collect();
        assert_eq!(names, NAMES);
        for g in GUESTS {
            assert!(by_name(g.name).is_some_and(|b| b.starts_with(b"\x7fELF")));
        }
    }
}
