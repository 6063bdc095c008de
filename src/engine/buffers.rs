//! Request buffers: registered chunks that grow with load, within one
//! server-wide budget, and go back to the system when idle.
//!
//! A worker maps 4 MiB chunks as it needs them and registers each with its
//! ring at a slot of a sparse fixed-buffer table, so READ_FIXED/WRITE_FIXED
//! skip per-I/O page pinning. A chunk is carved into 64 KiB units by a
//! one-word bitmap; a buffer is a contiguous run of units in one chunk.
//! Requests larger than a chunk get a mapping of their own (unregistered:
//! at that size the per-I/O pinning is small next to the transfer), kept for
//! reuse while the worker is busy.
//!
//! Every mapped byte is charged to the [`Budget`], which all workers share;
//! charging happens per chunk, never per request, so the hot path touches no
//! shared cache line. Chunks and cached mappings unused for two housekeeping
//! ticks are unmapped and their bytes returned, so an idle server holds
//! nothing. Who may take buffers when the budget runs low is decided by
//! [`BufferPool::alloc`]: see [`Refusal`].

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Allocation unit within a chunk.
pub const UNIT_BYTES: usize = 64 * 1024;
/// A chunk is one bitmap word of units.
pub const CHUNK_BYTES: usize = 64 * UNIT_BYTES;
/// Housekeeping ticks a chunk or cached mapping stays unused before it is
/// unmapped.
const IDLE_TICKS_MAX: u8 = 2;
/// Large mappings kept for reuse per worker.
const LARGE_CACHE_MAX: usize = 4;

/// The server-wide limit on buffer memory, and the shares that keep one
/// client from starving the others. Shared by every worker.
pub struct Budget {
    limit_bytes: usize,
    used_bytes: AtomicUsize,
    /// Kept for connections that hold no buffers yet, so a new client can
    /// always get its first small request in even when others hold the rest.
    reserve_bytes: usize,
    /// The most one connection may hold at once.
    conn_share_bytes: usize,
    memlock_warned: AtomicBool,
}

impl Budget {
    /// `request_bytes_max` is the largest buffer one request can need; a
    /// connection's share always fits one.
    pub fn new(limit_bytes: usize, request_bytes_max: usize) -> Self {
        let reserve_bytes = (limit_bytes / 8).max(2 * CHUNK_BYTES);
        let conn_share_bytes = (limit_bytes / 8).max(request_bytes_max);
        Self {
            limit_bytes,
            used_bytes: AtomicUsize::new(0),
            reserve_bytes,
            conn_share_bytes,
            memlock_warned: AtomicBool::new(false),
        }
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes.load(Ordering::Relaxed)
    }

    fn free_bytes(&self) -> usize {
        self.limit_bytes.saturating_sub(self.used_bytes())
    }

