//! A rustls server session on the unbuffered API: records are encrypted
//! straight into the caller's ciphertext buffer, with no record allocated
//! and copied inside the library (on 1 MiB reads that was a fifth of the
//! worker's time: `memmove` and page faults of fresh record buffers).

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};

use super::session::{PeerIdentity, TlsError, TlsSession};
use super::x509;

/// Per-record overhead bound for sizing ciphertext: header (5), inner
/// content type (1) and AEAD tag (16), or TLS 1.2's explicit nonce (8) and
/// tag (16), with room to spare.
const RECORD_OVERHEAD_MAX: usize = 64;
const RECORD_PLAINTEXT_MAX: usize = 16 * 1024;
/// The key update rustls may put before a record.
const KEY_UPDATE_MAX: usize = 64;

pub struct RustlsSession {
    conn: UnbufferedServerConnection,
    /// Ciphertext fed and not yet processed: `incoming[processed..]`.
    incoming: Vec<u8>,
    processed: usize,
    /// Ciphertext rustls produced itself (handshake, alerts), to take.
    outgoing: Vec<u8>,
    /// Decrypted application data not yet read: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    closed: bool,
    /// The first fatal error, returned from then on.
    failed: Option<String>,
}

enum Step {
    Again,
    Stop,
    Fail(String),
}

fn encode_into(outgoing: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>) -> Step {
    let mut room = 4096;
    loop {
        let at = outgoing.len();
        outgoing.resize(at + room, 0);
        match encode(&mut outgoing[at..]) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return Step::Again;
            }
            Err(EncodeError::InsufficientSize(e)) => {
                outgoing.truncate(at);
                room = e.required_size;
            }
            Err(e) => {
                outgoing.truncate(at);
                return Step::Fail(e.to_string());
            }
        }
    }
}

impl RustlsSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        let conn = UnbufferedServerConnection::new(config).map_err(|e| TlsError::Protocol(e.to_string()))?;
        Ok(Self {
            conn,
            incoming: Vec::new(),
            processed: 0,
            outgoing: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            closed: false,
            failed: None,
        })
    }

    fn check(&self) -> Result<(), TlsError> {
        match &self.failed {
            Some(e) => Err(TlsError::Protocol(e.clone())),
            None => Ok(()),
        }
    }

    /// Runs rustls until it waits: for more ciphertext, or for data to
    /// encrypt, or until `out` is full. Decrypted data fills `out` first
    /// (returning how much) and only what does not fit is kept in `plain`;
    /// rustls's own records go to `outgoing`.
    fn pump(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        self.check()?;
        let mut filled = 0;
        while filled < out.len() || out.is_empty() {
            let Self { conn, incoming, processed, outgoing, plain, closed, .. } = self;
            let status = conn.process_tls_records(&mut incoming[*processed..]);
            let discard = status.discard;
            let step = match status.state {
                Err(e) => Step::Fail(e.to_string()),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut step = Step::Again;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                let take = record.payload.len().min(out.len() - filled);
                                out[filled..filled + take].copy_from_slice(&record.payload[..take]);
                                filled += take;
                                plain.extend_from_slice(&record.payload[take..]);
                            }
                            Err(e) => {
                                step = Step::Fail(e.to_string());
                                break;
                            }
                        }
                    }
                    step
                }
                // Early data is off (max_early_data_size is 0); drain any.
                Ok(ConnectionState::ReadEarlyData(mut early)) => {
                    while early.next_record().is_some() {}
                    Step::Again
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_into(outgoing, |buf| encode.encode(buf)),
                // What was encoded is in `outgoing`; the caller sends it.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Step::Again
                }
                Ok(ConnectionState::PeerClosed) => {
                    *closed = true;
                    Step::Again
                }
                Ok(_) => Step::Stop,
            };
            *processed += discard;
            match step {
                Step::Again => {}
                Step::Stop => break,
                Step::Fail(e) => {
                    self.fail(e.clone());
                    return Err(TlsError::Protocol(e));
                }
            }
        }
        if self.processed == self.incoming.len() {
            self.incoming.clear();
            self.processed = 0;
        }
        Ok(filled)
    }

    fn process(&mut self) -> Result<(), TlsError> {
        self.pump(&mut []).map(|_| ())
    }

    /// Whether a whole record waits in `incoming` (a record header is 5
    /// bytes, its length in the last two).
    fn record_waiting(&self) -> bool {
        let rest = &self.incoming[self.processed..];
        rest.len() >= 5 && rest.len() >= 5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]))
    }

    /// Records the error and collects the alert rustls queued for it, so
    /// the peer learns why. Exactly one more call, which hands out queued
    /// records before it looks at input: a second one would process the
    /// bad record again and trip rustls's "one fatal alert" assertion.
    /// After this, rustls is never called again (see `check`).
    fn fail(&mut self, error: String) {
        self.failed = Some(error);
        let Self { conn, incoming, processed, outgoing, .. } = self;
        let status = conn.process_tls_records(&mut incoming[*processed..]);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let _ = encode_into(outgoing, |buf| encode.encode(buf));
        }
    }

    /// Encrypts `data` into `out` (appending), which is sized here.
    fn encrypt_appending(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.process()?;
        let records = data.len().div_ceil(RECORD_PLAINTEXT_MAX).max(1);
        let at = out.len();
        out.resize(at + data.len() + records * RECORD_OVERHEAD_MAX + KEY_UPDATE_MAX, 0);
        let written = {
            let Self { conn, incoming, processed, .. } = self;
            let status = conn.process_tls_records(&mut incoming[*processed..]);
            debug_assert_eq!(status.discard, 0, "process() left nothing to discard");
            match status.state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match traffic.encrypt(data, &mut out[at..]) {
                    Ok(n) => Ok(n),
                    Err(EncryptError::InsufficientSize(e)) => Err(format!("ciphertext bound too small: {e:?}")),
                    Err(e) => Err(e.to_string()),
                },
                Ok(state) => Err(format!("cannot send application data now ({state:?})")),
                Err(e) => Err(e.to_string()),
            }
        };
        match written {
            Ok(n) => {
                out.truncate(at + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(at);
                Err(TlsError::Protocol(e))
            }
        }
    }
}

