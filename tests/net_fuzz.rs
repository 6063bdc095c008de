//! A network fuzzer against the live server: mutated handshakes and
//! requests, lying payload lengths, truncation at every byte and resets, on
//! hundreds of connections, while a well-behaved client writes and verifies
//! its own data on a file and a memory export. The server must not crash,
//! the good client must never wait more than a second or read a wrong byte,
//! and afterwards descriptors and threads are back where they started.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::raw::{self, Mode, Raw};
use common::*;

const MIB: u64 = 1 << 20;
const FUZZ_SECONDS: u64 = 8;
const FUZZERS: u64 = 4;

/// A well-formed client transcript: flags, options, GO on `name`.
fn handshake_bytes(rng: &mut Rng, name: &str) -> (Vec<u8>, Mode) {
    let mut out = (raw::C_FIXED_NEWSTYLE | raw::C_NO_ZEROES).to_be_bytes().to_vec();
    let mode = match rng.below(3) {
        0 => Mode::Simple,
        1 => Mode::Structured,
        _ => Mode::Extended,
    };
    match mode {
        Mode::Structured => out.extend(raw::option_frame(raw::OPT_STRUCTURED_REPLY, &[])),
        Mode::Extended => out.extend(raw::option_frame(raw::OPT_EXTENDED_HEADERS, &[])),
        Mode::Simple => {}
    }
    if mode != Mode::Simple && rng.chance(50) {
        out.extend(raw::option_frame(raw::OPT_SET_META_CONTEXT, &raw::meta_data(name, &["base:allocation"])));
    }
    if rng.chance(20) {
        out.extend(raw::option_frame(raw::OPT_LIST, &[]));
    }
    out.extend(raw::option_frame(raw::OPT_GO, &raw::info_data(name, &[raw::INFO_BLOCK_SIZE])));
    (out, mode)
}

/// A burst of plausible requests inside the fuzz exports.
fn request_bytes(rng: &mut Rng, mode: Mode, count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for cookie in 0..count as u64 {
        let kind = [
            raw::CMD_READ,
            raw::CMD_WRITE,
            raw::CMD_TRIM,
            raw::CMD_WRITE_ZEROES,
            raw::CMD_FLUSH,
            raw::CMD_BLOCK_STATUS,
            raw::CMD_CACHE,
        ][rng.below(7) as usize];
        let offset = rng.below(64 * MIB);
        let range = if rng.chance(10) { 33 * MIB } else { 70_000 };
        let length = 1 + rng.below(range);
        let flags = if rng.chance(20) { rng.below(64) as u16 } else { 0 };
        match mode {
            Mode::Extended => out.extend(raw::extended_request_bytes(flags, kind, cookie, offset, length)),
            _ => out.extend(raw::request_bytes(flags, kind, cookie, offset, length as u32)),
        }
        if kind == raw::CMD_WRITE {
            // Sometimes the payload lies about its length.
            let sent = match rng.below(4) {
                0 => rng.below(length),
                1 => length + rng.below(100),
                _ => length,
            };
            let sent = sent.min(2 * MIB) as usize;
            out.extend(rng.bytes(sent));
        }
    }
    out
}

/// Flips, overwrites, inserts or deletes a few bytes.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            return;
        }
        let at = rng.below(bytes.len() as u64) as usize;
        match rng.below(4) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next() as u8,
            2 => bytes.insert(at, rng.next() as u8),
            _ => {
                bytes.remove(at);
            }
        }
    }
}

