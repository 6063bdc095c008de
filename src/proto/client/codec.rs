//! Client side of the transmission phase, pure: request headers out, reply
//! headers and chunk payload pieces in. The streaming state machine that
//! strings these together over a socket's byte stream is `replies.rs`.
//!
//! Layouts (PROTOCOL.md §2.1), all big-endian:
//! - compact request, 28 B: magic, flags u16, type u16, cookie, offset, length u32
//! - extended request, 32 B: the same with its own magic and a u64 length
//! - simple reply, 16 B: magic, error u32, cookie
//! - structured chunk header, 20 B: magic, flags, type, cookie, payload length u32
//! - extended chunk header, 32 B: magic, flags, type, cookie, offset, payload length u64

use crate::proto::wire::{
    CHUNK_BLOCK_STATUS, CHUNK_BLOCK_STATUS_EXT, CHUNK_ERROR, CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE,
    CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_PAYLOAD_LEN, CMD_READ, CMD_WRITE, COMPACT_REQUEST_BYTES,
    EXTENDED_HEADER_BYTES, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_BYTES, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC,
    SIMPLE_REPLY_BYTES, SIMPLE_REPLY_MAGIC, STRUCTURED_HEADER_BYTES, STRUCTURED_REPLY_MAGIC,
};
use thiserror::Error;

/// ERROR_OFFSET (0x8002): an error tied to an offset inside the request.
/// Not in the server's wire module because the server never sends it.
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;
/// Chunk types with bit 15 set are errors, even ones this client does not know.
const CHUNK_ERROR_BIT: u16 = 1 << 15;

/// The largest request header (extended); callers encode into `[u8; 32]`.
pub const REQUEST_BYTES_MAX: usize = EXTENDED_REQUEST_BYTES;
/// The largest reply header (extended chunk).
pub const REPLY_HEADER_BYTES_MAX: usize = EXTENDED_HEADER_BYTES;
const _: () = assert!(REQUEST_BYTES_MAX == 32 && REPLY_HEADER_BYTES_MAX == 32);
/// Longest error message accepted: the spec's string ceiling.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 4096;
/// err u32 + msglen u16 + message + (ERROR_OFFSET) offset u64.
pub const ERROR_PAYLOAD_BYTES_MAX: usize = 4 + 2 + ERROR_MESSAGE_BYTES_MAX + 8;
/// OFFSET_HOLE payload: offset u64 + size u32.
pub const HOLE_PAYLOAD_BYTES: usize = 8 + 4;
/// OFFSET_DATA payload prefix before the data: offset u64.
pub const DATA_PREFIX_BYTES: usize = 8;

/// Header format fixed by negotiation (mirrors what the server agreed to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Simple replies only, compact requests.
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: READ answered in chunks, compact requests.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and extended chunks only.
    Extended,
}

impl Framing {
    pub fn name(self) -> &'static str {
        match self {
            Framing::Simple => "simple replies",
            Framing::Structured => "structured replies",
            Framing::Extended => "extended headers",
        }
    }
}

/// The commands this client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    BlockStatus,
    Disconnect,
}

impl Command {
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Disconnect => CMD_DISC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::BlockStatus => "BLOCK_STATUS",
            Command::Disconnect => "DISC",
        }
    }
}

/// One transmission request. For WRITE, `length` is also the payload size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// Compact headers carry a 32-bit length.
    #[error("length {0} does not fit a compact (32-bit) request header")]
    LengthTooLarge(u64),
}

/// Writes the request header into `out` and returns its size (28 or 32).
/// In extended mode a WRITE carries PAYLOAD_LEN, which the spec makes
/// mandatory there.
pub fn encode_request(
    request: &Request,
    framing: Framing,
    out: &mut [u8; REQUEST_BYTES_MAX],
) -> Result<usize, EncodeError> {
    let extended = framing == Framing::Extended;
    let mut flags = request.flags;
    if extended && request.command == Command::Write {
        flags |= CMD_FLAG_PAYLOAD_LEN;
    }
    let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    out[0..4].copy_from_slice(&magic.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.code().to_be_bytes());
    out[8..16].copy_from_slice(&request.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    if extended {
        out[24..32].copy_from_slice(&request.length.to_be_bytes());
        return Ok(EXTENDED_REQUEST_BYTES);
    }
    let length = u32::try_from(request.length).map_err(|_| EncodeError::LengthTooLarge(request.length))?;
    out[24..28].copy_from_slice(&length.to_be_bytes());
    Ok(COMPACT_REQUEST_BYTES)
}

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// 16-byte simple reply. For a successful READ in simple mode the data
    /// (request length bytes) follows.
    Simple { error: u32, cookie: u64 },
    /// Structured or extended chunk header.
    Chunk(ChunkHeader),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: ChunkKind,
    pub cookie: u64,
    /// The request offset echoed by extended headers; `None` for structured.
    pub offset: Option<u64>,
    pub payload_bytes: u64,
}

