//! The accepting threads: each waits for a client on every listener,
//! accepts it, negotiates with blocking I/O under the handshake deadline
//! and hands the socket to a worker.
//!
//! A thread accepts for itself, rather than being handed sockets by one
//! accept thread, because a hand-off is a second wake-up per connection,
//! and on small machines a wake-up is much of what a short connection
//! (nbdinfo, a backup tool's probe, one map of a dirty context) costs the
//! server. They share one epoll set: its waiters are woken one at a time,
//! each listener is registered one-shot (the thread it wakes accepts one
//! client and re-arms it, which wakes the next waiter if more are queued),
//! and the stop eventfd level-triggered, so that stopping wakes them all in
//! turn.
//!
//! So that a client never waits behind another's handshake, a thread that
//! accepts when no other is waiting starts one first. Threads are kept
//! after their handshake, because starting a thread costs more server CPU
//! than a whole short connection: one for good, and others while fewer
//! than [`IDLE_THREADS_MAX`] wait, each leaving after [`IDLE_THREAD_KEEP`]
//! without a client. The thread that calls [`accept_loop`] only waits for
//! the stop signal; it then ends the handshakes in progress.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// Accepting threads kept waiting once their handshake is done (the
/// permanent one always waits, and counts).
const IDLE_THREADS_MAX: usize = 4;
/// A kept thread with no client for this long exits.
const IDLE_THREAD_KEEP: Duration = Duration::from_secs(30);

/// A socket and its handshake slot.
type Job = (Socket, Ticket);

/// How long an accepting thread pauses after hitting the descriptor
/// limit, so shed handshakes can close theirs.
const FD_LIMIT_BACKOFF: Duration = Duration::from_millis(5);
/// At most one log line about the descriptor limit per this long.
const FD_LIMIT_LOG_PERIOD: Duration = Duration::from_secs(10);

/// What every accepting thread shares.
struct Acceptors {
    listeners: Vec<Listener>,
    poller: Poller,
    config: Arc<AcceptConfig>,
    dispatch: Arc<dyn Dispatch>,
    handshakes: Arc<Handshakes>,
    /// Threads in `epoll_wait` now: one that accepts when this is 0 starts
    /// another first.
    waiting: AtomicUsize,
    fd_limit: Mutex<FdLimit>,
}

/// What to do at the descriptor limit.
struct FdLimit {
    /// Held open so that, at the descriptor limit, one can be given up to
    /// accept a waiting client and close it at once: it learns it was
    /// refused instead of hanging in the backlog.
    reserve_fd: Option<std::fs::File>,
    refused_since_log: u64,
    last_log: Option<Instant>,
}

/// The epoll set every accepting thread waits in: the listeners (by
/// index, one-shot) and the stop eventfd.
struct Poller {
    epoll: OwnedFd,
    /// The stop eventfd (owned here, so that no thread ever polls a
    /// descriptor number that was closed and reused).
    stop: OwnedFd,
}

/// The event data that marks the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;
const LISTENER_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;

enum Woken {
    Stop,
    TimedOut,
    /// This listener has a client; it stays disarmed until [`Poller::rearm`].
    Ready(usize),
}

impl Poller {
    fn new(listeners: &[Listener], stop: OwnedFd) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor this function owns.
        let poller = Self { epoll: unsafe { OwnedFd::from_raw_fd(fd) }, stop };
        for (index, listener) in listeners.iter().enumerate() {
            poller.control(libc::EPOLL_CTL_ADD, listener.fd(), LISTENER_EVENTS, index as u64)?;
        }
        poller.control(libc::EPOLL_CTL_ADD, poller.stop.as_raw_fd(), libc::EPOLLIN as u32, STOP_TOKEN)?;
        Ok(poller)
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: (re)registers an open descriptor with our epoll set;
        // `event` is a live local the kernel copies.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Lets listener `index` wake a thread again (after its one client).
    fn rearm(&self, listeners: &[Listener], index: usize) {
        if let Err(e) = self.control(libc::EPOLL_CTL_MOD, listeners[index].fd(), LISTENER_EVENTS, index as u64) {
            // Cannot happen for a listener we registered and keep open; if
            // it did, that listener would take no more clients.
            crate::note!("cannot re-arm a listener: {e}");
        }
    }

