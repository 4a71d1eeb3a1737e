//! Test modes for the network device (ABI 1.4): a TCP echo server, a TCP client, and a frame
//! reflector that uses the NIC without TCP/IP. IPv4 settings come from the command line
//! (`ip=A.B.C.D/P`, optional `gw=A.B.C.D`); positional arguments are the other words.

use alloc::rc::Rc;
use alloc::vec;
use core::cell::Cell;
use core::sync::atomic::{AtomicU32, Ordering};

use rebound_guest::dispatch::{Dispatcher, Stats};
use rebound_guest::net::{self, Error, Ipv4Addr, Ipv4Config, Nic, Stack, TcpListener, TcpStream};
use rebound_guest::{Cpu, hypercall, println};

const RING_ENTRIES: u32 = 256;

/// Positional argument `i` (words with `=` do not count), or `default`.
fn pos<'a>(cpu: &'a Cpu, i: usize, default: &'a str) -> &'a str {
    cpu.args()
        .split_whitespace()
        .filter(|w| !w.contains('='))
        .nth(i)
        .unwrap_or(default)
}

fn num(cpu: &Cpu, i: usize, default: u64) -> u64 {
    pos(cpu, i, "").parse().unwrap_or(default)
}

pub fn run(mode: &str, cpu: &Cpu) -> Option<i32> {
    Some(match mode {
        "net-echo" => echo(cpu, Service::Echo, false),
        "net-break" => echo(cpu, Service::Echo, true),
        "net-discard" => echo(cpu, Service::Discard, false),
        "net-chargen" => echo(cpu, Service::Chargen(num(cpu, 3, 1 << 20)), false),
        "net-send" => send(cpu),
        "net-reflect" => reflect(cpu),
        "net-hostile" => hostile(cpu),
        _ => return None,
    })
}

fn nic() -> Option<Nic> {
    match Nic::setup(0, RING_ENTRIES, RING_ENTRIES) {
        Ok(n) => Some(n),
        Err(e) => {
            println!("NIC 0 setup failed: {e} ({} NICs)", net::nics().len());
            None
        }
    }
}

fn stack(cpu: &Cpu) -> Option<Rc<Stack>> {
    let Some(cfg) = Ipv4Config::from_args(cpu.args()) else {
        println!("needs ip=A.B.C.D/P");
        return None;
    };
    match Stack::new(nic()?, cfg.addr, cfg.prefix, cfg.gateway) {
        Ok(s) => Some(s),
        Err(e) => {
            println!("network setup failed: {e}");
            None
        }
    }
}

fn report(what: &str, stack: &Stack, d: &Stats) {
    let s = stack.stats();
    let n = stack.nic().stats();
    println!(
        "{what}: dispatcher polls={} blocks={} shutdown={}; stack source_polls={} polls={} \
         clock_reads={} accepted={} connected={}; nic tx={} rx={} doorbells={} tx_dropped={} \
         runts={} bad_len={} bad_index={}",
        d.polls,
        d.blocks,
        d.shutdown,
        s.source_polls,
        s.polls,
        s.clock_reads,
        s.accepted,
        s.connected,
        n.tx_frames,
        n.rx_frames,
        n.doorbells,
        n.tx_dropped,
        n.rx_runts,
        n.rx_bad_len,
        n.bad_index
    );
}

#[derive(Default)]
struct Counters {
    connections: Cell<u64>,
    bytes: Cell<u64>,
    errors: Cell<u64>,
}

/// What a TCP server mode does with each connection.
#[derive(Clone, Copy)]
enum Service {
    /// Sends back what it reads.
    Echo,
    /// Reads to the end and drops the bytes (one-way throughput, host to guest).
    Discard,
    /// Sends this many bytes of a pattern, then closes (one-way throughput, guest to host).
    Chargen(u64),
}

