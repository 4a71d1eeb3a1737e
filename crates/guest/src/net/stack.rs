//! An IPv4 interface and its sockets (smoltcp) over a [`Nic`], run as a dispatcher source.
//!
//! The stack is polled (smoltcp's `Interface::poll`, with a clock reading) only when there is a
//! reason: frames in the RX ring, a task that changed a socket, a timer that may have expired
//! (after the vCPU blocked), TX slots freed after the ring filled. Otherwise a dispatcher round
//! costs it a few loads from the ring header and no exit. Going idle, it sets the ring's
//! `rx_idle` (the VMM then wakes the vCPU for received frames) and bounds the block by smoltcp's
//! next timer. Tasks waiting on sockets are woken through smoltcp's wakers; tasks waiting to
//! accept are woken when a connection of their listener is established.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::net::Ipv4Addr;
use core::task::Waker;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{AnySocket, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use super::Error;
use super::nic::{Nic, RxFrame};
use crate::dispatch::Source;
use crate::hypercall::Errno;
use crate::time;

/// Frames taken from the RX ring per poll, so a flood cannot starve the tasks.
const RX_BUDGET: u32 = 256;
/// Egress passes per poll (smoltcp sends at most one segment per socket per pass).
const EGRESS_PASSES: u32 = 256;
/// Source polls with nothing to do after which the stack reads the clock anyway, so timers
/// run while tasks keep the dispatcher busy.
const QUIET_POLL_LIMIT: u32 = 1024;
/// A clock reading is reused by polls at most this many source polls after it (about one
/// dispatcher spin, see `Dispatcher::set_poll_spins`) ...
const REUSE_QUIET_MAX: u32 = 256;
/// ... and at most this many times in a row.
const REUSE_CHAIN_MAX: u32 = 4;
/// How long the vCPU blocks while the TX ring is full (the VMM drains it without waking us).
const TX_RETRY_NS: u64 = 200_000;
/// Polls in a row in which smoltcp asks to be polled again at once without moving a frame,
/// after which it is polled every [`STALL_BACKOFF_NS`] instead.
const STALL_LIMIT: u32 = 8;
const STALL_BACKOFF_NS: u64 = 1_000_000;
/// How long a dropped connection may take to close before it is aborted.
const ORPHAN_TIMEOUT_NS: u64 = 30_000_000_000;
/// A connection that stops acknowledging data (or a connect that gets no answer) is aborted
/// after this long.
const TCP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default socket buffer sizes: 128 KiB, so the window is scaled. With a 16-64 KiB window the
/// user-mode backend (passt 2023.03) stalls host-to-guest transfers (it skips a segment and never
/// retransmits it); with a scaled window it streams at tens of MB/s.
const RX_BUFFER: usize = 128 * 1024;
const TX_BUFFER: usize = 128 * 1024;
/// Local ports for outgoing connections.
const EPHEMERAL: core::ops::RangeInclusive<u16> = 49152..=65535;

/// What the stack did (see [`Stack::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Times the dispatcher polled the stack as a source.
    pub source_polls: u64,
    /// Times smoltcp ran (each needs a clock reading, unless one taken just before is reused).
    pub polls: u64,
    /// Clock readings (hypercalls).
    pub clock_reads: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Outgoing connections established.
    pub connected: u64,
}

/// A listening port: the sockets kept listening on it and the tasks waiting to accept.
pub(crate) struct Listener {
    pub(crate) port: u16,
    pub(crate) backlog: Vec<SocketHandle>,
    pub(crate) waiters: Vec<Waker>,
}

/// The smoltcp half of the stack, borrowed by one poll or one socket operation at a time.
pub(crate) struct Inner {
    iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    pub(crate) listeners: Vec<Option<Listener>>,
    /// Sockets of dropped streams, closing: (handle, abort after).
    orphans: Vec<(SocketHandle, u64)>,
    /// Outgoing connections not established yet: (handle, abort after).
    connecting: Vec<(SocketHandle, u64)>,
    /// Outgoing connections aborted by their deadline, until their task sees it.
    timed_out: Vec<SocketHandle>,
    next_port: u16,
    rx_buffer: usize,
    tx_buffer: usize,
}

