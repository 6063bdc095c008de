//! X.509 credentials and sessions through rustls, from the directory layout
//! nbdkit and qemu use: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`
//! and an optional `ca-crl.pem`.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::session::{PeerIdentity, TlsError, TlsSession};

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CA_CRL: &str = "ca-crl.pem";

/// A loaded credentials directory: one immutable rustls configuration that
/// every session started from it shares.
pub struct X509Server {
    config: Arc<ServerConfig>,
}

fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| TlsError::Credentials(format!("{}: {e}", path.display())))
}

fn pem_error(path: PathBuf, what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Credentials(format!("{}: no usable {what}: {e}", path.display()))
}

impl X509Server {
    /// Loads `dir`. With `verify_peer`, clients must present a certificate
    /// that chains to `ca-cert.pem` (and is not revoked by `ca-crl.pem`).
    pub fn load(dir: &Path, verify_peer: bool) -> Result<Self, TlsError> {
        let chain_pem = read_file(dir, SERVER_CERT)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| pem_error(dir.join(SERVER_CERT), "certificate", e))?;
        if chain.is_empty() {
            return Err(pem_error(dir.join(SERVER_CERT), "certificate", "the file holds none"));
        }
        let key_pem = read_file(dir, SERVER_KEY)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error(dir.join(SERVER_KEY), "key", e))?;
        let provider = Arc::new(provider::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Credentials(e.to_string()))?;
        let builder = if verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider)
                .with_crls(revocations(dir)?)
                .build()
                .map_err(|e| TlsError::Credentials(format!("{}: {e}", dir.join(CA_CERT).display())))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Credentials(format!("{}: {e}", dir.join(SERVER_KEY).display())))?;
        // NBD clients open one long connection and never resume, so session
        // tickets would only add handshake bytes and CPU.
        config.send_tls13_tickets = 0;
        Ok(Self { config: Arc::new(config) })
    }

    pub fn session(&self) -> Result<Box<dyn TlsSession>, TlsError> {
        let mut conn =
            ServerConnection::new(Arc::clone(&self.config)).map_err(|e| TlsError::Protocol(e.to_string()))?;
        // Replies are bounded by the engine (one send's worth at a time),
        // so the session need not cap them a second time.
        conn.set_buffer_limit(None);
        Ok(Box::new(RustlsSession { conn, closed: false }))
    }
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let pem = read_file(dir, CA_CERT)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| pem_error(dir.join(CA_CERT), "CA certificate", e))?;
        roots.add(cert).map_err(|e| pem_error(dir.join(CA_CERT), "CA certificate", e))?;
    }
    if roots.is_empty() {
        return Err(pem_error(dir.join(CA_CERT), "CA certificate", "the file holds none"));
    }
    Ok(roots)
}

fn revocations(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let path = dir.join(CA_CRL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let pem = read_file(dir, CA_CRL)?;
    CertificateRevocationListDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| pem_error(path, "CRL", e))
}

struct RustlsSession {
    conn: ServerConnection,
    closed: bool,
}

fn protocol(e: impl std::fmt::Display) -> TlsError {
    TlsError::Protocol(e.to_string())
}

impl TlsSession for RustlsSession {
    fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        let mut rest = ciphertext;
        while !rest.is_empty() {
            match self.conn.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {
                    self.conn.process_new_packets().map_err(protocol)?;
                }
                // Refused while decrypted plaintext waits to be read: the
                // caller reads it and feeds the rest again.
                Err(_) if self.plaintext_ready() => break,
                Err(e) => return Err(protocol(e)),
            }
        }
        Ok(ciphertext.len() - rest.len())
    }

    fn read_plain(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        match self.conn.reader().read(out) {
            Ok(0) if !out.is_empty() => {
                self.closed = true;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            // The peer closed without close_notify: a truncation attack or
            // a client that simply went away; either way nothing more comes.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.closed = true;
                Ok(0)
            }
            Err(e) => Err(protocol(e)),
        }
    }

    fn plaintext_ready(&mut self) -> bool {
        self.conn.process_new_packets().is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }

    fn write_plain(&mut self, data: &[u8]) -> Result<(), TlsError> {
        self.conn.writer().write_all(data).map_err(protocol)
    }

    fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        while self.conn.wants_write() {
            self.conn.write_tls(out).map_err(protocol)?;
        }
        Ok(())
    }

    fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn peer_closed(&self) -> bool {
        self.closed
    }

    fn close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    fn identity(&self) -> PeerIdentity {
        let subject = self.conn.peer_certificates().and_then(|chain| chain.first()).and_then(|cert| subject(cert));
        match subject {
            Some(subject) => PeerIdentity::Certificate { subject },
            None => PeerIdentity::Anonymous,
        }
    }

    fn describe(&self) -> String {
        let version = self.conn.protocol_version().map_or("TLS".to_owned(), |v| format!("{v:?}"));
        let suite = self.conn.negotiated_cipher_suite().map_or(String::new(), |s| format!(" {:?}", s.suite()));
        format!("{version}{suite} (X.509)")
    }
}

/// A certificate's subject as an RFC 4514 string: RDNs from the most
/// specific (last in the certificate) to the least, `+` inside an RDN.
pub fn subject(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = parsed
        .subject()
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type();
                    let name = x509_parser::objects::oid2abbrev(oid, registry)
                        .map(str::to_owned)
                        .unwrap_or_else(|_| oid.to_id_string());
                    let value = match attr.as_str() {
                        Ok(text) => escape_rfc4514(text),
                        Err(_) => format!("#{}", hex(attr.as_slice())),
                    };
                    format!("{name}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Some(rdns.into_iter().rev().collect::<Vec<_>>().join(","))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 4514 section 2.4: the characters that must be escaped in a value.
fn escape_rfc4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc4514_says() {
        assert_eq!(escape_rfc4514("Example, Inc."), "Example\\, Inc.");
        assert_eq!(escape_rfc4514("#tag "), "\\#tag\\ ");
        assert_eq!(escape_rfc4514("a+b=c"), "a\\+b=c");
        assert_eq!(escape_rfc4514("plain"), "plain");
    }

    #[test]
    fn a_missing_directory_names_the_file() {
        let error = X509Server::load(Path::new("/nonexistent-ringnbd-tls"), false).err().expect("must fail");
        assert!(error.to_string().contains("/nonexistent-ringnbd-tls/server-cert.pem"), "{error}");
    }
}
