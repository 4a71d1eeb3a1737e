//! When to clone, who lends CPU share, when to retire a clone (pure logic).
//!
//! A VM is *busy* in a tick when its vCPUs ran at least `busy_util` of the tick and its work
//! queue held at least `busy_depth` jobs; *saturated* after `busy_ticks` busy ticks in a row.
//! A saturated VM with fewer than `max_clones` clones is cloned if some VMs are *idle* (vCPUs
//! ran at most `idle_util`): each lends `lend_percent` of its share, never going below
//! `min_shares`, and the clone's share is the sum, so the VM and its clone together have more
//! than the VM had. A clone retires once its VM's queue has been empty for `calm_ticks` ticks
//! in a row; its lenders get their loans back.

use serde::Serialize;

use crate::{Error, Result};

/// The policy's knobs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    /// vCPU run time per tick (0..1, per vCPU) at or above which a VM is busy.
    pub busy_util: f64,
    /// Queue depth at or above which a VM is busy.
    pub busy_depth: u64,
    /// Busy ticks in a row that make a VM saturated.
    pub busy_ticks: u32,
    /// vCPU run time at or below which a VM is idle and may lend share.
    pub idle_util: f64,
    /// Ticks in a row with an empty queue after which a clone retires.
    pub calm_ticks: u32,
    /// Percent of its share an idle VM lends to a clone.
    pub lend_percent: u64,
    /// Share a lender keeps at least.
    pub min_shares: u64,
    /// Clones one VM may have at once.
    pub max_clones: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            busy_util: 0.7,
            busy_depth: 2,
            busy_ticks: 3,
            idle_util: 0.2,
            calm_ticks: 5,
            lend_percent: 50,
            min_shares: 64,
            max_clones: 1,
        }
    }
}

impl Policy {
    /// Refuses knobs that make no sense.
    pub fn check(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(Error::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if !(self.busy_util > 0.0 && self.busy_util <= 1.0) {
            return bad("busy_util", "must be in (0, 1]");
        }
        if !(self.idle_util >= 0.0 && self.idle_util < self.busy_util) {
            return bad("idle_util", "must be at least 0 and below busy_util");
        }
        if self.busy_ticks == 0 || self.calm_ticks == 0 {
            return bad("busy_ticks/calm_ticks", "must be at least 1");
        }
        if self.lend_percent == 0 || self.lend_percent > 100 {
            return bad("lend_percent", "must be 1..=100");
        }
        if self.max_clones > 16 {
            return bad("max_clones", "at most 16");
        }
        Ok(())
    }
}

/// One VM in one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct View {
    /// vCPU run time over the tick, per vCPU (0..1).
    pub util: f64,
    /// Jobs in its work queue (None: no queue watched, or none there).
    pub depth: Option<u64>,
    /// Its CPU share now.
    pub shares: u64,
    /// The VM it is a clone of.
    pub clone_of: Option<usize>,
    /// Its clones now.
    pub clones: usize,
}

/// What the policy remembers of a VM between ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Track {
    busy: u32,
    calm: u32,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Clone `parent`; each `(lender, shares)` lends that much to the clone.
    Clone {
        /// The saturated VM.
        parent: usize,
        /// Loans.
        loans: Vec<(usize, u64)>,
    },
    /// `parent` is saturated and has room for a clone, but no VM is idle enough to lend.
    NoLender {
        /// The saturated VM.
        parent: usize,
    },
    /// Retire clone `clone`.
    Retire {
        /// The clone.
        clone: usize,
    },
}

