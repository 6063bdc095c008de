//! The control socket: a Unix socket (`--control PATH`, mode 0600) that
//! speaks the line-delimited JSON of [`protocol`] (doc/control.md), and the
//! client `ringnbd ctl` uses ([`client`]).
//!
//! This module knows sockets and framing only; what verbs do is a
//! [`Handler`] (the server's, in `server::control_verbs`). Each client gets
//! a thread of its own, at most [`CLIENTS_MAX`] at once, so a slow or
//! silent one only delays itself, and nothing a client sends can reach the
//! I/O path except through the handler.

pub mod client;
pub mod metrics_http;
pub mod protocol;

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::net::listener::Listener;
use protocol::{ControlError, ErrorKind, LINE_BYTES_MAX, Reply, Verb, parse_request};

/// Control clients served at once; one more is told so and closed.
pub const CLIENTS_MAX: usize = 64;
/// A client that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the verbs do.
pub trait Handler: Send + Sync {
    fn handle(&self, verb: &Verb) -> Result<Value, ControlError>;
}

/// Accepts control clients until `stop_fd` (an eventfd) becomes readable.
/// Dropping `listener` at the end removes the socket file.
pub fn serve(listener: Listener, stop_fd: RawFd, handler: Arc<dyn Handler>) {
    let clients = Arc::new(AtomicUsize::new(0));
    while wait_for_client(listener.fd(), stop_fd, "control socket") {
        let Some(Ok(stream)) = listener.accept_unix() else { continue };
        if clients.fetch_add(1, Ordering::AcqRel) >= CLIENTS_MAX {
            clients.fetch_sub(1, Ordering::AcqRel);
            let message = format!("at most {CLIENTS_MAX} control clients at once; try again");
            let _ = (&stream).write_all(Reply::failure(None, ErrorKind::TooManyClients, message).to_line().as_bytes());
            continue;
        }
        let (handler, clients) = (Arc::clone(&handler), Arc::clone(&clients));
        let spawned = std::thread::Builder::new().name("ringnbd-control".into()).spawn(move || {
            serve_client(stream, &*handler);
            clients.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            // The closure (and its count) never ran.
            crate::note!("control socket: cannot start a client thread");
        }
    }
}

/// Blocks until `listener` has a client waiting (true) or `stop_fd` (an
/// eventfd) is readable (false). A failing poll is logged, naming `what`,
/// and ends the loop too.
pub(crate) fn wait_for_client(listener: RawFd, stop_fd: RawFd, what: &str) -> bool {
    loop {
        let mut fds = [
            libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            crate::note!("{what}: poll: {}", io::Error::last_os_error());
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// One request line, or what happened instead.
enum Line {
    Complete,
    TooLong,
    End,
}

/// Reads up to and without the next newline into `line`, holding at most
/// `LINE_BYTES_MAX` bytes; the rest of an overlong line is skipped.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::End,
                (false, false) => Line::Complete,
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (&available[..at], true),
            None => (available, false),
        };
        if line.len() + chunk.len() >= LINE_BYTES_MAX {
            too_long = true;
            line.clear();
        } else if !too_long {
            line.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(found);
        reader.consume(used);
        if found {
            return Ok(if too_long { Line::TooLong } else { Line::Complete });
        }
    }
}

fn serve_client(stream: UnixStream, handler: &dyn Handler) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(writer) = stream.try_clone() else { return };
    let mut writer = io::BufWriter::new(writer);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    loop {
        let reply = match read_line(&mut reader, &mut line) {
            Err(_) | Ok(Line::End) => return,
            Ok(Line::TooLong) => {
                let message = format!("request line longer than {LINE_BYTES_MAX} bytes");
                Reply::failure(None, ErrorKind::LineTooLong, message)
            }
            Ok(Line::Complete) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Line::Complete) => match parse_request(&line) {
                Err(reply) => reply,
                Ok(request) => match handler.handle(&request.verb) {
                    Ok(result) => Reply::success(request.id, result),
                    Err(e) => Reply::failure(request.id, e.kind, e.message),
                },
            },
        };
        if writer.write_all(reply.to_line().as_bytes()).and_then(|()| writer.flush()).is_err() {
            return;
        }
    }
}

/// Binds the control socket readable and writable by its owner only: the
/// umask is narrowed around the bind so the socket never exists with wider
/// permissions (called before any other thread starts).
pub fn bind(path: std::path::PathBuf) -> Result<Listener, crate::net::listener::NetError> {
    // SAFETY: umask only changes this process's file-creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = Listener::bind_unix(path);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(previous) };
    bound
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Result<String, &'static str>> {
        let mut reader = BufReader::with_capacity(16, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader, &mut line).unwrap() {
                Line::End => return out,
                Line::TooLong => out.push(Err("too long")),
                Line::Complete => out.push(Ok(String::from_utf8(line.clone()).unwrap())),
            }
        }
    }

    #[test]
    fn lines_split_on_newlines_and_overlong_ones_are_skipped_whole() {
        let mut input = b"{\"verb\":\"status\"}\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', LINE_BYTES_MAX + 10));
        input.extend_from_slice(b"\nnext\nlast-without-newline");
        let got = lines(&input);
        assert_eq!(
            got,
            vec![
                Ok("{\"verb\":\"status\"}".into()),
                Err("too long"),
                Ok("next".into()),
                Ok("last-without-newline".into())
            ]
        );
    }
}
