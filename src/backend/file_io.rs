//! File and block-device requests as a sequence of storage operations.
//!
//! `start` picks a request's first operation, `on_result` consumes one's
//! result and picks the next; each returns what the engine should do
//! ([`Next`]). A mutation that covers a block only in part first takes that
//! block's lock (see `block_locks`); while another request holds it the
//! request returns `Next::Defer` and the engine retries it. Every path that
//! returns `Finished` releases the locks first.

use crate::faults::{self, Direction};
use crate::proto::transmission::Command;
use crate::proto::{Failure, NbdError};

use super::block_locks::{BlockLocks, LockSet};
use super::file::FileBackend;
use super::io::{AlignedSpan, Data, IoMemory, Next, Op, Plan};

/// Bytes of the shared zero region the ZeroFill fallback writes from.
pub const ZERO_FILL_BYTES_MAX: usize = 1 << 20;

/// A read-only region of zeroes every ZeroFill write of a worker reads
/// from. Never written, so its pages are the kernel's shared zero page and
/// cost no memory. The worker owns it and drops it after its ring.
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

    fn memory(&self, len: usize) -> IoMemory {
        IoMemory { ptr: self.base.as_ptr(), len: len.min(ZERO_FILL_BYTES_MAX) as u32, fixed: None }
    }
}

impl Drop for ZeroRegion {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; no write from it is in
        // flight once its owner's ring is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), ZERO_FILL_BYTES_MAX) };
    }
}

/// The operations a file request walks through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Step {
    #[default]
    Start,
    Read,
    /// Reading the partial first block of an unaligned write.
    RmwHead,
    /// Reading the partial last block of an unaligned write.
    RmwTail,
    Write,
    /// A write through the buffered descriptor (touches the unaligned end).
    WriteBuffered,
    Punch,
    ZeroRange,
    /// fallocate(0) after a punch, for WRITE_ZEROES with NO_HOLE.
    Allocate,
    /// Writing zeroes from the zero region, the last resort for WRITE_ZEROES.
    ZeroFill,
    Sync,
    Prefetch,
    /// Waiting for the locks of its partially covered blocks.
    WaitLocks,
}

/// Per-request state of a file request, kept by the engine with the request.
#[derive(Debug, Default)]
pub struct FileTask {
    /// Where the request's buffer lies in the file (set at admission).
    pub span: AlignedSpan,
    step: Step,
    /// Bytes of the current step done so far (short reads and writes).
    pub(super) progress: usize,
    /// A layered request's own progress (`layers::io`).
    pub(super) layer: super::layers::io::LayerStep,
    /// A mutation's preserving for snapshots (`preserving_io`).
    pub(super) preserve: super::preserving_io::PreserveStep,
    /// A snapshot export's read (`snapshot_io`).
    pub(super) snap: super::snapshot_io::SnapshotStep,
    /// Position in the WRITE_ZEROES fallback plan.
    zero_plan: u8,
    /// Next offset for ZeroFill.
    fill_at: u64,
    /// Block locks held until the request is finished.
    locks: LockSet,
}

impl FileTask {
    pub fn new(span: AlignedSpan) -> Self {
        Self { span, ..Self::default() }
    }

    /// Whether the request is between operations, waiting for a lock.
    pub fn is_waiting(&self) -> bool {
        self.step == Step::WaitLocks
    }

    pub fn holds_locks(&self) -> bool {
        !self.locks.is_empty()
    }

    /// The request is preserving old data for snapshots before it runs
    /// (so the engine drives it through `preserving_io`).
    pub fn is_preserving(&self) -> bool {
        self.preserve.preserving()
    }
}

/// Zeroing strategies in order of preference; `ZeroFill` is the slow last
/// resort that FAST_ZERO refuses.
const PLAN_MAY_PUNCH: [Step; 3] = [Step::Punch, Step::ZeroRange, Step::ZeroFill];
const PLAN_NO_HOLE: [Step; 3] = [Step::ZeroRange, Step::Punch, Step::ZeroFill];

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

/// The bytes a WRITE, WRITE_ZEROES or TRIM changes.
pub fn mutated_range(command: &Command) -> Option<(u64, u64)> {
    match command {
        Command::Write { .. } | Command::WriteZeroes { .. } | Command::Trim { .. } => Some(client_range(command)),
        _ => None,
    }
}

