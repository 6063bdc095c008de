//! The ring loop of one worker thread: one io_uring, some connections.
//!
//! Each tick: ask the job for requests for every free slot, queue one send
//! batch and one recv per connection, submit and wait (bounded by the next
//! open-loop due time and [`TICK`]), then copy all completions out and
//! dispatch them. Requests are never issued from inside dispatch, so there
//! is no recursion and a tick's work is bounded.
//!
//! The submission queue cannot overflow: it holds two entries per
//! connection and a connection never has more than one send and one recv
//! in flight. For the same reason the completion queue cannot overflow.
//!
//! Every `unsafe` of the load path is here: pushing SQEs whose pointers
//! reach into connection buffers. Those buffers are heap blocks allocated
//! once per connection; connections live as long as the worker, whose
//! `Drop` waits for the kernel to let go of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, squeue, types};
use thiserror::Error;

use crate::conn::{Conn, ServerFailure};
use crate::job::{Job, Next};
use crate::user_data::{self, Op, Owner};
use ringnbd::proto::client::codec::{EncodeError, error_name};

/// The longest a worker sleeps before checking the abort flag and timeouts.
const TICK: Duration = Duration::from_millis(100);
/// How long a disconnect waits for the server to close each connection.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long teardown waits for the kernel after shutting sockets down.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The ring could not be created.
    #[error("io_uring setup failed: {0}")]
    RingSetup(std::io::Error),
    /// The kernel lacks a feature the engine needs.
    #[error("io_uring: {0}")]
    Unsupported(&'static str),
    /// io_uring_enter failed.
    #[error("io_uring_enter: {0}")]
    Ring(std::io::Error),
    /// A socket operation failed.
    #[error("connection {conn}: {operation} failed: {error}")]
    Socket { conn: usize, operation: &'static str, error: std::io::Error },
    /// The server closed the connection while requests were outstanding or
    /// before the client disconnected.
    #[error("connection {conn}: the server closed the connection ({outstanding} requests outstanding)")]
    Closed { conn: usize, outstanding: usize },
    /// The server broke the protocol.
    #[error("connection {conn}: protocol violation: {error}")]
    Protocol { conn: usize, error: String },
    /// The server failed a request.
    #[error("connection {conn}: server replied {} ({}) to {} of {} bytes at offset {}{}",
        error_name(failure.code), failure.code, failure.command.name(), failure.length, failure.offset,
        if failure.message.is_empty() { String::new() } else { format!(": {}", failure.message) })]
    Server { conn: usize, failure: ServerFailure },
    /// A request got no reply in time.
    #[error("connection {conn}: no reply to {command} at offset {offset} after {waited:?}")]
    Timeout { conn: usize, command: &'static str, offset: u64, waited: Duration },
    /// A request could not be encoded (a bug: lengths are checked before).
    #[error("{0}")]
    Encode(EncodeError),
    /// Another worker failed first.
    #[error("stopped because another worker failed")]
    Aborted,
    /// A completion nobody submitted.
    #[error("internal error: {0}")]
    Internal(String),
}

pub struct Worker {
    ring: IoUring,
    conns: Vec<Conn>,
    timeout: Duration,
    /// Completions copied out of the CQ; capacity = CQ size (no allocation).
    completions: Vec<(u64, i32)>,
    /// Per connection: the job said `Finished` in this run.
    finished: Vec<bool>,
}

