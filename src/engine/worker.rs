//! A worker: one pinned thread, one io_uring, one registered buffer region,
//! and the connections handed to it after negotiation.
//!
//! Loop: flush spilled SQEs and wait for a completion; copy a batch of CQEs
//! out; dispatch each by its [`Token`]; retry deferred requests. Nothing on
//! this path blocks except `io_uring_enter`, and nothing allocates once the
//! slabs and queues have reached their configured capacity.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_channel::Receiver;
use io_uring::{opcode, types};
use slab::Slab;

use crate::backend::Backend;
use crate::export::Export;
use crate::meta::extent::Extent;
use crate::meta::lookup::{LookupDone, LookupJob, LookupService};
use crate::proto::NbdError;
use crate::proto::handshake::Negotiated;
use crate::proto::reply::{self, ReplyTo};
use crate::proto::transmission::{self, Command, ReplyMode, RequestHeader, RequestLimits, Verdict};

use super::EngineError;
use super::block_status::{self, Gathered, Query};
use super::buffers::BufferPool;
use super::conn::{Closing, Conn, INLINE_PAYLOAD_BYTES_MAX};
use super::file_io::{FileIo, Next};
use super::memory_io;
use super::request::{AlignedSpan, Request, Step};
use super::ring::{Completion, REAP_BATCH_MAX, Ring};
use super::sparse_read::{self, Run};
use super::user_data::Token;
use super::write_path;

/// Every per-worker limit, set once at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub ring_entries: u32,
    pub buffer_bytes: usize,
    /// Requests one connection may have between header and reply sent.
    pub inflight_per_conn_max: usize,
    /// Request slots across all of the worker's connections.
    pub requests_max: usize,
    pub payload_bytes_max: u32,
    /// Descriptors per context in one BLOCK_STATUS reply.
    pub extents_max: usize,
    /// How long shutdown waits for in-flight requests before it drops the
    /// connections still busy (a client stalled mid-payload, or one that
    /// stopped reading its replies, would otherwise hold the server forever).
    pub drain_timeout: std::time::Duration,
    /// Kernel submission polling with this idle timeout (`--sqpoll`).
    pub sqpoll_idle_ms: Option<u32>,
    pub verbose: bool,
}

/// A negotiated connection on its way to a worker.
pub struct NewConnection {
    pub socket: OwnedFd,
    pub negotiated: Negotiated,
    pub peer: String,
    /// The core the socket's packets arrive on (SO_INCOMING_CPU), if known.
    pub incoming_cpu: Option<usize>,
}

/// How long deferred requests wait before a retry.
const DEFER_RETRY_NS: u32 = 200_000;

pub struct Worker {
    index: usize,
    ring: Ring,
    pool: BufferPool,
    exports: Arc<[Arc<Export>]>,
    conns: Slab<Box<Conn>>,
    requests: Slab<Request>,
    config: WorkerConfig,
    incoming: Receiver<NewConnection>,
    wake_fd: Arc<OwnedFd>,
    /// Target of the eventfd read; boxed so its address is stable while the
    /// read is in flight.
    wake_value: Box<u64>,
    tick: Box<types::Timespec>,
    tick_armed: bool,
    drain_deadline: Box<types::Timespec>,
    deferred: VecDeque<u32>,
    stalled: Vec<u32>,
    load: Arc<AtomicUsize>,
    shutdown: Arc<AtomicBool>,
    draining: bool,
    batch: Vec<Completion>,
    /// Scratch for BLOCK_STATUS answers gathered inline.
    extents: Vec<Extent>,
    lookups: LookupService,
}

