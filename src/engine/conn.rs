//! Per-connection state on a worker: the receive buffer that request
//! headers are parsed from, and the reply queue that one serialized writer
//! drains with gathered `sendmsg` calls.
//!
//! At most one receive and one send are in flight per connection. Replies
//! finish in any order and are sent in completion order; each reply is
//! contiguous on the wire because only this queue writes to the socket.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Instant;

use slab::Slab;

use crate::export::Attachment;
use crate::meta::context::SelectedContext;
use crate::net::access::Slot;
use crate::proto::transmission::{ReplyMode, RequestLimits};

use super::buffers::Refusal;
use super::request::{Bytes, Request, Segment, advance_sent};
use super::tls_transport::TlsTransport;

/// A zero-copy reply's data runs shorter than this (the pieces of a sparse
/// read between its holes) are gathered and copied with the headers: each
/// zero-copy send costs a round trip and a notification of its own.
pub const ZERO_COPY_SEGMENT_BYTES_MIN: usize = 16 << 10;
/// Holds many pipelined headers and small WRITE payloads per receive.
pub const RECV_BUFFER_BYTES: usize = 256 * 1024;
/// WRITE payloads up to this size are parsed from the receive buffer once
/// complete; larger ones are received straight into their own buffer.
/// Half the receive buffer, so a compacted buffer always has room for one.
pub const INLINE_PAYLOAD_BYTES_MAX: usize = RECV_BUFFER_BYTES / 2 - 64;
/// Replies gathered into one sendmsg (each reply is one or two iovecs).
pub const SEND_IOVECS_MAX: usize = 64;

/// Why a connection ended (the first cause wins), for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    Disconnect,
    ReceiveFailed(i32),
    SendFailed(i32),
    ProtocolViolation(String),
    StallTimeout,
    Shutdown,
    DrainDeadline,
    /// The export was removed with `--force`.
    ExportRemoved,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ClientClosed => write!(f, "client closed the connection"),
            CloseReason::Disconnect => write!(f, "client sent NBD_CMD_DISC"),
            CloseReason::ReceiveFailed(errno) => {
                write!(f, "receive failed: {}", std::io::Error::from_raw_os_error(*errno))
            }
            CloseReason::SendFailed(0) => write!(f, "send failed: the client is gone"),
            CloseReason::SendFailed(errno) => write!(f, "send failed: {}", std::io::Error::from_raw_os_error(*errno)),
            CloseReason::ProtocolViolation(what) => write!(f, "protocol violation: {what}"),
            CloseReason::StallTimeout => write!(f, "no progress from the client within --stall-timeout"),
            CloseReason::Shutdown => write!(f, "server shutting down"),
            CloseReason::DrainDeadline => write!(f, "still busy at the shutdown deadline"),
            CloseReason::ExportRemoved => write!(f, "the export was removed (--force)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    Open,
    /// No new requests; finish and send what is in flight, then close.
    Graceful,
    /// Framing lost or socket dead: drop replies, close once the kernel
    /// has returned every buffer.
    Hard,
}

/// The receive buffer: its own mapping, so an idle connection costs only the
/// pages its requests actually filled, and the pages go back to the system
/// when the mapping is dropped (a heap allocation this size would stay in
/// the allocator's arenas). A worker keeps a few for its next connections
/// (see `engine::worker`), because mapping and unmapping one per
/// connection was a noticeable part of a short connection's cost.
pub struct ReceiveBuffer {
    base: NonNull<u8>,
}

impl ReceiveBuffer {
    pub fn new() -> Self {
        // SAFETY: anonymous private mapping; no fd, no aliasing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RECV_BUFFER_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        // Address space, not memory: failing here means the process is broken.
        assert!(addr != libc::MAP_FAILED, "cannot map a receive buffer: {}", std::io::Error::last_os_error());
        Self { base: NonNull::new(addr.cast()).expect("mmap never returns null on success") }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is RECV_BUFFER_BYTES long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), RECV_BUFFER_BYTES) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), RECV_BUFFER_BYTES) }
    }
}

impl Default for ReceiveBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReceiveBuffer {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; the connection (and so
        // this buffer) is released only once no receive into it is in flight.
        unsafe { libc::munmap(self.base.as_ptr().cast(), RECV_BUFFER_BYTES) };
    }
}

