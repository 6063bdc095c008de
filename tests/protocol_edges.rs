//! Protocol edge cases, driven through python3-libnbd where libnbd can
//! express them and through a small raw-socket client (below) where it
//! cannot: unknown options and commands, bad magic, oversized payloads and
//! options, the EXPORT_NAME fallback, and extended headers.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;

// Wire constants (from the protocol document, not from src/) are in
// common::raw; these few are only used here.
const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_DF: u16 = 1 << 7;
const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const PAGE: u64 = 64 * KIB;

// --- a seeded pattern generator ------------------------------------------------

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng(seed).bytes(len)
}

/// python3-libnbd with a wall-clock limit, so a hung server fails the test.
fn py(script: &str, args: &[&str]) -> String {
    let mut full = vec!["120", PYTHON, "-c", script];
    full.extend_from_slice(args);
    run_ok("timeout", &full)
}

/// Prepended to every Python scenario.
const PY_PRELUDE: &str = r#"
import errno, os, sys
import nbd

def expect_err(codes, fn, *args, **kwargs):
    if isinstance(codes, str):
        codes = (codes,)
    try:
        fn(*args, **kwargs)
    except nbd.Error as e:
        assert e.errno in codes, "expected %s, got %s (%s)" % (codes, e.errno, e.string)
        return e.errno
    raise AssertionError("expected an error %s from %s%r" % (codes, fn.__name__, args))

def pat(seed, n):
    return bytes(((i * 2654435761 + seed * 40503) >> 7) & 255 for i in range(n))
"#;

fn script(body: &str) -> String {
    format!("{PY_PRELUDE}\n{body}")
}

fn python_ok() -> bool {
    require("nbd-python")
}

// --- negotiation --------------------------------------------------------------------

#[test]
fn unknown_option_gets_err_unsup_and_list_still_works() {
    let server = Server::start(&["memory:16M", "disk=memory:1M"]);
    let mut c = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    // nbd-tester-client -h: option 0x7654321, with data the server must skip.
    c.option(0x0765_4321, b"some option data");
    let (opt, kind, _) = c.option_reply();
    assert_eq!((opt, kind), (0x0765_4321, REP_ERR_UNSUP), "unknown option: ERR_UNSUP with the option echoed");
    // An unknown option without data, too.
    c.option(0x00ab_cdef, &[]);
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    // No TLS configured: STARTTLS is refused (POLICY or UNSUP), never TLS_REQD.
    c.option(OPT_STARTTLS, &[]);
    let (opt, kind, _) = c.option_reply();
    assert_eq!(opt, OPT_STARTTLS);
    assert!(kind == REP_ERR_POLICY || kind == REP_ERR_UNSUP, "STARTTLS without TLS answered {kind:#x}");

    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (opt, kind, data) = c.option_reply();
        assert_eq!(opt, OPT_LIST);
        match kind {
            REP_SERVER => {
                let len = be32(&data) as usize;
                assert!(len + 4 <= data.len(), "SERVER name length within the reply");
                names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
            }
            REP_ACK => break,
            other => panic!("LIST answered {other:#x}"),
        }
    }
    assert!(names.contains(&"disk".to_string()), "LIST names: {names:?}");
    assert_eq!(names.len(), 2, "LIST names: {names:?}");
    // Negotiation still works after the unknown option: INFO, then ABORT.
    let export = c.info_or_go(OPT_INFO, "disk").expect("INFO after unknown option");
    assert_eq!(be64(&export), MIB);
    c.option(OPT_ABORT, &[]);
    let (opt, kind, _) = c.option_reply();
    assert_eq!((opt, kind), (OPT_ABORT, REP_ACK));
    assert!(c.closed_within(Duration::from_secs(5)).is_some(), "server closes after ABORT");
    // The server is still there for the next client.
    let mut d = Raw::open(&server.addr(), "disk");
    assert_eq!(d.write(1, 0, b"after-abort").0, 0);
}

#[test]
fn info_and_go_agree_byte_for_byte_and_unknown_export_is_an_option_error() {
    let server = Server::start(&["memory:16M", "disk=memory:1M"]);
    let mut c = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let info = c.info_or_go(OPT_INFO, "disk").unwrap();
    // GO for an unknown export is an error, not a disconnect; the same
    // connection then goes to a valid export.
    assert_eq!(c.info_or_go(OPT_GO, "no-such-export"), Err(REP_ERR_UNKNOWN));
    assert_eq!(c.info_or_go(OPT_INFO, "no-such-export"), Err(REP_ERR_UNKNOWN));
    let go = c.info_or_go(OPT_GO, "disk").unwrap();
    assert_eq!(info, go, "INFO then identical GO must report identical size and flags");
    let flags = be16(&go[8..]);
    assert_eq!(flags & TF_HAS_FLAGS, TF_HAS_FLAGS);
    assert_eq!(flags & TF_SEND_DF, 0, "SEND_DF must be clear without structured replies");
    assert_eq!(flags & TF_READ_ONLY, 0, "writable export");
    assert_eq!(c.write(7, 0, b"go works").0, 0);
    assert_eq!(c.read(8, 0, 8).unwrap(), b"go works");
}

#[test]
fn libnbd_opt_info_and_opt_go_agree_and_failed_go_is_recoverable() {
    if !python_ok() {
        return;
    }
    let body = r#"
def snapshot(h):
    return dict(size=h.get_size(), ro=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(),
                trim=h.can_trim(), zero=h.can_zero(), fast_zero=h.can_fast_zero(), cache=h.can_cache(),
                multi=h.can_multi_conn(), df=h.can_df(), rot=h.is_rotational(),
                bs=[h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)])

