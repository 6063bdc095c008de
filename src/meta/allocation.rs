//! `base:allocation` for files: SEEK_DATA/SEEK_HOLE for data versus holes,
//! refined by FIEMAP inside holes.
//!
//! SEEK_DATA is authoritative for data: it sees delayed allocation and dirty
//! page cache, so nothing it calls data is ever reported as a hole or zero.
//! It also calls unwritten (fallocated) extents holes. FIEMAP, asked only
//! about those holes, tells them apart: an UNWRITTEN extent is allocated but
//! reads as zeroes (ZERO without HOLE); a true gap is HOLE|ZERO; anything
//! else FIEMAP reports there (a race with a writer) is reported as data,
//! which is always safe. FIEMAP_FLAG_SYNC is not used: it would force
//! writeback, and SEEK_DATA has already caught unwritten-back data.
//!
//! These are blocking syscalls with no io_uring opcode; they run on the
//! lookup helper threads (see `meta::lookup`), never on a ring worker.

use std::io;
use std::os::fd::RawFd;

use super::extent::{DATA, Extent, HOLE, ZERO, push_capped};

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

/// Scans `[offset, end)` of a file of `size` bytes, appending coalesced
/// extents until `end` or until `out` holds `extents_max` entries (the last
/// one may then end short). `use_fiemap` is cleared if the filesystem lacks
/// FIEMAP, so later scans skip it.
pub fn scan_file(
    fd: RawFd,
    offset: u64,
    end: u64,
    extents_max: usize,
    use_fiemap: &mut bool,
    out: &mut Vec<Extent>,
) -> io::Result<()> {
    let mut scan = Scan { fd, extents_max, at: offset, out };
    while scan.at < end {
        let data = match seek(fd, scan.at, libc::SEEK_DATA) {
            Ok(data) => data.min(end),
            // ENXIO: no data at or after `at`; the rest of the file is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
        let more = if data > scan.at {
            scan.refine_hole(data, use_fiemap)?
        } else {
            // SEEK_HOLE from a data offset always moves forward; guard anyway.
            let hole = seek(fd, scan.at, libc::SEEK_HOLE)?.max(scan.at + 1).min(end);
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
}

impl Scan<'_> {
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
    /// Classifies `[at, end)`, which SEEK_DATA called a hole.
    fn refine_hole(&mut self, end: u64, use_fiemap: &mut bool) -> io::Result<bool> {
        if !*use_fiemap {
            return Ok(self.push(end, HOLE));
        }
        // SAFETY: Fiemap is plain data; all-zero is a valid request header.
        let mut map: Box<Fiemap> = unsafe { Box::new(std::mem::zeroed()) };
        while self.at < end {
            map.start = self.at;
            map.length = end - self.at;
            map.flags = 0;
            map.mapped_extents = 0;
            map.extent_count = FIEMAP_BATCH as u32;
            // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
            // extent_count extents into the array that follows it.
            let rc = unsafe { libc::ioctl(self.fd, FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)) {
                    *use_fiemap = false;
                    return Ok(self.push(end, HOLE));
                }
                return Err(e);
            }
            let mapped = (map.mapped_extents as usize).min(FIEMAP_BATCH);
            for extent in &map.extents[..mapped] {
                let ext_start = extent.logical.max(self.at);
                let ext_end = extent.logical.saturating_add(extent.length).min(end);
                if ext_end <= ext_start {
                    continue;
                }
                let unwritten =
                    extent.flags & FIEMAP_EXTENT_UNWRITTEN != 0 && extent.flags & FIEMAP_EXTENT_DELALLOC == 0;
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

fn seek(fd: RawFd, offset: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on an fd owned by the caller; the helper thread has its
    // own descriptor, so moving its position disturbs nobody.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn data_holes_and_fallocated_ranges_are_told_apart() {
        let path = std::env::temp_dir().join(format!("ringnbd-alloc-{}", std::process::id()));
        let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(16 * MIB).unwrap();
        file.write_all_at(&[1u8; 65536], 4 * MIB).unwrap();
        // SAFETY: fallocate on an open file, inside its size.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, MIB as i64, MIB as i64) };
        assert_eq!(rc, 0);
        let mut fiemap = true;
        let mut out = vec![];
        scan_file(file.as_raw_fd(), 0, 16 * MIB, usize::MAX, &mut fiemap, &mut out).unwrap();
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
        scan_file(file.as_raw_fd(), 0, 16 * MIB, 2, &mut fiemap, &mut capped).unwrap();
        assert_eq!(capped.len(), 2);
        assert!(covered_of(&capped) < 16 * MIB);
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
