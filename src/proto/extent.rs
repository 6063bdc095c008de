//! The unit every allocation source produces: a run of bytes and its
//! `base:allocation` status.

use super::wire::{STATE_HOLE, STATE_ZERO};

/// Allocated, reads stored data.
pub const DATA: u32 = 0;
/// Allocated but reads as zeroes (e.g. an unwritten, fallocated extent).
pub const ZERO: u32 = STATE_ZERO;
/// Not allocated, reads as zeroes.
pub const HOLE: u32 = STATE_HOLE | STATE_ZERO;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub status: u32,
}

/// Appends `extent`, merging it into the last one when the status matches,
/// so lists never hold two neighbours with the same status.
pub fn push_coalesced(out: &mut Vec<Extent>, extent: Extent) {
    debug_assert!(extent.length > 0);
    match out.last_mut() {
        Some(last) if last.status == extent.status => last.length += extent.length,
        _ => out.push(extent),
    }
}

/// Like [`push_coalesced`], but refuses (returns false) when the extent
/// would need an entry beyond `extents_max`.
pub fn push_capped(out: &mut Vec<Extent>, extent: Extent, extents_max: usize) -> bool {
    let merges = out.last().is_some_and(|last| last.status == extent.status);
    if !merges && out.len() >= extents_max {
        return false;
    }
    push_coalesced(out, extent);
    true
}

/// Appends the consecutive extents of `run` under the cap: the bytes `run`
/// covers, or None once the cap stopped it part-way.
pub fn append_capped(out: &mut Vec<Extent>, run: Vec<Extent>, extents_max: usize) -> Option<u64> {
    let covered = covered(&run);
    for extent in run {
        if !push_capped(out, extent, extents_max) {
            return None;
        }
    }
    Some(covered)
}

/// Total bytes described.
pub fn covered(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.length).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_with_equal_status_merge() {
        let mut v = vec![];
        push_coalesced(&mut v, Extent { length: 4, status: DATA });
        push_coalesced(&mut v, Extent { length: 4, status: DATA });
        push_coalesced(&mut v, Extent { length: 8, status: HOLE });
        push_coalesced(&mut v, Extent { length: 2, status: ZERO });
        assert_eq!(
            v,
            vec![
                Extent { length: 8, status: DATA },
                Extent { length: 8, status: HOLE },
                Extent { length: 2, status: ZERO }
            ]
        );
        assert_eq!(covered(&v), 18);
    }
}
