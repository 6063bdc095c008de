//! `base:allocation` for files.
//!
//! Two scans, picked per filesystem by [`Strategy::for_file`]:
//!
//! - **FIEMAP first** (ext4, xfs, btrfs: filesystems whose FIEMAP reports
//!   delayed allocation): one ioctl lists up to 128 extents. Gaps are holes,
//!   written and DELALLOC extents are data, and UNWRITTEN (fallocated)
//!   extents are ZERO without HOLE, except where SEEK_DATA finds page-cache
//!   data inside them (written but not yet converted), which is data. This
//!   costs one syscall per 128 extents instead of two or three per extent,
//!   and scanning is kernel-bound, so it is what makes cold maps fast.
//! - **SEEK first** (everything else, e.g. tmpfs, NFS): SEEK_DATA/SEEK_HOLE
//!   decide data versus hole (they see delayed allocation and dirty page
//!   cache), and FIEMAP, where it exists, refines the holes into unwritten
//!   extents (ZERO) and true gaps (HOLE|ZERO).
//!
//! Either way nothing that holds data is ever reported as a hole or zero,
//! and anything unexpected is reported as data, which is always safe.
//! FIEMAP_FLAG_SYNC is not used: it would force writeback.
//!
//! These are blocking syscalls with no io_uring opcode; they run on the
//! lookup helper threads (see `engine::lookup`), never on a ring worker.

use std::io;
use std::os::fd::RawFd;

use crate::proto::extent::{DATA, Extent, HOLE, ZERO, push_capped};

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xc020_660b;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents fetched per FIEMAP call.
const FIEMAP_BATCH: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::size_of::<Fiemap>() == 32 + 56 * FIEMAP_BATCH);

/// How to scan a file; `Seek` with `fiemap: false` once FIEMAP turned out
/// to be unsupported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    FiemapFirst,
    Seek { fiemap: bool },
}

impl Strategy {
    /// FIEMAP first where the filesystem's FIEMAP is known to report delayed
    /// allocation; SEEK first elsewhere.
    pub fn for_file(fd: RawFd) -> Strategy {
        const EXT4_MAGIC: i64 = 0xef53;
        const XFS_MAGIC: i64 = 0x5846_5342;
        const BTRFS_MAGIC: i64 = 0x9123_683e;
        // SAFETY: statfs is plain data; all-zero is a valid value to overwrite.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs fills `st` for an open fd.
        let known = unsafe { libc::fstatfs(fd, &mut st) } == 0
            && matches!(st.f_type as i64, EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC);
        if known { Strategy::FiemapFirst } else { Strategy::Seek { fiemap: true } }
    }
}

/// Scans `[offset, end)`, appending coalesced extents until `end` or until
/// `out` holds `extents_max` entries (the last one may then end short).
/// `strategy` is downgraded if the filesystem turns out to lack FIEMAP.
pub fn scan_file(
    fd: RawFd,
    offset: u64,
    end: u64,
    extents_max: usize,
    strategy: &mut Strategy,
    out: &mut Vec<Extent>,
) -> io::Result<()> {
    let before = out.len();
    if *strategy == Strategy::FiemapFirst {
        let mut scan = Scan::new(fd, extents_max, offset, out);
        match scan.fiemap_first(end) {
            Err(e) if unsupported(&e) => {
                *strategy = Strategy::Seek { fiemap: false };
                out.truncate(before);
            }
            other => return other,
        }
    }
    let mut use_fiemap = matches!(strategy, Strategy::Seek { fiemap: true });
    let result = seek_first(fd, offset, end, extents_max, &mut use_fiemap, out);
    if !use_fiemap {
        *strategy = Strategy::Seek { fiemap: false };
    }
    result
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY))
}

fn seek_first(
    fd: RawFd,
    offset: u64,
    end: u64,
    extents_max: usize,
    use_fiemap: &mut bool,
    out: &mut Vec<Extent>,
) -> io::Result<()> {
    let mut scan = Scan::new(fd, extents_max, offset, out);
    while scan.at < end {
        let data = scan.next_data(scan.at)?.min(end);
        let more = if data > scan.at {
            scan.refine_hole(data, use_fiemap)?
        } else {
            let hole = scan.next_hole(scan.at)?.min(end);
            scan.push(hole, DATA)
        };
        if !more {
            break;
        }
    }
    Ok(())
}

