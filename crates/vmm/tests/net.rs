//! The network device with the guest SDK's driver and TCP/IP on real KVM: the test guest on one
//! NIC whose backend is one end of a `UnixDatagram` pair (a frame per datagram); on the other
//! end, smoltcp on the host is the peer (ARP, TCP), or the test writes raw frames itself.

mod common;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use rebound_devices::console::SharedBuffer;
use rebound_devices::net::DatagramBackend;
use rebound_vmm::config::{BackendSlot, NicConfig};
use rebound_vmm::{Vm, VmOutcome};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x15];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GUEST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const HOST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
const GUEST_NET: &str = "ip=10.0.2.15/24 gw=10.0.2.2";
const MTU: u16 = 1500;
/// Generous: the machine may be loaded; every wait ends as soon as its event happens.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The host end of the NIC as a smoltcp device.
struct Wire {
    sock: UnixDatagram,
    buf: Vec<u8>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a UnixDatagram);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        // A full socket drops the frame, as a wire would; TCP sends it again.
        let _ = self.0.send(&frame);
        r
    }
}

impl phy::Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: NetInstant) -> Option<(Rx, Tx<'_>)> {
        let n = self.sock.recv(&mut self.buf).ok()?;
        Some((Rx(self.buf[..n].to_vec()), Tx(&self.sock)))
    }

    fn transmit(&mut self, _: NetInstant) -> Option<Tx<'_>> {
        Some(Tx(&self.sock))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(MTU) + 14;
        caps
    }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, 1000) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// smoltcp on the host: the guest's peer.
struct Peer {
    iface: Interface,
    sockets: SocketSet<'static>,
    wire: Wire,
    t0: Instant,
    next_port: u16,
}

impl Peer {
    fn new(sock: UnixDatagram) -> Peer {
        sock.set_nonblocking(true).unwrap();
        let mut wire = Wire {
            sock,
            buf: vec![0u8; 65536],
        };
        let t0 = Instant::now();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(HOST_MAC)));
        let mut iface = Interface::new(config, &mut wire, NetInstant::from_millis(0));
        iface.update_ip_addrs(|a| a.push(IpCidr::new(HOST_IP.into(), 24)).unwrap());
        Peer {
            iface,
            sockets: SocketSet::new(Vec::new()),
            wire,
            t0,
            next_port: 40000,
        }
    }

    fn now(&self) -> NetInstant {
        NetInstant::from_micros(self.t0.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
    }

    /// Polls until `done` holds, waiting for frames (or smoltcp's next timer) in between;
    /// panics with `what` after [`TIMEOUT`].
    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Peer) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.poll();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out: {what}");
            let now = self.now();
            let delay = self
                .iface
                .poll_delay(now, &self.sockets)
                .map_or(Duration::from_millis(5), |d| {
                    Duration::from_micros(d.total_micros()).min(Duration::from_millis(5))
                });
            wait_readable(self.wire.sock.as_raw_fd(), delay);
        }
    }

    fn socket(&self) -> tcp::Socket<'static> {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; 65536]),
            tcp::SocketBuffer::new(vec![0u8; 65536]),
        )
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        let mut s = self.socket();
        self.next_port += 1;
        s.connect(self.iface.context(), (GUEST_IP, port), self.next_port)
            .unwrap();
        self.sockets.add(s)
    }

    fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

/// One echo client: sends `data`, reads it back, then closes (or aborts halfway).
struct Client {
    h: SocketHandle,
    data: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
    /// Close right after sending everything, before reading the echo (a half-close).
    close_early: bool,
    /// Abort (RST) after this many bytes came back.
    abort_after: Option<usize>,
    /// Keep the connection open once everything came back (more data may follow).
    hold_open: bool,
    done: bool,
}

impl Client {
    fn new(peer: &mut Peer, port: u16, seed: u8, len: usize) -> Client {
        Client {
            h: peer.connect(port),
            data: (0..len)
                .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                .collect(),
            sent: 0,
            got: Vec::new(),
            close_early: false,
            abort_after: None,
            hold_open: false,
            done: false,
        }
    }

