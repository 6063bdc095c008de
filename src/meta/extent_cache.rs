//! The per-export extent cache shared by every worker and connection.
//!
//! A map of non-overlapping known ranges (start -> end, status). Lookups
//! return the cached prefix of a request; the uncached rest is scanned by a
//! lookup helper and inserted. Coherence with writes through the server:
//!
//! - every mutation *completion* (write, zero, trim) updates or clears the
//!   range and bumps `epoch` (a WRITE marks its range data; zero and trim
//!   clear it, since the filesystem decides what they become);
//! - a scan remembers the epoch it started at, and its result is cached only
//!   if no mutation completed meanwhile, so a scan racing a write can never
//!   leave stale "hole" entries behind. The scan's own answer may predate the
//!   write, which is fine: the client had not seen that write's reply when
//!   it asked.
//!
//! Changes made to the file by other processes are not seen; run with
//! `--extent-cache=off` when the export is shared (doc/contexts.md).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::proto::extent::{DATA, Extent, covered, push_capped};

pub struct ExtentCache {
    /// start -> (end, status); ranges never overlap and neighbours with the
    /// same status are merged.
    map: RwLock<BTreeMap<u64, (u64, u32)>>,
    /// Mirrors `map.len()` so mutations can skip the lock while nothing is
    /// cached. See `mutated` and `insert` for the ordering that makes this safe.
    entries: AtomicUsize,
    epoch: AtomicU64,
    entries_max: usize,
    /// Mutated ranges are widened to this (the filesystem block): a write
    /// of 100 bytes allocates the whole block, and descriptors stay aligned.
    granule: u64,
}