impl Policy {
    /// One tick: updates `tracks` (one per VM, as `views`) and says what to do.
    pub fn decide(&self, tracks: &mut [Track], views: &[View]) -> Vec<Action> {
        let mut out = Vec::new();
        let mut lent = vec![0u64; views.len()];
        for (i, v) in views.iter().enumerate() {
            let Some(t) = tracks.get_mut(i) else { break };
            if let Some(parent) = v.clone_of {
                let empty = views.get(parent).and_then(|p| p.depth) == Some(0);
                t.calm = if empty { t.calm + 1 } else { 0 };
                if t.calm >= self.calm_ticks {
                    t.calm = 0;
                    out.push(Action::Retire { clone: i });
                }
                continue;
            }
            let busy = v.util >= self.busy_util && v.depth.unwrap_or(0) >= self.busy_depth;
            t.busy = if busy { t.busy + 1 } else { 0 };
            if t.busy < self.busy_ticks || v.clones >= self.max_clones {
                continue;
            }
            t.busy = 0;
            let loans: Vec<(usize, u64)> = views
                .iter()
                .enumerate()
                .filter(|&(j, w)| j != i && w.clone_of.is_none() && w.util <= self.idle_util)
                .filter_map(|(j, w)| {
                    let has = w.shares.saturating_sub(lent[j]);
                    let loan =
                        (has * self.lend_percent / 100).min(has.saturating_sub(self.min_shares));
                    (loan > 0).then_some((j, loan))
                })
                .collect();
            if loans.is_empty() {
                out.push(Action::NoLender { parent: i });
                continue;
            }
            for &(j, loan) in &loans {
                lent[j] += loan;
            }
            out.push(Action::Clone { parent: i, loans });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(util: f64, depth: Option<u64>, shares: u64) -> View {
        View {
            util,
            depth,
            shares,
            clone_of: None,
            clones: 0,
        }
    }

    fn ticks(p: &Policy, t: &mut [Track], v: &[View], n: usize) -> Vec<Action> {
        let mut last = Vec::new();
        for _ in 0..n {
            last = p.decide(t, v);
        }
        last
    }

    #[test]
    fn a_saturated_vm_is_cloned_with_half_of_each_idle_share() {
        let p = Policy::default();
        let v = [
            vm(0.95, Some(500), 1024),
            vm(0.01, None, 1024),
            vm(0.05, None, 512),
        ];
        let mut t = vec![Track::default(); 3];
        assert!(
            ticks(&p, &mut t, &v, 2).is_empty(),
            "not yet: two busy ticks"
        );
        let a = p.decide(&mut t, &v);
        assert_eq!(
            a,
            vec![Action::Clone {
                parent: 0,
                loans: vec![(1, 512), (2, 256)]
            }]
        );
    }

    #[test]
    fn busy_needs_both_cpu_and_a_queue_in_a_row() {
        let p = Policy::default();
        let idle = vm(0.0, None, 1024);
        let mut t = vec![Track::default(); 2];
        // CPU-bound with an empty queue: a clone would find no work.
        assert!(ticks(&p, &mut t, &[vm(1.0, Some(0), 1024), idle], 10).is_empty());
        // A deep queue but the VM is mostly waiting on something else.
        assert!(ticks(&p, &mut t, &[vm(0.3, Some(900), 1024), idle], 10).is_empty());
        // A calm tick between busy ones starts the count again.
        let busy = [vm(0.9, Some(9), 1024), idle];
        ticks(&p, &mut t, &busy, 2);
        p.decide(&mut t, &[vm(0.9, Some(0), 1024), idle]);
        assert!(ticks(&p, &mut t, &busy, 2).is_empty());
        assert!(matches!(
            p.decide(&mut t, &busy)[..],
            [Action::Clone { .. }]
        ));
    }

    #[test]
    fn no_idle_vm_means_no_clone() {
        let p = Policy::default();
        let v = [
            vm(0.9, Some(50), 1024),
            vm(0.5, None, 1024),
            vm(0.1, None, 100),
        ];
        let mut t = vec![Track::default(); 3];
        // The third is idle but at 100 shares lends at most down to min_shares (64): 36.
        assert_eq!(
            ticks(&p, &mut t, &v, 3),
            vec![Action::Clone {
                parent: 0,
                loans: vec![(2, 36)]
            }]
        );
        let v = [
            vm(0.9, Some(50), 1024),
            vm(0.5, None, 1024),
            vm(0.1, None, 64),
        ];
        assert_eq!(
            ticks(&p, &mut t, &v, 3),
            vec![Action::NoLender { parent: 0 }]
        );
    }

    #[test]
    fn at_most_max_clones_and_clones_do_not_lend_or_clone() {
        let p = Policy::default();
        let mut parent = vm(0.9, Some(50), 1024);
        parent.clones = 1;
        let mut clone = vm(0.0, Some(50), 512);
        clone.clone_of = Some(0);
        let v = [parent, vm(0.0, None, 1024), clone];
        let mut t = vec![Track::default(); 3];
        assert!(ticks(&p, &mut t, &v, 10).is_empty());
    }

    #[test]
    fn two_saturated_vms_share_what_lenders_have() {
        let p = Policy::default();
        let v = [
            vm(0.9, Some(50), 1024),
            vm(0.9, Some(50), 1024),
            vm(0.0, None, 1024),
        ];
        let mut t = vec![Track::default(); 3];
        let a = ticks(&p, &mut t, &v, 3);
        assert_eq!(
            a,
            vec![
                Action::Clone {
                    parent: 0,
                    loans: vec![(2, 512)]
                },
                Action::Clone {
                    parent: 1,
                    loans: vec![(2, 256)]
                },
            ]
        );
    }

    #[test]
    fn a_clone_retires_after_its_queue_stays_empty() {
        let p = Policy::default();
        let mut parent = vm(0.1, Some(0), 1024);
        parent.clones = 1;
        let mut clone = vm(0.0, None, 512);
        clone.clone_of = Some(0);
        let mut t = vec![Track::default(); 2];
        assert!(ticks(&p, &mut t, &[parent, clone], 4).is_empty());
        // A job arriving restarts the count.
        let mut busy = parent;
        busy.depth = Some(3);
        p.decide(&mut t, &[busy, clone]);
        assert!(ticks(&p, &mut t, &[parent, clone], 4).is_empty());
        assert_eq!(
            p.decide(&mut t, &[parent, clone]),
            vec![Action::Retire { clone: 1 }]
        );
    }

    #[test]
    fn bad_knobs_are_refused() {
        for p in [
            Policy {
                busy_util: 0.0,
                ..Policy::default()
            },
            Policy {
                idle_util: 0.9,
                ..Policy::default()
            },
            Policy {
                lend_percent: 101,
                ..Policy::default()
            },
            Policy {
                busy_ticks: 0,
                ..Policy::default()
            },
            Policy {
                busy_util: f64::NAN,
                ..Policy::default()
            },
        ] {
            assert!(p.check().is_err(), "{p:?}");
        }
        Policy::default().check().unwrap();
    }
}
