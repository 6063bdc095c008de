//! TLS between a connection's socket and its protocol code, on the ring.
//!
//! There is no kernel TLS here, so the worker encrypts and decrypts. The
//! connection keeps its plaintext paths exactly as for a plain socket (the
//! receive buffer, WRITE payloads received into their own buffers, replies
//! gathered from requests), and this layer sits below them:
//! - receiving: the ring receives ciphertext into `cipher_in`; the session
//!   decrypts it and the plaintext is copied to wherever a plain receive
//!   would have landed. When plaintext is already waiting (one record held
//!   more than the target took), the "receive" is a NOP on the ring, so
//!   every receive still completes through the ring in order;
//! - sending: the replies a plain `sendmsg` would gather are encrypted into
//!   `cipher_out`, which one ring send carries; the requests are freed once
//!   all of it is on the wire, as for plain sends.
//!
//! Ownership: `cipher_in` and `cipher_out` belong to the connection's
//! transport and are touched only while no receive (respectively send) is
//! in flight; the connection is released only after both completed.

use crate::tls::channel::Parts;
use crate::tls::{TlsError, TlsSession};

/// Ciphertext received at once: a few full records (16 KiB plus header
/// and tag each).
pub const CIPHER_IN_BYTES: usize = 64 * 1024;
/// Plaintext encrypted into one send: enough to amortise the send, small
/// enough that a large READ reply does not double its memory at once.
pub const PLAIN_PER_SEND_MAX: usize = 256 * 1024;
/// A ciphertext buffer larger than this is dropped when its connection
/// is idle (`trim`).
const CIPHER_OUT_KEPT_BYTES: usize = 64 * 1024;
/// The most plaintext one TLS record carries (RFC 8446 section 5.1).
const RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

pub struct TlsTransport {
    session: Box<dyn TlsSession>,
    cipher_in: Box<[u8]>,
    /// `cipher_in[..unfed]` was received and not yet taken by the session.
    unfed: usize,
    /// The receive in flight is a NOP standing for plaintext already here.
    nop_posted: bool,
    cipher_out: Vec<u8>,
    /// Bytes of `cipher_out` on the wire so far.
    out_sent: usize,
    /// Reply plaintext whose ciphertext is in `cipher_out`.
    plain_staged: usize,
    /// Small reply parts gathered into one record (see `pack`).
    packing: Vec<u8>,
    close_notify_queued: bool,
}

impl TlsTransport {
    pub fn new(parts: Parts) -> Self {
        let mut cipher_in = vec![0u8; CIPHER_IN_BYTES.max(parts.unfed.len())].into_boxed_slice();
        cipher_in[..parts.unfed.len()].copy_from_slice(&parts.unfed);
        Self {
            session: parts.session,
            cipher_in,
            unfed: parts.unfed.len(),
            nop_posted: false,
            cipher_out: Vec::new(),
            out_sent: 0,
            plain_staged: 0,
            packing: Vec::with_capacity(RECORD_PLAINTEXT_BYTES),
            close_notify_queued: false,
        }
    }

    fn feed(&mut self) -> Result<(), TlsError> {
        if self.unfed == 0 {
            return Ok(());
        }
        let taken = self.session.feed(&self.cipher_in[..self.unfed])?;
        self.cipher_in.copy_within(taken..self.unfed, 0);
        self.unfed -= taken;
        Ok(())
    }

    /// Whether the next receive can be answered without the socket:
    /// plaintext waits, or the peer has closed.
    pub fn ready(&mut self) -> Result<bool, TlsError> {
        self.feed()?;
        Ok(self.session.plaintext_ready() || self.session.peer_closed())
    }

    /// Where the ring receives ciphertext next.
    pub fn receive_target(&mut self) -> (*mut u8, usize) {
        let free = self.cipher_in.len() - self.unfed;
        assert!(free > 0, "ready() is true whenever cipher_in is full");
        // SAFETY: unfed < cipher_in.len(), so the pointer is in bounds.
        (unsafe { self.cipher_in.as_mut_ptr().add(self.unfed) }, free)
    }

    /// Marks the receive about to be posted as a NOP (see `ready`), or not.
    pub fn posting(&mut self, nop: bool) {
        self.nop_posted = nop;
    }

    /// A receive completed with `result` (bytes of ciphertext, unless it
    /// was a NOP). Returns whether it was a NOP.
    pub fn completed(&mut self, result: i32) -> bool {
        let nop = std::mem::take(&mut self.nop_posted);
        if !nop && result > 0 {
            self.unfed += result as usize;
            debug_assert!(self.unfed <= self.cipher_in.len());
        }
        nop
    }

