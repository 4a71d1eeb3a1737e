//! The host agent (`rebound host serve`): one per host. It
//!
//! - reads the liveness of every VM on its host from their status records (`host_root`), with
//!   no message per VM: a VMM's pid and its record's sequence, the guest's heartbeat word;
//! - sends one aggregated heartbeat per interval to each peer (`beat`), carrying every VM's
//!   state, and reads theirs;
//! - keeps the standbys of its peers' VMs: it accepts their replication connections and stores
//!   each epoch, hot (memory applied in place, `hot`) or cold (the checkpoint chain), before
//!   acknowledging it;
//! - takes a VM over when its host's heartbeats stop, or its host reports it dead, once its
//!   ownership lock shows the old VMM gone (`fence`): a hot standby is resumed
//!   (`recover --state`), a cold one built (`restore --dir`);
//! - places its own VMs' standbys: on the host each asks for while that host is alive (else
//!   none for now: the VM runs on, protected locally), hot or cold by the VM's `failover`
//!   and the standby host's free memory for hot standbys, and moves them when hosts come and
//!   go.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rebound_checkpoint::sink::CheckpointData;
use serde::Serialize;

use crate::Error;
use crate::beat::{self, Beat, VmBeat, VmState};
use crate::cold::ColdStore;
use crate::fence::{Fence, Standing, Watch};
use crate::host_root::{Failover, HostConfig, HostRoot, Member, Status};
use crate::hot::HotStore;
use crate::standby::{self, Ended, Store};

/// The next tick on the interval's grid (a late tick does not push the next ones back), unless
/// a whole interval was missed.
fn next_tick(next: Instant, now: Instant, interval: Duration) -> Instant {
    let n = next + interval;
    if n < now { now + interval } else { n }
}

/// What a cold failover is planned to take (restore from the chain, page faults after).
pub const COLD_FAILOVER_ESTIMATE_MS: u64 = 1000;
/// Diffs kept in a cold standby's chain before it is merged.
const MAX_CHAIN: usize = 16;

/// What the binary does for the agent (the agent does not know the command line or HTTP).
pub trait Hooks: Send + Sync {
    /// Starts VM `t.name` on this host from its standby copy (`t.hot`: a state directory to
    /// recover; else a snapshot directory to restore), its console going to `t.out`.
    fn take_over(&self, t: &Takeover) -> io::Result<Child>;
    /// Moves a running VM's standby (its VMM's `PATCH /protection`).
    fn move_standby(&self, api_sock: &Path, addr: Option<&str>, hot: bool) -> io::Result<()>;
    /// Recovers VM `r.name`, whose VMM died, on this host from its state directory.
    fn restart(&self, r: &Restart) -> io::Result<Child>;
}

/// A VM to recover on its own host.
#[derive(Clone, Debug)]
pub struct Restart {
    /// Its name.
    pub name: String,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Where its console output goes.
    pub out: PathBuf,
    /// The host its standby goes on, if any.
    pub standby: Option<String>,
    /// Its failover requirement, carried over.
    pub failover: Failover,
    /// Its longest acceptable failover.
    pub max_failover_ms: Option<u64>,
}

/// Restarts of one VM allowed within [`RESTART_WINDOW`]; past them it is failed over (or
/// left dead): a VM that keeps dying here would only die again.
pub const MAX_RESTARTS: usize = 3;
/// See [`MAX_RESTARTS`].
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// A VM to take over.
#[derive(Clone, Debug)]
pub struct Takeover {
    /// Its name.
    pub name: String,
    /// From a hot standby.
    pub hot: bool,
    /// Its standby copy.
    pub dir: PathBuf,
    /// Where its console output goes.
    pub out: PathBuf,
    /// The host it ran on (where its standby goes once that host is back).
    pub from: String,
    /// Its failover requirement, carried over.
    pub failover: Failover,
}

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This host's name.
    pub name: String,
    /// Where it listens: heartbeats (UDP) and replication (TCP) on the same address.
    pub listen: SocketAddr,
    /// Peers by name.
    pub peers: BTreeMap<String, String>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// A peer silent this long is dead.
    pub dead_after: Duration,
    /// A guest whose heartbeat does not move this long (while not waiting for work) is
    /// stalled: its VMM is killed and the VM fails over.
    pub stall_after: Option<Duration>,
    /// Memory it gives hot standbys, in bytes.
    pub hot_budget: u64,
    /// The host's cluster directory.
    pub root: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A standby kept here.
struct Slot {
    hot: bool,
    mem_size: u64,
    /// Taken over: nothing more is acknowledged.
    taken: bool,
    /// Its own lock: a store write (a whole copy, fsynced) never holds what heartbeats and
    /// the status read. Taken before the slot's when both are.
    store: Arc<Mutex<Box<dyn Store>>>,
    /// Epochs stored on the current connection after its full one: those a takeover may
    /// start from (0 while the connection resyncs).
    epochs: u64,
    /// Resyncs (full copies) started.
    resyncs: u64,
    /// Epochs stored in all, and the bytes of their pages as they were and as they came over
    /// the wire (compressed where it paid).
    all_epochs: u64,
    bytes: u64,
    wire_bytes: u64,
    last_epoch: u64,
    connected: bool,
    /// Counts connections: an old one that ends late does not touch a newer one's slot.
    conn: u64,
}

/// Stores one connection's checkpoints in its slot.
struct SlotReceiver<'a> {
    slot: &'a Mutex<Slot>,
    /// The connection's number: a newer connection of the same VM supersedes it.
    me: u64,
}

