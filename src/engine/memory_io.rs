//! Memory-backend requests complete synchronously on the worker: a memcpy
//! under a per-page lock is cheaper than any ring round trip.

use crate::backend::MemoryBackend;
use crate::faults::{self, Direction};
use crate::proto::NbdError;
use crate::proto::transmission::Command;

use super::request::Request;

pub fn execute(memory: &MemoryBackend, req: &mut Request) {
    let injected = match req.command {
        Command::Read { offset, length, .. } => faults::fails(Direction::Read, offset, length.into()),
        Command::Write { offset, length, .. } => faults::fails(Direction::Write, offset, length.into()),
        _ => false,
    };
    if injected {
        req.error = Some(NbdError::Io.because("I/O error on the storage behind the export"));
        return;
    }
    match req.command {
        Command::Read { offset, length, .. } => {
            let buffer = req.buffer.as_mut().expect("reads own a buffer");
            memory.read(offset, &mut buffer.as_mut_slice()[..length as usize]);
        }
        Command::Write { offset, length, .. } => {
            let buffer = req.buffer.as_ref().expect("writes own a buffer");
            memory.write(offset, &buffer.as_slice()[..length as usize]);
        }
        Command::Trim { offset, length, .. } => memory.trim(offset, length),
        Command::WriteZeroes { offset, length, no_hole, .. } => memory.zero(offset, length, no_hole),
        Command::Flush | Command::Cache { .. } => {}
        Command::BlockStatus { .. } | Command::Disconnect => unreachable!("handled by the worker"),
    }
}