/// A scan in progress: `out` describes `[offset, at)`.
struct Scan<'a> {
    fd: RawFd,
    extents_max: usize,
    at: u64,
    out: &'a mut Vec<Extent>,
    /// What the last SEEK_DATA and SEEK_HOLE said: no data before
    /// `no_data_until`, and data throughout `data_run`. A scan only moves
    /// forward, so both stay true for every later position they cover.
    /// Without them each unwritten extent would ask again, and SEEK_DATA
    /// walks every extent up to the next data: quadratic in the extents.
    no_data_until: u64,
    data_run: (u64, u64),
}

impl<'a> Scan<'a> {
    fn new(fd: RawFd, extents_max: usize, at: u64, out: &'a mut Vec<Extent>) -> Self {
        Scan { fd, extents_max, at, out, no_data_until: 0, data_run: (0, 0) }
    }

    /// SEEK_DATA from `from` (>= every earlier question); `u64::MAX` when
    /// there is no data after it.
    fn next_data(&mut self, from: u64) -> io::Result<u64> {
        let (run_start, run_end) = self.data_run;
        if (run_start..run_end).contains(&from) {
            return Ok(from);
        }
        if from < self.no_data_until {
            return Ok(self.no_data_until);
        }
        let data = match seek(self.fd, from, libc::SEEK_DATA) {
            Ok(data) => data,
            // ENXIO: no data at or after `from`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => u64::MAX,
            Err(e) => return Err(e),
        };
        self.no_data_until = data;
        Ok(data)
    }

    /// SEEK_HOLE from `data`, a data offset; always beyond it.
    fn next_hole(&mut self, data: u64) -> io::Result<u64> {
        let (run_start, run_end) = self.data_run;
        if (run_start..run_end).contains(&data) {
            return Ok(run_end);
        }
        let hole = seek(self.fd, data, libc::SEEK_HOLE)?.max(data + 1);
        self.data_run = (data, hole);
        Ok(hole)
    }

    /// Extends the description to `end` with `status`; false once capped.
    fn push(&mut self, end: u64, status: u32) -> bool {
        if end <= self.at {
            return true;
        }
        if !push_capped(self.out, Extent { length: end - self.at, status }, self.extents_max) {
            return false;
        }
        self.at = end;
        true
    }
    /// FIEMAP-first scan of `[at, end)`. Returns false once capped.
    fn fiemap_first(&mut self, end: u64) -> io::Result<()> {
        // SAFETY: Fiemap is plain data; all-zero is a valid request header.
        let mut map: Box<Fiemap> = unsafe { Box::new(std::mem::zeroed()) };
        while self.at < end {
            let mapped = fiemap(self.fd, &mut map, self.at, end)?;
            let before = self.at;
            for extent in &map.extents[..mapped] {
                let start = extent.logical.max(self.at);
                let stop = extent.logical.saturating_add(extent.length).min(end);
                if stop <= start {
                    continue;
                }
                let unwritten =
                    extent.flags & FIEMAP_EXTENT_UNWRITTEN != 0 && extent.flags & FIEMAP_EXTENT_DELALLOC == 0;
                let more =
                    self.push(start, HOLE) && if unwritten { self.unwritten(stop)? } else { self.push(stop, DATA) };
                if !more {
                    return Ok(());
                }
                if extent.flags & FIEMAP_EXTENT_LAST != 0 {
                    self.push(end, HOLE);
                    return Ok(());
                }
            }
            // Fewer extents than asked for: nothing else in the range. No
            // progress with a full batch would loop forever: give up as data.
            if mapped < FIEMAP_BATCH || self.at == before {
                let status = if mapped < FIEMAP_BATCH { HOLE } else { DATA };
                self.push(end, status);
                return Ok(());
            }
        }
        Ok(())
    }