    fn try_charge(&self, bytes: usize) -> bool {
        let mut used = self.used_bytes.load(Ordering::Relaxed);
        loop {
            if used + bytes > self.limit_bytes {
                return false;
            }
            match self.used_bytes.compare_exchange_weak(used, used + bytes, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn refund(&self, bytes: usize) {
        let was = self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(was >= bytes, "refunded more than charged");
    }

    /// One line for the whole server, the first time registration hits
    /// the locked-memory limit.
    fn warn_memlock(&self, error: &io::Error) {
        if !self.memlock_warned.swap(true, Ordering::Relaxed) {
            crate::note!(
                "registering I/O buffers failed ({error}): the locked-memory limit is too low \
                 (ulimit -l; LimitMEMLOCK= under systemd) or CAP_IPC_LOCK is missing. Serving on with \
                 unregistered buffers, which costs CPU per I/O; raise the limit, or lower --buffers to fit it."
            );
        }
    }
}

/// Registers chunks with the ring's sparse buffer table (the ring
/// implements it; tests use a stand-in).
pub trait Registrar {
    /// Makes `iovec` fixed buffer `slot`.
    fn register(&self, slot: u16, iovec: libc::iovec) -> io::Result<()>;
    /// Empties fixed buffer `slot`.
    fn unregister(&self, slot: u16);
}

/// Why a buffer could not be had now. The connection waits (stalls) until
/// buffers are freed; either way it is never failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The connection already holds its share: it waits for its own
    /// requests to finish (and for its client to read their replies).
    OwnShare,
    /// The budget is low: what is left is kept for connections holding
    /// nothing. Buffers freed anywhere (any worker) may end the wait.
    Pressure,
}

struct Chunk {
    base: NonNull<u8>,
    /// One bit per unit, set while allocated.
    used: u64,
    /// Fixed-buffer slot, if registered.
    slot: Option<u16>,
    /// Allocated from since the last housekeeping tick.
    touched: bool,
    idle_ticks: u8,
}

struct Large {
    base: NonNull<u8>,
    bytes: usize,
    idle_ticks: u8,
}

/// A buffer owned by one request until its final completion.
#[derive(Debug)]
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    origin: Origin,
}

#[derive(Debug, Clone, Copy)]
enum Origin {
    Chunk { chunk: u16, first: u8, units: u8, slot: Option<u16> },
    Large,
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
        // SAFETY: ptr is valid for len bytes for the Buffer's lifetime (the
        // pool unmaps a chunk or large mapping only once no Buffer is in it).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The fixed-buffer index READ_FIXED/WRITE_FIXED may use, if registered.
    pub fn fixed_index(&self) -> Option<u16> {
        match self.origin {
            Origin::Chunk { slot, .. } => slot,
            Origin::Large => None,
        }
    }
}

impl std::ops::Index<std::ops::Range<usize>> for Buffer {
    type Output = [u8];
    fn index(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.as_slice()[range]
    }
}

pub struct BufferPool {
    budget: std::sync::Arc<Budget>,
    /// Indexed by position; the registration slot equals the position when
    /// registered. None: never mapped, or released.
    chunks: Vec<Option<Chunk>>,
    /// Slots in the ring's sparse table (0: nothing can be registered).
    slots: u16,
    large: Vec<Large>,
    /// Bytes of mapped chunks and cached large mappings not handed out.
    free_bytes: usize,
}

fn map(bytes: usize, populate: bool) -> io::Result<NonNull<u8>> {
    let populate = if populate { libc::MAP_POPULATE } else { 0 };
    // SAFETY: anonymous private mapping; no fd, no aliasing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | populate,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(addr.cast::<u8>()).expect("mmap never returns null on success"))
}

fn unmap(base: NonNull<u8>, bytes: usize) {
    // SAFETY: `base` was mapped by `map` with this size and no Buffer in it
    // is alive (callers check), so nothing refers to it any more.
    unsafe { libc::munmap(base.as_ptr().cast(), bytes) };
}

/// A run of `units` clear bits in `used`, as its first index.
fn find_run(used: u64, units: u32) -> Option<u32> {
    let mask = if units == 64 { u64::MAX } else { (1u64 << units) - 1 };
    (0..=64 - units).find(|&first| used & (mask << first) == 0)
}

impl BufferPool {
    /// `slots`: the size of the ring's sparse fixed-buffer table, 0 if the
    /// kernel offers none.
    pub fn new(budget: std::sync::Arc<Budget>, slots: u16) -> Self {
        Self { budget, chunks: Vec::new(), slots, large: Vec::new(), free_bytes: 0 }
    }

    /// Fixed-buffer slots a worker asks the ring for: enough for the whole
    /// budget in chunks, within the kernel's table limit.
    pub fn slots_wanted(budget: &Budget) -> u16 {
        (budget.limit_bytes() / CHUNK_BYTES + 1).min(16384) as u16
    }

    /// A buffer of at least `len` bytes for a connection that already holds
    /// `held` bytes, or why not now.
    pub fn alloc(&mut self, len: usize, held: usize, ring: &dyn Registrar) -> Result<Buffer, Refusal> {
        let units = len.div_ceil(UNIT_BYTES).max(1);
        let bytes = units * UNIT_BYTES;
        if held + bytes > self.budget.conn_share_bytes {
            return Err(Refusal::OwnShare);
        }
        // A connection holding nothing may dip into the reserve for one small
        // request; everyone else leaves it alone.
        let newcomer = held == 0 && bytes <= CHUNK_BYTES;
        let headroom = self.budget.free_bytes() + self.free_bytes;
        if !newcomer && headroom < bytes + self.budget.reserve_bytes {
            return Err(Refusal::Pressure);
        }
        let mut buffer =
            if bytes > CHUNK_BYTES { self.alloc_large(bytes) } else { self.alloc_units(units as u32, ring) };
        if buffer.is_none() && self.release_idle(ring) {
            // Idle caches held the budget (cached mappings of the wrong
            // size, empty chunks): they must never keep a request waiting,
            // or connections stall on memory nobody uses.
            buffer = if bytes > CHUNK_BYTES { self.alloc_large(bytes) } else { self.alloc_units(units as u32, ring) };
        }
        let buffer = buffer.ok_or(Refusal::Pressure)?;
        self.free_bytes -= buffer.len;
        Ok(buffer)
    }

