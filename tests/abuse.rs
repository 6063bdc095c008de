//! Robustness under abuse: many connections, stalled and silent clients,
//! clients vanishing mid-payload or mid-handshake, random garbage, and
//! SIGTERM under load. After every abuse the server must still be running
//! and a fresh, well-behaved client must read back what it wrote.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

// Wire constants and the raw client are in common::raw.
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

// --- seeded PRNG ------------------------------------------------------------------

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng(seed).bytes(len)
}

/// python3-libnbd under a wall-clock limit.
fn py(script: &str, args: &[&str]) -> String {
    let mut full = vec!["120", PYTHON, "-c", script];
    full.extend_from_slice(args);
    run_ok("timeout", &full)
}

/// A fresh libnbd client writes a random pattern at `offset` and reads it
/// back (the raw client stands in where python3-libnbd is missing).
fn fresh_client_round_trip(server: &mut Server, uri: &str, name: &str, offset: u64) {
    assert!(server.is_running(), "server died");
    if require("nbd-python") {
        py(
            r#"
import os, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
offset = int(sys.argv[2])
data = os.urandom(256 * 1024 + 4096)
h.pwrite(data, offset)
h.flush()
assert h.pread(len(data), offset) == data, "fresh client read back wrong data"
h.shutdown()
"#,
            &[uri, &offset.to_string()],
        );
    }
    let data = pattern(offset ^ 0x5eed, 64 * 1024);
    let mut c = Raw::open(&server.addr(), name);
    c.write_ok(1, offset + 512 * KIB, &data);
    assert_eq!(c.read_ok(2, offset + 512 * KIB, data.len() as u32), data, "raw fresh client");
    c.disconnect();
}

// --- tests -----------------------------------------------------------------------------

#[test]
fn two_hundred_concurrent_connections_each_round_trip_their_own_region() {
    const CLIENTS: usize = 200;
    let mut server = Server::start(&["memory:256M"]);
    let addr = server.addr();
    let opened = Arc::new(Barrier::new(CLIENTS));
    let written = Arc::new(Barrier::new(CLIENTS));
    let (done_tx, done_rx) = mpsc::channel();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, opened, written) = (addr.clone(), Arc::clone(&opened), Arc::clone(&written));
            let done = done_tx.clone();
            thread::spawn(move || {
                let mut c = Raw::open(&addr, "");
                opened.wait(); // all 200 negotiated and open at once
                let data = pattern(i as u64, 64 * 1024 + i * 7);
                let offset = i as u64 * MIB + i as u64;
                c.write_ok(i as u64, offset, &data);
                written.wait(); // every write done before anyone reads
                assert_eq!(c.read_ok(i as u64 + 1000, offset, data.len() as u32), data, "client {i}");
                c.disconnect();
                done.send(i).unwrap();
            })
        })
        .collect();
    // A client that fails leaves the others waiting at a barrier: time out
    // rather than hang.
    for _ in 0..CLIENTS {
        done_rx.recv_timeout(Duration::from_secs(60)).expect("a client failed (see its panic above) or hung");
    }
    for (i, t) in threads.into_iter().enumerate() {
        t.join().unwrap_or_else(|_| panic!("client {i} failed"));
    }
    // One client checks every region: nothing landed in the wrong place.
    let mut c = Raw::open(&addr, "");
    for i in 0..CLIENTS {
        let data = pattern(i as u64, 64 * 1024 + i * 7);
        assert_eq!(c.read_ok(i as u64, i as u64 * MIB + i as u64, data.len() as u32), data, "region {i}");
    }
    let uri = server.tcp_uri.clone().unwrap();
    fresh_client_round_trip(&mut server, &uri, "", 240 * MIB);
}

