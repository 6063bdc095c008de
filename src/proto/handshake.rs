//! The fixed-newstyle handshake as a pure state machine.
//!
//! The driver (net::negotiate) sends [`Handshake::greeting`], then asks
//! [`Handshake::want`] how many bytes the machine needs, reads exactly that
//! many and hands them to [`Handshake::feed`], which appends any reply bytes
//! to `out`. Oversized options are skipped without being buffered:
//! `want` returns [`Want::Discard`] and the driver calls
//! [`Handshake::discarded`] once the bytes are gone. Nothing here touches a
//! socket or a clock, so the whole negotiation is unit-testable and fuzzable.

use thiserror::Error;

use super::error::DecodeError;
use super::meta::{self, QueryMode};
use super::transmission::ReplyMode;
use super::wire::*;

/// Block-size constraints advertised with NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What negotiation needs to know about one export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags that do not depend on negotiation.
    pub flags: u16,
    pub block_size: BlockSize,
    /// Names of the metadata contexts the export offers now, each one
    /// selectable.
    pub contexts: Vec<String>,
    /// Served only over TLS (SELECTIVETLS): hidden from LIST and refused
    /// with ERR_TLS_REQD until the client has upgraded.
    pub tls_only: bool,
}

/// Whether STARTTLS is offered, and whether it is required (FORCEDTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsOffer {
    #[default]
    Off,
    On,
    Require,
}

/// The server's say on whether this client may use an export: access
/// rules and connection limits, which depend on who the client is and on
/// every other connection, so they live outside this machine. Methods take
/// `&self`: the driver changes what the gate knows (the client's TLS
/// identity) while the machine holds it.
pub trait ExportGate {
    /// Whether the client may see and ask about `export`; `Err` says why
    /// not (for the log), and the option gets ERR_POLICY.
    fn check(&self, export: usize) -> Result<(), String>;
    /// GO or EXPORT_NAME: takes the client's connection slot for `export`
    /// (connection limits), or says why it cannot.
    fn claim(&self, export: usize) -> Result<(), String>;
}

/// Lets every client use every export (unit tests, fuzzing, the default).
pub struct OpenGate;

impl ExportGate for OpenGate {
    fn check(&self, _: usize) -> Result<(), String> {
        Ok(())
    }
    fn claim(&self, _: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Every bound on a client's negotiation, in one place.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// Options accepted before the client is considered abusive.
    pub options_max: u32,
    /// Largest option payload that is buffered and parsed.
    pub option_bytes_max: u32,
    /// Largest oversized option that is skipped (answered ERR_TOO_BIG);
    /// anything longer is a hard disconnect.
    pub option_discard_bytes_max: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            options_max: 1024,
            // Room for a 4096-byte name plus a generous query or info list.
            option_bytes_max: 64 * 1024,
            option_discard_bytes_max: 1024 * 1024,
        }
    }
}

/// The outcome of a successful negotiation, handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: usize,
    /// Transmission flags exactly as sent to the client.
    pub flags: u16,
    pub reply_mode: ReplyMode,
    /// Selected contexts: the ID the client was given, and the position of
    /// the context in the export's `ExportInfo::contexts`.
    pub contexts: Vec<(u32, usize)>,
    /// The client asked for INFO_BLOCK_SIZE in GO and is bound by it.
    pub block_size_agreed: bool,
}

/// What the machine needs from the driver next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Bytes(usize),
    Discard(usize),
}

/// What a fed chunk led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Continue,
    /// Negotiation finished; transmission starts after `out` is sent.
    Ready(Negotiated),
    /// STARTTLS was accepted: send `out` (its ACK) in plaintext, run the
    /// TLS handshake, call [`Handshake::tls_started`], and go on through
    /// TLS.
    StartTls,
    /// The client sent ABORT; send `out` (best effort) and close.
    Aborted,
}

