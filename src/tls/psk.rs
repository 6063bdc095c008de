//! PSK credentials and sessions through OpenSSL, from the GnuTLS `keys.psk`
//! file that `psktool` writes: one `username:hexkey` per line.
//!
//! The NBD clients that speak PSK (libnbd, qemu, nbdkit's plugins) are
//! GnuTLS-based, so the configuration below is chosen for what GnuTLS
//! offers with its usual `NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK` priority: TLS 1.3
//! with a (EC)DHE-keyed PSK, or for clients limited to TLS 1.2 the PSK
//! suites GnuTLS and OpenSSL both implement.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::OnceLock;

use openssl::dh::Dh;
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslRef, SslSessionCacheMode, SslStream,
    SslVersion,
};

use super::session::{PeerIdentity, TlsError, TlsSession};

/// OpenSSL refuses a client identity longer than `PSK_MAX_IDENTITY_LEN`
/// (256 bytes in 3.x) before the callback sees it, so a longer username
/// in the file could never log in; 255 also leaves the C string OpenSSL
/// builds from it its NUL.
pub const MAX_USERNAME_BYTES: usize = 255;

/// OpenSSL's `PSK_MAX_PSK_LEN` (512 in 3.x): the callback's buffer for the
/// key, so a longer key could never be used. `psktool --keysize` stops
/// at 512 too.
pub const MAX_KEY_BYTES: usize = 512;

/// TLS 1.2 suites, strongest first. Only suites GnuTLS offers for PSK under
/// `NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK` are listed (`gnutls-cli -l --priority
/// ...` prints them): GnuTLS has ECDHE-PSK only with ChaCha20 or with
/// AES-CBC and HMAC-SHA1 (its NORMAL has no SHA-256 MAC), so OpenSSL's
/// ECDHE-PSK-AES*-CBC-SHA256/384 would never match. Forward-secret
/// exchanges come before plain PSK, whose one key protects every session
/// ever recorded.
const TLS12_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:\
    DHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-CHACHA20-POLY1305:\
    ECDHE-PSK-AES128-CBC-SHA:ECDHE-PSK-AES256-CBC-SHA:\
    PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305";

/// TLS 1.3 suites: only those hashing with SHA-256. OpenSSL turns the key
/// from `psk_server_callback` into a PSK bound to TLS_AES_128_GCM_SHA256,
/// and a TLS 1.3 PSK works only with a suite of the same hash, so a
/// SHA-384 suite could only end in a failed handshake (there is no
/// certificate to fall back on). OpenSSL already leans to SHA-256 suites
/// when a PSK callback is set; the list fixes the order under server
/// preference: AES-128-GCM (the fastest where the CPU has AES
/// instructions) before ChaCha20, which `PRIORITIZE_CHACHA` still gives
/// to clients that put it first. With OpenSSL's default list GnuTLS gets
/// ChaCha20 on every machine.
const TLS13_CIPHERSUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// RFC 7919 ffdhe2048, for the DHE-PSK suites, which OpenSSL leaves out
/// unless it has DH parameters (the crate does not wrap
/// `SSL_CTX_set_dh_auto`). It is a group GnuTLS clients advertise, and at
/// 112 bits it passes security level 2, the strictest common default.
const FFDHE2048_PEM: &[u8] = b"-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// How much ciphertext a session holds undecrypted before `feed` takes
/// less than it is given. Well over one maximal record (5 + 2^14 + 2048
/// bytes), so a buffer this full always holds a whole record, which
/// processing either consumes or decrypts into plaintext that waits.
const MAX_UNPROCESSED: usize = 128 * 1024;

/// A key's bytes, overwritten when dropped so that a reloaded or dropped
/// key file does not linger in freed memory.
struct SecretKey(Vec<u8>);

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keeps the stores above from being optimised away as dead.
        std::hint::black_box(&mut self.0);
    }
}

/// The keys of a `keys.psk` file, by username.
pub struct PskKeys {
    keys: HashMap<String, SecretKey>,
}

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&str> = self.usernames().collect();
        users.sort_unstable();
        f.debug_struct("PskKeys").field("usernames", &users).finish_non_exhaustive()
    }
}

fn line_error(number: usize, what: impl fmt::Display) -> TlsError {
    TlsError::Credentials(format!("line {number}: {what}"))
}

/// Hex digits to bytes. The error is the (0-based) offset of the first bad
/// digit, never the digit itself: it is part of a secret.
fn decode_hex(text: &str) -> Result<Vec<u8>, usize> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    // Sized once: a reallocation would leave a copy of the secret behind.
    let mut out = Vec::with_capacity(text.len() / 2);
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let high = nibble(pair[0]).ok_or(2 * i)?;
        let low = pair.get(1).copied().and_then(nibble).ok_or(2 * i + 1)?;
        out.push((high << 4) | low);
    }
    Ok(out)
}

