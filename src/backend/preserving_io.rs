//! Mutations of an image with copy-before-write snapshots, as storage
//! operations: before the mutation runs (`file_io`), the old data of every
//! chunk it touches is preserved for every snapshot, on the ring. For each
//! chunk not yet preserved the request takes one of the worker's copy
//! buffers, claims the chunk (`CopyBeforeWrite::claim`), reads the old data
//! from the live image into the buffer, and writes it to the snapshot's
//! scratch file unless it is all zeroes or there is no room
//! (`CopyBeforeWrite::admit`). A chunk another request is copying, or no
//! free buffer, defers the request; a request holds a buffer only while it
//! copies, so waiting never holds one. Preserved chunks cost a load each.

use std::sync::Arc;

use super::copy_before_write::{Claim, CopyBeforeWrite};
use super::copy_buffers::CopyBuffers;
use super::file_io::{FileIo, FileTask, mutated_range as mutated};
use super::io::{Data, Next, Op, Plan};
use crate::proto::transmission::Command;

pub struct PreservingIo<'a> {
    pub inner: FileIo<'a>,
    /// The image's snapshots now (the list may change between steps).
    pub snapshots: &'a [Arc<CopyBeforeWrite>],
    pub copies: &'a CopyBuffers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// A plain request: `file_io` alone.
    #[default]
    Off,
    /// Looking for the next chunk to preserve (or waiting for one).
    Scan,
    /// Reading a claimed chunk's old data from the live image.
    Read,
    /// Writing it to the scratch file.
    Write,
    /// Everything preserved: running on the live image.
    Inner,
}

/// A preserving request's progress, kept in its `FileTask`.
#[derive(Debug, Default)]
pub struct PreserveStep {
    phase: Phase,
    /// Position of the scan: the snapshot (by position and identity) and
    /// the chunk it stands at.
    snapshot_at: usize,
    snapshot_id: usize,
    chunk_at: usize,
    /// The snapshot whose chunk `chunk_at` this request claimed, while copying.
    copying: Option<Arc<CopyBeforeWrite>>,
    slot: Option<u8>,
    done: usize,
}

impl PreserveStep {
    /// Whether the request runs through [`PreservingIo`] (it started while
    /// the image had snapshots) and has not yet reached its mutation.
    pub fn preserving(&self) -> bool {
        !matches!(self.phase, Phase::Off | Phase::Inner)
    }
}

impl Plan<FileTask> for PreservingIo<'_> {
    fn start(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let Some((offset, end)) = mutated(command) else { return self.inner.start(command, task, data) };
        let first = self.snapshots.first().map(|s| s.chunks_of(offset, end).start).unwrap_or_default();
        task.preserve = PreserveStep { phase: Phase::Scan, chunk_at: first, ..PreserveStep::default() };
        self.scan(command, task, data)
    }

    fn resume(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        match task.preserve.phase {
            Phase::Scan => self.scan(command, task, data),
            _ => self.inner.resume(command, task, data),
        }
    }

    fn on_result(&self, command: &Command, task: &mut FileTask, data: Data<'_>, result: i32) -> Next {
        let step = &mut task.preserve;
        let Some(snapshot) = step.copying.clone() else { return self.inner.on_result(command, task, data, result) };
        let chunk = step.chunk_at;
        let (start, stop) = snapshot.range_of(chunk);
        let len = (stop - start) as usize;
        let slot = step.slot.expect("copying holds a buffer");
        if result <= 0 {
            let what = if step.phase == Phase::Read { "reading old data" } else { "writing scratch" };
            let why = if result == 0 {
                "no bytes".to_owned()
            } else {
                std::io::Error::from_raw_os_error(-result).to_string()
            };
            snapshot.copy_failed(&format!("{what} at {start}: {why}"));
            return self.copied(command, task, data);
        }
        step.done += result as usize;
        if step.done < len {
            return Next::Submit(self.transfer(step, &snapshot, start, len));
        }
        if step.phase == Phase::Write {
            return self.copied(command, task, data);
        }
        match snapshot.admit(&self.copies.bytes(slot)[..len]) {
            Ok(true) => {
                step.phase = Phase::Write;
                step.done = 0;
                Next::Submit(self.transfer(step, &snapshot, start, len))
            }
            Ok(false) => self.copied(command, task, data),
            Err(failure) => {
                // The mutation is refused: the chunk stays as it was.
                snapshot.release(chunk, false);
                let step = &mut task.preserve;
                step.copying = None;
                self.copies.give(step.slot.take().expect("copying holds a buffer"));
                step.phase = Phase::Inner;
                Next::Finished(Err(failure))
            }
        }
    }
}

