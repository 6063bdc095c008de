//! The request and connection lifecycle under teardown: shutdown while a
//! large WRITE payload is still arriving, connections reset in the middle
//! of a payload while replies are being sent, connections waiting for
//! buffers resumed when the connection holding them goes away, and a worker
//! panic ending the whole process.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::raw::{self, Raw, reset};
use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn sigterm(server: &Server) {
    // SAFETY: signalling a child we spawned and have not reaped.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
}

/// SIGTERM arrives after 1 MiB of a 4 MiB WRITE; the rest comes in two
/// pieces. The write completes and is acknowledged, and the server exits
/// within the shutdown timeout.
#[test]
fn shutdown_waits_for_a_write_payload_in_flight_and_then_exits() {
    let dir = TempDir::new("drain-write");
    let path = dir.path("disk.img");
    sparse_file(&path, 16 * MIB);
    let path_arg = path.display().to_string();
    let mut server = Server::start(&[&path_arg, "--shutdown-timeout", "2"]);
    let mut c = Raw::open(&server.addr(), "");
    let data = random_bytes(4 * MIB as usize, 42);
    c.send(&raw::request_bytes(0, raw::CMD_WRITE, 7, MIB, data.len() as u32));
    c.send(&data[..MIB as usize]);
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&server);
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    c.send(&data[MIB as usize..(5 * MIB / 2) as usize]);
    std::thread::sleep(Duration::from_millis(300));
    c.send(&data[(5 * MIB / 2) as usize..]);
    assert_eq!(c.simple(), (0, 7), "the write whose payload was arriving is acknowledged");
    let status = server.wait_exit(Duration::from_secs(6)).expect("server still running 6 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());
    let on_disk = file_bytes(&path);
    assert!(on_disk[MIB as usize..5 * MIB as usize] == data[..], "acknowledged write on disk");
}

/// A client that stops sending in the middle of a payload is dropped at
/// the shutdown deadline, not waited for.
#[test]
fn shutdown_drops_a_payload_that_stops_arriving_at_the_deadline() {
    let mut server = Server::start(&["memory:64M", "--shutdown-timeout", "1"]);
    let mut c = Raw::open(&server.addr(), "");
    c.send(&raw::request_bytes(0, raw::CMD_WRITE, 1, 0, 4 << 20));
    c.send(&vec![1u8; 1 << 20]);
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&server);
    let status = server.wait_exit(Duration::from_secs(5)).expect("server hangs on a stalled payload");
    assert!(status.success());
}

/// Clients that reset their connection while a reply is being sent and a
/// WRITE payload is arriving: every connection, request and buffer is
/// freed (descriptors back to where they were).
#[test]
fn resets_mid_payload_with_replies_in_flight_leak_nothing() {
    let mut server = Server::start(&["memory:256M", "--threads", "1"]);
    let addr = server.addr();
    // A first connection so lazily created descriptors exist in the baseline.
    Raw::open(&addr, "").disconnect();
    std::thread::sleep(Duration::from_millis(300));
    let baseline = server.fd_count();
    for round in 0..40u64 {
        let mut c = Raw::open(&addr, "");
        // Large replies the client never reads keep the server's send busy.
        for i in 0..8 {
            c.send(&raw::request_bytes(0, raw::CMD_READ, i, i * MIB, MIB as u32));
        }
        c.send(&raw::request_bytes(0, raw::CMD_WRITE, 99, 0, 8 << 20));
        let chunk = vec![round as u8; 256 * 1024];
        for _ in 0..(round % 6) {
            c.send(&chunk);
        }
        // Keep payload flowing while the reset lands.
        let mut s = c.s.try_clone().unwrap();
        let feeder = std::thread::spawn(move || {
            for _ in 0..8 {
                if s.write_all(&[0u8; 65536]).is_err() {
                    break;
                }
            }
        });
        reset(c.s);
        let _ = feeder.join();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.fd_count() > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.fd_count(), baseline, "connections leaked");
    let mut fresh = Raw::open(&addr, "");
    assert_eq!(fresh.write(1, 0, &[9u8; 4096]).0, 0);
    assert_eq!(fresh.read(2, 0, 4096).unwrap(), vec![9u8; 4096]);
    fresh.disconnect();
    assert_eq!(server.stop(), Some(0));
}

/// One connection holds every buffer with READs it never reads; another
/// waits. When the first goes away (a teardown, not a successful send),
/// the waiting one must be served at once.
#[test]
fn a_waiting_connection_resumes_when_the_one_holding_buffers_disconnects() {
    let mut server = Server::start(&["memory:512M", "--threads", "1"]);
    let addr = server.addr();
    for teardown in ["close", "reset"] {
        let mut hog = Raw::open(&addr, "");
        for i in 0..255u64 {
            hog.send(&raw::request_bytes(0, raw::CMD_READ, i, (i % 256) * MIB, MIB as u32));
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut victim = Raw::open(&addr, "");
        victim.send(&raw::request_bytes(0, raw::CMD_READ, 1, 0, 8 << 20));
        std::thread::sleep(Duration::from_millis(300));
        let left = Instant::now();
        match teardown {
            "close" => drop(hog),
            _ => reset(hog.s),
        }
        victim.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        assert_eq!(victim.simple(), (0, 1), "{teardown}: victim served");
        assert!(left.elapsed() < Duration::from_secs(1), "{teardown}: victim waited {:?}", left.elapsed());
        victim.recv(8 << 20);
        victim.disconnect();
    }
    assert_eq!(server.stop(), Some(0));
}

/// A panic on a worker ends the process with a message and a non-zero
/// status; it does not leave a half-working server.
#[test]
fn a_worker_panic_ends_the_process_loudly() {
    let dir = TempDir::new("panic");
    let log = dir.path("stderr.log");
    let launch = Launch {
        env: vec![("RINGNBD_TEST_FAULTS", "panic-read=12288")],
        stderr: Some(log.clone()),
        ..Launch::new(&["memory:16M"])
    };
    let mut server = Server::launch(&launch);
    let mut c = Raw::open(&server.addr(), "");
    assert!(c.read(1, 0, 4096).is_ok());
    c.send(&raw::request_bytes(0, raw::CMD_READ, 2, 12288, 4096));
    let status = server.wait_exit(Duration::from_secs(5)).expect("server kept running after a worker panic");
    assert!(!status.success(), "status {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("fatal") && text.contains("panicked"), "stderr: {text}");
    assert!(c.closed_within(Duration::from_secs(2)).is_some(), "client connection closed");
}

/// The handshake threads alive in the server, by thread ID.
fn handshake_threads(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("ringnbd-handsha")))
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// Short connections one after another reuse a kept handshake thread
/// instead of starting one each (a thread start cost more CPU than a whole
/// short connection), and no more than four are kept.
#[test]
fn short_connections_reuse_kept_handshake_threads() {
    let server = Server::start(&["memory:16M"]);
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..30 {
        let mut c = Raw::open(&server.addr(), "");
        assert_eq!(c.read(1, 0, 512).unwrap(), vec![0; 512]);
        c.disconnect();
        // The thread that negotiated is kept, waiting for the next client.
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = loop {
            let alive = handshake_threads(server.pid());
            if !alive.is_empty() || Instant::now() > deadline {
                break alive;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(!alive.is_empty() && alive.len() <= 4, "round {round}: handshake threads {alive:?}");
        seen.extend(alive);
    }
    assert!(seen.len() <= 4, "30 sequential connections went through {} handshake threads", seen.len());
}
