use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAYLOAD_MAX: u32 = 32 << 20;
/// Everything this layer can be told about, minus READ_ONLY and FAST_ZERO.
const FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_SEND_DF
    | TF_CAN_MULTI_CONN
    | TF_SEND_CACHE;

// --- helpers ------------------------------------------------------------------------

fn compact_bytes(magic: u32, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = vec![];
    v.put_u32(magic);
    v.put_u16(flags);
    v.put_u16(kind);
    v.put_u64(cookie);
    v.put_u64(offset);
    v.put_u32(length);
    v
}

fn extended_bytes(magic: u32, flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut v = vec![];
    v.put_u32(magic);
    v.put_u16(flags);
    v.put_u16(kind);
    v.put_u64(cookie);
    v.put_u64(offset);
    v.put_u64(length);
    v
}

/// A 1 MiB writable export on a structured-reply connection with contexts.
fn limits() -> RequestLimits {
    RequestLimits {
        export_bytes: MIB,
        flags: FLAGS,
        reply_mode: ReplyMode::Structured,
        alignment_bytes: 1,
        payload_bytes_max: PAYLOAD_MAX,
        has_contexts: true,
    }
}

fn with_mode(reply_mode: ReplyMode) -> RequestLimits {
    RequestLimits { reply_mode, ..limits() }
}

fn with_flags(flags: u16) -> RequestLimits {
    RequestLimits { flags, ..limits() }
}

fn read_only() -> RequestLimits {
    with_flags(FLAGS | TF_READ_ONLY)
}

fn header(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
    RequestHeader { flags, kind, cookie: 0xc0ff_ee00_dead_beef, offset, length }
}

/// Validates; rejections keep only their code so tables compare codes (each
/// reason is checked to be non-empty here).
fn check(kind: u16, flags: u16, offset: u64, length: u64, limits: &RequestLimits) -> Verdict {
    match validate(&header(kind, flags, offset, length), limits).expect("framing kept") {
        Verdict::Reject { error, payload } => {
            assert!(!error.message.is_empty(), "every rejection says why");
            reject(error.code, payload)
        }
        verdict => verdict,
    }
}

fn reject(code: NbdError, payload: u64) -> Verdict {
    Verdict::Reject { error: code.because(""), payload }
}

fn einval() -> Verdict {
    reject(NbdError::Inval, 0)
}

// --- decoding -----------------------------------------------------------------------

#[test]
fn header_sizes_follow_the_reply_mode() {
    assert_eq!(ReplyMode::Simple.request_header_bytes(), 28);
    assert_eq!(ReplyMode::Structured.request_header_bytes(), 28);
    assert_eq!(ReplyMode::Extended.request_header_bytes(), 32);
}

#[test]
fn decodes_the_compact_layout() {
    let bytes = [
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 1, 0, 0, 0x10, 0, // offset
        0x80, 0, 0x02, 0, // length (above 2 GiB: unsigned)
    ];
    for mode in [ReplyMode::Simple, ReplyMode::Structured] {
        let h = decode_request(&bytes, mode).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 0x1_0000_1000,
                length: 0x8000_0200,
            }
        );
    }
}

#[test]
fn fua_write_is_flags_one_type_one_not_an_unknown_u32_command() {
    let bytes = compact_bytes(REQUEST_MAGIC, CMD_FLAG_FUA, CMD_WRITE, 9, 0, 512);
    assert_eq!(&bytes[4..8], &0x0001_0001u32.to_be_bytes());
    let h = decode_request(&bytes, ReplyMode::Simple).unwrap();
    assert_eq!((h.flags, h.kind), (1, 1));
    let verdict = validate(&h, &with_mode(ReplyMode::Simple)).unwrap();
    assert_eq!(verdict, Verdict::Run(Command::Write { offset: 0, length: 512, fua: true }));
}

#[test]
fn decodes_the_extended_layout_with_a_64_bit_length() {
    let bytes = extended_bytes(EXTENDED_REQUEST_MAGIC, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 42, 4096, 5 * GIB);
    assert_eq!(bytes.len(), 32);
    assert_eq!(&bytes[..4], &[0x21, 0xe4, 0x1c, 0x71]);
    let h = decode_request(&bytes, ReplyMode::Extended).unwrap();
    assert_eq!(
        h,
        RequestHeader { flags: CMD_FLAG_REQ_ONE, kind: CMD_BLOCK_STATUS, cookie: 42, offset: 4096, length: 5 * GIB }
    );
}

