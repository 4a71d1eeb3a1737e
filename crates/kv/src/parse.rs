//! The request parser: RESP2 multibulk (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) and inline commands
//! (`GET k\r\n`, quoted arguments split as `redis-cli` and Redis's `sdssplitargs` do).
//!
//! Incremental: bytes are taken as they come, in any split, and a request's state is kept
//! between calls (header lines being read, the arguments so far, the current argument's
//! bytes), so no byte is read twice and a request arriving one byte at a time costs the same
//! as one arriving whole. What it keeps is bounded: header and inline lines by
//! [`MAX_INLINE`], a request's arguments by the connection's request limit, checked against the
//! declared length before the bytes arrive. Errors are Redis's protocol errors, after which the
//! connection is closed.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::resp::parse_i64;

/// Longest inline command or header line (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;

/// Longest bulk string a client may send (Redis's default `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 * 1024 * 1024;

/// Bytes counted per argument against the request limit on top of its length (the memory an
/// argument takes besides its bytes), so that many empty arguments are bounded too.
const ARG_OVERHEAD: usize = 32;

/// One step of the parser.
pub(crate) enum Parsed {
    /// A complete request (never empty).
    Command(Vec<Vec<u8>>),
    /// A protocol error: the reply's message, without `-` and CRLF. The connection closes.
    Error(String),
}

enum State {
    /// Between requests.
    Start,
    /// Reading an inline line up to `\n`.
    Inline,
    /// Reading the `*<count>` line (after the `*`); `cr` once its `\r` was seen.
    Count { cr: bool },
    /// Reading a `$<len>` line; `left` arguments still to come (this one included).
    BulkLen { left: usize, cr: bool },
    /// Reading an argument's bytes, then its two-byte terminator.
    Bulk {
        left: usize,
        arg: Vec<u8>,
        len: usize,
        terminator: u8,
    },
    /// After a protocol error: nothing more is parsed.
    Failed,
}

pub(crate) struct Parser {
    state: State,
    line: Vec<u8>,
    args: Vec<Vec<u8>>,
    /// Bytes counted against `max_request` for the request being read.
    pending: usize,
    max_request: usize,
}

impl Parser {
    pub(crate) fn new(max_request: usize) -> Self {
        Parser {
            state: State::Start,
            line: Vec::new(),
            args: Vec::new(),
            pending: 0,
            max_request,
        }
    }

    /// Bytes held for an incomplete request (lines and arguments; for tests and limits).
    pub(crate) fn buffered(&self) -> usize {
        let arg = match &self.state {
            State::Bulk { arg, .. } => arg.len(),
            _ => 0,
        };
        self.line.len() + arg + self.args.iter().map(Vec::len).sum::<usize>()
    }

