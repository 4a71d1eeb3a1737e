//! The standby's side of replication: receives a primary's epochs, checks each, stores it in a
//! snapshot directory (fsynced) and only then acknowledges it. `rebound restore --dir` builds
//! the VM from the directory's newest chain (cold standby).
//!
//! A connection starts with a resync: the primary copies its memory while the VM runs, so the
//! primary is never paused for it. The standby first makes what it kept unusable (from now on
//! the primary releases output without waiting for it, so the old copy may be older than what
//! clients saw), then collects the copy's pages, and the full epoch that ends the copy carries
//! every page written since it started: the two together are that epoch's memory. The copy is
//! trusted (a takeover may start from it) only from the next epoch, the first one the primary
//! waits for again.
//!
//! Checked before anything is stored: each frame's checksum and size (at most the VM's memory
//! plus [`wire::EPOCH_OVERHEAD_MAX`]); that a connection starts with a Hello of this protocol
//! version, then the resync, then a full epoch; that the copy's pages ascend and stay inside
//! memory; that each epoch follows the last one acknowledged on the connection and has a
//! larger number; that its pages are ascending, inside memory, and match their bytes. Anything
//! else is refused and ends the connection, and what was stored stays the last acknowledged
//! epoch.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use rebound_checkpoint::CheckpointRef;
use rebound_checkpoint::sink::{CheckpointData, Sink};
use rebound_checkpoint::state_dir::OutputRecord;
use rebound_checkpoint::strategy::PageSource;
use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::persist::SavedState;

use crate::Error;
use crate::cold::ColdStore;
use crate::wire::{self, Base, Epoch, Msg};

/// Diffs kept before the directory's chain is merged.
const MAX_CHAIN: usize = 16;

/// The pages of one received epoch.
struct Received<'a> {
    at: HashMap<u64, usize>,
    data: &'a [u8],
}

/// Page `p` of `data`, whose pages `at` indexes.
fn indexed<'a>(at: &HashMap<u64, usize>, data: &'a [u8], p: u64) -> Option<&'a [u8]> {
    let i = *at.get(&p)?;
    data.get(i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize)
}

impl PageSource for Received<'_> {
    fn page(&self, p: u64) -> Option<&[u8]> {
        indexed(&self.at, self.data, p)
    }
}

/// A full copy being received while the primary's VM runs: at most one of each page, since
/// pages must ascend.
struct Staging {
    npages: u64,
    /// The lowest page the next part may hold.
    next: u64,
    at: HashMap<u64, usize>,
    data: Vec<u8>,
    set: DirtySet,
    /// Bytes the copy took on the wire.
    wire: u64,
}

impl Staging {
    fn new(npages: u64) -> Self {
        Self {
            npages,
            next: 0,
            at: HashMap::new(),
            data: Vec::new(),
            set: DirtySet::new(npages),
            wire: 0,
        }
    }

    /// Checks and keeps one part of the copy.
    fn add(&mut self, b: &Base) -> Result<(), String> {
        let mut next = self.next;
        for &p in &b.pages {
            if p < next || p >= self.npages {
                return Err(format!("copied page {p} is out of order or past memory"));
            }
            next = p + 1;
        }
        let bytes = wire::unpack_pages(b.pages.len(), b.compressed, &b.data)?;
        self.next = next;
        // Zero pages are not kept: the copy starts zero (and a stream of them costs nothing).
        for (&p, page) in b.pages.iter().zip(bytes.chunks_exact(PAGE_SIZE as usize)) {
            if page.iter().all(|&x| x == 0) {
                continue;
            }
            self.at.insert(p, self.at.len());
            self.set.insert(p);
            self.data.extend_from_slice(page);
        }
        self.wire += b.data.len() as u64;
        Ok(())
    }
}

impl PageSource for Staging {
    fn page(&self, p: u64) -> Option<&[u8]> {
        indexed(&self.at, &self.data, p)
    }
}

/// The epoch's pages over the copy's.
struct Overlay<'a> {
    top: &'a Received<'a>,
    base: Option<&'a Staging>,
}

impl PageSource for Overlay<'_> {
    fn page(&self, p: u64) -> Option<&[u8]> {
        self.top
            .page(p)
            .or_else(|| self.base.and_then(|b| b.page(p)))
    }
}

