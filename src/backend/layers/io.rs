//! Layered requests as storage operations: the seam's fan-out case. A READ
//! walks the runs of its range layer by layer, one ring read per run into
//! its own part of the request's (registered) buffer, zeroes filled in
//! place; every other command runs on the top exactly as on a plain file
//! (`file_io`), after `Layered::prepare_mutation` has brought the chunks it
//! touches up into the top. TRIM becomes WRITE_ZEROES, since a trimmed top
//! chunk must hide what lies below.

use crate::backend::block_locks::BlockLocks;
use crate::backend::file_io::{FileIo, FileTask, ZeroRegion};
use crate::backend::io::{Data, Next, Op, Plan};
use crate::proto::transmission::Command;
use crate::proto::{Failure, NbdError};

use super::Layered;

pub struct LayeredIo<'a> {
    pub layers: &'a Layered,
    pub locks: &'a BlockLocks,
    pub zeroes: &'a ZeroRegion,
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

impl Plan<FileTask> for LayeredIo<'_> {
    fn start(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        match *command {
            Command::Read { length, .. } => self.read_on(task, data, task.span.head + length as usize),
            // Nothing to prefetch that would outlive O_DIRECT reads of the layers.
            Command::Cache { .. } => Next::Finished(Ok(())),
            _ => self.top().start(&on_top(command), task, data),
        }
    }

    fn resume(&self, command: &Command, task: &mut FileTask, data: Data<'_>) -> Next {
        self.top().resume(&on_top(command), task, data)
    }

    fn on_result(&self, command: &Command, task: &mut FileTask, data: Data<'_>, result: i32) -> Next {
        let Command::Read { length, .. } = *command else {
            return self.top().on_result(&on_top(command), task, data, result);
        };
        if result < 0 {
            return Next::Finished(Err(Failure::from_errno(-result)));
        }
        let at = task.span.start + task.progress as u64;
        if result == 0 {
            // Past the end of a short lower layer: zeroes to the run's end.
            let (from, to) = (task.progress, (task.run_end - task.span.start) as usize);
            if to <= from {
                return Next::Finished(Err(NbdError::Io.because("a layer returned no bytes")));
            }
            data.bytes[from..to].fill(0);
            task.progress = to;
        } else {
            task.progress += result as usize;
            debug_assert!(at + result as u64 <= task.run_end);
        }
        self.read_on(task, data, task.span.head + length as usize)
    }
}

impl LayeredIo<'_> {
    fn top(&self) -> FileIo<'_> {
        FileIo { file: &self.layers.top, locks: self.locks, zeroes: self.zeroes }
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
                    return Next::Finished(Err(Failure::from_errno(e.raw_os_error().unwrap_or(libc::EIO))));
                }
                task.progress += len;
                continue;
            }
            task.run_end = stop;
            let into = data.memory(task.progress, len);
            return Next::Submit(Op::Read { fd: file.direct_fd(), into, offset: at });
        }
        Next::Finished(Ok(()))
    }
}
