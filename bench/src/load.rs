//! The read/write load generator as a [`Job`]: one per worker, covering
//! that worker's connections.
//!
//! Phases: an optional prefill (every block of each stripe written once,
//! sequentially, not measured), then the measured run (warmup first, whose
//! completions are not recorded). The verify table survives the phase
//! change, so prefilled blocks are checked by the measured reads.

use std::sync::Arc;
use std::time::Instant;

use crate::job::{Completion, Issue, Job, Next};
use crate::pattern;
use crate::progress::Progress;
use crate::stats::Stats;
use crate::verify::VerifyTable;
use crate::workload::{Pacer, Picker, Stripe};
use ringnbd::proto::client::codec::Command;

/// Random picks tried before a verify slot gives up on finding a block
/// with nothing in flight (it then waits for a completion).
const VERIFY_PICK_TRIES: u32 = 16;
/// Mismatches described on stderr per worker; all are counted.
const MISMATCH_REPORTS_MAX: u32 = 10;

/// The workload as every worker sees it.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub region_offset: u64,
    pub bs: u64,
    /// Blocks in the region (`region bytes / bs`).
    pub blocks: u64,
    pub connections: u64,
    pub random: bool,
    pub read_percent: u32,
    pub verify: bool,
    pub seed: u64,
    /// Total measured requests (`--ops`), shared out among connections.
    pub ops: Option<u64>,
    /// Open-loop total rate.
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Prefill,
    Measure { warmup_end: Instant, end: Option<Instant> },
}

struct ConnLoad {
    stripe: Stripe,
    picker: Picker,
    pacer: Option<Pacer>,
    /// Measured requests this connection may still issue.
    ops_left: Option<u64>,
    table: Option<VerifyTable>,
    /// Per slot: the stripe index of its block and the generation it writes.
    slot_block: Vec<(u64, u32)>,
    /// Prefill: the next stripe index to write.
    prefill_next: u64,
    /// The run's end has been seen (the open-loop backlog is counted once).
    ended: bool,
}

pub struct LoadJob {
    config: LoadConfig,
    conns: Vec<ConnLoad>,
    phase: Phase,
    pub stats: Stats,
    progress: Arc<Progress>,
    mismatch_reports: u32,
}

impl LoadJob {
    /// `globals` are the global indices of this worker's connections.
    pub fn new(config: LoadConfig, globals: &[u64], iodepth: usize, progress: Arc<Progress>) -> Self {
        let conns = globals
            .iter()
            .map(|&global| {
                let stripe = Stripe::new(global, config.connections, config.blocks);
                let seed = config.seed ^ global.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                ConnLoad {
                    stripe,
                    picker: Picker::new(stripe, config.random, config.read_percent, seed),
                    pacer: None,
                    ops_left: config.ops.map(|ops| share(ops, global, config.connections)),
                    table: config.verify.then(|| VerifyTable::new(stripe.count)),
                    slot_block: vec![(0, 0); iodepth],
                    prefill_next: 0,
                    ended: false,
                }
            })
            .collect();
        LoadJob { config, conns, phase: Phase::Prefill, stats: Stats::default(), progress, mismatch_reports: 0 }
    }

    /// Starts the measured phase: warmup until `warmup_end`, measuring
    /// until `end` (or until the ops budget is spent).
    pub fn start_measuring(&mut self, start: Instant, warmup_end: Instant, end: Option<Instant>) {
        self.phase = Phase::Measure { warmup_end, end };
        for conn in &mut self.conns {
            // A stripe starts at its connection's global index.
            let global = conn.stripe.first;
            conn.pacer = self.config.rate.map(|rate| Pacer::new(start, rate, global, self.config.connections));
        }
    }

    fn offset_of(&self, conn: usize, k: u64) -> u64 {
        self.config.region_offset + self.conns[conn].stripe.block(k) * self.config.bs
    }

