//! Drives the pure handshake machine over a blocking socket under a
//! deadline. Runs on a handshake thread of its own, so a silent or slow
//! client only ever delays itself.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::proto::handshake::{
    ExportInfo, Handshake, HandshakeError, HandshakeLimits, Negotiated, Progress, Refusal, Want,
};

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NegotiateError {
    /// The client did not finish negotiating in time.
    #[error("handshake deadline passed")]
    Deadline,
    /// The socket failed or the client went away.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol badly enough to be dropped.
    #[error(transparent)]
    Protocol(#[from] HandshakeError),
}

/// A socket whose read and write timeouts can be set (TCP or Unix).
pub trait TimedStream: Read + Write {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedStream for std::net::TcpStream {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

impl TimedStream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

/// How far past the deadline one blocking call may end. Socket timeouts
/// are relative to each call, so keeping them exact means two setsockopt
/// calls before every read and write (a fifth of a short connection's
/// system calls); instead they are re-armed with the time left only when
/// this much has passed since the last arming.
const DEADLINE_SLACK: Duration = Duration::from_millis(10);

/// The handshake deadline, enforced through the socket's timeouts.
struct Deadline {
    at: Instant,
    /// When the timeouts were last set (to the time left then).
    armed: Option<Instant>,
}

impl Deadline {
    /// Before a blocking call: fails once the deadline has passed, and
    /// makes sure the call cannot block beyond it by more than
    /// [`DEADLINE_SLACK`].
    fn arm<S: TimedStream>(&mut self, stream: &S) -> Result<(), NegotiateError> {
        let now = Instant::now();
        let left = self.at.saturating_duration_since(now);
        if left.is_zero() {
            return Err(NegotiateError::Deadline);
        }
        if self.armed.is_none_or(|armed| now.duration_since(armed) >= DEADLINE_SLACK) {
            stream.set_timeouts(Some(left))?;
            self.armed = Some(now);
        }
        Ok(())
    }
}

/// Scratch for skipping oversized options without buffering them.
const DISCARD_CHUNK_BYTES: usize = 16 * 1024;

/// What the driver tells its caller while negotiating.
pub struct Observer<'a> {
    /// The client has sent something (it is not idle).
    pub progressed: &'a dyn Fn(),
    /// An option was refused (for the log).
    pub refused: &'a dyn Fn(&Refusal),
}

/// Negotiates; returns None if the client aborted.
/// Once `shutdown` is set, remaining options are refused with ERR_SHUTDOWN.
pub fn negotiate<S: TimedStream>(
    stream: &mut S,
    exports: &[ExportInfo],
    limits: HandshakeLimits,
    timeout: Duration,
    shutdown: &AtomicBool,
    observer: &Observer<'_>,
) -> Result<Option<Negotiated>, NegotiateError> {
    let progressed = observer.progressed;
    let mut deadline = Deadline { at: Instant::now() + timeout, armed: None };
    let mut machine = Handshake::new(exports, limits);
    let mut out = Vec::with_capacity(256);
    machine.greeting(&mut out);
    send(stream, &mut out, &mut deadline)?;
    let mut input = Vec::new();
    loop {
        match machine.want() {
            Want::Bytes(n) => {
                input.resize(n, 0);
                receive(stream, &mut input, &mut deadline, progressed)?;
                if shutdown.load(Ordering::Acquire) {
                    machine.set_shutting_down();
                }
                let progress = machine.feed(&input, &mut out)?;
                machine.take_refusals().iter().for_each(observer.refused);
                match progress {
                    Progress::Continue => send(stream, &mut out, &mut deadline)?,
                    Progress::Ready(negotiated) => {
                        send(stream, &mut out, &mut deadline)?;
                        stream.set_timeouts(None)?;
                        return Ok(Some(negotiated));
                    }
                    Progress::Aborted => {
                        // The client may close before reading the ACK.
                        let _ = send(stream, &mut out, &mut deadline);
                        return Ok(None);
                    }
                }
            }
            Want::Discard(mut n) => {
                let mut scratch = [0u8; DISCARD_CHUNK_BYTES];
                while n > 0 {
                    let chunk = n.min(DISCARD_CHUNK_BYTES);
                    receive(stream, &mut scratch[..chunk], &mut deadline, progressed)?;
                    n -= chunk;
                }
                machine.discarded(&mut out);
                machine.take_refusals().iter().for_each(observer.refused);
                send(stream, &mut out, &mut deadline)?;
            }
        }
    }
}

fn map_timeout(e: io::Error) -> NegotiateError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NegotiateError::Deadline,
        _ => NegotiateError::Io(e),
    }
}

fn receive<S: TimedStream>(
    stream: &mut S,
    buf: &mut [u8],
    deadline: &mut Deadline,
    progressed: &dyn Fn(),
) -> Result<(), NegotiateError> {
    let mut filled = 0;
    while filled < buf.len() {
        deadline.arm(stream)?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(NegotiateError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                filled += n;
                progressed();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(map_timeout(e)),
        }
    }
    Ok(())
}

fn send<S: TimedStream>(stream: &mut S, out: &mut Vec<u8>, deadline: &mut Deadline) -> Result<(), NegotiateError> {
    if out.is_empty() {
        return Ok(());
    }
    deadline.arm(stream)?;
    stream.write_all(out).map_err(map_timeout)?;
    out.clear();
    Ok(())
}