    /// One step; whether it is finished (everything echoed and the guest closed too).
    fn step(&mut self, peer: &mut Peer) -> bool {
        if self.done {
            return true;
        }
        let s = peer.tcp(self.h);
        if s.can_send() && self.sent < self.data.len() {
            self.sent += s.send_slice(&self.data[self.sent..]).unwrap();
            if self.sent == self.data.len() && self.close_early {
                s.close();
            }
        }
        while s.can_recv() {
            s.recv(|b| {
                self.got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        assert!(
            self.data.starts_with(&self.got),
            "echo differs from what was sent after {} bytes",
            self.got.len()
        );
        if let Some(n) = self.abort_after
            && self.got.len() >= n
        {
            s.abort();
            self.done = true;
            return true;
        }
        if self.got.len() == self.data.len() && !self.hold_open {
            // All back: close our side; done once the guest closed its side too.
            s.close();
            if !s.may_recv() {
                self.done = true;
            }
        }
        self.done
    }
}

/// Starts the test guest with one NIC whose other end is returned, once it printed `ready`.
fn launch_with_nic(args: &str, ready: Option<&str>) -> (Vm, SharedBuffer, UnixDatagram) {
    let (vmm_end, host_end) = UnixDatagram::pair().unwrap();
    let backend = DatagramBackend::new(vmm_end, "test datagram").unwrap();
    let config = rebound_vmm::VmConfig {
        nics: vec![NicConfig {
            mac: GUEST_MAC,
            mtu: MTU,
            backend: BackendSlot::new(Box::new(backend)),
            host: String::new(),
        }],
        ..config(args, 1, None)
    };
    let (vm, out) = launch(&config);
    if let Some(ready) = ready {
        assert!(
            wait_for(&out, TIMEOUT, |t| t.contains(ready)
                || vm.outcome().is_some()),
            "the guest never said {ready:?}: {}",
            out.text()
        );
        assert!(vm.outcome().is_none(), "{:?}: {}", vm.outcome(), out.text());
    }
    (vm, out, host_end)
}

fn echo_guest() -> (Vm, SharedBuffer, Peer) {
    let (vm, out, sock) = launch_with_nic(&format!("net-echo 7 16 {GUEST_NET}"), Some("listening"));
    (vm, out, Peer::new(sock))
}

/// Asks the guest to shut down and checks it ends cleanly; returns its output.
fn shut_down(vm: &Vm, out: &SharedBuffer) -> String {
    vm.request_shutdown().unwrap();
    let outcome = vm.wait_timeout(TIMEOUT);
    let text = out.text();
    assert_eq!(outcome, Some(VmOutcome::Exited { status: 0 }), "{text}");
    text
}

/// Runs clients to completion.
fn run_clients(peer: &mut Peer, clients: &mut [Client]) {
    peer.run_until("every client echoed and closed", |p| {
        clients.iter_mut().fold(true, |all, c| c.step(p) & all)
    });
}

fn counter(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .find_map(|w| {
            let v = w.strip_prefix(key)?.strip_prefix('=')?;
            v.trim_end_matches([';', ',']).parse().ok()
        })
        .unwrap_or_else(|| panic!("no {key}= in {text}"))
}

#[test]
fn echo_serves_many_clients_at_once() {
    let (vm, out, mut peer) = echo_guest();
    // Eight at once, of different sizes (up to many windows' worth), one closing its side as
    // soon as it has sent everything.
    let sizes = [1, 100, 1460, 3000, 20_000, 65_536, 200_000, 50_000];
    let mut clients: Vec<Client> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Client::new(&mut peer, 7, i as u8 + 3, n))
        .collect();
    clients[5].close_early = true;
    run_clients(&mut peer, &mut clients);
    let total: usize = sizes.iter().sum();

    // A second wave after the first: the listener still accepts (sockets are recycled).
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::new(&mut peer, 7, i + 50, 10_000))
        .collect();
    run_clients(&mut peer, &mut clients);

    let text = shut_down(&vm, &out);
    assert!(text.contains("net-echo done"), "{text}");
    assert_eq!(counter(&text, "connections"), 12, "{text}");
    assert_eq!(counter(&text, "bytes") as usize, total + 40_000, "{text}");
    assert_eq!(counter(&text, "errors"), 0, "{text}");
    let m = vm.metrics();
    assert_eq!(m.interrupts_injected, 0);
    let nic = &vm.nic_stats()[0];
    assert_eq!(nic.ring_errors, 0, "{nic:?}");
    assert_eq!(nic.rx_no_buffer, 0, "{nic:?}");
    eprintln!(
        "echo: {} frames in, {} out, {} wake-ups, {} exits ({:?})",
        nic.rx_frames, nic.tx_frames, nic.wakeups, m.exits.io_out, m.hypercalls
    );
}

#[test]
fn client_that_aborts_or_never_finishes_does_not_disturb_others() {
    let (vm, out, mut peer) = echo_guest();
    let mut clients = vec![
        Client::new(&mut peer, 7, 7, 100_000),
        Client::new(&mut peer, 7, 9, 100_000),
        Client::new(&mut peer, 7, 11, 30_000),
    ];
    clients[0].abort_after = Some(10_000);
    run_clients(&mut peer, &mut clients);
    // One that connects and goes away without a word (its socket is simply forgotten).
    let ghost = peer.connect(7);
    peer.run_until("the ghost connection", |p| p.tcp(ghost).may_send());
    peer.sockets.remove(ghost);
    // The guest still serves new clients.
    let mut clients = vec![Client::new(&mut peer, 7, 13, 5_000)];
    run_clients(&mut peer, &mut clients);
    let text = shut_down(&vm, &out);
    assert_eq!(counter(&text, "connections"), 5, "{text}");
    // The aborted connection's read or write failed; nothing else did.
    assert!(counter(&text, "errors") <= 1, "{text}");
}

#[test]
fn idle_connection_blocks_in_the_vmm() {
    let (vm, out, mut peer) = echo_guest();
    let mut c = vec![Client::new(&mut peer, 7, 5, 1000)];
    // Echo once without closing: keep the connection open.
    c[0].hold_open = true;
    peer.run_until("the first echo", |p| {
        c[0].step(p);
        c[0].got.len() == 1000
    });
    let before = vm.metrics();
    let t0 = Instant::now();
    // A measurement window, not a wait for an event: nothing happens on the wire now.
    std::thread::sleep(Duration::from_millis(500));
    let after = vm.metrics();
    let secs = t0.elapsed().as_secs_f64();
    let delta = |name: &str| {
        after.hypercalls.get(name).copied().unwrap_or(0)
            - before.hypercalls.get(name).copied().unwrap_or(0)
    };
    let exits = after.exits.io_out - before.exits.io_out;
    eprintln!(
        "idle {secs:.2}s with an open connection: {exits} exits, {} blocks, {} clock reads",
        delta("block"),
        delta("clock_monotonic")
    );
    assert!(delta("block") >= 1, "the guest never blocked");
    // A guest that spun would make an exit per clock read, thousands per second.
    assert!(
        (exits as f64) < 200.0 * secs,
        "{exits} exits in {secs:.2}s while idle: {:?}",
        after.hypercalls
    );
    // Still alive: finish the echo.
    c[0].data.extend_from_slice(&[7u8; 500]);
    c[0].hold_open = false;
    run_clients(&mut peer, &mut c);
    shut_down(&vm, &out);
}

/// A frame from the host to the guest with `payload` after the Ethernet header.
fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header (20 bytes, checksum right unless `bad_sum`) for `proto` and `len` bytes
/// of payload, with `ihl` words of header.
fn ipv4(proto: u8, payload: &[u8], ihl: u8, total: Option<u16>, bad_sum: bool) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | ihl;
    let len = total.unwrap_or(20 + payload.len() as u16);
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&HOST_IP.octets());
    h[16..20].copy_from_slice(&GUEST_IP.octets());
    let mut sum = 0u32;
    for w in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = if bad_sum { 0x1234 } else { !(sum as u16) };
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

