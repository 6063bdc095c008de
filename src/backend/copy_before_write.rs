//! Copy-before-write snapshots, for images whose file system cannot clone
//! (ext4, tmpfs): the first mutation of a chunk after the snapshot copies
//! the chunk's old data into a sparse scratch file before the mutation is
//! submitted, and the snapshot reads each chunk from the scratch file once
//! preserved and from the live image until then.
//!
//! Each chunk is untouched, being copied (by one worker, which claimed it),
//! or preserved. A mutation waits for the chunks it covers to be preserved;
//! a worker that finds a chunk another worker is copying waits for that
//! copy (one chunk's read and write). Reads of the snapshot pair with it
//! like a seqlock: a chunk read from the live image is read again from the
//! scratch file if it was preserved by the time the read finished. A chunk
//! is preserved before any mutation of it is submitted, so a live read that
//! finished while its chunk was still untouched saw the old data.
//!
//! Old data that is all zeroes is not written: the scratch file keeps a
//! hole there, which reads back as the same zeroes and takes no space.
//! Scratch space is bounded (`ScratchPolicy`); running out breaks the
//! snapshot (its reads fail with EIO) or, if so configured, fails the live
//! mutation with ENOSPC instead.
//!
//! The copies run on the ring, as operations of the mutation's own plan
//! (`preserving_io`), through the worker's copy buffers, and so do the
//! snapshot's own reads (`snapshot_io`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use crate::meta::allocation::{Strategy, scan_file};
use crate::proto::extent::{DATA, Extent, append_capped};
use crate::proto::{Failure, NbdError};

/// Granularity of preservation: 64 KiB.
pub const CHUNK_SHIFT: u32 = 16;
const CHUNK_BYTES: u64 = 1 << CHUNK_SHIFT;

/// What [`CopyBeforeWrite::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing to do: preserved already, or the snapshot is broken.
    Preserved,
    /// The caller copies it, then releases it.
    Mine,
    /// Another request is copying it: try again shortly.
    Busy,
}

const UNTOUCHED: u8 = 0;
const COPYING: u8 = 1;
const PRESERVED: u8 = 2;

/// What happens when the scratch file would grow past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchFull {
    /// The snapshot breaks (its readers get EIO); live writes go on.
    BreakSnapshot,
    /// Live mutations that need a copy fail with ENOSPC; the snapshot stays whole.
    FailWrites,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchPolicy {
    /// Bytes of old data the scratch file may hold.
    pub bytes_max: u64,
    pub when_full: ScratchFull,
}

pub struct CopyBeforeWrite {
    /// The snapshot's export name, for log lines.
    pub name: String,
    /// The live image, read for old data (its own descriptor: buffered, any
    /// offset and length).
    live: File,
    /// Block devices have no holes to scan: their chunks report data.
    live_is_device: bool,
    /// How the live image and the scratch file are scanned (`meta::allocation`).
    strategies: (Strategy, Strategy),
    scratch: File,
    pub scratch_path: PathBuf,
    size: u64,
    states: Box<[AtomicU8]>,
    policy: ScratchPolicy,
    /// Bytes of old data written to scratch (holes not counted).
    used: AtomicU64,
    broken: AtomicBool,
}

impl std::fmt::Debug for CopyBeforeWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyBeforeWrite").field("name", &self.name).finish_non_exhaustive()
    }
}

