//! Ordering for mutations that share a partially covered block.
//!
//! An unaligned WRITE on an O_DIRECT export is a read-modify-write of its
//! partial head and tail blocks. Anything else that changes other bytes of
//! such a block in between (another unaligned write, a WRITE_ZEROES or TRIM
//! that fallocates part of it, a buffered write near the unaligned end) would
//! be undone when the stale copy is written back. So every mutation takes
//! the locks of the blocks it covers only partially for as long as it works
//! on them; mutations of whole blocks need none, because two requests that
//! share a whole block also share bytes, and overlapping writes in flight
//! together have no defined order in NBD.
//!
//! The table is shared by every worker and every export of one image, so it
//! is a fixed array of atomic stripes: a block maps to a stripe by hash, a
//! collision only serialises two unrelated mutations, and taking or dropping
//! a lock is one compare-and-swap with no allocation and no syscall.

use std::sync::atomic::{AtomicBool, Ordering};

/// Stripes per image: collisions stay rare with thousands of requests in
/// flight, and the table is 4 KiB.
const STRIPES: usize = 4096;
const STRIPE_SHIFT: u32 = 64 - STRIPES.trailing_zeros();
const _: () = assert!(STRIPES.is_power_of_two() && STRIPES <= u16::MAX as usize + 1);

pub struct BlockLocks {
    stripes: Box<[AtomicBool]>,
    /// The read-modify-write unit (the O_DIRECT alignment); 1 disables locking.
    block_bytes: u64,
    /// Bytes in the image: the short final block counts as covered whole
    /// when a mutation reaches the end.
    size_bytes: u64,
}

/// The stripes one request holds (its partial head and tail blocks), in
/// ascending order so two requests never wait on each other crosswise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockSet {
    stripes: [u16; 2],
    count: u8,
}

impl LockSet {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn held(&self) -> &[u16] {
        &self.stripes[..self.count as usize]
    }

    fn add(&mut self, stripe: u16) {
        if self.held().contains(&stripe) {
            return;
        }
        assert!((self.count as usize) < self.stripes.len(), "a range has at most two partial blocks");
        self.stripes[self.count as usize] = stripe;
        self.count += 1;
        self.stripes[..self.count as usize].sort_unstable();
    }
}

impl BlockLocks {
    pub fn new(block_bytes: u32, size_bytes: u64) -> Self {
        assert!(block_bytes.is_power_of_two());
        let stripes = (0..STRIPES).map(|_| AtomicBool::new(false)).collect();
        Self { stripes, block_bytes: u64::from(block_bytes), size_bytes }
    }

    /// The locks a mutation of `[offset, end)` needs: those of the blocks it
    /// covers in part.
    pub fn partial_blocks(&self, offset: u64, end: u64) -> LockSet {
        let mut set = LockSet::default();
        if self.block_bytes == 1 || offset >= end {
            return set;
        }
        let block = self.block_bytes;
        if !offset.is_multiple_of(block) {
            set.add(stripe_of(offset / block));
        }
        if !end.is_multiple_of(block) && end < self.size_bytes {
            set.add(stripe_of(end / block));
        }
        set
    }

    /// Takes every lock in `set`, or none of them (returns false; retry later).
    pub fn try_acquire(&self, set: &LockSet) -> bool {
        for (taken, &stripe) in set.held().iter().enumerate() {
            let lock = &self.stripes[usize::from(stripe)];
            if lock.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
                for &undo in &set.held()[..taken] {
                    self.stripes[usize::from(undo)].store(false, Ordering::Release);
                }
                return false;
            }
        }
        true
    }

    pub fn release(&self, set: &LockSet) {
        for &stripe in set.held() {
            let was = self.stripes[usize::from(stripe)].swap(false, Ordering::Release);
            debug_assert!(was, "released a block lock that was not held");
        }
    }
}

fn stripe_of(block: u64) -> u16 {
    // Fibonacci hashing: neighbouring blocks land on distant stripes.
    (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> STRIPE_SHIFT) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_partially_covered_blocks_are_locked() {
        let locks = BlockLocks::new(512, 1 << 20);
        assert!(locks.partial_blocks(0, 4096).is_empty(), "whole blocks");
        assert_eq!(locks.partial_blocks(100, 4096).held(), &[stripe_of(0)]);
        let both = locks.partial_blocks(100, 400);
        assert_eq!(both.count, 1, "head and tail in one block: {both:?}");
        assert_eq!(locks.partial_blocks(100, 700).held().len(), 2);
        assert!(BlockLocks::new(1, 1 << 20).partial_blocks(3, 7).is_empty(), "no alignment, no locks");
    }

    #[test]
    fn the_short_final_block_counts_as_whole_at_the_end() {
        let locks = BlockLocks::new(512, 1000);
        assert!(locks.partial_blocks(512, 1000).is_empty());
        assert_eq!(locks.partial_blocks(512, 900).held(), &[stripe_of(1)]);
    }

    #[test]
    fn sharing_a_block_serialises_and_release_frees() {
        let locks = BlockLocks::new(512, 1 << 20);
        let first = locks.partial_blocks(0, 100);
        let second = locks.partial_blocks(200, 300);
        assert!(locks.try_acquire(&first));
        assert!(!locks.try_acquire(&second), "same block");
        let elsewhere = locks.partial_blocks(8192 + 7, 8192 + 9);
        assert_ne!(stripe_of(16), stripe_of(0));
        assert!(locks.try_acquire(&elsewhere), "another block");
        locks.release(&elsewhere);
        locks.release(&first);
        assert!(locks.try_acquire(&second));
        locks.release(&second);
    }

    #[test]
    fn a_failed_acquire_takes_nothing() {
        let locks = BlockLocks::new(512, 1 << 20);
        let tail = locks.partial_blocks(1024 + 10, 1024 + 20);
        assert!(locks.try_acquire(&tail));
        let spanning = locks.partial_blocks(10, 1024 + 30);
        assert!(!locks.try_acquire(&spanning));
        let head_only = locks.partial_blocks(10, 20);
        assert!(locks.try_acquire(&head_only), "the head stripe was rolled back");
        locks.release(&head_only);
        locks.release(&tail);
    }
}
