//! File-backend requests as io_uring steps.
//!
//! `start` picks a request's first step, `on_result` consumes a step's CQE
//! and picks the next; each returns what the worker should do. A mutation
//! that covers a block only in part first takes that block's lock (see
//! `backend::block_locks`); when another request holds it the step returns
//! `Next::Defer` and is retried from the worker's deferred queue. The locks
//! are released by the worker once the request is `Finished`.

use io_uring::{opcode, squeue, types};

use crate::backend::FileBackend;
use crate::export::Image;
use crate::faults::{self, Direction};
use crate::proto::transmission::Command;
use crate::proto::{Failure, NbdError};

use super::request::{Request, Step};
use super::user_data::Token;

/// Bytes of the shared zero region the ZeroFill fallback writes from.
pub const ZERO_FILL_BYTES_MAX: usize = 1 << 20;

/// A read-only region of zeroes every ZeroFill write of a worker reads
/// from. Never written, so its pages are the kernel's shared zero page and
/// cost no memory.
pub struct ZeroRegion {
    base: std::ptr::NonNull<u8>,
}

impl ZeroRegion {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: anonymous private read-only mapping; no fd, no aliasing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ZERO_FILL_BYTES_MAX,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { base: std::ptr::NonNull::new(addr.cast()).expect("mmap never returns null on success") })
    }
}

impl Drop for ZeroRegion {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; the worker drops it after
        // its ring, so no write from it is in flight.
        unsafe { libc::munmap(self.base.as_ptr().cast(), ZERO_FILL_BYTES_MAX) };
    }
}

#[derive(Debug)]
pub enum Next {
    Submit(squeue::Entry),
    Finished,
    Defer,
}

/// Zeroing strategies in order of preference; `ZeroFill` is the slow last
/// resort that FAST_ZERO refuses.
const PLAN_MAY_PUNCH: [Step; 3] = [Step::Punch, Step::ZeroRange, Step::ZeroFill];
const PLAN_NO_HOLE: [Step; 3] = [Step::ZeroRange, Step::Punch, Step::ZeroFill];

pub struct FileIo<'a> {
    pub file: &'a FileBackend,
    pub image: &'a Image,
    pub zeroes: &'a ZeroRegion,
    pub id: u32,
}

/// The client range a command covers.
pub fn client_range(command: &Command) -> (u64, u64) {
    match *command {
        Command::Trim { offset, length, .. }
        | Command::WriteZeroes { offset, length, .. }
        | Command::Cache { offset, length } => (offset, offset + length),
        Command::Read { offset, length, .. } | Command::Write { offset, length, .. } => {
            (offset, offset + u64::from(length))
        }
        _ => (0, 0),
    }
}

