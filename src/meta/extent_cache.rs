//! The per-file extent cache shared by every worker, connection and export
//! of one file.
//!
//! A map of non-overlapping known ranges (start -> end, status), filled by
//! the lookup helpers' scans and read by BLOCK_STATUS. The I/O path never
//! touches the map: a completed mutation (write, zero, trim) only bumps the
//! generation counter of the regions it touched, with one atomic add and no
//! lock or allocation. Coherence comes from comparing generations:
//!
//! - a scan notes each region's generation before it starts
//!   ([`ExtentCache::begin_scan`]); its result is cached only for regions
//!   whose generation has not moved by the time it is inserted, so a scan
//!   that raced a mutation never leaves a stale entry behind;
//! - each region remembers the generation its entries were scanned at, and
//!   a lookup stops at the first region whose generation has moved since:
//!   that part is rescanned, so a BLOCK_STATUS sent after a mutation's reply,
//!   on any connection and any worker, never sees the range as it was.
//!
//! Regions are at least 1 MiB (and at most 65,536 per file), so a mutation
//! costs the rescan of its region on the next lookup there, not of the file.
//!
//! Changes made to the file by other processes are not seen; run with
//! `--extent-cache=off` when the export is shared (doc/contexts.md).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::proto::extent::{Extent, covered, push_capped};

/// Smallest region, and the most regions one file gets.
const REGION_BYTES_MIN: u64 = 1 << 20;
const REGIONS_MAX: u64 = 1 << 16;
/// `cached_at` of a region with nothing cached.
const NOTHING: u64 = u64::MAX;

pub struct ExtentCache {
    /// start -> (end, status); ranges never overlap and neighbours with the
    /// same status are merged. Written only by lookup helpers.
    map: RwLock<BTreeMap<u64, (u64, u32)>>,
    /// Mirrors `map.len()` (for tests and capacity).
    entries: AtomicUsize,
    entries_max: usize,
    region_shift: u32,
    /// Per region: bumped by every completed mutation once the region is
    /// `watched`.
    generations: Box<[AtomicU64]>,
    /// Per region: a scan has begun there, so mutations must bump it.
    watched: Box<[AtomicBool]>,
    /// Per region: the generation its cached entries were scanned at, or
    /// NOTHING. Written under the map's write lock.
    cached_at: Box<[AtomicU64]>,
}

/// The generations of the regions a scan covers, taken before it started.
pub struct ScanStamp {
    first_region: usize,
    generations: Vec<u64>,
}

impl ScanStamp {
    fn generation(&self, region: usize) -> Option<u64> {
        region.checked_sub(self.first_region).and_then(|i| self.generations.get(i).copied())
    }
}