/// `net-echo [PORT] [BACKLOG]`: serves TCP echo on PORT (7) to any number of clients at once,
/// BACKLOG (16) of them connecting at the same time, until the host asks for a shutdown.
/// `net-break` first damages its own TX ring (a producer a ring ahead): the VMM marks it
/// broken, the accept fails with `RingBroken`, the stack is reset, and serving goes on.
/// `net-discard [PORT] [BACKLOG]` reads and drops; `net-chargen [PORT] [BACKLOG] [BYTES]`
/// sends BYTES (1 MiB) to each client, byte k being `pattern(k % 16384)`, and closes.
fn echo(cpu: &Cpu, service: Service, sabotage: bool) -> i32 {
    let port = num(cpu, 1, 7) as u16;
    let backlog = num(cpu, 2, 16) as usize;
    let Some(stack) = stack(cpu) else { return 2 };
    let listener = match TcpListener::bind_with_backlog(&stack, port, backlog) {
        Ok(l) => l,
        Err(e) => {
            println!("net-echo: cannot listen on port {port}: {e}");
            return 1;
        }
    };
    let counters = Rc::new(Counters::default());
    let mut d = Dispatcher::new();
    d.add_source(stack.clone());
    let spawner = d.spawner();
    let c = counters.clone();
    let st = stack.clone();
    d.spawn(async move {
        loop {
            match listener.accept().await {
                Ok(conn) => {
                    c.connections.set(c.connections.get() + 1);
                    match service {
                        Service::Echo => spawner.spawn(serve(conn, c.clone())),
                        Service::Discard => spawner.spawn(discard(conn, c.clone())),
                        Service::Chargen(n) => spawner.spawn(chargen(conn, n, c.clone())),
                    }
                }
                Err(Error::RingBroken) => {
                    println!("net-echo: the NIC's rings broke");
                    if let Err(e) = st.reset() {
                        println!("net-echo: reset failed: {e}");
                        return;
                    }
                    println!("net-echo: rings set up again");
                }
                Err(e) => {
                    println!("net-echo: accept failed: {e}");
                    return;
                }
            }
        }
    });
    if sabotage {
        let area = stack.nic().ring_area();
        d.spawn(async move {
            // SAFETY: the first word of this NIC's ring header (the TX producer), in this
            // guest's own memory; the VMM reads it atomically.
            let producer = unsafe { &*(area as *const AtomicU32) };
            producer.fetch_add(1000, Ordering::Release);
            println!("net-break: TX producer moved a ring ahead");
        });
    }
    println!(
        "{} listening on {}:{port} backlog {backlog}",
        pos(cpu, 0, "net-echo"),
        stack.addr()
    );
    let stats = d.run();
    println!(
        "net-echo done: connections={} bytes={} errors={}",
        counters.connections.get(),
        counters.bytes.get(),
        counters.errors.get()
    );
    report("net-echo", &stack, &stats);
    0
}

async fn serve(conn: TcpStream, c: Rc<Counters>) {
    let mut buf = vec![0u8; 4096];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    c.errors.set(c.errors.get() + 1);
                    return;
                }
                c.bytes.set(c.bytes.get() + n as u64);
            }
            Err(_) => {
                c.errors.set(c.errors.get() + 1);
                return;
            }
        }
    }
    conn.close();
}

async fn discard(conn: TcpStream, c: Rc<Counters>) {
    let mut buf = vec![0u8; 16384];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => c.bytes.set(c.bytes.get() + n as u64),
            Err(_) => {
                c.errors.set(c.errors.get() + 1);
                return;
            }
        }
    }
    conn.close();
}

async fn chargen(conn: TcpStream, total: u64, c: Rc<Counters>) {
    let chunk: alloc::vec::Vec<u8> = (0..16384).map(pattern).collect();
    let mut sent = 0u64;
    while sent < total {
        // Byte k of the stream is pattern(k % 16384).
        let n = (total - sent).min(chunk.len() as u64) as usize;
        if conn.write_all(&chunk[..n]).await.is_err() {
            c.errors.set(c.errors.get() + 1);
            return;
        }
        sent += n as u64;
        c.bytes.set(sent);
    }
    conn.close();
    let _ = conn.flush().await;
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (i >> 8) as u8
}

