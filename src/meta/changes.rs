//! Contexts answered from change tracking (`track`): what changed since a
//! checkpoint, and the era of every range's last change. Both read the era
//! map in memory, so they always answer inline.
//!
//! Names (see doc/contexts.md):
//! - `qemu:dirty-bitmap:NAME`: bit 0 (`NBD_STATE_DIRTY`) where a write,
//!   zero or trim completed, or may have, after checkpoint NAME.
//! - `ringnbd:checkpoint:ERA:NAME`: the same answer, under a name that
//!   tells a client which era the checkpoint cut.
//! - `ringnbd:era`: the whole status is the era in which the range last
//!   changed (0: not since tracking began), so one pass answers "changed
//!   since" for every checkpoint: since checkpoint C means era > C's era.

use std::sync::Arc;

use crate::proto::extent::Extent;
use crate::proto::reply::{Compact, Encoded, Wide};
use crate::proto::transmission::ReplyMode;
use crate::track::{Checkpoint, Tracker};

use super::context::{ContextSource, Gathered, Query, granular_bound};

pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
pub const CHECKPOINT_PREFIX: &str = "ringnbd:checkpoint:";
pub const ERA_NAME: &str = "ringnbd:era";

pub fn dirty_bitmap_name(checkpoint: &Checkpoint) -> String {
    format!("{DIRTY_BITMAP_PREFIX}{}", checkpoint.name)
}

pub fn checkpoint_name(checkpoint: &Checkpoint) -> String {
    format!("{CHECKPOINT_PREFIX}{}:{}", checkpoint.era, checkpoint.name)
}

/// Changed since the checkpoint that cut era `since`.
pub struct DirtySince {
    pub tracker: Arc<Tracker>,
    pub since: u32,
}

impl ContextSource for DirtySince {
    fn extents_bound(&self, length: u64, extents_max: usize) -> usize {
        granular_bound(length, self.tracker.granule_bytes(), extents_max)
    }

    fn gather(&self, query: &Query, out: &mut Vec<Extent>) -> Gathered {
        self.tracker.dirty_extents(query.offset, query.length, self.since, query.extents_max, out);
        Gathered::Ready
    }

    fn encode(&self, query: &Query, mode: ReplyMode, out: &mut [u8]) -> Option<Encoded> {
        let (offset, length, since, max) = (query.offset, query.length, self.since, query.extents_max);
        match mode {
            ReplyMode::Extended => self.tracker.encode_dirty::<Wide>(offset, length, since, max, out),
            _ => self.tracker.encode_dirty::<Compact>(offset, length, since, max, out),
        }
    }
}

/// The era of each range's last change.
pub struct Eras {
    pub tracker: Arc<Tracker>,
}

impl ContextSource for Eras {
    fn extents_bound(&self, length: u64, extents_max: usize) -> usize {
        granular_bound(length, self.tracker.granule_bytes(), extents_max)
    }

    fn gather(&self, query: &Query, out: &mut Vec<Extent>) -> Gathered {
        self.tracker.era_extents(query.offset, query.length, query.extents_max, out);
        Gathered::Ready
    }
}
