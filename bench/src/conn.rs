//! One NBD connection in transmission: its request slots and buffers, the
//! batched send path and the receive path feeding the reply parser.
//!
//! Memory is allocated once, in [`Conn::new`], and never resized, because
//! the kernel holds pointers into it while operations are in flight:
//! - `buffer`: one region per slot, `HEADER_ROOM_BYTES` for the request
//!   header followed by `data_bytes` for the write payload or read data.
//!   A write's header ends exactly where its payload starts, so header and
//!   payload go out as one iovec.
//! - `staging`: where replies are received, unless read data is long
//!   enough to be received straight into its slot.
//! - `iovecs` and `msghdr`: the send batch in flight.
//!
//! Everything the kernel reads or writes is on the heap, so a `Conn` itself
//! may move; the heap blocks must stay put until their completions arrive.
//!
//! A slot is busy from `issue` until both its send completed and its reply
//! arrived, in either order. At most one send and one recv are in flight.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use io_uring::{opcode, squeue, types};

use crate::engine::EngineError;
use crate::job::{Completion, Issue, Job};
use crate::send_batch;
use crate::tls::{Records, Socket};
use crate::user_data::{self, Op};
use ringnbd::proto::client::codec::{self, Command, Framing, REQUEST_BYTES_MAX, Request};
use ringnbd::proto::client::handshake::Session;
use ringnbd::proto::client::replies::{Event, PARSER_LOOKAHEAD_BYTES_MAX, ReplyParser, ReplySink, RequestInfo};

/// Room before each slot's data for the largest request header.
const HEADER_ROOM_BYTES: usize = REQUEST_BYTES_MAX;
/// The receive staging buffer: many small replies per recv, and always
/// room for the parser's largest lookahead.
const STAGING_BYTES: usize = 256 * 1024;
const _: () = assert!(STAGING_BYTES >= 4 * PARSER_LOOKAHEAD_BYTES_MAX);
/// Read data at least this long goes straight into its slot: below it, the
/// extra recv costs more than the copy it saves.
const DIRECT_RECV_BYTES_MIN: u64 = 64 * 1024;
/// With requests that large, staging receives take only a header's worth
/// (extended chunk header + OFFSET_DATA offset), so read data is never
/// received into staging and copied, only received in place.
const HEADER_RECV_BYTES: usize = 32 + 8;
/// Cookies carry the slot in their low 16 bits and a per-slot sequence
/// number above, so a duplicate or stale reply never matches a reused slot.
const COOKIE_SLOT_BITS: u32 = 16;
pub const SLOTS_MAX: usize = 1 << COOKIE_SLOT_BITS;

#[derive(Debug, Clone, Copy)]
struct Slot {
    cookie: u64,
    command: Command,
    offset: u64,
    length: u64,
    /// Latency origin (the due time in open loop).
    start: Instant,
    /// When it was actually queued for sending (for `--timeout`).
    issued: Instant,
    /// Header bytes in front of the data region.
    header_bytes: usize,
    /// Invariant: a busy slot has `sending || awaiting`.
    sending: bool,
    awaiting: bool,
    /// Read bytes received so far (data and holes).
    covered: u64,
}

/// Where the recv in flight writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvTarget {
    Staging,
    /// Straight into read data the parser is waiting for.
    Direct,
}

/// A request that got an error reply: the run stops with this.
#[derive(Debug)]
pub struct ServerFailure {
    pub command: Command,
    pub offset: u64,
    pub length: u64,
    pub code: u32,
    pub message: String,
}

