//! Hostile clients must not freeze well-behaved ones: connections that hold
//! buffers and never read, connections that announce huge payloads and
//! withhold them, floods of idle handshakes, and the descriptor limit. In
//! every case a fresh client is served within a second.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::raw::{self, Raw};
use common::*;

const MIB: u64 = 1 << 20;
const SERVED_WITHIN: Duration = Duration::from_secs(1);

/// Negotiates, writes and reads back 64 KiB; returns how long it took.
fn fresh_client(addr: &str, offset: u64) -> Duration {
    let start = Instant::now();
    let mut c = Raw::connect(addr);
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.greeting();
    c.send(&(raw::C_FIXED_NEWSTYLE | raw::C_NO_ZEROES).to_be_bytes());
    c.go("");
    let data = random_bytes(65536, offset);
    assert_eq!(c.write(1, offset, &data).0, 0, "fresh client's write");
    assert_eq!(c.read(2, offset, data.len() as u32).unwrap(), data, "fresh client's read");
    c.disconnect();
    start.elapsed()
}

fn assert_fresh_clients_served(addr: &str, what: &str) {
    for i in 0..5u64 {
        let took = fresh_client(addr, 200 * MIB + i * MIB);
        assert!(took < SERVED_WITHIN, "{what}: fresh client {i} took {took:?}");
    }
}

/// Two connections each pipeline 256 READs of 1 MiB and never read a byte.
#[test]
fn readers_that_never_read_do_not_freeze_others() {
    let mut server = Server::start(&["memory:512M", "--stall-timeout", "3"]);
    let addr = server.addr();
    let mut hogs: Vec<Raw> = (0..2).map(|_| Raw::open(&addr, "")).collect();
    for hog in &mut hogs {
        let mut burst = Vec::new();
        for i in 0..256u64 {
            burst.extend_from_slice(&raw::request_bytes(0, raw::CMD_READ, i, (i % 128) * MIB, MIB as u32));
        }
        hog.send(&burst);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_fresh_clients_served(&addr, "while two readers hold their replies");
    // The stall timeout drops them and frees what they held.
    for hog in &hogs {
        assert!(
            hog.hung_up_within(Duration::from_secs(8)),
            "a connection that never reads is dropped after --stall-timeout"
        );
    }
    assert_fresh_clients_served(&addr, "after the readers were dropped");
    assert_eq!(server.stop(), Some(0));
}

/// Ten connections announce 32 MiB WRITEs and send almost nothing. With a
/// small budget most of them wait for buffers; with a large one they all
/// hold 32 MiB. Either way fresh clients get in, and the ones holding
/// buffers are dropped after the stall timeout.
#[test]
fn withheld_write_payloads_do_not_freeze_others() {
    for budget in ["64M", "512M"] {
        let mut server = Server::start(&["memory:512M", "--stall-timeout", "3", "--buffers", budget]);
        let addr = server.addr();
        let mut hogs: Vec<Raw> = (0..10).map(|_| Raw::open(&addr, "")).collect();
        for (i, hog) in hogs.iter_mut().enumerate() {
            hog.send(&raw::request_bytes(0, raw::CMD_WRITE, 1, i as u64 * 32 * MIB, 32 << 20));
            hog.send(&[0u8; 1000]);
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_fresh_clients_served(&addr, &format!("while ten payloads are withheld (--buffers {budget})"));
        if budget == "512M" {
            for hog in &hogs {
                assert!(
                    hog.hung_up_within(Duration::from_secs(8)),
                    "a withheld payload is dropped after --stall-timeout"
                );
            }
        }
        assert_fresh_clients_served(&addr, "later");
        drop(hogs);
        assert_eq!(server.stop(), Some(0));
    }
}

/// A client that is merely slow is not dropped: the stall timeout counts
/// time without progress, not time with requests outstanding.
#[test]
fn a_slow_but_steady_client_is_not_dropped() {
    let mut server = Server::start(&["memory:64M", "--stall-timeout", "1"]);
    let mut c = Raw::open(&server.addr(), "");
    let data = random_bytes(2 * MIB as usize, 1);
    c.send(&raw::request_bytes(0, raw::CMD_WRITE, 1, 0, data.len() as u32));
    for piece in data.chunks(128 * 1024) {
        c.send(piece);
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(c.simple(), (0, 1), "slow write completed");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.read(2, 0, 4096).unwrap(), data[..4096].to_vec(), "an idle connection is kept");
    c.disconnect();
    assert_eq!(server.stop(), Some(0));
}

fn connect_quietly(addr: &SocketAddr) -> Option<TcpStream> {
    TcpStream::connect_timeout(addr, Duration::from_millis(500)).ok()
}

/// 1,100 connections that never say anything: new clients still negotiate
/// at once, again and again.
#[test]
fn a_flood_of_idle_handshakes_does_not_lock_clients_out() {
    let mut server = Server::start(&["memory:512M"]);
    let addr = server.addr();
    let target: SocketAddr = addr.parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Some(s) = connect_quietly(&target) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(400));
    assert_fresh_clients_served(&addr, "with 1,100 idle handshakes");
    for _ in 0..200 {
        if let Some(s) = connect_quietly(&target) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(400));
    assert_fresh_clients_served(&addr, "after another wave");
    drop(idle);
    assert_eq!(server.stop(), Some(0));
}

/// At the descriptor limit, idle handshakes are shed so that real clients
/// get in, and the log says so once, not a hundred times a second.
#[test]
fn at_the_descriptor_limit_clients_still_get_in_and_the_log_stays_quiet() {
    let dir = TempDir::new("emfile");
    let log = dir.path("stderr.log");
    let launch = Launch {
        wrapper: vec!["prlimit", "--nofile=160:160", "--"],
        stderr: Some(log.clone()),
        ..Launch::new(&["memory:512M"])
    };
    let mut server = Server::launch(&launch);
    let addr = server.addr();
    let target: SocketAddr = addr.parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Some(s) = connect_quietly(&target) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_fresh_clients_served(&addr, "at the descriptor limit");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    assert_fresh_clients_served(&addr, "after the flood");
    assert_eq!(server.stop(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("accept")).count();
    assert!(lines <= 3, "{lines} accept lines:\n{text}");
}
