use super::*;

const MIB: u64 = 1 << 20;
const BASE_FLAGS: u16 = TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
const BOTH_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
const DISK_BLOCKS: BlockSize = BlockSize { minimum: 1, preferred: 4096, maximum: 32 << 20 };
const OTHER_BLOCKS: BlockSize = BlockSize { minimum: 512, preferred: 8192, maximum: 1 << 20 };

// --- fixtures -------------------------------------------------------------------

fn export(name: &str, description: &str, size: u64, flags: u16, block_size: BlockSize) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: description.to_owned(),
        size,
        flags,
        block_size,
        contexts: vec!["base:allocation".to_owned()],
        tls_only: false,
    }
}

/// "disk" (index 0, the default) and a read-only "other" (index 1).
fn exports() -> Vec<ExportInfo> {
    vec![
        export("disk", "the main disk", MIB, BASE_FLAGS, DISK_BLOCKS),
        export("other", "", 3 * 4096, BASE_FLAGS | TF_READ_ONLY, OTHER_BLOCKS),
    ]
}

fn small_limits(options_max: u32, option_bytes_max: u32, option_discard_bytes_max: u32) -> HandshakeLimits {
    HandshakeLimits { options_max, option_bytes_max, option_discard_bytes_max }
}

// --- byte-level helpers -------------------------------------------------------

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    option_header(option, data.len() as u32).into_iter().chain(data.iter().copied()).collect()
}

fn option_header(option: u32, length: u32) -> Vec<u8> {
    let mut v = vec![];
    v.put_u64(IHAVEOPT);
    v.put_u32(option);
    v.put_u32(length);
    v
}

fn string32(v: &mut Vec<u8>, s: &str) {
    v.put_u32(s.len() as u32);
    v.extend_from_slice(s.as_bytes());
}

/// INFO/GO data: name length, name, info count, info codes.
fn info_data(name: &str, codes: &[u16]) -> Vec<u8> {
    let mut v = vec![];
    string32(&mut v, name);
    v.put_u16(codes.len() as u16);
    for &code in codes {
        v.put_u16(code);
    }
    v
}

/// LIST/SET_META_CONTEXT data: export name, query count, queries.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = vec![];
    string32(&mut v, export);
    v.put_u32(queries.len() as u32);
    for q in queries {
        string32(&mut v, q);
    }
    v
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

/// Parses `out` as a sequence of option replies; every byte must belong to one.
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut parsed = vec![];
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply header: {out:?}");
        assert_eq!(be64(&out[0..8]), OPTION_REPLY_MAGIC, "option reply magic");
        let option = be32(&out[8..12]);
        let reply = be32(&out[12..16]);
        let length = be32(&out[16..20]) as usize;
        assert!(out.len() >= 20 + length, "option reply payload overruns the output");
        parsed.push((option, reply, out[20..20 + length].to_vec()));
        out = &out[20 + length..];
    }
    parsed
}

/// The REP_INFO payloads of `rs` as (info type, rest).
fn infos(rs: &[(u32, u32, Vec<u8>)]) -> Vec<(u16, Vec<u8>)> {
    rs.iter().filter(|r| r.1 == REP_INFO).map(|r| (be16(&r.2[..2]), r.2[2..].to_vec())).collect()
}

fn info_of(rs: &[(u32, u32, Vec<u8>)], kind: u16) -> Option<Vec<u8>> {
    let found: Vec<_> = infos(rs).into_iter().filter(|i| i.0 == kind).collect();
    assert!(found.len() <= 1, "info type {kind} sent {} times", found.len());
    found.into_iter().next().map(|i| i.1)
}

fn ack(option: u32) -> (u32, u32, Vec<u8>) {
    (option, REP_ACK, vec![])
}

/// A client talking to one `Handshake`; `out` holds the replies to the last
/// thing sent.
struct Client<'a> {
    hs: Handshake<'a>,
    out: Vec<u8>,
}

impl<'a> Client<'a> {
    /// Fresh machine, client flags already sent.
    fn new(exports: &'a [ExportInfo], limits: HandshakeLimits, client_flags: u32) -> Self {
        let mut c = Client { hs: Handshake::new(exports, limits), out: vec![] };
        assert_eq!(c.hs.want(), Want::Bytes(4));
        assert_eq!(c.hs.feed(&client_flags.to_be_bytes(), &mut c.out), Ok(Progress::Continue));
        assert!(c.out.is_empty(), "client flags get no reply");
        c
    }

    fn fixed(exports: &'a [ExportInfo]) -> Self {
        Self::new(exports, HandshakeLimits::default(), BOTH_CLIENT_FLAGS)
    }

    /// Sends `bytes` exactly as the driver would (honouring want/discard) and
    /// returns the last progress. `out` is cleared first.
    fn send(&mut self, mut bytes: &[u8]) -> Result<Progress, HandshakeError> {
        self.out.clear();
        let mut last = Progress::Continue;
        while !bytes.is_empty() {
            match self.hs.want() {
                Want::Bytes(n) => {
                    assert!(n <= bytes.len(), "machine wants {n} bytes, only {} left", bytes.len());
                    let (now, rest) = bytes.split_at(n);
                    bytes = rest;
                    last = self.hs.feed(now, &mut self.out)?;
                }
                Want::Discard(n) => {
                    assert!(n <= bytes.len(), "machine discards {n} bytes, only {} left", bytes.len());
                    bytes = &bytes[n..];
                    self.hs.discarded(&mut self.out);
                    last = Progress::Continue;
                }
            }
        }
        Ok(last)
    }

    fn opt(&mut self, option: u32, data: &[u8]) -> Result<Progress, HandshakeError> {
        self.send(&option_bytes(option, data))
    }