    /// `[at, end)` is an unwritten extent: zero, except where SEEK_DATA finds
    /// page-cache data (written, not yet converted), which is data.
    fn unwritten(&mut self, end: u64) -> io::Result<bool> {
        while self.at < end {
            let data = self.next_data(self.at)?.min(end);
            if !self.push(data, ZERO) {
                return Ok(false);
            }
            if data < end {
                let hole = self.next_hole(data)?.min(end);
                if !self.push(hole, DATA) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Classifies `[at, end)`, which SEEK_DATA called a hole.
    fn refine_hole(&mut self, end: u64, use_fiemap: &mut bool) -> io::Result<bool> {
        if !*use_fiemap {
            return Ok(self.push(end, HOLE));
        }
        // SAFETY: Fiemap is plain data; all-zero is a valid request header.
        let mut map: Box<Fiemap> = unsafe { Box::new(std::mem::zeroed()) };
        while self.at < end {
            let mapped = match fiemap(self.fd, &mut map, self.at, end) {
                Ok(mapped) => mapped,
                Err(e) if unsupported(&e) => {
                    *use_fiemap = false;
                    return Ok(self.push(end, HOLE));
                }
                Err(e) => return Err(e),
            };
            for extent in &map.extents[..mapped] {
                let ext_start = extent.logical.max(self.at);
                let ext_end = extent.logical.saturating_add(extent.length).min(end);
                if ext_end <= ext_start {
                    continue;
                }
                let unwritten =
                    extent.flags & FIEMAP_EXTENT_UNWRITTEN != 0 && extent.flags & FIEMAP_EXTENT_DELALLOC == 0;
                // SEEK_DATA already called this range a hole, so an unwritten
                // extent here holds no page-cache data.
                if !self.push(ext_start, HOLE) || !self.push(ext_end, if unwritten { ZERO } else { DATA }) {
                    return Ok(false);
                }
                if extent.flags & FIEMAP_EXTENT_LAST != 0 {
                    return Ok(self.push(end, HOLE));
                }
            }
            if mapped < FIEMAP_BATCH {
                break;
            }
        }
        Ok(self.push(end, HOLE))
    }
}

/// One FS_IOC_FIEMAP call for `[start, end)`; returns the extents mapped.
fn fiemap(fd: RawFd, map: &mut Fiemap, start: u64, end: u64) -> io::Result<usize> {
    map.start = start;
    map.length = end - start;
    map.flags = 0;
    map.mapped_extents = 0;
    map.extent_count = FIEMAP_BATCH as u32;
    // SAFETY: FS_IOC_FIEMAP reads the header and writes at most extent_count
    // extents into the array that follows it.
    if unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, map as *mut Fiemap) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((map.mapped_extents as usize).min(FIEMAP_BATCH))
}

fn seek(fd: RawFd, offset: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on an fd the caller keeps open. It moves the file
    // position, which no I/O of the server uses (all of it is positional),
    // so helpers sharing a descriptor disturb nobody.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    #[cfg(test)]
    tests::SEEKS.with(|seeks| seeks.set(seeks.get() + 1));
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    thread_local! {
        /// lseek calls made by this test thread.
        pub static SEEKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn many_unwritten_extents_cost_a_bounded_number_of_seeks() {
        // SEEK_DATA walks every extent up to the next data, so asking once
        // per unwritten extent would make this scan quadratic.
        let path = std::env::temp_dir().join(format!("ringnbd-alloc-unwritten-{}", std::process::id()));
        let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(16 * MIB).unwrap();
        let extents = 1000;
        for i in 0..extents {
            // SAFETY: fallocate on an open file, inside its size.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, i * 8192, 4096) };
            assert_eq!(rc, 0);
        }
        file.write_all_at(&[1u8; 4096], 16 * MIB - 4096).unwrap();
        file.sync_all().unwrap();
        for mut strategy in [Strategy::FiemapFirst, Strategy::Seek { fiemap: true }] {
            SEEKS.with(|seeks| seeks.set(0));
            let mut out = vec![];
            scan_file(file.as_raw_fd(), 0, 16 * MIB, usize::MAX, &mut strategy, &mut out).unwrap();
            assert_eq!(covered_of(&out), 16 * MIB);
            assert_eq!(status_at(&out, 16 * MIB - 1), DATA);
            let seeks = SEEKS.with(|seeks| seeks.get());
            assert!(seeks <= 4, "{strategy:?}: {seeks} seeks for {extents} unwritten extents");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn data_holes_and_fallocated_ranges_are_told_apart() {
        let path = std::env::temp_dir().join(format!("ringnbd-alloc-{}", std::process::id()));
        let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(16 * MIB).unwrap();
        file.write_all_at(&[1u8; 65536], 4 * MIB).unwrap();
        // SAFETY: fallocate on an open file, inside its size.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, MIB as i64, MIB as i64) };
        assert_eq!(rc, 0);
        for strategy in [Strategy::FiemapFirst, Strategy::Seek { fiemap: true }, Strategy::Seek { fiemap: false }] {
            check_scan(&file, strategy);
        }
        std::fs::remove_file(path).unwrap();
    }

    fn check_scan(file: &std::fs::File, mut strategy: Strategy) {
        let fiemap = strategy != Strategy::Seek { fiemap: false };
        let mut out = vec![];
        scan_file(file.as_raw_fd(), 0, 16 * MIB, usize::MAX, &mut strategy, &mut out).unwrap();
        assert_eq!(covered_of(&out), 16 * MIB, "{out:?}");
        // Data is never called a hole or zero, whatever the filesystem.
        assert_eq!(status_at(&out, 4 * MIB), DATA);
        assert_eq!(status_at(&out, 4 * MIB + 65535), DATA);
        assert_eq!(status_at(&out, 0), HOLE);
        assert_eq!(status_at(&out, 15 * MIB), HOLE);
        if fiemap {
            // ext4/xfs: the fallocated megabyte is allocated but reads as zero.
            assert_eq!(status_at(&out, MIB), ZERO);
            assert_eq!(status_at(&out, 2 * MIB - 1), ZERO);
        }
        // The cap leaves the last extent short of the end.
        let mut capped = vec![];
        scan_file(file.as_raw_fd(), 0, 16 * MIB, 2, &mut strategy, &mut capped).unwrap();
        assert_eq!(capped.len(), 2, "{strategy:?}");
        assert!(covered_of(&capped) < 16 * MIB);
        // A sub-range starting inside the data extent.
        let mut part = vec![];
        scan_file(file.as_raw_fd(), 4 * MIB + 4096, 5 * MIB, usize::MAX, &mut strategy, &mut part).unwrap();
        assert_eq!(part[0], Extent { length: 65536 - 4096, status: DATA }, "{strategy:?}");
        assert_eq!(covered_of(&part), MIB - 4096);
    }

    #[test]
    fn dirty_page_cache_over_an_unwritten_extent_is_data() {
        let path = std::env::temp_dir().join(format!("ringnbd-alloc-dirty-{}", std::process::id()));
        let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(4 * MIB).unwrap();
        // SAFETY: fallocate on an open file, inside its size.
        assert_eq!(unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 4 * MIB as i64) }, 0);
        // Buffered write into the unwritten extent: FIEMAP still says
        // UNWRITTEN until writeback converts it; it must not read as zero.
        file.write_all_at(&[7u8; 8192], MIB).unwrap();
        for mut strategy in [Strategy::FiemapFirst, Strategy::Seek { fiemap: true }] {
            let mut out = vec![];
            scan_file(file.as_raw_fd(), 0, 4 * MIB, usize::MAX, &mut strategy, &mut out).unwrap();
            assert_eq!(status_at(&out, MIB), DATA, "{strategy:?}: {out:?}");
            assert_eq!(status_at(&out, MIB + 8191), DATA, "{strategy:?}: {out:?}");
        }
        std::fs::remove_file(path).unwrap();
    }

    fn covered_of(v: &[Extent]) -> u64 {
        v.iter().map(|e| e.length).sum()
    }

    fn status_at(v: &[Extent], offset: u64) -> u32 {
        let mut at = 0;
        for e in v {
            if offset < at + e.length {
                return e.status;
            }
            at += e.length;
        }
        panic!("offset {offset} not covered");
    }
}
