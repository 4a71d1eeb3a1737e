//! The primary's side of replication: a checkpoint sink that sends each epoch to the standby
//! and acknowledges it to the engine only when the standby answered that it stored it. Output
//! commit releases an epoch's output only after that (Remus' rule), so a standby that takes
//! over never has less than what clients saw.
//!
//! A new connection (the first, or after the standby restarted or the link failed) starts with
//! a resync that never pauses the VM for the copy:
//! 1. At a checkpoint, the standby is told to make its old copy unusable and answers.
//! 2. Between checkpoints, with the VM running, the checkpoint thread copies a bounded share
//!    of the pages that may hold data ([`Sink::between`]); every page written meanwhile is
//!    remembered from the checkpoints' dirty sets.
//! 3. The checkpoint after the copy sends those pages as a full epoch: the copy and that epoch
//!    together are its memory. The standby writes it all while the VM runs on.
//! 4. Once that is acknowledged, the next checkpoint sends what was written since and waits
//!    for its acknowledgement, as every one after it does.
//!
//! Until step 4 the standby has nothing a takeover could start from, so checkpoints are
//! acknowledged to the engine without it and output flows (the VM is protected locally only,
//! as with no standby). While the standby cannot be reached, checkpoints are not acknowledged
//! and output stays held (bounded by output commit's limits), as with Remus.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rebound_checkpoint::sink::{CheckpointData, LiveMemory, Sink};
use rebound_snapshot::{DirtySet, PAGE_SIZE};

use crate::Error;
use crate::wire::{self, Base, Epoch, Msg};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an acknowledgement may take (a full epoch of a large VM included).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a wait for an acknowledgement checks whether the standby moved.
const ACK_POLL: Duration = Duration::from_millis(20);
/// How long a full copy may work between two checkpoints (the checkpoint thread does it).
const COPY_BUDGET: Duration = Duration::from_millis(8);
/// Pages per message of a full copy.
const COPY_CHUNK: usize = 256;

/// Where a VM is replicated to, changeable while it runs (a host agent moves a VM's standby
/// when its host leaves or joins). Shared by the sink and whoever controls it.
#[derive(Clone, Debug, Default)]
pub struct Target(Arc<Mutex<Dest>>);

/// A replication destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dest {
    /// The standby (host:port); None: no standby for now (checkpoints are acknowledged
    /// without one: the VM runs on, protected only locally, until a standby is set).
    pub addr: Option<String>,
    /// Ask it for a hot standby.
    pub hot: bool,
}

impl Target {
    /// A target of `addr`.
    pub fn new(addr: Option<String>, hot: bool) -> Self {
        let addr = addr.filter(|a| !a.is_empty());
        Self(Arc::new(Mutex::new(Dest { addr, hot })))
    }

    /// Where replication goes now.
    pub fn get(&self) -> Dest {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether replication no longer goes to `addr` (hot or not as `hot`).
    fn differs(&self, addr: &str, hot: bool) -> bool {
        let d = self.get();
        d.addr.as_deref().unwrap_or("") != addr || d.hot != hot
    }

    /// Moves replication: the next checkpoint goes to `dest` (a full one: the old standby is
    /// told goodbye, the new one has nothing yet).
    pub fn set(&self, mut dest: Dest) {
        dest.addr = dest.addr.filter(|a| !a.is_empty());
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = dest;
    }
}

/// Sends every checkpoint to a standby.
pub struct Remote {
    target: Target,
    /// Where the open connection goes.
    addr: String,
    vm: String,
    /// Ask for a hot standby.
    hot: bool,
    conn: Option<TcpStream>,
    /// How far this connection is.
    sync: Sync,
    stats: Stats,
}

/// Where a connection is in its resync.
enum Sync {
    /// Nothing sent yet: the next checkpoint starts a resync.
    Fresh,
    /// Copying memory while the VM runs (`between`): the pages of `todo` from `cursor` on
    /// are still to copy; `since` holds every page written since the copy started.
    Copying {
        todo: DirtySet,
        cursor: u64,
        since: DirtySet,
    },
    /// The full epoch `sent` ended the copy; its acknowledgement is awaited without waiting
    /// (the standby writes the whole copy); `since` holds the pages written after it.
    Completing {
        sent: (u64, u64),
        at: Instant,
        since: DirtySet,
    },
    /// The standby acknowledged `last`: from here on every checkpoint waits for its
    /// acknowledgement.
    Synced { last: (u64, u64) },
}

/// What was replicated.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    /// Epochs acknowledged.
    epochs: u64,
    /// Bytes of pages.
    raw: u64,
    /// Bytes of pages sent (compressed where it paid).
    sent: u64,
}