/// `net-send ADDR PORT [BYTES] [TIMEOUT_MS]`: connects to ADDR:PORT (giving up after TIMEOUT_MS,
/// 30000), sends BYTES (65536) of a pattern while reading the echo back, checks it, closes;
/// exits 0 if all came back.
fn send(cpu: &Cpu) -> i32 {
    let Ok(addr) = pos(cpu, 1, "").parse::<Ipv4Addr>() else {
        println!("net-send: needs ADDR PORT");
        return 2;
    };
    let port = num(cpu, 2, 7) as u16;
    let total = num(cpu, 3, 65536) as usize;
    let timeout_ms = num(cpu, 4, 30_000);
    let Some(stack) = stack(cpu) else { return 2 };
    let result = Rc::new(Cell::new(None::<Result<usize, Error>>));
    let mut d = Dispatcher::new();
    d.add_source(stack.clone());
    let spawner = d.spawner();
    let (st, r) = (stack.clone(), result.clone());
    d.spawn(async move {
        let conn = match TcpStream::connect_timeout(&st, addr, port, timeout_ms * 1_000_000).await {
            Ok(c) => Rc::new(c),
            Err(e) => {
                r.set(Some(Err(e)));
                return;
            }
        };
        println!("net-send connected from port {}", conn.local_port());
        let writer = conn.clone();
        spawner.spawn(async move {
            let data: alloc::vec::Vec<u8> = (0..total).map(pattern).collect();
            for chunk in data.chunks(3000) {
                if writer.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        while got < total {
            match conn.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if buf[..n]
                        .iter()
                        .enumerate()
                        .any(|(i, b)| *b != pattern(got + i))
                    {
                        println!("net-send: wrong bytes at {got}");
                        break;
                    }
                    got += n;
                }
                Err(e) => {
                    r.set(Some(Err(e)));
                    return;
                }
            }
        }
        conn.close();
        // Everything written was acknowledged, and the peer's FIN arrives.
        let _ = conn.flush().await;
        while let Ok(1..) = conn.read(&mut buf).await {}
        r.set(Some(Ok(got)));
    });
    let stats = d.run();
    report("net-send", &stack, &stats);
    match result.get() {
        Some(Ok(n)) if n == total => {
            println!("net-send ok {n} bytes");
            0
        }
        Some(Ok(n)) => {
            println!("net-send: only {n} of {total} bytes came back");
            1
        }
        Some(Err(e)) => {
            println!("net-send failed: {e}");
            1
        }
        None => {
            println!("net-send: stopped before the end");
            1
        }
    }
}

/// `net-reflect [FRAMES]`: sends every received frame back with its MAC addresses swapped,
/// without TCP/IP, until FRAMES (0: no limit) were reflected or the host asks for a shutdown;
/// blocks in the VMM between batches.
fn reflect(cpu: &Cpu) -> i32 {
    let limit = num(cpu, 1, 0);
    let Some(nic) = nic() else { return 2 };
    let mac = nic.mac();
    println!(
        "net-reflect ready mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} mtu {}",
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        nic.mtu()
    );
    let (mut frames, mut batches, mut blocks, mut full) = (0u64, 0u64, 0u64, 0u64);
    while limit == 0 || frames < limit {
        if rebound_guest::boot::shutdown_requested() {
            break;
        }
        if nic.broken() {
            println!("net-reflect: rings broken");
            return 1;
        }
        let mut n = 0;
        while let Some(f) = nic.recv() {
            if nic.tx_free() == 0 {
                // Let the VMM take what was queued.
                nic.flush();
                full += 1;
                hypercall::yield_now();
            }
            let len = f.len();
            let _ = nic.send_with(len, |out| {
                out.copy_from_slice(&f);
                out[..6].copy_from_slice(&f[6..12]);
                out[6..12].copy_from_slice(&mac);
            });
            n += 1;
        }
        if n > 0 {
            nic.flush();
            frames += n;
            batches += 1;
            continue;
        }
        // Frames often come in bursts: look for a while before blocking (as the dispatcher
        // does), then ask for a wake-up and look once more.
        if (0..200).any(|_| {
            (0..16).for_each(|_| core::hint::spin_loop());
            nic.rx_ready()
        }) {
            continue;
        }
        nic.set_idle(true);
        if !nic.rx_ready() {
            blocks += 1;
            hypercall::block(100_000_000);
        }
        nic.set_idle(false);
    }
    if !nic.drain_tx(5_000_000_000) {
        println!("net-reflect: the VMM did not take the last frames");
    }
    let s = nic.stats();
    println!(
        "net-reflect done frames={frames} batches={batches} blocks={blocks} ring_full={full} \
         doorbells={} runts={} tx_dropped={}",
        s.doorbells, s.rx_runts, s.tx_dropped
    );
    0
}

/// Rings the NIC 0 doorbell whether or not the SDK queued anything.
fn doorbell() {
    // SAFETY: an `out` to the NIC doorbell port (an ioeventfd in the VMM).
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") rebound_guest::abi::port::NET_DOORBELL,
                         in("eax") 0u32, options(nostack, preserves_flags))
    };
}

