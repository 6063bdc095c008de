//! Layered requests as storage operations: the seam's fan-out case.
//!
//! A READ walks the runs of its range layer by layer, one ring read per run
//! into its own part of the request's (registered) buffer, zeroes filled in
//! place.
//!
//! A mutation first brings the chunks it touches into the top, on the ring:
//! it claims the absent ones (in ascending order, deferring while another
//! request holds one), copies the old content of an edge chunk it covers
//! only in part up from below through one of the worker's copy buffers
//! (ring reads of each lower run, then a write or, for all zeroes, a punch
//! of the top), syncs the top if it copied, records the claimed chunks in
//! the map and syncs the map. Only then does it run on the top exactly as
//! on a plain file (`file_io`, O_DIRECT and registered buffers unchanged);
//! TRIM becomes WRITE_ZEROES, since a trimmed top chunk must hide what lies
//! below. A mutation of chunks already present goes straight to the top
//! after one load per chunk.

use crate::backend::block_locks::BlockLocks;
use crate::backend::file_io::{FileIo, FileTask, ZeroRegion, mutated_range as mutated};
use crate::backend::io::{Data, Next, Op, Plan};
use crate::proto::transmission::Command;
use crate::proto::{Failure, NbdError};

use super::{CHUNK_BYTES, Layered};
use crate::backend::copy_buffers::CopyBuffers;

pub struct LayeredIo<'a> {
    pub layers: &'a Layered,
    pub locks: &'a BlockLocks,
    pub zeroes: &'a ZeroRegion,
    pub copies: &'a CopyBuffers,
}

/// Where a layered mutation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Claiming its absent chunks (or waiting for one another request holds).
    #[default]
    Claim,
    /// Copying edge chunks up: waiting for a copy buffer, or reading old
    /// content from below into it.
    CopyRead,
    /// Writing the copied content into the top.
    CopyWrite,
    /// Punching the top where the old content is all zeroes.
    CopyPunch,
    SyncTop,
    SyncMap,
    /// Running on the top through `file_io`.
    Top,
}

/// A layered request's own progress, kept in its `FileTask`.
#[derive(Debug, Default)]
pub struct LayerStep {
    phase: Phase,
    /// Next chunk to claim.
    next: usize,
    /// This request claimed at least one chunk.
    claimed: bool,
    /// Edge chunks still to copy up: bit 0 the first chunk, bit 1 the last.
    edges: u8,
    /// The chunk being copied up.
    chunk: usize,
    slot: Option<u8>,
    /// Bytes of the current copy step done.
    done: usize,
    copied: bool,
    /// End (file offset) of the run a read is reading.
    run_end: u64,
}

/// What the top runs for `command`.
fn on_top(command: &Command) -> Command {
    match *command {
        Command::Trim { offset, length, fua } => {
            Command::WriteZeroes { offset, length, fua, no_hole: false, fast: false }
        }
        other => other,
    }
}