    fn next_prefill(&mut self, conn: usize, slot: usize, now: Instant) -> Next {
        let c = &mut self.conns[conn];
        if c.prefill_next == c.stripe.count {
            return Next::Finished;
        }
        let k = c.prefill_next;
        c.prefill_next += 1;
        let generation = match &mut c.table {
            Some(table) => {
                table.claim(k);
                table.next_generation(k)
            }
            None => 0,
        };
        c.slot_block[slot] = (k, generation);
        let offset = self.offset_of(conn, k);
        Next::Issue(Issue { command: Command::Write, offset, length: self.config.bs, start: now })
    }

    fn next_measured(
        &mut self,
        conn: usize,
        slot: usize,
        now: Instant,
        warmup_end: Instant,
        end: Option<Instant>,
    ) -> Next {
        let c = &mut self.conns[conn];
        let past_end = end.is_some_and(|end| now >= end);
        let due = c.pacer.as_ref().map(Pacer::due);
        // Requests due at or after the end are never sent.
        let due_past_end = matches!((due, end), (Some(due), Some(end)) if due >= end);
        if past_end || due_past_end || c.ops_left == Some(0) {
            if !c.ended {
                c.ended = true;
                if let (Some(pacer), Some(end)) = (&c.pacer, end) {
                    self.stats.unsent += pacer.untaken_before(end.min(now));
                }
            }
            return Next::Finished;
        }
        if let Some(due) = due
            && due > now
        {
            return Next::WaitUntil(due);
        }
        let is_read = c.picker.next_is_read();
        let Some(k) = pick_block(&mut c.picker, c.table.as_ref()) else {
            return Next::Idle;
        };
        let start = match &mut c.pacer {
            Some(pacer) => pacer.take(),
            None => now,
        };
        if c.pacer.is_some() && now >= warmup_end {
            let lag_ns = now.saturating_duration_since(start).as_nanos();
            self.stats.lag.record(u64::try_from(lag_ns).unwrap_or(u64::MAX), 0);
        }
        if now >= warmup_end
            && let Some(left) = &mut c.ops_left
        {
            *left -= 1;
        }
        let generation = match &mut c.table {
            Some(table) => {
                table.claim(k);
                if is_read { 0 } else { table.next_generation(k) }
            }
            None => 0,
        };
        c.slot_block[slot] = (k, generation);
        let command = if is_read { Command::Read } else { Command::Write };
        Next::Issue(Issue { command, offset: self.offset_of(conn, k), length: self.config.bs, start })
    }

    fn verify_read(&mut self, conn: usize, k: u64, completion: &Completion<'_>) {
        let table = self.conns[conn].table.as_ref().expect("verify runs have tables");
        let check = pattern::check(completion.data, completion.offset, self.config.seed, table.expected(k));
        let v = &mut self.stats.verify;
        v.reads_checked += 1;
        v.sectors_ok += u64::from(check.sectors_ok);
        v.sectors_unknown += u64::from(check.sectors_unknown);
        v.sectors_bad += u64::from(check.sectors_bad);
        if let Some(mismatch) = check.first_bad {
            v.reads_bad += 1;
            if self.mismatch_reports < MISMATCH_REPORTS_MAX {
                self.mismatch_reports += 1;
                eprintln!(
                    "ringnbd-bench: verify: READ of {} bytes at {}: {mismatch} ({} bad sectors in this read)",
                    completion.length, completion.offset, check.sectors_bad
                );
            }
        }
    }
}

/// Connection `index`'s share of `total` requests (the first ones get the
/// remainder).
fn share(total: u64, index: u64, connections: u64) -> u64 {
    total / connections + u64::from(index < total % connections)
}

/// A block for the next request: any block, or under verify one with
/// nothing in flight (`None` if none was found quickly).
fn pick_block(picker: &mut Picker, table: Option<&VerifyTable>) -> Option<u64> {
    let Some(table) = table else {
        return Some(picker.next_index());
    };
    (0..VERIFY_PICK_TRIES).map(|_| picker.next_index()).find(|&k| !table.is_busy(k))
}