    /// Sends an option that must leave negotiation going; returns its replies.
    fn cont(&mut self, option: u32, data: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        assert_eq!(self.opt(option, data), Ok(Progress::Continue));
        assert_eq!(self.hs.want(), Want::Bytes(16), "back to waiting for an option header");
        let rs = replies(&self.out);
        assert!(rs.iter().all(|r| r.0 == option), "every reply echoes option {option}: {rs:?}");
        rs
    }

    /// Sends GO and expects transmission to start.
    fn go(&mut self, name: &str, codes: &[u16]) -> (Negotiated, Vec<(u32, u32, Vec<u8>)>) {
        match self.opt(OPT_GO, &info_data(name, codes)) {
            Ok(Progress::Ready(n)) => {
                let rs = replies(&self.out);
                assert_eq!(rs.last(), Some(&ack(OPT_GO)), "GO ends with ACK, nothing after it");
                (n, rs)
            }
            other => panic!("GO {name:?} did not finish negotiation: {other:?}"),
        }
    }

    fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, u32, Vec<u8>)> {
        self.cont(OPT_SET_META_CONTEXT, &meta_data(export, queries))
    }
}

/// The (id, name) of every META_CONTEXT reply.
fn meta_contexts(rs: &[(u32, u32, Vec<u8>)]) -> Vec<(u32, String)> {
    rs.iter()
        .filter(|r| r.1 == REP_META_CONTEXT)
        .map(|r| (be32(&r.2[..4]), String::from_utf8(r.2[4..].to_vec()).unwrap()))
        .collect()
}

// --- greeting and client flags ------------------------------------------------

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
    let ex = exports();
    let hs = Handshake::new(&ex, HandshakeLimits::default());
    let mut out = vec![];
    hs.greeting(&mut out);
    assert_eq!(out.len(), GREETING_BYTES);
    assert_eq!(
        out,
        [b"NBDMAGIC".as_slice(), b"IHAVEOPT".as_slice(), &[0x00, 0x03]].concat(),
        "NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES"
    );
    assert_eq!(hs.want(), Want::Bytes(4), "client flags come next");
}

#[test]
fn unknown_client_flag_bits_disconnect() {
    let ex = exports();
    for flags in [1 << 2, 1 << 31, BOTH_CLIENT_FLAGS | 1 << 5] {
        let mut hs = Handshake::new(&ex, HandshakeLimits::default());
        let mut out = vec![];
        assert_eq!(hs.feed(&flags.to_be_bytes(), &mut out), Err(HandshakeError::BadClientFlags(flags)));
        assert!(out.is_empty());
    }
}

#[test]
fn known_client_flags_are_accepted() {
    let ex = exports();
    for flags in [0, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, BOTH_CLIENT_FLAGS] {
        let c = Client::new(&ex, HandshakeLimits::default(), flags);
        assert_eq!(c.hs.want(), Want::Bytes(16), "option header after flags {flags}");
    }
}

#[test]
fn bad_option_magic_disconnects() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let mut bytes = option_bytes(OPT_LIST, &[]);
    bytes[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    assert_eq!(c.send(&bytes), Err(HandshakeError::BadOptionMagic(NBDMAGIC)));
    assert!(c.out.is_empty());
}

// --- unknown options, LIST, STARTTLS, ABORT ---------------------------------------

#[test]
fn unknown_option_gets_unsup_and_negotiation_continues() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    // nbd-tester-client's probe option, with data that must be skipped.
    let rs = c.cont(0x0765_4321, b"some ignored data");
    assert_eq!(rs.len(), 1);
    assert_eq!((rs[0].0, rs[0].1), (0x0765_4321, REP_ERR_UNSUP));
    let rs = c.cont(4, &[]); // PEEK_EXPORT is withdrawn: unknown too.
    assert_eq!(rs[0].1, REP_ERR_UNSUP);

    let rs = c.cont(OPT_LIST, &[]);
    assert_eq!(rs.len(), 3);
    let mut disk = vec![];
    string32(&mut disk, "disk");
    disk.extend_from_slice(b"the main disk");
    let mut other = vec![];
    string32(&mut other, "other");
    assert_eq!(rs[0], (OPT_LIST, REP_SERVER, disk));
    assert_eq!(rs[1], (OPT_LIST, REP_SERVER, other));
    assert_eq!(rs[2], ack(OPT_LIST));
}

#[test]
fn list_with_data_is_invalid() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_LIST, b"x");
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_INVALID);
    assert_eq!(c.cont(OPT_LIST, &[]).last(), Some(&ack(OPT_LIST)));
}

#[test]
fn starttls_is_refused_by_policy_and_invalid_with_data() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_STARTTLS, &[]);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_POLICY);
    let rs = c.cont(OPT_STARTTLS, b"junk");
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_INVALID);
    c.go("disk", &[]);
}

#[test]
fn abort_acks_and_ends_negotiation() {
    let ex = exports();
    for data in [&b""[..], b"ignored"] {
        let mut c = Client::fixed(&ex);
        assert_eq!(c.opt(OPT_ABORT, data), Ok(Progress::Aborted));
        assert_eq!(replies(&c.out), vec![ack(OPT_ABORT)]);
        assert_eq!(c.hs.want(), Want::Bytes(0));
        let mut out = vec![];
        assert!(matches!(c.hs.feed(&[], &mut out), Err(HandshakeError::Driver { .. })));
    }
}

// --- INFO and GO --------------------------------------------------------------------