/// The pages listed by `pages`, read from `source`, as (list, bytes); zero pages are left
/// out when `skip_zero`.
fn gather(
    pages: impl Iterator<Item = u64>,
    mut read: impl FnMut(u64, &mut Vec<u8>) -> Result<(), Error>,
    skip_zero: bool,
) -> Result<(Vec<u64>, Vec<u8>), Error> {
    let (mut list, mut data) = (Vec::new(), Vec::new());
    for p in pages {
        let at = data.len();
        read(p, &mut data)?;
        if skip_zero && data[at..].iter().all(|&b| b == 0) {
            data.truncate(at);
            continue;
        }
        list.push(p);
    }
    Ok((list, data))
}

impl Remote {
    /// A sink replicating VM `vm` to the standby at `addr` (host:port; connected at the first
    /// checkpoint).
    pub fn new(addr: &str, vm: &str) -> Self {
        Self::to(Target::new(Some(addr.to_string()), false), vm)
    }

    /// A sink replicating VM `vm` wherever `target` says.
    pub fn to(target: Target, vm: &str) -> Self {
        let dest = target.get();
        Self {
            addr: dest.addr.unwrap_or_default(),
            hot: dest.hot,
            target,
            vm: vm.to_string(),
            conn: None,
            sync: Sync::Fresh,
            stats: Stats::default(),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> rebound_checkpoint::Error {
        rebound_checkpoint::Error::Sink {
            sink: self.name(),
            reason: e.to_string(),
        }
    }

    fn connect(&mut self, mem_size: u64) -> Result<(), Error> {
        let addrs: Vec<SocketAddr> = self.addr.to_socket_addrs()?.collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(mut s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(ACK_TIMEOUT))?;
                    s.set_write_timeout(Some(ACK_TIMEOUT))?;
                    let hello = Msg::Hello {
                        version: wire::VERSION,
                        vm: self.vm.clone(),
                        mem_size,
                        hot: self.hot,
                    };
                    wire::send(&mut s, &hello)?;
                    tracing::info!(standby = %self.addr, "replication: connected");
                    self.conn = Some(s);
                    self.sync = Sync::Fresh;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(
            || Error::Protocol(format!("{} names no address", self.addr)),
            Error::Io,
        ))
    }

    /// Whether the target no longer is where this connection goes.
    fn moved(&self) -> bool {
        self.target.differs(&self.addr, self.hot)
    }

    /// Follows the target: a new destination ends the connection (with a goodbye: the old
    /// standby must not take the VM over).
    fn follow(&mut self) {
        if self.moved() {
            let dest = self.target.get();
            let addr = dest.addr.unwrap_or_default();
            self.goodbye("the VM's standby moves");
            tracing::info!(from = %self.addr, to = %addr, hot = dest.hot, "replication: new standby");
            self.addr = addr;
            self.hot = dest.hot;
        }
    }

    fn conn(&mut self) -> Result<&mut TcpStream, Error> {
        self.conn
            .as_mut()
            .ok_or_else(|| Error::Protocol("not connected".into()))
    }

    /// Waits for the standby's answer in short steps: a standby moved meanwhile (its host was
    /// declared dead) ends the wait at once instead of holding output for ACK_TIMEOUT.
    fn reply(&mut self) -> Result<Msg, Error> {
        let t0 = Instant::now();
        // The connection is borrowed below: the check works on copies.
        let (target, addr, hot) = (self.target.clone(), self.addr.clone(), self.hot);
        let moved = move || target.differs(&addr, hot);
        let conn = self.conn()?;
        conn.set_read_timeout(Some(ACK_POLL))?;
        loop {
            match conn.peek(&mut [0u8; 1]) {
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if moved() {
                        return Err(Error::Protocol("the standby moved".into()));
                    }
                    if t0.elapsed() > ACK_TIMEOUT {
                        return Err(Error::Io(e));
                    }
                }
                Err(e) => return Err(Error::Io(e)),
            }
        }
        conn.set_read_timeout(Some(ACK_TIMEOUT))?;
        match wire::recv(conn, wire::HELLO_MAX)? {
            Msg::Refuse { reason } => Err(Error::Refused(reason)),
            m => Ok(m),
        }
    }