/// connect + greeting + flags + GO.
fn time_negotiation(addr: &str) -> Duration {
    let start = Instant::now();
    let c = Raw::open(addr, "");
    let elapsed = start.elapsed();
    c.disconnect();
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn stalled_clients_do_not_delay_new_handshakes() {
    let mut server = Server::start(&["memory:64M"]);
    let addr = server.addr();
    time_negotiation(&addr); // warm-up
    let baseline = median((0..7).map(|_| time_negotiation(&addr)).collect());

    // 64 stalled clients: half send nothing at all, half stop mid-option.
    let mut stalled = Vec::new();
    for i in 0..64 {
        let mut s = TcpStream::connect(&addr).unwrap();
        if i % 2 == 1 {
            let mut greeting = [0u8; 18];
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.read_exact(&mut greeting).unwrap();
            s.write_all(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
        }
        stalled.push(s);
    }
    thread::sleep(Duration::from_millis(200));
    let samples: Vec<Duration> = (0..7).map(|_| time_negotiation(&addr)).collect();
    let worst = *samples.iter().max().unwrap();
    let with_stalled = median(samples);
    eprintln!("negotiation: baseline {baseline:?}, with 64 stalled clients {with_stalled:?} (worst {worst:?})");
    assert!(worst < Duration::from_secs(2), "a negotiation took {worst:?} with stalled clients present");
    assert!(
        with_stalled <= baseline + Duration::from_millis(500),
        "stalled clients slowed negotiation from {baseline:?} to {with_stalled:?}"
    );
    // A full libnbd client works alongside them too.
    let uri = server.tcp_uri.clone().unwrap();
    fresh_client_round_trip(&mut server, &uri, "", 0);
    drop(stalled);
    fresh_client_round_trip(&mut server, &uri, "", 4 * MIB);
}

#[test]
fn handshake_timeout_drops_silent_clients_but_not_negotiated_ones() {
    let mut server = Server::start(&["--handshake-timeout", "1", "memory:64M"]);
    let addr = server.addr();
    // Negotiated before the silent clients arrive, then idle past the timeout.
    let mut idle = Raw::open(&addr, "");
    idle.write_ok(1, 0, b"idle client data");

    // A silent client: reads the greeting and then says nothing.
    let silent_addr = addr.clone();
    let silent = thread::spawn(move || {
        let start = Instant::now();
        let mut c = Raw::connect(&silent_addr);
        c.greeting();
        c.closed_within(Duration::from_secs(5)).map(|_| start.elapsed())
    });
    // A slow client: one byte of its client flags every 300 ms, forever.
    let drip_addr = addr.clone();
    let drip = thread::spawn(move || {
        let mut c = Raw::connect(&drip_addr);
        c.greeting();
        let start = Instant::now();
        let frame = option_frame(OPT_GO, &info_data("", &[]));
        let bytes: Vec<u8> = (C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes().into_iter().chain(frame).collect();
        for b in bytes {
            if c.s.write_all(&[b]).is_err() {
                break;
            }
            if c.closed_within(Duration::from_millis(300)).is_some() {
                return Some(start.elapsed());
            }
        }
        c.closed_within(Duration::from_secs(5)).map(|d| d + start.elapsed())
    });
    // Well-behaved clients keep negotiating and working meanwhile.
    let mut rounds = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        let mut c = Raw::open(&addr, "");
        let data = pattern(rounds, 4096);
        c.write_ok(rounds, MIB + rounds * 4096, &data);
        assert_eq!(c.read_ok(rounds, MIB + rounds * 4096, 4096), data);
        c.disconnect();
        rounds += 1;
    }
    assert!(rounds >= 3, "only {rounds} normal clients completed in 1.5 s");

    let closed = silent.join().unwrap().expect("silent client was never disconnected");
    eprintln!("silent client dropped after {closed:?}");
    assert!(closed >= Duration::from_millis(700), "dropped too early: {closed:?}");
    assert!(closed <= Duration::from_secs(3), "dropped too late: {closed:?}");
    let dripped = drip.join().unwrap().expect("dripping client was never disconnected");
    eprintln!("dripping client dropped after {dripped:?}");
    assert!(dripped <= Duration::from_secs(3), "the handshake deadline is per handshake, not per read: {dripped:?}");

    // The negotiated connection outlived the handshake timeout.
    assert_eq!(idle.read_ok(2, 0, 16), b"idle client data");
    let uri = server.tcp_uri.clone().unwrap();
    fresh_client_round_trip(&mut server, &uri, "", 8 * MIB);
}

#[test]
fn clients_dropping_mid_payload_and_mid_handshake() {
    let dir = TempDir::new("abuse-drop");
    let path = dir.path("disk.img");
    sparse_file(&path, 64 * MIB);
    let file_arg = format!("file={}", path.display());
    let mut server = Server::start(&["mem=memory:64M", &file_arg]);
    let addr = server.addr();
    let keep = pattern(77, MIB as usize);
    for name in ["mem", "file"] {
        let mut c = Raw::open(&addr, name);
        c.write_ok(1, 0, &keep);
        c.disconnect();
    }

    for round in 0..2u64 {
        // 50 clients send a WRITE header for 1 MiB and half the payload, then vanish.
        let mid_payload: Vec<_> = (0..50u64)
            .map(|i| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let name = if i % 2 == 0 { "mem" } else { "file" };
                    let mut c = Raw::open(&addr, name);
                    let offset = (2 + (i + round) % 8) * MIB + if i % 3 == 0 { 1 } else { 0 };
                    let mut m = request_bytes(0, CMD_WRITE, i, offset, MIB as u32);
                    m.extend_from_slice(&pattern(i, MIB as usize / 2));
                    c.send(&m);
                    if i % 4 == 0 {
                        let _ = c.s.shutdown(Shutdown::Write);
                    }
                })
            })
            .collect();
        // 50 clients abandon the handshake at different points.
        let mid_handshake: Vec<_> = (0..50u64)
            .map(|i| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let mut c = Raw::connect(&addr);
                    match i % 6 {
                        0 => {}
                        1 => {
                            let mut part = [0u8; 7];
                            let _ = c.s.read_exact(&mut part);
                        }
                        2 => {
                            c.greeting();
                            c.send(&[0, 0]);
                        }
                        3 => {
                            c.greeting();
                            c.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes());
                            let frame = option_frame(OPT_GO, &info_data("mem", &[]));
                            c.send(&frame[..frame.len() - 3]);
                        }
                        4 => {
                            c.greeting();
                            c.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes());
                            let mut m = option_frame(OPT_INFO, &info_data("file", &[]));
                            m.extend_from_slice(&option_frame(OPT_GO, &info_data("file", &[])));
                            c.send(&m); // and never read the replies
                        }
                        _ => {
                            c.greeting();
                            c.send(&C_FIXED_NEWSTYLE.to_be_bytes());
                            c.send(&option_frame(OPT_EXPORT_NAME, b"mem")[..12]);
                        }
                    }
                })
            })
            .collect();
        for t in mid_payload.into_iter().chain(mid_handshake) {
            t.join().expect("abuse thread");
        }
    }
    thread::sleep(Duration::from_millis(300));
    assert!(server.is_running());
    for name in ["mem", "file"] {
        let mut c = Raw::open(&addr, name);
        assert_eq!(c.read_ok(1, 0, MIB as u32), keep, "{name}: data written before the abuse");
        c.disconnect();
    }
    // Leaked request buffers would starve large requests: 32 MiB still works.
    for name in ["mem", "file"] {
        let big = pattern(99, 32 * MIB as usize);
        let mut c = Raw::open(&addr, name);
        c.write_ok(1, 16 * MIB, &big);
        assert!(c.read_ok(2, 16 * MIB, big.len() as u32) == big, "{name}: 32 MiB round trip after drops");
        c.disconnect();
    }
    for name in ["mem", "file"] {
        let uri = server.export_uri(name);
        fresh_client_round_trip(&mut server, &uri, name, 48 * MIB);
    }
}

