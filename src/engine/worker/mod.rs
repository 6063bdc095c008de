//! A worker: one pinned thread, one io_uring, its own buffers, and the
//! connections handed to it after negotiation.
//!
//! Loop: flush spilled SQEs and wait for a completion; copy a batch of CQEs
//! out; dispatch each by its [`Token`]; retry deferred requests and stalled
//! connections. Nothing on this path blocks except `io_uring_enter`.
//!
//! The worker's concerns live in submodules, all `impl Worker`:
//! - `lifecycle`: connections arriving, closing, draining at shutdown, and
//!   the housekeeping timer (stall timeout, idle buffers);
//! - `admission`: receiving and parsing requests, and deciding whether a
//!   connection may take a slot and buffer now (its share) or must wait;
//! - `execute`: running requests against the backends and the context
//!   sources;
//! - `tracking`: checkpoint gates and the group commit of change-tracking
//!   marks before mutations reach their data;
//! - `replies`: encoding replies, the per-connection send queue, freeing.

mod admission;
mod execute;
mod lifecycle;
mod placement;
mod replies;
mod tracking;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use io_uring::{opcode, types};
use slab::Slab;

use super::lookup::LookupService;
use crate::proto::extent::Extent;

use super::EngineError;
use super::buffers::{Budget, BufferPool};
use super::conn::{Conn, ReceiveBuffer};
use super::handoff::WorkerMessage;
use super::metrics::WorkerCounters;
use super::pipes::PipePool;
use super::request::Request;
use super::ring::{Completion, REAP_BATCH_MAX, Ring};
use super::user_data::Token;
use crate::backend::copy_buffers::CopyBuffers;
use crate::backend::file_io::ZeroRegion;

/// Every per-worker limit, set once at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub ring_entries: u32,
    /// Requests one connection may have between header and reply sent.
    pub inflight_per_conn_max: usize,
    /// Request slots across all of the worker's connections. The slab is
    /// allocated with exactly this capacity and never grows: the iovecs of a
    /// send in flight point into requests' inline reply bytes, so a slab
    /// reallocation would leave the kernel reading freed memory.
    pub requests_max: usize,
    pub payload_bytes_max: u32,
    /// Descriptors per context in one BLOCK_STATUS reply.
    pub extents_max: usize,
    /// How long shutdown waits for in-flight requests before it drops the
    /// connections still busy (a client stalled mid-payload, or one that
    /// stopped reading its replies, would otherwise hold the server forever).
    pub drain_timeout: Duration,
    /// How long a connection may wait on its client (a WRITE payload that
    /// stops arriving, replies nobody reads) before it is dropped, freeing
    /// what it holds.
    pub stall_timeout: Duration,
    /// Kernel submission polling with this idle timeout (`--sqpoll`).
    pub sqpoll_idle_ms: Option<u32>,
    /// Count requests per export and command (`--stats`, see `metrics`).
    pub count_requests: bool,
    /// Move connections between workers by their traffic (`placement`;
    /// on with `--placement local`).
    pub move_connections: bool,
    /// How large READs and WRITEs of in-memory files move.
    pub large_reads: LargeReads,
    pub large_writes: LargeWrites,
    /// Whether large READ replies leave their buffers zero-copy.
    pub zero_copy_sends: ZeroCopySends,
    pub verbose: bool,
}

/// How large READs of in-memory (tmpfs) files reach the socket
/// (`--large-reads`); doc/benchmarks.md measures each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LargeReads {
    /// Copied into a buffer, then sent: two copies per byte on the server.
    Copy,
    /// Sent from the file's mapping: one copy, the kernel's
    /// (`backend::mapping`).
    #[default]
    InPlace,
    /// Spliced from the page cache through a pipe: no copy on the server,
    /// a cost per page (`engine::pipes`).
    Splice,
}

/// How large WRITEs of in-memory files reach the file (`--large-writes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LargeWrites {
    /// Received into a buffer, then copied into the file.
    #[default]
    Copy,
    /// Received straight into the file's mapping (untracked images without
    /// snapshots only: the data lands as it arrives).
    InPlace,
}

/// Whether the data of large READ replies served from buffers (O_DIRECT
/// and buffered files on disk, anything not in place or spliced) goes to
/// the socket zero-copy (`--zero-copy-sends`, see `replies`): the kernel
/// sends from the buffer itself, which stays the request's until the
/// kernel says it is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ZeroCopySends {
    /// Zero-copy until the kernel reports, for a connection, that it had
    /// to copy anyway (a peer on this host: loopback, veth), where a plain
    /// send is cheaper; that connection then copies.
    #[default]
    Auto,
    /// Always zero-copy (to measure it where the kernel copies anyway).
    On,
    /// Always copy into the socket.
    Off,
}

