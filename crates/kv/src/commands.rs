//! The commands: one table (name, arity, flags, key positions, handler) and one handler per
//! command, with Redis 7.0's replies and error messages.

use alloc::format;
use alloc::vec::Vec;

use crate::glob;
use crate::parse::MAX_BULK;
use crate::resp::{self, parse_i64};
use crate::store::{Entry, Store, Ttl, entry_cost};

/// The version reported by `INFO`, `HELLO` and `COMMAND`-aware clients.
pub const REDIS_VERSION: &str = "7.0.0";

const SYNTAX: &str = "ERR syntax error";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";
const OVERFLOW: &str = "ERR increment or decrement would overflow";
const TOO_LONG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";
const BAD_NAME: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

/// Per-connection state the commands read and change.
#[derive(Default)]
pub(crate) struct Client {
    /// Assigned from the store on the connection's first request (0 until then).
    pub(crate) id: u64,
    pub(crate) name: Option<Vec<u8>>,
}

/// What one command works with.
pub(crate) struct Ctx<'a> {
    pub(crate) store: &'a mut Store,
    pub(crate) now: u64,
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) client: &'a mut Client,
    /// Set by `QUIT`: close once the reply is sent.
    pub(crate) close: bool,
}

impl Ctx<'_> {
    fn err(&mut self, msg: &str) {
        resp::error(self.out, msg.as_bytes());
    }

    /// The clock as Redis's signed milliseconds.
    fn now_i64(&self) -> i64 {
        i64::try_from(self.now).unwrap_or(i64::MAX)
    }
}

type Handler = fn(&mut Ctx, Vec<Vec<u8>>);

/// A command (or a subcommand of `CONFIG`, `CLIENT`, `COMMAND`).
pub(crate) struct Command {
    /// Lowercase, as Redis names it in errors (`config|get` for subcommands).
    name: &'static str,
    /// Redis's arity: `n` exactly n arguments (name included), `-n` at least n.
    arity: i32,
    flags: &'static [&'static str],
    /// First key, last key (-1: the last argument), step between keys; 0 0 0 for none.
    keys: (i32, i32, i32),
    run: Handler,
}

const W: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "denyoom", "fast"];
const WD: &[&str] = &["write"];
const WDF: &[&str] = &["write", "fast"];
const R: &[&str] = &["readonly"];
const RF: &[&str] = &["readonly", "fast"];
const FAST: &[&str] = &["fast"];
const CONN: &[&str] = &["noscript", "loading", "stale", "fast"];
const ADMIN: &[&str] = &["admin", "noscript", "loading", "stale"];

macro_rules! cmd {
    ($name:literal, $arity:expr, $flags:expr, $keys:expr, $run:expr) => {
        Command {
            name: $name,
            arity: $arity,
            flags: $flags,
            keys: $keys,
            run: $run,
        }
    };
}

const NO_KEYS: (i32, i32, i32) = (0, 0, 0);
const KEY1: (i32, i32, i32) = (1, 1, 1);
const ALL_KEYS: (i32, i32, i32) = (1, -1, 1);

static COMMANDS: &[Command] = &[
    cmd!("get", 2, RF, KEY1, get),
    cmd!("set", -3, W, KEY1, set),
    cmd!("ping", -1, FAST, NO_KEYS, ping),
    cmd!("echo", 2, FAST, NO_KEYS, echo),
    cmd!("setnx", 3, WF, KEY1, setnx),
    cmd!("setex", 4, W, KEY1, setex),
    cmd!("psetex", 4, W, KEY1, psetex),
    cmd!("getset", 3, WF, KEY1, getset),
    cmd!("getdel", 2, WDF, KEY1, getdel),
    cmd!("del", -2, WD, ALL_KEYS, del),
    cmd!("unlink", -2, WDF, ALL_KEYS, del),
    cmd!("exists", -2, RF, ALL_KEYS, exists),
    cmd!("incr", 2, WF, KEY1, incr),
    cmd!("decr", 2, WF, KEY1, decr),
    cmd!("incrby", 3, WF, KEY1, incrby),
    cmd!("decrby", 3, WF, KEY1, decrby),
    cmd!("mget", -2, RF, ALL_KEYS, mget),
    cmd!("mset", -3, W, (1, -1, 2), mset),
    cmd!("append", 3, WF, KEY1, append),
    cmd!("strlen", 2, RF, KEY1, strlen),
    cmd!("expire", -3, WDF, KEY1, expire),
    cmd!("pexpire", -3, WDF, KEY1, pexpire),
    cmd!("expireat", -3, WDF, KEY1, expireat),
    cmd!("pexpireat", -3, WDF, KEY1, pexpireat),
    cmd!("ttl", 2, RF, KEY1, ttl),
    cmd!("pttl", 2, RF, KEY1, pttl),
    cmd!("expiretime", 2, RF, KEY1, expiretime),
    cmd!("pexpiretime", 2, RF, KEY1, pexpiretime),
    cmd!("persist", 2, WDF, KEY1, persist),
    cmd!("type", 2, RF, KEY1, type_),
    cmd!("keys", 2, R, NO_KEYS, keys),
    cmd!("dbsize", 1, RF, NO_KEYS, dbsize),
    cmd!("flushall", -1, WD, NO_KEYS, flush),
    cmd!("flushdb", -1, WD, NO_KEYS, flush),
    cmd!("select", 2, CONN, NO_KEYS, select),
    cmd!("info", -1, &["loading", "stale"], NO_KEYS, info),
    cmd!("command", -1, &["loading", "stale"], NO_KEYS, command),
    cmd!("config", -2, ADMIN, NO_KEYS, config),
    cmd!("client", -2, CONN, NO_KEYS, client),
    cmd!("hello", -1, CONN, NO_KEYS, hello),
    cmd!("auth", -2, CONN, NO_KEYS, auth),
    cmd!("reset", 1, CONN, NO_KEYS, reset),
    cmd!("quit", -1, CONN, NO_KEYS, quit),
];

