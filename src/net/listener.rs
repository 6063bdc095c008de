//! Listening sockets and the accept thread.
//!
//! The accept thread polls every listener plus a stop eventfd. Each
//! accepted socket gets a short-lived handshake thread (bounded by
//! `handshakes_max`) that negotiates with blocking I/O under the handshake
//! deadline and then hands the socket to the least-loaded worker.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;

use crate::engine::worker::NewConnection;
use crate::proto::handshake::{ExportInfo, HandshakeLimits};

use super::negotiate::{NegotiateError, TimedStream, negotiate};

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetError {
    /// A listen address did not parse.
    #[error("bad listen address {0:?} (use HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:10809)")]
    BadAddress(String),
    /// bind() or listen() failed.
    #[error("cannot listen on {what}: {source}")]
    Bind { what: String, source: io::Error },
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind_tcp(address: &str) -> Result<Self, NetError> {
        let parsed: SocketAddr = address.parse().map_err(|_| NetError::BadAddress(address.to_owned()))?;
        let listener =
            TcpListener::bind(parsed).map_err(|source| NetError::Bind { what: address.to_owned(), source })?;
        Ok(Listener::Tcp(listener))
    }

    pub fn bind_unix(path: PathBuf) -> Result<Self, NetError> {
        // A socket file left by an earlier run would make bind fail.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(&path);
        }
        let what = path.display().to_string();
        let listener = UnixListener::bind(&path).map_err(|source| NetError::Bind { what, source })?;
        Ok(Listener::Unix(listener, path))
    }

    /// The URI a client uses to reach the default export.
    pub fn uri(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(SocketAddr::V6(a)) => format!("nbd://[{}]:{}/", a.ip(), a.port()),
                Ok(a) => format!("nbd://{a}/"),
                Err(_) => "nbd://?/".into(),
            },
            Listener::Unix(_, path) => format!("nbd+unix:///?socket={}", path.display()),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where negotiated connections go: implemented by the server's worker set.
pub trait Dispatch: Send + Sync {
    fn dispatch(&self, connection: NewConnection);
}

pub struct AcceptConfig {
    pub exports: Arc<[ExportInfo]>,
    pub limits: HandshakeLimits,
    pub handshake_timeout: Duration,
    /// Concurrent handshakes; more are closed at once (DoS bound).
    pub handshakes_max: usize,
    pub verbose: bool,
    /// Set when the server stops: handshakes in progress get ERR_SHUTDOWN.
    pub shutdown: Arc<AtomicBool>,
}

/// Runs until `stop_fd` (an eventfd) becomes readable.
pub fn accept_loop(listeners: &[Listener], stop_fd: RawFd, config: Arc<AcceptConfig>, dispatch: Arc<dyn Dispatch>) {
    let handshakes = Arc::new(AtomicUsize::new(0));
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
                accept_one(listener, &config, &dispatch, &handshakes);
            }
        }
    }
}

fn accept_one(listener: &Listener, config: &Arc<AcceptConfig>, dispatch: &Arc<dyn Dispatch>, count: &Arc<AtomicUsize>) {
    let accepted = match listener {
        Listener::Tcp(l) => l.accept().map(|(s, peer)| Socket::Tcp(s, peer.to_string())),
        Listener::Unix(l, path) => l.accept().map(|(s, _)| Socket::Unix(s, path.display().to_string())),
    };
    let socket = match accepted {
        Ok(socket) => socket,
        Err(e) => {
            // EMFILE and friends: back off briefly rather than spin.
            eprintln!("ringnbd: accept: {e}");
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
    };
    if count.fetch_add(1, Ordering::AcqRel) >= config.handshakes_max {
        count.fetch_sub(1, Ordering::AcqRel);
        return; // dropping closes it
    }
    let (config, dispatch, count) = (Arc::clone(config), Arc::clone(dispatch), Arc::clone(count));
    let spawned =
        std::thread::Builder::new().name("ringnbd-handshake".into()).stack_size(256 * 1024).spawn(move || {
            handshake(socket, &config, &*dispatch);
            count.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        eprintln!("ringnbd: cannot start handshake thread: {e}");
    }
}

enum Socket {
    Tcp(TcpStream, String),
    Unix(UnixStream, String),
}

fn handshake(socket: Socket, config: &AcceptConfig, dispatch: &dyn Dispatch) {
    let (result, fd, peer): (Result<_, NegotiateError>, OwnedFd, String) = match socket {
        Socket::Tcp(mut s, peer) => {
            let _ = s.set_nodelay(true);
            (run(&mut s, config), s.into(), peer)
        }
        Socket::Unix(mut s, peer) => (run(&mut s, config), s.into(), peer),
    };
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
) -> Result<Option<crate::proto::handshake::Negotiated>, NegotiateError> {
    negotiate(stream, &config.exports, config.limits, config.handshake_timeout, &config.shutdown)
}
