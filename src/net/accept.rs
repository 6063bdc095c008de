//! The accept thread and the handshake threads.
//!
//! The accept thread polls every listener plus a stop eventfd. Each
//! accepted socket (admitted by `admission`) goes to a handshake thread
//! that negotiates with blocking I/O under the handshake deadline and then
//! hands the socket to a worker.
//!
//! Handshake threads are kept for a while after their handshake, waiting
//! for the next socket: starting a thread costs more server CPU than a
//! whole short connection (nbdinfo, a backup tool's probe, one map of a
//! dirty context), so a steady stream of them reuses a few threads, and a
//! burst starts as many as it needs, which then wind down to
//! [`IDLE_THREADS_MAX`].

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::engine::handoff::{NewConnection, Offers};
use crate::proto::handshake::{HandshakeLimits, Negotiated};

use super::access::{ClientGate, ConnectionLimits, Peer, SharedPolicy, Slot};
use super::admission::{Handshakes, Ticket};
use super::listener::Listener;
use super::negotiate::{NegotiateError, Observer, Terms, TimedStream, negotiate};
use crate::export::Export;
use crate::meta::context::SelectedContext;
use crate::proto::handshake::Refusal;
use crate::proto::wire::option_name;
use crate::tls::channel::Parts;
use crate::tls::{TlsServer, TlsSession};

/// Where negotiated connections go: implemented by the server's worker set.
pub trait Dispatch: Send + Sync {
    fn dispatch(&self, connection: NewConnection);
}

pub struct AcceptConfig {
    /// What each handshake negotiates over (taken when it starts).
    pub offers: Arc<dyn Offers>,
    pub limits_handshake: HandshakeLimits,
    pub handshake_timeout: Duration,
    /// Concurrent handshakes; beyond it the oldest idle one is shed (see
    /// `net::admission`).
    pub handshakes_max: usize,
    pub verbose: bool,
    /// Set when the server stops: handshakes in progress get ERR_SHUTDOWN.
    pub shutdown: Arc<AtomicBool>,
    /// STARTTLS, when `--tls` is on or required.
    pub tls: Option<Arc<TlsServer>>,
    pub access: Arc<SharedPolicy>,
    pub limits: Arc<ConnectionLimits>,
}

/// Handshake threads kept waiting for a socket once theirs is done.
const IDLE_THREADS_MAX: usize = 4;
/// A kept thread with no socket for this long exits.
const IDLE_THREAD_KEEP: Duration = Duration::from_secs(30);

/// A socket on its way to a handshake thread.
type Job = (Socket, Ticket);

/// How long the accept loop pauses after hitting the descriptor limit, so
/// shed handshakes can close theirs.
const FD_LIMIT_BACKOFF: Duration = Duration::from_millis(5);
/// At most one log line about the descriptor limit per this long.
const FD_LIMIT_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Accept-side state: the handshakes in progress and what to do at the
/// descriptor limit.
struct Acceptor {
    handshakes: Arc<Handshakes>,
    /// Held open so that, at the descriptor limit, one can be given up to
    /// accept a waiting client and close it at once: it learns it was
    /// refused instead of hanging in the backlog.
    reserve_fd: Option<std::fs::File>,
    refused_since_log: u64,
    last_log: Option<Instant>,
    kept: Arc<KeptThreads>,
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.kept.close();
    }
}

/// Handshake threads waiting for a socket. A socket is given only to a
/// thread already waiting, so it never queues behind another's handshake.
/// (A mutex and condvar rather than a channel: waiting threads sleep in the
/// kernel at once instead of spinning and yielding first, which on a small
/// machine takes the CPU from the very connection being served.)
#[derive(Default)]
struct KeptThreads {
    state: std::sync::Mutex<KeptState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct KeptState {
    waiting: usize,
    /// Given but not yet taken; never more than `waiting`.
    jobs: std::collections::VecDeque<Job>,
    closed: bool,
}

impl KeptThreads {
    /// Hands `job` to a waiting thread, or gives it back.
    fn give(&self, job: Job) -> Result<(), Job> {
        let mut state = self.state.lock().expect("handshake pool lock");
        if state.waiting <= state.jobs.len() {
            return Err(job);
        }
        state.jobs.push_back(job);
        self.wake.notify_one();
        Ok(())
    }

