//! Request decoding and validation under fuzzed limits: never a panic, and
//! whatever is accepted respects the bounds it was validated against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringnbd::proto::transmission::{
    Command, ReplyMode, RequestLimits, Verdict, decode_request, parse_status_payload, validate,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (knobs, rest) = data.split_at(16);
    let mode = match knobs[0] % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let export_bytes = u64::from_be_bytes(knobs[1..9].try_into().unwrap()) >> (knobs[9] % 64);
    let limits = RequestLimits {
        export_bytes,
        flags: u16::from_be_bytes([knobs[10], knobs[11]]),
        reply_mode: mode,
        alignment_bytes: 1 << (knobs[12] % 17),
        payload_bytes_max: (1 << 20) << (knobs[13] % 6),
        has_contexts: knobs[14] & 1 != 0,
    };
    let header_bytes = mode.request_header_bytes();
    if rest.len() < header_bytes {
        return;
    }
    let (header, payload) = rest.split_at(header_bytes);
    let Ok(header) = decode_request(header, mode) else { return };
    let Ok(verdict) = validate(&header, &limits) else { return };
    let within = |offset: u64, length: u64| offset.checked_add(length).is_some_and(|end| end <= export_bytes);
    match verdict {
        Verdict::Run(Command::Read { offset, length, .. } | Command::Write { offset, length, .. }) => {
            assert!(within(offset, u64::from(length)), "accepted a transfer past the end");
            assert!(length > 0 && length <= limits.payload_bytes_max);
            let align = u64::from(limits.alignment_bytes);
            let end = offset + u64::from(length);
            assert!(offset % align == 0 && (end % align == 0 || end == export_bytes), "accepted unaligned");
        }
        Verdict::Run(Command::Trim { offset, length, .. } | Command::WriteZeroes { offset, length, .. }) => {
            assert!(within(offset, length) && length > 0);
        }
        Verdict::Run(Command::BlockStatus { offset, length, payload: 0, .. }) => {
            assert!(within(offset, length) && length > 0 && limits.has_contexts && mode != ReplyMode::Simple);
        }
        Verdict::Run(Command::BlockStatus { offset, payload: bytes, .. }) => {
            let selected = [1u32, 7];
            let take = (bytes as usize).min(payload.len());
            if let Ok((length, mask)) = parse_status_payload(&payload[..take], offset, export_bytes, &selected) {
                assert!(within(offset, length) && length > 0 && mask != 0 && mask < 4);
            }
        }
        Verdict::Reject { error, .. } => assert!(!error.message.is_empty(), "every rejection says why"),
        _ => {}
    }
});
