//! One VM's memory target, the controller's memory part.
//!
//! Setting a target starts a worker thread (`rebound-memory`) that brings the VM's resident
//! memory to it: it posts a request in the guest's class table (an idle guest is woken), waits
//! for the answer up to the answer deadline, and then, if the guest did not answer or did not
//! give enough, moves the guest's swap class out of RAM itself. A target above what the VM
//! holds lets the guest take back what it gave up. The guest's answer is a claim; only the
//! resident memory the host measures counts.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rebound_vmm::Vm;
use rebound_vmm::vm::MemoryReport;
use serde::Serialize;

use crate::{Error, PAGES_PER_MIB, Result};

/// Within this many pages of the target counts as there (the class table, stacks and such
/// move a little on their own).
pub const SLACK_PAGES: u64 = 64;

/// The default answer deadline.
pub const DEFAULT_ANSWER_MS: u64 = 250;

/// What the part did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    /// Requests posted to the guest.
    pub requests: u64,
    /// Requests it answered in time.
    pub answered: u64,
    /// Requests it did not answer in time (its swap class was moved out instead).
    pub unanswered: u64,
    /// Pages the guest said it gave up.
    pub guest_pages: u64,
    /// Pages it said it took back.
    pub taken_back_pages: u64,
    /// Pages the host moved out of RAM itself.
    pub host_paged_out: u64,
    /// Times the target was reached.
    pub reached: u64,
    /// How long the last reclaim took, from target to reached, in milliseconds.
    pub last_reclaim_ms: f64,
}

/// `GET /memory`.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryView {
    /// The target, if one is set.
    pub target_mib: Option<u64>,
    /// How long the guest has to answer a request.
    pub answer_ms: u64,
    /// Pages the guest gave up on request and may take back.
    pub given_pages: u64,
    /// What the part did.
    pub stats: MemoryStats,
    /// The VM's classes and swap.
    pub vm: Option<MemoryReport>,
}

/// A request posted: its number, the pages asked, the VM's resident pages then.
#[derive(Clone, Copy)]
struct Posted {
    seq: u64,
    asked: i64,
    resident: u64,
}