    /// The next socket for a thread whose handshake is done, or None when
    /// it should exit: enough threads are kept already, none came within
    /// [`IDLE_THREAD_KEEP`], or the accept loop is gone.
    fn take(&self) -> Option<Job> {
        let mut state = self.state.lock().expect("handshake pool lock");
        if state.waiting >= IDLE_THREADS_MAX || state.closed {
            return None;
        }
        state.waiting += 1;
        let deadline = Instant::now() + IDLE_THREAD_KEEP;
        let job = loop {
            // Jobs are checked first, so one given just before a timeout
            // or close is still taken.
            if let Some(job) = state.jobs.pop_front() {
                break Some(job);
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                break None;
            }
            state = self.wake.wait_timeout(state, deadline - now).expect("handshake pool lock").0;
        };
        state.waiting -= 1;
        job
    }

    fn close(&self) {
        self.state.lock().expect("handshake pool lock").closed = true;
        self.wake.notify_all();
    }
}

/// Runs until `stop_fd` (an eventfd) becomes readable.
pub fn accept_loop(listeners: &[Listener], stop_fd: RawFd, config: Arc<AcceptConfig>, dispatch: Arc<dyn Dispatch>) {
    let mut acceptor = Acceptor {
        handshakes: Handshakes::new(config.handshakes_max),
        reserve_fd: std::fs::File::open("/dev/null").ok(),
        refused_since_log: 0,
        last_log: None,
        kept: Arc::default(),
    };
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| l.fd())
        .chain(std::iter::once(stop_fd))
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    loop {
        // SAFETY: fds is a valid array of pollfd for its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            crate::note!("poll failed: {}", io::Error::last_os_error());
            return;
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (listener, pollfd) in listeners.iter().zip(&fds) {
            if pollfd.revents != 0 {
                acceptor.accept_one(listener, &config, &dispatch);
            }
        }
    }
}

impl Acceptor {
    fn accept_one(&mut self, listener: &Listener, config: &Arc<AcceptConfig>, dispatch: &Arc<dyn Dispatch>) {
        let accepted = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, peer)| Socket::Tcp(s, peer)),
            Listener::Unix(l, path, _) => l.accept().map(|(s, _)| Socket::Unix(s, path.display().to_string())),
        };
        let socket = match accepted {
            Ok(socket) => socket,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                return self.at_fd_limit(listener);
            }
            Err(e) => {
                crate::note!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        };
        let Some(ticket) = self.handshakes.admit(socket.fd(), &socket.peer_address()) else {
            if config.verbose {
                crate::note!("refusing {}: every handshake slot is busy", socket.peer());
            }
            return; // dropping closes it
        };
        let Err(job) = self.kept.give((socket, ticket)) else { return };
        let (config, dispatch, kept) = (Arc::clone(config), Arc::clone(dispatch), Arc::clone(&self.kept));
        let spawned = std::thread::Builder::new()
            .name("ringnbd-handshake".into())
            .stack_size(256 * 1024)
            .spawn(move || handshake_thread(job, &kept, &config, &*dispatch));
        if let Err(e) = spawned {
            crate::note!("cannot start handshake thread: {e}");
        }
    }

    /// Out of descriptors: make room by shedding an idle handshake if there
    /// is one (the waiting client is accepted on the next turn), else refuse
    /// the waiting client cleanly through the reserve descriptor. Either way
    /// the loop does not spin, and the log gets one line per period.
    fn at_fd_limit(&mut self, listener: &Listener) {
        self.refused_since_log += 1;
        let now = Instant::now();
        if self.last_log.is_none_or(|at| now.duration_since(at) >= FD_LIMIT_LOG_PERIOD) {
            crate::note!(
                "accept: out of file descriptors ({} connection attempt(s) held back since the last \
                 report); raise the limit (ulimit -n, LimitNOFILE=) or reduce the clients",
                self.refused_since_log
            );
            self.last_log = Some(now);
            self.refused_since_log = 0;
        }
        if self.handshakes.shed_idle() {
            std::thread::sleep(FD_LIMIT_BACKOFF);
            return;
        }
        if self.reserve_fd.take().is_some() {
            let _ = match listener {
                Listener::Tcp(l) => l.accept().map(drop),
                Listener::Unix(l, _, _) => l.accept().map(drop),
            };
            self.reserve_fd = std::fs::File::open("/dev/null").ok();
        }
        std::thread::sleep(FD_LIMIT_BACKOFF);
    }
}