    /// Decrypts into `target`. `Ok(0)`: nothing yet (or the peer closed).
    pub fn deliver(&mut self, target: &mut [u8]) -> Result<usize, TlsError> {
        loop {
            let n = self.session.read_plain(target)?;
            if n > 0 || self.session.peer_closed() {
                return Ok(n);
            }
            let before = self.unfed;
            self.feed()?;
            if self.unfed == before {
                return Ok(0);
            }
        }
    }

    pub fn peer_closed(&self) -> bool {
        self.session.peer_closed()
    }

    /// Whether ciphertext is still being sent.
    pub fn sending(&self) -> bool {
        self.out_sent < self.cipher_out.len()
    }

    /// Encrypts reply bytes (up to [`PLAIN_PER_SEND_MAX`]) and whatever
    /// the session itself wants to send. Returns the ciphertext to send
    /// next, or None when there is none. Only while no send is in flight.
    pub fn stage<'a>(
        &mut self,
        replies: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Option<(*const u8, usize)>, TlsError> {
        if !self.sending() {
            self.cipher_out.clear();
            self.out_sent = 0;
            // The session's own records (a key update answer) go first.
            self.session.take_ciphertext(&mut self.cipher_out)?;
            let mut staged = 0;
            for part in replies {
                let take = part.len().min(PLAIN_PER_SEND_MAX - staged);
                self.pack(&part[..take])?;
                staged += take;
                if staged == PLAIN_PER_SEND_MAX {
                    break;
                }
            }
            if !self.packing.is_empty() {
                self.session.encrypt_into(&self.packing, &mut self.cipher_out)?;
                self.packing.clear();
            }
            self.plain_staged = staged;
            self.session.take_ciphertext(&mut self.cipher_out)?;
        }
        let rest = &self.cipher_out[self.out_sent..];
        Ok((!rest.is_empty()).then_some((rest.as_ptr(), rest.len())))
    }

    /// Encrypts `part` in full records where it can. Each write to the
    /// session is at least one record, and the client pays for every
    /// record it decrypts (a 4 KiB READ reply as header and data would be
    /// two), so small parts are packed together first; a large part tops
    /// up the packed record and goes in whole records straight from its
    /// buffer, so only the pieces at record edges are copied.
    fn pack(&mut self, mut part: &[u8]) -> Result<(), TlsError> {
        if self.packing.len() + part.len() < RECORD_PLAINTEXT_BYTES {
            self.packing.extend_from_slice(part);
            return Ok(());
        }
        if !self.packing.is_empty() {
            let top_up = RECORD_PLAINTEXT_BYTES - self.packing.len();
            self.packing.extend_from_slice(&part[..top_up]);
            self.session.encrypt_into(&self.packing, &mut self.cipher_out)?;
            self.packing.clear();
            part = &part[top_up..];
        }
        let whole = part.len() - part.len() % RECORD_PLAINTEXT_BYTES;
        if whole > 0 {
            self.session.encrypt_into(&part[..whole], &mut self.cipher_out)?;
        }
        self.packing.extend_from_slice(&part[whole..]);
        Ok(())
    }

    /// `n` bytes of ciphertext went out. Returns the reply plaintext they
    /// finished carrying once all staged ciphertext is sent, else None
    /// (send the rest first).
    pub fn sent(&mut self, n: usize) -> Option<usize> {
        self.out_sent += n;
        debug_assert!(self.out_sent <= self.cipher_out.len());
        if self.sending() {
            return None;
        }
        Some(std::mem::take(&mut self.plain_staged))
    }

    /// Whether the session has ciphertext of its own to send (a key
    /// update answer, an alert).
    pub fn wants_write(&self) -> bool {
        self.session.wants_write()
    }

    /// Gives back the ciphertext buffer of an idle connection once a large
    /// reply grew it: a thousand idle TLS clients must not each keep the
    /// quarter megabyte their last READ needed. Only between sends.
    pub fn trim(&mut self) {
        if !self.sending() && self.cipher_out.capacity() > CIPHER_OUT_KEPT_BYTES {
            self.cipher_out = Vec::new();
            self.out_sent = 0;
        }
    }

    /// Queues close_notify once; returns whether it was queued now.
    pub fn queue_close_notify(&mut self) -> bool {
        if self.close_notify_queued {
            return false;
        }
        self.close_notify_queued = true;
        self.session.close_notify();
        true
    }
}
