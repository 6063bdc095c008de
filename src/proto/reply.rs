//! Reply encoders. Each writes into a caller-owned fixed array and returns
//! the byte count, so the transmission path never allocates for headers.

use super::transmission::ReplyMode;
use super::wire::*;

/// Room for the largest header this module writes: an extended chunk header
/// plus an error payload with a short message.
pub const REPLY_HEADER_BYTES_MAX: usize = 128;
/// Error messages are truncated so every error chunk fits the header array.
const ERROR_MESSAGE_BYTES_MAX: usize = REPLY_HEADER_BYTES_MAX - EXTENDED_HEADER_BYTES - 4 - 2;

pub type HeaderBuf = [u8; REPLY_HEADER_BYTES_MAX];

struct Cursor<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.out[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
}

/// Identifies the request a reply answers.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    pub mode: ReplyMode,
    pub cookie: u64,
    /// The request's offset (echoed in extended chunk headers).
    pub offset: u64,
}

pub fn simple(out: &mut [u8], cookie: u64, error: u32) -> usize {
    let mut c = Cursor { out, len: 0 };
    c.u32(SIMPLE_REPLY_MAGIC).u32(error).u64(cookie);
    c.len
}

/// A chunk header (structured or extended) announcing `payload_len` bytes.
pub fn chunk_header(out: &mut [u8], to: ReplyTo, flags: u16, kind: u16, payload_len: u64) -> usize {
    let mut c = Cursor { out, len: 0 };
    if to.mode == ReplyMode::Extended {
        c.u32(EXTENDED_REPLY_MAGIC).u16(flags).u16(kind).u64(to.cookie).u64(to.offset).u64(payload_len);
    } else {
        debug_assert!(payload_len <= u64::from(u32::MAX));
        c.u32(STRUCTURED_REPLY_MAGIC).u16(flags).u16(kind).u64(to.cookie).u32(payload_len as u32);
    }
    c.len
}

/// Sets the DONE flag of the chunk whose header starts `chunk`: replies
/// assembled from parts that finish in any order (one block-status chunk
/// per context) learn which chunk is last only after writing it.
pub fn set_done(chunk: &mut [u8]) {
    // Both chunk headers put the 16-bit flags right after the 32-bit magic.
    let flags = u16::from_be_bytes([chunk[4], chunk[5]]) | REPLY_FLAG_DONE;
    chunk[4..6].copy_from_slice(&flags.to_be_bytes());
}

/// Success without data: a simple reply where allowed, else NONE+DONE.
pub fn success(out: &mut [u8], to: ReplyTo, is_read: bool) -> usize {
    match to.mode {
        ReplyMode::Simple => simple(out, to.cookie, 0),
        // Structured mode allows simple replies for everything but READ.
        ReplyMode::Structured if !is_read => simple(out, to.cookie, 0),
        _ => chunk_header(out, to, REPLY_FLAG_DONE, CHUNK_NONE, 0),
    }
}

/// The header preceding `data_len` bytes of read data (final chunk).
pub fn read_data(out: &mut [u8], to: ReplyTo, offset: u64, data_len: u32) -> usize {
    if to.mode == ReplyMode::Simple {
        return simple(out, to.cookie, 0);
    }
    data_chunk(out, to, offset, data_len, true)
}

/// An OFFSET_DATA chunk header for `data_len` bytes at `offset`.
pub fn data_chunk(out: &mut [u8], to: ReplyTo, offset: u64, data_len: u32, done: bool) -> usize {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = chunk_header(out, to, flags, CHUNK_OFFSET_DATA, 8 + u64::from(data_len));
    let mut c = Cursor { out, len: n };
    c.u64(offset);
    c.len
}

/// An OFFSET_HOLE chunk: `hole_len` bytes at `offset` read as zeroes.
pub fn hole_chunk(out: &mut [u8], to: ReplyTo, offset: u64, hole_len: u32, done: bool) -> usize {
    debug_assert!(hole_len > 0 && to.mode != ReplyMode::Simple);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = chunk_header(out, to, flags, CHUNK_OFFSET_HOLE, 8 + 4);
    let mut c = Cursor { out, len: n };
    c.u64(offset).u32(hole_len);
    c.len
}

