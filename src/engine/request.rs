//! One in-flight request: what it asked for, where its bytes live, and where
//! its backend work stands. A request owns its buffer and reply header from
//! the moment its header is parsed until its reply is fully sent (or, on a
//! dropped connection, until its last CQE has been reaped).

use std::time::Instant;

use crate::backend::file_io::FileTask;
use crate::backend::io::Data;
use crate::proto::Failure;
use crate::proto::reply::{REPLY_HEADER_BYTES_MAX, ReplyTo};
use crate::proto::transmission::Command;
use crate::proto::wire::EXTENDED_HEADER_BYTES;

use super::block_status::Progress;
use super::buffers::Buffer;
use super::pipes::Pipe;
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
    /// Bytes waiting in the request's pipe (a spliced read), sent by
    /// splicing them to the socket.
    Pipe { len: usize },
    /// File bytes in place, in the file's mapping (a one-copy read; see
    /// `backend::mapping`). Only the kernel reads them, as a send source.
    Mapped { at: *const u8, len: usize },
}

impl Segment {
    pub fn len(self) -> usize {
        match self {
            Segment::Inline { len, .. }
            | Segment::Buffer { len, .. }
            | Segment::Pipe { len }
            | Segment::Mapped { len, .. } => len,
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

pub struct Request {
    pub conn: u32,
    pub to: ReplyTo,
    pub command: Command,
    pub buffer: Option<Buffer>,
    /// A READ spliced from the page cache holds its data here instead of
    /// in a buffer (see `engine::pipes`).
    pub pipe: Option<Pipe>,
    /// A spliced or in-place read found its whole range a hole: its reply
    /// is one hole chunk (its pipe stays empty, its mapping untouched).
    pub hole: bool,
    /// A READ or WRITE served in place: where its range starts in the
    /// file's mapping. Its data never passes through a buffer.
    pub mapped: Option<*mut u8>,
    /// The file backend's state for this request (its buffer's place in the
    /// file, the operation it is on, block locks held).
    pub task: FileTask,
    /// BLOCK_STATUS: how far its reply has come (scans out, bytes written).
    pub status: Progress,
    /// A mutation of a tracked image counted in its worker's gate (from
    /// its start to its reply; see `worker::tracking`).
    pub gated: bool,
    /// Payload bytes received so far (WRITE only).
    pub payload_received: usize,
    /// BLOCK_STATUS: which of the connection's contexts to answer for.
    pub status_mask: u64,
    pub error: Option<Failure>,
    /// The NBD command type the client sent (what the request is counted
    /// as, also when it is refused), and when its header arrived.
    pub kind: u16,
    pub started: Instant,
    /// Its reply's buffer bytes may go to the socket zero-copy, where the
    /// connection sends so (see `worker::replies`); `conn_serial` says
    /// which connection asked, for the kernel's report on whether it
    /// copied anyway.
    pub zero_copy: bool,
    pub conn_serial: u64,
    /// Zero-copy sends of its buffer whose notification is still to come:
    /// until then the kernel may read the buffer, so it stays allocated.
    pub zc_notifs: u32,
    /// Its reply is done (sent or abandoned) and the connection has let go
    /// of it; only `zc_notifs` keep the slot and buffer.
    pub retired: bool,
    /// Reply bytes that do not live in `buffer` (headers, errors).
    inline: [u8; REPLY_INLINE_BYTES],
    inline_len: usize,
    segments: [Segment; SEGMENTS_MAX],
    segment_count: usize,
}

impl Request {
    pub fn new(conn: u32, to: ReplyTo, command: Command, started: Instant) -> Self {
        Self {
            conn,
            to,
            command,
            kind: command.wire_kind(),
            started,
            buffer: None,
            pipe: None,
            hole: false,
            mapped: None,
            task: FileTask::default(),
            status: Progress::default(),
            gated: false,
            payload_received: 0,
            status_mask: u64::MAX,
            error: None,
            zero_copy: false,
            conn_serial: 0,
            zc_notifs: 0,
            retired: false,
            inline: [0; REPLY_INLINE_BYTES],
            inline_len: 0,
            segments: [Segment::Inline { start: 0, len: 0 }; SEGMENTS_MAX],
            segment_count: 0,
        }
    }

    /// The buffer as the backend sees it (empty when there is none).
    pub fn data(&mut self) -> Data<'_> {
        match &mut self.buffer {
            Some(buffer) => Data { fixed: buffer.fixed_index(), bytes: buffer.as_mut_slice() },
            None => Data { bytes: &mut [], fixed: None },
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

    /// Appends `len` file bytes at `at` in the file's mapping.
    pub fn reply_mapped(&mut self, at: *const u8, len: usize) {
        self.push_segment(Segment::Mapped { at, len });
    }

    /// Appends the `len` bytes waiting in the request's pipe.
    pub fn reply_pipe(&mut self, len: usize) {
        debug_assert!(self.pipe.is_some());
        self.push_segment(Segment::Pipe { len });
    }

    /// Where a segment's bytes are, for the kernel to send: a slice of
    /// memory this request owns, or raw bytes of a file mapping (None for
    /// pipe bytes, which never enter memory).
    pub fn segment_bytes(&self, segment: Segment) -> Option<Bytes<'_>> {
        match segment {
            Segment::Inline { start, len } => Some(Bytes::Owned(&self.inline[start..start + len])),
            Segment::Buffer { start, len } => {
                Some(Bytes::Owned(&self.buffer.as_ref().expect("buffer segment")[start..start + len]))
            }
            Segment::Mapped { at, len } => Some(Bytes::Mapped { at, len }),
            Segment::Pipe { .. } => None,
        }
    }

    /// Total reply bytes on the wire.
    pub fn reply_bytes(&self) -> usize {
        self.segments().iter().map(|s| s.len()).sum()
    }
}

/// Reply bytes to send.
#[derive(Debug, Clone, Copy)]
pub enum Bytes<'a> {
    Owned(&'a [u8]),
    /// In a file mapping: never made into a reference (other workers'
    /// receives may be writing them; see `backend::mapping`).
    Mapped {
        at: *const u8,
        len: usize,
    },
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