impl PreservingIo<'_> {
    /// Finds the next chunk to preserve and starts copying it, or runs the
    /// mutation once there is none.
    fn scan(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let (offset, end) = mutated(command).expect("a mutation");
        let step = &mut task.preserve;
        // A snapshot deleted meanwhile shifts the list: start over (chunks
        // already preserved cost a load each). None is added while this
        // request is in flight (a snapshot is cut with the image's
        // mutations drained), so an address seen again is the same one.
        let same = self.snapshots.get(step.snapshot_at).map(|s| Arc::as_ptr(s) as usize);
        if step.snapshot_id != 0 && same != Some(step.snapshot_id) {
            step.snapshot_at = 0;
            step.chunk_at = self.snapshots.first().map(|s| s.chunks_of(offset, end).start).unwrap_or_default();
        }
        while let Some(snapshot) = self.snapshots.get(step.snapshot_at) {
            step.snapshot_id = Arc::as_ptr(snapshot) as usize;
            let range = snapshot.chunks_of(offset, end);
            while step.chunk_at < range.end {
                let chunk = step.chunk_at;
                // The steady state: one load, no buffer taken.
                if snapshot.is_broken() || snapshot.is_preserved(chunk) {
                    step.chunk_at += 1;
                    continue;
                }
                // Only a copier holds a buffer, so waiting for one never
                // waits on a waiter.
                let Some(slot) = self.copies.take() else { return Next::Defer };
                match snapshot.claim(chunk) {
                    Claim::Preserved => {
                        self.copies.give(slot);
                        step.chunk_at += 1;
                    }
                    Claim::Busy => {
                        self.copies.give(slot);
                        return Next::Defer;
                    }
                    Claim::Mine => {
                        let (start, stop) = snapshot.range_of(chunk);
                        step.copying = Some(Arc::clone(snapshot));
                        step.slot = Some(slot);
                        step.phase = Phase::Read;
                        step.done = 0;
                        return Next::Submit(self.transfer(step, snapshot, start, (stop - start) as usize));
                    }
                }
            }
            step.snapshot_at += 1;
            step.chunk_at = self.snapshots.get(step.snapshot_at).map_or(0, |s| s.chunks_of(offset, end).start);
        }
        step.phase = Phase::Inner;
        self.inner.start(command, task, data)
    }

    /// The rest of the current copy step's transfer.
    fn transfer(&self, step: &PreserveStep, snapshot: &CopyBeforeWrite, start: u64, len: usize) -> Op {
        let slot = step.slot.expect("copying holds a buffer");
        let memory = self.copies.memory(slot, step.done, len - step.done);
        let offset = start + step.done as u64;
        match step.phase {
            Phase::Read => Op::Read { fd: snapshot.live_fd(), into: memory, offset },
            _ => Op::Write { fd: snapshot.scratch_fd(), from: memory, offset, dsync: false },
        }
    }

    /// The claimed chunk is preserved (or its snapshot broke trying): released,
    /// the buffer given back, and the scan goes on after it.
    fn copied(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        let step = &mut task.preserve;
        let snapshot = step.copying.take().expect("copying");
        snapshot.release(step.chunk_at, true);
        self.copies.give(step.slot.take().expect("copying holds a buffer"));
        step.chunk_at += 1;
        step.phase = Phase::Scan;
        self.scan(command, task, data)
    }
}
