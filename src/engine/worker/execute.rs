//! Running admitted requests: memory requests inline, file and layered
//! requests as ring steps, BLOCK_STATUS from each selected context's source (inline, or
//! through the lookup helper when a source needs a blocking scan).

use crate::backend::Backend;
use crate::backend::file_io::{FileIo, mutated_range};
use crate::backend::io::{Data, Next, Plan};
use crate::backend::layers::io::LayeredIo;
use crate::backend::preserving_io::PreservingIo;
use crate::backend::snapshot_io::SnapshotIo;
use crate::faults::{self, Direction};
use crate::meta::context::{Gathered, Query};
use crate::proto::Failure;
use crate::proto::reply;
use crate::proto::transmission::Command;

use super::super::block_status;
use super::super::lookup::{LookupDone, LookupJob};
use super::super::ops;
use super::super::pipes;
use super::super::user_data::Token;
use super::Worker;

/// Job vectors a worker keeps for reuse (one per lookup in flight at once).
const SPARE_EXTENT_VECTORS_MAX: usize = 16;

/// Which backend call a file request's step is.
enum FileCall {
    Start,
    Resume,
    Completed(i32),
}

/// One call into a backend's plan.
fn drive<T>(plan: &impl Plan<T>, call: FileCall, command: &Command, task: &mut T, data: Data<'_>) -> Next {
    match call {
        FileCall::Start => plan.start(command, task, data),
        FileCall::Resume => plan.resume(command, task, data),
        FileCall::Completed(result) => plan.on_result(command, task, data, result),
    }
}

impl Worker {
    pub(super) fn start_request(&mut self, request: u32) {
        match self.requests[request as usize].command {
            Command::BlockStatus { .. } => return self.start_block_status(request),
            Command::Read { offset, .. } => faults::before_read(offset),
            _ => {}
        }
        if self.pass_tracking(request) {
            self.run_request(request);
        }
    }

    /// Runs a request past its tracking gate against its backend.
    pub(super) fn run_request(&mut self, request: u32) {
        if self.requests[request as usize].pipe.is_some() {
            return self.splice_read(request);
        }
        if self.requests[request as usize].mapped.is_some() {
            return self.run_in_place(request);
        }
        let req = &mut self.requests[request as usize];
        let image = &self.conns[req.conn as usize].export.image;
        let command = req.command;
        match &image.backend {
            Backend::Memory(memory) => {
                let result = memory.execute(&command, req.data().bytes);
                self.follow(request, Next::Finished(result))
            }
            Backend::File(_) | Backend::Layered(_) | Backend::Snapshot(_) => self.file_step(request, FileCall::Start),
        }
    }

    /// A READ or WRITE served in the file's mapping: a read's data is sent
    /// from there (a range that is all hole gets one hole chunk in
    /// structured replies), a write's payload was received there.
    fn run_in_place(&mut self, request: u32) {
        let req = &mut self.requests[request as usize];
        let eio = Failure::from_errno(libc::EIO);
        let result = match req.command {
            Command::Read { offset, length, .. } if faults::fails(Direction::Read, offset, length.into()) => Err(eio),
            Command::Write { offset, length, .. } if faults::fails(Direction::Write, offset, length.into()) => Err(eio),
            // A read's data is sent from the mapping (or its hole was found
            // at admission); a write's is in the file already, and durable:
            // memory file systems have no cache.
            _ => Ok(()),
        };
        self.follow(request, Next::Finished(result))
    }

    /// A READ of an in-memory file into its pipe: page references, no
    /// copy (see `engine::pipes`). In structured replies a range that is
    /// all hole is answered with one hole chunk and nothing spliced.
    fn splice_read(&mut self, request: u32) {
        let req = &mut self.requests[request as usize];
        let Command::Read { offset, length, df } = req.command else { unreachable!("only reads splice") };
        let Backend::File(file) = &self.conns[req.conn as usize].export.image.backend else {
            unreachable!("only file reads splice")
        };
        let fd = file.buffered_fd();
        let len = length as usize;
        let result = if pipes::hole_chunk_allowed(req.to.mode, df) && pipes::is_hole(fd, offset, len) {
            req.hole = true;
            Ok(())
        } else {
            let pipe = req.pipe.as_ref().expect("checked");
            pipes::fill(pipe, fd, offset, len).map_err(|e| Failure::from_errno(e.raw_os_error().unwrap_or(libc::EIO)))
        };
        self.follow(request, Next::Finished(result))
    }