pub struct Conn {
    fd: OwnedFd,
    /// Global connection number, for messages.
    pub global: usize,
    framing: Framing,
    slots: Vec<Slot>,
    /// Free slot indices. Capacity = slots, so pushes never allocate.
    free: Vec<usize>,
    buffer: Vec<u8>,
    /// Bytes per slot in `buffer`: header room + data.
    stride: usize,
    data_bytes: usize,
    /// Slots issued but not yet in a send batch.
    send_queue: VecDeque<usize>,
    /// The batch in flight: slot per iovec, and the first not fully sent.
    batch: Vec<usize>,
    batch_next: usize,
    iovecs: Vec<libc::iovec>,
    /// Boxed: the kernel reads it while a send is in flight, and a `Conn`
    /// may move (all memory the kernel sees is on the heap).
    msghdr: Box<libc::msghdr>,
    send_in_flight: bool,
    staging: Vec<u8>,
    /// Invariant: `staging_start <= staging_end <= STAGING_BYTES`; bytes
    /// between them are received but not yet parsed.
    staging_start: usize,
    staging_end: usize,
    /// The most one staging recv asks for (see `HEADER_RECV_BYTES`).
    staging_recv_bytes_max: usize,
    recv_target: RecvTarget,
    recv_in_flight: bool,
    /// The server closed its side.
    pub eof: bool,
    parser: ReplyParser,
    /// Requests awaiting a reply.
    awaiting: usize,
    /// A TLS failure found while building an operation, reported by the
    /// next completion.
    tls_error: Option<String>,
    /// The record layer of an `nbds://` connection.
    tls: Option<Box<Records>>,
}