#[test]
fn info_then_identical_go_give_identical_information() {
    let ex = exports();
    for (structured, name, index) in [(false, "disk", 0), (true, "disk", 0), (false, "other", 1), (true, "other", 1)] {
        let mut c = Client::fixed(&ex);
        if structured {
            c.cont(OPT_STRUCTURED_REPLY, &[]);
        }
        let codes = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        let info = c.cont(OPT_INFO, &info_data(name, &codes));
        assert_eq!(info.last(), Some(&ack(OPT_INFO)));
        let (negotiated, go) = c.go(name, &codes);
        assert_eq!(negotiated.export, index);
        assert_eq!(infos(&info), infos(&go), "INFO and GO disagree for {name}");

        let export = info_of(&go, INFO_EXPORT).expect("INFO_EXPORT always sent");
        assert_eq!(export.len(), 10, "INFO_EXPORT is 12 bytes with its type");
        assert_eq!(be64(&export[..8]), ex[index].size);
        assert_eq!(be16(&export[8..]), negotiated.flags, "GO's flags are the ones handed to the worker");
        let mut expected = ex[index].flags | TF_HAS_FLAGS;
        if structured {
            expected |= TF_SEND_DF;
        }
        assert_eq!(negotiated.flags, expected);
    }
}

#[test]
fn info_name_and_description_only_when_requested() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_INFO, &info_data("disk", &[]));
    assert_eq!(info_of(&rs, INFO_NAME), None);
    assert_eq!(info_of(&rs, INFO_DESCRIPTION), None);

    let rs = c.cont(OPT_INFO, &info_data("disk", &[INFO_NAME]));
    assert_eq!(info_of(&rs, INFO_NAME), Some(b"disk".to_vec()));
    assert_eq!(info_of(&rs, INFO_DESCRIPTION), None);

    let rs = c.cont(OPT_INFO, &info_data("disk", &[INFO_DESCRIPTION]));
    assert_eq!(info_of(&rs, INFO_NAME), None);
    assert_eq!(info_of(&rs, INFO_DESCRIPTION), Some(b"the main disk".to_vec()));

    // Unknown info codes are ignored; repeated ones answered once.
    let rs = c.cont(OPT_INFO, &info_data("disk", &[0x7777, INFO_NAME, INFO_NAME, INFO_EXPORT, INFO_EXPORT]));
    assert_eq!(info_of(&rs, INFO_NAME), Some(b"disk".to_vec()));
    assert!(info_of(&rs, INFO_EXPORT).is_some());
    assert!(infos(&rs).iter().all(|i| i.0 != 0x7777));
}

#[test]
fn info_block_size_is_always_sent_with_the_exports_constraints() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    for (name, blocks) in [("disk", DISK_BLOCKS), ("other", OTHER_BLOCKS)] {
        for codes in [&[][..], &[INFO_BLOCK_SIZE]] {
            let rs = c.cont(OPT_INFO, &info_data(name, codes));
            let mut raw = vec![];
            raw.put_u16(INFO_BLOCK_SIZE);
            raw.put_u32(blocks.minimum);
            raw.put_u32(blocks.preferred);
            raw.put_u32(blocks.maximum);
            let sent: Vec<_> = rs.iter().filter(|r| r.1 == REP_INFO && be16(&r.2[..2]) == INFO_BLOCK_SIZE).collect();
            assert_eq!(sent.len(), 1);
            assert_eq!(sent[0].2.len(), 14);
            assert_eq!(sent[0].2, raw);
        }
    }
}

#[test]
fn go_for_unknown_export_is_err_unknown_without_info_and_negotiation_continues() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_GO, &info_data("nope", &[INFO_NAME]));
    assert_eq!(rs.len(), 1, "no INFO before the error: {rs:?}");
    assert_eq!(rs[0].1, REP_ERR_UNKNOWN);
    let rs = c.cont(OPT_INFO, &info_data("nope", &[]));
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_UNKNOWN);
    let (n, _) = c.go("other", &[]);
    assert_eq!(n.export, 1);
}

#[test]
fn malformed_info_and_go_are_invalid_and_negotiation_continues() {
    let ex = exports();
    let mut overrun = vec![];
    overrun.put_u32(100); // name length beyond the option
    overrun.extend_from_slice(b"disk");
    overrun.put_u16(0);
    let mut trailing = info_data("disk", &[INFO_NAME]);
    trailing.push(0);
    let mut count_overrun = info_data("disk", &[INFO_NAME]);
    count_overrun[8..10].copy_from_slice(&5u16.to_be_bytes());
    let mut not_utf8 = info_data("disk", &[]);
    not_utf8[4] = 0xff;
    let mut too_long = vec![];
    string32(&mut too_long, &"x".repeat(4097));
    too_long.put_u16(0);
    let short = vec![0, 0, 0];
    for option in [OPT_INFO, OPT_GO] {
        for data in [&overrun, &trailing, &count_overrun, &not_utf8, &too_long, &short] {
            let mut c = Client::fixed(&ex);
            let rs = c.cont(option, data);
            assert_eq!(rs.len(), 1, "{data:?}");
            assert_eq!(rs[0].1, REP_ERR_INVALID, "{data:?}");
            c.go("disk", &[]);
        }
    }
}

#[test]
fn empty_name_selects_the_default_export() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_INFO, &info_data("", &[INFO_NAME]));
    assert_eq!(info_of(&rs, INFO_NAME), Some(b"disk".to_vec()), "the canonical name");
    assert_eq!(be64(&info_of(&rs, INFO_EXPORT).unwrap()[..8]), MIB);
    let (n, _) = c.go("", &[]);
    assert_eq!(n.export, 0);
}

#[test]
fn go_reply_is_unpadded_even_without_no_zeroes() {
    let ex = exports();
    let mut c = Client::new(&ex, HandshakeLimits::default(), FLAG_C_FIXED_NEWSTYLE);
    // `go` parses every byte of `out` as an option reply ending in ACK.
    let (n, rs) = c.go("disk", &[]);
    assert_eq!(n.export, 0);
    assert_eq!(rs.len(), 3, "INFO_EXPORT, INFO_BLOCK_SIZE, ACK: {rs:?}");
}

