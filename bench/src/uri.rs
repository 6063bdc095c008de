//! NBD URIs (the `nbd://` scheme of the NBD URI standard, as libnbd parses it).
//!
//! Pure parsing, no name resolution: `nbd://host[:port]/[export]` and
//! `nbd+unix:///[export]?socket=PATH`. IPv6 literals go in brackets
//! (`nbd://[::1]:10809/`). The export name is the path after the first `/`,
//! percent-decoded; an empty name selects the server's default export.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// The IANA-assigned NBD port, used when a TCP URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A host name or IP literal (brackets removed) and a port.
    Tcp { host: String, port: u16 },
    /// A Unix-domain socket path.
    Unix { path: PathBuf },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// The export name, percent-decoded ("" = default export).
    pub export: String,
    /// `nbds://` or `nbds+unix://`: STARTTLS with X.509.
    pub tls: Option<Tls>,
}

/// TLS settings from the URI, as libnbd reads them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    /// `tls-certificates=DIR` (ca-cert.pem, optional client-cert.pem and
    /// client-key.pem); without it `$HOME/.pki/libnbd`, then
    /// `/etc/pki/libnbd`.
    pub certificates: Option<PathBuf>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum UriError {
    /// Only `nbd[s]://` and `nbd[s]+unix://` are supported.
    #[error("unsupported scheme in {0:?} (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)")]
    Scheme(String),
    /// `nbd://` needs a host.
    #[error("missing host in {0:?}")]
    MissingHost(String),
    /// An IPv6 literal without its closing bracket.
    #[error("unterminated IPv6 literal in {0:?}")]
    Ipv6(String),
    /// The port is not a number in 1..=65535.
    #[error("bad port {0:?}")]
    Port(String),
    /// `nbd+unix://` carries no host and needs `?socket=PATH`.
    #[error("nbd+unix URI {0:?} must have an empty host and a socket= query")]
    UnixSocket(String),
    /// A `%` escape that is not two hex digits, or decodes to invalid UTF-8.
    #[error("bad percent-encoding in {0:?}")]
    Percent(String),
}

pub fn parse(text: &str) -> Result<NbdUri, UriError> {
    let (mut uri, query) = if let Some(rest) = text.strip_prefix("nbds+unix://") {
        (parse_unix(text, rest)?, Some(rest))
    } else if let Some(rest) = text.strip_prefix("nbds://") {
        (parse_tcp(text, rest)?, Some(rest))
    } else if let Some(rest) = text.strip_prefix("nbd+unix://") {
        (parse_unix(text, rest)?, None)
    } else if let Some(rest) = text.strip_prefix("nbd://") {
        (parse_tcp(text, rest)?, None)
    } else {
        return Err(UriError::Scheme(text.to_string()));
    };
    if let Some(rest) = query {
        let (_, query) = split_once_or_all(rest, '?');
        let certificates = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("tls-certificates="))
            .map(|dir| percent_decode(dir).map(PathBuf::from).ok_or_else(|| UriError::Percent(text.to_string())))
            .transpose()?;
        uri.tls = Some(Tls { certificates });
    }
    Ok(uri)
}

fn parse_tcp(text: &str, rest: &str) -> Result<NbdUri, UriError> {
    let (before_query, _query) = split_once_or_all(rest, '?');
    let (authority, path) = split_authority(before_query);
    let (host, port) = split_host_port(text, authority)?;
    if host.is_empty() {
        return Err(UriError::MissingHost(text.to_string()));
    }
    let export = percent_decode(path).ok_or_else(|| UriError::Percent(text.to_string()))?;
    Ok(NbdUri { endpoint: Endpoint::Tcp { host, port }, export, tls: None })
}

fn parse_unix(text: &str, rest: &str) -> Result<NbdUri, UriError> {
    let (before_query, query) = split_once_or_all(rest, '?');
    let (authority, path) = split_authority(before_query);
    if !authority.is_empty() {
        return Err(UriError::UnixSocket(text.to_string()));
    }
    let socket = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("socket="))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| UriError::UnixSocket(text.to_string()))?;
    let socket = percent_decode(socket).ok_or_else(|| UriError::Percent(text.to_string()))?;
    let export = percent_decode(path).ok_or_else(|| UriError::Percent(text.to_string()))?;
    Ok(NbdUri { endpoint: Endpoint::Unix { path: PathBuf::from(socket) }, export, tls: None })
}

