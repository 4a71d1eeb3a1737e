//! The real Redis clients against the engine, over TCP on 127.0.0.1 (the host harness in
//! `harness/`): `redis-cli` (one-shot commands, commands on stdin, `--pipe` mass insertion) and
//! `redis-benchmark` (SET and GET, pipelined and not). They come from Debian's `redis-tools`;
//! without them these tests say so and pass. Every client run is bounded in time.

mod harness;

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use harness::Server;
use rebound_kv::Store;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `tool` runs here; if not, says how to get it.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipping: `{tool}` not found (install Debian's redis-tools to run this test)");
    }
    found
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `tool args` with `stdin`, killed after [`CLIENT_TIMEOUT`].
fn run(tool: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{tool} {args:?} did not finish in {CLIENT_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.join();
    let out = child.wait_with_output().expect("output");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let port = port.to_string();
    let mut all = vec!["-p", &port];
    all.extend_from_slice(args);
    let out = run("redis-cli", &all, b"");
    assert!(out.ok, "redis-cli {args:?}: {}", out.stderr);
    out.stdout
}

#[test]
fn redis_cli_commands() {
    if !have("redis-cli") {
        return;
    }
    let server = Server::start(Store::with_limit(16 << 20), 0).expect("server");
    let p = server.port;
    // One-shot commands (redis-cli prints raw replies when not on a terminal).
    let checks: &[(&[&str], &str)] = &[
        (&["PING"], "PONG\n"),
        (&["SET", "greeting", "hello world"], "OK\n"),
        (&["GET", "greeting"], "hello world\n"),
        (&["GET", "missing"], "\n"),
        (&["INCR", "n"], "1\n"),
        (&["INCRBY", "n", "41"], "42\n"),
        (&["DECR", "n"], "41\n"),
        (&["MSET", "a", "1", "b", "2", "c", "3"], "OK\n"),
        (&["MGET", "a", "b", "nope", "c"], "1\n2\n\n3\n"),
        (&["APPEND", "a", "23"], "3\n"),
        (&["GET", "a"], "123\n"),
        (&["STRLEN", "greeting"], "11\n"),
        (&["EXPIRE", "a", "100"], "1\n"),
        (&["TTL", "a"], "100\n"),
        (&["TTL", "b"], "-1\n"),
        (&["TTL", "nope"], "-2\n"),
        (&["PERSIST", "a"], "1\n"),
        (&["DBSIZE"], "5\n"),
        (&["EXISTS", "a", "b", "nope"], "2\n"),
        (&["DEL", "b", "c", "nope"], "2\n"),
        (&["KEYS", "gree*"], "greeting\n"),
        (&["DBSIZE"], "3\n"),
        (&["SELECT", "0"], "OK\n"),
        (&["CONFIG", "GET", "save"], "save\n\n"),
    ];
    for (args, want) in checks {
        assert_eq!(cli(p, args), *want, "redis-cli {args:?}");
    }
    let keys = cli(p, &["KEYS", "*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(keys, ["a", "greeting", "n"]);
    let info = cli(p, &["INFO", "keyspace"]);
    assert!(info.contains("db0:keys=3,expires=0,avg_ttl=0"), "{info}");
    // `--no-raw` shows reply types as a person sees them.
    assert_eq!(cli(p, &["--no-raw", "INCR", "n"]), "(integer) 42\n");
    assert_eq!(cli(p, &["--no-raw", "GET", "nope"]), "(nil)\n");
    let err = cli(p, &["--no-raw", "GET"]);
    assert_eq!(
        err.trim(),
        "(error) ERR wrong number of arguments for 'get' command"
    );
    // Commands on stdin, one connection.
    let script = "SET k v EX 50\nTTL k\nSET k w NX\nGET k\nDEL k\nGET k\nKEYS k*\n";
    let out = run("redis-cli", &["-p", &p.to_string()], script.as_bytes());
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, "OK\n50\n\nv\n1\n\n\n");
    // An expiry is honoured by the server's clock.
    assert_eq!(cli(p, &["SET", "short", "x", "PX", "150"]), "OK\n");
    thread::sleep(Duration::from_millis(400));
    assert_eq!(cli(p, &["EXISTS", "short"]), "0\n");
    assert_eq!(cli(p, &["FLUSHALL"]), "OK\n");
    assert_eq!(server.keys(), 0);
}

#[test]
fn redis_cli_pipe_mode() {
    if !have("redis-cli") {
        return;
    }
    let server = Server::start(Store::new(), 0).expect("server");
    const N: usize = 3000;
    let mut input = Vec::new();
    for i in 0..N {
        let (k, v) = (format!("key:{i}"), format!("value-{i}"));
        input.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
        input.extend_from_slice(b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n");
    }
    let out = run(
        "redis-cli",
        &["-p", &server.port.to_string(), "--pipe"],
        &input,
    );
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("errors: 0, replies: {}", 2 * N)),
        "{}",
        out.stdout
    );
    assert_eq!(cli(server.port, &["DBSIZE"]), format!("{}\n", N + 1));
    assert_eq!(cli(server.port, &["GET", "counter"]), format!("{N}\n"));
    assert_eq!(cli(server.port, &["GET", "key:1234"]), "value-1234\n");
}

/// `redis-benchmark -q` prints progress lines ending in `\r`, then one result per test:
/// `SET: 51020.41 requests per second, p50=0.447 msec`. Returns the requests per second.
fn rate(output: &str, test: &str) -> Option<f64> {
    output
        .split(['\r', '\n'])
        .filter_map(|line| line.trim().strip_prefix(&format!("{test}: ")))
        .filter_map(|rest| rest.split_once(" requests per second"))
        .find_map(|(n, _)| n.trim().parse().ok())
}

#[test]
fn redis_benchmark_set_get() {
    if !have("redis-benchmark") {
        return;
    }
    let server = Server::start(Store::with_limit(64 << 20), 0).expect("server");
    let port = server.port.to_string();
    for pipeline in ["16", "1"] {
        let args = [
            "-p", &port, "-q", "-n", "2000", "-t", "set,get", "-P", pipeline,
        ];
        let out = run("redis-benchmark", &args, b"");
        assert!(out.ok, "-P {pipeline}: {}\n{}", out.stdout, out.stderr);
        assert!(
            !out.stderr.contains("WARN") && !out.stdout.contains("WARN"),
            "the CONFIG GET handshake must work: {}{}",
            out.stdout,
            out.stderr
        );
        for test in ["SET", "GET"] {
            let rps = rate(&out.stdout, test);
            assert!(
                rps.is_some_and(|r| r > 0.0),
                "-P {pipeline}: no {test} rate in {:?}",
                out.stdout
            );
            eprintln!(
                "redis-benchmark -P {pipeline} {test}: {:.0} requests/s",
                rps.unwrap_or(0.0)
            );
        }
    }
    // The benchmark's key is there, with its 3-byte value.
    assert_eq!(cli(server.port, &["STRLEN", "key:__rand_int__"]), "3\n");
}
