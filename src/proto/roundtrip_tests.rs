//! Property tests: the server's decoders read what the client encodes, the
//! client's decoders read what the server encodes, and the two handshake
//! machines always agree (`decode(encode(x)) == x` across the crate).

use proptest::prelude::*;

use super::client::codec::{self, ChunkKind, Framing, ReplyHeader};
use super::client::handshake::{ClientHandshake, HandshakeConfig, Progress as ClientProgress};
use super::handshake::{BlockSize, ExportInfo, Handshake, HandshakeLimits, Progress, Want};
use super::meta::parse_meta_request;
use super::reply::{self, ReplyTo};
use super::transmission::{ReplyMode, decode_request};
use super::wire::*;

fn framing(mode: ReplyMode) -> Framing {
    match mode {
        ReplyMode::Simple => Framing::Simple,
        ReplyMode::Structured => Framing::Structured,
        ReplyMode::Extended => Framing::Extended,
    }
}

fn mode() -> impl Strategy<Value = ReplyMode> {
    prop_oneof![Just(ReplyMode::Simple), Just(ReplyMode::Structured), Just(ReplyMode::Extended)]
}

fn command() -> impl Strategy<Value = codec::Command> {
    prop_oneof![
        Just(codec::Command::Read),
        Just(codec::Command::Write),
        Just(codec::Command::BlockStatus),
        Just(codec::Command::Disconnect)
    ]
}

/// The header the client writes is the header the server reads.
fn request_roundtrip(mode: ReplyMode, command: codec::Command, flags: u16, cookie: u64, offset: u64, length: u64) {
    let length = if mode == ReplyMode::Extended { length } else { length & u64::from(u32::MAX) };
    let request = codec::Request { command, flags, cookie, offset, length };
    let mut bytes = [0u8; codec::REQUEST_BYTES_MAX];
    let used = codec::encode_request(&request, framing(mode), &mut bytes).expect("encodable");
    assert_eq!(used, mode.request_header_bytes());
    let header = decode_request(&bytes[..used], mode).expect("server decodes the client's header");
    let expected_flags = if mode == ReplyMode::Extended && command == codec::Command::Write {
        flags | CMD_FLAG_PAYLOAD_LEN
    } else {
        flags
    };
    assert_eq!(
        (header.kind, header.flags, header.cookie, header.offset, header.length),
        (command.code(), expected_flags, cookie, offset, length)
    );
}

/// Decodes one reply header the server wrote; returns it and the payload.
fn client_reads(bytes: &[u8], mode: ReplyMode) -> (ReplyHeader, &[u8]) {
    let framing = framing(mode);
    let header_bytes = codec::reply_header_bytes(bytes[..4].try_into().unwrap(), framing).expect("known magic");
    let header = codec::decode_reply_header(&bytes[..header_bytes], framing).expect("decodes");
    (header, &bytes[header_bytes..])
}

fn chunk(header: ReplyHeader) -> codec::ChunkHeader {
    match header {
        ReplyHeader::Chunk(c) => c,
        ReplyHeader::Simple { .. } => panic!("expected a chunk"),
    }
}

