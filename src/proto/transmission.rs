//! Transmission-phase requests: header decoding and validation into a
//! [`Command`], or a rejection carrying the exact NBD error the spec asks for.
//!
//! Validation order matters for interop: unknown command or flag (EINVAL),
//! unadvertised feature (EINVAL), read-only (EPERM), bounds (EINVAL for reads,
//! ENOSPC for writes), alignment for clients bound by block sizes (EINVAL),
//! then zero lengths, which are answered without touching the backend.

use thiserror::Error;

use super::error::{Failure, NbdError};
use super::wire::*;

/// Reply framing fixed by negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Only simple replies; compact request headers.
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: READ uses chunks; compact request headers.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests, extended chunks only.
    Extended,
}

impl ReplyMode {
    pub fn request_header_bytes(self) -> usize {
        match self {
            ReplyMode::Extended => EXTENDED_REQUEST_BYTES,
            _ => COMPACT_REQUEST_BYTES,
        }
    }
}

/// A decoded request header; `length` is widened to u64 in both modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Framing is lost or the client broke a MUST: drop this connection only.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FramingError {
    /// The request magic was wrong.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    /// An extended-header payload above the maximum payload size.
    #[error("payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u64),
}

pub fn decode_request(bytes: &[u8], mode: ReplyMode) -> Result<RequestHeader, FramingError> {
    assert_eq!(bytes.len(), mode.request_header_bytes());
    let mut r = Reader::new(bytes);
    let field = "request header";
    let magic = r.u32(field).expect("length asserted");
    let flags = r.u16(field).expect("length asserted");
    let kind = r.u16(field).expect("length asserted");
    let cookie = r.u64(field).expect("length asserted");
    let offset = r.u64(field).expect("length asserted");
    let expected_magic = if mode == ReplyMode::Extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    if magic != expected_magic {
        return Err(FramingError::BadMagic(magic));
    }
    let length = match mode {
        ReplyMode::Extended => r.u64(field).expect("length asserted"),
        _ => u64::from(r.u32(field).expect("length asserted")),
    };
    Ok(RequestHeader { flags, kind, cookie, offset, length })
}

/// What validation needs to know about the connection and its export.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub export_bytes: u64,
    /// Transmission flags as negotiated for this connection.
    pub flags: u16,
    pub reply_mode: ReplyMode,
    /// Alignment the client agreed to (1 if it did not request BLOCK_SIZE).
    pub alignment_bytes: u32,
    pub payload_bytes_max: u32,
    pub has_contexts: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        length: u64,
    },
    /// With `payload > 0` (BLOCK_STATUS_PAYLOAD), the effect length and the
    /// contexts to answer for arrive in that many payload bytes, decoded by
    /// [`parse_status_payload`]; `length` is 0 until then.
    BlockStatus {
        offset: u64,
        length: u64,
        req_one: bool,
        payload: u32,
    },
    Disconnect,
}