static CONFIG: &[Command] = &[
    cmd!("config|get", -3, ADMIN, NO_KEYS, config_get),
    cmd!("config|resetstat", 2, ADMIN, NO_KEYS, ok),
    cmd!("config|help", 2, CONN, NO_KEYS, config_help),
];

static CLIENT: &[Command] = &[
    cmd!("client|id", 2, CONN, NO_KEYS, client_id),
    cmd!("client|getname", 2, CONN, NO_KEYS, client_getname),
    cmd!("client|setname", 3, CONN, NO_KEYS, client_setname),
    cmd!("client|setinfo", 4, CONN, NO_KEYS, client_setinfo),
    cmd!("client|help", 2, CONN, NO_KEYS, client_help),
];

static COMMAND: &[Command] = &[
    cmd!(
        "command|count",
        2,
        &["loading", "stale"],
        NO_KEYS,
        command_count
    ),
    cmd!(
        "command|docs",
        -2,
        &["loading", "stale"],
        NO_KEYS,
        command_docs
    ),
    cmd!(
        "command|info",
        -2,
        &["loading", "stale"],
        NO_KEYS,
        command_info
    ),
    cmd!(
        "command|list",
        -2,
        &["loading", "stale"],
        NO_KEYS,
        command_list
    ),
    cmd!(
        "command|help",
        2,
        &["loading", "stale"],
        NO_KEYS,
        command_help
    ),
];

fn lookup(name: &[u8]) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

fn arity_ok(arity: i32, argc: usize) -> bool {
    let argc = i64::try_from(argc).unwrap_or(i64::MAX);
    if arity >= 0 {
        argc == i64::from(arity)
    } else {
        argc >= -i64::from(arity)
    }
}

fn wrong_arity(cx: &mut Ctx, name: &str) {
    cx.err(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ));
}

/// Runs one request (`args` is not empty) and appends its reply.
pub(crate) fn execute(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let Some(cmd) = lookup(&args[0]) else {
        unknown_command(cx, &args);
        return;
    };
    dispatch(cx, cmd, args);
}

fn dispatch(cx: &mut Ctx, cmd: &Command, args: Vec<Vec<u8>>) {
    if !arity_ok(cmd.arity, args.len()) {
        wrong_arity(cx, cmd.name);
        return;
    }
    cx.store.stats.commands += 1;
    (cmd.run)(cx, args);
}

/// A container command (`CONFIG GET`): finds the subcommand, Redis's error if there is none.
fn subcommand(cx: &mut Ctx, table: &[Command], container: &str, args: Vec<Vec<u8>>) {
    // Subcommands are named `container|sub`.
    let sub = |c: &&Command| {
        let bare = c.name.split('|').nth(1).unwrap_or("");
        bare.as_bytes().eq_ignore_ascii_case(&args[1])
    };
    match table.iter().find(sub) {
        Some(cmd) => {
            if arity_ok(cmd.arity, args.len()) {
                (cmd.run)(cx, args);
            } else {
                wrong_arity(cx, cmd.name);
            }
        }
        None => {
            let mut msg = b"ERR unknown subcommand '".to_vec();
            msg.extend_from_slice(c_str(&args[1], 128));
            msg.extend_from_slice(format!("'. Try {container} HELP.").as_bytes());
            resp::error(cx.out, &msg);
        }
    }
}