impl ExtentCache {
    pub fn new(entries_max: usize, granule: u64) -> Self {
        assert!(granule.is_power_of_two());
        Self {
            map: RwLock::new(BTreeMap::new()),
            entries: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            entries_max,
            granule,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.entries.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends cached extents covering `[offset, end)` from `offset` on,
    /// stopping at the first gap or after `extents_max` extents. Returns the
    /// offset up to which `out` now describes the range.
    pub fn lookup(&self, offset: u64, end: u64, extents_max: usize, out: &mut Vec<Extent>) -> u64 {
        if self.is_empty() {
            return offset;
        }
        let map = self.map.read().expect("extent cache lock");
        let mut at = offset;
        let first = map.range(..=offset).next_back().filter(|(_, (e, _))| *e > offset).map(|(s, _)| *s);
        let start_key = first.unwrap_or(offset);
        for (&start, &(stop, status)) in map.range(start_key..) {
            if start > at || at >= end {
                break;
            }
            let piece_end = stop.min(end);
            if !push_capped(out, Extent { length: piece_end - at, status }, extents_max) {
                break;
            }
            at = piece_end;
        }
        at
    }

    /// Caches a scan of `[offset, offset + covered(extents))` that began at
    /// `epoch`; dropped if a mutation completed since.
    pub fn insert(&self, offset: u64, extents: &[Extent], epoch: u64) {
        let mut map = self.map.write().expect("extent cache lock");
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        if map.len() + extents.len() > self.entries_max {
            map.clear(); // bounded memory: start over rather than grow
        }
        let at = offset + covered(extents);
        cut(&mut map, offset, at);
        append(&mut map, offset, extents);
        // Publish the entries, then look at the epoch once more. A mutation
        // bumps the epoch before it reads `entries` (see `mutated`), so
        // either it sees these entries and waits for this lock to cut its
        // range, or this check sees its bump and the insert is undone.
        self.entries.store(map.len(), Ordering::SeqCst);
        if self.epoch.load(Ordering::SeqCst) != epoch {
            cut(&mut map, offset, at);
            self.entries.store(map.len(), Ordering::SeqCst);
        }
    }

    /// A WRITE completed: its range now holds data.
    pub fn wrote(&self, offset: u64, end: u64) {
        self.mutated(offset, end, Some(DATA));
    }

    /// A zero or trim completed: what the range became is the filesystem's
    /// choice, so forget it.
    pub fn forget(&self, offset: u64, end: u64) {
        self.mutated(offset, end, None);
    }

    fn mutated(&self, offset: u64, end: u64, status: Option<u32>) {
        // Bump first, then look: pairs with the publish-then-check in `insert`.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.entries.load(Ordering::SeqCst) == 0 {
            return;
        }
        let (offset, end) = (offset / self.granule * self.granule, end.div_ceil(self.granule) * self.granule);
        let mut map = self.map.write().expect("extent cache lock");
        cut(&mut map, offset, end);
        if let Some(status) = status {
            put(&mut map, offset, end, status);
        }
        self.entries.store(map.len(), Ordering::SeqCst);
    }
}

/// Removes `[offset, end)` from the map, trimming entries that overlap it.
fn cut(map: &mut BTreeMap<u64, (u64, u32)>, offset: u64, end: u64) {
    if let Some((&start, &(stop, status))) = map.range(..offset).next_back()
        && stop > offset
    {
        map.insert(start, (offset, status));
        if stop > end {
            map.insert(end, (stop, status));
        }
    }
    let inside: Vec<u64> = map.range(offset..end).map(|(&s, _)| s).collect();
    for start in inside {
        let (stop, status) = map.remove(&start).expect("key from range");
        if stop > end {
            map.insert(end, (stop, status));
        }
    }
}

/// Inserts `extents` from `offset` into a range already cut free, in key
/// order, merging equal neighbours (one map insert per extent, instead of a
/// cut and two lookups each as in `put`).
fn append(map: &mut BTreeMap<u64, (u64, u32)>, offset: u64, extents: &[Extent]) {
    // (start, end, status) not yet inserted; starts as the left neighbour
    // when it touches `offset`, so an equal status extends it.
    let mut run = map.range(..offset).next_back().filter(|(_, (e, _))| *e == offset).map(|(&s, &(e, st))| (s, e, st));
    let mut at = offset;
    for extent in extents {
        match &mut run {
            Some((_, end, status)) if *end == at && *status == extent.status => *end += extent.length,
            _ => {
                if let Some((start, end, status)) = run {
                    map.insert(start, (end, status));
                }
                run = Some((at, at + extent.length, extent.status));
            }
        }
        at += extent.length;
    }
    if let Some((start, mut end, status)) = run {
        if let Some(&(next_end, next_status)) = map.get(&end)
            && next_status == status
        {
            map.remove(&end);
            end = next_end;
        }
        map.insert(start, (end, status));
    }
}

/// Sets `[offset, end)` to `status`, merging with equal neighbours.
fn put(map: &mut BTreeMap<u64, (u64, u32)>, offset: u64, end: u64, status: u32) {
    if offset >= end {
        return;
    }
    cut(map, offset, end);
    let (mut start, mut stop) = (offset, end);
    if let Some((&prev, &(prev_end, prev_status))) = map.range(..offset).next_back()
        && prev_end == offset
        && prev_status == status
    {
        map.remove(&prev);
        start = prev;
    }
    if let Some(&(next_end, next_status)) = map.get(&end)
        && next_status == status
    {
        map.remove(&end);
        stop = next_end;
    }
    map.insert(start, (stop, status));
}

#[cfg(test)]
mod tests {
    use crate::proto::extent::{HOLE, ZERO};
    use super::*;

    fn ext(length: u64, status: u32) -> Extent {
        Extent { length, status }
    }

    fn all(cache: &ExtentCache, offset: u64, end: u64) -> (Vec<Extent>, u64) {
        let mut out = vec![];
        let at = cache.lookup(offset, end, usize::MAX, &mut out);
        (out, at)
    }

    #[test]
    fn lookups_return_the_cached_prefix_and_stop_at_gaps() {
        let c = ExtentCache::new(1000, 1);
        c.insert(100, &[ext(100, DATA), ext(100, HOLE)], c.epoch());
        assert_eq!(all(&c, 150, 1000), (vec![ext(50, DATA), ext(100, HOLE)], 300));
        assert_eq!(all(&c, 0, 1000), (vec![], 0), "gap at the start");
        assert_eq!(all(&c, 250, 260), (vec![ext(10, HOLE)], 260), "clipped to the request");
        c.insert(300, &[ext(50, HOLE)], c.epoch());
        assert_eq!(all(&c, 200, 400), (vec![ext(150, HOLE)], 350), "coalesced across inserts");
    }