#[test]
fn bad_magic_loses_framing() {
    for magic in [EXTENDED_REQUEST_MAGIC, 0x1256_0953, 0x2560_9514, 0] {
        let bytes = compact_bytes(magic, 0, CMD_READ, 1, 0, 512);
        assert_eq!(decode_request(&bytes, ReplyMode::Simple), Err(FramingError::BadMagic(magic)));
        assert_eq!(decode_request(&bytes, ReplyMode::Structured), Err(FramingError::BadMagic(magic)));
    }
    for magic in [REQUEST_MAGIC, 0] {
        let bytes = extended_bytes(magic, 0, CMD_READ, 1, 0, 512);
        assert_eq!(decode_request(&bytes, ReplyMode::Extended), Err(FramingError::BadMagic(magic)));
    }
}

// --- bounds -------------------------------------------------------------------------

#[test]
fn requests_within_the_export_run() {
    let l = limits();
    assert_eq!(check(CMD_READ, 0, 0, 4096, &l), Verdict::Run(Command::Read { offset: 0, length: 4096, df: false }));
    assert_eq!(
        check(CMD_READ, 0, MIB - 512, 512, &l),
        Verdict::Run(Command::Read { offset: MIB - 512, length: 512, df: false }),
        "ending exactly at the end"
    );
    assert_eq!(
        check(CMD_WRITE, 0, 512, 1024, &l),
        Verdict::Run(Command::Write { offset: 512, length: 1024, fua: false })
    );
    assert_eq!(check(CMD_TRIM, 0, 0, MIB, &l), Verdict::Run(Command::Trim { offset: 0, length: MIB, fua: false }));
    assert_eq!(check(CMD_CACHE, 0, 8, 8, &l), Verdict::Run(Command::Cache { offset: 8, length: 8 }));
    assert_eq!(
        check(CMD_WRITE_ZEROES, 0, 0, 4096, &l),
        Verdict::Run(Command::WriteZeroes { offset: 0, length: 4096, fua: false, no_hole: false, fast: false })
    );
    assert_eq!(
        check(CMD_BLOCK_STATUS, 0, 0, MIB, &l),
        Verdict::Run(Command::BlockStatus { offset: 0, length: MIB, req_one: false, payload: 0 })
    );
}

#[test]
fn read_trim_cache_and_block_status_past_the_end_are_einval() {
    let l = limits();
    for kind in [CMD_READ, CMD_TRIM, CMD_CACHE, CMD_BLOCK_STATUS] {
        assert_eq!(check(kind, 0, MIB - 511, 512, &l), einval(), "kind {kind}");
        assert_eq!(check(kind, 0, MIB, 1, &l), einval(), "kind {kind}");
        assert_eq!(check(kind, 0, u64::MAX, 1, &l), einval(), "kind {kind}");
    }
}

#[test]
fn offset_plus_length_overflow_is_rejected_without_panicking() {
    let l = limits();
    assert_eq!(check(CMD_READ, 0, u64::MAX - 10, 100, &l), einval());
    assert_eq!(check(CMD_WRITE, 0, u64::MAX - 10, 100, &l), reject(NbdError::NoSpc, 100));
    let x = with_mode(ReplyMode::Extended);
    for kind in [CMD_TRIM, CMD_BLOCK_STATUS, CMD_CACHE] {
        assert_eq!(check(kind, 0, 1, u64::MAX, &x), einval(), "kind {kind}");
    }
    assert_eq!(check(CMD_WRITE_ZEROES, 0, u64::MAX, u64::MAX, &x), reject(NbdError::NoSpc, 0));
    // With alignment on, the alignment check must not overflow either.
    let aligned = RequestLimits { alignment_bytes: 512, ..x };
    assert_eq!(check(CMD_TRIM, 0, u64::MAX - 511, 1024, &aligned), einval());
}