impl FileIo<'_> {
    pub fn start(&mut self, req: &mut Request) -> Next {
        if self.file.inline_io { self.inline(req) } else { self.start_on_ring(req) }
    }

    /// tmpfs/ramfs: reads and writes are memory copies with no device to
    /// wait on, and these filesystems refuse NOWAIT, so a ring submission
    /// would only add a hand-off to an io-wq thread. Everything else still
    /// goes through the ring.
    fn inline(&mut self, req: &mut Request) -> Next {
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        let result = match req.command {
            Command::Read { offset, length, .. } if faults::fails(Direction::Read, offset, length.into()) => Err(eio),
            Command::Write { offset, length, .. } if faults::fails(Direction::Write, offset, length.into()) => Err(eio),
            Command::Read { offset, length, .. } => {
                let buffer = req.buffer.as_mut().expect("reads own a buffer");
                self.file.read_inline(offset, &mut buffer.as_mut_slice()[..length as usize])
            }
            Command::Write { offset, length, .. } => {
                let buffer = req.buffer.as_ref().expect("writes own a buffer");
                // Durable on completion: memory filesystems have no cache to flush.
                self.file.write_inline(offset, &buffer.as_slice()[..length as usize])
            }
            Command::Flush => Ok(()),
            // Trim and zeroes keep their ring steps (and fallbacks).
            _ => return self.start_on_ring(req),
        };
        if let Err(e) = result {
            req.error = Some(Failure::from_errno(e.raw_os_error().unwrap_or(libc::EIO)));
        }
        Next::Finished
    }

    fn start_on_ring(&mut self, req: &mut Request) -> Next {
        match req.command {
            Command::Read { .. } => self.step(req, Step::Read),
            Command::Write { offset, length, .. } => self.start_write(req, offset, length as usize),
            Command::Flush => self.step(req, Step::Sync),
            Command::Trim { offset, length, .. } if self.file.can_punch_hole => {
                if !self.lock(req, offset, offset + length) {
                    return Next::Defer;
                }
                self.step(req, Step::Punch)
            }
            Command::Trim { fua: true, .. } => self.step(req, Step::Sync),
            Command::Trim { .. } => Next::Finished, // advisory, nothing to do
            Command::WriteZeroes { offset, length, .. } => {
                if !self.lock(req, offset, offset + length) {
                    return Next::Defer;
                }
                self.next_zero_strategy(req)
            }
            Command::Cache { .. } if !self.file.direct_io => self.step(req, Step::Advise),
            // O_DIRECT bypasses the page cache, so prefetching into it would
            // not help later reads.
            Command::Cache { .. } => Next::Finished,
            Command::BlockStatus { .. } | Command::Disconnect => unreachable!("handled by the worker"),
        }
    }

    /// Re-runs the current step after a deferral.
    pub fn resume(&mut self, req: &mut Request) -> Next {
        match req.step {
            Step::WaitLocks => self.start(req),
            step => self.step(req, step),
        }
    }

    /// Takes the locks of the blocks `[offset, end)` covers in part; false
    /// (the request now waits in `WaitLocks`) while another request holds one.
    fn lock(&self, req: &mut Request, offset: u64, end: u64) -> bool {
        if !req.locks.is_empty() {
            return true;
        }
        let set = self.image.locks.partial_blocks(offset, end);
        if !self.image.locks.try_acquire(&set) {
            req.step = Step::WaitLocks;
            return false;
        }
        req.locks = set;
        true
    }

    fn start_write(&mut self, req: &mut Request, offset: u64, length: usize) -> Next {
        if req.span.is_exact(length) {
            return self.step(req, Step::Write);
        }
        if !self.lock(req, offset, offset + length as u64) {
            return Next::Defer;
        }
        if req.span.end() > self.file.size {
            // Aligned I/O would extend the file past its unaligned end.
            return self.step(req, Step::WriteBuffered);
        }
        let block = self.file.alignment as u64;
        if !offset.is_multiple_of(block) {
            return self.step(req, Step::RmwHead);
        }
        self.step(req, Step::RmwTail)
    }

    pub fn on_result(&mut self, req: &mut Request, result: i32) -> Next {
        let result = self.with_faults(req, result);
        if result < 0 {
            return self.on_error(req, -result);
        }
        let done = result as usize;
        match req.step {
            Step::Read => {
                req.progress += done;
                let needed = req.span.head + req.client_len();
                if req.progress >= needed {
                    return Next::Finished;
                }
                if done == 0 {
                    // The file shrank under us: report, don't spin.
                    req.error = Some(NbdError::Io.because("the file behind the export shrank"));
                    return Next::Finished;
                }
                self.step(req, Step::Read)
            }
            Step::RmwHead => self.merge_head(req),
            Step::RmwTail => {
                self.merge_tail(req);
                self.step(req, Step::Write)
            }
            Step::Write | Step::WriteBuffered | Step::ZeroFill => self.on_written(req, done),
            Step::Punch if self.no_hole(req) => self.step(req, Step::Allocate),
            Step::Punch | Step::ZeroRange | Step::Allocate => self.after_mutation(req),
            Step::Sync | Step::Advise => Next::Finished,
            Step::Start | Step::WaitLocks | Step::Lookup => unreachable!("no operation was submitted"),
        }
    }

    /// Test-injected faults on data transfers (see `crate::faults`).
    fn with_faults(&self, req: &Request, result: i32) -> i32 {
        let direction = match req.step {
            Step::Read => Direction::Read,
            Step::Write | Step::WriteBuffered => Direction::Write,
            _ => return result,
        };
        let (offset, end) = client_range(&req.command);
        faults::transfer_result(direction, offset, end - offset, req.progress == 0, result)
    }

    fn merge_head(&mut self, req: &mut Request) -> Next {
        let block = self.file.alignment as usize;
        let (head, len, span_len) = (req.span.head, req.client_len(), req.span.len);
        let buffer = req.buffer.as_mut().expect("writes own a buffer").as_mut_slice();
        let (data, scratch) = buffer.split_at_mut(span_len);
        data[..head].copy_from_slice(&scratch[..head]);
        if span_len == block {
            // Head and tail are the same block: one read covers both.
            data[head + len..block].copy_from_slice(&scratch[head + len..block]);
            return self.step(req, Step::Write);
        }
        if (head + len) % block != 0 {
            return self.step(req, Step::RmwTail);
        }
        self.step(req, Step::Write)
    }

    fn merge_tail(&mut self, req: &mut Request) {
        let block = self.file.alignment as usize;
        let span_len = req.span.len;
        let tail_used = (req.span.head + req.client_len()) % block;
        let buffer = req.buffer.as_mut().expect("writes own a buffer").as_mut_slice();
        let (data, scratch) = buffer.split_at_mut(span_len);
        data[span_len - block + tail_used..].copy_from_slice(&scratch[tail_used..block]);
    }

    fn on_written(&mut self, req: &mut Request, done: usize) -> Next {
        if done == 0 {
            req.error = Some(NbdError::Io.because("the storage accepted no bytes"));
            return Next::Finished;
        }
        req.progress += done;
        let total = match req.step {
            Step::Write => req.span.len,
            Step::WriteBuffered => req.client_len(),
            _ => {
                let (_, end) = self.range(req);
                req.fill_at += done as u64;
                req.progress = 0;
                if req.fill_at < end {
                    return self.step(req, Step::ZeroFill);
                }
                return self.after_mutation(req);
            }
        };
        if req.progress < total {
            return self.step(req, req.step);
        }
        // Writes carry RWF_DSYNC when FUA was asked, so they are durable here.
        Next::Finished
    }

    fn after_mutation(&mut self, req: &mut Request) -> Next {
        let fua = matches!(req.command, Command::Trim { fua: true, .. } | Command::WriteZeroes { fua: true, .. });
        if fua { self.step(req, Step::Sync) } else { Next::Finished }
    }

    fn on_error(&mut self, req: &mut Request, errno: i32) -> Next {
        let unsupported = errno == libc::EOPNOTSUPP || errno == libc::ENOTTY;
        match (req.step, &req.command) {
            (Step::Punch | Step::ZeroRange | Step::Allocate, Command::WriteZeroes { .. }) if unsupported => {
                self.next_zero_strategy(req)
            }
            // TRIM is advisory: a filesystem that cannot punch just keeps the data.
            (Step::Punch, Command::Trim { .. }) if unsupported => self.after_mutation(req),
            (Step::Advise, _) => Next::Finished,
            _ => {
                req.error = Some(Failure::from_errno(errno));
                Next::Finished
            }
        }
    }

    fn no_hole(&self, req: &Request) -> bool {
        matches!(req.command, Command::WriteZeroes { no_hole: true, .. })
    }

    fn next_zero_strategy(&mut self, req: &mut Request) -> Next {
        let Command::WriteZeroes { no_hole, fast, .. } = req.command else { unreachable!("zeroing plan") };
        let plan = if no_hole { PLAN_NO_HOLE } else { PLAN_MAY_PUNCH };
        while let Some(&step) = plan.get(req.zero_plan as usize) {
            req.zero_plan += 1;
            match step {
                Step::Punch if !self.file.can_punch_hole => continue,
                Step::ZeroFill if fast => {
                    req.error = Some(NbdError::NotSup.because("zeroing this range would be as slow as writing it"));
                    return Next::Finished;
                }
                Step::ZeroFill => {
                    req.fill_at = self.range(req).0;
                    return self.step(req, Step::ZeroFill);
                }
                _ => return self.step(req, step),
            }
        }
        unreachable!("ZeroFill always ends the plan")
    }

    /// The client's byte range for range commands.
    fn range(&self, req: &Request) -> (u64, u64) {
        client_range(&req.command)
    }

    /// Builds the SQE for `step` and records it as the current step.
    fn step(&mut self, req: &mut Request, step: Step) -> Next {
        req.step = step;
        let entry = self.entry(req);
        Next::Submit(entry.user_data(Token::Request { request: self.id }.encode()))
    }

    fn entry(&self, req: &Request) -> squeue::Entry {
        let direct = types::Fd(self.file.direct_fd());
        let buffered = types::Fd(self.file.buffered_fd());
        let fua = matches!(req.command, Command::Write { fua: true, .. });
        let dsync = if fua { libc::RWF_DSYNC } else { 0 };
        let (start, end) = self.range(req);
        let block = self.file.alignment as usize;
        match req.step {
            Step::Read => {
                let at = req.progress;
                self.rw(req, direct, at, req.span.len - at, req.span.start + at as u64, false, 0)
            }
            Step::RmwHead => self.rw(req, direct, req.span.len, block, req.span.start, false, 0),
            Step::RmwTail => self.rw(req, direct, req.span.len, block, req.span.end() - block as u64, false, 0),
            Step::Write => {
                let at = req.progress;
                self.rw(req, direct, at, req.span.len - at, req.span.start + at as u64, true, dsync)
            }
            Step::WriteBuffered => {
                let at = req.progress;
                let len = req.client_len() - at;
                self.rw(req, buffered, req.span.head + at, len, start + at as u64, true, dsync)
            }
            Step::ZeroFill => {
                let len = ((end - req.fill_at) as usize).min(ZERO_FILL_BYTES_MAX) as u32;
                // The region is only ever read, by the kernel, and outlives the ring.
                opcode::Write::new(buffered, self.zeroes.base.as_ptr(), len).offset(req.fill_at).build()
            }
            Step::Punch => fallocate(direct, start, end, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            Step::ZeroRange => fallocate(direct, start, end, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            Step::Allocate => fallocate(direct, start, end, libc::FALLOC_FL_KEEP_SIZE),
            Step::Sync => opcode::Fsync::new(direct).flags(types::FsyncFlags::DATASYNC).build(),
            Step::Advise => opcode::Fadvise::new(buffered, (end - start) as libc::off_t, libc::POSIX_FADV_WILLNEED)
                .offset(start)
                .build(),
            Step::Start | Step::WaitLocks | Step::Lookup => unreachable!("not an I/O step"),
        }
    }

    /// A read or write of `len` buffer bytes starting at buffer offset `at`.
    #[allow(clippy::too_many_arguments)]
    fn rw(
        &self,
        req: &Request,
        fd: types::Fd,
        at: usize,
        len: usize,
        offset: u64,
        write: bool,
        flags: i32,
    ) -> squeue::Entry {
        let buffer = req.buffer.as_ref().expect("I/O steps own a buffer");
        assert!(at + len <= buffer.len());
        // SAFETY: in bounds (asserted); the buffer stays owned by the request
        // until this operation's CQE is reaped.
        let ptr = unsafe { buffer.as_ptr().add(at) };
        let len = len as u32;
        match (write, buffer.fixed_index()) {
            (false, Some(index)) => opcode::ReadFixed::new(fd, ptr, len, index).offset(offset).rw_flags(flags).build(),
            (false, None) => opcode::Read::new(fd, ptr, len).offset(offset).rw_flags(flags).build(),
            (true, Some(index)) => opcode::WriteFixed::new(fd, ptr, len, index).offset(offset).rw_flags(flags).build(),
            (true, None) => opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(flags).build(),
        }
    }
}

fn fallocate(fd: types::Fd, start: u64, end: u64, mode: i32) -> squeue::Entry {
    opcode::Fallocate::new(fd, end - start).offset(start).mode(mode).build()
}