impl PskKeys {
    /// Reads and parses a `keys.psk` file; errors name the file.
    pub fn load(path: &Path) -> Result<PskKeys, TlsError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TlsError::Credentials(format!("{}: {e}", path.display())))?;
        let parsed = Self::parse(&text);
        // The text holds every key in hex.
        let mut bytes = text.into_bytes();
        bytes.fill(0);
        std::hint::black_box(&mut bytes);
        parsed.map_err(|e| match e {
            TlsError::Credentials(message) => TlsError::Credentials(format!("{}: {message}", path.display())),
            other => other,
        })
    }

    /// Parses the text of a `keys.psk` file. Blank lines are skipped; a
    /// username that starts with `#` is hex, as GnuTLS reads it.
    pub fn parse(text: &str) -> Result<PskKeys, TlsError> {
        let mut keys = HashMap::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            // `lines` leaves the '\r' of a CRLF file, and editors leave
            // trailing blanks; neither can be part of a hex key.
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let Some((user, hex)) = line.split_once(':') else {
                return Err(line_error(number, "expected username:hexkey"));
            };
            let username = Self::username(number, user)?;
            if hex.is_empty() {
                return Err(line_error(number, "empty key"));
            }
            if hex.len() % 2 != 0 {
                return Err(line_error(number, "the key has an odd number of hex digits"));
            }
            if hex.len() / 2 > MAX_KEY_BYTES {
                return Err(line_error(number, format_args!("the key is longer than {MAX_KEY_BYTES} bytes")));
            }
            let key = decode_hex(hex).map(SecretKey).map_err(|offset| {
                line_error(number, format_args!("the key is not hex (column {})", user.len() + 2 + offset))
            })?;
            match keys.entry(username) {
                Entry::Occupied(entry) => {
                    let first = first_seen.get(entry.key()).copied().unwrap_or(0);
                    return Err(line_error(
                        number,
                        format_args!("username {:?} is already on line {first}", entry.key()),
                    ));
                }
                Entry::Vacant(entry) => {
                    first_seen.insert(entry.key().clone(), number);
                    entry.insert(key);
                }
            }
        }
        if keys.is_empty() {
            return Err(TlsError::Credentials("no keys (expected lines of username:hexkey)".into()));
        }
        Ok(PskKeys { keys })
    }

    fn username(number: usize, field: &str) -> Result<String, TlsError> {
        let username = match field.strip_prefix('#') {
            Some(hex) if !hex.is_empty() => {
                let bytes = decode_hex(hex).map_err(|_| line_error(number, "the #username is not hex"))?;
                String::from_utf8(bytes).map_err(|_| line_error(number, "the #username is not UTF-8"))?
            }
            _ => field.to_owned(),
        };
        if username.is_empty() {
            return Err(line_error(number, "empty username"));
        }
        if username.len() > MAX_USERNAME_BYTES {
            return Err(line_error(number, format_args!("the username is longer than {MAX_USERNAME_BYTES} bytes")));
        }
        // OpenSSL passes the client's identity to the callback as a C
        // string, so a username with a NUL in it could never match.
        if username.contains('\0') {
            return Err(line_error(number, "the username contains a NUL byte"));
        }
        Ok(username)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, username: &str) -> bool {
        self.keys.contains_key(username)
    }

    pub fn usernames(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    fn key(&self, username: &str) -> Option<&[u8]> {
        self.keys.get(username).map(|key| key.0.as_slice())
    }
}

/// Which identity the handshake's PSK callback was last asked about, kept
/// in the connection's `SSL` so that concurrent handshakes cannot mix.
#[derive(Debug)]
enum Claimed {
    Known(String),
    Unknown(String),
}

/// The per-`SSL` slot for [`Claimed`]. One slot for the process: every
/// `new_ex_index` takes a slot from a table OpenSSL never shrinks, and
/// credentials may be reloaded many times.
fn claimed_index() -> Result<Index<Ssl, Claimed>, TlsError> {
    static INDEX: OnceLock<Index<Ssl, Claimed>> = OnceLock::new();
    if let Some(index) = INDEX.get() {
        return Ok(*index);
    }
    let fresh = Ssl::new_ex_index().map_err(|e| credentials("ex_data index", &e))?;
    // Two threads racing here waste one slot, which is harmless.
    Ok(*INDEX.get_or_init(|| fresh))
}

fn credentials(what: &str, e: &ErrorStack) -> TlsError {
    TlsError::Credentials(format!("OpenSSL {what}: {}", reasons(e)))
}

/// An error stack as its reasons ("bad record mac, ..."), without the
/// codes and source file names that OpenSSL's own format adds.
fn reasons(stack: &ErrorStack) -> String {
    let reasons: Vec<String> = stack
        .errors()
        .iter()
        .map(|e| e.reason().map_or_else(|| format!("error {:#x}", e.code()), str::to_owned))
        .collect();
    if reasons.is_empty() { "unknown error".to_owned() } else { reasons.join(", ") }
}

/// Answers the PSK callback: the user's key, or for an unknown user a
/// random one, so that the handshake fails the way a wrong key does and a
/// client cannot tell which usernames exist (GnuTLS servers do the same).
fn psk_for(
    keys: &PskKeys,
    index: Index<Ssl, Claimed>,
    ssl: &mut SslRef,
    identity: Option<&[u8]>,
    psk: &mut [u8],
) -> Result<usize, ErrorStack> {
    let name = String::from_utf8_lossy(identity.unwrap_or_default()).into_owned();
    let key = std::str::from_utf8(identity.unwrap_or_default()).ok().and_then(|user| keys.key(user));
    match key {
        Some(key) if key.len() <= psk.len() => {
            psk[..key.len()].copy_from_slice(key);
            ssl.set_ex_data(index, Claimed::Known(name));
            Ok(key.len())
        }
        _ => {
            let len = psk.len().min(32);
            openssl::rand::rand_bytes(&mut psk[..len])?;
            ssl.set_ex_data(index, Claimed::Unknown(name));
            Ok(len)
        }
    }
}

/// A loaded `keys.psk`: one OpenSSL context that every session started
/// from it shares (and keeps alive, with the keys, after a reload).
pub struct PskServer {
    context: SslContext,
    claimed: Index<Ssl, Claimed>,
}

impl PskServer {
    pub fn new(keys: PskKeys) -> Result<Self, TlsError> {
        let claimed = claimed_index()?;
        let mut builder = SslContextBuilder::new(SslMethod::tls_server()).map_err(|e| credentials("context", &e))?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .and_then(|()| builder.set_max_proto_version(Some(SslVersion::TLS1_3)))
            .map_err(|e| credentials("protocol versions", &e))?;
        builder.set_cipher_list(TLS12_CIPHERS).map_err(|e| credentials("TLS 1.2 cipher list", &e))?;
        builder.set_ciphersuites(TLS13_CIPHERSUITES).map_err(|e| credentials("TLS 1.3 cipher suites", &e))?;
        let dh = Dh::params_from_pem(FFDHE2048_PEM).map_err(|e| credentials("DH parameters", &e))?;
        builder.set_tmp_dh(&dh).map_err(|e| credentials("DH parameters", &e))?;
        // Tickets and the session cache are off because a resumed session
        // skips the PSK callback, leaving no username to authorise by, and
        // NBD clients hold one long connection and do not resume anyway.
        // Renegotiation is off so that a session that has finished its
        // handshake never needs to read before it can write.
        builder.set_options(
            SslOptions::CIPHER_SERVER_PREFERENCE
                | SslOptions::PRIORITIZE_CHACHA
                | SslOptions::NO_TICKET
                | SslOptions::NO_RENEGOTIATION,
        );
        builder.set_num_tickets(0).map_err(|e| credentials("session tickets", &e))?;
        builder.set_session_cache_mode(SslSessionCacheMode::OFF);
        builder.set_psk_server_callback(move |ssl, identity, psk| psk_for(&keys, claimed, ssl, identity, psk));
        Ok(Self { context: builder.build(), claimed })
    }