uri, readonly = sys.argv[1], sys.argv[2] == "ro"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.set_export_name("no-such-export")
expect_err(("ENOENT", "EINVAL", "ENOTSUP", "EPERM"), h.opt_info)
expect_err(("ENOENT", "EINVAL", "ENOTSUP", "EPERM"), h.opt_go)
assert h.aio_is_negotiating(), "a failed GO must leave the handle negotiating, not disconnected"
h.set_export_name("disk")
h.opt_info()
info = snapshot(h)
h.opt_go()
go = snapshot(h)
assert info == go, (info, go)
assert go["size"] == 1048576, go
assert go["ro"] == readonly, go
if readonly:
    assert not go["trim"] and not go["zero"] and not go["fast_zero"], go
else:
    assert go["flush"] and go["fua"] and go["trim"] and go["zero"], go
assert h.pread(512, 0) == bytes(512)
h.shutdown()
"#;
    let rw = Server::start(&["memory:16M", "disk=memory:1M"]);
    py(&script(body), &[rw.tcp_uri.as_deref().unwrap(), "rw"]);
    let ro = Server::start(&["-r", "memory:16M", "disk=memory:1M"]);
    py(&script(body), &[ro.tcp_uri.as_deref().unwrap(), "ro"]);
}

#[test]
fn oversized_options_are_skipped_or_disconnect_and_server_stays_up() {
    let mut server = Server::start(&["memory:16M"]);
    // 100 KiB: above the parse limit but skippable: ERR_TOO_BIG, then carry on.
    let mut c = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_LIST, &vec![0x5a; 100 * 1024]);
    let (opt, kind, _) = c.option_reply();
    assert_eq!(opt, OPT_LIST);
    assert!(kind & 0x8000_0000 != 0, "oversized LIST must be an error reply, got {kind:#x}");
    assert_eq!(kind, REP_ERR_TOO_BIG);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.option_reply().1, REP_SERVER);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert_eq!(c.go("").0, 16 * MIB);

    // 2 MiB: a DoS-sized option is a hard disconnect, before the data is sent.
    let mut d = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(2 * MIB as u32).to_be_bytes());
    d.send(&header);
    assert!(d.closed_within(Duration::from_secs(5)).is_some(), "2 MiB option must disconnect");
    // Same for an unknown option and for EXPORT_NAME.
    for option in [0x0765_4321, OPT_EXPORT_NAME] {
        let mut e = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
        header[8..12].copy_from_slice(&option.to_be_bytes());
        e.send(&header);
        assert!(e.closed_within(Duration::from_secs(5)).is_some(), "2 MiB option {option:#x} must disconnect");
    }
    assert!(server.is_running());
    // Existing and new connections are unaffected.
    assert_eq!(c.write(1, 4096, b"still here").0, 0);
    let mut f = Raw::open(&server.addr(), "");
    assert_eq!(f.read(2, 4096, 10).unwrap(), b"still here");
}

#[test]
fn export_name_fallback_with_and_without_no_zeroes() {
    let server = Server::start(&["memory:16M", "disk=memory:1M"]);
    let addr = server.addr();
    let check_transmission = |c: &mut Raw, seed: u64| {
        let data = pattern(seed, 4096);
        assert_eq!(c.write(seed, 8192, &data).0, 0);
        assert_eq!(c.read(seed + 1, 8192, 4096).unwrap(), data);
    };

    // Without NO_ZEROES: size, flags and 124 zero bytes (134 in all).
    let mut c = Raw::handshake(&addr, C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"disk");
    let reply = c.recv(134);
    assert_eq!(be64(&reply), MIB, "EXPORT_NAME size");
    let flags = be16(&reply[8..]);
    assert_eq!(flags & TF_HAS_FLAGS, TF_HAS_FLAGS);
    assert_eq!(flags & TF_SEND_DF, 0, "no DF without structured replies");
    assert!(reply[10..].iter().all(|&b| b == 0), "124 bytes of zero padding");
    // Exactly 134: the next bytes are a simple reply.
    check_transmission(&mut c, 10);

    // With NO_ZEROES: 10 bytes, and the first reply follows immediately.
    let mut c = Raw::handshake(&addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"");
    let reply = c.recv(10);
    assert_eq!(be64(&reply), 16 * MIB, "empty name is the default export");
    c.request_compact(0, CMD_READ, 99, 0, 16);
    let r = c.recv(16);
    assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC, "no padding after EXPORT_NAME with NO_ZEROES: {r:02x?}");
    assert_eq!(be64(&r[8..]), 99);
    assert_eq!(c.recv(16), vec![0u8; 16]);
    check_transmission(&mut c, 20);

    // A client without fixed newstyle may still use EXPORT_NAME.
    let mut c = Raw::handshake(&addr, 0);
    c.option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(be64(&c.recv(134)), MIB);
    check_transmission(&mut c, 30);

    // After some fixed-newstyle options, EXPORT_NAME still works.
    let mut c = Raw::handshake(&addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_LIST, &[]);
    while c.option_reply().1 != REP_ACK {}
    c.option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(be64(&c.recv(10)), MIB);
    check_transmission(&mut c, 40);

    // An unknown name cannot carry an error: hard disconnect.
    let mut c = Raw::handshake(&addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"no-such-export");
    assert!(c.closed_within(Duration::from_secs(5)).is_some(), "unknown EXPORT_NAME must disconnect");
}

// --- transmission ---------------------------------------------------------------------