/// What keeps a standby's copy of a VM.
pub trait Store: Sink {
    /// Makes what is kept unusable (durably: no takeover or restore may start from it), for a
    /// resync after which the primary releases output this copy does not have.
    fn invalidate(&mut self) -> Result<(), rebound_checkpoint::Error>;

    /// A takeover is about to read what is kept: nothing in it may change from here on (no
    /// background work finishing into it).
    fn hold_still(&mut self) {}
}

/// Where a connection's checkpoints go.
pub trait Receiver {
    /// A resync starts: see [`Store::invalidate`].
    fn invalidate(&mut self) -> Result<(), Error>;
    /// Stores `cp` (or refuses it with [`Error::Refused`]); `wire` is the bytes its pages took
    /// on the wire.
    fn commit(&mut self, cp: &CheckpointData<'_>, wire: u64) -> Result<(), Error>;
}

impl<S: Store + ?Sized> Receiver for &mut S {
    fn invalidate(&mut self) -> Result<(), Error> {
        Store::invalidate(&mut **self).map_err(Error::from)
    }

    fn commit(&mut self, cp: &CheckpointData<'_>, _wire: u64) -> Result<(), Error> {
        Sink::commit(&mut **self, cp).map_err(Error::from)
    }
}

/// Serves primaries one connection at a time, storing their epochs in `dir`. With `takeover`,
/// returns (the reason) when a primary that had an epoch acknowledged is lost: its connection
/// ends without a goodbye, or nothing arrives for `takeover` (longer than its checkpoint
/// interval); the caller then builds the VM from `dir`. Without, serves forever.
pub fn serve(
    listener: &TcpListener,
    dir: &Path,
    takeover: Option<Duration>,
) -> Result<String, Error> {
    serve_into(listener, &mut ColdStore::new(dir, MAX_CHAIN)?, takeover)
}

/// [`serve`] into any store: a snapshot directory (cold) or a [`crate::hot::HotStore`].
pub fn serve_into(
    listener: &TcpListener,
    mut store: &mut dyn Store,
    takeover: Option<Duration>,
) -> Result<String, Error> {
    loop {
        let (mut conn, peer) = listener.accept()?;
        let ended = match handshake(&mut conn) {
            Ok(hello) => receive(conn, &hello, takeover, &mut store),
            Err(e) => Ended::Lost {
                acked: 0,
                why: e.to_string(),
            },
        };
        match ended {
            Ended::Bye => tracing::info!(%peer, "replication: the primary ended it"),
            Ended::Lost { acked, why } => {
                tracing::warn!(%peer, acked, "replication: the primary is lost: {why}");
                if takeover.is_some() && acked > 0 {
                    return Ok(why);
                }
            }
        }
    }
}

/// What a primary said it replicates (its first message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The VM's name.
    pub vm: String,
    /// Its memory in bytes.
    pub mem_size: u64,
    /// It asks for a hot standby (memory kept applied in place).
    pub hot: bool,
}

/// Reads and checks a connection's Hello (refusing a wrong one).
pub fn handshake(conn: &mut TcpStream) -> Result<Hello, Error> {
    conn.set_nodelay(true)?;
    match wire::recv(conn, wire::HELLO_MAX)? {
        Msg::Hello {
            version: wire::VERSION,
            vm,
            mem_size,
            hot,
        } if mem_size.is_multiple_of(PAGE_SIZE) && mem_size <= 64 << 30 && valid_name(&vm) => {
            tracing::info!(vm, mem_size, hot, "replication: primary connected");
            Ok(Hello { vm, mem_size, hot })
        }
        other => {
            let reason = format!(
                "expected a Hello of version {} with a valid name and memory size: {other:?}",
                wire::VERSION
            );
            Err(refuse(conn, reason))
        }
    }
}

/// A VM name the standby may use in a path: 1-64 letters, digits, '_', '.', '-', not starting
/// with '.'.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// How a primary's connection ended.
#[derive(Debug)]
pub enum Ended {
    /// It said the checkpoints stop on purpose.
    Bye,
    /// It went away or went silent after `acked` epochs, or was refused: a failure.
    Lost {
        /// Epochs acknowledged on the connection after its full one (those a takeover may
        /// start from).
        acked: u64,
        /// Why it ended.
        why: String,
    },
}

