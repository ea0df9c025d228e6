//! The memcached text protocol, incremental: bytes go in as they arrive (any split, any
//! amount of pipelining), replies come out in an [`Output`] queue.
//!
//! Commands: `get`, `gets`, `gat`, `gats`, `set`, `add`, `replace`, `append`, `prepend`,
//! `cas`, `delete`, `incr`, `decr`, `touch`, `flush_all`, `version`, `stats`, `verbosity`,
//! `quit`; `noreply` where memcached has it. Replies are memcached's, byte for byte. The binary
//! protocol is not supported: a connection whose command starts with its magic byte is closed.
//!
//! ```
//! use guest_kv::protocol::{Output, Session};
//! use guest_kv::store::Store;
//! let mut store = Store::new(1 << 20);
//! let mut session = Session::new();
//! let mut out = Output::new();
//! session.feed(b"set k 0 0 2\r\nhi\r\nget k\r\n");
//! session.process(&mut store, 0, &mut out);
//! assert_eq!(out.to_vec(), b"STORED\r\nVALUE k 0 2\r\nhi\r\nEND\r\n");
//! ```

use crate::store::{IncrError, MAX_KEY, MAX_VALUE, SetMode, SetResult, Store, StoreError, format_decimal};
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;

/// Version string of `version` and `stats`.
pub const VERSION: &str = "1.6.0-understudy";
/// Longest command line (without data) accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Input buffered beyond what the current command needs.
pub const MAX_BUFFERED: usize = 64 * 1024;
/// No new command is started while this much output is queued.
pub const OUT_HIGH_WATER: usize = 256 * 1024;
/// First byte of a binary-protocol request (not supported).
pub const BINARY_MAGIC: u8 = 0x80;
/// Values at least this long are queued by reference instead of copied.
const SHARE_MIN: usize = 4096;

/// Queued reply bytes: copied text and shared values.
#[derive(Debug, Default)]
pub struct Output {
    chunks: VecDeque<Chunk>,
    offset: usize,
    len: usize,
}

#[derive(Debug)]
enum Chunk {
    Bytes(Vec<u8>),
    Shared(Rc<Vec<u8>>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Bytes(b) => b,
            Chunk::Shared(b) => b,
        }
    }
}

impl Output {
    /// An empty queue.
    pub fn new() -> Self {
        Output::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a copy of `b`.
    pub fn push(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if let Some(Chunk::Bytes(last)) = self.chunks.back_mut()
            && last.len() < 16 * 1024
        {
            last.extend_from_slice(b);
            return;
        }
        let mut v = Vec::with_capacity(b.len().max(256));
        v.extend_from_slice(b);
        self.chunks.push_back(Chunk::Bytes(v));
    }

    /// Queues a value (by reference if it is large).
    pub fn push_value(&mut self, v: &Rc<Vec<u8>>) {
        if v.len() < SHARE_MIN {
            self.push(v);
        } else {
            self.len += v.len();
            self.chunks.push_back(Chunk::Shared(Rc::clone(v)));
        }
    }

    /// The next contiguous bytes to send (empty when nothing is queued).
    pub fn front(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c.bytes()[self.offset..])
    }

    /// Drops the first `n` bytes of [`Output::front`].
    pub fn consume(&mut self, n: usize) {
        let Some(front) = self.chunks.front() else { return };
        let avail = front.bytes().len() - self.offset;
        let n = n.min(avail);
        self.offset += n;
        self.len -= n;
        if self.offset == front.bytes().len() {
            self.chunks.pop_front();
            self.offset = 0;
        }
    }

    /// Everything queued, copied (for tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for (i, c) in self.chunks.iter().enumerate() {
            let b = c.bytes();
            v.extend_from_slice(if i == 0 { &b[self.offset..] } else { b });
        }
        v
    }

    /// Drains everything queued into a vector.
    pub fn take(&mut self) -> Vec<u8> {
        let v = self.to_vec();
        self.chunks.clear();
        self.offset = 0;
        self.len = 0;
        v
    }
}

/// What the connection should do after [`Session::process`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Keep going.
    Continue,
    /// Send what is queued, then close (`quit`, or a line too long to be a command).
    Close,
}

#[derive(Clone, Debug)]
struct Pending {
    mode: SetMode,
    key: Vec<u8>,
    flags: u32,
    exptime: i64,
    bytes: usize,
    noreply: bool,
}

