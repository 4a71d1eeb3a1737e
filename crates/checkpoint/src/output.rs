//! Output commit: what the guest sends out is released only once the checkpoint that follows it
//! is safe (acknowledged by the sinks), so a rollback never repeats or loses output.
//!
//! Bytes written during epoch `e` (between checkpoints `e - 1` and `e`) are held; checkpoint
//! `e` seals them; when the sinks acknowledge `e` they are written out. A rollback to
//! checkpoint `c` drops everything not yet sealed (the guest will produce it again from `c`).
//! When no engine runs, output passes straight through.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

/// Held output, shared by the console (writer side) and the engine (seal / release / discard).
pub struct OutputCommit {
    inner: Mutex<Inner>,
}

struct Inner {
    out: Box<dyn Write + Send>,
    holding: bool,
    /// Written since the last checkpoint.
    open: Vec<u8>,
    /// Sealed by a checkpoint, waiting for its acknowledgement.
    sealed: BTreeMap<u64, Vec<u8>>,
    /// Bytes in `open` and `sealed`.
    held: u64,
    released_bytes: u64,
    discarded_bytes: u64,
    refused_bytes: u64,
    /// Called when held output passes [`SOFT_LIMIT`]: asks for a checkpoint now.
    pressure: Option<Box<dyn Fn() + Send>>,
}

/// Held output past which a checkpoint is asked for at once.
pub const SOFT_LIMIT: u64 = 4 << 20;
/// Held output past which guest writes are refused (the console returns EIO): the guest cannot
/// make the VMM buffer without bound while its checkpoints are not acknowledged.
pub const HARD_LIMIT: u64 = 64 << 20;

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutputStats {
    /// Bytes written out.
    pub released_bytes: u64,
    /// Bytes dropped by rollbacks.
    pub discarded_bytes: u64,
    /// Bytes held now.
    pub held_bytes: u64,
    /// Guest writes refused because too much was held ([`HARD_LIMIT`]).
    pub refused_bytes: u64,
}

impl OutputCommit {
    /// Output to `out`, passing through until [`hold`](Self::hold).
    pub fn new(out: Box<dyn Write + Send>) -> Arc<Self> {
        Self::new_at(out, 0)
    }