#[test]
fn hostile_frames_leave_the_guest_serving() {
    let (vm, out, mut peer) = echo_guest();
    // A connection open before the storm, still working after it.
    let mut before = vec![Client::new(&mut peer, 7, 21, 2000)];
    before[0].hold_open = true;
    peer.run_until("the first echo", |p| {
        before[0].step(p);
        before[0].got.len() == 2000
    });
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut frames: Vec<Vec<u8>> = Vec::new();
    // Runts, down to an empty datagram.
    for len in 0..14 {
        frames.push(GUEST_MAC.iter().copied().cycle().take(len).collect());
    }
    // Oversized: past MTU + 18 (the VMM drops them), and up to 64 KiB.
    for len in [1519usize, 1600, 9000, 65_000] {
        frames.push(ether(0x0800, &vec![0x45; len - 14]));
    }
    // Garbage of every size, to us and to everyone.
    for i in 0..200 {
        let len = 14 + (next() % 1504) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 {
            f[..6].copy_from_slice(&GUEST_MAC);
        } else {
            f[..6].copy_from_slice(&[0xff; 6]);
        }
        frames.push(f);
    }
    // Plausible headers with lies in them: ARP and IPv4 cut short, IPv4 lengths and header
    // lengths that do not add up, bad checksums, TCP with impossible data offsets.
    frames.push(ether(0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]));
    frames.push(ether(0x0806, &[0xff; 28]));
    frames.push(ether(0x0800, &[0x45]));
    frames.push(ether(0x0800, &ipv4(6, &[0; 20], 5, Some(60_000), false)));
    frames.push(ether(0x0800, &ipv4(6, &[0; 20], 15, None, false)));
    frames.push(ether(0x0800, &ipv4(6, &[0; 20], 2, None, false)));
    frames.push(ether(0x0800, &ipv4(6, &[0; 20], 5, None, true)));
    frames.push(ether(0x0800, &ipv4(6, &[0; 20], 5, Some(10), false)));
    let mut tcp = vec![0u8; 20];
    tcp[2..4].copy_from_slice(&7u16.to_be_bytes());
    for offset in [0u8, 1, 4, 15] {
        tcp[12] = offset << 4;
        tcp[13] = 0x02; // SYN
        frames.push(ether(0x0800, &ipv4(6, &tcp, 5, None, false)));
    }
    frames.push(ether(0x0800, &ipv4(1, &[8, 0, 0, 0], 5, None, false)));
    frames.push(ether(0x0800, &ipv4(17, &[0; 3], 5, None, false)));
    let sock = &peer.wire.sock;
    let mut sent = 0;
    for f in &frames {
        // The socket is non-blocking: a full one means the VMM is behind; give it a moment.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match sock.send(f) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the VMM stopped reading");
                    std::thread::yield_now();
                }
                // Larger than the socket allows: fine, it never reached anyone.
                Err(_) => break,
            }
        }
        sent += 1;
    }
    assert_eq!(sent, frames.len());
    // The old connection and a new one both still echo.
    before[0].data.extend_from_slice(&[1u8; 3000]);
    before[0].hold_open = false;
    let mut clients = vec![before.pop().unwrap(), Client::new(&mut peer, 7, 23, 30_000)];
    run_clients(&mut peer, &mut clients);
    let nic = &vm.nic_stats()[0];
    assert!(nic.rx_too_big >= 3, "{nic:?}");
    assert_eq!(nic.ring_errors, 0, "{nic:?}");
    let text = shut_down(&vm, &out);
    assert_eq!(counter(&text, "connections"), 2, "{text}");
    // The VMM drops runts (shorter than an Ethernet header) before the guest sees them.
    assert!(nic.rx_runts >= 1, "{nic:?}");
    assert_eq!(counter(&text, "bad_len"), 0, "{text}");
}