/// Chunk types (PROTOCOL.md §2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    None,
    OffsetData,
    OffsetHole,
    BlockStatus,
    BlockStatusExt,
    Error,
    ErrorOffset,
    /// An error type this client does not know (bit 15 set): fails the request.
    UnknownError(u16),
}

/// Why the reply stream cannot be trusted any more (the connection is dropped).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("bad reply magic {0:#010x} for {1}")]
    BadMagic(u32, &'static str),
    #[error("unknown chunk type {0:#06x}")]
    UnknownChunk(u16),
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    #[error("{0}")]
    Violation(String),
}

fn violation(text: impl Into<String>) -> ProtocolError {
    ProtocolError::Violation(text.into())
}

/// How many header bytes follow, given the first four (the magic). Simple
/// replies are legal in simple and structured mode, structured chunks only
/// in structured mode, extended chunks only in extended mode.
pub fn reply_header_bytes(magic_bytes: [u8; 4], framing: Framing) -> Result<usize, ProtocolError> {
    let magic = u32::from_be_bytes(magic_bytes);
    match (magic, framing) {
        (SIMPLE_REPLY_MAGIC, Framing::Simple | Framing::Structured) => Ok(SIMPLE_REPLY_BYTES),
        (STRUCTURED_REPLY_MAGIC, Framing::Structured) => Ok(STRUCTURED_HEADER_BYTES),
        (EXTENDED_REPLY_MAGIC, Framing::Extended) => Ok(EXTENDED_HEADER_BYTES),
        _ => Err(ProtocolError::BadMagic(magic, framing.name())),
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(raw)
}

/// Decodes a whole header; `bytes.len()` must be what [`reply_header_bytes`] said.
pub fn decode_reply_header(bytes: &[u8], framing: Framing) -> Result<ReplyHeader, ProtocolError> {
    let expected = reply_header_bytes([bytes[0], bytes[1], bytes[2], bytes[3]], framing)?;
    assert_eq!(bytes.len(), expected, "caller passes exactly one header");
    if expected == SIMPLE_REPLY_BYTES {
        return Ok(ReplyHeader::Simple { error: be_u32(bytes, 4), cookie: be_u64(bytes, 8) });
    }
    let flags = be_u16(bytes, 4);
    let kind = chunk_kind(be_u16(bytes, 6))?;
    let cookie = be_u64(bytes, 8);
    let (offset, payload_bytes) = if expected == EXTENDED_HEADER_BYTES {
        (Some(be_u64(bytes, 16)), be_u64(bytes, 24))
    } else {
        (None, u64::from(be_u32(bytes, 16)))
    };
    Ok(ReplyHeader::Chunk(ChunkHeader { flags, kind, cookie, offset, payload_bytes }))
}

fn chunk_kind(code: u16) -> Result<ChunkKind, ProtocolError> {
    Ok(match code {
        CHUNK_NONE => ChunkKind::None,
        CHUNK_OFFSET_DATA => ChunkKind::OffsetData,
        CHUNK_OFFSET_HOLE => ChunkKind::OffsetHole,
        CHUNK_BLOCK_STATUS => ChunkKind::BlockStatus,
        CHUNK_BLOCK_STATUS_EXT => ChunkKind::BlockStatusExt,
        CHUNK_ERROR => ChunkKind::Error,
        CHUNK_ERROR_OFFSET => ChunkKind::ErrorOffset,
        other if other & CHUNK_ERROR_BIT != 0 => ChunkKind::UnknownError(other),
        // Unknown non-error types justify a hard disconnect (spec §2.5).
        other => return Err(ProtocolError::UnknownChunk(other)),
    })
}

/// OFFSET_HOLE payload: `(offset, size)`; size must be nonzero.
pub fn decode_hole(payload: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if payload.len() != HOLE_PAYLOAD_BYTES {
        return Err(violation(format!("OFFSET_HOLE payload of {} bytes (expected 12)", payload.len())));
    }
    let size = be_u32(payload, 8);
    if size == 0 {
        return Err(violation("OFFSET_HOLE of size 0"));
    }
    Ok((be_u64(payload, 0), size))
}

/// A decoded ERROR / ERROR_OFFSET (or unknown error type) payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPayload<'a> {
    pub code: u32,
    pub message: &'a str,
    /// ERROR_OFFSET only.
    pub offset: Option<u64>,
}