enum Socket {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream, String),
}

impl Socket {
    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s, _) => s.as_raw_fd(),
            Socket::Unix(s, _) => s.as_raw_fd(),
        }
    }

    /// The client, for log lines.
    fn peer(&self) -> String {
        match self {
            Socket::Tcp(_, peer) => peer.to_string(),
            Socket::Unix(_, path) => path.clone(),
        }
    }

    /// What per-peer limits count by: the IP address (any port), or the
    /// socket for local clients.
    fn peer_address(&self) -> String {
        match self {
            Socket::Tcp(_, peer) => peer.ip().to_string(),
            Socket::Unix(_, path) => path.clone(),
        }
    }

    /// What access rules match against.
    fn peer_facts(&self) -> Peer {
        let (ip, uid) = match self {
            Socket::Tcp(_, peer) => (Some(peer.ip()), None),
            Socket::Unix(s, _) => (None, peer_uid(s.as_raw_fd())),
        };
        let address = match (ip, uid) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(uid)) => format!("uid {uid}"),
            (None, None) => self.peer(),
        };
        Peer { ip, uid, address }
    }
}

/// The uid of a Unix-socket client, as the kernel recorded it at connect.
fn peer_uid(fd: RawFd) -> Option<u32> {
    // SAFETY: ucred is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live local.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    (rc == 0).then_some(cred.uid)
}

/// Runs `first`, then later sockets while it is one of the kept threads.
fn handshake_thread(first: Job, kept: &KeptThreads, config: &AcceptConfig, dispatch: &dyn Dispatch) {
    let mut job = Some(first);
    while let Some((socket, ticket)) = job {
        handshake(socket, ticket, config, dispatch);
        job = kept.take();
    }
}

/// Negotiates on `socket` and hands it on; returns whether it reached
/// transmission.
fn handshake(socket: Socket, ticket: Ticket, config: &AcceptConfig, dispatch: &dyn Dispatch) -> bool {
    let peer = socket.peer();
    let facts = socket.peer_facts();
    let (result, fd): (Result<_, NegotiateError>, OwnedFd) = match socket {
        Socket::Tcp(mut s, _) => {
            let _ = s.set_nodelay(true);
            (run(&mut s, config, &ticket, &peer, facts), s.into())
        }
        Socket::Unix(mut s, _) => (run(&mut s, config, &ticket, &peer, facts), s.into()),
    };
    // Deregister before the descriptor is closed or handed on (see
    // `admission`): from here nobody else may shut it down.
    drop(ticket);
    match result {
        Ok(Some(Agreed { negotiated, export, contexts, tls, slot })) => {
            let Some(export) = export.attach() else {
                // Removed while this client negotiated it: the client sees
                // the connection close as it starts transmission.
                crate::note!("{peer}: export {:?} was removed during the handshake; closing", export.info.name);
                return false;
            };
            let incoming_cpu = incoming_cpu(&fd).or_else(current_cpu);
            dispatch.dispatch(NewConnection {
                socket: fd,
                negotiated,
                export,
                contexts,
                peer,
                incoming_cpu,
                tls,
                slot,
            });
            true
        }
        Ok(None) => false,
        Err(e) => {
            if config.verbose {
                crate::note!("handshake with {peer}: {e}");
            }
            false
        }
    }
}

/// Serves one connection that is already open (`-s`: a socket on stdin,
/// from inetd or libnbd's `nbd_connect_command`): negotiates on this
/// thread and hands it to a worker. Returns whether it reached
/// transmission; the caller ends the server when it did not, or when it
/// closes.
pub fn serve_one(socket: OwnedFd, config: &AcceptConfig, dispatch: &dyn Dispatch) -> io::Result<bool> {
    let family = socket_family(socket.as_raw_fd())?;
    let socket = match family {
        libc::AF_UNIX => Socket::Unix(UnixStream::from(socket), "stdin".to_owned()),
        libc::AF_INET | libc::AF_INET6 => {
            let stream = TcpStream::from(socket);
            let peer = stream.peer_addr()?;
            Socket::Tcp(stream, peer)
        }
        other => return Err(io::Error::other(format!("stdin is a socket of address family {other}"))),
    };
    let handshakes = Handshakes::new(1);
    let ticket = handshakes.admit(socket.fd(), &socket.peer_address()).expect("one slot for one socket");
    Ok(handshake(socket, ticket, config, dispatch))
}

