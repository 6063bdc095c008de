//! The accept thread and the handshake threads.
//!
//! The accept thread polls every listener plus a stop eventfd. Each
//! accepted socket gets a short-lived handshake thread (admitted by
//! `admission`) that negotiates with blocking I/O under the handshake
//! deadline and then hands the socket to a worker.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::engine::handoff::NewConnection;
use crate::proto::handshake::{ExportInfo, HandshakeLimits};

use super::admission::{Handshakes, Ticket};
use super::listener::Listener;
use super::negotiate::{NegotiateError, Observer, TimedStream, negotiate};
use crate::proto::handshake::Refusal;
use crate::proto::wire::option_name;

/// Where negotiated connections go: implemented by the server's worker set.
pub trait Dispatch: Send + Sync {
    fn dispatch(&self, connection: NewConnection);
}

pub struct AcceptConfig {
    pub exports: Arc<[ExportInfo]>,
    pub limits: HandshakeLimits,
    pub handshake_timeout: Duration,
    /// Concurrent handshakes; beyond it the oldest idle one is shed (see
    /// `net::admission`).
    pub handshakes_max: usize,
    pub verbose: bool,
    /// Set when the server stops: handshakes in progress get ERR_SHUTDOWN.
    pub shutdown: Arc<AtomicBool>,
}

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
}

/// Runs until `stop_fd` (an eventfd) becomes readable.
pub fn accept_loop(listeners: &[Listener], stop_fd: RawFd, config: Arc<AcceptConfig>, dispatch: Arc<dyn Dispatch>) {
    let mut acceptor = Acceptor {
        handshakes: Handshakes::new(config.handshakes_max),
        reserve_fd: std::fs::File::open("/dev/null").ok(),
        refused_since_log: 0,
        last_log: None,
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
            eprintln!("ringnbd: poll failed: {}", io::Error::last_os_error());
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
                eprintln!("ringnbd: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        };
        let Some(ticket) = self.handshakes.admit(socket.fd(), &socket.peer_address()) else {
            if config.verbose {
                eprintln!("ringnbd: refusing {}: every handshake slot is busy", socket.peer());
            }
            return; // dropping closes it
        };
        let (config, dispatch) = (Arc::clone(config), Arc::clone(dispatch));
        let spawned = std::thread::Builder::new()
            .name("ringnbd-handshake".into())
            .stack_size(256 * 1024)
            .spawn(move || handshake(socket, ticket, &config, &*dispatch));
        if let Err(e) = spawned {
            eprintln!("ringnbd: cannot start handshake thread: {e}");
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
            eprintln!(
                "ringnbd: accept: out of file descriptors ({} connection attempt(s) held back since the last \
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
}

fn handshake(socket: Socket, ticket: Ticket, config: &AcceptConfig, dispatch: &dyn Dispatch) {
    let peer = socket.peer();
    let (result, fd): (Result<_, NegotiateError>, OwnedFd) = match socket {
        Socket::Tcp(mut s, _) => {
            let _ = s.set_nodelay(true);
            (run(&mut s, config, &ticket, &peer), s.into())
        }
        Socket::Unix(mut s, _) => (run(&mut s, config, &ticket, &peer), s.into()),
    };
    // Deregister before the descriptor is closed or handed on (see
    // `admission`): from here nobody else may shut it down.
    drop(ticket);
    match result {
        Ok(Some(negotiated)) => {
            let incoming_cpu = incoming_cpu(&fd);
            dispatch.dispatch(NewConnection { socket: fd, negotiated, peer, incoming_cpu })
        }
        Ok(None) => {}
        Err(e) if config.verbose => eprintln!("ringnbd: handshake with {peer}: {e}"),
        Err(_) => {}
    }
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

fn run<S: TimedStream>(
    stream: &mut S,
    config: &AcceptConfig,
    ticket: &Ticket,
    peer: &str,
) -> Result<Option<crate::proto::handshake::Negotiated>, NegotiateError> {
    let progressed = || ticket.progressed();
    let refused = |r: &Refusal| {
        if config.verbose {
            eprintln!("ringnbd: {peer}: refused {}: {}", option_name(r.option), r.reason);
        }
    };
    let observer = Observer { progressed: &progressed, refused: &refused };
    negotiate(stream, &config.exports, config.limits, config.handshake_timeout, &config.shutdown, &observer)
}
