//! Drives the pure handshake machine over a blocking socket under a
//! deadline. Runs on a handshake thread of its own, so a silent or slow
//! client only ever delays itself.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::proto::handshake::{
    ExportGate, ExportInfo, Handshake, HandshakeError, HandshakeLimits, Negotiated, Progress, Refusal, TlsOffer, Want,
};
use crate::tls::channel::{Parts, TlsChannel};
use crate::tls::{TlsError, TlsMode, TlsServer, TlsSession};

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
    /// The TLS handshake after STARTTLS failed (the spec says: terminate).
    #[error("TLS handshake: {0}")]
    Tls(String),
}

/// What a client negotiates against: the exports, the limits, TLS, and the
/// gate deciding which exports this client may use.
pub struct Terms<'a> {
    pub exports: &'a [ExportInfo],
    pub limits: HandshakeLimits,
    pub timeout: Duration,
    pub tls: Option<&'a TlsServer>,
    pub gate: &'a dyn ExportGate,
}

/// A finished negotiation: what was agreed, and the TLS session if the
/// client upgraded (with the ciphertext it sent that is not yet read).
pub struct Outcome {
    pub negotiated: Negotiated,
    pub tls: Option<Parts>,
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
    /// The TLS handshake finished; the gate may now learn who the client is.
    pub tls_started: &'a dyn Fn(&dyn TlsSession),
}

/// The connection as negotiation sees it: plaintext, then maybe TLS.
enum Link<'s, S: TimedStream> {
    Plain(&'s mut S),
    Tls(TlsChannel<'s, S>),
}

impl<S: TimedStream> Read for Link<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(c) => c.read(buf),
        }
    }
}

impl<S: TimedStream> Write for Link<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(c) => c.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Tls(c) => c.flush(),
        }
    }
}

impl<S: TimedStream> TimedStream for Link<'_, S> {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.set_timeouts(timeout),
            Link::Tls(c) => c.socket.set_timeouts(timeout),
        }
    }
}

impl<'s, S: TimedStream> Link<'s, S> {
    fn into_tls_parts(self) -> Option<Parts> {
        match self {
            Link::Plain(_) => None,
            Link::Tls(c) => Some(c.into_parts()),
        }
    }
}

fn offer(tls: Option<&TlsServer>) -> TlsOffer {
    match tls.map(|t| t.mode) {
        None | Some(TlsMode::Off) => TlsOffer::Off,
        Some(TlsMode::On) => TlsOffer::On,
        Some(TlsMode::Require) => TlsOffer::Require,
    }
}

/// STARTTLS was acknowledged: the TLS handshake, under the deadline.
fn upgrade<'s, S: TimedStream>(
    link: Link<'s, S>,
    tls: &TlsServer,
    deadline: &mut Deadline,
    observer: &Observer<'_>,
) -> Result<Link<'s, S>, NegotiateError> {
    let Link::Plain(socket) = link else {
        return Err(NegotiateError::Tls("STARTTLS twice".into()));
    };
    let session = tls.session().map_err(|e: TlsError| NegotiateError::Tls(e.to_string()))?;
    deadline.arm(socket)?;
    let mut channel = TlsChannel::new(socket, session);
    channel.handshake(deadline.at).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NegotiateError::Deadline,
        _ => NegotiateError::Tls(e.to_string()),
    })?;
    (observer.progressed)();
    (observer.tls_started)(channel.session());
    Ok(Link::Tls(channel))
}

/// Negotiates; returns None if the client aborted.
/// Once `shutdown` is set, remaining options are refused with ERR_SHUTDOWN.
pub fn negotiate<S: TimedStream>(
    stream: &mut S,
    terms: &Terms<'_>,
    shutdown: &AtomicBool,
    observer: &Observer<'_>,
) -> Result<Option<Outcome>, NegotiateError> {
    let progressed = observer.progressed;
    let mut deadline = Deadline { at: Instant::now() + terms.timeout, armed: None };
    let mut machine = Handshake::with_policy(terms.exports, terms.limits, offer(terms.tls), terms.gate);
    let mut link = Link::Plain(stream);
    let mut out = Vec::with_capacity(256);
    machine.greeting(&mut out);
    send(&mut link, &mut out, &mut deadline)?;
    let mut input = Vec::new();
    loop {
        match machine.want() {
            Want::Bytes(n) => {
                input.resize(n, 0);
                receive(&mut link, &mut input, &mut deadline, progressed)?;
                if shutdown.load(Ordering::Acquire) {
                    machine.set_shutting_down();
                }
                let progress = machine.feed(&input, &mut out)?;
                machine.take_refusals().iter().for_each(observer.refused);
                match progress {
                    Progress::Continue => send(&mut link, &mut out, &mut deadline)?,
                    Progress::StartTls => {
                        send(&mut link, &mut out, &mut deadline)?;
                        let tls = terms.tls.expect("STARTTLS is accepted only when TLS is configured");
                        link = upgrade(link, tls, &mut deadline, observer)?;
                        machine.tls_started();
                    }
                    Progress::Ready(negotiated) => {
                        send(&mut link, &mut out, &mut deadline)?;
                        link.set_timeouts(None)?;
                        return Ok(Some(Outcome { negotiated, tls: link.into_tls_parts() }));
                    }
                    Progress::Aborted => {
                        // The client may close before reading the ACK.
                        let _ = send(&mut link, &mut out, &mut deadline);
                        return Ok(None);
                    }
                }
            }
            Want::Discard(mut n) => {
                let mut scratch = [0u8; DISCARD_CHUNK_BYTES];
                while n > 0 {
                    let chunk = n.min(DISCARD_CHUNK_BYTES);
                    receive(&mut link, &mut scratch[..chunk], &mut deadline, progressed)?;
                    n -= chunk;
                }
                machine.discarded(&mut out);
                machine.take_refusals().iter().for_each(observer.refused);
                send(&mut link, &mut out, &mut deadline)?;
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