impl Job for LoadJob {
    fn next(&mut self, conn: usize, slot: usize, now: Instant) -> Next {
        match self.phase {
            Phase::Prefill => self.next_prefill(conn, slot, now),
            Phase::Measure { warmup_end, end } => self.next_measured(conn, slot, now, warmup_end, end),
        }
    }

    fn fill(&mut self, conn: usize, slot: usize, offset: u64, payload: &mut [u8]) {
        if self.config.verify {
            let (_, generation) = self.conns[conn].slot_block[slot];
            pattern::fill(payload, offset, self.config.seed, generation);
        }
    }

    fn on_extent(&mut self, _: usize, _: usize, _: bool, _: u64, _: u64, _: u64) -> Result<(), String> {
        Err("block status descriptor in reply to a READ or WRITE".into())
    }

    fn on_done(&mut self, conn: usize, slot: usize, completion: &Completion<'_>) -> Result<(), String> {
        let (k, generation) = self.conns[conn].slot_block[slot];
        let is_read = completion.command == Command::Read;
        if self.config.verify {
            if is_read {
                self.verify_read(conn, k, completion);
            } else {
                self.stats.verify.blocks_written += 1;
            }
            let written = (!is_read).then_some(generation);
            self.conns[conn].table.as_mut().expect("verify runs have tables").release(k, written);
        }
        self.progress.add(is_read, completion.length);
        let Phase::Measure { warmup_end, .. } = self.phase else {
            return Ok(());
        };
        let measured = completion.now >= warmup_end;
        if measured {
            let op = if is_read { &mut self.stats.read } else { &mut self.stats.write };
            op.record(completion.latency_ns, completion.length);
            let window_start = self.stats.window.map_or(warmup_end, |w| w.0);
            self.stats.window = Some((window_start, completion.now));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(blocks: u64, connections: u64, verify: bool) -> LoadConfig {
        LoadConfig {
            region_offset: 1 << 20,
            bs: 4096,
            blocks,
            connections,
            random: true,
            read_percent: 50,
            verify,
            seed: 5,
            ops: None,
            rate: None,
        }
    }

    fn completion(command: Command, offset: u64, now: Instant, data: &[u8]) -> Completion<'_> {
        Completion { command, offset, length: 4096, latency_ns: 1000, now, data }
    }

    #[test]
    fn ops_are_shared_out_exactly() {
        assert_eq!((0..3).map(|i| share(10, i, 3)).collect::<Vec<_>>(), vec![4, 3, 3]);
        assert_eq!((0..4).map(|i| share(2, i, 4)).sum::<u64>(), 2);
    }

    #[test]
    fn prefill_writes_each_block_of_the_stripe_once() {
        let progress = Arc::new(Progress::default());
        let mut job = LoadJob::new(config(5, 2, true), &[1], 4, progress);
        let now = Instant::now();
        let mut offsets = Vec::new();
        while let Next::Issue(issue) = job.next(0, offsets.len() % 4, now) {
            assert_eq!(issue.command, Command::Write);
            offsets.push(issue.offset);
            let mut payload = vec![0; 4096];
            job.fill(0, (offsets.len() - 1) % 4, issue.offset, &mut payload);
            job.on_done(0, (offsets.len() - 1) % 4, &completion(Command::Write, issue.offset, now, &[])).unwrap();
        }
        // Connection 1 of 2 owns blocks 1 and 3 of 5.
        assert_eq!(offsets, vec![(1 << 20) + 4096, (1 << 20) + 3 * 4096]);
        assert_eq!(job.stats.verify.blocks_written, 2);
        assert_eq!(job.stats.read.ops + job.stats.write.ops, 0, "prefill is not measured");
    }

    #[test]
    fn verify_reads_back_what_was_written_and_counts_mismatches() {
        let progress = Arc::new(Progress::default());
        let mut job = LoadJob::new(config(1, 1, true), &[0], 2, progress);
        let start = Instant::now();
        job.start_measuring(start, start, None);
        // One block: write it, then read it back (until the mix gives both).
        let mut block = vec![0u8; 4096];
        let (mut wrote, mut read) = (false, false);
        for _ in 0..64 {
            let Next::Issue(issue) = job.next(0, 0, start) else { panic!("a free slot and a free block") };
            if issue.command == Command::Write {
                job.fill(0, 0, issue.offset, &mut block);
                job.on_done(0, 0, &completion(Command::Write, issue.offset, start, &[])).unwrap();
                wrote = true;
            } else {
                job.on_done(0, 0, &completion(Command::Read, issue.offset, start, &block)).unwrap();
                read |= wrote;
            }
        }
        assert!(wrote && read);
        let v = job.stats.verify;
        assert_eq!(v.sectors_bad, 0);
        assert!(v.sectors_ok > 0);
        // Now the "server" returns a flipped bit.
        loop {
            let Next::Issue(issue) = job.next(0, 0, start) else { panic!() };
            if issue.command == Command::Write {
                job.fill(0, 0, issue.offset, &mut block);
                job.on_done(0, 0, &completion(Command::Write, issue.offset, start, &[])).unwrap();
                continue;
            }
            let mut corrupt = block.clone();
            corrupt[100] ^= 1;
            job.on_done(0, 0, &completion(Command::Read, issue.offset, start, &corrupt)).unwrap();
            break;
        }
        assert_eq!(job.stats.verify.reads_bad, 1);
        assert_eq!(job.stats.verify.sectors_bad, 1);
    }

    #[test]
    fn a_busy_block_is_not_picked_twice() {
        let progress = Arc::new(Progress::default());
        let mut job = LoadJob::new(config(1, 1, true), &[0], 2, progress);
        let start = Instant::now();
        job.start_measuring(start, start, None);
        assert!(matches!(job.next(0, 0, start), Next::Issue(_)));
        assert_eq!(job.next(0, 1, start), Next::Idle);
    }

    #[test]
    fn warmup_is_excluded_and_runs_end_on_time() {
        let progress = Arc::new(Progress::default());
        let mut job = LoadJob::new(config(64, 1, false), &[0], 1, progress.clone());
        let start = Instant::now();
        let warmup_end = start + Duration::from_secs(1);
        let end = warmup_end + Duration::from_secs(1);
        job.start_measuring(start, warmup_end, Some(end));
        for now in [start, warmup_end, warmup_end + Duration::from_millis(500)] {
            let Next::Issue(issue) = job.next(0, 0, now) else { panic!() };
            job.on_done(0, 0, &completion(issue.command, issue.offset, now, &[0; 4096])).unwrap();
        }
        assert_eq!(job.stats.read.ops + job.stats.write.ops, 2);
        assert_eq!(job.next(0, 0, end), Next::Finished);
        assert_eq!(progress.snapshot().ops(), 3, "progress counts warmup too");
    }

    #[test]
    fn open_loop_waits_for_due_times_and_counts_the_backlog() {
        let progress = Arc::new(Progress::default());
        let mut cfg = config(64, 1, false);
        cfg.rate = Some(1000.0);
        let mut job = LoadJob::new(cfg, &[0], 1, progress);
        let start = Instant::now();
        let end = start + Duration::from_millis(100);
        job.start_measuring(start, start, Some(end));
        let Next::Issue(first) = job.next(0, 0, start) else { panic!() };
        assert_eq!(first.start, start);
        assert_eq!(job.next(0, 0, start), Next::WaitUntil(start + Duration::from_millis(1)));
        // 10 ms late: the request still counts from its due time.
        let late = start + Duration::from_millis(11);
        let Next::Issue(second) = job.next(0, 0, late) else { panic!() };
        assert_eq!(second.start, start + Duration::from_millis(1));
        assert_eq!(job.stats.lag.ops, 2);
        assert!(job.stats.lag.latency_ns.max() >= 9_990_000, "the second request was sent 10 ms late");
        assert_eq!(job.next(0, 0, end), Next::Finished);
        assert_eq!(job.stats.unsent, 98, "100 due before the end, 2 sent");
    }
}