    pub fn session(&self) -> Result<Box<dyn TlsSession>, TlsError> {
        Ok(Box::new(PskSession::new(&self.context, self.claimed)?))
    }
}

/// The socket side of a session, in memory: ciphertext fed in waits in
/// `incoming` until OpenSSL reads it, and what OpenSSL writes collects in
/// `outgoing` until it is taken.
#[derive(Default)]
struct MemoryPipe {
    incoming: VecDeque<u8>,
    outgoing: Vec<u8>,
}

impl Read for MemoryPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Empty means "not yet", never end of stream: the peer's end comes
        // as close_notify, and the socket's is the caller's business.
        if self.incoming.is_empty() && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.incoming.read(buf)
    }
}

impl Write for MemoryPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct PskSession {
    stream: SslStream<MemoryPipe>,
    claimed: Index<Ssl, Claimed>,
    peer_closed: bool,
    /// The first fatal error: OpenSSL refuses every later call with a
    /// vaguer one, so the same message is given each time.
    failed: Option<String>,
}

impl PskSession {
    fn new(context: &SslContext, claimed: Index<Ssl, Claimed>) -> Result<Self, TlsError> {
        let mut ssl = Ssl::new(context).map_err(|e| TlsError::Protocol(format!("new session: {}", reasons(&e))))?;
        ssl.set_accept_state();
        let stream = SslStream::new(ssl, MemoryPipe::default())
            .map_err(|e| TlsError::Protocol(format!("new session: {}", reasons(&e))))?;
        Ok(Self { stream, claimed, peer_closed: false, failed: None })
    }

    fn claimed(&self) -> Option<&Claimed> {
        self.stream.ssl().ex_data(self.claimed)
    }

    fn established(&self) -> bool {
        self.stream.ssl().is_init_finished()
    }

    fn check(&self) -> Result<(), TlsError> {
        match &self.failed {
            Some(message) => Err(TlsError::Protocol(message.clone())),
            None => Ok(()),
        }
    }

    /// Records a fatal error and returns it. During the handshake the
    /// message names the username tried, so the log says who failed.
    fn fail(&mut self, cause: String) -> TlsError {
        let message = match (self.established(), self.claimed()) {
            (false, Some(Claimed::Unknown(name))) => format!("PSK username {name:?} is not in the key file"),
            (false, Some(Claimed::Known(name))) => format!("handshake with PSK username {name:?} failed: {cause}"),
            (false, None) => format!("handshake failed: {cause}"),
            (true, _) => cause,
        };
        self.failed = Some(message.clone());
        TlsError::Protocol(message)
    }

    fn ssl_failure(&mut self, e: &openssl::ssl::Error) -> TlsError {
        let cause = match (e.ssl_error(), e.io_error()) {
            (Some(stack), _) => reasons(stack),
            (None, Some(io)) => io.to_string(),
            (None, None) => format!("OpenSSL error {}", e.code().as_raw()),
        };
        self.fail(cause)
    }

    /// Runs the handshake as far as the ciphertext fed so far allows, then
    /// decrypts ahead one record, so that a bad record or close_notify is
    /// reported when it arrives rather than when plaintext is next read.
    fn process(&mut self) -> Result<(), TlsError> {
        self.check()?;
        if !self.established() {
            match self.stream.do_handshake() {
                Ok(()) => {}
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
                Err(e) => return Err(self.ssl_failure(&e)),
            }
            // Unreachable without guessing a random key; checked anyway,
            // since an unknown user must never get through.
            if !matches!(self.claimed(), Some(Claimed::Known(_))) {
                return Err(self.fail("the handshake finished without a known PSK username".into()));
            }
        }
        if self.peer_closed || self.stream.ssl().pending() > 0 || self.stream.get_ref().incoming.is_empty() {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        match self.stream.ssl_peek(&mut byte) {
            Ok(_) => Ok(()),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(()),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                self.peer_closed = true;
                Ok(())
            }
            Err(e) => Err(self.ssl_failure(&e)),
        }
    }
}

