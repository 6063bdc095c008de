//! What to send and when, pure: access patterns, the read/write mix, the
//! division of the region among connections, and open-loop pacing.
//!
//! The region is cut into `bs`-sized blocks. Connection `c` of `n` owns the
//! blocks `c, c + n, c + 2n, ...` (its stripe), so no two connections ever
//! touch the same block: that keeps `--verify` exact without any locking,
//! and interleaves sequential streams so their union is sequential too.

use std::time::{Duration, Instant};

use clap::ValueEnum;

use crate::pattern::splitmix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Workload {
    pub fn is_random(self) -> bool {
        matches!(self, Workload::Randread | Workload::Randwrite | Workload::Randrw)
    }

    /// Percentage of reads, given `--rwmix-read` (used by randrw only).
    pub fn read_percent(self, rwmix_read: u32) -> u32 {
        match self {
            Workload::Read | Workload::Randread => 100,
            Workload::Write | Workload::Randwrite => 0,
            Workload::Randrw => rwmix_read,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Randrw => "randrw",
        }
    }
}

/// wyrand: fast, small-state, good enough for offsets and coin flips.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut state = seed;
        Rng(splitmix64(&mut state))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..bound` (multiply-shift; the bias is below 2^-64 * bound).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// The blocks one connection owns: `first, first + stride, ...`, `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stripe {
    pub first: u64,
    pub stride: u64,
    pub count: u64,
}

impl Stripe {
    /// Connection `index` of `connections` over a region of `blocks` blocks.
    pub fn new(index: u64, connections: u64, blocks: u64) -> Self {
        assert!(index < connections);
        let count = if index < blocks { (blocks - index).div_ceil(connections) } else { 0 };
        Stripe { first: index, stride: connections, count }
    }

    /// The region-wide block number of the stripe's `k`-th block.
    pub fn block(&self, k: u64) -> u64 {
        debug_assert!(k < self.count);
        self.first + k * self.stride
    }
}

/// Chooses each request's block (an index into the stripe) and direction.
#[derive(Debug, Clone)]
pub struct Picker {
    count: u64,
    random: bool,
    /// Next sequential index. Invariant: `cursor < count`.
    cursor: u64,
    read_percent: u32,
    rng: Rng,
}

impl Picker {
    pub fn new(stripe: Stripe, random: bool, read_percent: u32, seed: u64) -> Self {
        assert!(read_percent <= 100);
        assert!(stripe.count > 0, "every connection owns at least one block");
        Picker { count: stripe.count, random, cursor: 0, read_percent, rng: Rng::new(seed) }
    }

    /// The next block index in the stripe (sequential wraps around).
    pub fn next_index(&mut self) -> u64 {
        if self.random {
            return self.rng.below(self.count);
        }
        let k = self.cursor;
        self.cursor = if k + 1 == self.count { 0 } else { k + 1 };
        k
    }

    pub fn next_is_read(&mut self) -> bool {
        match self.read_percent {
            100 => true,
            0 => false,
            p => self.rng.below(100) < u64::from(p),
        }
    }
}

/// Open-loop schedule. Requests are numbered across all connections,
/// request `j` is due at `start + j / rate`, and connection `i` of `n` sends
/// requests `i, i + n, i + 2n, ...`. Due times do not depend on when a slot
/// frees up, and latency is measured from them, so time spent waiting for
/// a slot counts (no coordinated omission).
///
/// The rate is kept in millihertz and times in picoseconds, all integer,
/// so schedules are exact (no drift, no off-by-one at the end of a run).
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    rate_millihertz: u128,
    index: u64,
    connections: u64,
    /// Requests already taken from this connection's schedule.
    taken: u64,
}

const PS_PER_SEC_TIMES_1000: u128 = 1_000_000_000_000 * 1000;

impl Pacer {
    pub fn new(start: Instant, rate_per_sec: f64, index: u64, connections: u64) -> Self {
        assert!(rate_per_sec > 0.0 && index < connections);
        let rate_millihertz = ((rate_per_sec * 1000.0).round() as u128).max(1);
        Pacer { start, rate_millihertz, index, connections, taken: 0 }
    }

    /// When the next request is due.
    pub fn due(&self) -> Instant {
        let j = u128::from(self.index) + u128::from(self.taken) * u128::from(self.connections);
        let ps = j * PS_PER_SEC_TIMES_1000 / self.rate_millihertz;
        self.start + Duration::from_nanos(u64::try_from(ps / 1000).unwrap_or(u64::MAX))
    }

    /// Takes the next due time from the schedule.
    pub fn take(&mut self) -> Instant {
        let due = self.due();
        self.taken += 1;
        due
    }