impl Conn {
    pub fn new(socket: Socket, global: usize, session: &Session, iodepth: usize, data_bytes: usize) -> Conn {
        let Socket { fd, tls } = socket;
        assert!(iodepth > 0 && iodepth <= SLOTS_MAX);
        let stride = HEADER_ROOM_BYTES + data_bytes;
        let now = Instant::now();
        let slot = Slot {
            cookie: 0,
            command: Command::Read,
            offset: 0,
            length: 0,
            start: now,
            issued: now,
            header_bytes: 0,
            sending: false,
            awaiting: false,
            covered: 0,
        };
        Conn {
            fd,
            global,
            framing: session.framing,
            slots: vec![slot; iodepth],
            free: (0..iodepth).rev().collect(),
            buffer: vec![0; stride * iodepth],
            stride,
            data_bytes,
            send_queue: VecDeque::with_capacity(iodepth),
            batch: Vec::with_capacity(iodepth),
            batch_next: 0,
            iovecs: Vec::with_capacity(iodepth),
            // SAFETY: msghdr is a plain C struct for which all-zero is the
            // documented "no name, no control data" initial state.
            msghdr: Box::new(unsafe { std::mem::zeroed() }),
            send_in_flight: false,
            staging: vec![0; STAGING_BYTES],
            staging_start: 0,
            staging_end: 0,
            // TLS decrypts into staging: there is no receiving in place.
            staging_recv_bytes_max: if data_bytes as u64 >= DIRECT_RECV_BYTES_MIN && tls.is_none() {
                HEADER_RECV_BYTES
            } else {
                STAGING_BYTES
            },
            recv_target: RecvTarget::Staging,
            recv_in_flight: false,
            eof: false,
            parser: ReplyParser::new(session.framing, session.context_id),
            awaiting: 0,
            tls_error: None,
            tls: tls.map(|conn| Box::new(Records::new(conn))),
        }
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Requests sent (or queued) and not yet answered.
    pub fn awaiting(&self) -> usize {
        self.awaiting
    }

    /// Operations of this connection the kernel may still be using.
    pub fn ops_in_flight(&self) -> usize {
        usize::from(self.send_in_flight) + usize::from(self.recv_in_flight)
    }

    pub fn send_idle(&self) -> bool {
        !self.send_in_flight && self.send_queue.is_empty() && self.batch_next == self.batch.len()
    }

    /// Fills every slot's data region from `next` (write payloads that a
    /// run does not stamp), eight bytes at a time.
    pub fn fill_data(&mut self, mut next: impl FnMut() -> u64) {
        for slot in 0..self.slots.len() {
            let start = slot * self.stride + HEADER_ROOM_BYTES;
            for word in self.buffer[start..start + self.data_bytes].chunks_mut(8) {
                word.copy_from_slice(&next().to_le_bytes()[..word.len()]);
            }
        }
    }

    pub fn take_free_slot(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// Returns a slot taken with `take_free_slot` but not used.
    pub fn return_slot(&mut self, slot: usize) {
        debug_assert!(!self.slots[slot].sending && !self.slots[slot].awaiting);
        self.free.push(slot);
    }

    /// Encodes `issue` into `slot`, lets `fill` write a WRITE's payload,
    /// and queues the request for the next send batch.
    pub fn issue(
        &mut self,
        slot: usize,
        issue: Issue,
        now: Instant,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), EngineError> {
        let s = &mut self.slots[slot];
        assert!(!s.sending && !s.awaiting, "slot {slot} is busy");
        let payload = issue.command == Command::Write;
        assert!(!payload || issue.length <= self.data_bytes as u64, "write larger than its slot");
        let sequence = (s.cookie >> COOKIE_SLOT_BITS).wrapping_add(1);
        let cookie = (sequence << COOKIE_SLOT_BITS) | slot as u64;
        let request = Request { command: issue.command, flags: 0, cookie, offset: issue.offset, length: issue.length };
        let mut header = [0u8; REQUEST_BYTES_MAX];
        let header_bytes = codec::encode_request(&request, self.framing, &mut header).map_err(EngineError::Encode)?;
        let data_start = slot * self.stride + HEADER_ROOM_BYTES;
        self.buffer[data_start - header_bytes..data_start].copy_from_slice(&header[..header_bytes]);
        if payload {
            fill(&mut self.buffer[data_start..data_start + issue.length as usize]);
        }
        *s = Slot {
            cookie,
            command: issue.command,
            offset: issue.offset,
            length: issue.length,
            start: issue.start,
            issued: now,
            header_bytes,
            sending: true,
            awaiting: true,
            covered: 0,
        };
        self.awaiting += 1;
        self.send_queue.push_back(slot);
        Ok(())
    }

    /// The SQE for the next send, if one is due: the remainder of a short
    /// send first, else everything queued as one sendmsg.
    pub fn next_send(&mut self, conn: usize) -> Option<squeue::Entry> {
        if self.send_in_flight {
            return None;
        }
        let resending = self.tls.as_ref().is_some_and(|r| r.sending());
        if self.batch_next == self.batch.len() && !resending {
            if self.send_queue.is_empty() {
                return None;
            }
            self.batch.clear();
            self.iovecs.clear();
            self.batch_next = 0;
            for slot in self.send_queue.drain(..) {
                let s = &self.slots[slot];
                let data_start = slot * self.stride + HEADER_ROOM_BYTES;
                let payload = if s.command == Command::Write { s.length as usize } else { 0 };
                let base = self.buffer[data_start - s.header_bytes..].as_mut_ptr();
                self.iovecs.push(libc::iovec { iov_base: base.cast(), iov_len: s.header_bytes + payload });
                self.batch.push(slot);
            }
        }
        if let Some(records) = self.tls.as_mut() {
            // The whole batch is encrypted at once; a short send resends
            // the rest of its ciphertext.
            let buffer = &self.buffer;
            let parts = self.iovecs[self.batch_next..].iter().map(|iov| {
                let start = iov.iov_base as usize - buffer.as_ptr() as usize;
                &buffer[start..start + iov.iov_len]
            });
            let (bytes, len) = match records.stage(parts) {
                Ok(staged) => staged,
                Err(e) => {
                    self.tls_error = Some(e.to_string());
                    return None;
                }
            };
            self.send_in_flight = true;
            let entry = opcode::Send::new(types::Fd(self.fd.as_raw_fd()), bytes, len as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data::encode(Op::Send, conn));
            return Some(entry);
        }
        let pending = &mut self.iovecs[self.batch_next..];
        self.msghdr.msg_iov = pending.as_mut_ptr();
        self.msghdr.msg_iovlen = pending.len();
        self.send_in_flight = true;
        let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &*self.msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data::encode(Op::Send, conn));
        Some(entry)
    }

    pub fn on_send(&mut self, result: i32) -> Result<(), EngineError> {
        assert!(self.send_in_flight);
        self.send_in_flight = false;
        if result < 0 {
            return match -result {
                // Transient: the same remainder is sent again next tick.
                libc::EINTR | libc::EAGAIN => Ok(()),
                errno => Err(self.socket_error("send", errno)),
            };
        }
        let plaintext = match self.tls.as_mut() {
            None => result as usize,
            Some(records) => match records.sent(result as usize) {
                Some(plaintext) => plaintext,
                None => return Ok(()),
            },
        };
        let completed = send_batch::consume(&mut self.iovecs[self.batch_next..], plaintext);
        for i in self.batch_next..self.batch_next + completed {
            let slot = self.batch[i];
            let s = &mut self.slots[slot];
            s.sending = false;
            if !s.awaiting {
                self.free.push(slot);
            }
        }
        self.batch_next += completed;
        Ok(())
    }

    /// The SQE for the next recv, unless one is in flight or the peer closed.
    pub fn next_recv(&mut self, conn: usize) -> Option<squeue::Entry> {
        if self.recv_in_flight || self.eof {
            return None;
        }
        let fd = types::Fd(self.fd.as_raw_fd());
        if let Some(records) = self.tls.as_mut() {
            let next = match records.next_recv() {
                Ok(next) => next,
                Err(e) => {
                    self.tls_error = Some(e.to_string());
                    return None;
                }
            };
            self.recv_in_flight = true;
            self.recv_target = RecvTarget::Staging;
            let entry = match next {
                Some((pointer, length)) => opcode::Recv::new(fd, pointer, length as u32).build(),
                None => opcode::Nop::new().build(),
            };
            return Some(entry.user_data(user_data::encode(Op::Recv, conn)));
        }
        let direct = self
            .parser
            .pending_data()
            .filter(|&(_, _, remaining)| self.staging_start == self.staging_end && remaining >= DIRECT_RECV_BYTES_MIN);
        let (pointer, length) = if let Some((cookie, at, remaining)) = direct {
            let slot = (cookie as usize) & (SLOTS_MAX - 1);
            // The parser checked at + remaining <= the request length, and
            // reads never exceed the slot's data region.
            assert!(at + remaining <= self.slots[slot].length && self.slots[slot].length <= self.data_bytes as u64);
            let start = slot * self.stride + HEADER_ROOM_BYTES + at as usize;
            self.recv_target = RecvTarget::Direct;
            (self.buffer[start..].as_mut_ptr(), remaining.min(u64::from(u32::MAX)) as u32)
        } else {
            self.compact_staging();
            self.recv_target = RecvTarget::Staging;
            let free = &mut self.staging[self.staging_end..];
            (free.as_mut_ptr(), free.len().min(self.staging_recv_bytes_max) as u32)
        };
        // Direct receives wait for the whole remainder (io_uring retries
        // short reads internally): one completion per payload instead of
        // one per socket-buffer's worth.
        let flags = if self.recv_target == RecvTarget::Direct { libc::MSG_WAITALL } else { 0 };
        self.recv_in_flight = true;
        let entry = opcode::Recv::new(fd, pointer, length).flags(flags).build();
        Some(entry.user_data(user_data::encode(Op::Recv, conn)))
    }

    /// Moves unparsed bytes (a partial header or error payload, bounded by
    /// the parser's lookahead) to the front of the staging buffer.
    fn compact_staging(&mut self) {
        if self.staging_start == 0 {
            return;
        }
        let pending = self.staging_end - self.staging_start;
        assert!(pending <= PARSER_LOOKAHEAD_BYTES_MAX, "the parser leaves at most its lookahead unparsed");
        self.staging.copy_within(self.staging_start..self.staging_end, 0);
        self.staging_start = 0;
        self.staging_end = pending;
    }

    /// A recv completed: parse what arrived and hand replies to `job`.
    /// Returns the first server error reply, which ends the run.
    pub fn on_recv<J: Job>(
        &mut self,
        result: i32,
        job: &mut J,
        conn: usize,
        now: Instant,
    ) -> Result<Option<ServerFailure>, EngineError> {
        assert!(self.recv_in_flight);
        self.recv_in_flight = false;
        if let Some(error) = self.tls_error.take() {
            return Err(EngineError::Protocol { conn: self.global, error: format!("TLS: {error}") });
        }
        // Over TLS the target is chosen now: read data the parser waits
        // for is decrypted straight into its slot, anything else into
        // staging.
        let direct = match self.tls.is_some() {
            true => self.parser.pending_data().filter(|_| self.staging_start == self.staging_end),
            false => None,
        };
        if self.tls.is_some() && direct.is_none() {
            self.compact_staging();
            self.recv_target = RecvTarget::Staging;
        }
        let result = match self.tls.as_mut() {
            None => result,
            Some(records) => {
                let target = match direct {
                    Some((cookie, at, remaining)) => {
                        let slot = (cookie as usize) & (SLOTS_MAX - 1);
                        assert!(
                            at + remaining <= self.slots[slot].length
                                && self.slots[slot].length <= self.data_bytes as u64
                        );
                        self.recv_target = RecvTarget::Direct;
                        let start = slot * self.stride + HEADER_ROOM_BYTES + at as usize;
                        &mut self.buffer[start..start + remaining as usize]
                    }
                    None => &mut self.staging[self.staging_end..],
                };
                match records.received(result, target) {
                    Ok(Some(0)) => return Ok(None),
                    Ok(Some(n)) => n as i32,
                    Ok(None) => result.min(0),
                    Err(e) => return Err(EngineError::Protocol { conn: self.global, error: format!("TLS: {e}") }),
                }
            }
        };
        if result < 0 {
            return match -result {
                libc::EINTR | libc::EAGAIN | libc::ENOBUFS => Ok(None),
                errno => Err(self.socket_error("recv", errno)),
            };
        }
        if result == 0 {
            self.eof = true;
            return Err(EngineError::Closed { conn: self.global, outstanding: self.awaiting });
        }
        let received = result as usize;
        let Conn { parser, staging, slots, buffer, free, awaiting, stride, .. } = self;
        let mut sink =
            Sink { slots, buffer, stride: *stride, free, awaiting, job, conn, now, failure: None, violation: None };
        let parsed = if self.recv_target == RecvTarget::Direct {
            parser.data_landed(received as u64, &mut sink);
            Ok(())
        } else {
            self.staging_end += received;
            let input = &staging[self.staging_start..self.staging_end];
            parser.parse(input, &mut sink).map(|used| self.staging_start += used)
        };
        let (failure, violation) = (sink.failure, sink.violation);
        if self.staging_start == self.staging_end {
            self.staging_start = 0;
            self.staging_end = 0;
        }
        let global = self.global;
        parsed.map_err(|error| EngineError::Protocol { conn: global, error: error.to_string() })?;
        if let Some(error) = violation {
            return Err(EngineError::Protocol { conn: global, error });
        }
        Ok(failure)
    }

    /// The oldest request waiting for a reply: `(command, offset, issued)`.
    pub fn oldest_awaiting(&self) -> Option<(Command, u64, Instant)> {
        self.slots.iter().filter(|s| s.awaiting).map(|s| (s.command, s.offset, s.issued)).min_by_key(|s| s.2)
    }

    /// Teardown: a completion arrived that will not be processed.
    pub fn forget(&mut self, op: Op) {
        match op {
            Op::Send => self.send_in_flight = false,
            Op::Recv => self.recv_in_flight = false,
        }
    }

    /// After DISC: any reply bytes now are a violation, EOF is the goal.
    pub fn on_recv_after_disconnect(&mut self, result: i32) -> Result<(), EngineError> {
        self.recv_in_flight = false;
        match result {
            // EOF, or the server reset the connection after closing: both end it.
            0 => self.eof = true,
            r if r < 0 && -r != libc::EINTR && -r != libc::EAGAIN => self.eof = true,
            r if r < 0 => {}
            // The server's close_notify (and, over TLS, nothing else can be
            // told apart from it without decrypting).
            _ if self.tls.is_some() => {}
            _ => {
                self.eof = true;
                return Err(EngineError::Protocol { conn: self.global, error: "data received after DISC".into() });
            }
        }
        Ok(())
    }

    /// The DISC request as it goes on the wire: encrypted and followed by
    /// close_notify over TLS.
    pub fn disconnect_request(&mut self) -> Result<Vec<u8>, EngineError> {
        let request = Request { command: Command::Disconnect, flags: 0, cookie: 0, offset: 0, length: 0 };
        let mut out = [0u8; REQUEST_BYTES_MAX];
        let n = codec::encode_request(&request, self.framing, &mut out).expect("zero length fits");
        match self.tls.as_mut() {
            None => Ok(out[..n].to_vec()),
            Some(records) => records
                .seal_last(&out[..n])
                .map_err(|e| EngineError::Protocol { conn: self.global, error: format!("TLS: {e}") }),
        }
    }

    fn socket_error(&self, operation: &'static str, errno: i32) -> EngineError {
        EngineError::Socket { conn: self.global, operation, error: std::io::Error::from_raw_os_error(errno) }
    }
}

/// The parser's view of a connection while one recv is digested.
struct Sink<'a, J: Job> {
    slots: &'a mut [Slot],
    buffer: &'a mut [u8],
    stride: usize,
    free: &'a mut Vec<usize>,
    awaiting: &'a mut usize,
    job: &'a mut J,
    conn: usize,
    now: Instant,
    /// The first error reply.
    failure: Option<ServerFailure>,
    /// The first violation found by the job or by reply accounting.
    violation: Option<String>,
}