    /// Whether an answer has arrived, without waiting for one.
    fn reply_arrived(&mut self) -> Result<bool, Error> {
        let conn = self.conn()?;
        conn.set_nonblocking(true)?;
        let r = conn.peek(&mut [0u8; 1]);
        conn.set_nonblocking(false)?;
        match r {
            Ok(0) => Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(Error::Io(e)),
        }
    }

    /// Sends `cp` with `pages` (a diff, or with `full` the pages written since the copy
    /// started) following `follows`.
    fn send_epoch(
        &mut self,
        cp: &CheckpointData<'_>,
        pages: &DirtySet,
        full: bool,
        follows: Option<(u64, u64)>,
    ) -> Result<(), Error> {
        let (list, data) = gather(
            pages.iter(),
            |p, out| {
                let bytes = cp
                    .source
                    .page(p)
                    .ok_or_else(|| Error::Protocol(format!("page {p} is not available")))?;
                out.extend_from_slice(bytes);
                Ok(())
            },
            false,
        )?;
        let raw = data.len() as u64;
        let (data, compressed) = wire::pack(data);
        self.stats.raw += raw;
        self.stats.sent += data.len() as u64;
        let epoch = Epoch {
            epoch: cp.epoch,
            id: cp.id,
            follows,
            full,
            vm: cp.state.vm.clone(),
            components: cp.state.components.clone(),
            pages: list,
            compressed,
            data,
            output_offset: cp.output.offset,
            output: cp.output.bytes.clone(),
        };
        wire::send(self.conn()?, &Msg::Epoch(Box::new(epoch)))
    }

    /// Waits for the acknowledgement of `(epoch, id)`.
    fn acknowledged(&mut self, epoch: u64, id: u64) -> Result<(), Error> {
        match self.reply()? {
            Msg::Ack { epoch: e, id: i } if (e, i) == (epoch, id) => {
                self.stats.epochs += 1;
                Ok(())
            }
            other => Err(Error::Protocol(format!(
                "expected the acknowledgement of epoch {epoch}, got {other:?}"
            ))),
        }
    }

    fn send(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        self.follow();
        if self.addr.is_empty() {
            // No standby for now: the VM runs on, protected locally.
            return Ok(());
        }
        if cp.full && !matches!(self.sync, Sync::Fresh) {
            // Everything is asked for again: a new connection, a new copy.
            self.goodbye("a full copy is asked for");
        }
        if self.conn.is_none() {
            self.connect(cp.mem_size)?;
        }
        let npages = cp.mem_size / PAGE_SIZE;
        match std::mem::replace(&mut self.sync, Sync::Fresh) {
            Sync::Fresh => {
                // Not acknowledged by the standby (it has nothing yet) but acknowledged to the
                // engine: the VM's output flows on during the copy, as with no standby. The
                // standby made its old copy unusable first, so no takeover or restore can
                // start behind what is released now.
                wire::send(self.conn()?, &Msg::Resync)?;
                match self.reply()? {
                    Msg::Ready => {}
                    other => {
                        return Err(Error::Protocol(format!(
                            "expected the standby ready to resync, got {other:?}"
                        )));
                    }
                }
                let todo = cp.data.cloned().unwrap_or_else(|| DirtySet::full(npages));
                tracing::info!(standby = %self.addr, pages = todo.count(), "replication: copying memory while the VM runs");
                self.sync = Sync::Copying {
                    todo,
                    cursor: 0,
                    since: DirtySet::new(npages),
                };
                Ok(())
            }
            Sync::Copying {
                todo,
                cursor,
                mut since,
            } => {
                since.union(cp.pages);
                if cursor < npages {
                    self.sync = Sync::Copying {
                        todo,
                        cursor,
                        since,
                    };
                    return Ok(());
                }
                // The copy is done: this epoch carries every page written since it started.
                self.send_epoch(cp, &since, true, None)?;
                tracing::info!(standby = %self.addr, epoch = cp.epoch, pages = since.count(), "replication: the copy is complete");
                self.sync = Sync::Completing {
                    sent: (cp.epoch, cp.id),
                    at: Instant::now(),
                    since: DirtySet::new(npages),
                };
                Ok(())
            }
            Sync::Completing {
                sent,
                at,
                mut since,
            } => {
                since.union(cp.pages);
                if !self.reply_arrived()? {
                    if at.elapsed() > ACK_TIMEOUT {
                        return Err(Error::Protocol(
                            "the standby did not store the copy in time".into(),
                        ));
                    }
                    self.sync = Sync::Completing { sent, at, since };
                    return Ok(());
                }
                self.acknowledged(sent.0, sent.1)?;
                // From here on the standby is trusted: this epoch and every one after wait
                // for it.
                self.send_epoch(cp, &since, false, Some(sent))?;
                self.acknowledged(cp.epoch, cp.id)?;
                tracing::info!(standby = %self.addr, epoch = cp.epoch, "replication: in sync");
                self.sync = Sync::Synced {
                    last: (cp.epoch, cp.id),
                };
                Ok(())
            }
            Sync::Synced { last } => {
                self.send_epoch(cp, cp.pages, false, Some(last))?;
                self.acknowledged(cp.epoch, cp.id)?;
                self.sync = Sync::Synced {
                    last: (cp.epoch, cp.id),
                };
                Ok(())
            }
        }
    }

