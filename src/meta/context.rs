//! The seam between the engine and whatever answers BLOCK_STATUS.
//!
//! Every metadata context an export offers is a name (negotiated by
//! `proto::meta`) plus a [`ContextSource`] that answers for it. The engine
//! knows nothing else about contexts: for each context a request selects it
//! asks the source to [`gather`](ContextSource::gather) the extents without
//! blocking, and when a source needs a blocking scan (a file's allocation
//! that is not cached) it runs [`scan`](ContextSource::scan) on the worker's
//! helper thread. A source may instead [`encode`](ContextSource::encode)
//! its descriptors straight into the reply. Adding a context (allocation
//! depth of layers, a snapshot's changes) means writing a source and
//! listing it in `export::catalog`.

use std::sync::Arc;

use crate::proto::extent::Extent;
use crate::proto::reply::Encoded;
use crate::proto::transmission::ReplyMode;

/// One BLOCK_STATUS question, as every context of a request sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub offset: u64,
    pub length: u64,
    /// Descriptors the chunk may hold: 1 for REQ_ONE, else the server's cap.
    pub extents_max: usize,
}

impl Query {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// What [`ContextSource::gather`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gathered {
    /// `out` holds the answer.
    Ready,
    /// `out` holds the answer for `[offset, from)`; the rest needs
    /// [`ContextSource::scan`] on a helper thread.
    Scan { from: u64 },
}

/// Answers BLOCK_STATUS for one context. Extents cover consecutive ranges
/// from the query's offset, are non-empty, coalesced (neighbours differ),
/// at most `extents_max` of them, and end at or before the query's end.
pub trait ContextSource: Send + Sync {
    /// The most descriptors an answer for `length` bytes can take (the
    /// engine sizes the reply buffer with it before asking).
    fn extents_bound(&self, length: u64, extents_max: usize) -> usize;

    /// Appends the answer to `out` (empty on entry) without blocking, or
    /// its beginning and where a blocking scan must go on.
    fn gather(&self, query: &Query, out: &mut Vec<Extent>) -> Gathered;

    /// Finishes an answer `gather` left at `from` (`out` holds what it
    /// gathered). Runs on a helper thread and may block; fails with an errno.
    /// Sources that never ask for a scan keep this default.
    fn scan(&self, query: &Query, from: u64, out: &mut Vec<Extent>) -> Result<(), i32> {
        let _ = (query, from, out);
        Err(libc::EINVAL)
    }

    /// Writes the answer straight into `out` as descriptors of `mode`,
    /// skipping the extent list, when the source can (without blocking);
    /// None sends the engine to [`Self::gather`]. A source whose records
    /// are already run-shaped (bitmaps) answers large maps at a fraction of
    /// the cost this way. `out` holds [`Self::extents_bound`] descriptors.
    fn encode(&self, query: &Query, mode: ReplyMode, out: &mut [u8]) -> Option<Encoded> {
        let _ = (query, mode, out);
        None
    }

    /// After an answer that stopped short of `end` at `from` (the client
    /// will ask for the rest): work ahead on the helper thread while
    /// `keep_going` says nobody waits for it.
    fn prefetch(&self, from: u64, end: u64, keep_going: &dyn Fn() -> bool) {
        let _ = (from, end, keep_going);
    }
}

/// A context one connection selected: the ID the client knows it by and
/// its source.
#[derive(Clone)]
pub struct SelectedContext {
    pub id: u32,
    pub source: Arc<dyn ContextSource>,
}

/// The extents bound for sources whose answers change at most every
/// `granule` bytes: one per granule, plus the partial granules at both ends.
pub fn granular_bound(length: u64, granule: u64, extents_max: usize) -> usize {
    (length / granule.max(1) + 2).min(extents_max as u64) as usize
}