#[test]
fn read_past_end_is_einval_and_write_on_read_only_is_eperm() {
    if !python_ok() {
        return;
    }
    let rw = Server::start(&["memory:16M"]);
    py(
        &script(
            r#"
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
h.pwrite(pat(1, 4096), size - 4096)
expect_err("EINVAL", h.pread, 1024, size - 512)
expect_err("EINVAL", h.pread, 512, size)
expect_err("EINVAL", h.pread, 512, 2**64 - 256)
expect_err("EINVAL", h.trim, 1024, size - 512)
expect_err("ENOSPC", h.pwrite, b"x" * 1024, size - 512)
expect_err("ENOSPC", h.zero, 1024, size - 512)
# The connection is still usable and nothing was damaged.
assert h.pread(4096, size - 4096) == pat(1, 4096)
h.shutdown()

# Simple replies: an error READ has no payload, so the next reply parses.
h = nbd.NBD()
h.set_strict_mode(0)
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
expect_err("EINVAL", h.pread, 1024, size - 512)
assert h.pread(4096, size - 4096) == pat(1, 4096)
h.shutdown()
"#,
        ),
        &[rw.tcp_uri.as_deref().unwrap()],
    );
    let ro = Server::start(&["-r", "memory:16M"]);
    py(
        &script(
            r#"
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
expect_err("EPERM", h.pwrite, b"x" * 512, 0)
expect_err("EPERM", h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FUA)
# TRIM and ZERO are not advertised on a read-only export: EPERM or EINVAL.
expect_err(("EPERM", "EINVAL"), h.trim, 512, 0)
expect_err(("EPERM", "EINVAL"), h.zero, 512, 0)
assert h.pread(512, 0) == bytes(512)
h.flush()
h.shutdown()
"#,
        ),
        &[ro.tcp_uri.as_deref().unwrap()],
    );
}

#[test]
fn unknown_commands_and_flags_get_einval_without_disconnect() {
    let server = Server::start(&["memory:16M", "other=memory:1M"]);
    let mut c = Raw::open(&server.addr(), "");
    assert_eq!(c.write(1, 0, b"0123456789").0, 0);

    c.request_compact(0, 99, 0xdead_beef_0000_0001, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 0xdead_beef_0000_0001), "unknown command 99");
    // A non-WRITE length has no payload, so nothing must be drained.
    c.request_compact(0, 99, 2, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 2));
    c.request_compact(0, 0xffff, 3, u64::MAX, u32::MAX);
    assert_eq!(c.simple(), (EINVAL, 3));
    // Unknown flag on READ: EINVAL and no data follows.
    c.request_compact(1 << 15, CMD_READ, 4, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 4));
    // DF is not advertised without structured replies.
    c.request_compact(CMD_FLAG_DF, CMD_READ, 5, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 5));
    // BLOCK_STATUS needs structured replies and a context.
    c.request_compact(0, CMD_BLOCK_STATUS, 6, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 6));
    // A WRITE with an unknown flag: rejected, and its payload drained.
    c.request_compact(1 << 14, CMD_WRITE, 7, 0, 28);
    let mut fake = Vec::new();
    fake.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    fake.extend_from_slice(&[0; 24]);
    c.send(&fake);
    assert_eq!(c.simple(), (EINVAL, 7));
    assert_eq!(c.read(8, 0, 10).unwrap(), b"0123456789", "rejected WRITE must not have written");

    // Structured replies: errors still answer, READ errors are chunks.
    let mut s = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    s.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(s.option_reply().1, REP_ACK);
    let (_, flags) = s.go("");
    assert_eq!(flags & TF_SEND_DF, TF_SEND_DF, "DF advertised with structured replies");
    s.request_compact(0, 99, 10, 0, 0);
    expect_error(s.reply(), 10, EINVAL, "unknown command (structured)");
    s.request_compact(1 << 15, CMD_READ, 11, 0, 512);
    match s.reply() {
        Reply::Chunk(c) => {
            assert_eq!((c.kind, c.flags & REPLY_FLAG_DONE, c.cookie), (CHUNK_ERROR, REPLY_FLAG_DONE, 11));
            assert_eq!(be32(&c.payload), EINVAL);
        }
        other => panic!("a structured READ error must be a chunk, got {other:?}"),
    }
    s.request_compact(0, CMD_BLOCK_STATUS, 12, 0, 512);
    expect_error(s.reply(), 12, EINVAL, "BLOCK_STATUS without a context");
    // A plain structured READ over data and holes rebuilds from its chunks.
    s.request_compact(0, CMD_READ, 15, 0, 3 * PAGE as u32);
    let (got, _) = read_chunks(&mut s, 15, 0, 3 * PAGE);
    assert_eq!(&got[..10], b"0123456789");
    assert!(got[10..].iter().all(|&b| b == 0), "the rest of the range reads as zeroes");
    s.request_compact(CMD_FLAG_DF, CMD_READ, 13, 0, 10);
    let chunk = s.chunk();
    assert_eq!((chunk.kind, chunk.flags, chunk.cookie), (CHUNK_OFFSET_DATA, REPLY_FLAG_DONE, 13));
    assert_eq!(be64(&chunk.payload), 0);
    assert_eq!(&chunk.payload[8..], b"0123456789");
    assert_eq!(c.write(14, 100, b"ok").0, 0, "the first connection still works");

    // SET_META_CONTEXT names an export; GO to another one has no contexts.
    let mut m = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    m.option(OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation"]));
    assert_eq!(m.option_reply().1, REP_ERR_INVALID, "SET_META_CONTEXT before structured replies");
    m.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(m.option_reply().1, REP_ACK);
    m.option(OPT_SET_META_CONTEXT, &meta_data("other", &["base:allocation"]));
    assert_eq!(m.option_reply().1, REP_META_CONTEXT);
    assert_eq!(m.option_reply().1, REP_ACK);
    m.go("");
    m.request_compact(0, CMD_BLOCK_STATUS, 20, 0, 512);
    expect_error(m.reply(), 20, EINVAL, "BLOCK_STATUS with contexts set for another export");
    // A later SET with no queries replaces the selection with nothing.
    let mut m = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    m.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(m.option_reply().1, REP_ACK);
    m.option(OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation"]));
    assert_eq!(m.option_reply().1, REP_META_CONTEXT);
    assert_eq!(m.option_reply().1, REP_ACK);
    m.option(OPT_SET_META_CONTEXT, &meta_data("", &[]));
    assert_eq!(m.option_reply().1, REP_ACK, "empty SET selects nothing");
    m.go("");
    m.request_compact(0, CMD_BLOCK_STATUS, 21, 0, 512);
    expect_error(m.reply(), 21, EINVAL, "BLOCK_STATUS after an empty SET");
}

/// Accepts an error as a simple reply or as a structured error chunk.
fn expect_error(reply: Reply, cookie: u64, error: u32, what: &str) {
    match reply {
        Reply::Simple { error: e, cookie: k } => assert_eq!((e, k), (error, cookie), "{what}"),
        Reply::Chunk(c) => {
            assert_eq!(c.cookie, cookie, "{what}");
            assert!(c.kind & 0x8000 != 0, "{what}: expected an error chunk, got {c:?}");
            assert_eq!(c.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE, "{what}");
            assert_eq!(be32(&c.payload), error, "{what}");
        }
    }
}

#[test]
fn bad_request_magic_disconnects_only_that_client() {
    let mut server = Server::start(&["memory:16M"]);
    let data = pattern(5, 64 * 1024);
    let mut good = Raw::open(&server.addr(), "");
    assert_eq!(good.write(1, 128 * KIB, &data).0, 0);

    for magic in [0x1256_0953u32, 0x2560_9514, 0, 0xffff_ffff] {
        let mut bad = Raw::open(&server.addr(), "");
        let mut h = Vec::new();
        h.extend_from_slice(&magic.to_be_bytes());
        h.extend_from_slice(&[0u8; 24]);
        bad.send(&h);
        assert!(bad.closed_within(Duration::from_secs(5)).is_some(), "bad magic {magic:#x} must disconnect");
    }
    // Extended magic on a compact connection is also bad framing.
    let mut bad = Raw::open(&server.addr(), "");
    bad.request_ext(0, CMD_READ, 1, 0, 512);
    assert!(bad.closed_within(Duration::from_secs(5)).is_some(), "extended magic without EH must disconnect");
    // Client flags with bits the server never offered: MUST disconnect.
    let mut bad = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | 0x100);
    assert!(bad.closed_within(Duration::from_secs(5)).is_some(), "unknown client flag must disconnect");
    // Bad option magic during negotiation too.
    let mut bad = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE);
    bad.send(&[0x42; 16]);
    assert!(bad.closed_within(Duration::from_secs(5)).is_some(), "bad option magic must disconnect");

    assert!(server.is_running());
    assert_eq!(good.read(2, 128 * KIB, data.len() as u32).unwrap(), data, "the other client reads correct data");
    let more = pattern(6, 4096);
    assert_eq!(good.write(3, 0, &more).0, 0);
    let mut fresh = Raw::open(&server.addr(), "");
    assert_eq!(fresh.read(4, 0, 4096).unwrap(), more);
    assert_eq!(fresh.read(5, 128 * KIB, data.len() as u32).unwrap(), data);
}