    /// Asks every selected context's source; answers that need a scan go
    /// to the lookup helper, the rest are encoded at once.
    fn start_block_status(&mut self, request: u32) {
        let Worker { requests, conns, extents, lookups, config, spare_extents, .. } = self;
        let req = &mut requests[request as usize];
        let Command::BlockStatus { offset, length, req_one, .. } = req.command else { unreachable!("checked") };
        let conn = &conns[req.conn as usize];
        let query = Query { offset, length, extents_max: if req_one { 1 } else { config.extents_max } };
        let buffer = req.buffer.as_mut().expect("block status owns a buffer").as_mut_slice();
        for (index, context) in block_status::selected(&conn.contexts, req.status_mask) {
            let at = req.status.used;
            if let Some(used) = block_status::encode_direct(&mut buffer[at..], req.to, context, &query) {
                req.status.used += used;
                req.status.last_chunk = at;
                continue;
            }
            extents.clear();
            match context.source.gather(&query, extents) {
                Gathered::Ready => {
                    let at = req.status.used;
                    req.status.used += block_status::encode_chunk(&mut buffer[at..], req.to, context.id, extents);
                    req.status.last_chunk = at;
                }
                Gathered::Scan { from } => {
                    // A vector back from an earlier job: no allocation per
                    // scan once the worker has a few.
                    let mut job_extents = spare_extents.pop().unwrap_or_default();
                    job_extents.clear();
                    job_extents.extend_from_slice(extents);
                    let source = std::sync::Arc::clone(&context.source);
                    let job = LookupJob { request, context: index, source, query, from, extents: job_extents };
                    req.status.scans_pending += 1;
                    lookups.jobs.send(job).expect("lookup helper outlives its worker");
                }
            }
        }
        if req.status.scans_pending == 0 {
            self.complete_block_status(request);
        }
    }

    pub(super) fn on_lookup(&mut self, done: LookupDone) {
        let req = &mut self.requests[done.request as usize];
        req.status.scans_pending -= 1;
        match done.result {
            Ok(()) if req.error.is_none() => {
                let id = self.conns[req.conn as usize].contexts[done.context].id;
                let buffer = req.buffer.as_mut().expect("block status owns a buffer").as_mut_slice();
                let at = req.status.used;
                req.status.used += block_status::encode_chunk(&mut buffer[at..], req.to, id, &done.extents);
                req.status.last_chunk = at;
            }
            Ok(()) => {}
            Err(errno) => req.error = Some(Failure::from_errno(errno)),
        }
        if self.spare_extents.len() < SPARE_EXTENT_VECTORS_MAX {
            self.spare_extents.push(done.extents);
        }
        if self.requests[done.request as usize].status.scans_pending == 0 {
            self.complete_block_status(done.request);
        }
    }

    /// Every part is in: flag the last chunk DONE and reply (an error
    /// replaces the chunks).
    fn complete_block_status(&mut self, request: u32) {
        let req = &mut self.requests[request as usize];
        if req.error.is_none() {
            let progress = req.status;
            let buffer = req.buffer.as_mut().expect("block status owns a buffer").as_mut_slice();
            reply::set_done(&mut buffer[progress.last_chunk..progress.used]);
            req.reply_buffer(0, progress.used);
        }
        self.finish(request, false);
    }

    /// Runs one step of a file request's plan.
    fn file_step(&mut self, request: u32, call: FileCall) {
        // Borrow disjoint fields: the image is reached through its
        // connection without cloning the Arc, whose refcount every worker
        // would otherwise bounce between cores on each request.
        let Worker { requests, conns, zeroes, copies, .. } = self;
        let req = &mut requests[request as usize];
        let image = &*conns[req.conn as usize].export.image;
        let command = req.command;
        let mut task = std::mem::take(&mut req.task);
        let data = req.data();
        let next = match &image.backend {
            Backend::File(file) => {
                let io = FileIo { file, locks: &image.locks, zeroes };
                // A mutation that starts while the image has copy-before-write
                // snapshots preserves their old data first, and keeps that
                // plan until it has.
                let preserving = match call {
                    FileCall::Start => mutated_range(&command).is_some() && image.has_snapshots(),
                    _ => task.is_preserving(),
                };
                if preserving {
                    let list = image.snapshots();
                    let snapshots = list.as_deref().map_or(&[][..], Vec::as_slice);
                    drive(&PreservingIo { inner: io, snapshots, copies }, call, &command, &mut task, data)
                } else {
                    drive(&io, call, &command, &mut task, data)
                }
            }
            Backend::Layered(layers) => {
                drive(&LayeredIo { layers, locks: &image.locks, zeroes, copies }, call, &command, &mut task, data)
            }
            Backend::Snapshot(snapshot) => drive(&SnapshotIo { snapshot }, call, &command, &mut task, data),
            Backend::Memory(_) => unreachable!("memory requests run inline"),
        };
        req.task = task;
        self.follow(request, next);
    }

    pub(super) fn on_io(&mut self, request: u32, result: i32) {
        self.file_step(request, FileCall::Completed(result));
    }

    fn follow(&mut self, request: u32, next: Next) {
        match next {
            Next::Submit(op) => {
                // The operation's memory is the request's buffer or the
                // worker's zero region, both kept until this CQE is reaped.
                let entry = ops::entry(&op).user_data(Token::Request { request }.encode());
                self.push(entry);
            }
            Next::Finished(result) => {
                let req = &mut self.requests[request as usize];
                req.error = result.err();
                let is_read = matches!(req.command, Command::Read { .. });
                self.finish(request, is_read);
            }
            Next::Defer => self.deferred.push_back(request),
        }
    }

    /// Deferred requests wait for a block lock that another request (on any
    /// worker) holds for one I/O round trip; retrying once per loop turn, and
    /// on the tick when nothing else wakes the ring, is enough.
    pub(super) fn retry_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        for _ in 0..self.deferred.len() {
            let Some(request) = self.deferred.pop_front() else { break };
            self.file_step(request, FileCall::Resume);
        }
        if !self.deferred.is_empty() {
            self.arm_tick();
        }
    }
}