#[test]
fn block_size_is_agreed_only_when_go_requests_it() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    assert!(!c.go("disk", &[INFO_NAME]).0.block_size_agreed);

    let mut c = Client::fixed(&ex);
    assert!(c.go("disk", &[INFO_NAME, INFO_BLOCK_SIZE]).0.block_size_agreed);

    // Asking in INFO does not bind a GO that did not ask.
    let mut c = Client::fixed(&ex);
    c.cont(OPT_INFO, &info_data("disk", &[INFO_BLOCK_SIZE]));
    assert!(!c.go("disk", &[]).0.block_size_agreed);
}

// --- STRUCTURED_REPLY and EXTENDED_HEADERS ---------------------------------------

#[test]
fn without_structured_replies_mode_is_simple_and_df_is_not_offered() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let (n, rs) = c.go("disk", &[]);
    assert_eq!(n.reply_mode, ReplyMode::Simple);
    assert_eq!(n.flags & TF_SEND_DF, 0);
    assert_eq!(be16(&info_of(&rs, INFO_EXPORT).unwrap()[8..]) & TF_SEND_DF, 0);
    assert_ne!(n.flags & TF_HAS_FLAGS, 0);
}

#[test]
fn structured_reply_is_acked_and_enables_df() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    assert_eq!(c.cont(OPT_STRUCTURED_REPLY, &[]), vec![ack(OPT_STRUCTURED_REPLY)]);
    let (n, rs) = c.go("disk", &[]);
    assert_eq!(n.reply_mode, ReplyMode::Structured);
    assert_ne!(n.flags & TF_SEND_DF, 0);
    assert_ne!(be16(&info_of(&rs, INFO_EXPORT).unwrap()[8..]) & TF_SEND_DF, 0);
}

#[test]
fn structured_reply_with_data_is_invalid_and_not_enabled() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_INVALID);
    let (n, _) = c.go("disk", &[]);
    assert_eq!(n.reply_mode, ReplyMode::Simple);
    assert_eq!(n.flags & TF_SEND_DF, 0);
}

#[test]
fn extended_headers_are_acked_and_override_structured_replies() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    assert_eq!(c.cont(OPT_EXTENDED_HEADERS, &[]), vec![ack(OPT_EXTENDED_HEADERS)]);
    let rs = c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_EXT_HEADER_REQD);
    let (n, _) = c.go("disk", &[]);
    assert_eq!(n.reply_mode, ReplyMode::Extended);
    assert_ne!(n.flags & TF_SEND_DF, 0);

    // SR first, then EH: still extended.
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.cont(OPT_EXTENDED_HEADERS, &[]), vec![ack(OPT_EXTENDED_HEADERS)]);
    assert_eq!(c.go("disk", &[]).0.reply_mode, ReplyMode::Extended);
}

#[test]
fn repeating_structured_replies_or_extended_headers_is_invalid_as_in_qemu() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let rs = c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(rs[0].1, REP_ERR_INVALID, "repeated STRUCTURED_REPLY");
    assert_eq!(c.go("disk", &[]).0.reply_mode, ReplyMode::Structured, "still structured");

    let mut c = Client::fixed(&ex);
    c.cont(OPT_EXTENDED_HEADERS, &[]);
    let rs = c.cont(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(rs[0].1, REP_ERR_INVALID, "repeated EXTENDED_HEADERS");
    assert_eq!(c.go("disk", &[]).0.reply_mode, ReplyMode::Extended, "still extended");
}

#[test]
fn extended_headers_with_data_are_invalid_and_not_enabled() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.cont(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_INVALID);
    assert_eq!(c.go("disk", &[]).0.reply_mode, ReplyMode::Simple);
}

// --- metadata contexts -------------------------------------------------------------

#[test]
fn set_meta_context_before_structured_replies_is_invalid() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let rs = c.set_meta("disk", &["base:allocation"]);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_INVALID);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let (n, _) = c.go("disk", &[]);
    assert!(n.contexts.is_empty(), "the failed SET selected nothing");
}

#[test]
fn set_meta_context_selects_base_allocation_for_the_same_export() {
    let ex = exports();
    for setup in [OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS] {
        let mut c = Client::fixed(&ex);
        c.cont(setup, &[]);
        let rs = c.set_meta("disk", &["base:allocation"]);
        assert_eq!(rs.len(), 2, "{rs:?}");
        assert_eq!(rs[1], ack(OPT_SET_META_CONTEXT));
        let selected = meta_contexts(&rs);
        assert_eq!(selected.len(), 1);
        let (id, name) = &selected[0];
        assert_ne!(*id, 0, "SET ids are nonzero");
        assert_eq!(name, "base:allocation");
        let (n, _) = c.go("disk", &[]);
        assert_eq!(n.contexts, vec![(*id, 0)]);
    }
}

#[test]
fn set_meta_context_via_default_name_binds_to_the_default_export() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let id = meta_contexts(&c.set_meta("", &["base:allocation"]))[0].0;
    assert_eq!(c.go("disk", &[]).0.contexts, vec![(id, 0)]);
}

#[test]
fn contexts_are_dropped_when_go_names_another_export() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(meta_contexts(&c.set_meta("disk", &["base:allocation"])).len(), 1);
    let (n, _) = c.go("other", &[]);
    assert_eq!(n.export, 1);
    assert!(n.contexts.is_empty());

    // The binding is to the named export, not to the default one.
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(meta_contexts(&c.set_meta("other", &["base:allocation"])).len(), 1);
    assert!(c.go("disk", &[]).0.contexts.is_empty());

    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let id = meta_contexts(&c.set_meta("other", &["base:allocation"]))[0].0;
    assert_eq!(c.go("other", &[]).0.contexts, vec![(id, 0)]);
}