impl SlotReceiver<'_> {
    fn slot(&self) -> Result<MutexGuard<'_, Slot>, Error> {
        let sl = lock(self.slot);
        if sl.taken {
            return Err(Error::Refused("the VM was taken over here".into()));
        }
        if sl.conn != self.me {
            return Err(Error::Refused(
                "a newer connection replicates this VM".into(),
            ));
        }
        Ok(sl)
    }
}

impl standby::Receiver for SlotReceiver<'_> {
    fn invalidate(&mut self) -> Result<(), Error> {
        let store = Arc::clone(&self.slot()?.store);
        let mut st = lock(&store);
        // Checked again under the store's lock, which a takeover holds to mark the slot taken.
        self.slot()?.resyncs += 1;
        Ok(st.invalidate()?)
    }

    fn commit(&mut self, cp: &CheckpointData<'_>, wire: u64) -> Result<(), Error> {
        let store = Arc::clone(&self.slot()?.store);
        let mut st = lock(&store);
        drop(self.slot()?);
        st.commit(cp)?;
        let mut sl = self.slot()?;
        if !cp.full {
            sl.epochs += 1;
        }
        sl.all_epochs += 1;
        sl.wire_bytes += wire;
        sl.last_epoch = cp.epoch;
        sl.bytes += if cp.full {
            cp.data.map_or(0, |d| d.count())
        } else {
            cp.pages.count()
        } * rebound_snapshot::PAGE_SIZE;
        Ok(())
    }
}

struct Peer {
    addr: String,
    resolved: Option<SocketAddr>,
    last: Option<Instant>,
    beat: Option<Beat>,
}

impl Peer {
    fn alive(&self, dead_after: Duration) -> bool {
        self.last.is_some_and(|t| t.elapsed() < dead_after)
    }
}

/// What the agent knows of a VM running here.
#[derive(Default)]
struct Own {
    /// The standby placement applied to it: (host, addr, hot), or None for none.
    applied: Option<Option<(String, String, bool)>>,
    /// Why it has no standby, if it wants one.
    reason: Option<String>,
    state: Option<VmState>,
    last_seq: u64,
    last_beat: u64,
    beat_moved: Option<Instant>,
    seq_moved: Option<Instant>,
    /// Its ownership is recorded (etcd).
    claimed: bool,
    /// It died here and was given up for its standby.
    released: bool,
    /// The newest checkpoint every sink acknowledged, from its status record.
    acked_epoch: u64,
    /// Output held for acknowledgement.
    held_bytes: u64,
    /// Its VMM's pid.
    pid: u32,
    /// When it was restarted here lately.
    restarts: Vec<Instant>,
    /// A restart under way: the dead VMM's pid and the recovering process's.
    restarting: Option<(u32, u32)>,
}

/// A failover this agent did.
#[derive(Clone, Debug, Serialize)]
struct Event {
    vm: String,
    from: String,
    method: &'static str,
    /// When (unix ms).
    at_ms: u64,
    /// From the last heartbeat of the old host (or its report) to the takeover starting.
    detect_ms: u64,
    pid: u32,
}

#[derive(Default, Clone, Copy, Serialize)]
struct Counters {
    /// Heartbeat intervals (each sends one datagram per peer, whatever the number of VMs).
    intervals: u64,
    beats_sent: u64,
    beat_bytes_sent: u64,
    beats_received: u64,
    /// Takeovers not done (yet) because the VM's old owner was not provably gone.
    takeovers_fenced: u64,
    /// Times this host stopped or ended its own VMMs, unable to prove it owned them.
    self_fenced: u64,
    /// VMs recovered here after their VMM died.
    restarts: u64,
}

struct State {
    peers: BTreeMap<String, Peer>,
    slots: BTreeMap<String, Arc<Mutex<Slot>>>,
    own: BTreeMap<String, Own>,
    events: Vec<Event>,
    counters: Counters,
    children: Vec<Child>,
    /// This host's VMMs are stopped: it cannot prove it owns their VMs.
    fenced: bool,
    /// VMs whose owner still holds the lock (logged once).
    fenced_off: BTreeMap<String, Instant>,
    /// This host's VMs as the control thread last saw them: what heartbeats carry.
    vms: Vec<VmBeat>,
}

impl State {
    /// What the standby of VM `vm` (placed as `o` says) stored, as its host's heartbeat says.
    fn kept_for(&self, vm: &str, o: &Own) -> Option<&beat::Kept> {
        let Some(Some((host, ..))) = &o.applied else {
            return None;
        };
        self.peers
            .get(host)?
            .beat
            .as_ref()?
            .kept
            .iter()
            .find(|k| k.vm == vm)
    }
}