#[test]
fn write_past_the_end_is_enospc_and_drains_the_payload() {
    let l = limits();
    assert_eq!(check(CMD_WRITE, 0, MIB - 512, 1024, &l), reject(NbdError::NoSpc, 1024));
    assert_eq!(check(CMD_WRITE, CMD_FLAG_FUA, MIB, 1, &l), reject(NbdError::NoSpc, 1));
    assert_eq!(check(CMD_WRITE_ZEROES, 0, MIB - 512, 1024, &l), reject(NbdError::NoSpc, 0));
    let x = with_mode(ReplyMode::Extended);
    assert_eq!(check(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, MIB, 4096, &x), reject(NbdError::NoSpc, 4096));
}

// --- read-only exports ---------------------------------------------------------------

#[test]
fn writes_on_a_read_only_export_are_eperm() {
    let l = read_only();
    assert_eq!(check(CMD_WRITE, 0, 0, 4096, &l), reject(NbdError::Perm, 4096), "payload drained");
    assert_eq!(check(CMD_WRITE, CMD_FLAG_FUA, 0, 4096, &l), reject(NbdError::Perm, 4096));
    assert_eq!(check(CMD_TRIM, 0, 0, 4096, &l), reject(NbdError::Perm, 0));
    assert_eq!(check(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096, &l), reject(NbdError::Perm, 0));
    let x = RequestLimits { reply_mode: ReplyMode::Extended, ..l };
    assert_eq!(check(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 4096, &x), reject(NbdError::Perm, 4096));
}

#[test]
fn non_writes_on_a_read_only_export_run() {
    let l = read_only();
    assert!(matches!(check(CMD_READ, 0, 0, 4096, &l), Verdict::Run(Command::Read { .. })));
    assert!(matches!(check(CMD_CACHE, 0, 0, 4096, &l), Verdict::Run(Command::Cache { .. })));
    assert!(matches!(check(CMD_BLOCK_STATUS, 0, 0, 4096, &l), Verdict::Run(Command::BlockStatus { .. })));
    assert_eq!(check(CMD_FLUSH, 0, 0, 0, &l), Verdict::Run(Command::Flush));
    assert_eq!(check(CMD_DISC, 0, 0, 0, &l), Verdict::Run(Command::Disconnect));
}

#[test]
fn read_only_is_checked_before_bounds() {
    // EPERM for a write on a read-only export, wherever it points.
    let l = read_only();
    assert_eq!(check(CMD_WRITE, 0, MIB, 512, &l), reject(NbdError::Perm, 512));
    assert_eq!(check(CMD_WRITE_ZEROES, 0, u64::MAX, 512, &l), reject(NbdError::Perm, 0));
}

// --- commands and flags ---------------------------------------------------------------

#[test]
fn unknown_commands_are_einval_and_keep_the_connection() {
    for mode in [ReplyMode::Simple, ReplyMode::Structured] {
        let l = with_mode(mode);
        for kind in [8, 9, 99, u16::MAX] {
            // Compact headers: only WRITE carries a payload.
            assert_eq!(check(kind, 0, 0, 4096, &l), einval(), "kind {kind}");
        }
    }
    let x = with_mode(ReplyMode::Extended);
    assert_eq!(check(99, 0, 0, 4096, &x), einval());
    assert_eq!(check(99, CMD_FLAG_PAYLOAD_LEN, 0, 4096, &x), reject(NbdError::Inval, 4096));
}

#[test]
fn unknown_flag_bits_are_einval() {
    let l = limits();
    for flag in [1 << 6, 1 << 9, 1 << 15] {
        assert_eq!(check(CMD_READ, flag, 0, 512, &l), einval(), "flag {flag:#x}");
        assert_eq!(check(CMD_WRITE, flag, 0, 512, &l), reject(NbdError::Inval, 512), "write drains");
        assert_eq!(check(CMD_FLUSH, flag, 0, 0, &l), einval());
        assert_eq!(check(CMD_CACHE, flag, 0, 512, &l), einval());
    }
}

#[test]
fn flags_that_do_not_apply_to_the_command_are_einval() {
    let l = limits();
    assert_eq!(check(CMD_WRITE, CMD_FLAG_DF, 0, 512, &l), reject(NbdError::Inval, 512));
    assert_eq!(check(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512, &l), reject(NbdError::Inval, 512));
    assert_eq!(check(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512, &l), einval());
    assert_eq!(check(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512, &l), einval());
    assert_eq!(check(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 512, &l), einval());
    assert_eq!(check(CMD_BLOCK_STATUS, CMD_FLAG_DF, 0, 512, &l), einval());
    // PAYLOAD_LEN is only meaningful with extended headers.
    assert_eq!(check(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512, &l), reject(NbdError::Inval, 512));
}

