//! `base:allocation` as a [`ContextSource`]: memory exports answer from
//! their page map and block devices as all data, both inline; files answer
//! from the extent cache when it covers the request (or reaches the
//! descriptor cap), else the rest is scanned on the worker's helper thread
//! (SEEK_DATA/SEEK_HOLE and FIEMAP, see `allocation`), and the result is
//! cached. When an answer is capped short, the helper scans ahead into the
//! cache while the client reads the reply.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::backend::Backend;
use crate::backend::file::FileBackend;
use crate::export::Image;
use crate::proto::extent::{DATA, Extent, covered, push_capped};

use super::allocation::{Strategy, scan_file};
use super::context::{ContextSource, Gathered, Query, granular_bound};

pub const NAME: &str = "base:allocation";

/// Extents scanned ahead per slice, and in all after one answer.
const PREFETCH_SLICE_EXTENTS: usize = 1024;
const PREFETCH_EXTENTS_MAX: usize = 1 << 16;
/// Bytes one prefetch slice may cover (bounds the regions it stamps).
const PREFETCH_SLICE_BYTES: u64 = 1 << 30;
/// Scan descriptors kept open per image (one per helper scanning at once).
const SCAN_FILES_KEPT_MAX: usize = 64;

/// Read-only descriptors for scanning a file, opened as helpers need them
/// and kept: each scan has one to itself, so no file position or FIEMAP
/// strategy is shared between helper threads.
pub struct Scanner {
    idle: Mutex<Vec<(File, Strategy)>>,
}

impl Scanner {
    pub fn new() -> Self {
        Self { idle: Mutex::new(Vec::new()) }
    }

