//! A worker's io_uring with a spill queue.
//!
//! A full submission queue is backpressure, not an error: entries that do
//! not fit wait in `backlog` and go first on the next flush, so old work is
//! never starved by new. Completions are copied out in batches and handled
//! after reaping, never from inside the reap loop.

use std::collections::VecDeque;
use std::io;

use io_uring::{IoUring, cqueue, squeue};

use super::buffers::Registrar;

/// CQEs copied out per reap; bounds the work done per loop turn.
pub const REAP_BATCH_MAX: usize = 256;
/// Kernel worker threads per ring for operations that cannot complete
/// inline: bounded ones (fallocate, fsync, file I/O that would block) and
/// unbounded ones (socket I/O that cannot wait on poll). Without a cap a
/// burst of trims spawns a thread each, and idle ones exit only one at a
/// time, seconds apart.
pub const KERNEL_WORKERS_BOUNDED_MAX: u32 = 8;
pub const KERNEL_WORKERS_UNBOUNDED_MAX: u32 = 4;

#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    /// IORING_CQE_F_* (MORE and NOTIF matter: zero-copy sends).
    pub flags: u32,
}

pub struct Ring {
    ring: IoUring,
    backlog: VecDeque<squeue::Entry>,
}

impl Ring {
    /// `sqpoll_idle_ms`: run a kernel submission-polling thread that sleeps
    /// after that many idle milliseconds (costs a core while busy; saves
    /// the io_uring_enter per loop turn).
    pub fn new(entries: u32, sqpoll_idle_ms: Option<u32>) -> io::Result<Self> {
        let ring = match sqpoll_idle_ms {
            // DEFER_TASKRUN cannot be combined with SQPOLL.
            Some(idle) => IoUring::builder().setup_sqpoll(idle).setup_cqsize(entries * 4).build(entries)?,
            // One thread submits and reaps for this ring, so the kernel may
            // run completion work only when that thread enters the ring
            // (DEFER_TASKRUN, Linux 6.1) instead of interrupting it;
            // COOP_TASKRUN (5.19) is the fallback, a plain ring the last resort.
            None => IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_cqsize(entries * 4)
                .build(entries)
                .or_else(|_| IoUring::builder().setup_coop_taskrun().setup_cqsize(entries * 4).build(entries))
                .or_else(|_| IoUring::new(entries))?,
        };
        // Best effort: kernels before 5.15 have no cap to set.
        let mut caps = [KERNEL_WORKERS_BOUNDED_MAX, KERNEL_WORKERS_UNBOUNDED_MAX];
        let _ = ring.submitter().register_iowq_max_workers(&mut caps);
        Ok(Self { ring, backlog: VecDeque::with_capacity(entries as usize) })
    }

    /// Sets up an empty fixed-buffer table of `slots` entries that chunks are
    /// registered into as they are mapped (Linux 5.19). False when the
    /// kernel cannot, and buffers stay unregistered.
    pub fn reserve_buffer_slots(&self, slots: u16) -> bool {
        self.ring.submitter().register_buffers_sparse(u32::from(slots)).is_ok()
    }

    /// Queues an entry whose pointers stay valid until its completion.
    ///
    /// # Safety
    /// Every buffer, iovec, msghdr or timespec the entry points to must stay
    /// alive and unmoved until the entry's CQE has been reaped.
    pub unsafe fn push(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(entry);
            return;
        }
        // SAFETY: forwarded from this function's contract.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.backlog.push_back(entry);
        }
    }

    fn drain_backlog(&mut self) {
        let mut sq = self.ring.submission();
        while let Some(entry) = self.backlog.front() {
            // SAFETY: entries in the backlog were pushed under `push`'s contract.
            if unsafe { sq.push(entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    /// Submits everything queued and waits for at least one completion.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        loop {
            self.drain_backlog();
            let want = if self.backlog.is_empty() { 1 } else { 0 };
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The CQ is full or the kernel is short of memory: reap first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
            return Ok(());
        }
    }

    /// Copies out up to REAP_BATCH_MAX completions.
    pub fn reap(&mut self, batch: &mut Vec<Completion>) {
        batch.clear();
        let cq: cqueue::CompletionQueue<'_> = self.ring.completion();
        for cqe in cq.take(REAP_BATCH_MAX) {
            batch.push(Completion { user_data: cqe.user_data(), result: cqe.result(), flags: cqe.flags() });
        }
    }
}

impl Registrar for Ring {
    fn register(&self, slot: u16, iovec: libc::iovec) -> io::Result<()> {
        // SAFETY: the pool keeps the memory mapped until it has called
        // `unregister` for this slot, and no operation using the slot is in
        // flight by then (it only unregisters chunks with no buffer out).
        unsafe { self.ring.submitter().register_buffers_update(u32::from(slot), &[iovec], None) }
    }

    fn unregister(&self, slot: u16) {
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        // SAFETY: an empty iovec registers nothing; it only drops the slot.
        if let Err(e) = unsafe { self.ring.submitter().register_buffers_update(u32::from(slot), &[empty], None) } {
            // The slot keeps the pages pinned until the ring closes; nothing
            // can address it any more, so this costs memory, not correctness.
            crate::note!("unregistering buffer slot {slot}: {e}");
        }
    }
}