/// How long deferred requests (waiting for a block lock) and connections
/// stalled on buffer pressure wait before a retry.
const DEFER_RETRY_NS: u32 = 200_000;
/// The housekeeping period (the stall timeout is checked this often).
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);
/// Receive buffers a worker keeps from closed connections (each maps
/// `conn::RECV_BUFFER_BYTES`; kept ones hold on to the pages their last
/// connection touched, at most a megabyte per worker).
const SPARE_RECEIVE_BUFFERS_MAX: usize = 4;

pub struct Worker {
    // Declared first so it is dropped first: the kernel lets go of every
    // buffer, timespec and msghdr below before they are freed.
    ring: Ring,
    index: usize,
    pool: BufferPool,
    /// Pipes of spliced reads (see `engine::pipes`).
    pipes: PipePool,
    zeroes: ZeroRegion,
    /// Buffers layered mutations copy chunks up through; dropped after the
    /// ring like `zeroes`.
    copies: CopyBuffers,
    /// Per image, by `Image::id`: the checkpoint gate and the state-file
    /// commit. They grow when a new id shows up (exports added while
    /// serving); ids are reused only once every connection to the image is
    /// gone, when both are back to their resting state.
    gates: Vec<tracking::Gate>,
    commits: Vec<tracking::Commit>,
    /// Some mutation waits for a commit not yet submitted.
    commit_wanted: bool,
    conns: Slab<Box<Conn>>,
    /// Fixed capacity (`requests_max`); see `WorkerConfig::requests_max`.
    requests: Slab<Request>,
    config: WorkerConfig,
    incoming: Receiver<WorkerMessage>,
    wake_fd: Arc<OwnedFd>,
    /// Target of the eventfd read; boxed so its address is stable while the
    /// read is in flight.
    wake_value: Box<u64>,
    tick: Box<types::Timespec>,
    tick_armed: bool,
    /// The tick fired since stalled connections were last retried.
    tick_fired: bool,
    drain_deadline: Box<types::Timespec>,
    housekeeping_period: Box<types::Timespec>,
    housekeeping_armed: bool,
    /// Requests waiting for a block lock, retried every loop turn.
    deferred: VecDeque<u32>,
    /// Connections waiting for a slot or buffers, retried in FIFO order so
    /// none is starved by the others.
    stalled: VecDeque<u32>,
    /// A slot or buffer was freed since stalled connections were retried.
    freed: bool,
    /// Requests kept only for their zero-copy notifications (see
    /// `free_request`).
    zero_copy_retired: usize,
    /// Shutdown's drain deadline passed: stop waiting for anything.
    drain_deadline_passed: bool,
    /// Connections released since freed heap memory was last handed back.
    released_since_trim: usize,
    load: Arc<AtomicUsize>,
    shutdown: Arc<AtomicBool>,
    draining: bool,
    batch: Vec<Completion>,
    /// Scratch for BLOCK_STATUS answers gathered inline.
    extents: Vec<Extent>,
    /// Vectors returned by lookup helpers, reused for the next jobs.
    spare_extents: Vec<Vec<Extent>>,
    /// Receive buffers of closed connections, for the next ones.
    spare_receive_buffers: Vec<ReceiveBuffer>,
    lookups: LookupService,
    /// The time of the current loop turn (one clock read per turn).
    now: Instant,
    /// Request counters, unless `--stats off`.
    counters: Option<WorkerCounters>,
    /// The core this worker is pinned to.
    cpu: Option<usize>,
    /// Every worker, this one included (set once all exist).
    peers: placement::Peers,
}

pub use placement::{Home, Peers, Window};

pub struct WorkerParts {
    pub index: usize,
    pub config: WorkerConfig,
    pub incoming: Receiver<WorkerMessage>,
    pub wake_fd: Arc<OwnedFd>,
    pub load: Arc<AtomicUsize>,
    pub shutdown: Arc<AtomicBool>,
    pub budget: Arc<Budget>,
    pub cpu: Option<usize>,
    pub peers: placement::Peers,
}

fn timespec(duration: Duration) -> Box<types::Timespec> {
    Box::new(types::Timespec::new().sec(duration.as_secs()).nsec(duration.subsec_nanos()))
}

