//! Request counters seen from outside: a scrape of `--metrics` and
//! `ringnbd ctl stats` after a known workload give its exact operation,
//! byte and error counts; the HTTP endpoint survives garbage, slow and
//! oversized requests and many scrapers at once.
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One HTTP exchange: the status code and body.
fn http(port: u16, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

fn scrape(port: u16) -> String {
    let (code, body) = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    body
}

/// The sum over workers of `metric` samples whose labels include all of
/// `labels` (`key="value"` strings).
fn sum(text: &str, metric: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Writes, reads, a flush, a trim, zeroes, block status, and two refused
/// requests past the end (ENOSPC for the write, EINVAL for the read).
const WORKLOAD: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_strict_mode(0)   # send the bad requests anyway: the server must refuse them
h.connect_uri(sys.argv[1])
for i in range(10):
    h.pwrite(b"w" * 4096, i * 4096)
for i in range(7):
    h.pread(8192, i * 8192)
h.flush()
h.trim(65536, 1 << 20)
for i in range(3):
    h.zero(4096, (2 << 20) + i * 4096)
h.block_status(1 << 20, 0, lambda *args: 0)
h.block_status(1 << 20, 1 << 20, lambda *args: 0)
size = h.get_size()
for call in (lambda: h.pwrite(b"x" * 512, size), lambda: h.pread(512, size)):
    try:
        call()
        print("a request past the end succeeded")
    except nbd.Error as e:
        print("refused", e.errno)
h.shutdown()
"#;

#[test]
fn a_scrape_and_ctl_stats_show_exactly_the_workload() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("metrics");
    let control = dir.path("ctl.sock");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut server = Server::start(&["--metrics", &metrics, "--control", control.to_str().unwrap(), "disk=memory:64M"]);
    let before = scrape(port);
    assert_eq!(sum(&before, "ringnbd_requests_total", &[]), 0, "nothing counted before any request:\n{before}");
    assert!(before.contains("ringnbd_workers 2\n"), "{before}");
    let out = python(WORKLOAD, &[&server.export_uri("disk")]);
    assert_eq!(out.lines().filter(|l| l.starts_with("refused")).count(), 2, "{out}");
    // The connection has closed; its counts stay.
    let text = scrape(port);
    let disk = "export=\"disk\"";
    for (command, ops, bytes) in [
        // The refused requests count as requests and errors, not bytes.
        ("write", 11, 10 * 4096),
        ("read", 8, 7 * 8192),
        ("flush", 1, 0),
        ("trim", 1, 65536),
        ("write_zeroes", 3, 3 * 4096),
        ("block_status", 2, 2 << 20),
    ] {
        let label = format!("command=\"{command}\"");
        assert_eq!(sum(&text, "ringnbd_requests_total", &[disk, &label]), ops, "{command} ops:\n{text}");
        assert_eq!(sum(&text, "ringnbd_request_bytes_total", &[disk, &label]), bytes, "{command} bytes:\n{text}");
        let count = format!("ringnbd_request_latency_seconds_count{{{disk},{label}}} {ops}");
        assert!(text.lines().any(|l| l == count), "{count} in:\n{text}");
    }
    assert_eq!(sum(&text, "ringnbd_request_errors_total", &["command=\"write\"", "error=\"ENOSPC\""]), 1, "{text}");
    assert_eq!(sum(&text, "ringnbd_request_errors_total", &["command=\"read\"", "error=\"EINVAL\""]), 1, "{text}");
    assert_eq!(sum(&text, "ringnbd_request_errors_total", &[]), 2);
    assert_eq!(sum(&text, "ringnbd_connections_total", &[disk]), 1);
    assert_eq!(sum(&text, "ringnbd_connections", &[disk]), 0);
    assert_eq!(sum(&text, "ringnbd_requests_in_flight", &[disk]), 0);

    // ctl stats reports the same, as JSON and as a table.
    let json = run_ok(&binary(), &["ctl", "--control", control.to_str().unwrap(), "--json", "stats"]);
    let reply: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &reply["result"]["exports"][0];
    assert_eq!(export["name"], "disk");
    assert_eq!(export["commands"]["write"]["ops"], 11);
    assert_eq!(export["commands"]["write"]["bytes"], 10 * 4096);
    assert_eq!(export["commands"]["write"]["errors"]["ENOSPC"], 1);
    assert_eq!(export["commands"]["read"]["errors"]["EINVAL"], 1);
    assert!(export["commands"]["read"]["latency_us"]["p99"].as_u64().unwrap() >= 1);
    let table = run_ok(&binary(), &["ctl", "--control", control.to_str().unwrap(), "stats"]);
    assert!(table.lines().any(|l| l.split_whitespace().take(3).eq(["write_zeroes", "3", "12288"])), "{table}");
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn the_endpoint_survives_garbage_slow_clients_and_many_scrapers() {
    if !require("nbdinfo") {
        return;
    }
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut server = Server::start(&["--metrics", &metrics, "memory:8M"]);
    assert_eq!(http(port, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0, 405);
    assert_eq!(http(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").0, 400);
    assert_eq!(http(port, &[b'A'; 20_000]).0, 400, "an endless head is cut off");
    let head_only = {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(b"HEAD /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    assert!(head_only.starts_with("HTTP/1.1 200") && head_only.ends_with("\r\n\r\n"), "{head_only}");
    // A client that sends half a request and goes away, and one that hangs up at once.
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap().write_all(b"GET /met"));
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    // Let their threads end, so the slots below are all free.
    std::thread::sleep(Duration::from_millis(500));

    // Silent clients fill every slot: the next scrape is told to come back
    // (503) at once instead of waiting, and once the silent ones are cut
    // off at the deadline scrapes work again.
    let silent: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(http(port, b"GET /metrics HTTP/1.1\r\n\r\n").0, 503);
    assert!(started.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(15);
    while http(port, b"GET /metrics HTTP/1.1\r\n\r\n").0 != 200 {
        assert!(Instant::now() < deadline, "scrapes never recovered from silent clients");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(silent);

    // Many scrapers at once, while NBD clients keep working.
    let uri = server.uri().to_owned();
    let scrapers: Vec<_> = (0..12)
        .map(|_| {
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
                    .filter(|(code, body)| *code == 200 && body.contains("ringnbd_workers 2"))
                    .count()
            })
        })
        .collect();
    assert_eq!(run_ok("nbdinfo", &["--size", &uri]).trim(), "8388608");
    let served: usize = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(served, 120, "every scrape of 12 at a time is answered (16 are allowed at once)");
    assert!(server.is_running());
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn counting_can_be_turned_off_and_then_the_readers_say_so() {
    let dir = TempDir::new("metrics-off");
    let control = dir.path("ctl.sock");
    let mut server = Server::start(&["--stats", "off", "--control", control.to_str().unwrap(), "memory:8M"]);
    let out = run(&binary(), &["ctl", "--control", control.to_str().unwrap(), "stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-counting"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.stop(), Some(0));
    let out = run(&binary(), &["--stats", "off", "--metrics", "127.0.0.1:0", "memory:8M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics needs request counting"));
}
