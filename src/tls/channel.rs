//! A TLS session over a blocking socket, for handshake threads: the TLS
//! handshake, then option haggling as plain reads and writes. When
//! negotiation ends the channel comes apart into the session and the
//! ciphertext already received but not yet fed, and both go to the worker
//! with the socket, so no byte the client sent is lost.

use std::io::{self, Read, Write};
use std::time::Instant;

use super::session::{TlsError, TlsSession};

/// Bytes read from the socket at once (one full TLS record and its header).
const CIPHERTEXT_READ_BYTES: usize = 16 * 1024 + 512;

pub struct TlsChannel<'s, S: Read + Write> {
    pub socket: &'s mut S,
    session: Box<dyn TlsSession>,
    /// Received ciphertext the session has not taken yet.
    unfed: Vec<u8>,
    out: Vec<u8>,
}

/// What is left of a channel once negotiation is over.
pub struct Parts {
    pub session: Box<dyn TlsSession>,
    pub unfed: Vec<u8>,
}

fn to_io(e: TlsError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<'s, S: Read + Write> TlsChannel<'s, S> {
    pub fn new(socket: &'s mut S, session: Box<dyn TlsSession>) -> Self {
        Self { socket, session, unfed: Vec::new(), out: Vec::new() }
    }

    /// Runs the TLS handshake to its end, failing with `TimedOut` once
    /// `deadline` has passed (each read is bounded by the socket timeout,
    /// so a client trickling its hello byte by byte is still cut off). On
    /// failure the alert (if the session made one) is sent before the error
    /// is returned, so the client learns why.
    pub fn handshake(&mut self, deadline: Instant) -> io::Result<()> {
        while self.session.is_handshaking() {
            self.flush_ciphertext()?;
            if !self.session.is_handshaking() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if let Err(e) = self.receive() {
                let _ = self.flush_ciphertext();
                return Err(e);
            }
        }
        self.flush_ciphertext()
    }

    pub fn session(&self) -> &dyn TlsSession {
        &*self.session
    }

    pub fn into_parts(self) -> Parts {
        Parts { session: self.session, unfed: self.unfed }
    }

    fn flush_ciphertext(&mut self) -> io::Result<()> {
        self.session.take_ciphertext(&mut self.out).map_err(to_io)?;
        if !self.out.is_empty() {
            self.socket.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Feeds what is buffered, or reads more ciphertext and feeds it.
    fn receive(&mut self) -> io::Result<()> {
        if self.unfed.is_empty() {
            let mut chunk = [0u8; CIPHERTEXT_READ_BYTES];
            let n = self.socket.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.unfed.extend_from_slice(&chunk[..n]);
        }
        let taken = self.session.feed(&self.unfed).map_err(to_io)?;
        self.unfed.drain(..taken);
        Ok(())
    }
}

impl<S: Read + Write> Read for TlsChannel<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.session.read_plain(buf).map_err(to_io)?;
            if n > 0 || buf.is_empty() || self.session.peer_closed() {
                return Ok(n);
            }
            // A key update or alert may want an answer before more comes.
            self.flush_ciphertext()?;
            self.receive()?;
        }
    }
}

impl<S: Read + Write> Write for TlsChannel<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.session.write_plain(buf).map_err(to_io)?;
        self.flush_ciphertext()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_ciphertext()?;
        self.socket.flush()
    }
}