    /// Like [`new`](Self::new) for an output stream that already holds `released` bytes (a VM
    /// taken over from a state directory): offsets in records continue from there.
    pub fn new_at(out: Box<dyn Write + Send>, released: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                out,
                holding: false,
                open: Vec::new(),
                sealed: BTreeMap::new(),
                held: 0,
                released_bytes: released,
                discarded_bytes: 0,
                refused_bytes: 0,
                pressure: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A writer for the guest console.
    pub fn writer(self: &Arc<Self>) -> Box<dyn Write + Send> {
        Box::new(Writer(self.clone()))
    }

    /// Starts holding output (the VM runs protected from now on).
    pub fn hold(&self) {
        self.lock().holding = true;
    }

    /// Stops holding: everything held is released now.
    pub fn pass_through(&self) -> io::Result<()> {
        let mut g = self.lock();
        g.holding = false;
        let sealed = std::mem::take(&mut g.sealed);
        let open = std::mem::take(&mut g.open);
        g.held = 0;
        let mut first = Ok(());
        for bytes in sealed.into_values().chain(std::iter::once(open)) {
            let r = Self::emit(&mut g, &bytes);
            first = first.and(r);
        }
        first
    }

    fn emit(g: &mut Inner, bytes: &[u8]) -> io::Result<()> {
        if !bytes.is_empty() {
            g.out.write_all(bytes)?;
            g.out.flush()?;
            g.released_bytes += bytes.len() as u64;
        }
        Ok(())
    }

    /// Checkpoint `epoch` was taken: what was written since the previous one belongs to it.
    pub fn seal(&self, epoch: u64) {
        let mut g = self.lock();
        let open = std::mem::take(&mut g.open);
        if !open.is_empty() {
            g.sealed.entry(epoch).or_default().extend_from_slice(&open);
        }
    }

    /// Checkpoint `epoch` is safe: release its output and any earlier.
    pub fn release(&self, epoch: u64) -> io::Result<()> {
        let mut g = self.lock();
        let later = g.sealed.split_off(&(epoch + 1));
        let ready = std::mem::replace(&mut g.sealed, later);
        g.held -= ready.values().map(|v| v.len() as u64).sum::<u64>();
        // Every batch is offered even after a failure (a failing output may still show the
        // rest elsewhere); the first error is returned.
        let mut first = Ok(());
        for (_, bytes) in ready {
            let r = Self::emit(&mut g, &bytes);
            first = first.and(r);
        }
        first
    }

    /// The VM went back to checkpoint `epoch`: output written after it will be produced again.
    pub fn discard_after(&self, epoch: u64) {
        let mut g = self.lock();
        let later = g.sealed.split_off(&(epoch + 1));
        let open = std::mem::take(&mut g.open);
        let dropped = open.len() as u64 + later.values().map(|v| v.len() as u64).sum::<u64>();
        g.discarded_bytes += dropped;
        g.held -= dropped;
    }

    /// Drops everything held (the VM goes back to a point before it); still holding.
    pub fn discard_held(&self) {
        let mut g = self.lock();
        g.sealed.clear();
        g.open.clear();
        g.discarded_bytes += g.held;
        g.held = 0;
    }

    /// Sets (or clears) what to call when held output passes [`SOFT_LIMIT`].
    pub fn on_pressure(&self, f: Option<Box<dyn Fn() + Send>>) {
        self.lock().pressure = f;
    }

    /// What acknowledging checkpoint `epoch` releases: every byte sealed up to it and not yet
    /// released (earlier checkpoints may not have been acknowledged), from the released offset.
    pub fn sealed_record(&self, epoch: u64) -> crate::state_dir::OutputRecord {
        let g = self.lock();
        let mut bytes = Vec::new();
        for (_, v) in g.sealed.range(..=epoch) {
            bytes.extend_from_slice(v);
        }
        crate::state_dir::OutputRecord {
            offset: g.released_bytes,
            bytes,
        }
    }

    /// Everything not yet released (sealed or not), from the released offset: what the VM's
    /// end releases.
    pub fn unreleased_record(&self) -> crate::state_dir::OutputRecord {
        let g = self.lock();
        let mut bytes = Vec::new();
        for v in g.sealed.values() {
            bytes.extend_from_slice(v);
        }
        bytes.extend_from_slice(&g.open);
        crate::state_dir::OutputRecord {
            offset: g.released_bytes,
            bytes,
        }
    }

    /// Counters.
    pub fn stats(&self) -> OutputStats {
        let g = self.lock();
        OutputStats {
            released_bytes: g.released_bytes,
            discarded_bytes: g.discarded_bytes,
            held_bytes: g.held,
            refused_bytes: g.refused_bytes,
        }
    }
}

struct Writer(Arc<OutputCommit>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock();
        if g.holding {
            let len = buf.len() as u64;
            if g.held + len > HARD_LIMIT {
                g.refused_bytes += len;
                return Err(io::Error::other(
                    "too much output held for unacknowledged checkpoints",
                ));
            }
            let before = g.held;
            g.open.extend_from_slice(buf);
            g.held += len;
            if before <= SOFT_LIMIT
                && g.held > SOFT_LIMIT
                && let Some(f) = &g.pressure
            {
                f();
            }
        } else {
            g.out.write_all(buf)?;
            g.released_bytes += buf.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.0.lock();
        if g.holding { Ok(()) } else { g.out.flush() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_record_carries_everything_unreleased_up_to_its_epoch() {
        let oc = OutputCommit::new_at(Box::new(Sink::default()), 100);
        let mut w = oc.writer();
        oc.hold();
        w.write_all(b"ab").unwrap();
        oc.seal(1);
        w.write_all(b"cd").unwrap();
        oc.seal(2);
        w.write_all(b"ef").unwrap();
        // Checkpoint 1 was not acknowledged: checkpoint 2's record releases "abcd" at 100.
        let r = oc.sealed_record(2);
        assert_eq!((r.offset, r.bytes.as_slice()), (100, &b"abcd"[..]));
        oc.release(2).unwrap();
        oc.seal(3);
        let r = oc.sealed_record(3);
        assert_eq!((r.offset, r.bytes.as_slice()), (104, &b"ef"[..]));
    }

    #[test]
    fn held_output_asks_for_a_checkpoint_then_refuses() {
        let oc = OutputCommit::new(Box::new(Sink::default()));
        let asked = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let a = asked.clone();
        oc.on_pressure(Some(Box::new(move || {
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })));
        oc.hold();
        let mut w = oc.writer();
        let chunk = vec![b'x'; 1 << 20];
        let mut refused = 0;
        for _ in 0..70 {
            if w.write_all(&chunk).is_err() {
                refused += 1;
            }
        }
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "asked once when crossing the soft limit"
        );
        assert_eq!(refused, 70 - (HARD_LIMIT >> 20) as usize);
        let s = oc.stats();
        assert_eq!(
            (s.held_bytes, s.refused_bytes),
            (HARD_LIMIT, (refused as u64) << 20)
        );
        oc.seal(1);
        oc.release(1).unwrap();
        assert_eq!(oc.stats().held_bytes, 0);
        assert!(w.write_all(b"more").is_ok(), "room again once released");
    }

    #[test]
    fn held_output_is_released_in_order_and_rolled_back_output_dropped() {
        let out = Sink::default();
        let oc = OutputCommit::new(Box::new(out.clone()));
        let mut w = oc.writer();
        w.write_all(b"a").unwrap();
        oc.hold();
        w.write_all(b"b").unwrap();
        oc.seal(1);
        w.write_all(b"c").unwrap();
        oc.seal(2);
        w.write_all(b"X").unwrap(); // will be rolled back
        assert_eq!(out.0.lock().unwrap().as_slice(), b"a");
        oc.release(1).unwrap();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ab");
        oc.discard_after(2);
        w.write_all(b"d").unwrap();
        oc.seal(3);
        oc.release(3).unwrap();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"abcd");
        let s = oc.stats();
        assert_eq!(
            (s.released_bytes, s.discarded_bytes, s.held_bytes),
            (4, 1, 0)
        );
        w.write_all(b"e").unwrap();
        oc.pass_through().unwrap();
        w.write_all(b"f").unwrap();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"abcdef");
    }
}