/// Receives the resync and the epochs after the Hello: each epoch is checked, given to `rx`
/// and acknowledged once stored.
pub fn receive(
    conn: TcpStream,
    hello: &Hello,
    timeout: Option<Duration>,
    rx: &mut dyn Receiver,
) -> Ended {
    let mut acked = 0;
    match receive_epochs(conn, hello.mem_size, timeout, rx, &mut acked) {
        Ok(()) => Ended::Bye,
        Err(e) => Ended::Lost {
            acked,
            why: e.to_string(),
        },
    }
}

/// Checks an epoch against the connection's state; returns its pages as a set.
fn check(e: &Epoch, mem_size: u64, last: Option<(u64, u64)>) -> Result<DirtySet, String> {
    match last {
        None if !e.full => return Err("a connection's first epoch must be full".into()),
        Some(l) if e.follows != Some(l) => {
            return Err(format!(
                "epoch {} follows {:?}, the last acknowledged is {l:?}",
                e.epoch, e.follows
            ));
        }
        Some((n, _)) if e.epoch <= n => {
            return Err(format!("epoch {} after epoch {n}", e.epoch));
        }
        _ => {}
    }
    if e.vm.mem_size != mem_size {
        return Err(format!(
            "the VM has {mem_size} bytes of memory; epoch {} says {}",
            e.epoch, e.vm.mem_size
        ));
    }
    if !e.compressed && e.data.len() as u64 != e.pages.len() as u64 * PAGE_SIZE {
        return Err(format!(
            "{} pages with {} bytes",
            e.pages.len(),
            e.data.len()
        ));
    }
    let npages = mem_size / PAGE_SIZE;
    let mut set = DirtySet::new(npages);
    let mut prev = None;
    for &p in &e.pages {
        if p >= npages || prev.is_some_and(|q| p <= q) {
            return Err(format!("page {p} is out of order or past memory"));
        }
        prev = Some(p);
        set.insert(p);
    }
    Ok(set)
}

fn refuse(conn: &mut TcpStream, reason: String) -> Error {
    let _ = wire::send(
        conn,
        &Msg::Refuse {
            reason: reason.clone(),
        },
    );
    Error::Refused(reason)
}