impl<J: Job> Sink<'_, J> {
    fn slot_of(cookie: u64) -> usize {
        (cookie as usize) & (SLOTS_MAX - 1)
    }

    fn data_mut(&mut self, slot: usize, at: u64, length: usize) -> &mut [u8] {
        let start = slot * self.stride + HEADER_ROOM_BYTES + at as usize;
        &mut self.buffer[start..start + length]
    }

    fn done(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.awaiting = false;
        *self.awaiting -= 1;
        if !s.sending {
            self.free.push(slot);
        }
        let s = *s;
        if self.failure.is_some() || self.violation.is_some() {
            return;
        }
        if s.command == Command::Read && s.covered != s.length {
            self.violation = Some(format!("READ reply covered {} of {} bytes", s.covered, s.length));
            return;
        }
        let data_start = slot * self.stride + HEADER_ROOM_BYTES;
        let data_bytes = if s.command == Command::Read { s.length as usize } else { 0 };
        let completion = Completion {
            command: s.command,
            offset: s.offset,
            length: s.length,
            latency_ns: self.now.saturating_duration_since(s.start).as_nanos().min(u128::from(u64::MAX)) as u64,
            now: self.now,
            data: &self.buffer[data_start..data_start + data_bytes],
        };
        if let Err(e) = self.job.on_done(self.conn, slot, &completion) {
            self.violation = Some(e);
        }
    }
}