#[test]
fn a_hostile_guest_breaks_only_its_own_nic() {
    // A well-behaved neighbour serves echo before, while and after the other floods.
    let (good, good_out, mut peer) = echo_guest();
    let echo_round = |peer: &mut Peer, round: usize| {
        let mut clients = vec![Client::new(peer, 7, (round % 250) as u8 + 3, 4_000)];
        run_clients(peer, &mut clients);
    };
    echo_round(&mut peer, 0);
    // The hostile guest's wire is never read: once its socket is full, frames are dropped.
    let (bad, bad_out, _wire) = launch_with_nic("net-hostile 20000", None);
    let mut rounds = 1;
    while bad.outcome().is_none() || rounds < 4 {
        echo_round(&mut peer, rounds);
        rounds += 1;
    }
    let text = bad_out.text();
    assert_eq!(bad.wait(), VmOutcome::Exited { status: 0 }, "{text}");
    assert!(
        text.contains(&format!(
            "rings in system memory: {}",
            rebound_abi::errno::EFAULT
        )),
        "{text}"
    );
    assert!(text.contains("net-hostile: rings broken"), "{text}");
    assert!(text.contains("net-hostile done: frames=20000"), "{text}");
    let s = &bad.nic_stats()[0];
    assert_eq!(s.ring_errors, 1, "{s:?}");
    assert_eq!(
        s.tx_frames + s.tx_dropped,
        20_000,
        "every frame sent or counted: {s:?}"
    );
    assert!(s.tx_dropped > 0, "the unread wire dropped frames: {s:?}");
    let text = shut_down(&good, &good_out);
    assert_eq!(counter(&text, "connections"), rounds as u64, "{text}");
    assert_eq!(counter(&text, "errors"), 0, "{text}");
    assert_eq!(good.nic_stats()[0].ring_errors, 0);
}

