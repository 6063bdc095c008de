//! The reply stream of one connection as a pure state machine: bytes in,
//! events out. Replies may arrive split at any byte boundary, so the parser
//! consumes what it can and says how much; the caller keeps the rest.
//!
//! Read data and block-status descriptors are streamed (never buffered
//! whole), so only headers and bounded fixed-size payloads (hole, error, a
//! status prefix) ever wait for more bytes: at most
//! [`PARSER_LOOKAHEAD_BYTES_MAX`]. The caller's receive buffer must be at
//! least that large.
//!
//! Validation follows PROTOCOL.md: the reply kind must fit the framing and
//! the command, offsets stay inside the request, descriptors are nonzero and
//! only the last may overrun the request (it is clamped), every reply ends
//! with exactly one final piece (a simple reply or a chunk flagged DONE).

use crate::proto::wire::REPLY_FLAG_DONE;

use super::codec::{
    self, ChunkHeader, ChunkKind, Command, DATA_PREFIX_BYTES, ERROR_PAYLOAD_BYTES_MAX, Framing, HOLE_PAYLOAD_BYTES,
    ProtocolError, REPLY_HEADER_BYTES_MAX, ReplyHeader,
};

/// The most bytes the parser may need before it can make progress: an
/// extended header, or a whole error payload.
pub const PARSER_LOOKAHEAD_BYTES_MAX: usize = REPLY_HEADER_BYTES_MAX + ERROR_PAYLOAD_BYTES_MAX;

/// What the parser needs to know about an outstanding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfo {
    pub command: Command,
    pub offset: u64,
    pub length: u64,
}