/// A running agent.
pub struct Agent {
    config: AgentConfig,
    fence: Mutex<Box<dyn Fence>>,
    /// The fence's standing without waiting for it (the heartbeat thread's).
    watch: Watch,
    root: HostRoot,
    hooks: Box<dyn Hooks>,
    incarnation: u64,
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Agent {
    /// Prepares an agent: writes the host's settings for its VMMs.
    pub fn new(
        config: AgentConfig,
        fence: Box<dyn Fence>,
        hooks: Box<dyn Hooks>,
    ) -> Result<Arc<Self>, Error> {
        let root = HostRoot::new(&config.root)?;
        root.write_config(&HostConfig {
            name: config.name.clone(),
            listen: config.listen.to_string(),
            peers: config.peers.clone(),
            heartbeat_ms: config.heartbeat.as_millis() as u64,
            lock_dir: fence.lock_dir().map(Path::to_path_buf),
        })?;
        let peers = config
            .peers
            .iter()
            .map(|(n, a)| {
                (
                    n.clone(),
                    Peer {
                        addr: a.clone(),
                        resolved: None,
                        last: None,
                        beat: None,
                    },
                )
            })
            .collect();
        Ok(Arc::new(Self {
            incarnation: rebound_vmm::persist::new_id(),
            root,
            hooks,
            state: Mutex::new(State {
                peers,
                slots: BTreeMap::new(),
                own: BTreeMap::new(),
                events: Vec::new(),
                counters: Counters::default(),
                children: Vec::new(),
                fenced: false,
                fenced_off: BTreeMap::new(),
                vms: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            watch: fence.watch(),
            fence: Mutex::new(fence),
            config,
        }))
    }

    /// Runs until [`stop`](Self::stop): heartbeats, standbys, takeovers, placement.
    pub fn run(self: &Arc<Self>) -> Result<(), Error> {
        let udp = UdpSocket::bind(self.config.listen)?;
        udp.set_read_timeout(Some(self.config.heartbeat.min(Duration::from_millis(5))))?;
        let tcp = TcpListener::bind(self.config.listen)?;
        let _ = std::fs::remove_file(self.root.socket());
        let status = UnixListener::bind(self.root.socket())?;
        {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("agent-replication".into())
                .spawn(move || me.accept_replication(&tcp))?;
        }
        {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("agent-status".into())
                .spawn(move || me.serve_status(&status))?;
        }
        // The control thread does what may wait (etcd, VMMs' APIs); this one only what must
        // keep time: heartbeats out and in, and stopping the VMMs when ownership is unsure.
        let control = {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("agent-control".into())
                .spawn(move || me.control())?
        };
        tracing::info!(host = %self.config.name, listen = %self.config.listen, "host agent up");
        let mut next = Instant::now();
        let mut buf = vec![0u8; beat::MAX_DATAGRAM];
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next {
                let members = self.root.members();
                // Lost is acted on by the control thread (it also renews the lease); here it
                // means at least: stop now.
                let standing = match self.watch.standing() {
                    Standing::Lost => Standing::Unsure,
                    s => s,
                };
                self.self_fence(standing, &members);
                let vms = lock(&self.state).vms.clone();
                self.send_beats(&udp, vms);
                next = next_tick(next, now, self.config.heartbeat);
            }
            // Beats arrive between ticks (the socket's timeout keeps this loop going).
            if let Ok((n, _)) = udp.recv_from(&mut buf)
                && let Some(b) = beat::decode(&buf[..n])
            {
                self.on_beat(b);
            }
        }
        let _ = control.join();
        Ok(())
    }

    /// The control thread: every interval, the fence renewed, this host's VMs watched,
    /// standbys taken over and placed; between intervals, a dead host's VMs taken over as
    /// soon as it is judged dead and fencing allows.
    fn control(&self) {
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next {
                self.tick();
                next = next_tick(next, now, self.config.heartbeat);
            } else {
                self.take_overs(true);
                std::thread::sleep((next - now).min(Duration::from_millis(5)));
            }
        }
    }

    /// Ends [`run`](Self::run).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn on_beat(&self, b: Beat) {
        let mut s = lock(&self.state);
        s.counters.beats_received += 1;
        if let Some(p) = s.peers.get_mut(&b.host) {
            p.last = Some(Instant::now());
            p.beat = Some(b);
        }
    }

    /// One interval of the control thread.
    fn tick(&self) {
        let members = self.root.members();
        let standing = lock(&self.fence).standing();
        if standing == Standing::Lost {
            self.self_fence(standing, &members);
        }
        let vms = self.watch_own(&members);
        lock(&self.state).vms = vms;
        self.take_overs(false);
        self.place(&members);
        self.reap();
    }

    /// Stops this host's VMMs while it cannot prove it owns their VMs (`standing`), resumes
    /// them once it can again, and ends them if it lost them.
    fn self_fence(&self, standing: Standing, members: &[(Member, Option<Status>)]) {
        let mut s = lock(&self.state);
        let signal = match (standing, s.fenced) {
            (Standing::Owner, true) => {
                tracing::warn!("ownership proven again: the VMs go on");
                Some(libc::SIGCONT)
            }
            (Standing::Unsure, false) => {
                tracing::error!("cannot prove this host still owns its VMs: they are stopped");
                Some(libc::SIGSTOP)
            }
            // Again every interval: a VMM that joined meanwhile stops too.
            (Standing::Unsure, true) => Some(libc::SIGSTOP),
            (Standing::Lost, _) => {
                tracing::error!("this host lost its VMs (its lease is gone): they are ended");
                Some(libc::SIGKILL)
            }
            _ => None,
        };
        let was_fenced = s.fenced;
        s.fenced = standing == Standing::Unsure;
        if standing == Standing::Lost {
            s.counters.self_fenced += 1;
            for o in s.own.values_mut() {
                o.claimed = false;
            }
        }
        if standing == Standing::Unsure && !was_fenced {
            s.counters.self_fenced += 1;
        }
        if let Some(sig) = signal {
            for (m, _) in members {
                if process_alive(m.pid) {
                    // SAFETY: kill(2) on the VMMs registered on this host.
                    unsafe { libc::kill(m.pid as i32, sig) };
                }
            }
        }
    }