    fn with_file<T>(&self, file: &FileBackend, scan: impl FnOnce(&File, &mut Strategy) -> T) -> Result<T, i32> {
        let taken = self.idle.lock().expect("scanner lock").pop();
        let (opened, mut strategy) = match taken {
            Some(pair) => pair,
            None => {
                let opened = File::open(&file.path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                let strategy = Strategy::for_file(opened.as_raw_fd());
                (opened, strategy)
            }
        };
        let result = scan(&opened, &mut strategy);
        let mut idle = self.idle.lock().expect("scanner lock");
        if idle.len() < SCAN_FILES_KEPT_MAX {
            idle.push((opened, strategy));
        }
        Ok(result)
    }
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

/// `base:allocation` of one image.
pub struct Allocation {
    pub image: Arc<Image>,
}

impl Allocation {
    fn file(&self) -> &FileBackend {
        match &self.image.backend {
            Backend::File(file) => file,
            Backend::Memory(_) | Backend::Snapshot(_) | Backend::Layered(_) => unreachable!("scanned separately"),
        }
    }
}

impl ContextSource for Allocation {
    fn extents_bound(&self, length: u64, extents_max: usize) -> usize {
        let granule = match &self.image.backend {
            Backend::Memory(_) => crate::backend::memory::PAGE_BYTES as u64,
            // Filesystem blocks are at least 512 bytes.
            Backend::File(_) | Backend::Snapshot(_) | Backend::Layered(_) => 512,
        };
        granular_bound(length, granule, extents_max)
    }

    fn gather(&self, query: &Query, out: &mut Vec<Extent>) -> Gathered {
        let image = &self.image;
        match (&image.backend, &image.extent_cache) {
            (Backend::Memory(memory), _) => memory.extents(query.offset, query.length, query.extents_max, out),
            (Backend::File(file), _) if file.is_block_device => out.push(Extent { length: query.length, status: DATA }),
            (Backend::Snapshot(_) | Backend::Layered(_), _) => return Gathered::Scan { from: query.offset },
            (Backend::File(_), None) => return Gathered::Scan { from: query.offset },
            (Backend::File(_), Some(cache)) => {
                let at = cache.lookup(query.offset, query.end(), query.extents_max, out);
                if at < query.end() && out.len() < query.extents_max {
                    return Gathered::Scan { from: at };
                }
            }
        }
        Gathered::Ready
    }

    fn scan(&self, query: &Query, from: u64, out: &mut Vec<Extent>) -> Result<(), i32> {
        if let Backend::Snapshot(snapshot) = &self.image.backend {
            let scanned = snapshot.scan(from, query.end(), query.extents_max, out);
            return scanned.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
        }
        if let Backend::Layered(layers) = &self.image.backend {
            let scanned = layers.scan(from, query.end(), query.extents_max, out);
            return scanned.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
        }
        let file = self.file();
        let end = query.end();
        if file.is_block_device {
            // A block device has no holes to report unless it says so itself.
            push_capped(out, Extent { length: end - from, status: DATA }, query.extents_max);
            return Ok(());
        }
        let cache = self.image.extent_cache.as_ref();
        let stamp = cache.map(|c| c.begin_scan(from, end));
        let prefix = out.len();
        self.image.scanner.with_file(file, |f, strategy| {
            scan_file(f.as_raw_fd(), from, end, query.extents_max, strategy, out)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        })??;
        if let (Some(cache), Some(stamp)) = (cache, stamp) {
            let scanned = scanned_part(out, prefix, from - query.offset);
            cache.insert(from, &scanned, &stamp);
        }
        Ok(())
    }

    /// Scans `[from, end)` into the cache in small slices, and only while no
    /// real lookup is waiting, so prefetching never delays an answer by more
    /// than one slice.
    fn prefetch(&self, mut from: u64, end: u64, keep_going: &dyn Fn() -> bool) {
        let Some(cache) = &self.image.extent_cache else { return };
        let Backend::File(file) = &self.image.backend else { return };
        let mut budget = PREFETCH_EXTENTS_MAX;
        let mut slice = Vec::with_capacity(PREFETCH_SLICE_EXTENTS);
        while from < end && budget > 0 && keep_going() {
            slice.clear();
            let cached_to = cache.lookup(from, end, PREFETCH_SLICE_EXTENTS, &mut slice);
            if cached_to > from {
                budget = budget.saturating_sub(slice.len());
                from = cached_to;
                continue;
            }
            let until = end.min(from + PREFETCH_SLICE_BYTES);
            let stamp = cache.begin_scan(from, until);
            let scanned = self.image.scanner.with_file(file, |f, strategy| {
                scan_file(f.as_raw_fd(), from, until, PREFETCH_SLICE_EXTENTS, strategy, &mut slice)
            });
            if !matches!(scanned, Ok(Ok(()))) || slice.is_empty() {
                return;
            }
            cache.insert(from, &slice, &stamp);
            budget = budget.saturating_sub(slice.len());
            from += covered(&slice);
        }
    }
}

/// The extents of `all` from byte `skip` on, where the first `prefix`
/// entries came from the cache and the scan's first extent may have merged
/// into the last of them.
fn scanned_part(all: &[Extent], prefix: usize, skip: u64) -> Vec<Extent> {
    // Entries before the (possibly merged) last prefix entry are all cached.
    let first = prefix.saturating_sub(1);
    let before = covered(&all[..first]);
    let mut out = all[first..].to_vec();
    if let Some(head) = out.first_mut() {
        head.length -= skip - before;
    }
    out.retain(|e| e.length > 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::extent::HOLE;

    #[test]
    fn the_scanned_part_starts_where_the_scan_did() {
        let e = |length, status| Extent { length, status };
        // Prefix [DATA 100], scan merged 50 more DATA, then a HOLE.
        assert_eq!(scanned_part(&[e(150, DATA), e(10, HOLE)], 1, 100), vec![e(50, DATA), e(10, HOLE)]);
        // Prefix [DATA 100, HOLE 20], scan started with DATA 30.
        assert_eq!(scanned_part(&[e(100, DATA), e(20, HOLE), e(30, DATA)], 2, 120), vec![e(30, DATA)]);
        // No prefix.
        assert_eq!(scanned_part(&[e(7, HOLE)], 0, 0), vec![e(7, HOLE)]);
    }
}
