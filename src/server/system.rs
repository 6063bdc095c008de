//! Process-level plumbing: eventfds, signals, the descriptor limit.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use super::ServerError;

pub(super) fn system(what: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::System { what, source }
}

pub(super) fn eventfd() -> Result<Arc<OwnedFd>, ServerError> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(system("eventfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

pub(super) fn signal(fd: &OwnedFd) {
    crate::engine::handoff::signal_eventfd(fd);
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and every thread it spawns later)
/// so that `wait_for_signal` receives them synchronously.
pub(super) fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then a mask change for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

pub(super) fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: `set` is initialised; sigwait writes one int.
    unsafe { libc::sigwait(set, &mut signal) };
    signal
}

/// Raises the soft open-files limit to the hard one: every connection is a
/// descriptor, and the usual soft default (1024) would refuse clients long
/// before memory runs short. The accept loop copes with the limit either way.
pub(super) fn raise_file_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
