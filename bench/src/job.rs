//! The contract between the ring loop (`engine.rs`) and what it runs: the
//! load generator (`load.rs`) or the block-status mapper (`map.rs`).
//!
//! The engine owns sockets, buffers and timing; a job decides what each
//! free slot sends next and digests the replies. Calls are made from the
//! worker thread only, outside the completion reaping loop.

use std::time::Instant;

use ringnbd::proto::client::codec::Command;

/// A request a job wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issue {
    pub command: Command,
    pub offset: u64,
    pub length: u64,
    /// Latency is measured from here: now in closed loop, the due time in
    /// open loop (which may be in the past).
    pub start: Instant,
}

/// What a job wants done with a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Issue(Issue),
    /// Nothing before this time (open-loop pacing).
    WaitUntil(Instant),
    /// Nothing until another request of this connection completes.
    Idle,
    /// This connection is done for this run.
    Finished,
}

/// A successful reply.
#[derive(Debug)]
pub struct Completion<'a> {
    pub command: Command,
    pub offset: u64,
    pub length: u64,
    pub latency_ns: u64,
    pub now: Instant,
    /// The read data (empty for other commands).
    pub data: &'a [u8],
}

pub trait Job {
    /// Called for each free slot of worker-local connection `conn`.
    fn next(&mut self, conn: usize, slot: usize, now: Instant) -> Next;
    /// Fills the payload of the write `next` just returned for `slot`.
    fn fill(&mut self, conn: usize, slot: usize, offset: u64, payload: &mut [u8]);
    /// A block-status descriptor (absolute offset, clamped to the request).
    /// An error is a protocol violation and ends the run.
    fn on_extent(
        &mut self,
        conn: usize,
        slot: usize,
        first: bool,
        offset: u64,
        length: u64,
        status: u64,
    ) -> Result<(), String>;
    /// The request in `slot` succeeded. An error is a protocol violation.
    fn on_done(&mut self, conn: usize, slot: usize, completion: &Completion<'_>) -> Result<(), String>;
}