impl Inner {
    /// A TCP socket with the stack's buffers and options.
    pub(crate) fn new_socket(&self) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.tx_buffer]),
        );
        s.set_nagle_enabled(false);
        s.set_timeout(Some(TCP_TIMEOUT));
        s
    }

    /// A local port for an outgoing connection that no socket uses.
    pub(crate) fn ephemeral_port(&mut self) -> u16 {
        for _ in EPHEMERAL {
            let p = self.next_port;
            self.next_port = if p == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                p + 1
            };
            let used = self.sockets.iter().any(|(_, s)| {
                tcp::Socket::downcast(s).is_some_and(|t| {
                    t.listen_endpoint().port == p || t.local_endpoint().is_some_and(|e| e.port == p)
                })
            });
            if !used {
                return p;
            }
        }
        self.next_port
    }

    pub(crate) fn connect(
        &mut self,
        socket: &mut tcp::Socket<'static>,
        addr: Ipv4Addr,
        port: u16,
        local: u16,
    ) -> Result<(), Error> {
        socket
            .connect(self.iface.context(), (addr, port), local)
            .map_err(|_| Error::InvalidAddress)
    }

    /// An outgoing connection that is aborted if it is not established by `deadline` (ns):
    /// smoltcp's own timeout only starts once the SYN could be sent (after ARP).
    pub(crate) fn connect_deadline(&mut self, handle: SocketHandle, deadline: u64) {
        self.connecting.push((handle, deadline));
    }

    /// Whether `handle`'s connect was aborted by its deadline (told once).
    pub(crate) fn timed_out(&mut self, handle: SocketHandle) -> bool {
        let before = self.timed_out.len();
        self.timed_out.retain(|&h| h != handle);
        self.timed_out.len() != before
    }

    /// Removes a closed socket (of a dropped stream) at once.
    pub(crate) fn forget(&mut self, handle: SocketHandle) {
        self.connecting.retain(|&(h, _)| h != handle);
        self.timed_out.retain(|&h| h != handle);
        self.sockets.remove(handle);
    }

    /// Dropped streams whose socket closed are removed; those that take too long are aborted.
    pub(crate) fn orphan(&mut self, handle: SocketHandle, now: u64) {
        self.connecting.retain(|&(h, _)| h != handle);
        self.timed_out.retain(|&h| h != handle);
        self.orphans
            .push((handle, now.saturating_add(ORPHAN_TIMEOUT_NS)));
    }

    /// After a poll: listeners get their closed sockets listening again and their waiting
    /// tasks woken if a connection is ready; closed orphans are removed. Whether a task was
    /// woken.
    fn housekeeping(&mut self, now: u64) -> bool {
        let mut woke = false;
        for l in self.listeners.iter_mut().flatten() {
            let mut ready = false;
            for &h in &l.backlog {
                let s = self.sockets.get_mut::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::Closed => {
                        let _ = s.listen(l.port);
                    }
                    tcp::State::Established | tcp::State::CloseWait => ready = true,
                    _ => {}
                }
            }
            if ready && !l.waiters.is_empty() {
                l.waiters.drain(..).for_each(Waker::wake);
                woke = true;
            }
        }
        let sockets = &mut self.sockets;
        let timed_out = &mut self.timed_out;
        self.connecting.retain(|&(h, abort_at)| {
            // Valid: a stream leaves this list when it is dropped, before its socket goes.
            let s = sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived if now >= abort_at => {
                    // Wakes the connecting task.
                    s.abort();
                    timed_out.push(h);
                    woke = true;
                    false
                }
                tcp::State::SynSent | tcp::State::SynReceived => true,
                _ => false,
            }
        });
        self.orphans.retain(|&(h, abort_at)| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Closed {
                sockets.remove(h);
                return false;
            }
            if now >= abort_at {
                s.abort();
            }
            true
        });
        woke
    }

    /// Aborts every connection and wakes every waiting task (the rings broke).
    fn abort_all(&mut self) {
        for (_, s) in self.sockets.iter_mut() {
            if let Some(t) = tcp::Socket::downcast_mut(s) {
                t.abort();
            }
        }
        for l in self.listeners.iter_mut().flatten() {
            l.waiters.drain(..).for_each(Waker::wake);
        }
    }
}

