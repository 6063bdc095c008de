//! One in-flight request: what it asked for, where its bytes live, and which
//! step of its backend work it is on. A request owns its buffer and reply
//! header from the moment its header is parsed until its reply is fully sent
//! (or, on a dropped connection, until its last CQE has been reaped).

use crate::backend::block_locks::LockSet;
use crate::proto::Failure;
use crate::proto::reply::{REPLY_HEADER_BYTES_MAX, ReplyTo};
use crate::proto::transmission::Command;
use crate::proto::wire::EXTENDED_HEADER_BYTES;

use super::buffers::Buffer;
use super::sparse_read::CHUNKS_MAX;

/// Inline reply bytes: the chunk headers of a full sparse read (extended
/// header plus offset and hole size each), which also fits any error chunk.
pub const REPLY_INLINE_BYTES: usize = CHUNKS_MAX * (EXTENDED_HEADER_BYTES + 8 + 4);
const _: () = assert!(REPLY_INLINE_BYTES >= REPLY_HEADER_BYTES_MAX);
/// A header and a data slice per chunk.
pub const SEGMENTS_MAX: usize = 2 * CHUNKS_MAX;

/// One contiguous piece of a reply on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Bytes of the request's inline reply array.
    Inline { start: usize, len: usize },
    /// Bytes of the request's buffer (read data, block-status chunks).
    Buffer { start: usize, len: usize },
}

impl Segment {
    pub fn len(self) -> usize {
        match self {
            Segment::Inline { len, .. } | Segment::Buffer { len, .. } => len,
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// The aligned file range a request's buffer maps onto.
///
/// For O_DIRECT the I/O must start and end on `alignment`; the client's
/// bytes sit at `head` within the buffer. With alignment 1 this is the
/// client range itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Backend steps a file request walks through; memory requests complete
/// synchronously and never leave `Start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Start,
    Read,
    /// Reading the partial first block of an unaligned write.
    RmwHead,
    /// Reading the partial last block of an unaligned write.
    RmwTail,
    Write,
    /// A write through the buffered descriptor (touches the unaligned end).
    WriteBuffered,
    Punch,
    ZeroRange,
    /// fallocate(0) after a punch, for WRITE_ZEROES with NO_HOLE.
    Allocate,
    /// Writing zeroes from a zeroed buffer, the last resort for WRITE_ZEROES.
    ZeroFill,
    Sync,
    Advise,
    /// Waiting for the locks of its partially covered blocks.
    WaitLocks,
    /// BLOCK_STATUS waiting for its lookup helper's scan.
    Lookup,
}

pub struct Request {
    pub conn: u32,
    pub to: ReplyTo,
    pub command: Command,
    pub buffer: Option<Buffer>,
    pub span: AlignedSpan,
    /// Bytes of the current step done so far (short reads and writes).
    pub progress: usize,
    pub step: Step,
    /// Payload bytes received so far (WRITE only).
    pub payload_received: usize,
    /// Position in the WRITE_ZEROES fallback plan.
    pub zero_plan: u8,
    /// Next offset for ZeroFill.
    pub fill_at: u64,
    /// Block locks held (released when the backend work is over).
    pub locks: LockSet,
    /// BLOCK_STATUS: which of the connection's contexts to answer for.
    pub status_mask: u32,
    pub error: Option<Failure>,
    /// Reply bytes that do not live in `buffer` (headers, errors).
    inline: [u8; REPLY_INLINE_BYTES],
    inline_len: usize,
    segments: [Segment; SEGMENTS_MAX],
    segment_count: usize,
}

impl Request {
    pub fn new(conn: u32, to: ReplyTo, command: Command) -> Self {
        Self {
            conn,
            to,
            command,
            buffer: None,
            span: AlignedSpan { start: 0, len: 0, head: 0 },
            progress: 0,
            step: Step::Start,
            payload_received: 0,
            zero_plan: 0,
            fill_at: 0,
            locks: LockSet::default(),
            status_mask: u32::MAX,
            error: None,
            inline: [0; REPLY_INLINE_BYTES],
            inline_len: 0,
            segments: [Segment::Inline { start: 0, len: 0 }; SEGMENTS_MAX],
            segment_count: 0,
        }
    }

    /// Bytes of client data a READ or WRITE carries.
    pub fn client_len(&self) -> usize {
        match self.command {
            Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
            _ => 0,
        }
    }

    /// Appends inline reply bytes written by `encode` (which returns their count).
    pub fn reply_inline(&mut self, encode: impl FnOnce(&mut [u8]) -> usize) {
        let start = self.inline_len;
        let len = encode(&mut self.inline[start..]);
        self.inline_len += len;
        self.push_segment(Segment::Inline { start, len });
    }

    /// Appends `len` bytes of the buffer from `start`.
    pub fn reply_buffer(&mut self, start: usize, len: usize) {
        debug_assert!(self.buffer.as_ref().is_some_and(|b| start + len <= b.len()));
        self.push_segment(Segment::Buffer { start, len });
    }

    fn push_segment(&mut self, segment: Segment) {
        assert!(self.segment_count < SEGMENTS_MAX, "reply segments bounded by CHUNKS_MAX");
        if !segment.is_empty() {
            self.segments[self.segment_count] = segment;
            self.segment_count += 1;
        }
    }

    pub fn clear_reply(&mut self) {
        self.inline_len = 0;
        self.segment_count = 0;
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.segment_count]
    }

    /// The bytes a segment refers to.
    pub fn segment_bytes(&self, segment: Segment) -> &[u8] {
        match segment {
            Segment::Inline { start, len } => &self.inline[start..start + len],
            Segment::Buffer { start, len } => &self.buffer.as_ref().expect("buffer segment")[start..start + len],
        }
    }

    /// Total reply bytes on the wire.
    pub fn reply_bytes(&self) -> usize {
        self.segments().iter().map(|s| s.len()).sum()
    }
}

/// After a send of `sent` bytes, how many whole replies left the queue and
/// how far into the next one the socket got. `skip` is the progress into
/// the first reply before the send; `sizes` are the queued reply sizes.
pub fn advance_sent(sizes: impl Iterator<Item = usize>, skip: usize, sent: usize) -> (usize, usize) {
    let mut left = sent + skip;
    let mut done = 0;
    for size in sizes {
        if left < size {
            return (done, left);
        }
        left -= size;
        done += 1;
    }
    debug_assert_eq!(left, 0, "sent more than was queued");
    (done, 0)
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

    #[test]
    fn advance_counts_whole_and_partial_replies() {
        let sizes = [16usize, 100, 50];
        assert_eq!(advance_sent(sizes.iter().copied(), 0, 16), (1, 0));
        assert_eq!(advance_sent(sizes.iter().copied(), 0, 20), (1, 4));
        // A second short send continues from the partial position; the
        // tcp_echo bug (treating remaining as total) would get this wrong.
        assert_eq!(advance_sent(sizes.iter().copied(), 10, 6), (1, 0));
        assert_eq!(advance_sent(sizes.iter().copied(), 10, 7), (1, 1));
        assert_eq!(advance_sent(sizes.iter().copied(), 0, 166), (3, 0));
        assert_eq!(advance_sent(sizes.iter().copied(), 0, 0), (0, 0));
    }
}
