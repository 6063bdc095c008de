//! One in-flight request: what it asked for, where its bytes live, and which
//! step of its backend work it is on. A request owns its buffer and reply
//! header from the moment its header is parsed until its reply is fully sent
//! (or, on a dropped connection, until its last CQE has been reaped).

use crate::proto::NbdError;
use crate::proto::reply::{HeaderBuf, REPLY_HEADER_BYTES_MAX, ReplyTo};
use crate::proto::transmission::Command;

use super::buffers::Buffer;

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
    /// Waiting for the export's read-modify-write guard.
    WaitRmw,
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
    pub holds_rmw: bool,
    /// BLOCK_STATUS: which of the connection's contexts to answer for.
    pub status_mask: u32,
    pub error: Option<NbdError>,
    /// Reply bytes sent before `buffer[reply_data]`.
    pub header: HeaderBuf,
    pub header_len: usize,
    /// Reply bytes taken from `buffer` after the header: (start, len).
    pub reply_data: (usize, usize),
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
            holds_rmw: false,
            status_mask: u32::MAX,
            error: None,
            header: [0; REPLY_HEADER_BYTES_MAX],
            header_len: 0,
            reply_data: (0, 0),
        }
    }

    /// Bytes of client data a READ or WRITE carries.
    pub fn client_len(&self) -> usize {
        match self.command {
            Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
            _ => 0,
        }
    }

    /// Total reply bytes on the wire.
    pub fn reply_bytes(&self) -> usize {
        self.header_len + self.reply_data.1
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