/// TCP/IP (IPv4, ARP, TCP; no UDP, no DHCP) over one NIC. Add it to the dispatcher as a
/// source (`d.add_source(stack.clone())`): it only sends and receives when the dispatcher
/// polls it. [`TcpListener`](super::TcpListener) and [`TcpStream`](super::TcpStream) use it;
/// use it on the vCPU that set up its NIC, from that vCPU's dispatcher.
pub struct Stack {
    nic: Nic,
    addr: Ipv4Addr,
    pub(crate) inner: RefCell<Inner>,
    /// A task changed a socket since the last poll: something may be due to be sent.
    dirty: Cell<bool>,
    /// The vCPU blocked since the clock was last read: timers may have expired.
    check_clock: Cell<bool>,
    /// The clock at the last poll (ns since the VM started).
    last_now: Cell<u64>,
    /// When smoltcp wants to be polled even if nothing arrives (ns).
    deadline: Cell<Option<u64>>,
    /// Egress stopped on a full TX ring: poll again once the VMM frees slots.
    tx_blocked: Cell<bool>,
    /// Source polls since the last time smoltcp ran.
    quiet: Cell<u32>,
    /// Polls in a row that wanted another at once without moving a frame.
    stalls: Cell<u32>,
    /// Polls in a row that reused the last clock reading.
    reused: Cell<u32>,
    /// The broken ring was seen and every connection aborted.
    broken_seen: Cell<bool>,
    stats: Cell<StackStats>,
}

