//! The write path: every WRITE, WRITE_ZEROES and TRIM that reaches a
//! backend passes through [`complete`] when its backend work is over, on
//! every worker and for every backend. Anything that must observe mutations
//! (extent cache updates now, dirty tracking later) attaches here and
//! nowhere else.

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
    let (Some(mutation), Some(cache)) = (Mutation::of(command), &image.extent_cache) else { return };
    match mutation {
        Mutation::Write { offset, length } | Mutation::Zero { offset, length } | Mutation::Trim { offset, length } => {
            cache.mutated(offset, offset + length)
        }
    }
}
