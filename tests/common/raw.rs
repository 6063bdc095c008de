//! A raw-socket NBD client for tests that need what libnbd will not do:
//! withholding payloads, never reading replies, pipelining without limits,
//! malformed input. Wire constants are written out here from the protocol
//! document, never taken from the server's source, so a wrong constant in
//! the server cannot make its own test pass.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const C_FIXED_NEWSTYLE: u32 = 1;
pub const C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const REPLY_FLAG_DONE: u16 = 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Reply framing the client negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

/// One reply chunk (structured or extended) with its payload.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    /// Only in extended chunks: the request offset, echoed.
    pub offset: Option<u64>,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// An error chunk's (code, message).
    pub fn error(&self) -> Option<(u32, String)> {
        if self.kind & 0x8000 == 0 {
            return None;
        }
        let len = be16(&self.payload[4..]) as usize;
        Some((be32(&self.payload), String::from_utf8_lossy(&self.payload[6..6 + len]).into_owned()))
    }
}

/// A reply of any framing: simple (error code) or a chunk.
#[derive(Debug)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk(Chunk),
}

pub struct Raw {
    pub s: TcpStream,
    pub mode: Mode,
}

/// INFO/GO data: name length, name, info count, codes.
pub fn info_data(name: &str, codes: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(codes.len() as u16).to_be_bytes());
    for c in codes {
        d.extend_from_slice(&c.to_be_bytes());
    }
    d
}

/// LIST/SET_META_CONTEXT data: export name and queries.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// An option frame: IHAVEOPT, option, length, data.
pub fn option_frame(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A compact (28-byte) request header.
pub fn request_bytes(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&length.to_be_bytes());
    h
}

/// An extended (32-byte) request header.
pub fn extended_request_bytes(flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&length.to_be_bytes());
    h
}