    /// Copies a bounded share of memory while the VM runs.
    fn copy_some(&mut self, live: &dyn LiveMemory) -> Result<(), Error> {
        let t0 = Instant::now();
        while t0.elapsed() < COPY_BUDGET {
            let Sync::Copying { todo, cursor, .. } = &mut self.sync else {
                return Ok(());
            };
            let npages = todo.capacity();
            if *cursor >= npages {
                return Ok(());
            }
            let from = *cursor;
            let chunk: Vec<u64> = todo.iter_from(from).take(COPY_CHUNK).collect();
            *cursor = match chunk.last() {
                Some(&p) if chunk.len() == COPY_CHUNK => p + 1,
                _ => npages,
            };
            let (pages, data) = gather(
                chunk.into_iter(),
                |p, out| {
                    let at = out.len();
                    out.resize(at + PAGE_SIZE as usize, 0);
                    if live.copy_page(p, &mut out[at..]) {
                        Ok(())
                    } else {
                        Err(Error::Protocol(format!("page {p} is not in memory")))
                    }
                },
                true,
            )?;
            if pages.is_empty() {
                continue;
            }
            let raw = data.len() as u64;
            let (data, compressed) = wire::pack(data);
            self.stats.raw += raw;
            self.stats.sent += data.len() as u64;
            let base = Base {
                pages,
                compressed,
                data,
            };
            wire::send(self.conn()?, &Msg::Base(Box::new(base)))?;
        }
        Ok(())
    }
}

impl Sink for Remote {
    fn name(&self) -> String {
        format!("standby:{}", self.addr)
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), rebound_checkpoint::Error> {
        self.send(cp).map_err(|e| {
            if self.moved() {
                // The old standby must not take the VM over: the new one resyncs, and output
                // flows meanwhile.
                self.goodbye("the VM's standby moves");
            } else {
                self.drop_conn(&e);
            }
            self.err(e)
        })
    }

    fn wants_full(&self) -> bool {
        self.target.get().addr.is_some()
            && (self.moved() || self.conn.is_none() || matches!(self.sync, Sync::Fresh))
    }

    fn between(&mut self, live: &dyn LiveMemory) {
        if let Err(e) = self.copy_some(live) {
            self.drop_conn(&e);
        }
    }

    fn lost(&mut self, reason: &str) {
        self.goodbye(reason);
    }

    fn hand_over(&mut self) -> bool {
        if !matches!(self.sync, Sync::Synced { .. }) || self.conn.is_none() {
            // During a resync the standby has no copy to take the VM over from.
            return false;
        }
        // Closed without a goodbye: the standby takes the VM over from the last epoch.
        self.conn = None;
        self.sync = Sync::Fresh;
        tracing::info!(standby = %self.addr, "replication: the VM is handed over");
        true
    }
}

impl Remote {
    fn drop_conn(&mut self, e: &Error) {
        if self.conn.take().is_some() {
            tracing::warn!(standby = %self.addr, "replication: connection dropped: {e}");
        }
        self.sync = Sync::Fresh;
    }

    /// Tells the standby that the checkpoints stop on purpose, and closes.
    fn goodbye(&mut self, why: &str) {
        self.sync = Sync::Fresh;
        if let Some(mut c) = self.conn.take() {
            let s = self.stats;
            tracing::info!(
                standby = %self.addr,
                epochs = s.epochs,
                page_bytes = s.raw,
                sent_bytes = s.sent,
                "replication ends: {why}"
            );
            // Best effort, and brief: the standby may be gone.
            let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = wire::send(&mut c, &Msg::Bye);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.goodbye("the sink is dropped");
    }
}