    fn alloc_units(&mut self, units: u32, ring: &dyn Registrar) -> Option<Buffer> {
        let found = self.chunks.iter().enumerate().find_map(|(index, chunk)| {
            let chunk = chunk.as_ref()?;
            find_run(chunk.used, units).map(|first| (index, first))
        });
        let (index, first) = match found {
            Some(found) => found,
            None => (self.grow(ring)?, 0),
        };
        let chunk = self.chunks[index].as_mut().expect("found or grown");
        let mask = if units == 64 { u64::MAX } else { (1u64 << units) - 1 };
        chunk.used |= mask << first;
        chunk.touched = true;
        // SAFETY: first + units <= 64 units, so the offset is inside the chunk.
        let ptr = unsafe { NonNull::new_unchecked(chunk.base.as_ptr().add(first as usize * UNIT_BYTES)) };
        let origin = Origin::Chunk { chunk: index as u16, first: first as u8, units: units as u8, slot: chunk.slot };
        Some(Buffer { ptr, len: units as usize * UNIT_BYTES, origin })
    }

    /// Maps and registers one more chunk; its index.
    fn grow(&mut self, ring: &dyn Registrar) -> Option<usize> {
        let index = match self.chunks.iter().position(Option::is_none) {
            Some(index) => index,
            None if self.chunks.len() < u16::MAX as usize => {
                self.chunks.push(None);
                self.chunks.len() - 1
            }
            None => return None,
        };
        if !self.budget.try_charge(CHUNK_BYTES) {
            return None;
        }
        // Populated up front: registration pins every page anyway.
        let base = match map(CHUNK_BYTES, true) {
            Ok(base) => base,
            Err(_) => {
                self.budget.refund(CHUNK_BYTES);
                return None;
            }
        };
        let slot = (index < usize::from(self.slots)).then_some(index as u16).filter(|&slot| {
            let iovec = libc::iovec { iov_base: base.as_ptr().cast(), iov_len: CHUNK_BYTES };
            match ring.register(slot, iovec) {
                Ok(()) => true,
                Err(e) => {
                    self.budget.warn_memlock(&e);
                    false
                }
            }
        });
        self.chunks[index] = Some(Chunk { base, used: 0, slot, touched: true, idle_ticks: 0 });
        self.free_bytes += CHUNK_BYTES;
        Some(index)
    }

    fn alloc_large(&mut self, bytes: usize) -> Option<Buffer> {
        // Reuse a cached mapping that is big enough but not wastefully so.
        let cached = self.large.iter().position(|l| l.bytes >= bytes && l.bytes <= 2 * bytes);
        let (base, mapped) = match cached {
            Some(index) => {
                let large = self.large.swap_remove(index);
                (large.base, large.bytes)
            }
            None => {
                if !self.budget.try_charge(bytes) {
                    return None;
                }
                // Not populated: pages are touched as payload arrives, so a
                // client that announces 32 MiB and sends little costs little.
                match map(bytes, false) {
                    Ok(base) => {
                        self.free_bytes += bytes;
                        (base, bytes)
                    }
                    Err(_) => {
                        self.budget.refund(bytes);
                        return None;
                    }
                }
            }
        };
        Some(Buffer { ptr: base, len: mapped, origin: Origin::Large })
    }

    pub fn free(&mut self, buffer: Buffer) {
        self.free_bytes += buffer.len;
        match buffer.origin {
            Origin::Chunk { chunk, first, units, .. } => {
                let chunk = self.chunks[usize::from(chunk)].as_mut().expect("buffer from a live chunk");
                let mask = if units == 64 { u64::MAX } else { (1u64 << units) - 1 };
                debug_assert_eq!(chunk.used & (mask << first), mask << first, "double free");
                chunk.used &= !(mask << first);
            }
            Origin::Large => {
                self.large.push(Large { base: buffer.ptr, bytes: buffer.len, idle_ticks: 0 });
                if self.large.len() > LARGE_CACHE_MAX {
                    let oldest = self.large.remove(0);
                    self.release_large(oldest);
                }
            }
        }
    }

    fn release_large(&mut self, large: Large) {
        unmap(large.base, large.bytes);
        self.free_bytes -= large.bytes;
        self.budget.refund(large.bytes);
    }

