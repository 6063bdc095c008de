//! Running admitted requests: memory requests inline, file requests as ring
//! steps, BLOCK_STATUS from the extent cache or the lookup helper.

use crate::backend::Backend;
use crate::backend::file_io::FileIo;
use crate::backend::io::Next;
use crate::faults;
use crate::proto::Failure;
use crate::proto::extent::Extent;
use crate::proto::transmission::Command;

use super::super::block_status::{self, Gathered, Query};
use super::super::lookup::{LookupDone, LookupJob};
use super::super::ops;
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

impl Worker {
    pub(super) fn start_request(&mut self, request: u32) {
        match self.requests[request as usize].command {
            Command::BlockStatus { .. } => return self.start_block_status(request),
            Command::Read { offset, .. } => faults::before_read(offset),
            _ => {}
        }
        let req = &mut self.requests[request as usize];
        if let Backend::Memory(memory) = &self.conns[req.conn as usize].export.image.backend {
            let command = req.command;
            let result = memory.execute(&command, req.data().bytes);
            return self.follow(request, Next::Finished(result));
        }
        self.file_step(request, FileCall::Start);
    }

    fn start_block_status(&mut self, request: u32) {
        let Worker { requests, conns, extents, lookups, config, spare_extents, .. } = self;
        let req = &mut requests[request as usize];
        let Command::BlockStatus { offset, length, req_one, .. } = req.command else { unreachable!("checked") };
        let conn = &conns[req.conn as usize];
        let image = &conn.export.image;
        let query = Query { offset, length, extents_max: if req_one { 1 } else { config.extents_max } };
        match block_status::gather(&image.backend, image.extent_cache.as_ref(), &query, extents) {
            Gathered::Ready => {
                let extents = std::mem::take(&mut self.extents);
                self.answer_block_status(request, &extents);
                self.extents = extents;
            }
            Gathered::Scan { from } => {
                req.in_lookup = true;
                // A vector back from an earlier job: no allocation per miss
                // once the worker has a few.
                let mut job_extents = spare_extents.pop().unwrap_or_default();
                job_extents.clear();
                job_extents.extend_from_slice(extents);
                let job = LookupJob {
                    request,
                    export: conn.export_index,
                    offset,
                    from,
                    end: offset + length,
                    extents_max: query.extents_max,
                    extents: job_extents,
                };
                lookups.jobs.send(job).expect("lookup helper outlives its worker");
            }
        }
    }

    pub(super) fn on_lookup(&mut self, done: LookupDone) {
        match done.result {
            Ok(()) => self.answer_block_status(done.request, &done.extents),
            Err(errno) => {
                let req = &mut self.requests[done.request as usize];
                req.in_lookup = false;
                req.error = Some(Failure::from_errno(errno));
                self.finish(done.request, false);
            }
        }
        if self.spare_extents.len() < SPARE_EXTENT_VECTORS_MAX {
            self.spare_extents.push(done.extents);
        }
    }

    fn answer_block_status(&mut self, request: u32, extents: &[Extent]) {
        let req = &mut self.requests[request as usize];
        let conn = &self.conns[req.conn as usize];
        let buffer = req.buffer.as_mut().expect("block status owns a buffer");
        let used = block_status::encode(&conn.contexts, req.status_mask, extents, req.to, buffer.as_mut_slice());
        req.reply_buffer(0, used);
        req.in_lookup = false;
        self.finish(request, false);
    }

    /// Runs one step of a file request's plan.
    fn file_step(&mut self, request: u32, call: FileCall) {
        // Borrow disjoint fields: the image is reached through its
        // connection without cloning the Arc, whose refcount every worker
        // would otherwise bounce between cores on each request.
        let Worker { requests, conns, zeroes, .. } = self;
        let req = &mut requests[request as usize];
        let image = &*conns[req.conn as usize].export.image;
        let Backend::File(file) = &image.backend else { unreachable!("only file requests use the ring") };
        let io = FileIo { file, locks: &image.locks, zeroes };
        let command = req.command;
        let mut task = std::mem::take(&mut req.task);
        let next = match call {
            FileCall::Start => io.start(&command, &mut task, req.data()),
            FileCall::Resume => io.resume(&command, &mut task, req.data()),
            FileCall::Completed(result) => io.on_result(&command, &mut task, req.data(), result),
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