impl Stack {
    /// An IPv4 interface over `nic` with address `addr`/`prefix` (a static address: there is
    /// no DHCP) and an optional default gateway; shared as an `Rc` by the dispatcher and the
    /// sockets. `InvalidAddress` for an unspecified, multicast or broadcast address or a
    /// prefix over 32. With `rebound run --publish`, use 10.0.2.15/24 and gateway 10.0.2.2.
    pub fn new(
        nic: Nic,
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
    ) -> Result<Rc<Stack>, Error> {
        if prefix > 32 || addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
            return Err(Error::InvalidAddress);
        }
        let now = time::monotonic_ns();
        let mac = nic.mac();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        // Initial sequence numbers and ports: different per boot, clone and interface.
        let mut seed = now ^ crate::hypercall::generation().rotate_left(32);
        for b in mac {
            seed = (seed ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut NicDevice::new(&nic), instant(now));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(addr.into(), prefix));
        });
        if let Some(gw) = gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gw)
                .map_err(|_| Error::InvalidAddress)?;
        }
        let span = u64::from(*EPHEMERAL.end() - *EPHEMERAL.start());
        let first = *EPHEMERAL.start() + (seed % span) as u16;
        Ok(Rc::new(Stack {
            nic,
            addr,
            inner: RefCell::new(Inner {
                iface,
                sockets: SocketSet::new(Vec::new()),
                listeners: Vec::new(),
                orphans: Vec::new(),
                connecting: Vec::new(),
                timed_out: Vec::new(),
                next_port: first,
                rx_buffer: RX_BUFFER,
                tx_buffer: TX_BUFFER,
            }),
            dirty: Cell::new(false),
            check_clock: Cell::new(true),
            last_now: Cell::new(now),
            deadline: Cell::new(None),
            tx_blocked: Cell::new(false),
            quiet: Cell::new(0),
            stalls: Cell::new(0),
            reused: Cell::new(0),
            broken_seen: Cell::new(false),
            stats: Cell::new(StackStats::default()),
        }))
    }

    /// The NIC it runs over.
    pub fn nic(&self) -> &Nic {
        &self.nic
    }

    /// Its IPv4 address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Receive and send buffer sizes, in bytes, of sockets made from now on (128 KiB each by
    /// default, at least 1 KiB). The receive buffer bounds the TCP window.
    pub fn set_socket_buffers(&self, rx: usize, tx: usize) {
        let mut inner = self.inner.borrow_mut();
        inner.rx_buffer = rx.max(1024);
        inner.tx_buffer = tx.max(1024);
    }

    /// Counters: polls, clock readings, connections.
    pub fn stats(&self) -> StackStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut StackStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    pub(crate) fn count_accepted(&self) {
        self.count(|s| s.accepted += 1);
    }

    pub(crate) fn count_connected(&self) {
        self.count(|s| s.connected += 1);
    }

    /// `Err(RingBroken)` once the VMM stopped using the rings.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.nic.broken() {
            Err(Error::RingBroken)
        } else {
            Ok(())
        }
    }

    /// A task changed a socket: poll before the dispatcher next blocks.
    pub(crate) fn touch(&self) {
        self.dirty.set(true);
    }

    /// The clock at the last poll.
    pub(crate) fn now(&self) -> u64 {
        self.last_now.get()
    }

    /// Sets the NIC's rings up again after the VMM marked them broken (TCP calls returned
    /// [`RingBroken`](super::Error::RingBroken)). Connections were aborted when the break was
    /// seen; listeners listen again. Errors: those of [`Nic::reset`] (`EBUSY` while a received
    /// frame is held).
    pub fn reset(&self) -> Result<(), Errno> {
        self.nic.reset()?;
        self.broken_seen.set(false);
        self.check_clock.set(true);
        Ok(())
    }

    /// Runs smoltcp: takes received frames, sends what the sockets have, rings the doorbell
    /// once. Whether anything moved or a task may have been woken.
    fn run(&self, reuse_clock: bool) -> bool {
        let now = if reuse_clock {
            self.last_now.get()
        } else {
            self.count(|s| s.clock_reads += 1);
            time::monotonic_ns().max(self.last_now.get())
        };
        self.reused.set(if reuse_clock {
            self.reused.get() + 1
        } else {
            0
        });
        self.last_now.set(now);
        self.check_clock.set(false);
        self.dirty.set(false);
        self.quiet.set(0);
        self.count(|s| s.polls += 1);
        let ts = instant(now);
        let before = self.nic.stats();
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        let mut dev = NicDevice::new(&self.nic);
        let mut changed =
            inner.iface.poll(ts, &mut dev, &mut inner.sockets) == PollResult::SocketStateChanged;
        for _ in 0..EGRESS_PASSES {
            if self.nic.tx_free() == 0
                || inner.iface.poll_egress(ts, &mut dev, &mut inner.sockets) == PollResult::None
            {
                break;
            }
            changed = true;
        }
        self.nic.flush();
        changed |= inner.housekeeping(now);
        let after = self.nic.stats();
        let moved = after.tx_frames != before.tx_frames || after.rx_frames != before.rx_frames;
        let mut deadline = inner
            .iface
            .poll_at(ts, &inner.sockets)
            .map(|t| (t.total_micros().max(0) as u64).saturating_mul(1000));
        let at_once = deadline.is_some_and(|d| d <= now);
        let full = at_once && self.nic.tx_free() == 0;
        self.tx_blocked.set(full);
        if full {
            // Polled again when the VMM frees slots (see `poll`), not by the clock.
            deadline = None;
            self.stalls.set(0);
        } else if at_once && !moved {
            let stalls = self.stalls.get() + 1;
            self.stalls.set(stalls);
            if stalls > STALL_LIMIT {
                deadline = Some(now + STALL_BACKOFF_NS);
            }
        } else {
            self.stalls.set(0);
        }
        self.deadline.set(deadline);
        changed || moved
    }

    /// The rings broke: abort every connection (waking their tasks, which then see
    /// `RingBroken`), once.
    fn on_broken(&self) -> bool {
        if self.broken_seen.replace(true) {
            return false;
        }
        self.inner.borrow_mut().abort_all();
        self.deadline.set(None);
        self.tx_blocked.set(false);
        true
    }
}