#[derive(Clone, Debug)]
enum State {
    /// Waiting for a command line.
    Line,
    /// Waiting for the data block of a storage command.
    Data(Pending),
    /// Discarding the data block of a refused storage command.
    Swallow(usize),
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Session {
    buf: Vec<u8>,
    start: usize,
    state: State,
    closing: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

const CLIENT_ERROR_FORMAT: &[u8] = b"CLIENT_ERROR bad command line format\r\n";
const SERVER_ERROR_OOM: &[u8] = b"SERVER_ERROR out of memory storing object\r\n";
const SERVER_ERROR_TOO_LARGE: &[u8] = b"SERVER_ERROR object too large for cache\r\n";

fn parse_num<T: core::str::FromStr>(tok: &[u8]) -> Option<T> {
    core::str::from_utf8(tok).ok()?.parse().ok()
}

fn push_num(out: &mut Output, n: u64) {
    let mut b = [0u8; 20];
    out.push(format_decimal(n, &mut b));
}

fn valid_key(k: &[u8]) -> bool {
    !k.is_empty() && k.len() <= MAX_KEY && k.iter().all(|&b| b > b' ' && b != 0x7f)
}

impl Session {
    /// A fresh connection.
    pub fn new() -> Self {
        Session { buf: Vec::new(), start: 0, state: State::Line, closing: false }
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// How many more bytes the session takes now (the caller reads at most this much).
    pub fn input_room(&self) -> usize {
        if self.closing {
            return 0;
        }
        let want = match &self.state {
            State::Line => MAX_BUFFERED,
            State::Data(p) => (p.bytes + 2).max(MAX_BUFFERED),
            State::Swallow(n) => (*n).clamp(1, MAX_BUFFERED),
        };
        want.saturating_sub(self.buffered())
    }

    /// Appends received bytes (at most [`Session::input_room`] of them, ideally).
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && (self.start == self.buf.len() || self.start >= 64 * 1024) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Runs every complete command buffered, queueing replies, until input runs out or
    /// [`OUT_HIGH_WATER`] bytes are queued. `now` is the store clock in seconds.
    pub fn process(&mut self, store: &mut Store, now: u64, out: &mut Output) -> Progress {
        while !self.closing && out.len() < OUT_HIGH_WATER {
            let avail = &self.buf[self.start..];
            match &self.state {
                State::Line => {
                    if avail.first() == Some(&BINARY_MAGIC) {
                        // A binary-protocol client: close rather than leave it waiting.
                        self.closing = true;
                        break;
                    }
                    let Some(nl) = avail.iter().position(|&b| b == b'\n') else {
                        if avail.len() > MAX_LINE {
                            out.push(b"CLIENT_ERROR line too long\r\n");
                            self.closing = true;
                        }
                        break;
                    };
                    let end = if nl > 0 && avail[nl - 1] == b'\r' { nl - 1 } else { nl };
                    let line_start = self.start;
                    self.start += nl + 1;
                    let line = &self.buf[line_start..line_start + end];
                    match command(line, store, now, out) {
                        Next::Line => {}
                        Next::Data(p) => self.state = State::Data(p),
                        Next::Swallow(n) => self.state = State::Swallow(n),
                        Next::Close => self.closing = true,
                    }
                }
                State::Data(p) => {
                    if avail.len() < p.bytes + 2 {
                        break;
                    }
                    let data = &avail[..p.bytes];
                    if &avail[p.bytes..p.bytes + 2] != b"\r\n" {
                        out.push(b"CLIENT_ERROR bad data chunk\r\n");
                        // Like memcached: drop the block and read on as commands.
                    } else {
                        let reply: &[u8] = match store.store(p.mode, &p.key, p.flags, p.exptime, data, now) {
                            Ok(SetResult::Stored) => b"STORED\r\n",
                            Ok(SetResult::NotStored) => b"NOT_STORED\r\n",
                            Ok(SetResult::Exists) => b"EXISTS\r\n",
                            Ok(SetResult::NotFound) => b"NOT_FOUND\r\n",
                            Err(StoreError::OutOfMemory) => SERVER_ERROR_OOM,
                            Err(StoreError::TooLarge) => SERVER_ERROR_TOO_LARGE,
                        };
                        if !p.noreply {
                            out.push(reply);
                        }
                    }
                    self.start += p.bytes + 2;
                    self.state = State::Line;
                }
                State::Swallow(n) => {
                    let n = *n;
                    let take = avail.len().min(n);
                    self.start += take;
                    if take == n {
                        self.state = State::Line;
                    } else {
                        self.state = State::Swallow(n - take);
                        break;
                    }
                }
            }
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if self.closing { Progress::Close } else { Progress::Continue }
    }
}

enum Next {
    Line,
    Data(Pending),
    Swallow(usize),
    Close,
}

/// Runs one command line.
fn command(line: &[u8], store: &mut Store, now: u64, out: &mut Output) -> Next {
    let mut toks: [&[u8]; 8] = [&[]; 8];
    let mut ntok = 0;
    let mut words = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let Some(cmd) = words.next() else {
        out.push(b"ERROR\r\n");
        return Next::Line;
    };
    match cmd {
        b"get" | b"gets" => {
            let mut any = false;
            for key in words {
                any = true;
                if !valid_key(key) {
                    out.push(CLIENT_ERROR_FORMAT);
                    return Next::Line;
                }
                emit_value(store, key, now, cmd == b"gets", out);
            }
            out.push(if any { b"END\r\n" } else { b"ERROR\r\n" });
            return Next::Line;
        }
        b"gat" | b"gats" => {
            let Some(exptime) = words.next().and_then(parse_num::<i64>) else {
                out.push(CLIENT_ERROR_FORMAT);
                return Next::Line;
            };
            let mut any = false;
            for key in words {
                any = true;
                if !valid_key(key) {
                    out.push(CLIENT_ERROR_FORMAT);
                    return Next::Line;
                }
                if store.touch(key, exptime, now) {
                    emit_value(store, key, now, cmd == b"gats", out);
                }
            }
            out.push(if any { b"END\r\n" } else { b"ERROR\r\n" });
            return Next::Line;
        }
        _ => {}
    }
    for w in words {
        if ntok == toks.len() {
            out.push(CLIENT_ERROR_FORMAT);
            return Next::Line;
        }
        toks[ntok] = w;
        ntok += 1;
    }
    let args = &toks[..ntok];
    let noreply = args.last() == Some(&&b"noreply"[..]);
    let nargs = if noreply { ntok - 1 } else { ntok };
    let args = &args[..nargs];
    let reply = |out: &mut Output, r: &[u8]| {
        if !noreply {
            out.push(r);
        }
    };
    match cmd {
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => {
            let want = if cmd == b"cas" { 5 } else { 4 };
            if args.len() != want || !valid_key(args[0]) {
                reply(out, CLIENT_ERROR_FORMAT);
                return Next::Line;
            }
            let (Some(flags), Some(exptime), Some(bytes)) =
                (parse_num::<u32>(args[1]), parse_num::<i64>(args[2]), parse_num::<i64>(args[3]))
            else {
                reply(out, CLIENT_ERROR_FORMAT);
                return Next::Line;
            };
            let Ok(bytes) = usize::try_from(bytes) else {
                reply(out, CLIENT_ERROR_FORMAT);
                return Next::Line;
            };
            let mode = match cmd {
                b"set" => SetMode::Set,
                b"add" => SetMode::Add,
                b"replace" => SetMode::Replace,
                b"append" => SetMode::Append,
                b"prepend" => SetMode::Prepend,
                _ => match parse_num::<u64>(args[4]) {
                    Some(c) => SetMode::Cas(c),
                    None => {
                        reply(out, CLIENT_ERROR_FORMAT);
                        return Next::Line;
                    }
                },
            };
            if bytes > MAX_VALUE {
                reply(out, SERVER_ERROR_TOO_LARGE);
                return Next::Swallow(bytes.saturating_add(2));
            }
            let check_len = if matches!(mode, SetMode::Append | SetMode::Prepend) {
                store.peek(args[0], now).map_or(0, |i| i.data.len()) + bytes
            } else {
                bytes
            };
            match store.can_store(args[0], check_len, now) {
                Ok(()) => {}
                Err(StoreError::OutOfMemory) => {
                    reply(out, SERVER_ERROR_OOM);
                    return Next::Swallow(bytes + 2);
                }
                Err(StoreError::TooLarge) => {
                    reply(out, SERVER_ERROR_TOO_LARGE);
                    return Next::Swallow(bytes + 2);
                }
            }
            let mut key = Vec::new();
            if key.try_reserve_exact(args[0].len()).is_err() {
                reply(out, SERVER_ERROR_OOM);
                return Next::Swallow(bytes + 2);
            }
            key.extend_from_slice(args[0]);
            Next::Data(Pending { mode, key, flags, exptime, bytes, noreply })
        }
        b"delete" => {
            // `delete <key> [0] [noreply]`: a non-zero time is refused, as by memcached.
            let ok = match args {
                [k] => valid_key(k),
                [k, t] => valid_key(k) && *t == b"0",
                _ => false,
            };
            if !ok {
                reply(out, b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n");
                return Next::Line;
            }
            let hit = store.delete(args[0], now);
            reply(out, if hit { b"DELETED\r\n" } else { b"NOT_FOUND\r\n" });
            Next::Line
        }
        b"incr" | b"decr" => {
            if args.len() != 2 || !valid_key(args[0]) {
                reply(out, CLIENT_ERROR_FORMAT);
                return Next::Line;
            }
            let Some(delta) = parse_num::<u64>(args[1]).filter(|_| args[1].iter().all(u8::is_ascii_digit)) else {
                reply(out, b"CLIENT_ERROR invalid numeric delta argument\r\n");
                return Next::Line;
            };
            match store.incr(args[0], delta, cmd == b"incr", now) {
                Ok(v) => {
                    if !noreply {
                        push_num(out, v);
                        out.push(b"\r\n");
                    }
                }
                Err(IncrError::NotFound) => reply(out, b"NOT_FOUND\r\n"),
                Err(IncrError::NonNumeric) => {
                    reply(out, b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")
                }
                Err(IncrError::OutOfMemory) => reply(out, b"SERVER_ERROR out of memory\r\n"),
            }
            Next::Line
        }
        b"touch" => {
            let exptime = match args {
                [k, t] if valid_key(k) => parse_num::<i64>(t),
                _ => None,
            };
            let Some(exptime) = exptime else {
                reply(out, CLIENT_ERROR_FORMAT);
                return Next::Line;
            };
            let hit = store.touch(args[0], exptime, now);
            reply(out, if hit { b"TOUCHED\r\n" } else { b"NOT_FOUND\r\n" });
            Next::Line
        }
        b"flush_all" => {
            if args.len() > 1 || args.first().is_some_and(|d| parse_num::<i64>(d).is_none()) {
                reply(out, CLIENT_ERROR_FORMAT);
                return Next::Line;
            }
            // A delay is accepted and ignored: the flush happens now.
            store.flush();
            reply(out, b"OK\r\n");
            Next::Line
        }
        b"version" => {
            out.push(b"VERSION ");
            out.push(VERSION.as_bytes());
            out.push(b"\r\n");
            Next::Line
        }
        b"verbosity" => {
            reply(out, b"OK\r\n");
            Next::Line
        }
        b"stats" => {
            if args.is_empty() {
                stats(store, now, out);
            } else {
                // Sub-statistics (items, slabs, settings, ...) have nothing to report here.
                out.push(b"END\r\n");
            }
            Next::Line
        }
        b"quit" => Next::Close,
        _ => {
            out.push(b"ERROR\r\n");
            Next::Line
        }
    }
}

fn emit_value(store: &mut Store, key: &[u8], now: u64, with_cas: bool, out: &mut Output) {
    let Some(item) = store.get(key, now) else { return };
    out.push(b"VALUE ");
    out.push(key);
    out.push(b" ");
    push_num(out, u64::from(item.flags));
    out.push(b" ");
    push_num(out, item.data.len() as u64);
    if with_cas {
        out.push(b" ");
        push_num(out, item.cas);
    }
    out.push(b"\r\n");
    out.push_value(&item.data);
    out.push(b"\r\n");
}

fn stats(store: &Store, now: u64, out: &mut Output) {
    let s = &store.stats;
    let rows: [(&str, u64); 27] = [
        ("pid", 1),
        ("uptime", now),
        ("time", now),
        ("pointer_size", 64),
        ("curr_connections", s.curr_connections),
        ("total_connections", s.total_connections),
        ("cmd_get", s.cmd_get),
        ("cmd_set", s.cmd_set),
        ("cmd_flush", s.cmd_flush),
        ("cmd_touch", s.cmd_touch),
        ("get_hits", s.get_hits),
        ("get_misses", s.get_misses),
        ("delete_misses", s.delete_misses),
        ("delete_hits", s.delete_hits),
        ("incr_misses", s.incr_misses),
        ("incr_hits", s.incr_hits),
        ("decr_misses", s.decr_misses),
        ("decr_hits", s.decr_hits),
        ("cas_misses", s.cas_misses),
        ("cas_hits", s.cas_hits),
        ("cas_badval", s.cas_badval),
        ("touch_hits", s.touch_hits),
        ("touch_misses", s.touch_misses),
        ("limit_maxbytes", store.limit() as u64),
        ("bytes", store.used() as u64),
        ("curr_items", store.len() as u64),
        ("total_items", s.total_items),
    ];
    out.push(b"STAT version ");
    out.push(VERSION.as_bytes());
    out.push(b"\r\n");
    for (name, v) in rows {
        out.push(b"STAT ");
        out.push(name.as_bytes());
        out.push(b" ");
        push_num(out, v);
        out.push(b"\r\n");
    }
    out.push(b"STAT evictions 0\r\nSTAT threads 1\r\nSTAT out_of_memory ");
    push_num(out, s.out_of_memory);
    out.push(b"\r\nEND\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ITEM_OVERHEAD;

    struct T {
        store: Store,
        session: Session,
        out: Output,
        now: u64,
    }

    impl T {
        fn new() -> Self {
            Self::with_limit(64 << 20)
        }
        fn with_limit(limit: usize) -> Self {
            T { store: Store::new(limit), session: Session::new(), out: Output::new(), now: 0 }
        }
        /// Feeds `input` in one piece and returns everything replied.
        fn run(&mut self, input: &[u8]) -> String {
            self.session.feed(input);
            let p = self.session.process(&mut self.store, self.now, &mut self.out);
            let mut s = String::from_utf8(self.out.take()).unwrap();
            if p == Progress::Close {
                s.push_str("<close>");
            }
            s
        }
        /// Feeds `input` in pieces of `step` bytes.
        fn run_split(&mut self, input: &[u8], step: usize) -> String {
            let mut all = String::new();
            for chunk in input.chunks(step) {
                all.push_str(&self.run(chunk));
            }
            all
        }
    }

    const SCRIPT: &[u8] = b"set a 5 0 3\r\nabc\r\nget a\r\ngets a\r\nadd a 0 0 1\r\nx\r\nadd b 1 0 1\r\ny\r\n\
replace c 0 0 1\r\nz\r\nappend a 0 0 2\r\nde\r\nprepend a 0 0 1\r\n_\r\nget a b c\r\n\
incr n 1\r\nset n 0 0 2\r\n41\r\nincr n 1\r\ndecr n 50\r\ndelete b\r\ndelete b\r\n\
touch a 100\r\ntouch zz 1\r\nversion\r\n";

    const SCRIPT_REPLY: &str = "STORED\r\nVALUE a 5 3\r\nabc\r\nEND\r\nVALUE a 5 3 1\r\nabc\r\nEND\r\n\
NOT_STORED\r\nSTORED\r\nNOT_STORED\r\nSTORED\r\nSTORED\r\n\
VALUE a 5 6\r\n_abcde\r\nVALUE b 1 1\r\ny\r\nEND\r\n\
NOT_FOUND\r\nSTORED\r\n42\r\n0\r\nDELETED\r\nNOT_FOUND\r\nTOUCHED\r\nNOT_FOUND\r\n\
VERSION 1.6.0-understudy\r\n";

    #[test]
    fn every_command_pipelined() {
        let mut t = T::new();
        assert_eq!(t.run(SCRIPT), SCRIPT_REPLY);
    }

    #[test]
    fn any_split_gives_the_same_replies() {
        for step in [1, 2, 3, 5, 7, 13, 64] {
            let mut t = T::new();
            assert_eq!(t.run_split(SCRIPT, step), SCRIPT_REPLY, "step {step}");
        }
    }

    #[test]
    fn cas_flow() {
        let mut t = T::new();
        t.run(b"set k 0 0 1\r\na\r\n");
        let r = t.run(b"gets k\r\n");
        let cas: u64 = r.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert_eq!(t.run(format!("cas k 0 0 1 {}\r\nb\r\n", cas + 7).as_bytes()), "EXISTS\r\n");
        assert_eq!(t.run(format!("cas k 3 0 1 {cas}\r\nb\r\n").as_bytes()), "STORED\r\n");
        assert_eq!(t.run(format!("cas k 0 0 1 {cas}\r\nc\r\n").as_bytes()), "EXISTS\r\n");
        assert_eq!(t.run(b"cas nope 0 0 1 1\r\nc\r\n"), "NOT_FOUND\r\n");
        assert_eq!(t.run(b"get k\r\n"), "VALUE k 3 1\r\nb\r\nEND\r\n");
        assert_eq!(t.run(b"cas k 0 0 1\r\n"), "CLIENT_ERROR bad command line format\r\n");
    }

    #[test]
    fn noreply_is_silent() {
        let mut t = T::new();
        let r = t.run(
            b"set a 0 0 1 noreply\r\n1\r\nadd a 0 0 1 noreply\r\n2\r\nincr a 5 noreply\r\n\
touch a 10 noreply\r\ndelete zz noreply\r\nappend a 0 0 1 noreply\r\n0\r\nverbosity 1 noreply\r\nget a\r\n",
        );
        assert_eq!(r, "VALUE a 0 2\r\n60\r\nEND\r\n");
        assert_eq!(t.run(b"flush_all noreply\r\nget a\r\n"), "END\r\n");
        assert_eq!(t.run(b"delete a noreply\r\ndelete a\r\n"), "NOT_FOUND\r\n");
    }

    #[test]
    fn multi_get_misses_and_errors() {
        let mut t = T::new();
        t.run(b"set x 0 0 1\r\n1\r\nset z 0 0 1\r\n3\r\n");
        assert_eq!(t.run(b"get w x y z\r\n"), "VALUE x 0 1\r\n1\r\nVALUE z 0 1\r\n3\r\nEND\r\n");
        assert_eq!(t.run(b"get\r\n"), "ERROR\r\n");
        assert_eq!(t.run(b"\r\n"), "ERROR\r\n");
        assert_eq!(t.run(b"bogus cmd\r\n"), "ERROR\r\n");
        let long = "k".repeat(251);
        assert_eq!(t.run(format!("get {long}\r\n").as_bytes()), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(format!("set {long} 0 0 1\r\n").as_bytes()), "CLIENT_ERROR bad command line format\r\n");
        // Bare newlines are accepted as line ends, and runs of spaces separate tokens.
        assert_eq!(t.run(b"get   x\n"), "VALUE x 0 1\r\n1\r\nEND\r\n");
    }

    #[test]
    fn storage_command_errors() {
        let mut t = T::new();
        assert_eq!(t.run(b"set a 0 0\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"set a x 0 1\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"set a 0 0 -1\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"set a 0 0 1 2 3\r\n"), "CLIENT_ERROR bad command line format\r\n");
        // Bad data chunk: error, then the session reads on.
        assert_eq!(t.run(b"set a 0 0 1\r\nxyz\r\nget a\r\n"), "CLIENT_ERROR bad data chunk\r\nERROR\r\nEND\r\n");
        assert_eq!(t.run(b"incr a x\r\n"), "CLIENT_ERROR invalid numeric delta argument\r\n");
        assert_eq!(t.run(b"incr a -1\r\n"), "CLIENT_ERROR invalid numeric delta argument\r\n");
        t.run(b"set s 0 0 2\r\nhi\r\n");
        assert_eq!(t.run(b"incr s 1\r\n"), "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n");
        assert_eq!(t.run(b"decr\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"delete s 0\r\n"), "DELETED\r\n");
        assert!(t.run(b"delete s 5\r\n").starts_with("CLIENT_ERROR bad command line format"));
        assert_eq!(t.run(b"touch s\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"flush_all x\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"flush_all 10\r\n"), "OK\r\n");
    }

    #[test]
    fn too_large_is_refused_and_swallowed() {
        let mut t = T::new();
        let n = MAX_VALUE + 1;
        let mut input = format!("set big 0 0 {n}\r\n").into_bytes();
        input.extend(std::iter::repeat_n(b'v', n));
        input.extend_from_slice(b"\r\nget big\r\n");
        assert_eq!(t.run_split(&input, 100_000), "SERVER_ERROR object too large for cache\r\nEND\r\n");
    }

    #[test]
    fn memory_bound_answers_out_of_memory() {
        let per = ITEM_OVERHEAD + 2 + 1000;
        let mut t = T::with_limit(3 * per);
        let v = "v".repeat(1000);
        for k in ["k1", "k2", "k3"] {
            assert_eq!(t.run(format!("set {k} 0 0 1000\r\n{v}\r\n").as_bytes()), "STORED\r\n");
        }
        assert_eq!(
            t.run(format!("set k4 0 0 1000\r\n{v}\r\nget k4\r\n").as_bytes()),
            "SERVER_ERROR out of memory storing object\r\nEND\r\n"
        );
        assert_eq!(
            t.run(format!("append k1 0 0 10\r\n{}\r\n", "a".repeat(10)).as_bytes()),
            "SERVER_ERROR out of memory storing object\r\n"
        );
        // Overwrite in place still works; so does a write after a delete.
        assert_eq!(t.run(format!("set k1 0 0 1000\r\n{v}\r\n").as_bytes()), "STORED\r\n");
        assert_eq!(t.run(b"delete k2\r\n"), "DELETED\r\n");
        assert_eq!(t.run(format!("set k4 0 0 1000\r\n{v}\r\n").as_bytes()), "STORED\r\n");
        assert!(t.run(b"stats\r\n").contains("STAT out_of_memory 2\r\n"));
        // The bound is re-checked when the data arrives (another client may have filled it).
        let mut other = Session::new();
        let mut out = Output::new();
        assert_eq!(t.run(b"delete k4\r\nset k5 0 0 1000\r\n"), "DELETED\r\n");
        other.feed(format!("set k6 0 0 1000\r\n{v}\r\n").as_bytes());
        other.process(&mut t.store, 0, &mut out);
        assert_eq!(out.take(), b"STORED\r\n");
        assert_eq!(t.run(format!("{v}\r\n").as_bytes()), "SERVER_ERROR out of memory storing object\r\n");
    }

    #[test]
    fn quit_and_long_lines_close() {
        let mut t = T::new();
        assert_eq!(t.run(b"version\r\nquit\r\nversion\r\n"), "VERSION 1.6.0-understudy\r\n<close>");
        assert_eq!(t.session.input_room(), 0);
        let mut t = T::new();
        let junk = vec![b'x'; MAX_LINE + 1];
        assert_eq!(t.run(&junk), "CLIENT_ERROR line too long\r\n<close>");
    }

    #[test]
    fn binary_protocol_closes() {
        let mut t = T::new();
        assert_eq!(t.run(&[0x80, 0x01, 0x00, 0x03]), "<close>");
        let mut t = T::new();
        assert_eq!(t.run(b"version\r\n\x80\x00"), "VERSION 1.6.0-understudy\r\n<close>");
    }

    #[test]
    fn stats_and_version() {
        let mut t = T::new();
        t.run(b"set a 0 0 1\r\n1\r\nget a\r\nget b\r\n");
        t.store.stats.curr_connections = 3;
        let s = t.run(b"stats\r\n");
        for want in [
            "STAT version 1.6.0-understudy\r\n",
            "STAT curr_items 1\r\n",
            "STAT get_hits 1\r\n",
            "STAT get_misses 1\r\n",
            "STAT curr_connections 3\r\n",
            "STAT limit_maxbytes 67108864\r\n",
        ] {
            assert!(s.contains(want), "{want} missing from {s}");
        }
        assert!(s.ends_with("END\r\n"));
        assert_eq!(t.run(b"stats items\r\n"), "END\r\n");
        assert_eq!(t.run(b"verbosity\r\n"), "OK\r\n");
    }

    #[test]
    fn gat_touches_and_gets() {
        let mut t = T::new();
        t.run(b"set a 0 0 1\r\n1\r\n");
        assert_eq!(t.run(b"gat 10 a b\r\n"), "VALUE a 0 1\r\n1\r\nEND\r\n");
        assert!(t.run(b"gats 10 a\r\n").starts_with("VALUE a 0 1 "));
        t.now = 10;
        assert_eq!(t.run(b"get a\r\n"), "END\r\n");
        assert_eq!(t.run(b"gat x a\r\n"), "CLIENT_ERROR bad command line format\r\n");
        assert_eq!(t.run(b"gat 1\r\n"), "ERROR\r\n");
    }

    #[test]
    fn expiry_through_the_protocol() {
        let mut t = T::new();
        t.run(b"set a 0 5 1\r\n1\r\n");
        t.now = 4;
        assert_eq!(t.run(b"get a\r\n"), "VALUE a 0 1\r\n1\r\nEND\r\n");
        t.now = 5;
        assert_eq!(t.run(b"get a\r\n"), "END\r\n");
        assert_eq!(t.run(b"set b 0 -1 1\r\n1\r\nget b\r\n"), "STORED\r\nEND\r\n");
    }

    #[test]
    fn megabyte_values_round_trip() {
        let mut t = T::new();
        let v: Vec<u8> = (0..MAX_VALUE).map(|i| (i % 251) as u8).collect();
        let mut input = format!("set big 1 0 {}\r\n", v.len()).into_bytes();
        input.extend_from_slice(&v);
        input.extend_from_slice(b"\r\n");
        // Arrives in network-sized pieces; the session asks for the whole block.
        t.session.feed(&input[..1000]);
        t.session.process(&mut t.store, 0, &mut t.out);
        assert!(t.session.input_room() >= MAX_VALUE + 2 - 1000);
        assert_eq!(t.run_split(&input[1000..], 1460), "STORED\r\n");
        t.session.feed(b"get big\r\n");
        t.session.process(&mut t.store, 0, &mut t.out);
        // Drain it the way the driver does: front() / consume() in socket-sized pieces.
        let mut got = Vec::new();
        while !t.out.is_empty() {
            let f = t.out.front();
            let n = f.len().min(3000);
            got.extend_from_slice(&f[..n]);
            t.out.consume(n);
        }
        let head = format!("VALUE big 1 {}\r\n", v.len()).into_bytes();
        assert_eq!(&got[..head.len()], &head[..]);
        assert_eq!(&got[head.len()..head.len() + v.len()], &v[..]);
        assert_eq!(&got[head.len() + v.len()..], b"\r\nEND\r\n");
    }

    #[test]
    fn output_backpressure() {
        let mut t = T::new();
        let v = "x".repeat(200_000);
        t.run(format!("set a 0 0 {}\r\n{v}\r\n", v.len()).as_bytes());
        t.session.feed(b"get a\r\nget a\r\nget a\r\nversion\r\n");
        t.session.process(&mut t.store, 0, &mut t.out);
        assert!(t.out.len() >= OUT_HIGH_WATER);
        assert!(t.out.len() < 3 * 200_000, "stopped before running every command");
        assert!(t.session.buffered() > 0);
        let first = t.out.take();
        t.session.process(&mut t.store, 0, &mut t.out);
        let rest = t.out.take();
        let all = [first, rest].concat();
        assert_eq!(all.windows(6).filter(|w| w == b"VALUE ").count(), 3);
        assert!(all.ends_with(b"VERSION 1.6.0-understudy\r\n"));
    }

    #[test]
    fn output_queue() {
        let mut o = Output::new();
        assert!(o.is_empty());
        assert_eq!(o.front(), b"");
        o.consume(5);
        o.push(b"ab");
        o.push(b"cd");
        let big = Rc::new(vec![1u8; SHARE_MIN]);
        o.push_value(&big);
        o.push(b"ef");
        assert_eq!(o.len(), 6 + SHARE_MIN);
        assert_eq!(o.front(), b"abcd");
        o.consume(3);
        assert_eq!(o.front(), b"d");
        o.consume(1);
        assert_eq!(o.front().len(), SHARE_MIN);
        assert_eq!(Rc::strong_count(&big), 2);
        o.consume(SHARE_MIN);
        assert_eq!(Rc::strong_count(&big), 1);
        assert_eq!(o.to_vec(), b"ef");
        assert_eq!(o.take(), b"ef");
        assert!(o.is_empty());
    }

    #[test]
    fn input_room_tracks_state() {
        let mut s = Session::new();
        let mut store = Store::new(16 << 20);
        let mut out = Output::new();
        assert_eq!(s.input_room(), MAX_BUFFERED);
        s.feed(b"set k 0 0 500000\r\n");
        s.process(&mut store, 0, &mut out);
        assert_eq!(s.input_room(), 500_002);
        s.feed(&[0u8; 1000]);
        assert_eq!(s.input_room(), 499_002);
    }
}