/// `"a?b"` -> `("a", "b")`, `"a"` -> `("a", "")`.
fn split_once_or_all(text: &str, separator: char) -> (&str, &str) {
    text.split_once(separator).unwrap_or((text, ""))
}

/// Splits `authority/path` and drops the single `/` that starts the path.
fn split_authority(text: &str) -> (&str, &str) {
    match text.find('/') {
        Some(slash) => (&text[..slash], &text[slash + 1..]),
        None => (text, ""),
    }
}

fn split_host_port(text: &str, authority: &str) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| UriError::Ipv6(text.to_string()))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| UriError::Port(after.to_string()))?),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| UriError::Port(p.to_string()))?,
    };
    Ok((host.to_string(), port))
}

/// Decodes `%XX` escapes; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "nbd{s}://[{host}]:{port}/{}", self.export),
            Endpoint::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Endpoint::Unix { path } => write!(f, "nbd{s}+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into(), tls: None }
    }

    #[test]
    fn tcp_with_port_and_export() {
        assert_eq!(parse("nbd://127.0.0.1:10920/disk").unwrap(), tcp("127.0.0.1", 10920, "disk"));
        assert_eq!(parse("nbd://example.com/").unwrap(), tcp("example.com", DEFAULT_PORT, ""));
        assert_eq!(parse("nbd://example.com").unwrap(), tcp("example.com", DEFAULT_PORT, ""));
        assert_eq!(parse("nbd://h:1/a/b").unwrap(), tcp("h", 1, "a/b"));
    }

    #[test]
    fn ipv6_literals_keep_their_colons() {
        assert_eq!(parse("nbd://[::1]:10809/x").unwrap(), tcp("::1", 10809, "x"));
        assert_eq!(parse("nbd://[fe80::1]/").unwrap(), tcp("fe80::1", DEFAULT_PORT, ""));
        assert_eq!(parse("nbd://[::1/"), Err(UriError::Ipv6("nbd://[::1/".into())));
        assert!(matches!(parse("nbd://[::1]x/"), Err(UriError::Port(_))));
    }

    #[test]
    fn export_names_are_percent_decoded() {
        assert_eq!(parse("nbd://h/my%20disk").unwrap().export, "my disk");
        assert!(matches!(parse("nbd://h/bad%2"), Err(UriError::Percent(_))));
        assert!(matches!(parse("nbd://h/bad%zz"), Err(UriError::Percent(_))));
    }

    #[test]
    fn unix_sockets() {
        let uri = parse("nbd+unix:///?socket=/tmp/nbd.sock").unwrap();
        assert_eq!(uri.endpoint, Endpoint::Unix { path: "/tmp/nbd.sock".into() });
        assert_eq!(uri.export, "");
        let named = parse("nbd+unix:///scratch?socket=/run/a%20b.sock").unwrap();
        assert_eq!(named.export, "scratch");
        assert_eq!(named.endpoint, Endpoint::Unix { path: "/run/a b.sock".into() });
        assert!(matches!(parse("nbd+unix:///x"), Err(UriError::UnixSocket(_))));
        assert!(matches!(parse("nbd+unix://host/?socket=/s"), Err(UriError::UnixSocket(_))));
    }

    #[test]
    fn rejects_bad_scheme_host_and_port() {
        assert!(matches!(parse("http://h/"), Err(UriError::Scheme(_))));
        assert!(matches!(parse("nbd:///x"), Err(UriError::MissingHost(_))));
        assert!(matches!(parse("nbd://h:0/"), Err(UriError::Port(_))));
        assert!(matches!(parse("nbd://h:70000/"), Err(UriError::Port(_))));
        assert!(matches!(parse("nbd://h:p/"), Err(UriError::Port(_))));
    }

    #[test]
    fn tls_schemes_and_their_certificates() {
        let uri = parse("nbds://h:1/x?tls-certificates=/etc/a%20b").unwrap();
        assert_eq!(uri.tls, Some(Tls { certificates: Some("/etc/a b".into()) }));
        assert_eq!(uri.export, "x");
        assert_eq!(parse("nbds://h/").unwrap().tls, Some(Tls::default()));
        assert!(parse("nbds+unix:///?socket=/s").unwrap().tls.is_some());
        assert_eq!(parse("nbd://h/").unwrap().tls, None);
    }

    #[test]
    fn display_round_trips() {
        for text in ["nbd://h:1/x", "nbd://[::1]:10809/", "nbd+unix:///e?socket=/s"] {
            assert_eq!(parse(text).unwrap().to_string(), text);
        }
    }
}