    /// Consumes `input[*pos..]` until a request is complete (returned), an error is found
    /// (returned; the parser then stays failed), or the input runs out (`None`).
    pub(crate) fn next(&mut self, input: &[u8], pos: &mut usize) -> Option<Parsed> {
        while *pos < input.len() {
            let rest = &input[*pos..];
            match &mut self.state {
                State::Failed => {
                    *pos = input.len();
                    return None;
                }
                State::Start => {
                    self.line.clear();
                    self.pending = 0;
                    if rest[0] == b'*' {
                        *pos += 1;
                        self.state = State::Count { cr: false };
                    } else {
                        self.state = State::Inline;
                    }
                }
                State::Inline => {
                    let (taken, found) = take_line(rest, b'\n');
                    if self.line.len() + taken > MAX_INLINE {
                        return Some(self.fail("Protocol error: too big inline request"));
                    }
                    self.line.extend_from_slice(&rest[..taken]);
                    *pos += taken;
                    if !found {
                        continue;
                    }
                    *pos += 1;
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    self.state = State::Start;
                    match split_args(&self.line) {
                        None => {
                            return Some(self.fail("Protocol error: unbalanced quotes in request"));
                        }
                        // An empty line is no request: Redis ignores it.
                        Some(args) if args.is_empty() => {}
                        Some(args) => return Some(Parsed::Command(args)),
                    }
                }
                State::Count { cr } | State::BulkLen { cr, .. } => {
                    if !*cr {
                        let (taken, found) = take_line(rest, b'\r');
                        if self.line.len() + taken > MAX_INLINE {
                            let what = match self.state {
                                State::Count { .. } => "mbulk count",
                                _ => "bulk count",
                            };
                            let msg = format!("Protocol error: too big {what} string");
                            return Some(self.fail(&msg));
                        }
                        self.line.extend_from_slice(&rest[..taken]);
                        *pos += taken;
                        if found {
                            *cr = true;
                            *pos += 1;
                        }
                        continue;
                    }
                    // Like Redis, the byte after `\r` is skipped unchecked.
                    *pos += 1;
                    if let Err(msg) = self.header_line() {
                        return Some(self.fail(&msg));
                    }
                    if let State::Start = self.state {
                        // `*0` or a negative count: no request.
                        continue;
                    }
                }
                State::Bulk {
                    left,
                    arg,
                    len,
                    terminator,
                } => {
                    if arg.len() < *len {
                        let take = rest.len().min(*len - arg.len());
                        arg.extend_from_slice(&rest[..take]);
                        *pos += take;
                        continue;
                    }
                    // Like Redis, the two bytes after the data are skipped unchecked.
                    let skip = rest.len().min(usize::from(*terminator));
                    *terminator -= skip as u8;
                    *pos += skip;
                    if *terminator > 0 {
                        continue;
                    }
                    let left = *left - 1;
                    let arg = core::mem::take(arg);
                    self.args.push(arg);
                    if left == 0 {
                        self.state = State::Start;
                        return Some(Parsed::Command(core::mem::take(&mut self.args)));
                    }
                    self.line.clear();
                    self.state = State::BulkLen { left, cr: false };
                }
            }
        }
        None
    }

    /// A complete `*<count>` or `$<len>` line is in `self.line`: moves to the next state.
    fn header_line(&mut self) -> Result<(), String> {
        match self.state {
            State::Count { .. } => {
                let count = parse_i64(&self.line)
                    .filter(|&n| n <= i64::from(i32::MAX))
                    .ok_or("Protocol error: invalid multibulk length")?;
                if count <= 0 {
                    self.state = State::Start;
                    return Ok(());
                }
                let count = count as usize;
                self.args = Vec::with_capacity(count.min(1024));
                self.line.clear();
                self.state = State::BulkLen {
                    left: count,
                    cr: false,
                };
            }
            State::BulkLen { left, .. } => {
                match self.line.first() {
                    Some(b'$') => {}
                    // Redis shows the byte where `$` should be (`\r` for an empty line).
                    first => {
                        let got = char::from(first.copied().unwrap_or(b'\r'));
                        return Err(format!("Protocol error: expected '$', got '{got}'"));
                    }
                }
                let len = parse_i64(&self.line[1..])
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n <= MAX_BULK)
                    .ok_or("Protocol error: invalid bulk length")?;
                let cost = len + ARG_OVERHEAD;
                if self.pending.saturating_add(cost) > self.max_request {
                    return Err(format!(
                        "Protocol error: request larger than the server's limit of {} bytes",
                        self.max_request
                    ));
                }
                self.pending += cost;
                self.line.clear();
                self.state = State::Bulk {
                    left,
                    // Grows as the bytes arrive: a declared length costs nothing until sent.
                    arg: Vec::with_capacity(len.min(MAX_INLINE)),
                    len,
                    terminator: 2,
                };
            }
            _ => unreachable!("header_line is only called in a header state"),
        }
        Ok(())
    }

    fn fail(&mut self, msg: &str) -> Parsed {
        self.state = State::Failed;
        self.line = Vec::new();
        self.args = Vec::new();
        Parsed::Error(String::from(msg))
    }
}

/// How many bytes of `rest` come before `end`, and whether `end` was found.
fn take_line(rest: &[u8], end: u8) -> (usize, bool) {
    match rest.iter().position(|&b| b == end) {
        Some(i) => (i, true),
        None => (rest.len(), false),
    }
}

