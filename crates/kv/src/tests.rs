//! Replies of every command (including errors), framing (pipelining, any split, inline),
//! expiry, the memory budget, bounds on buffering, and a never-panic property test.

use alloc::string::String;
use alloc::vec::Vec;

use proptest::prelude::*;

use crate::store::entry_cost;
use crate::{Connection, MAX_INLINE, OUTPUT_HIGH_WATER, Status, Store};

/// A client on its own store, at a settable time.
struct Client {
    store: Store,
    conn: Connection,
    now: u64,
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Client {
    fn new() -> Self {
        Self::on(Store::new())
    }

    fn on(store: Store) -> Self {
        Client {
            store,
            conn: Connection::new(),
            now: 1_000_000,
        }
    }

    fn raw(&mut self, input: &[u8]) -> (String, Status) {
        let mut out = Vec::new();
        let status = self.conn.feed(input, &mut self.store, self.now, &mut out);
        (String::from_utf8_lossy(&out).into_owned(), status)
    }

    /// Sends one request (multibulk) and returns its reply.
    fn cmd(&mut self, line: &str) -> String {
        let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
        let (reply, status) = self.raw(&encode(&args));
        assert_eq!(status, Status::Open, "{line}: {reply}");
        reply
    }

    /// Sends requests and checks each reply.
    fn check(&mut self, script: &[(&str, &str)]) {
        for (line, want) in script {
            assert_eq!(self.cmd(line), *want, "{line}");
        }
    }
}

const OK: &str = "+OK\r\n";
const NIL: &str = "$-1\r\n";
const SYNTAX: &str = "-ERR syntax error\r\n";
const NOT_INT: &str = "-ERR value is not an integer or out of range\r\n";
const OOM: &str = "-OOM command not allowed when used memory > 'maxmemory'.\r\n";

fn arity(cmd: &str) -> String {
    format!("-ERR wrong number of arguments for '{cmd}' command\r\n")
}

#[test]
fn ping_echo_select_auth() {
    let mut c = Client::new();
    c.check(&[
        ("PING", "+PONG\r\n"),
        ("ping hello", "$5\r\nhello\r\n"),
        ("PING a b", &arity("ping")),
        ("ECHO hi", "$2\r\nhi\r\n"),
        ("echo", &arity("echo")),
        ("SELECT 0", OK),
        ("SELECT 1", "-ERR DB index is out of range\r\n"),
        ("SELECT x", NOT_INT),
        ("SELECT 4294967296", NOT_INT),
        (
            "AUTH pw",
            "-ERR AUTH <password> called without any password configured for the default \
             user. Are you sure your configuration is correct?\r\n",
        ),
        ("AUTH default pw", OK),
        (
            "AUTH bob pw",
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ),
    ]);
}

#[test]
fn unknown_commands_and_arity() {
    let mut c = Client::new();
    c.check(&[
        (
            "foo a b",
            "-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n",
        ),
        (
            "FOO",
            "-ERR unknown command 'FOO', with args beginning with: \r\n",
        ),
        ("GET", &arity("get")),
        ("get a b", &arity("get")),
        ("SET k", &arity("set")),
        ("DBSIZE x", &arity("dbsize")),
        ("CONFIG", &arity("config")),
        ("CONFIG GET", &arity("config|get")),
        (
            "CONFIG SET save x",
            "-ERR unknown subcommand 'SET'. Try CONFIG HELP.\r\n",
        ),
        (
            "CLIENT bogus",
            "-ERR unknown subcommand 'bogus'. Try CLIENT HELP.\r\n",
        ),
    ]);
    // Arguments are quoted up to 128 bytes in all; CR/LF cannot break the reply.
    let long = "x".repeat(200);
    let reply = c.cmd(&format!("nope {long} y"));
    assert_eq!(
        reply,
        format!(
            "-ERR unknown command 'nope', with args beginning with: '{}' \r\n",
            "x".repeat(128)
        )
    );
    let (reply, _) = c.raw(&encode(&[b"a\r\nb", b"c\nd"]));
    assert_eq!(
        reply,
        "-ERR unknown command 'a  b', with args beginning with: 'c d' \r\n"
    );
}

#[test]
fn get_set_and_options() {
    let mut c = Client::new();
    c.check(&[
        ("GET k", NIL),
        ("SET k v", OK),
        ("GET k", "$1\r\nv\r\n"),
        ("SET k v2 NX", NIL),
        ("SET n v NX", OK),
        ("SET missing v XX", NIL),
        ("GET missing", NIL),
        ("SET k v3 xx", OK),
        ("SET k v4 GET", "$2\r\nv3\r\n"),
        ("SET fresh v GET", NIL),
        ("SET k v5 NX GET", "$2\r\nv4\r\n"),
        ("GET k", "$2\r\nv4\r\n"),
        ("SET k v NX XX", SYNTAX),
        ("SET k v EX", SYNTAX),
        ("SET k v EX 10 PX 100", SYNTAX),
        ("SET k v KEEPTTL EX 10", SYNTAX),
        ("SET k v EX 10 KEEPTTL", SYNTAX),
        ("SET k v bogus", SYNTAX),
        ("SET k v EX 10 EX 20", OK),
        ("TTL k", ":20\r\n"),
        (
            "SET k v EX 0",
            "-ERR invalid expire time in 'set' command\r\n",
        ),
        (
            "SET k v PX -5",
            "-ERR invalid expire time in 'set' command\r\n",
        ),
        (
            "SET k v EX 9223372036854775",
            "-ERR invalid expire time in 'set' command\r\n",
        ),
        ("SET k v EX ten", NOT_INT),
        ("SET k v PX 1500", OK),
        ("PTTL k", ":1500\r\n"),
        ("SET k v KEEPTTL", OK),
        ("PTTL k", ":1500\r\n"),
        ("SET k v", OK),
        ("TTL k", ":-1\r\n"),
        ("SET k v EXAT 1010", OK),
        ("TTL k", ":10\r\n"),
        ("SET k v PXAT 1000500", OK),
        ("PTTL k", ":500\r\n"),
        ("SET k v px 100 nx", NIL),
        ("TYPE k", "+string\r\n"),
        ("TYPE nothing", "+none\r\n"),
    ]);
    // Binary-safe keys and values.
    let (reply, _) = c.raw(&encode(&[b"SET", b"\0\r\n", b"\xff\0"]));
    assert_eq!(reply, OK);
    let mut out = Vec::new();
    c.conn
        .feed(&encode(&[b"GET", b"\0\r\n"]), &mut c.store, c.now, &mut out);
    assert_eq!(out, b"$2\r\n\xff\0\r\n");
}

#[test]
fn set_variants_getdel_getset() {
    let mut c = Client::new();
    c.check(&[
        ("SETNX k a", ":1\r\n"),
        ("SETNX k b", ":0\r\n"),
        ("GETSET k c", "$1\r\na\r\n"),
        ("GETSET new x", NIL),
        ("SETEX e 10 v", OK),
        ("TTL e", ":10\r\n"),
        (
            "SETEX e 0 v",
            "-ERR invalid expire time in 'setex' command\r\n",
        ),
        ("SETEX e x v", NOT_INT),
        ("PSETEX p 250 v", OK),
        ("PTTL p", ":250\r\n"),
        (
            "PSETEX p -1 v",
            "-ERR invalid expire time in 'psetex' command\r\n",
        ),
        ("GETDEL k", "$1\r\nc\r\n"),
        ("GETDEL k", NIL),
        ("EXISTS k", ":0\r\n"),
    ]);
}

#[test]
fn del_exists_mget_mset() {
    let mut c = Client::new();
    c.check(&[
        ("MSET a 1 b 2 c 3", OK),
        ("MSET a 1 b", &arity("mset")),
        ("MSET a", &arity("mset")),
        (
            "MGET a b nope c",
            "*4\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n$1\r\n3\r\n",
        ),
        ("EXISTS a a nope b", ":3\r\n"),
        ("DEL a a nope", ":1\r\n"),
        ("UNLINK b c", ":2\r\n"),
        ("DBSIZE", ":0\r\n"),
        ("DEL", &arity("del")),
        ("EXISTS", &arity("exists")),
        ("MGET", &arity("mget")),
    ]);
}

#[test]
fn counters() {
    let mut c = Client::new();
    c.check(&[
        ("INCR n", ":1\r\n"),
        ("INCRBY n 41", ":42\r\n"),
        ("DECR n", ":41\r\n"),
        ("DECRBY n 50", ":-9\r\n"),
        ("GET n", "$2\r\n-9\r\n"),
        ("INCRBY n x", NOT_INT),
        ("INCRBY n 1.5", NOT_INT),
        ("SET s abc", OK),
        ("INCR s", NOT_INT),
        ("SET s 01", OK),
        ("INCR s", NOT_INT),
        ("SET big 9223372036854775807", OK),
        ("INCR big", "-ERR increment or decrement would overflow\r\n"),
        ("SET small -9223372036854775808", OK),
        (
            "DECR small",
            "-ERR increment or decrement would overflow\r\n",
        ),
        (
            "DECRBY n -9223372036854775808",
            "-ERR decrement would overflow\r\n",
        ),
        ("SET t 5 EX 100", OK),
        ("INCR t", ":6\r\n"),
        ("TTL t", ":100\r\n"),
        ("INCR", &arity("incr")),
    ]);
    let (reply, _) = c.raw(b"SET s \" 1\"\r\nINCR s\r\n");
    assert_eq!(reply, format!("{OK}{NOT_INT}"));
}

#[test]
fn append_and_strlen() {
    let mut c = Client::new();
    c.check(&[
        ("STRLEN k", ":0\r\n"),
        ("APPEND k Hello", ":5\r\n"),
        ("APPEND k _World", ":11\r\n"),
        ("GET k", "$11\r\nHello_World\r\n"),
        ("STRLEN k", ":11\r\n"),
        ("EXPIRE k 100", ":1\r\n"),
        ("APPEND k !", ":12\r\n"),
        ("TTL k", ":100\r\n"),
    ]);
}

#[test]
fn expire_ttl_persist() {
    let mut c = Client::new();
    c.check(&[
        ("EXPIRE nope 10", ":0\r\n"),
        ("TTL nope", ":-2\r\n"),
        ("PTTL nope", ":-2\r\n"),
        ("SET k v", OK),
        ("TTL k", ":-1\r\n"),
        ("EXPIRETIME k", ":-1\r\n"),
        ("EXPIRE k x", NOT_INT),
        ("EXPIRE k 10 bogus", "-ERR Unsupported option bogus\r\n"),
        (
            "EXPIRE k 10 NX XX",
            "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n",
        ),
        (
            "EXPIRE k 10 GT LT",
            "-ERR GT and LT options at the same time are not compatible\r\n",
        ),
        (
            "EXPIRE k 9223372036854775807",
            "-ERR invalid expire time in 'expire' command\r\n",
        ),
        (
            "PEXPIRE k 9223372036854775807",
            "-ERR invalid expire time in 'pexpire' command\r\n",
        ),
        ("EXPIRE k 10 XX", ":0\r\n"),
        ("EXPIRE k 10 GT", ":0\r\n"),
        ("EXPIRE k 10 LT", ":1\r\n"),
        ("EXPIRE k 20 NX", ":0\r\n"),
        ("EXPIRE k 5 GT", ":0\r\n"),
        ("EXPIRE k 20 GT", ":1\r\n"),
        ("EXPIRE k 30 LT", ":0\r\n"),
        ("EXPIRE k 15 XX", ":1\r\n"),
        ("TTL k", ":15\r\n"),
        ("PTTL k", ":15000\r\n"),
        ("EXPIRETIME k", ":1015\r\n"),
        ("PEXPIRETIME k", ":1015000\r\n"),
        ("PEXPIRE k 1499", ":1\r\n"),
        ("TTL k", ":1\r\n"),
        ("PEXPIRE k 1500", ":1\r\n"),
        ("TTL k", ":2\r\n"),
        ("EXPIREAT k 2000", ":1\r\n"),
        ("TTL k", ":1000\r\n"),
        ("PEXPIREAT k 1000001", ":1\r\n"),
        ("PTTL k", ":1\r\n"),
        ("PERSIST k", ":1\r\n"),
        ("PERSIST k", ":0\r\n"),
        ("PERSIST nope", ":0\r\n"),
        ("TTL k", ":-1\r\n"),
        // A time not in the future deletes the key (and counts as set).
        ("EXPIRE k -1", ":1\r\n"),
        ("EXISTS k", ":0\r\n"),
        ("SET k v", OK),
        ("EXPIREAT k 1000", ":1\r\n"),
        ("EXISTS k", ":0\r\n"),
    ]);
}

#[test]
fn lazy_expiry_follows_the_clock() {
    let mut c = Client::new();
    c.check(&[("SET k v PX 100", OK), ("SET other v", OK)]);
    c.now += 100;
    c.check(&[("GET k", "$1\r\nv\r\n"), ("PTTL k", ":0\r\n")]);
    c.now += 1;
    c.check(&[
        ("DBSIZE", ":2\r\n"),
        ("KEYS *", "*1\r\n$5\r\nother\r\n"),
        ("GET k", NIL),
        ("DBSIZE", ":1\r\n"),
    ]);
    c.check(&[("SET k v PX 10", OK)]);
    c.now += 11;
    c.check(&[
        ("SET k w NX", OK),
        ("TTL k", ":-1\r\n"),
        ("SET e v PX 10", OK),
    ]);
    c.now += 11;
    c.check(&[
        ("EXISTS e", ":0\r\n"),
        ("INCR e", ":1\r\n"),
        ("SET e v PX 10", OK),
    ]);
    c.now += 11;
    c.check(&[("APPEND e x", ":1\r\n"), ("STRLEN e", ":1\r\n")]);
}

#[test]
fn active_expiry_is_bounded_and_ordered() {
    let mut c = Client::new();
    for i in 0..10 {
        c.cmd(&format!("SET k{i} v PX {}", 10 + i));
    }
    c.cmd("SET keep v");
    assert_eq!(c.store.next_expiry(), Some(c.now + 10));
    assert_eq!(c.store.expire_some(c.now + 10, 100), 0);
    assert_eq!(c.store.expire_some(c.now + 15, 3), 3);
    assert_eq!(c.store.len(), 8);
    assert_eq!(c.store.expire_some(c.now + 15, 100), 2);
    assert_eq!(c.store.expire_some(c.now + 1000, 100), 5);
    assert_eq!(c.cmd("DBSIZE"), ":1\r\n");
    assert!(c.cmd("INFO stats").contains("expired_keys:10\r\n"));
}

#[test]
fn keys_patterns_dbsize_flush() {
    let mut c = Client::new();
    c.cmd("MSET hello 1 hallo 2 hxllo 3 hllo 4 heeeello 5 a*b 6 user:1 7 user:22 8");
    let keys = |c: &mut Client, p: &str| -> Vec<String> {
        let reply = c.cmd(&format!("KEYS {p}"));
        let mut lines = reply.split("\r\n").skip(1);
        let mut keys = Vec::new();
        while let (Some(_), Some(k)) = (lines.next(), lines.next()) {
            keys.push(String::from(k));
        }
        keys.sort();
        keys
    };
    assert_eq!(keys(&mut c, "h?llo"), ["hallo", "hello", "hxllo"]);
    assert_eq!(
        keys(&mut c, "h*llo"),
        ["hallo", "heeeello", "hello", "hllo", "hxllo"]
    );
    assert_eq!(keys(&mut c, "h[ae]llo"), ["hallo", "hello"]);
    assert_eq!(keys(&mut c, "h[^e]llo"), ["hallo", "hxllo"]);
    assert_eq!(keys(&mut c, "h[a-b]llo"), ["hallo"]);
    assert_eq!(keys(&mut c, "a\\*b"), ["a*b"]);
    assert_eq!(keys(&mut c, "user:?"), ["user:1"]);
    assert_eq!(keys(&mut c, "nothing*"), Vec::<String>::new());
    assert_eq!(keys(&mut c, "*").len(), 8);
    c.check(&[
        ("DBSIZE", ":8\r\n"),
        ("FLUSHDB bogus", SYNTAX),
        ("FLUSHDB ASYNC x", SYNTAX),
        ("FLUSHDB", OK),
        ("DBSIZE", ":0\r\n"),
        ("SET k v", OK),
        ("FLUSHALL SYNC", OK),
        ("DBSIZE", ":0\r\n"),
        ("KEYS", &arity("keys")),
    ]);
    assert_eq!(c.store.used_memory(), 0);
}

fn bulk_text(reply: &str) -> &str {
    let (header, body) = reply.split_once("\r\n").unwrap();
    let len: usize = header[1..].parse().unwrap();
    assert_eq!(body.len(), len + 2, "{reply:?}");
    &body[..len]
}

#[test]
fn info_sections() {
    let mut c = Client::on(Store::with_limit(1 << 20));
    let all = c.cmd("INFO");
    let text = bulk_text(&all);
    assert!(
        text.starts_with("# Server\r\nredis_version:7.0.0\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\n\r\n# Keyspace\r\n"), "{text}");
    assert!(text.contains("maxmemory:1048576\r\n"), "{text}");
    assert!(
        !text.contains("db0:"),
        "no db0 line while empty, as Redis: {text}"
    );
    c.cmd("MSET a 1 b 2");
    c.cmd("EXPIRE a 100");
    assert_eq!(
        bulk_text(&c.cmd("INFO keyspace")),
        "# Keyspace\r\ndb0:keys=2,expires=1,avg_ttl=0\r\n"
    );
    let two = c.cmd("INFO SERVER keyspace");
    assert!(bulk_text(&two).starts_with("# Server\r\n"));
    assert!(bulk_text(&two).ends_with("# Keyspace\r\ndb0:keys=2,expires=1,avg_ttl=0\r\n"));
    assert_eq!(c.cmd("INFO nosuchsection"), "$0\r\n\r\n");
    let titles = |reply: &str| -> Vec<String> {
        reply
            .lines()
            .filter(|l| l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    assert_eq!(titles(&c.cmd("INFO everything")), titles(&all));
}

#[test]
fn command_config_client_hello() {
    let mut c = Client::new();
    let count = c.cmd("COMMAND COUNT");
    let n: usize = count[1..count.len() - 2].parse().unwrap();
    assert!(n >= 40, "{count}");
    assert!(
        c.cmd("COMMAND")
            .starts_with(&format!("*{n}\r\n*10\r\n$3\r\nget\r\n:2\r\n"))
    );
    assert!(
        c.cmd("COMMAND LIST")
            .starts_with(&format!("*{n}\r\n$3\r\nget\r\n"))
    );
    c.check(&[
        ("COMMAND DOCS", "*0\r\n"),
        ("COMMAND DOCS get", "*0\r\n"),
        ("COMMAND COUNT x", &arity("command|count")),
        ("COMMAND INFO nope", "*1\r\n$-1\r\n"),
        (
            "COMMAND INFO set",
            "*1\r\n*10\r\n$3\r\nset\r\n:-3\r\n*2\r\n+write\r\n+denyoom\r\n:1\r\n:1\r\n:1\r\n\
             *0\r\n*0\r\n*0\r\n*0\r\n",
        ),
        ("CONFIG GET save", "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"),
        (
            "CONFIG GET appendonly",
            "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n",
        ),
        ("CONFIG GET nosuch", "*0\r\n"),
        (
            "CONFIG GET SAVE save appendonly",
            "*4\r\n$4\r\nsave\r\n$0\r\n\r\n$10\r\nappendonly\r\n$2\r\nno\r\n",
        ),
        (
            "CONFIG GET maxmemory*",
            "*4\r\n$9\r\nmaxmemory\r\n$1\r\n0\r\n$16\r\nmaxmemory-policy\r\n$10\r\nnoeviction\r\n",
        ),
        ("CONFIG RESETSTAT", OK),
        ("CLIENT ID", ":1\r\n"),
        ("CLIENT GETNAME", NIL),
        ("CLIENT SETNAME bench", OK),
        ("CLIENT GETNAME", "$5\r\nbench\r\n"),
        (
            "CLIENT SETNAME a\u{7f}",
            "-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
        ),
        ("CLIENT SETNAME ", OK),
        ("CLIENT GETNAME", NIL),
        ("CLIENT SETINFO LIB-NAME redis-rs", OK),
        ("CLIENT SETINFO lib-ver 1.0", OK),
        (
            "CLIENT SETINFO color red",
            "-ERR Unrecognized option 'color'\r\n",
        ),
        ("CLIENT SETNAME", &arity("client|setname")),
        (
            "HELLO",
            "*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n\
             $5\r\nproto\r\n:2\r\n$2\r\nid\r\n:1\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n\
             $4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
        ),
        ("HELLO 3", "-NOPROTO unsupported protocol version\r\n"),
        (
            "HELLO x",
            "-ERR Protocol version is not an integer or out of range\r\n",
        ),
        (
            "HELLO 2 bogus",
            "-ERR Syntax error in HELLO option 'bogus'\r\n",
        ),
        (
            "HELLO 2 AUTH bob pw",
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ),
    ]);
    assert!(
        c.cmd("HELLO 2 AUTH default pw SETNAME app")
            .starts_with("*14\r\n")
    );
    assert_eq!(c.cmd("CLIENT GETNAME"), "$3\r\napp\r\n");
    assert_eq!(c.cmd("RESET"), "+RESET\r\n");
    assert_eq!(c.cmd("CLIENT GETNAME"), NIL);
    for container in ["CONFIG", "CLIENT", "COMMAND"] {
        let help = c.cmd(&format!("{container} HELP"));
        assert!(
            help.starts_with('*') && help.contains("+HELP\r\n"),
            "{help}"
        );
    }
    // Each connection gets its own id from the store.
    let mut other = Connection::new();
    let mut out = Vec::new();
    other.feed(b"CLIENT ID\r\n", &mut c.store, 0, &mut out);
    assert_eq!(out, b":2\r\n");
}

#[test]
fn quit_closes_after_reply_and_ignores_the_rest() {
    let mut c = Client::new();
    let (reply, status) = c.raw(b"PING\r\nQUIT\r\nSET k v\r\n");
    assert_eq!(
        (reply.as_str(), status),
        ("+PONG\r\n+OK\r\n", Status::Close)
    );
    assert_eq!(c.raw(b"PING\r\n"), (String::new(), Status::Close));
    assert_eq!(c.store.len(), 0);
}

#[test]
fn pipelined_and_inline_requests() {
    let mut c = Client::new();
    let mut input = encode(&[b"SET", b"a", b"1"]);
    input.extend_from_slice(b"INCR a\r\n\r\n  \r\nGET a\nset \"with space\" 'it\\'s'\r\n");
    input.extend_from_slice(&encode(&[b"GET", b"with space"]));
    input.extend_from_slice(b"*0\r\n*-1\r\nDEL \"\\x61\"\r\n");
    let (reply, status) = c.raw(&input);
    assert_eq!(status, Status::Open);
    assert_eq!(reply, "+OK\r\n:2\r\n$1\r\n2\r\n+OK\r\n$4\r\nit's\r\n:1\r\n");
}

#[test]
fn protocol_errors_reply_then_close() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"*1\r\n$3\r\nfoo\r\n*x\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n+PING\r\n",
            "-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"*1\r\n\r\n",
            "-ERR Protocol error: expected '$', got ' '\r\n",
        ),
        (
            b"*1\r\n$x\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$-1\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$536870913\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"GET 'k\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ];
    for (input, error) in cases {
        let mut c = Client::new();
        let (reply, status) = c.raw(input);
        assert_eq!(status, Status::Close, "{input:?}");
        let reply = reply.replace(
            "-ERR unknown command 'foo', with args beginning with: \r\n",
            "",
        );
        assert_eq!(reply, *error, "{input:?}");
        assert_eq!(c.raw(b"PING\r\n"), (String::new(), Status::Close));
    }
}

/// A script of requests touching every kind of reply, for the split tests.
fn script() -> Vec<u8> {
    let mut input = Vec::new();
    for line in [
        &[&b"SET"[..], b"k", b"v", b"PX", b"100"][..],
        &[b"GET", b"k"],
        &[b"MSET", b"a", b"1", b"b", b""],
        &[b"MGET", b"a", b"b", b"zz"],
        &[b"INCRBY", b"a", b"41"],
        &[b"KEYS", b"*"],
        &[b"nope", b"x"],
        &[b"SET", b"big", &[b'x'; 300]],
        &[b"APPEND", b"big", b"\r\n"],
        &[b"STRLEN", b"big"],
    ] {
        input.extend_from_slice(&encode(line));
    }
    input.extend_from_slice(b"PING\r\nECHO \"a b\"\r\n\r\nTTL k\nEXISTS a b c\r\n");
    input
}

fn feed_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Status) {
    let mut store = Store::new();
    let mut conn = Connection::new();
    let mut out = Vec::new();
    let mut status = Status::Open;
    let mut start = 0;
    for &cut in cuts.iter().chain([input.len()].iter()) {
        let end = cut.clamp(start, input.len());
        status = conn.feed(&input[start..end], &mut store, 1000, &mut out);
        start = end;
    }
    (out, status)
}

#[test]
fn byte_at_a_time_equals_all_at_once() {
    let input = script();
    let (whole, status) = feed_in_pieces(&input, &[]);
    assert_eq!(status, Status::Open);
    let cuts: Vec<usize> = (1..input.len()).collect();
    let (bytewise, status) = feed_in_pieces(&input, &cuts);
    assert_eq!(status, Status::Open);
    assert_eq!(
        String::from_utf8_lossy(&bytewise),
        String::from_utf8_lossy(&whole)
    );
    assert!(
        whole.starts_with(b"+OK\r\n$1\r\nv\r\n+OK\r\n*3\r\n$1\r\n1\r\n$0\r\n\r\n$-1\r\n:42\r\n")
    );
    assert!(whole.ends_with(b"+PONG\r\n$3\r\na b\r\n:0\r\n:2\r\n"));
}

#[test]
fn memory_limit_refuses_growth_only() {
    let limit = entry_cost(1, 10) * 2;
    let mut c = Client::on(Store::with_limit(limit));
    let ten = "x".repeat(10);
    c.check(&[
        (&format!("SET a {ten}"), OK),
        (&format!("SET b {ten}"), OK),
        ("SET c 1", OOM),
        ("SET c 1 GET", OOM),
        ("GET c", NIL),
        (&format!("SET a {ten}x"), OOM),
        ("APPEND a x", OOM),
        ("APPEND new x", OOM),
        ("MSET a 1 c 2", OOM),
        ("SETNX c 1", OOM),
        ("SETEX c 10 1", OOM),
        ("GETSET a 12345678901", OOM),
        // Same size or smaller, and writes that are not done, pass.
        (&format!("SET a {ten}"), OK),
        ("SET b 1234", OK),
        ("SET a 1 NX", NIL),
        ("MSET a 1 b 2", OK),
        ("INCR a", ":2\r\n"),
        ("EXPIRE a 100", ":1\r\n"),
        ("DEL a", ":1\r\n"),
        ("SET c 1", OK),
    ]);
    assert_eq!(c.store.used_memory(), entry_cost(1, 1) * 2);
    let info = c.cmd("INFO memory");
    assert!(info.contains(&format!("used_memory:{}\r\n", entry_cost(1, 1) * 2)));
    // INCR growing past the limit is refused too.
    let mut c = Client::on(Store::with_limit(entry_cost(1, 1)));
    c.check(&[("SET n 9", OK), ("INCR n", OOM), ("DECR n", ":8\r\n")]);
}

#[test]
fn buffering_is_bounded() {
    // A declared bulk over the request limit is refused before its bytes arrive.
    let mut c = Client::new();
    let (reply, status) = c.raw(b"*2\r\n$3\r\nSET\r\n$4194304\r\n");
    assert_eq!(status, Status::Close);
    assert_eq!(
        reply,
        "-ERR Protocol error: request larger than the server's limit of 4194304 bytes\r\n"
    );
    // Many arguments add up.
    let mut conn = Connection::with_max_request(1000);
    let mut store = Store::new();
    let mut out = Vec::new();
    let mut input = b"*100\r\n".to_vec();
    for _ in 0..100 {
        input.extend_from_slice(b"$0\r\n\r\n");
    }
    assert_eq!(conn.feed(&input, &mut store, 0, &mut out), Status::Close);
    assert!(out.starts_with(b"-ERR Protocol error: request larger"));
    // Lines without an end: inline, count, bulk length.
    for (start, error) in [
        (&b""[..], "too big inline request"),
        (b"*", "too big mbulk count string"),
        (b"*1\r\n", "too big bulk count string"),
    ] {
        let mut c = Client::new();
        let (reply, status) = c.raw(start);
        assert_eq!((reply.as_str(), status), ("", Status::Open));
        let chunk = [b'1'; 1024];
        let mut fed = 0;
        let (reply, status) = loop {
            let (reply, status) = c.raw(&chunk);
            fed += chunk.len();
            assert!(c.conn.buffered() <= MAX_INLINE);
            if status == Status::Close || fed > 2 * MAX_INLINE {
                break (reply, status);
            }
        };
        assert_eq!(status, Status::Close, "{error}");
        assert_eq!(reply, format!("-ERR Protocol error: {error}\r\n"));
    }
    // A legitimate big value streams in and is buffered once, up to its size.
    let mut c = Client::new();
    let value = vec![b'v'; 3 << 20];
    let input = encode(&[b"SET", b"k", &value]);
    for chunk in input.chunks(64 * 1024) {
        let (reply, status) = c.raw(chunk);
        assert_eq!(status, Status::Open);
        assert!(c.conn.buffered() <= value.len() + 64);
        if !reply.is_empty() {
            assert_eq!(reply, OK);
        }
    }
    assert_eq!(c.conn.buffered(), 0);
    assert_eq!(c.store.used_memory(), entry_cost(1, value.len()));
}

#[test]
fn output_high_water_keeps_the_rest_for_later() {
    let mut c = Client::new();
    let value = "v".repeat(100 * 1024);
    c.cmd(&format!("SET k {value}"));
    let requests = b"GET k\r\n".repeat(40);
    let mut out = Vec::new();
    let mut calls = 0;
    let mut input = &requests[..];
    let mut total = 0;
    loop {
        let status = c.conn.feed(input, &mut c.store, c.now, &mut out);
        assert_eq!(status, Status::Open);
        calls += 1;
        assert!(out.len() < OUTPUT_HIGH_WATER + 200 * 1024);
        total += out.len();
        out.clear();
        input = &[];
        if !c.conn.has_backlog() {
            break;
        }
    }
    assert!(calls >= 4, "{calls}");
    assert_eq!(total, 40 * (value.len() + 2 + 9));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Garbage never panics, output stays well-formed enough to end in CRLF, and nothing is
    /// produced after Close.
    #[test]
    fn garbage_never_panics(
        chunks in prop::collection::vec(
            prop::collection::vec(
                prop_oneof![
                    4 => prop::sample::select(
                        b"*$\r\n-0123456789 \"'\\xGETSETKEYS*?[]^PINGQUITEXPX".to_vec()
                    ),
                    1 => any::<u8>(),
                ],
                0..64,
            ),
            1..8,
        ),
        now in any::<u64>(),
        limit in prop::option::of(0usize..4096),
    ) {
        let mut store = limit.map_or_else(Store::new, Store::with_limit);
        let mut conn = Connection::with_max_request(2048);
        let mut closed = false;
        for chunk in &chunks {
            let mut out = Vec::new();
            let status = conn.feed(chunk, &mut store, now, &mut out);
            if closed {
                prop_assert!(out.is_empty());
            }
            prop_assert!(out.is_empty() || out.ends_with(b"\r\n"));
            closed |= status == Status::Close;
            store.expire_some(now, 10);
        }
    }

    /// Random valid requests give the same replies however the bytes are split.
    #[test]
    fn any_split_gives_the_same_replies(
        requests in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "SET", "GET", "DEL", "INCR", "APPEND", "EXISTS", "MGET", "STRLEN",
                    "EXPIRE", "PTTL", "KEYS", "PING", "ECHO", "set", "GETDEL", "bogus",
                ]),
                prop::collection::vec(
                    prop::sample::select(vec!["a", "b", "1", "-3", "x y", "", "*", "NX", "PX"]),
                    0..4,
                ),
                any::<bool>(),
            ),
            1..20,
        ),
        cuts in prop::collection::vec(0usize..2000, 0..30),
    ) {
        let mut input = Vec::new();
        for (cmd, args, inline) in &requests {
            if *inline && args.iter().all(|a| !a.is_empty() && !a.contains(' ')) {
                input.extend_from_slice(cmd.as_bytes());
                for a in args {
                    input.push(b' ');
                    input.extend_from_slice(a.as_bytes());
                }
                input.extend_from_slice(b"\r\n");
            } else {
                let mut all: Vec<&[u8]> = vec![cmd.as_bytes()];
                all.extend(args.iter().map(|a| a.as_bytes()));
                input.extend_from_slice(&encode(&all));
            }
        }
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (whole, s1) = feed_in_pieces(&input, &[]);
        let (split, s2) = feed_in_pieces(&input, &cuts);
        prop_assert_eq!(s1, Status::Open);
        prop_assert_eq!(s2, Status::Open);
        prop_assert_eq!(whole, split);
    }
}