/// Decodes an error chunk's payload. Unknown error types only have their
/// error code read (when present): their layout is not known.
pub fn decode_error(kind: ChunkKind, payload: &[u8]) -> Result<ErrorPayload<'_>, ProtocolError> {
    if let ChunkKind::UnknownError(_) = kind {
        let code = if payload.len() >= 4 { be_u32(payload, 0) } else { libc::EIO as u32 };
        return Ok(ErrorPayload { code, message: "", offset: None });
    }
    let with_offset = kind == ChunkKind::ErrorOffset;
    let fixed = if with_offset { 4 + 2 + 8 } else { 4 + 2 };
    if payload.len() < fixed {
        return Err(violation(format!("error chunk payload of {} bytes", payload.len())));
    }
    let code = be_u32(payload, 0);
    let message_bytes = usize::from(be_u16(payload, 4));
    if payload.len() != fixed + message_bytes {
        return Err(violation(format!(
            "error chunk of {} bytes announces a {message_bytes}-byte message",
            payload.len()
        )));
    }
    if code == 0 {
        return Err(violation("error chunk with error code 0"));
    }
    let message = std::str::from_utf8(&payload[6..6 + message_bytes]).unwrap_or("<message is not UTF-8>");
    let offset = with_offset.then(|| be_u64(payload, 6 + message_bytes));
    Ok(ErrorPayload { code, message, offset })
}

/// Block status chunk prefix before the descriptors: context ID (compact),
/// context ID + descriptor count (extended).
pub fn status_prefix_bytes(kind: ChunkKind) -> usize {
    if kind == ChunkKind::BlockStatusExt { 4 + 4 } else { 4 }
}

/// Size of one descriptor: {u32 length, u32 status} or {u64, u64}.
pub fn descriptor_bytes(kind: ChunkKind) -> usize {
    if kind == ChunkKind::BlockStatusExt { 16 } else { 8 }
}

/// Validates a status chunk's payload size and decodes its prefix:
/// returns `(context id, descriptor count)`.
pub fn decode_status_prefix(kind: ChunkKind, payload_bytes: u64, prefix: &[u8]) -> Result<(u32, u64), ProtocolError> {
    let prefix_bytes = status_prefix_bytes(kind) as u64;
    let each = descriptor_bytes(kind) as u64;
    if payload_bytes < prefix_bytes + each || !(payload_bytes - prefix_bytes).is_multiple_of(each) {
        return Err(violation(format!("block status payload of {payload_bytes} bytes")));
    }
    let count = (payload_bytes - prefix_bytes) / each;
    if kind == ChunkKind::BlockStatusExt {
        let announced = u64::from(be_u32(prefix, 4));
        if announced != count {
            return Err(violation(format!("BLOCK_STATUS_EXT announces {announced} descriptors but carries {count}")));
        }
    }
    Ok((be_u32(prefix, 0), count))
}

/// One descriptor: `(length, status)`; the length must be nonzero.
pub fn decode_descriptor(kind: ChunkKind, bytes: &[u8]) -> Result<(u64, u64), ProtocolError> {
    let (length, status) = if kind == ChunkKind::BlockStatusExt {
        (be_u64(bytes, 0), be_u64(bytes, 8))
    } else {
        (u64::from(be_u32(bytes, 0)), u64::from(be_u32(bytes, 4)))
    };
    if length == 0 {
        return Err(violation("block status descriptor of length 0"));
    }
    Ok((length, status))
}