#[test]
fn each_set_replaces_the_selection() {
    let ex = exports();
    let later_sets: [&[u8]; 5] = [
        &meta_data("disk", &[]),
        &meta_data("disk", &["base:"]),
        &meta_data("disk", &["x-foo:bar"]),
        &meta_data("nope", &["base:allocation"]),
        &[0, 0, 0], // malformed
    ];
    for later in later_sets {
        let mut c = Client::fixed(&ex);
        c.cont(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(meta_contexts(&c.set_meta("disk", &["base:allocation"])).len(), 1);
        let rs = c.cont(OPT_SET_META_CONTEXT, later);
        assert!(meta_contexts(&rs).is_empty());
        let (n, _) = c.go("disk", &[]);
        assert!(n.contexts.is_empty(), "later SET {later:?} must clear the selection");
    }

    // ...and a later SET naming the export again re-selects it.
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    c.set_meta("other", &["base:allocation"]);
    let id = meta_contexts(&c.set_meta("disk", &["base:allocation"]))[0].0;
    assert_eq!(c.go("disk", &[]).0.contexts, vec![(id, 0)]);
}

#[test]
fn set_meta_context_wildcards_and_unknown_namespaces_select_nothing() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.set_meta("disk", &["base:"]), vec![ack(OPT_SET_META_CONTEXT)]);
    assert_eq!(c.set_meta("disk", &["x-foo:bar", "qemu:dirty-bitmap:a"]), vec![ack(OPT_SET_META_CONTEXT)]);
    assert_eq!(c.set_meta("disk", &[]), vec![ack(OPT_SET_META_CONTEXT)]);
    // Unknown queries next to a known one do not stop it being selected.
    let rs = c.set_meta("disk", &["x-foo:bar", "base:allocation", "base:allocation"]);
    assert_eq!(meta_contexts(&rs).len(), 1, "each context once: {rs:?}");
}

#[test]
fn list_meta_context_lists_with_id_zero_and_keeps_the_selection() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let id = meta_contexts(&c.set_meta("disk", &["base:allocation"]))[0].0;
    let listed = vec![(0, "base:allocation".to_owned())];
    for queries in [&[][..], &["base:"], &["base:allocation"], &["x-foo:", "base:"]] {
        let rs = c.cont(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        assert_eq!(meta_contexts(&rs), listed, "{queries:?}");
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[1], ack(OPT_LIST_META_CONTEXT));
    }
    let rs = c.cont(OPT_LIST_META_CONTEXT, &meta_data("disk", &["x-foo:bar", "base:nope"]));
    assert_eq!(rs, vec![ack(OPT_LIST_META_CONTEXT)], "unknown queries are ignored");
    // LIST is stateless: the SET selection survives it.
    assert_eq!(c.go("disk", &[]).0.contexts, vec![(id, 0)]);
}

#[test]
fn meta_context_for_unknown_export_is_err_unknown() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let rs = c.cont(option, &meta_data("nope", &["base:allocation"]));
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].1, REP_ERR_UNKNOWN);
    }
}

#[test]
fn malformed_meta_context_requests_are_invalid() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let mut truncated = meta_data("disk", &["base:allocation"]);
    truncated.pop();
    let mut trailing = meta_data("disk", &[]);
    trailing.push(0);
    let mut lying = vec![];
    string32(&mut lying, "disk");
    lying.put_u32(u32::MAX);
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        for data in [&truncated, &trailing, &lying] {
            let rs = c.cont(option, data);
            assert_eq!(rs.len(), 1);
            assert_eq!(rs[0].1, REP_ERR_INVALID);
        }
    }
}

// --- EXPORT_NAME -------------------------------------------------------------------

#[test]
fn export_name_replies_size_flags_and_zero_padding() {
    let ex = exports();
    let mut c = Client::new(&ex, HandshakeLimits::default(), FLAG_C_FIXED_NEWSTYLE);
    let Ok(Progress::Ready(n)) = c.opt(OPT_EXPORT_NAME, b"disk") else { panic!("EXPORT_NAME failed") };
    assert_eq!(n.export, 0);
    assert_eq!(n.reply_mode, ReplyMode::Simple);
    assert!(!n.block_size_agreed);
    assert_eq!(c.out.len(), 134);
    assert_eq!(be64(&c.out[..8]), MIB);
    assert_eq!(be16(&c.out[8..10]), n.flags);
    assert_eq!(n.flags, BASE_FLAGS | TF_HAS_FLAGS);
    assert!(c.out[10..].iter().all(|&b| b == 0));
    assert_eq!(c.hs.want(), Want::Bytes(0));
}

#[test]
fn export_name_without_padding_when_no_zeroes_agreed() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let Ok(Progress::Ready(n)) = c.opt(OPT_EXPORT_NAME, b"other") else { panic!("EXPORT_NAME failed") };
    assert_eq!(n.export, 1);
    assert_eq!(c.out.len(), 10);
    assert_eq!(be64(&c.out[..8]), 3 * 4096);
    assert_eq!(be16(&c.out[8..10]), BASE_FLAGS | TF_READ_ONLY | TF_HAS_FLAGS);
}

#[test]
fn export_name_empty_selects_default_and_carries_negotiated_state() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let id = meta_contexts(&c.set_meta("disk", &["base:allocation"]))[0].0;
    let Ok(Progress::Ready(n)) = c.opt(OPT_EXPORT_NAME, b"") else { panic!("EXPORT_NAME failed") };
    assert_eq!(n.export, 0);
    assert_eq!(n.reply_mode, ReplyMode::Structured);
    assert_ne!(n.flags & TF_SEND_DF, 0);
    assert_eq!(be16(&c.out[8..10]), n.flags);
    assert_eq!(n.contexts, vec![(id, 0)]);
}

#[test]
fn export_name_for_unknown_export_disconnects() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    assert_eq!(c.opt(OPT_EXPORT_NAME, b"nope"), Err(HandshakeError::UnknownExport("nope".into())));
    assert!(c.out.is_empty(), "EXPORT_NAME cannot carry an error reply");
}

