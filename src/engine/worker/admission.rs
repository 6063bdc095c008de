//! Receiving and parsing requests, and admission: whether a connection may
//! take a request slot and a buffer now.
//!
//! A connection that may not stops parsing (it stalls) and waits in the
//! worker's FIFO of stalled connections, which is retried whenever a slot or
//! buffer is freed; no request is ever failed for lack of resources. The
//! rules that keep one client from freezing the others:
//! - a connection holds at most `--inflight` requests and its share of the
//!   buffer budget (`buffers::Refusal::OwnShare`): beyond that it waits for
//!   its own requests, i.e. for its own client;
//! - the last eighth of the request slots and of the buffer budget is kept
//!   for connections that hold nothing, so a new client's first request
//!   gets in however many others are waiting (`Refusal::Pressure`);
//! - a connection that waits on its client for longer than the stall
//!   timeout is dropped (see `lifecycle::housekeeping`).

use io_uring::{opcode, types};

use crate::backend::file_io::FileTask;
use crate::backend::io::AlignedSpan;
use crate::proto::reply::ReplyTo;
use crate::proto::transmission::{self, Command, RequestHeader, Verdict};
use crate::proto::wire::CMD_READ;

use super::super::block_status;
use super::super::buffers::Refusal;
use super::super::conn::{CloseReason, Closing, INLINE_PAYLOAD_BYTES_MAX};
use super::super::pipes;
use super::super::request::Request;
use super::super::user_data::Token;
use super::{LargeReads, LargeWrites, Worker};

/// READs and WRITEs of in-memory files at least this large are served in
/// place; smaller ones keep the copying paths (and their measured 4k
/// latency) exactly as they were.
const IN_PLACE_BYTES_MIN: usize = 64 << 10;
use crate::backend::Backend;

impl Worker {
    pub(super) fn on_recv(&mut self, id: u32, result: i32) {
        let conn = &mut self.conns[id as usize];
        conn.recv_in_flight = false;
        let result = match conn.tls.is_some() && conn.closing != Closing::Hard {
            true => match self.tls_received(id, result) {
                Some(plaintext) => plaintext,
                None => return,
            },
            false => result,
        };
        let conn = &mut self.conns[id as usize];
        if result == -libc::ECANCELED && conn.moving_to.is_some() && conn.closing == Closing::Open {
            // Cancelled to move the connection (see `placement`).
            return self.release_if_idle(id);
        }
        if result <= 0 || conn.closing == Closing::Hard {
            // EOF, reset, cancelled or dropped: a partly received WRITE is
            // abandoned (its buffer is free now that no receive targets it).
            if let Some(request) = conn.payload_request.take() {
                self.free_request(request);
            }
            let conn = &mut self.conns[id as usize];
            if conn.closing == Closing::Open {
                conn.closing = Closing::Graceful;
            }
            conn.closing_because(match result {
                0 => CloseReason::ClientClosed,
                _ if result == -libc::ECANCELED => CloseReason::Shutdown,
                _ => CloseReason::ReceiveFailed(-result),
            });
            return self.release_if_idle(id);
        }
        conn.last_progress = self.now;
        match conn.payload_request {
            Some(request) => {
                let req = &mut self.requests[request as usize];
                req.payload_received += result as usize;
                if req.payload_received == req.client_len() {
                    self.conns[id as usize].payload_request = None;
                    self.start_request(request);
                }
            }
            None => conn.received(result as usize),
        }
        if self.conns.contains(id as usize) {
            self.pump(id);
        }
        // Bytes that raced a shutdown cancel are dropped; the connection may
        // now be idle.
        if self.conns.contains(id as usize) {
            self.release_if_idle(id);
        }
    }

