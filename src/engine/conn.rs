//! Per-connection state on a worker: the receive buffer that request
//! headers are parsed from, and the reply queue that one serialized writer
//! drains with gathered `sendmsg` calls.
//!
//! At most one receive and one send are in flight per connection. Replies
//! finish in any order and are sent in completion order; each reply is
//! contiguous on the wire because only this queue writes to the socket.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use slab::Slab;

use crate::export::Export;
use crate::proto::meta::ContextKind;
use crate::proto::transmission::{ReplyMode, RequestLimits};

use super::request::{Request, advance_sent};

/// Holds many pipelined headers and small WRITE payloads per receive.
pub const RECV_BUFFER_BYTES: usize = 256 * 1024;
/// WRITE payloads up to this size are parsed from the receive buffer once
/// complete; larger ones are received straight into their own buffer.
/// Half the receive buffer, so a compacted buffer always has room for one.
pub const INLINE_PAYLOAD_BYTES_MAX: usize = RECV_BUFFER_BYTES / 2 - 64;
/// Replies gathered into one sendmsg (each reply is one or two iovecs).
pub const SEND_IOVECS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    Open,
    /// No new requests; finish and send what is in flight, then close.
    Graceful,
    /// Framing lost or socket dead: drop replies, close once the kernel
    /// has returned every buffer.
    Hard,
}

pub struct Conn {
    pub socket: OwnedFd,
    pub export: Arc<Export>,
    /// Position of `export` in the server's export list.
    pub export_index: usize,
    pub limits: RequestLimits,
    pub contexts: Vec<(u32, ContextKind)>,
    receive: Box<[u8]>,
    /// Invariant: `0 <= parsed <= filled <= RECV_BUFFER_BYTES`.
    parsed: usize,
    filled: usize,
    /// Payload bytes of a rejected request still to be skipped.
    pub drain: u64,
    /// The WRITE whose payload is being received straight into its buffer.
    pub payload_request: Option<u32>,
    pub recv_in_flight: bool,
    pub send_in_flight: bool,
    /// Requests holding a slot: from header parse to reply sent.
    pub inflight: usize,
    pub send_queue: VecDeque<u32>,
    /// Bytes of `send_queue[0]` already on the wire. Invariant: less than its size.
    send_skip: usize,
    iovecs: Box<[libc::iovec; SEND_IOVECS_MAX]>,
    message: Box<libc::msghdr>,
    pub closing: Closing,
    pub stalled: bool,
}

impl Conn {
    pub fn new(
        socket: OwnedFd,
        export: Arc<Export>,
        export_index: usize,
        limits: RequestLimits,
        contexts: Vec<(u32, ContextKind)>,
        queue_capacity: usize,
    ) -> Self {
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let message: libc::msghdr = unsafe { std::mem::zeroed() };
        Self {
            socket,
            export,
            export_index,
            limits,
            contexts,
            receive: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            parsed: 0,
            filled: 0,
            drain: 0,
            payload_request: None,
            recv_in_flight: false,
            send_in_flight: false,
            inflight: 0,
            send_queue: VecDeque::with_capacity(queue_capacity),
            send_skip: 0,
            iovecs: Box::new([empty; SEND_IOVECS_MAX]),
            message: Box::new(message),
            closing: Closing::Open,
            stalled: false,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub fn mode(&self) -> ReplyMode {
        self.limits.reply_mode
    }

    pub fn unparsed(&self) -> &[u8] {
        &self.receive[self.parsed..self.filled]
    }

    pub fn consume(&mut self, count: usize) {
        assert!(count <= self.filled - self.parsed);
        self.parsed += count;
    }

    /// Where the next receive lands: compacts unparsed bytes to the front
    /// so a whole header (and usually its payload) fits.
    pub fn receive_target(&mut self) -> (*mut u8, usize) {
        if self.parsed == self.filled {
            self.parsed = 0;
            self.filled = 0;
        } else if self.parsed > 0 && RECV_BUFFER_BYTES - self.filled < RECV_BUFFER_BYTES / 2 {
            self.receive.copy_within(self.parsed..self.filled, 0);
            self.filled -= self.parsed;
            self.parsed = 0;
        }
        let free = RECV_BUFFER_BYTES - self.filled;
        assert!(free > 0, "a header never fills the receive buffer");
        // SAFETY: filled < RECV_BUFFER_BYTES, so the pointer is in bounds.
        (unsafe { self.receive.as_mut_ptr().add(self.filled) }, free)
    }

    pub fn received(&mut self, count: usize) {
        assert!(self.filled + count <= RECV_BUFFER_BYTES);
        self.filled += count;
    }

    /// Gathers queued replies into the connection's msghdr. Returns None
    /// when nothing is queued. The msghdr and iovecs live in boxes owned by
    /// the connection, which outlives the send (see `Worker::release`).
    pub fn build_send(&mut self, requests: &Slab<Request>) -> Option<*const libc::msghdr> {
        let mut count = 0;
        let mut skip = self.send_skip;
        'requests: for &id in &self.send_queue {
            let request = &requests[id as usize];
            for &segment in request.segments() {
                let part = request.segment_bytes(segment);
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                if count == SEND_IOVECS_MAX {
                    break 'requests;
                }
                let rest = &part[skip..];
                skip = 0;
                self.iovecs[count] = libc::iovec { iov_base: rest.as_ptr() as *mut _, iov_len: rest.len() };
                count += 1;
            }
        }
        if count == 0 {
            return None;
        }
        self.message.msg_iov = self.iovecs.as_mut_ptr();
        self.message.msg_iovlen = count;
        Some(&*self.message)
    }

    /// Accounts for `sent` bytes; returns how many queue entries are done
    /// (the caller pops and frees them).
    pub fn sent(&mut self, sent: usize, requests: &Slab<Request>) -> usize {
        let sizes = self.send_queue.iter().map(|&id| requests[id as usize].reply_bytes());
        let (done, skip) = advance_sent(sizes, self.send_skip, sent);
        self.send_skip = skip;
        done
    }
}
