//! The protection part: the checkpoint engine running over the VM, its settings, and the
//! operations on it (checkpoint now, roll back to the last or to a named checkpoint).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rebound_checkpoint::engine::{CheckpointReport, StartOptions};
use rebound_checkpoint::sink::{Preserved, Sink, SnapshotDir};
use rebound_checkpoint::state_dir::StateDir;
use rebound_checkpoint::{Engine, EngineConfig, EngineStats, OutputCommit, StrategyKind};
use rebound_cluster::sink::{Dest, Target};
use rebound_snapshot::Snapshot;
use rebound_snapshot::format::Verify;
use rebound_vmm::Vm;
use serde::Serialize;

use crate::{Error, Result};

/// How a VM is protected by the checkpoint engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Protection {
    /// Checkpoint period in milliseconds (5 to 10,000); None: only on request.
    pub interval_ms: Option<u64>,
    /// Capture strategy.
    pub strategy: StrategyKind,
    /// Write every checkpoint to this snapshot directory.
    pub snapshot_dir: Option<PathBuf>,
    /// Diffs kept before the directory's chain is merged into a new full snapshot.
    pub max_chain: usize,
    /// Replicate every checkpoint to the standby listening here (host:port; `rebound
    /// standby`): output is released only once the standby stored its checkpoint.
    pub standby: Option<String>,
    /// Ask the standby to keep the VM hot (memory applied in place; failover resumes it)
    /// rather than cold (the checkpoint chain; failover builds it).
    pub standby_hot: bool,
}

impl Protection {
    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            interval: self.interval_ms.map(Duration::from_millis),
            strategy: self.strategy,
        }
    }
}

/// Protection for a VM in a state directory when none is given: a checkpoint every 50 ms with
/// the pre-image strategy (the only one that can recover memory in place).
pub fn default_protection() -> Protection {
    Protection {
        interval_ms: Some(50),
        strategy: StrategyKind::PreImage,
        snapshot_dir: None,
        max_chain: 16,
        standby: None,
        standby_hot: false,
    }
}

/// The state directory a protection commits to, if the VM lives in one, and the epoch the VM
/// was recovered at if that just happened (its records then still describe it).
pub struct Preservation<'a> {
    /// The directory.
    pub dir: &'a StateDir,
    /// The epoch of a recovery a moment ago.
    pub recovered: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sinks protection `p` commits to, and where its epochs start.
fn sinks(
    p: &Protection,
    vm: &str,
    target: &Target,
    preserved: Option<Preservation<'_>>,
) -> Result<(Vec<Box<dyn Sink>>, StartOptions)> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    let mut opts = StartOptions {
        first_epoch: 1,
        state_dir: None,
    };
    if let Some(dir) = &p.snapshot_dir {
        sinks.push(Box::new(SnapshotDir::new(dir, p.max_chain)?));
        // Protection resumed over an existing directory continues its epoch numbers.
        opts.first_epoch = rebound_checkpoint::sink::newest_epoch(dir)? + 1;
    }
    if p.standby.is_some() {
        sinks.push(Box::new(rebound_cluster::Remote::to(target.clone(), vm)));
    }
    if let Some(Preservation { dir, recovered }) = preserved {
        if p.strategy != StrategyKind::PreImage {
            return Err(Error::Invalid {
                field: "strategy",
                reason: format!(
                    "a VM in a state directory is protected with the pre_image strategy (its memory stays in place and is undone from a journal), not {}",
                    p.strategy.name()
                ),
            });
        }
        let newest = dir.records()?.last().map_or(0, |(e, _)| *e);
        // Only a VM recovered a moment ago (still paused) is what its newest record says;
        // otherwise the records are stale and go before protection starts afresh.
        if recovered != Some(newest) {
            dir.purge_records();
        }
        opts.first_epoch = opts.first_epoch.max(newest + 1);
        opts.state_dir = Some(dir.clone());
        sinks.push(Box::new(Preserved::new(dir.clone())));
    }
    Ok((sinks, opts))
}

/// The protection part of an instance.
#[derive(Default)]
pub struct Protector {
    engine: Mutex<Option<(Engine, Protection)>>,
    /// Where a replicated VM's checkpoints go (moved while it runs by [`Protector::move_standby`]).
    target: Mutex<Option<Target>>,
    /// The VM's name (the standby knows it by it).
    name: Mutex<String>,
    /// Protection to start with the VM (before its first instruction).
    start_with: Mutex<Option<Protection>>,
}