impl Worker {
    pub fn new(conns: Vec<Conn>, timeout: Duration) -> Result<Self, EngineError> {
        assert!(!conns.is_empty() && conns.len() < user_data::CONNECTIONS_MAX);
        let entries = (2 * conns.len()).next_power_of_two().max(8) as u32;
        // Single issuer + deferred task run: completions are processed only
        // when this thread enters the kernel, which is when it wants them.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(EngineError::RingSetup)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(EngineError::Unsupported("waiting with a timeout needs IORING_FEAT_EXT_ARG (Linux 5.11+)"));
        }
        let completions = Vec::with_capacity(ring.params().cq_entries() as usize);
        let finished = vec![false; conns.len()];
        Ok(Worker { ring, conns, timeout, completions, finished })
    }

    /// Runs `job` until every connection is finished and drained.
    pub fn run<J: Job>(&mut self, job: &mut J, abort: &AtomicBool) -> Result<(), EngineError> {
        self.finished.fill(false);
        let mut next_check = Instant::now() + TICK;
        loop {
            if abort.load(Ordering::Relaxed) {
                return Err(EngineError::Aborted);
            }
            let now = Instant::now();
            let mut wake = now + TICK;
            let mut active = false;
            for i in 0..self.conns.len() {
                if !self.finished[i] {
                    self.refill(i, job, now, &mut wake)?;
                }
                self.submit_io(i);
                let conn = &self.conns[i];
                active |= !self.finished[i] || conn.awaiting() > 0 || !conn.send_idle();
            }
            if !active {
                return Ok(());
            }
            self.wait(wake)?;
            let now = Instant::now();
            self.reap();
            for k in 0..self.completions.len() {
                let (data, result) = self.completions[k];
                self.dispatch(data, result, job, now)?;
            }
            if now >= next_check {
                self.check_timeouts(now)?;
                next_check = now + TICK;
            }
        }
    }

    /// Asks the job for a request for each free slot of connection `i`.
    fn refill<J: Job>(&mut self, i: usize, job: &mut J, now: Instant, wake: &mut Instant) -> Result<(), EngineError> {
        let conn = &mut self.conns[i];
        while let Some(slot) = conn.take_free_slot() {
            match job.next(i, slot, now) {
                Next::Issue(issue) => {
                    conn.issue(slot, issue, now, |payload| job.fill(i, slot, issue.offset, payload))?
                }
                Next::WaitUntil(due) => {
                    conn.return_slot(slot);
                    *wake = (*wake).min(due);
                    break;
                }
                Next::Idle => {
                    conn.return_slot(slot);
                    break;
                }
                Next::Finished => {
                    conn.return_slot(slot);
                    self.finished[i] = true;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Queues connection `i`'s next send batch and recv, if due.
    fn submit_io(&mut self, i: usize) {
        if let Some(entry) = self.conns[i].next_send(i) {
            self.push(&entry);
        }
        if let Some(entry) = self.conns[i].next_recv(i) {
            self.push(&entry);
        }
    }

    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: the entry's pointers (msghdr, iovecs, slot buffers, the
        // staging buffer) point into heap blocks of a `Conn` owned by this
        // worker. They are allocated once and never resized, and the `Conn`
        // is not dropped while the operation is in flight: the in-flight
        // flags are cleared only by the matching completion, and `Drop`
        // waits for those (or leaks the connections).
        let pushed = unsafe { self.ring.submission().push(entry) };
        pushed.expect("the SQ holds two entries per connection, the most ever in flight");
    }

    fn wait(&mut self, until: Instant) -> Result<(), EngineError> {
        let timeout = until.saturating_duration_since(Instant::now());
        let timespec = types::Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&timespec);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            // Timed out, interrupted, or the CQ needs reaping first: all
            // mean "look at the completions and come back".
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {
                Ok(())
            }
            Err(e) => Err(EngineError::Ring(e)),
        }
    }

    fn reap(&mut self) {
        self.completions.clear();
        for cqe in self.ring.completion() {
            self.completions.push((cqe.user_data(), cqe.result()));
        }
    }

    fn dispatch<J: Job>(&mut self, data: u64, result: i32, job: &mut J, now: Instant) -> Result<(), EngineError> {
        match user_data::classify(data) {
            Owner::Send(i) => self.conns[i].on_send(result),
            Owner::Recv(i) => match self.conns[i].on_recv(result, job, i, now)? {
                Some(failure) => Err(EngineError::Server { conn: self.conns[i].global, failure }),
                None => Ok(()),
            },
            Owner::Unknown(value) => Err(EngineError::Internal(format!("completion with user_data {value:#x}"))),
        }
    }

    fn check_timeouts(&self, now: Instant) -> Result<(), EngineError> {
        for conn in &self.conns {
            if let Some((command, offset, issued)) = conn.oldest_awaiting() {
                let waited = now.saturating_duration_since(issued);
                if waited > self.timeout {
                    return Err(EngineError::Timeout { conn: conn.global, command: command.name(), offset, waited });
                }
            }
        }
        Ok(())
    }

    /// Clean end: NBD_CMD_DISC on every connection, then wait for the
    /// server to close. Call only after `run` returned Ok (nothing in flight
    /// but the recvs).
    pub fn disconnect(&mut self) -> Result<(), EngineError> {
        for conn in &mut self.conns {
            assert!(conn.awaiting() == 0 && conn.send_idle(), "disconnect with requests in flight");
            let request = conn.disconnect_request()?;
            let length = request.len();
            // SAFETY: sending from a live buffer of `length` bytes on a
            // socket this connection owns.
            let sent = unsafe { libc::send(conn.raw_fd(), request.as_ptr().cast(), length, libc::MSG_NOSIGNAL) };
            if sent != length as isize {
                let error = std::io::Error::last_os_error();
                return Err(EngineError::Socket { conn: conn.global, operation: "send DISC", error });
            }
            // SAFETY: shutdown on an fd this connection owns.
            unsafe { libc::shutdown(conn.raw_fd(), libc::SHUT_WR) };
        }
        let deadline = Instant::now() + DISCONNECT_WAIT;
        let mut result = Ok(());
        while self.conns.iter().any(|c| !c.eof) && Instant::now() < deadline {
            for i in 0..self.conns.len() {
                self.submit_io(i);
            }
            self.wait(deadline.min(Instant::now() + TICK))?;
            self.reap();
            for k in 0..self.completions.len() {
                let (data, value) = self.completions[k];
                if let Owner::Recv(i) = user_data::classify(data)
                    && let Err(e) = self.conns[i].on_recv_after_disconnect(value)
                {
                    result = result.and(Err(e));
                }
            }
        }
        result
    }

    /// Shuts every socket down so pending operations complete, then waits
    /// for them. If the kernel does not let go in time, the connections are
    /// leaked rather than freed under it.
    fn drain(&mut self) {
        if self.conns.iter().all(|c| c.ops_in_flight() == 0) {
            return;
        }
        for conn in &self.conns {
            // SAFETY: shutdown on an fd this connection owns.
            unsafe { libc::shutdown(conn.raw_fd(), libc::SHUT_RDWR) };
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        while self.conns.iter().any(|c| c.ops_in_flight() > 0) && Instant::now() < deadline {
            // Submit anything still queued so its completion can arrive.
            if self.wait(deadline.min(Instant::now() + TICK)).is_err() {
                break;
            }
            self.reap();
            for k in 0..self.completions.len() {
                let (data, _) = self.completions[k];
                match user_data::classify(data) {
                    Owner::Send(i) => self.conns[i].forget(Op::Send),
                    Owner::Recv(i) => self.conns[i].forget(Op::Recv),
                    Owner::Unknown(_) => {}
                }
            }
        }
        if self.conns.iter().any(|c| c.ops_in_flight() > 0) {
            eprintln!("ringnbd-bench: the kernel kept buffers after shutdown; leaking them");
            std::mem::forget(std::mem::take(&mut self.conns));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.drain();
    }
}