/// A final error reply. Structured modes carry the message.
pub fn error(out: &mut [u8], to: ReplyTo, code: u32, message: &str) -> usize {
    debug_assert!(code != 0);
    if to.mode == ReplyMode::Simple {
        return simple(out, to.cookie, code);
    }
    let message = truncate(message, ERROR_MESSAGE_BYTES_MAX);
    let n = chunk_header(out, to, REPLY_FLAG_DONE, CHUNK_ERROR, 4 + 2 + message.len() as u64);
    let mut c = Cursor { out, len: n };
    c.u32(code).u16(message.len() as u16).put(message.as_bytes());
    c.len
}

/// The header of one BLOCK_STATUS chunk holding `count` descriptors.
pub fn block_status(out: &mut [u8], to: ReplyTo, context_id: u32, count: u32, done: bool) -> usize {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = if to.mode == ReplyMode::Extended {
        let n = chunk_header(out, to, flags, CHUNK_BLOCK_STATUS_EXT, 8 + 16 * u64::from(count));
        let mut c = Cursor { out, len: n };
        c.u32(context_id).u32(count);
        return c.len;
    } else {
        chunk_header(out, to, flags, CHUNK_BLOCK_STATUS, 4 + 8 * u64::from(count))
    };
    let mut c = Cursor { out, len: n };
    c.u32(context_id);
    c.len
}

/// Bytes one descriptor takes in this mode.
pub fn descriptor_bytes(mode: ReplyMode) -> usize {
    if mode == ReplyMode::Extended { Wide::BYTES } else { Compact::BYTES }
}