/// One hostile connection; never panics on what the server does.
fn fuzz_connection(addr: &str, rng: &mut Rng) {
    let Ok(mut s) = TcpStream::connect(addr) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let mut greeting = [0u8; 18];
    if s.read_exact(&mut greeting).is_err() {
        return;
    }
    let name = ["", "fuzz-file", "fuzz-mem"][rng.below(3) as usize];
    let (mut bytes, mode) = handshake_bytes(rng, name);
    let strategy = rng.below(4);
    if strategy == 0 {
        mutate(rng, &mut bytes);
    }
    let count = 1 + rng.below(40) as usize;
    let mut requests = request_bytes(rng, mode, count);
    if strategy == 1 {
        mutate(rng, &mut requests);
    }
    bytes.extend(requests);
    // Truncate anywhere: in the handshake, a header, or a payload.
    if strategy == 2 || rng.chance(30) {
        bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize);
    }
    for piece in bytes.chunks(1 + rng.below(70_000) as usize) {
        if s.write_all(piece).is_err() {
            break;
        }
    }
    // Read a little (or nothing), then go away politely or rudely.
    let mut scratch = vec![0u8; 65536];
    for _ in 0..rng.below(4) {
        if !matches!(s.read(&mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
    if rng.chance(50) {
        raw::reset(s);
    }
}

/// The well-behaved client: writes random blocks to its own export and
/// reads them back, timing every request.
fn good_client(addr: String, export: &'static str, stop: Arc<AtomicBool>, worst_us: Arc<AtomicU64>) -> u64 {
    let mut c = Raw::open_mode(&addr, export, Mode::Structured);
    let mut rng = Rng(export.len() as u64);
    let mut model = vec![0u8; 8 * MIB as usize];
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) {
        let offset = rng.below(8 * MIB - 200_000);
        let len = 1 + rng.below(200_000) as usize;
        let data = rng.bytes(len);
        let start = Instant::now();
        assert_eq!(c.write(rounds * 2, offset, &data).0, 0, "{export}: good write failed");
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        let check = rng.below(8 * MIB - 300_000);
        let back = c.read(rounds * 2 + 1, check, 300_000).expect("good read failed");
        worst_us.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        assert!(back == model[check as usize..check as usize + 300_000], "{export}: corruption near {check}");
        rounds += 1;
    }
    c.disconnect();
    rounds
}

#[test]
fn fuzzed_clients_never_crash_stall_or_corrupt_and_leave_nothing_behind() {
    let dir = TempDir::new("net-fuzz");
    let (fuzz_file, good_file) = (dir.path("fuzz.img"), dir.path("good.img"));
    sparse_file(&fuzz_file, 64 * MIB);
    sparse_file(&good_file, 8 * MIB);
    let exports = [
        format!("fuzz-file={}", fuzz_file.display()),
        "fuzz-mem=memory:64M".to_owned(),
        format!("good-file={}", good_file.display()),
        "good-mem=memory:8M".to_owned(),
    ];
    let mut args: Vec<&str> = exports.iter().map(String::as_str).collect();
    args.extend(["--handshake-timeout", "2", "--stall-timeout", "2"]);
    let mut server = Server::start(&args);
    let addr = server.addr();
    // Warm up so lazily opened descriptors (each worker's lookup helper
    // opens the files it scans) are in the baseline: connections held open
    // together land on every worker.
    let mut warm = Vec::new();
    for export in ["fuzz-file", "fuzz-file", "good-file", "good-file"] {
        let mut c = Raw::handshake(&addr, raw::C_FIXED_NEWSTYLE | raw::C_NO_ZEROES);
        c.option(raw::OPT_STRUCTURED_REPLY, &[]);
        c.option_reply();
        c.option(raw::OPT_SET_META_CONTEXT, &raw::meta_data(export, &["base:allocation"]));
        while c.option_reply().1 != raw::REP_ACK {}
        c.go(export);
        c.mode = Mode::Structured;
        c.request(0, raw::CMD_BLOCK_STATUS, 1, 0, 4096);
        assert_eq!(c.chunk().kind, raw::CHUNK_BLOCK_STATUS, "warm-up block status");
        warm.push(c);
    }
    warm.into_iter().for_each(Raw::disconnect);
    std::thread::sleep(Duration::from_millis(300));
    let fds = fd_targets(server.pid());
    let threads = own_threads(server.pid()).len();

    let stop = Arc::new(AtomicBool::new(false));
    let worst_us = Arc::new(AtomicU64::new(0));
    let good: Vec<_> = ["good-file", "good-mem"]
        .into_iter()
        .map(|export| {
            let (addr, stop, worst) = (addr.clone(), Arc::clone(&stop), Arc::clone(&worst_us));
            std::thread::spawn(move || good_client(addr, export, stop, worst))
        })
        .collect();
    let connections = Arc::new(AtomicU64::new(0));
    let fuzzers: Vec<_> = (0..FUZZERS)
        .map(|seed| {
            let (addr, stop, connections) = (addr.clone(), Arc::clone(&stop), Arc::clone(&connections));
            std::thread::spawn(move || {
                let mut rng = Rng(0xf0f0 + seed);
                while !stop.load(Ordering::Relaxed) {
                    fuzz_connection(&addr, &mut rng);
                    connections.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(FUZZ_SECONDS));
    stop.store(true, Ordering::Relaxed);
    for f in fuzzers {
        f.join().unwrap();
    }
    let rounds: Vec<u64> = good.into_iter().map(|g| g.join().expect("good client failed")).collect();
    let connections = connections.load(Ordering::Relaxed);
    let worst = Duration::from_micros(worst_us.load(Ordering::Relaxed));
    eprintln!("{connections} fuzzed connections; good client rounds {rounds:?}; worst good request {worst:?}");
    assert!(server.is_running(), "the server died");
    assert!(connections >= 300, "only {connections} fuzzed connections");
    assert!(worst < Duration::from_secs(1), "a good request took {worst:?}");
    assert!(rounds.iter().all(|&r| r > 20), "good clients barely ran: {rounds:?}");

    // Everything the fuzzers opened is gone once timeouts have run.
    let deadline = Instant::now() + Duration::from_secs(15);
    let kernel_workers = |pid| thread_names(pid).iter().filter(|n| n.starts_with("iou-wrk")).count();
    let leaked = |pid| fd_targets(pid).into_iter().filter(|t| !fds.contains(t)).collect::<Vec<_>>();
    while (!leaked(server.pid()).is_empty() || own_threads(server.pid()).len() > threads) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = leaked(server.pid());
    if !left.is_empty() {
        // Say which sockets they are (state, queues, peer).
        let ss = std::process::Command::new("ss").args(["-tanpei"]).output().unwrap();
        let text = String::from_utf8_lossy(&ss.stdout);
        let inodes: Vec<&str> = left.iter().map(|t| t.trim_start_matches("socket:[").trim_end_matches(']')).collect();
        text.lines().filter(|l| inodes.iter().any(|i| l.contains(i))).for_each(|l| eprintln!("still open: {l}"));
    }
    assert_eq!(left, Vec::<String>::new(), "descriptors back to baseline");
    assert_eq!(own_threads(server.pid()).len(), threads, "threads back to baseline: {:?}", thread_names(server.pid()));
    // io_uring's kernel workers (for fallocate, fsync) are capped per ring
    // (8 bounded + 4 unbounded) and exit when idle, one at a time.
    let kernel_workers = kernel_workers(server.pid());
    assert!(kernel_workers <= 2 * 12, "{kernel_workers} io_uring workers: the per-ring cap is not applied");
    assert_eq!(server.stop(), Some(0));
}

fn thread_names(pid: u32) -> Vec<String> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    tasks.iter().map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_owned()).collect()
}

/// The server's own threads (io_uring's kernel workers excluded).
/// The server's own threads, less the handshake threads it keeps for the
/// next clients (at most 4, see `net::accept`): io_uring's kernel workers
/// are counted apart.
fn own_threads(pid: u32) -> Vec<String> {
    const KEPT_HANDSHAKE_THREADS_MAX: usize = 4;
    let mut kept = 0;
    thread_names(pid)
        .into_iter()
        .filter(|n| !n.starts_with("iou-"))
        .filter(|n| {
            let is_kept = n.starts_with("ringnbd-handsha") && kept < KEPT_HANDSHAKE_THREADS_MAX;
            kept += is_kept as usize;
            !is_kept
        })
        .collect()
}

/// What each open descriptor refers to (sockets by inode, files by path),
/// as a sorted list so a baseline can be compared entry by entry.
fn fd_targets(pid: u32) -> Vec<String> {
    let entries =
        std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    let mut targets: Vec<String> =
        entries.iter().filter_map(|e| std::fs::read_link(e.path()).ok()).map(|t| t.display().to_string()).collect();
    targets.sort();
    targets
}
