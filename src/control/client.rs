//! The client side of the control socket: one request, one reply.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{Reply, Request, Verb};

/// How long a reply may take: a checkpoint waits for in-flight writes to
/// drain (up to 30 s) before it answers.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `verb` to the server at `socket` and returns its reply.
pub fn call(socket: &Path, verb: Verb) -> io::Result<Reply> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_string(&Request { id: None, verb }).map_err(io::Error::other)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the control connection"));
    }
    serde_json::from_str(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