/// Bytes of client data a READ or WRITE carries.
fn client_len(command: &Command) -> usize {
    match *command {
        Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
        _ => 0,
    }
}

/// One request's view of the file backend.
pub struct FileIo<'a> {
    pub file: &'a FileBackend,
    pub locks: &'a BlockLocks,
    pub zeroes: &'a ZeroRegion,
}

impl Plan<FileTask> for FileIo<'_> {
    fn start(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let next =
            if self.file.inline_io { self.inline(command, task, data) } else { self.on_ring(command, task, data) };
        self.settle(task, next)
    }

    fn resume(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        debug_assert_eq!(task.step, Step::WaitLocks);
        self.start(command, task, data)
    }

    fn on_result(&self, command: &Command, task: &mut FileTask, mut data: Data<'_>, result: i32) -> Next {
        let result = with_faults(command, task, result);
        let next = if result < 0 {
            self.on_error(command, task, &mut data, -result)
        } else {
            self.on_success(command, task, &mut data, result as usize)
        };
        self.settle(task, next)
    }
}

impl FileIo<'_> {
    /// Releases the locks of a request whose work is over.
    fn settle(&self, task: &mut FileTask, next: Next) -> Next {
        if matches!(next, Next::Finished(_)) && task.holds_locks() {
            self.locks.release(&task.locks);
            task.locks = LockSet::default();
        }
        next
    }

    /// tmpfs/ramfs: reads and writes are memory copies with no device to
    /// wait on, and these filesystems refuse NOWAIT, so a ring submission
    /// would only add a hand-off to an io-wq thread. Everything else still
    /// goes through the ring.
    fn inline(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        let result = match *command {
            Command::Read { offset, length, .. } if faults::fails(Direction::Read, offset, length.into()) => Err(eio),
            Command::Write { offset, length, .. } if faults::fails(Direction::Write, offset, length.into()) => Err(eio),
            Command::Read { offset, length, .. } => self.file.read_inline(offset, &mut data.bytes[..length as usize]),
            // Durable on completion: memory filesystems have no cache to flush.
            Command::Write { offset, length, .. } => self.file.write_inline(offset, &data.bytes[..length as usize]),
            Command::Flush => Ok(()),
            // Trim and zeroes keep their ring steps (and fallbacks).
            _ => return self.on_ring(command, task, data),
        };
        Next::Finished(result.map_err(|e| Failure::from_errno(e.raw_os_error().unwrap_or(libc::EIO))))
    }

    fn on_ring(&self, command: &Command, task: &mut FileTask, mut data: Data<'_>) -> Next {
        match *command {
            Command::Read { .. } => self.step(command, task, &mut data, Step::Read),
            Command::Write { offset, length, .. } => self.start_write(command, task, &mut data, offset, length),
            Command::Flush => self.step(command, task, &mut data, Step::Sync),
            Command::Trim { offset, length, .. } if self.file.can_punch_hole => {
                if !self.lock(task, offset, offset + length) {
                    return Next::Defer;
                }
                self.step(command, task, &mut data, Step::Punch)
            }
            Command::Trim { fua: true, .. } => self.step(command, task, &mut data, Step::Sync),
            Command::Trim { .. } => Next::Finished(Ok(())), // advisory, nothing to do
            Command::WriteZeroes { offset, length, .. } => {
                if !self.lock(task, offset, offset + length) {
                    return Next::Defer;
                }
                self.next_zero_strategy(command, task, &mut data)
            }
            Command::Cache { .. } if !self.file.direct_io => self.step(command, task, &mut data, Step::Prefetch),
            // O_DIRECT bypasses the page cache, so prefetching into it would
            // not help later reads.
            Command::Cache { .. } => Next::Finished(Ok(())),
            Command::BlockStatus { .. } | Command::Disconnect => unreachable!("handled by the engine"),
        }
    }

    /// Takes the locks of the blocks `[offset, end)` covers in part; false
    /// (the request now waits in `WaitLocks`) while another request holds one.
    fn lock(&self, task: &mut FileTask, offset: u64, end: u64) -> bool {
        if task.holds_locks() {
            return true;
        }
        let set = self.locks.partial_blocks(offset, end);
        if !self.locks.try_acquire(&set) {
            task.step = Step::WaitLocks;
            return false;
        }
        task.locks = set;
        true
    }

    fn start_write(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>, offset: u64, len: u32) -> Next {
        if task.span.is_exact(len as usize) {
            return self.step(command, task, data, Step::Write);
        }
        if !self.lock(task, offset, offset + u64::from(len)) {
            return Next::Defer;
        }
        if task.span.end() > self.file.size {
            // Aligned I/O would extend the file past its unaligned end.
            return self.step(command, task, data, Step::WriteBuffered);
        }
        if !offset.is_multiple_of(u64::from(self.file.alignment)) {
            return self.step(command, task, data, Step::RmwHead);
        }
        self.step(command, task, data, Step::RmwTail)
    }

    fn on_success(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>, done: usize) -> Next {
        match task.step {
            Step::Read => {
                task.progress += done;
                if task.progress >= task.span.head + client_len(command) {
                    return Next::Finished(Ok(()));
                }
                if done == 0 {
                    // The file shrank under us: report, don't spin.
                    return Next::Finished(Err(NbdError::Io.because("the file behind the export shrank")));
                }
                self.step(command, task, data, Step::Read)
            }
            Step::RmwHead => self.merge_head(command, task, data),
            Step::RmwTail => {
                self.merge_tail(command, task, data);
                self.step(command, task, data, Step::Write)
            }
            Step::Write | Step::WriteBuffered | Step::ZeroFill => self.on_written(command, task, data, done),
            Step::Punch if matches!(command, Command::WriteZeroes { no_hole: true, .. }) => {
                self.step(command, task, data, Step::Allocate)
            }
            Step::Punch | Step::ZeroRange | Step::Allocate => self.after_mutation(command, task, data),
            Step::Sync | Step::Prefetch => Next::Finished(Ok(())),
            Step::Start | Step::WaitLocks => unreachable!("no operation was submitted"),
        }
    }

    fn merge_head(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>) -> Next {
        let block = self.file.alignment as usize;
        let (head, len, span_len) = (task.span.head, client_len(command), task.span.len);
        let (bytes, scratch) = data.bytes.split_at_mut(span_len);
        bytes[..head].copy_from_slice(&scratch[..head]);
        if span_len == block {
            // Head and tail are the same block: one read covers both.
            bytes[head + len..block].copy_from_slice(&scratch[head + len..block]);
            return self.step(command, task, data, Step::Write);
        }
        if (head + len) % block != 0 {
            return self.step(command, task, data, Step::RmwTail);
        }
        self.step(command, task, data, Step::Write)
    }

    fn merge_tail(&self, command: &Command, task: &FileTask, data: &mut Data<'_>) {
        let block = self.file.alignment as usize;
        let span_len = task.span.len;
        let tail_used = (task.span.head + client_len(command)) % block;
        let (bytes, scratch) = data.bytes.split_at_mut(span_len);
        bytes[span_len - block + tail_used..].copy_from_slice(&scratch[tail_used..block]);
    }

    fn on_written(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>, done: usize) -> Next {
        if done == 0 {
            return Next::Finished(Err(NbdError::Io.because("the storage accepted no bytes")));
        }
        task.progress += done;
        let total = match task.step {
            Step::Write => task.span.len,
            Step::WriteBuffered => client_len(command),
            _ => {
                let (_, end) = client_range(command);
                task.fill_at += done as u64;
                task.progress = 0;
                if task.fill_at < end {
                    return self.step(command, task, data, Step::ZeroFill);
                }
                return self.after_mutation(command, task, data);
            }
        };
        if task.progress < total {
            return self.step(command, task, data, task.step);
        }
        // Writes carry RWF_DSYNC when FUA was asked, so they are durable here.
        Next::Finished(Ok(()))
    }

    fn after_mutation(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>) -> Next {
        match command {
            Command::Trim { fua: true, .. } | Command::WriteZeroes { fua: true, .. } => {
                self.step(command, task, data, Step::Sync)
            }
            _ => Next::Finished(Ok(())),
        }
    }

    fn on_error(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>, errno: i32) -> Next {
        let unsupported = errno == libc::EOPNOTSUPP || errno == libc::ENOTTY;
        match (task.step, command) {
            (Step::Punch | Step::ZeroRange | Step::Allocate, Command::WriteZeroes { .. }) if unsupported => {
                self.next_zero_strategy(command, task, data)
            }
            // TRIM is advisory: a filesystem that cannot punch just keeps the data.
            (Step::Punch, Command::Trim { .. }) if unsupported => self.after_mutation(command, task, data),
            (Step::Prefetch, _) => Next::Finished(Ok(())),
            _ => Next::Finished(Err(Failure::from_errno(errno))),
        }
    }

    fn next_zero_strategy(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>) -> Next {
        let Command::WriteZeroes { no_hole, fast, .. } = *command else { unreachable!("zeroing plan") };
        let plan = if no_hole { PLAN_NO_HOLE } else { PLAN_MAY_PUNCH };
        while let Some(&step) = plan.get(task.zero_plan as usize) {
            task.zero_plan += 1;
            match step {
                Step::Punch if !self.file.can_punch_hole => continue,
                Step::ZeroFill if fast => {
                    let refusal = NbdError::NotSup.because("zeroing this range would be as slow as writing it");
                    return Next::Finished(Err(refusal));
                }
                Step::ZeroFill => {
                    task.fill_at = client_range(command).0;
                    return self.step(command, task, data, Step::ZeroFill);
                }
                _ => return self.step(command, task, data, step),
            }
        }
        unreachable!("ZeroFill always ends the plan")
    }

    /// Records `step` as current and describes its operation.
    fn step(&self, command: &Command, task: &mut FileTask, data: &mut Data<'_>, step: Step) -> Next {
        task.step = step;
        Next::Submit(self.operation(command, task, data))
    }

    fn operation(&self, command: &Command, task: &FileTask, data: &mut Data<'_>) -> Op {
        let direct = self.file.direct_fd();
        let buffered = self.file.buffered_fd();
        let dsync = matches!(command, Command::Write { fua: true, .. });
        let (start, end) = client_range(command);
        let (block, span, at) = (self.file.alignment as usize, task.span, task.progress);
        match task.step {
            Step::Read => Op::Read { fd: direct, into: data.memory(at, span.len - at), offset: span.start + at as u64 },
            Step::RmwHead => Op::Read { fd: direct, into: data.memory(span.len, block), offset: span.start },
            Step::RmwTail => {
                Op::Read { fd: direct, into: data.memory(span.len, block), offset: span.end() - block as u64 }
            }
            Step::Write => {
                Op::Write { fd: direct, from: data.memory(at, span.len - at), offset: span.start + at as u64, dsync }
            }
            Step::WriteBuffered => {
                let from = data.memory(span.head + at, client_len(command) - at);
                Op::Write { fd: buffered, from, offset: start + at as u64, dsync }
            }
            Step::ZeroFill => {
                let from = self.zeroes.memory((end - task.fill_at) as usize);
                Op::Write { fd: buffered, from, offset: task.fill_at, dsync: false }
            }
            Step::Punch => allocate(direct, start, end, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            Step::ZeroRange => allocate(direct, start, end, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            Step::Allocate => allocate(direct, start, end, libc::FALLOC_FL_KEEP_SIZE),
            Step::Sync => Op::Sync { fd: direct },
            Step::Prefetch => Op::Prefetch { fd: buffered, offset: start, length: end - start },
            Step::Start | Step::WaitLocks => unreachable!("not an I/O step"),
        }
    }
}

fn allocate(fd: std::os::fd::RawFd, start: u64, end: u64, mode: i32) -> Op {
    Op::Allocate { fd, offset: start, length: end - start, mode }
}

/// Test-injected faults on data transfers (see `crate::faults`).
fn with_faults(command: &Command, task: &FileTask, result: i32) -> i32 {
    let direction = match task.step {
        Step::Read => Direction::Read,
        Step::Write | Step::WriteBuffered => Direction::Write,
        _ => return result,
    };
    let (offset, end) = client_range(command);
    faults::transfer_result(direction, offset, end - offset, task.progress == 0, result)
}
