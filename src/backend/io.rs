//! The seam between backends and the engine: what a backend asks the engine
//! to do for one request, in terms of storage operations rather than ring
//! entries. The engine owns the ring, `user_data` and buffers; backends own
//! the plan ([`Plan`]: which operation next, what a completion means).
//! `file_io` and `layers::io` are the plans today. One request
//! may walk through several operations (read-modify-write, zeroing
//! fallbacks, a sync for FUA), one at a time.

use std::os::fd::RawFd;

use crate::proto::Failure;
use crate::proto::transmission::Command;

/// Memory an operation reads from or writes into: part of a request's
/// buffer, or a region the engine keeps for the backend. The engine keeps it
/// alive and unmoved until the operation's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoMemory {
    pub ptr: *mut u8,
    pub len: u32,
    /// Fixed-buffer index, if the memory is registered with the ring.
    pub fixed: Option<u16>,
}

/// One storage operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        fd: RawFd,
        into: IoMemory,
        offset: u64,
    },
    /// `dsync`: durable before completion (FUA).
    Write {
        fd: RawFd,
        from: IoMemory,
        offset: u64,
        dsync: bool,
    },
    /// fallocate(2) with `mode`.
    Allocate {
        fd: RawFd,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// fdatasync(2).
    Sync {
        fd: RawFd,
    },
    /// posix_fadvise(WILLNEED).
    Prefetch {
        fd: RawFd,
        offset: u64,
        length: u64,
    },
}

/// What the engine does next with a request.
#[derive(Debug)]
pub enum Next {
    /// Submit this and report its result.
    Submit(Op),
    /// The backend work is over.
    Finished(Result<(), Failure>),
    /// Waiting for something another request holds; try again shortly.
    Defer,
}

/// A backend's plan for one request, driven by the engine: the first
/// operation, the next one after a deferral, and what each result leads
/// to. `T` is the per-request state the engine keeps with the request.
pub trait Plan<T> {
    fn start(&self, command: &Command, task: &mut T, data: Data<'_>) -> Next;
    /// Re-runs the request after `Next::Defer`.
    fn resume(&self, command: &Command, task: &mut T, data: Data<'_>) -> Next;
    /// The result of the request's last operation.
    fn on_result(&self, command: &Command, task: &mut T, data: Data<'_>, result: i32) -> Next;
}

/// A request's buffer as the backend sees it.
pub struct Data<'a> {
    pub bytes: &'a mut [u8],
    /// Fixed-buffer index of `bytes`, if registered.
    pub fixed: Option<u16>,
}

impl Data<'_> {
    /// `len` bytes of the buffer from `at`, as operation memory.
    pub fn memory(&mut self, at: usize, len: usize) -> IoMemory {
        assert!(at + len <= self.bytes.len(), "operation inside its buffer");
        // SAFETY: in bounds (asserted).
        let ptr = unsafe { self.bytes.as_mut_ptr().add(at) };
        IoMemory { ptr, len: u32::try_from(len).expect("payloads fit in u32"), fixed: self.fixed }
    }
}

/// The aligned file range a request's buffer maps onto.
///
/// For O_DIRECT the I/O must start and end on `alignment`; the client's
/// bytes sit at `head` within the buffer. With alignment 1 this is the
/// client range itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AlignedSpan {
    /// File offset of buffer byte 0.
    pub start: u64,
    /// Bytes from `start` to the aligned end.
    pub len: usize,
    /// Offset of the client's first byte within the buffer.
    pub head: usize,
}

impl AlignedSpan {
    pub fn new(offset: u64, len: usize, alignment: u32) -> Self {
        let a = u64::from(alignment.max(1));
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        Self { start, len: (end - start) as usize, head: (offset - start) as usize }
    }

    pub fn is_exact(&self, len: usize) -> bool {
        self.head == 0 && self.len == len
    }

    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_round_out_to_alignment() {
        assert_eq!(AlignedSpan::new(4096, 4096, 512), AlignedSpan { start: 4096, len: 4096, head: 0 });
        assert_eq!(AlignedSpan::new(1, 10, 512), AlignedSpan { start: 0, len: 512, head: 1 });
        assert_eq!(AlignedSpan::new(511, 2, 512), AlignedSpan { start: 0, len: 1024, head: 511 });
        assert_eq!(AlignedSpan::new(7, 9, 1), AlignedSpan { start: 7, len: 9, head: 0 });
        assert!(AlignedSpan::new(8192, 4096, 4096).is_exact(4096));
        assert!(!AlignedSpan::new(8192, 100, 4096).is_exact(100));
    }
}