proptest! {
    #[test]
    fn request_headers_round_trip(mode in mode(), command in command(), flags: u16, cookie: u64, offset: u64, length: u64) {
        request_roundtrip(mode, command, flags, cookie, offset, length);
    }

    #[test]
    fn error_replies_round_trip(mode in mode(), cookie: u64, offset: u64, code in 1u32.., message in "[ -~]{0,200}") {
        let to = ReplyTo { mode, cookie, offset };
        let mut out = [0u8; reply::REPLY_HEADER_BYTES_MAX];
        let n = reply::error(&mut out, to, code, &message);
        let (header, payload) = client_reads(&out[..n], mode);
        match header {
            ReplyHeader::Simple { error, cookie: c } => {
                prop_assert_eq!((error, c), (code, cookie));
                prop_assert_eq!(mode, ReplyMode::Simple);
            }
            ReplyHeader::Chunk(c) => {
                prop_assert_eq!(c.kind, ChunkKind::Error);
                prop_assert_eq!(c.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
                prop_assert_eq!(c.payload_bytes as usize, payload.len());
                prop_assert_eq!(c.offset, (mode == ReplyMode::Extended).then_some(offset));
                let e = codec::decode_error(c.kind, payload).expect("error payload decodes");
                prop_assert_eq!(e.code, code);
                // Long messages are truncated to fit the header array, never garbled.
                prop_assert!(message.starts_with(e.message));
            }
        }
    }

    #[test]
    fn read_chunks_round_trip(cookie: u64, at: u64, len in 1u32..=(1 << 25), done: bool, extended: bool) {
        let mode = if extended { ReplyMode::Extended } else { ReplyMode::Structured };
        let to = ReplyTo { mode, cookie, offset: at };
        let mut out = [0u8; reply::REPLY_HEADER_BYTES_MAX];
        let n = reply::data_chunk(&mut out, to, at, len, done);
        let (header, prefix) = client_reads(&out[..n], mode);
        let c = chunk(header);
        prop_assert_eq!((c.kind, c.cookie, c.payload_bytes), (ChunkKind::OffsetData, cookie, 8 + u64::from(len)));
        prop_assert_eq!(u64::from_be_bytes(prefix.try_into().unwrap()), at);
        prop_assert_eq!(c.flags & REPLY_FLAG_DONE != 0, done);
        let n = reply::hole_chunk(&mut out, to, at, len, done);
        let (header, payload) = client_reads(&out[..n], mode);
        prop_assert_eq!(chunk(header).kind, ChunkKind::OffsetHole);
        prop_assert_eq!(codec::decode_hole(payload).unwrap(), (at, len));
    }

    #[test]
    fn block_status_round_trips(
        extended: bool,
        cookie: u64,
        context: u32,
        extents in proptest::collection::vec((1u64..=u64::from(u32::MAX), 0u32..4), 1..40),
    ) {
        let mode = if extended { ReplyMode::Extended } else { ReplyMode::Structured };
        let to = ReplyTo { mode, cookie, offset: 0 };
        let mut out = vec![0u8; 64 + extents.len() * 16];
        let mut n = reply::block_status(&mut out, to, context, extents.len() as u32, true);
        for &(length, status) in &extents {
            n += reply::descriptor(&mut out[n..], mode, length, status);
        }
        let (header, payload) = client_reads(&out[..n], mode);
        let c = chunk(header);
        let prefix_bytes = codec::status_prefix_bytes(c.kind);
        let (id, count) = codec::decode_status_prefix(c.kind, c.payload_bytes, &payload[..prefix_bytes]).unwrap();
        prop_assert_eq!((id, count as usize), (context, extents.len()));
        let each = codec::descriptor_bytes(c.kind);
        for (i, &(length, status)) in extents.iter().enumerate() {
            let at = prefix_bytes + i * each;
            let got = codec::decode_descriptor(c.kind, &payload[at..at + each]).unwrap();
            prop_assert_eq!(got, (length, u64::from(status)));
        }
    }

    #[test]
    fn meta_requests_round_trip(export in "[a-z0-9/:]{0,40}", queries in proptest::collection::vec("[ -~]{0,60}", 0..20)) {
        let mut data = Vec::new();
        data.put_u32(export.len() as u32);
        data.extend_from_slice(export.as_bytes());
        data.put_u32(queries.len() as u32);
        for q in &queries {
            data.put_u32(q.len() as u32);
            data.extend_from_slice(q.as_bytes());
        }
        let parsed = parse_meta_request(&data).expect("well-formed request parses");
        prop_assert_eq!(parsed.export, export.as_str());
        prop_assert_eq!(parsed.queries, queries.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// The client and server machines, wired back to back, always finish:
    /// the client learns what the server says, in the framing it asked for
    /// or a fallback, or gets a clean refusal for an unknown export.
    #[test]
    fn client_and_server_handshakes_agree(
        framing_max in prop_oneof![Just(Framing::Simple), Just(Framing::Structured), Just(Framing::Extended)],
        base_allocation: bool,
        known: bool,
        size in 1u64..(1 << 50),
    ) {
        let exports = vec![ExportInfo {
            name: "disk".into(),
            description: "d".into(),
            size,
            flags: TF_HAS_FLAGS | TF_SEND_FLUSH,
            block_size: BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 },
            contexts: vec!["base:allocation".to_owned()],
            tls_only: false,
        }];
        let base_allocation = base_allocation && framing_max != Framing::Simple;
        let export = if known { "disk" } else { "nope" }.to_owned();
        let mut client = ClientHandshake::new(HandshakeConfig { export, framing_max, base_allocation, starttls: false });
        let mut server = Handshake::new(&exports, HandshakeLimits::default());
        let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
        server.greeting(&mut to_client);
        let mut server_done = None;
        for _ in 0..64 {
            while !to_client.is_empty() && client.want() > 0 && to_client.len() >= client.want() {
                let chunk: Vec<u8> = to_client.drain(..client.want()).collect();
                match client.feed(&chunk, &mut to_server) {
                    Ok(ClientProgress::Continue) => {}
                    Ok(ClientProgress::StartTls) => prop_assert!(false, "STARTTLS was not asked for"),
                    Ok(ClientProgress::Done(session)) => {
                        prop_assert!(known, "GO on an unknown export cannot succeed");
                        prop_assert_eq!(session.size, size);
                        let negotiated: &super::handshake::Negotiated = server_done.as_ref().expect("server finished");
                        prop_assert_eq!(framing(negotiated.reply_mode), session.framing);
                        prop_assert_eq!(session.context_id.is_some(), base_allocation);
                        return Ok(());
                    }
                    Err(e) => {
                        prop_assert!(!known, "a known export negotiates: {e}");
                        return Ok(());
                    }
                }
            }
            while let Want::Bytes(n) = server.want() {
                if n == 0 || to_server.len() < n {
                    break;
                }
                let chunk: Vec<u8> = to_server.drain(..n).collect();
                if let Progress::Ready(n) = server.feed(&chunk, &mut to_client).expect("client speaks correctly") {
                    server_done = Some(n);
                }
            }
        }
        prop_assert!(false, "negotiation did not finish");
    }
}