    /// Unmaps every cached large mapping and every chunk with nothing in
    /// use, returning their bytes to the budget. True if anything went.
    fn release_idle(&mut self, ring: &dyn Registrar) -> bool {
        let mut released = false;
        while let Some(large) = self.large.pop() {
            self.release_large(large);
            released = true;
        }
        for entry in &mut self.chunks {
            if entry.as_ref().is_some_and(|chunk| chunk.used == 0) {
                release_chunk(entry.take().expect("checked"), ring, &self.budget, &mut self.free_bytes);
                released = true;
            }
        }
        released
    }

    /// Called about once a second: unmaps chunks and cached mappings that
    /// have not been used for `IDLE_TICKS_MAX` ticks. Returns whether the
    /// pool still holds memory (and so wants more ticks).
    pub fn housekeeping(&mut self, ring: &dyn Registrar) -> bool {
        for entry in &mut self.chunks {
            let Some(chunk) = entry else { continue };
            if chunk.used != 0 || chunk.touched {
                chunk.touched = false;
                chunk.idle_ticks = 0;
                continue;
            }
            chunk.idle_ticks += 1;
            if chunk.idle_ticks >= IDLE_TICKS_MAX {
                release_chunk(entry.take().expect("checked"), ring, &self.budget, &mut self.free_bytes);
            }
        }
        let mut index = 0;
        while index < self.large.len() {
            self.large[index].idle_ticks += 1;
            if self.large[index].idle_ticks > IDLE_TICKS_MAX {
                let large = self.large.swap_remove(index);
                self.release_large(large);
            } else {
                index += 1;
            }
        }
        self.chunks.iter().any(Option::is_some) || !self.large.is_empty()
    }