#[test]
fn df_needs_send_df() {
    assert_eq!(check(CMD_READ, CMD_FLAG_DF, 0, 512, &with_flags(FLAGS & !TF_SEND_DF)), einval());
    assert_eq!(
        check(CMD_READ, CMD_FLAG_DF, 0, 512, &limits()),
        Verdict::Run(Command::Read { offset: 0, length: 512, df: true })
    );
}

#[test]
fn fast_zero_needs_send_fast_zero() {
    assert_eq!(check(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512, &limits()), einval());
    let l = with_flags(FLAGS | TF_SEND_FAST_ZERO);
    assert_eq!(
        check(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 512, &l),
        Verdict::Run(Command::WriteZeroes { offset: 0, length: 512, fua: true, no_hole: true, fast: true })
    );
}

#[test]
fn req_one_is_for_block_status() {
    assert_eq!(
        check(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512, &limits()),
        Verdict::Run(Command::BlockStatus { offset: 0, length: 512, req_one: true, payload: 0 })
    );
}

#[test]
fn fua_is_accepted_on_every_command_when_advertised() {
    let l = limits();
    assert_eq!(
        check(CMD_READ, CMD_FLAG_FUA, 0, 512, &l),
        Verdict::Run(Command::Read { offset: 0, length: 512, df: false })
    );
    assert_eq!(check(CMD_FLUSH, CMD_FLAG_FUA, 0, 0, &l), Verdict::Run(Command::Flush));
    assert_eq!(check(CMD_CACHE, CMD_FLAG_FUA, 0, 512, &l), Verdict::Run(Command::Cache { offset: 0, length: 512 }));
    assert_eq!(
        check(CMD_TRIM, CMD_FLAG_FUA, 0, 512, &l),
        Verdict::Run(Command::Trim { offset: 0, length: 512, fua: true })
    );
    assert!(matches!(check(CMD_BLOCK_STATUS, CMD_FLAG_FUA, 0, 512, &l), Verdict::Run(_)));
}

#[test]
fn fua_without_send_fua_is_einval() {
    let l = with_flags(FLAGS & !TF_SEND_FUA);
    assert_eq!(check(CMD_WRITE, CMD_FLAG_FUA, 0, 512, &l), reject(NbdError::Inval, 512));
    assert_eq!(check(CMD_READ, CMD_FLAG_FUA, 0, 512, &l), einval());
    assert_eq!(check(CMD_WRITE, 0, 0, 512, &l), Verdict::Run(Command::Write { offset: 0, length: 512, fua: false }));
}

#[test]
fn disc_and_flush_run() {
    for mode in [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended] {
        let l = with_mode(mode);
        assert_eq!(check(CMD_DISC, 0, 0, 0, &l), Verdict::Run(Command::Disconnect));
        assert_eq!(check(CMD_FLUSH, 0, 0, 0, &l), Verdict::Run(Command::Flush));
    }
}

#[test]
fn unadvertised_commands_are_einval() {
    assert_eq!(check(CMD_FLUSH, 0, 0, 0, &with_flags(FLAGS & !TF_SEND_FLUSH)), einval());
    assert_eq!(check(CMD_TRIM, 0, 0, 512, &with_flags(FLAGS & !TF_SEND_TRIM)), einval());
    assert_eq!(check(CMD_WRITE_ZEROES, 0, 0, 512, &with_flags(FLAGS & !TF_SEND_WRITE_ZEROES)), einval());
    // Unadvertised beats read-only: the command does not exist here.
    let ro_no_trim = with_flags((FLAGS | TF_READ_ONLY) & !TF_SEND_TRIM);
    assert_eq!(check(CMD_TRIM, 0, 0, 512, &ro_no_trim), einval());
}

#[test]
fn cache_is_tolerated_without_send_cache() {
    let l = with_flags(FLAGS & !TF_SEND_CACHE);
    assert_eq!(check(CMD_CACHE, 0, 0, 512, &l), Verdict::Run(Command::Cache { offset: 0, length: 512 }));
}

// --- BLOCK_STATUS and zero lengths ------------------------------------------------------