/// Hard-disconnect reasons (the spec allows or requires dropping the client).
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Client flags with bits we never offered.
    #[error("client flags {0:#x} carry unknown bits")]
    BadClientFlags(u32),
    /// Option framing was lost.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// Too many option rounds.
    #[error("more than {0} options")]
    TooManyOptions(u32),
    /// An option too large even to skip.
    #[error("option of {0} bytes exceeds the discard limit")]
    OptionTooLarge(u32),
    /// EXPORT_NAME cannot carry an error, so an unknown name disconnects.
    #[error("EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// A non-fixed-newstyle client may only send EXPORT_NAME.
    #[error("option {0} from a client without fixed newstyle")]
    NotFixedNewstyle(u32),
    /// EXPORT_NAME is not allowed once extended headers are on.
    #[error("EXPORT_NAME after extended headers")]
    ExportNameAfterExtendedHeaders,
    /// EXPORT_NAME while the server shuts down (it cannot carry ERR_SHUTDOWN).
    #[error("server shutting down")]
    ShuttingDown,
    /// EXPORT_NAME before STARTTLS where TLS is required, or for a TLS-only
    /// export (it cannot carry ERR_TLS_REQD).
    #[error("EXPORT_NAME without TLS")]
    TlsRequired,
    /// EXPORT_NAME for an export the client may not use (it cannot carry
    /// ERR_POLICY).
    #[error("EXPORT_NAME refused: {0}")]
    Refused(String),
    /// `feed` was called with a different number of bytes than wanted.
    #[error("fed {got} bytes, wanted {wanted}")]
    Driver { wanted: usize, got: usize },
}

/// Refusals kept between two `take_refusals` calls (each option is taken
/// right after it is answered, so this only bounds a driver that never asks).
const REFUSALS_KEPT_MAX: usize = 64;
/// Option header: magic u64 + option u32 + length u32.
const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
/// Handshake-flags greeting: NBDMAGIC + IHAVEOPT + flags u16.
pub const GREETING_BYTES: usize = 8 + 8 + 2;
/// Zero padding after an EXPORT_NAME reply unless NO_ZEROES was agreed.
const EXPORT_NAME_PADDING: usize = 124;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, length: usize },
    Discarding { option: u32, length: usize },
    Finished,
}

pub struct Handshake<'a> {
    exports: &'a [ExportInfo],
    limits: HandshakeLimits,
    tls: TlsOffer,
    /// STARTTLS succeeded; every option since came through TLS.
    tls_active: bool,
    gate: &'a dyn ExportGate,
    state: State,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// The last successful SET_META_CONTEXT: the export it named and the
    /// positions of the contexts it chose.
    meta: Option<(usize, Vec<usize>)>,
    options_seen: u32,
    shutting_down: bool,
    /// Options refused since the driver last took them (for its log).
    refusals: Vec<Refusal>,
}

/// An option the server refused, for the log: which, with what error reply,
/// and why (the detail may name what the client asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub option: u32,
    pub reply: u32,
    pub reason: String,
}

impl<'a> Handshake<'a> {
    /// A machine without TLS whose clients may use every export.
    pub fn new(exports: &'a [ExportInfo], limits: HandshakeLimits) -> Self {
        Self::with_policy(exports, limits, TlsOffer::Off, &OpenGate)
    }

    pub fn with_policy(
        exports: &'a [ExportInfo],
        limits: HandshakeLimits,
        tls: TlsOffer,
        gate: &'a dyn ExportGate,
    ) -> Self {
        Self {
            exports,
            limits,
            tls,
            tls_active: false,
            gate,
            state: State::ClientFlags,
            fixed_newstyle: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            options_seen: 0,
            shutting_down: false,
            refusals: Vec::new(),
        }
    }