/// Stores and acknowledges epochs until the primary says goodbye (`Ok`) or anything fails.
fn receive_epochs(
    mut conn: TcpStream,
    mem_size: u64,
    timeout: Option<Duration>,
    rx: &mut dyn Receiver,
    acked: &mut u64,
) -> Result<(), Error> {
    conn.set_read_timeout(timeout)?;
    let max = mem_size + wire::EPOCH_OVERHEAD_MAX;
    let npages = mem_size / PAGE_SIZE;
    let mut last = None;
    let mut staging: Option<Staging> = None;
    loop {
        let e = match wire::recv(&mut conn, max)? {
            Msg::Epoch(e) => e,
            Msg::Bye => return Ok(()),
            Msg::Resync if last.is_none() && staging.is_none() => {
                if let Err(e) = rx.invalidate() {
                    return Err(refuse(&mut conn, format!("cannot resync: {e}")));
                }
                staging = Some(Staging::new(npages));
                wire::send(&mut conn, &Msg::Ready)?;
                continue;
            }
            Msg::Base(b) => {
                let Some(st) = staging.as_mut().filter(|_| last.is_none()) else {
                    return Err(refuse(&mut conn, "copied pages outside a resync".into()));
                };
                st.add(&b).map_err(|r| refuse(&mut conn, r))?;
                continue;
            }
            other => {
                return Err(refuse(
                    &mut conn,
                    format!("expected an epoch, got {other:?}"),
                ));
            }
        };
        let mut pages = check(&e, mem_size, last).map_err(|r| refuse(&mut conn, r))?;
        let data = wire::unpack(&e).map_err(|r| refuse(&mut conn, r))?;
        let received = Received {
            at: e.pages.iter().enumerate().map(|(i, &p)| (p, i)).collect(),
            data: &data,
        };
        // The full epoch ending a copy: its pages over the copy's are its memory.
        let base = if e.full { staging.take() } else { None };
        let mut wire_bytes = e.data.len() as u64;
        if let Some(b) = &base {
            pages.union(&b.set);
            wire_bytes += b.wire;
        }
        let source = Overlay {
            top: &received,
            base: base.as_ref(),
        };
        let state = SavedState {
            vm: e.vm.clone(),
            components: e.components.clone(),
        };
        let output = OutputRecord {
            offset: e.output_offset,
            bytes: e.output.clone(),
        };
        let cp = CheckpointData {
            epoch: e.epoch,
            id: e.id,
            follows: e.follows.map(|(epoch, id)| CheckpointRef { epoch, id }),
            state: &state,
            mem_size,
            pages: &pages,
            full: e.full,
            data: e.full.then_some(&pages),
            source: &source,
            output: &output,
        };
        if let Err(e) = rx.commit(&cp, wire_bytes) {
            return Err(match e {
                Error::Refused(reason) => refuse(&mut conn, reason),
                e => e,
            });
        }
        drop(base);
        last = Some((e.epoch, e.id));
        if !e.full {
            *acked += 1;
        }
        wire::send(
            &mut conn,
            &Msg::Ack {
                epoch: e.epoch,
                id: e.id,
            },
        )?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_vmm::persist::VmDescriptor;

    fn epoch(n: u64, follows: Option<(u64, u64)>, full: bool, pages: Vec<u64>) -> Epoch {
        Epoch {
            epoch: n,
            id: n * 10,
            follows,
            full,
            vm: VmDescriptor {
                mem_size: 16 * PAGE_SIZE,
                vcpus: 1,
                image: "x".into(),
                boot_args: String::new(),
                disk: None,
                abi_version: 0,
            },
            components: Default::default(),
            compressed: false,
            data: vec![0; pages.len() * PAGE_SIZE as usize],
            pages,
            output_offset: 0,
            output: Vec::new(),
        }
    }

    #[test]
    fn copied_pages_out_of_order_past_memory_or_short_are_refused() {
        let part = |pages: Vec<u64>| Base {
            data: vec![7; pages.len() * PAGE_SIZE as usize],
            pages,
            compressed: false,
        };
        let mut st = Staging::new(16);
        st.add(&part(vec![1, 2])).unwrap();
        assert!(st.add(&part(vec![2])).is_err(), "a page twice");
        assert!(st.add(&part(vec![5, 4])).is_err(), "descending");
        let mut st = Staging::new(16);
        assert!(st.add(&part(vec![16])).is_err(), "past memory");
        let mut short = part(vec![3]);
        short.data.pop();
        assert!(st.add(&short).is_err(), "short");
        let bomb = Base {
            pages: vec![3],
            compressed: true,
            data: lz4_flex::block::compress(&[0u8; 2 * PAGE_SIZE as usize]),
        };
        assert!(
            st.add(&bomb).is_err(),
            "decompresses to more than its pages"
        );
        st.add(&part(vec![3, 15])).unwrap();
        assert_eq!(st.set.count(), 2);
        assert_eq!(st.page(15).unwrap()[0], 7);
    }

    #[test]
    fn hostile_vm_names_are_refused() {
        assert!(valid_name("web-1.a_b"));
        for bad in ["", ".", "..", "../x", "a/b", "a\0b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn epochs_out_of_order_or_malformed_are_refused() {
        let m = 16 * PAGE_SIZE;
        assert!(check(&epoch(1, None, true, vec![0, 3]), m, None).is_ok());
        assert!(
            check(&epoch(1, None, false, vec![]), m, None).is_err(),
            "not full first"
        );
        assert!(check(&epoch(2, Some((1, 10)), false, vec![2]), m, Some((1, 10))).is_ok());
        assert!(check(&epoch(3, Some((1, 10)), false, vec![]), m, Some((2, 20))).is_err());
        assert!(check(&epoch(2, Some((2, 20)), false, vec![]), m, Some((2, 20))).is_err());
        assert!(
            check(
                &epoch(3, Some((2, 20)), false, vec![3, 2]),
                m,
                Some((2, 20))
            )
            .is_err()
        );
        assert!(check(&epoch(3, Some((2, 20)), false, vec![16]), m, Some((2, 20))).is_err());
        let mut short = epoch(3, Some((2, 20)), false, vec![1]);
        short.data.pop();
        assert!(check(&short, m, Some((2, 20))).is_err());
        assert!(
            check(&epoch(1, None, true, vec![]), 2 * m, None).is_err(),
            "other memory size"
        );
    }
}
