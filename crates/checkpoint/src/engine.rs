//! The epoch engine: checkpoints on a timer or on request, commits to sinks, releases held
//! output once a checkpoint is safe, and rolls the VM back to its last checkpoint.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::Vm;
use rebound_vmm::persist::SavedState;
use serde::Serialize;

use crate::output::{OutputCommit, OutputStats, Outputs};
use crate::sink::{CheckpointData, LiveMemory, Sink};
use crate::state_dir::{OutputRecord, StateDir};
use crate::strategy::pre_image::PreImage;
use crate::strategy::{FrozenSource, PageSource, Strategy, StrategyKind};
use crate::{CheckpointRef, Error, random_id};

/// Shortest checkpoint interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// Longest checkpoint interval accepted.
pub const MAX_INTERVAL: Duration = Duration::from_secs(10);
const PAUSE_HISTORY: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Result alias for engine calls.
pub type Result<T> = std::result::Result<T, Error>;

fn vm_err(e: rebound_vmm::Error) -> Error {
    Error::Vm(e.to_string())
}

/// How a VM is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Checkpoint period (5 ms to 10 s); None: only on request.
    pub interval: Option<Duration>,
    /// How memory is captured.
    pub strategy: StrategyKind,
}

impl EngineConfig {
    /// Checks the interval's range.
    pub fn validate(&self) -> Result<()> {
        match self.interval {
            Some(i) if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&i) => Err(Error::Config(format!(
                "interval_ms: {} is outside {}..={}",
                i.as_millis(),
                MIN_INTERVAL.as_millis(),
                MAX_INTERVAL.as_millis()
            ))),
            _ => Ok(()),
        }
    }
}

struct SinkSlot {
    sink: Box<dyn Sink>,
    /// Pages changed since this sink's last successful commit.
    pending: DirtySet,
    needs_full: bool,
}

struct Work {
    strategy: Box<dyn Strategy>,
    sinks: Vec<SinkSlot>,
    epoch: u64,
    /// The rollback target.
    last: Option<(u64, SavedState)>,
    /// The newest checkpoint every sink acknowledged (what the next one follows).
    committed: Option<CheckpointRef>,
}

#[derive(Default)]
struct StatsInner {
    epochs: u64,
    pauses_us: VecDeque<f64>,
    pause_max_us: f64,
    dirty_last: u64,
    dirty_total: u64,
    commit_last_us: f64,
    sink_errors: u64,
    last_error: Option<String>,
    rollbacks: u64,
    acked_epoch: u64,
}

/// What one checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CheckpointReport {
    /// Its epoch.
    pub epoch: u64,
    /// How long the guest was paused, in microseconds.
    pub pause_us: f64,
    /// Pages captured.
    pub dirty_pages: u64,
    /// Time the strategy spent capturing memory, in microseconds (part of the pause).
    pub capture_us: f64,
    /// Time to commit to the sinks, in microseconds (inside the pause for synchronous strategies).
    pub commit_us: f64,
    /// Whether every sink acknowledged it.
    pub acked: bool,
}

/// Pause-time summary in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PauseSummary {
    /// Last checkpoint.
    pub last: f64,
    /// Median over recent checkpoints.
    pub median: f64,
    /// 99th percentile over recent checkpoints.
    pub p99: f64,
    /// Worst so far.
    pub max: f64,
}

/// Engine counters (`GET /protection`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EngineStats {
    /// The capture strategy.
    pub strategy: StrategyKind,
    /// The period, if periodic.
    pub interval_ms: Option<f64>,
    /// Checkpoints taken (the first, taken when protection starts, included).
    pub epochs: u64,
    /// Newest epoch every sink acknowledged.
    pub acked_epoch: u64,
    /// Pause times.
    pub pause_us: PauseSummary,
    /// Pages captured at the last checkpoint.
    pub dirty_pages_last: u64,
    /// Pages captured in all.
    pub dirty_pages_total: u64,
    /// Last commit time in microseconds.
    pub commit_us_last: f64,
    /// Failed sink commits.
    pub sink_errors: u64,
    /// The last sink error.
    pub last_error: Option<String>,
    /// Rollbacks done.
    pub rollbacks: u64,
    /// Why protection was given up (the VM runs on unprotected), if it was.
    pub lost: Option<String>,
    /// Held and released output.
    pub output: OutputStats,
}

