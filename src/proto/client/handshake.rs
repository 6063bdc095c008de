//! The client side of fixed-newstyle negotiation as a pure state machine.
//!
//! The driver (`connect.rs`) asks [`ClientHandshake::want`] how many bytes
//! come next, reads exactly that many and passes them to
//! [`ClientHandshake::feed`], which appends whatever must be sent to `out`.
//! No sockets or clocks here, so every negotiation path is unit-tested.
//!
//! Option order (PROTOCOL.md §1.4): EXTENDED_HEADERS, falling back to
//! STRUCTURED_REPLY if refused, falling back to simple replies if that is
//! refused too; then SET_META_CONTEXT `base:allocation` when block status is
//! wanted (it must follow SR/EH); then GO asking for INFO_BLOCK_SIZE. A GO
//! answered with ERR_UNSUP falls back to EXPORT_NAME (not allowed after EH).

use std::borrow::Cow;

use crate::proto::wire::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_EXPORT, NBDMAGIC, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_SET_META_CONTEXT, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, OPTION_REPLY_MAGIC, PutBe, REP_ACK, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, Reader,
    option_name,
};
use thiserror::Error;

use super::codec::Framing;

/// The metadata context the map mode reads.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// NBDMAGIC + IHAVEOPT + handshake flags u16.
pub const GREETING_BYTES: usize = 8 + 8 + 2;
/// Option reply header: magic u64 + option u32 + reply type u32 + length u32.
const REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Option replies are small (info items, context names, error text up to
/// the 4096-byte string ceiling); anything larger is treated as hostile.
pub const REPLY_PAYLOAD_BYTES_MAX: u32 = 64 * 1024;
/// EXPORT_NAME reply: size u64 + flags u16, plus 124 zeroes unless NO_ZEROES.
const EXPORT_NAME_REPLY_BYTES: usize = 8 + 2;
const EXPORT_NAME_PADDING_BYTES: usize = 124;
/// The second word of an oldstyle greeting, to name it in the error.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const REPLY_ERROR_BIT: u32 = 1 << 31;

/// What to negotiate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeConfig {
    pub export: String,
    /// The richest framing to ask for; weaker ones are fallbacks.
    pub framing_max: Framing,
    /// Select `base:allocation` (required: negotiation fails without it).
    pub base_allocation: bool,
    /// Send STARTTLS first; the driver runs the TLS handshake when
    /// [`Progress::StartTls`] says so and then calls
    /// [`ClientHandshake::tls_started`].
    pub starttls: bool,
}

/// Block-size constraints (PROTOCOL.md §2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// What a client may assume when the server advertises nothing.
    fn default() -> Self {
        Self { minimum: 1, preferred: 4096, maximum: 32 << 20 }
    }
}

/// The negotiated result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    /// Transmission flags as sent by the server.
    pub flags: u16,
    pub framing: Framing,
    pub block_sizes: BlockSizes,
    /// INFO_BLOCK_SIZE was received (otherwise `block_sizes` are defaults).
    pub block_sizes_advertised: bool,
    /// The ID of `base:allocation`, when selected.
    pub context_id: Option<u32>,
    /// EXTENDED_HEADERS was asked for and refused.
    pub extended_refused: bool,
    /// GO was unsupported and EXPORT_NAME was used instead.
    pub used_export_name: bool,
}