/// Waits (blocking in the VMM in short steps) until `f` holds, up to `ms`.
fn wait_ms(ms: u64, f: impl Fn() -> bool) -> bool {
    let start = rebound_guest::time::monotonic_ns();
    while !f() {
        if rebound_guest::time::monotonic_ns() - start > ms * 1_000_000 {
            return false;
        }
        hypercall::block(100_000);
    }
    true
}

/// `net-hostile [FRAMES]`: what a hostile guest does to its NIC, each step printed: rings
/// placed in system memory (refused), a TX descriptor naming system memory (the VMM breaks
/// the rings), then, set up again, FRAMES (20000) full-size frames as fast as the ring takes
/// them. Exits 0 if the VMM refused, broke and then carried on as the ABI says.
fn hostile(cpu: &Cpu) -> i32 {
    use rebound_guest::abi::{errno, net as abi_net, nr};
    let frames = num(cpu, 1, 20_000);
    // The page tables and system structures sit below the first user page.
    let r = hypercall::raw(nr::NET_SETUP, &[0, 0x1000, 8, 8, 0]);
    println!("net-hostile: rings in system memory: {r}");
    if r != errno::EFAULT {
        return 1;
    }
    let Some(nic) = nic() else { return 2 };
    let area = nic.ring_area();
    // SAFETY: this NIC's ring header and TX descriptors, in this guest's own memory; the VMM
    // reads them atomically.
    unsafe {
        let producer = &*(area as *const AtomicU32);
        let at = producer.load(Ordering::Relaxed);
        let desc = (area + abi_net::tx_desc(at % RING_ENTRIES)) as *mut abi_net::NetDesc;
        core::ptr::write_volatile(
            desc,
            abi_net::NetDesc {
                addr: 0x10,
                len: 64,
                flags: 0,
            },
        );
        producer.store(at.wrapping_add(1), Ordering::Release);
    }
    doorbell();
    if !wait_ms(10_000, || nic.broken()) {
        println!("net-hostile: the VMM took a descriptor naming system memory");
        return 1;
    }
    println!("net-hostile: rings broken");
    if let Err(e) = nic.reset() {
        println!("net-hostile: reset failed: {e}");
        return 1;
    }
    let len = nic.max_frame();
    let mac = nic.mac();
    let mut sent = 0u64;
    while sent < frames {
        if nic.tx_free() == 0 {
            nic.flush();
            if !wait_ms(10_000, || nic.tx_free() > 0 || nic.broken()) || nic.broken() {
                println!("net-hostile: the ring stopped moving after {sent} frames");
                return 1;
            }
        }
        let _ = nic.send_with(len, |f| {
            f[..6].copy_from_slice(&[0xff; 6]);
            f[6..12].copy_from_slice(&mac);
            f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            f[14..22].copy_from_slice(&sent.to_le_bytes());
        });
        sent += 1;
    }
    if !nic.drain_tx(10_000_000_000) {
        println!("net-hostile: frames still queued");
        return 1;
    }
    println!("net-hostile done: frames={sent}");
    0
}
