//! TLS: the server's credentials, one [`session::TlsSession`] per client,
//! and the blocking channel handshake threads negotiate through.
//!
//! X.509 runs on rustls (`x509`); PSK on OpenSSL (`psk`, the `psk` cargo
//! feature), because rustls has no external PSK. Both hand the same
//! session interface to the rest of the server, which never knows which
//! library encrypts a connection. See doc/tls.md.

pub mod channel;
#[cfg(feature = "psk")]
pub mod psk;
mod rustls_session;
pub mod session;
pub mod x509;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use session::{PeerIdentity, TlsError, TlsSession};

/// `--tls`: whether STARTTLS is offered, and whether it is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS is refused (NOTLS).
    #[default]
    Off,
    /// Offered; clients may also negotiate in plaintext (a man in the
    /// middle can strip it: use `require` where that matters).
    On,
    /// Every option before STARTTLS, except ABORT, is refused with
    /// ERR_TLS_REQD (FORCEDTLS).
    Require,
}

/// Where the credentials come from, so that they can be read again.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// `--tls-certificates DIR` (and `--tls-verify-peer`).
    X509 { dir: PathBuf, verify_peer: bool },
    /// `--tls-psk FILE`.
    Psk { file: PathBuf },
}

enum Loaded {
    X509(x509::X509Server),
    #[cfg(feature = "psk")]
    Psk(psk::PskServer),
}

impl Loaded {
    fn load(source: &CredentialSource) -> Result<Self, TlsError> {
        match source {
            CredentialSource::X509 { dir, verify_peer } => Ok(Loaded::X509(x509::X509Server::load(dir, *verify_peer)?)),
            #[cfg(feature = "psk")]
            CredentialSource::Psk { file } => Ok(Loaded::Psk(psk::PskServer::new(psk::PskKeys::load(file)?)?)),
            #[cfg(not(feature = "psk"))]
            CredentialSource::Psk { .. } => Err(TlsError::Credentials(
                "this build has no PSK support (build with `--features psk`, which needs OpenSSL)".into(),
            )),
        }
    }

    fn session(&self) -> Result<Box<dyn TlsSession>, TlsError> {
        match self {
            Loaded::X509(server) => server.session(),
            #[cfg(feature = "psk")]
            Loaded::Psk(server) => server.session(),
        }
    }
}

/// The server's TLS side: its mode and its current credentials. Reloading
/// swaps the credentials for new handshakes; sessions already started keep
/// the ones they began with, so no connection is dropped.
pub struct TlsServer {
    pub mode: TlsMode,
    source: CredentialSource,
    loaded: RwLock<Arc<Loaded>>,
}

impl TlsServer {
    pub fn new(mode: TlsMode, source: CredentialSource) -> Result<Self, TlsError> {
        let loaded = Loaded::load(&source)?;
        Ok(Self { mode, source, loaded: RwLock::new(Arc::new(loaded)) })
    }

    /// Reads the credentials again. On error the old ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(Loaded::load(&self.source)?);
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// A new server session with the current credentials.
    pub fn session(&self) -> Result<Box<dyn TlsSession>, TlsError> {
        let loaded = Arc::clone(&self.loaded.read().unwrap_or_else(|e| e.into_inner()));
        loaded.session()
    }

    /// Whether clients identify themselves (certificates verified, or PSK).
    pub fn identifies_clients(&self) -> bool {
        match &self.source {
            CredentialSource::X509 { verify_peer, .. } => *verify_peer,
            CredentialSource::Psk { .. } => true,
        }
    }

    pub fn source(&self) -> &CredentialSource {
        &self.source
    }
}