/// What `feed` led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Continue,
    /// Transmission starts once `out` is sent.
    Done(Session),
    /// STARTTLS was acknowledged: run the TLS handshake, then call
    /// [`ClientHandshake::tls_started`] and go on through TLS.
    StartTls,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer does not greet like a newstyle NBD server.
    #[error("not an NBD server (greeting {0:#018x} {1:#018x})")]
    NotNbd(u64, u64),
    /// Oldstyle negotiation (no options) is not supported.
    #[error("oldstyle NBD server: not supported")]
    Oldstyle,
    /// Option reply framing was lost.
    #[error("bad option reply magic {0:#018x}")]
    BadReplyMagic(u64),
    /// A reply echoed a different option than the one sent.
    #[error("reply for option {got} while waiting for {sent}")]
    WrongOption { sent: Cow<'static, str>, got: u32 },
    /// The server answered an option with an error.
    #[error("server refused {option}: {reply}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused { option: Cow<'static, str>, reply: String, message: String },
    /// A reply type that the option does not allow.
    #[error("unexpected reply type {reply:#x} to {option}")]
    UnexpectedReply { option: Cow<'static, str>, reply: u32 },
    /// An option reply above [`REPLY_PAYLOAD_BYTES_MAX`].
    #[error("option reply of {0} bytes is too large")]
    ReplyTooLong(u32),
    /// A reply payload that does not parse.
    #[error("malformed {0}")]
    Malformed(String),
    /// Block status needs structured replies, which the server refused.
    #[error("the server refused structured replies, which block status needs")]
    NeedsStructured,
    /// SET_META_CONTEXT succeeded without selecting `base:allocation`.
    #[error("the server does not offer base:allocation")]
    NoBaseAllocation,
    /// GO finished without NBD_INFO_EXPORT.
    #[error("GO finished without export information")]
    NoExportInfo,
    /// The driver broke the `want`/`feed` contract.
    #[error("fed {got} bytes, wanted {wanted}")]
    Driver { wanted: usize, got: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    ReplyHeader,
    ReplyPayload { reply: u32, length: usize },
    ExportNameReply,
    Finished,
}

pub struct ClientHandshake {
    config: HandshakeConfig,
    state: State,
    /// The option awaiting its final reply.
    option: u32,
    no_zeroes: bool,
    framing: Framing,
    extended_refused: bool,
    context_id: Option<u32>,
    export: Option<(u64, u16)>,
    block_sizes: Option<BlockSizes>,
}

/// Spec names for error replies (PROTOCOL.md §1.3).
pub fn reply_error_name(reply: u32) -> String {
    let name = match reply & !REPLY_ERROR_BIT {
        1 => "ERR_UNSUP",
        2 => "ERR_POLICY",
        3 => "ERR_INVALID",
        4 => "ERR_PLATFORM",
        5 => "ERR_TLS_REQD (use nbds://)",
        6 => "ERR_UNKNOWN (no such export)",
        7 => "ERR_SHUTDOWN",
        8 => "ERR_BLOCK_SIZE_REQD",
        9 => "ERR_TOO_BIG",
        10 => "ERR_EXT_HEADER_REQD",
        _ => return format!("error {reply:#x}"),
    };
    name.to_string()
}

fn put_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.extend_from_slice(data);
}

fn malformed(what: &str) -> impl Fn(crate::proto::DecodeError) -> HandshakeError + '_ {
    move |e| HandshakeError::Malformed(format!("{what}: {e}"))
}

impl ClientHandshake {
    pub fn new(config: HandshakeConfig) -> Self {
        assert!(config.export.len() <= crate::proto::wire::STRING_BYTES_MAX, "export name over 4096 bytes");
        Self {
            config,
            state: State::Greeting,
            option: 0,
            no_zeroes: false,
            framing: Framing::Simple,
            extended_refused: false,
            context_id: None,
            export: None,
            block_sizes: None,
        }
    }

    /// How many bytes `feed` needs next.
    pub fn want(&self) -> usize {
        match self.state {
            State::Greeting => GREETING_BYTES,
            State::ReplyHeader => REPLY_HEADER_BYTES,
            State::ReplyPayload { length, .. } => length,
            State::ExportNameReply if self.no_zeroes => EXPORT_NAME_REPLY_BYTES,
            State::ExportNameReply => EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_PADDING_BYTES,
            State::Finished => 0,
        }
    }

