//! Listening sockets: TCP addresses (names resolved, port 10809 when none
//! is given) and Unix sockets that this process owns.
//!
//! A Unix socket path is taken only if nobody listens there: a live socket
//! file (one that accepts a connection) is refused, a stale one (left by a
//! crash) is replaced. At exit the file is removed only if it is still the
//! socket this process created (same device and inode), so a second server
//! started on the same path cannot delete a live server's socket, and a
//! server cannot delete a socket someone else has put there since.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The IANA port for NBD, used when an address names none.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetError {
    /// A listen address did not parse or resolve.
    #[error("bad listen address {0:?} (use HOST[:PORT], e.g. localhost, 127.0.0.1:10809 or [::1]:10809)")]
    BadAddress(String),
    /// bind() or listen() failed.
    #[error("cannot listen on {what}: {source}")]
    Bind { what: String, source: io::Error },
    /// Another server accepts connections on this Unix socket.
    #[error("{0}: another server is listening on this socket (stop it, or choose another path)")]
    SocketInUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}

pub enum Listener {
    Tcp(TcpListener),
    /// A Unix listener, with the socket file this process created and
    /// removes at exit (None for one it was given: see `net::activation`).
    Unix(UnixListener, PathBuf, Option<SocketFile>),
}

/// Which file this process bound (device and inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    device: u64,
    inode: u64,
}

impl SocketFile {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.file_type().is_socket().then(|| SocketFile { device: meta.dev(), inode: meta.ino() })
    }
}

/// The socket addresses `address` means: `HOST:PORT`, `[V6]:PORT`, or a
/// host or IP literal alone (port 10809). Names resolve to every address
/// they have (`localhost` to 127.0.0.1 and ::1).
pub fn resolve(address: &str) -> Result<Vec<SocketAddr>, NetError> {
    let bad = || NetError::BadAddress(address.to_owned());
    if let Ok(exact) = address.parse::<SocketAddr>() {
        return Ok(vec![exact]);
    }
    let bare = address.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(address);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, DEFAULT_PORT)]);
    }
    let has_port = address.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    let with_port = if has_port { address.to_owned() } else { format!("{address}:{DEFAULT_PORT}") };
    let mut found: Vec<SocketAddr> = with_port.to_socket_addrs().map_err(|_| bad())?.collect();
    found.dedup();
    if found.is_empty() {
        return Err(bad());
    }
    Ok(found)
}

impl Listener {
    /// One listener per address `address` resolves to.
    pub fn bind_tcp(address: &str) -> Result<Vec<Self>, NetError> {
        resolve(address)?
            .into_iter()
            .map(|at| {
                let listener =
                    TcpListener::bind(at).map_err(|source| NetError::Bind { what: at.to_string(), source })?;
                Ok(Listener::Tcp(listener))
            })
            .collect()
    }

    pub fn bind_unix(path: PathBuf) -> Result<Self, NetError> {
        let what = path.display().to_string();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(&path) {
                Ok(_) => return Err(NetError::SocketInUse(path)),
                // Nobody listens: a socket file left by a server that died.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(&path).map_err(|source| NetError::Bind { what: what.clone(), source })?;
                }
                Err(source) => return Err(NetError::Bind { what, source }),
            },
            Ok(_) => return Err(NetError::NotASocket(path)),
            Err(_) => {}
        }
        let listener = UnixListener::bind(&path).map_err(|source| NetError::Bind { what: what.clone(), source })?;
        let Some(file) = SocketFile::of(&path) else {
            return Err(NetError::Bind { what, source: io::Error::other("the socket file vanished after bind") });
        };
        Ok(Listener::Unix(listener, path, Some(file)))
    }

    /// The URI a client uses to reach the default export.
    pub fn uri(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(SocketAddr::V6(a)) => format!("nbd://[{}]:{}/", a.ip(), a.port()),
                Ok(a) => format!("nbd://{a}/"),
                Err(_) => "nbd://?/".into(),
            },
            Listener::Unix(_, path, _) => format!("nbd+unix:///?socket={}", path.display()),
        }
    }

    /// Accepts on a Unix listener (None for TCP).
    pub fn accept_unix(&self) -> Option<io::Result<UnixStream>> {
        match self {
            Listener::Unix(l, _, _) => Some(l.accept().map(|(stream, _)| stream)),
            Listener::Tcp(_) => None,
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _, _) => l.as_raw_fd(),
        }
    }

    /// Accepts without blocking when the listener is non-blocking (see
    /// [`Self::set_nonblocking`]); accepted sockets are blocking either way.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _, _) => l.set_nonblocking(true),
        }
    }

    /// Removes the socket file this process bound, if it is still ours;
    /// the listener itself stays open. Called at shutdown, when threads
    /// that may outlive the caller still hold the listener.
    pub fn remove_socket_file(&self) {
        if let Listener::Unix(_, path, Some(ours)) = self
            && SocketFile::of(path) == Some(*ours)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.remove_socket_file();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_resolve_with_and_without_ports() {
        assert_eq!(resolve("127.0.0.1:99").unwrap(), vec!["127.0.0.1:99".parse().unwrap()]);
        assert_eq!(resolve("127.0.0.1").unwrap(), vec!["127.0.0.1:10809".parse().unwrap()]);
        assert_eq!(resolve("[::1]").unwrap(), vec!["[::1]:10809".parse().unwrap()]);
        assert_eq!(resolve("::1").unwrap(), vec!["[::1]:10809".parse().unwrap()]);
        let local = resolve("localhost:1234").unwrap();
        assert!(local.iter().all(|a| a.ip().is_loopback() && a.port() == 1234), "{local:?}");
        assert!(resolve("localhost").unwrap().iter().all(|a| a.port() == DEFAULT_PORT));
        assert!(resolve("no such host.invalid").is_err());
    }

    #[test]
    fn a_live_socket_is_refused_a_stale_one_replaced_and_only_ours_removed() {
        let dir = std::env::temp_dir().join(format!("ringnbd-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let first = Listener::bind_unix(path.clone()).unwrap();
        assert!(matches!(Listener::bind_unix(path.clone()), Err(NetError::SocketInUse(_))));
        // Someone replaces the file: dropping ours must leave theirs alone.
        std::fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "another process's socket was deleted");
        // Stale: nobody listens any more.
        drop(theirs);
        let second = Listener::bind_unix(path.clone()).expect("stale socket replaced");
        drop(second);
        assert!(!path.exists(), "our own socket is removed at exit");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(Listener::bind_unix(path.clone()), Err(NetError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