struct Outstanding {
    seq: u64,
    pages: i64,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    target: Option<u64>,
    answer_ms: u64,
    given: u64,
    stats: MemoryStats,
    outstanding: Option<Outstanding>,
    /// When the current target was set (for `last_reclaim_ms`).
    since: Option<Instant>,
    /// The worker is moving pages out (with the state unlocked).
    paging: bool,
    /// Requests posted and not yet accounted (an answer may come after its deadline).
    posted: std::collections::VecDeque<Posted>,
    /// Wait before the next request after cycles that moved nothing (doubles up to 1 s).
    backoff: Duration,
    worker: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The memory part of an instance.
#[derive(Clone, Default)]
pub struct MemoryPart {
    shared: Arc<Shared>,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryPart {
    /// Sets the VM's target (MiB of resident host memory) and the answer deadline (None:
    /// unchanged). Returns at once; the worker moves toward it.
    pub fn set_target(&self, vm: &Arc<Vm>, target_mib: u64, answer_ms: Option<u64>) -> Result<()> {
        let mem_mib = vm.descriptor().mem_size >> 20;
        if target_mib == 0 || target_mib > mem_mib {
            return Err(Error::Invalid {
                field: "target_mib",
                reason: format!("must be 1 to the VM's {mem_mib} MiB"),
            });
        }
        if let Some(ms) = answer_ms
            && !(1..=60_000).contains(&ms)
        {
            return Err(Error::Invalid {
                field: "answer_ms",
                reason: "must be 1 to 60000".into(),
            });
        }
        let start = {
            let mut st = lock(&self.shared);
            st.target = Some(target_mib * PAGES_PER_MIB);
            if let Some(ms) = answer_ms {
                st.answer_ms = ms;
            }
            if st.answer_ms == 0 {
                st.answer_ms = DEFAULT_ANSWER_MS;
            }
            st.since = Some(Instant::now());
            st.backoff = Duration::ZERO;
            !std::mem::replace(&mut st.worker, true)
        };
        self.shared.changed.notify_all();
        if start {
            let (shared, weak) = (self.shared.clone(), Arc::downgrade(vm));
            let spawned = std::thread::Builder::new()
                .name("rebound-memory".into())
                .spawn(move || work(&shared, &weak));
            if let Err(e) = spawned {
                lock(&self.shared).worker = false;
                return Err(Error::Host {
                    what: "cannot start the memory worker",
                    source: e,
                });
            }
        }
        Ok(())
    }

    /// The target (pages), if set.
    pub fn target_pages(&self) -> Option<u64> {
        lock(&self.shared).target
    }

    /// What `GET /memory` shows.
    pub fn view(&self, vm: Option<&Vm>) -> MemoryView {
        let st = lock(&self.shared);
        MemoryView {
            target_mib: st.target.map(|t| t / PAGES_PER_MIB),
            answer_ms: if st.answer_ms == 0 {
                DEFAULT_ANSWER_MS
            } else {
                st.answer_ms
            },
            given_pages: st.given,
            stats: st.stats,
            vm: vm.map(Vm::memory_report),
        }
    }

    /// Blocks until the VM is within [`SLACK_PAGES`] of its target, up to `timeout`. True if
    /// it got there.
    pub fn wait_reached(&self, vm: &Vm, timeout: Duration) -> bool {
        let t0 = Instant::now();
        let mut st = lock(&self.shared);
        loop {
            let Some(target) = st.target else {
                return true;
            };
            if st.outstanding.is_none() && !st.paging && vm.resident_pages() <= target + SLACK_PAGES
            {
                return true;
            }
            let Some(left) = timeout.checked_sub(t0.elapsed()) else {
                return false;
            };
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(5)))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }
}

/// The worker: brings the VM to its target until the VM ends.
fn work(shared: &Shared, vm: &Weak<Vm>) {
    loop {
        let Some(vm) = vm.upgrade() else { break };
        if vm.outcome().is_some() {
            break;
        }
        let wait = step(shared, &vm);
        drop(vm);
        let st = lock(shared);
        let _ = shared.changed.wait_timeout(st, wait);
    }
    lock(shared).worker = false;
}

/// One step toward the target; returns how long to wait before the next.
fn step(shared: &Shared, vm: &Vm) -> Duration {
    const IDLE: Duration = Duration::from_millis(50);
    const ANSWER_POLL: Duration = Duration::from_millis(1);
    let mut st = lock(shared);
    let Some(target) = st.target else {
        return IDLE;
    };
    let resident = vm.resident_pages();
    let over = resident as i64 - target as i64;
    // Any answer counts once, even one that came after its deadline.
    let answered = vm
        .memory_answer()
        .and_then(|(seq, pages)| account(&mut st, seq, pages, resident));
    if let Some(o) = &st.outstanding {
        let answer = answered.filter(|&seq| seq == o.seq);
        let late = Instant::now() >= o.deadline;
        if answer.is_none() && !late {
            return ANSWER_POLL;
        }
        let asked = o.pages;
        st.outstanding = None;
        match answer {
            Some(_) => st.stats.answered += 1,
            None => {
                st.stats.unanswered += 1;
                tracing::info!(
                    seq = vm.memory_report().request_seq,
                    "memory: the guest did not answer in time"
                );
            }
        }
        // Whatever the guest did, the host measures; what is still over comes out of swap.
        let over = vm.resident_pages() as i64 - target as i64;
        if asked > 0 && over > SLACK_PAGES as i64 {
            st.paging = true;
            drop(st);
            let moved = vm.page_out_swap(over as u64);
            st = lock(shared);
            st.paging = false;
            match moved {
                Ok(n) => st.stats.host_paged_out += n,
                Err(e) => tracing::warn!("memory: cannot move the swap class out: {e}"),
            }
        }
        note_reached(&mut st, vm, target);
        shared.changed.notify_all();
        // Requests are spaced: a guest is not asked again before it could have acted, and a
        // cycle that moved nothing (no cache, no swap class left) waits longer each time.
        let after = vm.resident_pages();
        st.backoff = if after + SLACK_PAGES < resident {
            Duration::ZERO
        } else {
            (st.backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1))
        };
        return st.backoff.max(Duration::from_millis(5));
    }
    if over > SLACK_PAGES as i64 {
        match vm.request_memory(over) {
            Ok(seq) => {
                st.stats.requests += 1;
                post(&mut st, seq, over, resident);
                st.outstanding = Some(Outstanding {
                    seq,
                    pages: over,
                    deadline: Instant::now() + Duration::from_millis(st.answer_ms),
                });
                return ANSWER_POLL;
            }
            Err(_) => {
                // No class table: the swap class is all the host can take, and there is none.
                return IDLE;
            }
        }
    }
    if over < -(SLACK_PAGES as i64) && st.given > 0 {
        let back = st.given.min(over.unsigned_abs());
        if let Ok(seq) = vm.request_memory(-(back as i64)) {
            st.stats.requests += 1;
            post(&mut st, seq, -(back as i64), resident);
            st.outstanding = Some(Outstanding {
                seq,
                pages: -(back as i64),
                deadline: Instant::now() + Duration::from_millis(st.answer_ms),
            });
            return ANSWER_POLL;
        }
    }
    note_reached(&mut st, vm, target);
    IDLE
}

/// Remembers request `seq` until its answer is accounted.
fn post(st: &mut State, seq: u64, asked: i64, resident: u64) {
    if st.posted.len() >= 16 {
        st.posted.pop_front();
    }
    st.posted.push_back(Posted {
        seq,
        asked,
        resident,
    });
}

/// Accounts the guest's answer to request `seq` (once); returns `seq` if it was one of ours.
fn account(st: &mut State, seq: u64, pages: i64, resident: u64) -> Option<u64> {
    let i = st.posted.iter().position(|p| p.seq == seq)?;
    let Posted {
        asked,
        resident: before,
        ..
    } = st.posted.remove(i)?;
    // Earlier requests will never be answered now.
    st.posted.retain(|p| p.seq > seq);
    if asked > 0 {
        // The claim, up to what the host measured: a guest cannot be owed more than it gave.
        let measured = before.saturating_sub(resident);
        let got = (pages.clamp(0, asked) as u64).min(measured);
        st.stats.guest_pages += got;
        st.given += got;
    } else {
        let took = pages.clamp(asked, 0).unsigned_abs();
        st.stats.taken_back_pages += took;
        // A guest that takes back less than it may is done: it is owed nothing more.
        st.given = if took < asked.unsigned_abs() {
            0
        } else {
            st.given.saturating_sub(took)
        };
    }
    Some(seq)
}

fn note_reached(st: &mut State, vm: &Vm, target: u64) {
    if vm.resident_pages() <= target + SLACK_PAGES
        && let Some(since) = st.since.take()
    {
        st.stats.reached += 1;
        st.stats.last_reclaim_ms = since.elapsed().as_secs_f64() * 1e3;
    }
}