#[test]
fn block_status_needs_structured_replies_and_contexts() {
    assert_eq!(check(CMD_BLOCK_STATUS, 0, 0, 512, &with_mode(ReplyMode::Simple)), einval());
    let no_contexts = RequestLimits { has_contexts: false, ..limits() };
    assert_eq!(check(CMD_BLOCK_STATUS, 0, 0, 512, &no_contexts), einval());
    let x = RequestLimits { has_contexts: false, ..with_mode(ReplyMode::Extended) };
    assert_eq!(check(CMD_BLOCK_STATUS, 0, 0, 512, &x), einval());
    assert!(matches!(check(CMD_BLOCK_STATUS, 0, 0, 512, &with_mode(ReplyMode::Extended)), Verdict::Run(_)));
}

#[test]
fn zero_length_block_status_is_einval() {
    assert_eq!(check(CMD_BLOCK_STATUS, 0, 0, 0, &limits()), einval());
    assert_eq!(check(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 512, 0, &with_mode(ReplyMode::Extended)), einval());
}

#[test]
fn zero_length_data_commands_are_empty() {
    for mode in [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended] {
        let l = with_mode(mode);
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            assert_eq!(check(kind, 0, 4096, 0, &l), Verdict::Empty { payload: 0 }, "kind {kind} in {mode:?}");
            assert_eq!(check(kind, 0, MIB, 0, &l), Verdict::Empty { payload: 0 }, "at the very end");
        }
        let write_flags = if mode == ReplyMode::Extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
        assert_eq!(check(CMD_WRITE, write_flags, 0, 0, &l), Verdict::Empty { payload: 0 });
    }
}

// --- alignment and payload limits ----------------------------------------------------

#[test]
fn misaligned_requests_are_einval_for_clients_bound_by_block_size() {
    let l = RequestLimits { alignment_bytes: 512, ..limits() };
    assert!(matches!(check(CMD_READ, 0, 512, 1024, &l), Verdict::Run(_)));
    assert_eq!(check(CMD_READ, 0, 1, 512, &l), einval(), "unaligned offset");
    assert_eq!(check(CMD_READ, 0, 512, 100, &l), einval(), "unaligned end");
    assert_eq!(check(CMD_WRITE, 0, 1, 512, &l), reject(NbdError::Inval, 512), "write drains");
    assert_eq!(check(CMD_TRIM, 0, 0, 100, &l), einval());
    assert_eq!(check(CMD_WRITE_ZEROES, 0, 256, 512, &l), einval());
    assert_eq!(check(CMD_BLOCK_STATUS, 0, 0, 1, &l), einval());
}

#[test]
fn the_unaligned_tail_of_the_export_is_reachable() {
    let l = RequestLimits { alignment_bytes: 512, export_bytes: MIB + 100, ..limits() };
    assert_eq!(check(CMD_READ, 0, MIB, 100, &l), Verdict::Run(Command::Read { offset: MIB, length: 100, df: false }));
    assert!(matches!(check(CMD_WRITE, 0, MIB - 512, 612, &l), Verdict::Run(Command::Write { length: 612, .. })));
    assert_eq!(check(CMD_READ, 0, MIB, 50, &l), einval(), "short of the end is still unaligned");
    assert_eq!(check(CMD_READ, 0, MIB + 50, 50, &l), einval(), "the offset must stay aligned");
}

#[test]
fn alignment_of_one_accepts_anything_in_bounds() {
    let l = limits();
    assert_eq!(check(CMD_READ, 0, 1, 3, &l), Verdict::Run(Command::Read { offset: 1, length: 3, df: false }));
    assert_eq!(check(CMD_WRITE, 0, 7, 9, &l), Verdict::Run(Command::Write { offset: 7, length: 9, fua: false }));
    let zero = RequestLimits { alignment_bytes: 0, ..l };
    assert!(matches!(check(CMD_READ, 0, 1, 3, &zero), Verdict::Run(_)), "0 behaves as 1, no division by zero");
}