/// One connection's worth of handshake garbage.
fn garbage_handshake(addr: &str, rng: &mut Rng) {
    let Ok(mut s) = TcpStream::connect(addr) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    let mut out = Vec::new();
    let mode = rng.below(4);
    if mode > 0 {
        let mut greeting = [0u8; 18];
        if s.read_exact(&mut greeting).is_err() {
            return;
        }
    }
    match mode {
        0 => out = rng.some_bytes(300),
        1 => {
            out.extend_from_slice(&(rng.next() as u32).to_be_bytes());
            out.extend_from_slice(&rng.some_bytes(200));
        }
        _ => {
            let flags = if rng.chance(80) { C_FIXED_NEWSTYLE | C_NO_ZEROES } else { rng.below(4) as u32 };
            out.extend_from_slice(&flags.to_be_bytes());
            for _ in 0..1 + rng.below(6) {
                let option = if rng.chance(70) { rng.below(13) as u32 } else { rng.next() as u32 };
                let data = if mode == 3 && rng.chance(70) {
                    // Structured but wrong: lying lengths and counts.
                    let mut d = Vec::new();
                    d.extend_from_slice(&(rng.below(40) as u32).to_be_bytes());
                    d.extend_from_slice(&rng.some_bytes(20));
                    d.extend_from_slice(&(rng.next() as u16).to_be_bytes());
                    d.extend_from_slice(&rng.some_bytes(20));
                    d
                } else {
                    rng.some_bytes(256)
                };
                let mut frame = option_frame(option, &data);
                if rng.chance(10) {
                    frame[rng.below(8) as usize] ^= 0x40; // bad option magic
                }
                if rng.chance(10) {
                    frame[12..16].copy_from_slice(&(rng.next() as u32).to_be_bytes()); // lying length
                }
                out.extend_from_slice(&frame);
            }
        }
    }
    if s.write_all(&out).is_err() {
        return;
    }
    let mut scratch = [0u8; 4096];
    while let Ok(n) = s.read(&mut scratch) {
        if n == 0 {
            break;
        }
    }
}

