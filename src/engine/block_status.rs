//! BLOCK_STATUS on the worker: each selected context's source gathers its
//! extents without blocking (or hands a scan to the worker's lookup
//! helper), and each answer is encoded as its own chunk, sized by its own
//! descriptor count, straight into the request's buffer as it arrives. The
//! chunk written last is flagged DONE once every part is in.

use crate::meta::context::{Query, SelectedContext};
use crate::proto::extent::Extent;
use crate::proto::reply::{self, ReplyTo};
use crate::proto::transmission::ReplyMode;

/// Room for one chunk header with its context ID and count.
const CHUNK_HEADER_BYTES_MAX: usize = 40;

/// The selected contexts of `mask` (bit i = `contexts[i]`).
pub fn selected(contexts: &[SelectedContext], mask: u64) -> impl Iterator<Item = (usize, &SelectedContext)> {
    contexts.iter().enumerate().filter(move |(index, _)| mask & (1 << index) != 0)
}

/// Buffer bytes that always hold the reply: per selected context, a chunk
/// header and as many descriptors as its source can need for `length`.
pub fn reply_bytes_max(mode: ReplyMode, contexts: &[SelectedContext], mask: u64, length: u64, cap: usize) -> usize {
    selected(contexts, mask)
        .map(|(_, c)| CHUNK_HEADER_BYTES_MAX + c.source.extents_bound(length, cap) * reply::descriptor_bytes(mode))
        .sum()
}

/// Encodes one context's chunk (not yet DONE) at the start of `out`.
/// Returns the bytes used.
pub fn encode_chunk(out: &mut [u8], to: ReplyTo, id: u32, extents: &[Extent]) -> usize {
    debug_assert!(!extents.is_empty() && extents.iter().all(|e| e.length > 0));
    let used = reply::block_status(out, to, id, extents.len() as u32, false);
    used + reply::descriptors(&mut out[used..], to.mode, extents)
}

/// Encodes one context's chunk (not yet DONE) at the start of `out` with
/// the source's own encoder, if it has one for this query. Returns the
/// bytes used.
pub fn encode_direct(out: &mut [u8], to: ReplyTo, context: &SelectedContext, query: &Query) -> Option<usize> {
    // The header's size does not depend on the count: write it with none,
    // let the source fill in the descriptors after it, then write it again.
    let header = reply::block_status(out, to, context.id, 0, false);
    let encoded = context.source.encode(query, to.mode, &mut out[header..])?;
    debug_assert!(encoded.count > 0, "an answer holds at least one descriptor");
    reply::block_status(out, to, context.id, encoded.count, false);
    Some(header + encoded.bytes)
}

/// The mask selecting every context of the connection.
pub fn all_contexts(count: usize) -> u64 {
    if count >= 64 { u64::MAX } else { (1u64 << count) - 1 }
}

/// Where a BLOCK_STATUS reply stands while its parts come in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the buffer written so far.
    pub used: usize,
    /// Where the chunk written last starts (it gets the DONE flag).
    pub last_chunk: usize,
    /// Scans still out with the lookup helper.
    pub scans_pending: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_up_to_64_contexts() {
        assert_eq!(all_contexts(1), 1);
        assert_eq!(all_contexts(3), 0b111);
        assert_eq!(all_contexts(64), u64::MAX);
    }

    #[test]
    fn the_last_chunk_is_flagged_done_afterwards() {
        let to = ReplyTo { mode: ReplyMode::Structured, cookie: 7, offset: 0 };
        let mut out = [0u8; 128];
        let first = encode_chunk(&mut out, to, 1, &[Extent { length: 512, status: 3 }]);
        let second = encode_chunk(&mut out[first..], to, 2, &[Extent { length: 512, status: 0 }]);
        assert_eq!(out[4..6], [0, 0]);
        reply::set_done(&mut out[first..first + second]);
        assert_eq!(out[first + 4..first + 6], crate::proto::wire::REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(out[4..6], [0, 0], "only the last");
    }
}