    /// Waits for one client or the stop signal, up to `timeout` (None: for
    /// ever).
    fn wait(&self, timeout: Option<Duration>) -> io::Result<Woken> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: room for the one event asked for.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut event, 1, timeout_ms) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            0 => Ok(Woken::TimedOut),
            _ if event.u64 == STOP_TOKEN => Ok(Woken::Stop),
            _ => Ok(Woken::Ready(event.u64 as usize)),
        }
    }
}

/// Serves the listeners until `stop` (an eventfd) becomes readable, on the
/// threads it starts, while this one waits for the stop signal; then ends
/// the handshakes in progress and removes the Unix socket files this
/// process bound. The listeners must be non-blocking
/// ([`Listener::set_nonblocking`]), so that a thread never blocks in
/// accept.
pub fn accept_loop(
    listeners: Vec<Listener>,
    stop: OwnedFd,
    config: Arc<AcceptConfig>,
    dispatch: Arc<dyn Dispatch>,
) -> io::Result<()> {
    let stop_fd = stop.as_raw_fd();
    let shared = Arc::new(Acceptors {
        poller: Poller::new(&listeners, stop)?,
        listeners,
        handshakes: Handshakes::new(config.handshakes_max),
        config,
        dispatch,
        waiting: AtomicUsize::new(0),
        fd_limit: Mutex::new(FdLimit {
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            refused_since_log: 0,
            last_log: None,
        }),
    });
    shared.start_thread(true)?;
    wait_readable(stop_fd);
    // Threads blocked on a silent client would otherwise wait for their
    // deadline; the rest see the stop signal or the shutdown flag.
    shared.handshakes.end_all();
    for listener in &shared.listeners {
        listener.remove_socket_file();
    }
    Ok(())
}

/// Blocks until `fd` is readable (it is never read: others poll it too).
fn wait_readable(fd: RawFd) {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd, as passed.
        let rc = unsafe { libc::poll(&mut pollfd, 1, -1) };
        if rc > 0 || (rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
            return;
        }
    }
}