impl Raw {
    pub fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s, mode: Mode::Simple }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to server");
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap_or_else(|e| panic!("receiving {n} bytes: {e}"));
        b
    }

    /// Reads the 18-byte greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.recv(18);
        assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting IHAVEOPT");
        be16(&g[16..])
    }

    /// Connects, checks the greeting offers fixed newstyle and NO_ZEROES,
    /// and sends `client_flags`.
    pub fn handshake(addr: &str, client_flags: u32) -> Raw {
        let mut c = Raw::connect(addr);
        let flags = c.greeting();
        assert_eq!(flags & 3, 3, "server must offer fixed newstyle and NO_ZEROES");
        c.send(&client_flags.to_be_bytes());
        c
    }

    /// Handshake plus GO on `name` in simple-reply mode.
    pub fn open(addr: &str, name: &str) -> Raw {
        Raw::open_mode(addr, name, Mode::Simple)
    }

    /// Handshake, the options for `mode`, and GO on `name`.
    pub fn open_mode(addr: &str, name: &str, mode: Mode) -> Raw {
        let mut c = Raw::handshake(addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
        let option = match mode {
            Mode::Simple => None,
            Mode::Structured => Some(OPT_STRUCTURED_REPLY),
            Mode::Extended => Some(OPT_EXTENDED_HEADERS),
        };
        if let Some(option) = option {
            c.option(option, &[]);
            let (_, reply, _) = c.option_reply();
            assert_eq!(reply, REP_ACK, "{mode:?} refused");
        }
        c.go(name);
        c.mode = mode;
        c
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&option_frame(option, data));
    }

    /// One option reply: (option echoed, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(be64(&h), OPTION_REPLY_MAGIC, "option reply magic");
        let data = self.recv(be32(&h[16..]) as usize);
        (be32(&h[8..]), be32(&h[12..]), data)
    }

    /// Sends INFO or GO; returns the NBD_INFO_EXPORT payload (size u64 +
    /// flags u16) or the error reply type.
    pub fn info_or_go(&mut self, option: u32, name: &str) -> Result<Vec<u8>, u32> {
        self.option(option, &info_data(name, &[]));
        let mut export = None;
        loop {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, option, "option echoed");
            match kind {
                REP_INFO if be16(&data) == INFO_EXPORT => {
                    assert_eq!(data.len(), 12, "NBD_INFO_EXPORT length");
                    export = Some(data[2..].to_vec());
                }
                REP_INFO => {}
                REP_ACK => return Ok(export.expect("INFO_EXPORT before ACK")),
                error if error & 0x8000_0000 != 0 => {
                    assert!(export.is_none(), "no INFO before an error reply");
                    return Err(error);
                }
                other => panic!("unexpected reply type {other:#x} to option {option}"),
            }
        }
    }

    /// GO; returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let export = self.info_or_go(OPT_GO, name).unwrap_or_else(|e| panic!("GO {name:?} failed: {e:#x}"));
        (be64(&export), be16(&export[8..]))
    }

    /// A compact (28-byte) request header, whatever was negotiated.
    pub fn request_compact(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&request_bytes(flags, kind, cookie, offset, length));
    }

    /// An extended (32-byte) request header, whatever was negotiated.
    pub fn request_ext(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) {
        self.send(&extended_request_bytes(flags, kind, cookie, offset, length));
    }

    /// A request header in the negotiated framing.
    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) {
        let bytes = match self.mode {
            Mode::Extended => extended_request_bytes(flags, kind, cookie, offset, length),
            _ => request_bytes(flags, kind, cookie, offset, u32::try_from(length).expect("compact length")),
        };
        self.send(&bytes);
    }

    /// The next reply, whatever its framing.
    pub fn reply(&mut self) -> Reply {
        let magic = be32(&self.recv(4));
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let r = self.recv(12);
                Reply::Simple { error: be32(&r), cookie: be64(&r[4..]) }
            }
            STRUCTURED_REPLY_MAGIC => {
                let r = self.recv(16);
                let payload = self.recv(be32(&r[12..]) as usize);
                Reply::Chunk(Chunk {
                    flags: be16(&r),
                    kind: be16(&r[2..]),
                    cookie: be64(&r[4..]),
                    offset: None,
                    payload,
                })
            }
            EXTENDED_REPLY_MAGIC => {
                let r = self.recv(28);
                let length = be64(&r[20..]);
                assert!(length < 64 << 20, "absurd extended payload length {length}");
                let payload = self.recv(length as usize);
                Reply::Chunk(Chunk {
                    flags: be16(&r),
                    kind: be16(&r[2..]),
                    cookie: be64(&r[4..]),
                    offset: Some(be64(&r[12..])),
                    payload,
                })
            }
            other => panic!("bad reply magic {other:#010x}"),
        }
    }

    /// A simple reply: (error, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        match self.reply() {
            Reply::Simple { error, cookie } => (error, cookie),
            Reply::Chunk(c) => panic!("expected a simple reply, got chunk {c:?}"),
        }
    }

    pub fn chunk(&mut self) -> Chunk {
        match self.reply() {
            Reply::Chunk(c) => c,
            Reply::Simple { error, cookie } => panic!("expected a chunk, got simple reply {error} for {cookie}"),
        }
    }

    /// The outcome of a payload-less reply in any mode: (error, cookie, the
    /// error message if a structured error carried one).
    pub fn status(&mut self) -> (u32, u64, String) {
        match self.reply() {
            Reply::Simple { error, cookie } => (error, cookie, String::new()),
            Reply::Chunk(c) => match c.error() {
                Some((code, message)) => (code, c.cookie, message),
                None => {
                    assert_eq!(c.kind, CHUNK_NONE, "payload-less success is NONE");
                    (0, c.cookie, String::new())
                }
            },
        }
    }

    /// WRITE; returns (error, message).
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> (u32, String) {
        self.write_flags(0, cookie, offset, data)
    }

    pub fn write_flags(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) -> (u32, String) {
        self.request(flags, CMD_WRITE, cookie, offset, data.len() as u64);
        self.send(data);
        let (error, got, message) = self.status();
        assert_eq!(got, cookie, "cookie echoed");
        (error, message)
    }

    /// A WRITE that must succeed.
    pub fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let (error, message) = self.write(cookie, offset, data);
        assert_eq!(error, 0, "WRITE of {} bytes at {offset} failed: {message}", data.len());
    }

    /// A READ that must succeed.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        self.read(cookie, offset, length).unwrap_or_else(|e| panic!("READ of {length} bytes at {offset} failed: {e:?}"))
    }

    /// READ in simple or structured mode (data chunks and holes assembled).
    pub fn read(&mut self, cookie: u64, offset: u64, length: u32) -> Result<Vec<u8>, (u32, String)> {
        self.request(0, CMD_READ, cookie, offset, u64::from(length));
        if self.mode == Mode::Simple {
            let (error, got) = self.simple();
            assert_eq!(got, cookie, "cookie echoed");
            if error != 0 {
                return Err((error, String::new()));
            }
            return Ok(self.recv(length as usize));
        }
        let mut data = vec![0u8; length as usize];
        let mut failure = None;
        loop {
            let chunk = self.chunk();
            assert_eq!(chunk.cookie, cookie, "cookie echoed");
            match chunk.kind {
                CHUNK_OFFSET_DATA => {
                    let at = (be64(&chunk.payload) - offset) as usize;
                    data[at..at + chunk.payload.len() - 8].copy_from_slice(&chunk.payload[8..]);
                }
                CHUNK_OFFSET_HOLE => {
                    let at = (be64(&chunk.payload) - offset) as usize;
                    data[at..at + be32(&chunk.payload[8..]) as usize].fill(0);
                }
                CHUNK_NONE => {}
                _ => failure = chunk.error(),
            }
            if chunk.flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        failure.map_or(Ok(data), Err)
    }

    /// A payload-less command; (error, message).
    pub fn command(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> (u32, String) {
        self.request(flags, kind, cookie, offset, length);
        let (error, got, message) = self.status();
        assert_eq!(got, cookie, "cookie echoed");
        (error, message)
    }

    pub fn flush(&mut self, cookie: u64) -> u32 {
        self.command(0, CMD_FLUSH, cookie, 0, 0).0
    }

    pub fn disconnect(mut self) {
        let _ = self.s.write_all(&match self.mode {
            Mode::Extended => extended_request_bytes(0, CMD_DISC, 0, 0, 0),
            _ => request_bytes(0, CMD_DISC, 0, 0, 0),
        });
    }

    /// Waits for the server to close its end without reading anything (so a
    /// test can watch a client that never reads). True if it closed within
    /// `timeout`.
    pub fn hung_up_within(&self, timeout: Duration) -> bool {
        let mut pollfd =
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&self.s), events: libc::POLLRDHUP, revents: 0 };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pollfd, 1, left.as_millis() as i32) };
            if rc > 0 && pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return true;
            }
            if left.is_zero() {
                return false;
            }
        }
    }

    /// Waits for the server to close; discards anything it still sends.
    /// Returns how long it took, or None if it stayed open for `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.s.read(&mut scratch) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(start.elapsed()), // reset
            }
        }
    }
}

/// Closes with SO_LINGER 0, so the server sees a reset rather than a FIN.
pub fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}
