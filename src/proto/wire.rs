//! Wire constants and a bounds-checked decoding cursor.
//!
//! Every number here is from the NBD protocol document; names follow the spec
//! with the `NBD_` prefix dropped. Nothing in this module does I/O.

use super::error::DecodeError;

// --- handshake ---------------------------------------------------------------
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- transmission flags (per export, per connection) -------------------------
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// --- requests -----------------------------------------------------------------
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// magic + flags + type + cookie + offset + u32 length
pub const COMPACT_REQUEST_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
/// magic + flags + type + cookie + offset + u64 length
pub const EXTENDED_REQUEST_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 8;
const _: () = assert!(COMPACT_REQUEST_BYTES == 28 && EXTENDED_REQUEST_BYTES == 32);

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// --- replies ------------------------------------------------------------------
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// magic + error + cookie
pub const SIMPLE_REPLY_BYTES: usize = 4 + 4 + 8;
/// magic + flags + type + cookie + u32 payload length
pub const STRUCTURED_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// magic + flags + type + cookie + offset + u64 payload length
pub const EXTENDED_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 8;
const _: () = assert!(SIMPLE_REPLY_BYTES == 16 && STRUCTURED_HEADER_BYTES == 20);
const _: () = assert!(EXTENDED_HEADER_BYTES == 32);

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR: u16 = 0x8001;

// --- metadata contexts ----------------------------------------------------------
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The spec's name for an option, for logs ("option 42" if unknown).
pub fn option_name(option: u32) -> std::borrow::Cow<'static, str> {
    let name = match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => return format!("option {option}").into(),
    };
    name.into()
}

/// The spec's name for an option error reply, for logs.
pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "ERR_UNSUP",
        REP_ERR_POLICY => "ERR_POLICY",
        REP_ERR_INVALID => "ERR_INVALID",
        REP_ERR_TLS_REQD => "ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "ERR_SHUTDOWN",
        REP_ERR_TOO_BIG => "ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "ERR_EXT_HEADER_REQD",
        _ => "ERR",
    }
}

/// The spec's string ceiling (names, descriptions, queries): MUST be <= 4096.
pub const STRING_BYTES_MAX: usize = 4096;

/// A big-endian reader over a borrowed slice; every accessor names the field
/// it was reading so a short message says what was missing.
pub struct Reader<'a> {
    bytes: &'a [u8],
    /// Invariant: `0 <= position <= bytes.len()`.
    position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    pub fn take(&mut self, count: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if count > self.remaining() {
            return Err(DecodeError::Short(what));
        }
        let slice = &self.bytes[self.position..self.position + count];
        self.position += count;
        Ok(slice)
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        Ok(u64::from_be_bytes(raw))
    }

    /// A u32 length prefix followed by that many bytes of UTF-8.
    pub fn string32(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = self.u32(what)? as usize;
        if len > STRING_BYTES_MAX {
            return Err(DecodeError::TooLong(what));
        }
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw).map_err(|_| DecodeError::NotUtf8(what))
    }

    pub fn expect_end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::Trailing(what));
        }
        Ok(())
    }
}

/// Appends big-endian integers to a byte vector (used by handshake replies,
/// which are cold; the transmission path encodes into fixed arrays).
pub trait PutBe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutBe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_big_endian_and_names_missing_fields() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16("a").unwrap(), 1);
        assert_eq!(r.u32("b").unwrap(), 2);
        assert_eq!(r.u16("c"), Err(DecodeError::Short("c")));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.expect_end("end"), Err(DecodeError::Trailing("end")));
    }

    #[test]
    fn string32_rejects_overlong_and_invalid_utf8() {
        let mut long = vec![];
        long.put_u32(4097);
        assert_eq!(Reader::new(&long).string32("s"), Err(DecodeError::TooLong("s")));
        let mut bad = vec![];
        bad.put_u32(1);
        bad.push(0xff);
        assert_eq!(Reader::new(&bad).string32("s"), Err(DecodeError::NotUtf8("s")));
        let mut ok = vec![];
        ok.put_u32(2);
        ok.extend_from_slice(b"hi");
        assert_eq!(Reader::new(&ok).string32("s").unwrap(), "hi");
    }
}