impl Protector {
    /// Sets the protection to start with the VM.
    pub fn set_start_with(&self, p: Option<Protection>) -> Result<()> {
        if let Some(p) = &p {
            p.engine_config().validate()?;
        }
        *lock(&self.start_with) = p;
        Ok(())
    }

    /// The protection to start with the VM, if one was set.
    pub fn start_with(&self) -> Option<Protection> {
        lock(&self.start_with).clone()
    }

    /// Starts protecting `vm` (whose output goes through `output`).
    pub fn start(
        &self,
        vm: Arc<Vm>,
        name: &str,
        output: Arc<OutputCommit>,
        p: Protection,
        preserved: Option<Preservation<'_>>,
    ) -> Result<()> {
        let mut engine = lock(&self.engine);
        if engine.is_some() {
            return Err(Error::AlreadyProtected);
        }
        let config = p.engine_config();
        config.validate()?;
        let target = Target::new(p.standby.clone(), p.standby_hot);
        let (sinks, opts) = sinks(&p, name, &target, preserved)?;
        *lock(&self.name) = name.to_string();
        *lock(&self.target) = p.standby.is_some().then_some(target);
        *engine = Some((Engine::start_from(vm, output, config, sinks, opts)?, p));
        Ok(())
    }

    /// Stops protection (held output is released).
    pub fn stop(&self) -> Result<()> {
        match lock(&self.engine).take() {
            Some((engine, _)) => {
                engine.stop();
                Ok(())
            }
            None => Err(Error::NotProtected),
        }
    }

    /// Stops protection if it runs (the VM ended).
    pub fn end(&self) {
        let _ = self.stop();
    }

    /// The standby the VM is replicated to, if protected with one.
    pub fn standby(&self) -> Option<String> {
        lock(&self.engine)
            .as_ref()
            .and_then(|(_, p)| p.standby.clone())
    }

    /// Moves a replicated VM's standby while it runs (None: none for now; the VM runs on,
    /// protected locally): its next checkpoint goes, full, to the new one, and output waits
    /// for that one's acknowledgement.
    pub fn move_standby(&self, addr: Option<String>, hot: bool) -> Result<()> {
        let mut engine = lock(&self.engine);
        let (_, p) = engine.as_mut().ok_or(Error::NotProtected)?;
        let target = lock(&self.target);
        let t = target.as_ref().ok_or_else(|| Error::Invalid {
            field: "standby",
            reason: "the VM is protected without replication (protect it with a standby)".into(),
        })?;
        t.set(Dest {
            addr: addr.clone(),
            hot,
        });
        p.standby = addr;
        p.standby_hot = hot;
        Ok(())
    }

    /// Hands the VM over to its standby (see [`Engine::hand_over`]); protection ends. Returns
    /// the checkpoint the standby resumes from.
    pub fn hand_over(&self) -> Result<u64> {
        let mut engine = lock(&self.engine);
        let (e, _) = engine.as_ref().ok_or(Error::NotProtected)?;
        let r = e.hand_over()?;
        *engine = None;
        Ok(r.epoch)
    }

    /// Whether the VM is protected.
    pub fn is_protected(&self) -> bool {
        lock(&self.engine).is_some()
    }

    /// The settings and counters, if protected.
    pub fn settings(&self) -> Option<(Protection, EngineStats)> {
        lock(&self.engine)
            .as_ref()
            .map(|(e, p)| (p.clone(), e.stats()))
    }

    /// Runs `f` on the engine, which stays in place while it runs.
    pub fn with_engine<T>(&self, f: impl FnOnce(&Engine, &Protection) -> Result<T>) -> Result<T> {
        let g = lock(&self.engine);
        let (engine, p) = g.as_ref().ok_or(Error::NotProtected)?;
        f(engine, p)
    }

