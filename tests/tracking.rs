//! Change tracking and checkpoints (issue 9), end to end with real clients:
//! `qemu:dirty-bitmap:NAME` read by nbdinfo and qemu-img, an incremental
//! backup chain with nbdcopy, qemu-io, libnbd and `qemu-img compare`,
//! kill -9 crash rounds under fio, outside modification and a second
//! server, the `ringnbd:era` context with every reply framing, and the
//! control socket with its errors and many concurrent clients.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// The default tracking granule.
const G: u64 = 64 * KIB;

/// The granules of the default tracking granularity a map marks changed.
fn dirty_granules(runs: &[(u64, u64, u64)]) -> BTreeSet<u64> {
    dirty_granules_of(runs, G)
}

// --- fixtures -------------------------------------------------------------------

/// A file image with tracking on, its control socket, and the server
/// arguments that serve it as export "disk".
struct Tracked {
    dir: TempDir,
    image: PathBuf,
    control: PathBuf,
}

impl Tracked {
    fn new(tag: &str, size: u64) -> Self {
        let dir = TempDir::new(tag);
        let image = dir.path("disk.img");
        sparse_file(&image, size);
        let control = dir.path("ctl.sock");
        Tracked { dir, image, control }
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--track".to_owned(), "--control".to_owned(), self.control.display().to_string()];
        args.push(format!("disk={}", self.image.display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn start(&self, extra: &[&str]) -> Server {
        let args = self.args(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&refs)
    }

    fn ctl(&self, args: &[&str]) -> Value {
        ctl_reply(&self.control, args).0
    }

    /// A ctl command that must succeed; its result.
    fn ctl_ok(&self, args: &[&str]) -> Value {
        let reply = self.ctl(args);
        assert_eq!(reply["ok"], Value::Bool(true), "ctl {args:?}: {reply}");
        reply["result"].clone()
    }

    fn create(&self, name: &str) -> u64 {
        self.ctl_ok(&["checkpoint", "create", "disk", name])["era"].as_u64().unwrap()
    }

    fn uri(&self, server: &Server) -> String {
        uri(server, Transport::Unix, "disk")
    }
}

/// The granules `[offset, offset + length)` touches.
fn granules(offset: u64, length: u64) -> impl Iterator<Item = u64> {
    offset / G..(offset + length).div_ceil(G)
}

// --- the dirty-bitmap context with real clients ---------------------------------

#[test]
fn nbdinfo_and_qemu_img_see_exactly_the_ranges_written_since_a_checkpoint() {
    if !require("nbdinfo") || !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let t = Tracked::new("track-map", 64 * MIB);
    // A write before the checkpoint must not count as after it.
    let mut server = t.start(&[]);
    let uri = t.uri(&server);
    qemu_io(&uri, &["write -P 0x11 40M 1M".into()]);
    assert_eq!(t.create("base"), 1, "the first checkpoint cuts era 1");
    let writes: [(&str, u64, u64); 6] = [
        ("write -P 0x55", MIB, 64 * KIB),
        ("write -P 0x66", 5 * MIB + 100, 10), // unaligned, inside one granule
        ("write -z", 10 * MIB, 128 * KIB),    // WRITE_ZEROES
        ("discard", 20 * MIB, 64 * KIB),      // TRIM
        ("write -P 0x77", 30 * MIB - 4 * KIB, 8 * KIB), // across a granule boundary
        ("write -P 0x78", 64 * MIB - 512, 512), // the last sector
    ];
    let commands: Vec<String> = writes.iter().map(|(c, o, l)| format!("{c} {o} {l}")).collect();
    qemu_io(&uri, &commands);
    let expected: BTreeSet<u64> = writes.iter().flat_map(|&(_, o, l)| granules(o, l)).collect();

    for uri in [uri.clone(), uri_tcp(&server)] {
        let got = dirty_granules(&map(&uri, "qemu:dirty-bitmap:base"));
        assert_eq!(got, expected, "nbdinfo --map over {uri}");
    }
    // qemu-img reads a dirty bitmap through x-dirty-bitmap: dirty areas
    // come back as "data": false.
    let socket = server.unix_socket.clone().unwrap();
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:base",
        socket.display()
    );
    let text = run_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let runs: Value = serde_json::from_str(&text).unwrap();
    let mut from_qemu = BTreeSet::new();
    for run in runs.as_array().unwrap() {
        if run["data"] == Value::Bool(false) {
            let (start, length) = (run["start"].as_u64().unwrap(), run["length"].as_u64().unwrap());
            from_qemu.extend(granules(start, length));
        }
    }
    assert_eq!(from_qemu, expected, "qemu-img map with x-dirty-bitmap");
    // The checkpoint and its marks survive a clean restart.
    assert_eq!(server.stop(), Some(0));
    let server = t.start(&[]);
    assert_eq!(dirty_granules(&map(&t.uri(&server), "qemu:dirty-bitmap:base")), expected, "after a restart");
}

fn uri_tcp(server: &Server) -> String {
    uri(server, Transport::Tcp, "disk")
}

// --- incremental backup ---------------------------------------------------------

/// Copies the ranges `context` reports dirty from the export onto `backup`
/// with libnbd; prints the bytes copied.
const PY_INCREMENTAL: &str = r#"
import nbd, sys
uri, context, backup = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
assert h.can_meta_context(context), context
size = h.get_size()
dirty = []
offset = 0
while offset < size:
    found = []
    def seen(name, at, entries, err):
        if name == context:
            found.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(min(size - offset, 1 << 30), offset, seen)
    assert found, "no extents"
    for length, flags in found:
        if flags & 1:
            dirty.append((offset, length))
        offset += length
copied = 0
with open(backup, "r+b") as f:
    for at, length in dirty:
        done = 0
        while done < length:
            n = min(length - done, 8 << 20)
            f.seek(at + done)
            f.write(h.pread(n, at + done))
            done += n
    copied += sum(l for _, l in dirty)
h.shutdown()
print(copied)
"#;

#[test]
fn incremental_backups_over_three_generations_compare_identical() {
    for tool in ["nbdcopy", "qemu-io", "qemu-img", "nbd-python"] {
        if !require(tool) {
            return;
        }
    }
    let size = 96 * MIB;
    let t = Tracked::new("track-backup", size);
    std::fs::write(&t.image, random_bytes(size as usize, 9)).unwrap();
    let server = t.start(&["--checkpoint", "gen0"]);
    let uri = t.uri(&server);
    let backup = t.dir.path("backup.img");
    // Generation 0: the full copy, taken at checkpoint gen0.
    run_ok("nbdcopy", &[&uri, backup.to_str().unwrap()]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", backup.to_str().unwrap(), &uri]);
    let mut rng = Rng(0xBAC);
    let mut random_writes = |count: usize| -> (Vec<String>, BTreeSet<u64>) {
        let mut commands = Vec::new();
        let mut touched = BTreeSet::new();
        for _ in 0..count {
            let (offset, length) = match rng.below(3) {
                0 => (rng.below(size / 512) * 512, 512 * (1 + rng.below(256))),
                1 => (rng.below(size - 300 * KIB), 1 + rng.below(200 * KIB)),
                _ => (rng.below(size / G) * G, G),
            };
            let length = length.min(size - offset);
            let kind = ["write -P 0xa5", "write -P 0x5a", "write -z", "discard"][rng.below(4) as usize];
            commands.push(format!("{kind} {offset} {length}"));
            touched.extend(granules(offset, length));
        }
        (commands, touched)
    };
    let mut previous_after = BTreeSet::new();
    for generation in 1..=3 {
        let (before, touched_before) = random_writes(40);
        qemu_io(&uri, &before);
        let name = format!("gen{generation}");
        t.create(&name);
        let (after, touched_after) = random_writes(25);
        qemu_io(&uri, &after);
        // What changed since the newest checkpoint is exactly the later batch.
        let since_new = dirty_granules(&map(&uri, &format!("qemu:dirty-bitmap:{name}")));
        assert_eq!(since_new, touched_after, "generation {generation}: changes since {name}");
        // The previous backup plus what changed since the previous
        // checkpoint is the export now.
        let previous = format!("qemu:dirty-bitmap:gen{}", generation - 1);
        let copied: u64 = python(PY_INCREMENTAL, &[&uri, &previous, backup.to_str().unwrap()]).trim().parse().unwrap();
        // Changed since the previous checkpoint: the later batch of the
        // previous generation and both batches of this one.
        let changed: BTreeSet<u64> =
            previous_after.iter().chain(&touched_before).chain(&touched_after).copied().collect();
        assert_eq!(copied, changed.len() as u64 * G, "generation {generation}: bytes copied");
        previous_after = touched_after;
        run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", backup.to_str().unwrap(), &uri]);
    }
}

// --- crash safety ---------------------------------------------------------------

/// fio's latency log lines: `time, latency, direction, size, offset, ...`;
/// one per completed I/O, so these are the acknowledged writes.
fn acknowledged_writes(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<u64> = line.split(',').filter_map(|f| f.trim().parse().ok()).collect();
            (fields.len() >= 5 && fields[2] == 1).then(|| (fields[4], fields[3]))
        })
        .collect()
}

#[test]
fn kill_9_at_random_moments_never_loses_a_change() {
    if !require("fio") || !require("nbdinfo") {
        return;
    }
    const ROUNDS: usize = 20;
    let size = 64 * MIB;
    let t = Tracked::new("track-crash", size);
    std::fs::write(&t.image, random_bytes(size as usize, 20)).unwrap();
    // The copy taken at the checkpoint.
    let at_checkpoint = file_bytes(&t.image);
    let mut acknowledged: Vec<(u64, u64)> = Vec::new();
    let mut rng = Rng(0xC8A5);
    let mut killed_writing = 0;
    for round in 0..ROUNDS {
        let mut server = t.start(&["--checkpoint", "base"]);
        if round > 0 {
            verify_after_crash(&t, &server, &at_checkpoint, &acknowledged, round);
        }
        let log = t.dir.path(&format!("fio-{round}"));
        let fio = std::process::Command::new("fio")
            .args([
                "--name=crash",
                "--ioengine=nbd",
                &format!("--uri={}", t.uri(&server)),
                "--rw=randwrite",
                "--bsrange=512-256k",
                "--iodepth=16",
                "--time_based",
                "--runtime=30",
                &format!("--write_lat_log={}", log.display()),
                "--log_offset=1",
                &format!("--randseed={round}"),
                "--output=/dev/null",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start fio");
        // A random moment: while fio connects, or well into the writes.
        std::thread::sleep(Duration::from_millis(50 + rng.below(1200)));
        server.kill9();
        let mut fio = fio;
        let deadline = Instant::now() + Duration::from_secs(20);
        while fio.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "fio did not notice the server died");
            std::thread::sleep(Duration::from_millis(20));
        }
        let acked = acknowledged_writes(&t.dir.path(&format!("fio-{round}_lat.1.log")));
        killed_writing += usize::from(!acked.is_empty());
        acknowledged.extend(acked);
    }
    let server = t.start(&[]);
    verify_after_crash(&t, &server, &at_checkpoint, &acknowledged, ROUNDS);
    assert!(killed_writing >= ROUNDS / 2, "only {killed_writing} of {ROUNDS} rounds were killed mid-write");
    assert!(acknowledged.len() > 1000, "only {} writes were acknowledged in all", acknowledged.len());
    eprintln!("{ROUNDS} kill -9 rounds, {} acknowledged writes, all reported changed", acknowledged.len());
}

/// After a restart: every acknowledged write since the checkpoint is in a
/// range reported changed, and outside those ranges the image is the copy
/// taken at the checkpoint.
fn verify_after_crash(t: &Tracked, server: &Server, copy: &[u8], acknowledged: &[(u64, u64)], round: usize) {
    let dirty = dirty_granules(&map(&t.uri(server), "qemu:dirty-bitmap:base"));
    for &(offset, length) in acknowledged {
        for g in granules(offset, length) {
            assert!(dirty.contains(&g), "round {round}: acknowledged write {offset}+{length} not reported changed");
        }
    }
    let now = file_bytes(&t.image);
    for (g, (a, b)) in now.chunks(G as usize).zip(copy.chunks(G as usize)).enumerate() {
        assert!(dirty.contains(&(g as u64)) || a == b, "round {round}: granule {g} changed but is reported clean");
    }
}

/// A write whose mark cannot be made durable never reaches the image, and
/// the checkpoints that depended on the marks are invalidated.
#[test]
fn a_failed_state_sync_fails_the_write_before_its_data_moves() {
    if !require("nbdinfo") {
        return;
    }
    let t = Tracked::new("track-syncfail", 16 * MIB);
    std::fs::write(&t.image, vec![0x33u8; 16 * MIB as usize]).unwrap();
    let args = t.args(&["--checkpoint", "base"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::launch(&Launch {
        env: vec![("RINGNBD_TEST_FAULTS", "eio-state-sync=4194304-4198400")],
        ..Launch::new(&refs)
    });
    let mut c = Raw::open_mode(&server.addr(), "disk", Mode::Structured);
    c.write_ok(1, 0, &[0x44; 4096]);
    let (error, message) = c.write(2, 4 * MIB, &[0x55; 4096]);
    assert_eq!(error, 5, "EIO for a write whose mark could not be saved");
    assert!(message.contains("change-tracking"), "{message}");
    let mut on_disk = [0u8; 4096];
    std::fs::File::open(&t.image).unwrap().read_exact_at(&mut on_disk, 4 * MIB).unwrap();
    assert_eq!(on_disk, [0x33; 4096], "the failed write's data reached the image");
    let list = t.ctl_ok(&["checkpoint", "list", "disk"]);
    assert_eq!(list["checkpoints"][0]["valid"], Value::Bool(false), "{list}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("checkpoints invalidated: base"), "{log}");
    // Serving goes on; a new checkpoint can be cut and is valid.
    c.write_ok(3, 8 * MIB, &[0x66; 4096]);
    t.create("after");
    c.write_ok(4, 9 * MIB, &[0x66; 4096]);
    assert_eq!(dirty_granules(&map(&t.uri(&server), "qemu:dirty-bitmap:after")), BTreeSet::from([9 * MIB / G]));
    c.disconnect();
}

// --- outside changes and a second server -----------------------------------------

#[test]
fn outside_changes_invalidate_checkpoints_and_a_second_server_is_refused() {
    if !require("nbdinfo") {
        return;
    }
    let t = Tracked::new("track-outside", 16 * MIB);
    let mut server = t.start(&["--checkpoint", "base"]);
    // A second server on the same image, even with other state, is refused.
    let other_state = t.dir.path("other-state");
    std::fs::create_dir(&other_state).unwrap();
    for extra in [vec![], vec!["--state-dir", other_state.to_str().unwrap()], vec!["-r"]] {
        let mut args = vec!["--track", "-l", "127.0.0.1:0"];
        args.extend(extra.iter());
        let image = format!("disk={}", t.image.display());
        args.push(&image);
        let out = run(&binary(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "second server {extra:?} started: {stderr}");
        assert!(stderr.contains("in use by another process"), "{stderr}");
    }
    // The first one serves on, undisturbed.
    write_through(&server, 0);
    assert_eq!(server.stop(), Some(0));

    // Unchanged while stopped: still valid.
    let mut server = t.start(&[]);
    assert_eq!(dirty_granules(&map(&t.uri(&server), "qemu:dirty-bitmap:base")), BTreeSet::from([0]));
    assert_eq!(server.stop(), Some(0));

    // Written behind ringnbd's back while stopped.
    std::fs::OpenOptions::new().write(true).open(&t.image).unwrap().write_all_at(b"sneaky", 8 * MIB).unwrap();
    let server = t.start(&[]);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("INVALID: base"), "the invalidation is logged: {log}");
    let list = t.ctl_ok(&["checkpoint", "list", "disk"]);
    assert_eq!(list["checkpoints"][0]["name"], "base");
    assert_eq!(list["checkpoints"][0]["valid"], Value::Bool(false), "listed as invalid: {list}");
    let out = run("nbdinfo", &["--map=qemu:dirty-bitmap:base", &t.uri(&server)]);
    assert!(!out.status.success(), "an invalid checkpoint must not be served as a dirty bitmap");
    // Deleting it and cutting a new one starts a trustworthy chain.
    t.ctl_ok(&["checkpoint", "delete", "disk", "base"]);
    t.create("base");
    assert!(dirty_granules(&map(&t.uri(&server), "qemu:dirty-bitmap:base")).is_empty());
    drop(server);

    // A size change while stopped invalidates as well (the crash above left
    // the state not cleanly shut down: size is still checked).
    std::fs::OpenOptions::new().write(true).open(&t.image).unwrap().set_len(32 * MIB).unwrap();
    let server = t.start(&[]);
    let list = t.ctl_ok(&["checkpoint", "list", "disk"]);
    assert_eq!(list["checkpoints"][0]["valid"], Value::Bool(false), "after a resize: {list}");
    let status = t.ctl_ok(&["status"]);
    assert_eq!(status["exports"][0]["size"], 32 * MIB);
    drop(server);
}

fn write_through(server: &Server, offset: u64) {
    let mut c = Raw::open_mode(&server.addr(), "disk", Mode::Structured);
    c.write_ok(1, offset, &[9u8; 4096]);
    c.disconnect();
}

// --- contexts on the wire: wildcards, combinations, REQ_ONE, extended headers -------

/// Negotiates `mode`, SET_META_CONTEXT with `queries`, GO. Returns the
/// client and the selected (id, name) pairs.
fn open_with_contexts(addr: &str, mode: Mode, queries: &[&str]) -> (Raw, Vec<(u32, String)>) {
    let mut c = Raw::handshake(addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(if mode == Mode::Extended { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY }, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.option(OPT_SET_META_CONTEXT, &meta_data("disk", queries));
    let mut selected = Vec::new();
    loop {
        match c.option_reply() {
            (_, REP_META_CONTEXT, d) => selected.push((be32(&d), String::from_utf8(d[4..].to_vec()).unwrap())),
            (_, REP_ACK, _) => break,
            (_, other, _) => panic!("SET_META_CONTEXT reply {other:#x}"),
        }
    }
    c.go("disk");
    c.mode = mode;
    (c, selected)
}

fn list_contexts(addr: &str, queries: &[&str]) -> Vec<String> {
    let mut c = Raw::handshake(addr, C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
    let mut names = Vec::new();
    loop {
        match c.option_reply() {
            (_, REP_META_CONTEXT, d) => {
                assert_eq!(be32(&d), 0, "LIST ids are 0");
                names.push(String::from_utf8(d[4..].to_vec()).unwrap());
            }
            (_, REP_ACK, _) => return names,
            (_, other, _) => panic!("LIST_META_CONTEXT reply {other:#x}"),
        }
    }
}

/// One BLOCK_STATUS reply: per context id, its (length, status) runs, and
/// the id of the chunk that carried DONE.
fn block_status(
    c: &mut Raw,
    cookie: u64,
    flags: u16,
    offset: u64,
    length: u64,
    payload: &[u8],
) -> Vec<(u32, Vec<(u64, u64)>)> {
    if payload.is_empty() {
        c.request(flags, CMD_BLOCK_STATUS, cookie, offset, length);
    } else {
        c.request(flags | CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, cookie, offset, payload.len() as u64);
        c.send(payload);
    }
    let mut chunks = Vec::new();
    loop {
        let chunk = c.chunk();
        assert_eq!(chunk.cookie, cookie);
        assert!(chunk.error().is_none(), "BLOCK_STATUS failed: {:?}", chunk.error());
        let p = &chunk.payload;
        let (id, runs) = match chunk.kind {
            CHUNK_BLOCK_STATUS => {
                let runs = p[4..].chunks(8).map(|d| (u64::from(be32(d)), u64::from(be32(&d[4..])))).collect();
                (be32(p), runs)
            }
            CHUNK_BLOCK_STATUS_EXT => {
                let count = be32(&p[4..]) as usize;
                assert_eq!(p.len(), 8 + 16 * count, "extended chunk sized by its own count");
                (be32(p), p[8..].chunks(16).map(|d| (be64(d), be64(&d[8..]))).collect())
            }
            other => panic!("chunk type {other}"),
        };
        chunks.push((id, runs));
        if chunk.flags & REPLY_FLAG_DONE != 0 {
            return chunks;
        }
    }
}

fn status_payload(effect: u64, ids: &[u32]) -> Vec<u8> {
    let mut v = effect.to_be_bytes().to_vec();
    ids.iter().for_each(|id| v.extend_from_slice(&id.to_be_bytes()));
    v
}

/// The status of `at` in a run list starting at `from`.
fn status_at(runs: &[(u64, u64)], from: u64, at: u64) -> u64 {
    let mut offset = from;
    for &(length, status) in runs {
        if at < offset + length {
            return status;
        }
        offset += length;
    }
    panic!("{at} not covered by {runs:?} from {from}")
}

#[test]
fn contexts_list_by_wildcard_and_answer_together_in_every_framing() {
    let t = Tracked::new("track-contexts", 16 * MIB);
    let server = t.start(&[]);
    let addr = server.addr();
    let mut c = Raw::open_mode(&addr, "disk", Mode::Structured);
    c.write_ok(1, 0, &[1; 4096]);
    let mon = t.create("mon");
    c.write_ok(2, MIB, &[2; 4096]);
    let tue = t.create("tue");
    c.write_ok(3, 2 * MIB, &[3; 4096]);
    c.write_ok(4, MIB, &[4; 100]);
    assert_eq!((mon, tue), (1, 2));

    let all = list_contexts(&addr, &[]);
    for name in [
        "base:allocation",
        "qemu:dirty-bitmap:mon",
        "qemu:dirty-bitmap:tue",
        "ringnbd:era",
        "ringnbd:checkpoint:1:mon",
        "ringnbd:checkpoint:2:tue",
    ] {
        assert!(all.contains(&name.to_owned()), "{name} missing from {all:?}");
    }
    let bitmaps = ["qemu:dirty-bitmap:mon", "qemu:dirty-bitmap:tue"].map(String::from).to_vec();
    assert_eq!(list_contexts(&addr, &["qemu:"]), bitmaps);
    assert_eq!(list_contexts(&addr, &["qemu:dirty-bitmap:"]), bitmaps);
    assert_eq!(
        list_contexts(&addr, &["ringnbd:checkpoint:"]),
        ["ringnbd:checkpoint:1:mon", "ringnbd:checkpoint:2:tue"]
    );
    assert_eq!(list_contexts(&addr, &["ringnbd:"]).len(), 3);
    assert_eq!(list_contexts(&addr, &["qemu:dirty-bitmap:tue", "qemu:nope"]), ["qemu:dirty-bitmap:tue"]);

    let queries = ["base:allocation", "qemu:dirty-bitmap:mon", "ringnbd:era", "qemu:dirty-bitmap:tue", "qemu:"];
    for mode in [Mode::Structured, Mode::Extended] {
        let (mut c, selected) = open_with_contexts(&addr, mode, &queries);
        let names: Vec<&str> = selected.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, &queries[..4], "{mode:?}: the wildcard selects nothing");
        let id = |name: &str| selected.iter().find(|(_, n)| n == name).unwrap().0;
        let chunks = block_status(&mut c, 10, 0, 0, 16 * MIB, &[]);
        assert_eq!(chunks.len(), 4, "{mode:?}: one chunk per context");
        let runs = |name: &str| chunks.iter().find(|(i, _)| *i == id(name)).unwrap().1.clone();
        let (base, mon_map, era, tue_map) = (
            runs("base:allocation"),
            runs("qemu:dirty-bitmap:mon"),
            runs("ringnbd:era"),
            runs("qemu:dirty-bitmap:tue"),
        );
        for (at, base_status, since_mon, since_tue, last_era) in [
            (0, 0, 0, 0, 1),   // data; written in era 1, before mon
            (MIB, 0, 1, 1, 3), // written after mon, then again after tue
            (2 * MIB, 0, 1, 1, 3),
            (4 * MIB, 3, 0, 0, 0), // never written: a hole, no era
        ] {
            assert_eq!(status_at(&base, 0, at) & 1, base_status & 1, "{mode:?}: allocation at {at}");
            assert_eq!(status_at(&mon_map, 0, at), since_mon, "{mode:?}: since mon at {at}");
            assert_eq!(status_at(&tue_map, 0, at), since_tue, "{mode:?}: since tue at {at}");
            assert_eq!(status_at(&era, 0, at), last_era, "{mode:?}: era at {at}");
        }
        // REQ_ONE: one descriptor in every chunk.
        let one = block_status(&mut c, 11, CMD_FLAG_REQ_ONE, 100, 8 * MIB, &[]);
        assert_eq!(one.len(), 4);
        for (cid, runs) in &one {
            assert_eq!(runs.len(), 1, "{mode:?}: REQ_ONE chunk for {cid}: {runs:?}");
            assert!(runs[0].0 <= 8 * MIB);
        }
        if mode == Mode::Extended {
            // BLOCK_STATUS_PAYLOAD picks any subset, in any order.
            let picked = block_status(
                &mut c,
                12,
                0,
                0,
                0,
                &status_payload(4 * MIB, &[id("ringnbd:era"), id("qemu:dirty-bitmap:mon")]),
            );
            let mut ids: Vec<u32> = picked.iter().map(|(i, _)| *i).collect();
            ids.sort();
            let mut want = vec![id("ringnbd:era"), id("qemu:dirty-bitmap:mon")];
            want.sort();
            assert_eq!(ids, want);
            let era_only =
                block_status(&mut c, 13, CMD_FLAG_REQ_ONE, MIB, 0, &status_payload(MIB, &[id("ringnbd:era")]));
            assert_eq!(era_only, vec![(id("ringnbd:era"), vec![(G, 3)])], "64-bit era status under extended headers");
        }
        c.disconnect();
    }
    c.disconnect();
}

/// Writers on several connections (both workers) while checkpoints are cut:
/// every write lands entirely before or entirely after each checkpoint,
/// consistently with what clients saw.
#[test]
fn checkpoints_cut_concurrent_writes_consistently_on_every_worker() {
    if !require("nbdinfo") {
        return;
    }
    const WRITERS: u64 = 4;
    const CHECKPOINTS: usize = 12;
    let size = 512 * MIB;
    let t = Tracked::new("track-atomic", size);
    let server = t.start(&[]);
    let addr = server.addr();
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // (granule, sent, acknowledged) in microseconds since `started`.
    let log: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (addr, stop, log) = (addr.clone(), Arc::clone(&stop), Arc::clone(&log));
            std::thread::spawn(move || {
                let mut c = Raw::open_mode(&addr, "disk", Mode::Structured);
                // Each granule written once, by one writer.
                let mut g = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && g < size / G {
                    let sent = started.elapsed().as_micros() as u64;
                    c.write_ok(g, g * G, &[w as u8 + 1; 4096]);
                    let acked = started.elapsed().as_micros() as u64;
                    log.lock().unwrap().push((g, sent, acked));
                    g += WRITERS;
                }
                c.disconnect();
            })
        })
        .collect();
    // (era, create sent, create returned)
    let mut cuts = Vec::new();
    for i in 0..CHECKPOINTS {
        std::thread::sleep(Duration::from_millis(30));
        let sent = started.elapsed().as_micros() as u64;
        let era = t.create(&format!("c{i}"));
        cuts.push((era, sent, started.elapsed().as_micros() as u64));
    }
    std::thread::sleep(Duration::from_millis(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());
    // One pass over ringnbd:era gives every granule's era.
    let mut era_of = std::collections::HashMap::new();
    for (offset, length, era) in map(&t.uri(&server), "ringnbd:era") {
        for g in granules(offset, length) {
            era_of.insert(g, era);
        }
    }
    let log = log.lock().unwrap();
    assert!(log.len() > 200, "only {} writes", log.len());
    let mut straddling = 0;
    for &(g, sent, acked) in log.iter() {
        let era = era_of[&g];
        assert!(era >= 1, "granule {g} written but has no era");
        for &(cut_era, cut_sent, cut_returned) in &cuts {
            if acked < cut_sent {
                assert!(
                    era <= cut_era,
                    "write {g} acknowledged before checkpoint {cut_era} was asked for, yet after it"
                );
            } else if sent > cut_returned {
                assert!(era > cut_era, "write {g} sent after checkpoint {cut_era} was cut, yet before it");
            } else {
                straddling += 1;
            }
        }
    }
    // The dirty bitmaps agree with the eras.
    for &(cut_era, _, _) in cuts.iter().step_by(5) {
        let name = format!("qemu:dirty-bitmap:c{}", cut_era - 1);
        let dirty = dirty_granules(&map(&t.uri(&server), &name));
        let want: BTreeSet<u64> = era_of.iter().filter(|&(_, &e)| e > cut_era).map(|(&g, _)| g).collect();
        assert_eq!(dirty, want, "{name} versus ringnbd:era");
    }
    eprintln!(
        "{} writes, {CHECKPOINTS} checkpoints, {straddling} write/checkpoint pairs overlapped in time",
        log.len()
    );
}

// --- the control socket ------------------------------------------------------------

/// One raw line to the control socket; the reply line.
fn control_line(control: &Path, line: &[u8]) -> Value {
    let stream = UnixStream::connect(control).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&stream).write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

fn error_kind(reply: &Value) -> &str {
    assert_eq!(reply["ok"], Value::Bool(false), "{reply}");
    reply["error"]["kind"].as_str().unwrap()
}

#[test]
fn every_control_verb_and_its_errors() {
    let t = Tracked::new("track-control", 8 * MIB);
    let untracked = t.dir.path("plain.img");
    sparse_file(&untracked, MIB);
    let dir = TempDir::new("track-control-other");
    let other = dir.path("other.img");
    sparse_file(&other, MIB);
    // --track covers every file export; this one is untracked because it
    // is served from another server: check "not tracked" there.
    let server = t.start(&["m=memory:4M"]);
    let mode = std::fs::metadata(&t.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    let status = t.ctl_ok(&["status"]);
    assert_eq!(status["workers"], 2);
    assert_eq!(status["exports"][0]["name"], "disk");
    assert_eq!(status["exports"][0]["tracking"]["granule_bytes"], G);
    assert!(status["exports"][1]["tracking"]["state_file"].is_null(), "memory tracks in memory: {status}");

    let created = t.ctl_ok(&["checkpoint", "create", "disk", "mon"]);
    assert_eq!(
        (created["name"].as_str(), created["era"].as_u64(), created["valid"].as_bool()),
        (Some("mon"), Some(1), Some(true))
    );
    assert_eq!(created["contexts"][0], "qemu:dirty-bitmap:mon");
    t.ctl_ok(&["checkpoint", "create", "m", "mem1"]);
    let list = t.ctl_ok(&["checkpoint", "list", "disk"]);
    assert_eq!(list["checkpoints"].as_array().unwrap().len(), 1);
    assert_eq!(list["current_era"], 2);

    for (args, kind) in [
        (&["checkpoint", "create", "nope", "x"][..], "unknown-export"),
        (&["checkpoint", "create", "disk", "mon"], "duplicate"),
        (&["checkpoint", "create", "disk", "has space"], "bad-name"),
        (&["checkpoint", "create", "disk", &"x".repeat(200)], "bad-name"),
        (&["checkpoint", "delete", "disk", "tue"], "unknown-checkpoint"),
        (&["checkpoint", "list", "nope"], "unknown-export"),
    ] {
        let (reply, code) = ctl_reply(&t.control, args);
        assert_eq!(error_kind(&reply), kind, "{args:?}");
        assert_eq!(code, 1, "{args:?}: exit code for a refused request");
    }
    // Text output and exit codes of the ctl client.
    let out = run(&binary(), &["ctl", "--control", t.control.to_str().unwrap(), "checkpoint", "list", "disk"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("mon") && text.contains("valid"), "{text}");
    let out = std::process::Command::new(binary())
        .args(["ctl", "status"])
        .env("RINGNBD_CONTROL", &t.control)
        .output()
        .unwrap();
    assert!(out.status.success(), "RINGNBD_CONTROL names the socket");
    let out = run(&binary(), &["ctl", "--control", dir.path("absent.sock").to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(2), "an unreachable server");

    // Raw protocol: ids are echoed, bad lines get clear errors and the
    // connection (and server) carry on.
    let reply = control_line(&t.control, b"{\"id\":42,\"verb\":\"status\"}\n");
    assert_eq!((reply["id"].as_u64(), reply["ok"].as_bool()), (Some(42), Some(true)));
    for (line, kind) in [
        (&b"this is not json\n"[..], "bad-request"),
        (b"{\"id\":1,\"verb\":\"launch-missiles\"}\n", "bad-request"),
        (b"{\"verb\":\"checkpoint-create\",\"export\":\"disk\"}\n", "bad-request"),
        (b"[\"status\"]\n", "bad-request"),
    ] {
        assert_eq!(error_kind(&control_line(&t.control, line)), kind, "{}", String::from_utf8_lossy(line));
    }
    let mut long = vec![b'{'; 70 * 1024];
    long.push(b'\n');
    assert_eq!(error_kind(&control_line(&t.control, &long)), "line-too-long");
    // Several requests on one connection, one of them bad.
    let stream = UnixStream::connect(&t.control).unwrap();
    (&stream)
        .write_all(b"{\"id\":1,\"verb\":\"status\"}\nnope\n{\"id\":3,\"verb\":\"checkpoint-list\",\"export\":\"m\"}\n")
        .unwrap();
    let mut replies = BufReader::new(&stream).lines();
    let ids: Vec<Value> = (0..3)
        .map(|_| serde_json::from_str::<Value>(&replies.next().unwrap().unwrap()).unwrap()["id"].clone())
        .collect();
    assert_eq!(ids, vec![Value::from(1), Value::Null, Value::from(3)]);

    t.ctl_ok(&["checkpoint", "delete", "disk", "mon"]);
    assert!(t.ctl_ok(&["checkpoint", "list", "disk"])["checkpoints"].as_array().unwrap().is_empty());
    assert_eq!(list_contexts(&server.addr(), &["qemu:"]), Vec::<String>::new(), "deleted: no longer offered");

    // An export without tracking says so.
    let plain_control = dir.path("plain.sock");
    let plain = Server::start(&["--control", plain_control.to_str().unwrap(), untracked.to_str().unwrap()]);
    let (reply, _) = ctl_reply(&plain_control, &["checkpoint", "create", "plain.img", "x"]);
    assert_eq!(error_kind(&reply), "not-tracked");
    drop(plain);
    drop(server);
}

#[test]
fn many_control_clients_at_once_while_io_runs() {
    if !require("fio") {
        return;
    }
    let t = Tracked::new("track-control-load", 64 * MIB);
    let server = t.start(&[]);
    let fio = std::process::Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", t.uri(&server)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--time_based=0",
            "--output-format=json",
        ])
        .output();
    let fio = std::thread::spawn(move || fio);
    // Idle clients up to the cap: one more is told there are too many.
    let idle: Vec<UnixStream> = (0..64).map(|_| UnixStream::connect(&t.control).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let extra = UnixStream::connect(&t.control).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(&extra).read_line(&mut line).unwrap();
    assert!(line.contains("too-many-clients"), "{line}");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    // Many busy clients at once.
    let control = t.control.clone();
    let workers: Vec<_> = (0..16)
        .map(|i| {
            let control = control.clone();
            std::thread::spawn(move || {
                for j in 0..15 {
                    let name = format!("c{i}-{j}");
                    let requests = [
                        format!(
                            "{{\"id\":{j},\"verb\":\"checkpoint-create\",\"export\":\"disk\",\"name\":\"{name}\"}}\n"
                        ),
                        "{\"verb\":\"status\"}\n".to_owned(),
                        "{\"verb\":\"checkpoint-list\",\"export\":\"disk\"}\n".to_owned(),
                        format!("{{\"verb\":\"checkpoint-delete\",\"export\":\"disk\",\"name\":\"{name}\"}}\n"),
                    ];
                    for request in requests {
                        let reply = control_line(&control, request.as_bytes());
                        assert_eq!(reply["ok"], Value::Bool(true), "{request}: {reply}");
                    }
                }
            })
        })
        .collect();
    workers.into_iter().for_each(|w| w.join().unwrap());
    let out = fio.join().unwrap().expect("run fio");
    // fio's nbd engine prints a line of its own before the JSON.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = &stdout[stdout.find('{').unwrap_or(0)..];
    let report: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {stdout}"));
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["jobs"][0]["error"], 0, "fio saw I/O errors");
    assert!(t.ctl_ok(&["checkpoint", "list", "disk"])["checkpoints"].as_array().unwrap().is_empty());
}

// --- other exports: memory, read-only, many checkpoints ---------------------------------

#[test]
fn memory_exports_track_and_read_only_exports_serve_their_state() {
    if !require("nbdinfo") {
        return;
    }
    let t = Tracked::new("track-ro", 16 * MIB);
    let mut server = t.start(&["mem=memory:8M"]);
    let mem_uri = uri(&server, Transport::Unix, "mem");
    let mut c = Raw::open_mode(&server.addr(), "mem", Mode::Structured);
    c.write_ok(1, 0, &[1; 512]);
    t.ctl_ok(&["checkpoint", "create", "mem", "m"]);
    c.write_ok(2, 3 * MIB, &[1; 512]);
    c.disconnect();
    assert_eq!(dirty_granules(&map(&mem_uri, "qemu:dirty-bitmap:m")), BTreeSet::from([3 * MIB / G]));
    let mut d = Raw::open_mode(&server.addr(), "disk", Mode::Structured);
    t.create("base");
    d.write_ok(1, 5 * MIB, &[5; 4096]);
    d.disconnect();
    assert_eq!(server.stop(), Some(0));

    let server = t.start(&["-r"]);
    assert_eq!(dirty_granules(&map(&t.uri(&server), "qemu:dirty-bitmap:base")), BTreeSet::from([5 * MIB / G]));
    let (reply, _) = ctl_reply(&t.control, &["checkpoint", "create", "disk", "x"]);
    assert_eq!(error_kind(&reply), "read-only");
    drop(server);
    // Read-only without state to serve is refused, not silently empty.
    let fresh = Tracked::new("track-ro-fresh", MIB);
    let out = run(&binary(), &["--track", "-r", "-l", "127.0.0.1:0", fresh.image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no tracking state"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_export_holds_a_hundred_checkpoints() {
    if !require("nbdinfo") {
        return;
    }
    let t = Tracked::new("track-many", 128 * MIB);
    let server = t.start(&[]);
    let mut c = Raw::open_mode(&server.addr(), "disk", Mode::Structured);
    for i in 0..100u64 {
        t.create(&format!("k{i:03}"));
        c.write_ok(i, i * MIB, &[i as u8; 4096]);
    }
    c.disconnect();
    let listed = list_contexts(&server.addr(), &["qemu:dirty-bitmap:"]);
    assert_eq!(listed.len(), 100);
    // Since k050: the writes of iterations 50..100.
    let want: BTreeSet<u64> = (50..100).map(|i| i * MIB / G).collect();
    assert_eq!(dirty_granules(&map(&t.uri(&server), "qemu:dirty-bitmap:k050")), want);
    for i in 0..100 {
        t.ctl_ok(&["checkpoint", "delete", "disk", &format!("k{i:03}")]);
    }
    assert!(list_contexts(&server.addr(), &["qemu:dirty-bitmap:"]).is_empty());
}
