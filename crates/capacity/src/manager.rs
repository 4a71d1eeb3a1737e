//! The capacity manager: watches VMs, clones the saturated ones, lends the clones CPU share
//! taken from idle VMs, retires clones when load falls and gives the shares back.
//!
//! It reaches VMs through a [`Fleet`] (the `rebound capacity manage` command implements it
//! over each VMM's API socket and starts the VMMs clones run in). It measures what it decides
//! on itself: vCPU run time from the VMM's process, queue depth from the shared region's file.
//! Every VM (and clone) runs in a cgroup of its own under one parent group, so shares are
//! relative among them; the groups are removed and the VMMs put back where they were on
//! [`Manager::finish`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cgroup::{Group, Hierarchy};
use crate::policy::{Action, Policy, Track, View};
use crate::{Error, Result, usage};

/// A VM's work queue: the shared region's file and the queue's offset in its data area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueRef {
    /// The region's file (`/dev/shm/rebound-shared/<name>`).
    pub region_file: PathBuf,
    /// The queue's offset in the region's data area.
    pub offset: u64,
}

/// A VM the manager watches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberSpec {
    /// Its name (in events and cgroup names).
    pub name: String,
    /// The queue it takes jobs from, if any (a VM without one is never cloned, only lends).
    pub queue: Option<QueueRef>,
}

/// A VM's process and run time, as its VMM reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The VMM's process id.
    pub pid: u32,
    /// Nanoseconds its vCPU threads have run.
    pub vcpu_time_ns: u64,
    /// Its vCPUs.
    pub vcpus: u32,
}

/// A clone, running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Spawned {
    /// The clone's VMM process.
    pub pid: u32,
    /// Until the parent reached its clone point, in microseconds.
    pub reached_us: u64,
    /// Until the clone snapshot was written, in microseconds.
    pub snapshot_us: u64,
    /// Restoring it in the clone's VMM, in microseconds.
    pub restore_us: u64,
}

/// How the manager reaches VMs.
pub trait Fleet {
    /// The VM's process and vCPU run time.
    fn usage(&mut self, vm: &str) -> Result<Usage>;
    /// Clones `parent` at its clone point into a new VM named `clone`, running when this
    /// returns.
    fn clone_vm(&mut self, parent: &str, clone: &str) -> Result<Spawned>;
    /// Asks clone `clone` to finish its current job and exit, and waits for it (bounded).
    fn retire(&mut self, clone: &str) -> Result<()>;
}

/// What the manager did, for its log.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Watching these VMs, in these cgroups.
    Started {
        /// The VMs.
        members: Vec<String>,
        /// The parent group.
        cgroup: PathBuf,
        /// The cgroup version.
        version: crate::cgroup::Version,
        /// The share each VM starts with.
        shares: u64,
    },
    /// A tick's measurements (only when something is busy, to keep the log short).
    Busy {
        /// The VM.
        vm: String,
        /// vCPU run time over the tick, per vCPU.
        util: f64,
        /// Its queue's depth.
        depth: Option<u64>,
    },
    /// A clone runs.
    Cloned {
        /// The saturated VM.
        parent: String,
        /// The clone.
        clone: String,
        /// Its VMM process.
        pid: u32,
        /// Its share.
        shares: u64,
        /// Who lent how much.
        loans: Vec<(String, u64)>,
        /// From the decision to the clone running, in microseconds.
        decision_to_running_us: u64,
        /// The parts of it.
        timing: Spawned,
    },
    /// A clone could not be made.
    CloneFailed {
        /// The saturated VM.
        parent: String,
        /// Why.
        reason: String,
    },
    /// A VM is saturated but nothing is idle enough to lend share.
    NoLender {
        /// The saturated VM.
        parent: String,
    },
    /// A clone finished its jobs and exited; its lenders have their shares back.
    Retired {
        /// The clone.
        clone: String,
        /// Its parent.
        parent: String,
        /// The lenders' shares now.
        restored: Vec<(String, u64)>,
    },
    /// A clone could not be retired cleanly (it was stopped; shares are back anyway).
    RetireFailed {
        /// The clone.
        clone: String,
        /// Why.
        reason: String,
    },
    /// A VM could not be measured this tick.
    Unreachable {
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
}

struct Member {
    spec: MemberSpec,
    /// Where its VMM was before the manager moved it.
    came_from: Option<PathBuf>,
    group: Group,
    shares: u64,
    clone_of: Option<usize>,
    /// Loans to this clone: (lender, shares).
    loans: Vec<(usize, u64)>,
    last: Option<(Instant, u64)>,
    track: Track,
    view: View,
    gone: bool,
}

/// The manager.
pub struct Manager<F: Fleet> {
    fleet: F,
    policy: Policy,
    cgroups: Hierarchy,
    parent: Group,
    base_shares: u64,
    members: Vec<Member>,
    clones_made: u64,
}