struct Inner {
    vm: Arc<Vm>,
    output: Outputs,
    config: EngineConfig,
    work: Mutex<Work>,
    ticker_state: Mutex<TickerState>,
    wake: Condvar,
    /// Why protection was given up, if it was.
    broken: Mutex<Option<String>>,
    /// The VM lives in a state directory: its final output is released by its owner, after
    /// recording the end there (see `Instance::wait`), never by the ticker.
    preserved: bool,
    stats: Mutex<StatsInner>,
}

/// How an engine starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Number of the first checkpoint (0 is taken as 1).
    pub first_epoch: u64,
    /// The VM's state directory: old page contents are journaled there for crash recovery
    /// (pre-image strategy only).
    pub state_dir: Option<StateDir>,
}

/// What the checkpoint thread is asked to do.
#[derive(Default)]
struct TickerState {
    stop: bool,
    /// A checkpoint is wanted now.
    requested: bool,
}

/// A VM's checkpoint engine.
pub struct Engine {
    inner: Arc<Inner>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    /// Stopped or abandoned: dropping it does nothing more.
    finished: AtomicBool,
}

/// The running VM's memory, for sinks' work between checkpoints.
struct LiveVm<'a>(&'a Vm);

impl LiveMemory for LiveVm<'_> {
    fn copy_page(&self, p: u64, buf: &mut [u8]) -> bool {
        self.0.copy_page(p, buf).is_ok()
    }
}

/// What sinks read from at one checkpoint.
struct Commit<'a> {
    epoch: u64,
    id: u64,
    follows: Option<CheckpointRef>,
    state: &'a SavedState,
    mem_size: u64,
    source: &'a dyn PageSource,
    data: Option<&'a DirtySet>,
    output: &'a OutputRecord,
}

/// Commits to every sink; `Ok(false)` if one did not acknowledge, `Err(Lost)` if one can no
/// longer protect the VM at all (its state directory cannot be written).
fn commit_sinks(sinks: &mut [SinkSlot], c: &Commit<'_>, stats: &Mutex<StatsInner>) -> Result<bool> {
    let mut ok = true;
    let mut lost = None;
    let Commit {
        epoch,
        id,
        follows,
        state,
        mem_size,
        source,
        data,
        output,
    } = *c;
    for slot in sinks.iter_mut() {
        if !ok && slot.sink.is_commit_point() {
            // The commit point records the checkpoint as the one to recover: only once every
            // other sink has it.
            continue;
        }
        let cp = CheckpointData {
            epoch,
            id,
            follows,
            state,
            mem_size,
            pages: &slot.pending,
            full: slot.needs_full || slot.sink.wants_full(),
            data,
            source,
            output,
        };
        match slot.sink.commit(&cp) {
            Ok(()) => {
                slot.pending.clear();
                slot.needs_full = false;
            }
            Err(e) => {
                ok = false;
                tracing::error!(epoch, "checkpoint not acknowledged: {e}");
                let mut s = lock(stats);
                s.sink_errors += 1;
                s.last_error = Some(e.to_string());
                if let Error::Lost(_) = e {
                    lost = Some(e);
                }
            }
        }
    }
    match lost {
        Some(e) => Err(e),
        None => Ok(ok),
    }
}

/// Protection cannot go on (`e`): every sink is told (a state directory marks itself
/// unrecoverable), the strategy frees what it holds, held output is released, and the VM runs
/// on unprotected. The reason stays in the engine's counters.
fn give_up(inner: &Inner, strategy: &mut dyn Strategy, sinks: &mut [SinkSlot], e: &Error) {
    let reason = e.to_string();
    tracing::error!("protection given up, the VM runs on unprotected: {reason}");
    for s in sinks.iter_mut() {
        s.sink.lost(&reason);
    }
    strategy.give_up();
    inner.vm.hold_memory_returns(false);
    *lock(&inner.broken) = Some(reason);
    if let Err(err) = inner.output.pass_through() {
        tracing::error!("cannot release held output: {err}");
    }
}