/// Names for the errno values the spec defines (PROTOCOL.md §2.6).
pub fn error_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Test helpers that build server-side bytes, shared with `replies.rs`.
    pub fn simple(error: u32, cookie: u64) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v
    }

    pub fn chunk(framing: Framing, flags: u16, kind: u16, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        if framing == Framing::Extended {
            v.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        } else {
            v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        }
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        if framing == Framing::Extended {
            v.extend_from_slice(&offset.to_be_bytes());
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        } else {
            v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    pub fn error_payload(code: u32, message: &str) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(&(message.len() as u16).to_be_bytes());
        v.extend_from_slice(message.as_bytes());
        v
    }

    pub fn status_payload(ext: bool, context: u32, extents: &[(u64, u64)]) -> Vec<u8> {
        let mut v = context.to_be_bytes().to_vec();
        if ext {
            v.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        }
        for &(length, status) in extents {
            if ext {
                v.extend_from_slice(&length.to_be_bytes());
                v.extend_from_slice(&status.to_be_bytes());
            } else {
                v.extend_from_slice(&(length as u32).to_be_bytes());
                v.extend_from_slice(&(status as u32).to_be_bytes());
            }
        }
        v
    }

    fn read(cookie: u64, offset: u64, length: u64) -> Request {
        Request { command: Command::Read, flags: 0, cookie, offset, length }
    }

    #[test]
    fn compact_request_is_28_bytes_big_endian() {
        let mut out = [0u8; REQUEST_BYTES_MAX];
        let n = encode_request(&read(0x0102, 0x1000, 4096), Framing::Structured, &mut out).unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            &out[..28],
            &[
                0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0,
                0x10, 0
            ]
        );
        let too_big = read(1, 0, 1 << 32);
        assert_eq!(encode_request(&too_big, Framing::Simple, &mut out), Err(EncodeError::LengthTooLarge(1 << 32)));
    }

    #[test]
    fn extended_request_is_32_bytes_with_payload_len_on_write() {
        let mut out = [0u8; REQUEST_BYTES_MAX];
        let write = Request { command: Command::Write, flags: 0, cookie: 7, offset: 512, length: 1 << 33 };
        let n = encode_request(&write, Framing::Extended, &mut out).unwrap();
        assert_eq!(n, 32);
        assert_eq!(&out[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(be_u16(&out, 4), CMD_FLAG_PAYLOAD_LEN);
        assert_eq!(be_u16(&out, 6), CMD_WRITE);
        assert_eq!(be_u64(&out, 8), 7);
        assert_eq!(be_u64(&out, 16), 512);
        assert_eq!(be_u64(&out, 24), 1 << 33);
        // Reads never carry PAYLOAD_LEN.
        encode_request(&read(1, 0, 1 << 33), Framing::Extended, &mut out).unwrap();
        assert_eq!(be_u16(&out, 4), 0);
    }

    #[test]
    fn header_sizes_depend_on_magic_and_framing() {
        let simple = SIMPLE_REPLY_MAGIC.to_be_bytes();
        let structured = STRUCTURED_REPLY_MAGIC.to_be_bytes();
        let extended = EXTENDED_REPLY_MAGIC.to_be_bytes();
        assert_eq!(reply_header_bytes(simple, Framing::Simple), Ok(16));
        assert_eq!(reply_header_bytes(simple, Framing::Structured), Ok(16));
        assert_eq!(reply_header_bytes(structured, Framing::Structured), Ok(20));
        assert_eq!(reply_header_bytes(extended, Framing::Extended), Ok(32));
        assert!(reply_header_bytes(simple, Framing::Extended).is_err());
        assert!(reply_header_bytes(structured, Framing::Simple).is_err());
        assert!(reply_header_bytes(extended, Framing::Structured).is_err());
        assert!(reply_header_bytes([0xde, 0xad, 0xbe, 0xef], Framing::Structured).is_err());
    }

    #[test]
    fn decodes_simple_structured_and_extended_headers() {
        let s = simple(5, 0xabcd);
        assert_eq!(decode_reply_header(&s, Framing::Simple), Ok(ReplyHeader::Simple { error: 5, cookie: 0xabcd }));
        let c = chunk(Framing::Structured, 1, CHUNK_OFFSET_DATA, 9, 0, &[0; 12]);
        let expected =
            ChunkHeader { flags: 1, kind: ChunkKind::OffsetData, cookie: 9, offset: None, payload_bytes: 12 };
        assert_eq!(decode_reply_header(&c[..20], Framing::Structured), Ok(ReplyHeader::Chunk(expected)));
        let e = chunk(Framing::Extended, 0, CHUNK_BLOCK_STATUS_EXT, 3, 1 << 40, &[0; 24]);
        let expected = ChunkHeader {
            flags: 0,
            kind: ChunkKind::BlockStatusExt,
            cookie: 3,
            offset: Some(1 << 40),
            payload_bytes: 24,
        };
        assert_eq!(decode_reply_header(&e[..32], Framing::Extended), Ok(ReplyHeader::Chunk(expected)));
    }

    #[test]
    fn chunk_kinds_cover_the_spec_and_unknown_errors() {
        assert_eq!(chunk_kind(0), Ok(ChunkKind::None));
        assert_eq!(chunk_kind(1), Ok(ChunkKind::OffsetData));
        assert_eq!(chunk_kind(2), Ok(ChunkKind::OffsetHole));
        assert_eq!(chunk_kind(5), Ok(ChunkKind::BlockStatus));
        assert_eq!(chunk_kind(6), Ok(ChunkKind::BlockStatusExt));
        assert_eq!(chunk_kind(0x8001), Ok(ChunkKind::Error));
        assert_eq!(chunk_kind(0x8002), Ok(ChunkKind::ErrorOffset));
        assert_eq!(chunk_kind(0x8003), Ok(ChunkKind::UnknownError(0x8003)));
        assert_eq!(chunk_kind(3), Err(ProtocolError::UnknownChunk(3)));
    }

    #[test]
    fn hole_payload() {
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(decode_hole(&p), Ok((4096, 512)));
        p[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(decode_hole(&p).is_err());
        assert!(decode_hole(&p[..11]).is_err());
    }

    #[test]
    fn error_payloads() {
        let p = error_payload(22, "bad");
        let e = decode_error(ChunkKind::Error, &p).unwrap();
        assert_eq!((e.code, e.message, e.offset), (22, "bad", None));
        let mut with_offset = error_payload(5, "io");
        with_offset.extend_from_slice(&4096u64.to_be_bytes());
        let e = decode_error(ChunkKind::ErrorOffset, &with_offset).unwrap();
        assert_eq!((e.code, e.message, e.offset), (5, "io", Some(4096)));
        assert!(decode_error(ChunkKind::Error, &p[..5]).is_err(), "too short");
        assert!(decode_error(ChunkKind::Error, &error_payload(0, "")).is_err(), "code 0");
        let mut lying = error_payload(5, "abc");
        lying.push(b'x');
        assert!(decode_error(ChunkKind::Error, &lying).is_err(), "length mismatch");
        let code = 95u32.to_be_bytes();
        assert_eq!(decode_error(ChunkKind::UnknownError(0x8009), &code).unwrap().code, 95);
    }

    #[test]
    fn status_prefixes_and_descriptors() {
        let compact = status_payload(false, 1, &[(4096, 0), (8192, 3)]);
        let (id, n) = decode_status_prefix(ChunkKind::BlockStatus, compact.len() as u64, &compact[..4]).unwrap();
        assert_eq!((id, n), (1, 2));
        assert_eq!(decode_descriptor(ChunkKind::BlockStatus, &compact[12..20]), Ok((8192, 3)));
        assert!(decode_status_prefix(ChunkKind::BlockStatus, 4, &compact[..4]).is_err(), "no descriptors");
        assert!(decode_status_prefix(ChunkKind::BlockStatus, 13, &compact[..4]).is_err(), "ragged");

        let ext = status_payload(true, 2, &[(5 << 32, 1)]);
        let (id, n) = decode_status_prefix(ChunkKind::BlockStatusExt, ext.len() as u64, &ext[..8]).unwrap();
        assert_eq!((id, n), (2, 1));
        assert_eq!(decode_descriptor(ChunkKind::BlockStatusExt, &ext[8..24]), Ok((5 << 32, 1)));
        let mut wrong_count = ext.clone();
        wrong_count[4..8].copy_from_slice(&2u32.to_be_bytes());
        assert!(decode_status_prefix(ChunkKind::BlockStatusExt, ext.len() as u64, &wrong_count[..8]).is_err());
        assert!(decode_descriptor(ChunkKind::BlockStatus, &[0; 8]).is_err(), "zero length");
    }
}
