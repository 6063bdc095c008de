//! The Prometheus endpoint (`--metrics ADDR`): a deliberately small HTTP/1.x
//! server answering `GET /metrics` (and `HEAD`) with the text exposition
//! format, and everything else with a status and a close. Every client is
//! bounded: a request head of at most [`HEAD_BYTES_MAX`] read within
//! [`CLIENT_DEADLINE`], at most [`CLIENTS_MAX`] at once (others get 503),
//! one request per connection. Garbage, slow or abandoned requests cost a
//! thread for at most the deadline and never touch serving.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What the endpoint serves: the exposition text, rendered per scrape.
pub type Render = dyn Fn() -> String + Send + Sync;

pub const HEAD_BYTES_MAX: usize = 8 * 1024;
pub const CLIENTS_MAX: usize = 16;
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves until `stop_fd` (an eventfd) becomes readable.
pub fn serve(listener: TcpListener, stop_fd: RawFd, render: Arc<Render>) {
    let clients = Arc::new(AtomicUsize::new(0));
    while super::wait_for_client(listener.as_raw_fd(), stop_fd, "metrics endpoint") {
        let Ok((stream, _)) = listener.accept() else { continue };
        if clients.fetch_add(1, Ordering::AcqRel) >= CLIENTS_MAX {
            clients.fetch_sub(1, Ordering::AcqRel);
            let _ = respond(&stream, 503, "Service Unavailable", "too many scrapes at once\n", false);
            continue;
        }
        let (render, clients) = (Arc::clone(&render), Arc::clone(&clients));
        let spawned = std::thread::Builder::new().name("ringnbd-metrics".into()).spawn(move || {
            let _ = serve_client(&stream, &*render);
            clients.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            crate::note!("metrics endpoint: cannot start a client thread");
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics { head_only: bool },
    NotFound,
    NotAllowed,
    Bad,
}

/// Parses the request line of a complete head (`\r\n\r\n`-terminated).
fn parse(head: &[u8]) -> Ask {
    let Ok(text) = std::str::from_utf8(head) else { return Ask::Bad };
    let Some(line) = text.lines().next() else { return Ask::Bad };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ask::Bad;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Ask::Bad;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Ask::Metrics { head_only: method == "HEAD" },
        ("GET" | "HEAD", _) => Ask::NotFound,
        _ => Ask::NotAllowed,
    }
}

fn serve_client(stream: &TcpStream, render: &Render) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let ask = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break parse(&head[..end]);
        }
        if head.len() >= HEAD_BYTES_MAX {
            break Ask::Bad;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(()); // too slow: just close
        }
        stream.set_read_timeout(Some(left))?;
        let n = (&*stream).read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    stream.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
    match ask {
        Ask::Metrics { head_only } => respond(stream, 200, "OK", &render(), head_only),
        Ask::NotFound => respond(stream, 404, "Not Found", "metrics are at /metrics\n", false),
        Ask::NotAllowed => respond(stream, 405, "Method Not Allowed", "only GET and HEAD\n", false),
        Ask::Bad => respond(stream, 400, "Bad Request", "not an HTTP/1 request\n", false),
    }
}

fn respond(mut stream: &TcpStream, code: u16, reason: &str, body: &str, head_only: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_parsed_strictly() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x"), Ask::Metrics { head_only: false });
        assert_eq!(parse(b"HEAD /metrics?x=1 HTTP/1.0"), Ask::Metrics { head_only: true });
        assert_eq!(parse(b"GET / HTTP/1.1"), Ask::NotFound);
        assert_eq!(parse(b"POST /metrics HTTP/1.1"), Ask::NotAllowed);
        for bad in [
            &b"GET /metrics"[..],
            b"GET  /metrics HTTP/1.1",
            b"GET metrics HTTP/1.1",
            b"\xff\xfe",
            b"",
            b"GET /metrics SPDY/3",
        ] {
            assert_eq!(parse(bad), Ask::Bad, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
