//! Memory for copies on the ring: a worker's few chunk-sized buffers that
//! mutations borrow while they copy a chunk's old content (up into a
//! layered export's top, or into a snapshot's scratch file). Page-aligned (one anonymous mapping),
//! so O_DIRECT accepts them; a request holds one from its first copy-up
//! read until its last copy-up write completes, and waits (defers) while
//! all are taken. The worker owns them and drops them after its ring.

use std::cell::Cell;
use std::ptr::NonNull;

use crate::backend::io::IoMemory;

use super::layers::CHUNK_BYTES;

/// Buffers per worker: copy-ups in flight at once on one worker.
pub const COPY_BUFFERS: usize = 16;

pub struct CopyBuffers {
    base: NonNull<u8>,
    /// Bit `i` set: buffer `i` is free.
    free: Cell<u32>,
}

impl CopyBuffers {
    pub fn new() -> std::io::Result<Self> {
        let len = COPY_BUFFERS * CHUNK_BYTES as usize;
        // SAFETY: anonymous private mapping; no fd, no aliasing. Pages are
        // only committed once a copy-up touches them.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast()).expect("mmap never returns null on success");
        Ok(Self { base, free: Cell::new(((1u64 << COPY_BUFFERS) - 1) as u32) })
    }

    /// A free buffer's index, now the caller's.
    pub fn take(&self) -> Option<u8> {
        let free = self.free.get();
        if free == 0 {
            return None;
        }
        let slot = free.trailing_zeros();
        self.free.set(free & !(1 << slot));
        Some(slot as u8)
    }

    /// Gives back a buffer no operation uses any more.
    pub fn give(&self, slot: u8) {
        debug_assert_eq!(self.free.get() & (1 << slot), 0, "a buffer is given back once");
        self.free.set(self.free.get() | (1 << slot));
    }

    fn start(&self, slot: u8) -> *mut u8 {
        assert!((slot as usize) < COPY_BUFFERS);
        // SAFETY: in bounds of the mapping (asserted).
        unsafe { self.base.as_ptr().add(slot as usize * CHUNK_BYTES as usize) }
    }

    /// `len` bytes of buffer `slot` from `at`, as operation memory.
    pub fn memory(&self, slot: u8, at: usize, len: usize) -> IoMemory {
        assert!(at + len <= CHUNK_BYTES as usize, "inside one buffer");
        // SAFETY: in bounds (asserted).
        let ptr = unsafe { self.start(slot).add(at) };
        IoMemory { ptr, len: len as u32, fixed: None }
    }

    /// Buffer `slot` as bytes, for the holder while no operation uses it.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes(&self, slot: u8) -> &mut [u8] {
        // SAFETY: the slot is taken by exactly one request, which calls
        // this only between its operations on the buffer, so no other
        // reference to these bytes (and no kernel write) exists meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.start(slot), CHUNK_BYTES as usize) }
    }
}

impl Drop for CopyBuffers {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; no operation on it is in
        // flight once its owner's ring is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), COPY_BUFFERS * CHUNK_BYTES as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_handed_out_once_until_given_back() {
        let buffers = CopyBuffers::new().unwrap();
        let taken: Vec<u8> = (0..COPY_BUFFERS).map(|_| buffers.take().unwrap()).collect();
        assert_eq!(taken, (0..COPY_BUFFERS as u8).collect::<Vec<_>>());
        assert_eq!(buffers.take(), None);
        buffers.bytes(3).fill(7);
        buffers.give(3);
        assert_eq!(buffers.take(), Some(3));
        assert_eq!(buffers.memory(3, 10, 20).len, 20);
    }
}