impl ExtentCache {
    /// A cache of at most `entries_max` extents for a file of `size_bytes`.
    pub fn new(entries_max: usize, size_bytes: u64) -> Self {
        let region_bytes = size_bytes.div_ceil(REGIONS_MAX).next_power_of_two().max(REGION_BYTES_MIN);
        let regions = size_bytes.div_ceil(region_bytes).max(1) as usize;
        Self {
            map: RwLock::new(BTreeMap::new()),
            entries: AtomicUsize::new(0),
            entries_max,
            region_shift: region_bytes.trailing_zeros(),
            generations: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            watched: (0..regions).map(|_| AtomicBool::new(false)).collect(),
            cached_at: (0..regions).map(|_| AtomicU64::new(NOTHING)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// The capacity it was made with.
    pub fn entries_max(&self) -> usize {
        self.entries_max
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn region(&self, offset: u64) -> usize {
        ((offset >> self.region_shift) as usize).min(self.generations.len() - 1)
    }

    fn region_start(&self, region: usize) -> u64 {
        (region as u64) << self.region_shift
    }

    /// The regions `[offset, end)` touches (end > offset).
    fn regions(&self, offset: u64, end: u64) -> std::ops::RangeInclusive<usize> {
        self.region(offset)..=self.region(end - 1)
    }

    /// A mutation of `[offset, end)` completed (its data is in place). The
    /// hot path: one load per region, and an add where a scan ever looked.
    pub fn mutated(&self, offset: u64, end: u64) {
        if offset >= end {
            return;
        }
        for region in self.regions(offset, end) {
            // SeqCst pairs with begin_scan's store: either this load sees the
            // region watched and bumps, or the scan starts after this
            // mutation's data landed and sees it.
            if self.watched[region].load(Ordering::SeqCst) {
                self.generations[region].fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Called before scanning `[from, end)`: what `insert` checks against.
    pub fn begin_scan(&self, from: u64, end: u64) -> ScanStamp {
        let regions = self.regions(from, end.max(from + 1));
        let first_region = *regions.start();
        let generations = regions
            .map(|r| {
                if !self.watched[r].load(Ordering::SeqCst) {
                    self.watched[r].store(true, Ordering::SeqCst);
                }
                self.generations[r].load(Ordering::SeqCst)
            })
            .collect();
        ScanStamp { first_region, generations }
    }

    /// Whether the entries cached in `region` still describe it.
    fn valid(&self, region: usize) -> bool {
        let at = self.cached_at[region].load(Ordering::Acquire);
        at != NOTHING && at == self.generations[region].load(Ordering::SeqCst)
    }

    /// Appends cached extents covering `[offset, end)` from `offset` on,
    /// stopping at the first gap, at a region changed since it was cached,
    /// or after `extents_max` extents. Returns the offset up to which `out`
    /// now describes the range.
    pub fn lookup(&self, offset: u64, end: u64, extents_max: usize, out: &mut Vec<Extent>) -> u64 {
        if self.is_empty() || offset >= end {
            return offset;
        }
        let map = self.map.read().expect("extent cache lock");
        let first = map.range(..=offset).next_back().filter(|(_, (e, _))| *e > offset).map(|(s, _)| *s);
        let mut at = offset;
        let mut checked_through = None; // last region known valid
        for (&start, &(stop, status)) in map.range(first.unwrap_or(offset)..) {
            if start > at || at >= end {
                break;
            }
            let mut piece_end = stop.min(end);
            for region in self.regions(at, piece_end) {
                if checked_through.is_some_and(|c| region <= c) {
                    continue;
                }
                if !self.valid(region) {
                    piece_end = self.region_start(region).max(at);
                    break;
                }
                checked_through = Some(region);
            }
            if piece_end <= at || !push_capped(out, Extent { length: piece_end - at, status }, extents_max) {
                break;
            }
            at = piece_end;
            if piece_end < stop.min(end) {
                break; // stopped at a changed region
            }
        }
        at
    }

    /// Caches a scan of `[from, from + covered(extents))` stamped by
    /// `begin_scan`; regions that changed since are left out.
    pub fn insert(&self, from: u64, extents: &[Extent], stamp: &ScanStamp) {
        let to = from + covered(extents);
        if to <= from {
            return;
        }
        let mut map = self.map.write().expect("extent cache lock");
        // Keep the prefix of whole regions the scan can still vouch for.
        let mut keep_to = to;
        for region in self.regions(from, to) {
            let moved = stamp.generation(region) != Some(self.generations[region].load(Ordering::SeqCst));
            if moved {
                keep_to = self.region_start(region).max(from);
                break;
            }
        }
        if keep_to <= from {
            return;
        }
        if map.len() + extents.len() > self.entries_max {
            // Bounded memory: start over rather than grow.
            map.clear();
            self.cached_at.iter().for_each(|c| c.store(NOTHING, Ordering::Release));
        }
        for region in self.regions(from, keep_to) {
            let generation = stamp.generation(region).expect("stamped");
            if self.cached_at[region].load(Ordering::Acquire) != generation {
                // Older entries of this region predate a mutation: drop them.
                let start = self.region_start(region);
                cut(&mut map, start, start + (1 << self.region_shift));
            }
        }
        cut(&mut map, from, keep_to);
        append(&mut map, from, keep_to, extents);
        for region in self.regions(from, keep_to) {
            self.cached_at[region].store(stamp.generation(region).expect("stamped"), Ordering::Release);
        }
        self.entries.store(map.len(), Ordering::Relaxed);
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

/// Inserts `extents` from `offset`, clipped at `end`, into a range already
/// cut free, in key order, merging equal neighbours.
fn append(map: &mut BTreeMap<u64, (u64, u32)>, offset: u64, end: u64, extents: &[Extent]) {
    // (start, end, status) not yet inserted; starts as the left neighbour
    // when it touches `offset`, so an equal status extends it.
    let mut run = map.range(..offset).next_back().filter(|(_, (e, _))| *e == offset).map(|(&s, &(e, st))| (s, e, st));
    let mut at = offset;
    for extent in extents {
        if at >= end {
            break;
        }
        let stop = (at + extent.length).min(end);
        match &mut run {
            Some((_, run_end, status)) if *run_end == at && *status == extent.status => *run_end = stop,
            _ => {
                if let Some((start, run_end, status)) = run {
                    map.insert(start, (run_end, status));
                }
                run = Some((at, stop, extent.status));
            }
        }
        at = stop;
    }
    if let Some((start, mut run_end, status)) = run {
        if let Some(&(next_end, next_status)) = map.get(&run_end)
            && next_status == status
        {
            map.remove(&run_end);
            run_end = next_end;
        }
        map.insert(start, (run_end, status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::extent::{DATA, HOLE, ZERO};

    const MIB: u64 = 1 << 20;

    fn ext(length: u64, status: u32) -> Extent {
        Extent { length, status }
    }

    fn all(cache: &ExtentCache, offset: u64, end: u64) -> (Vec<Extent>, u64) {
        let mut out = vec![];
        let at = cache.lookup(offset, end, usize::MAX, &mut out);
        (out, at)
    }

    fn scan_insert(cache: &ExtentCache, from: u64, extents: &[Extent]) {
        let stamp = cache.begin_scan(from, from + covered(extents));
        cache.insert(from, extents, &stamp);
    }

    #[test]
    fn lookups_return_the_cached_prefix_and_stop_at_gaps() {
        let c = ExtentCache::new(1000, 64 * MIB);
        scan_insert(&c, 100, &[ext(100, DATA), ext(100, HOLE)]);
        assert_eq!(all(&c, 150, 1000), (vec![ext(50, DATA), ext(100, HOLE)], 300));
        assert_eq!(all(&c, 0, 1000), (vec![], 0), "gap at the start");
        assert_eq!(all(&c, 250, 260), (vec![ext(10, HOLE)], 260), "clipped to the request");
        scan_insert(&c, 300, &[ext(50, HOLE)]);
        assert_eq!(all(&c, 200, 400), (vec![ext(150, HOLE)], 350), "coalesced across inserts");
    }

    #[test]
    fn a_mutation_invalidates_only_its_regions() {
        let c = ExtentCache::new(1000, 64 * MIB);
        scan_insert(&c, 0, &[ext(8 * MIB, HOLE)]);
        c.mutated(3 * MIB + 100, 3 * MIB + 200);
        assert_eq!(all(&c, 0, 8 * MIB), (vec![ext(3 * MIB, HOLE)], 3 * MIB), "stops at the changed region");
        assert_eq!(all(&c, 4 * MIB, 8 * MIB), (vec![ext(4 * MIB, HOLE)], 8 * MIB), "later regions still valid");
        assert_eq!(all(&c, 3 * MIB + 5, 8 * MIB).1, 3 * MIB + 5, "nothing from inside the changed region");
        // A rescan of the region restores it.
        scan_insert(&c, 3 * MIB, &[ext(MIB / 2, HOLE), ext(MIB / 2, DATA)]);
        assert_eq!(
            all(&c, 0, 8 * MIB),
            (vec![ext(3 * MIB + MIB / 2, HOLE), ext(MIB / 2, DATA), ext(4 * MIB, HOLE)], 8 * MIB)
        );
    }

    #[test]
    fn a_scan_that_raced_a_mutation_is_not_cached() {
        let c = ExtentCache::new(1000, 64 * MIB);
        let stamp = c.begin_scan(0, 4 * MIB);
        c.mutated(2 * MIB, 2 * MIB + 10); // completes while the scan is running
        c.insert(0, &[ext(4 * MIB, HOLE)], &stamp);
        assert_eq!(all(&c, 0, 4 * MIB), (vec![ext(2 * MIB, HOLE)], 2 * MIB), "only the untouched prefix");
    }

    #[test]
    fn stale_older_entries_of_a_rescanned_region_are_dropped() {
        let c = ExtentCache::new(1000, 64 * MIB);
        scan_insert(&c, 0, &[ext(MIB, HOLE)]);
        c.mutated(100, 200);
        // A capped rescan covers only part of the region; the older entries
        // of the region must not come back as valid with it.
        scan_insert(&c, 0, &[ext(50, HOLE)]);
        assert_eq!(all(&c, 0, MIB), (vec![ext(50, HOLE)], 50));
    }

    #[test]
    fn unwatched_regions_cost_no_generation_bump() {
        let c = ExtentCache::new(1000, 64 * MIB);
        c.mutated(0, 10);
        assert_eq!(c.generations[0].load(Ordering::SeqCst), 0);
        c.begin_scan(0, 10);
        c.mutated(0, 10);
        assert_eq!(c.generations[0].load(Ordering::SeqCst), 1);
    }

    #[test]
    fn descriptor_cap_is_respected_and_capacity_is_bounded() {
        let c = ExtentCache::new(4, 64 * MIB);
        scan_insert(&c, 0, &[ext(1, DATA), ext(1, HOLE), ext(1, DATA)]);
        let mut out = vec![];
        assert_eq!(c.lookup(0, 3, 2, &mut out), 2);
        assert_eq!(out.len(), 2);
        scan_insert(&c, 3, &[ext(1, HOLE), ext(1, ZERO)]);
        assert!(c.len() <= 4, "over capacity clears before inserting");
    }

    #[test]
    fn big_files_get_bigger_regions() {
        let c = ExtentCache::new(10, 1 << 50);
        assert_eq!(c.generations.len(), REGIONS_MAX as usize);
        assert_eq!(1u64 << c.region_shift, (1 << 50) / REGIONS_MAX);
        let small = ExtentCache::new(10, 100);
        assert_eq!((small.generations.len(), 1u64 << small.region_shift), (1, MIB));
    }

    #[test]
    fn cut_splits_an_entry_that_spans_the_range() {
        let mut map = BTreeMap::new();
        map.insert(0, (100, HOLE));
        cut(&mut map, 40, 60);
        assert_eq!(map.into_iter().collect::<Vec<_>>(), vec![(0, (40, HOLE)), (60, (100, HOLE))]);
    }
}
