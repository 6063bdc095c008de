//! Allocation lookups off the ring: one helper thread per worker.
//!
//! lseek(SEEK_DATA/SEEK_HOLE) and FIEMAP block and have no io_uring opcode.
//! Each worker owns a helper that runs them on descriptors of its own (so
//! there is no shared file position and no lock shared with other workers)
//! and hands results back through a channel plus the worker's wake eventfd.
//! Workers never wait on it: a BLOCK_STATUS whose range is not cached parks
//! until its answer arrives while the ring keeps serving everything else.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::backend::Backend;
use crate::export::Export;
use crate::meta::allocation::{Strategy, scan_file};
use crate::proto::extent::{DATA, Extent, covered, push_capped};

/// One scan: extend `extents` (already holding the cached prefix of the
/// request `[offset, from)`) up to `end` or `extents_max` entries. The
/// vector travels back in [`LookupDone`] for the worker to reuse, so a cache
/// miss allocates nothing on the worker.
pub struct LookupJob {
    pub request: u32,
    pub export: usize,
    pub offset: u64,
    pub from: u64,
    pub end: u64,
    pub extents_max: usize,
    pub extents: Vec<Extent>,
}

pub struct LookupDone {
    pub request: u32,
    /// The answer (when `result` is Ok), and the vector to reuse either way.
    pub extents: Vec<Extent>,
    /// The errno of a failed scan.
    pub result: Result<(), i32>,
}

/// Extents scanned ahead per slice, and in all after one answer.
const PREFETCH_SLICE_EXTENTS: usize = 1024;
const PREFETCH_EXTENTS_MAX: usize = 1 << 16;
/// Bytes one prefetch slice may cover (bounds the regions it stamps).
const PREFETCH_SLICE_BYTES: u64 = 1 << 30;

pub struct LookupService {
    pub jobs: Sender<LookupJob>,
    pub done: Receiver<LookupDone>,
}

impl LookupService {
    /// Starts the helper thread. It exits when `jobs` is dropped.
    pub fn spawn(index: usize, exports: Arc<[Arc<Export>]>, wake: Arc<OwnedFd>) -> std::io::Result<Self> {
        let (jobs, job_rx) = crossbeam_channel::unbounded::<LookupJob>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        std::thread::Builder::new().name(format!("ringnbd-extents-{index}")).spawn(move || {
            let mut helper = Helper { exports, files: Vec::new() };
            for mut job in job_rx.iter() {
                let (request, export, end) = (job.request, job.export, job.end);
                let result = helper.answer(&mut job);
                let answered_to = job.offset + covered(&job.extents);
                if done_tx.send(LookupDone { request, extents: job.extents, result }).is_err() {
                    return;
                }
                wake_worker(&wake);
                // Capped short of its request: the client will ask for the
                // rest, so scan it now, while the client reads the reply.
                if result.is_ok() && answered_to < end {
                    helper.prefetch(export, answered_to, end, &job_rx);
                }
            }
        })?;
        Ok(Self { jobs, done })
    }
}

fn wake_worker(wake: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Per-export descriptors opened lazily by the helper, and whether FIEMAP
/// works there.
struct Helper {
    exports: Arc<[Arc<Export>]>,
    files: Vec<Option<(File, Strategy)>>,
}

impl Helper {
    /// The descriptor and scan strategy for an export, opened on first use.
    fn file(&mut self, export: usize) -> Result<(RawFd, &mut Strategy), i32> {
        if self.files.len() <= export {
            self.files.resize_with(export + 1, || None);
        }
        if self.files[export].is_none() {
            let Backend::File(file) = &self.exports[export].image.backend else { unreachable!("file exports only") };
            let opened = File::open(&file.path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let strategy = Strategy::for_file(opened.as_raw_fd());
            self.files[export] = Some((opened, strategy));
        }
        match &mut self.files[export] {
            Some((f, strategy)) => Ok((f.as_raw_fd(), strategy)),
            None => unreachable!("opened above"),
        }
    }

    /// Scans the rest of a job's range into its vector and caches what was
    /// scanned.
    fn answer(&mut self, job: &mut LookupJob) -> Result<(), i32> {
        let export = Arc::clone(&self.exports[job.export]);
        let image = &export.image;
        let Backend::File(file) = &image.backend else { unreachable!("memory exports answer inline") };
        if file.is_block_device {
            // A block device has no holes to report unless it says so itself.
            push_capped(&mut job.extents, Extent { length: job.end - job.from, status: DATA }, job.extents_max);
            return Ok(());
        }
        let stamp = image.extent_cache.as_ref().map(|c| c.begin_scan(job.from, job.end));
        let prefix = job.extents.len();
        let (fd, strategy) = self.file(job.export)?;
        scan_file(fd, job.from, job.end, job.extents_max, strategy, &mut job.extents)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        if let (Some(cache), Some(stamp)) = (&image.extent_cache, stamp) {
            let scanned = scanned_part(&job.extents, prefix, job.from - job.offset);
            cache.insert(job.from, &scanned, &stamp);
        }
        Ok(())
    }

    /// Scans `[from, size)` ahead of a mapper into the cache, in small
    /// slices and only while no real lookup is waiting, so prefetching never
    /// delays an answer by more than one slice.
    fn prefetch(&mut self, export: usize, mut from: u64, size: u64, jobs: &Receiver<LookupJob>) {
        let shared = Arc::clone(&self.exports[export]);
        let Some(cache) = &shared.image.extent_cache else { return };
        let mut budget = PREFETCH_EXTENTS_MAX;
        let mut slice = Vec::with_capacity(PREFETCH_SLICE_EXTENTS);
        while from < size && budget > 0 && jobs.is_empty() {
            slice.clear();
            let cached_to = cache.lookup(from, size, PREFETCH_SLICE_EXTENTS, &mut slice);
            if cached_to > from {
                budget = budget.saturating_sub(slice.len());
                from = cached_to;
                continue;
            }
            let until = size.min(from + PREFETCH_SLICE_BYTES);
            let stamp = cache.begin_scan(from, until);
            let Ok((fd, strategy)) = self.file(export) else { return };
            if scan_file(fd, from, until, PREFETCH_SLICE_EXTENTS, strategy, &mut slice).is_err() || slice.is_empty() {
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