/// How one block-status descriptor is laid out. Encoders that write
/// descriptors in a tight loop are generic over it, so the mode is decided
/// once per chunk rather than once per descriptor.
pub trait DescriptorFormat {
    const BYTES: usize;
    /// Writes one descriptor at the start of `slot` (at least `BYTES` long).
    fn put(slot: &mut [u8], length: u64, status: u32);
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS`: 32-bit length and status. The caller
/// keeps lengths within 32 bits (compact requests cannot ask for more).
pub struct Compact;

impl DescriptorFormat for Compact {
    const BYTES: usize = 8;
    #[inline(always)]
    fn put(slot: &mut [u8], length: u64, status: u32) {
        debug_assert!(length <= u64::from(u32::MAX));
        // One 8-byte store: big-endian length, then big-endian status.
        let word = (u64::from(length as u32) << 32) | u64::from(status);
        slot[..8].copy_from_slice(&word.to_be_bytes());
    }
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: 64-bit length and status.
pub struct Wide;

impl DescriptorFormat for Wide {
    const BYTES: usize = 16;
    #[inline(always)]
    fn put(slot: &mut [u8], length: u64, status: u32) {
        slot[..8].copy_from_slice(&length.to_be_bytes());
        slot[8..16].copy_from_slice(&u64::from(status).to_be_bytes());
    }
}

/// What an encoder that writes descriptors straight from its own records
/// produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    pub count: u32,
    pub bytes: usize,
}

/// One block-status descriptor. Compact descriptors carry 32-bit lengths, so
/// callers clamp `length` before encoding.
pub fn descriptor(out: &mut [u8], mode: ReplyMode, length: u64, status: u32) -> usize {
    if mode == ReplyMode::Extended {
        Wide::put(out, length, status);
        Wide::BYTES
    } else {
        Compact::put(out, length, status);
        Compact::BYTES
    }
}

/// Encodes `extents` as descriptors; returns the bytes written.
pub fn descriptors(out: &mut [u8], mode: ReplyMode, extents: &[crate::proto::extent::Extent]) -> usize {
    fn all<F: DescriptorFormat>(out: &mut [u8], extents: &[crate::proto::extent::Extent]) -> usize {
        let out = &mut out[..extents.len() * F::BYTES];
        for (slot, e) in out.chunks_exact_mut(F::BYTES).zip(extents) {
            F::put(slot, e.length, e.status);
        }
        out.len()
    }
    if mode == ReplyMode::Extended { all::<Wide>(out, extents) } else { all::<Compact>(out, extents) }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(mode: ReplyMode) -> ReplyTo {
        ReplyTo { mode, cookie: 0x1122334455667788, offset: 4096 }
    }

    #[test]
    fn descriptors_match_one_descriptor_at_a_time() {
        use crate::proto::extent::Extent;
        let extents = [Extent { length: 4096, status: 3 }, Extent { length: u32::MAX as u64, status: 0 }];
        for mode in [ReplyMode::Structured, ReplyMode::Extended] {
            let (mut one, mut all) = ([0u8; 64], [0u8; 64]);
            let mut n = 0;
            for e in &extents {
                n += descriptor(&mut one[n..], mode, e.length, e.status);
            }
            assert_eq!(descriptors(&mut all, mode, &extents), n);
            assert_eq!(one[..n], all[..n]);
        }
    }

    #[test]
    fn simple_reply_layout() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        let n = simple(&mut b, 7, 22);
        assert_eq!(&b[..n], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn structured_read_header_has_done_and_offset() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        let n = read_data(&mut b, to(ReplyMode::Structured), 4096, 512);
        assert_eq!(n, 28);
        assert_eq!(&b[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), CHUNK_OFFSET_DATA);
        assert_eq!(&b[8..16], &0x1122334455667788u64.to_be_bytes());
        assert_eq!(&b[16..20], &520u32.to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());
    }

    #[test]
    fn extended_header_echoes_offset_and_has_64bit_length() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        let n = success(&mut b, to(ReplyMode::Extended), false);
        assert_eq!(n, 32);
        assert_eq!(&b[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), CHUNK_NONE);
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..32], &0u64.to_be_bytes());
    }

    #[test]
    fn structured_mode_uses_simple_success_except_for_reads() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        assert_eq!(success(&mut b, to(ReplyMode::Structured), false), 16);
        assert_eq!(success(&mut b, to(ReplyMode::Structured), true), 20);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), REPLY_FLAG_DONE);
    }

    #[test]
    fn error_chunk_carries_code_and_truncated_message() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        let long = "x".repeat(500);
        let n = error(&mut b, to(ReplyMode::Extended), 22, &long);
        assert_eq!(n, REPLY_HEADER_BYTES_MAX);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), CHUNK_ERROR);
        let payload = u64::from_be_bytes(b[24..32].try_into().unwrap());
        assert_eq!(payload as usize, n - 32);
        assert_eq!(&b[32..36], &22u32.to_be_bytes());
        let n = error(&mut b, to(ReplyMode::Simple), 5, "ignored");
        assert_eq!((n, &b[4..8]), (16, &5u32.to_be_bytes()[..]));
    }

    #[test]
    fn hole_chunks_carry_offset_and_size() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        let n = hole_chunk(&mut b, to(ReplyMode::Structured), 8192, 4096, false);
        assert_eq!(n, 20 + 12);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 0, "not DONE");
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), CHUNK_OFFSET_HOLE);
        assert_eq!(&b[16..20], &12u32.to_be_bytes());
        assert_eq!(&b[20..28], &8192u64.to_be_bytes());
        assert_eq!(&b[28..32], &4096u32.to_be_bytes());
        let n = hole_chunk(&mut b, to(ReplyMode::Extended), 8192, 4096, true);
        assert_eq!((n, &b[24..32]), (32 + 12, &12u64.to_be_bytes()[..]));
    }

    #[test]
    fn block_status_headers_and_descriptors() {
        let mut b = [0u8; REPLY_HEADER_BYTES_MAX];
        let n = block_status(&mut b, to(ReplyMode::Structured), 1, 2, true);
        assert_eq!(n, 24);
        assert_eq!(&b[16..20], &(4u32 + 16).to_be_bytes());
        let n = block_status(&mut b, to(ReplyMode::Extended), 1, 2, true);
        assert_eq!(n, 40);
        assert_eq!(&b[24..32], &(8u64 + 32).to_be_bytes());
        assert_eq!(&b[36..40], &2u32.to_be_bytes());
        assert_eq!(descriptor(&mut b, ReplyMode::Structured, 4096, 3), 8);
        assert_eq!(&b[..8], &[0, 0, 0x10, 0, 0, 0, 0, 3]);
        assert_eq!(descriptor(&mut b, ReplyMode::Extended, 1 << 40, 3), 16);
        assert_eq!(&b[..8], &(1u64 << 40).to_be_bytes());
    }
}