    /// Parses every complete request in the receive buffer, then posts the
    /// next receive. Stops (stalls) when the connection may not take more
    /// now; `retry_stalled` resumes it.
    pub(super) fn pump(&mut self, id: u32) {
        loop {
            // Any step below may release the connection (DISC, hard close).
            let Some(conn) = self.conns.get_mut(id as usize) else { return };
            if conn.recv_in_flight || conn.closing == Closing::Hard {
                return;
            }
            // A WRITE payload still arriving is received even while the
            // connection closes gracefully: its request is already admitted.
            if conn.payload_request.is_some() {
                return self.post_recv(id);
            }
            // A moving connection parses nothing more here: what is in its
            // receive buffer goes with it.
            if conn.closing != Closing::Open || conn.stalled.is_some() || conn.moving_to.is_some() {
                return;
            }
            if conn.drain > 0 {
                let skip = (conn.unparsed().len() as u64).min(conn.drain);
                conn.consume(skip as usize);
                conn.drain -= skip;
                if conn.drain > 0 {
                    return self.post_recv(id);
                }
            }
            let header_bytes = conn.mode().request_header_bytes();
            if conn.unparsed().len() < header_bytes {
                return self.post_recv(id);
            }
            let header = match transmission::decode_request(&conn.unparsed()[..header_bytes], conn.mode()) {
                Ok(header) => header,
                Err(e) => return self.protocol_violation(id, &e),
            };
            let verdict = match transmission::validate(&header, &conn.limits) {
                Ok(verdict) => verdict,
                Err(e) => return self.protocol_violation(id, &e),
            };
            // Small payloads are parsed from the receive buffer once they are
            // all there: one receive then serves many pipelined small writes.
            let inline_payload = match verdict {
                Verdict::Run(Command::BlockStatus { payload, .. }) => payload as usize,
                Verdict::Run(Command::Write { length, .. }) if length as usize <= INLINE_PAYLOAD_BYTES_MAX => {
                    length as usize
                }
                _ => 0,
            };
            if self.conns[id as usize].unparsed().len() < header_bytes + inline_payload {
                return self.post_recv(id);
            }
            if let Err(refusal) = self.admit(id, &header, verdict) {
                return self.stall(id, refusal);
            }
        }
    }

    fn protocol_violation(&mut self, id: u32, error: &dyn std::fmt::Display) {
        self.conns[id as usize].closing_because(CloseReason::ProtocolViolation(error.to_string()));
        self.hard_close(id);
    }

    fn stall(&mut self, id: u32, refusal: Refusal) {
        let conn = &mut self.conns[id as usize];
        debug_assert!(conn.stalled.is_none(), "pump never runs on a stalled connection");
        conn.stalled = Some(refusal);
        self.stalled.push_back(id);
        if refusal == Refusal::Pressure {
            // Buffers freed on another worker wake nobody here: poll.
            self.arm_tick();
        }
    }

    /// Resumes stalled connections in arrival order once something was
    /// freed (or, for budget pressure, the retry tick fired). Each gets one
    /// try per pass; those still blocked go to the back of the queue.
    pub(super) fn retry_stalled(&mut self) {
        if self.stalled.is_empty() || !(self.freed || self.tick_fired) {
            return;
        }
        self.freed = false;
        self.tick_fired = false;
        for _ in 0..self.stalled.len() {
            let Some(id) = self.stalled.pop_front() else { break };
            let Some(conn) = self.conns.get_mut(id as usize) else { continue };
            conn.stalled = None;
            self.pump(id);
        }
    }

    /// A TLS connection's receive completed: decrypts into the place a
    /// plain receive would have filled. Returns the plaintext bytes landed
    /// there (0: the client closed, negative: an error), or None when the
    /// connection was dealt with here (more ciphertext needed, or broken).
    fn tls_received(&mut self, id: u32, result: i32) -> Option<i32> {
        let tls = self.conns[id as usize].tls.as_mut().expect("a TLS connection");
        let nop = tls.completed(result);
        if !nop && result <= 0 {
            return Some(result);
        }
        let (target, len) = self.plaintext_target(id);
        // SAFETY: the target is the free part of the receive buffer or of
        // the WRITE's own buffer (`plaintext_target`), owned by this
        // connection, and no receive into it is in flight (this one just
        // completed, and it received ciphertext elsewhere).
        let target = unsafe { std::slice::from_raw_parts_mut(target, len) };
        let conn = &mut self.conns[id as usize];
        let tls = conn.tls.as_mut().expect("a TLS connection");
        match tls.deliver(target) {
            Ok(0) if tls.peer_closed() => Some(0),
            Ok(0) => {
                // A partial record, or a handshake message (key update)
                // that may want an answer.
                if tls.wants_write() {
                    self.flush_send(id);
                }
                let conn = &self.conns[id as usize];
                if conn.moving_to.is_some() && conn.payload_request.is_none() {
                    // The partial record stays in the transport and goes
                    // with the connection; the next worker receives the rest.
                    self.release_if_idle(id);
                } else {
                    self.post_recv(id);
                }
                None
            }
            Ok(n) => Some(n as i32),
            Err(e) => {
                self.protocol_violation(id, &e);
                None
            }
        }
    }