pub struct WorkerParts {
    pub index: usize,
    pub config: WorkerConfig,
    pub exports: Arc<[Arc<Export>]>,
    pub incoming: Receiver<NewConnection>,
    pub wake_fd: Arc<OwnedFd>,
    pub load: Arc<AtomicUsize>,
    pub shutdown: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(parts: WorkerParts) -> Result<Self, EngineError> {
        let config = parts.config;
        let ring = Ring::new(config.ring_entries, config.sqpoll_idle_ms).map_err(EngineError::Ring)?;
        let mut pool = BufferPool::new(config.buffer_bytes).map_err(EngineError::Buffers)?;
        // SAFETY: the region stays mapped for the worker's lifetime, which
        // outlives the ring's use of it (the ring is dropped first: field order).
        let registered = unsafe { ring.submitter().register_buffers(&[pool.iovec()]) };
        if let Err(e) = &registered {
            eprintln!("ringnbd: worker {}: buffer registration failed ({e}); using unregistered I/O", parts.index);
        }
        pool.set_registered(registered.is_ok());
        let lookups = LookupService::spawn(parts.index, Arc::clone(&parts.exports), Arc::clone(&parts.wake_fd))
            .map_err(EngineError::Helper)?;
        Ok(Self {
            lookups,
            index: parts.index,
            ring,
            pool,
            exports: parts.exports,
            conns: Slab::with_capacity(64),
            requests: Slab::with_capacity(config.requests_max),
            incoming: parts.incoming,
            wake_fd: parts.wake_fd,
            wake_value: Box::new(0),
            tick: Box::new(types::Timespec::new().nsec(DEFER_RETRY_NS)),
            tick_armed: false,
            drain_deadline: Box::new(
                types::Timespec::new().sec(config.drain_timeout.as_secs()).nsec(config.drain_timeout.subsec_nanos()),
            ),
            deferred: VecDeque::with_capacity(config.requests_max),
            stalled: Vec::with_capacity(64),
            load: parts.load,
            shutdown: parts.shutdown,
            draining: false,
            batch: Vec::with_capacity(REAP_BATCH_MAX),
            extents: Vec::with_capacity(config.extents_max.min(1 << 16)),
            config,
        })
    }

    pub fn run(mut self) -> Result<(), EngineError> {
        self.post_wake_read();
        while !(self.draining && self.conns.is_empty()) {
            self.ring.submit_and_wait().map_err(EngineError::Ring)?;
            let mut batch = std::mem::take(&mut self.batch);
            self.ring.reap(&mut batch);
            for completion in &batch {
                self.on_completion(*completion);
            }
            self.batch = batch;
            self.retry_deferred();
        }
        if self.config.verbose && self.pool.heap_fallbacks > 0 {
            eprintln!("ringnbd: worker {}: {} heap buffer fallbacks", self.index, self.pool.heap_fallbacks);
        }
        Ok(())
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: every entry built by this worker points into memory owned by
        // a connection (boxed), a request's buffer, or the worker itself, and
        // none of those is freed before the entry's CQE is reaped (see
        // `release` and `free_request`).
        unsafe { self.ring.push(entry) };
    }

    fn on_completion(&mut self, c: Completion) {
        match Token::decode(c.user_data) {
            Token::Recv { conn } => self.on_recv(conn, c.result),
            Token::Send { conn } => self.on_send(conn, c.result),
            Token::Request { request } => self.on_io(request, c.result),
            Token::Wake => self.on_wake(),
            Token::Tick => self.tick_armed = false,
            Token::Cancel => {}
            Token::DrainDeadline => self.drain_expired(),
        }
    }

    // --- connections arriving and leaving ---------------------------------------

