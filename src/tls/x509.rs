//! X.509 credentials and sessions through rustls, from the directory layout
//! nbdkit and qemu use: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`
//! and an optional `ca-crl.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::rustls_session::RustlsSession;
use super::session::{TlsError, TlsSession};

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
        let provider = Arc::new(preferring_aes128(provider::default_provider()));
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
        // Our order, not the client's (GnuTLS lists AES-256 first): see
        // `preferring_aes128`.
        config.ignore_client_order = true;
        Ok(Self { config: Arc::new(config) })
    }

    pub fn session(&self) -> Result<Box<dyn TlsSession>, TlsError> {
        Ok(Box::new(RustlsSession::new(Arc::clone(&self.config))?))
    }

    /// For tests that look inside a session.
    #[cfg(test)]
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }
}

/// AES-128-GCM first, in TLS 1.3 and 1.2. Both ends pay for every byte
/// and a single-threaded client (fio, qemu-img, nbdcopy's reader) is often
/// what limits a TLS connection: AES-128 has 10 rounds to AES-256's 14,
/// and with AES-NI it beats ChaCha20 in GnuTLS's nettle. It is the suite
/// TLS 1.3 makes mandatory, so nothing weak is preferred.
fn preferring_aes128(mut provider: rustls::crypto::CryptoProvider) -> rustls::crypto::CryptoProvider {
    let rank = |suite: &rustls::SupportedCipherSuite| {
        let name = format!("{:?}", suite.suite());
        (suite.version() != &rustls::version::TLS13, !name.contains("AES_128_GCM"))
    };
    provider.cipher_suites.sort_by_key(rank);
    provider
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