    /// From now on every option but ABORT is refused with ERR_SHUTDOWN,
    /// which tells the client to disconnect cleanly.
    pub fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// The TLS handshake after STARTTLS succeeded. Everything negotiated
    /// before it is forgotten, as the spec requires: a man in the middle
    /// could have injected it.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.meta = None;
    }

    /// Whether options now come through TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The options refused since the last call, oldest first.
    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.refusals)
    }

    /// Sends an error reply carrying `message`, and notes it for the log
    /// with `reason` (which may say more than the client is told).
    fn refuse(&mut self, out: &mut Vec<u8>, option: u32, reply: u32, message: &str, reason: String) {
        option_reply(out, option, reply, message.as_bytes());
        if self.refusals.len() < REFUSALS_KEPT_MAX {
            self.refusals.push(Refusal { option, reply, reason });
        }
    }

    pub fn greeting(&self, out: &mut Vec<u8>) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    pub fn want(&self) -> Want {
        match self.state {
            State::ClientFlags => Want::Bytes(4),
            State::OptionHeader => Want::Bytes(OPTION_HEADER_BYTES),
            State::OptionData { length, .. } => Want::Bytes(length),
            State::Discarding { length, .. } => Want::Discard(length),
            State::Finished => Want::Bytes(0),
        }
    }

    /// Feed exactly the bytes `want()` asked for.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let wanted = match self.want() {
            Want::Bytes(n) => n,
            Want::Discard(_) => 0,
        };
        let discarding = matches!(self.state, State::Discarding { .. });
        if data.len() != wanted || self.state == State::Finished || discarding {
            return Err(HandshakeError::Driver { wanted, got: data.len() });
        }
        match self.state {
            State::ClientFlags => self.client_flags(data),
            State::OptionHeader => self.option_header(data, out),
            State::OptionData { option, .. } => {
                self.state = State::OptionHeader;
                self.option(option, data, out)
            }
            State::Discarding { .. } | State::Finished => unreachable!("checked above"),
        }
    }

    /// The bytes of an oversized option were skipped by the driver.
    pub fn discarded(&mut self, out: &mut Vec<u8>) {
        if let State::Discarding { option, length } = self.state {
            let reason = format!("option of {length} bytes is too large");
            self.refuse(out, option, REP_ERR_TOO_BIG, "option too large", reason);
            self.state = State::OptionHeader;
        }
    }

    fn client_flags(&mut self, data: &[u8]) -> Result<Progress, HandshakeError> {
        let flags = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::BadClientFlags(flags));
        }
        self.fixed_newstyle = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.state = State::OptionHeader;
        Ok(Progress::Continue)
    }

    fn option_header(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let mut r = Reader::new(data);
        let magic = r.u64("option magic").expect("length checked by feed");
        let option = r.u32("option").expect("length checked by feed");
        let length = r.u32("option length").expect("length checked by feed");
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        self.options_seen += 1;
        if self.options_seen > self.limits.options_max {
            return Err(HandshakeError::TooManyOptions(self.limits.options_max));
        }
        if !self.fixed_newstyle && option != OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }
        // EXPORT_NAME has no error reply, so an oversized one cannot be
        // skipped and answered: the only option is to disconnect.
        let export_name_too_long = option == OPT_EXPORT_NAME && length > self.limits.option_bytes_max;
        if length > self.limits.option_discard_bytes_max || export_name_too_long {
            return Err(HandshakeError::OptionTooLarge(length));
        }
        let length = length as usize;
        if length > self.limits.option_bytes_max as usize {
            self.state = State::Discarding { option, length };
        } else if length == 0 {
            return self.option(option, &[], out);
        } else {
            self.state = State::OptionData { option, length };
        }
        Ok(Progress::Continue)
    }

    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        if self.shutting_down && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::ShuttingDown);
            }
            self.refuse(out, option, REP_ERR_SHUTDOWN, "server is shutting down", "server is shutting down".into());
            return Ok(Progress::Continue);
        }
        let tls_missing = self.tls == TlsOffer::Require && !self.tls_active;
        if tls_missing && !matches!(option, OPT_ABORT | OPT_STARTTLS) {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            let reason = "TLS is required (send STARTTLS first)";
            self.refuse(out, option, REP_ERR_TLS_REQD, reason, reason.into());
            return Ok(Progress::Continue);
        }
        match option {
            OPT_EXPORT_NAME => return self.export_name(data, out),
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                self.state = State::Finished;
                return Ok(Progress::Aborted);
            }
            OPT_INFO | OPT_GO => return Ok(self.info_or_go(option, data, out)),
            OPT_LIST => self.list(data, out),
            OPT_STARTTLS if !data.is_empty() => self.no_data_allowed(out, option),
            OPT_STARTTLS => return Ok(self.start_tls(out)),
            OPT_STRUCTURED_REPLY => self.structured_reply(data, out),
            OPT_EXTENDED_HEADERS => self.extended_headers(data, out),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            _ => self.refuse(out, option, REP_ERR_UNSUP, "unknown option", format!("unknown option {option}")),
        }
        Ok(Progress::Continue)
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        if self.extended {
            return Err(HandshakeError::ExportNameAfterExtendedHeaders);
        }
        let name = String::from_utf8_lossy(data);
        let export = self.find_export(&name).ok_or_else(|| HandshakeError::UnknownExport(name.into_owned()))?;
        if self.exports[export].tls_only && !self.tls_active {
            return Err(HandshakeError::TlsRequired);
        }
        self.gate.check(export).and_then(|()| self.gate.claim(export)).map_err(HandshakeError::Refused)?;
        let negotiated = self.negotiated(export, false);
        out.put_u64(self.exports[export].size);
        out.put_u16(negotiated.flags);
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
        }
        self.state = State::Finished;
        Ok(Progress::Ready(negotiated))
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Progress {
        let request = match parse_info_request(data) {
            Ok(request) => request,
            Err(e) => {
                let message = e.to_string();
                self.refuse(out, option, REP_ERR_INVALID, &message, format!("malformed: {message}"));
                return Progress::Continue;
            }
        };
        let Some(export) = self.find_export(request.name) else {
            let reason = format!("unknown export {:?}", request.name);
            self.refuse(out, option, REP_ERR_UNKNOWN, "no such export", reason);
            return Progress::Continue;
        };
        if self.exports[export].tls_only && !self.tls_active {
            let reason = format!("export {:?} is served only over TLS", self.exports[export].name);
            self.refuse(out, option, REP_ERR_TLS_REQD, "this export needs TLS", reason);
            return Progress::Continue;
        }
        let admitted = match option {
            OPT_GO => self.gate.check(export).and_then(|()| self.gate.claim(export)),
            _ => self.gate.check(export),
        };
        if let Err(why) = admitted {
            let reason = format!("export {:?}: {why}", self.exports[export].name);
            self.refuse(out, option, REP_ERR_POLICY, "access to this export is refused", reason);
            return Progress::Continue;
        }
        let wants = |code| request.info_codes.contains(&code);
        let info = &self.exports[export];
        let negotiated = self.negotiated(export, wants(INFO_BLOCK_SIZE));

        let mut payload = Vec::with_capacity(12);
        payload.put_u16(INFO_EXPORT);
        payload.put_u64(info.size);
        payload.put_u16(negotiated.flags);
        option_reply(out, option, REP_INFO, &payload);
        if wants(INFO_NAME) {
            info_string(out, option, INFO_NAME, &info.name);
        }
        if wants(INFO_DESCRIPTION) && !info.description.is_empty() {
            info_string(out, option, INFO_DESCRIPTION, &info.description);
        }
        // Sent even when not requested: the spec allows it and clients that
        // did not ask are not bound by it.
        payload.clear();
        payload.put_u16(INFO_BLOCK_SIZE);
        payload.put_u32(info.block_size.minimum);
        payload.put_u32(info.block_size.preferred);
        payload.put_u32(info.block_size.maximum);
        option_reply(out, option, REP_INFO, &payload);
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            self.state = State::Finished;
            return Progress::Ready(negotiated);
        }
        Progress::Continue
    }

    fn list(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if !data.is_empty() {
            return self.no_data_allowed(out, OPT_LIST);
        }
        for (index, export) in self.exports.iter().enumerate() {
            if !self.visible(index) {
                continue;
            }
            let mut payload = Vec::with_capacity(4 + export.name.len() + export.description.len());
            payload.put_u32(export.name.len() as u32);
            payload.extend_from_slice(export.name.as_bytes());
            payload.extend_from_slice(export.description.as_bytes());
            option_reply(out, OPT_LIST, REP_SERVER, &payload);
        }
        option_reply(out, OPT_LIST, REP_ACK, &[]);
    }

    /// Repeating a state-changing option is INVALID, as qemu answers it
    /// (libnbd's interop tests expect that); after extended headers the spec
    /// wants EXT_HEADER_REQD instead.
    fn structured_reply(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let option = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            self.no_data_allowed(out, option);
        } else if self.extended {
            let message = "extended headers in use";
            self.refuse(out, option, REP_ERR_EXT_HEADER_REQD, message, message.into());
        } else if self.structured {
            let message = "structured replies already negotiated";
            self.refuse(out, option, REP_ERR_INVALID, message, message.into());
        } else {
            option_reply(out, option, REP_ACK, &[]);
            self.structured = true;
        }
    }

    fn extended_headers(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let option = OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            self.no_data_allowed(out, option);
        } else if self.extended {
            let message = "extended headers already negotiated";
            self.refuse(out, option, REP_ERR_INVALID, message, message.into());
        } else {
            option_reply(out, option, REP_ACK, &[]);
            self.extended = true;
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        let mode = if option == OPT_SET_META_CONTEXT { QueryMode::Set } else { QueryMode::List };
        if mode == QueryMode::Set {
            // Each SET replaces the selection, even when it fails.
            self.meta = None;
            if !self.structured && !self.extended {
                let message = "negotiate structured replies first";
                return self.refuse(out, option, REP_ERR_INVALID, message, message.into());
            }
        }
        let request = match meta::parse_meta_request(data) {
            Ok(request) => request,
            Err(e) => {
                let message = e.to_string();
                return self.refuse(out, option, REP_ERR_INVALID, &message, format!("malformed: {message}"));
            }
        };
        let Some(export) = self.find_export(request.export) else {
            let reason = format!("meta contexts of unknown export {:?}", request.export);
            return self.refuse(out, option, REP_ERR_UNKNOWN, "no such export", reason);
        };
        if let Err(why) = self.usable(export) {
            let reason = format!("meta contexts of export {:?}: {why}", request.export);
            return self.refuse(out, option, REP_ERR_POLICY, "access to this export is refused", reason);
        }
        let names = &self.exports[export].contexts;
        let chosen = meta::match_queries(mode, &request.queries, names);
        if mode == QueryMode::Set && chosen.len() > meta::SELECTED_MAX {
            let message = format!("at most {} contexts may be selected at once", meta::SELECTED_MAX);
            let reason = format!("{message} ({} asked for)", chosen.len());
            return self.refuse(out, option, REP_ERR_TOO_BIG, &message, reason);
        }
        for (position, &index) in chosen.iter().enumerate() {
            // LIST replies carry ID 0; SET IDs are 1-based positions.
            let id = if mode == QueryMode::Set { position as u32 + 1 } else { 0 };
            let name = &names[index];
            let mut payload = Vec::with_capacity(4 + name.len());
            payload.put_u32(id);
            payload.extend_from_slice(name.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &payload);
        }
        if mode == QueryMode::Set {
            self.meta = Some((export, chosen));
        }
        option_reply(out, option, REP_ACK, &[]);
    }

    fn start_tls(&mut self, out: &mut Vec<u8>) -> Progress {
        let option = OPT_STARTTLS;
        if self.tls == TlsOffer::Off {
            let message = "TLS is not configured";
            self.refuse(out, option, REP_ERR_POLICY, message, message.into());
        } else if self.tls_active {
            let message = "TLS is already in use";
            self.refuse(out, option, REP_ERR_INVALID, message, message.into());
        } else {
            option_reply(out, option, REP_ACK, &[]);
            return Progress::StartTls;
        }
        Progress::Continue
    }

    /// Whether LIST shows `export` and META_CONTEXT answers for it, and if
    /// not, why.
    fn usable(&self, export: usize) -> Result<(), String> {
        if self.exports[export].tls_only && !self.tls_active {
            return Err("served only over TLS".into());
        }
        self.gate.check(export)
    }

    fn visible(&self, export: usize) -> bool {
        self.usable(export).is_ok()
    }

    fn no_data_allowed(&mut self, out: &mut Vec<u8>, option: u32) {
        self.refuse(out, option, REP_ERR_INVALID, "option takes no data", "option takes no data".into());
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Flags and contexts as they apply to `export` in the current state.
    /// INFO and an identical GO call this with the same state, so they agree.
    fn negotiated(&self, export: usize, block_size_agreed: bool) -> Negotiated {
        let reply_mode = match (self.extended, self.structured) {
            (true, _) => ReplyMode::Extended,
            (false, true) => ReplyMode::Structured,
            (false, false) => ReplyMode::Simple,
        };
        let contexts = match &self.meta {
            Some((named, chosen)) if *named == export && reply_mode != ReplyMode::Simple => {
                chosen.iter().enumerate().map(|(position, &index)| (position as u32 + 1, index)).collect()
            }
            _ => Vec::new(),
        };
        let mut flags = self.exports[export].flags | TF_HAS_FLAGS;
        if reply_mode != ReplyMode::Simple {
            flags |= TF_SEND_DF;
        }
        // Per-request context choice needs 64-bit headers and something to choose.
        if reply_mode == ReplyMode::Extended && !contexts.is_empty() {
            flags |= TF_BLOCK_STATUS_PAYLOAD;
        }
        Negotiated { export, flags, reply_mode, contexts, block_size_agreed }
    }
}

struct InfoRequest<'a> {
    name: &'a str,
    info_codes: Vec<u16>,
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, DecodeError> {
    let mut r = Reader::new(data);
    let name = r.string32("export name")?;
    let count = r.u16("info count")? as usize;
    let mut info_codes = Vec::with_capacity(count.min(r.remaining() / 2));
    for _ in 0..count {
        info_codes.push(r.u16("info code")?);
    }
    r.expect_end("info codes")?;
    Ok(InfoRequest { name, info_codes })
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
}

fn info_string(out: &mut Vec<u8>, option: u32, info: u16, text: &str) {
    let mut payload = Vec::with_capacity(2 + text.len());
    payload.put_u16(info);
    payload.extend_from_slice(text.as_bytes());
    option_reply(out, option, REP_INFO, &payload);
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