    /// Where received plaintext goes next: the rest of the WRITE payload
    /// being received, or the free part of the receive buffer (no more
    /// than a rejected request's payload still to skip).
    fn plaintext_target(&mut self, id: u32) -> (*mut u8, usize) {
        let conn = &mut self.conns[id as usize];
        match conn.payload_request {
            Some(request) => {
                let req = &mut self.requests[request as usize];
                let len = req.client_len() - req.payload_received;
                if let Some(start) = req.mapped {
                    // SAFETY: payload_received < length, and the mapping
                    // has `length` bytes from `start`.
                    return (unsafe { start.add(req.payload_received) }, len);
                }
                let at = req.task.span.head + req.payload_received;
                let buffer = req.buffer.as_mut().expect("writes own a buffer");
                // SAFETY: at + len <= span.len <= buffer length.
                (unsafe { buffer.as_ptr().add(at) }, len)
            }
            None => {
                let (target, free) = conn.receive_target();
                let len = if conn.drain > 0 { (conn.drain as usize).min(free) } else { free };
                (target, len)
            }
        }
    }

    fn post_recv(&mut self, id: u32) {
        if self.conns[id as usize].tls.is_some() {
            return self.post_tls_recv(id);
        }
        let (target, len) = self.plaintext_target(id);
        let conn = &mut self.conns[id as usize];
        conn.recv_in_flight = true;
        let entry = opcode::Recv::new(types::Fd(conn.fd()), target, len.min(u32::MAX as usize) as u32)
            .build()
            .user_data(Token::Recv { conn: id }.encode());
        self.push(entry);
    }

    /// Receives ciphertext, or, when plaintext is already decrypted and
    /// waiting, posts a NOP that completes as if it had been received.
    fn post_tls_recv(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        let fd = conn.fd();
        let tls = conn.tls.as_mut().expect("a TLS connection");
        let ready = match tls.ready() {
            Ok(ready) => ready,
            Err(e) => return self.protocol_violation(id, &e),
        };
        tls.posting(ready);
        let token = Token::Recv { conn: id }.encode();
        let entry = if ready {
            opcode::Nop::new().build().user_data(token)
        } else {
            let (target, len) = tls.receive_target();
            opcode::Recv::new(types::Fd(fd), target, len as u32).build().user_data(token)
        };
        conn.recv_in_flight = true;
        self.push(entry);
    }

    /// Whether the connection may take one more request slot.
    fn slot_available(&self, id: u32) -> Result<(), Refusal> {
        let conn = &self.conns[id as usize];
        if conn.inflight >= self.config.inflight_per_conn_max {
            return Err(Refusal::OwnShare);
        }
        let free = self.config.requests_max - self.requests.len();
        let reserve = self.config.requests_max / 8;
        if free == 0 || (conn.inflight > 0 && free <= reserve) {
            return Err(Refusal::Pressure);
        }
        Ok(())
    }