#[test]
fn max_payload_write_and_read_round_trip_through_libnbd() {
    if !python_ok() {
        return;
    }
    let server = Server::start(&["memory:128M"]);
    py(
        &script(
            r#"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_block_size(nbd.SIZE_MAXIMUM) >= 32 * 1024 * 1024, h.get_block_size(nbd.SIZE_MAXIMUM)
big = os.urandom(32 * 1024 * 1024)
h.pwrite(big, 12345)
assert h.pread(len(big), 12345) == big
# Simple replies too: a 32 MiB READ in one simple reply.
h.shutdown()
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert h.pread(len(big), 12345) == big
h.pwrite(big[::-1], 64 * 1024 * 1024)
assert h.pread(len(big), 64 * 1024 * 1024) == big[::-1]
h.shutdown()
"#,
        ),
        &[server.tcp_uri.as_deref().unwrap()],
    );
}

#[test]
fn write_over_max_payload_is_rejected_and_drained() {
    let server = Server::start(&["memory:64M"]);
    let mut c = Raw::open(&server.addr(), "");
    let marker = pattern(7, 4096);
    assert_eq!(c.write(1, 0, &marker).0, 0);
    // 32 MiB + 1 over compact headers: EINVAL, payload drained. The payload
    // looks like requests, so a server that parses it instead of draining it
    // answers them (wrong cookies) instead of the next real request.
    let length = 32 * MIB as u32 + 1;
    c.request_compact(0, CMD_WRITE, 2, 0, length);
    let mut payload = Vec::with_capacity(length as usize);
    let mut fake = Vec::new();
    fake.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    fake.extend_from_slice(&0u16.to_be_bytes());
    fake.extend_from_slice(&CMD_READ.to_be_bytes());
    fake.extend_from_slice(&0xbad_c0de_u64.to_be_bytes());
    fake.extend_from_slice(&0u64.to_be_bytes());
    fake.extend_from_slice(&16u32.to_be_bytes());
    while payload.len() < length as usize {
        payload.extend_from_slice(&fake);
    }
    payload.truncate(length as usize);
    c.send(&payload);
    assert_eq!(c.simple(), (EINVAL, 2), "WRITE of max payload + 1 must be EINVAL");
    // The connection is in sync and nothing was written.
    assert_eq!(c.read(3, 0, 4096).unwrap(), marker);
    let after = pattern(8, 8192);
    assert_eq!(c.write(4, 4096, &after).0, 0);
    assert_eq!(c.read(5, 4096, 8192).unwrap(), after);
    // READ over the maximum: EINVAL without data.
    assert_eq!(c.read(6, 0, length).map_err(|e| e.0), Err(EINVAL));
    assert_eq!(c.read(7, 0, 4096).unwrap(), marker);
}

