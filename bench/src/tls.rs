//! TLS for `nbds://` URIs: client credentials as libnbd reads them, the
//! handshake over the blocking socket, and the record layer the engine's
//! connections run their sends and receives through.
//!
//! A connection's plaintext paths stay what they are; with TLS a send
//! carries the batch's bytes encrypted (packed into as few records as they
//! fit), and a receive takes ciphertext that is decrypted into the staging
//! buffer. Plaintext already decrypted is delivered through a NOP, so the
//! one-recv-in-flight accounting holds.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::uri::Tls;

/// A negotiated socket and, for `nbds://`, its TLS session.
pub struct Socket {
    pub fd: OwnedFd,
    pub tls: Option<Box<ClientConnection>>,
}

/// The most plaintext one TLS record carries.
const RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;
/// Ciphertext received at once.
const CIPHER_IN_BYTES: usize = 64 * 1024;

/// Where libnbd looks when the URI names no directory.
fn certificate_dir(tls: &Tls) -> io::Result<PathBuf> {
    if let Some(dir) = &tls.certificates {
        return Ok(dir.clone());
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".pki/libnbd"));
    [home, Some(PathBuf::from("/etc/pki/libnbd"))]
        .into_iter()
        .flatten()
        .find(|d| d.join("ca-cert.pem").exists())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no ca-cert.pem in $HOME/.pki/libnbd or /etc/pki/libnbd")
        })
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A client configuration from DIR: `ca-cert.pem`, and `client-cert.pem`
/// with `client-key.pem` when present.
pub fn client_config(tls: &Tls) -> io::Result<Arc<ClientConfig>> {
    let dir = certificate_dir(tls)?;
    let ca = std::fs::read(dir.join("ca-cert.pem"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| invalid(format!("{}: {e}", dir.join("ca-cert.pem").display())))?;
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots);
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let config = if cert.exists() && key.exists() {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .and_then(|i| i.collect())
            .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| invalid(format!("{}: {e}", key.display())))?;
        builder.with_client_auth_cert(chain, key).map_err(|e| invalid(e.to_string()))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Runs the TLS handshake over the blocking `stream`.
pub fn handshake<S: Read + Write>(
    config: Arc<ClientConfig>,
    host: &str,
    stream: &mut S,
) -> io::Result<Box<ClientConnection>> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| invalid(format!("{host}: {e}")))?;
    let mut conn = ClientConnection::new(config, name).map_err(|e| invalid(e.to_string()))?;
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        conn.complete_io(stream)?;
    }
    Ok(Box::new(conn))
}

/// A connection's record layer in transmission. `cipher_in` and
/// `cipher_out` are heap blocks the kernel writes and reads while a recv
/// (respectively send) is in flight; they are never resized then.
pub struct Records {
    conn: Box<ClientConnection>,
    cipher_in: Vec<u8>,
    /// `cipher_in[..unfed]` was received and not yet given to rustls.
    unfed: usize,
    nop_posted: bool,
    plain: Vec<u8>,
    cipher_out: Vec<u8>,
    out_sent: usize,
    /// Plaintext bytes the ciphertext in `cipher_out` carries.
    staged: usize,
}

impl Records {
    pub fn new(conn: Box<ClientConnection>) -> Self {
        Records {
            conn,
            cipher_in: vec![0; CIPHER_IN_BYTES],
            unfed: 0,
            nop_posted: false,
            plain: Vec::new(),
            cipher_out: Vec::new(),
            out_sent: 0,
            staged: 0,
        }
    }

    /// Whether ciphertext of the last batch is still going out.
    pub fn sending(&self) -> bool {
        self.out_sent < self.cipher_out.len()
    }

    /// Encrypts `parts` (one batch, packed into as few records as fit) and
    /// returns the ciphertext to send. Only while no send is in flight.
    pub fn stage<'a>(&mut self, parts: impl Iterator<Item = &'a [u8]>) -> io::Result<(*const u8, usize)> {
        if !self.sending() {
            // Small parts (request headers) are packed into one record;
            // a large payload goes to rustls as it is.
            self.plain.clear();
            self.staged = 0;
            for part in parts {
                self.staged += part.len();
                if part.len() >= RECORD_PLAINTEXT_BYTES {
                    if !self.plain.is_empty() {
                        self.conn.writer().write_all(&self.plain)?;
                        self.plain.clear();
                    }
                    self.conn.writer().write_all(part)?;
                } else {
                    self.plain.extend_from_slice(part);
                }
            }
            if !self.plain.is_empty() {
                self.conn.writer().write_all(&self.plain)?;
            }
            self.cipher_out.clear();
            self.out_sent = 0;
            while self.conn.wants_write() {
                self.conn.write_tls(&mut self.cipher_out)?;
            }
        }
        let rest = &self.cipher_out[self.out_sent..];
        Ok((rest.as_ptr(), rest.len()))
    }

    /// A send of `n` ciphertext bytes completed: the batch's plaintext
    /// length once all of it is out, else None.
    pub fn sent(&mut self, n: usize) -> Option<usize> {
        self.out_sent += n;
        (!self.sending()).then(|| std::mem::take(&mut self.staged))
    }

    fn feed(&mut self) -> io::Result<()> {
        let Records { conn, cipher_in, unfed, .. } = self;
        let mut rest = &cipher_in[..*unfed];
        while !rest.is_empty() {
            match conn.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {
                    conn.process_new_packets().map_err(|e| invalid(e.to_string()))?;
                }
                // Plaintext waits to be read first.
                Err(_) if conn.process_new_packets().is_ok_and(|s| s.plaintext_bytes_to_read() > 0) => break,
                Err(e) => return Err(e),
            }
        }
        let taken = *unfed - rest.len();
        self.cipher_in.copy_within(taken..self.unfed, 0);
        self.unfed -= taken;
        Ok(())
    }

    fn plaintext_waiting(&mut self) -> bool {
        self.conn.process_new_packets().is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
    }

    /// What the next recv should be: Some(target) to receive ciphertext
    /// into, or None for a NOP (plaintext already here).
    pub fn next_recv(&mut self) -> io::Result<Option<(*mut u8, usize)>> {
        self.feed()?;
        if self.plaintext_waiting() || self.unfed == self.cipher_in.len() {
            self.nop_posted = true;
            return Ok(None);
        }
        let free = &mut self.cipher_in[self.unfed..];
        Ok(Some((free.as_mut_ptr(), free.len())))
    }

    /// A recv (or NOP) completed with `result`: decrypts into `target`
    /// (`Some(0)`: nothing yet, receive more). `None` means the connection
    /// ended: a non-positive `result` (EOF, an error) or close_notify.
    pub fn received(&mut self, result: i32, target: &mut [u8]) -> io::Result<Option<usize>> {
        if !std::mem::take(&mut self.nop_posted) {
            if result <= 0 {
                return Ok(None);
            }
            self.unfed += result as usize;
        }
        // rustls holds little decrypted plaintext at a time, so feed and
        // read in turns until the target is full or the ciphertext is used.
        let mut filled = 0;
        while filled < target.len() {
            self.feed()?;
            match self.conn.reader().read(&mut target[filled..]) {
                // close_notify: the server is done.
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Some(filled))
    }

    /// Encrypts `bytes` (DISC) and close_notify, for a blocking send.
    pub fn seal_last(&mut self, bytes: &[u8]) -> io::Result<Vec<u8>> {
        self.conn.writer().write_all(bytes)?;
        self.conn.send_close_notify();
        let mut out = Vec::new();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut out)?;
        }
        Ok(out)
    }
}
