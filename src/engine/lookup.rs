//! Blocking context scans off the ring: one helper thread per worker.
//!
//! Some sources need blocking syscalls to answer (lseek SEEK_DATA/SEEK_HOLE
//! and FIEMAP have no io_uring opcode). Each worker owns a helper that runs
//! [`ContextSource::scan`] for it and hands results back through a channel
//! plus the worker's wake eventfd. Workers never wait on it: a BLOCK_STATUS
//! part that needs a scan parks until its answer arrives while the ring
//! keeps serving everything else. What a scan does is the source's
//! business; the helper only schedules, and lets a source work ahead
//! ([`ContextSource::prefetch`]) while no job waits.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::meta::context::{ContextSource, Query};
use crate::proto::extent::{Extent, covered};

/// One scan: extend `extents` (holding what `gather` answered for
/// `[query.offset, from)`) to the query's end or its descriptor cap. The
/// vector travels back in [`LookupDone`] for the worker to reuse, so a
/// scan allocates nothing on the worker.
pub struct LookupJob {
    pub request: u32,
    /// Position of the context among the connection's selected ones.
    pub context: usize,
    pub source: Arc<dyn ContextSource>,
    pub query: Query,
    pub from: u64,
    pub extents: Vec<Extent>,
}

pub struct LookupDone {
    pub request: u32,
    pub context: usize,
    /// The answer (when `result` is Ok), and the vector to reuse either way.
    pub extents: Vec<Extent>,
    /// The errno of a failed scan.
    pub result: Result<(), i32>,
}

pub struct LookupService {
    pub jobs: Sender<LookupJob>,
    pub done: Receiver<LookupDone>,
}

impl LookupService {
    /// Starts the helper thread. It exits when `jobs` is dropped.
    pub fn spawn(index: usize, wake: Arc<OwnedFd>) -> std::io::Result<Self> {
        let (jobs, job_rx) = crossbeam_channel::unbounded::<LookupJob>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        std::thread::Builder::new().name(format!("ringnbd-extents-{index}")).spawn(move || {
            for mut job in job_rx.iter() {
                let result = job.source.scan(&job.query, job.from, &mut job.extents);
                let answered_to = job.query.offset + covered(&job.extents);
                let (source, end) = (job.source, job.query.end());
                let done = LookupDone { request: job.request, context: job.context, extents: job.extents, result };
                if done_tx.send(done).is_err() {
                    return;
                }
                wake_worker(&wake);
                // Capped short of its request: the client will ask for the
                // rest, so let the source work on it while it reads the reply.
                if result.is_ok() && answered_to < end {
                    source.prefetch(answered_to, end, &|| job_rx.is_empty());
                }
            }
        })?;
        Ok(Self { jobs, done })
    }
}

fn wake_worker(wake: &OwnedFd) {
    super::handoff::signal_eventfd(wake);
}
