//! The real negotiation driver (`net::negotiate`) over a fake socket that
//! hands the server the fuzz input in arbitrary chunks. The server must
//! never panic, and everything it writes must be well-framed: the greeting,
//! option replies with consistent lengths, and at most one final
//! EXPORT_NAME reply.
#![no_main]

use std::io::{self, Read, Write};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringnbd::net::negotiate::{Observer, Terms, TimedStream, negotiate};
use ringnbd::proto::handshake::{BlockSize, ExportInfo, HandshakeLimits, OpenGate};
use ringnbd::proto::wire::*;

/// Reads come in pieces whose sizes the first bytes of the input choose.
struct Chunked<'a> {
    sizes: &'a [u8],
    next_size: usize,
    input: &'a [u8],
    written: Vec<u8>,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Ok(0);
        }
        let size = self.sizes.get(self.next_size % self.sizes.len().max(1)).copied().unwrap_or(255);
        self.next_size += 1;
        let n = (usize::from(size) + 1).min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Chunked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TimedStream for Chunked<'_> {
    fn set_timeouts(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fn exports() -> Vec<ExportInfo> {
    let export = |name: &str, flags: u16| ExportInfo {
        name: name.into(),
        description: "fuzz".into(),
        size: 1 << 30,
        flags: TF_HAS_FLAGS | flags,
        block_size: BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 },
        contexts: ["base:allocation", "qemu:dirty-bitmap:mon", "ringnbd:era"].map(String::from).to_vec(),
        tls_only: false,
    };
    let mut secret = export("secret", TF_SEND_FLUSH);
    secret.tls_only = true;
    vec![export("disk", TF_SEND_FLUSH | TF_SEND_TRIM), export("ro", TF_READ_ONLY), secret]
}

/// Walks the server's output: greeting, then option replies; a trailing
/// EXPORT_NAME reply (size, flags, maybe padding) is the only other thing.
fn check_framing(out: &[u8]) {
    assert!(out.len() >= 18, "greeting");
    assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), NBDMAGIC);
    let mut at = 18;
    while at < out.len() {
        let rest = &out[at..];
        if rest.len() >= 8 && u64::from_be_bytes(rest[..8].try_into().unwrap()) == OPTION_REPLY_MAGIC {
            assert!(rest.len() >= 20, "truncated option reply header");
            let length = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            assert!(rest.len() >= 20 + length, "option reply shorter than its length");
            at += 20 + length;
        } else {
            // The EXPORT_NAME reply: 10 bytes, or 134 with padding, last.
            assert!(rest.len() == 10 || rest.len() == 134, "stray {} bytes", rest.len());
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (sizes, input) = data.split_at(data.len().min(8));
    let exports = exports();
    let limits = HandshakeLimits { options_max: 64, option_bytes_max: 8192, option_discard_bytes_max: 16384 };
    let mut stream = Chunked { sizes, next_size: 0, input, written: Vec::new() };
    let shutdown = AtomicBool::new(false);
    let observer = Observer { progressed: &|| {}, refused: &|_| {}, tls_started: &|_| {} };
    // "secret" is TLS-only, so the SELECTIVETLS paths are fuzzed
    // too (STARTTLS itself is refused: no credentials here).
    let terms = Terms { exports: &exports, limits, timeout: Duration::from_secs(3600), tls: None, gate: &OpenGate };
    let _ = negotiate(&mut stream, &terms, &shutdown, &observer);
    check_framing(&stream.written);
});
