//! The X.509 server session (rustls, unbuffered API) against arbitrary
//! input: ciphertext in arbitrary pieces, interleaved with every call the
//! handshake channel and the ring transport make. Nothing a peer sends may
//! panic (a panic aborts the whole server), and once the session has
//! failed every call must keep failing rather than call into rustls again.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ringnbd::tls::x509::X509Server;

fn server() -> &'static X509Server {
    static SERVER: OnceLock<X509Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../src/tls/testdata"));
        X509Server::load(dir, false).expect("test credentials")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut session = server().session().expect("a session");
    let mut rest = data;
    let mut out = Vec::new();
    let mut plain = [0u8; 4096];
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 6 {
            0 | 1 => {
                let n = (usize::from(op) * 7).min(rest.len());
                let (piece, tail) = rest.split_at(n);
                rest = tail;
                let _ = session.feed(piece);
            }
            2 => {
                let _ = session.read_plain(&mut plain[..usize::from(op) * 16]);
            }
            3 => {
                out.clear();
                let _ = session.take_ciphertext(&mut out);
                let _ = session.plaintext_ready();
            }
            4 if !session.is_handshaking() => {
                let _ = session.encrypt_into(&plain[..usize::from(op)], &mut out);
            }
            _ => session.close_notify(),
        }
        let _ = (session.wants_write(), session.peer_closed(), session.identity(), session.describe());
    }
});