#[test]
fn reads_and_writes_above_the_payload_maximum_are_einval() {
    let l = RequestLimits { export_bytes: 64 * MIB, ..limits() };
    let over = u64::from(PAYLOAD_MAX) + 1;
    assert_eq!(check(CMD_READ, 0, 0, over, &l), einval());
    assert_eq!(check(CMD_WRITE, 0, 0, over, &l), reject(NbdError::Inval, over), "compact write drains");
    let small = RequestLimits { payload_bytes_max: 4096, ..l };
    assert_eq!(check(CMD_READ, 0, 0, 8192, &small), einval());
    assert_eq!(check(CMD_WRITE, 0, 0, 8192, &small), reject(NbdError::Inval, 8192));
    // Payload-less commands may exceed it.
    assert!(matches!(check(CMD_TRIM, 0, 0, 8192, &small), Verdict::Run(_)));
    assert!(matches!(check(CMD_WRITE_ZEROES, 0, 0, 8192, &small), Verdict::Run(_)));
    assert!(matches!(check(CMD_CACHE, 0, 0, 8192, &small), Verdict::Run(_)));
    assert!(matches!(check(CMD_BLOCK_STATUS, 0, 0, 8192, &small), Verdict::Run(_)));
}

#[test]
fn thirty_two_mib_reads_and_writes_are_accepted() {
    let full = u64::from(PAYLOAD_MAX);
    for mode in [ReplyMode::Simple, ReplyMode::Structured] {
        let l = RequestLimits { export_bytes: 64 * MIB, reply_mode: mode, ..limits() };
        assert_eq!(
            check(CMD_READ, 0, 32 * MIB, full, &l),
            Verdict::Run(Command::Read { offset: 32 * MIB, length: PAYLOAD_MAX, df: false })
        );
        assert_eq!(
            check(CMD_WRITE, 0, 0, full, &l),
            Verdict::Run(Command::Write { offset: 0, length: PAYLOAD_MAX, fua: false })
        );
    }
    let x = RequestLimits { export_bytes: 64 * MIB, ..with_mode(ReplyMode::Extended) };
    assert_eq!(
        check(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, full, &x),
        Verdict::Run(Command::Write { offset: 0, length: PAYLOAD_MAX, fua: false })
    );
    assert!(matches!(check(CMD_READ, 0, 0, full, &x), Verdict::Run(Command::Read { .. })));
}

// --- extended headers ---------------------------------------------------------------------

#[test]
fn extended_write_carries_its_length_with_or_without_payload_len() {
    // qemu 8.2-10 sends extended WRITEs without PAYLOAD_LEN; the payload
    // still follows, so both forms must parse as a write of `length` bytes.
    let x = with_mode(ReplyMode::Extended);
    let write = Verdict::Run(Command::Write { offset: 4096, length: 4096, fua: true });
    assert_eq!(check(CMD_WRITE, CMD_FLAG_FUA, 4096, 4096, &x), write);
    assert_eq!(check(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, 4096, 4096, &x), write);
    // A rejected one is drained either way.
    let ro = RequestLimits { flags: FLAGS | TF_READ_ONLY, ..x };
    assert_eq!(check(CMD_WRITE, 0, 0, 4096, &ro), reject(NbdError::Perm, 4096));
    let over = u64::from(PAYLOAD_MAX) + 1;
    assert_eq!(validate(&header(CMD_WRITE, 0, 0, over), &x), Err(FramingError::PayloadTooLarge(over)));
}

#[test]
fn extended_payload_above_the_maximum_loses_the_connection() {
    let x = with_mode(ReplyMode::Extended);
    let over = u64::from(PAYLOAD_MAX) + 1;
    for kind in [CMD_WRITE, CMD_READ, CMD_BLOCK_STATUS, 99] {
        let h = header(kind, CMD_FLAG_PAYLOAD_LEN, 0, over);
        assert_eq!(validate(&h, &x), Err(FramingError::PayloadTooLarge(over)), "kind {kind}");
    }
    let h = header(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, u64::MAX);
    assert_eq!(validate(&h, &x), Err(FramingError::PayloadTooLarge(u64::MAX)));
    // Without PAYLOAD_LEN the same length is no payload at all.
    assert_eq!(check(CMD_READ, 0, 0, over, &RequestLimits { export_bytes: 64 * MIB, ..x }), einval());
}

#[test]
fn extended_non_write_with_payload_len_is_einval_and_drained() {
    let x = with_mode(ReplyMode::Extended);
    for kind in [CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_FLUSH, CMD_DISC] {
        assert_eq!(check(kind, CMD_FLAG_PAYLOAD_LEN, 0, 4096, &x), reject(NbdError::Inval, 4096), "kind {kind}");
    }
    // BLOCK_STATUS payloads need BLOCK_STATUS_PAYLOAD negotiated.
    assert_eq!(check(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 16, &x), reject(NbdError::Inval, 16));
}