impl CopyBeforeWrite {
    /// Preservation for an image of `size` bytes read through `live`, with
    /// an empty scratch file (created sparse, `size` long).
    pub fn new(
        name: String,
        live: File,
        scratch: File,
        scratch_path: PathBuf,
        size: u64,
        policy: ScratchPolicy,
    ) -> io::Result<Self> {
        scratch.set_len(size)?;
        let live_is_device = std::os::unix::fs::FileTypeExt::is_block_device(&live.metadata()?.file_type());
        let strategies = (Strategy::for_file(live.as_raw_fd()), Strategy::for_file(scratch.as_raw_fd()));
        let chunks = size.div_ceil(CHUNK_BYTES) as usize;
        let states = (0..chunks).map(|_| AtomicU8::new(UNTOUCHED)).collect();
        Ok(Self {
            name,
            live,
            live_is_device,
            strategies,
            scratch,
            scratch_path,
            size,
            states,
            policy,
            used: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Bytes of old data the scratch file holds.
    pub fn scratch_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn chunks(&self, offset: u64, end: u64) -> std::ops::Range<usize> {
        let end = end.min(self.size);
        if offset >= end {
            return 0..0;
        }
        (offset >> CHUNK_SHIFT) as usize..((end - 1) >> CHUNK_SHIFT) as usize + 1
    }

    fn chunk_range(&self, chunk: usize) -> (u64, u64) {
        let start = (chunk as u64) << CHUNK_SHIFT;
        (start, (start + CHUNK_BYTES).min(self.size))
    }

    /// The snapshot was deleted: mutations stop preserving for it, so any
    /// reader still connected must not be handed live data as the
    /// snapshot's. It gets EIO from now on.
    pub fn retire(&self) {
        self.broken.store(true, Ordering::Release);
    }

    fn break_snapshot(&self, why: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            crate::note!("snapshot {:?} is broken ({why}): its readers now get EIO", self.name);
        }
    }

    /// Takes `chunk` for preserving, for a mutation about to change it.
    /// A broken snapshot needs nothing preserved.
    pub fn claim(&self, chunk: usize) -> Claim {
        let state = &self.states[chunk];
        // The steady state: a load, no write to the shared line.
        if self.is_broken() || state.load(Ordering::Acquire) == PRESERVED {
            return Claim::Preserved;
        }
        match state.compare_exchange(UNTOUCHED, COPYING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Claim::Mine,
            Err(PRESERVED) => Claim::Preserved,
            Err(_) if self.is_broken() => Claim::Preserved,
            Err(_) => Claim::Busy,
        }
    }

    /// Whether the old data `old` of a chunk the caller claimed goes to the
    /// scratch file: not when it is all zeroes (the scratch file's hole
    /// reads the same) or when there is no room and the snapshot breaks
    /// instead. Fails only under [`ScratchFull::FailWrites`].
    pub fn admit(&self, old: &[u8]) -> Result<bool, Failure> {
        if old.iter().all(|&b| b == 0) {
            return Ok(false);
        }
        let len = old.len() as u64;
        let used = self.used.fetch_add(len, Ordering::Relaxed) + len;
        if used <= self.policy.bytes_max {
            return Ok(true);
        }
        self.used.fetch_sub(len, Ordering::Relaxed);
        match self.policy.when_full {
            ScratchFull::BreakSnapshot => {
                self.break_snapshot(&format!("scratch space full at {} bytes", self.policy.bytes_max));
                Ok(false)
            }
            ScratchFull::FailWrites => {
                Err(NbdError::NoSpc.because("the snapshot's scratch space is full; the write would destroy it"))
            }
        }
    }

    /// A copy of a claimed chunk failed: the snapshot cannot be trusted.
    pub fn copy_failed(&self, why: &str) {
        self.break_snapshot(why);
    }

    /// Ends the caller's claim: preserved (also after a failure that broke
    /// the snapshot), or untouched again when the mutation is refused.
    pub fn release(&self, chunk: usize, preserved: bool) {
        self.states[chunk].store(if preserved { PRESERVED } else { UNTOUCHED }, Ordering::Release);
    }

    /// The chunks `[offset, end)` of the live image touches.
    pub fn chunks_of(&self, offset: u64, end: u64) -> std::ops::Range<usize> {
        self.chunks(offset, end)
    }

    /// File range of `chunk`.
    pub fn range_of(&self, chunk: usize) -> (u64, u64) {
        self.chunk_range(chunk)
    }

    /// Where old data is read from (the live image, buffered) and written to.
    pub fn live_fd(&self) -> std::os::fd::RawFd {
        self.live.as_raw_fd()
    }

    pub fn scratch_fd(&self) -> std::os::fd::RawFd {
        self.scratch.as_raw_fd()
    }

    /// log2 of the chunk size.
    pub fn chunk_shift(&self) -> u32 {
        CHUNK_SHIFT
    }

    pub fn is_preserved(&self, chunk: usize) -> bool {
        self.states[chunk].load(Ordering::Acquire) == PRESERVED
    }

    /// The run of chunks from the one holding `at` that share its state,
    /// cut at `end`: `(stop, preserved)`, with `stop` the byte after it.
    pub fn run_from(&self, at: u64, end: u64) -> (u64, bool) {
        let first = (at >> CHUNK_SHIFT) as usize;
        let state = self.is_preserved(first);
        let mut last = first;
        while last + 1 < self.states.len()
            && (((last + 1) as u64) << CHUNK_SHIFT) < end
            && self.is_preserved(last + 1) == state
        {
            last += 1;
        }
        (self.chunk_range(last).1.min(end), state)
    }

    /// Reads the snapshot's `[offset, offset + out.len())`, one read per
    /// run of chunks in one state, with blocking calls: the reference the
    /// unit tests check preservation with (the server reads through
    /// `snapshot_io`, the same way on the ring).
    #[cfg(test)]
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Failure> {
        use std::os::unix::fs::FileExt;
        const BROKEN: Failure = NbdError::Io.because("the snapshot is broken (see the server log)");
        let failed = |e: io::Error| Failure::from_errno(errno(&e));
        let end = (offset + out.len() as u64).min(self.size);
        let mut at = offset;
        while at < end {
            let (stop, preserved) = self.run_from(at, end);
            let piece = &mut out[(at - offset) as usize..(stop - offset) as usize];
            if preserved {
                self.scratch.read_exact_at(piece, at).map_err(failed)?;
            } else {
                self.live.read_exact_at(piece, at).map_err(failed)?;
                // Preserved meanwhile: a mutation may have changed the live
                // data during the read, but the scratch copy is the old one.
                for chunk in self.chunks(at, stop).filter(|&c| self.is_preserved(c)) {
                    let (start, chunk_end) = self.chunk_range(chunk);
                    let (from, to) = (start.max(at), chunk_end.min(stop));
                    let again = &mut out[(from - offset) as usize..(to - offset) as usize];
                    self.scratch.read_exact_at(again, from).map_err(failed)?;
                }
            }
            at = stop;
        }
        // Checked last: a snapshot that broke during the read may have
        // handed out data that is not the snapshot's.
        if self.is_broken() { Err(BROKEN) } else { Ok(()) }
    }

    /// Allocation of the snapshot's `[offset, end)`: the scratch file's for
    /// preserved chunks, the live image's elsewhere (each run of chunks in
    /// one state scanned together, live runs re-scanned from scratch if
    /// they were preserved during the scan). Blocking; for the lookup helper.
    pub fn scan(&self, offset: u64, end: u64, extents_max: usize, out: &mut Vec<Extent>) -> io::Result<()> {
        let end = end.min(self.size);
        let mut at = offset;
        let (mut live_strategy, mut scratch_strategy) = self.strategies;
        while at < end && out.len() < extents_max {
            let (stop, preserved) = self.run_from(at, end);
            let mut run = Vec::new();
            if preserved {
                scan_file(self.scratch.as_raw_fd(), at, stop, extents_max, &mut scratch_strategy, &mut run)?;
            } else if self.live_is_device {
                run.push(Extent { length: stop - at, status: DATA });
            } else {
                scan_file(self.live.as_raw_fd(), at, stop, extents_max, &mut live_strategy, &mut run)?;
                if self.chunks(at, stop).any(|c| self.is_preserved(c)) {
                    continue; // scanned again from where it stands now
                }
            }
            match append_capped(out, run, extents_max) {
                None => return Ok(()),
                Some(0) => break,
                Some(covered) => at += covered,
            }
        }
        if self.is_broken() { Err(io::Error::from_raw_os_error(libc::EIO)) } else { Ok(()) }
    }
}

#[cfg(test)]
fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn fixture(tag: &str, size: u64, policy: ScratchPolicy) -> (PathBuf, File, CopyBeforeWrite) {
        let dir = std::env::temp_dir().join(format!("ringnbd-cbw-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0xa1; size as usize]).unwrap();
        let writer = File::options().read(true).write(true).open(&image).unwrap();
        let scratch_path = dir.join("scratch");
        let scratch = File::options().read(true).write(true).create(true).truncate(true).open(&scratch_path).unwrap();
        let cbw =
            CopyBeforeWrite::new("disk@t".into(), File::open(&image).unwrap(), scratch, scratch_path, size, policy)
                .unwrap();
        (dir, writer, cbw)
    }

    /// Preserves `[offset, end)` the way `preserving_io` does, with blocking calls.
    fn preserve(cbw: &CopyBeforeWrite, offset: u64, end: u64) -> Result<(), Failure> {
        for chunk in cbw.chunks_of(offset, end) {
            match cbw.claim(chunk) {
                Claim::Preserved => continue,
                Claim::Busy => panic!("one thread, no one else copies"),
                Claim::Mine => {}
            }
            let (start, stop) = cbw.range_of(chunk);
            let mut old = vec![0; (stop - start) as usize];
            cbw.live.read_exact_at(&mut old, start).unwrap();
            match cbw.admit(&old) {
                Ok(true) => cbw.scratch.write_all_at(&old, start).unwrap(),
                Ok(false) => {}
                Err(failure) => {
                    cbw.release(chunk, false);
                    return Err(failure);
                }
            }
            cbw.release(chunk, true);
        }
        Ok(())
    }

    const ROOMY: ScratchPolicy = ScratchPolicy { bytes_max: u64::MAX, when_full: ScratchFull::BreakSnapshot };

    #[test]
    fn preserved_chunks_read_their_old_data_after_live_writes() {
        let size = 4 * CHUNK_BYTES + 100;
        let (dir, live, cbw) = fixture("old", size, ROOMY);
        for (offset, len) in [(10, 20), (CHUNK_BYTES - 5, 10), (4 * CHUNK_BYTES + 50, 50)] {
            preserve(&cbw, offset, offset + len).unwrap();
            live.write_all_at(&vec![0xb2; len as usize], offset).unwrap();
        }
        let mut all = vec![0; size as usize];
        cbw.read(0, &mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0xa1), "every byte as it was");
        let mut piece = vec![0; 30];
        cbw.read(CHUNK_BYTES - 15, &mut piece).unwrap();
        assert!(piece.iter().all(|&b| b == 0xa1));
        assert_eq!(cbw.scratch_bytes(), 2 * CHUNK_BYTES + 100, "three chunks copied, the last one short");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn zero_chunks_stay_holes_and_a_full_scratch_breaks_or_refuses() {
        let (dir, live, cbw) = fixture(
            "full",
            4 * CHUNK_BYTES,
            ScratchPolicy { bytes_max: CHUNK_BYTES, when_full: ScratchFull::BreakSnapshot },
        );
        live.write_all_at(&vec![0; CHUNK_BYTES as usize], 0).unwrap();
        preserve(&cbw, 0, 1).unwrap();
        assert_eq!(cbw.scratch_bytes(), 0, "zeroes are not copied");
        preserve(&cbw, CHUNK_BYTES, CHUNK_BYTES + 1).unwrap();
        assert!(!cbw.is_broken());
        preserve(&cbw, 2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 1).unwrap();
        assert!(cbw.is_broken(), "the second copy does not fit");
        assert_eq!(cbw.read(0, &mut [0; 10]).unwrap_err().code, NbdError::Io);
        std::fs::remove_dir_all(dir).unwrap();

        let (dir, _live, cbw) = fixture(
            "refuse",
            4 * CHUNK_BYTES,
            ScratchPolicy { bytes_max: CHUNK_BYTES, when_full: ScratchFull::FailWrites },
        );
        preserve(&cbw, 0, 1).unwrap();
        assert_eq!(preserve(&cbw, CHUNK_BYTES, CHUNK_BYTES + 1).unwrap_err().code, NbdError::NoSpc);
        preserve(&cbw, 0, 10).unwrap(); // already preserved: no copy needed
        assert!(!cbw.is_broken());
        assert_eq!(preserve(&cbw, CHUNK_BYTES, CHUNK_BYTES + 1).unwrap_err().code, NbdError::NoSpc, "still untouched");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
