//! The write path: every WRITE, WRITE_ZEROES and TRIM that reaches a
//! backend passes through [`complete`] when its backend work is over, on
//! every worker and for every backend. Anything that must observe mutations
//! after the fact (extent cache updates) attaches here and nowhere else;
//! what must happen before the data moves (change tracking's marks,
//! copy-before-write snapshots' copies) runs when the engine starts the
//! request (`engine::worker`).

use crate::export::Image;
use crate::proto::transmission::Command;

/// A range about to change, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    Write { offset: u64, length: u64 },
    Zero { offset: u64, length: u64 },
    Trim { offset: u64, length: u64 },
}

impl Mutation {
    pub fn of(command: &Command) -> Option<Mutation> {
        match *command {
            Command::Write { offset, length, .. } => Some(Mutation::Write { offset, length: u64::from(length) }),
            Command::WriteZeroes { offset, length, .. } => Some(Mutation::Zero { offset, length }),
            Command::Trim { offset, length, .. } => Some(Mutation::Trim { offset, length }),
            _ => None,
        }
    }

    /// The bytes it changes, `[offset, end)`.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Mutation::Write { offset, length }
            | Mutation::Zero { offset, length }
            | Mutation::Trim { offset, length } => (offset, offset + length),
        }
    }
}

/// The bytes `command` changes, if it is a mutation.
pub fn mutated_range(command: &Command) -> Option<(u64, u64)> {
    Mutation::of(command).map(|m| m.range())
}

/// Called once for every command a backend ran, when its work is over
/// (successfully or not). The extent cache learns about the change here,
/// after the data is in place, so a BLOCK_STATUS sent after the reply can
/// never be answered from a stale entry.
///
/// Failed mutations count too: a write that failed half-way may still have
/// changed the file. This is on every mutation's path, so what it does is
/// lock-free and allocation-free (see `meta::extent_cache`).
pub fn complete(image: &Image, command: &Command, _succeeded: bool) {
    let (Some((offset, end)), Some(cache)) = (mutated_range(command), &image.extent_cache) else { return };
    cache.mutated(offset, end)
}
