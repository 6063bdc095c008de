//! A memory file (tmpfs) mapped whole, so large transfers move between
//! its pages and the socket with one copy (the kernel's, in send or
//! receive) instead of two (into a buffer, then on to the socket or the
//! file).
//!
//! The worker never reads or writes the mapping itself: only the kernel
//! does, as the source of a send or the target of a receive, where a page
//! that is gone (the file shrunk behind ringnbd's back) is an EFAULT for
//! that one request rather than a SIGBUS for the server.

use std::os::fd::RawFd;
use std::ptr::NonNull;

#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory that lives until Drop; this
// type hands out only raw pointers, for the kernel to read or write.
unsafe impl Send for Mapping {}
// SAFETY: as above: no reference into the mapping is ever made.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared (written through to the file).
    pub fn new(fd: RawFd, len: u64, writable: bool) -> std::io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let protection = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of an open file; nothing aliases it yet.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, protection, libc::MAP_SHARED, fd, 0) };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast()).expect("mmap never returns null on success");
        Ok(Mapping { base, len, writable })
    }

    /// Where file byte `offset` is, for `len` bytes (None beyond the end).
    pub fn at(&self, offset: u64, len: usize) -> Option<*mut u8> {
        let end = (offset as usize).checked_add(len)?;
        // SAFETY: offset..end lies within the mapping.
        (end <= self.len).then(|| unsafe { self.base.as_ptr().add(offset as usize) })
    }

    /// Whether every page of `offset..offset + len` is in memory, by
    /// mincore: a hole of a tmpfs file (or a page swapped out) is not. The
    /// mapping is not touched, so nothing is faulted in or allocated.
    pub fn resident(&self, offset: u64, len: usize) -> bool {
        const PAGE: usize = 4096;
        let Some(at) = self.at(offset, len) else { return false };
        let start = (at as usize) & !(PAGE - 1);
        let end = at as usize + len;
        let pages = (end - start).div_ceil(PAGE);
        // One byte per page; a 1 MiB range is 256 of them.
        let mut vector = [0u8; 512];
        if pages > vector.len() {
            return false;
        }
        // SAFETY: start is page-aligned within the mapping, and the vector
        // has a byte for each page of the range.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vector.as_mut_ptr()) };
        rc == 0 && vector[..pages].iter().all(|&v| v & 1 == 1)
    }

    pub fn writable(&self) -> bool {
        self.writable
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; requests that point into
        // it hold the image (and so this) until their last CQE.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn maps_the_file_and_refuses_ranges_past_its_end() {
        let path = std::env::temp_dir().join(format!("ringnbd-mapping-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mapping = Mapping::new(file.as_raw_fd(), 8192, true).unwrap();
        let at = mapping.at(4096, 4096).unwrap();
        // SAFETY: within the mapping; the test owns the file.
        unsafe { *at = 9 };
        assert!(mapping.at(4097, 4096).is_none());
        assert!(mapping.resident(0, 8192), "written pages are in memory");
        drop(mapping);
        assert_eq!(std::fs::read(&path).unwrap()[4096], 9, "written through to the file");
        std::fs::remove_file(path).unwrap();
    }
}