#[test]
fn zero_length_requests_are_answered_without_disconnecting() {
    if !python_ok() {
        return;
    }
    let server = Server::start(&["memory:16M"]);
    py(
        &script(
            r#"
for structured in (True, False):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    h.pwrite(pat(3, 4096), 0)
    ops = [("read", lambda: h.pread(0, 4096)), ("write", lambda: h.pwrite(b"", 4096)),
           ("trim", lambda: h.trim(0, 4096)), ("zero", lambda: h.zero(0, 4096)),
           ("read-at-end", lambda: h.pread(0, h.get_size())), ("cache", lambda: h.cache(0, 0))]
    if structured:
        ops.append(("block-status", lambda: h.block_status(0, 0, lambda *a: 0)))
    for name, op in ops:
        try:
            result = op()
            if name.startswith("read"):
                assert result == b"", (name, result)
        except nbd.Error as e:
            assert e.errno == "EINVAL", (name, e.errno, e.string)
        assert h.aio_is_ready(), "%s (structured=%s) disconnected the client" % (name, structured)
        assert h.pread(4096, 0) == pat(3, 4096), name
    h.shutdown()
"#,
        ),
        &[server.tcp_uri.as_deref().unwrap()],
    );
    // Raw check that a zero-length simple READ carries no data: the next
    // reply must start right after its 16-byte header.
    let mut c = Raw::open(&server.addr(), "");
    c.request_compact(0, CMD_READ, 1, 0, 0);
    assert_eq!(c.simple().1, 1);
    c.request_compact(0, CMD_WRITE, 2, 0, 0);
    assert_eq!(c.simple().1, 2);
    assert_eq!(c.read(3, 0, 4096).unwrap(), pattern_py(3, 4096));
}

/// The Python prelude's `pat()`, for comparing data written from Python.
fn pattern_py(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| ((i * 2_654_435_761 + seed * 40_503) >> 7) as u8).collect()
}

#[test]
fn simple_replies_only_client_reads_and_writes() {
    if !python_ok() {
        return;
    }
    let server = Server::start(&["memory:16M"]);
    py(
        &script(
            r#"
h = nbd.NBD()
h.set_request_structured_replies(False)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
assert not h.can_df(), "DF must not be advertised without structured replies"
assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no contexts without structured replies"
data = os.urandom(1024 * 1024 + 77)
h.pwrite(data, 4095)
assert h.pread(len(data), 4095) == data
assert h.pread(100, 4095 + 1000) == data[1000:1100]
# Many pipelined simple-reply reads in flight at once.
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(b, 4095 + i * 4096) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, (c, b) in enumerate(zip(cookies, bufs)):
    assert h.aio_command_completed(c)
    assert bytes(b.to_bytearray()) == data[i * 4096:(i + 1) * 4096], i
h.shutdown()
"#,
        ),
        &[server.tcp_uri.as_deref().unwrap()],
    );
}

// --- extended headers -----------------------------------------------------------------

/// Negotiates EH, selects base:allocation and goes; returns (conn, context id).
fn open_extended(addr: &str) -> (Raw, u32) {
    let (c, id, _) = open_extended_flags(addr);
    (c, id)
}