    /// Reads the VMs running here; kills a stalled one (it is then recovered here or fails
    /// over as dead). What needs the fence (an etcd call, perhaps slow) is done without
    /// holding the agent's state.
    fn watch_own(&self, members: &[(Member, Option<Status>)]) -> Vec<VmBeat> {
        let (mut to_claim, mut to_restart, mut to_release) = (Vec::new(), Vec::new(), Vec::new());
        let mut out = self.observe_own(members, &mut to_claim, &mut to_restart, &mut to_release);
        for (name, pid) in to_claim {
            let claimed = lock(&self.fence).claim(&name);
            let mut s = lock(&self.state);
            match claimed {
                Ok(c) => {
                    if let Some(o) = s.own.get_mut(&name).filter(|o| o.pid == pid) {
                        o.claimed = c;
                    }
                }
                Err(why) => {
                    tracing::error!(vm = %name, pid, "{why}: it must not run here; its VMM is killed");
                    // SAFETY: kill(2) on the pid the VM's own VMM registered, seen alive.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        for m in to_restart {
            let state = self.restart(&m);
            if state == VmState::Dead {
                let mut s = lock(&self.state);
                if let Some(o) = s.own.get_mut(&m.name) {
                    o.state = Some(VmState::Dead);
                    if m.standby.is_some() && !o.released && !matches!(o.applied, Some(None)) {
                        o.released = true;
                        to_release.push(m.name.clone());
                    }
                }
                if let Some(v) = out.iter_mut().find(|v| v.name == m.name) {
                    v.state = VmState::Dead;
                }
            }
        }
        for name in to_release {
            lock(&self.fence).release(&name);
        }
        out
    }

    /// [`watch_own`](Self::watch_own)'s look at the VMs, under the agent's state: what to
    /// claim, recover here and give up goes into the lists.
    fn observe_own(
        &self,
        members: &[(Member, Option<Status>)],
        to_claim: &mut Vec<(String, u32)>,
        to_restart: &mut Vec<Member>,
        to_release: &mut Vec<String>,
    ) -> Vec<VmBeat> {
        let mut s = lock(&self.state);
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for (m, status) in members {
            seen.push(m.name.clone());
            if status.is_some_and(|st| st.ended) {
                // Ended on purpose: forgotten, never failed over.
                self.root.leave(&m.name);
                continue;
            }
            let fenced = s.fenced;
            let o = s.own.entry(m.name.clone()).or_default();
            let now = Instant::now();
            let alive = process_alive(m.pid);
            if o.pid != m.pid {
                // A new VMM for it (a restart here): judged afresh.
                // Its standby is placed and its ownership recorded again.
                *o = Own {
                    pid: m.pid,
                    restarts: std::mem::take(&mut o.restarts),
                    state: o.state,
                    ..Own::default()
                };
            }
            let mut restart = false;
            let state = if !alive {
                match o.restarting {
                    Some((dead, by)) if dead == m.pid => {
                        if process_alive(by) {
                            VmState::Restarting
                        } else {
                            tracing::error!(vm = %m.name, "recovering the VM here failed: it fails over");
                            o.restarting = None;
                            VmState::Dead
                        }
                    }
                    _ => {
                        // Only a VMM this agent saw running is recovered here: after an agent
                        // restart, a VM found dead may already run elsewhere.
                        let watched = matches!(o.state, Some(VmState::Running | VmState::Stalled));
                        o.restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
                        restart = watched
                            && !fenced
                            && m.state_dir.is_some()
                            && o.restarts.len() < MAX_RESTARTS;
                        if restart {
                            VmState::Restarting
                        } else {
                            VmState::Dead
                        }
                    }
                }
            } else if let Some(st) = status {
                if st.seq != o.last_seq {
                    o.last_seq = st.seq;
                    o.seq_moved = Some(now);
                }
                if st.beat != o.last_beat || st.waiting {
                    o.last_beat = st.beat;
                    o.beat_moved = Some(now);
                }
                let beat_moved = *o.beat_moved.get_or_insert(now);
                let seq_moved = *o.seq_moved.get_or_insert(now);
                let stuck = |t: Instant| self.config.stall_after.is_some_and(|d| t.elapsed() > d);
                if stuck(beat_moved) || stuck(seq_moved) {
                    VmState::Stalled
                } else {
                    VmState::Running
                }
            } else {
                VmState::Running
            };
            if state == VmState::Running && !o.claimed && !fenced {
                to_claim.push((m.name.clone(), m.pid));
            }
            if restart {
                to_restart.push(m.clone());
            }
            let degraded = matches!(o.applied, Some(None));
            if state == VmState::Dead && !o.released && m.standby.is_some() && !degraded {
                o.released = true;
                to_release.push(m.name.clone());
            }
            if state == VmState::Stalled && o.state != Some(VmState::Stalled) {
                tracing::warn!(vm = %m.name, pid = m.pid, "the VM stopped making progress: its VMM is killed (the VM is recovered here or fails over)");
                // SAFETY: kill(2) on the pid the VM's own VMM registered; a stale pid is
                // guarded by `process_alive` having just seen it.
                unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
            }
            if o.state != Some(state) {
                tracing::info!(vm = %m.name, ?state, "VM state");
            }
            o.state = Some(state);
            let (standby, hot) = match &o.applied {
                Some(Some((h, _, hot))) => (Some(h.clone()), *hot),
                _ => (None, false),
            };
            if let Some(st) = status {
                o.acked_epoch = st.acked_epoch;
                o.held_bytes = st.held_bytes;
            }
            out.push(VmBeat {
                name: m.name.clone(),
                state,
                standby,
                hot,
                acked_epoch: o.acked_epoch,
            });
        }
        s.own.retain(|n, _| seen.contains(n));
        // A dead VM another host now runs is forgotten here.
        let elsewhere: Vec<String> = out
            .iter()
            .filter(|v| v.state == VmState::Dead)
            .filter(|v| {
                s.peers.values().any(|p| {
                    p.alive(self.config.dead_after)
                        && p.beat.as_ref().is_some_and(|b| {
                            b.vms
                                .iter()
                                .any(|w| w.name == v.name && w.state == VmState::Running)
                        })
                })
            })
            .map(|v| v.name.clone())
            .collect();
        for n in &elsewhere {
            self.root.leave(n);
        }
        out.retain(|v| !elsewhere.contains(&v.name));
        out
    }

    /// Recovers VM `m`, whose VMM died, here from its state directory (if this host still
    /// owns it): its state from now on.
    fn restart(&self, m: &Member) -> VmState {
        let Some(state_dir) = m.state_dir.clone() else {
            return VmState::Dead;
        };
        // Only while this host provably owns it (a claim that could not be made is not one).
        match lock(&self.fence).claim(&m.name) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(vm = %m.name, "not recovered here: its ownership cannot be recorded now");
                return VmState::Dead;
            }
            Err(why) => {
                tracing::warn!(vm = %m.name, "not recovered here: {why}");
                return VmState::Dead;
            }
        }
        let mut s = lock(&self.state);
        if s.fenced {
            return VmState::Dead;
        }
        let r = Restart {
            name: m.name.clone(),
            state_dir,
            out: self.root.takeover_output(&m.name),
            standby: m.standby.clone(),
            failover: m.failover,
            max_failover_ms: m.max_failover_ms,
        };
        match self.hooks.restart(&r) {
            Ok(child) => {
                tracing::warn!(vm = %m.name, dead = m.pid, pid = child.id(), "the VM's VMM died: recovering it here");
                let o = s.own.entry(m.name.clone()).or_default();
                o.restarting = Some((m.pid, child.id()));
                o.restarts.push(Instant::now());
                s.counters.restarts += 1;
                s.children.push(child);
                VmState::Restarting
            }
            Err(e) => {
                tracing::error!(vm = %m.name, "cannot recover the VM here: {e}");
                VmState::Dead
            }
        }
    }