impl<F: Fleet> Manager<F> {
    /// Starts watching `specs` under `policy`: makes the parent group `group_name` and a group
    /// per VM with `base_shares`, and moves each VMM into its group.
    pub fn new(
        fleet: F,
        policy: Policy,
        specs: Vec<MemberSpec>,
        cgroups: Hierarchy,
        group_name: &str,
        base_shares: u64,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Self> {
        policy.check()?;
        if specs.is_empty() {
            return Err(Error::Invalid {
                field: "vms",
                reason: "no VM to watch".into(),
            });
        }
        let parent = cgroups.group(None, group_name)?;
        let mut m = Self {
            fleet,
            policy,
            cgroups,
            parent,
            base_shares,
            members: Vec::new(),
            clones_made: 0,
        };
        for spec in specs {
            let u = m.fleet.usage(&spec.name).map_err(|e| Error::Member {
                member: spec.name.clone(),
                reason: e.to_string(),
            })?;
            m.adopt(spec, u.pid, None, base_shares)?;
        }
        on_event(&Event::Started {
            members: m.members.iter().map(|v| v.spec.name.clone()).collect(),
            cgroup: m.parent.dir().to_path_buf(),
            version: m.cgroups.version(),
            shares: base_shares,
        });
        Ok(m)
    }

    fn adopt(
        &mut self,
        spec: MemberSpec,
        pid: u32,
        clone_of: Option<usize>,
        shares: u64,
    ) -> Result<usize> {
        let came_from = self.cgroups.group_of(pid).ok();
        let group = self.cgroups.group(Some(&self.parent), &spec.name)?;
        group.set_shares(shares)?;
        group.add(pid)?;
        self.members.push(Member {
            spec,
            came_from,
            group,
            shares,
            clone_of,
            loans: Vec::new(),
            last: None,
            track: Track::default(),
            view: View::default(),
            gone: false,
        });
        Ok(self.members.len() - 1)
    }

    /// The share each VM started with.
    pub fn base_shares(&self) -> u64 {
        self.base_shares
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The VMs' names, clones included, with their shares now.
    pub fn shares(&self) -> Vec<(String, u64)> {
        self.members
            .iter()
            .filter(|m| !m.gone)
            .map(|m| (m.spec.name.clone(), m.shares))
            .collect()
    }

    fn measure(&mut self, i: usize, on_event: &mut dyn FnMut(&Event)) {
        let name = self.members[i].spec.name.clone();
        let now = Instant::now();
        let u = match self.fleet.usage(&name) {
            Ok(u) => u,
            Err(e) => {
                on_event(&Event::Unreachable {
                    vm: name,
                    reason: e.to_string(),
                });
                self.members[i].view.util = 0.0;
                return;
            }
        };
        let m = &mut self.members[i];
        m.view.util = match m.last {
            Some((t, ns)) => {
                let wall = now.duration_since(t).as_nanos().max(1) as f64;
                let ran = u.vcpu_time_ns.saturating_sub(ns) as f64;
                (ran / (wall * f64::from(u.vcpus.max(1)))).clamp(0.0, 1.0)
            }
            None => 0.0,
        };
        m.last = Some((now, u.vcpu_time_ns));
        m.view.depth = match &m.spec.queue {
            Some(q) => usage::queue_depth(&q.region_file, q.offset).unwrap_or(None),
            None => None,
        };
        m.view.shares = m.shares;
        m.view.clone_of = m.clone_of;
    }

    /// One round: measure every VM, decide, act.
    pub fn tick(&mut self, on_event: &mut dyn FnMut(&Event)) {
        for i in 0..self.members.len() {
            if !self.members[i].gone {
                self.measure(i, on_event);
            }
        }
        let live: Vec<usize> = (0..self.members.len())
            .filter(|&i| !self.members[i].gone)
            .collect();
        let mut views: Vec<View> = Vec::with_capacity(live.len());
        let mut tracks: Vec<Track> = Vec::with_capacity(live.len());
        for &i in &live {
            let m = &self.members[i];
            let mut v = m.view;
            v.clone_of = m.clone_of.and_then(|p| live.iter().position(|&j| j == p));
            v.clones = self
                .members
                .iter()
                .filter(|c| !c.gone && c.clone_of == Some(i))
                .count();
            if v.util >= self.policy.busy_util {
                on_event(&Event::Busy {
                    vm: m.spec.name.clone(),
                    util: (v.util * 1000.0).round() / 1000.0,
                    depth: v.depth,
                });
            }
            views.push(v);
            tracks.push(m.track);
        }
        let actions = self.policy.decide(&mut tracks, &views);
        for (k, &i) in live.iter().enumerate() {
            self.members[i].track = tracks[k];
        }
        let t_decided = Instant::now();
        for a in actions {
            match a {
                Action::Clone { parent, loans } => {
                    let loans: Vec<(usize, u64)> =
                        loans.into_iter().map(|(j, s)| (live[j], s)).collect();
                    self.clone_member(live[parent], loans, t_decided, on_event);
                }
                Action::NoLender { parent } => on_event(&Event::NoLender {
                    parent: self.members[live[parent]].spec.name.clone(),
                }),
                Action::Retire { clone } => self.retire_member(live[clone], on_event),
            }
        }
    }

    fn clone_member(
        &mut self,
        parent: usize,
        loans: Vec<(usize, u64)>,
        t_decided: Instant,
        on_event: &mut dyn FnMut(&Event),
    ) {
        self.clones_made += 1;
        let pname = self.members[parent].spec.name.clone();
        let cname = format!("{pname}-clone{}", self.clones_made);
        let spawned = match self.fleet.clone_vm(&pname, &cname) {
            Ok(s) => s,
            Err(e) => {
                on_event(&Event::CloneFailed {
                    parent: pname,
                    reason: e.to_string(),
                });
                return;
            }
        };
        let running = t_decided.elapsed();
        let shares: u64 = loans.iter().map(|&(_, s)| s).sum();
        let spec = MemberSpec {
            name: cname.clone(),
            queue: self.members[parent].spec.queue.clone(),
        };
        let idx = match self.adopt(spec, spawned.pid, Some(parent), shares) {
            Ok(i) => i,
            Err(e) => {
                // A clone outside its group would take share from no one: retire it.
                on_event(&Event::CloneFailed {
                    parent: pname,
                    reason: format!("its clone {cname} could not be given a share: {e}"),
                });
                let _ = self.fleet.retire(&cname);
                return;
            }
        };
        for &(j, loan) in &loans {
            let m = &mut self.members[j];
            m.shares = m.shares.saturating_sub(loan);
            if let Err(e) = m.group.set_shares(m.shares) {
                tracing::warn!(vm = %m.spec.name, error = %e, "cannot lower its share");
            }
        }
        self.members[idx].loans = loans.clone();
        on_event(&Event::Cloned {
            parent: pname,
            clone: cname,
            pid: spawned.pid,
            shares,
            loans: loans
                .iter()
                .map(|&(j, s)| (self.members[j].spec.name.clone(), s))
                .collect(),
            decision_to_running_us: running.as_micros() as u64,
            timing: spawned,
        });
    }

    fn retire_member(&mut self, i: usize, on_event: &mut dyn FnMut(&Event)) {
        let name = self.members[i].spec.name.clone();
        let parent = self.members[i]
            .clone_of
            .map(|p| self.members[p].spec.name.clone())
            .unwrap_or_default();
        if let Err(e) = self.fleet.retire(&name) {
            on_event(&Event::RetireFailed {
                clone: name.clone(),
                reason: e.to_string(),
            });
        }
        let loans = std::mem::take(&mut self.members[i].loans);
        self.members[i].gone = true;
        if let Err(e) = self.members[i].group.remove(None) {
            tracing::warn!(vm = %name, error = %e, "cannot remove the clone's cgroup");
        }
        let mut restored = Vec::new();
        for (j, loan) in loans {
            let m = &mut self.members[j];
            m.shares = m.shares.saturating_add(loan);
            if let Err(e) = m.group.set_shares(m.shares) {
                tracing::warn!(vm = %m.spec.name, error = %e, "cannot give its share back");
            }
            restored.push((m.spec.name.clone(), m.shares));
        }
        on_event(&Event::Retired {
            clone: name,
            parent,
            restored,
        });
    }

    /// Runs ticks every `interval` until `stop` says so.
    pub fn run(
        &mut self,
        interval: Duration,
        mut stop: impl FnMut() -> bool,
        on_event: &mut dyn FnMut(&Event),
    ) {
        let mut next = Instant::now();
        while !stop() {
            self.tick(on_event);
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }

    /// Retires every clone, gives every share back, puts every VMM back in the group it came
    /// from and removes the manager's groups.
    pub fn finish(mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        for i in 0..self.members.len() {
            if !self.members[i].gone && self.members[i].clone_of.is_some() {
                self.retire_member(i, on_event);
            }
        }
        let mut first_err = None;
        for m in &self.members {
            if m.gone {
                continue;
            }
            if let Err(e) = m.group.remove(m.came_from.as_deref())
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        }
        if let Err(e) = self.parent.remove(None)
            && first_err.is_none()
        {
            first_err = Some(e);
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl<F: Fleet> std::fmt::Debug for Manager<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("policy", &self.policy)
            .field("group", &self.parent.dir())
            .field("vms", &self.shares())
            .finish()
    }
}