    fn post_wake_read(&mut self) {
        let target: *mut u64 = &mut *self.wake_value;
        let entry = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), target.cast(), 8)
            .build()
            .user_data(Token::Wake.encode());
        self.push(entry);
    }

    fn on_wake(&mut self) {
        while let Ok(new) = self.incoming.try_recv() {
            if self.draining {
                continue; // dropping the socket closes it
            }
            self.adopt(new);
        }
        while let Ok(done) = self.lookups.done.try_recv() {
            self.on_lookup(done);
        }
        if self.shutdown.load(Ordering::Acquire) && !self.draining {
            self.begin_drain();
        }
        // Kept posted while draining too: lookups in flight report through it.
        self.post_wake_read();
    }

    fn adopt(&mut self, new: NewConnection) {
        let n = new.negotiated;
        let export = Arc::clone(&self.exports[n.export]);
        let limits = RequestLimits {
            export_bytes: export.info.size,
            flags: n.flags,
            reply_mode: n.reply_mode,
            alignment_bytes: if n.block_size_agreed { export.info.block_size.minimum } else { 1 },
            payload_bytes_max: self.config.payload_bytes_max,
            has_contexts: !n.contexts.is_empty(),
        };
        if self.config.verbose {
            eprintln!(
                "ringnbd: worker {}: {} on export {:?} ({:?})",
                self.index, new.peer, export.info.name, n.reply_mode
            );
        }
        let conn = Conn::new(new.socket, export, n.export, limits, n.contexts, self.config.inflight_per_conn_max);
        let id = self.conns.insert(Box::new(conn)) as u32;
        self.pump(id);
    }

    /// Shutdown: stop reading new requests everywhere; in-flight requests
    /// finish and their replies are sent before each connection closes.
    fn begin_drain(&mut self) {
        self.draining = true;
        let deadline = opcode::Timeout::new(&*self.drain_deadline).build().user_data(Token::DrainDeadline.encode());
        self.push(deadline);
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            let conn = &mut self.conns[id];
            if conn.closing == Closing::Open {
                conn.closing = Closing::Graceful;
            }
            // A receive waiting for a header is cancelled; one filling a WRITE
            // payload is left to finish so the write is not lost.
            if conn.recv_in_flight && conn.payload_request.is_none() {
                let target = Token::Recv { conn: id as u32 }.encode();
                self.push(opcode::AsyncCancel::new(target).build().user_data(Token::Cancel.encode()));
            }
            self.release_if_idle(id as u32);
        }
    }

    /// Shutdown took too long: drop every connection still open. Their
    /// in-flight operations complete (with errors) and free them.
    fn drain_expired(&mut self) {
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        if !ids.is_empty() && self.config.verbose {
            eprintln!(
                "ringnbd: worker {}: dropping {} connection(s) still busy at the drain deadline",
                self.index,
                ids.len()
            );
        }
        for id in ids {
            if self.conns.contains(id) && self.conns[id].closing != Closing::Hard {
                self.hard_close(id as u32);
            }
        }
    }

    fn hard_close(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        conn.closing = Closing::Hard;
        // SAFETY: shutdown on an fd this connection owns; it makes any receive
        // in flight complete so the slot can be released.
        unsafe { libc::shutdown(conn.fd(), libc::SHUT_RDWR) };
        if !conn.send_in_flight {
            self.drop_queued_replies(id);
        }
        self.release_if_idle(id);
    }

    fn drop_queued_replies(&mut self, id: u32) {
        while let Some(request) = self.conns[id as usize].send_queue.pop_front() {
            self.free_request(request);
        }
    }

    /// Frees a closing connection once the kernel holds none of its memory.
    fn release_if_idle(&mut self, id: u32) {
        let conn = &self.conns[id as usize];
        let idle = !conn.recv_in_flight && !conn.send_in_flight && conn.inflight == 0;
        if conn.closing != Closing::Open && idle {
            self.conns.remove(id as usize); // closes the socket
            self.stalled.retain(|&s| s != id);
            self.load.fetch_sub(1, Ordering::Relaxed);
        }
    }

    // --- receiving and parsing --------------------------------------------------

    fn on_recv(&mut self, id: u32, result: i32) {
        let conn = &mut self.conns[id as usize];
        conn.recv_in_flight = false;
        if result <= 0 {
            // EOF, reset or cancelled: a partly received WRITE is abandoned.
            if let Some(request) = conn.payload_request.take() {
                self.free_request(request);
            }
            let conn = &mut self.conns[id as usize];
            if conn.closing == Closing::Open {
                conn.closing = Closing::Graceful;
            }
            self.release_if_idle(id);
            return;
        }
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
    /// next receive. Stops (stalls) when the connection or worker is at its
    /// in-flight limit or out of buffers; `unstall` resumes it.
    fn pump(&mut self, id: u32) {
        loop {
            // Any step below may release the connection (DISC, hard close).
            let Some(conn) = self.conns.get_mut(id as usize) else { return };
            if conn.closing != Closing::Open || conn.recv_in_flight {
                return;
            }
            if conn.payload_request.is_some() {
                return self.post_recv(id);
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
            if conn.inflight >= self.config.inflight_per_conn_max || self.requests.len() >= self.config.requests_max {
                return self.stall(id);
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
            if !self.admit(id, &header, verdict) {
                return self.stall(id);
            }
        }
    }

    fn protocol_violation(&mut self, id: u32, error: &dyn std::fmt::Display) {
        if self.config.verbose {
            eprintln!("ringnbd: worker {}: dropping connection: {error}", self.index);
        }
        self.hard_close(id);
    }

    fn stall(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        if !conn.stalled {
            conn.stalled = true;
            self.stalled.push(id);
        }
    }

    /// Resumes connections that stalled for a slot or buffer.
    fn unstall(&mut self) {
        while let Some(id) = self.stalled.pop() {
            if let Some(conn) = self.conns.get_mut(id as usize) {
                conn.stalled = false;
                self.pump(id);
                if self.conns.get(id as usize).is_some_and(|c| c.stalled) {
                    break; // still blocked; the others would be too
                }
            }
        }
    }

    fn post_recv(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        let (target, len) = match conn.payload_request {
            Some(request) => {
                let req = &mut self.requests[request as usize];
                let at = req.span.head + req.payload_received;
                let len = req.client_len() - req.payload_received;
                let buffer = req.buffer.as_mut().expect("writes own a buffer");
                // SAFETY: at + len <= span.len <= buffer length.
                (unsafe { buffer.as_ptr().add(at) }, len)
            }
            None => {
                let (target, free) = conn.receive_target();
                let len = if conn.drain > 0 { (conn.drain as usize).min(free) } else { free };
                (target, len)
            }
        };
        conn.recv_in_flight = true;
        let entry = opcode::Recv::new(types::Fd(conn.fd()), target, len.min(u32::MAX as usize) as u32)
            .build()
            .user_data(Token::Recv { conn: id }.encode());
        self.push(entry);
    }

    /// Turns a validated header into a request. Returns false (consuming
    /// nothing) if a buffer is not available right now.
    fn admit(&mut self, id: u32, header: &RequestHeader, verdict: Verdict) -> bool {
        let conn = &mut self.conns[id as usize];
        let header_bytes = conn.mode().request_header_bytes();
        let to = ReplyTo { mode: conn.mode(), cookie: header.cookie, offset: header.offset };
        let command = match verdict {
            Verdict::Run(Command::Disconnect) => {
                conn.consume(header_bytes);
                conn.closing = Closing::Graceful;
                self.release_if_idle(id);
                return true;
            }
            Verdict::Run(Command::BlockStatus { offset, req_one, payload, .. }) if payload > 0 => {
                let bytes = &conn.unparsed()[header_bytes..header_bytes + payload as usize];
                let parsed =
                    transmission::parse_status_payload(bytes, offset, conn.limits.export_bytes, &conn.contexts);
                match parsed {
                    Ok((length, mask)) => {
                        let command = Command::BlockStatus { offset, length, req_one, payload: 0 };
                        let Some(mut req) = self.prepare(id, to, command, mask) else { return false };
                        self.conns[id as usize].consume(header_bytes + payload as usize);
                        req.status_mask = mask;
                        let request = self.insert_request(req);
                        self.start_request(request);
                    }
                    Err(error) => {
                        conn.consume(header_bytes + payload as usize);
                        let mut req = Request::new(id, to, Command::Flush);
                        req.error = Some(error);
                        let request = self.insert_request(req);
                        self.finish(request, false);
                    }
                }
                return true;
            }
            Verdict::Run(command) => command,
            Verdict::Empty { payload } | Verdict::Reject { payload, .. } => {
                conn.consume(header_bytes);
                conn.drain = payload;
                let mut req = Request::new(id, to, Command::Flush);
                if let Verdict::Reject { error, .. } = verdict {
                    req.error = Some(error);
                }
                let is_read = header.kind == crate::proto::wire::CMD_READ;
                let request = self.insert_request(req);
                self.finish(request, is_read);
                return true;
            }
        };
        let mask = block_status::all_contexts(conn.contexts.len());
        let Some(mut req) = self.prepare(id, to, command, mask) else { return false };
        let conn = &mut self.conns[id as usize];
        conn.consume(header_bytes);
        if let Command::Write { length, .. } = command {
            let take = conn.unparsed().len().min(length as usize);
            let head = req.span.head;
            let buffer = req.buffer.as_mut().expect("writes own a buffer");
            buffer.as_mut_slice()[head..head + take].copy_from_slice(&conn.unparsed()[..take]);
            conn.consume(take);
            req.payload_received = take;
            if take < length as usize {
                let request = self.insert_request(req);
                self.conns[id as usize].payload_request = Some(request);
                return true;
            }
        }
        let request = self.insert_request(req);
        self.start_request(request);
        true
    }

    /// Allocates what a command needs; None if the buffer pool is full.
    fn prepare(&mut self, id: u32, to: ReplyTo, command: Command, status_mask: u32) -> Option<Request> {
        let conn = &self.conns[id as usize];
        let export = &conn.export;
        let alignment = export.backend.alignment();
        let mut req = Request::new(id, to, command);
        let bytes = match command {
            Command::Read { offset, length, .. } | Command::Write { offset, length, .. } => {
                req.span = AlignedSpan::new(offset, length as usize, alignment);
                let unaligned_write = matches!(command, Command::Write { .. }) && !req.span.is_exact(length as usize);
                // An unaligned write reads its partial blocks into scratch space after the span.
                req.span.len + if unaligned_write { alignment as usize } else { 0 }
            }
            Command::BlockStatus { length, req_one, .. } => {
                let cap = if req_one { 1 } else { self.config.extents_max };
                let extents = block_status::extents_bound(&export.backend, length, cap);
                block_status::reply_bytes_max(to.mode, status_mask.count_ones() as usize, extents)
            }
            _ => 0,
        };
        if bytes > 0 {
            req.buffer = Some(self.pool.alloc(bytes)?);
        }
        Some(req)
    }

    fn insert_request(&mut self, req: Request) -> u32 {
        self.conns[req.conn as usize].inflight += 1;
        self.requests.insert(req) as u32
    }

    // --- executing --------------------------------------------------------------

    fn start_request(&mut self, request: u32) {
        if let Command::BlockStatus { .. } = self.requests[request as usize].command {
            return self.start_block_status(request);
        }
        // Borrow disjoint fields: the export is reached through its
        // connection without cloning the Arc, whose refcount every worker
        // would otherwise bounce between cores on each request.
        let Worker { requests, conns, pool, .. } = self;
        let req = &mut requests[request as usize];
        let export = &*conns[req.conn as usize].export;
        let next = match &export.backend {
            Backend::Memory(memory) => {
                memory_io::execute(memory, req);
                Next::Finished
            }
            Backend::File(file) => FileIo { file, export, pool, id: request }.start(req),
        };
        self.follow(request, next);
    }

    fn start_block_status(&mut self, request: u32) {
        let Worker { requests, conns, extents, lookups, config, .. } = self;
        let req = &mut requests[request as usize];
        let Command::BlockStatus { offset, length, req_one, .. } = req.command else { unreachable!("checked") };
        let conn = &conns[req.conn as usize];
        let query = Query { offset, length, extents_max: if req_one { 1 } else { config.extents_max } };
        match block_status::gather(&conn.export.backend, conn.export.extent_cache.as_ref(), &query, extents) {
            Gathered::Ready => {
                let extents = std::mem::take(&mut self.extents);
                self.answer_block_status(request, &extents);
                self.extents = extents;
            }
            Gathered::Scan { from, epoch } => {
                req.step = Step::Lookup;
                let job = LookupJob {
                    request,
                    export: conn.export_index,
                    offset,
                    from,
                    epoch,
                    end: offset + length,
                    extents_max: query.extents_max,
                    extents: extents.clone(),
                };
                lookups.jobs.send(job).expect("lookup helper outlives its worker");
            }
        }
    }

    fn on_lookup(&mut self, done: LookupDone) {
        match done.result {
            Ok(extents) => self.answer_block_status(done.request, &extents),
            Err(errno) => {
                self.requests[done.request as usize].error = Some(NbdError::from_errno(errno));
                self.finish(done.request, false);
            }
        }
    }

    fn answer_block_status(&mut self, request: u32, extents: &[Extent]) {
        let req = &mut self.requests[request as usize];
        let conn = &self.conns[req.conn as usize];
        let buffer = req.buffer.as_mut().expect("block status owns a buffer");
        let used = block_status::encode(&conn.contexts, req.status_mask, extents, req.to, buffer.as_mut_slice());
        req.reply_buffer(0, used);
        req.step = Step::Start;
        self.finish(request, false);
    }

    /// Runs one step of a file request's state machine.
    fn file_step(&mut self, request: u32, step: impl FnOnce(&mut FileIo<'_>, &mut Request) -> Next) {
        let Worker { requests, conns, pool, .. } = self;
        let req = &mut requests[request as usize];
        let export = &*conns[req.conn as usize].export;
        let Backend::File(file) = &export.backend else { unreachable!("only file requests use the ring") };
        let next = step(&mut FileIo { file, export, pool, id: request }, req);
        self.follow(request, next);
    }

    fn on_io(&mut self, request: u32, result: i32) {
        self.file_step(request, |io, req| io.on_result(req, result));
    }

    fn follow(&mut self, request: u32, next: Next) {
        match next {
            Next::Submit(entry) => self.push(entry),
            Next::Finished => {
                let is_read = matches!(self.requests[request as usize].command, Command::Read { .. });
                self.finish(request, is_read);
            }
            Next::Defer => {
                self.deferred.push_back(request);
                self.arm_tick();
            }
        }
    }

    fn arm_tick(&mut self) {
        if self.tick_armed {
            return;
        }
        self.tick_armed = true;
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(Token::Tick.encode());
        self.push(entry);
    }

    fn retry_deferred(&mut self) {
        for _ in 0..self.deferred.len() {
            let Some(request) = self.deferred.pop_front() else { break };
            self.file_step(request, |io, req| io.resume(req));
        }
    }

    // --- replying ---------------------------------------------------------------

    /// Encodes the reply and queues it on its connection.
    fn finish(&mut self, request: u32, is_read: bool) {
        let Worker { requests, conns, extents, .. } = self;
        let req = &mut requests[request as usize];
        let conn = &mut conns[req.conn as usize];
        debug_assert!(req.step != Step::WaitRmw && req.step != Step::Lookup);
        let to = req.to;
        match (req.error, req.command) {
            (Some(error), _) => {
                req.clear_reply();
                req.reply_inline(|out| reply::error(out, to, error.code(), error.message()));
            }
            (None, Command::Read { offset, length, df }) if is_read => {
                compose_read(req, &conn.export, offset, length, df, extents);
            }
            (None, Command::BlockStatus { .. }) => {} // encoded into the buffer already
            (None, _) => req.reply_inline(|out| reply::success(out, to, is_read)),
        }
        write_path::complete(&conn.export, &req.command, req.error.is_none());
        let id = req.conn;
        if conn.closing == Closing::Hard {
            self.free_request(request);
            return self.release_if_idle(id);
        }
        conn.send_queue.push_back(request);
        self.flush_send(id);
    }

    fn flush_send(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        if conn.send_in_flight {
            return;
        }
        let Some(message) = conn.build_send(&self.requests) else { return };
        conn.send_in_flight = true;
        let entry = opcode::SendMsg::new(types::Fd(conn.fd()), message)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(Token::Send { conn: id }.encode());
        self.push(entry);
    }

    fn on_send(&mut self, id: u32, result: i32) {
        let conn = &mut self.conns[id as usize];
        conn.send_in_flight = false;
        // A zero-byte send of a non-empty message means the socket is dead.
        if result <= 0 || conn.closing == Closing::Hard {
            if conn.closing != Closing::Hard {
                return self.hard_close(id);
            }
            self.drop_queued_replies(id);
            return self.release_if_idle(id);
        }
        let done = conn.sent(result as usize, &self.requests);
        for _ in 0..done {
            let request = self.conns[id as usize].send_queue.pop_front().expect("counted by sent()");
            self.free_request(request);
        }
        self.flush_send(id);
        self.release_if_idle(id);
        self.unstall();
    }

    /// Returns a request's slot and buffer. Never releases the connection:
    /// callers may still be iterating over it, and call `release_if_idle`.
    fn free_request(&mut self, request: u32) {
        let req = self.requests.remove(request as usize);
        if let Some(buffer) = req.buffer {
            self.pool.free(buffer);
        }
        if let Some(conn) = self.conns.get_mut(req.conn as usize) {
            if req.holds_rmw {
                conn.export.end_rmw();
            }
            conn.inflight -= 1;
        }
    }
}

/// A successful READ's reply: one data chunk (simple mode, DF, or no zero
/// runs), else OFFSET_DATA and OFFSET_HOLE chunks (see `sparse_read`).
fn compose_read(req: &mut Request, export: &Export, offset: u64, length: u32, df: bool, known: &mut Vec<Extent>) {
    let (to, head, len) = (req.to, req.span.head, length as usize);
    let mut runs = [Run { hole: false, start: 0, len: 0 }; sparse_read::CHUNKS_MAX];
    let count = if to.mode == ReplyMode::Simple || df {
        0
    } else {
        known.clear();
        if let Some(cache) = &export.extent_cache {
            cache.lookup(offset, offset + u64::from(length), sparse_read::CHUNKS_MAX, known);
        }
        let data = &req.buffer.as_ref().expect("reads own a buffer")[head..head + len];
        sparse_read::runs(data, offset, known, &mut runs)
    };
    if count <= 1 && !runs[0].hole {
        req.reply_inline(|out| reply::read_data(out, to, offset, length));
        return req.reply_buffer(head, len);
    }
    for (index, run) in runs[..count].iter().enumerate() {
        let done = index + 1 == count;
        let at = offset + run.start as u64;
        if run.hole {
            req.reply_inline(|out| reply::hole_chunk(out, to, at, run.len as u32, done));
        } else {
            req.reply_inline(|out| reply::data_chunk(out, to, at, run.len as u32, done));
            req.reply_buffer(head + run.start, run.len);
        }
    }
}