    /// Takes a checkpoint now.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        self.with_engine(|e, _| Ok(e.checkpoint()?))
    }

    /// Rolls back to the last checkpoint; returns its epoch.
    pub fn rollback(&self) -> Result<u64> {
        self.with_engine(|e, _| Ok(e.rollback()?))
    }

    /// Rolls `vm` back, in place, to the earlier checkpoint `epoch` kept in the protection's
    /// snapshot directory. Held output is dropped; output released after that checkpoint was
    /// already seen and will be produced again. Protection restarts from the rolled-back state.
    pub fn rollback_to(
        &self,
        vm: Arc<Vm>,
        output: Arc<OutputCommit>,
        epoch: u64,
        preserved: impl FnOnce() -> Option<(StateDir, Option<u64>)>,
    ) -> Result<u64> {
        let mut engine = lock(&self.engine);
        let (_, protection) = engine.as_ref().ok_or(Error::NotProtected)?;
        let dir = protection.snapshot_dir.clone().ok_or(Error::Unsupported(
            "rollback to a named checkpoint needs protection with a snapshot_dir".into(),
        ))?;
        let protection = protection.clone();
        let chain = rebound_checkpoint::sink::chain_to_epoch(&dir, epoch)?;
        let snaps = chain
            .iter()
            .map(|p| Snapshot::open(p, Verify::Full))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // Everything that can be checked is, before protection or the VM is touched.
        rebound_vmm::persist::check_rewind(&vm, &snaps)?;
        if let Some((old, _)) = engine.take() {
            // Stops checkpoints (a checkpoint of the abandoned timeline must not run into the
            // freeze below) and drops held output; new output stays held.
            old.abandon();
        }
        let rewound = vm.freeze().map_err(Error::from).and_then(|frozen| {
            frozen.rewind(&snaps)?;
            // What the guest wrote between the abandon and the freeze is the abandoned timeline's.
            output.discard_held();
            Ok(frozen.thaw()?)
        });
        if let Err(e) = rewound {
            let _ = output.pass_through();
            return Err(e);
        }
        rebound_checkpoint::sink::prune_after(&dir, epoch)?;
        let config = protection.engine_config();
        let preserved = preserved();
        let target = lock(&self.target)
            .clone()
            .unwrap_or_else(|| Target::new(protection.standby.clone(), protection.standby_hot));
        let name = lock(&self.name).clone();
        let started = sinks(
            &protection,
            &name,
            &target,
            preserved.as_ref().map(|(dir, recovered)| Preservation {
                dir,
                recovered: *recovered,
            }),
        )
        .and_then(|(sinks, opts)| Ok(Engine::start_from(vm, output.clone(), config, sinks, opts)?));
        match started {
            Ok(e) => *engine = Some((e, protection)),
            Err(e) => {
                let _ = output.pass_through();
                return Err(e);
            }
        }
        tracing::info!(epoch, "VM rolled back to a named checkpoint");
        Ok(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_stop_or_use_without_protection() {
        let p = Protector::default();
        assert!(!p.is_protected());
        assert!(matches!(p.stop(), Err(Error::NotProtected)));
        assert!(matches!(p.checkpoint(), Err(Error::NotProtected)));
        assert!(matches!(p.rollback(), Err(Error::NotProtected)));
        assert!(p.settings().is_none());
        p.end();
    }

    #[test]
    fn start_protection_is_validated_when_set() {
        let p = Protector::default();
        let mut bad = default_protection();
        bad.interval_ms = Some(1);
        assert!(p.set_start_with(Some(bad)).is_err());
        assert_eq!(p.start_with(), None);
        p.set_start_with(Some(default_protection())).unwrap();
        assert_eq!(p.start_with(), Some(default_protection()));
    }

    #[test]
    fn a_state_directory_needs_pre_image() {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let sd = StateDir::create(&dir.path().join("vm")).unwrap();
        let mut p = default_protection();
        p.strategy = StrategyKind::Full;
        let e = sinks(
            &p,
            "vm",
            &Target::default(),
            Some(Preservation {
                dir: &sd,
                recovered: None,
            }),
        )
        .err()
        .unwrap();
        assert!(e.to_string().starts_with("strategy:"), "{e}");
        let (s, opts) = sinks(
            &default_protection(),
            "vm",
            &Target::default(),
            Some(Preservation {
                dir: &sd,
                recovered: None,
            }),
        )
        .unwrap();
        assert_eq!((s.len(), opts.first_epoch), (1, 1));
    }
}
