//! The era of every granule of an image: the era in which it last changed.
//!
//! One u32 per granule (64 KiB by default), in a mapping that is either the
//! state file (`MAP_SHARED`, so an fdatasync of the file makes marks
//! durable) or anonymous memory (memory exports). A summary keeps the
//! highest era of each block of [`SUMMARY_GRANULES`] granules, so scans for
//! changes since a checkpoint skip unchanged blocks without touching them.
//!
//! Marking is the hot path. For a persistent map, an in-memory bit per
//! granule says "this granule's mark for the current era is durable": a
//! mutation whose granules all have it goes straight to its data write (one
//! load per granule). Otherwise the granule gets the current era (a store,
//! and a summary `fetch_max`, once per granule per era) and the mutation
//! waits for an fdatasync of the state file before its data is submitted;
//! the engine then sets the bits (`set_durable`). A granule another worker
//! marked but has not made durable yet lacks the bit too, so that worker's
//! mutations wait for a sync of their own: no mutation's data ever goes out
//! before the mark that covers it is on disk. Workers can only race to store
//! the same value, because eras advance only while every worker has its
//! mutations of the image frozen (see `track::Tracker`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::proto::extent::{Extent, push_capped};

use super::since::{SinceBitmap, SinceIndex};

/// Granules per summary entry (64 MiB at the default granularity).
pub const SUMMARY_GRANULES: usize = 1024;
/// `qemu:dirty-bitmap` status bit 0: changed since the checkpoint.
pub const STATE_DIRTY: u32 = 1;

pub struct EraMap {
    base: NonNull<AtomicU32>,
    /// Bytes mapped at `base` (a multiple of the page size).
    mapped_bytes: usize,
    granules: usize,
    granule_shift: u32,
    /// Bytes in the image; the last granule may be short.
    size_bytes: u64,
    summary: Box<[AtomicU32]>,
    /// Persistent maps: bit per granule, set once the granule's mark for
    /// the current era is durable. None for maps nothing is synced for.
    durable: Option<Box<[AtomicU64]>>,
    /// Per-checkpoint "changed since" bitmaps for fast dirty maps.
    since: SinceIndex,
}

// SAFETY: the mapping is only accessed through atomics, and it is unmapped
// only when the EraMap is dropped (when no other thread can reach it).
unsafe impl Send for EraMap {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for EraMap {}

fn page_round(bytes: usize) -> usize {
    bytes.div_ceil(4096).max(1) * 4096
}

impl EraMap {
    /// Bytes of era entries an image of `size_bytes` needs.
    pub fn bytes_for(size_bytes: u64, granule_shift: u32) -> usize {
        page_round(size_bytes.div_ceil(1 << granule_shift) as usize * 4)
    }

    /// Eras in anonymous memory, all zero.
    pub fn in_memory(size_bytes: u64, granule_shift: u32) -> io::Result<Self> {
        Self::map(None, 0, size_bytes, granule_shift)
    }

    /// Eras stored in `file` from byte `offset` (page-aligned; the file is
    /// already long enough). `writable`: marks go to the file (MAP_SHARED);
    /// else the file is only read (a private mapping nothing is written to).
    pub fn in_file(file: &File, offset: u64, size_bytes: u64, granule_shift: u32, writable: bool) -> io::Result<Self> {
        Self::map(Some((file, writable)), offset, size_bytes, granule_shift)
    }

