//! What the server prints when it is up: the exports and how to connect.

use std::sync::Arc;

use crate::export::Export;

use super::ServerConfig;
use crate::tls::{CredentialSource, TlsMode};

pub(super) fn print_banner(config: &ServerConfig, exports: &[Arc<Export>], uris: &[String]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let workers = if config.threads == 1 { "worker" } else { "workers" };
    let _ = writeln!(out, "ringnbd {}: {} {workers}", env!("CARGO_PKG_VERSION"), config.threads);
    for (index, export) in exports.iter().enumerate() {
        let default = if index == 0 { ", the default export" } else { "" };
        let (name, size) = (&export.info.name, export.info.size);
        let _ =
            writeln!(out, "export {name:?}: {} ({size} bytes), {}{default}", human_size(size), export.info.description);
    }
    for uri in uris {
        let _ = writeln!(out, "{uri}");
    }
    if let Some(uri) = uris.first() {
        let _ = writeln!(out, "connect with: {}", connect_hint(config, uri));
    }
    let _ = out.flush();
}

/// How a client reaches the first listener: with TLS, the `nbds` form
/// libnbd tools take, naming what the client must bring.
fn connect_hint(config: &ServerConfig, uri: &str) -> String {
    let security = &config.security;
    let tls_uri = |user: &str, query: &str| {
        let (scheme, rest) = uri.split_once("://").unwrap_or(("nbd", uri));
        let scheme = if scheme == "nbd+unix" { "nbds+unix" } else { "nbds" };
        let join = if rest.contains('?') { '&' } else { '?' };
        format!("nbdinfo '{scheme}://{user}{rest}{join}{query}'")
    };
    match (&security.credentials, security.tls_mode) {
        (_, TlsMode::Off) | (None, _) => format!("nbdinfo {uri}"),
        (Some(CredentialSource::X509 { .. }), mode) => format!(
            "{}  (DIR: ca-cert.pem, client-cert.pem, client-key.pem; TLS {mode:?}, doc/tls.md)",
            tls_uri("", "tls-certificates=DIR")
        ),
        (Some(CredentialSource::Psk { file }), mode) => format!(
            "{}  (a line of {}; TLS {mode:?}, doc/tls.md)",
            tls_uri("USER@", "tls-psk-file=FILE"),
            file.display()
        ),
    }
}

/// 1 GiB, 64 MiB, 1.5 KiB: the largest binary unit that keeps a number >= 1.
pub(super) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match (unit, value.fract() == 0.0) {
        (0, _) => format!("{bytes} bytes"),
        (_, true) => format!("{value} {}", UNITS[unit]),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        assert_eq!(super::human_size(1 << 30), "1 GiB");
        assert_eq!(super::human_size(1536), "1.5 KiB");
        assert_eq!(super::human_size(100), "100 bytes");
        assert_eq!(super::human_size(3 << 20), "3 MiB");
    }
}