impl TlsSession for RustlsSession {
    /// Takes everything. During the handshake it is processed at once (the
    /// handshake moves on); after it, records wait for `read_plain`, which
    /// decrypts them straight into the reader's buffer.
    fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        self.check()?;
        // Drop what was processed first. A steady stream of records almost
        // never ends on a record boundary, so waiting for `incoming` to
        // empty grew it by every receive for the connection's life (on
        // 1 MiB writes: page faults on fresh memory, 2.7 s of CPU per GiB).
        // What stays is at most a few records, so the move is cheap.
        if self.processed > 0 {
            self.incoming.drain(..self.processed);
            self.processed = 0;
        }
        self.incoming.extend_from_slice(ciphertext);
        if self.conn.is_handshaking() {
            self.process()?;
        }
        Ok(ciphertext.len())
    }

    fn read_plain(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        let mut n = out.len().min(self.plain.len() - self.plain_at);
        out[..n].copy_from_slice(&self.plain[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain.clear();
            self.plain_at = 0;
        }
        if n < out.len() {
            n += self.pump(&mut out[n..])?;
        }
        Ok(n)
    }

    fn plaintext_ready(&mut self) -> bool {
        self.plain_at < self.plain.len() || self.failed.is_some() || self.record_waiting()
    }

    fn write_plain(&mut self, data: &[u8]) -> Result<(), TlsError> {
        let mut out = std::mem::take(&mut self.outgoing);
        let result = self.encrypt_appending(data, &mut out);
        self.outgoing = out;
        result
    }

    fn encrypt_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        // rustls's own records (a key update answer) go first.
        out.append(&mut self.outgoing);
        self.encrypt_appending(data, out)?;
        out.append(&mut self.outgoing);
        Ok(())
    }

    fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        if self.failed.is_none() {
            self.process()?;
        }
        out.append(&mut self.outgoing);
        Ok(())
    }

    fn wants_write(&self) -> bool {
        !self.outgoing.is_empty()
    }

    fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn peer_closed(&self) -> bool {
        self.closed
    }

    fn close_notify(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let Self { conn, incoming, processed, outgoing, .. } = self;
        let status = conn.process_tls_records(&mut incoming[*processed..]);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            let at = outgoing.len();
            outgoing.resize(at + RECORD_OVERHEAD_MAX, 0);
            let n = traffic.queue_close_notify(&mut outgoing[at..]).unwrap_or(0);
            outgoing.truncate(at + n);
        }
    }

    fn identity(&self) -> PeerIdentity {
        let subject =
            self.conn.peer_certificates().and_then(|chain| chain.first()).and_then(|cert| x509::subject(cert));
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

// The session moves from a handshake thread to a worker.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<RustlsSession>();
};

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    fn testdata() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/tls/testdata"))
    }

    fn server() -> Box<dyn TlsSession> {
        x509::X509Server::load(testdata(), false).expect("test credentials").session().unwrap()
    }

    fn client() -> ClientConnection {
        let mut roots = RootCertStore::empty();
        let pem = std::fs::read(testdata().join("ca-cert.pem")).unwrap();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
        client.set_buffer_limit(None);
        client
    }

    /// Moves ciphertext both ways until neither side has any to send,
    /// feeding the server `chunk` bytes at a time.
    fn shuttle(server: &mut dyn TlsSession, client: &mut ClientConnection, chunk: usize) {
        for _ in 0..64 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).unwrap();
            }
            for piece in to_server.chunks(chunk) {
                assert_eq!(server.feed(piece).unwrap(), piece.len());
            }
            let mut to_client = Vec::new();
            server.take_ciphertext(&mut to_client).unwrap();
            let mut rest = &to_client[..];
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                client.process_new_packets().unwrap();
            }
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
        }
        panic!("the handshake did not settle");
    }

    fn read_all(server: &mut dyn TlsSession, want: usize) -> Vec<u8> {
        let mut got = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let n = server.read_plain(&mut got[filled..]).unwrap();
            assert!(n > 0, "plaintext missing after {filled} of {want} bytes");
            filled += n;
        }
        got
    }

    #[test]
    fn handshake_then_data_both_ways_in_whole_and_in_byte_sized_pieces() {
        for chunk in [1, 7, 1 << 20] {
            let (mut server, mut client) = (server(), client());
            shuttle(&mut *server, &mut client, chunk);
            assert!(!server.is_handshaking() && !client.is_handshaking());
            assert!(server.describe().contains("TLS13_AES_128_GCM_SHA256"), "{}", server.describe());
            // Client to server: a large payload, read in odd-sized bites.
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
            client.writer().write_all(&payload).unwrap();
            shuttle(&mut *server, &mut client, chunk);
            assert!(server.plaintext_ready());
            assert_eq!(read_all(&mut *server, payload.len()), payload);
            assert!(!server.plaintext_ready());
            // Server to client through encrypt_into, as the worker sends.
            let mut ciphertext = Vec::new();
            server.encrypt_into(&payload[..100_000], &mut ciphertext).unwrap();
            server.encrypt_into(b"tail", &mut ciphertext).unwrap();
            let mut rest = &ciphertext[..];
            let mut back = Vec::new();
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                client.process_new_packets().unwrap();
                let mut piece = [0u8; 32 * 1024];
                while let Ok(n) = client.reader().read(&mut piece) {
                    back.extend_from_slice(&piece[..n]);
                }
            }
            assert_eq!(back.len(), 100_004);
            assert_eq!(&back[..100_000], &payload[..100_000]);
            assert_eq!(&back[100_000..], b"tail");
            // A clean close is seen.
            client.send_close_notify();
            shuttle(&mut *server, &mut client, chunk);
            assert_eq!(server.read_plain(&mut [0u8; 16]).unwrap(), 0);
            assert!(server.peer_closed());
        }
    }

    #[test]
    fn a_long_stream_of_records_keeps_the_ciphertext_buffer_small() {
        let config = x509::X509Server::load(testdata(), false).unwrap().config();
        let (mut server, mut client) = (RustlsSession::new(config).unwrap(), client());
        shuttle(&mut server, &mut client, 1 << 20);
        // 64 MiB in 1 MiB writes, fed in 64 KiB receives that split records
        // anywhere, read as they come, as a worker does.
        let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i * 13) as u8).collect();
        let mut got = vec![0u8; payload.len()];
        let mut most = 0;
        for _ in 0..64 {
            client.writer().write_all(&payload).unwrap();
            let mut ciphertext = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut ciphertext).unwrap();
            }
            let mut filled = 0;
            for piece in ciphertext.chunks(64 * 1024 + 3) {
                server.feed(piece).unwrap();
                most = most.max(server.incoming.len());
                while filled < got.len() {
                    match server.read_plain(&mut got[filled..]).unwrap() {
                        0 => break,
                        n => filled += n,
                    }
                }
            }
            assert_eq!(filled, payload.len());
            assert!(got == payload);
        }
        assert!(most < 128 * 1024, "ciphertext held grew to {most} bytes");
    }

    #[test]
    fn garbage_mid_handshake_is_an_error_every_time_after_and_never_a_panic() {
        let (mut server, mut client) = (server(), client());
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        // The ClientHello with its body scrambled.
        let last = hello.len() - 1;
        for byte in &mut hello[10..last] {
            *byte ^= 0x5a;
        }
        assert!(server.feed(&hello).is_err());
        for _ in 0..3 {
            assert!(server.feed(b"more").is_err());
            assert!(server.read_plain(&mut [0u8; 8]).is_err());
            assert!(server.encrypt_into(b"x", &mut Vec::new()).is_err());
            let mut alert = Vec::new();
            let _ = server.take_ciphertext(&mut alert);
            assert!(server.plaintext_ready(), "a failed session reports its error through read_plain");
        }
    }

    #[test]
    fn a_bad_record_after_the_handshake_fails_the_session() {
        let (mut server, mut client) = (server(), client());
        shuttle(&mut *server, &mut client, 1 << 20);
        // An application-data record with a broken tag.
        client.writer().write_all(b"hello").unwrap();
        let mut record = Vec::new();
        client.write_tls(&mut record).unwrap();
        let last = record.len() - 1;
        record[last] ^= 0xff;
        server.feed(&record).unwrap();
        assert!(server.plaintext_ready(), "a whole record waits");
        assert!(server.read_plain(&mut [0u8; 16]).is_err());
        let mut alert = Vec::new();
        let _ = server.take_ciphertext(&mut alert);
        assert!(!alert.is_empty(), "the client is told (bad_record_mac)");
    }
}