    /// Turns a validated header into a request, or says why the connection
    /// must wait (then nothing was consumed).
    fn admit(&mut self, id: u32, header: &RequestHeader, verdict: Verdict) -> Result<(), Refusal> {
        if !matches!(verdict, Verdict::Run(Command::Disconnect)) {
            self.slot_available(id)?;
        }
        let conn = &mut self.conns[id as usize];
        let header_bytes = conn.mode().request_header_bytes();
        let to = ReplyTo { mode: conn.mode(), cookie: header.cookie, offset: header.offset };
        let command = match verdict {
            Verdict::Run(Command::Disconnect) => {
                conn.consume(header_bytes);
                conn.closing = Closing::Graceful;
                conn.closing_because(CloseReason::Disconnect);
                self.release_if_idle(id);
                return Ok(());
            }
            Verdict::Run(Command::BlockStatus { offset, req_one, payload, .. }) if payload > 0 => {
                return self.admit_status_payload(id, to, offset, req_one, payload as usize);
            }
            Verdict::Run(command) => command,
            Verdict::Empty { payload } | Verdict::Reject { payload, .. } => {
                conn.consume(header_bytes);
                conn.drain = payload;
                let mut req = Request::new(id, to, Command::Flush, self.now);
                req.kind = header.kind;
                if let Verdict::Reject { error, .. } = verdict {
                    req.error = Some(error);
                }
                let request = self.insert_request(req);
                self.finish(request, header.kind == CMD_READ);
                return Ok(());
            }
        };
        let mask = block_status::all_contexts(conn.contexts.len());
        let mut req = self.prepare(id, to, command, mask)?;
        req.status_mask = mask;
        let conn = &mut self.conns[id as usize];
        conn.consume(header_bytes);
        if let Command::Write { length, .. } = command {
            let take = conn.unparsed().len().min(length as usize);
            match req.mapped {
                // SAFETY: `at` has room for the write's `length >= take`
                // bytes (checked by `Mapping::at`); the receive buffer is
                // another mapping, so the two never overlap.
                Some(at) => unsafe { std::ptr::copy_nonoverlapping(conn.unparsed().as_ptr(), at, take) },
                None => {
                    let head = req.task.span.head;
                    let buffer = req.buffer.as_mut().expect("writes own a buffer");
                    buffer.as_mut_slice()[head..head + take].copy_from_slice(&conn.unparsed()[..take]);
                }
            }
            conn.consume(take);
            req.payload_received = take;
            if take < length as usize {
                conn.last_progress = self.now;
                let request = self.insert_request(req);
                self.conns[id as usize].payload_request = Some(request);
                return Ok(());
            }
        }
        let request = self.insert_request(req);
        self.start_request(request);
        Ok(())
    }

    /// BLOCK_STATUS with a payload naming its contexts (extended headers).
    fn admit_status_payload(
        &mut self,
        id: u32,
        to: ReplyTo,
        offset: u64,
        req_one: bool,
        payload: usize,
    ) -> Result<(), Refusal> {
        let conn = &mut self.conns[id as usize];
        let header_bytes = conn.mode().request_header_bytes();
        let bytes = &conn.unparsed()[header_bytes..header_bytes + payload];
        match transmission::parse_status_payload(bytes, offset, conn.limits.export_bytes, &conn.context_ids) {
            Ok((length, mask)) => {
                let command = Command::BlockStatus { offset, length, req_one, payload: 0 };
                let mut req = self.prepare(id, to, command, mask)?;
                self.conns[id as usize].consume(header_bytes + payload);
                req.status_mask = mask;
                let request = self.insert_request(req);
                self.start_request(request);
            }
            Err(error) => {
                conn.consume(header_bytes + payload);
                let mut req = Request::new(id, to, Command::Flush, self.now);
                req.kind = crate::proto::wire::CMD_BLOCK_STATUS;
                req.error = Some(error);
                let request = self.insert_request(req);
                self.finish(request, false);
            }
        }
        Ok(())
    }

