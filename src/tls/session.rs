//! One server-side TLS session, whatever library runs it.
//!
//! A session owns no socket: ciphertext goes in with [`TlsSession::feed`]
//! and comes out with [`TlsSession::take_ciphertext`]; plaintext comes out
//! with [`TlsSession::read_plain`] and goes in with
//! [`TlsSession::write_plain`]. The same session is driven by blocking
//! reads and writes on a handshake thread (`tls::channel`) and then, after
//! negotiation, by ring operations on a worker (`engine::tls_transport`),
//! so the handshake never blocks a worker and transmission never blocks at
//! all.

use thiserror::Error;

/// Who the client proved to be during the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A verified client certificate: its subject as an RFC 4514 string
    /// (most significant RDN last, e.g. `CN=client,O=Example,C=GB`), the
    /// form qemu's authz and nbdkit print.
    Certificate { subject: String },
    /// The PSK username the client used (`keys.psk`).
    Psk { username: String },
    /// TLS without a client identity (no certificate asked or given).
    Anonymous,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Certificate { subject } => write!(f, "certificate {subject:?}"),
            PeerIdentity::Psk { username } => write!(f, "PSK user {username:?}"),
            PeerIdentity::Anonymous => write!(f, "no client identity"),
        }
    }
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer broke TLS (bad record, failed handshake, bad certificate).
    /// Fatal for the connection; the alert, if any, is in the ciphertext.
    #[error("TLS: {0}")]
    Protocol(String),
    /// Credentials could not be loaded or used.
    #[error("TLS credentials: {0}")]
    Credentials(String),
}

/// A server-side TLS session. Every method is non-blocking.
pub trait TlsSession: Send {
    /// Takes ciphertext received from the peer and processes it. Returns how
    /// many bytes were taken: fewer than given when decrypted plaintext
    /// waits to be read first (read it, then feed the rest again).
    fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError>;

    /// Copies decrypted application data into `out`. `Ok(0)` means none is
    /// available until more ciphertext is fed (or the peer closed: see
    /// [`TlsSession::peer_closed`]).
    fn read_plain(&mut self, out: &mut [u8]) -> Result<usize, TlsError>;

    /// Whether `read_plain` would return data now.
    fn plaintext_ready(&mut self) -> bool;

    /// Encrypts all of `data` as application data.
    fn write_plain(&mut self, data: &[u8]) -> Result<(), TlsError>;

    /// Encrypts all of `data`, appending the ciphertext to `out` after any
    /// the session had waiting: the transmission path, where a session
    /// that can encrypt in place saves a copy of every byte.
    fn encrypt_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.write_plain(data)?;
        self.take_ciphertext(out)
    }

    /// Appends every byte of ciphertext waiting to go to the peer
    /// (handshake messages, records, alerts, key updates) to `out`.
    fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError>;

    /// Whether ciphertext is waiting to be taken.
    fn wants_write(&self) -> bool;

    /// Whether the handshake is still under way.
    fn is_handshaking(&self) -> bool;

    /// Whether the peer sent close_notify: no more plaintext will come.
    fn peer_closed(&self) -> bool;

    /// Queues close_notify (then take the ciphertext and send it).
    fn close_notify(&mut self);

    /// The client's identity, once the handshake is done.
    fn identity(&self) -> PeerIdentity;

    /// The negotiated protocol version and cipher suite, for the log.
    fn describe(&self) -> String;
}
