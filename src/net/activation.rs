//! Listening sockets handed over by a service manager (systemd socket
//! activation, `systemd-socket-activate`): `LISTEN_PID` names this process,
//! `LISTEN_FDS` counts descriptors from 3 up, `LISTEN_FDNAMES` names them
//! (colon-separated). The variables are removed once read, so a `--run`
//! command or anything else this process starts does not take the sockets
//! for its own.
//!
//! Inherited Unix sockets are never unlinked at exit: the manager owns the
//! file and may hand it to the next instance.

use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use thiserror::Error;

use super::listener::Listener;

/// The first inherited descriptor (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;
/// More would be a manager's mistake; the limit keeps the loop bounded.
const FDS_MAX: usize = 1024;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a count of descriptors (1 to 1024)")]
    BadCount(String),
    #[error("socket activation: descriptor {fd} ({name}): {reason}")]
    BadSocket { fd: RawFd, name: String, reason: String },
}

/// Sockets a service manager passed, with their names.
pub struct Activated {
    pub listeners: Vec<Listener>,
    pub names: Vec<String>,
}

/// The variables as read from the environment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    pub pid: Option<String>,
    pub fds: Option<String>,
    pub names: Option<String>,
}

impl ListenEnv {
    /// Reads the three variables and removes them from the environment.
    ///
    /// # Safety
    /// Changes the process environment: call before any other thread
    /// exists (nothing else may read or write the environment meanwhile).
    pub unsafe fn take() -> Self {
        let read = |key: &str| std::env::var(key).ok();
        let env = ListenEnv { pid: read("LISTEN_PID"), fds: read("LISTEN_FDS"), names: read("LISTEN_FDNAMES") };
        for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: the caller guarantees no other thread runs yet.
            unsafe { std::env::remove_var(key) };
        }
        env
    }

    /// How many descriptors are meant for `pid`: 0 when the variables are
    /// absent or name another process (a parent's, inherited by mistake).
    pub fn count_for(&self, pid: u32) -> Result<usize, ActivationError> {
        let (Some(for_pid), Some(fds)) = (&self.pid, &self.fds) else { return Ok(0) };
        if for_pid.trim().parse::<u32>().ok() != Some(pid) {
            return Ok(0);
        }
        match fds.trim().parse::<usize>() {
            Ok(n) if (1..=FDS_MAX).contains(&n) => Ok(n),
            _ => Err(ActivationError::BadCount(fds.clone())),
        }
    }

    /// The name of descriptor `index` (systemd's default is "unknown").
    pub fn name(&self, index: usize) -> String {
        self.names
            .as_deref()
            .and_then(|names| names.split(':').nth(index))
            .filter(|name| !name.is_empty())
            .unwrap_or("unknown")
            .to_owned()
    }
}

/// Takes the descriptors `env` announces for this process as listeners.
/// None when nothing was passed.
pub fn inherited(env: &ListenEnv) -> Result<Option<Activated>, ActivationError> {
    let count = env.count_for(std::process::id())?;
    if count == 0 {
        return Ok(None);
    }
    let mut activated = Activated { listeners: Vec::with_capacity(count), names: Vec::with_capacity(count) };
    for index in 0..count {
        let fd = FIRST_FD + index as RawFd;
        let name = env.name(index);
        let bad = |reason: String| ActivationError::BadSocket { fd, name: name.clone(), reason };
        let listener = adopt(fd).map_err(|e| bad(e.to_string()))?;
        activated.listeners.push(listener);
        activated.names.push(name);
    }
    Ok(Some(activated))
}

/// Checks that `fd` is a listening stream socket and wraps it.
fn adopt(fd: RawFd) -> io::Result<Listener> {
    let int_option = |level, option| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local.
        let rc = unsafe { libc::getsockopt(fd, level, option, (&mut value as *mut libc::c_int).cast(), &mut len) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
    };
    if int_option(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(io::Error::other("not a stream socket (use ListenStream=)"));
    }
    if int_option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1 {
        return Err(io::Error::other("not listening (Accept=no is required)"));
    }
    let family = int_option(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    // Close-on-exec, so a --run command does not hold the sockets open; and
    // blocking, like the listeners this process binds (the accept loop
    // polls first).
    // SAFETY: fcntl on a descriptor checked above to be an open socket.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    match family {
        libc::AF_INET | libc::AF_INET6 => {
            // SAFETY: the manager passed this descriptor to this process to
            // own; it is a listening TCP socket and nothing else wraps it.
            Ok(Listener::Tcp(unsafe { TcpListener::from_raw_fd(fd) }))
        }
        libc::AF_UNIX => {
            // SAFETY: as above, a listening Unix stream socket now owned here.
            let listener = unsafe { UnixListener::from_raw_fd(fd) };
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(format!("(inherited socket {fd})")));
            Ok(Listener::Unix(listener, path, None))
        }
        other => Err(io::Error::other(format!("address family {other} is not TCP or Unix"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pid: &str, fds: &str, names: Option<&str>) -> ListenEnv {
        ListenEnv { pid: Some(pid.into()), fds: Some(fds.into()), names: names.map(Into::into) }
    }

    #[test]
    fn descriptors_count_only_for_this_process() {
        assert_eq!(ListenEnv::default().count_for(7).unwrap(), 0);
        assert_eq!(env("7", "2", None).count_for(7).unwrap(), 2);
        assert_eq!(env("8", "2", None).count_for(7).unwrap(), 0, "a parent's variables are not ours");
        assert_eq!(env(" 7\n", "1", None).count_for(7).unwrap(), 1);
        for bad in ["0", "-1", "x", "5000"] {
            assert!(matches!(env("7", bad, None).count_for(7), Err(ActivationError::BadCount(_))), "{bad}");
        }
    }

    #[test]
    fn names_default_to_unknown() {
        let e = env("7", "3", Some("nbd:admin"));
        assert_eq!((e.name(0), e.name(1), e.name(2)), ("nbd".into(), "admin".into(), "unknown".into()));
        assert_eq!(env("7", "1", Some("")).name(0), "unknown");
        assert_eq!(env("7", "1", None).name(0), "unknown");
    }

    #[test]
    fn only_listening_stream_sockets_are_adopted() {
        use std::os::fd::IntoRawFd;
        let file = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        assert!(adopt(file).is_err(), "a file is not a socket");
        // SAFETY: closing the descriptor opened above, owned by nobody else.
        unsafe { libc::close(file) };
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = adopt(std::os::fd::AsRawFd::as_raw_fd(&a)).err().expect("a connected socket is refused");
        assert!(err.to_string().contains("not listening"), "{err}");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap().into_raw_fd();
        assert!(matches!(adopt(listener), Ok(Listener::Tcp(_))));
    }
}