    /// Allocates what a command needs, within the connection's share.
    fn prepare(&mut self, id: u32, to: ReplyTo, command: Command, status_mask: u64) -> Result<Request, Refusal> {
        let conn = &self.conns[id as usize];
        let alignment = conn.export.image.backend.alignment();
        let mut req = Request::new(id, to, command, self.now);
        if let Some((at, hole)) = self.in_place_target(id, to, command) {
            // Its data never passes through a buffer.
            req.mapped = Some(at);
            req.hole = hole;
            return Ok(req);
        }
        if let Command::Read { length, .. } = command
            && self.config.large_reads == LargeReads::Splice
            && length as usize >= pipes::SPLICE_READ_BYTES_MIN
            && conn.tls.is_none()
            && matches!(&conn.export.image.backend, Backend::File(file) if file.inline_io)
            && let Some(pipe) = self.pipes.take(length as usize)
        {
            // Its data never enters memory: no buffer.
            req.pipe = Some(pipe);
            return Ok(req);
        }
        let bytes = match command {
            Command::Read { offset, length, .. } | Command::Write { offset, length, .. } => {
                let span = AlignedSpan::new(offset, length as usize, alignment);
                req.task = FileTask::new(span);
                let unaligned_write = matches!(command, Command::Write { .. }) && !span.is_exact(length as usize);
                // An unaligned write reads its partial blocks into scratch space after the span.
                span.len + if unaligned_write { alignment as usize } else { 0 }
            }
            Command::BlockStatus { length, req_one, .. } => {
                let cap = if req_one { 1 } else { self.config.extents_max };
                block_status::reply_bytes_max(to.mode, &conn.contexts, status_mask, length, cap)
            }
            _ => 0,
        };
        if bytes > 0 {
            let held = conn.buffer_bytes;
            let buffer = self.pool.alloc(bytes, held, &self.ring)?;
            self.conns[id as usize].buffer_bytes += buffer.len();
            req.buffer = Some(buffer);
        }
        Ok(req)
    }

    /// Where a large READ or WRITE of an in-memory file is served in place
    /// (one copy, by the kernel: see `backend::mapping`), if it is, and
    /// whether a read is all hole. Writes land in the file as they arrive,
    /// so only images whose writes need nothing done first qualify: no
    /// change tracking (marks are durable before data moves) and no
    /// snapshot preserving old data. A read is sent from the mapping only
    /// where every page of the range is in memory: touching a hole through
    /// a shared mapping would allocate it (tmpfs fills it with a page of
    /// zeroes), and a page swapped out would be faulted in on the worker. A
    /// range that is all hole needs no data in structured replies (one
    /// hole chunk); anything else with holes is copied.
    fn in_place_target(&self, id: u32, to: ReplyTo, command: Command) -> Option<(*mut u8, bool)> {
        let conn = &self.conns[id as usize];
        let (offset, length, df, write) = match command {
            Command::Read { offset, length, df } if self.config.large_reads == LargeReads::InPlace => {
                (offset, length, df, false)
            }
            Command::Write { offset, length, .. } if self.config.large_writes == LargeWrites::InPlace => {
                (offset, length, false, true)
            }
            _ => return None,
        };
        let image = &conn.export.image;
        let Backend::File(file) = &image.backend else { return None };
        let mapping = file.mapping.as_ref()?;
        let len = length as usize;
        let qualifies = len >= IN_PLACE_BYTES_MIN
            && conn.tls.is_none()
            && (!write || (mapping.writable() && image.track.is_none() && !image.has_snapshots()));
        let at = mapping.at(offset, len).filter(|_| qualifies)?;
        // mincore, not SEEK_HOLE: that scans from `offset` to the next
        // hole, to the end of a full file (milliseconds for a GiB).
        if write || mapping.resident(offset, len) {
            return Some((at, false));
        }
        (pipes::hole_chunk_allowed(to.mode, df) && pipes::is_hole(file.buffered_fd(), offset, len))
            .then_some((at, true))
    }

    fn insert_request(&mut self, req: Request) -> u32 {
        let conn = &mut self.conns[req.conn as usize];
        conn.inflight += 1;
        conn.requests_seen += 1;
        // The iovecs of sends in flight point into slab entries; growing the
        // slab would move them (see `WorkerConfig::requests_max`).
        assert!(self.requests.len() < self.requests.capacity(), "request slab must never reallocate");
        self.requests.insert(req) as u32
    }
}
