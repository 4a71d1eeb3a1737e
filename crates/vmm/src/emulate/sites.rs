//! The frequency judgment: how often each trapping site runs, and which are hot enough to be
//! promoted to a faster path. Pure bookkeeping, no KVM: unit-tested here.
//!
//! A site is one instruction address and what it does there (a port write of one value, a
//! privileged instruction). The table is bounded: past [`MAX_SITES`] a new site is only counted
//! in `untracked`, so a guest that traps from many addresses costs the VMM a fixed amount.

use std::collections::HashMap;

use serde::Serialize;

/// Most sites tracked per VM.
pub const MAX_SITES: usize = 1024;

/// What traps at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A byte written to an emulated port.
    Out { port: u16, value: u8 },
    /// A read from an emulated port.
    In { port: u16 },
    /// A privileged instruction the VMM emulates after the CPU faulted on it.
    Insn(&'static str),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Out { port, value } => write!(f, "out {port:#x}, {value:#04x}"),
            Op::In { port } => write!(f, "in {port:#x}"),
            Op::Insn(name) => f.write_str(name),
        }
    }
}

/// The thresholds of the judgment, per window.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Hits within one window that make a site hot.
    pub promote_hits: u64,
    /// A promoted path used fewer times than this in a window is demoted.
    pub demote_hits: u64,
    /// The window, in nanoseconds.
    pub window_ns: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            promote_hits: 64,
            demote_hits: 8,
            window_ns: 500_000_000,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Site {
    count: u64,
    window_start_ns: u64,
    window_hits: u64,
    promoted: bool,
}

/// One site as `/metrics` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SiteSnapshot {
    /// The instruction's guest address.
    pub rip: u64,
    /// What it does.
    pub op: String,
    /// Times it trapped to the VMM.
    pub count: u64,
    /// Whether it runs on a promoted path now.
    pub promoted: bool,
    /// Whether it runs from a copied page now (a replaced `cpuid`; no trap at all).
    pub replaced: bool,
}

/// The site table of one VM.
#[derive(Debug, Default)]
pub struct Sites {
    policy: Policy,
    sites: HashMap<(Op, u64), Site>,
    untracked: u64,
}

impl Sites {
    /// An empty table judging with `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            ..Default::default()
        }
    }

    /// Counts one trap of `op` at `rip`; true if the site has just become hot (the caller
    /// promotes it, then calls [`Sites::set_promoted`]).
    pub fn hit(&mut self, op: Op, rip: u64, now_ns: u64) -> bool {
        if self.sites.len() >= MAX_SITES && !self.sites.contains_key(&(op, rip)) {
            self.untracked += 1;
            return false;
        }
        let s = self.sites.entry((op, rip)).or_default();
        s.count += 1;
        if now_ns.saturating_sub(s.window_start_ns) > self.policy.window_ns {
            s.window_start_ns = now_ns;
            s.window_hits = 0;
        }
        s.window_hits += 1;
        !s.promoted && s.window_hits >= self.policy.promote_hits
    }

    /// Marks every site of `op` promoted or not.
    pub fn set_promoted(&mut self, op: Op, promoted: bool) {
        self.set_promoted_where(|o| o == op, promoted);
    }

    /// Marks the site of `op` at `rip` promoted or not.
    pub fn set_promoted_at(&mut self, op: Op, rip: u64, promoted: bool) {
        if let Some(s) = self.sites.get_mut(&(op, rip)) {
            s.promoted = promoted;
            s.window_hits = 0;
        }
    }

    /// Marks every site whose operation matches promoted or not.
    pub fn set_promoted_where(&mut self, matches: impl Fn(Op) -> bool, promoted: bool) {
        for ((o, _), s) in self.sites.iter_mut() {
            if matches(*o) {
                s.promoted = promoted;
                s.window_hits = 0;
            }
        }
    }

    /// Whether a promoted path used `used` times over `elapsed_ns` should be demoted.
    pub fn cold(&self, used: u64, elapsed_ns: u64) -> bool {
        elapsed_ns >= self.policy.window_ns
            && used.saturating_mul(self.policy.window_ns) / elapsed_ns.max(1)
                < self.policy.demote_hits
    }

    /// The judgment window in nanoseconds.
    pub fn window_ns(&self) -> u64 {
        self.policy.window_ns
    }

    /// Sites trapped from but not tracked (the table was full).
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Every tracked site, hottest first.
    pub fn snapshot(&self) -> Vec<SiteSnapshot> {
        let mut v: Vec<_> = self
            .sites
            .iter()
            .map(|((op, rip), s)| SiteSnapshot {
                rip: *rip,
                op: op.to_string(),
                count: s.count,
                promoted: s.promoted,
                replaced: false,
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.rip.cmp(&b.rip)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: Op = Op::Out {
        port: 0x80,
        value: 7,
    };

    fn policy() -> Policy {
        Policy {
            promote_hits: 4,
            demote_hits: 2,
            window_ns: 1000,
        }
    }

    #[test]
    fn hot_within_a_window_only() {
        let mut s = Sites::new(policy());
        // Three hits, then a long pause: the window restarts, the site stays cold.
        for t in [0, 1, 2] {
            assert!(!s.hit(OP, 0x40_0000, t));
        }
        assert!(!s.hit(OP, 0x40_0000, 5000));
        for t in [5001, 5002] {
            assert!(!s.hit(OP, 0x40_0000, t));
        }
        assert!(s.hit(OP, 0x40_0000, 5003), "fourth hit in one window");
        s.set_promoted(OP, true);
        assert!(!s.hit(OP, 0x40_0000, 5004), "already promoted");
        let snap = s.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].count, 8);
        assert!(snap[0].promoted);
        assert_eq!(snap[0].op, "out 0x80, 0x07");
    }

    #[test]
    fn demotion_by_rate() {
        let s = Sites::new(policy());
        assert!(!s.cold(0, 500), "judged only after a whole window");
        assert!(s.cold(1, 1000));
        assert!(!s.cold(2, 1000));
        assert!(s.cold(3, 2000), "1.5 per window");
    }

    #[test]
    fn table_is_bounded() {
        let mut s = Sites::new(policy());
        for rip in 0..(MAX_SITES as u64 + 10) {
            s.hit(OP, rip, 0);
        }
        assert_eq!(s.snapshot().len(), MAX_SITES);
        assert_eq!(s.untracked(), 10);
        // A known site is still counted when the table is full.
        s.hit(OP, 0, 1);
        assert_eq!(s.untracked(), 10);
    }
}