/// The address family of socket `fd` (an error when it is not a socket).
fn socket_family(fd: RawFd) -> io::Result<libc::c_int> {
    let mut family: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into a live local.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut family as *mut libc::c_int).cast(), &mut len)
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(family) }
}

/// The core that processed the socket's last incoming packets: the NIC
/// queue's interrupt core on a real network, the sender's core on loopback.
fn incoming_cpu(fd: &OwnedFd) -> Option<usize> {
    let mut cpu: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `cpu` for an open socket.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&mut cpu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && cpu >= 0).then_some(cpu as usize)
}

/// Where this thread runs now. Unix sockets have no incoming CPU, but the
/// handshake thread was just woken by the client's last option, and the
/// scheduler wakes a thread on or beside its waker's core: the best guess
/// of where the client runs, so that its worker is not woken across cores
/// on every request (on the 2-vCPU test VM that tripled a short
/// connection's server CPU, see doc/benchmarks.md).
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only reads the CPU number.
    let cpu = unsafe { libc::sched_getcpu() };
    (cpu >= 0).then_some(cpu as usize)
}

/// What a handshake agreed on: the options, the export, its contexts, the
/// TLS session if any, and the connection's place under the limits.
struct Agreed {
    negotiated: Negotiated,
    export: Arc<Export>,
    contexts: Vec<SelectedContext>,
    tls: Option<Parts>,
    slot: Option<Slot>,
}

fn run<S: TimedStream>(
    stream: &mut S,
    config: &AcceptConfig,
    ticket: &Ticket,
    peer: &str,
    facts: Peer,
) -> Result<Option<Agreed>, NegotiateError> {
    let offer = config.offers.current();
    let policy = config.access.current();
    let gate = ClientGate {
        exports: &offer.exports,
        policy: &policy,
        limits: &config.limits,
        peer: facts,
        identity: Default::default(),
        slot: Default::default(),
    };
    let progressed = || ticket.progressed();
    // Refusals are always logged: an access or limit refusal is something
    // an operator needs to see, and each costs one line per option.
    // Refusals an operator must see (access, limits, TLS required, an
    // export that does not exist) are always logged; routine ones, such as
    // a client probing for an option, only with -v.
    let refused = |r: &Refusal| {
        use crate::proto::wire::{REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN};
        if config.verbose || matches!(r.reply, REP_ERR_POLICY | REP_ERR_TLS_REQD | REP_ERR_UNKNOWN) {
            let option = option_name(r.option);
            crate::log::event(
                "option-refused",
                &[
                    ("peer", serde_json::json!(peer)),
                    ("option", serde_json::json!(option)),
                    ("reply", serde_json::json!(crate::proto::wire::reply_name(r.reply))),
                    ("reason", serde_json::json!(r.reason)),
                ],
                &format!("{peer}: refused {option}: {}", r.reason),
            );
        }
    };
    let tls_started = |session: &dyn TlsSession| {
        let identity = session.identity();
        if config.verbose {
            crate::note!("{peer}: {} with {identity}", session.describe());
        }
        *gate.identity.borrow_mut() = Some(identity);
    };
    let observer = Observer { progressed: &progressed, refused: &refused, tls_started: &tls_started };
    let terms = Terms {
        exports: &offer.exports,
        limits: config.limits_handshake,
        timeout: config.handshake_timeout,
        tls: config.tls.as_deref(),
        gate: &gate,
    };
    let outcome = negotiate(stream, &terms, &config.shutdown, &observer)?;
    Ok(outcome.map(|o| Agreed {
        contexts: offer.selected(&o.negotiated),
        export: offer.export(&o.negotiated),
        negotiated: o.negotiated,
        tls: o.tls,
        slot: gate.slot.take(),
    }))
}