/// As [`open_extended`], also returning the transmission flags.
fn open_extended_flags(addr: &str) -> (Raw, u32, u16) {
    let mut c = Raw::handshake(addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply(), (OPT_EXTENDED_HEADERS, REP_ACK, vec![]), "EXTENDED_HEADERS acknowledged");
    c.option(OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation"]));
    let (opt, kind, data) = c.option_reply();
    assert_eq!((opt, kind), (OPT_SET_META_CONTEXT, REP_META_CONTEXT), "SET base:allocation after EH");
    assert_eq!(&data[4..], b"base:allocation");
    let id = be32(&data);
    assert_eq!(c.option_reply().1, REP_ACK);
    let (_, flags) = c.go("");
    assert_eq!(flags & TF_HAS_FLAGS, TF_HAS_FLAGS);
    (c, id, flags)
}

/// Reads every chunk of a structured or extended READ reply and rebuilds
/// the data, checking the chunk rules: within the request, no overlap,
/// full coverage, DONE only on the last chunk.
fn read_chunks(c: &mut Raw, cookie: u64, offset: u64, length: u64) -> (Vec<u8>, usize) {
    let mut data = vec![0u8; length as usize];
    let mut covered = vec![false; length as usize];
    let mut chunks = 0;
    loop {
        let r = c.chunk();
        chunks += 1;
        assert_eq!(r.cookie, cookie, "cookie echoed in every chunk");
        if let Some(echo) = r.offset {
            assert_eq!(echo, offset, "extended chunks echo the request offset");
        }
        let mut cover = |at: u64, len: u64| -> usize {
            assert!(at >= offset && at + len <= offset + length, "chunk [{at}, +{len}) outside the request");
            let start = (at - offset) as usize;
            for seen in &mut covered[start..start + len as usize] {
                assert!(!*seen, "chunks overlap at {at}");
                *seen = true;
            }
            start
        };
        match r.kind {
            CHUNK_OFFSET_DATA => {
                assert!(r.payload.len() > 8, "OFFSET_DATA carries at least one byte");
                let at = be64(&r.payload);
                let start = cover(at, r.payload.len() as u64 - 8);
                data[start..start + r.payload.len() - 8].copy_from_slice(&r.payload[8..]);
            }
            CHUNK_OFFSET_HOLE => {
                assert_eq!(r.payload.len(), 12, "OFFSET_HOLE payload");
                let size = be32(&r.payload[8..]);
                assert!(size > 0, "hole size nonzero");
                cover(be64(&r.payload), u64::from(size)); // zeroes already there
            }
            CHUNK_NONE => assert_eq!(r.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE, "NONE is final"),
            other => panic!("unexpected chunk type {other:#x} in a READ reply: {r:?}"),
        }
        if r.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert!(covered.iter().all(|&c| c), "chunks cover the whole request");
    (data, chunks)
}

/// An extended NONE+DONE success reply to `cookie` at `offset`.
fn expect_ext_success(c: &mut Raw, cookie: u64, offset: u64) {
    let r = c.chunk();
    assert_eq!(
        (r.kind, r.flags, r.cookie, r.offset, r.payload.len()),
        (CHUNK_NONE, REPLY_FLAG_DONE, cookie, Some(offset), 0),
        "extended success reply"
    );
}

/// Block-status descriptors (length, status) of one extended chunk.
fn ext_descriptors(chunk: &Chunk, context: u32) -> Vec<(u64, u64)> {
    assert_eq!(chunk.kind, CHUNK_BLOCK_STATUS_EXT, "BLOCK_STATUS_EXT chunk: {chunk:?}");
    assert_eq!(chunk.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
    let p = &chunk.payload;
    assert_eq!(be32(p), context, "context ID");
    let count = be32(&p[4..]) as usize;
    assert!(count > 0, "at least one descriptor");
    assert_eq!(p.len(), 8 + 16 * count, "payload is 8 + 16 * count");
    let d: Vec<(u64, u64)> = (0..count).map(|i| (be64(&p[8 + 16 * i..]), be64(&p[16 + 16 * i..]))).collect();
    assert!(d.iter().all(|&(len, _)| len > 0), "descriptor lengths are nonzero: {d:?}");
    d
}

#[test]
fn extended_headers_write_read_and_block_status() {
    let server = Server::start(&["memory:8G"]);
    let (mut c, id) = open_extended(&server.addr());

    // Structured replies cannot be negotiated on top of EH.
    let mut n = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    n.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(n.option_reply().1, REP_ACK);
    n.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(n.option_reply().1, REP_ERR_EXT_HEADER_REQD);
    // EXPORT_NAME is not allowed after EH: disconnect.
    n.option(OPT_EXPORT_NAME, b"");
    assert!(n.closed_within(Duration::from_secs(5)).is_some(), "EXPORT_NAME after EH must disconnect");

    // WRITE without PAYLOAD_LEN, payload follows anyway (what qemu sends).
    let at = 3 * PAGE;
    let data = pattern(11, PAGE as usize);
    c.request_ext(0, CMD_WRITE, 1, at, PAGE);
    c.send(&data);
    expect_ext_success(&mut c, 1, at);
    // WRITE with PAYLOAD_LEN, small and unaligned.
    c.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 2, at + 100, 10);
    c.send(b"0123456789");
    expect_ext_success(&mut c, 2, at + 100);
    let mut expected = data.clone();
    expected[100..110].copy_from_slice(b"0123456789");

    c.request_ext(0, CMD_READ, 3, at, PAGE);
    let r = c.chunk();
    assert_eq!(r.kind, CHUNK_OFFSET_DATA);
    assert_eq!(r.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE, "single data chunk is DONE");
    assert_eq!((r.cookie, r.offset), (3, Some(at)), "cookie and request offset echoed");
    assert_eq!(r.payload.len() as u64, 8 + PAGE, "64-bit payload length = offset + data");
    assert_eq!(be64(&r.payload), at, "data offset");
    assert!(r.payload[8..] == expected[..], "READ returns what was written");

    // Unaligned READ spanning the written page and a hole.
    c.request_ext(0, CMD_READ, 4, at + PAGE - 5, 10);
    let r = c.chunk();
    assert_eq!((r.kind, r.cookie, r.offset), (CHUNK_OFFSET_DATA, 4, Some(at + PAGE - 5)));
    assert_eq!(be64(&r.payload), at + PAGE - 5);
    assert_eq!(&r.payload[8..13], &expected[PAGE as usize - 5..]);
    assert_eq!(&r.payload[13..], &[0u8; 5]);

    // BLOCK_STATUS over 6 GiB: 64-bit descriptors (one exceeds 4 GiB).
    c.request_ext(0, CMD_BLOCK_STATUS, 5, 0, 6 * GIB);
    let r = c.chunk();
    assert_eq!((r.cookie, r.offset), (5, Some(0)));
    let d = ext_descriptors(&r, id);
    assert_eq!(d, vec![(3 * PAGE, 3), (PAGE, 0), (6 * GIB - 4 * PAGE, 3)], "unwritten = HOLE|ZERO, written = 0");

    // REQ_ONE: exactly one descriptor, no longer than asked, still 64-bit.
    c.request_ext(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 6, 4 * PAGE, 5 * GIB);
    let r = c.chunk();
    assert_eq!((r.cookie, r.offset), (6, Some(4 * PAGE)));
    let d = ext_descriptors(&r, id);
    assert_eq!(d.len(), 1, "REQ_ONE gives one descriptor: {d:?}");
    assert!(d[0].0 <= 5 * GIB && d[0].0 > u64::from(u32::MAX), "REQ_ONE length {:#x}", d[0].0);
    assert_eq!(d[0].1, 3);
    c.request_ext(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 0, 8 * GIB);
    let d = ext_descriptors(&c.chunk(), id);
    assert_eq!(d, vec![(3 * PAGE, 3)], "REQ_ONE stops at the first status change");

    // A READ carrying PAYLOAD_LEN: the payload is drained and EINVAL answered.
    c.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 8, at, 16);
    c.send(&[0xee; 16]);
    let r = c.chunk();
    assert_eq!((r.kind, r.cookie, r.offset), (CHUNK_ERROR, 8, Some(at)), "READ with PAYLOAD_LEN");
    assert_eq!(be32(&r.payload), EINVAL);
    // Unknown command: an extended error chunk.
    c.request_ext(0, 99, 9, 0, 0);
    let r = c.chunk();
    assert_eq!((r.kind, r.flags & REPLY_FLAG_DONE, r.cookie), (CHUNK_ERROR, REPLY_FLAG_DONE, 9));
    assert_eq!(be32(&r.payload), EINVAL);
    // Still in sync.
    c.request_ext(0, CMD_READ, 10, at + 100, 10);
    assert_eq!(&c.chunk().payload[8..], b"0123456789");

    // A READ over holes and data: whatever chunks it takes, they rebuild it.
    let mut whole = vec![0u8; 3 * PAGE as usize];
    whole[PAGE as usize..2 * PAGE as usize].copy_from_slice(&expected);
    c.request_ext(0, CMD_READ, 12, 2 * PAGE, 3 * PAGE);
    let (got, _) = read_chunks(&mut c, 12, 2 * PAGE, 3 * PAGE);
    assert!(got == whole, "sparse extended READ rebuilds the data");
    // DF: one data chunk, holes as explicit zeroes.
    c.request_ext(CMD_FLAG_DF, CMD_READ, 13, 2 * PAGE, 3 * PAGE);
    let (got, chunks) = read_chunks(&mut c, 13, 2 * PAGE, 3 * PAGE);
    assert_eq!(chunks, 1, "DF READ is a single chunk");
    assert!(got == whole, "DF READ data");

    c.request_ext(0, CMD_DISC, 11, 0, 0);
    assert!(c.closed_within(Duration::from_secs(5)).is_some(), "DISC closes");

    // A compact header on an EH connection is bad framing.
    let (mut e, _) = open_extended(&server.addr());
    e.request_compact(0, CMD_READ, 1, 0, 512);
    e.send(&[0; 4]); // make up 32 bytes
    assert!(e.closed_within(Duration::from_secs(5)).is_some(), "compact magic after EH must disconnect");
    // PAYLOAD_LEN above the maximum payload: hard disconnect (spec 2.7).
    let (mut e, _) = open_extended(&server.addr());
    e.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 32 * MIB + 1);
    assert!(e.closed_within(Duration::from_secs(5)).is_some(), "oversized EH payload must disconnect");
    let (mut f, _) = open_extended(&server.addr());
    f.request_ext(0, CMD_READ, 1, at + 100, 10);
    assert_eq!(&f.chunk().payload[8..], b"0123456789");
}

