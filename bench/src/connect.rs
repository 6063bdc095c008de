//! Opening connections: blocking connect and negotiation with a deadline,
//! driving the pure machine in `handshake.rs`. Done before the workers
//! start, so none of this is on the measured path.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use thiserror::Error;

use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection};

use crate::tls::{self, Socket};
use crate::uri::{Endpoint, NbdUri};
use ringnbd::proto::client::handshake::{ClientHandshake, HandshakeConfig, HandshakeError, Progress, Session};

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {error}")]
    Resolve { host: String, error: io::Error },
    /// No address accepted the connection.
    #[error("cannot connect to {target}: {error}")]
    Connect { target: String, error: io::Error },
    /// Reading or writing during negotiation failed.
    #[error("negotiation with {target} failed: {error}")]
    Io { target: String, error: io::Error },
    /// The server's answers ended negotiation.
    #[error("negotiation with {target} failed: {error}")]
    Handshake { target: String, error: HandshakeError },
}

/// Connects to `uri` and negotiates; `timeout` bounds connecting and each
/// read or write of the negotiation.
pub fn connect(uri: &NbdUri, config: &HandshakeConfig, timeout: Duration) -> Result<(Socket, Session), ConnectError> {
    let target = uri.to_string();
    let io = |error: io::Error| ConnectError::Io { target: target.clone(), error };
    let tls = match &uri.tls {
        Some(settings) => {
            let host = match &uri.endpoint {
                Endpoint::Tcp { host, .. } => host.clone(),
                Endpoint::Unix { .. } => "localhost".to_owned(),
            };
            Some((tls::client_config(settings).map_err(io)?, host))
        }
        None => None,
    };
    let config = &HandshakeConfig { starttls: tls.is_some(), ..config.clone() };
    let tls = tls.as_ref();
    match &uri.endpoint {
        Endpoint::Tcp { host, port } => {
            let stream = connect_tcp(host, *port, timeout, &target)?;
            // Requests are batched by the engine; Nagle would only add delay.
            stream.set_nodelay(true).map_err(|error| ConnectError::Io { target: target.clone(), error })?;
            let (session, tls) = negotiate_with_deadline(&stream, config, tls, timeout, &target, |s, t| {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            })?;
            Ok((Socket { fd: OwnedFd::from(stream), tls }, session))
        }
        Endpoint::Unix { path } => {
            let stream =
                UnixStream::connect(path).map_err(|error| ConnectError::Connect { target: target.clone(), error })?;
            let (session, tls) = negotiate_with_deadline(&stream, config, tls, timeout, &target, |s, t| {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            })?;
            Ok((Socket { fd: OwnedFd::from(stream), tls }, session))
        }
    }
}

fn connect_tcp(host: &str, port: u16, timeout: Duration, target: &str) -> Result<TcpStream, ConnectError> {
    let addresses: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|error| ConnectError::Resolve { host: host.to_string(), error })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error,
        }
    }
    Err(ConnectError::Connect { target: target.to_string(), error: last })
}

/// Negotiates with socket timeouts set, then clears them: the engine's
/// io_uring operations have their own deadline handling.
fn negotiate_with_deadline<S>(
    stream: &S,
    config: &HandshakeConfig,
    tls: Option<&(Arc<ClientConfig>, String)>,
    timeout: Duration,
    target: &str,
    set_timeouts: impl Fn(&S, Option<Duration>) -> io::Result<()>,
) -> Result<(Session, Option<Box<ClientConnection>>), ConnectError>
where
    for<'a> &'a S: Read + Write,
{
    let io_error = |error: io::Error| {
        // A socket timeout surfaces as EAGAIN; say what it means.
        let error = match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, format!("no answer from the server within {timeout:?}"))
            }
            _ => error,
        };
        ConnectError::Io { target: target.to_string(), error }
    };
    set_timeouts(stream, Some(timeout)).map_err(io_error)?;
    let session = negotiate(&mut &*stream, config, tls).map_err(|e| match e {
        NegotiateError::Io(error) => io_error(error),
        NegotiateError::Handshake(error) => ConnectError::Handshake { target: target.to_string(), error },
    })?;
    set_timeouts(stream, None).map_err(io_error)?;
    Ok(session)
}

enum NegotiateError {
    Io(io::Error),
    Handshake(HandshakeError),
}

/// Negotiates, upgrading to TLS when `tls` is given (STARTTLS first).
fn negotiate(
    stream: &mut impl ReadWrite,
    config: &HandshakeConfig,
    tls: Option<&(Arc<ClientConfig>, String)>,
) -> Result<(Session, Option<Box<ClientConnection>>), NegotiateError> {
    let mut machine = ClientHandshake::new(config.clone());
    let mut session_tls: Option<Box<ClientConnection>> = None;
    let mut input = Vec::new();
    let mut output = Vec::new();
    loop {
        input.resize(machine.want(), 0);
        let read = match session_tls.as_mut() {
            Some(conn) => rustls::Stream::new(&mut **conn, stream).read_exact(&mut input),
            None => stream.read_exact(&mut input),
        };
        read.map_err(|e| {
            NegotiateError::Io(if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(e.kind(), "the server closed the connection")
            } else {
                e
            })
        })?;
        output.clear();
        let mut progress = machine.feed(&input, &mut output).map_err(NegotiateError::Handshake)?;
        if progress == Progress::StartTls {
            let (config, host) = tls.expect("STARTTLS is sent only with TLS settings");
            session_tls = Some(tls::handshake(Arc::clone(config), host, stream).map_err(NegotiateError::Io)?);
            progress = machine.tls_started(&mut output).map_err(NegotiateError::Handshake)?;
        }
        if !output.is_empty() {
            let written = match session_tls.as_mut() {
                Some(conn) => rustls::Stream::new(&mut **conn, stream).write_all(&output),
                None => stream.write_all(&output),
            };
            written.map_err(NegotiateError::Io)?;
        }
        if let Progress::Done(session) = progress {
            return Ok((session, session_tls));
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
