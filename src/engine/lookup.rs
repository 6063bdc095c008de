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
/// request `[offset, from)`) up to `end` or `extents_max` entries.
pub struct LookupJob {
    pub request: u32,
    pub export: usize,
    pub offset: u64,
    pub from: u64,
    /// Cache epoch read together with the prefix: if any mutation completes
    /// after it, nothing from this job is cached (the prefix could be stale).
    pub epoch: u64,
    pub end: u64,
    pub extents_max: usize,
    pub extents: Vec<Extent>,
}

pub struct LookupDone {
    pub request: u32,
    /// The extents, or the errno of a failed scan.
    pub result: Result<Vec<Extent>, i32>,
}

/// What a scan produced: the answer, and which part of it is new.
struct Scanned {
    extents: Vec<Extent>,
    /// Index of the first extent not taken from the cache.
    first_new: usize,
    /// Export offset where `extents[first_new]` starts.
    cache_from: u64,
}

/// Extents scanned ahead per slice, and in all after one answer.
const PREFETCH_SLICE_EXTENTS: usize = 1024;
const PREFETCH_EXTENTS_MAX: usize = 1 << 16;

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
            for job in job_rx.iter() {
                let (request, export, offset, epoch, end) = (job.request, job.export, job.offset, job.epoch, job.end);
                let scanned = helper.scan(job);
                // Answer first; caching and prefetching overlap with the
                // client reading the reply and sending its next request.
                let to_cache = scanned.as_ref().ok().map(|s| (s.extents[s.first_new..].to_vec(), s.cache_from));
                let answered_to = scanned.as_ref().map_or(0, |s| offset + covered(&s.extents));
                let result = scanned.map(|s| s.extents);
                if done_tx.send(LookupDone { request, result }).is_err() {
                    return;
                }
                wake_worker(&wake);
                if let Some((extents, from)) = to_cache {
                    helper.cache(export, from, &extents, epoch);
                    // Capped short of its request: the client will ask for
                    // the rest, so scan it now.
                    if answered_to < end {
                        helper.prefetch(export, answered_to, end, &job_rx);
                    }
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

    fn scan(&mut self, mut job: LookupJob) -> Result<Scanned, i32> {
        let export = Arc::clone(&self.exports[job.export]);
        let Backend::File(file) = &export.image.backend else { unreachable!("memory exports answer inline") };
        let before = job.extents.len();
        if file.is_block_device {
            // A block device has no holes to report unless it says so itself.
            push_capped(&mut job.extents, Extent { length: job.end - job.from, status: DATA }, job.extents_max);
        } else {
            let (fd, strategy) = self.file(job.export)?;
            scan_file(fd, job.from, job.end, job.extents_max, strategy, &mut job.extents)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        }
        // The first scanned extent may have merged into the last cached one;
        // cache from that extent's start.
        let first_new = before.saturating_sub(1);
        let cache_from = job.offset + covered(&job.extents[..first_new]);
        Ok(Scanned { extents: job.extents, first_new, cache_from })
    }

    fn cache(&self, export: usize, from: u64, extents: &[Extent], epoch: u64) {
        if let Some(cache) = &self.exports[export].image.extent_cache {
            cache.insert(from, extents, epoch);
        }
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
            let epoch = cache.epoch();
            let cached_to = cache.lookup(from, size, PREFETCH_SLICE_EXTENTS, &mut slice);
            if cached_to > from {
                budget = budget.saturating_sub(slice.len());
                from = cached_to;
                continue;
            }
            let Ok((fd, strategy)) = self.file(export) else { return };
            if scan_file(fd, from, size, PREFETCH_SLICE_EXTENTS, strategy, &mut slice).is_err() || slice.is_empty() {
                return;
            }
            cache.insert(from, &slice, epoch);
            budget = budget.saturating_sub(slice.len());
            from += covered(&slice);
        }
    }
}
