//! Per-thread measurements, merged once at the end. Nothing here is shared
//! while a run is going: each worker owns its `Stats` and the main thread
//! merges them after joining (so no atomics or locks on the hot path).

use std::time::Instant;

use hdrhistogram::Histogram;

/// Latencies are recorded in nanoseconds, from 1 ns to one hour (larger
/// values saturate), with 3 significant digits (0.1% resolution).
pub const LATENCY_NS_MAX: u64 = 3_600 * 1_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

#[derive(Debug, Clone)]
pub struct OpStats {
    pub ops: u64,
    pub bytes: u64,
    pub latency_ns: Histogram<u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        Self::new()
    }
}

impl OpStats {
    pub fn new() -> Self {
        let latency_ns =
            Histogram::new_with_bounds(1, LATENCY_NS_MAX, SIGNIFICANT_DIGITS).expect("constant bounds are valid");
        OpStats { ops: 0, bytes: 0, latency_ns }
    }

    /// Records one completed request. Never allocates: the histogram's
    /// range is fixed and out-of-range values saturate.
    pub fn record(&mut self, latency_ns: u64, bytes: u64) {
        self.ops += 1;
        self.bytes += bytes;
        self.latency_ns.saturating_record(latency_ns.max(1));
    }

    pub fn merge(&mut self, other: &OpStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.latency_ns.add(&other.latency_ns).expect("histograms share bounds");
    }
}

/// `--verify` counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyStats {
    /// Blocks written with a stamp (prefill and measured phase).
    pub blocks_written: u64,
    /// Reads whose every sector was checked or known unwritten.
    pub reads_checked: u64,
    pub sectors_ok: u64,
    /// Sectors read that this run never wrote (nothing to compare with).
    pub sectors_unknown: u64,
    pub sectors_bad: u64,
    /// Reads with at least one bad sector.
    pub reads_bad: u64,
}

impl VerifyStats {
    pub fn merge(&mut self, other: &VerifyStats) {
        self.blocks_written += other.blocks_written;
        self.reads_checked += other.reads_checked;
        self.sectors_ok += other.sectors_ok;
        self.sectors_unknown += other.sectors_unknown;
        self.sectors_bad += other.sectors_bad;
        self.reads_bad += other.reads_bad;
    }
}

/// Everything one worker measured in the measured phase.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub read: OpStats,
    pub write: OpStats,
    pub verify: VerifyStats,
    /// Open loop: requests that came due before the end but were never
    /// sent because every slot stayed busy (the server fell behind).
    pub unsent: u64,
    /// Open loop: how late each measured request was sent relative to its
    /// due time (waiting for a slot, or the client itself falling behind).
    /// Latency already includes this; it tells client lag from server time.
    pub lag: OpStats,
    /// When measuring started (after warmup) and the last measured completion.
    pub window: Option<(Instant, Instant)>,
}

impl Stats {
    pub fn merge(&mut self, other: &Stats) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
        self.verify.merge(&other.verify);
        self.unsent += other.unsent;
        self.lag.merge(&other.lag);
        self.window = match (self.window, other.window) {
            (Some((a0, a1)), Some((b0, b1))) => Some((a0.min(b0), a1.max(b1))),
            (a, b) => a.or(b),
        };
    }

    /// Seconds between the start of measurement and the last completion.
    pub fn seconds(&self) -> f64 {
        self.window.map_or(0.0, |(start, end)| end.saturating_duration_since(start).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn merging_adds_counts_and_distributions() {
        let mut a = OpStats::new();
        let mut b = OpStats::new();
        for latency in 1..=1000 {
            a.record(latency * 1000, 4096);
        }
        for latency in 1001..=2000 {
            b.record(latency * 1000, 4096);
        }
        let mut merged = OpStats::new();
        merged.merge(&a);
        merged.merge(&b);
        assert_eq!(merged.ops, 2000);
        assert_eq!(merged.bytes, 2000 * 4096);
        assert_eq!(merged.latency_ns.len(), 2000);
        // The median of 1..=2000 µs is 1000 µs; each half alone says 500 or 1500.
        let p50 = merged.latency_ns.value_at_quantile(0.5);
        assert!((999_000..=1_001_000).contains(&p50), "p50 {p50}");
        assert!(merged.latency_ns.max() >= 1_999_000);
        assert!(merged.latency_ns.min() <= 1_001);
        // Merging is the same as recording everything in one histogram.
        let mut direct = OpStats::new();
        for latency in 1..=2000 {
            direct.record(latency * 1000, 4096);
        }
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(merged.latency_ns.value_at_quantile(q), direct.latency_ns.value_at_quantile(q));
        }
    }

    #[test]
    fn out_of_range_latencies_saturate() {
        let mut s = OpStats::new();
        s.record(0, 1);
        s.record(u64::MAX, 1);
        assert_eq!(s.latency_ns.len(), 2);
        assert_eq!(s.latency_ns.min(), 1);
        assert!(s.latency_ns.max() >= LATENCY_NS_MAX);
    }

    #[test]
    fn stats_merge_windows_and_verify_counts() {
        let t0 = Instant::now();
        let mut a = Stats { window: Some((t0, t0 + Duration::from_secs(2))), ..Default::default() };
        a.verify.sectors_ok = 8;
        a.unsent = 3;
        let mut b =
            Stats { window: Some((t0 + Duration::from_millis(1), t0 + Duration::from_secs(3))), ..Default::default() };
        b.verify.sectors_bad = 1;
        b.write.record(10, 512);
        a.merge(&b);
        assert_eq!(a.window, Some((t0, t0 + Duration::from_secs(3))));
        assert_eq!(a.seconds(), 3.0);
        assert_eq!((a.verify.sectors_ok, a.verify.sectors_bad, a.unsent), (8, 1, 3));
        assert_eq!(a.write.ops, 1);
        let mut empty = Stats::default();
        empty.merge(&a);
        assert_eq!(empty.window, a.window);
    }
}