    fn map(file: Option<(&File, bool)>, offset: u64, size_bytes: u64, granule_shift: u32) -> io::Result<Self> {
        assert!(offset.is_multiple_of(4096), "mappings start on a page");
        let granules = size_bytes.div_ceil(1 << granule_shift) as usize;
        let mapped_bytes = Self::bytes_for(size_bytes, granule_shift);
        let (flags, fd) = match file {
            Some((f, true)) => (libc::MAP_SHARED, f.as_raw_fd()),
            Some((f, false)) => (libc::MAP_PRIVATE, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping of `mapped_bytes`; for a file, its length
        // covers `offset + mapped_bytes` (the caller sized it).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<AtomicU32>()).expect("mmap never returns null on success");
        let summary = (0..granules.div_ceil(SUMMARY_GRANULES).max(1)).map(|_| AtomicU32::new(0)).collect();
        let durable =
            matches!(file, Some((_, true))).then(|| (0..granules.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
        let since = SinceIndex::default();
        let map = Self { base, mapped_bytes, granules, granule_shift, size_bytes, summary, durable, since };
        map.rebuild_summary();
        Ok(map)
    }

    /// An in-memory copy of the eras as they are now (a snapshot's view;
    /// the caller keeps marks from racing the copy).
    pub fn copy_in_memory(&self) -> io::Result<Self> {
        let copy = Self::in_memory(self.size_bytes, self.granule_shift)?;
        for (to, from) in copy.entries().iter().zip(self.entries()) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        copy.rebuild_summary();
        Ok(copy)
    }

    fn entries(&self) -> &[AtomicU32] {
        // SAFETY: the mapping holds `granules` u32s (and more), is 4-byte
        // aligned (page-aligned), and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.granules) }
    }

    fn rebuild_summary(&self) {
        for (block, chunk) in self.entries().chunks(SUMMARY_GRANULES).enumerate() {
            let max = chunk.iter().map(|e| e.load(Ordering::Relaxed)).max().unwrap_or(0);
            self.summary[block].store(max, Ordering::Relaxed);
        }
    }

    pub fn granule_bytes(&self) -> u64 {
        1 << self.granule_shift
    }

    /// The granules `[offset, end)` touches.
    fn granules_of(&self, offset: u64, end: u64) -> std::ops::Range<usize> {
        let first = (offset >> self.granule_shift) as usize;
        let last =
            (end.min(self.size_bytes).max(offset + 1).div_ceil(1 << self.granule_shift) as usize).min(self.granules);
        first.min(last)..last
    }

    /// Records that `[offset, end)` changes in `era` (the current one). True
    /// when some granule's mark is not durable yet: the mutation must wait
    /// for an fdatasync of the state file, then call [`Self::set_durable`].
    pub fn mark(&self, offset: u64, end: u64, era: u32) -> bool {
        let mut pending = false;
        let entries = self.entries();
        for granule in self.granules_of(offset, end) {
            if let Some(durable) = &self.durable {
                // Acquire: pairs with set_durable's release, after the sync.
                if durable[granule / 64].load(Ordering::Acquire) & (1 << (granule % 64)) != 0 {
                    continue;
                }
                pending = true;
            }
            let old = entries[granule].load(Ordering::Relaxed);
            if old != era {
                entries[granule].store(era, Ordering::Relaxed);
                self.summary[granule / SUMMARY_GRANULES].fetch_max(era, Ordering::Relaxed);
                self.since.marked(granule, old);
            }
        }
        pending
    }

    /// The marks of `[offset, end)` are on disk (an fdatasync that started
    /// after they were stored has completed).
    pub fn set_durable(&self, offset: u64, end: u64) {
        let Some(durable) = &self.durable else { return };
        for granule in self.granules_of(offset, end) {
            durable[granule / 64].fetch_or(1 << (granule % 64), Ordering::Release);
        }
    }

    /// A new era begins: no granule has its mark for it yet. Called while
    /// no mutation of the image is in flight.
    pub fn clear_durable(&self) {
        if let Some(durable) = &self.durable {
            durable.iter().for_each(|word| word.store(0, Ordering::Relaxed));
        }
    }

    /// The era in which the granule at `offset` last changed.
    pub fn era_at(&self, offset: u64) -> u32 {
        self.entries()[(offset >> self.granule_shift) as usize].load(Ordering::Relaxed)
    }

    /// Appends extents of `[offset, offset + length)` with status
    /// [`STATE_DIRTY`] where a granule changed after `since` (its era is
    /// higher), coalesced, at most `extents_max` of them. With `indexed`,
    /// from the checkpoint's bitmap (built on first use, see `since`);
    /// else by looking at the eras.
    pub fn dirty_extents(
        &self,
        offset: u64,
        length: u64,
        since: u32,
        extents_max: usize,
        out: &mut Vec<Extent>,
        indexed: bool,
    ) {
        if !indexed {
            let status = |era| if era > since { STATE_DIRTY } else { 0 };
            return self.extents(offset, length, extents_max, out, status, since);
        }
        let bitmap = match self.since.get(since) {
            Some(bitmap) => bitmap,
            None => self.since.get_or_build(since, self.granules, |bitmap| {
                for (granule, era) in self.entries().iter().enumerate() {
                    if era.load(Ordering::Relaxed) > since {
                        bitmap.set(granule);
                    }
                }
            }),
        };
        let end = (offset + length).min(self.size_bytes);
        let granules = self.granules_of(offset, end);
        let mut at = offset;
        let mut runs = bitmap.runs(granules.start, granules.end);
        let extent = |next: usize, dirty: bool, at: u64| {
            let stop = ((next as u64) << self.granule_shift).min(end);
            (Extent { length: stop - at, status: if dirty { STATE_DIRTY } else { 0 } }, stop)
        };
        // Only the first run can merge (with what `out` held) ...
        let Some((next, dirty)) = runs.next() else { return };
        let (first, stop) = extent(next, dirty, at);
        if !push_capped(out, first, extents_max) {
            return;
        }
        at = stop;
        // ... the rest alternate, so they are pushed without reading back
        // the extent just written (which held the loop up).
        for (next, dirty) in runs {
            if out.len() >= extents_max {
                return;
            }
            let (e, stop) = extent(next, dirty, at);
            out.push(e);
            at = stop;
        }
    }

    /// The "changed since" bitmap kept for checkpoint era `since`, if any.
    pub fn since_bitmap(&self, since: u32) -> Option<Arc<SinceBitmap>> {
        self.since.get(since)
    }

    /// Bytes in the image the eras cover.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn granule_shift(&self) -> u32 {
        self.granule_shift
    }

    /// A bitmap is kept for checkpoint era `since`.
    pub fn has_index(&self, since: u32) -> bool {
        self.since.get(since).is_some()
    }

    /// A checkpoint was deleted: its bitmap goes.
    pub fn forget_since(&self, since: u32) {
        self.since.forget(since);
    }

    /// Appends extents of `[offset, offset + length)` whose status is the
    /// era of their last change, coalesced, at most `extents_max`.
    pub fn era_extents(&self, offset: u64, length: u64, extents_max: usize, out: &mut Vec<Extent>) {
        self.extents(offset, length, extents_max, out, |era| era, u32::MAX);
    }

    /// Walks the granules of the range. `skip_at_or_below`: a summary block
    /// whose highest era is at most this maps to `status(0)` without
    /// looking at its granules (u32::MAX disables skipping).
    fn extents(
        &self,
        offset: u64,
        length: u64,
        extents_max: usize,
        out: &mut Vec<Extent>,
        status: impl Fn(u32) -> u32,
        skip_at_or_below: u32,
    ) {
        let end = (offset + length).min(self.size_bytes);
        let entries = self.entries();
        let mut at = offset;
        while at < end {
            let granule = (at >> self.granule_shift) as usize;
            let block = granule / SUMMARY_GRANULES;
            let (era, until) =
                if skip_at_or_below != u32::MAX && self.summary[block].load(Ordering::Relaxed) <= skip_at_or_below {
                    (0, ((block + 1) * SUMMARY_GRANULES) as u64 * self.granule_bytes())
                } else {
                    (entries[granule].load(Ordering::Relaxed), (granule as u64 + 1) * self.granule_bytes())
                };
            let stop = until.min(end);
            if !push_capped(out, Extent { length: stop - at, status: status(era) }, extents_max) {
                return;
            }
            at = stop;
        }
    }
}

impl Drop for EraMap {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this length; nothing refers to it now.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 65536;

    #[test]
    fn memory_marks_store_eras_and_never_wait() {
        let map = EraMap::in_memory(10 * G + 100, 16).unwrap();
        assert!(!map.mark(100, 200, 3), "nothing to make durable in memory");
        map.mark(G - 1, G + 1, 3);
        map.mark(10 * G + 50, 10 * G + 60, 4);
        assert_eq!((map.era_at(0), map.era_at(G), map.era_at(2 * G), map.era_at(10 * G)), (3, 3, 0, 4));
    }

    #[test]
    fn persistent_marks_wait_until_made_durable_in_each_era() {
        let path = std::env::temp_dir().join(format!("ringnbd-eras-durable-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(EraMap::bytes_for(10 * G, 16) as u64).unwrap();
        let map = EraMap::in_file(&file, 0, 10 * G, 16, true).unwrap();
        assert!(map.mark(100, 200, 3));
        assert!(map.mark(0, 10, 3), "marked by someone else but not durable: wait too");
        map.set_durable(0, 10);
        assert!(!map.mark(0, 4096, 3), "durable: straight to the data write");
        assert!(map.mark(G - 1, G + 1, 3), "the second granule is not durable");
        map.set_durable(G - 1, G + 1);
        assert!(!map.mark(0, 2 * G, 3));
        map.clear_durable();
        assert!(map.mark(0, 1, 4), "a new era needs new marks");
        assert_eq!(map.era_at(0), 4);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn dirty_and_era_extents_coalesce_and_respect_the_cap() {
        let map = EraMap::in_memory(8 * G, 16).unwrap();
        map.mark(G, 3 * G, 2);
        map.mark(5 * G, 5 * G + 1, 5);
        let mut out = vec![];
        let dirty = |length, status| Extent { length, status };
        for indexed in [false, true] {
            out.clear();
            map.dirty_extents(0, 8 * G, 1, 100, &mut out, indexed);
            assert_eq!(out, vec![dirty(G, 0), dirty(2 * G, 1), dirty(2 * G, 0), dirty(G, 1), dirty(2 * G, 0)]);
            out.clear();
            map.dirty_extents(0, 8 * G, 2, 100, &mut out, indexed);
            assert_eq!(out, vec![dirty(5 * G, 0), dirty(G, 1), dirty(2 * G, 0)], "only era 5 is after era 2");
            out.clear();
            map.dirty_extents(G / 2, 5 * G, 1, 2, &mut out, indexed);
            assert_eq!(out, vec![dirty(G / 2, 0), dirty(2 * G, 1)], "capped, from mid-granule");
        }
        // Bitmaps follow later marks.
        map.mark(7 * G, 7 * G + 1, 6);
        out.clear();
        map.dirty_extents(6 * G, 2 * G, 2, 100, &mut out, true);
        assert_eq!(out, vec![dirty(G, 0), dirty(G, 1)]);
        out.clear();
        map.era_extents(G / 2, 3 * G, 2, &mut out);
        assert_eq!(out, vec![dirty(G / 2, 0), dirty(2 * G, 2)], "capped, starting mid-granule");
    }

    #[test]
    fn clean_summary_blocks_are_skipped_whole() {
        let size = 3 * SUMMARY_GRANULES as u64 * G;
        let map = EraMap::in_memory(size, 16).unwrap();
        map.mark(SUMMARY_GRANULES as u64 * G + 7, SUMMARY_GRANULES as u64 * G + 8, 9);
        let mut out = vec![];
        map.dirty_extents(0, size, 0, 100, &mut out, false);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], Extent { length: SUMMARY_GRANULES as u64 * G, status: 0 });
        assert_eq!(out[1], Extent { length: G, status: STATE_DIRTY });
    }

    #[test]
    fn file_backed_eras_survive_a_remap() {
        let path = std::env::temp_dir().join(format!("ringnbd-eras-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(4096 + EraMap::bytes_for(100 * G, 16) as u64).unwrap();
        let map = EraMap::in_file(&file, 4096, 100 * G, 16, true).unwrap();
        map.mark(50 * G, 51 * G, 7);
        drop(map);
        let again = EraMap::in_file(&file, 4096, 100 * G, 16, false).unwrap();
        assert_eq!(again.era_at(50 * G), 7);
        let mut out = vec![];
        again.dirty_extents(0, 100 * G, 6, 10, &mut out, true);
        assert_eq!(out[1], Extent { length: G, status: STATE_DIRTY }, "summary rebuilt from the file");
        std::fs::remove_file(path).unwrap();
    }
}