#[test]
fn export_name_after_extended_headers_disconnects() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.opt(OPT_EXPORT_NAME, b"disk"), Err(HandshakeError::ExportNameAfterExtendedHeaders));
    assert!(c.out.is_empty());
}

#[test]
fn non_fixed_newstyle_client_may_only_send_export_name() {
    let ex = exports();
    for option in [OPT_GO, OPT_INFO, OPT_LIST, OPT_ABORT, OPT_STRUCTURED_REPLY, 0x0765_4321] {
        let mut c = Client::new(&ex, HandshakeLimits::default(), FLAG_C_NO_ZEROES);
        assert_eq!(c.opt(option, &info_data("disk", &[])), Err(HandshakeError::NotFixedNewstyle(option)));
        assert!(c.out.is_empty(), "no option replies to a non-fixed client");
    }
    let mut c = Client::new(&ex, HandshakeLimits::default(), 0);
    let Ok(Progress::Ready(n)) = c.opt(OPT_EXPORT_NAME, b"disk") else { panic!("EXPORT_NAME failed") };
    assert_eq!(n.export, 0);
    assert_eq!(c.out.len(), 134);
}

// --- limits and driver contract -------------------------------------------------------

#[test]
fn oversized_option_is_discarded_with_err_too_big() {
    let ex = exports();
    let limits = small_limits(100, 16, 64);
    let mut c = Client::new(&ex, limits, BOTH_CLIENT_FLAGS);

    // At the buffering limit: read and parsed as usual.
    assert_eq!(c.send(&option_header(OPT_LIST, 16)), Ok(Progress::Continue));
    assert_eq!(c.hs.want(), Want::Bytes(16));
    assert_eq!(c.send(&[0; 16]), Ok(Progress::Continue));
    assert_eq!(replies(&c.out)[0].1, REP_ERR_INVALID);

    // Above it: skipped without buffering, then ERR_TOO_BIG.
    for length in [17, 64] {
        assert_eq!(c.send(&option_header(OPT_INFO, length)), Ok(Progress::Continue));
        assert_eq!(c.hs.want(), Want::Discard(length as usize));
        assert!(c.out.is_empty(), "nothing is answered before the bytes are gone");
        let mut out = vec![];
        c.hs.discarded(&mut out);
        let rs = replies(&out);
        assert_eq!(rs.len(), 1);
        assert_eq!((rs[0].0, rs[0].1), (OPT_INFO, REP_ERR_TOO_BIG));
        assert_eq!(c.hs.want(), Want::Bytes(16));
    }
    assert_eq!(c.cont(OPT_LIST, &[]).last(), Some(&ack(OPT_LIST)));
    c.go("disk", &[]);
}

#[test]
fn option_beyond_the_discard_limit_disconnects() {
    let ex = exports();
    let mut c = Client::new(&ex, small_limits(100, 16, 64), BOTH_CLIENT_FLAGS);
    assert_eq!(c.send(&option_header(OPT_LIST, 65)), Err(HandshakeError::OptionTooLarge(65)));
    let mut c = Client::fixed(&ex);
    assert_eq!(c.send(&option_header(OPT_LIST, u32::MAX)), Err(HandshakeError::OptionTooLarge(u32::MAX)));
}

#[test]
fn discarded_outside_a_discard_does_nothing() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    let mut out = vec![];
    c.hs.discarded(&mut out);
    assert!(out.is_empty());
    assert_eq!(c.hs.want(), Want::Bytes(16));
}

#[test]
fn too_many_options_disconnect() {
    let ex = exports();
    let mut c = Client::new(&ex, small_limits(3, 1024, 4096), BOTH_CLIENT_FLAGS);
    c.cont(OPT_LIST, &[]);
    c.cont(0x0765_4321, &[]); // errors count too
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt(OPT_LIST, &[]), Err(HandshakeError::TooManyOptions(3)));
    assert!(c.out.is_empty());

    // The limit counts options, not bytes: the last allowed one can be GO.
    let mut c = Client::new(&ex, small_limits(2, 1024, 4096), BOTH_CLIENT_FLAGS);
    c.cont(OPT_LIST, &[]);
    c.go("disk", &[]);
}

#[test]
fn feeding_the_wrong_number_of_bytes_is_a_driver_error() {
    let ex = exports();
    let mut hs = Handshake::new(&ex, HandshakeLimits::default());
    let mut out = vec![];
    assert_eq!(hs.feed(&[0; 3], &mut out), Err(HandshakeError::Driver { wanted: 4, got: 3 }));
    assert_eq!(hs.feed(&[0; 5], &mut out), Err(HandshakeError::Driver { wanted: 4, got: 5 }));
    assert_eq!(hs.feed(&BOTH_CLIENT_FLAGS.to_be_bytes(), &mut out), Ok(Progress::Continue));
    let header = option_header(OPT_GO, 10);
    assert_eq!(hs.feed(&header[..15], &mut out), Err(HandshakeError::Driver { wanted: 16, got: 15 }));
    assert_eq!(hs.feed(&header, &mut out), Ok(Progress::Continue));
    assert_eq!(hs.want(), Want::Bytes(10));
    assert_eq!(hs.feed(&[0; 9], &mut out), Err(HandshakeError::Driver { wanted: 10, got: 9 }));
    assert!(out.is_empty());

    let mut c = Client::fixed(&ex);
    c.go("disk", &[]);
    let mut out = vec![];
    assert_eq!(c.hs.want(), Want::Bytes(0));
    assert_eq!(c.hs.feed(&[], &mut out), Err(HandshakeError::Driver { wanted: 0, got: 0 }));
    assert!(matches!(c.hs.feed(&[0; 16], &mut out), Err(HandshakeError::Driver { .. })));

    // Feeding the bytes that were to be discarded is a driver error too.
    let mut c = Client::new(&ex, small_limits(100, 16, 64), BOTH_CLIENT_FLAGS);
    c.send(&option_header(OPT_LIST, 32)).unwrap();
    assert_eq!(c.hs.feed(&[0; 32], &mut out), Err(HandshakeError::Driver { wanted: 0, got: 32 }));
}

