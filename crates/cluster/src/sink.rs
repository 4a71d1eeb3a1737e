//! The primary's side of replication: a checkpoint sink that sends each epoch to the standby
//! and acknowledges it to the engine only when the standby answered that it stored it. Output
//! commit releases an epoch's output only after that (Remus' rule), so a standby that takes
//! over never has less than what clients saw.
//!
//! A new connection (the first, or after the standby restarted or the link failed) asks the
//! engine for a full checkpoint: every page that may hold data, then diffs again. While the
//! standby cannot be reached, checkpoints are not acknowledged and output stays held (bounded
//! by output commit's limits), as with Remus.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rebound_checkpoint::sink::{CheckpointData, Sink};
use rebound_snapshot::PAGE_SIZE;

use crate::Error;
use crate::wire::{self, Epoch, Msg};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an acknowledgement may take (a full epoch of a large VM included).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a wait for an acknowledgement checks whether the standby moved.
const ACK_POLL: Duration = Duration::from_millis(20);

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
    /// The last epoch the standby acknowledged on this connection (None: nothing yet, so the
    /// next epoch must be full).
    last: Option<(u64, u64)>,
    stats: Stats,
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
            last: None,
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
                    self.last = None;
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

    /// Follows the target: a new destination ends the connection (with a goodbye: the old
    /// standby must not take the VM over).
    fn follow(&mut self) {
        let dest = self.target.get();
        let addr = dest.addr.unwrap_or_default();
        if addr != self.addr || dest.hot != self.hot {
            self.goodbye("the VM's standby moves");
            tracing::info!(from = %self.addr, to = %addr, hot = dest.hot, "replication: new standby");
            self.addr = addr;
            self.hot = dest.hot;
            self.last = None;
        }
    }

    fn send(&mut self, cp: &CheckpointData<'_>) -> Result<(), Error> {
        self.follow();
        if self.addr.is_empty() {
            // No standby for now: the VM runs on, protected locally.
            return Ok(());
        }
        if self.conn.is_none() {
            self.connect(cp.mem_size)?;
        }
        if self.last.is_none() && !cp.full {
            // The engine asks for a full checkpoint next (wants_full).
            return Err(Error::Protocol(
                "a new connection starts with a full checkpoint".into(),
            ));
        }
        let npages = cp.mem_size / PAGE_SIZE;
        let pages: Box<dyn Iterator<Item = u64>> = match (cp.full, cp.data) {
            (true, Some(d)) => Box::new(d.iter()),
            (true, None) => Box::new(0..npages),
            (false, _) => Box::new(cp.pages.iter()),
        };
        let (mut list, mut data) = (Vec::new(), Vec::new());
        for p in pages {
            let bytes = cp
                .source
                .page(p)
                .ok_or_else(|| Error::Protocol(format!("page {p} is not available")))?;
            if cp.full && bytes.iter().all(|&b| b == 0) {
                continue;
            }
            list.push(p);
            data.extend_from_slice(bytes);
        }
        let raw = data.len() as u64;
        let (data, compressed) = wire::pack(data);
        self.stats.raw += raw;
        self.stats.sent += data.len() as u64;
        let epoch = Epoch {
            epoch: cp.epoch,
            id: cp.id,
            follows: self.last,
            full: cp.full,
            vm: cp.state.vm.clone(),
            components: cp.state.components.clone(),
            pages: list,
            compressed,
            data,
            output_offset: cp.output.offset,
            output: cp.output.bytes.clone(),
        };
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::Protocol("not connected".into()));
        };
        wire::send(conn, &Msg::Epoch(Box::new(epoch)))?;
        // Waits for the answer in short steps: a standby moved meanwhile (its host was
        // declared dead) ends the wait at once instead of holding output for ACK_TIMEOUT.
        let t0 = std::time::Instant::now();
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
                    let dest = self.target.get();
                    if dest.addr.as_deref().unwrap_or("") != self.addr || dest.hot != self.hot {
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
            Msg::Ack { epoch, id } if (epoch, id) == (cp.epoch, cp.id) => {
                self.last = Some((epoch, id));
                self.stats.epochs += 1;
                Ok(())
            }
            Msg::Refuse { reason } => Err(Error::Refused(reason)),
            other => Err(Error::Protocol(format!(
                "expected the acknowledgement of epoch {}, got {other:?}",
                cp.epoch
            ))),
        }
    }
}

impl Sink for Remote {
    fn name(&self) -> String {
        format!("standby:{}", self.addr)
    }

    fn commit(&mut self, cp: &CheckpointData<'_>) -> Result<(), rebound_checkpoint::Error> {
        self.send(cp).map_err(|e| {
            if self.conn.take().is_some() {
                tracing::warn!(standby = %self.addr, "replication: connection dropped: {e}");
            }
            self.err(e)
        })
    }

    fn wants_full(&self) -> bool {
        let dest = self.target.get();
        let moving = dest.addr.as_deref().unwrap_or("") != self.addr || dest.hot != self.hot;
        dest.addr.is_some() && (moving || self.conn.is_none() || self.last.is_none())
    }

    fn lost(&mut self, reason: &str) {
        self.goodbye(reason);
    }

    fn hand_over(&mut self) {
        // Closed without a goodbye: the standby takes the VM over from the last epoch.
        if self.conn.take().is_some() {
            tracing::info!(standby = %self.addr, "replication: the VM is handed over");
        }
    }
}

impl Remote {
    /// Tells the standby that the checkpoints stop on purpose, and closes.
    fn goodbye(&mut self, why: &str) {
        if let Some(mut c) = self.conn.take() {
            let s = self.stats;
            tracing::info!(
                standby = %self.addr,
                epochs = s.epochs,
                page_bytes = s.raw,
                sent_bytes = s.sent,
                "replication ends: {why}"
            );
            let _ = wire::send(&mut c, &Msg::Bye);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.goodbye("the sink is dropped");
    }
}