impl TlsSession for PskSession {
    fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        self.check()?;
        let mut taken = 0;
        // Room is measured after processing, so that `feed` takes less
        // than it is given only while plaintext waits (or the peer has
        // closed): callers rely on that to know a full buffer drains.
        loop {
            let room = MAX_UNPROCESSED.saturating_sub(self.stream.get_ref().incoming.len());
            let chunk = (ciphertext.len() - taken).min(room);
            if chunk == 0 {
                return Ok(taken);
            }
            self.stream.get_mut().incoming.extend(&ciphertext[taken..taken + chunk]);
            taken += chunk;
            self.process()?;
        }
    }

    fn read_plain(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        self.check()?;
        if !self.established() {
            self.process()?;
            if !self.established() {
                return Ok(0);
            }
        }
        if out.is_empty() || self.peer_closed {
            return Ok(0);
        }
        match self.stream.ssl_read(out) {
            Ok(n) => Ok(n),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(0),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                self.peer_closed = true;
                Ok(0)
            }
            Err(e) => Err(self.ssl_failure(&e)),
        }
    }

    fn plaintext_ready(&mut self) -> bool {
        if self.stream.ssl().pending() > 0 {
            return true;
        }
        // An error counts as ready, so that the caller's `read_plain`
        // reports it instead of waiting for data that will never come.
        self.process().is_err() || self.stream.ssl().pending() > 0
    }

    fn write_plain(&mut self, data: &[u8]) -> Result<(), TlsError> {
        self.check()?;
        if !self.established() {
            return Err(TlsError::Protocol("application data written before the handshake finished".into()));
        }
        let mut rest = data;
        while !rest.is_empty() {
            match self.stream.ssl_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) => return Err(self.ssl_failure(&e)),
            }
        }
        Ok(())
    }

    fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        let outgoing = &mut self.stream.get_mut().outgoing;
        if out.is_empty() {
            // Hands over the buffer itself, and keeps `out`'s allocation
            // for the next records.
            std::mem::swap(out, outgoing);
        } else {
            out.append(outgoing);
        }
        Ok(())
    }

    fn wants_write(&self) -> bool {
        !self.stream.get_ref().outgoing.is_empty()
    }

    fn is_handshaking(&self) -> bool {
        !self.established()
    }

    fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    fn close_notify(&mut self) {
        if self.failed.is_none() && self.established() {
            // Sending never blocks in memory; the only "error" is that the
            // peer's close_notify has not come, which is not awaited here.
            let _ = self.stream.shutdown();
        }
    }

    fn identity(&self) -> PeerIdentity {
        match self.claimed() {
            Some(Claimed::Known(username)) if self.established() && self.failed.is_none() => {
                PeerIdentity::Psk { username: username.clone() }
            }
            _ => PeerIdentity::Anonymous,
        }
    }

    fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let suite = ssl.current_cipher().map_or("(no cipher suite)", |c| c.standard_name().unwrap_or(c.name()));
        format!("{} {suite} (PSK)", ssl.version_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use openssl::ssl::SslVerifyMode;

    const ALICE_HEX: &str = "9e32cf7786321a828ef7668f09fb35db9e32cf7786321a828ef7668f09fb35db";

    fn alice_key() -> Vec<u8> {
        decode_hex(ALICE_HEX).expect("hex")
    }

    fn test_server() -> PskServer {
        let keys = PskKeys::parse(&format!("alice:{ALICE_HEX}\nbob:00112233445566778899aabbccddeeff\n")).expect("keys");
        PskServer::new(keys).expect("server")
    }

    fn parse_error(text: &str) -> String {
        match PskKeys::parse(text) {
            Err(TlsError::Credentials(message)) => message,
            other => panic!("expected a credentials error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn psktool_output_parses() {
        let text = format!("alice:{ALICE_HEX}\n\nbob:00FFaa\r\n  \n#636c61697265:0102\n");
        let keys = PskKeys::parse(&text).expect("parses");
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.key("alice"), Some(alice_key().as_slice()));
        assert_eq!(keys.key("bob"), Some([0x00, 0xff, 0xaa].as_slice()));
        assert_eq!(keys.key("claire"), Some([1, 2].as_slice()));
        assert!(keys.contains("alice") && !keys.contains("carol"));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(parse_error("alice:00\nbob\n"), "line 2: expected username:hexkey");
        assert_eq!(parse_error(":00"), "line 1: empty username");
        assert_eq!(parse_error("alice:"), "line 1: empty key");
        assert_eq!(parse_error("alice:abc"), "line 1: the key has an odd number of hex digits");
        assert_eq!(parse_error("alice:00zz"), "line 1: the key is not hex (column 9)");
        assert_eq!(parse_error("alice:00:1"), "line 1: the key is not hex (column 9)");
        assert_eq!(parse_error("alice:00\n\nalice:11"), "line 3: username \"alice\" is already on line 1");
        assert_eq!(parse_error(&format!("{}:00", "u".repeat(256))), "line 1: the username is longer than 255 bytes");
        assert_eq!(parse_error(&format!("u:{}", "00".repeat(513))), "line 1: the key is longer than 512 bytes");
        assert_eq!(parse_error("#6a6:00"), "line 1: the #username is not hex");
        assert_eq!(parse_error("#ff:00"), "line 1: the #username is not UTF-8");
        assert_eq!(parse_error("#6100:00"), "line 1: the username contains a NUL byte");
        assert_eq!(parse_error("\n \n"), "no keys (expected lines of username:hexkey)");
        assert!(PskKeys::parse(&format!("{}:00", "u".repeat(255))).is_ok());
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("ringnbd-psk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keys.psk");
        std::fs::write(&path, "alice:00\nbob:0\n").expect("write");
        let error = PskKeys::load(&path).expect_err("must fail").to_string();
        assert_eq!(
            error,
            format!("TLS credentials: {}: line 2: the key has an odd number of hex digits", path.display())
        );
        std::fs::write(&path, format!("alice:{ALICE_HEX}\n")).expect("write");
        assert_eq!(PskKeys::load(&path).expect("loads").key("alice"), Some(alice_key().as_slice()));
        std::fs::remove_dir_all(&dir).expect("cleanup");
        let missing = PskKeys::load(Path::new("/nonexistent-ringnbd/keys.psk")).expect_err("must fail").to_string();
        assert!(missing.contains("/nonexistent-ringnbd/keys.psk"), "{missing}");
    }

    #[test]
    fn debug_shows_no_key() {
        let keys = PskKeys::parse(&format!("alice:{ALICE_HEX}\n")).expect("keys");
        let shown = format!("{keys:?}");
        assert_eq!(shown, "PskKeys { usernames: [\"alice\"], .. }");
    }

    #[test]
    fn sessions_are_send() {
        fn is_send<T: Send>(_: &T) {}
        fn is_shared<T: Send + Sync>(_: &T) {}
        is_send(&PskSession::new(&test_server().context, claimed_index().expect("index")).expect("session"));
        is_shared(&test_server());
    }

    /// An OpenSSL PSK client in memory, like the server session.
    struct Client {
        stream: SslStream<MemoryPipe>,
    }

    impl Client {
        fn new(user: &str, key: &[u8], max: SslVersion, tls12_ciphers: Option<&str>) -> Self {
            let mut builder = SslContextBuilder::new(SslMethod::tls_client()).expect("client context");
            builder.set_verify(SslVerifyMode::NONE);
            builder.set_max_proto_version(Some(max)).expect("version");
            if let Some(ciphers) = tls12_ciphers {
                builder.set_cipher_list(ciphers).expect("ciphers");
            }
            let (user, key) = (user.as_bytes().to_vec(), key.to_vec());
            builder.set_psk_client_callback(move |_, _hint, identity, psk| {
                identity[..user.len()].copy_from_slice(&user);
                identity[user.len()] = 0;
                psk[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
            let mut ssl = Ssl::new(&builder.build()).expect("client ssl");
            ssl.set_connect_state();
            Self { stream: SslStream::new(ssl, MemoryPipe::default()).expect("client stream") }
        }

        fn write(&mut self, data: &[u8]) {
            let mut rest = data;
            while !rest.is_empty() {
                let n = self.stream.ssl_write(rest).expect("client write");
                rest = &rest[n..];
            }
        }

        fn read_all(&mut self) -> Vec<u8> {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.ssl_read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::ZERO_RETURN => {
                        return got;
                    }
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
    }

    /// Moves the client's ciphertext into the server, reading plaintext
    /// whenever the server takes no more, as a real caller would.
    fn to_server_reading(client: &mut Client, server: &mut dyn TlsSession, got: &mut Vec<u8>) -> Result<(), TlsError> {
        let bytes = std::mem::take(&mut client.stream.get_mut().outgoing);
        let mut rest = bytes.as_slice();
        let mut buf = vec![0u8; 7000];
        loop {
            let taken = server.feed(rest)?;
            assert!(taken == rest.len() || server.plaintext_ready() || server.peer_closed(), "feed stalled");
            rest = &rest[taken..];
            while server.plaintext_ready() {
                let n = server.read_plain(&mut buf)?;
                got.extend_from_slice(&buf[..n]);
            }
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    fn to_server(client: &mut Client, server: &mut dyn TlsSession) -> Result<(), TlsError> {
        let mut got = Vec::new();
        let result = to_server_reading(client, server, &mut got);
        assert!(got.is_empty(), "unexpected plaintext");
        result
    }

    fn to_client(server: &mut dyn TlsSession, client: &mut Client) {
        let mut bytes = Vec::new();
        server.take_ciphertext(&mut bytes).expect("take");
        assert!(!server.wants_write());
        client.stream.get_mut().incoming.extend(bytes);
    }

    /// Runs both handshakes to their end. The server's result is returned;
    /// the client's is whether it finished.
    fn handshake(server: &mut dyn TlsSession, client: &mut Client) -> (Result<(), TlsError>, bool) {
        for _ in 0..20 {
            if !client.stream.ssl().is_init_finished() {
                match client.stream.do_handshake() {
                    Ok(()) => {}
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(_) => {
                        // The client failed: give the server its alert.
                        let fed = to_server(client, server);
                        return (fed, false);
                    }
                }
            }
            if let Err(e) = to_server(client, server) {
                // The server's alert stays for the caller to look at.
                return (Err(e), client.stream.ssl().is_init_finished());
            }
            to_client(server, client);
            if !server.is_handshaking() && client.stream.ssl().is_init_finished() {
                return (Ok(()), true);
            }
        }
        panic!("handshake did not finish");
    }

    fn exchange(server: &mut dyn TlsSession, client: &mut Client, size: usize) {
        let request: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        client.write(&request);
        let mut got = Vec::new();
        to_server_reading(client, server, &mut got).expect("feed");
        assert_eq!(server.read_plain(&mut [0; 64]).expect("read"), 0);
        assert!(got == request, "{} bytes sent, {} received", request.len(), got.len());

        let reply: Vec<u8> = request.iter().rev().copied().collect();
        server.write_plain(&reply).expect("write");
        assert!(server.wants_write());
        to_client(server, client);
        assert!(client.read_all() == reply, "the reply differs");
    }

    fn connect(user: &str, key: &[u8], max: SslVersion, ciphers: Option<&str>) -> (Box<dyn TlsSession>, Client) {
        let mut server = test_server().session().expect("session");
        let mut client = Client::new(user, key, max, ciphers);
        assert!(server.is_handshaking());
        assert_eq!(server.identity(), PeerIdentity::Anonymous);
        let (result, client_done) = handshake(&mut *server, &mut client);
        result.expect("server handshake");
        assert!(client_done);
        (server, client)
    }

    #[test]
    fn tls13_handshake_and_data_both_ways() {
        let (mut server, mut client) = connect("alice", &alice_key(), SslVersion::TLS1_3, None);
        assert_eq!(server.identity(), PeerIdentity::Psk { username: "alice".into() });
        assert_eq!(server.describe(), "TLSv1.3 TLS_AES_128_GCM_SHA256 (PSK)");
        assert!(!client.stream.ssl().session_reused() || client.stream.ssl().version_str() == "TLSv1.3");
        exchange(&mut *server, &mut client, 100);
        exchange(&mut *server, &mut client, 1);
        exchange(&mut *server, &mut client, 1 << 20);
    }

    #[test]
    fn tls12_suites_handshake_and_carry_data() {
        for (suite, standard) in [
            ("ECDHE-PSK-CHACHA20-POLY1305", "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256"),
            ("DHE-PSK-AES128-GCM-SHA256", "TLS_DHE_PSK_WITH_AES_128_GCM_SHA256"),
            ("DHE-PSK-AES256-GCM-SHA384", "TLS_DHE_PSK_WITH_AES_256_GCM_SHA384"),
            ("ECDHE-PSK-AES128-CBC-SHA", "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA"),
            ("ECDHE-PSK-AES256-CBC-SHA", "TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA"),
            ("PSK-AES128-GCM-SHA256", "TLS_PSK_WITH_AES_128_GCM_SHA256"),
            ("PSK-AES256-GCM-SHA384", "TLS_PSK_WITH_AES_256_GCM_SHA384"),
            ("PSK-CHACHA20-POLY1305", "TLS_PSK_WITH_CHACHA20_POLY1305_SHA256"),
        ] {
            let (mut server, mut client) = connect(
                "bob",
                &[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
                SslVersion::TLS1_2,
                Some(suite),
            );
            assert_eq!(server.describe(), format!("TLSv1.2 {standard} (PSK)"), "{suite}");
            assert_eq!(server.identity(), PeerIdentity::Psk { username: "bob".into() });
            exchange(&mut *server, &mut client, 70_000);
        }
    }

    #[test]
    fn the_longest_username_logs_in() {
        let user = "u".repeat(MAX_USERNAME_BYTES);
        let keys = PskKeys::parse(&format!("{user}:{ALICE_HEX}\n")).expect("keys");
        let server = PskServer::new(keys).expect("server");
        for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
            let mut session = server.session().expect("session");
            let mut client = Client::new(&user, &alice_key(), version, None);
            let (result, client_done) = handshake(&mut *session, &mut client);
            result.expect("server handshake");
            assert!(client_done);
            assert_eq!(session.identity(), PeerIdentity::Psk { username: user.clone() });
        }
    }

    #[test]
    fn tls12_prefers_forward_secrecy() {
        let (server, _client) = connect(
            "alice",
            &alice_key(),
            SslVersion::TLS1_2,
            Some("PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305"),
        );
        assert_eq!(server.describe(), "TLSv1.2 TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256 (PSK)");
    }

    fn refused(user: &str, key: &[u8], max: SslVersion) -> String {
        let mut server = test_server().session().expect("session");
        let mut client = Client::new(user, key, max, None);
        let (result, client_done) = handshake(&mut *server, &mut client);
        assert!(!client_done, "the client must not finish");
        assert!(server.is_handshaking());
        assert_eq!(server.identity(), PeerIdentity::Anonymous);
        let message = match result {
            Err(TlsError::Protocol(message)) => message,
            other => panic!("expected a protocol error, got {other:?}"),
        };
        let mut alert = Vec::new();
        server.take_ciphertext(&mut alert).expect("take");
        assert_eq!(alert.first(), Some(&21), "an alert for the client");
        client.stream.get_mut().incoming.extend(alert);
        let client_error = client.stream.do_handshake().expect_err("the client must fail");
        assert_eq!(client_error.code(), ErrorCode::SSL, "{client_error}");
        // Every later call gives the same error.
        assert_eq!(server.feed(b"more").map_err(|e| e.to_string()), Err(format!("TLS: {message}")));
        assert!(server.read_plain(&mut [0; 16]).is_err());
        assert!(server.write_plain(b"x").is_err());
        assert!(server.plaintext_ready());
        message
    }

    #[test]
    fn wrong_key_is_refused() {
        let mut wrong = alice_key();
        wrong[0] ^= 1;
        for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
            let message = refused("alice", &wrong, version);
            assert!(message.starts_with("handshake with PSK username \"alice\" failed: "), "{message}");
        }
    }

    #[test]
    fn unknown_username_is_refused() {
        for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
            let message = refused("mallory", &alice_key(), version);
            assert_eq!(message, "PSK username \"mallory\" is not in the key file");
        }
    }

    #[test]
    fn close_notify_both_ways() {
        let (mut server, mut client) = connect("alice", &alice_key(), SslVersion::TLS1_3, None);
        client.write(b"last words");
        client.stream.shutdown().expect("client shutdown");
        let mut got = Vec::new();
        to_server_reading(&mut client, &mut *server, &mut got).expect("feed");
        assert_eq!(got, b"last words");
        assert_eq!(server.read_plain(&mut [0; 64]).expect("read"), 0);
        assert!(server.peer_closed());
        assert!(!server.plaintext_ready());
        server.close_notify();
        assert!(server.wants_write());
        to_client(&mut *server, &mut client);
        assert!(client.read_all().is_empty());
        assert!(client.stream.get_shutdown().contains(openssl::ssl::ShutdownState::RECEIVED));
    }

    #[test]
    fn a_bare_close_notify_is_seen_on_feed() {
        let (mut server, mut client) = connect("alice", &alice_key(), SslVersion::TLS1_2, None);
        client.stream.shutdown().expect("client shutdown");
        to_server(&mut client, &mut *server).expect("feed");
        assert!(server.peer_closed());
    }

    #[test]
    fn records_fed_a_byte_at_a_time() {
        let mut server = test_server().session().expect("session");
        let mut client = Client::new("alice", &alice_key(), SslVersion::TLS1_3, None);
        for _ in 0..10 {
            let _ = client.stream.do_handshake();
            let bytes = std::mem::take(&mut client.stream.get_mut().outgoing);
            for byte in bytes.chunks(1) {
                assert_eq!(server.feed(byte).expect("feed"), 1);
            }
            to_client(&mut *server, &mut client);
        }
        assert!(!server.is_handshaking());
        client.write(b"hello");
        let bytes = std::mem::take(&mut client.stream.get_mut().outgoing);
        let mut buf = [0u8; 16];
        for (i, byte) in bytes.chunks(1).enumerate() {
            server.feed(byte).expect("feed");
            assert_eq!(server.plaintext_ready(), i + 1 == bytes.len());
        }
        assert_eq!(server.read_plain(&mut buf).expect("read"), 5);
        assert_eq!(&buf[..5], b"hello");
    }

    #[test]
    fn feed_stops_at_the_limit_and_resumes() {
        let (mut server, mut client) = connect("alice", &alice_key(), SslVersion::TLS1_3, None);
        let data = vec![7u8; 1 << 20];
        client.write(&data);
        let bytes = std::mem::take(&mut client.stream.get_mut().outgoing);
        let first = server.feed(&bytes).expect("feed");
        assert!(first < bytes.len(), "{first}");
        assert!(server.plaintext_ready());
        let mut rest = &bytes[first..];
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        while got < data.len() {
            while server.plaintext_ready() {
                got += server.read_plain(&mut buf).expect("read");
            }
            let taken = server.feed(rest).expect("feed");
            rest = &rest[taken..];
        }
        assert!(rest.is_empty());
        assert_eq!(got, data.len());
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut server = test_server().session().expect("session");
        assert!(matches!(server.feed(b"GET / HTTP/1.1\r\n\r\n"), Err(TlsError::Protocol(_))));
        assert!(server.is_handshaking());

        // A ClientHello cut short: refused with an alert for the client.
        let mut cut_short = test_server().session().expect("session");
        assert!(matches!(cut_short.feed(&[22, 3, 1, 0, 4, 1, 0, 0, 0]), Err(TlsError::Protocol(_))));
        let mut alert = Vec::new();
        cut_short.take_ciphertext(&mut alert).expect("take");
        assert_eq!(alert.first(), Some(&21), "an alert record");

        let (mut server, _client) = connect("alice", &alice_key(), SslVersion::TLS1_3, None);
        let mut record = vec![23, 3, 3, 0, 40];
        record.extend_from_slice(&[0xAA; 40]);
        let error = server.feed(&record).expect_err("bad record").to_string();
        assert!(error.contains("bad record mac") || error.contains("decrypt"), "{error}");
    }

    #[test]
    fn nothing_is_written_before_the_handshake() {
        let mut server = test_server().session().expect("session");
        assert!(server.write_plain(b"early").is_err());
        assert_eq!(server.read_plain(&mut [0; 8]).expect("read"), 0);
        assert!(!server.plaintext_ready());
        assert!(!server.wants_write());
        server.close_notify();
        assert!(!server.wants_write());
    }

    /// What the server side of a run against a real client saw.
    #[derive(Debug)]
    struct Served {
        describe: String,
        identity: PeerIdentity,
        /// The first plaintext the client sent.
        got: Vec<u8>,
    }

    struct ClientRun {
        server: Result<Served, TlsError>,
        client_output: String,
    }

    fn io_error(e: io::Error) -> TlsError {
        TlsError::Protocol(format!("socket: {e}"))
    }

    /// A session over a blocking socket, as the handshake threads drive it.
    struct SocketSession<'a> {
        session: Box<dyn TlsSession>,
        socket: &'a mut std::net::TcpStream,
        plain: Vec<u8>,
    }

    impl SocketSession<'_> {
        fn flush(&mut self) -> Result<(), TlsError> {
            let mut out = Vec::new();
            self.session.take_ciphertext(&mut out)?;
            self.socket.write_all(&out).map_err(io_error)
        }

        /// Exactly `n` bytes of plaintext, running the handshake first.
        fn read_plain(&mut self, n: usize) -> Result<Vec<u8>, TlsError> {
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                self.flush()?;
                while self.session.plaintext_ready() {
                    let mut buf = [0u8; 4096];
                    let k = self.session.read_plain(&mut buf)?;
                    self.plain.extend_from_slice(&buf[..k]);
                }
                if self.plain.len() >= n {
                    return Ok(self.plain.drain(..n).collect());
                }
                let k = self.socket.read(&mut chunk).map_err(io_error)?;
                if k == 0 {
                    return Err(TlsError::Protocol("the client hung up".into()));
                }
                let mut rest = &chunk[..k];
                while !rest.is_empty() {
                    let taken = match self.session.feed(rest) {
                        Ok(taken) => taken,
                        Err(e) => {
                            // As the handshake threads do: the alert goes out.
                            let _ = self.flush();
                            return Err(e);
                        }
                    };
                    rest = &rest[taken..];
                    while self.session.plaintext_ready() {
                        let mut buf = [0u8; 4096];
                        let k = self.session.read_plain(&mut buf)?;
                        self.plain.extend_from_slice(&buf[..k]);
                    }
                }
            }
        }

        fn finish(mut self, got: Vec<u8>, reply: &[u8]) -> Result<Served, TlsError> {
            let served = Served { describe: self.session.describe(), identity: self.session.identity(), got };
            self.session.write_plain(reply)?;
            self.session.close_notify();
            self.flush()?;
            Ok(served)
        }
    }

    /// Runs `program` (given the port to connect to as its last argument)
    /// against one connection served by `serve`. `None` where the program
    /// is not installed.
    fn run_client(
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        serve: impl FnOnce(&mut std::net::TcpStream) -> Result<Served, TlsError>,
    ) -> Option<ClientRun> {
        use std::net::TcpListener;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};

        if !Path::new(program).exists() {
            eprintln!("{program} is not installed: skipped");
            return None;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port().to_string();
        let mut child = Command::new(program)
            .args(args)
            .arg(&port)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the client");
        // Held open until the child is done: gnutls-cli quits at the end of
        // its input, which must not race the server's answer.
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"ping\n").expect("stdin");

        let deadline = Instant::now() + Duration::from_secs(30);
        listener.set_nonblocking(true).expect("nonblocking");
        let socket = loop {
            match listener.accept() {
                Ok((socket, _)) => break Some(socket),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline || child.try_wait().expect("wait").is_some() {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let server = match socket {
            Some(mut socket) => {
                socket.set_nonblocking(false).expect("blocking");
                socket.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
                serve(&mut socket)
            }
            None => Err(TlsError::Protocol("the client never connected".into())),
        };
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(stdin);
        let output = child.wait_with_output().expect("output");
        let client_output = format!(
            "{}{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            output.status
        );
        Some(ClientRun { server, client_output })
    }

    /// `gnutls-cli` sends "ping\n"; the server answers "pong\n" and closes.
    fn gnutls_cli(user: &str, key_hex: &str, priority: &str) -> Option<ClientRun> {
        let args = ["--pskusername", user, "--pskkey", key_hex, "--priority", priority, "127.0.0.1", "-p"];
        run_client("/usr/bin/gnutls-cli", &args, &[], |socket| {
            let mut session = SocketSession { session: test_server().session()?, socket, plain: Vec::new() };
            let got = session.read_plain(5)?;
            session.finish(got, b"pong\n")
        })
    }

    const LIBNBD_PRIORITY: &str = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";

    #[test]
    fn gnutls_client_with_libnbd_priority() {
        let Some(run) = gnutls_cli("alice", ALICE_HEX, LIBNBD_PRIORITY) else { return };
        let served = run.server.unwrap_or_else(|e| panic!("{e}\n{}", run.client_output));
        assert_eq!(served.describe, "TLSv1.3 TLS_AES_128_GCM_SHA256 (PSK)");
        assert_eq!(served.got, b"ping\n");
        assert_eq!(served.identity, PeerIdentity::Psk { username: "alice".into() });
        assert!(run.client_output.contains("pong"), "{}", run.client_output);
    }

    /// Only plain PSK: gnutls-cli 3.7.9 crashes after any (EC)DHE-PSK
    /// TLS 1.2 handshake, in its own printing of the session (it calls
    /// `gnutls_psk_server_get_username` on a client session), whoever the
    /// server is. The (EC)DHE-PSK suites are tested through libnbd.
    #[test]
    fn gnutls_client_over_tls12_plain_psk() {
        let priority = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+PSK";
        let Some(run) = gnutls_cli("alice", ALICE_HEX, priority) else { return };
        let served = run.server.unwrap_or_else(|e| panic!("{e}\n{}", run.client_output));
        assert_eq!(served.describe, "TLSv1.2 TLS_PSK_WITH_AES_128_GCM_SHA256 (PSK)");
        assert_eq!(served.got, b"ping\n");
        assert_eq!(served.identity, PeerIdentity::Psk { username: "alice".into() });
        assert!(run.client_output.contains("pong"), "{}", run.client_output);
    }

    #[test]
    fn gnutls_client_with_a_wrong_key_or_username_is_refused() {
        let mut wrong = ALICE_HEX.to_owned();
        wrong.replace_range(..2, "00");
        for version in ["", ":-VERS-TLS1.3"] {
            let priority = format!("{LIBNBD_PRIORITY}{version}");
            let Some(run) = gnutls_cli("alice", &wrong, &priority) else { return };
            let error = run.server.expect_err("wrong key").to_string();
            assert!(error.starts_with("TLS: handshake with PSK username \"alice\" failed"), "{error}");
            assert!(!run.client_output.contains("pong"), "{}", run.client_output);
            let Some(run) = gnutls_cli("mallory", ALICE_HEX, &priority) else { return };
            let error = run.server.expect_err("unknown user").to_string();
            assert_eq!(error, "TLS: PSK username \"mallory\" is not in the key file");
            assert!(!run.client_output.contains("pong"), "{}", run.client_output);
        }
    }

    /// libnbd connects with NBD_OPT_STARTTLS, so the server speaks the
    /// fixed-newstyle preamble, acknowledges STARTTLS, runs the handshake
    /// and reads libnbd's first option over TLS; then it hangs up, which
    /// libnbd reports as a failed connect (expected here).
    const LIBNBD_SCRIPT: &str = "
import nbd, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file(sys.argv[1])
h.set_tls_username(sys.argv[2])
try:
    h.connect_tcp('127.0.0.1', sys.argv[3])
except nbd.Error as e:
    print('connect:', e)
";

    fn libnbd(keys_psk: &str, user: &str, gnutls_config: Option<&str>) -> Option<ClientRun> {
        let python = "/usr/bin/python3";
        let has_nbd = std::process::Command::new(python)
            .args(["-c", "import nbd"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !has_nbd {
            eprintln!("python3-libnbd is not installed: skipped");
            return None;
        }
        // Tests run in parallel: each run gets its own directory.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringnbd-psk-libnbd-{}-{run}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let keys_path = dir.join("keys.psk");
        std::fs::write(&keys_path, keys_psk).expect("write keys");
        let config_path = dir.join("gnutls.conf");
        let mut env = Vec::new();
        if let Some(config) = gnutls_config {
            std::fs::write(&config_path, config).expect("write config");
            env.push(("GNUTLS_SYSTEM_PRIORITY_FILE", config_path.to_str().expect("utf-8 path")));
        }
        let keys = keys_path.to_str().expect("utf-8 path");
        let run = run_client(python, &["-c", LIBNBD_SCRIPT, keys, user], &env, serve_nbd_starttls);
        std::fs::remove_dir_all(&dir).expect("cleanup");
        run
    }

    fn serve_nbd_starttls(socket: &mut std::net::TcpStream) -> Result<Served, TlsError> {
        const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
        const OPT_STARTTLS: u32 = 5;
        const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
        const REP_ACK: u32 = 1;
        let mut greeting = b"NBDMAGIC".to_vec();
        greeting.extend_from_slice(IHAVEOPT);
        greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        socket.write_all(&greeting).map_err(io_error)?;
        let mut client_flags = [0u8; 4];
        socket.read_exact(&mut client_flags).map_err(io_error)?;
        let mut option = [0u8; 16];
        socket.read_exact(&mut option).map_err(io_error)?;
        if &option[..8] != IHAVEOPT || option[8..12] != OPT_STARTTLS.to_be_bytes() || option[12..] != [0; 4] {
            return Err(TlsError::Protocol(format!("expected NBD_OPT_STARTTLS, got {option:02x?}")));
        }
        let mut ack = REPLY_MAGIC.to_be_bytes().to_vec();
        ack.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
        ack.extend_from_slice(&REP_ACK.to_be_bytes());
        ack.extend_from_slice(&0u32.to_be_bytes());
        socket.write_all(&ack).map_err(io_error)?;

        let mut session = SocketSession { session: test_server().session()?, socket, plain: Vec::new() };
        let header = session.read_plain(16)?;
        if &header[..8] != IHAVEOPT {
            return Err(TlsError::Protocol(format!("expected an option over TLS, got {header:02x?}")));
        }
        session.finish(header, &[])
    }

    fn libnbd_served(run: ClientRun) -> Served {
        let served = run.server.unwrap_or_else(|e| panic!("{e}\n{}", run.client_output));
        assert_eq!(served.identity, PeerIdentity::Psk { username: "alice".into() });
        assert_eq!(&served.got[..8], b"IHAVEOPT");
        served
    }

    #[test]
    fn libnbd_negotiates_tls13() {
        let Some(run) = libnbd(&format!("alice:{ALICE_HEX}\n"), "alice", None) else { return };
        assert_eq!(libnbd_served(run).describe, "TLSv1.3 TLS_AES_128_GCM_SHA256 (PSK)");
    }

    /// GnuTLS's system-wide overrides stand in for an older client or a
    /// stricter policy, since libnbd's priority string is fixed.
    #[test]
    fn libnbd_negotiates_tls12_with_ecdhe_and_dhe() {
        let keys = format!("alice:{ALICE_HEX}\n");
        let tls12 = "[overrides]\ndisabled-version = tls1.3\n";
        let Some(run) = libnbd(&keys, "alice", Some(tls12)) else { return };
        assert_eq!(libnbd_served(run).describe, "TLSv1.2 TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256 (PSK)");
        let dhe = format!("{tls12}tls-disabled-kx = ECDHE-PSK\n");
        let Some(run) = libnbd(&keys, "alice", Some(&dhe)) else { return };
        assert_eq!(libnbd_served(run).describe, "TLSv1.2 TLS_DHE_PSK_WITH_AES_128_GCM_SHA256 (PSK)");
        let cbc = format!(
            "{tls12}tls-disabled-cipher = CHACHA20-POLY1305\ntls-disabled-kx = DHE-PSK\ntls-disabled-kx = PSK\n"
        );
        let Some(run) = libnbd(&keys, "alice", Some(&cbc)) else { return };
        assert_eq!(libnbd_served(run).describe, "TLSv1.2 TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA (PSK)");
    }

    #[test]
    fn libnbd_with_a_wrong_key_is_refused() {
        let wrong = format!("alice:00{}\n", &ALICE_HEX[2..]);
        for config in [None, Some("[overrides]\ndisabled-version = tls1.3\n")] {
            let Some(run) = libnbd(&wrong, "alice", config) else { return };
            let error = run.server.expect_err("wrong key").to_string();
            assert!(error.starts_with("TLS: handshake with PSK username \"alice\" failed"), "{error}");
        }
    }
}