    /// Requests due strictly before `end` that were never taken (the
    /// backlog left when a run ends with the server behind schedule).
    pub fn untaken_before(&self, end: Instant) -> u64 {
        let span_ps = end.saturating_duration_since(self.start).as_nanos() * 1000;
        // Global requests j with j / rate < span: j < span * rate, i.e.
        // j <= ceil(span * rate) - 1.
        let limit = (span_ps * self.rate_millihertz).div_ceil(PS_PER_SEC_TIMES_1000);
        let index = u128::from(self.index);
        let due = if limit > index { (limit - 1 - index) / u128::from(self.connections) + 1 } else { 0 };
        u64::try_from(due).unwrap_or(u64::MAX).saturating_sub(self.taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_partition_the_region() {
        let blocks = 10;
        let stripes: Vec<_> = (0..3).map(|c| Stripe::new(c, 3, blocks)).collect();
        assert_eq!(stripes.iter().map(|s| s.count).collect::<Vec<_>>(), vec![4, 3, 3]);
        let mut all: Vec<u64> = stripes.iter().flat_map(|s| (0..s.count).map(|k| s.block(k))).collect();
        all.sort();
        assert_eq!(all, (0..blocks).collect::<Vec<_>>());
        assert_eq!(Stripe::new(4, 5, 3).count, 0, "more connections than blocks");
    }

    #[test]
    fn sequential_wraps_and_random_stays_in_range() {
        let stripe = Stripe::new(0, 1, 3);
        let mut seq = Picker::new(stripe, false, 100, 1);
        assert_eq!((0..7).map(|_| seq.next_index()).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2, 0]);
        let mut rnd = Picker::new(Stripe::new(0, 1, 1000), true, 100, 1);
        let picks: Vec<u64> = (0..10_000).map(|_| rnd.next_index()).collect();
        assert!(picks.iter().all(|&k| k < 1000));
        let distinct: std::collections::HashSet<_> = picks.iter().collect();
        assert!(distinct.len() > 990, "uniform enough: {} distinct", distinct.len());
    }

    #[test]
    fn rwmix_is_respected() {
        let stripe = Stripe::new(0, 1, 8);
        let mut mix = Picker::new(stripe, true, 70, 42);
        let reads = (0..100_000).filter(|_| mix.next_is_read()).count();
        assert!((69_000..71_000).contains(&reads), "{reads} reads of 100000");
        let mut all_reads = Picker::new(stripe, true, 100, 42);
        assert!((0..1000).all(|_| all_reads.next_is_read()));
        let mut no_reads = Picker::new(stripe, true, 0, 42);
        assert!((0..1000).all(|_| !no_reads.next_is_read()));
    }

    #[test]
    fn workload_mix() {
        assert_eq!(Workload::Read.read_percent(30), 100);
        assert_eq!(Workload::Randwrite.read_percent(30), 0);
        assert_eq!(Workload::Randrw.read_percent(30), 30);
        assert!(Workload::Randread.is_random() && !Workload::Write.is_random());
    }

    #[test]
    fn pacer_spaces_and_staggers_requests() {
        let start = Instant::now();
        // 1000/s over 2 connections: each gets 500/s, i.e. every 2 ms,
        // the second one shifted by 1 ms.
        let mut a = Pacer::new(start, 1000.0, 0, 2);
        let mut b = Pacer::new(start, 1000.0, 1, 2);
        assert_eq!(a.take() - start, Duration::ZERO);
        assert_eq!(a.take() - start, Duration::from_millis(2));
        assert_eq!(b.take() - start, Duration::from_millis(1));
        assert_eq!(b.due() - start, Duration::from_millis(3));
        // Due times do not depend on when they are taken: a late request
        // keeps its original due time, which is what latency counts from.
        let mut late = Pacer::new(start, 3.0, 0, 1);
        late.take();
        assert_eq!(late.take() - start, Duration::from_nanos(333_333_333));
        // Exact: at 30000/s the 120000th request is due at 4 s, not before.
        let mut exact = Pacer::new(start, 30000.0, 0, 1);
        exact.taken = 120_000;
        assert_eq!(exact.due() - start, Duration::from_secs(4));
        assert_eq!(exact.untaken_before(start + Duration::from_secs(4)), 0);
    }

    #[test]
    fn pacer_counts_the_backlog() {
        let start = Instant::now();
        let mut p = Pacer::new(start, 1000.0, 0, 1);
        let end = start + Duration::from_millis(10);
        assert_eq!(p.untaken_before(end), 10, "due at 0..=9 ms");
        for _ in 0..4 {
            p.take();
        }
        assert_eq!(p.untaken_before(end), 6);
        // Two connections share 1000/s: requests 1, 3, 5, 7, 9 ms are the second's.
        let q = Pacer::new(start, 1000.0, 1, 2);
        assert_eq!(q.untaken_before(end), 5);
        assert_eq!(q.untaken_before(start + Duration::from_micros(10_001)), 5);
        assert_eq!(q.untaken_before(start + Duration::from_micros(1_000)), 0);
    }
}