impl Source for Stack {
    fn poll(&self) -> bool {
        self.count(|s| s.source_polls += 1);
        if self.nic.broken() {
            return self.on_broken();
        }
        let rx = self.nic.rx_ready();
        let tx_freed = self.tx_blocked.get() && self.nic.tx_free() > 0;
        let timer = self.check_clock.get()
            || self
                .deadline
                .get()
                .is_some_and(|d| d <= self.last_now.get());
        let quiet = self.quiet.get() + 1;
        let dirty = self.dirty.get();
        if !(rx || tx_freed || timer || dirty || quiet >= QUIET_POLL_LIMIT) {
            self.quiet.set(quiet);
            return false;
        }
        // Reading the clock is an exit. Shortly after a poll that read it (the vCPU did not
        // block since, at most a dispatcher spin ago, a few polls in a row) the reading is
        // reused: smoltcp's timers count milliseconds, and the error is bounded by a few rounds.
        let reuse = !self.check_clock.get()
            && quiet <= REUSE_QUIET_MAX
            && self.reused.get() < REUSE_CHAIN_MAX;
        self.run(reuse)
    }

    fn idle(&self, idle: bool) {
        self.nic.set_idle(idle);
        if !idle {
            self.check_clock.set(true);
        }
    }

    fn next_timeout_ns(&self) -> Option<u64> {
        if self.nic.broken() {
            return None;
        }
        if self.tx_blocked.get() {
            return Some(TX_RETRY_NS);
        }
        if self.dirty.get() {
            return Some(0);
        }
        self.deadline
            .get()
            .map(|d| d.saturating_sub(self.last_now.get()))
    }
}

fn instant(ns: u64) -> Instant {
    Instant::from_micros((ns / 1000) as i64)
}

/// A smoltcp device over a NIC (what [`Stack`] runs on; for guests that drive smoltcp
/// themselves). Receiving takes at most 256 frames per device, so one poll cannot be held up
/// by a flood: make a new one per poll. Transmitting queues frames without ringing the
/// doorbell: call [`Nic::flush`] after the poll.
pub struct NicDevice<'a> {
    nic: &'a Nic,
    rx_budget: u32,
}

impl<'a> NicDevice<'a> {
    /// A device over `nic`.
    pub fn new(nic: &'a Nic) -> Self {
        Self {
            nic,
            rx_budget: RX_BUDGET,
        }
    }
}

impl phy::Device for NicDevice<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.rx_budget == 0 {
            return None;
        }
        let frame = self.nic.recv()?;
        self.rx_budget -= 1;
        // The TX token may find the ring full: its frame is then dropped (TCP sends again).
        Some((RxToken(frame), TxToken(self.nic)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        (self.nic.tx_free() > 0).then_some(TxToken(self.nic))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // smoltcp counts the Ethernet header in its MTU.
        caps.max_transmission_unit = usize::from(self.nic.mtu()) + 14;
        caps
    }
}

/// A received frame, for smoltcp ([`NicDevice`]'s receive token).
pub struct RxToken<'a>(RxFrame<'a>);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Room for a frame to send, for smoltcp ([`NicDevice`]'s transmit token). A frame that
/// finds the ring full after all is dropped (TCP sends it again).
pub struct TxToken<'a>(&'a Nic);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.send_with(len, f).1
    }
}