// --- metadata contexts ----------------------------------------------------------------

#[test]
fn meta_context_list_set_and_block_status_through_libnbd() {
    if !python_ok() {
        return;
    }
    let server = Server::start(&["memory:16M"]);
    py(
        &script(
            r#"
P = 65536
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
count = h.opt_list_meta_context(lambda name: names.append(name) or 0)
assert "base:allocation" in names, names
assert count == len(names), (count, names)
h.add_meta_context("base:allocation")
names = []
h.opt_list_meta_context(lambda name: names.append(name) or 0)
assert names == ["base:allocation"], names
h.clear_meta_contexts()
h.add_meta_context("x-unknown:thing")
names = []
h.opt_list_meta_context(lambda name: names.append(name) or 0)
assert names == [], "unknown namespaces are ignored: %r" % names
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation")

h.pwrite(b"\x01" * P, P)
h.pwrite(b"\x02", 3 * P + 5)
got = []
def cb(ctx, offset, entries, err):
    got.append((ctx, offset, list(entries)))
    return 0

def statuses(length, offset, flags=0):
    del got[:]
    h.block_status(length, offset, cb, flags)
    assert len(got) == 1 and got[0][0] == "base:allocation", got
    e = got[0][2]
    assert len(e) >= 2 and len(e) % 2 == 0, e
    pairs = list(zip(e[0::2], e[1::2]))
    assert all(l > 0 for l, _ in pairs), pairs
    assert sum(l for l, _ in pairs[:-1]) < length, pairs
    return pairs

def per_page(pairs, offset, pages):
    out = []
    for l, s in pairs:
        out += [s] * (l // P)
    return out[:pages]

pairs = statuses(5 * P, 0)
assert sum(l for l, _ in pairs) >= 5 * P, pairs
assert per_page(pairs, 0, 5) == [3, 0, 3, 0, 3], pairs

one = statuses(5 * P, 0, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and 0 < one[0][0] <= P and one[0][1] == 3, one
one = statuses(P // 2, P + 100, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and 0 < one[0][0] <= P // 2 and one[0][1] == 0, one
one = statuses(10 * P, 4 * P, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and one[0] == (10 * P, 3), one

# Zeroing a whole page punches it; NO_HOLE keeps it allocated.
h.zero(P, P)
assert per_page(statuses(2 * P, 0), 0, 2) == [3, 3]
h.zero(P, P, nbd.CMD_FLAG_NO_HOLE)
assert per_page(statuses(2 * P, 0), 0, 2)[1] & nbd.STATE_HOLE == 0, "NO_HOLE zeroing allocates"
assert h.pread(P, P) == bytes(P)
h.set_strict_mode(0)
expect_err("EINVAL", h.block_status, 512, h.get_size(), cb)
expect_err("EINVAL", h.block_status, 2 * P, h.get_size() - P, cb)
h.shutdown()
"#,
        ),
        &[server.tcp_uri.as_deref().unwrap()],
    );
}

// --- write-side commands on memory and O_DIRECT file exports ---------------------------

#[test]
fn fua_flush_trim_and_zero_on_memory_and_direct_file_exports() {
    if !python_ok() {
        return;
    }
    let dir = TempDir::new("edges-file");
    let path = dir.path("disk.img");
    sparse_file(&path, 16 * MIB);
    // An unaligned size: the last partial block cannot use O_DIRECT.
    let odd = dir.path("odd.img");
    sparse_file(&odd, 16 * MIB + 1000);
    let file_arg = format!("file={}", path.display());
    let odd_arg = format!("odd={}", odd.display());
    // Strict alignment: the O_DIRECT export advertises its alignment as the
    // minimum, and the client below opts out of being bound by it.
    let server = Server::start(&["mem=memory:16M", &file_arg, &odd_arg, "--strict-alignment"]);
    let body = r#"
K = 1024
uri, path, aligned = sys.argv[1], sys.argv[2], sys.argv[3] == "aligned"
h = nbd.NBD()
# Not requesting block sizes leaves the server's minimum non-binding, so
# unaligned requests are valid (the RMW path on O_DIRECT); libnbd would
# still enforce the advertised minimum client-side without this strict mode.
h.set_request_block_size(False)
h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ALIGN)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero(), uri
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), uri

def extents(offset, length):
    """(start, end, flags) from base:allocation, covering [offset, offset+length)."""
    out, at = [], offset
    while at < offset + length:
        got = []
        def cb(ctx, off, entries, err):
            assert ctx == nbd.CONTEXT_BASE_ALLOCATION and off == at, (ctx, off, at)
            got.extend(entries)
            return 0
        h.block_status(offset + length - at, at, cb)
        assert got and all(l > 0 for l in got[0::2]), got
        for l, f in zip(got[0::2], got[1::2]):
            out.append((at, at + l, f))
            at += l
    return out

def assert_data(offset, length, what):
    """Ranges holding nonzero bytes must not be reported as HOLE or ZERO."""
    for start, end, f in extents(offset, length):
        assert f & (nbd.STATE_HOLE | nbd.STATE_ZERO) == 0, (what, start, end, f)
if aligned:
    # O_DIRECT with --strict-alignment: the alignment is the minimum.
    assert h.get_block_size(nbd.SIZE_MINIMUM) >= 512, h.get_block_size(nbd.SIZE_MINIMUM)
N = 512 * K
data = pat(9, N)
h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(N, 0) == data
exp = bytearray(data)
small = pat(10, 1000)
h.pwrite(small, 4097, nbd.CMD_FLAG_FUA)
exp[4097:5097] = small
assert h.pread(N, 0) == exp

h.trim(64 * K, 128 * K)                 # contents undefined until zeroed below
h.zero(64 * K, 128 * K)
exp[128 * K:192 * K] = bytes(64 * K)
assert h.pread(N, 0) == exp, "zero after trim"
h.zero(70000, 200 * K + 3, nbd.CMD_FLAG_NO_HOLE)
exp[200 * K + 3:200 * K + 3 + 70000] = bytes(70000)
h.zero(64 * K, 300 * K, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
exp[300 * K:364 * K] = bytes(64 * K)
h.zero(9, 7)
exp[7:16] = bytes(9)
assert h.pread(N, 0) == exp, "zeroes read back"
if h.can_fast_zero():
    try:
        h.zero(64 * K, 400 * K, nbd.CMD_FLAG_FAST_ZERO)
        exp[400 * K:464 * K] = bytes(64 * K)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e.string
    try:
        h.zero(1000, 448 * K + 1, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        exp[448 * K + 1:448 * K + 1001] = bytes(1000)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e.string
assert h.pread(N, 0) == exp, "after FAST_ZERO"
assert_data(16 * K, 48 * K, "written data")
# Unwritten space reads as zeroes; once written, status must follow (no
# stale cached HOLE/ZERO over new data).
far = 8 * 1024 * K
assert h.pread(256 * K, far) == bytes(256 * K)
for start, end, f in extents(far, 256 * K):
    assert f & nbd.STATE_ZERO or f == 0, (start, end, f)
h.pwrite(pat(12, 64 * K), far + 64 * K)
assert_data(far + 64 * K, 64 * K, "newly written data")
h.pwrite(pat(13, 100), far + 200 * K + 7)
assert_data(far + 200 * K + 7, 100, "newly written small data")
assert h.pread(64 * K, far + 64 * K) == pat(12, 64 * K)
assert h.pread(1000, 4097) == exp[4097:5097], "unaligned read"
h.cache(N, 0)
# The export's tail, wherever it ends.
size = h.get_size()
tail = pat(11, 3000)
h.pwrite(tail, size - 3000, nbd.CMD_FLAG_FUA)
assert h.pread(3000, size - 3000) == tail
h.zero(100, size - 100)
tail = tail[:2900] + bytes(100)
assert h.pread(3000, size - 3000) == tail
h.flush()
h.shutdown()
if path != "-":
    with open(path, "rb") as f:
        disk = f.read()
    assert len(disk) == size, (len(disk), size)
    assert disk[:N] == bytes(exp), "file contents on disk"
    assert disk[-3000:] == tail, "file tail on disk"
"#;
    py(&script(body), &[&server.export_uri("mem"), "-", ""]);
    py(&script(body), &[&server.export_uri("file"), path.to_str().unwrap(), "aligned"]);
    py(&script(body), &[&server.export_uri("odd"), odd.to_str().unwrap(), ""]);
}

#[test]
fn extended_block_status_payload_names_contexts() {
    let server = Server::start(&["memory:1G"]);
    let (mut c, id, flags) = open_extended_flags(&server.addr());
    if flags & TF_BLOCK_STATUS_PAYLOAD == 0 {
        eprintln!("SKIP: BLOCK_STATUS_PAYLOAD not advertised");
        return;
    }
    c.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, PAGE, 4096);
    c.send(&pattern(1, 4096));
    expect_ext_success(&mut c, 1, PAGE);
    let status_payload = |effect: u64, ids: &[u32]| {
        let mut p = effect.to_be_bytes().to_vec();
        for i in ids {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    };
    // The effect length travels in the payload; the header length is its size.
    let p = status_payload(4 * PAGE, &[id]);
    c.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 2, 0, p.len() as u64);
    c.send(&p);
    let r = c.chunk();
    assert_eq!((r.cookie, r.offset), (2, Some(0)));
    let d = ext_descriptors(&r, id);
    assert_eq!(d, vec![(PAGE, 3), (PAGE, 0), (2 * PAGE, 3)], "status for the named context");
    // Unknown or duplicate IDs: EINVAL, payload drained, connection in sync.
    for (cookie, ids) in [(3u64, vec![id + 1000]), (4, vec![id, id])] {
        let p = status_payload(PAGE, &ids);
        c.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, cookie, 0, p.len() as u64);
        c.send(&p);
        let r = c.chunk();
        assert_eq!((r.kind, r.cookie), (CHUNK_ERROR, cookie), "BLOCK_STATUS payload naming {ids:?}");
        assert_eq!(be32(&r.payload), EINVAL);
    }
    // A payload too short to hold an effect length.
    c.request_ext(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 5, 0, 6);
    c.send(&[0; 6]);
    let r = c.chunk();
    assert_eq!((r.kind, r.cookie), (CHUNK_ERROR, 5));
    c.request_ext(0, CMD_READ, 6, PAGE, 4096);
    let (got, _) = read_chunks(&mut c, 6, PAGE, 4096);
    assert_eq!(got, pattern(1, 4096), "in sync after rejected payloads");
}
