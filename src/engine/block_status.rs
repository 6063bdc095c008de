//! BLOCK_STATUS answers, encoded straight into the request's buffer: one
//! chunk per selected context, the last one flagged DONE.
//!
//! Memory exports answer from their page map. File exports report the whole
//! range as data (status 0, which the spec calls always safe) until the
//! allocation-lookup helper lands; see doc/contexts.md.

use crate::backend::Backend;
use crate::backend::memory::{MemoryExtent, PAGE_BYTES};
use crate::proto::meta::ContextKind;
use crate::proto::reply::{self, ReplyTo};
use crate::proto::transmission::ReplyMode;
use crate::proto::wire::{STATE_HOLE, STATE_ZERO};

/// Descriptors per context in one reply. The spec suggests at most 2^20;
/// qemu stops at 128 Ki. This keeps one reply within a 1 MiB buffer.
pub const DESCRIPTORS_MAX: usize = 64 * 1024;
/// Room for one chunk header with its context ID and count.
const CHUNK_HEADER_BYTES_MAX: usize = 40;

/// Buffer bytes that always hold the reply to `query`.
pub fn reply_bytes_max(backend: &Backend, query: &Query, mode: ReplyMode, contexts: usize) -> usize {
    let descriptors = match backend {
        _ if query.req_one => 1,
        // One descriptor per page at worst, plus the partial ends.
        Backend::Memory(_) => (query.length / PAGE_BYTES as u64 + 2).min(DESCRIPTORS_MAX as u64) as usize,
        Backend::File(_) => 1,
    };
    contexts * (CHUNK_HEADER_BYTES_MAX + descriptors * reply::descriptor_bytes(mode))
}

pub struct Query {
    pub offset: u64,
    pub length: u64,
    pub req_one: bool,
}

/// Encodes the reply into `out`; returns the bytes used.
pub fn encode(
    backend: &Backend,
    contexts: &[(u32, ContextKind)],
    query: &Query,
    to: ReplyTo,
    scratch: &mut Vec<MemoryExtent>,
    out: &mut [u8],
) -> usize {
    let mut used = 0;
    for (index, &(id, kind)) in contexts.iter().enumerate() {
        match kind {
            ContextKind::BaseAllocation => allocation_extents(backend, query, scratch),
        }
        let done = index + 1 == contexts.len();
        let count = scratch.len() as u32;
        used += reply::block_status(&mut out[used..], to, id, count, done);
        for extent in scratch.iter() {
            let status = if extent.allocated { 0 } else { STATE_HOLE | STATE_ZERO };
            used += reply::descriptor(&mut out[used..], to.mode, extent.length, status);
        }
    }
    used
}

fn allocation_extents(backend: &Backend, query: &Query, out: &mut Vec<MemoryExtent>) {
    // Compact descriptors hold 32-bit lengths; compact requests are 32-bit too.
    let cap = if query.req_one { 1 } else { DESCRIPTORS_MAX };
    match backend {
        Backend::Memory(memory) => memory.extents(query.offset, query.length, cap, out),
        Backend::File(_) => {
            out.clear();
            out.push(MemoryExtent { length: query.length, allocated: true });
        }
    }
    debug_assert!(!out.is_empty() && out.iter().all(|e| e.length > 0));
    debug_assert!(out.iter().map(|e| e.length).sum::<u64>() <= query.length);
}