    #[test]
    fn writes_mark_data_and_zeroes_forget() {
        let c = ExtentCache::new(1000, 1);
        c.insert(0, &[ext(1000, HOLE)], c.epoch());
        c.wrote(100, 200);
        assert_eq!(all(&c, 0, 1000), (vec![ext(100, HOLE), ext(100, DATA), ext(800, HOLE)], 1000));
        c.forget(150, 300);
        assert_eq!(all(&c, 0, 1000), (vec![ext(100, HOLE), ext(50, DATA)], 150));
        assert_eq!(all(&c, 300, 1000), (vec![ext(700, HOLE)], 1000));
        c.wrote(150, 300);
        assert_eq!(all(&c, 0, 1000), (vec![ext(100, HOLE), ext(200, DATA), ext(700, HOLE)], 1000));
    }

    #[test]
    fn a_scan_that_raced_a_mutation_is_not_cached() {
        let c = ExtentCache::new(1000, 1);
        let epoch = c.epoch();
        c.wrote(0, 10); // completes while the scan is running
        c.insert(0, &[ext(100, HOLE)], epoch);
        assert_eq!(all(&c, 0, 100).1, 0, "stale scan dropped");
    }

    #[test]
    fn descriptor_cap_is_respected_and_capacity_is_bounded() {
        let c = ExtentCache::new(4, 1);
        c.insert(0, &[ext(1, DATA), ext(1, HOLE), ext(1, DATA)], c.epoch());
        let mut out = vec![];
        assert_eq!(c.lookup(0, 3, 2, &mut out), 2);
        assert_eq!(out.len(), 2);
        c.insert(3, &[ext(1, HOLE), ext(1, ZERO)], c.epoch());
        assert!(c.len() <= 4, "over capacity clears before inserting");
    }

    #[test]
    fn mutations_widen_to_the_granule() {
        let c = ExtentCache::new(100, 4096);
        c.insert(0, &[ext(3 * 4096, HOLE)], c.epoch());
        c.wrote(5000, 5100);
        assert_eq!(all(&c, 0, 3 * 4096), (vec![ext(4096, HOLE), ext(4096, DATA), ext(4096, HOLE)], 3 * 4096));
    }

    #[test]
    fn an_insert_racing_a_lock_free_mutation_undoes_itself() {
        // The interleaving the publish-then-check guards against: the scan's
        // epoch matches when the insert starts, a mutation then bumps the
        // epoch while the cache still looks empty, and the insert completes.
        let c = ExtentCache::new(100, 1);
        let epoch = c.epoch();
        let map = c.map.write().unwrap();
        c.epoch.fetch_add(1, Ordering::SeqCst); // mutated()'s bump, entries still 0
        drop(map);
        c.insert(0, &[ext(100, HOLE)], epoch);
        assert_eq!(all(&c, 0, 100).1, 0, "dropped: epoch already moved");
        // And when the bump lands after the epoch check but before publication,
        // the final re-check removes the entries.
        let c = ExtentCache::new(100, 1);
        let epoch = c.epoch();
        std::thread::scope(|s| {
            let guard = c.map.write().unwrap();
            let writer = s.spawn(|| c.wrote(10, 20));
            // The writer either bumps and returns (cache empty) or blocks on
            // the lock; give it time to do the former.
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(guard);
            writer.join().unwrap();
        });
        c.insert(0, &[ext(100, HOLE)], epoch);
        assert_eq!(all(&c, 0, 100).1, 0);
    }

    #[test]
    fn cut_splits_an_entry_that_spans_the_range() {
        let c = ExtentCache::new(100, 1);
        c.insert(0, &[ext(100, HOLE)], c.epoch());
        c.forget(40, 60);
        assert_eq!(all(&c, 0, 100), (vec![ext(40, HOLE)], 40));
        assert_eq!(all(&c, 60, 100), (vec![ext(40, HOLE)], 100));
        assert_eq!(c.len(), 2);
    }
}