// --- regressions for defects found in review ---------------------------------------

#[test]
fn feeding_nothing_while_discarding_is_a_driver_error_not_a_panic() {
    let ex = exports();
    let mut c = Client::new(&ex, small_limits(100, 16, 64), BOTH_CLIENT_FLAGS);
    c.send(&option_header(OPT_LIST, 32)).unwrap();
    assert_eq!(c.hs.want(), Want::Discard(32));
    let mut out = vec![];
    assert!(matches!(c.hs.feed(&[], &mut out), Err(HandshakeError::Driver { .. })));
}

#[test]
fn oversized_export_name_disconnects_instead_of_sending_an_option_reply() {
    let ex = exports();
    let mut c = Client::new(&ex, small_limits(100, 16, 64), BOTH_CLIENT_FLAGS);
    // EXPORT_NAME has no error reply format, so a name too long to read must
    // end the session rather than be skipped and answered with ERR_TOO_BIG.
    assert!(c.send(&option_header(OPT_EXPORT_NAME, 32)).is_err(), "want() = {:?}", c.hs.want());
    assert!(c.out.is_empty());
}

#[test]
fn shutting_down_refuses_every_option_but_abort() {
    let ex = exports();
    let mut c = Client::fixed(&ex);
    c.hs.set_shutting_down();
    let codes = |rs: Vec<(u32, u32, Vec<u8>)>| rs.iter().map(|r| r.1).collect::<Vec<_>>();
    assert_eq!(codes(c.cont(OPT_GO, &info_data("", &[]))), vec![REP_ERR_SHUTDOWN]);
    assert_eq!(codes(c.cont(OPT_LIST, &[])), vec![REP_ERR_SHUTDOWN]);
    assert_eq!(c.opt(OPT_EXPORT_NAME, b""), Err(HandshakeError::ShuttingDown));
    let mut c = Client::fixed(&ex);
    c.hs.set_shutting_down();
    assert_eq!(c.opt(OPT_ABORT, &[]), Ok(Progress::Aborted));
    assert_eq!(replies(&c.out), vec![ack(OPT_ABORT)]);
}

#[test]
fn dynamic_context_names_list_by_prefix_and_select_by_name() {
    let mut ex = exports();
    ex[0].contexts =
        ["base:allocation", "qemu:dirty-bitmap:mon", "qemu:dirty-bitmap:tue", "ringnbd:era"].map(String::from).to_vec();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let rs = c.cont(OPT_LIST_META_CONTEXT, &meta_data("disk", &["qemu:dirty-bitmap:"]));
    let names: Vec<String> = meta_contexts(&rs).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["qemu:dirty-bitmap:mon", "qemu:dirty-bitmap:tue"]);
    let rs = c.set_meta("disk", &["ringnbd:era", "qemu:dirty-bitmap:tue", "base:allocation"]);
    let selected = meta_contexts(&rs);
    assert_eq!(
        selected.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        ["ringnbd:era", "qemu:dirty-bitmap:tue", "base:allocation"]
    );
    let ids: Vec<u32> = selected.iter().map(|(id, _)| *id).collect();
    assert_eq!(c.go("disk", &[]).0.contexts, vec![(ids[0], 3), (ids[1], 2), (ids[2], 0)]);
}

#[test]
fn selecting_more_contexts_than_a_request_mask_holds_is_too_big() {
    let mut ex = exports();
    ex[0].contexts = (0..70).map(|i| format!("qemu:dirty-bitmap:c{i}")).collect();
    let names: Vec<String> = ex[0].contexts.clone();
    let queries: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut c = Client::fixed(&ex);
    c.cont(OPT_STRUCTURED_REPLY, &[]);
    let rs = c.set_meta("disk", &queries);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1, REP_ERR_TOO_BIG);
    assert_eq!(meta_contexts(&c.set_meta("disk", &queries[..64])).len(), 64, "64 fit");
    let rs = c.cont(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    assert_eq!(meta_contexts(&rs).len(), 70, "LIST has no such cap");
}

// --- TLS modes and the export gate ----------------------------------------------

fn with_policy<'a>(exports: &'a [ExportInfo], tls: TlsOffer, gate: &'a dyn ExportGate) -> Client<'a> {
    let mut c = Client { hs: Handshake::with_policy(exports, HandshakeLimits::default(), tls, gate), out: vec![] };
    assert_eq!(c.hs.feed(&BOTH_CLIENT_FLAGS.to_be_bytes(), &mut c.out), Ok(Progress::Continue));
    c
}

fn reply_type(rs: &[(u32, u32, Vec<u8>)]) -> u32 {
    assert_eq!(rs.len(), 1, "one reply: {rs:?}");
    rs[0].1
}