impl Engine {
    /// Starts protecting `vm`: takes the first checkpoint now (a full copy for the strategy and
    /// every sink), holds the guest's output from here on, and checkpoints every
    /// `config.interval`. `output` must be the VM's console writer's owner.
    pub fn start(
        vm: Arc<Vm>,
        output: Arc<OutputCommit>,
        config: EngineConfig,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Result<Engine> {
        Self::start_from(vm, output, config, sinks, StartOptions::default())
    }

    /// [`start`](Self::start) with options: the first checkpoint's number (protection resumed
    /// over a directory keeps its epochs unique) and an undo journal for crash recovery.
    pub fn start_from(
        vm: Arc<Vm>,
        output: Arc<OutputCommit>,
        config: EngineConfig,
        sinks: Vec<Box<dyn Sink>>,
        opts: StartOptions,
    ) -> Result<Engine> {
        config.validate()?;
        let output = Outputs {
            console: output,
            devices: vm.held_outputs(),
        };
        let first_epoch = opts.first_epoch.max(1);
        let preserved = opts.state_dir.is_some();
        let mem_size = vm.descriptor().mem_size;
        let pages = mem_size / PAGE_SIZE;
        // A VM recovered a moment ago goes on from the checkpoint it was recovered from: the
        // first record follows it, and until that record is committed the directory still
        // recovers to it.
        let origin = opts.state_dir.as_ref().and_then(StateDir::resumable_head);
        let mut strategy: Box<dyn Strategy> = match (&opts.state_dir, config.strategy) {
            (None, kind) => kind.build(mem_size),
            (Some(dir), StrategyKind::PreImage) => {
                Box::new(PreImage::durable(mem_size, dir.clone(), origin))
            }
            (Some(_), kind) => {
                return Err(Error::Config(format!(
                    "crash recovery needs the pre_image strategy (memory stays in place and is undone from its journal), not {}",
                    kind.name()
                )));
            }
        };
        let mut slots: Vec<SinkSlot> = sinks
            .into_iter()
            .map(|sink| SinkSlot {
                sink,
                pending: DirtySet::new(pages),
                needs_full: true,
            })
            .collect();
        // Commit points last (see `Sink::is_commit_point`).
        slots.sort_by_key(|s| s.sink.is_commit_point());
        let stats = Mutex::new(StatsInner::default());
        let t0 = Instant::now();
        let frozen = vm.freeze().map_err(vm_err)?;
        strategy.start(&frozen, first_epoch)?;
        // Hold output only once protection can work: a failed start must not keep it forever.
        output.hold(first_epoch);
        let state = frozen.state().clone();
        // Which pages hold data matters only to sinks that store memory (finding out walks
        // the whole memory file).
        let data = if slots.iter().any(|s| s.sink.stores_memory()) {
            frozen.data_pages()
        } else {
            DirtySet::new(pages)
        };
        let source = FrozenSource(&frozen);
        let out = output.sealed_record(first_epoch);
        let first = CheckpointRef {
            epoch: first_epoch,
            id: random_id(),
        };
        let c = Commit {
            epoch: first_epoch,
            id: first.id,
            follows: origin,
            state: &state,
            mem_size,
            source: &source,
            data: Some(&data),
            output: &out,
        };
        let mut ok = commit_sinks(&mut slots, &c, &stats);
        if matches!(ok, Ok(true))
            && strategy.moves_on_commit()
            && let Err(e) = strategy.committed(first, &DirtySet::new(pages))
        {
            lock(&stats).last_error = Some(e.to_string());
            ok = Err(e);
        }
        let pause = t0.elapsed();
        frozen.thaw().map_err(vm_err)?;
        if !matches!(ok, Ok(true)) {
            // A sink may hold a valid first checkpoint while the VM runs on unprotected: it
            // must not be taken for one.
            for s in slots.iter_mut() {
                s.sink.lost("protection could not start");
            }
            // Protection without a working sink would hold output forever: refuse to start.
            let _ = output.pass_through();
            let reason = lock(&stats).last_error.clone().unwrap_or_default();
            return Err(Error::Sink {
                sink: "initial checkpoint".into(),
                reason,
            });
        }
        {
            let mut s = lock(&stats);
            s.epochs = 1;
            s.acked_epoch = first_epoch;
            s.pauses_us.push_back(pause.as_secs_f64() * 1e6);
            s.pause_max_us = pause.as_secs_f64() * 1e6;
        }
        tracing::info!(strategy = config.strategy.name(), ?pause, "VM protected");
        let inner = Arc::new(Inner {
            vm,
            output,
            config,
            work: Mutex::new(Work {
                strategy,
                sinks: slots,
                epoch: first_epoch,
                last: Some((first_epoch, state)),
                committed: Some(first),
            }),
            ticker_state: Mutex::new(TickerState::default()),
            wake: Condvar::new(),
            stats,
            broken: Mutex::new(None),
            preserved,
        });
        // Held output past its soft limit asks for a checkpoint now (weakly: the output
        // outlives the engine).
        let weak = Arc::downgrade(&inner);
        inner.output.on_wanted(Some(Arc::new(move || {
            if let Some(i) = weak.upgrade() {
                lock(&i.ticker_state).requested = true;
                i.wake.notify_all();
            }
        })));
        let i = inner.clone();
        let ticker = std::thread::Builder::new()
            .name("rebound-checkpoint".into())
            .spawn(move || tick(&i))
            .map_err(|e| Error::Config(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Engine {
            inner,
            ticker: Mutex::new(Some(ticker)),
            finished: AtomicBool::new(false),
        })
    }

    /// Takes a checkpoint now.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        checkpoint(&self.inner)
    }

    /// Puts the VM back to its last checkpoint: memory, vCPUs and devices as they were, output
    /// produced since dropped (the guest produces it again). Returns the checkpoint's epoch.
    pub fn rollback(&self) -> Result<u64> {
        let inner = &self.inner;
        let mut w = lock(&inner.work);
        check_protected(inner)?;
        let Work {
            strategy,
            last,
            sinks,
            ..
        } = &mut *w;
        let (epoch, state) = last.clone().ok_or(Error::NoCheckpoint)?;
        let frozen = inner.vm.freeze().map_err(vm_err)?;
        let dirty = strategy.dirty(&frozen)?;
        // Memory is back to the checkpoint even when the journal could not start over after
        // it (that only ends protection), so the rollback completes either way.
        let lost = match strategy.rollback(&frozen, &dirty) {
            Ok(()) => None,
            Err(e @ Error::Lost(_)) => Some(e),
            Err(e) => {
                // Memory may be partly rolled back: the VM cannot be trusted to go on.
                inner.vm.fail(format!("rollback failed midway: {e}"));
                return Err(e);
            }
        };
        frozen.restore_state(&state).map_err(vm_err)?;
        inner.output.discard_after(epoch);
        // The pages put back are what every sink has, unless one copied them since (a
        // standby's resync reads memory between checkpoints): they go again.
        for s in sinks.iter_mut() {
            s.pending.union(&dirty);
        }
        frozen.thaw().map_err(vm_err)?;
        if let Some(e) = lost {
            give_up(inner, strategy.as_mut(), sinks, &e);
        }
        lock(&inner.stats).rollbacks += 1;
        tracing::info!(epoch, pages = dirty.count(), "VM rolled back");
        Ok(epoch)
    }

    /// Memory the capture strategy holds besides guest memory, in bytes (shadow pages in RAM,
    /// the undo log, block-state's second home).
    pub fn strategy_memory_bytes(&self) -> u64 {
        lock(&self.inner.work).strategy.memory_bytes()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        let s = lock(&self.inner.stats);
        let mut sorted: Vec<f64> = s.pauses_us.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        EngineStats {
            strategy: self.inner.config.strategy,
            interval_ms: self.inner.config.interval.map(|d| d.as_secs_f64() * 1e3),
            epochs: s.epochs,
            acked_epoch: s.acked_epoch,
            pause_us: PauseSummary {
                last: s.pauses_us.back().copied().unwrap_or(0.0),
                median: pct(0.5),
                p99: pct(0.99),
                max: s.pause_max_us,
            },
            dirty_pages_last: s.dirty_last,
            dirty_pages_total: s.dirty_total,
            commit_us_last: s.commit_last_us,
            sink_errors: s.sink_errors,
            last_error: s.last_error.clone(),
            rollbacks: s.rollbacks,
            lost: lock(&self.inner.broken).clone(),
            output: self.inner.output.stats(),
        }
    }

    fn halt(&self) {
        self.finished.store(true, Ordering::Release);
        lock(&self.inner.ticker_state).stop = true;
        self.inner.wake.notify_all();
        if let Some(t) = lock(&self.ticker).take() {
            let _ = t.join();
        }
        self.inner.output.on_wanted(None);
        // The VM goes on without checkpoints: what the sinks hold stops describing it.
        let mut w = lock(&self.inner.work);
        for s in w.sinks.iter_mut() {
            s.sink.lost("protection was stopped");
        }
        w.strategy.give_up();
        self.inner.vm.hold_memory_returns(false);
    }

    /// Hands the VM over to the sinks that can take it over (a standby): a checkpoint now,
    /// which must be acknowledged, then protection ends with what the VM did since dropped
    /// (it will be done again from that checkpoint elsewhere). The caller stops the VM.
    pub fn hand_over(&self) -> Result<CheckpointReport> {
        let r = self.checkpoint()?;
        if !r.acked {
            return Err(Error::Config(format!(
                "checkpoint {} was not acknowledged: nothing to hand over",
                r.epoch
            )));
        }
        let mut taken = false;
        for s in lock(&self.inner.work).sinks.iter_mut() {
            taken |= s.sink.hand_over();
        }
        if !taken {
            return Err(Error::Config(format!(
                "no sink can take the VM over from checkpoint {} (a standby still resyncing has no copy)",
                r.epoch
            )));
        }
        self.abandon();
        Ok(r)
    }

    /// Stops protecting and drops held output, but keeps holding new output: the VM is about to
    /// go back to a point before it, and protection will start again from there.
    pub fn abandon(&self) {
        self.halt();
        self.inner.output.discard_held();
    }

    /// Stops protecting: no more checkpoints, held output released, the strategy's resources
    /// (shadow, write protection) freed. The VM keeps running.
    pub fn stop(&self) {
        self.halt();
        if let Err(e) = self.inner.output.pass_through() {
            tracing::error!("cannot release held output: {e}");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::Acquire) {
            self.stop();
        }
    }
}

/// Takes checkpoints every period (if any) and whenever one is requested (held output over its
/// soft limit), until stopped.
fn tick(inner: &Inner) {
    let period = inner.config.interval;
    let mut next = period.map(|p| Instant::now() + p);
    loop {
        {
            let mut t = lock(&inner.ticker_state);
            loop {
                if t.stop {
                    return;
                }
                if t.requested {
                    t.requested = false;
                    break;
                }
                let now = Instant::now();
                match next {
                    Some(n) if now >= n => break,
                    Some(n) => {
                        t = inner
                            .wake
                            .wait_timeout(t, n - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => t = inner.wake.wait(t).unwrap_or_else(|e| e.into_inner()),
                }
            }
        }
        if let (Some(p), Some(n)) = (period, next.as_mut()) {
            *n += p;
            // A checkpoint slower than the period pushes the next one back rather than bunching up.
            let now = Instant::now();
            if *n < now {
                *n = now + p;
            }
        }
        if let Err(e) = checkpoint(inner) {
            if lock(&inner.broken).is_some() {
                tracing::error!("protection given up: {e}");
                return;
            }
            if inner.vm.outcome().is_some() {
                // The guest is gone: nothing can roll back any more, so nothing stays held.
                if !inner.preserved {
                    let _ = inner.output.pass_through();
                }
                return;
            }
            tracing::error!("checkpoint failed: {e}");
            let mut s = lock(&inner.stats);
            s.last_error = Some(e.to_string());
        }
    }
}

fn check_protected(inner: &Inner) -> Result<()> {
    match &*lock(&inner.broken) {
        Some(reason) => Err(Error::Lost(reason.clone())),
        None => Ok(()),
    }
}

fn checkpoint(inner: &Inner) -> Result<CheckpointReport> {
    let mut w = lock(&inner.work);
    check_protected(inner)?;
    let Work {
        strategy,
        sinks,
        epoch,
        last,
        committed,
    } = &mut *w;
    let t0 = Instant::now();
    let frozen = inner.vm.freeze().map_err(vm_err)?;
    let dirty = match strategy.dirty(&frozen) {
        Ok(d) => d,
        Err(e @ Error::Lost(_)) => {
            drop(frozen);
            give_up(inner, strategy.as_mut(), sinks, &e);
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let tcap = Instant::now();
    strategy.capture(&frozen, &dirty)?;
    let capture = tcap.elapsed();
    let e = *epoch + 1;
    *epoch = e;
    let this = CheckpointRef {
        epoch: e,
        id: random_id(),
    };
    for s in sinks.iter_mut() {
        s.pending.union(&dirty);
    }
    inner.output.seal(e);
    let mem_size = frozen.mem_size();
    let data = sinks
        .iter()
        .any(|s| (s.needs_full || s.sink.wants_full()) && s.sink.stores_memory())
        .then(|| frozen.data_pages());
    let state = frozen.state().clone();
    let output = inner.output.sealed_record(e);
    let mut acked = true;
    let mut commit = Duration::ZERO;
    let asynchronous = strategy.async_source().is_some();
    if !asynchronous {
        let tc = Instant::now();
        let source = FrozenSource(&frozen);
        let c = Commit {
            epoch: e,
            id: this.id,
            follows: *committed,
            state: &state,
            mem_size,
            source: &source,
            data: data.as_ref(),
            output: &output,
        };
        acked = match commit_sinks(sinks, &c, &inner.stats) {
            Ok(a) => a,
            Err(e) => {
                give_up(inner, strategy.as_mut(), sinks, &e);
                drop(frozen);
                return Err(e);
            }
        };
        commit = tc.elapsed();
    }
    if strategy.moves_on_commit() {
        // The rollback point (and the pre-image undo log) move only past an acknowledged
        // checkpoint; an unacknowledged one is retried at the next epoch from the same base.
        if acked {
            if let Err(err) = strategy.committed(this, &dirty) {
                if let Error::Lost(_) = err {
                    give_up(inner, strategy.as_mut(), sinks, &err);
                }
                return Err(err);
            }
            *last = Some((e, state.clone()));
            *committed = Some(this);
        }
    } else {
        *last = Some((e, state.clone()));
    }
    let pause = t0.elapsed();
    frozen.thaw().map_err(vm_err)?;
    if let Some(source) = strategy.async_source() {
        let tc = Instant::now();
        let c = Commit {
            epoch: e,
            id: this.id,
            follows: *committed,
            state: &state,
            mem_size,
            source,
            data: data.as_ref(),
            output: &output,
        };
        acked = match commit_sinks(sinks, &c, &inner.stats) {
            Ok(a) => a,
            Err(e) => {
                give_up(inner, strategy.as_mut(), sinks, &e);
                return Err(e);
            }
        };
        commit = tc.elapsed();
        strategy.settle();
    }
    if acked && !strategy.moves_on_commit() {
        *committed = Some(this);
    }
    let live = LiveVm(&inner.vm);
    for s in sinks.iter_mut() {
        s.sink.between(&live);
    }
    if acked && let Err(err) = inner.output.release(e) {
        // Released output that could not be written where it goes: what the outside saw can
        // no longer be matched by a recovery.
        let lost = Error::Lost(format!("cannot release output: {err}"));
        give_up(inner, strategy.as_mut(), sinks, &lost);
        return Err(lost);
    }
    let report = CheckpointReport {
        epoch: e,
        pause_us: pause.as_secs_f64() * 1e6,
        dirty_pages: dirty.count(),
        capture_us: capture.as_secs_f64() * 1e6,
        commit_us: commit.as_secs_f64() * 1e6,
        acked,
    };
    let mut s = lock(&inner.stats);
    s.epochs += 1;
    if acked {
        s.acked_epoch = e;
    }
    if s.pauses_us.len() == PAUSE_HISTORY {
        s.pauses_us.pop_front();
    }
    s.pauses_us.push_back(report.pause_us);
    s.pause_max_us = s.pause_max_us.max(report.pause_us);
    s.dirty_last = report.dirty_pages;
    s.dirty_total += report.dirty_pages;
    s.commit_last_us = report.commit_us;
    Ok(report)
}