#[test]
fn broken_ring_is_seen_by_the_guest_and_set_up_again() {
    let (vm, out, sock) = launch_with_nic(
        &format!("net-break 7 4 {GUEST_NET}"),
        Some("rings set up again"),
    );
    let mut peer = Peer::new(sock);
    let nic = &vm.nic_stats()[0];
    assert_eq!(nic.ring_errors, 1, "{nic:?}");
    let mut clients = vec![Client::new(&mut peer, 7, 17, 20_000)];
    run_clients(&mut peer, &mut clients);
    let text = shut_down(&vm, &out);
    assert!(text.contains("net-echo: the NIC's rings broke"), "{text}");
    assert_eq!(counter(&text, "connections"), 1, "{text}");
    assert_eq!(vm.nic_stats()[0].ring_errors, 1);
}

#[test]
fn guest_connects_out_to_a_host_server() {
    let bytes = 300_000;
    let (vm, out, sock) = launch_with_nic(
        &format!("net-send 10.0.2.2 9000 {bytes} {GUEST_NET}"),
        // It connects at once: the peer must already be there to answer.
        None,
    );
    let mut peer = Peer::new(sock);
    // An echo server on the host, port 9000.
    let mut s = peer.socket();
    s.listen(9000).unwrap();
    let server = peer.sockets.add(s);
    let mut echoed = 0usize;
    let mut pending: Vec<u8> = Vec::new();
    peer.run_until("the guest's connection to end", |p| {
        let s = p.tcp(server);
        while s.can_recv() && pending.len() < 65536 {
            s.recv(|b| {
                pending.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        if s.can_send() && !pending.is_empty() {
            let n = s.send_slice(&pending).unwrap();
            pending.drain(..n);
            echoed += n;
        }
        if !s.may_recv() && pending.is_empty() && s.state() == tcp::State::CloseWait {
            s.close();
        }
        echoed == bytes && !s.is_open() || vm.outcome().is_some()
    });
    let outcome = vm.wait_timeout(TIMEOUT);
    let text = out.text();
    assert_eq!(outcome, Some(VmOutcome::Exited { status: 0 }), "{text}");
    assert!(
        text.contains(&format!("net-send ok {bytes} bytes")),
        "{text}"
    );
    assert_eq!(counter(&text, "connected"), 1, "{text}");
}

#[test]
fn connect_to_nobody_times_out() {
    // Nobody answers ARP for 10.0.2.99: the SYN never leaves; the connect gives up.
    let (vm, out, _sock) = launch_with_nic(
        &format!("net-send 10.0.2.99 9000 1000 300 {GUEST_NET}"),
        None,
    );
    let outcome = vm.wait_timeout(TIMEOUT);
    let text = out.text();
    assert_eq!(outcome, Some(VmOutcome::Exited { status: 1 }), "{text}");
    assert!(
        text.contains("net-send failed: connection timed out"),
        "{text}"
    );
}

#[test]
fn frames_are_batched_both_ways() {
    let frames = 2000usize;
    let (vm, out, sock) =
        launch_with_nic(&format!("net-reflect {frames}"), Some("net-reflect ready"));
    sock.set_nonblocking(true).unwrap();
    let before = vm.metrics();
    let mut got: BTreeMap<u32, usize> = BTreeMap::new();
    let mut buf = vec![0u8; 2048];
    let mut sent = 0usize;
    let deadline = Instant::now() + TIMEOUT;
    // Bursts of 50 frames, each reflected back; the next burst once this one came back.
    while got.len() < frames {
        assert!(
            Instant::now() < deadline,
            "only {} of {sent} frames came back: {:?} {:?}\n{}",
            got.len(),
            vm.nic_stats(),
            vm.metrics().hypercalls,
            out.text()
        );
        if sent == got.len() {
            for _ in 0..50 {
                let mut f = ether(0x88b5, &(sent as u32).to_be_bytes());
                f.resize(60 + sent % 1000, 0xab);
                sock.send(&f).unwrap();
                sent += 1;
            }
        }
        wait_readable(sock.as_raw_fd(), Duration::from_millis(100));
        while let Ok(n) = sock.recv(&mut buf) {
            let f = &buf[..n];
            assert_eq!(&f[..6], &HOST_MAC, "reflected to the sender");
            assert_eq!(&f[6..12], &GUEST_MAC, "from the guest");
            let seq = u32::from_be_bytes(f[14..18].try_into().unwrap());
            assert_eq!(n, 60 + seq as usize % 1000);
            assert!(got.insert(seq, n).is_none(), "frame {seq} came back twice");
        }
    }
    assert_eq!(
        vm.wait_timeout(TIMEOUT),
        Some(VmOutcome::Exited { status: 0 })
    );
    let after = vm.metrics();
    let text = out.text();
    let exits = after.exits.io_out - before.exits.io_out;
    let nic = &vm.nic_stats()[0];
    eprintln!(
        "{frames} frames reflected: {exits} exits ({} blocks), {} wake-ups, {} doorbells, {} batches",
        after.hypercalls.get("block").copied().unwrap_or(0)
            - before.hypercalls.get("block").copied().unwrap_or(0),
        nic.wakeups,
        counter(&text, "doorbells"),
        counter(&text, "batches"),
    );
    assert_eq!(nic.rx_frames as usize, frames);
    assert_eq!(nic.tx_frames as usize, frames);
    // No busy loop: at most one block per wake-up and one wake-up per delivered batch (in
    // practice about one per burst of 50; a loaded host splits bursts), a few timeouts; and one
    // doorbell per batch, not per frame.
    assert!(
        exits <= frames as u64 + 20,
        "{exits} exits for {frames} frames"
    );
    assert!(
        counter(&text, "doorbells") <= counter(&text, "batches"),
        "{text}"
    );
}

#[test]
fn network_modes_without_a_nic_say_so() {
    let (outcome, text, _) = run(&format!("net-echo 7 {GUEST_NET}"), 1, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 2 }, "{text}");
    assert!(text.contains("NIC 0 setup failed: ENODEV"), "{text}");
    let (outcome, text, _) = run("net-echo 7", 1, None);
    assert_eq!(outcome, VmOutcome::Exited { status: 2 }, "{text}");
    assert!(text.contains("needs ip="), "{text}");
}
