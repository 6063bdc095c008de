//! Every reply encoder of the server, checked by the client's streaming
//! reply parser: the fuzz input chooses a sequence of replies (reads with
//! data and hole chunks, errors, plain successes, block status), the server
//! encodes them, the bytes reach the parser in arbitrary pieces, and what
//! the parser reports must be exactly what was encoded. A second pass feeds
//! the raw input to the parser, which must fail cleanly, never panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use ringnbd::proto::client::codec::{Command, Framing};
use ringnbd::proto::client::replies::{Event, ReplyParser, ReplySink, RequestInfo};
use ringnbd::proto::reply::{self, REPLY_HEADER_BYTES_MAX, ReplyTo};
use ringnbd::proto::transmission::ReplyMode;

const CONTEXT: u32 = 3;

/// What the client should see for one cookie.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    data: Vec<u8>,
    extents: Vec<(u64, u64, u64)>,
    error: Option<u32>,
    done: bool,
}

struct Sink {
    requests: HashMap<u64, RequestInfo>,
    seen: HashMap<u64, Seen>,
}

impl ReplySink for Sink {
    fn request(&self, cookie: u64) -> Option<RequestInfo> {
        self.requests.get(&cookie).copied()
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Data { cookie, at, bytes } => {
                let seen = self.seen.entry(cookie).or_default();
                let end = at as usize + bytes.len();
                if seen.data.len() < end {
                    seen.data.resize(end, 0xee);
                }
                seen.data[at as usize..end].copy_from_slice(bytes);
            }
            Event::DataLanded { .. } => unreachable!("this sink never receives data directly"),
            Event::Hole { cookie, at, length } => {
                let seen = self.seen.entry(cookie).or_default();
                let end = (at + length) as usize;
                if seen.data.len() < end {
                    seen.data.resize(end, 0xee);
                }
                seen.data[at as usize..end].fill(0);
            }
            Event::Extent { cookie, offset, length, status, .. } => {
                self.seen.entry(cookie).or_default().extents.push((offset, length, status));
            }
            Event::Error { cookie, code, .. } => self.seen.entry(cookie).or_default().error = Some(code),
            Event::Done { cookie } => {
                let seen = self.seen.entry(cookie).or_default();
                assert!(!seen.done, "two Done events for cookie {cookie}");
                seen.done = true;
            }
        }
    }
}

/// A tiny deterministic byte source over the fuzz input.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let mode = match input.u8() % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let framing = match mode {
        ReplyMode::Simple => Framing::Simple,
        ReplyMode::Structured => Framing::Structured,
        ReplyMode::Extended => Framing::Extended,
    };
    let mut wire = Vec::new();
    let mut sink = Sink { requests: HashMap::new(), seen: HashMap::new() };
    let mut expected: HashMap<u64, Seen> = HashMap::new();
    for cookie in 0..u64::from(input.u8() % 16) {
        let offset = u64::from(input.u32()) * 512;
        let to = ReplyTo { mode, cookie, offset };
        let mut header = [0u8; REPLY_HEADER_BYTES_MAX];
        let kind = input.u8() % 4;
        match kind {
            // A READ: in structured modes one data chunk and one hole chunk.
            0 => {
                let length = 1 + u64::from(input.u8()) * 37;
                sink.requests.insert(cookie, RequestInfo { command: Command::Read, offset, length });
                let bytes: Vec<u8> = (0..length).map(|i| (i as u8).wrapping_mul(31) | 1).collect();
                let split = u64::from(input.u8()) * length / 256;
                if mode == ReplyMode::Simple {
                    let n = reply::simple(&mut header, cookie, 0);
                    wire.extend_from_slice(&header[..n]);
                    wire.extend_from_slice(&bytes);
                    expected.insert(cookie, Seen { data: bytes, done: true, ..Seen::default() });
                    continue;
                }
                let mut model = bytes.clone();
                let hole = length - split;
                let n = reply::data_chunk(&mut header, to, offset, split as u32, false);
                if split > 0 {
                    wire.extend_from_slice(&header[..n]);
                    wire.extend_from_slice(&bytes[..split as usize]);
                }
                let n = reply::hole_chunk(&mut header, to, offset + split, hole as u32, true);
                wire.extend_from_slice(&header[..n]);
                model[split as usize..].fill(0);
                expected.insert(cookie, Seen { data: model, done: true, ..Seen::default() });
            }
            1 => {
                let code = 1 + u32::from(input.u8());
                sink.requests.insert(cookie, RequestInfo { command: Command::Write, offset, length: 512 });
                let n = reply::error(&mut header, to, code, "fuzzed failure");
                wire.extend_from_slice(&header[..n]);
                expected.insert(cookie, Seen { error: Some(code), done: true, ..Seen::default() });
            }
            2 => {
                sink.requests.insert(cookie, RequestInfo { command: Command::Write, offset, length: 512 });
                let n = reply::success(&mut header, to, false);
                wire.extend_from_slice(&header[..n]);
                expected.insert(cookie, Seen { done: true, ..Seen::default() });
            }
            _ if mode == ReplyMode::Simple => {}
            _ => {
                let count = 1 + usize::from(input.u8() % 20);
                let extents: Vec<(u64, u32)> =
                    (0..count).map(|_| (1 + u64::from(input.u8()) * 512, u32::from(input.u8() % 4))).collect();
                let length: u64 = extents.iter().map(|e| e.0).sum();
                sink.requests.insert(cookie, RequestInfo { command: Command::BlockStatus, offset, length });
                let n = reply::block_status(&mut header, to, CONTEXT, count as u32, true);
                wire.extend_from_slice(&header[..n]);
                let mut at = offset;
                let mut seen = Vec::new();
                for &(len, status) in &extents {
                    let mut d = [0u8; 16];
                    let n = reply::descriptor(&mut d, mode, len, status);
                    wire.extend_from_slice(&d[..n]);
                    seen.push((at, len, u64::from(status)));
                    at += len;
                }
                expected.insert(cookie, Seen { extents: seen, done: true, ..Seen::default() });
            }
        }
    }
    // Feed the encoded stream in pieces the input chooses.
    let mut parser = ReplyParser::new(framing, Some(CONTEXT));
    let (mut fed, mut pending) = (0, Vec::new());
    while fed < wire.len() || !pending.is_empty() {
        let piece = (1 + usize::from(input.u8()) * 97).min(wire.len() - fed);
        pending.extend_from_slice(&wire[fed..fed + piece]);
        fed += piece;
        let used = parser.parse(&pending, &mut sink).expect("the client parses what the server encodes");
        pending.drain(..used);
        if piece == 0 && used == 0 {
            break;
        }
    }
    assert!(pending.is_empty(), "{} bytes left unparsed", pending.len());
    assert_eq!(sink.seen, expected);

    // Raw input straight into the parser: errors are fine, panics are not.
    let mut parser = ReplyParser::new(framing, Some(CONTEXT));
    let mut garbage = Sink { requests: sink.requests, seen: HashMap::new() };
    let _ = parser.parse(data, &mut garbage);
});