fn errno_failure(e: &std::io::Error) -> Failure {
    Failure::from_errno(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Plan<FileTask> for LayeredIo<'_> {
    fn start(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        match *command {
            Command::Read { length, .. } => self.read_on(task, data, task.span.head + length as usize),
            // Nothing to prefetch that would outlive O_DIRECT reads of the layers.
            Command::Cache { .. } => Next::Finished(Ok(())),
            _ => match mutated(command) {
                Some((offset, end)) => {
                    task.layer = LayerStep { next: self.layers.chunks_of(offset, end).start, ..LayerStep::default() };
                    self.prepare(command, task, data)
                }
                None => self.top().start(&on_top(command), task, data),
            },
        }
    }

    fn resume(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        match task.layer.phase {
            Phase::Claim | Phase::CopyRead if mutated(command).is_some() => self.prepare(command, task, data),
            _ => self.top().resume(&on_top(command), task, data),
        }
    }

    fn on_result(&self, command: &Command, task: &mut FileTask, data: Data<'_>, result: i32) -> Next {
        if let Command::Read { length, .. } = *command {
            return self.on_read(task, data, result, length);
        }
        if mutated(command).is_none() || task.layer.phase == Phase::Top {
            return self.top().on_result(&on_top(command), task, data, result);
        }
        if result < 0 {
            return self.fail(command, task, Failure::from_errno(-result));
        }
        let done = result as usize;
        let step = &mut task.layer;
        match step.phase {
            Phase::CopyRead if done == 0 => {
                // Past the end of a short lower layer: zeroes to the run's end.
                let (start, _) = self.layers.chunk_range(step.chunk);
                let to = (step.run_end - start) as usize;
                self.copies.bytes(step.slot.expect("copying holds a buffer"))[step.done..to].fill(0);
                step.done = to;
                self.copy_read(command, task, data)
            }
            Phase::CopyRead => {
                step.done += done;
                self.copy_read(command, task, data)
            }
            Phase::CopyWrite if done == 0 => {
                self.fail(command, task, NbdError::Io.because("the top layer accepted no bytes"))
            }
            Phase::CopyWrite => {
                step.done += done;
                self.copy_write(command, task, data)
            }
            Phase::CopyPunch => self.copied(command, task, data),
            Phase::SyncTop => self.record(command, task, data),
            Phase::SyncMap => self.to_top(command, task, data, true),
            Phase::Claim | Phase::Top => unreachable!("no operation was submitted"),
        }
    }
}

impl LayeredIo<'_> {
    fn top(&self) -> FileIo<'_> {
        FileIo { file: &self.layers.top, locks: self.locks, zeroes: self.zeroes }
    }

    fn chunks(&self, command: &Command) -> std::ops::Range<usize> {
        let (offset, end) = mutated(command).expect("a mutation");
        self.layers.chunks_of(offset, end)
    }

    /// Claims, then starts copying up what needs it.
    fn prepare(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let range = self.chunks(command);
        let step = &mut task.layer;
        if step.phase == Phase::Claim {
            if !self.layers.claim(&mut step.next, &range, &mut step.claimed) {
                return Next::Defer;
            }
            if !step.claimed {
                return self.to_top(command, task, data, false);
            }
            let (offset, end) = mutated(command).expect("a mutation");
            let needs_copy = |chunk: usize| {
                let (start, stop) = self.layers.chunk_range(chunk);
                self.layers.is_claimed(chunk) && (offset > start || end < stop)
            };
            let (first, last) = (range.start, range.end - 1);
            step.edges = u8::from(needs_copy(first)) | (u8::from(last != first && needs_copy(last)) << 1);
            step.phase = Phase::CopyRead;
        }
        self.next_copy(command, task, data)
    }

    fn next_copy(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let range = self.chunks(command);
        let step = &mut task.layer;
        if step.edges == 0 {
            if let Some(slot) = step.slot.take() {
                self.copies.give(slot);
            }
            if step.copied {
                step.phase = Phase::SyncTop;
                return Next::Submit(Op::Sync { fd: self.layers.top.direct_fd() });
            }
            return self.record(command, task, data);
        }
        if step.slot.is_none() {
            match self.copies.take() {
                Some(slot) => step.slot = Some(slot),
                // Every buffer of this worker is copying: one copy's time.
                None => return Next::Defer,
            }
        }
        let head = step.edges & 1 != 0;
        step.chunk = if head { range.start } else { range.end - 1 };
        step.edges &= if head { !1 } else { !2 };
        step.done = 0;
        step.phase = Phase::CopyRead;
        self.copy_read(command, task, data)
    }

    /// Reads the chunk's old content from below, run by run, until the
    /// buffer holds all of it (rounded up to the alignment).
    fn copy_read(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let layers = self.layers;
        let step = &mut task.layer;
        let slot = step.slot.expect("copying holds a buffer");
        let (start, stop) = layers.chunk_range(step.chunk);
        let alignment = u64::from(layers.alignment());
        let want = ((stop - start).div_ceil(alignment) * alignment).min(CHUNK_BYTES) as usize;
        while step.done < want {
            let at = start + step.done as u64;
            let (run_stop, owner) = layers.run_from(at, start + want as u64, true);
            let len = (run_stop - at) as usize;
            match layers.file_of(owner) {
                None => self.copies.bytes(slot)[step.done..step.done + len].fill(0),
                Some(file) if file.inline_io => {
                    let piece = &mut self.copies.bytes(slot)[step.done..step.done + len];
                    if let Err(e) = super::read_to_eof(file, at, piece) {
                        return self.fail(command, task, errno_failure(&e));
                    }
                }
                Some(file) => {
                    step.run_end = run_stop;
                    let into = self.copies.memory(slot, step.done, len);
                    return Next::Submit(Op::Read { fd: file.direct_fd(), into, offset: at });
                }
            }
            step.done += len;
        }
        step.done = 0;
        let zeroes = self.copies.bytes(slot)[..(stop - start) as usize].iter().all(|&b| b == 0);
        if zeroes && layers.top.can_punch_hole {
            // Whatever an unrecorded, crashed mutation left there goes too.
            step.phase = Phase::CopyPunch;
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            return Next::Submit(Op::Allocate {
                fd: layers.top.direct_fd(),
                offset: start,
                length: stop - start,
                mode,
            });
        }
        step.phase = Phase::CopyWrite;
        self.copy_write(command, task, data)
    }

    /// Writes the copied chunk into the top: O_DIRECT where it ends on the
    /// alignment, buffered for a short last chunk (an aligned write would
    /// extend the file).
    fn copy_write(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let top = &self.layers.top;
        let step = &mut task.layer;
        let slot = step.slot.expect("copying holds a buffer");
        let (start, stop) = self.layers.chunk_range(step.chunk);
        let len = (stop - start) as usize;
        if step.done >= len {
            return self.copied(command, task, data);
        }
        if top.inline_io {
            if let Err(e) = top.write_inline(start, &self.copies.bytes(slot)[..len]) {
                return self.fail(command, task, errno_failure(&e));
            }
            return self.copied(command, task, data);
        }
        let aligned = (len as u64).is_multiple_of(u64::from(top.alignment));
        let fd = if aligned { top.direct_fd() } else { top.buffered_fd() };
        let from = self.copies.memory(slot, step.done, len - step.done);
        Next::Submit(Op::Write { fd, from, offset: start + step.done as u64, dsync: false })
    }

    fn copied(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        task.layer.copied = true;
        self.layers.count_copy_up();
        self.next_copy(command, task, data)
    }

    /// Writes the claimed chunks' bits; the sync follows on the ring.
    fn record(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        match self.layers.record(self.chunks(command)) {
            Err(e) => {
                crate::note!("{}: recording chunks in the layer map: {e}", self.layers.top.path.display());
                self.fail(command, task, errno_failure(&e))
            }
            Ok(None) => self.to_top(command, task, data, true),
            Ok(Some(fd)) => {
                task.layer.phase = Phase::SyncMap;
                Next::Submit(Op::Sync { fd })
            }
        }
    }

    /// The chunks are the top's (durably, when `settle`): run on the top.
    fn to_top(&self, command: &Command, task: &mut FileTask, data: Data<'_>, settle: bool) -> Next {
        if settle {
            self.layers.settle(self.chunks(command), true);
        }
        task.layer.phase = Phase::Top;
        self.top().start(&on_top(command), task, data)
    }

    /// Gives up: the claims go back to absent (the chunks read from below
    /// again, as before), the buffer back to the worker.
    fn fail(&self, command: &Command, task: &mut FileTask, failure: Failure) -> Next {
        let step = &mut task.layer;
        if let Some(slot) = step.slot.take() {
            self.copies.give(slot);
        }
        let range = self.chunks(command);
        self.layers.settle(range.start..step.next, false);
        step.phase = Phase::Top;
        Next::Finished(Err(failure))
    }

    fn on_read(&self, task: &mut FileTask, data: Data<'_>, result: i32, length: u32) -> Next {
        if result < 0 {
            return Next::Finished(Err(Failure::from_errno(-result)));
        }
        if result == 0 {
            // Past the end of a short lower layer: zeroes to the run's end.
            let (from, to) = (task.progress, (task.layer.run_end - task.span.start) as usize);
            if to <= from {
                return Next::Finished(Err(NbdError::Io.because("a layer returned no bytes")));
            }
            data.bytes[from..to].fill(0);
            task.progress = to;
        } else {
            task.progress += result as usize;
        }
        self.read_on(task, data, task.span.head + length as usize)
    }

    /// Reads runs until the buffer holds its first `needed` bytes, or one
    /// run's read is submitted.
    fn read_on(&self, task: &mut FileTask, mut data: Data<'_>, needed: usize) -> Next {
        let layers = self.layers;
        while task.progress < needed {
            let at = task.span.start + task.progress as u64;
            let (stop, owner) = layers.run_from(at, task.span.end(), false);
            let len = (stop - at) as usize;
            let Some(file) = layers.file_of(owner) else {
                data.bytes[task.progress..task.progress + len].fill(0);
                task.progress += len;
                continue;
            };
            if file.inline_io {
                let piece = &mut data.bytes[task.progress..task.progress + len];
                if let Err(e) = super::read_to_eof(file, at, piece) {
                    return Next::Finished(Err(errno_failure(&e)));
                }
                task.progress += len;
                continue;
            }
            task.layer.run_end = stop;
            let into = data.memory(task.progress, len);
            return Next::Submit(Op::Read { fd: file.direct_fd(), into, offset: at });
        }
        Next::Finished(Ok(()))
    }
}
