//! Allocation lookups off the ring: one helper thread per worker.
//!
//! lseek(SEEK_DATA/SEEK_HOLE) and FIEMAP block and have no io_uring opcode.
//! Each worker owns a helper that runs them on descriptors of its own (so
//! there is no shared file position and no lock shared with other workers)
//! and hands results back through a channel plus the worker's wake eventfd.
//! Workers never wait on it: a BLOCK_STATUS whose range is not cached parks
//! until its answer arrives while the ring keeps serving everything else.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::backend::Backend;
use crate::export::Export;

use super::allocation::{Strategy, scan_file};
use super::extent::{DATA, Extent, covered, push_capped};

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
            for job in job_rx {
                let request = job.request;
                let result = helper.run(job);
                if done_tx.send(LookupDone { request, result }).is_err() {
                    return;
                }
                wake_worker(&wake);
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
    fn run(&mut self, mut job: LookupJob) -> Result<Vec<Extent>, i32> {
        let export = Arc::clone(&self.exports[job.export]);
        let Backend::File(file) = &export.backend else { unreachable!("memory exports answer inline") };
        if file.is_block_device {
            // A block device has no holes to report unless it says so itself.
            push_capped(&mut job.extents, Extent { length: job.end - job.from, status: DATA }, job.extents_max);
            return Ok(job.extents);
        }
        if self.files.len() <= job.export {
            self.files.resize_with(job.export + 1, || None);
        }
        if self.files[job.export].is_none() {
            let opened = File::open(&file.path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let strategy = Strategy::for_file(opened.as_raw_fd());
            self.files[job.export] = Some((opened, strategy));
        }
        let (fd, strategy) = match &mut self.files[job.export] {
            Some((f, strategy)) => (f.as_raw_fd(), strategy),
            None => unreachable!("opened above"),
        };
        let before = job.extents.len();
        scan_file(fd, job.from, job.end, job.extents_max, strategy, &mut job.extents)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        if let Some(cache) = &export.extent_cache {
            // The first scanned extent may have merged into the last cached
            // one; insert from that extent's start.
            let first = before.saturating_sub(1);
            let start = job.offset + covered(&job.extents[..first]);
            cache.insert(start, &job.extents[first..], job.epoch);
        }
        Ok(job.extents)
    }
}