impl<J: Job> ReplySink for Sink<'_, J> {
    fn request(&self, cookie: u64) -> Option<RequestInfo> {
        let s = self.slots.get(Self::slot_of(cookie))?;
        (s.awaiting && s.cookie == cookie).then_some(RequestInfo {
            command: s.command,
            offset: s.offset,
            length: s.length,
        })
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Data { cookie, at, bytes } => {
                let slot = Self::slot_of(cookie);
                self.data_mut(slot, at, bytes.len()).copy_from_slice(bytes);
                self.slots[slot].covered += bytes.len() as u64;
            }
            Event::DataLanded { cookie, length, .. } => self.slots[Self::slot_of(cookie)].covered += length,
            Event::Hole { cookie, at, length } => {
                let slot = Self::slot_of(cookie);
                self.data_mut(slot, at, length as usize).fill(0);
                self.slots[slot].covered += length;
            }
            Event::Extent { cookie, first, offset, length, status } => {
                if let Err(e) = self.job.on_extent(self.conn, Self::slot_of(cookie), first, offset, length, status)
                    && self.violation.is_none()
                {
                    self.violation = Some(e);
                }
            }
            Event::Error { cookie, code, message } => {
                let s = &self.slots[Self::slot_of(cookie)];
                if self.failure.is_none() {
                    self.failure = Some(ServerFailure {
                        command: s.command,
                        offset: s.offset,
                        length: s.length,
                        code,
                        message: message.to_string(),
                    });
                }
            }
            Event::Done { cookie } => self.done(Self::slot_of(cookie)),
        }
    }
}