/// A piece of a reply. Offsets named `at` are relative to the request offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Read data for `[at, at + bytes.len())` of the request.
    Data { cookie: u64, at: u64, bytes: &'a [u8] },
    /// Read data the caller received directly into its own buffer
    /// (see [`ReplyParser::pending_data`]).
    DataLanded { cookie: u64, at: u64, length: u64 },
    /// `[at, at + length)` of the request reads as zeroes.
    Hole { cookie: u64, at: u64, length: u64 },
    /// One block-status descriptor at an absolute offset, clamped to the
    /// request; `first` marks the first descriptor of a status chunk.
    Extent { cookie: u64, first: bool, offset: u64, length: u64, status: u64 },
    /// The server failed the request.
    Error { cookie: u64, code: u32, message: &'a str },
    /// The reply is complete; no more events for this cookie.
    Done { cookie: u64 },
}

/// The parser's view of the caller: request lookup and an event sink, one
/// object so that the caller can update its own request table from events.
pub trait ReplySink {
    fn request(&self, cookie: u64) -> Option<RequestInfo>;
    fn event(&mut self, event: Event<'_>);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    /// Waiting for `need` bytes of a chunk's payload (all of a small one, or
    /// the prefix of a data or status chunk).
    Payload {
        chunk: ChunkHeader,
        request: RequestInfo,
        need: usize,
    },
    /// Streaming read data. Invariant: `remaining > 0`.
    Data {
        cookie: u64,
        at: u64,
        remaining: u64,
        done: bool,
    },
    /// Streaming descriptors. Invariant: `remaining > 0`, `next_offset <= end`.
    Extents {
        cookie: u64,
        kind: ChunkKind,
        remaining: u64,
        next_offset: u64,
        end: u64,
        first: bool,
        done: bool,
    },
}

pub struct ReplyParser {
    framing: Framing,
    /// The ID the server gave base:allocation, when negotiated.
    context_id: Option<u32>,
    state: State,
}

fn violation(text: String) -> ProtocolError {
    ProtocolError::Violation(text)
}

impl ReplyParser {
    pub fn new(framing: Framing, context_id: Option<u32>) -> Self {
        Self { framing, context_id, state: State::Header }
    }

    /// True between replies (nothing partially received).
    #[cfg(test)]
    pub fn at_boundary(&self) -> bool {
        self.state == State::Header
    }

    /// `(cookie, at, remaining)` while read data is being streamed, so the
    /// caller may receive up to `remaining` bytes straight into its buffer
    /// and report them with [`ReplyParser::data_landed`].
    pub fn pending_data(&self) -> Option<(u64, u64, u64)> {
        match self.state {
            State::Data { cookie, at, remaining, .. } => Some((cookie, at, remaining)),
            _ => None,
        }
    }

    /// `length` bytes of pending data were received directly by the caller.
    pub fn data_landed(&mut self, length: u64, sink: &mut impl ReplySink) {
        let State::Data { cookie, at, remaining, done } = self.state else {
            panic!("data_landed without pending data");
        };
        assert!(length > 0 && length <= remaining, "landed {length} of {remaining} pending bytes");
        sink.event(Event::DataLanded { cookie, at, length });
        self.finish_data(cookie, at + length, remaining - length, done, sink);
    }

    /// Consumes as many whole pieces of `input` as possible and returns how
    /// many bytes were used. Unused bytes must be passed again, followed by
    /// more, on the next call.
    pub fn parse(&mut self, input: &[u8], sink: &mut impl ReplySink) -> Result<usize, ProtocolError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            // `None`: more bytes are needed. `Some(n)`: progress was made
            // using n bytes (n may be 0, e.g. an empty error payload).
            let step = match self.state {
                State::Header => self.header(rest, sink)?,
                State::Payload { chunk, request, need } => self.payload(rest, chunk, request, need, sink)?,
                State::Data { cookie, at, remaining, done } => {
                    let take = rest.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    if take > 0 {
                        sink.event(Event::Data { cookie, at, bytes: &rest[..take] });
                        self.finish_data(cookie, at + take as u64, remaining - take as u64, done, sink);
                    }
                    (take > 0).then_some(take)
                }
                State::Extents { .. } => self.extents(rest, sink)?,
            };
            match step {
                Some(n) => used += n,
                None => return Ok(used),
            }
        }
    }

    fn finish_data(&mut self, cookie: u64, at: u64, remaining: u64, done: bool, sink: &mut impl ReplySink) {
        if remaining > 0 {
            self.state = State::Data { cookie, at, remaining, done };
            return;
        }
        self.state = State::Header;
        if done {
            sink.event(Event::Done { cookie });
        }
    }

    fn lookup(cookie: u64, sink: &impl ReplySink) -> Result<RequestInfo, ProtocolError> {
        sink.request(cookie).ok_or(ProtocolError::UnknownCookie(cookie))
    }

    /// Returns the header bytes consumed (`None` while incomplete).
    fn header(&mut self, input: &[u8], sink: &mut impl ReplySink) -> Result<Option<usize>, ProtocolError> {
        if input.len() < 4 {
            return Ok(None);
        }
        let bytes = codec::reply_header_bytes([input[0], input[1], input[2], input[3]], self.framing)?;
        if input.len() < bytes {
            return Ok(None);
        }
        match codec::decode_reply_header(&input[..bytes], self.framing)? {
            ReplyHeader::Simple { error, cookie } => self.simple(error, cookie, sink)?,
            ReplyHeader::Chunk(chunk) => self.chunk(chunk, sink)?,
        }
        Ok(Some(bytes))
    }

    fn simple(&mut self, error: u32, cookie: u64, sink: &mut impl ReplySink) -> Result<(), ProtocolError> {
        let request = Self::lookup(cookie, sink)?;
        let is_read = request.command == Command::Read;
        if self.framing == Framing::Structured && is_read {
            return Err(violation("simple reply to a READ after structured replies were negotiated".into()));
        }
        if error != 0 {
            sink.event(Event::Error { cookie, code: error, message: "" });
            sink.event(Event::Done { cookie });
        } else if is_read && request.length > 0 {
            self.state = State::Data { cookie, at: 0, remaining: request.length, done: true };
        } else {
            sink.event(Event::Done { cookie });
        }
        Ok(())
    }

    fn chunk(&mut self, chunk: ChunkHeader, sink: &mut impl ReplySink) -> Result<(), ProtocolError> {
        let request = Self::lookup(chunk.cookie, sink)?;
        let done = chunk.flags & REPLY_FLAG_DONE != 0;
        if let Some(offset) = chunk.offset
            && offset != request.offset
        {
            return Err(violation(format!("extended reply echoes offset {offset}, request had {}", request.offset)));
        }
        let need = match chunk.kind {
            ChunkKind::None => {
                if chunk.payload_bytes != 0 || !done {
                    return Err(violation("NONE chunk with a payload or without DONE".into()));
                }
                sink.event(Event::Done { cookie: chunk.cookie });
                return Ok(());
            }
            ChunkKind::OffsetData => {
                Self::expect_command(&chunk, request, Command::Read)?;
                if chunk.payload_bytes <= DATA_PREFIX_BYTES as u64 {
                    return Err(violation(format!("OFFSET_DATA payload of {} bytes", chunk.payload_bytes)));
                }
                DATA_PREFIX_BYTES
            }
            ChunkKind::OffsetHole => {
                Self::expect_command(&chunk, request, Command::Read)?;
                HOLE_PAYLOAD_BYTES
            }
            ChunkKind::BlockStatus | ChunkKind::BlockStatusExt => {
                Self::expect_command(&chunk, request, Command::BlockStatus)?;
                let wanted =
                    if self.framing == Framing::Extended { ChunkKind::BlockStatusExt } else { ChunkKind::BlockStatus };
                if chunk.kind != wanted {
                    return Err(violation(format!("{:?} chunk with {}", chunk.kind, self.framing.name())));
                }
                codec::status_prefix_bytes(chunk.kind)
            }
            ChunkKind::Error | ChunkKind::ErrorOffset | ChunkKind::UnknownError(_) => {
                if chunk.payload_bytes > ERROR_PAYLOAD_BYTES_MAX as u64 {
                    return Err(violation(format!("error chunk of {} bytes", chunk.payload_bytes)));
                }
                chunk.payload_bytes as usize
            }
        };
        // The need is a prefix of the payload, or all of a bounded payload.
        if chunk.payload_bytes < need as u64 {
            return Err(violation(format!("{:?} chunk payload of {} bytes", chunk.kind, chunk.payload_bytes)));
        }
        self.state = State::Payload { chunk, request, need };
        Ok(())
    }

    fn expect_command(chunk: &ChunkHeader, request: RequestInfo, command: Command) -> Result<(), ProtocolError> {
        if request.command != command {
            return Err(violation(format!("{:?} chunk answering a {}", chunk.kind, request.command.name())));
        }
        Ok(())
    }

    /// Returns the payload bytes consumed (`None` while fewer than `need` arrived).
    fn payload(
        &mut self,
        input: &[u8],
        chunk: ChunkHeader,
        request: RequestInfo,
        need: usize,
        sink: &mut impl ReplySink,
    ) -> Result<Option<usize>, ProtocolError> {
        if input.len() < need {
            return Ok(None);
        }
        let cookie = chunk.cookie;
        let done = chunk.flags & REPLY_FLAG_DONE != 0;
        let request_end = request.offset + request.length;
        self.state = State::Header;
        match chunk.kind {
            ChunkKind::OffsetData => {
                let offset = u64::from_be_bytes(input[..8].try_into().expect("8 bytes"));
                let length = chunk.payload_bytes - DATA_PREFIX_BYTES as u64;
                Self::check_inside(offset, length, request, "OFFSET_DATA")?;
                self.state = State::Data { cookie, at: offset - request.offset, remaining: length, done };
            }
            ChunkKind::OffsetHole => {
                let (offset, size) = codec::decode_hole(&input[..need])?;
                Self::check_inside(offset, u64::from(size), request, "OFFSET_HOLE")?;
                sink.event(Event::Hole { cookie, at: offset - request.offset, length: u64::from(size) });
                if done {
                    sink.event(Event::Done { cookie });
                }
            }
            ChunkKind::BlockStatus | ChunkKind::BlockStatusExt => {
                let (context, count) = codec::decode_status_prefix(chunk.kind, chunk.payload_bytes, &input[..need])?;
                if Some(context) != self.context_id {
                    return Err(violation(format!(
                        "block status for context {context}, negotiated {:?}",
                        self.context_id
                    )));
                }
                self.state = State::Extents {
                    cookie,
                    kind: chunk.kind,
                    remaining: count,
                    next_offset: request.offset,
                    end: request_end,
                    first: true,
                    done,
                };
            }
            ChunkKind::Error | ChunkKind::ErrorOffset | ChunkKind::UnknownError(_) => {
                let error = codec::decode_error(chunk.kind, &input[..need])?;
                if let Some(offset) = error.offset {
                    Self::check_inside(offset, 1, request, "ERROR_OFFSET")?;
                }
                sink.event(Event::Error { cookie, code: error.code, message: error.message });
                if done {
                    sink.event(Event::Done { cookie });
                }
            }
            ChunkKind::None => unreachable!("NONE has no payload state"),
        }
        Ok(Some(need))
    }

    /// `[offset, offset + length)` must lie inside the request.
    fn check_inside(offset: u64, length: u64, request: RequestInfo, what: &str) -> Result<(), ProtocolError> {
        let end = offset.checked_add(length);
        let inside = offset >= request.offset && end.is_some_and(|end| end <= request.offset + request.length);
        if !inside {
            return Err(violation(format!(
                "{what} [{offset}, +{length}) outside the request [{}, +{})",
                request.offset, request.length
            )));
        }
        Ok(())
    }

    /// Consumes whole descriptors; returns the bytes used (`None` if not
    /// even one descriptor is complete).
    fn extents(&mut self, input: &[u8], sink: &mut impl ReplySink) -> Result<Option<usize>, ProtocolError> {
        let State::Extents { cookie, kind, mut remaining, mut next_offset, end, mut first, done } = self.state else {
            unreachable!("called in the extents state");
        };
        let each = codec::descriptor_bytes(kind);
        let mut used = 0;
        while remaining > 0 && input.len() - used >= each {
            let (length, status) = codec::decode_descriptor(kind, &input[used..used + each])?;
            // Only the last descriptor may reach or pass the request's end.
            if next_offset >= end {
                return Err(violation(format!("block status descriptor past the request end {end}")));
            }
            let clamped = length.min(end - next_offset);
            sink.event(Event::Extent { cookie, first, offset: next_offset, length: clamped, status });
            next_offset += clamped;
            first = false;
            remaining -= 1;
            used += each;
        }
        if remaining > 0 {
            self.state = State::Extents { cookie, kind, remaining, next_offset, end, first, done };
        } else {
            self.state = State::Header;
            if done {
                sink.event(Event::Done { cookie });
            }
        }
        Ok((used > 0).then_some(used))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::proto::wire::{
        CHUNK_BLOCK_STATUS, CHUNK_BLOCK_STATUS_EXT, CHUNK_ERROR, CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE,
    };

    use super::super::codec::tests::{chunk, error_payload, simple, status_payload};
    use super::*;

    /// Owned copy of an event, merged per cookie so split points don't matter.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Data(u64, u64, Vec<u8>),
        Hole(u64, u64, u64),
        Extent(u64, bool, u64, u64, u64),
        Error(u64, u32, String),
        Done(u64),
    }

    #[derive(Default)]
    struct Recorder {
        requests: HashMap<u64, RequestInfo>,
        seen: Vec<Seen>,
    }

    impl ReplySink for Recorder {
        fn request(&self, cookie: u64) -> Option<RequestInfo> {
            self.requests.get(&cookie).copied()
        }
        fn event(&mut self, event: Event<'_>) {
            let seen = match event {
                Event::Data { cookie, at, bytes } => {
                    // Coalesce streamed pieces so the split points don't matter.
                    if let Some(Seen::Data(c, a, data)) = self.seen.last_mut()
                        && *c == cookie
                        && *a + data.len() as u64 == at
                    {
                        data.extend_from_slice(bytes);
                        return;
                    }
                    Seen::Data(cookie, at, bytes.to_vec())
                }
                Event::DataLanded { cookie, at, length } => Seen::Data(cookie, at, vec![0xdd; length as usize]),
                Event::Hole { cookie, at, length } => Seen::Hole(cookie, at, length),
                Event::Extent { cookie, first, offset, length, status } => {
                    Seen::Extent(cookie, first, offset, length, status)
                }
                Event::Error { cookie, code, message } => Seen::Error(cookie, code, message.to_string()),
                Event::Done { cookie } => Seen::Done(cookie),
            };
            self.seen.push(seen);
        }
    }

    fn recorder(requests: &[(u64, Command, u64, u64)]) -> Recorder {
        let mut r = Recorder::default();
        for &(cookie, command, offset, length) in requests {
            r.requests.insert(cookie, RequestInfo { command, offset, length });
        }
        r
    }

    /// Feeds `stream` in pieces of `step` bytes, like a socket would.
    fn feed(parser: &mut ReplyParser, stream: &[u8], step: usize, sink: &mut Recorder) -> Result<(), ProtocolError> {
        let mut pending = Vec::new();
        for piece in stream.chunks(step) {
            pending.extend_from_slice(piece);
            let used = parser.parse(&pending, sink)?;
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "{} bytes left unparsed", pending.len());
        Ok(())
    }

    /// Parses the stream at every split size and checks the events agree.
    fn parse_all_ways(
        framing: Framing,
        context: Option<u32>,
        requests: &[(u64, Command, u64, u64)],
        stream: &[u8],
    ) -> Vec<Seen> {
        let mut reference = None;
        for step in [1, 2, 3, 7, 16, 33, stream.len()] {
            let mut sink = recorder(requests);
            let mut parser = ReplyParser::new(framing, context);
            feed(&mut parser, stream, step, &mut sink).unwrap();
            assert!(parser.at_boundary());
            match &reference {
                None => reference = Some(sink.seen),
                Some(r) => assert_eq!(&sink.seen, r, "split every {step} bytes"),
            }
        }
        reference.unwrap()
    }

    fn parse_err(framing: Framing, requests: &[(u64, Command, u64, u64)], stream: &[u8]) -> ProtocolError {
        let mut sink = recorder(requests);
        let mut parser = ReplyParser::new(framing, Some(1));
        feed(&mut parser, stream, stream.len(), &mut sink).unwrap_err()
    }

    #[test]
    fn simple_read_write_and_error() {
        let mut stream = simple(0, 1);
        stream.extend_from_slice(&[7; 8]);
        stream.extend(simple(0, 2));
        stream.extend(simple(5, 3));
        let requests = [(1, Command::Read, 0, 8), (2, Command::Write, 0, 8), (3, Command::Read, 8, 8)];
        let seen = parse_all_ways(Framing::Simple, None, &requests, &stream);
        assert_eq!(
            seen,
            vec![
                Seen::Data(1, 0, vec![7; 8]),
                Seen::Done(1),
                Seen::Done(2),
                Seen::Error(3, 5, String::new()),
                Seen::Done(3)
            ]
        );
    }

    #[test]
    fn structured_read_with_data_hole_and_none() {
        let s = Framing::Structured;
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[9; 512]);
        let mut hole = 4608u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        let mut stream = chunk(s, 0, CHUNK_OFFSET_DATA, 1, 0, &data);
        stream.extend(chunk(s, 0, CHUNK_OFFSET_HOLE, 1, 0, &hole));
        stream.extend(chunk(s, 1, CHUNK_NONE, 1, 0, &[]));
        // A structured-mode WRITE may get a simple reply.
        stream.extend(simple(0, 2));
        let requests = [(1, Command::Read, 4096, 1024), (2, Command::Write, 0, 512)];
        let seen = parse_all_ways(s, None, &requests, &stream);
        assert_eq!(seen, vec![Seen::Data(1, 0, vec![9; 512]), Seen::Hole(1, 512, 512), Seen::Done(1), Seen::Done(2)]);
    }

    #[test]
    fn extended_error_chunk_and_data_done() {
        let e = Framing::Extended;
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[1, 2, 3]);
        let mut stream = chunk(e, 1, CHUNK_OFFSET_DATA, 4, 0, &data);
        stream.extend(chunk(e, 1, CHUNK_ERROR, 5, 512, &error_payload(28, "no space")));
        let requests = [(4, Command::Read, 0, 3), (5, Command::Write, 512, 512)];
        let seen = parse_all_ways(e, None, &requests, &stream);
        assert_eq!(
            seen,
            vec![Seen::Data(4, 0, vec![1, 2, 3]), Seen::Done(4), Seen::Error(5, 28, "no space".into()), Seen::Done(5)]
        );
    }

    #[test]
    fn block_status_compact_clamps_the_last_descriptor() {
        let s = Framing::Structured;
        let payload = status_payload(false, 1, &[(4096, 0), (1 << 20, 3)]);
        let stream = chunk(s, 1, CHUNK_BLOCK_STATUS, 9, 0, &payload);
        let requests = [(9, Command::BlockStatus, 8192, 65536)];
        let seen = parse_all_ways(s, Some(1), &requests, &stream);
        assert_eq!(
            seen,
            vec![Seen::Extent(9, true, 8192, 4096, 0), Seen::Extent(9, false, 12288, 61440, 3), Seen::Done(9)]
        );
    }

    #[test]
    fn block_status_ext_covers_more_than_4_gib() {
        let e = Framing::Extended;
        let payload = status_payload(true, 7, &[(5 << 30, 2), (3 << 30, 0)]);
        let stream = chunk(e, 1, CHUNK_BLOCK_STATUS_EXT, 2, 0, &payload);
        let requests = [(2, Command::BlockStatus, 0, 8 << 30)];
        let seen = parse_all_ways(e, Some(7), &requests, &stream);
        assert_eq!(
            seen,
            vec![Seen::Extent(2, true, 0, 5 << 30, 2), Seen::Extent(2, false, 5 << 30, 3 << 30, 0), Seen::Done(2)]
        );
    }

    #[test]
    fn violations_are_reported() {
        let s = Framing::Structured;
        let read = [(1, Command::Read, 0, 512)];
        // Simple reply to a structured READ.
        assert!(matches!(parse_err(s, &read, &simple(0, 1)), ProtocolError::Violation(_)));
        // Unknown cookie.
        assert_eq!(parse_err(s, &read, &simple(0, 2)), ProtocolError::UnknownCookie(2));
        // Data outside the request.
        let mut data = 256u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[0; 512]);
        assert!(matches!(
            parse_err(s, &read, &chunk(s, 1, CHUNK_OFFSET_DATA, 1, 0, &data)),
            ProtocolError::Violation(_)
        ));
        // NONE without DONE.
        assert!(matches!(parse_err(s, &read, &chunk(s, 0, CHUNK_NONE, 1, 0, &[])), ProtocolError::Violation(_)));
        // Unknown non-error chunk type.
        assert_eq!(parse_err(s, &read, &chunk(s, 1, 3, 1, 0, &[])), ProtocolError::UnknownChunk(3));
        // Compact block status with extended headers, and the reverse.
        let status = [(1, Command::BlockStatus, 0, 4096)];
        let compact = chunk(Framing::Extended, 1, CHUNK_BLOCK_STATUS, 1, 0, &status_payload(false, 1, &[(4096, 0)]));
        assert!(matches!(parse_err(Framing::Extended, &status, &compact), ProtocolError::Violation(_)));
        let ext = chunk(s, 1, CHUNK_BLOCK_STATUS_EXT, 1, 0, &status_payload(true, 1, &[(4096, 0)]));
        assert!(matches!(parse_err(s, &status, &ext), ProtocolError::Violation(_)));
        // A descriptor after the request was already covered.
        let past = chunk(s, 1, CHUNK_BLOCK_STATUS, 1, 0, &status_payload(false, 1, &[(4096, 0), (512, 1)]));
        assert!(matches!(parse_err(s, &status, &past), ProtocolError::Violation(_)));
        // Wrong context ID.
        let other = chunk(s, 1, CHUNK_BLOCK_STATUS, 1, 0, &status_payload(false, 2, &[(4096, 0)]));
        assert!(matches!(parse_err(s, &status, &other), ProtocolError::Violation(_)));
        // Extended header echoing the wrong offset.
        let wrong = chunk(Framing::Extended, 1, CHUNK_NONE, 1, 512, &[]);
        assert!(matches!(parse_err(Framing::Extended, &read, &wrong), ProtocolError::Violation(_)));
        // Bad magic.
        assert!(matches!(parse_err(s, &read, &[0xde, 0xad, 0xbe, 0xef]), ProtocolError::BadMagic(..)));
    }

    #[test]
    fn pending_data_can_land_directly() {
        let mut stream = simple(0, 1);
        stream.extend_from_slice(&[5; 4]);
        let mut sink = recorder(&[(1, Command::Read, 0, 1000)]);
        let mut parser = ReplyParser::new(Framing::Simple, None);
        assert_eq!(parser.parse(&stream, &mut sink).unwrap(), stream.len());
        assert_eq!(parser.pending_data(), Some((1, 4, 996)));
        parser.data_landed(900, &mut sink);
        assert_eq!(parser.pending_data(), Some((1, 904, 96)));
        parser.data_landed(96, &mut sink);
        assert!(parser.at_boundary());
        assert_eq!(sink.seen.last(), Some(&Seen::Done(1)));
        assert_eq!(sink.seen.len(), 4, "data, landed, landed, done: {:?}", sink.seen);
    }
}