pub struct Conn {
    pub socket: OwnedFd,
    /// Who the client is, for log lines.
    pub peer: String,
    /// The export, counted as in use while the connection lives.
    pub export: Attachment,
    pub limits: RequestLimits,
    pub contexts: Vec<SelectedContext>,
    /// The IDs of `contexts`, in order (for BLOCK_STATUS payloads).
    pub context_ids: Vec<u32>,
    receive: ReceiveBuffer,
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
    /// Why the connection stopped parsing requests, while it waits in the
    /// worker's stalled queue.
    pub stalled: Option<Refusal>,
    /// Buffer bytes its requests hold (its share is capped; see `buffers`).
    pub buffer_bytes: usize,
    /// Last time the client moved bytes or the connection started waiting
    /// on it; a connection that waits on its client for longer than the
    /// stall timeout is dropped.
    pub last_progress: Instant,
    pub opened_at: Instant,
    /// Requests parsed so far.
    pub requests_seen: u64,
    pub close_reason: Option<CloseReason>,
    /// Encryption below the plaintext paths, for a client that negotiated
    /// STARTTLS.
    pub tls: Option<Box<TlsTransport>>,
    /// The connection's place under the connection limits (given back when
    /// the connection is dropped).
    pub slot: Option<Slot>,
    /// The export's place in the worker's request counters.
    pub counters_slot: usize,
    /// READ and WRITE payload bytes served, for the close log line.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// The core the client's packets arrive on (its home, for placement).
    pub incoming_cpu: Option<usize>,
    /// How sure placement is of that home.
    pub home: crate::engine::worker::Home,
    /// Traffic in the current placement window.
    pub window: crate::engine::worker::Window,
    /// The worker this connection is moving to, once idle.
    pub moving_to: Option<usize>,
    /// Unique in the process: tells this connection from a later one in
    /// the same slot (a zero-copy notification may outlive it).
    pub serial: u64,
    /// Large READ replies from buffers go zero-copy (`ZeroCopySends`; TCP
    /// only); cleared once the kernel reports it copied them anyway, or
    /// refused.
    pub zero_copy: bool,
}