/// A valid handshake (random reply mode) followed by random requests.
/// Returns how many requests were sent after a successful GO.
fn garbage_requests(addr: &str, rng: &mut Rng) -> usize {
    let mut sent = 0;
    garbage_requests_inner(addr, rng, &mut sent);
    sent
}

fn garbage_requests_inner(addr: &str, rng: &mut Rng, sent: &mut usize) {
    let Ok(mut s) = TcpStream::connect(addr) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(300)));
    let mut greeting = [0u8; 18];
    if s.read_exact(&mut greeting).is_err() {
        return;
    }
    let mut hello = (C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes().to_vec();
    let mode = rng.below(3); // simple, structured, extended
    let mut expected_acks = 0;
    if mode == 1 {
        hello.extend_from_slice(&option_frame(OPT_STRUCTURED_REPLY, &[]));
        expected_acks += 1;
    } else if mode == 2 {
        hello.extend_from_slice(&option_frame(OPT_EXTENDED_HEADERS, &[]));
        expected_acks += 1;
    }
    let export: &[u8] = if rng.chance(50) { b"junk" } else { b"jfile" };
    if mode > 0 && rng.chance(50) {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        hello.extend_from_slice(&option_frame(OPT_SET_META_CONTEXT, &d));
        expected_acks += 1;
    }
    hello.extend_from_slice(&option_frame(OPT_GO, &info_data(std::str::from_utf8(export).unwrap(), &[])));
    expected_acks += 1;
    if s.write_all(&hello).is_err() {
        return;
    }
    // Read option replies until the GO's ACK.
    while expected_acks > 0 {
        let mut h = [0u8; 20];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let mut data = vec![0u8; be32(&h[16..]) as usize];
        if s.read_exact(&mut data).is_err() {
            return;
        }
        if be32(&h[12..]) == REP_ACK {
            expected_acks -= 1;
        }
    }
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let export_bytes = 64 * MIB;
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(40) {
        let extended = mode == 2;
        let mut h = rng.bytes(if extended { 32 } else { 28 });
        if rng.chance(85) {
            let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
            h[0..4].copy_from_slice(&magic.to_be_bytes());
            let kind = if rng.chance(90) { rng.below(10) as u16 } else { rng.next() as u16 };
            h[6..8].copy_from_slice(&kind.to_be_bytes());
            if rng.chance(60) {
                h[4..6].copy_from_slice(&((rng.next() as u16) & 0x3f).to_be_bytes());
            }
            let small = rng.chance(80);
            let offset = if small { rng.below(export_bytes) } else { rng.next() };
            h[16..24].copy_from_slice(&offset.to_be_bytes());
            let length = if small { rng.below(256 * KIB) } else { rng.next() };
            if extended {
                h[24..32].copy_from_slice(&length.to_be_bytes());
            } else {
                h[24..28].copy_from_slice(&(length as u32).to_be_bytes());
            }
            out.extend_from_slice(&h);
            *sent += 1;
            if kind == CMD_WRITE && small {
                out.extend_from_slice(&rng.bytes(length as usize));
            }
        } else {
            out.extend_from_slice(&h);
            *sent += 1;
        }
        if rng.chance(20) && s.write_all(&std::mem::take(&mut out)).is_err() {
            return;
        }
        // Drain some replies so the server is not always blocked on us.
        let mut scratch = [0u8; 16 * 1024];
        if rng.chance(30) {
            let _ = s.read(&mut scratch);
        }
    }
    let _ = s.write_all(&out);
    let mut scratch = [0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_millis(100);
    while Instant::now() < deadline {
        match s.read(&mut scratch) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[test]
fn random_garbage_handshakes_and_requests_leave_data_intact() {
    let dir = TempDir::new("abuse-garbage");
    let (dfile, jfile) = (dir.path("data.img"), dir.path("junk.img"));
    sparse_file(&dfile, 64 * MIB);
    sparse_file(&jfile, 64 * MIB);
    let (dfile_arg, jfile_arg) = (format!("dfile={}", dfile.display()), format!("jfile={}", jfile.display()));
    let mut server = Server::start(&["data=memory:64M", "junk=memory:64M", &dfile_arg, &jfile_arg]);
    let addr = server.addr();
    let keep = pattern(4242, 4 * MIB as usize);
    let mut good = Raw::open(&addr, "data");
    good.write_ok(1, MIB, &keep);
    let mut good_file = Raw::open(&addr, "dfile");
    good_file.write_ok(1, MIB, &keep);

    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..12u64)
        .map(|t| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            let (connections, requests) = (Arc::clone(&connections), Arc::clone(&requests));
            thread::spawn(move || {
                let mut rng = Rng(0xa11ce ^ (t << 32));
                while !stop.load(Ordering::Relaxed) {
                    if t % 2 == 0 {
                        garbage_handshake(&addr, &mut rng);
                    } else {
                        requests.fetch_add(garbage_requests(&addr, &mut rng), Ordering::Relaxed);
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Meanwhile the well-behaved client keeps working on its own export.
    let start = Instant::now();
    let mut round = 0u64;
    while start.elapsed() < Duration::from_secs(4) {
        let data = pattern(round, 64 * 1024);
        good.write_ok(100 + round, 8 * MIB + (round % 64) * 64 * KIB, &data);
        assert_eq!(good.read_ok(200 + round, 8 * MIB + (round % 64) * 64 * KIB, data.len() as u32), data);
        round += 1;
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("garbage thread");
    }
    let (connections, requests) = (connections.load(Ordering::Relaxed), requests.load(Ordering::Relaxed));
    eprintln!("garbage: {connections} connections, {requests} requests after GO, {round} good round trips");
    assert!(connections > 100, "too few garbage connections to mean anything");
    assert!(requests > 1000, "too few garbage requests reached transmission");
    thread::sleep(Duration::from_millis(200));
    assert!(server.is_running(), "server died under garbage");
    assert!(good.read_ok(2, MIB, keep.len() as u32) == keep, "data written before the garbage is intact");
    assert!(good_file.read_ok(2, MIB, keep.len() as u32) == keep, "file data written before the garbage is intact");
    for name in ["data", "dfile"] {
        let mut fresh = Raw::open(&addr, name);
        assert!(fresh.read_ok(3, MIB, keep.len() as u32) == keep, "{name}: a fresh client sees the same data");
        fresh.disconnect();
    }
    for name in ["data", "junk", "dfile", "jfile"] {
        let uri = server.export_uri(name);
        fresh_client_round_trip(&mut server, &uri, name, 40 * MIB);
    }
}

#[test]
fn sigterm_with_requests_in_flight_exits_zero_and_keeps_acknowledged_writes() {
    const WRITE_BYTES: u64 = 64 * KIB;
    const WRITES: u64 = 2048; // 128 MiB at most
    let dir = TempDir::new("abuse-sigterm");
    let path = dir.path("disk.img");
    sparse_file(&path, WRITES * WRITE_BYTES);
    let mut server = Server::start(&[path.to_str().unwrap()]);
    let addr = server.addr();
    let c = Raw::open(&addr, "");
    let mut reader = c.s.try_clone().unwrap();
    let mut writer = c.s;

    let sender = thread::spawn(move || {
        let mut sent = 0;
        for i in 0..WRITES {
            let mut m = request_bytes(0, CMD_WRITE, i, i * WRITE_BYTES, WRITE_BYTES as u32);
            m.extend_from_slice(&pattern(i, WRITE_BYTES as usize));
            if writer.write_all(&m).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let (acked_tx, acked_rx) = mpsc::channel();
    let receiver = thread::spawn(move || {
        let mut replies = Vec::new();
        let mut header = [0u8; 16];
        while reader.read_exact(&mut header).is_ok() {
            assert_eq!(be32(&header), SIMPLE_REPLY_MAGIC, "reply magic");
            replies.push((be64(&header[8..]), be32(&header[4..])));
            if replies.len() == 16 {
                let _ = acked_tx.send(());
            }
        }
        replies
    });
    acked_rx.recv_timeout(Duration::from_secs(30)).expect("16 writes acknowledged");
    let start = Instant::now();
    assert_eq!(server.stop(), Some(0), "SIGTERM with requests in flight must exit 0");
    let shutdown = start.elapsed();
    eprintln!("shutdown took {shutdown:?}");
    assert!(shutdown < Duration::from_secs(10), "shutdown took {shutdown:?}");
    let sent = sender.join().unwrap();
    let replies = receiver.join().unwrap();
    let ok: Vec<u64> = replies.iter().filter(|r| r.1 == 0).map(|r| r.0).collect();
    eprintln!("sent {sent} writes, {} replies, {} successful", replies.len(), ok.len());
    for &(cookie, error) in &replies {
        assert!(error == 0 || error == ESHUTDOWN, "write {cookie} failed with {error}");
        assert!(cookie < WRITES, "unknown cookie {cookie}");
    }
    assert!(ok.len() >= 16);
    let disk = std::fs::read(&path).unwrap();
    for &i in &ok {
        let at = (i * WRITE_BYTES) as usize;
        assert!(
            disk[at..at + WRITE_BYTES as usize] == pattern(i, WRITE_BYTES as usize)[..],
            "acknowledged write {i} is not on disk"
        );
    }
}

#[test]
fn sigterm_while_clients_are_mid_handshake_exits_zero() {
    let dir = TempDir::new("abuse-sigterm-handshake");
    let path = dir.path("disk.img");
    sparse_file(&path, 4 * MIB);
    let mut server = Server::start(&[path.to_str().unwrap()]);
    let addr = server.addr();
    let mut c = Raw::open(&addr, "");
    let data = pattern(3, 64 * 1024);
    c.write_ok(1, 0, &data);
    // One client has read the greeting and gone quiet; another is mid-option.
    let mut stuck = Raw::connect(&addr);
    stuck.greeting();
    let mut partial = Raw::connect(&addr);
    partial.greeting();
    partial.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes());
    partial.send(&IHAVEOPT.to_be_bytes());
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    assert_eq!(server.stop(), Some(0), "SIGTERM with clients mid-handshake must exit 0");
    assert!(start.elapsed() < Duration::from_secs(10), "shutdown took {:?}", start.elapsed());
    assert!(stuck.closed_within(Duration::from_secs(5)).is_some(), "mid-handshake client closed at exit");
    assert!(partial.closed_within(Duration::from_secs(5)).is_some(), "mid-handshake client closed at exit");
    assert!(c.closed_within(Duration::from_secs(5)).is_some(), "negotiated client closed at exit");
    assert!(std::fs::read(&path).unwrap()[..data.len()] == data[..], "acknowledged write on disk");
}

/// Sends SIGTERM and waits up to `limit` for the server to exit, without
/// reaping it (WNOWAIT), so `stop()` can still collect the exit code.
fn sigterm_and_wait(server: &Server, limit: Duration) -> Option<Duration> {
    let pid = server.pid();
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: valid pointer to a local siginfo_t.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        // SAFETY: si_pid is valid for a waitid result.
        if rc == 0 && unsafe { info.si_pid() } != 0 {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_is_not_held_up_by_a_client_stalled_mid_payload() {
    let mut server = Server::start(&["memory:64M"]);
    let mut good = Raw::open(&server.addr(), "");
    good.write_ok(1, 0, b"acknowledged");
    // Half of a 1 MiB WRITE payload, then silence with the socket open.
    let mut stalled = Raw::open(&server.addr(), "");
    let mut m = request_bytes(0, CMD_WRITE, 1, MIB, MIB as u32);
    m.extend_from_slice(&pattern(1, MIB as usize / 2));
    stalled.send(&m);
    thread::sleep(Duration::from_millis(200));
    let took = sigterm_and_wait(&server, Duration::from_secs(10));
    assert!(took.is_some(), "server still running 10 s after SIGTERM: a client stalled mid-payload blocks shutdown");
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn sigterm_is_not_held_up_by_a_client_that_never_reads_replies() {
    let mut server = Server::start(&["memory:64M"]);
    let mut c = Raw::open(&server.addr(), "");
    c.write_ok(1, 0, &pattern(1, MIB as usize));
    // 64 READs of 1 MiB, none of whose replies is ever read.
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..64 {
        if c.s.write_all(&request_bytes(0, CMD_READ, i, 0, MIB as u32)).is_err() {
            break;
        }
    }
    thread::sleep(Duration::from_millis(200));
    let took = sigterm_and_wait(&server, Duration::from_secs(10));
    assert!(took.is_some(), "server still running 10 s after SIGTERM: a client not reading replies blocks shutdown");
    assert_eq!(server.stop(), Some(0));
}