/// Everything output commit holds for one VM: the console (whose released bytes a state
/// directory records) and the devices' outputs (the NICs' frames). The engine drives them as
/// one: each checkpoint seals all of them, each acknowledgement releases all of them.
#[derive(Clone)]
pub struct Outputs {
    /// The console.
    pub console: Arc<OutputCommit>,
    /// Device outputs (see `Vm::held_outputs`).
    pub devices: Vec<Arc<dyn rebound_devices::HeldOutput>>,
}

impl Outputs {
    /// Starts holding everything, the VM being at checkpoint `epoch`.
    pub fn hold(&self, epoch: u64) {
        self.console.hold();
        for d in &self.devices {
            d.hold(epoch);
        }
    }

    /// Stops holding: everything held goes out now; the console's error first.
    pub fn pass_through(&self) -> io::Result<()> {
        let mut first = self.console.pass_through();
        for d in &self.devices {
            let r = d.pass_through();
            first = first.and(r);
        }
        first
    }

    /// Checkpoint `epoch` was taken.
    pub fn seal(&self, epoch: u64) {
        self.console.seal(epoch);
        for d in &self.devices {
            d.seal(epoch);
        }
    }

    /// Checkpoint `epoch` is safe. The devices go first, the disk first of them: an epoch's
    /// disk writes are on the disk before any output that may tell of them leaves.
    pub fn release(&self, epoch: u64) -> io::Result<()> {
        let mut first = Ok(());
        for d in &self.devices {
            let r = d.release(epoch);
            first = first.and(r);
        }
        let r = self.console.release(epoch);
        first.and(r)
    }

    /// The VM went back to checkpoint `epoch`.
    pub fn discard_after(&self, epoch: u64) {
        self.console.discard_after(epoch);
        for d in &self.devices {
            d.discard_after(epoch);
        }
    }

    /// Everything held is dropped.
    pub fn discard_held(&self) {
        self.console.discard_held();
        for d in &self.devices {
            d.discard_held();
        }
    }

    /// What to call when a checkpoint is wanted soon: console output past its soft limit, or
    /// a device output (a frame) waiting (so a reply waits one pause and commit, not an epoch).
    pub fn on_wanted(&self, f: Option<Arc<dyn Fn() + Send + Sync>>) {
        match f {
            None => {
                self.console.on_pressure(None);
                for d in &self.devices {
                    d.on_pending(None);
                }
            }
            Some(f) => {
                let g = f.clone();
                self.console.on_pressure(Some(Box::new(move || g())));
                for d in &self.devices {
                    let g = f.clone();
                    d.on_pending(Some(Box::new(move || g())));
                }
            }
        }
    }

    /// Whether a device output waits for the next checkpoint.
    pub fn pending(&self) -> bool {
        self.devices.iter().any(|d| d.has_pending())
    }

    /// The console's record for checkpoint `epoch` (see [`OutputCommit::sealed_record`]).
    pub fn sealed_record(&self, epoch: u64) -> crate::state_dir::OutputRecord {
        self.console.sealed_record(epoch)
    }

    /// The console's counters.
    pub fn stats(&self) -> OutputStats {
        self.console.stats()
    }
}
