//! The worker's registered buffer region.
//!
//! One anonymous mapping per worker, registered once with io_uring as fixed
//! buffer 0, carved into 64 KiB units by a first-fit bitmap. A buffer is a
//! contiguous run of units, so READ_FIXED/WRITE_FIXED address it directly.
//! The mapping is page-aligned, which satisfies O_DIRECT memory alignment.
//!
//! A request larger than the whole region (only possible with a huge
//! `--max-payload`) gets an aligned heap buffer and plain READ/WRITE; that
//! fallback is counted so it is visible, never silent.

use std::alloc::Layout;
use std::ptr::NonNull;

/// Allocation unit. Most NBD I/O is 4 KiB-1 MiB; 64 KiB keeps the bitmap at
/// 1024 bits for a 64 MiB region while wasting little on small requests.
pub const UNIT_BYTES: usize = 64 * 1024;
/// Heap fallbacks are page-aligned like the region.
const HEAP_ALIGN: usize = 4096;

pub struct BufferPool {
    base: NonNull<u8>,
    bytes: usize,
    /// One bit per unit, set while allocated. Invariant: bits past `units` are set.
    used: Vec<u64>,
    units: usize,
    registered: bool,
    pub heap_fallbacks: u64,
}

/// A buffer owned by one request until its final completion.
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    origin: Origin,
}

enum Origin {
    Pool { first: usize, units: usize },
    Heap(Layout),
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the Buffer's lifetime (pool
        // memory outlives every Buffer; heap memory is freed only in `free`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Whether READ_FIXED/WRITE_FIXED may address this buffer.
    pub fn is_registered(&self, pool: &BufferPool) -> bool {
        pool.registered && matches!(self.origin, Origin::Pool { .. })
    }
}

impl std::ops::Index<std::ops::Range<usize>> for Buffer {
    type Output = [u8];
    fn index(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.as_slice()[range]
    }
}

impl BufferPool {
    pub fn new(bytes: usize) -> std::io::Result<Self> {
        let units = (bytes / UNIT_BYTES).max(1);
        let bytes = units * UNIT_BYTES;
        // SAFETY: anonymous private mapping; no fd, no aliasing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<u8>()).expect("mmap never returns null on success");
        let mut used = vec![0u64; units.div_ceil(64)];
        if !units.is_multiple_of(64) {
            *used.last_mut().expect("at least one word") = !0u64 << (units % 64);
        }
        Ok(Self { base, bytes, used, units, registered: false, heap_fallbacks: 0 })
    }

    /// The iovec to register as fixed buffer 0.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.base.as_ptr().cast(), iov_len: self.bytes }
    }

    pub fn set_registered(&mut self, registered: bool) {
        self.registered = registered;
    }

    /// A buffer of at least `len` bytes, or None when the region is
    /// momentarily full (the caller stalls until a buffer is freed).
    pub fn alloc(&mut self, len: usize) -> Option<Buffer> {
        let units = len.div_ceil(UNIT_BYTES).max(1);
        if units > self.units {
            return Some(self.heap(len));
        }
        let first = self.find_run(units)?;
        for unit in first..first + units {
            self.used[unit / 64] |= 1 << (unit % 64);
        }
        // SAFETY: first + units <= self.units, so the offset is inside the mapping.
        let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(first * UNIT_BYTES)) };
        Some(Buffer { ptr, len: units * UNIT_BYTES, origin: Origin::Pool { first, units } })
    }

    pub fn free(&mut self, buffer: Buffer) {
        match buffer.origin {
            Origin::Pool { first, units } => {
                for unit in first..first + units {
                    debug_assert!(self.used[unit / 64] & (1 << (unit % 64)) != 0, "double free");
                    self.used[unit / 64] &= !(1 << (unit % 64));
                }
            }
            // SAFETY: allocated in `heap` with exactly this layout.
            Origin::Heap(layout) => unsafe { std::alloc::dealloc(buffer.ptr.as_ptr(), layout) },
        }
    }

    /// Units currently free (for tests and stats).
    pub fn free_units(&self) -> usize {
        self.used.iter().map(|w| w.count_zeros() as usize).sum()
    }

    fn find_run(&self, units: usize) -> Option<usize> {
        let mut run_start = 0;
        let mut run = 0;
        let mut unit = 0;
        while unit < self.units {
            let word = self.used[unit / 64];
            if unit % 64 == 0 && word == !0 {
                run = 0;
                unit += 64;
                run_start = unit;
                continue;
            }
            if word & (1 << (unit % 64)) == 0 {
                run += 1;
                if run == units {
                    return Some(run_start);
                }
            } else {
                run = 0;
                run_start = unit + 1;
            }
            unit += 1;
        }
        None
    }

    fn heap(&mut self, len: usize) -> Buffer {
        self.heap_fallbacks += 1;
        let layout = Layout::from_size_align(len.next_multiple_of(HEAP_ALIGN), HEAP_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size (len > region > 0).
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buffer { ptr, len: layout.size(), origin: Origin::Heap(layout) }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size and no
        // Buffer outlives the worker that owns the pool.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_contiguous_runs_and_reuses_freed_units() {
        let mut pool = BufferPool::new(8 * UNIT_BYTES).unwrap();
        let a = pool.alloc(1).unwrap();
        let b = pool.alloc(3 * UNIT_BYTES).unwrap();
        assert_eq!(b.len(), 3 * UNIT_BYTES);
        assert_eq!(pool.free_units(), 4);
        assert!(pool.alloc(5 * UNIT_BYTES).is_none(), "only 4 units free");
        let a_ptr = a.as_ptr();
        pool.free(a);
        let c = pool.alloc(UNIT_BYTES).unwrap();
        assert_eq!(c.as_ptr(), a_ptr, "first fit reuses the freed unit");
        pool.free(b);
        pool.free(c);
        assert_eq!(pool.free_units(), 8);
    }

    #[test]
    fn buffers_are_page_aligned_and_writable() {
        let mut pool = BufferPool::new(4 * UNIT_BYTES).unwrap();
        let mut b = pool.alloc(4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        b.as_mut_slice()[UNIT_BYTES - 1] = 7;
        assert_eq!(b.as_slice()[UNIT_BYTES - 1], 7);
        pool.free(b);
    }

    #[test]
    fn oversized_requests_fall_back_to_the_heap_visibly() {
        let mut pool = BufferPool::new(2 * UNIT_BYTES).unwrap();
        pool.set_registered(true);
        let b = pool.alloc(3 * UNIT_BYTES).unwrap();
        assert_eq!(pool.heap_fallbacks, 1);
        assert!(!b.is_registered(&pool));
        pool.free(b);
        let p = pool.alloc(10).unwrap();
        assert!(p.is_registered(&pool));
        pool.free(p);
    }

    #[test]
    fn runs_cross_word_boundaries() {
        let mut pool = BufferPool::new(130 * UNIT_BYTES).unwrap();
        let first = pool.alloc(62 * UNIT_BYTES).unwrap();
        let spanning = pool.alloc(4 * UNIT_BYTES).unwrap();
        // SAFETY: both pointers lie in one mapping.
        let gap = unsafe { spanning.as_ptr().offset_from(first.as_ptr()) };
        assert_eq!(gap as usize, 62 * UNIT_BYTES);
        pool.free(first);
        pool.free(spanning);
        assert_eq!(pool.free_units(), 130);
    }
}