/// At most `max` bytes of `s`, up to its first NUL (what C's `%.*s` prints).
fn c_str(s: &[u8], max: usize) -> &[u8] {
    let s = &s[..s.len().min(max)];
    match s.iter().position(|&b| b == 0) {
        Some(nul) => &s[..nul],
        None => s,
    }
}

fn unknown_command(cx: &mut Ctx, args: &[Vec<u8>]) {
    let mut msg = b"ERR unknown command '".to_vec();
    msg.extend_from_slice(c_str(&args[0], 128));
    msg.extend_from_slice(b"', with args beginning with: ");
    let mut quoted = Vec::new();
    for arg in &args[1..] {
        if quoted.len() >= 128 {
            break;
        }
        let room = 128 - quoted.len();
        quoted.push(b'\'');
        quoted.extend_from_slice(c_str(arg, room));
        quoted.extend_from_slice(b"' ");
    }
    msg.extend_from_slice(&quoted);
    resp::error(cx.out, &msg);
}

// ---- Connection and server commands -------------------------------------------------------

fn ok(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::ok(cx.out);
}

fn ping(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    match args.len() {
        1 => resp::simple(cx.out, "PONG"),
        2 => resp::bulk(cx.out, &args[1]),
        _ => wrong_arity(cx, "ping"),
    }
}

fn echo(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    resp::bulk(cx.out, &args[1]);
}

fn quit(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::ok(cx.out);
    cx.close = true;
}

fn reset(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    cx.client.name = None;
    resp::simple(cx.out, "RESET");
}

fn select(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    match parse_i64(&args[1]).filter(|n| i32::try_from(*n).is_ok()) {
        None => cx.err(NOT_INTEGER),
        Some(0) => resp::ok(cx.out),
        Some(_) => cx.err("ERR DB index is out of range"),
    }
}