    fn hot_free(&self, s: &State) -> u64 {
        let used: u64 = s
            .slots
            .values()
            .map(|sl| lock(sl))
            .filter(|sl| sl.hot && !sl.taken)
            .map(|sl| sl.mem_size)
            .sum();
        self.config.hot_budget.saturating_sub(used)
    }

    fn send_beats(&self, udp: &UdpSocket, vms: Vec<VmBeat>) {
        let mut s = lock(&self.state);
        s.counters.intervals += 1;
        let seq = s.counters.intervals;
        let kept = s
            .slots
            .iter()
            .map(|(vm, sl)| {
                let sl = lock(sl);
                beat::Kept {
                    vm: vm.clone(),
                    epoch: sl.last_epoch,
                    bytes: sl.bytes,
                }
            })
            .collect();
        let b = Beat {
            host: self.config.name.clone(),
            incarnation: self.incarnation,
            seq,
            hot_free: self.hot_free(&s),
            vms,
            kept,
        };
        let Some(d) = beat::encode(&b) else {
            tracing::error!("too many VMs for one heartbeat datagram");
            return;
        };
        let mut sent = (0, 0);
        for p in s.peers.values_mut() {
            if p.resolved.is_none() {
                p.resolved = p.addr.to_socket_addrs().ok().and_then(|mut a| a.next());
            }
            if let Some(a) = p.resolved
                && udp.send_to(&d, a).is_ok()
            {
                sent.0 += 1;
                sent.1 += d.len() as u64;
            }
        }
        s.counters.beats_sent += sent.0;
        s.counters.beat_bytes_sent += sent.1;
    }

