//! Serves the `kv` engine over TCP on the host, for trying real clients by hand:
//!
//! ```text
//! cargo run -p rebound-kv --example serve -- 6379 [maxmemory-bytes]
//! redis-cli -p 6379 ping
//! ```

#[path = "../tests/harness/mod.rs"]
mod harness;

use rebound_kv::Store;

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(6379);
    let store = match args.next().and_then(|m| m.parse().ok()) {
        Some(limit) => Store::with_limit(limit),
        None => Store::new(),
    };
    let server = harness::Server::start(store, port).expect("bind 127.0.0.1");
    println!("rebound-kv listening on 127.0.0.1:{}", server.port);
    loop {
        std::thread::park();
    }
}
