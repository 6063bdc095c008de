//! Process conventions of a service: a pid file, dropping root after the
//! sockets are bound, and stopping from inside (a captive command ended,
//! the last client left) through the same path a SIGTERM takes.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why the server stops itself; the main thread reads it after the wake-up
/// signal.
#[derive(Default)]
pub(super) struct StopRequest {
    reason: Mutex<Option<String>>,
}

impl StopRequest {
    /// Records `reason` (the first one wins) and wakes the main thread,
    /// which waits for signals, with a SIGTERM to this process.
    pub(super) fn stop(&self, reason: String) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            drop(slot);
            // SAFETY: kill on our own pid; SIGTERM is blocked in every thread
            // and taken by the main thread's sigwait.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        }
    }

    pub(super) fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `--pidfile`: written (atomically, by rename) once the sockets are bound,
/// so whoever waits for it can connect; removed at exit.
pub(super) struct PidFile(PathBuf);

impl PidFile {
    pub(super) fn write(path: &Path) -> std::io::Result<Self> {
        let name = path.file_name().ok_or_else(|| std::io::Error::other("the pid file path names no file"))?;
        let mut temporary = path.to_path_buf();
        temporary.set_file_name(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: another instance may have written its pid since.
        let ours = std::fs::read_to_string(&self.0).is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours && let Err(e) = std::fs::remove_file(&self.0) {
            crate::note!("cannot remove the pid file {}: {e}", self.0.display());
        }
    }
}

/// Who to become after binding (`--user`, `--group`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<String>,
    pub group: Option<String>,
}

impl Identity {
    /// Switches to the group, then the user (with only that group), or
    /// fails without having changed anything half-way that matters: a
    /// server that cannot drop root does not serve.
    pub(super) fn assume(&self) -> Result<Option<String>, String> {
        if self.user.is_none() && self.group.is_none() {
            return Ok(None);
        }
        let user = self.user.as_deref().map(lookup_user).transpose()?;
        let gid = match (&self.group, &user) {
            (Some(group), _) => Some(lookup_group(group)?),
            (None, Some((_, gid))) => Some(*gid),
            (None, None) => None,
        };
        if let Some(gid) = gid {
            // SAFETY: setgroups with a one-element array that lives across the call.
            if unsafe { libc::setgroups(1, &gid) } != 0 {
                return Err(format!("setgroups({gid}): {}", std::io::Error::last_os_error()));
            }
            // SAFETY: plain syscall.
            if unsafe { libc::setgid(gid) } != 0 {
                return Err(format!("setgid({gid}): {}", std::io::Error::last_os_error()));
            }
        }
        if let Some((uid, _)) = user {
            // SAFETY: plain syscall; afterwards root cannot be regained.
            if unsafe { libc::setuid(uid) } != 0 {
                return Err(format!("setuid({uid}): {}", std::io::Error::last_os_error()));
            }
        }
        // SAFETY: plain syscalls without arguments.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(Some(format!("uid {uid}, gid {gid}")))
    }
}

/// A user name or number: its uid and primary gid.
fn lookup_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    let c = CString::new(name).map_err(|_| format!("--user {name:?}: not a user name"))?;
    // SAFETY: getpwnam reads a NUL-terminated string and returns static
    // storage or null; it is read at once, before any other lookup (this
    // runs before the server's threads exist).
    let entry = unsafe { libc::getpwnam(c.as_ptr()) };
    if !entry.is_null() {
        // SAFETY: non-null: points at a valid passwd entry.
        return Ok(unsafe { ((*entry).pw_uid, (*entry).pw_gid) });
    }
    // A number without a passwd entry takes the same number as its group.
    match name.parse::<libc::uid_t>() {
        Ok(uid) => Ok((uid, uid as libc::gid_t)),
        Err(_) => Err(format!("--user {name:?}: no such user")),
    }
}

fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    let c = CString::new(name).map_err(|_| format!("--group {name:?}: not a group name"))?;
    // SAFETY: as for getpwnam above.
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    if !entry.is_null() {
        // SAFETY: non-null: points at a valid group entry.
        return Ok(unsafe { (*entry).gr_gid });
    }
    name.parse().map_err(|_| format!("--group {name:?}: no such group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_holds_our_pid_and_goes_at_drop_unless_replaced() {
        let dir = std::env::temp_dir().join(format!("ringnbd-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringnbd.pid");
        let file = PidFile::write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", std::process::id()));
        drop(file);
        assert!(!path.exists());
        let file = PidFile::write(&path).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        drop(file);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n", "another instance's pid file stays");
        assert!(PidFile::write(&dir.join("missing/x.pid")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        assert_eq!(lookup_user("root").unwrap(), (0, 0));
        assert_eq!(lookup_user("4242").unwrap(), (4242, 4242));
        assert!(lookup_user("no-such-user-ringnbd").unwrap_err().contains("no such user"));
        assert_eq!(lookup_group("root").unwrap(), 0);
        assert_eq!(lookup_group("4343").unwrap(), 4343);
        assert!(lookup_group("no-such-group-ringnbd").is_err());
        assert_eq!(Identity::default().assume().unwrap(), None, "nothing asked, nothing changed");
    }
}
