//! BLOCK_STATUS on the worker: gather `base:allocation` extents without
//! blocking, then encode one chunk per selected context straight into the
//! request's buffer, the last one flagged DONE.
//!
//! Memory exports answer from their page map and block devices as all data,
//! both inline. File exports answer from the extent cache when it covers the
//! request (or reaches the descriptor cap); otherwise the request parks and
//! its worker's lookup helper scans the rest (see `engine::lookup`).

use crate::backend::Backend;
use crate::meta::extent_cache::ExtentCache;
use crate::proto::extent::{DATA, Extent};
use crate::proto::meta::ContextKind;
use crate::proto::reply::{self, ReplyTo};
use crate::proto::transmission::ReplyMode;

/// Room for one chunk header with its context ID and count.
const CHUNK_HEADER_BYTES_MAX: usize = 40;

pub struct Query {
    pub offset: u64,
    pub length: u64,
    /// 1 for REQ_ONE, else the configured cap.
    pub extents_max: usize,
}

pub enum Gathered {
    /// `out` holds the answer.
    Ready,
    /// `out` holds the cached prefix `[offset, from)`; scan the rest.
    Scan { from: u64 },
}

pub fn gather(backend: &Backend, cache: Option<&ExtentCache>, query: &Query, out: &mut Vec<Extent>) -> Gathered {
    out.clear();
    let end = query.offset + query.length;
    match (backend, cache) {
        (Backend::Memory(memory), _) => memory.extents(query.offset, query.length, query.extents_max, out),
        (Backend::File(file), _) if file.is_block_device => out.push(Extent { length: query.length, status: DATA }),
        (Backend::File(_), None) => return Gathered::Scan { from: query.offset },
        (Backend::File(_), Some(cache)) => {
            let at = cache.lookup(query.offset, end, query.extents_max, out);
            if at < end && out.len() < query.extents_max {
                return Gathered::Scan { from: at };
            }
        }
    }
    Gathered::Ready
}

/// Descriptors a reply can need for a request of `length` bytes on `backend`.
pub fn extents_bound(backend: &Backend, length: u64, extents_max: usize) -> usize {
    let granule = match backend {
        Backend::Memory(_) => crate::backend::memory::PAGE_BYTES as u64,
        // Filesystem blocks are at least 512 bytes.
        Backend::File(_) => 512,
    };
    // The partial blocks at both ends may each add one.
    ((length / granule + 2).min(extents_max as u64)) as usize
}

/// Buffer bytes that always hold a reply of `contexts` chunks.
pub fn reply_bytes_max(mode: ReplyMode, contexts: usize, extents: usize) -> usize {
    contexts * (CHUNK_HEADER_BYTES_MAX + extents * reply::descriptor_bytes(mode))
}

/// Encodes one chunk per context selected in `mask` (bit i = `contexts[i]`).
/// Returns the bytes used.
pub fn encode(contexts: &[(u32, ContextKind)], mask: u32, allocation: &[Extent], to: ReplyTo, out: &mut [u8]) -> usize {
    debug_assert!(!allocation.is_empty() && allocation.iter().all(|e| e.length > 0));
    let last = (0..contexts.len()).rev().find(|i| mask & (1 << i) != 0).expect("at least one context selected");
    let mut used = 0;
    for (index, &(id, kind)) in contexts.iter().enumerate() {
        if mask & (1 << index) == 0 {
            continue;
        }
        let extents = match kind {
            ContextKind::BaseAllocation => allocation,
        };
        used += reply::block_status(&mut out[used..], to, id, extents.len() as u32, index == last);
        for extent in extents {
            used += reply::descriptor(&mut out[used..], to.mode, extent.length, extent.status);
        }
    }
    used
}

/// The mask selecting every context of the connection.
pub fn all_contexts(count: usize) -> u32 {
    if count >= 32 { u32::MAX } else { (1u32 << count) - 1 }
}
