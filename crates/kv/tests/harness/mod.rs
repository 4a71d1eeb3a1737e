//! A host-side TCP server around the engine, so that real Redis clients (`redis-cli`,
//! `redis-benchmark`) can talk to it: std networking on 127.0.0.1, one thread per connection,
//! one `Mutex<Store>`, a timer thread for active expiry. It stands in for the guest's network
//! stack; the engine calls are the same.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rebound_kv::{Connection, Status, Store};

/// Connections served at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 256;
/// How often the timer drops expired keys, and how many at most per tick.
const EXPIRE_TICK: Duration = Duration::from_millis(100);
const EXPIRE_PER_TICK: usize = 1000;
/// How often an idle connection thread checks for shutdown.
const POLL: Duration = Duration::from_millis(200);

struct Shared {
    store: Mutex<Store>,
    start: Instant,
    stop: AtomicBool,
    connections: AtomicUsize,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A running server; dropping it stops it.
pub struct Server {
    pub port: u16,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serves `store` on 127.0.0.1 at an ephemeral port (or `port`, when not 0).
    pub fn start(store: Store, port: u16) -> io::Result<Server> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            start: Instant::now(),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let accept = {
            let shared = shared.clone();
            thread::spawn(move || accept_loop(&listener, &shared))
        };
        let timer = {
            let shared = shared.clone();
            thread::spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    thread::sleep(EXPIRE_TICK);
                    let now = shared.now_ms();
                    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
                    store.expire_some(now, EXPIRE_PER_TICK);
                }
            })
        };
        Ok(Server {
            port,
            shared,
            threads: vec![accept, timer],
        })
    }

    /// Number of keys in the store.
    #[allow(dead_code)]
    pub fn keys(&self) -> usize {
        self.shared
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(stream) = stream else { continue };
        if shared.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let shared = shared.clone();
        thread::spawn(move || {
            let _ = serve(stream, &shared);
            shared.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One client: read what arrives, feed it, send the replies.
fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut conn = Connection::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut input = &buf[..n];
        loop {
            let status = {
                let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
                conn.feed(input, &mut store, shared.now_ms(), &mut out)
            };
            stream.write_all(&out)?;
            out.clear();
            if status == Status::Close {
                let _ = stream.shutdown(Shutdown::Both);
                return Ok(());
            }
            if !conn.has_backlog() {
                break;
            }
            input = &[];
        }
    }
}