#[test]
fn extended_payload_less_lengths_may_exceed_four_gib() {
    let x = RequestLimits { export_bytes: 16 * GIB, ..with_mode(ReplyMode::Extended) };
    assert_eq!(
        check(CMD_TRIM, 0, 0, 8 * GIB, &x),
        Verdict::Run(Command::Trim { offset: 0, length: 8 * GIB, fua: false })
    );
    assert_eq!(
        check(CMD_BLOCK_STATUS, 0, GIB, 5 * GIB, &x),
        Verdict::Run(Command::BlockStatus { offset: GIB, length: 5 * GIB, req_one: false, payload: 0 })
    );
    assert_eq!(
        check(CMD_WRITE_ZEROES, 0, 0, 16 * GIB, &x),
        Verdict::Run(Command::WriteZeroes { offset: 0, length: 16 * GIB, fua: false, no_hole: false, fast: false })
    );
    assert_eq!(check(CMD_CACHE, 0, 0, 6 * GIB, &x), Verdict::Run(Command::Cache { offset: 0, length: 6 * GIB }));
    // Reads still cannot exceed the payload maximum.
    assert_eq!(check(CMD_READ, 0, 0, 5 * GIB, &x), einval());
}

#[test]
fn decoded_extended_write_validates_end_to_end() {
    let bytes = extended_bytes(EXTENDED_REQUEST_MAGIC, CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 7, 8192, 4096);
    let h = decode_request(&bytes, ReplyMode::Extended).unwrap();
    assert_eq!(
        validate(&h, &with_mode(ReplyMode::Extended)),
        Ok(Verdict::Run(Command::Write { offset: 8192, length: 4096, fua: false }))
    );
}

// --- BLOCK_STATUS_PAYLOAD -----------------------------------------------------------

#[test]
fn block_status_payload_is_accepted_only_when_negotiated_and_well_formed() {
    let x = RequestLimits { flags: FLAGS | TF_BLOCK_STATUS_PAYLOAD, ..with_mode(ReplyMode::Extended) };
    assert_eq!(
        check(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE, 4096, 12, &x),
        Verdict::Run(Command::BlockStatus { offset: 4096, length: 0, req_one: true, payload: 12 })
    );
    for bad in [8u64, 10, 13, 8 + 4 * 65] {
        assert_eq!(check(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, bad, &x), reject(NbdError::Inval, bad), "{bad}");
    }
}

#[test]
fn status_payload_names_selected_contexts_once_each() {
    let payload = |length: u64, ids: &[u32]| {
        let mut v = length.to_be_bytes().to_vec();
        for id in ids {
            v.extend_from_slice(&id.to_be_bytes());
        }
        v
    };
    let selected = [7u32, 9];
    let status = |bytes: &[u8], offset, size, selected: &[u32]| {
        parse_status_payload(bytes, offset, size, selected).map_err(|f| f.code)
    };
    assert_eq!(status(&payload(4096, &[9]), 0, MIB, &selected), Ok((4096, 0b10)));
    assert_eq!(status(&payload(4096, &[9, 7]), 0, MIB, &selected), Ok((4096, 0b11)));
    assert_eq!(status(&payload(4096, &[9, 9]), 0, MIB, &selected), Err(NbdError::Inval));
    assert_eq!(status(&payload(4096, &[8]), 0, MIB, &selected), Err(NbdError::Inval));
    assert_eq!(status(&payload(0, &[7]), 0, MIB, &selected), Err(NbdError::Inval));
    assert_eq!(status(&payload(MIB, &[7]), 1, MIB, &selected), Err(NbdError::Inval));
    assert_eq!(status(&payload(u64::MAX, &[7]), 1, MIB, &selected), Err(NbdError::Inval));
    assert_eq!(status(&[0; 7], 0, MIB, &selected), Err(NbdError::Inval));
    let many: Vec<u32> = (1..=64).collect();
    assert_eq!(status(&payload(512, &[64, 1]), 0, MIB, &many), Ok((512, 1 << 63 | 1)), "all 64 mask bits");
}