impl Worker {
    pub fn new(parts: WorkerParts) -> Result<Self, EngineError> {
        let config = parts.config;
        let ring = Ring::new(config.ring_entries, config.sqpoll_idle_ms).map_err(EngineError::Ring)?;
        let wanted = BufferPool::slots_wanted(&parts.budget);
        let slots = if ring.reserve_buffer_slots(wanted) { wanted } else { 0 };
        if slots == 0 && parts.index == 0 {
            crate::note!(
                "this kernel cannot register buffers as they are mapped (Linux 5.19+); I/O buffers stay unregistered"
            );
        }
        let pool = BufferPool::new(parts.budget, slots);
        let zeroes = ZeroRegion::new().map_err(EngineError::Buffers)?;
        let copies = CopyBuffers::new().map_err(EngineError::Buffers)?;
        let lookups = LookupService::spawn(parts.index, Arc::clone(&parts.wake_fd)).map_err(EngineError::Helper)?;
        let housekeeping = HOUSEKEEPING_PERIOD.min(config.stall_timeout / 2).max(Duration::from_millis(10));
        Ok(Self {
            ring,
            lookups,
            index: parts.index,
            pool,
            pipes: PipePool::default(),
            zeroes,
            copies,
            gates: Vec::new(),
            commits: Vec::new(),
            commit_wanted: false,
            conns: Slab::with_capacity(64),
            requests: Slab::with_capacity(config.requests_max),
            incoming: parts.incoming,
            wake_fd: parts.wake_fd,
            wake_value: Box::new(0),
            tick: Box::new(types::Timespec::new().nsec(DEFER_RETRY_NS)),
            tick_armed: false,
            tick_fired: false,
            drain_deadline: timespec(config.drain_timeout),
            housekeeping_period: timespec(housekeeping),
            housekeeping_armed: false,
            deferred: VecDeque::with_capacity(config.requests_max),
            stalled: VecDeque::with_capacity(64),
            freed: false,
            zero_copy_retired: 0,
            drain_deadline_passed: false,
            released_since_trim: 0,
            load: parts.load,
            shutdown: parts.shutdown,
            draining: false,
            batch: Vec::with_capacity(REAP_BATCH_MAX),
            extents: Vec::with_capacity(config.extents_max.min(1 << 16)),
            spare_extents: Vec::new(),
            spare_receive_buffers: Vec::with_capacity(SPARE_RECEIVE_BUFFERS_MAX),
            now: Instant::now(),
            counters: config.count_requests.then(WorkerCounters::default),
            cpu: parts.cpu,
            peers: parts.peers,
            config,
        })
    }

    pub fn run(mut self) -> Result<(), EngineError> {
        self.post_wake_read();
        // Notifications of zero-copy sends come once the peer has the data;
        // a peer that stopped acknowledging holds them until the deadline.
        // Then the worker leaves anyway: the kernel holds its own reference
        // to the pages it still sends, so unmapping the buffers is safe.
        while !(self.draining && self.conns.is_empty() && (self.zero_copy_retired == 0 || self.drain_deadline_passed)) {
            self.ring.submit_and_wait().map_err(EngineError::Ring)?;
            self.now = Instant::now();
            let mut batch = std::mem::take(&mut self.batch);
            self.ring.reap(&mut batch);
            for completion in &batch {
                self.on_completion(*completion);
            }
            self.batch = batch;
            self.retry_deferred();
            self.retry_stalled();
            self.submit_commits();
        }
        Ok(())
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: every entry built by this worker points into memory owned by
        // a connection (boxed), a request's buffer, or the worker itself, and
        // none of those is freed before the entry's CQE is reaped (see
        // `release_if_idle` and `free_request`).
        unsafe { self.ring.push(entry) };
    }

    fn on_completion(&mut self, c: Completion) {
        match Token::decode(c.user_data) {
            Token::Recv { conn } => self.on_recv(conn, c.result),
            Token::Send { conn } => self.on_send(conn, c.result),
            Token::Writable { conn } => self.on_writable(conn, c.result),
            Token::SendZc { request } => self.on_send_zc(request, c.result, c.flags),
            Token::Request { request } => self.on_io(request, c.result),
            Token::Commit { image, sequence } => self.on_commit(usize::from(image), sequence, c.result),
            Token::Wake => self.on_wake(),
            Token::Tick => {
                self.tick_armed = false;
                self.tick_fired = true;
            }
            Token::Cancel => {}
            Token::DrainDeadline => self.drain_expired(),
            Token::Housekeeping => self.housekeeping(),
        }
    }

    fn post_wake_read(&mut self) {
        let target: *mut u64 = &mut *self.wake_value;
        let entry = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), target.cast(), 8)
            .build()
            .user_data(Token::Wake.encode());
        self.push(entry);
    }

    fn arm_tick(&mut self) {
        if self.tick_armed {
            return;
        }
        self.tick_armed = true;
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(Token::Tick.encode());
        self.push(entry);
    }
}