impl Command {
    /// The NBD command type this is on the wire.
    pub fn wire_kind(&self) -> u16 {
        match self {
            Command::Read { .. } => CMD_READ,
            Command::Write { .. } => CMD_WRITE,
            Command::Flush => CMD_FLUSH,
            Command::Trim { .. } => CMD_TRIM,
            Command::WriteZeroes { .. } => CMD_WRITE_ZEROES,
            Command::Cache { .. } => CMD_CACHE,
            Command::BlockStatus { .. } => CMD_BLOCK_STATUS,
            Command::Disconnect => CMD_DISC,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Run(Command),
    /// A zero-length request: answer success without touching the backend.
    /// `payload` bytes (none in practice) still follow and must be drained.
    Empty {
        payload: u64,
    },
    /// Answer `error` after draining `payload` bytes from the socket.
    Reject {
        error: Failure,
        payload: u64,
    },
}

/// How many payload bytes follow this header on the wire.
///
/// WRITE always carries `length` bytes. With extended headers other commands
/// carry a payload only when they set PAYLOAD_LEN; qemu (8.2 to 10) sends
/// extended WRITEs without the flag, so it cannot be required there.
fn payload_bytes(h: &RequestHeader, mode: ReplyMode) -> u64 {
    match mode {
        _ if h.kind == CMD_WRITE => h.length,
        ReplyMode::Extended if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 => h.length,
        _ => 0,
    }
}

/// Flags a command may carry on this connection.
fn allowed_flags(kind: u16, limits: &RequestLimits) -> u16 {
    let advertised = |flag: u16, bit: u16| if limits.flags & flag != 0 { bit } else { 0 };
    let fua = advertised(TF_SEND_FUA, CMD_FLAG_FUA);
    let specific = match kind {
        CMD_READ => advertised(TF_SEND_DF, CMD_FLAG_DF),
        CMD_WRITE if limits.reply_mode == ReplyMode::Extended => CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | advertised(TF_SEND_FAST_ZERO, CMD_FLAG_FAST_ZERO),
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE | advertised(TF_BLOCK_STATUS_PAYLOAD, CMD_FLAG_PAYLOAD_LEN),
        _ => 0,
    };
    fua | specific
}

pub fn validate(h: &RequestHeader, limits: &RequestLimits) -> Result<Verdict, FramingError> {
    let payload = payload_bytes(h, limits.reply_mode);
    if limits.reply_mode == ReplyMode::Extended && payload > u64::from(limits.payload_bytes_max) {
        return Err(FramingError::PayloadTooLarge(payload));
    }
    let reject = |error| Ok(Verdict::Reject { error, payload });
    if h.flags & !allowed_flags(h.kind, limits) != 0 {
        return reject(NbdError::Inval.because("flag not valid for this command or not negotiated"));
    }
    let (offset, length) = (h.offset, h.length);
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let needs = |flag: u16| limits.flags & flag != 0;
    let supported = match h.kind {
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_CACHE => true,
        CMD_FLUSH => needs(TF_SEND_FLUSH),
        CMD_TRIM => needs(TF_SEND_TRIM),
        CMD_WRITE_ZEROES => needs(TF_SEND_WRITE_ZEROES),
        CMD_BLOCK_STATUS => limits.reply_mode != ReplyMode::Simple && limits.has_contexts,
        _ => false,
    };
    if !supported {
        return reject(NbdError::Inval.because("command unknown or not negotiated"));
    }
    if writes && needs(TF_READ_ONLY) {
        return reject(NbdError::Perm.because("export is read-only"));
    }
    match h.kind {
        CMD_DISC => return Ok(Verdict::Run(Command::Disconnect)),
        CMD_FLUSH => return Ok(Verdict::Run(Command::Flush)),
        CMD_BLOCK_STATUS if payload > 0 => return status_with_payload(h, payload),
        _ => {}
    }
    let in_bounds = offset.checked_add(length).is_some_and(|end| end <= limits.export_bytes);
    if !in_bounds {
        let beyond_end = match h.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => NbdError::NoSpc.because("write past the end of the export"),
            _ => NbdError::Inval.because("request past the end of the export"),
        };
        return reject(beyond_end);
    }
    if !is_aligned(offset, length, limits) {
        return reject(NbdError::Inval.because("request not aligned to the minimum block size"));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && length > u64::from(limits.payload_bytes_max) {
        return reject(NbdError::Inval.because("request larger than the maximum payload"));
    }
    if length == 0 {
        // Block status must describe at least one byte; the rest are no-ops.
        return match h.kind {
            CMD_BLOCK_STATUS => reject(NbdError::Inval.because("block status of zero bytes")),
            _ => Ok(Verdict::Empty { payload }),
        };
    }
    let command = match h.kind {
        CMD_READ => Command::Read { offset, length: length as u32, df: h.flags & CMD_FLAG_DF != 0 },
        CMD_WRITE => Command::Write { offset, length: length as u32, fua },
        CMD_TRIM => Command::Trim { offset, length, fua },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            Command::BlockStatus { offset, length, req_one: h.flags & CMD_FLAG_REQ_ONE != 0, payload: 0 }
        }
        _ => unreachable!("unsupported kinds rejected above"),
    };
    Ok(Verdict::Run(command))
}

/// Contexts one BLOCK_STATUS payload may name (and the width of the mask
/// [`parse_status_payload`] returns).
pub const STATUS_PAYLOAD_CONTEXTS_MAX: usize = super::meta::SELECTED_MAX;

/// Effect length u64, then at least one u32 context ID.
fn status_with_payload(h: &RequestHeader, payload: u64) -> Result<Verdict, FramingError> {
    let well_formed =
        payload >= 8 + 4 && (payload - 8).is_multiple_of(4) && (payload - 8) / 4 <= STATUS_PAYLOAD_CONTEXTS_MAX as u64;
    if !well_formed {
        return Ok(Verdict::Reject { error: NbdError::Inval.because("malformed block status payload"), payload });
    }
    let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
    Ok(Verdict::Run(Command::BlockStatus { offset: h.offset, length: 0, req_one, payload: payload as u32 }))
}

/// Decodes a BLOCK_STATUS payload against the IDs of the connection's
/// selected contexts. Returns the effect length and a mask of positions in
/// `selected`. Unknown or repeated IDs, a zero length or a range past the
/// end are EINVAL (the payload has been consumed either way).
pub fn parse_status_payload(
    bytes: &[u8],
    offset: u64,
    export_bytes: u64,
    selected: &[u32],
) -> Result<(u64, u64), Failure> {
    let malformed = NbdError::Inval.because("malformed block status payload");
    let mut r = Reader::new(bytes);
    let length = r.u64("effect length").map_err(|_| malformed)?;
    let mut mask = 0u64;
    while r.remaining() > 0 {
        let id = r.u32("context id").map_err(|_| malformed)?;
        let unknown = NbdError::Inval.because("block status payload names an unselected context");
        let position = selected.iter().position(|&s| s == id).ok_or(unknown)?;
        if position >= STATUS_PAYLOAD_CONTEXTS_MAX || mask & (1 << position) != 0 {
            return Err(NbdError::Inval.because("block status payload repeats a context"));
        }
        mask |= 1 << position;
    }
    let in_bounds = offset.checked_add(length).is_some_and(|end| end <= export_bytes);
    if mask == 0 || length == 0 {
        return Err(malformed);
    }
    if !in_bounds {
        return Err(NbdError::Inval.because("request past the end of the export"));
    }
    Ok((length, mask))
}

/// Alignment only binds clients that agreed to block sizes; the export's
/// unaligned tail is reachable by a request that ends exactly at the end.
fn is_aligned(offset: u64, length: u64, limits: &RequestLimits) -> bool {
    let align = u64::from(limits.alignment_bytes.max(1));
    let end = offset + length;
    offset.is_multiple_of(align) && (end.is_multiple_of(align) || end == limits.export_bytes)
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