/// One accepting thread. The `permanent` one never times out and returns
/// only at stop.
fn accepting_thread(shared: &Arc<Acceptors>, permanent: bool) {
    no_wakeup_preemption();
    loop {
        if !shared.enter_wait(permanent) {
            return;
        }
        let woken = shared.poller.wait(if permanent { None } else { Some(IDLE_THREAD_KEEP) });
        shared.waiting.fetch_sub(1, Ordering::AcqRel);
        let index = match woken {
            Ok(Woken::Stop) => return,
            Ok(Woken::TimedOut) if !permanent => return,
            Ok(Woken::TimedOut) => continue,
            Ok(Woken::Ready(index)) => index,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::note!("epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let job = shared.accept_one(&shared.listeners[index]);
        shared.poller.rearm(&shared.listeners, index);
        let Some(job) = job else { continue };
        // Nobody else waits: start a thread before this handshake, so the
        // next client is not kept behind it.
        if shared.waiting.load(Ordering::Acquire) == 0
            && let Err(e) = shared.start_thread(false)
        {
            crate::note!("cannot start an accepting thread: {e}");
        }
        handshake(job.0, job.1, &shared.config, &*shared.dispatch);
    }
}

/// Puts the calling thread in SCHED_BATCH, whose only effect that matters
/// here is that waking it does not preempt the task running on its core.
///
/// A client sends an option in pieces (libnbd: a send per field, with
/// MSG_MORE, which Unix sockets ignore), and its connect wakes this thread
/// on the client's own core. With wakeup preemption each piece switched to
/// this thread, which read it and slept again until the next: 16 switches
/// per nbdinfo connection instead of about 5, and with them the handshake
/// took 27% of a dirty-map connection's server samples in perf
/// (doc/benchmarks.md). Without it the
/// client finishes its option and blocks for the reply, and this thread
/// then reads the whole option at once. A handshake is not
/// latency-critical to the microsecond; workers keep normal scheduling.
fn no_wakeup_preemption() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's policy (pid 0) from a live local;
    // failure leaves the default policy, which only costs CPU.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

impl Acceptors {
    fn start_thread(self: &Arc<Self>, permanent: bool) -> io::Result<()> {
        let shared = Arc::clone(self);
        std::thread::Builder::new()
            .name("ringnbd-handshake".into())
            .stack_size(256 * 1024)
            .spawn(move || accepting_thread(&shared, permanent))
            .map(drop)
    }

    /// Counts the caller as waiting, or says it should exit: after stop,
    /// and for a thread that would be one more than [`IDLE_THREADS_MAX`]
    /// waiting (the permanent one always waits).
    fn enter_wait(&self, permanent: bool) -> bool {
        if permanent {
            self.waiting.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        if self.config.shutdown.load(Ordering::Acquire) {
            return false;
        }
        let mut waiting = self.waiting.load(Ordering::Acquire);
        loop {
            if waiting >= IDLE_THREADS_MAX {
                return false;
            }
            match self.waiting.compare_exchange_weak(waiting, waiting + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => waiting = now,
            }
        }
    }

    /// Accepts one client of `listener` and gives it a handshake slot; None
    /// when there was none (another thread took it), or it was refused.
    fn accept_one(&self, listener: &Listener) -> Option<Job> {
        let accepted = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, peer)| Socket::Tcp(s, peer)),
            Listener::Unix(l, path, _) => l.accept().map(|(s, _)| Socket::Unix(s, path.display().to_string())),
        };
        let socket = match accepted {
            Ok(socket) => socket,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                self.at_fd_limit(listener);
                return None;
            }
            Err(e) => {
                crate::note!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                return None;
            }
        };
        let Some(ticket) = self.handshakes.admit(socket.fd(), &socket.peer_address()) else {
            if self.config.verbose {
                crate::note!("refusing {}: every handshake slot is busy", socket.peer());
            }
            return None; // dropping closes it
        };
        Some((socket, ticket))
    }

    /// Out of descriptors: make room by shedding an idle handshake if there
    /// is one (the waiting client is accepted on the next turn), else refuse
    /// the waiting client cleanly through the reserve descriptor. Either way
    /// the thread does not spin, and the log gets one line per period.
    fn at_fd_limit(&self, listener: &Listener) {
        let mut limit = self.fd_limit.lock().unwrap_or_else(|e| e.into_inner());
        limit.refused_since_log += 1;
        let now = Instant::now();
        if limit.last_log.is_none_or(|at| now.duration_since(at) >= FD_LIMIT_LOG_PERIOD) {
            crate::note!(
                "accept: out of file descriptors ({} connection attempt(s) held back since the last \
                 report); raise the limit (ulimit -n, LimitNOFILE=) or reduce the clients",
                limit.refused_since_log
            );
            limit.last_log = Some(now);
            limit.refused_since_log = 0;
        }
        if !self.handshakes.shed_idle() && limit.reserve_fd.take().is_some() {
            let _ = match listener {
                Listener::Tcp(l) => l.accept().map(drop),
                Listener::Unix(l, _, _) => l.accept().map(drop),
            };
            limit.reserve_fd = std::fs::File::open("/dev/null").ok();
        }
        drop(limit);
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

/// Negotiates on `socket` and hands it on; returns whether it reached
/// transmission.
fn handshake(socket: Socket, ticket: Ticket, config: &AcceptConfig, dispatch: &dyn Dispatch) -> bool {
    let peer = socket.peer();
    let facts = socket.peer_facts();
    let tcp = matches!(socket, Socket::Tcp(..));
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
            // A Unix socket has no incoming core to ask for.
            let measured = if tcp { incoming_cpu(&fd) } else { None };
            dispatch.dispatch(NewConnection {
                socket: fd,
                negotiated,
                export,
                contexts,
                peer,
                incoming_cpu: measured.or_else(current_cpu),
                home_measured: measured.is_some(),
                tcp,
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