fn auth(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    match args.len() {
        2 => cx.err(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        ),
        3 if args[1] == b"default" => resp::ok(cx.out),
        3 => cx.err("WRONGPASS invalid username-password pair or user is disabled."),
        _ => cx.err(SYNTAX),
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`: RESP2 only (HELLO 3 gets NOPROTO, so
/// clients fall back to RESP2).
fn hello(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    if args.len() >= 2 {
        let Some(version) = parse_i64(&args[1]) else {
            cx.err("ERR Protocol version is not an integer or out of range");
            return;
        };
        if version != 2 {
            cx.err("NOPROTO unsupported protocol version");
            return;
        }
    }
    let mut name = None;
    let mut user = None;
    let mut j = 2;
    while j < args.len() {
        let more = args.len() - 1 - j;
        if args[j].eq_ignore_ascii_case(b"auth") && more >= 2 {
            user = Some(j + 1);
            j += 2;
        } else if args[j].eq_ignore_ascii_case(b"setname") && more >= 1 {
            if !valid_client_name(&args[j + 1]) {
                cx.err(BAD_NAME);
                return;
            }
            name = Some(j + 1);
            j += 1;
        } else {
            let mut msg = b"ERR Syntax error in HELLO option '".to_vec();
            msg.extend_from_slice(c_str(&args[j], usize::MAX));
            msg.push(b'\'');
            resp::error(cx.out, &msg);
            return;
        }
        j += 1;
    }
    if user.is_some_and(|u| args[u] != b"default") {
        cx.err("WRONGPASS invalid username-password pair or user is disabled.");
        return;
    }
    if let Some(n) = name {
        set_client_name(cx, &args[n]);
    }
    let out = &mut *cx.out;
    resp::array(out, 14);
    for (key, value) in [("server", "redis"), ("version", REDIS_VERSION)] {
        resp::bulk(out, key.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
    resp::bulk(out, b"proto");
    resp::int(out, 2);
    resp::bulk(out, b"id");
    resp::int(out, cx.client.id as i64);
    for (key, value) in [("mode", "standalone"), ("role", "master")] {
        resp::bulk(out, key.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
    resp::bulk(out, b"modules");
    resp::array(out, 0);
}

fn client(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    subcommand(cx, CLIENT, "CLIENT", args);
}

fn client_id(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::int(cx.out, cx.client.id as i64);
}

fn client_getname(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    match &cx.client.name {
        Some(name) => resp::bulk(cx.out, name),
        None => resp::nil(cx.out),
    }
}

/// Redis allows printable ASCII without spaces (names appear in space-separated listings).
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn set_client_name(cx: &mut Ctx, name: &[u8]) {
    cx.client.name = if name.is_empty() {
        None
    } else {
        Some(name.to_vec())
    };
}

fn client_setname(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    if !valid_client_name(&args[2]) {
        cx.err(BAD_NAME);
        return;
    }
    set_client_name(cx, &args[2]);
    resp::ok(cx.out);
}

/// `CLIENT SETINFO LIB-NAME|LIB-VER value`: accepted and forgotten.
fn client_setinfo(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let attr = &args[2];
    if attr.eq_ignore_ascii_case(b"lib-name") || attr.eq_ignore_ascii_case(b"lib-ver") {
        resp::ok(cx.out);
    } else {
        let mut msg = b"ERR Unrecognized option '".to_vec();
        msg.extend_from_slice(c_str(attr, usize::MAX));
        msg.push(b'\'');
        resp::error(cx.out, &msg);
    }
}

fn help(cx: &mut Ctx, container: &str, lines: &[&str]) {
    resp::array(cx.out, lines.len() + 3);
    resp::simple(
        cx.out,
        &format!("{container} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"),
    );
    for line in lines {
        resp::simple(cx.out, line);
    }
    resp::simple(cx.out, "HELP");
    resp::simple(cx.out, "    Print this help.");
}

fn client_help(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    help(
        cx,
        "CLIENT",
        &[
            "GETNAME",
            "    Return the name of the current connection.",
            "ID",
            "    Return the ID of the current connection.",
            "SETNAME <name>",
            "    Assign the name <name> to the current connection.",
            "SETINFO <option> <value>",
            "    Accepted (LIB-NAME, LIB-VER) and ignored.",
        ],
    );
}

fn config(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    subcommand(cx, CONFIG, "CONFIG", args);
}

fn config_help(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    help(
        cx,
        "CONFIG",
        &[
            "GET <pattern>",
            "    Return parameters matching the glob-like <pattern> and their values.",
            "RESETSTAT",
            "    Accepted; statistics are not reset.",
        ],
    );
}

/// `CONFIG GET pattern...`: the few parameters clients ask about (redis-benchmark asks for
/// `save` and `appendonly`), each once, as name/value pairs.
fn config_get(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let maxmemory = format!("{}", cx.store.limit().unwrap_or(0));
    let max_bulk = format!("{MAX_BULK}");
    let params: [(&str, &str); 7] = [
        ("save", ""),
        ("appendonly", "no"),
        ("databases", "1"),
        ("maxmemory", &maxmemory),
        ("maxmemory-policy", "noeviction"),
        ("proto-max-bulk-len", &max_bulk),
        ("timeout", "0"),
    ];
    let mut found = [false; 7];
    for pattern in &args[2..] {
        let pattern = pattern.to_ascii_lowercase();
        for (i, (name, _)) in params.iter().enumerate() {
            found[i] |= glob::matches(&pattern, name.as_bytes());
        }
    }
    let n = found.iter().filter(|f| **f).count();
    resp::array(cx.out, 2 * n);
    for ((name, value), _) in params.iter().zip(found).filter(|(_, f)| *f) {
        resp::bulk(cx.out, name.as_bytes());
        resp::bulk(cx.out, value.as_bytes());
    }
}

fn command(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    if args.len() == 1 {
        resp::array(cx.out, COMMANDS.len());
        for c in COMMANDS {
            command_entry(cx.out, c);
        }
    } else {
        subcommand(cx, COMMAND, "COMMAND", args);
    }
}

/// A `COMMAND INFO` entry in Redis 7's shape: name, arity, flags, first key, last key, step,
/// ACL categories, tips, key specs, subcommands (the last four empty here).
fn command_entry(out: &mut Vec<u8>, c: &Command) {
    resp::array(out, 10);
    resp::bulk(out, c.name.as_bytes());
    resp::int(out, i64::from(c.arity));
    resp::array(out, c.flags.len());
    for flag in c.flags {
        resp::simple(out, flag);
    }
    resp::int(out, i64::from(c.keys.0));
    resp::int(out, i64::from(c.keys.1));
    resp::int(out, i64::from(c.keys.2));
    for _ in 0..4 {
        resp::array(out, 0);
    }
}

fn command_count(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::int(cx.out, COMMANDS.len() as i64);
}

/// Documentation is not carried: an empty map (`redis-cli` then shows no hints).
fn command_docs(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::array(cx.out, 0);
}

fn command_info(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    if args.len() == 2 {
        resp::array(cx.out, COMMANDS.len());
        for c in COMMANDS {
            command_entry(cx.out, c);
        }
        return;
    }
    resp::array(cx.out, args.len() - 2);
    for name in &args[2..] {
        match lookup(name) {
            Some(c) => command_entry(cx.out, c),
            None => resp::nil(cx.out),
        }
    }
}

fn command_list(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::array(cx.out, COMMANDS.len());
    for c in COMMANDS {
        resp::bulk(cx.out, c.name.as_bytes());
    }
}

fn command_help(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    help(
        cx,
        "COMMAND",
        &[
            "(no subcommand)",
            "    Return details about all commands.",
            "COUNT",
            "    Return the total number of commands.",
            "DOCS [<command-name> ...]",
            "    Return an empty map: no documentation is kept.",
            "INFO [<command-name> ...]",
            "    Return details about the given commands.",
            "LIST",
            "    Return the names of all commands.",
        ],
    );
}

/// `INFO [section ...]`: server, memory, persistence, stats, replication and keyspace.
fn info(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    const SECTIONS: [&str; 6] = [
        "server",
        "memory",
        "persistence",
        "stats",
        "replication",
        "keyspace",
    ];
    let mut wanted = [args.len() == 1; 6];
    for arg in &args[1..] {
        let all = ["all", "everything", "default"]
            .iter()
            .any(|a| arg.eq_ignore_ascii_case(a.as_bytes()));
        for (i, s) in SECTIONS.iter().enumerate() {
            wanted[i] |= all || arg.eq_ignore_ascii_case(s.as_bytes());
        }
    }
    let s = &*cx.store;
    let mut text = alloc::string::String::new();
    let sections: [(&str, alloc::string::String); 6] = [
        (
            "Server",
            format!(
                "redis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nos:rebound-kv {} (no_std)\r\narch_bits:{}\r\n",
                env!("CARGO_PKG_VERSION"),
                usize::BITS
            ),
        ),
        (
            "Memory",
            format!(
                "used_memory:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:noeviction\r\n",
                s.used_memory(),
                s.limit().unwrap_or(0)
            ),
        ),
        (
            "Persistence",
            "loading:0\r\nrdb_changes_since_last_save:0\r\naof_enabled:0\r\n".into(),
        ),
        (
            "Stats",
            format!(
                "total_commands_processed:{}\r\nexpired_keys:{}\r\n",
                s.stats.commands, s.stats.expired_keys
            ),
        ),
        (
            "Replication",
            "role:master\r\nconnected_slaves:0\r\n".into(),
        ),
        (
            "Keyspace",
            if s.is_empty() {
                alloc::string::String::new()
            } else {
                format!(
                    "db0:keys={},expires={},avg_ttl=0\r\n",
                    s.len(),
                    s.expiring()
                )
            },
        ),
    ];
    for (i, (title, body)) in sections.iter().enumerate() {
        if !wanted[i] {
            continue;
        }
        if !text.is_empty() {
            text.push_str("\r\n");
        }
        text.push_str("# ");
        text.push_str(title);
        text.push_str("\r\n");
        text.push_str(body);
    }
    resp::bulk(cx.out, text.as_bytes());
}

// ---- Strings ------------------------------------------------------------------------------

fn get(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    match cx.store.get(&args[1], cx.now) {
        Some(e) => resp::bulk(cx.out, &e.value),
        None => resp::nil(cx.out),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    Millis,
}

/// An expiry argument of the SET family (`EX`, `PX`, `EXAT`, `PXAT`, `SETEX`, `PSETEX`) as an
/// absolute time; Redis's checks: positive, no overflow.
fn set_expiry_arg(
    cx: &Ctx,
    arg: &[u8],
    unit: Unit,
    relative: bool,
    cmd: &str,
) -> Result<u64, alloc::string::String> {
    let invalid = || format!("ERR invalid expire time in '{cmd}' command");
    let n = parse_i64(arg).ok_or_else(|| alloc::string::String::from(NOT_INTEGER))?;
    if n <= 0 {
        return Err(invalid());
    }
    let ms = match unit {
        Unit::Seconds => n.checked_mul(1000).ok_or_else(invalid)?,
        Unit::Millis => n,
    };
    let at = if relative {
        ms.checked_add(cx.now_i64()).ok_or_else(invalid)?
    } else {
        ms
    };
    Ok(at as u64)
}

/// The common part of SET, SETNX, SETEX, PSETEX and GETSET.
struct SetOptions {
    nx: bool,
    xx: bool,
    get: bool,
    ttl: Ttl,
}

fn set_generic(cx: &mut Ctx, key: &[u8], value: Vec<u8>, opts: SetOptions) -> Option<bool> {
    let found = cx.store.touch(key, cx.now);
    let write = !((opts.nx && found) || (opts.xx && !found));
    if write
        && !cx
            .store
            .fits(cx.store.cost(key), entry_cost(key.len(), value.len()))
    {
        cx.err(OOM);
        return None;
    }
    if opts.get {
        match cx.store.get(key, cx.now) {
            Some(e) => resp::bulk(cx.out, &e.value),
            None => resp::nil(cx.out),
        }
    }
    if write {
        cx.store.set(key, value, opts.ttl);
    }
    Some(write)
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`, options parsed as
/// Redis 7.0 does (same option twice is fine, conflicting ones are a syntax error).
fn set(cx: &mut Ctx, mut args: Vec<Vec<u8>>) {
    let (mut nx, mut xx, mut get, mut keep) = (false, false, false, false);
    // (unit, relative, index of the value)
    let mut expire: Option<(Unit, bool, usize)> = None;
    let mut j = 3;
    while j < args.len() {
        let opt = &args[j];
        let has_next = j + 1 < args.len();
        let is = |s: &str| opt.eq_ignore_ascii_case(s.as_bytes());
        let other_expire =
            |unit, relative| matches!(expire, Some((u, r, _)) if (u, r) != (unit, relative));
        if is("nx") && !xx {
            nx = true;
        } else if is("xx") && !nx {
            xx = true;
        } else if is("get") {
            get = true;
        } else if is("keepttl") && expire.is_none() {
            keep = true;
        } else if let Some((unit, relative)) = [
            ("ex", Unit::Seconds, true),
            ("px", Unit::Millis, true),
            ("exat", Unit::Seconds, false),
            ("pxat", Unit::Millis, false),
        ]
        .iter()
        .find(|(name, ..)| is(name))
        .map(|&(_, u, r)| (u, r))
        .filter(|&(u, r)| !keep && !other_expire(u, r) && has_next)
        {
            expire = Some((unit, relative, j + 1));
            j += 1;
        } else {
            cx.err(SYNTAX);
            return;
        }
        j += 1;
    }
    let ttl = match expire {
        None if keep => Ttl::Keep,
        None => Ttl::Clear,
        Some((unit, relative, at)) => match set_expiry_arg(cx, &args[at], unit, relative, "set") {
            Ok(at) => Ttl::At(at),
            Err(e) => return cx.err(&e),
        },
    };
    let value = core::mem::take(&mut args[2]);
    let opts = SetOptions { nx, xx, get, ttl };
    match set_generic(cx, &args[1], value, opts) {
        Some(_) if get => {}
        Some(true) => resp::ok(cx.out),
        Some(false) => resp::nil(cx.out),
        None => {}
    }
}

fn setnx(cx: &mut Ctx, mut args: Vec<Vec<u8>>) {
    let value = core::mem::take(&mut args[2]);
    let opts = SetOptions {
        nx: true,
        xx: false,
        get: false,
        ttl: Ttl::Clear,
    };
    if let Some(written) = set_generic(cx, &args[1], value, opts) {
        resp::int(cx.out, i64::from(written));
    }
}

fn setex_generic(cx: &mut Ctx, mut args: Vec<Vec<u8>>, unit: Unit, name: &str) {
    let at = match set_expiry_arg(cx, &args[2], unit, true, name) {
        Ok(at) => at,
        Err(e) => return cx.err(&e),
    };
    let value = core::mem::take(&mut args[3]);
    let opts = SetOptions {
        nx: false,
        xx: false,
        get: false,
        ttl: Ttl::At(at),
    };
    if set_generic(cx, &args[1], value, opts).is_some() {
        resp::ok(cx.out);
    }
}

fn setex(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    setex_generic(cx, args, Unit::Seconds, "setex");
}

fn psetex(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    setex_generic(cx, args, Unit::Millis, "psetex");
}

fn getset(cx: &mut Ctx, mut args: Vec<Vec<u8>>) {
    let value = core::mem::take(&mut args[2]);
    let opts = SetOptions {
        nx: false,
        xx: false,
        get: true,
        ttl: Ttl::Clear,
    };
    set_generic(cx, &args[1], value, opts);
}

fn getdel(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    if cx.store.touch(&args[1], cx.now)
        && let Some(e) = cx.store.remove(&args[1])
    {
        resp::bulk(cx.out, &e.value);
    } else {
        resp::nil(cx.out);
    }
}

fn del(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let mut n = 0;
    for key in &args[1..] {
        if cx.store.touch(key, cx.now) && cx.store.remove(key).is_some() {
            n += 1;
        }
    }
    resp::int(cx.out, n);
}

fn exists(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let mut n = 0;
    for key in &args[1..] {
        if cx.store.touch(key, cx.now) {
            n += 1;
        }
    }
    resp::int(cx.out, n);
}

fn incr_by(cx: &mut Ctx, key: &[u8], by: i64) {
    let current = match cx.store.get(key, cx.now) {
        None => 0,
        Some(e) => match parse_i64(&e.value) {
            Some(n) => n,
            None => return cx.err(NOT_INTEGER),
        },
    };
    let Some(new) = current.checked_add(by) else {
        return cx.err(OVERFLOW);
    };
    let mut digits = Vec::new();
    resp::push_i64(&mut digits, new);
    if !cx
        .store
        .fits(cx.store.cost(key), entry_cost(key.len(), digits.len()))
    {
        return cx.err(OOM);
    }
    cx.store.set(key, digits, Ttl::Keep);
    resp::int(cx.out, new);
}

fn incr(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    incr_by(cx, &args[1], 1);
}

fn decr(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    incr_by(cx, &args[1], -1);
}

fn incrby(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    match parse_i64(&args[2]) {
        Some(by) => incr_by(cx, &args[1], by),
        None => cx.err(NOT_INTEGER),
    }
}

fn decrby(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    match parse_i64(&args[2]) {
        None => cx.err(NOT_INTEGER),
        Some(i64::MIN) => cx.err("ERR decrement would overflow"),
        Some(by) => incr_by(cx, &args[1], -by),
    }
}

fn mget(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    resp::array(cx.out, args.len() - 1);
    for key in &args[1..] {
        match cx.store.get(key, cx.now) {
            Some(e) => resp::bulk(cx.out, &e.value),
            None => resp::nil(cx.out),
        }
    }
}

fn mset(cx: &mut Ctx, mut args: Vec<Vec<u8>>) {
    if args.len().is_multiple_of(2) {
        return wrong_arity(cx, "mset");
    }
    // Budget: the old cost of each distinct key against the new cost of every pair (a key
    // given twice is counted twice: conservative).
    let mut keys: Vec<&[u8]> = args[1..].iter().step_by(2).map(|k| &k[..]).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut old = 0usize;
    for key in keys {
        if cx.store.touch(key, cx.now) {
            old += cx.store.cost(key);
        }
    }
    let new: usize = args[1..]
        .chunks(2)
        .map(|kv| entry_cost(kv[0].len(), kv[1].len()))
        .fold(0, usize::saturating_add);
    if !cx.store.fits(old, new) {
        return cx.err(OOM);
    }
    for pair in args[1..].chunks_mut(2) {
        let value = core::mem::take(&mut pair[1]);
        cx.store.set(&pair[0], value, Ttl::Clear);
    }
    resp::ok(cx.out);
}

fn append(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let (key, data) = (&args[1], &args[2]);
    let len = match cx.store.get(key, cx.now) {
        Some(e) => e.value.len(),
        None => {
            if !cx.store.fits(0, entry_cost(key.len(), data.len())) {
                return cx.err(OOM);
            }
            cx.store.set(key, data.clone(), Ttl::Clear);
            return resp::int(cx.out, data.len() as i64);
        }
    };
    if len + data.len() > MAX_BULK {
        return cx.err(TOO_LONG);
    }
    if !cx.store.fits(0, data.len()) {
        return cx.err(OOM);
    }
    let new_len = cx.store.append(key, data).unwrap_or(0);
    resp::int(cx.out, new_len as i64);
}

fn strlen(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let len = cx.store.get(&args[1], cx.now).map_or(0, |e| e.value.len());
    resp::int(cx.out, len as i64);
}

fn type_(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    if cx.store.touch(&args[1], cx.now) {
        resp::simple(cx.out, "string");
    } else {
        resp::simple(cx.out, "none");
    }
}

// ---- Keys and expiry ----------------------------------------------------------------------

/// `EXPIRE`, `PEXPIRE`, `EXPIREAT`, `PEXPIREAT` with `NX|XX|GT|LT` (Redis 7.0): a time at or
/// before now deletes the key.
fn expire_generic(cx: &mut Ctx, args: Vec<Vec<u8>>, unit: Unit, relative: bool, name: &str) {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &args[3..] {
        let is = |s: &str| opt.eq_ignore_ascii_case(s.as_bytes());
        if is("nx") {
            nx = true;
        } else if is("xx") {
            xx = true;
        } else if is("gt") {
            gt = true;
        } else if is("lt") {
            lt = true;
        } else {
            let mut msg = b"ERR Unsupported option ".to_vec();
            msg.extend_from_slice(c_str(opt, usize::MAX));
            return resp::error(cx.out, &msg);
        }
    }
    if nx && (xx || gt || lt) {
        return cx.err("ERR NX and XX, GT or LT options at the same time are not compatible");
    }
    if gt && lt {
        return cx.err("ERR GT and LT options at the same time are not compatible");
    }
    let Some(n) = parse_i64(&args[2]) else {
        return cx.err(NOT_INTEGER);
    };
    let invalid = format!("ERR invalid expire time in '{name}' command");
    let Some(ms) = (match unit {
        Unit::Seconds => n.checked_mul(1000),
        Unit::Millis => Some(n),
    }) else {
        return cx.err(&invalid);
    };
    let base = if relative { cx.now_i64() } else { 0 };
    let Some(when) = ms.checked_add(base) else {
        return cx.err(&invalid);
    };
    let key = &args[1];
    let Some(current) = cx.store.get(key, cx.now).map(|e| e.expires_at) else {
        return resp::int(cx.out, 0);
    };
    let current = current.map(|at| at as i64);
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current.is_none_or(|c| when <= c))
        || (lt && current.is_some_and(|c| when >= c));
    if refused {
        return resp::int(cx.out, 0);
    }
    if when <= cx.now_i64() {
        cx.store.remove(key);
    } else {
        cx.store.set_expiry(key, Some(when as u64));
    }
    resp::int(cx.out, 1);
}

fn expire(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    expire_generic(cx, args, Unit::Seconds, true, "expire");
}

fn pexpire(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    expire_generic(cx, args, Unit::Millis, true, "pexpire");
}

fn expireat(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    expire_generic(cx, args, Unit::Seconds, false, "expireat");
}

fn pexpireat(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    expire_generic(cx, args, Unit::Millis, false, "pexpireat");
}

/// TTL, PTTL, EXPIRETIME, PEXPIRETIME: -2 no key, -1 no expiry; seconds are rounded.
fn ttl_generic(cx: &mut Ctx, key: &[u8], unit: Unit, absolute: bool) {
    let now = cx.now_i64();
    let reply = match cx.store.get(key, cx.now) {
        None => -2,
        Some(Entry {
            expires_at: None, ..
        }) => -1,
        Some(Entry {
            expires_at: Some(at),
            ..
        }) => {
            let at = *at as i64;
            let ms = if absolute { at } else { (at - now).max(0) };
            match unit {
                Unit::Millis => ms,
                Unit::Seconds => (ms + 500) / 1000,
            }
        }
    };
    resp::int(cx.out, reply);
}

fn ttl(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    ttl_generic(cx, &args[1], Unit::Seconds, false);
}

fn pttl(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    ttl_generic(cx, &args[1], Unit::Millis, false);
}

fn expiretime(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    ttl_generic(cx, &args[1], Unit::Seconds, true);
}

fn pexpiretime(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    ttl_generic(cx, &args[1], Unit::Millis, true);
}

fn persist(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let had = cx
        .store
        .get(&args[1], cx.now)
        .is_some_and(|e| e.expires_at.is_some());
    if had {
        cx.store.set_expiry(&args[1], None);
    }
    resp::int(cx.out, i64::from(had));
}

fn keys(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let pattern = &args[1];
    let all = pattern.as_slice() == b"*";
    let found: Vec<&[u8]> = cx
        .store
        .keys(cx.now)
        .filter(|k| all || glob::matches(pattern, k))
        .collect();
    resp::array(cx.out, found.len());
    for key in found {
        resp::bulk(cx.out, key);
    }
}

fn dbsize(cx: &mut Ctx, _: Vec<Vec<u8>>) {
    resp::int(cx.out, cx.store.len() as i64);
}

/// FLUSHALL and FLUSHDB `[ASYNC|SYNC]` (both synchronous here).
fn flush(cx: &mut Ctx, args: Vec<Vec<u8>>) {
    let mode_ok = match args.len() {
        1 => true,
        2 => args[1].eq_ignore_ascii_case(b"async") || args[1].eq_ignore_ascii_case(b"sync"),
        _ => false,
    };
    if !mode_ok {
        return cx.err(SYNTAX);
    }
    cx.store.clear();
    resp::ok(cx.out);
}
