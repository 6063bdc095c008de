//! Captive mode (`--run CMD`): once the server listens, CMD runs under
//! `sh -c` with the connection details in shell variables (`$uri`, `$nbd`,
//! `$port`, `$unixsocket`, `$exportname`, nbdkit's names), and the server
//! stops when it exits, with its exit status. `-U -` gives such a command
//! a private Unix socket in a fresh 0700 directory, removed at exit.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};

use crate::net::listener::Listener;

use super::process::StopRequest;

/// What `-U -` asks for.
pub const PRIVATE_SOCKET: &str = "-";

/// A private directory holding the `-U -` socket; removed when dropped.
pub(super) struct PrivateDir(PathBuf);

impl PrivateDir {
    pub(super) fn create() -> std::io::Result<Self> {
        let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let template = base.join("ringnbd-XXXXXX");
        let mut bytes = std::ffi::CString::new(template.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::other("TMPDIR holds a NUL byte"))?
            .into_bytes_with_nul();
        // SAFETY: mkdtemp rewrites the XXXXXX of a NUL-terminated buffer we own.
        let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if made.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        bytes.pop();
        Ok(Self(PathBuf::from(String::from_utf8_lossy(&bytes).into_owned())))
    }

    pub(super) fn socket(&self) -> PathBuf {
        self.0.join("nbd.sock")
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The variables a captive command gets, for the first listener and the
/// default (first) export.
pub(super) fn variables(listener: &Listener, export: &str) -> Vec<(&'static str, String)> {
    let name = encode_export_name(export);
    let (uri, nbd, port, unixsocket) = match listener {
        Listener::Tcp(l) => {
            let at = l.local_addr().ok();
            let port = at.map_or(0, |a| a.port());
            let host = match at {
                Some(std::net::SocketAddr::V6(a)) => format!("[{}]", a.ip()),
                Some(a) => a.ip().to_string(),
                None => "localhost".to_owned(),
            };
            let nbd = legacy(&format!("{host}:{port}"), export);
            (format!("nbd://{host}:{port}/{name}"), nbd, port.to_string(), String::new())
        }
        Listener::Unix(_, path, _) => {
            let path = path.display().to_string();
            let nbd = legacy(&format!("unix:{path}"), export);
            (format!("nbd+unix:///{name}?socket={path}"), nbd, String::new(), path)
        }
    };
    vec![("uri", uri), ("nbd", nbd), ("port", port), ("unixsocket", unixsocket), ("exportname", export.into())]
}

/// qemu's older `nbd:` form (`nbd:HOST:PORT` or `nbd:unix:PATH`, with
/// `:exportname=NAME` for a named export).
fn legacy(place: &str, export: &str) -> String {
    if export.is_empty() { format!("nbd:{place}") } else { format!("nbd:{place}:exportname={export}") }
}

/// An export name as a URI path: unreserved characters and `/` as they
/// are, everything else percent-encoded byte by byte.
fn encode_export_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The running command and, once it has ended, its status.
pub(super) struct Captive {
    /// Set, under the lock, in the same step that reaps the command: while
    /// it is None the pid is still our child's (running, or a zombie).
    status: Arc<Mutex<Option<ExitStatus>>>,
    pid: u32,
}

impl Captive {
    /// Starts `command` with `variables` and a thread that waits for it and
    /// then asks the server to stop.
    pub(super) fn start(
        command: &str,
        variables: &[(&'static str, String)],
        stop: Arc<StopRequest>,
    ) -> std::io::Result<Self> {
        let mut child = Command::new("/bin/sh").arg("-c").arg(command).envs(variables.iter().cloned()).spawn()?;
        let pid = child.id();
        let status = Arc::new(Mutex::new(None));
        let recorded = Arc::clone(&status);
        std::thread::Builder::new().name("ringnbd-run".into()).spawn(move || {
            // Wait for the exit without reaping, then reap under the lock,
            // so `finish` never signals a pid that may have been reused.
            if let Err(e) = wait_without_reaping(pid) {
                return stop.stop(format!("--run command: cannot wait for it: {e}"));
            }
            let mut slot = recorded.lock().unwrap_or_else(|e| e.into_inner());
            match child.wait() {
                Ok(exit) => {
                    *slot = Some(exit);
                    drop(slot);
                    stop.stop(format!("--run command exited ({exit})"));
                }
                Err(e) => stop.stop(format!("--run command: cannot wait for it: {e}")),
            }
        })?;
        Ok(Self { status, pid })
    }

    /// The command's exit code for the server to exit with (128 + N for a
    /// signal N), or None while it still runs; then it is sent SIGTERM, as
    /// the server it was given is going away.
    pub(super) fn finish(self) -> Option<u8> {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match *status {
            Some(status) => Some(exit_code(status)),
            None => {
                // SAFETY: kill on our child's pid; with no status recorded
                // (checked under the lock the reaper takes) it is not reaped,
                // so the pid is still that child's.
                unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
                None
            }
        }
    }
}

/// Blocks until child `pid` has exited, leaving it to be reaped.
fn wait_without_reaping(pid: u32) -> std::io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t into a live local.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        (None, None) => 1,
    }
}

/// Whether `path` is the `-U -` request.
pub(super) fn is_private(path: &Path) -> bool {
    path.as_os_str() == PRIVATE_SOCKET
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_become_uri_paths() {
        assert_eq!(encode_export_name(""), "");
        assert_eq!(encode_export_name("disk"), "disk");
        assert_eq!(encode_export_name("vm/disk 1:a"), "vm/disk%201%3Aa");
        assert_eq!(encode_export_name("é"), "%C3%A9");
    }

    #[test]
    fn variables_name_the_first_listener_and_export() {
        let tcp = Listener::Tcp(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let port = match &tcp {
            Listener::Tcp(l) => l.local_addr().unwrap().port(),
            Listener::Unix(..) => unreachable!(),
        };
        let vars: std::collections::HashMap<_, _> = variables(&tcp, "d 1").into_iter().collect();
        assert_eq!(vars["uri"], format!("nbd://127.0.0.1:{port}/d%201"));
        assert_eq!(vars["nbd"], format!("nbd:127.0.0.1:{port}:exportname=d 1"));
        assert_eq!((vars["port"].clone(), vars["unixsocket"].clone()), (port.to_string(), String::new()));
        let dir = PrivateDir::create().unwrap();
        let unix = Listener::bind_unix(dir.socket()).unwrap();
        let vars: std::collections::HashMap<_, _> = variables(&unix, "").into_iter().collect();
        let path = dir.socket().display().to_string();
        assert_eq!(vars["uri"], format!("nbd+unix:///?socket={path}"));
        assert_eq!(vars["nbd"], format!("nbd:unix:{path}"));
        assert_eq!((vars["unixsocket"].clone(), vars["exportname"].clone()), (path, String::new()));
        let kept = dir.0.clone();
        drop(unix);
        drop(dir);
        assert!(!kept.exists(), "the private directory goes");
    }

    #[test]
    fn exit_codes_carry_status_and_signals() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }
}