    /// Takes over the VMs whose standby is here and whose host is dead or (unless
    /// `dead_hosts_only`) reports them dead.
    fn take_overs(&self, dead_hosts_only: bool) {
        let s = lock(&self.state);
        let dead_after = self.config.dead_after;
        if dead_hosts_only && s.peers.values().all(|p| p.alive(dead_after)) {
            return;
        }
        let mut todo = Vec::new();
        for (name, slot) in &s.slots {
            let sl = lock(slot);
            if sl.taken || sl.epochs == 0 {
                continue;
            }
            for (host, p) in &s.peers {
                let Some(b) = &p.beat else { continue };
                let Some(v) = b.vms.iter().find(|v| &v.name == name) else {
                    continue;
                };
                if v.standby.as_deref() != Some(self.config.name.as_str()) {
                    // Its host last named another standby (or none: it ran on alone, so any
                    // copy here is older than what it released): a copy left here from an
                    // earlier connection is not its standby.
                    continue;
                }
                let since = p.last.map_or(Duration::ZERO, |t| t.elapsed());
                if !p.alive(dead_after) {
                    todo.push((name.clone(), host.clone(), v.clone(), since));
                } else if v.state == VmState::Dead && !dead_hosts_only {
                    todo.push((name.clone(), host.clone(), v.clone(), Duration::ZERO));
                }
            }
        }
        drop(s);
        // Slots taken over, dropped once the agent's state is free (dropping a store may wait).
        let mut retired = Vec::new();
        for (name, from, _v, since) in todo {
            let from_dead = since >= dead_after;
            // The fence may ask etcd: not under the agent's state.
            let taken = lock(&self.fence).take(&name, &from, from_dead);
            // A commit under way ends first (it holds the store), without the agent's state.
            let store = lock(&self.state)
                .slots
                .get(&name)
                .map(|sl| Arc::clone(&lock(sl).store));
            let mut store = store.as_ref().map(|st| lock(st));
            let mut s = lock(&self.state);
            match taken {
                Ok(true) => {}
                Ok(false) => {
                    s.counters.takeovers_fenced += 1;
                    if !s.fenced_off.contains_key(&name) {
                        tracing::warn!(vm = %name, %from, "its old owner is not provably gone yet: not taken over");
                        s.fenced_off.insert(name.clone(), Instant::now());
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(vm = %name, "cannot take the VM over: {e}");
                    continue;
                }
            }
            s.fenced_off.remove(&name);
            // Still a copy to take over from (no new connection started a resync meanwhile).
            let usable = s.slots.get(&name).is_some_and(|sl| {
                let sl = lock(sl);
                !sl.taken && sl.epochs > 0
            });
            if !usable {
                continue;
            }
            let Some(slot) = s.slots.remove(&name) else {
                continue;
            };
            retired.push(Arc::clone(&slot));
            let hot = {
                let mut sl = lock(&slot);
                // From here nothing more is acknowledged to the old primary: what the
                // standby holds is what the VM resumes from.
                sl.taken = true;
                sl.hot
            };
            if let Some(st) = store.as_mut() {
                st.hold_still();
            }
            let t = Takeover {
                name: name.clone(),
                hot,
                dir: self.root.standby_dir(&name, hot),
                out: self.root.takeover_output(&name),
                from: from.clone(),
                failover: if hot { Failover::Hot } else { Failover::Cold },
            };
            match self.hooks.take_over(&t) {
                Ok(child) => {
                    tracing::warn!(vm = %name, %from, hot, pid = child.id(), "VM taken over");
                    s.events.push(Event {
                        vm: name,
                        from,
                        method: if hot { "hot" } else { "cold" },
                        at_ms: unix_ms(),
                        detect_ms: since.as_millis() as u64,
                        pid: child.id(),
                    });
                    s.children.push(child);
                }
                Err(e) => tracing::error!(vm = %name, "cannot take the VM over: {e}"),
            }
        }
    }

    /// Places (or moves) the standbys of the VMs running here.
    fn place(&self, members: &[(Member, Option<Status>)]) {
        let mut moves = Vec::new();
        {
            let mut s = lock(&self.state);
            if s.fenced {
                // Its VMMs are stopped: they answer nothing until it is sure again.
                return;
            }
            let dead_after = self.config.dead_after;
            for (m, _) in members {
                let Some(want) = &m.standby else { continue };
                let Some(sock) = &m.api_sock else { continue };
                // Only a VM that runs here is placed: a dead one's record (its VMM gone, the
                // VM taken over elsewhere) must not touch what its new host records.
                if s.own.get(&m.name).and_then(|o| o.state) != Some(VmState::Running) {
                    continue;
                }
                let peer = s.peers.get(want);
                let (desired, reason) = match peer {
                    None => (None, Some(format!("{want} is not a peer of this host"))),
                    Some(p) if !p.alive(dead_after) => (
                        None,
                        Some(format!("{want} is down: protected locally only")),
                    ),
                    Some(p) => {
                        let free = p.beat.as_ref().map_or(0, |b| b.hot_free);
                        let current_hot = matches!(
                            s.own.get(&m.name).and_then(|o| o.applied.clone()),
                            Some(Some((_, _, true)))
                        );
                        // A hot standby already placed counts in its host's free memory.
                        let free = if current_hot { free + m.mem_size } else { free };
                        match plan(m.failover, m.max_failover_ms, m.mem_size, free) {
                            Ok(hot) => (Some((want.clone(), p.addr.clone(), hot)), None),
                            Err(r) => (None, Some(r)),
                        }
                    }
                };
                let o = s.own.entry(m.name.clone()).or_default();
                o.reason = reason;
                if o.applied.as_ref() != Some(&desired) {
                    moves.push((m.name.clone(), sock.clone(), desired));
                }
            }
        }
        for (name, sock, desired) in moves {
            let (addr, hot) = match &desired {
                Some((_, a, h)) => (Some(a.as_str()), *h),
                None => (None, false),
            };
            if desired.is_none() {
                // Running on without a standby releases output no standby has: first make
                // sure no standby can take the VM over from what it has (it would repeat
                // that output), or do not go on without one (output waits instead).
                match lock(&self.fence).degrade(&name) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(vm = %name, "cannot record that it runs without a standby yet: its output waits");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %name, "{e}: its output waits for its standby");
                        continue;
                    }
                }
            }
            match self.hooks.move_standby(&sock, addr, hot) {
                Ok(()) => {
                    tracing::info!(vm = %name, standby = ?addr, hot, "standby placed");
                    if desired.is_some() {
                        // A new standby is trusted once it acknowledged a full checkpoint
                        // (its slot counts epochs per connection).
                        lock(&self.fence).replicated(&name);
                    }
                    if let Some(o) = lock(&self.state).own.get_mut(&name) {
                        o.applied = Some(desired);
                    }
                }
                Err(e) => tracing::debug!(vm = %name, "cannot place its standby yet: {e}"),
            }
        }
    }

    fn reap(&self) {
        let mut s = lock(&self.state);
        s.children
            .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
    }

    /// Accepts replication connections: one thread per primary.
    fn accept_replication(self: Arc<Self>, listener: &TcpListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let me = Arc::clone(&self);
            let _ = std::thread::Builder::new()
                .name("agent-standby".into())
                .spawn(move || me.keep_standby(conn));
        }
    }

    fn keep_standby(&self, mut conn: TcpStream) {
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let hello = match standby::handshake(&mut conn) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%peer, "replication refused: {e}");
                return;
            }
        };
        let slot = match self.slot_for(&hello) {
            Ok(s) => s,
            Err(reason) => {
                let _ = crate::wire::send(&mut conn, &crate::wire::Msg::Refuse { reason });
                return;
            }
        };
        let me = {
            let mut sl = lock(&slot);
            sl.connected = true;
            sl.conn += 1;
            // What it holds is trusted again only once this connection's resync is over:
            // until then it may be older than what the primary released.
            sl.epochs = 0;
            sl.conn
        };
        // No read timeout: a primary that goes silent is judged by its host's heartbeats.
        let ended = standby::receive(conn, &hello, None, &mut SlotReceiver { slot: &slot, me });
        let latest = {
            let mut sl = lock(&slot);
            let latest = sl.conn == me;
            if latest {
                sl.connected = false;
            }
            latest
        };
        match ended {
            Ended::Bye if latest => {
                tracing::info!(vm = %hello.vm, "replication ended by the primary");
                let mut s = lock(&self.state);
                if s.slots
                    .get(&hello.vm)
                    .is_some_and(|x| Arc::ptr_eq(x, &slot))
                {
                    s.slots.remove(&hello.vm);
                }
            }
            Ended::Bye => {}
            Ended::Lost { acked, why } => {
                tracing::info!(vm = %hello.vm, acked, "replication connection lost: {why}");
            }
        }
    }

    /// The standby slot for a primary's Hello: the one it had (same kind), or a new one.
    fn slot_for(&self, h: &standby::Hello) -> Result<Arc<Mutex<Slot>>, String> {
        let mut s = lock(&self.state);
        if s.own.contains_key(&h.vm) && self.root.vm_dir(&h.vm).exists() {
            return Err(format!("VM {} runs on this host", h.vm));
        }
        if let Some(existing) = s.slots.get(&h.vm) {
            let sl = lock(existing);
            if sl.hot == h.hot && sl.mem_size == h.mem_size && !sl.taken {
                drop(sl);
                return Ok(Arc::clone(existing));
            }
        }
        if h.hot {
            let free = self.hot_free(&s)
                + s.slots
                    .get(&h.vm)
                    .map(|x| lock(x))
                    .filter(|x| x.hot)
                    .map_or(0, |x| x.mem_size);
            if free < h.mem_size {
                return Err(format!(
                    "no memory for a hot standby of {} MiB here ({} MiB free of the host's hot budget)",
                    h.mem_size >> 20,
                    free >> 20
                ));
            }
        }
        let dir = self.root.standby_dir(&h.vm, h.hot);
        let store: Box<dyn Store> = if h.hot {
            Box::new(HotStore::new(&dir))
        } else {
            Box::new(ColdStore::new(&dir, MAX_CHAIN).map_err(|e| e.to_string())?)
        };
        let slot = Arc::new(Mutex::new(Slot {
            hot: h.hot,
            mem_size: h.mem_size,
            taken: false,
            store: Arc::new(Mutex::new(store)),
            epochs: 0,
            resyncs: 0,
            all_epochs: 0,
            bytes: 0,
            wire_bytes: 0,
            last_epoch: 0,
            connected: false,
            conn: 0,
        }));
        let old = s.slots.insert(h.vm.clone(), Arc::clone(&slot));
        // Dropping a store may wait (a merge finishing): not under the agent's state.
        drop(s);
        drop(old);
        Ok(slot)
    }

    fn serve_status(&self, listener: &UnixListener) {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
            let mut req = [0u8; 16];
            let n = conn.read(&mut req).unwrap_or(0);
            let body = if req[..n].starts_with(b"metrics") {
                self.metrics()
            } else {
                serde_json::to_string_pretty(&self.status()).unwrap_or_default() + "\n"
            };
            let _ = conn.write_all(body.as_bytes());
        }
    }

    /// The cluster as this agent sees it.
    pub fn status(&self) -> serde_json::Value {
        // The fence may be busy in an etcd call: asked before the agent's state is held.
        let fence = lock(&self.fence).describe();
        let s = lock(&self.state);
        let dead_after = self.config.dead_after;
        let peers: Vec<_> = s
            .peers
            .iter()
            .map(|(n, p)| {
                serde_json::json!({
                    "name": n,
                    "addr": p.addr,
                    "alive": p.alive(dead_after),
                    "last_heartbeat_ms_ago": p.last.map(|t| t.elapsed().as_millis() as u64),
                    "hot_free_bytes": p.beat.as_ref().map(|b| b.hot_free),
                    "vms": p.beat.as_ref().map(|b| &b.vms),
                })
            })
            .collect();
        let vms: Vec<_> = s
            .own
            .iter()
            .map(|(n, o)| {
                let (standby, method) = match &o.applied {
                    Some(Some((h, _, hot))) => {
                        (Some(h.clone()), Some(if *hot { "hot" } else { "cold" }))
                    }
                    _ => (None, None),
                };
                // How far the standby is behind: what it stored (its host's heartbeat) against
                // what this VM's checkpoints reached; output still waiting, in bytes.
                let replication = s.kept_for(n, o).map(|k| {
                    serde_json::json!({
                        "acked_epoch": o.acked_epoch,
                        "standby_epoch": k.epoch,
                        "lag_epochs": o.acked_epoch.saturating_sub(k.epoch),
                        "standby_bytes": k.bytes,
                        "held_output_bytes": o.held_bytes,
                    })
                });
                serde_json::json!({
                    "name": n,
                    "owner": self.config.name,
                    "state": o.state,
                    "pid": o.pid,
                    "restarts": o.restarts.len(),
                    "standby": standby,
                    "method": method,
                    "replication": replication,
                    "unprotected_because": o.reason,
                })
            })
            .collect();
        let standbys: Vec<_> = s
            .slots
            .iter()
            .map(|(n, sl)| {
                let sl = lock(sl);
                serde_json::json!({
                    "vm": n,
                    "method": if sl.hot { "hot" } else { "cold" },
                    "connected": sl.connected,
                    "epochs": sl.epochs,
                    "resyncing": sl.connected && sl.epochs == 0,
                    "resyncs": sl.resyncs,
                    "all_epochs": sl.all_epochs,
                    "last_epoch": sl.last_epoch,
                    "bytes": sl.bytes,
                    "wire_bytes": sl.wire_bytes,
                    "mem_size": sl.mem_size,
                })
            })
            .collect();
        serde_json::json!({
            "host": self.config.name,
            "fence": fence,
            "self_fenced": s.fenced,
            "incarnation": self.incarnation,
            "hot_budget_bytes": self.config.hot_budget,
            "hot_free_bytes": self.hot_free(&s),
            "peers": peers,
            "vms": vms,
            "standbys": standbys,
            "failovers": s.events,
            "heartbeats": s.counters,
        })
    }

    /// The same in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let s = lock(&self.state);
        let dead_after = self.config.dead_after;
        let mut m = String::new();
        let c = s.counters;
        let h = &self.config.name;
        m += &format!(
            "rebound_cluster_heartbeats_sent_total{{host=\"{h}\"}} {}\n",
            c.beats_sent
        );
        m += &format!(
            "rebound_cluster_heartbeat_bytes_sent_total{{host=\"{h}\"}} {}\n",
            c.beat_bytes_sent
        );
        m += &format!(
            "rebound_cluster_heartbeats_received_total{{host=\"{h}\"}} {}\n",
            c.beats_received
        );
        for (n, p) in &s.peers {
            m += &format!(
                "rebound_cluster_peer_alive{{host=\"{h}\",peer=\"{n}\"}} {}\n",
                u8::from(p.alive(dead_after))
            );
        }
        m += &format!("rebound_cluster_vms{{host=\"{h}\"}} {}\n", s.own.len());
        for (n, o) in &s.own {
            if o.applied.is_none() {
                continue;
            }
            if let Some(k) = s.kept_for(n, o) {
                m += &format!(
                    "rebound_cluster_replication_lag_epochs{{host=\"{h}\",vm=\"{n}\"}} {}\n",
                    o.acked_epoch.saturating_sub(k.epoch)
                );
            }
            m += &format!(
                "rebound_cluster_held_output_bytes{{host=\"{h}\",vm=\"{n}\"}} {}\n",
                o.held_bytes
            );
        }
        m += &format!(
            "rebound_cluster_failovers_total{{host=\"{h}\"}} {}\n",
            s.events.len()
        );
        for (n, sl) in &s.slots {
            let sl = lock(sl);
            m += &format!(
                "rebound_cluster_standby_epochs_total{{host=\"{h}\",vm=\"{n}\"}} {}\n",
                sl.epochs
            );
            m += &format!(
                "rebound_cluster_standby_bytes_total{{host=\"{h}\",vm=\"{n}\"}} {}\n",
                sl.bytes
            );
        }
        m
    }
}