/// Splits an inline command into arguments like Redis's `sdssplitargs`: blanks separate
/// arguments; `"..."` takes `\n \r \t \b \a \\ \" \xHH` escapes; `'...'` takes `\'`; a closing
/// quote must be followed by a blank or the end. `None` for unbalanced quotes. A NUL byte ends
/// the line, as in C.
pub(crate) fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while at(i) != 0 && is_space(at(i)) {
            i += 1;
        }
        if at(i) == 0 {
            return Some(args);
        }
        let mut arg = Vec::new();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(i);
            if in_double {
                if c == b'\\'
                    && at(i + 1) == b'x'
                    && at(i + 2).is_ascii_hexdigit()
                    && at(i + 3).is_ascii_hexdigit()
                {
                    arg.push(hex(at(i + 2)) * 16 + hex(at(i + 3)));
                    i += 3;
                } else if c == b'\\' && at(i + 1) != 0 {
                    i += 1;
                    arg.push(match at(i) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(i + 1) != 0 && !is_space(at(i + 1)) {
                        return None;
                    }
                    i += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    arg.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(i + 1) == b'\'' {
                    i += 1;
                    arg.push(b'\'');
                } else if c == b'\'' {
                    if at(i + 1) != 0 && !is_space(at(i + 1)) {
                        return None;
                    }
                    i += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    arg.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            i += 1;
                        }
                        break;
                    }
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => arg.push(c),
                }
            }
            i += 1;
        }
        args.push(arg);
    }
}

fn hex(d: u8) -> u8 {
    match d {
        b'0'..=b'9' => d - b'0',
        b'a'..=b'f' => d - b'a' + 10,
        _ => d - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Option<Vec<String>> {
        split_args(line.as_bytes()).map(|args| {
            args.into_iter()
                .map(|a| String::from_utf8(a).unwrap())
                .collect()
        })
    }

    #[test]
    fn inline_arguments_split_like_sdssplitargs() {
        assert_eq!(
            words("  set  k   v "),
            Some(vec!["set".into(), "k".into(), "v".into()])
        );
        assert_eq!(words(""), Some(vec![]));
        assert_eq!(words(" \t "), Some(vec![]));
        assert_eq!(
            words(r#"set "a b" 'c d'"#),
            Some(vec!["set".into(), "a b".into(), "c d".into()])
        );
        assert_eq!(
            words(r#""\x41\n\"\\" 'it\'s' """#),
            Some(vec!["A\n\"\\".into(), "it's".into(), "".into()])
        );
        assert_eq!(words(r#"a"b c""#), Some(vec!["ab c".into()]));
        assert_eq!(words(r#""unterminated"#), None);
        assert_eq!(words("'unterminated"), None);
        assert_eq!(words(r#""closed"x"#), None);
        assert_eq!(words("'closed'x"), None);
        assert_eq!(words("a\0b c"), Some(vec!["a".into()]));
    }

    fn parse_all(input: &[u8]) -> Vec<Result<Vec<Vec<u8>>, String>> {
        let mut p = Parser::new(4 << 20);
        let mut pos = 0;
        let mut got = Vec::new();
        while let Some(step) = p.next(input, &mut pos) {
            match step {
                Parsed::Command(args) => got.push(Ok(args)),
                Parsed::Error(e) => got.push(Err(e)),
            }
        }
        got
    }

    #[test]
    fn multibulk_and_inline_requests() {
        let got =
            parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n\r\n*0\r\n*-1\r\n*1\r\n$0\r\n\r\n");
        assert_eq!(
            got,
            vec![
                Ok(vec![b"GET".to_vec(), b"k".to_vec()]),
                Ok(vec![b"PING".to_vec()]),
                Ok(vec![b"".to_vec()]),
            ]
        );
    }

    #[test]
    fn protocol_errors_are_redis_messages() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "Protocol error: invalid multibulk length"),
            (
                b"*2147483648\r\n",
                "Protocol error: invalid multibulk length",
            ),
            (b"*1\r\n:1\r\n", "Protocol error: expected '$', got ':'"),
            (b"*1\r\n\r\n", "Protocol error: expected '$', got '\r'"),
            (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
            (
                b"*1\r\n$536870913\r\n",
                "Protocol error: invalid bulk length",
            ),
            (
                b"GET \"k\r\n",
                "Protocol error: unbalanced quotes in request",
            ),
        ];
        for (input, msg) in cases {
            assert_eq!(parse_all(input), vec![Err(String::from(*msg))], "{input:?}");
        }
    }
}
