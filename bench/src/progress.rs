//! Live progress: each worker bumps its own counters (relaxed atomics on a
//! cache line of their own, never contended), and the main thread samples
//! them once a second to print a line on stderr.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One worker's running totals (warmup and prefill included).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Progress {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    /// Map mode: block-status descriptors received.
    extents: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub extents: u64,
}

impl Progress {
    /// One completion; only the owning worker calls this.
    pub fn add(&self, is_read: bool, bytes: u64) {
        let (ops, total) =
            if is_read { (&self.read_ops, &self.read_bytes) } else { (&self.write_ops, &self.write_bytes) };
        ops.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_extents(&self, count: u64) {
        self.extents.fetch_add(count, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            read_ops: self.read_ops.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_ops: self.write_ops.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            extents: self.extents.load(Ordering::Relaxed),
        }
    }
}

impl Snapshot {
    #[cfg(test)]
    pub fn ops(&self) -> u64 {
        self.read_ops + self.write_ops
    }

    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        all.into_iter().fold(Snapshot::default(), |a, b| Snapshot {
            read_ops: a.read_ops + b.read_ops,
            read_bytes: a.read_bytes + b.read_bytes,
            write_ops: a.write_ops + b.write_ops,
            write_bytes: a.write_bytes + b.write_bytes,
            extents: a.extents + b.extents,
        })
    }
}

const MIB: f64 = (1 << 20) as f64;

/// `[  3s] read 241.3k IOPS 942.6 MiB/s | write 0 IOPS 0.0 MiB/s` for the
/// interval between two snapshots.
pub fn line(elapsed: Duration, label: &str, before: &Snapshot, after: &Snapshot, interval: Duration) -> String {
    let secs = interval.as_secs_f64().max(1e-9);
    let rate = |ops: u64| format_count((ops as f64) / secs);
    let bandwidth = |bytes: u64| (bytes as f64) / secs / MIB;
    let mut text = format!("[{:>4.0}s{label}]", elapsed.as_secs_f64());
    if after.extents > 0 {
        text += &format!(
            " {} extents/s, {} requests/s",
            rate(after.extents - before.extents),
            rate(after.read_ops - before.read_ops)
        );
        return text;
    }
    text += &format!(
        " read {} IOPS {:.1} MiB/s | write {} IOPS {:.1} MiB/s",
        rate(after.read_ops - before.read_ops),
        bandwidth(after.read_bytes - before.read_bytes),
        rate(after.write_ops - before.write_ops),
        bandwidth(after.write_bytes - before.write_bytes),
    );
    text
}

/// `950`, `12.3k`, `1.25M`.
pub fn format_count(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_sums() {
        let a = Progress::default();
        a.add(true, 4096);
        a.add(false, 512);
        a.add(true, 4096);
        let s = a.snapshot();
        assert_eq!((s.read_ops, s.read_bytes, s.write_ops, s.write_bytes), (2, 8192, 1, 512));
        let total = Snapshot::sum([&s, &s]);
        assert_eq!(total.ops(), 6);
        assert_eq!(std::mem::align_of::<Progress>(), 128, "a cache line pair of its own");
    }

    #[test]
    fn progress_lines() {
        let before = Snapshot::default();
        let after = Snapshot { read_ops: 250_000, read_bytes: 250_000 * 4096, ..Default::default() };
        let text = line(Duration::from_secs(3), "", &before, &after, Duration::from_secs(1));
        assert_eq!(text, "[   3s] read 250.0k IOPS 976.6 MiB/s | write 0 IOPS 0.0 MiB/s");
        let warm = line(Duration::from_secs(1), " warmup", &before, &after, Duration::from_secs(2));
        assert!(warm.starts_with("[   1s warmup] read 125.0k IOPS"), "{warm}");
        assert_eq!(format_count(1_250_000.0), "1.25M");
        assert_eq!(format_count(999.0), "999");
    }
}