/// Chooses a VM's standby method: hot (true) or cold (false), or why neither meets it.
pub fn plan(
    failover: Failover,
    max_ms: Option<u64>,
    mem_size: u64,
    hot_free: u64,
) -> Result<bool, String> {
    let hot_fits = hot_free >= mem_size;
    let cold_meets = max_ms.is_none_or(|m| m >= COLD_FAILOVER_ESTIMATE_MS);
    match failover {
        Failover::Hot if hot_fits => Ok(true),
        Failover::Hot => Err(format!(
            "hot standby refused: the standby host has {} MiB free for hot standbys, the VM needs {} MiB",
            hot_free >> 20,
            mem_size >> 20
        )),
        Failover::Cold => Ok(false),
        Failover::Auto if hot_fits => Ok(true),
        Failover::Auto if cold_meets => Ok(false),
        Failover::Auto => Err(format!(
            "no standby meets a {} ms failover: no room for a hot standby ({} MiB free, {} MiB needed) and a cold one takes about {COLD_FAILOVER_ESTIMATE_MS} ms",
            max_ms.unwrap_or(0),
            hot_free >> 20,
            mem_size >> 20
        )),
    }
}

/// Whether process `pid` runs (a zombie does not). A killed process's main thread turns zombie
/// while its other threads are still exiting, holding its files (a VM's ownership lock among
/// them): the process runs until its last thread is gone.
pub fn process_alive(pid: u32) -> bool {
    fn running(stat: &str) -> bool {
        // The state follows the command name, which is in parentheses and may hold anything.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if running(&stat) {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| running(&s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planning_meets_the_requirement_or_says_why() {
        let mib = 1 << 20;
        assert_eq!(plan(Failover::Hot, None, 64 * mib, 128 * mib), Ok(true));
        assert!(plan(Failover::Hot, None, 64 * mib, 32 * mib).is_err());
        assert_eq!(plan(Failover::Cold, Some(10), 64 * mib, 0), Ok(false));
        assert_eq!(
            plan(Failover::Auto, Some(100), 64 * mib, 64 * mib),
            Ok(true)
        );
        assert_eq!(plan(Failover::Auto, None, 64 * mib, 0), Ok(false));
        assert_eq!(plan(Failover::Auto, Some(5000), 64 * mib, 0), Ok(false));
        let why = plan(Failover::Auto, Some(100), 64 * mib, 0).unwrap_err();
        assert!(why.contains("100 ms"), "{why}");
    }

    #[test]
    fn process_liveness() {
        assert!(process_alive(std::process::id()));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        // Exited but not reaped: a zombie is not alive.
        let t = Instant::now();
        while process_alive(pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::yield_now();
        }
        assert!(!process_alive(pid));
        c.wait().unwrap();
    }
}
