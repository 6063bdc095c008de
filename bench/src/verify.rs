//! What `--verify` remembers about one connection's stripe: the generation
//! last written to each block and whether a request on it is in flight.
//!
//! A block with a request in flight is never picked again until that
//! request completes, so the expected content of every read is exact.
//! Stripes are per connection (see `workload.rs`), so a table has a single
//! owner and needs no atomics.

/// Blocks a whole run may track: 4 bytes each, so 256 MiB at most.
pub const VERIFY_BLOCKS_MAX: u64 = 1 << 26;
const BUSY: u32 = 1 << 31;
/// Generations live in the low 31 bits; 0 means "never written by this run".
const GENERATION_MASK: u32 = BUSY - 1;

pub struct VerifyTable {
    /// Per stripe index: `BUSY` | generation.
    entries: Vec<u32>,
}

impl VerifyTable {
    pub fn new(blocks: u64) -> Self {
        assert!(blocks <= VERIFY_BLOCKS_MAX, "checked when the job is built");
        VerifyTable { entries: vec![0; blocks as usize] }
    }

    pub fn is_busy(&self, k: u64) -> bool {
        self.entries[k as usize] & BUSY != 0
    }

    /// Marks `k` busy; it must not be already.
    pub fn claim(&mut self, k: u64) {
        assert!(!self.is_busy(k), "block {k} claimed twice");
        self.entries[k as usize] |= BUSY;
    }

    /// Releases `k`, recording `written` as its generation when a write
    /// succeeded.
    pub fn release(&mut self, k: u64, written: Option<u32>) {
        assert!(self.is_busy(k), "block {k} released but not claimed");
        let entry = &mut self.entries[k as usize];
        *entry = written.unwrap_or(*entry & GENERATION_MASK);
    }

    /// What a read of `k` must find (`None`: never written by this run).
    pub fn expected(&self, k: u64) -> Option<u32> {
        Some(self.entries[k as usize] & GENERATION_MASK).filter(|&g| g != 0)
    }

    /// The generation the next write of `k` stamps (wraps past 0).
    pub fn next_generation(&self, k: u64) -> u32 {
        let current = self.entries[k as usize] & GENERATION_MASK;
        if current == GENERATION_MASK { 1 } else { current + 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_write_release_read() {
        let mut t = VerifyTable::new(4);
        assert_eq!(t.expected(2), None);
        assert_eq!(t.next_generation(2), 1);
        t.claim(2);
        assert!(t.is_busy(2));
        t.release(2, Some(1));
        assert!(!t.is_busy(2));
        assert_eq!(t.expected(2), Some(1));
        t.claim(2);
        t.release(2, None);
        assert_eq!(t.expected(2), Some(1), "a read keeps the generation");
    }

    #[test]
    fn generations_wrap_without_zero() {
        let mut t = VerifyTable::new(1);
        t.claim(0);
        t.release(0, Some(GENERATION_MASK));
        assert_eq!(t.next_generation(0), 1);
    }

    #[test]
    #[should_panic(expected = "claimed twice")]
    fn double_claim_is_a_bug() {
        let mut t = VerifyTable::new(1);
        t.claim(0);
        t.claim(0);
    }
}
