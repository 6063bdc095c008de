//! `--map`: walk the region with BLOCK_STATUS (base:allocation) as fast as
//! the server answers.
//!
//! The region is cut into chunks, spread over the connections, and every
//! free slot works on a chunk: a reply may cover less than asked (servers
//! cap descriptors per reply), so a chunk is re-requested from where its
//! last reply stopped until it is covered. Many chunks are in flight at
//! once, which is what pipelining buys.
//!
//! Extents are counted without being stored: a chunk remembers its first
//! and last status, so neighbouring chunks (and consecutive replies within
//! one) that meet with the same status merge into one extent at the end.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::job::{Completion, Issue, Job, Next};
use crate::progress::Progress;
use crate::stats::OpStats;
use ringnbd::proto::client::codec::Command;

/// base:allocation uses two bits (HOLE = 1, ZERO = 2); others are reserved
/// and ignored, as the spec tells clients to.
pub const STATUS_MASK: u64 = 0b11;
pub const STATUS_NAMES: [&str; 4] = ["data", "hole", "zero", "hole+zero"];

/// What one chunk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkSummary {
    pub start: u64,
    pub end: u64,
    /// Extents inside the chunk, neighbours with equal status merged.
    pub extents: u64,
    /// Descriptors as received (what the server sent, unmerged).
    pub descriptors: u64,
    pub requests: u64,
    pub first_status: Option<u64>,
    pub last_status: Option<u64>,
    pub bytes_by_status: [u64; 4],
}

impl ChunkSummary {
    fn new(start: u64, end: u64) -> Self {
        ChunkSummary { start, end, ..Default::default() }
    }

    /// One descriptor continuing the chunk.
    fn add(&mut self, length: u64, status: u64) {
        let status = status & STATUS_MASK;
        self.bytes_by_status[status as usize] += length;
        self.descriptors += 1;
        if self.last_status != Some(status) {
            self.extents += 1;
        }
        self.first_status.get_or_insert(status);
        self.last_status = Some(status);
    }
}

/// The whole map, merged over every chunk of every worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapTotals {
    pub extents: u64,
    pub descriptors: u64,
    pub requests: u64,
    pub bytes_by_status: [u64; 4],
}

impl MapTotals {
    pub fn bytes(&self) -> u64 {
        self.bytes_by_status.iter().sum()
    }
}

/// Merges chunk summaries (any order): extents that continue across a
/// chunk boundary with the same status are counted once.
pub fn merge(mut chunks: Vec<ChunkSummary>) -> MapTotals {
    chunks.sort_by_key(|c| c.start);
    let mut totals = MapTotals::default();
    let mut previous: Option<&ChunkSummary> = None;
    for chunk in &chunks {
        totals.extents += chunk.extents;
        totals.descriptors += chunk.descriptors;
        totals.requests += chunk.requests;
        for (total, bytes) in totals.bytes_by_status.iter_mut().zip(chunk.bytes_by_status) {
            *total += bytes;
        }
        if let Some(p) = previous
            && p.end == chunk.start
            && p.last_status.is_some()
            && p.last_status == chunk.first_status
        {
            totals.extents -= 1;
        }
        previous = Some(chunk);
    }
    totals
}

/// Cuts `[start, end)` into chunks of `chunk_bytes` (the last may be short).
pub fn chunks(start: u64, end: u64, chunk_bytes: u64) -> Vec<(u64, u64)> {
    assert!(chunk_bytes > 0 && start <= end);
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let next = at.saturating_add(chunk_bytes).min(end);
        out.push((at, next));
        at = next;
    }
    out
}

struct ConnMap {
    /// Chunk indices still to request; continuations go in front.
    queue: VecDeque<usize>,
    /// Per slot: the chunk it works on.
    slot_chunk: Vec<Option<usize>>,
    /// Per slot: a status chunk arrived for the request in flight.
    slot_saw_status: Vec<bool>,
    in_flight: usize,
}

pub struct MapJob {
    pub chunks: Vec<ChunkSummary>,
    /// Per chunk: the offset its next request starts at.
    positions: Vec<u64>,
    conns: Vec<ConnMap>,
    /// BLOCK_STATUS request latency.
    pub latency: OpStats,
    progress: Arc<Progress>,
}

impl MapJob {
    /// `assigned[i]`: the `(start, end)` chunks of local connection `i`.
    pub fn new(assigned: Vec<Vec<(u64, u64)>>, iodepth: usize, progress: Arc<Progress>) -> Self {
        let mut chunks = Vec::new();
        let mut conns = Vec::new();
        for list in assigned {
            let first = chunks.len();
            chunks.extend(list.iter().map(|&(start, end)| ChunkSummary::new(start, end)));
            conns.push(ConnMap {
                queue: (first..chunks.len()).collect(),
                slot_chunk: vec![None; iodepth],
                slot_saw_status: vec![false; iodepth],
                in_flight: 0,
            });
        }
        let positions = chunks.iter().map(|c| c.start).collect();
        MapJob { chunks, positions, conns, latency: OpStats::new(), progress }
    }
}