    /// Bytes this pool has mapped (chunks and large mappings, in use or not).
    pub fn mapped_bytes(&self) -> usize {
        let chunks = self.chunks.iter().flatten().count() * CHUNK_BYTES;
        chunks + self.large.iter().map(|l| l.bytes).sum::<usize>()
    }
}

/// Unregisters and unmaps an unused chunk and returns it to the budget.
fn release_chunk(chunk: Chunk, ring: &dyn Registrar, budget: &Budget, free_bytes: &mut usize) {
    if let Some(slot) = chunk.slot {
        ring.unregister(slot);
    }
    unmap(chunk.base, CHUNK_BYTES);
    *free_bytes -= CHUNK_BYTES;
    budget.refund(CHUNK_BYTES);
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        for chunk in self.chunks.drain(..).flatten() {
            unmap(chunk.base, CHUNK_BYTES);
            self.budget.refund(CHUNK_BYTES);
        }
        for large in std::mem::take(&mut self.large) {
            unmap(large.base, large.bytes);
            self.budget.refund(large.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Arc;

    /// Records registrations instead of talking to a ring.
    #[derive(Default)]
    struct Recorder {
        registered: RefCell<Vec<u16>>,
        fail: bool,
    }

    impl Registrar for Recorder {
        fn register(&self, slot: u16, _iovec: libc::iovec) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            self.registered.borrow_mut().push(slot);
            Ok(())
        }
        fn unregister(&self, slot: u16) {
            self.registered.borrow_mut().retain(|&s| s != slot);
        }
    }

    fn pool(limit: usize) -> (BufferPool, Arc<Budget>) {
        let budget = Arc::new(Budget::new(limit, 32 << 20));
        (BufferPool::new(Arc::clone(&budget), 64), budget)
    }

    #[test]
    fn chunks_are_mapped_on_demand_registered_and_reused() {
        let (mut pool, budget) = pool(256 << 20);
        let ring = Recorder::default();
        assert_eq!(budget.used_bytes(), 0, "nothing mapped at start");
        let a = pool.alloc(1, 0, &ring).unwrap();
        let b = pool.alloc(3 * UNIT_BYTES, 0, &ring).unwrap();
        assert_eq!(b.len(), 3 * UNIT_BYTES);
        assert_eq!((a.fixed_index(), b.fixed_index()), (Some(0), Some(0)));
        assert_eq!(budget.used_bytes(), CHUNK_BYTES);
        let a_ptr = a.as_ptr();
        pool.free(a);
        let c = pool.alloc(UNIT_BYTES, 0, &ring).unwrap();
        assert_eq!(c.as_ptr(), a_ptr, "first fit reuses the freed unit");
        let whole = pool.alloc(CHUNK_BYTES, 0, &ring).unwrap();
        assert_eq!(whole.fixed_index(), Some(1), "a second chunk");
        assert_eq!(*ring.registered.borrow(), vec![0, 1]);
        for buffer in [b, c, whole] {
            pool.free(buffer);
        }
    }

    #[test]
    fn idle_chunks_and_large_mappings_go_back_to_the_budget() {
        let (mut pool, budget) = pool(256 << 20);
        let ring = Recorder::default();
        let small = pool.alloc(4096, 0, &ring).unwrap();
        let large = pool.alloc(6 << 20, 0, &ring).unwrap();
        assert_eq!(large.fixed_index(), None, "large buffers are unregistered");
        assert_eq!(budget.used_bytes(), CHUNK_BYTES + (6 << 20));
        pool.free(small);
        pool.free(large);
        let again = pool.alloc(5 << 20, 0, &ring).unwrap();
        assert_eq!(budget.used_bytes(), CHUNK_BYTES + (6 << 20), "cached mapping reused");
        pool.free(again);
        while pool.housekeeping(&ring) {}
        assert_eq!(budget.used_bytes(), 0);
        assert!(ring.registered.borrow().is_empty(), "unregistered before unmapping");
    }

    /// Cached mappings too small for a request, and empty chunks, once
    /// held the budget a request needed: the connection stalled on memory
    /// nobody used, for as long as retries kept the cache fresh.
    #[test]
    fn idle_caches_never_keep_a_request_waiting() {
        let (mut pool, budget) = pool(64 << 20);
        let ring = Recorder::default();
        let small = pool.alloc(4096, 0, &ring).unwrap();
        let first = pool.alloc(26 << 20, 0, &ring).unwrap();
        let second = pool.alloc(26 << 20, 0, &ring).unwrap();
        pool.free(small);
        pool.free(first);
        pool.free(second);
        assert!(budget.used_bytes() > (52 << 20), "all of it cached");
        let big = pool.alloc(30 << 20, 0, &ring).expect("the caches make way");
        assert_eq!(budget.used_bytes(), 30 << 20, "the cached mappings and the empty chunk went back");
        pool.free(big);
    }

    #[test]
    fn a_connection_is_held_to_its_share() {
        let (mut pool, budget) = pool(512 << 20);
        let ring = Recorder::default();
        let share = budget.conn_share_bytes;
        assert_eq!(share, 64 << 20);
        assert_eq!(pool.alloc(UNIT_BYTES, share, &ring).unwrap_err(), Refusal::OwnShare);
        let ok = pool.alloc(UNIT_BYTES, share - UNIT_BYTES, &ring).unwrap();
        pool.free(ok);
    }

    #[test]
    fn the_reserve_is_kept_for_newcomers_with_small_requests() {
        let (mut pool, budget) = pool(64 << 20);
        let ring = Recorder::default();
        // Two greedy connections take what the reserve leaves.
        let first = pool.alloc(32 << 20, 0, &ring).unwrap();
        let mut held = Vec::new();
        let mut bytes = 0;
        while let Ok(b) = pool.alloc(CHUNK_BYTES, bytes + 1, &ring) {
            bytes += b.len();
            held.push(b);
        }
        assert_eq!(pool.alloc(CHUNK_BYTES, bytes + 1, &ring).unwrap_err(), Refusal::Pressure);
        assert!(budget.free_bytes() + pool.free_bytes >= budget.reserve_bytes);
        assert_eq!(pool.alloc(8 << 20, 0, &ring).unwrap_err(), Refusal::Pressure, "large requests wait");
        let newcomer = pool.alloc(4096, 0, &ring).expect("a newcomer's small request gets in");
        pool.free(newcomer);
        pool.free(first);
        for b in held {
            pool.free(b);
        }
    }

    #[test]
    fn registration_failure_leaves_chunks_usable_unregistered() {
        let (mut pool, _) = pool(64 << 20);
        let ring = Recorder { fail: true, ..Default::default() };
        let b = pool.alloc(4096, 0, &ring).unwrap();
        assert_eq!(b.fixed_index(), None);
        pool.free(b);
    }

    #[test]
    fn runs_are_found_anywhere_in_a_word() {
        assert_eq!(find_run(0, 64), Some(0));
        assert_eq!(find_run(1, 64), None);
        assert_eq!(find_run(0b1011, 2), Some(4));
        assert_eq!(find_run(u64::MAX >> 1, 1), Some(63));
    }
}