    /// Feeds exactly `want()` bytes; appends bytes to send to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let wanted = self.want();
        if input.len() != wanted || self.state == State::Finished {
            return Err(HandshakeError::Driver { wanted, got: input.len() });
        }
        match self.state {
            State::Greeting => self.greeting(input, out),
            State::ReplyHeader => self.reply_header(input, out),
            State::ReplyPayload { reply, .. } => {
                self.state = State::ReplyHeader;
                self.reply(reply, input, out)
            }
            State::ExportNameReply => {
                let mut r = Reader::new(input);
                let size = r.u64("export size").map_err(malformed("EXPORT_NAME reply"))?;
                let flags = r.u16("transmission flags").map_err(malformed("EXPORT_NAME reply"))?;
                self.export = Some((size, flags));
                Ok(Progress::Done(self.finish(true)))
            }
            State::Finished => unreachable!("checked above"),
        }
    }

    fn greeting(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let mut r = Reader::new(input);
        let magic = r.u64("magic").expect("length checked");
        let second = r.u64("IHAVEOPT").expect("length checked");
        let flags = r.u16("handshake flags").expect("length checked");
        if magic == NBDMAGIC && second == OLDSTYLE_MAGIC {
            return Err(HandshakeError::Oldstyle);
        }
        if magic != NBDMAGIC || second != IHAVEOPT {
            return Err(HandshakeError::NotNbd(magic, second));
        }
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
        let mut client_flags = if self.no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        if fixed {
            client_flags |= FLAG_C_FIXED_NEWSTYLE;
        }
        out.put_u32(client_flags);
        if !fixed {
            // Plain newstyle allows nothing but EXPORT_NAME.
            if self.config.base_allocation {
                return Err(HandshakeError::NeedsStructured);
            }
            return Ok(self.send_export_name(out));
        }
        if self.config.starttls {
            self.send(out, OPT_STARTTLS, &[]);
            return Ok(Progress::Continue);
        }
        self.send_framing(out)
    }

    /// The TLS handshake after STARTTLS succeeded: negotiation starts over
    /// through TLS (the server forgot everything before it).
    pub fn tls_started(&mut self, out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        self.send_framing(out)
    }

    /// The first option of the framing fallbacks.
    fn send_framing(&mut self, out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        match self.config.framing_max {
            Framing::Extended => self.send(out, OPT_EXTENDED_HEADERS, &[]),
            Framing::Structured => self.send(out, OPT_STRUCTURED_REPLY, &[]),
            Framing::Simple if self.config.base_allocation => return Err(HandshakeError::NeedsStructured),
            Framing::Simple => self.send_go(out),
        }
        Ok(Progress::Continue)
    }

    fn send(&mut self, out: &mut Vec<u8>, option: u32, data: &[u8]) {
        put_option(out, option, data);
        self.option = option;
        self.state = State::ReplyHeader;
    }

    fn send_go(&mut self, out: &mut Vec<u8>) {
        let mut data = Vec::with_capacity(4 + self.config.export.len() + 4);
        data.put_u32(self.config.export.len() as u32);
        data.extend_from_slice(self.config.export.as_bytes());
        data.put_u16(1);
        data.put_u16(INFO_BLOCK_SIZE);
        self.send(out, OPT_GO, &data);
    }

    fn send_set_meta_context(&mut self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        data.put_u32(self.config.export.len() as u32);
        data.extend_from_slice(self.config.export.as_bytes());
        data.put_u32(1);
        data.put_u32(BASE_ALLOCATION.len() as u32);
        data.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.send(out, OPT_SET_META_CONTEXT, &data);
    }

    fn send_export_name(&mut self, out: &mut Vec<u8>) -> Progress {
        put_option(out, OPT_EXPORT_NAME, self.config.export.as_bytes());
        self.option = OPT_EXPORT_NAME;
        self.state = State::ExportNameReply;
        Progress::Continue
    }

    /// Once the framing is settled: meta context (if wanted), then GO.
    fn after_framing(&mut self, out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        if self.config.base_allocation {
            if self.framing == Framing::Simple {
                return Err(HandshakeError::NeedsStructured);
            }
            self.send_set_meta_context(out);
        } else {
            self.send_go(out);
        }
        Ok(Progress::Continue)
    }

    fn reply_header(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let mut r = Reader::new(input);
        let magic = r.u64("magic").expect("length checked");
        let option = r.u32("option").expect("length checked");
        let reply = r.u32("reply type").expect("length checked");
        let length = r.u32("length").expect("length checked");
        if magic != OPTION_REPLY_MAGIC {
            return Err(HandshakeError::BadReplyMagic(magic));
        }
        if option != self.option {
            return Err(HandshakeError::WrongOption { sent: option_name(self.option), got: option });
        }
        if length > REPLY_PAYLOAD_BYTES_MAX {
            return Err(HandshakeError::ReplyTooLong(length));
        }
        if length == 0 {
            return self.reply(reply, &[], out);
        }
        self.state = State::ReplyPayload { reply, length: length as usize };
        Ok(Progress::Continue)
    }

    fn refused(&self, reply: u32, payload: &[u8]) -> HandshakeError {
        HandshakeError::Refused {
            option: option_name(self.option),
            reply: reply_error_name(reply),
            message: String::from_utf8_lossy(payload).into_owned(),
        }
    }

    /// One complete option reply for the option in flight.
    fn reply(&mut self, reply: u32, payload: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let is_error = reply & REPLY_ERROR_BIT != 0;
        let unexpected = HandshakeError::UnexpectedReply { option: option_name(self.option), reply };
        match self.option {
            OPT_STARTTLS if reply == REP_ACK => Ok(Progress::StartTls),
            OPT_EXTENDED_HEADERS if reply == REP_ACK => {
                self.framing = Framing::Extended;
                self.after_framing(out)
            }
            OPT_EXTENDED_HEADERS if is_error => {
                // Extended headers are experimental: any refusal means
                // "try structured replies instead".
                self.extended_refused = true;
                self.send(out, OPT_STRUCTURED_REPLY, &[]);
                Ok(Progress::Continue)
            }
            OPT_STRUCTURED_REPLY if reply == REP_ACK => {
                self.framing = Framing::Structured;
                self.after_framing(out)
            }
            OPT_STRUCTURED_REPLY if is_error => {
                self.framing = Framing::Simple;
                self.after_framing(out)
            }
            OPT_SET_META_CONTEXT if reply == REP_META_CONTEXT => {
                self.meta_context(payload)?;
                Ok(Progress::Continue)
            }
            OPT_SET_META_CONTEXT if reply == REP_ACK => {
                if self.context_id.is_none() {
                    return Err(HandshakeError::NoBaseAllocation);
                }
                self.send_go(out);
                Ok(Progress::Continue)
            }
            OPT_GO if reply == REP_INFO => {
                self.info(payload)?;
                Ok(Progress::Continue)
            }
            OPT_GO if reply == REP_ACK => {
                if self.export.is_none() {
                    return Err(HandshakeError::NoExportInfo);
                }
                Ok(Progress::Done(self.finish(false)))
            }
            // Old servers without GO; not allowed once extended headers are on.
            OPT_GO if reply == REP_ERR_UNSUP && self.framing != Framing::Extended => Ok(self.send_export_name(out)),
            _ if is_error => Err(self.refused(reply, payload)),
            _ => Err(unexpected),
        }
    }

    fn meta_context(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        let mut r = Reader::new(payload);
        let id = r.u32("context ID").map_err(malformed("META_CONTEXT reply"))?;
        let name = std::str::from_utf8(r.take(r.remaining(), "name").expect("remaining"))
            .map_err(|_| HandshakeError::Malformed("META_CONTEXT name is not UTF-8".into()))?;
        if name == BASE_ALLOCATION {
            self.context_id = Some(id);
        }
        Ok(())
    }

    fn info(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        let mut r = Reader::new(payload);
        let kind = r.u16("info type").map_err(malformed("INFO reply"))?;
        match kind {
            INFO_EXPORT => {
                let size = r.u64("export size").map_err(malformed("INFO_EXPORT"))?;
                let flags = r.u16("transmission flags").map_err(malformed("INFO_EXPORT"))?;
                r.expect_end("INFO_EXPORT").map_err(malformed("INFO_EXPORT"))?;
                self.export = Some((size, flags));
            }
            INFO_BLOCK_SIZE => {
                let what = malformed("INFO_BLOCK_SIZE");
                let minimum = r.u32("minimum").map_err(&what)?;
                let preferred = r.u32("preferred").map_err(&what)?;
                let maximum = r.u32("maximum").map_err(&what)?;
                r.expect_end("INFO_BLOCK_SIZE").map_err(&what)?;
                if !minimum.is_power_of_two() || maximum < minimum {
                    return Err(HandshakeError::Malformed(format!(
                        "INFO_BLOCK_SIZE minimum {minimum} / maximum {maximum}"
                    )));
                }
                self.block_sizes = Some(BlockSizes { minimum, preferred, maximum });
            }
            // Names, descriptions and unknown items are informational only.
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, used_export_name: bool) -> Session {
        self.state = State::Finished;
        let (size, flags) = self.export.expect("checked by the caller");
        Session {
            size,
            flags,
            framing: self.framing,
            block_sizes: self.block_sizes.unwrap_or_default(),
            block_sizes_advertised: self.block_sizes.is_some(),
            context_id: self.context_id,
            extended_refused: self.extended_refused,
            used_export_name,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::wire::{INFO_NAME, REP_ERR_POLICY, REP_ERR_UNKNOWN};

    use super::*;

    const TFLAGS: u16 = 0x0001 | 0x0004;

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(NBDMAGIC);
        v.put_u64(IHAVEOPT);
        v.put_u16(flags);
        v
    }

    fn reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(OPTION_REPLY_MAGIC);
        v.put_u32(option);
        v.put_u32(kind);
        v.put_u32(data.len() as u32);
        v.extend_from_slice(data);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u16(INFO_EXPORT);
        v.put_u64(size);
        v.put_u16(flags);
        v
    }

    fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u16(INFO_BLOCK_SIZE);
        v.put_u32(min);
        v.put_u32(preferred);
        v.put_u32(max);
        v
    }

    fn meta(id: u32, name: &str) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v
    }

    /// Drives the machine over a canned server stream; returns the result
    /// and the options the client sent, in order.
    fn run(config: HandshakeConfig, server: &[u8]) -> (Result<Session, HandshakeError>, Vec<u32>) {
        let mut hs = ClientHandshake::new(config);
        let mut sent = Vec::new();
        let mut position = 0;
        loop {
            let n = hs.want();
            assert!(position + n <= server.len(), "client wants more than the server said");
            let mut out = Vec::new();
            let progress = hs.feed(&server[position..position + n], &mut out);
            // The answer to the greeting starts with the client flags.
            let skip = if position == 0 { 4.min(out.len()) } else { 0 };
            position += n;
            sent.extend(options_in(&out[skip..]));
            match progress {
                Ok(Progress::Continue) => {}
                // The TLS handshake happens outside; carry on as after it.
                Ok(Progress::StartTls) => {
                    let mut out = Vec::new();
                    hs.tls_started(&mut out).unwrap();
                    sent.extend(options_in(&out));
                }
                Ok(Progress::Done(session)) => {
                    assert_eq!(position, server.len(), "unread server bytes");
                    return (Ok(session), sent);
                }
                Err(e) => return (Err(e), sent),
            }
        }
    }

    /// Option codes in what the client sent.
    fn options_in(out: &[u8]) -> Vec<u32> {
        let mut r = Reader::new(out);
        let mut found = Vec::new();
        while r.remaining() > 0 {
            assert_eq!(r.u64("magic").unwrap(), IHAVEOPT);
            found.push(r.u32("option").unwrap());
            let len = r.u32("len").unwrap() as usize;
            r.take(len, "data").unwrap();
        }
        found
    }

    fn config(framing_max: Framing, base_allocation: bool) -> HandshakeConfig {
        HandshakeConfig { export: "disk".into(), framing_max, base_allocation, starttls: false }
    }

    #[test]
    fn starttls_comes_first_and_negotiation_starts_over_after_it() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.extend(reply(OPT_STARTTLS, REP_ACK, &[]));
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(reply(OPT_GO, REP_INFO, &info_export(1 << 30, TFLAGS)));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let tls = HandshakeConfig { starttls: true, ..config(Framing::Structured, false) };
        let (session, sent) = run(tls.clone(), &s);
        assert_eq!(sent, vec![OPT_STARTTLS, OPT_STRUCTURED_REPLY, OPT_GO]);
        assert_eq!(session.unwrap().framing, Framing::Structured);
        // A server that refuses STARTTLS ends it (no silent downgrade).
        let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.extend(reply(OPT_STARTTLS, REP_ERR_UNSUP, &[]));
        assert!(matches!(run(tls, &s).0, Err(HandshakeError::Refused { .. })));
    }

    #[test]
    fn extended_headers_meta_context_and_go() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.extend(reply(OPT_EXTENDED_HEADERS, REP_ACK, &[]));
        s.extend(reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &meta(3, "base:allocation")));
        s.extend(reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        s.extend(reply(OPT_GO, REP_INFO, &info_export(1 << 30, TFLAGS)));
        s.extend(reply(OPT_GO, REP_INFO, &info_block_size(512, 4096, 1 << 25)));
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        s.extend(reply(OPT_GO, REP_INFO, &name));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let (session, sent) = run(config(Framing::Extended, true), &s);
        let session = session.unwrap();
        assert_eq!(sent, vec![OPT_EXTENDED_HEADERS, OPT_SET_META_CONTEXT, OPT_GO]);
        assert_eq!(session.framing, Framing::Extended);
        assert_eq!(session.size, 1 << 30);
        assert_eq!(session.flags, TFLAGS);
        assert_eq!(session.context_id, Some(3));
        assert_eq!(session.block_sizes, BlockSizes { minimum: 512, preferred: 4096, maximum: 1 << 25 });
        assert!(session.block_sizes_advertised && !session.extended_refused);
    }

    #[test]
    fn refused_extended_headers_fall_back_to_structured() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, b"no"));
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(reply(OPT_GO, REP_INFO, &info_export(4096, TFLAGS)));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let (session, sent) = run(config(Framing::Extended, false), &s);
        let session = session.unwrap();
        assert_eq!(sent, vec![OPT_EXTENDED_HEADERS, OPT_STRUCTURED_REPLY, OPT_GO]);
        assert_eq!(session.framing, Framing::Structured);
        assert!(session.extended_refused);
        assert_eq!(session.block_sizes, BlockSizes::default());
        assert!(!session.block_sizes_advertised);
    }

    #[test]
    fn refused_structured_replies_fall_back_to_simple_unless_map_needs_them() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
        s.extend(reply(OPT_GO, REP_INFO, &info_export(4096, TFLAGS)));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let (session, _) = run(config(Framing::Structured, false), &s);
        assert_eq!(session.unwrap().framing, Framing::Simple);
        let (err, _) = run(config(Framing::Structured, true), &s);
        assert_eq!(err.unwrap_err(), HandshakeError::NeedsStructured);
    }

    #[test]
    fn missing_base_allocation_fails() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &meta(1, "qemu:dirty-bitmap:x")));
        s.extend(reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        let (err, _) = run(config(Framing::Structured, true), &s);
        assert_eq!(err.unwrap_err(), HandshakeError::NoBaseAllocation);
    }

    #[test]
    fn go_errors_carry_the_server_message() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(reply(OPT_GO, REP_ERR_UNKNOWN, b"no export named disk"));
        let (err, _) = run(config(Framing::Structured, false), &s);
        let err = err.unwrap_err();
        assert!(err.to_string().contains("ERR_UNKNOWN"), "{err}");
        assert!(err.to_string().contains("no export named disk"), "{err}");
        let mut policy = greeting(FLAG_FIXED_NEWSTYLE);
        policy.extend(reply(OPT_GO, REP_ERR_POLICY, &[]));
        let (err, _) = run(config(Framing::Simple, false), &policy);
        assert!(matches!(err.unwrap_err(), HandshakeError::Refused { option, .. } if option == "GO"));
    }

    #[test]
    fn unsupported_go_falls_back_to_export_name() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(reply(OPT_GO, REP_ERR_UNSUP, &[]));
        s.extend((8192u64).to_be_bytes());
        s.extend(TFLAGS.to_be_bytes());
        s.extend([0u8; 124]);
        let (session, sent) = run(config(Framing::Structured, false), &s);
        let session = session.unwrap();
        assert_eq!(sent, vec![OPT_STRUCTURED_REPLY, OPT_GO, OPT_EXPORT_NAME]);
        assert!(session.used_export_name);
        assert_eq!(session.size, 8192);
    }

    #[test]
    fn plain_newstyle_uses_export_name_with_no_zeroes() {
        let mut s = greeting(FLAG_NO_ZEROES);
        s.extend((512u64).to_be_bytes());
        s.extend(TFLAGS.to_be_bytes());
        let (session, sent) = run(config(Framing::Extended, false), &s);
        assert_eq!(sent, vec![OPT_EXPORT_NAME]);
        assert_eq!(session.unwrap().framing, Framing::Simple);
    }

    #[test]
    fn framing_errors() {
        let mut old = Vec::new();
        old.put_u64(NBDMAGIC);
        old.put_u64(OLDSTYLE_MAGIC);
        old.put_u16(0);
        assert_eq!(run(config(Framing::Simple, false), &old).0.unwrap_err(), HandshakeError::Oldstyle);
        let http = b"HTTP/1.1 400 Bad Request".to_vec();
        assert!(matches!(run(config(Framing::Simple, false), &http).0.unwrap_err(), HandshakeError::NotNbd(..)));
        let mut wrong = greeting(FLAG_FIXED_NEWSTYLE);
        wrong.extend(reply(OPT_GO, REP_ACK, &[]));
        let err = run(config(Framing::Structured, false), &wrong).0.unwrap_err();
        assert_eq!(err, HandshakeError::WrongOption { sent: "STRUCTURED_REPLY".into(), got: OPT_GO });
        let mut huge = greeting(FLAG_FIXED_NEWSTYLE);
        let mut header = reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        header[16..20].copy_from_slice(&(REPLY_PAYLOAD_BYTES_MAX + 1).to_be_bytes());
        huge.extend(header);
        assert!(matches!(
            run(config(Framing::Structured, false), &huge).0.unwrap_err(),
            HandshakeError::ReplyTooLong(_)
        ));
        let mut ack_without_info = greeting(FLAG_FIXED_NEWSTYLE);
        ack_without_info.extend(reply(OPT_GO, REP_ACK, &[]));
        let err = run(config(Framing::Simple, false), &ack_without_info).0.unwrap_err();
        assert_eq!(err, HandshakeError::NoExportInfo);
        let mut hs = ClientHandshake::new(config(Framing::Simple, false));
        let mut out = Vec::new();
        hs.feed(&ack_without_info[..18], &mut out).unwrap();
        assert_eq!(hs.feed(&[0; 3], &mut out), Err(HandshakeError::Driver { wanted: 20, got: 3 }));
    }
}