impl Job for MapJob {
    fn next(&mut self, conn: usize, slot: usize, now: Instant) -> Next {
        let c = &mut self.conns[conn];
        let Some(index) = c.queue.pop_front() else {
            return if c.in_flight > 0 { Next::Idle } else { Next::Finished };
        };
        c.in_flight += 1;
        c.slot_chunk[slot] = Some(index);
        c.slot_saw_status[slot] = false;
        self.chunks[index].requests += 1;
        let offset = self.positions[index];
        let length = self.chunks[index].end - offset;
        Next::Issue(Issue { command: Command::BlockStatus, offset, length, start: now })
    }

    fn fill(&mut self, _: usize, _: usize, _: u64, _: &mut [u8]) {
        unreachable!("the map job sends no writes");
    }

    fn on_extent(
        &mut self,
        conn: usize,
        slot: usize,
        first: bool,
        offset: u64,
        length: u64,
        status: u64,
    ) -> Result<(), String> {
        let c = &mut self.conns[conn];
        let index = c.slot_chunk[slot].expect("an extent answers a request in flight");
        if first && c.slot_saw_status[slot] {
            return Err("two block status chunks for one context in one reply".into());
        }
        c.slot_saw_status[slot] = true;
        // The parser delivers consecutive descriptors from the request offset.
        assert_eq!(offset, self.positions[index], "descriptors are consecutive");
        self.positions[index] += length;
        self.chunks[index].add(length, status);
        self.progress.add_extents(1);
        Ok(())
    }

    fn on_done(&mut self, conn: usize, slot: usize, completion: &Completion<'_>) -> Result<(), String> {
        let c = &mut self.conns[conn];
        let index = c.slot_chunk[slot].take().expect("a reply answers a request in flight");
        c.in_flight -= 1;
        if !c.slot_saw_status[slot] {
            return Err("BLOCK_STATUS reply without a base:allocation chunk".into());
        }
        let covered = self.positions[index] - completion.offset;
        self.latency.record(completion.latency_ns, covered);
        self.progress.add(true, covered);
        if self.positions[index] < self.chunks[index].end {
            c.queue.push_front(index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(start: u64, end: u64, statuses: &[(u64, u64)]) -> ChunkSummary {
        let mut s = ChunkSummary::new(start, end);
        for &(length, status) in statuses {
            s.add(length, status);
        }
        s
    }

    #[test]
    fn chunking_covers_the_region() {
        assert_eq!(chunks(0, 10, 4), vec![(0, 4), (4, 8), (8, 10)]);
        assert_eq!(chunks(5, 5, 4), vec![]);
        assert_eq!(chunks(0, u64::MAX, 1 << 63).len(), 2);
    }

    #[test]
    fn extents_merge_within_and_across_chunks() {
        // data | hole+zero, then hole+zero | data: the middle extent spans
        // the chunk boundary and counts once.
        let a = summary(0, 100, &[(40, 0), (60, 3)]);
        let b = summary(100, 200, &[(10, 3), (90, 0)]);
        let totals = merge(vec![b, a]);
        assert_eq!(totals.extents, 3);
        assert_eq!(totals.descriptors, 4);
        assert_eq!(totals.bytes_by_status, [130, 0, 0, 70]);
        assert_eq!(totals.bytes(), 200);
        // Reserved status bits are ignored; equal neighbours merge.
        let c = summary(0, 30, &[(10, 1), (10, 1 | 0x100), (10, 2)]);
        assert_eq!((c.extents, c.descriptors), (2, 3));
        assert_eq!(c.bytes_by_status, [0, 20, 10, 0]);
    }

    #[test]
    fn short_replies_are_continued() {
        let progress = Arc::new(Progress::default());
        let mut job = MapJob::new(vec![vec![(0, 1000)]], 2, progress);
        let now = Instant::now();
        let Next::Issue(first) = job.next(0, 0, now) else { panic!() };
        assert_eq!((first.offset, first.length), (0, 1000));
        assert_eq!(job.next(0, 1, now), Next::Idle, "one chunk, already in flight");
        job.on_extent(0, 0, true, 0, 300, 0).unwrap();
        let done = Completion { command: Command::BlockStatus, offset: 0, length: 1000, latency_ns: 5, now, data: &[] };
        job.on_done(0, 0, &done).unwrap();
        let Next::Issue(second) = job.next(0, 1, now) else { panic!() };
        assert_eq!((second.offset, second.length), (300, 700));
        job.on_extent(0, 1, true, 300, 700, 0).unwrap();
        job.on_done(0, 1, &Completion { offset: 300, length: 700, ..done }).unwrap();
        assert_eq!(job.next(0, 0, now), Next::Finished);
        let totals = merge(job.chunks.clone());
        assert_eq!((totals.extents, totals.descriptors, totals.requests), (1, 2, 2));
    }

    #[test]
    fn replies_without_status_or_with_two_are_violations() {
        let progress = Arc::new(Progress::default());
        let mut job = MapJob::new(vec![vec![(0, 100)]], 1, progress);
        let now = Instant::now();
        job.next(0, 0, now);
        job.on_extent(0, 0, true, 0, 50, 0).unwrap();
        assert!(job.on_extent(0, 0, true, 50, 50, 0).is_err());
        let done = Completion { command: Command::BlockStatus, offset: 0, length: 100, latency_ns: 5, now, data: &[] };
        job.on_done(0, 0, &done).unwrap();
        job.next(0, 0, now);
        assert!(job.on_done(0, 0, &done).is_err());
    }
}