/// Source of `Conn::serial`.
static SERIALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        socket: OwnedFd,
        peer: String,
        export: Attachment,
        limits: RequestLimits,
        contexts: Vec<SelectedContext>,
        queue_capacity: usize,
        now: Instant,
        receive: ReceiveBuffer,
    ) -> Self {
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let message: libc::msghdr = unsafe { std::mem::zeroed() };
        Self {
            socket,
            peer,
            export,
            limits,
            context_ids: contexts.iter().map(|c| c.id).collect(),
            contexts,
            receive,
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
            stalled: None,
            buffer_bytes: 0,
            last_progress: now,
            opened_at: now,
            requests_seen: 0,
            close_reason: None,
            tls: None,
            slot: None,
            counters_slot: 0,
            bytes_read: 0,
            bytes_written: 0,
            incoming_cpu: None,
            home: crate::engine::worker::Home::Known,
            window: crate::engine::worker::Window::new(now),
            moving_to: None,
            serial: SERIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            zero_copy: false,
        }
    }

    /// Frees the connection (closing its socket) and gives back its receive
    /// buffer for another.
    pub fn into_receive_buffer(self) -> ReceiveBuffer {
        self.receive
    }

    /// Records why the connection ends, unless a cause is known already.
    pub fn closing_because(&mut self, reason: CloseReason) {
        self.close_reason.get_or_insert(reason);
    }

    /// Whether the connection cannot move until its client does: a WRITE
    /// payload is still arriving, or replies are waiting to be read.
    pub fn waits_on_client(&self) -> bool {
        self.payload_request.is_some() || self.send_in_flight || !self.send_queue.is_empty()
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub fn mode(&self) -> ReplyMode {
        self.limits.reply_mode
    }

    pub fn unparsed(&self) -> &[u8] {
        &self.receive.bytes()[self.parsed..self.filled]
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
            let (parsed, filled) = (self.parsed, self.filled);
            self.receive.bytes_mut().copy_within(parsed..filled, 0);
            self.filled -= self.parsed;
            self.parsed = 0;
        }
        let free = RECV_BUFFER_BYTES - self.filled;
        assert!(free > 0, "a header never fills the receive buffer");
        // SAFETY: filled < RECV_BUFFER_BYTES, so the pointer is in bounds.
        (unsafe { self.receive.bytes_mut().as_mut_ptr().add(self.filled) }, free)
    }

    pub fn received(&mut self, count: usize) {
        assert!(self.filled + count <= RECV_BUFFER_BYTES);
        self.filled += count;
    }

    /// What to send next: gathered reply bytes in the connection's msghdr,
    /// or bytes waiting in a spliced read's pipe. None when nothing is
    /// queued. The msghdr and iovecs live in boxes owned by the connection,
    /// which outlives the send (see `release_if_idle`). The iovecs point
    /// into requests' inline bytes inside the worker's request slab, which
    /// is why that slab never grows (asserted in `insert_request`): a
    /// reallocation would move them under the kernel.
    pub fn plan_send(&mut self, requests: &Slab<Request>) -> Option<SendPlan> {
        let mut count = 0;
        let mut parts = parts(&self.send_queue, self.send_skip, requests, self.zero_copy).peekable();
        while let Some(part) = parts.next() {
            let (at, len) = match part {
                Part::Bytes(rest) => (rest.as_ptr(), rest.len()),
                Part::Mapped { at, len } => (at, len),
                Part::Pipe { request, len } if count == 0 => {
                    return Some(SendPlan::Pipe { request, len, more: parts.peek().is_some() });
                }
                Part::ZeroCopy { request, bytes } if count == 0 => {
                    let (at, len, more) = (bytes.as_ptr(), bytes.len(), parts.peek().is_some());
                    return Some(SendPlan::ZeroCopy { request, at, len, more });
                }
                Part::Pipe { .. } | Part::ZeroCopy { .. } => {
                    // The gathered bytes go first; the rest follows at once.
                    self.message.msg_iov = self.iovecs.as_mut_ptr();
                    self.message.msg_iovlen = count;
                    return Some(SendPlan::Gather { message: &*self.message, more: true });
                }
            };
            self.iovecs[count] = libc::iovec { iov_base: at as *mut _, iov_len: len };
            count += 1;
            if count == SEND_IOVECS_MAX {
                break;
            }
        }
        if count == 0 {
            return None;
        }
        self.message.msg_iov = self.iovecs.as_mut_ptr();
        self.message.msg_iovlen = count;
        Some(SendPlan::Gather { message: &*self.message, more: false })
    }

    /// The queued reply bytes not yet sent, in wire order (what TLS
    /// encrypts instead of gathering).
    pub fn unsent<'a>(&'a self, requests: &'a Slab<Request>) -> impl Iterator<Item = &'a [u8]> {
        unsent(&self.send_queue, self.send_skip, requests)
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

/// One piece of what is still to send.
enum Part<'a> {
    Bytes(&'a [u8]),
    /// Bytes of a file mapping (see `Bytes::Mapped`).
    Mapped {
        at: *const u8,
        len: usize,
    },
    /// `len` bytes still in `request`'s pipe.
    Pipe {
        request: u32,
        len: usize,
    },
    /// Bytes of `request`'s buffer that go zero-copy.
    ZeroCopy {
        request: u32,
        bytes: &'a [u8],
    },
}

/// What `Conn::plan_send` found to send next.
pub enum SendPlan {
    /// Gathered bytes; `more`: a pipe's bytes follow at once.
    Gather { message: *const libc::msghdr, more: bool },
    /// `len` bytes from `request`'s pipe; `more`: other bytes follow.
    Pipe { request: u32, len: usize, more: bool },
    /// `len` bytes of `request`'s buffer from `at`, zero-copy; `more`:
    /// other bytes follow.
    ZeroCopy { request: u32, at: *const u8, len: usize, more: bool },
}

/// The parts of queued replies still to go, skipping the first `skip`
/// bytes (already on the wire).
fn parts<'a>(
    queue: &'a VecDeque<u32>,
    skip: usize,
    requests: &'a Slab<Request>,
    zero_copy: bool,
) -> impl Iterator<Item = Part<'a>> {
    let mut skip = skip;
    queue
        .iter()
        .flat_map(move |&id| {
            let request = &requests[id as usize];
            request.segments().iter().map(move |&segment| {
                let zero_copy = zero_copy
                    && request.zero_copy
                    && matches!(segment, Segment::Buffer { len, .. } if len >= ZERO_COPY_SEGMENT_BYTES_MIN);
                (id, segment, request.segment_bytes(segment), zero_copy)
            })
        })
        .filter_map(move |(id, segment, bytes, zero_copy)| {
            let len = segment.len();
            if skip >= len {
                skip -= len;
                return None;
            }
            let from = std::mem::take(&mut skip);
            Some(match bytes {
                Some(Bytes::Owned(bytes)) if zero_copy => Part::ZeroCopy { request: id, bytes: &bytes[from..] },
                Some(Bytes::Owned(bytes)) => Part::Bytes(&bytes[from..]),
                // SAFETY: from < len, so the pointer stays inside the segment.
                Some(Bytes::Mapped { at, len }) => Part::Mapped { at: unsafe { at.add(from) }, len: len - from },
                None => Part::Pipe { request: id, len: len - from },
            })
        })
}

/// The queued bytes still to go, for a connection that has no pipes or
/// mapped bytes (TLS encrypts from memory it owns, so its reads are never
/// spliced or served in place).
fn unsent<'a>(queue: &'a VecDeque<u32>, skip: usize, requests: &'a Slab<Request>) -> impl Iterator<Item = &'a [u8]> {
    parts(queue, skip, requests, false).map(|part| match part {
        Part::Bytes(bytes) | Part::ZeroCopy { bytes, .. } => bytes,
        Part::Pipe { .. } | Part::Mapped { .. } => unreachable!("TLS connections splice and map nothing"),
    })
}