#[test]
fn forced_tls_refuses_everything_but_starttls_and_abort_then_forgets_earlier_state() {
    let ex = exports();
    let mut c = with_policy(&ex, TlsOffer::Require, &OpenGate);
    for option in [OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS, OPT_LIST, 0x7654_3210] {
        assert_eq!(reply_type(&c.cont(option, &[])), REP_ERR_TLS_REQD, "option {option}");
    }
    assert_eq!(reply_type(&c.cont(OPT_INFO, &info_data("disk", &[]))), REP_ERR_TLS_REQD);
    assert_eq!(reply_type(&c.cont(OPT_GO, &info_data("disk", &[]))), REP_ERR_TLS_REQD);
    assert_eq!(reply_type(&c.cont(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:"]))), REP_ERR_TLS_REQD);
    // STARTTLS with data is malformed, whatever the mode.
    assert_eq!(reply_type(&c.cont(OPT_STARTTLS, b"x")), REP_ERR_INVALID);
    assert_eq!(c.opt(OPT_STARTTLS, &[]), Ok(Progress::StartTls));
    assert_eq!(replies(&c.out), vec![ack(OPT_STARTTLS)]);
    c.hs.tls_started();
    assert!(c.hs.tls_active());
    // A second STARTTLS is INVALID; other options now work.
    assert_eq!(reply_type(&c.cont(OPT_STARTTLS, &[])), REP_ERR_INVALID);
    assert_eq!(reply_type(&c.cont(OPT_STRUCTURED_REPLY, &[])), REP_ACK);
    let (negotiated, _) = c.go("disk", &[]);
    assert_eq!(negotiated.reply_mode, ReplyMode::Structured);
}

#[test]
fn forced_tls_disconnects_export_name_before_tls() {
    let ex = exports();
    let mut c = with_policy(&ex, TlsOffer::Require, &OpenGate);
    assert_eq!(c.opt(OPT_EXPORT_NAME, b"disk"), Err(HandshakeError::TlsRequired));
}

#[test]
fn state_negotiated_before_starttls_does_not_survive_it() {
    let ex = exports();
    let mut c = with_policy(&ex, TlsOffer::On, &OpenGate);
    assert_eq!(reply_type(&c.cont(OPT_EXTENDED_HEADERS, &[])), REP_ACK);
    let rs = c.set_meta("disk", &["base:allocation"]);
    assert_eq!(meta_contexts(&rs).len(), 1);
    assert_eq!(c.opt(OPT_STARTTLS, &[]), Ok(Progress::StartTls));
    c.hs.tls_started();
    // Extended headers and the context selection are gone: a SET_META
    // now needs structured replies first, and GO gives simple replies.
    assert_eq!(reply_type(&c.cont(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))), REP_ERR_INVALID);
    let (negotiated, _) = c.go("disk", &[]);
    assert_eq!(negotiated.reply_mode, ReplyMode::Simple);
    assert!(negotiated.contexts.is_empty());
}

#[test]
fn optional_tls_lets_plaintext_clients_through_and_tls_off_refuses_starttls() {
    let ex = exports();
    let mut c = with_policy(&ex, TlsOffer::On, &OpenGate);
    c.go("disk", &[]);
    let mut c = with_policy(&ex, TlsOffer::Off, &OpenGate);
    assert_eq!(reply_type(&c.cont(OPT_STARTTLS, &[])), REP_ERR_POLICY);
}

#[test]
fn tls_only_exports_are_hidden_and_refused_until_tls() {
    let mut ex = exports();
    ex[1].tls_only = true;
    let mut c = with_policy(&ex, TlsOffer::On, &OpenGate);
    let listed: Vec<_> = c.cont(OPT_LIST, &[]).into_iter().filter(|r| r.1 == REP_SERVER).collect();
    assert_eq!(listed.len(), 1, "only the open export is listed");
    assert_eq!(reply_type(&c.cont(OPT_INFO, &info_data("other", &[]))), REP_ERR_TLS_REQD);
    assert_eq!(reply_type(&c.cont(OPT_GO, &info_data("other", &[]))), REP_ERR_TLS_REQD);
    assert_eq!(c.opt(OPT_STARTTLS, &[]), Ok(Progress::StartTls));
    c.hs.tls_started();
    let listed: Vec<_> = c.cont(OPT_LIST, &[]).into_iter().filter(|r| r.1 == REP_SERVER).collect();
    assert_eq!(listed.len(), 2);
    c.go("other", &[]);
    let mut c = with_policy(&ex, TlsOffer::On, &OpenGate);
    assert_eq!(c.opt(OPT_EXPORT_NAME, b"other"), Err(HandshakeError::TlsRequired));
}

/// Refuses "other" and counts claims.
struct Gate {
    claims: std::cell::Cell<u32>,
}

impl ExportGate for Gate {
    fn check(&self, export: usize) -> Result<(), String> {
        if export == 1 { Err("not for you".into()) } else { Ok(()) }
    }
    fn claim(&self, _: usize) -> Result<(), String> {
        self.claims.set(self.claims.get() + 1);
        if self.claims.get() > 1 { Err("full".into()) } else { Ok(()) }
    }
}

#[test]
fn the_gate_refuses_with_policy_hides_from_list_and_claims_only_at_go() {
    let ex = exports();
    let gate = Gate { claims: Default::default() };
    let mut c = with_policy(&ex, TlsOffer::Off, &gate);
    let listed: Vec<_> = c.cont(OPT_LIST, &[]).into_iter().filter(|r| r.1 == REP_SERVER).collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(reply_type(&c.cont(OPT_INFO, &info_data("other", &[]))), REP_ERR_POLICY);
    assert_eq!(reply_type(&c.cont(OPT_GO, &info_data("other", &[]))), REP_ERR_POLICY);
    assert_eq!(reply_type(&c.cont(OPT_LIST_META_CONTEXT, &meta_data("other", &[]))), REP_ERR_POLICY);
    let refusals = c.hs.take_refusals();
    assert!(refusals.iter().all(|r| r.reason.contains("not for you")), "{refusals:?}");
    // INFO does not claim; GO does.
    let rs = c.cont(OPT_INFO, &info_data("disk", &[]));
    assert_eq!(rs.last(), Some(&ack(OPT_INFO)));
    assert_eq!(gate.claims.get(), 0);
    c.go("disk", &[]);
    assert_eq!(gate.claims.get(), 1);
    // A full gate refuses the next client's GO with POLICY, and its
    // EXPORT_NAME with a disconnect.
    let mut c = with_policy(&ex, TlsOffer::Off, &gate);
    assert_eq!(reply_type(&c.cont(OPT_GO, &info_data("disk", &[]))), REP_ERR_POLICY);
    assert!(matches!(c.opt(OPT_EXPORT_NAME, b"disk"), Err(HandshakeError::Refused(_))));
}
